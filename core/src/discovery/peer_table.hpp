// The peer table: what discovery knows of the other nodes (join, restart, leave, expiry, gossip
// targets). Pure logic: no sockets, the clock is a parameter, so unit tests drive it directly.
// The node owns one and applies its answers to the mesh links (docs/ARCHITECTURE.md).
#pragma once

#include <chrono>
#include <cstdint>
#include <string>
#include <unordered_map>
#include <vector>

#include <evmesh/node.hpp>

#include "discovery/beacon.hpp"

namespace evmesh::discovery {

using steady = std::chrono::steady_clock;

struct peer_table_options {
    std::chrono::milliseconds interval{800};  // beacon period
    std::uint32_t missed_beacons = 3;         // silent intervals before a peer expires
    std::size_t max_peers = 1024;             // hellos beyond this are refused (counted)
    std::uint32_t joins_per_second = 100;     // new peers admitted per second (burst = this)
    std::size_t max_gossip_targets = 1024;    // learned unicast targets kept (oldest replaced)
};

struct peer_record {
    peer_info info;
    std::string curve_key;  // 32-byte public key from its (authenticated) beacon; secured mesh
    steady::time_point last_seen_steady;
    steady::time_point connecting_since;  // when the link last left `connected` (or began)
    bool stuck_reported = false;          // logged once as a link that does not come up
};

// What a hello did to the table.
struct hello_outcome {
    enum class kind {
        refreshed,     // known peer, nothing changed
        joined,        // new peer: connect to info.endpoint
        moved,         // same node, new incarnation, endpoint or key: reconnect (old_endpoint)
        replaced,      // a restarted node (same name, new id) replaced a disconnected entry
        refused_full,  // table at max_peers
        refused_rate,  // joins_per_second exceeded
    };
    kind what = kind::refreshed;
    peer_record* peer = nullptr;  // the entry (refreshed, joined, moved, replaced)
    std::string old_key;          // replaced: the entry that was removed
    std::string old_endpoint;     // moved or replaced: the endpoint to disconnect
};

class peer_table {
public:
    explicit peer_table(peer_table_options o = {}) : opt_(o) {}

    // A hello beacon `b` whose mesh endpoint is `endpoint`, sent from beacon address `from`.
    // `key` is the 16-byte node id.
    hello_outcome on_hello(const std::string& key, const beacon& b, const std::string& endpoint,
                           const std::string& from, bool from_shared_port, steady::time_point now);

    // Removes a peer (goodbye, revocation). Returns the removed record's endpoint or "".
    std::string remove(const std::string& key);

    // Peers silent for missed_beacons intervals, removed and returned. When the caller itself was
    // stalled past the expiry window (now - previous call > window), nobody is expired: every
    // peer's clock restarts, since the silence was ours (counted in stalls()).
    std::vector<peer_record> expire(steady::time_point now);

    // The earliest time expire() has work to do.
    steady::time_point next_expiry(steady::time_point now) const;

    // Sets a peer's link state (from the links' monitor). False when unknown.
    bool set_link_state(const std::string& endpoint, peer_info::link_state s,
                        steady::time_point now = steady::now());

    // Peers whose beacons arrive but whose link has not been up for `after` (a firewall, a wrong
    // advertised address, a one-way partition): the ones not reported yet are returned (and
    // marked), so each is logged once; `count` gets how many are stuck now.
    std::vector<const peer_record*> stuck_links(steady::time_point now, steady::duration after,
                                                std::size_t& count);

    // Gossip: unicast beacon targets. Seeds stay for ever; learned ones are dropped when nobody
    // has mentioned them for two expiry windows.
    void add_seed(const std::string& addr);
    void learn(const std::string& addr, steady::time_point now);
    std::vector<std::string> targets(steady::time_point now);

    const std::unordered_map<std::string, peer_record>& peers() const { return peers_; }
    peer_record* find(const std::string& key);

    std::uint64_t stalls() const { return stalls_; }
    std::uint64_t refused_full() const { return refused_full_; }
    std::uint64_t refused_rate() const { return refused_rate_; }
    std::uint64_t replaced() const { return replaced_; }
    std::uint64_t gossip_pruned() const { return gossip_pruned_; }

    steady::duration window() const { return opt_.interval * opt_.missed_beacons; }

private:
    peer_table_options opt_;
    std::unordered_map<std::string, peer_record> peers_;  // key: 16-byte node id
    std::vector<std::string> seeds_;
    std::unordered_map<std::string, steady::time_point> learned_;  // addr -> last mentioned
    steady::time_point last_expire_{};
    steady::time_point rate_window_{};
    std::uint32_t joins_in_window_ = 0;
    std::uint64_t stalls_ = 0, refused_full_ = 0, refused_rate_ = 0, replaced_ = 0,
                  gossip_pruned_ = 0;
};

}  // namespace evmesh::discovery
