#!/usr/bin/python3
"""A secured mesh (issue 7): CurveZMQ links with allow-lists, authenticated beacons, key rotation,
and traffic that a capture on loopback cannot read. Real evmesh-node processes."""
import json
import os
import shutil
import signal
import socket
import subprocess
import time

import msgpack
import zmq

from evmesh_testlib import INSPECTOR, NODE, NodeTestCase, main, wait_for

MARKER = b"EVMESH-SECRET-MARKER-7f3a"


class Security(NodeTestCase):
    def setUp(self):
        super().setUp()
        self.keys = {}
        self.secret = os.path.join(self.tmp, "mesh.secret")
        with open(self.secret, "w") as f:
            f.write("correct horse battery staple 42\n")
        os.chmod(self.secret, 0o600)

    def keygen(self, name):
        path = os.path.join(self.tmp, name)
        p = subprocess.run([INSPECTOR, "keygen", path], capture_output=True, timeout=10)
        self.assertEqual(p.returncode, 0, p.stderr)
        self.assertEqual(os.stat(path + ".key").st_mode & 0o777, 0o600)
        self.keys[name] = p.stdout.decode().strip()
        return self.keys[name]

    def allow(self, node, *names):
        path = os.path.join(self.tmp, f"{node}.allow")
        with open(path + ".tmp", "w") as f:
            f.write("# allowed node keys\n" + "".join(f"{self.keys[n]}  # {n}\n" for n in names))
        os.replace(path + ".tmp", path)  # atomic: the node never reads half a file
        return path

    def start_secure(self, name, key, allow_names, *extra):
        allow = self.allow(name, *allow_names)
        return self.start_node(name, "--security", "--key-file", os.path.join(self.tmp, key + ".key"),
                               "--mesh-secret-file", self.secret, "--allow-file", allow, *extra)

    def connected(self, node):
        return sorted(p["name"] for p in node.peers() if p["state"] == "connected")

    def deliver(self, pub_node, sub_node, topic, payload, count=20, expect=True):
        """Publishes `count` events with `payload` from a client on pub_node and returns the sources
        of those a client on sub_node received. When delivery is expected, warm-up events are
        published first until one arrives (subscriptions cross the mesh asynchronously); when it
        is not, events are published for 2 s and whatever arrives is returned."""
        ctx = zmq.Context()
        try:
            sub = ctx.socket(zmq.SUB)
            sub.setsockopt(zmq.SUBSCRIBE, topic.split(".")[0].encode())
            sub.setsockopt(zmq.RCVTIMEO, 100)
            sub.connect(sub_node.sub)
            pub = ctx.socket(zmq.PUB)
            pub.connect(pub_node.pub)

            def send(p):
                pub.send_multipart([topic.encode(),
                                    msgpack.packb([1, None, None, None, None, None, None, p], use_bin_type=True)])

            def take():
                try:
                    v = msgpack.unpackb(sub.recv_multipart()[1])
                    return v[7], v[2]
                except zmq.Again:
                    return None, None
            got = []
            deadline = time.monotonic() + (15 if expect else 2)
            warm = expect
            while time.monotonic() < deadline and (warm or not expect):
                send(b"warm" if expect else payload)
                p, src = take()
                if p == b"warm":
                    warm = False
                elif p == payload:
                    got.append(src)
            if not expect:
                return got
            for _ in range(count):
                send(payload)
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline and len(got) < count:
                p, src = take()
                if p == payload:
                    got.append(src)
            return got
        finally:
            ctx.destroy(0)

    def test_trusted_nodes_talk_strangers_get_nothing(self):
        for n in ("a", "b", "c"):
            self.keygen(n)
        a = self.start_secure("A", "a", ["a", "b"])
        b = self.start_secure("B", "b", ["a", "b"])
        c = self.start_secure("C", "c", ["a", "b", "c"])  # valid key, mesh secret, not allowed by A/B
        self.assertTrue(wait_for(lambda: self.connected(a) == ["B"] and self.connected(b) == ["A"], 10))
        # the stranger is refused on both sides: its beacons, and its connections (ZAP)
        self.assertTrue(wait_for(lambda: a.metric("evmesh_beacons_total", outcome="not_allowed") > 0
                                 and a.metric("evmesh_auth_total", result="rejected") > 0, 10))
        self.assertEqual(a.metric("evmesh_auth_total", result="accepted") >= 1, True)
        got = self.deliver(a, b, "orders.created", b"to B")
        self.assertEqual(len(got), 20)
        self.assertTrue(all(s == "A/client" for s in got))
        self.assertEqual(self.deliver(a, c, "orders.created", b"to C?", expect=False), [])  # C reads nothing
        self.assertEqual(self.deliver(c, b, "orders.created", b"from C?", expect=False), [])  # C injects nothing
        self.assertEqual(c.metric("evmesh_events_in_total", input="mesh"), 0)
        self.assertNotIn("C", self.connected(a) + self.connected(b))

    def test_a_node_without_keys_cannot_connect(self):
        self.keygen("a")
        self.keygen("b")
        a = self.start_secure("A", "a", ["a", "b"])
        b = self.start_secure("B", "b", ["a", "b"])
        d = self.start_node("D")  # security off: unsigned beacons, plain ZMTP
        self.assertTrue(wait_for(lambda: a.metric("evmesh_beacons_total", outcome="unauthenticated") > 0, 10))
        self.assertEqual(self.deliver(a, d, "orders.created", b"to D?", expect=False), [])
        self.assertEqual(self.deliver(d, b, "orders.created", b"from D?", expect=False), [])
        self.assertEqual(self.connected(a), ["B"])
        self.assertEqual(d.metric("evmesh_events_in_total", input="mesh"), 0)

    def capture(self, secure):
        if shutil.which("tcpdump") is None or os.geteuid() != 0:
            self.skipTest("tcpdump (as root) is needed to capture loopback traffic")
        if secure:
            self.keygen("a")
            self.keygen("b")
            a = self.start_secure("A", "a", ["a", "b"])
            b = self.start_secure("B", "b", ["a", "b"])
        else:
            a, b = self.start_node("A"), self.start_node("B")
        self.assertTrue(wait_for(lambda: self.connected(a) == ["B"], 10))
        ports = {int(n.ready["mesh_endpoint"].rsplit(":", 1)[1]) for n in (a, b)}
        pcap = os.path.join(self.tmp, "mesh.pcap")
        filt = " or ".join(f"tcp port {p}" for p in ports)
        # --immediate-mode: libpcap would otherwise hand over packets in batches of up to a second
        dump = self.spawn(["tcpdump", "-i", "lo", "--immediate-mode", "-U", "-s", "0", "-w", pcap, filt],
                          stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        self.assertTrue(wait_for(lambda: os.path.exists(pcap), 5))
        time.sleep(0.5)
        got = self.deliver(a, b, "orders.created", MARKER)
        self.assertEqual(len(got), 20)
        time.sleep(1.0)
        dump.send_signal(signal.SIGINT)
        dump.wait(10)
        with open(pcap, "rb") as f:
            data = f.read()
        self.assertGreater(len(data), 1000, "the capture saw the mesh traffic")
        return data

    def test_secured_link_traffic_is_not_readable(self):
        self.assertNotIn(MARKER, self.capture(True))

    def test_insecure_link_traffic_is_readable(self):  # the same capture proves the check works
        self.assertIn(MARKER, self.capture(False))

    def test_forged_tampered_and_replayed_beacons_are_rejected(self):
        self.keygen("a")
        self.keygen("b")
        a = self.start_secure("A", "a", ["a", "b"])
        b = self.start_secure("B", "b", ["a", "b"])
        self.assertTrue(wait_for(lambda: self.connected(b) == ["A"], 10))
        before_peers = b.peers()
        # capture one of A's real beacons from the loopback broadcast
        lst = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        lst.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        lst.bind(("127.255.255.255", self.beacon_port))
        lst.settimeout(3)
        while True:
            data, _ = lst.recvfrom(2048)
            arr = msgpack.unpackb(data[4:], raw=False)
            if arr[4] == "A":
                break
        lst.close()
        self.assertEqual(len(arr), 13, "secured beacons carry key, time and MAC")
        base_unauth = b.metric("evmesh_beacons_total", outcome="unauthenticated")
        base_replay = b.metric("evmesh_beacons_total", outcome="replayed")
        tampered = list(arr)
        tampered[7] = 1  # redirect A's mesh endpoint to port 1, keep the old MAC
        forged = list(arr)
        forged[3] = os.urandom(16)
        forged[4] = "evil"
        forged[11] = int(time.time() * 1000)
        forged[12] = os.urandom(32)  # no mesh secret, no valid MAC
        tx = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        tx.setsockopt(socket.SOL_SOCKET, socket.SO_BROADCAST, 1)
        tx.bind(("127.0.0.1", 0))
        for d in (b"EVMB" + msgpack.packb(tampered, use_bin_type=True),
                  b"EVMB" + msgpack.packb(forged, use_bin_type=True),
                  data):  # the real beacon, replayed
            tx.sendto(d, ("127.255.255.255", self.beacon_port))
        tx.close()
        self.assertTrue(wait_for(lambda: b.metric("evmesh_beacons_total", outcome="unauthenticated") >= base_unauth + 2
                                 and b.metric("evmesh_beacons_total", outcome="replayed") >= base_replay + 1, 5))
        after = b.peers()
        self.assertEqual([(p["name"], p["endpoint"], p["incarnation"]) for p in after],
                         [(p["name"], p["endpoint"], p["incarnation"]) for p in before_peers])
        self.assertNotIn("evil", json.dumps(after))

    def test_key_rotation_without_restarting_the_mesh(self):
        for n in ("a", "b1", "b2"):
            self.keygen(n)
        a = self.start_secure("A", "a", ["a", "b1"])
        b = self.start_secure("B", "b1", ["a", "b1"])
        self.assertTrue(wait_for(lambda: self.connected(a) == ["B"], 10))
        # 1. A learns the new key (its allow file is re-read while it runs)
        self.allow("A", "a", "b1", "b2")
        time.sleep(1.5)
        # 2. B restarts with its new key
        b.proc.send_signal(signal.SIGTERM)
        self.assertEqual(b.proc.wait(5), 0)
        b2 = self.start_secure("B", "b2", ["a", "b2"])
        self.assertTrue(wait_for(lambda: self.connected(a) == ["B"] and self.connected(b2) == ["A"], 10))
        self.assertEqual(len(self.deliver(a, b2, "orders.created", b"after rotation")), 20)
        # 3. the old key is removed; the mesh keeps working, A never restarted
        self.allow("A", "a", "b2")
        time.sleep(1.5)
        self.assertEqual(len(self.deliver(b2, a, "orders.created", b"still fine")), 20)
        self.assertIsNone(a.proc.poll())

    def test_ipc_endpoints_get_restrictive_permissions(self):
        path = os.path.join(self.tmp, "local.pub")
        a = self.start_node("A", "--no-mesh", "--pub-endpoint", f"ipc://{path}", "--ipc-mode", "0600")
        self.assertEqual(os.stat(path).st_mode & 0o777, 0o600)
        a.proc.send_signal(signal.SIGTERM)
        self.assertEqual(a.proc.wait(5), 0)

    def test_bad_security_config_is_refused(self):
        self.keygen("a")
        key = os.path.join(self.tmp, "a.key")
        os.chmod(key, 0o644)
        p = subprocess.run([NODE,
                            "--security", "--key-file", key, "--mesh-secret-file", self.secret, "--no-mesh"],
                           capture_output=True, timeout=10)
        self.assertEqual(p.returncode, 2)
        self.assertIn("chmod 600", p.stderr.decode())


if __name__ == "__main__":
    main()
