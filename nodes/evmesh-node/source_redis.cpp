// The "redis" source: a consumer of a consumer group on a Redis stream (hiredis).
//
// XREADGROUP hands entries to this consumer and puts them in the group's pending entries list
// (PEL); an entry is XACKed only after the node accepted its event (and ack_delay later,
// source_base.hpp ack_holder). After a (re)connect the
// source first reads its own PEL from id 0 (what it had read but not acknowledged before a crash),
// then new entries (">"); every claim_idle it also takes over entries another consumer left
// pending that long (XAUTOCLAIM), e.g. of a node that is gone for good.
#include "source_base.hpp"

#include <sys/time.h>

#include <hiredis/hiredis.h>

namespace evmesh::app {
namespace {

struct reply_deleter {
    void operator()(redisReply* r) const {
        if (r != nullptr) {
            freeReplyObject(r);
        }
    }
};
using reply_ptr = std::unique_ptr<redisReply, reply_deleter>;

struct context_deleter {
    void operator()(redisContext* c) const {
        if (c != nullptr) {
            redisFree(c);
        }
    }
};
using context_ptr = std::unique_ptr<redisContext, context_deleter>;

class redis_source final : public inbound_source {
public:
    redis_source(node& n, const source_config& cfg) : inbound_source(n, cfg) {
        auto u = parse_broker_url(cfg_.url, {"redis"}, 6379);  // validated
        host_ = u->host;
        port_ = u->port;
        db_ = u->path;
        user_ = cfg_.username.empty() ? u->user : cfg_.username;
        password_ = cfg_.password.empty() ? u->password : cfg_.password;
        consumer_ = cfg_.consumer.empty() ? default_consumer_name(n, cfg_) : cfg_.consumer;
        broker_topic_ = cfg_.stream;
        for (char& c : broker_topic_) {
            if (c == ':' || c == '/') {
                c = '.';
            }
        }
    }

    ~redis_source() override { stop(); }

private:
    // Throws std::runtime_error on a connection error or an error reply (unless allowed).
    reply_ptr command(redisContext* c, const std::vector<std::string>& args, const char* allowed_error = nullptr) {
        std::vector<const char*> argv;
        std::vector<size_t> lens;
        for (const auto& a : args) {
            argv.push_back(a.data());
            lens.push_back(a.size());
        }
        reply_ptr r(static_cast<redisReply*>(redisCommandArgv(c, static_cast<int>(argv.size()), argv.data(), lens.data())));
        if (!r) {
            throw std::runtime_error(args[0] + ": " + (c->errstr[0] ? c->errstr : "connection lost"));
        }
        if (r->type == REDIS_REPLY_ERROR) {
            std::string e(r->str, r->len);
            if (allowed_error == nullptr || e.rfind(allowed_error, 0) != 0) {
                throw std::runtime_error(args[0] + ": " + e);
            }
        }
        return r;
    }

    void run() override {
        while (!stopping()) {
            try {
                context_ptr c(redisConnectWithTimeout(host_.c_str(), port_, {2, 0}));
                if (!c || c->err) {
                    throw std::runtime_error(c ? c->errstr : "out of memory");
                }
                // a blocking read waits 1 s at most; 10 s without a reply means the server is gone
                redisSetTimeout(c.get(), {10, 0});
                if (!password_.empty()) {
                    if (user_.empty()) {
                        command(c.get(), {"AUTH", password_});
                    } else {
                        command(c.get(), {"AUTH", user_, password_});
                    }
                }
                if (!db_.empty()) {
                    command(c.get(), {"SELECT", db_});
                }
                // the group from the stream's start, created with the stream when missing
                command(c.get(), {"XGROUP", "CREATE", cfg_.stream, cfg_.group, "0", "MKSTREAM"}, "BUSYGROUP");
                connected();
                consume(c.get());
            } catch (const std::runtime_error& e) {
                if (stopping()) {
                    break;
                }
                disconnected(e.what());
                if (!backoff()) {
                    break;
                }
            }
        }
    }

    // XACKs the held entries (all, or those held for ack_delay).
    void ack(redisContext* c, bool all) {
        auto ids = held_.take_ready(all);
        if (ids.empty()) {
            return;
        }
        std::vector<std::string> args = {"XACK", cfg_.stream, cfg_.group};
        args.insert(args.end(), ids.begin(), ids.end());
        command(c, args);
    }

    void consume(redisContext* c) {
        held_ = ack_holder<std::string>(cfg_.ack_delay);  // a new connection: the old held ones are pending again
        std::string from = "0";  // our own pending entries first, then new ones
        auto next_claim = std::chrono::steady_clock::now();
        while (!stopping()) {
            if (std::chrono::steady_clock::now() >= next_claim) {
                next_claim = std::chrono::steady_clock::now() + cfg_.claim_idle;
                // entries other consumers of the group left pending for claim_idle: take them over
                std::string cursor = "0-0";
                do {
                    auto r = command(c, {"XAUTOCLAIM", cfg_.stream, cfg_.group, consumer_,
                                         std::to_string(cfg_.claim_idle.count()), cursor, "COUNT",
                                         std::to_string(cfg_.batch)});
                    if (r->type != REDIS_REPLY_ARRAY || r->elements < 2) {
                        break;
                    }
                    cursor.assign(r->element[0]->str, r->element[0]->len);
                    if (!handle_entries(c, r->element[1])) {
                        return;
                    }
                } while (cursor != "0-0" && !stopping());
            }
            ack(c, false);
            auto r = command(c, {"XREADGROUP", "GROUP", cfg_.group, consumer_, "COUNT", std::to_string(cfg_.batch),
                                 "BLOCK", std::to_string(held_.wait_ms(1000)), "STREAMS", cfg_.stream, from});
            if (r->type != REDIS_REPLY_ARRAY || r->elements == 0) {
                continue;  // nil: nothing new within the block time
            }
            const redisReply* entries = r->element[0]->elements >= 2 ? r->element[0]->element[1] : nullptr;
            if (from != ">" && (entries == nullptr || entries->elements == 0)) {
                from = ">";  // the pending list is done
                continue;
            }
            if (entries != nullptr && !handle_entries(c, entries)) {
                return;
            }
            if (from != ">" && entries != nullptr) {
                // reading our pending list: go on after the last entry (held ones are still in it)
                const redisReply* last = entries->element[entries->elements - 1];
                if (last->type == REDIS_REPLY_ARRAY && last->elements >= 1 && last->element[0]->type == REDIS_REPLY_STRING) {
                    from.assign(last->element[0]->str, last->element[0]->len);
                }
            }
        }
        ack(c, true);  // a graceful stop: the node forwards what it accepted before it stops
    }

    // Delivers each entry and holds the accepted ones for acknowledgement. False when stopping.
    bool handle_entries(redisContext* c, const redisReply* entries) {
        bool go_on = true;
        for (std::size_t i = 0; i < entries->elements && go_on; ++i) {
            const redisReply* e = entries->element[i];
            if (e->type != REDIS_REPLY_ARRAY || e->elements < 2 || e->element[0]->type != REDIS_REPLY_STRING) {
                continue;
            }
            std::string id(e->element[0]->str, e->element[0]->len);
            const redisReply* fields = e->element[1];
            if (fields->type != REDIS_REPLY_ARRAY) {
                held_.add(id);  // deleted from the stream (XDEL/trimmed) while pending: nothing to deliver
                continue;
            }
            inbound_message m;
            m.broker_topic = broker_topic_;
            m.position = "redis/" + cfg_.stream + "/" + id;
            bool has_body = false;
            std::map<std::string, std::string> attrs;
            for (std::size_t k = 0; k + 1 < fields->elements; k += 2) {
                std::string name(fields->element[k]->str, fields->element[k]->len);
                std::string value(fields->element[k + 1]->str, fields->element[k + 1]->len);
                if (name == cfg_.field) {
                    m.body = std::move(value);
                    has_body = true;
                } else if (name == "datacontenttype" || name == "content-type" || name == "content_type") {
                    m.content_type = std::move(value);
                } else {
                    attrs[name] = std::move(value);
                }
            }
            // fields are CloudEvents attributes (as the redis bridge writes them) only with specversion
            if (attrs.count("specversion") != 0) {
                m.ce = std::move(attrs);
            }
            if (!has_body) {
                m.undecodable = "the entry has no field '" + cfg_.field + "'";
            }
            if (deliver(m) == delivery::stopping) {
                go_on = false;
                break;
            }
            held_.add(id);
        }
        if (!go_on) {
            ack(c, true);  // the node is alive and has them
        }
        return go_on;
    }

    std::string host_, db_, user_, password_, consumer_, broker_topic_;
    ack_holder<std::string> held_{std::chrono::milliseconds(0)};
    int port_ = 6379;
};

}  // namespace

std::unique_ptr<inbound_source> make_redis_source(node& n, const source_config& cfg) {
    return std::make_unique<redis_source>(n, cfg);
}

}  // namespace evmesh::app
