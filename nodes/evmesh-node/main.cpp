// evmesh-node: the sidecar daemon. Parses flags and the config file, then runs node_app.
#include <signal.h>

#include <cstdio>
#include <cstdlib>

#include <CLI/CLI.hpp>

#include <nlohmann/json.hpp>

#include "api_store.hpp"
#include "config.hpp"
#include "node_app.hpp"

namespace {

// evmesh-node api-key create|list|revoke: the API keys in api.database (docs/API.md). Works while
// the node runs (SQLite WAL; the node sees the change at the next request).
int api_key_command(const std::string& action, const std::string& database, const std::vector<std::string>& scopes,
                    double rate_limit, const std::string& description, const std::string& id) {
    using namespace evmesh::app;
    if (database.empty()) {
        std::fprintf(stderr, "evmesh-node: api-key needs the API database: -c CONFIG with api.database, or --database\n");
        return 2;
    }
    api_store store;
    std::string err;
    if (!store.open(database, err)) {
        std::fprintf(stderr, "evmesh-node: %s\n", err.c_str());
        return 3;
    }
    try {
        if (action == "create") {
            if (scopes.empty()) {
                std::fprintf(stderr, "evmesh-node: api-key create needs at least one --scope (admin, app:<id>, "
                                     "publish:<pattern>, ingest:<source>, subscribe:<pattern>)\n");
                return 2;
            }
            for (const auto& sc : scopes) {
                if (!valid_scope(sc, err)) {
                    std::fprintf(stderr, "evmesh-node: %s\n", err.c_str());
                    return 2;
                }
            }
            auto k = store.create_key(scopes, rate_limit, description);
            store.audit("cli", "key.create", k.info.id, "-", nlohmann::json(scopes).dump());
            // the token is shown this once; only its hash is stored
            std::printf("%s\n", nlohmann::json({{"id", k.info.id}, {"key", k.token}, {"scopes", scopes}}).dump().c_str());
        } else if (action == "list") {
            for (const auto& k : store.list_keys()) {
                std::printf("%s\n", nlohmann::json({{"id", k.id},
                                                    {"scopes", k.scopes},
                                                    {"rate_limit", k.rate_limit},
                                                    {"description", k.description},
                                                    {"created_at", rfc3339_ms(k.created_ms)},
                                                    {"revoked", k.revoked_ms != 0}})
                                         .dump()
                                         .c_str());
            }
        } else {
            if (!store.revoke_key(id)) {
                std::fprintf(stderr, "evmesh-node: no live key '%s'\n", id.c_str());
                return 1;
            }
            store.audit("cli", "key.revoke", id, "-");
            std::printf("revoked %s\n", id.c_str());
        }
    } catch (const std::exception& e) {
        std::fprintf(stderr, "evmesh-node: api database: %s\n", e.what());
        return 3;
    }
    return 0;
}

}  // namespace

int main(int argc, char** argv) {
    using namespace evmesh;
    app::app_config start_cfg = app::default_config();

    CLI::App cli{"evmesh-node: a brokerless event mesh node (sidecar). Clients publish to the pub "
                 "endpoints and subscribe on the sub endpoints with plain ZeroMQ + msgpack "
                 "(docs/PROTOCOL.md). Flags override the config file (docs/CONFIG.md)."};
    cli.set_version_flag("--version", "evmesh-node 0.1.0");
    std::string config_file, check_file;
    cli.add_option("-c,--config", config_file, "TOML config file")->check(CLI::ExistingFile);
    cli.add_option("--check-config", check_file, "validate a config file and exit (0 = valid)")
        ->check(CLI::ExistingFile);

    std::string name, mesh, mesh_bind, advertise, scope, bcast, iface, level, format, pid_file,
        ready_file, http, policy;
    std::vector<std::string> pubs, subs, seeds, repair;
    int mesh_port = 0, beacon_port = 0, interval = 0, missed = 0, hwm = 0, drain = 0, hb = 0, hb_timeout = 0,
        max_event = 0, linger = 0, stats_ms = -1;
    bool no_broadcast = false, no_discovery = false, no_mesh = false, security = false;
    std::string key_file, secret_file, allow_file, ipc_mode, ipc_group;
    std::vector<std::string> allow_keys;
    auto* o_name = cli.add_option("--name", name, "node name (default <hostname>-<pid>)");
    auto* o_mesh = cli.add_option("--mesh", mesh, "mesh name; nodes join peers of the same mesh only [evmesh]");
    auto* o_pub = cli.add_option("--pub-endpoint", pubs, "where client publishers connect; repeatable [tcp://127.0.0.1:7450]");
    auto* o_sub = cli.add_option("--sub-endpoint", subs, "where client subscribers connect; repeatable [tcp://127.0.0.1:7451]");
    auto* o_mport = cli.add_option("--mesh-port", mesh_port, "tcp port of the mesh link, 0 = any free port [0]")->check(CLI::Range(0, 65535));
    auto* o_mbind = cli.add_option("--mesh-bind", mesh_bind, "address the mesh link binds to [127.0.0.1]");
    auto* o_adv = cli.add_option("--advertise", advertise, "address peers should connect to (default: beacon source)");
    auto* o_hb = cli.add_option("--heartbeat-ms", hb, "ZMTP heartbeat interval on mesh links [500]")->check(CLI::Range(10, 60000));
    auto* o_hbt = cli.add_option("--heartbeat-timeout-ms", hb_timeout, "a silent mesh link is dead after this [1000]")->check(CLI::Range(10, 600000));
    auto* o_nomesh = cli.add_flag("--no-mesh", no_mesh, "local node only: no mesh link, no discovery");
    auto* o_bport = cli.add_option("--beacon-port", beacon_port, "UDP discovery port [19470]")->check(CLI::Range(1, 65535));
    auto* o_ivl = cli.add_option("--beacon-interval-ms", interval, "beacon interval [800]")->check(CLI::Range(10, 60000));
    auto* o_missed = cli.add_option("--missed-beacons", missed, "silent intervals before a peer expires [3]")->check(CLI::Range(1, 1000));
    auto* o_scope = cli.add_option("--scope", scope, "discovery scope: host (this host only) or lan [host]")->check(CLI::IsMember({"host", "lan"}));
    auto* o_bcast = cli.add_option("--broadcast-address", bcast, "scope lan: broadcast address to send beacons to");
    auto* o_iface = cli.add_option("--interface-address", iface, "scope lan: local address beacons are sent from");
    auto* o_seed = cli.add_option("--seed", seeds, "ip:port of a peer's beacon socket, contacted by unicast; repeatable");
    auto* o_repair = cli.add_option("--repair", repair, "topic pattern whose mesh streams are repaired (NAK, lossless links); repeatable");
    auto* o_nobc = cli.add_flag("--no-broadcast", no_broadcast, "seeds and gossip only, no broadcast");
    auto* o_nodisc = cli.add_flag("--no-discovery", no_discovery, "disable discovery");
    auto* o_hwm = cli.add_option("--hwm", hwm, "per-connection high-water mark in events [10000]")->check(CLI::Range(1, 10000000));
    auto* o_policy = cli.add_option("--slow-subscriber", policy, "drop (receivers count gaps) or block (backpressure) [drop]")->check(CLI::IsMember({"drop", "block"}));
    auto* o_maxev = cli.add_option("--max-event-bytes", max_event, "larger client events are rejected [1048576]")->check(CLI::Range(64, 256 * 1024 * 1024));
    auto* o_linger = cli.add_option("--linger-ms", linger, "at stop, time to hand over queued events [500]")->check(CLI::Range(0, 60000));
    auto* o_stats = cli.add_option("--stats-interval-ms", stats_ms, "period of the stats event for mesh-inspector, 0 = off [1000]")->check(CLI::Range(0, 3600000));
    auto* o_ipcm = cli.add_option("--ipc-mode", ipc_mode, "octal permissions of ipc:// socket files, e.g. 0660");
    auto* o_ipcg = cli.add_option("--ipc-group", ipc_group, "group owning ipc:// socket files");
    auto* o_sec = cli.add_flag("--security", security, "CurveZMQ mesh links, allow-list, authenticated beacons");
    auto* o_key = cli.add_option("--key-file", key_file, "CURVE key pair from 'mesh-inspector keygen' (mode 0600)");
    auto* o_secret = cli.add_option("--mesh-secret-file", secret_file, "file with the mesh secret (mode 0600)");
    auto* o_allow = cli.add_option("--allow-file", allow_file, "allowed public keys, one per line; re-read on change");
    auto* o_allowk = cli.add_option("--allow-key", allow_keys, "an allowed public key (Z85); repeatable");
    auto* o_level = cli.add_option("--log-level", level, "trace, debug, info, warn, error, off [info]");
    auto* o_format = cli.add_option("--log-format", format, "text or json [text]");
    auto* o_pid = cli.add_option("--pid-file", pid_file, "write the pid here; removed at exit");
    auto* o_ready = cli.add_option("--ready-file", ready_file, "write the READY JSON here once all endpoints are bound");
    auto* o_http = cli.add_option("--http", http, "serve /healthz, /metrics, /peers on host:port (port 0 = any)");
    std::string http_cert, http_key;
    bool http_insecure = false;
    auto* o_hcert = cli.add_option("--http-cert-file", http_cert, "TLS certificate chain (PEM) of the HTTP endpoint");
    auto* o_hkey = cli.add_option("--http-key-file", http_key, "TLS private key (PEM) of the HTTP endpoint");
    auto* o_hins = cli.add_flag("--http-insecure", http_insecure, "allow plain HTTP on a non-loopback address");
    bool http_publish = false;
    auto* o_hpub = cli.add_flag("--http-publish", http_publish, "accept CloudEvents on POST /v1/events");
    auto* o_drain = cli.add_option("--drain-ms", drain, "bound on a graceful stop [2000]")->check(CLI::Range(0, 600000));
    std::string outbox;
    std::vector<std::string> plugin_dirs;
    auto* o_outbox = cli.add_option("--outbox", outbox, "the channels' durable outbox (SQLite file); see [outbox]");
    auto* o_pdirs = cli.add_option("--plugin-dir", plugin_dirs, "directory searched for channel plugins; repeatable");
    auto* keys = cli.add_subcommand("api-key", "manage the API keys in api.database (docs/API.md)");
    std::string key_db, key_desc, key_id;
    std::vector<std::string> key_scopes;
    double key_rate = 0;
    keys->add_option("--database", key_db, "the API database (default: api.database of --config)");
    keys->require_subcommand(1);
    keys->fallthrough();  // -c CONFIG may come after the subcommand too
    auto* kcreate = keys->add_subcommand("create", "create a key and print it once (JSON: id, key, scopes)");
    kcreate->add_option("--scope", key_scopes, "admin, app:<id>, publish:<pattern>, ingest:<source>, subscribe:<pattern>; repeatable")
        ->required();
    kcreate->add_option("--rate-limit", key_rate, "requests per second, 0 = unlimited [0]")->check(CLI::Range(0.0, 1e6));
    kcreate->add_option("--description", key_desc, "what the key is for");
    auto* klist = keys->add_subcommand("list", "list the keys (never their secrets)");
    auto* krevoke = keys->add_subcommand("revoke", "revoke a key by id (effective at the node's next request)");
    krevoke->add_option("id", key_id, "the key's id")->required();
    for (auto* sub : {kcreate, klist, krevoke}) {
        sub->fallthrough();
    }
    try {
        cli.parse(argc, argv);
    } catch (const CLI::ParseError& e) {
        if (e.get_exit_code() == 0) {
            return cli.exit(e);  // --help, --version
        }
        std::fprintf(stderr, "evmesh-node: invalid arguments: %s (see --help)\n", e.what());
        return 2;
    }

    std::string err;
    if (*keys) {
        if (key_db.empty() && !config_file.empty()) {
            if (!app::load_toml(config_file, start_cfg, err)) {
                std::fprintf(stderr, "evmesh-node: invalid config: %s\n", err.c_str());
                return 2;
            }
            key_db = start_cfg.api.database;
        }
        const std::string action = *kcreate ? "create" : *klist ? "list" : "revoke";
        return api_key_command(action, key_db, key_scopes, key_rate, key_desc, key_id);
    }
    if (!check_file.empty()) {
        if (!app::load_toml(check_file, start_cfg, err) || !app::validate(start_cfg, err)
            || !app::load_security(start_cfg, err)
            || (!start_cfg.channels.channels.empty() && !channels::channel_runtime::check(start_cfg.channels, err))) {
            std::fprintf(stderr, "evmesh-node: invalid config: %s\n", err.c_str());
            return 2;
        }
        std::printf("%s: valid\n", check_file.c_str());
        return 0;
    }
    // The config file with the flags over it, validated: at start and again at each SIGHUP reload.
    auto build = [&](app::app_config& cfg, std::string& error) -> bool {
        cfg = app::default_config();
        if (!config_file.empty() && !app::load_toml(config_file, cfg, error)) {
            return false;
        }
        auto& n = cfg.node;
        if (*o_name) n.name = name;
        if (*o_mesh) n.mesh = mesh;
        if (*o_pub) n.pub_endpoints = pubs;
        if (*o_sub) n.sub_endpoints = subs;
        if (*o_mport) n.mesh_port = static_cast<std::uint16_t>(mesh_port);
        if (*o_mbind) n.mesh_bind_address = mesh_bind;
        if (*o_adv) n.mesh_advertise_address = advertise;
        if (*o_hb) n.heartbeat_interval = std::chrono::milliseconds(hb);
        if (*o_hbt) n.heartbeat_timeout = std::chrono::milliseconds(hb_timeout);
        if (*o_nomesh) n.mesh_enabled = false;
        if (*o_bport) n.discovery.port = static_cast<std::uint16_t>(beacon_port);
        if (*o_ivl) n.discovery.interval = std::chrono::milliseconds(interval);
        if (*o_missed) n.discovery.missed_beacons = static_cast<std::uint32_t>(missed);
        if (*o_scope) n.discovery.scope = scope == "lan" ? discovery_scope::lan : discovery_scope::host;
        if (*o_bcast) n.discovery.broadcast_address = bcast;
        if (*o_iface) n.discovery.interface_address = iface;
        if (*o_seed) n.discovery.seeds = seeds;
        if (*o_repair) n.repair.patterns = repair;
        if (*o_nobc) n.discovery.broadcast = false;
        if (*o_nodisc) n.discovery.enabled = false;
        if (*o_hwm) n.hwm = hwm;
        if (*o_policy) n.slow_subscriber = policy == "block" ? overflow_policy::block : overflow_policy::drop;
        if (*o_maxev) n.max_event_bytes = static_cast<std::uint32_t>(max_event);
        if (*o_linger) n.linger = std::chrono::milliseconds(linger);
        if (*o_stats) n.stats_interval = std::chrono::milliseconds(stats_ms);
        if (*o_ipcm && !app::parse_file_mode(ipc_mode, n.ipc_mode)) {
            error = "--ipc-mode must be octal, e.g. 0660";
            return false;
        }
        if (*o_ipcg) n.ipc_group = ipc_group;
        if (*o_sec) n.security.enabled = true;
        if (*o_key) cfg.key_file = key_file;
        if (*o_secret) cfg.mesh_secret_file = secret_file;
        if (*o_allow) n.security.allow_file = allow_file;
        if (*o_allowk) n.security.allowed_keys = allow_keys;
        if (*o_level) cfg.log_level = level;
        if (*o_format) cfg.log_format = format;
        if (*o_pid) cfg.pid_file = pid_file;
        if (*o_ready) cfg.ready_file = ready_file;
        if (*o_http) cfg.http_address = http;
        if (*o_hcert) cfg.http_cert_file = http_cert;
        if (*o_hkey) cfg.http_key_file = http_key;
        if (*o_hins) cfg.http_insecure = true;
        if (*o_hpub) cfg.http_publish = true;
        if (*o_drain) cfg.drain_ms = drain;
        if (*o_outbox) cfg.channels.outbox_path = outbox;
        if (*o_pdirs) cfg.channels.plugin_dirs = plugin_dirs;
        return app::validate(cfg, error) && app::load_security(cfg, error) &&
               (cfg.channels.channels.empty() || channels::channel_runtime::check(cfg.channels, error));
    };
    if (!build(start_cfg, err)) {
        std::fprintf(stderr, "evmesh-node: invalid config: %s\n", err.c_str());
        return 2;
    }
    app::setup_logging(start_cfg.log_level, start_cfg.log_format);

    // Every thread the node starts inherits this mask, so only sigwait() sees the signals.
    sigset_t set;
    sigemptyset(&set);
    sigaddset(&set, SIGINT);
    sigaddset(&set, SIGTERM);
    sigaddset(&set, SIGHUP);
    pthread_sigmask(SIG_BLOCK, &set, nullptr);
    signal(SIGPIPE, SIG_IGN);

    app::node_app node_app(start_cfg);
    node_app.set_config_source(build);
    if (int rc = node_app.start(); rc != 0) {
        return rc;
    }
    return node_app.run_until_signal();
}
