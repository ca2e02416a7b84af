// Embedding libevmesh: a C++ service that runs its own node, publishes and subscribes in-process,
// and (with the mesh on) meets other nodes on this host by itself.
//
//   embedded_service [MESH] [COUNT] [BEACON_PORT] [STAY_SECONDS]
//
// Publishes COUNT orders.eu.created events, receives its own and (with STAY_SECONDS > 0) those
// of the rest of the mesh for that long.
#include <algorithm>
#include <atomic>
#include <cstdio>
#include <string>
#include <thread>

#include <evmesh/node.hpp>

int main(int argc, char** argv) {
    std::setvbuf(stdout, nullptr, _IOLBF, 0);  // line-buffered even into a pipe
    const std::string mesh = argc > 1 ? argv[1] : "example";
    const int count = argc > 2 ? std::stoi(argv[2]) : 10;
    const int beacon_port = argc > 3 ? std::stoi(argv[3]) : 19470;
    const int stay = argc > 4 ? std::stoi(argv[4]) : 0;

    evmesh::node_options opts;
    opts.name = "embedded-service";
    opts.mesh = mesh;
    opts.discovery.port = static_cast<std::uint16_t>(beacon_port);
    auto node = evmesh::node::create(opts);
    if (!node) {
        std::fprintf(stderr, "cannot start node: %s (%s)\n", node.error().message().c_str(),
                     evmesh::last_error_message().c_str());
        return 1;
    }
    std::atomic<int> received{0};
    // callbacks run on the subscription's own thread, never on the node's I/O thread
    auto sub = (*node)->subscribe("orders.*.created", [&](const evmesh::event_view& ev) {
        std::printf("received %.*s seq=%llu from %.*s: %.*s\n", static_cast<int>(ev.topic.size()),
                    ev.topic.data(), static_cast<unsigned long long>(ev.seq),
                    static_cast<int>(ev.source.size()), ev.source.data(),
                    static_cast<int>(ev.payload.size()), ev.payload.data());
        ++received;
    });
    auto pub = (*node)->make_publisher({.name = "orders"});
    if (!sub || !pub) {
        return 1;
    }
    // In a mesh, peers connect (and send their subscriptions) within milliseconds of start-up;
    // wait for them, bounded, so the first events also reach subscribers on other nodes.
    if (stay > 0) {
        for (int i = 0; i < 200; ++i) {
            const auto peers = (*node)->peers();
            if (!peers.empty() && std::all_of(peers.begin(), peers.end(), [](const evmesh::peer_info& p) {
                    return p.state == evmesh::peer_info::link_state::connected;
                })) {
                std::this_thread::sleep_for(std::chrono::milliseconds(50));  // their subscriptions
                break;
            }
            std::this_thread::sleep_for(std::chrono::milliseconds(10));
        }
    }
    // subscriptions travel asynchronously: publish once the first event comes back
    while (received == 0) {
        (void)pub->publish("orders.warmup.created", "{}", {}, "application/json");
        std::this_thread::sleep_for(std::chrono::milliseconds(5));
    }
    const int base = received;
    for (int i = 0; i < count; ++i) {
        auto r = pub->publish("orders.eu.created", "{\"order\":" + std::to_string(i) + "}",
                              {{"traceparent", "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"}},
                              "application/json");
        if (!r) {
            std::fprintf(stderr, "publish failed: %s\n", r.error().message().c_str());
        }
    }
    for (int i = 0; i < 200 && received < base + count; ++i) {
        std::this_thread::sleep_for(std::chrono::milliseconds(10));
    }
    const int own = received - base;
    std::this_thread::sleep_for(std::chrono::seconds(stay));
    const auto c = (*node)->counters();
    std::printf("done: %d of %d own events received, %d in all; %llu from peers; %zu peers\n", own,
                count, received.load(), static_cast<unsigned long long>(c.mesh_in_events),
                (*node)->peers().size());
    return own >= count ? 0 : 1;
}
