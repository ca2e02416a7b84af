#include "config.hpp"
#include "http_server.hpp"
#include "sources.hpp"

#include <sys/stat.h>
#include <unistd.h>

#include <cstdlib>
#include <fstream>
#include <climits>
#include <set>
#include <sstream>

#include <toml++/toml.h>

#include <evmesh/topic.hpp>

namespace evmesh::app {
namespace {

// Reads typed values out of one TOML table and reports unknown keys, naming them in full.
class table_reader {
public:
    table_reader(const toml::table& t, std::string prefix, std::string& error)
        : t_(t), prefix_(std::move(prefix)), error_(error) {}

    bool ok() const { return error_.empty(); }

    std::string key_name(std::string_view k) const {
        return prefix_.empty() ? std::string(k) : prefix_ + "." + std::string(k);
    }

    void fail_at(const toml::node& n, std::string_view key, const std::string& what) {
        if (!error_.empty()) {
            return;
        }
        const auto& src = n.source();
        error_ = "line " + std::to_string(src.begin.line) + ": key '" + key_name(key) + "' " + what;
    }

    void str(std::string_view key, std::string& out) {
        seen_.insert(std::string(key));
        if (const auto* n = t_.get(key)) {
            if (auto v = n->value<std::string>(); v && n->is_string()) {
                out = *v;
            } else {
                fail_at(*n, key, "must be a string");
            }
        }
    }

    template <class Int>
    void integer(std::string_view key, Int& out, std::int64_t lo, std::int64_t hi) {
        seen_.insert(std::string(key));
        if (const auto* n = t_.get(key)) {
            if (!n->is_integer()) {
                fail_at(*n, key, "must be an integer");
                return;
            }
            const auto v = *n->value<std::int64_t>();
            if (v < lo || v > hi) {
                fail_at(*n, key, "must be between " + std::to_string(lo) + " and " + std::to_string(hi));
                return;
            }
            out = static_cast<Int>(v);
        }
    }

    void ms(std::string_view key, std::chrono::milliseconds& out, std::int64_t lo, std::int64_t hi) {
        std::int64_t v = out.count();
        integer(key, v, lo, hi);
        out = std::chrono::milliseconds(v);
    }

    void boolean(std::string_view key, bool& out) {
        seen_.insert(std::string(key));
        if (const auto* n = t_.get(key)) {
            if (!n->is_boolean()) {
                fail_at(*n, key, "must be true or false");
                return;
            }
            out = *n->value<bool>();
        }
    }

    void strings(std::string_view key, std::vector<std::string>& out) {
        seen_.insert(std::string(key));
        if (const auto* n = t_.get(key)) {
            const auto* arr = n->as_array();
            if (arr == nullptr) {
                fail_at(*n, key, "must be an array of strings");
                return;
            }
            out.clear();
            for (const auto& e : *arr) {
                if (!e.is_string()) {
                    fail_at(e, key, "must be an array of strings");
                    return;
                }
                out.push_back(*e.value<std::string>());
            }
        }
    }

    // A duration: integer milliseconds, or a string with a unit ("5s", "5m", "2h").
    void duration(std::string_view key, std::chrono::milliseconds& out) {
        seen_.insert(std::string(key));
        if (const auto* n = t_.get(key)) {
            if (!duration_node(*n, key, out)) {
                return;
            }
        }
    }

    bool duration_node(const toml::node& n, std::string_view key, std::chrono::milliseconds& out) {
        if (n.is_integer() && *n.value<std::int64_t>() >= 0) {
            out = std::chrono::milliseconds(*n.value<std::int64_t>());
            return true;
        }
        if (n.is_string() && parse_duration(*n.value<std::string>(), out)) {
            return true;
        }
        fail_at(n, key, "must be a duration: milliseconds, or a string such as \"500ms\", \"5s\", \"5m\", \"2h\"");
        return false;
    }

    void durations(std::string_view key, std::vector<std::chrono::milliseconds>& out) {
        seen_.insert(std::string(key));
        if (const auto* n = t_.get(key)) {
            const auto* arr = n->as_array();
            if (arr == nullptr) {
                fail_at(*n, key, "must be an array of durations");
                return;
            }
            out.clear();
            for (const auto& e : *arr) {
                std::chrono::milliseconds d{};
                if (!duration_node(e, key, d)) {
                    return;
                }
                out.push_back(d);
            }
        }
    }

    void real(std::string_view key, double& out, double lo, double hi) {
        seen_.insert(std::string(key));
        if (const auto* n = t_.get(key)) {
            if (!n->is_number()) {
                fail_at(*n, key, "must be a number");
                return;
            }
            const double v = n->is_integer() ? static_cast<double>(*n->value<std::int64_t>()) : *n->value<double>();
            if (v < lo || v > hi) {
                fail_at(*n, key, "must be between " + std::to_string(lo) + " and " + std::to_string(hi));
                return;
            }
            out = v;
        }
    }

    const toml::table* table(std::string_view key) {
        seen_.insert(std::string(key));
        if (const auto* n = t_.get(key)) {
            if (const auto* t = n->as_table()) {
                return t;
            }
            fail_at(*n, key, "must be a table ([" + key_name(key) + "])");
        }
        return nullptr;
    }

    void seen(std::string_view key) { seen_.insert(std::string(key)); }

    void check_unknown() {
        for (const auto& [k, v] : t_) {
            if (seen_.count(std::string(k.str())) == 0) {
                fail_at(v, k.str(), "is unknown");
                return;
            }
        }
    }

private:
    const toml::table& t_;
    std::string prefix_;
    std::string& error_;
    std::set<std::string> seen_;
};

}  // namespace

bool split_http_address(const std::string& address, std::string& host, int& port) {
    const auto colon = address.rfind(':');
    const auto digits = colon == std::string::npos ? std::string() : address.substr(colon + 1);
    if (colon == std::string::npos || colon == 0 || digits.empty() || digits.size() > 5 ||
        digits.find_first_not_of("0123456789") != std::string::npos || std::stoi(digits) > 65535) {
        return false;
    }
    host = address.substr(0, colon);
    if (host.size() > 2 && host.front() == '[' && host.back() == ']') {
        host = host.substr(1, host.size() - 2);
    }
    port = std::stoi(digits);
    return true;
}

bool parse_file_mode(const std::string& text, std::uint32_t& mode) {
    char* end = nullptr;
    const auto m = std::strtoul(text.c_str(), &end, 8);
    if (text.empty() || *end != '\0' || m == 0 || m > 0777) {
        return false;
    }
    mode = static_cast<std::uint32_t>(m);
    return true;
}

bool parse_duration(std::string_view text, std::chrono::milliseconds& out) {
    std::size_t i = 0;
    std::int64_t v = 0;
    while (i < text.size() && text[i] >= '0' && text[i] <= '9') {
        if (v > (INT64_MAX / 10) - 10) {
            return false;
        }
        v = v * 10 + (text[i] - '0');
        ++i;
    }
    if (i == 0) {
        return false;
    }
    const auto unit = text.substr(i);
    std::int64_t mult = 0;
    if (unit.empty() || unit == "ms") {
        mult = 1;
    } else if (unit == "s") {
        mult = 1000;
    } else if (unit == "m") {
        mult = 60'000;
    } else if (unit == "h") {
        mult = 3'600'000;
    } else if (unit == "d") {
        mult = 86'400'000;
    } else {
        return false;
    }
    if (v > INT64_MAX / mult) {
        return false;
    }
    out = std::chrono::milliseconds(v * mult);
    return true;
}

app_config default_config() {
    app_config c;
    c.node.pub_endpoints = {"tcp://127.0.0.1:7450"};
    c.node.sub_endpoints = {"tcp://127.0.0.1:7451"};
    return c;
}

namespace {
bool load_table(toml::table& root, const std::string& path, app_config& cfg, std::string& error);
}  // namespace

bool load_toml(const std::string& path, app_config& cfg, std::string& error) {
    toml::table root;
    try {
        root = toml::parse_file(path);
    } catch (const toml::parse_error& e) {
        error = path + ": line " + std::to_string(e.source().begin.line) + ": "
                + std::string(e.description());
        return false;
    }
    return load_table(root, path, cfg, error);
}

bool load_toml_text(std::string_view text, const std::string& source, app_config& cfg, std::string& error) {
    toml::table root;
    try {
        root = toml::parse(text, source);
    } catch (const toml::parse_error& e) {
        error = source + ": line " + std::to_string(e.source().begin.line) + ": "
                + std::string(e.description());
        return false;
    }
    return load_table(root, source, cfg, error);
}

namespace {
bool load_table(toml::table& root, const std::string& path, app_config& cfg, std::string& error) {
    auto& n = cfg.node;
    table_reader top(root, "", error);
    top.str("name", n.name);
    top.str("mesh", n.mesh);
    if (const auto* t = top.table("endpoints")) {
        table_reader r(*t, "endpoints", error);
        r.strings("pub", n.pub_endpoints);
        r.strings("sub", n.sub_endpoints);
        std::string mode;
        r.str("ipc_mode", mode);
        if (!mode.empty() && !parse_file_mode(mode, n.ipc_mode)) {
            r.fail_at(*t->get("ipc_mode"), "ipc_mode", "must be an octal mode such as \"0660\"");
        }
        r.str("ipc_group", n.ipc_group);
        r.check_unknown();
    }
    if (const auto* t = top.table("mesh_link")) {
        table_reader r(*t, "mesh_link", error);
        r.boolean("enabled", n.mesh_enabled);
        r.str("bind", n.mesh_bind_address);
        r.integer("port", n.mesh_port, 0, 65535);
        r.str("advertise", n.mesh_advertise_address);
        r.ms("heartbeat_interval_ms", n.heartbeat_interval, 10, 60000);
        r.ms("heartbeat_timeout_ms", n.heartbeat_timeout, 10, 600000);
        r.check_unknown();
    }
    if (const auto* t = top.table("discovery")) {
        auto& d = n.discovery;
        table_reader r(*t, "discovery", error);
        r.boolean("enabled", d.enabled);
        std::string scope = d.scope == discovery_scope::host ? "host" : "lan";
        r.str("scope", scope);
        if (scope == "host") {
            d.scope = discovery_scope::host;
        } else if (scope == "lan") {
            d.scope = discovery_scope::lan;
        } else {
            r.fail_at(*t->get("scope"), "scope", "must be \"host\" or \"lan\" (got \"" + scope + "\")");
        }
        r.integer("port", d.port, 1, 65535);
        r.ms("interval_ms", d.interval, 10, 60000);
        r.integer("missed_beacons", d.missed_beacons, 1, 1000);
        r.str("broadcast_address", d.broadcast_address);
        r.str("interface_address", d.interface_address);
        r.strings("seeds", d.seeds);
        r.boolean("broadcast", d.broadcast);
        r.boolean("ipv6", d.ipv6);
        r.integer("max_peers", d.max_peers, 1, 1'000'000);
        r.integer("joins_per_second", d.joins_per_second, 1, 1'000'000);
        r.check_unknown();
    }
    if (const auto* t = top.table("flow")) {
        table_reader r(*t, "flow", error);
        r.integer("hwm", n.hwm, 1, 10'000'000);
        std::string policy = n.slow_subscriber == overflow_policy::drop ? "drop" : "block";
        r.str("slow_subscriber", policy);
        if (policy == "drop") {
            n.slow_subscriber = overflow_policy::drop;
        } else if (policy == "block") {
            n.slow_subscriber = overflow_policy::block;
        } else {
            r.fail_at(*t->get("slow_subscriber"), "slow_subscriber",
                      "must be \"drop\" or \"block\" (got \"" + policy + "\")");
        }
        r.integer("max_event_bytes", n.max_event_bytes, 64, 256 * 1024 * 1024);
        r.ms("linger_ms", n.linger, 0, 60000);
        r.ms("stats_interval_ms", n.stats_interval, 0, 3600000);
        r.integer("max_subscriptions", n.max_subscriptions, 1, 100'000'000);
        r.ms("call_timeout_ms", n.call_timeout, 10, 600000);
        r.check_unknown();
    }
    if (const auto* t = top.table("repair")) {
        auto& rp = n.repair;
        table_reader r(*t, "repair", error);
        r.strings("patterns", rp.patterns);
        for (const auto& p : rp.patterns) {
            if (!topic_pattern::parse(p) && error.empty()) {
                error = "key 'repair.patterns': '" + p + "' is not a valid topic pattern";
            }
        }
        r.integer("window_bytes", rp.window_bytes, 1024, std::int64_t{1} << 40);
        r.ms("window_age_ms", rp.window_age, 10, 86'400'000);
        r.ms("nak_interval_ms", rp.nak_interval, 1, 60000);
        r.integer("nak_retries", rp.nak_retries, 1, 100000);
        r.ms("heartbeat_ms", rp.heartbeat, 1, 60000);
        r.integer("max_held", rp.max_held, 1, 100'000'000);
        r.check_unknown();
    }
    if (const auto* t = top.table("security")) {
        table_reader r(*t, "security", error);
        r.boolean("enabled", n.security.enabled);
        r.str("key_file", cfg.key_file);
        r.str("mesh_secret_file", cfg.mesh_secret_file);
        r.str("allow_file", n.security.allow_file);
        r.strings("allowed_keys", n.security.allowed_keys);
        r.check_unknown();
    }
    if (const auto* t = top.table("log")) {
        table_reader r(*t, "log", error);
        r.str("level", cfg.log_level);
        r.str("format", cfg.log_format);
        r.check_unknown();
    }
    if (const auto* t = top.table("outbox")) {
        table_reader r(*t, "outbox", error);
        auto& o = cfg.channels;
        r.str("path", o.outbox_path);
        std::string sync = o.synchronous_full ? "full" : "normal";
        r.str("synchronous", sync);
        if (sync != "normal" && sync != "full" && error.empty()) {
            error = "key 'outbox.synchronous' must be \"normal\" or \"full\"";
        }
        o.synchronous_full = sync == "full";
        r.duration("dedupe_window", o.dedupe_window);
        r.integer("log_keep", o.log_keep, 0, 100'000'000);
        r.integer("hold_events", o.hold_events, 0, 65'536);  // the intake queue's bound
        r.strings("plugin_dirs", o.plugin_dirs);
        r.check_unknown();
    }
    top.seen("channel");
    if (const auto* node = root.get("channel"); node != nullptr && error.empty()) {
        const auto* arr = node->as_array();
        if (arr == nullptr || !arr->is_array_of_tables()) {
            error = "line " + std::to_string(node->source().begin.line) + ": 'channel' must be an array of tables ([[channel]])";
        } else {
            for (const auto& e : *arr) {
                const auto& t = *e.as_table();
                channels::channel_config c;
                table_reader r(t, "channel", error);
                r.str("name", c.name);
                const std::string prefix = "channel '" + c.name + "'";
                r.str("plugin", c.plugin);
                r.strings("topics", c.topics);
                r.integer("concurrency", c.concurrency, 1, 256);
                if (const auto* rt = r.table("retry")) {
                    table_reader rr(*rt, "channel.retry", error);
                    rr.durations("schedule", c.retry.schedule);
                    std::chrono::milliseconds initial{0}, max_delay{3'600'000};
                    double factor = 2.0;
                    int attempts = 0;
                    rr.duration("initial", initial);
                    rr.duration("max_delay", max_delay);
                    rr.real("multiplier", factor, 1.0, 100.0);
                    rr.integer("attempts", attempts, 1, 100);
                    if (attempts > 0) {
                        if (rt->get("schedule") != nullptr && error.empty()) {
                            error = prefix + ": give either retry.schedule or retry.attempts (exponential), not both";
                        }
                        if (initial.count() == 0) {
                            initial = std::chrono::milliseconds(1000);
                        }
                        c.retry.schedule = channels::exponential_schedule(initial, factor, max_delay, attempts);
                    }
                    rr.real("jitter", c.retry.jitter, 0.0, 1.0);
                    rr.duration("max_retry_after", c.retry.max_retry_after);
                    rr.check_unknown();
                }
                if (const auto* bt = r.table("breaker")) {
                    table_reader br(*bt, "channel.breaker", error);
                    br.integer("failures", c.breaker.failures, 0, 1000000);
                    br.duration("pause", c.breaker.pause);
                    br.duration("max_pause", c.breaker.max_pause);
                    br.check_unknown();
                }
                if (const auto* st = r.table("settings")) {
                    std::ostringstream os;
                    os << toml::json_formatter{*st};
                    c.settings_json = os.str();
                }
                r.check_unknown();
                if (error.empty() && c.name.empty()) {
                    error = "line " + std::to_string(t.source().begin.line) + ": [[channel]] needs a name";
                }
                if (!error.empty()) {
                    break;
                }
                cfg.channels.channels.push_back(std::move(c));
            }
        }
    }
    top.seen("source");
    if (const auto* node = root.get("source"); node != nullptr && error.empty()) {
        const auto* arr = node->as_array();
        if (arr == nullptr || !arr->is_array_of_tables()) {
            error = "line " + std::to_string(node->source().begin.line) + ": 'source' must be an array of tables ([[source]])";
        } else {
            for (const auto& e : *arr) {
                source_config s;
                table_reader r(*e.as_table(), "source", error);
                r.str("name", s.name);
                r.str("type", s.type);
                r.str("url", s.url);
                r.str("username", s.username);
                r.str("password", s.password);
                r.str("topic", s.topic);
                r.str("dead_letter", s.dead_letter);
                r.boolean("wait_for_subscribers", s.wait_for_subscribers);
                r.duration("ack_delay", s.ack_delay);
                r.str("subscribe", s.subscribe);
                r.integer("qos", s.qos, 1, 2);
                r.str("client_id", s.client_id);
                r.duration("session_expiry", s.session_expiry);
                r.str("stream", s.stream);
                r.str("group", s.group);
                r.str("consumer", s.consumer);
                r.str("field", s.field);
                r.integer("batch", s.batch, 1, 10000);
                r.duration("claim_idle", s.claim_idle);
                r.str("subject", s.subject);
                r.boolean("jetstream", s.jetstream);
                r.str("durable", s.durable);
                r.duration("ack_wait", s.ack_wait);
                r.str("queue", s.queue);
                r.strings("topics", s.topics);
                if (const auto* props = r.table("properties")) {
                    for (const auto& [k, v] : *props) {
                        if (!v.is_string()) {
                            r.fail_at(v, "properties." + std::string(k.str()), "must be a string");
                            break;
                        }
                        s.properties.emplace_back(std::string(k.str()), *v.value<std::string>());
                    }
                }
                r.check_unknown();
                if (!error.empty()) {
                    break;
                }
                cfg.sources.push_back(std::move(s));
            }
        }
    }
    top.seen("history");
    if (const auto* node = root.get("history"); node != nullptr && error.empty()) {
        const auto* arr = node->as_array();
        if (arr == nullptr || !arr->is_array_of_tables()) {
            error = "line " + std::to_string(node->source().begin.line) + ": 'history' must be an array of tables ([[history]])";
        } else {
            for (const auto& e : *arr) {
                history_options h;
                table_reader r(*e.as_table(), "history", error);
                r.str("name", h.name);
                r.strings("patterns", h.patterns);
                r.str("dir", h.dir);
                r.integer("max_bytes", h.max_bytes, 1 << 20, std::int64_t{1} << 50);
                std::chrono::milliseconds age{0}, fsync{0};
                r.duration("max_age", age);
                r.integer("max_events", h.max_events, 0, std::int64_t{1} << 50);
                r.integer("segment_bytes", h.segment_bytes, 0, std::int64_t{1} << 40);
                r.duration("fsync_interval", fsync);
                r.integer("hwm", h.hwm, 1, 10'000'000);
                r.check_unknown();
                h.max_age = std::chrono::duration_cast<std::chrono::seconds>(age);
                h.fsync_interval = fsync;
                const auto line = std::to_string(e.source().begin.line);
                if (error.empty() && h.name.empty()) {
                    error = "line " + line + ": [[history]] needs a name";
                }
                if (error.empty() && h.patterns.empty()) {
                    error = "line " + line + ": history '" + h.name + "': patterns must list at least one topic pattern";
                }
                for (const auto& p : h.patterns) {
                    if (error.empty() && (!topic_pattern::parse(p) || p.starts_with("_evmesh"))) {
                        error = "line " + line + ": history '" + h.name + "': '" + p + "' is not a valid topic pattern";
                    }
                }
                if (error.empty() && h.dir.empty()) {
                    error = "line " + line + ": history '" + h.name + "': dir is required (where its segment files go)";
                }
                if (error.empty() && h.segment_bytes != 0 && (h.segment_bytes < 4096 || h.segment_bytes > h.max_bytes)) {
                    error = "line " + line + ": history '" + h.name + "': segment_bytes must be within [4096, max_bytes]";
                }
                if (!error.empty()) {
                    break;
                }
                n.history.push_back(std::move(h));
            }
        }
    }
    if (const auto* t = top.table("api")) {
        // the listener's keys are the run.http* ones under shorter names
        table_reader r(*t, "api", error);
        auto& a = cfg.api;
        r.str("listen", cfg.http_address);
        r.str("cert_file", cfg.http_cert_file);
        r.str("key_file", cfg.http_key_file);
        r.boolean("insecure", cfg.http_insecure);
        r.boolean("publish", cfg.http_publish);
        r.integer("max_body_bytes", cfg.http_max_body_bytes, 1024, 256 * 1024 * 1024);
        r.strings("allowed_origins", cfg.http_allowed_origins);
        r.integer("header_timeout_ms", cfg.http_header_timeout_ms, 100, 600000);
        r.integer("idle_timeout_ms", cfg.http_idle_timeout_ms, 100, 3600000);
        r.str("database", a.database);
        r.boolean("allow_private_urls", a.allow_private_urls);
        r.integer("max_in_flight", a.max_in_flight, 1, 100000);
        r.integer("endpoint_concurrency", a.endpoint_concurrency, 1, 64);
        r.duration("request_timeout", a.request_timeout);
        r.duration("retention", a.retention);
        r.integer("max_endpoints", a.max_endpoints, 1, 10'000'000);
        r.boolean("streams", a.streams);
        r.boolean("dashboard", a.dashboard);
        r.integer("stream_resume_events", a.stream_resume_events, 0, 10'000'000);
        r.boolean("stream_resume_history", a.stream_resume_history);
        r.duration("stream_resume_wait", a.stream_resume_wait);
        if ((a.stream_resume_wait < std::chrono::milliseconds(10) || a.stream_resume_wait > std::chrono::minutes(1)) &&
            error.empty()) {
            error = "key 'api.stream_resume_wait' must be between 10ms and 1m";
        }
        r.integer("stream_queue_bytes", a.stream_queue_bytes, 4096, 1LL << 30);
        r.str("stream_slow", a.stream_slow);
        if (a.stream_slow != "skip" && a.stream_slow != "disconnect" && error.empty()) {
            error = "key 'api.stream_slow' must be \"skip\" or \"disconnect\"";
        }
        r.integer("stream_max_connections", a.stream_max_connections, 1, 1'000'000);
        r.duration("stream_heartbeat", a.stream_heartbeat);
        if ((a.stream_heartbeat < std::chrono::milliseconds(100) || a.stream_heartbeat > std::chrono::hours(1)) &&
            error.empty()) {
            error = "key 'api.stream_heartbeat' must be between 100ms and 1h";
        }
        if (const auto* node = t->get("ingest"); node != nullptr && error.empty()) {
            const auto* arr = node->as_array();
            if (arr == nullptr || !arr->is_array_of_tables()) {
                error = "line " + std::to_string(node->source().begin.line) +
                        ": 'api.ingest' must be an array of tables ([[api.ingest]])";
            } else {
                for (const auto& e : *arr) {
                    ingest_source src;
                    table_reader ir(*e.as_table(), "api.ingest", error);
                    ir.str("source", src.name);
                    ir.str("verify", src.verify);
                    ir.str("secret", src.secret);
                    ir.str("secret_file", src.secret_file);
                    ir.duration("tolerance", src.tolerance);
                    ir.str("topic", src.topic);
                    ir.str("id", src.id);
                    ir.check_unknown();
                    if (!error.empty()) {
                        break;
                    }
                    a.ingest.push_back(std::move(src));
                }
            }
        }
        r.seen("ingest");
        r.check_unknown();
    }
    if (const auto* t = top.table("run")) {
        table_reader r(*t, "run", error);
        r.str("pid_file", cfg.pid_file);
        r.str("ready_file", cfg.ready_file);
        r.str("http", cfg.http_address);
        r.str("http_cert_file", cfg.http_cert_file);
        r.str("http_key_file", cfg.http_key_file);
        r.boolean("http_insecure", cfg.http_insecure);
        r.boolean("http_publish", cfg.http_publish);
        r.integer("http_max_body_bytes", cfg.http_max_body_bytes, 1024, 256 * 1024 * 1024);
        r.strings("http_allowed_origins", cfg.http_allowed_origins);
        r.integer("http_header_timeout_ms", cfg.http_header_timeout_ms, 100, 600000);
        r.integer("http_idle_timeout_ms", cfg.http_idle_timeout_ms, 100, 3600000);
        r.integer("drain_ms", cfg.drain_ms, 0, 600000);
        r.check_unknown();
    }
    top.check_unknown();
    if (!error.empty()) {
        error = path + ": " + error;
        return false;
    }
    return true;
}
}  // namespace

namespace {
bool private_file(const std::string& path, const char* what, std::string& error) {
    struct stat st {};
    if (::stat(path.c_str(), &st) != 0) {
        error = std::string(what) + " '" + path + "' cannot be read";
        return false;
    }
    if ((st.st_mode & 077) != 0) {
        error = std::string(what) + " '" + path + "' is accessible by group or others: chmod 600 it";
        return false;
    }
    return true;
}
}  // namespace

bool load_security(app_config& cfg, std::string& error) {
    auto& s = cfg.node.security;
    if (!s.enabled) {
        return true;
    }
    if (cfg.key_file.empty() || cfg.mesh_secret_file.empty()) {
        error = "security is enabled: set 'security.key_file' and 'security.mesh_secret_file'";
        return false;
    }
    if (!private_file(cfg.key_file, "key file", error)
        || !private_file(cfg.mesh_secret_file, "mesh secret file", error)) {
        return false;
    }
    try {
        auto keys = toml::parse_file(cfg.key_file);
        s.public_key = keys["public"].value_or(std::string());
        s.secret_key = keys["secret"].value_or(std::string());
    } catch (const toml::parse_error& e) {
        error = "key file '" + cfg.key_file + "': " + std::string(e.description());
        return false;
    }
    std::ifstream f(cfg.mesh_secret_file);
    std::getline(f, s.mesh_secret);
    while (!s.mesh_secret.empty() && (s.mesh_secret.back() == '\r' || s.mesh_secret.back() == ' ')) {
        s.mesh_secret.pop_back();
    }
    // the checks node::create would make, here so --check-config catches them (exit 2)
    if (s.public_key.size() != 40 || s.secret_key.size() != 40) {
        error = "key file '" + cfg.key_file + "' must hold 40-character Z85 'public' and 'secret' keys";
        return false;
    }
    if (s.mesh_secret.size() < 16) {
        error = "mesh secret in '" + cfg.mesh_secret_file + "' must be at least 16 characters";
        return false;
    }
    if (!s.allow_file.empty() && ::access(s.allow_file.c_str(), R_OK) != 0) {
        error = "allow file '" + s.allow_file + "' cannot be read";
        return false;
    }
    return true;
}

bool validate(const app_config& cfg, std::string& error) {
    if (!cfg.channels.channels.empty() && cfg.channels.outbox_path.empty()) {
        error = "key 'outbox.path' is required when channels are configured (the durable outbox file)";
        return false;
    }
    auto endpoint_ok = [&](const std::string& ep, const char* key) {
        if (ep.rfind("tcp://", 0) != 0 && ep.rfind("ipc://", 0) != 0) {
            error = "endpoint '" + ep + "' (" + key + ") must start with tcp:// or ipc://";
            return false;
        }
        if (ep.rfind("tcp://", 0) == 0 && ep.rfind(':') <= 5) {
            error = "endpoint '" + ep + "' (" + key + ") needs host:port (port may be *)";
            return false;
        }
        return true;
    };
    for (const auto& ep : cfg.node.pub_endpoints) {
        if (!endpoint_ok(ep, "endpoints.pub")) {
            return false;
        }
    }
    for (const auto& ep : cfg.node.sub_endpoints) {
        if (!endpoint_ok(ep, "endpoints.sub")) {
            return false;
        }
    }
    static const std::set<std::string> levels = {"trace", "debug", "info", "warn", "error", "off"};
    if (levels.count(cfg.log_level) == 0) {
        error = "key 'log.level' must be one of trace, debug, info, warn, error, off";
        return false;
    }
    if (cfg.log_format != "text" && cfg.log_format != "json") {
        error = "key 'log.format' must be \"text\" or \"json\"";
        return false;
    }
    if (cfg.node.mesh.empty() || cfg.node.mesh.size() > 64) {
        error = "key 'mesh' must be 1 to 64 characters";
        return false;
    }
    if (!cfg.http_address.empty()) {
        std::string host;
        int port = 0;
        if (!split_http_address(cfg.http_address, host, port)) {
            error = "key 'run.http' must be host:port with a port from 0 to 65535 (got '"
                    + cfg.http_address + "')";
            return false;
        }
        if (cfg.http_cert_file.empty() != cfg.http_key_file.empty()) {
            error = "keys 'run.http_cert_file' and 'run.http_key_file' go together (TLS needs both)";
            return false;
        }
        // plain HTTP leaves the host only on purpose: the admin routes change state
        if (!is_loopback_host(host) && cfg.http_cert_file.empty() && !cfg.http_insecure) {
            error = "key 'run.http' is not a loopback address (" + host +
                    "): set run.http_cert_file and run.http_key_file for TLS, or run.http_insecure = true";
            return false;
        }
    }
    if ((!cfg.api.database.empty() || !cfg.api.ingest.empty()) && cfg.http_address.empty()) {
        error = "the API (api.database, api.ingest) needs a listener: set api.listen (or run.http)";
        return false;
    }
    std::set<std::string> sources;
    for (const auto& src : cfg.api.ingest) {
        const std::string at = "api.ingest '" + src.name + "': ";
        const bool name_ok = !src.name.empty() && src.name.size() <= 64 &&
                             src.name.find_first_not_of("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_.-") ==
                                 std::string::npos;
        if (!name_ok) {
            error = "api.ingest: 'source' must be 1 to 64 characters of [A-Za-z0-9_.-] (got '" + src.name + "')";
            return false;
        }
        if (!sources.insert(src.name).second) {
            error = at + "defined twice";
            return false;
        }
        if (src.verify != "none" && src.verify != "standard-webhooks" && src.verify != "github" && src.verify != "stripe") {
            error = at + "verify must be standard-webhooks, github, stripe or none (got '" + src.verify + "')";
            return false;
        }
        if (src.verify != "none" && src.secret.empty() && src.secret_file.empty()) {
            error = at + "verify = \"" + src.verify + "\" needs secret or secret_file";
            return false;
        }
        if (src.topic.empty()) {
            error = at + "topic is required (a template such as \"github.{header.x-github-event}\")";
            return false;
        }
    }
    if (!validate_sources(cfg.sources, error)) {
        return false;
    }
    const auto& d = cfg.node.discovery;
    if (d.enabled && d.scope == discovery_scope::lan && d.broadcast
        && d.broadcast_address.rfind("127.", 0) == 0) {
        error = "key 'discovery.broadcast_address' must be the LAN's broadcast address with scope "
                "lan (e.g. 192.168.1.255), or set discovery.broadcast = false and use seeds";
        return false;
    }
    return true;
}

}  // namespace evmesh::app
