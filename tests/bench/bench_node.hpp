// What the benchmarks that drive a real evmesh-node share: starting it on loopback from a config
// text (its READY line gives the endpoints), stopping it by PID, and reading its RSS and CPU time
// from /proc. Header-only; each benchmark is one program.
#pragma once

#include <fcntl.h>
#include <signal.h>
#include <sys/resource.h>
#include <sys/wait.h>
#include <unistd.h>

#include <chrono>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <ctime>
#include <fstream>
#include <initializer_list>
#include <iterator>
#include <sstream>
#include <string>
#include <thread>
#include <vector>

namespace bench {

inline std::int64_t mono_ns() {
    timespec ts{};
    clock_gettime(CLOCK_MONOTONIC, &ts);  // the same clock in every process of the host
    return static_cast<std::int64_t>(ts.tv_sec) * 1'000'000'000 + ts.tv_nsec;
}

inline long proc_rss_kib(pid_t pid) {
    std::ifstream f("/proc/" + std::to_string(pid) + "/status");
    std::string line;
    while (std::getline(f, line)) {
        if (line.rfind("VmRSS:", 0) == 0) {
            return std::strtol(line.c_str() + 6, nullptr, 10);
        }
    }
    return 0;
}

// User + system CPU seconds of a process so far.
inline double proc_cpu_s(pid_t pid) {
    std::ifstream f("/proc/" + std::to_string(pid) + "/stat");
    std::string all((std::istreambuf_iterator<char>(f)), std::istreambuf_iterator<char>());
    const auto close = all.rfind(')');
    if (close == std::string::npos) {
        return 0;
    }
    std::istringstream in(all.substr(close + 2));
    std::string field;
    double ticks = 0;
    for (int i = 3; i <= 15 && in >> field; ++i) {
        if (i == 14 || i == 15) {
            ticks += std::strtod(field.c_str(), nullptr);  // utime, stime
        }
    }
    return ticks / static_cast<double>(sysconf(_SC_CLK_TCK));
}

inline void raise_fd_limit() {
    rlimit rl{};
    getrlimit(RLIMIT_NOFILE, &rl);
    rl.rlim_cur = rl.rlim_max;
    setrlimit(RLIMIT_NOFILE, &rl);
}

// build/tests/<bench> -> build/nodes/evmesh-node
inline std::string default_node_path(const char* argv0) {
    char buf[4096];
    const auto n = readlink("/proc/self/exe", buf, sizeof(buf) - 1);
    std::string self = n > 0 ? std::string(buf, static_cast<std::size_t>(n)) : std::string(argv0);
    const auto dir = self.substr(0, self.rfind('/'));
    return dir + "/../nodes/evmesh-node";
}

// A string field of the READY line, or the first element of an array field ("pub": ["tcp://..."]).
inline std::string json_str(const std::string& line, const std::string& key) {
    const auto k = line.find("\"" + key + "\":");
    if (k == std::string::npos) {
        return {};
    }
    const auto p = line.find('"', k + key.size() + 3);
    const auto e = p == std::string::npos ? p : line.find('"', p + 1);
    return e == std::string::npos ? std::string() : line.substr(p + 1, e - p - 1);
}

// A node this process started; stopped (SIGTERM, then SIGKILL after 5 s) when it goes.
struct node_proc {
    pid_t pid = -1;
    std::string http, pub, sub;
    std::string cfg_path;

    node_proc() = default;
    node_proc(const node_proc&) = delete;
    node_proc& operator=(const node_proc&) = delete;
    ~node_proc() { stop(); }

    void stop() {
        if (pid > 0) {
            kill(pid, SIGTERM);
            int st = 0;
            for (int i = 0; i < 100 && waitpid(pid, &st, WNOHANG) == 0; ++i) {
                std::this_thread::sleep_for(std::chrono::milliseconds(50));
            }
            if (waitpid(pid, &st, WNOHANG) == 0) {
                kill(pid, SIGKILL);
                waitpid(pid, &st, 0);
            }
            pid = -1;
        }
        if (!cfg_path.empty()) {
            unlink(cfg_path.c_str());
            cfg_path.clear();
        }
    }
};

// Starts `node_path` with no mesh, its HTTP listener and client endpoints on loopback ports the
// kernel picks, the config `cfg` and `extra` arguments; true once it printed READY with them.
inline bool start_node(const std::string& node_path, const std::string& name, const std::string& cfg,
                       const std::vector<std::string>& extra, node_proc& np) {
    char tmpl[] = "/tmp/evmesh-bench-XXXXXX";
    const int fd = mkstemp(tmpl);
    if (fd < 0) {
        return false;
    }
    np.cfg_path = tmpl;
    if (write(fd, cfg.data(), cfg.size()) != static_cast<ssize_t>(cfg.size())) {
        close(fd);
        return false;
    }
    close(fd);
    std::vector<std::string> args = {node_path,       "--name",         name,           "--no-mesh",
                                     "--config",      np.cfg_path,      "--http",       "127.0.0.1:0",
                                     "--pub-endpoint", "tcp://127.0.0.1:*", "--sub-endpoint", "tcp://127.0.0.1:*",
                                     "--log-level",   "warn"};
    args.insert(args.end(), extra.begin(), extra.end());
    int out[2];
    if (pipe(out) != 0) {
        return false;
    }
    np.pid = fork();
    if (np.pid == 0) {
        dup2(out[1], STDOUT_FILENO);
        close(out[0]);
        const int devnull = ::open("/dev/null", O_WRONLY);
        dup2(devnull, STDERR_FILENO);
        std::vector<char*> argv;
        for (auto& a : args) {
            argv.push_back(a.data());
        }
        argv.push_back(nullptr);
        execv(node_path.c_str(), argv.data());
        _exit(127);
    }
    close(out[1]);
    FILE* f = fdopen(out[0], "r");
    char line[4096];
    while (std::fgets(line, sizeof(line), f) != nullptr) {
        const std::string l(line);
        if (l.rfind("READY ", 0) == 0) {
            np.http = json_str(l, "http");
            np.pub = json_str(l, "pub");
            np.sub = json_str(l, "sub");
            // keep the pipe open in a thread that drains it: the node may log to stdout
            std::thread([f] {
                char sink[4096];
                while (std::fgets(sink, sizeof(sink), f) != nullptr) {
                }
                std::fclose(f);
            }).detach();
            return !np.http.empty() && !np.pub.empty() && !np.sub.empty();
        }
    }
    std::fclose(f);
    return false;
}

}  // namespace bench
