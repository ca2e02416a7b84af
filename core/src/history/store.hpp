// The durable history of a node (docs/HISTORY.md): append-only segment files of records, each
// record the event's mesh frame (`topic 00 body`, exactly as the mesh carries it) with its
// event time, a length and a CRC. Positions number the records from 0 for the life of the
// directory; a segment file is named by the position of its first record.
//
//   segment:  "EVH1" u32 0 | record | record | ...
//   record:   u32 len | u32 crc32(time, frame) | i64 time_ns | frame (len bytes)   (little-endian)
//
// Recovery after a crash (SIGKILL, power loss) scans every segment and cuts each at its first
// record that is short or fails its CRC: a torn write loses the records of that write only. The
// index (record offsets per segment, time bounds, the newest record per topic) lives in memory
// and is rebuilt by that scan. Retention removes whole segments, oldest first.
//
// One thread owns a store (the history service's): appends go to a write buffer that flush()
// hands to the kernel in one write, so a process crash loses nothing flushed, and fsync_interval
// bounds what a power loss can take.
#pragma once

#include <chrono>
#include <cstdint>
#include <deque>
#include <functional>
#include <memory>
#include <string>
#include <string_view>
#include <unordered_map>
#include <vector>

#include "util/string_hash.hpp"

namespace evmesh::detail {

struct store_options {
    std::string dir;
    std::uint64_t max_bytes = 1ULL << 30;  ///< on disk, all segments
    std::chrono::seconds max_age{0};       ///< 0 = no age limit (by event time)
    std::uint64_t max_events = 0;          ///< 0 = no count limit
    std::uint64_t segment_bytes = 0;       ///< 0 = max_bytes / 8, within [1 MiB, 64 MiB]
    std::chrono::milliseconds fsync_interval{0};  ///< 0 = never (the page cache survives a crash)
};

struct store_stats {
    std::uint64_t events = 0, bytes = 0, segments = 0;
    std::uint64_t first_pos = 0, next_pos = 0;
    std::int64_t oldest_time_ns = 0, newest_time_ns = 0;
    std::uint64_t appended = 0;          ///< records written since open
    std::uint64_t write_errors = 0;      ///< failed writes (disk full, I/O error)
    std::uint64_t dropped = 0;           ///< records lost to failed writes
    std::uint64_t expired = 0;           ///< records removed by retention
    std::uint64_t truncated_bytes = 0;   ///< torn or corrupt bytes cut at open
    std::uint64_t topics = 0;            ///< topics with a newest record known
    std::string error;                   ///< the last write error while it persists, else empty
    std::string last_failure;            ///< the last write error ever (kept after writes succeed again)
};

struct stored_record {
    std::uint64_t pos;
    std::int64_t time_ns;
    std::string_view frame;  ///< valid during the callback only
};

class history_store {
public:
    ~history_store();
    history_store(const history_store&) = delete;
    history_store& operator=(const history_store&) = delete;

    /// Opens (creating the directory if needed) and recovers. Null with `error` set on failure.
    static std::unique_ptr<history_store> open(const store_options& o, std::string& error);

    /// Buffers one record; written by the next flush() (or at once when the buffer is large).
    /// False when the write behind it failed (counted; see stats().error).
    bool append(std::int64_t time_ns, std::string_view frame);
    /// Writes the buffer. False on a write error: the buffered records are dropped and counted,
    /// the segment is cut back to its last whole record.
    bool flush();
    /// Applies retention (bytes, age against `now_ns`, count) and fsyncs when due.
    void maintain(std::int64_t now_ns);

    /// Calls fn for records from position `from` on (clamped to the first one kept), in order,
    /// until fn returns false or `max` records were visited. Returns the position after the
    /// last visited record. Flushes first.
    std::uint64_t scan(std::uint64_t from, std::size_t max, const std::function<bool(const stored_record&)>& fn);
    /// The first position of a segment that may hold events with time >= t (then scan and filter).
    std::uint64_t seek_time(std::int64_t t) const;
    /// Newest record per topic (positions still kept), in position order.
    std::vector<std::uint64_t> last_per_topic() const;
    /// Reads one record. False when `pos` is no longer (or not yet) kept.
    bool read(std::uint64_t pos, std::string& frame, std::int64_t& time_ns);

    std::uint64_t first_pos() const;
    std::uint64_t next_pos() const { return next_pos_; }
    /// The position the next append() takes (when the writes before it succeed).
    std::uint64_t append_pos() const { return next_pos_ + pending_.size(); }
    store_stats stats() const;
    const store_options& options() const { return opt_; }

private:
    struct segment {
        std::uint64_t base = 0;           // position of its first record
        std::string path;
        int fd = -1;
        std::uint64_t size = 0;           // bytes written (file size)
        std::vector<std::uint32_t> offsets;
        std::int64_t min_time = 0, max_time = 0;
        std::uint64_t count() const { return offsets.size(); }
    };

    explicit history_store(store_options o) : opt_(std::move(o)) {}
    bool recover(std::string& error);
    bool load_segment(segment& s, bool last, std::string& error);
    bool roll(std::string& error);
    void drop_oldest();
    bool read_at(const segment& s, std::size_t idx, std::string& buf, std::int64_t& time_ns);
    void note_error(const std::string& what);

    store_options opt_;
    std::deque<segment> segs_;
    std::uint64_t next_pos_ = 0;
    std::uint64_t bytes_ = 0;    // all segments' sizes
    std::uint64_t events_ = 0;
    std::string wbuf_;                          // records not yet written
    struct pending_record {
        std::uint32_t off;        // in the segment
        std::uint32_t topic_len;  // the frame's topic (read back from wbuf_ at flush)
        std::int64_t time_ns;
    };
    std::vector<pending_record> pending_;       // the records in wbuf_
    std::unordered_map<std::string, std::uint64_t, string_hash, std::equal_to<>> last_by_topic_;
    std::string rbuf_;
    std::chrono::steady_clock::time_point last_sync_{};
    bool dirty_ = false;
    store_stats st_;
};

}  // namespace evmesh::detail
