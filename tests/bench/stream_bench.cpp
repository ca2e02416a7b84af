// stream_bench: the live streams of a real evmesh-node (docs/STREAMS.md) at scale.
//   - starts evmesh-node (this build's, or --node PATH) on loopback with no mesh;
//   - opens N stream connections (default 10,000; half SSE, half WebSocket): the first K
//     (default 1,000) subscribe to `bench.hot`, the others to `bench.cold`, which gets nothing;
//   - measures the node's RSS before and after: memory per connection;
//   - publishes R events/s (default 1,000) for S seconds on `bench.hot` through the node's client
//     pub endpoint, and in the same run a ZeroMQ SUB socket on the node's sub endpoint receives the
//     same events: publish-to-client latency p50/p99 of SSE, WebSocket and ZeroMQ side by side,
//     each event counted, and the node's CPU while it fans out.
// Clients live in this process on one Asio thread; the node is a separate process, so its RSS and
// CPU are its own. Loopback only; the node is stopped by PID. `--quick` (ctest) runs a small
// configuration and prints "stream_bench: N passed, M failed".
#include <signal.h>
#include <fcntl.h>
#include <sys/resource.h>
#include <sys/wait.h>
#include <unistd.h>
#include <zmq.h>

#include <algorithm>
#include <array>
#include <atomic>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <memory>
#include <mutex>
#include <sstream>
#include <string>
#include <thread>
#include <utility>
#include <vector>

#include <boost/asio.hpp>
#include <boost/beast/core.hpp>
#include <boost/beast/websocket.hpp>

#include <evmesh/codec.hpp>
#include <evmesh/event.hpp>

#include "bench_node.hpp"

namespace asio = boost::asio;
namespace beast = boost::beast;
namespace websocket = beast::websocket;
using tcp = asio::ip::tcp;

namespace {

using bench::mono_ns;
using bench::node_proc;
using bench::proc_cpu_s;
using bench::proc_rss_kib;

struct latencies {
    std::mutex m;
    std::vector<std::int64_t> ns;
    void add(std::int64_t v) {
        std::lock_guard lk(m);
        ns.push_back(v);
    }
    std::size_t size() {
        std::lock_guard lk(m);
        return ns.size();
    }
    double pct(double p) {
        std::lock_guard lk(m);
        if (ns.empty()) {
            return 0;
        }
        std::sort(ns.begin(), ns.end());
        const auto i = std::min(ns.size() - 1, static_cast<std::size_t>(p * static_cast<double>(ns.size())));
        return static_cast<double>(ns[i]) / 1000.0;
    }
};

// The payload is a JSON string of 20 digits: the publish time (CLOCK_MONOTONIC ns).
constexpr std::size_t stamp_digits = 20;

std::int64_t stamp_after(std::string_view text, std::string_view marker) {
    const auto at = text.find(marker);
    if (at == std::string_view::npos || at + marker.size() + stamp_digits > text.size()) {
        return -1;
    }
    return std::strtoll(std::string(text.substr(at + marker.size(), stamp_digits)).c_str(), nullptr, 10);
}

struct counters {
    std::atomic<int> connected{0}, failed{0};
};

struct sse_client : std::enable_shared_from_this<sse_client> {
    tcp::socket sock;
    std::string req;
    std::array<char, 8192> rd{};
    std::string pending;
    bool head_seen = false;
    latencies* lat;
    counters* cnt;

    sse_client(asio::io_context& io, latencies* l, counters* c) : sock(io), lat(l), cnt(c) {}

    void start(const tcp::endpoint& ep, const std::string& topic) {
        auto self = shared_from_this();
        req = "GET /v1/stream?topics=" + topic + " HTTP/1.1\r\nHost: 127.0.0.1\r\nAccept: text/event-stream\r\n\r\n";
        sock.async_connect(ep, [self](beast::error_code ec) {
            if (ec) {
                ++self->cnt->failed;
                return;
            }
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
                    return self->read();
                }
                self->head_seen = true;
                if (self->pending.rfind("HTTP/1.1 200", 0) == 0) {
                    ++self->cnt->connected;
                } else {
                    ++self->cnt->failed;
                    return;
                }
                pos = h + 4;
            }
            for (;;) {
                const auto end = self->pending.find("\n\n", pos);
                if (end == std::string::npos) {
                    break;
                }
                const auto block = std::string_view(self->pending).substr(pos, end - pos);
                if (const auto t = stamp_after(block, "\"data\":\""); t > 0) {
                    self->lat->add(now - t);
                }
                pos = end + 2;
            }
            self->pending.erase(0, pos);
            self->read();
        });
    }
};

struct ws_client : std::enable_shared_from_this<ws_client> {
    websocket::stream<beast::tcp_stream> ws;
    beast::flat_buffer buf;
    std::string topic, sub;
    latencies* lat;
    counters* cnt;
    bool subscribed = false;

    ws_client(asio::io_context& io, latencies* l, counters* c) : ws(io), lat(l), cnt(c) {}

    void start(const tcp::endpoint& ep, const std::string& t) {
        topic = t;
        auto self = shared_from_this();
        beast::get_lowest_layer(ws).async_connect(ep, [self](beast::error_code ec) {
            if (ec) {
                ++self->cnt->failed;
                return;
            }
            beast::get_lowest_layer(self->ws).expires_never();
            self->ws.async_handshake("127.0.0.1", "/v1/ws", [self](beast::error_code e2) {
                if (e2) {
                    ++self->cnt->failed;
                    return;
                }
                self->sub = R"({"control":"subscribe","topics":[")" + self->topic + R"("]})";
                self->ws.text(true);
                self->ws.async_write(asio::buffer(self->sub), [self](beast::error_code e3, std::size_t) {
                    if (!e3) {
                        self->read();
                    }
                });
            });
        });
    }

    void read() {
        auto self = shared_from_this();
        ws.async_read(buf, [self](beast::error_code ec, std::size_t) {
            if (ec) {
                return;
            }
            const auto now = mono_ns();
            const auto data = beast::buffers_to_string(self->buf.data());
            self->buf.consume(self->buf.size());
            if (const auto t = stamp_after(data, "\"data\":\""); t > 0) {
                self->lat->add(now - t);
            } else if (!self->subscribed && data.find("\"subscribed\"") != std::string::npos) {
                self->subscribed = true;
                ++self->cnt->connected;
            }
            self->read();
        });
    }
};

struct options {
    std::string node_path;
    int connections = 10000;
    int fanout = 1000;
    int rate = 1000;
    int seconds = 5;
    bool quick = false;
};

bool start_node(const options& o, node_proc& np) {
    return bench::start_node(o.node_path, "stream-bench",
                             "[api]\nstreams = true\nstream_max_connections = " + std::to_string(o.connections + 100) +
                                 "\n",
                             {}, np);
}

int usage() {
    std::fprintf(stderr,
                 "usage: stream_bench [--node PATH] [--connections N] [--fanout K] [--rate R] [--seconds S] [--quick]\n");
    return 2;
}

}  // namespace

int main(int argc, char** argv) {
    options o;
    o.node_path = bench::default_node_path(argv[0]);
    for (int i = 1; i < argc; ++i) {
        const std::string a = argv[i];
        auto next = [&]() -> std::string { return i + 1 < argc ? argv[++i] : ""; };
        if (a == "--node") o.node_path = next();
        else if (a == "--connections") o.connections = std::atoi(next().c_str());
        else if (a == "--fanout") o.fanout = std::atoi(next().c_str());
        else if (a == "--rate") o.rate = std::atoi(next().c_str());
        else if (a == "--seconds") o.seconds = std::atoi(next().c_str());
        else if (a == "--quick") o.quick = true;
        else return usage();
    }
    if (o.quick) {
        o.connections = 400;
        o.fanout = 100;
        o.rate = 200;
        o.seconds = 2;
    }
    o.fanout = std::min(o.fanout, o.connections);
    if (o.connections <= 0 || o.rate <= 0 || o.seconds <= 0) {
        return usage();
    }
    bench::raise_fd_limit();
    signal(SIGPIPE, SIG_IGN);
    node_proc np;
    if (!start_node(o, np)) {
        std::fprintf(stderr, "stream_bench: cannot start %s\n", o.node_path.c_str());
        return 1;
    }
    const auto colon = np.http.rfind(':');
    const tcp::endpoint ep(asio::ip::make_address(np.http.substr(0, colon)),
                           static_cast<unsigned short>(std::atoi(np.http.c_str() + colon + 1)));
    std::this_thread::sleep_for(std::chrono::milliseconds(300));
    const long rss0 = proc_rss_kib(np.pid);

    asio::io_context io{1};
    latencies sse_lat, ws_lat, zmq_lat;
    counters cnt;
    std::vector<std::shared_ptr<sse_client>> sses;
    std::vector<std::shared_ptr<ws_client>> wss;
    auto guard = asio::make_work_guard(io);
    std::thread loop([&] { io.run(); });
    int hot_sse = 0, hot_ws = 0;
    const auto t_open = mono_ns();
    for (int i = 0; i < o.connections; ++i) {
        const bool hot = i < o.fanout;
        const std::string topic = hot ? "bench.hot" : "bench.cold";
        if (i % 2 == 0) {
            auto c = std::make_shared<sse_client>(io, &sse_lat, &cnt);
            sses.push_back(c);
            hot_sse += hot ? 1 : 0;
            asio::post(io, [c, ep, topic] { c->start(ep, topic); });
        } else {
            auto c = std::make_shared<ws_client>(io, &ws_lat, &cnt);
            wss.push_back(c);
            hot_ws += hot ? 1 : 0;
            asio::post(io, [c, ep, topic] { c->start(ep, topic); });
        }
        while (i - cnt.connected.load() - cnt.failed.load() > 200) {  // at most 200 handshakes in flight
            std::this_thread::sleep_for(std::chrono::microseconds(200));
        }
    }
    while (cnt.connected.load() + cnt.failed.load() < o.connections && mono_ns() - t_open < 120'000'000'000) {
        std::this_thread::sleep_for(std::chrono::milliseconds(10));
    }
    const double open_s = static_cast<double>(mono_ns() - t_open) / 1e9;
    std::this_thread::sleep_for(std::chrono::milliseconds(500));
    const long rss1 = proc_rss_kib(np.pid);

    // ZeroMQ side by side: a SUB on the node's sub endpoint, and the publisher on its pub endpoint
    void* zctx = zmq_ctx_new();
    void* zsub = zmq_socket(zctx, ZMQ_SUB);
    zmq_setsockopt(zsub, ZMQ_SUBSCRIBE, "bench.hot", 9);
    zmq_connect(zsub, np.sub.c_str());
    void* zpub = zmq_socket(zctx, ZMQ_PUB);
    int hwm = 0;
    zmq_setsockopt(zpub, ZMQ_SNDHWM, &hwm, sizeof(hwm));
    zmq_connect(zpub, np.pub.c_str());
    std::this_thread::sleep_for(std::chrono::milliseconds(700));  // both connections up
    std::atomic<bool> receiving{true};
    std::thread zrecv([&] {
        zmq_pollitem_t it{zsub, 0, ZMQ_POLLIN, 0};
        char topic[64];
        std::vector<char> body(4096);
        while (receiving.load()) {
            if (zmq_poll(&it, 1, 100) <= 0) {
                continue;
            }
            int more = 0;
            std::size_t ml = sizeof(more);
            while (zmq_recv(zsub, topic, sizeof(topic), ZMQ_DONTWAIT) >= 0) {
                const auto now = mono_ns();
                zmq_getsockopt(zsub, ZMQ_RCVMORE, &more, &ml);
                if (more == 0) {
                    continue;
                }
                const int n = zmq_recv(zsub, body.data(), body.size(), 0);
                if (n > static_cast<int>(stamp_digits) + 1) {
                    // the payload is the body's tail: "<20 digits>"
                    const std::string_view b(body.data(), static_cast<std::size_t>(n));
                    const auto t = std::strtoll(std::string(b.substr(b.size() - stamp_digits - 1, stamp_digits)).c_str(),
                                                nullptr, 10);
                    zmq_lat.add(now - t);
                }
            }
        }
    });

    const auto total = static_cast<std::int64_t>(o.rate) * o.seconds;
    const auto period = 1'000'000'000 / o.rate;
    const double cpu0 = proc_cpu_s(np.pid);
    const auto t0 = mono_ns();
    std::string body;
    const std::vector<evmesh::header> no_headers;
    for (std::int64_t seq = 1; seq <= total; ++seq) {
        const auto due = t0 + (seq - 1) * period;
        while (mono_ns() < due) {
            std::this_thread::sleep_for(std::chrono::microseconds(50));
        }
        char stamp[32];
        std::snprintf(stamp, sizeof(stamp), "\"%020lld\"", static_cast<long long>(mono_ns()));
        body.clear();
        evmesh::encode_event_body(evmesh::new_event_id(), "stream-bench/pub", evmesh::now_ns(),
                                  static_cast<std::uint64_t>(seq), "application/json", no_headers, stamp, body);
        zmq_send(zpub, "bench.hot", 9, ZMQ_SNDMORE);
        zmq_send(zpub, body.data(), body.size(), 0);
    }
    const auto expected_sse = static_cast<std::size_t>(total) * static_cast<std::size_t>(hot_sse);
    const auto expected_ws = static_cast<std::size_t>(total) * static_cast<std::size_t>(hot_ws);
    const auto t_end = mono_ns();
    while ((sse_lat.size() < expected_sse || ws_lat.size() < expected_ws ||
            zmq_lat.size() < static_cast<std::size_t>(total)) &&
           mono_ns() - t_end < 10'000'000'000) {
        std::this_thread::sleep_for(std::chrono::milliseconds(20));
    }
    const double cpu = (proc_cpu_s(np.pid) - cpu0) / (static_cast<double>(mono_ns() - t0) / 1e9);
    const long rss2 = proc_rss_kib(np.pid);
    receiving = false;
    zrecv.join();

    const int conns = cnt.connected.load();
    std::printf("evmesh-node live streams: %d connections (%zu SSE, %zu WebSocket) opened in %.1f s, %d failed\n",
                conns, sses.size(), wss.size(), open_s, cnt.failed.load());
    std::printf("node RSS: %ld KiB idle -> %ld KiB with the connections: %.2f KiB per connection; %ld KiB after the run\n",
                rss0, rss1, static_cast<double>(rss1 - rss0) / std::max(1, conns), rss2);
    std::printf("fan-out: %d events/s x %d s on bench.hot to %d of them (%d SSE, %d WebSocket); node CPU %.0f %% of one core\n",
                o.rate, o.seconds, hot_sse + hot_ws, hot_sse, hot_ws, 100.0 * cpu);
    std::printf("  %-22s %10s %12s %12s\n", "", "delivered", "p50", "p99");
    std::printf("  %-22s %4zu/%-5zu %9.2f ms %9.2f ms\n", "SSE", sse_lat.size(), expected_sse, sse_lat.pct(0.5) / 1000,
                sse_lat.pct(0.99) / 1000);
    std::printf("  %-22s %4zu/%-5zu %9.2f ms %9.2f ms\n", "WebSocket", ws_lat.size(), expected_ws, ws_lat.pct(0.5) / 1000,
                ws_lat.pct(0.99) / 1000);
    std::printf("  %-22s %4zu/%-5lld %9.2f ms %9.2f ms\n", "ZeroMQ SUB (1 socket)", zmq_lat.size(),
                static_cast<long long>(total), zmq_lat.pct(0.5) / 1000, zmq_lat.pct(0.99) / 1000);
    const double z50 = zmq_lat.pct(0.5), z99 = zmq_lat.pct(0.99);
    std::printf("  ratio to ZeroMQ: SSE p50 %.1fx p99 %.1fx; WebSocket p50 %.1fx p99 %.1fx\n",
                z50 > 0 ? sse_lat.pct(0.5) / z50 : 0.0, z99 > 0 ? sse_lat.pct(0.99) / z99 : 0.0,
                z50 > 0 ? ws_lat.pct(0.5) / z50 : 0.0, z99 > 0 ? ws_lat.pct(0.99) / z99 : 0.0);

    int linger = 0;
    zmq_setsockopt(zsub, ZMQ_LINGER, &linger, sizeof(linger));
    zmq_setsockopt(zpub, ZMQ_LINGER, &linger, sizeof(linger));
    zmq_close(zsub);
    zmq_close(zpub);
    zmq_ctx_term(zctx);
    guard.reset();
    io.stop();
    loop.join();

    int failed = 0;
    failed += conns == o.connections ? 0 : 1;
    failed += sse_lat.size() == expected_sse ? 0 : 1;
    failed += ws_lat.size() == expected_ws ? 0 : 1;
    failed += zmq_lat.size() == static_cast<std::size_t>(total) ? 0 : 1;
    std::printf("stream_bench: %d passed, %d failed\n", 4 - failed, failed);
    return failed == 0 ? 0 : 1;
}
