/// @file channels.hpp
/// Channels: per-node delivery of events onward through plugins (evmesh/channel.h), with a
/// durable outbox, retries, dead letters and per-endpoint isolation (docs/CHANNELS.md).
/// Thread-safety: every member function of `channel_runtime` is safe from any thread.
#pragma once

#include <evmesh/export.hpp>

#include <array>
#include <chrono>
#include <cstdint>
#include <memory>
#include <string>
#include <string_view>
#include <vector>

#include <evmesh/error.hpp>
#include <evmesh/event.hpp>

namespace evmesh {

class node;

namespace channels {

using std::chrono::milliseconds;

/// The Standard Webhooks retry schedule: immediately, 5 s, 5 min, 30 min, 2 h, 5 h, 10 h, 14 h,
/// 20 h, 24 h (ten attempts; each entry is the delay before that attempt).
EVMESH_API std::vector<milliseconds> standard_webhooks_schedule();

/// Exponential schedule: attempt 1 immediately, then `initial`, `initial*factor`, ... capped at
/// `max_delay`, `attempts` entries in all.
EVMESH_API std::vector<milliseconds> exponential_schedule(milliseconds initial, double factor,
                                               milliseconds max_delay, int attempts);

/// When to try again.
struct retry_policy {
    /// Delay before each attempt; schedule[0] is the first attempt (normally 0). Its size is the
    /// number of attempts; after the last one fails the delivery is dead-lettered.
    std::vector<milliseconds> schedule = standard_webhooks_schedule();
    double jitter = 0.1;                         ///< each delay is scaled by 1 ± U(0, jitter)
    milliseconds max_retry_after{24 * 3600 * 1000};  ///< cap on a plugin's retry-after (HTTP 429/503)
    friend bool operator==(const retry_policy&, const retry_policy&) = default;
};

/// The circuit breaker of one endpoint: after `failures` attempts in a row answered "retry",
/// deliveries pause for `pause`, then one probe is sent; each failed probe doubles the pause up
/// to `max_pause`; a success resumes. Paused events keep their attempts. failures = 0: off.
struct breaker_policy {
    std::uint32_t failures = 5;
    milliseconds pause{1000};
    milliseconds max_pause{60000};
    friend bool operator==(const breaker_policy&, const breaker_policy&) = default;
};

/// One channel instance: one endpoint with its own queue and workers.
struct channel_config {
    std::string name;                 ///< unique per node: [A-Za-z0-9_.-], 1..64 bytes
    std::string plugin;               ///< "webhook" (found in the plugin dirs) or a path to a .so
    std::vector<std::string> topics;  ///< subscription patterns (topic.hpp syntax)
    std::string settings_json = "{}"; ///< passed to the plugin's create()
    retry_policy retry;
    breaker_policy breaker;
    int concurrency = 4;              ///< parallel deliveries to this endpoint (1..256)
    friend bool operator==(const channel_config&, const channel_config&) = default;
};

/// The runtime of one node's channels.
struct runtime_options {
    std::string outbox_path;          ///< SQLite database file (created; WAL mode)
    /// Directories searched for `evmesh_channel_<plugin>.so`, before $EVMESH_CHANNEL_PATH and the
    /// defaults next to the executable (../channels, ../lib/evmesh/channels).
    std::vector<std::string> plugin_dirs;
    std::vector<channel_config> channels;
    bool synchronous_full = false;    ///< fsync every commit (power-loss safe); default: WAL +
                                      ///< synchronous=NORMAL, which survives any process crash
    milliseconds dedupe_window{10 * 60 * 1000};  ///< delivered ids are remembered this long, so
                                                 ///< a re-published event is not delivered twice
    std::size_t log_keep = 10000;     ///< delivery-log rows kept per channel
    /// While the outbox cannot be written (disk full, locked, I/O error), matching events wait in
    /// memory, up to this many; beyond that they are counted `lost`. Writes are retried with
    /// backoff (100 ms doubling to 5 s) and everything held is accepted once a write succeeds.
    /// At most 65536 (the intake queue).
    std::size_t hold_events = 65536;
    friend bool operator==(const runtime_options&, const runtime_options&) = default;
};

/// Upper bounds (microseconds) of the channel latency histograms; the last bucket is +Inf.
/// From a local receiver's tens of microseconds up to an hour of retries.
inline constexpr std::array<std::uint64_t, 22> channel_latency_bounds_us = {
    25, 50, 100, 250, 500, 1000, 2500, 5000, 10000, 25000, 50000, 100000, 250000, 500000,
    1000000, 2500000, 5000000, 10000000, 30000000, 60000000, 300000000, 3600000000};
using channel_latency_histogram = std::array<std::uint64_t, channel_latency_bounds_us.size() + 1>;

/// Counters and gauges of one channel instance.
struct channel_stats {
    std::string name;
    std::string plugin;
    bool disabled = false;
    std::string disabled_reason;
    std::uint64_t accepted = 0;        ///< events persisted for this channel
    std::uint64_t duplicates = 0;      ///< events refused because their id is already known
    std::uint64_t attempts = 0;        ///< delivery attempts made
    std::uint64_t delivered = 0;
    std::uint64_t retried = 0;         ///< attempts that failed and were scheduled again
    std::uint64_t failed = 0;          ///< attempts that failed (retried + final failures)
    std::uint64_t dead_lettered = 0;
    std::uint64_t replayed = 0;        ///< dead letters put back into the outbox
    std::uint64_t recovered = 0;       ///< claimed at a crash (possibly in flight), redelivered
    std::uint64_t pending = 0;         ///< gauge: in the outbox, not delivered yet (incl. in flight)
    std::uint64_t in_flight = 0;       ///< gauge
    std::uint64_t dead = 0;            ///< gauge: in the dead-letter store
    double oldest_pending_age_s = 0;   ///< gauge: age of the oldest pending event
    std::uint64_t attempt_latency_sum_us = 0;  ///< plugin call time, all attempts
    std::uint64_t attempt_latency_max_us = 0;
    std::uint64_t delivery_latency_sum_us = 0; ///< accepted → delivered, delivered events
    channel_latency_histogram attempt_latency{};   ///< attempts by duration
    channel_latency_histogram delivery_latency{};  ///< delivered events by accepted → delivered
    std::uint64_t lost = 0;            ///< matching events refused because the outbox had failed
    bool paused = false;               ///< the circuit breaker holds deliveries (endpoint failing)
    std::uint64_t breaker_trips = 0;   ///< times the breaker opened
};

/// One row of the delivery log.
struct attempt_record {
    std::string event_id;   ///< UUID text
    std::string topic;
    std::uint32_t attempt = 0;
    std::int64_t time_ms = 0;      ///< when the attempt ended, Unix ms
    std::int64_t latency_us = 0;
    std::string outcome;    ///< delivered, retry, failed, dead, disabled
    std::int32_t code = 0;  ///< plugin's protocol status (HTTP status, SMTP reply, exit code)
    std::string detail;
};

/// One dead letter.
struct dead_record {
    std::string event_id;
    std::string topic;
    std::uint32_t attempts = 0;
    std::int64_t accepted_ms = 0, dead_ms = 0;
    std::int32_t last_code = 0;
    std::string last_detail;
};

/// Runs the channels of one node: subscribes to each channel's topics, persists every matching
/// event in the outbox before it counts as accepted, and delivers it through the plugin.
class EVMESH_API channel_runtime {
public:
    /// Opens the outbox, loads every plugin, creates the instances and subscribes.
    /// Errors: bad_option (message in `error`: which channel, which setting), io_error.
    [[nodiscard]] static result<std::unique_ptr<channel_runtime>> start(node& n, runtime_options options,
                                                                      std::string& error);
    /// Checks `options` without a node: validates them, loads every plugin and creates and
    /// destroys each instance (so the plugins check their settings). False with one line in `error`.
    static bool check(const runtime_options& options, std::string& error);

    ~channel_runtime();
    channel_runtime(const channel_runtime&) = delete;
    channel_runtime& operator=(const channel_runtime&) = delete;

    /// Unsubscribes, commits what was accepted, waits up to `drain` for deliveries in flight
    /// (they are redelivered after a restart if cut off), and unloads the plugins. Idempotent and
    /// safe from several threads; call it before the node is destroyed, never from a callback.
    void stop(milliseconds drain = milliseconds(2000));

    /// False while the outbox cannot be written (disk full, locked by another connection, I/O
    /// error: retried with backoff, true again once a write succeeds, no restart needed) and
    /// after a failure that cannot heal (corruption: intake and deliveries stop, matching events
    /// are counted `lost`). evmesh-node's /healthz then answers 503 with `outbox_error()`.
    bool healthy() const;

    /// Why the outbox is not healthy (empty when it is).
    std::string outbox_error() const;

    std::vector<channel_stats> stats() const;

    /// Hands `ev` to every channel whose patterns match it, as if it had arrived from the mesh;
    /// returns how many took it. An id already in a channel's outbox (pending, dead, or
    /// delivered within `dedupe_window`) is refused there as a duplicate, so offering an event
    /// twice never delivers it twice. evmesh-node's reload uses it for the events that arrive
    /// while the old channel set hands over to the new one.
    std::size_t offer(const event& ev);

    /// Puts dead letters of `channel` back into the outbox (all of them, or the one with
    /// `event_id`), with a fresh retry schedule. Returns how many. Errors: bad_option (unknown
    /// channel, or no dead letter with that id), stopped.
    [[nodiscard]] result<std::size_t> replay(std::string_view channel, std::string_view event_id = {});

    /// Re-enables a channel disabled by its endpoint (HTTP 410). Errors: bad_option, stopped.
    [[nodiscard]] result<void> enable(std::string_view channel);

    /// Newest delivery-log rows of `channel`, newest first.
    [[nodiscard]] result<std::vector<attempt_record>> delivery_log(std::string_view channel, std::size_t limit);

    /// Dead letters of `channel`, oldest first.
    [[nodiscard]] result<std::vector<dead_record>> dead_letters(std::string_view channel, std::size_t limit);

    struct impl;

private:
    explicit channel_runtime(std::unique_ptr<impl> p);
    std::unique_ptr<impl> impl_;
};

/// Default plugin directories for an executable at `exe_path` (../channels, ../lib/evmesh/channels).
EVMESH_API std::vector<std::string> default_plugin_dirs();

}  // namespace channels
}  // namespace evmesh
