#include "reactor/repair.hpp"

#include <algorithm>

namespace evmesh::detail {

repair_rx::stream* repair_rx::get(std::string_view source, std::string_view topic) {
    if (last_ != nullptr && last_->topic == topic && last_->source == source) {
        return last_;
    }
    auto it = streams_.find(stream_key(key_, source, topic));
    if (it == streams_.end()) {
        if (streams_.size() >= opt_.max_streams) {
            return nullptr;
        }
        stream s;
        s.source.assign(source);
        s.topic.assign(topic);
        it = streams_.emplace(key_, std::move(s)).first;
    }
    last_ = &it->second;
    return last_;
}

void repair_rx::start(stream& s, std::uint64_t seq, zmsg frame, steady::time_point now) {
    if (seq == 1) {
        s.next = 2;
        sink_.deliver(std::move(frame));
        return;
    }
    // The first event we see is not the first of the stream: we joined late, or its start was
    // lost. Ask for what was published since we began wanting the topic.
    s.next = 1;
    s.held.emplace(seq, std::move(frame));
    ++held_total_;
    open(s, seq - 1, since_for(s), now);
}

std::int64_t repair_rx::since_for(const stream& s) const {
    // never before a stream we forgot (idle) could have been delivered already
    const std::int64_t since = sink_.since ? sink_.since(s.topic) : 1;
    return std::max(since, forgotten_at_ns_);
}

void repair_rx::restart(stream& s, steady::time_point now) {
    // The publisher numbers this stream afresh (it restarted): what the old numbering still
    // missed is reported, what it held is delivered, and the stream starts over.
    if (s.open_gap || !s.held.empty()) {
        give_up(s, s.held.empty() ? s.gap_to : std::max(s.gap_to, s.held.rbegin()->first), now);
    }
    s.next = 0;
    s.open_gap = false;
    s.gap_to = 0;
    s.since_ns = 0;
    s.tries = 0;
    ++restarts_;
}

void repair_rx::on_event(std::string_view source, std::string_view topic, std::uint64_t seq,
                         zmsg frame, bool retransmitted, steady::time_point now) {
    stream* s = seq == 0 ? nullptr : get(source, topic);
    if (s == nullptr) {
        sink_.deliver(std::move(frame));  // unsequenced, or the table is full: pass through
        return;
    }
    s->last_active = now;
    if (s->next == 0) {
        if (retransmitted) {
            ++duplicates_;  // an answer to a request this stream no longer has
            return;
        }
        start(*s, seq, std::move(frame), now);
        return;
    }
    if (seq < s->next) {
        if (retransmitted) {
            ++duplicates_;
            return;
        }
        // A live link never repeats or reorders a stream (one path, ZeroMQ keeps order): a seq
        // that goes back is the publisher numbering the stream afresh.
        restart(*s, now);
        start(*s, seq, std::move(frame), now);
        return;
    }
    if (retransmitted) {
        ++recovered_;
    }
    if (seq == s->next) {
        ++s->next;
        sink_.deliver(std::move(frame));
        drain(*s, now);
        return;
    }
    if (!s->held.emplace(seq, std::move(frame)).second) {
        ++duplicates_;
        return;
    }
    ++held_total_;
    if (!s->open_gap) {
        open(*s, seq - 1, 0, now);
    }
    // an open gap is never widened over held events: drain() opens the next hole once this one
    // is filled, so a request never covers what is already here
    if (held_total_ > opt_.max_held) {
        give_up(*s, s->held.begin()->first - 1, now);  // bounded memory: report instead of holding
    }
}

void repair_rx::on_heartbeat(std::string_view source, std::string_view topic,
                             std::uint64_t last_seq, steady::time_point now) {
    if (last_seq == 0) {
        return;
    }
    stream* s = get(source, topic);
    if (s == nullptr) {
        return;
    }
    s->last_active = now;
    if (s->next != 0 && last_seq + 1 < s->next && !s->open_gap && s->held.empty()) {
        restart(*s, now);  // the publisher's newest seq is behind us: it numbers afresh
    }
    if (s->next == 0) {
        s->next = 1;
        open(*s, last_seq, since_for(*s), now);
    } else if (last_seq >= s->next && !s->open_gap && s->held.empty()) {
        open(*s, last_seq, 0, now);  // the tail of the stream was lost
    }
}

void repair_rx::on_fill(std::string_view source, std::string_view topic, std::uint64_t from,
                        std::uint64_t to, std::uint64_t first_sent, std::uint64_t lost_to,
                        steady::time_point now) {
    auto it = streams_.find(stream_key(key_, source, topic));
    if (it == streams_.end() || !it->second.open_gap) {
        return;
    }
    stream& s = it->second;
    // never beyond the gap we asked for, nor over events we hold
    std::uint64_t limit = std::min(to, s.gap_to);
    if (!s.held.empty()) {
        limit = std::min(limit, s.held.begin()->first - 1);
    }
    if (lost_to >= from && lost_to >= s.next) {
        give_up(s, std::min(lost_to, limit), now);  // aged out of the publisher's window: reported
    }
    // [lost_to + 1, first_sent - 1] was not sent: older than our subscription when the request
    // carried a `since` (skipped, not wanted), otherwise missing at the publisher (reported)
    const std::uint64_t skip_to = std::min(first_sent == 0 ? 0 : first_sent - 1, limit);
    if (skip_to >= s.next && s.open_gap) {
        if (s.since_ns != 0) {
            skipped_ += skip_to - s.next + 1;
            s.next = skip_to + 1;
            drain(s, now);
        } else {
            give_up(s, skip_to, now);
        }
    }
}

void repair_rx::open(stream& s, std::uint64_t to, std::int64_t since, steady::time_point now) {
    s.open_gap = true;
    s.gap_to = to;
    s.since_ns = since;
    s.tries = 0;
    send_nak(s, now);
}

void repair_rx::send_nak(stream& s, steady::time_point now) {
    s.nak_at = now;
    s.next_at_nak = s.next;
    ++s.tries;
    ++naks_;
    if (sink_.nak) {
        sink_.nak(nak_request{s.source, s.topic, s.next, s.gap_to, s.since_ns});
    }
}

void repair_rx::drain(stream& s, steady::time_point now) {
    while (!s.held.empty() && s.held.begin()->first <= s.next) {
        auto node = s.held.extract(s.held.begin());
        --held_total_;
        if (node.key() == s.next) {
            ++s.next;
            sink_.deliver(std::move(node.mapped()));
        } else {
            ++duplicates_;
        }
    }
    if (s.open_gap && s.next > s.gap_to) {
        s.open_gap = false;
        s.tries = 0;
        s.since_ns = 0;
    }
    if (!s.open_gap && !s.held.empty()) {
        // another hole further on: repair it too
        open(s, s.held.begin()->first - 1, 0, now);
    }
}

void repair_rx::give_up(stream& s, std::uint64_t upto, steady::time_point now) {
    std::uint64_t cur = s.next;
    while (!s.held.empty() && s.held.begin()->first <= upto) {
        auto node = s.held.extract(s.held.begin());
        --held_total_;
        if (node.key() > cur) {
            lost_ += node.key() - cur;
            if (sink_.lost) {
                sink_.lost(lost_range{s.source, s.topic, cur, node.key() - 1});
            }
        }
        if (node.key() >= cur) {
            sink_.deliver(std::move(node.mapped()));
            cur = node.key() + 1;
        }
    }
    if (cur <= upto) {
        lost_ += upto - cur + 1;
        if (sink_.lost) {
            sink_.lost(lost_range{s.source, s.topic, cur, upto});
        }
        cur = upto + 1;
    }
    s.next = std::max(s.next, cur);
    s.open_gap = false;
    s.tries = 0;
    s.since_ns = 0;
    drain(s, now);
}

void repair_rx::tick(steady::time_point now) {
    for (auto it = streams_.begin(); it != streams_.end();) {
        auto& s = it->second;
        if (!s.open_gap) {
            // a stream idle for long holds no state worth keeping: its next event starts it
            // afresh (the start-of-stream request recovers what a short silence hid)
            if (s.held.empty() && now - s.last_active > opt_.idle_after) {
                if (last_ == &s) {
                    last_ = nullptr;
                }
                forgotten_at_ns_ = sink_.wall_now ? sink_.wall_now() : 0;
                it = streams_.erase(it);
                continue;
            }
            ++it;
            continue;
        }
        ++it;
        if (now - s.nak_at < opt_.nak_interval) {
            continue;
        }
        if (s.next != s.next_at_nak) {
            // the answer is still arriving (the gap shrinks): wait for it instead of asking again
            s.next_at_nak = s.next;
            s.nak_at = now;
            continue;
        }
        if (s.tries >= opt_.nak_retries) {
            give_up(s, s.gap_to, now);
        } else {
            send_nak(s, now);
        }
    }
}

void repair_rx::forget_unless(const std::function<bool(std::string_view)>& wanted) {
    for (auto it = streams_.begin(); it != streams_.end();) {
        if (wanted(it->second.topic)) {
            ++it;
            continue;
        }
        held_total_ -= it->second.held.size();
        if (last_ == &it->second) {
            last_ = nullptr;
        }
        it = streams_.erase(it);
    }
}

}  // namespace evmesh::detail
