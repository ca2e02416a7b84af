#include <gtest/gtest.h>

#include <evmesh/topic.hpp>

namespace evmesh {
namespace {

topic_pattern p(std::string_view s) {
    auto r = topic_pattern::parse(s);
    EXPECT_TRUE(r) << s;
    return *r;
}

TEST(TopicPattern, ExactMatchesOnlyItself) {
    auto t = p("orders.created");
    EXPECT_TRUE(t.exact());
    EXPECT_EQ(t.zmq_prefix(), "orders.created");
    EXPECT_TRUE(t.matches("orders.created"));
    EXPECT_FALSE(t.matches("orders.createdx"));
    EXPECT_FALSE(t.matches("orders.created.eu"));
    EXPECT_FALSE(t.matches("orders"));
}

TEST(TopicPattern, StarMatchesOneSegment) {
    auto t = p("orders.*.created");
    EXPECT_EQ(t.zmq_prefix(), "orders.");
    EXPECT_TRUE(t.matches("orders.eu.created"));
    EXPECT_TRUE(t.matches("orders.us.created"));
    EXPECT_FALSE(t.matches("orders.created"));
    EXPECT_FALSE(t.matches("orders.eu.west.created"));
    EXPECT_FALSE(t.matches("orders.eu.created.x"));
    EXPECT_FALSE(t.matches("payments.eu.created"));
    auto lead = p("*.created");
    EXPECT_EQ(lead.zmq_prefix(), "");
    EXPECT_TRUE(lead.matches("orders.created"));
    EXPECT_FALSE(lead.matches("created"));
}

TEST(TopicPattern, TailMatchesOneOrMoreSegments) {
    auto t = p("orders.>");
    EXPECT_EQ(t.zmq_prefix(), "orders.");
    EXPECT_TRUE(t.prefix_only());
    EXPECT_TRUE(t.matches("orders.eu"));
    EXPECT_TRUE(t.matches("orders.eu.created"));
    EXPECT_FALSE(t.matches("orders"));
    EXPECT_FALSE(t.matches("ordersx.eu"));
    auto all = p(">");
    EXPECT_EQ(all.zmq_prefix(), "");
    EXPECT_TRUE(all.matches("a"));
    EXPECT_TRUE(all.matches("a.b.c"));
    auto mixed = p("a.*.c.>");
    EXPECT_EQ(mixed.zmq_prefix(), "a.");
    EXPECT_FALSE(mixed.prefix_only());
    EXPECT_TRUE(mixed.matches("a.b.c.d"));
    EXPECT_FALSE(mixed.matches("a.b.c"));
    EXPECT_FALSE(mixed.matches("a.b.x.d"));
}

TEST(TopicPattern, ReservedTopicsNeedALiteralPrefix) {
    EXPECT_FALSE(p(">").matches("_evmesh.stats.abc"));
    EXPECT_FALSE(p("*.stats.abc").matches("_evmesh.stats.abc"));
    EXPECT_FALSE(p(">").prefix_only());
    EXPECT_TRUE(p("_evmesh.stats.>").matches("_evmesh.stats.abc"));
    EXPECT_TRUE(p("_evmesh.*.abc").matches("_evmesh.stats.abc"));
    EXPECT_TRUE(p("_evmesh.stats.abc").matches("_evmesh.stats.abc"));
    EXPECT_TRUE(p(">").matches("_evmeshx.a"));
}

TEST(TopicPattern, RejectsMalformedPatterns) {
    for (std::string_view s : {"", ".", "a..b", "a.>.b", "a.b*", "a.>x", "a b", "a."}) {
        EXPECT_FALSE(topic_pattern::parse(s)) << s;
    }
}

}  // namespace
}  // namespace evmesh
