// Discovery and links: beacons in and out, the peer table's answers applied to the mesh input
// (connect, reconnect, disconnect), and the link monitor (docs/ARCHITECTURE.md). I/O thread only.
#include <arpa/inet.h>
#include <netinet/in.h>
#include <sys/socket.h>
#include <unistd.h>

#include <algorithm>
#include <array>
#include <cerrno>
#include <cstring>

#include "discovery/beacon.hpp"
#include "reactor/node_impl.hpp"
#include "reactor/zmq_util.hpp"
#include "util/log.hpp"

namespace evmesh::detail {
namespace {
using clock = std::chrono::steady_clock;
}  // namespace

result<void> node_impl::open_discovery() {
    const auto& d = opt.discovery;
    if (!d.enabled || !opt.mesh_enabled) {
        return {};
    }
    const bool host = d.scope == discovery_scope::host;
    bool want_v6 = d.ipv6 || d.interface_address.find(':') != std::string::npos;
    for (const auto& s : d.seeds) {
        net_addr a;
        if (!net_addr::parse(s, a)) {
            set_last_error_message("discovery seed '" + s + "' is not ipv4:port or [ipv6]:port");
            return fail(errc::bad_option);
        }
        want_v6 = want_v6 || a.family() == AF_INET6;
        peers_.add_seed(a.text());
    }
    net_addr bcast;
    if (!net_addr::parse((host ? std::string("127.255.255.255") : d.broadcast_address) + ":1", bcast)
        || bcast.family() != AF_INET) {
        set_last_error_message("discovery broadcast address '" + d.broadcast_address
                               + "' is not ipv4");
        return fail(errc::bad_option);
    }
    udp_bcast_ = socket(AF_INET, SOCK_DGRAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
    udp_uni_ = socket(AF_INET, SOCK_DGRAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
    if (udp_bcast_ < 0 || udp_uni_ < 0) {
        return fail(errc::io_error);
    }
    const int one = 1;
    setsockopt(udp_bcast_, SOL_SOCKET, SO_REUSEADDR, &one, sizeof(one));
    // Host scope binds the loopback broadcast address itself: every process on this host gets
    // each beacon and nothing arrives from other interfaces. LAN scope needs INADDR_ANY to
    // receive subnet broadcasts.
    sockaddr_in any{};
    any.sin_family = AF_INET;
    any.sin_addr.s_addr = host ? reinterpret_cast<const sockaddr_in*>(&bcast.ss)->sin_addr.s_addr
                               : htonl(INADDR_ANY);
    any.sin_port = htons(d.port);
    if (::bind(udp_bcast_, reinterpret_cast<sockaddr*>(&any), sizeof(any)) != 0) {
        set_last_error_message("cannot bind discovery port " + std::to_string(d.port) + ": "
                               + std::strerror(errno));
        return fail(errc::bad_endpoint);
    }
    setsockopt(udp_uni_, SOL_SOCKET, SO_BROADCAST, &one, sizeof(one));
    const bool iface_v4 = !d.interface_address.empty() && d.interface_address.find(':') == std::string::npos;
    const std::string local = host ? "127.0.0.1" : (iface_v4 ? d.interface_address : "0.0.0.0");
    net_addr uni;
    if (!net_addr::parse(local + ":1", uni)) {
        set_last_error_message("cannot bind discovery socket to '" + local + "'");
        return fail(errc::bad_endpoint);
    }
    reinterpret_cast<sockaddr_in*>(&uni.ss)->sin_port = 0;
    if (::bind(udp_uni_, uni.sa(), uni.len) != 0) {
        set_last_error_message("cannot bind discovery socket to '" + local + "'");
        return fail(errc::bad_endpoint);
    }
    uni.len = sizeof(uni.ss);
    getsockname(udp_uni_, uni.sa(), &uni.len);
    uni_address_ = uni.text();
    if (!want_v6) {
        return {};
    }
    if (host) {
        set_last_error_message("IPv6 discovery (an IPv6 seed or interface, or discovery.ipv6) needs "
                               "scope lan");
        return fail(errc::bad_option);
    }
    // IPv6: the shared port (IPv6 seeds address it) and this node's own socket. V6ONLY, so the
    // IPv4 sockets above keep IPv4.
    udp6_shared_ = socket(AF_INET6, SOCK_DGRAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
    udp6_uni_ = socket(AF_INET6, SOCK_DGRAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
    if (udp6_shared_ < 0 || udp6_uni_ < 0) {
        set_last_error_message(std::string("cannot open an IPv6 discovery socket: ") + std::strerror(errno));
        return fail(errc::bad_endpoint);
    }
    for (int fd : {udp6_shared_, udp6_uni_}) {
        setsockopt(fd, IPPROTO_IPV6, IPV6_V6ONLY, &one, sizeof(one));
    }
    setsockopt(udp6_shared_, SOL_SOCKET, SO_REUSEADDR, &one, sizeof(one));
    sockaddr_in6 any6{};
    any6.sin6_family = AF_INET6;
    any6.sin6_addr = in6addr_any;
    any6.sin6_port = htons(d.port);
    if (::bind(udp6_shared_, reinterpret_cast<sockaddr*>(&any6), sizeof(any6)) != 0) {
        set_last_error_message("cannot bind IPv6 discovery port " + std::to_string(d.port) + ": "
                               + std::strerror(errno));
        return fail(errc::bad_endpoint);
    }
    sockaddr_in6 uni6{};
    uni6.sin6_family = AF_INET6;
    uni6.sin6_addr = in6addr_any;
    if (!iface_v4 && !d.interface_address.empty()
        && inet_pton(AF_INET6, d.interface_address.c_str(), &uni6.sin6_addr) != 1) {
        set_last_error_message("discovery interface address '" + d.interface_address + "' is not an IP address");
        return fail(errc::bad_option);
    }
    if (::bind(udp6_uni_, reinterpret_cast<sockaddr*>(&uni6), sizeof(uni6)) != 0) {
        set_last_error_message("cannot bind IPv6 discovery socket: " + std::string(std::strerror(errno)));
        return fail(errc::bad_endpoint);
    }
    net_addr u6;
    u6.len = sizeof(u6.ss);
    getsockname(udp6_uni_, u6.sa(), &u6.len);
    uni6_address_ = u6.text();
    return {};
}

void node_impl::send_beacon_to(const std::string& bytes, const net_addr& to) {
    const int fd = to.family() == AF_INET6 ? udp6_uni_ : udp_uni_;
    if (fd >= 0 && sendto(fd, bytes.data(), bytes.size(), 0, to.sa(), to.len) >= 0) {
        ++c.beacons_sent;
    }
}

std::string node_impl::make_beacon(bool goodbye) {
    const auto& d = opt.discovery;
    discovery::beacon b;
    b.kind = goodbye ? discovery::beacon_kind::goodbye : discovery::beacon_kind::hello;
    b.mesh = opt.mesh;
    b.node_id = id;
    b.name = name;
    b.incarnation = incarnation;
    b.mesh_host = opt.mesh_advertise_address;
    b.flags = (opt.observer ? discovery::beacon_flag_observer : 0) | discovery::beacon_flag_mesh_v2;
    const auto colon = mesh_ep.rfind(':');
    b.mesh_port = static_cast<std::uint16_t>(std::stoi(mesh_ep.substr(colon + 1)));
    const bool gossip = !d.broadcast || !d.seeds.empty();
    if (gossip) {
        // the peers we heard from most recently: a live view, not a growing list
        std::vector<const discovery::peer_record*> live;
        for (const auto& [k, p] : peers_.peers()) {
            if (!p.info.beacon_address.empty()) {
                live.push_back(&p);
            }
        }
        std::sort(live.begin(), live.end(), [](const auto* x, const auto* y) {
            return x->last_seen_steady > y->last_seen_steady;
        });
        for (const auto* p : live) {
            if (b.gossip.size() >= discovery::max_gossip) {
                break;
            }
            b.gossip.push_back(p->info.beacon_address);
        }
    }
    if (secure_) {
        b.public_key = curve_public_;
        b.time_ms = static_cast<std::uint64_t>(now_ns() / 1'000'000);
    }
    return discovery::encode_beacon(b, secure_ ? mesh_key_ : std::string());
}

void node_impl::send_beacon(bool goodbye) {
    const auto& d = opt.discovery;
    const auto bytes = make_beacon(goodbye);
    if (d.broadcast) {
        net_addr a;
        if (net_addr::parse((d.scope == discovery_scope::host ? std::string("127.255.255.255")
                                                              : d.broadcast_address)
                                + ":" + std::to_string(d.port),
                            a)) {
            send_beacon_to(bytes, a);
        }
    }
    auto targets = peers_.targets(clock::now());
    for (const auto& t : targets) {
        net_addr a;
        if (net_addr::parse(t, a)) {
            send_beacon_to(bytes, a);
        }
    }
    if (!d.broadcast) {
        for (const auto& [k, p] : peers_.peers()) {
            if (std::find(targets.begin(), targets.end(), p.info.beacon_address) == targets.end()) {
                net_addr a;
                if (net_addr::parse(p.info.beacon_address, a)) {
                    send_beacon_to(bytes, a);
                }
            }
        }
    }
}

void node_impl::on_datagrams(int fd) {
    std::array<char, 2048> buf{};
    const auto now = clock::now();
    for (int i = 0; i < 256; ++i) {
        net_addr from;
        from.len = sizeof(from.ss);
        const auto n = recvfrom(fd, buf.data(), buf.size(), 0, from.sa(), &from.len);
        if (n < 0) {
            return;
        }
        auto reject = [&](const std::string& why) {
            ++c.beacons_rejected;
            std::uint64_t suppressed = 0;
            if (beacon_log_.allow(suppressed)) {
                detail::log()->warn("evmesh node '{}': rejected datagram from {}: {} ({} suppressed)",
                             name, from.text(), why, suppressed);
            }
        };
        if (opt.discovery.scope == discovery_scope::host && !from.loopback()) {
            reject("sender is not on this host (scope host)");
            continue;
        }
        auto b = discovery::decode_beacon(std::string_view(buf.data(), static_cast<std::size_t>(n)));
        if (!b) {
            reject(b.error().message());
            continue;
        }
        if (b->node_id == id) {
            continue;  // our own broadcast
        }
        if (b->mesh != opt.mesh) {
            ++c.beacons_foreign;
            continue;
        }
        const std::string key(reinterpret_cast<const char*>(b->node_id.data()), 16);
        if (secure_) {
            const std::string_view datagram(buf.data(), static_cast<std::size_t>(n));
            if (b->mac.empty() || !discovery::verify_beacon(*b, datagram, mesh_key_)) {
                ++c.beacons_unauthenticated;
                reject("not authenticated with this mesh's secret (forged or tampered)");
                continue;
            }
            const auto now_ms = static_cast<std::uint64_t>(now_ns() / 1'000'000);
            const auto max_age = static_cast<std::uint64_t>(opt.security.beacon_max_age.count());
            auto& last = beacon_last_ms_[key];
            if (b->time_ms + max_age < now_ms || b->time_ms > now_ms + max_age || b->time_ms <= last) {
                ++c.beacons_replayed;
                reject("replayed or stale (timestamp)");
                continue;
            }
            last = b->time_ms;
            if (beacon_last_ms_.size() > 4096) {
                beacon_last_ms_.clear();  // bounded; timestamps still have to be fresh
            }
            if (opt.security.trust_authenticated_beacons && allowed_.size() < 4096) {
                allowed_.insert(b->public_key);
                allowed_static_.insert(b->public_key);
                allowed_learned_.insert(b->public_key);
            }
            if (allowed_.count(b->public_key) == 0) {
                ++c.peers_not_allowed;
                std::uint64_t suppressed = 0;
                if (auth_log_.allow(suppressed)) {
                    detail::log()->warn("evmesh node '{}': node '{}' at {} is not on the allow-list "
                                        "({} similar suppressed)", name, b->name, from.text(), suppressed);
                }
                if (peers_.find(key) != nullptr) {
                    remove_peer(key, "key no longer allowed");
                }
                continue;
            }
        }
        ++c.beacons_received;
        if (b->kind == discovery::beacon_kind::goodbye) {
            if (peers_.find(key) != nullptr) {
                ++c.peers_left;
                remove_peer(key, "said goodbye");
            }
            continue;
        }
        if ((b->flags & discovery::beacon_flag_mesh_v2) == 0) {
            ++c.peers_incompatible;
            std::uint64_t suppressed = 0;
            if (compat_log_.allow(suppressed)) {
                detail::log()->warn("evmesh node '{}': node '{}' at {} speaks an older mesh protocol "
                                    "(two-frame events); not connecting. Upgrade it ({} similar "
                                    "suppressed)", name, b->name, from.text(), suppressed);
            }
            continue;
        }
        if (b->mesh_port == 0) {
            continue;
        }
        const std::string host = b->mesh_host.empty() ? from.host() : b->mesh_host;
        const std::string endpoint = "tcp://" + endpoint_host(host) + ":" + std::to_string(b->mesh_port);
        const std::string src = from.text();
        const bool shared = fd == udp_bcast_ || fd == udp6_shared_;
        const auto out = peers_.on_hello(key, *b, endpoint, src, shared, now);
        using k = discovery::hello_outcome::kind;
        bool reply = false;
        switch (out.what) {
            case k::refused_full:
            case k::refused_rate:
                ++c.peers_refused;
                reject(out.what == k::refused_full ? "peer table full (max_peers)"
                                                   : "too many new peers per second (joins_per_second)");
                continue;
            case k::joined:
                ++c.peers_joined;
                link_connect(endpoint, b->public_key);
                reply = true;
                // observers (mesh-inspector) come and go often: keep them out of the info log
                detail::log()->log(out.peer->info.observer ? spdlog::level::debug : spdlog::level::info,
                                   "evmesh node '{}': peer '{}' joined at {}", name, b->name, endpoint);
                break;
            case k::replaced:
                ++c.peers_joined;
                ++c.peers_replaced;
                link_connect(endpoint, b->public_key);
                link_disconnect(out.old_endpoint);
                reply = true;
                detail::log()->info("evmesh node '{}': peer '{}' restarted: {} -> {}", name, b->name,
                                    out.old_endpoint, endpoint);
                break;
            case k::moved:
                detail::log()->info("evmesh node '{}': peer '{}' restarted or moved: {} -> {}", name,
                                    b->name, out.old_endpoint, endpoint);
                link_connect(endpoint, b->public_key);
                link_disconnect(out.old_endpoint);
                reply = true;
                break;
            case k::refreshed:
                break;
        }
        if (reply && shared) {
            // answer a newcomer directly so it does not wait for our next interval
            send_beacon_to(make_beacon(false), from);
        }
        for (const auto& g : b->gossip) {
            net_addr a;
            if (g != uni_address_ && g != uni6_address_ && net_addr::parse(g, a)
                && (a.family() == AF_INET || udp6_uni_ >= 0)) {
                peers_.learn(a.text(), now);
            }
        }
        c.peers = peers_.peers().size();
    }
}

void node_impl::link_connect(const std::string& endpoint, const std::string& curve_key) {
    // One connection per endpoint, however many peer entries name it (a node restarted on the
    // same port has an old and a new entry for a while): reference-counted, so the old entry's
    // removal never cuts the new one's link, and a second connect never doubles the events.
    auto& link = links_[endpoint];
    if (link.refs++ > 0) {
        if (!secure_ || link.curve_key == curve_key) {
            return;  // already connected (libzmq keeps reconnecting it)
        }
        // the node behind it has a new key: a new CURVE handshake is needed, at once (we are
        // between whole messages here)
        zmq_disconnect(mesh_in_, endpoint.c_str());
    }
    // a disconnect of the same endpoint still waiting would undo this connect
    disconnects_.erase(std::remove(disconnects_.begin(), disconnects_.end(), endpoint), disconnects_.end());
    if (secure_) {
        zmq_setsockopt(mesh_in_, ZMQ_CURVE_SERVERKEY, curve_key.data(), 32);
    }
    link.curve_key = curve_key;
    zmq_connect(mesh_in_, endpoint.c_str());
}

void node_impl::link_disconnect(const std::string& endpoint) {
    auto it = links_.find(endpoint);
    if (endpoint.empty() || it == links_.end()) {
        return;
    }
    if (--it->second.refs > 0) {
        return;  // another peer entry still uses this link
    }
    links_.erase(it);
    disconnects_.push_back(endpoint);
}

void node_impl::apply_disconnects() {
    // Called between whole messages only: libzmq 4.3 aborts (fq.cpp `!_more`) or blocks when a
    // pipe is terminated in the middle of a multi-part message. Mesh links carry one frame per
    // message, so between two receives there is never a partial message.
    for (const auto& ep : disconnects_) {
        zmq_disconnect(mesh_in_, ep.c_str());
    }
    disconnects_.clear();
}

void node_impl::on_monitor() {
    for (int i = 0; i < 64; ++i) {
        zmsg ev, addr;
        if (zmq_msg_recv(ev.get(), monitor_, ZMQ_DONTWAIT) < 0) {
            return;
        }
        std::uint16_t event = 0;
        if (ev.size() >= 2) {
            std::memcpy(&event, zmq_msg_data(ev.get()), 2);
        }
        std::string endpoint;
        if (more(monitor_) && zmq_msg_recv(addr.get(), monitor_, ZMQ_DONTWAIT) >= 0) {
            endpoint.assign(addr.view());
        }
        // With ZMQ_IPV6 on, libzmq names a reconnected IPv4 link by its mapped address
        // ("tcp://[::ffff:10.0.0.3]:port"): bring it back to the form the peer table uses.
        if (const auto at = endpoint.find("[::ffff:"); at != std::string::npos) {
            const auto close = endpoint.find(']', at);
            if (close != std::string::npos) {
                endpoint = endpoint.substr(0, at) + endpoint.substr(at + 8, close - at - 8)
                           + endpoint.substr(close + 1);
            }
        }
        detail::log()->debug("evmesh node '{}': link event {} on '{}'", name, event, endpoint);
        if (event == ZMQ_EVENT_CONNECTED) {
            if (peers_.set_link_state(endpoint, peer_info::link_state::connected)) {
                ++c.links_up;
            }
        } else if (event == ZMQ_EVENT_DISCONNECTED) {
            // The TCP link closed or heartbeats timed out. The peer stays known: libzmq
            // reconnects at its interval (100 ms), the subscriptions are re-sent on the new
            // connection, and repair (where on) recovers what the blip lost. A peer is removed
            // only by goodbye, expiry or revocation.
            if (peers_.set_link_state(endpoint, peer_info::link_state::connecting)) {
                ++c.links_down;
                ++c.peers_link_lost;
            }
        }
    }
}

void node_impl::expire_peers() {
    const auto now = clock::now();
    const auto stalls_before = peers_.stalls();
    for (auto& p : peers_.expire(now)) {
        ++c.peers_expired;
        detail::log()->log(p.info.observer ? spdlog::level::debug : spdlog::level::info,
                           "evmesh node '{}': peer '{}' removed: expired (no beacon)", name, p.info.name);
        link_disconnect(p.info.endpoint);
    }
    if (peers_.stalls() != stalls_before) {
        ++c.stalls;
        detail::log()->warn("evmesh node '{}': this node was stalled for longer than the expiry "
                            "window; peers get a fresh window instead of being expired", name);
    }
    // A peer whose beacons arrive but whose link stays down (firewall, wrong advertised address,
    // one-way partition) would otherwise sit in `connecting` unnoticed: log it once, gauge it.
    std::size_t stuck = 0;
    for (const auto* p : peers_.stuck_links(now, std::chrono::seconds(5), stuck)) {
        detail::log()->warn("evmesh node '{}': peer '{}' is alive (beacons arrive) but its mesh link to "
                            "{} has been down for 5 s: check that address and port from this host "
                            "(mesh_link.advertise, firewalls)", name, p->info.name, p->info.endpoint);
    }
    c.links_stuck = stuck;
    c.peers = peers_.peers().size();
    next_expiry_ = peers_.next_expiry(now);
}

void node_impl::remove_peer(const std::string& key, const char* why) {
    auto* p = peers_.find(key);
    if (p == nullptr) {
        return;
    }
    detail::log()->log(p->info.observer ? spdlog::level::debug : spdlog::level::info,
                       "evmesh node '{}': peer '{}' removed: {}", name, p->info.name, why);
    link_disconnect(peers_.remove(key));
    c.peers = peers_.peers().size();
}

}  // namespace evmesh::detail
