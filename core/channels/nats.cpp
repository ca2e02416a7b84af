// The "nats" bridge (libnats): core NATS publish, delivered = a flush (PING/PONG) after it
// returned, i.e. the server has read the message (one flush serves every worker waiting); or,
// with jetstream = true, a JetStream publish, delivered = the stream's PubAck (stored). JetStream
// publishes carry Nats-Msg-Id = the event id, so the stream drops a re-sent copy within its
// duplicate window (2 minutes by default).
// The CloudEvents attributes travel as ce-<name> message headers (NATS 2.2+).
//
// One connection per channel instance (libnats connections are thread-safe); libnats reconnects
// by itself, deliveries answer "retry" while it is not connected.
#include "bridge_common.hpp"

#include <nats/nats.h>

#include <memory>

namespace evmesh::channels {
namespace {

using namespace bridge;

struct options_deleter {
    void operator()(natsOptions* o) const noexcept { natsOptions_Destroy(o); }
};
struct msg_deleter {
    void operator()(natsMsg* m) const noexcept { natsMsg_Destroy(m); }
};
struct puback_deleter {
    void operator()(jsPubAck* a) const noexcept { jsPubAck_Destroy(a); }
};

// Subjects are tokens separated by '.'; a published subject may not contain wildcards or
// whitespace. Values with those characters are written with '_' instead.
void subject_escape(std::string& out, std::string_view v) {
    for (char c : v)
        out += (c == '*' || c == '>' || c == ' ' || c == '\t' || c == '\r' || c == '\n' || c == '\0') ? '_' : c;
}

bool valid_subject(std::string_view s) {
    if (s.empty() || s.front() == '.' || s.back() == '.' || s.find("..") != std::string_view::npos) return false;
    for (char c : s)
        if (c == '*' || c == '>' || c == ' ' || c == '\t' || c == '\r' || c == '\n' || c == '\0') return false;
    return true;
}

class nats_bridge {
public:
    static constexpr const char* plugin_name = "nats";
    static constexpr const char* description =
        "NATS publish (delivered = flushed) or JetStream publish (delivered = stream ack)";

    explicit nats_bridge(const evmesh_host& host) : log_(host) {
        settings s(plugin_name, host.settings_json);
        url_ = s.required_string("url");
        if (!parse_url(url_, {"nats"}, 4222)) s.fail("url", "must be nats://[user:password@]host[:port] (TLS is not supported yet)");
        subject_ = template_setting(s, "subject", "{topic}");
        std::string literal = subject_.literal_text();
        if (literal.find_first_of("*> \t\r\n") != std::string::npos)
            s.fail("subject", "must not contain wildcards (*, >) or whitespace");
        jetstream_ = s.boolean_or("jetstream", false);
        expect_stream_ = s.string_or("stream", "");
        if (!expect_stream_.empty() && !jetstream_) s.fail("stream", "needs jetstream = true");
        timeout_ms_ = s.duration_ms_or("timeout_ms", 5000);
        mode_ = mode_setting(s);
        s.finish();
        connect();
    }

    ~nats_bridge() {
        if (js_) jsCtx_Destroy(js_);
        if (nc_) {
            natsConnection_Close(nc_);
            natsConnection_Destroy(nc_);
        }
    }

    nats_bridge(const nats_bridge&) = delete;
    nats_bridge& operator=(const nats_bridge&) = delete;

    evmesh_status deliver(const evmesh_event& ev, const evmesh_attempt&, evmesh_result& r) {
        event_fields f(ev);
        std::string subject = subject_.expand(f, subject_escape);
        if (!valid_subject(subject)) {
            set_detail(&r, "subject \"%s\" (from \"%s\") is not a valid subject", printable(subject, 80).c_str(),
                       printable(subject_.text(), 80).c_str());
            return EVMESH_FAIL;
        }
        if (natsConnection_Status(nc_) != NATS_CONN_STATUS_CONNECTED) {
            // libnats would buffer the message and send it after the reconnect, while the node
            // has already scheduled a retry of it: a certain duplicate, so do not publish now
            set_detail(&r, "not connected to %s", printable(url_, 100).c_str());
            return EVMESH_RETRY;
        }
        message_body body = make_body(ev, mode_);
        natsMsg* raw = nullptr;
        natsStatus st = natsMsg_Create(&raw, subject.c_str(), nullptr, body.bytes.data(),
                                       static_cast<int>(body.bytes.size()));
        std::unique_ptr<natsMsg, msg_deleter> msg(raw);
        if (st != NATS_OK) return status_error(r, "message", st);
        if (!body.content_type.empty()) natsMsgHeader_Set(raw, "content-type", body.content_type.c_str());
        if (mode_ == body_mode::binary)
            for (const auto& [k, v] : ce_attributes(ev)) {
                std::string value = header_value(v);
                natsMsgHeader_Set(raw, ("ce-" + k).c_str(), value.c_str());
            }
        return jetstream_ ? publish_js(ev, raw, r) : publish_core(raw, r);
    }

private:
    // Header values may not contain CR or LF.
    static std::string header_value(std::string_view v) {
        std::string out;
        for (char c : v) out += (c == '\r' || c == '\n') ? ' ' : c;
        return out;
    }

    evmesh_status status_error(evmesh_result& r, const char* what, natsStatus st) {
        const char* last = nats_GetLastError(nullptr);
        set_detail(&r, "%s: %s%s%s", what, natsStatus_GetText(st), last && *last ? ": " : "", last ? last : "");
        r.code = static_cast<int32_t>(st);
        // too large for the server's max_payload: this event never passes
        return st == NATS_MAX_PAYLOAD ? EVMESH_FAIL : EVMESH_RETRY;
    }

    // Core NATS: one flush proves that the server has read everything published on the
    // connection before it (the PONG answers a PING sent after those messages). So workers do not
    // flush one by one: each takes a number after its publish, one of them flushes for everyone
    // numbered so far, and the others wait for a flush that covers their number.
    evmesh_status publish_core(natsMsg* msg, evmesh_result& r) {
        natsStatus st = natsConnection_PublishMsg(nc_, msg);
        if (st != NATS_OK) return status_error(r, "publish", st);
        std::unique_lock lock(flush_mutex_);
        uint64_t mine = ++published_;
        auto deadline = std::chrono::steady_clock::now() + std::chrono::milliseconds(timeout_ms_);
        while (true) {
            // a failed flush covering this message: the connection may have lost it
            if (mine <= failed_through_) {
                set_detail(&r, "flush: %s", natsStatus_GetText(failed_status_));
                r.code = static_cast<int32_t>(failed_status_);
                return EVMESH_RETRY;
            }
            if (mine <= flushed_) return EVMESH_DELIVERED;
            if (!flushing_) {
                flushing_ = true;
                uint64_t target = published_;
                lock.unlock();
                st = natsConnection_FlushTimeout(nc_, timeout_ms_);
                lock.lock();
                flushing_ = false;
                if (st == NATS_OK)
                    flushed_ = std::max(flushed_, target);
                else {
                    failed_through_ = std::max(failed_through_, target);
                    failed_status_ = st;
                }
                flush_cv_.notify_all();
                continue;
            }
            if (flush_cv_.wait_until(lock, deadline) == std::cv_status::timeout && mine > flushed_) {
                set_detail(&r, "flush: no PONG within %lld ms", static_cast<long long>(timeout_ms_));
                return EVMESH_RETRY;
            }
        }
    }

    evmesh_status publish_js(const evmesh_event& ev, natsMsg* msg, evmesh_result& r) {
        jsPubOptions po;
        jsPubOptions_Init(&po);
        po.MaxWait = timeout_ms_;
        po.MsgId = ev.id_text;  // the stream's de-duplication key
        if (!expect_stream_.empty()) po.ExpectStream = expect_stream_.c_str();
        jsPubAck* raw = nullptr;
        jsErrCode jerr = static_cast<jsErrCode>(0);
        natsStatus st = js_PublishMsg(&raw, js_, msg, &po, &jerr);
        std::unique_ptr<jsPubAck, puback_deleter> ack(raw);
        if (st != NATS_OK) {
            evmesh_status out = status_error(r, "jetstream publish", st);
            if (jerr != 0) {
                r.code = static_cast<int32_t>(jerr);
                // NATS_NO_RESPONDERS: no stream listens on this subject (yet); retried, since
                // the stream may be created later, and dead-lettered after the schedule
            }
            return out;
        }
        return EVMESH_DELIVERED;
    }

    void connect() {
        natsOptions* raw = nullptr;
        if (natsOptions_Create(&raw) != NATS_OK) throw config_error("nats: cannot create connection options");
        std::unique_ptr<natsOptions, options_deleter> opts(raw);
        natsOptions_SetURL(raw, url_.c_str());
        natsOptions_SetName(raw, ("evmesh-" + log_.instance).c_str());
        natsOptions_SetTimeout(raw, timeout_ms_);
        natsOptions_SetAllowReconnect(raw, true);
        natsOptions_SetMaxReconnect(raw, -1);  // forever: the node's outbox holds what waits
        natsOptions_SetReconnectWait(raw, 500);
        // a server that is down at start is not a configuration error: keep trying in the background
        // (with a callback, Connect returns NATS_NOT_YET_CONNECTED at once instead of blocking)
        natsOptions_SetRetryOnFailedConnect(raw, true, &nats_bridge::on_connected, this);
        natsStatus st = natsConnection_Connect(&nc_, raw);
        if (st == NATS_NOT_YET_CONNECTED) {
            log_.log(EVMESH_LOG_WARN, "nats %s: %s not reachable yet; retrying in the background",
                     log_.instance.c_str(), printable(url_, 100).c_str());
        } else if (st != NATS_OK) {
            throw config_error(std::string("nats: connect ") + url_ + ": " + natsStatus_GetText(st));
        }
        if (jetstream_) {
            jsOptions jo;
            jsOptions_Init(&jo);
            jo.Wait = timeout_ms_;
            if (natsConnection_JetStream(&js_, nc_, &jo) != NATS_OK) {
                natsConnection_Destroy(nc_);
                nc_ = nullptr;
                throw config_error("nats: cannot create the JetStream context");
            }
        }
    }

    static void on_connected(natsConnection*, void* closure) {
        auto* self = static_cast<nats_bridge*>(closure);
        self->log_.log(EVMESH_LOG_INFO, "nats %s: connected to %s", self->log_.instance.c_str(),
                       printable(self->url_, 100).c_str());
    }

    host_logger log_;
    std::string url_;
    name_template subject_;
    bool jetstream_ = false;
    std::string expect_stream_;
    int64_t timeout_ms_ = 5000;
    body_mode mode_ = body_mode::binary;
    natsConnection* nc_ = nullptr;
    jsCtx* js_ = nullptr;

    // the shared flush of core publishes (publish_core)
    std::mutex flush_mutex_;
    std::condition_variable flush_cv_;
    uint64_t published_ = 0;       // publishes numbered so far
    uint64_t flushed_ = 0;         // every publish up to this number is flushed
    uint64_t failed_through_ = 0;  // a flush covering up to this number failed
    natsStatus failed_status_ = NATS_OK;
    bool flushing_ = false;
};

}  // namespace
}  // namespace evmesh::channels

extern "C" EVMESH_CHANNEL_EXPORT const evmesh_channel_plugin* evmesh_channel_plugin_v1(void) {
    return &evmesh::channels::plugin_glue<evmesh::channels::nats_bridge>::table;
}
