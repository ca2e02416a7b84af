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
import threading
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

    def secured(self, *names):
        """A mesh secret file and a CURVE key pair per name (mesh-inspector keygen): (secret, keys)."""
        secret = os.path.join(self.tmp, "mesh.secret")
        with open(secret, "w") as f:
            f.write("a mesh secret of some length\n")
        os.chmod(secret, 0o600)
        keys = {}
        for n in names:
            p = subprocess.run([INSPECTOR, "keygen", os.path.join(self.tmp, n)], capture_output=True, timeout=10)
            self.assertEqual(p.returncode, 0, p.stderr)
            keys[n] = p.stdout.decode().strip()
        return secret, keys

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
        secret, keys = self.secured("a", "b")
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


class ServiceTest(OpsTestCase):
    """systemd's side of the node: sd_notify on a real unix datagram socket, SIGHUP reload."""

    def notify_socket(self):
        path = os.path.join(self.tmp, "notify.sock")
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        sock.bind(path)
        sock.settimeout(0.2)
        self.addCleanup(sock.close)
        return sock, path

    @staticmethod
    def messages(sock, want, timeout=10.0):
        """Datagrams until one contains `want` (returns all of them), or None at the timeout."""
        got = []
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                got.append(sock.recv(4096).decode())
            except socket.timeout:
                continue
            if want in got[-1]:
                return got
        return None

    def test_sd_notify_ready_watchdog_reloading_stopping(self):
        sock, path = self.notify_socket()
        node = self.start_node("n0", "--no-mesh", env={"NOTIFY_SOCKET": path, "WATCHDOG_USEC": "200000"})
        self.assertIsNotNone(self.messages(sock, "READY=1", timeout=5))
        got = self.messages(sock, "WATCHDOG=1", timeout=2)
        self.assertIsNotNone(got, "the watchdog must be fed at half of WATCHDOG_USEC")
        node.proc.send_signal(signal.SIGHUP)
        got = self.messages(sock, "RELOADING=1", timeout=5)
        self.assertIsNotNone(got)
        self.assertIsNotNone(self.messages(sock, "READY=1", timeout=5))
        self.assertIsNone(node.proc.poll(), "SIGHUP must not stop the node")
        node.proc.send_signal(signal.SIGTERM)
        self.assertIsNotNone(self.messages(sock, "STOPPING=1", timeout=5))
        self.assertEqual(node.proc.wait(timeout=10), 0)

    def write_config(self, path, chans, fmt="text"):
        cfg = channel_config(self.tmp, chans)
        with open(cfg) as f:
            text = f.read()
        with open(path + ".tmp", "w") as f:
            f.write(f'[log]\nformat = "{fmt}"\n\n' + text)
        os.replace(path + ".tmp", path)

    def test_sighup_reloads_channels_and_log_level_without_losing_an_event(self):
        rcv = self.receiver()
        cfg = os.path.join(self.tmp, "node.toml")
        self.write_config(cfg, [webhook("a", rcv.url("/a"))])
        node = self.start_node("n0", "--config", cfg, "--no-mesh")
        pub = Publisher(self.ctx, node.pub, "orders.")
        ids, stop = [], threading.Event()

        def stream():  # a steady stream across the hand-over, about 2,000 events/s
            i = 0
            while not stop.is_set():
                ids.append(pub.publish(f"orders.e{i}", json.dumps({"i": i}).encode()))
                i += 1
                time.sleep(0.0005)
        t = threading.Thread(target=stream)
        t.start()
        try:
            time.sleep(0.5)
            self.write_config(cfg, [webhook("a", rcv.url("/a")), webhook("b", rcv.url("/b"))], fmt="json")
            node.proc.send_signal(signal.SIGHUP)
            self.assertTrue(wait_for(lambda: "reload: applied" in node.log(), timeout=10), node.log())
            time.sleep(0.5)
        finally:
            stop.set()
            t.join()
        pub.close()
        caught = [l for l in node.log().splitlines() if "handed over" in l]
        print(f"\n    {len(ids)} events; {caught[0][caught[0].index('handed over'):][:90] if caught else ''}")
        want = {str(uuid.UUID(bytes=i)) for i in ids}
        seen_a = lambda: {json.loads(r["body"])["id"] for r in rcv.received("/a")}
        self.assertTrue(wait_for(lambda: seen_a() >= want, timeout=30),
                        f"{len(want - seen_a())} events never reached channel a: {channels(node)}")
        dupes = len(rcv.received("/a")) - len(seen_a())
        self.assertLessEqual(dupes, 16, "only deliveries cut off in flight may repeat")
        self.assertTrue(wait_for(lambda: len(rcv.received("/b")) > 0, timeout=10), "channel b was not added")
        # b exists from the reload on: it gets the tail of the stream, every event of it
        got_b = {json.loads(r["body"])["id"] for r in rcv.received("/b")}
        last = str(uuid.UUID(bytes=ids[-1]))
        self.assertTrue(wait_for(lambda: last in {json.loads(r["body"])["id"] for r in rcv.received("/b")}, 10))
        log = node.log()
        self.assertIn("reload: applied: log debug/json, channels (2)", log)
        applied = [l for l in log.splitlines() if "reload: applied" in l]
        self.assertTrue(applied[0].startswith("{"), applied)  # the log speaks JSON from the reload on
        self.assertEqual(health(node)[0], 200)
        self.assertEqual(sorted(channels(node)), ["a", "b"])
        self.assertTrue(got_b)

    def test_sighup_reloads_the_allow_list(self):
        secret, keys = self.secured("a", "b")
        cfg = os.path.join(self.tmp, "a.toml")

        def write(allowed):
            with open(cfg + ".tmp", "w") as f:
                f.write("[security]\nenabled = true\n"
                        f"key_file = {json.dumps(os.path.join(self.tmp, 'a.key'))}\n"
                        f"mesh_secret_file = {json.dumps(secret)}\n"
                        f"allowed_keys = {json.dumps(allowed)}\n")
            os.replace(cfg + ".tmp", cfg)

        write([])  # a trusts only itself
        a = self.start_node("a", "--config", cfg)
        b = self.start_node("b", "--security", "--key-file", os.path.join(self.tmp, "b.key"),
                            "--mesh-secret-file", secret, "--allow-key", keys["a"])
        connected = lambda: any(p["name"] == "b" and p["state"] == "connected" for p in a.peers())
        self.assertTrue(wait_for(lambda: a.metric("evmesh_beacons_total", outcome="not_allowed") > 0, timeout=10))
        self.assertFalse(connected())
        write([keys["b"]])
        a.proc.send_signal(signal.SIGHUP)
        self.assertTrue(wait_for(connected, timeout=10), a.peers())
        self.assertIn("reload: applied: allow-list", a.log())
        write([])  # revoked: b is dropped at once
        a.proc.send_signal(signal.SIGHUP)
        self.assertTrue(wait_for(lambda: not any(p["name"] == "b" for p in a.peers()), timeout=10), a.peers())
        self.assertIn("removed: key removed from the allow-list", a.log())  # swept by the reload itself

    def test_sighup_with_a_bad_config_keeps_the_running_one(self):
        rcv = self.receiver()
        cfg = os.path.join(self.tmp, "node.toml")
        self.write_config(cfg, [webhook("a", rcv.url("/a"))])
        node = self.start_node("n0", "--config", cfg, "--no-mesh")
        for k, bad in enumerate(('[[channel]]\nname = "a"\nplugin = "webhook"\ntopics = ["x.>.y"]\n',  # bad pattern
                    "this is not toml = = =\n",
                    '[outbox]\npath = "/x"\nhold_events = -5\n')):
            with open(cfg + ".tmp", "w") as f:
                f.write(bad)
            os.replace(cfg + ".tmp", cfg)  # the node never reads half a file
            node.proc.send_signal(signal.SIGHUP)
            self.assertTrue(wait_for(lambda: node.log().count("reload refused") >= k + 1, timeout=5), node.log())
        self.assertTrue(wait_for(lambda: node.log().count("reload refused") == 3, timeout=5), node.log())
        self.assertIsNone(node.proc.poll())
        self.publish(node, 10)
        self.assertTrue(wait_for(lambda: len(rcv.received("/a")) >= 10, timeout=10))
        self.assertEqual(sorted(channels(node)), ["a"])
        self.assertEqual(health(node)[0], 200)
        refused = [l for l in node.log().splitlines() if "reload refused" in l]
        self.assertIn("outbox.path", refused[0])
        self.assertIn("line 1", refused[1])


if __name__ == "__main__":
    main()
