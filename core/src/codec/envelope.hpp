// Internal codec helpers used by the node.
#pragma once

#include <string>

#include <evmesh/codec.hpp>

namespace evmesh::codec {

// Encodes `v` (whose headers are raw validated msgpack) with the given filled-in fields.
void encode_completed(const event_view& v, std::string& out);

// Reads source and time from an envelope without decoding the rest (for counting and latency
// sampling on the node). False when the bytes do not start like a v1 envelope.
bool peek_source_time(std::string_view body, std::string_view& source, std::int64_t& time_ns) noexcept;

}  // namespace evmesh::codec
