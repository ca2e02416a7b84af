/// @file node.hpp
/// The evmesh node: an embedded XPUB/XSUB proxy with discovery and one-hop mesh forwarding,
/// plus the publisher and subscription handles that embedding code uses.
#pragma once

#include <evmesh/export.hpp>

#include <array>
#include <atomic>
#include <chrono>
#include <cstdint>
#include <functional>
#include <memory>
#include <optional>
#include <string>
#include <string_view>
#include <thread>
#include <vector>

#include <evmesh/codec.hpp>
#include <evmesh/error.hpp>
#include <evmesh/event.hpp>
#include <evmesh/options.hpp>
#include <evmesh/topic.hpp>

namespace evmesh {

namespace detail {
struct shared_context;
struct node_impl;
struct subscription_impl;
struct publisher_impl;
struct history_service;
struct subscription_access;
}  // namespace detail

/// A peer as seen by this node's discovery.
struct peer_info {
    enum class link_state { connecting, connected, gone };
    std::string id;             ///< node id (UUID text)
    std::string name;
    std::string endpoint;       ///< the peer's mesh endpoint (tcp://host:port)
    std::string beacon_address; ///< where its beacons come from (host:port)
    std::uint64_t incarnation = 0;
    bool observer = false;      ///< a mesh-inspector, not a service node
    link_state state = link_state::connecting;
    std::chrono::system_clock::time_point last_seen;
};

/// Name of a link state ("connecting", "connected", "gone").
EVMESH_API const char* to_string(peer_info::link_state s) noexcept;

/// Counters of one node. All monotonic except the gauges marked so.
struct node_counters {
    std::uint64_t local_in_events = 0, local_in_bytes = 0;    ///< from embedded publishers
    std::uint64_t client_in_events = 0, client_in_bytes = 0;  ///< from ipc/tcp client publishers
    std::uint64_t client_rejected = 0;   ///< malformed client events (not forwarded)
    std::uint64_t client_completed = 0;  ///< minimal client events completed by the node
    std::uint64_t mesh_in_events = 0, mesh_in_bytes = 0;      ///< from peers
    std::uint64_t local_out_events = 0;  ///< handed to the local XPUB
    std::uint64_t mesh_out_events = 0;   ///< handed to the mesh XPUB
    std::uint64_t local_out_blocked = 0; ///< times a full receiver held an event (block policy)
    std::uint64_t beacons_sent = 0, beacons_received = 0, beacons_rejected = 0;
    std::uint64_t beacons_foreign = 0;   ///< valid beacons of another mesh name (ignored)
    std::uint64_t peers_joined = 0, peers_left = 0, peers_expired = 0, peers_link_lost = 0;
    std::uint64_t subscriptions_local = 0;  ///< gauge: distinct topic prefixes subscribed locally
    std::uint64_t subscriptions_mesh = 0;   ///< gauge: distinct prefixes subscribed by peers
    std::uint64_t peers = 0;                ///< gauge: peers currently known
    std::uint64_t beacons_unauthenticated = 0;  ///< secured mesh: missing or bad MAC (forged, tampered)
    std::uint64_t beacons_replayed = 0;         ///< secured mesh: stale, future or repeated timestamp
    std::uint64_t peers_not_allowed = 0;        ///< valid beacons whose key is not on the allow-list
    std::uint64_t auth_rejected = 0;            ///< mesh connections refused by the allow-list (ZAP)
    std::uint64_t auth_accepted = 0;            ///< mesh connections accepted by the allow-list
    std::uint64_t stats_sent = 0;           ///< stats events published
    std::uint64_t pings_answered = 0;       ///< `_evmesh.ping` probes answered
    /// Gaps and drops reported by this node's embedded subscriptions (all of them, ever).
    std::uint64_t subscriber_gaps = 0, subscriber_received = 0;
    /// Delivery latency (event time to local delivery), sampled 1 in 8, in microsecond buckets
    /// with upper bounds `latency_bounds_us` (last bucket: larger).
    std::array<std::uint64_t, 18> latency_buckets{};
    std::uint64_t latency_sum_us = 0;
    // --- core v2 ---
    std::uint64_t publish_rejected = 0;   ///< events refused by embedded publishers' limits
    std::uint64_t mesh_rejected = 0;      ///< mesh frames that are not mesh-protocol-2 events
    std::uint64_t torn_messages = 0;      ///< multi-frame messages missing a frame (dropped)
    std::uint64_t peers_refused = 0;      ///< hellos refused (peer table full or join rate)
    std::uint64_t peers_replaced = 0;     ///< restarted peers that replaced their old entry
    std::uint64_t peers_incompatible = 0; ///< beacons of nodes speaking an older mesh protocol
    std::uint64_t links_up = 0, links_down = 0;  ///< mesh link transitions (reconnects included)
    std::uint64_t stalls = 0;             ///< the node's loop stalled past the expiry window
    std::uint64_t links_stuck = 0;        ///< gauge: peers heard from whose link has been down > 5 s
    std::uint64_t subscriptions_refused = 0;  ///< beyond max_subscriptions
    std::uint64_t reserved_rejected = 0;  ///< client events on reserved `_evmesh.` topics
    /// Repair (lossless links): NAKs sent, events recovered, events reported lost (with a
    /// range), duplicates dropped, retransmissions served, events held behind gaps (gauge).
    std::uint64_t repair_naks = 0, repair_recovered = 0, repair_lost = 0, repair_duplicates = 0;
    std::uint64_t repair_served = 0, repair_held = 0, repair_skipped = 0;
    /// The retransmit window (gauges): events, bytes, streams.
    std::uint64_t window_events = 0, window_bytes = 0, window_streams = 0;
    /// Repair beyond the window: NAKs for events that aged out of it, handed to this node's
    /// durable history (which records the topic), and the events it retransmitted from disk
    /// (also counted in repair_served).
    std::uint64_t repair_history_requests = 0, repair_from_history = 0;
};

/// A durable pull consumer of a history (docs/HISTORY.md, PROTOCOL.md section 13).
struct consumer_stats {
    std::string name;
    std::string filter;                 ///< topic pattern within the history
    std::uint64_t ack_floor = 0;        ///< every position below it is done
    std::uint64_t next = 0;             ///< the first position never delivered
    std::uint64_t lag = 0;              ///< positions stored but not yet delivered (head - next)
    std::uint64_t pending = 0;          ///< delivered, not acknowledged
    std::uint64_t redeliver_queue = 0;  ///< waiting to be delivered again (nak, ack wait passed)
    std::uint64_t members = 0;          ///< distinct fetchers in the last 30 s
    std::uint64_t delivered = 0, redelivered = 0, acked = 0, naked = 0, dead_lettered = 0;
    std::uint64_t lost = 0;             ///< removed by retention before they were acknowledged
    std::int64_t ack_wait_ms = 0;
    std::uint64_t max_deliver = 0;
};

/// One durable history of a node (node_options::history), as `node::history_stats` reports it.
struct history_stats {
    std::string name;
    std::vector<std::string> patterns;
    std::string dir;
    std::uint64_t events = 0, bytes = 0, segments = 0;  ///< kept now (gauges)
    std::uint64_t first_pos = 0, next_pos = 0;          ///< positions kept: [first_pos, next_pos)
    std::int64_t oldest_time_ns = 0, newest_time_ns = 0;
    std::uint64_t max_bytes = 0, max_events = 0;        ///< retention (0 = none)
    std::int64_t max_age_s = 0;
    std::uint64_t appended = 0;        ///< events written since the node started
    std::uint64_t expired = 0;         ///< events removed by retention
    std::uint64_t write_errors = 0;    ///< failed writes (disk full, I/O error)
    std::uint64_t dropped = 0;         ///< events lost to failed writes
    std::uint64_t gaps = 0;            ///< events the writer missed (its queue overflowed under `drop`)
    std::uint64_t truncated_bytes = 0; ///< torn or corrupt bytes cut when the node started
    std::uint64_t queries = 0, served = 0;  ///< replay queries answered, events sent to replays
    std::uint64_t query_errors = 0;    ///< malformed queries (ignored)
    std::uint64_t repairs = 0, repaired = 0;  ///< NAKs beyond the retransmit window answered from disk, events sent
    std::string error;                 ///< the last write error while it lasts (e.g. disk full)
    std::vector<consumer_stats> consumers;  ///< its durable pull consumers
};

/// Upper bounds (microseconds) of `node_counters::latency_buckets`; the last bucket is +Inf.
/// They start at a few microseconds: on one host p50 and p99 of a local delivery both sit
/// below 50 us, so coarser buckets would hide every percentile in the first one.
inline constexpr std::array<std::uint64_t, 17> latency_bounds_us = {
    5, 10, 25, 50, 100, 250, 500, 1000, 2500, 5000, 10000, 25000, 50000, 100000, 250000, 1000000, 2500000};

/// Per-subscription counters (what reached this subscriber, what it detected as lost).
struct subscription_counters {
    std::uint64_t received = 0;      ///< events delivered to user code
    std::uint64_t filtered = 0;      ///< events that passed the ZeroMQ prefix but not the pattern
    std::uint64_t gaps = 0;          ///< events missing according to sequence numbers
    std::uint64_t out_of_order = 0;  ///< sequence went backwards (restart or reorder)
    std::uint64_t decode_errors = 0; ///< malformed events (dropped)
    std::uint64_t callback_errors = 0;  ///< exceptions thrown by the callback (caught)
};

/// Publisher behaviour when the node does not take events fast enough.
struct publisher_options {
    std::string name;  ///< appended to the node name to form `source`; default "pub-<n>"
    overflow_policy policy = overflow_policy::block;
    std::chrono::milliseconds block_timeout{-1};  ///< block policy: -1 = wait forever
    int hwm = 10000;
    std::string content_type = "application/octet-stream";  ///< default content type
};

/// Publishes events into a node. Not thread-safe: use one publisher per thread (it owns a
/// socket). Movable. Outliving its node is safe: publishing then has no effect.
class EVMESH_API publisher {
public:
    publisher(publisher&&) noexcept;
    publisher& operator=(publisher&&) noexcept;
    ~publisher();

    /// Publishes `payload` on `topic`; fills id (UUIDv7), source, time and sequence.
    /// Limits are the node's (decode_limits, `max_event_bytes`): an event that any subscriber
    /// would refuse is refused here and counted (`rejected()`, node counter `publish_rejected`).
    /// Errors: bad_topic, too_large (body over max_event_bytes, a string over 1024 bytes, more
    /// than 64 headers), wrong_type (a header or content type that is not UTF-8), would_block
    /// (drop policy or block timeout; counted as dropped), stopped (also on a moved-from handle).
    [[nodiscard]] result<void> publish(std::string_view topic,
                                       std::string_view payload,
                                       const std::vector<header>& headers = {},
                                       std::string_view content_type = {});

    /// Publishes a complete event as given (id/source/time/seq filled only where unset).
    [[nodiscard]] result<void> publish(event& ev);

    const std::string& source() const noexcept;
    std::uint64_t published() const noexcept;
    std::uint64_t dropped() const noexcept;
    std::uint64_t rejected() const noexcept;  ///< refused by the limits

private:
    friend class node;
    explicit publisher(std::unique_ptr<detail::publisher_impl> impl);
    std::unique_ptr<detail::publisher_impl> impl_;
};

/// Called for every matching event on the subscription's dispatcher thread (never the node's
/// I/O thread). The view is valid only during the call. Must not throw (exceptions are caught
/// and counted).
using event_callback = std::function<void(const event_view&)>;

/// Options of a subscription.
struct subscription_options {
    int hwm = 10000;  ///< events queued for this subscriber before the node's policy applies
};

/// A subscription to one pattern. Pull mode (`receive`) is not thread-safe: use it from one
/// thread. Callback mode runs its own dispatcher thread; destroying the subscription
/// unsubscribes and joins it, except from inside its own callback, where `close()` and the
/// destructor stop delivery at once (no further callback starts) and the dispatcher thread ends
/// by itself when the callback returns. `counters()` is safe from any thread. A moved-from
/// subscription receives nothing and reports zero counters.
class EVMESH_API subscription {
public:
    subscription(subscription&&) noexcept;
    subscription& operator=(subscription&&) noexcept;
    ~subscription();

    /// Pull mode: waits up to `timeout` for the next matching event; the view stays valid until
    /// the next call. Empty optional on timeout or when the subscription is in callback mode.
    std::optional<event_view> receive_view(std::chrono::milliseconds timeout);

    /// Pull mode, owning copy.
    std::optional<event> receive(std::chrono::milliseconds timeout);

    /// Stops delivery (unsubscribes at the node) and joins the dispatcher thread. Events still
    /// queued for this subscription are discarded.
    void close();

    /// Callback mode: delivers every event the node sent to this subscription before the call
    /// (the queue, read until it is empty) to the callback, then closes like `close()`. For
    /// hand-overs where nothing may be lost: subscribe the successor first, then drain this one.
    /// Returns once the last callback returned. From inside its own callback it is `close()`.
    void drain_and_close();

    const topic_pattern& pattern() const noexcept;
    subscription_counters counters() const noexcept;

private:
    friend class node;
    friend struct detail::subscription_access;
    explicit subscription(std::unique_ptr<detail::subscription_impl> impl);
    std::unique_ptr<detail::subscription_impl> impl_;
};

/// One evmesh node. `create` starts its I/O thread; the destructor stops it.
/// Thread-safety: all member functions are safe to call from any thread.
class EVMESH_API node {
public:
    /// Binds all endpoints and starts the I/O thread and discovery.
    /// Errors: bad_option, bad_endpoint (names the endpoint in the log), io_error.
    [[nodiscard]] static result<std::unique_ptr<node>> create(node_options options);

    ~node();
    node(const node&) = delete;
    node& operator=(const node&) = delete;

    /// Creates a publisher connected to this node over inproc. Returns once the publisher knows
    /// every subscription the node has now (at most 2 s), so its first event is not lost.
    [[nodiscard]] result<publisher> make_publisher(publisher_options options = {});

    /// Pull-mode subscription. Errors: bad_pattern, stopped, too_large (max_subscriptions).
    /// When it returns, the subscription is in effect at this node: every event that this
    /// node's embedded publishers and clients send afterwards reaches it. Events from other nodes
    /// reach it once the subscription has travelled to them (one link's latency); with repair on
    /// for the topic (node_options::repair), events those nodes published after this call are
    /// recovered from their windows as well.
    [[nodiscard]] result<subscription> subscribe(std::string_view pattern,
                                                 subscription_options options = {});

    /// Callback-mode subscription with its own dispatcher thread.
    [[nodiscard]] result<subscription> subscribe(std::string_view pattern,
                                                 event_callback callback,
                                                 subscription_options options = {});

    /// Stops discovery (sends goodbye), drains within `linger`, closes sockets, joins the I/O
    /// thread and removes ipc files it created. Idempotent; concurrent calls all return once the
    /// node has stopped.
    void stop();

    bool running() const noexcept;
    /// False when the I/O thread has not completed a loop turn within `call_timeout` (a wedged
    /// loop) or the node is stopped.
    bool healthy() const noexcept;
    const std::string& name() const noexcept;
    const std::string& id() const noexcept;          ///< UUID text
    std::uint64_t incarnation() const noexcept;       ///< start time in ns (changes on restart)
    /// inproc, for publishers: one frame per event, `topic` 0x00 `body` (PROTOCOL.md 8.4)
    const std::string& local_in_endpoint() const noexcept;
    /// inproc, for subscribers: one frame per event, as local_in_endpoint
    const std::string& local_out_endpoint() const noexcept;
    const std::string& mesh_endpoint() const noexcept;       ///< tcp, "" when mesh disabled
    const std::vector<std::string>& pub_endpoints() const noexcept;  ///< as bound (ports resolved)
    const std::vector<std::string>& sub_endpoints() const noexcept;

    /// The limits every decoder of this node applies (publish, client input, subscriptions,
    /// channels): `decode_limits` with `max_event_bytes` from the options. Immutable.
    const decode_limits& limits() const noexcept;

    /// Id of the node's I/O thread (callbacks never run on it).
    std::thread::id io_thread_id() const noexcept;

    /// Current peers (a snapshot taken by the I/O thread; the last one taken when the thread
    /// does not answer within `call_timeout`).
    std::vector<peer_info> peers() const;

    /// Current counters (a snapshot taken by the I/O thread; the last one taken when the thread
    /// does not answer within `call_timeout`).
    node_counters counters() const;

    /// Ranges of events that repair could not recover (newest last, at most 1024 kept): source,
    /// topic and the missing seq range. Every such event is also counted in `repair_lost`.
    struct lost_range {
        std::string source, topic;
        std::uint64_t from = 0, to = 0;
    };
    std::vector<lost_range> lost_ranges() const;

    /// The durable histories of this node (node_options::history), read from their writer
    /// thread (a snapshot at most one flush interval old).
    std::vector<history_stats> histories() const;

    /// Sets the source of the `channels` element of this node's stats events (PROTOCOL.md
    /// section 10): a function returning one complete msgpack array, called on the I/O thread
    /// once per stats event, so it must be quick and must not call back into the node. The
    /// channel runtime installs one; an empty function restores the empty array.
    void set_channel_stats(std::function<std::string()> source);

    /// Replaces the allow-list of a secured node (evmesh-node's SIGHUP reload): the inline keys
    /// and the allow file, which is read at once and then watched as before. Peers whose key is
    /// no longer allowed are dropped. In effect when it returns. Errors: bad_option (security is
    /// off, which only a restart changes; a key that is not Z85; an allow file that cannot be
    /// read), io_error (the I/O thread did not answer within call_timeout).
    [[nodiscard]] result<void> set_allow_list(const std::vector<std::string>& keys, const std::string& allow_file);

private:
    explicit node(std::unique_ptr<detail::node_impl> impl);
    std::unique_ptr<detail::node_impl> impl_;
    std::unique_ptr<detail::history_service> history_;
};

}  // namespace evmesh
