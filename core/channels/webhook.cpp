// The "webhook" channel plugin: HTTP(S) POST of each event, CloudEvents structured or binary mode,
// signed per Standard Webhooks (webhook-id / webhook-timestamp / webhook-signature), with a
// connect-time destination check against loopback/private/link-local addresses (SSRF guard).
// Settings and outcome mapping: docs/CHANNELS-BUILTIN.md.
#include "common.hpp"
#include "curl_util.hpp"

#include <curl/curl.h>

#include <arpa/inet.h>
#include <netinet/in.h>
#include <sys/socket.h>
#include <unistd.h>

#include <ctime>
#include <memory>
#include <mutex>

namespace evmesh::channels {
namespace {

// ---------------------------------------------------------------------------------------------
// Destination classification

// Why an IPv4 address (host byte order) is refused, or nullptr.
const char* classify_v4(uint32_t a) noexcept {
    auto in = [a](uint32_t net, int bits) { return (a >> (32 - bits)) == (net >> (32 - bits)); };
    if (in(0x00000000u, 8)) return "unspecified";   // 0.0.0.0/8
    if (in(0x7F000000u, 8)) return "loopback";      // 127/8
    if (in(0x0A000000u, 8)) return "private";       // 10/8
    if (in(0xAC100000u, 12)) return "private";      // 172.16/12
    if (in(0xC0A80000u, 16)) return "private";      // 192.168/16
    if (in(0x64400000u, 10)) return "shared (CGNAT)";  // 100.64/10
    if (in(0xA9FE0000u, 16)) return "link-local";   // 169.254/16
    if (in(0xE0000000u, 4)) return "multicast";     // 224/4
    if (in(0xF0000000u, 4)) return "reserved";      // 240/4 incl. 255.255.255.255
    return nullptr;
}

const char* classify_v6(const unsigned char b[16]) noexcept {
    static const unsigned char zero[16] = {};
    if (std::memcmp(b, zero, 16) == 0) return "unspecified";
    if (std::memcmp(b, zero, 15) == 0 && b[15] == 1) return "loopback";
    static const unsigned char mapped[12] = {0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff};
    if (std::memcmp(b, mapped, 12) == 0) {
        uint32_t v4 = (uint32_t{b[12]} << 24) | (uint32_t{b[13]} << 16) | (uint32_t{b[14]} << 8) | b[15];
        return classify_v4(v4);
    }
    if ((b[0] & 0xFE) == 0xFC) return "private";                  // fc00::/7 unique local
    if (b[0] == 0xFE && (b[1] & 0xC0) == 0x80) return "link-local";  // fe80::/10
    if (b[0] == 0xFE && (b[1] & 0xC0) == 0xC0) return "private";     // fec0::/10 site-local (deprecated)
    if (b[0] == 0xFF) return "multicast";                          // ff00::/8
    return nullptr;
}

// ---------------------------------------------------------------------------------------------
// Helpers

bool token_char(char c) noexcept {
    return (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9') ||
           std::strchr("!#$%&'*+-.^_`|~", c) != nullptr;
}

// CloudEvents HTTP binding: header values percent-encode space, '"', '%' and everything outside
// printable ASCII (which also keeps CR/LF out of the request).
std::string ce_header_value(std::string_view v) {
    static const char hex[] = "0123456789ABCDEF";
    std::string out;
    for (char c : v) {
        auto u = static_cast<unsigned char>(c);
        if (u <= 0x20 || u >= 0x7f || c == '"' || c == '%') {
            out += '%';
            out += hex[u >> 4];
            out += hex[u & 15];
        } else {
            out += c;
        }
    }
    return out;
}

// A Content-Type header value without control characters.
std::string header_safe(std::string_view v) {
    std::string out;
    for (char c : v) {
        auto u = static_cast<unsigned char>(c);
        if (u >= 0x20 && u != 0x7f) out += c;
    }
    return out;
}

// Retry-After: delta-seconds or HTTP-date; -1 when absent or invalid.
int64_t parse_retry_after(std::string_view v) {
    v = trim(v);
    if (v.empty()) return -1;
    bool digits = true;
    for (char c : v) digits = digits && c >= '0' && c <= '9';
    if (digits) {
        if (v.size() > 9) return int64_t{999999999} * 1000;  // absurdly far; keep it finite
        int64_t s = 0;
        for (char c : v) s = s * 10 + (c - '0');
        return s * 1000;
    }
    std::string text(v);
    time_t when = curl_getdate(text.c_str(), nullptr);
    if (when == static_cast<time_t>(-1)) return -1;
    auto delta = static_cast<int64_t>(when) - static_cast<int64_t>(std::time(nullptr));
    return delta > 0 ? delta * 1000 : 0;
}

// ---------------------------------------------------------------------------------------------
// The channel

class webhook {
public:
    static constexpr const char* plugin_name = "webhook";
    static constexpr const char* description = "HTTP(S) POST of CloudEvents, signed per Standard Webhooks";

    explicit webhook(const evmesh_host& host) : log_(host) {
        settings s(plugin_name, host.settings_json);
        url_ = s.required_string("url");
        check_url(s);
        if (auto secret = s.optional_string("secret")) decode_secret(s, *secret);
        structured_ = s.choice_or("mode", "structured", {"structured", "binary"}) == "structured";
        timeout_ms_ = s.duration_ms_or("timeout_ms", 10000);
        connect_timeout_ms_ = s.duration_ms_or("connect_timeout_ms", 3000);
        allow_private_ = s.boolean_or("allow_private", false);
        for (auto& [name, value] : s.string_table("headers")) add_static_header(s, name, value);
        user_agent_ = s.string_or("user_agent", "evmesh-webhook/1");
        if (user_agent_.find_first_of("\r\n") != std::string::npos) s.fail("user_agent", "must not contain CR or LF");
        // A private CA for https endpoints (PEM bundle); default: the system's trust store.
        ca_file_ = s.string_or("ca_file", "");
        if (!ca_file_.empty() && ::access(ca_file_.c_str(), R_OK) != 0) s.fail("ca_file", "cannot be read");
        s.finish();

        curl_init_once();
        if (sodium_init() < 0) throw config_error("webhook: libsodium initialisation failed");
        if (key_.empty())
            log_.log(EVMESH_LOG_WARN, "webhook %s: no secret configured; requests are unsigned",
                     log_.instance.c_str());
        if (allow_private_)
            log_.log(EVMESH_LOG_INFO, "webhook %s: allow_private = true (loopback/private destinations allowed)",
                     log_.instance.c_str());
    }

    ~webhook() {
        for (CURL* h : idle_) curl_easy_cleanup(h);
    }

    webhook(const webhook&) = delete;
    webhook& operator=(const webhook&) = delete;

    // Standard Webhooks signature: "v1," + base64(HMAC-SHA256(key, "<id>.<timestamp>.<body>")).
    static std::string sign(const std::vector<unsigned char>& key, std::string_view id, std::string_view timestamp,
                            std::string_view body) {
        crypto_auth_hmacsha256_state st;
        unsigned char mac[crypto_auth_hmacsha256_BYTES];
        crypto_auth_hmacsha256_init(&st, key.data(), key.size());
        auto upd = [&st](std::string_view p) {
            crypto_auth_hmacsha256_update(&st, reinterpret_cast<const unsigned char*>(p.data()), p.size());
        };
        upd(id);
        upd(".");
        upd(timestamp);
        upd(".");
        upd(body);
        crypto_auth_hmacsha256_final(&st, mac);
        sodium_memzero(&st, sizeof st);
        return "v1," + base64(mac, sizeof mac);
    }

    evmesh_status deliver(const evmesh_event& ev, const evmesh_attempt&, evmesh_result& r) {
        std::string id(view(ev.id_text));
        std::string body;
        slist_ptr headers;
        if (structured_) {
            body = dump_json(cloudevent_json(ev));
            append(headers, "Content-Type: application/cloudevents+json");
        } else {
            if (ev.payload && ev.payload_len) body.assign(static_cast<const char*>(ev.payload), ev.payload_len);
            std::string ct = header_safe(view(ev.content_type, ev.content_type_len));
            append(headers, "Content-Type: " + (ct.empty() ? std::string("application/octet-stream") : ct));
            append(headers, "ce-specversion: 1.0");
            append(headers, "ce-id: " + ce_header_value(id));
            append(headers, "ce-source: " + ce_header_value(view(ev.source, ev.source_len)));
            append(headers, "ce-type: " + ce_header_value(view(ev.topic, ev.topic_len)));
            append(headers, "ce-time: " + rfc3339(ev.time_ns));
            if (ev.seq != 0) append(headers, "ce-seq: " + std::to_string(ev.seq));
            for (size_t i = 0; ev.headers && i < ev.header_count; ++i) {
                const evmesh_header& h = ev.headers[i];
                auto key = view(h.key, h.key_len);
                if (!ce_extension_header(key)) continue;
                std::string value = ce_header_value(view(h.value, h.value_len));
                // "Name;" is curl's spelling of a header with an empty value
                append(headers, "ce-" + std::string(key) + (value.empty() ? ";" : ": " + value));
            }
        }
        append(headers, "Expect:");  // no 100-continue round trip
        append(headers, "webhook-id: " + ce_header_value(id));
        std::string ts = std::to_string(static_cast<long long>(std::time(nullptr)));
        append(headers, "webhook-timestamp: " + ts);
        if (!key_.empty()) append(headers, "webhook-signature: " + sign(key_, id, ts, body));
        for (const auto& line : static_headers_) append(headers, line);

        call_ctx ctx;
        ctx.allow_private = allow_private_;
        lease h(*this);
        if (!h.get()) {
            set_detail(&r, "curl_easy_init failed");
            return EVMESH_RETRY;
        }
        char errbuf[CURL_ERROR_SIZE] = {};
        CURL* c = h.get();
        curl_easy_setopt(c, CURLOPT_URL, url_.c_str());
        curl_easy_setopt(c, CURLOPT_PROTOCOLS_STR, "http,https");
        curl_easy_setopt(c, CURLOPT_FOLLOWLOCATION, 0L);
        curl_easy_setopt(c, CURLOPT_PROXY, "");  // environment proxies would bypass the destination check
        curl_easy_setopt(c, CURLOPT_NOSIGNAL, 1L);
        curl_easy_setopt(c, CURLOPT_POST, 1L);
        curl_easy_setopt(c, CURLOPT_POSTFIELDS, body.data());
        curl_easy_setopt(c, CURLOPT_POSTFIELDSIZE_LARGE, static_cast<curl_off_t>(body.size()));
        curl_easy_setopt(c, CURLOPT_HTTPHEADER, headers.get());
        curl_easy_setopt(c, CURLOPT_USERAGENT, user_agent_.c_str());
        curl_easy_setopt(c, CURLOPT_TIMEOUT_MS, static_cast<long>(timeout_ms_));
        curl_easy_setopt(c, CURLOPT_CONNECTTIMEOUT_MS, static_cast<long>(connect_timeout_ms_));
        curl_easy_setopt(c, CURLOPT_ERRORBUFFER, errbuf);
        if (!ca_file_.empty()) curl_easy_setopt(c, CURLOPT_CAINFO, ca_file_.c_str());
        curl_easy_setopt(c, CURLOPT_OPENSOCKETFUNCTION, &webhook::open_socket);
        curl_easy_setopt(c, CURLOPT_OPENSOCKETDATA, &ctx);
        curl_easy_setopt(c, CURLOPT_WRITEFUNCTION, &webhook::on_body);
        curl_easy_setopt(c, CURLOPT_WRITEDATA, &ctx);
        curl_easy_setopt(c, CURLOPT_HEADERFUNCTION, &webhook::on_header);
        curl_easy_setopt(c, CURLOPT_HEADERDATA, &ctx);

        CURLcode rc = curl_easy_perform(c);
        long status = 0;
        curl_easy_getinfo(c, CURLINFO_RESPONSE_CODE, &status);
        r.code = static_cast<int32_t>(status);

        if (rc != CURLE_OK) {
            if (!ctx.refused.empty() && ctx.opened == 0) {
                set_detail(&r, "refused destination %s; set allow_private = true to allow", ctx.refused.c_str());
                return EVMESH_FAIL;
            }
            set_detail(&r, "%s", printable(errbuf[0] ? errbuf : curl_easy_strerror(rc), 255).c_str());
            return EVMESH_RETRY;
        }
        if (status >= 200 && status < 300) return EVMESH_DELIVERED;

        std::string head = printable(ctx.body_head, 100);
        set_detail(&r, "HTTP %ld%s%s", status, head.empty() ? "" : ": ", head.c_str());
        if (status == 410) return EVMESH_DISABLE;
        if (status == 429 || status == 503) {
            r.retry_after_ms = parse_retry_after(ctx.retry_after);
            return EVMESH_RETRY;
        }
        if (status == 408 || status == 425 || (status >= 500 && status <= 599)) return EVMESH_RETRY;
        return EVMESH_FAIL;
    }

private:
    struct call_ctx {
        bool allow_private = false;
        std::string refused;  // "127.0.0.1 (loopback)" of the last refused address
        int opened = 0;       // sockets actually opened
        std::string body_head;
        std::string retry_after;
    };

    // Take an easy handle from the idle pool (or a new one); give it back afterwards. The idle
    // handles keep their connection caches, so consecutive deliveries reuse connections.
    class lease {
    public:
        explicit lease(webhook& w) : w_(w) {
            {
                std::lock_guard lock(w_.mutex_);
                if (!w_.idle_.empty()) {
                    h_ = w_.idle_.back();
                    w_.idle_.pop_back();
                }
            }
            if (!h_) h_ = curl_easy_init();
        }
        ~lease() {
            if (!h_) return;
            curl_easy_reset(h_);  // drops options (and pointers into this call); keeps connections
            std::lock_guard lock(w_.mutex_);
            if (w_.idle_.size() < max_idle) {
                w_.idle_.push_back(h_);
                return;
            }
            curl_easy_cleanup(h_);
        }
        lease(const lease&) = delete;
        lease& operator=(const lease&) = delete;
        CURL* get() const noexcept { return h_; }

    private:
        webhook& w_;
        CURL* h_ = nullptr;
    };

    static constexpr size_t max_idle = 8;

    void check_url(settings& s) {
        CURLU* u = curl_url();
        if (!u) throw std::bad_alloc();
        std::unique_ptr<CURLU, decltype(&curl_url_cleanup)> guard(u, &curl_url_cleanup);
        if (curl_url_set(u, CURLUPART_URL, url_.c_str(), 0) != CURLUE_OK) s.fail("url", "is not a valid URL");
        char* scheme = nullptr;
        char* hostpart = nullptr;
        curl_url_get(u, CURLUPART_SCHEME, &scheme, 0);
        curl_url_get(u, CURLUPART_HOST, &hostpart, 0);
        bool ok_scheme = scheme && (iequals(scheme, "http") || iequals(scheme, "https"));
        bool ok_host = hostpart && *hostpart;
        curl_free(scheme);
        curl_free(hostpart);
        if (!ok_scheme) s.fail("url", "must be an http:// or https:// URL");
        if (!ok_host) s.fail("url", "has no host");
    }

    void decode_secret(settings& s, const std::string& secret) {
        static constexpr std::string_view prefix = "whsec_";
        if (secret.compare(0, prefix.size(), prefix) != 0) s.fail("secret", "must be \"whsec_<base64>\"");
        std::string b64 = secret.substr(prefix.size());
        key_.assign(b64.size(), 0);
        size_t len = 0;
        const char* end = nullptr;
        if (b64.empty() ||
            sodium_base642bin(key_.data(), key_.size(), b64.data(), b64.size(), nullptr, &len, &end,
                              sodium_base64_VARIANT_ORIGINAL) != 0 ||
            end != b64.data() + b64.size() || len == 0)
            s.fail("secret", "is not valid base64 after \"whsec_\"");
        key_.resize(len);
    }

    void add_static_header(settings& s, const std::string& name, const std::string& value) {
        std::string key = "headers." + name;
        if (name.empty()) s.fail(key, "has an empty name");
        for (char c : name)
            if (!token_char(c)) s.fail(key, "is not a valid header name");
        std::string lower;
        for (char c : name) lower += ascii_lower(c);
        if (lower == "content-type" || lower == "content-length" || lower == "host" ||
            lower == "transfer-encoding" || lower == "expect" || lower.rfind("webhook-", 0) == 0 ||
            lower.rfind("ce-", 0) == 0)
            s.fail(key, "is set by the plugin and cannot be overridden");
        for (char c : value) {
            auto u = static_cast<unsigned char>(c);
            if ((u < 0x20 && c != '\t') || u == 0x7f) s.fail(key, "must not contain control characters");
        }
        static_headers_.push_back(value.empty() ? name + ";" : name + ": " + value);
    }

    static curl_socket_t open_socket(void* clientp, curlsocktype, struct curl_sockaddr* a) noexcept {
        auto* ctx = static_cast<call_ctx*>(clientp);
        if (!ctx->allow_private) {
            const char* why = nullptr;
            char text[INET6_ADDRSTRLEN] = "?";
            sockaddr_storage ss{};
            std::memcpy(&ss, &a->addr, a->addrlen < sizeof ss ? a->addrlen : sizeof ss);
            if (a->family == AF_INET) {
                sockaddr_in sin{};
                std::memcpy(&sin, &ss, sizeof sin);
                why = classify_v4(ntohl(sin.sin_addr.s_addr));
                inet_ntop(AF_INET, &sin.sin_addr, text, sizeof text);
            } else if (a->family == AF_INET6) {
                sockaddr_in6 sin6{};
                std::memcpy(&sin6, &ss, sizeof sin6);
                why = classify_v6(sin6.sin6_addr.s6_addr);
                inet_ntop(AF_INET6, &sin6.sin6_addr, text, sizeof text);
            } else {
                why = "not an IP address";
            }
            if (why) {
                try {
                    ctx->refused = std::string(text) + " (" + why + ")";
                } catch (...) {
                }
                return CURL_SOCKET_BAD;
            }
        }
        int fd = ::socket(a->family, a->socktype | SOCK_CLOEXEC, a->protocol);
        if (fd >= 0) ++ctx->opened;
        return fd < 0 ? CURL_SOCKET_BAD : fd;
    }

    static size_t on_body(char* data, size_t size, size_t n, void* userp) noexcept {
        auto* ctx = static_cast<call_ctx*>(userp);
        size_t len = size * n;
        try {
            if (ctx->body_head.size() < 128)
                ctx->body_head.append(data, std::min(len, 128 - ctx->body_head.size()));
        } catch (...) {
        }
        return len;
    }

    static size_t on_header(char* data, size_t size, size_t n, void* userp) noexcept {
        auto* ctx = static_cast<call_ctx*>(userp);
        size_t len = size * n;
        std::string_view line(data, len);
        try {
            if (starts_with_icase(line, "HTTP/"))
                ctx->retry_after.clear();  // a new response (e.g. after 100 Continue)
            else if (starts_with_icase(line, "retry-after:"))
                ctx->retry_after = std::string(trim(line.substr(12)));
        } catch (...) {
        }
        return len;
    }

    host_logger log_;
    std::string url_;
    std::vector<unsigned char> key_;
    bool structured_ = true;
    int64_t timeout_ms_ = 10000;
    int64_t connect_timeout_ms_ = 3000;
    bool allow_private_ = false;
    std::vector<std::string> static_headers_;
    std::string user_agent_;
    std::string ca_file_;

    std::mutex mutex_;
    std::vector<CURL*> idle_;
};

}  // namespace
}  // namespace evmesh::channels

extern "C" EVMESH_CHANNEL_EXPORT const evmesh_channel_plugin* evmesh_channel_plugin_v1(void) {
    return &evmesh::channels::plugin_glue<evmesh::channels::webhook>::table;
}
