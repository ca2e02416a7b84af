// The open-platform API's state (docs/API.md): one SQLite database beside the outbox holding the
// API keys, the audit log, and the applications, endpoints, messages, deliveries and attempts of
// the endpoint registry (registry.hpp). One connection, used under `m`.
#pragma once

#include <cstdint>
#include <mutex>
#include <optional>
#include <string>
#include <string_view>
#include <unordered_map>
#include <vector>

#include <evmesh/topic.hpp>

#include "channels/sqlite.hpp"

namespace evmesh::app {

namespace sql = evmesh::channels::detail;

std::int64_t wall_ms();
std::string rfc3339_ms(std::int64_t ms);
// 'n' random bytes as lower-case hex.
std::string random_hex(std::size_t n);

// What a request may do: the scopes of its API key (docs/API.md "Keys and scopes").
//   admin                everything
//   app:<id>             that application's endpoints, attempts and dead letters
//   publish:<pattern>    POST /v1/events for topics matching the pattern
//   ingest:<source>      POST /v1/ingest/<source> (sources without their own signature)
//   subscribe:<pattern>  the live streams (reserved)
struct principal {
    std::string key_id;             // empty: no key exists yet, the API is open (loopback only)
    std::vector<std::string> scopes;
    std::vector<topic_pattern> publish;  // parsed publish:<pattern> scopes

    bool admin() const;
    bool app(std::string_view id) const;       // admin or app:<id>
    bool may_publish(std::string_view topic) const;
    bool may_ingest(std::string_view source) const;
    std::vector<std::string> apps() const;     // the ids of its app:<id> scopes
};

// A scope is well-formed (see principal). Fills `error` when not.
bool valid_scope(const std::string& scope, std::string& error);

struct api_key_info {
    std::string id;
    std::vector<std::string> scopes;
    double rate_limit = 0;  // requests per second, 0 = unlimited
    std::string description;
    std::int64_t created_ms = 0, revoked_ms = 0;
};

class api_store {
public:
    // Opens (creates) the database and its schema. False with one line in `error`.
    bool open(const std::string& path, std::string& error);

    // Keys. The token is "evk_<id>_<secret>"; only SHA-256(secret) is stored.
    struct created_key {
        api_key_info info;
        std::string token;  // shown once
    };
    created_key create_key(const std::vector<std::string>& scopes, double rate_limit, const std::string& description);
    bool revoke_key(const std::string& id);
    std::vector<api_key_info> list_keys();

    enum class auth { open, ok, missing, invalid };
    // Checks an Authorization header ("Bearer <token>"). open: no key was ever created.
    auth authenticate(std::string_view authorization, principal& out, double& rate_limit);

    // One row of the audit log (state-changing calls).
    void audit(const std::string& key_id, const std::string& action, const std::string& object,
               const std::string& request_id, const std::string& detail = {});

    std::mutex m;  // guards db and everything below; registry.cpp uses db under it too
    sql::database db;

private:
    void load_keys();  // under m
    struct key_row {
        std::string hash;  // 32 bytes
        api_key_info info;
    };
    std::unordered_map<std::string, key_row> keys_;
    std::int64_t data_version_ = -1;
};

}  // namespace evmesh::app
