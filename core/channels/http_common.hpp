// HTTP pieces shared by the plugins that make HTTP requests with libcurl (webhook, http): the
// connect-time destination check (SSRF guard), a small pool of easy handles that keeps
// connections alive, capture of the response's first bytes and Retry-After, URL and header
// checks. Moved here from webhook.cpp so both plugins enforce exactly the same rules.
#pragma once

#include "common.hpp"
#include "curl_util.hpp"

#include <curl/curl.h>

#include <arpa/inet.h>
#include <netinet/in.h>
#include <sys/socket.h>

#include <algorithm>
#include <ctime>
#include <memory>
#include <mutex>
#include <optional>

namespace evmesh::channels::http {

// ---------------------------------------------------------------------------------------------
// Destination classification

// Why an IPv4 address (host byte order) is refused, or nullptr.
inline const char* classify_v4(uint32_t a) noexcept {
    auto in = [a](uint32_t net, int bits) { return (a >> (32 - bits)) == (net >> (32 - bits)); };
    if (in(0x00000000u, 8)) return "unspecified";      // 0.0.0.0/8
    if (in(0x7F000000u, 8)) return "loopback";         // 127/8
    if (in(0x0A000000u, 8)) return "private";          // 10/8
    if (in(0xAC100000u, 12)) return "private";         // 172.16/12
    if (in(0xC0A80000u, 16)) return "private";         // 192.168/16
    if (in(0x64400000u, 10)) return "shared (CGNAT)";  // 100.64/10
    if (in(0xA9FE0000u, 16)) return "link-local";      // 169.254/16
    if (in(0xE0000000u, 4)) return "multicast";        // 224/4
    if (in(0xF0000000u, 4)) return "reserved";         // 240/4 incl. 255.255.255.255
    return nullptr;
}

inline const char* classify_v6(const unsigned char b[16]) noexcept {
    static const unsigned char zero[16] = {};
    if (std::memcmp(b, zero, 16) == 0) return "unspecified";
    if (std::memcmp(b, zero, 15) == 0 && b[15] == 1) return "loopback";
    static const unsigned char mapped[12] = {0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff};
    if (std::memcmp(b, mapped, 12) == 0) {
        uint32_t v4 = (uint32_t{b[12]} << 24) | (uint32_t{b[13]} << 16) | (uint32_t{b[14]} << 8) | b[15];
        return classify_v4(v4);
    }
    if ((b[0] & 0xFE) == 0xFC) return "private";                     // fc00::/7 unique local
    if (b[0] == 0xFE && (b[1] & 0xC0) == 0x80) return "link-local";  // fe80::/10
    if (b[0] == 0xFE && (b[1] & 0xC0) == 0xC0) return "private";     // fec0::/10 site-local (deprecated)
    if (b[0] == 0xFF) return "multicast";                            // ff00::/8
    return nullptr;
}

// ---------------------------------------------------------------------------------------------
// Small helpers

// An RFC 9110 token character (header names).
inline bool token_char(char c) noexcept {
    return (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9') ||
           std::strchr("!#$%&'*+-.^_`|~", c) != nullptr;
}

inline bool valid_header_name(std::string_view name) noexcept {
    if (name.empty()) return false;
    for (char c : name)
        if (!token_char(c)) return false;
    return true;
}

// A header value without control characters: nothing substituted into a header can end it early
// or add another one.
inline std::string header_safe(std::string_view v) {
    std::string out;
    for (char c : v) {
        auto u = static_cast<unsigned char>(c);
        if (u >= 0x20 && u != 0x7f) out += c;
    }
    return out;
}

// Retry-After: delta-seconds or HTTP-date; -1 when absent or invalid.
inline int64_t parse_retry_after(std::string_view v) {
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

// Why `url` is not an absolute http:// or https:// URL with a host, or "" when it is.
inline std::string check_http_url(const std::string& url) {
    CURLU* u = curl_url();
    if (!u) throw std::bad_alloc();
    std::unique_ptr<CURLU, decltype(&curl_url_cleanup)> guard(u, &curl_url_cleanup);
    if (curl_url_set(u, CURLUPART_URL, url.c_str(), 0) != CURLUE_OK) return "is not a valid URL";
    char* scheme = nullptr;
    char* hostpart = nullptr;
    curl_url_get(u, CURLUPART_SCHEME, &scheme, 0);
    curl_url_get(u, CURLUPART_HOST, &hostpart, 0);
    bool ok_scheme = scheme && (iequals(scheme, "http") || iequals(scheme, "https"));
    bool ok_host = hostpart && *hostpart;
    curl_free(scheme);
    curl_free(hostpart);
    if (!ok_scheme) return "must be an http:// or https:// URL";
    if (!ok_host) return "has no host";
    return {};
}

// ---------------------------------------------------------------------------------------------
// One request's exchange with the destination check and the response capture

struct exchange {
    bool allow_private = false;
    std::string refused;  // "127.0.0.1 (loopback)" of the last refused address
    int opened = 0;       // sockets actually opened
    std::string body_head;
    std::string retry_after;

    // Whether a failed perform failed because every address was refused by the guard.
    bool refused_only() const noexcept { return !refused.empty() && opened == 0; }
};

// CURLOPT_OPENSOCKETFUNCTION: refuses loopback/private/link-local/... addresses unless allowed.
// Runs after DNS resolution, on the address actually connected to, so DNS rebinding cannot
// bypass it.
inline curl_socket_t open_socket(void* clientp, curlsocktype, struct curl_sockaddr* a) noexcept {
    auto* ctx = static_cast<exchange*>(clientp);
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

inline size_t on_body(char* data, size_t size, size_t n, void* userp) noexcept {
    auto* ctx = static_cast<exchange*>(userp);
    size_t len = size * n;
    try {
        if (ctx->body_head.size() < 128) ctx->body_head.append(data, std::min(len, 128 - ctx->body_head.size()));
    } catch (...) {
    }
    return len;
}

inline size_t on_header(char* data, size_t size, size_t n, void* userp) noexcept {
    auto* ctx = static_cast<exchange*>(userp);
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

// The options every request of these plugins sets: only http/https, no redirects, no proxies
// from the environment (they would bypass the destination check), the guard and the capture.
inline void setup_request(CURL* c, exchange& ctx, char* errbuf, int64_t timeout_ms, int64_t connect_timeout_ms,
                          const std::string& ca_file) {
    curl_easy_setopt(c, CURLOPT_PROTOCOLS_STR, "http,https");
    curl_easy_setopt(c, CURLOPT_FOLLOWLOCATION, 0L);
    curl_easy_setopt(c, CURLOPT_PROXY, "");
    curl_easy_setopt(c, CURLOPT_NOSIGNAL, 1L);
    curl_easy_setopt(c, CURLOPT_TIMEOUT_MS, static_cast<long>(timeout_ms));
    curl_easy_setopt(c, CURLOPT_CONNECTTIMEOUT_MS, static_cast<long>(connect_timeout_ms));
    curl_easy_setopt(c, CURLOPT_ERRORBUFFER, errbuf);
    if (!ca_file.empty()) curl_easy_setopt(c, CURLOPT_CAINFO, ca_file.c_str());
    curl_easy_setopt(c, CURLOPT_OPENSOCKETFUNCTION, &open_socket);
    curl_easy_setopt(c, CURLOPT_OPENSOCKETDATA, &ctx);
    curl_easy_setopt(c, CURLOPT_WRITEFUNCTION, &on_body);
    curl_easy_setopt(c, CURLOPT_WRITEDATA, &ctx);
    curl_easy_setopt(c, CURLOPT_HEADERFUNCTION, &on_header);
    curl_easy_setopt(c, CURLOPT_HEADERDATA, &ctx);
}

// Runs the request set up on `c`. A transport failure decides the outcome here: a destination the
// guard refused (and nothing else opened) fails for good, anything else is retried; both with the
// reason in r. Otherwise nothing is returned and `status` (also in r.code) is the HTTP status.
inline std::optional<evmesh_status> perform(CURL* c, const exchange& ctx, const char* errbuf, evmesh_result& r,
                                            long& status) {
    const CURLcode rc = curl_easy_perform(c);
    status = 0;
    curl_easy_getinfo(c, CURLINFO_RESPONSE_CODE, &status);
    r.code = static_cast<int32_t>(status);
    if (rc == CURLE_OK) {
        return std::nullopt;
    }
    if (ctx.refused_only()) {
        set_detail(&r, "refused destination %s; set allow_private = true to allow", ctx.refused.c_str());
        return EVMESH_FAIL;
    }
    set_detail(&r, "%s", printable(errbuf[0] ? errbuf : curl_easy_strerror(rc), 255).c_str());
    return EVMESH_RETRY;
}

// ---------------------------------------------------------------------------------------------
// A pool of idle easy handles. Idle handles keep their connection caches, so consecutive
// deliveries reuse connections.

class handle_pool {
public:
    handle_pool() = default;
    ~handle_pool() {
        for (CURL* h : idle_) curl_easy_cleanup(h);
    }
    handle_pool(const handle_pool&) = delete;
    handle_pool& operator=(const handle_pool&) = delete;

    // Takes an idle handle (or a new one) and gives it back afterwards.
    class lease {
    public:
        explicit lease(handle_pool& p) : p_(p) {
            {
                std::lock_guard lock(p_.mutex_);
                if (!p_.idle_.empty()) {
                    h_ = p_.idle_.back();
                    p_.idle_.pop_back();
                }
            }
            if (!h_) h_ = curl_easy_init();
        }
        ~lease() {
            if (!h_) return;
            curl_easy_reset(h_);  // drops options (and pointers into this call); keeps connections
            std::lock_guard lock(p_.mutex_);
            if (p_.idle_.size() < max_idle) {
                p_.idle_.push_back(h_);
                return;
            }
            curl_easy_cleanup(h_);
        }
        lease(const lease&) = delete;
        lease& operator=(const lease&) = delete;
        CURL* get() const noexcept { return h_; }

    private:
        handle_pool& p_;
        CURL* h_ = nullptr;
    };

private:
    static constexpr size_t max_idle = 8;
    std::mutex mutex_;
    std::vector<CURL*> idle_;
};

}  // namespace evmesh::channels::http
