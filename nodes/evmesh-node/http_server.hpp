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
    bool websocket_upgrade = false;    // a valid WebSocket upgrade request (GET, Upgrade: websocket)

    std::string header(const std::string& lower_name) const;
    bool has_param(const std::string& name) const;
    std::string param(const std::string& name) const;  // percent-decoded query parameter
};

// A live connection: a Server-Sent Events stream or a WebSocket (docs/STREAMS.md). Thread-safe.
class live_conn {
public:
    virtual ~live_conn() = default;
    // Queues `data` for the client (an SSE chunk, or one WebSocket message, text or binary).
    // False once the connection is closed: the caller forgets it.
    virtual bool send(std::string data, bool binary = false) {
        return send(std::make_shared<const std::string>(std::move(data)), binary);
    }
    // The same bytes for many connections (an event rendered once): queued without a copy.
    virtual bool send(std::shared_ptr<const std::string> data, bool binary) = 0;
    // Closes it (WebSocket: with this close code and reason).
    virtual void close(int code = 1000, const std::string& reason = {}) = 0;
    // Bytes queued and not written yet: what a slow client has not taken.
    virtual std::size_t queued_bytes() const = 0;
    virtual bool websocket() const = 0;
};

// Set by a handler to turn its answer into a live stream. For a WebSocket upgrade request the
// server completes the handshake; otherwise it answers 200 text/event-stream and keeps the
// connection. `open` runs once the stream is established, `message` for each WebSocket message
// received, `closed` once when it ends (client gone, error, close()).
struct live_handlers {
    std::function<void(std::shared_ptr<live_conn>)> open;
    std::function<void(const std::string& data, bool binary)> message;
    std::function<void()> closed;
    std::size_t max_message_bytes = 64 * 1024;  // a larger WebSocket message closes with 1009
    // WebSocket keep-alive: a ping after this much silence from the client; closed when that
    // ping is not answered within it either
    std::chrono::milliseconds ping_interval{15000};
};

struct http_response {
    int status = 200;
    std::string content_type = "text/plain";
    std::string body;
    std::vector<std::pair<std::string, std::string>> headers;
    std::shared_ptr<live_handlers> live;  // set: the answer is a live stream (SSE or WebSocket)

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
