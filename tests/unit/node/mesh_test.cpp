#include <gtest/gtest.h>

#include <arpa/inet.h>
#include <netinet/in.h>
#include <sys/socket.h>
#include <unistd.h>

#include <array>
#include <mutex>
#include <set>

#include <evmesh/node.hpp>

#include "../../support/mesh.hpp"
#include "../../support/wait.hpp"

namespace evmesh {
namespace {

using namespace std::chrono_literals;
using test::wait_until;

using test::full_mesh;
using test::mesh_options;

// Collects events of one callback subscription.
struct collector {
    std::mutex mu;
    std::vector<event> events;
    std::set<std::string> warm_sources;

    event_callback callback() {
        return [this](const event_view& v) {
            std::lock_guard lock(mu);
            if (v.topic.starts_with("warm.")) {
                warm_sources.insert(std::string(v.source));
            } else {
                events.push_back(v.to_event());
            }
        };
    }

    std::size_t count() {
        std::lock_guard lock(mu);
        return events.size();
    }
};

TEST(Mesh, FiveNodesDeliverEveryEventExactlyOnce) {
    const auto mesh = test::unique_mesh("five");
    const auto port = test::unique_port();
    constexpr int n_nodes = 5;
    std::vector<std::unique_ptr<node>> nodes;
    for (int i = 0; i < n_nodes; ++i) {
        auto n = node::create(mesh_options(mesh, "n" + std::to_string(i), port));
        ASSERT_TRUE(n) << n.error().message();
        nodes.push_back(std::move(*n));
    }
    ASSERT_TRUE(wait_until([&] { return full_mesh(nodes); }, 10s)) << "no full mesh";

    // per node: a tail subscriber, a one-segment wildcard, and a warm-up probe
    std::array<std::array<collector, 2>, n_nodes> got;
    std::array<collector, n_nodes> warm;
    std::vector<subscription> subs;
    for (int i = 0; i < n_nodes; ++i) {
        auto& n = *nodes[static_cast<std::size_t>(i)];
        auto a = n.subscribe("mesh.>", got[static_cast<std::size_t>(i)][0].callback());
        auto b = n.subscribe("mesh.*.evt", got[static_cast<std::size_t>(i)][1].callback());
        auto w = n.subscribe("warm.>", warm[static_cast<std::size_t>(i)].callback());
        ASSERT_TRUE(a && b && w);
        subs.push_back(std::move(*a));
        subs.push_back(std::move(*b));
        subs.push_back(std::move(*w));
    }
    std::vector<publisher> pubs;
    for (auto& n : nodes) {
        auto p = n->make_publisher({.name = "app"});
        ASSERT_TRUE(p);
        pubs.push_back(std::move(*p));
    }
    ASSERT_TRUE(wait_until(
        [&] {
            for (auto& p : pubs) {
                (void)p.publish("warm.x", "w");
            }
            for (auto& w : warm) {
                std::lock_guard lock(w.mu);
                if (w.warm_sources.size() != n_nodes) {
                    return false;
                }
            }
            return true;
        },
        10s))
        << "subscriptions did not propagate";

    constexpr int per_node = 50;
    for (int k = 0; k < per_node; ++k) {
        for (int i = 0; i < n_nodes; ++i) {
            ASSERT_TRUE(pubs[static_cast<std::size_t>(i)].publish("mesh.n" + std::to_string(i) + ".evt", "x"));
            ASSERT_TRUE(pubs[static_cast<std::size_t>(i)].publish("mesh.n" + std::to_string(i) + ".other.evt", "y"));
        }
    }
    const std::size_t tail_expected = n_nodes * per_node * 2;
    const std::size_t star_expected = n_nodes * per_node;
    for (auto& node_got : got) {
        ASSERT_TRUE(wait_until([&] {
            return node_got[0].count() >= tail_expected && node_got[1].count() >= star_expected;
        }, 10s));
    }
    std::this_thread::sleep_for(200ms);  // would-be duplicates arrive now
    for (int i = 0; i < n_nodes; ++i) {
        for (int s = 0; s < 2; ++s) {
            auto& c = got[static_cast<std::size_t>(i)][static_cast<std::size_t>(s)];
            std::lock_guard lock(c.mu);
            std::set<event_id> ids;
            std::set<std::string> sources;
            for (const auto& ev : c.events) {
                ids.insert(ev.id);
                sources.insert(ev.source);
                if (s == 1) {
                    EXPECT_TRUE(ev.topic.ends_with(".evt") && ev.topic.find(".other.") == std::string::npos);
                }
            }
            const auto expected = s == 0 ? tail_expected : star_expected;
            EXPECT_EQ(c.events.size(), expected) << "node " << i << " sub " << s;
            EXPECT_EQ(ids.size(), expected) << "duplicates at node " << i;
            EXPECT_EQ(sources.size(), static_cast<std::size_t>(n_nodes));
        }
    }
    for (auto& sub : subs) {
        EXPECT_EQ(sub.counters().gaps, 0U);
    }

    // Node 0 unsubscribes everything: its peers stop sending to it, others still receive.
    const auto before = nodes[0]->counters().mesh_in_events;
    for (int s = 0; s < 3; ++s) {
        subs[static_cast<std::size_t>(s)].close();
    }
    ASSERT_TRUE(wait_until([&] { return nodes[0]->counters().subscriptions_local == 0; }));
    std::this_thread::sleep_for(200ms);  // unsubscribe travels to the peers
    const auto n1_before = got[1][0].count();
    for (int i = 1; i < n_nodes; ++i) {
        ASSERT_TRUE(pubs[static_cast<std::size_t>(i)].publish("mesh.after.evt", "z"));
    }
    ASSERT_TRUE(wait_until([&] { return got[1][0].count() >= n1_before + n_nodes - 1; }));
    std::this_thread::sleep_for(100ms);
    EXPECT_EQ(nodes[0]->counters().mesh_in_events, before) << "events still flow to node 0";
}

TEST(Mesh, DifferentMeshNamesStayApart) {
    const auto port = test::unique_port();
    auto a = node::create(mesh_options(test::unique_mesh("red"), "a", port));
    auto b = node::create(mesh_options(test::unique_mesh("blue"), "b", port));
    ASSERT_TRUE(a && b);
    ASSERT_TRUE(wait_until([&] { return (*a)->counters().beacons_foreign > 2; }));
    EXPECT_TRUE((*a)->peers().empty());
    EXPECT_TRUE((*b)->peers().empty());
}

TEST(Mesh, GoodbyeRemovesPeerAtOnceAndRestartRejoins) {
    const auto mesh = test::unique_mesh("bye");
    const auto port = test::unique_port();
    auto o = mesh_options(mesh, "stay", port);
    o.discovery.missed_beacons = 50;  // expiry far away: only goodbye can explain a fast removal
    auto stay = node::create(o);
    ASSERT_TRUE(stay);
    auto sub = (*stay)->subscribe("r.>");
    ASSERT_TRUE(sub);
    for (int round = 0; round < 2; ++round) {
        auto leaver = node::create(mesh_options(mesh, "leaver", port));
        ASSERT_TRUE(leaver);
        ASSERT_TRUE(wait_until([&] { return (*stay)->peers().size() == 1; }));
        auto pub = (*leaver)->make_publisher();
        ASSERT_TRUE(pub);
        ASSERT_TRUE(wait_until([&] {
            (void)pub->publish("r.x", "hello");
            return sub->receive_view(5ms).has_value();
        })) << "restarted node did not deliver (round " << round << ")";
        const auto t0 = std::chrono::steady_clock::now();
        (*leaver)->stop();
        ASSERT_TRUE(wait_until([&] { return (*stay)->peers().empty(); }, 2s));
        EXPECT_LT(std::chrono::steady_clock::now() - t0, 500ms);
    }
    EXPECT_GE((*stay)->counters().peers_left + (*stay)->counters().peers_link_lost, 2U);
}

TEST(Mesh, GarbageOnTheBeaconPortIsCountedAndIgnored) {
    const auto port = test::unique_port();
    auto n = node::create(mesh_options(test::unique_mesh("junk"), "victim", port));
    ASSERT_TRUE(n);
    // the beacon port receives loopback broadcasts (host scope), so that is where garbage goes
    const int fd = socket(AF_INET, SOCK_DGRAM, 0);
    const int one = 1;
    setsockopt(fd, SOL_SOCKET, SO_BROADCAST, &one, sizeof(one));
    sockaddr_in to{};
    to.sin_family = AF_INET;
    to.sin_port = htons(port);
    to.sin_addr.s_addr = htonl(0x7fffffff);  // 127.255.255.255
    const std::vector<std::string> junk = {"", "EVMB", "EVMB\x99\x01", std::string(1500, 'x'),
                                           "ZRE\x01garbage", "EVMB\x9f\x01\x01"};
    for (const auto& j : junk) {
        sendto(fd, j.data(), j.size(), 0, reinterpret_cast<sockaddr*>(&to), sizeof(to));
    }
    close(fd);
    ASSERT_TRUE(wait_until([&] { return (*n)->counters().beacons_rejected >= junk.size(); }));
    EXPECT_TRUE((*n)->peers().empty());
    EXPECT_TRUE((*n)->running());
}

}  // namespace
}  // namespace evmesh
