#!/usr/bin/python3
"""Live streams (docs/STREAMS.md): SSE at /v1/stream and WebSocket at /v1/ws on a real node, fed
by events published on another node across the mesh; exactly once, resume, gap notices, slow
clients, scopes, malformed and huge frames. Loopback only; every process stopped by PID."""
import asyncio
import http.client
import json
import os
import shutil
import socket
import ssl
import subprocess
import threading
import time
import uuid

import msgpack
import websockets
import zmq

from channel_helpers import Publisher
from evmesh_testlib import NodeTestCase, main, wait_for


class SseReader:
    """A raw SSE client on http.client: parses id/event/data fields into (event, id, data)."""

    def __init__(self, addr, path, headers=None, read=True, rcvbuf=None):
        host, port = addr.rsplit(":", 1)
        self.conn = http.client.HTTPConnection(host, int(port), timeout=30)
        if rcvbuf:
            # before connect: a window shrunk after the handshake stalls in zero-window probes
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
            sock.settimeout(30)
            sock.connect((host, int(port)))
            self.conn.sock = sock
        self.conn.request("GET", path, headers=headers or {})
        self.resp = self.conn.getresponse()
        self.events = []
        self.lock = threading.Lock()
        if self.resp.status == 200 and read:
            self.thread = threading.Thread(target=self.loop, daemon=True)
            self.thread.start()

    def loop(self):
        ev = {"event": "message", "id": None, "data": []}
        try:
            while True:
                line = self.resp.fp.readline()
                if not line:
                    return
                line = line.decode().rstrip("\n")
                if line == "":
                    if ev["data"]:
                        with self.lock:
                            self.events.append((ev["event"], ev["id"], "\n".join(ev["data"])))
                    ev = {"event": "message", "id": None, "data": []}
                elif line.startswith(":"):
                    continue
                else:
                    k, _, v = line.partition(":")
                    v = v[1:] if v.startswith(" ") else v
                    if k == "data":
                        ev["data"].append(v)
                    elif k in ("id", "event"):
                        ev[k] = v
        except (OSError, ValueError, AttributeError):
            return

    def messages(self):
        with self.lock:
            return [e for e in self.events if e[0] == "message"]

    def notices(self, kind):
        with self.lock:
            return [json.loads(e[2]) for e in self.events if e[0] == kind]

    def close(self):
        try:
            self.conn.sock.shutdown(socket.SHUT_RDWR)
        except (OSError, AttributeError):
            pass
        self.conn.close()


class StreamsBase(NodeTestCase):
    def setUp(self):
        super().setUp()
        self.ctx = zmq.Context()
        self.readers = []

    def tearDown(self):
        for r in self.readers:
            r.close()
        self.ctx.destroy(linger=0)
        db = os.path.join(self.tmp, "api.db")
        for suffix in ("", "-wal", "-shm"):
            if os.path.exists(db + suffix):
                os.unlink(db + suffix)
        super().tearDown()

    def stream_node(self, name, extra="", *args):
        path = os.path.join(self.tmp, f"{name}.toml")
        with open(path, "w") as f:
            f.write("[api]\nstreams = true\n" + extra)
        return self.start_node(name, "--config", path, "--slow-subscriber", "block", "--repair", "orders.>", *args)

    def sse(self, node, query, headers=None, read=True, rcvbuf=None):
        r = SseReader(node.ready["http"], "/v1/stream?" + query, headers, read, rcvbuf)
        self.readers.append(r)
        return r

    def publish(self, node, topic_prefix, n, topic=None, per_10ms=0, pad=0):
        pub = Publisher(self.ctx, node.pub, topic_prefix)
        ids = []
        for i in range(n):
            body = {"i": i, "pad": "x" * pad} if pad else {"i": i}
            ids.append(pub.publish(topic or f"{topic_prefix}x", json.dumps(body).encode()))
            if per_10ms and i % per_10ms == per_10ms - 1:
                time.sleep(0.01)  # a pace a Python reader keeps up with
        return pub, ids

    def wait_mesh(self, a, b):
        self.assertTrue(wait_for(lambda: len(a.peers()) == 1 and len(b.peers()) == 1, 10))


class SseTest(StreamsBase):
    def test_every_event_exactly_once_across_nodes_then_resume(self):
        a = self.start_node("a", "--slow-subscriber", "block", "--repair", "orders.>")
        b = self.stream_node("b")
        self.wait_mesh(a, b)
        r = self.sse(b, "topics=orders.>")
        self.assertEqual(r.resp.status, 200)
        self.assertEqual(r.resp.getheader("Content-Type"), "text/event-stream")
        n = 10000
        pub = Publisher(self.ctx, a.pub, "orders.")  # waits until b's subscription reached a
        sent = [str(uuid.UUID(bytes=pub.publish("orders.created", json.dumps({"i": i}).encode())))
                for i in range(n)]
        self.assertTrue(wait_for(lambda: len(r.messages()) >= n, 60), len(r.messages()))
        time.sleep(0.3)
        got = r.messages()
        ids = [e[1] for e in got]
        self.assertEqual(len(ids), n)
        self.assertEqual(len(set(ids)), n)
        self.assertEqual(ids, sent)  # in order too (one publisher, one stream)
        body = json.loads(got[0][2])
        self.assertEqual((body["type"], body["data"], body["id"]), ("orders.created", {"i": 0}, sent[0]))
        self.assertEqual(r.notices("gap"), [])

        # resume after the 9,000th: the remaining 1,000 exactly, no gap, no duplicate
        again = self.sse(b, "topics=orders.>", headers={"Last-Event-ID": sent[8999]})
        self.assertTrue(wait_for(lambda: len(again.messages()) >= 1000, 10))
        time.sleep(0.2)
        self.assertEqual([e[1] for e in again.messages()], sent[9000:])
        # an id the buffer no longer holds: a gap notice first, then live
        lost = self.sse(b, "topics=orders.>", headers={"Last-Event-ID": str(uuid.uuid4())})
        self.assertTrue(wait_for(lambda: lost.notices("gap"), 5))
        self.assertEqual(lost.notices("gap")[0]["reason"], "resume_unavailable")
        pub.publish("orders.created", b'{"late": true}')
        self.assertTrue(wait_for(lambda: len(lost.messages()) == 1 and len(r.messages()) == n + 1, 10))
        m = b.metrics()
        self.assertEqual(b.metric("evmesh_stream_resumes_total", **{"from": "buffer"}), 1)
        self.assertEqual(b.metric("evmesh_stream_resumes_total", **{"from": "history"}), 1)  # found nothing
        self.assertEqual(b.metric("evmesh_stream_gaps_total", reason="resume_unavailable"), 1)
        self.assertEqual(b.metric("evmesh_stream_connections", kind="sse"), 3)
        self.assertGreater(len(m), 0)
        pub.close()

    def test_a_slow_client_is_skipped_with_a_gap_notice_and_hurts_nobody(self):
        # 1 MiB per connection: the fast reader rides out a scheduling stall of a few hundred ms
        # on a loaded CI machine; 10 MB published is still far more than that queue plus the
        # kernel's socket buffers (tcp_wmem max 4 MiB) hold for the client that never reads
        n0 = self.stream_node("n0", "stream_queue_bytes = 1048576\n", "--no-mesh")
        fast = self.sse(n0, "topics=orders.>")
        slow = self.sse(n0, "topics=orders.>", read=False, rcvbuf=4096)  # never reads: its buffers fill
        time.sleep(0.2)
        n = 5000
        pub, _ = self.publish(n0, "orders.", n, topic="orders.created", per_10ms=10,
                              pad=2000)  # 10 MB: more than the kernel's socket buffers hold
        self.assertTrue(wait_for(lambda: len(fast.messages()) >= n, 30),
                        (len(fast.messages()), fast.notices("gap")))
        self.assertEqual(len(fast.messages()), n)
        self.assertEqual(fast.notices("gap"), [])
        self.assertGreater(n0.metric("evmesh_stream_events_total", outcome="skipped"), 0)
        listed = json.loads(n0.http("/v1/streams"))["data"]
        slow_row = max(listed, key=lambda c: c["skipped"])
        self.assertGreater(slow_row["skipped"], 0)
        self.assertLessEqual(slow_row["queued_bytes"], 1048576 + 4096)
        # it reads again: what it missed is announced before the next event
        slow.thread = threading.Thread(target=slow.loop, daemon=True)
        slow.thread.start()
        time.sleep(0.5)
        pub.publish("orders.created", b'{"after": 1}')
        self.assertTrue(wait_for(lambda: slow.notices("gap"), 10),
                        (len(slow.events), json.loads(n0.http("/v1/streams"))["data"]))
        gap = slow.notices("gap")[0]
        self.assertEqual(gap["reason"], "slow_client")
        self.assertGreater(gap["missed"], 0)
        # what it read plus what it was told it missed accounts for every event (the late one
        # included): nothing skipped silently
        missed = lambda: sum(g["missed"] for g in slow.notices("gap"))  # noqa: E731
        self.assertTrue(wait_for(lambda: missed() + len(slow.messages()) == n + 1, 10),
                        (slow.notices("gap"), len(slow.messages())))
        final = {c["id"]: c for c in json.loads(n0.http("/v1/streams"))["data"]}
        self.assertEqual(final[slow_row["id"]]["skipped"], missed())
        pub.close()

    def test_resume_beyond_the_buffer_replays_from_history_while_publishing(self):
        # the publisher's node keeps a durable history; the stream node keeps 100 events in its
        # buffer only, so a resume after event 1,000 of 6,000 must come from the history
        hdir = os.path.join(self.tmp, "hist")
        cfg = os.path.join(self.tmp, "a.toml")
        with open(cfg, "w") as f:
            f.write(f'[[history]]\nname = "h"\npatterns = ["orders.>"]\ndir = {json.dumps(hdir)}\n')
        a = self.start_node("a", "--config", cfg, "--slow-subscriber", "block", "--repair", "orders.>")
        # a queue that holds the replay burst (5,000 events of ~250 B): the replay does not wait
        # for a slow reader (STREAMS.md)
        b = self.stream_node("b", "stream_resume_events = 100\nstream_resume_wait = \"2s\"\n"
                                  "stream_queue_bytes = 16777216\n")
        self.wait_mesh(a, b)
        first = self.sse(b, "topics=orders.>")
        pub = Publisher(self.ctx, a.pub, "orders.")
        # three streams (one per topic), each numbered: the switch to live is exact per stream
        # (source, topic, seq); the ids are UUIDv4, which the history looks for in all it keeps
        seqs = {}

        def send(i):
            topic = f"orders.t{i % 3}"
            seqs[topic] = seqs.get(topic, 0) + 1
            return str(uuid.UUID(bytes=pub.publish(topic, json.dumps({"i": i}).encode(), seq=seqs[topic])))
        sent = [send(i) for i in range(3000)]
        self.assertTrue(wait_for(lambda: len(first.messages()) >= 3000, 30), len(first.messages()))
        self.assertTrue(wait_for(lambda: a.metric("evmesh_history_events") >= 3000, 10))

        # more events while the resumed stream replays and switches to live
        def more():
            for i in range(3000, 6000):
                sent.append(send(i))
                if i % 20 == 19:
                    time.sleep(0.01)
        t = threading.Thread(target=more)
        t.start()
        time.sleep(0.05)
        resumed = self.sse(b, "topics=orders.>", headers={"Last-Event-ID": sent[999]})
        t.join()
        self.assertTrue(wait_for(lambda: len(resumed.messages()) >= 5000, 60), len(resumed.messages()))
        time.sleep(0.3)
        got = [e[1] for e in resumed.messages()]
        # every event after the id exactly once, in publish order (one source, replay then live)
        idx = {x: i for i, x in enumerate(sent)}
        pos = [idx.get(x, -1) for x in got]
        self.assertEqual(len(got), 5000, (len(set(got)), pos[:20], [p for k, p in enumerate(pos) if k and p != pos[k - 1] + 1][:40]))
        self.assertEqual(len(set(got)), 5000)
        self.assertEqual(got, sent[1000:])
        self.assertEqual(resumed.notices("gap"), [])
        self.assertEqual(b.metric("evmesh_stream_resumes_total", **{"from": "history"}), 1)
        self.assertGreaterEqual(b.metric("evmesh_stream_history_events_total"), 5000)
        # an SSE client that reconnects gets the same: the browser's EventSource does just this
        again = self.sse(b, "topics=orders.t1", headers={"Last-Event-ID": sent[4000]})
        want = [sent[i] for i in range(4001, 6000) if i % 3 == 1]
        self.assertTrue(wait_for(lambda: len(again.messages()) >= len(want), 30))
        pub.publish("orders.t1", b'{"late": true}', seq=seqs["orders.t1"] + 1)
        self.assertTrue(wait_for(lambda: len(again.messages()) == len(want) + 1, 10), len(again.messages()))
        self.assertEqual([e[1] for e in again.messages()][:-1], want)
        pub.close()

    def test_bad_requests(self):
        n0 = self.stream_node("n0", "", "--no-mesh")
        for query, code in [("topics=", 400), ("topics=a..b", 400), ("", 400)]:
            r = self.sse(n0, query, read=False)
            self.assertEqual(r.resp.status, code, query)
            self.assertEqual(json.loads(r.resp.read())["error"]["code"], "bad_pattern")
        host, port = n0.ready["http"].rsplit(":", 1)
        c = http.client.HTTPConnection(host, int(port), timeout=5)
        c.request("GET", "/v1/ws")
        self.assertEqual(c.getresponse().status, 426)
        c.close()


class WebSocketTest(StreamsBase):
    def run_ws(self, coro):
        return asyncio.new_event_loop().run_until_complete(asyncio.wait_for(coro, 60))

    def test_subscribe_receive_unsubscribe_msgpack_and_close_codes(self):
        n0 = self.stream_node("n0", "", "--no-mesh")
        url = f"ws://{n0.ready['http']}/v1/ws"
        pub = Publisher(self.ctx, n0.pub, "")

        async def scenario():
            async with websockets.connect(url, max_size=None) as ws:
                self.assertEqual(json.loads(await ws.recv())["control"], "welcome")
                await ws.send(json.dumps({"control": "subscribe", "topics": ["orders.>"]}))
                self.assertEqual(json.loads(await ws.recv())["control"], "subscribed")
                await asyncio.sleep(0.2)
                for i in range(100):
                    pub.publish("orders.created", json.dumps({"i": i}).encode())
                    pub.publish("users.created", b"{}")
                got = [json.loads(await ws.recv()) for _ in range(100)]
                self.assertEqual([g["data"]["i"] for g in got], list(range(100)))
                self.assertTrue(all(g["type"] == "orders.created" for g in got))
                await ws.send(json.dumps({"control": "ping"}))
                self.assertEqual(json.loads(await ws.recv())["control"], "pong")
                await ws.send("not json")
                self.assertEqual(json.loads(await ws.recv())["code"], "bad_message")
                await ws.send(json.dumps({"control": "subscribe", "topics": ["a..b"]}))
                self.assertEqual(json.loads(await ws.recv())["code"], "bad_pattern")
                await ws.send(json.dumps({"control": "unsubscribe", "topics": ["orders.>"]}))
                self.assertEqual(json.loads(await ws.recv())["control"], "unsubscribed")
                pub.publish("orders.created", b'{"after": true}')
                await ws.send(json.dumps({"control": "ping"}))
                self.assertEqual(json.loads(await ws.recv())["control"], "pong")  # nothing in between
            # msgpack binary frames: topic 0x00 body, as PROTOCOL.md 8.4
            async with websockets.connect(url) as ws:
                await ws.recv()
                await ws.send(json.dumps({"control": "subscribe", "topics": ["orders.*"], "format": "msgpack"}))
                await ws.recv()
                await asyncio.sleep(0.2)
                eid = pub.publish("orders.paid", b'{"n": 7}')
                frame = await ws.recv()
                self.assertIsInstance(frame, bytes)
                topic, _, body = frame.partition(b"\x00")
                fields = msgpack.unpackb(body, raw=False)
                self.assertEqual((topic, fields[1], fields[-1]), (b"orders.paid", eid, b'{"n": 7}'))
            # a message over 64 KiB: closed with 1009
            async with websockets.connect(url, max_size=None) as ws:
                await ws.recv()
                await ws.send("x" * (100 * 1024))
                with self.assertRaises(websockets.ConnectionClosed) as cm:
                    await asyncio.wait_for(ws.recv(), 5)
                self.assertEqual(cm.exception.rcvd.code, 1009)

        self.run_ws(scenario())
        # a malformed frame (unmasked, reserved bits): closed with 1002; the node keeps serving
        host, port = n0.ready["http"].rsplit(":", 1)
        s = socket.create_connection((host, int(port)), timeout=5)
        s.sendall(b"GET /v1/ws HTTP/1.1\r\nHost: " + host.encode() + b"\r\nUpgrade: websocket\r\n"
                  b"Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
                  b"Sec-WebSocket-Version: 13\r\n\r\n")
        head = b""
        while b"\r\n\r\n" not in head:
            head += s.recv(4096)
        self.assertIn(b"101", head.split(b"\r\n")[0])
        s.sendall(b"\xf1\x05hello")  # RSV bits set, unmasked: a protocol error
        data = head.split(b"\r\n\r\n", 1)[1]
        deadline = time.time() + 5
        while time.time() < deadline:
            chunk = s.recv(4096)
            if not chunk:
                break
            data += chunk
        s.close()
        # the welcome text frame, then a close frame (0x88) with code 1002
        self.assertIn(b"\x88", data)
        close = data[data.index(b"\x88"):]
        self.assertEqual(int.from_bytes(close[2:4], "big"), 1002)
        self.assertEqual(n0.http("/healthz"), "ok\n")
        pub.close()

    def test_resume_from_history_with_overlapping_patterns_then_unsubscribe(self):
        # one node with a history and a 10-event buffer; the client resumes after event 100 of 500
        # with two patterns that overlap (orders.a is within orders.>): every event once
        hdir = os.path.join(self.tmp, "hist")
        n0 = self.stream_node("n0", "stream_resume_events = 10\nstream_queue_bytes = 16777216\n"
                                    f'[[history]]\nname = "h"\npatterns = ["orders.>"]\ndir = {json.dumps(hdir)}\n',
                              "--no-mesh")
        url = f"ws://{n0.ready['http']}/v1/ws"
        pub = Publisher(self.ctx, n0.pub, "")
        seqs = {}

        def send(topic, body):
            seqs[topic] = seqs.get(topic, 0) + 1
            return str(uuid.UUID(bytes=pub.publish(topic, body, seq=seqs[topic])))
        sent = [(send(t, json.dumps({"i": i}).encode()), t)
                for i, t in enumerate(["orders.a", "orders.b"] * 250)]
        self.assertTrue(wait_for(lambda: n0.metric("evmesh_history_events") >= 500, 10))

        async def scenario():
            async with websockets.connect(url, max_size=None) as ws:
                self.assertEqual(json.loads(await ws.recv())["control"], "welcome")
                await ws.send(json.dumps({"control": "subscribe", "topics": ["orders.a", "orders.>"],
                                          "last_event_id": sent[99][0]}))
                self.assertEqual(json.loads(await ws.recv())["control"], "subscribed")
                got = []
                while len(got) < 400:
                    m = json.loads(await asyncio.wait_for(ws.recv(), 20))
                    self.assertNotIn("control", m, m)  # no gap notice
                    got.append(m)
                self.assertEqual(sorted(g["id"] for g in got), sorted(e for e, _ in sent[100:]))
                for topic in ("orders.a", "orders.b"):  # in order per stream
                    want = [e for e, t in sent[100:] if t == topic]
                    self.assertEqual([g["id"] for g in got if g["type"] == topic], want)
                # live after the replay, still once though both patterns match orders.a
                await asyncio.sleep(1.5)  # both replays have switched to live (resume_wait 1 s)
                late_a = send("orders.a", b'{"late": "a"}')
                m = json.loads(await asyncio.wait_for(ws.recv(), 10))
                self.assertEqual(m["id"], late_a)
                # unsubscribing orders.> ends its replay: orders.b no longer comes, orders.a does
                await ws.send(json.dumps({"control": "unsubscribe", "topics": ["orders.>"]}))
                self.assertEqual(json.loads(await ws.recv())["control"], "unsubscribed")
                send("orders.b", b'{"late": "b"}')
                late_a2 = send("orders.a", b'{"late": "a2"}')
                m = json.loads(await asyncio.wait_for(ws.recv(), 10))
                self.assertEqual(m["id"], late_a2)
                await ws.send(json.dumps({"control": "ping"}))
                self.assertEqual(json.loads(await ws.recv())["control"], "pong")  # nothing else came

        self.run_ws(scenario())
        self.assertEqual(n0.metric("evmesh_stream_resumes_total", **{"from": "history"}), 1)
        self.assertEqual(n0.metric("evmesh_stream_gaps_total"), 0)
        pub.close()

    def test_protocol_edges_fragments_pings_utf8_close_and_half_open(self):
        n0 = self.stream_node("n0", 'stream_heartbeat = "300ms"\n', "--no-mesh")
        host, port = n0.ready["http"].rsplit(":", 1)

        def masked(op, payload, fin=True):
            mask, n = os.urandom(4), len(payload)
            head = bytes([(0x80 if fin else 0) | op])
            head += bytes([0x80 | n]) if n < 126 else bytes([0x80 | 126]) + n.to_bytes(2, "big")
            return head + mask + bytes(b ^ mask[i % 4] for i, b in enumerate(payload))

        def connect(first_frames=b""):
            s = socket.create_connection((host, int(port)), timeout=5)
            self.addCleanup(s.close)
            s.sendall(b"GET /v1/ws HTTP/1.1\r\nHost: " + host.encode() + b"\r\nUpgrade: websocket\r\n"
                      b"Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
                      b"Sec-WebSocket-Version: 13\r\n\r\n" + first_frames)
            data = b""
            while b"\r\n\r\n" not in data:
                data += s.recv(4096)
            head, rest = data.split(b"\r\n\r\n", 1)
            return s, head, bytearray(rest)

        def frames(s, buf, count=None, timeout=5):
            """Server frames (never masked) as (opcode, payload) until `count` or EOF."""
            out, deadline = [], time.time() + timeout
            while count is None or len(out) < count:
                while len(buf) >= 2:
                    n, hl = buf[1] & 0x7F, 2
                    if n == 126:
                        n, hl = int.from_bytes(buf[2:4], "big"), 4
                    if len(buf) < hl + n:
                        break
                    out.append((buf[0] & 0x0F, bytes(buf[hl:hl + n])))
                    del buf[:hl + n]
                    if count is not None and len(out) == count:
                        return out
                if time.time() > deadline:
                    break
                s.settimeout(max(0.05, deadline - time.time()))
                try:
                    chunk = s.recv(65536)
                except socket.timeout:
                    break
                if not chunk:
                    out.append(("eof", b""))
                    break
                buf += chunk
            return out

        # the RFC 6455 1.3 sample key; a subscribe sent with the upgrade request, in two fragments
        # with a ping between them: the pong first (same payload), then the subscribe's answer
        sub = json.dumps({"control": "subscribe", "topics": ["orders.>"]}).encode()
        s, head, buf = connect(masked(1, sub[:10], fin=False) + masked(9, b"are you there") +
                               masked(0, sub[10:]))
        self.assertIn(b"101", head.split(b"\r\n")[0])
        self.assertIn(b"Sec-WebSocket-Accept: s3pPLMBiTxaQ9kYGzzhZRbK+xOo=", head)
        got = frames(s, buf, 3)
        self.assertEqual(json.loads(got[0][1])["control"], "welcome")
        self.assertEqual(got[1], (10, b"are you there"))
        self.assertEqual(json.loads(got[2][1])["control"], "subscribed")
        # the client closes with 4001: the node echoes the code and ends the connection
        s.sendall(masked(8, (4001).to_bytes(2, "big") + b"bye"))
        got = frames(s, buf)
        self.assertEqual(got[0][0], 8)
        self.assertEqual(int.from_bytes(got[0][1][:2], "big"), 4001)
        self.assertEqual(got[-1][0], "eof")

        # a text message that is not UTF-8: 1007
        s, _, buf = connect()
        frames(s, buf, 1)
        s.sendall(masked(1, b"\xc3\x28 not utf-8"))
        got = frames(s, buf)
        self.assertEqual((got[0][0], int.from_bytes(got[0][1][:2], "big")), (8, 1007))

        # a continuation with no message before it, and an oversized ping: 1002 each
        for bad in (masked(0, b"orphan"), masked(9, b"p" * 126)):
            s, _, buf = connect()
            frames(s, buf, 1)
            s.sendall(bad)
            got = frames(s, buf)
            self.assertEqual((got[0][0], int.from_bytes(got[0][1][:2], "big")), (8, 1002))

        # a wrong version: 426 naming the one this node speaks
        s = socket.create_connection((host, int(port)), timeout=5)
        self.addCleanup(s.close)
        s.sendall(b"GET /v1/ws HTTP/1.1\r\nHost: " + host.encode() + b"\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                  b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 8\r\n\r\n")
        answer = s.recv(4096)
        self.assertTrue(answer.startswith(b"HTTP/1.1 426"), answer)
        self.assertIn(b"Sec-WebSocket-Version: 13", answer)

        # half-open: a client that never answers is pinged after 300 ms of silence and closed
        # after 600 ms; one that answers the pings stays
        quiet, _, qbuf = connect()
        alive, _, abuf = connect()
        t0 = time.time()
        seen = []
        while time.time() - t0 < 2.5:
            for op, payload in frames(alive, abuf, 1, timeout=0.2):
                seen.append(op)
                if op == 9:
                    alive.sendall(masked(10, payload))
        got = frames(quiet, qbuf)
        ops = [op for op, _ in got]
        self.assertIn(9, ops)             # pinged
        self.assertEqual(ops[-1], "eof")  # then closed
        self.assertIn(9, seen)
        self.assertTrue(wait_for(lambda: n0.metric("evmesh_stream_connections", kind="websocket") == 1, 5),
                        n0.metrics())
        alive.sendall(masked(8, (1000).to_bytes(2, "big")))
        self.assertTrue(wait_for(lambda: n0.metric("evmesh_stream_connections", kind="websocket") == 0, 5))
        self.assertEqual(n0.http("/healthz"), "ok\n")

    def test_websocket_and_sse_over_tls(self):
        cert, key = os.path.join(self.tmp, "cert.pem"), os.path.join(self.tmp, "key.pem")
        p = subprocess.run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
                            "-nodes", "-keyout", key, "-out", cert, "-days", "1", "-subj", "/CN=127.0.0.1",
                            "-addext", "subjectAltName=IP:127.0.0.1"], capture_output=True, timeout=30)
        self.assertEqual(p.returncode, 0, p.stderr)
        n0 = self.stream_node("n0", "", "--no-mesh", "--http-cert-file", cert, "--http-key-file", key)
        ctx = ssl.create_default_context(cafile=cert)
        pub = Publisher(self.ctx, n0.pub, "")
        n = 2000

        async def scenario():
            async with websockets.connect(f"wss://{n0.ready['http']}/v1/ws", ssl=ctx) as ws:
                self.assertEqual(json.loads(await ws.recv())["control"], "welcome")
                await ws.send(json.dumps({"control": "subscribe", "topics": ["orders.>"]}))
                self.assertEqual(json.loads(await ws.recv())["control"], "subscribed")
                await asyncio.sleep(0.2)
                ids = [str(uuid.UUID(bytes=pub.publish("orders.tls", json.dumps({"i": i}).encode())))
                       for i in range(n)]
                got = [json.loads(await ws.recv())["id"] for _ in range(n)]
                self.assertEqual(got, ids)  # every event, in order, over TLS with gathered frames
                await ws.ping()

        self.run_ws(scenario())
        host, port = n0.ready["http"].rsplit(":", 1)
        c = http.client.HTTPSConnection(host, int(port), context=ctx, timeout=10)
        c.request("GET", "/v1/stream?topics=orders.>")
        r = c.getresponse()
        self.assertEqual((r.status, r.getheader("Content-Type")), (200, "text/event-stream"))
        time.sleep(0.2)
        eid = str(uuid.UUID(bytes=pub.publish("orders.tls", b'{"sse": true}')))
        lines = []
        while not any(line.startswith("id: ") for line in lines):
            lines.append(r.fp.readline().decode().rstrip("\n"))
        self.assertIn(f"id: {eid}", lines)
        c.close()
        pub.close()

    def test_scopes_and_tokens(self):
        n0 = self.stream_node("n0", f'database = "{os.path.join(self.tmp, "api.db")}"\n', "--no-mesh")
        host, port = n0.ready["http"].rsplit(":", 1)

        def post(path, body, key=None):
            c = http.client.HTTPConnection(host, int(port), timeout=5)
            c.request("POST", path, body=json.dumps(body),
                      headers={"Content-Type": "application/json", **({"Authorization": f"Bearer {key}"} if key else {})})
            r = c.getresponse()
            out = json.loads(r.read())
            c.close()
            return out

        admin = post("/v1/keys", {"scopes": ["admin"]})["key"]
        key = post("/v1/keys", {"scopes": ["subscribe:orders.eu.>"]}, admin)["key"]
        self.assertEqual(self.sse(n0, "topics=orders.>", read=False).resp.status, 401)
        self.assertEqual(self.sse(n0, "topics=orders.>", {"Authorization": f"Bearer {key}"}, read=False).resp.status, 403)
        ok = self.sse(n0, "topics=orders.eu.*&access_token=" + key)
        self.assertEqual(ok.resp.status, 200)
        url = f"ws://{n0.ready['http']}/v1/ws?access_token={key}"

        async def scenario():
            async with websockets.connect(url) as ws:
                await ws.recv()
                await ws.send(json.dumps({"control": "subscribe", "topics": [">"]}))
                self.assertEqual(json.loads(await ws.recv())["code"], "forbidden")
                await ws.send(json.dumps({"control": "subscribe", "topics": ["orders.eu.created"]}))
                self.assertEqual(json.loads(await ws.recv())["control"], "subscribed")
            with self.assertRaises(websockets.InvalidStatusCode) as cm:
                async with websockets.connect(f"ws://{n0.ready['http']}/v1/ws"):
                    pass
            self.assertEqual(cm.exception.status_code, 401)

        self.run_ws(scenario())


class ExampleClientsTest(StreamsBase):
    """examples/streams: the Python SSE client and the Node.js WebSocket client, as a user runs them."""

    def test_python_sse_and_node_websocket_examples_receive_every_event(self):
        n0 = self.stream_node("n0", "", "--no-mesh")
        ex = os.path.join(os.path.dirname(__file__), "..", "..", "examples", "streams")
        sse = self.spawn(["/usr/bin/python3", os.path.join(ex, "sse_client.py"), f"http://{n0.ready['http']}",
                          "orders.>", "--count", "20"], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        node_bin = shutil.which("node", path="/usr/bin:/bin:/usr/local/bin")
        self.assertIsNotNone(node_bin, "nodejs is not installed (scripts/deps.sh)")
        ws = self.spawn([node_bin, os.path.join(ex, "ws_client.js"), f"ws://{n0.ready['http']}", "orders.>", "20"],
                        stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                        env={**os.environ, "NODE_PATH": "/usr/share/nodejs"})
        self.assertTrue(wait_for(lambda: n0.metric("evmesh_stream_connections") == 2, 15),
                        n0.metric("evmesh_stream_connections"))
        time.sleep(0.3)  # the WebSocket client's subscribe message is in
        pub = Publisher(self.ctx, n0.pub, "orders.")
        ids = [str(uuid.UUID(bytes=pub.publish("orders.created", json.dumps({"i": i}).encode()))) for i in range(20)]
        pub.publish("users.created", b"{}")
        for proc, name in ((sse, "sse_client.py"), (ws, "ws_client.js")):
            out, err = proc.communicate(timeout=20)
            self.assertEqual(proc.returncode, 0, f"{name}: {err.decode()}")
            got = [line.split()[1] for line in out.decode().splitlines() if line.startswith("event ")]
            self.assertEqual(got, ids, f"{name}: {out.decode()}")
            self.assertNotIn("users.created", out.decode())
        pub.close()


if __name__ == "__main__":
    main()
