// Header-only helpers shared by the built-in channel plugins (webhook, email, file, exec).
// Each plugin is its own shared library built with -fvisibility=hidden, so everything here is
// private to the plugin that includes it. Nothing in this header may let an exception cross the
// C ABI: plugin_glue<> wraps create/deliver/destroy in try/catch.
#pragma once

#include <evmesh/channel.h>

#include "codec/utf8.hpp"  // header-only; plugins link no evmesh code

#include <nlohmann/json.hpp>
#include <sodium.h>

#include <cstdarg>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <ctime>
#include <limits>
#include <new>
#include <optional>
#include <set>
#include <stdexcept>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

namespace evmesh::channels {

using json = nlohmann::json;
using ordered_json = nlohmann::ordered_json;

// A configuration error; its message is the one-line error create reports.
struct config_error : std::runtime_error {
    using std::runtime_error::runtime_error;
};

// ---------------------------------------------------------------------------------------------
// Small string helpers

// (pointer, length) from the ABI, tolerating a null pointer with length 0.
inline std::string_view view(const char* p, size_t n) noexcept {
    return p ? std::string_view(p, n) : std::string_view();
}
inline std::string_view view(const char* p) noexcept { return p ? std::string_view(p) : std::string_view(); }

inline void copy_error(char* err, size_t err_len, const char* msg) noexcept {
    if (err && err_len > 0) std::snprintf(err, err_len, "%s", msg ? msg : "");
}

// Writes a printf-formatted, truncated, NUL-terminated detail into the result.
__attribute__((format(printf, 2, 3))) inline void set_detail(evmesh_result* r, const char* fmt, ...) noexcept {
    if (!r) return;
    va_list ap;
    va_start(ap, fmt);
    std::vsnprintf(r->detail, sizeof r->detail, fmt, ap);
    va_end(ap);
}

// At most max bytes of s with CR/LF/TAB mapped to spaces and other non-printable bytes
// (including non-ASCII) to '?', for log details.
inline std::string printable(std::string_view s, size_t max) {
    std::string out;
    out.reserve(s.size() < max ? s.size() : max);
    for (char c : s.substr(0, max)) {
        auto u = static_cast<unsigned char>(c);
        if (c == '\r' || c == '\n' || c == '\t')
            out += ' ';
        else if (u < 0x20 || u >= 0x7f)
            out += '?';
        else
            out += c;
    }
    return out;
}

inline char ascii_lower(char c) noexcept { return (c >= 'A' && c <= 'Z') ? static_cast<char>(c - 'A' + 'a') : c; }

inline bool iequals(std::string_view a, std::string_view b) noexcept {
    if (a.size() != b.size()) return false;
    for (size_t i = 0; i < a.size(); ++i)
        if (ascii_lower(a[i]) != ascii_lower(b[i])) return false;
    return true;
}

inline bool starts_with_icase(std::string_view s, std::string_view prefix) noexcept {
    return s.size() >= prefix.size() && iequals(s.substr(0, prefix.size()), prefix);
}

inline std::string_view trim(std::string_view s) noexcept {
    while (!s.empty() && (s.front() == ' ' || s.front() == '\t' || s.front() == '\r' || s.front() == '\n'))
        s.remove_prefix(1);
    while (!s.empty() && (s.back() == ' ' || s.back() == '\t' || s.back() == '\r' || s.back() == '\n'))
        s.remove_suffix(1);
    return s;
}

// Strict UTF-8 validation (RFC 3629), the core codec's header-only validator.
inline bool valid_utf8(const void* data, size_t len) noexcept {
    return codec::valid_utf8(std::string_view(static_cast<const char*>(data), len));
}

// Valid UTF-8 without control characters other than TAB, CR and LF (and no NUL).
inline bool printable_utf8(const void* data, size_t len) noexcept {
    const auto* s = static_cast<const unsigned char*>(data);
    for (size_t i = 0; i < len; ++i) {
        unsigned char c = s[i];
        if ((c < 0x20 && c != '\t' && c != '\r' && c != '\n') || c == 0x7f) return false;
    }
    return valid_utf8(data, len);
}

// Standard base64 (RFC 4648 alphabet, padded) via libsodium.
inline std::string base64(const void* data, size_t len) {
    std::string out(sodium_base64_ENCODED_LEN(len, sodium_base64_VARIANT_ORIGINAL), '\0');
    sodium_bin2base64(out.data(), out.size(), static_cast<const unsigned char*>(data), len,
                      sodium_base64_VARIANT_ORIGINAL);
    out.resize(std::strlen(out.c_str()));
    return out;
}

// RFC 3339 UTC time with microseconds: 2024-05-01T12:34:56.123456Z
inline std::string rfc3339(int64_t time_ns) {
    int64_t sec = time_ns / 1000000000;
    int64_t rem = time_ns % 1000000000;
    if (rem < 0) {
        rem += 1000000000;
        sec -= 1;
    }
    auto t = static_cast<time_t>(sec);
    struct tm tm {};
    if (!gmtime_r(&t, &tm)) return "1970-01-01T00:00:00.000000Z";
    char buf[64];
    std::snprintf(buf, sizeof buf, "%04d-%02d-%02dT%02d:%02d:%02d.%06dZ", tm.tm_year + 1900, tm.tm_mon + 1,
                  tm.tm_mday, tm.tm_hour, tm.tm_min, tm.tm_sec, static_cast<int>(rem / 1000));
    return buf;
}

// The media type of a Content-Type value: lower-case, parameters and blanks removed.
inline std::string media_type(std::string_view content_type) {
    auto semi = content_type.find(';');
    std::string_view mt = trim(content_type.substr(0, semi));
    std::string out;
    out.reserve(mt.size());
    for (char c : mt) out += ascii_lower(c);
    return out;
}

// ---------------------------------------------------------------------------------------------
// Host and logging

struct host_logger {
    evmesh_log_fn fn = nullptr;
    void* ctx = nullptr;
    std::string instance;

    explicit host_logger(const evmesh_host& h)
        : fn(h.log), ctx(h.log_ctx), instance(h.instance_name ? h.instance_name : "") {}

    __attribute__((format(printf, 3, 4))) void log(int level, const char* fmt, ...) const noexcept {
        if (!fn) return;
        char buf[512];
        va_list ap;
        va_start(ap, fmt);
        std::vsnprintf(buf, sizeof buf, fmt, ap);
        va_end(ap);
        fn(ctx, level, buf);
    }
};

// ---------------------------------------------------------------------------------------------
// Settings: the instance's [channel.settings] table as a JSON object. Every accessor marks its key
// as known; finish() rejects keys no accessor asked for. Errors read
// "<plugin>: settings.<key> <problem>".

class settings {
public:
    settings(std::string plugin, const char* text) : plugin_(std::move(plugin)) {
        if (!text || !*text) {
            obj_ = json::object();
            return;
        }
        obj_ = json::parse(text, nullptr, false);
        if (obj_.is_discarded()) throw config_error(plugin_ + ": settings are not valid JSON");
        if (!obj_.is_object()) throw config_error(plugin_ + ": settings must be a JSON object");
    }

    const std::string& plugin() const noexcept { return plugin_; }

    [[noreturn]] void fail(const std::string& key, const std::string& problem) const {
        throw config_error(plugin_ + ": settings." + key + " " + problem);
    }

    // The value of key or nullptr; marks key as known.
    const json* find(const std::string& key) {
        known_.insert(key);
        auto it = obj_.find(key);
        return it == obj_.end() ? nullptr : &*it;
    }

    bool has(const std::string& key) { return find(key) != nullptr; }

    std::optional<std::string> optional_string(const std::string& key, bool allow_empty = false) {
        const json* v = find(key);
        if (!v) return std::nullopt;
        if (!v->is_string()) fail(key, "must be a string");
        auto s = v->get<std::string>();
        if (!allow_empty && s.empty()) fail(key, "must not be empty");
        return s;
    }

    std::string required_string(const std::string& key) {
        auto s = optional_string(key);
        if (!s) fail(key, "is required");
        return *s;
    }

    std::string string_or(const std::string& key, const std::string& def, bool allow_empty = false) {
        auto s = optional_string(key, allow_empty);
        return s ? *s : def;
    }

    // One of the given choices.
    std::string choice_or(const std::string& key, const std::string& def, const std::vector<std::string>& choices) {
        auto s = optional_string(key);
        if (!s) return def;
        for (const auto& c : choices)
            if (*s == c) return *s;
        std::string list;
        for (const auto& c : choices) list += (list.empty() ? "\"" : ", \"") + c + "\"";
        fail(key, "must be one of " + list);
    }

    bool boolean_or(const std::string& key, bool def) {
        const json* v = find(key);
        if (!v) return def;
        if (!v->is_boolean()) fail(key, "must be a boolean");
        return v->get<bool>();
    }

    int64_t integer_or(const std::string& key, int64_t def, int64_t min, int64_t max) {
        const json* v = find(key);
        if (!v) return def;
        return to_integer(key, *v, min, max);
    }

    // A duration in integer milliseconds; only for keys ending in "_ms".
    int64_t duration_ms_or(const std::string& key, int64_t def, int64_t min = 1,
                           int64_t max = int64_t{24} * 3600 * 1000) {
        if (key.size() < 3 || key.compare(key.size() - 3, 3, "_ms") != 0)
            throw std::logic_error("duration key must end in _ms: " + key);
        const json* v = find(key);
        if (!v) return def;
        if (!v->is_number_integer()) fail(key, "must be an integer number of milliseconds");
        return to_integer(key, *v, min, max);
    }

    // An array of strings; nullopt when absent.
    std::optional<std::vector<std::string>> string_array(const std::string& key, bool allow_empty_array = false) {
        const json* v = find(key);
        if (!v) return std::nullopt;
        if (!v->is_array()) fail(key, "must be an array of strings");
        if (v->empty() && !allow_empty_array) fail(key, "must not be empty");
        std::vector<std::string> out;
        for (const auto& e : *v) {
            if (!e.is_string()) fail(key, "must be an array of strings");
            out.push_back(e.get<std::string>());
        }
        return out;
    }

    std::vector<int64_t> integer_array_or(const std::string& key, std::vector<int64_t> def, int64_t min,
                                          int64_t max) {
        const json* v = find(key);
        if (!v) return def;
        if (!v->is_array()) fail(key, "must be an array of integers");
        std::vector<int64_t> out;
        for (const auto& e : *v) out.push_back(to_integer(key, e, min, max));
        return out;
    }

    // An object whose values are all strings (e.g. extra headers); empty when absent.
    std::vector<std::pair<std::string, std::string>> string_table(const std::string& key) {
        const json* v = find(key);
        std::vector<std::pair<std::string, std::string>> out;
        if (!v) return out;
        if (!v->is_object()) fail(key, "must be a table of strings");
        for (auto it = v->begin(); it != v->end(); ++it) {
            if (!it.value().is_string()) fail(key + "." + it.key(), "must be a string");
            out.emplace_back(it.key(), it.value().get<std::string>());
        }
        return out;
    }

    // Rejects keys that no accessor asked for.
    void finish() const {
        for (auto it = obj_.begin(); it != obj_.end(); ++it) {
            if (known_.count(it.key())) continue;
            std::string list;
            for (const auto& k : known_) list += (list.empty() ? "" : ", ") + k;
            throw config_error(plugin_ + ": unknown setting settings." + it.key() + " (known: " + list + ")");
        }
    }

private:
    int64_t to_integer(const std::string& key, const json& v, int64_t min, int64_t max) const {
        if (!v.is_number_integer()) fail(key, "must be an integer");
        bool ok;
        int64_t n = 0;
        if (v.is_number_unsigned()) {
            auto u = v.get<uint64_t>();
            ok = u <= static_cast<uint64_t>(std::numeric_limits<int64_t>::max());
            if (ok) n = static_cast<int64_t>(u);
        } else {
            n = v.get<int64_t>();
            ok = true;
        }
        if (!ok || n < min || n > max)
            fail(key, "must be between " + std::to_string(min) + " and " + std::to_string(max));
        return n;
    }

    std::string plugin_;
    json obj_;
    std::set<std::string> known_;
};

// ---------------------------------------------------------------------------------------------
// CloudEvents 1.0

// Context attribute names that event headers may not shadow.
inline bool ce_reserved(std::string_view name) noexcept {
    static constexpr std::string_view reserved[] = {"specversion", "id",      "source",      "type",
                                                    "time",        "subject", "dataschema",  "datacontenttype",
                                                    "data",        "seq",     "data_base64"};
    for (auto r : reserved)
        if (name == r) return true;
    return false;
}

// A valid CloudEvents attribute name: [a-z0-9]{1,20}.
inline bool ce_valid_name(std::string_view name) noexcept {
    if (name.empty() || name.size() > 20) return false;
    for (char c : name)
        if (!((c >= 'a' && c <= 'z') || (c >= '0' && c <= '9'))) return false;
    return true;
}

// Headers that may become CloudEvents extension attributes (valid name, not reserved).
inline bool ce_extension_header(std::string_view key) noexcept { return ce_valid_name(key) && !ce_reserved(key); }

inline bool json_media_type(const std::string& mt) {
    return mt == "application/json" || (mt.size() > 5 && mt.compare(mt.size() - 5, 5, "+json") == 0);
}

// Structured-mode CloudEvent of an evmesh event:
//   specversion "1.0", id, source, type (= topic), time (RFC 3339 UTC, µs), datacontenttype (when
//   set), seq (number, when non-zero), one string extension per header whose key is a valid
//   attribute name ([a-z0-9]{1,20}) and not a context attribute; other headers are dropped.
//   data: the parsed JSON for application/json and */*+json payloads that parse; a string for
//   printable UTF-8 payloads with a text/* or empty content type; otherwise data_base64.
//   An empty payload has no data member.
inline ordered_json cloudevent_json(const evmesh_event& ev) {
    ordered_json j = ordered_json::object();
    j["specversion"] = "1.0";
    j["id"] = std::string(view(ev.id_text));
    j["source"] = std::string(view(ev.source, ev.source_len));
    j["type"] = std::string(view(ev.topic, ev.topic_len));
    j["time"] = rfc3339(ev.time_ns);
    auto ct = view(ev.content_type, ev.content_type_len);
    if (!ct.empty()) j["datacontenttype"] = std::string(ct);
    if (ev.seq != 0) j["seq"] = ev.seq;
    for (size_t i = 0; ev.headers && i < ev.header_count; ++i) {
        const evmesh_header& h = ev.headers[i];
        auto key = view(h.key, h.key_len);
        if (!ce_extension_header(key)) continue;
        std::string k(key);
        if (!j.contains(k)) j[k] = std::string(view(h.value, h.value_len));
    }
    if (ev.payload_len == 0 || !ev.payload) return j;
    const auto* p = static_cast<const char*>(ev.payload);
    std::string mt = media_type(ct);
    if (json_media_type(mt)) {
        auto parsed = ordered_json::parse(p, p + ev.payload_len, nullptr, false);
        if (!parsed.is_discarded()) {
            j["data"] = std::move(parsed);
            return j;
        }
    }
    if ((mt.rfind("text/", 0) == 0 && valid_utf8(p, ev.payload_len)) ||
        (mt.empty() && printable_utf8(p, ev.payload_len))) {
        j["data"] = std::string(p, ev.payload_len);
        return j;
    }
    j["data_base64"] = base64(p, ev.payload_len);
    return j;
}

// Compact JSON text; invalid UTF-8 in strings (topic, source, headers) becomes U+FFFD.
template <class J>
inline std::string dump_json(const J& j) {
    return j.dump(-1, ' ', false, nlohmann::json::error_handler_t::replace);
}

// The payload as text when it is printable UTF-8 (no control characters but TAB, CR, LF), else
// standard base64.
inline std::string payload_text(const evmesh_event& ev) {
    if (!ev.payload || ev.payload_len == 0) return {};
    const auto* p = static_cast<const char*>(ev.payload);
    if (printable_utf8(p, ev.payload_len)) return std::string(p, ev.payload_len);
    return base64(p, ev.payload_len);
}

// ---------------------------------------------------------------------------------------------
// ABI glue: Impl has `static constexpr const char* plugin_name` and `description`, a constructor
// Impl(const evmesh_host&) that throws config_error, and
// `evmesh_status deliver(const evmesh_event&, const evmesh_attempt&, evmesh_result&)`.

template <class Impl>
struct plugin_glue {
    static evmesh_channel* create(const evmesh_host* host, char* err, size_t err_len) noexcept {
        try {
            if (!host || host->struct_size < sizeof(evmesh_host)) {
                copy_error(err, err_len, (std::string(Impl::plugin_name) + ": host struct too small").c_str());
                return nullptr;
            }
            if (host->abi_version != EVMESH_CHANNEL_ABI_VERSION) {
                copy_error(err, err_len, (std::string(Impl::plugin_name) + ": unsupported ABI version " +
                                          std::to_string(host->abi_version))
                                             .c_str());
                return nullptr;
            }
            return reinterpret_cast<evmesh_channel*>(new Impl(*host));
        } catch (const std::bad_alloc&) {
            copy_error(err, err_len, (std::string(Impl::plugin_name) + ": out of memory").c_str());
        } catch (const config_error& e) {
            copy_error(err, err_len, e.what());
        } catch (const std::exception& e) {
            char buf[256];
            std::snprintf(buf, sizeof buf, "%s: %s", Impl::plugin_name, e.what());
            copy_error(err, err_len, buf);
        } catch (...) {
            copy_error(err, err_len, (std::string(Impl::plugin_name) + ": unknown error").c_str());
        }
        return nullptr;
    }

    static evmesh_status deliver(evmesh_channel* channel, const evmesh_event* event,
                                 const evmesh_attempt* attempt, evmesh_result* result) noexcept {
        evmesh_result scratch{0, -1, {}};
        if (!result) result = &scratch;
        try {
            if (!channel || !event) {
                set_detail(result, "%s: deliver called without channel or event", Impl::plugin_name);
                return EVMESH_FAIL;
            }
            if (event->struct_size < sizeof(evmesh_event)) {
                set_detail(result, "%s: event struct too small (%u bytes)", Impl::plugin_name,
                           static_cast<unsigned>(event->struct_size));
                return EVMESH_FAIL;
            }
            evmesh_attempt a{sizeof(evmesh_attempt), 1, 1, 0};
            if (attempt && attempt->struct_size >= sizeof(evmesh_attempt)) a = *attempt;
            return reinterpret_cast<Impl*>(channel)->deliver(*event, a, *result);
        } catch (const std::bad_alloc&) {
            set_detail(result, "%s: out of memory", Impl::plugin_name);
        } catch (const std::exception& e) {
            set_detail(result, "%s: internal error: %s", Impl::plugin_name, e.what());
        } catch (...) {
            set_detail(result, "%s: internal error", Impl::plugin_name);
        }
        return EVMESH_RETRY;
    }

    static void destroy(evmesh_channel* channel) noexcept {
        try {
            delete reinterpret_cast<Impl*>(channel);
        } catch (...) {
        }
    }

    // What the plugin's evmesh_channel_plugin_v1() returns.
    static constexpr evmesh_channel_plugin table = {
        EVMESH_CHANNEL_ABI_VERSION, sizeof(evmesh_channel_plugin), Impl::plugin_name, Impl::description,
        &create, &deliver, &destroy,
    };
};

}  // namespace evmesh::channels
