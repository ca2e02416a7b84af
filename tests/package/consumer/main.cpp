// Publishes one event to a subscription through an installed libevmesh; exits 0 when it arrives.
#include <chrono>
#include <cstdio>

#include <evmesh/node.hpp>

int main() {
    evmesh::node_options o;
    o.name = "consumer";
    o.mesh_enabled = false;
    auto node = evmesh::node::create(o);
    if (!node) {
        std::fprintf(stderr, "create: %s\n", node.error().message().c_str());
        return 1;
    }
    auto sub = (*node)->subscribe("pkg.>");
    auto pub = (*node)->make_publisher();
    if (!sub || !pub || !pub->publish("pkg.hello", "from an installed evmesh")) {
        return 1;
    }
    auto e = sub->receive(std::chrono::seconds(5));
    if (!e || e->payload != "from an installed evmesh") {
        std::fprintf(stderr, "no event\n");
        return 1;
    }
    std::printf("received %s on %s\n", e->payload.c_str(), e->topic.c_str());
    return 0;
}
