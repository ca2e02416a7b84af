/// @file event.hpp
/// The evmesh event: an owning `event` and a zero-copy `event_view` into a received message.
/// Thread-safety: value types; an `event_view` is valid only while the buffer it views lives.
#pragma once

#include <evmesh/export.hpp>

#include <array>
#include <cstdint>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

namespace evmesh {

/// 128-bit event id; evmesh generates UUIDv7 (time-ordered, so ids sort by creation time).
using event_id = std::array<std::uint8_t, 16>;

/// Canonical text form `xxxxxxxx-xxxx-xxxx-xxxx-xxxxxxxxxxxx` (lower-case hex).
EVMESH_API std::string to_string(const event_id& id);

/// Generates a new UUIDv7. Thread-safe (thread-local generator state).
EVMESH_API event_id new_event_id() noexcept;

/// Generates a UUIDv7 for the given time (ns since the Unix epoch).
EVMESH_API event_id new_event_id(std::int64_t time_ns) noexcept;

/// Nanoseconds since the Unix epoch, from the system clock.
EVMESH_API std::int64_t now_ns() noexcept;

/// One header: key and value, both UTF-8 strings (W3C trace context goes here).
using header = std::pair<std::string, std::string>;

/// An event that owns its data. Maps 1:1 to CloudEvents: id, source, type (= topic), time,
/// datacontenttype (= content_type), data (= payload); `seq` is the evmesh extension `seq`.
struct EVMESH_API event {
    event_id id{};                 ///< unique id; all-zero means "not set yet"
    std::string source;            ///< producer, "<node>/<publisher>"
    std::string topic;             ///< dot-separated, e.g. "orders.eu.created"
    std::int64_t time_ns = 0;      ///< creation time, ns since Unix epoch
    std::uint64_t seq = 0;         ///< per (source, topic) sequence, from 1; 0 = unsequenced
    std::string content_type;      ///< MIME type of the payload
    std::vector<header> headers;   ///< string map, kept in wire order
    std::string payload;           ///< opaque bytes

    /// Value of header `key`, or empty view when absent.
    std::string_view header_value(std::string_view key) const noexcept;

    friend bool operator==(const event&, const event&) = default;
};

/// A decoded event whose strings point into the received frames (no allocation).
/// Produced by `decode_event`; valid while those frames live.
struct EVMESH_API event_view {
    event_id id{};
    std::string_view source;
    std::string_view topic;
    std::int64_t time_ns = 0;
    std::uint64_t seq = 0;
    std::string_view content_type;
    std::string_view headers_raw;   ///< the msgpack map of headers, already validated
    std::uint32_t header_count = 0;
    std::string_view payload;

    /// Calls `fn(key, value)` for every header, in wire order.
    template <class Fn>
    void for_each_header(Fn&& fn) const;

    /// Value of header `key`, or empty view when absent.
    std::string_view header_value(std::string_view key) const noexcept;

    /// Copies into an owning event.
    event to_event() const;
};

namespace detail {
/// Reads the i-th msgpack str at `*pos` of already-validated header bytes.
EVMESH_API std::string_view next_header_string(std::string_view raw, std::size_t& pos) noexcept;
}  // namespace detail

template <class Fn>
void event_view::for_each_header(Fn&& fn) const {
    std::size_t pos = 0;
    for (std::uint32_t i = 0; i < header_count; ++i) {
        auto k = detail::next_header_string(headers_raw, pos);
        auto v = detail::next_header_string(headers_raw, pos);
        fn(k, v);
    }
}

}  // namespace evmesh
