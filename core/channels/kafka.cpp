// The "kafka" bridge (librdkafka): an idempotent producer (enable.idempotence: acks=all, and the
// broker drops a batch the producer re-sent within its session), topic and key from templates,
// the CloudEvents Kafka protocol binding in binary mode: headers ce_specversion, ce_id, ce_source,
// ce_type, ce_time (ce_seq, ce_<extension>) and content-type, the payload as the record value.
// Delivered = the delivery report said the record is written (acks=all: by every in-sync replica).
//
// One producer per channel instance (librdkafka is thread-safe and batches the workers' records);
// a thread of ours serves its delivery reports, each of which wakes the worker waiting for it.
#include "bridge_common.hpp"

#include <librdkafka/rdkafka.h>

#include <atomic>
#include <memory>
#include <shared_mutex>
#include <thread>

namespace evmesh::channels {
namespace {

using namespace bridge;

// What one worker waits for; shared with the delivery-report callback, so a worker that gave up
// (its timeout) leaves nothing dangling behind.
struct report {
    std::mutex mutex;
    std::condition_variable cv;
    bool done = false;
    rd_kafka_resp_err_t err = RD_KAFKA_RESP_ERR_NO_ERROR;
    int32_t partition = -1;
    int64_t offset = -1;
};

// Kafka topic names: [a-zA-Z0-9._-], at most 249 characters. Other characters of substituted
// values become '_'.
bool topic_char(char c) {
    return (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9') || c == '.' || c == '_' ||
           c == '-';
}
void topic_escape(std::string& out, std::string_view v) {
    for (char c : v) out += topic_char(c) ? c : '_';
}

// Errors after which no retry of this record can succeed.
bool permanent(rd_kafka_resp_err_t err) {
    return err == RD_KAFKA_RESP_ERR_MSG_SIZE_TOO_LARGE || err == RD_KAFKA_RESP_ERR_INVALID_MSG_SIZE ||
           err == RD_KAFKA_RESP_ERR_RECORD_LIST_TOO_LARGE || err == RD_KAFKA_RESP_ERR_INVALID_RECORD ||
           err == RD_KAFKA_RESP_ERR_TOPIC_EXCEPTION || err == RD_KAFKA_RESP_ERR__INVALID_ARG;
}

class kafka_bridge {
public:
    static constexpr const char* plugin_name = "kafka";
    static constexpr const char* description = "Kafka idempotent producer, delivered = delivery report (acks=all)";

    explicit kafka_bridge(const evmesh_host& host) : log_(host) {
        settings s(plugin_name, host.settings_json);
        brokers_ = s.required_string("brokers");
        topic_ = template_setting(s, "topic", std::nullopt);
        for (char c : topic_.literal_text())
            if (!topic_char(c)) s.fail("topic", "may only contain [a-zA-Z0-9._-] besides template fields");
        if (s.has("key")) {
            key_ = template_setting(s, "key", std::nullopt, true);
            has_key_ = true;
        }
        timeout_ms_ = s.duration_ms_or("timeout_ms", 30000);
        linger_ms_ = s.integer_or("linger_ms", 1, 0, 900000);
        properties_ = s.string_table("properties");
        for (const auto& [k, v] : properties_) {
            if (k == "enable.idempotence" && v != "true")
                s.fail("properties.enable.idempotence", "must stay true (the bridge's duplicate guarantee)");
            if (k == "bootstrap.servers" || k == "message.timeout.ms" || k == "delivery.timeout.ms")
                s.fail("properties." + k, "is set by the plugin (brokers, timeout_ms)");
        }
        mode_ = mode_setting(s);
        // build one producer now: a bad property is a configuration error at start
        producer_ = make_producer(&s);
        s.finish();
    }

    ~kafka_bridge() { producer_.reset(); }

    kafka_bridge(const kafka_bridge&) = delete;
    kafka_bridge& operator=(const kafka_bridge&) = delete;

    evmesh_status deliver(const evmesh_event& ev, const evmesh_attempt&, evmesh_result& r) {
        event_fields f(ev);
        std::string topic = topic_.expand(f, topic_escape);
        if (topic.empty() || topic.size() > 249 || topic == "." || topic == "..") {
            set_detail(&r, "topic \"%s\" (from \"%s\") is not a valid Kafka topic name", printable(topic, 80).c_str(),
                       printable(topic_.text(), 80).c_str());
            return EVMESH_FAIL;
        }
        std::string key = has_key_ ? key_.expand(f) : std::string();
        message_body body = make_body(ev, mode_);

        rd_kafka_headers_t* headers = rd_kafka_headers_new(8);
        if (mode_ == body_mode::binary)
            for (const auto& [k, v] : ce_attributes(ev))
                rd_kafka_header_add(headers, ("ce_" + k).c_str(), -1, v.data(), static_cast<ssize_t>(v.size()));
        if (!body.content_type.empty())
            rd_kafka_header_add(headers, "content-type", -1, body.content_type.data(),
                                static_cast<ssize_t>(body.content_type.size()));

        auto rep = std::make_shared<report>();
        std::shared_lock lock(producer_mutex_);
        producer& p = *producer_;
        uint64_t generation = p.generation;
        auto* opaque = new std::shared_ptr<report>(rep);  // owned by the delivery report from here
        rd_kafka_resp_err_t err = rd_kafka_producev(
            p.rk, RD_KAFKA_V_TOPIC(topic.c_str()), RD_KAFKA_V_MSGFLAGS(RD_KAFKA_MSG_F_COPY),
            RD_KAFKA_V_VALUE(body.bytes.data(), body.bytes.size()),
            RD_KAFKA_V_KEY(has_key_ ? key.data() : nullptr, has_key_ ? key.size() : 0), RD_KAFKA_V_HEADERS(headers),
            RD_KAFKA_V_OPAQUE(opaque), RD_KAFKA_V_END);
        if (err != RD_KAFKA_RESP_ERR_NO_ERROR) {
            delete opaque;
            rd_kafka_headers_destroy(headers);  // not taken over on failure
            set_detail(&r, "produce: %s", rd_kafka_err2str(err));
            r.code = static_cast<int32_t>(err);
            if (err == RD_KAFKA_RESP_ERR__QUEUE_FULL) r.retry_after_ms = 100;
            if (err == RD_KAFKA_RESP_ERR__FATAL) {
                lock.unlock();
                recover(generation);
            }
            return permanent(err) ? EVMESH_FAIL : EVMESH_RETRY;
        }
        lock.unlock();

        // librdkafka reports every record by message.timeout.ms at the latest; the margin covers a
        // report that is late because the poll thread is busy.
        std::unique_lock wait(rep->mutex);
        if (!rep->cv.wait_for(wait, std::chrono::milliseconds(timeout_ms_ + 5000), [&] { return rep->done; })) {
            set_detail(&r, "no delivery report within %lld ms", static_cast<long long>(timeout_ms_ + 5000));
            return EVMESH_RETRY;
        }
        if (rep->err == RD_KAFKA_RESP_ERR_NO_ERROR) return EVMESH_DELIVERED;
        set_detail(&r, "%s", rd_kafka_err2str(rep->err));
        r.code = static_cast<int32_t>(rep->err);
        if (rep->err == RD_KAFKA_RESP_ERR__FATAL) {
            wait.unlock();
            recover(generation);
        }
        return permanent(rep->err) ? EVMESH_FAIL : EVMESH_RETRY;
    }

private:
    // A librdkafka producer and the thread serving its callbacks.
    struct producer {
        rd_kafka_t* rk = nullptr;
        uint64_t generation = 0;
        std::atomic<bool> stop{false};
        std::thread poller;

        ~producer() {
            if (poller.joinable()) {
                stop = true;
                poller.join();
            }
            if (!rk) return;
            // at destroy no worker waits; what is still queued is purged, and its reports served
            // here so that their opaque pointers are freed
            rd_kafka_flush(rk, 2000);
            rd_kafka_purge(rk, RD_KAFKA_PURGE_F_QUEUE | RD_KAFKA_PURGE_F_INFLIGHT);
            rd_kafka_poll(rk, 0);
            rd_kafka_destroy(rk);
        }
    };

    static void on_delivery(rd_kafka_t*, const rd_kafka_message_t* m, void*) {
        auto* opaque = static_cast<std::shared_ptr<report>*>(m->_private);
        if (!opaque) return;
        std::shared_ptr<report> rep = std::move(*opaque);
        delete opaque;
        std::lock_guard lock(rep->mutex);
        rep->done = true;
        rep->err = m->err;
        rep->partition = m->partition;
        rep->offset = m->offset;
        rep->cv.notify_all();
    }

    static void on_error(rd_kafka_t* rk, int err, const char* reason, void* opaque) {
        auto* self = static_cast<kafka_bridge*>(opaque);
        // transport errors while a broker is down are expected and repeat every reconnect: debug
        int level = err == RD_KAFKA_RESP_ERR__FATAL ? EVMESH_LOG_ERROR : EVMESH_LOG_DEBUG;
        char fatal[256] = "";
        if (err == RD_KAFKA_RESP_ERR__FATAL) rd_kafka_fatal_error(rk, fatal, sizeof fatal);
        self->log_.log(level, "kafka %s: %s%s%s", self->log_.instance.c_str(), reason, fatal[0] ? ": " : "", fatal);
    }

    void set(rd_kafka_conf_t* conf, settings* s, const std::string& key, const std::string& value) {
        char errstr[256];
        if (rd_kafka_conf_set(conf, key.c_str(), value.c_str(), errstr, sizeof errstr) != RD_KAFKA_CONF_OK) {
            if (s) s->fail("properties." + key, std::string("is refused by librdkafka: ") + errstr);
            throw std::runtime_error("librdkafka: " + key + ": " + errstr);
        }
    }

    std::unique_ptr<producer> make_producer(settings* s) {
        rd_kafka_conf_t* conf = rd_kafka_conf_new();
        try {
            set(conf, s, "bootstrap.servers", brokers_);
            set(conf, s, "enable.idempotence", "true");
            set(conf, s, "message.timeout.ms", std::to_string(timeout_ms_));
            set(conf, s, "linger.ms", std::to_string(linger_ms_));
            set(conf, s, "client.id", "evmesh-" + log_.instance);
            for (const auto& [k, v] : properties_) set(conf, s, k, v);
        } catch (...) {
            rd_kafka_conf_destroy(conf);
            throw;
        }
        rd_kafka_conf_set_dr_msg_cb(conf, &kafka_bridge::on_delivery);
        rd_kafka_conf_set_error_cb(conf, &kafka_bridge::on_error);
        rd_kafka_conf_set_opaque(conf, this);
        auto p = std::make_unique<producer>();
        char errstr[512];
        p->rk = rd_kafka_new(RD_KAFKA_PRODUCER, conf, errstr, sizeof errstr);  // takes conf on success
        if (!p->rk) {
            rd_kafka_conf_destroy(conf);
            throw config_error(std::string("kafka: cannot create the producer: ") + errstr);
        }
        p->generation = ++generations_;
        producer* raw = p.get();
        p->poller = std::thread([raw] {
            while (!raw->stop) rd_kafka_poll(raw->rk, 100);
        });
        return p;
    }

    // A fatal error (the idempotent producer's sequence state is broken, e.g. after the broker
    // lost acknowledged records) makes that producer unusable: replace it once, whoever sees it
    // first. The records in question are retried by the node through the new producer.
    void recover(uint64_t generation) {
        std::unique_lock lock(producer_mutex_);
        if (!producer_ || producer_->generation != generation) return;
        log_.log(EVMESH_LOG_WARN, "kafka %s: fatal producer error; starting a new producer", log_.instance.c_str());
        try {
            auto fresh = make_producer(nullptr);
            producer_.swap(fresh);
        } catch (const std::exception& e) {
            log_.log(EVMESH_LOG_ERROR, "kafka %s: cannot replace the producer: %s", log_.instance.c_str(), e.what());
        }
    }

    host_logger log_;
    std::string brokers_;
    name_template topic_;
    name_template key_;
    bool has_key_ = false;
    int64_t timeout_ms_ = 30000;
    int64_t linger_ms_ = 1;
    std::vector<std::pair<std::string, std::string>> properties_;
    body_mode mode_ = body_mode::binary;

    std::shared_mutex producer_mutex_;
    std::unique_ptr<producer> producer_;
    uint64_t generations_ = 0;
};

}  // namespace
}  // namespace evmesh::channels

extern "C" EVMESH_CHANNEL_EXPORT const evmesh_channel_plugin* evmesh_channel_plugin_v1(void) {
    return &evmesh::channels::plugin_glue<evmesh::channels::kafka_bridge>::table;
}
