#include "cloudevents_http.hpp"

#include <openssl/evp.h>
#include <openssl/sha.h>

#include <algorithm>
#include <cctype>
#include <cstdio>
#include <ctime>

#include <nlohmann/json.hpp>

namespace evmesh::app {

namespace {

bool parse_uuid(const std::string& s, event_id& out) {
    if (s.size() != 36 || s[8] != '-' || s[13] != '-' || s[18] != '-' || s[23] != '-') {
        return false;
    }
    std::size_t k = 0;
    for (std::size_t i = 0; i < s.size(); i += (s[i] == '-') ? 1 : 2) {
        if (s[i] == '-') {
            continue;
        }
        if (i + 1 >= s.size() || !std::isxdigit(static_cast<unsigned char>(s[i])) ||
            !std::isxdigit(static_cast<unsigned char>(s[i + 1])) || k >= out.size()) {
            return false;
        }
        out[k++] = static_cast<std::uint8_t>(std::stoi(s.substr(i, 2), nullptr, 16));
    }
    return k == out.size();
}

// RFC 3339: 2024-05-01T12:34:56[.fraction](Z|+hh:mm|-hh:mm) -> ns since the Unix epoch.
bool parse_time(const std::string& s, std::int64_t& ns) {
    int y = 0, mo = 0, d = 0, h = 0, mi = 0, sec = 0, used = 0;
    if (std::sscanf(s.c_str(), "%4d-%2d-%2d%*1[Tt ]%2d:%2d:%2d%n", &y, &mo, &d, &h, &mi, &sec, &used) != 6 ||
        used != 19) {
        return false;
    }
    std::size_t i = 19;
    std::int64_t frac = 0;
    if (i < s.size() && s[i] == '.') {
        int digits = 0;
        for (++i; i < s.size() && std::isdigit(static_cast<unsigned char>(s[i])) != 0; ++i) {
            if (digits < 9) {
                frac = frac * 10 + (s[i] - '0');
                ++digits;
            }
        }
        for (; digits < 9; ++digits) {
            frac *= 10;
        }
    }
    int offset_s = 0;
    if (i < s.size() && (s[i] == 'Z' || s[i] == 'z')) {
        ++i;
    } else if (i + 6 == s.size() && (s[i] == '+' || s[i] == '-') && s[i + 3] == ':' &&
               std::isdigit(static_cast<unsigned char>(s[i + 1])) != 0 &&
               std::isdigit(static_cast<unsigned char>(s[i + 2])) != 0 &&
               std::isdigit(static_cast<unsigned char>(s[i + 4])) != 0 &&
               std::isdigit(static_cast<unsigned char>(s[i + 5])) != 0) {
        const int oh = std::stoi(s.substr(i + 1, 2)), om = std::stoi(s.substr(i + 4, 2));
        offset_s = (s[i] == '+' ? 1 : -1) * (oh * 3600 + om * 60);
        i += 6;
    } else {
        return false;
    }
    if (i != s.size() || mo < 1 || mo > 12 || d < 1 || d > 31 || h > 23 || mi > 59 || sec > 60) {
        return false;
    }
    std::tm tm{};
    tm.tm_year = y - 1900;
    tm.tm_mon = mo - 1;
    tm.tm_mday = d;
    tm.tm_hour = h;
    tm.tm_min = mi;
    tm.tm_sec = sec;
    const auto t = static_cast<std::int64_t>(timegm(&tm)) - offset_s;
    ns = t * 1'000'000'000 + frac;
    return t > 0;
}

bool decode_base64(const std::string& in, std::string& out) {
    if (in.size() % 4 != 0) {
        return false;
    }
    out.assign(in.size() / 4 * 3, '\0');
    const int n = EVP_DecodeBlock(reinterpret_cast<unsigned char*>(out.data()),
                                  reinterpret_cast<const unsigned char*>(in.data()), static_cast<int>(in.size()));
    if (n < 0) {
        return false;
    }
    std::size_t len = static_cast<std::size_t>(n);
    for (std::size_t k = in.size(); k > 0 && in[k - 1] == '='; --k) {
        --len;  // EVP_DecodeBlock counts the padding as zero bytes
    }
    out.resize(len);
    return true;
}

// An extension attribute (PROTOCOL.md section 5): `seq` is the sequence, `headers` carries the
// headers that are not valid attribute names, anything else is a header of the same name.
bool extension(ce_event& ce, const std::string& name, const std::string& value) {
    if (name == "seq") {
        try {
            std::size_t used = 0;
            ce.ev.seq = std::stoull(value, &used);
            return used == value.size();
        } catch (const std::exception&) {
            return false;
        }
    }
    if (name == "headers") {
        const auto j = nlohmann::json::parse(value, nullptr, false);
        if (!j.is_object()) {
            return false;
        }
        for (const auto& [k, v] : j.items()) {
            ce.ev.headers.emplace_back(k, v.is_string() ? v.get<std::string>() : v.dump());
        }
        return true;
    }
    ce.ev.headers.emplace_back(name, value);
    return true;
}

bool fail(ce_error& err, int status, const char* code, std::string message, std::string field = {}) {
    err = {status, code, std::move(message), std::move(field)};
    return false;
}

// Required attributes, topic = type, id, time; the rest becomes headers (extension attributes).
bool finish(ce_event& ce, const std::string& specversion, const std::string& id, const std::string& source,
            const std::string& type, const std::string& time, ce_error& err) {
    if (specversion != "1.0") {
        return fail(err, 400, specversion.empty() ? "missing_attribute" : "unsupported_specversion",
                    specversion.empty() ? "specversion is required" : "only CloudEvents 1.0 is supported",
                    "specversion");
    }
    for (const auto* a : {&id, &source, &type}) {
        if (a->empty()) {
            const char* name = a == &id ? "id" : a == &source ? "source" : "type";
            return fail(err, 400, "missing_attribute", std::string(name) + " is required", name);
        }
    }
    ce.ev.topic = type;  // the CloudEvents type is the evmesh topic (PROTOCOL.md section 11)
    ce.ev.source = source;
    ce.ce_source = source;
    ce.ce_id = id;
    ce.ev.id = ce_event_id(source, id);
    if (event_id as_uuid{}; !parse_uuid(id, as_uuid)) {
        ce.ev.headers.emplace_back("ceid", id);  // the original id, which 16 bytes cannot hold
    }
    if (!time.empty() && !parse_time(time, ce.ev.time_ns)) {
        return fail(err, 400, "bad_attribute", "time must be an RFC 3339 timestamp", "time");
    }
    return true;
}

bool parse_structured(const nlohmann::json& j, ce_event& ce, ce_error& err) {
    if (!j.is_object()) {
        return fail(err, 400, "bad_event", "a CloudEvent must be a JSON object");
    }
    auto str = [&](const char* k) {
        auto it = j.find(k);
        return it != j.end() && it->is_string() ? it->get<std::string>() : std::string();
    };
    for (const auto& item : j.items()) {
        const std::string k = item.key();
        const auto& v = item.value();
        static const char* known[] = {"specversion", "id", "source", "type", "time", "datacontenttype", "data",
                                      "data_base64"};
        if (std::find_if(std::begin(known), std::end(known), [&](const char* n) { return k == n; }) !=
            std::end(known)) {
            continue;
        }
        if (!extension(ce, k, v.is_string() ? v.get<std::string>() : v.dump())) {
            return fail(err, 400, "bad_attribute", k + " is malformed", k);
        }
    }
    ce.ev.content_type = str("datacontenttype");
    if (auto it = j.find("data_base64"); it != j.end()) {
        if (!it->is_string() || !decode_base64(it->get<std::string>(), ce.ev.payload)) {
            return fail(err, 400, "bad_attribute", "data_base64 must be base64", "data_base64");
        }
        if (ce.ev.content_type.empty()) {
            ce.ev.content_type = "application/octet-stream";
        }
    } else if (auto d = j.find("data"); d != j.end()) {
        if (d->is_string()) {
            ce.ev.payload = d->get<std::string>();  // a string becomes its UTF-8 bytes
        } else {
            ce.ev.payload = d->dump();
            if (ce.ev.content_type.empty()) {
                ce.ev.content_type = "application/json";
            }
        }
    }
    return finish(ce, str("specversion"), str("id"), str("source"), str("type"), str("time"), err);
}

}  // namespace

event_id ce_event_id(const std::string& source, const std::string& id) {
    event_id out{};
    if (parse_uuid(id, out)) {
        return out;
    }
    const std::string key = source + '\0' + id;
    unsigned char digest[SHA256_DIGEST_LENGTH];
    SHA256(reinterpret_cast<const unsigned char*>(key.data()), key.size(), digest);
    std::copy(digest, digest + out.size(), out.begin());
    out[6] = static_cast<std::uint8_t>((out[6] & 0x0f) | 0x80);  // version 8 (custom)
    out[8] = static_cast<std::uint8_t>((out[8] & 0x3f) | 0x80);  // RFC 4122 variant
    return out;
}

bool parse_cloudevents(const std::map<std::string, std::string>& headers, const std::string& body,
                       std::vector<ce_event>& out, ce_error& err) {
    auto header = [&](const std::string& k) {
        auto it = headers.find(k);
        return it == headers.end() ? std::string() : it->second;
    };
    std::string content_type = header("content-type");
    const auto mime = content_type.substr(0, content_type.find(';'));
    if (mime == "application/cloudevents+json" || mime == "application/cloudevents-batch+json") {
        const auto j = nlohmann::json::parse(body, nullptr, false);
        if (j.is_discarded()) {
            return fail(err, 400, "bad_json", "the body is not JSON");
        }
        if (mime == "application/cloudevents-batch+json") {
            if (!j.is_array()) {
                return fail(err, 400, "bad_event", "a batch must be a JSON array of CloudEvents");
            }
            for (std::size_t i = 0; i < j.size(); ++i) {
                ce_event ce;
                if (!parse_structured(j[i], ce, err)) {
                    err.field = "[" + std::to_string(i) + "]" + (err.field.empty() ? "" : "." + err.field);
                    return false;
                }
                out.push_back(std::move(ce));
            }
            return true;
        }
        ce_event ce;
        if (!parse_structured(j, ce, err)) {
            return false;
        }
        out.push_back(std::move(ce));
        return true;
    }
    // binary mode: attributes in ce-* headers, the body is the data
    ce_event ce;
    for (const auto& [k, v] : headers) {
        if (k.rfind("ce-", 0) != 0) {
            continue;
        }
        const auto name = k.substr(3);
        if (name != "specversion" && name != "id" && name != "source" && name != "type" && name != "time" &&
            !extension(ce, name, v)) {
            return fail(err, 400, "bad_attribute", name + " is malformed", k);
        }
    }
    ce.ev.content_type = content_type.empty() ? "application/octet-stream" : content_type;
    ce.ev.payload = body;
    if (!finish(ce, header("ce-specversion"), header("ce-id"), header("ce-source"), header("ce-type"),
                header("ce-time"), err)) {
        if (!err.field.empty()) {
            err.field = "ce-" + err.field;
        }
        return false;
    }
    out.push_back(std::move(ce));
    return true;
}

}  // namespace evmesh::app
