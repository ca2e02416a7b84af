// Core v2: every promise of node.hpp under faults (issue "Core v2"). Multi-node tests run in one
// process over real tcp loopback links; link faults reset real TCP connections.
// EVMESH_STRESS_SECONDS (default 5) sets the length of the flood tests; 60 on demand.
#include <gtest/gtest.h>

#include <atomic>
#include <cstdlib>
#include <filesystem>
#include <mutex>
#include <thread>
#include <vector>

#include <evmesh/node.hpp>

#include "../../support/link_fault.hpp"
#include "../../support/mesh.hpp"
#include "../../support/wait.hpp"

namespace evmesh {
namespace {

using namespace std::chrono_literals;
using test::wait_until;

int stress_seconds() {
    const char* s = std::getenv("EVMESH_STRESS_SECONDS");
    return s != nullptr ? std::max(1, std::atoi(s)) : 5;
}

std::vector<std::unique_ptr<node>> make_mesh(int n, const std::string& base,
                                             const std::function<void(node_options&)>& tweak = {}) {
    const auto mesh = test::unique_mesh(base);
    const auto port = test::unique_port();
    std::vector<std::unique_ptr<node>> nodes;
    for (int i = 0; i < n; ++i) {
        auto o = test::mesh_options(mesh, "n" + std::to_string(i), port);
        if (tweak) {
            tweak(o);
        }
        auto nd = node::create(o);
        EXPECT_TRUE(nd) << nd.error().message() << ": " << last_error_message();
        if (!nd) {
            return {};
        }
        nodes.push_back(std::move(*nd));
    }
    return nodes;
}

bool connected(const std::vector<std::unique_ptr<node>>& nodes) {
    return test::full_mesh(nodes);
}

// Waits until `sub_node`'s subscription for `topic` has reached `pub_node` (its mesh output has
// a subscriber): a probe publisher repeats until the probe arrives.
bool route_ready(node& pub_node, node& sub_node, const std::string& topic) {
    auto probe = sub_node.subscribe(topic);
    if (!probe) {
        return false;
    }
    auto p = pub_node.make_publisher({.name = "probe"});
    if (!p) {
        return false;
    }
    return wait_until([&] {
        (void)p->publish(topic, "probe");
        return probe->receive(5ms).has_value();
    }, 10s);
}

// Ordered per-source stream check of one subscription.
struct stream_check {
    std::mutex mu;
    std::map<std::string, std::uint64_t> last;
    std::uint64_t received = 0, out_of_order = 0, missing = 0;

    event_callback callback() {
        return [this](const event_view& v) {
            std::lock_guard lk(mu);
            ++received;
            auto& l = last[std::string(v.source)];
            if (v.seq != l + 1) {
                if (v.seq > l + 1) {
                    missing += v.seq - l - 1;
                } else {
                    ++out_of_order;
                }
            }
            l = std::max(l, v.seq);
        };
    }
    std::uint64_t count() {
        std::lock_guard lk(mu);
        return received;
    }
};

// ---- flow control: block policy between nodes ----

void flood_each_other(int n_nodes) {
    auto nodes = make_mesh(n_nodes, "flood", [](node_options& o) {
        o.slow_subscriber = overflow_policy::block;
        o.hwm = 1000;
    });
    ASSERT_EQ(nodes.size(), static_cast<std::size_t>(n_nodes));
    ASSERT_TRUE(wait_until([&] { return connected(nodes); }, 10s));
    // every node subscribes to every other node's topic, and publishes its own at full speed
    std::vector<std::unique_ptr<stream_check>> checks;
    std::vector<subscription> subs;
    for (int i = 0; i < n_nodes; ++i) {
        for (int j = 0; j < n_nodes; ++j) {
            if (i == j) {
                continue;
            }
            checks.push_back(std::make_unique<stream_check>());
            auto s = nodes[static_cast<std::size_t>(i)]->subscribe("flood." + std::to_string(j),
                                                                   checks.back()->callback());
            ASSERT_TRUE(s);
            subs.push_back(std::move(*s));
        }
    }
    for (int i = 0; i < n_nodes; ++i) {
        for (int j = 0; j < n_nodes; ++j) {
            if (i != j) {
                ASSERT_TRUE(wait_until([&] {
                    return nodes[static_cast<std::size_t>(j)]->counters().subscriptions_mesh >= 1;
                }, 10s));
            }
        }
    }
    std::this_thread::sleep_for(300ms);  // subscriptions reach every publisher's node
    std::atomic<bool> stop{false};
    std::vector<std::uint64_t> published(static_cast<std::size_t>(n_nodes), 0);
    std::vector<std::thread> pubs;
    std::atomic<int> failures{0};
    for (int i = 0; i < n_nodes; ++i) {
        pubs.emplace_back([&, i] {
            // block with a deadline: a mutual stall fails the test instead of hanging it
            auto p = nodes[static_cast<std::size_t>(i)]->make_publisher(
                {.name = "flood", .policy = overflow_policy::block, .block_timeout = 10s});
            if (!p) {
                ++failures;
                return;
            }
            const std::string topic = "flood." + std::to_string(i);
            const std::string payload(64, 'x');
            while (!stop) {
                if (!p->publish(topic, payload)) {
                    ++failures;
                    return;
                }
                ++published[static_cast<std::size_t>(i)];
            }
        });
    }
    const auto t0 = std::chrono::steady_clock::now();
    while (std::chrono::steady_clock::now() - t0 < std::chrono::seconds(stress_seconds())) {
        std::this_thread::sleep_for(100ms);
        for (auto& n : nodes) {
            ASSERT_TRUE(n->healthy()) << "an I/O thread stopped answering";
        }
    }
    stop = true;
    for (auto& t : pubs) {
        t.join();
    }
    ASSERT_EQ(failures.load(), 0) << "a publisher blocked for 10 s: the nodes stalled each other";
    // every subscriber of a node's topic gets all of it, in order
    std::uint64_t expected_total = 0;
    for (int j = 0; j < n_nodes; ++j) {
        expected_total += published[static_cast<std::size_t>(j)] * static_cast<std::uint64_t>(n_nodes - 1);
    }
    ASSERT_TRUE(wait_until([&] {
        std::uint64_t got = 0;
        for (auto& c : checks) {
            got += c->count();
        }
        return got == expected_total;
    }, 60s)) << "published " << expected_total;
    std::uint64_t total = 0;
    for (auto& c : checks) {
        std::lock_guard lk(c->mu);
        EXPECT_EQ(c->missing, 0U);
        EXPECT_EQ(c->out_of_order, 0U);
        total += c->received;
    }
    EXPECT_EQ(total, expected_total);
    for (auto& n : nodes) {
        const auto c = n->counters();
        EXPECT_EQ(c.links_down, 0U) << "a link was lost under flow control";
        EXPECT_EQ(c.torn_messages, 0U);
        EXPECT_EQ(c.subscriber_gaps, 0U);
    }
    std::uint64_t sum = 0;
    for (auto p : published) {
        sum += p;
    }
    std::printf("flood %d nodes, %d s: %llu events published, each to %d subscribers\n", n_nodes,
                stress_seconds(), static_cast<unsigned long long>(sum), n_nodes - 1);
}

TEST(CoreV2, TwoNodesFloodingEachOtherInBlockModeLoseNothingAndNeverStall) {
    flood_each_other(2);
}

TEST(CoreV2, ThreeNodesFloodingEachOtherInBlockModeLoseNothingAndNeverStall) {
    flood_each_other(3);
}

// ---- limits at publish ----

TEST(CoreV2, LimitsAreEnforcedAtPublishAndNothingElseIsLost) {
    auto nodes = make_mesh(2, "limits", [](node_options& o) { o.max_event_bytes = 64 * 1024; });
    ASSERT_EQ(nodes.size(), 2U);
    ASSERT_TRUE(wait_until([&] { return connected(nodes); }, 10s));
    auto sub = nodes[1]->subscribe("lim.>");
    ASSERT_TRUE(sub);
    ASSERT_TRUE(route_ready(*nodes[0], *nodes[1], "lim.probe"));
    auto pub = nodes[0]->make_publisher({.name = "lim"});
    ASSERT_TRUE(pub);
    EXPECT_EQ(pub->publish("lim.a", "x", {{"k", std::string(2000, 'v')}}).error(), errc::too_large);
    std::vector<header> many;
    for (int i = 0; i < 65; ++i) {
        many.emplace_back("h" + std::to_string(i), "v");
    }
    EXPECT_EQ(pub->publish("lim.a", "x", many).error(), errc::too_large);
    EXPECT_EQ(pub->publish("lim.a", "x", {{"k", std::string("\xff\xfe")}}).error(), errc::wrong_type);
    EXPECT_EQ(pub->publish("lim.a", std::string(2 << 20, 'p')).error(), errc::too_large);
    EXPECT_EQ(pub->publish("lim.a", "x", {}, "\xc3\x28").error(), errc::wrong_type);
    EXPECT_EQ(pub->rejected(), 5U);
    // the largest event the limits allow crosses the mesh; the link survives
    for (int i = 0; i < 20; ++i) {
        ASSERT_TRUE(pub->publish("lim.ok", std::string(64 * 1024 - 200, 'p')));
        ASSERT_TRUE(pub->publish("lim.small", "s"));
    }
    int got = 0;
    while (got < 40) {
        auto e = sub->receive(5s);
        ASSERT_TRUE(e) << "received " << got;
        if (e->topic != "lim.probe") {
            ++got;
        }
    }
    EXPECT_EQ(sub->counters().decode_errors, 0U);
    EXPECT_EQ(nodes[0]->counters().publish_rejected, 5U);
    EXPECT_EQ(nodes[1]->counters().links_down, 0U);
}

// ---- links survive blips ----

TEST(CoreV2, ADroppedLinkKeepsThePeerAndReconnectsAtOnce) {
    auto nodes = make_mesh(2, "blip");
    ASSERT_EQ(nodes.size(), 2U);
    ASSERT_TRUE(wait_until([&] { return connected(nodes); }, 10s));
    const auto port = test::endpoint_port(nodes[0]->mesh_endpoint());
    const auto t0 = std::chrono::steady_clock::now();
    ASSERT_GT(test::cut_tcp_links(port), 0);
    ASSERT_TRUE(wait_until([&] { return nodes[1]->counters().links_down >= 1; }, 2s));
    // still a peer, and connected again well before the next beacon (800 ms)
    EXPECT_EQ(nodes[1]->peers().size(), 1U);
    ASSERT_TRUE(wait_until([&] { return connected(nodes); }, 2s));
    const auto took = std::chrono::steady_clock::now() - t0;
    EXPECT_LT(took, 700ms);
    EXPECT_EQ(nodes[1]->counters().peers_expired, 0U);
    EXPECT_GE(nodes[1]->counters().links_up, 2U);
}

// ---- lossless links: NAK repair ----

struct repair_run {
    std::uint64_t published = 0, received = 0, missing = 0, out_of_order = 0;
    node_counters sub_node, pub_node;
    std::vector<history_stats> pub_histories;
};

// `history_dir`: the publishing node keeps a durable history of rp.> there (repair beyond the window)
repair_run publish_through_flaps(bool repair, int flaps, std::size_t window_bytes = 64U << 20,
                                 const std::string& history_dir = {}) {
    int made = 0;
    auto nodes = make_mesh(2, repair ? "repair" : "norepair", [&](node_options& o) {
        if (repair) {
            o.repair.patterns = {"rp.>"};
            o.repair.window_bytes = window_bytes;
        }
        if (!history_dir.empty() && made++ == 0) {
            history_options h;
            h.name = "rp";
            h.patterns = {"rp.>"};
            h.dir = history_dir;
            o.history.push_back(h);
        }
    });
    repair_run r;
    EXPECT_EQ(nodes.size(), 2U);
    if (nodes.size() != 2) {
        return r;
    }
    EXPECT_TRUE(wait_until([&] { return connected(nodes); }, 10s));
    stream_check check;
    auto sub = nodes[1]->subscribe("rp.>", check.callback());
    EXPECT_TRUE(sub);
    EXPECT_TRUE(wait_until([&] { return nodes[0]->counters().subscriptions_mesh >= 1; }, 10s));
    auto pub = nodes[0]->make_publisher({.name = "flap"});
    const auto port = test::endpoint_port(nodes[0]->mesh_endpoint());
    std::atomic<bool> stop{false};
    std::thread faults([&] {
        for (int i = 0; i < flaps && !stop; ++i) {
            std::this_thread::sleep_for(100ms);
            test::cut_tcp_links(port);
        }
    });
    const auto t0 = std::chrono::steady_clock::now();
    const auto run_for = std::chrono::milliseconds(100 * flaps + 300);
    while (std::chrono::steady_clock::now() - t0 < run_for) {
        for (int i = 0; i < 20; ++i) {
            if (pub->publish("rp.stream", "payload")) {
                ++r.published;
            }
        }
        std::this_thread::sleep_for(1ms);  // ~15 k events/s
    }
    stop = true;
    faults.join();
    // repair completes within its retries; without repair nothing more arrives
    wait_until([&] {
        const auto c = nodes[1]->counters();
        return check.count() + c.repair_lost >= r.published;
    }, repair ? 10s : 1s);
    std::this_thread::sleep_for(300ms);
    std::lock_guard lk(check.mu);
    r.received = check.received;
    r.missing = check.missing;
    r.out_of_order = check.out_of_order;
    r.sub_node = nodes[1]->counters();
    r.pub_node = nodes[0]->counters();
    r.pub_histories = nodes[0]->histories();
    return r;
}

TEST(CoreV2, WithoutRepairLinkFlapsLoseEvents) {
    // the fault injection is real: the same run without repair loses events
    const auto r = publish_through_flaps(false, 10);
    EXPECT_LT(r.received, r.published);
    EXPECT_GT(r.sub_node.links_down, 0U);
}

TEST(CoreV2, RepairRecoversEveryEventAcrossTwentyLinkFlaps) {
    const auto r = publish_through_flaps(true, 20);
    EXPECT_GT(r.published, 10000U);
    EXPECT_EQ(r.received, r.published) << "lost " << r.sub_node.repair_lost;
    EXPECT_EQ(r.missing, 0U);
    EXPECT_EQ(r.out_of_order, 0U);
    EXPECT_EQ(r.sub_node.repair_lost, 0U);
    EXPECT_GT(r.sub_node.repair_recovered, 0U) << "the flaps should have needed repair";
    EXPECT_GT(r.sub_node.links_down, 0U);
    std::printf("repair: %llu published, %llu recovered by %llu NAKs over %llu link drops\n",
                static_cast<unsigned long long>(r.published),
                static_cast<unsigned long long>(r.sub_node.repair_recovered),
                static_cast<unsigned long long>(r.sub_node.repair_naks),
                static_cast<unsigned long long>(r.sub_node.links_down));
}

TEST(CoreV2, WhatLeftTheWindowIsReportedWithItsRange) {
    // a window of ~8 KiB cannot cover a flap at 15 k events/s: what it lost is reported
    const auto r = publish_through_flaps(true, 5, 8 * 1024);
    EXPECT_GT(r.sub_node.repair_lost, 0U);
    EXPECT_EQ(r.received + r.sub_node.repair_lost, r.published)
        << "every event is either delivered or reported lost";
    EXPECT_EQ(r.out_of_order, 0U);
}

TEST(CoreV2, WhatLeftTheWindowIsRepairedFromTheDurableHistory) {
    // The same 8 KiB window, but the publishing node keeps a durable history of the topics: the
    // window is the history's in-memory tail, and NAKs for what aged out of it are answered from
    // disk (docs/HISTORY.md, "One mechanism"). Nothing is lost.
    char tmpl[] = "/tmp/evmesh-rp-history-XXXXXX";
    const std::string dir = mkdtemp(tmpl);
    const auto r = publish_through_flaps(true, 5, 8 * 1024, dir);
    std::filesystem::remove_all(dir);
    EXPECT_GT(r.published, 3000U);
    EXPECT_EQ(r.received, r.published) << "lost " << r.sub_node.repair_lost;
    EXPECT_EQ(r.sub_node.repair_lost, 0U);
    EXPECT_EQ(r.missing, 0U);
    EXPECT_EQ(r.out_of_order, 0U);
    EXPECT_GT(r.pub_node.repair_history_requests, 0U) << "the flaps should have needed the history";
    EXPECT_GT(r.pub_node.repair_from_history, 0U);
    ASSERT_EQ(r.pub_histories.size(), 1U);
    EXPECT_GT(r.pub_histories[0].repaired, 0U);  // its stats are a snapshot (every 200 ms): not compared
    std::printf("repair from history: %llu published, %llu recovered (%llu from disk in %llu answers)\n",
                static_cast<unsigned long long>(r.published),
                static_cast<unsigned long long>(r.sub_node.repair_recovered),
                static_cast<unsigned long long>(r.pub_node.repair_from_history),
                static_cast<unsigned long long>(r.pub_histories[0].repairs));
}

TEST(CoreV2, RepairCoversTheStartOfAStream) {
    // Events published right after a remote subscribe, before the subscription has reached the
    // publishing node, are recovered from its window (they were published after subscribe()).
    auto nodes = make_mesh(2, "start", [](node_options& o) { o.repair.patterns = {"st.>"}; });
    ASSERT_EQ(nodes.size(), 2U);
    ASSERT_TRUE(wait_until([&] { return connected(nodes); }, 10s));
    auto pub = nodes[0]->make_publisher({.name = "early"});
    ASSERT_TRUE(pub);
    // an older stream that started before the subscription: not replayed
    for (int i = 0; i < 50; ++i) {
        ASSERT_TRUE(pub->publish("st.old", "before"));
    }
    // handled by the publishing node before the subscription exists (else they are live events)
    ASSERT_TRUE(wait_until([&] { return nodes[0]->counters().local_in_events >= 50; }, 5s));
    std::this_thread::sleep_for(5ms);  // the node's clock moves past their time
    stream_check check;
    auto sub = nodes[1]->subscribe("st.>", check.callback());
    ASSERT_TRUE(sub);
    for (int i = 0; i < 200; ++i) {
        ASSERT_TRUE(pub->publish("st.new", "after"));
    }
    ASSERT_TRUE(wait_until([&] { return check.count() >= 200; }, 5s)) << check.count();
    std::this_thread::sleep_for(500ms);
    std::lock_guard lk(check.mu);
    EXPECT_EQ(check.last[pub->source()], 200U);
    const auto c1 = nodes[1]->counters();
    EXPECT_EQ(check.received, 200U) << "st.old events were published before the subscription: naks "
                                    << c1.repair_naks << " recovered " << c1.repair_recovered
                                    << " skipped " << c1.repair_skipped << " dup " << c1.repair_duplicates;
    EXPECT_EQ(nodes[1]->counters().repair_lost, 0U);
}

TEST(CoreV2, LossAtTheTailOfAStreamIsDetectedByHeartbeats) {
    auto nodes = make_mesh(2, "tail", [](node_options& o) { o.repair.patterns = {"tl.>"}; });
    ASSERT_EQ(nodes.size(), 2U);
    ASSERT_TRUE(wait_until([&] { return connected(nodes); }, 10s));
    stream_check check;
    auto sub = nodes[1]->subscribe("tl.>", check.callback());
    ASSERT_TRUE(sub);
    ASSERT_TRUE(wait_until([&] { return nodes[0]->counters().subscriptions_mesh >= 1; }, 10s));
    auto pub = nodes[0]->make_publisher({.name = "tail"});
    ASSERT_TRUE(pub->publish("tl.x", "1"));
    ASSERT_TRUE(wait_until([&] { return check.count() == 1; }, 5s));
    // cut the link, publish the last events of the stream while it is down, then stop
    test::cut_tcp_links(test::endpoint_port(nodes[0]->mesh_endpoint()));
    for (int i = 0; i < 100; ++i) {
        ASSERT_TRUE(pub->publish("tl.x", "tail"));
    }
    ASSERT_TRUE(wait_until([&] { return check.count() == 101; }, 5s)) << check.count();
    std::lock_guard lk(check.mu);
    EXPECT_EQ(check.missing, 0U);
}

// ---- the threading contract of node.hpp ----

TEST(CoreV2, ConcurrentStopIsSafe) {
    for (int round = 0; round < 20; ++round) {
        node_options o;
        o.mesh_enabled = false;
        auto n = node::create(o);
        ASSERT_TRUE(n);
        std::vector<std::thread> ts;
        for (int i = 0; i < 4; ++i) {
            ts.emplace_back([&] { (*n)->stop(); });
        }
        for (auto& t : ts) {
            t.join();
        }
        EXPECT_FALSE((*n)->running());
    }
}

TEST(CoreV2, ASubscriptionClosedOrDestroyedInItsOwnCallbackStopsCleanly) {
    node_options o;
    o.mesh_enabled = false;
    auto n = node::create(o);
    ASSERT_TRUE(n);
    auto pub = (*n)->make_publisher();
    ASSERT_TRUE(pub);
    // destroyed from inside its callback
    std::mutex holder_mu;
    std::optional<subscription> holder;
    std::atomic<int> calls{0};
    auto s = (*n)->subscribe("cb.destroy", [&](const event_view&) {
        std::lock_guard lk(holder_mu);
        holder.reset();  // destroys the subscription whose callback this is
        ++calls;
    });
    ASSERT_TRUE(s);
    {
        std::lock_guard lk(holder_mu);
        holder.emplace(std::move(*s));
    }
    ASSERT_TRUE(pub->publish("cb.destroy", "1"));
    ASSERT_TRUE(wait_until([&] { return calls.load() == 1; }, 5s));
    for (int i = 0; i < 10; ++i) {
        ASSERT_TRUE(pub->publish("cb.destroy", "more"));
    }
    std::this_thread::sleep_for(100ms);
    EXPECT_EQ(calls.load(), 1) << "no callback after the subscription was destroyed";
    // closed from inside its callback
    std::atomic<int> calls2{0};
    std::atomic<subscription*> self_ptr{nullptr};
    auto s2 = (*n)->subscribe("cb.close", [&](const event_view&) {
        self_ptr.load()->close();
        ++calls2;
    });
    ASSERT_TRUE(s2);
    self_ptr = &*s2;

    for (int i = 0; i < 10; ++i) {
        ASSERT_TRUE(pub->publish("cb.close", "x"));
    }
    ASSERT_TRUE(wait_until([&] { return calls2.load() >= 1; }, 5s));
    std::this_thread::sleep_for(100ms);
    EXPECT_EQ(calls2.load(), 1);
    s2->close();  // again, from outside: a no-op
}

TEST(CoreV2, MovedFromHandlesAreSafe) {
    node_options o;
    o.mesh_enabled = false;
    auto n = node::create(o);
    ASSERT_TRUE(n);
    auto pub = (*n)->make_publisher();
    ASSERT_TRUE(pub);
    publisher moved = std::move(*pub);
    EXPECT_EQ(pub->publish("a.b", "x").error(), errc::stopped);  // NOLINT(bugprone-use-after-move)
    EXPECT_EQ(pub->published(), 0U);
    EXPECT_TRUE(pub->source().empty());
    auto s = (*n)->subscribe("a.b");
    ASSERT_TRUE(s);
    subscription s2 = std::move(*s);
    EXPECT_FALSE(s->receive(1ms).has_value());  // NOLINT(bugprone-use-after-move)
    EXPECT_EQ(s->counters().received, 0U);
    s->close();
    EXPECT_TRUE(moved.publish("a.b", "x"));
    EXPECT_TRUE(s2.receive(2s).has_value());
}

TEST(CoreV2, SubscriptionIsInEffectForASaturatingPublisher) {
    // A publisher that publishes as fast as it can while subscriptions come and go: every
    // subscription receives an event published after subscribe() returned. The node runs `block`
    // so that no event is dropped for a subscriber that falls behind (under `drop` a full
    // subscriber may lose the marker, which is that policy working, not a late subscription).
    node_options o;
    o.mesh_enabled = false;
    o.slow_subscriber = overflow_policy::block;
    auto n = node::create(o);
    ASSERT_TRUE(n);
    std::atomic<bool> stop{false};
    std::thread flood([&] {
        auto p = (*n)->make_publisher({.name = "sat", .policy = overflow_policy::drop});
        while (!stop) {
            (void)p->publish("sat.x", "flood");
        }
    });
    struct joiner {
        std::atomic<bool>& stop;
        std::thread& t;
        ~joiner() {
            stop = true;
            t.join();
        }
    } join_flood{stop, flood};
    for (int i = 0; i < 200; ++i) {
        auto s = (*n)->subscribe("sat.x");
        ASSERT_TRUE(s);
        auto p = (*n)->make_publisher();
        ASSERT_TRUE(p->publish("sat.x", "marker"));
        bool seen = false;
        const auto deadline = std::chrono::steady_clock::now() + 10s;
        while (!seen && std::chrono::steady_clock::now() < deadline) {
            auto e = s->receive_view(100ms);
            seen = e && e->payload == "marker";
        }
        ASSERT_TRUE(seen) << "round " << i;
    }
}

TEST(CoreV2, CallsIntoAWedgedLoopTimeOutAndHealthTurnsFalse) {
    node_options o;
    o.mesh_enabled = false;
    o.stats_interval = 50ms;
    o.call_timeout = 300ms;
    auto n = node::create(o);
    ASSERT_TRUE(n);
    auto watch = (*n)->subscribe("_evmesh.stats.>");  // makes the node build its stats event
    ASSERT_TRUE(watch);
    EXPECT_TRUE((*n)->healthy());
    std::atomic<bool> wedge{false};
    (*n)->set_channel_stats([&] {
        while (wedge) {
            std::this_thread::sleep_for(10ms);
        }
        return std::string("\x90", 1);
    });
    (void)(*n)->counters();
    wedge = true;
    std::this_thread::sleep_for(200ms);
    const auto t0 = std::chrono::steady_clock::now();
    (void)(*n)->counters();  // answers from the last snapshot instead of hanging
    (void)(*n)->peers();
    EXPECT_LT(std::chrono::steady_clock::now() - t0, 2s);
    EXPECT_TRUE(wait_until([&] { return !(*n)->healthy(); }, 3s));
    wedge = false;
    EXPECT_TRUE(wait_until([&] { return (*n)->healthy(); }, 3s));
}

TEST(CoreV2, NamesTooLongForABeaconAreRefusedAtCreate) {
    node_options o;
    o.name = std::string(256, 'n');
    auto n = node::create(o);
    ASSERT_FALSE(n);
    EXPECT_EQ(n.error(), errc::bad_option);
    EXPECT_NE(last_error_message().find("255"), std::string::npos);
}

}  // namespace
}  // namespace evmesh

namespace evmesh {
namespace {

TEST(CoreV2, WhatPublishAcceptsEverySubscriberDecodes) {
    // a node configured for 2 MiB events: its subscriptions decode with the same limits
    node_options o;
    o.mesh_enabled = false;
    o.max_event_bytes = 2U << 20;
    auto n = node::create(o);
    ASSERT_TRUE(n);
    EXPECT_EQ((*n)->limits().max_event_bytes, 2U << 20);
    auto sub = (*n)->subscribe("big.>");
    ASSERT_TRUE(sub);
    auto pub = (*n)->make_publisher();
    ASSERT_TRUE(pub->publish("big.x", std::string(1536 * 1024, 'b')));
    auto e = sub->receive(std::chrono::seconds(5));
    ASSERT_TRUE(e);
    EXPECT_EQ(e->payload.size(), 1536U * 1024U);
    EXPECT_EQ(sub->counters().decode_errors, 0U);
    EXPECT_EQ(pub->publish("big.x", std::string(3U << 20, 'b')).error(), errc::too_large);
}

}  // namespace
}  // namespace evmesh
