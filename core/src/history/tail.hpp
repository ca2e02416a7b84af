// The in-memory tail of a node's history: the events its own publishers sent, per stream
// (source, topic) in seq order, bounded by bytes and age. The repair protocol serves
// retransmissions from it (docs/ARCHITECTURE.md, "Lossless links"); the durable history of a
// later release appends the same records to disk segments and keeps this as its hot end, so there
// is one mechanism, not two. I/O thread only.
#pragma once

#include <chrono>
#include <cstdint>
#include <deque>
#include <string>
#include <string_view>
#include <unordered_map>

#include "util/string_hash.hpp"
#include "util/zmsg.hpp"

namespace evmesh::detail {

struct tail_options {
    std::size_t max_bytes = 64U << 20;
    std::chrono::milliseconds max_age{30000};
    std::size_t max_streams = 65536;
};

class history_tail {
public:
    using steady = std::chrono::steady_clock;

    struct entry {
        std::uint64_t seq;
        std::int64_t time_ns;  // the event's own time
        steady::time_point added;
        zmsg frame;  // the mesh frame (topic 0x00 body), shared with the socket that sent it
    };

    struct stream {
        std::string source, topic;
        std::deque<entry> entries;
        std::uint64_t last_seq = 0;           // newest seq appended
        std::uint64_t evicted_upto = 0;       // newest seq that aged out (0 = none)
        std::int64_t evicted_time_ns = 0;     // its event time
        steady::time_point last_append{};
        std::uint64_t hb_seq = 0;             // last_seq at the last heartbeat
        steady::time_point hb_at{};
    };

    explicit history_tail(tail_options o = {}) : opt_(o) {}

    // Appends a locally published event. False when the stream table is full (not retained).
    bool append(std::string_view source, std::string_view topic, std::uint64_t seq,
                std::int64_t time_ns, zmsg frame, steady::time_point now) {
        stream* s = find_or_add(source, topic);
        if (s == nullptr) {
            ++untracked_;
            return false;
        }
        if (seq <= s->last_seq && s->last_seq != 0) {
            // the publisher restarted its numbering (a new publisher with the same source):
            // start the stream afresh
            evict_stream(*s);
        }
        bytes_ += frame.size();
        s->entries.push_back(entry{seq, time_ns, now, std::move(frame)});
        s->last_seq = seq;
        s->last_append = now;
        fifo_.push_back(s);
        ++events_;
        while (bytes_ > opt_.max_bytes && !fifo_.empty()) {
            evict_front();
        }
        return true;
    }

    // Drops what is older than max_age.
    void trim(steady::time_point now) {
        while (!fifo_.empty()) {
            stream* s = fifo_.front();
            if (s->entries.empty()) {
                fifo_.pop_front();
                continue;
            }
            if (now - s->entries.front().added <= opt_.max_age) {
                break;
            }
            evict_front();
        }
    }

    stream* find(std::string_view source, std::string_view topic) {
        key_.assign(source);
        key_.push_back('\0');
        key_.append(topic);
        auto it = streams_.find(std::string_view(key_));
        return it == streams_.end() ? nullptr : &it->second;
    }

    template <class Fn>
    void for_each_stream(Fn&& fn) {
        for (auto& [k, s] : streams_) {
            fn(s);
        }
    }

    std::size_t bytes() const { return bytes_; }
    std::size_t events() const { return events_; }
    std::size_t streams() const { return streams_.size(); }
    std::uint64_t evicted() const { return evicted_; }
    std::uint64_t untracked() const { return untracked_; }

private:
    stream* find_or_add(std::string_view source, std::string_view topic) {
        if (last_ != nullptr && last_->topic == topic && last_->source == source) {
            return last_;
        }
        key_.assign(source);
        key_.push_back('\0');
        key_.append(topic);
        auto it = streams_.find(std::string_view(key_));
        if (it == streams_.end()) {
            if (streams_.size() >= opt_.max_streams) {
                return nullptr;
            }
            stream s;
            s.source.assign(source);
            s.topic.assign(topic);
            it = streams_.emplace(key_, std::move(s)).first;
        }
        last_ = &it->second;  // node-based map: stable (streams are never erased)
        return last_;
    }

    void evict_front() {
        stream* s = fifo_.front();
        fifo_.pop_front();
        if (s->entries.empty()) {
            return;  // emptied by a restart of its numbering
        }
        auto& e = s->entries.front();
        s->evicted_upto = e.seq;
        s->evicted_time_ns = e.time_ns;
        bytes_ -= e.frame.size();
        --events_;
        ++evicted_;
        s->entries.pop_front();
    }

    void evict_stream(stream& s) {
        for (auto& e : s.entries) {
            bytes_ -= e.frame.size();
            --events_;
        }
        s.entries.clear();  // its fifo_ slots are skipped when they reach the front
        s.evicted_upto = 0;
        s.evicted_time_ns = 0;
    }

    tail_options opt_;
    std::unordered_map<std::string, stream, string_hash, std::equal_to<>> streams_;
    std::deque<stream*> fifo_;  // one slot per entry, oldest first: eviction order
    stream* last_ = nullptr;
    std::string key_;
    std::size_t bytes_ = 0, events_ = 0;
    std::uint64_t evicted_ = 0, untracked_ = 0;
};

}  // namespace evmesh::detail
