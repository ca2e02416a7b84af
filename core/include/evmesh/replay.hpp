/// @file replay.hpp
/// Replay: a subscription that starts in the past. It first receives what the mesh's durable
/// histories (node_options::history, on any node) hold for its pattern, from the chosen start,
/// then switches to live events with neither a gap nor a duplicate per stream (source, topic):
/// live events are buffered from the start, replayed events are checked against what was
/// delivered, and a stream whose first live event does not follow its replayed ones is asked
/// for again until it does (docs/HISTORY.md, PROTOCOL.md section 12).
/// Thread-safety: as `subscription` in callback mode (its own dispatcher thread).
#pragma once

#include <evmesh/export.hpp>

#include <chrono>
#include <cstdint>
#include <functional>
#include <memory>
#include <string>
#include <string_view>

#include <evmesh/node.hpp>

namespace evmesh {

namespace detail {
struct replay_impl;
}

/// Where a replay starts.
struct replay_from {
    enum class kind { beginning, time, after_id, last, last_per_topic };
    kind what = kind::beginning;
    std::int64_t time_ns = 0;  ///< kind::time: events with this time or later
    std::string id;            ///< kind::after_id: the events stored after this one (UUID text)
    std::uint64_t n = 0;       ///< kind::last: the last n matching events of each history

    static replay_from beginning() { return {}; }
    static replay_from since(std::int64_t t) { return {kind::time, t, {}, 0}; }
    static replay_from after(std::string id_text) { return {kind::after_id, 0, std::move(id_text), 0}; }
    static replay_from last(std::uint64_t count) { return {kind::last, 0, {}, count}; }
    static replay_from last_per_topic() { return {kind::last_per_topic, 0, {}, 0}; }
};

/// What a replay did (monotonic, safe from any thread).
struct replay_counters {
    std::uint64_t replayed = 0;    ///< delivered from histories
    std::uint64_t live = 0;        ///< delivered live
    std::uint64_t duplicates = 0;  ///< received twice (two histories, or history and live): dropped
    std::uint64_t gaps = 0;        ///< events no history had between the replay and live (reported)
    std::uint64_t histories = 0;   ///< (node, history) pairs that answered
    std::uint64_t pages = 0;       ///< pages received
    std::uint64_t id_not_found = 0;  ///< histories that do not hold the after_id event (they served from its time)
    bool is_live = false;          ///< the switch to live has happened
};

struct replay_options {
    replay_from from;
    /// How long to wait for histories to answer a query (the first page of each). A history
    /// that answers later is still served, but after live events (out of order); one that never
    /// answers is not waited for. Answers share the mesh links with live traffic: on links busy
    /// with the replayed pattern's events, give them longer.
    std::chrono::milliseconds answer_wait{1000};
    std::uint32_t page = 1000;          ///< events per page asked of a history
    std::size_t max_buffered = 1000000; ///< live events held while replaying (then: error)
    int hwm = 100000;                   ///< the live and reply subscriptions' queues
    /// Called once on the replay's thread at the switch to live: after the last replayed event,
    /// before the first live one (e.g. to tell a client that no history answered).
    std::function<void(const replay_counters&)> on_live;
};

/// A running replay. Destroying it stops delivery and joins its thread.
class EVMESH_API replay_subscription {
public:
    replay_subscription(replay_subscription&&) noexcept;
    replay_subscription& operator=(replay_subscription&&) noexcept;
    ~replay_subscription();

    replay_counters counters() const;
    /// Waits until the switch to live happened (true) or `timeout` passed (false).
    bool wait_live(std::chrono::milliseconds timeout) const;
    void close();

private:
    friend EVMESH_API result<replay_subscription> replay(node&, std::string_view, replay_options, event_callback);
    explicit replay_subscription(std::unique_ptr<detail::replay_impl> impl);
    std::unique_ptr<detail::replay_impl> impl_;
};

/// Starts a replay of `pattern` on `n`: `callback` runs on the replay's own thread, first for
/// the replayed events, then for live ones. Errors: bad_pattern, bad_option, stopped.
[[nodiscard]] EVMESH_API result<replay_subscription> replay(node& n, std::string_view pattern,
                                                            replay_options options, event_callback callback);

}  // namespace evmesh
