#include "api.hpp"

#include <openssl/crypto.h>
#include <openssl/evp.h>
#include <openssl/hmac.h>

#include <chrono>
#include <fstream>
#include <sstream>

#include <nlohmann/json.hpp>
#include <spdlog/spdlog.h>

#include "openapi_json.hpp"  // generated from docs/openapi.json

namespace evmesh::app {

using json = nlohmann::json;

namespace {

std::string hmac_sha256(const std::string& key, const std::string& msg) {
    unsigned char mac[EVP_MAX_MD_SIZE];
    unsigned int len = 0;
    HMAC(EVP_sha256(), key.data(), static_cast<int>(key.size()), reinterpret_cast<const unsigned char*>(msg.data()),
         msg.size(), mac, &len);
    return std::string(reinterpret_cast<const char*>(mac), len);
}

std::string hex(const std::string& raw) {
    static constexpr char digits[] = "0123456789abcdef";
    std::string out;
    for (unsigned char c : raw) {
        out.push_back(digits[c >> 4]);
        out.push_back(digits[c & 15]);
    }
    return out;
}

bool same(const std::string& a, const std::string& b) {
    return a.size() == b.size() && CRYPTO_memcmp(a.data(), b.data(), a.size()) == 0;
}

std::string header_of(const std::map<std::string, std::string>& h, const std::string& name) {
    auto it = h.find(name);
    return it == h.end() ? std::string() : it->second;
}

std::vector<std::string> split(const std::string& s, char sep) {
    std::vector<std::string> out;
    std::stringstream ss(s);
    std::string part;
    while (std::getline(ss, part, sep)) {
        while (!part.empty() && part.front() == ' ') {
            part.erase(part.begin());
        }
        out.push_back(part);
    }
    return out;
}

std::int64_t now_us() {
    return std::chrono::duration_cast<std::chrono::microseconds>(std::chrono::steady_clock::now().time_since_epoch())
        .count();
}

// A topic made from template output: characters outside [A-Za-z0-9_.-] become '_', empty segments
// are refused.
std::string topic_safe(const std::string& s) {
    std::string out;
    for (char c : s) {
        const bool ok = (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9') || c == '_' ||
                        c == '-' || c == '.';
        out.push_back(ok ? c : '_');
    }
    return out;
}

}  // namespace

bool verify_webhook(const ingest_source& src, const std::map<std::string, std::string>& headers,
                    const std::string& body, std::int64_t now_s, std::string& why) {
    const auto tolerance_s = src.tolerance.count() / 1000;
    auto fresh = [&](const std::string& ts) {
        char* end = nullptr;
        const long long t = std::strtoll(ts.c_str(), &end, 10);
        if (ts.empty() || *end != '\0') {
            why = "the timestamp is not a Unix time";
            return false;
        }
        if (t < now_s - tolerance_s || t > now_s + tolerance_s) {
            why = "the timestamp is outside the tolerance (" + std::to_string(tolerance_s) + " s)";
            return false;
        }
        return true;
    };
    if (src.verify == "none") {
        return true;
    }
    if (src.verify == "github") {
        const auto sig = header_of(headers, "x-hub-signature-256");
        if (sig.rfind("sha256=", 0) != 0) {
            why = "X-Hub-Signature-256 is missing or not sha256=<hex>";
            return false;
        }
        if (!same(sig.substr(7), hex(hmac_sha256(src.secret, body)))) {
            why = "X-Hub-Signature-256 does not match the body";
            return false;
        }
        return true;
    }
    if (src.verify == "stripe") {
        const auto sig = header_of(headers, "stripe-signature");
        std::string t;
        std::vector<std::string> v1;
        for (const auto& part : split(sig, ',')) {
            if (part.rfind("t=", 0) == 0) {
                t = part.substr(2);
            } else if (part.rfind("v1=", 0) == 0) {
                v1.push_back(part.substr(3));
            }
        }
        if (t.empty() || v1.empty()) {
            why = "Stripe-Signature is missing or has no t= and v1=";
            return false;
        }
        if (!fresh(t)) {
            return false;
        }
        const auto expected = hex(hmac_sha256(src.secret, t + "." + body));
        for (const auto& s : v1) {
            if (same(s, expected)) {
                return true;
            }
        }
        why = "no v1 signature in Stripe-Signature matches";
        return false;
    }
    // standard-webhooks
    const auto id = header_of(headers, "webhook-id");
    const auto ts = header_of(headers, "webhook-timestamp");
    const auto sigs = header_of(headers, "webhook-signature");
    if (id.empty() || ts.empty() || sigs.empty()) {
        why = "webhook-id, webhook-timestamp and webhook-signature are required";
        return false;
    }
    if (!fresh(ts)) {
        return false;
    }
    const auto expected = standard_webhooks_sign(src.secret, id, ts, body);
    if (expected.empty()) {
        why = "the source's secret is not whsec_<base64>";
        return false;
    }
    for (const auto& s : split(sigs, ' ')) {
        if (same(s, expected)) {
            return true;
        }
    }
    why = "no v1 signature in webhook-signature matches";
    return false;
}

bool expand_template(const std::string& tmpl, const std::string& source, const std::map<std::string, std::string>& headers,
                     const std::string& body, std::string& out, std::string& why) {
    out.clear();
    json parsed;
    bool parsed_done = false;
    std::size_t i = 0;
    while (i < tmpl.size()) {
        const auto open = tmpl.find('{', i);
        if (open == std::string::npos) {
            out += tmpl.substr(i);
            break;
        }
        out += tmpl.substr(i, open - i);
        const auto close = tmpl.find('}', open);
        if (close == std::string::npos) {
            why = "unclosed '{' in template";
            return false;
        }
        const auto field = tmpl.substr(open + 1, close - open - 1);
        std::string value;
        if (field == "source") {
            value = source;
        } else if (field.rfind("header.", 0) == 0) {
            value = header_of(headers, field.substr(7));
            if (value.empty()) {
                why = "header '" + field.substr(7) + "' is missing";
                return false;
            }
        } else if (field.rfind("body.", 0) == 0) {
            if (!parsed_done) {
                parsed = json::parse(body, nullptr, false);
                parsed_done = true;
            }
            const json* cur = &parsed;
            for (const auto& k : split(field.substr(5), '.')) {
                if (!cur->is_object() || !cur->contains(k)) {
                    why = "body field '" + field.substr(5) + "' is missing";
                    return false;
                }
                cur = &(*cur)[k];
            }
            if (cur->is_string()) {
                value = cur->get<std::string>();
            } else if (cur->is_number() || cur->is_boolean()) {
                value = cur->dump();
            } else {
                why = "body field '" + field.substr(5) + "' is not a string or number";
                return false;
            }
        } else {
            why = "unknown template field '{" + field + "}'";
            return false;
        }
        out += value;
        i = close + 1;
    }
    return true;
}

api::api(node& n, const app_config& cfg) : n_(n), cfg_(cfg) {}

api::~api() { stop(); }

bool api::start(std::string& error) {
    for (const auto& src : cfg_.api.ingest) {
        std::string secret = src.secret;
        if (secret.empty() && !src.secret_file.empty()) {
            std::ifstream f(src.secret_file);
            if (!f || !std::getline(f, secret) || secret.empty()) {
                error = "api.ingest '" + src.name + "': secret_file '" + src.secret_file + "' cannot be read";
                return false;
            }
        }
        secrets_[src.name] = secret;
    }
    if (cfg_.api.database.empty()) {
        return true;
    }
    store_ = std::make_unique<api_store>();
    if (!store_->open(cfg_.api.database, error)) {
        return false;
    }
    registry_options o;
    o.allow_private_urls = cfg_.api.allow_private_urls;
    o.max_in_flight = cfg_.api.max_in_flight;
    o.endpoint_concurrency = cfg_.api.endpoint_concurrency;
    o.request_timeout = cfg_.api.request_timeout;
    o.retention = cfg_.api.retention;
    o.max_endpoints = cfg_.api.max_endpoints;
    registry_ = std::make_unique<registry>(n_, *store_, o);
    return registry_->start(error);
}

void api::stop() {
    if (registry_) {
        registry_->stop();
    }
}

void api::count(const std::string& series) {
    std::lock_guard lk(counters_m_);
    ++counters_[series];
}

http_handler api::guard(api_handler h, bool query_token) {
    return [this, h = std::move(h), query_token](const http_request& req, http_response& res) {
        principal who;
        double rate = 0;
        if (store_) {
            std::string authorization = req.header("authorization");
            if (authorization.empty() && query_token && req.has_param("access_token")) {
                authorization = "Bearer " + req.param("access_token");
            }
            switch (store_->authenticate(authorization, who, rate)) {
                case api_store::auth::open:
                case api_store::auth::ok:
                    break;
                case api_store::auth::missing:
                    count("evmesh_api_auth_failures_total{reason=\"missing\"}");
                    res.headers.emplace_back("WWW-Authenticate", "Bearer");
                    return http_error(res, 401, "unauthorized", "this call needs an API key: Authorization: Bearer evk_...");
                case api_store::auth::invalid:
                    count("evmesh_api_auth_failures_total{reason=\"invalid\"}");
                    res.headers.emplace_back("WWW-Authenticate", "Bearer error=\"invalid_token\"");
                    return http_error(res, 401, "unauthorized", "the API key is unknown or revoked");
            }
        }
        if (rate > 0) {
            std::lock_guard lk(rate_m_);
            auto& [tokens, last] = buckets_.try_emplace(who.key_id, std::max(1.0, rate), now_us()).first->second;
            const auto now = now_us();
            tokens = std::min(std::max(1.0, rate), tokens + rate * static_cast<double>(now - last) / 1e6);
            last = now;
            if (tokens < 1.0) {
                count("evmesh_api_rate_limited_total");
                const auto wait_s = static_cast<int>((1.0 - tokens) / rate) + 1;
                res.headers.emplace_back("Retry-After", std::to_string(wait_s));
                return http_error(res, 429, "rate_limited", "this key's rate limit (" + std::to_string(rate) +
                                                                " requests/s) is exceeded");
            }
            tokens -= 1.0;
        }
        h(req, res, who);
        count("evmesh_api_requests_total{method=\"" + req.method + "\",code=\"" + std::to_string(res.status) + "\"}");
    };
}

http_handler api::admin(http_handler h) {
    return guard([h = std::move(h)](const http_request& req, http_response& res, const principal& who) {
        if (!who.admin()) {
            return http_error(res, 403, "forbidden", "this call needs the admin scope");
        }
        h(req, res);
    });
}

void api::routes(http_server& srv, const publish_fn& publish) {
    srv.route("GET", "/v1/openapi.json", [](const http_request&, http_response& res) {
        res.json(200, std::string(openapi_json));
    });
    if (registry_) {
        registry_->routes([&](const std::string& m, const std::string& p, api_handler h) {
            srv.route(m, p, guard(std::move(h)));
        });
    }
    if (store_) {
        srv.route("POST", "/v1/keys", guard([this](const http_request& req, http_response& res, const principal& who) {
            if (!who.admin()) {
                return http_error(res, 403, "forbidden", "creating keys needs the admin scope");
            }
            auto b = json::parse(req.body.empty() ? "{}" : req.body, nullptr, false);
            if (!b.is_object() || !b.contains("scopes") || !b["scopes"].is_array() || b["scopes"].empty()) {
                return http_error(res, 400, "missing_attribute", "scopes is required: a non-empty array", "scopes");
            }
            std::vector<std::string> scopes;
            for (const auto& s : b["scopes"]) {
                std::string err;
                if (!s.is_string() || !valid_scope(s.get<std::string>(), err)) {
                    return http_error(res, 400, "bad_scope", s.is_string() ? err : "scopes must be strings", "scopes");
                }
                scopes.push_back(s.get<std::string>());
            }
            const auto rl = b.value("rate_limit", json(0));
            if (!rl.is_number() || rl.get<double>() < 0) {
                return http_error(res, 400, "bad_attribute", "rate_limit must be requests per second, 0 = unlimited",
                                  "rate_limit");
            }
            const auto desc = b.value("description", json(""));
            if (!desc.is_string() || desc.get<std::string>().size() > 256) {
                return http_error(res, 400, "bad_attribute", "description must be a string of at most 256 bytes",
                                  "description");
            }
            auto k = store_->create_key(scopes, rl.get<double>(), desc.get<std::string>());
            store_->audit(who.key_id, "key.create", k.info.id, req.request_id, json(scopes).dump());
            res.json(201, json({{"id", k.info.id},
                                {"key", k.token},
                                {"scopes", scopes},
                                {"rate_limit", k.info.rate_limit},
                                {"description", k.info.description},
                                {"created_at", rfc3339_ms(k.info.created_ms)}})
                              .dump());
        }));
        srv.route("GET", "/v1/keys", guard([this](const http_request&, http_response& res, const principal& who) {
            if (!who.admin()) {
                return http_error(res, 403, "forbidden", "listing keys needs the admin scope");
            }
            auto data = json::array();
            for (const auto& k : store_->list_keys()) {
                json j = {{"id", k.id},
                          {"scopes", k.scopes},
                          {"rate_limit", k.rate_limit},
                          {"description", k.description},
                          {"created_at", rfc3339_ms(k.created_ms)},
                          {"revoked_at", k.revoked_ms != 0 ? json(rfc3339_ms(k.revoked_ms)) : json(nullptr)}};
                data.push_back(std::move(j));
            }
            res.json(200, json({{"data", data}, {"done", true}, {"iterator", nullptr}}).dump());
        }));
        srv.route("DELETE", "/v1/keys/([0-9a-f]{16})",
                  guard([this](const http_request& req, http_response& res, const principal& who) {
                      if (!who.admin()) {
                          return http_error(res, 403, "forbidden", "revoking keys needs the admin scope");
                      }
                      if (!store_->revoke_key(req.matches[0])) {
                          return http_error(res, 404, "not_found", "no live key '" + req.matches[0] + "'");
                      }
                      store_->audit(who.key_id, "key.revoke", req.matches[0], req.request_id);
                      res.status = 204;
                  }));
        srv.route("GET", "/v1/audit", guard([this](const http_request& req, http_response& res, const principal& who) {
            if (!who.admin()) {
                return http_error(res, 403, "forbidden", "the audit log needs the admin scope");
            }
            std::int64_t limit = 100;
            if (req.has_param("limit")) {
                limit = std::clamp<std::int64_t>(std::strtoll(req.param("limit").c_str(), nullptr, 10), 1, 1000);
            }
            auto data = json::array();
            std::lock_guard lk(store_->m);
            sql::statement s(store_->db, "SELECT id, time_ms, key_id, action, object, request_id, detail FROM audit "
                                         "ORDER BY id DESC LIMIT ?");
            s.bind(1, limit);
            while (s.step()) {
                data.push_back({{"id", s.i64(0)},
                                {"timestamp", rfc3339_ms(s.i64(1))},
                                {"key_id", std::string(s.text(2))},
                                {"action", std::string(s.text(3))},
                                {"object", std::string(s.text(4))},
                                {"request_id", std::string(s.text(5))},
                                {"detail", std::string(s.text(6))}});
            }
            res.json(200, json({{"data", data}, {"done", true}, {"iterator", nullptr}}).dump());
        }));
    }
    if (!cfg_.api.ingest.empty()) {
        srv.route("POST", "/v1/ingest/([A-Za-z0-9_.-]{1,64})", [this, publish](const http_request& req, http_response& res) {
            const ingest_source* src = nullptr;
            for (const auto& s : cfg_.api.ingest) {
                if (s.name == req.matches[0]) {
                    src = &s;
                }
            }
            if (src == nullptr) {
                return http_error(res, 404, "not_found", "no ingest source '" + req.matches[0] + "'");
            }
            if (src->verify == "none") {
                // no signature of its own: an API key with ingest:<source> (once keys exist)
                bool allowed = false;
                guard([&](const http_request&, http_response&, const principal& who) {
                    allowed = who.may_ingest(src->name);
                    if (!allowed) {
                        http_error(res, 403, "forbidden", "this key has no ingest:" + src->name + " scope");
                    }
                })(req, res);
                if (!allowed) {
                    return;
                }
            } else {
                ingest_source checked = *src;
                checked.secret = secrets_[src->name];
                std::string why;
                const auto now_s = std::chrono::duration_cast<std::chrono::seconds>(
                                       std::chrono::system_clock::now().time_since_epoch()).count();
                if (!verify_webhook(checked, req.headers, req.body, now_s, why)) {
                    count("evmesh_api_ingest_rejected_total{source=\"" + src->name + "\",reason=\"signature\"}");
                    spdlog::warn("ingest {}: refused: {}", src->name, why);
                    return http_error(res, 401, "bad_signature", why);
                }
            }
            std::string topic, why;
            if (!expand_template(src->topic, src->name, req.headers, req.body, topic, why)) {
                count("evmesh_api_ingest_rejected_total{source=\"" + src->name + "\",reason=\"template\"}");
                return http_error(res, 422, "unmapped", "topic: " + why, "topic");
            }
            topic = topic_safe(topic);
            std::string key;
            std::string id_tmpl = src->id;
            if (id_tmpl.empty()) {
                id_tmpl = src->verify == "github"              ? "{header.x-github-delivery}"
                          : src->verify == "stripe"            ? "{body.id}"
                          : src->verify == "standard-webhooks" ? "{header.webhook-id}"
                                                               : "";
            }
            if (!id_tmpl.empty() && !expand_template(id_tmpl, src->name, req.headers, req.body, key, why)) {
                count("evmesh_api_ingest_rejected_total{source=\"" + src->name + "\",reason=\"template\"}");
                return http_error(res, 422, "unmapped", "id: " + why, "id");
            }
            std::vector<ce_event> events(1);
            auto& ce = events[0];
            ce.ce_source = "ingest/" + src->name;
            ce.ce_id = key.empty() ? to_string(new_event_id()) : key;
            ce.ev.id = ce_event_id(ce.ce_source, ce.ce_id);
            ce.ev.topic = topic;
            ce.ev.time_ns = now_ns();
            ce.ev.source = ce.ce_source;
            const auto ct = req.header("content-type");
            ce.ev.content_type = ct.empty() ? "application/octet-stream" : ct;
            ce.ev.payload = req.body;
            ce.ev.headers.emplace_back("ceid", ce.ce_id);
            count("evmesh_api_ingest_total{source=\"" + src->name + "\"}");
            publish(events, {}, res);
        });
    }
}

std::string api::metrics(const std::string& node_name) const {
    std::ostringstream os;
    const std::string lbl = "node=\"" + node_name + "\"";
    if (registry_) {
        const auto s = registry_->stats();
        os << "# HELP evmesh_api_apps Applications in the endpoint registry.\n# TYPE evmesh_api_apps gauge\n"
           << "evmesh_api_apps{" << lbl << "} " << s.apps << "\n"
           << "# HELP evmesh_api_endpoints Registered endpoints.\n# TYPE evmesh_api_endpoints gauge\n"
           << "evmesh_api_endpoints{" << lbl << "} " << s.endpoints << "\n"
           << "# HELP evmesh_api_deliveries_in_flight Registry deliveries in flight.\n"
           << "# TYPE evmesh_api_deliveries_in_flight gauge\n"
           << "evmesh_api_deliveries_in_flight{" << lbl << "} " << s.in_flight << "\n"
           << "# HELP evmesh_api_deliveries_total Registry delivery rows and attempts by outcome.\n"
           << "# TYPE evmesh_api_deliveries_total counter\n";
        const std::pair<const char*, std::uint64_t> rows[] = {
            {"accepted", s.accepted}, {"duplicate", s.duplicates}, {"attempted", s.attempts}, {"delivered", s.delivered},
            {"retried", s.retried},   {"dead", s.dead},            {"disabled", s.disabled}};
        for (const auto& [k, v] : rows) {
            os << "evmesh_api_deliveries_total{" << lbl << ",outcome=\"" << k << "\"} " << v << "\n";
        }
    }
    std::lock_guard lk(counters_m_);
    std::string last_family;
    for (const auto& [series, v] : counters_) {
        const auto family = series.substr(0, series.find('{'));
        if (family != last_family) {
            static const std::map<std::string, std::string> help = {
                {"evmesh_api_requests_total", "API requests answered, by method and status code."},
                {"evmesh_api_auth_failures_total", "API requests refused for a missing or invalid key."},
                {"evmesh_api_rate_limited_total", "API requests refused by a key's rate limit (429)."},
                {"evmesh_api_ingest_total", "Inbound webhooks accepted for publishing, by source."},
                {"evmesh_api_ingest_rejected_total", "Inbound webhooks refused, by source and reason."}};
            const auto h = help.find(family);
            os << "# HELP " << family << " " << (h != help.end() ? h->second : family) << "\n# TYPE " << family
               << " counter\n";
            last_family = family;
        }
        const auto brace = series.find('{');
        if (brace == std::string::npos) {
            os << family << "{" << lbl << "} " << v << "\n";
        } else {
            os << family << "{" << lbl << "," << series.substr(brace + 1) << " " << v << "\n";
        }
    }
    return os.str();
}

}  // namespace evmesh::app
