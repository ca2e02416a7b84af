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

}  // namespace evmesh::detail
