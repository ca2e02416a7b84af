/// @file pull.hpp
/// Pull consumers in C++: a member of a queue group that fetches messages from a durable
/// consumer of a history (node_options::history, on any node of the mesh) and acknowledges them.
/// It speaks the protocol of PROTOCOL.md section 13 over the node it is given, exactly as a
/// sidecar client in another language does (examples/python/pull.py); docs/HISTORY.md has the
/// semantics (at-least-once, ack wait, redelivery, dead letters).
///
///     auto c = evmesh::pull_consumer::create(node, {.history = "orders", .consumer = "billing"});
///     while (running) {
///         auto batch = c->fetch(100, std::chrono::seconds(5));
///         for (auto& m : batch->messages) { handle(m.ev); }
///         c->ack(batch->messages);
///     }
///
/// Thread-safety: one pull_consumer is used from one thread at a time (fetch and ack from the
/// same thread, or guarded). Several pull_consumer objects, in one process or many, on the same
/// history and consumer name form a queue group.
#pragma once

#include <evmesh/export.hpp>

#include <chrono>
#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include <evmesh/node.hpp>

namespace evmesh {

namespace detail {
struct pull_impl;
}

struct pull_options {
    std::string history{};   ///< the history's name (required)
    std::string consumer{};  ///< the durable consumer's name, 1-64 of [A-Za-z0-9_-] (required)
    /// Read by the fetch that creates the consumer (later ignored: it keeps its settings).
    std::string filter = ">";                     ///< topic pattern within the history
    std::chrono::milliseconds ack_wait{30000};    ///< then an unacknowledged message goes again
    std::uint32_t max_deliver = 5;                ///< deliveries before dead letter (0 = no limit)
    std::string dead_letter{};                    ///< topic for dead letters (empty: counted, dropped)
    bool start_new = false;                       ///< from the history's head instead of its oldest event
    /// How long to wait for a fetch's answer beyond its own wait (the answer crosses the mesh).
    std::chrono::milliseconds answer_margin{2000};
    /// create() waits this long for the member's reply subscription to reach the other nodes
    /// (a subscription travels one link's latency; an answer sent before it arrived is lost and
    /// its messages come back after the ack wait).
    std::chrono::milliseconds settle{300};
};

/// One message of a fetch.
struct pulled_message {
    event ev;                      ///< the stored event, as published
    std::uint64_t pos = 0;         ///< its position in the history: what acks name
    std::uint32_t deliveries = 0;  ///< 1 on the first delivery; more after a nak or an expired ack wait
    std::string node;              ///< id of the node holding the history (acks go there)
};

struct fetch_result {
    std::vector<pulled_message> messages;
    bool answered = false;  ///< the history's end event came (false: no history answered in time)
    std::uint64_t pending = 0, lag = 0, ack_floor = 0;  ///< the consumer's state after this fetch
};

class EVMESH_API pull_consumer {
public:
    pull_consumer(pull_consumer&&) noexcept;
    pull_consumer& operator=(pull_consumer&&) noexcept;
    ~pull_consumer();

    /// Errors: bad_option (history or consumer name missing or malformed, filter not a pattern,
    /// ack_wait under 100 ms), stopped. Takes `settle`.
    [[nodiscard]] static result<pull_consumer> create(node& n, pull_options options);

    /// Up to `batch` (1-10000) messages; when there are none, waits up to `wait` (at most 60 s)
    /// for some. An empty result with `answered == false` means no history answered: retry.
    [[nodiscard]] result<fetch_result> fetch(std::size_t batch, std::chrono::milliseconds wait);

    /// Done with these: they are not delivered again. Not answered (fire and forget, as in the
    /// protocol); an ack that is lost lets the message come back after the ack wait.
    result<void> ack(const std::vector<pulled_message>& messages);
    result<void> ack(const pulled_message& m);
    /// Deliver again now (to any member).
    result<void> nak(const pulled_message& m);
    /// Still working on it: its ack wait starts again.
    result<void> in_progress(const pulled_message& m);

private:
    explicit pull_consumer(std::unique_ptr<detail::pull_impl> impl);
    std::unique_ptr<detail::pull_impl> impl_;
};

}  // namespace evmesh
