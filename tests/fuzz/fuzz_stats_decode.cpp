// Fuzz target: the stats decoder of mesh-inspector (msgpack of any shape -> JSON, bounded).
#include <cstddef>
#include <cstdint>
#include <exception>
#include <string_view>

#include "inspector.hpp"

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
    try {
        const auto j = evmesh::inspector::msgpack_to_json(
            std::string_view(reinterpret_cast<const char*>(data), size));
        (void)evmesh::inspector::histogram_percentile(j.is_object() ? j.value("latency_us", j) : j, 0.99);
        (void)j.dump(-1, ' ', false, nlohmann::json::error_handler_t::replace);
    } catch (const std::exception&) {
        // refused input: a clear error, nothing else
    }
    return 0;
}
