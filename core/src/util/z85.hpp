// Z85 (ZeroMQ's text encoding of CURVE keys) through libzmq's own functions.
#pragma once

#include <zmq.h>

#include <optional>
#include <string>
#include <string_view>

namespace evmesh::detail {

// 40 Z85 characters -> 32 bytes; empty optional when malformed.
inline std::optional<std::string> z85_key(std::string_view text) {
    if (text.size() != 40) {
        return std::nullopt;
    }
    std::string z(text);
    std::string out(32, '\0');
    if (zmq_z85_decode(reinterpret_cast<std::uint8_t*>(out.data()), z.c_str()) == nullptr) {
        return std::nullopt;
    }
    return out;
}

inline std::string z85_text(std::string_view key32) {
    char buf[41] = {};
    zmq_z85_encode(buf, reinterpret_cast<const std::uint8_t*>(key32.data()), key32.size());
    return buf;
}

}  // namespace evmesh::detail
