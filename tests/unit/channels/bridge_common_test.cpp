// The broker bridges' shared pieces (core/channels/bridge_common.hpp): destination templates,
// CloudEvents attributes, bodies, URLs.
#include <gtest/gtest.h>

#include "bridge_common.hpp"

namespace evmesh::channels::bridge {
namespace {

// An event with owned storage for the pointers the ABI struct carries.
struct test_event {
    std::string topic = "orders.eu.created";
    std::string source = "shop/checkout";
    std::string id = "01890a5d-ac96-774b-bcce-b302099a8057";
    std::string content_type = "application/json";
    std::string payload = R"({"customer":{"id":"c-42","tags":["vip","eu"]},"total":12.5,"paid":true,"none":null})";
    std::vector<std::pair<std::string, std::string>> headers{{"tenant", "acme"}, {"X-Trace", "t1"}};
    uint64_t seq = 7;
    std::vector<evmesh_header> hs;
    evmesh_event ev{};

    const evmesh_event& get() {
        hs.clear();
        for (auto& [k, v] : headers) hs.push_back({k.data(), k.size(), v.data(), v.size()});
        ev = {};
        ev.struct_size = sizeof ev;
        ev.id_text = id.c_str();
        ev.topic = topic.c_str();
        ev.topic_len = topic.size();
        ev.source = source.c_str();
        ev.source_len = source.size();
        ev.time_ns = int64_t{1714566896} * 1000000000 + 123456789;
        ev.seq = seq;
        ev.content_type = content_type.c_str();
        ev.content_type_len = content_type.size();
        ev.headers = hs.data();
        ev.header_count = hs.size();
        ev.payload = payload.data();
        ev.payload_len = payload.size();
        return ev;
    }
};

std::string expand(const std::string& tpl, test_event& e, value_escaper esc = escape_none, char sep = '.') {
    event_fields f(e.get());
    return name_template(tpl).expand(f, esc, sep);
}

TEST(BridgeTemplate, EventAttributes) {
    test_event e;
    EXPECT_EQ(expand("{topic}", e), "orders.eu.created");
    EXPECT_EQ(expand("{type}", e), "orders.eu.created");
    EXPECT_EQ(expand("evmesh.{topic}", e), "evmesh.orders.eu.created");
    EXPECT_EQ(expand("{id}", e), e.id);
    EXPECT_EQ(expand("{source}/{seq}", e), "shop/checkout/7");
    EXPECT_EQ(expand("{time}", e), "2024-05-01T12:34:56.123456Z");
    EXPECT_EQ(expand("{content_type}", e), "application/json");
    EXPECT_EQ(expand("plain text", e), "plain text");
    EXPECT_EQ(expand("", e), "");
}

TEST(BridgeTemplate, SubjectIsTheSubjectHeader) {
    test_event e;
    EXPECT_EQ(expand("{subject}", e), "");  // absent
    e.headers.emplace_back("subject", "order-42");
    EXPECT_EQ(expand("s/{subject}", e), "s/order-42");
    EXPECT_TRUE(name_template("{data.endpoint}").single_field());
    EXPECT_FALSE(name_template("x{id}").single_field());
    EXPECT_FALSE(name_template("literal").single_field());
}

TEST(BridgeTemplate, TopicSegmentsAndSeparator) {
    test_event e;
    EXPECT_EQ(expand("{topic.0}", e), "orders");
    EXPECT_EQ(expand("{topic.1}-{topic.2}", e), "eu-created");
    EXPECT_EQ(expand("x{topic.3}y", e), "xy");  // beyond the last segment: empty
    EXPECT_EQ(expand("evmesh/{topic}", e, escape_none, '/'), "evmesh/orders/eu/created");
    // only the topic's dots are mapped, not the literal text's
    EXPECT_EQ(expand("a.b/{type}", e, escape_none, '/'), "a.b/orders/eu/created");
}

TEST(BridgeTemplate, HeaderAndDataFieldLookups) {
    test_event e;
    EXPECT_EQ(expand("{header.tenant}", e), "acme");
    EXPECT_EQ(expand("{header.X-Trace}", e), "t1");
    EXPECT_EQ(expand("[{header.missing}]", e), "[]");
    EXPECT_EQ(expand("{data.customer.id}", e), "c-42");
    EXPECT_EQ(expand("{data.customer.tags.1}", e), "eu");
    EXPECT_EQ(expand("{data.customer.tags}", e), R"(["vip","eu"])");
    EXPECT_EQ(expand("{data.total}", e), "12.5");
    EXPECT_EQ(expand("{data.paid}", e), "true");
    EXPECT_EQ(expand("[{data.none}]", e), "[]");
    EXPECT_EQ(expand("[{data.nope.deeper}]", e), "[]");
    EXPECT_EQ(expand("[{data.customer.tags.9}]", e), "[]");
    EXPECT_EQ(expand("[{data.customer.tags.x}]", e), "[]");
    e.payload = "not json";
    EXPECT_EQ(expand("[{data.customer.id}]", e), "[]");
    e.payload.clear();
    EXPECT_EQ(expand("[{data.customer.id}]", e), "[]");
}

TEST(BridgeTemplate, PayloadIsParsedOnlyWhenADataFieldIsUsed) {
    EXPECT_FALSE(name_template("{topic}/{id}/{header.a}").uses_data());
    EXPECT_TRUE(name_template("{topic}/{data.a}").uses_data());
    EXPECT_TRUE(name_template("fixed").constant());
    EXPECT_FALSE(name_template("x{id}").constant());
    EXPECT_EQ(name_template("a{{b}}{id}c").literal_text(), "a{b}c");
}

TEST(BridgeTemplate, BracesAreEscapedByDoubling) {
    test_event e;
    EXPECT_EQ(expand("{{topic}}", e), "{topic}");
    EXPECT_EQ(expand("{{{topic}}}", e), "{orders.eu.created}");
    EXPECT_EQ(expand("a}}b{{c", e), "a}b{c");
}

TEST(BridgeTemplate, ValuesGoThroughTheEscaper) {
    test_event e;
    e.topic = "a.b+c.#";
    auto mqtt_safe = [](std::string& out, std::string_view v) {
        for (char c : v) out += (c == '+' || c == '#') ? '_' : c;
    };
    // the escaper sees substituted values only, never the literal text
    EXPECT_EQ(expand("+/{topic}", e, mqtt_safe, '/'), "+/a/b_c/_");
}

TEST(BridgeTemplate, BadTemplatesAreRejectedWithAReason) {
    struct bad {
        const char* text;
        const char* needle;
    };
    for (auto [text, needle] : {bad{"{topic", "unclosed '{'"}, bad{"{top{ic}", "unclosed '{'"},
                                bad{"a}b", "lone '}'"}, bad{"{}", "empty field"}, bad{"{nope}", "unknown field {nope}"},
                                bad{"{ topic }", "unknown field"}, bad{"{topic.x}", "bad topic segment"},
                                bad{"{topic.}", "bad topic segment"}, bad{"{header.}", "empty header name"},
                                bad{"{data.}", "empty key"}, bad{"{data.a..b}", "empty key"}}) {
        try {
            name_template t(text);
            ADD_FAILURE() << "accepted " << text;
        } catch (const template_error& e) {
            EXPECT_NE(std::string(e.what()).find(needle), std::string::npos) << text << ": " << e.what();
        }
    }
}

TEST(BridgeTemplate, SettingErrorsNameTheKey) {
    settings s("kafka", R"({"topic": "x{nope}", "key": "{id}"})");
    EXPECT_EQ(template_setting(s, "key", std::nullopt).text(), "{id}");
    try {
        template_setting(s, "topic", std::nullopt);
        ADD_FAILURE();
    } catch (const config_error& e) {
        EXPECT_EQ(std::string(e.what()).rfind("kafka: settings.topic has an unknown field {nope}", 0), 0u) << e.what();
    }
    settings empty("mqtt", "{}");
    EXPECT_EQ(template_setting(empty, "topic", std::string("{topic}")).text(), "{topic}");
    try {
        template_setting(empty, "subject", std::nullopt);
        ADD_FAILURE();
    } catch (const config_error& e) {
        EXPECT_STREQ(e.what(), "mqtt: settings.subject is required");
    }
}

TEST(BridgeAttributes, CloudEventsAttributesAndExtensions) {
    test_event e;
    e.headers.emplace_back("id", "shadow");  // a header may not shadow a context attribute
    e.headers.emplace_back("tenant", "second");
    auto attrs = ce_attributes(e.get());
    std::vector<std::pair<std::string, std::string>> want{{"specversion", "1.0"},
                                                          {"id", e.id},
                                                          {"source", "shop/checkout"},
                                                          {"type", "orders.eu.created"},
                                                          {"time", "2024-05-01T12:34:56.123456Z"},
                                                          {"seq", "7"},
                                                          {"tenant", "acme"}};
    EXPECT_EQ(attrs, want);  // X-Trace is not a valid attribute name: not an extension
    e.seq = 0;
    for (auto& [k, v] : ce_attributes(e.get())) EXPECT_NE(k, "seq");
}

TEST(BridgeAttributes, BinaryAndStructuredBodies) {
    test_event e;
    auto b = make_body(e.get(), body_mode::binary);
    EXPECT_EQ(b.bytes, e.payload);
    EXPECT_EQ(b.content_type, "application/json");
    auto s = make_body(e.get(), body_mode::structured);
    EXPECT_EQ(s.content_type, "application/cloudevents+json");
    auto j = json::parse(s.bytes);
    EXPECT_EQ(j["id"], e.id);
    EXPECT_EQ(j["type"], "orders.eu.created");
    EXPECT_EQ(j["data"]["customer"]["id"], "c-42");
    EXPECT_EQ(j["tenant"], "acme");
}

TEST(BridgeUrl, Parse) {
    auto u = parse_url("redis://user:p%40ss@127.0.0.1:6380/2", {"redis"}, 6379);
    ASSERT_TRUE(u);
    EXPECT_EQ(u->user, "user");
    EXPECT_EQ(u->password, "p@ss");
    EXPECT_EQ(u->host, "127.0.0.1");
    EXPECT_EQ(u->port, 6380);
    EXPECT_EQ(u->path, "2");
    u = parse_url("mqtt://[::1]", {"mqtt", "tcp"}, 1883);
    ASSERT_TRUE(u);
    EXPECT_EQ(u->host, "::1");
    EXPECT_EQ(u->port, 1883);
    EXPECT_FALSE(parse_url("http://x", {"redis"}, 1));
    EXPECT_FALSE(parse_url("redis://:70000", {"redis"}, 1));
    EXPECT_FALSE(parse_url("redis://host:99999", {"redis"}, 1));
    EXPECT_FALSE(parse_url("redis://host:x", {"redis"}, 1));
    EXPECT_FALSE(parse_url("127.0.0.1:6379", {"redis"}, 1));
}

}  // namespace
}  // namespace evmesh::channels::bridge
