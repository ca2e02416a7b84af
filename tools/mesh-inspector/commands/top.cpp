#include <unistd.h>

#include <atomic>
#include <csignal>
#include <cstdio>
#include <thread>

#include "commands.hpp"

namespace evmesh::inspector {

namespace {
std::atomic<bool> g_stop{false};
}  // namespace

// A live full-screen view with plain ANSI escapes (works in any terminal, tmux, script).
int run_top(const mesh_options& o, double duration_s) {
    auto self = join_mesh(o);
    if (!self) {
        return exit_usage;
    }
    stats_collector stats(*self);
    std::signal(SIGINT, [](int) { g_stop = true; });
    std::signal(SIGTERM, [](int) { g_stop = true; });
    const auto end = std::chrono::steady_clock::now()
                     + std::chrono::milliseconds(static_cast<std::int64_t>(duration_s * 1000));
    // the first stats events arrive within a second: do not draw an empty mesh first
    stats.wait_for_all(*self, std::chrono::milliseconds(std::min(o.wait_ms, 1500)));
    while (!g_stop && (duration_s <= 0 || std::chrono::steady_clock::now() < end)) {
        const auto snap = mesh_snapshot(*self, stats);
        std::string screen = "\x1b[H\x1b[2J";
        char line[512];
        std::snprintf(line, sizeof(line), "mesh-inspector top   mesh '%s'   %zu nodes   %zu topics   (Ctrl-C quits)\n\n",
                      o.mesh.c_str(), snap["nodes"].size(), snap["topics"].size());
        screen += line;
        std::snprintf(line, sizeof(line), "%-20s %-9s %-9s %5s %10s %10s %10s %8s %8s %9s\n", "NODE", "HEALTH",
                      "UPTIME", "PEERS", "PUB/s", "MESH IN/s", "LOCAL OUT", "GAPS", "REJECTS", "p99 us");
        screen += line;
        for (const auto& n : snap["nodes"]) {
            const auto r = n.value("rates", json::object());
            const auto c = n.value("counters", json::object());
            std::snprintf(line, sizeof(line), "%-20s %-9s %-9s %5zu %10s %10s %10s %8llu %8llu %9.0f\n",
                          n.value("name", "").substr(0, 20).c_str(), n.value("health", "").c_str(),
                          human_duration_ms(n.value("uptime_ms", std::uint64_t{0})).c_str(),
                          n.value("peers", json::array()).size(),
                          human_rate(r.value("local_in", 0.0) + r.value("client_in", 0.0)).c_str(),
                          human_rate(r.value("mesh_in", 0.0)).c_str(), human_rate(r.value("local_out", 0.0)).c_str(),
                          static_cast<unsigned long long>(c.value("subscriber_gaps", 0ULL)),
                          static_cast<unsigned long long>(c.value("client_rejected", 0ULL)),
                          n.value("latency_p99_us", 0.0));
            screen += line;
        }
        std::snprintf(line, sizeof(line), "\n%-40s %10s  %-30s %s\n", "TOPIC", "RATE", "PUBLISHED ON", "SUBSCRIBED ON");
        screen += line;
        int shown = 0;
        for (const auto& t : snap["topics"]) {
            if (++shown > 20) {
                break;
            }
            std::string pubs, subs;
            for (const auto& p : t["publishers"]) {
                pubs += (pubs.empty() ? "" : ",") + p.value("node", "");
            }
            for (const auto& s : t["subscribers"]) {
                subs += (subs.empty() ? "" : ",") + s.get<std::string>();
            }
            std::snprintf(line, sizeof(line), "%-40s %10s  %-30s %s\n", t.value("topic", "").substr(0, 40).c_str(),
                          human_rate(t.value("rate", 0.0)).c_str(), pubs.substr(0, 30).c_str(),
                          subs.empty() ? "-" : subs.c_str());
            screen += line;
        }
        std::fwrite(screen.data(), 1, screen.size(), stdout);
        std::fflush(stdout);
        for (int i = 0; i < 100 && !g_stop; ++i) {
            std::this_thread::sleep_for(std::chrono::milliseconds(10));
        }
    }
    std::fflush(stdout);  // the last screen stays on the terminal
    return exit_ok;
}

}  // namespace evmesh::inspector
