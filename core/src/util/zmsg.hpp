// A zmq_msg_t with value semantics: move, and `share` (libzmq reference-counts large messages,
// so sharing a frame with the history or a second socket copies no payload).
#pragma once

#include <zmq.h>

#include <cstring>
#include <string_view>

#if defined(__SANITIZE_THREAD__)
#include <sanitizer/tsan_interface.h>
#endif

namespace evmesh::detail {

// ThreadSanitizer cannot see the hand-over inside libzmq's pipes (Debian's libzmq is not
// instrumented): bytes this process writes into a message and another thread reads look like a
// race. The writer releases the buffer after filling it, the reader acquires it before reading,
// which is exactly the ordering libzmq provides. No-ops in other builds.
inline void tsan_release(const void* p) noexcept {
#if defined(__SANITIZE_THREAD__)
    __tsan_release(const_cast<void*>(p));
#else
    (void)p;
#endif
}

inline void tsan_acquire(const void* p) noexcept {
#if defined(__SANITIZE_THREAD__)
    __tsan_acquire(const_cast<void*>(p));
#else
    (void)p;
#endif
}

class zmsg {
public:
    zmsg() noexcept { zmq_msg_init(&m_); }
    explicit zmsg(std::string_view data) {
        zmq_msg_init_size(&m_, data.size());
        if (!data.empty()) {
            std::memcpy(zmq_msg_data(&m_), data.data(), data.size());
            tsan_release(zmq_msg_data(&m_));
        }
    }
    ~zmsg() { zmq_msg_close(&m_); }
    zmsg(zmsg&& o) noexcept {
        zmq_msg_init(&m_);
        zmq_msg_move(&m_, &o.m_);
    }
    zmsg& operator=(zmsg&& o) noexcept {
        if (this != &o) {
            zmq_msg_move(&m_, &o.m_);
        }
        return *this;
    }
    zmsg(const zmsg&) = delete;
    zmsg& operator=(const zmsg&) = delete;

    // A second handle on the same bytes (a reference count for large messages).
    zmsg share() {
        zmsg out;
        zmq_msg_copy(&out.m_, &m_);
        return out;
    }

    // A message holding bytes [off, off + len) of `owner`: copied when small, else a zero-copy
    // view that keeps a share of `owner` alive until libzmq releases it.
    static zmsg slice(zmsg& owner, std::size_t off, std::size_t len) {
        const auto* base = static_cast<const char*>(zmq_msg_data(&owner.m_));
        if (len < 2048) {
            return zmsg(std::string_view(base + off, len));
        }
        auto* keep = new zmsg(owner.share());
        zmsg out;
        zmq_msg_close(&out.m_);
        zmq_msg_init_data(&out.m_, const_cast<char*>(base) + off, len,
                          [](void*, void* hint) { delete static_cast<zmsg*>(hint); }, keep);
        return out;
    }

    zmq_msg_t* get() noexcept { return &m_; }
    std::string_view view() noexcept {
        return {static_cast<const char*>(zmq_msg_data(&m_)), zmq_msg_size(&m_)};
    }
    std::size_t size() noexcept { return zmq_msg_size(&m_); }

private:
    zmq_msg_t m_;
};

}  // namespace evmesh::detail
