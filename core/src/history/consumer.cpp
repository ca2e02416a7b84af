#include "history/consumer.hpp"

#include <cstdio>
#include <fstream>
#include <sstream>

#include <fcntl.h>
#include <unistd.h>

#include "history/store.hpp"

namespace evmesh::detail {

namespace {

std::string_view frame_topic_of(std::string_view frame) {
    auto z = frame.find('\0');
    return z == std::string_view::npos ? frame : frame.substr(0, z);
}

constexpr auto save_every = std::chrono::milliseconds(100);
constexpr auto member_window = std::chrono::seconds(30);

}  // namespace

// The state file, text so that an operator can read it:
//   evmesh-consumer 1
//   filter <pattern>
//   ack_wait_ms <n>
//   max_deliver <n>
//   dead_letter <topic or ->
//   floor <n>
//   next <n>
//   out <pos> <deliveries>      (one line per outstanding position)
std::unique_ptr<consumer> consumer::open(history_store& store, const std::string& dir, consumer_config cfg,
                                         std::string& error) {
    // the path first: an argument that moves `cfg` may be evaluated before one that reads it
    // (all consumers once shared "consumer-.state" that way)
    std::string path = dir + "/consumer-" + cfg.name + ".state";
    std::unique_ptr<consumer> c(new consumer(store, std::move(path), std::move(cfg)));
    if (!c->load(error)) {
        return nullptr;
    }

    c->save(true);
    return c;
}

bool consumer::load(std::string& error) {
    std::ifstream in(path_);
    if (!in) {
        // a new consumer: from the first event kept, or from the head
        floor_ = next_ = cfg_.from_new ? store_.next_pos() : store_.first_pos();
        dirty_ = true;
        return true;
    }
    std::string line, magic;
    std::getline(in, line);
    if (line != "evmesh-consumer 1") {
        error = "consumer '" + cfg_.name + "': " + path_ + " is not a consumer state file";
        return false;
    }
    while (std::getline(in, line)) {
        std::istringstream ls(line);
        std::string key;
        ls >> key;
        if (key == "filter") {
            std::string f;
            ls >> f;
            auto p = topic_pattern::parse(f);
            if (p) {
                cfg_.filter_text = f;
                cfg_.filter = std::move(*p);
            }
        } else if (key == "ack_wait_ms") {
            long long v = 0;
            ls >> v;
            cfg_.ack_wait = std::chrono::milliseconds(v);
        } else if (key == "max_deliver") {
            ls >> cfg_.max_deliver;
        } else if (key == "dead_letter") {
            std::string t;
            ls >> t;
            cfg_.dead_letter = t == "-" ? "" : t;
        } else if (key == "floor") {
            ls >> floor_;
        } else if (key == "next") {
            ls >> next_;
        } else if (key == "out") {
            std::uint64_t pos = 0;
            std::uint32_t d = 0;
            ls >> pos >> d;
            redeliver_[pos] = d;  // what was outstanding at the save is delivered again
        }
    }
    if (next_ < floor_) {
        next_ = floor_;
    }
    return true;
}

void consumer::save(bool force) {
    const auto now = std::chrono::steady_clock::now();
    if (!force && (!dirty_ || now - last_save_ < save_every)) {
        return;
    }
    last_save_ = now;
    dirty_ = false;
    std::string text = "evmesh-consumer 1\n";
    text += "filter " + cfg_.filter_text + "\n";
    text += "ack_wait_ms " + std::to_string(cfg_.ack_wait.count()) + "\n";
    text += "max_deliver " + std::to_string(cfg_.max_deliver) + "\n";
    text += "dead_letter " + (cfg_.dead_letter.empty() ? std::string("-") : cfg_.dead_letter) + "\n";
    text += "floor " + std::to_string(floor_) + "\n";
    text += "next " + std::to_string(next_) + "\n";
    for (const auto& [pos, e] : pending_) {
        text += "out " + std::to_string(pos) + " " + std::to_string(e.deliveries) + "\n";
    }
    for (const auto& [pos, d] : redeliver_) {
        text += "out " + std::to_string(pos) + " " + std::to_string(d) + "\n";
    }
    // atomically: a crash leaves the old file or the new one
    const std::string tmp = path_ + ".tmp";
    const int fd = ::open(tmp.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
    if (fd < 0) {
        dirty_ = true;
        return;
    }
    const bool ok = ::write(fd, text.data(), text.size()) == static_cast<ssize_t>(text.size());
    ::close(fd);
    if (!ok || std::rename(tmp.c_str(), path_.c_str()) != 0) {
        dirty_ = true;
    }
}

void consumer::advance_floor() {
    // every position in [floor, next) that is neither pending nor to be redelivered is done
    while (floor_ < next_) {
        const auto p = pending_.empty() ? UINT64_MAX : pending_.begin()->first;
        const auto r = redeliver_.empty() ? UINT64_MAX : redeliver_.begin()->first;
        const auto lowest = std::min(p, r);
        floor_ = std::min(lowest, next_);
        break;
    }
}

std::vector<consumer_message> consumer::take(std::size_t max, std::chrono::steady_clock::time_point now,
                                             const std::string& member) {
    std::vector<consumer_message> out;
    members_[member] = now;
    // retention may have removed what was outstanding: counted, not delivered
    const auto first = store_.first_pos();
    while (!redeliver_.empty() && redeliver_.begin()->first < first) {
        redeliver_.erase(redeliver_.begin());
        ++lost_;
        dirty_ = true;
    }
    if (next_ < first) {
        next_ = first;  // never delivered, already gone (counted as lost by the history's expiry)
        dirty_ = true;
    }
    std::string frame;
    std::int64_t t = 0;
    for (auto it = redeliver_.begin(); out.size() < max && it != redeliver_.end();) {
        if (cfg_.max_deliver != 0 && it->second >= cfg_.max_deliver) {
            ++it;  // delivered enough: expire() dead-letters it
            continue;
        }
        const auto pos = it->first;
        const auto d = it->second + 1;
        it = redeliver_.erase(it);
        if (!store_.read(pos, frame, t)) {
            ++lost_;
            continue;
        }
        pending_[pos] = {now + cfg_.ack_wait, d};
        ++redelivered_;
        out.push_back({pos, d, frame});
        dirty_ = true;
    }
    if (out.size() < max && next_ < store_.next_pos()) {
        const auto want = max - out.size();
        const auto end = store_.scan(next_, want * 64, [&](const stored_record& r) {
            if (cfg_.filter && !cfg_.filter->matches(frame_topic_of(r.frame))) {
                return true;
            }
            pending_[r.pos] = {now + cfg_.ack_wait, 1};
            out.push_back({r.pos, 1, std::string(r.frame)});
            ++delivered_;
            return out.size() < max;
        });
        if (end > next_) {
            next_ = end;
            dirty_ = true;
        }
    }
    advance_floor();
    return out;
}

bool consumer::ack(std::uint64_t pos) {
    bool known = pending_.erase(pos) > 0;
    known = redeliver_.erase(pos) > 0 || known;  // a late ack after the wait passed still counts
    if (known) {
        ++acked_;
        dirty_ = true;
        advance_floor();
    }
    return known;
}

bool consumer::nak(std::uint64_t pos) {
    auto it = pending_.find(pos);
    if (it == pending_.end()) {
        return false;
    }
    redeliver_[pos] = it->second.deliveries;
    pending_.erase(it);
    ++naked_;
    dirty_ = true;
    return true;
}

bool consumer::in_progress(std::uint64_t pos, std::chrono::steady_clock::time_point now) {
    auto it = pending_.find(pos);
    if (it == pending_.end()) {
        return false;
    }
    it->second.deadline = now + cfg_.ack_wait;
    return true;
}

void consumer::expire(std::chrono::steady_clock::time_point now,
                      const std::function<void(std::uint64_t, const std::string&, std::uint32_t)>& dead) {
    std::string frame;
    std::int64_t t = 0;
    for (auto it = pending_.begin(); it != pending_.end();) {
        if (it->second.deadline > now) {
            ++it;
            continue;
        }
        const auto pos = it->first;
        const auto d = it->second.deliveries;
        it = pending_.erase(it);
        dirty_ = true;
        if (cfg_.max_deliver != 0 && d >= cfg_.max_deliver) {
            ++dead_lettered_;
            if (store_.read(pos, frame, t)) {
                dead(pos, frame, d);
            }
            continue;
        }
        redeliver_[pos] = d;
    }
    // so does a nak'd message that reached max_deliver
    if (cfg_.max_deliver != 0) {
        for (auto it = redeliver_.begin(); it != redeliver_.end();) {
            if (it->second < cfg_.max_deliver) {
                ++it;
                continue;
            }
            ++dead_lettered_;
            if (store_.read(it->first, frame, t)) {
                dead(it->first, frame, it->second);
            }
            it = redeliver_.erase(it);
            dirty_ = true;
        }
    }
    for (auto it = members_.begin(); it != members_.end();) {
        it = now - it->second > member_window ? members_.erase(it) : std::next(it);
    }
    advance_floor();
}

bool consumer::ready() { return !redeliver_.empty() || next_ < store_.next_pos(); }

consumer_stats consumer::stats(std::chrono::steady_clock::time_point now) const {
    consumer_stats s;
    s.name = cfg_.name;
    s.filter = cfg_.filter_text;
    s.ack_floor = floor_;
    s.next = next_;
    s.lag = store_.next_pos() > next_ ? store_.next_pos() - next_ : 0;
    s.pending = pending_.size();
    s.redeliver_queue = redeliver_.size();
    for (const auto& [m, t] : members_) {
        s.members += now - t <= member_window ? 1 : 0;
    }
    s.delivered = delivered_;
    s.redelivered = redelivered_;
    s.acked = acked_;
    s.naked = naked_;
    s.dead_lettered = dead_lettered_;
    s.lost = lost_;
    s.ack_wait_ms = cfg_.ack_wait.count();
    s.max_deliver = cfg_.max_deliver;
    return s;
}

}  // namespace evmesh::detail
