// Inbound bridges ("Into the mesh", docs/BRIDGES.md): [[source]] tables of evmesh-node that
// consume from a broker (MQTT, Redis streams, NATS, AMQP, Kafka) and publish what they read into
// the mesh.
//
// At-least-once: a message is acknowledged to its broker (MQTT PUBACK, Redis XACK, a Kafka offset
// commit) only after the node's publisher accepted the event; a message that cannot be published
// is not acknowledged, so the broker delivers it again. The event id is the CloudEvents id when the message is a
// CloudEvent, else derived from the broker position, so a redelivery has the same id.
#pragma once

#include <atomic>
#include <memory>
#include <string>
#include <vector>

#include <evmesh/node.hpp>

#include "config.hpp"

namespace evmesh::app {

// Checks every [[source]] (names, types, URLs, what to consume, templates). One line naming the
// source and key on error.
bool validate_sources(const std::vector<source_config>& sources, std::string& error);

// Counters of one source (read by /metrics from any thread).
struct source_counters {
    std::atomic<std::uint64_t> published{0};      // events the node accepted (then acked)
    std::atomic<std::uint64_t> undecodable{0};    // counted and acked, not published
    std::atomic<std::uint64_t> dead_lettered{0};  // undecodable, published to dead_letter, acked
    std::atomic<std::uint64_t> retried{0};        // publish attempts the node refused (not acked)
    std::atomic<std::uint64_t> connects{0};       // successful connections to the broker
    std::atomic<bool> connected{false};
};

class inbound_source;

// Every source of one node, each on its own thread(s) (never the node's I/O thread).
class source_set {
public:
    // The node outlives the set. Starting never fails for an unreachable broker: the source
    // reconnects with a backoff. Errors (a publisher that cannot be made): false with a message.
    bool start(node& n, const std::vector<source_config>& sources, std::string& error);
    void stop();  // idempotent; joins every thread
    source_set();
    ~source_set();
    source_set(const source_set&) = delete;
    source_set& operator=(const source_set&) = delete;

    // Prometheus text: evmesh_source_events_total{source,outcome}, evmesh_source_connected,
    // evmesh_source_connects_total.
    std::string metrics(const std::string& node_name) const;

private:
    std::vector<std::unique_ptr<inbound_source>> sources_;
};

}  // namespace evmesh::app
