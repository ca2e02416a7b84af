// The router: the node's hot path (inputs to outputs by subscription), client intake, and the
// repair protocol's wiring (docs/ARCHITECTURE.md). I/O thread only.
#include <algorithm>
#include <cstring>

#include <msgpack.hpp>

#include <evmesh/codec.hpp>

#include "codec/envelope.hpp"
#include "codec/msgpack_reader.hpp"
#include "codec/msgpack_writer.hpp"
#include "reactor/node_impl.hpp"
#include "reactor/zmq_util.hpp"
#include "util/log.hpp"

namespace evmesh::detail {
namespace {

using clock = std::chrono::steady_clock;
using codec::msgpack_reader;

using codec::pack_str;
using codec::string_writer;
using packer = codec::string_packer;

// Control bodies of the repair protocol (PROTOCOL.md section 8.6): msgpack arrays whose element
// 0 is 0 and element 1 the kind.
enum control_kind : std::uint8_t { ctl_heartbeat = 1, ctl_nak = 2, ctl_fill = 3 };

// Reads the head of a control body, [0, kind, ...], and checks the kind and the element count.
bool read_control_head(msgpack_reader& r, control_kind want, std::uint32_t min_elements) {
    std::uint32_t n = 0;
    std::uint64_t zero = 0, kind = 0;
    return r.read_array_header(n) == errc::ok && n >= min_elements && r.read_uint(zero) == errc::ok
           && zero == 0 && r.read_uint(kind) == errc::ok && kind == want;
}

constexpr std::size_t max_served_per_nak = 50000;
constexpr std::size_t max_ctl_queue = 200000;

}  // namespace

// ---- outputs ----

bool node_impl::send_inproc(zmsg& frame) {
    // embedded subscriptions take the frame itself: no copy, a reference for large messages
    zmsg copy = frame.share();
    if (zmq_msg_send(copy.get(), local_out_, ZMQ_DONTWAIT) < 0) {
        return false;
    }
    ++c.local_out_events;
    return true;
}

bool node_impl::send_client(zmsg& frame) {
    // clients on sub endpoints speak two frames (PROTOCOL.md section 1)
    std::string_view topic, body;
    if (!codec::split_mesh_frame(frame.view(), topic, body)) {
        return true;  // cannot happen: frames are checked where they enter
    }
    zmsg t(topic);
    zmsg b = zmsg::slice(frame, topic.size() + 1, body.size());
    if (zmq_msg_send(t.get(), client_out_, ZMQ_SNDMORE | ZMQ_DONTWAIT) < 0) {
        return false;
    }
    zmq_msg_send(b.get(), client_out_, ZMQ_DONTWAIT);  // the rest of an accepted message
    ++c.local_out_events;
    return true;
}

void node_impl::deliver_local(zmsg& frame) {
    // Under the drop policy the XPUBs are lossy and these sends never fail. Under the block
    // policy (ZMQ_XPUB_NODROP) a full receiver refuses the event: it is held (in order) and the
    // inputs pause until it is taken (backpressure to the publishers).
    if ((++latency_tick_ & 7) == 0 && (!inproc_subs_.empty() || !client_subs_.empty())) {
        std::string_view topic, body;
        if (codec::split_mesh_frame(frame.view(), topic, body)) {
            sample_latency(body);  // 1 in 8 deliveries: cheap, and enough for percentiles
        }
    }
    if (!inproc_subs_.empty() && (!ready_.empty() || !send_inproc(frame))) {
        ++c.local_out_blocked;
        ready_.push_back(frame.share());
    }
    if (!client_subs_.empty() && (!ready_client_.empty() || !send_client(frame))) {
        ++c.local_out_blocked;
        ready_client_.push_back(frame.share());
    }
}

void node_impl::deliver_local_origin(zmsg frame) {
    deliver_local(frame);
    if (!mesh_subs_.empty()) {
        if (zmq_msg_send(frame.get(), mesh_out_, ZMQ_DONTWAIT) >= 0) {
            ++c.mesh_out_events;
        } else {
            ++c.local_out_blocked;
            hold_mesh_.emplace(std::move(frame));
        }
    }
}

void node_impl::deliver_mesh(zmsg frame) {
    deliver_local(frame);
}

bool node_impl::flush_holds() {
    // each local output's held frames, in order, until it refuses again (or lost its subscribers)
    auto flush = [this](std::deque<zmsg>& held, bool wanted, bool (node_impl::*send)(zmsg&)) {
        if (!wanted) {
            held.clear();
            return;
        }
        while (!held.empty() && (this->*send)(held.front())) {
            held.pop_front();
        }
    };
    flush(ready_, !inproc_subs_.empty(), &node_impl::send_inproc);
    flush(ready_client_, !client_subs_.empty(), &node_impl::send_client);
    if (hold_mesh_) {
        if (mesh_subs_.empty()) {
            hold_mesh_.reset();
        } else if (zmq_msg_send(hold_mesh_->get(), mesh_out_, ZMQ_DONTWAIT) >= 0) {
            ++c.mesh_out_events;
            hold_mesh_.reset();
        }
    }
    while (!ctl_out_.empty() && mesh_out_ != nullptr && !hold_mesh_) {
        if (zmq_msg_send(ctl_out_.front().get(), mesh_out_, ZMQ_DONTWAIT) < 0) {
            break;
        }
        ctl_out_.pop_front();
    }
    return ready_.empty() && ready_client_.empty() && !hold_mesh_;
}

bool node_impl::inject(const std::string& topic, const std::string& body, bool to_mesh) {
    if (!inputs_open()) {
        return false;  // block policy is holding an event: skip, the next period will do
    }
    std::string f;
    f.reserve(topic.size() + 1 + body.size());
    f.append(topic).push_back('\0');
    f.append(body);
    zmsg frame(f);
    if (!to_mesh) {
        deliver_mesh(std::move(frame));
        return true;
    }
    deliver_local_origin(std::move(frame));
    return true;
}

// ---- inputs ----

void node_impl::retain(zmsg& frame, std::string_view topic, std::string_view body,
                       clock::time_point now) {
    // events of repaired topics that this node's publishers and clients sent enter the window
    if (!tail_ || !repaired(topic)) {
        return;
    }
    std::string_view source;
    std::int64_t t = 0;
    std::uint64_t seq = 0;
    if (codec::peek_stream(body, source, t, seq) && seq != 0) {
        tail_->append(source, topic, seq, t, frame.view(), now);
    }
}

void node_impl::count_reject(std::string_view reason, std::string_view what, std::string_view topic) {
    ++c.client_rejected;
    // reasons and topics of rejects, for the stats event (bounded: hostile input)
    const std::string reason_key(reason);
    if (reject_reasons_.size() < 32 || reject_reasons_.count(reason_key) != 0) {
        ++reject_reasons_[reason_key];
    }
    const auto t = topic.substr(0, 64);
    const bool printable = std::all_of(t.begin(), t.end(), [](char ch) {
        return static_cast<unsigned char>(ch) >= 0x20 && static_cast<unsigned char>(ch) < 0x7f;
    });
    const std::string topic_key = printable && !t.empty() ? std::string(t) : "(unprintable)";
    if (reject_topics_.size() < 32 || reject_topics_.count(topic_key) != 0) {
        ++reject_topics_[topic_key];
    } else {
        ++reject_topics_["(other)"];
    }
    std::uint64_t suppressed = 0;
    if (reject_log_.allow(suppressed)) {
        detail::log()->warn("evmesh node '{}': rejected client event: {}: {} ({} similar suppressed)",
                            name, reason, what, suppressed);
    }
}

void node_impl::forward_local() {
    const auto now = clock::now();
    for (std::uint32_t i = 0; i < opt.batch && inputs_open(); ++i) {
        if (zmq_msg_recv(in_.get(), local_in_, ZMQ_DONTWAIT) < 0) {
            return;
        }
        if (zmq_msg_more(in_.get())) {
            drain_frames(local_in_, *in2_.get());  // embedded publishers send one frame
            ++c.torn_messages;
            continue;
        }
        zmsg frame = std::move(in_);
        std::string_view topic, body;
        if (!codec::split_mesh_frame(frame.view(), topic, body)) {
            ++c.torn_messages;
            continue;
        }
        ++c.local_in_events;
        c.local_in_bytes += body.size();
        topics_.count(topic, body.size());
        retain(frame, topic, body, now);
        deliver_local_origin(std::move(frame));
    }
}

void node_impl::forward_client() {
    const auto now = clock::now();
    for (std::uint32_t i = 0; i < opt.batch && inputs_open(); ++i) {
        if (zmq_msg_recv(in_.get(), client_in_, ZMQ_DONTWAIT) < 0) {
            return;
        }
        // a refusal before decoding: its reason code (PROTOCOL.md 10.2) and what the log says
        const char* why = nullptr;
        const char* what = nullptr;
        missing_fields missing;
        result<event_view> v = fail(errc::not_an_event);
        if (!zmq_msg_more(in_.get())) {
            why = to_string(errc::bad_framing);
            what = "one frame (expected [topic][body])";
        } else if (zmq_msg_recv(in2_.get(), client_in_, ZMQ_DONTWAIT) < 0) {
            // never wait for a continuation frame on the I/O thread
            ++c.torn_messages;
            why = to_string(errc::bad_framing);
            what = "torn message: second frame missing";
        } else if (zmq_msg_more(in2_.get())) {
            drain_frames(client_in_, *sub_.get());
            why = to_string(errc::bad_framing);
            what = "more than two frames";
        } else if (in_.view().starts_with("_evmesh.") && !in_.view().starts_with("_evmesh.history.query.") &&
                   !in_.view().starts_with("_evmesh.consumer.")) {
            // reserved, except replay queries and consumer requests, which clients send too
            // (PROTOCOL.md 12, 13)
            ++c.reserved_rejected;
            why = "reserved_topic";
            what = "_evmesh. is the mesh's own namespace";
        } else {
            v = decode_event_lenient(in_.view(), in2_.view(), missing, limits);
        }
        if (why != nullptr) {
            count_reject(why, what, in_.view());
            continue;
        }
        if (!v) {  // decode errors are evmesh::errc codes: key them by the code's name
            count_reject(to_string(static_cast<errc>(v.error().value())), v.error().message(),
                         in_.view());
            continue;
        }
        const auto body_size = in2_.size();
        ++c.client_in_events;
        c.client_in_bytes += body_size;
        topics_.count(v->topic, body_size);
        frame_buf_.assign(v->topic);
        frame_buf_.push_back('\0');
        event_view ev = *v;
        if (missing.any() || v->content_type.empty()) {
            if (missing.id) {
                ev.id = new_event_id();
            }
            std::string source_buf;
            if (missing.source) {
                source_buf = name + "/client";
                ev.source = source_buf;
            }
            if (missing.time) {
                ev.time_ns = now_ns();
            }
            if (missing.seq) {
                if (client_seq_.size() > 65536) {
                    client_seq_.clear();  // bound memory; streams restart (counted as reorder)
                }
                stream_key(scratch_, ev.source, ev.topic);
                ev.seq = ++client_seq_[scratch_];
            }
            codec::encode_completed(ev, frame_buf_);
            ++c.client_completed;
        } else {
            frame_buf_.append(in2_.view());
        }
        zmsg frame(frame_buf_);
        const auto fv = frame.view();
        retain(frame, fv.substr(0, v->topic.size()), fv.substr(v->topic.size() + 1), now);
        deliver_local_origin(std::move(frame));
    }
}

void node_impl::forward_mesh_in() {
    const auto now = clock::now();
    for (std::uint32_t i = 0; i < opt.batch && !local_held(); ++i) {
        if (zmq_msg_recv(in_.get(), mesh_in_, ZMQ_DONTWAIT) < 0) {
            return;
        }
        if (zmq_msg_more(in_.get())) {
            // a node of an older mesh protocol (two frames per event): never wait for the rest
            drain_frames(mesh_in_, *in2_.get());
            ++c.mesh_rejected;
            continue;
        }
        zmsg frame = std::move(in_);
        std::string_view topic, body;
        if (!codec::split_mesh_frame(frame.view(), topic, body)) {
            ++c.mesh_rejected;
            continue;
        }
        ++c.mesh_in_events;
        c.mesh_in_bytes += body.size();
        if (topic.size() > 8 && topic[0] == '_' && topic.starts_with("_evmesh.")) {
            on_mesh_reserved(topic, body, frame);
            continue;
        }
        if (codec::is_control_body(body)) {
            // a stream heartbeat of the repair protocol: [0, 1, source, last_seq]
            if (rx_ && repaired(topic)) {
                msgpack_reader r(body);
                std::uint64_t last = 0;
                std::string_view source;
                if (read_control_head(r, ctl_heartbeat, 4) && r.read_str(source, 1024) == errc::ok
                    && r.read_uint(last) == errc::ok) {
                    rx_->on_heartbeat(source, topic, last, now);
                }
            }
            continue;
        }
        std::string_view source;
        std::int64_t time_ns = 0;
        std::uint64_t seq = 0;
        const bool peeked = codec::peek_stream(body, source, time_ns, seq);
        if (peeked) {
            sources_.count(source.substr(0, source.find('/')), body.size());  // per source node
        }
        if (rx_ && peeked && seq != 0 && repaired(topic)) {
            rx_->on_event(source, topic, seq, std::move(frame), false, now);
            continue;
        }
        // one hop: events from peers go to local subscribers only
        deliver_mesh(std::move(frame));
    }
}

// ---- subscriptions ----

void node_impl::on_subscriptions(void* from, bool from_local) {
    auto& set = from_local ? local_subs_ : mesh_subs_;
    // per output: whether it has a subscriber at all (each XPUB reports a prefix's first
    // subscribe and last unsubscribe; local_subs_ is their union, reference-counted)
    auto* out_set = from == local_out_ ? &inproc_subs_ : from == client_out_ ? &client_subs_ : nullptr;
    for (std::uint32_t i = 0; i < opt.batch; ++i) {
        if (zmq_msg_recv(sub_.get(), from, ZMQ_DONTWAIT) < 0) {
            return;
        }
        if (more(from)) {
            drain_frames(from, *in2_.get());
            continue;
        }
        const auto d = sub_.view();
        if (d.empty() || (d[0] != 0 && d[0] != 1)) {
            continue;  // not a subscription message
        }
        const std::string prefix(d.substr(1));
        if (from_local && prefix.starts_with(sync_prefix)) {
            if (from != local_out_) {
                continue;  // only embedded subscriptions take part in the handshake
            }
            // A new embedded subscription asks when its subscriptions are in effect: this one was
            // sent after them on the same pipe, so they are. Noted for make_sub (which asks via
            // call()); never forwarded upstream, never counted.
            if (d[0] == 1) {
                std::lock_guard lk(sync_mu);
                if (auto it = sync_expected.find(prefix); it != sync_expected.end()) {
                    it->second = true;
                }
            }
            continue;
        }
        if (d[0] == 1) {
            auto it = set.find(prefix);
            if (it == set.end()) {
                if (set.size() >= opt.max_subscriptions) {
                    ++c.subscriptions_refused;
                    continue;  // not forwarded: bounded state here and at every peer
                }
                it = set.emplace(prefix, sub_entry{0, now_ns()}).first;
            }
            ++it->second.refs;
            if (out_set != nullptr) {
                ++(*out_set)[prefix];
            }
        } else if (auto it = set.find(prefix); it != set.end()) {
            if (out_set != nullptr) {
                if (auto o = out_set->find(prefix); o != out_set->end() && --o->second <= 0) {
                    out_set->erase(o);
                }
            }
            if (--it->second.refs <= 0) {
                set.erase(it);
                if (from_local && rx_) {
                    rx_->forget_unless([&](std::string_view topic) {
                        return std::any_of(local_subs_.begin(), local_subs_.end(), [&](const auto& e) {
                            return topic.starts_with(e.first);
                        });
                    });
                }
            }
        } else {
            continue;  // unbalanced (a refused subscription leaving): nothing to forward
        }
        c.subscriptions_local = local_subs_.size();
        c.subscriptions_mesh = mesh_subs_.size();
        // Balanced pairs into every upstream XSUB; each XSUB reference-counts, so one source
        // leaving never cancels another's subscription. Peers' subscriptions go to client
        // publishers only (one hop); embedded publishers send everything (open_sockets).
        std::array<void*, 2> targets{client_in_, from_local ? mesh_in_ : nullptr};
        for (void* t : targets) {
            if (t == nullptr) {
                continue;
            }
            zmq_msg_t copy;
            zmq_msg_init(&copy);
            zmq_msg_copy(&copy, sub_.get());
            if (zmq_msg_send(&copy, t, 0) < 0) {
                zmq_msg_close(&copy);
            }
        }
    }
}

// ---- repair ----

void node_impl::setup_repair() {
    tail_ = std::make_unique<history_tail>(
        tail_options{opt.repair.window_bytes, opt.repair.window_age, 65536});
    repair_rx::sink s;
    s.deliver = [this](zmsg f) { deliver_mesh(std::move(f)); };
    s.nak = [this](const repair_rx::nak_request& r) {
        // address the node whose name starts the source ("<node>/<publisher>"), else all
        const auto node_name = std::string_view(r.source).substr(0, r.source.find('/'));
        std::string target = nak_all_topic_;
        int matches = 0;
        for (const auto& [k, p] : peers_.peers()) {
            if (p.info.name == node_name) {
                target = "_evmesh.nak." + p.info.id;
                ++matches;
            }
        }
        if (matches != 1) {
            target = nak_all_topic_;
        }
        std::string body;
        string_writer w{body};
        packer pk(w);
        pk.pack_array(8);
        pk.pack_uint8(0);
        pk.pack_uint8(ctl_nak);
        pack_str(pk, id_text);
        pack_str(pk, r.source);
        pack_str(pk, r.topic);
        pk.pack_uint64(r.from);
        pk.pack_uint64(r.to);
        pk.pack_int64(r.since_ns);
        send_control(target, body);
    };
    s.lost = [this](const lost_range& l) {
        std::uint64_t suppressed = 0;
        if (lost_log_.allow(suppressed)) {
            detail::log()->warn("evmesh node '{}': events lost for good: {} seq {}..{} on '{}' ({} "
                                "similar suppressed)", name, l.source, l.from, l.to, l.topic, suppressed);
        }
        std::lock_guard lk(snap_mu);
        lost_log.push_back(node::lost_range{l.source, l.topic, l.from, l.to});
        if (lost_log.size() > 1024) {
            lost_log.pop_front();
        }
    };
    s.since = [this](std::string_view topic) { return wanted_since(topic); };
    s.wall_now = [] { return now_ns(); };
    rx_ = std::make_unique<repair_rx>(
        repair_options{opt.repair.nak_interval, opt.repair.nak_retries, opt.repair.max_held, 65536},
        std::move(s));
}

bool node_impl::repaired(std::string_view topic) {
    // publishers repeat topics: a one-entry cache skips the pattern walk
    if (topic == repaired_topic_) {
        return repaired_answer_;
    }
    repaired_answer_ = std::any_of(repair_patterns_.begin(), repair_patterns_.end(),
                                   [&](const topic_pattern& p) { return p.matches(topic); });
    repaired_topic_.assign(topic);
    return repaired_answer_;
}

std::int64_t node_impl::wanted_since(std::string_view topic) const {
    // the earliest time a local subscription that covers `topic` was made
    std::int64_t since = 0;
    for (const auto& [prefix, e] : local_subs_) {
        if (topic.starts_with(prefix) && (since == 0 || e.since_ns < since)) {
            since = e.since_ns;
        }
    }
    return since == 0 ? now_ns() : since;
}

void node_impl::send_control(const std::string& topic, const std::string& body) {
    if (mesh_out_ == nullptr) {
        return;
    }
    std::string f;
    f.reserve(topic.size() + 1 + body.size());
    f.append(topic).push_back('\0');
    f.append(body);
    queue_control(f);
    flush_holds();
}

void node_impl::queue_control(std::string_view frame) {
    if (ctl_out_.size() >= max_ctl_queue) {
        ctl_out_.pop_front();  // bounded; the receiver asks again
    }
    ctl_out_.emplace_back(frame);
}

void node_impl::on_mesh_reserved(std::string_view topic, std::string_view body, zmsg& frame) {
    const auto now = clock::now();
    if (topic == ping_topic_) {
        answer_ping(topic, body);
        return;
    }
    if (topic == nak_topic_ || topic == nak_all_topic_) {
        serve_nak(body);
        return;
    }
    if (topic == rtx_topic_) {
        if (!rx_) {
            return;
        }
        if (codec::is_control_body(body)) {
            // [0, 3, source, topic, from, to, first_sent, lost_to]
            msgpack_reader r(body);
            std::uint64_t from = 0, to = 0, first = 0, lost_to = 0;
            std::string_view source, t;
            if (read_control_head(r, ctl_fill, 8) && r.read_str(source, 1024) == errc::ok && r.read_str(t, 1024) == errc::ok
                && r.read_uint(from) == errc::ok && r.read_uint(to) == errc::ok
                && r.read_uint(first) == errc::ok && r.read_uint(lost_to) == errc::ok) {
                rx_->on_fill(source, t, from, to, first, lost_to, now);
            }
            return;
        }
        zmsg inner(body);  // a retransmitted mesh frame
        std::string_view it, ib, source;
        std::int64_t time_ns = 0;
        std::uint64_t seq = 0;
        if (codec::split_mesh_frame(inner.view(), it, ib) && codec::peek_stream(ib, source, time_ns, seq)
            && seq != 0) {
            rx_->on_event(source, it, seq, std::move(inner), true, now);
        }
        return;
    }
    if (topic.starts_with("_evmesh.nak.") || topic.starts_with("_evmesh.rtx.")) {
        return;  // another node's repair traffic (a local `_evmesh.` subscriber asked for all)
    }
    deliver_mesh(std::move(frame));  // stats, pongs: for local subscribers
}

void node_impl::serve_nak(std::string_view body) {
    if (!tail_) {
        return;
    }
    msgpack_reader r(body);
    std::uint64_t from = 0, to = 0;
    std::int64_t since = 0;
    std::string_view requester, source, topic;
    if (!codec::is_control_body(body) || !read_control_head(r, ctl_nak, 8)
        || r.read_str(requester, 64) != errc::ok || r.read_str(source, 1024) != errc::ok
        || r.read_str(topic, 1024) != errc::ok || r.read_uint(from) != errc::ok
        || r.read_uint(to) != errc::ok || r.read_int(since) != errc::ok || from == 0 || to < from
        || requester.empty()) {
        return;
    }
    auto* st = tail_->find(source, topic);
    if (st == nullptr) {
        return;  // not a stream of this node: its owner answers
    }
    to = std::min(to, st->last_seq);
    if (to < from) {
        return;
    }
    const std::string reply = "_evmesh.rtx." + std::string(requester);
    const std::uint64_t first_retained = st->entries.empty() ? st->last_seq + 1 : st->entries.front().seq;
    std::uint64_t lost_to = 0;
    if (from < first_retained && st->evicted_upto >= from && (since == 0 || st->evicted_time_ns >= since)) {
        lost_to = std::min(to, first_retained - 1);  // aged out of the window
        // ... unless a history of this node records the topic: it answers for the part that aged
        // out, from disk; the requester asks for the rest (still in the window) next
        std::lock_guard lk(channel_stats_mu_);
        if (history_repair_ && std::any_of(history_repair_patterns_.begin(), history_repair_patterns_.end(),
                                           [&](const topic_pattern& p) { return p.matches(topic); })) {
            ++c.repair_history_requests;
            history_repair_(history_nak{std::string(requester), std::string(source), std::string(topic), from,
                                        lost_to, since});
            return;
        }
    }
    std::uint64_t first_sent = to + 1, last_sent = to;
    std::size_t sent = 0;
    std::string f;
    auto first = std::lower_bound(st->entries.begin(), st->entries.end(), from,
                                  [](const history_tail::entry& e, std::uint64_t v) { return e.seq < v; });
    for (auto it = first; it != st->entries.end(); ++it) {
        auto& e = *it;
        if (since != 0 && e.time_ns < since) {
            continue;  // older than the requester's subscription (start of a stream)
        }
        if (e.seq > to) {
            break;
        }
        if (sent == max_served_per_nak) {
            last_sent = e.seq - 1;  // the rest on the next request
            break;
        }
        f.assign(reply).push_back('\0');
        tail_->read(e, f);
        queue_control(f);
        first_sent = std::min(first_sent, e.seq);
        ++sent;
        ++c.repair_served;
    }
    send_fill(requester, source, topic, from, last_sent, first_sent > last_sent ? last_sent + 1 : first_sent, lost_to);
}

void node_impl::send_fill(std::string_view requester, std::string_view source, std::string_view topic,
                          std::uint64_t from, std::uint64_t last_sent, std::uint64_t first_sent,
                          std::uint64_t lost_to) {
    std::string fill;
    string_writer w{fill};
    packer pk(w);
    pk.pack_array(8);
    pk.pack_uint8(0);
    pk.pack_uint8(ctl_fill);
    pack_str(pk, source);
    pack_str(pk, topic);
    pk.pack_uint64(from);
    pk.pack_uint64(last_sent);
    pk.pack_uint64(first_sent);
    pk.pack_uint64(lost_to);
    send_control("_evmesh.rtx." + std::string(requester), fill);
}

void node_impl::set_history_repair(std::vector<topic_pattern> patterns, std::function<void(history_nak)> fn) {
    std::lock_guard lk(channel_stats_mu_);
    history_repair_patterns_ = std::move(patterns);
    history_repair_ = std::move(fn);
}

void node_impl::post_repair(history_nak job, std::vector<std::string> frames, std::uint64_t last_sent,
                            std::uint64_t first_sent, std::uint64_t lost_to) {
    std::lock_guard lock(mu_);
    if (!running) {
        return;
    }
    commands_.emplace_back([this, job = std::move(job), frames = std::move(frames), last_sent, first_sent, lost_to] {
        for (const auto& f : frames) {
            queue_control(f);
        }
        c.repair_served += frames.size();
        c.repair_from_history += frames.size();
        send_fill(job.requester, job.source, job.topic, job.from, last_sent, first_sent, lost_to);
    });
    const std::uint64_t one = 1;
    (void)!write(wake_fd_, &one, sizeof(one));
}

void node_impl::repair_tick() {
    const auto now = clock::now();
    rx_->tick(now);
    tail_->trim(now);
    // Stream heartbeats on each stream's own topic (so they reach exactly its subscribers):
    // after new events, and then once per window age while the stream is retained, so loss at
    // the tail of a stream is detected too.
    if (mesh_subs_.empty()) {
        return;
    }
    std::string body, f;
    tail_->for_each_stream([&](history_tail::stream& s) {
        if (s.last_seq == 0) {
            return;
        }
        const bool changed = s.hb_seq != s.last_seq;
        const bool recent = now - s.last_append < opt.repair.window_age;
        if (!changed && !(recent && now - s.hb_at >= std::chrono::seconds(1))) {
            return;
        }
        if (changed && now - s.hb_at < opt.repair.heartbeat) {
            return;
        }
        body.clear();
        string_writer w{body};
        packer pk(w);
        pk.pack_array(4);
        pk.pack_uint8(0);
        pk.pack_uint8(ctl_heartbeat);
        pack_str(pk, s.source);
        pk.pack_uint64(s.last_seq);
        f.assign(s.topic).push_back('\0');
        f.append(body);
        if (ctl_out_.size() < max_ctl_queue) {
            ctl_out_.emplace_back(f);
        }
        s.hb_seq = s.last_seq;
        s.hb_at = now;
    });
    flush_holds();
}

}  // namespace evmesh::detail
