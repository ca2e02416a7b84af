#include "reactor/repair.hpp"

#include <algorithm>

namespace evmesh::detail {

repair_rx::stream* repair_rx::get(std::string_view source, std::string_view topic) {
    if (last_ != nullptr && last_->topic == topic && last_->source == source) {
        return last_;
    }
    key_.assign(source);
    key_.push_back('\0');
    key_.append(topic);
    auto it = streams_.find(std::string_view(key_));
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

void repair_rx::on_event(std::string_view source, std::string_view topic, std::uint64_t seq,
                         zmsg frame, bool retransmitted, steady::time_point now) {
    stream* s = seq == 0 ? nullptr : get(source, topic);
    if (s == nullptr) {
        sink_.deliver(std::move(frame));  // unsequenced, or the table is full: pass through
        return;
    }
    if (s->next == 0) {
        if (retransmitted) {
            ++duplicates_;  // an answer to a request this stream no longer has
            return;
        }
        if (seq == 1) {
            s->next = 2;
            sink_.deliver(std::move(frame));
            return;
        }
        // The first event we see is not the first of the stream: we joined late, or its start
        // was lost. Ask for what was published since we began wanting the topic.
        s->next = 1;
        s->held.emplace(seq, std::move(frame));
        ++held_total_;
        open(*s, seq - 1, sink_.since ? sink_.since(s->topic) : 0, now);
        return;
    }
    if (seq < s->next) {
        ++duplicates_;
        return;
    }
    if (retransmitted) {
        ++recovered_;
    }
    if (seq == s->next) {
        ++s->next;
        sink_.deliver(std::move(frame));
        drain(*s);
        return;
    }
    if (!s->held.emplace(seq, std::move(frame)).second) {
        ++duplicates_;
        return;
    }
    ++held_total_;
    if (!s->open_gap) {
        open(*s, seq - 1, 0, now);
    } else if (!retransmitted && seq - 1 > s->gap_to) {
        s->gap_to = seq - 1;
    }
    if (held_total_ > opt_.max_held) {
        give_up(*s, s->held.begin()->first - 1);  // bounded memory: report instead of holding
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
    if (s->next == 0) {
        s->next = 1;
        open(*s, last_seq, sink_.since ? sink_.since(s->topic) : 0, now);
    } else if (last_seq >= s->next) {
        if (!s->open_gap) {
            open(*s, last_seq, 0, now);
        } else {
            s->gap_to = std::max(s->gap_to, last_seq);
        }
    }
}

void repair_rx::on_fill(std::string_view source, std::string_view topic, std::uint64_t from,
                        std::uint64_t to, std::uint64_t first_sent, std::uint64_t lost_to,
                        steady::time_point) {
    key_.assign(source);
    key_.push_back('\0');
    key_.append(topic);
    auto it = streams_.find(std::string_view(key_));
    if (it == streams_.end() || !it->second.open_gap) {
        return;
    }
    stream& s = it->second;
    if (lost_to >= from && lost_to >= s.next) {
        give_up(s, lost_to);  // aged out of the publisher's window: reported
    }
    // [lost_to + 1, first_sent - 1] precede our subscription: not wanted, skipped silently
    const std::uint64_t skip_to = std::min(first_sent == 0 ? 0 : first_sent - 1, to);
    if (skip_to >= s.next) {
        for (auto h = s.held.begin(); h != s.held.end() && h->first <= skip_to;) {
            ++duplicates_;  // cannot happen with an honest publisher; bounded anyway
            h = s.held.erase(h);
            --held_total_;
        }
        skipped_ += skip_to - s.next + 1;
        s.next = skip_to + 1;
        drain(s);
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

void repair_rx::drain(stream& s) {
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
        s.open_gap = true;
        s.gap_to = s.held.begin()->first - 1;
        s.tries = 0;
        s.since_ns = 0;
        send_nak(s, s.nak_at);
    }
}

void repair_rx::give_up(stream& s, std::uint64_t upto) {
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
    drain(s);
}

void repair_rx::tick(steady::time_point now) {
    for (auto& [k, s] : streams_) {
        if (!s.open_gap || now - s.nak_at < opt_.nak_interval) {
            continue;
        }
        if (s.next != s.next_at_nak) {
            // the answer is still arriving (the gap shrinks): wait for it instead of asking again
            s.next_at_nak = s.next;
            s.nak_at = now;
            continue;
        }
        if (s.tries >= opt_.nak_retries) {
            give_up(s, s.gap_to);
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
