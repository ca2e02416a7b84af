#include <sys/eventfd.h>
#include <unistd.h>

#include <atomic>
#include <set>
#include <cstring>
#include <unordered_map>

#include "util/log.hpp"

#include <evmesh/codec.hpp>
#include <evmesh/node.hpp>

#include "reactor/node_impl.hpp"
#include "reactor/sub_registry.hpp"
#include "util/string_hash.hpp"

namespace evmesh {
namespace detail {
namespace {

}  // namespace

struct publisher_impl {
    std::shared_ptr<shared_context> ctx;
    void* sock = nullptr;
    std::string source;
    publisher_options opt;
    std::unordered_map<std::string, std::uint64_t, string_hash, std::equal_to<>> seq;
    std::string body;
    counter published, dropped;
    std::uint32_t since_drain = 0;

    ~publisher_impl() {
        if (sock != nullptr) {
            int linger = 200;
            zmq_setsockopt(sock, ZMQ_LINGER, &linger, sizeof(linger));
            zmq_close(sock);
        }
    }

    std::uint64_t* last_slot = nullptr;  // publishers tend to repeat a topic: skip the hash
    std::string last_topic;

    std::uint64_t next_seq(std::string_view topic) {
        if (last_slot != nullptr && topic == last_topic) {
            return ++*last_slot;
        }
        auto it = seq.find(topic);
        if (it == seq.end()) {
            it = seq.emplace(std::string(topic), 0).first;
        }
        last_topic.assign(topic);
        last_slot = &it->second;  // node-based map: stable until erased (never erased)
        return ++it->second;
    }

    // The XPUB queues the node's (rare) subscription messages; read them so they never pile up.
    void drain_subscriptions() {
        zmq_msg_t m;
        zmq_msg_init(&m);
        while (zmq_msg_recv(&m, sock, ZMQ_DONTWAIT) >= 0) {
        }
        zmq_msg_close(&m);
    }

    result<void> send(std::string_view topic) {
        if (++since_drain >= 1024) {
            since_drain = 0;
            drain_subscriptions();
        }
        const int flags = opt.policy == overflow_policy::drop ? ZMQ_DONTWAIT : 0;
        if (zmq_send(sock, topic.data(), topic.size(), flags | ZMQ_SNDMORE) < 0) {
            dropped.add();
            return fail(zmq_errno() == ETERM ? errc::stopped : errc::would_block);
        }
        zmq_send(sock, body.data(), body.size(), 0);
        published.add();
        return {};
    }
};

struct subscription_impl {
    std::shared_ptr<shared_context> ctx;
    void* sock = nullptr;
    topic_pattern pattern;
    event_callback callback;
    std::thread thread;
    int stop_fd = -1;
    zmq_msg_t topic{}, body{};
    std::unordered_map<std::string, std::uint64_t, string_hash, std::equal_to<>> last_seq;
    std::string key;
    std::shared_ptr<sub_counters> stats = std::make_shared<sub_counters>();
    counter& received = stats->received;
    counter& filtered = stats->filtered;
    counter& gaps = stats->gaps;
    counter& out_of_order = stats->out_of_order;
    counter& decode_errors = stats->decode_errors;
    counter& callback_errors = stats->callback_errors;

    subscription_impl() {
        zmq_msg_init(&topic);
        zmq_msg_init(&body);
    }

    ~subscription_impl() { close(); }

    void close() {
        stats->closed = true;
        if (thread.joinable()) {
            const std::uint64_t one = 1;
            (void)!write(stop_fd, &one, sizeof(one));
            thread.join();
        }
        if (stop_fd >= 0) {
            ::close(stop_fd);
            stop_fd = -1;
        }
        if (sock != nullptr) {
            int linger = 0;
            zmq_setsockopt(sock, ZMQ_LINGER, &linger, sizeof(linger));
            zmq_close(sock);
            sock = nullptr;
        }
        zmq_msg_close(&topic);
        zmq_msg_close(&body);
        zmq_msg_init(&topic);
        zmq_msg_init(&body);
    }

    std::uint64_t* last_slot = nullptr;  // the previous event's stream, to skip the hash
    std::string last_key;

    void track_sequence(const event_view& v) {
        if (v.seq == 0) {
            return;
        }
        std::uint64_t* slot = nullptr;
        if (last_slot != nullptr && last_key.size() == v.source.size() + 1 + v.topic.size()
            && std::string_view(last_key).substr(0, v.source.size()) == v.source
            && std::string_view(last_key).substr(v.source.size() + 1) == v.topic) {
            slot = last_slot;
        } else {
            key.assign(v.source);
            key.push_back('\0');
            key.append(v.topic);
            auto it = last_seq.find(std::string_view(key));
            if (it == last_seq.end()) {
                if (last_seq.size() >= 100000) {
                    last_seq.clear();  // bound memory; streams restart tracking
                }
                last_seq.emplace(key, v.seq);
                last_slot = nullptr;
                return;
            }
            slot = &it->second;
            last_slot = slot;
            last_key = key;
        }
        if (v.seq > *slot + 1) {
            gaps.add(v.seq - *slot - 1);
            stats->gap_on(v.topic, v.seq - *slot - 1);
        } else if (v.seq <= *slot) {
            out_of_order.add();
        }
        *slot = v.seq;
    }

    // Receives one message already waiting (or waits up to timeout_ms). Returns a view when it
    // is a matching, valid event.
    std::optional<event_view> next(int timeout_ms) {
        // take what is queued without a poll syscall; poll only when the queue is empty
        if (auto v = take(); v || last_take_received_) {
            return v;
        }
        zmq_pollitem_t item{sock, 0, ZMQ_POLLIN, 0};
        if (zmq_poll(&item, 1, timeout_ms) <= 0) {
            return std::nullopt;
        }
        return take();
    }

    bool last_take_received_ = false;  // take() consumed a message (even if not delivered)

    std::optional<event_view> take() {
        last_take_received_ = false;
        if (zmq_msg_recv(&topic, sock, ZMQ_DONTWAIT) < 0) {
            return std::nullopt;
        }
        last_take_received_ = true;
        if (!zmq_msg_more(&topic)) {
            decode_errors.add();
            return std::nullopt;
        }
        zmq_msg_recv(&body, sock, 0);
        if (zmq_msg_more(&body)) {
            while (zmq_msg_more(&body)) {
                zmq_msg_recv(&body, sock, 0);
            }
            decode_errors.add();
            return std::nullopt;
        }
        const std::string_view t(static_cast<const char*>(zmq_msg_data(&topic)),
                                 zmq_msg_size(&topic));
        if (!pattern.prefix_only() && !pattern.matches(t)) {
            filtered.add();
            return std::nullopt;
        }
        auto v = decode_event(
            t, std::string_view(static_cast<const char*>(zmq_msg_data(&body)), zmq_msg_size(&body)));
        if (!v) {
            decode_errors.add();
            return std::nullopt;
        }
        track_sequence(*v);
        received.add();
        return *v;
    }

    void dispatch_loop() {
        std::array<zmq_pollitem_t, 2> items{zmq_pollitem_t{sock, 0, ZMQ_POLLIN, 0},
                                            zmq_pollitem_t{nullptr, stop_fd, ZMQ_POLLIN, 0}};
        while (true) {
            if (zmq_poll(items.data(), 2, -1) < 0) {
                if (zmq_errno() == EINTR) {
                    continue;
                }
                return;
            }
            if ((items[1].revents & ZMQ_POLLIN) != 0) {
                return;
            }
            // drain what is queued, in a bounded batch per wake-up
            for (int i = 0; i < 256; ++i) {
                auto v = take();
                if (!last_take_received_) {
                    break;
                }
                if (v) {
                    try {
                        callback(*v);
                    } catch (const std::exception& e) {
                        callback_errors.add();
                        detail::log()->warn("evmesh: subscription callback threw: {}", e.what());
                    } catch (...) {
                        callback_errors.add();
                    }
                }
            }
        }
    }
};

}  // namespace detail

const char* to_string(peer_info::link_state s) noexcept {
    switch (s) {
        case peer_info::link_state::connecting: return "connecting";
        case peer_info::link_state::connected: return "connected";
        case peer_info::link_state::gone: return "gone";
    }
    return "unknown";
}

// ---- publisher ----

publisher::publisher(std::unique_ptr<detail::publisher_impl> impl) : impl_(std::move(impl)) {}
publisher::publisher(publisher&&) noexcept = default;
publisher& publisher::operator=(publisher&&) noexcept = default;
publisher::~publisher() = default;

result<void> publisher::publish(std::string_view topic,
                                std::string_view payload,
                                const std::vector<header>& headers,
                                std::string_view content_type) {
    auto& p = *impl_;
    if (!valid_topic(topic)) {
        return fail(errc::bad_topic);
    }
    p.body.clear();
    const auto t = now_ns();
    encode_event_body(new_event_id(t), p.source, t, p.next_seq(topic),
                      content_type.empty() ? std::string_view(p.opt.content_type) : content_type,
                      headers, payload, p.body);
    return p.send(topic);
}

result<void> publisher::publish(event& ev) {
    auto& p = *impl_;
    if (!valid_topic(ev.topic)) {
        return fail(errc::bad_topic);
    }
    if (ev.id == event_id{}) {
        ev.id = new_event_id();
    }
    if (ev.source.empty()) {
        ev.source = p.source;
    }
    if (ev.time_ns == 0) {
        ev.time_ns = now_ns();
    }
    if (ev.seq == 0) {
        ev.seq = p.next_seq(ev.topic);
    }
    if (ev.content_type.empty()) {
        ev.content_type = p.opt.content_type;
    }
    p.body.clear();
    encode_event_body(ev, p.body);
    return p.send(ev.topic);
}

const std::string& publisher::source() const noexcept {
    return impl_->source;
}

std::uint64_t publisher::published() const noexcept {
    return impl_->published.get();
}

std::uint64_t publisher::dropped() const noexcept {
    return impl_->dropped.get();
}

// ---- subscription ----

subscription::subscription(std::unique_ptr<detail::subscription_impl> impl)
    : impl_(std::move(impl)) {}
subscription::subscription(subscription&&) noexcept = default;
subscription& subscription::operator=(subscription&&) noexcept = default;
subscription::~subscription() = default;

std::optional<event_view> subscription::receive_view(std::chrono::milliseconds timeout) {
    if (!impl_ || impl_->callback || impl_->sock == nullptr) {
        return std::nullopt;
    }
    const auto deadline = std::chrono::steady_clock::now() + timeout;
    while (true) {
        const auto left = std::chrono::duration_cast<std::chrono::milliseconds>(
            deadline - std::chrono::steady_clock::now());
        const int ms = timeout.count() < 0 ? -1 : static_cast<int>(std::max<std::int64_t>(0, left.count()));
        if (auto v = impl_->next(ms)) {
            return v;
        }
        if (timeout.count() >= 0 && std::chrono::steady_clock::now() >= deadline) {
            return std::nullopt;
        }
    }
}

std::optional<event> subscription::receive(std::chrono::milliseconds timeout) {
    if (auto v = receive_view(timeout)) {
        return v->to_event();
    }
    return std::nullopt;
}

void subscription::close() {
    if (impl_) {
        impl_->close();
    }
}

const topic_pattern& subscription::pattern() const noexcept {
    return impl_->pattern;
}

subscription_counters subscription::counters() const noexcept {
    const auto& s = *impl_;
    return {s.received.get(), s.filtered.get(), s.gaps.get(),
            s.out_of_order.get(), s.decode_errors.get(), s.callback_errors.get()};
}

// ---- node ----

node::node(std::unique_ptr<detail::node_impl> impl) : impl_(std::move(impl)) {}

node::~node() {
    stop();
}

result<std::unique_ptr<node>> node::create(node_options options) {
    auto impl = detail::node_impl::create(std::move(options));
    if (!impl) {
        return tl::unexpected(impl.error());
    }
    return std::unique_ptr<node>(new node(std::move(*impl)));
}

result<publisher> node::make_publisher(publisher_options options) {
    if (!impl_->running) {
        return fail(errc::stopped);
    }
    auto p = std::make_unique<detail::publisher_impl>();
    p->ctx = impl_->ctx;
    p->opt = options;
    p->source = impl_->name + "/"
                + (options.name.empty() ? "pub-" + std::to_string(++impl_->publisher_seq)
                                        : options.name);
    p->sock = zmq_socket(p->ctx->ctx, ZMQ_XPUB);
    const int one = 1;
    zmq_setsockopt(p->sock, ZMQ_XPUB_NODROP, &one, sizeof(one));
    zmq_setsockopt(p->sock, ZMQ_SNDHWM, &options.hwm, sizeof(options.hwm));
    if (options.policy == overflow_policy::block && options.block_timeout.count() >= 0) {
        const int t = static_cast<int>(options.block_timeout.count());
        zmq_setsockopt(p->sock, ZMQ_SNDTIMEO, &t, sizeof(t));
    }
    if (zmq_connect(p->sock, impl_->local_in_ep.c_str()) != 0) {
        return fail(errc::bad_endpoint);
    }
    // No slow joiner: the node's XSUB hands its current subscriptions to a new publisher
    // asynchronously, and until they arrive ZeroMQ drops its events at the source. Wait (bounded)
    // until this publisher has them all, so an event published right away reaches every
    // subscriber that exists now.
    std::size_t expected = 0;
    (void)impl_->call([&] { expected = impl_->upstream_subscription_count(); });
    std::set<std::string> seen;
    const auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(2);
    zmq_msg_t m;
    zmq_msg_init(&m);
    while (seen.size() < expected && std::chrono::steady_clock::now() < deadline) {
        zmq_pollitem_t item{p->sock, 0, ZMQ_POLLIN, 0};
        if (zmq_poll(&item, 1, 10) <= 0) {
            continue;
        }
        while (zmq_msg_recv(&m, p->sock, ZMQ_DONTWAIT) >= 0) {
            const auto* d = static_cast<const char*>(zmq_msg_data(&m));
            if (zmq_msg_size(&m) >= 1 && d[0] == 1) {
                seen.emplace(d + 1, zmq_msg_size(&m) - 1);
            }
        }
    }
    zmq_msg_close(&m);
    return publisher(std::move(p));
}

namespace {
result<std::unique_ptr<detail::subscription_impl>> make_sub(detail::node_impl& n,
                                                            std::string_view pattern,
                                                            const subscription_options& o) {
    auto pat = topic_pattern::parse(pattern);
    if (!pat) {
        return tl::unexpected(pat.error());
    }
    if (!n.running) {
        return fail(errc::stopped);
    }
    auto s = std::make_unique<detail::subscription_impl>();
    s->ctx = n.ctx;
    s->pattern = std::move(*pat);
    s->stats->pattern = s->pattern.text();
    n.subs.add(s->stats);
    s->sock = zmq_socket(s->ctx->ctx, ZMQ_SUB);
    zmq_setsockopt(s->sock, ZMQ_RCVHWM, &o.hwm, sizeof(o.hwm));
    const auto& prefix = s->pattern.zmq_prefix();
    zmq_setsockopt(s->sock, ZMQ_SUBSCRIBE, prefix.data(), prefix.size());
    if (zmq_connect(s->sock, n.local_out_ep.c_str()) != 0) {
        return fail(errc::bad_endpoint);
    }
    // No slow joiner on this side either: until the node's XPUB has applied the subscription,
    // events published now would not reach this subscriber. Subscribe to a unique sync topic after
    // it; the XPUB applies a pipe's subscriptions in order, so once the node's I/O thread has seen
    // the sync topic, the real one is in effect. Bounded: at most 2 s.
    const std::string sync = std::string(detail::node_impl::sync_prefix) + to_string(new_event_id());
    zmq_setsockopt(s->sock, ZMQ_SUBSCRIBE, sync.data(), sync.size());
    const auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(2);
    for (bool seen = false; !seen && std::chrono::steady_clock::now() < deadline;) {
        if (!n.call([&] { seen = n.sync_seen_.erase(sync) > 0; })) {
            break;  // the node stopped
        }
        if (!seen) {
            std::this_thread::sleep_for(std::chrono::microseconds(200));
        }
    }
    zmq_setsockopt(s->sock, ZMQ_UNSUBSCRIBE, sync.data(), sync.size());
    return s;
}
}  // namespace

result<subscription> node::subscribe(std::string_view pattern, subscription_options options) {
    auto s = make_sub(*impl_, pattern, options);
    if (!s) {
        return tl::unexpected(s.error());
    }
    return subscription(std::move(*s));
}

result<subscription> node::subscribe(std::string_view pattern,
                                     event_callback callback,
                                     subscription_options options) {
    if (!callback) {
        return fail(errc::bad_option);
    }
    auto s = make_sub(*impl_, pattern, options);
    if (!s) {
        return tl::unexpected(s.error());
    }
    auto& impl = **s;
    impl.callback = std::move(callback);
    impl.stop_fd = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
    impl.thread = std::thread([p = &impl] { p->dispatch_loop(); });
    return subscription(std::move(*s));
}

void node::stop() {
    impl_->stop();
}

bool node::running() const noexcept {
    return impl_->running;
}

const std::string& node::name() const noexcept {
    return impl_->name;
}

const std::string& node::id() const noexcept {
    return impl_->id_text;
}

std::uint64_t node::incarnation() const noexcept {
    return impl_->incarnation;
}

const std::string& node::local_in_endpoint() const noexcept {
    return impl_->local_in_ep;
}

const std::string& node::local_out_endpoint() const noexcept {
    return impl_->local_out_ep;
}

const std::string& node::mesh_endpoint() const noexcept {
    return impl_->mesh_ep;
}

const std::vector<std::string>& node::pub_endpoints() const noexcept {
    return impl_->pub_eps;
}

const std::vector<std::string>& node::sub_endpoints() const noexcept {
    return impl_->sub_eps;
}

std::thread::id node::io_thread_id() const noexcept {
    return impl_->io_thread;
}

std::vector<peer_info> node::peers() const {
    std::vector<peer_info> out;
    if (!impl_->call([&] { out = impl_->snapshot_peers(); })) {
        return impl_->final_peers;
    }
    return out;
}

void node::set_channel_stats(std::function<std::string()> source) {
    impl_->set_channel_stats(std::move(source));
}

node_counters node::counters() const {
    node_counters out;
    if (!impl_->call([&] {
            impl_->collect_subscriber_counters();
            out = impl_->c;
        })) {
        return impl_->final_counters;  // written before `running` turned false
    }
    return out;
}

}  // namespace evmesh
