#!/usr/bin/python3
"""Nodes on separate "hosts": network namespaces created by this test, joined by a bridge
(issue 3). LAN-scope broadcast discovery, seeds with broadcast off (plus gossip), a cut link
that expires the peer and reconnects when restored, a 2 s cut with NAK repair on that loses
nothing, and discovery plus delivery over IPv6 only (seeds, gossip, an IPv6 mesh link). Needs root and `ip netns`; skipped with a clear
message where the kernel refuses. Every namespace, link and process is removed in tearDown."""
import json
import os
import random
import subprocess
import time
import unittest

from evmesh_testlib import CPP_CLIENT, NODE, PYTHON, main, read_line, wait_for

# A paced client publisher run inside a namespace: XPUB with NODROP on the node's pub endpoint,
# waits until the node subscribed it, then COUNT events at RATE/s with its own source and seq.
PACED_PUB = r"""
import sys, time, msgpack, zmq
ep, topic, count, rate = sys.argv[1], sys.argv[2].encode(), int(sys.argv[3]), float(sys.argv[4])
ctx = zmq.Context(); s = ctx.socket(zmq.XPUB); s.setsockopt(zmq.XPUB_NODROP, 1); s.connect(ep)
deadline = time.monotonic() + 10
while time.monotonic() < deadline:
    if s.poll(100):
        m = s.recv()
        if m[:1] == b"" and topic.startswith(m[1:]):
            break
t0 = time.monotonic()
for i in range(1, count + 1):
    s.send_multipart([topic, msgpack.packb([1, None, "netns/pub", None, i, None, None, b"x"], use_bin_type=True)])
    delay = t0 + i / rate - time.monotonic()
    if delay > 0:
        time.sleep(delay)
s.close(linger=2000); ctx.term()
"""


def ip(*args, ns=None, check=True):
    cmd = (["ip", "netns", "exec", ns] if ns else []) + ["ip", *args]
    return subprocess.run(cmd, capture_output=True, check=check, timeout=10)


class NetnsCase(unittest.TestCase):
    """Shared by the tests below: nodes started inside namespaces, cleaned up by PID, and the
    namespaces removed, even when a test fails."""
    HTTP = 18080

    def tearDown(self):
        for p in self.procs:
            if p.poll() is None:
                p.kill()
            p.wait(timeout=5)
            if p.stdout:
                p.stdout.close()
        for ns in self.made:
            subprocess.run(["ip", "netns", "del", ns], capture_output=True, timeout=10)
        self.made = []

    def start_in(self, i, args):
        ns = self.hosts[i]
        cmd = ["ip", "netns", "exec", ns, NODE, *args, "--http", f"127.0.0.1:{self.HTTP}"]
        err = open(f"/tmp/netns-h{i}.log", "w") if os.environ.get("EVMESH_NETNS_LOGS") else subprocess.DEVNULL
        p = subprocess.Popen(cmd + (["--log-level", "debug"] if err != subprocess.DEVNULL else []),
                             stdout=subprocess.PIPE, stderr=err)
        self.procs.append(p)
        line = read_line(p, 10)
        self.assertTrue(line.startswith(b"READY "), line)
        return json.loads(line[6:])

    def peers(self, i):
        r = subprocess.run(["ip", "netns", "exec", self.hosts[i], "curl", "-s", "--max-time", "2",
                            f"http://127.0.0.1:{self.HTTP}/peers"], capture_output=True, timeout=10)
        try:
            return json.loads(r.stdout or b"[]")
        except ValueError:
            return []


class NetnsMesh(NetnsCase):
    HOSTS = 3

    def setUp(self):
        tag = f"{os.getpid() % 10000}{random.randrange(100)}"
        self.bridge_ns = f"evm{tag}br"
        self.hosts = [f"evm{tag}h{i}" for i in range(self.HOSTS)]
        self.subnet = f"10.{random.randrange(100, 200)}.{random.randrange(1, 250)}"
        self.procs = []
        self.made = []
        try:
            for ns in [self.bridge_ns] + self.hosts:
                ip("netns", "add", ns)
                self.made.append(ns)
                ip("link", "set", "lo", "up", ns=ns)
            ip("link", "add", "br0", "type", "bridge", ns=self.bridge_ns)
            ip("link", "set", "br0", "up", ns=self.bridge_ns)
            for i, ns in enumerate(self.hosts):
                # veth: eth0 inside the host namespace, vN on the bridge
                ip("link", "add", "eth0", "netns", ns, "type", "veth", "peer", "name", f"v{i}",
                   "netns", self.bridge_ns)
                ip("addr", "add", f"{self.subnet}.{i + 1}/24", "broadcast", f"{self.subnet}.255",
                   "dev", "eth0", ns=ns)
                ip("link", "set", "eth0", "up", ns=ns)
                ip("link", "set", f"v{i}", "master", "br0", ns=self.bridge_ns)
                ip("link", "set", f"v{i}", "up", ns=self.bridge_ns)
        except (subprocess.CalledProcessError, FileNotFoundError) as e:
            self.tearDown()
            err = getattr(e, "stderr", b"") or b""
            self.skipTest(f"network namespaces unavailable here: {err.decode().strip() or e}")
        self.mesh = f"ns-{tag}"
        self.port = 19470

    def addr(self, i):
        return f"{self.subnet}.{i + 1}"

    def start(self, i, *extra):
        return self.start_in(i, ["--name", f"h{i}", "--mesh", self.mesh, "--scope", "lan",
                                 "--broadcast-address", f"{self.subnet}.255",
                                 "--interface-address", self.addr(i), "--mesh-bind", self.addr(i),
                                 "--beacon-port", str(self.port), "--pub-endpoint", "tcp://127.0.0.1:*",
                                 "--sub-endpoint", "tcp://127.0.0.1:*", *extra])

    def connected(self, i):
        return sorted(p["name"] for p in self.peers(i) if p["state"] == "connected")

    def full_mesh(self, timeout=10):
        want = lambda i: sorted(f"h{j}" for j in range(self.HOSTS) if j != i)
        return wait_for(lambda: all(self.connected(i) == want(i) for i in range(self.HOSTS)), timeout, 0.05)

    def test_lan_broadcast_discovery_across_namespaces(self):
        for i in range(self.HOSTS):
            self.start(i)
        self.assertTrue(self.full_mesh(), [self.peers(i) for i in range(self.HOSTS)])
        for p in self.peers(0):  # peers are reached at their own namespace's address
            self.assertTrue(p["endpoint"].startswith(f"tcp://{self.addr(int(p['name'][1:]))}:"), p)

    def test_seeds_and_gossip_without_broadcast(self):
        self.start(0, "--no-broadcast")
        seed = f"{self.addr(0)}:{self.port}"
        self.start(1, "--no-broadcast", "--seed", seed)
        self.start(2, "--no-broadcast", "--seed", seed)
        # h1 and h2 only know h0; they learn each other through h0's gossip
        self.assertTrue(self.full_mesh(), [self.peers(i) for i in range(self.HOSTS)])

    def test_cut_link_expires_peer_and_restore_reconnects(self):
        for i in range(self.HOSTS):
            self.start(i)
        self.assertTrue(self.full_mesh())
        t0 = time.monotonic()
        ip("link", "set", "v2", "down", ns=self.bridge_ns)  # h2's cable is pulled, silently
        self.assertTrue(wait_for(lambda: self.connected(0) == ["h1"] and self.connected(1) == ["h0"], 5, 0.05))
        elapsed = time.monotonic() - t0
        self.assertLess(elapsed, 2.5, "default bound: heartbeat timeout 1.5 s (beacons 3 x 800 ms)")
        ip("link", "set", "v2", "up", ns=self.bridge_ns)
        self.assertTrue(self.full_mesh(), [self.peers(i) for i in range(self.HOSTS)])

    def test_two_second_cut_with_repair_loses_nothing(self):
        infos = [self.start(i, "--repair", "cut.>") for i in range(self.HOSTS)]
        self.assertTrue(self.full_mesh())
        count, rate = 4000, 1000.0
        sub = subprocess.Popen(["ip", "netns", "exec", self.hosts[2], CPP_CLIENT, "sub", infos[2]["sub"][0],
                                "cut.>", str(count), "30"], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
        self.procs.append(sub)
        time.sleep(0.5)  # the subscription reaches h0
        pub = subprocess.Popen(["ip", "netns", "exec", self.hosts[0], PYTHON, "-c", PACED_PUB,
                                infos[0]["pub"][0], "cut.stream", str(count), str(rate)],
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        self.procs.append(pub)
        time.sleep(1.0)
        ip("link", "set", "v2", "down", ns=self.bridge_ns)  # h2's cable is pulled for 2 s
        time.sleep(2.0)
        ip("link", "set", "v2", "up", ns=self.bridge_ns)
        self.assertEqual(pub.wait(30), 0, pub.stderr.read())
        out, _ = sub.communicate(timeout=40)
        seqs = [json.loads(l)["seq"] for l in out.decode().splitlines()]
        self.assertEqual(seqs, list(range(1, count + 1)), f"received {len(seqs)} of {count}")


class NetnsIPv6(NetnsCase):
    """Two namespaces joined by a veth pair with IPv6 addresses only (ULA, inside the test's own
    namespaces): discovery by an IPv6 seed, the reply by unicast, a mesh link over IPv6."""

    def setUp(self):
        tag = f"{os.getpid() % 10000}{random.randrange(100)}"
        self.hosts = [f"evm{tag}v6a", f"evm{tag}v6b"]
        self.prefix = f"fd{random.randrange(16, 255):02x}:{random.randrange(1, 65535):x}::"
        self.procs = []
        self.made = []
        try:
            for ns in self.hosts:
                ip("netns", "add", ns)
                self.made.append(ns)
                ip("link", "set", "lo", "up", ns=ns)
            ip("link", "add", "eth0", "netns", self.hosts[0], "type", "veth", "peer", "name", "eth0",
               "netns", self.hosts[1])
            for i, ns in enumerate(self.hosts):
                ip("-6", "addr", "add", f"{self.addr(i)}/64", "dev", "eth0", "nodad", ns=ns)
                ip("link", "set", "eth0", "up", ns=ns)
        except (subprocess.CalledProcessError, FileNotFoundError) as e:
            self.tearDown()
            err = getattr(e, "stderr", b"") or b""
            self.skipTest(f"IPv6 network namespaces unavailable here: {err.decode().strip() or e}")
        self.mesh = f"v6-{tag}"
        self.port = 19471

    def addr(self, i):
        return f"{self.prefix}{i + 1}"

    def start(self, i, *extra):
        return self.start_in(i, ["--name", f"v{i}", "--mesh", self.mesh, "--scope", "lan", "--no-broadcast",
                                 "--interface-address", self.addr(i), "--mesh-bind", self.addr(i),
                                 "--beacon-port", str(self.port), "--pub-endpoint", "tcp://127.0.0.1:*",
                                 "--sub-endpoint", "tcp://127.0.0.1:*", *extra])

    def test_ipv6_seed_discovery_and_delivery(self):
        a = self.start(0)
        b = self.start(1, "--seed", f"[{self.addr(0)}]:{self.port}")
        self.assertTrue(a["mesh_endpoint"].startswith(f"tcp://[{self.addr(0)}]:"), a)
        connected = lambda i: [p for p in self.peers(i) if p["state"] == "connected"]
        self.assertTrue(wait_for(lambda: len(connected(0)) == 1 and len(connected(1)) == 1, 10, 0.05),
                        [self.peers(0), self.peers(1)])
        self.assertTrue(connected(1)[0]["endpoint"].startswith(f"tcp://[{self.addr(0)}]:"))
        sub = subprocess.Popen(["ip", "netns", "exec", self.hosts[1], CPP_CLIENT, "sub", b["sub"][0],
                                "v6.>", "20", "20"], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
        self.procs.append(sub)
        time.sleep(0.5)
        pub = subprocess.run(["ip", "netns", "exec", self.hosts[0], PYTHON, "-c", PACED_PUB, a["pub"][0],
                              "v6.hello", "20", "200"], capture_output=True, timeout=30)
        self.assertEqual(pub.returncode, 0, pub.stderr)
        out, _ = sub.communicate(timeout=30)
        self.assertEqual(len(out.decode().splitlines()), 20)


if __name__ == "__main__":
    main()
