// mesh-inspector: watches a whole evmesh mesh from any host on it (docs/INSPECTOR.md).
#include <cstdio>

#include <CLI/CLI.hpp>
#include <spdlog/sinks/stdout_color_sinks.h>
#include <spdlog/spdlog.h>

#include "commands/commands.hpp"

int main(int argc, char** argv) {
    using namespace evmesh::inspector;
    // the library logs through "evmesh" (stderr); the inspector only wants its warnings
    spdlog::set_default_logger(spdlog::stderr_color_mt("evmesh"));
    spdlog::set_level(spdlog::level::warn);
    CLI::App app{"mesh-inspector: watch an evmesh mesh. It joins the mesh as an observer and reads "
                 "every node's stats events and beacons; no collector needed."};
    app.set_version_flag("--version", "mesh-inspector 0.1.0");
    app.require_subcommand(1);
    mesh_options o;
    auto common = [&](CLI::App* c) {
        c->add_option("--mesh", o.mesh, "mesh name [evmesh]");
        c->add_option("--beacon-port", o.beacon_port, "UDP discovery port [19470]")->check(CLI::Range(1, 65535));
        c->add_option("--scope", o.scope, "host or lan [host]")->check(CLI::IsMember({"host", "lan"}));
        c->add_option("--broadcast-address", o.broadcast_address, "scope lan: broadcast address");
        c->add_option("--interface-address", o.interface_address, "scope lan: local address");
        c->add_option("--seed", o.seeds, "ip:port of a node's beacon socket; repeatable");
        c->add_flag("--no-broadcast", o.no_broadcast, "seeds and gossip only");
        c->add_option("--wait-ms", o.wait_ms, "how long to listen for nodes [2500]")->check(CLI::Range(100, 600000));
        c->add_flag("--json", o.json, "machine-readable output");
        c->add_option("--key-file", o.key_file, "secured mesh: the inspector's key pair (keygen)");
        c->add_option("--mesh-secret-file", o.mesh_secret_file, "secured mesh: file with the mesh secret");
        c->add_flag_callback("-v,--verbose", [] { spdlog::set_level(spdlog::level::debug); },
                             "log the inspector's own node (peers joining, leaving) to stderr");
    };
    auto* nodes = app.add_subcommand("nodes", "every node: name, id, endpoints, uptime, peers, health");
    auto* topics = app.add_subcommand("topics", "topics with rates, where they are published and subscribed");
    std::string pattern, node_name, topic, payload, content_type = "text/plain";
    int count = 0, interval_ms = 100;
    double timeout_s = 0, duration_s = 0;
    std::vector<std::string> headers;
    auto* tail = app.add_subcommand("tail", "live events matching PATTERN, decoded");
    tail->add_option("pattern", pattern, "e.g. 'orders.>'")->required();
    tail->add_option("-n,--count", count, "stop after N events (exit 1 if fewer arrive in --timeout)");
    tail->add_option("--timeout", timeout_s, "stop after SECONDS (0 = until Ctrl-C)");
    auto* stats = app.add_subcommand("stats", "counters, rates, drops, gaps, latency, channels of NODE (or all)");
    stats->add_option("node", node_name, "node name or id prefix");
    auto* top = app.add_subcommand("top", "live full-screen view of nodes and topics");
    top->add_option("--duration", duration_s, "stop after SECONDS (0 = until Ctrl-C)");
    auto* graph = app.add_subcommand("graph", "the mesh as Graphviz DOT: nodes, links, event rates on edges");
    auto* ping = app.add_subcommand("ping", "round trip through the mesh to NODE");
    ping->add_option("node", node_name, "node name or id prefix")->required();
    int ping_count = 10;
    ping->add_option("-c,--count", ping_count, "probes [10]")->check(CLI::Range(1, 100000));
    ping->add_option("--interval-ms", interval_ms, "between probes [100]")->check(CLI::Range(0, 60000));
    auto* publish = app.add_subcommand("publish", "inject one event");
    publish->add_option("topic", topic)->required();
    publish->add_option("payload", payload)->required();
    publish->add_option("-H,--header", headers, "key=value; repeatable");
    publish->add_option("--content-type", content_type, "[text/plain]");
    auto* keygen = app.add_subcommand("keygen", "make a CURVE key pair: PATH.key (0600) and PATH.pub");
    std::string key_path;
    keygen->add_option("path", key_path, "e.g. keys/node-a")->required();
    for (auto* c : {nodes, topics, tail, stats, top, graph, ping, publish}) {
        common(c);
    }
    try {
        app.parse(argc, argv);
    } catch (const CLI::ParseError& e) {
        if (e.get_exit_code() == 0) {
            return app.exit(e);
        }
        std::fprintf(stderr, "mesh-inspector: %s (see --help)\n", e.what());
        return exit_usage;
    }
    try {
        if (*keygen) return run_keygen(key_path);
        if (*nodes) return run_nodes(o);
        if (*topics) return run_topics(o);
        if (*tail) return run_tail(o, pattern, count, timeout_s);
        if (*stats) return run_stats(o, node_name);
        if (*top) return run_top(o, duration_s);
        if (*graph) return run_graph(o);
        if (*ping) return run_ping(o, node_name, ping_count, interval_ms);
        if (*publish) return run_publish(o, topic, payload, headers, content_type);
    } catch (const std::exception& e) {
        std::fprintf(stderr, "mesh-inspector: %s\n", e.what());
        return exit_not_found;
    }
    return exit_usage;
}
