// http_stack_bench: measures the HTTP stack chosen for the node's API and live streams (issue 12:
// Boost.Beast on Boost.Asio, one event loop thread) on the two figures that decide it:
//   1. memory per idle Server-Sent-Events connection, with N connections open (default 10,000);
//   2. fan-out: R events/s to K of them (default 1,000 events/s to 1,000), publish-to-client
//      latency p50/p99, the server's CPU, and, side by side in the same run, the same events
//      fanned out by a ZeroMQ PUB socket to K SUB sockets.
// The server is this process; the clients are a child process (same binary, --client), so the
// server's RSS counts the server only. Loopback only. `--quick` runs a small configuration and
// prints "http_stack_bench: N passed, M failed" (used by ctest; figures come from a full run).
#include <sys/resource.h>
#include <sys/wait.h>
#include <unistd.h>
#include <zmq.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <deque>
#include <fstream>
#include <memory>
#include <string>
#include <thread>
#include <vector>

#include <boost/asio.hpp>
#include <boost/beast/core.hpp>
#include <boost/beast/http.hpp>

namespace asio = boost::asio;
namespace beast = boost::beast;
namespace http = beast::http;
using tcp = asio::ip::tcp;

namespace {

std::int64_t mono_ns() {
    timespec ts{};
    clock_gettime(CLOCK_MONOTONIC, &ts);  // shared by every process of the host
    return static_cast<std::int64_t>(ts.tv_sec) * 1'000'000'000 + ts.tv_nsec;
}

long rss_kib() {
    std::ifstream f("/proc/self/status");
    std::string line;
    while (std::getline(f, line)) {
        if (line.rfind("VmRSS:", 0) == 0) {
            return std::strtol(line.c_str() + 6, nullptr, 10);
        }
    }
    return 0;
}

double cpu_seconds() {
    rusage ru{};
    getrusage(RUSAGE_SELF, &ru);
    return static_cast<double>(ru.ru_utime.tv_sec + ru.ru_stime.tv_sec) +
           static_cast<double>(ru.ru_utime.tv_usec + ru.ru_stime.tv_usec) / 1e6;
}

void raise_fd_limit() {
    rlimit rl{};
    getrlimit(RLIMIT_NOFILE, &rl);
    rl.rlim_cur = rl.rlim_max;
    setrlimit(RLIMIT_NOFILE, &rl);
}

struct config {
    int connections = 10000;
    int fanout = 1000;
    int rate = 1000;
    int seconds = 5;
    std::size_t queue_cap = 1024;  // per connection; beyond it the client is lagging: skipped
};

// ------------------------------------------------------------------ server

struct server;

// One SSE stream: the request is parsed with a body limit, then the response head, then events.
// One write in flight; what waits is bounded (queue_cap) and counted when skipped.
struct session : std::enable_shared_from_this<session> {
    tcp::socket sock;
    beast::flat_buffer buf;
    http::request_parser<http::empty_body> parser;
    std::deque<std::shared_ptr<const std::string>> queue;
    bool writing = false;
    server& srv;

    session(tcp::socket s, server& sv) : sock(std::move(s)), srv(sv) { parser.header_limit(8192); }
    void start();
    void push(const std::shared_ptr<const std::string>& ev);
    void write_next();
};

struct server {
    asio::io_context io{1};
    tcp::acceptor acceptor{io};
    config cfg;
    std::vector<std::shared_ptr<session>> streams;  // in connection order; the first K are hot
    std::atomic<int> open{0};
    std::uint64_t skipped = 0, sent = 0;

    void accept() {
        acceptor.async_accept([this](beast::error_code ec, tcp::socket s) {
            if (!ec) {
                s.set_option(tcp::no_delay(true));
                std::make_shared<session>(std::move(s), *this)->start();
            }
            accept();
        });
    }

    void publish(std::int64_t seq) {
        auto ev = std::make_shared<const std::string>("id: " + std::to_string(seq) + "\ndata: " +
                                                      std::to_string(mono_ns()) + "\n\n");
        const auto hot = std::min<std::size_t>(streams.size(), static_cast<std::size_t>(cfg.fanout));
        for (std::size_t i = 0; i < hot; ++i) {
            streams[i]->push(ev);
        }
    }
};

void session::start() {
    auto self = shared_from_this();
    http::async_read(sock, buf, parser, [self](beast::error_code ec, std::size_t) {
        if (ec) {
            return;
        }
        static const std::string head =
            "HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nCache-Control: no-store\r\n"
            "Connection: close\r\n\r\n";
        self->queue.push_back(std::shared_ptr<const std::string>(&head, [](const std::string*) {}));
        self->srv.streams.push_back(self);
        self->srv.open++;
        self->write_next();
    });
}

void session::push(const std::shared_ptr<const std::string>& ev) {
    if (queue.size() >= srv.cfg.queue_cap) {
        ++srv.skipped;  // a lagging client: the real node sends a gap notice here
        return;
    }
    queue.push_back(ev);
    if (!writing) {
        write_next();
    }
}

void session::write_next() {
    if (queue.empty()) {
        writing = false;
        return;
    }
    writing = true;
    // everything queued goes out in one gathered write
    std::vector<asio::const_buffer> bufs;
    const auto n = std::min<std::size_t>(queue.size(), 64);
    bufs.reserve(n);
    for (std::size_t i = 0; i < n; ++i) {
        bufs.emplace_back(asio::buffer(*queue[i]));
    }
    auto self = shared_from_this();
    asio::async_write(sock, bufs, [self, n](beast::error_code ec, std::size_t) {
        if (ec) {
            self->writing = false;
            self->queue.clear();
            return;
        }
        self->srv.sent += n;
        self->queue.erase(self->queue.begin(), self->queue.begin() + static_cast<std::ptrdiff_t>(n));
        self->write_next();
    });
}

// ------------------------------------------------------------------ client (child process)

struct latencies {
    std::vector<std::int64_t> ns;
    void add(std::int64_t v) { ns.push_back(v); }
    double pct(double p) {
        if (ns.empty()) {
            return 0;
        }
        std::sort(ns.begin(), ns.end());
        return static_cast<double>(ns[std::min(ns.size() - 1, static_cast<std::size_t>(p * static_cast<double>(ns.size())))]) / 1000.0;
    }
};

struct sse_client : std::enable_shared_from_this<sse_client> {
    tcp::socket sock;
    std::string req;
    std::array<char, 4096> rd{};
    std::string pending;
    bool head_seen = false;
    latencies* lat;
    std::atomic<int>* connected;

    sse_client(asio::io_context& io, latencies* l, std::atomic<int>* c) : sock(io), lat(l), connected(c) {}

    void start(const tcp::endpoint& ep) {
        auto self = shared_from_this();
        sock.async_connect(ep, [self](beast::error_code ec) {
            if (ec) {
                std::fprintf(stderr, "client: connect: %s\n", ec.message().c_str());
                return;
            }
            self->req = "GET /v1/stream HTTP/1.1\r\nHost: 127.0.0.1\r\nAccept: text/event-stream\r\n\r\n";
            asio::async_write(self->sock, asio::buffer(self->req), [self](beast::error_code e2, std::size_t) {
                if (!e2) {
                    self->read();
                }
            });
        });
    }

    void read() {
        auto self = shared_from_this();
        sock.async_read_some(asio::buffer(rd), [self](beast::error_code ec, std::size_t n) {
            if (ec) {
                return;
            }
            const auto now = mono_ns();
            self->pending.append(self->rd.data(), n);
            std::size_t pos = 0;
            if (!self->head_seen) {
                const auto h = self->pending.find("\r\n\r\n");
                if (h == std::string::npos) {
                    self->read();
                    return;
                }
                self->head_seen = true;
                if (self->pending.rfind("HTTP/1.1 200", 0) == 0) {
                    (*self->connected)++;
                }
                pos = h + 4;
            }
            for (;;) {
                const auto end = self->pending.find("\n\n", pos);
                if (end == std::string::npos) {
                    break;
                }
                const auto block = std::string_view(self->pending).substr(pos, end - pos);
                if (const auto d = block.find("data: "); d != std::string_view::npos) {
                    self->lat->add(now - std::strtoll(std::string(block.substr(d + 6)).c_str(), nullptr, 10));
                }
                pos = end + 2;
            }
            self->pending.erase(0, pos);
            self->read();
        });
    }
};

int run_client(int port, int zmq_port, const config& cfg) {
    raise_fd_limit();
    asio::io_context io{1};
    latencies sse;
    std::atomic<int> connected{0};
    const tcp::endpoint ep(asio::ip::make_address("127.0.0.1"), static_cast<unsigned short>(port));
    std::vector<std::shared_ptr<sse_client>> clients;
    for (int i = 0; i < cfg.connections; ++i) {
        clients.push_back(std::make_shared<sse_client>(io, &sse, &connected));
    }
    // connect in order, so the server's first `fanout` streams are ours 0..fanout-1
    std::thread t([&] { io.run(); });
    auto guard = asio::make_work_guard(io);
    for (int i = 0; i < cfg.connections; ++i) {
        asio::post(io, [&, i] { clients[static_cast<std::size_t>(i)]->start(ep); });
        if (i < cfg.fanout) {
            while (connected.load() <= i) {
                std::this_thread::sleep_for(std::chrono::microseconds(50));
            }
        }
    }
    // ZeroMQ side by side: `fanout` SUB sockets on the server's PUB
    void* ctx = zmq_ctx_new();
    std::vector<void*> subs;
    const std::string zep = "tcp://127.0.0.1:" + std::to_string(zmq_port);
    for (int i = 0; i < cfg.fanout; ++i) {
        void* s = zmq_socket(ctx, ZMQ_SUB);
        zmq_setsockopt(s, ZMQ_SUBSCRIBE, "", 0);
        zmq_connect(s, zep.c_str());
        subs.push_back(s);
    }
    for (int waited = 0; connected.load() < cfg.connections && waited < 60000; ++waited) {
        std::this_thread::sleep_for(std::chrono::milliseconds(1));
    }
    std::printf("READY\n");
    std::fflush(stdout);
    latencies zl;
    std::vector<zmq_pollitem_t> items;
    for (auto* s : subs) {
        items.push_back({s, 0, ZMQ_POLLIN, 0});
    }
    const auto until = mono_ns() + (2 * static_cast<std::int64_t>(cfg.seconds) + 4) * 1'000'000'000;
    char msg[64];
    while (mono_ns() < until) {
        if (zmq_poll(items.data(), static_cast<int>(items.size()), 100) <= 0) {
            continue;
        }
        const auto now = mono_ns();
        for (auto& it : items) {
            if ((it.revents & ZMQ_POLLIN) != 0) {
                int n = 0;
                while ((n = zmq_recv(it.socket, msg, sizeof(msg) - 1, ZMQ_DONTWAIT)) > 0) {
                    msg[n] = 0;
                    zl.add(now - std::strtoll(msg, nullptr, 10));
                }
            }
        }
    }
    guard.reset();
    io.stop();
    t.join();
    const auto sse_n = sse.ns.size();
    const auto zmq_n = zl.ns.size();
    std::printf("RESULT %d %zu %.1f %.1f %zu %.1f %.1f\n", connected.load(), sse_n, sse.pct(0.5), sse.pct(0.99),
                zmq_n, zl.pct(0.5), zl.pct(0.99));
    std::fflush(stdout);
    for (auto* s : subs) {
        int linger = 0;
        zmq_setsockopt(s, ZMQ_LINGER, &linger, sizeof(linger));
        zmq_close(s);
    }
    zmq_ctx_term(ctx);
    return 0;
}

}  // namespace

int main(int argc, char** argv) {
    config cfg;
    bool quick = false;
    int client_port = 0, client_zmq = 0;
    for (int i = 1; i < argc; ++i) {
        const std::string a = argv[i];
        auto next = [&] { return i + 1 < argc ? std::atoi(argv[++i]) : 0; };
        if (a == "--connections") cfg.connections = next();
        else if (a == "--fanout") cfg.fanout = next();
        else if (a == "--rate") cfg.rate = next();
        else if (a == "--seconds") cfg.seconds = next();
        else if (a == "--quick") quick = true;
        else if (a == "--client") { client_port = next(); client_zmq = next(); }
        else {
            std::fprintf(stderr, "usage: http_stack_bench [--connections N] [--fanout K] [--rate R] [--seconds S] [--quick]\n");
            return 2;
        }
    }
    if (quick) {
        cfg.connections = 500;
        cfg.fanout = 100;
        cfg.rate = 200;
        cfg.seconds = 2;
    }
    cfg.fanout = std::min(cfg.fanout, cfg.connections);
    if (client_port != 0) {
        return run_client(client_port, client_zmq, cfg);
    }
    raise_fd_limit();
    server srv;
    srv.cfg = cfg;
    srv.acceptor.open(tcp::v4());
    srv.acceptor.set_option(tcp::acceptor::reuse_address(true));
    srv.acceptor.bind(tcp::endpoint(asio::ip::make_address("127.0.0.1"), 0));
    srv.acceptor.listen(4096);
    const int port = srv.acceptor.local_endpoint().port();
    void* zctx = zmq_ctx_new();
    void* pub = zmq_socket(zctx, ZMQ_PUB);
    int hwm = 100000;
    zmq_setsockopt(pub, ZMQ_SNDHWM, &hwm, sizeof(hwm));
    zmq_bind(pub, "tcp://127.0.0.1:*");
    char zep[128];
    std::size_t zlen = sizeof(zep);
    zmq_getsockopt(pub, ZMQ_LAST_ENDPOINT, zep, &zlen);
    const int zport = std::atoi(std::strrchr(zep, ':') + 1);

    srv.accept();
    std::thread loop([&] { srv.io.run(); });
    const long rss0 = rss_kib();
    // the client process
    int pipefd[2];
    if (pipe(pipefd) != 0) {
        return 1;
    }
    const pid_t child = fork();
    if (child == 0) {
        dup2(pipefd[1], STDOUT_FILENO);
        close(pipefd[0]);
        std::vector<std::string> args = {argv[0], "--client", std::to_string(port), std::to_string(zport),
                                         "--connections", std::to_string(cfg.connections), "--fanout",
                                         std::to_string(cfg.fanout), "--seconds", std::to_string(cfg.seconds)};
        std::vector<char*> cargs;
        for (auto& s : args) cargs.push_back(s.data());
        cargs.push_back(nullptr);
        execv("/proc/self/exe", cargs.data());
        _exit(127);
    }
    close(pipefd[1]);
    FILE* from_client = fdopen(pipefd[0], "r");
    char line[256];
    bool ready = false;
    while (!ready && std::fgets(line, sizeof(line), from_client) != nullptr) {
        ready = std::strncmp(line, "READY", 5) == 0;
    }
    const auto t_conn = mono_ns();
    while (srv.open.load() < cfg.connections && mono_ns() - t_conn < 60'000'000'000) {
        std::this_thread::sleep_for(std::chrono::milliseconds(10));
    }
    std::this_thread::sleep_for(std::chrono::milliseconds(300));  // ZeroMQ subscriptions settle
    const long rss1 = rss_kib();
    // fan-out: `rate` events/s for `seconds` to the first `fanout` streams, then the same on
    // the PUB socket (one after the other: on a small machine they would compete for the cores)
    const auto period = 1'000'000'000 / std::max(cfg.rate, 1);
    const auto total = static_cast<std::int64_t>(cfg.rate) * cfg.seconds;
    double cpu_share[2] = {0, 0};
    for (int phase = 0; phase < 2; ++phase) {
        const double cpu0 = cpu_seconds();
        const auto t0 = mono_ns();
        for (std::int64_t seq = 0; seq < total; ++seq) {
            const auto due = t0 + seq * period;
            while (mono_ns() < due) {
                std::this_thread::sleep_for(std::chrono::microseconds(50));
            }
            if (phase == 0) {
                asio::post(srv.io, [&srv, seq] { srv.publish(seq); });
            } else {
                const auto z = std::to_string(mono_ns());
                zmq_send(pub, z.data(), z.size(), 0);
            }
        }
        std::this_thread::sleep_for(std::chrono::milliseconds(500));  // the tail drains
        cpu_share[phase] = (cpu_seconds() - cpu0) / (static_cast<double>(mono_ns() - t0) / 1e9);
    }
    std::string result;
    while (std::fgets(line, sizeof(line), from_client) != nullptr) {
        if (std::strncmp(line, "RESULT", 6) == 0) {
            result = line;
        }
    }
    int status = 0;
    waitpid(child, &status, 0);
    srv.io.stop();
    loop.join();
    int conn = 0;
    std::size_t sse_n = 0, zmq_n = 0;
    double s50 = 0, s99 = 0, z50 = 0, z99 = 0;
    std::sscanf(result.c_str(), "RESULT %d %zu %lf %lf %zu %lf %lf", &conn, &sse_n, &s50, &s99, &zmq_n, &z50, &z99);
    const auto expected = static_cast<std::size_t>(total) * static_cast<std::size_t>(cfg.fanout);
    std::printf("Boost.Beast %d.%d.%d on Boost.Asio, one event-loop thread; clients in a child process\n",
                BOOST_VERSION / 100000, BOOST_VERSION / 100 % 1000, BOOST_VERSION % 100);
    std::printf("idle SSE connections:  %d open, server RSS %ld KiB -> %ld KiB: %.1f KiB per connection\n",
                srv.open.load(), rss0, rss1, static_cast<double>(rss1 - rss0) / std::max(1, srv.open.load()));
    std::printf("fan-out: %d events/s x %d s to %d of them: %zu of %zu delivered, %llu skipped (lagging)\n",
                cfg.rate, cfg.seconds, cfg.fanout, sse_n, expected, static_cast<unsigned long long>(srv.skipped));
    std::printf("  SSE  (Beast)   p50 %8.1f us  p99 %8.1f us\n", s50, s99);
    std::printf("  ZeroMQ PUB/SUB p50 %8.1f us  p99 %8.1f us  (%zu of %zu delivered)\n", z50, z99, zmq_n, expected);
    std::printf("  ratio SSE/ZeroMQ: p50 %.2fx, p99 %.2fx\n", z50 > 0 ? s50 / z50 : 0.0, z99 > 0 ? s99 / z99 : 0.0);
    std::printf("  server CPU while fanning out: SSE %.0f %%, ZeroMQ %.0f %% of one core\n", 100.0 * cpu_share[0],
                100.0 * cpu_share[1]);
    int linger = 0;
    zmq_setsockopt(pub, ZMQ_LINGER, &linger, sizeof(linger));
    zmq_close(pub);
    zmq_ctx_term(zctx);
    int failed = 0;
    failed += srv.open.load() == cfg.connections ? 0 : 1;
    failed += sse_n == expected ? 0 : 1;
    failed += WIFEXITED(status) && WEXITSTATUS(status) == 0 ? 0 : 1;
    std::printf("http_stack_bench: %d passed, %d failed\n", 3 - failed, failed);
    return failed == 0 ? 0 : 1;
}
