// The receiving side of NAK repair as a pure state machine: frames in, frames, NAKs and lost
// ranges out (no sockets).
#include <gtest/gtest.h>

#include <string>
#include <vector>

#include "reactor/repair.hpp"

namespace evmesh::detail {
namespace {

using namespace std::chrono_literals;
using steady = std::chrono::steady_clock;

struct harness {
    std::vector<std::string> delivered;
    std::vector<repair_rx::nak_request> naks;
    std::vector<lost_range> lost;
    std::int64_t since = 1000;
    repair_rx rx;

    harness()
        : rx(repair_options{100ms, 3, 1000, 100, 600000ms},
             repair_rx::sink{[this](zmsg f) { delivered.emplace_back(f.view()); },
                             [this](const repair_rx::nak_request& r) { naks.push_back(r); },
                             [this](const lost_range& l) { lost.push_back(l); },
                             [this](std::string_view) { return since; },
                             [] { return std::int64_t{5000}; }}) {}

    void event(std::uint64_t seq, bool rtx = false, steady::time_point now = {}) {
        rx.on_event("n/p", "t.x", seq, zmsg(std::to_string(seq)), rtx, now);
    }
    std::vector<std::string> expect(std::initializer_list<int> seqs) {
        std::vector<std::string> out;
        for (int s : seqs) {
            out.push_back(std::to_string(s));
        }
        return out;
    }
};

TEST(Repair, InOrderEventsPassStraightThrough) {
    harness h;
    for (int i = 1; i <= 3; ++i) {
        h.event(static_cast<std::uint64_t>(i));
    }
    EXPECT_EQ(h.delivered, h.expect({1, 2, 3}));
    EXPECT_TRUE(h.naks.empty());
}

TEST(Repair, AGapIsHeldAskedForAndFilledInOrder) {
    harness h;
    h.event(1);
    h.event(4);
    h.event(5);
    ASSERT_EQ(h.naks.size(), 1U);
    EXPECT_EQ(h.naks[0].from, 2U);
    EXPECT_EQ(h.naks[0].to, 3U);  // never widened over the held 4 and 5
    EXPECT_EQ(h.naks[0].since_ns, 0);
    h.event(2, true);
    h.event(3, true);
    EXPECT_EQ(h.delivered, h.expect({1, 2, 3, 4, 5}));
    EXPECT_EQ(h.rx.recovered(), 2U);
    EXPECT_EQ(h.rx.held(), 0U);
}

TEST(Repair, AFillNeverDropsHeldEventsAndReportsWhatIsMissing) {
    harness h;
    h.event(1);
    h.event(5);  // gap 2..4
    // the publisher answers: nothing sent, nothing aged out (a mid-stream request has no `since`)
    h.rx.on_fill("n/p", "t.x", 2, 10, 11, 0, {});
    EXPECT_EQ(h.delivered, h.expect({1, 5}));
    ASSERT_EQ(h.lost.size(), 1U);  // reported, not skipped silently
    EXPECT_EQ(h.lost[0].from, 2U);
    EXPECT_EQ(h.lost[0].to, 4U);
    EXPECT_EQ(h.rx.lost(), 3U);
}

TEST(Repair, TheStartOfAStreamSkipsOnlyWhatPrecedesTheSubscription) {
    harness h;
    h.event(7);  // first sight: 1..6 asked for, since the subscription
    ASSERT_EQ(h.naks.size(), 1U);
    EXPECT_EQ(h.naks[0].from, 1U);
    EXPECT_EQ(h.naks[0].to, 6U);
    EXPECT_EQ(h.naks[0].since_ns, 1000);  // when the subscription was made
    h.event(5, true);
    h.event(6, true);
    h.rx.on_fill("n/p", "t.x", 1, 6, 5, 0, {});  // 1..4 are older than the subscription
    EXPECT_EQ(h.delivered, h.expect({5, 6, 7}));
    EXPECT_EQ(h.rx.skipped_before_subscription(), 4U);  // 1..4: before the subscription
    EXPECT_TRUE(h.lost.empty());
}

TEST(Repair, RetriesRunOutAndTheRangeIsReported) {
    harness h;
    const steady::time_point t0{};
    h.event(1, false, t0);
    h.event(3, false, t0);
    for (int i = 1; i <= 5; ++i) {
        h.rx.tick(t0 + i * 150ms);
    }
    EXPECT_EQ(h.naks.size(), 3U);  // nak_retries
    ASSERT_EQ(h.lost.size(), 1U);
    EXPECT_EQ(h.lost[0].from, 2U);
    EXPECT_EQ(h.lost[0].to, 2U);
    EXPECT_EQ(h.delivered, h.expect({1, 3}));
}

TEST(Repair, APublisherThatNumbersAfreshIsFollowedNotDropped) {
    harness h;
    for (int i = 1; i <= 5; ++i) {
        h.event(static_cast<std::uint64_t>(i));
    }
    // the publishing node restarted: its stream starts again at 1
    h.event(1);
    h.event(2);
    EXPECT_EQ(h.delivered, h.expect({1, 2, 3, 4, 5, 1, 2}));
    EXPECT_EQ(h.rx.restarts(), 1U);
    EXPECT_EQ(h.rx.duplicates(), 0U);
}

TEST(Repair, AHeartbeatRevealsLossAtTheTail) {
    harness h;
    h.event(1);
    h.rx.on_heartbeat("n/p", "t.x", 4, {});
    ASSERT_EQ(h.naks.size(), 1U);
    EXPECT_EQ(h.naks[0].from, 2U);
    EXPECT_EQ(h.naks[0].to, 4U);
    h.rx.on_heartbeat("n/p", "t.x", 1, {});  // stale or equal: nothing new
    EXPECT_EQ(h.naks.size(), 1U);
}

TEST(Repair, HeldEventsAreBounded) {
    harness h;  // max_held 1000
    h.event(1);
    for (std::uint64_t s = 3; s <= 1003; ++s) {
        h.event(s);
    }
    // over the bound: the gap (2) is reported lost and everything held is delivered
    EXPECT_EQ(h.rx.held(), 0U);
    ASSERT_EQ(h.lost.size(), 1U);
    EXPECT_EQ(h.lost[0].from, 2U);
    EXPECT_EQ(h.delivered.size(), 1002U);
}

}  // namespace
}  // namespace evmesh::detail
