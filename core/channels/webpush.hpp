// Web Push for the http channel's "webpush" preset, with OpenSSL 3 (EVP APIs only):
//   - RFC 8291 message encryption: ECDH P-256 with the subscription's p256dh key, HKDF-SHA256
//     with its auth secret, the "aes128gcm" content coding of RFC 8188 (one record);
//   - RFC 8292 VAPID: an ES256 JWT signed with the application server's P-256 key.
// Header-only so the unit test can run the RFC 8291 Appendix A vector against exactly this code.
#pragma once

#include <openssl/core_names.h>
#include <openssl/ec.h>
#include <openssl/err.h>
#include <openssl/evp.h>
#include <openssl/kdf.h>
#include <openssl/param_build.h>
#include <openssl/pem.h>
#include <openssl/rand.h>

#include <nlohmann/json.hpp>
#include <sodium.h>

#include <cstdint>
#include <cstdio>
#include <cstring>
#include <memory>
#include <optional>
#include <stdexcept>
#include <string>
#include <string_view>
#include <vector>

namespace evmesh::channels::webpush {

using bytes = std::vector<unsigned char>;

// A failure of a crypto step or bad key material; the message is one line for the delivery log.
struct crypto_error : std::runtime_error {
    using std::runtime_error::runtime_error;
};

// RFC 8291 section 4: a push message's plaintext is at most 3993 octets, so that one record of
// 4096 octets (with the 86-octet header, the delimiter and the tag) carries it.
inline constexpr size_t max_plaintext = 3993;
inline constexpr uint32_t record_size = 4096;

// ---------------------------------------------------------------------------------------------
// base64url (RFC 4648 section 5) without padding, as Web Push and JWTs use it

inline std::string b64url(const unsigned char* data, size_t len) {
    std::string out(sodium_base64_ENCODED_LEN(len, sodium_base64_VARIANT_URLSAFE_NO_PADDING), '\0');
    sodium_bin2base64(out.data(), out.size(), data, len, sodium_base64_VARIANT_URLSAFE_NO_PADDING);
    out.resize(std::strlen(out.c_str()));
    return out;
}
inline std::string b64url(const bytes& b) { return b64url(b.data(), b.size()); }
inline std::string b64url(std::string_view s) {
    return b64url(reinterpret_cast<const unsigned char*>(s.data()), s.size());
}

// Decodes base64url with or without padding (and tolerates the standard alphabet's + and /, which
// some subscription stores write); nullopt when it is not base64.
inline std::optional<bytes> from_b64url(std::string_view text) {
    std::string s(text);
    while (!s.empty() && s.back() == '=') s.pop_back();
    for (char& c : s) {
        if (c == '+') c = '-';
        if (c == '/') c = '_';
    }
    bytes out(s.size());
    size_t len = 0;
    const char* end = nullptr;
    if (sodium_base642bin(out.data(), out.size(), s.data(), s.size(), nullptr, &len, &end,
                          sodium_base64_VARIANT_URLSAFE_NO_PADDING) != 0 ||
        end != s.data() + s.size())
        return std::nullopt;
    out.resize(len);
    return out;
}

// ---------------------------------------------------------------------------------------------
// OpenSSL handles

struct pkey_free {
    void operator()(EVP_PKEY* p) const noexcept { EVP_PKEY_free(p); }
};
struct pkey_ctx_free {
    void operator()(EVP_PKEY_CTX* p) const noexcept { EVP_PKEY_CTX_free(p); }
};
struct md_ctx_free {
    void operator()(EVP_MD_CTX* p) const noexcept { EVP_MD_CTX_free(p); }
};
struct cipher_ctx_free {
    void operator()(EVP_CIPHER_CTX* p) const noexcept { EVP_CIPHER_CTX_free(p); }
};
using pkey_ptr = std::unique_ptr<EVP_PKEY, pkey_free>;
using pkey_ctx_ptr = std::unique_ptr<EVP_PKEY_CTX, pkey_ctx_free>;

// Throws crypto_error("<what>: <OpenSSL's first queued error>") and clears the queue.
[[noreturn]] inline void fail(const char* what) {
    unsigned long e = ERR_get_error();
    ERR_clear_error();
    char buf[256];
    if (e) {
        char reason[200];
        ERR_error_string_n(e, reason, sizeof reason);
        std::snprintf(buf, sizeof buf, "%s: %s", what, reason);
    } else {
        std::snprintf(buf, sizeof buf, "%s", what);
    }
    throw crypto_error(buf);
}

// The uncompressed point (65 octets, 0x04 || X || Y) of a P-256 key.
inline bytes public_point(EVP_PKEY* key) {
    bytes out(65);
    size_t len = 0;
    if (EVP_PKEY_get_octet_string_param(key, OSSL_PKEY_PARAM_PUB_KEY, out.data(), out.size(), &len) != 1 ||
        len != 65 || out[0] != 0x04)
        fail("cannot read the P-256 public key");
    return out;
}

// A P-256 public key from its uncompressed point; refused when not on the curve.
inline pkey_ptr public_key_from_point(const bytes& point) {
    if (point.size() != 65 || point[0] != 0x04)
        throw crypto_error("p256dh is not an uncompressed P-256 point (65 octets starting with 0x04)");
    OSSL_PARAM params[] = {
        OSSL_PARAM_construct_utf8_string(OSSL_PKEY_PARAM_GROUP_NAME, const_cast<char*>("prime256v1"), 0),
        OSSL_PARAM_construct_octet_string(OSSL_PKEY_PARAM_PUB_KEY, const_cast<unsigned char*>(point.data()),
                                          point.size()),
        OSSL_PARAM_construct_end()};
    pkey_ctx_ptr ctx(EVP_PKEY_CTX_new_from_name(nullptr, "EC", nullptr));
    EVP_PKEY* raw = nullptr;
    if (!ctx || EVP_PKEY_fromdata_init(ctx.get()) != 1 ||
        EVP_PKEY_fromdata(ctx.get(), &raw, EVP_PKEY_PUBLIC_KEY, params) != 1)
        fail("p256dh is not a valid P-256 public key");
    pkey_ptr key(raw);
    pkey_ctx_ptr check(EVP_PKEY_CTX_new_from_pkey(nullptr, key.get(), nullptr));
    if (!check || EVP_PKEY_public_check(check.get()) != 1) fail("p256dh is not a point on P-256");
    return key;
}

// A P-256 key pair from its private scalar (32 octets); the public point is computed (d·G).
inline pkey_ptr private_key_from_scalar(const bytes& d) {
    if (d.size() != 32) throw crypto_error("a P-256 private key is 32 octets");
    std::unique_ptr<EC_GROUP, decltype(&EC_GROUP_free)> group(EC_GROUP_new_by_curve_name(NID_X9_62_prime256v1),
                                                              &EC_GROUP_free);
    std::unique_ptr<BIGNUM, decltype(&BN_clear_free)> priv(BN_bin2bn(d.data(), static_cast<int>(d.size()), nullptr),
                                                           &BN_clear_free);
    if (!group || !priv) fail("P-256 setup failed");
    std::unique_ptr<EC_POINT, decltype(&EC_POINT_free)> pub(EC_POINT_new(group.get()), &EC_POINT_free);
    bytes point(65);
    if (!pub || EC_POINT_mul(group.get(), pub.get(), priv.get(), nullptr, nullptr, nullptr) != 1 ||
        EC_POINT_point2oct(group.get(), pub.get(), POINT_CONVERSION_UNCOMPRESSED, point.data(), point.size(),
                           nullptr) != 65)
        fail("the P-256 private key is invalid");
    std::unique_ptr<OSSL_PARAM_BLD, decltype(&OSSL_PARAM_BLD_free)> bld(OSSL_PARAM_BLD_new(), &OSSL_PARAM_BLD_free);
    if (!bld || OSSL_PARAM_BLD_push_utf8_string(bld.get(), OSSL_PKEY_PARAM_GROUP_NAME, "prime256v1", 0) != 1 ||
        OSSL_PARAM_BLD_push_BN(bld.get(), OSSL_PKEY_PARAM_PRIV_KEY, priv.get()) != 1 ||
        OSSL_PARAM_BLD_push_octet_string(bld.get(), OSSL_PKEY_PARAM_PUB_KEY, point.data(), point.size()) != 1)
        fail("P-256 key parameters");
    std::unique_ptr<OSSL_PARAM, decltype(&OSSL_PARAM_free)> params(OSSL_PARAM_BLD_to_param(bld.get()),
                                                                   &OSSL_PARAM_free);
    pkey_ctx_ptr ctx(EVP_PKEY_CTX_new_from_name(nullptr, "EC", nullptr));
    EVP_PKEY* raw = nullptr;
    if (!params || !ctx || EVP_PKEY_fromdata_init(ctx.get()) != 1 ||
        EVP_PKEY_fromdata(ctx.get(), &raw, EVP_PKEY_KEYPAIR, params.get()) != 1)
        fail("the P-256 private key is invalid");
    return pkey_ptr(raw);
}

// Whether key is an EC key on P-256.
inline bool is_p256(EVP_PKEY* key) {
    if (!EVP_PKEY_is_a(key, "EC")) return false;
    char group[64] = {};
    size_t len = 0;
    if (EVP_PKEY_get_utf8_string_param(key, OSSL_PKEY_PARAM_GROUP_NAME, group, sizeof group, &len) != 1) return false;
    std::string_view g(group, len);
    return g == "prime256v1" || g == "P-256" || g == "secp256r1";
}

// A P-256 private key from a PEM file ("EC PRIVATE KEY" or PKCS#8 "PRIVATE KEY").
inline pkey_ptr private_key_from_pem_file(const std::string& path) {
    std::unique_ptr<FILE, decltype(&std::fclose)> f(std::fopen(path.c_str(), "re"), &std::fclose);
    if (!f) throw crypto_error("cannot be read");
    pkey_ptr key(PEM_read_PrivateKey(f.get(), nullptr, nullptr, nullptr));
    ERR_clear_error();
    if (!key) throw crypto_error("holds no PEM private key");
    if (!is_p256(key.get())) throw crypto_error("is not a P-256 (prime256v1) EC key");
    return key;
}

inline pkey_ptr generate_p256() {
    pkey_ptr key(EVP_PKEY_Q_keygen(nullptr, nullptr, "EC", "P-256"));
    if (!key) fail("P-256 key generation failed");
    return key;
}

// ---------------------------------------------------------------------------------------------
// Primitives

inline bytes ecdh(EVP_PKEY* own, EVP_PKEY* peer) {
    pkey_ctx_ptr ctx(EVP_PKEY_CTX_new_from_pkey(nullptr, own, nullptr));
    size_t len = 0;
    if (!ctx || EVP_PKEY_derive_init(ctx.get()) != 1 || EVP_PKEY_derive_set_peer(ctx.get(), peer) != 1 ||
        EVP_PKEY_derive(ctx.get(), nullptr, &len) != 1)
        fail("ECDH failed");
    bytes secret(len);
    if (EVP_PKEY_derive(ctx.get(), secret.data(), &len) != 1) fail("ECDH failed");
    secret.resize(len);
    return secret;
}

// HKDF-SHA256 (RFC 5869): extract with salt, expand with info to length octets.
inline bytes hkdf_sha256(const bytes& salt, const bytes& ikm, const bytes& info, size_t length) {
    std::unique_ptr<EVP_KDF, decltype(&EVP_KDF_free)> kdf(EVP_KDF_fetch(nullptr, "HKDF", nullptr), &EVP_KDF_free);
    std::unique_ptr<EVP_KDF_CTX, decltype(&EVP_KDF_CTX_free)> ctx(kdf ? EVP_KDF_CTX_new(kdf.get()) : nullptr,
                                                                  &EVP_KDF_CTX_free);
    if (!ctx) fail("HKDF unavailable");
    OSSL_PARAM params[] = {
        OSSL_PARAM_construct_utf8_string(OSSL_KDF_PARAM_DIGEST, const_cast<char*>("SHA256"), 0),
        OSSL_PARAM_construct_octet_string(OSSL_KDF_PARAM_KEY, const_cast<unsigned char*>(ikm.data()), ikm.size()),
        OSSL_PARAM_construct_octet_string(OSSL_KDF_PARAM_SALT, const_cast<unsigned char*>(salt.data()), salt.size()),
        OSSL_PARAM_construct_octet_string(OSSL_KDF_PARAM_INFO, const_cast<unsigned char*>(info.data()), info.size()),
        OSSL_PARAM_construct_end()};
    bytes out(length);
    if (EVP_KDF_derive(ctx.get(), out.data(), out.size(), params) != 1) fail("HKDF failed");
    return out;
}

inline bytes random_bytes(size_t n) {
    bytes out(n);
    if (RAND_bytes(out.data(), static_cast<int>(n)) != 1) fail("no random bytes");
    return out;
}

inline void put(bytes& out, std::string_view s) { out.insert(out.end(), s.begin(), s.end()); }
inline void put(bytes& out, const bytes& b) { out.insert(out.end(), b.begin(), b.end()); }

// ---------------------------------------------------------------------------------------------
// RFC 8291: the encrypted push message body (aes128gcm, one record)

struct subscription_keys {
    bytes p256dh;  // the user agent's public key, uncompressed point
    bytes auth;    // the 16-octet authentication secret
};

// Decodes and checks a subscription's keys (base64url text, as PushSubscription.toJSON() gives
// them). Throws crypto_error naming the bad one.
inline subscription_keys decode_keys(std::string_view p256dh, std::string_view auth) {
    subscription_keys k;
    auto pk = from_b64url(p256dh);
    if (!pk || pk->size() != 65 || (*pk)[0] != 0x04)
        throw crypto_error("p256dh is not a base64url uncompressed P-256 point (65 octets)");
    auto a = from_b64url(auth);
    if (!a || a->size() != 16) throw crypto_error("auth is not a base64url 16-octet secret");
    k.p256dh = std::move(*pk);
    k.auth = std::move(*a);
    return k;
}

// Encrypts plaintext for the subscription. as_key (the ephemeral application-server key) and salt
// are parameters so that the RFC's test vector can be reproduced; deliveries pass a fresh key and
// 16 random octets every time. The result is the whole request body:
//   salt(16) || rs(4, big endian) || idlen(1) = 65 || as_public(65) || AES-128-GCM(plaintext || 0x02) || tag
inline bytes encrypt(std::string_view plaintext, const subscription_keys& ua, EVP_PKEY* as_key, const bytes& salt) {
    if (plaintext.size() > max_plaintext)
        throw crypto_error("payload of " + std::to_string(plaintext.size()) + " bytes exceeds Web Push's " +
                           std::to_string(max_plaintext));
    if (salt.size() != 16) throw crypto_error("the salt is 16 octets");
    pkey_ptr ua_key = public_key_from_point(ua.p256dh);
    bytes as_public = public_point(as_key);
    bytes ecdh_secret = ecdh(as_key, ua_key.get());

    // PRK_key = HKDF-Extract(auth_secret, ecdh_secret); IKM = HKDF-Expand(PRK_key, key_info, 32)
    bytes key_info;
    put(key_info, std::string_view("WebPush: info\0", 14));
    put(key_info, ua.p256dh);
    put(key_info, as_public);
    bytes ikm = hkdf_sha256(ua.auth, ecdh_secret, key_info, 32);
    // RFC 8188: CEK and NONCE from HKDF(salt, IKM)
    bytes cek = hkdf_sha256(salt, ikm, bytes{'C', 'o', 'n', 't', 'e', 'n', 't', '-', 'E', 'n', 'c', 'o', 'd', 'i', 'n',
                                             'g', ':', ' ', 'a', 'e', 's', '1', '2', '8', 'g', 'c', 'm', 0},
                            16);
    bytes nonce = hkdf_sha256(salt, ikm,
                              bytes{'C', 'o', 'n', 't', 'e', 'n', 't', '-', 'E', 'n', 'c', 'o', 'd', 'i', 'n', 'g', ':',
                                    ' ', 'n', 'o', 'n', 'c', 'e', 0},
                              12);

    bytes out;
    out.reserve(86 + plaintext.size() + 17);
    put(out, salt);
    out.push_back(static_cast<unsigned char>(record_size >> 24));
    out.push_back(static_cast<unsigned char>((record_size >> 16) & 0xff));
    out.push_back(static_cast<unsigned char>((record_size >> 8) & 0xff));
    out.push_back(static_cast<unsigned char>(record_size & 0xff));
    out.push_back(static_cast<unsigned char>(as_public.size()));
    put(out, as_public);

    // One record, the last: the plaintext, then the delimiter 0x02 (no padding). Its sequence
    // number is 0, so the record nonce is NONCE itself.
    bytes record(plaintext.begin(), plaintext.end());
    record.push_back(0x02);
    std::unique_ptr<EVP_CIPHER_CTX, cipher_ctx_free> c(EVP_CIPHER_CTX_new());
    int len = 0;
    size_t at = out.size();
    out.resize(at + record.size() + 16);
    if (!c || EVP_EncryptInit_ex(c.get(), EVP_aes_128_gcm(), nullptr, nullptr, nullptr) != 1 ||
        EVP_CIPHER_CTX_ctrl(c.get(), EVP_CTRL_GCM_SET_IVLEN, 12, nullptr) != 1 ||
        EVP_EncryptInit_ex(c.get(), nullptr, nullptr, cek.data(), nonce.data()) != 1 ||
        EVP_EncryptUpdate(c.get(), out.data() + at, &len, record.data(), static_cast<int>(record.size())) != 1)
        fail("AES-128-GCM failed");
    int tail = 0;
    if (EVP_EncryptFinal_ex(c.get(), out.data() + at + len, &tail) != 1 ||
        EVP_CIPHER_CTX_ctrl(c.get(), EVP_CTRL_GCM_GET_TAG, 16, out.data() + at + record.size()) != 1)
        fail("AES-128-GCM failed");
    OPENSSL_cleanse(cek.data(), cek.size());
    OPENSSL_cleanse(ikm.data(), ikm.size());
    OPENSSL_cleanse(ecdh_secret.data(), ecdh_secret.size());
    return out;
}

// A delivery's encryption: a fresh ephemeral key and salt.
inline bytes encrypt(std::string_view plaintext, const subscription_keys& ua) {
    pkey_ptr as_key = generate_p256();
    return encrypt(plaintext, ua, as_key.get(), random_bytes(16));
}

// ---------------------------------------------------------------------------------------------
// RFC 8292 VAPID

// The raw 64-octet ES256 signature (r || s, RFC 7518 section 3.4) of `input`.
inline bytes es256_sign(EVP_PKEY* key, std::string_view input) {
    std::unique_ptr<EVP_MD_CTX, md_ctx_free> md(EVP_MD_CTX_new());
    size_t len = 0;
    if (!md || EVP_DigestSignInit(md.get(), nullptr, EVP_sha256(), nullptr, key) != 1 ||
        EVP_DigestSign(md.get(), nullptr, &len, reinterpret_cast<const unsigned char*>(input.data()), input.size()) !=
            1)
        fail("ES256 signing failed");
    bytes der(len);
    if (EVP_DigestSign(md.get(), der.data(), &len, reinterpret_cast<const unsigned char*>(input.data()),
                       input.size()) != 1)
        fail("ES256 signing failed");
    const unsigned char* p = der.data();
    std::unique_ptr<ECDSA_SIG, decltype(&ECDSA_SIG_free)> sig(d2i_ECDSA_SIG(nullptr, &p, static_cast<long>(len)),
                                                              &ECDSA_SIG_free);
    if (!sig) fail("ES256 signature decoding failed");
    bytes raw(64);
    if (BN_bn2binpad(ECDSA_SIG_get0_r(sig.get()), raw.data(), 32) != 32 ||
        BN_bn2binpad(ECDSA_SIG_get0_s(sig.get()), raw.data() + 32, 32) != 32)
        fail("ES256 signature encoding failed");
    return raw;
}

// The application server's VAPID identity: its signing key and its public key as base64url.
class vapid {
public:
    vapid(pkey_ptr key, std::string subject) : key_(std::move(key)), subject_(std::move(subject)) {
        public_b64_ = b64url(public_point(key_.get()));
    }

    const std::string& public_key() const noexcept { return public_b64_; }

    // "vapid t=<JWT>, k=<public key>" for a push service at `audience` (the origin of the push
    // endpoint, "https://push.example.net"), valid until `expires` (unix seconds; at most 24 h
    // ahead, RFC 8292 section 2).
    std::string authorization(const std::string& audience, int64_t expires) const {
        nlohmann::ordered_json claims = {{"aud", audience}, {"exp", expires}, {"sub", subject_}};
        std::string input = b64url(std::string_view(R"({"typ":"JWT","alg":"ES256"})")) + "." +
                            b64url(claims.dump(-1, ' ', false, nlohmann::json::error_handler_t::replace));
        std::string jwt = input + "." + b64url(es256_sign(key_.get(), input));
        return "vapid t=" + jwt + ", k=" + public_b64_;
    }

private:
    pkey_ptr key_;
    std::string subject_;
    std::string public_b64_;
};

}  // namespace evmesh::channels::webpush
