/// @file topic.hpp
/// Subscription patterns over dot-separated topics: exact, `*` (one segment), `>` (the rest).
/// Thread-safety: `topic_pattern` is immutable after parse; safe to share between threads.
#pragma once

#include <evmesh/export.hpp>

#include <string>
#include <string_view>
#include <vector>

#include <evmesh/error.hpp>

namespace evmesh {

/// A parsed pattern. `orders.created` matches only itself; `orders.*.created` matches
/// `orders.eu.created`; `orders.>` matches `orders.eu` and `orders.eu.created` (one or more
/// segments); `>` matches every topic except the reserved `_evmesh.` ones (stats, ping), which
/// only patterns starting with the literal segment `_evmesh` match.
class EVMESH_API topic_pattern {
public:
    /// Parses `text`. Errors: bad_pattern (empty segment, `>` not last, `*`/`>` inside a segment).
    [[nodiscard]] static result<topic_pattern> parse(std::string_view text);

    /// True when `topic` matches the pattern.
    bool matches(std::string_view topic) const noexcept;

    /// The longest literal prefix, used as the ZeroMQ subscription (may be empty).
    const std::string& zmq_prefix() const noexcept { return prefix_; }

    /// True when the pattern has no wildcard.
    bool exact() const noexcept { return exact_; }

    /// True when every topic starting with `zmq_prefix()` matches (no local check needed).
    bool prefix_only() const noexcept { return prefix_only_; }

    const std::string& text() const noexcept { return text_; }

private:
    std::string text_;
    std::string prefix_;
    std::vector<std::string> segments_;
    bool exact_ = false;
    bool prefix_only_ = false;
    bool system_ = false;  // names `_evmesh` literally, so may match reserved topics
};

}  // namespace evmesh
