#include <gtest/gtest.h>

#include <atomic>
#include <filesystem>
#include <mutex>
#include <set>
#include <thread>

#include <evmesh/node.hpp>

#include "../../support/wait.hpp"

namespace evmesh {
namespace {

using namespace std::chrono_literals;
using test::wait_until;

node_options local_options(const std::string& name) {
    node_options o;
    o.name = name;
    o.mesh = test::unique_mesh("unit");
    o.mesh_enabled = false;  // these tests cover one node; mesh tests live in mesh_test.cpp
    return o;
}

std::unique_ptr<node> make_node(node_options o) {
    auto n = node::create(std::move(o));
    EXPECT_TRUE(n) << n.error().message();
    return std::move(*n);
}

// Publishes on `topic` until `sub` sees one of them: subscriptions propagate asynchronously.
void warm_up(publisher& pub, subscription& sub, const std::string& topic) {
    const auto deadline = std::chrono::steady_clock::now() + 5s;
    while (std::chrono::steady_clock::now() < deadline) {
        ASSERT_TRUE(pub.publish(topic, "warm"));
        if (auto v = sub.receive_view(5ms); v && v->topic == topic) {
            while (sub.receive_view(20ms)) {
            }
            return;
        }
    }
    FAIL() << "subscription never became ready";
}

TEST(Node, PubSubBetweenThreadsDeliversEverythingInOrder) {
    auto n = make_node(local_options("threads"));
    auto sub = n->subscribe("orders.>");
    ASSERT_TRUE(sub);
    auto pub = n->make_publisher({.name = "orders"});
    ASSERT_TRUE(pub);
    warm_up(*pub, *sub, "orders.warmup");
    constexpr int count = 5000;
    std::thread producer([&] {
        auto p2 = n->make_publisher({.name = "orders2"});
        ASSERT_TRUE(p2);
        // the subscription is ready for the prefix, so a new publisher is ready once connected
        std::this_thread::sleep_for(50ms);
        for (int i = 0; i < count; ++i) {
            ASSERT_TRUE(p2->publish("orders.eu.created", std::to_string(i),
                                    {{"traceparent", "00-abc-def-01"}}, "text/plain"));
        }
    });
    std::uint64_t expected_seq = 1;
    int got = 0;
    while (got < count) {
        auto ev = sub->receive(5s);
        ASSERT_TRUE(ev) << "received only " << got;
        ASSERT_EQ(ev->topic, "orders.eu.created");
        EXPECT_EQ(ev->seq, expected_seq++);
        EXPECT_EQ(ev->payload, std::to_string(got));
        EXPECT_EQ(ev->source, "threads/orders2");
        EXPECT_EQ(ev->content_type, "text/plain");
        EXPECT_EQ(ev->header_value("traceparent"), "00-abc-def-01");
        ++got;
    }
    producer.join();
    EXPECT_EQ(sub->counters().gaps, 0U);
    const auto c = n->counters();
    EXPECT_GE(c.local_in_events, static_cast<std::uint64_t>(count));
}

TEST(Node, NewPublisherDoesNotLoseItsFirstEvent) {
    auto n = make_node(local_options("firstevent"));
    auto sub = n->subscribe("first.>");
    ASSERT_TRUE(sub);
    ASSERT_TRUE(wait_until([&] { return n->counters().subscriptions_local == 1; }));
    for (int i = 0; i < 50; ++i) {
        auto pub = n->make_publisher();  // no warm-up: make_publisher waits for subscriptions
        ASSERT_TRUE(pub);
        ASSERT_TRUE(pub->publish("first.x", std::to_string(i)));
        auto ev = sub->receive(2s);
        ASSERT_TRUE(ev) << "first event of publisher " << i << " was lost";
        EXPECT_EQ(ev->payload, std::to_string(i));
    }
}

TEST(Node, SubscriptionIsInEffectWhenSubscribeReturns) {
    // subscribe() returns once the node has applied the subscription, so a publisher made right
    // after it (which waits for the node's current subscriptions) delivers its first event.
    auto n = make_node(local_options("subsync"));
    for (int i = 0; i < 50; ++i) {
        const auto topic = "sync" + std::to_string(i) + ".x";
        auto sub = n->subscribe("sync" + std::to_string(i) + ".>");
        ASSERT_TRUE(sub);
        auto pub = n->make_publisher();
        ASSERT_TRUE(pub);
        ASSERT_TRUE(pub->publish(topic, "first"));
        auto ev = sub->receive(2s);
        ASSERT_TRUE(ev) << "subscription " << i << " missed the first event";
        EXPECT_EQ(ev->topic, topic);
    }
    // the handshake topics never become subscriptions of the node
    EXPECT_TRUE(wait_until([&] { return n->counters().subscriptions_local == 0; }));
}

TEST(Node, DrainAndCloseDeliversWhatWasQueued) {
    // A slow callback leaves events queued in the subscription. close() discards them;
    // drain_and_close() hands every one of them to the callback before it returns (a hand-over,
    // as in evmesh-node's reload, loses nothing).
    auto n = make_node(local_options("drain"));
    for (const bool drain : {false, true}) {
        std::atomic<int> got{0};
        std::atomic<bool> first{false};
        auto sub = n->subscribe("drain.>", [&](const event_view&) {
            if (!first.exchange(true)) {
                std::this_thread::sleep_for(200ms);  // the rest queues up behind this one
            }
            ++got;
        });
        ASSERT_TRUE(sub);
        auto pub = n->make_publisher();
        ASSERT_TRUE(pub);
        constexpr int count = 500;
        for (int i = 0; i < count; ++i) {
            ASSERT_TRUE(pub->publish("drain.x", "e"));
        }
        ASSERT_TRUE(wait_until([&] { return first.load(); }));
        std::this_thread::sleep_for(50ms);  // all 500 have left the publisher
        if (drain) {
            sub->drain_and_close();
            EXPECT_EQ(got.load(), count) << "drain_and_close lost queued events";
        } else {
            sub->close();
            EXPECT_LT(got.load(), count) << "close() was expected to discard the queued events";
        }
    }
}

TEST(Node, WildcardSubscriptionsDeliverOnlyMatchingEvents) {
    auto n = make_node(local_options("wild"));
    auto star = n->subscribe("orders.*.created");
    auto exact = n->subscribe("orders.created");
    auto tail = n->subscribe("orders.>");
    ASSERT_TRUE(star && exact && tail);
    auto pub = n->make_publisher();
    ASSERT_TRUE(pub);
    warm_up(*pub, *tail, "orders.warm");
    // the other two subscribe on prefixes "orders." and "orders.created": warm those too
    ASSERT_TRUE(wait_until([&] {
        (void)pub->publish("orders.x.created", "w");
        return star->receive_view(5ms).has_value();
    }));
    ASSERT_TRUE(wait_until([&] {
        (void)pub->publish("orders.created", "w");
        return exact->receive_view(5ms).has_value();
    }));
    for (auto* s : {&*star, &*exact, &*tail}) {
        while (s->receive_view(30ms)) {
        }
    }
    for (const char* t : {"orders.eu.created", "orders.eu.deleted", "orders.created",
                          "orders.createdx", "orders.eu.west.created", "payments.eu.created"}) {
        ASSERT_TRUE(pub->publish(t, t));
    }
    auto collect = [](subscription& s) {
        std::vector<std::string> out;
        while (auto ev = s.receive(100ms)) {
            out.push_back(ev->topic);
        }
        return out;
    };
    EXPECT_EQ(collect(*star), (std::vector<std::string>{"orders.eu.created"}));
    EXPECT_EQ(collect(*exact), (std::vector<std::string>{"orders.created"}));
    EXPECT_EQ(collect(*tail),
              (std::vector<std::string>{"orders.eu.created", "orders.eu.deleted", "orders.created",
                                        "orders.createdx", "orders.eu.west.created"}));
    EXPECT_GT(star->counters().filtered, 0U);   // same ZeroMQ prefix, rejected locally
    EXPECT_GT(exact->counters().filtered, 0U);  // "orders.createdx" shares the prefix
}

TEST(Node, SubscriberLeavingKeepsOthersSubscribed) {
    auto n = make_node(local_options("refcount"));
    auto a = n->subscribe("shared.topic");
    auto b = n->subscribe("shared.topic");
    ASSERT_TRUE(a && b);
    auto pub = n->make_publisher();
    ASSERT_TRUE(pub);
    warm_up(*pub, *a, "shared.topic");
    while (b->receive_view(50ms)) {
    }
    a->close();  // one leaves
    std::this_thread::sleep_for(100ms);  // let the unsubscribe (if any) propagate
    ASSERT_TRUE(pub->publish("shared.topic", "after"));
    auto ev = b->receive(2s);
    ASSERT_TRUE(ev) << "one subscriber leaving cancelled the other's subscription";
    EXPECT_EQ(ev->payload, "after");
    EXPECT_EQ(n->counters().subscriptions_local, 1U);
    b->close();
    EXPECT_TRUE(wait_until([&] { return n->counters().subscriptions_local == 0; }));
}

TEST(Node, CallbacksRunOnDispatcherThreadNotIoThread) {
    auto n = make_node(local_options("callback"));
    std::mutex mu;
    std::set<std::thread::id> threads;
    std::atomic<int> calls{0};
    auto sub = n->subscribe("cb.>", [&](const event_view& v) {
        std::lock_guard lock(mu);
        threads.insert(std::this_thread::get_id());
        if (v.topic == "cb.real") {
            ++calls;
        }
    });
    ASSERT_TRUE(sub);
    auto pub = n->make_publisher();
    ASSERT_TRUE(pub);
    ASSERT_TRUE(wait_until([&] {
        (void)pub->publish("cb.warm", "w");
        std::lock_guard lock(mu);
        return !threads.empty();
    }));
    for (int i = 0; i < 100; ++i) {
        ASSERT_TRUE(pub->publish("cb.real", "x"));
    }
    ASSERT_TRUE(wait_until([&] { return calls == 100; }));
    std::lock_guard lock(mu);
    EXPECT_EQ(threads.size(), 1U);
    EXPECT_EQ(threads.count(n->io_thread_id()), 0U);
    EXPECT_EQ(threads.count(std::this_thread::get_id()), 0U);
}

TEST(Node, CallbackExceptionsAreCaughtAndCounted) {
    auto n = make_node(local_options("throws"));
    auto sub = n->subscribe("t.>", [](const event_view&) { throw std::runtime_error("boom"); });
    ASSERT_TRUE(sub);
    auto pub = n->make_publisher();
    ASSERT_TRUE(wait_until([&] {
        (void)pub->publish("t.x", "w");
        return sub->counters().callback_errors > 0;
    }));
    EXPECT_TRUE(n->running());
}

TEST(Node, SequenceGapsAreCounted) {
    auto n = make_node(local_options("gaps"));
    auto sub = n->subscribe("g.>");
    auto pub = n->make_publisher({.name = "p"});
    ASSERT_TRUE(sub && pub);
    warm_up(*pub, *sub, "g.warm");
    for (std::uint64_t seq : {1, 2, 5, 6, 10, 3}) {
        event ev;
        ev.topic = "g.stream";
        ev.seq = seq;
        ASSERT_TRUE(pub->publish(ev));
    }
    int got = 0;
    while (sub->receive_view(200ms)) {
        ++got;
    }
    EXPECT_EQ(got, 6);
    const auto c = sub->counters();
    EXPECT_EQ(c.gaps, 5U);  // 3,4 and 7,8,9
    EXPECT_EQ(c.out_of_order, 1U);
}

TEST(Node, SlowSubscriberDropsAreAllCountedAndMemoryIsBounded) {
    auto o = local_options("slow");
    o.hwm = 100;
    o.slow_subscriber = overflow_policy::drop;
    auto n = make_node(o);
    auto sub = n->subscribe("s.>", subscription_options{.hwm = 100});
    auto pub = n->make_publisher({.name = "fast"});
    ASSERT_TRUE(sub && pub);
    warm_up(*pub, *sub, "s.warm");
    constexpr std::uint64_t burst = 50000;
    for (std::uint64_t i = 0; i < burst; ++i) {
        ASSERT_TRUE(pub->publish("s.data", "0123456789012345678901234567890123456789"));
    }
    // a last event after the burst has drained closes the stream, so tail loss is visible too
    std::this_thread::sleep_for(300ms);
    std::uint64_t received = 0, last = 0;
    bool closed = false;
    while (!closed) {
        while (auto v = sub->receive_view(50ms)) {
            ++received;
            last = v->seq;
        }
        if (last == burst + 1) {
            closed = true;
        } else if (!pub->publish("s.data", "last")) {
            FAIL();
        } else {
            // keep publishing closers until one gets through; each is counted in `burst + k`
        }
        if (last > burst) {
            closed = true;
        }
    }
    const auto c = sub->counters();
    EXPECT_GT(c.gaps, 0U) << "a 50000-event burst into a 100-event queue dropped nothing?";
    // every event of the stream is either received or counted as a gap
    EXPECT_EQ(received + c.gaps, last);
    EXPECT_LT(received, last);
}

TEST(Node, BlockPolicyLosesNothing) {
    auto o = local_options("block");
    o.hwm = 100;
    o.slow_subscriber = overflow_policy::block;
    auto n = make_node(o);
    auto sub = n->subscribe("b.>", subscription_options{.hwm = 100});
    auto pub = n->make_publisher({.name = "fast", .policy = overflow_policy::block, .hwm = 100});
    ASSERT_TRUE(sub && pub);
    warm_up(*pub, *sub, "b.warm");
    constexpr std::uint64_t burst = 20000;
    std::thread producer([&] {
        for (std::uint64_t i = 0; i < burst; ++i) {
            ASSERT_TRUE(pub->publish("b.data", "payload"));
        }
    });
    std::uint64_t received = 0;
    while (received < burst) {
        auto v = sub->receive_view(5s);
        ASSERT_TRUE(v) << "stalled at " << received;
        if (v->topic == "b.data") {
            ++received;
            if (received % 1000 == 0) {
                std::this_thread::sleep_for(1ms);  // a slow consumer
            }
        }
    }
    producer.join();
    EXPECT_EQ(sub->counters().gaps, 0U);
    EXPECT_EQ(pub->dropped(), 0U);
    EXPECT_GT(n->counters().local_out_blocked, 0U) << "the subscriber never pushed back";
}

TEST(Node, DropPolicyPublisherCountsRefusedEvents) {
    auto o = local_options("pubdrop");
    o.hwm = 10;
    o.slow_subscriber = overflow_policy::block;
    auto n = make_node(o);
    auto sub = n->subscribe("d.>", subscription_options{.hwm = 10});
    auto pub = n->make_publisher({.name = "p", .policy = overflow_policy::drop, .hwm = 10});
    ASSERT_TRUE(sub && pub);
    warm_up(*pub, *sub, "d.warm");
    std::uint64_t refused = 0;
    for (int i = 0; i < 10000; ++i) {
        if (auto r = pub->publish("d.x", "y"); !r) {
            EXPECT_EQ(r.error(), make_error_code(errc::would_block));
            ++refused;
        }
    }
    EXPECT_GT(refused, 0U);
    EXPECT_EQ(pub->dropped(), refused);
}

TEST(Node, RejectsBadInputAtTheApi) {
    auto n = make_node(local_options("bad"));
    EXPECT_EQ(n->subscribe("a..b").error(), make_error_code(errc::bad_pattern));
    auto pub = n->make_publisher();
    ASSERT_TRUE(pub);
    EXPECT_EQ(pub->publish("bad topic", "x").error(), make_error_code(errc::bad_topic));
    node_options o;
    o.mesh = "";
    EXPECT_EQ(node::create(o).error(), make_error_code(errc::bad_option));
    auto o2 = local_options("badep");
    o2.pub_endpoints = {"tcp://256.1.1.1:1"};
    EXPECT_EQ(node::create(o2).error(), make_error_code(errc::bad_endpoint));
}

TEST(Node, StopsAndRestartsCleanlyLeavingNoIpcFiles) {
    const auto dir = std::filesystem::temp_directory_path() / test::unique_mesh("evmesh-ipc");
    std::filesystem::create_directories(dir);
    const auto in = dir / "in.sock";
    const auto out = dir / "out.sock";
    for (int round = 0; round < 3; ++round) {
        auto o = local_options("restart");
        o.pub_endpoints = {"ipc://" + in.string()};
        o.sub_endpoints = {"ipc://" + out.string()};
        auto n = make_node(o);
        ASSERT_TRUE(std::filesystem::exists(in));
        auto sub = n->subscribe("r.>");
        auto pub = n->make_publisher();
        ASSERT_TRUE(sub && pub);
        warm_up(*pub, *sub, "r.warm");
        ASSERT_TRUE(pub->publish("r.x", "round"));
        ASSERT_TRUE(sub->receive(2s));
        const auto t0 = std::chrono::steady_clock::now();
        n->stop();
        EXPECT_LT(std::chrono::steady_clock::now() - t0, 2s);
        EXPECT_FALSE(n->running());
        EXPECT_FALSE(std::filesystem::exists(in));
        EXPECT_FALSE(std::filesystem::exists(out));
        // handles that outlive the node stay harmless
        EXPECT_FALSE(sub->receive_view(10ms));
        EXPECT_GE(n->counters().local_in_events, 1U);
    }
    std::filesystem::remove_all(dir);
}

}  // namespace
}  // namespace evmesh
