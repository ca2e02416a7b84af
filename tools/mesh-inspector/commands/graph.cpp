#include <cstdio>
#include <set>
#include <thread>

#include "commands.hpp"

namespace evmesh::inspector {

namespace {
std::string quote(const std::string& s) {
    std::string out = "\"";
    for (char c : s) {
        if (c == '\n') {
            out += "\\n";  // DOT's line break inside a label
            continue;
        }
        if (c == '"' || c == '\\') {
            out += '\\';
        }
        out += c;
    }
    return out + "\"";
}
}  // namespace

int run_graph(const mesh_options& o) {
    auto self = join_mesh(o);
    if (!self) {
        return exit_usage;
    }
    stats_collector stats(*self);
    stats.wait_for_all(*self, std::chrono::milliseconds(o.wait_ms));
    std::this_thread::sleep_for(std::chrono::milliseconds(std::min(o.wait_ms, 1100)));  // full-interval rates
    const auto snap = mesh_snapshot(*self, stats);
    if (o.json) {
        std::printf("%s\n", snap.dump(2).c_str());
        return snap["nodes"].empty() ? exit_not_found : exit_ok;
    }
    std::printf("digraph %s {\n  rankdir=LR;\n  node [shape=box, style=rounded];\n", quote("mesh " + o.mesh).c_str());
    for (const auto& n : snap["nodes"]) {
        const auto r = n.value("rates", json::object());
        const double in = r.value("local_in", 0.0) + r.value("client_in", 0.0);
        std::printf("  %s [label=%s%s];\n", quote(n.value("name", "")).c_str(),
                    quote(n.value("name", "") + "\npublishes " + human_rate(in) + "\n" + n.value("health", "")).c_str(),
                    n.value("health", "") == "ok" ? "" : ", color=red");
    }
    // links: one undirected edge per connected pair, dashed
    std::set<std::pair<std::string, std::string>> links;
    for (const auto& n : snap["nodes"]) {
        for (const auto& p : n.value("peers", json::array())) {
            auto a = n.value("name", ""), b = p.value("name", "");
            if (a > b) {
                std::swap(a, b);
            }
            if (links.emplace(a, b).second) {
                std::printf("  %s -> %s [dir=none, style=dashed, color=gray, label=%s];\n", quote(a).c_str(),
                            quote(b).c_str(), quote(p.value("state", "")).c_str());
            }
        }
    }
    // flows: events per second from a source node, measured at the receiver
    for (const auto& e : snap["edges"]) {
        std::printf("  %s -> %s [label=%s, penwidth=2];\n", quote(e.value("from", "")).c_str(),
                    quote(e.value("to", "")).c_str(), quote(human_rate(e.value("rate", 0.0))).c_str());
    }
    std::printf("}\n");
    return snap["nodes"].empty() ? exit_not_found : exit_ok;
}

}  // namespace evmesh::inspector
