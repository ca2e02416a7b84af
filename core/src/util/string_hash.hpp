// Transparent string hash: unordered_map<std::string, ...> lookups by string_view, no allocation.
#pragma once

#include <functional>
#include <string>
#include <string_view>

namespace evmesh::detail {

struct string_hash {
    using is_transparent = void;

    std::size_t operator()(std::string_view s) const noexcept {
        return std::hash<std::string_view>{}(s);
    }
};

// The key of a stream (source, topic) in the tables of the repair protocol and the history:
// `source` 0x00 `topic` (a topic never holds 0x00), built into a reused buffer.
inline std::string_view stream_key(std::string& buf, std::string_view source, std::string_view topic) {
    buf.assign(source);
    buf.push_back('\0');
    buf.append(topic);
    return buf;
}

}  // namespace evmesh::detail
