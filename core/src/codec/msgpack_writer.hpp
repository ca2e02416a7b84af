// msgpack-cxx packing into a reused std::string: the writer every encoder of the node uses
// (events, beacons, stats events, repair control frames).
#pragma once

#include <cstdint>
#include <string>
#include <string_view>

#include <msgpack.hpp>

namespace evmesh::codec {

// msgpack-cxx packer target that appends to a reused std::string (no allocation once warm).
struct string_writer {
    std::string& out;

    void write(const char* data, std::size_t n) { out.append(data, n); }
};

using string_packer = msgpack::packer<string_writer>;

inline void pack_str(string_packer& pk, std::string_view s) {
    pk.pack_str(static_cast<std::uint32_t>(s.size()));
    pk.pack_str_body(s.data(), static_cast<std::uint32_t>(s.size()));
}

}  // namespace evmesh::codec
