#include <time.h>

#include <cstring>
#include <random>

#include <evmesh/event.hpp>

#include "codec/msgpack_reader.hpp"

namespace evmesh {
namespace {

// xoshiro256** seeded once per thread: cheap enough for one id per published event.
struct rng {
    std::uint64_t s[4];

    rng() noexcept {
        std::random_device rd;
        for (auto& w : s) {
            w = (static_cast<std::uint64_t>(rd()) << 32) ^ rd();
        }
    }

    static std::uint64_t rotl(std::uint64_t x, int k) noexcept { return (x << k) | (x >> (64 - k)); }

    std::uint64_t next() noexcept {
        const std::uint64_t result = rotl(s[1] * 5, 7) * 9;
        const std::uint64_t t = s[1] << 17;
        s[2] ^= s[0];
        s[3] ^= s[1];
        s[1] ^= s[2];
        s[0] ^= s[3];
        s[2] ^= t;
        s[3] = rotl(s[3], 45);
        return result;
    }
};

}  // namespace

std::int64_t now_ns() noexcept {
    timespec ts{};
    clock_gettime(CLOCK_REALTIME, &ts);
    return static_cast<std::int64_t>(ts.tv_sec) * 1'000'000'000 + ts.tv_nsec;
}

event_id new_event_id() noexcept {
    return new_event_id(now_ns());
}

event_id new_event_id(std::int64_t time_ns) noexcept {
    // UUIDv7 (RFC 9562): 48-bit Unix ms, version 7, 12 bits of sub-millisecond time (method 3,
    // so ids from one thread sort by time), variant 0b10, 62 random bits.
    thread_local rng gen;
    const auto ns = static_cast<std::uint64_t>(time_ns);
    const std::uint64_t ms = ns / 1'000'000;
    const std::uint64_t sub = ((ns % 1'000'000) * 4096) / 1'000'000;
    const std::uint64_t rnd = gen.next();
    event_id id{};
    for (int i = 0; i < 6; ++i) {
        id[static_cast<std::size_t>(i)] = static_cast<std::uint8_t>(ms >> (40 - 8 * i));
    }
    id[6] = static_cast<std::uint8_t>(0x70 | ((sub >> 8) & 0x0f));
    id[7] = static_cast<std::uint8_t>(sub & 0xff);
    for (int i = 0; i < 8; ++i) {
        id[static_cast<std::size_t>(8 + i)] = static_cast<std::uint8_t>(rnd >> (56 - 8 * i));
    }
    id[8] = static_cast<std::uint8_t>((id[8] & 0x3f) | 0x80);
    return id;
}

std::string to_string(const event_id& id) {
    static constexpr char hex[] = "0123456789abcdef";
    std::string s;
    s.reserve(36);
    for (std::size_t i = 0; i < id.size(); ++i) {
        if (i == 4 || i == 6 || i == 8 || i == 10) {
            s.push_back('-');
        }
        s.push_back(hex[id[i] >> 4]);
        s.push_back(hex[id[i] & 0x0f]);
    }
    return s;
}

std::string_view event::header_value(std::string_view key) const noexcept {
    for (const auto& [k, v] : headers) {
        if (k == key) {
            return v;
        }
    }
    return {};
}

namespace detail {
std::string_view next_header_string(std::string_view raw, std::size_t& pos) noexcept {
    codec::msgpack_reader r(raw.substr(pos));
    std::string_view s;
    // the decoder validated these bytes already
    (void)r.read_str(s, raw.size());
    pos = static_cast<std::size_t>(r.position() - raw.data());
    return s;
}
}  // namespace detail

std::string_view event_view::header_value(std::string_view key) const noexcept {
    std::string_view found;
    bool done = false;
    for_each_header([&](std::string_view k, std::string_view v) {
        if (!done && k == key) {
            found = v;
            done = true;
        }
    });
    return found;
}

event event_view::to_event() const {
    event ev;
    ev.id = id;
    ev.source = std::string(source);
    ev.topic = std::string(topic);
    ev.time_ns = time_ns;
    ev.seq = seq;
    ev.content_type = std::string(content_type);
    ev.headers.reserve(header_count);
    for_each_header([&](std::string_view k, std::string_view v) {
        ev.headers.emplace_back(std::string(k), std::string(v));
    });
    ev.payload = std::string(payload);
    return ev;
}

}  // namespace evmesh
