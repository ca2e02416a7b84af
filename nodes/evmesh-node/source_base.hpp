// What every inbound source shares (sources.cpp): decoding a broker message into an event (a
// CloudEvent, structured or binary, or a plain payload with an id from the broker position), the
// mesh topic template, publishing with retries until the node accepts, dead letters, counters.
// Each broker's source (source_mqtt.cpp, source_redis.cpp) reads, calls deliver(), and
// acknowledges only when deliver() answers `accepted`.
#pragma once

#include <algorithm>
#include <atomic>
#include <chrono>
#include <deque>
#include <condition_variable>
#include <map>
#include <mutex>
#include <optional>
#include <string>
#include <thread>
#include <vector>

#include <evmesh/node.hpp>

#include "config.hpp"
#include "sources.hpp"

namespace evmesh::app {

// A broker URL: scheme://[user[:password]@]host[:port][/path]
struct broker_url {
    std::string scheme, user, password, host, path;
    int port = 0;
};
std::optional<broker_url> parse_broker_url(const std::string& url, std::initializer_list<const char*> schemes,
                                           int default_port);

// One message as a broker handed it over.
struct inbound_message {
    std::string body;
    std::string content_type;
    // CloudEvents attributes found in the protocol's headers/properties/fields, by attribute name
    // without prefix ("id", "source", "type", "specversion", "time", extensions).
    std::map<std::string, std::string> ce;
    std::string broker_topic;  // the MQTT topic / Redis stream, with its separators as '.'
    std::string position;      // a stable key of the broker position (same on a redelivery)
    std::string undecodable;   // set by the source: why this message cannot be an event
};

// The mesh topic template: literal text with {topic}, {topic.N} (of the broker topic) and {type}
// (the CloudEvents type). Empty text = the CloudEvents type for a CloudEvent, else {topic}.
class topic_template {
public:
    topic_template() = default;
    // Throws std::invalid_argument with a one-line reason.
    explicit topic_template(const std::string& text);
    std::string expand(const std::string& broker_topic, const std::string& ce_type) const;

private:
    struct part {
        enum kind_t { literal, topic, segment, type } kind;
        std::string text;
        std::size_t index = 0;
    };
    std::vector<part> parts_;
    bool defaulted_ = true;
};

enum class delivery { accepted, stopping };

// Acknowledgements held for ack_delay after the node accepted the event. Accepted means the
// node's publisher took it; the node's I/O thread hands it to the subscribers a moment later. A
// node killed (SIGKILL) within that moment would lose an event whose message was already
// acknowledged; held back, the acknowledgement dies with the node and the broker delivers the
// message again (a duplicate with the same id, never a loss). Items come out in the order added.
template <class T>
class ack_holder {
public:
    explicit ack_holder(std::chrono::milliseconds delay) : delay_(delay) {}

    void add(T v) { q_.emplace_back(std::chrono::steady_clock::now(), std::move(v)); }
    bool empty() const { return q_.empty(); }

    // The items held for ack_delay (every item when `all`), oldest first.
    std::vector<T> take_ready(bool all = false) {
        std::vector<T> out;
        const auto limit = std::chrono::steady_clock::now() - delay_;
        while (!q_.empty() && (all || q_.front().first <= limit)) {
            out.push_back(std::move(q_.front().second));
            q_.pop_front();
        }
        return out;
    }

    // Milliseconds until the oldest item is ready (1 at least); `idle` when nothing is held.
    std::int64_t wait_ms(std::int64_t idle) const {
        if (q_.empty()) {
            return idle;
        }
        const auto left = std::chrono::duration_cast<std::chrono::milliseconds>(
                              q_.front().first + delay_ - std::chrono::steady_clock::now())
                              .count();
        return std::clamp<std::int64_t>(left, 1, idle);
    }

private:
    std::chrono::milliseconds delay_;
    std::deque<std::pair<std::chrono::steady_clock::time_point, T>> q_;
};

class inbound_source {
public:
    inbound_source(node& n, source_config cfg);
    virtual ~inbound_source();
    inbound_source(const inbound_source&) = delete;
    inbound_source& operator=(const inbound_source&) = delete;

    bool start(std::string& error);  // makes the publisher, starts the thread
    void stop();                     // asks run() to end and joins it

    const source_config& config() const { return cfg_; }
    const source_counters& counters() const { return counters_; }

protected:
    // The source's thread: connects, reads, delivers, acknowledges, reconnects; returns once
    // stopping() (checked at least every second).
    virtual void run() = 0;

    // Decodes and publishes one message. Undecodable: counted (or published to dead_letter) and
    // `accepted` (the caller acknowledges it: it would never decode). A publish the node refuses
    // is retried with a backoff (and counted) until accepted or the source stops: `stopping` means
    // the caller must not acknowledge.
    delivery deliver(const inbound_message& m);

    bool stopping() const { return stop_.load(); }
    // Sleeps up to `ms` unless stopping; false when stopping.
    bool pause(std::int64_t ms);
    // Reconnect backoff: 200 ms doubling to 5 s, reset by connected().
    bool backoff();
    void connected();
    void disconnected(const std::string& why);

    node& node_;
    source_config cfg_;
    source_counters counters_;
    std::string log_name_;  // "source 'name' (mqtt)"

private:
    bool publish_until_accepted(event& ev);

    topic_template topic_;
    std::optional<publisher> pub_;
    std::atomic<bool> stop_{false};
    std::mutex m_;
    std::condition_variable cv_;
    std::thread thread_;
    std::int64_t backoff_ms_ = 200;
    bool was_connected_ = false;
};

// The factories of the broker sources (source_mqtt.cpp, source_redis.cpp, source_nats.cpp,
// source_amqp.cpp, source_kafka.cpp).
std::unique_ptr<inbound_source> make_mqtt_source(node& n, const source_config& cfg);
std::unique_ptr<inbound_source> make_redis_source(node& n, const source_config& cfg);
std::unique_ptr<inbound_source> make_nats_source(node& n, const source_config& cfg);
std::unique_ptr<inbound_source> make_amqp_source(node& n, const source_config& cfg);
std::unique_ptr<inbound_source> make_kafka_source(node& n, const source_config& cfg);

// kafka://host[:port][,host[:port]...] (port 9092) as librdkafka's bootstrap.servers, or nullopt.
std::optional<std::string> kafka_bootstrap(const std::string& url);
// Whether librdkafka takes the consumer configuration of a kafka source (its `properties`); one
// line naming the property otherwise (source_kafka.cpp).
bool check_kafka_properties(const source_config& cfg, std::string& error);

// The default consumer identity: stable across restarts, so the broker keeps the session (MQTT)
// or the pending entries (Redis) for the restarted node.
std::string default_consumer_name(const node& n, const source_config& cfg);

}  // namespace evmesh::app
