// The node's one HTTP server (docs/HTTP-STACK.md): Boost.Beast on one Asio event-loop thread that
// only parses and writes, handlers on a small pool so a slow handler never stalls the loop.
// HTTP/1.1 keep-alive, limits (413, 431), header and idle timeouts, optional TLS from cert and key
// files, a request id on every answer and JSON errors {"error": {"code", "message", "field"}}.
// This header includes no Boost: only http_server.cpp compiles Beast.
#pragma once

#include <chrono>
#include <cstddef>
#include <functional>
#include <map>
#include <memory>
#include <regex>
#include <string>
#include <utility>
#include <vector>

namespace evmesh::app {

struct http_request {
    std::string method;   // "GET", "POST", ...
    std::string path;     // without the query
    std::string query;    // after '?', raw
    std::map<std::string, std::string> headers;  // names lower-cased
    std::string body;
    std::string request_id;
    std::vector<std::string> matches;  // the route's capture groups

    std::string header(const std::string& lower_name) const;
    bool has_param(const std::string& name) const;
    std::string param(const std::string& name) const;  // percent-decoded query parameter
};

struct http_response {
    int status = 200;
    std::string content_type = "text/plain";
    std::string body;
    std::vector<std::pair<std::string, std::string>> headers;

    void json(int code, std::string text) {
        status = code;
        content_type = "application/json";
        body = std::move(text);
    }
};

// {"error": {"code": code, "message": message[, "field": field]}} with `status`.
void http_error(http_response& res, int status, const std::string& code, const std::string& message,
                const std::string& field = {});

using http_handler = std::function<void(const http_request&, http_response&)>;

// "localhost" or a loopback IP address (127.0.0.0/8, ::1), without brackets or port.
bool is_loopback_host(const std::string& host);

struct http_options {
    std::string host = "127.0.0.1";
    int port = 0;                                 // 0 = any free port
    std::string cert_file, key_file;              // both set: TLS
    std::size_t body_limit = 1 << 20;             // larger bodies: 413
    std::size_t header_limit = 8192;              // larger headers: 431
    std::chrono::milliseconds header_timeout{10000};  // a request must arrive within this (slowloris)
    std::chrono::milliseconds idle_timeout{60000};    // keep-alive connections idle longer are closed
    int handler_threads = 2;
    // Requests that carry an Origin header (a browser page, cross-origin) are refused with 403,
    // except origins listed here: the admin routes change state and have no other protection.
    std::vector<std::string> allowed_origins;
};

class http_server {
public:
    // Routes are matched in the order added; `pattern` is a regex over the whole path.
    void route(const std::string& method, const std::string& pattern, http_handler h);

    // Binds and starts the loop. Returns an error text, empty on success.
    std::string start(const http_options& o);
    int port() const;
    bool tls() const;
    void stop();  // idempotent; waits for the loop and the handler pool

    http_server();
    ~http_server();
    http_server(const http_server&) = delete;
    http_server& operator=(const http_server&) = delete;

    struct impl;

private:
    std::unique_ptr<impl> impl_;
};

}  // namespace evmesh::app
