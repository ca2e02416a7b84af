#include <gtest/gtest.h>

#include <random>

#include "discovery/beacon.hpp"

namespace evmesh::discovery {
namespace {

beacon sample() {
    beacon b;
    b.mesh = "prod";
    b.node_id = new_event_id();
    b.name = "node-a";
    b.incarnation = 123456789;
    b.mesh_port = 40001;
    b.gossip = {"127.0.0.1:5000", "10.1.0.2:19470"};
    return b;
}

TEST(Beacon, RoundTrips) {
    const auto b = sample();
    auto d = decode_beacon(encode_beacon(b));
    ASSERT_TRUE(d) << d.error().message();
    EXPECT_EQ(d->mesh, b.mesh);
    EXPECT_EQ(d->node_id, b.node_id);
    EXPECT_EQ(d->name, b.name);
    EXPECT_EQ(d->incarnation, b.incarnation);
    EXPECT_EQ(d->mesh_port, b.mesh_port);
    EXPECT_EQ(d->gossip, b.gossip);
    EXPECT_EQ(d->kind, beacon_kind::hello);
}

TEST(Beacon, RejectsGarbageTruncationAndWrongMagic) {
    const auto bytes = encode_beacon(sample());
    for (std::size_t n = 0; n < bytes.size(); ++n) {
        EXPECT_FALSE(decode_beacon(bytes.substr(0, n))) << n;
    }
    EXPECT_FALSE(decode_beacon("ZYRE" + bytes.substr(4)));
    EXPECT_FALSE(decode_beacon(bytes + "x"));
    EXPECT_FALSE(decode_beacon(std::string(2000, 'E')));
    std::mt19937 rng(7);
    for (int i = 0; i < 100000; ++i) {
        auto s = bytes;
        s[4 + rng() % (s.size() - 4)] = static_cast<char>(rng());
        (void)decode_beacon(s);  // must not crash; ASan/UBSan builds check the rest
    }
}

}  // namespace
}  // namespace evmesh::discovery
