// The "email" channel plugin: one e-mail per event over SMTP (libcurl), subject and body from
// templates. Settings and outcome mapping: docs/CHANNELS-BUILTIN.md.
#include "common.hpp"
#include "curl_util.hpp"

#include <curl/curl.h>

#include <sys/socket.h>

#include <algorithm>
#include <ctime>
#include <memory>
#include <mutex>

namespace evmesh::channels {
namespace {

// The SMTP path of an address: "Name <a@b>" -> "<a@b>", "a@b" -> "<a@b>".
std::string smtp_path(const std::string& addr) {
    auto lt = addr.rfind('<');
    auto gt = addr.rfind('>');
    if (lt != std::string::npos && gt != std::string::npos && gt > lt) return addr.substr(lt, gt - lt + 1);
    return "<" + std::string(trim(addr)) + ">";
}

// RFC 5322 date, locale-independent: "Tue, 02 Jan 2024 15:04:05 +0000".
std::string rfc5322_now() {
    static const char* const days[] = {"Sun", "Mon", "Tue", "Wed", "Thu", "Fri", "Sat"};
    static const char* const months[] = {"Jan", "Feb", "Mar", "Apr", "May", "Jun",
                                         "Jul", "Aug", "Sep", "Oct", "Nov", "Dec"};
    time_t now = std::time(nullptr);
    struct tm tm {};
    gmtime_r(&now, &tm);
    char buf[64];
    std::snprintf(buf, sizeof buf, "%s, %02d %s %04d %02d:%02d:%02d +0000", days[tm.tm_wday % 7], tm.tm_mday,
                  months[tm.tm_mon % 12], tm.tm_year + 1900, tm.tm_hour, tm.tm_min, tm.tm_sec);
    return buf;
}

// Subject header value: ASCII as is, otherwise RFC 2047 encoded words (UTF-8, base64), split at
// character boundaries so each word stays under 76 characters.
std::string encode_subject(const std::string& s) {
    bool ascii = std::all_of(s.begin(), s.end(), [](char c) { return static_cast<unsigned char>(c) < 0x80; });
    if (ascii) return s;
    std::string out;
    size_t i = 0;
    while (i < s.size()) {
        size_t end = std::min(s.size(), i + 45);
        while (end < s.size() && end > i && (static_cast<unsigned char>(s[end]) & 0xC0) == 0x80) --end;
        if (end == i) end = std::min(s.size(), i + 45);
        if (!out.empty()) out += "\r\n ";
        out += "=?UTF-8?B?" + base64(s.data() + i, end - i) + "?=";
        i = end;
    }
    return out;
}

// LF, CR and CRLF line ends -> CRLF.
std::string crlf(std::string_view s) {
    std::string out;
    out.reserve(s.size() + s.size() / 32);
    for (size_t i = 0; i < s.size(); ++i) {
        char c = s[i];
        if (c == '\r') {
            out += "\r\n";
            if (i + 1 < s.size() && s[i + 1] == '\n') ++i;
        } else if (c == '\n') {
            out += "\r\n";
        } else {
            out += c;
        }
    }
    return out;
}

// Quoted-printable (RFC 2045) of a CRLF text, for bodies with lines over 998 bytes.
std::string quoted_printable(std::string_view s) {
    static const char hex[] = "0123456789ABCDEF";
    std::string out;
    size_t col = 0;
    auto put = [&](std::string_view piece) {
        if (col + piece.size() > 75) {
            out += "=\r\n";
            col = 0;
        }
        out += piece;
        col += piece.size();
    };
    for (size_t i = 0; i < s.size(); ++i) {
        auto u = static_cast<unsigned char>(s[i]);
        if (u == '\r' && i + 1 < s.size() && s[i + 1] == '\n') {
            out += "\r\n";
            col = 0;
            ++i;
            continue;
        }
        bool at_eol = i + 1 == s.size() || s[i + 1] == '\r';
        if ((u >= 33 && u <= 126 && u != '=') || ((u == ' ' || u == '\t') && !at_eol)) {
            char c = static_cast<char>(u);
            put(std::string_view(&c, 1));
        } else {
            char enc[3] = {'=', hex[u >> 4], hex[u & 15]};
            put(std::string_view(enc, 3));
        }
    }
    return out;
}

bool has_long_line(std::string_view s) {
    size_t start = 0;
    while (start <= s.size()) {
        size_t e = s.find("\r\n", start);
        if (e == std::string_view::npos) e = s.size();
        if (e - start > 998) return true;
        start = e + 2;
    }
    return false;
}

std::string strip_crlf(std::string_view s) {
    std::string out;
    for (char c : s) out += (c == '\r' || c == '\n') ? ' ' : c;
    return out;
}

class email {
public:
    static constexpr const char* plugin_name = "email";
    static constexpr const char* description = "One e-mail per event over SMTP";

    explicit email(const evmesh_host& host) : log_(host) {
        settings s(plugin_name, host.settings_json);
        url_ = s.required_string("url");
        bool smtps = starts_with_icase(url_, "smtps://");
        if (!smtps && !starts_with_icase(url_, "smtp://")) s.fail("url", "must be an smtp:// or smtps:// URL");
        if (url_.find_first_of("\r\n ") != std::string::npos) s.fail("url", "must not contain blanks");
        std::string tls = s.choice_or("tls", smtps ? "implicit" : "try", {"none", "starttls", "try"});
        if (smtps && s.has("tls")) s.fail("tls", "does not apply to smtps:// (TLS is implicit); remove it");
        use_ssl_ = tls == "starttls" ? CURLUSESSL_ALL : tls == "try" ? CURLUSESSL_TRY : CURLUSESSL_NONE;
        username_ = s.optional_string("username");
        password_ = s.optional_string("password", true);
        insecure_ = s.boolean_or("insecure_skip_verify", false);
        from_ = s.required_string("from");
        check_address(s, "from", from_);
        auto to = s.string_array("to");
        if (!to) s.fail("to", "is required");
        to_ = *to;
        for (const auto& a : to_) check_address(s, "to", a);
        subject_ = s.string_or("subject", "[evmesh] {{topic}}");
        body_ = s.string_or("body",
                            "Event {{id}}\n"
                            "Topic:  {{topic}}\n"
                            "Source: {{source}}\n"
                            "Time:   {{time}}\n"
                            "\n"
                            "{{payload}}\n");
        timeout_ms_ = s.duration_ms_or("timeout_ms", 30000);
        s.finish();

        curl_init_once();
        if (sodium_init() < 0) throw config_error("email: libsodium initialisation failed");
        if (username_ && use_ssl_ != CURLUSESSL_ALL && !smtps)
            log_.log(EVMESH_LOG_WARN, "email %s: credentials configured with tls = \"%s\"; they may be sent in clear",
                     log_.instance.c_str(), tls.c_str());
        if (insecure_)
            log_.log(EVMESH_LOG_WARN, "email %s: insecure_skip_verify = true (TLS certificates are not verified)",
                     log_.instance.c_str());
    }

    // {{id}} {{topic}} {{source}} {{time}} {{seq}} {{content_type}} {{payload}} {{header.NAME}};
    // anything else is left as written.
    static std::string expand(std::string_view tpl, const evmesh_event& ev) {
        std::string out;
        size_t i = 0;
        while (i < tpl.size()) {
            size_t open = tpl.find("{{", i);
            if (open == std::string_view::npos) break;
            size_t close = tpl.find("}}", open + 2);
            if (close == std::string_view::npos) break;
            out.append(tpl.substr(i, open - i));
            std::string_view name = trim(tpl.substr(open + 2, close - open - 2));
            if (name == "id")
                out += view(ev.id_text);
            else if (name == "topic")
                out += view(ev.topic, ev.topic_len);
            else if (name == "source")
                out += view(ev.source, ev.source_len);
            else if (name == "time")
                out += rfc3339(ev.time_ns);
            else if (name == "seq")
                out += std::to_string(ev.seq);
            else if (name == "content_type")
                out += view(ev.content_type, ev.content_type_len);
            else if (name == "payload")
                out += payload_text(ev);
            else if (name.substr(0, 7) == "header.") {
                std::string_view want = name.substr(7);
                for (size_t k = 0; ev.headers && k < ev.header_count; ++k)
                    if (view(ev.headers[k].key, ev.headers[k].key_len) == want) {
                        out += view(ev.headers[k].value, ev.headers[k].value_len);
                        break;
                    }
            } else
                out.append(tpl.substr(open, close + 2 - open));
            i = close + 2;
        }
        out.append(tpl.substr(i));
        return out;
    }

    std::string message(const evmesh_event& ev) const {
        std::string id(view(ev.id_text));
        std::string body = crlf(expand(body_, ev));
        bool qp = has_long_line(body);
        if (qp) body = quoted_printable(body);
        std::string to;
        for (const auto& a : to_) to += (to.empty() ? "" : ", ") + a;
        std::string m;
        m += "Date: " + rfc5322_now() + "\r\n";
        m += "From: " + from_ + "\r\n";
        m += "To: " + to + "\r\n";
        m += "Subject: " + encode_subject(strip_crlf(expand(subject_, ev))) + "\r\n";
        m += "Message-ID: <" + id + "@evmesh>\r\n";
        m += "MIME-Version: 1.0\r\n";
        m += "Content-Type: text/plain; charset=utf-8\r\n";
        m += std::string("Content-Transfer-Encoding: ") + (qp ? "quoted-printable" : "8bit") + "\r\n";
        m += "X-Evmesh-Event-Id: " + id + "\r\n";
        m += "X-Evmesh-Topic: " + strip_crlf(view(ev.topic, ev.topic_len)) + "\r\n";
        m += "\r\n";
        m += body;
        if (body.size() < 2 || body.compare(body.size() - 2, 2, "\r\n") != 0) m += "\r\n";
        return m;
    }

    evmesh_status deliver(const evmesh_event& ev, const evmesh_attempt&, evmesh_result& r) {
        upload up{message(ev), 0};
        slist_ptr rcpt;
        for (const auto& a : to_) append(rcpt, smtp_path(a));
        std::string from = smtp_path(from_);

        std::unique_ptr<CURL, decltype(&curl_easy_cleanup)> h(curl_easy_init(), &curl_easy_cleanup);
        if (!h) {
            set_detail(&r, "curl_easy_init failed");
            return EVMESH_RETRY;
        }
        CURL* c = h.get();
        char errbuf[CURL_ERROR_SIZE] = {};
        curl_easy_setopt(c, CURLOPT_URL, url_.c_str());
        curl_easy_setopt(c, CURLOPT_PROTOCOLS_STR, "smtp,smtps");
        curl_easy_setopt(c, CURLOPT_PROXY, "");
        curl_easy_setopt(c, CURLOPT_NOSIGNAL, 1L);
        curl_easy_setopt(c, CURLOPT_USE_SSL, static_cast<long>(use_ssl_));
        if (insecure_) {
            curl_easy_setopt(c, CURLOPT_SSL_VERIFYPEER, 0L);
            curl_easy_setopt(c, CURLOPT_SSL_VERIFYHOST, 0L);
        }
        if (username_) curl_easy_setopt(c, CURLOPT_USERNAME, username_->c_str());
        if (password_) curl_easy_setopt(c, CURLOPT_PASSWORD, password_->c_str());
        curl_easy_setopt(c, CURLOPT_MAIL_FROM, from.c_str());
        curl_easy_setopt(c, CURLOPT_MAIL_RCPT, rcpt.get());
        curl_easy_setopt(c, CURLOPT_UPLOAD, 1L);
        curl_easy_setopt(c, CURLOPT_READFUNCTION, &email::on_read);
        curl_easy_setopt(c, CURLOPT_READDATA, &up);
        curl_easy_setopt(c, CURLOPT_TIMEOUT_MS, static_cast<long>(timeout_ms_));
        curl_easy_setopt(c, CURLOPT_CONNECTTIMEOUT_MS, static_cast<long>(std::min<int64_t>(timeout_ms_, 10000)));
        curl_easy_setopt(c, CURLOPT_ERRORBUFFER, errbuf);
        curl_easy_setopt(c, CURLOPT_OPENSOCKETFUNCTION, &email::open_socket);

        CURLcode rc = curl_easy_perform(c);
        long code = 0;
        curl_easy_getinfo(c, CURLINFO_RESPONSE_CODE, &code);
        r.code = static_cast<int32_t>(code);
        if (rc == CURLE_OK) return EVMESH_DELIVERED;
        std::string text = printable(errbuf[0] ? errbuf : curl_easy_strerror(rc), 230);
        if (code >= 500 && code <= 599) {
            set_detail(&r, "SMTP %ld: %s", code, text.c_str());
            return EVMESH_FAIL;
        }
        if (code >= 400 && code <= 499) {
            set_detail(&r, "SMTP %ld: %s", code, text.c_str());
        } else {
            r.code = 0;  // connection, TLS or timeout error: the last reply (e.g. 250) is not the outcome
            set_detail(&r, "%s", text.c_str());
        }
        return EVMESH_RETRY;
    }

private:
    struct upload {
        std::string data;
        size_t pos;
    };

    static size_t on_read(char* buf, size_t size, size_t n, void* userp) noexcept {
        auto* up = static_cast<upload*>(userp);
        size_t len = std::min(size * n, up->data.size() - up->pos);
        std::memcpy(buf, up->data.data() + up->pos, len);
        up->pos += len;
        return len;
    }

    // Sockets with FD_CLOEXEC, so children spawned by other plugins do not inherit them.
    static curl_socket_t open_socket(void*, curlsocktype, struct curl_sockaddr* a) noexcept {
        int fd = ::socket(a->family, a->socktype | SOCK_CLOEXEC, a->protocol);
        return fd < 0 ? CURL_SOCKET_BAD : fd;
    }

    static void check_address(settings& s, const std::string& key, const std::string& a) {
        if (a.find_first_of("\r\n") != std::string::npos) s.fail(key, "must not contain CR or LF");
        if (a.find('@') == std::string::npos) s.fail(key, "must be an e-mail address (\"a@b\" or \"Name <a@b>\")");
    }

    host_logger log_;
    std::string url_;
    curl_usessl use_ssl_ = CURLUSESSL_TRY;
    std::optional<std::string> username_;
    std::optional<std::string> password_;
    bool insecure_ = false;
    std::string from_;
    std::vector<std::string> to_;
    std::string subject_;
    std::string body_;
    int64_t timeout_ms_ = 30000;
};

}  // namespace
}  // namespace evmesh::channels

extern "C" EVMESH_CHANNEL_EXPORT const evmesh_channel_plugin* evmesh_channel_plugin_v1(void) {
    return &evmesh::channels::plugin_glue<evmesh::channels::email>::table;
}
