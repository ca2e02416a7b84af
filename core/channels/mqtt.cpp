// The "mqtt" bridge: MQTT 5 PUBLISH of each event at QoS 1 or 2 (libmosquitto), the topic from a
// template with the event topic's dots mapped to '/', the CloudEvents attributes as MQTT 5 user
// properties (the CloudEvents MQTT binding, binary mode) and the content type as the Content Type
// property. Delivered = PUBACK (QoS 1) or PUBCOMP (QoS 2) with a success reason code.
//
// One client connection per channel instance, shared by the workers: libmosquitto's network
// thread (ours, around mosquitto_loop) owns the socket and reconnects by itself; deliver publishes and
// waits for its packet id to be acknowledged.
#include "bridge_common.hpp"

#include <mosquitto.h>
#include <mqtt_protocol.h>

#include <unistd.h>

#include <map>
#include <random>
#include <thread>

namespace evmesh::channels {
namespace {

using namespace bridge;

void init_mosquitto_once() {
    static const int rc = mosquitto_lib_init();  // thread-safe static init; never cleaned up (other users)
    (void)rc;
}

struct property_list {
    mosquitto_property* head = nullptr;
    property_list() = default;
    property_list(const property_list&) = delete;
    property_list& operator=(const property_list&) = delete;
    ~property_list() { mosquitto_property_free_all(&head); }
};

// Publish topics may not contain the wildcards '+' and '#' nor NUL: values that carry them are
// written with '_' instead (the literal text of the template is checked once at create).
void mqtt_escape(std::string& out, std::string_view v) {
    for (char c : v) out += (c == '+' || c == '#' || c == '\0') ? '_' : c;
}

// MQTT 5 strings are UTF-8, and libmosquitto refuses control characters (C0, DEL, C1) in them.
// A value that is not such a string (an event source or header with other bytes) is sent with
// those bytes as '?' (CR, LF, TAB as ' ') rather than making the event undeliverable.
std::string mqtt_string(std::string_view v) {
    bool ok = valid_utf8(v.data(), v.size());
    for (size_t i = 0; ok && i < v.size(); ++i) {
        auto c = static_cast<unsigned char>(v[i]);
        if (c < 0x20 || c == 0x7f) ok = false;
        if (c == 0xC2 && i + 1 < v.size() && static_cast<unsigned char>(v[i + 1]) <= 0x9F) ok = false;  // C1
    }
    return ok ? std::string(v) : printable(v, v.size());
}

class mqtt_bridge {
public:
    static constexpr const char* plugin_name = "mqtt";
    static constexpr const char* description = "MQTT 5 publish at QoS 1/2, delivered = PUBACK/PUBCOMP";

    explicit mqtt_bridge(const evmesh_host& host) : log_(host) {
        settings s(plugin_name, host.settings_json);
        std::string url = s.required_string("url");
        auto u = parse_url(url, {"mqtt", "tcp"}, 1883);
        if (!u || !u->path.empty()) s.fail("url", "must be mqtt://[user[:password]@]host[:port]");
        host_ = u->host;
        port_ = u->port;
        topic_ = template_setting(s, "topic", "{topic}");
        std::string literal = topic_.literal_text();
        if (literal.find_first_of("+#") != std::string::npos) s.fail("topic", "must not contain the wildcards + or #");
        map_dots_ = s.boolean_or("map_dots", true);
        qos_ = static_cast<int>(s.integer_or("qos", 1, 1, 2));
        retain_ = s.boolean_or("retain", false);
        timeout_ms_ = s.duration_ms_or("timeout_ms", 10000);
        keepalive_ = static_cast<int>(s.integer_or("keepalive_s", 30, 5, 3600));
        max_inflight_ = static_cast<int>(s.integer_or("max_inflight", 100, 1, 65535));
        client_id_ = s.string_or("client_id", default_client_id(log_.instance));
        auto user = s.optional_string("username");
        auto password = s.optional_string("password", true);
        if (!u->user.empty()) user = u->user;
        if (!u->password.empty()) password = u->password;
        mode_ = mode_setting(s);
        s.finish();

        init_mosquitto_once();
        // clean start: the bridge keeps no session; what was not acknowledged is retried by the node
        mosq_ = mosquitto_new(client_id_.c_str(), true, this);
        if (!mosq_) throw config_error("mqtt: mosquitto_new failed");
        mosquitto_int_option(mosq_, MOSQ_OPT_PROTOCOL_VERSION, MQTT_PROTOCOL_V5);
        mosquitto_int_option(mosq_, MOSQ_OPT_SEND_MAXIMUM, max_inflight_);
        if (user) mosquitto_username_pw_set(mosq_, user->c_str(), password ? password->c_str() : nullptr);
        mosquitto_connect_v5_callback_set(mosq_, &mqtt_bridge::on_connect);
        mosquitto_disconnect_v5_callback_set(mosq_, &mqtt_bridge::on_disconnect);
        mosquitto_publish_v5_callback_set(mosq_, &mqtt_bridge::on_publish);
        // A broker that is down at start is not a configuration error: the network thread keeps
        // reconnecting, and deliveries answer "retry" until it is up. (Our own loop rather than
        // mosquitto_loop_start: that thread ends for good when the very first connect fails.)
        mosquitto_threaded_set(mosq_, true);
        int rc = mosquitto_connect_async(mosq_, host_.c_str(), port_, keepalive_);
        if (rc != MOSQ_ERR_SUCCESS)
            log_.log(EVMESH_LOG_WARN, "mqtt %s: connect %s:%d: %s (retrying in the background)", log_.instance.c_str(),
                     host_.c_str(), port_, mosquitto_strerror(rc));
        network_ = std::thread([this] { run(); });
    }

    ~mqtt_bridge() {
        {
            std::lock_guard lock(mutex_);
            stop_ = true;
        }
        stop_cv_.notify_all();
        network_.join();
        mosquitto_disconnect(mosq_);
        mosquitto_destroy(mosq_);
    }

    mqtt_bridge(const mqtt_bridge&) = delete;
    mqtt_bridge& operator=(const mqtt_bridge&) = delete;

    evmesh_status deliver(const evmesh_event& ev, const evmesh_attempt&, evmesh_result& r) {
        event_fields f(ev);
        std::string topic = topic_.expand(f, mqtt_escape, map_dots_ ? '/' : '.');
        if (topic.empty()) {
            set_detail(&r, "topic template \"%s\" expanded to an empty topic", printable(topic_.text(), 100).c_str());
            return EVMESH_FAIL;
        }
        message_body body = make_body(ev, mode_);
        property_list props;
        int prc = MOSQ_ERR_SUCCESS;
        if (!body.content_type.empty())
            prc = mosquitto_property_add_string(&props.head, MQTT_PROP_CONTENT_TYPE,
                                                mqtt_string(body.content_type).c_str());
        if (mode_ == body_mode::binary)
            for (const auto& [k, v] : ce_attributes(ev))
                if (prc == MOSQ_ERR_SUCCESS)
                    prc = mosquitto_property_add_string_pair(&props.head, MQTT_PROP_USER_PROPERTY, k.c_str(),
                                                             mqtt_string(v).c_str());
        if (prc != MOSQ_ERR_SUCCESS) {  // an attribute silently missing would be worse than no message
            set_detail(&r, "properties: %s", mosquitto_strerror(prc));
            return prc == MOSQ_ERR_NOMEM ? EVMESH_RETRY : EVMESH_FAIL;
        }

        std::unique_lock lock(mutex_);
        if (!connected_) {
            // Publishing now would only queue the message inside libmosquitto, to be sent (again)
            // after the node has already scheduled a retry: a certain duplicate.
            set_detail(&r, "not connected to %s:%d%s%s", host_.c_str(), port_, last_error_.empty() ? "" : ": ",
                       last_error_.c_str());
            return EVMESH_RETRY;
        }
        uint64_t session = session_;
        lock.unlock();

        int mid = 0;
        int rc = mosquitto_publish_v5(mosq_, &mid, topic.c_str(), static_cast<int>(body.bytes.size()),
                                      body.bytes.data(), qos_, retain_, props.head);
        if (rc != MOSQ_ERR_SUCCESS) {
            set_detail(&r, "publish: %s", mosquitto_strerror(rc));
            // the message itself is unacceptable: no retry changes that
            if (rc == MOSQ_ERR_PAYLOAD_SIZE || rc == MOSQ_ERR_OVERSIZE_PACKET || rc == MOSQ_ERR_MALFORMED_UTF8 ||
                rc == MOSQ_ERR_INVAL || rc == MOSQ_ERR_QOS_NOT_SUPPORTED)
                return EVMESH_FAIL;
            return EVMESH_RETRY;
        }
        return await_ack(mid, session, r);
    }

private:
    struct waiter {
        bool done = false;
        int reason = 0;
        bool lost = false;  // the connection dropped before the acknowledgement
    };

    static std::string default_client_id(const std::string& instance) {
        std::random_device rd;
        char buf[24];
        std::snprintf(buf, sizeof buf, "-%d-%08x", static_cast<int>(::getpid()), rd());
        std::string id = "evmesh-" + (instance.empty() ? std::string("bridge") : instance) + buf;
        return id.size() > 64 ? id.substr(id.size() - 64) : id;
    }

    evmesh_status await_ack(int mid, uint64_t session, evmesh_result& r) {
        std::unique_lock lock(mutex_);
        waiter w;
        if (auto it = early_.find(mid); it != early_.end()) {  // acknowledged before we got here
            w.done = true;
            w.reason = it->second;
            early_.erase(it);
        } else if (session != session_) {
            w.lost = true;  // the connection dropped in between
        } else {
            waiting_[mid] = &w;
            bool ok = cv_.wait_for(lock, std::chrono::milliseconds(timeout_ms_), [&] { return w.done || w.lost; });
            waiting_.erase(mid);
            if (!ok) {
                abandoned_.insert(mid);  // a late acknowledgement is dropped, not kept as "early"
                set_detail(&r, "no %s within %lld ms", qos_ == 1 ? "PUBACK" : "PUBCOMP",
                           static_cast<long long>(timeout_ms_));
                return EVMESH_RETRY;
            }
        }
        if (w.lost) {
            set_detail(&r, "connection lost before the %s", qos_ == 1 ? "PUBACK" : "PUBCOMP");
            return EVMESH_RETRY;
        }
        r.code = w.reason;
        if (w.reason >= 0x80) {
            set_detail(&r, "%s reason 0x%02x: %s", qos_ == 1 ? "PUBACK" : "PUBREC", w.reason, mosquitto_reason_string(w.reason));
            // not authorized / topic name invalid / payload format invalid: this event never passes
            return (w.reason == MQTT_RC_NOT_AUTHORIZED || w.reason == MQTT_RC_TOPIC_NAME_INVALID ||
                    w.reason == MQTT_RC_PAYLOAD_FORMAT_INVALID || w.reason == MQTT_RC_PACKET_TOO_LARGE)
                       ? EVMESH_FAIL
                       : EVMESH_RETRY;
        }
        return EVMESH_DELIVERED;
    }

    // The network thread: reads and writes the socket, sends keepalives, and reconnects with a
    // backoff (200 ms doubling to 5 s) whenever the connection is gone, until the instance stops.
    void run() {
        int64_t backoff_ms = 200;
        while (true) {
            {
                std::lock_guard lock(mutex_);
                if (stop_) return;
            }
            int rc = mosquitto_loop(mosq_, 200, 1);
            if (rc == MOSQ_ERR_SUCCESS) {
                if (connected()) backoff_ms = 200;
                continue;
            }
            lost_connection(mosquitto_strerror(rc));
            {
                std::unique_lock lock(mutex_);
                if (stop_cv_.wait_for(lock, std::chrono::milliseconds(backoff_ms), [this] { return stop_; })) return;
            }
            backoff_ms = std::min<int64_t>(backoff_ms * 2, 5000);
            rc = mosquitto_reconnect_async(mosq_);  // non-blocking: a stop never waits for a TCP connect timeout
            if (rc != MOSQ_ERR_SUCCESS) {
                std::lock_guard lock(mutex_);
                last_error_ = std::string("connect: ") + mosquitto_strerror(rc);
            }
        }
    }

    bool connected() {
        std::lock_guard lock(mutex_);
        return connected_;
    }

    // Everyone waiting answers "retry" now instead of at the timeout; libmosquitto may still send
    // those messages after the reconnect, so they can arrive twice (at-least-once).
    void lost_connection(const char* why) {
        std::lock_guard lock(mutex_);
        if (connected_)
            log_.log(EVMESH_LOG_WARN, "mqtt %s: disconnected from %s:%d (%s)", log_.instance.c_str(), host_.c_str(),
                     port_, why);
        connected_ = false;
        last_error_ = why;
        ++session_;
        for (auto& [mid, w] : waiting_) {
            w->lost = true;
            abandoned_.insert(mid);
        }
        early_.clear();
        cv_.notify_all();
    }

    static void on_connect(mosquitto*, void* obj, int rc, int, const mosquitto_property*) {
        auto* self = static_cast<mqtt_bridge*>(obj);
        std::lock_guard lock(self->mutex_);
        if (rc == 0) {
            self->connected_ = true;
            self->last_error_.clear();
            self->log_.log(EVMESH_LOG_INFO, "mqtt %s: connected to %s:%d", self->log_.instance.c_str(),
                           self->host_.c_str(), self->port_);
        } else {
            self->last_error_ = std::string("CONNACK ") + mosquitto_reason_string(rc);
        }
    }

    static void on_disconnect(mosquitto*, void* obj, int rc, const mosquitto_property*) {
        static_cast<mqtt_bridge*>(obj)->lost_connection(rc == 0 ? "disconnected" : mosquitto_strerror(rc));
    }

    static void on_publish(mosquitto*, void* obj, int mid, int reason, const mosquitto_property*) {
        auto* self = static_cast<mqtt_bridge*>(obj);
        std::lock_guard lock(self->mutex_);
        if (auto it = self->waiting_.find(mid); it != self->waiting_.end()) {
            it->second->done = true;
            it->second->reason = reason;
            self->cv_.notify_all();
        } else if (self->abandoned_.erase(mid) == 0 && self->early_.size() < 65536) {
            self->early_[mid] = reason;  // the publisher has not started waiting yet
        }
    }

    host_logger log_;
    std::string host_;
    int port_ = 1883;
    name_template topic_;
    bool map_dots_ = true;
    int qos_ = 1;
    bool retain_ = false;
    int64_t timeout_ms_ = 10000;
    int keepalive_ = 30;
    int max_inflight_ = 100;
    std::string client_id_;
    body_mode mode_ = body_mode::binary;
    mosquitto* mosq_ = nullptr;

    std::mutex mutex_;
    std::condition_variable cv_;
    bool connected_ = false;
    uint64_t session_ = 0;
    std::string last_error_ = "connecting";
    std::map<int, waiter*> waiting_;
    std::map<int, int> early_;
    std::set<int> abandoned_;
    bool stop_ = false;
    std::condition_variable stop_cv_;
    std::thread network_;
};

}  // namespace
}  // namespace evmesh::channels

extern "C" EVMESH_CHANNEL_EXPORT const evmesh_channel_plugin* evmesh_channel_plugin_v1(void) {
    return &evmesh::channels::plugin_glue<evmesh::channels::mqtt_bridge>::table;
}
