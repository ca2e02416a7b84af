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
#include <condition_variable>

#include "util/log.hpp"

#include <evmesh/codec.hpp>

#include "codec/envelope.hpp"
#include "discovery/beacon.hpp"
#include "util/z85.hpp"
#include "reactor/zmq_util.hpp"

namespace evmesh::detail {
namespace {

using evmesh::detail::set_last_error_message;
using clock = std::chrono::steady_clock;

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
    // Beacons carry the name in at most 255 bytes: a longer one would make the node invisible
    // to its peers while it sees them. Refuse it here, with the reason.
    if (o.name.size() > 255 || o.mesh_advertise_address.size() > 255) {
        set_last_error_message("node name and mesh_advertise_address must be at most 255 bytes");
        return fail(errc::bad_option);
    }
    if (o.max_event_bytes < 64 || o.call_timeout.count() <= 0 || o.max_subscriptions == 0
        || o.discovery.max_peers == 0 || o.discovery.joins_per_second == 0) {
        set_last_error_message("invalid node options (max_event_bytes >= 64; positive call_timeout, "
                               "max_subscriptions, max_peers, joins_per_second)");
        return fail(errc::bad_option);
    }
    std::vector<topic_pattern> repair_patterns;
    for (const auto& p : o.repair.patterns) {
        auto pat = topic_pattern::parse(p);
        if (!pat) {
            set_last_error_message("repair pattern '" + p + "' is not a valid pattern");
            return fail(errc::bad_pattern);
        }
        repair_patterns.push_back(std::move(*pat));
    }
    if (!repair_patterns.empty()
        && (o.repair.window_bytes == 0 || o.repair.window_age.count() <= 0
            || o.repair.nak_interval.count() <= 0 || o.repair.heartbeat.count() <= 0
            || o.repair.max_held == 0)) {
        set_last_error_message("invalid repair options (positive window, intervals, max_held)");
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
    n->nak_topic_ = "_evmesh.nak." + n->id_text;
    n->nak_all_topic_ = "_evmesh.nak.all";
    n->rtx_topic_ = "_evmesh.rtx." + n->id_text;
    n->limits.max_event_bytes = n->opt.max_event_bytes;
    n->peers_ = discovery::peer_table(discovery::peer_table_options{
        n->opt.discovery.interval, n->opt.discovery.missed_beacons, n->opt.discovery.max_peers,
        n->opt.discovery.joins_per_second, 1024});
    n->repair_patterns_ = std::move(repair_patterns);
    if (!n->repair_patterns_.empty()) {
        n->setup_repair();
    }
    n->started_ = clock::now();
    n->local_in_ep = "inproc://evmesh/" + n->id_text + "/in";
    n->local_out_ep = "inproc://evmesh/" + n->id_text + "/out";
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
    n->loop_beat_ns = clock::now().time_since_epoch().count();
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
    // a client's body may be max_event_bytes; a mesh frame adds the topic, a retransmission
    // its own prefix: room for both
    const auto max_msg = static_cast<std::int64_t>(opt.max_event_bytes) + 4096;
    const auto max_mesh_msg = max_msg + 1024;

    local_in_ = zmq_socket(ctx->ctx, ZMQ_XSUB);
    set_int(local_in_, ZMQ_RCVHWM, hwm);
    set_int(local_in_, ZMQ_SNDHWM, 0);  // subscriptions upstream are never dropped
    if (auto r = bind(local_in_, local_in_ep); !r) {
        return tl::unexpected(r.error());
    }
    // Embedded publishers send everything to the node, which filters at its XPUBs: then a
    // subscription is in effect for them as soon as the node has applied it (subscribe()'s
    // promise), with no race against a publisher that has not learnt it yet.
    const char everything = 1;
    zmq_send(local_in_, &everything, 1, 0);

    local_out_ = zmq_socket(ctx->ctx, ZMQ_XPUB);
    set_int(local_out_, ZMQ_SNDHWM, hwm);
    set_int(local_out_, ZMQ_XPUB_NODROP, opt.slow_subscriber == overflow_policy::block ? 1 : 0);
    if (auto r = bind(local_out_, local_out_ep); !r) {
        return tl::unexpected(r.error());
    }
    if (!opt.sub_endpoints.empty()) {
        client_out_ = zmq_socket(ctx->ctx, ZMQ_XPUB);
        set_int(client_out_, ZMQ_SNDHWM, hwm);
        set_int(client_out_, ZMQ_XPUB_NODROP, opt.slow_subscriber == overflow_policy::block ? 1 : 0);
        for (const auto& ep : opt.sub_endpoints) {
            auto r = bind(client_out_, ep);
            if (!r) {
                return tl::unexpected(r.error());
            }
            sub_eps.push_back(*r);
        }
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
        // Client publishers filter at the source (by the subscriptions the node forwards). Topics
        // under repair must reach the node's window even while no peer is subscribed (a link is
        // down): subscribe the client input to them for good.
        if (client_in_ != nullptr) {
            for (const auto& p : repair_patterns_) {
                const std::string sub = "\x01" + p.zmq_prefix();
                zmq_send(client_in_, sub.data(), sub.size(), 0);
            }
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
        if (opt.mesh_bind_address.find(':') != std::string::npos) {
            set_int(mesh_out_, ZMQ_IPV6, 1);  // an IPv6 bind address ("::" is dual-stack)
        }
        if (secure_) {
            set_int(mesh_out_, ZMQ_CURVE_SERVER, 1);
            zmq_setsockopt(mesh_out_, ZMQ_CURVE_SECRETKEY, curve_secret_.data(), 32);
            zmq_setsockopt(mesh_out_, ZMQ_ZAP_DOMAIN, "evmesh", 6);
        }
        set_int(mesh_out_, ZMQ_XPUB_NODROP,
                opt.slow_subscriber == overflow_policy::block ? 1 : 0);
        // No pings from this side: each peer's mesh in pings us with a TTL, and libzmq closes a
        // connection whose pings stop (halves heartbeat traffic; measured in docs/ARCHITECTURE.md).
        const std::string ep = "tcp://" + endpoint_host(opt.mesh_bind_address) + ":"
                               + (opt.mesh_port == 0 ? std::string("*")
                                                     : std::to_string(opt.mesh_port));
        auto r = bind(mesh_out_, ep);
        if (!r) {
            return tl::unexpected(r.error());
        }
        mesh_ep = *r;

        mesh_in_ = zmq_socket(ctx->ctx, ZMQ_XSUB);
        set_int(mesh_in_, ZMQ_RCVHWM, hwm);
        set_int(mesh_in_, ZMQ_IPV6, 1);  // peers may be IPv6 (IPv4 endpoints still work)
        if (secure_) {  // the server key is set per peer, right before each connect
            zmq_setsockopt(mesh_in_, ZMQ_CURVE_PUBLICKEY, curve_public_.data(), 32);
            zmq_setsockopt(mesh_in_, ZMQ_CURVE_SECRETKEY, curve_secret_.data(), 32);
        }
        set_int(mesh_in_, ZMQ_SNDHWM, 0);
        set_int(mesh_in_, ZMQ_HEARTBEAT_IVL, hb);
        set_int(mesh_in_, ZMQ_HEARTBEAT_TIMEOUT, hb_timeout);
        set_int(mesh_in_, ZMQ_HEARTBEAT_TTL, hb_timeout);  // the peer's mesh out enforces it
        set_int(mesh_in_, ZMQ_RECONNECT_IVL, 100);
        // A connect to a host that drops packets (a pulled cable) would wait for the kernel's SYN
        // retries (minutes, doubling). Links now stay up across faults instead of being removed
        // and re-created, so bound each attempt: a healed link reconnects within a second.
        set_int(mesh_in_, ZMQ_CONNECT_TIMEOUT, hb_timeout);
        zmq_setsockopt(mesh_in_, ZMQ_MAXMSGSIZE, &max_mesh_msg, sizeof(max_mesh_msg));
        // answer mesh-inspector pings addressed to this node (see answer_ping), and the repair
        // protocol's requests and answers addressed to it
        for (const auto* t : {&ping_topic_, &nak_topic_, &nak_all_topic_, &rtx_topic_}) {
            const std::string sub = "\x01" + *t;
            zmq_send(mesh_in_, sub.data(), sub.size(), 0);
        }
        const std::string mon = "inproc://evmesh/" + id_text + "/monitor";
        zmq_socket_monitor(mesh_in_, mon.c_str(), ZMQ_EVENT_CONNECTED | ZMQ_EVENT_DISCONNECTED);
        monitor_ = zmq_socket(ctx->ctx, ZMQ_PAIR);
        zmq_connect(monitor_, mon.c_str());
    }
    return {};
}

node_impl::~node_impl() {
    stop();
}

void node_impl::stop() {
    // Concurrent callers queue here; the first one stops the thread, the others find it
    // stopped and return once it is.
    std::lock_guard stop_lock(stop_mu_);
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

bool node_impl::healthy() const noexcept {
    if (!running) {
        return false;
    }
    const auto beat = clock::time_point(clock::duration(loop_beat_ns.load(std::memory_order_relaxed)));
    // an idle loop wakes at least once a second
    return clock::now() - beat < opt.call_timeout + std::chrono::seconds(1);
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
    for (void** s : {&local_in_, &client_in_, &local_out_, &client_out_, &mesh_out_, &mesh_in_, &monitor_, &zap_}) {
        if (*s != nullptr) {
            zmq_close(*s);
            *s = nullptr;
        }
    }
    for (int* fd : {&udp_bcast_, &udp_uni_, &udp6_shared_, &udp6_uni_, &wake_fd_}) {
        if (*fd >= 0) {
            ::close(*fd);
            *fd = -1;
        }
    }
    hold_mesh_.reset();
    ready_.clear();
    ready_client_.clear();
    ctl_out_.clear();
    in_ = zmsg();
    in2_ = zmsg();
    sub_ = zmsg();
}

namespace {
// One call into the I/O thread. The closure runs `fn` only while the caller still waits, so a
// caller that gave up (deadline) never has its stack touched afterwards.
struct pending_call {
    std::mutex mu;
    std::condition_variable cv;
    bool done = false, abandoned = false;
};
}  // namespace

bool node_impl::call(const std::function<void()>& fn) {
    if (!running) {
        return false;
    }
    auto st = std::make_shared<pending_call>();
    {
        std::lock_guard lock(mu_);
        if (!running) {
            return false;
        }
        commands_.emplace_back([st, &fn] {
            std::lock_guard lk(st->mu);
            if (st->abandoned) {
                return;  // the caller is gone: `fn` and what it refers to may be too
            }
            fn();
            st->done = true;
            st->cv.notify_all();
        });
    }
    const std::uint64_t one = 1;
    (void)!write(wake_fd_, &one, sizeof(one));
    std::unique_lock lk(st->mu);
    if (!st->cv.wait_for(lk, opt.call_timeout, [&] { return st->done; })) {
        st->abandoned = true;
        return false;
    }
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
    out.reserve(peers_.peers().size());
    for (const auto& [k, p] : peers_.peers()) {
        out.push_back(p.info);
    }
    std::sort(out.begin(), out.end(),
              [](const peer_info& a, const peer_info& b) { return a.name < b.name; });
    return out;
}

void node_impl::run() {
    std::vector<zmq_pollitem_t> items;
    enum slot { wake, l_in, c_in, m_in, l_out, c_out, m_out, u_b, u_u, u6_b, u6_u, mon, zap, count };
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
    add(c_out, client_out_, -1);
    add(m_out, mesh_out_, -1);
    add(u_b, nullptr, udp_bcast_);
    add(u_u, nullptr, udp_uni_);
    add(u6_b, nullptr, udp6_shared_);
    add(u6_u, nullptr, udp6_uni_);
    add(mon, monitor_, -1);
    add(zap, zap_, -1);
    auto ready = [&](slot s) { return idx[s] >= 0 && (items[static_cast<std::size_t>(idx[s])].revents & ZMQ_POLLIN) != 0; };
    auto poll_input = [&](slot s, bool on) {
        if (idx[s] >= 0) {
            items[static_cast<std::size_t>(idx[s])].events = on ? ZMQ_POLLIN : 0;
        }
    };
    const bool discovery = udp_bcast_ >= 0;
    next_stats_ = clock::now() + opt.stats_interval;
    last_stats_ = clock::now();
    next_beacon_ = clock::now();
    next_expiry_ = clock::now() + opt.discovery.interval;
    next_repair_tick_ = clock::now();
    (void)peers_.expire(clock::now());  // starts the stall detector's clock

    while (!stop_) {
        int timeout = 1000;
        if (discovery) {
            timeout = std::min(ms_until(next_beacon_), ms_until(next_expiry_));
        }
        if (opt.stats_interval.count() > 0) {
            timeout = std::min(timeout, ms_until(next_stats_));
        }
        if (rx_) {
            timeout = std::min(timeout, ms_until(next_repair_tick_));
        }
        // Flow control that cannot deadlock between nodes: local inputs wait while an output
        // holds an event (backpressure to local publishers, block policy); the mesh input waits
        // only for local subscribers, never for the mesh output, so two nodes can never stall
        // each other. Held events are retried every millisecond.
        const bool held = hold_mesh_.has_value() || local_held() || !ctl_out_.empty();
        if (held) {
            timeout = std::min(timeout, 1);
        }
        poll_input(l_in, inputs_open());
        poll_input(c_in, inputs_open());
        poll_input(m_in, !local_held());
        if (zmq_poll(items.data(), static_cast<int>(items.size()), timeout) < 0) {
            if (zmq_errno() == EINTR) {
                continue;
            }
            detail::log()->error("evmesh node '{}': poll failed: {}", name, zmq_strerror(zmq_errno()));
            break;
        }
        loop_beat_ns.store(clock::now().time_since_epoch().count(), std::memory_order_relaxed);
        if (ready(wake)) {
            run_commands();
        }
        // Subscriptions first, so a subscribe that arrives with events takes effect at once.
        if (ready(l_out)) {
            on_subscriptions(local_out_, true);
        }
        if (ready(c_out)) {
            on_subscriptions(client_out_, true);
        }
        if (ready(m_out)) {
            on_subscriptions(mesh_out_, false);
        }
        flush_holds();
        if (!local_held() && ready(m_in)) {
            forward_mesh_in();
        }
        if (inputs_open() && ready(l_in)) {
            forward_local();
        }
        if (inputs_open() && ready(c_in)) {
            forward_client();
        }
        apply_disconnects();  // between whole messages, never inside one
        if (ready(u_b)) {
            on_datagrams(udp_bcast_);
        }
        if (ready(u_u)) {
            on_datagrams(udp_uni_);
        }
        if (ready(u6_b)) {
            on_datagrams(udp6_shared_);
        }
        if (ready(u6_u)) {
            on_datagrams(udp6_uni_);
        }
        if (ready(mon)) {
            on_monitor();
        }
        if (ready(zap)) {
            on_zap();
        }
        const auto now = clock::now();
        if (secure_ && now >= next_allow_check_) {
            reload_allow_file(false);
            next_allow_check_ = now + std::chrono::seconds(1);
        }
        if (rx_ && now >= next_repair_tick_) {
            repair_tick();
            next_repair_tick_ = now + std::min(opt.repair.nak_interval, opt.repair.heartbeat) / 2;
        }
        if (opt.stats_interval.count() > 0 && now >= next_stats_) {
            publish_stats();
            next_stats_ = now + opt.stats_interval;
        }
        if (discovery) {
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
        collect_counters();
        std::lock_guard lock(mu_);
        {
            std::lock_guard snap(snap_mu);
            last_counters = c;
            last_counters.peers = 0;
            last_peers.clear();
        }
        running = false;
        // commands that raced with stop are completed so no caller waits forever
        for (auto& cmd : commands_) {
            cmd();
        }
        commands_.clear();
    }
    const int linger = static_cast<int>(opt.linger.count());
    for (void* s : {local_out_, client_out_, mesh_out_}) {
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
        const auto before = c.local_in_events + c.client_in_events;
        if (!flush_holds()) {
            std::this_thread::sleep_for(std::chrono::milliseconds(1));
            continue;
        }
        forward_local();
        if (client_in_ != nullptr && inputs_open()) {
            forward_client();
        }
        if (before == c.local_in_events + c.client_in_events && inputs_open()) {
            break;
        }
    }
}

}  // namespace evmesh::detail
