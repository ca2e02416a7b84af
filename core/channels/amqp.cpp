// The "amqp" bridge: AMQP 0-9-1 basic.publish (RabbitMQ, rabbitmq-c) on a channel in confirm
// mode; delivered = the broker's basic.ack for that delivery tag (for a persistent message to a
// durable queue: written to disk). A basic.nack, an unroutable message (mandatory, basic.return),
// a closed channel or connection, or no answer within timeout_ms → retry.
//
// Exchange and routing key come from templates. The message carries the CloudEvents attributes
// as headers "cloudEvents_<name>" (the AMQP binding's prefix), content_type, message_id = event
// id, type = topic, timestamp, app_id "evmesh" and delivery_mode 2 (persistent).
//
// rabbitmq-c connections are not thread-safe, so each worker leases a connection of its own from a
// small pool; one publish is in flight per connection, and the worker waits for its confirm.
#include "amqp_reply.hpp"
#include "bridge_common.hpp"

#include <amqp.h>
#include <amqp_tcp_socket.h>

#include <sys/time.h>

namespace evmesh::channels {
namespace {

using evmesh::amqp::rpc_error;

using namespace bridge;

constexpr amqp_channel_t kChannel = 1;

amqp_bytes_t bytes(std::string_view s) { return {s.size(), const_cast<char*>(s.data())}; }

// One AMQP connection with channel 1 open in confirm mode.
struct connection {
    amqp_connection_state_t conn = nullptr;
    uint64_t next_tag = 1;  // delivery tag of the next publish (confirm mode numbers from 1)

    connection() : conn(amqp_new_connection()) {
        if (!conn) throw std::bad_alloc();
    }
    ~connection() {
        // no close handshake: the connection is dropped either because it broke or at shutdown
        amqp_destroy_connection(conn);
    }
    connection(const connection&) = delete;
    connection& operator=(const connection&) = delete;
};

// AMQP short strings (exchange, routing key) hold at most 255 bytes; exchange names 127 by spec.
bool short_string_ok(std::string_view s, size_t max) { return s.size() <= max; }

class amqp_bridge {
public:
    static constexpr const char* plugin_name = "amqp";
    static constexpr const char* description = "AMQP 0-9-1 publish with publisher confirms (RabbitMQ)";

    explicit amqp_bridge(const evmesh_host& host) : log_(host) {
        settings s(plugin_name, host.settings_json);
        url_ = s.required_string("url");
        amqp_default_connection_info(&info_);
        url_copy_ = url_;  // amqp_parse_url points info_ into this buffer
        if (url_.rfind("amqp://", 0) != 0 || amqp_parse_url(url_copy_.data(), &info_) != AMQP_STATUS_OK)
            s.fail("url", "must be amqp://[user:password@]host[:port][/vhost]");
        exchange_ = template_setting(s, "exchange", std::string(), true);
        routing_key_ = template_setting(s, "routing_key", "{topic}", true);
        mandatory_ = s.boolean_or("mandatory", true);
        persistent_ = s.boolean_or("persistent", true);
        timeout_ms_ = s.duration_ms_or("timeout_ms", 10000);
        mode_ = mode_setting(s);
        s.finish();
    }

    evmesh_status deliver(const evmesh_event& ev, const evmesh_attempt&, evmesh_result& r) {
        event_fields f(ev);
        std::string exchange = exchange_.expand(f);
        std::string key = routing_key_.expand(f);
        if (!short_string_ok(exchange, 127) || !short_string_ok(key, 255)) {
            set_detail(&r, "exchange (%zu bytes) or routing key (%zu bytes) too long", exchange.size(), key.size());
            return EVMESH_FAIL;
        }
        message_body body = make_body(ev, mode_);

        // AMQP headers table: the CloudEvents attributes
        auto attrs = ce_attributes(ev);
        std::vector<std::string> names;
        names.reserve(attrs.size());
        std::vector<amqp_table_entry_t> entries(attrs.size());
        for (size_t i = 0; i < attrs.size(); ++i) {
            names.push_back("cloudEvents_" + attrs[i].first);
            entries[i].key = bytes(names.back());
            entries[i].value.kind = AMQP_FIELD_KIND_UTF8;
            entries[i].value.value.bytes = bytes(attrs[i].second);
        }
        amqp_basic_properties_t props{};
        props._flags = AMQP_BASIC_HEADERS_FLAG | AMQP_BASIC_MESSAGE_ID_FLAG | AMQP_BASIC_TYPE_FLAG |
                       AMQP_BASIC_TIMESTAMP_FLAG | AMQP_BASIC_APP_ID_FLAG | AMQP_BASIC_DELIVERY_MODE_FLAG;
        props.headers.num_entries = static_cast<int>(entries.size());
        props.headers.entries = entries.data();
        std::string id(view(ev.id_text));
        std::string type(view(ev.topic, ev.topic_len));
        props.message_id = bytes(id);
        props.type = bytes(type);
        props.timestamp = static_cast<uint64_t>(ev.time_ns / 1000000000);
        props.app_id = amqp_cstring_bytes("evmesh");
        props.delivery_mode = persistent_ ? 2 : 1;
        if (!body.content_type.empty()) {
            props._flags |= AMQP_BASIC_CONTENT_TYPE_FLAG;
            props.content_type = bytes(body.content_type);
        }

        conn_pool<connection>::lease lease(pool_);
        bool reused = lease.conn() != nullptr;
        for (int round = 0;; ++round) {
            auto& c = lease.conn();
            if (!c) {
                c = connect(r);
                if (!c) return EVMESH_RETRY;
                reused = false;
            }
            int st = amqp_basic_publish(c->conn, kChannel, bytes(exchange), bytes(key), mandatory_ ? 1 : 0, 0, &props,
                                        bytes(body.bytes));
            if (st != AMQP_STATUS_OK) {
                lease.discard();
                // A pooled connection the broker closed while it was idle fails on the write, before
                // the message went out: one fresh connection at once rather than a retry later.
                if (reused && round == 0) continue;
                set_detail(&r, "publish: %s", amqp_error_string2(st));
                return EVMESH_RETRY;
            }
            uint64_t tag = c->next_tag++;
            return await_confirm(lease, tag, r);
        }
    }

private:
    // Waits for the basic.ack/nack of `tag` on the leased connection.
    evmesh_status await_confirm(conn_pool<connection>::lease& lease, uint64_t tag, evmesh_result& r) {
        connection& c = *lease.conn();
        int64_t deadline = now_ms() + timeout_ms_;
        bool returned = false;
        std::string return_text;
        while (true) {
            int64_t left = deadline - now_ms();
            if (left <= 0) {
                lease.discard();  // a late confirm would be mistaken for the next publish's
                set_detail(&r, "no publisher confirm within %lld ms", static_cast<long long>(timeout_ms_));
                return EVMESH_RETRY;
            }
            timeval tv{static_cast<time_t>(left / 1000), static_cast<suseconds_t>((left % 1000) * 1000)};
            amqp_frame_t frame{};
            int st = amqp_simple_wait_frame_noblock(c.conn, &frame, &tv);
            if (st == AMQP_STATUS_TIMEOUT) continue;
            if (st != AMQP_STATUS_OK) {
                lease.discard();
                set_detail(&r, "waiting for the confirm: %s", amqp_error_string2(st));
                return EVMESH_RETRY;
            }
            if (frame.frame_type != AMQP_FRAME_METHOD) continue;  // e.g. heartbeats
            switch (frame.payload.method.id) {
            case AMQP_BASIC_ACK_METHOD: {
                auto* m = static_cast<amqp_basic_ack_t*>(frame.payload.method.decoded);
                if (m->delivery_tag == tag || (m->multiple && m->delivery_tag >= tag)) {
                    if (!returned) return EVMESH_DELIVERED;
                    // acknowledged, but routed nowhere: nobody will ever read it
                    set_detail(&r, "unroutable: %s", printable(return_text, 200).c_str());
                    r.code = 312;
                    return EVMESH_RETRY;
                }
                break;
            }
            case AMQP_BASIC_NACK_METHOD: {
                auto* m = static_cast<amqp_basic_nack_t*>(frame.payload.method.decoded);
                if (m->delivery_tag == tag || (m->multiple && m->delivery_tag >= tag)) {
                    set_detail(&r, "basic.nack from the broker (internal error or queue limit with reject-publish)");
                    return EVMESH_RETRY;
                }
                break;
            }
            case AMQP_BASIC_RETURN_METHOD: {
                auto* m = static_cast<amqp_basic_return_t*>(frame.payload.method.decoded);
                returned = true;
                r.code = m->reply_code;
                return_text = std::to_string(m->reply_code) + " " +
                              std::string(static_cast<const char*>(m->reply_text.bytes), m->reply_text.len);
                // the returned message's header and body frames follow; read them off the wire
                amqp_message_t msg{};
                amqp_rpc_reply_t rr = amqp_read_message(c.conn, frame.channel, &msg, 0);
                if (rr.reply_type == AMQP_RESPONSE_NORMAL) amqp_destroy_message(&msg);
                break;
            }
            case AMQP_CHANNEL_CLOSE_METHOD:
            case AMQP_CONNECTION_CLOSE_METHOD: {
                // e.g. 404 NOT_FOUND: no such exchange. The exchange may be declared later, so
                // this is a retry; the connection is dropped (a fresh one opens a fresh channel).
                amqp_rpc_reply_t rr{};
                rr.reply_type = AMQP_RESPONSE_SERVER_EXCEPTION;
                rr.reply = frame.payload.method;
                if (frame.payload.method.id == AMQP_CHANNEL_CLOSE_METHOD)
                    r.code = static_cast<amqp_channel_close_t*>(frame.payload.method.decoded)->reply_code;
                else
                    r.code = static_cast<amqp_connection_close_t*>(frame.payload.method.decoded)->reply_code;
                set_detail(&r, "%s", printable(rpc_error(rr), 200).c_str());
                lease.discard();
                return EVMESH_RETRY;
            }
            default:
                break;
            }
        }
    }

    // A new connection, logged in, channel 1 open in confirm mode; nullptr with the reason in r.
    std::unique_ptr<connection> connect(evmesh_result& r) {
        auto c = std::make_unique<connection>();
        amqp_socket_t* sock = amqp_tcp_socket_new(c->conn);
        if (!sock) {
            set_detail(&r, "cannot create a socket");
            return nullptr;
        }
        timeval tv{static_cast<time_t>(timeout_ms_ / 1000), static_cast<suseconds_t>((timeout_ms_ % 1000) * 1000)};
        amqp_set_handshake_timeout(c->conn, &tv);
        amqp_set_rpc_timeout(c->conn, &tv);
        int st = amqp_socket_open_noblock(sock, info_.host, info_.port, &tv);
        if (st != AMQP_STATUS_OK) {
            set_detail(&r, "connect %s:%d: %s", info_.host, info_.port, amqp_error_string2(st));
            return nullptr;
        }
        // heartbeat 0: an idle pooled connection is not closed by the broker for missed heartbeats
        amqp_rpc_reply_t rr = amqp_login(c->conn, info_.vhost, 0, 131072, 0, AMQP_SASL_METHOD_PLAIN, info_.user,
                                         info_.password);
        if (rr.reply_type != AMQP_RESPONSE_NORMAL) {
            set_detail(&r, "login: %s", printable(rpc_error(rr), 200).c_str());
            return nullptr;
        }
        amqp_channel_open(c->conn, kChannel);
        rr = amqp_get_rpc_reply(c->conn);
        if (rr.reply_type != AMQP_RESPONSE_NORMAL) {
            set_detail(&r, "channel.open: %s", printable(rpc_error(rr), 200).c_str());
            return nullptr;
        }
        amqp_confirm_select(c->conn, kChannel);
        rr = amqp_get_rpc_reply(c->conn);
        if (rr.reply_type != AMQP_RESPONSE_NORMAL) {
            set_detail(&r, "confirm.select: %s", printable(rpc_error(rr), 200).c_str());
            return nullptr;
        }
        return c;
    }

    host_logger log_;
    std::string url_;
    std::string url_copy_;
    amqp_connection_info info_{};
    name_template exchange_;
    name_template routing_key_;
    bool mandatory_ = true;
    bool persistent_ = true;
    int64_t timeout_ms_ = 10000;
    body_mode mode_ = body_mode::binary;
    conn_pool<connection> pool_;
};

}  // namespace
}  // namespace evmesh::channels

extern "C" EVMESH_CHANNEL_EXPORT const evmesh_channel_plugin* evmesh_channel_plugin_v1(void) {
    return &evmesh::channels::plugin_glue<evmesh::channels::amqp_bridge>::table;
}
