#include "reactor/node_impl.hpp"

#include <arpa/inet.h>
#include <netinet/in.h>
#include <grp.h>
#include <sys/eventfd.h>
#include <sys/stat.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <unistd.h>

#include <algorithm>
#include <array>
#include <cerrno>
#include <cstring>
#include <future>

#include "util/log.hpp"

#include <evmesh/codec.hpp>

#include "codec/envelope.hpp"
#include "discovery/beacon.hpp"
#include "util/z85.hpp"

namespace evmesh::detail {
namespace {

using evmesh::detail::set_last_error_message;
using clock = std::chrono::steady_clock;

bool more(void* s) {
    int m = 0;
    size_t len = sizeof(m);
    zmq_getsockopt(s, ZMQ_RCVMORE, &m, &len);
    return m != 0;
}

void drain_frames(void* s, zmq_msg_t& scratch) {
    while (more(s)) {
        zmq_msg_recv(&scratch, s, 0);
    }
}

std::string_view view(zmq_msg_t& m) {
    return {static_cast<const char*>(zmq_msg_data(&m)), zmq_msg_size(&m)};
}

int set_int(void* s, int opt, int v) {
    return zmq_setsockopt(s, opt, &v, sizeof(v));
}

std::string last_endpoint(void* s) {
    std::array<char, 256> buf{};
    size_t len = buf.size();
    zmq_getsockopt(s, ZMQ_LAST_ENDPOINT, buf.data(), &len);
    return std::string(buf.data());
}

std::string addr_text(const sockaddr_in& a) {
    std::array<char, INET_ADDRSTRLEN> buf{};
    inet_ntop(AF_INET, &a.sin_addr, buf.data(), buf.size());
    return std::string(buf.data()) + ":" + std::to_string(ntohs(a.sin_port));
}

bool parse_addr(const std::string& text, sockaddr_in& out) {
    const auto colon = text.rfind(':');
    if (colon == std::string::npos) {
        return false;
    }
    std::memset(&out, 0, sizeof(out));
    out.sin_family = AF_INET;
    const auto host = text.substr(0, colon);
    if (inet_pton(AF_INET, host.c_str(), &out.sin_addr) != 1) {
        return false;
    }
    int port = 0;
    try {
        port = std::stoi(text.substr(colon + 1));
    } catch (...) {
        return false;
    }
    if (port <= 0 || port > 65535) {
        return false;
    }
    out.sin_port = htons(static_cast<std::uint16_t>(port));
    return true;
}

bool ipc_in_use(const std::string& path) {
    if (path.empty() || path[0] == '@' || path.size() >= sizeof(sockaddr_un::sun_path)) {
        return false;
    }
    const int fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
    if (fd < 0) {
        return false;
    }
    sockaddr_un a{};
    a.sun_family = AF_UNIX;
    std::memcpy(a.sun_path, path.c_str(), path.size() + 1);
    const bool live = connect(fd, reinterpret_cast<sockaddr*>(&a), sizeof(a)) == 0;
    ::close(fd);
    return live;
}

int ms_until(clock::time_point t) {
    const auto d = std::chrono::duration_cast<std::chrono::milliseconds>(t - clock::now());
    return static_cast<int>(std::clamp<std::int64_t>(d.count(), 0, 1000));
}

}  // namespace

result<std::unique_ptr<node_impl>> node_impl::create(node_options o) {
    set_last_error_message({});
    if (o.mesh.empty() || o.mesh.size() > 64 || o.hwm <= 0 || o.batch == 0
        || o.discovery.interval.count() <= 0 || o.discovery.missed_beacons == 0
        || o.heartbeat_interval.count() <= 0 || o.heartbeat_timeout.count() <= 0
        || o.linger.count() < 0) {
        set_last_error_message("invalid node options (mesh name 1..64 chars; positive hwm, batch, "
                               "intervals)");
        return fail(errc::bad_option);
    }
    if (o.name.empty()) {
        std::array<char, 256> host{};
        gethostname(host.data(), host.size() - 1);
        o.name = std::string(host.data()) + "-" + std::to_string(getpid());
    }
    std::unique_ptr<node_impl> n(new node_impl());
    n->opt = std::move(o);
    n->name = n->opt.name;
    n->ctx = std::make_shared<shared_context>();
    n->id = new_event_id();
    n->id_text = to_string(n->id);
    n->incarnation = static_cast<std::uint64_t>(now_ns());
    n->stats_topic_ = "_evmesh.stats." + n->id_text;
    n->ping_topic_ = "_evmesh.ping." + n->id_text;
    n->started_ = clock::now();
    n->local_in_ep = "inproc://evmesh/" + n->id_text + "/in";
    n->local_out_ep = "inproc://evmesh/" + n->id_text + "/out";
    for (auto* m : {&n->topic_, &n->body_, &n->mesh_topic_, &n->mesh_body_, &n->sub_}) {
        zmq_msg_init(m);
    }
    if (auto r = n->setup_security(); !r) {
        n->close_all();
        return tl::unexpected(r.error());
    }
    if (auto r = n->open_sockets(); !r) {
        n->close_all();
        return tl::unexpected(r.error());
    }
    if (auto r = n->open_discovery(); !r) {
        n->close_all();
        return tl::unexpected(r.error());
    }
    n->wake_fd_ = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
    if (n->wake_fd_ < 0) {
        set_last_error_message(std::string("eventfd: ") + std::strerror(errno));
        n->close_all();
        return fail(errc::io_error);
    }
    if (!n->secure_ && n->opt.mesh_enabled && !n->opt.observer) {
        detail::log()->warn("evmesh node '{}': SECURITY IS OFF: mesh links are neither encrypted nor "
                            "authenticated and anyone who can reach the beacon port can join "
                            "(development only; see docs/SECURITY.md)", n->name);
    }
    // log before the I/O thread exists: spdlog's registry is initialised here, not concurrently
    detail::log()->info("evmesh node '{}' ({}) started in mesh '{}', mesh endpoint {}", n->name,
                 n->id_text, n->opt.mesh, n->mesh_ep.empty() ? "(none)" : n->mesh_ep);
    n->running = true;
    n->thread_ = std::thread([p = n.get()] { p->run(); });
    n->io_thread = n->thread_.get_id();
    return n;
}

result<void> node_impl::open_sockets() {
    auto bind = [&](void* s, const std::string& ep) -> result<std::string> {
        // libzmq unlinks an existing ipc path before binding, silently stealing it from a live
        // node; refuse when something still accepts connections there.
        if (ep.rfind("ipc://", 0) == 0 && ipc_in_use(ep.substr(6))) {
            set_last_error_message("cannot bind endpoint '" + ep + "': in use by another process");
            return fail(errc::bad_endpoint);
        }
        if (zmq_bind(s, ep.c_str()) != 0) {
            set_last_error_message("cannot bind endpoint '" + ep + "': " + zmq_strerror(zmq_errno()));
            return fail(errc::bad_endpoint);
        }
        if (ep.rfind("ipc://", 0) == 0 && ep.size() > 6 && ep[6] != '@') {
            const auto path = ep.substr(6);
            if (opt.ipc_mode != 0 && ::chmod(path.c_str(), static_cast<mode_t>(opt.ipc_mode)) != 0) {
                set_last_error_message("cannot chmod '" + path + "': " + std::strerror(errno));
                return fail(errc::bad_endpoint);
            }
            if (!opt.ipc_group.empty()) {
                const group* g = ::getgrnam(opt.ipc_group.c_str());
                if (g == nullptr || ::chown(path.c_str(), static_cast<uid_t>(-1), g->gr_gid) != 0) {
                    set_last_error_message("cannot give '" + path + "' to group '" + opt.ipc_group + "'");
                    return fail(errc::bad_endpoint);
                }
            }
        }
        return last_endpoint(s);
    };
    const int hwm = opt.hwm;
    const auto max_msg = static_cast<std::int64_t>(opt.max_event_bytes) + 4096;

    local_in_ = zmq_socket(ctx->ctx, ZMQ_XSUB);
    set_int(local_in_, ZMQ_RCVHWM, hwm);
    set_int(local_in_, ZMQ_SNDHWM, 0);  // subscriptions upstream are never dropped
    if (auto r = bind(local_in_, local_in_ep); !r) {
        return tl::unexpected(r.error());
    }

    local_out_ = zmq_socket(ctx->ctx, ZMQ_XPUB);
    set_int(local_out_, ZMQ_SNDHWM, hwm);
    set_int(local_out_, ZMQ_XPUB_NODROP, opt.slow_subscriber == overflow_policy::block ? 1 : 0);
    if (auto r = bind(local_out_, local_out_ep); !r) {
        return tl::unexpected(r.error());
    }
    for (const auto& ep : opt.sub_endpoints) {
        auto r = bind(local_out_, ep);
        if (!r) {
            return tl::unexpected(r.error());
        }
        sub_eps.push_back(*r);
    }

    if (!opt.pub_endpoints.empty()) {
        client_in_ = zmq_socket(ctx->ctx, ZMQ_XSUB);
        set_int(client_in_, ZMQ_RCVHWM, hwm);
        set_int(client_in_, ZMQ_SNDHWM, 0);
        zmq_setsockopt(client_in_, ZMQ_MAXMSGSIZE, &max_msg, sizeof(max_msg));
        for (const auto& ep : opt.pub_endpoints) {
            auto r = bind(client_in_, ep);
            if (!r) {
                return tl::unexpected(r.error());
            }
            pub_eps.push_back(*r);
        }
    }

    if (opt.mesh_enabled) {
        const int hb = static_cast<int>(opt.heartbeat_interval.count());
        const int hb_timeout = static_cast<int>(opt.heartbeat_timeout.count());
        if (secure_) {
            // the ZAP handler must be bound before the first handshake (same context)
            zap_ = zmq_socket(ctx->ctx, ZMQ_REP);
            if (zmq_bind(zap_, "inproc://zeromq.zap.01") != 0) {
                set_last_error_message("cannot bind the ZAP handler");
                return fail(errc::io_error);
            }
        }
        mesh_out_ = zmq_socket(ctx->ctx, ZMQ_XPUB);
        set_int(mesh_out_, ZMQ_SNDHWM, hwm);
        if (secure_) {
            set_int(mesh_out_, ZMQ_CURVE_SERVER, 1);
            zmq_setsockopt(mesh_out_, ZMQ_CURVE_SECRETKEY, curve_secret_.data(), 32);
            zmq_setsockopt(mesh_out_, ZMQ_ZAP_DOMAIN, "evmesh", 6);
        }
        set_int(mesh_out_, ZMQ_XPUB_NODROP,
                opt.slow_subscriber == overflow_policy::block ? 1 : 0);
        // No pings from this side: each peer's mesh in pings us with a TTL, and libzmq closes a
        // connection whose pings stop (halves heartbeat traffic; measured in docs/ARCHITECTURE.md).
        const std::string ep = "tcp://" + opt.mesh_bind_address + ":"
                               + (opt.mesh_port == 0 ? std::string("*")
                                                     : std::to_string(opt.mesh_port));
        auto r = bind(mesh_out_, ep);
        if (!r) {
            return tl::unexpected(r.error());
        }
        mesh_ep = *r;

        mesh_in_ = zmq_socket(ctx->ctx, ZMQ_XSUB);
        set_int(mesh_in_, ZMQ_RCVHWM, hwm);
        if (secure_) {  // the server key is set per peer, right before each connect
            zmq_setsockopt(mesh_in_, ZMQ_CURVE_PUBLICKEY, curve_public_.data(), 32);
            zmq_setsockopt(mesh_in_, ZMQ_CURVE_SECRETKEY, curve_secret_.data(), 32);
        }
        set_int(mesh_in_, ZMQ_SNDHWM, 0);
        set_int(mesh_in_, ZMQ_HEARTBEAT_IVL, hb);
        set_int(mesh_in_, ZMQ_HEARTBEAT_TIMEOUT, hb_timeout);
        set_int(mesh_in_, ZMQ_HEARTBEAT_TTL, hb_timeout);  // the peer's mesh out enforces it
        set_int(mesh_in_, ZMQ_RECONNECT_IVL, 100);
        zmq_setsockopt(mesh_in_, ZMQ_MAXMSGSIZE, &max_msg, sizeof(max_msg));
        // answer mesh-inspector pings addressed to this node (see answer_ping)
        const std::string ping_sub = "\x01" + ping_topic_;
        zmq_send(mesh_in_, ping_sub.data(), ping_sub.size(), 0);
        const std::string mon = "inproc://evmesh/" + id_text + "/monitor";
        zmq_socket_monitor(mesh_in_, mon.c_str(), ZMQ_EVENT_CONNECTED | ZMQ_EVENT_DISCONNECTED);
        monitor_ = zmq_socket(ctx->ctx, ZMQ_PAIR);
        zmq_connect(monitor_, mon.c_str());
    }
    return {};
}

result<void> node_impl::open_discovery() {
    const auto& d = opt.discovery;
    if (!d.enabled || !opt.mesh_enabled) {
        return {};
    }
    for (const auto& s : d.seeds) {
        sockaddr_in a{};
        if (!parse_addr(s, a)) {
            set_last_error_message("discovery seed '" + s + "' is not ipv4:port");
            return fail(errc::bad_option);
        }
        unicast_targets_.push_back(s);
    }
    const bool host = d.scope == discovery_scope::host;
    sockaddr_in bcast{};
    if (!parse_addr((host ? std::string("127.255.255.255") : d.broadcast_address) + ":1", bcast)) {
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
    any.sin_addr.s_addr = host ? bcast.sin_addr.s_addr : htonl(INADDR_ANY);
    any.sin_port = htons(d.port);
    if (::bind(udp_bcast_, reinterpret_cast<sockaddr*>(&any), sizeof(any)) != 0) {
        set_last_error_message("cannot bind discovery port " + std::to_string(d.port) + ": "
                               + std::strerror(errno));
        return fail(errc::bad_endpoint);
    }
    setsockopt(udp_uni_, SOL_SOCKET, SO_BROADCAST, &one, sizeof(one));
    sockaddr_in uni{};
    uni.sin_family = AF_INET;
    uni.sin_port = 0;
    const std::string local = host ? "127.0.0.1"
                                   : (d.interface_address.empty() ? "0.0.0.0" : d.interface_address);
    if (inet_pton(AF_INET, local.c_str(), &uni.sin_addr) != 1
        || ::bind(udp_uni_, reinterpret_cast<sockaddr*>(&uni), sizeof(uni)) != 0) {
        set_last_error_message("cannot bind discovery socket to '" + local + "'");
        return fail(errc::bad_endpoint);
    }
    socklen_t len = sizeof(uni);
    getsockname(udp_uni_, reinterpret_cast<sockaddr*>(&uni), &len);
    uni_address_ = addr_text(uni);
    return {};
}

node_impl::~node_impl() {
    stop();
}

void node_impl::stop() {
    if (thread_.joinable()) {
        {
            std::lock_guard lock(mu_);
            commands_.emplace_back([this] { stop_ = true; });
        }
        const std::uint64_t one = 1;
        (void)!write(wake_fd_, &one, sizeof(one));
        thread_.join();
    }
    close_all();
    remove_ipc_files();
}

void node_impl::remove_ipc_files() {
    // libzmq unlinks an ipc listener's file asynchronously (or not at all while the context
    // lives); give it a moment, then remove what is left so a restart can bind again.
    std::vector<std::string> paths;
    for (const auto* eps : {&pub_eps, &sub_eps}) {
        for (const auto& ep : *eps) {
            if (ep.rfind("ipc://", 0) == 0 && ep.size() > 6 && ep[6] != '@') {
                paths.push_back(ep.substr(6));
            }
        }
    }
    const auto deadline = clock::now() + std::chrono::milliseconds(100);
    for (const auto& p : paths) {
        while (access(p.c_str(), F_OK) == 0 && clock::now() < deadline) {
            std::this_thread::sleep_for(std::chrono::milliseconds(2));
        }
        ::unlink(p.c_str());
    }
    pub_eps.clear();
    sub_eps.clear();
}

void node_impl::close_all() {
    for (void** s : {&local_in_, &client_in_, &local_out_, &mesh_out_, &mesh_in_, &monitor_, &zap_}) {
        if (*s != nullptr) {
            zmq_close(*s);
            *s = nullptr;
        }
    }
    for (int* fd : {&udp_bcast_, &udp_uni_, &wake_fd_}) {
        if (*fd >= 0) {
            ::close(*fd);
            *fd = -1;
        }
    }
    for (auto* m : {&topic_, &body_, &mesh_topic_, &mesh_body_, &sub_}) {
        zmq_msg_close(m);
        zmq_msg_init(m);
    }
}

bool node_impl::call(const std::function<void()>& fn) {
    if (!running) {
        return false;
    }
    std::promise<void> done;
    auto fut = done.get_future();
    {
        std::lock_guard lock(mu_);
        if (!running) {
            return false;
        }
        commands_.emplace_back([&] {
            fn();
            done.set_value();
        });
    }
    const std::uint64_t one = 1;
    (void)!write(wake_fd_, &one, sizeof(one));
    fut.wait();
    return true;
}

void node_impl::run_commands() {
    std::uint64_t v = 0;
    (void)!read(wake_fd_, &v, sizeof(v));
    std::vector<std::function<void()>> cmds;
    {
        std::lock_guard lock(mu_);
        cmds.swap(commands_);
    }
    for (auto& cmd : cmds) {
        cmd();
    }
}

std::vector<peer_info> node_impl::snapshot_peers() const {
    std::vector<peer_info> out;
    out.reserve(peers_.size());
    for (const auto& [k, p] : peers_) {
        out.push_back(p.info);
    }
    std::sort(out.begin(), out.end(),
              [](const peer_info& a, const peer_info& b) { return a.name < b.name; });
    return out;
}

void node_impl::run() {
    std::vector<zmq_pollitem_t> items;
    enum slot { wake, l_in, c_in, m_in, l_out, m_out, u_b, u_u, mon, zap, count };
    std::array<int, count> idx{};
    idx.fill(-1);
    auto add = [&](slot s, void* sock, int fd) {
        if (sock == nullptr && fd < 0) {
            return;
        }
        idx[s] = static_cast<int>(items.size());
        items.push_back(zmq_pollitem_t{sock, fd, ZMQ_POLLIN, 0});
    };
    add(wake, nullptr, wake_fd_);
    add(l_in, local_in_, -1);
    add(c_in, client_in_, -1);
    add(m_in, mesh_in_, -1);
    add(l_out, local_out_, -1);
    add(m_out, mesh_out_, -1);
    add(u_b, nullptr, udp_bcast_);
    add(u_u, nullptr, udp_uni_);
    add(mon, monitor_, -1);
    add(zap, zap_, -1);
    auto ready = [&](slot s) { return idx[s] >= 0 && (items[static_cast<std::size_t>(idx[s])].revents & ZMQ_POLLIN) != 0; };
    auto set_input_polling = [&](bool on) {
        for (slot s : {l_in, c_in, m_in}) {
            if (idx[s] >= 0) {
                items[static_cast<std::size_t>(idx[s])].events = on ? ZMQ_POLLIN : 0;
            }
        }
    };
    const bool discovery = udp_bcast_ >= 0;
    next_stats_ = clock::now() + opt.stats_interval;
    last_stats_ = clock::now();
    next_beacon_ = clock::now();
    next_expiry_ = clock::now() + opt.discovery.interval;

    while (!stop_) {
        int timeout = 1000;
        if (discovery) {
            timeout = std::min(ms_until(next_beacon_), ms_until(next_expiry_));
        }
        if (opt.stats_interval.count() > 0) {
            timeout = std::min(timeout, ms_until(next_stats_));
        }
        if (pending_) {
            timeout = std::min(timeout, 1);
        }
        if (zmq_poll(items.data(), static_cast<int>(items.size()), timeout) < 0) {
            if (zmq_errno() == EINTR) {
                continue;
            }
            detail::log()->error("evmesh node '{}': poll failed: {}", name, zmq_strerror(zmq_errno()));
            break;
        }
        if (ready(wake)) {
            run_commands();
        }
        // Subscriptions first, so a subscribe that arrives with events takes effect at once.
        if (ready(l_out)) {
            on_subscriptions(local_out_, true);
        }
        if (ready(m_out)) {
            on_subscriptions(mesh_out_, false);
        }
        if (pending_ && !flush_pending()) {
            set_input_polling(false);
        } else {
            set_input_polling(true);
            if (ready(l_in)) {
                forward_local();
            }
            if (!pending_ && ready(c_in)) {
                forward_client();
            }
            if (!pending_ && ready(m_in)) {
                forward_mesh_in();
            }
        }
        if (ready(u_b)) {
            on_datagrams(udp_bcast_);
        }
        if (ready(u_u)) {
            on_datagrams(udp_uni_);
        }
        if (ready(mon)) {
            on_monitor();
        }
        if (ready(zap)) {
            on_zap();
        }
        if (secure_ && clock::now() >= next_allow_check_) {
            reload_allow_file(false);
            next_allow_check_ = clock::now() + std::chrono::seconds(1);
        }
        if (opt.stats_interval.count() > 0 && clock::now() >= next_stats_) {
            publish_stats();
            next_stats_ = clock::now() + opt.stats_interval;
        }
        if (discovery) {
            const auto now = clock::now();
            if (now >= next_beacon_) {
                send_beacon(false);
                // a short burst at start-up so peers learn of us within milliseconds
                if (burst_left_ > 0) {
                    --burst_left_;
                    next_beacon_ = now + std::min<clock::duration>(
                                             std::chrono::milliseconds(20), opt.discovery.interval);
                } else {
                    next_beacon_ = now + opt.discovery.interval;
                }
            }
            if (now >= next_expiry_) {
                expire_peers();  // sets next_expiry_
            }
        }
    }
    drain_on_stop();
    if (discovery) {
        send_beacon(true);
    }
    {
        std::lock_guard lock(mu_);
        final_counters = c;
        final_counters.peers = 0;
        final_peers.clear();
        running = false;
        // commands that raced with stop are completed so no caller waits forever
        for (auto& cmd : commands_) {
            cmd();
        }
        commands_.clear();
    }
    const int linger = static_cast<int>(opt.linger.count());
    for (void* s : {local_out_, mesh_out_}) {
        if (s != nullptr) {
            set_int(s, ZMQ_LINGER, linger);
        }
    }
    for (void* s : {local_in_, client_in_, mesh_in_, monitor_, zap_}) {
        if (s != nullptr) {
            set_int(s, ZMQ_LINGER, 0);
        }
    }
    if (mesh_in_ != nullptr) {
        zmq_socket_monitor(mesh_in_, nullptr, 0);
    }
    detail::log()->info("evmesh node '{}' stopped", name);
}

void node_impl::drain_on_stop() {
    // Forward what publishers already handed to us, bounded by linger.
    const auto deadline = clock::now() + opt.linger;
    while (clock::now() < deadline) {
        const auto before = c.local_in_events + c.client_in_events + c.mesh_in_events;
        if (pending_ && !flush_pending()) {
            std::this_thread::sleep_for(std::chrono::milliseconds(1));
            continue;
        }
        forward_local();
        if (client_in_ != nullptr) {
            forward_client();
        }
        if (before == c.local_in_events + c.client_in_events + c.mesh_in_events && !pending_) {
            break;
        }
    }
}

bool node_impl::flush_pending() {
    if (pending_mesh_) {
        if (zmq_msg_send(&mesh_topic_, mesh_out_, ZMQ_SNDMORE | ZMQ_DONTWAIT) < 0) {
            return false;
        }
        zmq_msg_send(&mesh_body_, mesh_out_, 0);
        ++c.mesh_out_events;
        pending_mesh_ = false;
    }
    if (pending_local_) {
        if (zmq_msg_send(&topic_, local_out_, ZMQ_SNDMORE | ZMQ_DONTWAIT) < 0) {
            return false;
        }
        zmq_msg_send(&body_, local_out_, 0);
        ++c.local_out_events;
        pending_local_ = false;
    }
    pending_ = false;
    return true;
}

bool node_impl::deliver(bool to_mesh) {
    // Under the drop policy both XPUBs are lossy and these sends never fail. Under the block
    // policy (ZMQ_XPUB_NODROP) a full receiver refuses the event: keep it and stop reading inputs
    // until it is taken, which pushes back to the publishers.
    pending_mesh_ = to_mesh && !mesh_subs_.empty();
    pending_local_ = !local_subs_.empty();
    if (pending_local_ && (++latency_tick_ & 7) == 0) {
        sample_latency();  // 1 in 8 deliveries: cheap, and enough for percentiles
    }
    if (pending_mesh_) {
        zmq_msg_copy(&mesh_topic_, &topic_);
        zmq_msg_copy(&mesh_body_, &body_);
    }
    if (flush_pending()) {
        return true;
    }
    pending_ = true;
    ++c.local_out_blocked;
    return false;
}

void node_impl::forward_local() {
    for (std::uint32_t i = 0; i < opt.batch; ++i) {
        if (zmq_msg_recv(&topic_, local_in_, ZMQ_DONTWAIT) < 0) {
            return;
        }
        if (!zmq_msg_more(&topic_)) {
            continue;  // not an event (embedded publishers always send two frames)
        }
        zmq_msg_recv(&body_, local_in_, 0);
        if (zmq_msg_more(&body_)) {
            drain_frames(local_in_, sub_);
            continue;
        }
        ++c.local_in_events;
        const auto bytes = zmq_msg_size(&body_);
        c.local_in_bytes += bytes;
        topics_.count(view(topic_), bytes);
        if (!deliver(true)) {
            return;
        }
    }
}

void node_impl::forward_client() {
    decode_limits limits;
    limits.max_event_bytes = opt.max_event_bytes;
    for (std::uint32_t i = 0; i < opt.batch; ++i) {
        if (zmq_msg_recv(&topic_, client_in_, ZMQ_DONTWAIT) < 0) {
            return;
        }
        const char* why = nullptr;
        missing_fields missing;
        result<event_view> v = fail(errc::not_an_event);
        if (!zmq_msg_more(&topic_)) {
            why = "one frame (expected [topic][body])";
        } else {
            zmq_msg_recv(&body_, client_in_, 0);
            if (zmq_msg_more(&body_)) {
                drain_frames(client_in_, sub_);
                why = "more than two frames";
            } else {
                v = decode_event_lenient(view(topic_), view(body_), missing, limits);
            }
        }
        if (why != nullptr || !v) {
            ++c.client_rejected;
            // reasons and topics of rejects, for the stats event (bounded: hostile input)
            const std::string reason = why != nullptr ? "bad framing" : v.error().message();
            if (reject_reasons_.size() < 32 || reject_reasons_.count(reason) != 0) {
                ++reject_reasons_[reason];
            }
            const auto t = view(topic_).substr(0, 64);
            const bool printable = std::all_of(t.begin(), t.end(), [](char ch) {
                return static_cast<unsigned char>(ch) >= 0x20 && static_cast<unsigned char>(ch) < 0x7f;
            });
            const std::string topic_key = printable && !t.empty() ? std::string(t) : "(unprintable)";
            if (reject_topics_.size() < 32 || reject_topics_.count(topic_key) != 0) {
                ++reject_topics_[topic_key];
            } else {
                ++reject_topics_["(other)"];
            }
            std::uint64_t suppressed = 0;
            if (reject_log_.allow(suppressed)) {
                detail::log()->warn("evmesh node '{}': rejected client event: {} ({} similar suppressed)",
                             name, why != nullptr ? std::string(why) : v.error().message(),
                             suppressed);
            }
            continue;
        }
        ++c.client_in_events;
        c.client_in_bytes += zmq_msg_size(&body_);
        topics_.count(v->topic, zmq_msg_size(&body_));
        if (missing.any() || v->content_type.empty()) {
            event_view ev = *v;
            if (missing.id) {
                ev.id = new_event_id();
            }
            std::string source_buf;
            if (missing.source) {
                source_buf = name + "/client";
                ev.source = source_buf;
            }
            if (missing.time) {
                ev.time_ns = now_ns();
            }
            if (missing.seq) {
                if (client_seq_.size() > 65536) {
                    client_seq_.clear();  // bound memory; streams restart (counted as reorder)
                }
                scratch_.assign(ev.source);
                scratch_.push_back('\0');
                scratch_.append(ev.topic);
                ev.seq = ++client_seq_[scratch_];
            }
            std::string out;
            out.reserve(zmq_msg_size(&body_) + 64);
            codec::encode_completed(ev, out);
            zmq_msg_close(&body_);
            zmq_msg_init_size(&body_, out.size());
            std::memcpy(zmq_msg_data(&body_), out.data(), out.size());
            ++c.client_completed;
        }
        if (!deliver(true)) {
            return;
        }
    }
}

void node_impl::forward_mesh_in() {
    for (std::uint32_t i = 0; i < opt.batch; ++i) {
        if (zmq_msg_recv(&topic_, mesh_in_, ZMQ_DONTWAIT) < 0) {
            return;
        }
        if (!zmq_msg_more(&topic_)) {
            continue;
        }
        zmq_msg_recv(&body_, mesh_in_, 0);
        if (zmq_msg_more(&body_)) {
            drain_frames(mesh_in_, sub_);
            continue;
        }
        ++c.mesh_in_events;
        const auto bytes = zmq_msg_size(&body_);
        c.mesh_in_bytes += bytes;
        const auto t = view(topic_);
        if (t.size() > 13 && t[0] == '_' && t.starts_with("_evmesh.ping.")) {
            answer_ping();
            continue;
        }
        std::string_view source;
        std::int64_t time_ns = 0;
        if (codec::peek_source_time(view(body_), source, time_ns)) {
            sources_.count(source.substr(0, source.find('/')), bytes);  // per source node
        }
        // one hop: events from peers go to local subscribers only
        if (!deliver(false)) {
            return;
        }
    }
}

void node_impl::on_subscriptions(void* from, bool from_local) {
    auto& set = from_local ? local_subs_ : mesh_subs_;
    for (std::uint32_t i = 0; i < opt.batch; ++i) {
        if (zmq_msg_recv(&sub_, from, ZMQ_DONTWAIT) < 0) {
            return;
        }
        if (more(from)) {
            drain_frames(from, sub_);
            continue;
        }
        const auto d = view(sub_);
        if (d.empty() || (d[0] != 0 && d[0] != 1)) {
            continue;  // not a subscription message
        }
        const std::string prefix(d.substr(1));
        if (from_local && prefix.starts_with(sync_prefix)) {
            // A new embedded subscription asks when its subscriptions are in effect: this one was
            // sent after them on the same pipe, so they are. Noted for make_sub (which asks via
            // call()); never forwarded upstream, never counted.
            if (d[0] == 1) {
                if (sync_seen_.size() >= 1024) {
                    sync_seen_.clear();  // bound: a subscriber that gave up never collects its entry
                }
                sync_seen_.insert(prefix);
            }
            continue;
        }
        if (d[0] == 1) {
            ++set[prefix];
        } else if (auto it = set.find(prefix); it != set.end() && --it->second <= 0) {
            set.erase(it);
        }
        c.subscriptions_local = local_subs_.size();
        c.subscriptions_mesh = mesh_subs_.size();
        // Balanced pairs into every upstream XSUB; each XSUB reference-counts, so one source
        // leaving never cancels another's subscription. Peers' subscriptions go to local
        // publishers only (one hop).
        std::array<void*, 3> targets{local_in_, client_in_, from_local ? mesh_in_ : nullptr};
        for (void* t : targets) {
            if (t == nullptr) {
                continue;
            }
            zmq_msg_t copy;
            zmq_msg_init(&copy);
            zmq_msg_copy(&copy, &sub_);
            if (zmq_msg_send(&copy, t, 0) < 0) {
                zmq_msg_close(&copy);
            }
        }
    }
}

void node_impl::send_beacon_to(const std::string& bytes, const void* addr, unsigned addrlen) {
    if (sendto(udp_uni_, bytes.data(), bytes.size(), 0, static_cast<const sockaddr*>(addr),
               addrlen)
        >= 0) {
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
    b.flags = opt.observer ? discovery::beacon_flag_observer : 0;
    const auto colon = mesh_ep.rfind(':');
    b.mesh_port = static_cast<std::uint16_t>(std::stoi(mesh_ep.substr(colon + 1)));
    const bool gossip = !d.broadcast || !d.seeds.empty();
    if (gossip) {
        for (const auto& [k, p] : peers_) {
            if (b.gossip.size() >= discovery::max_gossip) {
                break;
            }
            b.gossip.push_back(p.info.beacon_address);
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
        sockaddr_in a{};
        parse_addr((d.scope == discovery_scope::host ? std::string("127.255.255.255")
                                                     : d.broadcast_address)
                       + ":" + std::to_string(d.port),
                   a);
        send_beacon_to(bytes, &a, sizeof(a));
    }
    for (const auto& t : unicast_targets_) {
        sockaddr_in a{};
        if (parse_addr(t, a)) {
            send_beacon_to(bytes, &a, sizeof(a));
        }
    }
    if (!d.broadcast) {
        for (const auto& [k, p] : peers_) {
            if (std::find(unicast_targets_.begin(), unicast_targets_.end(),
                          p.info.beacon_address)
                == unicast_targets_.end()) {
                sockaddr_in a{};
                if (parse_addr(p.info.beacon_address, a)) {
                    send_beacon_to(bytes, &a, sizeof(a));
                }
            }
        }
    }
}

void node_impl::on_datagrams(int fd) {
    std::array<char, 2048> buf{};
    for (int i = 0; i < 256; ++i) {
        sockaddr_in from{};
        socklen_t flen = sizeof(from);
        const auto n = recvfrom(fd, buf.data(), buf.size(), 0, reinterpret_cast<sockaddr*>(&from),
                                &flen);
        if (n < 0) {
            return;
        }
        auto reject = [&](const std::string& why) {
            ++c.beacons_rejected;
            std::uint64_t suppressed = 0;
            if (beacon_log_.allow(suppressed)) {
                detail::log()->warn("evmesh node '{}': rejected datagram from {}: {} ({} suppressed)",
                             name, addr_text(from), why, suppressed);
            }
        };
        const bool loopback = (ntohl(from.sin_addr.s_addr) >> 24) == 127;
        if (opt.discovery.scope == discovery_scope::host && !loopback) {
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
            }
            if (allowed_.count(b->public_key) == 0) {
                ++c.peers_not_allowed;
                std::uint64_t suppressed = 0;
                if (auth_log_.allow(suppressed)) {
                    detail::log()->warn("evmesh node '{}': node '{}' at {} is not on the allow-list "
                                        "({} similar suppressed)", name, b->name, addr_text(from), suppressed);
                }
                if (peers_.count(key) != 0) {
                    remove_peer(key, "key no longer allowed");
                }
                continue;
            }
        }
        ++c.beacons_received;
        if (b->kind == discovery::beacon_kind::goodbye) {
            if (peers_.count(key) != 0) {
                ++c.peers_left;
                remove_peer(key, "said goodbye");
            }
            continue;
        }
        if (b->mesh_port == 0) {
            continue;
        }
        std::array<char, INET_ADDRSTRLEN> ip{};
        inet_ntop(AF_INET, &from.sin_addr, ip.data(), ip.size());
        const std::string host = b->mesh_host.empty() ? std::string(ip.data()) : b->mesh_host;
        const std::string endpoint = "tcp://" + host + ":" + std::to_string(b->mesh_port);
        const std::string src = addr_text(from);
        auto it = peers_.find(key);
        bool reply = false;
        if (it == peers_.end()) {
            peer_entry p;
            p.info.id = to_string(b->node_id);
            p.info.name = b->name;
            p.info.endpoint = endpoint;
            p.info.incarnation = b->incarnation;
            p.info.observer = (b->flags & discovery::beacon_flag_observer) != 0;
            p.info.state = peer_info::link_state::connecting;
            p.curve_key = b->public_key;
            if (secure_) {
                zmq_setsockopt(mesh_in_, ZMQ_CURVE_SERVERKEY, b->public_key.data(), 32);
            }
            zmq_connect(mesh_in_, endpoint.c_str());
            it = peers_.emplace(key, std::move(p)).first;
            ++c.peers_joined;
            reply = true;
            // observers (mesh-inspector) come and go often: keep them out of the info log
            detail::log()->log(it->second.info.observer ? spdlog::level::debug : spdlog::level::info,
                               "evmesh node '{}': peer '{}' joined at {}", name, b->name, endpoint);
        } else if (it->second.info.incarnation != b->incarnation
                   || it->second.info.endpoint != endpoint || it->second.curve_key != b->public_key) {
            detail::log()->info("evmesh node '{}': peer '{}' restarted or moved: {} -> {}", name,
                         b->name, it->second.info.endpoint, endpoint);
            zmq_disconnect(mesh_in_, it->second.info.endpoint.c_str());
            if (secure_) {
                zmq_setsockopt(mesh_in_, ZMQ_CURVE_SERVERKEY, b->public_key.data(), 32);
            }
            zmq_connect(mesh_in_, endpoint.c_str());
            it->second.curve_key = b->public_key;
            it->second.info.endpoint = endpoint;
            it->second.info.incarnation = b->incarnation;
            it->second.info.name = b->name;
            it->second.info.state = peer_info::link_state::connecting;
            reply = true;
        }
        // src is the peer's own beacon socket (broadcasts and unicasts are sent from it)
        if (fd == udp_bcast_ || it->second.info.beacon_address.empty()) {
            it->second.info.beacon_address = src;
        }
        it->second.info.last_seen = std::chrono::system_clock::now();
        it->second.last_seen_steady = clock::now();
        if (reply && fd == udp_bcast_) {
            // answer a newcomer directly so it does not wait for our next interval
            send_beacon_to(make_beacon(false), &from, sizeof(from));
        }
        for (const auto& g : b->gossip) {
            sockaddr_in a{};
            if (unicast_targets_.size() < 256 && g != uni_address_ && parse_addr(g, a)
                && std::find(unicast_targets_.begin(), unicast_targets_.end(), g)
                       == unicast_targets_.end()) {
                unicast_targets_.push_back(g);
            }
        }
        c.peers = peers_.size();
    }
}

void node_impl::on_monitor() {
    for (int i = 0; i < 64; ++i) {
        zmq_msg_t ev, addr;
        zmq_msg_init(&ev);
        zmq_msg_init(&addr);
        if (zmq_msg_recv(&ev, monitor_, ZMQ_DONTWAIT) < 0) {
            zmq_msg_close(&ev);
            zmq_msg_close(&addr);
            return;
        }
        std::uint16_t event = 0;
        if (zmq_msg_size(&ev) >= 2) {
            std::memcpy(&event, zmq_msg_data(&ev), 2);
        }
        std::string endpoint;
        if (more(monitor_)) {
            zmq_msg_recv(&addr, monitor_, 0);
            endpoint.assign(view(addr));
        }
        zmq_msg_close(&ev);
        zmq_msg_close(&addr);
        for (auto& [key, p] : peers_) {
            if (p.info.endpoint != endpoint) {
                continue;
            }
            if (event == ZMQ_EVENT_CONNECTED) {
                p.info.state = peer_info::link_state::connected;
            } else if (event == ZMQ_EVENT_DISCONNECTED) {
                // the TCP link closed (peer died) or heartbeats timed out: drop at once; a
                // live peer is re-added by its next beacon
                ++c.peers_link_lost;
                remove_peer(key, "link lost");
            }
            break;
        }
    }
}

void node_impl::expire_peers() {
    const auto bound = opt.discovery.interval * opt.discovery.missed_beacons;
    const auto now = clock::now();
    std::vector<std::string> dead;
    // next check at the earliest deadline, so a peer expires on time, not up to an interval late
    next_expiry_ = now + opt.discovery.interval;
    for (const auto& [key, p] : peers_) {
        const auto deadline = p.last_seen_steady + bound;
        if (now >= deadline) {
            dead.push_back(key);
        } else {
            next_expiry_ = std::min(next_expiry_, deadline);
        }
    }
    for (const auto& key : dead) {
        ++c.peers_expired;
        remove_peer(key, "expired (no beacon)");
    }
}

void node_impl::remove_peer(const std::string& key, const char* why) {
    auto it = peers_.find(key);
    if (it == peers_.end()) {
        return;
    }
    detail::log()->log(it->second.info.observer ? spdlog::level::debug : spdlog::level::info,
                       "evmesh node '{}': peer '{}' removed: {}", name, it->second.info.name, why);
    zmq_disconnect(mesh_in_, it->second.info.endpoint.c_str());
    peers_.erase(it);
    c.peers = peers_.size();
}

}  // namespace evmesh::detail
