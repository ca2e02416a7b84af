// The http channel's header-only parts: request templates with their per-target escaping
// (core/channels/http_request.hpp) and Web Push crypto (core/channels/webpush.hpp), the latter
// against the RFC 8291 Appendix A test vector.
#include <gtest/gtest.h>

#include "http_request.hpp"
#include "webpush.hpp"

namespace evmesh::channels {
namespace {

// An event with owned storage for the pointers the ABI struct carries.
struct test_event {
    std::string topic = "orders.eu.created";
    std::string source = "shop/checkout";
    std::string id = "01890a5d-ac96-774b-bcce-b302099a8057";
    std::string content_type = "application/json";
    std::string payload = R"({"phone":"+1 555/0100&x=y","name":"Ann\u00e9 \"A\"\nline2\\","token":"tok-1",)"
                          R"("endpoint":"https://push.example.net/send/abc?x=1","n":42})";
    std::vector<std::pair<std::string, std::string>> headers{{"subject", "order-42"}, {"tenant", "acme\r\nX-Evil: 1"}};
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
        ev.seq = 7;
        ev.content_type = content_type.c_str();
        ev.content_type_len = content_type.size();
        ev.headers = hs.data();
        ev.header_count = hs.size();
        ev.payload = payload.data();
        ev.payload_len = payload.size();
        return ev;
    }
};

using http::event_fields;

settings no_settings() { return settings("http", "{}"); }

TEST(HttpTemplate, UrlValuesArePercentEncoded) {
    test_event e;
    event_fields f(e.get());
    auto s = no_settings();
    http::url_template u(s, "url", "https://sms.example/v1/{source}/send?to={data.phone}&t={topic}");
    // '/' '+' ' ' '&' '=' inside values cannot add a path segment or a query parameter
    EXPECT_EQ(u.render(f),
              "https://sms.example/v1/shop%2Fcheckout/send?to=%2B1%20555%2F0100%26x%3Dy&t=orders.eu.created");
    // a URL that is one field alone is the whole URL (a push subscription's endpoint)
    http::url_template whole(s, "url", "{data.endpoint}");
    EXPECT_EQ(whole.render(f), "https://push.example.net/send/abc?x=1");
}

TEST(HttpTemplate, FormFieldsAreUrlencoded) {
    test_event e;
    event_fields f(e.get());
    auto s = no_settings();
    http::form_template form;
    form.add(s, "form", "To", "{data.phone}");
    form.add(s, "form", "From", "+15005550006");
    form.add(s, "form", "Body", "Hi {data.name}: order {subject} ({header.tenant})");
    form.add(s, "form", "To", "{data.phone}!");  // a second To replaces the first, in place
    EXPECT_EQ(form.render(f),
              "To=%2B1+555%2F0100%26x%3Dy%21&From=%2B15005550006&"
              "Body=Hi+Ann%C3%A9+%22A%22%0Aline2%5C%3A+order+order-42+%28acme%0D%0AX-Evil%3A+1%29");
}

TEST(HttpTemplate, JsonStringsAreEscapedAndTypesKept) {
    test_event e;
    event_fields f(e.get());
    auto s = no_settings();
    json doc = json::parse(R"({"message": {"token": "{data.token}",
        "notification": {"title": "Order {data.n} for {data.name}", "body": "{subject}"},
        "data": {"id": "{id}", "type": "{type}", "time": "{time}"}},
        "n": 5, "flag": true, "none": null, "list": ["{topic.1}", 2]})");
    http::json_template t(s, "json", doc);
    std::string text = t.render(f);
    json got = json::parse(text);
    EXPECT_EQ(got["message"]["token"], "tok-1");
    EXPECT_EQ(got["message"]["notification"]["title"], "Order 42 for Ann\u00e9 \"A\"\nline2\\");
    EXPECT_EQ(got["message"]["notification"]["body"], "order-42");
    EXPECT_EQ(got["message"]["data"]["id"], e.id);
    EXPECT_EQ(got["message"]["data"]["type"], "orders.eu.created");
    EXPECT_EQ(got["message"]["data"]["time"], "2024-05-01T12:34:56.123456Z");
    EXPECT_EQ(got["n"], 5);
    EXPECT_EQ(got["flag"], true);
    EXPECT_TRUE(got["none"].is_null());
    EXPECT_EQ(got["list"], json::parse(R"(["eu", 2])"));
    // the value's quote, newline and backslash are escaped in the text, not written raw
    EXPECT_NE(text.find(R"(\"A\"\nline2\\)"), std::string::npos) << text;

    // set() builds nested members (the fcm-v1 preset)
    http::json_template built;
    built.set(s, "token", {"message", "token"}, "{data.token}");
    built.set(s, "title", {"message", "notification", "title"}, "T {data.n}");
    EXPECT_EQ(built.render(f), R"({"message":{"notification":{"title":"T 42"},"token":"tok-1"}})");
}

TEST(HttpTemplate, HeaderValuesLoseControlCharacters) {
    test_event e;
    event_fields f(e.get());
    auto s = no_settings();
    auto t = http::parse_template(s, "headers.X-Tenant", "{header.tenant}");
    EXPECT_EQ(t.expand(f, &http::header_escape), "acmeX-Evil: 1");  // no CR/LF: no second header line
}

TEST(HttpTemplate, BadTemplatesAreConfigErrors) {
    auto s = no_settings();
    try {
        (void)http::parse_template(s, "url", "https://x/{{data.phone}}");
        FAIL() << "double braces around a field accepted";
    } catch (const config_error& e) {
        EXPECT_EQ(std::string(e.what()),
                  "http: settings.url writes {{data.phone}}, which is the literal text {data.phone}; a field takes "
                  "single braces: {data.phone}");
    }
    EXPECT_THROW((void)http::parse_template(s, "url", "https://x/{nope}"), config_error);
    EXPECT_THROW((void)http::parse_template(s, "url", "https://x/{data.phone"), config_error);
    // literal braces that are not a field stay allowed
    EXPECT_NO_THROW((void)http::parse_template(s, "text", "{{ hello world }}"));
}

// ---------------------------------------------------------------------------------------------
// RFC 8291 Appendix A

webpush::bytes b64(std::string_view text) {
    auto b = webpush::from_b64url(text);
    EXPECT_TRUE(b.has_value()) << text;
    return b ? *b : webpush::bytes{};
}

TEST(WebPush, Rfc8291AppendixA) {
    const std::string plaintext = "When I grow up, I want to be a watermelon";
    auto as_key = webpush::private_key_from_scalar(b64("yfWPiYE-n46HLnH0KqZOF1fJJU3MYrct3AELtAQ-oRw"));
    EXPECT_EQ(webpush::b64url(webpush::public_point(as_key.get())),
              "BP4z9KsN6nGRTbVYI_c7VJSPQTBtkgcy27mlmlMoZIIgDll6e3vCYLocInmYWAmS6TlzAC8wEqKK6PBru3jl7A8");
    auto keys = webpush::decode_keys(
        "BCVxsr7N_eNgVRqvHtD0zTZsEc6-VV-JvLexhqUzORcxaOzi6-AYWXvTBHm4bjyPjs7Vd8pZGH6SRpkNtoIAiw4",
        "BTBZMqHH6r4Tts7J_aSIgg");
    auto body = webpush::encrypt(plaintext, keys, as_key.get(), b64("DGv6ra1nlYgDCS1FRnbzlw"));
    EXPECT_EQ(webpush::b64url(body),
              "DGv6ra1nlYgDCS1FRnbzlwAAEABBBP4z9KsN6nGRTbVYI_c7VJSPQTBtkgcy27mlmlMoZIIgDll6e3vCYLocInmYWAmS6TlzAC8wEqKK"
              "6PBru3jl7A_yl95bQpu6cVPTpK4Mqgkf1CXztLVBSt2Ks3oZwbuwXPXLWyouBWLVWGNWQexSgSxsj_Qulcy4a-fN");

    // a fresh key and salt per delivery: never the same bytes twice
    auto a = webpush::encrypt(plaintext, keys);
    auto b = webpush::encrypt(plaintext, keys);
    EXPECT_EQ(a.size(), body.size());
    EXPECT_NE(a, b);
}

TEST(WebPush, RefusesBadKeysAndLargePayloads) {
    auto keys = webpush::decode_keys(
        "BCVxsr7N_eNgVRqvHtD0zTZsEc6-VV-JvLexhqUzORcxaOzi6-AYWXvTBHm4bjyPjs7Vd8pZGH6SRpkNtoIAiw4",
        "BTBZMqHH6r4Tts7J_aSIgg");
    EXPECT_THROW(webpush::encrypt(std::string(webpush::max_plaintext + 1, 'x'), keys), webpush::crypto_error);
    EXPECT_NO_THROW(webpush::encrypt(std::string(webpush::max_plaintext, 'x'), keys));
    EXPECT_THROW(webpush::decode_keys("BCVx", "BTBZMqHH6r4Tts7J_aSIgg"), webpush::crypto_error);
    EXPECT_THROW(webpush::decode_keys(
                     "BCVxsr7N_eNgVRqvHtD0zTZsEc6-VV-JvLexhqUzORcxaOzi6-AYWXvTBHm4bjyPjs7Vd8pZGH6SRpkNtoIAiw4", "AAAA"),
                 webpush::crypto_error);
    // 65 octets starting with 0x04 but not a point on the curve
    webpush::subscription_keys off_curve = keys;
    off_curve.p256dh[64] ^= 1;
    EXPECT_THROW(webpush::encrypt("x", off_curve), webpush::crypto_error);
}

TEST(WebPush, VapidJwtVerifies) {
    auto key = webpush::private_key_from_scalar(b64("yfWPiYE-n46HLnH0KqZOF1fJJU3MYrct3AELtAQ-oRw"));
    webpush::vapid v(std::move(key), "mailto:ops@example.com");
    std::string auth = v.authorization("https://push.example.net", 1700000000);
    ASSERT_EQ(auth.rfind("vapid t=", 0), 0u) << auth;
    size_t comma = auth.find(", k=");
    ASSERT_NE(comma, std::string::npos);
    std::string jwt = auth.substr(8, comma - 8);
    EXPECT_EQ(auth.substr(comma + 4), v.public_key());
    size_t d1 = jwt.find('.'), d2 = jwt.rfind('.');
    ASSERT_NE(d1, d2);
    auto header_bytes = b64(jwt.substr(0, d1));
    auto header = json::parse(std::string(header_bytes.begin(), header_bytes.end()));
    EXPECT_EQ(header, json::parse(R"({"typ":"JWT","alg":"ES256"})"));
    auto claims_bytes = b64(jwt.substr(d1 + 1, d2 - d1 - 1));
    auto claims = json::parse(std::string(claims_bytes.begin(), claims_bytes.end()));
    EXPECT_EQ(claims,
              json::parse(R"({"aud":"https://push.example.net","exp":1700000000,"sub":"mailto:ops@example.com"})"));

    // verify r || s with the public key in k= (as a push service does)
    auto sig = b64(jwt.substr(d2 + 1));
    ASSERT_EQ(sig.size(), 64u);
    ECDSA_SIG* es = ECDSA_SIG_new();
    ECDSA_SIG_set0(es, BN_bin2bn(sig.data(), 32, nullptr), BN_bin2bn(sig.data() + 32, 32, nullptr));
    unsigned char* der = nullptr;
    int der_len = i2d_ECDSA_SIG(es, &der);
    ECDSA_SIG_free(es);
    auto pub = webpush::public_key_from_point(b64(v.public_key()));
    EVP_MD_CTX* md = EVP_MD_CTX_new();
    std::string input = jwt.substr(0, d2);
    ASSERT_EQ(EVP_DigestVerifyInit(md, nullptr, EVP_sha256(), nullptr, pub.get()), 1);
    EXPECT_EQ(EVP_DigestVerify(md, der, static_cast<size_t>(der_len),
                               reinterpret_cast<const unsigned char*>(input.data()), input.size()),
              1);
    input[0] ^= 1;  // a changed header no longer verifies
    ASSERT_EQ(EVP_DigestVerifyInit(md, nullptr, EVP_sha256(), nullptr, pub.get()), 1);
    EXPECT_NE(EVP_DigestVerify(md, der, static_cast<size_t>(der_len),
                               reinterpret_cast<const unsigned char*>(input.data()), input.size()),
              1);
    EVP_MD_CTX_free(md);
    OPENSSL_free(der);
}

}  // namespace
}  // namespace evmesh::channels
