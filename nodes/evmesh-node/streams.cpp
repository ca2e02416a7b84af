#include "streams.hpp"

#include "inspector.hpp"  // msgpack_to_json: the stats decoder of mesh-inspector

#include <algorithm>
#include <atomic>
#include <condition_variable>
#include <cstring>
#include <deque>
#include <map>
#include <mutex>
#include <set>
#include <sstream>
#include <thread>
#include <unordered_map>
#include <unordered_set>

#include <nlohmann/json.hpp>
#include <spdlog/spdlog.h>

#include <evmesh/codec.hpp>
#include <evmesh/replay.hpp>

#include "ce_render.hpp"  // the same CloudEvents JSON as webhooks and the registry

namespace evmesh::app {

using json = nlohmann::json;

namespace {

std::vector<std::string> segments(const std::string& s) {
    std::vector<std::string> out;
    std::size_t pos = 0;
    while (true) {
        const auto dot = s.find('.', pos);
        out.push_back(s.substr(pos, dot == std::string::npos ? std::string::npos : dot - pos));
        if (dot == std::string::npos) {
            return out;
        }
        pos = dot + 1;
    }
}

// The node subscription that covers `pattern` (one per first segment; ">" for a leading wildcard).
std::string covering(const std::string& pattern) {
    const auto dot = pattern.find('.');
    const std::string first = pattern.substr(0, dot);
    if (first == "*" || first == ">") {
        return ">";
    }
    if (first == "_evmesh" && dot != std::string::npos) {
        // the mesh's own namespace: cover `_evmesh.stats.>` only, so a dashboard watching stats
        // does not also pull every peer's pings and repair traffic
        const auto dot2 = pattern.find('.', dot + 1);
        const std::string second = pattern.substr(dot + 1, dot2 == std::string::npos ? std::string::npos : dot2 - dot - 1);
        if (second != "*" && second != ">") {
            return "_evmesh." + second + (dot2 == std::string::npos ? "" : ".>");
        }
    }
    return dot == std::string::npos ? first : first + ".>";
}

// A stats event (PROTOCOL.md 10.2) as a CloudEvent whose `data` is the decoded payload: the
// decoder of mesh-inspector, so the dashboard and the inspector read the same thing.
std::string render_stats_json(const event& ev) {
    json data;
    try {
        data = inspector::msgpack_to_json(ev.payload);
    } catch (const std::exception& e) {
        data = {{"error", std::string("undecodable stats payload: ") + e.what()}};
    }
    json out = {{"specversion", "1.0"},
                {"id", to_string(ev.id)},
                {"source", ev.source},
                {"type", ev.topic},
                {"datacontenttype", "application/json"},
                {"seq", ev.seq},
                {"data", std::move(data)}};
    return out.dump(-1, ' ', false, json::error_handler_t::replace);
}

}  // namespace

bool pattern_within(const std::string& pattern, const std::string& scope) {
    const auto p = segments(pattern);
    const auto s = segments(scope);
    for (std::size_t i = 0; i < s.size(); ++i) {
        if (s[i] == ">") {
            // covers one or more further segments; `_evmesh.` topics only with a literal first segment
            return i < p.size() && !(i == 0 && p[0] == "_evmesh");
        }
        if (i >= p.size()) {
            return false;
        }
        if (p[i] == ">") {
            return false;  // the pattern reaches further than this scope segment allows
        }
        if (s[i] == "*") {
            if (i == 0 && p[0] == "_evmesh") {
                return false;
            }
            continue;
        }
        if (p[i] == "*" || p[i] != s[i]) {
            return false;
        }
    }
    return p.size() == s.size();
}

struct stream_hub::impl : std::enable_shared_from_this<stream_hub::impl> {
    node& n;
    stream_options o;
    impl(node& nd, stream_options opt) : n(nd), o(std::move(opt)) {}

    struct entry {
        std::uint64_t idx;
        std::string id, topic, source;
        std::uint64_t seq = 0;
        std::shared_ptr<const std::string> json_text, binary, sse;  // rendered once, shared by every client
    };

    struct client {
        std::uint64_t id = 0;
        std::shared_ptr<live_conn> conn;
        std::vector<topic_pattern> patterns;
        std::vector<std::string> scopes;  // subscribe:<pattern> of its key; empty + open = everything
        bool open_access = false;
        bool binary = false;
        std::string key_id, remote_kind;
        std::uint64_t sent = 0, skipped = 0, pending_gap = 0, gaps = 0;
        std::int64_t connected_ms = 0;
        std::uint64_t last_idx = 0;  // the last event delivered: once per event, however many patterns match
        // Resumed from the durable histories: its replays (one per pattern, each switching to live
        // by itself) and, for every stream it received, the last seq: an event that two of its
        // replays (or a replay and the hub) both carry is delivered once.
        std::vector<std::pair<std::string, std::shared_ptr<replay_subscription>>> replays;
        std::unordered_map<std::string, std::uint64_t> stream_seq;
        bool dedup = false;
    };

    // For a client that is resumed from history: false when this event's stream already went past it.
    static bool fresh(client& c, const entry& e) {
        if (!c.dedup || e.seq == 0) {
            return true;
        }
        std::string k = e.source;
        k.push_back('\0');
        k += e.topic;
        auto [it, added] = c.stream_seq.try_emplace(std::move(k), e.seq);
        if (added) {
            return true;
        }
        if (e.seq <= it->second) {
            return false;
        }
        it->second = e.seq;
        return true;
    }

    // Clients by pattern (under m): an event is matched against each distinct pattern once, not
    // against every client's (10,000 clients on a few patterns: a few matches per event).
    struct group {
        topic_pattern pattern;
        std::unordered_set<client*> members;
    };
    std::unordered_map<std::string, group> by_pattern;

    void index_add(client* c, const topic_pattern& p) {
        auto it = by_pattern.find(p.text());
        if (it == by_pattern.end()) {
            it = by_pattern.emplace(p.text(), group{p, {}}).first;
        }
        it->second.members.insert(c);
    }

    void index_remove(client* c, const std::string& text) {
        if (auto it = by_pattern.find(text); it != by_pattern.end()) {
            it->second.members.erase(c);
            if (it->second.members.empty()) {
                by_pattern.erase(it);
            }
        }
    }

    mutable std::mutex m;
    std::deque<entry> ring;
    std::unordered_map<std::string, std::uint64_t> ring_index;  // event id -> idx
    std::uint64_t next_idx = 1;
    std::map<std::uint64_t, std::shared_ptr<client>> clients;
    std::uint64_t next_client = 1;
    bool stopped = false;

    // counters (under m)
    std::uint64_t c_sent = 0, c_skipped = 0, c_gaps = 0, c_slow_disconnects = 0, c_resumed = 0, c_resume_gaps = 0,
                  c_history_resumes = 0, c_history_events = 0, c_resume_time_gaps = 0,
                  c_refused = 0, c_opened = 0;

    // node subscriptions: covering pattern -> (refcount, subscription)
    std::mutex subs_m;
    std::map<std::string, std::pair<int, subscription>> subs;

    std::thread heartbeat;
    std::condition_variable hb_cv;
    std::mutex hb_m;
    bool hb_stop = false;

    bool acquire(const std::vector<std::string>& patterns, std::string& error) {
        std::set<std::string> cover;
        for (const auto& p : patterns) {
            cover.insert(covering(p));
        }
        std::lock_guard lk(subs_m);
        for (const auto& c : cover) {
            if (auto it = subs.find(c); it != subs.end()) {
                ++it->second.first;
                continue;
            }
            std::weak_ptr<impl> weak = weak_from_this();
            auto sub = n.subscribe(c, [weak](const event_view& v) {
                if (auto self = weak.lock()) {
                    self->on_event(v);
                }
            });
            if (!sub) {
                error = "cannot subscribe to '" + c + "': " + sub.error().message();
                return false;
            }
            subs.emplace(c, std::make_pair(1, std::move(*sub)));
        }
        return true;
    }

    void release(const std::vector<std::string>& patterns) {
        std::set<std::string> cover;
        for (const auto& p : patterns) {
            cover.insert(covering(p));
        }
        std::vector<subscription> closing;
        {
            std::lock_guard lk(subs_m);
            for (const auto& c : cover) {
                if (auto it = subs.find(c); it != subs.end() && --it->second.first == 0) {
                    closing.push_back(std::move(it->second.second));
                    subs.erase(it);
                }
            }
        }
    }

    static bool matches(const client& c, const std::string& topic) {
        return std::any_of(c.patterns.begin(), c.patterns.end(), [&](const auto& p) { return p.matches(topic); });
    }

    static const std::shared_ptr<const std::string>& frame(const client& c, const entry& e) {
        if (c.conn->websocket()) {
            return c.binary ? e.binary : e.json_text;
        }
        return e.sse;
    }

    std::string control(const client& c, const json& j) const {
        if (c.conn->websocket()) {
            return j.dump();
        }
        return "event: " + j.value("control", std::string("notice")) + "\ndata: " + j.dump() + "\n\n";
    }

    // Sends one event to one client, or counts it skipped (under m).
    void deliver(client& c, const entry& e, std::vector<std::uint64_t>& drop) {
        const auto bytes = frame(c, e)->size();
        if (c.conn->queued_bytes() + bytes > o.queue_bytes) {
            if (o.disconnect_slow) {
                drop.push_back(c.id);
                ++c_slow_disconnects;
                return;
            }
            ++c.pending_gap;
            ++c.skipped;
            ++c_skipped;
            return;
        }
        if (c.pending_gap > 0) {
            // the client caught up: say what it missed before the next event
            const json gap = {{"control", "gap"}, {"missed", c.pending_gap}, {"reason", "slow_client"},
                              {"next_event_id", e.id}};
            ++c.gaps;
            ++c_gaps;
            c.pending_gap = 0;
            (void)c.conn->send(control(c, gap), false);
        }
        if (!c.conn->send(frame(c, e), c.binary && c.conn->websocket())) {
            drop.push_back(c.id);
            return;
        }
        ++c.sent;
        ++c_sent;
    }

    static entry render(const event& ev, bool stats) {
        entry e;
        e.id = to_string(ev.id);
        e.topic = ev.topic;
        e.source = ev.source;
        e.seq = ev.seq;
        e.json_text = std::make_shared<const std::string>(stats ? render_stats_json(ev) : render_cloudevent_json(ev));
        e.sse = std::make_shared<const std::string>("id: " + e.id + "\ndata: " + *e.json_text + "\n\n");
        std::string body;
        encode_event_body(ev, body);
        std::string bin = ev.topic;
        bin.push_back('\0');
        bin += body;
        e.binary = std::make_shared<const std::string>(std::move(bin));
        return e;
    }

    void on_event(const event_view& v) {
        const bool stats = v.topic.substr(0, 14) == "_evmesh.stats.";
        if (!stats && v.topic.substr(0, 8) == "_evmesh.") {
            return;  // pings, pongs, repair: the mesh's business
        }
        entry e = render(v.to_event(), stats);
        std::vector<std::uint64_t> drop;
        {
            std::lock_guard lk(m);
            if (stopped) {
                return;
            }
            if (ring_index.count(e.id) != 0) {
                return;  // the same event through two subscriptions
            }
            e.idx = next_idx++;
            if (!stats) {  // stats are a gauge, not history: never resumed, never crowding events out
                ring.push_back(e);
                ring_index[e.id] = e.idx;
                while (ring.size() > o.resume_events) {
                    ring_index.erase(ring.front().id);
                    ring.pop_front();
                }
            }
            for (auto& [text, g] : by_pattern) {
                if (!g.pattern.matches(e.topic)) {
                    continue;
                }
                for (client* c : g.members) {
                    if (c->last_idx != e.idx) {
                        c->last_idx = e.idx;
                        if (fresh(*c, e)) {
                            deliver(*c, e, drop);
                        }
                    }
                }
            }
        }
        close_clients(drop, 1008, "slow client: its queue is full");
    }

    void close_clients(const std::vector<std::uint64_t>& ids, int code, const std::string& reason) {
        for (auto id : ids) {
            std::shared_ptr<client> c;
            {
                std::lock_guard lk(m);
                if (auto it = clients.find(id); it != clients.end()) {
                    c = it->second;
                }
            }
            if (c) {
                c->conn->close(code, reason);
            }
        }
    }

    // Checks the requested patterns against the key's scopes; fills `error` when one is outside.
    static bool allowed(const principal& who, const std::vector<std::string>& patterns, std::string& error) {
        if (who.admin()) {
            return true;
        }
        for (const auto& p : patterns) {
            bool ok = false;
            for (const auto& s : who.scopes) {
                if (s.rfind("subscribe:", 0) == 0 && pattern_within(p, s.substr(10))) {
                    ok = true;
                }
            }
            if (!ok) {
                error = "this key may not subscribe to '" + p + "' (subscribe:<pattern> scopes)";
                return false;
            }
        }
        return true;
    }

    // Parses a list of patterns; fills `error` when one is malformed.
    bool parse_patterns(const std::vector<std::string>& in, std::vector<topic_pattern>& out, std::string& error) const {
        if (in.empty() || in.size() > o.max_topics) {
            error = "give 1 to " + std::to_string(o.max_topics) + " topic patterns";
            return false;
        }
        for (const auto& t : in) {
            auto p = topic_pattern::parse(t);
            if (!p) {
                error = "'" + t + "' is not a topic pattern";
                return false;
            }
            out.push_back(std::move(*p));
        }
        return true;
    }

    // Adds patterns to a registered client, replaying from the resume buffer after `last_id`
    // (empty: live only), all under m so nothing arrives between the replay and live delivery.
    // An id the buffer does not hold resumes from the durable histories instead (resume_history).
    void attach(const std::shared_ptr<client>& c, std::vector<topic_pattern> add, const std::string& last_id) {
        std::vector<std::uint64_t> drop;
        std::vector<topic_pattern> from_history;
        {
            std::lock_guard lk(m);
            const bool in_ring = !last_id.empty() && ring_index.count(last_id) != 0;
            if (!last_id.empty() && !in_ring && o.resume_history) {
                // live events for these patterns come through the client's replays, after the
                // replayed ones: not through the hub's index
                ++c_history_resumes;
                c->dedup = true;
                for (auto& p : add) {
                    c->patterns.push_back(p);
                    from_history.push_back(std::move(p));
                }
                add.clear();
            }
            for (auto& p : add) {
                index_add(c.get(), p);
                c->patterns.push_back(std::move(p));
            }
            if (!last_id.empty() && from_history.empty()) {
                auto it = ring_index.find(last_id);
                if (it == ring_index.end()) {
                    ++c_resume_gaps;
                    ++c->gaps;
                    (void)c->conn->send(control(*c, {{"control", "gap"},
                                                     {"reason", "resume_unavailable"},
                                                     {"last_event_id", last_id},
                                                     {"message", "the event is no longer in the node's resume "
                                                                 "buffer; events after it may be missing"}}),
                                        false);
                } else {
                    ++c_resumed;
                    const auto from = it->second;
                    for (const auto& e : ring) {
                        if (e.idx > from && matches(*c, e.topic)) {
                            deliver(*c, e, drop);
                        }
                    }
                }
            }
        }
        close_clients(drop, 1008, "slow client: its queue is full");
        if (!from_history.empty()) {
            resume_from_history(c, from_history, last_id);
        }
    }

    // One replay per pattern, after `last_id`; each delivers its replayed events, then switches
    // to live by itself (no gap, no duplicate per stream: evmesh/replay.hpp).
    void resume_from_history(const std::shared_ptr<client>& c, const std::vector<topic_pattern>& pats,
                             const std::string& last_id) {
        const auto cid = c->id;
        std::vector<std::pair<std::string, std::shared_ptr<replay_subscription>>> started;
        for (const auto& p : pats) {
            replay_options ro;
            ro.from = replay_from::after(last_id);
            ro.answer_wait = o.resume_answer_wait;
            ro.hwm = 10000;
            ro.max_buffered = 100000;
            const std::string text = p.text();
            ro.on_live = [this, cid, text, last_id](const replay_counters& rc) {
                on_resume_live(cid, text, last_id, rc);
            };
            auto r = replay(n, text, std::move(ro), [this, cid](const event_view& v) { on_resumed(cid, v); });
            if (!r) {
                spdlog::warn("stream {}: cannot resume '{}' from history: {}", cid, text, r.error().message());
                std::lock_guard lk(m);
                ++c_resume_gaps;
                ++c->gaps;
                (void)c->conn->send(control(*c, {{"control", "gap"},
                                                 {"reason", "resume_unavailable"},
                                                 {"last_event_id", last_id},
                                                 {"topic", text},
                                                 {"message", "cannot replay from history: " + r.error().message()}}),
                                    false);
                continue;
            }
            started.emplace_back(text, std::make_shared<replay_subscription>(std::move(*r)));
        }
        std::unique_lock lk(m);
        if (stopped || clients.count(cid) == 0) {
            lk.unlock();
            started.clear();  // closed meanwhile: stop the replays (outside m: they may be waiting for it)
            return;
        }
        for (auto& r : started) {
            c->replays.push_back(std::move(r));
        }
    }

    // A replayed (or, after the switch, live) event for a resumed client: under the same queue
    // bound and slow-client policy as live events. Never waiting for the client here is
    // deliberate: the replay's thread also drains its live subscription, and under the node's
    // `block` policy a stalled subscriber would slow the whole node for one slow client.
    void on_resumed(std::uint64_t cid, const event_view& v) {
        const entry e = render(v.to_event(), false);
        std::vector<std::uint64_t> drop;
        {
            std::lock_guard lk(m);
            auto it = clients.find(cid);
            if (stopped || it == clients.end()) {
                return;
            }
            auto& c = *it->second;
            if (!fresh(c, e)) {
                return;
            }
            ++c_history_events;
            deliver(c, e, drop);
        }
        close_clients(drop, 1008, "slow client: its queue is full");
    }

    // The switch to live of one resumed pattern: says so when no history had the events.
    void on_resume_live(std::uint64_t cid, const std::string& pattern, const std::string& last_id,
                        const replay_counters& rc) {
        std::lock_guard lk(m);
        auto it = clients.find(cid);
        if (stopped || it == clients.end()) {
            return;
        }
        auto& c = *it->second;
        if (rc.histories == 0) {
            ++c_resume_gaps;
            ++c.gaps;
            (void)c.conn->send(control(c, {{"control", "gap"},
                                           {"reason", "resume_unavailable"},
                                           {"last_event_id", last_id},
                                           {"topic", pattern},
                                           {"message", "neither the node's resume buffer nor any history on the "
                                                       "mesh holds these events; events after the id may be missing"}}),
                               false);
        } else if (rc.id_not_found == rc.histories) {
            ++c_resume_time_gaps;
            ++c.gaps;
            (void)c.conn->send(control(c, {{"control", "gap"},
                                           {"reason", "resume_from_time"},
                                           {"last_event_id", last_id},
                                           {"topic", pattern},
                                           {"message", "no history holds this id: replayed from its time on (a UUIDv7), "
                                                       "else live only; events after the id may be missing"}}),
                               false);
        }
    }

    std::shared_ptr<client> add_client(const std::shared_ptr<live_conn>& conn, const principal& who) {
        auto c = std::make_shared<client>();
        c->conn = conn;
        c->key_id = who.key_id;
        c->connected_ms = wall_ms();
        std::lock_guard lk(m);
        c->id = next_client++;
        clients[c->id] = c;
        ++c_opened;
        return c;
    }

    void remove_client(std::uint64_t id, std::vector<std::string>& patterns_out) {
        std::vector<std::pair<std::string, std::shared_ptr<replay_subscription>>> replays;
        {
            std::lock_guard lk(m);
            if (auto it = clients.find(id); it != clients.end()) {
                for (const auto& p : it->second->patterns) {
                    patterns_out.push_back(p.text());
                    index_remove(it->second.get(), p.text());
                }
                replays.swap(it->second->replays);
                clients.erase(it);
            }
        }
        // stopped here, outside m: a replay's callback may be waiting for m
        replays.clear();
    }

    std::size_t count() const {
        std::lock_guard lk(m);
        return clients.size();
    }

    void heartbeat_loop() {
        std::unique_lock lk(hb_m);
        while (!hb_cv.wait_for(lk, o.heartbeat, [this] { return hb_stop; })) {
            std::vector<std::shared_ptr<client>> all;
            {
                std::lock_guard g(m);
                for (const auto& [id, c] : clients) {
                    if (!c->conn->websocket()) {
                        all.push_back(c);
                    }
                }
            }
            for (const auto& c : all) {
                if (c->conn->queued_bytes() == 0) {
                    (void)c->conn->send(": heartbeat\n\n", false);
                }
            }
        }
    }
};

stream_hub::stream_hub(node& n, stream_options o) : impl_(std::make_shared<impl>(n, std::move(o))) {
    impl_->heartbeat = std::thread([p = impl_.get()] { p->heartbeat_loop(); });
}

stream_hub::~stream_hub() { stop(); }

void stream_hub::stop() {
    auto& p = *impl_;
    {
        std::lock_guard lk(p.hb_m);
        if (p.hb_stop) {
            return;
        }
        p.hb_stop = true;
    }
    p.hb_cv.notify_all();
    if (p.heartbeat.joinable()) {
        p.heartbeat.join();
    }
    std::map<std::uint64_t, std::shared_ptr<impl::client>> all;
    {
        std::lock_guard lk(p.m);
        p.stopped = true;
        all = p.clients;
    }
    // the replays of resumed clients first (they deliver through the hub), outside m
    std::vector<std::pair<std::string, std::shared_ptr<replay_subscription>>> replays;
    {
        std::lock_guard lk(p.m);
        for (auto& [id, c] : all) {
            for (auto& r : c->replays) {
                replays.push_back(std::move(r));
            }
            c->replays.clear();
        }
    }
    replays.clear();
    for (auto& [id, c] : all) {
        c->conn->close(1001, "the node is stopping");
    }
    {
        // the hub lets go of its clients (and so of their connections, whose handlers hold the
        // hub): what the HTTP loop has not closed yet goes when its io_context goes
        std::lock_guard lk(p.m);
        p.by_pattern.clear();
        p.clients.clear();
    }
    all.clear();
    std::map<std::string, std::pair<int, subscription>> subs;
    {
        std::lock_guard lk(p.subs_m);
        subs.swap(p.subs);
    }
}

namespace {
std::vector<std::string> split_topics(const std::string& s) {
    std::vector<std::string> out;
    std::stringstream ss(s);
    std::string t;
    while (std::getline(ss, t, ',')) {
        if (!t.empty()) {
            out.push_back(t);
        }
    }
    return out;
}
}  // namespace

void stream_hub::sse(const http_request& req, http_response& res, const principal& who) {
    auto p = impl_;
    const auto topics = split_topics(req.param("topics"));
    std::vector<topic_pattern> pats;
    std::string error;
    if (!p->parse_patterns(topics, pats, error)) {
        return http_error(res, 400, "bad_pattern", error, "topics");
    }
    if (!impl::allowed(who, topics, error)) {
        return http_error(res, 403, "forbidden", error, "topics");
    }
    if (p->count() >= p->o.max_connections) {
        res.headers.emplace_back("Retry-After", "5");
        return http_error(res, 503, "too_many_streams", "this node serves stream.max_connections streams already");
    }
    if (!p->acquire(topics, error)) {
        return http_error(res, 503, "unavailable", error);
    }
    std::string last = req.header("last-event-id");
    if (last.empty()) {
        last = req.param("last_event_id");
    }
    auto h = std::make_shared<live_handlers>();
    auto cid = std::make_shared<std::uint64_t>(0);
    h->open = [p, who, pats = std::move(pats), last, cid](std::shared_ptr<live_conn> conn) mutable {
        auto c = p->add_client(conn, who);
        *cid = c->id;
        (void)conn->send("retry: 2000\n\n", false);
        p->attach(c, std::move(pats), last);
    };
    h->closed = [p, cid, topics] {
        std::vector<std::string> unused;
        p->remove_client(*cid, unused);
        p->release(topics);
    };
    res.live = std::move(h);
}

void stream_hub::ws(const http_request& req, http_response& res, const principal& who) {
    if (!req.websocket_upgrade) {
        return http_error(res, 426, "upgrade_required", "GET /v1/ws is a WebSocket endpoint (Upgrade: websocket)");
    }
    auto p = impl_;
    if (p->count() >= p->o.max_connections) {
        res.headers.emplace_back("Retry-After", "5");
        return http_error(res, 503, "too_many_streams", "this node serves stream.max_connections streams already");
    }
    struct state {
        // weak: the hub's client map owns the client, the client owns the connection, and the
        // connection owns these handlers; a strong reference here would be a cycle that outlives
        // the connection
        std::weak_ptr<impl::client> c;
        std::mutex m;
        std::vector<std::string> topics;  // acquired, to release at the end
    };
    auto st = std::make_shared<state>();
    auto h = std::make_shared<live_handlers>();
    h->ping_interval = p->o.heartbeat;
    h->open = [p, who, st](std::shared_ptr<live_conn> conn) {
        st->c = p->add_client(conn, who);
        (void)conn->send(json({{"control", "welcome"}, {"node", p->n.name()}}).dump(), false);
    };
    h->message = [p, who, st](const std::string& data, bool binary) {
        const auto cp = st->c.lock();
        if (!cp) {
            return;  // already removed (the node is stopping)
        }
        auto& c = *cp;
        auto reply = [&](const json& j) { (void)c.conn->send(j.dump(), false); };
        const auto j = binary ? json() : json::parse(data, nullptr, false);
        if (!j.is_object() || !j.contains("control") || !j["control"].is_string()) {
            return reply({{"control", "error"}, {"code", "bad_message"},
                          {"message", "expected a JSON object with \"control\": subscribe, unsubscribe or ping"}});
        }
        const auto kind = j["control"].get<std::string>();
        if (kind == "ping") {
            return reply({{"control", "pong"}});
        }
        std::vector<std::string> topics;
        if (j.contains("topics") && j["topics"].is_array()) {
            for (const auto& t : j["topics"]) {
                if (t.is_string()) {
                    topics.push_back(t.get<std::string>());
                }
            }
        }
        if (kind == "subscribe") {
            std::vector<topic_pattern> pats;
            std::string error;
            if (!p->parse_patterns(topics, pats, error)) {
                return reply({{"control", "error"}, {"code", "bad_pattern"}, {"message", error}});
            }
            if (!impl::allowed(who, topics, error)) {
                return reply({{"control", "error"}, {"code", "forbidden"}, {"message", error}});
            }
            if (j.value("format", std::string("json")) == "msgpack") {
                std::lock_guard lk(p->m);
                c.binary = true;
            }
            if (!p->acquire(topics, error)) {
                return reply({{"control", "error"}, {"code", "unavailable"}, {"message", error}});
            }
            {
                std::lock_guard lk(st->m);
                st->topics.insert(st->topics.end(), topics.begin(), topics.end());
            }
            reply({{"control", "subscribed"}, {"topics", topics}});
            const auto last = j.contains("last_event_id") && j["last_event_id"].is_string()
                                  ? j["last_event_id"].get<std::string>()
                                  : std::string();
            p->attach(cp, std::move(pats), last);
            return;
        }
        if (kind == "unsubscribe") {
            std::vector<std::pair<std::string, std::shared_ptr<replay_subscription>>> closing;
            {
                std::lock_guard lk(p->m);
                auto& rs = c.replays;
                for (auto it = rs.begin(); it != rs.end();) {
                    if (std::find(topics.begin(), topics.end(), it->first) != topics.end()) {
                        closing.push_back(std::move(*it));
                        it = rs.erase(it);
                    } else {
                        ++it;
                    }
                }
                auto& ps = c.patterns;
                ps.erase(std::remove_if(ps.begin(), ps.end(),
                                        [&](const topic_pattern& x) {
                                            return std::find(topics.begin(), topics.end(), x.text()) != topics.end();
                                        }),
                         ps.end());
                for (const auto& t : topics) {
                    p->index_remove(&c, t);
                }
            }
            closing.clear();  // outside m
            reply({{"control", "unsubscribed"}, {"topics", topics}});
            return;
        }
        reply({{"control", "error"}, {"code", "bad_message"}, {"message", "unknown control '" + kind + "'"}});
    };
    h->closed = [p, st] {
        if (const auto c = st->c.lock()) {
            std::vector<std::string> unused;
            p->remove_client(c->id, unused);
        }
        std::lock_guard lk(st->m);
        p->release(st->topics);
    };
    res.live = std::move(h);
}

void stream_hub::list(const http_request&, http_response& res, const principal& who) {
    if (!who.admin()) {
        return http_error(res, 403, "forbidden", "listing streams needs the admin scope");
    }
    auto data = json::array();
    std::lock_guard lk(impl_->m);
    for (const auto& [id, c] : impl_->clients) {
        json topics = json::array();
        for (const auto& p : c->patterns) {
            topics.push_back(p.text());
        }
        data.push_back({{"id", id},
                        {"kind", c->conn->websocket() ? "websocket" : "sse"},
                        {"topics", topics},
                        {"key_id", c->key_id},
                        {"connected_at", rfc3339_ms(c->connected_ms)},
                        {"sent", c->sent},
                        {"skipped", c->skipped},
                        {"gaps", c->gaps},
                        {"queued_bytes", c->conn->queued_bytes()}});
    }
    res.json(200, json({{"data", data}, {"done", true}, {"iterator", nullptr}}).dump());
}

std::string stream_hub::metrics(const std::string& node_name) const {
    auto& p = *impl_;
    std::lock_guard lk(p.m);
    std::size_t sse = 0, wsn = 0;
    for (const auto& [id, c] : p.clients) {
        (c->conn->websocket() ? wsn : sse)++;
    }
    const std::string l = "node=\"" + node_name + "\"";
    std::ostringstream os;
    os << "# HELP evmesh_stream_connections Open live streams.\n# TYPE evmesh_stream_connections gauge\n"
       << "evmesh_stream_connections{" << l << ",kind=\"sse\"} " << sse << "\n"
       << "evmesh_stream_connections{" << l << ",kind=\"websocket\"} " << wsn << "\n"
       << "# HELP evmesh_stream_events_total Events to live streams: sent, or skipped for a slow client.\n"
       << "# TYPE evmesh_stream_events_total counter\n"
       << "evmesh_stream_events_total{" << l << ",outcome=\"sent\"} " << p.c_sent << "\n"
       << "evmesh_stream_events_total{" << l << ",outcome=\"skipped\"} " << p.c_skipped << "\n"
       << "# HELP evmesh_stream_gaps_total Gap notices sent (slow client caught up, resume unavailable).\n"
       << "# TYPE evmesh_stream_gaps_total counter\n"
       << "evmesh_stream_gaps_total{" << l << ",reason=\"slow_client\"} " << p.c_gaps << "\n"
       << "evmesh_stream_gaps_total{" << l << ",reason=\"resume_unavailable\"} " << p.c_resume_gaps << "\n"
       << "evmesh_stream_gaps_total{" << l << ",reason=\"resume_from_time\"} " << p.c_resume_time_gaps << "\n"
       << "# HELP evmesh_stream_resumes_total Streams resumed after Last-Event-ID: from the buffer or the histories.\n"
       << "# TYPE evmesh_stream_resumes_total counter\n"
       << "evmesh_stream_resumes_total{" << l << ",from=\"buffer\"} " << p.c_resumed << "\n"
       << "evmesh_stream_resumes_total{" << l << ",from=\"history\"} " << p.c_history_resumes << "\n"
       << "# HELP evmesh_stream_history_events_total Events sent to resumed streams through their replays.\n"
       << "# TYPE evmesh_stream_history_events_total counter\n"
       << "evmesh_stream_history_events_total{" << l << "} " << p.c_history_events << "\n"
       << "# HELP evmesh_stream_slow_disconnects_total Streams closed because their queue was full.\n"
       << "# TYPE evmesh_stream_slow_disconnects_total counter\n"
       << "evmesh_stream_slow_disconnects_total{" << l << "} " << p.c_slow_disconnects << "\n"
       << "# HELP evmesh_stream_opened_total Live streams opened.\n# TYPE evmesh_stream_opened_total counter\n"
       << "evmesh_stream_opened_total{" << l << "} " << p.c_opened << "\n";
    return os.str();
}

}  // namespace evmesh::app
