// The replaying side of PROTOCOL.md section 12: query the histories, page through their answers,
// deliver what was not delivered yet, then switch to the live subscription that was buffering
// since the start. docs/HISTORY.md explains why this has neither a gap nor a duplicate.
#include <evmesh/replay.hpp>

#include <algorithm>
#include <condition_variable>
#include <deque>
#include <map>
#include <mutex>
#include <unordered_map>

#include <msgpack.hpp>
#include <sys/eventfd.h>
#include <unistd.h>
#include <zmq.h>

#include <evmesh/codec.hpp>

#include "history/service.hpp"
#include "util/log.hpp"
#include "util/string_hash.hpp"

namespace evmesh {

namespace detail {

namespace {

// Sequence numbers delivered of one stream, as disjoint ranges (usually one).
class range_set {
public:
    bool contains(std::uint64_t s) const {
        auto it = r_.upper_bound(s);
        if (it == r_.begin()) {
            return false;
        }
        --it;
        return s <= it->second;
    }
    void insert(std::uint64_t s) {
        auto next = r_.upper_bound(s);
        if (next != r_.begin()) {
            auto prev = std::prev(next);
            if (s <= prev->second) {
                return;
            }
            if (prev->second + 1 == s) {
                prev->second = s;
                if (next != r_.end() && next->first == s + 1) {
                    prev->second = next->second;
                    r_.erase(next);
                }
                return;
            }
        }
        if (next != r_.end() && next->first == s + 1) {
            const auto to = next->second;
            r_.erase(next);
            r_.emplace(s, to);
            return;
        }
        r_.emplace(s, s);
    }
    bool empty() const { return r_.empty(); }
    std::uint64_t max() const { return r_.empty() ? 0 : std::prev(r_.end())->second; }

private:
    std::map<std::uint64_t, std::uint64_t> r_;
};

std::string_view split_topic(std::string_view frame, std::string_view& body) {
    auto z = frame.find('\0');
    if (z == std::string_view::npos) {
        body = {};
        return {};
    }
    body = frame.substr(z + 1);
    return frame.substr(0, z);
}

}  // namespace

struct replay_impl {
    node& n;
    replay_options opt;
    topic_pattern pattern;
    event_callback cb;
    std::string reply_topic;
    std::optional<subscription> live, replies;
    std::optional<publisher> pub;
    decode_limits limits;
    int stop_fd = -1;
    std::thread thread;
    std::atomic<bool> stopping{false};

    struct source {
        std::string node, history;
        std::uint64_t next = 0;
        bool more = false, outstanding = false;
        int resends = 0;
        std::chrono::steady_clock::time_point sent{};
    };
    std::map<std::string, source> sources;  // "<node id>/<history>"
    std::unordered_map<std::string, range_set, string_hash, std::equal_to<>> seen;
    std::unordered_map<std::string, std::uint64_t, string_hash, std::equal_to<>> first_live;
    std::deque<std::string> buffer;  // live frames held while replaying
    std::string key;

    mutable std::mutex mu;
    mutable std::condition_variable cv;
    replay_counters c;

    replay_impl(node& nd, replay_options o, topic_pattern p, event_callback f)
        : n(nd), opt(std::move(o)), pattern(std::move(p)), cb(std::move(f)), limits(nd.limits()) {}

    ~replay_impl() { stop(); }

    void stop() {
        if (thread.joinable()) {
            stopping = true;
            const std::uint64_t one = 1;
            (void)!write(stop_fd, &one, sizeof(one));
            thread.join();
        }
        if (stop_fd >= 0) {
            ::close(stop_fd);
            stop_fd = -1;
        }
        live.reset();
        replies.reset();
        pub.reset();
    }

    void count(std::uint64_t replay_counters::*f) {
        std::lock_guard lk(mu);
        ++(c.*f);
    }

    void send_query(const std::string& target, const source* s) {
        msgpack::sbuffer buf;
        msgpack::packer<msgpack::sbuffer> pk(buf);
        const auto& f = opt.from;
        const char* kind = "all";
        switch (f.what) {
            case replay_from::kind::beginning: kind = "all"; break;
            case replay_from::kind::time: kind = "time"; break;
            case replay_from::kind::after_id: kind = "after_id"; break;
            case replay_from::kind::last: kind = "last"; break;
            case replay_from::kind::last_per_topic: kind = "last_per_topic"; break;
        }
        pk.pack_map(s != nullptr ? 9 : 7);
        pk.pack("reply");
        pk.pack(reply_topic);
        pk.pack("pattern");
        pk.pack(pattern.text());
        pk.pack("from");
        pk.pack(kind);
        pk.pack("time");
        pk.pack(f.time_ns);
        pk.pack("id");
        pk.pack(f.id);
        pk.pack("n");
        pk.pack(f.n);
        pk.pack("limit");
        pk.pack(opt.page);
        if (s != nullptr) {
            pk.pack("position");
            pk.pack(s->next);
            pk.pack("history");
            pk.pack(s->history);
        }
        event ev;
        ev.topic = std::string(history_query_prefix) + target;
        ev.content_type = "application/msgpack";
        ev.payload.assign(buf.data(), buf.size());
        (void)pub->publish(ev);
    }

    void ask_next(source& s) {
        s.outstanding = true;
        s.sent = std::chrono::steady_clock::now();
        send_query(s.node, &s);
    }

    // Delivers `v` unless its (stream, seq) was delivered before.
    void offer(const event_view& v, bool replayed) {
        if (v.seq != 0) {
            auto& r = seen[std::string(stream_key(key, v.source, v.topic))];
            if (r.contains(v.seq)) {
                count(&replay_counters::duplicates);
                return;
            }
            r.insert(v.seq);
        }
        count(replayed ? &replay_counters::replayed : &replay_counters::live);
        try {
            cb(v);
        } catch (...) {
            // as a subscription's callback: never let it end the thread
        }
    }

    void on_reply(const event_view& r) {
        if (r.content_type == replay_frame_type) {
            std::string_view body;
            auto topic = split_topic(r.payload, body);
            auto v = decode_event(topic, body, limits);
            if (v && pattern.matches(v->topic)) {
                offer(*v, true);
            }
            return;
        }
        if (r.content_type != replay_end_type) {
            return;
        }
        source s;
        bool not_found = false;
        try {
            auto oh = msgpack::unpack(r.payload.data(), r.payload.size());
            const auto& o = oh.get();
            if (o.type != msgpack::type::MAP) {
                return;
            }
            for (const auto& kv : o.via.map) {
                if (kv.key.type != msgpack::type::STR) {
                    continue;
                }
                const std::string_view k(kv.key.via.str.ptr, kv.key.via.str.size);
                if (k == "node") {
                    s.node = kv.val.as<std::string>();
                } else if (k == "history") {
                    s.history = kv.val.as<std::string>();
                } else if (k == "next") {
                    s.next = kv.val.as<std::uint64_t>();
                } else if (k == "more") {
                    s.more = kv.val.as<bool>();
                } else if (k == "note" && kv.val.type == msgpack::type::STR) {
                    const std::string_view note(kv.val.via.str.ptr, kv.val.via.str.size);
                    not_found = note.starts_with("id not found");
                }
            }
        } catch (const std::exception&) {
            return;
        }
        const std::string k = s.node + "/" + s.history;
        auto [it, added] = sources.try_emplace(k, s);
        if (added) {
            count(&replay_counters::histories);
            if (not_found) {
                count(&replay_counters::id_not_found);
            }
        } else {
            it->second.next = std::max(it->second.next, s.next);
            it->second.more = s.more;
            it->second.outstanding = false;
            it->second.resends = 0;
        }
        count(&replay_counters::pages);
        if (it->second.more) {
            ask_next(it->second);
        }
    }

    bool all_answered() const {
        for (const auto& [k, s] : sources) {
            if (s.outstanding || s.more) {
                return false;
            }
        }
        return true;
    }

    // A stream whose first buffered live event does not follow the events replayed of it.
    bool has_gap() const {
        for (const auto& [k, f] : first_live) {
            auto it = seen.find(k);
            if (it != seen.end() && !it->second.empty() && it->second.max() + 1 < f) {
                return true;
            }
        }
        return false;
    }

    void run();
};

void replay_impl::run() {
    std::array<zmq_pollitem_t, 3> items{zmq_pollitem_t{subscription_access::socket(*replies), 0, ZMQ_POLLIN, 0},
                                        zmq_pollitem_t{subscription_access::socket(*live), 0, ZMQ_POLLIN, 0},
                                        zmq_pollitem_t{nullptr, stop_fd, ZMQ_POLLIN, 0}};
    const auto t0 = std::chrono::steady_clock::now();
    send_query("all", nullptr);
    enum class phase { replaying, catching_up, streaming } ph = phase::replaying;
    int rounds = 0;
    auto round_at = t0;
    while (!stopping) {
        zmq_poll(items.data(), static_cast<int>(items.size()), 10);
        for (int i = 0; i < 1024; ++i) {
            auto r = replies->receive_view(std::chrono::milliseconds(0));
            if (!r) {
                break;
            }
            on_reply(*r);
        }
        for (int i = 0; i < 4096; ++i) {
            auto v = live->receive_view(std::chrono::milliseconds(0));
            if (!v) {
                break;
            }
            if (ph == phase::streaming) {
                offer(*v, false);
                continue;
            }
            if (buffer.size() >= opt.max_buffered) {
                log()->error("evmesh: replay of {}: more than {} live events arrived while replaying; "
                             "the oldest are dropped and reported as gaps", pattern.text(), opt.max_buffered);
                buffer.pop_front();
                count(&replay_counters::gaps);
            }
            if (v->seq != 0) {
                first_live.try_emplace(std::string(stream_key(key, v->source, v->topic)), v->seq);
            }
            buffer.emplace_back(subscription_access::frame(*live));
        }
        const auto now = std::chrono::steady_clock::now();
        // a page that never came (its answer was cut by a block timeout): ask again
        for (auto& [k, s] : sources) {
            if (s.outstanding && now - s.sent > std::chrono::seconds(2) && s.resends < 5) {
                ++s.resends;
                ask_next(s);
            }
        }
        // From the beginning, a live stream that starts past seq 1 has older events that some
        // history may hold: while none has answered, wait up to 10 answer waits (a loaded mesh)
        const bool expecting = opt.from.what == replay_from::kind::beginning && sources.empty() &&
                               std::any_of(first_live.begin(), first_live.end(), [](const auto& f) { return f.second > 1; });
        const auto wait = expecting ? opt.answer_wait * 10 : opt.answer_wait;
        if (ph == phase::replaying && now - t0 >= wait && all_answered()) {
            // one more round from where each history stands: what reached it while the first
            // pages were served, and what was in flight to it when the live subscription began
            ph = phase::catching_up;
            rounds = 0;
            round_at = now;
            for (auto& [k, s] : sources) {
                ask_next(s);
            }
        } else if (ph == phase::catching_up && all_answered()) {
            if (has_gap() && rounds < 20) {
                if (now - round_at >= std::chrono::milliseconds(50)) {
                    ++rounds;
                    round_at = now;
                    for (auto& [k, s] : sources) {
                        ask_next(s);
                    }
                }
                continue;
            }
            for (const auto& [k, f] : first_live) {
                auto it = seen.find(k);
                if (it != seen.end() && !it->second.empty() && it->second.max() + 1 < f) {
                    std::lock_guard lk(mu);
                    c.gaps += f - it->second.max() - 1;
                }
            }
            if (opt.on_live) {
                replay_counters now_c;
                {
                    std::lock_guard lk(mu);
                    now_c = c;
                }
                try {
                    opt.on_live(now_c);
                } catch (...) {
                    // as the event callback
                }
            }
            for (const auto& frame : buffer) {
                std::string_view body;
                auto topic = split_topic(frame, body);
                if (auto v = decode_event(topic, body, limits); v && pattern.matches(v->topic)) {
                    offer(*v, false);
                }
            }
            buffer.clear();
            first_live.clear();
            ph = phase::streaming;
            {
                std::lock_guard lk(mu);
                c.is_live = true;
            }
            cv.notify_all();
        }
    }
}

}  // namespace detail

replay_subscription::replay_subscription(std::unique_ptr<detail::replay_impl> impl) : impl_(std::move(impl)) {}
replay_subscription::replay_subscription(replay_subscription&&) noexcept = default;
replay_subscription& replay_subscription::operator=(replay_subscription&&) noexcept = default;
replay_subscription::~replay_subscription() = default;

replay_counters replay_subscription::counters() const {
    if (!impl_) {
        return {};
    }
    std::lock_guard lk(impl_->mu);
    return impl_->c;
}

bool replay_subscription::wait_live(std::chrono::milliseconds timeout) const {
    if (!impl_) {
        return false;
    }
    std::unique_lock lk(impl_->mu);
    return impl_->cv.wait_for(lk, timeout, [&] { return impl_->c.is_live; });
}

void replay_subscription::close() {
    if (impl_) {
        impl_->stop();
    }
}

result<replay_subscription> replay(node& n, std::string_view pattern, replay_options options, event_callback callback) {
    auto pat = topic_pattern::parse(pattern);
    if (!pat) {
        return tl::unexpected(pat.error());
    }
    if (!callback || options.page == 0 || options.hwm <= 0 || options.max_buffered == 0) {
        return fail(errc::bad_option);
    }
    options.page = std::min<std::uint32_t>(options.page, static_cast<std::uint32_t>(detail::replay_max_page));
    auto impl = std::make_unique<detail::replay_impl>(n, std::move(options), std::move(*pat), std::move(callback));
    auto& r = *impl;
    r.reply_topic = std::string(detail::replay_reply_prefix) + to_string(new_event_id());
    // live first: everything published from now on is buffered; then the reply channel
    auto live = n.subscribe(pattern, subscription_options{.hwm = r.opt.hwm});
    if (!live) {
        return tl::unexpected(live.error());
    }
    auto replies = n.subscribe(r.reply_topic, subscription_options{.hwm = r.opt.hwm});
    if (!replies) {
        return tl::unexpected(replies.error());
    }
    auto pub = n.make_publisher({.name = "replay-" + r.reply_topic.substr(r.reply_topic.size() - 12),
                                 .policy = overflow_policy::block,
                                 .block_timeout = std::chrono::milliseconds(2000)});
    if (!pub) {
        return tl::unexpected(pub.error());
    }
    r.live.emplace(std::move(*live));
    r.replies.emplace(std::move(*replies));
    r.pub.emplace(std::move(*pub));
    r.stop_fd = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
    r.thread = std::thread([&r] { r.run(); });
    return replay_subscription(std::move(impl));
}

}  // namespace evmesh
