#!/usr/bin/python3
"""Faults between real evmesh-node processes (issue "Core v2"): TCP links killed again and again
with `ss -K` while events flow (repair on: nothing lost, in order), a whole-host stall (every node
SIGSTOPped for 3 s: nobody is expired), a flood of forged hellos (capped and counted), and clients
publishing on the mesh's reserved topics (refused and counted). Loopback only; every process is
ended by PID in tearDown. EVMESH_FAULT_ROUNDS (default 20) sets the number of link kills."""
import os
import signal
import socket
import struct
import subprocess
import threading
import time
import unittest
import uuid

import msgpack
import zmq

from evmesh_testlib import NodeTestCase, free_port, main, wait_for

ROUNDS = int(os.environ.get("EVMESH_FAULT_ROUNDS", "20"))


def port_of(endpoint):
    return int(endpoint.rsplit(":", 1)[1])


class Publisher:
    """A client publisher on a node's pub endpoint: an XPUB with NODROP (it blocks rather than
    drops) that waits until the node's subscription covering its topic arrived."""

    def __init__(self, ctx, endpoint, topic, source):
        self.sock = ctx.socket(zmq.XPUB)
        self.sock.setsockopt(zmq.XPUB_NODROP, 1)
        self.sock.connect(endpoint)
        self.topic = topic.encode()
        self.source = source
        self.seq = 0

    def wait_subscribed(self, timeout=10):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.sock.poll(100):
                m = self.sock.recv()
                if m[:1] == b"\x01" and self.topic.startswith(m[1:]):
                    return True
        return False

    def send(self, n):
        for _ in range(n):
            self.seq += 1
            body = msgpack.packb([1, None, self.source, None, self.seq, None, None, b"x" * 32],
                                 use_bin_type=True)
            self.sock.send_multipart([self.topic, body])
        while self.sock.poll(0):
            self.sock.recv()  # subscription messages: read them so they do not pile up


class Faults(NodeTestCase):
    def setUp(self):
        super().setUp()
        self.ctx = zmq.Context()

    def tearDown(self):
        self.ctx.destroy(linger=0)
        super().tearDown()

    def test_repair_recovers_every_event_across_repeated_link_kills(self):
        a = self.start_node("A", "--repair", "fault.>")
        b = self.start_node("B", "--repair", "fault.>")
        self.assertTrue(wait_for(lambda: [p["state"] for p in b.peers()] == ["connected"], 10))
        sub = self.ctx.socket(zmq.SUB)
        sub.setsockopt(zmq.RCVHWM, 0)
        sub.setsockopt(zmq.SUBSCRIBE, b"fault.")
        sub.connect(b.sub)
        self.assertTrue(wait_for(lambda: a.metric("evmesh_subscriptions", origin="mesh") >= 1, 10))
        pub = Publisher(self.ctx, a.pub, "fault.stream", "faults-test/pub")
        self.assertTrue(pub.wait_subscribed())

        got = []
        done = threading.Event()

        def receive():
            while not done.is_set() or sub.poll(500):
                if sub.poll(100):
                    topic, body = sub.recv_multipart()
                    got.append(msgpack.unpackb(body, raw=False)[4])

        rx = threading.Thread(target=receive)
        rx.start()
        mesh_port = port_of(a.ready["mesh_endpoint"])
        kills = 0
        try:
            for _ in range(ROUNDS):
                pub.send(500)
                time.sleep(0.05)
                # abort the TCP connections of the mesh link (both directions), as a blip would
                r = subprocess.run(["ss", "-K", "dst", "127.0.0.1", "dport", "=", str(mesh_port)],
                                   capture_output=True, text=True, timeout=10)
                kills += r.stdout.count("ESTAB")
                pub.send(500)
                time.sleep(0.05)
            total = pub.seq
            if not wait_for(lambda: len(got) >= total, 20):
                self.fail(f"{len(got)} of {total}\nA: {a.http('/metrics')}\nB: {b.http('/metrics')}\n"
                          f"B peers {b.peers()}\nB log: {open(b.stderr_path).read()[-3000:]}")
        finally:
            done.set()
            rx.join(10)
            sub.close(0)
        self.assertGreater(kills, 0, "ss -K found no mesh connection to kill")
        self.assertEqual(got, list(range(1, total + 1)), "every event, once, in order")
        self.assertGreater(b.metric("evmesh_link_changes_total", to="down"), 0)
        self.assertGreater(b.metric("evmesh_repair_events_total", outcome="recovered"), 0)
        self.assertEqual(b.metric("evmesh_repair_events_total", outcome="lost"), 0)
        self.assertEqual(len(b.peers()), 1, "a blip never removes the peer")
        print(f"link kills {kills}, events {total}, recovered "
              f"{b.metric('evmesh_repair_events_total', outcome='recovered'):.0f}, NAKs "
              f"{b.metric('evmesh_repair_naks_total'):.0f}")

    def test_a_stalled_host_expires_nobody(self):
        nodes = [self.start_node(f"s{i}") for i in range(3)]
        self.assertTrue(wait_for(lambda: all(len(n.peers()) == 2 for n in nodes), 10))
        for n in nodes:
            os.kill(n.pid, signal.SIGSTOP)
        time.sleep(3.0)  # longer than the expiry window (3 x 800 ms)
        for n in nodes:
            os.kill(n.pid, signal.SIGCONT)
        time.sleep(1.0)
        for n in nodes:
            self.assertEqual(len(n.peers()), 2, n.ready["name"])
            self.assertEqual(n.metric("evmesh_peer_changes_total", kind="expired"), 0)
        self.assertGreaterEqual(sum(n.metric("evmesh_stalls_total") for n in nodes), 1)

    def test_a_flood_of_forged_hellos_is_capped_and_counted(self):
        cfg = os.path.join(self.tmp, "cap.toml")
        with open(cfg, "w") as f:
            f.write("[discovery]\nmax_peers = 40\njoins_per_second = 20\n")
        n = self.start_node("target", "--config", cfg)
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_BROADCAST, 1)
        sent = 0
        t0 = time.monotonic()
        while time.monotonic() - t0 < 2.0:
            beacon = [1, 1, self.mesh, uuid.uuid4().bytes, "forged", 1, "", 9, [], 2]
            s.sendto(b"EVMB" + msgpack.packb(beacon, use_bin_type=True), ("127.255.255.255", self.beacon_port))
            sent += 1
            if sent % 50 == 0:
                time.sleep(0.005)
        s.close()
        peers = len(n.peers())
        self.assertLessEqual(peers, 40)
        self.assertLessEqual(peers, 20 * 3)  # at most joins_per_second per started second
        self.assertGreater(n.metric("evmesh_peer_hellos_refused_total"), sent / 2)
        self.assertEqual(n.http("/healthz"), "ok\n")
        print(f"forged hellos {sent}: {peers} admitted, "
              f"{n.metric('evmesh_peer_hellos_refused_total'):.0f} refused")

    def test_a_node_restarted_on_the_same_port_gets_one_link_that_lasts(self):
        port = str(free_port())
        a = self.start_node("A", "--mesh-port", port)
        b = self.start_node("B")
        self.assertTrue(wait_for(lambda: [p["state"] for p in b.peers()] == ["connected"], 10))
        a.proc.send_signal(signal.SIGKILL)
        a.proc.wait(5)
        a2 = self.start_node("A", "--mesh-port", port)  # new id, same name, same endpoint
        self.assertTrue(wait_for(lambda: len(b.peers()) == 1 and b.peers()[0]["id"] == a2.ready["id"], 10),
                        b.peers())
        time.sleep(3.0)  # past the old entry's expiry: its removal must not cut the new link

        def deliver(tag, count=50):
            sub = self.ctx.socket(zmq.SUB)
            sub.setsockopt(zmq.SUBSCRIBE, tag.encode())
            sub.connect(b.sub)
            self.assertTrue(wait_for(lambda: a2.metric("evmesh_subscriptions", origin="mesh") >= 1, 10))
            pub = Publisher(self.ctx, a2.pub, tag + ".x", "restart-test/" + tag)
            self.assertTrue(pub.wait_subscribed())
            time.sleep(0.2)
            pub.send(count)
            got = []
            while sub.poll(1000):
                got.append(msgpack.unpackb(sub.recv_multipart()[1], raw=False)[4])
            sub.close(0)
            pub.sock.close(0)
            return got

        self.assertEqual(deliver("again"), list(range(1, 51)), "each event once: one link, not two")
        self.assertEqual([p["state"] for p in b.peers()], ["connected"])

    def test_clients_cannot_publish_on_reserved_topics(self):
        n = self.start_node("R")
        sock = self.ctx.socket(zmq.PUB)
        sock.connect(n.pub)
        watch = self.ctx.socket(zmq.SUB)
        watch.setsockopt(zmq.SUBSCRIBE, b"_evmesh.")
        watch.connect(n.sub)
        self.assertTrue(wait_for(lambda: n.metric("evmesh_subscriptions", origin="local") >= 1, 10))
        time.sleep(0.3)  # the PUB learns the subscription
        forged = msgpack.packb([1, uuid.uuid4().bytes, "x/y", 1, 1, "", {}, b""], use_bin_type=True)
        for _ in range(5):
            sock.send_multipart([b"_evmesh.stats.forged", forged])
        self.assertTrue(wait_for(lambda: n.metric("evmesh_rejected_total", reason="reserved_topic") == 5, 5))
        self.assertFalse(watch.poll(300) and b"forged" in watch.recv_multipart()[0])
        sock.close(0)
        watch.close(0)


if __name__ == "__main__":
    main()
