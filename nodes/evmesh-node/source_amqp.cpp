// The "amqp" source (rabbitmq-c): basic.consume on a queue with manual acknowledgements.
//
// A delivery is acked (basic.ack) only after the node accepted its event (and ack_delay later,
// source_base.hpp ack_holder); what is unacked when
// the connection ends (the node killed, the source stopping, the network) is requeued by the
// broker and delivered again (redelivered flag set). prefetch bounds the unacked deliveries the
// broker sends ahead. The queue is not declared: declare it with your topology.
#include "source_base.hpp"

#include <sys/time.h>

#include <amqp.h>
#include <amqp_tcp_socket.h>

#include "channels/amqp_reply.hpp"
#include "cloudevents_http.hpp"

namespace evmesh::app {
namespace {

constexpr amqp_channel_t kChannel = 1;

using evmesh::amqp::rpc_error;

std::string text(const amqp_bytes_t& b) { return b.bytes ? std::string(static_cast<const char*>(b.bytes), b.len) : ""; }

class amqp_source final : public inbound_source {
public:
    amqp_source(node& n, const source_config& cfg) : inbound_source(n, cfg) {}
    ~amqp_source() override { stop(); }

private:
    void run() override {
        while (!stopping()) {
            amqp_connection_state_t conn = amqp_new_connection();
            std::string why = session(conn);
            // no close handshake: unacked deliveries are requeued when the connection ends
            amqp_destroy_connection(conn);
            if (stopping()) {
                break;
            }
            disconnected(why);
            if (!backoff()) {
                break;
            }
        }
    }

    // Connects, consumes until the connection fails or the source stops; the reason it ended.
    std::string session(amqp_connection_state_t conn) {
        amqp_connection_info info{};
        std::string url = cfg_.url;  // amqp_parse_url points into this buffer
        amqp_default_connection_info(&info);
        if (amqp_parse_url(url.data(), &info) != AMQP_STATUS_OK) {
            return "bad url";
        }
        std::string user = cfg_.username.empty() ? info.user : cfg_.username;
        std::string password = cfg_.password.empty() ? info.password : cfg_.password;
        amqp_socket_t* sock = amqp_tcp_socket_new(conn);
        if (sock == nullptr) {
            return "cannot create a socket";
        }
        timeval tv{5, 0};
        amqp_set_handshake_timeout(conn, &tv);
        amqp_set_rpc_timeout(conn, &tv);
        if (int st = amqp_socket_open_noblock(sock, info.host, info.port, &tv); st != AMQP_STATUS_OK) {
            return std::string("connect: ") + amqp_error_string2(st);
        }
        // heartbeat 30 s: a dead broker is noticed by rabbitmq-c while waiting for deliveries
        amqp_rpc_reply_t rr = amqp_login(conn, info.vhost, 0, 131072, 30, AMQP_SASL_METHOD_PLAIN, user.c_str(),
                                         password.c_str());
        if (rr.reply_type != AMQP_RESPONSE_NORMAL) {
            return "login: " + rpc_error(rr);
        }
        amqp_channel_open(conn, kChannel);
        if (rr = amqp_get_rpc_reply(conn); rr.reply_type != AMQP_RESPONSE_NORMAL) {
            return "channel.open: " + rpc_error(rr);
        }
        amqp_basic_qos(conn, kChannel, 0, static_cast<uint16_t>(cfg_.batch), 0);
        if (rr = amqp_get_rpc_reply(conn); rr.reply_type != AMQP_RESPONSE_NORMAL) {
            return "basic.qos: " + rpc_error(rr);
        }
        amqp_basic_consume(conn, kChannel, amqp_cstring_bytes(cfg_.queue.c_str()), amqp_empty_bytes, 0, 0, 0,
                           amqp_empty_table);
        if (rr = amqp_get_rpc_reply(conn); rr.reply_type != AMQP_RESPONSE_NORMAL) {
            return "basic.consume '" + cfg_.queue + "': " + rpc_error(rr);
        }
        connected();
        ack_holder<uint64_t> held(cfg_.ack_delay);
        // acks the held deliveries (all of them, or those held for ack_delay) with one basic.ack
        // (multiple: delivery tags grow on the channel); false when the ack cannot be sent
        auto ack = [&](bool all) {
            auto tags = held.take_ready(all);
            return tags.empty() || amqp_basic_ack(conn, kChannel, tags.back(), 1) == AMQP_STATUS_OK;
        };
        while (!stopping()) {
            if (!ack(false)) {
                return "basic.ack failed";  // redelivered: same id
            }
            amqp_maybe_release_buffers(conn);
            amqp_envelope_t env{};
            const auto wait_ms = held.wait_ms(1000);
            timeval wait{static_cast<time_t>(wait_ms / 1000), static_cast<suseconds_t>((wait_ms % 1000) * 1000)};
            rr = amqp_consume_message(conn, &env, &wait, 0);
            if (rr.reply_type == AMQP_RESPONSE_LIBRARY_EXCEPTION && rr.library_error == AMQP_STATUS_TIMEOUT) {
                continue;
            }
            if (rr.reply_type != AMQP_RESPONSE_NORMAL) {
                if (rr.reply_type == AMQP_RESPONSE_LIBRARY_EXCEPTION && rr.library_error == AMQP_STATUS_UNEXPECTED_STATE) {
                    // a frame that is not a delivery: a channel or connection close ends the session
                    amqp_frame_t frame{};
                    if (amqp_simple_wait_frame(conn, &frame) != AMQP_STATUS_OK) {
                        return "connection lost";
                    }
                    if (frame.frame_type == AMQP_FRAME_METHOD &&
                        (frame.payload.method.id == AMQP_CHANNEL_CLOSE_METHOD ||
                         frame.payload.method.id == AMQP_CONNECTION_CLOSE_METHOD)) {
                        return "closed by the broker";
                    }
                    continue;
                }
                return "consume: " + rpc_error(rr);
            }
            const delivery d = handle(env);
            const uint64_t tag = env.delivery_tag;
            amqp_destroy_envelope(&env);
            if (d == delivery::stopping) {
                ack(true);  // the node is alive and has them; this one is requeued at the close
                return "stopping";
            }
            held.add(tag);
        }
        ack(true);  // a graceful stop: the node forwards what it accepted before it stops
        return "stopping";
    }

    delivery handle(const amqp_envelope_t& env) {
        inbound_message m;
        m.body = text(env.message.body);
        m.broker_topic = text(env.routing_key);
        const amqp_basic_properties_t& p = env.message.properties;
        if (p._flags & AMQP_BASIC_CONTENT_TYPE_FLAG) {
            m.content_type = text(p.content_type);
        }
        if (p._flags & AMQP_BASIC_HEADERS_FLAG) {
            // the CloudEvents AMQP binding: "cloudEvents:id" ("cloudEvents_id" as the amqp bridge writes it)
            for (int i = 0; i < p.headers.num_entries; ++i) {
                const amqp_table_entry_t& e = p.headers.entries[i];
                std::string k = text(e.key);
                std::string prefix;
                for (const char* pre : {"cloudEvents:", "cloudEvents_", "ce_", "ce-"}) {
                    if (k.rfind(pre, 0) == 0) {
                        prefix = pre;
                    }
                }
                if (prefix.empty()) {
                    continue;
                }
                if (e.value.kind == AMQP_FIELD_KIND_UTF8 || e.value.kind == AMQP_FIELD_KIND_BYTES) {
                    m.ce[k.substr(prefix.size())] = text(e.value.value.bytes);
                }
            }
        }
        if ((p._flags & AMQP_BASIC_MESSAGE_ID_FLAG) && m.ce.count("id") == 0 && p.message_id.len > 0) {
            m.ce["id"] = text(p.message_id);  // the publisher's id: the same on a redelivery
        }
        // without a message id there is no broker position that survives a requeue: the
        // routing key and a hash of the body
        m.position = m.broker_topic + "#" + to_string(ce_event_id("amqp-payload", m.body));
        return deliver(m);
    }
};

}  // namespace

std::unique_ptr<inbound_source> make_amqp_source(node& n, const source_config& cfg) {
    return std::make_unique<amqp_source>(n, cfg);
}

}  // namespace evmesh::app
