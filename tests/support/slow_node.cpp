// Test helper: a node in the mesh with one deliberately slow subscription (a slow consumer),
// so the node's stats show the gaps it detects.
//   evmesh_test_slow_node MESH BEACON_PORT PATTERN DELAY_US SECONDS
#include <chrono>
#include <cstdio>
#include <string>
#include <thread>

#include <evmesh/node.hpp>

int main(int argc, char** argv) {
    if (argc != 6) {
        std::fprintf(stderr, "usage: evmesh_test_slow_node MESH BEACON_PORT PATTERN DELAY_US SECONDS\n");
        return 2;
    }
    evmesh::node_options o;
    o.name = "slow-node";
    o.mesh = argv[1];
    o.discovery.port = static_cast<std::uint16_t>(std::stoi(argv[2]));
    o.hwm = 50;  // a small queue: a fast publisher overruns it
    auto n = evmesh::node::create(o);
    if (!n) {
        std::fprintf(stderr, "cannot start: %s\n", evmesh::last_error_message().c_str());
        return 1;
    }
    const auto delay = std::chrono::microseconds(std::stoi(argv[4]));
    auto sub = (*n)->subscribe(argv[3], [delay](const evmesh::event_view&) { std::this_thread::sleep_for(delay); },
                               evmesh::subscription_options{.hwm = 50});
    if (!sub) {
        return 1;
    }
    std::printf("READY %s\n", (*n)->id().c_str());
    std::fflush(stdout);
    std::this_thread::sleep_for(std::chrono::seconds(std::stoi(argv[5])));
    const auto c = sub->counters();
    std::printf("received %llu gaps %llu\n", static_cast<unsigned long long>(c.received),
                static_cast<unsigned long long>(c.gaps));
    return 0;
}
