// The peer table with an injected clock: expiry, stalls, restarts, caps, gossip pruning.
#include <gtest/gtest.h>

#include "discovery/peer_table.hpp"

namespace evmesh::discovery {
namespace {

using namespace std::chrono_literals;

beacon hello(std::uint8_t id, const std::string& name, std::uint64_t incarnation = 1) {
    beacon b;
    b.node_id[0] = id;
    b.node_id[15] = 1;
    b.name = name;
    b.incarnation = incarnation;
    b.mesh_port = 5000;
    return b;
}

std::string key_of(const beacon& b) {
    return std::string(reinterpret_cast<const char*>(b.node_id.data()), 16);
}

TEST(PeerTable, JoinsRefreshesAndExpiresOnTime) {
    peer_table t({800ms, 3, 1024, 100, 1024});
    const steady::time_point t0{};
    auto b = hello(1, "a");
    EXPECT_EQ(t.on_hello(key_of(b), b, "tcp://h:1", "h:9", true, t0 + 1s).what, hello_outcome::kind::joined);
    EXPECT_EQ(t.on_hello(key_of(b), b, "tcp://h:1", "h:9", true, t0 + 2s).what, hello_outcome::kind::refreshed);
    EXPECT_TRUE(t.expire(t0 + 2s + 2300ms).empty());
    EXPECT_EQ(t.expire(t0 + 2s + 2400ms).size(), 1U);
    EXPECT_TRUE(t.peers().empty());
}

TEST(PeerTable, AStalledNodeDoesNotExpireEveryone) {
    peer_table t({800ms, 3, 1024, 100, 1024});
    const steady::time_point t0 = steady::time_point{} + 1h;
    for (std::uint8_t i = 1; i <= 50; ++i) {
        auto b = hello(i, "n" + std::to_string(i));
        t.on_hello(key_of(b), b, "tcp://h:" + std::to_string(i), "h:9", true, t0);
    }
    EXPECT_TRUE(t.expire(t0 + 500ms).empty());
    // the process was frozen for 3 s: its own silence, not the peers'
    EXPECT_TRUE(t.expire(t0 + 3500ms).empty());
    EXPECT_EQ(t.stalls(), 1U);
    EXPECT_EQ(t.peers().size(), 50U);
    // peers that really went away still expire one window later
    EXPECT_EQ(t.expire(t0 + 3500ms + 2400ms).size(), 50U);
}

TEST(PeerTable, ARestartedNodeReplacesItsDisconnectedEntryAtOnce) {
    peer_table t;
    const steady::time_point t0{};
    auto old_b = hello(1, "svc", 100);
    t.on_hello(key_of(old_b), old_b, "tcp://h:1", "h:9", true, t0);
    t.set_link_state("tcp://h:1", peer_info::link_state::connected);
    auto new_b = hello(2, "svc", 200);
    // while the old one is connected, a second node of the same name is a different node
    EXPECT_EQ(t.on_hello(key_of(new_b), new_b, "tcp://h:2", "h:8", true, t0).what,
              hello_outcome::kind::joined);
    t.remove(key_of(new_b));
    t.set_link_state("tcp://h:1", peer_info::link_state::connecting);  // the old process died
    const auto out = t.on_hello(key_of(new_b), new_b, "tcp://h:2", "h:8", true, t0 + 100ms);
    EXPECT_EQ(out.what, hello_outcome::kind::replaced);
    EXPECT_EQ(out.old_endpoint, "tcp://h:1");
    EXPECT_EQ(t.peers().size(), 1U);
    EXPECT_EQ(t.replaced(), 1U);
}

TEST(PeerTable, HelloFloodsAreCappedAndRateLimited) {
    peer_table t({800ms, 3, 300, 100, 1024});
    const steady::time_point t0{};
    int joined = 0, refused = 0;
    for (int i = 0; i < 5000; ++i) {
        beacon b = hello(0, "forged");
        b.node_id[1] = static_cast<std::uint8_t>(i);
        b.node_id[2] = static_cast<std::uint8_t>(i >> 8);
        const auto out = t.on_hello(key_of(b), b, "tcp://x:1", "x:1", true,
                                    t0 + std::chrono::milliseconds(i));  // 5000 in 5 s
        joined += out.what == hello_outcome::kind::joined ? 1 : 0;
        refused += out.what == hello_outcome::kind::refused_rate || out.what == hello_outcome::kind::refused_full ? 1 : 0;
    }
    EXPECT_LE(joined, 300);
    EXPECT_EQ(joined + refused, 5000);
    EXPECT_LE(t.peers().size(), 300U);
    EXPECT_GT(t.refused_rate(), 0U);
    EXPECT_GT(t.refused_full(), 0U);
}

TEST(PeerTable, GossipTargetsArePrunedAndNotCappedAtAFixedCount) {
    peer_table t({800ms, 3, 1024, 100, 1024});
    const steady::time_point t0{};
    t.add_seed("127.0.0.1:1");
    for (int i = 0; i < 600; ++i) {
        t.learn("127.0.0.2:" + std::to_string(1000 + i), t0);
    }
    EXPECT_EQ(t.targets(t0).size(), 601U);  // more than the old fixed 256
    t.learn("127.0.0.2:1000", t0 + 4s);     // still mentioned by someone
    const auto later = t.targets(t0 + 5s);  // two expiry windows (4.8 s) without a mention
    EXPECT_EQ(later.size(), 2U);
    EXPECT_EQ(later[0], "127.0.0.1:1");  // seeds stay
    EXPECT_EQ(t.gossip_pruned(), 599U);
}

}  // namespace
}  // namespace evmesh::discovery

namespace evmesh::discovery {
namespace {

TEST(PeerTable, ALinkThatNeverComesUpIsReportedOnce) {
    peer_table t;
    const steady::time_point t0{};
    auto b = hello(1, "far");
    t.on_hello(key_of(b), b, "tcp://10.0.0.1:1", "h:9", true, t0);
    std::size_t n = 0;
    EXPECT_TRUE(t.stuck_links(t0 + 4s, 5s, n).empty());
    EXPECT_EQ(n, 0U);
    EXPECT_EQ(t.stuck_links(t0 + 6s, 5s, n).size(), 1U);
    EXPECT_EQ(n, 1U);
    EXPECT_TRUE(t.stuck_links(t0 + 7s, 5s, n).empty());  // reported once
    EXPECT_EQ(n, 1U);
    t.set_link_state("tcp://10.0.0.1:1", peer_info::link_state::connected, t0 + 8s);
    EXPECT_TRUE(t.stuck_links(t0 + 20s, 5s, n).empty());
    EXPECT_EQ(n, 0U);
}

}  // namespace
}  // namespace evmesh::discovery
