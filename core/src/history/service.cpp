#include "history/service.hpp"

#include <algorithm>
#include <cstring>
#include <array>
#include <cerrno>
#include <deque>
#include <filesystem>
#include <map>
#include <mutex>
#include <unordered_map>
#include <optional>

#include <msgpack.hpp>
#include <sys/eventfd.h>
#include <unistd.h>
#include <zmq.h>

#include <evmesh/codec.hpp>

#include "codec/envelope.hpp"
#include "history/consumer.hpp"
#include "history/store.hpp"
#include "util/log.hpp"
#include "util/string_hash.hpp"

namespace evmesh::detail {

namespace {

std::string_view frame_topic(std::string_view frame) {
    auto z = frame.find('\0');
    return z == std::string_view::npos ? frame : frame.substr(0, z);
}

// A replay query (PROTOCOL.md 12.1), decoded from the query event's payload.
struct query {
    std::string reply;
    std::optional<topic_pattern> pattern;
    std::string from = "all";  // all | time | after_id | last | last_per_topic
    std::int64_t time_ns = 0;
    std::string id;
    std::uint64_t n = 0;
    std::optional<std::uint64_t> position;
    std::string history;  // only this history (continuations)
    std::size_t limit = replay_default_page;
};

// Calls fn(key, value) for each string key of the msgpack map `payload`. False, with `why`, when
// the payload is not a map, does not decode, has a value of the wrong type (msgpack's type errors
// end here), or fn refused a value (returned false after setting `why`).
template <class Fn>
bool each_key(std::string_view payload, std::string& why, Fn&& fn) {
    try {
        auto oh = msgpack::unpack(payload.data(), payload.size());
        const auto& o = oh.get();
        if (o.type != msgpack::type::MAP) {
            why = "payload is not a msgpack map";
            return false;
        }
        for (const auto& kv : o.via.map) {
            if (kv.key.type == msgpack::type::STR &&
                !fn(std::string_view(kv.key.via.str.ptr, kv.key.via.str.size), kv.val)) {
                return false;
            }
        }
    } catch (const std::exception& e) {
        why = std::string("undecodable: ") + e.what();
        return false;
    }
    return true;
}

std::optional<query> parse_query(std::string_view payload, std::string& why) {
    query q;
    const bool ok = each_key(payload, why, [&](std::string_view k, const msgpack::object& v) {
        auto str = [&] { return v.type == msgpack::type::STR ? std::string(v.via.str.ptr, v.via.str.size) : std::string(); };
        if (k == "reply") {
            q.reply = str();
        } else if (k == "pattern") {
            auto p = topic_pattern::parse(str());
            if (!p) {
                why = "bad pattern";
                return false;
            }
            q.pattern = std::move(*p);
        } else if (k == "from") {
            q.from = str();
        } else if (k == "time") {
            q.time_ns = v.as<std::int64_t>();
        } else if (k == "id") {
            q.id = str();
        } else if (k == "n") {
            q.n = v.as<std::uint64_t>();
        } else if (k == "position") {
            q.position = v.as<std::uint64_t>();
        } else if (k == "history") {
            q.history = str();
        } else if (k == "limit") {
            q.limit = static_cast<std::size_t>(std::clamp<std::uint64_t>(v.as<std::uint64_t>(), 1, replay_max_page));
        }
        return true;
    });
    if (!ok) {
        return std::nullopt;
    }
    if (!q.reply.starts_with(replay_reply_prefix) || q.reply.size() > 200) {
        why = "reply must be a topic under _evmesh.replay.";
        return std::nullopt;
    }
    if (!topic_pattern::parse(q.reply)) {
        why = "reply is not a valid topic";
        return std::nullopt;
    }
    if (!q.pattern) {
        why = "pattern is required";
        return std::nullopt;
    }
    static constexpr std::array<std::string_view, 5> kinds = {"all", "time", "after_id", "last", "last_per_topic"};
    if (std::find(kinds.begin(), kinds.end(), q.from) == kinds.end()) {
        why = "from must be all, time, after_id, last or last_per_topic";
        return std::nullopt;
    }
    return q;
}

// UUIDv7: the first 48 bits are the Unix time in milliseconds.
std::optional<event_id> parse_uuid(std::string_view s) {
    event_id id{};
    std::size_t j = 0;
    for (std::size_t i = 0; i < s.size(); ++i) {
        if (s[i] == '-') {
            continue;
        }
        const char c = s[i];
        int v = c >= '0' && c <= '9' ? c - '0' : c >= 'a' && c <= 'f' ? c - 'a' + 10 : c >= 'A' && c <= 'F' ? c - 'A' + 10 : -1;
        if (v < 0 || j >= 32) {
            return std::nullopt;
        }
        id[j / 2] = static_cast<std::uint8_t>(id[j / 2] | (j % 2 == 0 ? v << 4 : v));
        ++j;
    }
    if (j != 32) {
        return std::nullopt;
    }
    return id;
}

std::int64_t uuid7_time_ns(const event_id& id) {
    std::uint64_t ms = 0;
    for (int i = 0; i < 6; ++i) {
        ms = (ms << 8) | id[static_cast<std::size_t>(i)];
    }
    // 48 bits of ms reach past what ns in an int64 can hold (year 2262): a hostile or non-v7 id
    // is clamped below that, with room for the +-1 minute search window
    constexpr std::uint64_t max_ms = static_cast<std::uint64_t>(INT64_MAX / 1000000) - 120000;
    return static_cast<std::int64_t>(std::min(ms, max_ms)) * 1000000;
}

// Whether an event body may carry `id`: false only when it has the usual layout (array, version
// 1, bin 16 id) and a different id there, so that a search by id decodes just the candidates.
bool frame_may_have_id(std::string_view body, const event_id& id) {
    if (body.size() < 20 || (static_cast<unsigned char>(body[0]) & 0xf0) != 0x90 || body[1] != 1 ||
        static_cast<unsigned char>(body[2]) != 0xc4 || body[3] != 16) {
        return true;
    }
    return std::memcmp(body.data() + 4, id.data(), 16) == 0;
}

// A consumer request (PROTOCOL.md 13.1).
struct consumer_request {
    std::string op;  // fetch | ack | nak | wip
    std::string history, consumer, reply;
    std::size_t batch = 100;
    std::chrono::milliseconds wait{0};
    std::vector<std::uint64_t> positions;
    consumer_config cfg;  // used when the consumer is created
};

bool valid_name(std::string_view n) {
    if (n.empty() || n.size() > 64) {
        return false;
    }
    return std::all_of(n.begin(), n.end(), [](char c) {
        return (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9') || c == '_' || c == '-';
    });
}

std::optional<consumer_request> parse_request(std::string_view payload, std::string& why) {
    consumer_request r;
    const bool ok = each_key(payload, why, [&](std::string_view k, const msgpack::object& v) {
        auto str = [&] { return v.type == msgpack::type::STR ? std::string(v.via.str.ptr, v.via.str.size) : std::string(); };
        if (k == "op") {
            r.op = str();
        } else if (k == "history") {
            r.history = str();
        } else if (k == "consumer") {
            r.consumer = str();
        } else if (k == "reply") {
            r.reply = str();
        } else if (k == "batch") {
            r.batch = static_cast<std::size_t>(std::clamp<std::uint64_t>(v.as<std::uint64_t>(), 1, replay_max_page));
        } else if (k == "wait_ms") {
            r.wait = std::chrono::milliseconds(std::min<std::uint64_t>(v.as<std::uint64_t>(), 60000));
        } else if (k == "positions") {
            if (v.type != msgpack::type::ARRAY || v.via.array.size > 100000) {
                why = "positions must be an array of at most 100000 uint";
                return false;
            }
            for (const auto& e : v.via.array) {
                r.positions.push_back(e.as<std::uint64_t>());
            }
        } else if (k == "filter") {
            r.cfg.filter_text = str();
        } else if (k == "ack_wait_ms") {
            r.cfg.ack_wait = std::chrono::milliseconds(std::clamp<std::uint64_t>(v.as<std::uint64_t>(), 100, 86400000));
        } else if (k == "max_deliver") {
            r.cfg.max_deliver = static_cast<std::uint32_t>(std::min<std::uint64_t>(v.as<std::uint64_t>(), 1000000));
        } else if (k == "dead_letter") {
            r.cfg.dead_letter = str();
        } else if (k == "start") {
            const auto st = str();
            if (st != "all" && st != "new") {
                why = "start must be all or new";
                return false;
            }
            r.cfg.from_new = st == "new";
        }
        return true;
    });
    if (!ok) {
        return std::nullopt;
    }
    if (r.op != "fetch" && r.op != "ack" && r.op != "nak" && r.op != "wip") {
        why = "op must be fetch, ack, nak or wip";
        return std::nullopt;
    }
    if (!valid_name(r.consumer)) {
        why = "consumer must be 1 to 64 of [A-Za-z0-9_-]";
        return std::nullopt;
    }
    if (r.history.empty()) {
        why = "history is required";
        return std::nullopt;
    }
    if (r.op == "fetch" && (!r.reply.starts_with(consumer_reply_prefix) || r.reply.size() > 200 ||
                            !topic_pattern::parse(r.reply))) {
        why = "reply must be a topic under _evmesh.pull.";
        return std::nullopt;
    }
    auto f = topic_pattern::parse(r.cfg.filter_text);
    if (!f) {
        why = "bad filter";
        return std::nullopt;
    }
    r.cfg.filter = std::move(*f);
    if (!r.cfg.dead_letter.empty()) {
        if (!topic_pattern::parse(r.cfg.dead_letter) || r.cfg.dead_letter.find_first_of("*>") != std::string::npos ||
            r.cfg.dead_letter.starts_with("_evmesh")) {
            why = "dead_letter must be a topic";
            return std::nullopt;
        }
    }
    r.cfg.name = r.consumer;
    return r;
}

}  // namespace

struct history_service::impl {
    struct one {
        history_options opt;
        std::unique_ptr<history_store> store;
        std::vector<topic_pattern> patterns;
        std::vector<subscription> subs;
        std::uint64_t queries = 0, served = 0;
        std::map<std::string, std::unique_ptr<consumer>, std::less<>> consumers;
        history_stats snap;

        // Where each stream's events are (repair beyond the window): a mark every 64 seqs of
        // a stream, (seq, position), so a NAK's range is found by a short scan. Memory: 16
        // bytes per 64 events; at most max_index_streams streams (beyond: a scan from the start).
        struct seq_mark {
            std::uint64_t seq, pos;
        };
        std::unordered_map<std::string, std::vector<seq_mark>, string_hash, std::equal_to<>> seq_index;
        std::vector<seq_mark>* last_marks = nullptr;  // the previous event's stream (skips the hash)
        std::string last_key, key;
        std::uint64_t repairs = 0, repaired = 0;
        std::uint64_t logged_write_errors = 0;  // write errors already in the log
        std::string logged_failure;
        std::chrono::steady_clock::time_point logged_at{};

        void index(std::string_view source, std::string_view topic, std::uint64_t seq, std::uint64_t pos) {
            if (seq == 0) {
                return;
            }
            const auto k = stream_key(key, source, topic);
            std::vector<seq_mark>* m = last_marks;
            if (m == nullptr || k != last_key) {
                auto it = seq_index.find(k);
                if (it == seq_index.end()) {
                    if (seq_index.size() >= max_index_streams) {
                        return;
                    }
                    it = seq_index.emplace(std::string(k), std::vector<seq_mark>{}).first;
                }
                m = &it->second;  // node-based map: stable
                last_marks = m;
                last_key.assign(k);
            }
            if (!m->empty() && seq < m->back().seq) {
                m->clear();  // the publisher numbers the stream afresh: only the new numbering counts
            }
            if (m->empty() || seq >= m->back().seq + 64) {
                m->push_back(seq_mark{seq, pos});
            }
        }

        // Drops marks of positions retention removed (keeping one at or before the first kept).
        void prune_index() {
            const auto first = store->first_pos();
            for (auto& [k, m] : seq_index) {
                std::size_t drop = 0;
                while (drop + 1 < m.size() && m[drop + 1].pos <= first) {
                    ++drop;
                }
                m.erase(m.begin(), m.begin() + static_cast<std::ptrdiff_t>(drop));
            }
        }
    };
    static constexpr std::size_t max_index_streams = 65536;
    static constexpr std::size_t max_repair_frames = 20000;     // per answer; the requester asks again
    static constexpr std::size_t max_repair_scan = 2000000;     // records visited per answer

    // NAKs handed over by the I/O thread (repair beyond the window)
    std::mutex repair_mu;
    std::deque<repair_request> repair_jobs;  // guarded by repair_mu
    int repair_fd = -1;
    history_service::repair_sink sink;
    void serve_repairs();
    void serve_repair(one& h, const repair_request& r);
    // A fetch that found nothing: answered when messages come or its wait ends.
    struct waiting_fetch {
        one* h;
        consumer* c;
        std::string reply;
        std::size_t batch;
        std::chrono::steady_clock::time_point deadline;
    };

    node& n;
    decode_limits limits;
    std::vector<std::unique_ptr<one>> hs;
    std::optional<subscription> queries;
    std::optional<subscription> requests;  // consumer requests (PROTOCOL.md 13)
    std::deque<waiting_fetch> waiting;
    std::uint64_t request_errors = 0;
    std::optional<publisher> answers;
    std::uint64_t query_errors = 0;
    int stop_fd = -1;
    std::thread thread;
    mutable std::mutex snap_mu;
    std::atomic<bool> stopping{false};

    explicit impl(node& nd) : n(nd), limits(nd.limits()) {}

    int max_hwm = 1;

    void run();
    void on_request(std::string_view topic, std::string_view payload);
    bool deliver(one& h, consumer& c, const std::string& reply, std::size_t batch, bool always_end);
    void pump();
    bool drain(std::size_t max);
    void take_snapshots();
    void answer(std::string_view topic, std::string_view payload);
    void serve(one& h, const query& q);
    void send_end(one& h, const query& q, std::uint64_t next, bool more, std::uint64_t count, std::string_view note);
};

std::unique_ptr<history_service> history_service::start(node& n, const std::vector<history_options>& opts,
                                                        std::string& error) {
    auto svc = std::make_unique<history_service>();
    svc->p = std::make_unique<impl>(n);
    auto& p = *svc->p;
    for (const auto& o : opts) {
        auto h = std::make_unique<impl::one>();
        h->opt = o;
        if (o.name.empty() || o.name.size() > 64 || o.name.find_first_of("/ \t\n") != std::string::npos) {
            error = "history: name must be 1 to 64 characters without '/' or whitespace";
            return nullptr;
        }
        for (const auto& q : p.hs) {
            if (q->opt.name == o.name) {
                error = "history '" + o.name + "': the name is used twice";
                return nullptr;
            }
        }
        if (o.patterns.empty()) {
            error = "history '" + o.name + "': patterns must not be empty";
            return nullptr;
        }
        for (const auto& pat : o.patterns) {
            auto tp = topic_pattern::parse(pat);
            if (!tp || pat.starts_with("_evmesh")) {
                error = "history '" + o.name + "': bad pattern '" + pat + "'";
                return nullptr;
            }
            h->patterns.push_back(std::move(*tp));
        }
        store_options so;
        so.dir = o.dir;
        so.max_bytes = o.max_bytes;
        so.max_age = o.max_age;
        so.max_events = o.max_events;
        so.segment_bytes = o.segment_bytes;
        so.fsync_interval = o.fsync_interval;
        std::string err;
        h->store = history_store::open(so, err);
        if (!h->store) {
            error = "history '" + o.name + "': " + err;
            return nullptr;
        }
        for (const auto& d : p.hs) {
            if (d->store->options().dir == so.dir) {
                error = "history '" + o.name + "': dir is used by history '" + d->opt.name + "' too";
                return nullptr;
            }
        }
        for (const auto& pat : o.patterns) {
            auto s = n.subscribe(pat, subscription_options{.hwm = std::max(o.hwm, 1)});
            if (!s) {
                error = "history '" + o.name + "': subscribe " + pat + ": " + s.error().message();
                return nullptr;
            }
            h->subs.push_back(std::move(*s));
        }
        p.max_hwm = std::max(p.max_hwm, o.hwm);
        p.hs.push_back(std::move(h));
    }
    if (p.hs.empty()) {
        return svc;
    }
    auto qs = n.subscribe(std::string(history_query_prefix) + ">");
    auto pub = n.make_publisher({.name = "history", .policy = overflow_policy::block,
                                 .block_timeout = std::chrono::milliseconds(2000)});
    if (!qs || !pub) {
        error = "history: cannot subscribe to queries or create the answering publisher";
        return nullptr;
    }
    auto rs = n.subscribe(std::string(consumer_request_prefix) + ">");
    if (!rs) {
        error = "history: cannot subscribe to consumer requests";
        return nullptr;
    }
    p.requests.emplace(std::move(*rs));
    p.queries.emplace(std::move(*qs));
    p.answers.emplace(std::move(*pub));
    // the durable consumers kept in each history's directory
    for (auto& h : p.hs) {
        std::error_code ec;
        for (const auto& e : std::filesystem::directory_iterator(h->opt.dir, ec)) {
            const auto fname = e.path().filename().string();
            if (!fname.starts_with("consumer-") || !fname.ends_with(".state")) {
                continue;
            }
            consumer_config cfg;
            cfg.name = fname.substr(9, fname.size() - 9 - 6);
            if (!valid_name(cfg.name)) {
                continue;
            }
            std::string err;
            auto c = consumer::open(*h->store, h->opt.dir, cfg, err);
            if (!c) {
                error = "history '" + h->opt.name + "': " + err;
                return nullptr;
            }
            h->consumers.emplace(cfg.name, std::move(c));
        }
    }
    p.stop_fd = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
    p.repair_fd = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
    for (const auto& h : p.hs) {  // before the thread starts: from then on it alone touches the stores
        const auto st = h->store->stats();
        log()->info("evmesh: history '{}' ({}) in {}: {} events, {} bytes in {} segments{}", h->opt.name,
                    fmt::join(h->opt.patterns, ", "), h->opt.dir, st.events, st.bytes, st.segments,
                    st.truncated_bytes > 0 ? fmt::format(" ({} damaged bytes cut)", st.truncated_bytes) : "");
    }
    p.take_snapshots();
    p.thread = std::thread([&p] { p.run(); });
    return svc;
}

history_service::~history_service() { stop(); }

void history_service::stop() {
    if (!p) {
        return;
    }
    if (p->thread.joinable()) {
        p->stopping = true;
        const std::uint64_t one = 1;
        (void)!write(p->stop_fd, &one, sizeof(one));
        p->thread.join();
    }
    if (p->stop_fd >= 0) {
        ::close(p->stop_fd);
        p->stop_fd = -1;
    }
    if (p->repair_fd >= 0) {
        std::lock_guard lk(p->repair_mu);
        ::close(p->repair_fd);
        p->repair_fd = -1;
        p->repair_jobs.clear();
    }
    for (auto& h : p->hs) {
        h->subs.clear();
        if (h->store) {
            h->store->flush();
        }
        for (auto& [name, c] : h->consumers) {
            c->save(true);
        }
    }
    p->queries.reset();
    p->requests.reset();
    p->answers.reset();
}

std::vector<history_stats> history_service::stats() const {
    std::lock_guard lk(p->snap_mu);
    std::vector<history_stats> out;
    for (const auto& h : p->hs) {
        out.push_back(h->snap);
    }
    return out;
}

void history_service::impl::take_snapshots() {
    std::lock_guard lk(snap_mu);
    for (auto& h : hs) {
        const auto st = h->store->stats();
        auto& s = h->snap;
        s.name = h->opt.name;
        s.patterns = h->opt.patterns;
        s.dir = h->opt.dir;
        s.events = st.events;
        s.bytes = st.bytes;
        s.segments = st.segments;
        s.first_pos = st.first_pos;
        s.next_pos = st.next_pos;
        s.oldest_time_ns = st.oldest_time_ns;
        s.newest_time_ns = st.newest_time_ns;
        s.max_bytes = h->opt.max_bytes;
        s.max_events = h->opt.max_events;
        s.max_age_s = h->opt.max_age.count();
        s.appended = st.appended;
        s.expired = st.expired;
        s.write_errors = st.write_errors;
        s.dropped = st.dropped;
        s.truncated_bytes = st.truncated_bytes;
        s.gaps = 0;
        for (const auto& sub : h->subs) {
            s.gaps += sub.counters().gaps;
        }
        s.queries = h->queries;
        s.served = h->served;
        s.query_errors = query_errors + request_errors;
        s.repairs = h->repairs;
        s.repaired = h->repaired;
        s.error = st.error;
        s.consumers.clear();
        const auto now = std::chrono::steady_clock::now();
        for (const auto& [name, c] : h->consumers) {
            s.consumers.push_back(c->stats(now));
        }
    }
}

// Appends what the history subscriptions hold, up to `max` events per subscription.
bool history_service::impl::drain(std::size_t max) {
    bool got = false;
    for (auto& h : hs) {
        for (std::size_t k = 0; k < h->subs.size(); ++k) {
            auto& s = h->subs[k];
            for (std::size_t i = 0; i < max; ++i) {
                std::string_view topic, source;
                std::int64_t time_ns = 0;
                std::uint64_t seq = 0;
                const int r = subscription_access::take_raw(s, topic, time_ns, source, seq);
                if (r == 0) {
                    break;
                }
                got = true;
                if (r < 0) {
                    continue;
                }
                // an event that an earlier pattern of the same history also matches arrived
                // there as well: store it once
                bool dup = false;
                for (std::size_t j = 0; j < k && !dup; ++j) {
                    dup = h->patterns[j].matches(topic);
                }
                if (!dup) {
                    h->index(source, topic, seq, h->store->append_pos());
                    h->store->append(time_ns, subscription_access::frame(s));
                }
            }
        }
    }
    return got;
}

void history_service::impl::run() {
    std::vector<zmq_pollitem_t> items;
    for (auto& h : hs) {
        for (auto& s : h->subs) {
            items.push_back({subscription_access::socket(s), 0, ZMQ_POLLIN, 0});
        }
    }
    items.push_back({subscription_access::socket(*queries), 0, ZMQ_POLLIN, 0});
    items.push_back({subscription_access::socket(*requests), 0, ZMQ_POLLIN, 0});
    items.push_back({nullptr, stop_fd, ZMQ_POLLIN, 0});
    items.push_back({nullptr, repair_fd, ZMQ_POLLIN, 0});
    auto last_maint = std::chrono::steady_clock::now();
    auto last_prune = last_maint;
    bool unflushed = false;
    auto first_unflushed = std::chrono::steady_clock::now();
    while (!stopping) {
        // a short wait while records wait in the buffer: they are written within ~5 ms
        bool consumers_busy = !waiting.empty();
        for (const auto& h : hs) {
            for (const auto& [name, c] : h->consumers) {
                consumers_busy = consumers_busy || c->has_pending();
            }
        }
        const int rc = zmq_poll(items.data(), static_cast<int>(items.size()), unflushed ? 5 : consumers_busy ? 10 : 500);
        if (rc < 0 && zmq_errno() != EINTR) {
            break;
        }
        const bool got = drain(1024);
        // written when the input pauses, and at least every 5 ms under a steady stream (an
        // event flushed is safe from a crash of the process: PROTOCOL.md 12, HISTORY.md)
        const auto now_flush = std::chrono::steady_clock::now();
        if (got && !unflushed) {
            first_unflushed = now_flush;
        }
        unflushed = unflushed || got;
        if (unflushed && (!got || now_flush - first_unflushed >= std::chrono::milliseconds(5))) {
            for (auto& h : hs) {
                h->store->flush();
            }
            unflushed = false;
        }
        for (int i = 0; i < 64; ++i) {
            auto q = queries->receive_view(std::chrono::milliseconds(0));
            if (!q) {
                break;
            }
            answer(q->topic, q->payload);
        }
        for (int i = 0; i < 256; ++i) {
            auto q = requests->receive_view(std::chrono::milliseconds(0));
            if (!q) {
                break;
            }
            on_request(q->topic, q->payload);
        }
        serve_repairs();
        pump();
        const auto now = std::chrono::steady_clock::now();
        if (now - last_maint >= std::chrono::milliseconds(200)) {
            last_maint = now;
            for (auto& h : hs) {
                h->store->maintain(now_ns());
                // every failed write is logged, even when a later one succeeded before this check
                // (a full disk may take one small batch after a cut): a new cause at once, the
                // same cause again at most every 10 s
                const auto st = h->store->stats();
                if (st.write_errors > h->logged_write_errors &&
                    (st.last_failure != h->logged_failure || now - h->logged_at >= std::chrono::seconds(10))) {
                    log()->error("evmesh: history '{}': {} ({} failed writes, {} events dropped so far)", h->opt.name,
                                 st.last_failure, st.write_errors, st.dropped);
                    h->logged_write_errors = st.write_errors;
                    h->logged_failure = st.last_failure;
                    h->logged_at = now;
                }
            }
            take_snapshots();
        }
        if (now - last_prune >= std::chrono::seconds(5)) {
            last_prune = now;
            for (auto& h : hs) {
                h->prune_index();
            }
        }
    }
    for (auto& h : hs) {
        h->store->flush();
    }
    take_snapshots();
}

void history_service::set_repair_sink(repair_sink s) {
    if (p) {
        std::lock_guard lk(p->repair_mu);
        p->sink = std::move(s);
    }
}

void history_service::repair(repair_request r) {
    if (!p) {
        return;
    }
    {
        std::lock_guard lk(p->repair_mu);
        if (p->repair_fd < 0) {
            return;
        }
        // the requester asks again every nak_interval while no answer came: one job per range
        for (const auto& j : p->repair_jobs) {
            if (j.requester == r.requester && j.source == r.source && j.topic == r.topic && j.from == r.from) {
                return;
            }
        }
        if (p->repair_jobs.size() >= 4096) {
            return;  // bounded; the requester asks again
        }
        p->repair_jobs.push_back(std::move(r));
        const std::uint64_t one = 1;
        (void)!write(p->repair_fd, &one, sizeof(one));
    }
}

void history_service::impl::serve_repairs() {
    std::uint64_t v = 0;
    (void)!read(repair_fd, &v, sizeof(v));
    for (int i = 0; i < 64; ++i) {
        repair_request r;
        {
            std::lock_guard lk(repair_mu);
            if (repair_jobs.empty()) {
                return;
            }
            r = std::move(repair_jobs.front());
            repair_jobs.pop_front();
        }
        drain(static_cast<std::size_t>(max_hwm));  // what reached the node is stored first
        for (auto& h : hs) {
            if (std::any_of(h->patterns.begin(), h->patterns.end(), [&](const topic_pattern& tp) { return tp.matches(r.topic); })) {
                serve_repair(*h, r);
                break;  // one history answers
            }
        }
    }
    const std::uint64_t more = 1;  // more to do: come back on the next turn
    (void)!write(repair_fd, &more, sizeof(more));
}

// Answers a NAK from disk: the stored frames of [from, to] of the stream (at or after `since`),
// in seq order, then the fill. What the history does not hold is not sent, and the fill says so:
// the requester reports it lost (or skips it as older than its subscription, with `since`).
void history_service::impl::serve_repair(one& h, const repair_request& r) {
    ++h.repairs;
    std::uint64_t start = h.store->first_pos();
    std::string kbuf;
    if (auto it = h.seq_index.find(stream_key(kbuf, r.source, r.topic)); it != h.seq_index.end() && !it->second.empty()) {
        const auto& m = it->second;
        auto ub = std::upper_bound(m.begin(), m.end(), r.from,
                                   [](std::uint64_t s, const one::seq_mark& x) { return s < x.seq; });
        start = std::max(start, ub == m.begin() ? m.front().pos : std::prev(ub)->pos);
    }
    const std::string prefix = "_evmesh.rtx." + r.requester + std::string(1, '\0');
    std::vector<std::string> frames;
    std::uint64_t first_sent = 0, last_sent = 0;
    h.store->scan(start, max_repair_scan, [&](const stored_record& rec) {
        const auto topic = frame_topic(rec.frame);
        if (topic != r.topic) {
            return true;
        }
        std::string_view source;
        std::int64_t t = 0;
        std::uint64_t seq = 0;
        if (!codec::peek_stream(rec.frame.substr(topic.size() + 1), source, t, seq) || source != r.source ||
            seq < r.from) {
            return true;
        }
        if (seq > r.to) {
            return false;
        }
        if (r.since_ns != 0 && t < r.since_ns) {
            return true;
        }
        std::string f;
        f.reserve(prefix.size() + rec.frame.size());
        f.append(prefix).append(rec.frame);
        frames.push_back(std::move(f));
        if (first_sent == 0) {
            first_sent = seq;
        }
        last_sent = seq;
        return frames.size() < max_repair_frames;
    });
    h.repaired += frames.size();
    if (frames.size() < max_repair_frames) {
        last_sent = r.to;  // all of [from, to] it holds was sent (the rest is not here)
    }
    if (first_sent == 0) {
        first_sent = r.to + 1;
    }
    if (sink) {
        sink(r, std::move(frames), last_sent, first_sent, 0);
    }
}

void history_service::impl::answer(std::string_view topic, std::string_view payload) {
    // `.all`, or this node's id; a continuation for another node passes by
    const auto target = topic.substr(history_query_prefix.size());
    if (target != "all" && target != n.id()) {
        return;
    }
    std::string why;
    auto q = parse_query(payload, why);
    if (!q) {
        ++query_errors;
        log()->warn("evmesh: history: replay query refused: {}", why);
        return;
    }
    // Everything that reached this node before the query is stored before it is answered: the
    // I/O thread handed those events to the history's queue before the query's (one thread, in
    // order), so a replayer whose live subscription was in effect here before its query gets
    // every event from the history or live (PROTOCOL.md 12.3). Bounded by what the queues hold.
    drain(static_cast<std::size_t>(max_hwm));
    for (auto& h : hs) {
        if (!q->history.empty() && q->history != h->opt.name) {
            continue;
        }
        ++h->queries;
        serve(*h, *q);
    }
}

void history_service::impl::on_request(std::string_view topic, std::string_view payload) {
    const auto target = topic.substr(consumer_request_prefix.size());
    if (target != "all" && target != n.id()) {
        return;
    }
    std::string why;
    auto r = parse_request(payload, why);
    if (!r) {
        ++request_errors;
        log()->warn("evmesh: history: consumer request refused: {}", why);
        return;
    }
    one* h = nullptr;
    for (auto& x : hs) {
        h = x->opt.name == r->history ? x.get() : h;
    }
    if (h == nullptr) {
        return;  // another node's history
    }
    auto it = h->consumers.find(r->consumer);
    if (it == h->consumers.end()) {
        if (r->op != "fetch") {
            return;
        }
        // a dead letter that the history stores and the filter matches would come back as work
        const auto& dl = r->cfg.dead_letter;
        if (!dl.empty() && r->cfg.filter->matches(dl) &&
            std::any_of(h->patterns.begin(), h->patterns.end(), [&](const auto& pt) { return pt.matches(dl); })) {
            ++request_errors;
            log()->warn("evmesh: history '{}': consumer '{}' refused: its dead_letter topic {} is stored by the "
                        "history and matches its filter", h->opt.name, r->consumer, dl);
            return;
        }
        std::string err;
        auto c = consumer::open(*h->store, h->opt.dir, r->cfg, err);
        if (!c) {
            ++request_errors;
            log()->warn("evmesh: history '{}': consumer '{}': {}", h->opt.name, r->consumer, err);
            return;
        }
        log()->info("evmesh: history '{}': consumer '{}' created (filter {}, ack wait {} ms, max deliver {})",
                    h->opt.name, r->consumer, r->cfg.filter_text, r->cfg.ack_wait.count(), r->cfg.max_deliver);
        it = h->consumers.emplace(r->consumer, std::move(c)).first;
    }
    auto& c = *it->second;
    const auto now = std::chrono::steady_clock::now();
    if (r->op == "fetch") {
        drain(static_cast<std::size_t>(max_hwm));  // what reached the node is there to fetch
        if (!deliver(*h, c, r->reply, r->batch, r->wait.count() == 0) && r->wait.count() > 0) {
            waiting.push_back({h, &c, r->reply, r->batch, now + r->wait});
        }
        return;
    }
    for (const auto pos : r->positions) {
        if (r->op == "ack") {
            c.ack(pos);
        } else if (r->op == "nak") {
            c.nak(pos);
        } else {
            c.in_progress(pos, now);
        }
    }
}

// Sends up to `batch` messages and the end event. When there is nothing: false, and the end event
// (count 0) only if `always_end`.
bool history_service::impl::deliver(one& h, consumer& c, const std::string& reply, std::size_t batch,
                                    bool always_end) {
    const auto now = std::chrono::steady_clock::now();
    auto msgs = c.take(batch, now, reply);
    const std::string origin = n.id() + "/" + h.opt.name;
    for (auto& m : msgs) {
        event ev;
        ev.topic = reply;
        ev.content_type = std::string(replay_frame_type);
        ev.headers = {{"evmesh-history", origin},
                      {"evmesh-consumer", c.config().name},
                      {"evmesh-pos", std::to_string(m.pos)},
                      {"evmesh-deliveries", std::to_string(m.deliveries)}};
        ev.payload = std::move(m.frame);
        (void)answers->publish(ev);  // not received: the ack wait brings it back
    }
    const bool any = !msgs.empty();
    msgpack::sbuffer buf;
    msgpack::packer<msgpack::sbuffer> pk(buf);
    const auto st = c.stats(now);
    pk.pack_map(7);
    pk.pack("node");
    pk.pack(n.id());
    pk.pack("history");
    pk.pack(h.opt.name);
    pk.pack("consumer");
    pk.pack(c.config().name);
    pk.pack("count");
    pk.pack(static_cast<std::uint64_t>(msgs.size()));
    pk.pack("pending");
    pk.pack(st.pending);
    pk.pack("lag");
    pk.pack(st.lag);
    pk.pack("ack_floor");
    pk.pack(st.ack_floor);
    if (!any && !always_end) {
        return false;
    }
    event end;
    end.topic = reply;
    end.content_type = std::string(fetch_end_type);
    end.payload.assign(buf.data(), buf.size());
    (void)answers->publish(end);
    return any;
}

// Ack deadlines, dead letters, waiting fetches, saving state.
void history_service::impl::pump() {
    const auto now = std::chrono::steady_clock::now();
    for (auto& h : hs) {
        for (auto& entry : h->consumers) {
            // plain references: a lambda may not capture structured bindings (clang, C++20)
            const std::string& name = entry.first;
            auto& c = entry.second;
            c->expire(now, [&](std::uint64_t pos, const std::string& frame, std::uint32_t deliveries) {
                const auto& dl = c->config().dead_letter;
                log()->warn("evmesh: history '{}': consumer '{}': position {} dead-lettered after {} deliveries{}",
                            h->opt.name, name, pos, deliveries, dl.empty() ? " (no dead_letter topic: dropped)" : "");
                if (dl.empty()) {
                    return;
                }
                event ev;
                ev.topic = dl;
                ev.content_type = std::string(replay_frame_type);
                ev.headers = {{"evmesh-history", n.id() + "/" + h->opt.name},
                              {"evmesh-consumer", name},
                              {"evmesh-pos", std::to_string(pos)},
                              {"evmesh-deliveries", std::to_string(deliveries)}};
                ev.payload = frame;
                (void)answers->publish(ev);
            });
        }
    }
    for (std::size_t i = 0; i < waiting.size();) {
        auto& w = waiting[i];
        bool done = false;
        if (w.c->ready()) {
            done = deliver(*w.h, *w.c, w.reply, w.batch, false);
        }
        if (!done && now >= w.deadline) {
            // nothing came: an empty answer, so the fetcher need not wait for its own timeout
            (void)deliver(*w.h, *w.c, w.reply, w.batch, true);
            done = true;
        }
        if (done) {
            waiting.erase(waiting.begin() + static_cast<std::ptrdiff_t>(i));
        } else {
            ++i;
        }
    }
    for (auto& h : hs) {
        for (auto& [name, c] : h->consumers) {
            c->save(false);
        }
    }
}

void history_service::impl::send_end(one& h, const query& q, std::uint64_t next, bool more, std::uint64_t count,
                                     std::string_view note) {
    msgpack::sbuffer buf;
    msgpack::packer<msgpack::sbuffer> pk(buf);
    pk.pack_map(note.empty() ? 6 : 7);
    pk.pack("node");
    pk.pack(n.id());
    pk.pack("history");
    pk.pack(h.opt.name);
    pk.pack("next");
    pk.pack(next);
    pk.pack("more");
    pk.pack(more);
    pk.pack("count");
    pk.pack(count);
    pk.pack("head");
    pk.pack(h.store->next_pos());
    if (!note.empty()) {
        pk.pack("note");
        pk.pack(std::string(note));
    }
    event ev;
    ev.topic = q.reply;
    ev.content_type = std::string(replay_end_type);
    ev.payload.assign(buf.data(), buf.size());
    (void)answers->publish(ev);
}

void history_service::impl::serve(one& h, const query& q) {
    auto& st = *h.store;
    st.flush();
    std::uint64_t start = st.first_pos();
    std::string note;
    std::int64_t min_time = q.from == "time" ? q.time_ns : INT64_MIN;
    const std::string origin = n.id() + "/" + h.opt.name;
    std::uint64_t count = 0;
    bool aborted = false;
    auto publish = [&](std::uint64_t pos, std::string_view frame) {
        event ev;
        ev.topic = q.reply;
        ev.content_type = std::string(replay_frame_type);
        ev.headers = {{"evmesh-history", origin}, {"evmesh-pos", std::to_string(pos)}};
        ev.payload.assign(frame);
        if (!answers->publish(ev)) {
            aborted = true;  // the requester does not read (block timeout): it asks again
            return false;
        }
        ++count;
        ++h.served;
        return true;
    };

    if (q.from == "last_per_topic") {
        // the newest record of each matching topic, in position order, from `position` on
        const auto positions = st.last_per_topic();
        const std::uint64_t from = q.position.value_or(0);
        std::string frame;
        std::int64_t t = 0;
        std::uint64_t next = from;
        std::size_t i = static_cast<std::size_t>(std::lower_bound(positions.begin(), positions.end(), from) - positions.begin());
        for (; i < positions.size() && count < q.limit; ++i) {
            next = positions[i] + 1;
            if (!st.read(positions[i], frame, t) || !q.pattern->matches(frame_topic(frame))) {
                continue;
            }
            if (!publish(positions[i], frame)) {
                return;
            }
        }
        send_end(h, q, next, i < positions.size(), count, note);
        return;
    }

    if (q.position) {
        start = *q.position;
    } else if (q.from == "time") {
        start = st.seek_time(q.time_ns);
    } else if (q.from == "after_id") {
        auto id = parse_uuid(q.id);
        if (!id) {
            ++query_errors;
            send_end(h, q, st.next_pos(), false, 0, "bad id");
            return;
        }
        // A UUIDv7 (what evmesh writers generate) carries its time, which bounds where the event
        // can be: look from a minute before it to a minute after. Any other id (a client's
        // UUIDv4, say) may be anywhere: look through the whole history.
        const bool v7 = ((*id)[6] >> 4) == 7;
        const auto t = v7 ? uuid7_time_ns(*id) : 0;
        start = v7 ? st.seek_time(t - 60'000'000'000LL) : st.first_pos();
        bool found = false;
        std::uint64_t at = start;
        st.scan(start, SIZE_MAX, [&](const stored_record& r) {
            if (v7 && r.time_ns > t + 60'000'000'000LL) {
                return false;  // past the id's minute: not here
            }
            std::string_view topic = frame_topic(r.frame);
            const auto body = r.frame.substr(std::min(r.frame.size(), topic.size() + 1));
            if (!frame_may_have_id(body, *id)) {
                return true;
            }
            auto v = decode_event(topic, body, limits);
            if (v && v->id == *id) {
                found = true;
                at = r.pos + 1;
                return false;
            }
            return true;
        });
        if (found) {
            start = at;
        } else if (v7) {
            // not (or no longer) kept: from the id's time on, and say so
            start = st.seek_time(t);
            min_time = t;
            note = "id not found: from its time";
        } else {
            start = st.next_pos();  // no time to start from: only what comes next
            note = "id not found: not a UUIDv7, so no time to start from";
        }
    } else if (q.from == "last") {
        // the last n matching records: walk back segment by segment
        std::vector<std::uint64_t> found;
        std::uint64_t seg_end = st.next_pos();
        const auto first = st.first_pos();
        std::uint64_t step = 4096;
        while (found.size() < q.n && seg_end > first) {
            const std::uint64_t seg_start = seg_end > first + step ? seg_end - step : first;
            std::vector<std::uint64_t> chunk;
            st.scan(seg_start, static_cast<std::size_t>(seg_end - seg_start), [&](const stored_record& r) {
                if (q.pattern->matches(frame_topic(r.frame))) {
                    chunk.push_back(r.pos);
                }
                return true;
            });
            found.insert(found.begin(), chunk.begin(), chunk.end());
            seg_end = seg_start;
            step *= 2;
        }
        start = found.size() > q.n ? found[found.size() - q.n] : (found.empty() ? st.next_pos() : found.front());
    }

    // a page: up to `limit` matching records, visiting at most 64 pages' worth of records
    std::uint64_t next = st.scan(start, q.limit * 64, [&](const stored_record& r) {
        if (r.time_ns < min_time || !q.pattern->matches(frame_topic(r.frame))) {
            return true;
        }
        return publish(r.pos, r.frame) && count < q.limit;
    });
    if (aborted) {
        return;
    }
    next = std::max(next, start);
    send_end(h, q, next, next < st.next_pos(), count, note);
}

}  // namespace evmesh::detail
