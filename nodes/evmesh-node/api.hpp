// The open-platform API of evmesh-node (docs/API.md): API keys and scopes in front of every route,
// per-key rate limits, the audit log, the endpoint registry (registry.hpp), inbound webhooks from
// third parties (POST /v1/ingest/<source>) and the OpenAPI document.
#pragma once

#include <functional>
#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <vector>

#include <evmesh/node.hpp>

#include "api_store.hpp"
#include "cloudevents_http.hpp"
#include "config.hpp"
#include "http_server.hpp"
#include "registry.hpp"

namespace evmesh::app {

// Verifies a third-party webhook request; false with the reason in `why`.
//   standard-webhooks: webhook-id, webhook-timestamp, webhook-signature ("v1,<b64>" list), whsec_ secret
//   github: X-Hub-Signature-256 "sha256=<hex HMAC of the body>"
//   stripe: Stripe-Signature "t=<unix>,v1=<hex HMAC of 't.body'>" (several v1 allowed)
bool verify_webhook(const ingest_source& src, const std::map<std::string, std::string>& headers,
                    const std::string& body, std::int64_t now_s, std::string& why);

// Expands a topic or id template: literal text, {source}, {header.<name>} (lower-case name),
// {body.<a.b.c>} (a JSON member path). False with the reason when a field is missing.
bool expand_template(const std::string& tmpl, const std::string& source, const std::map<std::string, std::string>& headers,
                     const std::string& body, std::string& out, std::string& why);

// Publishes decoded events with the answers of POST /v1/events (202, or 503 + Retry-After).
using publish_fn = std::function<void(std::vector<ce_event>&, const std::string& idempotency_key, http_response&)>;

class api {
public:
    api(node& n, const app_config& cfg);
    ~api();

    // Opens the database (when api.database is set) and starts the registry. False + error.
    bool start(std::string& error);
    void stop();

    // Authenticates the request (once a key exists), applies the key's rate limit, then calls `h`.
    // query_token: also take the key from ?access_token= (EventSource and browser WebSockets
    // cannot send headers).
    http_handler guard(api_handler h, bool query_token = false);
    // The node's own admin routes (/channels..., /peers): the admin scope once a key exists.
    http_handler admin(http_handler h);

    // /v1/keys, /v1/audit, /v1/apps..., /v1/ingest/<source>, /v1/openapi.json
    void routes(http_server& srv, const publish_fn& publish);

    // Prometheus text of the API's counters.
    std::string metrics(const std::string& node_name) const;

    api_store* store() { return store_ ? store_.get() : nullptr; }

    struct rate_state;

private:
    node& n_;
    const app_config& cfg_;
    std::unique_ptr<api_store> store_;
    std::unique_ptr<registry> registry_;
    std::mutex rate_m_;
    std::map<std::string, std::pair<double, std::int64_t>> buckets_;  // key id -> tokens, last refill (µs)
    std::map<std::string, std::string> secrets_;                       // ingest source -> secret
    mutable std::mutex counters_m_;
    std::map<std::string, std::uint64_t> counters_;                    // metric label set -> count
    void count(const std::string& series);
};

}  // namespace evmesh::app
