#!/usr/bin/python3
"""mesh-inspector and the metrics endpoint against a live 4-node mesh (issue 6)."""
import json
import os
import re
import shutil
import signal
import subprocess
import time

import msgpack
import zmq

from evmesh_testlib import INSPECTOR, PY_CLIENT, PYTHON, SLOW_NODE, NodeTestCase, main, read_line, wait_for

EXAMPLES = os.path.join(os.path.dirname(__file__), "..", "..", "examples")


def parse_prometheus(text):
    """Strict parser of the Prometheus text exposition format (version 0.0.4). Returns
    {family: {"type": t, "samples": [(name, labels, value)]}}; raises ValueError on any defect."""
    name_re = r"[a-zA-Z_:][a-zA-Z0-9_:]*"
    sample_re = re.compile(rf"^({name_re})(\{{(.*)\}})? (\S+)$")
    label_re = re.compile(r'([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\\n]|\\[\\"n])*)"(,|$)')
    families, current = {}, None
    for line in text.split("\n"):
        if line == "":
            continue
        if line.startswith("# HELP "):
            name = line.split(" ")[2]
            if not re.fullmatch(name_re, name):
                raise ValueError(f"bad metric name {name!r}")
            families.setdefault(name, {"type": None, "samples": [], "help": True})
            current = name
            continue
        if line.startswith("# TYPE "):
            _, _, name, typ = line.split(" ")
            if typ not in ("counter", "gauge", "histogram", "summary", "untyped"):
                raise ValueError(f"bad type {typ!r}")
            if families.get(name, {}).get("samples"):
                raise ValueError(f"TYPE after samples for {name}")
            families.setdefault(name, {"type": None, "samples": []})["type"] = typ
            current = name
            continue
        if line.startswith("#"):
            continue
        m = sample_re.match(line)
        if not m:
            raise ValueError(f"bad sample line {line!r}")
        name, _, labels_text, value = m.groups()
        labels = {}
        if labels_text:
            pos = 0
            while pos < len(labels_text):
                lm = label_re.match(labels_text, pos)
                if not lm:
                    raise ValueError(f"bad labels {labels_text!r}")
                labels[lm.group(1)] = lm.group(2)
                pos = lm.end()
        float(value)  # must parse (+Inf, NaN allowed by float())
        family = current
        if family is None or not (name == family or name.startswith(family + "_")):
            raise ValueError(f"sample {name} outside its family {family}")
        fam = families[family]
        if fam["type"] == "counter" and not family.endswith("_total"):
            raise ValueError(f"counter {family} does not end in _total")
        fam["samples"].append((name, labels, float(value)))
    for name, fam in families.items():
        if fam["type"] == "histogram":
            buckets = [s for s in fam["samples"] if s[0] == name + "_bucket"]
            les = [s[1]["le"] for s in buckets]
            if not les or les[-1] != "+Inf":
                raise ValueError(f"histogram {name} lacks le=+Inf")
            values = [s[2] for s in buckets]
            if values != sorted(values):
                raise ValueError(f"histogram {name} buckets not cumulative")
            count = [s for s in fam["samples"] if s[0] == name + "_count"]
            if not count or count[0][2] != values[-1]:
                raise ValueError(f"histogram {name} _count != +Inf bucket")
    return families


class Inspector(NodeTestCase):
    def inspect(self, *args, timeout=30):
        p = subprocess.run([INSPECTOR, *args, "--mesh", self.mesh, "--beacon-port", str(self.beacon_port)],
                           capture_output=True, timeout=timeout)
        return p.returncode, p.stdout.decode(), p.stderr.decode()

    def start_mesh(self, n=4):
        nodes = [self.start_node(f"n{i}") for i in range(n)]
        self.assertTrue(wait_for(lambda: all(len(x.peers()) == n - 1 for x in nodes), 10))
        return nodes

    def start_traffic(self, node, count=100000, interval="0.02"):
        return self.spawn([PYTHON, os.path.join(EXAMPLES, "open-platform", "orders_service.py"), node.pub,
                           str(count), interval], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    def test_nodes_topics_graph_ping_publish_tail(self):
        nodes = self.start_mesh(4)
        subs = [self.client("sub", n.sub, "orders.>", 1000000, 60) for n in nodes[1:]]
        self.assertTrue(wait_for(lambda: nodes[0].metric("evmesh_subscriptions", origin="mesh") >= 1, 10))
        self.start_traffic(nodes[0])

        rc, out, err = self.inspect("nodes", "--json")
        self.assertEqual(rc, 0, err)
        listed = json.loads(out)["nodes"]
        names = sorted(n["name"] for n in listed)
        self.assertEqual(names, ["n0", "n1", "n2", "n3"])
        for n in listed:
            self.assertEqual(sorted(p["name"] for p in n["peers"]), sorted(set(names) - {n["name"]}), n)
            self.assertTrue(all(p["state"] == "connected" for p in n["peers"]))
            self.assertEqual(n["health"], "ok", n)
            self.assertTrue(n["mesh_endpoint"].startswith("tcp://127.0.0.1:"))

        rc, out, err = self.inspect("topics", "--json")
        self.assertEqual(rc, 0, err)
        topics = {t["topic"]: t for t in json.loads(out)["topics"]}
        self.assertTrue(any(t.startswith("orders.") for t in topics), topics)
        for t in (t for name, t in topics.items() if name.startswith("orders.")):
            self.assertGreater(t["rate"], 0, t)
            self.assertEqual([p["node"] for p in t["publishers"]], ["n0"])
            self.assertEqual(sorted(t["subscribers"]), ["n1", "n2", "n3"])

        rc, out, err = self.inspect("graph")
        self.assertEqual(rc, 0, err)
        self.assertTrue(out.startswith("digraph"))
        for i in range(4):
            self.assertIn(f'"n{i}"', out)
        if shutil.which("dot"):
            p = subprocess.run(["dot", "-Tsvg"], input=out.encode(), capture_output=True, timeout=30)
            self.assertEqual(p.returncode, 0, p.stderr.decode())
            self.assertIn(b"<svg", p.stdout)
        self.assertRegex(out, r'"n0" -> "n[123]" \[label="[0-9.]+(k)?/s", penwidth=2\]')

        rc, out, err = self.inspect("ping", "n2", "-c", "5", "--interval-ms", "20", "--json")
        self.assertEqual(rc, 0, err)
        ping = json.loads(out)
        self.assertEqual(ping["received"], 5)
        self.assertGreater(ping["p50_us"], 0)
        self.assertGreaterEqual(nodes[2].metric("evmesh_pings_answered_total"), 5)

        # tail: only events published after it started; `publish` injects one we can recognise
        t0 = time.time_ns()
        tail = self.spawn([INSPECTOR, "tail", "inspector.test.>", "--count", "1", "--timeout", "20", "--json",
                           "--mesh", self.mesh, "--beacon-port", str(self.beacon_port)],
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        # the tail inspector has joined when n0 lists an observer peer as connected
        self.assertTrue(wait_for(lambda: any(p["observer"] and p["state"] == "connected" for p in nodes[0].peers()), 10))
        rc, out, err = self.inspect("publish", "inspector.test.x", '{"hello":1}', "--content-type",
                                    "application/json", "-H", "k=v", "--json")
        self.assertEqual(rc, 0, err)
        published = json.loads(out)
        out, err = tail.communicate(timeout=30)
        self.assertEqual(tail.returncode, 0, err.decode())
        ev = json.loads(out.decode().splitlines()[0])
        self.assertEqual(ev["id"], published["id"])
        self.assertEqual(ev["payload"], {"hello": 1})
        self.assertEqual(ev["headers"], {"k": "v"})
        self.assertGreaterEqual(ev["time_ns"], t0)
        # and a live tail of the traffic
        rc, out, err = self.inspect("tail", "orders.*.created", "--count", "3", "--timeout", "10", "--json")
        self.assertEqual(rc, 0, err)
        self.assertEqual(len(out.splitlines()), 3)
        for s in subs:
            s.kill()

    def test_stats_show_gaps_of_a_slow_subscriber_and_drops(self):
        nodes = self.start_mesh(2)
        slow = self.spawn([SLOW_NODE, self.mesh, str(self.beacon_port), "flood.>", "2000", "90"],
                          stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
        self.assertTrue(read_line(slow, 10).startswith(b"READY"))
        self.assertTrue(wait_for(lambda: nodes[0].metric("evmesh_subscriptions", origin="mesh") >= 1, 10))
        # a flood from a client on n0, plus malformed input n0 must reject (exactly 7)
        ctx = zmq.Context()

        def slow_stats():
            rc, out, _ = self.inspect("stats", "slow-node", "--json", "--wait-ms", "1500")
            return json.loads(out) if rc == 0 else None
        try:
            # an XPUB sees the node's subscriptions arrive: flood only once `flood.` is there
            pub = ctx.socket(zmq.XPUB)
            pub.setsockopt(zmq.SNDHWM, 0)
            pub.setsockopt(zmq.RCVTIMEO, 10000)
            pub.connect(nodes[0].pub)
            while not pub.recv().startswith(b"\x01flood."):
                pass
            for _ in range(7):
                pub.send_multipart([b"flood.x", b"\xc1garbage"])
            body = msgpack.packb([1, None, None, None, None, None, None, b"x" * 100], use_bin_type=True)
            # Flood in rounds until the slow subscriber has lost some: how many events the
            # queues and TCP buffers on the way absorb depends on the machine's load.
            stats = None
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline:
                for _ in range(20000):
                    pub.send_multipart([b"flood.x", body])
                s = slow_stats()
                if s and s["counters"]["subscriber_gaps"] > 0:
                    stats = s
                    break
        finally:
            ctx.destroy(1000)
        self.assertTrue(stats, "no gaps reported by the slow node")
        sub = stats["subscribers"][0]
        self.assertEqual(sub["pattern"], "flood.>")
        self.assertGreater(sub["gaps"], 0)
        self.assertGreater(sub["received"], 0)
        rc, out, err = self.inspect("stats", "n0", "--json")
        self.assertEqual(rc, 0, err)
        n0 = json.loads(out)
        self.assertEqual(n0["drops"]["client_rejected"], 7)
        # with their reason and topic
        self.assertEqual(sum(n0["rejected"]["by_reason"].values()), 7, n0["rejected"])
        self.assertEqual(n0["rejected"]["by_topic"], {"flood.x": 7})
        self.assertGreater(sub["gaps_by_topic"]["flood.x"], 0)
        # human-readable form mentions them too
        rc, out, err = self.inspect("stats", "slow-node")
        self.assertEqual(rc, 0, err)
        self.assertRegex(out, r"subscriber gaps [1-9]")
        slow.kill()

    def test_killed_node_is_gone_within_the_expiry_bound(self):
        nodes = self.start_mesh(4)
        nodes[3].proc.send_signal(signal.SIGKILL)
        nodes[3].proc.wait(5)
        t0 = time.monotonic()
        rc, out, err = self.inspect("nodes", "--json", "--wait-ms", "1500")
        listed = json.loads(out)["nodes"]
        alive = [n for n in listed if n["health"] != "gone"]
        self.assertEqual(sorted(n["name"] for n in alive), ["n0", "n1", "n2"], listed)
        for n in alive:
            # its link is down at once; the entry itself goes with the expiry window
            self.assertNotIn("connected", [p.get("state") for p in n["peers"] if p["name"] == "n3"])
        self.assertLess(time.monotonic() - t0, 2.4 + 2.0)

    def test_top_under_a_pseudo_terminal(self):
        nodes = self.start_mesh(3)
        # events only leave a publisher when someone subscribed (ZeroMQ filters at the source)
        self.client("sub", nodes[1].sub, "orders.>", 1000000, 30)
        self.assertTrue(wait_for(lambda: nodes[1].metric("evmesh_subscriptions", origin="local") >= 1, 10))
        self.assertTrue(wait_for(lambda: nodes[0].metric("evmesh_subscriptions", origin="mesh") >= 3, 10))
        self.start_traffic(nodes[0], interval="0.05")
        cmd = f"{INSPECTOR} top --duration 3 --mesh {self.mesh} --beacon-port {self.beacon_port}"
        p = subprocess.run(["script", "-qfec", cmd, "/dev/null"], capture_output=True, timeout=30)
        self.assertEqual(p.returncode, 0, p.stderr)
        screen = p.stdout.decode(errors="replace")
        self.assertIn("\x1b[2J", screen)  # it redraws
        last = screen.split("\x1b[2J")[-1]
        for i in range(3):
            self.assertIn(f"n{i}", last)
        self.assertIn("orders.", last)

    def test_metrics_are_valid_prometheus_and_match_the_traffic(self):
        a = self.start_node("a", "--no-mesh")
        ctx = zmq.Context()
        try:
            sub = ctx.socket(zmq.SUB)
            sub.setsockopt(zmq.SUBSCRIBE, b"m.")
            sub.setsockopt(zmq.RCVTIMEO, 3000)
            sub.connect(a.sub)
            pub = ctx.socket(zmq.PUB)
            pub.connect(a.pub)
            self.assertTrue(wait_for(lambda: a.metric("evmesh_subscriptions", origin="local") >= 1, 10))
            time.sleep(0.3)  # the node's subscription reaches this PUB socket
            body = msgpack.packb([1, None, None, None, None, None, None, b"x"], use_bin_type=True)
            for _ in range(25):
                pub.send_multipart([b"m.x", body])
            pub.send_multipart([b"m.x", b"junk"])
            for _ in range(25):
                sub.recv_multipart()
        finally:
            ctx.destroy(0)
        self.assertTrue(wait_for(lambda: a.metric("evmesh_client_events_rejected_total") == 1, 5))
        fams = parse_prometheus(a.http("/metrics"))
        def value(family, **labels):
            return sum(v for n, l, v in fams[family]["samples"]
                       if n == family and all(l.get(k) == str(x) for k, x in labels.items()))
        self.assertEqual(value("evmesh_events_in_total", input="client"), 25)
        self.assertEqual(value("evmesh_events_out_total", output="local"), 25)
        self.assertEqual(value("evmesh_client_events_completed_total"), 25)
        self.assertEqual(value("evmesh_client_events_rejected_total"), 1)
        self.assertEqual(fams["evmesh_delivery_latency_seconds"]["type"], "histogram")
        self.assertEqual(fams["evmesh_up"]["type"], "gauge")
        self.assertEqual(a.http("/healthz"), "ok\n")


if __name__ == "__main__":
    main()
