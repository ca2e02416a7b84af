// Durable pull consumers on a history (docs/HISTORY.md "Pull consumers and queue groups",
// PROTOCOL.md section 13): a named position in a history that clients anywhere in the mesh fetch
// from and acknowledge. Several clients fetching from one consumer form a queue group: each event
// goes to one of them at a time, and an event not acknowledged within ack_wait (its member died,
// or is slow) goes to another, up to max_deliver deliveries, then to the dead-letter topic.
//
// State: `floor` (every position below it is done), `next` (the first position never delivered)
// and the outstanding positions between them (delivered and not acknowledged, or waiting to be
// delivered again) with their delivery counts. Any other position in [floor, next) is done
// (acknowledged, dead-lettered, or not matching the filter). That is all that is saved (a small
// file written atomically at most every 100 ms), so after a restart of the node what was not
// saved as acknowledged is delivered again: at-least-once.
//
// One thread (the history service's) owns every consumer.
#pragma once

#include <chrono>
#include <cstdint>
#include <deque>
#include <functional>
#include <map>
#include <memory>
#include <optional>
#include <string>
#include <string_view>
#include <unordered_set>
#include <vector>

#include <evmesh/node.hpp>

#include <evmesh/topic.hpp>

namespace evmesh::detail {

class history_store;

inline constexpr std::string_view consumer_request_prefix = "_evmesh.consumer.";
inline constexpr std::string_view consumer_reply_prefix = "_evmesh.pull.";
inline constexpr std::string_view fetch_end_type = "application/vnd.evmesh.fetch-end";

struct consumer_config {
    std::string name;
    std::string filter_text = ">";
    std::optional<topic_pattern> filter;
    std::chrono::milliseconds ack_wait{30000};
    std::uint32_t max_deliver = 5;  // 0 = no limit
    std::string dead_letter;        // topic; empty: dead letters are counted and dropped
    bool from_new = false;          // start at the history's head instead of its first event
};

// What a consumer hands out: the record and how often it was delivered (1 = first time).
struct consumer_message {
    std::uint64_t pos;
    std::uint32_t deliveries;
    std::string frame;
};

class consumer {
public:
    // Loads `<dir>/consumer-<name>.state` if present (its saved config wins), else starts fresh.
    static std::unique_ptr<consumer> open(history_store& store, const std::string& dir, consumer_config cfg,
                                          std::string& error);

    // Up to `max` messages: redeliveries first (lowest position first), then new matching
    // records. Marks them pending until now + ack_wait.
    std::vector<consumer_message> take(std::size_t max, std::chrono::steady_clock::time_point now,
                                       const std::string& member);
    bool ack(std::uint64_t pos);
    bool nak(std::uint64_t pos);
    bool in_progress(std::uint64_t pos, std::chrono::steady_clock::time_point now);
    // Pending messages past their deadline go back for redelivery, or to `dead(frame, deliveries)`
    // when they reached max_deliver.
    void expire(std::chrono::steady_clock::time_point now,
                const std::function<void(std::uint64_t, const std::string&, std::uint32_t)>& dead);
    // Whether take() would return something now (cheap).
    bool ready();
    // Saves the state when it changed and at least `every` passed (or force).
    void save(bool force);

    const consumer_config& config() const { return cfg_; }
    consumer_stats stats(std::chrono::steady_clock::time_point now) const;
    bool has_pending() const { return !pending_.empty(); }

private:
    struct pending_entry {
        std::chrono::steady_clock::time_point deadline;
        std::uint32_t deliveries = 0;
    };
    consumer(history_store& s, std::string path, consumer_config cfg)
        : store_(s), path_(std::move(path)), cfg_(std::move(cfg)) {}
    void advance_floor();
    bool load(std::string& error);

    history_store& store_;
    std::string path_;
    consumer_config cfg_;
    std::uint64_t floor_ = 0, next_ = 0;
    std::map<std::uint64_t, pending_entry> pending_;      // delivered, not acknowledged
    std::map<std::uint64_t, std::uint32_t> redeliver_;    // to deliver again: deliveries so far
    std::map<std::string, std::chrono::steady_clock::time_point> members_;  // reply topic -> last fetch
    bool dirty_ = false;
    std::chrono::steady_clock::time_point last_save_{};
    std::uint64_t delivered_ = 0, redelivered_ = 0, acked_ = 0, naked_ = 0, dead_lettered_ = 0, lost_ = 0;
};

}  // namespace evmesh::detail
