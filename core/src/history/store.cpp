#include "history/store.hpp"

#include <algorithm>
#include <cerrno>
#include <cstring>
#include <filesystem>

#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>
#include <zlib.h>

namespace evmesh::detail {

namespace {

constexpr char seg_magic[8] = {'E', 'V', 'H', '1', 0, 0, 0, 0};
constexpr std::size_t rec_header = 16;  // len, crc, time
constexpr std::uint32_t max_record = 64U << 20;

void put32(char* p, std::uint32_t v) {
    for (int i = 0; i < 4; ++i) {
        p[i] = static_cast<char>((v >> (8 * i)) & 0xff);
    }
}
void put64(char* p, std::uint64_t v) {
    for (int i = 0; i < 8; ++i) {
        p[i] = static_cast<char>((v >> (8 * i)) & 0xff);
    }
}
std::uint32_t get32(const char* p) {
    std::uint32_t v = 0;
    for (int i = 3; i >= 0; --i) {
        v = (v << 8) | static_cast<unsigned char>(p[i]);
    }
    return v;
}
std::uint64_t get64(const char* p) {
    std::uint64_t v = 0;
    for (int i = 7; i >= 0; --i) {
        v = (v << 8) | static_cast<unsigned char>(p[i]);
    }
    return v;
}

std::uint32_t record_crc(const char* time8, std::string_view frame) {
    uLong c = crc32(0L, Z_NULL, 0);
    c = crc32(c, reinterpret_cast<const Bytef*>(time8), 8);
    c = crc32(c, reinterpret_cast<const Bytef*>(frame.data()), static_cast<uInt>(frame.size()));
    return static_cast<std::uint32_t>(c);
}

std::string_view frame_topic(std::string_view frame) {
    auto z = frame.find('\0');
    return z == std::string_view::npos ? frame : frame.substr(0, z);
}

std::string segment_name(const std::string& dir, std::uint64_t base) {
    char name[32];
    std::snprintf(name, sizeof(name), "%020llu.evh", static_cast<unsigned long long>(base));
    return dir + "/" + name;
}

bool pread_all(int fd, char* buf, std::size_t n, std::uint64_t off) {
    while (n > 0) {
        auto r = ::pread(fd, buf, n, static_cast<off_t>(off));
        if (r < 0 && errno == EINTR) {
            continue;
        }
        if (r <= 0) {
            return false;
        }
        buf += r;
        n -= static_cast<std::size_t>(r);
        off += static_cast<std::uint64_t>(r);
    }
    return true;
}

}  // namespace

history_store::~history_store() {
    flush();
    for (auto& s : segs_) {
        if (s.fd >= 0) {
            ::close(s.fd);
        }
    }
}

std::unique_ptr<history_store> history_store::open(const store_options& o, std::string& error) {
    store_options opt = o;
    if (opt.dir.empty()) {
        error = "dir is required";
        return nullptr;
    }
    if (opt.max_bytes < (1U << 20)) {
        error = "max_bytes must be at least 1 MiB";
        return nullptr;
    }
    if (opt.segment_bytes == 0) {
        opt.segment_bytes = std::clamp<std::uint64_t>(opt.max_bytes / 8, 1U << 20, 64U << 20);
    }
    if (opt.segment_bytes > opt.max_bytes || opt.segment_bytes < 4096) {
        error = "segment_bytes must be within [4096, max_bytes]";
        return nullptr;
    }
    std::error_code ec;
    std::filesystem::create_directories(opt.dir, ec);
    if (ec) {
        error = "cannot create directory '" + opt.dir + "': " + ec.message();
        return nullptr;
    }
    std::unique_ptr<history_store> s(new history_store(std::move(opt)));
    if (!s->recover(error)) {
        return nullptr;
    }
    return s;
}

bool history_store::recover(std::string& error) {
    std::vector<std::uint64_t> bases;
    std::error_code ec;
    for (const auto& de : std::filesystem::directory_iterator(opt_.dir, ec)) {
        const auto name = de.path().filename().string();
        if (name.size() == 24 && name.ends_with(".evh") &&
            std::all_of(name.begin(), name.begin() + 20, [](char c) { return c >= '0' && c <= '9'; })) {
            bases.push_back(std::stoull(name.substr(0, 20)));
        }
    }
    if (ec) {
        error = "cannot read directory '" + opt_.dir + "': " + ec.message();
        return false;
    }
    std::sort(bases.begin(), bases.end());
    for (std::size_t i = 0; i < bases.size(); ++i) {
        segment s;
        s.base = bases[i];
        s.path = segment_name(opt_.dir, s.base);
        if (!segs_.empty() && s.base < segs_.back().base + segs_.back().count()) {
            error = "segment " + s.path + " overlaps the one before it";
            return false;
        }
        if (!load_segment(s, i + 1 == bases.size(), error)) {
            return false;
        }
        bytes_ += s.size;
        events_ += s.count();
        next_pos_ = s.base + s.count();
        segs_.push_back(std::move(s));
    }
    if (segs_.empty()) {
        return roll(error);
    }
    return true;
}

bool history_store::load_segment(segment& s, bool last, std::string& error) {
    s.fd = ::open(s.path.c_str(), (last ? O_RDWR : O_RDONLY) | O_CLOEXEC);
    if (s.fd < 0) {
        error = "cannot open " + s.path + ": " + std::strerror(errno);
        return false;
    }
    struct stat sb {};
    ::fstat(s.fd, &sb);
    const auto file_size = static_cast<std::uint64_t>(sb.st_size);
    char hdr[8];
    if (file_size < sizeof(hdr) || !pread_all(s.fd, hdr, sizeof(hdr), 0) ||
        std::memcmp(hdr, seg_magic, sizeof(hdr)) != 0) {
        // a segment created but never written (crash right after the roll): start it over
        if (file_size >= sizeof(hdr)) {
            error = "" + s.path + " is not an evmesh history segment";
            return false;
        }
        if (::ftruncate(s.fd, 0) != 0 || ::pwrite(s.fd, seg_magic, sizeof(seg_magic), 0) != sizeof(seg_magic)) {
            error = "cannot initialise " + s.path + ": " + std::strerror(errno);
            return false;
        }
        st_.truncated_bytes += file_size;
        s.size = sizeof(seg_magic);
        return true;
    }
    std::uint64_t off = sizeof(hdr);
    std::string buf;
    std::string frame;
    while (off + rec_header <= file_size) {
        char h[rec_header];
        if (!pread_all(s.fd, h, rec_header, off)) {
            break;
        }
        const auto len = get32(h);
        if (len > max_record || off + rec_header + len > file_size) {
            break;
        }
        frame.resize(len);
        if (!pread_all(s.fd, frame.data(), len, off + rec_header)) {
            break;
        }
        if (record_crc(h + 8, frame) != get32(h + 4)) {
            break;
        }
        const auto t = static_cast<std::int64_t>(get64(h + 8));
        if (s.offsets.empty()) {
            s.min_time = s.max_time = t;
        } else {
            s.min_time = std::min(s.min_time, t);
            s.max_time = std::max(s.max_time, t);
        }
        last_by_topic_.insert_or_assign(std::string(frame_topic(frame)), s.base + s.offsets.size());
        s.offsets.push_back(static_cast<std::uint32_t>(off));
        off += rec_header + len;
    }
    if (off < file_size) {
        // a torn or corrupt tail: cut it (only the last segment is written to, but a copy or
        // disk fault can hit any; the positions after the cut are not reused by older segments)
        st_.truncated_bytes += file_size - off;
        int wfd = last ? s.fd : ::open(s.path.c_str(), O_WRONLY | O_CLOEXEC);
        if (wfd < 0 || ::ftruncate(wfd, static_cast<off_t>(off)) != 0) {
            error = "cannot cut the damaged tail of " + s.path + ": " + std::strerror(errno);
            if (wfd >= 0 && wfd != s.fd) {
                ::close(wfd);
            }
            return false;
        }
        if (wfd != s.fd) {
            ::close(wfd);
        }
    }
    s.size = off;
    return true;
}

bool history_store::roll(std::string& error) {
    segment s;
    s.base = next_pos_;
    s.path = segment_name(opt_.dir, s.base);
    s.fd = ::open(s.path.c_str(), O_RDWR | O_CREAT | O_TRUNC | O_CLOEXEC, 0640);
    if (s.fd < 0) {
        error = "cannot create " + s.path + ": " + std::strerror(errno);
        return false;
    }
    if (::write(s.fd, seg_magic, sizeof(seg_magic)) != sizeof(seg_magic)) {
        error = "cannot write " + s.path + ": " + std::strerror(errno);
        ::close(s.fd);
        ::unlink(s.path.c_str());
        return false;
    }
    s.size = sizeof(seg_magic);
    bytes_ += s.size;
    segs_.push_back(std::move(s));
    return true;
}

bool history_store::append(std::int64_t time_ns, std::string_view frame) {
    if (frame.size() > max_record) {
        ++st_.dropped;
        return false;
    }
    auto& active = segs_.back();
    const auto rec = rec_header + frame.size();
    if (active.count() + pending_.size() > 0 && active.size + wbuf_.size() + rec > opt_.segment_bytes) {
        if (!flush()) {
            // the records are gone (counted); roll anyway so that a later write starts clean
        }
        std::string err;
        if (!roll(err)) {
            note_error(err);
            ++st_.dropped;
            return false;
        }
    }
    const auto off = segs_.back().size + wbuf_.size();
    char h[rec_header];
    put32(h, static_cast<std::uint32_t>(frame.size()));
    put64(h + 8, static_cast<std::uint64_t>(time_ns));
    put32(h + 4, record_crc(h + 8, frame));
    wbuf_.append(h, rec_header);
    wbuf_.append(frame);
    pending_.push_back(pending_record{static_cast<std::uint32_t>(off),
                                      static_cast<std::uint32_t>(frame_topic(frame).size()), time_ns});
    if (wbuf_.size() >= (256U << 10)) {
        return flush();
    }
    return true;
}

bool history_store::flush() {
    if (wbuf_.empty()) {
        return true;
    }
    auto& s = segs_.back();
    std::size_t done = 0;
    int err = 0;
    while (done < wbuf_.size()) {
        auto r = ::pwrite(s.fd, wbuf_.data() + done, wbuf_.size() - done, static_cast<off_t>(s.size + done));
        if (r < 0 && errno == EINTR) {
            continue;
        }
        if (r <= 0) {
            err = r < 0 ? errno : ENOSPC;
            break;
        }
        done += static_cast<std::size_t>(r);
    }
    if (err != 0) {
        // cut back to the last whole record: the partial write must not look like a torn tail
        // that recovery would cut anyway, and the next write must start at a record boundary
        if (::ftruncate(s.fd, static_cast<off_t>(s.size)) != 0) {
            // nothing more to do: recovery cuts what fails its CRC
        }
        ++st_.write_errors;
        st_.dropped += pending_.size();
        note_error(std::string("write to ") + s.path + " failed: " + std::strerror(err));
        wbuf_.clear();
        pending_.clear();
        return false;
    }
    // the newest record per topic: one map update per run of records on the same topic
    // (a flush holds up to 256 KiB of records, mostly from few topics)
    std::string_view run_topic;
    std::uint64_t run_pos = 0;
    const auto note_topic = [&] {
        if (run_topic.empty()) {
            return;
        }
        if (auto it = last_by_topic_.find(run_topic); it != last_by_topic_.end()) {
            it->second = run_pos;
        } else if (last_by_topic_.size() < 1000000) {
            last_by_topic_.emplace(std::string(run_topic), run_pos);
        }
    };
    for (const auto& r : pending_) {
        const auto t = r.time_ns;
        if (s.offsets.empty()) {
            s.min_time = s.max_time = t;
        } else {
            s.min_time = std::min(s.min_time, t);
            s.max_time = std::max(s.max_time, t);
        }
        const auto pos = s.base + s.offsets.size();
        const std::string_view topic(wbuf_.data() + (r.off - s.size) + rec_header, r.topic_len);
        if (topic != run_topic) {
            note_topic();
            run_topic = topic;
        }
        run_pos = pos;
        s.offsets.push_back(r.off);
    }
    note_topic();
    s.size += wbuf_.size();
    bytes_ += wbuf_.size();
    events_ += pending_.size();
    st_.appended += pending_.size();
    next_pos_ = s.base + s.offsets.size();
    wbuf_.clear();
    pending_.clear();
    st_.error.clear();
    dirty_ = true;
    return true;
}

void history_store::note_error(const std::string& what) {
    st_.error = what;
    st_.last_failure = what;
}

void history_store::drop_oldest() {
    auto& s = segs_.front();
    ::close(s.fd);
    ::unlink(s.path.c_str());
    bytes_ -= s.size;
    events_ -= s.count();
    st_.expired += s.count();
    segs_.pop_front();
}

void history_store::maintain(std::int64_t now_ns) {
    flush();
    while (segs_.size() > 1 && bytes_ > opt_.max_bytes) {
        drop_oldest();
    }
    if (opt_.max_age.count() > 0) {
        const auto limit = now_ns - std::chrono::duration_cast<std::chrono::nanoseconds>(opt_.max_age).count();
        while (segs_.size() > 1 && segs_.front().max_time < limit) {
            drop_oldest();
        }
        // the active segment ages out too once every record in it is old
        if (segs_.size() == 1 && segs_.front().count() > 0 && segs_.front().max_time < limit) {
            std::string err;
            if (roll(err)) {
                drop_oldest();
            }
        }
    }
    if (opt_.max_events > 0) {
        while (segs_.size() > 1 && events_ - segs_.front().count() >= opt_.max_events) {
            drop_oldest();
        }
    }
    if (opt_.fsync_interval.count() > 0 && dirty_) {
        const auto now = std::chrono::steady_clock::now();
        if (now - last_sync_ >= opt_.fsync_interval) {
            ::fdatasync(segs_.back().fd);
            last_sync_ = now;
            dirty_ = false;
        }
    }
}

std::uint64_t history_store::first_pos() const {
    for (const auto& s : segs_) {
        if (s.count() > 0) {
            return s.base;
        }
    }
    return next_pos_;
}

bool history_store::read_at(const segment& s, std::size_t idx, std::string& buf, std::int64_t& time_ns) {
    const std::uint64_t off = s.offsets[idx];
    const std::uint64_t end = idx + 1 < s.offsets.size() ? s.offsets[idx + 1] : s.size;
    if (end < off + rec_header) {
        return false;
    }
    buf.resize(static_cast<std::size_t>(end - off));
    if (!pread_all(s.fd, buf.data(), buf.size(), off)) {
        return false;
    }
    time_ns = static_cast<std::int64_t>(get64(buf.data() + 8));
    return true;
}

std::uint64_t history_store::scan(std::uint64_t from, std::size_t max,
                                  const std::function<bool(const stored_record&)>& fn) {
    flush();
    from = std::max(from, first_pos());
    std::size_t visited = 0;
    // segments are sorted by base; find the one holding `from`
    auto it = std::upper_bound(segs_.begin(), segs_.end(), from,
                               [](std::uint64_t p, const segment& s) { return p < s.base; });
    if (it != segs_.begin()) {
        --it;
    }
    std::uint64_t pos = from;
    for (; it != segs_.end() && visited < max; ++it) {
        const auto& s = *it;
        if (pos < s.base) {
            pos = s.base;
        }
        // read a run of records with one pread
        std::size_t idx = static_cast<std::size_t>(pos - s.base);
        while (idx < s.offsets.size() && visited < max) {
            std::size_t last = idx;
            std::uint64_t end = s.offsets[idx];
            while (last < s.offsets.size() && last - idx < max - visited) {
                const std::uint64_t next = last + 1 < s.offsets.size() ? s.offsets[last + 1] : s.size;
                if (next - s.offsets[idx] > (1U << 20) && last > idx) {
                    break;
                }
                end = next;
                ++last;
            }
            const std::uint64_t start = s.offsets[idx];
            rbuf_.resize(static_cast<std::size_t>(end - start));
            if (!pread_all(s.fd, rbuf_.data(), rbuf_.size(), start)) {
                return s.base + idx;
            }
            for (std::size_t k = idx; k < last; ++k) {
                const char* p = rbuf_.data() + (s.offsets[k] - start);
                const auto len = get32(p);
                stored_record r{s.base + k, static_cast<std::int64_t>(get64(p + 8)),
                                std::string_view(p + rec_header, len)};
                ++visited;
                if (!fn(r)) {
                    return r.pos + 1;
                }
            }
            idx = last;
        }
        pos = s.base + s.offsets.size();
    }
    return std::max(pos, from);
}

std::uint64_t history_store::seek_time(std::int64_t t) const {
    for (const auto& s : segs_) {
        if (s.count() > 0 && s.max_time >= t) {
            return s.base;
        }
    }
    return next_pos_;
}

std::vector<std::uint64_t> history_store::last_per_topic() const {
    std::vector<std::uint64_t> out;
    const auto first = first_pos();
    out.reserve(last_by_topic_.size());
    for (const auto& [t, p] : last_by_topic_) {
        if (p >= first && p < next_pos_) {
            out.push_back(p);
        }
    }
    std::sort(out.begin(), out.end());
    return out;
}

bool history_store::read(std::uint64_t pos, std::string& frame, std::int64_t& time_ns) {
    flush();
    auto it = std::upper_bound(segs_.begin(), segs_.end(), pos,
                               [](std::uint64_t p, const segment& s) { return p < s.base; });
    if (it == segs_.begin()) {
        return false;
    }
    --it;
    if (pos - it->base >= it->count()) {
        return false;
    }
    if (!read_at(*it, static_cast<std::size_t>(pos - it->base), frame, time_ns)) {
        return false;
    }
    frame.erase(0, rec_header);
    return true;
}

store_stats history_store::stats() const {
    store_stats s = st_;
    s.events = events_ + pending_.size();
    s.bytes = bytes_ + wbuf_.size();
    s.segments = segs_.size();
    s.first_pos = first_pos();
    s.next_pos = next_pos_ + pending_.size();
    bool first = true;
    for (const auto& g : segs_) {
        if (g.count() == 0) {
            continue;
        }
        if (first) {
            s.oldest_time_ns = g.min_time;
            s.newest_time_ns = g.max_time;
            first = false;
        } else {
            s.oldest_time_ns = std::min(s.oldest_time_ns, g.min_time);
            s.newest_time_ns = std::max(s.newest_time_ns, g.max_time);
        }
    }
    s.topics = last_by_topic_.size();
    return s;
}

}  // namespace evmesh::detail
