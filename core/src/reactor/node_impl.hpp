// The node's reactor: one thread owns every socket of a node (see docs/ARCHITECTURE.md).
#pragma once

#include <zmq.h>

#include <atomic>
#include <chrono>
#include <deque>
#include <optional>
#include <cstdint>
#include <functional>
#include <set>
#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <thread>
#include <unordered_map>
#include <vector>

#include <evmesh/node.hpp>

#include "discovery/peer_table.hpp"
#include "history/tail.hpp"
#include "reactor/repair.hpp"
#include "reactor/sub_registry.hpp"
#include "util/zmsg.hpp"
#include "reactor/zmq_util.hpp"
#include <evmesh/codec.hpp>
#include <evmesh/topic.hpp>
#include "util/string_hash.hpp"

namespace evmesh::detail {

// A ZeroMQ context shared by a node and every publisher/subscription made from it, so a handle
// that outlives its node never blocks context termination.
struct shared_context {
    void* ctx;
    std::atomic<std::uint64_t> publish_rejected{0};  // embedded publishers' limit refusals

    shared_context() : ctx(zmq_ctx_new()) {}

    ~shared_context() { zmq_ctx_term(ctx); }

    shared_context(const shared_context&) = delete;
    shared_context& operator=(const shared_context&) = delete;
};

// Logs at most once per second, counting what it suppressed.
class log_limiter {
public:
    bool allow(std::uint64_t& suppressed_out) noexcept {
        const auto now = std::chrono::steady_clock::now();
        if (now - last_ >= std::chrono::seconds(1)) {
            last_ = now;
            suppressed_out = suppressed_;
            suppressed_ = 0;
            return true;
        }
        ++suppressed_;
        return false;
    }

private:
    std::chrono::steady_clock::time_point last_{};
    std::uint64_t suppressed_ = 0;
};

// Events and bytes of one topic (or one source node), with the values at the last stats event.
struct flow_stat {
    std::uint64_t events = 0, bytes = 0, prev_events = 0;
};

using flow_map = std::unordered_map<std::string, flow_stat, string_hash, std::equal_to<>>;

// Counts events per key with a one-entry cache: publishers repeat topics, so most events skip
// the hash. Bounded: keys beyond `max_keys` are counted in `other`.
class flow_counter {
public:
    void count(std::string_view key, std::size_t bytes) {
        if (last_ == nullptr || key != last_key_) {
            auto it = map_.find(key);
            if (it == map_.end()) {
                if (map_.size() >= max_keys) {
                    ++other_.events;
                    other_.bytes += bytes;
                    return;
                }
                it = map_.emplace(std::string(key), flow_stat{}).first;
            }
            last_ = &it->second;
            last_key_.assign(key);
        }
        ++last_->events;
        last_->bytes += bytes;
    }

    flow_map& map() { return map_; }
    flow_stat& other() { return other_; }

    static constexpr std::size_t max_keys = 4096;

private:
    flow_map map_;
    flow_stat other_;
    flow_stat* last_ = nullptr;  // node-based map: stable until erased (never erased)
    std::string last_key_;
};

struct node_impl {
    static result<std::unique_ptr<node_impl>> create(node_options options);
    ~node_impl();

    // Runs `fn` on the reactor thread and waits for it, at most opt.call_timeout. False when the
    // node is stopped or the loop did not answer in time (then `fn` never runs).
    bool call(const std::function<void()>& fn);
    void stop();
    bool healthy() const noexcept;

    node_options opt;
    std::shared_ptr<shared_context> ctx;
    std::string name;
    event_id id{};
    std::string id_text;
    std::uint64_t incarnation = 0;
    std::string local_in_ep, local_out_ep, mesh_ep;
    std::vector<std::string> pub_eps, sub_eps;
    std::atomic<bool> running{false};
    std::thread::id io_thread;
    std::atomic<std::uint64_t> publisher_seq{0};
    std::atomic<std::int64_t> loop_beat_ns{0};       // steady time of the last loop turn
    decode_limits limits;                            // one set of limits for every decoder

    // snapshots: the last ones taken (returned when the loop does not answer) and at stop
    mutable std::mutex snap_mu;
    node_counters last_counters;
    std::vector<peer_info> last_peers;
    std::deque<node::lost_range> lost_log;  // guarded by snap_mu; bounded 1024

    sub_registry subs;  // embedded subscriptions' counters (own mutex)

    // reactor-owned state (touch only from the reactor thread, or before start / after join)
    node_counters c;
    std::vector<peer_info> snapshot_peers() const;
    void collect_subscriber_counters();
    void collect_counters();

    // Topic prefix of the subscription handshake (make_sub): `_evmesh.sync.<random>`.
    static constexpr std::string_view sync_prefix = "_evmesh.sync.";
    // Sync tokens of subscribe() calls in progress: only expected tokens are recorded, so a client
    // subscribing to `_evmesh.sync.*` prefixes cannot evict a real waiter's (bounded by callers).
    std::mutex sync_mu;
    std::map<std::string, bool> sync_expected;  // token -> seen; guarded by sync_mu

    // node::set_allow_list on the I/O thread; false when security is off.
    bool replace_allow_list(std::set<std::string> keys, const std::vector<std::string>& inline_keys,
                            const std::string& allow_file);

    // node::set_channel_stats: the source of the stats event's `channels` (any thread).
    void set_history_stats(std::function<std::vector<history_stats>()> source) {
        std::lock_guard lk(channel_stats_mu_);
        history_stats_ = std::move(source);
    }
    // Repair beyond the window (docs/HISTORY.md, "One mechanism"): a NAK for events that aged
    // out of the in-memory window goes to the history service when one of the node's histories
    // records the topic; it answers from disk through post_repair(). Set and cleared by node
    // (any thread); used on the I/O thread.
    using history_nak = repair_request;
    void set_history_repair(std::vector<topic_pattern> patterns, std::function<void(history_nak)> fn);
    // From the history thread: `frames` are complete rtx frames (`_evmesh.rtx.<requester> 00
    // <stored mesh frame>`), queued for the mesh in order, then the fill that answers `job`
    // (PROTOCOL.md 8.6). Non-blocking: runs on the I/O thread's next turn.
    void post_repair(history_nak job, std::vector<std::string> frames, std::uint64_t last_sent,
                     std::uint64_t first_sent, std::uint64_t lost_to);

    void set_channel_stats(std::function<std::string()> source) {
        std::lock_guard lk(channel_stats_mu_);
        channel_stats_ = std::move(source);
    }

private:
    node_impl() = default;
    // --- lifecycle and loop (node_impl.cpp) ---
    result<void> open_sockets();
    void close_all();
    void remove_ipc_files();
    void run();
    void run_commands();
    void drain_on_stop();

    // --- router: the hot path (router.cpp) ---
    void forward_local();
    void forward_client();
    void forward_mesh_in();
    void deliver_local_origin(zmsg frame);  // to local subscribers and peers
    void deliver_mesh(zmsg frame);          // to local subscribers only (one hop)
    void deliver_local(zmsg& frame);        // to both local outputs, holding what they refuse
    bool send_inproc(zmsg& frame);
    bool send_client(zmsg& frame);
    bool flush_holds();
    bool local_held() const { return !ready_.empty() || !ready_client_.empty(); }
    bool inputs_open() const { return !hold_mesh_ && !local_held(); }
    void on_subscriptions(void* from, bool from_local);
    bool inject(const std::string& topic, const std::string& body, bool to_mesh);
    // `reason` is a stable code (PROTOCOL.md 10.2, rejected.by_reason); `what` is for the log
    void count_reject(std::string_view reason, std::string_view what, std::string_view topic);
    void retain(zmsg& frame, std::string_view topic, std::string_view body,
                std::chrono::steady_clock::time_point now);

    // --- repair: lossless links (router.cpp) ---
    void setup_repair();
    bool repaired(std::string_view topic);
    void on_mesh_reserved(std::string_view topic, std::string_view body, zmsg& frame);
    void serve_nak(std::string_view body);
    void send_control(const std::string& topic, const std::string& body);
    void queue_control(std::string_view frame);  // bounded: the oldest goes first
    void repair_tick();
    std::int64_t wanted_since(std::string_view topic) const;

    // --- discovery and links (discovery.cpp) ---
    result<void> open_discovery();
    void on_datagrams(int fd);
    void on_monitor();
    void send_beacon(bool goodbye);
    void send_beacon_to(const std::string& bytes, const net_addr& to);
    void expire_peers();
    void remove_peer(const std::string& key, const char* why);
    void link_connect(const std::string& endpoint, const std::string& curve_key);
    void link_disconnect(const std::string& endpoint);
    void apply_disconnects();
    std::string make_beacon(bool goodbye);

    // --- security (security.cpp) ---
    result<void> setup_security();
    void reload_allow_file(bool initial);

    void on_zap();

    // --- stats (stats.cpp) ---
    void sample_latency(std::string_view body);
    void publish_stats();
    void answer_ping(std::string_view topic, std::string_view body);
    std::string encode_stats(double elapsed_s);

    std::thread thread_;
    std::mutex stop_mu_;  // serialises stop()
    std::mutex mu_;
    std::vector<std::function<void()>> commands_;  // guarded by mu_
    int wake_fd_ = -1;
    bool stop_ = false;

    void* local_in_ = nullptr;   // XSUB: embedded publishers (inproc, trusted, one-frame)
    void* client_in_ = nullptr;  // XSUB: client publishers (ipc/tcp, validated, two-frame v1)
    void* local_out_ = nullptr;  // XPUB: embedded subscriptions (inproc, one frame per event)
    void* client_out_ = nullptr; // XPUB: client subscribers on sub endpoints (two-frame v1)
    void* mesh_out_ = nullptr;   // XPUB: peers' mesh_in connect here (one-frame, mesh protocol 2)
    void* mesh_in_ = nullptr;    // XSUB: connects to every peer's mesh_out
    void* monitor_ = nullptr;    // PAIR: mesh_in socket events
    void* zap_ = nullptr;        // REP: ZAP handler (secured mesh), checks the allow-list
    int udp_bcast_ = -1;         // bound to the shared beacon port
    int udp_uni_ = -1;           // this node's own beacon socket (sends, unicast replies)
    std::string uni_address_;    // "ip:port" of udp_uni_
    int udp6_shared_ = -1;       // scope lan, IPv6: [::]:port (seeds address the shared port)
    int udp6_uni_ = -1;          // scope lan, IPv6: this node's own IPv6 beacon socket
    std::string uni6_address_;   // "[ip]:port" of udp6_uni_

    // router state
    zmsg in_, in2_, sub_;                 // reused receive messages
    std::optional<zmsg> hold_mesh_;       // block policy: a local event waiting for mesh_out
    std::deque<zmsg> ready_;              // frames waiting for local_out (in order)
    std::deque<zmsg> ready_client_;       // frames waiting for client_out (in order)
    std::deque<zmsg> ctl_out_;            // control frames for mesh_out (naks, repairs)
    std::string frame_buf_;               // building a mesh frame from a client event
    struct sub_entry {
        int refs = 0;
        std::int64_t since_ns = 0;  // when the prefix was first subscribed (repair's `since`)
    };
    std::unordered_map<std::string, sub_entry> local_subs_, mesh_subs_;
    std::unordered_map<std::string, int> inproc_subs_, client_subs_;  // per local output
    std::unordered_map<std::string, std::uint64_t> client_seq_;
    std::string scratch_;
    log_limiter reject_log_, beacon_log_, compat_log_, lost_log_;
    flow_counter topics_;         // published here (local and client input)
    std::map<std::string, std::uint64_t> reject_reasons_, reject_topics_;  // bounded, see reject
    flow_counter sources_;        // received from the mesh, per source node (edges of the graph)
    std::uint32_t latency_tick_ = 0;
    std::string stats_topic_, ping_topic_, nak_topic_, nak_all_topic_, rtx_topic_;

    // repair
    std::vector<topic_pattern> repair_patterns_;
    std::string repaired_topic_ = std::string(1, '\0');  // repaired()'s cache (never a topic)
    bool repaired_answer_ = false;
    std::unique_ptr<history_tail> tail_;
    std::unique_ptr<repair_rx> rx_;
    std::chrono::steady_clock::time_point next_repair_tick_{};

    // discovery and links
    discovery::peer_table peers_;
    std::vector<std::string> disconnects_;  // applied between messages (apply_disconnects)
    struct link_ref {
        int refs = 0;
        std::string curve_key;
    };
    std::unordered_map<std::string, link_ref> links_;  // endpoint -> peer entries using it

    std::mutex channel_stats_mu_;
    std::function<std::string()> channel_stats_;  // `channels` of the stats event (node::set_channel_stats)
    std::function<std::vector<history_stats>()> history_stats_;  // `history` of the stats event
    std::vector<topic_pattern> history_repair_patterns_;        // guarded by channel_stats_mu_
    std::function<void(history_nak)> history_repair_;           // guarded by channel_stats_mu_
    void send_fill(std::string_view requester, std::string_view source, std::string_view topic,
                   std::uint64_t from, std::uint64_t last_sent, std::uint64_t first_sent, std::uint64_t lost_to);
    bool secure_ = false;
    std::string curve_public_, curve_secret_;  // 32 bytes each
    std::string mesh_key_;                     // beacon MAC key
    std::set<std::string> allowed_, allowed_static_;  // 32-byte public keys
    std::set<std::string> allowed_learned_;  // trust_authenticated_beacons: kept across reloads
    void revoke_disallowed();                // drops peers whose key is no longer allowed
    std::int64_t allow_mtime_ns_ = -1;
    std::chrono::steady_clock::time_point next_allow_check_{};
    std::unordered_map<std::string, std::uint64_t> beacon_last_ms_;  // replay guard, per node id
    log_limiter auth_log_;
    std::uint64_t stats_seq_ = 0, pong_seq_ = 0, ctl_seq_ = 0;
    std::chrono::steady_clock::time_point started_{}, next_stats_{}, last_stats_{};
    node_counters prev_c_;
    std::chrono::steady_clock::time_point next_beacon_{}, next_expiry_{};
    int burst_left_ = 3;
};

}  // namespace evmesh::detail
