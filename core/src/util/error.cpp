#include <evmesh/error.hpp>

namespace evmesh {
namespace {

class category_impl final : public std::error_category {
public:
    const char* name() const noexcept override { return "evmesh"; }

    std::string message(int c) const override {
        switch (static_cast<errc>(c)) {
            case errc::ok: return "ok";
            case errc::truncated: return "truncated input";
            case errc::too_large: return "input exceeds a size limit";
            case errc::not_an_event: return "not an evmesh event envelope";
            case errc::unsupported_version: return "unsupported envelope version";
            case errc::wrong_type: return "element has the wrong type";
            case errc::bad_id: return "event id is not 16 bytes";
            case errc::bad_topic: return "invalid topic";
            case errc::topic_mismatch: return "topic mismatch";
            case errc::trailing_bytes: return "trailing bytes after the envelope";
            case errc::missing_field: return "required field is nil";
            case errc::bad_beacon: return "invalid discovery beacon";
            case errc::bad_framing: return "not a [topic][body] message of two frames";
            case errc::bad_pattern: return "invalid subscription pattern";
            case errc::bad_option: return "invalid option";
            case errc::bad_endpoint: return "endpoint cannot be bound or connected";
            case errc::would_block: return "would block (high-water mark reached)";
            case errc::stopped: return "node is stopped";
            case errc::io_error: return "I/O error";
        }
        return "unknown evmesh error";
    }
};

}  // namespace

const char* to_string(errc e) noexcept {
    switch (e) {
        case errc::ok: return "ok";
        case errc::truncated: return "truncated";
        case errc::too_large: return "too_large";
        case errc::not_an_event: return "not_an_event";
        case errc::unsupported_version: return "unsupported_version";
        case errc::wrong_type: return "wrong_type";
        case errc::bad_id: return "bad_id";
        case errc::bad_topic: return "bad_topic";
        case errc::topic_mismatch: return "topic_mismatch";
        case errc::trailing_bytes: return "trailing_bytes";
        case errc::missing_field: return "missing_field";
        case errc::bad_beacon: return "bad_beacon";
        case errc::bad_framing: return "bad_framing";
        case errc::bad_pattern: return "bad_pattern";
        case errc::bad_option: return "bad_option";
        case errc::bad_endpoint: return "bad_endpoint";
        case errc::would_block: return "would_block";
        case errc::stopped: return "stopped";
        case errc::io_error: return "io_error";
    }
    return "unknown";
}

namespace {
thread_local std::string last_error;
}  // namespace

const std::string& last_error_message() noexcept {
    return last_error;
}

void detail::set_last_error_message(std::string text) {
    last_error = std::move(text);
}

const std::error_category& category() noexcept {
    static const category_impl instance;
    return instance;
}

}  // namespace evmesh
