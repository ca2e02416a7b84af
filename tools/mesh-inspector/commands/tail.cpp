#include <atomic>
#include <csignal>
#include <cstdio>
#include <thread>

#include "commands.hpp"

namespace evmesh::inspector {

namespace {
std::atomic<bool> g_interrupted{false};
}  // namespace

int run_tail(const mesh_options& o, const std::string& pattern, int count, double timeout_s) {
    auto pat = topic_pattern::parse(pattern);
    if (!pat) {
        std::fprintf(stderr, "mesh-inspector: invalid pattern '%s'\n", pattern.c_str());
        return exit_usage;
    }
    auto self = join_mesh(o);
    if (!self) {
        return exit_usage;
    }
    std::signal(SIGINT, [](int) { g_interrupted = true; });
    std::atomic<int> got{0};
    std::mutex out_mu;
    auto sub = self->subscribe(pattern, [&](const event_view& ev) {
        const auto j = event_to_json(ev);
        std::lock_guard lock(out_mu);
        if (count > 0 && got >= count) {
            return;
        }
        if (o.json) {
            std::printf("%s\n", j.dump().c_str());
        } else {
            const auto payload = j.contains("payload") ? (j["payload"].is_string() ? j["payload"].get<std::string>()
                                                                                   : j["payload"].dump())
                                                       : "hex:" + j.value("payload_hex", "");
            std::printf("%s seq=%llu from %s [%s] %s %s\n", j.value("topic", "").c_str(),
                        static_cast<unsigned long long>(j.value("seq", 0ULL)), j.value("source", "").c_str(),
                        j.value("content_type", "").c_str(),
                        j["headers"].empty() ? "" : j["headers"].dump().c_str(), payload.c_str());
        }
        std::fflush(stdout);
        ++got;
    });
    if (!sub) {
        return exit_usage;
    }
    std::fprintf(stderr, "tailing '%s' in mesh '%s'%s\n", pattern.c_str(), o.mesh.c_str(),
                 count > 0 ? (" for " + std::to_string(count) + " events").c_str() : "");
    const auto deadline = std::chrono::steady_clock::now()
                          + std::chrono::milliseconds(static_cast<std::int64_t>(timeout_s * 1000));
    while (!g_interrupted && (count <= 0 || got < count)
           && (timeout_s <= 0 || std::chrono::steady_clock::now() < deadline)) {
        std::this_thread::sleep_for(std::chrono::milliseconds(10));
    }
    sub->close();
    return count > 0 && got < count ? exit_not_found : exit_ok;
}

}  // namespace evmesh::inspector
