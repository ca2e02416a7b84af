// One function per subcommand; each returns the process exit code.
#pragma once

#include <string>
#include <vector>

#include "../inspector.hpp"

namespace evmesh::inspector {

int run_nodes(const mesh_options& o);
int run_topics(const mesh_options& o);
int run_tail(const mesh_options& o, const std::string& pattern, int count, double timeout_s);
int run_stats(const mesh_options& o, const std::string& node_name);
int run_top(const mesh_options& o, double duration_s);
int run_graph(const mesh_options& o);
int run_ping(const mesh_options& o, const std::string& node_name, int count, int interval_ms);
int run_publish(const mesh_options& o,
                const std::string& topic,
                const std::string& payload,
                const std::vector<std::string>& headers,
                const std::string& content_type);

// Builds the JSON view of the mesh shared by nodes, topics, top and graph.
json mesh_snapshot(node& self, const stats_collector& stats);

}  // namespace evmesh::inspector
