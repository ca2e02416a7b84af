// A bounds-checked, allocation-free msgpack reader for the few shapes evmesh decodes from
// untrusted bytes (event envelope, beacon). msgpack-cxx's unpack allocates a zone per message
// and its visitor parser a stack; this reader allocates nothing, so the decode cost at the
// edges stays flat. Differential tests check it against msgpack-cxx.
#pragma once

#include <cstdint>
#include <cstring>
#include <string_view>

#include <evmesh/error.hpp>

namespace evmesh::codec {

#define EVMESH_INLINE [[gnu::always_inline]] inline

class msgpack_reader {
public:
    explicit msgpack_reader(std::string_view bytes) noexcept
        : p_(reinterpret_cast<const std::uint8_t*>(bytes.data())), end_(p_ + bytes.size()) {}

    bool at_end() const noexcept { return p_ == end_; }
    std::size_t remaining() const noexcept { return static_cast<std::size_t>(end_ - p_); }
    const char* position() const noexcept { return reinterpret_cast<const char*>(p_); }

    // Each read returns errc::ok or an error and leaves the reader unchanged on wrong_type.
    EVMESH_INLINE errc peek(std::uint8_t& b) const noexcept {
        if (p_ == end_) {
            return errc::truncated;
        }
        b = *p_;
        return errc::ok;
    }

    EVMESH_INLINE bool next_is_nil() const noexcept { return p_ != end_ && *p_ == 0xc0; }

    EVMESH_INLINE errc read_nil() noexcept {
        if (!next_is_nil()) {
            return p_ == end_ ? errc::truncated : errc::wrong_type;
        }
        ++p_;
        return errc::ok;
    }

    EVMESH_INLINE errc read_array_header(std::uint32_t& n) noexcept {
        return read_container(n, 0x90, 0xdc, 0xdd);
    }

    EVMESH_INLINE errc read_map_header(std::uint32_t& n) noexcept {
        return read_container(n, 0x80, 0xde, 0xdf);
    }

    EVMESH_INLINE errc read_uint(std::uint64_t& v) noexcept {
        std::uint8_t b = 0;
        if (auto e = peek(b); e != errc::ok) {
            return e;
        }
        if (b <= 0x7f) {
            v = b;
            ++p_;
            return errc::ok;
        }
        switch (b) {
            case 0xcc: return read_be(v, 1);
            case 0xcd: return read_be(v, 2);
            case 0xce: return read_be(v, 4);
            case 0xcf: return read_be(v, 8);
            default: break;
        }
        // non-negative values written with an int type are accepted too
        if (b == 0xd0 || b == 0xd1 || b == 0xd2 || b == 0xd3) {
            std::int64_t s = 0;
            auto save = p_;
            if (auto e = read_int(s); e != errc::ok) {
                return e;
            }
            if (s < 0) {
                p_ = save;
                return errc::wrong_type;
            }
            v = static_cast<std::uint64_t>(s);
            return errc::ok;
        }
        return errc::wrong_type;
    }

    EVMESH_INLINE errc read_int(std::int64_t& v) noexcept {
        std::uint8_t b = 0;
        if (auto e = peek(b); e != errc::ok) {
            return e;
        }
        if (b <= 0x7f) {
            v = b;
            ++p_;
            return errc::ok;
        }
        if (b >= 0xe0) {
            v = static_cast<std::int8_t>(b);
            ++p_;
            return errc::ok;
        }
        std::uint64_t u = 0;
        int width = 0;
        bool is_signed = false;
        switch (b) {
            case 0xcc: width = 1; break;
            case 0xcd: width = 2; break;
            case 0xce: width = 4; break;
            case 0xcf: width = 8; break;
            case 0xd0: width = 1; is_signed = true; break;
            case 0xd1: width = 2; is_signed = true; break;
            case 0xd2: width = 4; is_signed = true; break;
            case 0xd3: width = 8; is_signed = true; break;
            default: return errc::wrong_type;
        }
        auto save = p_;
        if (auto e = read_be(u, width); e != errc::ok) {
            return e;
        }
        if (!is_signed) {
            if (u > static_cast<std::uint64_t>(INT64_MAX)) {
                p_ = save;
                return errc::too_large;
            }
            v = static_cast<std::int64_t>(u);
        } else {
            // sign-extend from width bytes
            const int shift = 64 - 8 * width;
            v = static_cast<std::int64_t>(u << shift) >> shift;
        }
        return errc::ok;
    }

    // str family only.
    EVMESH_INLINE errc read_str(std::string_view& s, std::size_t max_len) noexcept {
        std::uint8_t b = 0;
        if (auto e = peek(b); e != errc::ok) {
            return e;
        }
        std::uint64_t len = 0;
        int width = 0;
        if ((b & 0xe0) == 0xa0) {
            len = b & 0x1f;
        } else if (b == 0xd9) {
            width = 1;
        } else if (b == 0xda) {
            width = 2;
        } else if (b == 0xdb) {
            width = 4;
        } else {
            return errc::wrong_type;
        }
        return read_body(s, len, width, max_len);
    }

    // bin family only.
    EVMESH_INLINE errc read_bin(std::string_view& s, std::size_t max_len) noexcept {
        std::uint8_t b = 0;
        if (auto e = peek(b); e != errc::ok) {
            return e;
        }
        int width = 0;
        switch (b) {
            case 0xc4: width = 1; break;
            case 0xc5: width = 2; break;
            case 0xc6: width = 4; break;
            default: return errc::wrong_type;
        }
        return read_body(s, 0, width, max_len);
    }

    // Skips one value of any type whose nesting depth is at most `depth`, else too_large. The
    // depth counts arrays and maps only, the value itself included: a scalar is 0 deep, [] and
    // [1] are 1, [[1]] is 2 (PROTOCOL.md 3.4). Scalars cost no depth, so "16 levels" admits 16
    // nested arrays whatever they hold.
    errc skip(int depth) noexcept {
        std::uint8_t b = 0;
        if (auto e = peek(b); e != errc::ok) {
            return e;
        }
        if (b <= 0x7f || b >= 0xe0 || b == 0xc0 || b == 0xc2 || b == 0xc3) {
            ++p_;
            return errc::ok;
        }
        if ((b & 0xf0) == 0x90 || b == 0xdc || b == 0xdd || (b & 0xf0) == 0x80 || b == 0xde
            || b == 0xdf) {
            if (depth <= 0) {
                return errc::too_large;
            }
            const bool is_map = (b & 0xf0) == 0x80 || b == 0xde || b == 0xdf;
            std::uint32_t n = 0;
            auto e = is_map ? read_map_header(n) : read_array_header(n);
            if (e != errc::ok) {
                return e;
            }
            const std::uint64_t items = is_map ? 2ULL * n : n;
            // every item takes at least one byte: refuse counts the input cannot hold
            if (items > remaining()) {
                return errc::truncated;
            }
            for (std::uint64_t i = 0; i < items; ++i) {
                if (auto e2 = skip(depth - 1); e2 != errc::ok) {
                    return e2;
                }
            }
            return errc::ok;
        }
        std::size_t fixed = 0;
        switch (b) {
            case 0xcc: case 0xd0: fixed = 1; break;
            case 0xcd: case 0xd1: fixed = 2; break;
            case 0xce: case 0xd2: case 0xca: fixed = 4; break;
            case 0xcf: case 0xd3: case 0xcb: fixed = 8; break;
            case 0xd4: fixed = 2; break;
            case 0xd5: fixed = 3; break;
            case 0xd6: fixed = 5; break;
            case 0xd7: fixed = 9; break;
            case 0xd8: fixed = 17; break;
            default: break;
        }
        if (fixed != 0) {
            return advance(1 + fixed);
        }
        std::string_view ignored;
        if ((b & 0xe0) == 0xa0 || b == 0xd9 || b == 0xda || b == 0xdb) {
            return read_str(ignored, remaining());
        }
        if (b == 0xc4 || b == 0xc5 || b == 0xc6) {
            return read_bin(ignored, remaining());
        }
        if (b == 0xc7 || b == 0xc8 || b == 0xc9) {  // ext 8/16/32: len, type, data
            const int width = b == 0xc7 ? 1 : (b == 0xc8 ? 2 : 4);
            std::uint64_t len = 0;
            auto save = p_;
            if (auto e = read_be(len, width); e != errc::ok) {
                return e;
            }
            if (auto e = advance(1 + len); e != errc::ok) {
                p_ = save;
                return e;
            }
            return errc::ok;
        }
        return errc::wrong_type;  // 0xc1 is never used
    }

private:
    errc advance(std::uint64_t n) noexcept {
        if (n > remaining()) {
            return errc::truncated;
        }
        p_ += n;
        return errc::ok;
    }

    // Reads the marker byte plus a `width`-byte big-endian integer.
    EVMESH_INLINE errc read_be(std::uint64_t& v, int width) noexcept {
        if (static_cast<std::size_t>(width) + 1 > remaining()) {
            return errc::truncated;
        }
        std::uint64_t r = 0;
        for (int i = 1; i <= width; ++i) {
            r = (r << 8) | p_[i];
        }
        v = r;
        p_ += 1 + width;
        return errc::ok;
    }

    EVMESH_INLINE errc read_container(std::uint32_t& n, std::uint8_t fix, std::uint8_t m16, std::uint8_t m32) {
        std::uint8_t b = 0;
        if (auto e = peek(b); e != errc::ok) {
            return e;
        }
        std::uint64_t v = 0;
        if ((b & 0xf0) == fix) {
            v = b & 0x0f;
            ++p_;
        } else if (b == m16) {
            if (auto e = read_be(v, 2); e != errc::ok) {
                return e;
            }
        } else if (b == m32) {
            if (auto e = read_be(v, 4); e != errc::ok) {
                return e;
            }
        } else {
            return errc::wrong_type;
        }
        n = static_cast<std::uint32_t>(v);
        return errc::ok;
    }

    EVMESH_INLINE errc read_body(std::string_view& s, std::uint64_t len, int width, std::size_t max_len) {
        auto save = p_;
        if (width == 0) {
            ++p_;
        } else if (auto e = read_be(len, width); e != errc::ok) {
            return e;
        }
        if (len > max_len) {
            p_ = save;
            return errc::too_large;
        }
        if (len > remaining()) {
            p_ = save;
            return errc::truncated;
        }
        s = std::string_view(reinterpret_cast<const char*>(p_), static_cast<std::size_t>(len));
        p_ += len;
        return errc::ok;
    }

    const std::uint8_t* p_;
    const std::uint8_t* end_;
};

#undef EVMESH_INLINE

}  // namespace evmesh::codec
