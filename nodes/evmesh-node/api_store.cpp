#include "api_store.hpp"

#include <openssl/crypto.h>
#include <openssl/rand.h>
#include <openssl/sha.h>

#include <algorithm>
#include <chrono>
#include <ctime>
#include <stdexcept>

#include <nlohmann/json.hpp>

namespace evmesh::app {

std::int64_t wall_ms() {
    return std::chrono::duration_cast<std::chrono::milliseconds>(std::chrono::system_clock::now().time_since_epoch())
        .count();
}

std::string rfc3339_ms(std::int64_t ms) {
    const std::time_t secs = static_cast<std::time_t>(ms / 1000);
    std::tm tm{};
    gmtime_r(&secs, &tm);
    char buf[64];
    std::snprintf(buf, sizeof buf, "%04d-%02d-%02dT%02d:%02d:%02d.%03dZ", tm.tm_year + 1900, tm.tm_mon + 1,
                  tm.tm_mday, tm.tm_hour, tm.tm_min, tm.tm_sec, static_cast<int>(ms % 1000));
    return buf;
}

std::string random_hex(std::size_t n) {
    std::string raw(n, '\0');
    if (RAND_bytes(reinterpret_cast<unsigned char*>(raw.data()), static_cast<int>(n)) != 1) {
        throw std::runtime_error("RAND_bytes failed");
    }
    static constexpr char hex[] = "0123456789abcdef";
    std::string out;
    out.reserve(2 * n);
    for (unsigned char c : raw) {
        out.push_back(hex[c >> 4]);
        out.push_back(hex[c & 15]);
    }
    return out;
}

namespace {

std::string sha256(std::string_view s) {
    std::string out(SHA256_DIGEST_LENGTH, '\0');
    SHA256(reinterpret_cast<const unsigned char*>(s.data()), s.size(), reinterpret_cast<unsigned char*>(out.data()));
    return out;
}

bool starts_with(std::string_view s, std::string_view p) { return s.substr(0, p.size()) == p; }

constexpr const char* schema = R"SQL(
PRAGMA journal_mode=WAL;
PRAGMA synchronous=NORMAL;
PRAGMA foreign_keys=ON;
CREATE TABLE IF NOT EXISTS api_keys(
  id TEXT PRIMARY KEY, hash BLOB NOT NULL, scopes TEXT NOT NULL, rate_limit REAL NOT NULL DEFAULT 0,
  description TEXT NOT NULL DEFAULT '', created_ms INTEGER NOT NULL, revoked_ms INTEGER NOT NULL DEFAULT 0);
CREATE TABLE IF NOT EXISTS audit(
  id INTEGER PRIMARY KEY, time_ms INTEGER NOT NULL, key_id TEXT NOT NULL, action TEXT NOT NULL,
  object TEXT NOT NULL, request_id TEXT NOT NULL, detail TEXT NOT NULL DEFAULT '');
CREATE TABLE IF NOT EXISTS apps(
  id TEXT PRIMARY KEY, name TEXT NOT NULL, metadata TEXT NOT NULL DEFAULT '{}',
  created_ms INTEGER NOT NULL, updated_ms INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS endpoints(
  id TEXT PRIMARY KEY, app_id TEXT NOT NULL REFERENCES apps(id) ON DELETE CASCADE,
  url TEXT NOT NULL, description TEXT NOT NULL DEFAULT '', topics TEXT NOT NULL,
  secret TEXT NOT NULL, old_secret TEXT NOT NULL DEFAULT '', old_secret_until_ms INTEGER NOT NULL DEFAULT 0,
  headers TEXT NOT NULL DEFAULT '{}', rate_limit REAL NOT NULL DEFAULT 0, retry TEXT NOT NULL DEFAULT '',
  concurrency INTEGER NOT NULL DEFAULT 4,
  disabled INTEGER NOT NULL DEFAULT 0, disabled_reason TEXT NOT NULL DEFAULT '',
  created_ms INTEGER NOT NULL, updated_ms INTEGER NOT NULL);
CREATE INDEX IF NOT EXISTS endpoints_app ON endpoints(app_id, id);
CREATE TABLE IF NOT EXISTS messages(
  id TEXT PRIMARY KEY, topic TEXT NOT NULL, body TEXT NOT NULL, received_ms INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS deliveries(
  id INTEGER PRIMARY KEY, message_id TEXT NOT NULL, endpoint_id TEXT NOT NULL,
  status INTEGER NOT NULL DEFAULT 0, attempts INTEGER NOT NULL DEFAULT 0, next_ms INTEGER NOT NULL,
  accepted_ms INTEGER NOT NULL, done_ms INTEGER NOT NULL DEFAULT 0,
  last_code INTEGER NOT NULL DEFAULT 0, last_detail TEXT NOT NULL DEFAULT '',
  UNIQUE(endpoint_id, message_id));
CREATE INDEX IF NOT EXISTS deliveries_due ON deliveries(endpoint_id, status, next_ms);
CREATE INDEX IF NOT EXISTS deliveries_done ON deliveries(status, done_ms);
CREATE INDEX IF NOT EXISTS deliveries_message ON deliveries(message_id);
CREATE TABLE IF NOT EXISTS attempts(
  id INTEGER PRIMARY KEY, endpoint_id TEXT NOT NULL, message_id TEXT NOT NULL, attempt INTEGER NOT NULL,
  time_ms INTEGER NOT NULL, latency_us INTEGER NOT NULL, outcome TEXT NOT NULL, code INTEGER NOT NULL,
  detail TEXT NOT NULL DEFAULT '');
CREATE INDEX IF NOT EXISTS attempts_endpoint ON attempts(endpoint_id, id);
CREATE INDEX IF NOT EXISTS attempts_message ON attempts(message_id);
)SQL";

}  // namespace

bool valid_scope(const std::string& scope, std::string& error) {
    if (scope == "admin") {
        return true;
    }
    auto arg_of = [&](std::string_view prefix) -> std::optional<std::string> {
        if (starts_with(scope, prefix) && scope.size() > prefix.size()) {
            return scope.substr(prefix.size());
        }
        return std::nullopt;
    };
    if (auto a = arg_of("app:"); a) {
        return true;
    }
    if (auto a = arg_of("ingest:"); a) {
        return true;
    }
    for (const char* p : {"publish:", "subscribe:"}) {
        if (auto a = arg_of(p); a) {
            if (!topic_pattern::parse(*a)) {
                error = "scope '" + scope + "': '" + *a + "' is not a topic pattern";
                return false;
            }
            return true;
        }
    }
    error = "scope '" + scope + "' is not one of admin, app:<id>, publish:<pattern>, ingest:<source>, "
            "subscribe:<pattern>";
    return false;
}

bool principal::admin() const {
    if (key_id.empty()) {
        return true;
    }
    for (const auto& s : scopes) {
        if (s == "admin") {
            return true;
        }
    }
    return false;
}

bool principal::app(std::string_view id) const {
    if (admin()) {
        return true;
    }
    for (const auto& s : scopes) {
        if (starts_with(s, "app:") && std::string_view(s).substr(4) == id) {
            return true;
        }
    }
    return false;
}

bool principal::may_publish(std::string_view topic) const {
    if (admin()) {
        return true;
    }
    for (const auto& p : publish) {
        if (p.matches(topic)) {
            return true;
        }
    }
    return false;
}

bool principal::may_ingest(std::string_view source) const {
    if (admin()) {
        return true;
    }
    for (const auto& s : scopes) {
        if (starts_with(s, "ingest:") && std::string_view(s).substr(7) == source) {
            return true;
        }
    }
    return false;
}

std::vector<std::string> principal::apps() const {
    std::vector<std::string> out;
    for (const auto& s : scopes) {
        if (starts_with(s, "app:")) {
            out.push_back(s.substr(4));
        }
    }
    return out;
}

bool api_store::open(const std::string& path, std::string& error) {
    try {
        db.open(path);
        db.exec(schema);
        std::lock_guard lk(m);
        load_keys();
    } catch (const sql::sqlite_error& e) {
        error = "api database '" + path + "': " + e.what();
        return false;
    }
    return true;
}

void api_store::load_keys() {
    sql::statement v(db, "PRAGMA data_version");
    v.step();
    data_version_ = v.i64(0);
    keys_.clear();
    sql::statement s(db, "SELECT id, hash, scopes, rate_limit, description, created_ms, revoked_ms FROM api_keys");
    while (s.step()) {
        key_row k;
        k.info.id = std::string(s.text(0));
        k.hash = std::string(s.blob(1));
        auto scopes = nlohmann::json::parse(s.text(2), nullptr, false);
        if (scopes.is_array()) {
            for (const auto& sc : scopes) {
                if (sc.is_string()) {
                    k.info.scopes.push_back(sc.get<std::string>());
                }
            }
        }
        k.info.rate_limit = s.f64(3);
        k.info.description = std::string(s.text(4));
        k.info.created_ms = s.i64(5);
        k.info.revoked_ms = s.i64(6);
        keys_.emplace(k.info.id, std::move(k));
    }
}

api_store::created_key api_store::create_key(const std::vector<std::string>& scopes, double rate_limit,
                                             const std::string& description) {
    created_key out;
    out.info.id = random_hex(8);
    const std::string secret = random_hex(24);
    out.token = "evk_" + out.info.id + "_" + secret;
    out.info.scopes = scopes;
    out.info.rate_limit = rate_limit;
    out.info.description = description;
    out.info.created_ms = wall_ms();
    const auto hash = sha256(secret);
    std::lock_guard lk(m);
    sql::statement s(db, "INSERT INTO api_keys(id, hash, scopes, rate_limit, description, created_ms) "
                         "VALUES(?, ?, ?, ?, ?, ?)");
    s.bind(1, out.info.id).bind_blob(2, hash.data(), hash.size()).bind(3, nlohmann::json(scopes).dump());
    s.bind_double(4, rate_limit).bind(5, description).bind(6, out.info.created_ms);
    s.run();
    load_keys();
    return out;
}

bool api_store::revoke_key(const std::string& id) {
    std::lock_guard lk(m);
    sql::statement s(db, "UPDATE api_keys SET revoked_ms = ? WHERE id = ? AND revoked_ms = 0");
    s.bind(1, wall_ms()).bind(2, id);
    s.run();
    const bool changed = db.changes() > 0;
    load_keys();
    return changed;
}

std::vector<api_key_info> api_store::list_keys() {
    std::lock_guard lk(m);
    std::vector<api_key_info> out;
    for (const auto& [id, k] : keys_) {
        out.push_back(k.info);
    }
    std::sort(out.begin(), out.end(), [](const auto& a, const auto& b) { return a.created_ms < b.created_ms; });
    return out;
}

api_store::auth api_store::authenticate(std::string_view authorization, principal& out, double& rate_limit) {
    std::lock_guard lk(m);
    {
        // another process (evmesh-node api-key create/revoke) may have changed the keys
        sql::statement v(db, "PRAGMA data_version");
        v.step();
        if (v.i64(0) != data_version_) {
            load_keys();
        }
    }
    // open only until the first key is made: revoking every key does not reopen the API
    if (keys_.empty()) {
        return auth::open;
    }
    constexpr std::string_view bearer = "Bearer ";
    if (authorization.size() <= bearer.size() || authorization.substr(0, bearer.size()) != bearer) {
        return auth::missing;
    }
    const auto token = authorization.substr(bearer.size());
    // evk_<16 hex id>_<48 hex secret>
    if (token.size() != 4 + 16 + 1 + 48 || token.substr(0, 4) != "evk_" || token[20] != '_') {
        return auth::invalid;
    }
    const auto it = keys_.find(std::string(token.substr(4, 16)));
    const auto hash = sha256(token.substr(21));
    // compare even when the id is unknown, so timing says nothing about which ids exist
    static const std::string dummy(32, '\0');
    const std::string& stored = it != keys_.end() ? it->second.hash : dummy;
    const bool equal = stored.size() == hash.size() && CRYPTO_memcmp(stored.data(), hash.data(), hash.size()) == 0;
    if (it == keys_.end() || !equal || it->second.info.revoked_ms != 0) {
        return auth::invalid;
    }
    out.key_id = it->second.info.id;
    out.scopes = it->second.info.scopes;
    out.publish.clear();
    for (const auto& s : out.scopes) {
        if (starts_with(s, "publish:")) {
            if (auto p = topic_pattern::parse(std::string_view(s).substr(8)); p) {
                out.publish.push_back(std::move(*p));
            }
        }
    }
    rate_limit = it->second.info.rate_limit;
    return auth::ok;
}

void api_store::audit(const std::string& key_id, const std::string& action, const std::string& object,
                      const std::string& request_id, const std::string& detail) {
    std::lock_guard lk(m);
    sql::statement s(db, "INSERT INTO audit(time_ms, key_id, action, object, request_id, detail) VALUES(?,?,?,?,?,?)");
    s.bind(1, wall_ms()).bind(2, key_id.empty() ? "-" : key_id).bind(3, action).bind(4, object).bind(5, request_id)
        .bind(6, detail);
    s.run();
}

}  // namespace evmesh::app
