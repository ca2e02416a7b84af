#include <cstdio>
#include <thread>

#include "commands.hpp"

namespace evmesh::inspector {

namespace {
// UUIDv7 ids share their leading (time) digits; the random tail tells nodes apart
std::string short_id(const std::string& id) {
    return id.size() > 8 ? id.substr(id.size() - 8) : id;
}
}  // namespace

int run_nodes(const mesh_options& o) {
    auto self = join_mesh(o);
    if (!self) {
        return exit_usage;
    }
    stats_collector stats(*self);
    stats.wait_for_all(*self, std::chrono::milliseconds(o.wait_ms));
    auto snap = mesh_snapshot(*self, stats);
    const auto& nodes = snap["nodes"];
    if (o.json) {
        std::printf("%s\n", json{{"mesh", o.mesh}, {"nodes", nodes}}.dump(2).c_str());
        return nodes.empty() ? exit_not_found : exit_ok;
    }
    std::printf("%-20s %-10s %-24s %-9s %-6s %-9s %s\n", "NODE", "ID", "MESH ENDPOINT", "UPTIME",
                "PEERS", "HEALTH", "IN/OUT (local+client+mesh / local+mesh)");
    for (const auto& n : nodes) {
        const auto rates = n.value("rates", json::object());
        const double in = rates.value("local_in", 0.0) + rates.value("client_in", 0.0) + rates.value("mesh_in", 0.0);
        const double out = rates.value("local_out", 0.0) + rates.value("mesh_out", 0.0);
        std::printf("%-20s %-10s %-24s %-9s %-6zu %-9s %s / %s\n", n.value("name", "").c_str(),
                    short_id(n.value("id", "")).c_str(), n.value("mesh_endpoint", "-").c_str(),
                    human_duration_ms(n.value("uptime_ms", std::uint64_t{0})).c_str(),
                    n.value("peers", json::array()).size(), n.value("health", "").c_str(),
                    human_rate(in).c_str(), human_rate(out).c_str());
    }
    if (nodes.empty()) {
        std::fprintf(stderr, "no nodes found in mesh '%s' on UDP port %d\n", o.mesh.c_str(), o.beacon_port);
        return exit_not_found;
    }
    return exit_ok;
}

int run_topics(const mesh_options& o) {
    auto self = join_mesh(o);
    if (!self) {
        return exit_usage;
    }
    stats_collector stats(*self);
    stats.wait_for_all(*self, std::chrono::milliseconds(o.wait_ms));
    // rates are per stats interval: wait for a second event so they cover a full interval
    std::this_thread::sleep_for(std::chrono::milliseconds(std::min(o.wait_ms, 1100)));
    auto snap = mesh_snapshot(*self, stats);
    const auto& topics = snap["topics"];
    if (o.json) {
        std::printf("%s\n", json{{"mesh", o.mesh}, {"topics", topics}}.dump(2).c_str());
        return topics.empty() ? exit_not_found : exit_ok;
    }
    std::printf("%-36s %10s %12s  %-24s %s\n", "TOPIC", "RATE", "EVENTS", "PUBLISHED ON", "SUBSCRIBED ON");
    for (const auto& t : topics) {
        std::string pubs, subs;
        for (const auto& p : t["publishers"]) {
            pubs += (pubs.empty() ? "" : ",") + p.value("node", "");
        }
        for (const auto& s : t["subscribers"]) {
            subs += (subs.empty() ? "" : ",") + s.get<std::string>();
        }
        std::printf("%-36s %10s %12llu  %-24s %s\n", t.value("topic", "").c_str(),
                    human_rate(t.value("rate", 0.0)).c_str(),
                    static_cast<unsigned long long>(t.value("events", std::uint64_t{0})), pubs.c_str(),
                    subs.empty() ? "-" : subs.c_str());
    }
    return topics.empty() ? exit_not_found : exit_ok;
}

}  // namespace evmesh::inspector
