// A channel plugin for the runtime's unit tests: the event's payload scripts the outcome.
//   "ok"                  delivered
//   "retry"               retry per policy, every time
//   "retry-after:MS"      retry, not before MS ms, the first time; then delivered
//   "flaky:N"             retry the first N attempts, then delivered
//   "fail"                permanent failure
//   "disable"             the endpoint is gone, the first time; then delivered
//   "sleep:MS"            sleeps MS ms, then delivered
//   "down-until:UNIX_MS"  retry (code 503) until that wall-clock time, then delivered
// It also exports evmesh_test_script_calls(id_text) and evmesh_test_script_total() so a test
// that dlopens the same file reads what the plugin saw. Built with -DEVMESH_TEST_BAD_ABI it
// announces ABI version 999 (the load must be refused).

#include <evmesh/channel.h>

#include <chrono>
#include <cstdio>
#include <cstring>
#include <map>
#include <mutex>
#include <string>
#include <thread>

namespace {

std::mutex g_mu;
std::map<std::string, int> g_calls;  // by event id text
int g_total = 0;

struct instance {
    std::string name;
};

evmesh_channel* create(const evmesh_host* host, char* err, std::size_t err_len) {
    if (std::strstr(host->settings_json, "\"refuse\"") != nullptr) {
        std::snprintf(err, err_len, "script: settings.refuse is set");
        return nullptr;
    }
    return reinterpret_cast<evmesh_channel*>(new instance{host->instance_name});
}

evmesh_status deliver(evmesh_channel*, const evmesh_event* ev, const evmesh_attempt* at, evmesh_result* res) {
    const std::string script(static_cast<const char*>(ev->payload), ev->payload_len);
    {
        std::lock_guard lk(g_mu);
        ++g_calls[ev->id_text];
        ++g_total;
    }
    auto arg = [&](const char* prefix) { return std::stol(script.substr(std::strlen(prefix))); };
    if (script == "ok") {
        res->code = 200;
        return EVMESH_DELIVERED;
    }
    if (script == "retry") {
        res->code = 503;
        std::snprintf(res->detail, sizeof(res->detail), "scripted retry");
        return EVMESH_RETRY;
    }
    if (script.rfind("retry-after:", 0) == 0) {
        if (at->attempt == 1) {
            res->code = 429;
            res->retry_after_ms = arg("retry-after:");
            return EVMESH_RETRY;
        }
        return EVMESH_DELIVERED;
    }
    if (script.rfind("flaky:", 0) == 0) {
        return static_cast<long>(at->attempt) <= arg("flaky:") ? EVMESH_RETRY : EVMESH_DELIVERED;
    }
    if (script == "fail") {
        res->code = 400;
        std::snprintf(res->detail, sizeof(res->detail), "scripted failure");
        return EVMESH_FAIL;
    }
    if (script == "disable") {
        if (at->attempt == 1) {
            res->code = 410;
            return EVMESH_DISABLE;
        }
        return EVMESH_DELIVERED;
    }
    if (script.rfind("down-until:", 0) == 0) {
        const auto now = std::chrono::duration_cast<std::chrono::milliseconds>(
                             std::chrono::system_clock::now().time_since_epoch()).count();
        if (now < std::stoll(script.substr(11))) {
            res->code = 503;
            return EVMESH_RETRY;
        }
        return EVMESH_DELIVERED;
    }
    if (script.rfind("sleep:", 0) == 0) {
        std::this_thread::sleep_for(std::chrono::milliseconds(arg("sleep:")));
        return EVMESH_DELIVERED;
    }
    std::snprintf(res->detail, sizeof(res->detail), "unknown script");
    return EVMESH_FAIL;
}

void destroy(evmesh_channel* ch) { delete reinterpret_cast<instance*>(ch); }

#ifdef EVMESH_TEST_BAD_ABI
constexpr std::uint32_t abi = 999;
#else
constexpr std::uint32_t abi = EVMESH_CHANNEL_ABI_VERSION;
#endif

const evmesh_channel_plugin plugin = {abi, sizeof(evmesh_channel_plugin), "script", "test plugin", create, deliver,
                                      destroy};

}  // namespace

extern "C" EVMESH_CHANNEL_EXPORT const evmesh_channel_plugin* evmesh_channel_plugin_v1(void) { return &plugin; }

extern "C" EVMESH_CHANNEL_EXPORT int evmesh_test_script_calls(const char* id_text) {
    std::lock_guard lk(g_mu);
    auto it = g_calls.find(id_text);
    return it == g_calls.end() ? 0 : it->second;
}

extern "C" EVMESH_CHANNEL_EXPORT int evmesh_test_script_total(void) {
    std::lock_guard lk(g_mu);
    return g_total;
}
