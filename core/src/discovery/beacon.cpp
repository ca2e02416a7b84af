#include "discovery/beacon.hpp"

#include <cstring>

#include <msgpack.hpp>
#include <sodium.h>

#include "codec/msgpack_reader.hpp"
#include "codec/msgpack_writer.hpp"
#include "codec/utf8.hpp"

namespace evmesh::discovery {
namespace {

using codec::string_writer;

constexpr std::uint32_t beacon_elements = 9;
constexpr std::size_t max_field = 255;

}  // namespace

std::string mesh_key(std::string_view mesh_secret) {
    std::string key(crypto_hash_sha256_BYTES, '\0');
    crypto_hash_sha256(reinterpret_cast<unsigned char*>(key.data()),
                       reinterpret_cast<const unsigned char*>(mesh_secret.data()), mesh_secret.size());
    return key;
}

namespace {
std::string hmac(const std::string& key, std::string_view data) {
    std::string mac(crypto_auth_hmacsha256_BYTES, '\0');
    crypto_auth_hmacsha256_state st;
    crypto_auth_hmacsha256_init(&st, reinterpret_cast<const unsigned char*>(key.data()), key.size());
    crypto_auth_hmacsha256_update(&st, reinterpret_cast<const unsigned char*>(data.data()), data.size());
    crypto_auth_hmacsha256_final(&st, reinterpret_cast<unsigned char*>(mac.data()));
    return mac;
}
}  // namespace

bool verify_beacon(const beacon& b, std::string_view datagram, const std::string& key) {
    if (b.mac.size() != crypto_auth_hmacsha256_BYTES || b.signed_bytes == 0
        || b.signed_bytes > datagram.size()) {
        return false;
    }
    const auto expected = hmac(key, datagram.substr(0, b.signed_bytes));
    return sodium_memcmp(expected.data(), b.mac.data(), expected.size()) == 0;
}

std::string encode_beacon(const beacon& b, const std::string& key) {
    std::string out(beacon_magic);
    string_writer w{out};
    msgpack::packer<string_writer> pk(w);
    const bool secured = !key.empty();
    pk.pack_array(beacon_elements + (secured ? 4 : 1));
    pk.pack_uint8(beacon_version);
    pk.pack_uint8(static_cast<std::uint8_t>(b.kind));
    pk.pack(b.mesh);
    pk.pack_bin(16);
    pk.pack_bin_body(reinterpret_cast<const char*>(b.node_id.data()), 16);
    pk.pack(b.name);
    pk.pack_uint64(b.incarnation);
    pk.pack(b.mesh_host);
    pk.pack_uint16(b.mesh_port);
    pk.pack_array(static_cast<std::uint32_t>(b.gossip.size()));
    for (const auto& g : b.gossip) {
        pk.pack(g);
    }
    pk.pack_uint64(b.flags);
    if (secured) {
        pk.pack_bin(static_cast<std::uint32_t>(b.public_key.size()));
        pk.pack_bin_body(b.public_key.data(), static_cast<std::uint32_t>(b.public_key.size()));
        pk.pack_uint64(b.time_ms);
        const auto mac = hmac(key, out);  // covers everything before the MAC element
        pk.pack_bin(static_cast<std::uint32_t>(mac.size()));
        pk.pack_bin_body(mac.data(), static_cast<std::uint32_t>(mac.size()));
    }
    return out;
}

result<beacon> decode_beacon(std::string_view bytes) {
    if (bytes.size() > max_beacon_bytes || bytes.substr(0, 4) != beacon_magic) {
        return fail(errc::bad_beacon);
    }
    codec::msgpack_reader r(bytes.substr(4));
    auto bad = [](errc e) {
        return fail(e == errc::unsupported_version ? e : errc::bad_beacon);
    };
    std::uint32_t n = 0;
    if (auto e = r.read_array_header(n); e != errc::ok || n < beacon_elements) {
        return bad(errc::bad_beacon);
    }
    std::uint64_t version = 0, kind = 0, inc = 0, port = 0;
    if (r.read_uint(version) != errc::ok) {
        return bad(errc::bad_beacon);
    }
    if (version != beacon_version) {
        return bad(errc::unsupported_version);
    }
    beacon b;
    std::string_view mesh, id, name, host;
    if (r.read_uint(kind) != errc::ok || (kind != 1 && kind != 2)
        || r.read_str(mesh, max_field) != errc::ok || r.read_bin(id, 16) != errc::ok
        || id.size() != 16 || r.read_str(name, max_field) != errc::ok
        || r.read_uint(inc) != errc::ok || r.read_str(host, max_field) != errc::ok
        || r.read_uint(port) != errc::ok || port > 65535) {
        return bad(errc::bad_beacon);
    }
    if (mesh.empty() || !codec::valid_utf8(mesh) || !codec::valid_utf8(name)
        || !codec::valid_utf8(host)) {
        return bad(errc::bad_beacon);
    }
    std::uint32_t gossip_n = 0;
    if (r.read_array_header(gossip_n) != errc::ok || gossip_n > max_gossip) {
        return bad(errc::bad_beacon);
    }
    for (std::uint32_t i = 0; i < gossip_n; ++i) {
        std::string_view g;
        if (r.read_str(g, 64) != errc::ok || !codec::valid_utf8(g)) {
            return bad(errc::bad_beacon);
        }
        b.gossip.emplace_back(g);
    }
    if (n > beacon_elements && r.read_uint(b.flags) != errc::ok) {
        return bad(errc::bad_beacon);
    }
    if (n >= beacon_elements + 4) {  // security fields
        std::string_view pub, mac;
        if (r.read_bin(pub, 32) != errc::ok || pub.size() != 32 || r.read_uint(b.time_ms) != errc::ok) {
            return bad(errc::bad_beacon);
        }
        b.signed_bytes = 4 + static_cast<std::size_t>(r.position() - (bytes.data() + 4));
        if (r.read_bin(mac, 32) != errc::ok || mac.size() != 32) {
            return bad(errc::bad_beacon);
        }
        b.public_key = std::string(pub);
        b.mac = std::string(mac);
    }
    for (std::uint32_t i = n >= beacon_elements + 4 ? beacon_elements + 4 : beacon_elements + 1; i < n; ++i) {
        if (r.skip(8) != errc::ok) {
            return bad(errc::bad_beacon);
        }
    }
    if (!r.at_end()) {
        return bad(errc::bad_beacon);
    }
    b.kind = static_cast<beacon_kind>(kind);
    b.mesh = std::string(mesh);
    std::memcpy(b.node_id.data(), id.data(), 16);
    b.name = std::string(name);
    b.incarnation = inc;
    b.mesh_host = std::string(host);
    b.mesh_port = static_cast<std::uint16_t>(port);
    return b;
}

}  // namespace evmesh::discovery
