// CloudEvents over HTTP into evmesh events (POST /v1/events, docs/PROTOCOL.md section 11): the
// structured (application/cloudevents+json), batch (application/cloudevents-batch+json) and
// binary (ce-* headers) content modes of the CloudEvents HTTP binding 1.0.
#pragma once

#include <map>
#include <string>
#include <vector>

#include <evmesh/event.hpp>

namespace evmesh::app {

struct ce_error {
    int status = 400;
    std::string code;     // e.g. "missing_attribute"
    std::string message;
    std::string field;    // the attribute or header at fault
};

// One decoded CloudEvent: the evmesh event to publish and the CloudEvents (source, id) pair that
// deduplication keys on.
struct ce_event {
    event ev;
    std::string ce_source, ce_id;
};

// Parses a request. `headers` have lower-case names. On error, fills `err` and returns false.
bool parse_cloudevents(const std::map<std::string, std::string>& headers, const std::string& body,
                       std::vector<ce_event>& out, ce_error& err);

// The evmesh id of a CloudEvent: its `id` when that is a UUID, else a UUID (version 8) derived
// from SHA-256 of source and id, so a repeated event always gets the same evmesh id.
event_id ce_event_id(const std::string& source, const std::string& id);

}  // namespace evmesh::app
