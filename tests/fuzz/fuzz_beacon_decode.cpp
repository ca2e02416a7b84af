// Fuzz target: the discovery beacon decoder (every datagram on the beacon port is untrusted).
#include <cstddef>
#include <cstdint>
#include <string_view>

#include "discovery/beacon.hpp"

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
    const std::string_view bytes(reinterpret_cast<const char*>(data), size);
    if (auto b = evmesh::discovery::decode_beacon(bytes)) {
        auto again = evmesh::discovery::decode_beacon(evmesh::discovery::encode_beacon(*b));
        if (!again || again->name != b->name || again->node_id != b->node_id
            || again->gossip != b->gossip) {
            __builtin_trap();
        }
    }
    return 0;
}
