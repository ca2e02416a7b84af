// publish_bench: HTTP publish (POST /v1/events, docs/API.md) into a real evmesh-node, side by
// side in one run with the same events published by a C++ client through the node's ZeroMQ pub
// endpoint (evmesh::encode_event_body, the wire format of PROTOCOL.md), which is the path the C++
// API gives a process beside a sidecar.
//   - starts evmesh-node (this build's, or --node PATH) on loopback, no mesh, `[api] publish`;
//   - a ZeroMQ SUB on the node's sub endpoint counts every event that came out of the node: a run
//     ends when all N are there (the node's answer is not the finish line, delivery is);
//   - modes, each N events: C++ over ZeroMQ; HTTP structured, one event per request; HTTP binary
//     (ce-* headers), one per request; HTTP batch (application/cloudevents-batch+json, B per
//     request). HTTP clients are C keep-alive connections, one thread each.
// Prints events/s and requests/s per mode and the ratio to the C++ path, the node's CPU, and any
// 503 answers (counted and retried after Retry-After). Loopback only; the node is stopped by PID.
// `--quick` (ctest) runs small and prints "publish_bench: N passed, M failed".
#include <fcntl.h>
#include <signal.h>
#include <sys/wait.h>
#include <unistd.h>
#include <zmq.h>

#include <atomic>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <sstream>
#include <string>
#include <thread>
#include <utility>  // before Asio: Boost 1.74's awaitable.hpp uses std::exchange
#include <vector>

#include <boost/asio.hpp>
#include <boost/beast/core.hpp>
#include <boost/beast/http.hpp>

#include <evmesh/codec.hpp>
#include <evmesh/event.hpp>

#include "bench_node.hpp"

namespace {

namespace asio = boost::asio;
namespace beast = boost::beast;
namespace http = beast::http;
using tcp = asio::ip::tcp;

struct options {
    std::string node_path;
    int events = 50000;
    int connections = 4;
    int batch = 100;
    bool quick = false;
};

using bench::mono_ns;
using bench::node_proc;
using bench::proc_cpu_s;

// Counts events on `topic` arriving at a SUB socket of the node.
class counter {
public:
    counter(void* ctx, const std::string& endpoint) : sub_(zmq_socket(ctx, ZMQ_SUB)) {
        int hwm = 0;
        zmq_setsockopt(sub_, ZMQ_RCVHWM, &hwm, sizeof(hwm));
        zmq_setsockopt(sub_, ZMQ_SUBSCRIBE, "bench.", 6);
        zmq_connect(sub_, endpoint.c_str());
        thread_ = std::thread([this] { run(); });
    }
    ~counter() {
        stop_ = true;
        thread_.join();
        int linger = 0;
        zmq_setsockopt(sub_, ZMQ_LINGER, &linger, sizeof(linger));
        zmq_close(sub_);
    }
    // Waits until `n` events of the current mode arrived (or `timeout_s` without progress).
    std::int64_t wait(long n, double timeout_s) {
        auto last = got_.load();
        auto t = mono_ns();
        while (got_.load() < n) {
            std::this_thread::sleep_for(std::chrono::milliseconds(1));
            if (got_.load() != last) {
                last = got_.load();
                t = mono_ns();
            } else if (static_cast<double>(mono_ns() - t) / 1e9 > timeout_s) {
                break;
            }
        }
        return last_ns_.load();
    }
    long got() const { return got_.load(); }
    void reset() {
        got_ = 0;
        last_ns_ = 0;
    }

private:
    void run() {
        zmq_pollitem_t it{sub_, 0, ZMQ_POLLIN, 0};
        char buf[8192];
        while (!stop_.load()) {
            if (zmq_poll(&it, 1, 50) <= 0) {
                continue;
            }
            int more = 0;
            std::size_t ml = sizeof(more);
            while (zmq_recv(sub_, buf, sizeof(buf), ZMQ_DONTWAIT) >= 0) {
                zmq_getsockopt(sub_, ZMQ_RCVMORE, &more, &ml);
                if (more == 0) {  // the body frame: one event
                    ++got_;
                    last_ns_ = mono_ns();
                }
            }
        }
    }
    void* sub_;
    std::thread thread_;
    std::atomic<bool> stop_{false};
    std::atomic<long> got_{0};
    std::atomic<std::int64_t> last_ns_{0};
};

struct mode_result {
    std::string name;
    long events = 0, delivered = 0, requests = 0, rejected = 0, errors = 0;
    double seconds = 0, cpu = 0;
};

std::string ce_json(const std::string& topic, long i) {
    return R"({"specversion":"1.0","id":")" + evmesh::to_string(evmesh::new_event_id()) +
           R"(","source":"/publish-bench","type":")" + topic +
           R"(","datacontenttype":"application/json","data":{"i":)" + std::to_string(i) + "}}";
}

// One HTTP mode: `conns` keep-alive connections, each sends its share of `events` in requests of
// `per_request` events; `binary` uses ce-* headers (one event per request).
mode_result run_http(const std::string& name, const tcp::endpoint& ep, const node_proc& np, counter& cnt, long events,
                     int conns, int per_request, bool binary) {
    mode_result r;
    r.name = name;
    r.events = events;
    cnt.reset();
    std::atomic<long> requests{0}, rejected{0}, errors{0};
    const std::string topic = "bench." + name;
    const double cpu0 = proc_cpu_s(np.pid);
    const auto t0 = mono_ns();
    std::vector<std::thread> threads;
    for (int c = 0; c < conns; ++c) {
        threads.emplace_back([&, c] {
            asio::io_context io;
            tcp::socket s(io);
            beast::error_code ec;
            s.connect(ep, ec);
            if (ec) {
                ++errors;
                return;
            }
            s.set_option(tcp::no_delay(true), ec);
            beast::flat_buffer buf;
            const long mine = events / conns + (c < events % conns ? 1 : 0);
            long i = 0;
            while (i < mine) {
                const long n = std::min<long>(per_request, mine - i);
                http::request<http::string_body> req{http::verb::post, "/v1/events", 11};
                req.set(http::field::host, "127.0.0.1");
                req.keep_alive(true);
                if (binary) {
                    req.set("ce-specversion", "1.0");
                    req.set("ce-id", evmesh::to_string(evmesh::new_event_id()));
                    req.set("ce-source", "/publish-bench");
                    req.set("ce-type", topic);
                    req.set(http::field::content_type, "application/json");
                    req.body() = "{\"i\":" + std::to_string(i) + "}";
                } else if (per_request == 1) {
                    req.set(http::field::content_type, "application/cloudevents+json");
                    req.body() = ce_json(topic, i);
                } else {
                    req.set(http::field::content_type, "application/cloudevents-batch+json");
                    std::string b = "[";
                    for (long k = 0; k < n; ++k) {
                        b += (k ? "," : "") + ce_json(topic, i + k);
                    }
                    req.body() = b + "]";
                }
                req.prepare_payload();
                http::write(s, req, ec);
                http::response<http::string_body> res;
                if (!ec) {
                    http::read(s, buf, res, ec);
                }
                if (ec) {
                    ++errors;
                    return;
                }
                ++requests;
                if (res.result_int() == 503) {  // the node cannot take it now: wait as told, resend
                    ++rejected;
                    std::this_thread::sleep_for(std::chrono::milliseconds(50));
                    continue;
                }
                if (res.result_int() != 202) {
                    std::fprintf(stderr, "publish_bench: %s: HTTP %d %s\n", name.c_str(), res.result_int(),
                                 res.body().c_str());
                    ++errors;
                    return;
                }
                i += n;
            }
        });
    }
    for (auto& t : threads) {
        t.join();
    }
    const auto last = cnt.wait(events, 10);
    r.seconds = static_cast<double>((last ? last : mono_ns()) - t0) / 1e9;
    r.cpu = (proc_cpu_s(np.pid) - cpu0) / std::max(1e-9, static_cast<double>(mono_ns() - t0) / 1e9);
    r.delivered = cnt.got();
    r.requests = requests.load();
    r.rejected = rejected.load();
    r.errors = errors.load();
    return r;
}

mode_result run_zmq(void* ctx, const node_proc& np, counter& cnt, long events) {
    mode_result r;
    r.name = "C++ over ZeroMQ";
    r.events = events;
    cnt.reset();
    void* pub = zmq_socket(ctx, ZMQ_PUB);
    int hwm = 0;
    zmq_setsockopt(pub, ZMQ_SNDHWM, &hwm, sizeof(hwm));
    zmq_connect(pub, np.pub.c_str());
    std::this_thread::sleep_for(std::chrono::milliseconds(500));  // connected
    const std::vector<evmesh::header> no_headers;
    std::string body;
    const double cpu0 = proc_cpu_s(np.pid);
    const auto t0 = mono_ns();
    for (long i = 0; i < events; ++i) {
        body.clear();
        const std::string data = "{\"i\":" + std::to_string(i) + "}";
        evmesh::encode_event_body(evmesh::new_event_id(), "/publish-bench", evmesh::now_ns(),
                                  static_cast<std::uint64_t>(i + 1), "application/json", no_headers, data, body);
        zmq_send(pub, "bench.zmq", 9, ZMQ_SNDMORE);
        zmq_send(pub, body.data(), body.size(), 0);
        ++r.requests;
    }
    const auto last = cnt.wait(events, 10);
    r.seconds = static_cast<double>((last ? last : mono_ns()) - t0) / 1e9;
    r.cpu = (proc_cpu_s(np.pid) - cpu0) / std::max(1e-9, static_cast<double>(mono_ns() - t0) / 1e9);
    r.delivered = cnt.got();
    int linger = 0;
    zmq_setsockopt(pub, ZMQ_LINGER, &linger, sizeof(linger));
    zmq_close(pub);
    return r;
}

int usage() {
    std::fprintf(stderr, "usage: publish_bench [--node PATH] [--events N] [--connections C] [--batch B] [--quick]\n");
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
        else if (a == "--events") o.events = std::atoi(next().c_str());
        else if (a == "--connections") o.connections = std::atoi(next().c_str());
        else if (a == "--batch") o.batch = std::atoi(next().c_str());
        else if (a == "--quick") o.quick = true;
        else return usage();
    }
    if (o.quick) {
        o.events = 2000;
        o.connections = 2;
        o.batch = 50;
    }
    if (o.events <= 0 || o.connections <= 0 || o.batch <= 0) {
        return usage();
    }
    signal(SIGPIPE, SIG_IGN);
    node_proc np;
    // block: the node holds a publisher back instead of dropping for a slow subscriber, so every
    // mode must deliver all N events (the HTTP path answers 503 rather than drop)
    if (!bench::start_node(o.node_path, "publish-bench", "[api]\npublish = true\nstreams = false\n",
                           {"--slow-subscriber", "block"}, np)) {
        std::fprintf(stderr, "publish_bench: cannot start %s\n", o.node_path.c_str());
        return 1;
    }
    const auto colon = np.http.rfind(':');
    const tcp::endpoint ep(asio::ip::make_address(np.http.substr(0, colon)),
                           static_cast<unsigned short>(std::atoi(np.http.c_str() + colon + 1)));
    void* ctx = zmq_ctx_new();
    std::vector<mode_result> results;
    {
        counter cnt(ctx, np.sub);
        std::this_thread::sleep_for(std::chrono::milliseconds(500));  // the subscription reached the node
        results.push_back(run_zmq(ctx, np, cnt, o.events));
        results.push_back(run_http("structured", ep, np, cnt, o.events, o.connections, 1, false));
        results.push_back(run_http("binary", ep, np, cnt, o.events, o.connections, 1, true));
        results.push_back(run_http("batch", ep, np, cnt, o.events, o.connections, o.batch, false));
    }
    zmq_ctx_term(ctx);
    np.stop();

    std::printf("publish into one evmesh-node, %d events per mode, %d HTTP keep-alive connections, batch %d; "
                "delivered = counted at a ZeroMQ SUB of the node\n",
                o.events, o.connections, o.batch);
    std::printf("  %-34s %11s %12s %12s %8s %6s %9s\n", "mode", "delivered", "events/s", "requests/s", "ratio", "503s",
                "node CPU");
    const double base = results[0].seconds > 0 ? static_cast<double>(results[0].delivered) / results[0].seconds : 0;
    int failed = 0;
    for (const auto& r : results) {
        const double eps = r.seconds > 0 ? static_cast<double>(r.delivered) / r.seconds : 0;
        const double rps = r.seconds > 0 ? static_cast<double>(r.requests) / r.seconds : 0;
        const std::string label =
            r.name == "structured" ? "HTTP structured, 1 per request"
            : r.name == "binary"   ? "HTTP binary (ce-*), 1 per request"
            : r.name == "batch"    ? "HTTP batch, " + std::to_string(o.batch) + " per request"
                                   : r.name;
        std::printf("  %-34s %5ld/%-5ld %12.0f %12.0f %7.2fx %6ld %8.0f%%\n", label.c_str(), r.delivered, r.events, eps,
                    rps, base > 0 ? eps / base : 0.0, r.rejected, 100.0 * r.cpu);
        failed += (r.delivered == r.events && r.errors == 0) ? 0 : 1;
    }
    std::printf("publish_bench: %d passed, %d failed\n", static_cast<int>(results.size()) - failed, failed);
    return failed == 0 ? 0 : 1;
}
