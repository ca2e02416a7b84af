// Mesh security on the node's I/O thread: keys, the allow-list (reloaded when its file changes)
// and the ZAP handler that checks every incoming mesh connection (docs/SECURITY.md).
#include <sys/stat.h>

#include <array>
#include <cstring>
#include <fstream>

#include "discovery/beacon.hpp"
#include "reactor/node_impl.hpp"
#include "util/log.hpp"
#include "util/z85.hpp"

namespace evmesh::detail {

result<void> node_impl::setup_security() {
    const auto& s = opt.security;
    if (!s.enabled) {
        return {};  // the warning is logged once the node has started (create)
    }
    if (zmq_has("curve") == 0) {
        set_last_error_message("this libzmq has no CURVE support");
        return fail(errc::bad_option);
    }
    auto pub = z85_key(s.public_key);
    auto sec = z85_key(s.secret_key);
    if (!pub || !sec) {
        set_last_error_message("security: public and secret key must be 40-character Z85 CURVE keys "
                               "(mesh-inspector keygen makes a pair)");
        return fail(errc::bad_option);
    }
    std::array<char, 41> derived{};
    if (zmq_curve_public(derived.data(), s.secret_key.c_str()) != 0 || s.public_key != derived.data()) {
        set_last_error_message("security: the public key does not belong to the secret key");
        return fail(errc::bad_option);
    }
    if (s.mesh_secret.size() < 16) {
        set_last_error_message("security: the mesh secret must be at least 16 characters");
        return fail(errc::bad_option);
    }
    curve_public_ = *pub;
    curve_secret_ = *sec;
    mesh_key_ = discovery::mesh_key(s.mesh_secret);
    for (const auto& k : s.allowed_keys) {
        auto b = z85_key(k);
        if (!b) {
            set_last_error_message("security: allowed key '" + k + "' is not a Z85 CURVE key");
            return fail(errc::bad_option);
        }
        allowed_static_.insert(*b);
    }
    allowed_static_.insert(curve_public_);  // a node always trusts itself
    allowed_ = allowed_static_;
    secure_ = true;
    if (!s.allow_file.empty()) {
        struct stat st {};
        if (::stat(s.allow_file.c_str(), &st) != 0) {
            set_last_error_message("security: cannot read allow file '" + s.allow_file + "'");
            return fail(errc::bad_option);
        }
        reload_allow_file(true);
    }
    return {};
}

bool node_impl::replace_allow_list(std::set<std::string> keys, const std::vector<std::string>& inline_keys,
                                   const std::string& allow_file) {
    if (!secure_) {
        return false;
    }
    keys.insert(curve_public_);  // a node always trusts itself
    keys.insert(allowed_learned_.begin(), allowed_learned_.end());  // learned from beacons: kept
    allowed_static_ = keys;
    allowed_ = std::move(keys);
    opt.security.allowed_keys = inline_keys;
    opt.security.allow_file = allow_file;
    reload_allow_file(true);
    revoke_disallowed();  // also without an allow file: in effect when set_allow_list returns
    return true;
}

void node_impl::revoke_disallowed() {
    // a peer whose key was removed is dropped (its next beacon is refused)
    std::vector<std::string> revoked;
    for (const auto& [k, p] : peers_.peers()) {
        if (!p.curve_key.empty() && allowed_.count(p.curve_key) == 0) {
            revoked.push_back(k);
        }
    }
    for (const auto& k : revoked) {
        remove_peer(k, "key removed from the allow-list");
    }
}

void node_impl::reload_allow_file(bool initial) {
    const auto& path = opt.security.allow_file;
    if (path.empty()) {
        return;
    }
    struct stat st {};
    if (::stat(path.c_str(), &st) != 0) {
        return;  // keep the last good list while the file is being replaced
    }
    const auto mtime = static_cast<std::int64_t>(st.st_mtim.tv_sec) * 1'000'000'000 + st.st_mtim.tv_nsec;
    if (!initial && mtime == allow_mtime_ns_) {
        return;
    }
    allow_mtime_ns_ = mtime;
    std::ifstream f(path);
    std::set<std::string> keys = allowed_static_;
    std::string line;
    int lineno = 0, bad = 0;
    while (std::getline(f, line)) {
        ++lineno;
        // Z85 uses '#' but never white space: the first token is the key, the rest a comment
        const auto b = line.find_first_not_of(" \t\r");
        if (b == std::string::npos) {
            continue;
        }
        const auto e = line.find_first_of(" \t\r", b);
        const auto token = line.substr(b, e == std::string::npos ? std::string::npos : e - b);
        if (auto k = z85_key(token)) {
            keys.insert(*k);
        } else if (token[0] == '#') {
            continue;  // a comment line
        } else {
            ++bad;
            log()->warn("evmesh node '{}': allow file {} line {}: not a Z85 key, ignored", name, path, lineno);
        }
    }
    const bool changed = keys != allowed_;
    allowed_ = std::move(keys);
    if (changed || initial) {
        log()->info("evmesh node '{}': allow-list {}: {} keys{}", name, initial ? "loaded" : "reloaded",
                    allowed_.size(), bad != 0 ? " (some lines ignored)" : "");
    }
    revoke_disallowed();
}

void node_impl::on_zap() {
    // ZAP request (RFC 27): version, request id, domain, address, identity, mechanism, credentials
    for (int n = 0; n < 64; ++n) {
        std::array<std::string, 8> f;
        std::size_t count = 0;
        zmq_msg_t m;
        zmq_msg_init(&m);
        if (zmq_msg_recv(&m, zap_, ZMQ_DONTWAIT) < 0) {
            zmq_msg_close(&m);
            return;
        }
        while (true) {
            if (count < f.size()) {
                f[count] = std::string(static_cast<const char*>(zmq_msg_data(&m)), zmq_msg_size(&m));
            }
            ++count;
            if (!zmq_msg_more(&m)) {
                break;
            }
            zmq_msg_recv(&m, zap_, 0);
        }
        zmq_msg_close(&m);
        const bool curve = count >= 7 && f[5] == "CURVE" && f[6].size() == 32;
        const bool ok = curve && allowed_.count(f[6]) != 0;
        if (ok) {
            ++c.auth_accepted;
        } else {
            ++c.auth_rejected;
            std::uint64_t suppressed = 0;
            if (auth_log_.allow(suppressed)) {
                log()->warn("evmesh node '{}': refused mesh connection from {} (key {}): not on the "
                            "allow-list ({} similar suppressed)", name, f[3],
                            curve ? z85_text(f[6]) : std::string("none"), suppressed);
            }
        }
        const std::array<std::string, 6> reply = {
            "1.0", f[1], ok ? "200" : "400", ok ? "OK" : "key not on the allow-list",
            curve ? z85_text(f[6]) : std::string(), std::string()};
        for (std::size_t i = 0; i < reply.size(); ++i) {
            zmq_send(zap_, reply[i].data(), reply[i].size(), i + 1 < reply.size() ? ZMQ_SNDMORE : 0);
        }
    }
}

}  // namespace evmesh::detail
