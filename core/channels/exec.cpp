// The "exec" channel plugin: runs a command (argv, no shell) per event with the event on stdin.
// Settings and outcome mapping: docs/CHANNELS-BUILTIN.md.
#include "common.hpp"

#include <fcntl.h>
#include <poll.h>
#include <pthread.h>
#include <signal.h>
#include <spawn.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <chrono>

extern char** environ;

namespace evmesh::channels {
namespace {

using clock_type = std::chrono::steady_clock;

std::string errno_text(int err) {
    char buf[128];
    return strerror_r(err, buf, sizeof buf);  // GNU variant
}

struct fd_guard {
    int fd = -1;
    fd_guard() = default;
    explicit fd_guard(int f) : fd(f) {}
    fd_guard(const fd_guard&) = delete;
    fd_guard& operator=(const fd_guard&) = delete;
    ~fd_guard() { reset(); }
    void reset() noexcept {
        if (fd >= 0) ::close(fd);
        fd = -1;
    }
};

// Writes to a pipe with SIGPIPE blocked in this thread, consuming a SIGPIPE the write raised, so a
// child that exits without reading its stdin cannot kill the node (whatever the node's SIGPIPE
// disposition is).
ssize_t write_no_sigpipe(int fd, const char* data, size_t len) {
    sigset_t pipe_set, old_set;
    sigemptyset(&pipe_set);
    sigaddset(&pipe_set, SIGPIPE);
    sigset_t pending;
    sigemptyset(&pending);
    sigpending(&pending);
    bool was_pending = sigismember(&pending, SIGPIPE) == 1;
    pthread_sigmask(SIG_BLOCK, &pipe_set, &old_set);
    ssize_t n = ::write(fd, data, len);
    int err = errno;
    if (n < 0 && err == EPIPE && !was_pending) {
        struct timespec zero {0, 0};
        while (sigtimedwait(&pipe_set, nullptr, &zero) < 0 && errno == EINTR) {
        }
    }
    pthread_sigmask(SIG_SETMASK, &old_set, nullptr);
    errno = err;
    return n;
}

class exec_channel {
public:
    static constexpr const char* plugin_name = "exec";
    static constexpr const char* description = "Runs a command per event with the event on stdin";

    explicit exec_channel(const evmesh_host& host) : log_(host) {
        settings s(plugin_name, host.settings_json);
        auto cmd = s.string_array("command");
        if (!cmd) s.fail("command", "is required");
        argv_ = *cmd;
        if (argv_[0].empty()) s.fail("command", "must start with a non-empty program name");
        for (const auto& a : argv_)
            if (a.find('\0') != std::string::npos) s.fail("command", "must not contain NUL characters");
        timeout_ms_ = s.duration_ms_or("timeout_ms", 10000);
        retry_codes_ = s.integer_array_or("retry_exit_codes", {75}, 0, 255);
        payload_input_ = s.choice_or("input", "cloudevent", {"cloudevent", "payload"}) == "payload";
        for (auto& [k, v] : s.string_table("env")) {
            if (k.empty() || k.find('=') != std::string::npos || k.find('\0') != std::string::npos)
                s.fail("env." + k, "is not a valid environment variable name");
            if (v.find('\0') != std::string::npos) s.fail("env." + k, "must not contain NUL characters");
            env_.emplace_back(k, v);
        }
        s.finish();
        if (!findable(argv_[0]))
            log_.log(EVMESH_LOG_WARN, "exec %s: command \"%s\" not found or not executable (yet)",
                     log_.instance.c_str(), argv_[0].c_str());
    }

    evmesh_status deliver(const evmesh_event& ev, const evmesh_attempt& at, evmesh_result& r) {
        std::string input;
        if (payload_input_) {
            if (ev.payload && ev.payload_len) input.assign(static_cast<const char*>(ev.payload), ev.payload_len);
        } else {
            input = dump_json(cloudevent_json(ev)) + "\n";
        }

        // environment: the node's, then settings.env, then the EVMESH_* variables
        std::vector<std::pair<std::string, std::string>> extra = env_;
        extra.emplace_back("EVMESH_EVENT_ID", std::string(view(ev.id_text)));
        extra.emplace_back("EVMESH_TOPIC", zero_free(view(ev.topic, ev.topic_len)));
        extra.emplace_back("EVMESH_SOURCE", zero_free(view(ev.source, ev.source_len)));
        extra.emplace_back("EVMESH_ATTEMPT", std::to_string(at.attempt));
        std::vector<std::string> envs;
        for (char** e = environ; e && *e; ++e) {
            std::string_view kv(*e);
            auto name = kv.substr(0, kv.find('='));
            bool overridden = std::any_of(extra.begin(), extra.end(), [name](const auto& p) { return p.first == name; });
            if (!overridden) envs.emplace_back(kv);
        }
        for (const auto& [k, v] : extra) {
            auto dup = std::find_if(envs.begin(), envs.end(), [&k = k](const std::string& s) {
                return s.size() > k.size() && s.compare(0, k.size(), k) == 0 && s[k.size()] == '=';
            });
            if (dup != envs.end()) *dup = k + "=" + v;  // later entries win
            else envs.push_back(k + "=" + v);
        }
        std::vector<char*> envp;
        for (auto& e : envs) envp.push_back(e.data());
        envp.push_back(nullptr);
        std::vector<std::string> args = argv_;
        std::vector<char*> argv;
        for (auto& a : args) argv.push_back(a.data());
        argv.push_back(nullptr);

        int in_pipe[2], err_pipe[2];
        if (::pipe2(in_pipe, O_CLOEXEC) != 0) return sys_error(r, "pipe2", errno);
        fd_guard in_r(in_pipe[0]), in_w(in_pipe[1]);
        if (::pipe2(err_pipe, O_CLOEXEC) != 0) return sys_error(r, "pipe2", errno);
        fd_guard err_r(err_pipe[0]), err_w(err_pipe[1]);

        posix_spawn_file_actions_t fa;
        posix_spawnattr_t attr;
        posix_spawn_file_actions_init(&fa);
        posix_spawnattr_init(&attr);
        posix_spawn_file_actions_adddup2(&fa, in_r.fd, 0);
        posix_spawn_file_actions_addopen(&fa, 1, "/dev/null", O_WRONLY, 0);
        posix_spawn_file_actions_adddup2(&fa, err_w.fd, 2);
#if defined(__GLIBC__) && (__GLIBC__ > 2 || (__GLIBC__ == 2 && __GLIBC_MINOR__ >= 34))
        posix_spawn_file_actions_addclosefrom_np(&fa, 3);  // no descriptor of the node leaks
#endif
        // the child starts with no blocked signals and default dispositions (the node may
        // ignore SIGPIPE, and ignored dispositions survive exec)
        sigset_t empty, all;
        sigemptyset(&empty);
        sigfillset(&all);
        posix_spawnattr_setsigmask(&attr, &empty);
        posix_spawnattr_setsigdefault(&attr, &all);
        posix_spawnattr_setflags(&attr, POSIX_SPAWN_SETSIGMASK | POSIX_SPAWN_SETSIGDEF);

        pid_t pid = -1;
        int rc = ::posix_spawnp(&pid, argv[0], &fa, &attr, argv.data(), envp.data());
        posix_spawn_file_actions_destroy(&fa);
        posix_spawnattr_destroy(&attr);
        if (rc != 0) {
            if (rc == ENOENT || rc == EACCES || rc == ENOEXEC || rc == ENOTDIR) {
                r.code = rc == ENOENT ? 127 : 126;
                set_detail(&r, "cannot run %s: %s", argv_[0].c_str(), errno_text(rc).c_str());
                return EVMESH_FAIL;
            }
            return sys_error(r, "posix_spawnp", rc);
        }
        in_r.reset();
        err_w.reset();
        return supervise(pid, input, in_w, err_r, r);
    }

private:
    static std::string zero_free(std::string_view s) {
        std::string out(s);
        out.erase(std::remove(out.begin(), out.end(), '\0'), out.end());
        return out;
    }

    static bool findable(const std::string& prog) {
        if (prog.find('/') != std::string::npos) return ::access(prog.c_str(), X_OK) == 0;
        const char* path = std::getenv("PATH");
        std::string_view p = path ? path : "/usr/local/bin:/bin:/usr/bin";
        while (true) {
            auto colon = p.find(':');
            std::string dir(p.substr(0, colon));
            if (dir.empty()) dir = ".";
            if (::access((dir + "/" + prog).c_str(), X_OK) == 0) return true;
            if (colon == std::string_view::npos) return false;
            p.remove_prefix(colon + 1);
        }
    }

    evmesh_status sys_error(evmesh_result& r, const char* what, int err) const {
        set_detail(&r, "%s: %s", what, errno_text(err).c_str());
        return EVMESH_RETRY;
    }

    // Feeds stdin, collects stderr, waits for the child until the deadline; kills it after.
    evmesh_status supervise(pid_t pid, const std::string& input, fd_guard& in_w, fd_guard& err_r,
                            evmesh_result& r) {
        auto deadline = clock_type::now() + std::chrono::milliseconds(timeout_ms_);
        fd_guard pidfd(static_cast<int>(::syscall(SYS_pidfd_open, pid, 0)));  // -1 on old kernels: poll in ticks
        ::fcntl(in_w.fd, F_SETFL, ::fcntl(in_w.fd, F_GETFL) | O_NONBLOCK);
        ::fcntl(err_r.fd, F_SETFL, ::fcntl(err_r.fd, F_GETFL) | O_NONBLOCK);
        if (input.empty()) in_w.reset();

        std::string err_head;
        size_t written = 0;
        int status = 0;
        bool exited = false;
        auto drain_stderr = [&]() -> bool {  // false at EOF
            char buf[4096];
            while (true) {
                ssize_t n = ::read(err_r.fd, buf, sizeof buf);
                if (n > 0) {
                    if (err_head.size() < 200)
                        err_head.append(buf, std::min(static_cast<size_t>(n), 200 - err_head.size()));
                    continue;
                }
                if (n < 0 && errno == EINTR) continue;
                return n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK);
            }
        };

        while (!exited) {
            pid_t w = ::waitpid(pid, &status, WNOHANG);
            if (w == pid) {
                exited = true;
                break;
            }
            if (w < 0 && errno != EINTR) {  // ECHILD: someone else reaped it (SIGCHLD ignored?)
                set_detail(&r, "lost the child process: %s", errno_text(errno).c_str());
                return EVMESH_RETRY;
            }
            auto now = clock_type::now();
            if (now >= deadline) break;
            auto left = std::chrono::duration_cast<std::chrono::milliseconds>(deadline - now).count() + 1;
            pollfd fds[3];
            nfds_t nfds = 0;
            int i_in = -1, i_err = -1;
            if (in_w.fd >= 0) {
                i_in = static_cast<int>(nfds);
                fds[nfds++] = {in_w.fd, POLLOUT, 0};
            }
            if (err_r.fd >= 0) {
                i_err = static_cast<int>(nfds);
                fds[nfds++] = {err_r.fd, POLLIN, 0};
            }
            if (pidfd.fd >= 0) fds[nfds++] = {pidfd.fd, POLLIN, 0};
            int wait_ms = static_cast<int>(std::min<int64_t>(left, pidfd.fd >= 0 ? 60000 : 20));
            int pr = ::poll(fds, nfds, wait_ms);
            if (pr < 0) {
                if (errno == EINTR) continue;
                break;  // treat like a timeout: kill and reap below
            }
            if (i_in >= 0 && fds[i_in].revents) {
                ssize_t n = write_no_sigpipe(in_w.fd, input.data() + written, input.size() - written);
                if (n > 0) written += static_cast<size_t>(n);
                if ((n < 0 && errno != EAGAIN && errno != EWOULDBLOCK && errno != EINTR) ||
                    written == input.size())
                    in_w.reset();  // done, or the child closed its stdin (EPIPE): fine either way
            }
            if (i_err >= 0 && fds[i_err].revents && !drain_stderr()) err_r.reset();
        }

        int timeout_ms = static_cast<int>(timeout_ms_);
        if (!exited) {
            ::kill(pid, SIGKILL);
            while (::waitpid(pid, &status, 0) < 0 && errno == EINTR) {
            }
            r.code = 128 + SIGKILL;
            set_detail(&r, "timed out after %d ms", timeout_ms);
            return EVMESH_RETRY;
        }
        if (err_r.fd >= 0) drain_stderr();  // what the child left in the pipe (don't wait for EOF)
        std::string err_text = printable(trim(err_head), 200);
        const char* sep = err_text.empty() ? "" : ": ";

        if (WIFSIGNALED(status)) {
            int sig = WTERMSIG(status);
            r.code = 128 + sig;
            set_detail(&r, "killed by signal %d%s%s", sig, sep, err_text.c_str());
            return EVMESH_RETRY;
        }
        int code = WIFEXITED(status) ? WEXITSTATUS(status) : 255;
        r.code = code;
        if (code == 0) return EVMESH_DELIVERED;
        set_detail(&r, "exit status %d%s%s", code, sep, err_text.c_str());
        if (std::find(retry_codes_.begin(), retry_codes_.end(), code) != retry_codes_.end()) return EVMESH_RETRY;
        return EVMESH_FAIL;
    }

    host_logger log_;
    std::vector<std::string> argv_;
    int64_t timeout_ms_ = 10000;
    std::vector<int64_t> retry_codes_;
    bool payload_input_ = false;
    std::vector<std::pair<std::string, std::string>> env_;
};

}  // namespace
}  // namespace evmesh::channels

extern "C" EVMESH_CHANNEL_EXPORT const evmesh_channel_plugin* evmesh_channel_plugin_v1(void) {
    return &evmesh::channels::plugin_glue<evmesh::channels::exec_channel>::table;
}
