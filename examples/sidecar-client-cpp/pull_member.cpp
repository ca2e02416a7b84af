// A queue-group member in C++ that links no evmesh code: only cppzmq and msgpack-cxx, written from
// docs/PROTOCOL.md section 13. It fetches batches from a durable consumer of a history through an
// evmesh-node's local endpoints, prints one JSON line per message and acknowledges each batch.
//
//   pull_member PUB_ENDPOINT SUB_ENDPOINT HISTORY CONSUMER [COUNT] [IDLE_SECONDS]
//
// Stops after COUNT messages (0 = no limit) or IDLE_SECONDS (default 5) without one.
#include <chrono>
#include <cstdio>
#include <random>
#include <string>
#include <thread>
#include <vector>

#include <msgpack.hpp>
#include <zmq.hpp>
#include <zmq_addon.hpp>

namespace {

constexpr std::string_view frame_type = "application/vnd.evmesh.frame";
constexpr std::string_view end_type = "application/vnd.evmesh.fetch-end";

// A request (13.1): a minimal event (version 1, id/source/time/seq nil) whose payload is a map.
void request(zmq::socket_t& pub, const msgpack::sbuffer& map) {
    msgpack::sbuffer body;
    msgpack::packer<msgpack::sbuffer> pk(body);
    pk.pack_array(8);
    pk.pack_uint8(1);
    for (int k = 0; k < 4; ++k) {
        pk.pack_nil();
    }
    pk.pack(std::string("application/msgpack"));
    pk.pack_map(0);
    pk.pack_bin(static_cast<std::uint32_t>(map.size()));
    pk.pack_bin_body(map.data(), static_cast<std::uint32_t>(map.size()));
    pub.send(zmq::str_buffer("_evmesh.consumer.all"), zmq::send_flags::sndmore);
    pub.send(zmq::buffer(body.data(), body.size()), zmq::send_flags::none);
}

std::string str_of(const msgpack::object& o) {
    if (o.type == msgpack::type::STR) {
        return {o.via.str.ptr, o.via.str.size};
    }
    if (o.type == msgpack::type::BIN) {
        return {o.via.bin.ptr, o.via.bin.size};
    }
    return {};
}

// The fields of an event (section 3) that a member needs: content type, headers, payload.
struct envelope {
    std::string content_type, payload, source;
    std::uint64_t seq = 0;
    std::vector<std::pair<std::string, std::string>> headers;
    std::string header(const std::string& k) const {
        for (const auto& [hk, hv] : headers) {
            if (hk == k) {
                return hv;
            }
        }
        return {};
    }
};

bool decode(const char* data, std::size_t size, envelope& e) {
    try {
        auto oh = msgpack::unpack(data, size);
        const auto& a = oh.get();
        if (a.type != msgpack::type::ARRAY || a.via.array.size < 8) {
            return false;
        }
        const auto* f = a.via.array.ptr;
        e.source = str_of(f[2]);
        e.seq = f[4].type == msgpack::type::POSITIVE_INTEGER ? f[4].via.u64 : 0;
        e.content_type = str_of(f[5]);
        e.headers.clear();
        if (f[6].type == msgpack::type::MAP) {
            for (const auto& kv : f[6].via.map) {
                e.headers.emplace_back(str_of(kv.key), str_of(kv.val));
            }
        }
        e.payload = str_of(f[7]);
        return true;
    } catch (const std::exception&) {
        return false;
    }
}

}  // namespace

int main(int argc, char** argv) {
    if (argc < 5) {
        std::fprintf(stderr, "usage: pull_member PUB_ENDPOINT SUB_ENDPOINT HISTORY CONSUMER [COUNT] [IDLE_SECONDS]\n");
        return 2;
    }
    const std::string history = argv[3], consumer = argv[4];
    const long count = argc > 5 ? std::stol(argv[5]) : 0;
    const int idle_s = argc > 6 ? std::stoi(argv[6]) : 5;
    std::mt19937_64 rng(std::random_device{}());
    const std::string reply = "_evmesh.pull.cpp" + std::to_string(rng());

    zmq::context_t ctx;
    zmq::socket_t sub(ctx, zmq::socket_type::sub);
    sub.set(zmq::sockopt::subscribe, reply);
    sub.set(zmq::sockopt::rcvtimeo, 100);
    sub.connect(argv[2]);
    zmq::socket_t pub(ctx, zmq::socket_type::pub);
    pub.set(zmq::sockopt::linger, 2000);
    pub.connect(argv[1]);
    std::this_thread::sleep_for(std::chrono::milliseconds(300));  // the reply subscription arrives

    long processed = 0;
    auto last = std::chrono::steady_clock::now();
    while ((count == 0 || processed < count) && std::chrono::steady_clock::now() - last < std::chrono::seconds(idle_s)) {
        msgpack::sbuffer fetch;
        msgpack::packer<msgpack::sbuffer> fk(fetch);
        fk.pack_map(6);
        fk.pack(std::string("op"));
        fk.pack(std::string("fetch"));
        fk.pack(std::string("history"));
        fk.pack(history);
        fk.pack(std::string("consumer"));
        fk.pack(consumer);
        fk.pack(std::string("reply"));
        fk.pack(reply);
        fk.pack(std::string("batch"));
        fk.pack(100);
        fk.pack(std::string("wait_ms"));
        fk.pack(1000);
        request(pub, fetch);
        std::vector<std::uint64_t> acks;
        const auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(4);  // no end: ask again
        while (std::chrono::steady_clock::now() < deadline) {
            std::vector<zmq::message_t> frames;
            if (!zmq::recv_multipart(sub, std::back_inserter(frames)) || frames.size() != 2) {
                continue;
            }
            envelope e;
            if (!decode(static_cast<const char*>(frames[1].data()), frames[1].size(), e)) {
                continue;
            }
            if (e.content_type == end_type) {
                break;
            }
            if (e.content_type != frame_type) {
                continue;
            }
            // the payload is the stored event: topic 0x00 body
            const auto z = e.payload.find('\0');
            envelope inner;
            if (z == std::string::npos || !decode(e.payload.data() + z + 1, e.payload.size() - z - 1, inner)) {
                continue;
            }
            const auto pos = std::stoull(e.header("evmesh-pos"));
            std::printf("{\"pos\": %llu, \"deliveries\": %s, \"topic\": \"%s\", \"seq\": %llu}\n",
                        static_cast<unsigned long long>(pos), e.header("evmesh-deliveries").c_str(),
                        e.payload.substr(0, z).c_str(), static_cast<unsigned long long>(inner.seq));
            acks.push_back(pos);
            ++processed;
            last = std::chrono::steady_clock::now();
        }
        std::fflush(stdout);
        if (!acks.empty()) {
            msgpack::sbuffer ack;
            msgpack::packer<msgpack::sbuffer> ak(ack);
            ak.pack_map(4);
            ak.pack(std::string("op"));
            ak.pack(std::string("ack"));
            ak.pack(std::string("history"));
            ak.pack(history);
            ak.pack(std::string("consumer"));
            ak.pack(consumer);
            ak.pack(std::string("positions"));
            ak.pack(acks);
            request(pub, ack);
        }
    }
    std::fprintf(stderr, "{\"processed\": %ld}\n", processed);
    return 0;
}
