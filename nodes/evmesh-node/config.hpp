// evmesh-node configuration: a TOML file (docs/CONFIG.md) overridden by command-line flags.
#pragma once

#include <chrono>
#include <cstdint>
#include <string>
#include <utility>
#include <vector>

#include <evmesh/channels.hpp>
#include <evmesh/error.hpp>
#include <evmesh/options.hpp>

namespace evmesh::app {

// A third-party webhook source: POST /v1/ingest/<name> (docs/API.md "Inbound webhooks").
struct ingest_source {
    std::string name;                 // [A-Za-z0-9_.-]{1,64}
    std::string verify = "none";      // standard-webhooks, github, stripe, none
    std::string secret;               // or secret_file
    std::string secret_file;
    std::chrono::milliseconds tolerance{5 * 60 * 1000};  // timestamp tolerance (standard-webhooks, stripe)
    std::string topic;                // template: literal text, {header.<name>}, {body.<a.b>}, {source}
    std::string id;                   // template of the event id's key; default per verify scheme
};

// [api]: the open-platform API on the node's HTTP listener (docs/API.md).
struct api_config {
    std::string database;             // SQLite file: keys, audit, apps and endpoints; empty = none
    bool allow_private_urls = false;  // endpoints may resolve to loopback/private addresses
    int max_in_flight = 1024;
    int endpoint_concurrency = 4;
    std::chrono::milliseconds request_timeout{15000};
    std::chrono::milliseconds retention{7LL * 24 * 3600 * 1000};
    std::size_t max_endpoints = 100000;
    std::vector<ingest_source> ingest;
    // live streams (docs/STREAMS.md): GET /v1/stream (SSE) and /v1/ws (WebSocket)
    bool streams = true;
    bool dashboard = true;  // GET / (docs/DASHBOARD.md); needs streams
    std::size_t stream_resume_events = 10000;
    bool stream_resume_history = true;                    // older ids: replay from the histories
    std::chrono::milliseconds stream_resume_wait{1000};   // for the histories' first answers
    std::size_t stream_queue_bytes = 1 << 20;
    std::string stream_slow = "skip";  // skip (gap notice) or disconnect
    std::size_t stream_max_connections = 20000;
    std::chrono::milliseconds stream_heartbeat{15000};  // SSE comment / WebSocket ping interval
};

// [[source]]: an inbound bridge that consumes from a broker and publishes into the mesh
// (docs/BRIDGES.md "Into the mesh"). Checked by validate(); started by node_app.
struct source_config {
    std::string name;                 // [A-Za-z0-9_.-]{1,64}
    std::string type;                 // mqtt, redis, nats, amqp, kafka
    std::string url;                  // mqtt://[user[:password]@]host[:port], redis://[[user]:password@]host[:port][/db],
                                      // kafka://host[:port][,host[:port]...]
    std::string username, password;   // over the URL's
    std::string topic;                // mesh topic template: {topic} {topic.N} {type} and literal text; "" = default
    std::string dead_letter;          // mesh topic for undecodable messages; "" = count and skip
    bool wait_for_subscribers = false; // at start, consume only once the node has a subscription
    std::chrono::milliseconds ack_delay{200};  // acks held this long after the node accepted (redis, nats, amqp)
    // mqtt
    std::string subscribe;            // topic filter, e.g. "sensors/#"
    int qos = 1;                      // 1 or 2
    std::string client_id;            // default evmesh-<node>-<source>: a stable id keeps the session
    std::chrono::milliseconds session_expiry{24LL * 3600 * 1000};
    // redis
    std::string stream, group, consumer;  // consumer default: <node>-<source>
    std::string field = "data";       // the entry field holding the payload
    int batch = 100;                  // XREADGROUP COUNT
    std::chrono::milliseconds claim_idle{60000};  // XAUTOCLAIM entries idle this long (another consumer died)
    // nats (stream: the JetStream stream, optional)
    std::string subject;              // subject (wildcards allowed), or the JetStream consumer's filter
    bool jetstream = false;           // a durable pull consumer with acks instead of a core subscription
    std::string durable;              // the durable consumer name; default from node and source names
    std::chrono::milliseconds ack_wait{30000};  // JetStream: redelivery of what was not acked (new consumers)
    // amqp (batch: the prefetch count)
    std::string queue;
    // kafka (group: the consumer group's group.id; client_id: client.id)
    std::vector<std::string> topics;  // Kafka topics (a name starting with '^' is a regex)
    std::vector<std::pair<std::string, std::string>> properties;  // librdkafka consumer configuration

    friend bool operator==(const source_config&, const source_config&) = default;
};

struct app_config {
    node_options node;
    std::string log_level = "info";   // trace, debug, info, warn, error, off
    std::string log_format = "text";  // text or json
    std::string pid_file;
    std::string ready_file;
    std::string http_address;  // "127.0.0.1:9464": /healthz, /metrics, /peers; empty = off
    std::string http_cert_file, http_key_file;  // both set: the HTTP endpoint speaks TLS
    bool http_insecure = false;
    bool http_publish = false;   // POST /v1/events (CloudEvents in)  // allow a non-loopback HTTP address without TLS
    std::size_t http_max_body_bytes = 1 << 20;  // larger request bodies: 413
    std::vector<std::string> http_allowed_origins;  // browser origins allowed to call the endpoint
    int http_header_timeout_ms = 10000;  // a request's headers must arrive within this (slowloris)
    int http_idle_timeout_ms = 60000;    // idle keep-alive connections are closed after this
    int drain_ms = 2000;       // bound on a graceful stop (SIGTERM/SIGINT)
    std::string key_file;          // [security] CURVE key pair (mesh-inspector keygen), mode 0600
    std::string mesh_secret_file;  // [security] the mesh secret, mode 0600
    channels::runtime_options channels;  // [outbox] and [[channel]]; no channels = no outbox
    api_config api;
    std::vector<source_config> sources;  // [[source]]
};

// run.http split into host (IPv6 brackets removed) and port 0..65535; false when malformed.
bool split_http_address(const std::string& address, std::string& host, int& port);

// Parses an octal file mode such as "0660" (1..0777). False when malformed.
bool parse_file_mode(const std::string& text, std::uint32_t& mode);

// Reads key_file and mesh_secret_file into cfg.node.security when security is enabled.
bool load_security(app_config& cfg, std::string& error);

// Defaults of the daemon (they differ from the library's: client endpoints on loopback tcp).
app_config default_config();

// Loads `path` over `cfg`. Errors carry one message naming the file, line and key.
bool load_toml(const std::string& path, app_config& cfg, std::string& error);

// The same for TOML text already in memory; `source` names it in messages.
bool load_toml_text(std::string_view text, const std::string& source, app_config& cfg, std::string& error);

// Parses a duration: an integer (milliseconds) or text with a unit, "250ms", "5s", "5m", "2h", "1d".
bool parse_duration(std::string_view text, std::chrono::milliseconds& out);

// Checks values that the TOML and flag parsers cannot (endpoint syntax, enums, ranges).
bool validate(const app_config& cfg, std::string& error);

}  // namespace evmesh::app
