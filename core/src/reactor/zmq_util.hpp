// Small helpers over libzmq and BSD sockets shared by the node's parts.
#pragma once

#include <arpa/inet.h>
#include <netinet/in.h>
#include <zmq.h>

#include <array>
#include <cstring>
#include <string>
#include <string_view>

namespace evmesh::detail {

inline bool more(void* s) {
    int m = 0;
    size_t len = sizeof(m);
    zmq_getsockopt(s, ZMQ_RCVMORE, &m, &len);
    return m != 0;
}

inline void drain_frames(void* s, zmq_msg_t& scratch) {
    while (more(s)) {
        zmq_msg_recv(&scratch, s, 0);
    }
}

inline std::string_view view(zmq_msg_t& m) {
    return {static_cast<const char*>(zmq_msg_data(&m)), zmq_msg_size(&m)};
}

inline int set_int(void* s, int opt, int v) {
    return zmq_setsockopt(s, opt, &v, sizeof(v));
}

inline std::string last_endpoint(void* s) {
    std::array<char, 256> buf{};
    size_t len = buf.size();
    zmq_getsockopt(s, ZMQ_LAST_ENDPOINT, buf.data(), &len);
    return std::string(buf.data());
}

inline std::string addr_text(const sockaddr_in& a) {
    std::array<char, INET_ADDRSTRLEN> buf{};
    inet_ntop(AF_INET, &a.sin_addr, buf.data(), buf.size());
    return std::string(buf.data()) + ":" + std::to_string(ntohs(a.sin_port));
}

inline bool parse_addr(const std::string& text, sockaddr_in& out) {
    const auto colon = text.rfind(':');
    if (colon == std::string::npos) {
        return false;
    }
    std::memset(&out, 0, sizeof(out));
    out.sin_family = AF_INET;
    const auto host = text.substr(0, colon);
    if (inet_pton(AF_INET, host.c_str(), &out.sin_addr) != 1) {
        return false;
    }
    int port = 0;
    try {
        port = std::stoi(text.substr(colon + 1));
    } catch (...) {
        return false;
    }
    if (port <= 0 || port > 65535) {
        return false;
    }
    out.sin_port = htons(static_cast<std::uint16_t>(port));
    return true;
}



}  // namespace evmesh::detail
