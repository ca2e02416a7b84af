// The node's own events: the periodic stats event, answers to mesh-inspector pings, and the
// counters they report (docs/PROTOCOL.md, "Stats events" and "Ping").
#include <algorithm>
#include <cstring>

#include <map>

#include <msgpack.hpp>

#include <evmesh/codec.hpp>

#include "codec/envelope.hpp"
#include "codec/msgpack_writer.hpp"
#include "reactor/node_impl.hpp"

namespace evmesh::detail {
namespace {

using clock = std::chrono::steady_clock;

using packer = codec::string_packer;

void key(packer& pk, std::string_view k) {
    codec::pack_str(pk, k);
}

void str(packer& pk, std::string_view v) {
    codec::pack_str(pk, v);
}

void kv(packer& pk, std::string_view k, std::uint64_t v) {
    key(pk, k);
    pk.pack_uint64(v);
}

void kv(packer& pk, std::string_view k, double v) {
    key(pk, k);
    pk.pack_double(v);
}

void kv(packer& pk, std::string_view k, std::string_view v) {
    key(pk, k);
    str(pk, v);
}

}  // namespace

void node_impl::sample_latency(std::string_view body) {
    std::string_view source;
    std::int64_t t = 0;
    if (!codec::peek_source_time(body, source, t)) {
        return;
    }
    // `t` comes from another process, maybe another host: clamp instead of trusting it (a
    // negative or far-future time must not overflow the subtraction)
    const auto now = now_ns();
    std::int64_t diff = 0;
    if (t <= 0 || t > now || __builtin_sub_overflow(now, t, &diff)) {
        diff = 0;
    }
    const auto us = static_cast<std::uint64_t>(diff / 1000);
    std::size_t i = 0;
    while (i < latency_bounds_us.size() && us > latency_bounds_us[i]) {
        ++i;
    }
    ++c.latency_buckets[i];
    c.latency_sum_us += us;
}

void node_impl::collect_subscriber_counters() {
    std::lock_guard lock(subs.mu);
    std::uint64_t received = subs.retired_received, gaps = subs.retired_gaps;
    auto& live = subs.live;
    for (auto it = live.begin(); it != live.end();) {
        const auto& s = **it;
        if (s.closed) {
            subs.retired_received += s.received.get();
            subs.retired_gaps += s.gaps.get();
            received += s.received.get();
            gaps += s.gaps.get();
            it = live.erase(it);
            continue;
        }
        received += s.received.get();
        gaps += s.gaps.get();
        ++it;
    }
    c.subscriber_received = received;
    c.subscriber_gaps = gaps;
}

void node_impl::collect_counters() {
    collect_subscriber_counters();
    c.publish_rejected = ctx->publish_rejected.load(std::memory_order_relaxed);
    c.peers = peers_.peers().size();
    if (rx_) {
        c.repair_naks = rx_->naks();
        c.repair_recovered = rx_->recovered();
        c.repair_lost = rx_->lost();
        c.repair_duplicates = rx_->duplicates();
        c.repair_held = rx_->held();
        c.repair_skipped = rx_->skipped_before_subscription();
    }
    if (tail_) {
        c.window_events = tail_->events();
        c.window_bytes = tail_->bytes();
        c.window_streams = tail_->streams();
    }
    std::lock_guard lk(snap_mu);
    last_counters = c;
}

void node_impl::publish_stats() {
    const auto now = clock::now();
    const double elapsed = std::chrono::duration<double>(now - last_stats_).count();
    // Only build it when a subscription that names `_evmesh` covers the stats topic: a client
    // subscribed to everything ("" at the ZeroMQ level) filters reserved topics out anyway.
    auto wanted = [&](const auto& subs_map) {
        return std::any_of(subs_map.begin(), subs_map.end(), [&](const auto& e) {
            return e.first.starts_with("_evmesh") && stats_topic_.compare(0, e.first.size(), e.first) == 0;
        });
    };
    auto roll_interval = [&] {  // rates always cover one interval, watched or not
        last_stats_ = now;
        prev_c_ = c;
        for (auto* fc : {&topics_, &sources_}) {
            for (auto& [k, st] : fc->map()) {
                st.prev_events = st.events;
            }
            fc->other().prev_events = fc->other().events;
        }
    };
    if (!wanted(local_subs_) && !wanted(mesh_subs_)) {
        roll_interval();
        return;
    }
    collect_counters();
    const auto payload = encode_stats(elapsed);
    std::string body;
    const auto t = now_ns();
    encode_event_body(new_event_id(t), name + "/stats", t, ++stats_seq_,
                      "application/vnd.evmesh.stats+msgpack", {}, payload, body);
    if (inject(stats_topic_, body, true)) {
        ++c.stats_sent;
    }
    roll_interval();
}

std::string node_impl::encode_stats(double elapsed) {
    std::string out;
    codec::string_writer w{out};
    packer pk(w);
    const double dt = elapsed > 0 ? elapsed : 1.0;
    auto rate = [&](std::uint64_t now_v, std::uint64_t prev_v) {
        return static_cast<double>(now_v - prev_v) / dt;
    };
    pk.pack_map(21);  // keep in step with the keys below (tests decode strictly)
    kv(pk, "v", std::uint64_t{1});
    kv(pk, "id", id_text);
    kv(pk, "name", name);
    kv(pk, "mesh", opt.mesh);
    kv(pk, "incarnation", incarnation);
    key(pk, "observer");
    pk.pack(opt.observer);
    kv(pk, "uptime_ms", static_cast<std::uint64_t>(
                            std::chrono::duration_cast<std::chrono::milliseconds>(clock::now() - started_).count()));
    kv(pk, "interval_ms", static_cast<std::uint64_t>(elapsed * 1000));

    key(pk, "endpoints");
    pk.pack_map(3);
    kv(pk, "mesh", mesh_ep);
    key(pk, "pub");
    pk.pack(pub_eps);
    key(pk, "sub");
    pk.pack(sub_eps);

    key(pk, "peers");
    const auto peers = snapshot_peers();
    pk.pack_array(static_cast<std::uint32_t>(peers.size()));
    const auto wall = std::chrono::system_clock::now();
    for (const auto& p : peers) {
        pk.pack_map(6);
        kv(pk, "id", p.id);
        kv(pk, "name", p.name);
        kv(pk, "endpoint", p.endpoint);
        kv(pk, "state", std::string_view(to_string(p.state)));
        key(pk, "observer");
        pk.pack(p.observer);
        kv(pk, "last_seen_ms", static_cast<std::uint64_t>(std::max<std::int64_t>(
                                   0, std::chrono::duration_cast<std::chrono::milliseconds>(wall - p.last_seen).count())));
    }

    key(pk, "subscriptions");
    pk.pack_map(2);
    for (const auto* m : {&local_subs_, &mesh_subs_}) {
        key(pk, m == &local_subs_ ? "local" : "mesh");
        const auto n = std::min<std::size_t>(m->size(), 64);
        pk.pack_array(static_cast<std::uint32_t>(n));
        std::size_t i = 0;
        for (const auto& [prefix, refs] : *m) {
            if (i++ == n) {
                break;
            }
            str(pk, prefix);
        }
    }

    key(pk, "counters");
    const std::pair<const char*, std::uint64_t> counters[] = {
        {"local_in_events", c.local_in_events},   {"local_in_bytes", c.local_in_bytes},
        {"client_in_events", c.client_in_events}, {"client_in_bytes", c.client_in_bytes},
        {"client_rejected", c.client_rejected},   {"client_completed", c.client_completed},
        {"mesh_in_events", c.mesh_in_events},     {"mesh_in_bytes", c.mesh_in_bytes},
        {"local_out_events", c.local_out_events}, {"mesh_out_events", c.mesh_out_events},
        {"blocked", c.local_out_blocked},         {"beacons_sent", c.beacons_sent},
        {"beacons_received", c.beacons_received}, {"beacons_rejected", c.beacons_rejected},
        {"beacons_foreign", c.beacons_foreign},   {"peers_joined", c.peers_joined},
        {"peers_left", c.peers_left},             {"peers_expired", c.peers_expired},
        {"peers_link_lost", c.peers_link_lost},   {"stats_sent", c.stats_sent},
        {"pings_answered", c.pings_answered},     {"subscriber_received", c.subscriber_received},
        {"beacons_unauthenticated", c.beacons_unauthenticated}, {"beacons_replayed", c.beacons_replayed},
        {"peers_not_allowed", c.peers_not_allowed}, {"auth_rejected", c.auth_rejected},
        {"auth_accepted", c.auth_accepted},
        {"subscriber_gaps", c.subscriber_gaps},
        {"publish_rejected", c.publish_rejected}, {"mesh_rejected", c.mesh_rejected},
        {"torn_messages", c.torn_messages},       {"peers_refused", c.peers_refused},
        {"peers_replaced", c.peers_replaced},     {"peers_incompatible", c.peers_incompatible},
        {"links_up", c.links_up},                 {"links_down", c.links_down},
        {"stalls", c.stalls},                     {"subscriptions_refused", c.subscriptions_refused},
        {"reserved_rejected", c.reserved_rejected},
        {"repair_naks", c.repair_naks},           {"repair_recovered", c.repair_recovered},
        {"repair_lost", c.repair_lost},           {"repair_duplicates", c.repair_duplicates},
        {"repair_served", c.repair_served},       {"repair_held", c.repair_held},
        {"window_events", c.window_events},       {"window_bytes", c.window_bytes},
        {"repair_history_requests", c.repair_history_requests}, {"repair_from_history", c.repair_from_history}};
    pk.pack_map(static_cast<std::uint32_t>(std::size(counters)));
    for (const auto& [k, v] : counters) {
        kv(pk, k, v);
    }

    key(pk, "rates");
    pk.pack_map(5);
    kv(pk, "local_in", rate(c.local_in_events, prev_c_.local_in_events));
    kv(pk, "client_in", rate(c.client_in_events, prev_c_.client_in_events));
    kv(pk, "mesh_in", rate(c.mesh_in_events, prev_c_.mesh_in_events));
    kv(pk, "local_out", rate(c.local_out_events, prev_c_.local_out_events));
    kv(pk, "mesh_out", rate(c.mesh_out_events, prev_c_.mesh_out_events));

    // top-N flows by rate over the last interval (then total), plus everything else as one
    auto top = [&](flow_counter& fc, const char* name_key, std::size_t n) {
        std::vector<std::pair<const std::string*, flow_stat*>> v;
        for (auto& [k, st] : fc.map()) {
            v.emplace_back(&k, &st);
        }
        std::sort(v.begin(), v.end(), [](const auto& a, const auto& b) {
            const auto ra = a.second->events - a.second->prev_events;
            const auto rb = b.second->events - b.second->prev_events;
            return ra != rb ? ra > rb : a.second->events > b.second->events;
        });
        const auto shown = std::min(n, v.size());
        pk.pack_array(static_cast<std::uint32_t>(shown));
        flow_stat other = fc.other();
        for (std::size_t i = 0; i < v.size(); ++i) {
            const auto& st = *v[i].second;
            if (i >= shown) {
                other.events += st.events;
                other.prev_events += st.prev_events;
                other.bytes += st.bytes;
                continue;
            }
            pk.pack_map(4);
            kv(pk, name_key, *v[i].first);
            kv(pk, "events", st.events);
            kv(pk, "bytes", st.bytes);
            kv(pk, "rate", rate(st.events, st.prev_events));
        }
        return other;
    };
    key(pk, "topics");
    const auto other = top(topics_, "topic", opt.stats_top_topics);
    key(pk, "topics_other");
    pk.pack_map(3);
    kv(pk, "events", other.events);
    kv(pk, "bytes", other.bytes);
    kv(pk, "rate", rate(other.events, other.prev_events));
    key(pk, "sources");
    (void)top(sources_, "node", 64);

    key(pk, "subscribers");
    {
        std::lock_guard lock(subs.mu);
        const auto n = std::min<std::size_t>(subs.live.size(), 32);
        pk.pack_array(static_cast<std::uint32_t>(n));
        for (std::size_t i = 0; i < n; ++i) {
            const auto& s = *subs.live[i];
            pk.pack_map(6);
            kv(pk, "pattern", s.pattern);
            kv(pk, "received", s.received.get());
            kv(pk, "gaps", s.gaps.get());
            kv(pk, "out_of_order", s.out_of_order.get());
            kv(pk, "decode_errors", s.decode_errors.get());
            key(pk, "gaps_by_topic");
            std::lock_guard gl(subs.live[i]->gaps_mu);
            pk.pack(subs.live[i]->gaps_by_topic);
        }
    }

    key(pk, "latency_us");
    pk.pack_map(3);
    key(pk, "bounds");
    pk.pack_array(static_cast<std::uint32_t>(latency_bounds_us.size()));
    for (auto b : latency_bounds_us) {
        pk.pack_uint64(b);
    }
    key(pk, "counts");
    pk.pack_array(static_cast<std::uint32_t>(c.latency_buckets.size()));
    for (auto n : c.latency_buckets) {
        pk.pack_uint64(n);
    }
    kv(pk, "sum", c.latency_sum_us);

    key(pk, "rejected");
    pk.pack_map(2);
    key(pk, "by_reason");
    pk.pack(reject_reasons_);
    key(pk, "by_topic");
    pk.pack(reject_topics_);

    key(pk, "history");
    std::string arr;
    std::vector<history_stats> hs;
    {
        // called under the lock, so set_channel_stats() returns only when no call is running
        std::lock_guard lk(channel_stats_mu_);
        if (history_stats_) {
            hs = history_stats_();
        }
        if (channel_stats_) {
            arr = channel_stats_();
        }
    }
    pk.pack_array(static_cast<std::uint32_t>(hs.size()));
    for (const auto& h : hs) {
        pk.pack_map(15);
        kv(pk, "name", h.name);
        key(pk, "patterns");
        pk.pack(h.patterns);
        kv(pk, "events", h.events);
        kv(pk, "bytes", h.bytes);
        kv(pk, "segments", h.segments);
        kv(pk, "oldest_ns", static_cast<std::uint64_t>(std::max<std::int64_t>(h.oldest_time_ns, 0)));
        kv(pk, "max_bytes", h.max_bytes);
        kv(pk, "max_events", h.max_events);
        kv(pk, "max_age_s", static_cast<std::uint64_t>(std::max<std::int64_t>(h.max_age_s, 0)));
        kv(pk, "appended", h.appended);
        kv(pk, "expired", h.expired);
        kv(pk, "dropped", h.dropped);
        kv(pk, "served", h.served);
        kv(pk, "error", h.error);
        key(pk, "consumers");
        pk.pack_array(static_cast<std::uint32_t>(std::min<std::size_t>(h.consumers.size(), 64)));
        for (std::size_t i = 0; i < h.consumers.size() && i < 64; ++i) {
            const auto& cs = h.consumers[i];
            pk.pack_map(14);
            kv(pk, "name", cs.name);
            kv(pk, "filter", cs.filter);
            kv(pk, "ack_floor", cs.ack_floor);
            kv(pk, "next", cs.next);
            kv(pk, "lag", cs.lag);
            kv(pk, "pending", cs.pending);
            kv(pk, "redeliver_queue", cs.redeliver_queue);
            kv(pk, "members", cs.members);
            kv(pk, "delivered", cs.delivered);
            kv(pk, "redelivered", cs.redelivered);
            kv(pk, "acked", cs.acked);
            kv(pk, "naked", cs.naked);
            kv(pk, "dead_lettered", cs.dead_lettered);
            kv(pk, "lost", cs.lost);
        }
    }

    key(pk, "channels");
    if (arr.empty()) {
        pk.pack_array(0);
    } else {
        out += arr;  // a complete msgpack array from the channel runtime
    }
    return out;
}

void node_impl::answer_ping(std::string_view topic, std::string_view body) {
    // A ping is an ordinary event on _evmesh.ping.<this node id> whose headers name the reply
    // topic (`reply-to`, under _evmesh.pong.) and a `nonce`; the pong echoes the nonce.
    auto v = decode_event(topic, body, limits);
    if (!v) {
        ++c.client_rejected;
        return;
    }
    const auto reply_to = std::string(v->header_value("reply-to"));
    if (!reply_to.starts_with("_evmesh.pong.") || !valid_topic(reply_to)) {
        return;
    }
    const std::vector<header> headers = {{"nonce", std::string(v->header_value("nonce"))},
                                         {"node", id_text},
                                         {"name", name}};
    std::string reply;
    const auto t = now_ns();
    encode_event_body(new_event_id(t), name + "/ping", t, ++pong_seq_, "application/octet-stream",
                      headers, {}, reply);
    if (inject(reply_to, reply, true)) {
        ++c.pings_answered;
    }
}

}  // namespace evmesh::detail
