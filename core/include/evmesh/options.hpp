/// @file options.hpp
/// Configuration of a node. Plain values; every field has a safe default.
/// Thread-safety: value types.
#pragma once

#include <chrono>
#include <cstdint>
#include <string>
#include <vector>

namespace evmesh {

/// What a socket does when a receiver cannot keep up (its high-water mark is reached).
enum class overflow_policy {
    drop,   ///< drop for the slow receiver only; receivers count the gap from sequence numbers
    block,  ///< hold the event (backpressure to the publisher); nothing is dropped
};

/// Where discovery beacons go.
enum class discovery_scope {
    host,  ///< this host only: broadcast to 127.255.255.255, accept loopback senders only
    lan,   ///< broadcast on `broadcast_address` (a LAN or namespace subnet); opt-in
};

/// UDP beacon discovery.
struct discovery_options {
    bool enabled = true;
    discovery_scope scope = discovery_scope::host;
    std::uint16_t port = 19470;                         ///< UDP port shared by the mesh
    std::chrono::milliseconds interval{800};            ///< beacon period (idle cost, see ARCHITECTURE)
    std::uint32_t missed_beacons = 3;                   ///< silent intervals before expiry
    std::string broadcast_address = "127.255.255.255";  ///< used with scope lan
    std::string interface_address;  ///< lan: local address to bind sends to (empty = any)
    /// "a.b.c.d:port" or "[v6]:port" beacon addresses contacted by unicast (scope lan)
    std::vector<std::string> seeds;
    /// Scope lan: also open IPv6 beacon sockets ([::]:port and an ephemeral one), for IPv6 seeds,
    /// gossip and peers. On automatically when a seed or `interface_address` is IPv6. Broadcast
    /// stays IPv4 (IPv6 has none): on an IPv6-only network use seeds and gossip.
    bool ipv6 = false;
    bool broadcast = true;           ///< false: seeds and gossip only (no broadcast)
    /// Peers kept at most; hellos of further nodes are refused and counted (`peers_refused`).
    std::uint32_t max_peers = 1024;
    /// New peers admitted per second (a flood of forged hellos on an unsecured mesh is refused
    /// and counted beyond it; known peers are never limited).
    std::uint32_t joins_per_second = 100;
};

/// Lossless links (docs/ARCHITECTURE.md, "Lossless links"): NAK repair per topic pattern. The
/// publishing node keeps the events of matching topics in a window (the in-memory tail of its
/// history); a subscribing node that sees a gap in a stream, at its start or after a reconnect
/// asks for the missing range and delivers in order; what has left the window is reported as
/// a gap with its range. Both sides need the pattern. Off (no patterns) keeps plain pub/sub.
struct repair_options {
    std::vector<std::string> patterns;             ///< e.g. {"orders.>"}; empty = off
    std::size_t window_bytes = 64U << 20;          ///< retransmit window, bytes of events
    std::chrono::milliseconds window_age{30000};   ///< retransmit window, age
    std::chrono::milliseconds nak_interval{100};   ///< between NAKs for one gap
    std::uint32_t nak_retries = 30;                ///< NAKs per gap before it is reported lost
    std::chrono::milliseconds heartbeat{200};      ///< stream heartbeats (tail loss detection)
    std::size_t max_held = 200000;                 ///< events held behind gaps, all streams
};

/// A durable history (docs/HISTORY.md): the events of `patterns` that reach this node (its own
/// publishers' and the mesh's), appended to segment files in `dir` off the I/O thread, kept within
/// the retention limits (whole segments are removed, oldest first), and served to replays from
/// any node of the mesh (evmesh/replay.hpp, PROTOCOL.md section 12).
struct history_options {
    std::string name;                        ///< unique per node; names it in stats and replies
    std::vector<std::string> patterns;       ///< e.g. {"orders.>"}
    std::string dir;                         ///< segment files (created if missing)
    std::uint64_t max_bytes = 1ULL << 30;    ///< retention: bytes on disk
    std::chrono::seconds max_age{0};         ///< retention: event age; 0 = none
    std::uint64_t max_events = 0;            ///< retention: events; 0 = none
    std::uint64_t segment_bytes = 0;         ///< 0 = max_bytes / 8 within [1 MiB, 64 MiB]
    /// fdatasync period; 0 = never (what was written survives a crash of the process, not of
    /// the machine)
    std::chrono::milliseconds fsync_interval{0};
    int hwm = 100000;                        ///< events queued for the writer before the policy applies
};

/// Mesh security (docs/SECURITY.md): CurveZMQ on every mesh link with an allow-list of node
/// public keys, and beacons authenticated with a mesh secret.
struct security_options {
    bool enabled = false;
    std::string public_key;   ///< this node's CURVE public key, Z85 (40 characters)
    std::string secret_key;   ///< this node's CURVE secret key, Z85
    std::string mesh_secret;  ///< shared by the mesh; beacons carry an HMAC keyed by it
    std::vector<std::string> allowed_keys;  ///< Z85 public keys of nodes allowed on the mesh
    /// File with more allowed keys (one Z85 key per line, `#` comments); re-read when it changes,
    /// so keys can be rotated without restarting the mesh.
    std::string allow_file;
    std::chrono::milliseconds beacon_max_age{30000};  ///< older (or future) beacons are replays
    /// Also trust any key announced by a beacon authenticated with the mesh secret (for
    /// mesh-inspector, which observes a mesh without being on its allow-lists' side).
    bool trust_authenticated_beacons = false;
};

/// Node configuration.
struct node_options {
    std::string name;                  ///< human name; default "<hostname>-<pid>"
    std::string mesh = "evmesh";       ///< nodes only join peers of the same mesh name
    /// Extra endpoints where client publishers connect (ipc:// or tcp://). Input arriving here
    /// is validated and completed (see PROTOCOL.md); the inproc endpoint is always bound.
    std::vector<std::string> pub_endpoints;
    /// Extra endpoints where client subscribers connect.
    std::vector<std::string> sub_endpoints;
    /// Permissions of ipc:// socket files after binding (e.g. 0660); 0 = leave the umask's.
    std::uint32_t ipc_mode = 0;
    std::string ipc_group;  ///< group that owns ipc:// socket files (empty = unchanged)
    int hwm = 10000;                   ///< per-connection high-water mark, in events
    /// Local subscribers and peers that cannot keep up: drop for them (they count the gap) or
    /// block (hold events, push back to publishers; one slow receiver slows the node).
    overflow_policy slow_subscriber = overflow_policy::drop;
    bool mesh_enabled = true;          ///< bind a mesh endpoint and connect to peers
    std::string mesh_bind_address = "127.0.0.1";  ///< address the mesh XPUB binds to
    std::uint16_t mesh_port = 0;       ///< 0 = any free port
    std::string mesh_advertise_address;  ///< address peers should connect to (empty = sender)
    std::chrono::milliseconds heartbeat_interval{500};  ///< ZMTP pings from mesh in to peers
    std::chrono::milliseconds heartbeat_timeout{1000};  ///< link declared dead after this
    std::chrono::milliseconds linger{500};              ///< bounded drain at stop
    std::uint32_t max_event_bytes = 1U << 20;           ///< larger client events are rejected
    /// Distinct subscription prefixes the node accepts from its subscribers (embedded and
    /// clients together); further ones are refused and counted (`subscriptions_refused`).
    std::uint32_t max_subscriptions = 100000;
    /// A call into the I/O thread (counters(), peers(), subscribe()) waits at most this long;
    /// a loop that does not answer in time makes `node::healthy()` false.
    std::chrono::milliseconds call_timeout{2000};
    std::uint32_t batch = 256;         ///< messages moved per socket per poll wake-up
    /// Period of the stats event on `_evmesh.stats.<node id>` (docs/PROTOCOL.md); 0 = off. It
    /// is only sent to the mesh when someone (mesh-inspector) subscribes to it.
    std::chrono::milliseconds stats_interval{1000};
    std::uint32_t stats_top_topics = 20;  ///< per-topic rates in the stats event: top N + other
    /// An observer (mesh-inspector) announces itself as such; peers list it with `observer`.
    bool observer = false;
    discovery_options discovery;
    security_options security;
    repair_options repair;
    std::vector<history_options> history;  ///< durable histories kept by this node
};

}  // namespace evmesh
