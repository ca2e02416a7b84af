// The evmesh-node daemon as a library object, so tests can drive it without a process.
#pragma once

#include <atomic>
#include <condition_variable>
#include <functional>
#include <mutex>
#include <memory>
#include <string>
#include <thread>

#include <evmesh/channels.hpp>
#include <evmesh/node.hpp>

#include "config.hpp"

namespace evmesh::app {

// Prometheus text exposition of a node's counters (docs/CONFIG.md lists the metrics).
std::string render_metrics(const node& n, double uptime_seconds);

// Prometheus text of the channels' counters and gauges (appended to /metrics).
std::string render_channel_metrics(const std::string& node_name, const std::vector<channels::channel_stats>& stats);

// JSON array of the channels' counters and gauges (GET /channels).
std::string render_channels(const std::vector<channels::channel_stats>& stats);

// JSON array of peers.
std::string render_peers(const node& n);

class node_app {
public:
    explicit node_app(app_config cfg);
    ~node_app();

    // Starts the node and the HTTP endpoint, writes the pid and ready files, prints the ready
    // line. Returns 0, or the exit code for a failed start (3) after printing one message.
    int start();

    // Graceful stop: goodbye, drain within drain_ms, close. Idempotent.
    void stop();

    // Blocks until SIGTERM/SIGINT (a second signal exits at once with 130); SIGHUP reloads.
    // Returns the exit code.
    int run_until_signal();

    // Where reload() reads the configuration (main: the config file with the flags over it).
    void set_config_source(std::function<bool(app_config&, std::string&)> source) {
        config_source_ = std::move(source);
    }

    // SIGHUP: reads the configuration again and applies what can change live (log level and
    // format, the allow-list, the channels) without losing an event; other changes are logged
    // as needing a restart. A configuration that does not validate is refused with one error
    // line and the running one kept. True when the new configuration is in effect.
    bool reload();

    node* get() { return node_.get(); }
    channels::channel_runtime* channels() { return current_channels().get(); }
    std::shared_ptr<channels::channel_runtime> current_channels() const;

private:
    void remove_files();  // pid and ready files
    bool swap_channels(const channels::runtime_options& next);
    void start_watchdog();

    app_config cfg_;
    std::function<bool(app_config&, std::string&)> config_source_;
    std::unique_ptr<node> node_;
    mutable std::mutex channels_m_;  // guards the pointer; HTTP handlers take a reference
    std::shared_ptr<channels::channel_runtime> channels_;
    std::atomic<bool> channels_down_{false};  // a reload left the configured channels stopped
    std::thread watchdog_;
    std::mutex watchdog_m_;
    std::condition_variable watchdog_cv_;
    bool watchdog_stop_ = false;
    struct http;
    std::unique_ptr<http> http_;
    struct ingest;
    std::unique_ptr<ingest> ingest_;  // POST /v1/events, /v1/ingest/<source>
    std::unique_ptr<class api> api_;  // keys, scopes, the endpoint registry (docs/API.md)
    std::unique_ptr<class stream_hub> streams_;
    std::unique_ptr<class source_set> sources_;  // [[source]]: inbound bridges (docs/BRIDGES.md)  // SSE and WebSocket (docs/STREAMS.md)
    std::chrono::steady_clock::time_point started_;
};

// Installs the spdlog default logger to stderr in text or JSON lines.
void setup_logging(const std::string& level, const std::string& format);

}  // namespace evmesh::app
