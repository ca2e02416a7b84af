// Link faults for tests: aborts this process's TCP connections to or from a port, as a network
// blip or `ss -K` would (the peer sees a reset, libzmq sees the connection close and reconnects).
#pragma once

#include <arpa/inet.h>
#include <dirent.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cstdint>
#include <cstdlib>
#include <string>

namespace evmesh::test {

// Port of a "tcp://host:port" endpoint.
inline std::uint16_t endpoint_port(const std::string& ep) {
    return static_cast<std::uint16_t>(std::atoi(ep.substr(ep.rfind(':') + 1).c_str()));
}

// Resets every connected TCP socket of this process whose local or remote port is `port`
// (SO_LINGER 0 + shutdown: an RST, at once). Returns how many were cut.
inline int cut_tcp_links(std::uint16_t port) {
    int cut = 0;
    DIR* d = opendir("/proc/self/fd");
    if (d == nullptr) {
        return 0;
    }
    while (dirent* e = readdir(d)) {
        const int fd = std::atoi(e->d_name);
        if (fd <= 2 || fd == dirfd(d)) {
            continue;
        }
        struct stat st {};
        if (fstat(fd, &st) != 0 || !S_ISSOCK(st.st_mode)) {
            continue;
        }
        int type = 0;
        socklen_t tl = sizeof(type);
        if (getsockopt(fd, SOL_SOCKET, SO_TYPE, &type, &tl) != 0 || type != SOCK_STREAM) {
            continue;
        }
        sockaddr_in local{}, remote{};
        socklen_t ll = sizeof(local), rl = sizeof(remote);
        if (getsockname(fd, reinterpret_cast<sockaddr*>(&local), &ll) != 0 || local.sin_family != AF_INET
            || getpeername(fd, reinterpret_cast<sockaddr*>(&remote), &rl) != 0) {
            continue;  // a listener or not connected
        }
        if (ntohs(local.sin_port) != port && ntohs(remote.sin_port) != port) {
            continue;
        }
        linger lg{1, 0};
        setsockopt(fd, SOL_SOCKET, SO_LINGER, &lg, sizeof(lg));
        shutdown(fd, SHUT_RDWR);
        ++cut;
    }
    closedir(d);
    return cut;
}

}  // namespace evmesh::test
