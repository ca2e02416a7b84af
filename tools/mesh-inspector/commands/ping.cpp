#include <algorithm>
#include <condition_variable>
#include <cstdio>
#include <thread>

#include <evmesh/codec.hpp>

#include "commands.hpp"

namespace evmesh::inspector {

namespace {
// A node by exact name, or by an id prefix or suffix that only one node has.
std::string find_node_id(node& self, const std::string& name, std::chrono::milliseconds wait) {
    const auto deadline = std::chrono::steady_clock::now() + wait;
    while (std::chrono::steady_clock::now() < deadline) {
        std::vector<std::string> matches;
        for (const auto& p : self.peers()) {
            if (p.observer) {
                continue;
            }
            if (p.name == name) {
                return p.id;
            }
            if (name.size() >= 4 && (p.id.rfind(name, 0) == 0 || p.id.ends_with(name))) {
                matches.push_back(p.id);
            }
        }
        if (matches.size() == 1) {
            return matches.front();
        }
        if (matches.size() > 1) {
            std::fprintf(stderr, "mesh-inspector: '%s' matches %zu nodes; give more of the id\n", name.c_str(),
                         matches.size());
            return {};
        }
        std::this_thread::sleep_for(std::chrono::milliseconds(10));
    }
    return {};
}
}  // namespace

int run_ping(const mesh_options& o, const std::string& node_name, int count, int interval_ms) {
    auto self = join_mesh(o);
    if (!self) {
        return exit_usage;
    }
    const auto target = find_node_id(*self, node_name, std::chrono::milliseconds(o.wait_ms));
    if (target.empty()) {
        std::fprintf(stderr, "mesh-inspector: node '%s' not found in mesh '%s'\n", node_name.c_str(), o.mesh.c_str());
        return exit_not_found;
    }
    std::mutex mu;
    std::condition_variable cv;
    std::map<std::string, std::int64_t> answered;  // nonce -> receive time
    const std::string reply_to = "_evmesh.pong." + self->id();
    auto sub = self->subscribe(reply_to, [&](const event_view& ev) {
        std::lock_guard lock(mu);
        answered[std::string(ev.header_value("nonce"))] = now_ns();
        cv.notify_all();
    });
    auto pub = self->make_publisher({.name = "ping", .policy = overflow_policy::drop});
    if (!sub || !pub) {
        return exit_usage;
    }
    auto probe = [&](const std::string& nonce, std::chrono::milliseconds timeout) -> std::int64_t {
        const auto sent = now_ns();
        (void)pub->publish("_evmesh.ping." + target, {}, {{"reply-to", reply_to}, {"nonce", nonce}});
        std::unique_lock lock(mu);
        if (!cv.wait_for(lock, timeout, [&] { return answered.count(nonce) != 0; })) {
            return -1;
        }
        return answered[nonce] - sent;
    };
    // the first probes also wait for the subscriptions to travel both ways
    bool ready = false;
    for (int i = 0; i < 100 && !ready; ++i) {
        ready = probe("warm-" + std::to_string(i), std::chrono::milliseconds(50)) >= 0;
    }
    if (!ready) {
        std::fprintf(stderr, "mesh-inspector: no answer from '%s'\n", node_name.c_str());
        return exit_not_found;
    }
    std::vector<double> rtt_us;
    int lost = 0;
    for (int i = 0; i < count; ++i) {
        const auto ns = probe("p" + std::to_string(i), std::chrono::milliseconds(1000));
        if (ns < 0) {
            ++lost;
        } else {
            rtt_us.push_back(static_cast<double>(ns) / 1000.0);
            if (!o.json && count <= 20) {
                std::printf("reply from %s: seq=%d time=%.0f us\n", node_name.c_str(), i, rtt_us.back());
            }
        }
        std::this_thread::sleep_for(std::chrono::milliseconds(interval_ms));
    }
    std::sort(rtt_us.begin(), rtt_us.end());
    auto pct = [&](double q) {
        return rtt_us.empty() ? 0.0 : rtt_us[std::min(rtt_us.size() - 1, static_cast<std::size_t>(q * static_cast<double>(rtt_us.size())))];
    };
    const json result = {{"node", node_name}, {"id", target}, {"sent", count}, {"received", rtt_us.size()},
                         {"lost", lost}, {"min_us", rtt_us.empty() ? 0.0 : rtt_us.front()}, {"p50_us", pct(0.5)},
                         {"p99_us", pct(0.99)}, {"max_us", rtt_us.empty() ? 0.0 : rtt_us.back()}};
    if (o.json) {
        std::printf("%s\n", result.dump(2).c_str());
    } else {
        std::printf("--- %s: %d probes, %zu answered, round trip min %.0f / p50 %.0f / p99 %.0f / max %.0f us\n",
                    node_name.c_str(), count, rtt_us.size(), result["min_us"].get<double>(), pct(0.5), pct(0.99),
                    result["max_us"].get<double>());
    }
    return rtt_us.empty() ? exit_not_found : exit_ok;
}

int run_publish(const mesh_options& o,
                const std::string& topic,
                const std::string& payload,
                const std::vector<std::string>& headers,
                const std::string& content_type) {
    if (!valid_topic(topic)) {
        std::fprintf(stderr, "mesh-inspector: invalid topic '%s'\n", topic.c_str());
        return exit_usage;
    }
    std::vector<header> hs;
    for (const auto& h : headers) {
        const auto eq = h.find('=');
        if (eq == std::string::npos) {
            std::fprintf(stderr, "mesh-inspector: header '%s' is not key=value\n", h.c_str());
            return exit_usage;
        }
        hs.emplace_back(h.substr(0, eq), h.substr(eq + 1));
    }
    auto self = join_mesh(o);
    if (!self) {
        return exit_usage;
    }
    // Wait until every node we know of is connected and has had time to send its subscriptions
    // (they follow the connect at once), and no newcomer appeared for a while: a published event
    // reaches exactly the subscribers present at that moment.
    const auto deadline = std::chrono::steady_clock::now() + std::chrono::milliseconds(o.wait_ms);
    std::size_t peers = 0, last_total = 0;
    auto stable_since = std::chrono::steady_clock::now();
    while (std::chrono::steady_clock::now() < deadline) {
        const auto ps = self->peers();
        const auto connected = static_cast<std::size_t>(std::count_if(ps.begin(), ps.end(), [](const peer_info& p) {
            return p.state == peer_info::link_state::connected;
        }));
        peers = static_cast<std::size_t>(std::count_if(ps.begin(), ps.end(), [](const peer_info& p) {
            return p.state == peer_info::link_state::connected && !p.observer;
        }));
        if (ps.size() != last_total || connected != ps.size()) {
            last_total = ps.size();
            stable_since = std::chrono::steady_clock::now();
        } else if (!ps.empty() && std::chrono::steady_clock::now() - stable_since > std::chrono::milliseconds(300)) {
            break;
        }
        std::this_thread::sleep_for(std::chrono::milliseconds(10));
    }
    auto pub = self->make_publisher({.name = "publish"});
    if (!pub) {
        return exit_usage;
    }
    event ev;
    ev.topic = topic;
    ev.payload = payload;
    ev.headers = hs;
    ev.content_type = content_type;
    if (auto r = pub->publish(ev); !r) {
        std::fprintf(stderr, "mesh-inspector: publish failed: %s\n", r.error().message().c_str());
        return exit_not_found;
    }
    const json out = {{"topic", topic}, {"id", to_string(ev.id)}, {"source", ev.source}, {"peers", peers}};
    std::printf("%s\n", o.json ? out.dump().c_str()
                               : ("published " + to_string(ev.id) + " on " + topic + " to a mesh of "
                                  + std::to_string(peers) + " peers").c_str());
    std::this_thread::sleep_for(std::chrono::milliseconds(100));  // let the node hand it over
    return peers > 0 ? exit_ok : exit_not_found;
}

}  // namespace evmesh::inspector
