// evmesh benchmark: raw libzmq and evmesh side by side in one run, reported as ratios.
//
//   evmesh_bench [--count N] [--reps R] [--quick]
//
// Every pair is lossless by construction (raw: XPUB with ZMQ_XPUB_NODROP into a zmq_proxy whose
// XPUB is NODROP too; evmesh: publisher policy block, node slow_subscriber=block), so events/s
// compare the same work: the receiver counts every event and the run fails if any is missing.
#include <zmq.h>

#include <algorithm>
#include <array>
#include <atomic>
#include <chrono>
#include <cstdio>
#include <cstring>
#include <fcntl.h>
#include <filesystem>
#include <functional>
#include <string>
#include <thread>
#include <vector>

#include <spdlog/spdlog.h>

#include <netinet/in.h>
#include <signal.h>
#include <spawn.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <unistd.h>

#ifdef EVMESH_BENCH_NATS
#include <nats/nats.h>
#endif

extern char** environ;

#include <evmesh/codec.hpp>
#include <evmesh/node.hpp>
#include <evmesh/replay.hpp>

namespace {

using clk = std::chrono::steady_clock;
using namespace std::chrono_literals;

int g_count = 500000;
int g_reps = 3;
int g_hwm = 10000;

void set_int(void* s, int opt, int v) {
    zmq_setsockopt(s, opt, &v, sizeof(v));
}

void* make_pub(void* ctx, const char* ep) {
    void* s = zmq_socket(ctx, ZMQ_XPUB);
    set_int(s, ZMQ_XPUB_NODROP, 1);
    set_int(s, ZMQ_SNDHWM, g_hwm);
    zmq_connect(s, ep);
    return s;
}

void* make_sub(void* ctx, const char* ep, const char* prefix) {
    void* s = zmq_socket(ctx, ZMQ_SUB);
    set_int(s, ZMQ_RCVHWM, g_hwm);
    zmq_setsockopt(s, ZMQ_SUBSCRIBE, prefix, std::strlen(prefix));
    zmq_connect(s, ep);
    return s;
}

// A zmq_proxy (XSUB frontend bound at `in`, XPUB backend bound at `out`) on its own thread;
// `upstream` optionally connects the frontend elsewhere (chained hops).
struct raw_proxy {
    void* ctx;
    void* front;
    void* back;
    void* control;
    std::string ctl_ep;
    std::thread t;

    raw_proxy(void* c, const std::string& in, const std::string& out, const std::string& name)
        : ctx(c), ctl_ep("inproc://ctl-" + name) {
        front = zmq_socket(ctx, ZMQ_XSUB);
        back = zmq_socket(ctx, ZMQ_XPUB);
        set_int(back, ZMQ_XPUB_NODROP, 1);
        set_int(back, ZMQ_SNDHWM, g_hwm);
        set_int(front, ZMQ_RCVHWM, g_hwm);
        if (in.find("tcp://") == 0 && in.find(":0") != std::string::npos) {
        }
        zmq_bind(front, in.c_str());
        zmq_bind(back, out.c_str());
        control = zmq_socket(ctx, ZMQ_PAIR);
        zmq_bind(control, ctl_ep.c_str());
        t = std::thread([this] {
            void* ctl = zmq_socket(ctx, ZMQ_PAIR);
            zmq_connect(ctl, ctl_ep.c_str());
            zmq_proxy_steerable(front, back, nullptr, ctl);
            zmq_close(ctl);
        });
    }

    ~raw_proxy() {
        zmq_send(control, "TERMINATE", 9, 0);
        t.join();
        set_int(front, ZMQ_LINGER, 0);
        set_int(back, ZMQ_LINGER, 0);
        zmq_close(front);
        zmq_close(back);
        zmq_close(control);
    }
};

// Publishes warm-up messages until the subscriber sees one, then returns.
template <class Pub, class Recv>
void warm(Pub&& pub_once, Recv&& try_recv) {
    const auto deadline = clk::now() + 10s;
    while (clk::now() < deadline) {
        pub_once();
        if (try_recv(5)) {
            while (try_recv(50)) {
            }
            return;
        }
    }
    std::fprintf(stderr, "warm-up failed\n");
    std::exit(2);
}

// Blocking receive bounded by the socket's RCVTIMEO (no poll syscall per message).
bool recv_two(void* s, zmq_msg_t& a, zmq_msg_t& b, int timeout_ms) {
    set_int(s, ZMQ_RCVTIMEO, timeout_ms);  // an option store, no syscall
    if (zmq_msg_recv(&a, s, 0) < 0) {
        return false;
    }
    zmq_msg_recv(&b, s, 0);
    return true;
}

struct result_row {
    double eps = 0;  // events per second
    int lost = 0;
};

// Raw: XPUB(NODROP) -> [hops x zmq_proxy] -> SUB, payload `size` bytes, topic "bench.data".
result_row raw_run(const std::string& transport, int hops, std::size_t size) {
    void* ctx = zmq_ctx_new();
    static int run_id = 0;
    ++run_id;
    std::vector<std::unique_ptr<raw_proxy>> proxies;
    std::vector<std::string> ins, outs;
    for (int h = 0; h < hops; ++h) {
        const std::string tag = std::to_string(run_id) + "-" + std::to_string(h);
        // hops are joined over tcp (like nodes); the edges use `transport`
        std::string in = (h == 0 && transport == "inproc") ? "inproc://raw-in-" + tag
                                                           : "tcp://127.0.0.1:*";
        std::string out = (h == hops - 1 && transport == "inproc") ? "inproc://raw-out-" + tag
                                                                   : "tcp://127.0.0.1:*";
        proxies.push_back(std::make_unique<raw_proxy>(ctx, in, out, tag));
        auto last = [](void* s) {
            char buf[256];
            size_t len = sizeof(buf);
            zmq_getsockopt(s, ZMQ_LAST_ENDPOINT, buf, &len);
            return std::string(buf);
        };
        ins.push_back(last(proxies.back()->front));
        outs.push_back(last(proxies.back()->back));
    }
    // chain: proxy h's backend feeds proxy h+1's frontend through an extra XSUB? zmq_proxy's
    // frontend is an XSUB that binds; connect it to the previous backend as well.
    for (int h = 1; h < hops; ++h) {
        zmq_connect(proxies[static_cast<std::size_t>(h)]->front, outs[static_cast<std::size_t>(h - 1)].c_str());
    }
    void* pub = make_pub(ctx, ins.front().c_str());
    void* sub = make_sub(ctx, outs.back().c_str(), "bench.");
    std::string payload(size, 'x');
    zmq_msg_t a, b;
    zmq_msg_init(&a);
    zmq_msg_init(&b);
    auto drain_subs = [&] {
        zmq_msg_t m;
        zmq_msg_init(&m);
        while (zmq_msg_recv(&m, pub, ZMQ_DONTWAIT) >= 0) {
        }
        zmq_msg_close(&m);
    };
    warm([&] {
            zmq_send(pub, "bench.warm", 10, ZMQ_SNDMORE);
            zmq_send(pub, "w", 1, 0);
            drain_subs();
        },
         [&](int t) { return recv_two(sub, a, b, t); });
    const int n = g_count;
    const auto t0 = clk::now();
    std::thread producer([&] {
        for (int i = 0; i < n; ++i) {
            zmq_send(pub, "bench.data", 10, ZMQ_SNDMORE);
            zmq_send(pub, payload.data(), payload.size(), 0);
            if ((i & 1023) == 0) {
                drain_subs();
            }
        }
    });
    int got = 0;
    while (got < n && recv_two(sub, a, b, 5000)) {
        ++got;
    }
    const auto t1 = clk::now();
    producer.join();
    zmq_msg_close(&a);
    zmq_msg_close(&b);
    set_int(pub, ZMQ_LINGER, 0);
    set_int(sub, ZMQ_LINGER, 0);
    zmq_close(pub);
    zmq_close(sub);
    proxies.clear();
    zmq_ctx_term(ctx);
    return {got / std::chrono::duration<double>(t1 - t0).count(), n - got};
}

// evmesh, one node. inproc: embedded publisher/subscription. tcp: a client publisher sending
// full envelopes to the node's tcp pub endpoint (validated there) and a client SUB decoding
// every envelope.
result_row evmesh_one_node(const std::string& transport, std::size_t size) {
    evmesh::node_options o;
    o.name = "bench";
    o.mesh = "bench-" + std::to_string(getpid());
    o.mesh_enabled = false;
    o.hwm = g_hwm;
    o.slow_subscriber = evmesh::overflow_policy::block;
    if (transport == "tcp") {
        o.pub_endpoints = {"tcp://127.0.0.1:*"};
        o.sub_endpoints = {"tcp://127.0.0.1:*"};
    }
    auto n = evmesh::node::create(o);
    if (!n) {
        std::exit(3);
    }
    const std::string payload(size, 'x');
    const int count = g_count;
    int got = 0;
    clk::time_point t0, t1;
    if (transport == "inproc") {
        auto sub = (*n)->subscribe("bench.>", evmesh::subscription_options{.hwm = g_hwm});
        auto pub = (*n)->make_publisher({.name = "p", .policy = evmesh::overflow_policy::block, .hwm = g_hwm});
        warm([&] { (void)pub->publish("bench.warm", "w"); },
             [&](int t) { return sub->receive_view(std::chrono::milliseconds(t)).has_value(); });
        t0 = clk::now();
        std::thread producer([&] {
            for (int i = 0; i < count; ++i) {
                (void)pub->publish("bench.data", payload);
            }
        });
        while (got < count) {
            auto v = sub->receive_view(5s);
            if (!v) {
                break;
            }
            ++got;
        }
        t1 = clk::now();
        producer.join();
    } else {
        void* ctx = zmq_ctx_new();
        void* pub = make_pub(ctx, (*n)->pub_endpoints().front().c_str());
        void* sub = make_sub(ctx, (*n)->sub_endpoints().front().c_str(), "bench.");
        zmq_msg_t a, b;
        zmq_msg_init(&a);
        zmq_msg_init(&b);
        std::string body;
        std::uint64_t seq = 0;
        auto send_one = [&](const char* topic) {
            body.clear();
            evmesh::encode_event_body(evmesh::new_event_id(), "bench/client", evmesh::now_ns(), ++seq,
                                      "application/octet-stream", {}, payload, body);
            zmq_send(pub, topic, std::strlen(topic), ZMQ_SNDMORE);
            zmq_send(pub, body.data(), body.size(), 0);
        };
        auto drain_subs = [&] {
            zmq_msg_t m;
            zmq_msg_init(&m);
            while (zmq_msg_recv(&m, pub, ZMQ_DONTWAIT) >= 0) {
            }
            zmq_msg_close(&m);
        };
        auto recv_decoded = [&](int t) {
            if (!recv_two(sub, a, b, t)) {
                return false;
            }
            auto v = evmesh::decode_event(
                {static_cast<const char*>(zmq_msg_data(&a)), zmq_msg_size(&a)},
                {static_cast<const char*>(zmq_msg_data(&b)), zmq_msg_size(&b)});
            return v.has_value();
        };
        warm([&] { send_one("bench.warm"); drain_subs(); }, recv_decoded);
        t0 = clk::now();
        std::thread producer([&] {
            for (int i = 0; i < count; ++i) {
                send_one("bench.data");
                if ((i & 1023) == 0) {
                    drain_subs();
                }
            }
        });
        while (got < count && recv_decoded(5000)) {
            ++got;
        }
        t1 = clk::now();
        producer.join();
        zmq_msg_close(&a);
        zmq_msg_close(&b);
        set_int(pub, ZMQ_LINGER, 0);
        set_int(sub, ZMQ_LINGER, 0);
        zmq_close(pub);
        zmq_close(sub);
        zmq_ctx_term(ctx);
    }
    return {got / std::chrono::duration<double>(t1 - t0).count(), count - got};
}

// Fills `o.security` for a CURVE-secured two-node mesh (both keys allowed on both nodes).
void secure(evmesh::node_options& o, int which) {
    static std::array<std::array<char, 41>, 2> pub{}, sec{};
    static bool made = false;
    if (!made) {
        for (int i = 0; i < 2; ++i) {
            zmq_curve_keypair(pub[static_cast<std::size_t>(i)].data(), sec[static_cast<std::size_t>(i)].data());
        }
        made = true;
    }
    o.security.enabled = true;
    o.security.public_key = pub[static_cast<std::size_t>(which)].data();
    o.security.secret_key = sec[static_cast<std::size_t>(which)].data();
    o.security.mesh_secret = "benchmark mesh secret";
    o.security.allowed_keys = {pub[0].data(), pub[1].data()};
}

// A node of a two-node benchmark mesh: lossless (block) with the benchmark's queue sizes.
evmesh::node_options lossless_node(const char* name, const std::string& mesh) {
    evmesh::node_options o;
    o.name = name;
    o.mesh = mesh;
    o.hwm = g_hwm;
    o.slow_subscriber = evmesh::overflow_policy::block;
    o.discovery.port = static_cast<std::uint16_t>(30000 + getpid() % 20000);
    return o;
}

// g_count events of `size` bytes from a producer thread on `pub`, counted on `sub` until all came
// (or none for 5 s); [t0, t1] spans the first send to the last receipt. Returns the count received.
int flood(evmesh::publisher& pub, evmesh::subscription& sub, std::size_t size, clk::time_point& t0,
          clk::time_point& t1) {
    const std::string payload(size, 'x');
    const int count = g_count;
    int got = 0;
    t0 = clk::now();
    std::thread producer([&] {
        for (int i = 0; i < count; ++i) {
            (void)pub.publish("bench.data", payload);
        }
    });
    while (got < count && sub.receive_view(5s)) {
        ++got;
    }
    t1 = clk::now();
    producer.join();
    return got;
}

// evmesh, two nodes: embedded publisher on A, embedded subscriber on B, mesh link over tcp.
result_row evmesh_two_nodes(std::size_t size, bool curve = false, bool repair = false) {
    const std::string mesh = "bench2-" + std::to_string(getpid()) + (curve ? "c-" : "p-") + std::to_string(clk::now().time_since_epoch().count() % 100000);
    auto opts = [&](const char* name) {
        auto o = lossless_node(name, mesh);
        if (curve) {
            secure(o, name[0] == 'A' ? 0 : 1);
        }
        if (repair) {
            o.repair.patterns = {"bench.>"};
        }
        return o;
    };
    auto a = evmesh::node::create(opts("A"));
    auto b = evmesh::node::create(opts("B"));
    if (!a || !b) {
        std::exit(3);
    }
    auto sub = (*b)->subscribe("bench.>", evmesh::subscription_options{.hwm = g_hwm});
    auto pub = (*a)->make_publisher({.name = "p", .policy = evmesh::overflow_policy::block, .hwm = g_hwm});
    warm([&] { (void)pub->publish("bench.warm", "w"); },
         [&](int t) { return sub->receive_view(std::chrono::milliseconds(t)).has_value(); });
    clk::time_point t0, t1;
    const int got = flood(*pub, *sub, size, t0, t1);
    return {got / std::chrono::duration<double>(t1 - t0).count(), g_count - got};
}

// Durable history (docs/HISTORY.md): the two-node run with a history of `bench.>` on node A, in a
// fresh directory. Delivery to B's subscriber is the throughput (compare with evmesh_two_nodes in
// the same run); then how fast the history had stored all events, and a replay of all of them
// from B (events/s from the query to the last replayed event).
struct history_row {
    double eps = 0, stored_eps = 0, replay_eps = 0;
    int lost = 0;
};

history_row evmesh_history_run(std::size_t size) {
    char tmpl[] = "/tmp/evmesh-bench-history-XXXXXX";
    const std::string dir = mkdtemp(tmpl);
    const std::string mesh = "benchh-" + std::to_string(getpid()) + "-" + std::to_string(clk::now().time_since_epoch().count() % 100000);
    auto opts = [&](const char* name, bool with_history) {
        auto o = lossless_node(name, mesh);
        if (with_history) {
            evmesh::history_options h;
            h.name = "bench";
            h.patterns = {"bench.>"};
            h.dir = dir;
            h.max_bytes = 8ULL << 30;
            o.history.push_back(h);
        }
        return o;
    };
    history_row row;
    {
        auto a = evmesh::node::create(opts("A", true));
        auto b = evmesh::node::create(opts("B", false));
        if (!a || !b) {
            std::exit(3);
        }
        auto sub = (*b)->subscribe("bench.>", evmesh::subscription_options{.hwm = g_hwm});
        auto pub = (*a)->make_publisher({.name = "p", .policy = evmesh::overflow_policy::block, .hwm = g_hwm});
        warm([&] { (void)pub->publish("bench.warm", "w"); },
             [&](int t) { return sub->receive_view(std::chrono::milliseconds(t)).has_value(); });
        const auto base = (*a)->histories().at(0).appended;
        const int count = g_count;
        clk::time_point t0, t1;
        const int got = flood(*pub, *sub, size, t0, t1);
        // stored: the writer's snapshot is refreshed every 200 ms, so this is a lower bound
        while ((*a)->histories().at(0).appended - base < static_cast<std::uint64_t>(count) && clk::now() - t0 < 120s) {
            std::this_thread::sleep_for(1ms);
        }
        const auto t2 = clk::now();
        row.eps = got / std::chrono::duration<double>(t1 - t0).count();
        row.stored_eps = count / std::chrono::duration<double>(t2 - t0).count();
        row.lost = count - got;
        // replay everything A holds (the warm-up events too) from node B
        const auto held = (*a)->histories().at(0).events;
        std::atomic<std::uint64_t> replayed{0};
        std::atomic<std::int64_t> done_ns{0};
        const auto t3 = clk::now();
        evmesh::replay_options ro;
        ro.answer_wait = 100ms;
        ro.page = 10000;
        auto r = evmesh::replay(**b, "bench.>", ro,
                                [&](const evmesh::event_view&) {
                                    if (replayed.fetch_add(1) + 1 == held) {
                                        done_ns = (clk::now() - t3).count();
                                    }
                                });
        while (r && done_ns == 0 && clk::now() - t3 < 120s) {
            std::this_thread::sleep_for(1ms);
        }
        if (done_ns != 0) {
            row.replay_eps = static_cast<double>(held) / (static_cast<double>(done_ns) / 1e9);
        } else {
            row.lost += 1;
        }
    }
    std::filesystem::remove_all(dir);
    return row;
}

double median(std::vector<double> v) {
    std::sort(v.begin(), v.end());
    return v[v.size() / 2];
}

result_row best_of(const std::function<result_row()>& fn) {
    std::vector<double> eps;
    int lost = 0;
    for (int r = 0; r < g_reps; ++r) {
        auto row = fn();
        eps.push_back(row.eps);
        lost += row.lost;
    }
    return {median(eps), lost};
}

// Latency at a fixed moderate rate: publish `rate`/s for `seconds`, one-way latency from the
// event's time (same host clock) to receipt.
struct lat_row {
    double p50, p99, p999;
};

lat_row percentiles(std::vector<double> us) {
    std::sort(us.begin(), us.end());
    auto at = [&](double q) { return us[std::min(us.size() - 1, static_cast<std::size_t>(q * static_cast<double>(us.size())))]; };
    return {at(0.50), at(0.99), at(0.999)};
}

lat_row raw_latency(int hops, int rate, int total) {
    void* ctx = zmq_ctx_new();
    std::vector<std::unique_ptr<raw_proxy>> proxies;
    std::vector<std::string> outs;
    std::string first_in;
    for (int h = 0; h < hops; ++h) {
        proxies.push_back(std::make_unique<raw_proxy>(ctx, "tcp://127.0.0.1:*", "tcp://127.0.0.1:*", "lat" + std::to_string(h) + std::to_string(rate)));
        char buf[256];
        size_t len = sizeof(buf);
        zmq_getsockopt(proxies.back()->back, ZMQ_LAST_ENDPOINT, buf, &len);
        outs.emplace_back(buf);
        if (h == 0) {
            len = sizeof(buf);
            zmq_getsockopt(proxies.back()->front, ZMQ_LAST_ENDPOINT, buf, &len);
            first_in = buf;
        } else {
            zmq_connect(proxies.back()->front, outs[static_cast<std::size_t>(h - 1)].c_str());
        }
    }
    void* pub = make_pub(ctx, first_in.c_str());
    void* sub = make_sub(ctx, outs.back().c_str(), "bench.");
    zmq_msg_t a, b;
    zmq_msg_init(&a);
    zmq_msg_init(&b);
    warm([&] { zmq_send(pub, "bench.warm", 10, ZMQ_SNDMORE); zmq_send(pub, "w", 1, 0); },
         [&](int t) { return recv_two(sub, a, b, t); });
    std::vector<double> us;
    us.reserve(static_cast<std::size_t>(total));
    std::thread producer([&] {
        const auto period = std::chrono::nanoseconds(1'000'000'000 / rate);
        auto next = clk::now();
        char payload[64] = {};
        for (int i = 0; i < total; ++i) {
            next += period;
            std::this_thread::sleep_until(next);
            const auto t = evmesh::now_ns();
            std::memcpy(payload, &t, sizeof(t));
            zmq_send(pub, "bench.data", 10, ZMQ_SNDMORE);
            zmq_send(pub, payload, sizeof(payload), 0);
        }
    });
    while (static_cast<int>(us.size()) < total && recv_two(sub, a, b, 5000)) {
        std::int64_t t = 0;
        std::memcpy(&t, zmq_msg_data(&b), sizeof(t));
        us.push_back(static_cast<double>(evmesh::now_ns() - t) / 1000.0);
    }
    producer.join();
    zmq_msg_close(&a);
    zmq_msg_close(&b);
    set_int(pub, ZMQ_LINGER, 0);
    set_int(sub, ZMQ_LINGER, 0);
    zmq_close(pub);
    zmq_close(sub);
    proxies.clear();
    zmq_ctx_term(ctx);
    return percentiles(us);
}

lat_row evmesh_latency(bool two_nodes, int rate, int total, bool curve = false) {
    const std::string mesh = "lat-" + std::to_string(getpid()) + std::to_string(rate) + (two_nodes ? "2" : "1") + (curve ? "c" : "p");
    auto opts = [&](const char* name) {
        evmesh::node_options o;
        o.name = name;
        o.mesh = mesh;
        o.mesh_enabled = two_nodes;
        o.discovery.port = static_cast<std::uint16_t>(30000 + getpid() % 20000);
        o.pub_endpoints = {"tcp://127.0.0.1:*"};
        o.sub_endpoints = {"tcp://127.0.0.1:*"};
        if (curve) {
            secure(o, name[0] == 'A' ? 0 : 1);
        }
        return o;
    };
    auto a = evmesh::node::create(opts("A"));
    auto b = two_nodes ? evmesh::node::create(opts("B")) : evmesh::result<std::unique_ptr<evmesh::node>>(nullptr);
    if (!a || !b) {
        std::exit(3);
    }
    evmesh::node& out_node = two_nodes ? **b : **a;
    // sidecar clients over tcp at both ends, the way other processes use evmesh
    void* ctx = zmq_ctx_new();
    void* pub = make_pub(ctx, (*a)->pub_endpoints().front().c_str());
    void* sub = make_sub(ctx, out_node.sub_endpoints().front().c_str(), "bench.");
    zmq_msg_t m1, m2;
    zmq_msg_init(&m1);
    zmq_msg_init(&m2);
    std::string body;
    std::uint64_t seq = 0;
    const std::string payload(64, 'x');
    auto send_one = [&](const char* topic) {
        body.clear();
        evmesh::encode_event_body(evmesh::new_event_id(), "lat/client", evmesh::now_ns(), ++seq, "b", {}, payload, body);
        zmq_send(pub, topic, std::strlen(topic), ZMQ_SNDMORE);
        zmq_send(pub, body.data(), body.size(), 0);
    };
    warm([&] { send_one("bench.warm"); }, [&](int t) { return recv_two(sub, m1, m2, t); });
    std::vector<double> us;
    std::thread producer([&] {
        const auto period = std::chrono::nanoseconds(1'000'000'000 / rate);
        auto next = clk::now();
        for (int i = 0; i < total; ++i) {
            next += period;
            std::this_thread::sleep_until(next);
            send_one("bench.data");
        }
    });
    while (static_cast<int>(us.size()) < total && recv_two(sub, m1, m2, 5000)) {
        auto v = evmesh::decode_event({static_cast<const char*>(zmq_msg_data(&m1)), zmq_msg_size(&m1)},
                                      {static_cast<const char*>(zmq_msg_data(&m2)), zmq_msg_size(&m2)});
        if (v) {
            us.push_back(static_cast<double>(evmesh::now_ns() - v->time_ns) / 1000.0);
        }
    }
    producer.join();
    zmq_msg_close(&m1);
    zmq_msg_close(&m2);
    set_int(pub, ZMQ_LINGER, 0);
    set_int(sub, ZMQ_LINGER, 0);
    zmq_close(pub);
    zmq_close(sub);
    zmq_ctx_term(ctx);
    return percentiles(us);
}

// Embedded to embedded across two nodes: publish() on A, receive on B, event time to receipt.
lat_row evmesh_embedded_latency(int rate, int total, bool repair) {
    const std::string mesh = "elat-" + std::to_string(getpid()) + (repair ? "r" : "p");
    auto opts = [&](const char* name) {
        evmesh::node_options o;
        o.name = name;
        o.mesh = mesh;
        o.discovery.port = static_cast<std::uint16_t>(30000 + getpid() % 20000);
        if (repair) {
            o.repair.patterns = {"bench.>"};
        }
        return o;
    };
    auto a = evmesh::node::create(opts("A"));
    auto b = evmesh::node::create(opts("B"));
    if (!a || !b) {
        std::exit(3);
    }
    auto sub = (*b)->subscribe("bench.>");
    auto pub = (*a)->make_publisher({.name = "lat"});
    warm([&] { (void)pub->publish("bench.warm", "w"); },
         [&](int t) { return sub->receive_view(std::chrono::milliseconds(t)).has_value(); });
    std::vector<double> us;
    const std::string payload(64, 'x');
    std::thread producer([&] {
        const auto period = std::chrono::nanoseconds(1'000'000'000 / rate);
        auto next = clk::now();
        for (int i = 0; i < total; ++i) {
            next += period;
            std::this_thread::sleep_until(next);
            (void)pub->publish("bench.data", payload);
        }
    });
    while (static_cast<int>(us.size()) < total) {
        auto v = sub->receive_view(5s);
        if (!v) {
            break;
        }
        us.push_back(static_cast<double>(evmesh::now_ns() - v->time_ns) / 1000.0);
    }
    producer.join();
    return percentiles(us);
}

#ifdef EVMESH_BENCH_NATS
// nats-server from Debian, started and stopped (by PID) by the benchmark itself, on loopback.
struct nats_server {
    pid_t pid = -1;
    int port = 0;
    std::string url;

    nats_server() {
        int fd = socket(AF_INET, SOCK_STREAM, 0);
        sockaddr_in a{};
        a.sin_family = AF_INET;
        a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
        socklen_t len = sizeof(a);
        bind(fd, reinterpret_cast<sockaddr*>(&a), sizeof(a));
        getsockname(fd, reinterpret_cast<sockaddr*>(&a), &len);
        port = ntohs(a.sin_port);
        close(fd);
        const std::string p = std::to_string(port);
        const char* bin = access("/usr/sbin/nats-server", X_OK) == 0 ? "/usr/sbin/nats-server" : "nats-server";
        // a slow consumer may queue up to 1 GiB at the server (default 64 MiB disconnects it):
        // the NATS runs are lossless like the others
        conf = "/tmp/evmesh-bench-nats-" + std::to_string(getpid()) + ".conf";
        if (FILE* f = std::fopen(conf.c_str(), "w")) {
            std::fputs("max_pending: 1073741824\nmax_payload: 1048576\n", f);
            std::fclose(f);
        }
        std::vector<std::string> args = {bin, "-a", "127.0.0.1", "-p", p, "-c", conf};
        std::vector<char*> argv;
        for (auto& x : args) {
            argv.push_back(x.data());
        }
        argv.push_back(nullptr);
        posix_spawn_file_actions_t fa;
        posix_spawn_file_actions_init(&fa);
        posix_spawn_file_actions_addopen(&fa, 1, "/dev/null", O_WRONLY, 0);
        posix_spawn_file_actions_addopen(&fa, 2, "/dev/null", O_WRONLY, 0);
        if (posix_spawnp(&pid, bin, &fa, nullptr, argv.data(), environ) != 0) {
            pid = -1;
        }
        posix_spawn_file_actions_destroy(&fa);
        url = "nats://127.0.0.1:" + p;
    }
    ~nats_server() {
        if (pid > 0) {
            kill(pid, SIGTERM);
            waitpid(pid, nullptr, 0);
        }
        std::remove(conf.c_str());
    }
    std::string conf;
};

natsConnection* nats_connect(const std::string& url, bool send_asap) {
    natsOptions* o = nullptr;
    natsOptions_Create(&o);
    natsOptions_SetURL(o, url.c_str());
    natsOptions_SetSendAsap(o, send_asap);
    natsOptions_SetIOBufSize(o, 1 << 20);
    natsConnection* nc = nullptr;
    const auto deadline = clk::now() + 10s;
    while (natsConnection_Connect(&nc, o) != NATS_OK && clk::now() < deadline) {
        std::this_thread::sleep_for(20ms);
    }
    natsOptions_Destroy(o);
    return nc;
}

// NATS core: publisher connection -> nats-server -> subscriber connection (one server hop).
result_row nats_run(const std::string& url, std::size_t size) {
    natsConnection* pc = nats_connect(url, false);
    natsConnection* sc = nats_connect(url, false);
    if (pc == nullptr || sc == nullptr) {
        std::fprintf(stderr, "cannot connect to nats-server\n");
        std::exit(3);
    }
    natsSubscription* sub = nullptr;
    natsConnection_SubscribeSync(&sub, sc, "bench.>");
    natsSubscription_SetPendingLimits(sub, -1, -1);
    natsConnection_Flush(sc);
    const std::string payload(size, 'x');
    natsMsg* m = nullptr;
    warm([&] { natsConnection_PublishString(pc, "bench.warm", "w"); natsConnection_Flush(pc); },
         [&](int t) {
             if (natsSubscription_NextMsg(&m, sub, t) != NATS_OK) {
                 return false;
             }
             natsMsg_Destroy(m);
             return true;
         });
    const int count = g_count;
    int got = 0;
    const auto t0 = clk::now();
    std::thread producer([&] {
        for (int i = 0; i < count; ++i) {
            natsConnection_Publish(pc, "bench.data", payload.data(), static_cast<int>(payload.size()));
        }
        natsConnection_Flush(pc);
    });
    while (got < count && natsSubscription_NextMsg(&m, sub, 5000) == NATS_OK) {
        natsMsg_Destroy(m);
        ++got;
    }
    const auto t1 = clk::now();
    producer.join();
    natsSubscription_Destroy(sub);
    natsConnection_Destroy(pc);
    natsConnection_Destroy(sc);
    return {got / std::chrono::duration<double>(t1 - t0).count(), count - got};
}

lat_row nats_latency(const std::string& url, int rate, int total) {
    natsConnection* pc = nats_connect(url, true);  // flushed at once: one message, one write
    natsConnection* sc = nats_connect(url, true);
    natsSubscription* sub = nullptr;
    natsConnection_SubscribeSync(&sub, sc, "bench.>");
    natsConnection_Flush(sc);
    natsMsg* m = nullptr;
    warm([&] { natsConnection_PublishString(pc, "bench.warm", "w"); },
         [&](int t) {
             if (natsSubscription_NextMsg(&m, sub, t) != NATS_OK) {
                 return false;
             }
             natsMsg_Destroy(m);
             return true;
         });
    std::vector<double> us;
    std::thread producer([&] {
        const auto period = std::chrono::nanoseconds(1'000'000'000 / rate);
        auto next = clk::now();
        char payload[64] = {};
        for (int i = 0; i < total; ++i) {
            next += period;
            std::this_thread::sleep_until(next);
            const auto t = evmesh::now_ns();
            std::memcpy(payload, &t, sizeof(t));
            natsConnection_Publish(pc, "bench.data", payload, sizeof(payload));
        }
    });
    while (static_cast<int>(us.size()) < total && natsSubscription_NextMsg(&m, sub, 5000) == NATS_OK) {
        std::int64_t t = 0;
        std::memcpy(&t, natsMsg_GetData(m), sizeof(t));
        us.push_back(static_cast<double>(evmesh::now_ns() - t) / 1000.0);
        natsMsg_Destroy(m);
    }
    producer.join();
    natsSubscription_Destroy(sub);
    natsConnection_Destroy(pc);
    natsConnection_Destroy(sc);
    return percentiles(us);
}
#endif

// Time from creating node B to the first event from B's publisher reaching A's subscriber.
void join_time(int tries) {
    const std::string mesh = "join-" + std::to_string(getpid());
    const auto port = static_cast<std::uint16_t>(30000 + getpid() % 20000);
    evmesh::node_options oa;
    oa.name = "A";
    oa.mesh = mesh;
    oa.discovery.port = port;
    auto a = evmesh::node::create(oa);
    auto sub = (*a)->subscribe("join.>");
    std::vector<double> ms;
    for (int i = 0; i < tries; ++i) {
        evmesh::node_options ob = oa;
        ob.name = "B" + std::to_string(i);
        const auto t0 = clk::now();
        auto b = evmesh::node::create(ob);
        auto pub = (*b)->make_publisher();
        while (true) {
            (void)pub->publish("join.x", "hi");
            if (sub->receive_view(0ms)) {
                break;
            }
            std::this_thread::sleep_for(100us);
            if (clk::now() - t0 > 5s) {
                break;
            }
        }
        ms.push_back(std::chrono::duration<double, std::milli>(clk::now() - t0).count());
        (*b)->stop();
        while (sub->receive_view(20ms)) {
        }
    }
    std::sort(ms.begin(), ms.end());
    std::printf("\nJoin: node start -> first event delivered on another node (%d tries)\n", tries);
    std::printf("  median %.1f ms   max %.1f ms   (target: median <= 20 ms, max <= 100 ms)\n",
                ms[ms.size() / 2], ms.back());
}

}  // namespace

// The durable history section: off vs on in the same run, and replay speed. Returns lost events.
static int history_section() {
    int failures = 0;
    std::printf("\nDurable history: two nodes, a history of bench.> on node A (disk: %s) off vs on (same run);\n"
                "stored = all events written by the history; replay = all of them replayed on node B\n",
                "/tmp");
    std::printf("%-7s %12s %12s %8s %12s %12s\n", "payload", "off ev/s", "on ev/s", "ratio", "stored ev/s",
                "replay ev/s");
    for (std::size_t size : {std::size_t{64}, std::size_t{1024}}) {
        auto off = best_of([&] { return evmesh_two_nodes(size); });
        std::vector<history_row> runs;
        for (int r = 0; r < g_reps; ++r) {
            runs.push_back(evmesh_history_run(size));
        }
        std::sort(runs.begin(), runs.end(), [](const auto& x, const auto& y) { return x.eps < y.eps; });
        const auto& on = runs[runs.size() / 2];
        int lost = 0;
        for (const auto& r : runs) {
            lost += r.lost;
        }
        failures += off.lost + lost;
        std::printf("%-7zu %12.0f %12.0f %7.2fx %12.0f %12.0f%s\n", size, off.eps, on.eps, on.eps / off.eps,
                    on.stored_eps, on.replay_eps, lost != 0 ? "  LOST EVENTS" : "");
    }
    return failures;
}

int main(int argc, char** argv) {
    spdlog::set_level(spdlog::level::warn);
    bool quick = false;
    bool history_only = false;  // only the durable history section (off vs on, replay)
    for (int i = 1; i < argc; ++i) {
        std::string a = argv[i];
        if (a == "--count" && i + 1 < argc) {
            g_count = std::stoi(argv[++i]);
        } else if (a == "--reps" && i + 1 < argc) {
            g_reps = std::stoi(argv[++i]);
        } else if (a == "--hwm" && i + 1 < argc) {
            g_hwm = std::stoi(argv[++i]);
        } else if (a == "--quick") {
            quick = true;
            g_count = 20000;
            g_reps = 1;
        } else if (a == "--history-only") {
            history_only = true;
        } else {
            std::fprintf(stderr, "usage: evmesh_bench [--count N] [--reps R] [--hwm H] [--quick] [--history-only]\n");
            return 2;
        }
    }
    std::printf("evmesh_bench: %d events per run, median of %d runs, hwm %d, libzmq %d.%d.%d, %u cores\n",
                g_count, g_reps, g_hwm, ZMQ_VERSION_MAJOR, ZMQ_VERSION_MINOR, ZMQ_VERSION_PATCH,
                std::thread::hardware_concurrency());
    int failures = 0;
    if (history_only) {
        return history_section() == 0 ? 0 : 1;
    }
    std::printf("\nThroughput, one node (raw = XPUB -> zmq_proxy -> SUB; evmesh = publish -> node -> subscriber,\n"
                "full envelope encoded and decoded at the ends; both lossless)\n");
    std::printf("%-8s %-7s %14s %14s %10s %10s %8s\n", "path", "payload", "raw ev/s", "evmesh ev/s",
                "raw MB/s", "ev MB/s", "ratio");
    for (std::string transport : {"inproc", "tcp"}) {
        for (std::size_t size : {std::size_t{64}, std::size_t{1024}}) {
            auto raw = best_of([&] { return raw_run(transport, 1, size); });
            auto ev = best_of([&] { return evmesh_one_node(transport, size); });
            failures += raw.lost + ev.lost;
            std::printf("%-8s %-7zu %14.0f %14.0f %10.1f %10.1f %7.2fx%s\n", transport.c_str(), size,
                        raw.eps, ev.eps, raw.eps * static_cast<double>(size) / 1e6,
                        ev.eps * static_cast<double>(size) / 1e6, ev.eps / raw.eps,
                        (raw.lost + ev.lost) != 0 ? "  LOST EVENTS" : "");
        }
    }
    std::printf("\nThroughput across two nodes (raw = XPUB -> zmq_proxy -tcp-> zmq_proxy -> SUB;\n"
                "evmesh = publish on node A -> mesh link -> node B -> subscriber)\n");
    std::printf("%-7s %14s %14s %8s\n", "payload", "raw ev/s", "evmesh ev/s", "ratio");
    for (std::size_t size : {std::size_t{64}, std::size_t{1024}}) {
        auto raw = best_of([&] { return raw_run("inproc", 2, size); });
        auto ev = best_of([&] { return evmesh_two_nodes(size); });
        failures += raw.lost + ev.lost;
        std::printf("%-7zu %14.0f %14.0f %7.2fx%s\n", size, raw.eps, ev.eps, ev.eps / raw.eps,
                    (raw.lost + ev.lost) != 0 ? "  LOST EVENTS" : "");
    }
    const int rate = 10000;
    const int total = quick ? 2000 : 20000;
    std::printf("\nOne-way latency at %d events/s, 64-byte payload, tcp loopback clients (us)\n", rate);
    std::printf("%-28s %8s %8s %8s\n", "path", "p50", "p99", "p99.9");
    auto r1 = raw_latency(1, rate, total);
    auto e1 = evmesh_latency(false, rate, total);
    auto r2 = raw_latency(2, rate, total);
    auto e2 = evmesh_latency(true, rate, total);
    std::printf("%-28s %8.1f %8.1f %8.1f\n", "raw, one zmq_proxy", r1.p50, r1.p99, r1.p999);
    std::printf("%-28s %8.1f %8.1f %8.1f\n", "evmesh, one node", e1.p50, e1.p99, e1.p999);
    std::printf("%-28s %8.1f %8.1f %8.1f\n", "raw, two chained proxies", r2.p50, r2.p99, r2.p999);
    std::printf("%-28s %8.1f %8.1f %8.1f\n", "evmesh, two nodes", e2.p50, e2.p99, e2.p999);
    // The headline comparison (issue "Core v2"): embedded to embedded across two nodes against
    // NATS (one server hop) and the raw two-hop ZeroMQ chain, all in this run; repair off and on.
    std::printf("\nAcross two nodes vs NATS and raw ZeroMQ (same run; evmesh: embedded publisher on A,\n"
                "embedded subscriber on B, full envelope; NATS: nats-server %s, libnats, one server hop;\n"
                "raw: the two-hop zmq_proxy chain above)\n",
#ifdef EVMESH_BENCH_NATS
                "from Debian"
#else
                "not built (libnats-dev missing)"
#endif
    );
    std::printf("%-7s %12s %12s %12s %12s %9s %9s %9s\n", "payload", "evmesh", "evmesh+rep", "NATS",
                "raw 2-hop", "ev/NATS", "ev/raw", "rep cost");
    {
#ifdef EVMESH_BENCH_NATS
        nats_server ns;
#endif
        for (std::size_t size : {std::size_t{64}, std::size_t{1024}}) {
            auto ev = best_of([&] { return evmesh_two_nodes(size); });
            auto rep = best_of([&] { return evmesh_two_nodes(size, false, true); });
            auto raw = best_of([&] { return raw_run("inproc", 2, size); });
            failures += ev.lost + rep.lost + raw.lost;
            double nats_eps = 0;
#ifdef EVMESH_BENCH_NATS
            auto nr = best_of([&] { return nats_run(ns.url, size); });
            nats_eps = nr.eps;
#endif
            std::printf("%-7zu %12.0f %12.0f %12.0f %12.0f %8.2fx %8.2fx %8.1f%%\n", size, ev.eps, rep.eps,
                        nats_eps, raw.eps, nats_eps > 0 ? ev.eps / nats_eps : 0.0, ev.eps / raw.eps,
                        100.0 * (1.0 - rep.eps / ev.eps));
        }
        auto el = evmesh_embedded_latency(rate, total, false);
        auto elr = evmesh_embedded_latency(rate, total, true);
        std::printf("one-way latency at %d ev/s, 64 B (us):       p50      p99    p99.9\n", rate);
        std::printf("  evmesh embedded, two nodes              %8.1f %8.1f %8.1f\n", el.p50, el.p99, el.p999);
        std::printf("  evmesh embedded, two nodes, repair on   %8.1f %8.1f %8.1f\n", elr.p50, elr.p99, elr.p999);
#ifdef EVMESH_BENCH_NATS
        auto nl = nats_latency(ns.url, rate, total);
        std::printf("  NATS (send asap), one server hop        %8.1f %8.1f %8.1f\n", nl.p50, nl.p99, nl.p999);
        std::printf("  p50 ratio evmesh/NATS %.2fx\n", el.p50 / nl.p50);
#endif
    }
    failures += history_section();
    std::printf("\nSecurity: two nodes, mesh link with CURVE off vs on (same run)\n");
    std::printf("%-7s %14s %14s %8s\n", "payload", "plain ev/s", "CURVE ev/s", "ratio");
    for (std::size_t size : {std::size_t{64}, std::size_t{1024}}) {
        auto plain = best_of([&] { return evmesh_two_nodes(size, false); });
        auto curve = best_of([&] { return evmesh_two_nodes(size, true); });
        failures += plain.lost + curve.lost;
        std::printf("%-7zu %14.0f %14.0f %7.2fx\n", size, plain.eps, curve.eps, curve.eps / plain.eps);
    }
    auto lp = evmesh_latency(true, rate, total, false);
    auto lc = evmesh_latency(true, rate, total, true);
    std::printf("latency at %d ev/s (us)   plain p50 %.1f p99 %.1f   CURVE p50 %.1f p99 %.1f\n", rate, lp.p50,
                lp.p99, lc.p50, lc.p99);
    join_time(quick ? 5 : 20);
    if (failures != 0) {
        std::printf("\nFAILED: %d events lost in lossless runs\n", failures);
        return 1;
    }
    return 0;
}
