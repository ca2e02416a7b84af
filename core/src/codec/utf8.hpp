// UTF-8 well-formedness (RFC 3629: no overlong forms, no surrogates, at most U+10FFFF).
#pragma once

#include <cstdint>
#include <cstring>
#include <string_view>

namespace evmesh::codec {

inline bool valid_utf8(std::string_view s) noexcept {
    const auto* p = reinterpret_cast<const std::uint8_t*>(s.data());
    const auto* end = p + s.size();
    // ASCII fast path, eight bytes at a time (most topics, sources and content types)
    while (end - p >= 8) {
        std::uint64_t w = 0;
        std::memcpy(&w, p, 8);
        if ((w & 0x8080808080808080ULL) != 0) {
            break;
        }
        p += 8;
    }
    while (p < end) {
        const std::uint8_t c = *p;
        if (c < 0x80) {
            ++p;
            continue;
        }
        int n = 0;
        std::uint32_t cp = 0;
        if ((c & 0xe0) == 0xc0) {
            n = 1;
            cp = c & 0x1fU;
        } else if ((c & 0xf0) == 0xe0) {
            n = 2;
            cp = c & 0x0fU;
        } else if ((c & 0xf8) == 0xf0) {
            n = 3;
            cp = c & 0x07U;
        } else {
            return false;
        }
        if (end - p <= n) {
            return false;
        }
        for (int i = 1; i <= n; ++i) {
            if ((p[i] & 0xc0) != 0x80) {
                return false;
            }
            cp = (cp << 6) | (p[i] & 0x3fU);
        }
        static constexpr std::uint32_t min_cp[] = {0, 0x80, 0x800, 0x10000};
        if (cp < min_cp[n] || cp > 0x10ffff || (cp >= 0xd800 && cp <= 0xdfff)) {
            return false;
        }
        p += n + 1;
    }
    return true;
}

}  // namespace evmesh::codec
