// libcurl pieces shared by the plugins that use it (webhook, email): an owning header list and
// the one-time global initialisation.
#pragma once

#include <curl/curl.h>

#include <memory>
#include <mutex>
#include <new>
#include <string>

namespace evmesh::channels {

struct curl_slist_deleter {
    void operator()(curl_slist* l) const noexcept { curl_slist_free_all(l); }
};
using slist_ptr = std::unique_ptr<curl_slist, curl_slist_deleter>;

// Appends one line (a header, a recipient) to `list`; throws std::bad_alloc on failure.
inline void append(slist_ptr& list, const std::string& line) {
    curl_slist* n = curl_slist_append(list.get(), line.c_str());
    if (!n) throw std::bad_alloc();
    (void)list.release();
    list.reset(n);
}

// Once per plugin: the node may also call curl_global_init; the call is reference-counted and,
// with libcurl >= 7.84 on this platform, thread-safe. Never cleaned up (the plugin may be unloaded
// while other users of libcurl remain).
inline void curl_init_once() {
    static std::once_flag once;
    std::call_once(once, [] { curl_global_init(CURL_GLOBAL_DEFAULT); });
}

}  // namespace evmesh::channels
