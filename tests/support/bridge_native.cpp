// The broker's own client at full speed, for tests/bench/bridge_bench.py: what a program that
// talks to the broker directly achieves with the same guarantee the bridge reports (no NATS or
// AMQP command-line publisher is packaged in Debian 12).
//
//   evmesh_bridge_native nats URL SUBJECT COUNT SIZE       core publish, one flush at the end
//   evmesh_bridge_native jetstream URL SUBJECT COUNT SIZE  async JetStream publish, all acks awaited
//   evmesh_bridge_native amqp HOST PORT QUEUE COUNT SIZE    persistent publish with confirms,
//                                                          up to 256 unconfirmed in flight
// Prints {"count": N, "seconds": S, "rate": R} and exits 0 when every message was acknowledged.
#include <amqp.h>
#include <amqp_tcp_socket.h>
#include <nats/nats.h>

#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <string>

namespace {

using clock_type = std::chrono::steady_clock;

[[noreturn]] void die(const std::string& msg) {
    std::fprintf(stderr, "evmesh_bridge_native: %s\n", msg.c_str());
    std::exit(2);
}

void check(natsStatus s, const char* what) {
    if (s != NATS_OK) die(std::string(what) + ": " + natsStatus_GetText(s));
}

int report(long count, clock_type::time_point t0) {
    double secs = std::chrono::duration<double>(clock_type::now() - t0).count();
    std::printf("{\"count\": %ld, \"seconds\": %.4f, \"rate\": %.1f}\n", count, secs, static_cast<double>(count) / secs);
    return 0;
}

int run_nats(const char* url, const char* subject, long count, size_t size, bool jetstream) {
    natsConnection* nc = nullptr;
    check(natsConnection_ConnectTo(&nc, url), "connect");
    std::string data(size, 'x');
    jsCtx* js = nullptr;
    if (jetstream) {
        jsOptions jo;
        jsOptions_Init(&jo);
        jo.PublishAsync.MaxPending = 4096;
        check(natsConnection_JetStream(&js, nc, &jo), "jetstream");
    }
    auto t0 = clock_type::now();
    for (long i = 0; i < count; ++i) {
        if (jetstream)
            check(js_PublishAsync(js, subject, data.data(), static_cast<int>(data.size()), nullptr), "publish");
        else
            check(natsConnection_Publish(nc, subject, data.data(), static_cast<int>(data.size())), "publish");
    }
    if (jetstream) {
        jsPubOptions po;
        jsPubOptions_Init(&po);
        po.MaxWait = 60000;
        check(js_PublishAsyncComplete(js, &po), "acks");
    } else {
        check(natsConnection_FlushTimeout(nc, 60000), "flush");
    }
    report(count, t0);
    if (js) jsCtx_Destroy(js);
    natsConnection_Destroy(nc);
    return 0;
}

int run_amqp(const char* host, int port, const char* queue, long count, size_t size) {
    amqp_connection_state_t conn = amqp_new_connection();
    amqp_socket_t* sock = amqp_tcp_socket_new(conn);
    if (amqp_socket_open(sock, host, port) != AMQP_STATUS_OK) die("connect failed");
    if (amqp_login(conn, "/", 0, 131072, 0, AMQP_SASL_METHOD_PLAIN, "guest", "guest").reply_type != AMQP_RESPONSE_NORMAL)
        die("login failed");
    amqp_channel_open(conn, 1);
    if (amqp_get_rpc_reply(conn).reply_type != AMQP_RESPONSE_NORMAL) die("channel.open failed");
    amqp_confirm_select(conn, 1);
    if (amqp_get_rpc_reply(conn).reply_type != AMQP_RESPONSE_NORMAL) die("confirm.select failed");
    std::string data(size, 'x');
    amqp_basic_properties_t props{};
    props._flags = AMQP_BASIC_DELIVERY_MODE_FLAG;
    props.delivery_mode = 2;
    uint64_t sent = 0, confirmed = 0;
    auto wait_one = [&] {
        amqp_frame_t frame;
        if (amqp_simple_wait_frame(conn, &frame) != AMQP_STATUS_OK) die("connection lost");
        if (frame.frame_type != AMQP_FRAME_METHOD) return;
        if (frame.payload.method.id == AMQP_BASIC_ACK_METHOD) {
            auto* m = static_cast<amqp_basic_ack_t*>(frame.payload.method.decoded);
            confirmed = m->multiple ? m->delivery_tag : confirmed + 1;
        } else if (frame.payload.method.id == AMQP_BASIC_NACK_METHOD) {
            die("nack");
        }
    };
    auto t0 = clock_type::now();
    while (sent < static_cast<uint64_t>(count)) {
        if (amqp_basic_publish(conn, 1, amqp_empty_bytes, amqp_cstring_bytes(queue), 0, 0, &props,
                               {data.size(), data.data()}) != AMQP_STATUS_OK)
            die("publish failed");
        ++sent;
        while (sent - confirmed >= 256) wait_one();
    }
    while (confirmed < sent) wait_one();
    report(count, t0);
    amqp_destroy_connection(conn);
    return 0;
}

}  // namespace

int main(int argc, char** argv) {
    std::string mode = argc > 1 ? argv[1] : "";
    if ((mode == "nats" || mode == "jetstream") && argc == 6)
        return run_nats(argv[2], argv[3], std::atol(argv[4]), static_cast<size_t>(std::atol(argv[5])), mode == "jetstream");
    if (mode == "amqp" && argc == 7)
        return run_amqp(argv[2], std::atoi(argv[3]), argv[4], std::atol(argv[5]), static_cast<size_t>(std::atol(argv[6])));
    die("usage: evmesh_bridge_native nats|jetstream URL SUBJECT COUNT SIZE | amqp HOST PORT QUEUE COUNT SIZE");
}
