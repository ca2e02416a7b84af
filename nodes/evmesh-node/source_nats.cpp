// The "nats" source (libnats): a core NATS subscription, or a JetStream durable pull consumer.
//
// Core NATS keeps nothing and has no acknowledgement: what is published while the source is not
// subscribed (node down, connection lost) is gone; that is core NATS, not a choice of the source.
// JetStream: the durable consumer remembers what was acknowledged; a message is acked
// ("+ACK" to the reply subject) only after the node accepted its event (and ack_delay later, source_base.hpp
// ack_holder), and one not acked is delivered again after
// the consumer's ack_wait, also to the restarted node (same durable name).
#include "source_base.hpp"

#include <cctype>
#include <cstdlib>

#include <nats/nats.h>

#include "cloudevents_http.hpp"

namespace evmesh::app {
namespace {

class nats_source final : public inbound_source {
public:
    nats_source(node& n, const source_config& cfg) : inbound_source(n, cfg) {
        durable_ = cfg_.durable;
        if (durable_.empty()) {
            // durable names may not contain '.', '*', '>' or whitespace
            durable_ = default_consumer_name(n, cfg_);
            for (char& c : durable_) {
                if (c == '.' || c == '*' || c == '>' || std::isspace(static_cast<unsigned char>(c))) {
                    c = '_';
                }
            }
        }
    }

    ~nats_source() override { stop(); }

private:
    void run() override {
        while (!stopping()) {
            natsOptions* opts = nullptr;
            natsConnection* nc = nullptr;
            jsCtx* js = nullptr;
            natsSubscription* sub = nullptr;
            std::string why;
            natsStatus s = natsOptions_Create(&opts);
            if (s == NATS_OK) s = natsOptions_SetURL(opts, cfg_.url.c_str());
            if (s == NATS_OK && !cfg_.username.empty())
                s = natsOptions_SetUserInfo(opts, cfg_.username.c_str(), cfg_.password.c_str());
            if (s == NATS_OK) s = natsOptions_SetTimeout(opts, 2000);
            // once connected, libnats reconnects by itself (forever, every 200 ms)
            if (s == NATS_OK) s = natsOptions_SetMaxReconnect(opts, -1);
            if (s == NATS_OK) s = natsOptions_SetReconnectWait(opts, 200);
            if (s == NATS_OK) s = natsConnection_Connect(&nc, opts);
            if (s == NATS_OK) {
                if (cfg_.jetstream) {
                    s = subscribe_jetstream(nc, &js, &sub, why);
                } else {
                    s = natsConnection_SubscribeSync(&sub, nc, cfg_.subject.c_str());
                    // the server has the subscription once it answered a PING sent after it:
                    // "connected" then means messages published from now on reach the source
                    if (s == NATS_OK) s = natsConnection_FlushTimeout(nc, 5000);
                }
            }
            if (s == NATS_OK) {
                connected();
                consume(nc, sub);
            } else if (why.empty()) {
                why = natsStatus_GetText(s);
                if (const char* last = nats_GetLastError(nullptr); last != nullptr && *last) {
                    why += std::string(": ") + last;
                }
            }
            natsSubscription_Destroy(sub);
            jsCtx_Destroy(js);
            natsConnection_Destroy(nc);
            natsOptions_Destroy(opts);
            if (stopping()) {
                break;
            }
            disconnected(why.empty() ? "connection closed" : why);
            if (!backoff()) {
                break;
            }
        }
    }

    natsStatus subscribe_jetstream(natsConnection* nc, jsCtx** js, natsSubscription** sub, std::string& why) {
        natsStatus s = natsConnection_JetStream(js, nc, nullptr);
        if (s != NATS_OK) {
            return s;
        }
        jsSubOptions so;
        jsSubOptions_Init(&so);
        if (!cfg_.stream.empty()) {
            so.Stream = cfg_.stream.c_str();
        }
        so.Config.AckPolicy = js_AckExplicit;
        so.Config.AckWait = static_cast<int64_t>(cfg_.ack_wait.count()) * 1000000;  // ns
        jsErrCode jerr = static_cast<jsErrCode>(0);
        // creates the durable consumer when it does not exist (bound to the stream that has the subject)
        s = js_PullSubscribe(sub, *js, cfg_.subject.c_str(), durable_.c_str(), nullptr, &so, &jerr);
        if (s != NATS_OK) {
            why = std::string("JetStream pull subscribe: ") + natsStatus_GetText(s);
            if (const char* last = nats_GetLastError(nullptr); last != nullptr && *last) {
                why += std::string(": ") + last;
            }
        }
        return s;
    }

    // Acks the held JetStream messages (all, or those held for ack_delay). A JetStream ack is a
    // "+ACK" published to the message's reply subject (what natsMsg_Ack sends), so only that
    // subject is held, not the message.
    void ack(natsConnection* nc, bool all) {
        for (const std::string& reply : held_.take_ready(all)) {
            natsConnection_PublishString(nc, reply.c_str(), "+ACK");  // lost: delivered again (same id)
        }
    }

    void consume(natsConnection* nc, natsSubscription* sub) {
        held_ = ack_holder<std::string>(cfg_.ack_delay);
        consume_loop(nc, sub);
        ack(nc, true);  // the node has what it accepted (a graceful stop, or libnats gave up)
        natsConnection_FlushTimeout(nc, 1000);
    }

    void consume_loop(natsConnection* nc, natsSubscription* sub) {
        bool up = true;
        while (!stopping()) {
            ack(nc, false);
            if (natsConnection_IsClosed(nc)) {
                return;
            }
            const bool now_up = natsConnection_Status(nc) == NATS_CONN_STATUS_CONNECTED;
            if (now_up != up) {
                up = now_up;
                if (up) {
                    connected();
                } else {
                    disconnected("connection lost (libnats reconnecting)");
                }
            }
            if (!up) {
                pause(100);
                continue;
            }
            if (cfg_.jetstream) {
                natsMsgList list{};
                jsErrCode jerr = static_cast<jsErrCode>(0);
                // not below 100 ms: each fetch is a pull request the server answers until it expires
                natsStatus s = natsSubscription_Fetch(&list, sub, cfg_.batch,
                                                      std::max<std::int64_t>(held_.wait_ms(1000), 100), &jerr);
                if (s == NATS_OK) {
                    for (int i = 0; i < list.Count; ++i) {
                        if (!handle(list.Msgs[i], true)) {
                            natsMsgList_Destroy(&list);
                            return;  // stopping: the rest are not acked (delivered again)
                        }
                        if (const char* reply = natsMsg_GetReply(list.Msgs[i]); reply != nullptr && *reply) {
                            held_.add(reply);  // acked ack_delay later
                        }
                    }
                } else if (s != NATS_TIMEOUT) {
                    pause(100);  // e.g. a request that failed while reconnecting
                }
                natsMsgList_Destroy(&list);
            } else {
                natsMsg* msg = nullptr;
                natsStatus s = natsSubscription_NextMsg(&msg, sub, 1000);
                if (s == NATS_OK) {
                    handle(msg, false);
                    natsMsg_Destroy(msg);
                } else if (s != NATS_TIMEOUT) {
                    return;  // the subscription is gone (slow consumer, closed): subscribe again
                }
            }
        }
    }

    // False when stopping before the node accepted (then nothing is acknowledged).
    bool handle(natsMsg* msg, bool jetstream) {
        inbound_message m;
        if (const char* data = natsMsg_GetData(msg); data != nullptr) {
            m.body.assign(data, static_cast<std::size_t>(natsMsg_GetDataLength(msg)));
        }
        m.broker_topic = natsMsg_GetSubject(msg) != nullptr ? natsMsg_GetSubject(msg) : "";
        const char** keys = nullptr;
        int count = 0;
        if (natsMsgHeader_Keys(msg, &keys, &count) == NATS_OK) {
            for (int i = 0; i < count; ++i) {
                std::string k = keys[i];
                for (char& c : k) {
                    c = static_cast<char>(std::tolower(static_cast<unsigned char>(c)));
                }
                const char* v = nullptr;
                if (natsMsgHeader_Get(msg, keys[i], &v) != NATS_OK || v == nullptr) {
                    continue;
                }
                if (k == "content-type") {
                    m.content_type = v;
                } else if (k.rfind("ce-", 0) == 0 || k.rfind("ce_", 0) == 0) {
                    m.ce[k.substr(3)] = v;
                }
            }
            std::free(static_cast<void*>(keys));
        }
        jsMsgMetaData* meta = nullptr;
        if (jetstream && natsMsg_GetMetaData(&meta, msg) == NATS_OK) {
            // the stream sequence: the same for every delivery of this message
            m.position = std::string("nats-js/") + (meta->Stream ? meta->Stream : "") + "/" +
                         std::to_string(meta->Sequence.Stream);
            jsMsgMetaData_Destroy(meta);
        } else {
            m.position = m.broker_topic + "#" + to_string(ce_event_id("nats-payload", m.body));
        }
        return deliver(m) != delivery::stopping;
    }

    std::string durable_;
    ack_holder<std::string> held_{cfg_.ack_delay};
};

}  // namespace

std::unique_ptr<inbound_source> make_nats_source(node& n, const source_config& cfg) {
    return std::make_unique<nats_source>(n, cfg);
}

}  // namespace evmesh::app
