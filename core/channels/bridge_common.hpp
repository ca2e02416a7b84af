// Header-only helpers shared by the outbound broker bridges (kafka, amqp, mqtt, nats, redis):
// destination templates ("orders/{topic}", "{data.customer.id}"), the CloudEvents attributes each
// bridge maps onto its protocol's headers or properties, the message body (binary or structured
// mode), and a small URL splitter. docs/BRIDGES.md describes what the user sees.
//
// Templates are parsed once at create (a bad template is a configuration error, so the node
// refuses to start) and expanded per delivery without allocating more than the result.
#pragma once

#include "common.hpp"

#include <cctype>
#include <chrono>
#include <condition_variable>
#include <cstdlib>
#include <functional>
#include <mutex>

namespace evmesh::channels::bridge {

// ---------------------------------------------------------------------------------------------
// Templates
//
//   {topic} {type}     the event topic ({type}: the CloudEvents name of the same thing)
//   {topic.N}          its N-th dot-separated segment, from 0 (empty when there is none)
//   {id} {source} {time} {seq} {content_type}
//   {subject}          the CloudEvents subject: the event header "subject" (empty when absent)
//   {header.NAME}      an event header (empty when absent)
//   {data.a.b.0}       a field of the JSON payload: object keys and array indexes separated by
//                      dots; strings as they are, numbers/booleans as JSON text, objects/arrays as
//                      compact JSON, missing/null (or a payload that is not JSON) as ""
//   {{ and }}          a literal { and }
// Anything else between braces, an unclosed "{" or a lone "}" is a bad template.

class template_error : public std::runtime_error {
public:
    using std::runtime_error::runtime_error;
};

// The event a delivery works on, with its JSON payload parsed at most once (and only when a
// template asks for a data field).
class event_fields {
public:
    explicit event_fields(const evmesh_event& ev) : ev_(ev) {}
    const evmesh_event& event() const noexcept { return ev_; }

    // The payload as JSON, or a discarded value when it is not JSON.
    const json& data() const {
        if (!parsed_) {
            const auto* p = static_cast<const char*>(ev_.payload);
            data_ = (p && ev_.payload_len) ? json::parse(p, p + ev_.payload_len, nullptr, false)
                                           : json(json::value_t::discarded);
            parsed_ = true;
        }
        return data_;
    }

private:
    const evmesh_event& ev_;
    mutable bool parsed_ = false;
    mutable json data_;
};

// How substituted values are written into the result: a destination name may not contain
// everything a value can (MQTT wildcards, NATS subject tokens); literal text is checked once.
using value_escaper = void (*)(std::string& out, std::string_view value);

inline void escape_none(std::string& out, std::string_view value) { out.append(value); }

class name_template {
public:
    name_template() = default;

    // Throws template_error with a one-line reason.
    explicit name_template(std::string_view text) : text_(text) {
        std::string literal;
        size_t i = 0;
        while (i < text.size()) {
            char c = text[i];
            if (c == '{' && i + 1 < text.size() && text[i + 1] == '{') {
                literal += '{';
                i += 2;
            } else if (c == '}' && i + 1 < text.size() && text[i + 1] == '}') {
                literal += '}';
                i += 2;
            } else if (c == '}') {
                throw template_error("has a lone '}' at offset " + std::to_string(i) + " (write }} for a literal brace)");
            } else if (c == '{') {
                size_t close = text.find('}', i + 1);
                size_t nested = text.find('{', i + 1);
                if (close == std::string_view::npos || (nested != std::string_view::npos && nested < close))
                    throw template_error("has an unclosed '{' at offset " + std::to_string(i) +
                                         " (write {{ for a literal brace)");
                if (!literal.empty()) parts_.push_back({part::literal, std::move(literal), {}, 0});
                literal.clear();
                parts_.push_back(parse_field(text.substr(i + 1, close - i - 1)));
                i = close + 1;
            } else {
                literal += c;
                ++i;
            }
        }
        if (!literal.empty()) parts_.push_back({part::literal, std::move(literal), {}, 0});
    }

    const std::string& text() const noexcept { return text_; }
    bool empty() const noexcept { return parts_.empty(); }
    bool constant() const noexcept {
        for (const auto& p : parts_)
            if (p.kind != part::literal) return false;
        return true;
    }

    // The template is one field and nothing else ("{data.endpoint}"): its value is the whole result.
    bool single_field() const noexcept { return parts_.size() == 1 && parts_[0].kind != part::literal; }

    // Literal text only (what a destination check looks at once at create).
    std::string literal_text() const {
        std::string out;
        for (const auto& p : parts_)
            if (p.kind == part::literal) out += p.text;
        return out;
    }

    // topic_sep: what '.' in the topic becomes ({topic}, {type}); MQTT maps it to '/'.
    std::string expand(const event_fields& f, value_escaper esc = escape_none, char topic_sep = '.') const {
        const evmesh_event& ev = f.event();
        std::string out;
        for (const auto& p : parts_) {
            switch (p.kind) {
            case part::literal:
                out += p.text;
                break;
            case part::topic: {
                std::string t(view(ev.topic, ev.topic_len));
                if (topic_sep != '.')
                    for (char& c : t)
                        if (c == '.') c = topic_sep;
                esc(out, t);
                break;
            }
            case part::segment:
                esc(out, segment(view(ev.topic, ev.topic_len), p.index));
                break;
            case part::id:
                esc(out, view(ev.id_text));
                break;
            case part::source:
                esc(out, view(ev.source, ev.source_len));
                break;
            case part::time:
                esc(out, rfc3339(ev.time_ns));
                break;
            case part::seq:
                esc(out, std::to_string(ev.seq));
                break;
            case part::content_type:
                esc(out, view(ev.content_type, ev.content_type_len));
                break;
            case part::header:
            case part::subject:
                for (size_t k = 0; ev.headers && k < ev.header_count; ++k)
                    if (view(ev.headers[k].key, ev.headers[k].key_len) == p.text) {
                        esc(out, view(ev.headers[k].value, ev.headers[k].value_len));
                        break;
                    }
                break;
            case part::data:
                esc(out, lookup(f.data(), p.path));
                break;
            }
        }
        return out;
    }

    // Whether expanding needs the JSON payload.
    bool uses_data() const noexcept {
        for (const auto& p : parts_)
            if (p.kind == part::data) return true;
        return false;
    }

private:
    struct part {
        enum kind_t { literal, topic, segment, id, source, time, seq, content_type, header, subject, data } kind;
        std::string text;               // literal text, or the header name
        std::vector<std::string> path;  // data.a.b
        size_t index;                   // topic.N
    };

    static part parse_field(std::string_view name) {
        if (name.empty()) throw template_error("has an empty field {}");
        if (name == "topic" || name == "type") return {part::topic, {}, {}, 0};
        if (name == "id") return {part::id, {}, {}, 0};
        if (name == "source") return {part::source, {}, {}, 0};
        if (name == "time") return {part::time, {}, {}, 0};
        if (name == "seq") return {part::seq, {}, {}, 0};
        if (name == "content_type") return {part::content_type, {}, {}, 0};
        if (name == "subject") return {part::subject, "subject", {}, 0};  // PROTOCOL.md: header "subject"
        if (name.substr(0, 6) == "topic.") {
            std::string_view n = name.substr(6);
            if (n.empty() || n.size() > 3 || n.find_first_not_of("0123456789") != std::string_view::npos)
                throw template_error("has a bad topic segment {" + std::string(name) + "} (want {topic.N}, N from 0)");
            return {part::segment, {}, {}, static_cast<size_t>(std::atoi(std::string(n).c_str()))};
        }
        if (name.substr(0, 7) == "header.") {
            if (name.size() == 7) throw template_error("has an empty header name {header.}");
            return {part::header, std::string(name.substr(7)), {}, 0};
        }
        if (name.substr(0, 5) == "data.") {
            part p{part::data, {}, {}, 0};
            std::string_view rest = name.substr(5);
            while (true) {
                size_t dot = rest.find('.');
                std::string_view key = rest.substr(0, dot);
                if (key.empty()) throw template_error("has an empty key in {" + std::string(name) + "}");
                p.path.emplace_back(key);
                if (dot == std::string_view::npos) break;
                rest = rest.substr(dot + 1);
            }
            return p;
        }
        throw template_error("has an unknown field {" + printable(name, 40) +
                             "} (known: topic, type, topic.N, id, source, time, seq, content_type, subject, "
                             "header.NAME, data.PATH)");
    }

    static std::string_view segment(std::string_view topic, size_t index) {
        for (size_t i = 0; i < index; ++i) {
            size_t dot = topic.find('.');
            if (dot == std::string_view::npos) return {};
            topic.remove_prefix(dot + 1);
        }
        return topic.substr(0, topic.find('.'));
    }

    static std::string lookup(const json& root, const std::vector<std::string>& path) {
        if (root.is_discarded()) return {};
        const json* cur = &root;
        for (const auto& key : path) {
            if (cur->is_object()) {
                auto it = cur->find(key);
                if (it == cur->end()) return {};
                cur = &*it;
            } else if (cur->is_array()) {
                if (key.empty() || key.size() > 9 || key.find_first_not_of("0123456789") != std::string::npos)
                    return {};
                size_t i = static_cast<size_t>(std::atol(key.c_str()));
                if (i >= cur->size()) return {};
                cur = &(*cur)[i];
            } else {
                return {};
            }
        }
        if (cur->is_null()) return {};
        if (cur->is_string()) return cur->get<std::string>();
        return dump_json(*cur);
    }

    std::string text_;
    std::vector<part> parts_;
};

// A template setting: absent → def; a bad template → "<plugin>: settings.<key> has ...".
inline name_template template_setting(settings& s, const std::string& key, const std::optional<std::string>& def,
                                      bool allow_empty = false) {
    auto text = s.optional_string(key, allow_empty);
    if (!text && !def) s.fail(key, "is required");
    try {
        return name_template(text ? *text : *def);
    } catch (const template_error& e) {
        s.fail(key, e.what());
    }
}

// ---------------------------------------------------------------------------------------------
// CloudEvents attributes and the message body

// The body a bridge sends: "binary" = the payload as it is (attributes in headers/properties),
// "structured" = the CloudEvents JSON (application/cloudevents+json).
enum class body_mode { binary, structured };

inline body_mode mode_setting(settings& s) {
    return s.choice_or("mode", "binary", {"binary", "structured"}) == "binary" ? body_mode::binary
                                                                                : body_mode::structured;
}

struct message_body {
    std::string bytes;
    std::string content_type;  // "" when the event has none (binary mode)
};

inline message_body make_body(const evmesh_event& ev, body_mode mode) {
    if (mode == body_mode::structured)
        return {dump_json(cloudevent_json(ev)), "application/cloudevents+json"};
    message_body b;
    if (ev.payload && ev.payload_len) b.bytes.assign(static_cast<const char*>(ev.payload), ev.payload_len);
    b.content_type = std::string(view(ev.content_type, ev.content_type_len));
    return b;
}

// The CloudEvents context attributes of an event as (name, value) text pairs, in this order:
// specversion, id, source, type, time, seq (when non-zero), then one per extension-eligible header
// (common.hpp ce_extension_header). datacontenttype is not included: every binding carries it in
// its own content-type field.
inline std::vector<std::pair<std::string, std::string>> ce_attributes(const evmesh_event& ev) {
    std::vector<std::pair<std::string, std::string>> out;
    out.emplace_back("specversion", "1.0");
    out.emplace_back("id", std::string(view(ev.id_text)));
    out.emplace_back("source", std::string(view(ev.source, ev.source_len)));
    out.emplace_back("type", std::string(view(ev.topic, ev.topic_len)));
    out.emplace_back("time", rfc3339(ev.time_ns));
    if (ev.seq != 0) out.emplace_back("seq", std::to_string(ev.seq));
    for (size_t i = 0; ev.headers && i < ev.header_count; ++i) {
        auto key = view(ev.headers[i].key, ev.headers[i].key_len);
        if (!ce_extension_header(key)) continue;
        bool dup = false;
        for (const auto& [k, v] : out) dup = dup || k == key;
        if (!dup) out.emplace_back(std::string(key), std::string(view(ev.headers[i].value, ev.headers[i].value_len)));
    }
    return out;
}

// ---------------------------------------------------------------------------------------------
// URLs: scheme://[user[:password]@]host[:port][/path]; enough for mqtt://, redis:// and checks.

struct url_parts {
    std::string scheme, user, password, host, path;
    int port = 0;
};

inline std::string percent_decode(std::string_view s) {
    std::string out;
    for (size_t i = 0; i < s.size(); ++i) {
        if (s[i] == '%' && i + 2 < s.size() && std::isxdigit(static_cast<unsigned char>(s[i + 1])) &&
            std::isxdigit(static_cast<unsigned char>(s[i + 2]))) {
            out += static_cast<char>(std::strtol(std::string(s.substr(i + 1, 2)).c_str(), nullptr, 16));
            i += 2;
        } else {
            out += s[i];
        }
    }
    return out;
}

// nullopt when the URL is not of that shape or its scheme is not one of `schemes`.
inline std::optional<url_parts> parse_url(std::string_view url, std::initializer_list<std::string_view> schemes,
                                          int default_port) {
    url_parts u;
    size_t colon = url.find("://");
    if (colon == std::string_view::npos) return std::nullopt;
    u.scheme = std::string(url.substr(0, colon));
    bool known = false;
    for (auto s : schemes) known = known || iequals(s, u.scheme);
    if (!known) return std::nullopt;
    std::string_view rest = url.substr(colon + 3);
    size_t slash = rest.find('/');
    std::string_view authority = rest.substr(0, slash);
    if (slash != std::string_view::npos) u.path = std::string(rest.substr(slash + 1));
    size_t at = authority.rfind('@');
    if (at != std::string_view::npos) {
        std::string_view userinfo = authority.substr(0, at);
        authority = authority.substr(at + 1);
        size_t c = userinfo.find(':');
        u.user = percent_decode(userinfo.substr(0, c));
        if (c != std::string_view::npos) u.password = percent_decode(userinfo.substr(c + 1));
    }
    std::string_view host = authority;
    std::string_view port;
    if (!authority.empty() && authority.front() == '[') {  // [v6]:port
        size_t end = authority.find(']');
        if (end == std::string_view::npos) return std::nullopt;
        host = authority.substr(1, end - 1);
        if (end + 1 < authority.size()) {
            if (authority[end + 1] != ':') return std::nullopt;
            port = authority.substr(end + 2);
        }
    } else if (size_t c = authority.rfind(':'); c != std::string_view::npos) {
        host = authority.substr(0, c);
        port = authority.substr(c + 1);
    }
    if (host.empty()) return std::nullopt;
    u.host = std::string(host);
    u.port = default_port;
    if (!port.empty()) {
        if (port.size() > 5 || port.find_first_not_of("0123456789") != std::string_view::npos) return std::nullopt;
        u.port = std::atoi(std::string(port).c_str());
        if (u.port < 1 || u.port > 65535) return std::nullopt;
    }
    return u;
}

// ---------------------------------------------------------------------------------------------
// A pool of per-worker connections (AMQP, Redis: one request in flight per connection). A lease
// takes an idle connection or makes a new one; giving it back keeps it unless it was marked bad.

template <class Conn>
class conn_pool {
public:
    explicit conn_pool(size_t max_idle = 64) : max_idle_(max_idle) {}

    class lease {
    public:
        explicit lease(conn_pool& p) : p_(p) {
            std::lock_guard lock(p_.mutex_);
            if (!p_.idle_.empty()) {
                c_ = std::move(p_.idle_.back());
                p_.idle_.pop_back();
            }
        }
        ~lease() {
            if (!c_ || bad_) return;
            std::lock_guard lock(p_.mutex_);
            if (p_.idle_.size() < p_.max_idle_) p_.idle_.push_back(std::move(c_));
        }
        lease(const lease&) = delete;
        lease& operator=(const lease&) = delete;

        std::unique_ptr<Conn>& conn() noexcept { return c_; }
        // The connection is broken (or its state unknown): close it instead of reusing it.
        void discard() noexcept {
            bad_ = true;
            c_.reset();
        }

    private:
        conn_pool& p_;
        std::unique_ptr<Conn> c_;
        bool bad_ = false;
    };

private:
    size_t max_idle_;
    std::mutex mutex_;
    std::vector<std::unique_ptr<Conn>> idle_;
};

// Milliseconds on the steady clock, for deadlines.
inline int64_t now_ms() {
    return std::chrono::duration_cast<std::chrono::milliseconds>(std::chrono::steady_clock::now().time_since_epoch())
        .count();
}

}  // namespace evmesh::channels::bridge
