/// @file error.hpp
/// Error codes of the evmesh API and the `result<T>` type every fallible call returns.
/// Thread-safety: everything here is immutable or a value type; safe from any thread.
#pragma once

#include <evmesh/export.hpp>

#include <string>
#include <system_error>

#include <tl/expected.hpp>

namespace evmesh {

/// Error conditions reported by evmesh. Registered in `evmesh::category()`.
enum class errc {
    ok = 0,
    // decoding of untrusted bytes
    truncated = 1,         ///< input ends in the middle of a value
    too_large,             ///< input or one of its elements exceeds a configured limit
    not_an_event,          ///< top level is not a msgpack array of the envelope shape
    unsupported_version,   ///< envelope version this build does not speak
    wrong_type,            ///< an element has the wrong msgpack type
    bad_id,                ///< id is not 16 bytes
    bad_topic,             ///< topic is empty, too long or contains forbidden bytes
    topic_mismatch,        ///< reserved; the topic frame is authoritative
    trailing_bytes,        ///< bytes after the end of the envelope
    missing_field,         ///< a field that must be set is nil
    bad_beacon,            ///< a discovery datagram that is not a valid beacon
    bad_framing,           ///< a client message that is not exactly two frames (topic, body)
    // API usage and runtime
    bad_pattern = 100,     ///< subscription pattern is malformed
    bad_option,            ///< an option value is out of range or inconsistent
    bad_endpoint,          ///< an endpoint string cannot be bound or connected
    would_block,           ///< send refused by the high-water mark (drop policy); counted
    stopped,               ///< the node is stopped
    io_error,              ///< a socket or system call failed
};

/// The error category of `errc`.
EVMESH_API const std::error_category& category() noexcept;

/// The code's name as docs/PROTOCOL.md spells it, e.g. "bad_topic": stable, so counters and
/// other programs can key on it (`message()` is prose for people and may change).
EVMESH_API const char* to_string(errc e) noexcept;

/// Makes `errc` usable as `std::error_code`.
inline std::error_code make_error_code(errc e) noexcept {
    return {static_cast<int>(e), category()};
}

/// Detail of the last error set by `node::create` on this thread (for example which endpoint
/// could not be bound and why). Empty when none. Thread-safety: thread-local.
EVMESH_API const std::string& last_error_message() noexcept;

namespace detail {
EVMESH_API void set_last_error_message(std::string text);
}  // namespace detail

/// Result of a fallible call: a value or an error code.
template <class T>
using result = tl::expected<T, std::error_code>;

/// Shorthand for returning an error from a function that returns `result<T>`.
inline tl::unexpected<std::error_code> fail(errc e) noexcept {
    return tl::unexpected<std::error_code>(make_error_code(e));
}

}  // namespace evmesh

template <>
struct std::is_error_code_enum<evmesh::errc> : std::true_type {};
