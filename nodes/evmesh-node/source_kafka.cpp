// The "kafka" source (librdkafka): a member of a consumer group (the high-level consumer,
// rd_kafka_subscribe on `topics`, group.id = `group`).
//
// Offsets: enable.auto.commit and enable.auto.offset.store are off. A record's offset (+1) is
// committed (rd_kafka_commit with an explicit list) only after the node accepted its event, and
// ack_delay later (source_base.hpp ack_holder). The records of a partition are handled in order, so
// a committed offset means every record before it was accepted (or undecodable and counted). What
// was read but not committed when the node dies is read again by whoever gets the partition next
// (the restarted node: the same group), from the last committed offset: duplicates with the same
// id, never a loss. Partitions revoked by a rebalance get what the node accepted from them
// committed first (synchronously, in the rebalance callback); a lost assignment commits nothing.
// librdkafka defers a commit while the group coordinator is away; one that fails is made again a
// second later with the highest offset handed to a commit for each partition still assigned.
// librdkafka reconnects by itself; the consumer is made again only after a fatal error.
#include "source_base.hpp"

#include <cctype>
#include <cstring>

#include <librdkafka/rdkafka.h>
#include <spdlog/spdlog.h>

namespace evmesh::app {
namespace {

// The consumer configuration of a source; nullptr and a one-line reason when librdkafka refuses
// a property.
rd_kafka_conf_t* make_conf(const source_config& cfg, const std::string& bootstrap, const std::string& client_id,
                           std::string& error) {
    rd_kafka_conf_t* conf = rd_kafka_conf_new();
    char errstr[512];
    auto set = [&](const std::string& k, const std::string& v, bool user) {
        if (rd_kafka_conf_set(conf, k.c_str(), v.c_str(), errstr, sizeof errstr) != RD_KAFKA_CONF_OK) {
            error = (user ? "properties." : "") + k + " is refused by librdkafka: " + errstr;
            return false;
        }
        return true;
    };
    bool ok = set("bootstrap.servers", bootstrap, false) && set("group.id", cfg.group, false) &&
              set("client.id", client_id, false) && set("enable.auto.commit", "false", false) &&
              set("enable.auto.offset.store", "false", false) &&
              // a new group reads what the topics already hold (properties may say "latest")
              set("auto.offset.reset", "earliest", false);
    for (const auto& [k, v] : cfg.properties) {
        ok = ok && set(k, v, true);
    }
    if (!ok) {
        rd_kafka_conf_destroy(conf);
        return nullptr;
    }
    return conf;
}

// An offset to commit: the next record to read of one partition.
struct next_offset {
    std::string topic;
    int32_t partition = 0;
    int64_t offset = 0;
};

class kafka_source final : public inbound_source {
public:
    kafka_source(node& n, const source_config& cfg) : inbound_source(n, cfg) {
        bootstrap_ = *kafka_bootstrap(cfg_.url);  // validated
        client_id_ = cfg_.client_id.empty() ? default_consumer_name(n, cfg_) : cfg_.client_id;
    }

    ~kafka_source() override { stop(); }

private:
    void run() override {
        while (!stopping()) {
            std::string why;
            rd_kafka_t* rk = make_consumer(why);
            if (rk != nullptr) {
                why = consume(rk);
                close(rk);
            }
            if (stopping()) {
                break;
            }
            disconnected(why);
            if (!backoff()) {
                break;
            }
        }
    }

    rd_kafka_t* make_consumer(std::string& why) {
        rd_kafka_conf_t* conf = make_conf(cfg_, bootstrap_, client_id_, why);  // checked at start
        if (conf == nullptr) {
            return nullptr;
        }
        rd_kafka_conf_set_opaque(conf, this);
        rd_kafka_conf_set_rebalance_cb(conf, &kafka_source::on_rebalance);
        rd_kafka_conf_set_error_cb(conf, &kafka_source::on_error);
        rd_kafka_conf_set_log_cb(conf, &kafka_source::on_log);
        rd_kafka_conf_set_offset_commit_cb(conf, &kafka_source::on_commit);
        char errstr[512];
        rd_kafka_t* rk = rd_kafka_new(RD_KAFKA_CONSUMER, conf, errstr, sizeof errstr);  // takes conf on success
        if (rk == nullptr) {
            rd_kafka_conf_destroy(conf);
            why = std::string("cannot create the consumer: ") + errstr;
            return nullptr;
        }
        rd_kafka_poll_set_consumer(rk);  // every callback is served by rd_kafka_consumer_poll, on this thread
        rd_kafka_topic_partition_list_t* topics =
            rd_kafka_topic_partition_list_new(static_cast<int>(cfg_.topics.size()));
        for (const auto& t : cfg_.topics) {
            rd_kafka_topic_partition_list_add(topics, t.c_str(), RD_KAFKA_PARTITION_UA);
        }
        const rd_kafka_resp_err_t err = rd_kafka_subscribe(rk, topics);
        rd_kafka_topic_partition_list_destroy(topics);
        if (err != RD_KAFKA_RESP_ERR_NO_ERROR) {
            why = std::string("subscribe: ") + rd_kafka_err2str(err);
            rd_kafka_destroy_flags(rk, RD_KAFKA_DESTROY_F_NO_CONSUMER_CLOSE);
            return nullptr;
        }
        return rk;
    }

    // Polls and delivers until the source stops or the consumer hit a fatal error; the reason.
    std::string consume(rd_kafka_t* rk) {
        held_ = ack_holder<next_offset>(cfg_.ack_delay);
        ripe_.clear();
        retry_ = false;
        fatal_.clear();
        auto next_probe = std::chrono::steady_clock::now();
        while (!stopping()) {
            commit(rk, false);
            if (retry_ && std::chrono::steady_clock::now() >= retry_at_) {
                retry_commit(rk);
            }
            if (!fatal_.empty()) {
                return fatal_;
            }
            if (!counters_.connected && assigned_ && std::chrono::steady_clock::now() >= next_probe) {
                // back after an outage without a rebalance: connected once a broker answers
                next_probe = std::chrono::steady_clock::now() + std::chrono::seconds(1);
                const rd_kafka_metadata_t* md = nullptr;
                if (rd_kafka_metadata(rk, 0, nullptr, &md, 500) == RD_KAFKA_RESP_ERR_NO_ERROR) {
                    rd_kafka_metadata_destroy(md);
                    connected();
                }
            }
            rd_kafka_message_t* msg = rd_kafka_consumer_poll(rk, static_cast<int>(held_.wait_ms(1000)));
            if (msg == nullptr) {
                continue;
            }
            if (msg->err != RD_KAFKA_RESP_ERR_NO_ERROR) {
                // e.g. a topic that does not exist, a partition EOF, max.poll.interval exceeded
                const std::string e = rd_kafka_message_errstr(msg);
                rd_kafka_message_destroy(msg);
                if (e != last_error_) {
                    spdlog::warn("{}: {}", log_name_, e);
                    last_error_ = e;
                }
                continue;
            }
            if (!counters_.connected) {
                connected();
            }
            inbound_message m;
            next_offset next{rd_kafka_topic_name(msg->rkt), msg->partition, msg->offset + 1};
            to_message(msg, m);
            rd_kafka_message_destroy(msg);
            if (deliver(m) == delivery::stopping) {
                commit(rk, true);  // the node is alive and has them; this one is read again
                return "stopping";
            }
            held_.add(std::move(next));
        }
        commit(rk, true);  // a graceful stop: the node forwards what it accepted before it stops
        return "stopping";
    }

    static void to_message(const rd_kafka_message_t* msg, inbound_message& m) {
        if (msg->payload != nullptr) {
            m.body.assign(static_cast<const char*>(msg->payload), msg->len);
        }
        m.broker_topic = rd_kafka_topic_name(msg->rkt);
        // the CloudEvents Kafka binding, binary mode: headers ce_<attribute> and content-type
        rd_kafka_headers_t* hdrs = nullptr;
        if (rd_kafka_message_headers(msg, &hdrs) == RD_KAFKA_RESP_ERR_NO_ERROR) {
            const char* name = nullptr;
            const void* value = nullptr;
            size_t size = 0;
            for (size_t i = 0; rd_kafka_header_get_all(hdrs, i, &name, &value, &size) == RD_KAFKA_RESP_ERR_NO_ERROR;
                 ++i) {
                if (name == nullptr || value == nullptr) {
                    continue;
                }
                std::string k = name;
                for (char& c : k) {
                    c = static_cast<char>(std::tolower(static_cast<unsigned char>(c)));
                }
                std::string v(static_cast<const char*>(value), size);
                if (k == "content-type" || k == "content_type") {
                    m.content_type = std::move(v);
                } else if (k.rfind("ce_", 0) == 0 || k.rfind("ce-", 0) == 0) {
                    m.ce[k.substr(3)] = std::move(v);
                }
            }
        }
        // the record's place in its partition: the same on every delivery
        m.position = "kafka/" + m.broker_topic + "/" + std::to_string(msg->partition) + "/" + std::to_string(msg->offset);
    }

    // Commits the held offsets (all, or those held for ack_delay): the last of each partition.
    void commit(rd_kafka_t* rk, bool all, bool sync = false) {
        auto items = held_.take_ready(all);
        if (items.empty()) {
            return;
        }
        rd_kafka_topic_partition_list_t* list = rd_kafka_topic_partition_list_new(static_cast<int>(items.size()));
        for (const auto& it : items) {
            rd_kafka_topic_partition_t* p = rd_kafka_topic_partition_list_find(list, it.topic.c_str(), it.partition);
            if (p == nullptr) {
                p = rd_kafka_topic_partition_list_add(list, it.topic.c_str(), it.partition);
            }
            p->offset = it.offset;  // in order: the last one wins
            ripe_[{it.topic, it.partition}] = it.offset;
        }
        const rd_kafka_resp_err_t err = rd_kafka_commit(rk, list, sync ? 0 : 1);
        if (err != RD_KAFKA_RESP_ERR_NO_ERROR && err != RD_KAFKA_RESP_ERR__NO_OFFSET) {
            // not committed: read again after a restart or rebalance (the same ids)
            spdlog::debug("{}: commit: {}", log_name_, rd_kafka_err2str(err));
        }
        rd_kafka_topic_partition_list_destroy(list);
    }

    // A commit failed (e.g. while the coordinator was away): commit the highest ripe offset of
    // every partition still assigned again, so that a partition without newer records does not
    // stay behind. The highest: never older than what an earlier commit asked for.
    void retry_commit(rd_kafka_t* rk) {
        retry_ = false;
        rd_kafka_topic_partition_list_t* assigned = nullptr;
        if (rd_kafka_assignment(rk, &assigned) != RD_KAFKA_RESP_ERR_NO_ERROR || assigned == nullptr) {
            return;
        }
        rd_kafka_topic_partition_list_t* list = rd_kafka_topic_partition_list_new(assigned->cnt);
        for (int i = 0; i < assigned->cnt; ++i) {
            const auto& a = assigned->elems[i];
            if (auto it = ripe_.find({a.topic, a.partition}); it != ripe_.end()) {
                rd_kafka_topic_partition_list_add(list, a.topic, a.partition)->offset = it->second;
            }
        }
        if (list->cnt > 0) {
            rd_kafka_commit(rk, list, 1);
        }
        rd_kafka_topic_partition_list_destroy(list);
        rd_kafka_topic_partition_list_destroy(assigned);
    }

    // Closes the consumer (leaves the group, waits for the outstanding commits) within 10 s.
    void close(rd_kafka_t* rk) {
        bool closed = false;
        rd_kafka_queue_t* q = rd_kafka_queue_new(rk);
        if (rd_kafka_error_t* e = rd_kafka_consumer_close_queue(rk, q); e != nullptr) {
            rd_kafka_error_destroy(e);
        } else {
            const auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(10);
            while (!(closed = rd_kafka_consumer_closed(rk) != 0) && std::chrono::steady_clock::now() < deadline) {
                rd_kafka_queue_poll_callback(q, 100);
            }
        }
        rd_kafka_queue_destroy(q);
        rd_kafka_destroy_flags(rk, closed ? 0 : RD_KAFKA_DESTROY_F_NO_CONSUMER_CLOSE);
        assigned_ = false;
    }

    static void on_rebalance(rd_kafka_t* rk, rd_kafka_resp_err_t err, rd_kafka_topic_partition_list_t* partitions,
                             void* opaque) {
        auto* self = static_cast<kafka_source*>(opaque);
        const bool cooperative = std::strcmp(rd_kafka_rebalance_protocol(rk), "COOPERATIVE") == 0;
        if (err == RD_KAFKA_RESP_ERR__ASSIGN_PARTITIONS) {
            if (cooperative) {
                if (rd_kafka_error_t* e = rd_kafka_incremental_assign(rk, partitions); e != nullptr) {
                    rd_kafka_error_destroy(e);
                }
            } else {
                rd_kafka_assign(rk, partitions);
            }
            self->assigned_ = true;
            spdlog::info("{}: {} partition(s) assigned in group '{}'", self->log_name_, partitions->cnt,
                         self->cfg_.group);
            if (!self->counters_.connected) {
                self->connected();
            }
            return;
        }
        if (rd_kafka_assignment_lost(rk) != 0) {
            // the group went on without us: another member may have read them already
            self->held_.take_ready(true);
            spdlog::warn("{}: assignment lost: offsets not committed (read again)", self->log_name_);
        } else {
            self->commit(rk, true, true);  // what the node accepted from them, before another member reads
        }
        for (int i = 0; i < partitions->cnt; ++i) {
            // committed above (or lost): no longer ours to commit again
            self->ripe_.erase({partitions->elems[i].topic, partitions->elems[i].partition});
        }
        if (cooperative) {
            if (rd_kafka_error_t* e = rd_kafka_incremental_unassign(rk, partitions); e != nullptr) {
                rd_kafka_error_destroy(e);
            }
        } else {
            rd_kafka_assign(rk, nullptr);
        }
    }

    static void on_error(rd_kafka_t* rk, int err, const char* reason, void* opaque) {
        auto* self = static_cast<kafka_source*>(opaque);
        if (err == RD_KAFKA_RESP_ERR__FATAL) {
            char fatal[256] = "";
            rd_kafka_fatal_error(rk, fatal, sizeof fatal);
            self->fatal_ = std::string("fatal error: ") + fatal;
        } else if (err == RD_KAFKA_RESP_ERR__ALL_BROKERS_DOWN) {
            self->disconnected(std::string("all brokers are down (librdkafka reconnecting): ") + reason);
        } else {
            // transport errors repeat at every reconnect attempt
            spdlog::debug("{}: {}", self->log_name_, reason);
        }
    }

    static void on_log(const rd_kafka_t* rk, int level, const char* fac, const char* buf) {
        auto* self = static_cast<kafka_source*>(rd_kafka_opaque(rk));
        if (level <= 2) {
            spdlog::error("{}: librdkafka {}: {}", self->log_name_, fac, buf);
        } else {
            spdlog::debug("{}: librdkafka {}: {}", self->log_name_, fac, buf);
        }
    }

    // Served by rd_kafka_consumer_poll on the source's thread.
    static void on_commit(rd_kafka_t*, rd_kafka_resp_err_t err, rd_kafka_topic_partition_list_t* offsets,
                          void* opaque) {
        auto* self = static_cast<kafka_source*>(opaque);
        bool failed = err != RD_KAFKA_RESP_ERR_NO_ERROR && err != RD_KAFKA_RESP_ERR__NO_OFFSET;
        for (int i = 0; offsets != nullptr && i < offsets->cnt && !failed; ++i) {
            failed = offsets->elems[i].err != RD_KAFKA_RESP_ERR_NO_ERROR;
        }
        if (failed) {
            spdlog::debug("{}: offset commit failed: {} (committed again in 1 s)", self->log_name_,
                          rd_kafka_err2str(err));
            if (!self->retry_) {
                self->retry_ = true;
                self->retry_at_ = std::chrono::steady_clock::now() + std::chrono::seconds(1);
            }
        }
    }

    std::string bootstrap_, client_id_;
    ack_holder<next_offset> held_{std::chrono::milliseconds(0)};
    std::map<std::pair<std::string, int32_t>, int64_t> ripe_;  // the highest offset handed to a commit
    bool retry_ = false;                                         // a commit failed: again at retry_at_
    std::chrono::steady_clock::time_point retry_at_;
    std::string fatal_, last_error_;  // only touched on the source's thread (callbacks included)
    bool assigned_ = false;
};

}  // namespace

bool check_kafka_properties(const source_config& cfg, std::string& error) {
    auto bootstrap = kafka_bootstrap(cfg.url);
    if (!bootstrap) {
        error = "url must be kafka://host[:port][,host[:port]...]";
        return false;
    }
    rd_kafka_conf_t* conf = make_conf(cfg, *bootstrap, "evmesh-check", error);
    if (conf == nullptr) {
        return false;
    }
    rd_kafka_conf_destroy(conf);
    return true;
}

std::unique_ptr<inbound_source> make_kafka_source(node& n, const source_config& cfg) {
    return std::make_unique<kafka_source>(n, cfg);
}

}  // namespace evmesh::app
