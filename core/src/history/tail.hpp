// The in-memory tail of a node's history: the events its own publishers sent, per stream
// (source, topic) in seq order, bounded by bytes and age. The repair protocol serves
// retransmissions from it (docs/ARCHITECTURE.md, "Lossless links"); a durable history of the
// node ([[history]]) stores the same records on disk, and a NAK for what aged out of this window
// is answered from there (repair_request, history_service::repair), so there is one mechanism.
//
// The bytes live in one ring (a segment in memory): appending is a memcpy at the head, ageing
// out moves the tail, and nothing the publishers' messages own is retained (holding on to
// libzmq's buffers instead turned the allocator's LIFO reuse into a 64 MiB FIFO and cost 40 % of
// throughput at 64 bytes). I/O thread only.
#pragma once

#include <chrono>
#include <cstdint>
#include <cstring>
#include <deque>
#include <memory>
#include <string>
#include <string_view>
#include <unordered_map>

#include "util/string_hash.hpp"

namespace evmesh::detail {

// A NAK for a range of a stream that aged out of the window, handed from the I/O thread to the
// history service, which answers it from disk when it holds the events (node_impl::post_repair).
struct repair_request {
    std::string requester, source, topic;  // requester: the asking node's id
    std::uint64_t from = 0, to = 0;
    std::int64_t since_ns = 0;             // only events at or after this time (0: all)
};

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
        std::uint64_t pos;     // absolute ring position of the mesh frame
        std::uint32_t len;
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
        std::size_t slots = 0;                // fifo_ slots naming this stream (live or stale)
    };

    explicit history_tail(tail_options o = {}) : opt_(o) {}

    // Appends a locally published event's mesh frame (topic 0x00 body). False when it is not
    // retained (stream table full, or larger than the whole window).
    bool append(std::string_view source, std::string_view topic, std::uint64_t seq,
                std::int64_t time_ns, std::string_view frame, steady::time_point now) {
        if (frame.size() > opt_.max_bytes || frame.size() > UINT32_MAX) {
            ++untracked_;
            return false;
        }
        stream* s = find_or_add(source, topic);
        if (s == nullptr) {
            ++untracked_;
            return false;
        }
        if (seq <= s->last_seq && s->last_seq != 0) {
            // the publisher restarted its numbering (a new publisher with the same source):
            // start the stream afresh
            drop_stream(*s);
        }
        if (!ring_) {
            // not value-initialised: a large block comes zeroed from mmap and its pages are
            // touched only as the ring fills (make_unique would write all 64 MiB at once)
            ring_.reset(new char[opt_.max_bytes]);
        }
        while (head_ + frame.size() - tail_ > opt_.max_bytes) {
            evict_front();
        }
        write(head_, frame);
        s->entries.push_back(entry{seq, time_ns, now, head_, static_cast<std::uint32_t>(frame.size())});
        head_ += frame.size();
        s->last_seq = seq;
        s->last_append = now;
        fifo_.push_back(slot{s, head_ - frame.size()});
        ++s->slots;
        ++events_;
        return true;
    }

    // Drops what is older than max_age, and forgets streams that have been empty and silent
    // for twice that (sources come and go: the table must not fill up for good).
    void trim(steady::time_point now) {
        while (!fifo_.empty()) {
            const auto [s, pos] = fifo_.front();
            if (s->entries.empty() || s->entries.front().pos != pos) {
                pop_slot();  // a dropped stream's slot
                continue;
            }
            if (now - s->entries.front().added <= opt_.max_age) {
                break;
            }
            evict_front();
        }
        if (now - last_prune_ < opt_.max_age) {
            return;
        }
        last_prune_ = now;
        for (auto it = streams_.begin(); it != streams_.end();) {
            auto& st = it->second;
            if (st.entries.empty() && st.slots == 0 && now - st.last_append > 2 * opt_.max_age) {
                if (last_ == &st) {
                    last_ = nullptr;
                }
                it = streams_.erase(it);
            } else {
                ++it;
            }
        }
    }

    // Appends the bytes of `e` (a mesh frame) to `out`.
    void read(const entry& e, std::string& out) const {
        const auto cap = opt_.max_bytes;
        const auto off = static_cast<std::size_t>(e.pos % cap);
        const auto first = std::min<std::size_t>(e.len, cap - off);
        out.append(ring_.get() + off, first);
        out.append(ring_.get(), e.len - first);
    }

    stream* find(std::string_view source, std::string_view topic) {
        auto it = streams_.find(stream_key(key_, source, topic));
        return it == streams_.end() ? nullptr : &it->second;
    }

    template <class Fn>
    void for_each_stream(Fn&& fn) {
        for (auto& [k, s] : streams_) {
            fn(s);
        }
    }

    std::size_t bytes() const { return static_cast<std::size_t>(bytes_live()); }
    std::size_t events() const { return events_; }
    std::size_t streams() const { return streams_.size(); }
    std::uint64_t untracked() const { return untracked_; }

private:
    std::uint64_t bytes_live() const { return head_ - tail_; }

    void write(std::uint64_t pos, std::string_view data) {
        const auto cap = opt_.max_bytes;
        const auto off = static_cast<std::size_t>(pos % cap);
        const auto first = std::min<std::size_t>(data.size(), cap - off);
        std::memcpy(ring_.get() + off, data.data(), first);
        std::memcpy(ring_.get(), data.data() + first, data.size() - first);
    }

    stream* find_or_add(std::string_view source, std::string_view topic) {
        if (last_ != nullptr && last_->topic == topic && last_->source == source) {
            return last_;
        }
        auto it = streams_.find(stream_key(key_, source, topic));
        if (it == streams_.end()) {
            if (streams_.size() >= opt_.max_streams) {
                return nullptr;
            }
            stream s;
            s.source.assign(source);
            s.topic.assign(topic);
            it = streams_.emplace(key_, std::move(s)).first;
        }
        last_ = &it->second;  // node-based map: stable until trim() forgets an idle stream
        return last_;
    }

    // Removes the oldest entry of the window (the ring's tail).
    void evict_front() {
        while (!fifo_.empty()) {
            const auto [s, pos] = fifo_.front();
            pop_slot();
            if (s->entries.empty() || s->entries.front().pos != pos) {
                continue;  // a dropped stream's slot
            }
            auto& e = s->entries.front();
            s->evicted_upto = e.seq;
            s->evicted_time_ns = e.time_ns;
            tail_ = e.pos + e.len;
            --events_;
            s->entries.pop_front();
            return;
        }
        tail_ = head_;  // nothing left
    }

    void pop_slot() {
        --fifo_.front().s->slots;
        fifo_.pop_front();
    }

    void drop_stream(stream& s) {
        events_ -= s.entries.size();
        s.entries.clear();  // its ring bytes and fifo_ slots are skipped when reached
        s.evicted_upto = 0;
        s.evicted_time_ns = 0;
    }

    tail_options opt_;
    std::unique_ptr<char[]> ring_;
    std::uint64_t head_ = 0, tail_ = 0;  // absolute positions; live bytes are [tail_, head_)
    std::unordered_map<std::string, stream, string_hash, std::equal_to<>> streams_;
    struct slot {
        stream* s;
        std::uint64_t pos;  // the entry's position: a slot whose stream no longer starts there is stale
    };
    std::deque<slot> fifo_;  // one slot per entry, oldest first: eviction order
    stream* last_ = nullptr;
    steady::time_point last_prune_{};
    std::string key_;
    std::size_t events_ = 0;
    std::uint64_t untracked_ = 0;
};

}  // namespace evmesh::detail
