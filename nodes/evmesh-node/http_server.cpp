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
#include <boost/beast/websocket.hpp>
#include <boost/beast/websocket/ssl.hpp>

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
        bool post = false;
        {
            std::lock_guard lk(pm_);
            pending_.push_back(std::move(data));
            post = !flush_posted_;
            flush_posted_ = true;
        }
        if (post) {  // one post per burst, not per message
            asio::post(srv_.ioc, [self = this->shared_from_this()] {
                {
                    std::lock_guard lk(self->pm_);
                    for (auto& d : self->pending_) {
                        self->q_.push_back(std::move(d));
                    }
                    self->pending_.clear();
                    self->flush_posted_ = false;
                }
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
    std::mutex pm_;
    std::vector<std::shared_ptr<const std::string>> pending_;  // guarded by pm_
    bool flush_posted_ = false;                                // guarded by pm_
    std::array<char, 512> rbuf_{};
    std::atomic<std::size_t> queued_{0};
    std::atomic<bool> closed_{false};
    bool writing_ = false, closing_ = false, done_ = false;  // loop thread only
};

// WebSocket (RFC 6455) on the same listener: Beast does the handshake, the framing, the close
// codes (1002 on a malformed frame, 1009 on a message over `max_message_bytes`) and keep-alive
// pings (an idle connection is pinged; one that answers nothing is closed: half-open peers go).
template <class Stream>
class ws_conn : public live_conn, public std::enable_shared_from_this<ws_conn<Stream>> {
public:
    ws_conn(http_server::impl& srv, Stream stream, std::shared_ptr<live_handlers> h)
        : srv_(srv), ws_(std::move(stream)), h_(std::move(h)) {}

    void start(std::shared_ptr<http::request<http::string_body>> req, const std::string& request_id) {
        beast::get_lowest_layer(ws_).expires_never();
        websocket::stream_base::timeout t{};
        t.handshake_timeout = std::chrono::seconds(10);
        t.idle_timeout = std::chrono::seconds(30);  // a ping after 15 s of silence, closed after 30 s
        t.keep_alive_pings = true;
        ws_.set_option(t);
        ws_.read_message_max(h_->max_message_bytes);
        ws_.set_option(websocket::stream_base::decorator([request_id](websocket::response_type& r) {
            r.set(http::field::server, "evmesh-node");
            r.set("X-Request-Id", request_id);
        }));
        ws_.async_accept(*req, [self = this->shared_from_this(), req](beast::error_code ec) {
            if (ec) {
                return self->finish();
            }
            if (self->h_->open) {
                self->h_->open(self);
            }
            self->read();
        });
    }

    using live_conn::send;
    bool send(std::shared_ptr<const std::string> data, bool binary) override {
        if (closed_) {
            return false;
        }
        queued_ += data->size();
        bool post = false;
        {
            std::lock_guard lk(pm_);
            pending_.emplace_back(std::move(data), binary);
            post = !flush_posted_;
            flush_posted_ = true;
        }
        if (post) {  // one post per burst, not per message
            asio::post(srv_.ioc, [self = this->shared_from_this()] {
                {
                    std::lock_guard lk(self->pm_);
                    for (auto& d : self->pending_) {
                        self->q_.push_back(std::move(d));
                    }
                    self->pending_.clear();
                    self->flush_posted_ = false;
                }
                if (!self->writing_) {
                    self->write_next();
                }
            });
        }
        return true;
    }

    void close(int code, const std::string& reason) override {
        closed_ = true;
        asio::post(srv_.ioc, [self = this->shared_from_this(), code, reason] {
            self->close_code_ = code;
            self->close_reason_ = reason;
            self->closing_ = true;
            if (!self->writing_) {
                self->write_next();
            }
        });
    }

    std::size_t queued_bytes() const override { return queued_; }
    bool websocket() const override { return true; }

private:
    void read() {
        ws_.async_read(rbuf_, [self = this->shared_from_this()](beast::error_code ec, std::size_t) {
            if (ec) {
                return self->finish();
            }
            std::string msg = beast::buffers_to_string(self->rbuf_.data());
            self->rbuf_.consume(self->rbuf_.size());
            if (self->h_->message) {
                self->h_->message(msg, !self->ws_.got_text());
            }
            self->read();
        });
    }

    void write_next() {
        if (done_) {
            return;
        }
        if (q_.empty()) {
            writing_ = false;
            if (closing_ && !close_sent_) {
                close_sent_ = true;
                writing_ = true;
                ws_.async_close(websocket::close_reason(static_cast<websocket::close_code>(close_code_), close_reason_),
                                [self = this->shared_from_this()](beast::error_code) { self->finish(); });
            }
            return;
        }
        writing_ = true;
        ws_.text(!q_.front().second);
        ws_.async_write(asio::buffer(*q_.front().first), [self = this->shared_from_this()](beast::error_code ec, std::size_t) {
            self->queued_ -= self->q_.front().first->size();
            self->q_.pop_front();
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
        beast::get_lowest_layer(ws_).socket().shutdown(tcp::socket::shutdown_both, ec);
        beast::get_lowest_layer(ws_).close();
        if (h_->closed) {
            h_->closed();
        }
    }

    http_server::impl& srv_;
    websocket::stream<Stream> ws_;
    std::shared_ptr<live_handlers> h_;
    beast::flat_buffer rbuf_;
    std::deque<std::pair<std::shared_ptr<const std::string>, bool>> q_;  // loop thread only
    std::mutex pm_;
    std::vector<std::pair<std::shared_ptr<const std::string>, bool>> pending_;  // guarded by pm_
    bool flush_posted_ = false;                                                 // guarded by pm_
    std::atomic<std::size_t> queued_{0};
    std::atomic<bool> closed_{false};
    bool writing_ = false, closing_ = false, close_sent_ = false, done_ = false;
    int close_code_ = 1000;
    std::string close_reason_;
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
            std::make_shared<ws_conn<Stream>>(srv_, std::move(stream_), std::move(live))->start(upgrade_, id);
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
