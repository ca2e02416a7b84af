// The history tail (the retransmit window): a byte ring with per-stream indexes.
#include <gtest/gtest.h>

#include "history/tail.hpp"

namespace evmesh::detail {
namespace {

using namespace std::chrono_literals;

std::string frame_of(std::uint64_t seq, std::size_t size) {
    std::string f = "t.x";
    f.push_back('\0');
    f.append(std::to_string(seq));
    f.resize(size, static_cast<char>('a' + seq % 26));
    return f;
}

TEST(HistoryTail, WrapsTheRingAndReadsBackExactBytes) {
    history_tail t({1000, 30000ms, 16});
    const history_tail::steady::time_point now{};
    for (std::uint64_t seq = 1; seq <= 100; ++seq) {
        ASSERT_TRUE(t.append("n/p", "t.x", seq, static_cast<std::int64_t>(seq), frame_of(seq, 97), now));
    }
    EXPECT_LE(t.bytes(), 1000U);
    auto* s = t.find("n/p", "t.x");
    ASSERT_NE(s, nullptr);
    EXPECT_EQ(s->last_seq, 100U);
    EXPECT_EQ(s->entries.size(), 10U);  // 10 x 97 bytes fit in 1000
    EXPECT_EQ(s->entries.front().seq, 91U);
    EXPECT_EQ(s->evicted_upto, 90U);
    for (const auto& e : s->entries) {
        std::string out;
        t.read(e, out);
        EXPECT_EQ(out, frame_of(e.seq, 97)) << e.seq;  // across the wrap too
    }
}

TEST(HistoryTail, AgesOutAndKeepsStreamsApart) {
    history_tail t({1 << 20, 100ms, 16});
    const history_tail::steady::time_point t0{};
    t.append("n/a", "t.x", 1, 1, frame_of(1, 50), t0);
    t.append("n/b", "t.x", 1, 1, frame_of(1, 50), t0 + 80ms);
    t.trim(t0 + 150ms);
    EXPECT_TRUE(t.find("n/a", "t.x")->entries.empty());
    EXPECT_EQ(t.find("n/a", "t.x")->evicted_upto, 1U);
    EXPECT_EQ(t.find("n/b", "t.x")->entries.size(), 1U);
    EXPECT_EQ(t.events(), 1U);
}

TEST(HistoryTail, ARestartedNumberingStartsTheStreamAfresh) {
    history_tail t({300, 30000ms, 16});
    const history_tail::steady::time_point now{};
    for (std::uint64_t seq = 1; seq <= 3; ++seq) {
        t.append("n/p", "t.x", seq, 1, frame_of(seq, 50), now);
    }
    t.append("n/q", "t.y", 1, 1, frame_of(1, 50), now);
    t.append("n/p", "t.x", 1, 1, frame_of(1, 50), now);  // a new publisher, same source
    auto* s = t.find("n/p", "t.x");
    ASSERT_EQ(s->entries.size(), 1U);
    // more appends evict the old bytes; the stale slots never evict the live entries wrongly
    for (std::uint64_t seq = 2; seq <= 4; ++seq) {
        t.append("n/p", "t.x", seq, 1, frame_of(seq, 50), now);
    }
    ASSERT_EQ(s->entries.front().seq, 1U);
    for (const auto& e : s->entries) {
        std::string out;
        t.read(e, out);
        EXPECT_EQ(out, frame_of(e.seq, 50));
    }
    EXPECT_EQ(t.events(), 4U);  // t.y aged out first: it was the oldest live entry
}

TEST(HistoryTail, RefusesWhatCannotFitAndCapsStreams) {
    history_tail t({100, 30000ms, 2});
    const history_tail::steady::time_point now{};
    EXPECT_FALSE(t.append("n/p", "t.x", 1, 1, std::string(101, 'x'), now));
    EXPECT_TRUE(t.append("n/p", "t.a", 1, 1, "a", now));
    EXPECT_TRUE(t.append("n/p", "t.b", 1, 1, "b", now));
    EXPECT_FALSE(t.append("n/p", "t.c", 1, 1, "c", now));
    EXPECT_EQ(t.untracked(), 2U);
}

}  // namespace
}  // namespace evmesh::detail
