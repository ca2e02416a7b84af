// The channel runtime in process: a real node, a real SQLite outbox in a temp dir, and a scripted
// plugin (tests/support/script_channel.cpp) loaded with dlopen like any other.
#include <gtest/gtest.h>

#include <dlfcn.h>

#include <filesystem>
#include <functional>
#include <set>

#include <evmesh/channels.hpp>
#include <evmesh/node.hpp>

#include "../../support/wait.hpp"

namespace evmesh::channels {
namespace {

using namespace std::chrono_literals;
using test::wait_until;

std::string plugin_dir() { return EVMESH_TEST_PLUGIN_DIR; }

// What the script plugin saw (same file, so dlopen returns the instance the runtime loaded).
struct script_probe {
    void* h = dlopen((plugin_dir() + "/evmesh_channel_script.so").c_str(), RTLD_NOW | RTLD_LOCAL);
    int calls(const std::string& id) const {
        auto* f = reinterpret_cast<int (*)(const char*)>(dlsym(h, "evmesh_test_script_calls"));
        return f(id.c_str());
    }
    ~script_probe() { dlclose(h); }
};

class RuntimeTest : public ::testing::Test {
protected:
    void SetUp() override {
        dir_ = std::filesystem::temp_directory_path() / ("evmesh-rt-" + test::unique_mesh("t"));
        std::filesystem::create_directories(dir_);
        node_options o;
        o.name = "rt";
        o.mesh = test::unique_mesh("rt");
        o.mesh_enabled = false;
        o.discovery.enabled = false;
        o.stats_interval = 0ms;
        auto n = node::create(o);
        ASSERT_TRUE(n) << n.error().message();
        node_ = std::move(*n);
        auto p = node_->make_publisher();
        ASSERT_TRUE(p);
        pub_ = std::make_unique<publisher>(std::move(*p));
    }

    void TearDown() override {
        rt_.reset();
        pub_.reset();
        node_.reset();
        std::filesystem::remove_all(dir_);
    }

    channel_config script(std::string name = "s", std::vector<milliseconds> schedule = {0ms, 20ms, 40ms}) {
        channel_config c;
        c.name = std::move(name);
        c.plugin = "script";
        c.topics = {"orders.>"};
        c.retry.schedule = std::move(schedule);
        c.retry.jitter = 0;
        c.concurrency = 2;
        c.breaker.failures = 0;  // off, except in the breaker tests
        return c;
    }

    runtime_options options(std::vector<channel_config> chans) {
        runtime_options ro;
        ro.outbox_path = (dir_ / "outbox.db").string();
        ro.plugin_dirs = {plugin_dir()};
        ro.channels = std::move(chans);
        return ro;
    }

    void start(std::vector<channel_config> chans) {
        std::string error;
        auto r = channel_runtime::start(*node_, options(std::move(chans)), error);
        ASSERT_TRUE(r) << error;
        rt_ = std::move(*r);
        // the subscription reaches the publisher asynchronously: a new publisher waits for it
        auto p = node_->make_publisher();
        ASSERT_TRUE(p);
        pub_ = std::make_unique<publisher>(std::move(*p));
    }

    std::string publish(std::string_view topic, std::string_view payload) {
        event ev;
        ev.topic = std::string(topic);
        ev.payload = std::string(payload);
        ev.id = new_event_id();
        EXPECT_TRUE(pub_->publish(ev));
        return to_string(ev.id);
    }

    channel_stats stats(const std::string& name = "s") {
        for (auto& s : rt_->stats()) {
            if (s.name == name) {
                return s;
            }
        }
        ADD_FAILURE() << "no channel " << name;
        return {};
    }

    std::filesystem::path dir_;
    std::unique_ptr<node> node_;
    std::unique_ptr<publisher> pub_;
    std::unique_ptr<channel_runtime> rt_;
    script_probe probe_;
};

TEST_F(RuntimeTest, DeliversEveryMatchingEventOnce) {
    start({script()});
    std::vector<std::string> ids;
    for (int i = 0; i < 200; ++i) {
        ids.push_back(publish("orders.x", "ok"));
        publish("other.x", "ok");  // not matched
    }
    ASSERT_TRUE(wait_until([&] { return stats().delivered == 200; }, 10s)) << stats().delivered << " accepted " << stats().accepted << " pending " << stats().pending << " attempts " << stats().attempts;
    const auto s = stats();
    EXPECT_EQ(s.accepted, 200U);
    EXPECT_EQ(s.attempts, 200U);
    EXPECT_EQ(s.pending, 0U);
    EXPECT_EQ(s.in_flight, 0U);
    for (const auto& id : ids) {
        EXPECT_EQ(probe_.calls(id), 1) << id;
    }
}

TEST_F(RuntimeTest, OverlappingPatternsDeliverOnce) {
    auto c = script();
    c.topics = {"orders.>", "orders.*.created", "orders.eu.created"};
    start({c});
    const auto id = publish("orders.eu.created", "ok");
    ASSERT_TRUE(wait_until([&] { return stats().delivered == 1; }));
    std::this_thread::sleep_for(100ms);
    EXPECT_EQ(probe_.calls(id), 1);
    EXPECT_EQ(stats().accepted, 1U);
    EXPECT_EQ(stats().duplicates, 0U);  // taken by the first matching pattern only
}

TEST_F(RuntimeTest, FirstScheduleEntryDelaysTheFirstAttempt) {
    start({script("s", {300ms, 10ms})});
    const auto t0 = std::chrono::steady_clock::now();
    publish("orders.x", "ok");
    ASSERT_TRUE(wait_until([&] { return stats().delivered == 1; }));
    EXPECT_GE(std::chrono::steady_clock::now() - t0, 290ms);
}

TEST_F(RuntimeTest, RetriesOnTheScheduleThenDeadLettersAndReplays) {
    start({script("s", {0ms, 50ms, 100ms})});
    const auto id = publish("orders.x", "retry");
    ASSERT_TRUE(wait_until([&] { return stats().dead == 1; }));
    EXPECT_EQ(probe_.calls(id), 3);
    auto s = stats();
    EXPECT_EQ(s.retried, 2U);
    EXPECT_EQ(s.failed, 3U);
    EXPECT_EQ(s.dead_lettered, 1U);
    EXPECT_EQ(s.pending, 0U);
    auto log = rt_->delivery_log("s", 10);
    ASSERT_TRUE(log);
    ASSERT_EQ(log->size(), 3U);
    // newest first: dead, retry, retry; spaced by at least the schedule
    EXPECT_EQ((*log)[0].outcome, "dead");
    EXPECT_EQ((*log)[1].outcome, "retry");
    EXPECT_GE((*log)[0].time_ms - (*log)[1].time_ms, 100);
    EXPECT_GE((*log)[1].time_ms - (*log)[2].time_ms, 50);
    EXPECT_EQ((*log)[0].code, 503);
    auto dead = rt_->dead_letters("s", 10);
    ASSERT_TRUE(dead);
    ASSERT_EQ(dead->size(), 1U);
    EXPECT_EQ((*dead)[0].event_id, id);
    EXPECT_EQ((*dead)[0].attempts, 3U);
    EXPECT_NE((*dead)[0].last_detail.find("retries exhausted"), std::string::npos);
    // replay: a fresh schedule (3 more attempts), dead again
    auto n = rt_->replay("s", id);
    ASSERT_TRUE(n);
    EXPECT_EQ(*n, 1U);
    ASSERT_TRUE(wait_until([&] { return probe_.calls(id) == 6 && stats().dead == 1; }));
    EXPECT_EQ(stats().replayed, 1U);
    EXPECT_FALSE(rt_->replay("nope"));
    EXPECT_FALSE(rt_->replay("s", "not-a-uuid"));
    EXPECT_FALSE(rt_->replay("s", to_string(new_event_id())));  // no such dead letter
}

TEST_F(RuntimeTest, BreakerPausesAFailingEndpointAndKeepsAttempts) {
    auto c = script("s", {0ms, 3600s});
    c.breaker = {3, 400ms, 400ms};
    start({c});
    for (int i = 0; i < 100; ++i) {
        publish("orders.x", "retry");
    }
    ASSERT_TRUE(wait_until([&] { return stats().paused; }));
    std::this_thread::sleep_for(200ms);
    auto s = stats();
    EXPECT_EQ(s.breaker_trips, 1U);
    // the streak, plus what the workers took before the store applied it (the ready queue it had
    // handed out, and one refill); without the breaker all 100 are attempted at once
    EXPECT_LE(s.attempts, 3U + 2 * 16U + 2U);
    EXPECT_EQ(s.pending, 100U);      // nobody dead-lettered: paused events keep their attempts
    EXPECT_EQ(s.dead, 0U);
    // after the pause exactly one probe goes out, fails, and the pause starts again
    const auto before = s.attempts;
    ASSERT_TRUE(wait_until([&] { return stats().attempts == before + 1; }, 2s));
    std::this_thread::sleep_for(150ms);
    EXPECT_EQ(stats().attempts, before + 1);
    EXPECT_TRUE(stats().paused);
}

TEST_F(RuntimeTest, BreakerResumesWhenTheEndpointRecovers) {
    auto c = script("s", {0ms, 50ms, 50ms, 50ms});
    c.breaker = {3, 100ms, 200ms};
    start({c});
    const auto up_at = std::chrono::duration_cast<milliseconds>(
                           std::chrono::system_clock::now().time_since_epoch()).count() + 700;
    for (int i = 0; i < 30; ++i) {
        publish("orders.x", "down-until:" + std::to_string(up_at));
    }
    ASSERT_TRUE(wait_until([&] { return stats().delivered == 30; }, 10s)) << stats().attempts;
    const auto s = stats();
    EXPECT_FALSE(s.paused);
    EXPECT_GE(s.breaker_trips, 1U);
    EXPECT_EQ(s.dead, 0U);  // four attempts each would have dead-lettered them without the breaker
    EXPECT_LT(s.attempts, 90U);  // the schedule alone: 4 attempts x 30 = 120, all dead-lettered
}

TEST_F(RuntimeTest, PermanentFailureDeadLettersAtOnce) {
    start({script()});
    const auto id = publish("orders.x", "fail");
    ASSERT_TRUE(wait_until([&] { return stats().dead == 1; }));
    EXPECT_EQ(probe_.calls(id), 1);
    EXPECT_EQ(stats().retried, 0U);
}

TEST_F(RuntimeTest, RetryAfterOverridesTheSchedule) {
    start({script("s", {0ms, 10ms, 10ms})});
    const auto id = publish("orders.x", "retry-after:400");
    ASSERT_TRUE(wait_until([&] { return stats().delivered == 1; }));
    auto log = rt_->delivery_log("s", 10);
    ASSERT_TRUE(log);
    ASSERT_EQ(log->size(), 2U);
    EXPECT_GE((*log)[0].time_ms - (*log)[1].time_ms, 400);
    EXPECT_EQ((*log)[1].code, 429);
}

TEST_F(RuntimeTest, DisabledChannelHoldsEventsUntilEnabled) {
    start({script()});
    const auto first = publish("orders.x", "disable");
    ASSERT_TRUE(wait_until([&] { return stats().disabled; }));
    for (int i = 0; i < 5; ++i) {
        publish("orders.x", "ok");
    }
    ASSERT_TRUE(wait_until([&] { return stats().pending == 6; }));
    std::this_thread::sleep_for(100ms);
    EXPECT_EQ(stats().delivered, 0U);
    EXPECT_NE(stats().disabled_reason.find("410"), std::string::npos);
    ASSERT_TRUE(rt_->enable("s"));
    ASSERT_TRUE(wait_until([&] { return stats().delivered == 6; }));
    EXPECT_FALSE(stats().disabled);
    EXPECT_EQ(probe_.calls(first), 2);
}

TEST_F(RuntimeTest, PendingEventsSurviveARestart) {
    start({script("s", {0ms, 300ms})});
    const auto id = publish("orders.x", "flaky:1");
    ASSERT_TRUE(wait_until([&] { return stats().retried == 1; }));
    rt_->stop();
    rt_.reset();
    start({script("s", {0ms, 300ms})});
    EXPECT_EQ(stats().pending, 1U);
    EXPECT_EQ(stats().recovered, 0U);  // a clean stop leaves nothing claimed
    ASSERT_TRUE(wait_until([&] { return stats().delivered == 1; }));
    EXPECT_EQ(probe_.calls(id), 2);
}

TEST_F(RuntimeTest, ARepublishedEventIsNotDeliveredTwice) {
    start({script()});
    event ev;
    ev.topic = "orders.x";
    ev.payload = "ok";
    ev.id = new_event_id();
    ASSERT_TRUE(pub_->publish(ev));
    ASSERT_TRUE(wait_until([&] { return stats().delivered == 1; }));
    event again = ev;
    ASSERT_TRUE(pub_->publish(again));  // within the dedupe window
    ASSERT_TRUE(wait_until([&] { return stats().duplicates == 1; }));
    EXPECT_EQ(probe_.calls(to_string(ev.id)), 1);
}

TEST_F(RuntimeTest, ASlowChannelDoesNotDelayAnother) {
    auto slow = script("slow");
    slow.topics = {"slow.>"};
    slow.concurrency = 1;
    start({slow, script("fast")});
    for (int i = 0; i < 3; ++i) {
        publish("slow.x", "sleep:1000");
    }
    const auto t0 = std::chrono::steady_clock::now();
    for (int i = 0; i < 50; ++i) {
        publish("orders.x", "ok");
    }
    ASSERT_TRUE(wait_until([&] { return stats("fast").delivered == 50; }));
    // the slow channel holds its single worker for 3 s; the fast one finished long before
    EXPECT_LT(std::chrono::steady_clock::now() - t0, 900ms);
    EXPECT_EQ(stats("slow").delivered, 0U);
}

TEST(RuntimeCheck, RefusesBrokenConfigurationsWithOneLine) {
    auto base = [] {
        runtime_options o;
        o.outbox_path = "/tmp/never-created.db";
        o.plugin_dirs = {plugin_dir()};
        channel_config c;
        c.name = "a";
        c.plugin = "script";
        c.topics = {"x"};
        o.channels.push_back(c);
        return o;
    };
    std::string error;
    EXPECT_TRUE(channel_runtime::check(base(), error)) << error;
    struct tcase {
        std::function<void(runtime_options&)> mutate;
        std::string needle;
    };
    const std::vector<tcase> cases = {
        {[](auto& o) { o.outbox_path.clear(); }, "outbox path"},
        {[](auto& o) { o.channels[0].name = "bad name"; }, "channel name"},
        {[](auto& o) { o.channels.push_back(o.channels[0]); }, "used twice"},
        {[](auto& o) { o.channels[0].topics.clear(); }, "at least one pattern"},
        {[](auto& o) { o.channels[0].topics = {"a.>.b"}; }, "bad topic pattern"},
        {[](auto& o) { o.channels[0].concurrency = 0; }, "concurrency"},
        {[](auto& o) { o.channels[0].retry.schedule.clear(); }, "retry schedule"},
        {[](auto& o) { o.channels[0].plugin = "missing"; }, "not found"},
        {[](auto& o) { o.channels[0].plugin = "script_bad_abi"; }, "ABI version 999"},
        {[](auto& o) { o.channels[0].settings_json = R"({"refuse": true})"; }, "settings.refuse"},
    };
    for (const auto& c : cases) {
        auto o = base();
        c.mutate(o);
        error.clear();
        EXPECT_FALSE(channel_runtime::check(o, error)) << c.needle;
        EXPECT_NE(error.find(c.needle), std::string::npos) << error;
        EXPECT_EQ(error.find('\n'), std::string::npos) << error;
    }
    EXPECT_FALSE(std::filesystem::exists("/tmp/never-created.db"));
}

TEST(RuntimeSchedule, DefaultsFollowStandardWebhooks) {
    using std::chrono::hours;
    using std::chrono::minutes;
    const auto s = standard_webhooks_schedule();
    ASSERT_EQ(s.size(), 10U);
    EXPECT_EQ(s[0], 0ms);
    EXPECT_EQ(s[1], 5s);
    EXPECT_EQ(s[2], minutes(5));
    EXPECT_EQ(s[3], minutes(30));
    EXPECT_EQ(s[4], hours(2));
    EXPECT_EQ(s[9], hours(24));
    const auto e = exponential_schedule(1s, 2.0, 5s, 6);
    EXPECT_EQ(e, (std::vector<milliseconds>{0ms, 1s, 2s, 4s, 5s, 5s}));
}

}  // namespace
}  // namespace evmesh::channels
