// A sidecar client in C++ that links no evmesh code: only cppzmq and msgpack-cxx, written from
// docs/PROTOCOL.md. It publishes to or subscribes on an evmesh-node's local endpoints.
//
//   sidecar_client pub ENDPOINT TOPIC COUNT [PAYLOAD]   minimal events (the node completes them)
//   sidecar_client sub ENDPOINT PATTERN COUNT [SECONDS] prints one JSON line per event
#include <chrono>
#include <cstdio>
#include <cstring>
#include <iostream>
#include <string>
#include <thread>
#include <vector>

#include <msgpack.hpp>
#include <zmq.hpp>
#include <zmq_addon.hpp>

namespace {

// A dot-separated pattern with `*` (one segment) and `>` (the rest), PROTOCOL.md section 2.
bool matches(const std::string& pattern, const std::string& topic) {
    if (topic.rfind("_evmesh.", 0) == 0 && pattern.rfind("_evmesh.", 0) != 0) {
        return false;  // reserved topics (node stats, ping) only match `_evmesh...` patterns
    }
    std::size_t p = 0, t = 0;
    while (p <= pattern.size()) {
        const auto pe = std::min(pattern.find('.', p), pattern.size());
        const auto seg = pattern.substr(p, pe - p);
        if (seg == ">") {
            return t < topic.size();
        }
        if (t > topic.size()) {
            return false;
        }
        const auto te = std::min(topic.find('.', t), topic.size());
        if (te == t || (seg != "*" && seg != topic.substr(t, te - t))) {
            return false;
        }
        p = pe + 1;
        t = te + 1;
        if (p > pattern.size()) {
            return t > topic.size();
        }
    }
    return false;
}

std::string literal_prefix(const std::string& pattern) {
    std::string out;
    std::size_t p = 0;
    while (p < pattern.size()) {
        const auto pe = std::min(pattern.find('.', p), pattern.size());
        const auto seg = pattern.substr(p, pe - p);
        if (seg == "*" || seg == ">") {
            break;
        }
        out += seg;
        if (pe < pattern.size()) {
            out += '.';
        }
        p = pe + 1;
    }
    return out;
}

std::string hex(const std::string& s) {
    static const char* d = "0123456789abcdef";
    std::string out;
    for (unsigned char c : s) {
        out += d[c >> 4];
        out += d[c & 15];
    }
    return out;
}

std::string json_escape(const std::string& s) {
    std::string out;
    for (unsigned char c : s) {
        if (c == '"' || c == '\\') {
            out += '\\';
            out += static_cast<char>(c);
        } else if (c < 0x20) {
            char buf[8];
            std::snprintf(buf, sizeof(buf), "\\u%04x", c);
            out += buf;
        } else {
            out += static_cast<char>(c);
        }
    }
    return out;
}

int publish(const std::string& endpoint, const std::string& topic, int count, const std::string& payload) {
    zmq::context_t ctx;
    zmq::socket_t pub(ctx, zmq::socket_type::pub);
    pub.set(zmq::sockopt::linger, 2000);
    pub.connect(endpoint);
    std::this_thread::sleep_for(std::chrono::milliseconds(300));  // let subscriptions arrive
    for (int i = 0; i < count; ++i) {
        // minimal event: version 1, id/source/time/seq nil (the node fills them), payload bin
        msgpack::sbuffer body;
        msgpack::packer<msgpack::sbuffer> pk(body);
        pk.pack_array(8);
        pk.pack_uint8(1);
        for (int k = 0; k < 4; ++k) {
            pk.pack_nil();
        }
        pk.pack(std::string("text/plain"));
        pk.pack_map(1);
        pk.pack(std::string("client"));
        pk.pack(std::string("cpp"));
        const std::string p = payload + " #" + std::to_string(i);
        pk.pack_bin(static_cast<std::uint32_t>(p.size()));
        pk.pack_bin_body(p.data(), static_cast<std::uint32_t>(p.size()));
        pub.send(zmq::buffer(topic), zmq::send_flags::sndmore);
        pub.send(zmq::buffer(body.data(), body.size()), zmq::send_flags::none);
    }
    std::fprintf(stderr, "published %d events on %s\n", count, topic.c_str());
    return 0;
}

int subscribe(const std::string& endpoint, const std::string& pattern, int count, int seconds) {
    zmq::context_t ctx;
    zmq::socket_t sub(ctx, zmq::socket_type::sub);
    sub.set(zmq::sockopt::subscribe, literal_prefix(pattern));
    sub.set(zmq::sockopt::rcvtimeo, 200);
    sub.connect(endpoint);
    const auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(seconds);
    int got = 0;
    while (got < count && std::chrono::steady_clock::now() < deadline) {
        std::vector<zmq::message_t> frames;
        if (!zmq::recv_multipart(sub, std::back_inserter(frames))) {
            continue;
        }
        if (frames.size() != 2) {
            continue;
        }
        const std::string topic = frames[0].to_string();
        if (!matches(pattern, topic)) {
            continue;
        }
        try {
            auto oh = msgpack::unpack(static_cast<const char*>(frames[1].data()), frames[1].size());
            const auto& a = oh.get().via.array;
            if (oh.get().type != msgpack::type::ARRAY || a.size < 8 || a.ptr[0].as<int>() != 1) {
                continue;
            }
            const auto id = std::string(a.ptr[1].via.bin.ptr, a.ptr[1].via.bin.size);
            const auto payload = std::string(a.ptr[7].via.bin.ptr, a.ptr[7].via.bin.size);
            std::printf("{\"topic\":\"%s\",\"id\":\"%s\",\"source\":\"%s\",\"time\":%lld,\"seq\":%llu,"
                        "\"payload\":\"%s\"}\n",
                        json_escape(topic).c_str(), hex(id).c_str(),
                        json_escape(a.ptr[2].as<std::string>()).c_str(),
                        static_cast<long long>(a.ptr[3].as<std::int64_t>()),
                        static_cast<unsigned long long>(a.ptr[4].as<std::uint64_t>()),
                        json_escape(payload).c_str());
            std::fflush(stdout);
            ++got;
        } catch (const std::exception& e) {
            std::fprintf(stderr, "undecodable event: %s\n", e.what());
        }
    }
    std::fprintf(stderr, "received %d events\n", got);
    return got >= count ? 0 : 1;
}

}  // namespace

int main(int argc, char** argv) {
    const std::vector<std::string> args(argv + 1, argv + argc);
    if (args.size() >= 4 && args[0] == "pub") {
        return publish(args[1], args[2], std::stoi(args[3]), args.size() > 4 ? args[4] : "hello from C++");
    }
    if (args.size() >= 4 && args[0] == "sub") {
        return subscribe(args[1], args[2], std::stoi(args[3]), args.size() > 4 ? std::stoi(args[4]) : 10);
    }
    std::cerr << "usage: sidecar_client pub ENDPOINT TOPIC COUNT [PAYLOAD]\n"
                 "       sidecar_client sub ENDPOINT PATTERN COUNT [SECONDS]\n";
    return 2;
}
