#!/usr/bin/python3
"""Inbound bridges (docs/BRIDGES.md "Into the mesh"): [[source]] tables of evmesh-node that consume
from a real broker started by the test on free loopback ports (mosquitto, redis-server, nats-server,
rabbitmq-server; for Kafka librdkafka's mock cluster, tests/support/kafka_mock.cpp) and publish
into the mesh. What arrived is counted by id at a ZeroMQ subscriber of the node: round trips, ids
(CloudEvents ids kept, otherwise derived from the broker position), an evmesh-node killed with
SIGKILL mid-stream and restarted (nothing the broker handed over is lost; duplicates allowed and
counted), undecodable messages counted or dead-lettered, a broker down at start. Every process is
started by the test and killed by its PID (brokers by process group) at the end."""
import collections
import hashlib
import json
import os
import shutil
import signal
import subprocess
import tempfile
import threading
import time
import uuid

import msgpack
import zmq

from broker_helpers import KafkaMock, Mosquitto, Nats, NatsClient, Rabbit, Redis, stop_all
from evmesh_testlib import NODE, Node, NodeTestCase, free_port, main, read_line, wait_for


def ce_event_id(source, ce_id):
    """nodes/evmesh-node/cloudevents_http.cpp ce_event_id: the id itself when it is a UUID, else
    SHA-256 of source NUL id as a version 8 UUID."""
    raw = ce_id if isinstance(ce_id, bytes) else ce_id.encode()
    try:
        if len(raw) == 36:
            return str(uuid.UUID(raw.decode()))
    except (ValueError, UnicodeDecodeError):
        pass
    d = bytearray(hashlib.sha256(source.encode() + b"\0" + raw).digest()[:16])
    d[6] = (d[6] & 0x0F) | 0x80
    d[8] = (d[8] & 0x3F) | 0x80
    return str(uuid.UUID(bytes=bytes(d)))


def mqtt_id(topic, payload):
    return ce_event_id("evmesh:mqtt", topic + "#" + ce_event_id("mqtt-payload", payload))


def nats_core_id(subject, payload):
    return ce_event_id("evmesh:nats", subject + "#" + ce_event_id("nats-payload", payload))


def nats_js_id(stream, seq):
    return ce_event_id("evmesh:nats", f"nats-js/{stream}/{seq}")


def amqp_id(message_id=None, routing_key=None, body=None):
    if message_id is not None:
        return ce_event_id("evmesh:amqp", message_id)
    return ce_event_id("evmesh:amqp", routing_key + "#" + ce_event_id("amqp-payload", body))


def redis_id(stream, entry_id):
    return ce_event_id("evmesh:redis", f"redis/{stream}/{entry_id}")


def kafka_id(topic, partition, offset):
    return ce_event_id("evmesh:kafka", f"kafka/{topic}/{partition}/{offset}")


class Subscriber:
    """A SUB socket at the node's client endpoint, collecting (topic, id, event) in a thread. It
    reconnects by itself when the node restarts on the same port."""

    def __init__(self, ctx, endpoint, prefixes):
        self.sock = ctx.socket(zmq.SUB)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.setsockopt(zmq.RCVHWM, 0)
        self.sock.setsockopt(zmq.RECONNECT_IVL, 50)
        for p in prefixes:
            self.sock.setsockopt(zmq.SUBSCRIBE, p.encode())
        self.sock.connect(endpoint)
        self.events = []
        self.lock = threading.Lock()
        self.stop = False
        self.thread = threading.Thread(target=self.run, daemon=True)
        self.thread.start()

    def run(self):
        poller = zmq.Poller()
        poller.register(self.sock, zmq.POLLIN)
        while not self.stop:
            if not poller.poll(100):
                continue
            topic, body = self.sock.recv_multipart()
            ev = msgpack.unpackb(body, raw=False)
            with self.lock:
                self.events.append((topic.decode(), str(uuid.UUID(bytes=ev[1])), ev))

    def ids(self, topic=None):
        with self.lock:
            return [i for t, i, _ in self.events if topic is None or t == topic]

    def by_id(self, eid):
        with self.lock:
            for t, i, ev in self.events:
                if i == eid:
                    return t, ev
        return None

    def close(self):
        self.stop = True
        self.thread.join(5)
        self.sock.close()


def source_config(tmp, sources, name="sources.toml"):
    lines = []
    for s in sources:
        lines.append("[[source]]")
        for k, v in s.items():
            if isinstance(v, dict):  # an inline table of strings
                v = "{ " + ", ".join(f"{json.dumps(a)} = {json.dumps(b)}" for a, b in v.items()) + " }"
                lines.append(f"{k} = {v}")
            else:
                lines.append(f"{k} = {json.dumps(v)}")
        lines.append("")
    path = os.path.join(tmp, name)
    with open(path, "w") as f:
        f.write("\n".join(lines))
    return path


class SourceTestCase(NodeTestCase):
    def setUp(self):
        super().setUp()
        self.ctx = zmq.Context()
        self.subs = []
        self.brokers = []
        self.btmp = tempfile.mkdtemp(prefix="evmesh-sources-")
        self.sub_port = free_port()

    def tearDown(self):
        for s in self.subs:
            s.close()
        self.ctx.destroy(linger=0)
        super().tearDown()
        stop_all(self.brokers)
        shutil.rmtree(self.btmp, ignore_errors=True)

    def broker(self, b, start=True):
        self.brokers.append(b)
        return b.start() if start else b

    def node(self, sources, name="n0"):
        """evmesh-node with the sources, its client subscriber endpoint on a fixed port (a restarted
        node is found again by the same subscriber)."""
        cfg = source_config(self.tmp, sources)
        args = [NODE, "--name", name, "--mesh", self.mesh, "--beacon-port", str(self.beacon_port), "--no-mesh",
                "--pub-endpoint", "tcp://127.0.0.1:*", "--sub-endpoint", f"tcp://127.0.0.1:{self.sub_port}",
                "--log-level", "debug", "--http", "127.0.0.1:0", "--config", cfg]
        err = os.path.join(self.tmp, f"{name}-{len(self.procs)}.log")
        with open(err, "w") as errf:
            p = self.spawn(args, stdout=subprocess.PIPE, stderr=errf)
        line = read_line(p, 30)
        if not line.startswith(b"READY "):
            p.kill()
            with open(err) as f:
                raise AssertionError(f"{name} did not become ready: {line!r}\n{f.read()}")
        return Node(p, json.loads(line[6:]), err)

    def subscriber(self, node, prefixes):
        s = Subscriber(self.ctx, node.sub, prefixes)
        self.subs.append(s)
        return s

    def kill9(self, node):
        os.kill(node.pid, signal.SIGKILL)
        node.proc.wait(10)

    def events_metric(self, node, source, outcome):
        return node.metric("evmesh_source_events_total", source=source, outcome=outcome)


def mqtt_client(broker, client_id):
    import paho.mqtt.client as mqtt
    c = mqtt.Client(client_id=client_id, protocol=mqtt.MQTTv5)
    c.connect("127.0.0.1", broker.port)
    c.loop_start()
    return c


def mqtt_publish(c, topic, payload, user_properties=None, content_type=None):
    from paho.mqtt.packettypes import PacketTypes
    from paho.mqtt.properties import Properties
    props = None
    if user_properties or content_type:
        props = Properties(PacketTypes.PUBLISH)
        if user_properties:
            props.UserProperty = user_properties
        if content_type:
            props.ContentType = content_type
    info = c.publish(topic, payload, qos=1, properties=props)
    return info


def mqtt_source(broker, **kw):
    s = {"name": "m", "type": "mqtt", "url": broker.url, "subscribe": "sensors/#", "wait_for_subscribers": True}
    s.update(kw)
    return s


class MqttSourceTest(SourceTestCase):
    def test_round_trip_ids_cloudevents_undecodable(self):
        m = self.broker(Mosquitto(self.btmp))
        node = self.node([mqtt_source(m)])
        sub = self.subscriber(node, ["sensors.", "orders."])
        self.assertTrue(wait_for(lambda: self.events_metric(node, "m", "published") >= 0 and
                                 node.metric("evmesh_source_connected", source="m") == 1, timeout=30, step=0.1),
                        node.log()[-3000:])
        c = mqtt_client(m, "it-pub")
        want = {}
        infos = []
        for i in range(200):
            payload = json.dumps({"n": i}).encode()
            infos.append(mqtt_publish(c, "sensors/hall/temp", payload))
            want[mqtt_id("sensors/hall/temp", payload)] = "sensors.hall.temp"
        # a structured CloudEvent: its id and type are kept
        ce = {"specversion": "1.0", "id": "ce-123", "source": "it/mqtt", "type": "orders.created",
              "datacontenttype": "application/json", "data": {"x": 1}}
        infos.append(mqtt_publish(c, "sensors/ce", json.dumps(ce).encode()))
        want[ce_event_id("it/mqtt", "ce-123")] = "orders.created"
        # binary mode: the attributes as MQTT 5 user properties
        infos.append(mqtt_publish(c, "sensors/bin", b"raw", content_type="text/plain",
                                  user_properties=[("specversion", "1.0"), ("id", "bin-7"), ("source", "it/bin"),
                                                   ("type", "orders.binary")]))
        want[ce_event_id("it/bin", "bin-7")] = "orders.binary"
        # undecodable: a CloudEvent without its type
        infos.append(mqtt_publish(c, "sensors/bad", json.dumps({"specversion": "1.0", "id": "x"}).encode()))
        for info in infos:
            info.wait_for_publish(30)
        self.assertTrue(wait_for(lambda: set(want) <= set(sub.ids()), timeout=60, step=0.1),
                        f"{len(set(want) - set(sub.ids()))} missing\n{node.log()[-3000:]}")
        for eid, topic in want.items():
            self.assertEqual(sub.by_id(eid)[0], topic)
        self.assertEqual(len(sub.ids()), len(want), "duplicates without a restart")
        _, ev = sub.by_id(ce_event_id("it/mqtt", "ce-123"))
        self.assertEqual(ev[2], "it/mqtt")  # source
        self.assertEqual(json.loads(ev[7]), {"x": 1})
        self.assertEqual(ev[6].get("ceid"), "ce-123")
        _, ev = sub.by_id(ce_event_id("it/bin", "bin-7"))
        self.assertEqual((ev[5], ev[7]), ("text/plain", b"raw"))
        self.assertTrue(wait_for(lambda: self.events_metric(node, "m", "undecodable") == 1, timeout=30, step=0.1))
        self.assertEqual(self.events_metric(node, "m", "published"), len(want))
        self.assertIn("undecodable message", node.log())
        c.loop_stop()
        c.disconnect()

    def test_kill9_mid_stream_nothing_lost(self):
        m = self.broker(Mosquitto(self.btmp))
        node = self.node([mqtt_source(m)])
        sub = self.subscriber(node, ["sensors."])
        self.assertTrue(wait_for(lambda: node.metric("evmesh_source_connected", source="m") == 1, timeout=30, step=0.1))
        c = mqtt_client(m, "it-pub")
        n = 1500
        want = []
        done = threading.Event()

        def produce():
            infos = []
            for i in range(n):
                payload = f"reading {i}".encode()
                infos.append(mqtt_publish(c, f"sensors/s{i % 5}", payload))
                want.append(mqtt_id(f"sensors/s{i % 5}", payload))
                if i % 50 == 49:
                    time.sleep(0.01)  # a stream, not one burst
            for info in infos:
                info.wait_for_publish(60)
            done.set()

        t = threading.Thread(target=produce)
        t.start()
        self.assertTrue(wait_for(lambda: len(sub.ids()) >= n * 0.3, timeout=60, step=0.01))
        self.kill9(node)
        at_kill = len(set(sub.ids()))
        node = self.node([mqtt_source(m)])
        t.join(120)
        self.assertTrue(done.is_set())
        self.assertTrue(wait_for(lambda: set(want) <= set(sub.ids()), timeout=90, step=0.1),
                        f"{len(set(want) - set(sub.ids()))} of {n} missing\n{node.log()[-3000:]}")
        ids = sub.ids()
        print(f"mqtt: {n} messages, node killed after {at_kill}, {len(ids) - len(set(ids))} duplicates")
        c.loop_stop()
        c.disconnect()

    def test_broker_down_at_start(self):
        m = self.broker(Mosquitto(self.btmp), start=False)
        node = self.node([mqtt_source(m)])
        sub = self.subscriber(node, ["sensors."])
        self.assertTrue(wait_for(lambda: "not connected" in node.log(), timeout=30, step=0.1), node.log()[-2000:])
        self.assertEqual(node.metric("evmesh_source_connected", source="m"), 0)
        m.start()
        self.assertTrue(wait_for(lambda: node.metric("evmesh_source_connected", source="m") == 1, timeout=30, step=0.1),
                        node.log()[-3000:])
        c = mqtt_client(m, "it-pub")
        mqtt_publish(c, "sensors/late", b"hello").wait_for_publish(30)
        self.assertTrue(wait_for(lambda: mqtt_id("sensors/late", b"hello") in sub.ids(), timeout=30, step=0.1))
        c.loop_stop()
        c.disconnect()


def redis_source(broker, **kw):
    s = {"name": "r", "type": "redis", "url": broker.url, "stream": "orders:in", "group": "evmesh",
         "wait_for_subscribers": True}
    s.update(kw)
    return s


class RedisSourceTest(SourceTestCase):
    def test_round_trip_ids_cloudevents_dead_letter(self):
        r = self.broker(Redis(self.btmp))
        db = r.client()
        self.addCleanup(db.close)
        node = self.node([redis_source(r, dead_letter="dead.redis")])
        sub = self.subscriber(node, ["orders.", "dead."])
        self.assertTrue(wait_for(lambda: node.metric("evmesh_source_connected", source="r") == 1, timeout=30, step=0.1),
                        node.log()[-3000:])
        want = {}
        for i in range(300):
            eid = db.xadd("orders:in", {"data": json.dumps({"n": i})}).decode()
            want[redis_id("orders:in", eid)] = "orders.in"
        # the fields of the redis bridge (binary mode): a CloudEvent, its id kept
        db.xadd("orders:in", {"specversion": "1.0", "id": "r-ce-1", "source": "it/redis", "type": "orders.ce",
                              "datacontenttype": "application/json", "data": '{"y":2}'})
        want[ce_event_id("it/redis", "r-ce-1")] = "orders.ce"
        bad = db.xadd("orders:in", {"payload": "no data field"}).decode()
        self.assertTrue(wait_for(lambda: set(want) <= set(sub.ids()), timeout=60, step=0.1),
                        f"{len(set(want) - set(sub.ids()))} missing\n{node.log()[-3000:]}")
        for eid, topic in want.items():
            self.assertEqual(sub.by_id(eid)[0], topic)
        self.assertTrue(wait_for(lambda: len(sub.ids("dead.redis")) == 1, timeout=30, step=0.1))
        _, dl = sub.by_id(sub.ids("dead.redis")[0])
        self.assertEqual(dl[6]["position"], f"redis/orders:in/{bad}")
        self.assertIn("no field 'data'", dl[6]["reason"])
        self.assertEqual(len(sub.ids()), len(want) + 1, "duplicates without a restart")
        self.assertTrue(wait_for(lambda: self.events_metric(node, "r", "dead_lettered") == 1, timeout=30, step=0.1))
        # everything acknowledged: nothing pending in the group
        self.assertTrue(wait_for(lambda: db.xpending("orders:in", "evmesh")["pending"] == 0, timeout=30, step=0.1))

    def test_kill9_mid_stream_nothing_lost(self):
        r = self.broker(Redis(self.btmp))
        db = r.client()
        self.addCleanup(db.close)
        n = 3000
        want = []
        pipe = db.pipeline()
        for i in range(n):
            pipe.xadd("orders:in", {"data": f"event {i}"})
        want = [redis_id("orders:in", e.decode()) for e in pipe.execute()]
        node = self.node([redis_source(r, batch=20)])
        sub = self.subscriber(node, ["orders."])
        self.assertTrue(wait_for(lambda: len(sub.ids()) >= n * 0.3, timeout=60, step=0.005))
        self.kill9(node)
        at_kill = len(set(sub.ids()))
        pending = db.xpending("orders:in", "evmesh")["pending"]
        node = self.node([redis_source(r, batch=20)])
        self.assertTrue(wait_for(lambda: set(want) <= set(sub.ids()), timeout=90, step=0.1),
                        f"{len(set(want) - set(sub.ids()))} of {n} missing\n{node.log()[-3000:]}")
        self.assertTrue(wait_for(lambda: db.xpending("orders:in", "evmesh")["pending"] == 0, timeout=30, step=0.1))
        ids = sub.ids()
        print(f"redis: {n} entries, node killed after {at_kill} ({pending} pending), "
              f"{len(ids) - len(set(ids))} duplicates")

    def test_broker_down_at_start(self):
        r = self.broker(Redis(self.btmp), start=False)
        node = self.node([redis_source(r)])
        sub = self.subscriber(node, ["orders."])
        self.assertTrue(wait_for(lambda: "not connected" in node.log(), timeout=30, step=0.1), node.log()[-2000:])
        r.start()
        self.assertTrue(wait_for(lambda: node.metric("evmesh_source_connected", source="r") == 1, timeout=30, step=0.1),
                        node.log()[-3000:])
        db = r.client()
        self.addCleanup(db.close)
        eid = db.xadd("orders:in", {"data": "late"}).decode()
        self.assertTrue(wait_for(lambda: redis_id("orders:in", eid) in sub.ids(), timeout=30, step=0.1))


def nats_pub(client, subject, payload, headers=None):
    """PUB, or HPUB with headers (the NATS protocol), as a request when JetStream should answer."""
    if headers:
        h = "NATS/1.0\r\n" + "".join(f"{k}: {v}\r\n" for k, v in headers.items()) + "\r\n"
        hb = h.encode()
        client.sock.sendall(f"HPUB {subject} {len(hb)} {len(hb) + len(payload)}\r\n".encode() + hb + payload + b"\r\n")
    else:
        client.sock.sendall(f"PUB {subject} {len(payload)}\r\n".encode() + payload + b"\r\n")


def nats_source(broker, **kw):
    s = {"name": "n", "type": "nats", "url": broker.url, "subject": "orders.>", "wait_for_subscribers": True}
    s.update(kw)
    return s


class NatsSourceTest(SourceTestCase):
    def test_core_round_trip_ids_cloudevents(self):
        b = self.broker(Nats(self.btmp))
        node = self.node([nats_source(b)])
        sub = self.subscriber(node, ["orders."])
        self.assertTrue(wait_for(lambda: node.metric("evmesh_source_connected", source="n") == 1, timeout=30, step=0.1),
                        node.log()[-3000:])
        c = NatsClient(b.port)
        want = {}
        for i in range(200):
            payload = f"core {i}".encode()
            nats_pub(c, "orders.core", payload)
            want[nats_core_id("orders.core", payload)] = "orders.core"
        nats_pub(c, "orders.bin", b'{"z":3}', {"ce-specversion": "1.0", "ce-id": "n-ce-1", "ce-source": "it/nats",
                                              "ce-type": "orders.nats.ce", "content-type": "application/json"})
        want[ce_event_id("it/nats", "n-ce-1")] = "orders.nats.ce"
        nats_pub(c, "orders.bad", json.dumps({"specversion": "1.0", "id": "only"}).encode())
        c.flush()
        self.assertTrue(wait_for(lambda: set(want) <= set(sub.ids()), timeout=60, step=0.1),
                        f"{len(set(want) - set(sub.ids()))} missing\n{node.log()[-3000:]}")
        for eid, topic in want.items():
            self.assertEqual(sub.by_id(eid)[0], topic)
        self.assertEqual(len(sub.ids()), len(want))
        _, ev = sub.by_id(ce_event_id("it/nats", "n-ce-1"))
        self.assertEqual((ev[2], ev[5], ev[7]), ("it/nats", "application/json", b'{"z":3}'))
        self.assertTrue(wait_for(lambda: self.events_metric(node, "n", "undecodable") == 1, timeout=30, step=0.1))
        c.close()

    def test_jetstream_kill9_mid_stream_nothing_lost(self):
        b = self.broker(Nats(self.btmp, jetstream=True))
        c = NatsClient(b.port)
        created = c.request("$JS.API.STREAM.CREATE.EVM", json.dumps(
            {"name": "EVM", "subjects": ["js.>"], "storage": "file"}).encode())
        self.assertNotIn("error", created, created)
        n = 1500
        want = []
        for i in range(n):
            ack = c.request(f"js.orders.s{i % 3}", f"js {i}".encode())
            self.assertEqual(ack["stream"], "EVM", ack)
            want.append(nats_js_id("EVM", ack["seq"]))
        cfg = nats_source(b, subject="js.>", jetstream=True, stream="EVM", ack_wait="2s", batch=20)
        node = self.node([cfg])
        sub = self.subscriber(node, ["js."])
        self.assertTrue(wait_for(lambda: len(sub.ids()) >= n * 0.3, timeout=60, step=0.005), node.log()[-3000:])
        self.kill9(node)
        at_kill = len(set(sub.ids()))
        node = self.node([cfg])
        self.assertTrue(wait_for(lambda: set(want) <= set(sub.ids()), timeout=90, step=0.1),
                        f"{len(set(want) - set(sub.ids()))} of {n} missing\n{node.log()[-3000:]}")
        self.assertEqual(sub.by_id(want[0])[0], "js.orders.s0")
        # everything acknowledged: the durable consumer has nothing pending
        info = c.request("$JS.API.CONSUMER.INFO.EVM.evmesh-n0-n")
        self.assertTrue(wait_for(lambda: c.request("$JS.API.CONSUMER.INFO.EVM.evmesh-n0-n")["num_ack_pending"] == 0,
                                 timeout=30, step=0.2), info)
        ids = sub.ids()
        print(f"nats jetstream: {n} messages, node killed after {at_kill}, {len(ids) - len(set(ids))} duplicates")
        c.close()

    def test_jetstream_broker_down_at_start(self):
        b = self.broker(Nats(self.btmp, jetstream=True), start=False)
        node = self.node([nats_source(b, subject="js.>", jetstream=True, stream="EVM")])
        sub = self.subscriber(node, ["js."])
        self.assertTrue(wait_for(lambda: "not connected" in node.log(), timeout=30, step=0.1), node.log()[-2000:])
        b.start()
        c = NatsClient(b.port)
        created = c.request("$JS.API.STREAM.CREATE.EVM", json.dumps(
            {"name": "EVM", "subjects": ["js.>"], "storage": "file"}).encode())
        self.assertNotIn("error", created, created)
        self.assertTrue(wait_for(lambda: node.metric("evmesh_source_connected", source="n") == 1, timeout=30, step=0.1),
                        node.log()[-3000:])
        ack = c.request("js.late", b"late")
        self.assertTrue(wait_for(lambda: nats_js_id("EVM", ack["seq"]) in sub.ids(), timeout=30, step=0.1))
        c.close()


class AmqpSourceTest(SourceTestCase):
    def test_down_at_start_round_trip_and_kill9(self):
        """One RabbitMQ start (slow on a loaded machine) for everything: the broker down when the
        node starts, round trips with every kind of id, an undecodable message, a SIGKILL mid-stream."""
        import pika
        rb = self.broker(Rabbit(self.btmp), start=False)
        cfg = {"name": "a", "type": "amqp", "url": rb.url, "queue": "inq", "batch": 50, "wait_for_subscribers": True}
        node = self.node([cfg])
        sub = self.subscriber(node, ["orders."])
        self.assertTrue(wait_for(lambda: "not connected" in node.log(), timeout=30, step=0.1), node.log()[-2000:])
        rb.start()
        conn, ch = rb.channel()
        ch.exchange_declare("evm", exchange_type="topic", durable=True)
        ch.queue_declare("inq", durable=True)
        ch.queue_bind("inq", "evm", routing_key="orders.#")
        self.assertTrue(wait_for(lambda: node.metric("evmesh_source_connected", source="a") == 1, timeout=60, step=0.1),
                        node.log()[-3000:])
        want = {}
        persistent = pika.BasicProperties(delivery_mode=2)
        body = b"no message id"
        ch.basic_publish("evm", "orders.plain", body, persistent)
        want[amqp_id(routing_key="orders.plain", body=body)] = "orders.plain"
        ch.basic_publish("evm", "orders.bin", b'{"q":1}', pika.BasicProperties(
            delivery_mode=2, content_type="application/json", message_id="ignored-when-ce",
            headers={"cloudEvents_specversion": "1.0", "cloudEvents_id": "a-ce-1", "cloudEvents_source": "it/amqp",
                     "cloudEvents_type": "orders.amqp.ce"}))
        want[ce_event_id("it/amqp", "a-ce-1")] = "orders.amqp.ce"
        ch.basic_publish("evm", "orders.bad", json.dumps({"specversion": "1.0", "id": "z"}).encode(), persistent)
        self.assertTrue(wait_for(lambda: set(want) <= set(sub.ids()), timeout=60, step=0.1), node.log()[-3000:])
        self.assertTrue(wait_for(lambda: self.events_metric(node, "a", "undecodable") == 1, timeout=30, step=0.1))
        # a stream waiting in the queue while the node is down, the node killed while it reads it
        self.kill9(node)
        n = 1500
        for i in range(n):
            ch.basic_publish("evm", "orders.stream", f"m {i}".encode(),
                             pika.BasicProperties(delivery_mode=2, message_id=f"m-{i}"))
            want[amqp_id(message_id=f"m-{i}")] = "orders.stream"
        node = self.node([cfg])
        self.assertTrue(wait_for(lambda: len(sub.ids()) >= 2 + n * 0.3, timeout=60, step=0.005), node.log()[-3000:])
        self.kill9(node)
        at_kill = len(set(sub.ids()))
        node = self.node([cfg])
        self.assertTrue(wait_for(lambda: set(want) <= set(sub.ids()), timeout=90, step=0.1),
                        f"{len(set(want) - set(sub.ids()))} missing\n{node.log()[-3000:]}")
        for eid, topic in want.items():
            self.assertEqual(sub.by_id(eid)[0], topic)
        _, ev = sub.by_id(ce_event_id("it/amqp", "a-ce-1"))
        self.assertEqual((ev[2], ev[5], ev[7]), ("it/amqp", "application/json", b'{"q":1}'))
        # everything acknowledged: the queue is empty, nothing unacked
        self.assertTrue(wait_for(lambda: ch.queue_declare("inq", passive=True).method.message_count == 0,
                                 timeout=30, step=0.2))
        ids = sub.ids()
        conn.close()
        print(f"amqp: {n + 2} messages, node killed after {at_kill}, {len(ids) - len(set(ids))} duplicates")


# A node killed with SIGKILL stays a member of its group until its session times out, and the
# restarted node's join waits for that: a short session keeps the restart test short.
KAFKA_PROPERTIES = {"session.timeout.ms": "6000", "heartbeat.interval.ms": "500"}


def kafka_all_committed(broker, topic, group):
    """Whether the group's committed offset of every partition of `topic` is its end (an empty
    partition has nothing committed)."""
    committed, end = broker.committed(topic, group)
    return all(committed.get(p) == e or (e == 0 and committed.get(p, -1) < 0) for p, e in end.items())


def kafka_source(broker, **kw):
    s = {"name": "k", "type": "kafka", "url": f"kafka://{broker.bootstrap}", "topics": ["evm.in"], "group": "evmesh",
         "wait_for_subscribers": True, "properties": KAFKA_PROPERTIES}
    s.update(kw)
    return s


class KafkaSourceTest(SourceTestCase):
    def test_round_trip_ids_cloudevents_undecodable(self):
        k = self.broker(KafkaMock(self.btmp, topics=["evm.in", "evm.raw"]))
        # records written before the group exists: a new group starts at the beginning
        recs = [{"value": json.dumps({"n": i}), "key": f"k{i % 7}"} for i in range(200)]
        ce = {"specversion": "1.0", "id": "kce-1", "source": "it/kafka", "type": "orders.kafka.structured",
              "datacontenttype": "application/json", "data": {"x": 1}}
        recs.append({"value": json.dumps(ce)})
        # the CloudEvents Kafka binding, binary mode (as the kafka bridge writes it)
        recs.append({"value": "raw", "headers": {"ce_specversion": "1.0", "ce_id": "kbin-1", "ce_source": "it/kbin",
                                                 "ce_type": "orders.kafka.binary", "content-type": "text/plain"}})
        # undecodable: a CloudEvent without its type
        recs.append({"value": json.dumps({"specversion": "1.0", "id": "x"})})
        pos = k.produce("evm.in", recs)
        want = {kafka_id("evm.in", p, o): "evm.in" for p, o in pos[:200]}
        want[ce_event_id("it/kafka", "kce-1")] = "orders.kafka.structured"
        want[ce_event_id("it/kbin", "kbin-1")] = "orders.kafka.binary"
        bad = pos[-1]
        node = self.node([kafka_source(k, dead_letter="dead.kafka"),
                          kafka_source(k, name="k2", topics=["evm.raw"], group="evmesh-raw")])
        sub = self.subscriber(node, ["evm.", "orders.", "dead."])
        for name in ("k", "k2"):
            self.assertTrue(wait_for(lambda: node.metric("evmesh_source_connected", source=name) == 1, timeout=60,
                                     step=0.1), node.log()[-3000:])
        # records written while the node runs; one undecodable, counted (no dead_letter for k2)
        raw = k.produce("evm.raw", [{"value": f"raw {i}"} for i in range(10)] +
                        [{"value": json.dumps({"specversion": "1.0", "id": "y"})}])
        for p, o in raw[:10]:
            want[kafka_id("evm.raw", p, o)] = "evm.raw"
        self.assertTrue(wait_for(lambda: set(want) <= set(sub.ids()), timeout=60, step=0.1),
                        f"{len(set(want) - set(sub.ids()))} missing\n{node.log()[-3000:]}")
        for eid, topic in want.items():
            self.assertEqual(sub.by_id(eid)[0], topic)
        _, ev = sub.by_id(ce_event_id("it/kafka", "kce-1"))
        self.assertEqual((ev[2], ev[6].get("ceid")), ("it/kafka", "kce-1"))
        self.assertEqual(json.loads(ev[7]), {"x": 1})
        _, ev = sub.by_id(ce_event_id("it/kbin", "kbin-1"))
        self.assertEqual((ev[2], ev[5], ev[7]), ("it/kbin", "text/plain", b"raw"))
        self.assertTrue(wait_for(lambda: len(sub.ids("dead.kafka")) == 1, timeout=30, step=0.1))
        _, dl = sub.by_id(sub.ids("dead.kafka")[0])
        self.assertEqual(dl[6]["position"], f"kafka/evm.in/{bad[0]}/{bad[1]}")
        self.assertEqual(dl[6]["broker_topic"], "evm.in")
        self.assertIn("structured CloudEvent", dl[6]["reason"])
        self.assertTrue(wait_for(lambda: self.events_metric(node, "k2", "undecodable") == 1, timeout=30, step=0.1))
        self.assertEqual(len(sub.ids()), len(want) + 1, "duplicates without a restart")
        self.assertEqual(self.events_metric(node, "k", "published"), 202)
        self.assertEqual(self.events_metric(node, "k", "dead_lettered"), 1)
        self.assertEqual(self.events_metric(node, "k2", "published"), 10)
        self.assertIn("undecodable message", node.log())
        # everything committed (the undecodable records too): the groups' offsets are at the ends
        for topic, group in (("evm.in", "evmesh"), ("evm.raw", "evmesh-raw")):
            self.assertTrue(wait_for(lambda: kafka_all_committed(k, topic, group), timeout=30, step=0.5),
                            (topic, k.committed(topic, group)))
        # a graceful stop commits what the node accepted (ack_delay not waited for) and leaves the group
        more = k.produce("evm.in", [{"value": f"late {i}"} for i in range(20)])
        for p, o in more:
            want[kafka_id("evm.in", p, o)] = "evm.in"
        self.assertTrue(wait_for(lambda: set(want) <= set(sub.ids()), timeout=60, step=0.01), node.log()[-3000:])
        t0 = time.monotonic()
        node.proc.send_signal(signal.SIGTERM)
        self.assertEqual(node.proc.wait(30), 0, node.log()[-2000:])
        self.assertLess(time.monotonic() - t0, 12)
        self.assertTrue(kafka_all_committed(k, "evm.in", "evmesh"), k.committed("evm.in", "evmesh"))

    def test_kill9_mid_stream_nothing_lost(self):
        k = self.broker(KafkaMock(self.btmp, topics=["evm.in"]))
        cfg = kafka_source(k)
        node = self.node([cfg])
        sub = self.subscriber(node, ["evm."])
        self.assertTrue(wait_for(lambda: node.metric("evmesh_source_connected", source="k") == 1, timeout=60,
                                 step=0.1), node.log()[-3000:])
        batches, size = 30, 100
        n = batches * size
        positions = []
        done = threading.Event()

        def produce():
            for b in range(batches):
                positions.extend(k.produce("evm.in", [{"value": f"event {b * size + i}"} for i in range(size)]))
                time.sleep(0.05)  # a stream, not one burst
            done.set()

        t = threading.Thread(target=produce)
        t.start()
        try:
            self.assertTrue(wait_for(lambda: len(sub.ids()) >= n * 0.3, timeout=60, step=0.005), node.log()[-3000:])
            self.kill9(node)
            committed, _ = k.committed("evm.in", "evmesh")
            time.sleep(1)  # what the node handed over before the kill has reached the subscriber
            before_restart = set(sub.ids())
            node = self.node([cfg])
        finally:
            t.join(120)
        self.assertTrue(done.is_set())
        want = {kafka_id("evm.in", p, o): (p, o) for p, o in positions}
        self.assertEqual(len(want), n)
        # committed means accepted by the node: every record below a committed offset had arrived
        below = [eid for eid, (p, o) in want.items() if o < committed.get(p, -1)]
        self.assertFalse(set(below) - before_restart, f"committed at the kill: {committed}")
        self.assertTrue(wait_for(lambda: set(want) <= set(sub.ids()), timeout=120, step=0.1),
                        f"{len(set(want) - set(sub.ids()))} of {n} missing\n{node.log()[-3000:]}")
        # the restarted node went on from the committed offsets: nothing below them came again
        ids = sub.ids()
        again = {eid for eid, c in collections.Counter(ids).items() if c > 1}
        self.assertFalse(again & set(below), "a committed record was delivered again")
        self.assertTrue(wait_for(lambda: kafka_all_committed(k, "evm.in", "evmesh"), timeout=30, step=0.5),
                        k.committed("evm.in", "evmesh"))
        print(f"kafka: {n} records, node killed after {len(before_restart)} ({sum(max(v, 0) for v in committed.values())}"
              f" committed), {len(ids) - len(set(ids))} duplicates")

    def test_broker_outage_reconnects(self):
        k = self.broker(KafkaMock(self.btmp, topics=["evm.in"], control=True))
        # the commits of the first records fall into the outage (librdkafka defers them until the
        # group coordinator is back; one that fails is made again by the source)
        node = self.node([kafka_source(k, ack_delay="2s")])
        sub = self.subscriber(node, ["evm."])
        self.assertTrue(wait_for(lambda: node.metric("evmesh_source_connected", source="k") == 1, timeout=60,
                                 step=0.1), node.log()[-3000:])
        want = {kafka_id("evm.in", p, o) for p, o in k.produce("evm.in", [{"value": f"a {i}"} for i in range(50)])}
        self.assertTrue(wait_for(lambda: want <= set(sub.ids()), timeout=60, step=0.1), node.log()[-3000:])
        k.broker_set("down")
        self.assertTrue(wait_for(lambda: node.metric("evmesh_source_connected", source="k") == 0, timeout=60,
                                 step=0.1), node.log()[-3000:])
        self.assertIn("not connected: all brokers are down", node.log())
        time.sleep(2)
        k.broker_set("up")
        self.assertTrue(wait_for(lambda: node.metric("evmesh_source_connected", source="k") == 1, timeout=60,
                                 step=0.1), node.log()[-3000:])
        self.assertEqual(node.metric("evmesh_source_connects_total", source="k"), 2)
        # committed after the outage, without newer records
        self.assertTrue(wait_for(lambda: kafka_all_committed(k, "evm.in", "evmesh"), timeout=30, step=0.5),
                        k.committed("evm.in", "evmesh"))
        want |= {kafka_id("evm.in", p, o) for p, o in k.produce("evm.in", [{"value": f"b {i}"} for i in range(50)])}
        self.assertTrue(wait_for(lambda: want <= set(sub.ids()), timeout=60, step=0.1), node.log()[-3000:])
        self.assertTrue(wait_for(lambda: kafka_all_committed(k, "evm.in", "evmesh"), timeout=30, step=0.5),
                        k.committed("evm.in", "evmesh"))
        ids = sub.ids()
        print(f"kafka outage: {len(want)} records, {len(ids) - len(set(ids))} duplicates, "
              f"commit retried: {'committed again' in node.log()}")

    def test_broker_down_at_start(self):
        """No broker on the port (the mock cluster cannot be started later on a given port): the
        source says so once, is not connected, and the node runs on."""
        cfg = {"name": "k", "type": "kafka", "url": f"kafka://127.0.0.1:{free_port()}", "topics": ["evm.in"],
               "group": "evmesh"}
        node = self.node([cfg])
        self.assertTrue(wait_for(lambda: "not connected" in node.log(), timeout=30, step=0.1), node.log()[-2000:])
        self.assertEqual(node.metric("evmesh_source_connected", source="k"), 0)
        self.assertEqual(node.log().count("not connected"), 1, node.log()[-2000:])
        self.assertIsNone(node.proc.poll())
        # a stop is not held up by the consumer that never reached a broker
        t0 = time.monotonic()
        node.proc.send_signal(signal.SIGTERM)
        self.assertEqual(node.proc.wait(30), 0, node.log()[-2000:])
        self.assertLess(time.monotonic() - t0, 12)


class MisconfiguredSourceTest(SourceTestCase):
    def test_one_line_and_exit_2(self):
        cases = [
            ({"name": "a", "type": "mqtt", "url": "mqtt://127.0.0.1:1"}, "source 'a': subscribe is required"),
            ({"name": "a", "type": "mqtt", "url": "http://x", "subscribe": "a/#"}, "source 'a': url must be mqtt://"),
            ({"name": "a", "type": "mqtt", "url": "mqtt://h", "subscribe": "a/#", "qos": 2}, "source 'a': qos must be 1"),
            ({"name": "a", "type": "redis", "url": "redis://h"}, "source 'a': stream is required"),
            ({"name": "a", "type": "redis", "url": "redis://h", "stream": "s"}, "source 'a': group is required"),
            ({"name": "a", "type": "zeromq", "url": "x://h"}, "source 'a': type must be"),
            ({"name": "a", "type": "mqtt", "url": "mqtt://h", "subscribe": "a/#", "topic": "x.{nope}"},
             "source 'a': topic has an unknown field {nope}"),
            ({"name": "a", "type": "mqtt", "url": "mqtt://h", "subscribe": "a/#", "dead_letter": "bad..topic"},
             "source 'a': dead_letter must be a mesh topic"),
            ({"name": "a", "type": "redis", "url": "redis://h", "stream": "s", "group": "g", "nope": 1},
             "key 'source.nope'"),
            ({"name": "a", "type": "nats", "url": "nats://h"}, "source 'a': subject is required"),
            ({"name": "a", "type": "nats", "url": "nats://h", "subject": "x", "durable": "d"},
             "source 'a': durable and stream need jetstream = true"),
            ({"name": "a", "type": "amqp", "url": "amqp://h"}, "source 'a': queue is required"),
            ({"name": "a", "type": "kafka", "url": "kafka://h", "group": "g"}, "source 'a': topics is required"),
            ({"name": "a", "type": "kafka", "url": "kafka://h", "topics": ["t"]}, "source 'a': group is required"),
            ({"name": "a", "type": "kafka", "url": "http://h", "topics": ["t"], "group": "g"},
             "source 'a': url must be kafka://"),
            ({"name": "a", "type": "kafka", "url": "kafka://h:1,h:x", "topics": ["t"], "group": "g"},
             "source 'a': url must be kafka://"),
            ({"name": "a", "type": "kafka", "url": "kafka://h", "topics": ["a b"], "group": "g"},
             "source 'a': topics: 'a b' is not a Kafka topic name"),
            ({"name": "a", "type": "kafka", "url": "kafka://h", "topics": ["t"], "group": "g",
              "properties": {"enable.auto.commit": "true"}},
             "source 'a': properties.enable.auto.commit is set by the source"),
            ({"name": "a", "type": "kafka", "url": "kafka://h", "topics": ["t"], "group": "g",
              "properties": {"fetch.wait.max.ms": "soon"}},
             "source 'a': properties.fetch.wait.max.ms is refused by librdkafka"),
            ({"name": "a", "type": "kafka", "url": "kafka://h", "topics": ["t"], "group": "g", "subscribe": "x"},
             "source 'a': subscribe, stream, consumer, subject, durable, jetstream and queue are not kafka keys"),
            ({"name": "a", "type": "mqtt", "url": "mqtt://h", "subscribe": "a/#", "topics": ["t"]},
             "source 'a': topics and properties are kafka keys"),
        ]
        for cfg, want in cases:
            path = source_config(self.tmp, [cfg], "bad.toml")
            for args in (["--config", path], ["--check-config", path]):
                p = subprocess.run([NODE, "--no-mesh", "--name", "bad", *args], capture_output=True, timeout=30)
                err = p.stderr.decode()
                self.assertEqual(p.returncode, 2, (args, err))
                self.assertIn(want, err)
                self.assertEqual(len(err.strip().splitlines()), 1, err)


if __name__ == "__main__":
    main()
