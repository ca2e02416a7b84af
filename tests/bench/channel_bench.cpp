// Webhook channel throughput (issue 5): events/s delivered to a fast local HTTP receiver
// (cpp-httplib, keep-alive, in this process), side by side with the same webhook plugin called
// directly from the same number of threads without the outbox. The ratio is the cost of
// durability: persisting, scheduling and logging every delivery.
//
//   channel_bench [--count N] [--concurrency C] [--reps R] [--quick]

#include <evmesh/channel.h>
#include <evmesh/channels.hpp>
#include <evmesh/node.hpp>

#include <dlfcn.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <string>
#include <thread>
#include <vector>

#include <httplib.h>

using namespace std::chrono_literals;
using clock_type = std::chrono::steady_clock;

namespace {

struct receiver {
    httplib::Server server;
    std::thread thread;
    int port = 0;
    std::atomic<std::uint64_t> received{0};

    receiver() {
        server.new_task_queue = [] { return new httplib::ThreadPool(32); };
        server.set_tcp_nodelay(true);
        server.set_keep_alive_max_count(1000000);  // a production receiver keeps connections open
        server.Post("/hook", [this](const httplib::Request&, httplib::Response& res) {
            received.fetch_add(1, std::memory_order_relaxed);
            res.set_content("ok", "text/plain");
        });
        port = server.bind_to_any_port("127.0.0.1");
        thread = std::thread([this] { server.listen_after_bind(); });
        while (!server.is_running()) {
            std::this_thread::sleep_for(1ms);
        }
    }
    ~receiver() {
        server.stop();
        thread.join();
    }
};

std::string plugin_path() {
    const auto exe = std::filesystem::read_symlink("/proc/self/exe");
    return (exe.parent_path().parent_path() / "channels" / "evmesh_channel_webhook.so").string();
}

std::string settings(int port) {
    return R"({"url":"http://127.0.0.1:)" + std::to_string(port) +
           R"(/hook","allow_private":true,"secret":"whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"})";
}

// The plugin called directly: C threads, each delivering count/C events, no outbox.
double direct(int count, int concurrency) {
    receiver r;
    void* h = dlopen(plugin_path().c_str(), RTLD_NOW | RTLD_LOCAL);
    if (h == nullptr) {
        std::fprintf(stderr, "cannot load %s\n", plugin_path().c_str());
        std::exit(1);
    }
    evmesh_channel_entry_fn entry = nullptr;
    auto* sym = dlsym(h, EVMESH_CHANNEL_ENTRY);
    std::memcpy(&entry, &sym, sizeof(entry));
    const auto* api = entry();
    const auto cfg = settings(r.port);
    evmesh_host host{sizeof(evmesh_host), EVMESH_CHANNEL_ABI_VERSION, "bench", cfg.c_str(), nullptr, nullptr};
    char err[256] = {0};
    auto* ch = api->create(&host, err, sizeof(err));
    if (ch == nullptr) {
        std::fprintf(stderr, "create: %s\n", err);
        std::exit(1);
    }
    std::atomic<int> next{0};
    const auto t0 = clock_type::now();
    std::vector<std::thread> threads;
    for (int t = 0; t < concurrency; ++t) {
        threads.emplace_back([&] {
            const std::string payload = R"({"order":"o-1","total":42.5})";
            for (int i = next++; i < count; i = next++) {
                const auto eid = evmesh::new_event_id();
                const auto id = evmesh::to_string(eid);
                evmesh_event e{};
                e.struct_size = sizeof(e);
                std::memcpy(e.id, eid.data(), 16);
                e.id_text = id.c_str();
                e.topic = "orders.eu.created";
                e.topic_len = std::strlen(e.topic);
                e.source = "bench/pub";
                e.source_len = std::strlen(e.source);
                e.time_ns = evmesh::now_ns();
                e.seq = static_cast<std::uint64_t>(i + 1);
                e.content_type = "application/json";
                e.content_type_len = std::strlen(e.content_type);
                e.payload = payload.data();
                e.payload_len = payload.size();
                evmesh_attempt a{sizeof(a), 1, 10, e.time_ns};
                evmesh_result res{};
                res.retry_after_ms = -1;
                if (api->deliver(ch, &e, &a, &res) != EVMESH_DELIVERED) {
                    std::fprintf(stderr, "deliver failed: %d %s\n", res.code, res.detail);
                    std::exit(1);
                }
            }
        });
    }
    for (auto& t : threads) {
        t.join();
    }
    const double s = std::chrono::duration<double>(clock_type::now() - t0).count();
    api->destroy(ch);
    dlclose(h);
    return count / s;
}

// Through a node: publish `count` events in process; the channel persists each one in the
// outbox, delivers it and records the outcome. Timed from the first publish to the last 2xx.
double through_outbox(int count, int concurrency, double& accept_rate) {
    receiver r;
    char dir_template[] = "/tmp/evmesh-chbench-XXXXXX";
    const std::string dir = mkdtemp(dir_template);
    evmesh::node_options no;
    no.name = "bench";
    no.mesh_enabled = false;
    no.discovery.enabled = false;
    no.stats_interval = 0ms;
    no.slow_subscriber = evmesh::overflow_policy::block;  // the outbox may not keep up: hold, do not drop
    auto n = evmesh::node::create(no);
    if (!n) {
        std::fprintf(stderr, "node: %s\n", n.error().message().c_str());
        std::exit(1);
    }
    evmesh::channels::runtime_options ro;
    ro.outbox_path = dir + "/outbox.db";
    evmesh::channels::channel_config cc;
    cc.name = "bench";
    cc.plugin = plugin_path();
    cc.topics = {"orders.>"};
    cc.settings_json = settings(r.port);
    cc.concurrency = concurrency;
    ro.channels.push_back(cc);
    std::string error;
    auto rt = evmesh::channels::channel_runtime::start(**n, ro, error);
    if (!rt) {
        std::fprintf(stderr, "channels: %s\n", error.c_str());
        std::exit(1);
    }
    auto pub = (*n)->make_publisher();
    const std::string payload = R"({"order":"o-1","total":42.5})";
    const auto t0 = clock_type::now();
    for (int i = 0; i < count; ++i) {
        if (!pub->publish("orders.eu.created", payload, {}, "application/json")) {
            std::fprintf(stderr, "publish failed\n");
            std::exit(1);
        }
    }
    bool accepted_all = false;
    while (r.received.load() < static_cast<std::uint64_t>(count)) {
        if (!accepted_all && (*rt)->stats()[0].accepted >= static_cast<std::uint64_t>(count)) {
            accepted_all = true;
            accept_rate = count / std::chrono::duration<double>(clock_type::now() - t0).count();
        }
        std::this_thread::sleep_for(1ms);
        if (clock_type::now() - t0 > 300s) {
            std::fprintf(stderr, "timeout: %llu of %d delivered\n",
                         static_cast<unsigned long long>(r.received.load()), count);
            std::exit(1);
        }
    }
    const double s = std::chrono::duration<double>(clock_type::now() - t0).count();
    if (!accepted_all) {
        accept_rate = count / s;
    }
    const auto st = (*rt)->stats()[0];
    (*rt)->stop();
    rt->reset();
    (*n)->stop();
    std::filesystem::remove_all(dir);
    if (st.duplicates != 0 || r.received.load() != static_cast<std::uint64_t>(count)) {
        std::fprintf(stderr, "unexpected: %llu duplicates, %llu received\n",
                     static_cast<unsigned long long>(st.duplicates),
                     static_cast<unsigned long long>(r.received.load()));
        std::exit(1);
    }
    return count / s;
}

double median(std::vector<double> v) {
    std::sort(v.begin(), v.end());
    return v[v.size() / 2];
}

}  // namespace

int main(int argc, char** argv) {
    int count = 20000, reps = 3;
    std::vector<int> concurrencies = {1, 4, 16};
    for (int i = 1; i < argc; ++i) {
        const std::string a = argv[i];
        if (a == "--quick") {
            count = 2000;
            reps = 1;
            concurrencies = {4};
        } else if (a == "--count" && i + 1 < argc) {
            count = std::atoi(argv[++i]);
        } else if (a == "--reps" && i + 1 < argc) {
            reps = std::atoi(argv[++i]);
        } else if (a == "--concurrency" && i + 1 < argc) {
            concurrencies = {std::atoi(argv[++i])};
        } else {
            std::fprintf(stderr, "usage: channel_bench [--count N] [--reps R] [--concurrency C] [--quick]\n");
            return 2;
        }
    }
    std::printf("webhook channel to a local HTTP receiver, %d events, median of %d\n", count, reps);
    std::printf("| concurrency | plugin direct ev/s | through outbox ev/s | ratio | outbox accept ev/s |\n");
    std::printf("|---|---|---|---|---|\n");
    for (int c : concurrencies) {
        std::vector<double> d, o, acc;
        for (int r = 0; r < reps; ++r) {
            d.push_back(direct(count, c));
            double a = 0;
            o.push_back(through_outbox(count, c, a));
            acc.push_back(a);
        }
        const double md = median(d), mo = median(o);
        std::printf("| %d | %.0f | %.0f | %.2f | %.0f |\n", c, md, mo, mo / md, median(acc));
        std::fflush(stdout);
    }
    return 0;
}
