/// @file codec.hpp
/// The wire format of docs/PROTOCOL.md: encode events, decode untrusted bytes safely.
/// Thread-safety: all functions are reentrant; no shared state.
#pragma once

#include <evmesh/export.hpp>

#include <cstddef>
#include <cstdint>
#include <string>
#include <string_view>

#include <evmesh/error.hpp>
#include <evmesh/event.hpp>

namespace evmesh {

/// Envelope version written by this build (element 0 of the msgpack array).
inline constexpr std::uint8_t wire_version = 1;

/// Bounds applied while decoding untrusted input; nothing is allocated beyond them.
struct decode_limits {
    std::size_t max_event_bytes = 1U << 20;   ///< whole msgpack body
    std::size_t max_topic_bytes = 255;        ///< topic frame
    std::size_t max_string_bytes = 1024;      ///< source, content type, each header key/value
    std::uint32_t max_headers = 64;
};

/// Which fields a decoded envelope left nil (a client may send a minimal event; see PROTOCOL.md).
struct missing_fields {
    bool id = false, source = false, time = false, seq = false;
    bool any() const noexcept { return id || source || time || seq; }
};

/// Appends the msgpack body of `ev` to `out` (topic is frame 1 and not repeated in the body).
EVMESH_API void encode_event_body(const event& ev, std::string& out);

/// Appends the body for the given fields without building an `event` (publisher hot path).
EVMESH_API void encode_event_body(const event_id& id,
                       std::string_view source,
                       std::int64_t time_ns,
                       std::uint64_t seq,
                       std::string_view content_type,
                       const std::vector<header>& headers,
                       std::string_view payload,
                       std::string& out);

/// Decodes frame 1 (topic) and frame 2 (body). Every field must be present (not nil).
/// Errors: truncated, too_large, not_an_event, unsupported_version, wrong_type, bad_id,
/// bad_topic, trailing_bytes, missing_field.
[[nodiscard]] EVMESH_API result<event_view> decode_event(std::string_view topic_frame,
                                              std::string_view body,
                                              const decode_limits& limits = {});

/// As `decode_event`, but accepts nil for id, source, time and seq and reports them in
/// `missing` (the node completes such events from clients).
[[nodiscard]] EVMESH_API result<event_view> decode_event_lenient(std::string_view topic_frame,
                                                      std::string_view body,
                                                      missing_fields& missing,
                                                      const decode_limits& limits = {});

/// True when `topic` is a valid concrete topic: 1..max bytes, non-empty dot-separated segments,
/// no space, control bytes, '*' or '>'.
EVMESH_API bool valid_topic(std::string_view topic, std::size_t max_bytes = 255) noexcept;

}  // namespace evmesh
