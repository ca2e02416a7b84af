// The "file" channel plugin: appends each event as one line of CloudEvents JSON (JSON Lines),
// with size-based rotation (path -> path.1 -> ... -> path.N). Settings: docs/CHANNELS-BUILTIN.md.
#include "common.hpp"

#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cerrno>
#include <mutex>

namespace evmesh::channels {
namespace {

std::string errno_text(int err) {
    char buf[128];
    // GNU strerror_r returns the message pointer (which may or may not be buf)
    return strerror_r(err, buf, sizeof buf);
}

class file_channel {
public:
    static constexpr const char* plugin_name = "file";
    static constexpr const char* description = "Appends CloudEvents JSON lines to a file, with size-based rotation";

    explicit file_channel(const evmesh_host& host) : log_(host) {
        settings s(plugin_name, host.settings_json);
        path_ = s.required_string("path");
        max_bytes_ = s.integer_or("max_bytes", 67108864, 1, std::numeric_limits<int64_t>::max());
        max_files_ = static_cast<int>(s.integer_or("max_files", 5, 0, 1000));
        fsync_ = s.boolean_or("fsync", false);
        s.finish();
        fd_ = open_file();
        if (fd_ < 0) {
            int err = errno;
            throw config_error("file: cannot open " + path_ + ": " + errno_text(err));
        }
    }

    ~file_channel() {
        if (fd_ >= 0) ::close(fd_);
    }

    file_channel(const file_channel&) = delete;
    file_channel& operator=(const file_channel&) = delete;

    evmesh_status deliver(const evmesh_event& ev, const evmesh_attempt&, evmesh_result& r) {
        std::string line = dump_json(cloudevent_json(ev));
        line += '\n';

        std::lock_guard lock(mutex_);
        if (fd_ < 0 && (fd_ = open_file()) < 0) return error(r, "open", errno);
        struct stat st {};
        if (::fstat(fd_, &st) != 0) return error(r, "fstat", errno);
        if (st.st_nlink == 0) {  // removed or rotated away by someone else: start a new file
            ::close(fd_);
            if ((fd_ = open_file()) < 0) return error(r, "open", errno);
            if (::fstat(fd_, &st) != 0) return error(r, "fstat", errno);
        }
        auto size = static_cast<int64_t>(st.st_size);
        if (size > 0 && size + static_cast<int64_t>(line.size()) > max_bytes_) {
            if (!rotate(r)) return EVMESH_RETRY;
            size = 0;
        }
        size_t done = 0;
        while (done < line.size()) {
            ssize_t n = ::write(fd_, line.data() + done, line.size() - done);
            if (n < 0) {
                if (errno == EINTR) continue;
                int err = errno;
                if (done > 0 && ::ftruncate(fd_, static_cast<off_t>(size)) != 0) {
                    // best effort: the torn line stays; the retry appends a whole one
                }
                return error(r, "write", err);
            }
            done += static_cast<size_t>(n);
        }
        if (fsync_ && ::fdatasync(fd_) != 0) return error(r, "fdatasync", errno);
        return EVMESH_DELIVERED;
    }

private:
    int open_file() const { return ::open(path_.c_str(), O_WRONLY | O_APPEND | O_CREAT | O_CLOEXEC, 0640); }

    evmesh_status error(evmesh_result& r, const char* what, int err) const {
        set_detail(&r, "%s %s: %s", what, path_.c_str(), errno_text(err).c_str());
        return EVMESH_RETRY;
    }

    // Called with mutex_ held. path.(N-1) -> path.N ... path.1 -> path.2, path -> path.1, reopen;
    // with max_files = 0 the file is truncated instead.
    bool rotate(evmesh_result& r) {
        if (max_files_ == 0) {
            if (::ftruncate(fd_, 0) != 0) {
                error(r, "truncate", errno);
                return false;
            }
            return true;
        }
        for (int i = max_files_ - 1; i >= 1; --i) {
            std::string from = path_ + "." + std::to_string(i);
            std::string to = path_ + "." + std::to_string(i + 1);
            if (::rename(from.c_str(), to.c_str()) != 0 && errno != ENOENT) {
                error(r, "rotate", errno);
                return false;
            }
        }
        if (::rename(path_.c_str(), (path_ + ".1").c_str()) != 0 && errno != ENOENT) {
            error(r, "rotate", errno);
            return false;
        }
        ::close(fd_);
        fd_ = open_file();
        if (fd_ < 0) {
            error(r, "open", errno);
            return false;
        }
        return true;
    }

    host_logger log_;
    std::string path_;
    int64_t max_bytes_ = 67108864;
    int max_files_ = 5;
    bool fsync_ = false;

    std::mutex mutex_;
    int fd_ = -1;
};

}  // namespace
}  // namespace evmesh::channels

extern "C" EVMESH_CHANNEL_EXPORT const evmesh_channel_plugin* evmesh_channel_plugin_v1(void) {
    return &evmesh::channels::plugin_glue<evmesh::channels::file_channel>::table;
}
