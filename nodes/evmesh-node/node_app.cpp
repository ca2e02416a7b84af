#include "node_app.hpp"
#include "sources.hpp"
#include "api.hpp"
#include "streams.hpp"
#include "cloudevents_http.hpp"
#include "http_server.hpp"
#include "dashboard_html.hpp"  // generated from evmesh-node/dashboard/index.html

#ifdef EVMESH_HAVE_SYSTEMD
#include <systemd/sd-daemon.h>
#endif

#include <signal.h>
#include <unistd.h>

#include <cstdio>
#include <cstring>
#include <fstream>
#include <mutex>
#include <unordered_map>
#include <optional>
#include <deque>
#include <set>
#include <future>

#include <nlohmann/json.hpp>
#include <spdlog/pattern_formatter.h>
#include <spdlog/sinks/stdout_sinks.h>
#include <spdlog/spdlog.h>
#include <fmt/ranges.h>

namespace evmesh::app {
namespace {

// %j: the log message escaped as a JSON string body.
class json_message_flag final : public spdlog::custom_flag_formatter {
public:
    void format(const spdlog::details::log_msg& msg, const std::tm&, spdlog::memory_buf_t& dest) override {
        const auto s = nlohmann::json(std::string(msg.payload.data(), msg.payload.size())).dump();
        dest.append(s.data() + 1, s.data() + s.size() - 1);
    }

    std::unique_ptr<custom_flag_formatter> clone() const override {
        return std::make_unique<json_message_flag>();
    }
};

bool write_file_atomically(const std::string& path, const std::string& text) {
    const auto tmp = path + ".tmp";
    {
        std::ofstream f(tmp, std::ios::trunc);
        f << text;
        if (!f.flush()) {
            return false;
        }
    }
    return std::rename(tmp.c_str(), path.c_str()) == 0;
}

// A label value in the text exposition format: backslash, quote and newline escaped.
std::string label_value(std::string_view v) {
    std::string out;
    out.reserve(v.size());
    for (char ch : v) {
        if (ch == '\\' || ch == '"') {
            out += '\\';
            out += ch;
        } else if (ch == '\n') {
            out += "\\n";
        } else {
            out += ch;
        }
    }
    return out;
}

void metric(std::string& out, const char* name, const char* type, const char* help) {
    out += "# HELP ";
    out += name;
    out += ' ';
    out += help;
    out += "\n# TYPE ";
    out += name;
    out += ' ';
    out += type;
    out += '\n';
}

void sample(std::string& out, const std::string& name_and_labels, double v) {
    out += name_and_labels;
    out += ' ';
    char buf[64];
    std::snprintf(buf, sizeof(buf), "%.17g", v);
    out += buf;
    out += '\n';
}

// The _bucket, _sum and _count samples of one histogram (bounds in microseconds, exposed in
// seconds, the Prometheus base unit; the last count is the +Inf bucket).
template <std::size_t N>
void histogram_samples(std::string& out, const std::string& name, const std::string& labels,
                       const std::array<std::uint64_t, N>& bounds_us,
                       const std::array<std::uint64_t, N + 1>& counts, std::uint64_t sum_us) {
    std::uint64_t cumulative = 0;
    for (std::size_t i = 0; i < counts.size(); ++i) {
        cumulative += counts[i];
        char le[32];
        if (i < N) {
            std::snprintf(le, sizeof(le), "%g", static_cast<double>(bounds_us[i]) / 1e6);
        } else {
            std::snprintf(le, sizeof(le), "+Inf");
        }
        sample(out, name + "_bucket{" + labels + ",le=\"" + le + "\"}", static_cast<double>(cumulative));
    }
    sample(out, name + "_sum{" + labels + "}", static_cast<double>(sum_us) / 1e6);
    sample(out, name + "_count{" + labels + "}", static_cast<double>(cumulative));
}

}  // namespace

void setup_logging(const std::string& level, const std::string& format) {
    auto logger = std::make_shared<spdlog::logger>(
        "evmesh", std::make_shared<spdlog::sinks::stderr_sink_mt>());
    if (format == "json") {
        auto f = std::make_unique<spdlog::pattern_formatter>(spdlog::pattern_time_type::utc);
        f->add_flag<json_message_flag>('j').set_pattern(
            R"({"time":"%Y-%m-%dT%H:%M:%S.%fZ","level":"%l","pid":%P,"msg":"%j"})");
        logger->set_formatter(std::move(f));
    } else {
        logger->set_pattern("%Y-%m-%d %H:%M:%S.%e %^%-5l%$ %v");
    }
    logger->set_level(spdlog::level::from_str(level));
    logger->flush_on(spdlog::level::info);
    spdlog::drop("evmesh");
    spdlog::set_default_logger(logger);  // registers it as "evmesh": the library logs through it
}

std::string render_metrics(const node& n, double uptime_seconds) {
    const auto c = n.counters();
    std::string out;
    const std::string id = "node=\"" + label_value(n.name()) + "\"";
    metric(out, "evmesh_up", "gauge", "1 while the node runs.");
    sample(out, "evmesh_up{" + id + "}", n.running() ? 1 : 0);
    metric(out, "evmesh_uptime_seconds", "gauge", "Seconds since the node started.");
    sample(out, "evmesh_uptime_seconds{" + id + "}", uptime_seconds);
    metric(out, "evmesh_events_in_total", "counter", "Events received, by input.");
    sample(out, "evmesh_events_in_total{" + id + ",input=\"local\"}", static_cast<double>(c.local_in_events));
    sample(out, "evmesh_events_in_total{" + id + ",input=\"client\"}", static_cast<double>(c.client_in_events));
    sample(out, "evmesh_events_in_total{" + id + ",input=\"mesh\"}", static_cast<double>(c.mesh_in_events));
    metric(out, "evmesh_bytes_in_total", "counter", "Event body bytes received, by input.");
    sample(out, "evmesh_bytes_in_total{" + id + ",input=\"local\"}", static_cast<double>(c.local_in_bytes));
    sample(out, "evmesh_bytes_in_total{" + id + ",input=\"client\"}", static_cast<double>(c.client_in_bytes));
    sample(out, "evmesh_bytes_in_total{" + id + ",input=\"mesh\"}", static_cast<double>(c.mesh_in_bytes));
    metric(out, "evmesh_events_out_total", "counter", "Events handed to an output socket.");
    sample(out, "evmesh_events_out_total{" + id + ",output=\"local\"}", static_cast<double>(c.local_out_events));
    sample(out, "evmesh_events_out_total{" + id + ",output=\"mesh\"}", static_cast<double>(c.mesh_out_events));
    metric(out, "evmesh_client_events_rejected_total", "counter", "Malformed client events dropped.");
    sample(out, "evmesh_client_events_rejected_total{" + id + "}", static_cast<double>(c.client_rejected));
    metric(out, "evmesh_client_events_completed_total", "counter", "Minimal client events completed by the node.");
    sample(out, "evmesh_client_events_completed_total{" + id + "}", static_cast<double>(c.client_completed));
    metric(out, "evmesh_blocked_total", "counter", "Times a full receiver held an event (block policy).");
    sample(out, "evmesh_blocked_total{" + id + "}", static_cast<double>(c.local_out_blocked));
    metric(out, "evmesh_beacons_total", "counter", "Discovery datagrams, by outcome.");
    sample(out, "evmesh_beacons_total{" + id + ",outcome=\"sent\"}", static_cast<double>(c.beacons_sent));
    sample(out, "evmesh_beacons_total{" + id + ",outcome=\"received\"}", static_cast<double>(c.beacons_received));
    sample(out, "evmesh_beacons_total{" + id + ",outcome=\"rejected\"}", static_cast<double>(c.beacons_rejected));
    sample(out, "evmesh_beacons_total{" + id + ",outcome=\"foreign_mesh\"}", static_cast<double>(c.beacons_foreign));
    sample(out, "evmesh_beacons_total{" + id + ",outcome=\"unauthenticated\"}", static_cast<double>(c.beacons_unauthenticated));
    sample(out, "evmesh_beacons_total{" + id + ",outcome=\"replayed\"}", static_cast<double>(c.beacons_replayed));
    sample(out, "evmesh_beacons_total{" + id + ",outcome=\"not_allowed\"}", static_cast<double>(c.peers_not_allowed));
    metric(out, "evmesh_auth_total", "counter", "Incoming mesh connections checked against the allow-list.");
    sample(out, "evmesh_auth_total{" + id + ",result=\"accepted\"}", static_cast<double>(c.auth_accepted));
    sample(out, "evmesh_auth_total{" + id + ",result=\"rejected\"}", static_cast<double>(c.auth_rejected));
    metric(out, "evmesh_peer_changes_total", "counter", "Peer table changes, by kind.");
    sample(out, "evmesh_peer_changes_total{" + id + ",kind=\"joined\"}", static_cast<double>(c.peers_joined));
    sample(out, "evmesh_peer_changes_total{" + id + ",kind=\"left\"}", static_cast<double>(c.peers_left));
    sample(out, "evmesh_peer_changes_total{" + id + ",kind=\"expired\"}", static_cast<double>(c.peers_expired));
    sample(out, "evmesh_peer_changes_total{" + id + ",kind=\"link_lost\"}", static_cast<double>(c.peers_link_lost));
    metric(out, "evmesh_peers", "gauge", "Peers currently known.");
    sample(out, "evmesh_peers{" + id + "}", static_cast<double>(c.peers));
    metric(out, "evmesh_stats_events_total", "counter", "Stats events published on the mesh.");
    sample(out, "evmesh_stats_events_total{" + id + "}", static_cast<double>(c.stats_sent));
    metric(out, "evmesh_pings_answered_total", "counter", "mesh-inspector pings answered.");
    sample(out, "evmesh_pings_answered_total{" + id + "}", static_cast<double>(c.pings_answered));
    metric(out, "evmesh_subscriber_gaps_total", "counter",
           "Events embedded subscriptions of this node detected as lost (sequence gaps).");
    sample(out, "evmesh_subscriber_gaps_total{" + id + "}", static_cast<double>(c.subscriber_gaps));
    metric(out, "evmesh_delivery_latency_seconds", "histogram",
           "Event time to local delivery, sampled 1 in 8 deliveries.");
    histogram_samples(out, "evmesh_delivery_latency_seconds", id, latency_bounds_us, c.latency_buckets,
                      c.latency_sum_us);
    metric(out, "evmesh_rejected_total", "counter", "Events and messages refused where they entered, by reason.");
    sample(out, "evmesh_rejected_total{" + id + ",reason=\"publish_limits\"}", static_cast<double>(c.publish_rejected));
    sample(out, "evmesh_rejected_total{" + id + ",reason=\"mesh_framing\"}", static_cast<double>(c.mesh_rejected));
    sample(out, "evmesh_rejected_total{" + id + ",reason=\"torn_message\"}", static_cast<double>(c.torn_messages));
    sample(out, "evmesh_rejected_total{" + id + ",reason=\"reserved_topic\"}", static_cast<double>(c.reserved_rejected));
    sample(out, "evmesh_rejected_total{" + id + ",reason=\"subscription_limit\"}", static_cast<double>(c.subscriptions_refused));
    metric(out, "evmesh_peer_hellos_refused_total", "counter",
           "Hellos of new peers refused (peer table full or joins per second exceeded).");
    sample(out, "evmesh_peer_hellos_refused_total{" + id + "}", static_cast<double>(c.peers_refused));
    metric(out, "evmesh_peers_incompatible_total", "counter", "Beacons of nodes speaking an older mesh protocol.");
    sample(out, "evmesh_peers_incompatible_total{" + id + "}", static_cast<double>(c.peers_incompatible));
    metric(out, "evmesh_link_changes_total", "counter", "Mesh link transitions (reconnects included).");
    sample(out, "evmesh_link_changes_total{" + id + ",to=\"up\"}", static_cast<double>(c.links_up));
    sample(out, "evmesh_link_changes_total{" + id + ",to=\"down\"}", static_cast<double>(c.links_down));
    metric(out, "evmesh_links_stuck", "gauge",
           "Peers whose beacons arrive but whose mesh link has been down for more than 5 s.");
    sample(out, "evmesh_links_stuck{" + id + "}", static_cast<double>(c.links_stuck));
    metric(out, "evmesh_stalls_total", "counter",
           "Times this node's loop stalled past the expiry window (peers were given a fresh window).");
    sample(out, "evmesh_stalls_total{" + id + "}", static_cast<double>(c.stalls));
    metric(out, "evmesh_repair_events_total", "counter",
           "Repair of mesh streams: recovered, reported lost, duplicates dropped, served to peers.");
    sample(out, "evmesh_repair_events_total{" + id + ",outcome=\"recovered\"}", static_cast<double>(c.repair_recovered));
    sample(out, "evmesh_repair_events_total{" + id + ",outcome=\"lost\"}", static_cast<double>(c.repair_lost));
    sample(out, "evmesh_repair_events_total{" + id + ",outcome=\"duplicate\"}", static_cast<double>(c.repair_duplicates));
    sample(out, "evmesh_repair_events_total{" + id + ",outcome=\"served\"}", static_cast<double>(c.repair_served));
    sample(out, "evmesh_repair_events_total{" + id + ",outcome=\"served_from_history\"}",
           static_cast<double>(c.repair_from_history));
    metric(out, "evmesh_repair_history_requests_total", "counter",
           "NAKs for events that aged out of the retransmit window, handed to this node's durable history.");
    sample(out, "evmesh_repair_history_requests_total{" + id + "}", static_cast<double>(c.repair_history_requests));
    metric(out, "evmesh_repair_naks_total", "counter", "Repair requests (NAKs) sent.");
    sample(out, "evmesh_repair_naks_total{" + id + "}", static_cast<double>(c.repair_naks));
    metric(out, "evmesh_repair_held_events", "gauge", "Events held behind a gap, waiting for repair.");
    sample(out, "evmesh_repair_held_events{" + id + "}", static_cast<double>(c.repair_held));
    metric(out, "evmesh_window_events", "gauge", "Events in the retransmit window (history tail).");
    sample(out, "evmesh_window_events{" + id + "}", static_cast<double>(c.window_events));
    metric(out, "evmesh_window_bytes", "gauge", "Bytes in the retransmit window (history tail).");
    sample(out, "evmesh_window_bytes{" + id + "}", static_cast<double>(c.window_bytes));
    metric(out, "evmesh_subscriptions", "gauge", "Distinct subscribed topic prefixes, by origin.");
    sample(out, "evmesh_subscriptions{" + id + ",origin=\"local\"}", static_cast<double>(c.subscriptions_local));
    sample(out, "evmesh_subscriptions{" + id + ",origin=\"mesh\"}", static_cast<double>(c.subscriptions_mesh));
    const auto hs = n.histories();
    if (!hs.empty()) {
        auto each = [&](const char* name, const char* type, const char* help, auto get) {
            metric(out, name, type, help);
            for (const auto& h : hs) {
                sample(out, std::string(name) + "{" + id + ",history=\"" + label_value(h.name) + "\"}", static_cast<double>(get(h)));
            }
        };
        each("evmesh_history_events", "gauge", "Events kept in the durable history.", [](const auto& h) { return h.events; });
        each("evmesh_history_bytes", "gauge", "Bytes of the durable history on disk.", [](const auto& h) { return h.bytes; });
        each("evmesh_history_max_bytes", "gauge", "Retention: the most bytes the history keeps.", [](const auto& h) { return h.max_bytes; });
        each("evmesh_history_segments", "gauge", "Segment files of the history.", [](const auto& h) { return h.segments; });
        each("evmesh_history_oldest_timestamp_seconds", "gauge", "Event time of the oldest event kept (0: none).",
             [](const auto& h) { return static_cast<double>(h.oldest_time_ns) / 1e9; });
        each("evmesh_history_appended_total", "counter", "Events written to the history.", [](const auto& h) { return h.appended; });
        each("evmesh_history_expired_total", "counter", "Events removed by retention.", [](const auto& h) { return h.expired; });
        each("evmesh_history_write_errors_total", "counter", "Failed history writes (disk full, I/O error).",
             [](const auto& h) { return h.write_errors; });
        each("evmesh_history_dropped_total", "counter", "Events lost to failed history writes.", [](const auto& h) { return h.dropped; });
        each("evmesh_history_gaps_total", "counter", "Events the history writer saw as missing (sequence gaps).",
             [](const auto& h) { return h.gaps; });
        each("evmesh_history_write_failing", "gauge", "1 while the last history write failed (e.g. disk full).",
             [](const auto& h) { return h.error.empty() ? 0 : 1; });
        each("evmesh_history_replay_queries_total", "counter", "Replay queries answered.", [](const auto& h) { return h.queries; });
        each("evmesh_history_replayed_events_total", "counter", "Events sent to replays.", [](const auto& h) { return h.served; });
        each("evmesh_history_repairs_total", "counter", "NAKs beyond the retransmit window answered from this history.",
             [](const auto& h) { return h.repairs; });
        each("evmesh_history_repaired_events_total", "counter", "Events retransmitted from this history (repair).",
             [](const auto& h) { return h.repaired; });
        auto cons = [&](const char* name, const char* type, const char* help, auto get) {
            metric(out, name, type, help);
            for (const auto& h : hs) {
                for (const auto& cn : h.consumers) {
                    sample(out, std::string(name) + "{" + id + ",history=\"" + label_value(h.name) + "\",consumer=\"" +
                                    label_value(cn.name) + "\"}",
                           static_cast<double>(get(cn)));
                }
            }
        };
        cons("evmesh_consumer_pending", "gauge", "Messages delivered and not acknowledged.", [](const auto& cn) { return cn.pending; });
        cons("evmesh_consumer_redeliver_queue", "gauge", "Messages waiting to be delivered again.",
             [](const auto& cn) { return cn.redeliver_queue; });
        cons("evmesh_consumer_lag", "gauge", "History positions not yet delivered to the consumer.", [](const auto& cn) { return cn.lag; });
        cons("evmesh_consumer_ack_floor", "gauge", "Every position below it is done.", [](const auto& cn) { return cn.ack_floor; });
        cons("evmesh_consumer_members", "gauge", "Distinct fetchers in the last 30 s.", [](const auto& cn) { return cn.members; });
        cons("evmesh_consumer_delivered_total", "counter", "First deliveries.", [](const auto& cn) { return cn.delivered; });
        cons("evmesh_consumer_redelivered_total", "counter", "Deliveries after a nak or an ack wait passed.",
             [](const auto& cn) { return cn.redelivered; });
        cons("evmesh_consumer_acked_total", "counter", "Messages acknowledged.", [](const auto& cn) { return cn.acked; });
        cons("evmesh_consumer_dead_lettered_total", "counter", "Messages given up after max_deliver deliveries.",
             [](const auto& cn) { return cn.dead_lettered; });
        cons("evmesh_consumer_lost_total", "counter", "Messages removed by retention before they were acknowledged.",
             [](const auto& cn) { return cn.lost; });
    }
    return out;
}

std::string render_channel_metrics(const std::string& node_name, const std::vector<channels::channel_stats>& stats) {
    std::string out;
    if (stats.empty()) {
        return out;
    }
    auto lbl = [&](const channels::channel_stats& c) {
        return "{node=\"" + label_value(node_name) + "\",channel=\"" + label_value(c.name) + "\",plugin=\"" +
               label_value(c.plugin) + "\"";
    };
    auto counter = [&](const char* name, const char* help, auto get) {
        metric(out, name, "counter", help);
        for (const auto& c : stats) {
            sample(out, std::string(name) + lbl(c) + "}", static_cast<double>(get(c)));
        }
    };
    auto gauge = [&](const char* name, const char* help, auto get) {
        metric(out, name, "gauge", help);
        for (const auto& c : stats) {
            sample(out, std::string(name) + lbl(c) + "}", static_cast<double>(get(c)));
        }
    };
    counter("evmesh_channel_accepted_total", "Events persisted in the outbox for the channel.",
            [](const auto& c) { return c.accepted; });
    counter("evmesh_channel_duplicates_total", "Events refused because their id was already in the outbox.",
            [](const auto& c) { return c.duplicates; });
    counter("evmesh_channel_attempts_total", "Delivery attempts.", [](const auto& c) { return c.attempts; });
    counter("evmesh_channel_delivered_total", "Events delivered.", [](const auto& c) { return c.delivered; });
    counter("evmesh_channel_retried_total", "Failed attempts scheduled again.", [](const auto& c) { return c.retried; });
    counter("evmesh_channel_failed_total", "Failed attempts (retried or final).", [](const auto& c) { return c.failed; });
    counter("evmesh_channel_dead_lettered_total", "Deliveries moved to the dead-letter store.",
            [](const auto& c) { return c.dead_lettered; });
    counter("evmesh_channel_replayed_total", "Dead letters put back into the outbox.",
            [](const auto& c) { return c.replayed; });
    counter("evmesh_channel_lost_total", "Matching events refused because the outbox had failed.",
            [](const auto& c) { return c.lost; });
    counter("evmesh_channel_recovered_total",
            "Deliveries claimed when the node last stopped without a drain (crash), delivered again.",
            [](const auto& c) { return c.recovered; });
    gauge("evmesh_channel_pending", "Events in the outbox not delivered yet (outbox depth).",
          [](const auto& c) { return c.pending; });
    gauge("evmesh_channel_in_flight", "Deliveries in progress.", [](const auto& c) { return c.in_flight; });
    gauge("evmesh_channel_dead", "Events in the dead-letter store.", [](const auto& c) { return c.dead; });
    gauge("evmesh_channel_oldest_pending_age_seconds", "Age of the oldest pending event.",
          [](const auto& c) { return c.oldest_pending_age_s; });
    gauge("evmesh_channel_disabled", "1 when the endpoint disabled the channel (HTTP 410).",
          [](const auto& c) { return c.disabled ? 1 : 0; });
    gauge("evmesh_channel_paused", "1 while the circuit breaker holds deliveries (endpoint failing).",
          [](const auto& c) { return c.paused ? 1 : 0; });
    counter("evmesh_channel_breaker_trips_total", "Times the circuit breaker opened.",
            [](const auto& c) { return c.breaker_trips; });
    auto hist = [&](const char* name, const char* help, auto counts, auto sum_us) {
        metric(out, name, "histogram", help);
        for (const auto& c : stats) {
            histogram_samples(out, name, lbl(c).substr(1), channels::channel_latency_bounds_us, counts(c), sum_us(c));
        }
    };
    hist("evmesh_channel_attempt_duration_seconds", "Duration of delivery attempts (plugin call).",
         [](const auto& c) { return c.attempt_latency; }, [](const auto& c) { return c.attempt_latency_sum_us; });
    hist("evmesh_channel_delivery_latency_seconds",
         "Time from the outbox accepting an event to its delivery (delivered events, retries included).",
         [](const auto& c) { return c.delivery_latency; }, [](const auto& c) { return c.delivery_latency_sum_us; });
    return out;
}

std::string render_channels(const std::vector<channels::channel_stats>& stats) {
    auto arr = nlohmann::json::array();
    for (const auto& c : stats) {
        arr.push_back({{"name", c.name},
                       {"plugin", c.plugin},
                       {"disabled", c.disabled},
                       {"disabled_reason", c.disabled_reason},
                       {"accepted", c.accepted},
                       {"duplicates", c.duplicates},
                       {"attempts", c.attempts},
                       {"delivered", c.delivered},
                       {"retried", c.retried},
                       {"failed", c.failed},
                       {"dead_lettered", c.dead_lettered},
                       {"replayed", c.replayed},
                       {"recovered", c.recovered},
                       {"lost", c.lost},
                       {"paused", c.paused},
                       {"breaker_trips", c.breaker_trips},
                       {"pending", c.pending},
                       {"in_flight", c.in_flight},
                       {"dead", c.dead},
                       {"oldest_pending_age_s", c.oldest_pending_age_s},
                       {"attempt_latency_avg_us", c.attempts > 0 ? c.attempt_latency_sum_us / c.attempts : 0},
                       {"attempt_latency_max_us", c.attempt_latency_max_us},
                       {"delivery_latency_avg_us", c.delivered > 0 ? c.delivery_latency_sum_us / c.delivered : 0}});
    }
    return arr.dump();
}

std::string render_peers(const node& n) {
    auto arr = nlohmann::json::array();
    for (const auto& p : n.peers()) {
        arr.push_back({{"id", p.id},
                       {"name", p.name},
                       {"endpoint", p.endpoint},
                       {"beacon_address", p.beacon_address},
                       {"incarnation", p.incarnation},
                       {"observer", p.observer},
                       {"state", to_string(p.state)},
                       {"last_seen_unix_ms",
                        std::chrono::duration_cast<std::chrono::milliseconds>(
                            p.last_seen.time_since_epoch())
                            .count()}});
    }
    return arr.dump();
}

struct node_app::http {
    http_server server;
    int port = 0;
};

namespace {
std::atomic<bool> g_stopping{false};

// sd_notify(3) when systemd started us with Type=notify ($NOTIFY_SOCKET), else nothing.
void notify(const char* state) {
#ifdef EVMESH_HAVE_SYSTEMD
    (void)sd_notify(0, state);
#else
    (void)state;
#endif
}
}  // namespace

// POST /v1/events (docs/PROTOCOL.md section 11): CloudEvents in, evmesh events out through one
// publisher (handlers run on the HTTP pool: one at a time here). A 202 means the node accepted
// every event of the request; a CloudEvent (source, id) or an Idempotency-Key seen within the
// window is not published again.
struct node_app::ingest {
    std::mutex m;
    std::optional<publisher> pub;
    const node* n = nullptr;
    std::int64_t window_ms = 10 * 60 * 1000;
    static constexpr std::size_t max_keys = 100000;
    std::unordered_map<std::string, std::int64_t> seen;       // dedupe key -> expiry (ms)
    std::deque<std::pair<std::int64_t, std::string>> seen_order;
    std::unordered_map<std::string, std::pair<std::int64_t, http_response>> answers;  // Idempotency-Key
    std::deque<std::pair<std::int64_t, std::string>> answer_order;

    static std::int64_t now_ms() {
        return std::chrono::duration_cast<std::chrono::milliseconds>(
                   std::chrono::steady_clock::now().time_since_epoch()).count();
    }

    template <class Map>
    void expire(Map& map, std::deque<std::pair<std::int64_t, std::string>>& order, std::int64_t now) {
        while (!order.empty() && (order.front().first <= now || order.size() > max_keys)) {
            map.erase(order.front().second);
            order.pop_front();
        }
    }

    void handle(const http_request& req, http_response& res, const principal& who) {
        std::vector<ce_event> events;
        ce_error err;
        if (!parse_cloudevents(req.headers, req.body, events, err)) {
            return http_error(res, err.status, err.code, err.message, err.field);
        }
        for (std::size_t i = 0; i < events.size(); ++i) {
            if (!who.may_publish(events[i].ev.topic)) {
                return http_error(res, 403, "forbidden",
                                  "this key may not publish to '" + events[i].ev.topic + "' (publish:<pattern> scopes)",
                                  events.size() > 1 ? "[" + std::to_string(i) + "].type" : "type");
            }
        }
        publish(events, req.header("idempotency-key"), res);
    }

    // Publishes checked events: 202 with their ids, or 503 + Retry-After with what was accepted.
    void publish(std::vector<ce_event>& events, const std::string& key, http_response& res) {
        if (g_stopping) {
            res.headers.emplace_back("Retry-After", "1");
            return http_error(res, 503, "stopping", "the node is stopping; nothing was accepted");
        }
        std::lock_guard lk(m);
        const auto now = now_ms();
        expire(seen, seen_order, now);
        expire(answers, answer_order, now);
        if (!key.empty()) {
            if (auto it = answers.find(key); it != answers.end()) {
                res = it->second.second;
                res.headers.emplace_back("Idempotent-Replayed", "true");
                return;
            }
        }
        // everything is checked before anything is published: a 4xx publishes nothing
        const auto& lim = n->limits();
        for (std::size_t i = 0; i < events.size(); ++i) {
            const auto& ev = events[i].ev;
            const std::string at = events.size() > 1 ? "[" + std::to_string(i) + "]." : "";
            if (!valid_topic(ev.topic, lim.max_topic_bytes) || ev.topic.rfind("_evmesh.", 0) == 0) {
                return http_error(res, 400, "bad_topic",
                                  "type '" + ev.topic + "' is not a valid evmesh topic (dot-separated, no "
                                  "wildcards, not _evmesh.)", at + "type");
            }
            if (ev.payload.size() > lim.max_event_bytes) {
                return http_error(res, 413, "payload_too_large", "the data exceeds max_event_bytes", at + "data");
            }
        }
        auto ids = nlohmann::json::array();
        std::size_t dup = 0;
        for (auto& ce : events) {
            const auto dkey = ce.ce_source + '\0' + ce.ce_id;
            ids.push_back(to_string(ce.ev.id));
            if (seen.count(dkey) != 0) {
                ++dup;
                continue;
            }
            if (auto r = pub->publish(ce.ev); !r) {
                ids.erase(ids.end() - 1);
                if (r.error() == make_error_code(errc::would_block) || r.error() == make_error_code(errc::stopped)) {
                    res.headers.emplace_back("Retry-After", "1");
                    http_error(res, 503, "unavailable",
                               "the node cannot take more events now (" + r.error().message() + "); the ids in "
                               "'accepted' were accepted, send the rest again");
                } else {
                    http_error(res, 400, "refused", r.error().message(), "data");
                }
                auto body = nlohmann::json::parse(res.body);
                body["accepted"] = ids;
                res.body = body.dump();
                return;
            }
            seen.emplace(dkey, now + window_ms);
            seen_order.emplace_back(now + window_ms, dkey);
        }
        res.json(202, nlohmann::json({{"ids", ids}, {"duplicates", dup}}).dump());
        if (!key.empty()) {
            answers.emplace(key, std::make_pair(now + window_ms, res));
            answer_order.emplace_back(now + window_ms, key);
        }
    }
};

node_app::node_app(app_config cfg) : cfg_(std::move(cfg)) {}

node_app::~node_app() {
    stop();
}

int node_app::start() {
    started_ = std::chrono::steady_clock::now();
    if (cfg_.node.discovery.enabled && cfg_.node.discovery.scope == discovery_scope::lan) {
        spdlog::warn("discovery scope is 'lan': beacons go to {} on port {}",
                     cfg_.node.discovery.broadcast_address, cfg_.node.discovery.port);
    }
    // a graceful stop lingers twice (hand over queued input, then flush outputs): split drain_ms
    cfg_.node.linger = std::min(cfg_.node.linger, std::chrono::milliseconds(cfg_.drain_ms / 2));
    auto n = node::create(cfg_.node);
    if (!n) {
        const auto& detail = last_error_message();
        std::fprintf(stderr, "evmesh-node: cannot start: %s\n",
                     detail.empty() ? n.error().message().c_str() : detail.c_str());
        return 3;
    }
    node_ = std::move(*n);
    if (!cfg_.channels.channels.empty()) {
        std::string error;
        auto rt = channels::channel_runtime::start(*node_, cfg_.channels, error);
        if (!rt) {
            const bool config = rt.error() == make_error_code(errc::bad_option);
            std::fprintf(stderr, "evmesh-node: %s: %s\n", config ? "invalid config" : "cannot start", error.c_str());
            node_->stop();
            return config ? 2 : 3;
        }
        channels_ = std::shared_ptr<channels::channel_runtime>(std::move(*rt));
    }
    if (!cfg_.http_address.empty()) {
        http_ = std::make_unique<http>();
        auto* nd = node_.get();
        auto started = started_;
        auto& srv = http_->server;
        auto fail_start = [this](const std::string& why) {
            std::fprintf(stderr, "evmesh-node: cannot start: %s\n", why.c_str());
            if (channels_) {
                channels_->stop();
            }
            node_->stop();
            return 3;
        };
        api_ = std::make_unique<api>(*nd, cfg_);
        if (std::string err; !api_->start(err)) {
            return fail_start(err);
        }
        auto* ap = api_.get();
        srv.route("GET", "/healthz", [this, nd](const http_request&, http_response& res) {
            const auto chs = current_channels();
            const bool up = nd->running() && !g_stopping;
            const bool loop_ok = nd->healthy();
            const bool outbox_ok = chs == nullptr ? !channels_down_.load() : chs->healthy();
            res.status = up && loop_ok && outbox_ok ? 200 : 503;
            res.body = !up        ? "stopping\n"
                       : !loop_ok ? "I/O thread not answering\n"
                       : outbox_ok ? "ok\n"
                       : chs == nullptr
                           ? std::string("channels not running: the reload failed (see the log)\n")
                           : "outbox not writable: " + chs->outbox_error() + "\n";
        });
        srv.route("GET", "/metrics", [this, nd, started](const http_request&, http_response& res) {
            const auto chs = current_channels();
            const double up = std::chrono::duration<double>(std::chrono::steady_clock::now() - started).count();
            res.body = render_metrics(*nd, up);
            if (chs != nullptr) {
                res.body += render_channel_metrics(nd->name(), chs->stats());
            }
            res.body += api_->metrics(nd->name());
            if (streams_) {
                res.body += streams_->metrics(nd->name());
            }
            if (sources_) {
                res.body += sources_->metrics(nd->name());
            }
            res.content_type = "text/plain; version=0.0.4";
        });
        // Channel administration (docs/CHANNELS.md). The endpoint binds loopback by default and
        // refuses browser pages (Origin) and foreign Host names there (http_server.cpp).
        srv.route("GET", "/channels", ap->admin([this](const http_request&, http_response& res) {
            const auto chs = current_channels();
            res.json(200, chs != nullptr ? render_channels(chs->stats()) : "[]");
        }));
        auto limit_of = [](const http_request& req) {
            std::size_t limit = 100;
            if (req.has_param("limit")) {
                try {
                    limit = static_cast<std::size_t>(std::stoul(req.param("limit")));
                } catch (const std::exception&) {
                    limit = 100;
                }
            }
            return std::min<std::size_t>(limit, 10000);  // the store thread serves these reads
        };
        auto answer_error = [](http_response& res, const std::error_code& ec) {
            if (ec == make_error_code(errc::bad_option)) {
                return http_error(res, 404, "not_found", "no such channel or event");
            }
            http_error(res, 503, "unavailable", ec.message());
        };
        const std::string channel_path = R"(/channels/([A-Za-z0-9_.-]+))";
        srv.route("GET", channel_path + "/log", ap->admin([this, limit_of, answer_error](const http_request& req, http_response& res) {
            const auto chs = current_channels();
            if (chs == nullptr) {
                return answer_error(res, make_error_code(errc::bad_option));
            }
            auto r = chs->delivery_log(req.matches[0], limit_of(req));
            if (!r) {
                return answer_error(res, r.error());
            }
            auto arr = nlohmann::json::array();
            for (const auto& a : *r) {
                arr.push_back({{"event_id", a.event_id}, {"topic", a.topic}, {"attempt", a.attempt},
                               {"time_ms", a.time_ms}, {"latency_us", a.latency_us}, {"outcome", a.outcome},
                               {"code", a.code}, {"detail", a.detail}});
            }
            res.json(200, arr.dump());
        }));
        srv.route("GET", channel_path + "/dead", ap->admin([this, limit_of, answer_error](const http_request& req, http_response& res) {
            const auto chs = current_channels();
            if (chs == nullptr) {
                return answer_error(res, make_error_code(errc::bad_option));
            }
            auto r = chs->dead_letters(req.matches[0], limit_of(req));
            if (!r) {
                return answer_error(res, r.error());
            }
            auto arr = nlohmann::json::array();
            for (const auto& d : *r) {
                arr.push_back({{"event_id", d.event_id}, {"topic", d.topic}, {"attempts", d.attempts},
                               {"accepted_ms", d.accepted_ms}, {"dead_ms", d.dead_ms}, {"last_code", d.last_code},
                               {"last_detail", d.last_detail}});
            }
            res.json(200, arr.dump());
        }));
        srv.route("POST", channel_path + "/replay", ap->admin([this, answer_error](const http_request& req, http_response& res) {
            const auto chs = current_channels();
            if (chs == nullptr) {
                return answer_error(res, make_error_code(errc::bad_option));
            }
            auto r = chs->replay(req.matches[0], req.param("id"));
            if (!r) {
                return answer_error(res, r.error());
            }
            res.json(200, nlohmann::json({{"replayed", *r}}).dump());
        }));
        srv.route("POST", channel_path + "/enable", ap->admin([this, answer_error](const http_request& req, http_response& res) {
            const auto chs = current_channels();
            if (chs == nullptr) {
                return answer_error(res, make_error_code(errc::bad_option));
            }
            auto r = chs->enable(req.matches[0]);
            if (!r) {
                return answer_error(res, r.error());
            }
            res.json(200, R"({"enabled":true})");
        }));
        srv.route("GET", "/peers", ap->admin([nd](const http_request&, http_response& res) {
            res.json(200, render_peers(*nd));
        }));
        if (cfg_.http_publish || !cfg_.api.ingest.empty()) {
            ingest_ = std::make_unique<ingest>();
            ingest_->n = nd;
            auto pub = nd->make_publisher({.name = "http", .policy = overflow_policy::block,
                                           .block_timeout = std::chrono::milliseconds(1000)});
            if (!pub) {
                return fail_start("the HTTP publisher: " + pub.error().message());
            }
            ingest_->pub.emplace(std::move(*pub));
            if (cfg_.http_publish) {
                srv.route("POST", "/v1/events",
                          ap->guard([this](const http_request& req, http_response& res, const principal& who) {
                              ingest_->handle(req, res, who);
                          }));
            }
        }
        ap->routes(srv, [this](std::vector<ce_event>& events, const std::string& key, http_response& res) {
            ingest_->publish(events, key, res);
        });
        srv.route("GET", "/v1/node", ap->guard([this, nd](const http_request&, http_response& res, const principal& who) {
            res.json(200, nlohmann::json({{"id", nd->id()},
                                          {"name", nd->name()},
                                          {"mesh", cfg_.node.mesh},
                                          {"version", EVMESH_NODE_VERSION},
                                          {"streams", cfg_.api.streams},
                                          {"registry", !cfg_.api.database.empty()},
                                          {"admin", who.admin()}})
                              .dump());
        }));
        if (cfg_.api.streams && cfg_.api.dashboard) {
            // The dashboard (docs/DASHBOARD.md): one page built into the binary; it asks for a
            // key itself, so loading it needs none (it holds no data).
            srv.route("GET", "/", [](const http_request&, http_response& res) {
                res.status = 200;
                res.body = dashboard_html;
                res.content_type = "text/html; charset=utf-8";
                res.headers.emplace_back("Content-Security-Policy",
                                         "default-src 'self'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; "
                                         "img-src 'self' data:; connect-src 'self'; frame-ancestors 'none'");
                res.headers.emplace_back("Cache-Control", "no-cache");
            });
        }
        if (cfg_.api.streams) {
            stream_options so;
            so.resume_events = cfg_.api.stream_resume_events;
            so.resume_history = cfg_.api.stream_resume_history;
            so.resume_answer_wait = cfg_.api.stream_resume_wait;
            so.queue_bytes = cfg_.api.stream_queue_bytes;
            so.disconnect_slow = cfg_.api.stream_slow == "disconnect";
            so.max_connections = cfg_.api.stream_max_connections;
            so.heartbeat = cfg_.api.stream_heartbeat;
            streams_ = std::make_unique<stream_hub>(*nd, so);
            auto* hub = streams_.get();
            // EventSource and WebSocket in a browser cannot set Authorization: ?access_token= too
            srv.route("GET", "/v1/stream", ap->guard([hub](const http_request& req, http_response& res, const principal& who) {
                hub->sse(req, res, who);
            }, true));
            srv.route("GET", "/v1/ws", ap->guard([hub](const http_request& req, http_response& res, const principal& who) {
                hub->ws(req, res, who);
            }, true));
            srv.route("GET", "/v1/streams", ap->guard([hub](const http_request& req, http_response& res, const principal& who) {
                hub->list(req, res, who);
            }));
        }
        http_options o;
        (void)split_http_address(cfg_.http_address, o.host, o.port);  // validated with the config
        o.cert_file = cfg_.http_cert_file;
        o.key_file = cfg_.http_key_file;
        o.body_limit = cfg_.http_max_body_bytes;
        o.allowed_origins = cfg_.http_allowed_origins;
        o.header_timeout = std::chrono::milliseconds(cfg_.http_header_timeout_ms);
        o.idle_timeout = std::chrono::milliseconds(cfg_.http_idle_timeout_ms);
        if (auto err = srv.start(o); !err.empty()) {
            return fail_start(err);
        }
        http_->port = srv.port();
    }
    if (!cfg_.pid_file.empty() && !write_file_atomically(cfg_.pid_file, std::to_string(getpid()) + "\n")) {
        std::fprintf(stderr, "evmesh-node: cannot start: cannot write pid file '%s'\n", cfg_.pid_file.c_str());
        stop();
        return 3;
    }
    nlohmann::json ready = {{"name", node_->name()},
                            {"id", node_->id()},
                            {"mesh", cfg_.node.mesh},
                            {"pid", getpid()},
                            {"pub", node_->pub_endpoints()},
                            {"sub", node_->sub_endpoints()},
                            {"mesh_endpoint", node_->mesh_endpoint()},
                            {"http", http_ ? "127.0.0.1:" + std::to_string(http_->port) : ""}};
    if (http_) {
        const auto colon = cfg_.http_address.rfind(':');
        ready["http"] = cfg_.http_address.substr(0, colon) + ":" + std::to_string(http_->port);
    }
    if (!cfg_.ready_file.empty() && !write_file_atomically(cfg_.ready_file, ready.dump() + "\n")) {
        std::fprintf(stderr, "evmesh-node: cannot start: cannot write ready file '%s'\n", cfg_.ready_file.c_str());
        stop();
        return 3;
    }
    if (!cfg_.sources.empty()) {
        // each source on its own thread; a broker that is down is retried there, not an error
        sources_ = std::make_unique<source_set>();
        std::string error;
        if (!sources_->start(*node_, cfg_.sources, error)) {
            std::fprintf(stderr, "evmesh-node: cannot start: %s\n", error.c_str());
            stop();
            return 3;
        }
    }
    std::printf("READY %s\n", ready.dump().c_str());
    std::fflush(stdout);
    notify("READY=1\nSTATUS=serving");
    start_watchdog();
    spdlog::info("evmesh-node '{}' ready: pub {} sub {} mesh {}", node_->name(),
                 nlohmann::json(node_->pub_endpoints()).dump(),
                 nlohmann::json(node_->sub_endpoints()).dump(), node_->mesh_endpoint());
    return 0;
}

std::shared_ptr<channels::channel_runtime> node_app::current_channels() const {
    std::lock_guard lk(channels_m_);
    return channels_;
}

// systemd's watchdog (WatchdogSec= in the unit): pinged at half the interval, and only while
// the node's I/O thread answers, so a wedged loop gets the node restarted.
void node_app::start_watchdog() {
#ifdef EVMESH_HAVE_SYSTEMD
    std::uint64_t usec = 0;
    if (sd_watchdog_enabled(0, &usec) <= 0 || usec == 0) {
        return;
    }
    watchdog_ = std::thread([this, period = std::chrono::microseconds(usec / 2)] {
        std::unique_lock lk(watchdog_m_);
        while (!watchdog_cv_.wait_for(lk, period, [this] { return watchdog_stop_; })) {
            if (node_->healthy()) {
                notify("WATCHDOG=1");
            } else {
                spdlog::error("evmesh-node: I/O thread not answering; watchdog not fed");
            }
        }
    });
    spdlog::info("evmesh-node: systemd watchdog every {} ms", usec / 2000);
#endif
}

void node_app::stop() {
    g_stopping = true;  // /healthz answers 503 while the node drains
    notify("STOPPING=1");
    {
        std::lock_guard lk(watchdog_m_);
        watchdog_stop_ = true;
    }
    watchdog_cv_.notify_all();
    if (watchdog_.joinable()) {
        watchdog_.join();
    }
    if (sources_) {
        sources_->stop();  // nothing read and not yet accepted is acknowledged: the broker keeps it
    }
    if (auto chs = current_channels()) {
        // stops intake and deliveries; the object stays until the admin endpoints are gone
        chs->stop(std::chrono::milliseconds(cfg_.drain_ms / 2));
    }
    if (streams_) {
        streams_->stop();  // closes every stream (1001 going away)
    }
    if (api_) {
        api_->stop();  // stores what its subscriptions took; deliveries in flight resume at the next start
    }
    if (node_) {
        node_->stop();
    }
    if (http_) {
        http_->server.stop();
        http_.reset();
    }
    streams_.reset();
    api_.reset();
    sources_.reset();
    {
        std::lock_guard lk(channels_m_);
        channels_.reset();
    }
    remove_files();
}

void node_app::remove_files() {
    if (!cfg_.pid_file.empty()) {
        ::unlink(cfg_.pid_file.c_str());
    }
    if (!cfg_.ready_file.empty()) {
        ::unlink(cfg_.ready_file.c_str());
    }
}

bool node_app::swap_channels(const channels::runtime_options& next) {
    // Events that arrive while the old channel set hands over to the new one are caught by a
    // bridge subscription to every pattern of both, then offered to the new set. What both saw
    // is refused by the outbox as a duplicate (same event id), so nothing is lost or doubled.
    struct bridge_state {
        std::mutex m;
        std::vector<event> held;
    };
    auto held = std::make_shared<bridge_state>();
    std::vector<subscription> bridge;
    std::set<std::string> patterns;
    for (const auto& ch : cfg_.channels.channels) {
        patterns.insert(ch.topics.begin(), ch.topics.end());
    }
    for (const auto& ch : next.channels) {
        patterns.insert(ch.topics.begin(), ch.topics.end());
    }
    for (const auto& p : patterns) {
        auto sub = node_->subscribe(p, [held](const event_view& ev) {
            std::lock_guard lk(held->m);
            held->held.push_back(ev.to_event());
        });
        if (!sub) {
            spdlog::error("reload: cannot subscribe to '{}' for the hand-over: {}; channels not reloaded", p,
                          sub.error().message());
            return false;
        }
        bridge.push_back(std::move(*sub));
    }
    std::shared_ptr<channels::channel_runtime> started;
    auto old = current_channels();
    if (old) {
        old->stop(std::chrono::milliseconds(cfg_.drain_ms / 2));
    }
    bool ok = true;
    if (!next.channels.empty()) {
        std::string error;
        auto rt = channels::channel_runtime::start(*node_, next, error);
        if (!rt) {
            spdlog::error("reload: the new channels cannot start: {}; starting the previous ones again", error);
            ok = false;
            if (!cfg_.channels.channels.empty()) {
                auto again = channels::channel_runtime::start(*node_, cfg_.channels, error);
                if (again) {
                    started = std::move(*again);
                } else {
                    spdlog::critical("reload: the previous channels cannot start either: {}", error);
                }
            }
        } else {
            started = std::move(*rt);
        }
    }
    {
        std::lock_guard lk(channels_m_);
        channels_ = started;
    }
    // channels configured but none running: /healthz says so, and the next reload tries again
    channels_down_ = !next.channels.empty() && !started;
    // The new set subscribed before this, so there is no moment without a subscriber; the bridge
    // hands over what the node had already sent it before it closes.
    for (auto& b : bridge) {
        b.drain_and_close();
    }
    bridge.clear();
    std::vector<event> caught;
    {
        std::lock_guard lk(held->m);
        caught.swap(held->held);
    }
    std::size_t offered = 0;
    if (started) {
        for (const auto& ev : caught) {
            offered += started->offer(ev) > 0 ? 1 : 0;
        }
    }
    spdlog::info("reload: channels handed over ({} events caught during the hand-over, {} offered to the new set)",
                 caught.size(), offered);
    return ok;
}

bool node_app::reload() {
    notify("RELOADING=1");
    app_config next;
    std::string error;
    if (!config_source_ || !config_source_(next, error)) {
        spdlog::error("reload refused, the running configuration is kept: {}",
                      config_source_ ? error : "no configuration source");
        notify("READY=1\nSTATUS=reload refused: invalid configuration");
        return false;
    }
    std::vector<std::string> applied, restart;
    if (next.log_level != cfg_.log_level || next.log_format != cfg_.log_format) {
        setup_logging(next.log_level, next.log_format);
        applied.push_back("log " + next.log_level + "/" + next.log_format);
        cfg_.log_level = next.log_level;
        cfg_.log_format = next.log_format;
    }
    const auto& sec = next.node.security;
    const auto& cur = cfg_.node.security;
    if (sec.enabled != cur.enabled) {
        restart.push_back("security on/off");
    } else if (sec.enabled) {  // keys, file name or the file's content may have changed: read it now
        if (auto r = node_->set_allow_list(sec.allowed_keys, sec.allow_file); !r) {
            spdlog::error("reload: allow-list not changed: {}", last_error_message());
        } else {
            cfg_.node.security.allowed_keys = sec.allowed_keys;
            cfg_.node.security.allow_file = sec.allow_file;
            applied.push_back("allow-list");
        }
    }
    bool ok = true;
    if (!(next.channels == cfg_.channels) || channels_down_) {
        ok = swap_channels(next.channels);
        if (ok) {
            cfg_.channels = next.channels;
            applied.push_back("channels (" + std::to_string(next.channels.channels.size()) + ")");
        }
    }
    const auto& a = cfg_.node;
    const auto& b = next.node;
    if (a.name != b.name || a.mesh != b.mesh || a.pub_endpoints != b.pub_endpoints ||
        a.sub_endpoints != b.sub_endpoints || a.mesh_port != b.mesh_port || a.hwm != b.hwm ||
        a.slow_subscriber != b.slow_subscriber || a.max_event_bytes != b.max_event_bytes ||
        a.discovery.port != b.discovery.port || a.discovery.seeds != b.discovery.seeds ||
        a.repair.patterns != b.repair.patterns || next.http_address != cfg_.http_address) {
        restart.push_back("node settings ([node], [discovery], [flow], [repair], http)");
    }
    if (!(next.sources == cfg_.sources)) {
        restart.push_back("sources ([[source]])");  // a source's broker session is not swapped live
    }
    spdlog::info("reload: applied: {}{}{}", applied.empty() ? "nothing changed" : fmt::format("{}", fmt::join(applied, ", ")),
                 restart.empty() ? "" : "; need a restart (kept as they were): ", fmt::join(restart, ", "));
    notify(ok ? "READY=1\nSTATUS=serving (reloaded)" : "READY=1\nSTATUS=serving (reload failed, see log)");
    return ok;
}

int node_app::run_until_signal() {
    sigset_t set;
    sigemptyset(&set);
    sigaddset(&set, SIGINT);
    sigaddset(&set, SIGTERM);
    sigaddset(&set, SIGHUP);
    int sig = 0;
    for (;;) {
        sigwait(&set, &sig);
        if (sig != SIGHUP) {
            break;
        }
        spdlog::info("evmesh-node: SIGHUP received, reloading the configuration");
        (void)reload();
    }
    spdlog::info("evmesh-node: {} received, stopping (drain up to {} ms; signal again to exit now)",
                 strsignal(sig), cfg_.drain_ms);
    auto done = std::async(std::launch::async, [this] { stop(); });
    sigset_t again;  // a second SIGTERM/SIGINT exits at once; a SIGHUP while stopping is ignored
    sigemptyset(&again);
    sigaddset(&again, SIGINT);
    sigaddset(&again, SIGTERM);
    while (done.wait_for(std::chrono::milliseconds(0)) != std::future_status::ready) {
        timespec ts{0, 20'000'000};
        siginfo_t info;
        if (sigtimedwait(&again, &info, &ts) > 0) {
            std::fprintf(stderr, "evmesh-node: second signal, exiting now\n");
            remove_files();
            std::_Exit(130);
        }
    }
    spdlog::info("evmesh-node: stopped cleanly");
    return 0;
}

}  // namespace evmesh::app
