#include <cstdio>

#include "commands.hpp"

namespace evmesh::inspector {

int run_stats(const mesh_options& o, const std::string& node_name) {
    auto self = join_mesh(o);
    if (!self) {
        return exit_usage;
    }
    stats_collector stats(*self);
    stats.wait_for_all(*self, std::chrono::milliseconds(o.wait_ms));
    json out = json::array();
    for (const auto& [id, s] : stats.latest()) {
        const auto name = s.value("name", "");
        if (!node_name.empty() && name != node_name
            && (node_name.size() < 4 || (id.rfind(node_name, 0) != 0 && !id.ends_with(node_name)))) {
            continue;
        }
        json e = s;
        e.erase("received_at_ns");
        const auto lat = s.value("latency_us", json::object());
        e["latency_percentiles_us"] = {{"p50", histogram_percentile(lat, 0.50)},
                                       {"p90", histogram_percentile(lat, 0.90)},
                                       {"p99", histogram_percentile(lat, 0.99)},
                                       {"p999", histogram_percentile(lat, 0.999)}};
        std::uint64_t gaps = 0;
        for (const auto& sub : s.value("subscribers", json::array())) {
            gaps += sub.value("gaps", std::uint64_t{0});
        }
        const auto c = s.value("counters", json::object());
        e["drops"] = {{"client_rejected", c.value("client_rejected", 0)},
                      {"blocked", c.value("blocked", 0)},
                      {"subscriber_gaps", c.value("subscriber_gaps", 0)},
                      {"live_subscriber_gaps", gaps}};
        out.push_back(e);
    }
    if (out.empty()) {
        std::fprintf(stderr, "no stats from %s in mesh '%s'\n",
                     node_name.empty() ? "any node" : ("node '" + node_name + "'").c_str(), o.mesh.c_str());
        return exit_not_found;
    }
    if (o.json) {
        std::printf("%s\n", (node_name.empty() ? out : out[0]).dump(2).c_str());
        return exit_ok;
    }
    for (const auto& s : out) {
        const auto c = s["counters"];
        const auto r = s["rates"];
        std::size_t peers = 0;
        for (const auto& p : s["peers"]) {
            peers += p.value("observer", false) ? 0 : 1;
        }
        std::printf("node %s (%s), uptime %s, %zu peers\n", s.value("name", "").c_str(),
                    s.value("id", "").c_str(), human_duration_ms(s.value("uptime_ms", std::uint64_t{0})).c_str(),
                    peers);
        std::printf("  in    local %s  client %s  mesh %s   (totals %llu / %llu / %llu)\n",
                    human_rate(r.value("local_in", 0.0)).c_str(), human_rate(r.value("client_in", 0.0)).c_str(),
                    human_rate(r.value("mesh_in", 0.0)).c_str(),
                    static_cast<unsigned long long>(c.value("local_in_events", 0ULL)),
                    static_cast<unsigned long long>(c.value("client_in_events", 0ULL)),
                    static_cast<unsigned long long>(c.value("mesh_in_events", 0ULL)));
        std::printf("  out   local %s  mesh %s\n", human_rate(r.value("local_out", 0.0)).c_str(),
                    human_rate(r.value("mesh_out", 0.0)).c_str());
        const auto d = s["drops"];
        std::printf("  drops client rejected %llu, blocked %llu, subscriber gaps %llu\n",
                    static_cast<unsigned long long>(d.value("client_rejected", 0ULL)),
                    static_cast<unsigned long long>(d.value("blocked", 0ULL)),
                    static_cast<unsigned long long>(d.value("subscriber_gaps", 0ULL)));
        auto cnt = [&](const char* k) { return static_cast<unsigned long long>(c.value(k, 0ULL)); };
        std::printf("  links up %llu, down %llu; peers refused %llu, replaced %llu; stalls %llu\n",
                    cnt("links_up"), cnt("links_down"), cnt("peers_refused"), cnt("peers_replaced"), cnt("stalls"));
        if (cnt("repair_naks") + cnt("repair_served") + cnt("window_events") != 0) {
            std::printf("  repair NAKs %llu, recovered %llu, lost %llu, duplicates %llu, held %llu, served %llu "
                        "(%llu from history); window %llu events, %llu bytes\n",
                        cnt("repair_naks"), cnt("repair_recovered"), cnt("repair_lost"), cnt("repair_duplicates"),
                        cnt("repair_held"), cnt("repair_served"), cnt("repair_from_history"), cnt("window_events"),
                        cnt("window_bytes"));
        }
        const auto rej = s.value("rejected", json::object());
        const auto by_reason = rej.value("by_reason", json::object());
        const auto by_topic = rej.value("by_topic", json::object());
        for (const auto& [reason, n] : by_reason.items()) {
            std::printf("        rejected %llu x %s\n", static_cast<unsigned long long>(n.get<std::uint64_t>()),
                        reason.c_str());
        }
        for (const auto& [topic, n] : by_topic.items()) {
            std::printf("        rejected %llu on topic %s\n", static_cast<unsigned long long>(n.get<std::uint64_t>()),
                        topic.c_str());
        }
        for (const auto& sub : s.value("subscribers", json::array())) {
            std::printf("  sub   %-24s received %llu, gaps %llu\n", sub.value("pattern", "").c_str(),
                        static_cast<unsigned long long>(sub.value("received", 0ULL)),
                        static_cast<unsigned long long>(sub.value("gaps", 0ULL)));
            const auto gaps_by_topic = sub.value("gaps_by_topic", json::object());
            for (const auto& [topic, n] : gaps_by_topic.items()) {
                std::printf("        gaps %llu on topic %s\n", static_cast<unsigned long long>(n.get<std::uint64_t>()),
                            topic.c_str());
            }
        }
        const auto p = s["latency_percentiles_us"];
        std::printf("  latency (event time to local delivery) p50 <= %.0f us, p99 <= %.0f us, p99.9 <= %.0f us\n",
                    p.value("p50", 0.0), p.value("p99", 0.0), p.value("p999", 0.0));
        for (const auto& h : s.value("history", json::array())) {
            auto u = [&](const char* k) { return static_cast<unsigned long long>(h.value(k, 0ULL)); };
            std::string pats;
            for (const auto& pat : h.value("patterns", json::array())) {
                pats += (pats.empty() ? "" : ",") + pat.get<std::string>();
            }
            const auto err = h.value("error", std::string());
            std::printf("  hist  %-20s %s %llu events, %llu of %llu bytes, %llu segments; appended %llu, expired %llu, "
                        "dropped %llu, served %llu%s%s\n",
                        h.value("name", "").c_str(), pats.c_str(), u("events"), u("bytes"), u("max_bytes"), u("segments"),
                        u("appended"), u("expired"), u("dropped"), u("served"), err.empty() ? "" : "; ERROR ",
                        err.c_str());
            for (const auto& cons : h.value("consumers", json::array())) {
                auto cu = [&](const char* k) { return static_cast<unsigned long long>(cons.value(k, 0ULL)); };
                std::printf("        consumer %-16s %s members %llu, lag %llu, pending %llu, ack floor %llu; delivered %llu, "
                            "redelivered %llu, acked %llu, dead-lettered %llu\n",
                            cons.value("name", "").c_str(), cons.value("filter", "").c_str(), cu("members"), cu("lag"),
                            cu("pending"), cu("ack_floor"), cu("delivered"), cu("redelivered"), cu("acked"),
                            cu("dead_lettered"));
            }
        }
        const auto chans = s.value("channels", json::array());
        if (chans.empty()) {
            std::printf("  channels none\n");
        }
        for (const auto& ch : chans) {
            auto u = [&](const char* k) { return static_cast<unsigned long long>(ch.value(k, 0ULL)); };
            std::printf("  chan  %-20s %-8s %s delivered %llu, pending %llu (oldest %.1f s), in flight %llu, "
                        "retried %llu, dead %llu, avg attempt %llu us\n",
                        ch.value("name", "").c_str(), ch.value("plugin", "").c_str(),
                        ch.value("disabled", false) ? "DISABLED" : ch.value("paused", false) ? "PAUSED  " : "ok      ",
                        u("delivered"), u("pending"),
                        static_cast<double>(u("oldest_pending_age_ms")) / 1000.0, u("in_flight"), u("retried"),
                        u("dead"), u("attempt_latency_avg_us"));
        }
    }
    return exit_ok;
}

}  // namespace evmesh::inspector
