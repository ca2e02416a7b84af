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

// An IPv4 or IPv6 socket address, parsed from and printed as "a.b.c.d:port" or "[v6]:port".
struct net_addr {
    sockaddr_storage ss{};
    socklen_t len = 0;

    int family() const { return ss.ss_family; }
    const sockaddr* sa() const { return reinterpret_cast<const sockaddr*>(&ss); }
    sockaddr* sa() { return reinterpret_cast<sockaddr*>(&ss); }

    static bool parse(const std::string& text, net_addr& out) {
        out = net_addr{};
        const auto colon = text.rfind(':');
        if (colon == std::string::npos || colon + 1 >= text.size()) {
            return false;
        }
        int port = 0;
        for (std::size_t i = colon + 1; i < text.size(); ++i) {
            if (text[i] < '0' || text[i] > '9' || port > 65535) {
                return false;
            }
            port = port * 10 + (text[i] - '0');
        }
        if (port <= 0 || port > 65535) {
            return false;
        }
        if (text[0] == '[') {
            if (colon < 2 || text[colon - 1] != ']') {
                return false;
            }
            const std::string host = text.substr(1, colon - 2);
            auto* a6 = reinterpret_cast<sockaddr_in6*>(&out.ss);
            a6->sin6_family = AF_INET6;
            a6->sin6_port = htons(static_cast<std::uint16_t>(port));
            if (inet_pton(AF_INET6, host.c_str(), &a6->sin6_addr) != 1) {
                return false;
            }
            out.len = sizeof(sockaddr_in6);
            return true;
        }
        auto* a4 = reinterpret_cast<sockaddr_in*>(&out.ss);
        a4->sin_family = AF_INET;
        a4->sin_port = htons(static_cast<std::uint16_t>(port));
        if (inet_pton(AF_INET, text.substr(0, colon).c_str(), &a4->sin_addr) != 1) {
            return false;
        }
        out.len = sizeof(sockaddr_in);
        return true;
    }

    // The address alone: "a.b.c.d" or the bare IPv6 text.
    std::string host() const {
        std::array<char, INET6_ADDRSTRLEN> buf{};
        if (family() == AF_INET6) {
            inet_ntop(AF_INET6, &reinterpret_cast<const sockaddr_in6*>(&ss)->sin6_addr, buf.data(), buf.size());
        } else {
            inet_ntop(AF_INET, &reinterpret_cast<const sockaddr_in*>(&ss)->sin_addr, buf.data(), buf.size());
        }
        return buf.data();
    }

    std::uint16_t port() const {
        return ntohs(family() == AF_INET6 ? reinterpret_cast<const sockaddr_in6*>(&ss)->sin6_port
                                          : reinterpret_cast<const sockaddr_in*>(&ss)->sin_port);
    }

    std::string text() const {
        return family() == AF_INET6 ? "[" + host() + "]:" + std::to_string(port())
                                    : host() + ":" + std::to_string(port());
    }

    bool loopback() const {
        if (family() == AF_INET6) {
            const auto& a = reinterpret_cast<const sockaddr_in6*>(&ss)->sin6_addr;
            return IN6_IS_ADDR_LOOPBACK(&a);
        }
        return (ntohl(reinterpret_cast<const sockaddr_in*>(&ss)->sin_addr.s_addr) >> 24) == 127;
    }
};

// A host for a tcp:// endpoint: IPv6 literals go in brackets.
inline std::string endpoint_host(const std::string& host) {
    return host.find(':') != std::string::npos && host.front() != '[' ? "[" + host + "]" : host;
}

}  // namespace evmesh::detail
