// The endpoint registry (docs/API.md): applications and their webhook endpoints, managed over the
// HTTP API and stored in the API database. An endpoint is data, not a thread: one dispatcher
// thread drives every delivery through libcurl's multi interface, with a per-endpoint
// concurrency, rate limit and retry schedule, so a hung endpoint only ever holds its own slots.
//
// Guarantees (as the channel outbox's, docs/CHANNELS.md): an event counts as accepted for an
// endpoint once its delivery row is committed; each matching event is stored once (messages) with
// one row per endpoint (deliveries); a crash redelivers what was in flight; an event id already
// delivered to an endpoint is not delivered to it again; after the last attempt of the schedule a
// delivery becomes a dead letter, which can be replayed.
#pragma once

#include <chrono>
#include <functional>
#include <memory>
#include <string>

#include <evmesh/node.hpp>

#include "api_store.hpp"
#include "http_server.hpp"

namespace evmesh::app {

struct registry_options {
    bool allow_private_urls = false;   // deliver to loopback/private/link-local addresses (tests, LAN)
    int max_in_flight = 1024;          // deliveries in flight, all endpoints together
    int endpoint_concurrency = 4;      // deliveries in flight per endpoint
    std::chrono::milliseconds request_timeout{15000};
    std::chrono::milliseconds connect_timeout{5000};
    std::chrono::milliseconds retention{7LL * 24 * 3600 * 1000};  // delivered rows and attempts kept
    std::size_t max_endpoints = 100000;
    std::size_t intake_limit = 65536;  // events waiting to be stored; then the subscription blocks
};

// Counters for /metrics.
struct registry_stats {
    std::uint64_t apps = 0, endpoints = 0;          // gauges
    std::uint64_t accepted = 0;                     // delivery rows created
    std::uint64_t duplicates = 0;                   // matching events already known to the endpoint
    std::uint64_t attempts = 0, delivered = 0, retried = 0, dead = 0, disabled = 0;
    std::uint64_t in_flight = 0;                    // gauge
};

using api_handler = std::function<void(const http_request&, http_response&, const principal&)>;
using api_route_adder = std::function<void(const std::string& method, const std::string& pattern, api_handler)>;

class registry {
public:
    registry(node& n, api_store& store, registry_options o);
    ~registry();
    registry(const registry&) = delete;
    registry& operator=(const registry&) = delete;

    // Loads the endpoints, subscribes to their patterns, starts the dispatcher. False + error.
    bool start(std::string& error);
    void stop();  // idempotent

    // Adds the /v1/apps routes.
    void routes(const api_route_adder& add);

    registry_stats stats() const;

    struct impl;

private:
    std::unique_ptr<impl> impl_;
};

// Standard Webhooks signature "v1,<base64 HMAC-SHA256(key, id.timestamp.body)>" with the key of a
// "whsec_<base64>" secret. Empty when the secret is malformed.
std::string standard_webhooks_sign(const std::string& secret, const std::string& id, const std::string& timestamp,
                                   const std::string& body);
// A new "whsec_" secret (24 random bytes).
std::string new_webhook_secret();

}  // namespace evmesh::app
