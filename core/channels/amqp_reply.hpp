// The text of an AMQP RPC reply that is not "normal" (the broker's close code and reason, or
// rabbitmq-c's error), shared by the amqp channel and the amqp source.
#pragma once

#include <string>

#include <amqp.h>

namespace evmesh::amqp {

inline std::string rpc_error(const amqp_rpc_reply_t& r) {
    switch (r.reply_type) {
    case AMQP_RESPONSE_NORMAL:
        return "ok";
    case AMQP_RESPONSE_NONE:
        return "missing RPC reply";
    case AMQP_RESPONSE_LIBRARY_EXCEPTION:
        return amqp_error_string2(r.library_error);
    case AMQP_RESPONSE_SERVER_EXCEPTION:
        if (r.reply.id == AMQP_CONNECTION_CLOSE_METHOD) {
            auto* m = static_cast<amqp_connection_close_t*>(r.reply.decoded);
            return "connection closed: " + std::to_string(m->reply_code) + " " +
                   std::string(static_cast<const char*>(m->reply_text.bytes), m->reply_text.len);
        }
        if (r.reply.id == AMQP_CHANNEL_CLOSE_METHOD) {
            auto* m = static_cast<amqp_channel_close_t*>(r.reply.decoded);
            return "channel closed: " + std::to_string(m->reply_code) + " " +
                   std::string(static_cast<const char*>(m->reply_text.bytes), m->reply_text.len);
        }
        return "server exception";
    }
    return "unknown";
}

}  // namespace evmesh::amqp
