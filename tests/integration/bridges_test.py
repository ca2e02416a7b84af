#!/usr/bin/python3
"""Outbound broker bridges (docs/BRIDGES.md): real brokers started by the test on free loopback
ports (mosquitto, redis-server, nats-server with JetStream, rabbitmq-server, and librdkafka's mock
cluster for Kafka), a real evmesh-node with the bridge channel, and an independent client of each
broker (paho-mqtt, redis-py, pika, a raw NATS protocol client, a librdkafka consumer) counting what
arrived: every id exactly once (or at least once after a broker crash, with duplicates reported),
attributes and headers checked. Brokers are killed by process group at the end, even on failure."""
import base64
import json
import shutil
import subprocess
import tempfile
import threading
import time
import uuid

import msgpack
import zmq

from broker_helpers import KafkaMock, Mosquitto, Nats, NatsClient, Rabbit, Redis, parse_nats_headers, stop_all
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
        if not wait_for(lambda: channels(node)[name]["delivered"] >= n, timeout=timeout, step=0.05):
            # what the channel last saw says why (the broker refusing, not up yet, a timeout)
            self.fail((channels(node)[name], json.loads(node.http(f"/channels/{name}/log?limit=3"))))

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

    def test_attribute_values_that_are_not_mqtt_strings(self):
        m = self.broker(Mosquitto(self.btmp))
        got = self.subscriber(m, "odd/#")
        node = self.node_with([bridge("mq", "mqtt", {"url": m.url, "topic": "odd/{topic}"})])
        pub = self.publisher(node)
        eid = uuid.uuid4().bytes
        body = msgpack.packb([1, eid, "it/bridges", time.time_ns(), 0, "text/plain",
                              {"tenant": "a\tb\u0085c"}, b"x"], use_bin_type=True)
        pub.sock.send_multipart([b"orders.odd", body])
        self.delivered(node, "mq", 1)
        self.assertTrue(wait_for(lambda: len(got()) == 1, timeout=10))
        props = dict(got()[0].properties.UserProperty)
        self.assertEqual(props["id"], str(uuid.UUID(bytes=eid)))
        self.assertEqual(props["tenant"], "a b??c")  # TAB and the C1 control (2 bytes) replaced

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


def nats_stream_messages(client, stream):
    """Every message of a JetStream stream, through the JetStream API (STREAM.INFO, MSG.GET)."""
    info = client.request(f"$JS.API.STREAM.INFO.{stream}")
    out = []
    for seq in range(info["state"]["first_seq"], info["state"]["last_seq"] + 1):
        m = client.request(f"$JS.API.STREAM.MSG.GET.{stream}", json.dumps({"seq": seq}).encode())["message"]
        out.append({"subject": m["subject"], "data": base64.b64decode(m.get("data", "")),
                    "headers": parse_nats_headers(base64.b64decode(m["hdrs"])) if m.get("hdrs") else {}})
    return out


class NatsTest(BridgeTestCase):
    def check_headers(self, h):
        self.assertEqual(h["ce-specversion"], "1.0")
        self.assertEqual(h["ce-source"], "it/bridges")
        self.assertEqual(h["ce-type"], "orders.eu.created")
        self.assertEqual(h["ce-tenant"], "acme")
        self.assertEqual(h["content-type"], "application/json")
        self.assertIn("ce-time", h)

    def test_core_publish_every_event_with_headers(self):
        n = self.broker(Nats(self.btmp))
        sub = NatsClient(n.port)
        self.addCleanup(sub.close)
        sub.subscribe("evm.>")
        sub.flush()
        node = self.node_with([bridge("nc", "nats", {"url": n.url, "subject": "evm.{topic.1}.{data.customer.id}"})])
        pub = self.publisher(node)
        ids = self.publish(pub, 300)
        got = []
        while len(got) < 300:
            m = sub.next()
            if m is not None:
                got.append(m)
        for m in got:
            self.check_headers(m["headers"])
            self.assertEqual(m["subject"], f"evm.eu.{json.loads(m['data'])['customer']['id']}")
        self.assert_exactly([m["headers"]["ce-id"] for m in got], ids)
        self.delivered(node, "nc", 300)

    def test_jetstream_acked_and_survives_a_server_sigkill(self):
        n = self.broker(Nats(self.btmp, jetstream=True))
        admin = NatsClient(n.port)
        created = admin.request("$JS.API.STREAM.CREATE.EVM", json.dumps(
            {"name": "EVM", "subjects": ["js.>"], "storage": "file", "duplicate_window": 120_000_000_000}).encode())
        self.assertNotIn("error", created, created)
        admin.close()
        node = self.node_with([bridge("js", "nats", {"url": n.url, "subject": "js.{topic}", "jetstream": True,
                                                     "stream": "EVM", "timeout_ms": 2000}, concurrency=16)])
        pub = self.publisher(node)
        total = 2000
        ids = self.publish(pub, total)
        self.assertTrue(wait_for(lambda: channels(node)["js"]["delivered"] >= total * 0.3, timeout=30, step=0.005))
        n.kill()
        at_kill = channels(node)["js"]["delivered"]
        time.sleep(1.0)
        n.start()
        self.delivered(node, "js", total, timeout=60)
        client = NatsClient(n.port)
        self.addCleanup(client.close)
        msgs = nats_stream_messages(client, "EVM")
        seen = [m["headers"]["ce-id"] for m in msgs]
        dups = len(seen) - len(set(seen))
        st = channels(node)["js"]
        print(f"nats jetstream crash: {total} events, killed at {at_kill} delivered, {len(seen)} stored, "
              f"{dups} duplicates (Nats-Msg-Id de-duplication), {st['retried']} retried")
        self.assertEqual(set(seen), set(ids))
        for m in msgs[:50]:
            self.check_headers(m["headers"])
            self.assertEqual(m["headers"]["Nats-Msg-Id"], m["headers"]["ce-id"])
            self.assertEqual(m["subject"], "js.orders.eu.created")

    def test_jetstream_without_a_stream_is_retried(self):
        n = self.broker(Nats(self.btmp, jetstream=True))
        node = self.node_with([bridge("js", "nats", {"url": n.url, "subject": "nostream.{topic}", "jetstream": True,
                                                     "timeout_ms": 500})])
        pub = self.publisher(node)
        self.publish(pub, 5)
        self.assertTrue(wait_for(lambda: channels(node)["js"]["retried"] >= 5, timeout=15), channels(node))
        self.assertEqual(channels(node)["js"]["delivered"], 0)
        log = json.loads(node.http("/channels/js/log?limit=1"))[0]
        self.assertEqual(log["outcome"], "retry")
        self.assertIn("No responders", log["detail"])


class KafkaTest(BridgeTestCase):
    def test_idempotent_producer_with_cloudevents_headers_and_keys(self):
        k = self.broker(KafkaMock(self.btmp, topics=["evm.orders"]))
        node = self.node_with([bridge("kf", "kafka", {"brokers": k.bootstrap, "topic": "evm.{topic.0}",
                                                      "key": "{data.customer.id}"}, concurrency=32)])
        pub = self.publisher(node)
        ids = self.publish(pub, 500)
        self.delivered(node, "kf", 500)
        recs = k.consume("evm.orders", 500)
        partition_of_key = {}
        for rec in recs:
            h = rec["headers"]
            self.assertEqual(h["ce_specversion"], "1.0")
            self.assertEqual(h["ce_source"], "it/bridges")
            self.assertEqual(h["ce_type"], "orders.eu.created")
            self.assertEqual(h["ce_tenant"], "acme")
            self.assertEqual(h["content-type"], "application/json")
            self.assertIn("ce_time", h)
            self.assertEqual(rec["key"], json.loads(rec["value"])["customer"]["id"])
            # one key, one partition: the order of one key's records is kept
            self.assertEqual(partition_of_key.setdefault(rec["key"], rec["partition"]), rec["partition"])
        self.assert_exactly([r["headers"]["ce_id"] for r in recs], ids)
        st = channels(node)["kf"]
        self.assertEqual((st["delivered"], st["retried"], st["pending"]), (500, 0, 0))


class AmqpTest(BridgeTestCase):
    def test_publisher_confirms_routing_and_failures(self):
        rb = self.broker(Rabbit(self.btmp))
        conn, ch = rb.channel()
        self.addCleanup(lambda: conn.is_open and conn.close())
        ch.exchange_declare("evm", exchange_type="topic", durable=True)
        ch.queue_declare("orders", durable=True)
        ch.queue_bind("orders", "evm", routing_key="orders.#")
        node = self.node_with([
            bridge("am", "amqp", {"url": rb.url, "exchange": "evm", "routing_key": "{topic}.{data.customer.id}"},
                   concurrency=8),
            bridge("unroutable", "amqp", {"url": rb.url, "exchange": "evm", "routing_key": "nowhere.{id}"},
                   topics=["orders.eu.x"], breaker={"failures": 0}),
            bridge("noexchange", "amqp", {"url": rb.url, "exchange": "missing-{topic.0}"},
                   topics=["orders.eu.x"], breaker={"failures": 0})])
        pub = self.publisher(node)
        ids = self.publish(pub, 300)
        self.publish(pub, 2, topic="orders.eu.x")
        self.delivered(node, "am", 302)
        got = []
        while True:
            method, props, body = ch.basic_get("orders", auto_ack=True)
            if method is None:
                break
            got.append((method, props, body))
        main_lane = [g for g in got if g[1].type == "orders.eu.created"]
        for method, props, body in main_lane:
            h = props.headers
            self.assertEqual(h["cloudEvents_specversion"], "1.0")
            self.assertEqual(h["cloudEvents_source"], "it/bridges")
            self.assertEqual(h["cloudEvents_type"], "orders.eu.created")
            self.assertEqual(h["cloudEvents_tenant"], "acme")
            self.assertEqual(props.message_id, h["cloudEvents_id"])
            self.assertEqual(props.content_type, "application/json")
            self.assertEqual(props.delivery_mode, 2)
            self.assertEqual(method.routing_key, f"orders.eu.created.{json.loads(body)['customer']['id']}")
        self.assert_exactly([g[1].message_id for g in main_lane], ids)
        # unroutable (mandatory, basic.return) and a missing exchange (channel closed 404): retried
        self.assertTrue(wait_for(lambda: channels(node)["unroutable"]["retried"] >= 2 and
                                 channels(node)["noexchange"]["retried"] >= 2, timeout=15), channels(node))
        for name, code, text in (("unroutable", 312, "NO_ROUTE"), ("noexchange", 404, "NOT_FOUND")):
            st = channels(node)[name]
            self.assertEqual(st["delivered"], 0)
            log = json.loads(node.http(f"/channels/{name}/log?limit=1"))[0]
            self.assertEqual((log["outcome"], log["code"]), ("retry", code), log)
            self.assertIn(text, log["detail"])
        conn.close()


    def test_rabbitmq_sigkill_mid_stream_loses_nothing(self):
        rb = self.broker(Rabbit(self.btmp))
        conn, ch = rb.channel()
        ch.queue_declare("crash", durable=True)  # the default exchange routes by queue name
        conn.close()
        node = self.node_with([bridge("am", "amqp", {"url": rb.url, "routing_key": "crash", "timeout_ms": 2000},
                                      concurrency=16)])
        pub = self.publisher(node)
        total = 2000
        ids = self.publish(pub, total)
        self.assertTrue(wait_for(lambda: channels(node)["am"]["delivered"] >= total * 0.3, timeout=30, step=0.005))
        rb.kill()
        at_kill = channels(node)["am"]["delivered"]
        time.sleep(1.0)
        rb.start()
        # a restarted RabbitMQ recovers its durable queue after it accepts connections; on a
        # loaded 2-core machine that took up to a minute and more
        self.delivered(node, "am", total, timeout=180)
        conn, ch = rb.channel()
        seen = []
        while True:
            method, props, _ = ch.basic_get("crash", auto_ack=True)
            if method is None:
                break
            seen.append(props.message_id)
        conn.close()
        dups = len(seen) - len(set(seen))
        print(f"rabbitmq crash: {total} events, killed at {at_kill} delivered, {len(seen)} in the queue, "
              f"{dups} duplicates, {channels(node)['am']['retried']} retried")
        self.assertEqual(set(seen), set(ids))


class DownTest(BridgeTestCase):
    def test_broker_down_retries_then_delivers(self):
        r = self.broker(Redis(self.btmp), start=False)
        m = self.broker(Mosquitto(self.btmp), start=False)
        n = self.broker(Nats(self.btmp), start=False)
        dead = free_port()
        node = self.node_with([bridge("rs", "redis", {"url": r.url, "stream": "s", "timeout_ms": 500}),
                               bridge("mq", "mqtt", {"url": m.url, "timeout_ms": 500}),
                               bridge("nc", "nats", {"url": n.url, "timeout_ms": 500}),
                               bridge("am", "amqp", {"url": f"amqp://127.0.0.1:{dead}", "timeout_ms": 500}),
                               bridge("kf", "kafka", {"brokers": f"127.0.0.1:{dead}", "topic": "t",
                                                      "timeout_ms": 1000})])
        pub = self.publisher(node)
        ids = self.publish(pub, 50)
        names = ("rs", "mq", "nc", "am", "kf")
        self.assertTrue(wait_for(lambda: all(channels(node)[n]["retried"] > 0 for n in names), timeout=15),
                        channels(node))
        st = channels(node)
        for name in names:
            self.assertEqual(st[name]["delivered"], 0)
            self.assertEqual(st[name]["pending"], 50, st[name])
            self.assertEqual(st[name]["dead"], 0)
            self.assertEqual(node.metric("evmesh_channel_pending", channel=name), 50)
            self.assertGreater(node.metric("evmesh_channel_retried_total", channel=name), 0)
            log = json.loads(node.http(f"/channels/{name}/log?limit=1"))
            self.assertEqual(log[0]["outcome"], "retry", log)
        self.assertIn("connect", json.loads(node.http("/channels/rs/log?limit=1"))[0]["detail"])
        self.assertIn("not connected", json.loads(node.http("/channels/mq/log?limit=1"))[0]["detail"])
        self.assertIn("not connected", json.loads(node.http("/channels/nc/log?limit=1"))[0]["detail"])
        self.assertIn("connect", json.loads(node.http("/channels/am/log?limit=1"))[0]["detail"])
        self.assertIn("timed out", json.loads(node.http("/channels/kf/log?limit=1"))[0]["detail"])
        r.start()
        m.start()
        n.start()
        for name in ("rs", "mq", "nc"):
            self.delivered(node, name, 50, timeout=30)
        self.assertEqual(len({f[b"id"] for _, f in r.client().xrange("s")}), 50)
        self.assertEqual(channels(node)["mq"]["pending"], 0)
        self.assertTrue(ids)


class LifecycleTest(BridgeTestCase):
    def dead_bridges(self):
        dead = free_port()
        return [bridge("rs", "redis", {"url": f"redis://127.0.0.1:{dead}", "timeout_ms": 500}),
                bridge("mq", "mqtt", {"url": f"mqtt://127.0.0.1:{dead}", "timeout_ms": 500}),
                bridge("nc", "nats", {"url": f"nats://127.0.0.1:{dead}", "timeout_ms": 500, "jetstream": True}),
                bridge("am", "amqp", {"url": f"amqp://127.0.0.1:{dead}", "timeout_ms": 500}),
                bridge("kf", "kafka", {"brokers": f"127.0.0.1:{dead}", "topic": "t", "timeout_ms": 1000})]

    def test_check_config_and_sigterm_with_every_broker_down(self):
        # --check-config runs each plugin's create and destroy: no broker needed, no hang
        cfg = channel_config(self.tmp, self.dead_bridges())
        t0 = time.monotonic()
        p = subprocess.run([NODE, "--check-config", cfg], capture_output=True, text=True, timeout=30)
        self.assertEqual(p.returncode, 0, p.stderr)
        self.assertLess(time.monotonic() - t0, 10)
        node = self.node_with(self.dead_bridges())
        pub = self.publisher(node)
        self.publish(pub, 10)
        self.assertTrue(wait_for(lambda: all(c["retried"] > 0 for c in channels(node).values()), timeout=15),
                        channels(node))
        # a stop while every bridge is reconnecting ends promptly, and nothing is lost
        t0 = time.monotonic()
        node.proc.terminate()
        self.assertEqual(node.proc.wait(timeout=20), 0, node.log()[-2000:])
        self.assertLess(time.monotonic() - t0, 10)
        node = self.node_with(self.dead_bridges())
        self.assertTrue(all(c["pending"] == 10 for c in channels(node).values()), channels(node))

    def test_a_destination_no_retry_can_fix_is_dead_lettered_at_once(self):
        r = self.broker(Redis(self.btmp))
        node = self.node_with([bridge("rs", "redis", {"url": r.url, "stream": "{header.nope}"}),
                               bridge("mq", "mqtt", {"url": "mqtt://127.0.0.1:1", "topic": "{header.nope}"})])
        pub = self.publisher(node)
        self.publish(pub, 3)
        # checked before anything is sent: the mqtt broker need not even be up
        self.assertTrue(wait_for(lambda: channels(node)["rs"]["dead"] == 3 and channels(node)["mq"]["dead"] == 3,
                                 timeout=10), channels(node))
        dead = json.loads(node.http("/channels/rs/dead?limit=10"))
        self.assertEqual([d["attempts"] for d in dead], [1, 1, 1])
        self.assertIn("expanded to an empty key", dead[0]["last_detail"])
        self.assertEqual(r.client().dbsize(), 0)


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
            ("nats", {}, "nats: settings.url is required"),
            ("nats", {"url": "nats://127.0.0.1:1", "subject": "a.*"}, "nats: settings.subject must not contain wildcards"),
            ("nats", {"url": "nats://127.0.0.1:1", "subject": "{data.}"}, "nats: settings.subject has an empty key"),
            ("nats", {"url": "nats://127.0.0.1:1", "stream": "S"}, "nats: settings.stream needs jetstream = true"),
            ("amqp", {}, "amqp: settings.url is required"),
            ("amqp", {"url": "http://x"}, "amqp: settings.url must be amqp://"),
            ("amqp", {"url": "amqp://127.0.0.1:1", "routing_key": "}"}, "amqp: settings.routing_key has a lone '}'"),
            ("amqp", {"url": "amqp://127.0.0.1:1", "exchange_type": "topic"}, "amqp: unknown setting settings.exchange_type"),
            ("kafka", {"topic": "t"}, "kafka: settings.brokers is required"),
            ("kafka", {"brokers": "127.0.0.1:1"}, "kafka: settings.topic is required"),
            ("kafka", {"brokers": "127.0.0.1:1", "topic": "a b"}, "kafka: settings.topic may only contain"),
            ("kafka", {"brokers": "127.0.0.1:1", "topic": "t", "key": "{nope}"}, "kafka: settings.key has an unknown field"),
            ("kafka", {"brokers": "127.0.0.1:1", "topic": "t", "properties": {"acks": "many"}},
             "kafka: settings.properties.acks is refused by librdkafka"),
            ("kafka", {"brokers": "127.0.0.1:1", "topic": "t", "properties": {"enable.idempotence": "false"}},
             "kafka: settings.properties.enable.idempotence must stay true"),
        ]
        for plugin, settings, needle in cases:
            rc, err = self.run_node(plugin, settings)
            self.assertEqual(rc, 2, (plugin, settings, err))
            self.assertIn(needle, err, (plugin, settings))
            self.assertEqual(len(err.strip().splitlines()), 1, err)


if __name__ == "__main__":
    main()
