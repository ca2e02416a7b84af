#!/usr/bin/python3
"""The open-platform API (docs/API.md): API keys and scopes, the endpoint registry with signed,
retried, replayable deliveries through one libcurl-multi dispatcher, inbound webhooks from third
parties. Real node processes, real HTTP receivers, loopback only."""
import base64
import hashlib
import hmac
import http.client
import json
import os
import signal
import sqlite3
import subprocess
import time
import uuid

from channel_helpers import Receiver, new_secret, verify
from evmesh_testlib import NODE, NodeTestCase, main, wait_for


class ApiBase(NodeTestCase):
    def setUp(self):
        super().setUp()
        self.receivers = []
        self.db = os.path.join(self.tmp, "api.db")

    def tearDown(self):
        for r in self.receivers:
            r.close()
        for suffix in ("-wal", "-shm"):
            if os.path.exists(self.db + suffix):
                os.unlink(self.db + suffix)
        super().tearDown()

    def receiver(self, **kw):
        r = Receiver(**kw)
        self.receivers.append(r)
        return r

    def start(self, extra="", private=True, name="n0"):
        path = os.path.join(self.tmp, "node.toml")
        with open(path, "w") as f:
            f.write(f'[api]\ndatabase = "{self.db}"\npublish = true\n'
                    f'allow_private_urls = {"true" if private else "false"}\n' + extra)
        self.node = self.start_node(name, "--no-mesh", "--config", path)
        return self.node

    def call(self, method, path, body=None, key=None, headers=None, raw=None):
        host, port = self.node.ready["http"].rsplit(":", 1)
        c = http.client.HTTPConnection(host, int(port), timeout=10)
        h = dict(headers or {})
        if key:
            h["Authorization"] = "Bearer " + key
        data = raw if raw is not None else (json.dumps(body).encode() if body is not None else None)
        if data is not None and "Content-Type" not in h:
            h["Content-Type"] = "application/json"
        c.request(method, path, body=data, headers=h)
        r = c.getresponse()
        payload = r.read()
        c.close()
        ctype = r.getheader("Content-Type") or ""
        parsed = json.loads(payload) if payload and ctype.startswith("application/json") else payload
        return r.status, parsed, {k.lower(): v for k, v in r.getheaders()}

    def ok(self, expect, method, path, body=None, key=None, **kw):
        status, parsed, headers = self.call(method, path, body, key, **kw)
        self.assertEqual(status, expect, f"{method} {path}: {parsed}")
        return parsed

    def publish(self, topic, data, key=None, ce_id=None):
        ev = {"specversion": "1.0", "id": ce_id or str(uuid.uuid4()), "source": "it", "type": topic, "data": data}
        return self.ok(202, "POST", "/v1/events", key=key, raw=json.dumps(ev).encode(),
                       headers={"Content-Type": "application/cloudevents+json"})["ids"][0]

    def endpoint(self, app, url, topics, **fields):
        return self.ok(201, "POST", f"/v1/apps/{app}/endpoints", {"url": url, "topics": topics, **fields})


class KeysTest(ApiBase):
    def test_keys_scopes_rate_limits_and_audit(self):
        self.start()
        # open until the first key exists (loopback only, browser pages refused)
        self.ok(201, "POST", "/v1/apps", {"id": "acme", "name": "Acme"})
        self.ok(201, "POST", "/v1/apps", {"id": "beta", "name": "Beta"})
        admin = self.ok(201, "POST", "/v1/keys", {"scopes": ["admin"], "description": "ops"})
        self.assertRegex(admin["key"], r"^evk_[0-9a-f]{16}_[0-9a-f]{48}$")
        # stored hashed: the secret part is nowhere in the database
        with sqlite3.connect(self.db) as db:
            rows = db.execute("SELECT hash FROM api_keys").fetchall()
        secret = admin["key"][21:]
        self.assertEqual(rows[0][0], hashlib.sha256(secret.encode()).digest())
        with open(self.db, "rb") as f:
            self.assertNotIn(secret.encode(), f.read())

        status, err, headers = self.call("GET", "/v1/apps")
        self.assertEqual((status, err["error"]["code"]), (401, "unauthorized"))
        self.assertEqual(headers["www-authenticate"], "Bearer")
        wrong = admin["key"][:-1] + ("1" if admin["key"][-1] == "0" else "0")
        status, _, _ = self.call("GET", "/v1/apps", key=wrong)
        self.assertEqual(status, 401)
        self.assertEqual(len(self.ok(200, "GET", "/v1/apps", key=admin["key"])["data"]), 2)
        # the node's own admin routes need admin too
        self.assertEqual(self.call("GET", "/channels")[0], 401)
        self.ok(200, "GET", "/channels", key=admin["key"])

        app_key = self.ok(201, "POST", "/v1/keys", {"scopes": ["app:acme"]}, key=admin["key"])["key"]
        listed = self.ok(200, "GET", "/v1/apps", key=app_key)["data"]
        self.assertEqual([a["id"] for a in listed], ["acme"])
        self.assertEqual(self.call("GET", "/v1/apps/beta", key=app_key)[0], 404)
        self.assertEqual(self.call("GET", "/v1/apps/beta/endpoints", key=app_key)[0], 404)
        self.assertEqual(self.call("POST", "/v1/apps", {"name": "x"}, key=app_key)[0], 403)
        self.assertEqual(self.call("GET", "/channels", key=app_key)[0], 403)
        self.assertEqual(self.call("POST", "/v1/keys", {"scopes": ["admin"]}, key=app_key)[0], 403)
        rcv = self.receiver()
        ep = self.endpoint_with(app_key, "acme", rcv.url(), ["orders.>"])
        self.assertEqual(self.call("GET", f"/v1/apps/beta/endpoints/{ep['id']}", key=app_key)[0], 404)

        pub_key = self.ok(201, "POST", "/v1/keys", {"scopes": ["publish:orders.>"]}, key=admin["key"])["key"]
        self.publish("orders.created", {"n": 1}, key=pub_key)
        ev = {"specversion": "1.0", "id": "u1", "source": "it", "type": "users.created"}
        status, err, _ = self.call("POST", "/v1/events", key=pub_key, raw=json.dumps(ev).encode(),
                                   headers={"Content-Type": "application/cloudevents+json"})
        self.assertEqual((status, err["error"]["code"], err["error"]["field"]), (403, "forbidden", "type"))
        self.assertEqual(self.call("GET", "/v1/apps", key=pub_key)[0], 200)  # sees no app
        self.assertEqual(self.ok(200, "GET", "/v1/apps", key=pub_key)["data"], [])
        self.assertTrue(wait_for(lambda: len(rcv.received()) == 1, 10))

        # per-key rate limit: 429 with Retry-After, other keys unaffected
        slow = self.ok(201, "POST", "/v1/keys", {"scopes": ["admin"], "rate_limit": 1}, key=admin["key"])
        codes = [self.call("GET", "/v1/apps", key=slow["key"])[0] for _ in range(4)]
        self.assertIn(429, codes)
        status, err, headers = self.call("GET", "/v1/apps", key=slow["key"])
        if status == 429:
            self.assertGreaterEqual(int(headers["retry-after"]), 1)
            self.assertEqual(err["error"]["code"], "rate_limited")
        self.assertEqual(self.call("GET", "/v1/apps", key=admin["key"])[0], 200)

        # a key made by the CLI while the node runs works at once; a revoked one at once stops
        out = subprocess.run([NODE, "api-key", "--database", self.db, "create", "--scope", "app:beta"],
                             capture_output=True, text=True, timeout=10)
        self.assertEqual(out.returncode, 0, out.stderr)
        cli_key = json.loads(out.stdout)
        self.assertEqual([a["id"] for a in self.ok(200, "GET", "/v1/apps", key=cli_key["key"])["data"]], ["beta"])
        out = subprocess.run([NODE, "api-key", "--database", self.db, "revoke", cli_key["id"]],
                             capture_output=True, text=True, timeout=10)
        self.assertEqual(out.returncode, 0, out.stderr)
        self.assertEqual(self.call("GET", "/v1/apps", key=cli_key["key"])[0], 401)
        self.ok(204, "DELETE", f"/v1/keys/{slow['id']}", key=admin["key"])
        self.assertEqual(self.call("GET", "/v1/apps", key=slow["key"])[0], 401)
        bad = subprocess.run([NODE, "api-key", "--database", self.db, "create", "--scope", "root"],
                             capture_output=True, text=True, timeout=10)
        self.assertEqual(bad.returncode, 2)
        self.assertIn("scope 'root'", bad.stderr)

        # a cross-origin browser request changes nothing, even with a key
        status, err, _ = self.call("POST", "/v1/apps", {"name": "evil"}, key=admin["key"],
                                   headers={"Origin": "http://evil.example"})
        self.assertEqual((status, err["error"]["code"]), (403, "forbidden_origin"))

        audit = self.ok(200, "GET", "/v1/audit", key=admin["key"])["data"]
        actions = [a["action"] for a in audit]
        for a in ("app.create", "key.create", "endpoint.create", "key.revoke"):
            self.assertIn(a, actions)
        self.assertEqual(self.call("GET", "/v1/audit", key=app_key)[0], 403)
        self.assertGreaterEqual(self.node.metric("evmesh_api_auth_failures_total", reason="missing"), 2)
        self.assertGreaterEqual(self.node.metric("evmesh_api_rate_limited_total"), 1)

    def endpoint_with(self, key, app, url, topics):
        return self.ok(201, "POST", f"/v1/apps/{app}/endpoints", {"url": url, "topics": topics}, key=key)


class RegistryTest(ApiBase):
    def test_delivery_is_signed_and_rotation_sends_both_signatures(self):
        self.start()
        rcv = self.receiver()
        self.ok(201, "POST", "/v1/apps", {"id": "acme", "name": "Acme"})
        secret = new_secret()
        ep = self.endpoint("acme", rcv.url(), ["orders.>"], secret=secret, headers={"X-Tenant": "acme"},
                           description="orders of acme")
        self.assertEqual(ep["secret"], secret)
        eid = self.publish("orders.created", {"n": 1})
        self.publish("users.created", {"n": 2})  # not matched
        self.assertTrue(wait_for(lambda: len(rcv.received()) == 1, 10))
        req = rcv.received()[0]
        self.assertTrue(verify(secret, req["headers"], req["body"]))
        self.assertEqual(req["headers"]["webhook-id"], eid)
        self.assertEqual(req["headers"]["x-tenant"], "acme")
        body = json.loads(req["body"])
        self.assertEqual((body["id"], body["type"], body["data"]), (eid, "orders.created", {"n": 1}))

        rotated = self.ok(200, "POST", f"/v1/apps/acme/endpoints/{ep['id']}/secret/rotate", {"grace_seconds": 3600})
        self.assertEqual(rotated["previous"]["key"], secret)
        self.assertEqual(self.ok(200, "GET", f"/v1/apps/acme/endpoints/{ep['id']}/secret")["key"], rotated["key"])
        self.publish("orders.paid", {"n": 3})
        self.assertTrue(wait_for(lambda: len(rcv.received()) == 2, 10))
        req = rcv.received()[1]
        self.assertEqual(len(req["headers"]["webhook-signature"].split(" ")), 2)
        self.assertTrue(verify(rotated["key"], req["headers"], req["body"]))
        self.assertTrue(verify(secret, req["headers"], req["body"]))
        # grace 0: only the new secret signs
        self.ok(200, "POST", f"/v1/apps/acme/endpoints/{ep['id']}/secret/rotate", {"grace_seconds": 0})
        new_key = self.ok(200, "GET", f"/v1/apps/acme/endpoints/{ep['id']}/secret")["key"]
        test = self.ok(202, "POST", f"/v1/apps/acme/endpoints/{ep['id']}/test", {"data": {"hello": "partner"}})
        self.assertTrue(wait_for(lambda: len(rcv.received()) == 3, 10))
        req = rcv.received()[2]
        self.assertEqual(req["headers"]["webhook-id"], test["event_id"])
        self.assertEqual(len(req["headers"]["webhook-signature"].split(" ")), 1)
        self.assertTrue(verify(new_key, req["headers"], req["body"]))
        # the node records an attempt after the receiver answered: wait for the log to catch up
        attempts_url = f"/v1/apps/acme/endpoints/{ep['id']}/attempts"
        self.assertTrue(wait_for(lambda: len(self.ok(200, "GET", attempts_url)["data"]) == 3, 10))
        attempts = self.ok(200, "GET", attempts_url)["data"]
        self.assertEqual([a["outcome"] for a in attempts], ["delivered"] * 3)
        self.assertEqual(attempts[0]["event_id"], test["event_id"])  # newest first
        per_event = self.ok(200, "GET", f"/v1/apps/acme/events/{eid}/attempts")["data"]
        self.assertEqual([(a["endpoint_id"], a["status_code"]) for a in per_event], [(ep["id"], 200)])

    def test_retries_dead_letters_replay_and_410(self):
        self.start()
        state = {"mode": "fail"}

        def behave(path, req):
            if state["mode"] == "gone":
                return (410, {}, b"gone")
            return (500, {}, b"boom") if state["mode"] == "fail" else (200, {}, b"ok")

        rcv = self.receiver(behave=behave)
        self.ok(201, "POST", "/v1/apps", {"id": "acme", "name": "Acme"})
        ep = self.endpoint("acme", rcv.url(), ["orders.>"], retry={"schedule": ["0s", "100ms"]})
        base = f"/v1/apps/acme/endpoints/{ep['id']}"
        e1 = self.publish("orders.created", {"n": 1})
        e2 = self.publish("orders.created", {"n": 2})
        self.assertTrue(wait_for(lambda: len(self.ok(200, "GET", base + "/dead")["data"]) == 2, 10))
        dead = self.ok(200, "GET", base + "/dead")["data"]
        self.assertEqual(sorted(d["event_id"] for d in dead), sorted([e1, e2]))
        self.assertEqual(dead[0]["attempts"], 2)
        self.assertEqual(dead[0]["last_status_code"], 500)
        self.assertEqual(len(rcv.received()), 4)
        state["mode"] = "ok"
        self.assertEqual(self.ok(202, "POST", base + "/replay", {"event_id": e1})["replayed"], 1)
        self.assertTrue(wait_for(lambda: len(rcv.received()) == 5, 10))
        self.assertEqual(json.loads(rcv.received()[4]["body"])["id"], e1)
        self.assertEqual(self.call("POST", base + "/replay", {"event_id": e1})[0], 404)  # not dead anymore
        # every failed one in a time range
        self.assertEqual(self.ok(202, "POST", base + "/replay", {"since": "2020-01-01T00:00:00Z"})["replayed"], 1)
        self.assertTrue(wait_for(lambda: len(rcv.received()) == 6, 10))
        # the attempt is logged once the receiver's answer is back: it may trail the receipt a little
        def outcomes():
            return sorted(a["outcome"] for a in self.ok(200, "GET", base + "/attempts?limit=250")["data"])
        want = sorted(["retry", "dead", "retry", "dead", "delivered", "delivered"])
        self.assertTrue(wait_for(lambda: outcomes() == want, 10), outcomes())
        self.assertEqual(len(self.ok(200, "GET", base + "/attempts?outcome=dead")["data"]), 2)
        # 410 Gone disables the endpoint; its events wait and go out once it is enabled again
        state["mode"] = "gone"
        e3 = self.publish("orders.created", {"n": 3})
        self.assertTrue(wait_for(lambda: self.ok(200, "GET", base)["disabled"], 10))
        self.assertIn("410", self.ok(200, "GET", base)["disabled_reason"])
        self.publish("orders.created", {"n": 4})  # not accepted while disabled
        state["mode"] = "ok"
        self.ok(200, "PATCH", base, {"disabled": False})
        self.assertTrue(wait_for(lambda: json.loads(rcv.received()[-1]["body"])["id"] == e3, 10))
        # the receiver has answered; the node records the outcome right after
        done = lambda: self.ok(200, "GET", base)["stats"]
        self.assertTrue(wait_for(lambda: (done()["delivered"], done()["dead"], done()["pending"]) == (3, 0, 0), 10),
                        done())

    def test_a_hung_endpoint_never_delays_another(self):
        self.start("request_timeout = \"30s\"\n")
        hung = self.receiver(behave=lambda path, req: "hang", hang_seconds=60)
        fast = self.receiver()
        self.ok(201, "POST", "/v1/apps", {"id": "acme", "name": "Acme"})
        self.endpoint("acme", hung.url(), ["orders.>"], concurrency=4)
        self.endpoint("acme", fast.url(), ["orders.>"])
        n = 300
        for i in range(n):
            self.publish("orders.created", {"i": i})
        self.assertTrue(wait_for(lambda: len(fast.received()) == n, 20), len(fast.received()))
        # the hung endpoint holds its own 4 slots and nothing else
        self.assertEqual(len(hung.received()), 4)
        self.assertEqual(self.node.metric("evmesh_api_deliveries_in_flight"), 4)

    def test_registry_survives_sigkill_and_redelivers(self):
        self.start()
        port_holder = self.receiver()
        port = port_holder.port
        port_holder.close()
        self.receivers.remove(port_holder)
        self.ok(201, "POST", "/v1/apps", {"id": "acme", "name": "Acme"})
        ep = self.endpoint("acme", f"http://127.0.0.1:{port}/hook", ["orders.>"],
                           retry={"schedule": ["0s", "200ms", "200ms", "200ms", "30s"]})
        ids = [self.publish("orders.created", {"i": i}) for i in range(20)]
        # the receiver is down: every delivery fails and waits
        self.assertTrue(wait_for(lambda: len(self.ok(200, "GET", f"/v1/apps/acme/endpoints/{ep['id']}/attempts")
                                             ["data"]) >= 20, 10))
        self.node.proc.send_signal(signal.SIGKILL)
        self.node.proc.wait(5)
        rcv = self.receiver(port=port)
        self.start()
        got = self.ok(200, "GET", f"/v1/apps/acme/endpoints/{ep['id']}")
        self.assertEqual(got["url"], f"http://127.0.0.1:{port}/hook")
        self.assertTrue(wait_for(lambda: len({json.loads(r["body"])["id"] for r in rcv.received()}) == 20, 40))
        self.assertEqual({json.loads(r["body"])["id"] for r in rcv.received()}, set(ids))
        # the same event id published again is not delivered again
        self.publish("orders.created", {"i": 0}, ce_id=ids[0])
        new = self.publish("orders.created", {"i": 99})
        self.assertTrue(wait_for(lambda: any(json.loads(r["body"])["id"] == new for r in rcv.received()), 10))
        self.assertEqual(sum(json.loads(r["body"])["id"] == ids[0] for r in rcv.received()), 1)

    def test_private_addresses_are_refused_by_default(self):
        self.start(private=False)
        self.ok(201, "POST", "/v1/apps", {"id": "acme", "name": "Acme"})
        rcv = self.receiver()
        ep = self.endpoint("acme", rcv.url(), ["orders.>"], retry={"schedule": ["0s"]})
        self.publish("orders.created", {})
        base = f"/v1/apps/acme/endpoints/{ep['id']}"
        self.assertTrue(wait_for(lambda: len(self.ok(200, "GET", base + "/dead")["data"]) == 1, 10))
        self.assertIn("address not allowed", self.ok(200, "GET", base + "/attempts")["data"][0]["detail"])
        self.assertEqual(rcv.received(), [])

    def test_validation_and_pagination(self):
        self.start()
        self.ok(201, "POST", "/v1/apps", {"id": "acme", "name": "Acme"})
        for body, field in [({"url": "ftp://x/y", "topics": ["a"]}, "url"),
                            ({"topics": ["a"]}, "url"),
                            ({"url": "http://127.0.0.1:1/", "topics": ["a..b"]}, "topics"),
                            ({"url": "http://127.0.0.1:1/", "topics": []}, "topics"),
                            ({"url": "http://127.0.0.1:1/", "secret": "nope"}, "secret"),
                            ({"url": "http://127.0.0.1:1/", "headers": {"Host": "x"}}, "headers"),
                            ({"url": "http://127.0.0.1:1/", "rate_limit": -1}, "rate_limit"),
                            ({"url": "http://127.0.0.1:1/", "retry": {"schedule": []}}, "retry"),
                            ({"url": "http://127.0.0.1:1/", "colour": "red"}, "colour")]:
            status, err, _ = self.call("POST", "/v1/apps/acme/endpoints", body)
            self.assertEqual((status, err["error"]["field"]), (400, field), body)
        self.assertEqual(self.call("POST", "/v1/apps", {"id": "acme", "name": "again"})[0], 409)
        self.assertEqual(self.call("POST", "/v1/apps/nope/endpoints", {"url": "http://127.0.0.1:1/"})[0], 404)
        self.assertEqual(self.call("POST", "/v1/apps", raw=b"{not json")[0], 400)
        made = [self.endpoint("acme", "http://127.0.0.1:1/", ["t.a"])["id"] for _ in range(7)]
        seen, it = [], None
        while True:
            page = self.ok(200, "GET", "/v1/apps/acme/endpoints?limit=3" + (f"&iterator={it}" if it else ""))
            seen += [e["id"] for e in page["data"]]
            if page["done"]:
                break
            it = page["iterator"]
        self.assertEqual(sorted(seen), sorted(made))
        self.ok(204, "DELETE", f"/v1/apps/acme/endpoints/{made[0]}")
        self.assertEqual(self.call("GET", f"/v1/apps/acme/endpoints/{made[0]}")[0], 404)
        self.ok(204, "DELETE", "/v1/apps/acme")
        self.assertEqual(self.call("GET", "/v1/apps/acme")[0], 404)
        self.assertEqual(self.node.metric("evmesh_api_endpoints"), 0)


class IngestTest(ApiBase):
    def test_github_stripe_and_standard_webhooks(self):
        sw_secret = new_secret()
        self.start('[[api.ingest]]\nsource = "github"\nverify = "github"\nsecret = "gh-s3cret"\n'
                   'topic = "github.{header.x-github-event}"\n'
                   '[[api.ingest]]\nsource = "stripe"\nverify = "stripe"\nsecret = "whsec_stripe"\n'
                   'topic = "stripe.{body.type}"\n'
                   f'[[api.ingest]]\nsource = "partner"\nverify = "standard-webhooks"\nsecret = "{sw_secret}"\n'
                   'topic = "partner.{body.kind}"\n'
                   '[[api.ingest]]\nsource = "open"\ntopic = "open.{body.kind}"\n')
        rcv = self.receiver()
        self.ok(201, "POST", "/v1/apps", {"id": "ops", "name": "Ops"})
        self.endpoint("ops", rcv.url(), ["github.>", "stripe.>", "partner.>", "open.>"])

        body = json.dumps({"action": "opened", "number": 7}).encode()
        sig = "sha256=" + hmac.new(b"gh-s3cret", body, hashlib.sha256).hexdigest()
        gh = {"X-GitHub-Event": "pull_request", "X-GitHub-Delivery": "72d3162e-cc78-11e3-81ab-4c9367dc0958",
              "X-Hub-Signature-256": sig}
        self.assertEqual(self.call("POST", "/v1/ingest/github", raw=body, headers=gh)[0], 202)
        again = self.ok(202, "POST", "/v1/ingest/github", raw=body, headers=gh)
        self.assertEqual(again["duplicates"], 1)  # GitHub redelivers with the same delivery id
        bad = dict(gh, **{"X-Hub-Signature-256": "sha256=" + "0" * 64})
        status, err, _ = self.call("POST", "/v1/ingest/github", raw=body, headers=bad)
        self.assertEqual((status, err["error"]["code"]), (401, "bad_signature"))

        sbody = json.dumps({"id": "evt_1", "type": "invoice.paid"}).encode()
        t = str(int(time.time()))
        v1 = hmac.new(b"whsec_stripe", t.encode() + b"." + sbody, hashlib.sha256).hexdigest()
        self.assertEqual(self.call("POST", "/v1/ingest/stripe", raw=sbody,
                                   headers={"Stripe-Signature": f"t={t},v1={v1}"})[0], 202)
        old = str(int(time.time()) - 3600)
        v1_old = hmac.new(b"whsec_stripe", old.encode() + b"." + sbody, hashlib.sha256).hexdigest()
        status, err, _ = self.call("POST", "/v1/ingest/stripe", raw=sbody,
                                   headers={"Stripe-Signature": f"t={old},v1={v1_old}"})
        self.assertEqual(status, 401)
        self.assertIn("tolerance", err["error"]["message"])

        pbody = json.dumps({"kind": "user.signup"}).encode()
        msg_id, ts = "msg_abc", str(int(time.time()))
        key = base64.b64decode(sw_secret[6:])
        psig = "v1," + base64.b64encode(hmac.new(key, f"{msg_id}.{ts}.".encode() + pbody,
                                                 hashlib.sha256).digest()).decode()
        self.assertEqual(self.call("POST", "/v1/ingest/partner", raw=pbody,
                                   headers={"webhook-id": msg_id, "webhook-timestamp": ts,
                                            "webhook-signature": "v1,bm9wZQ== " + psig})[0], 202)
        status, _, _ = self.call("POST", "/v1/ingest/partner", raw=pbody + b" ",
                                 headers={"webhook-id": msg_id, "webhook-timestamp": ts, "webhook-signature": psig})
        self.assertEqual(status, 401)
        # a template field that is missing: 422, nothing published
        status, err, _ = self.call("POST", "/v1/ingest/open", raw=b'{"other": 1}')
        self.assertEqual((status, err["error"]["code"]), (422, "unmapped"))
        self.assertEqual(self.call("POST", "/v1/ingest/open", raw=b'{"kind": "ping"}')[0], 202)
        self.assertEqual(self.call("POST", "/v1/ingest/nope", raw=b"{}")[0], 404)

        self.assertTrue(wait_for(lambda: len(rcv.received()) == 4, 10))
        got = sorted(json.loads(r["body"])["type"] for r in rcv.received())
        self.assertEqual(got, ["github.pull_request", "open.ping", "partner.user.signup", "stripe.invoice.paid"])
        gh_event = next(json.loads(r["body"]) for r in rcv.received() if json.loads(r["body"])["type"].startswith("github"))
        self.assertEqual(gh_event["data"], {"action": "opened", "number": 7})
        self.assertEqual(gh_event["source"], "ingest/github")
        time.sleep(0.5)
        self.assertEqual(len(rcv.received()), 4)
        self.assertEqual(self.node.metric("evmesh_api_ingest_rejected_total", source="github", reason="signature"), 1)
        self.assertEqual(self.node.metric("evmesh_api_ingest_rejected_total", source="stripe", reason="signature"), 1)

        # with keys, a source without a signature of its own needs ingest:<source>
        admin = self.ok(201, "POST", "/v1/keys", {"scopes": ["admin"]})["key"]
        ingest_key = self.ok(201, "POST", "/v1/keys", {"scopes": ["ingest:open"]}, key=admin)["key"]
        other = self.ok(201, "POST", "/v1/keys", {"scopes": ["ingest:github"]}, key=admin)["key"]
        self.assertEqual(self.call("POST", "/v1/ingest/open", raw=b'{"kind": "a"}')[0], 401)
        self.assertEqual(self.call("POST", "/v1/ingest/open", raw=b'{"kind": "a"}', key=other)[0], 403)
        self.assertEqual(self.call("POST", "/v1/ingest/open", raw=b'{"kind": "a"}', key=ingest_key)[0], 202)
        # signed sources stay reachable without a key (the provider cannot send one)
        self.assertEqual(self.call("POST", "/v1/ingest/github", raw=body, headers=gh)[0], 202)

    def test_broken_ingest_config_is_one_line(self):
        path = os.path.join(self.tmp, "bad.toml")
        for text, needle in [('[api]\nlisten = "127.0.0.1:0"\n[[api.ingest]]\nsource = "gh"\nverify = "github"\n'
                              'topic = "x"\n', "needs secret"),
                             ('[api]\nlisten = "127.0.0.1:0"\n[[api.ingest]]\nsource = "gh"\nverify = "md5"\n'
                              'topic = "x"\n', "verify must be"),
                             ('[api]\ndatabase = "/tmp/x.db"\n', "needs a listener")]:
            with open(path, "w") as f:
                f.write(text)
            out = subprocess.run([NODE, "--check-config", path], capture_output=True, text=True, timeout=10)
            self.assertEqual(out.returncode, 2, out.stderr)
            self.assertIn(needle, out.stderr)
            self.assertEqual(len(out.stderr.strip().splitlines()), 1)


if __name__ == "__main__":
    main()
