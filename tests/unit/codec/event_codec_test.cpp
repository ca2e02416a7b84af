#include <gtest/gtest.h>

#include <random>

#include <msgpack.hpp>

#include <evmesh/codec.hpp>

namespace evmesh {
namespace {

event sample() {
    event ev;
    ev.id = new_event_id();
    ev.source = "node-a/orders";
    ev.topic = "orders.eu.created";
    ev.time_ns = 1'767'225'600'123'456'789;
    ev.seq = 42;
    ev.content_type = "application/json";
    ev.headers = {{"traceparent", "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"},
                  {"tenant", "acme"}};
    ev.payload = R"({"order":1234,"total":"99.50"})";
    return ev;
}

std::string body_of(const event& ev) {
    std::string out;
    encode_event_body(ev, out);
    return out;
}

TEST(EventCodec, RoundTripsEveryField) {
    const auto ev = sample();
    const auto body = body_of(ev);
    auto v = decode_event(ev.topic, body);
    ASSERT_TRUE(v) << v.error().message();
    EXPECT_EQ(v->to_event(), ev);
    EXPECT_EQ(v->header_value("tenant"), "acme");
    EXPECT_EQ(v->header_value("absent"), "");
}

TEST(EventCodec, RoundTripsBinaryPayloadAndEmptyFields) {
    event ev;
    ev.id = new_event_id();
    ev.topic = "x";
    ev.payload = std::string("\0\xff\x01\x80", 4);
    ev.time_ns = -5;  // before the epoch is representable
    const auto body = body_of(ev);  // the view points into it: keep it alive
    auto v = decode_event(ev.topic, body);
    ASSERT_TRUE(v);
    EXPECT_EQ(v->to_event(), ev);
}

TEST(EventCodec, EncodesEmptyPayloadFromNullView) {
    std::string out;
    encode_event_body(new_event_id(), "s", 1, 1, "c", {}, std::string_view(), out);
    auto v = decode_event("t", out);
    ASSERT_TRUE(v);
    EXPECT_TRUE(v->payload.empty());
}

TEST(EventCodec, MatchesMsgpackCxxView) {
    // Differential check: msgpack-cxx sees the documented positional array.
    const auto ev = sample();
    const auto body = body_of(ev);
    auto oh = msgpack::unpack(body.data(), body.size());
    const auto& o = oh.get();
    ASSERT_EQ(o.type, msgpack::type::ARRAY);
    ASSERT_EQ(o.via.array.size, 8U);
    EXPECT_EQ(o.via.array.ptr[0].as<int>(), 1);
    EXPECT_EQ(o.via.array.ptr[1].type, msgpack::type::BIN);
    EXPECT_EQ(o.via.array.ptr[2].as<std::string>(), ev.source);
    EXPECT_EQ(o.via.array.ptr[3].as<std::int64_t>(), ev.time_ns);
    EXPECT_EQ(o.via.array.ptr[4].as<std::uint64_t>(), ev.seq);
    EXPECT_EQ(o.via.array.ptr[5].as<std::string>(), ev.content_type);
    auto headers = o.via.array.ptr[6].as<std::map<std::string, std::string>>();
    EXPECT_EQ(headers.at("tenant"), "acme");
    EXPECT_EQ(o.via.array.ptr[7].type, msgpack::type::BIN);
}

TEST(EventCodec, AcceptsTrailingElementsOfLaterRevisions) {
    const auto ev = sample();
    msgpack::sbuffer buf;
    msgpack::packer<msgpack::sbuffer> pk(buf);
    pk.pack_array(10);
    pk.pack(1);
    pk.pack_bin(16);
    pk.pack_bin_body(reinterpret_cast<const char*>(ev.id.data()), 16);
    pk.pack(ev.source);
    pk.pack(ev.time_ns);
    pk.pack(ev.seq);
    pk.pack(ev.content_type);
    pk.pack_map(0);
    pk.pack_bin(2);
    pk.pack_bin_body("hi", 2);
    pk.pack(std::map<std::string, std::vector<int>>{{"future", {1, 2, 3}}});
    pk.pack_nil();
    auto v = decode_event(ev.topic, std::string_view(buf.data(), buf.size()));
    ASSERT_TRUE(v) << v.error().message();
    EXPECT_EQ(v->payload, "hi");
}

TEST(EventCodec, PayloadAsStrIsAccepted) {
    msgpack::sbuffer buf;
    msgpack::packer<msgpack::sbuffer> pk(buf);
    pk.pack_array(8);
    pk.pack(1);
    pk.pack_bin(16);
    pk.pack_bin_body("0123456789abcdef", 16);
    pk.pack("src");
    pk.pack(1);
    pk.pack(1);
    pk.pack_nil();
    pk.pack_nil();
    pk.pack("text payload");
    auto v = decode_event("a.b", std::string_view(buf.data(), buf.size()));
    ASSERT_TRUE(v) << v.error().message();
    EXPECT_EQ(v->payload, "text payload");
    EXPECT_EQ(v->header_count, 0U);
}

TEST(EventCodec, LenientDecodeReportsMissingFields) {
    msgpack::sbuffer buf;
    msgpack::packer<msgpack::sbuffer> pk(buf);
    pk.pack_array(8);
    pk.pack(1);
    for (int i = 0; i < 6; ++i) {
        pk.pack_nil();
    }
    pk.pack_bin(3);
    pk.pack_bin_body("abc", 3);
    const std::string_view body(buf.data(), buf.size());
    EXPECT_EQ(decode_event("t", body).error(), make_error_code(errc::missing_field));
    missing_fields m;
    auto v = decode_event_lenient("t", body, m);
    ASSERT_TRUE(v) << v.error().message();
    EXPECT_TRUE(m.id && m.source && m.time && m.seq);
    EXPECT_EQ(v->payload, "abc");
}

TEST(EventCodec, RejectsEveryTruncation) {
    const auto ev = sample();
    const auto body = body_of(ev);
    for (std::size_t n = 0; n < body.size(); ++n) {
        auto v = decode_event(ev.topic, std::string_view(body).substr(0, n));
        ASSERT_FALSE(v) << "prefix of " << n << " bytes decoded";
        EXPECT_TRUE(v.error() == make_error_code(errc::truncated)
                    || v.error() == make_error_code(errc::not_an_event))
            << n << ": " << v.error().message();
    }
}

TEST(EventCodec, RejectsTrailingBytes) {
    const auto ev = sample();
    auto body = body_of(ev) + "x";
    EXPECT_EQ(decode_event(ev.topic, body).error(), make_error_code(errc::trailing_bytes));
}

TEST(EventCodec, RejectsWrongShapes) {
    auto pack = [](auto&& fn) {
        msgpack::sbuffer buf;
        msgpack::packer<msgpack::sbuffer> pk(buf);
        fn(pk);
        return std::string(buf.data(), buf.size());
    };
    EXPECT_EQ(decode_event("t", pack([](auto& pk) { pk.pack(std::map<int, int>{}); })).error(),
              make_error_code(errc::not_an_event));
    EXPECT_EQ(decode_event("t", pack([](auto& pk) { pk.pack(std::vector<int>{1, 2}); })).error(),
              make_error_code(errc::not_an_event));
    EXPECT_EQ(decode_event("t", pack([](auto& pk) {
                                   pk.pack_array(8);
                                   pk.pack(2);
                               })).error(),
              make_error_code(errc::unsupported_version));
    // id of the wrong length
    EXPECT_EQ(decode_event("t", pack([](auto& pk) {
                                   pk.pack_array(8);
                                   pk.pack(1);
                                   pk.pack_bin(4);
                                   pk.pack_bin_body("abcd", 4);
                               })).error(),
              make_error_code(errc::bad_id));
    // source as an integer
    EXPECT_EQ(decode_event("t", pack([](auto& pk) {
                                   pk.pack_array(8);
                                   pk.pack(1);
                                   pk.pack_bin(16);
                                   pk.pack_bin_body("0123456789abcdef", 16);
                                   pk.pack(7);
                               })).error(),
              make_error_code(errc::wrong_type));
    // header value that is not a string
    EXPECT_EQ(decode_event("t", pack([](auto& pk) {
                                   pk.pack_array(8);
                                   pk.pack(1);
                                   pk.pack_bin(16);
                                   pk.pack_bin_body("0123456789abcdef", 16);
                                   pk.pack("s");
                                   pk.pack(1);
                                   pk.pack(1);
                                   pk.pack("c");
                                   pk.pack(std::map<std::string, int>{{"k", 1}});
                                   pk.pack_nil();
                               })).error(),
              make_error_code(errc::wrong_type));
}

// The sample body with element [0] written as `version` (raw msgpack bytes).
std::string with_version(std::string_view version) {
    const auto body = body_of(sample());  // 98 01 ...: fixarray 8, then version 1 in one byte
    return body.substr(0, 1) + std::string(version) + body.substr(2);
}

TEST(EventCodec, AnyIntegerVersionOtherThanOneIsUnsupported) {
    const auto topic = sample().topic;
    // PROTOCOL.md 3.4 step 4: an integer that is not 1 is unsupported_version, negative ones too
    for (const std::string& v : {std::string("\xff"),                       // -1, negative fixint
                                std::string("\xd0\xff", 2),               // -1, int8
                                std::string("\xd3\xff\xff\xff\xff\xff\xff\xff\xff", 9),  // -1, int64
                                std::string("\xcf\xff\xff\xff\xff\xff\xff\xff\xff", 9),  // 2^64-1
                                std::string("\x00", 1), std::string("\x02")}) {
        auto r = decode_event(topic, with_version(v));
        ASSERT_FALSE(r);
        EXPECT_EQ(r.error(), make_error_code(errc::unsupported_version))
            << "version byte " << static_cast<int>(static_cast<std::uint8_t>(v[0]));
    }
    // only a version that is not an integer makes the body not an event
    for (const std::string& v : {std::string("\xc0"), std::string("\xa1" "1"), std::string("\xc3"),
                                std::string("\xcb\x3f\xf0\x00\x00\x00\x00\x00\x00", 9)}) {  // 1.0
        auto r = decode_event(topic, with_version(v));
        ASSERT_FALSE(r);
        EXPECT_EQ(r.error(), make_error_code(errc::not_an_event))
            << "version byte " << static_cast<int>(static_cast<std::uint8_t>(v[0]));
    }
    // 1 in any integer form is version 1
    for (const std::string& v : {std::string("\xcc\x01", 2), std::string("\xd0\x01", 2),
                                std::string("\xd3\x00\x00\x00\x00\x00\x00\x00\x01", 9)}) {
        EXPECT_TRUE(decode_event(topic, with_version(v)));
    }
}

// An envelope whose element [8] is `arrays` nested arrays (arrays >= 1), the innermost holding
// one integer when `filled`, else empty.
std::string with_nested_element(int arrays, bool filled) {
    msgpack::sbuffer buf;
    msgpack::packer<msgpack::sbuffer> pk(buf);
    pk.pack_array(9);
    pk.pack(1);
    pk.pack_bin(16);
    pk.pack_bin_body("0123456789abcdef", 16);
    pk.pack("s");
    pk.pack(1);
    pk.pack(1);
    pk.pack("c");
    pk.pack_map(0);
    pk.pack_bin(0);
    for (int i = 1; i <= arrays; ++i) {
        pk.pack_array(i < arrays || filled ? 1U : 0U);
    }
    if (filled) {
        pk.pack(7);
    }
    return std::string(buf.data(), buf.size());
}

TEST(EventCodec, NestingDepthCountsArraysAndMapsBelowTheEnvelope) {
    // PROTOCOL.md 3.4: an element [8..] may be 16 containers deep; the envelope does not count,
    // scalars add no depth
    for (bool filled : {false, true}) {
        auto ok = decode_event("t", with_nested_element(16, filled));
        EXPECT_TRUE(ok) << "16 deep, filled " << filled << ": " << ok.error().message();
        auto deep = decode_event("t", with_nested_element(17, filled));
        ASSERT_FALSE(deep) << "17 deep, filled " << filled;
        EXPECT_EQ(deep.error(), make_error_code(errc::too_large));
    }
    // maps count like arrays: {"k": {"k": ... 1}} 16 deep passes, 17 deep does not
    for (int maps : {16, 17}) {
        auto body = with_nested_element(1, true);
        body.resize(body.size() - 2);  // drop element [8] ([7] as 91 07)
        for (int i = 0; i < maps; ++i) {
            body += "\x81\xa1k";
        }
        body += "\x07";
        auto r = decode_event("t", body);
        EXPECT_EQ(static_cast<bool>(r), maps == 16) << maps;
    }
}

TEST(ErrorCodes, HaveTheNamesAndValuesOfTheProtocolDoc) {
    // PROTOCOL.md 3.4 lists the codes by these names; the stats event keys rejects by them (10.2)
    EXPECT_STREQ(to_string(errc::bad_framing), "bad_framing");
    EXPECT_EQ(static_cast<int>(errc::bad_framing), 12);
    EXPECT_STREQ(to_string(errc::unsupported_version), "unsupported_version");
    EXPECT_STREQ(to_string(errc::bad_topic), "bad_topic");
    EXPECT_STREQ(to_string(errc::too_large), "too_large");
    EXPECT_STREQ(to_string(errc::bad_beacon), "bad_beacon");
    EXPECT_FALSE(make_error_code(errc::bad_framing).message().empty());
    EXPECT_NE(make_error_code(errc::bad_framing).message(), "unknown evmesh error");
}

TEST(EventCodec, RejectsOversizedInputWithoutAllocating) {
    decode_limits lim;
    lim.max_event_bytes = 64;
    const auto ev = sample();
    EXPECT_EQ(decode_event(ev.topic, std::string(100, '\x90'), lim).error(),
              make_error_code(errc::too_large));
    // a length prefix claiming 4 GiB must fail on bounds, not allocate
    std::string huge = "\x98\x01\xc4\x10" + std::string(16, 'i') + "\xdb\xff\xff\xff\xff";
    EXPECT_FALSE(decode_event("t", huge));
    // a header map claiming 2^32-1 entries
    std::string many = "\x98\x01\xc4\x10" + std::string(16, 'i')
                       + "\xa1s\x01\x01\xa1" "c\xdf\xff\xff\xff\xff";
    EXPECT_EQ(decode_event("t", many).error(), make_error_code(errc::too_large));
}

TEST(EventCodec, RejectsBadTopicsAndInvalidUtf8) {
    const auto ev = sample();
    const auto body = body_of(ev);
    for (std::string_view t : {"", ".", "a..b", "a.", ".a", "a b", "a.*", "a.>", "a\x01"}) {
        EXPECT_EQ(decode_event(t, body).error(), make_error_code(errc::bad_topic)) << t;
    }
    EXPECT_FALSE(decode_event("a\xc0\xaf", body));  // overlong encoding
    EXPECT_FALSE(decode_event(std::string(300, 'a'), body));
    auto bad = sample();
    bad.source = "\xed\xa0\x80";  // surrogate
    EXPECT_FALSE(decode_event(bad.topic, body_of(bad)));
}

TEST(EventCodec, RandomInputNeverCrashes) {
    std::mt19937_64 rng(12345);
    const auto good = body_of(sample());
    std::size_t decoded = 0;
    for (int i = 0; i < 200000; ++i) {
        std::string s;
        if (i % 2 == 0) {
            s.resize(rng() % 64);
            for (auto& ch : s) {
                ch = static_cast<char>(rng());
            }
        } else {  // mutate a valid body
            s = good;
            for (int k = 0; k < 1 + static_cast<int>(rng() % 4); ++k) {
                s[rng() % s.size()] = static_cast<char>(rng());
            }
        }
        missing_fields m;
        if (decode_event_lenient("t", s, m)) {
            ++decoded;
        }
    }
    EXPECT_GT(decoded, 0U);  // some single-byte mutations stay valid (payload bytes)
}

TEST(EventId, IsUuidV7AndSortsByTime) {
    auto a = new_event_id();
    std::this_thread::sleep_for(std::chrono::milliseconds(2));
    auto b = new_event_id();
    EXPECT_EQ(a[6] >> 4, 7);
    EXPECT_EQ(a[8] >> 6, 2);
    EXPECT_LT(a, b);
    EXPECT_NE(a, new_event_id());
    const auto text = to_string(a);
    EXPECT_EQ(text.size(), 36U);
    EXPECT_EQ(text[14], '7');
}

}  // namespace
}  // namespace evmesh
