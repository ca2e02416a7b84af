// Internal codec helpers used by the node.
#pragma once

#include <string>

#include <evmesh/codec.hpp>

namespace evmesh::codec {

// Encodes `v` (whose headers are raw validated msgpack) with the given filled-in fields.
void encode_completed(const event_view& v, std::string& out);

}  // namespace evmesh::codec
