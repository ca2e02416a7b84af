// Live streams to browsers and apps (docs/STREAMS.md): Server-Sent Events at GET /v1/stream and
// WebSocket at /v1/ws on the node's HTTP listener. One hub per node: a few node subscriptions
// (one per first topic segment) fan out to every connection; each connection has a bounded queue,
// and a slow one is skipped with a gap notice (or disconnected) without slowing the node or the
// other clients. A bounded in-memory buffer of recent events serves resumption (Last-Event-ID);
// what it no longer holds is replayed from the mesh's durable histories, and what they do not hold
// either is reported as a gap, never skipped silently.
#pragma once

#include <chrono>
#include <memory>
#include <string>

#include <evmesh/node.hpp>

#include "api_store.hpp"
#include "http_server.hpp"

namespace evmesh::app {

struct stream_options {
    std::size_t resume_events = 10000;          // recent events kept for Last-Event-ID
    std::size_t queue_bytes = 1 << 20;          // per connection; beyond it the slow policy applies
    bool disconnect_slow = false;               // false: skip with a gap notice; true: close (1008)
    std::chrono::milliseconds heartbeat{15000}; // SSE comment lines while idle
    std::size_t max_connections = 20000;
    std::size_t max_topics = 64;                // patterns per connection
    // A Last-Event-ID the buffer no longer holds resumes from the mesh's durable histories
    // (docs/HISTORY.md): a replay after that id, then live, with neither a gap nor a duplicate.
    bool resume_history = true;
    std::chrono::milliseconds resume_answer_wait{1000};  // for the histories' first answers
};

// `pattern` lies within `scope` (every topic `pattern` matches, `scope` matches too).
bool pattern_within(const std::string& pattern, const std::string& scope);

class stream_hub {
public:
    stream_hub(node& n, stream_options o);
    ~stream_hub();
    stream_hub(const stream_hub&) = delete;
    stream_hub& operator=(const stream_hub&) = delete;

    void stop();

    // GET /v1/stream?topics=a.>,b (SSE; Last-Event-ID or ?last_event_id= resumes)
    void sse(const http_request& req, http_response& res, const principal& who);
    // GET /v1/ws (WebSocket; subscribe/unsubscribe messages)
    void ws(const http_request& req, http_response& res, const principal& who);
    // GET /v1/streams: the open connections with their counters (admin)
    void list(const http_request& req, http_response& res, const principal& who);

    std::string metrics(const std::string& node_name) const;

    struct impl;

private:
    std::shared_ptr<impl> impl_;
};

}  // namespace evmesh::app
