// Lossless links: the receiving side of NAK repair. Per stream (source, topic) of the repaired
// patterns it delivers in seq order, holds what arrives after a gap, asks the publishing node for
// the missing range (NAK), and after the retries reports what could not be had as a gap with its
// range. The sending side is history_tail (history/tail.hpp) and node_impl::serve_nak.
// I/O thread only; no sockets: the node passes frames in and gets frames out.
#pragma once

#include <chrono>
#include <cstdint>
#include <deque>
#include <functional>
#include <map>
#include <string>
#include <string_view>
#include <unordered_map>
#include <vector>

#include "util/string_hash.hpp"
#include "util/zmsg.hpp"

namespace evmesh::detail {

struct repair_options {
    std::chrono::milliseconds nak_interval{100};  // first NAK after a gap, then between retries
    std::uint32_t nak_retries = 20;               // NAKs per gap before it is reported lost
    std::size_t max_held = 100000;                // events held behind gaps, all streams
    std::size_t max_streams = 65536;
    std::chrono::milliseconds idle_after{600000};  // streams silent this long are forgotten
};

// One gap that could not be repaired (the events aged out of the publisher's window, the
// publisher is gone, or the retries ran out).
struct lost_range {
    std::string source, topic;
    std::uint64_t from = 0, to = 0;
};

class repair_rx {
public:
    using steady = std::chrono::steady_clock;

    struct nak_request {
        std::string source, topic;
        std::uint64_t from = 0, to = 0;
        std::int64_t since_ns = 0;  // only events at or after this time (start of a stream)
    };

    struct sink {
        std::function<void(zmsg)> deliver;               // in order, to local subscribers
        std::function<void(const nak_request&)> nak;     // to the publishing node
        std::function<void(const lost_range&)> lost;     // reported, never silent
        std::function<std::int64_t(std::string_view)> since;  // when we began wanting a topic
        std::function<std::int64_t()> wall_now;               // the wall clock, ns
    };

    repair_rx(repair_options o, sink s) : opt_(o), sink_(std::move(s)) {}

    // An event of a repaired pattern from the mesh (or a retransmission of one).
    void on_event(std::string_view source, std::string_view topic, std::uint64_t seq, zmsg frame,
                  bool retransmitted, steady::time_point now);

    // A stream heartbeat: the publisher's newest seq; detects loss at the tail of a stream.
    void on_heartbeat(std::string_view source, std::string_view topic, std::uint64_t last_seq,
                      steady::time_point now);

    // The publisher's answer to a NAK for [from, to]: it sent [first_sent, to] (first_sent > to:
    // nothing), [from, lost_to] aged out (lost_to < from: none), and the rest is older than the
    // `since` of the request (not wanted).
    void on_fill(std::string_view source, std::string_view topic, std::uint64_t from,
                 std::uint64_t to, std::uint64_t first_sent, std::uint64_t lost_to,
                 steady::time_point now);

    // Timers: retries and give-ups.
    void tick(steady::time_point now);

    // Forget streams whose topic no longer satisfies `wanted` (a local unsubscribe): a later
    // subscription starts afresh instead of repairing what nobody wanted.
    void forget_unless(const std::function<bool(std::string_view topic)>& wanted);

    std::uint64_t naks() const { return naks_; }
    std::uint64_t recovered() const { return recovered_; }
    std::uint64_t lost() const { return lost_; }
    std::uint64_t duplicates() const { return duplicates_; }
    std::uint64_t skipped_before_subscription() const { return skipped_; }
    std::uint64_t restarts() const { return restarts_; }     // streams a publisher renumbered
    std::size_t held() const { return held_total_; }
    std::size_t streams() const { return streams_.size(); }

private:
    struct stream {
        std::string source, topic;
        std::uint64_t next = 0;  // next seq to deliver; 0 = nothing seen yet
        std::map<std::uint64_t, zmsg> held;
        std::uint64_t gap_to = 0;  // the gap being repaired: [next, gap_to]
        std::int64_t since_ns = 0;
        steady::time_point nak_at{};
        std::uint32_t tries = 0;
        std::uint64_t next_at_nak = 0;  // `next` when the last NAK went out (progress check)
        steady::time_point last_active{};
        bool open_gap = false;
    };

    stream* get(std::string_view source, std::string_view topic);
    void start(stream& s, std::uint64_t seq, zmsg frame, steady::time_point now);
    void restart(stream& s, steady::time_point now);
    std::int64_t since_for(const stream& s) const;
    void open(stream& s, std::uint64_t to, std::int64_t since, steady::time_point now);
    void send_nak(stream& s, steady::time_point now);
    void drain(stream& s, steady::time_point now);
    void give_up(stream& s, std::uint64_t upto, steady::time_point now);

    repair_options opt_;
    sink sink_;
    std::unordered_map<std::string, stream, string_hash, std::equal_to<>> streams_;
    stream* last_ = nullptr;  // the previous event's stream (senders repeat): skips the hash
    std::string key_;
    std::size_t held_total_ = 0;
    std::uint64_t naks_ = 0, recovered_ = 0, lost_ = 0, duplicates_ = 0, skipped_ = 0;
    std::uint64_t restarts_ = 0;
    std::int64_t forgotten_at_ns_ = 0;  // wall time the last idle stream was forgotten
};

}  // namespace evmesh::detail
