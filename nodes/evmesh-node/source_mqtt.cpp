// The "mqtt" source: an MQTT 5 subscription at QoS 1 (libmosquitto) in a persistent session, so
// the broker keeps what was not acknowledged while the node is down and sends it again.
//
// Acknowledging after the node accepted: the source's thread runs mosquitto_loop itself with
// mosquitto_threaded_set(true). libmosquitto queues the PUBACK of an incoming QoS 1 message when
// it reads it, but in threaded mode a queued packet is only written by a later write step of the
// loop, after on_message returned; on_message publishes into the node (retrying until accepted)
// before returning. A node killed meanwhile never sent the PUBACK, and when the source stops before
// the node accepted, it shuts the socket down so the queued PUBACK is never written.
#include "source_base.hpp"

#include <sys/socket.h>

#include <cerrno>
#include <cstring>

#include "cloudevents_http.hpp"

#include <mosquitto.h>
#include <mqtt_protocol.h>

namespace evmesh::app {
namespace {

class mqtt_source final : public inbound_source {
public:
    mqtt_source(node& n, const source_config& cfg) : inbound_source(n, cfg) {
        auto u = parse_broker_url(cfg_.url, {"mqtt", "tcp"}, 1883);  // validated
        host_ = u->host;
        port_ = u->port;
        user_ = cfg_.username.empty() ? u->user : cfg_.username;
        password_ = cfg_.password.empty() ? u->password : cfg_.password;
        client_id_ = cfg_.client_id.empty() ? default_consumer_name(n, cfg_) : cfg_.client_id;
    }

    ~mqtt_source() override { stop(); }

private:
    void run() override {
        static const int init = mosquitto_lib_init();  // once; never cleaned up (the bridges share it)
        (void)init;
        // clean_session false: the session (subscription and unacknowledged messages) outlives
        // the connection for session_expiry
        mosquitto* mosq = mosquitto_new(client_id_.c_str(), false, this);
        if (mosq == nullptr) {
            disconnected("mosquitto_new failed");
            return;
        }
        mosquitto_int_option(mosq, MOSQ_OPT_PROTOCOL_VERSION, MQTT_PROTOCOL_V5);
        mosquitto_threaded_set(mosq, true);  // PUBACKs written by the loop, after on_message (above)
        if (!user_.empty()) {
            mosquitto_username_pw_set(mosq, user_.c_str(), password_.empty() ? nullptr : password_.c_str());
        }
        mosquitto_connect_v5_callback_set(mosq, &mqtt_source::on_connect);
        mosquitto_message_v5_callback_set(mosq, &mqtt_source::on_message);
        mosquitto_property* props = nullptr;
        const auto expiry = static_cast<std::uint32_t>(
            std::min<std::int64_t>(cfg_.session_expiry.count() / 1000, 0xFFFFFFFELL));
        mosquitto_property_add_int32(&props, MQTT_PROP_SESSION_EXPIRY_INTERVAL, expiry);
        while (!stopping()) {
            int rc = mosquitto_connect_bind_v5(mosq, host_.c_str(), port_, 30, nullptr, props);
            if (rc == MOSQ_ERR_SUCCESS) {
                while (!stopping() && !abandoned_) {
                    rc = mosquitto_loop(mosq, 200, 1);
                    if (rc != MOSQ_ERR_SUCCESS) {
                        break;
                    }
                }
                if (abandoned_) {
                    break;
                }
            }
            if (stopping()) {
                break;
            }
            disconnected(rc == MOSQ_ERR_ERRNO ? std::string(strerror(errno)) : mosquitto_strerror(rc));
            if (!backoff()) {
                break;
            }
        }
        if (!abandoned_) {
            mosquitto_disconnect(mosq);  // nothing is queued unacknowledged here (see on_message)
        }
        mosquitto_property_free_all(&props);
        mosquitto_destroy(mosq);
    }

    static void on_connect(mosquitto* mosq, void* obj, int rc, int, const mosquitto_property*) {
        auto* self = static_cast<mqtt_source*>(obj);
        if (rc != 0) {
            self->disconnected(std::string("CONNACK ") + mosquitto_reason_string(rc));
            return;
        }
        self->connected();
        // again on every connection: harmless with a kept session, needed when it expired
        int src = mosquitto_subscribe_v5(mosq, nullptr, self->cfg_.subscribe.c_str(), 1, 0, nullptr);
        if (src != MOSQ_ERR_SUCCESS) {
            self->disconnected(std::string("subscribe: ") + mosquitto_strerror(src));
        }
    }

    static void on_message(mosquitto* mosq, void* obj, const mosquitto_message* msg, const mosquitto_property* props) {
        auto* self = static_cast<mqtt_source*>(obj);
        if (self->abandoned_) {
            return;
        }
        inbound_message m;
        if (msg->payload != nullptr && msg->payloadlen > 0) {
            m.body.assign(static_cast<const char*>(msg->payload), static_cast<std::size_t>(msg->payloadlen));
        }
        m.broker_topic = msg->topic != nullptr ? msg->topic : "";
        for (char& c : m.broker_topic) {
            if (c == '/') {
                c = '.';
            }
        }
        // the CloudEvents MQTT binding: attributes as user properties ("id", "specversion", ...);
        // ce_id / ce-id are accepted too
        for (const mosquitto_property* p = props; p != nullptr; p = mosquitto_property_next(p)) {
            const int id = mosquitto_property_identifier(p);
            if (id == MQTT_PROP_CONTENT_TYPE) {
                char* value = nullptr;
                if (mosquitto_property_read_string(p, MQTT_PROP_CONTENT_TYPE, &value, false) != nullptr && value) {
                    m.content_type = value;
                }
                std::free(value);
            } else if (id == MQTT_PROP_USER_PROPERTY) {
                char *name = nullptr, *value = nullptr;
                if (mosquitto_property_read_string_pair(p, MQTT_PROP_USER_PROPERTY, &name, &value, false) != nullptr &&
                    name && value) {
                    std::string k = name;
                    if (k.rfind("ce_", 0) == 0 || k.rfind("ce-", 0) == 0) {
                        k = k.substr(3);
                    }
                    m.ce[k] = value;
                }
                std::free(name);
                std::free(value);
            }
        }
        // a redelivery carries the same topic and payload: the same id
        m.position = std::string(msg->topic != nullptr ? msg->topic : "") + "#" +
                     to_string(ce_event_id("mqtt-payload", m.body));
        if (self->deliver(m) == delivery::stopping) {
            // the queued PUBACK must never be written: the broker sends the message again
            self->abandoned_ = true;
            ::shutdown(mosquitto_socket(mosq), SHUT_RDWR);
        }
    }

    std::string host_;
    int port_ = 1883;
    std::string user_, password_, client_id_;
    bool abandoned_ = false;  // only touched on the source's thread
};

}  // namespace

std::unique_ptr<inbound_source> make_mqtt_source(node& n, const source_config& cfg) {
    return std::make_unique<mqtt_source>(n, cfg);
}

}  // namespace evmesh::app
