// The CloudEvents JSON of an event, as the webhook channel writes it (PROTOCOL.md section 11): the
// one rendering of the registry's deliveries and the live streams.
#pragma once

#include <cstring>
#include <string>
#include <vector>

#include <evmesh/channel.h>
#include <evmesh/event.hpp>

#include "channels/common.hpp"  // cloudevent_json (header-only; the plugins' own code)

namespace evmesh::app {

inline std::string render_cloudevent_json(const event& ev) {
    const auto id_text = to_string(ev.id);
    std::vector<evmesh_header> hs;
    hs.reserve(ev.headers.size());
    for (const auto& [k, v] : ev.headers) {
        hs.push_back({k.c_str(), k.size(), v.c_str(), v.size()});
    }
    evmesh_event ce{};
    ce.struct_size = sizeof ce;
    std::memcpy(ce.id, ev.id.data(), 16);
    ce.id_text = id_text.c_str();
    ce.topic = ev.topic.c_str();
    ce.topic_len = ev.topic.size();
    ce.source = ev.source.c_str();
    ce.source_len = ev.source.size();
    ce.time_ns = ev.time_ns;
    ce.seq = ev.seq;
    ce.content_type = ev.content_type.c_str();
    ce.content_type_len = ev.content_type.size();
    ce.headers = hs.data();
    ce.header_count = hs.size();
    ce.payload = ev.payload.data();
    ce.payload_len = ev.payload.size();
    return channels::dump_json(channels::cloudevent_json(ce));
}

}  // namespace evmesh::app
