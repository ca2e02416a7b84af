// Test helpers: wait on a condition with a deadline instead of sleeping.
#pragma once

#include <chrono>
#include <cstdint>
#include <string>
#include <thread>
#include <unistd.h>

namespace evmesh::test {

template <class Pred>
bool wait_until(Pred&& pred, std::chrono::milliseconds timeout = std::chrono::seconds(5)) {
    const auto deadline = std::chrono::steady_clock::now() + timeout;
    while (std::chrono::steady_clock::now() < deadline) {
        if (pred()) {
            return true;
        }
        std::this_thread::sleep_for(std::chrono::milliseconds(2));
    }
    return pred();
}

// A mesh name and beacon port unique to this test process, so parallel tests stay apart.
inline std::string unique_mesh(const std::string& base) {
    return base + "-" + std::to_string(getpid()) + "-"
           + std::to_string(std::chrono::steady_clock::now().time_since_epoch().count() % 100000);
}

inline std::uint16_t unique_port() {
    return static_cast<std::uint16_t>(21000 + (getpid() % 20000));
}

}  // namespace evmesh::test
