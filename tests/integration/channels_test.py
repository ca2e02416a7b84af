#!/usr/bin/python3
"""Channels (issue 5): durable, retried, signed delivery to real receivers started by the test —
an HTTP server for webhooks, an SMTP server (aiosmtpd) for e-mail, files and commands."""
import email
import json
import os
import signal
import statistics
import subprocess
import threading
import time
import urllib.request
import uuid

import zmq

from channel_helpers import Publisher, Receiver, channel_config, new_secret, sign, verify
from evmesh_testlib import NODE, NodeTestCase, PYTHON, free_port, main, read_line, wait_for


def post(node, path):
    req = urllib.request.Request(f"http://{node.ready['http']}{path}", data=b"", method="POST")
    with urllib.request.urlopen(req, timeout=5) as r:
        return json.loads(r.read())


def channels(node):
    return {c["name"]: c for c in json.loads(node.http("/channels"))}


def webhook(name, url, secret=None, topics=("orders.>",), retry=None, concurrency=None, breaker=None, **settings):
    s = {"url": url, "allow_private": True, **settings}
    if secret:
        s["secret"] = secret
    ch = {"name": name, "plugin": "webhook", "topics": list(topics), "settings": s}
    if retry:
        ch["retry"] = retry
    if concurrency:
        ch["concurrency"] = concurrency
    if breaker:
        ch["breaker"] = breaker
    return ch

NO_BREAKER = {"failures": 0}  # tests of the retry schedule itself


class ChannelTestCase(NodeTestCase):
    def setUp(self):
        super().setUp()
        self.ctx = zmq.Context()
        self.receivers = []
        self.publishers = []

    def tearDown(self):
        for p in self.publishers:
            p.close()
        for r in self.receivers:
            r.close()
        self.ctx.destroy(linger=0)
        super().tearDown()

    def receiver(self, **kw):
        r = Receiver(**kw)
        self.receivers.append(r)
        return r

    def node_with(self, chans, name="n0", extra=()):
        cfg = channel_config(self.tmp, chans)
        return self.start_node(name, "--config", cfg, "--no-mesh", *extra)

    def publisher(self, node, prefix="orders."):
        p = Publisher(self.ctx, node.pub, prefix)
        self.publishers.append(p)
        return p


class WebhookTest(ChannelTestCase):
    def test_verifier_matches_the_spec_test_vector(self):
        # The Standard Webhooks reference test vector: the verifier below is the one every other
        # test trusts, so it must reproduce the published signature exactly.
        self.assertEqual(sign("whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw", "msg_p5jXN8AQM9LWM0D4loKWxJek",
                              "1614265330", b'{"test": 2432232314}'),
                         "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE=")

    def test_signed_cloudevents_structured_and_binary(self):
        rcv = self.receiver()
        secret = new_secret()
        node = self.node_with([webhook("partner", rcv.url("/structured"), secret),
                               webhook("raw", rcv.url("/binary"), secret, mode="binary")])
        pub = self.publisher(node)
        ids = []
        for i in range(40):
            ids.append(pub.publish(f"orders.eu.n{i}", json.dumps({"order": i}).encode()))
        self.assertTrue(wait_for(lambda: len(rcv.received("/structured")) >= 40 and len(rcv.received("/binary")) >= 40,
                                 timeout=15), channels(node))
        want = {str(uuid.UUID(bytes=i)) for i in ids}
        for req in rcv.received("/structured"):
            h = req["headers"]
            self.assertTrue(verify(secret, h, req["body"]), h)
            self.assertFalse(verify(new_secret(), h, req["body"]))  # a wrong key fails
            self.assertEqual(h["content-type"], "application/cloudevents+json")
            ce = json.loads(req["body"])
            self.assertEqual(ce["specversion"], "1.0")
            self.assertEqual(ce["id"], h["webhook-id"])
            self.assertIn(ce["id"], want)
            self.assertTrue(ce["type"].startswith("orders.eu.n"))
            self.assertEqual(ce["data"], {"order": int(ce["type"].rsplit("n", 1)[1])})
            self.assertEqual(ce["source"], "it/test")
        self.assertEqual({r["headers"]["webhook-id"] for r in rcv.received("/structured")}, want)
        for req in rcv.received("/binary"):
            h = req["headers"]
            self.assertTrue(verify(secret, h, req["body"]), h)
            self.assertEqual(h["content-type"], "application/json")
            self.assertEqual(h["ce-id"], h["webhook-id"])
            self.assertEqual(json.loads(req["body"]), {"order": int(h["ce-type"].rsplit("n", 1)[1])})
        self.assertEqual({r["headers"]["ce-id"] for r in rcv.received("/binary")}, want)
        self.assertTrue(wait_for(lambda: channels(node)["raw"]["delivered"] == 40, timeout=5))
        st = channels(node)
        self.assertEqual(st["partner"]["delivered"], 40)
        self.assertEqual(st["partner"]["pending"], 0)
        self.assertEqual(node.metric("evmesh_channel_delivered_total", channel="raw"), 40)
        log = json.loads(node.http("/channels/partner/log?limit=5"))
        self.assertEqual(len(log), 5)
        self.assertTrue(all(r["outcome"] == "delivered" and r["code"] == 200 for r in log), log)

    def test_https_endpoint_with_a_private_ca(self):
        cert, key = os.path.join(self.tmp, "cert.pem"), os.path.join(self.tmp, "key.pem")
        subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
                        "-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1",
                        "-keyout", key, "-out", cert], check=True, capture_output=True, timeout=60)
        rcv = self.receiver(tls=(cert, key))
        secret = new_secret()
        node = self.node_with([webhook("trusted", rcv.url("/tls"), secret, ca_file=cert),
                               webhook("untrusted", rcv.url("/tls"), secret,
                                       retry={"schedule": ["0ms", "1h"]}, breaker=NO_BREAKER)])
        pub = self.publisher(node)
        ids = {str(uuid.UUID(bytes=pub.publish("orders.x", b'{"tls": true}'))) for _ in range(5)}
        self.assertTrue(wait_for(lambda: channels(node)["trusted"]["delivered"] == 5, timeout=15), channels(node))
        got = rcv.received("/tls")
        self.assertEqual({r["headers"]["webhook-id"] for r in got}, ids)
        self.assertTrue(all(verify(secret, r["headers"], r["body"]) for r in got))
        # without the CA the certificate is not trusted: retried, never sent
        self.assertTrue(wait_for(lambda: channels(node)["untrusted"]["retried"] == 5, timeout=15), channels(node))
        log = json.loads(node.http("/channels/untrusted/log?limit=1"))
        self.assertEqual(log[0]["code"], 0)
        self.assertRegex(log[0]["detail"].lower(), "certificate|ssl")
        self.assertEqual(len(rcv.received("/tls")), 5)

    def test_same_event_id_is_delivered_once(self):
        rcv = self.receiver()
        node = self.node_with([webhook("partner", rcv.url())])
        pub = self.publisher(node)
        eid = pub.publish("orders.x", b"{}")
        for _ in range(4):
            pub.publish("orders.x", b"{}", event_id=eid)  # a publisher retrying the same event
        other = pub.publish("orders.y", b"{}")
        self.assertTrue(wait_for(lambda: channels(node)["partner"]["duplicates"] == 4, timeout=10), channels(node))
        self.assertTrue(wait_for(lambda: len(rcv.received()) == 2, timeout=10))
        time.sleep(0.3)
        got = sorted(r["headers"]["webhook-id"] for r in rcv.received())
        self.assertEqual(got, sorted([str(uuid.UUID(bytes=eid)), str(uuid.UUID(bytes=other))]))

    def test_private_destinations_are_refused_unless_allowed(self):
        rcv = self.receiver()
        ch = webhook("strict", rcv.url())
        ch["settings"]["allow_private"] = False
        node = self.node_with([ch])
        pub = self.publisher(node)
        pub.publish("orders.x", b"{}")
        self.assertTrue(wait_for(lambda: channels(node)["strict"]["dead"] == 1, timeout=10), channels(node))
        dead = json.loads(node.http("/channels/strict/dead"))
        self.assertIn("loopback", dead[0]["last_detail"])
        self.assertEqual(rcv.received(), [])

    def test_down_then_up_follows_the_schedule(self):
        port = free_port()
        schedule = ["0ms", "400ms", "800ms", "1600ms", "3s", "3s", "3s", "3s"]
        node = self.node_with([webhook("later", f"http://127.0.0.1:{port}/hook",
                                       retry={"schedule": schedule, "jitter": 0}, breaker=NO_BREAKER)])
        pub = self.publisher(node)
        ids = {str(uuid.UUID(bytes=pub.publish("orders.x", b'{"n": %d}' % i))) for i in range(20)}
        # The endpoint is down (nothing listens): every event is attempted and rescheduled.
        self.assertTrue(wait_for(lambda: channels(node)["later"]["retried"] >= 60, timeout=10), channels(node))
        st = channels(node)["later"]
        self.assertEqual(st["delivered"], 0)
        self.assertEqual(st["pending"], 20)
        rcv = self.receiver(port=port)
        self.assertTrue(wait_for(lambda: {r["headers"]["webhook-id"] for r in rcv.received()} == ids, timeout=10))
        self.assertTrue(wait_for(lambda: channels(node)["later"]["pending"] == 0, timeout=5))
        # The delivery log shows each event's attempts spaced by the schedule (no jitter here).
        log = json.loads(node.http("/channels/later/log?limit=1000"))
        by_event = {}
        for r in log:
            by_event.setdefault(r["event_id"], []).append(r)
        delays = [0.4, 0.8, 1.6, 3.0, 3.0]
        for eid, rows in by_event.items():
            rows.sort(key=lambda r: r["attempt"])
            self.assertEqual(rows[-1]["outcome"], "delivered")
            self.assertEqual([r["attempt"] for r in rows], list(range(1, len(rows) + 1)))
            for a, b in zip(rows, rows[1:]):
                gap = (b["time_ms"] - a["time_ms"] - b["latency_us"] / 1000) / 1000
                self.assertGreaterEqual(gap, delays[a["attempt"] - 1] - 0.05, (eid, rows))
                # never early; late only by scheduling (a loaded 2-core CI machine: up to 2 s)
                self.assertLess(gap, delays[a["attempt"] - 1] + 2.0, (eid, rows))

    def test_breaker_holds_a_down_endpoint_and_loses_nothing(self):
        port = free_port()
        node = self.node_with([webhook("outage", f"http://127.0.0.1:{port}/hook",
                                       retry={"schedule": ["0ms", "200ms", "200ms"], "jitter": 0},
                                       breaker={"failures": 5, "pause": "300ms", "max_pause": "600ms"})])
        pub = self.publisher(node)
        ids = {str(uuid.UUID(bytes=pub.publish("orders.x", b"{}"))) for _ in range(200)}
        self.assertTrue(wait_for(lambda: channels(node)["outage"]["paused"], timeout=10), channels(node))
        time.sleep(1.5)  # down for longer than the three attempts of the schedule
        st = channels(node)["outage"]
        self.assertEqual((st["dead"], st["pending"]), (0, 200))  # held, not dead-lettered
        self.assertLess(st["attempts"], 200)  # most events were never attempted against a dead port
        self.assertEqual(node.metric("evmesh_channel_paused", channel="outage"), 1)
        rcv = self.receiver(port=port)
        self.assertTrue(wait_for(lambda: {r["headers"]["webhook-id"] for r in rcv.received()} == ids, timeout=15),
                        channels(node))
        self.assertTrue(wait_for(lambda: not channels(node)["outage"]["paused"], timeout=5))
        print(f"breaker: 200 events, endpoint down ~2 s: {st['attempts']} attempts during the outage, "
              f"{channels(node)['outage']['breaker_trips']} trip(s), 0 dead, all delivered after")

    def test_retry_after_and_gone(self):
        state = {"limited": 0}

        def behave(path, req):
            if path == "/limited":
                state["limited"] += 1
                if state["limited"] == 1:
                    return 429, {"Retry-After": "2"}, b"slow down"
                return 200, {}, b"ok"
            if path == "/gone":
                return (410, {}, b"gone") if state.get("gone", True) else (200, {}, b"ok")
            return 200, {}, b"ok"

        rcv = self.receiver(behave=behave)
        fast = {"schedule": ["0ms", "50ms", "50ms", "50ms"], "jitter": 0}
        node = self.node_with([webhook("limited", rcv.url("/limited"), retry=fast, topics=["a.>"]),
                               webhook("gone", rcv.url("/gone"), retry=fast, topics=["g.>"], concurrency=1)])
        pub = self.publisher(node, "a.")
        pub.publish("a.1", b"{}")
        self.assertTrue(wait_for(lambda: len(rcv.received("/limited")) == 2, timeout=10))
        first, second = rcv.received("/limited")
        # schedule says 50 ms, Retry-After says 2 s: the endpoint wins
        self.assertGreaterEqual(second["time"] - first["time"], 1.9)
        self.assertEqual(first["headers"]["webhook-id"], second["headers"]["webhook-id"])

        gpub = self.publisher(node, "g.")
        gpub.publish("g.1", b"{}")
        self.assertTrue(wait_for(lambda: channels(node)["gone"]["disabled"], timeout=10), channels(node))
        for i in range(5):
            gpub.publish("g.%d" % (i + 2), b"{}")
        self.assertTrue(wait_for(lambda: channels(node)["gone"]["pending"] == 6, timeout=10), channels(node))
        time.sleep(0.5)
        self.assertEqual(len(rcv.received("/gone")), 1)  # disabled: nothing more was sent
        self.assertEqual(node.metric("evmesh_channel_disabled", channel="gone"), 1)
        self.assertIn("410", channels(node)["gone"]["disabled_reason"])
        state["gone"] = False  # the partner fixed their endpoint; the operator re-enables it
        post(node, "/channels/gone/enable")
        self.assertTrue(wait_for(lambda: channels(node)["gone"]["delivered"] == 6, timeout=10), channels(node))
        self.assertEqual(len({r["headers"]["webhook-id"] for r in rcv.received("/gone")}), 6)

    def test_dead_letters_and_replay(self):
        state = {"fail": True}
        rcv = self.receiver(behave=lambda path, req: (500, {}, b"boom") if state["fail"] else (200, {}, b"ok"))
        node = self.node_with([webhook("flaky", rcv.url("/h"), topics=["orders.>"],
                                       retry={"schedule": ["0ms", "50ms", "100ms"], "jitter": 0},
                                       breaker=NO_BREAKER),
                               webhook("strict", rcv.url("/bad"), topics=["bad.>"])])
        pub = self.publisher(node)
        ids = {str(uuid.UUID(bytes=pub.publish("orders.x", b"{}"))) for _ in range(10)}
        self.assertTrue(wait_for(lambda: channels(node)["flaky"]["dead"] == 10, timeout=10), channels(node))
        self.assertEqual(len(rcv.received("/h")), 30)  # 3 attempts each
        dead = json.loads(node.http("/channels/flaky/dead"))
        self.assertEqual({d["event_id"] for d in dead}, ids)
        self.assertTrue(all(d["attempts"] == 3 and d["last_code"] == 500 for d in dead), dead)
        # replay one, then the rest
        state["fail"] = False
        one = sorted(ids)[0]
        self.assertEqual(post(node, f"/channels/flaky/replay?id={one}")["replayed"], 1)
        self.assertTrue(wait_for(lambda: channels(node)["flaky"]["delivered"] == 1, timeout=10))
        self.assertEqual(post(node, "/channels/flaky/replay")["replayed"], 9)
        self.assertTrue(wait_for(lambda: channels(node)["flaky"]["delivered"] == 10, timeout=10), channels(node))
        st = channels(node)["flaky"]
        self.assertEqual((st["dead"], st["pending"], st["replayed"], st["dead_lettered"]), (0, 0, 10, 10))
        # a 4xx other than 408/429 is permanent: dead-lettered at once, no retry
        bpub = self.publisher(node, "bad.")
        state["fail"] = True
        rcv.behave = lambda path, req: (400, {}, b"bad request") if path == "/bad" else (200, {}, b"ok")
        bpub.publish("bad.x", b"{}")
        self.assertTrue(wait_for(lambda: channels(node)["strict"]["dead"] == 1, timeout=10), channels(node))
        self.assertEqual(len(rcv.received("/bad")), 1)

    def test_hung_endpoint_does_not_slow_a_healthy_one(self):
        def measure(with_hung):
            rcv = self.receiver(behave=lambda path, req: "hang" if path == "/hung" else (200, {}, b"ok"),
                                hang_seconds=60)
            chans = [webhook("healthy", rcv.url("/ok"), concurrency=2)]
            if with_hung:
                chans.append(webhook("hung", rcv.url("/hung"), concurrency=2, timeout_ms=5000))
            node = self.node_with(chans, name="hung" if with_hung else "base")
            pub = self.publisher(node)
            sent = {}
            for i in range(200):
                eid = pub.publish("orders.x", b"{}")
                sent[str(uuid.UUID(bytes=eid))] = time.time()
                time.sleep(0.005)
            self.assertTrue(wait_for(lambda: len(rcv.received("/ok")) >= 200, timeout=20), channels(node))
            lat = sorted(r["time"] - sent[r["headers"]["webhook-id"]] for r in rcv.received("/ok"))
            if with_hung:
                self.assertGreaterEqual(len(rcv.received("/hung")), 2)  # both hung workers are stuck
                self.assertEqual(channels(node)["hung"]["in_flight"], 2)
            node.proc.send_signal(signal.SIGKILL)
            node.proc.wait()
            os.unlink(os.path.join(self.tmp, "outbox.db"))
            rcv.close()
            self.receivers.remove(rcv)
            return lat

        base = measure(False)
        hung = measure(True)
        p = lambda xs, q: xs[min(len(xs) - 1, int(q * len(xs)))] * 1000
        print(f"healthy endpoint latency (ms), 200 events at ~150/s: alone p50 {p(base, .5):.1f} "
              f"p99 {p(base, .99):.1f} max {base[-1]*1000:.1f}; beside a hung endpoint p50 {p(hung, .5):.1f} "
              f"p99 {p(hung, .99):.1f} max {hung[-1]*1000:.1f}")
        # The hung endpoint holds its workers for 5 s per attempt; none of that may show here.
        self.assertLess(hung[-1], 2.5)


class CrashTest(ChannelTestCase):
    def test_sigkill_during_delivery_loses_nothing(self):
        total = 3000
        seen = []
        lock = threading.Lock()

        def behave(path, req):
            time.sleep(0.002)
            with lock:
                seen.append(req["headers"]["webhook-id"])
            return 200, {}, b"ok"

        rcv = self.receiver(behave=behave)
        secret = new_secret()
        cfg = channel_config(self.tmp, [webhook("partner", rcv.url(), secret, concurrency=8)])
        args = ("--config", cfg, "--no-mesh", "--slow-subscriber", "block")
        node = self.start_node("crash", *args)
        pub = self.publisher(node)
        ids = set()
        recovered = 0
        kills = 0
        for i in range(total):
            ids.add(str(uuid.UUID(bytes=pub.publish("orders.x", b'{"n": %d}' % i))))
        # every event is accepted (persisted) before the kills start
        self.assertTrue(wait_for(lambda: channels(node)["partner"]["accepted"] == total, timeout=30),
                        channels(node))
        # SIGKILL at fixed points of progress, so every run kills mid-delivery the same number of times
        for fraction in (0.1, 0.3, 0.5, 0.7, 0.9):
            self.assertTrue(wait_for(lambda: len(set(seen)) >= fraction * total, timeout=60, step=0.002),
                            f"{len(set(seen))} of {total}")
            node.proc.send_signal(signal.SIGKILL)
            node.proc.wait()
            kills += 1
            node = self.start_node("crash", *args)
            recovered += channels(node)["partner"]["recovered"]
        self.assertTrue(wait_for(lambda: len(set(seen)) >= total, timeout=60), f"{len(set(seen))} of {total}")
        self.assertTrue(wait_for(lambda: channels(node)["partner"]["pending"] == 0, timeout=10), channels(node))
        time.sleep(0.3)
        with lock:
            got = list(seen)
        duplicates = len(got) - len(set(got))
        print(f"crash test: {total} events, {kills} SIGKILLs during delivery, {len(got)} requests, "
              f"{duplicates} duplicates, {recovered} deliveries recovered as in flight")
        self.assertEqual(kills, 5)
        self.assertEqual(set(got), ids)  # none lost
        self.assertLessEqual(duplicates, recovered)  # duplicates only from claimed (in-flight) rows
        for r in rcv.received():
            self.assertTrue(verify(secret, r["headers"], r["body"]))


class EmailTest(ChannelTestCase):
    def test_smtp_server_receives_templated_mail(self):
        from aiosmtpd.controller import Controller

        class Handler:
            def __init__(self):
                self.messages = []

            async def handle_DATA(self, server, session, envelope):
                self.messages.append((envelope.mail_from, list(envelope.rcpt_tos), envelope.content))
                return "250 OK"

        handler = Handler()
        port = free_port()
        smtp = Controller(handler, hostname="127.0.0.1", port=port)
        smtp.start()
        self.addCleanup(smtp.stop)
        node = self.node_with([{"name": "ops-mail", "plugin": "email", "topics": ["alerts.>"],
                                "settings": {"url": f"smtp://127.0.0.1:{port}", "tls": "none",
                                             "from": "evmesh@example.test",
                                             "to": ["ops@example.test", "audit@example.test"],
                                             "subject": "Alert {{topic}} ({{id}})",
                                             "body": "Event {{id}} on {{topic}} from {{source}}:\n{{payload}}\n"}}])
        pub = self.publisher(node, "alerts.")
        ids = [str(uuid.UUID(bytes=pub.publish(f"alerts.disk.n{i}", b'{"free": "1%"}'))) for i in range(3)]
        self.assertTrue(wait_for(lambda: len(handler.messages) == 3, timeout=15), channels(node))
        for mail_from, rcpt, content in handler.messages:
            self.assertEqual(mail_from, "evmesh@example.test")
            self.assertEqual(rcpt, ["ops@example.test", "audit@example.test"])
            msg = email.message_from_bytes(content)
            eid = msg["X-Evmesh-Event-Id"]
            self.assertIn(eid, ids)
            self.assertEqual(msg["Subject"], f"Alert {msg['X-Evmesh-Topic']} ({eid})")
            self.assertIn(eid, msg["Message-ID"])
            body = msg.get_payload(decode=True).decode()
            self.assertIn(f"Event {eid} on alerts.disk.n", body)
            self.assertIn('{"free": "1%"}', body)
        # the server has the mail when DATA is answered; the node counts it delivered once the
        # SMTP exchange is over and the outbox recorded it: a moment later
        self.assertTrue(wait_for(lambda: channels(node)["ops-mail"]["delivered"] == 3, timeout=10), channels(node))


class FileExecTest(ChannelTestCase):
    def test_file_channel_appends_json_lines_and_rotates(self):
        path = os.path.join(self.tmp, "audit.jsonl")
        node = self.node_with([{"name": "audit", "plugin": "file", "topics": ["orders.>"], "concurrency": 2,
                                "settings": {"path": path, "max_bytes": 4096, "max_files": 10}}])
        pub = self.publisher(node)
        ids = {str(uuid.UUID(bytes=pub.publish("orders.x", b'{"n": %d}' % i))) for i in range(60)}
        self.assertTrue(wait_for(lambda: channels(node)["audit"]["delivered"] == 60, timeout=10), channels(node))
        files = [path] + [f"{path}.{i}" for i in range(1, 11) if os.path.exists(f"{path}.{i}")]
        self.assertGreaterEqual(len(files), 3)  # rotated by size
        got = set()
        for f in files:
            self.assertLessEqual(os.path.getsize(f), 4096)
            with open(f) as fh:
                for line in fh:
                    ce = json.loads(line)
                    self.assertEqual(ce["type"], "orders.x")
                    got.add(ce["id"])
        self.assertEqual(got, ids)

    def test_exec_channel_exit_status_decides(self):
        out = os.path.join(self.tmp, "exec-out")
        script = os.path.join(self.tmp, "handler.py")
        with open(script, "w") as f:
            f.write(f"""import json, os, sys, time
ev = json.load(sys.stdin)
kind = ev["data"]["kind"]
attempt = int(os.environ["EVMESH_ATTEMPT"])
if kind == "slow":
    time.sleep(10)
if kind == "temp" and attempt == 1:
    sys.exit(75)
if kind == "bad":
    print("cannot handle this", file=sys.stderr)
    sys.exit(3)
with open({out!r}, "a") as f:
    f.write(ev["id"] + " " + kind + " " + str(attempt) + " " + os.environ["EVMESH_TOPIC"] + "\\n")
""")
        node = self.node_with([{"name": "hook", "plugin": "exec", "topics": ["jobs.>"],
                                "retry": {"schedule": ["0ms", "100ms", "100ms"], "jitter": 0},
                                "breaker": {"failures": 0},
                                "settings": {"command": [PYTHON, script], "timeout_ms": 1000}}])
        pub = self.publisher(node, "jobs.")
        ids = {}
        for kind in ("ok", "temp", "bad", "slow"):
            ids[kind] = str(uuid.UUID(bytes=pub.publish(f"jobs.{kind}", json.dumps({"kind": kind}).encode())))
        self.assertTrue(wait_for(lambda: channels(node)["hook"]["delivered"] == 2 and channels(node)["hook"]["dead"] == 2,
                                 timeout=20), channels(node))
        with open(out) as f:
            lines = sorted(l.split() for l in f)
        self.assertEqual(lines, sorted([[ids["ok"], "ok", "1", "jobs.ok"], [ids["temp"], "temp", "2", "jobs.temp"]]))
        dead = {d["event_id"]: d for d in json.loads(node.http("/channels/hook/dead"))}
        self.assertEqual(dead[ids["bad"]]["attempts"], 1)  # exit 3: permanent
        self.assertEqual(dead[ids["bad"]]["last_code"], 3)
        self.assertIn("cannot handle this", dead[ids["bad"]]["last_detail"])
        self.assertEqual(dead[ids["slow"]]["attempts"], 3)  # timeouts are retried, then dead
        self.assertIn("timed out", dead[ids["slow"]]["last_detail"])


class InspectorTest(ChannelTestCase):
    def test_stats_event_reports_channels_to_mesh_inspector(self):
        from evmesh_testlib import INSPECTOR
        rcv = self.receiver(behave=lambda path, req: (200, {}, b"ok") if path == "/ok" else (500, {}, b"no"))
        cfg = channel_config(self.tmp, [webhook("good", rcv.url("/ok")),
                                        webhook("bad", rcv.url("/err"), retry={"schedule": ["0ms", "1h"]},
                                                breaker=NO_BREAKER)])
        node = self.start_node("chan-node", "--config", cfg)
        pub = self.publisher(node)
        for i in range(7):
            pub.publish("orders.x", b"{}")
        self.assertTrue(wait_for(lambda: channels(node)["good"]["delivered"] == 7 and channels(node)["bad"]["retried"] == 7,
                                 timeout=10), channels(node))
        p = subprocess.run([INSPECTOR, "stats", "chan-node", "--json", "--mesh", self.mesh,
                            "--beacon-port", str(self.beacon_port)], capture_output=True, timeout=30)
        self.assertEqual(p.returncode, 0, p.stderr)
        doc = json.loads(p.stdout)
        stats = doc[0] if isinstance(doc, list) else doc
        chans = {c["name"]: c for c in stats["channels"]}
        self.assertEqual(chans["good"]["plugin"], "webhook")
        self.assertEqual(chans["good"]["delivered"], 7)
        self.assertEqual(chans["good"]["pending"], 0)
        self.assertEqual(chans["bad"]["pending"], 7)
        self.assertEqual(chans["bad"]["retried"], 7)
        self.assertGreater(chans["bad"]["oldest_pending_age_ms"], 0)
        p = subprocess.run([INSPECTOR, "stats", "chan-node", "--mesh", self.mesh,
                            "--beacon-port", str(self.beacon_port)], capture_output=True, timeout=30, text=True)
        self.assertRegex(p.stdout, r"chan\s+good\s+webhook\s+ok\s+delivered 7, pending 0")
        self.assertRegex(p.stdout, r"chan\s+bad\s+webhook\s+ok\s+delivered 0, pending 7")


class ExamplePluginTest(ChannelTestCase):
    def test_example_c_plugin_delivers_through_the_node(self):
        # examples/channel-plugin/stdout_channel.c: the whole ABI in plain C, loaded like a built-in
        node = self.node_with([{"name": "example", "plugin": "stdout-example", "topics": ["orders.>"],
                                "settings": {"prefix": "ex: "}}])
        pub = self.publisher(node)
        ids = [str(uuid.UUID(bytes=pub.publish("orders.x", b"12345"))) for _ in range(3)]
        lines = [read_line(node.proc, 10).decode() for _ in range(3)]
        self.assertEqual(sorted(lines), sorted(f"ex: orders.x {i} 5" for i in ids))
        self.assertTrue(wait_for(lambda: channels(node)["example"]["delivered"] == 3, timeout=5))


class ConfigTest(ChannelTestCase):
    def run_node(self, cfg_text):
        path = os.path.join(self.tmp, "bad.toml")
        with open(path, "w") as f:
            f.write(cfg_text)
        p = subprocess.run([NODE, "--config", path, "--no-mesh", "--pub-endpoint", "tcp://127.0.0.1:*",
                            "--sub-endpoint", "tcp://127.0.0.1:*", "--mesh", self.mesh],
                           capture_output=True, text=True, timeout=20)
        return p.returncode, p.stderr

    def test_broken_channel_configs_are_refused_with_one_line(self):
        ob = f'[outbox]\npath = "{self.tmp}/o.db"\n'
        cases = [
            ('[[channel]]\nname = "a"\nplugin = "webhook"\ntopics = ["x"]\n', 2, "outbox.path"),
            (ob + '[[channel]]\nname = "a"\nplugin = "nope"\ntopics = ["x"]\n', 2, "plugin 'nope' not found"),
            (ob + '[[channel]]\nname = "a"\nplugin = "webhook"\ntopics = ["x"]\n[channel.settings]\n', 2, "url"),
            (ob + '[[channel]]\nname = "a"\nplugin = "webhook"\ntopics = ["x.>.y"]\n', 2, "bad topic pattern"),
            (ob + '[[channel]]\nname = "a"\nplugin = "file"\ntopics = ["x"]\nbogus = 1\n', 2, "bogus"),
            (ob + '[[channel]]\nname = "a"\nplugin = "file"\ntopics = ["x"]\n[channel.retry]\nschedule = ["5 parsecs"]\n',
             2, "duration"),
        ]
        for text, code, needle in cases:
            rc, err = self.run_node(text)
            self.assertEqual(rc, code, (text, err))
            self.assertIn(needle, err, text)
            self.assertEqual(len(err.strip().splitlines()), 1, err)


if __name__ == "__main__":
    main()
