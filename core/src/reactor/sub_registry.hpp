// Counters of embedded subscriptions, shared with their node so its stats can report subscriber
// gaps (the node cannot see what a slow subscriber lost; the subscriber can, from sequences).
#pragma once

#include <atomic>
#include <cstdint>
#include <map>
#include <string_view>
#include <memory>
#include <mutex>
#include <string>
#include <vector>

namespace evmesh::detail {

// Single-writer counter readable from any thread: a relaxed load+store, no locked RMW.
struct counter {
    std::atomic<std::uint64_t> v{0};

    void add(std::uint64_t n = 1) noexcept {
        v.store(v.load(std::memory_order_relaxed) + n, std::memory_order_relaxed);
    }

    std::uint64_t get() const noexcept { return v.load(std::memory_order_relaxed); }
};

struct sub_counters {
    std::string pattern;
    counter received, filtered, gaps, out_of_order, decode_errors, callback_errors;
    std::atomic<bool> closed{false};
    // gaps per topic, updated only when a gap is seen (rare); bounded to 64 topics + "(other)"
    std::mutex gaps_mu;
    std::map<std::string, std::uint64_t> gaps_by_topic;  // guarded by gaps_mu

    void gap_on(std::string_view topic, std::uint64_t n) {
        std::lock_guard lock(gaps_mu);
        auto it = gaps_by_topic.find(std::string(topic));
        if (it == gaps_by_topic.end()) {
            it = gaps_by_topic.emplace(gaps_by_topic.size() < 64 ? std::string(topic) : "(other)", 0).first;
        }
        it->second += n;
    }
};

// Guarded by its own mutex: subscriptions register from user threads, the I/O thread reads.
struct sub_registry {
    std::mutex mu;
    std::vector<std::shared_ptr<sub_counters>> live;  // guarded by mu
    std::uint64_t retired_received = 0, retired_gaps = 0;  // guarded by mu

    void add(std::shared_ptr<sub_counters> c) {
        std::lock_guard lock(mu);
        live.push_back(std::move(c));
    }
};

}  // namespace evmesh::detail
