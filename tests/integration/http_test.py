#!/usr/bin/python3
"""The node's HTTP server (Boost.Beast, docs/HTTP-STACK.md): keep-alive, request ids, JSON errors,
limits (413), timeouts, TLS, and the refusal of browser pages and foreign Host names that used to
let any web page replay dead letters (issue 12). Real node processes, real sockets, loopback only."""
import http.client
import json
import os
import socket
import ssl
import subprocess
import time

import zmq

from channel_helpers import Publisher, Receiver, channel_config
from evmesh_testlib import NODE, NodeTestCase, main, wait_for


class HttpTest(NodeTestCase):
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

    def conn_get(self, node, path):
        c = self.conn(node)
        c.request("GET", path)
        status = c.getresponse().status
        c.close()
        return status

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


if __name__ == "__main__":
    main()
