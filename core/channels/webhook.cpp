// The "webhook" channel plugin: HTTP(S) POST of each event, CloudEvents structured or binary mode,
// signed per Standard Webhooks (webhook-id / webhook-timestamp / webhook-signature), with a
// connect-time destination check against loopback/private/link-local addresses (SSRF guard).
// Settings and outcome mapping: docs/CHANNELS-BUILTIN.md.
#include "common.hpp"
#include "curl_util.hpp"
#include "http_common.hpp"

#include <curl/curl.h>

#include <unistd.h>

#include <ctime>

namespace evmesh::channels {
namespace {

// ---------------------------------------------------------------------------------------------
// Helpers (the destination check, the handle pool and the response capture are in http_common.hpp)

using http::header_safe;
using http::parse_retry_after;

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

// ---------------------------------------------------------------------------------------------
// The channel

class webhook {
public:
    static constexpr const char* plugin_name = "webhook";
    static constexpr const char* description = "HTTP(S) POST of CloudEvents, signed per Standard Webhooks";

    explicit webhook(const evmesh_host& host) : log_(host) {
        settings s(plugin_name, host.settings_json);
        url_ = s.required_string("url");
        if (auto why = http::check_http_url(url_); !why.empty()) s.fail("url", why);
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

    ~webhook() = default;

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

        http::exchange ctx;
        ctx.allow_private = allow_private_;
        http::handle_pool::lease h(pool_);
        if (!h.get()) {
            set_detail(&r, "curl_easy_init failed");
            return EVMESH_RETRY;
        }
        char errbuf[CURL_ERROR_SIZE] = {};
        CURL* c = h.get();
        curl_easy_setopt(c, CURLOPT_URL, url_.c_str());
        http::setup_request(c, ctx, errbuf, timeout_ms_, connect_timeout_ms_, ca_file_);
        curl_easy_setopt(c, CURLOPT_POST, 1L);
        curl_easy_setopt(c, CURLOPT_POSTFIELDS, body.data());
        curl_easy_setopt(c, CURLOPT_POSTFIELDSIZE_LARGE, static_cast<curl_off_t>(body.size()));
        curl_easy_setopt(c, CURLOPT_HTTPHEADER, headers.get());
        curl_easy_setopt(c, CURLOPT_USERAGENT, user_agent_.c_str());

        long status = 0;
        if (auto failed = http::perform(c, ctx, errbuf, r, status)) {
            return *failed;
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
            if (!http::token_char(c)) s.fail(key, "is not a valid header name");
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

    http::handle_pool pool_;
};

}  // namespace
}  // namespace evmesh::channels

extern "C" EVMESH_CHANNEL_EXPORT const evmesh_channel_plugin* evmesh_channel_plugin_v1(void) {
    return &evmesh::channels::plugin_glue<evmesh::channels::webhook>::table;
}
