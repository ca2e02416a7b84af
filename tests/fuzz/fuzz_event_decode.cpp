// Fuzz target: the event decoder (strict and lenient) and the node's completion re-encoder.
// Input: [1 byte topic length][topic][msgpack body].
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <string>
#include <string_view>

#include <evmesh/codec.hpp>

#include "codec/envelope.hpp"

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
    if (size < 1) {
        return 0;
    }
    const std::size_t tlen = std::min<std::size_t>(data[0], size - 1);
    const std::string_view topic(reinterpret_cast<const char*>(data + 1), tlen);
    const std::string_view body(reinterpret_cast<const char*>(data + 1 + tlen), size - 1 - tlen);
    evmesh::decode_limits limits;
    limits.max_event_bytes = 64 * 1024;
    if (auto v = evmesh::decode_event(topic, body, limits)) {
        // whatever decodes must survive the round trip unchanged
        auto ev = v->to_event();
        std::string again;
        evmesh::encode_event_body(ev, again);
        auto v2 = evmesh::decode_event(topic, again, limits);
        if (!v2 || v2->to_event() != ev) {
            __builtin_trap();
        }
    }
    evmesh::missing_fields m;
    if (auto v = evmesh::decode_event_lenient(topic, body, m, limits)) {
        evmesh::event_view filled = *v;
        filled.source = "fuzz/client";
        std::string out;
        evmesh::codec::encode_completed(filled, out);
        if (!evmesh::decode_event(topic, out, limits)) {
            __builtin_trap();  // the node must never forward what it cannot decode
        }
    }
    return 0;
}
