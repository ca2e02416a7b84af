// The channel runtime (docs/CHANNELS.md): intake from subscriptions, the SQLite outbox, the
// scheduler and one worker pool per channel instance.
//
// Threads and ownership:
//   - subscription dispatcher threads (one per pattern) encode matching events and queue them
//     for intake; they block when the intake queue is full (backpressure to the node's policy);
//   - the store thread owns the only database connection: it inserts accepted events, applies
//     the outcome of attempts, loads due deliveries into each channel's ready queue and runs
//     admin commands, each batch in one transaction;
//   - each channel has `concurrency` workers that take from its ready queue and call the plugin,
//     so a slow or dead endpoint only ever occupies its own workers.
// A delivery row is "claimed" while it sits in a ready queue or in flight; rows still claimed at
// start-up were cut off by a crash, are counted as `recovered` and delivered again.

#include <evmesh/channel.h>
#include <evmesh/channels.hpp>
#include <evmesh/codec.hpp>
#include <evmesh/node.hpp>

#include <dlfcn.h>
#include <fcntl.h>
#include <sys/file.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <climits>
#include <condition_variable>
#include <cstring>
#include <deque>
#include <filesystem>
#include <functional>
#include <future>
#include <map>
#include <mutex>
#include <random>
#include <regex>
#include <thread>
#include <unordered_set>

#include <msgpack.hpp>

#include "channels/sqlite.hpp"
#include "util/log.hpp"

namespace evmesh::channels {

using namespace std::chrono_literals;
using detail::database;
using detail::sqlite_error;
using detail::statement;
using detail::transaction;

std::vector<milliseconds> standard_webhooks_schedule() {
    using std::chrono::hours;
    using std::chrono::minutes;
    using std::chrono::seconds;
    return {0ms, seconds(5), minutes(5), minutes(30), hours(2), hours(5), hours(10), hours(14), hours(20), hours(24)};
}

std::vector<milliseconds> exponential_schedule(milliseconds initial, double factor, milliseconds max_delay,
                                               int attempts) {
    std::vector<milliseconds> s;
    if (attempts <= 0) {
        return s;
    }
    s.push_back(0ms);
    double d = static_cast<double>(initial.count());
    for (int i = 1; i < attempts; ++i) {
        s.push_back(milliseconds(static_cast<std::int64_t>(std::min(d, static_cast<double>(max_delay.count())))));
        d *= factor;
    }
    return s;
}

std::vector<std::string> default_plugin_dirs() {
    std::vector<std::string> dirs;
    std::error_code ec;
    const auto exe = std::filesystem::read_symlink("/proc/self/exe", ec);
    if (!ec) {
        const auto bin = exe.parent_path();
        dirs.push_back((bin.parent_path() / "channels").string());
        dirs.push_back((bin.parent_path() / "lib" / "evmesh" / "channels").string());
#ifdef EVMESH_PLUGIN_RELDIR
        dirs.push_back((bin.parent_path() / EVMESH_PLUGIN_RELDIR).string());  // e.g. lib/x86_64-linux-gnu/...
#endif
    }
    return dirs;
}

namespace {

std::int64_t wall_ms() {
    return std::chrono::duration_cast<milliseconds>(std::chrono::system_clock::now().time_since_epoch()).count();
}

std::int64_t steady_us() {
    return std::chrono::duration_cast<std::chrono::microseconds>(
               std::chrono::steady_clock::now().time_since_epoch())
        .count();
}

const char* status_name(int s) {
    switch (s) {
    case EVMESH_DELIVERED: return "delivered";
    case EVMESH_RETRY: return "retry";
    case EVMESH_FAIL: return "failed";
    case EVMESH_DISABLE: return "disabled";
    default: return "invalid";
    }
}

std::string id_text(std::string_view blob) {
    event_id id{};
    if (blob.size() == id.size()) {
        std::memcpy(id.data(), blob.data(), id.size());
    }
    return to_string(id);
}

// A loaded plugin library (shared by the instances that use it).
struct plugin_lib {
    void* handle = nullptr;
    const evmesh_channel_plugin* api = nullptr;
    std::string path;
    ~plugin_lib() {
        if (handle != nullptr) {
            dlclose(handle);
        }
    }
};

struct work_item {
    std::int64_t row = 0;
    std::string event_id;  // 16 bytes
    std::string topic;
    std::string body;
    std::uint32_t attempt = 1;  // the attempt this item is for
    std::int64_t accepted_ms = 0;
    bool probe = false;         // the breaker's probe: attempted even while paused
};

struct intake_item {
    std::size_t channel = 0;
    event_id id{};
    std::string topic;
    std::string body;
    std::int64_t accepted_ms = 0;
};

struct completion {
    std::size_t channel = 0;
    std::int64_t row = 0;
    std::string event_id;
    std::string topic;
    std::uint32_t attempt = 0;
    std::int64_t accepted_ms = 0;
    bool released = false;  // not attempted (channel disabled or stopping): unclaim only
    int status = EVMESH_RETRY;
    std::int32_t code = 0;
    std::int64_t retry_after_ms = -1;
    std::string detail;
    std::int64_t latency_us = 0;
    std::int64_t end_ms = 0;
};

void observe(std::array<std::atomic<std::uint64_t>, channel_latency_bounds_us.size() + 1>& h, std::uint64_t us) {
    std::size_t i = 0;
    while (i < channel_latency_bounds_us.size() && us > channel_latency_bounds_us[i]) {
        ++i;
    }
    h[i].fetch_add(1, std::memory_order_relaxed);
}

struct channel_counters {
    std::atomic<std::uint64_t> accepted{0}, duplicates{0}, attempts{0}, delivered{0}, retried{0}, failed{0},
        dead_lettered{0}, replayed{0}, recovered{0}, pending{0}, in_flight{0}, dead{0}, lost{0};
    std::atomic<std::uint64_t> attempt_latency_sum_us{0}, attempt_latency_max_us{0}, delivery_latency_sum_us{0};
    std::array<std::atomic<std::uint64_t>, channel_latency_bounds_us.size() + 1> attempt_latency{}, delivery_latency{};
    std::atomic<std::int64_t> oldest_pending_ms{0};  // 0 = none
    std::atomic<std::uint64_t> breaker_trips{0}, paused{0};
};

}  // namespace

struct channel_runtime::impl {
    struct channel {
        channel_config cfg;
        std::shared_ptr<plugin_lib> lib;
        evmesh_channel* instance = nullptr;
        std::size_t index = 0;
        std::size_t ready_cap = 16;
        std::vector<subscription> subs;
        std::vector<topic_pattern> patterns;  // cfg.topics, parsed once (subscribe)
        channel_counters c;
        std::atomic<bool> disabled{false};
        std::atomic<bool> hold{false};  // breaker open: workers give back what they take
        std::string disabled_reason;  // guarded by impl::stats_m

        // ready queue, shared with the workers
        std::mutex m;
        std::condition_variable cv;
        std::deque<work_item> ready;
        std::unordered_set<std::int64_t> in_hand;  // taken by a worker, outcome not yet applied
        bool stopping = false;
        std::vector<std::thread> workers;
        std::atomic<int> workers_running{0};

        // store thread only
        std::unordered_set<std::int64_t> known;  // rows in the ready queue or in flight
        std::size_t staged_count = 0;            // claimed in the open transaction, not yet queued
        std::uint32_t fail_streak = 0;           // breaker: consecutive "retry" outcomes
        std::int64_t paused_until_ms = 0;        // breaker: 0 = closed
        std::int64_t pause_ms = 0;
        bool probe_out = false;                  // breaker: the one probe delivery is out
        bool backlog = true;                     // due rows may be in the database only
        std::int64_t next_due_ms = 0;            // earliest scheduled retry not yet loaded
    };

    node* n;  // null while only checking a configuration
    runtime_options opts;
    std::vector<std::unique_ptr<channel>> channels;
    std::map<std::string, std::size_t, std::less<>> by_name;

    database db;
    std::mutex m;  // intake, completions, commands
    std::condition_variable cv;        // wakes the store thread
    std::condition_variable space_cv;  // wakes intake producers
    std::deque<intake_item> intake;
    std::deque<completion> completions;
    std::deque<std::function<void()>> commands;
    bool stopping = false;
    bool store_done = false;
    std::thread store;
    mutable std::mutex stats_m;
    std::mt19937_64 rng{std::random_device{}()};
    bool stopped = false;
    std::atomic<bool> failed{false};    // the outbox failed for good (corruption): see healthy()
    std::atomic<bool> degraded{false};  // writes fail for now (disk full, locked): retried
    std::string outbox_err;             // why, guarded by stats_m
    bool resync_claims = true;          // store thread: reconcile claimed rows in the next write
    std::mutex stop_m;                // one shutdown at a time
    bool leak = false;  // a worker outlived stop(): keep everything it may touch alive

    static constexpr std::size_t intake_cap = 65536;

    impl(node* nn, runtime_options o) : n(nn), opts(std::move(o)) {}
    ~impl() {
        if (lock_fd >= 0) {
            ::close(lock_fd);
        }
    }
    impl(const impl&) = delete;
    impl& operator=(const impl&) = delete;

    // One node per outbox: an exclusive flock on `<outbox>.lock` (holding the owner's pid), held
    // for the runtime's life and released by the kernel however the process ends. SQLite's own
    // locks would let two nodes interleave their writes and deliver every event twice.
    int lock_fd = -1;

    bool lock_outbox(std::string& error) {
        std::error_code ec;
        const auto parent = std::filesystem::path(opts.outbox_path).parent_path();
        if (!parent.empty()) {
            std::filesystem::create_directories(parent, ec);
        }
        const auto path = opts.outbox_path + ".lock";
        lock_fd = ::open(path.c_str(), O_RDWR | O_CREAT | O_CLOEXEC, 0644);
        if (lock_fd < 0) {
            error = "cannot open the outbox lock " + path + ": " + std::strerror(errno);
            return false;
        }
        if (::flock(lock_fd, LOCK_EX | LOCK_NB) != 0) {
            char buf[32] = {0};
            const auto n_read = ::pread(lock_fd, buf, sizeof(buf) - 1, 0);
            std::string owner(buf, static_cast<std::size_t>(std::max<ssize_t>(0, n_read)));
            while (!owner.empty() && (owner.back() == '\n' || owner.back() == ' ')) {
                owner.pop_back();
            }
            error = "outbox " + opts.outbox_path + " is in use by another process" +
                    (owner.empty() ? std::string() : " (pid " + owner + ")") + "; one node per outbox (lock " + path + ")";
            ::close(lock_fd);
            lock_fd = -1;
            return false;
        }
        const auto pid = std::to_string(::getpid()) + "\n";
        if (::ftruncate(lock_fd, 0) != 0 || ::pwrite(lock_fd, pid.data(), pid.size(), 0) < 0) {
            // the pid is only a hint for the message above (a full disk must not stop the start)
        }
        return true;
    }

    // ---------------------------------------------------------------- setup

    static std::string find_plugin(const runtime_options& o, const std::string& plugin) {
        if (plugin.find('/') != std::string::npos) {
            return plugin;
        }
        std::vector<std::string> dirs = o.plugin_dirs;
        if (const char* env = std::getenv("EVMESH_CHANNEL_PATH")) {
            std::string s(env);
            std::size_t pos = 0;
            while (pos <= s.size()) {
                const auto end = std::min(s.find(':', pos), s.size());
                if (end > pos) {
                    dirs.push_back(s.substr(pos, end - pos));
                }
                pos = end + 1;
            }
        }
        for (auto& d : default_plugin_dirs()) {
            dirs.push_back(d);
        }
        for (const auto& d : dirs) {
            const auto p = std::filesystem::path(d) / ("evmesh_channel_" + plugin + ".so");
            std::error_code ec;
            if (std::filesystem::exists(p, ec)) {
                return p.string();
            }
        }
        return {};
    }

    static std::shared_ptr<plugin_lib> load_plugin(const std::string& path, std::string& error) {
        auto lib = std::make_shared<plugin_lib>();
        lib->path = path;
        lib->handle = dlopen(path.c_str(), RTLD_NOW | RTLD_LOCAL);
        if (lib->handle == nullptr) {
            const char* e = dlerror();
            error = "cannot load " + path + ": " + (e != nullptr ? e : "dlopen failed");
            return nullptr;
        }
        auto* sym = dlsym(lib->handle, EVMESH_CHANNEL_ENTRY);
        if (sym == nullptr) {
            error = path + " is not an evmesh channel plugin (no symbol " EVMESH_CHANNEL_ENTRY ")";
            return nullptr;
        }
        evmesh_channel_entry_fn entry = nullptr;
        static_assert(sizeof(entry) == sizeof(sym));
        std::memcpy(&entry, &sym, sizeof(entry));
        lib->api = entry();
        if (lib->api == nullptr) {
            error = path + ": " EVMESH_CHANNEL_ENTRY " returned null";
            return nullptr;
        }
        if (lib->api->abi_version != EVMESH_CHANNEL_ABI_VERSION) {
            error = path + ": plugin ABI version " + std::to_string(lib->api->abi_version) + ", this node speaks " +
                    std::to_string(EVMESH_CHANNEL_ABI_VERSION);
            return nullptr;
        }
        if (lib->api->struct_size < sizeof(evmesh_channel_plugin) || lib->api->create == nullptr ||
            lib->api->deliver == nullptr || lib->api->destroy == nullptr) {
            error = path + ": incomplete plugin table";
            return nullptr;
        }
        return lib;
    }

    static void host_log(void* ctx, int level, const char* message) {
        const auto* ch = static_cast<const channel*>(ctx);
        const auto lvl = level >= EVMESH_LOG_ERROR ? spdlog::level::err
                         : level == EVMESH_LOG_WARN ? spdlog::level::warn
                         : level == EVMESH_LOG_INFO ? spdlog::level::info
                                                    : spdlog::level::debug;
        evmesh::detail::log()->log(lvl, "channel {}: {}", ch->cfg.name, message != nullptr ? message : "");
    }

    bool validate(std::string& error) {
        static const std::regex name_re("[A-Za-z0-9_.-]{1,64}");
        if (opts.outbox_path.empty()) {
            error = "channels: outbox path is required";
            return false;
        }
        std::map<std::string, int> seen;
        for (const auto& c : opts.channels) {
            const std::string where = "channel '" + c.name + "': ";
            if (!std::regex_match(c.name, name_re)) {
                error = "channel name '" + c.name + "' must be 1..64 of [A-Za-z0-9_.-]";
                return false;
            }
            if (seen[c.name]++ > 0) {
                error = where + "name is used twice";
                return false;
            }
            if (c.plugin.empty()) {
                error = where + "plugin is required";
                return false;
            }
            if (c.topics.empty()) {
                error = where + "topics must name at least one pattern";
                return false;
            }
            for (const auto& t : c.topics) {
                if (!topic_pattern::parse(t)) {
                    error = where + "bad topic pattern '" + t + "'";
                    return false;
                }
            }
            if (c.concurrency < 1 || c.concurrency > 256) {
                error = where + "concurrency must be between 1 and 256";
                return false;
            }
            if (c.retry.schedule.empty() || c.retry.schedule.size() > 100) {
                error = where + "retry schedule must have 1..100 entries";
                return false;
            }
            for (auto d : c.retry.schedule) {
                if (d.count() < 0) {
                    error = where + "retry delays must not be negative";
                    return false;
                }
            }
            if (c.breaker.failures > 0 && (c.breaker.pause.count() <= 0 || c.breaker.max_pause < c.breaker.pause)) {
                error = where + "breaker pause must be > 0 and max_pause >= pause";
                return false;
            }
            if (c.retry.jitter < 0 || c.retry.jitter > 1) {
                error = where + "retry jitter must be between 0 and 1";
                return false;
            }
        }
        return true;
    }

    void open_outbox() {
        std::error_code ec;
        const auto parent = std::filesystem::path(opts.outbox_path).parent_path();
        if (!parent.empty()) {
            std::filesystem::create_directories(parent, ec);
        }
        db.open(opts.outbox_path);
        db.exec("PRAGMA journal_mode=WAL");
        db.exec(opts.synchronous_full ? "PRAGMA synchronous=FULL" : "PRAGMA synchronous=NORMAL");
        // Checkpoints (copying the WAL into the database file, with an fsync) run on their own
        // thread and connection (checkpoint_loop), not inside the store thread's commits.
        db.exec("PRAGMA wal_autocheckpoint=0");
        db.exec(
            "CREATE TABLE IF NOT EXISTS meta(key TEXT PRIMARY KEY, value TEXT NOT NULL);"
            "INSERT OR IGNORE INTO meta VALUES('schema', '1');"
            // state: 0 pending, 1 dead letter, 2 delivered (kept for dedupe_window; body emptied)
            "CREATE TABLE IF NOT EXISTS outbox("
            " id INTEGER PRIMARY KEY, channel TEXT NOT NULL, event_id BLOB NOT NULL, topic TEXT NOT NULL,"
            " body BLOB NOT NULL, accepted_ms INTEGER NOT NULL, state INTEGER NOT NULL DEFAULT 0,"
            " attempts INTEGER NOT NULL DEFAULT 0, next_ms INTEGER NOT NULL, claimed INTEGER NOT NULL DEFAULT 0,"
            " last_code INTEGER NOT NULL DEFAULT 0, last_detail TEXT NOT NULL DEFAULT '', dead_ms INTEGER NOT NULL DEFAULT 0,"
            " UNIQUE(channel, event_id));"
            "CREATE INDEX IF NOT EXISTS outbox_due ON outbox(channel, state, next_ms);"
            "CREATE INDEX IF NOT EXISTS outbox_pending_age ON outbox(channel, accepted_ms) WHERE state=0;"
            "CREATE TABLE IF NOT EXISTS attempts("
            " id INTEGER PRIMARY KEY, channel TEXT NOT NULL, event_id BLOB NOT NULL, topic TEXT NOT NULL,"
            " attempt INTEGER NOT NULL, time_ms INTEGER NOT NULL, latency_us INTEGER NOT NULL,"
            " outcome TEXT NOT NULL, code INTEGER NOT NULL, detail TEXT NOT NULL);"
            "CREATE INDEX IF NOT EXISTS attempts_channel ON attempts(channel, id);"
            "CREATE TABLE IF NOT EXISTS channel_state("
            " name TEXT PRIMARY KEY, disabled INTEGER NOT NULL, reason TEXT NOT NULL, since_ms INTEGER NOT NULL);");
        {
            statement s(db, "SELECT value FROM meta WHERE key='schema'");
            if (!s.step() || s.text(0) != "1") {
                throw sqlite_error("outbox " + opts.outbox_path + " has an unknown schema version");
            }
        }
        // Gauges and crash recovery.
        statement counts(db, "SELECT state, COUNT(*), SUM(claimed), MIN(accepted_ms) FROM outbox WHERE channel=? GROUP BY state");
        statement st(db, "SELECT disabled, reason FROM channel_state WHERE name=?");
        for (auto& ch : channels) {
            counts.bind(1, ch->cfg.name);
            while (counts.step()) {
                const auto state = counts.i64(0);
                const auto n_rows = static_cast<std::uint64_t>(counts.i64(1));
                if (state == 0) {
                    ch->c.pending = n_rows;
                    ch->c.recovered = static_cast<std::uint64_t>(counts.i64(2));
                    ch->c.oldest_pending_ms = counts.i64(3);
                } else if (state == 1) {
                    ch->c.dead = n_rows;
                }
            }
            counts.reset();
            st.bind(1, ch->cfg.name);
            if (st.step() && st.i64(0) != 0) {
                ch->disabled = true;
                ch->disabled_reason = std::string(st.text(1));
            }
            st.reset();
            if (ch->c.recovered > 0) {
                evmesh::detail::log()->warn(
                    "channel {}: {} deliveries were claimed when the node stopped without a drain; delivering them "
                    "again (receivers may see them twice; the webhook-id / event id deduplicates)",
                    ch->cfg.name, ch->c.recovered.load());
            }
            if (ch->disabled) {
                evmesh::detail::log()->warn("channel {}: disabled ({}); {} events held in the outbox", ch->cfg.name,
                                            ch->disabled_reason, ch->c.pending.load());
            }
        }
        // Rows still claimed by the previous run are unclaimed by the store's first transaction
        // (unclaim_unknown), which retries on a full disk instead of failing the start.
    }

    bool create_instances(std::string& error) {
        std::map<std::string, std::shared_ptr<plugin_lib>> libs;
        for (std::size_t i = 0; i < opts.channels.size(); ++i) {
            auto ch = std::make_unique<channel>();
            ch->cfg = opts.channels[i];
            ch->index = i;
            ch->ready_cap = std::max<std::size_t>(16, 4 * static_cast<std::size_t>(ch->cfg.concurrency));
            const auto path = find_plugin(opts, ch->cfg.plugin);
            if (path.empty()) {
                error = "channel '" + ch->cfg.name + "': plugin '" + ch->cfg.plugin +
                        "' not found (looked for evmesh_channel_" + ch->cfg.plugin +
                        ".so in the plugin dirs, $EVMESH_CHANNEL_PATH and next to the executable)";
                return false;
            }
            auto& lib = libs[path];
            if (!lib) {
                std::string e;
                lib = load_plugin(path, e);
                if (!lib) {
                    error = "channel '" + ch->cfg.name + "': " + e;
                    return false;
                }
            }
            ch->lib = lib;
            evmesh_host host{};
            host.struct_size = sizeof(host);
            host.abi_version = EVMESH_CHANNEL_ABI_VERSION;
            host.instance_name = ch->cfg.name.c_str();
            host.settings_json = ch->cfg.settings_json.c_str();
            host.log = &host_log;
            host.log_ctx = ch.get();
            char err[512] = {0};
            try {
                ch->instance = lib->api->create(&host, err, sizeof(err));
            } catch (...) {
                ch->instance = nullptr;
                std::snprintf(err, sizeof(err), "plugin threw an exception from create");
            }
            if (ch->instance == nullptr) {
                err[sizeof(err) - 1] = 0;
                error = "channel '" + ch->cfg.name + "': " + (err[0] != 0 ? err : "plugin create failed");
                return false;
            }
            by_name[ch->cfg.name] = i;
            channels.push_back(std::move(ch));
        }
        return true;
    }

    // Called on subscription dispatcher threads.
    void on_event(std::size_t ch_index, const event_view& ev) { enqueue(ch_index, ev.to_event()); }

    void enqueue(std::size_t ch_index, const event& ev) {
        intake_item item;
        item.channel = ch_index;
        item.id = ev.id;
        item.topic = ev.topic;
        encode_event_body(ev, item.body);
        item.accepted_ms = wall_ms();
        std::unique_lock lk(m);
        // Backpressure while the store keeps up; while it cannot write (degraded), the event
        // waits in memory up to hold_events and beyond that is counted lost: a producer never
        // blocks on a full disk.
        space_cv.wait(lk, [&] { return intake.size() < intake_cap || stopping || degraded.load(); });
        if (stopping) {
            if (store_done) {
                channels[ch_index]->c.lost++;  // the outbox failed: never accepted, counted
            }
            return;  // the node is stopping: not accepted
        }
        if (degraded.load() && intake.size() >= std::min(intake_cap, opts.hold_events)) {
            channels[ch_index]->c.lost++;
            return;
        }
        intake.push_back(std::move(item));
        if (intake.size() == 1) {
            cv.notify_one();
        }
    }

    bool subscribe(std::string& error) {
        for (auto& ch : channels) {
            for (const auto& t : ch->cfg.topics) {
                const auto idx = ch->index;
                // an event matching several patterns is taken once, by the first
                auto s = n->subscribe(t, [this, idx, earlier = ch->patterns](const event_view& ev) {
                    for (const auto& p : earlier) {
                        if (p.matches(ev.topic)) {
                            return;  // the subscription of that earlier pattern takes it
                        }
                    }
                    on_event(idx, ev);
                });
                ch->patterns.push_back(*topic_pattern::parse(t));
                if (!s) {
                    error = "channel '" + ch->cfg.name + "': cannot subscribe to '" + t + "': " + s.error().message();
                    return false;
                }
                ch->subs.push_back(std::move(*s));
            }
        }
        return true;
    }

    // Copies the WAL into the database every 200 ms without blocking the writer (PASSIVE), so
    // the store thread's commits never pay for a checkpoint's fsync.
    std::thread checkpointer;
    std::mutex ck_m;
    std::condition_variable ck_cv;
    bool ck_stop = false;

    void checkpoint_loop() {
        database ck;
        try {
            ck.open(opts.outbox_path);
        } catch (const std::exception& e) {
            evmesh::detail::log()->error("channels: checkpoint connection: {}", e.what());
            return;
        }
        std::unique_lock lk(ck_m);
        while (!ck_cv.wait_for(lk, 200ms, [&] { return ck_stop; })) {
            lk.unlock();
            sqlite3_wal_checkpoint_v2(ck.get(), nullptr, SQLITE_CHECKPOINT_PASSIVE, nullptr, nullptr);
            lk.lock();
        }
    }

    void stop_checkpointer() {
        {
            std::lock_guard lk(ck_m);
            ck_stop = true;
        }
        ck_cv.notify_all();
        if (checkpointer.joinable()) {
            checkpointer.join();
        }
    }

    void start_threads() {
        checkpointer = std::thread([this] { checkpoint_loop(); });
        store = std::thread([this] { store_loop(); });
        for (auto& ch : channels) {
            for (int i = 0; i < ch->cfg.concurrency; ++i) {
                ch->workers_running++;
                ch->workers.emplace_back([this, c = ch.get()] { worker_loop(*c); });
            }
        }
    }

    // ---------------------------------------------------------------- workers

    void worker_loop(channel& ch) {
        std::vector<evmesh_header> headers;
        for (;;) {
            work_item item;
            {
                std::unique_lock lk(ch.m);
                ch.cv.wait(lk, [&] { return ch.stopping || !ch.ready.empty(); });
                if (ch.stopping) {
                    break;
                }
                item = std::move(ch.ready.front());
                ch.ready.pop_front();
                ch.in_hand.insert(item.row);
            }
            completion c;
            c.channel = ch.index;
            c.row = item.row;
            c.attempt = item.attempt;
            c.accepted_ms = item.accepted_ms;
            if (ch.disabled || (ch.hold && !item.probe)) {
                c.released = true;
            } else {
                ch.c.in_flight++;
                deliver(ch, item, headers, c);
                ch.c.in_flight--;
            }
            c.event_id = std::move(item.event_id);
            c.topic = std::move(item.topic);
            {
                std::lock_guard lk(m);
                completions.push_back(std::move(c));
                if (completions.size() == 1) {
                    cv.notify_one();
                }
            }
        }
        ch.workers_running--;
    }

    void deliver(channel& ch, const work_item& item, std::vector<evmesh_header>& headers, completion& c) {
        // the node's limits: what the node accepted, its channels accept
        auto decoded = n != nullptr ? decode_event(item.topic, item.body, n->limits())
                                    : decode_event(item.topic, item.body);
        if (!decoded) {
            c.status = EVMESH_FAIL;
            c.detail = "outbox row is not a valid event: " + decoded.error().message();
            c.end_ms = wall_ms();
            return;
        }
        const auto& v = *decoded;
        const std::string id_str = to_string(v.id);
        const std::string topic(v.topic), source(v.source), content_type(v.content_type);
        headers.clear();
        v.for_each_header([&](std::string_view k, std::string_view val) {
            headers.push_back(evmesh_header{k.data(), k.size(), val.data(), val.size()});
        });
        evmesh_event e{};
        e.struct_size = sizeof(e);
        std::memcpy(e.id, v.id.data(), sizeof(e.id));
        e.id_text = id_str.c_str();
        e.topic = topic.c_str();
        e.topic_len = topic.size();
        e.source = source.c_str();
        e.source_len = source.size();
        e.time_ns = v.time_ns;
        e.seq = v.seq;
        e.content_type = content_type.c_str();
        e.content_type_len = content_type.size();
        e.headers = headers.empty() ? nullptr : headers.data();
        e.header_count = headers.size();
        e.payload = v.payload.data();
        e.payload_len = v.payload.size();
        evmesh_attempt a{};
        a.struct_size = sizeof(a);
        a.attempt = item.attempt;
        a.max_attempts = static_cast<std::uint32_t>(ch.cfg.retry.schedule.size());
        a.accepted_ns = item.accepted_ms * 1000000;
        evmesh_result r{};
        r.retry_after_ms = -1;
        const auto t0 = steady_us();
        int status = EVMESH_RETRY;
        try {
            status = ch.lib->api->deliver(ch.instance, &e, &a, &r);
        } catch (...) {
            status = EVMESH_RETRY;
            std::snprintf(r.detail, sizeof(r.detail), "plugin threw an exception");
        }
        c.latency_us = steady_us() - t0;
        c.end_ms = wall_ms();
        r.detail[sizeof(r.detail) - 1] = 0;
        if (status < EVMESH_DELIVERED || status > EVMESH_DISABLE) {
            std::snprintf(r.detail, sizeof(r.detail), "plugin returned invalid status %d", status);
            status = EVMESH_RETRY;
        }
        c.status = status;
        c.code = r.code;
        c.retry_after_ms = r.retry_after_ms;
        c.detail = r.detail;
    }

    // ---------------------------------------------------------------- store thread

    struct statements {
        statement insert, claim, unclaim, done, reschedule, dead, log, due, next_due, oldest, purge, trim, set_state;
    };

    void store_loop() {
        try {
            statements s{
                statement(db, "INSERT OR IGNORE INTO outbox(channel, event_id, topic, body, accepted_ms, next_ms, claimed)"
                              " VALUES(?,?,?,?,?,?,?)"),
                statement(db, "UPDATE outbox SET claimed=1 WHERE id=?"),
                statement(db, "UPDATE outbox SET claimed=0 WHERE id=?"),
                statement(db, "UPDATE outbox SET state=2, body=x'', next_ms=?, claimed=0, attempts=?, last_code=? WHERE id=?"),
                statement(db, "UPDATE outbox SET attempts=?, next_ms=?, claimed=0, last_code=?, last_detail=? WHERE id=?"),
                statement(db, "UPDATE outbox SET state=1, dead_ms=?1, next_ms=?1, attempts=?, claimed=0, last_code=?, last_detail=? WHERE id=?"),
                statement(db, "INSERT INTO attempts(channel, event_id, topic, attempt, time_ms, latency_us, outcome, code, detail)"
                              " VALUES(?,?,?,?,?,?,?,?,?)"),
                statement(db, "SELECT id, event_id, topic, body, attempts, accepted_ms FROM outbox"
                              " WHERE channel=? AND state=0 AND next_ms<=? AND claimed=0 ORDER BY next_ms, id LIMIT ?"),
                statement(db, "SELECT MIN(next_ms) FROM outbox WHERE channel=? AND state=0 AND next_ms>?"),
                statement(db, "SELECT MIN(accepted_ms) FROM outbox WHERE channel=? AND state=0"),  // outbox_pending_age
                statement(db, "DELETE FROM outbox WHERE channel=? AND state=2 AND next_ms<?"),
                statement(db, "DELETE FROM attempts WHERE channel=?1 AND id <= (SELECT id FROM attempts WHERE channel=?1"
                              " ORDER BY id DESC LIMIT 1 OFFSET ?2)"),
                statement(db, "INSERT OR REPLACE INTO channel_state(name, disabled, reason, since_ms) VALUES(?,?,?,?)"),
            };
            run_store(s);
        } catch (const std::exception& e) {
            evmesh::detail::log()->critical("channels: outbox failure, intake and deliveries stopped: {}", e.what());
            {
                std::lock_guard lk(stats_m);
                outbox_err = e.what();
            }
            failed = true;
        }
        std::deque<std::function<void()>> orphans;  // destroyed unrun: their callers get an error
        {
            std::lock_guard lk(m);
            if (failed) {
                lose(intake);  // held for a write that will not come
            }
            store_done = true;
            stopping = true;
            orphans.swap(commands);
            space_cv.notify_all();
        }
        for (auto& ch : channels) {  // workers stop too: their outcomes could not be recorded
            std::lock_guard lk(ch->m);
            ch->stopping = true;
            ch->cv.notify_all();
        }
    }


    // Rows claimed in the current transaction, handed to the workers once it commits.
    struct staged_item {
        channel* ch;
        work_item item;
    };
    std::vector<staged_item> staged;
    struct intake_delta {
        std::uint64_t accepted = 0, duplicates = 0;
        std::int64_t first_ms = 0;
    };
    std::map<std::size_t, intake_delta> intake_counts;  // applied after the commit: accepted = persisted
    // What one delivery outcome does to the counters, applied after the commit.
    struct outcome_delta {
        channel* ch;
        int status;  // EVMESH_DELIVERED, EVMESH_DISABLE, EVMESH_RETRY (rescheduled), EVMESH_FAIL (dead)
        std::uint64_t attempt_us, waited_us;
    };
    std::vector<outcome_delta> outcome_deltas;
    std::vector<channel*> disabled_in_tx;  // disable() in the open transaction
    // The breaker's state before the open transaction: a rolled-back batch is applied again,
    // and its outcomes must not count twice toward tripping the breaker.
    struct breaker_state {
        std::uint32_t fail_streak;
        std::int64_t paused_until_ms, pause_ms;
        bool probe_out, hold;
        std::uint64_t paused, trips;
    };
    std::vector<breaker_state> breaker_before;

    static void apply_delta(const outcome_delta& d) {
        auto& c = d.ch->c;
        c.attempts++;
        c.attempt_latency_sum_us += d.attempt_us;
        observe(c.attempt_latency, d.attempt_us);
        if (d.attempt_us > c.attempt_latency_max_us) {
            c.attempt_latency_max_us = d.attempt_us;
        }
        switch (d.status) {
            case EVMESH_DELIVERED:
                c.delivered++;
                c.pending--;
                c.delivery_latency_sum_us += d.waited_us;
                observe(c.delivery_latency, d.waited_us);
                break;
            case EVMESH_RETRY:
                c.failed++;
                c.retried++;
                break;
            case EVMESH_FAIL:
                c.failed++;
                c.dead_lettered++;
                c.pending--;
                c.dead++;
                break;
            default:  // disabled: the event stays pending
                c.failed++;
                break;
        }
    }

    void publish_staged() {
        for (const auto& d : outcome_deltas) {
            apply_delta(d);
        }
        outcome_deltas.clear();
        for (const auto& [idx, d] : intake_counts) {
            auto& c = channels[idx]->c;
            c.duplicates += d.duplicates;
            c.accepted += d.accepted;
            if (d.accepted > 0 && c.pending.fetch_add(d.accepted) == 0) {
                c.oldest_pending_ms = d.first_ms;
            }
        }
        intake_counts.clear();
        // Each run of one channel's items is queued under one lock, then its workers are woken: a
        // worker that drains the queue between two pushes must not sleep through the rest.
        for (std::size_t i = 0; i < staged.size();) {
            channel* ch = staged[i].ch;
            {
                std::lock_guard lk(ch->m);
                for (; i < staged.size() && staged[i].ch == ch; ++i) {
                    ch->ready.push_back(std::move(staged[i].item));
                }
            }
            ch->cv.notify_all();
        }
        for (auto& ch : channels) {
            ch->staged_count = 0;
        }
        staged.clear();
    }

    // One write transaction of the store: intake, outcomes, the claims resync after a failure,
    // then refill. Counters and the workers' queues change only after it commits, so a failed
    // transaction (rolled back by SQLite) leaves nothing half-applied and the same batch can be
    // written again.
    void write_batch(statements& s, std::deque<intake_item>& in, std::deque<completion>& done, bool refill_all,
                     std::int64_t now) {
        breaker_before.clear();
        for (auto& ch : channels) {
            breaker_before.push_back({ch->fail_streak, ch->paused_until_ms, ch->pause_ms, ch->probe_out,
                                      ch->hold.load(), ch->c.paused.load(), ch->c.breaker_trips.load()});
        }
        disabled_in_tx.clear();
        transaction tx(db);
        if (!in.empty()) {
            insert_batch(s, in);
        }
        if (!done.empty()) {
            apply_completions(s, done);
        }
        if (resync_claims) {
            unclaim_unknown();
        }
        if (refill_all) {
            for (auto& ch : channels) {
                refill(s, *ch, now);
            }
        }
        tx.commit();
        in.clear();
        done.clear();
        resync_claims = false;
        publish_staged();
    }

    // After a rolled-back transaction: forget what it staged (the rows are unclaimed again in
    // the database), and make the next transaction reconcile claimed rows with what the workers
    // hold (a release in the failed transaction took rows from the queues, but its unclaim was
    // rolled back).
    void discard_staged() {
        staged.clear();
        intake_counts.clear();
        outcome_deltas.clear();
        for (auto* ch : disabled_in_tx) {
            ch->disabled = false;
            std::lock_guard lk(stats_m);
            ch->disabled_reason.clear();
        }
        disabled_in_tx.clear();
        for (std::size_t i = 0; i < channels.size() && i < breaker_before.size(); ++i) {
            auto& ch = *channels[i];
            const auto& b = breaker_before[i];
            ch.fail_streak = b.fail_streak;
            ch.paused_until_ms = b.paused_until_ms;
            ch.pause_ms = b.pause_ms;
            ch.probe_out = b.probe_out;
            ch.hold = b.hold;
            ch.c.paused = b.paused;
            ch.c.breaker_trips = b.trips;
        }
        // `known` is what the workers hold: their ready queue and what they have in hand (a
        // release in the failed transaction emptied the queue, maybe halfway through its unclaims)
        for (auto& ch : channels) {
            ch->staged_count = 0;
            ch->backlog = true;
            std::lock_guard lk(ch->m);
            ch->known.clear();
            for (const auto& w : ch->ready) {
                ch->known.insert(w.row);
            }
            ch->known.insert(ch->in_hand.begin(), ch->in_hand.end());
        }
        if (sqlite3_get_autocommit(db.get()) == 0) {
            // the ROLLBACK itself failed: try once more, else the connection is unusable
            if (sqlite3_exec(db.get(), "ROLLBACK", nullptr, nullptr, nullptr) != SQLITE_OK) {
                throw sqlite_error("the outbox cannot roll back a failed transaction");
            }
        }
        resync_claims = true;
    }

    // Inside the store's transaction: claimed=1 must mean "a worker or a ready queue holds it".
    void unclaim_unknown() {
        std::vector<std::int64_t> stray;
        {
            statement q(db, "SELECT id, channel FROM outbox WHERE claimed=1");
            while (q.step()) {
                const auto it = by_name.find(q.text(1));
                if (it == by_name.end() || channels[it->second]->known.count(q.i64(0)) == 0) {
                    stray.push_back(q.i64(0));
                }
            }
        }
        statement u(db, "UPDATE outbox SET claimed=0 WHERE id=?");
        for (auto row : stray) {
            u.bind(1, row).run();
        }
    }

    // Events that will never be written (stop or fatal error while they waited): counted lost.
    void lose(std::deque<intake_item>& items) {
        for (auto& it : items) {
            channels[it.channel]->c.lost++;
        }
        items.clear();
    }

    std::uint64_t total_lost() const {
        std::uint64_t lost = 0;
        for (const auto& ch : channels) {
            lost += ch->c.lost;
        }
        return lost;
    }

    void set_degraded(const std::string& why) {
        {
            std::lock_guard lk(stats_m);
            outbox_err = why;
        }
        if (!degraded.exchange(true)) {
            std::lock_guard lk(m);
            space_cv.notify_all();  // producers waiting for room stop waiting: see on_event
        }
    }

    void run_store(statements& s) {
        std::deque<intake_item> in;
        std::deque<completion> done;
        std::deque<std::function<void()>> cmds;
        std::int64_t last_periodic = 0;
        std::int64_t last_commit_us = 0;
        std::size_t workers_total = 0;
        for (auto& ch : channels) {
            workers_total += static_cast<std::size_t>(ch->cfg.concurrency);
        }
        // Group commit: under load, gather the outcomes of up to this many attempts per commit.
        const std::size_t group = std::clamp<std::size_t>(workers_total, 1, 64);
        // A failed write is retried after `backoff_ms` (100 ms doubling to 5 s) with the same
        // batch; meanwhile new intake stays in `intake` (bounded by opts.hold_events).
        std::int64_t backoff_ms = 0;
        std::int64_t retry_at_us = 0;
        std::int64_t failed_since_ms = 0;
        std::uint64_t lost_at_failure = 0;
        bool first = true;  // the first transaction reconciles claims and loads what is due
        for (;;) {
            bool quit = false;
            {
                std::unique_lock lk(m);
                const auto now = wall_ms();
                if (backoff_ms > 0) {
                    // degraded: only a stop or the end of the backoff wakes the store
                    cv.wait_for(lk, std::chrono::microseconds(std::max<std::int64_t>(1, retry_at_us - steady_us())),
                                [&] { return stopping || !commands.empty(); });
                } else if (!first) {
                    std::int64_t wake = now + 1000;
                    for (auto& ch : channels) {
                        if (!ch->backlog && ch->next_due_ms > now && !ch->disabled) {
                            wake = std::min(wake, ch->next_due_ms);
                        }
                        if (ch->paused_until_ms > now && !ch->probe_out) {
                            wake = std::min(wake, ch->paused_until_ms);
                        }
                    }
                    cv.wait_for(lk, milliseconds(std::max<std::int64_t>(1, wake - now)), [&] {
                        return !intake.empty() || !completions.empty() || !commands.empty() || stopping;
                    });
                    // Busy (a commit less than 2 ms ago) and only a few outcomes so far: wait up
                    // to 0.5 ms for more, so one commit covers many deliveries. Workers do not
                    // wait for it; only the bookkeeping of finished attempts is deferred.
                    if (!stopping && commands.empty() && intake.empty() && completions.size() < group &&
                        steady_us() - last_commit_us < 2000) {
                        cv.wait_for(lk, std::chrono::microseconds(500), [&] {
                            return completions.size() >= group || !intake.empty() || !commands.empty() || stopping;
                        });
                    }
                }
                if (backoff_ms == 0 || stopping) {  // a retry writes the failed batch only
                    while (!intake.empty()) {
                        in.push_back(std::move(intake.front()));
                        intake.pop_front();
                    }
                    while (!completions.empty()) {
                        done.push_back(std::move(completions.front()));
                        completions.pop_front();
                    }
                }
                cmds.swap(commands);
                quit = stopping;
                space_cv.notify_all();
            }
            // Admin commands first (replay, enable, the stop's unclaim), so the refill below
            // already sees what they changed. A failing command reports its error to its caller.
            for (auto& f : cmds) {
                f();
            }
            cmds.clear();
            if (backoff_ms > 0 && !quit && steady_us() < retry_at_us) {
                continue;  // woken by a command during the backoff
            }
            const auto now = wall_ms();
            const auto batch = in.size();
            try {
                write_batch(s, in, done, !quit, now);
                last_commit_us = steady_us();
                first = false;
                if (backoff_ms > 0) {
                    backoff_ms = 0;
                    {
                        std::lock_guard lk(stats_m);
                        outbox_err.clear();
                    }
                    degraded = false;
                    evmesh::detail::log()->info("channels: the outbox is writable again after {} ms; the retried batch "
                                                "({} events) is written, what waits in memory follows; {} events were "
                                                "lost (memory hold full)",
                                                now - failed_since_ms, batch, total_lost() - lost_at_failure);
                }
            } catch (const sqlite_error& e) {
                if (!e.transient()) {
                    lose(in);  // never written and never will be
                    throw;
                }
                discard_staged();
                if (backoff_ms == 0) {
                    backoff_ms = 100;
                    failed_since_ms = now;
                    lost_at_failure = total_lost();
                    evmesh::detail::log()->error(
                        "channels: cannot write the outbox ({}); holding up to {} events in memory and retrying with "
                        "backoff; /healthz answers 503 until a write succeeds",
                        e.what(), opts.hold_events);
                } else {
                    backoff_ms = std::min<std::int64_t>(backoff_ms * 2, 5000);
                }
                set_degraded(e.what());
                retry_at_us = steady_us() + backoff_ms * 1000;
                if (quit) {
                    // stopping while the disk is still full: what was never written is lost, counted
                    std::lock_guard lk(m);
                    evmesh::detail::log()->error("channels: stopping with the outbox not writable: {} events lost",
                                                 in.size() + intake.size());
                    lose(in);
                    lose(intake);
                    break;
                }
                continue;
            }
            if (quit) {
                break;
            }
            if (now - last_periodic >= 1000) {
                last_periodic = now;
                try {
                    periodic(s, now);
                } catch (const sqlite_error& e) {
                    if (!e.transient()) {
                        throw;
                    }
                    // housekeeping (gauges, purge, trim) waits for the next round
                }
            }
        }
    }

    // Inside the store's transaction.
    void insert_batch(statements& s, std::deque<intake_item>& in) {
        std::map<std::size_t, std::size_t> room;  // per channel: items we may still hand to workers
        for (auto& it : in) {
            auto& ch = *channels[it.channel];
            const auto first_delay = ch.cfg.retry.schedule.front().count();
            auto r = room.find(it.channel);
            if (r == room.end()) {
                std::lock_guard lk(ch.m);
                const auto have = ch.ready.size() + ch.staged_count;
                const bool direct = !ch.backlog && !ch.disabled && !ch.stopping && first_delay == 0 &&
                                    ch.paused_until_ms == 0 && have < ch.ready_cap;
                r = room.emplace(it.channel, direct ? ch.ready_cap - have : 0).first;
            }
            const bool claim = r->second > 0;
            const auto next_ms = it.accepted_ms + first_delay;
            s.insert.bind(1, ch.cfg.name)
                .bind_blob(2, it.id.data(), it.id.size())
                .bind(3, it.topic)
                .bind_blob(4, it.body.data(), it.body.size())
                .bind(5, it.accepted_ms)
                .bind(6, next_ms)
                .bind(7, claim ? 1 : 0);
            s.insert.run();
            auto& d = intake_counts[it.channel];
            if (db.changes() == 0) {
                d.duplicates++;
                continue;
            }
            if (d.accepted++ == 0) {
                d.first_ms = it.accepted_ms;
            }
            if (claim) {
                --r->second;
                work_item w;
                w.row = db.last_rowid();
                w.event_id.assign(reinterpret_cast<const char*>(it.id.data()), it.id.size());
                w.topic = it.topic;  // copied: a failed transaction writes `in` again
                w.body = it.body;
                w.attempt = 1;
                w.accepted_ms = it.accepted_ms;
                ch.known.insert(w.row);
                ch.staged_count++;
                staged.push_back({&ch, std::move(w)});
            } else if (first_delay > 0 && !ch.backlog) {
                ch.next_due_ms = ch.next_due_ms == 0 ? next_ms : std::min(ch.next_due_ms, next_ms);
            } else {
                ch.backlog = true;
            }
        }
    }

    std::int64_t jittered(milliseconds d, double jitter) {
        if (d.count() == 0 || jitter <= 0) {
            return d.count();
        }
        std::uniform_real_distribution<double> u(-jitter, jitter);
        return std::max<std::int64_t>(0, static_cast<std::int64_t>(static_cast<double>(d.count()) * (1.0 + u(rng))));
    }

    // Inside the store's transaction.
    void apply_completions(statements& s, std::deque<completion>& done) {
        for (auto& c : done) {
            auto& ch = *channels[c.channel];
            ch.known.erase(c.row);
            {
                std::lock_guard lk(ch.m);
                ch.in_hand.erase(c.row);
            }
            if (c.released) {
                s.unclaim.bind(1, c.row).run();
                ch.backlog = true;
                continue;
            }
            on_outcome(s, ch, c.status, c.end_ms);
            const auto& sched = ch.cfg.retry.schedule;
            std::string outcome = status_name(c.status);
            std::string detail = c.detail;  // `c` stays as it was: a failed transaction applies it again
            outcome_delta d{&ch, c.status, static_cast<std::uint64_t>(std::max<std::int64_t>(0, c.latency_us)), 0};
            if (c.status == EVMESH_DELIVERED) {
                s.done.bind(1, c.end_ms).bind(2, c.attempt).bind(3, c.code).bind(4, c.row).run();
                d.waited_us = static_cast<std::uint64_t>(std::max<std::int64_t>(0, c.end_ms - c.accepted_ms)) * 1000;
            } else if (c.status == EVMESH_DISABLE) {
                s.reschedule.bind(1, c.attempt).bind(2, c.end_ms).bind(3, c.code).bind(4, detail).bind(5, c.row).run();
                disable(s, ch, "endpoint answered " + std::to_string(c.code) + (detail.empty() ? "" : ": " + detail),
                        c.end_ms);
            } else if (c.status == EVMESH_RETRY && c.attempt < sched.size()) {
                std::int64_t delay = jittered(sched[c.attempt], ch.cfg.retry.jitter);
                if (c.retry_after_ms >= 0) {
                    delay = std::min<std::int64_t>(c.retry_after_ms, ch.cfg.retry.max_retry_after.count());
                }
                const auto next = c.end_ms + delay;
                s.reschedule.bind(1, c.attempt).bind(2, next).bind(3, c.code).bind(4, detail).bind(5, c.row).run();
                ch.next_due_ms = ch.next_due_ms == 0 ? next : std::min(ch.next_due_ms, next);
            } else {
                // EVMESH_FAIL, or retries exhausted
                d.status = EVMESH_FAIL;
                if (c.status == EVMESH_RETRY) {
                    detail = "retries exhausted after " + std::to_string(c.attempt) + " attempts; last: " + detail;
                }
                outcome = c.status == EVMESH_FAIL ? "failed" : "dead";
                s.dead.bind(1, c.end_ms).bind(2, c.attempt).bind(3, c.code).bind(4, detail).bind(5, c.row).run();
                evmesh::detail::log()->warn("channel {}: event {} dead-lettered: {}", ch.cfg.name, id_text(c.event_id),
                                            detail);
            }
            outcome_deltas.push_back(d);
            s.log.bind(1, ch.cfg.name)
                .bind_blob(2, c.event_id.data(), c.event_id.size())
                .bind(3, c.topic)
                .bind(4, c.attempt)
                .bind(5, c.end_ms)
                .bind(6, c.latency_us)
                .bind(7, outcome)
                .bind(8, c.code)
                .bind(9, detail);
            s.log.run();
        }
    }

    // Inside a transaction.
    void disable(statements& s, channel& ch, const std::string& reason, std::int64_t now) {
        if (ch.disabled) {
            return;
        }
        s.set_state.bind(1, ch.cfg.name).bind(2, 1).bind(3, reason).bind(4, now).run();  // may throw: then
        ch.disabled = true;                                                             // nothing changed
        disabled_in_tx.push_back(&ch);  // undone if the transaction rolls back
        {
            std::lock_guard lk(stats_m);
            ch.disabled_reason = reason;
        }
        release_queued(s, ch);
        evmesh::detail::log()->error("channel {}: disabled: {}; {} events held in the outbox until it is enabled again",
                                     ch.cfg.name, reason, ch.c.pending.load());
    }

    // Inside the store's transaction: takes back what waits in the channel's ready queue (and
    // what is staged for it), unclaimed, so nothing more is attempted until refill loads it.
    void release_queued(statements& s, channel& ch) {
        std::deque<work_item> back;
        {
            std::lock_guard lk(ch.m);
            back.swap(ch.ready);
        }
        for (auto it = staged.begin(); it != staged.end();) {
            if (it->ch == &ch) {
                back.push_back(std::move(it->item));
                it = staged.erase(it);
            } else {
                ++it;
            }
        }
        ch.staged_count = 0;
        for (auto& w : back) {
            ch.known.erase(w.row);
            s.unclaim.bind(1, w.row).run();
        }
        ch.backlog = true;
    }

    // The circuit breaker of one endpoint (store thread). After `failures` attempts in a row
    // answered "retry" (down, timing out, 5xx), the channel pauses: queued deliveries are taken
    // back and nothing is attempted for `pause`; then exactly one delivery probes the endpoint.
    // Success closes the breaker; another failure doubles the pause, up to `max_pause`. Events
    // waiting during a pause do not use up their attempts, so an outage of hours does not
    // dead-letter everything that arrived during it.
    void on_outcome(statements& s, channel& ch, int status, std::int64_t now) {
        const auto& b = ch.cfg.breaker;
        if (b.failures == 0) {
            return;
        }
        if (status == EVMESH_RETRY) {
            ++ch.fail_streak;
            if (ch.paused_until_ms != 0) {
                if (ch.probe_out) {  // the probe failed: pause longer (attempts that were already
                                     // in flight when the breaker opened do not count)
                    ch.pause_ms = std::min<std::int64_t>(ch.pause_ms * 2, b.max_pause.count());
                    ch.paused_until_ms = now + ch.pause_ms;
                    ch.probe_out = false;
                }
            } else if (ch.fail_streak >= b.failures) {
                ch.pause_ms = b.pause.count();
                ch.paused_until_ms = now + ch.pause_ms;
                ch.probe_out = false;
                ch.c.breaker_trips++;
                ch.c.paused = 1;
                ch.hold = true;
                release_queued(s, ch);
                evmesh::detail::log()->warn("channel {}: {} failed attempts in a row; pausing deliveries, probing again "
                                            "in {} ms ({} events pending)",
                                            ch.cfg.name, ch.fail_streak, ch.pause_ms, ch.c.pending.load());
            }
            return;
        }
        ch.fail_streak = 0;  // delivered, or a definite answer: the endpoint is up
        if (ch.paused_until_ms != 0) {
            ch.paused_until_ms = 0;
            ch.probe_out = false;
            ch.c.paused = 0;
            ch.hold = false;
            ch.backlog = true;
            evmesh::detail::log()->info("channel {}: endpoint answers again; resuming ({} events pending)", ch.cfg.name,
                                        ch.c.pending.load());
        }
    }

    // Inside the store's transaction: claims due rows and stages them for the workers.
    void refill(statements& s, channel& ch, std::int64_t now) {
        if (ch.disabled) {
            return;
        }
        bool probe = false;
        if (ch.paused_until_ms != 0) {
            if (now < ch.paused_until_ms || ch.probe_out) {
                return;  // paused, or the probe has not answered yet
            }
            probe = true;
        }
        std::size_t have = 0;
        {
            std::lock_guard lk(ch.m);
            if (ch.stopping) {
                return;
            }
            have = ch.ready.size() + ch.staged_count;
        }
        if (have > ch.ready_cap / 2) {
            return;
        }
        if (!ch.backlog && (ch.next_due_ms == 0 || now < ch.next_due_ms)) {
            return;
        }
        const auto want = probe ? std::size_t{1} : ch.ready_cap - have;
        std::vector<work_item> rows;
        // claimed=1 marks exactly the rows this runtime holds (ready queue or in flight)
        s.due.bind(1, ch.cfg.name).bind(2, now).bind(3, static_cast<std::int64_t>(want));
        std::size_t seen = 0;
        while (s.due.step()) {
            ++seen;
            const auto row = s.due.i64(0);
            if (ch.known.count(row) != 0) {
                continue;  // cannot happen while claimed and known agree; never load a row twice
            }
            work_item w;
            w.row = row;
            w.event_id = std::string(s.due.blob(1));
            w.topic = std::string(s.due.text(2));
            w.body = std::string(s.due.blob(3));
            w.attempt = static_cast<std::uint32_t>(s.due.i64(4)) + 1;
            w.accepted_ms = s.due.i64(5);
            rows.push_back(std::move(w));
        }
        s.due.reset();
        ch.backlog = seen >= want;
        if (!ch.backlog) {
            s.next_due.bind(1, ch.cfg.name).bind(2, now);
            ch.next_due_ms = s.next_due.step() ? s.next_due.i64(0) : 0;  // NULL reads as 0 = none
            s.next_due.reset();
        }
        if (probe) {
            ch.backlog = true;  // the rest waits for the probe's answer
            ch.probe_out = !rows.empty();
        }
        for (auto& w : rows) {
            s.claim.bind(1, w.row).run();
            ch.known.insert(w.row);
            ch.staged_count++;
            w.probe = probe;
            staged.push_back({&ch, std::move(w)});
        }
    }

    void periodic(statements& s, std::int64_t now) {
        for (auto& ch : channels) {
            s.oldest.bind(1, ch->cfg.name);
            ch->c.oldest_pending_ms = s.oldest.step() ? s.oldest.i64(0) : 0;
            s.oldest.reset();
            s.purge.bind(1, ch->cfg.name).bind(2, now - opts.dedupe_window.count()).run();
            s.trim.bind(1, ch->cfg.name).bind(2, static_cast<std::int64_t>(opts.log_keep)).run();
        }
    }

    std::vector<channel_stats> snapshot() const {
        std::vector<channel_stats> out;
        const auto now = wall_ms();
        std::lock_guard lk(stats_m);
        for (const auto& chp : channels) {
            if (!chp) {
                continue;
            }
            const auto& ch = *chp;
            channel_stats s;
            s.name = ch.cfg.name;
            s.plugin = ch.cfg.plugin;
            s.disabled = ch.disabled;
            s.disabled_reason = ch.disabled_reason;
            s.accepted = ch.c.accepted;
            s.duplicates = ch.c.duplicates;
            s.attempts = ch.c.attempts;
            s.delivered = ch.c.delivered;
            s.retried = ch.c.retried;
            s.failed = ch.c.failed;
            s.dead_lettered = ch.c.dead_lettered;
            s.replayed = ch.c.replayed;
            s.recovered = ch.c.recovered;
            s.pending = ch.c.pending;
            s.in_flight = ch.c.in_flight;
            s.dead = ch.c.dead;
            const auto oldest = ch.c.oldest_pending_ms.load();
            s.oldest_pending_age_s = s.pending > 0 && oldest > 0 ? static_cast<double>(now - oldest) / 1000.0 : 0.0;
            s.attempt_latency_sum_us = ch.c.attempt_latency_sum_us;
            s.attempt_latency_max_us = ch.c.attempt_latency_max_us;
            s.delivery_latency_sum_us = ch.c.delivery_latency_sum_us;
            for (std::size_t i = 0; i < s.attempt_latency.size(); ++i) {
                s.attempt_latency[i] = ch.c.attempt_latency[i].load(std::memory_order_relaxed);
                s.delivery_latency[i] = ch.c.delivery_latency[i].load(std::memory_order_relaxed);
            }
        s.lost = ch.c.lost;
        s.paused = ch.c.paused != 0;
        s.breaker_trips = ch.c.breaker_trips;
            out.push_back(std::move(s));
        }
        return out;
    }

    // The `channels` element of the node's stats event (PROTOCOL.md section 10).
    std::string encode_stats() const {
        const auto all = snapshot();
        msgpack::sbuffer buf;
        msgpack::packer<msgpack::sbuffer> pk(buf);
        pk.pack_array(static_cast<std::uint32_t>(all.size()));
        auto kv = [&](const char* k, auto v) {
            pk.pack(std::string_view(k));
            pk.pack(v);
        };
        for (const auto& c : all) {
            pk.pack_map(20);
            kv("name", std::string_view(c.name));
            kv("plugin", std::string_view(c.plugin));
            kv("disabled", c.disabled);
            kv("paused", c.paused);
            kv("breaker_trips", c.breaker_trips);
            kv("accepted", c.accepted);
            kv("duplicates", c.duplicates);
            kv("attempts", c.attempts);
            kv("delivered", c.delivered);
            kv("retried", c.retried);
            kv("failed", c.failed);
            kv("dead_lettered", c.dead_lettered);
            kv("replayed", c.replayed);
            kv("recovered", c.recovered);
            kv("pending", c.pending);
            kv("in_flight", c.in_flight);
            kv("dead", c.dead);
            kv("oldest_pending_age_ms", static_cast<std::uint64_t>(c.oldest_pending_age_s * 1000.0));
            kv("attempt_latency_avg_us", c.attempts > 0 ? c.attempt_latency_sum_us / c.attempts : std::uint64_t{0});
            kv("delivery_latency_avg_us", c.delivered > 0 ? c.delivery_latency_sum_us / c.delivered : std::uint64_t{0});
        }
        return std::string(buf.data(), buf.size());
    }

    // Runs `f` on the store thread (it owns the connection); fails when the store has stopped.
    template <class F>
    auto on_store(F f) -> result<decltype(f())> {
        using R = decltype(f());
        auto task = std::make_shared<std::packaged_task<R()>>(std::move(f));
        auto fut = task->get_future();
        {
            std::lock_guard lk(m);
            if (stopping || store_done) {
                return fail(errc::stopped);
            }
            commands.push_back([task] { (*task)(); });
            cv.notify_one();
        }
        try {
            return fut.get();
        } catch (const std::exception& e) {
            evmesh::detail::log()->error("channels: {}", e.what());
            return fail(errc::io_error);
        }
    }

    channel* find(std::string_view name) {
        auto it = by_name.find(name);
        return it == by_name.end() ? nullptr : channels[it->second].get();
    }

    void shutdown(milliseconds drain) {
        std::lock_guard stop_lk(stop_m);  // a concurrent stop() returns once this one is done
        // 1. No more intake: close the subscriptions, after they handed over what the node had
        //    already sent them (it is accepted into the outbox like any event), then join.
        {
            std::lock_guard lk(m);
            if (stopped) {
                return;
            }
            stopped = true;
        }
        if (n != nullptr) {
            n->set_channel_stats({});  // returns once no stats call is running
        }
        for (auto& ch : channels) {
            for (auto& s : ch->subs) {
                s.drain_and_close();
            }
        }
        // 2. Workers finish what they hold, within `drain`; queued items stay claimed rows that the
        //    store releases below.
        const auto deadline = std::chrono::steady_clock::now() + drain;
        for (auto& ch : channels) {
            std::lock_guard lk(ch->m);
            ch->stopping = true;
            ch->ready.clear();
            ch->cv.notify_all();
        }
        for (auto& ch : channels) {
            while (ch->workers_running > 0 && std::chrono::steady_clock::now() < deadline) {
                std::this_thread::sleep_for(2ms);
            }
            if (ch->workers_running > 0) {
                evmesh::detail::log()->warn("channel {}: {} deliveries still in flight at stop; they are delivered "
                                            "again after a restart",
                                            ch->cfg.name, ch->c.in_flight.load());
            }
        }
        // 3. The store commits the remaining intake and outcomes, then unclaims every row that no
        //    worker holds: only deliveries cut off in flight are `recovered` at the next start.
        if (store.joinable()) {
            (void)on_store([this] {
                transaction tx(db);
                statement unclaim_all(db, "UPDATE outbox SET claimed=0 WHERE channel=? AND claimed=1");
                statement reclaim(db, "UPDATE outbox SET claimed=1 WHERE id=?");
                for (auto& ch : channels) {
                    unclaim_all.bind(1, ch->cfg.name).run();
                    std::lock_guard lk(ch->m);
                    for (auto row : ch->in_hand) {
                        reclaim.bind(1, row).run();
                    }
                }
                tx.commit();
                return 0;
            });
            {
                std::lock_guard lk(m);
                stopping = true;
                cv.notify_one();
                space_cv.notify_all();
            }
            store.join();
        }
        stop_checkpointer();
        for (auto& ch : channels) {
            if (ch->workers_running == 0) {
                for (auto& w : ch->workers) {
                    w.join();
                }
                if (ch->instance != nullptr) {
                    ch->lib->api->destroy(ch->instance);
                    ch->instance = nullptr;
                }
            } else {
                // A plugin call outlives the drain: leave it running (the process is usually
                // exiting); its channel, instance and library stay allocated.
                for (auto& w : ch->workers) {
                    w.detach();
                }
                leak = true;
            }
        }
        if (db.get() != nullptr) {
            // leave a small WAL behind: copy it into the database and truncate it
            sqlite3_wal_checkpoint_v2(db.get(), nullptr, SQLITE_CHECKPOINT_TRUNCATE, nullptr, nullptr);
        }
        db.close();
        if (lock_fd >= 0) {  // the outbox is free for the next runtime (a reload's new channel set)
            ::close(lock_fd);
            lock_fd = -1;
        }
    }
};

channel_runtime::channel_runtime(std::unique_ptr<impl> p) : impl_(std::move(p)) {}

bool channel_runtime::check(const runtime_options& options, std::string& error) {
    auto holder = std::make_unique<impl>(nullptr, options);  // validation needs no node
    auto* p = holder.get();
    const bool ok = p->validate(error) && p->create_instances(error);
    for (auto& ch : p->channels) {
        ch->lib->api->destroy(ch->instance);
        ch->instance = nullptr;
    }
    return ok;
}

channel_runtime::~channel_runtime() {
    stop();
    if (impl_ && impl_->leak) {
        (void)impl_.release();  // a plugin call is still running on a detached worker
    }
}

result<std::unique_ptr<channel_runtime>> channel_runtime::start(node& n, runtime_options options, std::string& error) {
    auto p = std::make_unique<impl>(&n, std::move(options));
    if (!p->validate(error)) {
        return fail(errc::bad_option);
    }
    if (!p->create_instances(error)) {
        for (auto& ch : p->channels) {
            ch->lib->api->destroy(ch->instance);
        }
        return fail(errc::bad_option);
    }
    if (!p->lock_outbox(error)) {
        for (auto& ch : p->channels) {
            ch->lib->api->destroy(ch->instance);
        }
        return fail(errc::io_error);
    }
    try {
        p->open_outbox();
    } catch (const std::exception& e) {
        error = e.what();
        for (auto& ch : p->channels) {
            ch->lib->api->destroy(ch->instance);
        }
        return fail(errc::io_error);
    }
    p->start_threads();
    std::unique_ptr<channel_runtime> rt(new channel_runtime(std::move(p)));
    if (!rt->impl_->subscribe(error)) {
        rt->stop();
        return fail(errc::bad_option);
    }
    n.set_channel_stats([p = rt->impl_.get()] { return p->encode_stats(); });
    for (auto& ch : rt->impl_->channels) {
        std::string topics;
        for (const auto& t : ch->cfg.topics) {
            topics += (topics.empty() ? "" : ",") + t;
        }
        evmesh::detail::log()->info("channel {}: plugin {} ({}), topics {}, concurrency {}, {} attempts, {} pending{}",
                                    ch->cfg.name, ch->cfg.plugin, ch->lib->path, topics,
                                    ch->cfg.concurrency, ch->cfg.retry.schedule.size(), ch->c.pending.load(),
                                    ch->disabled ? ", DISABLED" : "");
    }
    return rt;
}

void channel_runtime::stop(milliseconds drain) {
    if (impl_) {
        impl_->shutdown(drain);
    }
}

std::vector<channel_stats> channel_runtime::stats() const { return impl_->snapshot(); }

std::size_t channel_runtime::offer(const event& ev) {
    std::size_t taken = 0;
    for (auto& ch : impl_->channels) {
        const auto& ps = ch->patterns;
        if (std::any_of(ps.begin(), ps.end(), [&](const topic_pattern& p) { return p.matches(ev.topic); })) {
            impl_->enqueue(ch->index, ev);
            ++taken;
        }
    }
    return taken;
}

result<std::size_t> channel_runtime::replay(std::string_view name, std::string_view event_id_text) {
    auto* ch = impl_->find(name);
    if (ch == nullptr) {
        return fail(errc::bad_option);
    }
    std::string id_blob;
    if (!event_id_text.empty()) {
        // UUID text → 16 bytes
        std::string hex;
        for (char c : event_id_text) {
            if (c != '-') {
                hex += c;
            }
        }
        if (hex.size() != 32 || hex.find_first_not_of("0123456789abcdefABCDEF") != std::string::npos) {
            return fail(errc::bad_option);
        }
        for (std::size_t i = 0; i < 16; ++i) {
            id_blob += static_cast<char>(std::stoi(hex.substr(2 * i, 2), nullptr, 16));
        }
    }
    auto* p = impl_.get();
    auto r = p->on_store([p, ch, id_blob]() -> std::size_t {
        const auto now = wall_ms();
        transaction tx(p->db);
        statement s(p->db, id_blob.empty()
                               ? "UPDATE outbox SET state=0, attempts=0, next_ms=?, claimed=0, dead_ms=0 WHERE channel=? AND state=1"
                               : "UPDATE outbox SET state=0, attempts=0, next_ms=?, claimed=0, dead_ms=0 WHERE channel=? AND state=1 AND event_id=?");
        s.bind(1, now).bind(2, ch->cfg.name);
        if (!id_blob.empty()) {
            s.bind_blob(3, id_blob.data(), id_blob.size());
        }
        s.run();
        const auto n = static_cast<std::size_t>(p->db.changes());
        tx.commit();
        ch->c.replayed += n;
        ch->c.dead -= n;
        ch->c.pending += n;
        ch->backlog = true;
        if (n > 0) {
            evmesh::detail::log()->info("channel {}: {} dead letters replayed", ch->cfg.name, n);
        }
        return n;
    });
    if (r && *r == 0 && !id_blob.empty()) {
        return fail(errc::bad_option);  // no dead letter with that id
    }
    return r;
}

bool channel_runtime::healthy() const { return !impl_->failed && !impl_->degraded; }

std::string channel_runtime::outbox_error() const {
    std::lock_guard lk(impl_->stats_m);
    return impl_->outbox_err;
}

result<void> channel_runtime::enable(std::string_view name) {
    auto* ch = impl_->find(name);
    if (ch == nullptr) {
        return fail(errc::bad_option);
    }
    auto* p = impl_.get();
    auto r = p->on_store([p, ch] {
        statement s(p->db, "DELETE FROM channel_state WHERE name=?");
        s.bind(1, ch->cfg.name).run();
        {
            std::lock_guard lk(p->stats_m);
            ch->disabled_reason.clear();
        }
        ch->disabled = false;
        ch->backlog = true;
        ch->paused_until_ms = 0;
        ch->probe_out = false;
        ch->fail_streak = 0;
        ch->c.paused = 0;
        ch->hold = false;
        evmesh::detail::log()->info("channel {}: enabled; {} events pending", ch->cfg.name, ch->c.pending.load());
        return 0;
    });
    if (!r) {
        return tl::unexpected(r.error());
    }
    return {};
}

result<std::vector<attempt_record>> channel_runtime::delivery_log(std::string_view name, std::size_t limit) {
    auto* ch = impl_->find(name);
    if (ch == nullptr) {
        return fail(errc::bad_option);
    }
    auto* p = impl_.get();
    return p->on_store([p, ch, limit] {
        std::vector<attempt_record> out;
        statement s(p->db, "SELECT event_id, topic, attempt, time_ms, latency_us, outcome, code, detail FROM attempts"
                           " WHERE channel=? ORDER BY id DESC LIMIT ?");
        s.bind(1, ch->cfg.name).bind(2, static_cast<std::int64_t>(limit));
        while (s.step()) {
            attempt_record r;
            r.event_id = id_text(s.blob(0));
            r.topic = std::string(s.text(1));
            r.attempt = static_cast<std::uint32_t>(s.i64(2));
            r.time_ms = s.i64(3);
            r.latency_us = s.i64(4);
            r.outcome = std::string(s.text(5));
            r.code = static_cast<std::int32_t>(s.i64(6));
            r.detail = std::string(s.text(7));
            out.push_back(std::move(r));
        }
        return out;
    });
}

result<std::vector<dead_record>> channel_runtime::dead_letters(std::string_view name, std::size_t limit) {
    auto* ch = impl_->find(name);
    if (ch == nullptr) {
        return fail(errc::bad_option);
    }
    auto* p = impl_.get();
    return p->on_store([p, ch, limit] {
        std::vector<dead_record> out;
        statement s(p->db, "SELECT event_id, topic, attempts, accepted_ms, dead_ms, last_code, last_detail FROM outbox"
                           " WHERE channel=? AND state=1 ORDER BY next_ms, id LIMIT ?");  // next_ms = dead time
        s.bind(1, ch->cfg.name).bind(2, static_cast<std::int64_t>(limit));
        while (s.step()) {
            dead_record r;
            r.event_id = id_text(s.blob(0));
            r.topic = std::string(s.text(1));
            r.attempts = static_cast<std::uint32_t>(s.i64(2));
            r.accepted_ms = s.i64(3);
            r.dead_ms = s.i64(4);
            r.last_code = static_cast<std::int32_t>(s.i64(5));
            r.last_detail = std::string(s.text(6));
            out.push_back(std::move(r));
        }
        return out;
    });
}

}  // namespace evmesh::channels
