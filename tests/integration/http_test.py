#!/usr/bin/python3
"""The node's HTTP server (Boost.Beast, docs/HTTP-STACK.md): keep-alive, request ids, JSON errors,
limits (413), timeouts, TLS, and the refusal of browser pages and foreign Host names that used to
let any web page replay dead letters (issue 12). Real node processes, real sockets, loopback only."""
import http.client
import hashlib
import json
import os
import socket
import ssl
import subprocess
import time
import uuid

import msgpack
import zmq

from channel_helpers import Publisher, Receiver, channel_config
from evmesh_testlib import NODE, NodeTestCase, main, wait_for


class HttpBase(NodeTestCase):
    def setUp(self):
        super().setUp()
        self.ctx = zmq.Context()
        self.receivers = []

    def tearDown(self):
        for r in self.receivers:
            r.close()
        self.ctx.destroy(linger=0)
        super().tearDown()

    def conn(self, node, tls_ctx=None):
        host, port = node.ready["http"].rsplit(":", 1)
        if tls_ctx is not None:
            return http.client.HTTPSConnection(host, int(port), timeout=5, context=tls_ctx)
        return http.client.HTTPConnection(host, int(port), timeout=5)

    def config(self, extra):
        path = os.path.join(self.tmp, "node.toml")
        with open(path, "w") as f:
            f.write("[run]\n" + extra)
        return path

    def conn_get(self, node, path):
        c = self.conn(node)
        c.request("GET", path)
        status = c.getresponse().status
        c.close()
        return status


class HttpTest(HttpBase):
    def test_keep_alive_request_ids_and_json_errors(self):
        node = self.start_node("n0", "--no-mesh")
        c = self.conn(node)
        c.request("GET", "/healthz")
        r1 = c.getresponse()
        self.assertEqual((r1.status, r1.read()), (200, b"ok\n"))
        sock = c.sock
        c.request("GET", "/metrics", headers={"X-Request-Id": "trace-42"})
        r2 = c.getresponse()
        self.assertEqual(r2.status, 200)
        self.assertIn(b"evmesh_up", r2.read())
        self.assertIs(c.sock, sock, "the connection was not kept alive")
        self.assertEqual(r2.getheader("X-Request-Id"), "trace-42")
        self.assertRegex(r1.getheader("X-Request-Id"), r"^[0-9a-f-]{36}$")
        c.request("GET", "/nothing/here")
        r3 = c.getresponse()
        self.assertEqual(r3.status, 404)
        self.assertEqual(r3.getheader("Content-Type"), "application/json")
        self.assertEqual(json.loads(r3.read())["error"]["code"], "not_found")
        c.request("POST", "/metrics", body=b"")
        r4 = c.getresponse()
        self.assertEqual((r4.status, json.loads(r4.read())["error"]["code"]), (405, "method_not_allowed"))
        c.close()

    def test_body_limit_answers_413(self):
        node = self.start_node("n0", "--no-mesh", "--config", self.config("http_max_body_bytes = 4096\n"))
        c = self.conn(node)
        c.request("POST", "/channels/x/replay", body=b"x" * 5000)
        r = c.getresponse()
        self.assertEqual(r.status, 413)
        self.assertEqual(json.loads(r.read())["error"]["code"], "payload_too_large")
        self.assertTrue(r.getheader("X-Request-Id"))

    def test_a_silent_client_is_cut_off_after_the_header_timeout(self):
        node = self.start_node("n0", "--no-mesh", "--config", self.config("http_header_timeout_ms = 300\n"))
        host, port = node.ready["http"].rsplit(":", 1)
        s = socket.create_connection((host, int(port)), timeout=5)
        s.sendall(b"GET /metrics HTTP/1.1\r\nHost: 127.0.0.1\r\n")  # and never the blank line
        t0 = time.monotonic()
        self.assertEqual(s.recv(1), b"", "the server must close the connection")
        self.assertLess(time.monotonic() - t0, 3)
        s.close()
        self.assertEqual(self.conn_get(node, "/healthz"), 200)  # others are served meanwhile

    def test_web_pages_and_foreign_hosts_cannot_replay_dead_letters(self):
        # the finding of issue 12: a cross-origin text/plain POST replayed dead letters with 200
        rcv = Receiver(behave=lambda path, req: (400, {}, b"no"))
        self.receivers.append(rcv)
        cfg = channel_config(self.tmp, [{"name": "partner", "plugin": "webhook", "topics": ["orders.>"],
                                         "settings": {"url": rcv.url(), "allow_private": True}}])
        node = self.start_node("n0", "--no-mesh", "--config", cfg)
        pub = Publisher(self.ctx, node.pub, "orders.")
        for i in range(5):
            pub.publish(f"orders.e{i}", b"{}")
        pub.close()
        dead = lambda: json.loads(node.http("/channels"))[0]["dead"]
        self.assertTrue(wait_for(lambda: dead() == 5, timeout=10))
        c = self.conn(node)
        c.request("POST", "/channels/partner/replay", body=b"x",
                  headers={"Origin": "http://evil.example", "Content-Type": "text/plain"})
        r = c.getresponse()
        self.assertEqual((r.status, json.loads(r.read())["error"]["code"]), (403, "forbidden_origin"))
        c.request("POST", "/channels/partner/replay", body=b"", headers={"Host": "evil.example:9464"})
        r = c.getresponse()
        self.assertEqual((r.status, json.loads(r.read())["error"]["code"]), (403, "forbidden_host"))
        self.assertEqual(dead(), 5, "nothing may have been replayed")
        c.request("POST", "/channels/partner/replay", body=b"")  # curl, a script: allowed
        r = c.getresponse()
        self.assertEqual((r.status, json.loads(r.read())), (200, {"replayed": 5}))
        c.close()

    def test_tls_from_cert_and_key_files(self):
        cert, key = os.path.join(self.tmp, "cert.pem"), os.path.join(self.tmp, "key.pem")
        p = subprocess.run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
                            "-nodes", "-keyout", key, "-out", cert, "-days", "1", "-subj", "/CN=127.0.0.1",
                            "-addext", "subjectAltName=IP:127.0.0.1"], capture_output=True, timeout=30)
        self.assertEqual(p.returncode, 0, p.stderr)
        node = self.start_node("n0", "--no-mesh", "--http-cert-file", cert, "--http-key-file", key)
        ctx = ssl.create_default_context(cafile=cert)
        c = self.conn(node, ctx)
        c.request("GET", "/healthz")
        r = c.getresponse()
        self.assertEqual((r.status, r.read()), (200, b"ok\n"))
        self.assertEqual(c.sock.version()[:4], "TLSv")
        c.request("GET", "/peers")  # kept alive over TLS too
        self.assertEqual(c.getresponse().status, 200)
        c.close()
        with self.assertRaises(Exception):  # plain HTTP on the TLS port gets no HTTP answer
            self.conn_get(node, "/healthz")

    def test_plain_http_on_a_non_loopback_address_is_refused(self):
        p = subprocess.run([NODE, "--no-mesh", "--http", "0.0.0.0:0"], capture_output=True, timeout=10)
        self.assertEqual(p.returncode, 2)
        self.assertIn(b"not a loopback address", p.stderr)
        p = subprocess.run([NODE, "--no-mesh", "--http", "127.0.0.1:0", "--http-cert-file", "/nonexistent"],
                           capture_output=True, timeout=10)
        self.assertEqual(p.returncode, 2)
        self.assertIn(b"go together", p.stderr)


def ce_event_id(source, ce_id):
    """The evmesh id of a CloudEvent whose id is not a UUID (PROTOCOL.md section 11)."""
    b = bytearray(hashlib.sha256(source.encode() + b"\0" + ce_id.encode()).digest()[:16])
    b[6] = (b[6] & 0x0F) | 0x80
    b[8] = (b[8] & 0x3F) | 0x80
    return bytes(b)


class PublishTest(HttpBase):
    def setUp(self):
        super().setUp()
        self.node = self.start_node("n0", "--no-mesh", "--http-publish")
        self.sub = self.ctx.socket(zmq.SUB)
        self.sub.setsockopt(zmq.SUBSCRIBE, b"orders.")
        self.sub.setsockopt(zmq.RCVTIMEO, 3000)
        self.sub.connect(self.node.sub)
        # the subscription reaches the node asynchronously: publish probes until one arrives
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            self.post([("content-type", "application/cloudevents+json")], json.dumps(
                {"specversion": "1.0", "id": str(uuid.uuid4()), "source": "probe", "type": "orders.probe"}))
            try:
                self.sub.recv_multipart(flags=zmq.NOBLOCK)
                break
            except zmq.Again:
                time.sleep(0.05)
        # earlier probes may still be on their way: drain until nothing came for 300 ms
        self.sub.setsockopt(zmq.RCVTIMEO, 300)
        while True:
            try:
                self.sub.recv_multipart()
            except zmq.Again:
                break
        self.sub.setsockopt(zmq.RCVTIMEO, 3000)

    def tearDown(self):
        self.sub.close()
        super().tearDown()

    def post(self, headers, body):
        c = self.conn(self.node)
        c.request("POST", "/v1/events", body=body.encode() if isinstance(body, str) else body, headers=dict(headers))
        r = c.getresponse()
        out = (r.status, json.loads(r.read() or b"null"), dict(r.getheaders()))
        c.close()
        return out

    def receive(self):
        topic, body = self.sub.recv_multipart()
        v = msgpack.unpackb(body, raw=False)
        return {"topic": topic.decode(), "id": v[1], "source": v[2], "time": v[3], "seq": v[4], "ct": v[5],
                "headers": dict(v[6]) if isinstance(v[6], dict) else dict(v[6] or {}), "payload": v[7]}

    def nothing_more(self):
        self.sub.setsockopt(zmq.RCVTIMEO, 500)
        with self.assertRaises(zmq.Again):
            self.sub.recv_multipart()

    def test_structured_binary_and_batch_modes(self):
        status, body, _ = self.post([("content-type", "application/cloudevents+json")], json.dumps({
            "specversion": "1.0", "id": "order-1", "source": "shop", "type": "orders.eu.created",
            "time": "2026-05-01T12:34:56.5Z", "data": {"n": 1}, "traceparent": "00-abc-01", "seq": "42"}))
        self.assertEqual(status, 202, body)
        want = ce_event_id("shop", "order-1")
        self.assertEqual(body["ids"], [str(uuid.UUID(bytes=want))])
        e = self.receive()
        self.assertEqual((e["topic"], e["source"], e["id"], e["ct"]), ("orders.eu.created", "shop", want, "application/json"))
        self.assertEqual(json.loads(e["payload"]), {"n": 1})
        self.assertEqual(e["headers"].get("traceparent"), "00-abc-01")
        self.assertEqual(e["headers"].get("ceid"), "order-1")  # the original id, not a UUID
        self.assertEqual(e["seq"], 42)
        self.assertEqual(e["time"], 1777638896500000000)  # 2026-05-01T12:34:56.5Z in ns

        uid = str(uuid.uuid4())
        status, body, _ = self.post([("content-type", "application/octet-stream"), ("ce-specversion", "1.0"),
                                     ("ce-id", uid), ("ce-source", "sensor/7"), ("ce-type", "orders.raw"),
                                     ("ce-region", "eu")], b"\x00\xffbinary")
        self.assertEqual((status, body["ids"]), (202, [uid]))
        e = self.receive()
        self.assertEqual((e["topic"], e["id"], e["payload"], e["ct"]),
                         ("orders.raw", uuid.UUID(uid).bytes, b"\x00\xffbinary", "application/octet-stream"))
        self.assertEqual(e["headers"].get("region"), "eu")

        batch = [{"specversion": "1.0", "id": f"b{i}", "source": "shop", "type": f"orders.b{i}",
                  "data_base64": "aGVsbG8="} for i in range(3)]
        status, body, _ = self.post([("content-type", "application/cloudevents-batch+json")], json.dumps(batch))
        self.assertEqual((status, len(body["ids"])), (202, 3))
        got = [self.receive() for _ in range(3)]
        self.assertEqual([g["topic"] for g in got], ["orders.b0", "orders.b1", "orders.b2"])
        self.assertEqual({g["payload"] for g in got}, {b"hello"})

    def test_repeats_are_not_published_twice(self):
        ev = json.dumps({"specversion": "1.0", "id": "dup-1", "source": "shop", "type": "orders.dup"})
        hdr = [("content-type", "application/cloudevents+json")]
        self.assertEqual(self.post(hdr, ev)[:2], (202, {"ids": [str(uuid.UUID(bytes=ce_event_id("shop", "dup-1")))],
                                                         "duplicates": 0}))
        self.receive()
        status, body, _ = self.post(hdr, ev)  # the same (source, id) again
        self.assertEqual((status, body["duplicates"]), (202, 1))
        self.nothing_more()
        # Idempotency-Key: the same answer again, nothing published again
        key = [("idempotency-key", "req-77")]
        first = self.post(hdr + key, json.dumps({"specversion": "1.0", "id": "k1", "source": "s", "type": "orders.k"}))
        self.assertEqual(first[0], 202)
        self.receive()
        again = self.post(hdr + key, json.dumps({"specversion": "1.0", "id": "k2", "source": "s", "type": "orders.k"}))
        self.assertEqual(again[:2], first[:2])
        self.assertEqual(again[2].get("Idempotent-Replayed"), "true")
        self.nothing_more()

    def test_invalid_events_are_refused_with_the_field_and_publish_nothing(self):
        hdr = [("content-type", "application/cloudevents+json")]
        base = {"specversion": "1.0", "id": "x", "source": "s", "type": "orders.ok"}
        cases = [({k: v for k, v in base.items() if k != "type"}, "missing_attribute", "type"),
                 ({**base, "specversion": "0.3"}, "unsupported_specversion", "specversion"),
                 ({**base, "time": "yesterday"}, "bad_attribute", "time"),
                 ({**base, "type": "orders.*"}, "bad_topic", "type"),
                 ({**base, "type": "_evmesh.stats"}, "bad_topic", "type")]
        for ev, code, field in cases:
            status, body, headers = self.post(hdr, json.dumps(ev))
            self.assertEqual((status, body["error"]["code"], body["error"].get("field")), (400, code, field), ev)
            self.assertTrue(headers.get("X-Request-Id"))
        status, body, _ = self.post([("content-type", "application/cloudevents-batch+json")],
                                    json.dumps([base, {**base, "id": "y", "type": "bad type"}]))
        self.assertEqual((status, body["error"]["field"]), (400, "[1].type"))
        status, body, _ = self.post(hdr, "{not json")
        self.assertEqual((status, body["error"]["code"]), (400, "bad_json"))
        self.nothing_more()  # not even the valid first event of the refused batch

    def test_publishing_is_off_unless_enabled(self):
        node = self.start_node("n1", "--no-mesh")
        c = self.conn(node)
        c.request("POST", "/v1/events", body=b"{}", headers={"content-type": "application/cloudevents+json"})
        self.assertEqual(c.getresponse().status, 404)
        c.close()


if __name__ == "__main__":
    main()
