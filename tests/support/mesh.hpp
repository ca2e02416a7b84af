// Test helpers for in-process meshes: node options on a test's own mesh and beacon port, and a
// check that every node sees every other one with its link up.
#pragma once

#include <memory>
#include <string>
#include <vector>

#include <evmesh/node.hpp>

namespace evmesh::test {

inline node_options mesh_options(const std::string& mesh, const std::string& name, std::uint16_t port) {
    node_options o;
    o.name = name;
    o.mesh = mesh;
    o.discovery.port = port;
    return o;
}

inline bool full_mesh(const std::vector<std::unique_ptr<node>>& nodes) {
    for (const auto& n : nodes) {
        const auto peers = n->peers();
        if (peers.size() != nodes.size() - 1) {
            return false;
        }
        for (const auto& p : peers) {
            if (p.state != peer_info::link_state::connected) {
                return false;
            }
        }
    }
    return true;
}

}  // namespace evmesh::test
