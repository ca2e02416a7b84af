// The node's HTTP server on Boost.Beast (docs/HTTP-STACK.md). One event-loop thread parses and
// writes; handlers run on a small pool and post their answer back, so a handler that waits (a
// delivery-log read, a call into the node) never stalls other connections.
#include "http_server.hpp"

#include <algorithm>
#include <array>
#include <cctype>
#include <optional>
#include <thread>

#include <boost/asio.hpp>
#include <boost/asio/ssl.hpp>
#include <boost/beast/core.hpp>
#include <boost/beast/http.hpp>
#include <boost/beast/ssl.hpp>
#include <boost/beast/websocket/rfc6455.hpp>
#include <openssl/evp.h>
#include <openssl/sha.h>

#include <atomic>
#include <deque>
#include <nlohmann/json.hpp>
#include <spdlog/spdlog.h>

#include <evmesh/event.hpp>

namespace evmesh::app {

namespace asio = boost::asio;
namespace beast = boost::beast;
namespace http = beast::http;
namespace websocket = beast::websocket;
namespace ssl = asio::ssl;
using tcp = asio::ip::tcp;

std::string http_request::header(const std::string& lower_name) const {
    auto it = headers.find(lower_name);
    return it == headers.end() ? std::string() : it->second;
}

namespace {

std::string percent_decode(std::string_view s) {
    std::string out;
    out.reserve(s.size());
    for (std::size_t i = 0; i < s.size(); ++i) {
        if (s[i] == '+') {
            out += ' ';
        } else if (s[i] == '%' && i + 2 < s.size() && std::isxdigit(static_cast<unsigned char>(s[i + 1])) &&
                   std::isxdigit(static_cast<unsigned char>(s[i + 2]))) {
            out += static_cast<char>(std::stoi(std::string(s.substr(i + 1, 2)), nullptr, 16));
            i += 2;
        } else {
            out += s[i];
        }
    }
    return out;
}

std::optional<std::string> find_param(const std::string& query, const std::string& name) {
    std::size_t pos = 0;
    while (pos <= query.size()) {
        const auto end = std::min(query.find('&', pos), query.size());
        const std::string_view kv(query.data() + pos, end - pos);
        const auto eq = kv.find('=');
        if (percent_decode(kv.substr(0, eq)) == name) {
            return eq == std::string_view::npos ? std::string() : percent_decode(kv.substr(eq + 1));
        }
        pos = end + 1;
    }
    return std::nullopt;
}

bool valid_request_id(const std::string& id) {
    return !id.empty() && id.size() <= 128 && std::all_of(id.begin(), id.end(), [](char c) {
        return std::isalnum(static_cast<unsigned char>(c)) != 0 || c == '-' || c == '_' || c == '.';
    });
}

// Host header without the port: "127.0.0.1:9464" -> "127.0.0.1", "[::1]:80" -> "::1".
std::string host_only(const std::string& h) {
    if (!h.empty() && h.front() == '[') {
        const auto close = h.find(']');
        return close == std::string::npos ? h : h.substr(1, close - 1);
    }
    const auto colon = h.rfind(':');
    return colon == std::string::npos ? h : h.substr(0, colon);
}

}  // namespace

bool is_loopback_host(const std::string& host) {
    if (host == "localhost") {
        return true;
    }
    beast::error_code ec;
    const auto a = asio::ip::make_address(host, ec);
    return !ec && a.is_loopback();
}

bool http_request::has_param(const std::string& name) const { return find_param(query, name).has_value(); }

std::string http_request::param(const std::string& name) const { return find_param(query, name).value_or(""); }

void http_error(http_response& res, int status, const std::string& code, const std::string& message,
                const std::string& field) {
    nlohmann::json e = {{"code", code}, {"message", message}};
    if (!field.empty()) {
        e["field"] = field;
    }
    // the message may quote request bytes that are not UTF-8: replaced, never a throw
    res.json(status, nlohmann::json({{"error", e}}).dump(-1, ' ', false, nlohmann::json::error_handler_t::replace));
}

struct http_server::impl {
    struct route_entry {
        std::string method;
        std::regex pattern;
        http_handler handler;
    };
    std::vector<route_entry> routes;
    http_options opt;
    bool loopback = false;
    asio::io_context ioc{1};
    std::optional<ssl::context> tls;
    tcp::acceptor acceptor{ioc};
    std::optional<asio::thread_pool> pool;
    std::thread loop;
    bool stopped = false;

    void accept();
    // Routing and the checks every request passes; runs on the handler pool.
    void handle(http_request& req, http_response& res) const;
};

namespace {

// What other threads send to a live connection, handed to its loop in bursts: one post per
// burst instead of one per message (at 1,000 events/s to 1,000 clients that is the difference
// between a million posts a second and a few thousand).
template <class T>
class burst_inbox {
public:
    // True when the caller must post a drain (none is pending).
    bool push(T item) {
        std::lock_guard lk(m_);
        items_.push_back(std::move(item));
        const bool post = !posted_;
        posted_ = true;
        return post;
    }
    template <class Queue>
    void drain_into(Queue& q) {
        std::lock_guard lk(m_);
        for (auto& x : items_) {
            q.push_back(std::move(x));
        }
        items_.clear();
        posted_ = false;
    }

private:
    std::mutex m_;
    std::vector<T> items_;  // guarded by m_
    bool posted_ = false;   // guarded by m_
};

// Server-Sent Events: the headers, then whatever is sent, until either side closes. The socket is
// read only to notice that the client went away.
template <class Stream>
class sse_conn : public live_conn, public std::enable_shared_from_this<sse_conn<Stream>> {
public:
    sse_conn(http_server::impl& srv, Stream stream, std::shared_ptr<live_handlers> h)
        : srv_(srv), stream_(std::move(stream)), h_(std::move(h)) {}

    void start(const std::string& request_id, const std::string& extra_headers) {
        auto head = std::make_shared<std::string>(
            "HTTP/1.1 200 OK\r\nServer: evmesh-node\r\nContent-Type: text/event-stream\r\n"
            "Cache-Control: no-cache\r\nX-Accel-Buffering: no\r\nConnection: close\r\nX-Request-Id: " +
            request_id + "\r\n" + extra_headers + "\r\n");
        beast::get_lowest_layer(stream_).expires_never();
        asio::async_write(stream_, asio::buffer(*head),
                          [self = this->shared_from_this(), head](beast::error_code ec, std::size_t) {
                              if (ec) {
                                  return self->finish();
                              }
                              if (self->h_->open) {
                                  self->h_->open(self);
                              }
                              self->watch();
                          });
    }

    using live_conn::send;
    bool send(std::shared_ptr<const std::string> data, bool) override {
        if (closed_) {
            return false;
        }
        queued_ += data->size();
        if (inbox_.push(std::move(data))) {
            asio::post(srv_.ioc, [self = this->shared_from_this()] {
                self->inbox_.drain_into(self->q_);
                if (!self->writing_) {
                    self->write_next();
                }
            });
        }
        return true;
    }

    void close(int, const std::string&) override {
        closed_ = true;
        asio::post(srv_.ioc, [self = this->shared_from_this()] {
            self->closing_ = true;
            if (!self->writing_) {
                self->finish();
            }
        });
    }

    std::size_t queued_bytes() const override { return queued_; }
    bool websocket() const override { return false; }

private:
    void watch() {
        stream_.async_read_some(asio::buffer(rbuf_), [self = this->shared_from_this()](beast::error_code ec, std::size_t) {
            if (ec) {
                return self->finish();
            }
            self->watch();
        });
    }

    void write_next() {
        if (done_ || q_.empty()) {
            writing_ = false;
            if (closing_) {
                finish();
            }
            return;
        }
        writing_ = true;
        // everything queued, up to 64 chunks, in one gathered write (writev)
        bufs_.clear();
        std::size_t bytes = 0;
        for (std::size_t i = 0; i < q_.size() && i < 64; ++i) {
            bufs_.emplace_back(q_[i]->data(), q_[i]->size());
            bytes += q_[i]->size();
        }
        asio::async_write(stream_, bufs_,
                          [self = this->shared_from_this(), n = bufs_.size(), bytes](beast::error_code ec, std::size_t) {
                              self->queued_ -= bytes;
                              self->q_.erase(self->q_.begin(), self->q_.begin() + static_cast<std::ptrdiff_t>(n));
                              if (ec) {
                                  return self->finish();
                              }
                              self->write_next();
                          });
    }

    void finish() {
        if (done_) {
            return;
        }
        done_ = true;
        closed_ = true;
        beast::error_code ec;
        beast::get_lowest_layer(stream_).socket().shutdown(tcp::socket::shutdown_both, ec);
        beast::get_lowest_layer(stream_).close();
        if (h_->closed) {
            h_->closed();
        }
    }

    http_server::impl& srv_;
    Stream stream_;
    std::shared_ptr<live_handlers> h_;
    std::deque<std::shared_ptr<const std::string>> q_;  // loop thread only
    std::vector<asio::const_buffer> bufs_;                // loop thread only
    burst_inbox<std::shared_ptr<const std::string>> inbox_;
    std::array<char, 512> rbuf_{};
    std::atomic<std::size_t> queued_{0};
    std::atomic<bool> closed_{false};
    bool writing_ = false, closing_ = false, done_ = false;  // loop thread only
};

// WebSocket (RFC 6455) on the same listener. Beast parses the upgrade request; the framing is
// ours (docs/HTTP-STACK.md, "WebSocket framing"): Beast's websocket::stream writes one message
// per async_write, a syscall each, and measured 1,342,934 of 2,500,000 events delivered where
// SSE's gathered writes delivered all. Here the frames queued for a connection go out like SSE
// chunks: up to 64 frames (header and shared payload buffers) in one writev. Reading is the
// small side (subscribe messages): masked client frames, fragmentation, ping/pong, the close
// handshake, UTF-8 checks on text, with the close codes of RFC 6455 7.4.1: 1002 on a protocol
// error, 1007 on a text message that is not UTF-8, 1009 on one over `max_message_bytes`.
// Keep-alive: a ping after `ping_interval` of silence; a ping unanswered for another interval
// closes the connection (half-open peers go).
namespace ws {

enum opcode : std::uint8_t { cont = 0, text = 1, binary = 2, close = 8, ping = 9, pong = 10 };

// RFC 3629 UTF-8: no overlong forms, no surrogates, nothing above U+10FFFF.
bool valid_utf8(std::string_view s) {
    std::size_t i = 0;
    const auto* b = reinterpret_cast<const unsigned char*>(s.data());
    while (i < s.size()) {
        const unsigned c = b[i];
        std::size_t n = 0;
        unsigned lo = 0x80, hi = 0xBF;
        if (c < 0x80) {
            ++i;
            continue;
        } else if (c >= 0xC2 && c <= 0xDF) {
            n = 1;
        } else if (c >= 0xE0 && c <= 0xEF) {
            n = 2;
            lo = c == 0xE0 ? 0xA0 : 0x80;
            hi = c == 0xED ? 0x9F : 0xBF;
        } else if (c >= 0xF0 && c <= 0xF4) {
            n = 3;
            lo = c == 0xF0 ? 0x90 : 0x80;
            hi = c == 0xF4 ? 0x8F : 0xBF;
        } else {
            return false;
        }
        for (std::size_t k = 1; k <= n; ++k) {
            if (i + k >= s.size()) {
                return false;
            }
            const unsigned x = b[i + k];
            if (x < (k == 1 ? lo : 0x80u) || x > (k == 1 ? hi : 0xBFu)) {
                return false;
            }
        }
        i += n + 1;
    }
    return true;
}

// Close codes a peer may send (RFC 6455 7.4.1 and 7.4.2).
bool valid_close_code(unsigned code) {
    return (code >= 1000 && code <= 1003) || (code >= 1007 && code <= 1011) || (code >= 3000 && code <= 4999);
}

// Sec-WebSocket-Accept: base64(SHA-1(key + the RFC's GUID)).
std::string accept_key(const std::string& key) {
    const std::string in = key + "258EAFA5-E914-47DA-95CA-C5AB0DC85B11";
    unsigned char digest[SHA_DIGEST_LENGTH];
    SHA1(reinterpret_cast<const unsigned char*>(in.data()), in.size(), digest);
    unsigned char out[4 * ((SHA_DIGEST_LENGTH + 2) / 3) + 1];
    const int n = EVP_EncodeBlock(out, digest, SHA_DIGEST_LENGTH);
    return {reinterpret_cast<const char*>(out), static_cast<std::size_t>(n)};
}

// A server frame's header (never masked): 2, 4 or 10 bytes.
std::size_t frame_header(std::array<unsigned char, 10>& h, std::uint8_t op, std::size_t len) {
    h[0] = static_cast<unsigned char>(0x80 | op);
    if (len < 126) {
        h[1] = static_cast<unsigned char>(len);
        return 2;
    }
    if (len <= 0xFFFF) {
        h[1] = 126;
        h[2] = static_cast<unsigned char>(len >> 8);
        h[3] = static_cast<unsigned char>(len);
        return 4;
    }
    h[1] = 127;
    for (int i = 0; i < 8; ++i) {
        h[2 + i] = static_cast<unsigned char>(static_cast<std::uint64_t>(len) >> (8 * (7 - i)));
    }
    return 10;
}

std::shared_ptr<const std::string> close_payload(int code, const std::string& reason) {
    std::string p;
    p += static_cast<char>((code >> 8) & 0xFF);
    p += static_cast<char>(code & 0xFF);
    p += reason.substr(0, 123);  // a control frame carries at most 125 bytes
    return std::make_shared<const std::string>(std::move(p));
}

}  // namespace ws

template <class Stream>
class ws_conn : public live_conn, public std::enable_shared_from_this<ws_conn<Stream>> {
public:
    ws_conn(Stream stream, std::shared_ptr<live_handlers> h, std::string leftover)
        : stream_(std::move(stream)), h_(std::move(h)), timer_(stream_.get_executor()),
          rbuf_(std::move(leftover)) {
        heads_.reserve(batch);
    }

    void start(const http::request<http::string_body>& req, const std::string& request_id) {
        beast::get_lowest_layer(stream_).expires_never();
        const auto key = std::string(req[http::field::sec_websocket_key]);
        std::string head;
        if (req[http::field::sec_websocket_version] != "13") {
            head = "HTTP/1.1 426 Upgrade Required\r\nSec-WebSocket-Version: 13\r\n";
        } else if (key.size() != 24) {  // base64 of 16 bytes
            head = "HTTP/1.1 400 Bad Request\r\n";
        }
        const bool refused = !head.empty();
        if (refused) {
            head += "Server: evmesh-node\r\nContent-Length: 0\r\nConnection: close\r\nX-Request-Id: " + request_id +
                    "\r\n\r\n";
        } else {
            head = "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                   "Sec-WebSocket-Accept: " + ws::accept_key(key) + "\r\nServer: evmesh-node\r\nX-Request-Id: " +
                   request_id + "\r\n\r\n";
        }
        auto out = std::make_shared<std::string>(std::move(head));
        asio::async_write(stream_, asio::buffer(*out),
                          [self = this->shared_from_this(), out, refused](beast::error_code ec, std::size_t) {
                              if (ec || refused) {
                                  return self->finish();
                              }
                              self->last_read_ = std::chrono::steady_clock::now();
                              if (self->h_->open) {
                                  self->h_->open(self);
                              }
                              self->keep_alive();
                              self->parse();  // frames that came with the upgrade request
                              if (!self->done_ && !self->stop_reading_) {
                                  self->read();
                              }
                          });
    }

    using live_conn::send;
    bool send(std::shared_ptr<const std::string> data, bool binary) override {
        if (closed_) {
            return false;
        }
        queued_ += data->size();
        if (inbox_.push({std::move(data), binary ? ws::binary : ws::text})) {
            asio::post(stream_.get_executor(), [self = this->shared_from_this()] { self->drain(); });
        }
        return true;
    }

    void close(int code, const std::string& reason) override {
        closed_ = true;
        asio::post(stream_.get_executor(), [self = this->shared_from_this(), code, reason] {
            self->drain();  // what was sent before close() goes first
            self->begin_close(code, reason, false);
        });
    }

    std::size_t queued_bytes() const override { return queued_; }
    bool websocket() const override { return true; }

private:
    static constexpr std::size_t batch = 64;  // frames per gathered write
    struct frame {
        std::shared_ptr<const std::string> data;
        std::uint8_t op;
    };

    void drain() {
        inbox_.drain_into(q_);
        if (discard_) {  // closing at once: what was not written yet is dropped
            drop_unwritten();
        }
        if (!writing_) {
            write_next();
        }
    }

    void drop_unwritten() {
        while (q_.size() > inflight_) {
            queued_ -= q_.back().data->size();
            q_.pop_back();
        }
    }

    // Queues a control frame (after the data queued before it).
    void control(std::uint8_t op, std::shared_ptr<const std::string> payload) {
        if (close_queued_) {
            return;
        }
        inbox_.drain_into(q_);  // what other threads sent before this goes first
        queued_ += payload->size();
        q_.push_back({std::move(payload), op});
        if (!writing_) {
            write_next();
        }
    }

    // Our side of the close handshake. `now`: after the write in flight, dropping the rest (a
    // protocol error, or the peer's close); otherwise after everything queued.
    void begin_close(int code, const std::string& reason, bool now) {
        closed_ = true;
        if (close_queued_ || done_) {
            return;
        }
        if (now) {
            discard_ = true;
            drop_unwritten();
        }
        close_queued_ = true;
        q_.push_back({ws::close_payload(code, reason), ws::close});
        queued_ += q_.back().data->size();
        if (!writing_) {
            write_next();
        }
    }

    void write_next() {
        if (done_) {
            return;
        }
        if (q_.empty()) {
            writing_ = false;
            return;
        }
        writing_ = true;
        bufs_.clear();
        heads_.clear();
        std::size_t bytes = 0;
        inflight_ = 0;
        bool close_frame = false;
        for (; inflight_ < q_.size() && inflight_ < batch && !close_frame; ++inflight_) {
            const auto& f = q_[inflight_];
            heads_.emplace_back();
            const auto hl = ws::frame_header(heads_.back(), f.op, f.data->size());
            bufs_.emplace_back(heads_.back().data(), hl);
            if (!f.data->empty()) {
                bufs_.emplace_back(f.data->data(), f.data->size());
            }
            bytes += f.data->size();
            close_frame = f.op == ws::close;
        }
        asio::async_write(stream_, bufs_, [self = this->shared_from_this(), bytes, close_frame](beast::error_code ec,
                                                                                                std::size_t) {
            self->queued_ -= bytes;
            self->q_.erase(self->q_.begin(), self->q_.begin() + static_cast<std::ptrdiff_t>(self->inflight_));
            self->inflight_ = 0;
            if (ec) {
                return self->finish();
            }
            if (close_frame) {
                self->close_sent_ = true;
                if (self->peer_closed_ || self->stop_reading_) {
                    return self->finish();  // the handshake is complete, or there is nothing to wait for
                }
                self->linger();  // wait for the peer's close frame, a few seconds at most
            }
            self->write_next();
        });
    }

    void read() {
        stream_.async_read_some(asio::buffer(chunk_), [self = this->shared_from_this()](beast::error_code ec,
                                                                                          std::size_t n) {
            if (ec) {
                return self->finish();
            }
            self->last_read_ = std::chrono::steady_clock::now();
            self->rbuf_.append(self->chunk_.data(), n);
            self->parse();
            if (!self->done_ && !self->stop_reading_) {
                self->read();
            }
        });
    }

    // Handles every complete frame in rbuf_.
    void parse() {
        std::size_t pos = 0;
        while (!stop_reading_ && !done_) {
            const auto avail = rbuf_.size() - pos;
            if (avail < 2) {
                break;
            }
            const auto* b = reinterpret_cast<const unsigned char*>(rbuf_.data() + pos);
            const bool fin = (b[0] & 0x80) != 0;
            const std::uint8_t op = b[0] & 0x0F;
            std::uint64_t len = b[1] & 0x7F;
            std::size_t hl = 2;
            if ((b[0] & 0x70) != 0 || (b[1] & 0x80) == 0) {
                return fail(1002, "reserved bits set or frame not masked");
            }
            if (len == 126) {
                if (avail < 4) {
                    break;
                }
                len = (std::uint64_t{b[2]} << 8) | b[3];
                hl = 4;
            } else if (len == 127) {
                if (avail < 10) {
                    break;
                }
                len = 0;
                for (int i = 0; i < 8; ++i) {
                    len = (len << 8) | b[2 + i];
                }
                hl = 10;
            }
            const bool control_frame = op >= 8;
            if (control_frame && (!fin || len > 125)) {
                return fail(1002, "fragmented or oversized control frame");
            }
            if ((op > ws::binary && op < ws::close) || op > ws::pong) {
                return fail(1002, "unknown opcode");
            }
            if (!control_frame && (op == ws::cont) != in_message_) {
                return fail(1002, in_message_ ? "a new message inside a fragmented one" : "continuation of nothing");
            }
            if (!control_frame && len > h_->max_message_bytes - std::min(msg_.size(), h_->max_message_bytes)) {
                return fail(1009, "message too big");
            }
            if (avail < hl + 4 + len) {
                break;
            }
            const auto* mask = b + hl;
            std::string payload(rbuf_.data() + pos + hl + 4, static_cast<std::size_t>(len));
            for (std::size_t i = 0; i < payload.size(); ++i) {
                payload[i] = static_cast<char>(payload[i] ^ static_cast<char>(mask[i % 4]));
            }
            pos += hl + 4 + static_cast<std::size_t>(len);
            if (control_frame) {
                on_control(op, std::move(payload));
                continue;
            }
            if (op != ws::cont) {
                msg_binary_ = op == ws::binary;
            }
            msg_ += payload;
            in_message_ = !fin;
            if (fin) {
                std::string m;
                m.swap(msg_);
                if (!msg_binary_ && !ws::valid_utf8(m)) {
                    return fail(1007, "text message is not UTF-8");
                }
                if (h_->message && !closed_) {
                    h_->message(m, msg_binary_);
                }
            }
        }
        rbuf_.erase(0, pos);
    }

    void on_control(std::uint8_t op, std::string payload) {
        if (op == ws::ping) {
            control(ws::pong, std::make_shared<const std::string>(std::move(payload)));
        } else if (op == ws::close) {
            peer_closed_ = true;
            stop_reading_ = true;
            if (close_sent_) {
                return finish();  // the answer to our close
            }
            int code = 1000;
            if (payload.size() == 1) {
                return fail(1002, "close frame of one byte");
            }
            if (payload.size() >= 2) {
                code = (static_cast<unsigned char>(payload[0]) << 8) | static_cast<unsigned char>(payload[1]);
                if (!ws::valid_close_code(static_cast<unsigned>(code))) {
                    return fail(1002, "invalid close code");
                }
                if (!ws::valid_utf8(std::string_view(payload).substr(2))) {
                    return fail(1007, "close reason is not UTF-8");
                }
            }
            begin_close(code, {}, true);  // echo the code (RFC 6455 5.5.1)
        }
        // a pong: the peer is alive, which last_read_ already records
    }

    void fail(int code, const char* why) {
        stop_reading_ = true;
        begin_close(code, why, true);
    }

    // Ticks at half the interval: a ping goes out after one to one and a half intervals of
    // silence; a ping unanswered (nothing read since) for an interval closes the connection.
    void keep_alive() {
        timer_.expires_after(h_->ping_interval / 2);
        timer_.async_wait([self = this->shared_from_this()](beast::error_code ec) {
            if (ec || self->done_ || self->close_queued_) {
                return;
            }
            const auto now = std::chrono::steady_clock::now();
            const auto interval = self->h_->ping_interval;
            if (self->ping_sent_ > self->last_read_) {
                if (now - self->ping_sent_ >= interval) {
                    return self->finish();  // no answer to the ping: half-open or gone
                }
            } else if (now - self->last_read_ >= interval) {
                self->ping_sent_ = now;
                self->control(ws::ping, std::make_shared<const std::string>());
            }
            self->keep_alive();
        });
    }

    void linger() {
        timer_.expires_after(std::chrono::seconds(5));
        timer_.async_wait([self = this->shared_from_this()](beast::error_code ec) {
            if (!ec) {
                self->finish();
            }
        });
    }

    void finish() {
        if (done_) {
            return;
        }
        done_ = true;
        closed_ = true;
        beast::error_code ec;
        timer_.cancel();
        beast::get_lowest_layer(stream_).socket().shutdown(tcp::socket::shutdown_both, ec);
        beast::get_lowest_layer(stream_).close();
        if (h_->closed) {
            h_->closed();
        }
    }

    Stream stream_;
    std::shared_ptr<live_handlers> h_;
    asio::steady_timer timer_;
    std::string rbuf_;                      // bytes received and not parsed yet
    std::array<char, 2048> chunk_{};  // client frames are small (subscribe messages, pongs)
    std::string msg_;                       // a fragmented message so far
    std::deque<frame> q_;                   // loop thread only
    std::vector<std::array<unsigned char, 10>> heads_;  // the headers of the write in flight
    std::vector<asio::const_buffer> bufs_;
    burst_inbox<frame> inbox_;
    std::atomic<std::size_t> queued_{0};
    std::atomic<bool> closed_{false};
    std::chrono::steady_clock::time_point last_read_{}, ping_sent_{};
    std::size_t inflight_ = 0;              // frames at the front of q_ being written
    bool writing_ = false, discard_ = false, close_queued_ = false, close_sent_ = false;
    bool peer_closed_ = false, stop_reading_ = false, in_message_ = false, msg_binary_ = false, done_ = false;
};

template <class Stream>
class session : public std::enable_shared_from_this<session<Stream>> {
public:
    session(http_server::impl& s, Stream stream) : srv_(s), stream_(std::move(stream)) {}

    void start() {
        if constexpr (std::is_same_v<Stream, beast::ssl_stream<beast::tcp_stream>>) {
            beast::get_lowest_layer(stream_).expires_after(srv_.opt.header_timeout);
            stream_.async_handshake(ssl::stream_base::server,
                                    [self = this->shared_from_this()](beast::error_code ec) {
                                        if (!ec) {
                                            self->read();
                                        }
                                    });
        } else {
            read();
        }
    }

private:
    void read() {
        parser_.emplace();
        parser_->header_limit(static_cast<std::uint32_t>(srv_.opt.header_limit));
        parser_->body_limit(srv_.opt.body_limit);
        // the first request must arrive within the header timeout; later ones within the idle one
        beast::get_lowest_layer(stream_).expires_after(first_ ? srv_.opt.header_timeout : srv_.opt.idle_timeout);
        first_ = false;
        http::async_read(stream_, buf_, *parser_,
                         [self = this->shared_from_this()](beast::error_code ec, std::size_t) { self->on_read(ec); });
    }

    void on_read(beast::error_code ec) {
        if (ec == http::error::body_limit || ec == http::error::header_limit) {
            http_response res;
            const bool body = ec == http::error::body_limit;
            http_error(res, body ? 413 : 431, body ? "payload_too_large" : "headers_too_large",
                       body ? "the request body exceeds " + std::to_string(srv_.opt.body_limit) + " bytes"
                            : "the request headers exceed " + std::to_string(srv_.opt.header_limit) + " bytes");
            keep_alive_ = false;
            write(std::move(res), valid_request_id_or_new({}));
            return;
        }
        if (ec) {
            close();  // end of stream, timeout (slowloris), reset: nothing to answer
            return;
        }
        auto msg = parser_->release();
        keep_alive_ = msg.keep_alive();
        auto req = std::make_shared<http_request>();
        req->method = std::string(msg.method_string());
        const std::string target(msg.target());
        const auto q = target.find('?');
        req->path = target.substr(0, q);
        req->query = q == std::string::npos ? std::string() : target.substr(q + 1);
        for (const auto& f : msg) {
            std::string name(f.name_string());
            std::transform(name.begin(), name.end(), name.begin(),
                           [](unsigned char c) { return static_cast<char>(std::tolower(c)); });
            req->headers[name] = std::string(f.value());
        }
        if (websocket::is_upgrade(msg)) {
            req->websocket_upgrade = true;
            upgrade_ = std::make_shared<http::request<http::string_body>>(msg);
        }
        req->body = std::move(msg.body());
        req->request_id = valid_request_id_or_new(req->header("x-request-id"));
        beast::get_lowest_layer(stream_).expires_never();  // the handler takes what it takes
        asio::post(*srv_.pool, [self = this->shared_from_this(), req] {
            http_response res;
            try {
                self->srv_.handle(*req, res);
            } catch (const std::exception& e) {
                http_error(res, 500, "internal", e.what());
            }
            asio::post(self->srv_.ioc, [self, res = std::move(res), id = req->request_id,
                                        head = req->method == "HEAD", ws = req->websocket_upgrade]() mutable {
                if (res.live && res.status == 200) {
                    std::string extra;  // CORS for an allowed origin's EventSource
                    for (const auto& [k, v] : res.headers) {
                        extra += k + ": " + v + "\r\n";
                    }
                    self->go_live(std::move(res.live), id, ws, extra);
                    return;
                }
                self->write(std::move(res), id, head);
            });
        });
    }

    // The connection leaves this session for a live one (SSE or WebSocket).
    void go_live(std::shared_ptr<live_handlers> live, const std::string& id, bool ws, const std::string& extra) {
        if (ws) {
            // bytes the client sent right after the upgrade request are its first frames
            auto leftover = beast::buffers_to_string(buf_.data());
            std::make_shared<ws_conn<Stream>>(std::move(stream_), std::move(live), std::move(leftover))
                ->start(*upgrade_, id);
        } else {
            std::make_shared<sse_conn<Stream>>(srv_, std::move(stream_), std::move(live))->start(id, extra);
        }
    }

    static std::string valid_request_id_or_new(const std::string& given) {
        return valid_request_id(given) ? given : to_string(new_event_id());
    }

    // A HEAD answer has the GET answer's headers (Content-Length included) and no body (RFC 9110 9.3.2).
    void write(http_response res, const std::string& request_id, bool head = false) {
        auto out = std::make_shared<http::response<http::string_body>>(static_cast<http::status>(res.status), 11);
        out->set(http::field::server, "evmesh-node");
        out->set(http::field::content_type, res.content_type);
        out->set("X-Request-Id", request_id);
        for (const auto& [k, v] : res.headers) {
            out->set(k, v);
        }
        out->keep_alive(keep_alive_);
        if (head) {
            out->content_length(res.body.size());
        } else {
            out->body() = std::move(res.body);
            out->prepare_payload();
        }
        beast::get_lowest_layer(stream_).expires_after(std::chrono::seconds(30));
        http::async_write(stream_, *out, [self = this->shared_from_this(), out](beast::error_code ec, std::size_t) {
            if (ec || !self->keep_alive_) {
                self->close();
                return;
            }
            self->read();
        });
    }

    void close() {
        beast::error_code ec;
        beast::get_lowest_layer(stream_).socket().shutdown(tcp::socket::shutdown_send, ec);
        beast::get_lowest_layer(stream_).close();
    }

    http_server::impl& srv_;
    Stream stream_;
    std::shared_ptr<http::request<http::string_body>> upgrade_;  // a WebSocket upgrade request
    beast::flat_buffer buf_;
    std::optional<http::request_parser<http::string_body>> parser_;
    bool keep_alive_ = true;
    bool first_ = true;
};

}  // namespace

void http_server::impl::handle(http_request& req, http_response& res) const {
    // A browser page of another origin (or a DNS-rebinding name for a loopback listener) must not
    // drive the node: browsers always send Origin on cross-origin requests and on every POST.
    // A page this node served itself (same origin: the dashboard) may: browsers send Origin on
    // every WebSocket and on same-origin POSTs too.
    const auto origin = req.header("origin");
    const auto host_header = req.header("host");
    const std::string scheme = tls ? "https://" : "http://";
    const bool same_origin = !host_header.empty() && origin == scheme + host_header;
    if (!origin.empty() && !same_origin &&
        std::find(opt.allowed_origins.begin(), opt.allowed_origins.end(), origin) == opt.allowed_origins.end()) {
        return http_error(res, 403, "forbidden_origin", "requests from web pages of origin " + origin +
                                                            " are refused", "Origin");
    }
    if (!origin.empty() && !same_origin) {
        // an origin of api.allowed_origins: its page may read the answer (simple requests:
        // EventSource, GET; there is no preflight, so no custom headers from such pages)
        res.headers.emplace_back("Access-Control-Allow-Origin", origin);
        res.headers.emplace_back("Vary", "Origin");
    }
    if (loopback) {
        const auto host = host_only(req.header("host"));
        if (!host.empty() && !is_loopback_host(host)) {
            return http_error(res, 403, "forbidden_host",
                              "this listener is on loopback; Host " + host + " is refused", "Host");
        }
    }
    std::vector<std::string> allowed;  // the methods of the routes whose pattern matches (405's Allow)
    for (const auto& r : routes) {
        std::smatch m;
        if (!std::regex_match(req.path, m, r.pattern)) {
            continue;
        }
        allowed.push_back(r.method);
        if (r.method == "GET") {
            allowed.emplace_back("HEAD");
        }
        if (r.method != req.method && !(r.method == "GET" && req.method == "HEAD")) {
            continue;
        }
        for (std::size_t i = 1; i < m.size(); ++i) {
            req.matches.push_back(m[i].str());
        }
        r.handler(req, res);
        return;
    }
    if (!allowed.empty()) {
        std::sort(allowed.begin(), allowed.end());
        allowed.erase(std::unique(allowed.begin(), allowed.end()), allowed.end());
        std::string allow;
        for (const auto& m : allowed) {
            allow += (allow.empty() ? "" : ", ") + m;
        }
        http_error(res, 405, "method_not_allowed", req.method + " is not allowed on " + req.path);
        res.headers.emplace_back("Allow", allow);
        return;
    }
    http_error(res, 404, "not_found", "no such path: " + req.path);
}

void http_server::impl::accept() {
    acceptor.async_accept(asio::make_strand(ioc), [this](beast::error_code ec, tcp::socket s) {
        if (ec) {
            if (ec != asio::error::operation_aborted) {
                accept();
            }
            return;
        }
        s.set_option(tcp::no_delay(true), ec);
        if (tls) {
            std::make_shared<session<beast::ssl_stream<beast::tcp_stream>>>(
                *this, beast::ssl_stream<beast::tcp_stream>(beast::tcp_stream(std::move(s)), *tls))
                ->start();
        } else {
            std::make_shared<session<beast::tcp_stream>>(*this, beast::tcp_stream(std::move(s)))->start();
        }
        accept();
    });
}

http_server::http_server() : impl_(std::make_unique<impl>()) {}

http_server::~http_server() { stop(); }

void http_server::route(const std::string& method, const std::string& pattern, http_handler h) {
    impl_->routes.push_back({method, std::regex(pattern), std::move(h)});
}

std::string http_server::start(const http_options& o) {
    auto& p = *impl_;
    p.opt = o;
    beast::error_code ec;
    const auto addr = asio::ip::make_address(o.host == "localhost" ? "127.0.0.1" : o.host, ec);
    if (ec) {
        return "cannot bind http endpoint '" + o.host + ":" + std::to_string(o.port) + "': not an IP address";
    }
    p.loopback = addr.is_loopback();
    if (!o.cert_file.empty() || !o.key_file.empty()) {
        p.tls.emplace(ssl::context::tls_server);
        p.tls->set_options(ssl::context::default_workarounds | ssl::context::no_sslv2 | ssl::context::no_sslv3 |
                           ssl::context::no_tlsv1 | ssl::context::no_tlsv1_1 | ssl::context::single_dh_use);
        p.tls->use_certificate_chain_file(o.cert_file, ec);
        if (ec) {
            return "cannot load the TLS certificate '" + o.cert_file + "': " + ec.message();
        }
        p.tls->use_private_key_file(o.key_file, ssl::context::pem, ec);
        if (ec) {
            return "cannot load the TLS key '" + o.key_file + "': " + ec.message();
        }
    }
    const tcp::endpoint ep(addr, static_cast<unsigned short>(o.port));
    p.acceptor.open(ep.protocol(), ec);
    if (!ec) {
        p.acceptor.set_option(tcp::acceptor::reuse_address(true), ec);
        p.acceptor.bind(ep, ec);
    }
    if (!ec) {
        p.acceptor.listen(asio::socket_base::max_listen_connections, ec);
    }
    if (ec) {
        return "cannot bind http endpoint '" + o.host + ":" + std::to_string(o.port) + "': " + ec.message();
    }
    p.pool.emplace(static_cast<std::size_t>(std::max(1, o.handler_threads)));
    p.accept();
    p.loop = std::thread([&p] { p.ioc.run(); });
    return {};
}

int http_server::port() const {
    beast::error_code ec;
    const auto ep = impl_->acceptor.local_endpoint(ec);
    return ec ? -1 : ep.port();
}

bool http_server::tls() const { return impl_->tls.has_value(); }

void http_server::stop() {
    auto& p = *impl_;
    if (p.stopped) {
        return;
    }
    p.stopped = true;
    asio::post(p.ioc, [&p] {
        beast::error_code ec;
        p.acceptor.close(ec);
    });
    if (p.pool) {
        p.pool->join();  // handlers in progress finish (they post their answers to the loop)
    }
    p.ioc.stop();
    if (p.loop.joinable()) {
        p.loop.join();
    }
}

}  // namespace evmesh::app
