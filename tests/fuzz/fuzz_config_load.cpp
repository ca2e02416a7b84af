// Fuzz target: the evmesh-node config loader (TOML text -> validated settings).
#include <cstddef>
#include <cstdint>
#include <string>
#include <string_view>

#include "config.hpp"

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
    auto cfg = evmesh::app::default_config();
    std::string error;
    const std::string_view text(reinterpret_cast<const char*>(data), size);
    if (evmesh::app::load_toml_text(text, "fuzz.toml", cfg, error)) {
        (void)evmesh::app::validate(cfg, error);
    } else if (error.empty()) {
        __builtin_trap();  // a refusal always says why
    }
    return 0;
}
