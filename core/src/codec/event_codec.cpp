#include <array>
#include <cstring>

#include <msgpack.hpp>

#include <evmesh/codec.hpp>

#include "codec/envelope.hpp"
#include "codec/msgpack_reader.hpp"
#include "codec/msgpack_writer.hpp"
#include "codec/utf8.hpp"

namespace evmesh {
namespace codec {

// Packer target writing into memory sized in advance (no capacity check per token).
struct raw_writer {
    char* p;

    void write(const char* data, std::size_t n) {
        if (n != 0) {  // an empty payload may come with a null pointer: memcpy must not see it
            std::memcpy(p, data, n);
            p += n;
        }
    }
};

constexpr std::uint32_t envelope_elements = 8;
// Nesting depth of each element [8..], counted as msgpack_reader::skip counts it: arrays and
// maps on the longest path down into the element, itself included (the envelope is not).
constexpr int max_skip_depth = 16;

}  // namespace codec

namespace {
using codec::envelope_elements;
using codec::max_skip_depth;
using codec::pack_str;
using codec::raw_writer;
using codec::string_writer;

result<event_view> decode(std::string_view topic_frame,
                          std::string_view body,
                          missing_fields* missing,
                          const decode_limits& limits) {
    using codec::msgpack_reader;
    if (body.size() > limits.max_event_bytes) {
        return fail(errc::too_large);
    }
    if (!valid_topic(topic_frame, limits.max_topic_bytes)) {
        return fail(errc::bad_topic);
    }
    event_view v;
    v.topic = topic_frame;
    msgpack_reader r(body);
    std::uint32_t n = 0;
    if (auto e = r.read_array_header(n); e != errc::ok) {
        return fail(e == errc::wrong_type ? errc::not_an_event : e);
    }
    if (n < envelope_elements) {
        return fail(errc::not_an_event);
    }
    // [0] version: any integer that is not 1, negative or beyond int64 included, is a version
    // this build does not speak; only a non-integer makes the body not an event
    std::int64_t version = 0;
    if (auto e = r.read_int(version); e != errc::ok) {
        if (e == errc::too_large) {  // a uint64 beyond int64 is an integer all the same
            return fail(errc::unsupported_version);
        }
        return fail(e == errc::wrong_type ? errc::not_an_event : e);
    }
    if (version != wire_version) {
        return fail(errc::unsupported_version);
    }
    // nil in id/source/time/seq: completed by the node (lenient) or refused (strict)
    bool strict_nil = false;
    auto nil_allowed = [&](bool& flag) {
        if (!r.next_is_nil()) {
            return false;
        }
        if (missing == nullptr) {
            strict_nil = true;
            return false;
        }
        flag = true;
        (void)r.read_nil();
        return true;
    };
    missing_fields dummy;
    missing_fields& m = missing != nullptr ? *missing : dummy;

    // [1] id: bin 16
    if (!nil_allowed(m.id)) {
        if (strict_nil) {
            return fail(errc::missing_field);
        }
        std::string_view id;
        if (auto e = r.read_bin(id, 16); e != errc::ok) {
            return fail(e == errc::too_large ? errc::bad_id : e);
        }
        if (id.size() != 16) {
            return fail(errc::bad_id);
        }
        std::memcpy(v.id.data(), id.data(), 16);
    }
    // [2] source: str
    if (!nil_allowed(m.source)) {
        if (strict_nil) {
            return fail(errc::missing_field);
        }
        if (auto e = r.read_str(v.source, limits.max_string_bytes); e != errc::ok) {
            return fail(e);
        }
        if (!codec::valid_utf8(v.source)) {
            return fail(errc::wrong_type);
        }
    }
    // [3] time: int
    if (!nil_allowed(m.time)) {
        if (strict_nil) {
            return fail(errc::missing_field);
        }
        if (auto e = r.read_int(v.time_ns); e != errc::ok) {
            return fail(e);
        }
    }
    // [4] seq: uint
    if (!nil_allowed(m.seq)) {
        if (strict_nil) {
            return fail(errc::missing_field);
        }
        if (auto e = r.read_uint(v.seq); e != errc::ok) {
            return fail(e);
        }
    }
    // [5] content type: str or nil (nil = application/octet-stream)
    if (r.next_is_nil()) {
        (void)r.read_nil();
    } else {
        if (auto e = r.read_str(v.content_type, limits.max_string_bytes); e != errc::ok) {
            return fail(e);
        }
        if (!codec::valid_utf8(v.content_type)) {
            return fail(errc::wrong_type);
        }
    }
    // [6] headers: map str -> str, or nil
    if (r.next_is_nil()) {
        (void)r.read_nil();
    } else {
        const char* start = r.position();
        std::uint32_t count = 0;
        if (auto e = r.read_map_header(count); e != errc::ok) {
            return fail(e);
        }
        if (count > limits.max_headers) {
            return fail(errc::too_large);
        }
        const char* first = r.position();
        for (std::uint32_t i = 0; i < 2 * count; ++i) {
            std::string_view s;
            if (auto e = r.read_str(s, limits.max_string_bytes); e != errc::ok) {
                return fail(e);
            }
            if (!codec::valid_utf8(s)) {
                return fail(errc::wrong_type);
            }
        }
        (void)start;
        v.headers_raw = std::string_view(first, static_cast<std::size_t>(r.position() - first));
        v.header_count = count;
    }
    // [7] payload: bin (str accepted for clients whose msgpack library writes str), or nil
    if (r.next_is_nil()) {
        (void)r.read_nil();
    } else if (auto e = r.read_bin(v.payload, limits.max_event_bytes); e == errc::wrong_type) {
        if (auto e2 = r.read_str(v.payload, limits.max_event_bytes); e2 != errc::ok) {
            return fail(e2);
        }
    } else if (e != errc::ok) {
        return fail(e);
    }
    // [8..] elements of later minor revisions: skipped
    for (std::uint32_t i = envelope_elements; i < n; ++i) {
        if (auto e = r.skip(max_skip_depth); e != errc::ok) {
            return fail(e);
        }
    }
    if (!r.at_end()) {
        return fail(errc::trailing_bytes);
    }
    return v;
}

}  // namespace

void encode_event_body(const event_id& id,
                       std::string_view source,
                       std::int64_t time_ns,
                       std::uint64_t seq,
                       std::string_view content_type,
                       const std::vector<header>& headers,
                       std::string_view payload,
                       std::string& out) {
    // upper bound: every str/bin/map header at most 5 bytes, every integer at most 9
    std::size_t bound = 1 + 1 + 2 + 16 + 5 + source.size() + 9 + 9 + 5 + content_type.size() + 5
                        + 5 + payload.size();
    for (const auto& [k, v] : headers) {
        bound += 10 + k.size() + v.size();
    }
    const std::size_t start = out.size();
    out.resize(start + bound);  // a reused buffer only grows: no allocation once warm
    raw_writer w{out.data() + start};
    msgpack::packer<raw_writer> pk(w);
    pk.pack_array(envelope_elements);
    pk.pack_uint8(wire_version);
    pk.pack_bin(16);
    pk.pack_bin_body(reinterpret_cast<const char*>(id.data()), 16);
    pk.pack_str(static_cast<std::uint32_t>(source.size()));
    pk.pack_str_body(source.data(), static_cast<std::uint32_t>(source.size()));
    pk.pack_int64(time_ns);
    pk.pack_uint64(seq);
    pk.pack_str(static_cast<std::uint32_t>(content_type.size()));
    pk.pack_str_body(content_type.data(), static_cast<std::uint32_t>(content_type.size()));
    pk.pack_map(static_cast<std::uint32_t>(headers.size()));
    for (const auto& [k, val] : headers) {
        pk.pack_str(static_cast<std::uint32_t>(k.size()));
        pk.pack_str_body(k.data(), static_cast<std::uint32_t>(k.size()));
        pk.pack_str(static_cast<std::uint32_t>(val.size()));
        pk.pack_str_body(val.data(), static_cast<std::uint32_t>(val.size()));
    }
    pk.pack_bin(static_cast<std::uint32_t>(payload.size()));
    pk.pack_bin_body(payload.data(), static_cast<std::uint32_t>(payload.size()));
    out.resize(static_cast<std::size_t>(w.p - out.data()));
}

void encode_event_body(const event& ev, std::string& out) {
    encode_event_body(
        ev.id, ev.source, ev.time_ns, ev.seq, ev.content_type, ev.headers, ev.payload, out);
}

result<event_view> decode_event(std::string_view topic_frame,
                                std::string_view body,
                                const decode_limits& limits) {
    return decode(topic_frame, body, nullptr, limits);
}

result<event_view> decode_event_lenient(std::string_view topic_frame,
                                        std::string_view body,
                                        missing_fields& missing,
                                        const decode_limits& limits) {
    missing = {};
    return decode(topic_frame, body, &missing, limits);
}

namespace {
// Bytes a topic segment may hold: printable ASCII except space, '*', '>' and '.'; bytes >= 0x80
// are allowed here and checked as UTF-8 afterwards.
constexpr auto topic_byte_table = [] {
    std::array<std::uint8_t, 256> t{};
    for (int c = 0; c < 256; ++c) {
        t[static_cast<std::size_t>(c)] = (c > 0x20 && c != 0x7f && c != '*' && c != '>' && c != '.') ? 1 : 0;
    }
    return t;
}();
}  // namespace

bool valid_topic(std::string_view topic, std::size_t max_bytes) noexcept {
    if (topic.empty() || topic.size() > max_bytes) {
        return false;
    }
    bool segment_empty = true;
    std::uint8_t high = 0;
    for (char ch : topic) {
        const auto c = static_cast<std::uint8_t>(ch);
        high |= c;
        if (topic_byte_table[c] != 0) {
            segment_empty = false;
        } else if (c == '.' && !segment_empty) {
            segment_empty = true;
        } else {
            return false;
        }
    }
    return !segment_empty && ((high & 0x80) == 0 || codec::valid_utf8(topic));
}

}  // namespace evmesh

namespace evmesh::codec {

namespace {
// The envelope's head up to time, with a reader left at seq.
bool peek_head(msgpack_reader& r, std::string_view& source, std::int64_t& time_ns) noexcept {
    std::uint32_t n = 0;
    std::uint64_t version = 0;
    std::string_view id;
    return r.read_array_header(n) == errc::ok && n >= envelope_elements
           && r.read_uint(version) == errc::ok && version == wire_version
           && r.read_bin(id, 16) == errc::ok && r.read_str(source, 1024) == errc::ok
           && r.read_int(time_ns) == errc::ok;
}
}  // namespace

bool peek_source_time(std::string_view body, std::string_view& source, std::int64_t& time_ns) noexcept {
    msgpack_reader r(body);
    return peek_head(r, source, time_ns);
}

bool peek_stream(std::string_view body, std::string_view& source, std::int64_t& time_ns,
                 std::uint64_t& seq) noexcept {
    msgpack_reader r(body);
    return peek_head(r, source, time_ns) && r.read_uint(seq) == errc::ok;
}

void encode_completed(const event_view& v, std::string& out) {
    string_writer w{out};
    msgpack::packer<string_writer> pk(w);
    pk.pack_array(envelope_elements);
    pk.pack_uint8(wire_version);
    pk.pack_bin(16);
    pk.pack_bin_body(reinterpret_cast<const char*>(v.id.data()), 16);
    pack_str(pk, v.source);
    pk.pack_int64(v.time_ns);
    pk.pack_uint64(v.seq);
    pack_str(pk, v.content_type.empty() ? std::string_view("application/octet-stream")
                                        : v.content_type);
    pk.pack_map(v.header_count);
    out.append(v.headers_raw);
    pk.pack_bin(static_cast<std::uint32_t>(v.payload.size()));
    pk.pack_bin_body(v.payload.data(), static_cast<std::uint32_t>(v.payload.size()));
}

}  // namespace evmesh::codec
