// The evmesh-node daemon as a library object, so tests can drive it without a process.
#pragma once

#include <atomic>
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

    // Blocks until SIGTERM/SIGINT (a second signal exits at once with 130). Returns exit code.
    int run_until_signal();

    node* get() { return node_.get(); }
    channels::channel_runtime* channels() { return channels_.get(); }

private:
    void remove_files();  // pid and ready files

    app_config cfg_;
    std::unique_ptr<node> node_;
    std::unique_ptr<channels::channel_runtime> channels_;
    struct http;
    std::unique_ptr<http> http_;
    std::chrono::steady_clock::time_point started_;
};

// Installs the spdlog default logger to stderr in text or JSON lines.
void setup_logging(const std::string& level, const std::string& format);

}  // namespace evmesh::app
