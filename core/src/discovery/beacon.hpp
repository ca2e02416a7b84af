// Discovery beacon: one UDP datagram, "EVMB" + msgpack array (docs/PROTOCOL.md, "Beacons").
#pragma once

#include <cstdint>
#include <string>
#include <string_view>
#include <vector>

#include <evmesh/error.hpp>
#include <evmesh/event.hpp>

namespace evmesh::discovery {

inline constexpr std::string_view beacon_magic = "EVMB";
inline constexpr std::uint8_t beacon_version = 1;
inline constexpr std::size_t max_beacon_bytes = 1400;  // fits one Ethernet frame
inline constexpr std::size_t max_gossip = 16;

enum class beacon_kind : std::uint8_t { hello = 1, goodbye = 2 };

struct beacon {
    beacon_kind kind = beacon_kind::hello;
    std::string mesh;
    event_id node_id{};
    std::string name;
    std::uint64_t incarnation = 0;
    std::string mesh_host;        // empty: use the datagram's source address
    std::uint16_t mesh_port = 0;  // 0: node has no mesh endpoint
    std::vector<std::string> gossip;  // "host:port" beacon addresses of known peers
    std::uint64_t flags = 0;          // element [9], optional: bit 0 = observer (mesh-inspector)
    // Security (elements [10]..[12], present when the mesh is secured, docs/SECURITY.md):
    std::string public_key;           // [10] CURVE public key, 32 bytes
    std::uint64_t time_ms = 0;        // [11] sender's wall clock, against replay
    std::string mac;                  // [12] HMAC-SHA256(mesh key, datagram bytes before [12])
    std::size_t signed_bytes = 0;     // decoded: length of the datagram prefix the MAC covers
};

// Derives the 32-byte beacon MAC key from the mesh secret (SHA-256).
std::string mesh_key(std::string_view mesh_secret);

// True when `b` (decoded from `datagram`) carries a valid MAC under `key`.
bool verify_beacon(const beacon& b, std::string_view datagram, const std::string& key);

inline constexpr std::uint64_t beacon_flag_observer = 1;
// Bit 1 of the flags: the node speaks mesh protocol 2 (one-frame events on mesh links,
// PROTOCOL.md 8.4). Nodes without it are older releases and are not connected to.
inline constexpr std::uint64_t beacon_flag_mesh_v2 = 2;

// Encodes `b`; with a non-empty `key` (see mesh_key) it also writes public key, time and MAC.
std::string encode_beacon(const beacon& b, const std::string& key = {});

// Errors: bad_beacon (wrong magic, size, shape or type), unsupported_version.
[[nodiscard]] result<beacon> decode_beacon(std::string_view bytes);

}  // namespace evmesh::discovery
