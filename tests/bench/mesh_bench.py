#!/usr/bin/python3
"""Mesh failure detection and idle cost, with real evmesh-node processes (issue 3).

    mesh_bench.py [--tries 10] [--idle-nodes 32] [--idle-seconds 10]

1. SIGKILL: time from kill -9 of a peer until the other node's /peers no longer lists it.
2. Cut link (network namespaces made here; skipped without them): time from `ip link set down`
   of the peer's cable until it is dropped, with default settings and with a 0.5 s setting, and
   under load (a publisher streaming across the link) to check for false expiries.
3. Idle cost: CPU% and RSS of each node of an N-node mesh on this host, idle.
"""
import argparse
import json
import os
import random
import signal
import socket
import statistics
import subprocess
import sys
import time
import urllib.request

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "integration"))
from evmesh_testlib import NODE, free_port, read_line  # noqa: E402

procs = []


def start(args, ns=None):
    cmd = (["ip", "netns", "exec", ns] if ns else []) + [NODE] + args
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
    procs.append(p)
    line = read_line(p, 10)
    if not line.startswith(b"READY "):
        raise SystemExit(f"node did not start: {line!r}")
    return p, json.loads(line[6:])


def peers_http(addr):
    with urllib.request.urlopen(f"http://{addr}/peers", timeout=2) as r:
        return json.loads(r.read())


def stop_all():
    for p in procs:
        if p.poll() is None:
            p.kill()
        p.wait()
        if p.stdout:
            p.stdout.close()
    procs.clear()


def sigkill_detection(tries):
    times = []
    for t in range(tries):
        mesh, port = f"kill-{os.getpid()}-{t}", free_port(socket.SOCK_DGRAM)
        common = ["--mesh", mesh, "--beacon-port", str(port), "--pub-endpoint", "tcp://127.0.0.1:*",
                  "--sub-endpoint", "tcp://127.0.0.1:*", "--log-level", "warn"]
        _, a = start(["--name", "watcher", "--http", "127.0.0.1:0"] + common)
        victim, _ = start(["--name", "victim"] + common)
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline and not any(p["state"] == "connected" for p in peers_http(a["http"])):
            time.sleep(0.005)
        t0 = time.monotonic()
        victim.send_signal(signal.SIGKILL)
        while peers_http(a["http"]) and time.monotonic() - t0 < 10:
            time.sleep(0.002)
        times.append((time.monotonic() - t0) * 1000)
        stop_all()
    return times


class Netns:
    def __init__(self):
        tag = f"{os.getpid() % 10000}{random.randrange(100)}"
        self.br, self.hosts = f"evb{tag}br", [f"evb{tag}h0", f"evb{tag}h1"]
        self.subnet = f"10.{random.randrange(100, 200)}.{random.randrange(1, 250)}"
        self.made = []

    def ip(self, *a, ns=None):
        subprocess.run((["ip", "netns", "exec", ns] if ns else []) + ["ip", *a], check=True,
                       capture_output=True, timeout=10)

    def __enter__(self):
        for ns in [self.br] + self.hosts:
            self.ip("netns", "add", ns)
            self.made.append(ns)
            self.ip("link", "set", "lo", "up", ns=ns)
        self.ip("link", "add", "br0", "type", "bridge", ns=self.br)
        self.ip("link", "set", "br0", "up", ns=self.br)
        for i, ns in enumerate(self.hosts):
            self.ip("link", "add", "eth0", "netns", ns, "type", "veth", "peer", "name", f"v{i}", "netns", self.br)
            self.ip("addr", "add", f"{self.subnet}.{i + 1}/24", "broadcast", f"{self.subnet}.255", "dev", "eth0", ns=ns)
            self.ip("link", "set", "eth0", "up", ns=ns)
            self.ip("link", "set", f"v{i}", "master", "br0", ns=self.br)
            self.ip("link", "set", f"v{i}", "up", ns=self.br)
        return self

    def __exit__(self, *exc):
        try:
            stop_all()
        finally:
            self.cleanup()

    def cleanup(self):
        for ns in self.made:
            subprocess.run(["ip", "netns", "del", ns], capture_output=True)


def peers_in(ns):
    r = subprocess.run(["ip", "netns", "exec", ns, "curl", "-s", "--max-time", "1",
                        "http://127.0.0.1:18081/peers"], capture_output=True, timeout=5)
    try:
        return json.loads(r.stdout or b"[]")
    except ValueError:
        return []


def cut_link_detection(tries, extra, load):
    times, false_expiries = [], 0
    with Netns() as net:
        for t in range(tries):
            nodes = []
            for i, ns in enumerate(net.hosts):
                addr = f"{net.subnet}.{i + 1}"
                args = ["--name", f"h{i}", "--mesh", f"cut-{os.getpid()}-{t}", "--scope", "lan",
                        "--broadcast-address", f"{net.subnet}.255", "--interface-address", addr,
                        "--mesh-bind", addr, "--pub-endpoint", "tcp://127.0.0.1:*",
                        "--sub-endpoint", "tcp://127.0.0.1:*", "--log-level", "warn"] + extra
                if i == 0:
                    args += ["--http", "127.0.0.1:18081"]
                nodes.append(start(args, ns=net.hosts[i]))
            deadline = time.monotonic() + 5
            while time.monotonic() < deadline and not any(p["state"] == "connected" for p in peers_in(net.hosts[0])):
                time.sleep(0.01)
            loader = None
            if load:  # stream events from h1 to a subscriber on h0 across the link
                sub = subprocess.Popen(["ip", "netns", "exec", net.hosts[0], "/usr/bin/python3", "-c",
                                        "import zmq,sys;c=zmq.Context();s=c.socket(zmq.SUB);s.setsockopt(zmq.SUBSCRIBE,b'');"
                                        f"s.connect('{nodes[0][1]['sub'][0]}');\nwhile True: s.recv_multipart()"],
                                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
                procs.append(sub)
                loader = subprocess.Popen(["ip", "netns", "exec", net.hosts[1], "/usr/bin/python3", "-c",
                                           "import zmq,msgpack,time;c=zmq.Context();s=c.socket(zmq.PUB);"
                                           f"s.connect('{nodes[1][1]['pub'][0]}');time.sleep(0.3);"
                                           "b=msgpack.packb([1,None,None,None,None,None,None,b'x'*512],use_bin_type=True)\n"
                                           "while True: s.send_multipart([b'load.x',b])"],
                                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
                procs.append(loader)
                # a loaded link must not flap: watch it for 3 s
                t_watch = time.monotonic()
                while time.monotonic() - t_watch < 3:
                    if not peers_in(net.hosts[0]):
                        false_expiries += 1
                        break
                    time.sleep(0.05)
            t0 = time.monotonic()
            net.ip("link", "set", "v1", "down", ns=net.br)
            while peers_in(net.hosts[0]) and time.monotonic() - t0 < 10:
                time.sleep(0.005)
            times.append((time.monotonic() - t0) * 1000)
            net.ip("link", "set", "v1", "up", ns=net.br)
            stop_all()
    return times, false_expiries


def idle_cost(n, seconds, extra=(), watch=False):
    mesh, port = f"idle-{os.getpid()}", free_port(socket.SOCK_DGRAM)
    pids = []
    for i in range(n):
        p, _ = start(["--name", f"idle{i}", "--mesh", mesh, "--beacon-port", str(port),
                      "--pub-endpoint", "tcp://127.0.0.1:*", "--sub-endpoint", "tcp://127.0.0.1:*",
                      "--log-level", "warn", *extra])
        pids.append(p.pid)
    time.sleep(3)  # let the mesh form
    if watch:  # a mesh-inspector subscribed to every node's stats for the whole measurement
        inspector = os.path.join(os.path.dirname(NODE), "..", "tools", "mesh-inspector")
        w = subprocess.Popen([inspector, "top", "--duration", str(seconds + 5), "--mesh", mesh,
                              "--beacon-port", str(port)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        procs.append(w)
        time.sleep(2)

    def cpu_ticks(pid):
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return int(fields[11]) + int(fields[12])

    t0 = [cpu_ticks(p) for p in pids]
    time.sleep(seconds)
    t1 = [cpu_ticks(p) for p in pids]
    hz = os.sysconf("SC_CLK_TCK")
    cpu = [(b - a) / hz / seconds * 100 for a, b in zip(t0, t1)]
    rss = []
    for p in pids:
        with open(f"/proc/{p}/status") as f:
            rss.append(next(int(l.split()[1]) for l in f if l.startswith("VmRSS")) / 1024)
    stop_all()
    return cpu, rss


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--tries", type=int, default=10)
    ap.add_argument("--idle-nodes", type=int, default=32)
    ap.add_argument("--idle-seconds", type=float, default=10)
    ap.add_argument("--idle-only", action="store_true", help="only the idle-cost measurement")
    ap.add_argument("--node-args", default="", help="extra evmesh-node flags for the idle mesh")
    ap.add_argument("--watch", action="store_true", help="a mesh-inspector top watches the idle mesh")
    a = ap.parse_args()
    try:
        if a.idle_only:
            cpu, rss = idle_cost(a.idle_nodes, a.idle_seconds, a.node_args.split(), a.watch)
            print(f"idle {a.idle_nodes} nodes {a.node_args!r}{' watched' if a.watch else ''}: CPU median {statistics.median(cpu):.2f}% "
                  f"max {max(cpu):.2f}%, RSS median {statistics.median(rss):.1f} MiB")
            return
        k = sigkill_detection(a.tries)
        print(f"SIGKILL of a peer -> dropped: median {statistics.median(k):.0f} ms, max {max(k):.0f} ms "
              f"over {a.tries} tries (target: median <= 250 ms)")
        try:
            d, _ = cut_link_detection(a.tries, [], False)
            print(f"cut link, defaults (800 ms x 3 beacons, heartbeat 500/1000 ms): median {statistics.median(d):.0f} ms, "
                  f"max {max(d):.0f} ms (target <= 2000 ms)")
            fast = ["--beacon-interval-ms", "100", "--missed-beacons", "5", "--heartbeat-ms", "100",
                    "--heartbeat-timeout-ms", "500"]
            f, fe = cut_link_detection(a.tries, fast, True)
            print(f"cut link, 0.5 s setting (100 ms x 5, heartbeat 100/500 ms), link under load: median {statistics.median(f):.0f} ms, "
                  f"max {max(f):.0f} ms, false expiries under load: {fe}")
        except subprocess.CalledProcessError as e:
            print(f"cut link: skipped (network namespaces unavailable: {e.stderr.decode().strip()})")
        cpu, rss = idle_cost(a.idle_nodes, a.idle_seconds)
        print(f"idle mesh of {a.idle_nodes} nodes on one host: CPU per node median {statistics.median(cpu):.2f}% "
              f"max {max(cpu):.2f}%; RSS per node median {statistics.median(rss):.1f} MiB max {max(rss):.1f} MiB "
              f"(target < 1% and < 16 MiB)")
    finally:
        stop_all()


if __name__ == "__main__":
    main()
