// mesh-inspector: shared pieces of the subcommands (docs/INSPECTOR.md).
#pragma once

#include <chrono>
#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include <evmesh/node.hpp>

namespace evmesh::inspector {

using json = nlohmann::json;

// Options every subcommand shares with evmesh-node (same names, same meaning).
struct mesh_options {
    std::string mesh = "evmesh";
    int beacon_port = 19470;
    std::string scope = "host";
    std::string broadcast_address = "127.255.255.255";
    std::string interface_address;
    std::vector<std::string> seeds;
    bool no_broadcast = false;
    int wait_ms = 2500;  // how long to listen for nodes and their stats
    std::string key_file;          // secured mesh: the inspector's own key pair
    std::string mesh_secret_file;  // secured mesh: the mesh secret
    bool json = false;
};

// Exit codes: 0 ok, 1 nothing found / no answer, 2 usage.
inline constexpr int exit_ok = 0, exit_not_found = 1, exit_usage = 2;

// Writes PATH.key (key pair, mode 0600) and PATH.pub (public key). Exit code.
int run_keygen(const std::string& path);

// The inspector's own node: an observer in the mesh, no client endpoints, no stats of its own.
std::unique_ptr<node> join_mesh(const mesh_options& o);

// Latest stats event of every node, collected from `_evmesh.stats.>`.
class stats_collector {
public:
    explicit stats_collector(node& n);
    std::map<std::string, json> latest() const;  // by node id
    std::map<std::string, std::chrono::steady_clock::time_point> seen() const;

    // Waits until every non-observer peer has sent stats, or `timeout`.
    void wait_for_all(node& n, std::chrono::milliseconds timeout) const;

private:
    mutable std::mutex mu_;
    std::map<std::string, json> latest_;  // guarded by mu_
    std::map<std::string, std::chrono::steady_clock::time_point> seen_;  // guarded by mu_
    subscription sub_;
};

// msgpack bytes to JSON (bin as base64-free hex string, with limits); throws on bad input.
json msgpack_to_json(std::string_view bytes);

// An event for humans and scripts: headers and payload as JSON when msgpack or JSON, text when
// UTF-8, hex otherwise.
json event_to_json(const event_view& ev);

// Percentile (0..1) from the stats latency histogram, in microseconds (bucket upper bound).
double histogram_percentile(const json& latency_us, double q);

std::string human_duration_ms(std::uint64_t ms);
std::string human_rate(double per_second);

}  // namespace evmesh::inspector
