#!/usr/bin/python3
"""Operations (issue 16): Prometheus conventions checked by Debian's promtool, systemd readiness
(sd_notify) and SIGHUP reload, and an outbox that recovers from a full disk, tested on a real
tmpfs the test mounts itself."""
import json
import os
import shutil
import signal
import socket
import sqlite3
import subprocess
import time
import unittest
import urllib.error
import urllib.request
import uuid

import zmq

from channel_helpers import Publisher, Receiver, channel_config, new_secret
from evmesh_testlib import INSPECTOR, NODE, NodeTestCase, main, read_line, wait_for

PROMTOOL = shutil.which("promtool") or "/usr/bin/promtool"


def webhook(name, url, topics=("orders.>",), **settings):
    return {"name": name, "plugin": "webhook", "topics": list(topics),
            "settings": {"url": url, "allow_private": True, **settings}}


class OpsTestCase(NodeTestCase):
    def setUp(self):
        super().setUp()
        self.ctx = zmq.Context()
        self.receivers = []
        self.cleanups_last = []

    def tearDown(self):
        for r in self.receivers:
            r.close()
        self.ctx.destroy(linger=0)
        for p in self.procs:  # processes first: they hold files on the test's mounts
            if p.poll() is None:
                p.kill()
            p.wait(timeout=5)
        for f in reversed(self.cleanups_last):
            f()
        super().tearDown()

    def receiver(self, **kw):
        r = Receiver(**kw)
        self.receivers.append(r)
        return r

    def publish(self, node, n, prefix="orders."):
        pub = Publisher(self.ctx, node.pub, prefix)
        try:
            return [pub.publish(f"{prefix}e{i}", json.dumps({"i": i}).encode()) for i in range(n)]
        finally:
            pub.close()


def channels(node):
    return {c["name"]: c for c in json.loads(node.http("/channels"))}


def health(node):
    """(status, body) of /healthz; 503 is an answer here, not an error."""
    try:
        with urllib.request.urlopen(f"http://{node.ready['http']}/healthz", timeout=3) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()


def fill(directory, keep_bytes=0):
    """Fills the filesystem of `directory` with a file, leaving about `keep_bytes` free."""
    path = os.path.join(directory, f"filler{len(os.listdir(directory))}")
    st = os.statvfs(directory)
    room = st.f_bavail * st.f_frsize - keep_bytes
    with open(path, "wb") as f:
        chunk = b"\0" * (1 << 16)
        try:
            while room > 0:
                f.write(chunk[:min(len(chunk), room)])
                room -= len(chunk)
            f.flush()
        except OSError:
            pass  # full
    return path


class PrometheusTest(OpsTestCase):
    @unittest.skipUnless(os.path.exists(PROMTOOL), "promtool (Debian package prometheus) not installed")
    def test_promtool_accepts_metrics_of_a_busy_node_with_every_feature(self):
        # two secured nodes with repair, a channel with a live receiver and one with a dead one,
        # client traffic through both: then every family in /metrics must pass promtool's lint
        secret = os.path.join(self.tmp, "mesh.secret")
        with open(secret, "w") as f:
            f.write("a mesh secret of some length\n")
        os.chmod(secret, 0o600)
        keys = {}
        for n in ("a", "b"):
            p = subprocess.run([INSPECTOR, "keygen", os.path.join(self.tmp, n)], capture_output=True, timeout=10)
            self.assertEqual(p.returncode, 0, p.stderr)
            keys[n] = p.stdout.decode().strip()
        allow = os.path.join(self.tmp, "allow")
        with open(allow, "w") as f:
            f.write("".join(k + "\n" for k in keys.values()))
        rcv = self.receiver()
        cfg = channel_config(self.tmp, [webhook("partner", rcv.url()),
                                        webhook("dead", "http://127.0.0.1:9/none")])

        def secure(name):
            return ["--security", "--key-file", os.path.join(self.tmp, name + ".key"),
                    "--mesh-secret-file", secret, "--allow-file", allow, "--repair", "orders.>"]

        a = self.start_node("a", "--config", cfg, *secure("a"))
        b = self.start_node("b", *secure("b"))
        self.assertTrue(wait_for(lambda: any(p["state"] == "connected" for p in a.peers()), timeout=10))
        sub = self.ctx.socket(zmq.SUB)
        sub.connect(b.sub)
        sub.setsockopt(zmq.SUBSCRIBE, b"orders.")
        self.assertTrue(wait_for(lambda: a.metric("evmesh_subscriptions", origin="mesh") > 0, timeout=10))
        self.publish(a, 50)
        self.assertTrue(wait_for(lambda: len(rcv.received()) >= 50, timeout=15))
        for node in (a, b):
            text = node.http("/metrics")
            p = subprocess.run([PROMTOOL, "check", "metrics"], input=text.encode(), capture_output=True,
                               timeout=30)
            self.assertEqual(p.returncode, 0, (p.stdout + p.stderr).decode() + "\n" + text)
            self.assertNotIn("_microseconds", text)
        text = a.http("/metrics")
        count = [line for line in text.splitlines()
                 if line.startswith('evmesh_channel_attempt_duration_seconds_count{node="a",channel="partner"')]
        self.assertEqual(len(count), 1, text)
        self.assertGreaterEqual(float(count[0].rsplit(" ", 1)[1]), 50)
        self.assertIn('evmesh_channel_delivery_latency_seconds_bucket{node="a",channel="partner",'
                      'plugin="webhook",le="+Inf"}', text)
        self.assertIn('evmesh_delivery_latency_seconds_bucket{node="b",le="5e-06"}', b.http("/metrics"))
        sub.close()


class OutboxTest(OpsTestCase):
    """The outbox on a real 8 MiB tmpfs that the test mounts (and unmounts, even on failure)."""

    def mount_small_disk(self, size="8m"):
        if os.geteuid() != 0:
            self.skipTest("mounting a tmpfs needs root")
        disk = os.path.join(self.tmp, "disk")
        os.mkdir(disk)
        p = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "evmesh-test", disk], capture_output=True)
        if p.returncode != 0:
            os.rmdir(disk)
            self.skipTest(f"cannot mount a tmpfs: {p.stderr.decode().strip()}")

        def unmount():
            subprocess.run(["umount", "-l", disk], capture_output=True)
            os.rmdir(disk)
        self.cleanups_last.append(unmount)
        return disk

    def outbox_node(self, disk, url, hold_events=None, name="n0"):
        ch = webhook("partner", url)
        ch["retry"] = {"schedule": ["0ms", "1h"]}  # a dead endpoint keeps its events pending
        cfg = channel_config(disk, [ch])
        if hold_events is not None:
            with open(cfg) as f:
                text = f.read()
            with open(cfg, "w") as f:
                f.write(text.replace("[outbox]\n", f"[outbox]\nhold_events = {hold_events}\n", 1))
        return self.start_node(name, "--config", cfg, "--no-mesh"), cfg

    def publish_big(self, node, n, size=4096):
        pub = Publisher(self.ctx, node.pub, "orders.")
        try:
            return [pub.publish(f"orders.e{i}", json.dumps({"i": i, "pad": "x" * size}).encode()) for i in range(n)]
        finally:
            pub.close()

    def settled(self, node, n):
        c = channels(node)["partner"]
        return c["accepted"] + c["lost"] == n and c

    def test_full_disk_holds_events_then_accepts_them_and_health_returns(self):
        disk = self.mount_small_disk()
        rcv = self.receiver()
        node, _ = self.outbox_node(disk, rcv.url())
        self.assertEqual(health(node)[0], 200)
        filler = fill(disk)
        n = 200
        ids = self.publish_big(node, n)
        status = wait_for(lambda: health(node)[0] == 503 and health(node), timeout=15)
        self.assertTrue(status, "a full disk must show in /healthz")
        self.assertIn("outbox not writable", status[1])
        self.assertIn("full", status[1])
        self.assertLess(channels(node)["partner"]["accepted"], n)
        os.unlink(filler)
        self.assertTrue(wait_for(lambda: health(node)[0] == 200, timeout=15), health(node))
        c = wait_for(lambda: self.settled(node, n), timeout=15)
        self.assertTrue(c, channels(node))
        self.assertEqual((c["accepted"], c["lost"]), (n, 0))
        got = wait_for(lambda: len({json.loads(r["body"])["id"] for r in rcv.received()}) >= n and rcv.received(),
                       timeout=20)
        self.assertTrue(got, len(rcv.received()))
        self.assertEqual({json.loads(r["body"])["id"] for r in got}, {str(uuid.UUID(bytes=i)) for i in ids})
        self.assertIn("outbox is writable again", node.log())

    def test_memory_hold_overflow_is_counted_lost_never_neither(self):
        disk = self.mount_small_disk()
        rcv = self.receiver()
        node, _ = self.outbox_node(disk, rcv.url(), hold_events=20)
        filler = fill(disk)
        n = 300
        self.publish_big(node, n)
        self.assertTrue(wait_for(lambda: channels(node)["partner"]["lost"] > 0, timeout=15), channels(node))
        os.unlink(filler)
        c = wait_for(lambda: self.settled(node, n), timeout=15)
        self.assertTrue(c, channels(node))
        self.assertGreater(c["lost"], 0)
        self.assertGreaterEqual(c["accepted"], 20)
        self.assertTrue(wait_for(lambda: channels(node)["partner"]["delivered"] == c["accepted"], timeout=20),
                        channels(node))
        self.assertEqual(node.metric("evmesh_channel_lost_total"), c["lost"])

    def test_restart_with_little_space_starts_and_recovers(self):
        disk = self.mount_small_disk()
        # a dead endpoint: events stay pending in the outbox
        node, cfg = self.outbox_node(disk, "http://127.0.0.1:9/down")
        n = 150
        self.publish_big(node, n, size=8192)
        self.assertTrue(wait_for(lambda: channels(node)["partner"]["accepted"] == n, timeout=15), channels(node))
        node.proc.kill()  # a crash: claimed rows, a WAL that was not truncated
        node.proc.wait()
        filler = fill(disk, keep_bytes=2 << 20)
        node2 = self.start_node("n1", "--config", cfg, "--no-mesh")
        self.assertEqual(channels(node2)["partner"]["pending"], n)
        filler2 = fill(disk)  # now completely full: still running, 503, nothing lost
        # (SQLite reuses its WAL file, so writes succeed until that space is used up)
        more = 0
        while more < 3000 and health(node2)[0] == 200:
            self.publish_big(node2, 100, size=8192)
            more += 100
            wait_for(lambda: health(node2)[0] == 503, timeout=1)
        self.assertEqual(health(node2)[0], 503)
        for f in (filler, filler2):
            os.unlink(f)
        self.assertTrue(wait_for(lambda: health(node2)[0] == 200, timeout=15), health(node2))
        c = wait_for(lambda: self.settled(node2, more), timeout=15)
        self.assertTrue(c, channels(node2))
        self.assertEqual((c["accepted"], c["lost"], c["pending"]), (more, 0, n + more))

    def test_a_second_node_cannot_open_the_same_outbox(self):
        rcv = self.receiver()
        cfg = channel_config(self.tmp, [webhook("partner", rcv.url())])
        first = self.start_node("n0", "--config", cfg, "--no-mesh")
        p = self.spawn([NODE, "--name", "n1", "--mesh", self.mesh, "--config", cfg, "--no-mesh",
                        "--pub-endpoint", "tcp://127.0.0.1:*", "--sub-endpoint", "tcp://127.0.0.1:*"],
                       stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        out, err = p.communicate(timeout=15)
        self.assertEqual(p.returncode, 3, err)
        self.assertIn(b"is in use by another process (pid %d)" % first.pid, err)
        self.assertEqual(health(first)[0], 200)
        # the lock dies with its holder: after a SIGKILL the next node opens the outbox at once
        first.proc.kill()
        first.proc.wait()
        self.start_node("n2", "--config", cfg, "--no-mesh")

    def test_a_locked_database_is_retried_not_fatal(self):
        rcv = self.receiver()
        cfg = channel_config(self.tmp, [webhook("partner", rcv.url())])
        node = self.start_node("n0", "--config", cfg, "--no-mesh")
        db = sqlite3.connect(os.path.join(self.tmp, "outbox.db"), isolation_level=None, timeout=10)
        try:
            db.execute("BEGIN IMMEDIATE")  # another writer holds the lock past SQLite's busy timeout
            self.publish_big(node, 50, size=100)
            self.assertTrue(wait_for(lambda: health(node)[0] == 503, timeout=10), health(node))
            self.assertIn("locked", health(node)[1])
            time.sleep(1.0)
        finally:
            db.execute("ROLLBACK")
            db.close()
        self.assertTrue(wait_for(lambda: health(node)[0] == 200, timeout=15), health(node))
        c = wait_for(lambda: self.settled(node, 50), timeout=10)
        self.assertEqual((c["accepted"], c["lost"]), (50, 0))
        self.assertTrue(wait_for(lambda: channels(node)["partner"]["delivered"] == 50, timeout=10))


if __name__ == "__main__":
    main()
