// The "http" channel plugin: one HTTP(S) request per event, built from templates (method, URL,
// headers, a JSON or form body), with basic or bearer authentication, and three presets:
//   sms-form   an SMS gateway's form-encoded POST with basic auth (Twilio-like To/From/Body)
//   fcm-v1     Firebase Cloud Messaging HTTP v1 ({"message": {"token", "notification", "data"}})
//   webpush    Web Push (RFC 8030) with VAPID (RFC 8292) and aes128gcm payload encryption
//              (RFC 8291), the encryption in webpush.hpp
// The destination check (SSRF guard), the handle pool and Retry-After handling are the webhook's
// (http_common.hpp); templates are the bridges' (http_request.hpp explains the escaping).
// Settings, presets and outcome mapping: docs/CHANNELS-BUILTIN.md.
#include "common.hpp"
#include "curl_util.hpp"
#include "http_common.hpp"
#include "http_request.hpp"
#include "webpush.hpp"

#include <curl/curl.h>

#include <unistd.h>

#include <ctime>
#include <fstream>
#include <sstream>

namespace evmesh::channels {
namespace {

using http::event_fields;
using http::form_template;
using http::json_template;
using http::name_template;
using http::url_template;

enum class preset_kind { none, sms_form, fcm_v1, webpush };

class http_channel {
public:
    static constexpr const char* plugin_name = "http";
    static constexpr const char* description =
        "HTTP(S) request per event from templates; presets sms-form, fcm-v1, webpush (VAPID, RFC 8291)";

    explicit http_channel(const evmesh_host& host) : log_(host) {
        curl_init_once();  // check_http_url below uses curl's URL parser
        if (sodium_init() < 0) throw config_error("http: libsodium initialisation failed");
        settings s(plugin_name, host.settings_json);
        auto preset = s.choice_or("preset", "", {"sms-form", "fcm-v1", "webpush"});
        preset_ = preset == "sms-form" ? preset_kind::sms_form
                  : preset == "fcm-v1" ? preset_kind::fcm_v1
                  : preset == "webpush" ? preset_kind::webpush
                                        : preset_kind::none;

        method_ = s.choice_or("method", "POST", {"GET", "POST", "PUT", "PATCH", "DELETE"});
        if (preset_ != preset_kind::none && method_ != "POST")
            s.fail("method", "must be POST with preset = \"" + preset + "\"");
        read_url(s);
        read_auth(s);
        read_body(s);
        for (auto& [name, value] : s.string_table("headers")) add_header(s, name, value);

        timeout_ms_ = s.duration_ms_or("timeout_ms", 10000);
        connect_timeout_ms_ = s.duration_ms_or("connect_timeout_ms", 3000);
        allow_private_ = s.boolean_or("allow_private", false);
        user_agent_ = s.string_or("user_agent", "evmesh-http/1");
        if (user_agent_.find_first_of("\r\n") != std::string::npos) s.fail("user_agent", "must not contain CR or LF");
        ca_file_ = s.string_or("ca_file", "");
        if (!ca_file_.empty() && ::access(ca_file_.c_str(), R_OK) != 0) s.fail("ca_file", "cannot be read");
        s.finish();

        if (allow_private_)
            log_.log(EVMESH_LOG_INFO, "http %s: allow_private = true (loopback/private destinations allowed)",
                     log_.instance.c_str());
        if (vapid_)
            log_.log(EVMESH_LOG_INFO, "http %s: VAPID public key (applicationServerKey) %s", log_.instance.c_str(),
                     vapid_->public_key().c_str());
    }

    http_channel(const http_channel&) = delete;
    http_channel& operator=(const http_channel&) = delete;

    evmesh_status deliver(const evmesh_event& ev, const evmesh_attempt&, evmesh_result& r) {
        event_fields fields(ev);
        std::string url = url_.render(fields);
        if (auto why = http::check_http_url(url); !why.empty()) {
            set_detail(&r, "url %s for this event: %s", why.c_str(), printable(url, 120).c_str());
            return EVMESH_FAIL;  // the event's own data makes it undeliverable; a retry changes nothing
        }

        slist_ptr headers;
        std::string body;
        bool has_body = method_ != "GET";
        if (preset_ == preset_kind::webpush) {
            if (!webpush_request(fields, url, headers, body, r)) return EVMESH_FAIL;
        } else if (!form_.empty()) {
            body = form_.render(fields);
            if (!content_type_set_) append(headers, "Content-Type: application/x-www-form-urlencoded");
        } else if (!json_.empty()) {
            body = json_.render(fields);
            if (!content_type_set_) append(headers, "Content-Type: application/json");
        } else if (has_body) {
            body = dump_json(cloudevent_json(ev));
            if (!content_type_set_) append(headers, "Content-Type: application/cloudevents+json");
        }
        append(headers, "Expect:");  // no 100-continue round trip
        for (const auto& [name, tpl] : headers_) {
            std::string value = tpl.expand(fields, &http::header_escape);
            append(headers, value.empty() ? name + ";" : name + ": " + value);  // "Name;": an empty value
        }
        if (bearer_ || !bearer_file_.empty()) {
            std::string token;
            if (!bearer_token(token, r)) return EVMESH_RETRY;
            append(headers, "Authorization: Bearer " + token);
        }

        http::exchange ctx;
        ctx.allow_private = allow_private_;
        http::handle_pool::lease h(pool_);
        if (!h.get()) {
            set_detail(&r, "curl_easy_init failed");
            return EVMESH_RETRY;
        }
        char errbuf[CURL_ERROR_SIZE] = {};
        CURL* c = h.get();
        curl_easy_setopt(c, CURLOPT_URL, url.c_str());
        http::setup_request(c, ctx, errbuf, timeout_ms_, connect_timeout_ms_, ca_file_);
        curl_easy_setopt(c, CURLOPT_USERAGENT, user_agent_.c_str());
        curl_easy_setopt(c, CURLOPT_HTTPHEADER, headers.get());
        if (method_ == "GET") {
            curl_easy_setopt(c, CURLOPT_HTTPGET, 1L);
        } else {
            curl_easy_setopt(c, CURLOPT_POST, 1L);
            curl_easy_setopt(c, CURLOPT_POSTFIELDS, body.data());
            curl_easy_setopt(c, CURLOPT_POSTFIELDSIZE_LARGE, static_cast<curl_off_t>(body.size()));
            if (method_ != "POST") curl_easy_setopt(c, CURLOPT_CUSTOMREQUEST, method_.c_str());
        }
        if (basic_) {
            curl_easy_setopt(c, CURLOPT_HTTPAUTH, CURLAUTH_BASIC);
            curl_easy_setopt(c, CURLOPT_USERNAME, username_.c_str());
            curl_easy_setopt(c, CURLOPT_PASSWORD, password_.c_str());
        }

        long status = 0;
        if (auto failed = http::perform(c, ctx, errbuf, r, status)) {
            return *failed;
        }
        return outcome(status, ctx, r);
    }

private:
    // Like the webhook's mapping, except that 410 fails the event instead of disabling the
    // channel: the URL here is often per event (a push subscription, a device), so one gone
    // destination says nothing about the others.
    evmesh_status outcome(long status, const http::exchange& ctx, evmesh_result& r) const {
        if (status >= 200 && status < 300) return EVMESH_DELIVERED;
        std::string head = printable(ctx.body_head, 100);
        if (preset_ == preset_kind::webpush && (status == 404 || status == 410)) {
            set_detail(&r, "push subscription gone (HTTP %ld): the push service no longer knows this subscription; "
                           "remove it%s%s", status, head.empty() ? "" : ": ", head.c_str());
            return EVMESH_FAIL;
        }
        if (preset_ == preset_kind::fcm_v1 && status == 404) {
            set_detail(&r, "FCM registration token not registered (HTTP 404): remove it%s%s", head.empty() ? "" : ": ",
                       head.c_str());
            return EVMESH_FAIL;
        }
        set_detail(&r, "HTTP %ld%s%s", status, head.empty() ? "" : ": ", head.c_str());
        // A token read from a file expires (OAuth access tokens live an hour) and its refresher
        // replaces the file: a refused token is a reason to try again, not to dead-letter the event.
        if (status == 401 && !bearer_file_.empty()) return EVMESH_RETRY;
        if (status == 429 || status == 503) {
            r.retry_after_ms = http::parse_retry_after(ctx.retry_after);
            return EVMESH_RETRY;
        }
        if (status == 408 || status == 425 || (status >= 500 && status <= 599)) return EVMESH_RETRY;
        return EVMESH_FAIL;
    }

    // ---- settings

    void read_url(settings& s) {
        std::optional<std::string> def;
        if (preset_ == preset_kind::webpush) def = "{data.subscription.endpoint}";
        if (preset_ == preset_kind::fcm_v1) {
            if (auto project = s.optional_string("project_id")) {
                for (char c : *project)
                    if (!http::unreserved(c)) s.fail("project_id", "is not a valid project id");
                def = "https://fcm.googleapis.com/v1/projects/" + *project + "/messages:send";
            }
        }
        auto text = s.optional_string("url");
        if (!text && !def)
            s.fail("url", preset_ == preset_kind::fcm_v1 ? "is required (or project_id)" : "is required");
        url_ = url_template(s, "url", text ? *text : *def);
        if (url_.constant())
            if (auto why = http::check_http_url(url_.text()); !why.empty()) s.fail("url", why);
    }

    void read_auth(settings& s) {
        auto user = s.optional_string("username");
        auto pass = s.optional_string("password", true);
        if (pass && !user) s.fail("password", "needs username");
        if (user) {
            if (user->find(':') != std::string::npos) s.fail("username", "must not contain ':' (basic auth)");
            basic_ = true;
            username_ = *user;
            password_ = pass ? *pass : "";
        }
        if (auto token = s.optional_string("bearer_token")) {
            if (token->find_first_of("\r\n") != std::string::npos) s.fail("bearer_token", "must not contain CR or LF");
            bearer_ = *token;
        }
        bearer_file_ = s.string_or("bearer_token_file", "");
        if (!bearer_file_.empty() && ::access(bearer_file_.c_str(), R_OK) != 0)
            s.fail("bearer_token_file", "cannot be read");
        if (bearer_ && !bearer_file_.empty()) s.fail("bearer_token_file", "and bearer_token are exclusive");
        if (basic_ && (bearer_ || !bearer_file_.empty()))
            s.fail("username", "(basic auth) and a bearer token are exclusive");
        if (preset_ == preset_kind::sms_form && !basic_) s.fail("username", "is required with preset = \"sms-form\"");
        if (preset_ == preset_kind::fcm_v1 && !bearer_ && bearer_file_.empty())
            s.fail("bearer_token", "(or bearer_token_file) is required with preset = \"fcm-v1\"");
        if (preset_ == preset_kind::webpush && (basic_ || bearer_ || !bearer_file_.empty()))
            s.fail("username", "and bearer tokens do not apply to preset = \"webpush\" (it authenticates with VAPID)");
    }

    void read_body(settings& s) {
        const json* json_doc = s.find("json");
        const json* form_doc = s.find("form");
        if (json_doc && form_doc) s.fail("form", "and settings.json are exclusive (one body)");
        if ((json_doc || form_doc) && method_ == "GET") s.fail(json_doc ? "json" : "form", "is a body; GET has none");
        if (json_doc) {
            if (!json_doc->is_object() && !json_doc->is_array()) s.fail("json", "must be a table or an array");
            if (preset_ == preset_kind::sms_form) s.fail("json", "does not apply to preset = \"sms-form\" (a form)");
            json_ = json_template(s, "json", *json_doc);
        }
        if (form_doc) {
            if (!form_doc->is_object()) s.fail("form", "must be a table of strings");
            if (preset_ == preset_kind::fcm_v1 || preset_ == preset_kind::webpush)
                s.fail("form", std::string("does not apply to preset = \"") +
                                   (preset_ == preset_kind::fcm_v1 ? "fcm-v1" : "webpush") + "\"");
        }

        switch (preset_) {
        case preset_kind::sms_form:
            // Twilio's Messages resource: To, From, Body; `form` adds or replaces fields
            form_.add(s, "to", "To", s.string_or("to", "{data.to}"));
            form_.add(s, "from", "From", s.required_string("from"));
            form_.add(s, "text", "Body", s.string_or("text", "{data.text}"));
            break;
        case preset_kind::fcm_v1:
            // json replaces the whole message; else it is built from token, title, text and data
            if (!json_doc) {
                json_.set(s, "token", {"message", "token"}, s.string_or("token", "{data.token}"));
                json_.set(s, "title", {"message", "notification", "title"}, s.string_or("title", "{data.title}"));
                json_.set(s, "text", {"message", "notification", "body"}, s.string_or("text", "{data.text}"));
                auto data = s.string_table("data");
                if (data.empty()) data = {{"id", "{id}"}, {"type", "{type}"}};
                for (auto& [k, v] : data) json_.set(s, "data." + k, {"message", "data", k}, v);
            }
            break;
        case preset_kind::webpush:
            read_webpush(s);
            break;
        case preset_kind::none:
            break;
        }
        if (form_doc)
            for (auto it = form_doc->begin(); it != form_doc->end(); ++it) {
                if (!it.value().is_string()) s.fail("form." + it.key(), "must be a string");
                form_.add(s, "form", it.key(), it.value().get<std::string>());
            }
    }

    void read_webpush(settings& s) {
        p256dh_ = http::parse_template(s, "p256dh", s.string_or("p256dh", "{data.subscription.keys.p256dh}"));
        auth_ = http::parse_template(s, "auth", s.string_or("auth", "{data.subscription.keys.auth}"));
        auto subject = s.required_string("vapid_subject");
        if (subject.rfind("mailto:", 0) != 0 && subject.rfind("https://", 0) != 0)
            s.fail("vapid_subject", "must be a mailto: or https: URI (RFC 8292 section 2.1)");
        auto key_text = s.optional_string("vapid_private_key");
        auto key_file = s.optional_string("vapid_private_key_file");
        if (key_text && key_file) s.fail("vapid_private_key_file", "and vapid_private_key are exclusive");
        if (!key_text && !key_file)
            s.fail("vapid_private_key", "(or vapid_private_key_file) is required with preset = \"webpush\"");
        webpush::pkey_ptr key;
        try {
            if (key_file) {
                key = webpush::private_key_from_pem_file(*key_file);
            } else {
                auto d = webpush::from_b64url(*key_text);
                if (!d || d->size() != 32)
                    s.fail("vapid_private_key", "must be the base64url P-256 private key (32 octets)");
                key = webpush::private_key_from_scalar(*d);
                sodium_memzero(d->data(), d->size());
            }
        } catch (const webpush::crypto_error& e) {
            s.fail(key_file ? "vapid_private_key_file" : "vapid_private_key", e.what());
        }
        vapid_.emplace(std::move(key), subject);
        ttl_s_ = s.integer_or("ttl_seconds", 86400, 0, 28 * 86400);
        urgency_ = s.choice_or("urgency", "normal", {"very-low", "low", "normal", "high"});
        if (auto topic = s.optional_string("topic")) topic_ = http::parse_template(s, "topic", *topic);
        // the push message: json renders it; without json, the CloudEvents JSON of the event
    }

    void add_header(settings& s, const std::string& name, const std::string& value) {
        std::string key = "headers." + name;
        if (!http::valid_header_name(name)) s.fail(key, "is not a valid header name");
        std::string lower;
        for (char c : name) lower += ascii_lower(c);
        if (lower == "content-length" || lower == "host" || lower == "transfer-encoding" || lower == "expect")
            s.fail(key, "is set by the plugin and cannot be overridden");
        if (lower == "authorization" && (basic_ || bearer_ || !bearer_file_.empty() || preset_ == preset_kind::webpush))
            s.fail(key, "conflicts with the configured authentication");
        if (preset_ == preset_kind::webpush &&
            (lower == "content-type" || lower == "content-encoding" || lower == "ttl" || lower == "urgency" ||
             lower == "topic" || lower == "crypto-key" || lower == "encryption"))
            s.fail(key, "is set by the webpush preset");
        if (lower == "content-type") content_type_set_ = true;
        headers_.emplace_back(name, http::parse_template(s, key, value));
    }

    // ---- per delivery

    bool bearer_token(std::string& token, evmesh_result& r) const {
        if (bearer_) {
            token = *bearer_;
            return true;
        }
        // Read at every attempt, so a token refresher (OAuth access tokens live an hour) can
        // replace the file without a restart.
        std::ifstream in(bearer_file_);
        std::stringstream text;
        text << in.rdbuf();
        token = std::string(trim(text.str()));
        if (!in || token.empty() || token.find_first_of("\r\n") != std::string::npos) {
            set_detail(&r, "bearer_token_file %s is unreadable, empty or has several lines", bearer_file_.c_str());
            return false;
        }
        return true;
    }

    // The encrypted body and the Web Push headers; false (with the reason) when this event cannot
    // be pushed (bad keys, too large, bad Topic).
    bool webpush_request(const event_fields& f, const std::string& url, slist_ptr& headers, std::string& body,
                         evmesh_result& r) const {
        std::string plaintext = json_.empty() ? dump_json(cloudevent_json(f.event())) : json_.render(f);
        webpush::bytes sealed;
        try {
            auto keys = webpush::decode_keys(p256dh_.expand(f), auth_.expand(f));
            sealed = webpush::encrypt(plaintext, keys);
        } catch (const webpush::crypto_error& e) {
            set_detail(&r, "web push: %s", e.what());
            return false;
        }
        std::string topic;
        if (!topic_.empty()) {
            topic = topic_.expand(f);
            bool ok = !topic.empty() && topic.size() <= 32;  // RFC 8030 section 5.4: 32 base64url characters
            for (char c : topic) ok = ok && (http::unreserved(c) && c != '.' && c != '~');
            if (!ok) {
                set_detail(&r, "web push: Topic \"%s\" is not 1 to 32 base64url characters",
                           printable(topic, 40).c_str());
                return false;
            }
        }
        std::string audience = origin(url);
        if (audience.empty()) {
            set_detail(&r, "web push: no origin in the endpoint URL");
            return false;
        }
        // RFC 8292: exp at most 24 h ahead; 12 h leaves room for clock skew
        int64_t exp = static_cast<int64_t>(std::time(nullptr)) + 12 * 3600;
        try {
            append(headers, "Authorization: " + vapid_->authorization(audience, exp));
        } catch (const webpush::crypto_error& e) {
            set_detail(&r, "web push: %s", e.what());
            return false;
        }
        body.assign(reinterpret_cast<const char*>(sealed.data()), sealed.size());
        append(headers, "Content-Type: application/octet-stream");
        append(headers, "Content-Encoding: aes128gcm");
        append(headers, "TTL: " + std::to_string(ttl_s_));
        append(headers, "Urgency: " + urgency_);
        if (!topic.empty()) append(headers, "Topic: " + topic);
        return true;
    }

    // scheme://host[:port] of url (the port only when it is not the scheme's default).
    static std::string origin(const std::string& url) {
        CURLU* u = curl_url();
        if (!u) throw std::bad_alloc();
        std::unique_ptr<CURLU, decltype(&curl_url_cleanup)> guard(u, &curl_url_cleanup);
        if (curl_url_set(u, CURLUPART_URL, url.c_str(), 0) != CURLUE_OK) return {};
        char* scheme = nullptr;
        char* hostpart = nullptr;
        char* port = nullptr;
        curl_url_get(u, CURLUPART_SCHEME, &scheme, 0);
        curl_url_get(u, CURLUPART_HOST, &hostpart, 0);
        curl_url_get(u, CURLUPART_PORT, &port, CURLU_NO_DEFAULT_PORT);
        std::string out;
        if (scheme && hostpart) {
            out = std::string(scheme) + "://" + hostpart;
            for (char& c : out) c = ascii_lower(c);
            if (port) out += ":" + std::string(port);
        }
        curl_free(scheme);
        curl_free(hostpart);
        curl_free(port);
        return out;
    }

    host_logger log_;
    preset_kind preset_ = preset_kind::none;
    std::string method_;
    url_template url_;
    std::vector<std::pair<std::string, name_template>> headers_;
    bool content_type_set_ = false;
    json_template json_;
    form_template form_;
    bool basic_ = false;
    std::string username_, password_;
    std::optional<std::string> bearer_;
    std::string bearer_file_;
    // webpush
    name_template p256dh_, auth_, topic_;
    std::optional<webpush::vapid> vapid_;
    int64_t ttl_s_ = 86400;
    std::string urgency_;

    int64_t timeout_ms_ = 10000;
    int64_t connect_timeout_ms_ = 3000;
    bool allow_private_ = false;
    std::string user_agent_;
    std::string ca_file_;
    mutable http::handle_pool pool_;
};

}  // namespace
}  // namespace evmesh::channels

extern "C" EVMESH_CHANNEL_EXPORT const evmesh_channel_plugin* evmesh_channel_plugin_v1(void) {
    return &evmesh::channels::plugin_glue<evmesh::channels::http_channel>::table;
}
