#include "discovery/peer_table.hpp"

#include <algorithm>

namespace evmesh::discovery {

hello_outcome peer_table::on_hello(const std::string& key, const beacon& b,
                                   const std::string& endpoint, const std::string& from,
                                   bool from_shared_port, steady::time_point now) {
    hello_outcome out;
    auto it = peers_.find(key);
    if (it == peers_.end()) {
        // A restarted node has a new id but the same name; its old entry, whose link is down,
        // is replaced at once instead of lingering until it expires. A live node of the same name
        // keeps its connected link and is never replaced.
        for (auto& [k, p] : peers_) {
            if (p.info.name == b.name && p.info.state != peer_info::link_state::connected
                && p.info.incarnation < b.incarnation) {
                out.old_key = k;
                out.old_endpoint = p.info.endpoint;
                break;
            }
        }
        if (out.old_key.empty()) {
            if (peers_.size() >= opt_.max_peers) {
                ++refused_full_;
                out.what = hello_outcome::kind::refused_full;
                return out;
            }
            if (now - rate_window_ >= std::chrono::seconds(1)) {
                rate_window_ = now;
                joins_in_window_ = 0;
            }
            if (joins_in_window_ >= opt_.joins_per_second) {
                ++refused_rate_;
                out.what = hello_outcome::kind::refused_rate;
                return out;
            }
            ++joins_in_window_;
            out.what = hello_outcome::kind::joined;
        } else {
            peers_.erase(out.old_key);
            ++replaced_;
            out.what = hello_outcome::kind::replaced;
        }
        peer_record p;
        p.info.id = to_string(b.node_id);
        p.info.name = b.name;
        p.info.endpoint = endpoint;
        p.info.incarnation = b.incarnation;
        p.info.observer = (b.flags & beacon_flag_observer) != 0;
        p.info.state = peer_info::link_state::connecting;
        p.connecting_since = now;
        p.curve_key = b.public_key;
        it = peers_.emplace(key, std::move(p)).first;
    } else if (it->second.info.incarnation != b.incarnation || it->second.info.endpoint != endpoint
               || it->second.curve_key != b.public_key) {
        out.what = hello_outcome::kind::moved;
        out.old_endpoint = it->second.info.endpoint;
        it->second.curve_key = b.public_key;
        it->second.info.endpoint = endpoint;
        it->second.info.incarnation = b.incarnation;
        it->second.info.name = b.name;
        it->second.info.state = peer_info::link_state::connecting;
        it->second.connecting_since = now;
        it->second.stuck_reported = false;
    }
    // `from` is the peer's own beacon socket (it sends broadcasts and unicasts from it)
    if (from_shared_port || it->second.info.beacon_address.empty()) {
        it->second.info.beacon_address = from;
    }
    it->second.info.last_seen = std::chrono::system_clock::now();
    it->second.last_seen_steady = now;
    out.peer = &it->second;
    return out;
}

std::string peer_table::remove(const std::string& key) {
    auto it = peers_.find(key);
    if (it == peers_.end()) {
        return {};
    }
    auto ep = std::move(it->second.info.endpoint);
    peers_.erase(it);
    return ep;
}

std::vector<peer_record> peer_table::expire(steady::time_point now) {
    std::vector<peer_record> dead;
    const auto bound = window();
    if (last_expire_ != steady::time_point{} && now - last_expire_ > bound) {
        // We did not run for longer than the expiry window (a stalled process or host): the
        // silence is ours, not the peers'. Give everyone a fresh window instead of expiring all.
        ++stalls_;
        for (auto& [k, p] : peers_) {
            p.last_seen_steady = now;
        }
        last_expire_ = now;
        return dead;
    }
    last_expire_ = now;
    for (auto it = peers_.begin(); it != peers_.end();) {
        if (now >= it->second.last_seen_steady + bound) {
            dead.push_back(std::move(it->second));
            it = peers_.erase(it);
        } else {
            ++it;
        }
    }
    return dead;
}

steady::time_point peer_table::next_expiry(steady::time_point now) const {
    auto next = now + opt_.interval;
    for (const auto& [k, p] : peers_) {
        next = std::min(next, p.last_seen_steady + window());
    }
    return next;
}

bool peer_table::set_link_state(const std::string& endpoint, peer_info::link_state s,
                                steady::time_point now) {
    bool found = false;
    for (auto& [k, p] : peers_) {  // every entry of that endpoint (a restart has two for a while)
        if (p.info.endpoint == endpoint) {
            if (s != peer_info::link_state::connected && p.info.state == peer_info::link_state::connected) {
                p.connecting_since = now;
            }
            if (s == peer_info::link_state::connected) {
                p.stuck_reported = false;
            }
            p.info.state = s;
            found = true;
        }
    }
    return found;
}

std::vector<const peer_record*> peer_table::stuck_links(steady::time_point now, steady::duration after,
                                                        std::size_t& count) {
    std::vector<const peer_record*> fresh;
    count = 0;
    for (auto& [k, p] : peers_) {
        if (p.info.state == peer_info::link_state::connected || now - p.connecting_since < after) {
            continue;
        }
        ++count;
        if (!p.stuck_reported) {
            p.stuck_reported = true;
            fresh.push_back(&p);
        }
    }
    return fresh;
}

peer_record* peer_table::find(const std::string& key) {
    auto it = peers_.find(key);
    return it == peers_.end() ? nullptr : &it->second;
}

void peer_table::add_seed(const std::string& addr) {
    if (std::find(seeds_.begin(), seeds_.end(), addr) == seeds_.end()) {
        seeds_.push_back(addr);
    }
}

void peer_table::learn(const std::string& addr, steady::time_point now) {
    if (std::find(seeds_.begin(), seeds_.end(), addr) != seeds_.end()) {
        return;
    }
    auto it = learned_.find(addr);
    if (it != learned_.end()) {
        it->second = now;
        return;
    }
    if (learned_.size() >= opt_.max_gossip_targets) {
        auto oldest = std::min_element(learned_.begin(), learned_.end(), [](const auto& a, const auto& b) {
            return a.second < b.second;
        });
        learned_.erase(oldest);
        ++gossip_pruned_;
    }
    learned_.emplace(addr, now);
}

std::vector<std::string> peer_table::targets(steady::time_point now) {
    std::vector<std::string> out = seeds_;
    const auto keep = window() * 2;
    for (auto it = learned_.begin(); it != learned_.end();) {
        if (now - it->second > keep) {
            it = learned_.erase(it);
            ++gossip_pruned_;
        } else {
            out.push_back(it->first);
            ++it;
        }
    }
    return out;
}

}  // namespace evmesh::discovery
