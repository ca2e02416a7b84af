// Fuzz target: CloudEvents over HTTP (POST /v1/events) -> evmesh events. The input is
// "name: value" header lines, a blank line, then the body, so every content mode is reached.
#include <cstddef>
#include <cstdint>
#include <map>
#include <string>
#include <string_view>

#include "cloudevents_http.hpp"

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
    const std::string_view in(reinterpret_cast<const char*>(data), size);
    std::map<std::string, std::string> headers;
    std::size_t pos = 0;
    while (pos < in.size()) {
        const auto end = in.find('\n', pos);
        const auto line = in.substr(pos, end == std::string_view::npos ? in.size() - pos : end - pos);
        pos = end == std::string_view::npos ? in.size() : end + 1;
        if (line.empty()) {
            break;
        }
        const auto colon = line.find(": ");
        if (colon != std::string_view::npos) {
            headers[std::string(line.substr(0, colon))] = std::string(line.substr(colon + 2));
        }
    }
    const std::string body(in.substr(pos));
    std::vector<evmesh::app::ce_event> out;
    evmesh::app::ce_error err;
    if (evmesh::app::parse_cloudevents(headers, body, out, err)) {
        for (const auto& ce : out) {
            if (ce.ev.topic.empty() || ce.ev.source.empty() ||
                ce.ev.id != evmesh::app::ce_event_id(ce.ce_source, ce.ce_id)) {
                __builtin_trap();  // accepted events always have a type, a source and a stable id
            }
        }
    } else if (err.code.empty() || err.status < 400) {
        __builtin_trap();  // a refusal always says why
    }
    return 0;
}
