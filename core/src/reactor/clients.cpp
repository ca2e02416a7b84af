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
#include "history/service.hpp"
#include "reactor/sub_registry.hpp"
#include "util/string_hash.hpp"
#include "util/z85.hpp"
#include "codec/utf8.hpp"
#include "reactor/zmq_util.hpp"
#include "util/zmsg.hpp"
#include "codec/envelope.hpp"

namespace evmesh {
namespace detail {
namespace {

}  // namespace

struct publisher_impl {
    std::shared_ptr<shared_context> ctx;
    void* sock = nullptr;
    std::string source;
    publisher_options opt;
    decode_limits limits;  // the node's: what any subscriber would refuse is refused here
    std::unordered_map<std::string, std::uint64_t, string_hash, std::equal_to<>> seq;
    std::string frame;  // topic 0x00 body: one frame per event (no torn messages)
    counter published, dropped, rejected;
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

    result<void> refuse(errc e) {
        rejected.add();
        ctx->publish_rejected.fetch_add(1, std::memory_order_relaxed);
        return fail(e);
    }

    // The checks of decode_event (PROTOCOL.md 3.4) on what this publisher is about to send.
    result<void> check(std::string_view topic, std::string_view source_v, std::string_view ct,
                       const std::vector<header>& headers) {
        if (!valid_topic(topic, limits.max_topic_bytes)) {
            return refuse(errc::bad_topic);
        }
        if (source_v.size() > limits.max_string_bytes || ct.size() > limits.max_string_bytes
            || headers.size() > limits.max_headers) {
            return refuse(errc::too_large);
        }
        if (!codec::valid_utf8(source_v) || !codec::valid_utf8(ct)) {
            return refuse(errc::wrong_type);
        }
        for (const auto& [k, v] : headers) {
            if (k.size() > limits.max_string_bytes || v.size() > limits.max_string_bytes) {
                return refuse(errc::too_large);
            }
            if (!codec::valid_utf8(k) || !codec::valid_utf8(v)) {
                return refuse(errc::wrong_type);
            }
        }
        return {};
    }

    void begin_frame(std::string_view topic) {
        frame.assign(topic);
        frame.push_back('\0');
    }

    result<void> send(std::string_view topic) {
        if (frame.size() - topic.size() - 1 > limits.max_event_bytes) {
            return refuse(errc::too_large);
        }
        if (++since_drain >= 1024) {
            since_drain = 0;
            drain_subscriptions();
        }
        const int flags = opt.policy == overflow_policy::drop ? ZMQ_DONTWAIT : 0;
        if (zmq_send(sock, frame.data(), frame.size(), flags) < 0) {
            dropped.add();
            return fail(zmq_errno() == ETERM ? errc::stopped : errc::would_block);
        }
        published.add();
        return {};
    }
};

struct sub_state {
    std::shared_ptr<shared_context> ctx;
    decode_limits limits;  // the node's
    std::atomic<bool> stop_requested{false};  // close() from inside the callback
    std::atomic<bool> drain_on_stop{false};   // drain_and_close(): deliver what is queued first
    int hwm = 0;                              // the subscription's queue bound (drain_rest)
    std::mutex start_mu;                       // held while the dispatcher thread is stored
    std::mutex close_mu;                       // guards thread, detached, the release
    std::atomic<std::thread::id> dispatcher_id{};
    bool detached = false;                     // guarded by close_mu
    void* sock = nullptr;
    topic_pattern pattern;
    event_callback callback;
    std::thread thread;
    int stop_fd = -1;
    zmq_msg_t frame{};  // the last event received: topic 0x00 body (one frame)
    std::unordered_map<std::string, std::uint64_t, string_hash, std::equal_to<>> last_seq;
    std::string key;
    std::shared_ptr<sub_counters> stats = std::make_shared<sub_counters>();
    counter& received = stats->received;
    counter& filtered = stats->filtered;
    counter& gaps = stats->gaps;
    counter& out_of_order = stats->out_of_order;
    counter& decode_errors = stats->decode_errors;
    counter& callback_errors = stats->callback_errors;

    sub_state() { zmq_msg_init(&frame); }

    ~sub_state() { release(); }

    void close() {
        stats->closed = true;
        if (std::this_thread::get_id() == dispatcher_id.load()) {
            // From inside our own callback: joining would wait for ourselves. No further
            // callback starts. If nobody else is joining the thread, it detaches and cleans up by
            // itself when the callback returns (it owns a reference to this state).
            stop_requested = true;
            std::lock_guard lk(close_mu);
            if (thread.joinable()) {
                thread.detach();
                detached = true;
            }
            return;
        }
        std::unique_lock lk(close_mu);
        if (detached) {
            return;  // closed from inside the callback: the dispatcher cleans up
        }
        if (thread.joinable()) {
            // join without the lock: the callback may be calling close() right now
            std::thread t = std::move(thread);
            lk.unlock();
            const std::uint64_t one = 1;
            (void)!write(stop_fd, &one, sizeof(one));
            t.join();
            lk.lock();
        }
        release();
    }

    void release() {
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
        zmq_msg_close(&frame);
        zmq_msg_init(&frame);
    }

    std::uint64_t* last_slot = nullptr;  // the previous event's stream, to skip the hash
    std::string last_key;

    void track_sequence(const event_view& v) { track_sequence(v.source, v.topic, v.seq); }

    void track_sequence(std::string_view source, std::string_view topic, std::uint64_t seq) {
        if (seq == 0) {
            return;
        }
        std::uint64_t* slot = nullptr;
        if (last_slot != nullptr && last_key.size() == source.size() + 1 + topic.size()
            && std::string_view(last_key).substr(0, source.size()) == source
            && std::string_view(last_key).substr(source.size() + 1) == topic) {
            slot = last_slot;
        } else {
            key.assign(source);
            key.push_back('\0');
            key.append(topic);
            auto it = last_seq.find(std::string_view(key));
            if (it == last_seq.end()) {
                if (last_seq.size() >= 100000) {
                    last_seq.clear();  // bound memory; streams restart tracking
                }
                last_seq.emplace(key, seq);
                last_slot = nullptr;
                return;
            }
            slot = &it->second;
            last_slot = slot;
            last_key = key;
        }
        if (seq > *slot + 1) {
            gaps.add(seq - *slot - 1);
            stats->gap_on(topic, seq - *slot - 1);
        } else if (seq <= *slot) {
            out_of_order.add();
        }
        *slot = seq;
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
        if (zmq_msg_recv(&frame, sock, ZMQ_DONTWAIT) < 0) {
            return std::nullopt;
        }
        last_take_received_ = true;
        if (zmq_msg_more(&frame)) {
            // the node's inproc output sends one frame per event (topic 0x00 body)
            while (zmq_msg_more(&frame) && zmq_msg_recv(&frame, sock, ZMQ_DONTWAIT) >= 0) {
            }
            decode_errors.add();
            return std::nullopt;
        }
        tsan_acquire(zmq_msg_data(&frame));  // see zmsg.hpp
        std::string_view t, b;
        if (!codec::split_mesh_frame(
                {static_cast<const char*>(zmq_msg_data(&frame)), zmq_msg_size(&frame)}, t, b)) {
            decode_errors.add();
            return std::nullopt;
        }
        if (!pattern.prefix_only() && !pattern.matches(t)) {
            filtered.add();
            return std::nullopt;
        }
        auto v = decode_event(t, b, limits);
        if (!v) {
            decode_errors.add();
            return std::nullopt;
        }
        track_sequence(*v);
        received.add();
        return *v;
    }

    // take() for a consumer that keeps the frame as it is (the history): reads the envelope's
    // source, time and seq only (no full decode; the node validated the event at its ingress).
    // 1 = an event (topic, time_ns set; the frame stays in `frame`), 0 = nothing queued,
    // -1 = a message that was not a matching event (counted).
    int take_raw(std::string_view& topic, std::int64_t& time_ns, std::string_view& source, std::uint64_t& seq) {
        if (zmq_msg_recv(&frame, sock, ZMQ_DONTWAIT) < 0) {
            return 0;
        }
        if (zmq_msg_more(&frame)) {
            while (zmq_msg_more(&frame) && zmq_msg_recv(&frame, sock, ZMQ_DONTWAIT) >= 0) {
            }
            decode_errors.add();
            return -1;
        }
        tsan_acquire(zmq_msg_data(&frame));  // see zmsg.hpp
        std::string_view b;
        if (!codec::split_mesh_frame({static_cast<const char*>(zmq_msg_data(&frame)), zmq_msg_size(&frame)},
                                     topic, b)) {
            decode_errors.add();
            return -1;
        }
        if (!pattern.prefix_only() && !pattern.matches(topic)) {
            filtered.add();
            return -1;
        }
        if (!codec::peek_stream(b, source, time_ns, seq)) {
            decode_errors.add();
            return -1;
        }
        track_sequence(source, topic, seq);
        received.add();
        return 1;
    }

    void deliver(const event_view& v) {
        try {
            callback(v);
        } catch (const std::exception& e) {
            callback_errors.add();
            detail::log()->warn("evmesh: subscription callback threw: {}", e.what());
        } catch (...) {
            callback_errors.add();
        }
    }

    // drain_and_close(): everything the node sent before the drain began is queued ahead of
    // what it sends next, so read until the queue is empty for a moment (then all of it has been
    // read), or until more events than the pipe can hold have been read (then what still comes
    // was sent after the drain began: the successor subscription has it). Unsubscribing first
    // would not do: a SUB socket also filters what is already queued.
    void drain_rest() {
        const std::size_t bound = 4 * static_cast<std::size_t>(std::max(hwm, 1)) + 1024;
        for (std::size_t n = 0; n < bound; ++n) {
            auto v = take();
            if (!last_take_received_) {
                return;
            }
            if (v) {
                deliver(*v);
            }
        }
    }

    void dispatch_loop() {
        std::array<zmq_pollitem_t, 2> items{zmq_pollitem_t{sock, 0, ZMQ_POLLIN, 0},
                                            zmq_pollitem_t{nullptr, stop_fd, ZMQ_POLLIN, 0}};
        while (!stop_requested) {
            if (zmq_poll(items.data(), 2, -1) < 0) {
                if (zmq_errno() == EINTR) {
                    continue;
                }
                return;
            }
            if ((items[1].revents & ZMQ_POLLIN) != 0) {
                if (drain_on_stop) {
                    drain_rest();
                }
                return;
            }
            // drain what is queued, in a bounded batch per wake-up
            for (int i = 0; i < 256 && !stop_requested; ++i) {
                auto v = take();
                if (!last_take_received_) {
                    break;
                }
                if (v) {
                    deliver(*v);
                }
            }
        }
    }
};

// The handle's side: the dispatcher thread holds its own reference to the state, so a
// subscription destroyed from inside its callback never pulls the state from under it.
struct subscription_impl {
    std::shared_ptr<sub_state> st = std::make_shared<sub_state>();
    ~subscription_impl() { st->close(); }
};

void* subscription_access::socket(subscription& s) {
    return s.impl_ ? s.impl_->st->sock : nullptr;
}

int subscription_access::take_raw(subscription& s, std::string_view& topic, std::int64_t& time_ns,
                                  std::string_view& source, std::uint64_t& seq) {
    if (!s.impl_ || s.impl_->st->sock == nullptr) {
        return 0;
    }
    return s.impl_->st->take_raw(topic, time_ns, source, seq);
}

std::string_view subscription_access::frame(subscription& s) {
    auto& f = s.impl_->st->frame;
    return {static_cast<const char*>(zmq_msg_data(&f)), zmq_msg_size(&f)};
}

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
    if (!impl_) {
        return fail(errc::stopped);
    }
    auto& p = *impl_;
    const std::string_view ct = content_type.empty() ? std::string_view(p.opt.content_type) : content_type;
    if (auto r = p.check(topic, p.source, ct, headers); !r) {
        return r;
    }
    p.begin_frame(topic);
    const auto t = now_ns();
    encode_event_body(new_event_id(t), p.source, t, p.next_seq(topic), ct, headers, payload, p.frame);
    return p.send(topic);
}

result<void> publisher::publish(event& ev) {
    if (!impl_) {
        return fail(errc::stopped);
    }
    auto& p = *impl_;
    if (auto r = p.check(ev.topic, ev.source.empty() ? std::string_view(p.source) : ev.source,
                         ev.content_type, ev.headers);
        !r) {
        return r;
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
    p.begin_frame(ev.topic);
    encode_event_body(ev, p.frame);
    return p.send(ev.topic);
}

const std::string& publisher::source() const noexcept {
    static const std::string none;
    return impl_ ? impl_->source : none;
}

std::uint64_t publisher::published() const noexcept {
    return impl_ ? impl_->published.get() : 0;
}

std::uint64_t publisher::dropped() const noexcept {
    return impl_ ? impl_->dropped.get() : 0;
}

std::uint64_t publisher::rejected() const noexcept {
    return impl_ ? impl_->rejected.get() : 0;
}

// ---- subscription ----

subscription::subscription(std::unique_ptr<detail::subscription_impl> impl)
    : impl_(std::move(impl)) {}
subscription::subscription(subscription&&) noexcept = default;
subscription& subscription::operator=(subscription&&) noexcept = default;
subscription::~subscription() = default;

std::optional<event_view> subscription::receive_view(std::chrono::milliseconds timeout) {
    if (!impl_ || impl_->st->callback || impl_->st->sock == nullptr) {
        return std::nullopt;
    }
    auto& st = *impl_->st;
    const auto deadline = std::chrono::steady_clock::now() + timeout;
    while (true) {
        const auto left = std::chrono::duration_cast<std::chrono::milliseconds>(
            deadline - std::chrono::steady_clock::now());
        const int ms = timeout.count() < 0 ? -1 : static_cast<int>(std::max<std::int64_t>(0, left.count()));
        if (auto v = st.next(ms)) {
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
        impl_->st->close();
    }
}

void subscription::drain_and_close() {
    if (impl_) {
        if (impl_->st->callback) {
            impl_->st->drain_on_stop = true;
        }
        impl_->st->close();
    }
}

const topic_pattern& subscription::pattern() const noexcept {
    static const topic_pattern none;
    return impl_ ? impl_->st->pattern : none;
}

subscription_counters subscription::counters() const noexcept {
    if (!impl_) {
        return {};
    }
    const auto& s = *impl_->st;
    return {s.received.get(), s.filtered.get(), s.gaps.get(),
            s.out_of_order.get(), s.decode_errors.get(), s.callback_errors.get()};
}

// ---- node ----

node::node(std::unique_ptr<detail::node_impl> impl) : impl_(std::move(impl)) {}

node::~node() {
    stop();
}

result<std::unique_ptr<node>> node::create(node_options options) {
    auto histories = options.history;
    auto impl = detail::node_impl::create(std::move(options));
    if (!impl) {
        return tl::unexpected(impl.error());
    }
    std::unique_ptr<node> n(new node(std::move(*impl)));
    if (!histories.empty()) {
        std::string error;
        n->history_ = detail::history_service::start(*n, histories, error);
        if (!n->history_) {
            detail::log()->error("evmesh: {}", error);
            n->stop();
            return fail(errc::bad_option);
        }
        n->impl_->set_history_stats([svc = n->history_.get()] { return svc->stats(); });
        // NAKs for what aged out of the retransmit window are answered from disk when a history
        // records the topic: the window is the in-memory tail of the history (HISTORY.md)
        std::vector<topic_pattern> pats;
        for (const auto& h : histories) {
            for (const auto& text : h.patterns) {
                if (auto tp = topic_pattern::parse(text)) {
                    pats.push_back(std::move(*tp));
                }
            }
        }
        auto* io = n->impl_.get();
        auto* svc = n->history_.get();
        svc->set_repair_sink([io](detail::repair_request r, std::vector<std::string> frames, std::uint64_t last_sent,
                                  std::uint64_t first_sent, std::uint64_t lost_to) {
            io->post_repair(std::move(r), std::move(frames), last_sent, first_sent, lost_to);
        });
        io->set_history_repair(std::move(pats), [svc](detail::repair_request r) { svc->repair(std::move(r)); });
    }
    return n;
}

std::vector<history_stats> node::histories() const {
    return history_ ? history_->stats() : std::vector<history_stats>{};
}

result<publisher> node::make_publisher(publisher_options options) {
    if (!impl_->running) {
        return fail(errc::stopped);
    }
    if (options.name.size() > 255 || options.content_type.size() > 1024 || options.hwm <= 0) {
        return fail(errc::bad_option);
    }
    auto p = std::make_unique<detail::publisher_impl>();
    p->ctx = impl_->ctx;
    p->opt = options;
    p->limits = impl_->limits;
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
    // No slow joiner: the node subscribes its embedded publishers to everything (it filters at
    // its own XPUBs). Until that subscription arrives ZeroMQ drops at the source, so wait for it
    // (bounded); from then on every event reaches the node.
    const auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(2);
    zmq_msg_t m;
    zmq_msg_init(&m);
    for (bool seen = false; !seen && std::chrono::steady_clock::now() < deadline;) {
        zmq_pollitem_t item{p->sock, 0, ZMQ_POLLIN, 0};
        if (zmq_poll(&item, 1, 10) <= 0) {
            continue;
        }
        while (zmq_msg_recv(&m, p->sock, ZMQ_DONTWAIT) >= 0) {
            const auto* d = static_cast<const char*>(zmq_msg_data(&m));
            seen = seen || (zmq_msg_size(&m) == 1 && d[0] == 1);
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
    if (o.hwm <= 0) {
        return fail(errc::bad_option);
    }
    auto h = std::make_unique<detail::subscription_impl>();
    auto* s = h->st.get();
    s->ctx = n.ctx;
    s->limits = n.limits;
    s->pattern = std::move(*pat);
    s->stats->pattern = s->pattern.text();
    n.subs.add(s->stats);
    s->sock = zmq_socket(s->ctx->ctx, ZMQ_SUB);
    zmq_setsockopt(s->sock, ZMQ_RCVHWM, &o.hwm, sizeof(o.hwm));
    s->hwm = o.hwm;
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
    {
        std::lock_guard lk(n.sync_mu);
        n.sync_expected.emplace(sync, false);
    }
    zmq_setsockopt(s->sock, ZMQ_SUBSCRIBE, sync.data(), sync.size());
    const auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(2);
    for (bool seen = false; !seen && std::chrono::steady_clock::now() < deadline && n.running;) {
        {
            std::lock_guard lk(n.sync_mu);
            seen = n.sync_expected[sync];
        }
        if (!seen) {
            std::this_thread::sleep_for(std::chrono::microseconds(100));
        }
    }
    {
        std::lock_guard lk(n.sync_mu);
        n.sync_expected.erase(sync);
    }
    zmq_setsockopt(s->sock, ZMQ_UNSUBSCRIBE, sync.data(), sync.size());
    return h;
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
    auto st = (*s)->st;
    st->callback = std::move(callback);
    st->stop_fd = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
    // The thread starts delivering only once its std::thread is stored: a callback that closes
    // its own subscription reads (and detaches) that object.
    std::unique_lock start(st->start_mu);
    st->thread = std::thread([st] {
        { std::lock_guard started(st->start_mu); }
        st->dispatcher_id = std::this_thread::get_id();
        st->dispatch_loop();
        std::lock_guard lk(st->close_mu);
        if (st->detached) {
            st->release();  // closed from inside the callback: the socket is ours to close
        }
    });
    return subscription(std::move(*s));
}

void node::stop() {
    impl_->set_history_stats({});
    impl_->set_history_repair({}, {});
    if (history_) {
        history_->stop();  // its subscriptions and publisher go before the node
    }
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

const decode_limits& node::limits() const noexcept {
    return impl_->limits;
}

std::thread::id node::io_thread_id() const noexcept {
    return impl_->io_thread;
}

std::vector<peer_info> node::peers() const {
    std::vector<peer_info> out;
    if (!impl_->call([&] {
            out = impl_->snapshot_peers();
            std::lock_guard lk(impl_->snap_mu);
            impl_->last_peers = out;
        })) {
        std::lock_guard lk(impl_->snap_mu);
        return impl_->last_peers;
    }
    return out;
}

void node::set_channel_stats(std::function<std::string()> source) {
    impl_->set_channel_stats(std::move(source));
}

result<void> node::set_allow_list(const std::vector<std::string>& keys, const std::string& allow_file) {
    std::set<std::string> parsed;
    for (const auto& k : keys) {
        auto b = detail::z85_key(k);
        if (!b) {
            detail::set_last_error_message("security: allowed key '" + k + "' is not a Z85 CURVE key");
            return fail(errc::bad_option);
        }
        parsed.insert(*b);
    }
    if (!allow_file.empty() && ::access(allow_file.c_str(), R_OK) != 0) {  // e.g. not readable by
        // the service's user: refused here, instead of an empty list that drops every peer
        detail::set_last_error_message("security: cannot read allow file '" + allow_file + "': " +
                                       std::strerror(errno));
        return fail(errc::bad_option);
    }
    bool secure = false;
    if (!impl_->call([&] { secure = impl_->replace_allow_list(std::move(parsed), keys, allow_file); })) {
        return fail(errc::io_error);  // the I/O thread did not answer within call_timeout
    }
    if (!secure) {
        detail::set_last_error_message("security: the node runs without security; enabling it needs a restart");
        return fail(errc::bad_option);
    }
    return {};
}

node_counters node::counters() const {
    node_counters out;
    if (!impl_->call([&] {
            impl_->collect_counters();
            out = impl_->c;
        })) {
        std::lock_guard lk(impl_->snap_mu);
        return impl_->last_counters;  // the last snapshot (the final one after stop)
    }
    return out;
}

bool node::healthy() const noexcept {
    return impl_->healthy();
}

std::vector<node::lost_range> node::lost_ranges() const {
    std::lock_guard lk(impl_->snap_mu);
    return {impl_->lost_log.begin(), impl_->lost_log.end()};
}

}  // namespace evmesh
