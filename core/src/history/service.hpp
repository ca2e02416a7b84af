// The history service of a node (docs/HISTORY.md): one thread that appends the events of every
// configured history to its store (an embedded subscription per pattern: the I/O thread only
// forwards, as for any subscriber) and answers replay queries (PROTOCOL.md section 12) by
// publishing the stored frames on the query's reply topic, a page at a time.
#pragma once

#include <atomic>
#include <functional>
#include <memory>
#include <mutex>
#include <string>
#include <string_view>
#include <thread>
#include <vector>

#include <evmesh/node.hpp>

#include "history/tail.hpp"  // repair_request

namespace evmesh::detail {

class history_store;

// What the history needs of a subscription beyond the public API: its socket (to poll many at
// once), and the raw frame of each event received (stored as is, never decoded or re-encoded).
struct subscription_access {
    static void* socket(subscription& s);
    static std::string_view frame(subscription& s);
    // Takes one queued message without decoding more than the envelope's head (source, time,
    // seq: gaps are still counted): 1 = an event whose frame() is now current, 0 = nothing
    // queued, -1 = a message that was not a matching event (counted by the subscription).
    static int take_raw(subscription& s, std::string_view& topic, std::int64_t& time_ns,
                        std::string_view& source, std::uint64_t& seq);
};

inline constexpr std::string_view history_query_prefix = "_evmesh.history.query.";
inline constexpr std::string_view replay_reply_prefix = "_evmesh.replay.";
inline constexpr std::string_view replay_frame_type = "application/vnd.evmesh.frame";
inline constexpr std::string_view replay_end_type = "application/vnd.evmesh.replay-end";
inline constexpr std::size_t replay_default_page = 1000;
inline constexpr std::size_t replay_max_page = 10000;

struct history_service {
    // Opens every store (a bad directory is an error naming it) and starts the thread.
    static std::unique_ptr<history_service> start(node& n, const std::vector<history_options>& opts,
                                                  std::string& error);
    ~history_service();
    void stop();
    std::vector<history_stats> stats() const;

    // Repair beyond the window (node_impl::set_history_repair): queues a NAK for events that
    // aged out of the I/O thread's window (any thread; never blocks). The answer goes to the
    // sink, set once before the first request: the retransmitted frames and the fill.
    using repair_sink = std::function<void(repair_request, std::vector<std::string> frames, std::uint64_t last_sent,
                                           std::uint64_t first_sent, std::uint64_t lost_to)>;
    void set_repair_sink(repair_sink sink);
    void repair(repair_request r);

    struct impl;
    std::unique_ptr<impl> p;
};

}  // namespace evmesh::detail
