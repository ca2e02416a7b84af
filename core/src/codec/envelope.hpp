// Internal codec helpers used by the node.
#pragma once

#include <cstring>
#include <string>
#include <string_view>

#include <evmesh/codec.hpp>

namespace evmesh::codec {

// Encodes `v` (whose headers are raw validated msgpack) with the given filled-in fields.
void encode_completed(const event_view& v, std::string& out);

// Reads source and time from an envelope without decoding the rest (for counting and latency
// sampling on the node). False when the bytes do not start like a v1 envelope.
bool peek_source_time(std::string_view body, std::string_view& source, std::int64_t& time_ns) noexcept;

// Reads source, time and seq (the stream key and position) without decoding the rest.
bool peek_stream(std::string_view body, std::string_view& source, std::int64_t& time_ns,
                 std::uint64_t& seq) noexcept;

// Mesh framing (mesh protocol 2, PROTOCOL.md section 8.4): one ZeroMQ frame per event,
// `topic` + 0x00 + `body`. A topic never holds a byte <= 0x20, so the first 0x00 ends it, and
// the frame still starts with the topic, so ZeroMQ's prefix subscriptions keep working. One
// frame means no message can ever be torn between frames on a mesh link.
inline constexpr std::size_t max_mesh_topic = 255;

// Splits a mesh frame; false when it holds no 0x00 within the first max_mesh_topic + 1 bytes.
inline bool split_mesh_frame(std::string_view frame, std::string_view& topic,
                             std::string_view& body) noexcept {
    const auto limit = frame.size() < max_mesh_topic + 1 ? frame.size() : max_mesh_topic + 1;
    const void* nul = std::memchr(frame.data(), 0, limit);
    if (nul == nullptr) {
        return false;
    }
    const auto n = static_cast<std::size_t>(static_cast<const char*>(nul) - frame.data());
    topic = frame.substr(0, n);
    body = frame.substr(n + 1);
    return true;
}

// Control messages on mesh links (stream heartbeats of the repair protocol) are bodies that are
// a msgpack array whose element 0 is 0; an event body's element 0 is its version (>= 1).
inline bool is_control_body(std::string_view body) noexcept {
    return body.size() >= 2 && static_cast<std::uint8_t>(body[0]) >= 0x91
           && static_cast<std::uint8_t>(body[0]) <= 0x9f && body[1] == 0;
}

}  // namespace evmesh::codec
