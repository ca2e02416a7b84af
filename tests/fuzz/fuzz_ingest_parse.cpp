// Fuzz target: inbound third-party webhooks (POST /v1/ingest/<source>): the signature checks of
// every scheme and the topic/id templates over hostile headers and bodies. The input is a template
// line, "name: value" header lines, a blank line, then the body.
#include <cstddef>
#include <cstdint>
#include <map>
#include <string>
#include <string_view>

#include "api.hpp"

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
    const std::string_view in(reinterpret_cast<const char*>(data), size);
    std::size_t pos = in.find('\n');
    const std::string tmpl(in.substr(0, pos == std::string_view::npos ? in.size() : pos));
    pos = pos == std::string_view::npos ? in.size() : pos + 1;
    std::map<std::string, std::string> headers;
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
    evmesh::app::ingest_source src;
    src.name = "fuzz";
    for (const char* scheme : {"standard-webhooks", "github", "stripe", "none"}) {
        src.verify = scheme;
        src.secret = src.verify == "standard-webhooks" ? "whsec_c2VjcmV0LXNlY3JldC1zZWNyZXQtc2VjcmV0" : "secret";
        std::string why;
        (void)evmesh::app::verify_webhook(src, headers, body, 1796000000, why);
    }
    std::string out, why;
    (void)evmesh::app::expand_template(tmpl, "fuzz", headers, body, out, why);
    return 0;
}
