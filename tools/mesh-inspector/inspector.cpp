#include "inspector.hpp"

#include <fcntl.h>
#include <unistd.h>
#include <zmq.h>

#include <cerrno>
#include <cstring>
#include <fstream>
#include <thread>

#include <toml++/toml.h>

#include <msgpack.hpp>

#include <evmesh/codec.hpp>

namespace evmesh::inspector {

std::unique_ptr<node> join_mesh(const mesh_options& o) {
    node_options n;
    n.name = "mesh-inspector-" + std::to_string(getpid());
    n.mesh = o.mesh;
    n.observer = true;
    n.stats_interval = std::chrono::milliseconds(0);
    n.discovery.port = static_cast<std::uint16_t>(o.beacon_port);
    n.discovery.scope = o.scope == "lan" ? discovery_scope::lan : discovery_scope::host;
    n.discovery.broadcast_address = o.broadcast_address;
    n.discovery.interface_address = o.interface_address;
    n.discovery.seeds = o.seeds;
    n.discovery.broadcast = !o.no_broadcast;
    if (o.scope == "lan" && !o.interface_address.empty()) {
        n.mesh_bind_address = o.interface_address;
    }
    if (!o.key_file.empty() || !o.mesh_secret_file.empty()) {
        // an observer of a secured mesh: its key must be on the nodes' allow-lists; it trusts
        // every node whose beacon is authenticated with the mesh secret
        n.security.enabled = true;
        n.security.trust_authenticated_beacons = true;
        try {
            auto keys = toml::parse_file(o.key_file);
            n.security.public_key = keys["public"].value_or(std::string());
            n.security.secret_key = keys["secret"].value_or(std::string());
        } catch (const std::exception& e) {
            std::fprintf(stderr, "mesh-inspector: cannot read key file '%s': %s\n", o.key_file.c_str(), e.what());
            return nullptr;
        }
        std::ifstream f(o.mesh_secret_file);
        std::getline(f, n.security.mesh_secret);
    }
    auto r = node::create(n);
    if (!r) {
        std::fprintf(stderr, "mesh-inspector: cannot join mesh '%s': %s\n", o.mesh.c_str(),
                     last_error_message().empty() ? r.error().message().c_str()
                                                  : last_error_message().c_str());
        return nullptr;
    }
    return std::move(*r);
}

int run_keygen(const std::string& path) {
    char pub[41] = {}, sec[41] = {};
    if (zmq_curve_keypair(pub, sec) != 0) {
        std::fprintf(stderr, "mesh-inspector: this libzmq has no CURVE support\n");
        return exit_usage;
    }
    const auto key_path = path + ".key";
    const auto pub_path = path + ".pub";
    const int fd = ::open(key_path.c_str(), O_WRONLY | O_CREAT | O_EXCL, 0600);
    if (fd < 0) {
        std::fprintf(stderr, "mesh-inspector: cannot create '%s': %s\n", key_path.c_str(), std::strerror(errno));
        return exit_usage;
    }
    const std::string key_text = "# evmesh CURVE key pair: keep this file private (mode 0600)\npublic = \""
                                 + std::string(pub) + "\"\nsecret = \"" + std::string(sec) + "\"\n";
    const bool ok = ::write(fd, key_text.data(), key_text.size()) == static_cast<ssize_t>(key_text.size());
    ::close(fd);
    std::ofstream p(pub_path, std::ios::trunc);
    p << pub << "  # " << path << "\n";
    if (!ok || !p.flush()) {
        std::fprintf(stderr, "mesh-inspector: cannot write the key files\n");
        return exit_usage;
    }
    std::printf("%s\n", pub);
    std::fprintf(stderr, "wrote %s (secret, 0600) and %s (public: add it to the allow-lists)\n",
                 key_path.c_str(), pub_path.c_str());
    return exit_ok;
}

namespace {
subscription subscribe_stats(node& n,
                             std::mutex& mu, std::map<std::string, json>& latest,
                             std::map<std::string, std::chrono::steady_clock::time_point>& seen) {
    auto s = n.subscribe("_evmesh.stats.>", [&mu, &latest, &seen](const event_view& ev) {
        try {
            auto j = msgpack_to_json(ev.payload);
            if (!j.is_object() || !j.contains("id")) {
                return;
            }
            j["received_at_ns"] = now_ns();
            std::lock_guard lock(mu);
            const auto id = j["id"].get<std::string>();
            latest[id] = std::move(j);
            seen[id] = std::chrono::steady_clock::now();
        } catch (const std::exception&) {
            // a malformed stats event is ignored; the node's next one replaces it
        }
    });
    if (!s) {
        throw std::runtime_error("cannot subscribe to stats");
    }
    return std::move(*s);
}
}  // namespace

stats_collector::stats_collector(node& n) : sub_(subscribe_stats(n, mu_, latest_, seen_)) {}

std::map<std::string, json> stats_collector::latest() const {
    std::lock_guard lock(mu_);
    return latest_;
}

std::map<std::string, std::chrono::steady_clock::time_point> stats_collector::seen() const {
    std::lock_guard lock(mu_);
    return seen_;
}

void stats_collector::wait_for_all(node& n, std::chrono::milliseconds timeout) const {
    const auto deadline = std::chrono::steady_clock::now() + timeout;
    // discovery first: beacons of everyone arrive within one interval (800 ms by default)
    const auto settle = std::chrono::steady_clock::now() + std::min(timeout, std::chrono::milliseconds(900));
    while (std::chrono::steady_clock::now() < deadline) {
        if (std::chrono::steady_clock::now() >= settle) {
            bool all = true;
            const auto peers = n.peers();
            std::lock_guard lock(mu_);
            for (const auto& p : peers) {
                if (!p.observer && latest_.count(p.id) == 0) {
                    all = false;
                }
            }
            if (all && !peers.empty()) {
                return;
            }
        }
        std::this_thread::sleep_for(std::chrono::milliseconds(20));
    }
}

namespace {
json object_to_json(const msgpack::object& o, int depth) {
    if (depth > 32) {
        throw std::runtime_error("nesting too deep");
    }
    switch (o.type) {
        case msgpack::type::NIL: return nullptr;
        case msgpack::type::BOOLEAN: return o.via.boolean;
        case msgpack::type::POSITIVE_INTEGER: return o.via.u64;
        case msgpack::type::NEGATIVE_INTEGER: return o.via.i64;
        case msgpack::type::FLOAT32:
        case msgpack::type::FLOAT64: return o.via.f64;
        case msgpack::type::STR: return std::string(o.via.str.ptr, o.via.str.size);
        case msgpack::type::BIN: {
            static const char* hex = "0123456789abcdef";
            std::string s;
            for (std::uint32_t i = 0; i < o.via.bin.size; ++i) {
                const auto c = static_cast<unsigned char>(o.via.bin.ptr[i]);
                s += hex[c >> 4];
                s += hex[c & 15];
            }
            return s;
        }
        case msgpack::type::ARRAY: {
            json a = json::array();
            for (std::uint32_t i = 0; i < o.via.array.size; ++i) {
                a.push_back(object_to_json(o.via.array.ptr[i], depth + 1));
            }
            return a;
        }
        case msgpack::type::MAP: {
            json m = json::object();
            for (std::uint32_t i = 0; i < o.via.map.size; ++i) {
                const auto& k = o.via.map.ptr[i].key;
                const std::string key = k.type == msgpack::type::STR
                                            ? std::string(k.via.str.ptr, k.via.str.size)
                                            : object_to_json(k, depth + 1).dump();
                m[key] = object_to_json(o.via.map.ptr[i].val, depth + 1);
            }
            return m;
        }
        default: return "<ext>";
    }
}
}  // namespace

json msgpack_to_json(std::string_view bytes) {
    // bounded: the limits keep a hostile payload from allocating without bound
    const msgpack::unpack_limit limit(4096, 4096, 1 << 20, 1 << 20, 1 << 20, 32);
    std::size_t off = 0;
    auto oh = msgpack::unpack(bytes.data(), bytes.size(), off, nullptr, nullptr, limit);
    if (off != bytes.size()) {
        throw std::runtime_error("trailing bytes after the msgpack value");
    }
    return object_to_json(oh.get(), 0);
}

json event_to_json(const event_view& ev) {
    json j;
    j["topic"] = std::string(ev.topic);
    j["id"] = to_string(ev.id);
    j["source"] = std::string(ev.source);
    j["time_ns"] = ev.time_ns;
    j["seq"] = ev.seq;
    j["content_type"] = std::string(ev.content_type);
    json headers = json::object();
    ev.for_each_header([&](std::string_view k, std::string_view v) { headers[std::string(k)] = std::string(v); });
    j["headers"] = headers;
    const auto ct = ev.content_type;
    const auto p = ev.payload;
    try {
        if (ct.find("msgpack") != std::string_view::npos) {
            j["payload"] = msgpack_to_json(p);
            return j;
        }
        if (ct.find("json") != std::string_view::npos) {
            j["payload"] = json::parse(p);
            return j;
        }
    } catch (const std::exception&) {
        // fall through to text or hex
    }
    bool text = true;
    for (unsigned char c : p) {
        if (c < 0x20 && c != '\n' && c != '\r' && c != '\t') {
            text = false;
            break;
        }
    }
    if (text) {
        try {
            const json t = std::string(p);
            (void)t.dump();  // throws on invalid UTF-8
            j["payload"] = t;
            return j;
        } catch (const std::exception&) {
        }
    }
    static const char* hex = "0123456789abcdef";
    std::string h;
    for (unsigned char c : p) {
        h += hex[c >> 4];
        h += hex[c & 15];
    }
    j["payload_hex"] = h;
    j.erase("payload");
    return j;
}

double histogram_percentile(const json& lat, double q) {
    if (!lat.is_object() || !lat.contains("counts") || !lat.contains("bounds")) {
        return 0;
    }
    const auto& counts = lat["counts"];
    const auto& bounds = lat["bounds"];
    std::uint64_t total = 0;
    for (const auto& c : counts) {
        total += c.get<std::uint64_t>();
    }
    if (total == 0) {
        return 0;
    }
    const auto target = static_cast<std::uint64_t>(q * static_cast<double>(total) + 0.5);
    std::uint64_t acc = 0;
    for (std::size_t i = 0; i < counts.size(); ++i) {
        acc += counts[i].get<std::uint64_t>();
        if (acc >= std::max<std::uint64_t>(target, 1)) {
            return i < bounds.size() ? bounds[i].get<double>() : bounds.back().get<double>() * 2;
        }
    }
    return bounds.back().get<double>() * 2;
}

std::string human_duration_ms(std::uint64_t ms) {
    char buf[32];
    if (ms < 60'000) {
        std::snprintf(buf, sizeof(buf), "%.1fs", static_cast<double>(ms) / 1000);
    } else if (ms < 3'600'000) {
        std::snprintf(buf, sizeof(buf), "%llum%02llus", static_cast<unsigned long long>(ms / 60000),
                      static_cast<unsigned long long>(ms / 1000 % 60));
    } else {
        std::snprintf(buf, sizeof(buf), "%lluh%02llum", static_cast<unsigned long long>(ms / 3600000),
                      static_cast<unsigned long long>(ms / 60000 % 60));
    }
    return buf;
}

std::string human_rate(double r) {
    char buf[32];
    if (r >= 1e6) {
        std::snprintf(buf, sizeof(buf), "%.2fM/s", r / 1e6);
    } else if (r >= 1e3) {
        std::snprintf(buf, sizeof(buf), "%.1fk/s", r / 1e3);
    } else {
        std::snprintf(buf, sizeof(buf), "%.1f/s", r);
    }
    return buf;
}

}  // namespace evmesh::inspector
