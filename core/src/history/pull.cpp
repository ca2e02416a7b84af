// The member side of PROTOCOL.md section 13 for C++ programs that embed a node: requests are
// events on `_evmesh.consumer.*` published by an embedded publisher, answers come on a reply
// topic of this member's own subscription. Nothing here is private to the node: a sidecar client
// does the same over ZeroMQ (examples/python/pull.py).
#include <evmesh/pull.hpp>

#include <algorithm>
#include <charconv>
#include <optional>
#include <thread>

#include <msgpack.hpp>

#include <evmesh/codec.hpp>
#include <evmesh/topic.hpp>

#include "history/consumer.hpp"
#include "history/service.hpp"

namespace evmesh {

namespace detail {

struct pull_impl {
    node& n;
    pull_options opt;
    std::string reply_base;  // _evmesh.pull.<uuid>.  (one reply topic per fetch: <base><n>)
    std::uint64_t fetches = 0;
    std::optional<publisher> pub;
    std::optional<subscription> replies;

    pull_impl(node& nd, pull_options o) : n(nd), opt(std::move(o)) {}

    result<void> send(const std::string& target, const msgpack::sbuffer& map) {
        event ev;
        ev.topic = std::string(consumer_request_prefix) + target;
        ev.content_type = "application/msgpack";
        ev.payload.assign(map.data(), map.size());
        return pub->publish(ev);
    }

    void pack_common(msgpack::packer<msgpack::sbuffer>& pk, std::string_view op) const {
        pk.pack("op");
        pk.pack(op);
        pk.pack("history");
        pk.pack(opt.history);
        pk.pack("consumer");
        pk.pack(opt.consumer);
    }

    result<void> positions(std::string_view op, const std::vector<const pulled_message*>& ms) {
        // one request per node holding the history (a member may hold messages of two nodes'
        // histories of the same name only if both exist; acks go where the message came from)
        std::vector<std::string> nodes;
        for (const auto* m : ms) {
            if (std::find(nodes.begin(), nodes.end(), m->node) == nodes.end()) {
                nodes.push_back(m->node);
            }
        }
        for (const auto& node_id : nodes) {
            msgpack::sbuffer buf;
            msgpack::packer<msgpack::sbuffer> pk(buf);
            pk.pack_map(4);
            pack_common(pk, op);
            std::vector<std::uint64_t> pos;
            for (const auto* m : ms) {
                if (m->node == node_id) {
                    pos.push_back(m->pos);
                }
            }
            pk.pack("positions");
            pk.pack(pos);
            if (auto r = send(node_id.empty() ? std::string("all") : node_id, buf); !r) {
                return r;
            }
        }
        return {};
    }
};

namespace {

bool valid_consumer_name(const std::string& s) {
    return !s.empty() && s.size() <= 64 && std::all_of(s.begin(), s.end(), [](char ch) {
        return (ch >= 'a' && ch <= 'z') || (ch >= 'A' && ch <= 'Z') || (ch >= '0' && ch <= '9') || ch == '_' ||
               ch == '-';
    });
}

std::uint64_t header_uint(const event_view& v, std::string_view key) {
    const auto s = v.header_value(key);
    std::uint64_t out = 0;
    std::from_chars(s.data(), s.data() + s.size(), out);
    return out;
}

}  // namespace

}  // namespace detail

pull_consumer::pull_consumer(std::unique_ptr<detail::pull_impl> impl) : impl_(std::move(impl)) {}
pull_consumer::pull_consumer(pull_consumer&&) noexcept = default;
pull_consumer& pull_consumer::operator=(pull_consumer&&) noexcept = default;
pull_consumer::~pull_consumer() = default;

result<pull_consumer> pull_consumer::create(node& n, pull_options options) {
    if (options.history.empty() || options.history.size() > 64 || !detail::valid_consumer_name(options.consumer) ||
        !topic_pattern::parse(options.filter) || options.ack_wait < std::chrono::milliseconds(100)) {
        return fail(errc::bad_option);
    }
    auto impl = std::make_unique<detail::pull_impl>(n, std::move(options));
    impl->reply_base = std::string(detail::consumer_reply_prefix) + to_string(new_event_id()) + ".";
    auto sub = n.subscribe(impl->reply_base + ">", subscription_options{.hwm = 100000});
    if (!sub) {
        return tl::unexpected(sub.error());
    }
    auto pub = n.make_publisher({.name = "pull-" + impl->opt.consumer,
                                 .policy = overflow_policy::block,
                                 .block_timeout = std::chrono::milliseconds(2000)});
    if (!pub) {
        return tl::unexpected(pub.error());
    }
    impl->replies.emplace(std::move(*sub));
    impl->pub.emplace(std::move(*pub));
    std::this_thread::sleep_for(impl->opt.settle);
    return pull_consumer(std::move(impl));
}

result<fetch_result> pull_consumer::fetch(std::size_t batch, std::chrono::milliseconds wait) {
    if (!impl_) {
        return fail(errc::stopped);
    }
    if (batch == 0 || batch > 10000 || wait.count() < 0 || wait > std::chrono::milliseconds(60000)) {
        return fail(errc::bad_option);
    }
    auto& p = *impl_;
    const std::string reply = p.reply_base + std::to_string(++p.fetches);
    msgpack::sbuffer buf;
    msgpack::packer<msgpack::sbuffer> pk(buf);
    const auto& o = p.opt;
    pk.pack_map(o.dead_letter.empty() ? 10 : 11);  // op, history, consumer + 7 (+ dead_letter)
    p.pack_common(pk, "fetch");
    pk.pack("reply");
    pk.pack(reply);
    pk.pack("batch");
    pk.pack(static_cast<std::uint64_t>(batch));
    pk.pack("wait_ms");
    pk.pack(static_cast<std::uint64_t>(wait.count()));
    pk.pack("filter");
    pk.pack(o.filter);
    pk.pack("ack_wait_ms");
    pk.pack(static_cast<std::uint64_t>(o.ack_wait.count()));
    pk.pack("max_deliver");
    pk.pack(o.max_deliver);
    pk.pack("start");
    pk.pack(std::string(o.start_new ? "new" : "all"));
    if (!o.dead_letter.empty()) {
        pk.pack("dead_letter");
        pk.pack(o.dead_letter);
    }
    if (auto r = p.send("all", buf); !r) {
        return tl::unexpected(r.error());
    }
    fetch_result out;
    const auto deadline = std::chrono::steady_clock::now() + wait + o.answer_margin;
    while (true) {
        const auto left = std::chrono::duration_cast<std::chrono::milliseconds>(deadline - std::chrono::steady_clock::now());
        if (left.count() <= 0) {
            return out;  // no end event: the messages that came are still this member's to handle
        }
        auto v = p.replies->receive_view(left);
        if (!v) {
            continue;
        }
        if (v->content_type == detail::replay_frame_type) {
            const auto payload = v->payload;
            const auto nul = payload.find('\0');
            if (nul == std::string_view::npos) {
                continue;
            }
            auto stored = decode_event(payload.substr(0, nul), payload.substr(nul + 1), p.n.limits());
            if (!stored) {
                continue;  // not an event (the history stored what the mesh carried; never here)
            }
            pulled_message m;
            m.ev = stored->to_event();
            m.pos = detail::header_uint(*v, "evmesh-pos");
            m.deliveries = static_cast<std::uint32_t>(detail::header_uint(*v, "evmesh-deliveries"));
            const auto h = v->header_value("evmesh-history");
            m.node = std::string(h.substr(0, h.find('/')));
            out.messages.push_back(std::move(m));
            continue;
        }
        if (v->content_type != detail::fetch_end_type || v->topic != reply) {
            continue;  // the end of an earlier fetch that timed out: its messages were taken above
        }
        out.answered = true;
        try {
            auto oh = msgpack::unpack(v->payload.data(), v->payload.size());
            const auto& map = oh.get();
            if (map.type == msgpack::type::MAP) {
                for (const auto& kv : map.via.map) {
                    if (kv.key.type != msgpack::type::STR || kv.val.type != msgpack::type::POSITIVE_INTEGER) {
                        continue;
                    }
                    const std::string_view k(kv.key.via.str.ptr, kv.key.via.str.size);
                    if (k == "pending") {
                        out.pending = kv.val.via.u64;
                    } else if (k == "lag") {
                        out.lag = kv.val.via.u64;
                    } else if (k == "ack_floor") {
                        out.ack_floor = kv.val.via.u64;
                    }
                }
            }
        } catch (const std::exception&) {
            // the counts are informative; the messages are what matters
        }
        return out;
    }
}

result<void> pull_consumer::ack(const std::vector<pulled_message>& messages) {
    if (!impl_) {
        return fail(errc::stopped);
    }
    if (messages.empty()) {
        return {};
    }
    std::vector<const pulled_message*> ms;
    ms.reserve(messages.size());
    for (const auto& m : messages) {
        ms.push_back(&m);
    }
    return impl_->positions("ack", ms);
}

result<void> pull_consumer::ack(const pulled_message& m) {
    if (!impl_) {
        return fail(errc::stopped);
    }
    return impl_->positions("ack", {&m});
}

result<void> pull_consumer::nak(const pulled_message& m) {
    if (!impl_) {
        return fail(errc::stopped);
    }
    return impl_->positions("nak", {&m});
}

result<void> pull_consumer::in_progress(const pulled_message& m) {
    if (!impl_) {
        return fail(errc::stopped);
    }
    return impl_->positions("wip", {&m});
}

}  // namespace evmesh
