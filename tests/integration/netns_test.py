#!/usr/bin/python3
"""Nodes on separate "hosts": network namespaces created by this test, joined by a bridge
(issue 3). LAN-scope broadcast discovery, seeds with broadcast off (plus gossip), and a cut link
that expires the peer and reconnects when restored. Needs root and `ip netns`; skipped with a clear
message where the kernel refuses. Every namespace, link and process is removed in tearDown."""
import json
import os
import random
import subprocess
import time
import unittest

from evmesh_testlib import NODE, main, read_line, wait_for


def ip(*args, ns=None, check=True):
    cmd = (["ip", "netns", "exec", ns] if ns else []) + ["ip", *args]
    return subprocess.run(cmd, capture_output=True, check=check, timeout=10)


class NetnsMesh(unittest.TestCase):
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

    def addr(self, i):
        return f"{self.subnet}.{i + 1}"

    def start(self, i, *extra):
        ns = self.hosts[i]
        args = ["ip", "netns", "exec", ns, NODE, "--name", f"h{i}", "--mesh", self.mesh,
                "--scope", "lan", "--broadcast-address", f"{self.subnet}.255",
                "--interface-address", self.addr(i), "--mesh-bind", self.addr(i),
                "--beacon-port", str(self.port), "--pub-endpoint", "tcp://127.0.0.1:*",
                "--sub-endpoint", "tcp://127.0.0.1:*", "--http", "127.0.0.1:18080", *extra]
        p = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
        self.procs.append(p)
        line = read_line(p, 10)
        self.assertTrue(line.startswith(b"READY "), line)
        return json.loads(line[6:])

    def peers(self, i):
        r = subprocess.run(["ip", "netns", "exec", self.hosts[i], "curl", "-s", "--max-time", "2",
                            "http://127.0.0.1:18080/peers"], capture_output=True, timeout=10)
        try:
            return json.loads(r.stdout or b"[]")
        except ValueError:
            return []

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


if __name__ == "__main__":
    main()
