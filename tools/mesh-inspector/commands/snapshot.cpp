#include <algorithm>
#include <set>

#include "commands.hpp"

namespace evmesh::inspector {

json mesh_snapshot(node& self, const stats_collector& stats) {
    const auto latest = stats.latest();
    const auto seen = stats.seen();
    const auto now = std::chrono::steady_clock::now();
    json nodes = json::array();
    std::set<std::string> listed;
    // every node the inspector has a beacon from, plus any that sent stats
    std::vector<std::pair<std::string, std::string>> ids;  // id, name
    for (const auto& p : self.peers()) {
        if (!p.observer) {
            ids.emplace_back(p.id, p.name);
        }
    }
    for (const auto& [stats_id, s] : latest) {
        const std::string id = stats_id;  // clang 14 cannot capture structured bindings
        if (std::none_of(ids.begin(), ids.end(), [&](const auto& e) { return e.first == id; })) {
            ids.emplace_back(id, s.value("name", ""));
        }
    }
    std::set<std::string> alive_ids;
    for (const auto& p : self.peers()) {
        alive_ids.insert(p.id);
    }
    std::size_t service_nodes = 0;
    for (const auto& [id, name] : ids) {
        (void)name;
        if (alive_ids.count(id) != 0) {
            ++service_nodes;
        }
    }
    for (const auto& [id, name] : ids) {
        json n;
        n["id"] = id;
        n["name"] = name;
        const auto it = latest.find(id);
        const bool in_mesh = alive_ids.count(id) != 0;
        if (it == latest.end()) {
            n["health"] = in_mesh ? "silent" : "gone";  // beacons but no stats (stats off)
            nodes.push_back(n);
            continue;
        }
        const auto& s = it->second;
        const auto age_ms = std::chrono::duration_cast<std::chrono::milliseconds>(now - seen.at(id)).count();
        n["name"] = s.value("name", name);
        n["mesh_endpoint"] = s["endpoints"].value("mesh", "");
        n["pub"] = s["endpoints"].value("pub", json::array());
        n["sub"] = s["endpoints"].value("sub", json::array());
        n["uptime_ms"] = s.value("uptime_ms", 0);
        n["stats_age_ms"] = age_ms;
        json peers = json::array();
        std::size_t connected = 0;
        for (const auto& p : s["peers"]) {
            if (p.value("observer", false)) {
                continue;
            }
            peers.push_back({{"name", p.value("name", "")}, {"id", p.value("id", "")}, {"state", p.value("state", "")}});
            if (p.value("state", "") == "connected") {
                ++connected;
            }
        }
        n["peers"] = peers;
        n["rates"] = s.value("rates", json::object());
        n["counters"] = s.value("counters", json::object());
        n["latency_p50_us"] = histogram_percentile(s.value("latency_us", json::object()), 0.50);
        n["latency_p99_us"] = histogram_percentile(s.value("latency_us", json::object()), 0.99);
        const auto interval = s.value("interval_ms", 1000);
        std::string health = "ok";
        if (!in_mesh) {
            health = "gone";  // the inspector lost its link or its beacons
        } else if (age_ms > 3 * std::max<std::int64_t>(interval, 1000)) {
            health = "stale";
        } else if (connected + 1 < service_nodes) {
            health = "degraded";  // does not see every node the inspector sees
        }
        n["health"] = health;
        nodes.push_back(n);
        listed.insert(id);
    }
    std::sort(nodes.begin(), nodes.end(), [](const json& a, const json& b) { return a["name"] < b["name"]; });

    // topics: published where counted, subscribed where a node's local prefix covers them
    std::map<std::string, json> topics;
    for (const auto& [id, s] : latest) {
        if (alive_ids.count(id) == 0) {
            continue;
        }
        for (const auto& t : s.value("topics", json::array())) {
            auto& e = topics[t.value("topic", "")];
            e["topic"] = t.value("topic", "");
            e["rate"] = e.value("rate", 0.0) + t.value("rate", 0.0);
            e["events"] = e.value("events", std::uint64_t{0}) + t.value("events", std::uint64_t{0});
            e["publishers"].push_back({{"node", s.value("name", "")}, {"rate", t.value("rate", 0.0)}});
        }
    }
    for (auto& [topic, e] : topics) {
        e["subscribers"] = json::array();
        for (const auto& [id, s] : latest) {
            if (alive_ids.count(id) == 0) {
                continue;
            }
            for (const auto& prefix : s["subscriptions"].value("local", json::array())) {
                if (topic.rfind(prefix.get<std::string>(), 0) == 0) {
                    e["subscribers"].push_back(s.value("name", ""));
                    break;
                }
            }
        }
    }
    json topic_list = json::array();
    for (auto& [k, v] : topics) {
        topic_list.push_back(v);
    }
    std::sort(topic_list.begin(), topic_list.end(), [](const json& a, const json& b) { return a["rate"] > b["rate"]; });

    // edges: events per second from a source node, measured where they arrive
    json edges = json::array();
    std::map<std::string, std::string> name_of;
    for (const auto& n : nodes) {
        name_of[n["name"].get<std::string>()] = n["id"].get<std::string>();
    }
    for (const auto& [id, s] : latest) {
        if (alive_ids.count(id) == 0) {
            continue;
        }
        for (const auto& src : s.value("sources", json::array())) {
            if (name_of.count(src.value("node", "")) == 0) {
                continue;  // a source that is not a node of the mesh now (gone, or an inspector)
            }
            edges.push_back({{"from", src.value("node", "")}, {"to", s.value("name", "")},
                             {"rate", src.value("rate", 0.0)}, {"events", src.value("events", 0)}});
        }
    }
    return {{"nodes", nodes}, {"topics", topic_list}, {"edges", edges}};
}

}  // namespace evmesh::inspector
