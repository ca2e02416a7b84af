#include "registry.hpp"
#include "ce_render.hpp"

#include <arpa/inet.h>
#include <curl/curl.h>
#include <netinet/in.h>
#include <openssl/evp.h>
#include <openssl/hmac.h>
#include <sys/socket.h>

#include <algorithm>
#include <atomic>
#include <condition_variable>
#include <cstring>
#include <deque>
#include <map>
#include <random>
#include <set>
#include <thread>
#include <unordered_map>
#include <unordered_set>

#include <nlohmann/json.hpp>
#include <spdlog/spdlog.h>

#include <evmesh/channels.hpp>

#include "channels/common.hpp"  // cloudevent_json: the same CloudEvents JSON as the webhook channel
#include "config.hpp"

namespace evmesh::app {

using json = nlohmann::json;

namespace {

std::string b64(const std::string& raw) {
    std::string out(4 * ((raw.size() + 2) / 3) + 1, '\0');
    const int n = EVP_EncodeBlock(reinterpret_cast<unsigned char*>(out.data()),
                                  reinterpret_cast<const unsigned char*>(raw.data()), static_cast<int>(raw.size()));
    out.resize(static_cast<std::size_t>(n));
    return out;
}

bool unb64(const std::string& in, std::string& out) {
    if (in.empty() || in.size() % 4 != 0) {
        return false;
    }
    out.assign(3 * in.size() / 4 + 1, '\0');
    const int n = EVP_DecodeBlock(reinterpret_cast<unsigned char*>(out.data()),
                                  reinterpret_cast<const unsigned char*>(in.data()), static_cast<int>(in.size()));
    if (n < 0) {
        return false;
    }
    auto len = static_cast<std::size_t>(n);
    for (std::size_t i = in.size(); i > 0 && in[i - 1] == '='; --i) {
        --len;
    }
    out.resize(len);
    return true;
}

// The key bytes of a "whsec_<base64>" secret; empty when malformed.
std::string secret_key(const std::string& secret) {
    constexpr std::string_view prefix = "whsec_";
    std::string key;
    if (secret.compare(0, prefix.size(), prefix) != 0 || !unb64(secret.substr(prefix.size()), key)) {
        return {};
    }
    return key;
}

std::int64_t steady_us() {
    return std::chrono::duration_cast<std::chrono::microseconds>(std::chrono::steady_clock::now().time_since_epoch())
        .count();
}

bool private_address(const sockaddr* sa) {
    if (sa->sa_family == AF_INET) {
        const auto a = ntohl(reinterpret_cast<const sockaddr_in*>(sa)->sin_addr.s_addr);
        const auto in = [&](std::uint32_t net, int bits) { return (a >> (32 - bits)) == (net >> (32 - bits)); };
        return in(0x00000000, 8) || in(0x0A000000, 8) || in(0x7F000000, 8) || in(0xA9FE0000, 16) ||
               in(0xAC100000, 12) || in(0xC0A80000, 16) || in(0x64400000, 10);
    }
    if (sa->sa_family == AF_INET6) {
        const auto* b = reinterpret_cast<const sockaddr_in6*>(sa)->sin6_addr.s6_addr;
        static const unsigned char loop[16] = {0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1};
        static const unsigned char zero[16] = {};
        static const unsigned char mapped[12] = {0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff};
        if (std::memcmp(b, loop, 16) == 0 || std::memcmp(b, zero, 16) == 0 || (b[0] & 0xfe) == 0xfc ||
            (b[0] == 0xfe && (b[1] & 0xc0) == 0x80)) {
            return true;
        }
        if (std::memcmp(b, mapped, 12) == 0) {
            sockaddr_in v4{};
            v4.sin_family = AF_INET;
            std::memcpy(&v4.sin_addr, b + 12, 4);
            return private_address(reinterpret_cast<const sockaddr*>(&v4));
        }
    }
    return false;
}

bool valid_id(const std::string& s) {
    if (s.empty() || s.size() > 64) {
        return false;
    }
    return std::all_of(s.begin(), s.end(), [](char c) {
        return (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9') || c == '_' || c == '-' ||
               c == '.';
    });
}

bool header_name_ok(const std::string& s) {
    if (s.empty() || s.size() > 128) {
        return false;
    }
    for (char c : s) {
        const bool ok = (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9') || c == '-' ||
                        c == '_';
        if (!ok) {
            return false;
        }
    }
    std::string lower(s);
    std::transform(lower.begin(), lower.end(), lower.begin(), [](unsigned char c) { return std::tolower(c); });
    return lower != "host" && lower.rfind("content-", 0) != 0 && lower != "transfer-encoding" &&
           lower != "connection" && lower.rfind("webhook-", 0) != 0;
}

// The subscription that covers `pattern`: its first segment with ".>" (and the literal itself for a
// one-segment pattern), or ">" for a pattern starting with a wildcard. Few subscriptions (one per
// first segment) however many endpoints; the dispatcher matches each endpoint's patterns itself.
std::vector<std::string> covering(const std::string& pattern) {
    const auto dot = pattern.find('.');
    const std::string first = pattern.substr(0, dot);
    if (first == "*" || first == ">") {
        return {">"};
    }
    if (dot == std::string::npos) {
        return {first};
    }
    return {first + ".>"};
}

struct api_fail {
    int status;
    std::string code, message, field;
};

[[noreturn]] void fail(int status, std::string code, std::string message, std::string field = {}) {
    throw api_fail{status, std::move(code), std::move(message), std::move(field)};
}

std::string param_or(const http_request& req, const std::string& name, const std::string& def) {
    return req.has_param(name) ? req.param(name) : def;
}

std::size_t limit_param(const http_request& req) {
    const auto s = param_or(req, "limit", "50");
    char* end = nullptr;
    const long v = std::strtol(s.c_str(), &end, 10);
    if (end == s.c_str() || *end != '\0' || v < 1 || v > 250) {
        fail(400, "bad_parameter", "limit must be an integer from 1 to 250", "limit");
    }
    return static_cast<std::size_t>(v);
}

json parse_body(const http_request& req) {
    if (req.body.empty()) {
        return json::object();
    }
    auto j = json::parse(req.body, nullptr, false);
    if (j.is_discarded() || !j.is_object()) {
        fail(400, "bad_json", "the body must be a JSON object");
    }
    return j;
}

// A time parameter: Unix milliseconds or RFC 3339 ("2026-12-01T10:00:00Z", fraction optional).
std::int64_t time_value(const json& v, const char* field) {
    if (v.is_number_integer()) {
        return v.get<std::int64_t>();
    }
    if (v.is_string()) {
        const auto s = v.get<std::string>();
        std::tm tm{};
        int ms = 0;
        const char* rest = strptime(s.c_str(), "%Y-%m-%dT%H:%M:%S", &tm);
        if (rest != nullptr) {
            if (*rest == '.') {
                ++rest;
                int digits = 0;
                while (*rest >= '0' && *rest <= '9') {
                    if (digits < 3) {
                        ms = ms * 10 + (*rest - '0');
                    }
                    ++digits;
                    ++rest;
                }
                for (; digits < 3; ++digits) {
                    ms *= 10;
                }
            }
            if (std::string_view(rest) == "Z") {
                return static_cast<std::int64_t>(timegm(&tm)) * 1000 + ms;
            }
        }
    }
    fail(400, "bad_attribute", std::string(field) + " must be Unix milliseconds or an RFC 3339 UTC time", field);
}

constexpr int st_pending = 0, st_delivered = 2, st_dead = 3;

}  // namespace

std::string new_webhook_secret() {
    std::string raw(24, '\0');
    const auto hex = random_hex(24);
    for (std::size_t i = 0; i < 24; ++i) {
        raw[i] = static_cast<char>(std::stoi(hex.substr(2 * i, 2), nullptr, 16));
    }
    return "whsec_" + b64(raw);
}

std::string standard_webhooks_sign(const std::string& secret, const std::string& id, const std::string& timestamp,
                                   const std::string& body) {
    const auto key = secret_key(secret);
    if (key.empty()) {
        return {};
    }
    const std::string msg = id + "." + timestamp + "." + body;
    unsigned char mac[EVP_MAX_MD_SIZE];
    unsigned int len = 0;
    HMAC(EVP_sha256(), key.data(), static_cast<int>(key.size()), reinterpret_cast<const unsigned char*>(msg.data()),
         msg.size(), mac, &len);
    return "v1," + b64(std::string(reinterpret_cast<const char*>(mac), len));
}

struct registry::impl {
    node& n;
    api_store& store;
    registry_options o;
    explicit impl(node& nd, api_store& s, registry_options opt) : n(nd), store(s), o(std::move(opt)) {}

    // ---- endpoints (under store.m) ----
    struct endpoint {
        std::string id, app_id, url, description, secret, old_secret;
        std::vector<std::string> topics;
        json headers = json::object();
        double rate_limit = 0;
        std::vector<std::int64_t> schedule;  // ms before each attempt
        int concurrency = 4;
        bool disabled = false;
        std::string disabled_reason;
        std::int64_t old_until = 0, created = 0, updated = 0;
        // runtime
        std::vector<topic_pattern> patterns;
        int in_flight = 0;
        std::unordered_set<std::int64_t> rows_in_flight;
        double tokens = 0;
        std::int64_t refill_us = 0;
        std::int64_t scheduled_at = -1;  // -1: not in the due queue
        bool saturated = false;          // rescheduled when a slot frees
    };
    std::unordered_map<std::string, std::shared_ptr<endpoint>> eps;
    std::unordered_map<std::string, std::set<std::string>> exact;    // topic -> endpoint ids
    std::map<std::string, std::pair<topic_pattern, std::set<std::string>>> wild;  // pattern -> ids
    std::set<std::pair<std::int64_t, std::string>> due;  // (steady ms, endpoint id)
    std::size_t app_count = 0;

    // counters (under store.m)
    registry_stats counters;

    // ---- intake ----
    std::mutex intake_m;
    std::condition_variable intake_cv;
    std::deque<event> intake;

    // ---- subscriptions (covering pattern -> refcount, subscription) ----
    std::mutex subs_m;
    std::map<std::string, std::pair<int, subscription>> subs;

    // ---- dispatcher ----
    CURLM* multi = nullptr;
    std::thread thread;
    std::atomic<bool> stopping{false};
    std::mt19937_64 rng{std::random_device{}()};
    std::int64_t last_purge_ms = 0;

    struct transfer {
        CURL* easy = nullptr;
        curl_slist* headers = nullptr;
        std::string body, endpoint_id, message_id, response;
        std::int64_t row = 0, started_us = 0;
        int attempt = 0;
        long retry_after_s = -1;
        bool blocked_address = false;
        bool allow_private = false;
        CURLcode result = CURLE_OK;
        char errbuf[CURL_ERROR_SIZE] = {};
    };

    std::unordered_set<transfer*> live;  // dispatcher thread only

    static void release(transfer* t) {
        curl_slist_free_all(t->headers);
        curl_easy_cleanup(t->easy);
        delete t;
    }

    static std::int64_t steady_ms() { return steady_us() / 1000; }

    // ---------------------------------------------------------------------------------------
    // cache maintenance (under store.m)

    void index(const std::shared_ptr<endpoint>& e) {
        for (const auto& p : e->patterns) {
            if (p.exact()) {
                exact[p.text()].insert(e->id);
            } else {
                auto [it, _] = wild.try_emplace(p.text(), p, std::set<std::string>{});
                it->second.second.insert(e->id);
            }
        }
    }

    void unindex(const endpoint& e) {
        for (const auto& p : e.patterns) {
            if (p.exact()) {
                if (auto it = exact.find(p.text()); it != exact.end()) {
                    it->second.erase(e.id);
                    if (it->second.empty()) {
                        exact.erase(it);
                    }
                }
            } else if (auto it = wild.find(p.text()); it != wild.end()) {
                it->second.second.erase(e.id);
                if (it->second.second.empty()) {
                    wild.erase(it);
                }
            }
        }
    }

    void schedule(endpoint& e, std::int64_t at) {
        if (e.scheduled_at >= 0) {
            if (e.scheduled_at <= at) {
                return;
            }
            due.erase({e.scheduled_at, e.id});
        }
        e.scheduled_at = at;
        due.insert({at, e.id});
    }

    static std::shared_ptr<endpoint> row_to_endpoint(sql::statement& s) {
        auto e = std::make_shared<endpoint>();
        e->id = std::string(s.text(0));
        e->app_id = std::string(s.text(1));
        e->url = std::string(s.text(2));
        e->description = std::string(s.text(3));
        for (const auto& t : json::parse(s.text(4), nullptr, false)) {
            e->topics.push_back(t.get<std::string>());
            if (auto p = topic_pattern::parse(e->topics.back()); p) {
                e->patterns.push_back(std::move(*p));
            }
        }
        e->secret = std::string(s.text(5));
        e->old_secret = std::string(s.text(6));
        e->old_until = s.i64(7);
        e->headers = json::parse(s.text(8), nullptr, false);
        if (!e->headers.is_object()) {
            e->headers = json::object();
        }
        e->rate_limit = s.f64(9);
        const auto retry = json::parse(s.text(10), nullptr, false);
        if (retry.is_array() && !retry.empty()) {
            for (const auto& d : retry) {
                e->schedule.push_back(d.get<std::int64_t>());
            }
        } else {
            for (auto d : channels::standard_webhooks_schedule()) {
                e->schedule.push_back(d.count());
            }
        }
        e->concurrency = static_cast<int>(s.i64(11));
        e->disabled = s.i64(12) != 0;
        e->disabled_reason = std::string(s.text(13));
        e->created = s.i64(14);
        e->updated = s.i64(15);
        e->tokens = std::max(1.0, e->rate_limit);
        return e;
    }

    static constexpr const char* endpoint_columns =
        "id, app_id, url, description, topics, secret, old_secret, old_secret_until_ms, headers, rate_limit, retry, "
        "concurrency, disabled, disabled_reason, created_ms, updated_ms";

    void load() {
        sql::statement s(store.db, (std::string("SELECT ") + endpoint_columns + " FROM endpoints").c_str());
        const auto now = steady_ms();
        while (s.step()) {
            auto e = row_to_endpoint(s);
            index(e);
            schedule(*e, now);  // pending rows from before a restart (in flight at a crash included)
            eps[e->id] = e;
        }
        sql::statement c(store.db, "SELECT COUNT(*) FROM apps");
        c.step();
        app_count = static_cast<std::size_t>(c.i64(0));
    }

    // ---------------------------------------------------------------------------------------
    // subscriptions

    bool subscribe_patterns(const std::vector<std::string>& patterns, std::string& error) {
        std::set<std::string> cover;
        for (const auto& p : patterns) {
            for (auto& c : covering(p)) {
                cover.insert(std::move(c));
            }
        }
        std::lock_guard lk(subs_m);
        for (const auto& c : cover) {
            auto it = subs.find(c);
            if (it != subs.end()) {
                ++it->second.first;
                continue;
            }
            auto sub = n.subscribe(c, [this](const event_view& v) { take(v); });
            if (!sub) {
                error = "cannot subscribe to '" + c + "': " + sub.error().message();
                return false;
            }
            subs.emplace(c, std::make_pair(1, std::move(*sub)));
        }
        return true;
    }

    void unsubscribe_patterns(const std::vector<std::string>& patterns) {
        std::set<std::string> cover;
        for (const auto& p : patterns) {
            for (auto& c : covering(p)) {
                cover.insert(std::move(c));
            }
        }
        std::vector<subscription> closing;
        {
            std::lock_guard lk(subs_m);
            for (const auto& c : cover) {
                if (auto it = subs.find(c); it != subs.end() && --it->second.first == 0) {
                    closing.push_back(std::move(it->second.second));
                    subs.erase(it);
                }
            }
        }
        // closed outside the lock: close() joins the subscription's thread, which may be in take()
    }

    void take(const event_view& v) {
        if (v.topic.substr(0, 8) == "_evmesh.") {
            return;
        }
        std::unique_lock lk(intake_m);
        intake_cv.wait(lk, [&] { return intake.size() < o.intake_limit || stopping.load(); });
        if (stopping) {
            return;
        }
        intake.push_back(v.to_event());
        lk.unlock();
        curl_multi_wakeup(multi);
    }

    // ---------------------------------------------------------------------------------------
    // the dispatcher thread

    static std::string render(const event& ev) { return render_cloudevent_json(ev); }

    // Stores what arrived: the message once, one delivery row per matching enabled endpoint.
    void store_intake() {
        std::deque<event> batch;
        {
            std::lock_guard lk(intake_m);
            batch.swap(intake);
        }
        if (batch.empty()) {
            return;
        }
        intake_cv.notify_all();
        // render outside the lock
        std::vector<std::string> bodies(batch.size());
        std::lock_guard lk(store.m);
        const auto now = wall_ms();
        const auto now_steady = steady_ms();
        for (;;) {
            try {
                sql::transaction tx(store.db);
                sql::statement msg(store.db, "INSERT OR IGNORE INTO messages(id, topic, body, received_ms) VALUES(?,?,?,?)");
                sql::statement del(store.db, "INSERT OR IGNORE INTO deliveries(message_id, endpoint_id, next_ms, accepted_ms) "
                                             "VALUES(?,?,?,?)");
                std::vector<std::string> touched;
                std::uint64_t accepted = 0, dups = 0;
                for (std::size_t i = 0; i < batch.size(); ++i) {
                    const auto& ev = batch[i];
                    std::set<std::string> match;
                    if (auto it = exact.find(ev.topic); it != exact.end()) {
                        match.insert(it->second.begin(), it->second.end());
                    }
                    for (const auto& [text, entry] : wild) {
                        if (entry.first.matches(ev.topic)) {
                            match.insert(entry.second.begin(), entry.second.end());
                        }
                    }
                    bool stored = false;
                    const auto id = to_string(ev.id);
                    for (const auto& ep_id : match) {
                        const auto& e = eps.at(ep_id);
                        if (e->disabled) {
                            continue;
                        }
                        if (!stored) {
                            if (bodies[i].empty()) {
                                bodies[i] = render(ev);
                            }
                            msg.bind(1, id).bind(2, ev.topic).bind(3, bodies[i]).bind(4, now);
                            msg.run();
                            stored = true;
                        }
                        del.bind(1, id).bind(2, ep_id).bind(3, now).bind(4, now);
                        del.run();
                        if (store.db.changes() > 0) {
                            ++accepted;
                            touched.push_back(ep_id);
                        } else {
                            ++dups;
                        }
                    }
                }
                tx.commit();
                counters.accepted += accepted;
                counters.duplicates += dups;
                for (const auto& id : touched) {
                    schedule(*eps.at(id), now_steady);
                }
                return;
            } catch (const sql::sqlite_error& e) {
                if (!e.transient() || stopping) {
                    spdlog::error("registry: cannot store {} events: {}", batch.size(), e.what());
                    return;
                }
                spdlog::warn("registry: store failed ({}), retrying", e.what());
                store.m.unlock();
                std::this_thread::sleep_for(std::chrono::milliseconds(200));
                store.m.lock();
            }
        }
    }

    static curl_socket_t open_socket(void* clientp, curlsocktype, curl_sockaddr* addr) {
        auto* t = static_cast<transfer*>(clientp);
        if (!t->allow_private && private_address(&addr->addr)) {
            t->blocked_address = true;
            return CURL_SOCKET_BAD;
        }
        return ::socket(addr->family, addr->socktype | SOCK_CLOEXEC, addr->protocol);
    }

    static size_t on_header(char* p, size_t size, size_t n, void* ud) {
        auto* t = static_cast<transfer*>(ud);
        std::string_view line(p, size * n);
        if (line.size() > 12 && (line[0] == 'R' || line[0] == 'r')) {
            std::string lower(line.substr(0, 12));
            std::transform(lower.begin(), lower.end(), lower.begin(), [](unsigned char c) { return std::tolower(c); });
            if (lower == "retry-after:") {
                t->retry_after_s = std::strtol(std::string(line.substr(12)).c_str(), nullptr, 10);
            }
        }
        return size * n;
    }

    static size_t on_body(char* p, size_t size, size_t n, void* ud) {
        auto* t = static_cast<transfer*>(ud);
        if (t->response.size() < 256) {
            t->response.append(p, std::min<std::size_t>(size * n, 256 - t->response.size()));
        }
        return size * n;
    }

    void start_transfer(endpoint& e, std::int64_t row, const std::string& message_id, int attempts,
                        const std::string& body) {
        auto* t = new transfer;
        t->endpoint_id = e.id;
        t->message_id = message_id;
        t->row = row;
        t->attempt = attempts + 1;
        t->body = body;
        t->allow_private = o.allow_private_urls;
        t->started_us = steady_us();
        const auto ts = std::to_string(wall_ms() / 1000);
        std::string sig = standard_webhooks_sign(e.secret, message_id, ts, t->body);
        if (!e.old_secret.empty() && wall_ms() < e.old_until) {
            sig += " " + standard_webhooks_sign(e.old_secret, message_id, ts, t->body);
        }
        auto add = [&](const std::string& h) { t->headers = curl_slist_append(t->headers, h.c_str()); };
        add("Content-Type: application/cloudevents+json");
        add("webhook-id: " + message_id);
        add("webhook-timestamp: " + ts);
        add("webhook-signature: " + sig);
        add("User-Agent: evmesh/0.1");
        add("Expect:");
        for (const auto& [k, v] : e.headers.items()) {
            if (v.is_string()) {
                add(k + ": " + v.get<std::string>());
            }
        }
        t->easy = curl_easy_init();
        CURL* c = t->easy;
        curl_easy_setopt(c, CURLOPT_URL, e.url.c_str());
        curl_easy_setopt(c, CURLOPT_POST, 1L);
        curl_easy_setopt(c, CURLOPT_POSTFIELDS, t->body.data());
        curl_easy_setopt(c, CURLOPT_POSTFIELDSIZE_LARGE, static_cast<curl_off_t>(t->body.size()));
        curl_easy_setopt(c, CURLOPT_HTTPHEADER, t->headers);
        curl_easy_setopt(c, CURLOPT_PROTOCOLS_STR, "http,https");
        curl_easy_setopt(c, CURLOPT_FOLLOWLOCATION, 0L);
        curl_easy_setopt(c, CURLOPT_NOSIGNAL, 1L);
        curl_easy_setopt(c, CURLOPT_TIMEOUT_MS, static_cast<long>(o.request_timeout.count()));
        curl_easy_setopt(c, CURLOPT_CONNECTTIMEOUT_MS, static_cast<long>(o.connect_timeout.count()));
        curl_easy_setopt(c, CURLOPT_OPENSOCKETFUNCTION, &impl::open_socket);
        curl_easy_setopt(c, CURLOPT_OPENSOCKETDATA, t);
        curl_easy_setopt(c, CURLOPT_HEADERFUNCTION, &impl::on_header);
        curl_easy_setopt(c, CURLOPT_HEADERDATA, t);
        curl_easy_setopt(c, CURLOPT_WRITEFUNCTION, &impl::on_body);
        curl_easy_setopt(c, CURLOPT_WRITEDATA, t);
        curl_easy_setopt(c, CURLOPT_ERRORBUFFER, t->errbuf);
        curl_easy_setopt(c, CURLOPT_PRIVATE, t);
        curl_multi_add_handle(multi, c);
        live.insert(t);
        ++e.in_flight;
        e.rows_in_flight.insert(row);
        ++counters.in_flight;
        ++counters.attempts;
    }

    // Starts what is due, endpoint by endpoint (under store.m).
    void start_due() {
        const auto now = steady_ms();
        const auto now_us = steady_us();
        sql::statement q(store.db,
                         "SELECT d.id, d.message_id, d.attempts, m.body FROM deliveries d JOIN messages m ON m.id = "
                         "d.message_id WHERE d.endpoint_id = ? AND d.status = 0 AND d.next_ms <= ? ORDER BY d.next_ms, "
                         "d.id LIMIT ?");
        sql::statement next(store.db,
                            "SELECT COALESCE(MIN(next_ms), -1) FROM deliveries WHERE endpoint_id = ? AND status = 0 AND next_ms > ?");
        const auto wall = wall_ms();
        while (!due.empty() && due.begin()->first <= now) {
            if (counters.in_flight >= static_cast<std::uint64_t>(o.max_in_flight)) {
                return;  // resumes when a transfer completes
            }
            const auto [at, id] = *due.begin();
            due.erase(due.begin());
            auto it = eps.find(id);
            if (it == eps.end()) {
                continue;
            }
            auto& e = *it->second;
            e.scheduled_at = -1;
            if (e.disabled) {
                continue;
            }
            int free = e.concurrency - e.in_flight;
            if (free <= 0) {
                e.saturated = true;
                continue;
            }
            if (e.rate_limit > 0) {
                e.tokens = std::min(std::max(1.0, e.rate_limit),
                                    e.tokens + e.rate_limit * static_cast<double>(now_us - e.refill_us) / 1e6);
                e.refill_us = now_us;
                if (e.tokens < 1.0) {
                    schedule(e, now + static_cast<std::int64_t>((1.0 - e.tokens) / e.rate_limit * 1000.0) + 1);
                    continue;
                }
                free = std::min(free, static_cast<int>(e.tokens));
            }
            free = std::min<int>(free, o.max_in_flight - static_cast<int>(counters.in_flight));
            q.bind(1, e.id).bind(2, wall).bind(3, static_cast<std::int64_t>(free + e.in_flight));
            int started = 0, rows = 0;
            while (q.step()) {
                ++rows;
                const auto row = q.i64(0);
                if (started >= free || e.rows_in_flight.count(row) != 0) {
                    continue;
                }
                start_transfer(e, row, std::string(q.text(1)), static_cast<int>(q.i64(2)), std::string(q.text(3)));
                ++started;
                if (e.rate_limit > 0) {
                    e.tokens -= 1.0;
                }
            }
            q.reset();
            (void)rows;
            if (started == free) {
                // every slot it may use now is busy; maybe more is due: look again when a slot
                // frees (completion) or, when the rate limit held it back, in a moment
                if (e.in_flight >= e.concurrency) {
                    e.saturated = true;
                } else {
                    schedule(e, now + 1);
                }
                continue;
            }
            // everything due is in flight: wake at the earliest retry (completions reschedule too)
            next.bind(1, e.id).bind(2, wall);
            next.step();
            const auto n_ms = next.i64(0);
            next.reset();
            if (n_ms >= 0) {
                schedule(e, now + (n_ms - wall));
            }
        }
    }

    std::int64_t retry_delay(const endpoint& e, int attempt, long retry_after_s) {
        // attempt = attempts made so far; the schedule's entry `attempt` is the next one's delay
        auto d = static_cast<double>(e.schedule[static_cast<std::size_t>(attempt)]);
        d *= 1.0 + std::uniform_real_distribution<double>(-0.1, 0.1)(rng);
        if (retry_after_s > 0) {
            d = std::max(d, std::min(static_cast<double>(retry_after_s) * 1000.0, 24.0 * 3600 * 1000));
        }
        return static_cast<std::int64_t>(d);
    }

    void complete(std::vector<transfer*>& done) {
        std::lock_guard lk(store.m);
        const auto now = wall_ms();
        const auto now_steady = steady_ms();
        try {
            sql::transaction tx(store.db);
            sql::statement ok(store.db, "UPDATE deliveries SET status = 2, attempts = ?, done_ms = ?, last_code = ?, "
                                        "last_detail = '' WHERE id = ?");
            sql::statement retry(store.db, "UPDATE deliveries SET status = ?, attempts = ?, next_ms = ?, done_ms = ?, "
                                           "last_code = ?, last_detail = ? WHERE id = ?");
            sql::statement log(store.db, "INSERT INTO attempts(endpoint_id, message_id, attempt, time_ms, latency_us, "
                                         "outcome, code, detail) VALUES(?,?,?,?,?,?,?,?)");
            sql::statement dis(store.db, "UPDATE endpoints SET disabled = 1, disabled_reason = ?, updated_ms = ? WHERE id = ?");
            for (auto* t : done) {
                long code = 0;
                curl_easy_getinfo(t->easy, CURLINFO_RESPONSE_CODE, &code);
                const auto latency = steady_us() - t->started_us;
                auto it = eps.find(t->endpoint_id);
                if (it == eps.end()) {
                    continue;  // deleted meanwhile (its rows went with it)
                }
                auto& e = *it->second;
                std::string outcome, detail;
                const CURLcode rc = t->result;
                if (rc == CURLE_OK && code >= 200 && code < 300) {
                    outcome = "delivered";
                    ok.bind(1, static_cast<std::int64_t>(t->attempt)).bind(2, now).bind(3, static_cast<std::int64_t>(code))
                        .bind(4, t->row);
                    ok.run();
                    ++counters.delivered;
                } else {
                    if (rc != CURLE_OK) {
                        detail = t->blocked_address ? "address not allowed (private or loopback; api.allow_private_urls)"
                                                    : std::string(t->errbuf[0] != 0 ? t->errbuf : curl_easy_strerror(rc));
                        code = 0;
                    } else {
                        detail = "HTTP " + std::to_string(code) + (t->response.empty() ? "" : ": " + t->response);
                    }
                    if (code == 410) {
                        outcome = "disabled";
                        e.disabled = true;
                        e.disabled_reason = "the endpoint answered 410 Gone";
                        dis.bind(1, e.disabled_reason).bind(2, now).bind(3, e.id);
                        dis.run();
                        ++counters.disabled;
                        // the event stays pending with its attempts: delivered once re-enabled
                        retry.bind(1, static_cast<std::int64_t>(st_pending)).bind(2, static_cast<std::int64_t>(t->attempt - 1))
                            .bind(3, now).bind(4, 0).bind(5, static_cast<std::int64_t>(code)).bind(6, detail).bind(7, t->row);
                        retry.run();
                    } else if (static_cast<std::size_t>(t->attempt) >= e.schedule.size()) {
                        outcome = "dead";
                        retry.bind(1, static_cast<std::int64_t>(st_dead)).bind(2, static_cast<std::int64_t>(t->attempt))
                            .bind(3, now).bind(4, now).bind(5, static_cast<std::int64_t>(code)).bind(6, detail).bind(7, t->row);
                        retry.run();
                        ++counters.dead;
                    } else {
                        outcome = "retry";
                        const auto delay = retry_delay(e, t->attempt, t->retry_after_s);
                        retry.bind(1, static_cast<std::int64_t>(st_pending)).bind(2, static_cast<std::int64_t>(t->attempt))
                            .bind(3, now + delay).bind(4, 0).bind(5, static_cast<std::int64_t>(code)).bind(6, detail)
                            .bind(7, t->row);
                        retry.run();
                        ++counters.retried;
                    }
                }
                log.bind(1, e.id).bind(2, t->message_id).bind(3, static_cast<std::int64_t>(t->attempt)).bind(4, now)
                    .bind(5, latency).bind(6, outcome).bind(7, static_cast<std::int64_t>(code)).bind(8, detail);
                log.run();
            }
            tx.commit();
        } catch (const sql::sqlite_error& ex) {
            // not committed: the rows stay pending and are attempted again (at-least-once)
            spdlog::error("registry: cannot record {} delivery outcomes: {}", done.size(), ex.what());
        }
        for (auto* t : done) {
            if (auto it = eps.find(t->endpoint_id); it != eps.end()) {
                auto& e = *it->second;
                --e.in_flight;
                e.rows_in_flight.erase(t->row);
                e.saturated = false;
                schedule(e, now_steady);
            }
            --counters.in_flight;
            live.erase(t);
            release(t);
        }
        done.clear();
    }

    void purge() {
        const auto now = wall_ms();
        if (now - last_purge_ms < 60000) {
            return;
        }
        last_purge_ms = now;
        std::lock_guard lk(store.m);
        try {
            const auto before = now - o.retention.count();
            sql::statement a(store.db, "DELETE FROM deliveries WHERE status = 2 AND done_ms < ?");
            a.bind(1, before);
            a.run();
            sql::statement b(store.db, "DELETE FROM attempts WHERE time_ms < ?");
            b.bind(1, before);
            b.run();
            sql::statement c(store.db, "DELETE FROM messages WHERE received_ms < ? AND NOT EXISTS "
                                       "(SELECT 1 FROM deliveries d WHERE d.message_id = messages.id)");
            c.bind(1, before);
            c.run();
        } catch (const sql::sqlite_error& e) {
            spdlog::warn("registry: purge failed: {}", e.what());
        }
    }

    void run() {
        std::vector<transfer*> done;
        while (!stopping) {
            store_intake();
            {
                std::lock_guard lk(store.m);
                try {
                    start_due();
                } catch (const sql::sqlite_error& e) {
                    spdlog::warn("registry: cannot read due deliveries: {}", e.what());
                }
            }
            int running = 0;
            curl_multi_perform(multi, &running);
            int left = 0;
            while (CURLMsg* msg = curl_multi_info_read(multi, &left)) {
                if (msg->msg == CURLMSG_DONE) {
                    transfer* t = nullptr;
                    curl_easy_getinfo(msg->easy_handle, CURLINFO_PRIVATE, &t);
                    t->result = msg->data.result;
                    curl_multi_remove_handle(multi, msg->easy_handle);
                    done.push_back(t);
                }
            }
            if (!done.empty()) {
                complete(done);
                continue;
            }
            purge();
            int wait_ms = 1000;
            {
                std::lock_guard lk(store.m);
                if (!due.empty() && counters.in_flight < static_cast<std::uint64_t>(o.max_in_flight)) {
                    wait_ms = static_cast<int>(std::clamp<std::int64_t>(due.begin()->first - steady_ms(), 0, 1000));
                }
            }
            {
                std::lock_guard lk(intake_m);
                if (!intake.empty()) {
                    wait_ms = 0;
                }
            }
            if (wait_ms > 0) {
                curl_multi_poll(multi, nullptr, 0, wait_ms, nullptr);
            }
        }
        // stop: transfers in flight are abandoned; their rows stay pending and are redelivered
        for (auto* t : live) {
            curl_multi_remove_handle(multi, t->easy);
            release(t);
        }
        live.clear();
        std::lock_guard lk(store.m);
        counters.in_flight = 0;
        for (auto& [id, e] : eps) {
            e->in_flight = 0;
            e->rows_in_flight.clear();
        }
    }

    void wake() {
        if (multi != nullptr) {
            curl_multi_wakeup(multi);
        }
    }

    // ---------------------------------------------------------------------------------------
    // the HTTP API (docs/API.md); handlers run on the HTTP server's pool

    static json app_json(sql::statement& s) {
        return {{"id", std::string(s.text(0))},
                {"name", std::string(s.text(1))},
                {"metadata", json::parse(s.text(2), nullptr, false)},
                {"created_at", rfc3339_ms(s.i64(3))},
                {"updated_at", rfc3339_ms(s.i64(4))}};
    }

    static json endpoint_json(const endpoint& e) {
        return {{"id", e.id},
                {"app_id", e.app_id},
                {"url", e.url},
                {"description", e.description},
                {"topics", e.topics},
                {"headers", e.headers},
                {"rate_limit", e.rate_limit},
                {"concurrency", e.concurrency},
                {"retry", {{"schedule_ms", e.schedule}}},
                {"disabled", e.disabled},
                {"disabled_reason", e.disabled_reason},
                {"created_at", rfc3339_ms(e.created)},
                {"updated_at", rfc3339_ms(e.updated)}};
    }

    // Applies the fields of a create or update body to `e`; validates each.
    void apply_fields(const json& b, endpoint& e, bool create) {
        auto str = [&](const char* k, std::string& out, std::size_t max) {
            if (auto it = b.find(k); it != b.end()) {
                if (!it->is_string() || it->get<std::string>().size() > max) {
                    fail(400, "bad_attribute", std::string(k) + " must be a string of at most " + std::to_string(max) +
                                                   " bytes", k);
                }
                out = it->get<std::string>();
            }
        };
        for (const auto& [k, v] : b.items()) {
            static const std::set<std::string> known = {"url", "description", "topics", "secret", "headers",
                                                        "rate_limit", "retry", "disabled", "concurrency", "uid"};
            if (known.count(k) == 0) {
                fail(400, "unknown_field", "unknown field '" + k + "'", k);
            }
            (void)v;
        }
        str("url", e.url, 2048);
        if (create && !b.contains("url")) {
            fail(400, "missing_attribute", "url is required", "url");
        }
        if (b.contains("url")) {
            CURLU* u = curl_url();
            const bool ok = curl_url_set(u, CURLUPART_URL, e.url.c_str(), 0) == CURLUE_OK;
            char* scheme = nullptr;
            const bool http = ok && curl_url_get(u, CURLUPART_SCHEME, &scheme, 0) == CURLUE_OK &&
                              (std::string_view(scheme) == "http" || std::string_view(scheme) == "https");
            curl_free(scheme);
            curl_url_cleanup(u);
            if (!http) {
                fail(400, "bad_attribute", "url must be an absolute http:// or https:// URL", "url");
            }
        }
        str("description", e.description, 1024);
        if (auto it = b.find("topics"); it != b.end()) {
            if (!it->is_array() || it->empty() || it->size() > 64) {
                fail(400, "bad_attribute", "topics must be an array of 1 to 64 topic patterns", "topics");
            }
            e.topics.clear();
            e.patterns.clear();
            for (const auto& t : *it) {
                if (!t.is_string()) {
                    fail(400, "bad_pattern", "topics must be strings", "topics");
                }
                auto p = topic_pattern::parse(t.get<std::string>());
                if (!p) {
                    fail(400, "bad_pattern", "topics: '" + t.get<std::string>() + "' is not a topic pattern (dot-separated; * one segment; > the rest)",
                         "topics");
                }
                e.topics.push_back(t.get<std::string>());
                e.patterns.push_back(std::move(*p));
            }
        } else if (create) {
            e.topics = {">"};
            e.patterns = {*topic_pattern::parse(">")};
        }
        if (auto it = b.find("secret"); it != b.end()) {
            if (!it->is_string() || secret_key(it->get<std::string>()).size() < 24 ||
                secret_key(it->get<std::string>()).size() > 64) {
                fail(400, "bad_attribute", "secret must be \"whsec_\" and the base64 of 24 to 64 bytes", "secret");
            }
            e.secret = it->get<std::string>();
        } else if (create) {
            e.secret = new_webhook_secret();
        }
        if (auto it = b.find("headers"); it != b.end()) {
            if (!it->is_object() || it->size() > 32) {
                fail(400, "bad_attribute", "headers must be an object of at most 32 string values", "headers");
            }
            for (const auto& [k, v] : it->items()) {
                if (!header_name_ok(k) || !v.is_string() || v.get<std::string>().size() > 4096 ||
                    v.get<std::string>().find_first_of("\r\n") != std::string::npos) {
                    fail(400, "bad_attribute", "header '" + k + "' is not allowed (a token name, not Host, Content-*, "
                                               "Connection or webhook-*; a value without CR/LF)", "headers");
                }
            }
            e.headers = *it;
        }
        if (auto it = b.find("rate_limit"); it != b.end()) {
            if (!it->is_number() || it->get<double>() < 0 || it->get<double>() > 100000) {
                fail(400, "bad_attribute", "rate_limit must be a number of events per second from 0 (unlimited) to 100000",
                     "rate_limit");
            }
            e.rate_limit = it->get<double>();
            e.tokens = std::max(1.0, e.rate_limit);
        }
        if (auto it = b.find("concurrency"); it != b.end()) {
            if (!it->is_number_integer() || it->get<int>() < 1 || it->get<int>() > 64) {
                fail(400, "bad_attribute", "concurrency must be an integer from 1 to 64", "concurrency");
            }
            e.concurrency = it->get<int>();
        } else if (create) {
            e.concurrency = o.endpoint_concurrency;
        }
        if (auto it = b.find("retry"); it != b.end()) {
            const json* sched = it->is_object() ? &(*it)["schedule"] : nullptr;
            if (sched == nullptr || !sched->is_array() || sched->empty() || sched->size() > 100) {
                fail(400, "bad_attribute", "retry must be {\"schedule\": [delays]} with 1 to 100 delays", "retry");
            }
            e.schedule.clear();
            for (const auto& d : *sched) {
                std::chrono::milliseconds ms{0};
                if (d.is_number_integer() && d.get<std::int64_t>() >= 0) {
                    ms = std::chrono::milliseconds(d.get<std::int64_t>());
                } else if (!d.is_string() || !parse_duration(d.get<std::string>(), ms)) {
                    fail(400, "bad_attribute", "retry.schedule entries are milliseconds or durations (\"5s\", \"5m\")",
                         "retry.schedule");
                }
                e.schedule.push_back(ms.count());
            }
        } else if (create) {
            for (auto d : channels::standard_webhooks_schedule()) {
                e.schedule.push_back(d.count());
            }
        }
        if (auto it = b.find("disabled"); it != b.end()) {
            if (!it->is_boolean()) {
                fail(400, "bad_attribute", "disabled must be true or false", "disabled");
            }
            e.disabled = it->get<bool>();
            if (!e.disabled) {
                e.disabled_reason.clear();
            } else if (e.disabled_reason.empty()) {
                e.disabled_reason = "disabled over the API";
            }
        }
    }

    void write_endpoint(const endpoint& e, bool insert) {
        sql::statement s(store.db, insert ? "INSERT INTO endpoints(url, description, topics, secret, old_secret, "
                                            "old_secret_until_ms, headers, rate_limit, retry, concurrency, disabled, "
                                            "disabled_reason, created_ms, updated_ms, app_id, id) "
                                            "VALUES(?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?)"
                                          : "UPDATE endpoints SET url=?, description=?, topics=?, secret=?, old_secret=?, "
                                            "old_secret_until_ms=?, headers=?, rate_limit=?, retry=?, concurrency=?, "
                                            "disabled=?, disabled_reason=?, created_ms=?, updated_ms=? "
                                            "WHERE app_id=? AND id=?");
        s.bind(1, e.url).bind(2, e.description).bind(3, json(e.topics).dump()).bind(4, e.secret).bind(5, e.old_secret)
            .bind(6, e.old_until).bind(7, e.headers.dump()).bind_double(8, e.rate_limit).bind(9, json(e.schedule).dump())
            .bind(10, static_cast<std::int64_t>(e.concurrency)).bind(11, static_cast<std::int64_t>(e.disabled ? 1 : 0))
            .bind(12, e.disabled_reason).bind(13, e.created).bind(14, e.updated).bind(15, e.app_id).bind(16, e.id);
        s.run();
    }

    // The endpoint {app}/{ep} the principal may see (404 otherwise). Under store.m.
    std::shared_ptr<endpoint> find_endpoint(const principal& p, const std::string& app, const std::string& ep) {
        if (!p.app(app)) {
            fail(404, "not_found", "no application '" + app + "'");
        }
        auto it = eps.find(ep);
        if (it == eps.end() || it->second->app_id != app) {
            fail(404, "not_found", "no endpoint '" + ep + "' in application '" + app + "'");
        }
        return it->second;
    }

    void require_app(const principal& p, const std::string& app) {
        if (!p.app(app)) {
            fail(404, "not_found", "no application '" + app + "'");
        }
        sql::statement s(store.db, "SELECT 1 FROM apps WHERE id = ?");
        s.bind(1, app);
        if (!s.step()) {
            fail(404, "not_found", "no application '" + app + "'");
        }
    }

    void create_app(const http_request& req, http_response& res, const principal& p) {
        if (!p.admin()) {
            fail(403, "forbidden", "creating applications needs the admin scope");
        }
        auto b = parse_body(req);
        if (b.contains("id") && (!b["id"].is_string() || !valid_id(b["id"].get<std::string>()))) {
            fail(400, "bad_attribute", "id must be 1 to 64 characters of [A-Za-z0-9_.-]", "id");
        }
        std::string id = b.contains("id") ? b["id"].get<std::string>() : std::string();
        if (id.empty()) {
            id = "app_" + random_hex(8);
        }
        if (!b.contains("name") || !b["name"].is_string() || b["name"].get<std::string>().empty() ||
            b["name"].get<std::string>().size() > 256) {
            fail(400, "missing_attribute", "name is required: a string of 1 to 256 bytes", "name");
        }
        const json meta = b.value("metadata", json::object());
        if (!meta.is_object() || meta.dump().size() > 16384) {
            fail(400, "bad_attribute", "metadata must be an object of at most 16 KiB", "metadata");
        }
        for (const auto& [k, v] : b.items()) {
            if (k != "id" && k != "name" && k != "metadata") {
                fail(400, "unknown_field", "unknown field '" + k + "'", k);
            }
            (void)v;
        }
        const auto now = wall_ms();
        {
            std::lock_guard lk(store.m);
            sql::statement s(store.db, "INSERT OR IGNORE INTO apps(id, name, metadata, created_ms, updated_ms) VALUES(?,?,?,?,?)");
            s.bind(1, id).bind(2, b["name"].get<std::string>()).bind(3, meta.dump()).bind(4, now).bind(5, now);
            s.run();
            if (store.db.changes() == 0) {
                fail(409, "conflict", "application '" + id + "' exists", "id");
            }
            ++app_count;
        }
        store.audit(p.key_id, "app.create", id, req.request_id);
        res.json(201, json({{"id", id},
                            {"name", b["name"]},
                            {"metadata", meta},
                            {"created_at", rfc3339_ms(now)},
                            {"updated_at", rfc3339_ms(now)}})
                          .dump());
    }

    void list_apps(const http_request& req, http_response& res, const principal& p) {
        const auto limit = limit_param(req);
        const auto after = param_or(req, "iterator", "");
        json data = json::array();
        bool more = false;
        {
            std::lock_guard lk(store.m);
            // a scoped key's apps are filtered before the limit applies (no LIMIT for it: few rows)
            sql::statement s(store.db, "SELECT id, name, metadata, created_ms, updated_ms FROM apps WHERE id > ? "
                                       "ORDER BY id LIMIT ?");
            s.bind(1, after).bind(2, p.admin() ? static_cast<std::int64_t>(limit + 1) : std::int64_t{-1});
            while (s.step()) {
                if (!p.app(s.text(0))) {
                    continue;
                }
                if (data.size() == limit) {
                    more = true;
                    break;
                }
                data.push_back(app_json(s));
            }
        }
        page(res, data, more);
    }

    static void page(http_response& res, json& data, bool more) {
        json out = {{"data", data}, {"done", !more}};
        out["iterator"] = more && !data.empty() ? json(data.back()["id"]) : json(nullptr);
        res.json(200, out.dump());
    }

    void get_app(const http_request& req, http_response& res, const principal& p) {
        const auto& app = req.matches[0];
        std::lock_guard lk(store.m);
        require_app(p, app);
        sql::statement s(store.db, "SELECT id, name, metadata, created_ms, updated_ms FROM apps WHERE id = ?");
        s.bind(1, app);
        s.step();
        res.json(200, app_json(s).dump());
    }

    void update_app(const http_request& req, http_response& res, const principal& p) {
        const auto& app = req.matches[0];
        auto b = parse_body(req);
        json out;
        {
            std::lock_guard lk(store.m);
            require_app(p, app);
            sql::statement s(store.db, "SELECT id, name, metadata, created_ms, updated_ms FROM apps WHERE id = ?");
            s.bind(1, app);
            s.step();
            out = app_json(s);
            for (const auto& [k, v] : b.items()) {
                if (k == "name" && v.is_string() && !v.get<std::string>().empty() && v.get<std::string>().size() <= 256) {
                    out["name"] = v;
                } else if (k == "metadata" && v.is_object() && v.dump().size() <= 16384) {
                    out["metadata"] = v;
                } else {
                    fail(400, k == "name" || k == "metadata" ? "bad_attribute" : "unknown_field",
                         "field '" + k + "' cannot be set to this value", k);
                }
            }
            const auto now = wall_ms();
            out["updated_at"] = rfc3339_ms(now);
            sql::statement u(store.db, "UPDATE apps SET name = ?, metadata = ?, updated_ms = ? WHERE id = ?");
            u.bind(1, out["name"].get<std::string>()).bind(2, out["metadata"].dump()).bind(3, now).bind(4, app);
            u.run();
        }
        store.audit(p.key_id, "app.update", app, req.request_id);
        res.json(200, out.dump());
    }

    // Removes endpoints from the cache and their rows (under store.m); returns their patterns.
    std::vector<std::string> drop_endpoints(const std::vector<std::string>& ids) {
        std::vector<std::string> patterns;
        sql::statement d1(store.db, "DELETE FROM deliveries WHERE endpoint_id = ?");
        sql::statement d2(store.db, "DELETE FROM attempts WHERE endpoint_id = ?");
        sql::statement d3(store.db, "DELETE FROM endpoints WHERE id = ?");
        for (const auto& id : ids) {
            auto it = eps.find(id);
            if (it == eps.end()) {
                continue;
            }
            unindex(*it->second);
            if (it->second->scheduled_at >= 0) {
                due.erase({it->second->scheduled_at, id});
            }
            patterns.insert(patterns.end(), it->second->topics.begin(), it->second->topics.end());
            eps.erase(it);
            for (auto* st : {&d1, &d2, &d3}) {
                st->bind(1, id);
                st->run();
            }
        }
        return patterns;
    }

    void delete_app(const http_request& req, http_response& res, const principal& p) {
        const auto& app = req.matches[0];
        std::vector<std::string> patterns;
        {
            std::lock_guard lk(store.m);
            require_app(p, app);
            std::vector<std::string> ids;
            for (const auto& [id, e] : eps) {
                if (e->app_id == app) {
                    ids.push_back(id);
                }
            }
            sql::transaction tx(store.db);
            patterns = drop_endpoints(ids);
            sql::statement s(store.db, "DELETE FROM apps WHERE id = ?");
            s.bind(1, app);
            s.run();
            tx.commit();
            --app_count;
        }
        unsubscribe_patterns(patterns);
        store.audit(p.key_id, "app.delete", app, req.request_id);
        res.status = 204;
    }

    void create_endpoint(const http_request& req, http_response& res, const principal& p) {
        const auto& app = req.matches[0];
        auto b = parse_body(req);
        auto e = std::make_shared<endpoint>();
        apply_fields(b, *e, true);
        e->app_id = app;
        e->id = "ep_" + random_hex(8);
        if (b.contains("uid")) {
            if (!b["uid"].is_string() || !valid_id(b["uid"].get<std::string>())) {
                fail(400, "bad_attribute", "uid must be 1 to 64 characters of [A-Za-z0-9_.-]", "uid");
            }
            e->id = b["uid"].get<std::string>();
        }
        e->created = e->updated = wall_ms();
        {
            std::lock_guard lk(store.m);
            require_app(p, app);
            if (eps.size() >= o.max_endpoints) {
                fail(409, "limit", "this node holds api.max_endpoints endpoints already");
            }
            if (eps.count(e->id) != 0) {
                fail(409, "conflict", "endpoint '" + e->id + "' exists", "uid");
            }
        }
        // subscribed before it is visible, so every event after the 201 reaches it
        std::string error;
        if (!subscribe_patterns(e->topics, error)) {
            fail(503, "unavailable", error);
        }
        try {
            std::lock_guard lk(store.m);
            write_endpoint(*e, true);
            index(e);
            eps[e->id] = e;
        } catch (...) {
            unsubscribe_patterns(e->topics);
            throw;
        }
        store.audit(p.key_id, "endpoint.create", app + "/" + e->id, req.request_id, e->url);
        auto out = endpoint_json(*e);
        out["secret"] = e->secret;
        res.json(201, out.dump());
    }

    void list_endpoints(const http_request& req, http_response& res, const principal& p) {
        const auto& app = req.matches[0];
        const auto limit = limit_param(req);
        const auto after = param_or(req, "iterator", "");
        json data = json::array();
        bool more = false;
        std::lock_guard lk(store.m);
        require_app(p, app);
        sql::statement s(store.db, "SELECT id FROM endpoints WHERE app_id = ? AND id > ? ORDER BY id LIMIT ?");
        s.bind(1, app).bind(2, after).bind(3, static_cast<std::int64_t>(limit + 1));
        while (s.step()) {
            if (data.size() == limit) {
                more = true;
                break;
            }
            if (auto it = eps.find(std::string(s.text(0))); it != eps.end()) {
                data.push_back(endpoint_json(*it->second));
            }
        }
        page(res, data, more);
    }

    void get_endpoint(const http_request& req, http_response& res, const principal& p) {
        std::lock_guard lk(store.m);
        auto e = find_endpoint(p, req.matches[0], req.matches[1]);
        auto out = endpoint_json(*e);
        sql::statement s(store.db,
                         "SELECT status, COUNT(*), SUM(attempts > 0) FROM deliveries WHERE endpoint_id = ? GROUP BY status");
        s.bind(1, e->id);
        json st = {{"pending", 0}, {"retrying", 0}, {"delivered", 0}, {"dead", 0}, {"in_flight", e->in_flight}};
        while (s.step()) {
            const char* k = s.i64(0) == st_pending ? "pending" : s.i64(0) == st_delivered ? "delivered" : "dead";
            st[k] = s.i64(1);
            if (s.i64(0) == st_pending) {
                st["retrying"] = s.i64(2);  // pending after at least one failed attempt
            }
        }
        out["stats"] = st;
        res.json(200, out.dump());
    }

    void update_endpoint(const http_request& req, http_response& res, const principal& p) {
        auto b = parse_body(req);
        if (b.contains("uid")) {
            fail(400, "bad_attribute", "uid cannot change", "uid");
        }
        std::shared_ptr<endpoint> cur;
        {
            std::lock_guard lk(store.m);
            cur = find_endpoint(p, req.matches[0], req.matches[1]);
        }
        endpoint next;
        {
            std::lock_guard lk(store.m);
            next.id = cur->id;
            next.app_id = cur->app_id;
            next.url = cur->url;
            next.description = cur->description;
            next.secret = cur->secret;
            next.old_secret = cur->old_secret;
            next.old_until = cur->old_until;
            next.topics = cur->topics;
            next.patterns = cur->patterns;
            next.headers = cur->headers;
            next.rate_limit = cur->rate_limit;
            next.schedule = cur->schedule;
            next.concurrency = cur->concurrency;
            next.disabled = cur->disabled;
            next.disabled_reason = cur->disabled_reason;
            next.created = cur->created;
        }
        apply_fields(b, next, false);
        next.updated = wall_ms();
        const bool topics_changed = b.contains("topics");
        std::string error;
        if (topics_changed && !subscribe_patterns(next.topics, error)) {
            fail(503, "unavailable", error);
        }
        std::vector<std::string> old_topics;
        json out;
        {
            std::lock_guard lk(store.m);
            auto it = eps.find(cur->id);
            if (it == eps.end()) {
                if (topics_changed) {
                    unsubscribe_patterns(next.topics);
                }
                fail(404, "not_found", "the endpoint was deleted meanwhile");
            }
            auto& e = *it->second;
            write_endpoint(next, false);
            unindex(e);
            old_topics = e.topics;
            const bool was_disabled = e.disabled;
            e.url = next.url;
            e.description = next.description;
            e.secret = next.secret;
            e.topics = next.topics;
            e.patterns = next.patterns;
            e.headers = next.headers;
            e.rate_limit = next.rate_limit;
            e.schedule = next.schedule;
            e.concurrency = next.concurrency;
            e.disabled = next.disabled;
            e.disabled_reason = next.disabled_reason;
            e.updated = next.updated;
            index(it->second);
            if (was_disabled && !e.disabled) {
                schedule(e, steady_ms());
            }
            out = endpoint_json(e);
        }
        if (topics_changed) {
            unsubscribe_patterns(old_topics);
        }
        wake();
        store.audit(p.key_id, "endpoint.update", req.matches[0] + "/" + req.matches[1], req.request_id, b.dump());
        res.json(200, out.dump());
    }

    void delete_endpoint(const http_request& req, http_response& res, const principal& p) {
        std::vector<std::string> patterns;
        {
            std::lock_guard lk(store.m);
            auto e = find_endpoint(p, req.matches[0], req.matches[1]);
            sql::transaction tx(store.db);
            patterns = drop_endpoints({e->id});
            tx.commit();
        }
        unsubscribe_patterns(patterns);
        store.audit(p.key_id, "endpoint.delete", req.matches[0] + "/" + req.matches[1], req.request_id);
        res.status = 204;
    }

    void get_secret(const http_request& req, http_response& res, const principal& p) {
        std::lock_guard lk(store.m);
        auto e = find_endpoint(p, req.matches[0], req.matches[1]);
        json out = {{"key", e->secret}};
        if (!e->old_secret.empty() && wall_ms() < e->old_until) {
            out["previous"] = {{"key", e->old_secret}, {"expires_at", rfc3339_ms(e->old_until)}};
        }
        res.json(200, out.dump());
    }

    void rotate_secret(const http_request& req, http_response& res, const principal& p) {
        auto b = parse_body(req);
        std::string key = new_webhook_secret();
        if (auto it = b.find("key"); it != b.end()) {
            if (!it->is_string() || secret_key(it->get<std::string>()).size() < 24 ||
                secret_key(it->get<std::string>()).size() > 64) {
                fail(400, "bad_attribute", "key must be \"whsec_\" and the base64 of 24 to 64 bytes", "key");
            }
            key = it->get<std::string>();
        }
        std::int64_t grace_s = 24 * 3600;
        if (auto it = b.find("grace_seconds"); it != b.end()) {
            if (!it->is_number_integer() || it->get<std::int64_t>() < 0 || it->get<std::int64_t>() > 7 * 24 * 3600) {
                fail(400, "bad_attribute", "grace_seconds must be an integer from 0 to 604800", "grace_seconds");
            }
            grace_s = it->get<std::int64_t>();
        }
        json out;
        {
            std::lock_guard lk(store.m);
            auto e = find_endpoint(p, req.matches[0], req.matches[1]);
            e->old_secret = e->secret;
            e->old_until = wall_ms() + grace_s * 1000;
            e->secret = key;
            e->updated = wall_ms();
            write_endpoint(*e, false);
            out = {{"key", key}, {"previous", {{"key", e->old_secret}, {"expires_at", rfc3339_ms(e->old_until)}}}};
        }
        store.audit(p.key_id, "endpoint.rotate_secret", req.matches[0] + "/" + req.matches[1], req.request_id);
        res.json(200, out.dump());
    }

    void send_test(const http_request& req, http_response& res, const principal& p) {
        auto b = parse_body(req);
        event ev;
        ev.id = new_event_id();
        ev.time_ns = now_ns();
        ev.source = n.name() + "/api";
        if (b.contains("topic") && !b["topic"].is_string()) {
            fail(400, "bad_topic", "topic must be a topic (dot-separated, no wildcards)", "topic");
        }
        ev.topic = b.contains("topic") ? b["topic"].get<std::string>() : std::string("evmesh.test");
        if (!topic_pattern::parse(ev.topic) || ev.topic.find_first_of("*>") != std::string::npos ||
            ev.topic.rfind("_evmesh", 0) == 0) {
            fail(400, "bad_topic", "topic must be a topic (dot-separated, no wildcards)", "topic");
        }
        ev.content_type = "application/json";
        ev.payload = b.value("data", json({{"test", true}})).dump();
        const auto id = to_string(ev.id);
        {
            std::lock_guard lk(store.m);
            auto e = find_endpoint(p, req.matches[0], req.matches[1]);
            const auto now = wall_ms();
            sql::transaction tx(store.db);
            sql::statement m(store.db, "INSERT INTO messages(id, topic, body, received_ms) VALUES(?,?,?,?)");
            m.bind(1, id).bind(2, ev.topic).bind(3, render(ev)).bind(4, now);
            m.run();
            sql::statement d(store.db, "INSERT INTO deliveries(message_id, endpoint_id, next_ms, accepted_ms) VALUES(?,?,?,?)");
            d.bind(1, id).bind(2, e->id).bind(3, now).bind(4, now);
            d.run();
            tx.commit();
            ++counters.accepted;
            schedule(*e, steady_ms());
        }
        wake();
        res.json(202, json({{"event_id", id}}).dump());
    }

    static json attempt_json(sql::statement& s) {
        return {{"id", s.i64(0)},
                {"endpoint_id", std::string(s.text(1))},
                {"event_id", std::string(s.text(2))},
                {"attempt", s.i64(3)},
                {"timestamp", rfc3339_ms(s.i64(4))},
                {"latency_ms", static_cast<double>(s.i64(5)) / 1000.0},
                {"outcome", std::string(s.text(6))},
                {"status_code", s.i64(7)},
                {"detail", std::string(s.text(8))}};
    }

    void list_attempts(const http_request& req, http_response& res, const principal& p) {
        const auto limit = limit_param(req);
        const auto before = param_or(req, "iterator", "");
        const auto outcome = param_or(req, "outcome", "");
        std::int64_t before_id = std::numeric_limits<std::int64_t>::max();
        if (!before.empty()) {
            before_id = std::strtoll(before.c_str(), nullptr, 10);
        }
        json data = json::array();
        bool more = false;
        std::lock_guard lk(store.m);
        auto e = find_endpoint(p, req.matches[0], req.matches[1]);
        sql::statement s(store.db, "SELECT id, endpoint_id, message_id, attempt, time_ms, latency_us, outcome, code, "
                                   "detail FROM attempts WHERE endpoint_id = ? AND id < ? AND (? = '' OR outcome = ?) "
                                   "ORDER BY id DESC LIMIT ?");
        s.bind(1, e->id).bind(2, before_id).bind(3, outcome).bind(4, outcome).bind(5, static_cast<std::int64_t>(limit + 1));
        while (s.step()) {
            if (data.size() == limit) {
                more = true;
                break;
            }
            data.push_back(attempt_json(s));
        }
        json out = {{"data", data}, {"done", !more}};
        out["iterator"] = more ? json(std::to_string(data.back()["id"].get<std::int64_t>())) : json(nullptr);
        res.json(200, out.dump());
    }

    void event_attempts(const http_request& req, http_response& res, const principal& p) {
        const auto& app = req.matches[0];
        const auto& ev = req.matches[1];
        json data = json::array();
        std::lock_guard lk(store.m);
        require_app(p, app);
        sql::statement s(store.db, "SELECT a.id, a.endpoint_id, a.message_id, a.attempt, a.time_ms, a.latency_us, "
                                   "a.outcome, a.code, a.detail FROM attempts a JOIN endpoints e ON e.id = a.endpoint_id "
                                   "WHERE a.message_id = ? AND e.app_id = ? ORDER BY a.id LIMIT 1000");
        s.bind(1, ev).bind(2, app);
        while (s.step()) {
            data.push_back(attempt_json(s));
        }
        res.json(200, json({{"data", data}, {"done", true}, {"iterator", nullptr}}).dump());
    }

    void list_dead(const http_request& req, http_response& res, const principal& p) {
        const auto limit = limit_param(req);
        const auto after = param_or(req, "iterator", "");
        const std::int64_t after_id = after.empty() ? 0 : std::strtoll(after.c_str(), nullptr, 10);
        json data = json::array();
        bool more = false;
        std::int64_t last_id = 0;
        std::lock_guard lk(store.m);
        auto e = find_endpoint(p, req.matches[0], req.matches[1]);
        sql::statement s(store.db, "SELECT d.message_id, m.topic, d.attempts, d.last_code, d.last_detail, d.accepted_ms, "
                                   "d.done_ms, d.id FROM deliveries d JOIN messages m ON m.id = d.message_id "
                                   "WHERE d.endpoint_id = ? AND d.status = 3 AND d.id > ? ORDER BY d.id LIMIT ?");
        s.bind(1, e->id).bind(2, after_id).bind(3, static_cast<std::int64_t>(limit + 1));
        while (s.step()) {
            if (data.size() == limit) {
                more = true;
                break;
            }
            last_id = s.i64(7);
            data.push_back({{"event_id", std::string(s.text(0))},
                            {"topic", std::string(s.text(1))},
                            {"attempts", s.i64(2)},
                            {"last_status_code", s.i64(3)},
                            {"last_detail", std::string(s.text(4))},
                            {"accepted_at", rfc3339_ms(s.i64(5))},
                            {"dead_at", rfc3339_ms(s.i64(6))}});
        }
        json out = {{"data", data}, {"done", !more}};
        out["iterator"] = more ? json(std::to_string(last_id)) : json(nullptr);
        res.json(200, out.dump());
    }

    void replay(const http_request& req, http_response& res, const principal& p) {
        auto b = parse_body(req);
        std::int64_t n_replayed = 0;
        std::string what;
        {
            std::lock_guard lk(store.m);
            auto e = find_endpoint(p, req.matches[0], req.matches[1]);
            const auto now = wall_ms();
            if (auto it = b.find("event_id"); it != b.end()) {
                if (!it->is_string()) {
                    fail(400, "bad_attribute", "event_id must be a string", "event_id");
                }
                sql::statement s(store.db, "UPDATE deliveries SET status = 0, attempts = 0, next_ms = ?, done_ms = 0 "
                                           "WHERE endpoint_id = ? AND message_id = ? AND status = 3");
                s.bind(1, now).bind(2, e->id).bind(3, it->get<std::string>());
                s.run();
                n_replayed = store.db.changes();
                if (n_replayed == 0) {
                    fail(404, "not_found", "no dead letter with event_id '" + it->get<std::string>() + "'", "event_id");
                }
                what = it->get<std::string>();
            } else {
                const auto since = b.contains("since") ? time_value(b["since"], "since") : 0;
                const auto until = b.contains("until") ? time_value(b["until"], "until")
                                                       : std::numeric_limits<std::int64_t>::max();
                sql::statement s(store.db, "UPDATE deliveries SET status = 0, attempts = 0, next_ms = ?, done_ms = 0 "
                                           "WHERE endpoint_id = ? AND status = 3 AND accepted_ms >= ? AND accepted_ms < ?");
                s.bind(1, now).bind(2, e->id).bind(3, since).bind(4, until);
                s.run();
                n_replayed = store.db.changes();
                what = "range";
            }
            schedule(*e, steady_ms());
        }
        wake();
        store.audit(p.key_id, "endpoint.replay", req.matches[0] + "/" + req.matches[1], req.request_id, what);
        res.json(202, json({{"replayed", n_replayed}}).dump());
    }
};

namespace {
const std::string id_re = "([A-Za-z0-9_.-]{1,64})";
}

registry::registry(node& n, api_store& store, registry_options o)
    : impl_(std::make_unique<impl>(n, store, std::move(o))) {}

registry::~registry() { stop(); }

bool registry::start(std::string& error) {
    auto& p = *impl_;
    p.multi = curl_multi_init();
    std::vector<std::string> patterns;
    try {
        std::lock_guard lk(p.store.m);
        p.load();
        for (const auto& [id, e] : p.eps) {
            patterns.insert(patterns.end(), e->topics.begin(), e->topics.end());
        }
    } catch (const sql::sqlite_error& e) {
        error = std::string("api database: ") + e.what();
        return false;
    }
    if (!p.subscribe_patterns(patterns, error)) {
        return false;
    }
    p.thread = std::thread([&p] { p.run(); });
    return true;
}

void registry::stop() {
    auto& p = *impl_;
    if (p.stopping.exchange(true)) {
        return;
    }
    p.intake_cv.notify_all();
    p.wake();
    std::map<std::string, std::pair<int, subscription>> subs;
    {
        std::lock_guard lk(p.subs_m);
        subs.swap(p.subs);
    }
    subs.clear();  // joins the subscription threads (take() returns at once while stopping)
    if (p.thread.joinable()) {
        p.thread.join();
    }
    // what was taken but not stored yet is lost only with the process; store it now
    p.stopping = false;
    p.store_intake();
    p.stopping = true;
    if (p.multi != nullptr) {
        curl_multi_cleanup(p.multi);
        p.multi = nullptr;
    }
}

registry_stats registry::stats() const {
    std::lock_guard lk(impl_->store.m);
    auto s = impl_->counters;
    s.apps = impl_->app_count;
    s.endpoints = impl_->eps.size();
    return s;
}

void registry::routes(const api_route_adder& add) {
    auto* p = impl_.get();
    auto wrap = [p](void (impl::*fn)(const http_request&, http_response&, const principal&)) -> api_handler {
        return [p, fn](const http_request& req, http_response& res, const principal& who) {
            try {
                (p->*fn)(req, res, who);
            } catch (const api_fail& f) {
                res.headers.clear();
                http_error(res, f.status, f.code, f.message, f.field);
            } catch (const sql::sqlite_error& e) {
                spdlog::error("api: {} {}: {}", req.method, req.path, e.what());
                res.headers.emplace_back("Retry-After", "1");
                http_error(res, 503, "storage_unavailable", "the API database cannot be written now; retry");
            }
        };
    };
    const std::string apps = "/v1/apps";
    const std::string app = apps + "/" + id_re;
    const std::string ep = app + "/endpoints/" + id_re;
    add("POST", apps, wrap(&impl::create_app));
    add("GET", apps, wrap(&impl::list_apps));
    add("GET", app, wrap(&impl::get_app));
    add("PATCH", app, wrap(&impl::update_app));
    add("DELETE", app, wrap(&impl::delete_app));
    add("POST", app + "/endpoints", wrap(&impl::create_endpoint));
    add("GET", app + "/endpoints", wrap(&impl::list_endpoints));
    add("GET", ep, wrap(&impl::get_endpoint));
    add("PATCH", ep, wrap(&impl::update_endpoint));
    add("DELETE", ep, wrap(&impl::delete_endpoint));
    add("GET", ep + "/secret", wrap(&impl::get_secret));
    add("POST", ep + "/secret/rotate", wrap(&impl::rotate_secret));
    add("POST", ep + "/test", wrap(&impl::send_test));
    add("GET", ep + "/attempts", wrap(&impl::list_attempts));
    add("GET", ep + "/dead", wrap(&impl::list_dead));
    add("POST", ep + "/replay", wrap(&impl::replay));
    add("GET", app + "/events/" + "([0-9a-f-]{36})" + "/attempts", wrap(&impl::event_attempts));
}

}  // namespace evmesh::app
