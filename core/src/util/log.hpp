// The library's logger: spdlog logger "evmesh", on stderr unless the application registered its
// own under that name first (evmesh-node does). A library never writes to stdout.
#pragma once

#include <memory>

#include <spdlog/sinks/stdout_color_sinks.h>
#include <spdlog/spdlog.h>

namespace evmesh::detail {

inline std::shared_ptr<spdlog::logger> log() {
    auto l = spdlog::get("evmesh");
    if (!l) {
        try {
            l = spdlog::stderr_color_mt("evmesh");
        } catch (const spdlog::spdlog_ex&) {
            l = spdlog::get("evmesh");  // another thread created it first
        }
    }
    return l;
}

}  // namespace evmesh::detail
