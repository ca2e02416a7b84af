// The "redis" bridge: XADD of each event to a Redis stream (hiredis), trimmed with MAXLEN ~.
// Delivered = Redis answered the XADD with the new entry's id. How durable that answer is depends
// on the server's persistence (appendfsync); docs/BRIDGES.md.
#include "bridge_common.hpp"

#include <hiredis/hiredis.h>

#include <sys/time.h>

#include <memory>

namespace evmesh::channels {
namespace {

using namespace bridge;

struct context_deleter {
    void operator()(redisContext* c) const noexcept { redisFree(c); }
};
using context_ptr = std::unique_ptr<redisContext, context_deleter>;

struct reply_deleter {
    void operator()(redisReply* r) const noexcept { freeReplyObject(r); }
};
using reply_ptr = std::unique_ptr<redisReply, reply_deleter>;

struct connection {
    context_ptr ctx;
};

timeval to_timeval(int64_t ms) {
    timeval tv{};
    tv.tv_sec = static_cast<time_t>(ms / 1000);
    tv.tv_usec = static_cast<suseconds_t>((ms % 1000) * 1000);
    return tv;
}

class redis_bridge {
public:
    static constexpr const char* plugin_name = "redis";
    static constexpr const char* description = "XADD to a Redis stream (MAXLEN ~), delivered = the XADD reply";

    explicit redis_bridge(const evmesh_host& host) : log_(host) {
        settings s(plugin_name, host.settings_json);
        std::string url = s.required_string("url");
        auto u = parse_url(url, {"redis"}, 6379);
        if (!u) s.fail("url", "must be redis://[[user]:password@]host[:port][/db]");
        host_ = u->host;
        port_ = u->port;
        user_ = u->user;
        password_ = u->password;
        if (!u->path.empty()) {
            if (u->path.size() > 4 || u->path.find_first_not_of("0123456789") != std::string::npos)
                s.fail("url", "has a database number that is not an integer");
            db_ = std::atoi(u->path.c_str());
        }
        stream_ = template_setting(s, "stream", "{topic}");
        maxlen_ = s.integer_or("maxlen", 1000000, 0, int64_t{1} << 40);
        timeout_ms_ = s.duration_ms_or("timeout_ms", 5000);
        mode_ = mode_setting(s);
        s.finish();
    }

    evmesh_status deliver(const evmesh_event& ev, const evmesh_attempt&, evmesh_result& r) {
        event_fields f(ev);
        std::string stream = stream_.expand(f);
        if (stream.empty()) {
            set_detail(&r, "stream template \"%s\" expanded to an empty key", printable(stream_.text(), 100).c_str());
            return EVMESH_FAIL;
        }
        // XADD key MAXLEN ~ N * field value ...
        std::vector<std::string> args{"XADD", stream};
        if (maxlen_ > 0) {
            args.emplace_back("MAXLEN");
            args.emplace_back("~");
            args.push_back(std::to_string(maxlen_));
        }
        args.emplace_back("*");
        message_body body = make_body(ev, mode_);
        if (mode_ == body_mode::binary) {
            for (auto& [k, v] : ce_attributes(ev)) {
                args.push_back(k);
                args.push_back(std::move(v));
            }
        } else {
            args.emplace_back("id");
            args.emplace_back(view(ev.id_text));
            args.emplace_back("type");
            args.emplace_back(view(ev.topic, ev.topic_len));
        }
        if (!body.content_type.empty()) {
            args.emplace_back("datacontenttype");
            args.push_back(body.content_type);
        }
        args.emplace_back("data");
        args.push_back(std::move(body.bytes));

        conn_pool<connection>::lease lease(pool_);
        auto& c = lease.conn();
        if (!c) {
            c = connect(r);
            if (!c) return EVMESH_RETRY;
        }
        reply_ptr reply = command(*c, args);
        if (!reply) {
            set_detail(&r, "%s", c->ctx->errstr[0] ? printable(c->ctx->errstr, 200).c_str() : "connection lost");
            lease.discard();  // the connection's state is unknown after an I/O error
            return EVMESH_RETRY;
        }
        if (reply->type == REDIS_REPLY_ERROR) {
            std::string msg(reply->str ? reply->str : "", reply->len);
            set_detail(&r, "%s", printable(msg, 200).c_str());
            // WRONGTYPE: the key holds something else than a stream; no retry fixes that event.
            // Everything else (LOADING, READONLY, OOM, NOAUTH, MASTERDOWN, ...) may pass.
            return msg.rfind("WRONGTYPE", 0) == 0 ? EVMESH_FAIL : EVMESH_RETRY;
        }
        if (reply->type != REDIS_REPLY_STRING) {
            set_detail(&r, "unexpected XADD reply type %d", reply->type);
            lease.discard();
            return EVMESH_RETRY;
        }
        return EVMESH_DELIVERED;
    }

private:
    static reply_ptr command(connection& c, const std::vector<std::string>& args) {
        std::vector<const char*> argv;
        std::vector<size_t> lens;
        for (const auto& a : args) {
            argv.push_back(a.data());
            lens.push_back(a.size());
        }
        return reply_ptr(static_cast<redisReply*>(
            redisCommandArgv(c.ctx.get(), static_cast<int>(argv.size()), argv.data(), lens.data())));
    }

    // A new connection with AUTH and SELECT done, or nullptr with the reason in r.
    std::unique_ptr<connection> connect(evmesh_result& r) const {
        auto c = std::make_unique<connection>();
        c->ctx.reset(redisConnectWithTimeout(host_.c_str(), port_, to_timeval(timeout_ms_)));
        if (!c->ctx) {
            set_detail(&r, "out of memory creating the connection");
            return nullptr;
        }
        if (c->ctx->err) {
            set_detail(&r, "connect %s:%d: %s", host_.c_str(), port_, printable(c->ctx->errstr, 150).c_str());
            return nullptr;
        }
        // the same bound for every command: a hung server turns into a retry, not a stuck worker
        redisSetTimeout(c->ctx.get(), to_timeval(timeout_ms_));
        redisEnableKeepAlive(c->ctx.get());
        auto setup = [&](const std::vector<std::string>& args) {
            reply_ptr reply = command(*c, args);
            if (!reply) {
                set_detail(&r, "%s: %s", args[0].c_str(), printable(c->ctx->errstr, 150).c_str());
                return false;
            }
            if (reply->type == REDIS_REPLY_ERROR) {
                set_detail(&r, "%s: %s", args[0].c_str(), printable(std::string(reply->str, reply->len), 150).c_str());
                return false;
            }
            return true;
        };
        if (!password_.empty()) {
            std::vector<std::string> auth{"AUTH"};
            if (!user_.empty()) auth.push_back(user_);
            auth.push_back(password_);
            if (!setup(auth)) return nullptr;
        }
        if (db_ != 0 && !setup({"SELECT", std::to_string(db_)})) return nullptr;
        return c;
    }

    host_logger log_;
    std::string host_, user_, password_;
    int port_ = 6379;
    int db_ = 0;
    name_template stream_;
    int64_t maxlen_ = 1000000;
    int64_t timeout_ms_ = 5000;
    body_mode mode_ = body_mode::binary;
    conn_pool<connection> pool_;
};

}  // namespace
}  // namespace evmesh::channels

extern "C" EVMESH_CHANNEL_EXPORT const evmesh_channel_plugin* evmesh_channel_plugin_v1(void) {
    return &evmesh::channels::plugin_glue<evmesh::channels::redis_bridge>::table;
}
