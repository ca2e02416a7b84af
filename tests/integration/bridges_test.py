#!/usr/bin/python3
"""Outbound broker bridges (docs/BRIDGES.md): real brokers started by the test on free loopback
ports (mosquitto, redis-server, nats-server with JetStream, rabbitmq-server, and librdkafka's mock
cluster for Kafka), a real evmesh-node with the bridge channel, and an independent client of each
broker (paho-mqtt, redis-py, pika, a raw NATS protocol client, a librdkafka consumer) counting what
arrived: every id exactly once (or at least once after a broker crash, with duplicates reported),
attributes and headers checked. Brokers are killed by process group at the end, even on failure."""
import base64
import json
import os
import shutil
import socket
import subprocess
import tempfile
import threading
import time
import unittest
import uuid

import msgpack
import zmq

from broker_helpers import KafkaMock, Mosquitto, Nats, Rabbit, Redis, stop_all
from channel_helpers import Publisher, channel_config
from evmesh_testlib import NODE, NodeTestCase, free_port, main, wait_for

FAST_RETRY = {"schedule": ["0ms", "200ms", "500ms", "1s", "1s", "1s", "1s", "1s", "1s", "1s", "1s", "1s",
                           "1s", "1s", "1s", "1s", "1s", "1s", "1s", "1s", "1s", "1s", "1s", "1s", "1s", "1s",
                           "1s", "1s", "1s", "1s"]}
FAST_BREAKER = {"failures": 5, "pause": "200ms", "max_pause": "1s"}


def channels(node):
    return {c["name"]: c for c in json.loads(node.http("/channels"))}


def bridge(name, plugin, settings, topics=("orders.>",), concurrency=8, retry=FAST_RETRY, breaker=FAST_BREAKER):
    return {"name": name, "plugin": plugin, "topics": list(topics), "settings": settings,
            "concurrency": concurrency, "retry": retry, "breaker": breaker}


class NatsClient:
    """A minimal NATS protocol client (https://docs.nats.io/reference/reference-protocols/nats-protocol)
    on a raw socket: subscribe, request/reply (for the JetStream API), message headers."""

    def __init__(self, port, timeout=10.0):
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=timeout)
        self.buf = b""
        self.sid = 0
        self._line()  # INFO
        self.sock.sendall(b'CONNECT {"verbose":false,"pedantic":false,"headers":true,"no_responders":true}\r\nPING\r\n')
        while self._line() != b"PONG":
            pass

    def _fill(self):
        chunk = self.sock.recv(65536)
        if not chunk:
            raise ConnectionError("nats closed the connection")
        self.buf += chunk

    def _line(self):
        while b"\r\n" not in self.buf:
            self._fill()
        line, self.buf = self.buf.split(b"\r\n", 1)
        return line

    def _take(self, n):
        while len(self.buf) < n + 2:
            self._fill()
        data, self.buf = self.buf[:n], self.buf[n + 2:]
        return data

    def subscribe(self, subject):
        self.sid += 1
        self.sock.sendall(f"SUB {subject} {self.sid}\r\n".encode())
        return self.sid

    def flush(self):
        self.sock.sendall(b"PING\r\n")
        while True:
            m = self.next()
            if m is None:
                return

    def next(self):
        """The next message as dict(subject, headers, data), or None for a PONG."""
        while True:
            line = self._line()
            if line == b"PING":
                self.sock.sendall(b"PONG\r\n")
                continue
            if line == b"PONG":
                return None
            parts = line.split()
            if parts[0] == b"MSG":
                n = int(parts[-1])
                return {"subject": parts[1].decode(), "headers": {}, "data": self._take(n)}
            if parts[0] == b"HMSG":
                hlen, total = int(parts[-2]), int(parts[-1])
                raw = self._take(total)
                return {"subject": parts[1].decode(), "headers": parse_nats_headers(raw[:hlen]), "data": raw[hlen:]}
            if parts[0] in (b"+OK",):
                continue
            if parts[0] == b"-ERR":
                raise AssertionError(line)

    def request(self, subject, payload=b""):
        inbox = f"_INBOX.{uuid.uuid4().hex}"
        sid = self.subscribe(inbox)
        self.sock.sendall(f"PUB {subject} {inbox} {len(payload)}\r\n".encode() + payload + b"\r\n")
        msg = self.next()
        while msg is None:
            msg = self.next()
        self.sock.sendall(f"UNSUB {sid}\r\n".encode())
        return json.loads(msg["data"]) if msg["data"] else msg

    def close(self):
        self.sock.close()


def parse_nats_headers(raw):
    lines = raw.decode().split("\r\n")
    out = {}
    for line in lines[1:]:
        if ":" in line:
            k, v = line.split(":", 1)
            out[k.strip()] = v.strip()
    return out


class BridgeTestCase(NodeTestCase):
    def setUp(self):
        super().setUp()
        self.ctx = zmq.Context()
        self.publishers = []
        self.brokers = []
        self.btmp = tempfile.mkdtemp(prefix="evmesh-brokers-")

    def tearDown(self):
        for p in self.publishers:
            p.close()
        self.ctx.destroy(linger=0)
        super().tearDown()  # the node first: it must not see the brokers go away as a failure to log
        stop_all(self.brokers)
        shutil.rmtree(self.btmp, ignore_errors=True)

    def broker(self, b, start=True):
        self.brokers.append(b)
        return b.start() if start else b

    def node_with(self, chans, name="n0"):
        return self.start_node(name, "--config", channel_config(self.tmp, chans), "--no-mesh")

    def publisher(self, node, prefix="orders."):
        p = Publisher(self.ctx, node.pub, prefix)
        self.publishers.append(p)
        return p

    def publish(self, pub, n, topic="orders.eu.created", start=0):
        """n events with a header and a JSON payload; returns their ids (text) in order."""
        ids = []
        for i in range(start, start + n):
            eid = uuid.uuid4().bytes
            body = msgpack.packb([1, eid, "it/bridges", time.time_ns(), 0, "application/json",
                                  {"tenant": "acme"}, json.dumps({"n": i, "customer": {"id": f"c{i % 3}"}}).encode()],
                                 use_bin_type=True)
            pub.sock.send_multipart([topic.encode(), body])
            ids.append(str(uuid.UUID(bytes=eid)))
        return ids

    def delivered(self, node, name, n, timeout=30):
        self.assertTrue(wait_for(lambda: channels(node)[name]["delivered"] >= n, timeout=timeout, step=0.05),
                        channels(node)[name])

    def assert_exactly(self, got_ids, want_ids):
        missing = set(want_ids) - set(got_ids)
        extra = set(got_ids) - set(want_ids)
        self.assertEqual(len(missing), 0, f"{len(missing)} missing")
        self.assertFalse(extra, f"{len(extra)} unexpected")
        self.assertEqual(len(got_ids), len(want_ids), "duplicates")


class RedisTest(BridgeTestCase):
    def test_xadd_every_event_with_attributes(self):
        r = self.broker(Redis(self.btmp))
        node = self.node_with([bridge("rs", "redis", {"url": r.url, "stream": "evmesh:{topic.0}:{data.customer.id}"}),
                               bridge("trim", "redis", {"url": r.url, "stream": "trimmed", "maxlen": 100,
                                                        "mode": "structured"})])
        pub = self.publisher(node)
        ids = self.publish(pub, 300)
        self.delivered(node, "rs", 300)
        self.delivered(node, "trim", 300)
        db = r.client()
        got = []
        for c in ("c0", "c1", "c2"):
            for _, f in db.xrange(f"evmesh:orders:{c}"):
                got.append(f[b"id"].decode())
                self.assertEqual(f[b"specversion"], b"1.0")
                self.assertEqual(f[b"source"], b"it/bridges")
                self.assertEqual(f[b"type"], b"orders.eu.created")
                self.assertEqual(f[b"datacontenttype"], b"application/json")
                self.assertEqual(f[b"tenant"], b"acme")
                self.assertRegex(f[b"time"].decode(), r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{6}Z$")
                self.assertEqual(json.loads(f[b"data"])["customer"]["id"], c)
        self.assert_exactly(got, ids)
        # MAXLEN ~ 100: trimmed in whole stream nodes (100 entries each), so between 100 and 199 left
        self.assertTrue(100 <= db.xlen("trimmed") < 200, db.xlen("trimmed"))
        _, f = db.xrange("trimmed", count=1)[0]
        self.assertEqual(f[b"datacontenttype"], b"application/cloudevents+json")
        self.assertEqual(json.loads(f[b"data"])["specversion"], "1.0")
        self.assertEqual(channels(node)["rs"]["pending"], 0)
        log = json.loads(node.http("/channels/rs/log?limit=3"))
        self.assertTrue(all(x["outcome"] == "delivered" for x in log), log)

    def test_redis_sigkill_mid_stream_loses_nothing(self):
        r = self.broker(Redis(self.btmp))
        node = self.node_with([bridge("rs", "redis", {"url": r.url, "stream": "s", "timeout_ms": 2000},
                                      concurrency=16)])
        pub = self.publisher(node)
        total = 3000
        ids = self.publish(pub, total)
        db = r.client()
        self.assertTrue(wait_for(lambda: db.xlen("s") >= total * 0.3, timeout=30, step=0.005))
        r.kill()
        at_kill = channels(node)["rs"]["delivered"]
        time.sleep(1.0)
        r.start()
        self.delivered(node, "rs", total, timeout=60)
        got = [f[b"id"].decode() for _, f in r.client().xrange("s")]
        dups = len(got) - len(set(got))
        st = channels(node)["rs"]
        print(f"redis crash: {total} events, killed at {at_kill} delivered, {len(got)} entries, {dups} duplicates, "
              f"{st['retried']} retried")
        self.assertEqual(set(got), set(ids))  # nothing the node accepted is lost
        self.assertLessEqual(dups, st["retried"])  # a duplicate only from an attempt that had to be retried


class MqttTest(BridgeTestCase):
    def subscriber(self, m, topic, client_id=None, clean=True, qos=2):
        import paho.mqtt.client as mqtt
        got = []
        lock = threading.Lock()
        ready = threading.Event()
        c = mqtt.Client(client_id=client_id or f"it-{uuid.uuid4().hex[:8]}", protocol=mqtt.MQTTv5)

        def on_connect(client, userdata, flags, rc, props=None):
            client.subscribe(topic, qos=qos)

        def on_subscribe(client, userdata, mid, granted, props=None):
            ready.set()

        def on_message(client, userdata, msg):
            with lock:
                got.append(msg)

        c.on_connect, c.on_subscribe, c.on_message = on_connect, on_subscribe, on_message
        props = None
        if not clean:
            from paho.mqtt.properties import Properties
            from paho.mqtt.packettypes import PacketTypes
            props = Properties(PacketTypes.CONNECT)
            props.SessionExpiryInterval = 3600
        c.connect("127.0.0.1", m.port, clean_start=clean, properties=props)
        c.reconnect_delay_set(0.1, 0.5)
        c.loop_start()
        self.addCleanup(lambda: (c.loop_stop(), c.disconnect()))
        self.assertTrue(ready.wait(10))

        def snapshot():
            with lock:
                return list(got)
        return snapshot

    def test_qos1_and_qos2_with_user_properties(self):
        m = self.broker(Mosquitto(self.btmp))
        got = self.subscriber(m, "evmesh/#")
        node = self.node_with([bridge("q1", "mqtt", {"url": m.url, "topic": "evmesh/q1/{topic}", "qos": 1}),
                               bridge("q2", "mqtt", {"url": m.url, "topic": "evmesh/q2/{topic}", "qos": 2})])
        pub = self.publisher(node)
        ids = self.publish(pub, 200)
        self.delivered(node, "q1", 200)
        self.delivered(node, "q2", 200)
        self.assertTrue(wait_for(lambda: len(got()) >= 400, timeout=10))
        by = {"q1": [], "q2": []}
        for msg in got():
            lane = msg.topic.split("/")[1]
            self.assertEqual(msg.topic, f"evmesh/{lane}/orders/eu/created")  # dots mapped to '/'
            props = dict(msg.properties.UserProperty)
            self.assertEqual(props["specversion"], "1.0")
            self.assertEqual(props["source"], "it/bridges")
            self.assertEqual(props["type"], "orders.eu.created")
            self.assertEqual(props["tenant"], "acme")
            self.assertIn("time", props)
            self.assertEqual(msg.properties.ContentType, "application/json")
            self.assertEqual(json.loads(msg.payload)["customer"]["id"][0], "c")
            self.assertEqual(msg.qos, 1 if lane == "q1" else 2)
            by[lane].append(props["id"])
        self.assert_exactly(by["q1"], ids)
        self.assert_exactly(by["q2"], ids)

    def test_mosquitto_sigkill_mid_stream_loses_nothing(self):
        m = self.broker(Mosquitto(self.btmp))
        # a persistent session: what the broker stored for it while it was down survives the crash
        got = self.subscriber(m, "crash/#", client_id="it-crash-sub", clean=False, qos=1)
        node = self.node_with([bridge("mq", "mqtt", {"url": m.url, "topic": "crash/{topic}", "qos": 1,
                                                     "timeout_ms": 2000}, concurrency=16)])
        pub = self.publisher(node)
        total = 2000
        ids = self.publish(pub, total)
        self.assertTrue(wait_for(lambda: len(got()) >= total * 0.3, timeout=30, step=0.005))
        m.kill()
        at_kill = channels(node)["mq"]["delivered"]
        time.sleep(1.0)
        m.start()
        self.delivered(node, "mq", total, timeout=60)
        wait_for(lambda: set(ids) <= {dict(x.properties.UserProperty)["id"] for x in got()}, timeout=20)
        seen = [dict(x.properties.UserProperty)["id"] for x in got()]
        missing = [i for i, x in enumerate(ids) if x not in set(seen)]
        self.assertEqual(len(missing), 0, f"{len(missing)} missing (publish order {missing[:5]}..{missing[-5:]}), "
                                  f"{len(seen)} received, killed at {at_kill}\n{m.log()[-2000:]}")
        dups = len(seen) - len(set(seen))
        print(f"mosquitto crash: {total} events, killed at {at_kill} delivered, {len(seen)} received, "
              f"{dups} duplicates, {channels(node)['mq']['retried']} retried")
        self.assertEqual(set(seen), set(ids))


class DownTest(BridgeTestCase):
    def test_broker_down_retries_then_delivers(self):
        r = self.broker(Redis(self.btmp), start=False)
        m = self.broker(Mosquitto(self.btmp), start=False)
        node = self.node_with([bridge("rs", "redis", {"url": r.url, "stream": "s", "timeout_ms": 500}),
                               bridge("mq", "mqtt", {"url": m.url, "timeout_ms": 500})])
        pub = self.publisher(node)
        ids = self.publish(pub, 50)
        names = ("rs", "mq")
        self.assertTrue(wait_for(lambda: all(channels(node)[n]["retried"] > 0 for n in names), timeout=15),
                        channels(node))
        st = channels(node)
        for n in names:
            self.assertEqual(st[n]["delivered"], 0)
            self.assertEqual(st[n]["pending"], 50, st[n])
            self.assertEqual(st[n]["dead"], 0)
            self.assertEqual(node.metric("evmesh_channel_pending", channel=n), 50)
            self.assertGreater(node.metric("evmesh_channel_retried_total", channel=n), 0)
            log = json.loads(node.http(f"/channels/{n}/log?limit=1"))
            self.assertEqual(log[0]["outcome"], "retry", log)
        self.assertIn("connect", json.loads(node.http("/channels/rs/log?limit=1"))[0]["detail"])
        self.assertIn("not connected", json.loads(node.http("/channels/mq/log?limit=1"))[0]["detail"])
        r.start()
        m.start()
        for n in names:
            self.delivered(node, n, 50, timeout=30)
        self.assertEqual(len({f[b"id"] for _, f in r.client().xrange("s")}), 50)
        self.assertEqual(channels(node)["mq"]["pending"], 0)
        self.assertTrue(ids)


class ConfigTest(BridgeTestCase):
    def run_node(self, plugin, settings):
        path = channel_config(self.tmp, [{"name": "b", "plugin": plugin, "topics": ["x.>"], "settings": settings}])
        p = subprocess.run([NODE, "--config", path, "--no-mesh", "--pub-endpoint", "tcp://127.0.0.1:*",
                            "--sub-endpoint", "tcp://127.0.0.1:*", "--mesh", self.mesh],
                           capture_output=True, text=True, timeout=20)
        return p.returncode, p.stderr

    def test_misconfigured_bridges_stop_the_node_with_one_line(self):
        cases = [
            ("redis", {}, "redis: settings.url is required"),
            ("redis", {"url": "http://x"}, "redis: settings.url must be redis://"),
            ("redis", {"url": "redis://127.0.0.1:1", "stream": "a{nope}"}, "redis: settings.stream has an unknown field {nope}"),
            ("redis", {"url": "redis://127.0.0.1:1", "bogus": 1}, "redis: unknown setting settings.bogus"),
            ("redis", {"url": "redis://127.0.0.1:1", "maxlen": -1}, "redis: settings.maxlen must be between"),
            ("mqtt", {}, "mqtt: settings.url is required"),
            ("mqtt", {"url": "mqtt://127.0.0.1:1", "topic": "a/{topic"}, "mqtt: settings.topic has an unclosed '{'"),
            ("mqtt", {"url": "mqtt://127.0.0.1:1", "topic": "a/#"}, "mqtt: settings.topic must not contain the wildcards"),
            ("mqtt", {"url": "mqtt://127.0.0.1:1", "qos": 0}, "mqtt: settings.qos must be between 1 and 2"),
            ("mqtt", {"url": "mqtt://127.0.0.1:1", "mode": "x"}, "mqtt: settings.mode must be one of"),
        ]
        for plugin, settings, needle in cases:
            rc, err = self.run_node(plugin, settings)
            self.assertEqual(rc, 2, (plugin, settings, err))
            self.assertIn(needle, err, (plugin, settings))
            self.assertEqual(len(err.strip().splitlines()), 1, err)


if __name__ == "__main__":
    main()
