// Inbound sources: validation, decoding, the topic template, publishing until accepted, metrics.
// The broker-specific parts are source_mqtt.cpp, source_redis.cpp, source_nats.cpp,
// source_amqp.cpp and source_kafka.cpp.
#include "source_base.hpp"

#include <set>

#include <nlohmann/json.hpp>
#include <spdlog/spdlog.h>

#include <evmesh/codec.hpp>

#include "cloudevents_http.hpp"

namespace evmesh::app {

std::optional<broker_url> parse_broker_url(const std::string& url, std::initializer_list<const char*> schemes,
                                           int default_port) {
    broker_url u;
    const auto sep = url.find("://");
    if (sep == std::string::npos) {
        return std::nullopt;
    }
    u.scheme = url.substr(0, sep);
    bool known = false;
    for (const char* s : schemes) {
        known = known || u.scheme == s;
    }
    if (!known) {
        return std::nullopt;
    }
    std::string rest = url.substr(sep + 3);
    if (const auto slash = rest.find('/'); slash != std::string::npos) {
        u.path = rest.substr(slash + 1);
        rest = rest.substr(0, slash);
    }
    if (const auto at = rest.rfind('@'); at != std::string::npos) {
        const std::string cred = rest.substr(0, at);
        rest = rest.substr(at + 1);
        const auto colon = cred.find(':');
        u.user = cred.substr(0, colon);
        if (colon != std::string::npos) {
            u.password = cred.substr(colon + 1);
        }
    }
    u.port = default_port;
    if (const auto colon = rest.rfind(':'); colon != std::string::npos && rest.find(']', colon) == std::string::npos) {
        const std::string p = rest.substr(colon + 1);
        if (p.empty() || p.size() > 5 || p.find_first_not_of("0123456789") != std::string::npos) {
            return std::nullopt;
        }
        u.port = std::stoi(p);
        if (u.port < 1 || u.port > 65535) {
            return std::nullopt;
        }
        rest = rest.substr(0, colon);
    }
    if (rest.size() > 2 && rest.front() == '[' && rest.back() == ']') {
        rest = rest.substr(1, rest.size() - 2);
    }
    if (rest.empty()) {
        return std::nullopt;
    }
    u.host = rest;
    return u;
}

std::optional<std::string> kafka_bootstrap(const std::string& url) {
    const std::string scheme = "kafka://";
    if (url.rfind(scheme, 0) != 0) {
        return std::nullopt;
    }
    std::string list = url.substr(scheme.size());
    if (!list.empty() && list.back() == '/') {
        list.pop_back();
    }
    std::string out;
    std::size_t start = 0;
    while (true) {
        const auto comma = list.find(',', start);
        const std::string one = list.substr(start, comma == std::string::npos ? std::string::npos : comma - start);
        auto u = parse_broker_url(scheme + one, {"kafka"}, 9092);
        if (!u || !u->path.empty() || one.find('@') != std::string::npos || one.find('/') != std::string::npos) {
            return std::nullopt;
        }
        if (!out.empty()) {
            out += ',';
        }
        out += (u->host.find(':') != std::string::npos ? "[" + u->host + "]" : u->host) + ":" + std::to_string(u->port);
        if (comma == std::string::npos) {
            break;
        }
        start = comma + 1;
    }
    return out;
}

// ---------------------------------------------------------------------------------------------
// The topic template

topic_template::topic_template(const std::string& text) {
    defaulted_ = text.empty();
    std::size_t i = 0;
    std::string literal;
    while (i < text.size()) {
        const char c = text[i];
        if (c == '}') {
            throw std::invalid_argument("has a lone '}' at offset " + std::to_string(i));
        }
        if (c != '{') {
            literal += c;
            ++i;
            continue;
        }
        const auto close = text.find('}', i + 1);
        if (close == std::string::npos) {
            throw std::invalid_argument("has an unclosed '{' at offset " + std::to_string(i));
        }
        if (!literal.empty()) {
            parts_.push_back({part::literal, literal, 0});
            literal.clear();
        }
        const std::string name = text.substr(i + 1, close - i - 1);
        if (name == "topic") {
            parts_.push_back({part::topic, {}, 0});
        } else if (name == "type") {
            parts_.push_back({part::type, {}, 0});
        } else if (name.rfind("topic.", 0) == 0 && name.size() > 6 && name.size() <= 9 &&
                   name.find_first_not_of("0123456789", 6) == std::string::npos) {
            parts_.push_back({part::segment, {}, static_cast<std::size_t>(std::stoul(name.substr(6)))});
        } else {
            throw std::invalid_argument("has an unknown field {" + name + "} (known: topic, topic.N, type)");
        }
        i = close + 1;
    }
    if (!literal.empty()) {
        parts_.push_back({part::literal, literal, 0});
    }
}

std::string topic_template::expand(const std::string& broker_topic, const std::string& ce_type) const {
    if (defaulted_) {
        return ce_type.empty() ? broker_topic : ce_type;
    }
    std::string out;
    for (const auto& p : parts_) {
        switch (p.kind) {
        case part::literal:
            out += p.text;
            break;
        case part::topic:
            out += broker_topic;
            break;
        case part::type:
            out += ce_type;
            break;
        case part::segment: {
            std::string_view t = broker_topic;
            bool found = true;
            for (std::size_t k = 0; k < p.index && found; ++k) {
                const auto dot = t.find('.');
                found = dot != std::string_view::npos;
                t = found ? t.substr(dot + 1) : std::string_view{};
            }
            if (found) {
                out += t.substr(0, t.find('.'));
            }
            break;
        }
        }
    }
    return out;
}

// ---------------------------------------------------------------------------------------------
// Validation

namespace {

bool valid_name(const std::string& s) {
    return !s.empty() && s.size() <= 64 &&
           s.find_first_not_of("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_.-") == std::string::npos;
}

std::string printable_ascii(std::string_view v, std::size_t max = 200) {
    std::string out;
    for (char c : v.substr(0, max)) {
        const auto u = static_cast<unsigned char>(c);
        out += (u >= 0x20 && u < 0x7f) ? c : '?';
    }
    return out;
}

std::string prometheus_label(std::string_view v) {
    std::string out;
    for (char c : v) {
        if (c == '\\' || c == '"') {
            out += '\\';
            out += c;
        } else if (c == '\n') {
            out += "\\n";
        } else {
            out += c;
        }
    }
    return out;
}

}  // namespace

bool validate_sources(const std::vector<source_config>& sources, std::string& error) {
    std::set<std::string> names;
    for (const auto& s : sources) {
        if (!valid_name(s.name)) {
            error = "[[source]]: 'name' must be 1 to 64 characters of [A-Za-z0-9_.-] (got '" + printable_ascii(s.name) + "')";
            return false;
        }
        const std::string at = "source '" + s.name + "': ";
        auto fail = [&](const std::string& what) {
            error = at + what;
            return false;
        };
        if (!names.insert(s.name).second) {
            return fail("defined twice");
        }
        try {
            topic_template t(s.topic);
        } catch (const std::invalid_argument& e) {
            return fail("topic " + std::string(e.what()));
        }
        if (!s.dead_letter.empty() && (!valid_topic(s.dead_letter) || s.dead_letter.rfind("_evmesh.", 0) == 0)) {
            return fail("dead_letter must be a mesh topic (dot-separated, no wildcards, not _evmesh.), got '" +
                        printable_ascii(s.dead_letter) + "'");
        }
        if (s.url.empty()) {
            return fail("url is required");
        }
        if (s.ack_delay > std::chrono::milliseconds(60000)) {
            return fail("ack_delay must be at most 60s");
        }
        if (s.type != "kafka" && (!s.topics.empty() || !s.properties.empty())) {
            return fail("topics and properties are kafka keys");
        }
        if (s.type == "mqtt") {
            auto u = parse_broker_url(s.url, {"mqtt", "tcp"}, 1883);
            if (!u || !u->path.empty()) {
                return fail("url must be mqtt://[user[:password]@]host[:port] (got '" + printable_ascii(s.url) + "')");
            }
            if (s.subscribe.empty()) {
                return fail("subscribe is required (an MQTT topic filter such as \"sensors/#\")");
            }
            if (!s.stream.empty() || !s.group.empty() || !s.consumer.empty() || !s.subject.empty()) {
                return fail("stream, group, consumer and subject are not mqtt keys");
            }
            if (s.qos != 1) {
                return fail("qos must be 1 (QoS 2 is not supported by the source)");
            }
            if (s.client_id.size() > 64) {
                return fail("client_id must be at most 64 characters");
            }
        } else if (s.type == "redis") {
            auto u = parse_broker_url(s.url, {"redis"}, 6379);
            if (!u || (!u->path.empty() && u->path.find_first_not_of("0123456789") != std::string::npos)) {
                return fail("url must be redis://[[user]:password@]host[:port][/db] (got '" + printable_ascii(s.url) + "')");
            }
            if (s.stream.empty()) {
                return fail("stream is required (the Redis stream key)");
            }
            if (s.group.empty()) {
                return fail("group is required (the consumer group; created at the stream's start when missing)");
            }
            if (!s.subscribe.empty() || !s.subject.empty()) {
                return fail("subscribe and subject are not redis keys; redis reads 'stream'");
            }
            if (s.field.empty()) {
                return fail("field must not be empty");
            }
        } else if (s.type == "nats") {
            auto u = parse_broker_url(s.url, {"nats"}, 4222);
            if (!u || !u->path.empty()) {
                return fail("url must be nats://[user:password@]host[:port] (got '" + printable_ascii(s.url) + "')");
            }
            if (s.subject.empty() || s.subject.find_first_of(" \t\r\n") != std::string::npos) {
                return fail("subject is required (a NATS subject, wildcards allowed, no whitespace)");
            }
            if (!s.jetstream && (!s.durable.empty() || !s.stream.empty())) {
                return fail("durable and stream need jetstream = true");
            }
            if (s.durable.find_first_of(".*> \t") != std::string::npos) {
                return fail("durable must not contain '.', '*', '>' or whitespace");
            }
            if (s.ack_wait < std::chrono::milliseconds(100)) {
                return fail("ack_wait must be at least 100ms");
            }
        } else if (s.type == "amqp") {
            auto u = parse_broker_url(s.url, {"amqp"}, 5672);
            if (!u) {
                return fail("url must be amqp://[user:password@]host[:port][/vhost] (got '" + printable_ascii(s.url) + "')");
            }
            if (s.queue.empty()) {
                return fail("queue is required (an existing queue; the source does not declare it)");
            }
            if (s.batch > 65535) {
                return fail("batch (the prefetch count) must be at most 65535");
            }
        } else if (s.type == "kafka") {
            if (!kafka_bootstrap(s.url)) {
                return fail("url must be kafka://host[:port][,host[:port]...] (got '" + printable_ascii(s.url) + "')");
            }
            if (s.topics.empty()) {
                return fail("topics is required (Kafka topic names; a name starting with '^' is a regex)");
            }
            for (const auto& t : s.topics) {
                const bool regex = !t.empty() && t.front() == '^';
                if (t.empty() || t.size() > 249 ||
                    (!regex && (t == "." || t == ".." ||
                                t.find_first_not_of("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789._-") !=
                                    std::string::npos))) {
                    return fail("topics: '" + printable_ascii(t) +
                                "' is not a Kafka topic name ([a-zA-Z0-9._-], at most 249) nor a regex starting with '^'");
                }
            }
            if (s.group.empty()) {
                return fail("group is required (the consumer group's group.id; its committed offsets are where a restarted node goes on)");
            }
            if (!s.subscribe.empty() || !s.stream.empty() || !s.consumer.empty() || !s.subject.empty() ||
                !s.durable.empty() || !s.queue.empty() || s.jetstream) {
                return fail("subscribe, stream, consumer, subject, durable, jetstream and queue are not kafka keys; kafka reads 'topics'");
            }
            if (!s.username.empty() || !s.password.empty() || s.url.find('@') != std::string::npos) {
                return fail("kafka takes no username/password; set SASL in properties (sasl.username, sasl.password, security.protocol)");
            }
            if (s.client_id.size() > 64) {
                return fail("client_id must be at most 64 characters");
            }
            for (const auto& [k, v] : s.properties) {
                if (k == "bootstrap.servers" || k == "metadata.broker.list" || k == "group.id" || k == "client.id") {
                    return fail("properties." + k + " is set by the source (url, group, client_id)");
                }
                if (k == "enable.auto.commit" || k == "enable.auto.offset.store") {
                    return fail("properties." + k +
                                " is set by the source (false: an offset is committed only after the node accepted the event)");
                }
            }
#ifdef EVMESH_HAVE_SOURCE_CLIENTS
            if (std::string why; !check_kafka_properties(s, why)) {
                return fail(why);
            }
#endif
        } else {
            return fail("type must be mqtt, redis, nats, amqp or kafka (got '" + printable_ascii(s.type) + "')");
        }
    }
    return true;
}

// ---------------------------------------------------------------------------------------------
// inbound_source

std::string default_consumer_name(const node& n, const source_config& cfg) {
    std::string id = "evmesh-" + n.name() + "-" + cfg.name;
    return id.size() > 64 ? id.substr(id.size() - 64) : id;
}

inbound_source::inbound_source(node& n, source_config cfg)
    : node_(n), cfg_(std::move(cfg)), log_name_("source '" + cfg_.name + "' (" + cfg_.type + ")"), topic_(cfg_.topic) {}

inbound_source::~inbound_source() { stop(); }

bool inbound_source::start(std::string& error) {
    auto pub = node_.make_publisher({.name = "source-" + cfg_.name, .policy = overflow_policy::block,
                                     .block_timeout = std::chrono::milliseconds(1000)});
    if (!pub) {
        error = log_name_ + ": publisher: " + pub.error().message();
        return false;
    }
    pub_.emplace(std::move(*pub));
    thread_ = std::thread([this] {
        spdlog::info("{}: started", log_name_);
        if (cfg_.wait_for_subscribers) {
            // a node without any subscriber drops what it accepts: after a restart, read nothing
            // until a client, a peer or a channel has subscribed again
            while (!stopping()) {
                const auto c = node_.counters();
                if (c.subscriptions_local + c.subscriptions_mesh > 0) {
                    break;
                }
                pause(100);
            }
            spdlog::info("{}: the node has subscribers: consuming", log_name_);
        }
        run();
        counters_.connected = false;
    });
    return true;
}

void inbound_source::stop() {
    {
        std::lock_guard lk(m_);
        stop_ = true;
    }
    cv_.notify_all();
    if (thread_.joinable()) {
        thread_.join();
    }
}

bool inbound_source::pause(std::int64_t ms) {
    std::unique_lock lk(m_);
    return !cv_.wait_for(lk, std::chrono::milliseconds(ms), [this] { return stop_.load(); });
}

bool inbound_source::backoff() {
    const auto ms = backoff_ms_;
    backoff_ms_ = std::min<std::int64_t>(backoff_ms_ * 2, 5000);
    return pause(ms);
}

void inbound_source::connected() {
    backoff_ms_ = 200;
    counters_.connected = true;
    ++counters_.connects;
    was_connected_ = true;
    // the URL without its credentials
    const auto at = cfg_.url.rfind('@');
    spdlog::info("{}: connected to {}", log_name_,
                 printable_ascii(at == std::string::npos ? cfg_.url : cfg_.url.substr(0, cfg_.url.find("://") + 3) +
                                                                          cfg_.url.substr(at + 1)));
}

void inbound_source::disconnected(const std::string& why) {
    if (counters_.connected.exchange(false) || !was_connected_) {
        // once per outage, and once while the broker has not been reachable yet
        spdlog::warn("{}: not connected: {} (retrying with backoff)", log_name_, printable_ascii(why));
        was_connected_ = true;
    }
}

bool inbound_source::publish_until_accepted(event& ev) {
    std::int64_t wait = 100;
    bool logged = false;
    while (true) {
        auto r = pub_->publish(ev);
        if (r) {
            return true;
        }
        if (r.error() != make_error_code(errc::would_block) && r.error() != make_error_code(errc::stopped)) {
            throw std::invalid_argument(r.error().message());  // never passes: undecodable
        }
        ++counters_.retried;
        if (!logged) {
            spdlog::warn("{}: the node did not accept an event ({}): not acknowledged, retrying", log_name_,
                         r.error().message());
            logged = true;
        }
        if (!pause(wait)) {
            return false;
        }
        wait = std::min<std::int64_t>(wait * 2, 2000);
    }
}

delivery inbound_source::deliver(const inbound_message& m) {
    event ev;
    std::string why;
    try {
        if (!m.undecodable.empty()) {
            throw std::invalid_argument(m.undecodable);
        }
        bool is_ce = false;
        std::vector<ce_event> out;
        ce_error err;
        auto first = m.body.find_first_not_of(" \t\r\n");
        const bool json_ce_type = m.content_type.rfind("application/cloudevents+json", 0) == 0;
        if (json_ce_type || (first != std::string::npos && m.body[first] == '{')) {
            // structured mode: a JSON object with specversion is a CloudEvent (or undecodable)
            const auto j = nlohmann::json::parse(m.body, nullptr, false);
            if (json_ce_type || (j.is_object() && j.contains("specversion"))) {
                if (!parse_cloudevents({{"content-type", "application/cloudevents+json"}}, m.body, out, err)) {
                    throw std::invalid_argument("structured CloudEvent: " + err.message);
                }
                is_ce = true;
            }
        }
        if (!is_ce && m.ce.count("id") != 0 && m.ce.count("specversion") != 0) {
            // binary mode: the attributes in the protocol's headers, the body is the data
            std::map<std::string, std::string> headers;
            for (const auto& [k, v] : m.ce) {
                headers["ce-" + k] = v;
            }
            if (!m.content_type.empty()) {
                headers["content-type"] = m.content_type;
            }
            if (!parse_cloudevents(headers, m.body, out, err)) {
                throw std::invalid_argument("binary CloudEvent: " + err.message);
            }
            is_ce = true;
        }
        if (is_ce) {
            ev = std::move(out.front().ev);
        } else {
            ev.payload = m.body;
            ev.content_type = m.content_type.empty() ? "application/octet-stream" : m.content_type;
            if (auto it = m.ce.find("id"); it != m.ce.end() && !it->second.empty()) {
                // an id without the rest of a CloudEvent: still the id of this message
                auto src = m.ce.find("source");
                ev.id = ce_event_id(src != m.ce.end() ? src->second : "evmesh:" + cfg_.type, it->second);
            } else {
                ev.id = ce_event_id("evmesh:" + cfg_.type, m.position);
            }
        }
        ev.topic = topic_.expand(m.broker_topic, is_ce ? ev.topic : std::string());
        if (!valid_topic(ev.topic, node_.limits().max_topic_bytes) || ev.topic.rfind("_evmesh.", 0) == 0) {
            throw std::invalid_argument("the mesh topic '" + printable_ascii(ev.topic) + "' is not valid");
        }
        if (!publish_until_accepted(ev)) {
            return delivery::stopping;
        }
        ++counters_.published;
        return delivery::accepted;
    } catch (const std::invalid_argument& e) {
        why = e.what();
    }
    if (cfg_.dead_letter.empty()) {
        ++counters_.undecodable;
        spdlog::warn("{}: undecodable message at {} skipped: {}", log_name_, printable_ascii(m.position), printable_ascii(why));
        return delivery::accepted;
    }
    event dl;
    dl.topic = cfg_.dead_letter;
    dl.id = ce_event_id("evmesh-dead-letter:" + cfg_.type, m.position);
    dl.payload = m.body.size() > node_.limits().max_event_bytes / 2 ? m.body.substr(0, node_.limits().max_event_bytes / 2)
                                                                   : m.body;
    dl.content_type = "application/octet-stream";
    dl.headers = {{"reason", printable_ascii(why)},
                  {"source_name", cfg_.name},
                  {"broker_topic", printable_ascii(m.broker_topic)},
                  {"position", printable_ascii(m.position)}};
    try {
        if (!publish_until_accepted(dl)) {
            return delivery::stopping;
        }
    } catch (const std::invalid_argument& e) {
        ++counters_.undecodable;  // not even the dead letter passes: counted, skipped
        spdlog::warn("{}: dead letter refused ({}), message skipped", log_name_, e.what());
        return delivery::accepted;
    }
    ++counters_.dead_lettered;
    spdlog::warn("{}: undecodable message at {} dead-lettered to {}: {}", log_name_, printable_ascii(m.position),
                 cfg_.dead_letter, printable_ascii(why));
    return delivery::accepted;
}

// ---------------------------------------------------------------------------------------------
// source_set

bool source_set::start(node& n, const std::vector<source_config>& sources, std::string& error) {
    for (const auto& cfg : sources) {
        std::unique_ptr<inbound_source> s;
#ifdef EVMESH_HAVE_SOURCE_CLIENTS
        if (cfg.type == "mqtt") {
            s = make_mqtt_source(n, cfg);
        } else if (cfg.type == "redis") {
            s = make_redis_source(n, cfg);
        } else if (cfg.type == "nats") {
            s = make_nats_source(n, cfg);
        } else if (cfg.type == "amqp") {
            s = make_amqp_source(n, cfg);
        } else if (cfg.type == "kafka") {
            s = make_kafka_source(n, cfg);
        }
#endif
        if (!s) {
            error = "source '" + cfg.name + "': type '" + cfg.type + "' is not in this build (EVMESH_BRIDGES=OFF)";
            return false;
        }
        if (!s->start(error)) {
            return false;
        }
        sources_.push_back(std::move(s));
    }
    return true;
}

void source_set::stop() {
    for (auto& s : sources_) {
        s->stop();
    }
}

source_set::source_set() = default;
source_set::~source_set() { stop(); }

std::string source_set::metrics(const std::string& node_name) const {
    std::string out;
    if (sources_.empty()) {
        return out;
    }
    auto lbl = [&](const inbound_source& s) {
        return "{node=\"" + prometheus_label(node_name) + "\",source=\"" + prometheus_label(s.config().name) +
               "\",type=\"" + s.config().type + "\"";
    };
    out += "# HELP evmesh_source_events_total Messages read from a source's broker, by outcome.\n"
           "# TYPE evmesh_source_events_total counter\n";
    for (const auto& s : sources_) {
        const auto& c = s->counters();
        const std::pair<const char*, std::uint64_t> outcomes[] = {{"published", c.published.load()},
                                                                  {"undecodable", c.undecodable.load()},
                                                                  {"dead_lettered", c.dead_lettered.load()},
                                                                  {"retried", c.retried.load()}};
        for (const auto& [name, v] : outcomes) {
            out += "evmesh_source_events_total" + lbl(*s) + ",outcome=\"" + name + "\"} " + std::to_string(v) + "\n";
        }
    }
    out += "# HELP evmesh_source_connected Whether the source is connected to its broker.\n"
           "# TYPE evmesh_source_connected gauge\n";
    for (const auto& s : sources_) {
        out += "evmesh_source_connected" + lbl(*s) + "} " + (s->counters().connected ? "1" : "0") + "\n";
    }
    out += "# HELP evmesh_source_connects_total Successful connections of a source to its broker.\n"
           "# TYPE evmesh_source_connects_total counter\n";
    for (const auto& s : sources_) {
        out += "evmesh_source_connects_total" + lbl(*s) + "} " + std::to_string(s->counters().connects.load()) + "\n";
    }
    return out;
}

}  // namespace evmesh::app
