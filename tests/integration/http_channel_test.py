#!/usr/bin/python3
"""The http channel (issue 15, SMS and push): a real evmesh-node with the sms-form, fcm-v1 and
webpush presets delivering to a local HTTP receiver (127.0.0.1 only) that checks every request the
way the real service would: the form fields and basic auth of an SMS gateway, FCM's JSON and bearer
token, and for Web Push the VAPID JWT (RFC 8292, verified against the key in k=) and the payload,
decrypted per RFC 8291 with the subscription's private key. The Web Push side here is written from
the RFCs with python3-cryptography, independent of the node's C++ (OpenSSL)."""
import base64
import json
import os
import subprocess
import time
import urllib.parse
import uuid

import zmq
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from channel_helpers import Publisher, Receiver
from evmesh_testlib import NODE, NodeTestCase, main, wait_for


def b64u(data):
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def unb64u(text):
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def hkdf(salt, ikm, info, length):
    return HKDF(algorithm=hashes.SHA256(), length=length, salt=salt, info=info).derive(ikm)


def webpush_decrypt(body, ua_private, auth_secret):
    """RFC 8291 / RFC 8188 (aes128gcm) decryption as a browser does it; returns the plaintext."""
    salt, rs, idlen = body[:16], int.from_bytes(body[16:20], "big"), body[20]
    as_public = body[21:21 + idlen]
    records = body[21 + idlen:]
    assert idlen == 65 and as_public[0] == 4, "keyid must be the sender's uncompressed P-256 key"
    assert len(records) <= rs, "one record expected"
    ua_public = ua_private.public_key().public_bytes(serialization.Encoding.X962,
                                                     serialization.PublicFormat.UncompressedPoint)
    peer = ec.EllipticCurvePublicKey.from_encoded_point(ec.SECP256R1(), as_public)
    ecdh_secret = ua_private.exchange(ec.ECDH(), peer)
    ikm = hkdf(auth_secret, ecdh_secret, b"WebPush: info\x00" + ua_public + as_public, 32)
    cek = hkdf(salt, ikm, b"Content-Encoding: aes128gcm\x00", 16)
    nonce = hkdf(salt, ikm, b"Content-Encoding: nonce\x00", 12)
    padded = AESGCM(cek).decrypt(nonce, records, None)
    unpadded = padded.rstrip(b"\x00")
    assert unpadded[-1:] == b"\x02", "the last record ends with the delimiter 0x02"
    return unpadded[:-1]


def verify_vapid(authorization, audience, vapid_public_b64):
    """Checks `vapid t=<jwt>, k=<key>` per RFC 8292; returns the JWT claims."""
    assert authorization.startswith("vapid "), authorization
    params = dict(p.strip().split("=", 1) for p in authorization[len("vapid "):].split(","))
    assert params["k"] == vapid_public_b64, (params["k"], vapid_public_b64)
    head, claims, sig = params["t"].split(".")
    assert json.loads(unb64u(head)) == {"typ": "JWT", "alg": "ES256"}
    raw = unb64u(sig)
    assert len(raw) == 64, "ES256 signatures are r || s, 64 octets"
    der = encode_dss_signature(int.from_bytes(raw[:32], "big"), int.from_bytes(raw[32:], "big"))
    key = ec.EllipticCurvePublicKey.from_encoded_point(ec.SECP256R1(), unb64u(params["k"]))
    key.verify(der, f"{head}.{claims}".encode(), ec.ECDSA(hashes.SHA256()))  # raises InvalidSignature
    c = json.loads(unb64u(claims))
    assert c["aud"] == audience, (c, audience)
    assert time.time() < c["exp"] <= time.time() + 24 * 3600, c
    return c


def toml_value(v):
    if isinstance(v, dict):
        return "{ " + ", ".join(f"{json.dumps(k)} = {toml_value(x)}" for k, x in v.items()) + " }"
    if isinstance(v, list):
        return "[" + ", ".join(toml_value(x) for x in v) + "]"
    return json.dumps(v)  # strings, numbers, booleans: JSON's spelling is TOML's


def write_config(tmp, channels):
    lines = ["[outbox]", f"path = {json.dumps(os.path.join(tmp, 'outbox.db'))}", ""]
    for ch in channels:
        lines += ["[[channel]]", f"name = {json.dumps(ch['name'])}", 'plugin = "http"',
                  f"topics = {json.dumps(ch['topics'])}"]
        for table in ("retry", "breaker"):
            if table in ch:
                lines.append(f"[channel.{table}]")
                lines += [f"{k} = {toml_value(v)}" for k, v in ch[table].items()]
        lines.append("[channel.settings]")
        lines += [f"{json.dumps(k)} = {toml_value(v)}" for k, v in ch["settings"].items()]
        lines.append("")
    path = os.path.join(tmp, "http.toml")
    with open(path, "w") as f:
        f.write("\n".join(lines))
    return path


class Subscription:
    """A browser's push subscription: its P-256 key pair and auth secret, at an endpoint."""

    def __init__(self, endpoint):
        self.private = ec.generate_private_key(ec.SECP256R1())
        self.auth = os.urandom(16)
        self.endpoint = endpoint
        public = self.private.public_key().public_bytes(serialization.Encoding.X962,
                                                        serialization.PublicFormat.UncompressedPoint)
        self.json = {"endpoint": endpoint, "keys": {"p256dh": b64u(public), "auth": b64u(self.auth)}}


class HttpChannelTest(NodeTestCase):
    def setUp(self):
        super().setUp()
        self.ctx = zmq.Context()
        self.receivers, self.publishers = [], []
        # the application server's VAPID key: a PEM file for one channel, base64url for another
        self.vapid = ec.generate_private_key(ec.SECP256R1())
        self.vapid_pem = os.path.join(self.tmp, "vapid.pem")
        with open(self.vapid_pem, "wb") as f:
            f.write(self.vapid.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                             serialization.NoEncryption()))
        self.vapid_d = b64u(self.vapid.private_numbers().private_value.to_bytes(32, "big"))
        self.vapid_public = b64u(self.vapid.public_key().public_bytes(
            serialization.Encoding.X962, serialization.PublicFormat.UncompressedPoint))
        self.token_file = os.path.join(self.tmp, "fcm-token")
        with open(self.token_file, "w") as f:
            f.write("ya29.first-token\n")

    def tearDown(self):
        for p in self.publishers:
            p.close()
        for r in self.receivers:
            r.close()
        self.ctx.destroy(linger=0)
        super().tearDown()

    def receiver(self, behave=None):
        r = Receiver(behave=behave)
        self.receivers.append(r)
        return r

    def node_with(self, channels):
        return self.start_node("n0", "--config", write_config(self.tmp, channels), "--no-mesh")

    def publisher(self, node, prefix):
        p = Publisher(self.ctx, node.pub, prefix)
        self.publishers.append(p)
        return p

    def channels(self, node):
        return {c["name"]: c for c in json.loads(node.http("/channels"))}

    def sms(self, rcv, **extra):
        return {"name": "sms", "topics": ["sms.>"], "settings": {
            "preset": "sms-form", "url": rcv.url("/2010-04-01/Accounts/AC123/Messages.json"),
            "username": "AC123", "password": "s3cret:pass", "from": "+15005550006",
            "to": "{data.phone}", "text": "Order {data.order} is {data.status} ({subject})",
            "allow_private": True, **extra}}

    def fcm(self, rcv):
        return {"name": "fcm", "topics": ["fcm.>"], "settings": {
            "preset": "fcm-v1", "url": rcv.url("/v1/projects/demo-1/messages:send"),
            "bearer_token_file": self.token_file, "title": "Order {data.order}",
            "data": {"id": "{id}", "type": "{type}", "status": "{data.status}"}, "allow_private": True}}

    def push(self, name="push", topics=("push.>",), **key):
        return {"name": name, "topics": list(topics), "settings": {
            "preset": "webpush", "vapid_subject": "mailto:ops@example.com",
            **(key or {"vapid_private_key_file": self.vapid_pem}),
            "ttl_seconds": 3600, "urgency": "high", "topic": "order-{data.ref}", "allow_private": True}}

    def test_rfc8291_vector_with_the_receivers_decryption(self):
        # The receiver's decryption below is what every Web Push check trusts: it must open the
        # RFC 8291 Appendix A message.
        ua = ec.derive_private_key(int.from_bytes(unb64u("q1dXpw3UpT5VOmu_cf_v6ih07Aems3njxI-JWgLcM94"), "big"),
                                   ec.SECP256R1())
        body = unb64u("DGv6ra1nlYgDCS1FRnbzlwAAEABBBP4z9KsN6nGRTbVYI_c7VJSPQTBtkgcy27mlmlMoZIIgDll6e3vCYLocInmY"
                      "WAmS6TlzAC8wEqKK6PBru3jl7A_yl95bQpu6cVPTpK4Mqgkf1CXztLVBSt2Ks3oZwbuwXPXLWyouBWLVWGNWQexSgSxsj"
                      "_Qulcy4a-fN")
        self.assertEqual(webpush_decrypt(body, ua, unb64u("BTBZMqHH6r4Tts7J_aSIgg")),
                         b"When I grow up, I want to be a watermelon")

    def test_presets_send_what_the_services_expect(self):
        rcv = self.receiver(behave=lambda path, req: (201 if path.startswith("/push/") else 200, {}, b"{}"))
        node = self.node_with([self.sms(rcv), self.fcm(rcv), self.push(),
                               self.push("push-b64", ["push64.>"], vapid_private_key=self.vapid_d)])
        subs = [Subscription(rcv.url(f"/push/sub{i}")) for i in range(3)]
        ids = {}
        pub = self.publisher(node, "sms.")
        for i in range(3):
            # quotes, '&', '=', '+', non-ASCII and a newline must survive each target's escaping
            data = {"phone": f"+1 555-01{i:02d}", "order": f"A&B={i}", "status": 'shipped "fast"\nnow ✓',
                    "token": f"device-token-{i}", "ref": f"ref{i}", "subscription": subs[i].json}
            for prefix in ("sms", "fcm", "push"):
                ids[(prefix, i)] = str(uuid.UUID(bytes=pub.publish(f"{prefix}.orders.n{i}", json.dumps(data).encode())))
        self.assertTrue(wait_for(lambda: all(self.channels(node)[c]["delivered"] == 3 for c in ("sms", "fcm", "push")),
                                 timeout=20), self.channels(node))

        # --- SMS: form fields and basic auth
        sms = rcv.received("/2010-04-01/Accounts/AC123/Messages.json")
        self.assertEqual(len(sms), 3)
        for req in sms:
            h = req["headers"]
            self.assertEqual(h["content-type"], "application/x-www-form-urlencoded")
            self.assertEqual(h["authorization"], "Basic " + base64.b64encode(b"AC123:s3cret:pass").decode())
            form = urllib.parse.parse_qs(req["body"].decode("ascii"), strict_parsing=True)
            self.assertEqual(set(form), {"To", "From", "Body"})
            i = int(form["To"][0][-2:])
            self.assertEqual(form, {"To": [f"+1 555-01{i:02d}"], "From": ["+15005550006"],
                                    "Body": [f'Order A&B={i} is shipped "fast"\nnow ✓ ()']})

        # --- FCM HTTP v1: the message JSON and the bearer token
        fcm = rcv.received("/v1/projects/demo-1/messages:send")
        self.assertEqual(len(fcm), 3)
        for req in fcm:
            h = req["headers"]
            self.assertEqual(h["content-type"], "application/json")
            self.assertEqual(h["authorization"], "Bearer ya29.first-token")
            msg = json.loads(req["body"])
            i = int(msg["message"]["token"].rsplit("-", 1)[1])
            self.assertEqual(msg, {"message": {
                "token": f"device-token-{i}",
                "notification": {"title": f"Order A&B={i}", "body": ""},  # text defaults to {data.text}: absent
                "data": {"id": ids[("fcm", i)], "type": f"fcm.orders.n{i}", "status": 'shipped "fast"\nnow ✓'}}})

        # --- Web Push: VAPID JWT verified with the public key, the payload decrypted to the event
        audience = f"http://127.0.0.1:{rcv.port}"
        for i, sub in enumerate(subs):
            got = rcv.received(f"/push/sub{i}")
            self.assertEqual(len(got), 1)
            h = got[0]["headers"]
            self.assertEqual(h["content-encoding"], "aes128gcm")
            self.assertEqual(h["content-type"], "application/octet-stream")
            self.assertEqual(h["ttl"], "3600")
            self.assertEqual(h["urgency"], "high")
            self.assertEqual(h["topic"], f"order-ref{i}")
            claims = verify_vapid(h["authorization"], audience, self.vapid_public)
            self.assertEqual(claims["sub"], "mailto:ops@example.com")
            event = json.loads(webpush_decrypt(got[0]["body"], sub.private, sub.auth))
            self.assertEqual(event["id"], ids[("push", i)])
            self.assertEqual(event["type"], f"push.orders.n{i}")
            self.assertEqual(event["source"], "it/test")
            self.assertEqual(event["data"]["status"], 'shipped "fast"\nnow ✓')
            self.assertEqual(event["data"]["subscription"], sub.json)
            # changed claims no longer verify; another subscription's key does not decrypt
            jwt_head, _, jwt_sig = h["authorization"].split("t=", 1)[1].split(",")[0].split(".")
            forged = b64u(json.dumps({**claims, "aud": "https://elsewhere.example"}).encode())
            with self.assertRaises(InvalidSignature):
                verify_vapid(f"vapid t={jwt_head}.{forged}.{jwt_sig}, k={self.vapid_public}", audience,
                             self.vapid_public)
            with self.assertRaises(Exception):
                webpush_decrypt(got[0]["body"], Subscription("x").private, sub.auth)

        # the base64url VAPID key form signs with the same identity; the FCM token file is re-read
        with open(self.token_file, "w") as f:
            f.write("ya29.rotated-token\n")
        sub = Subscription(rcv.url("/push/b64"))
        pub.publish("push64.orders.x", json.dumps({"order": "7", "subscription": sub.json}).encode())
        pub.publish("fcm.orders.rotated", json.dumps({"token": "device-token-9", "order": "9"}).encode())
        self.assertTrue(wait_for(lambda: rcv.received("/push/b64") and len(fcm) < len(
            rcv.received("/v1/projects/demo-1/messages:send")), timeout=10), self.channels(node))
        req = rcv.received("/push/b64")[0]
        verify_vapid(req["headers"]["authorization"], audience, self.vapid_public)
        self.assertEqual(json.loads(webpush_decrypt(req["body"], sub.private, sub.auth))["type"], "push64.orders.x")
        self.assertEqual(rcv.received("/v1/projects/demo-1/messages:send")[-1]["headers"]["authorization"],
                         "Bearer ya29.rotated-token")

    def test_generic_request_from_templates(self):
        rcv = self.receiver()
        node = self.node_with([{"name": "api", "topics": ["api.>"], "settings": {
            "url": rcv.url("/users/{data.user}/notify?to={data.phone}&src={source}"),
            "headers": {"X-Order": "{data.order}", "X-Subject": "{subject}"},
            "bearer_token": "static-token",
            "json": {"event": "{id}", "text": "{data.text}", "priority": 5, "tags": ["{topic.1}", "fixed"]},
            "allow_private": True}}])
        pub = self.publisher(node, "api.")
        data = {"user": "ann/../admin?x=1", "phone": "+1 555&to=evil", "order": "A\r\nX-Injected: 1",
                "text": 'quote " backslash \\ newline \n end'}
        eid = str(uuid.UUID(bytes=pub.publish("api.orders.created", json.dumps(data).encode())))
        self.assertTrue(wait_for(lambda: len(rcv.received()) == 1, timeout=10), self.channels(node))
        req = rcv.received()[0]
        # the values stayed inside their path segment and query parameter
        path, _, query = req["path"].partition("?")
        self.assertEqual(path, "/users/ann%2F..%2Fadmin%3Fx%3D1/notify")
        self.assertEqual(urllib.parse.parse_qs(query), {"to": ["+1 555&to=evil"], "src": ["it/test"]})
        h = req["headers"]
        self.assertEqual(h["x-order"], "AX-Injected: 1")  # CR/LF removed: no second header
        self.assertNotIn("x-injected", h)
        self.assertEqual(h["x-subject"], "")
        self.assertEqual(h["authorization"], "Bearer static-token")
        self.assertEqual(h["content-type"], "application/json")
        self.assertEqual(json.loads(req["body"]), {"event": eid, "text": data["text"], "priority": 5,
                                                   "tags": ["orders", "fixed"]})

    def test_gone_subscription_is_dead_lettered_not_the_channel(self):
        rcv = self.receiver(behave=lambda path, req: (410, {}, b"push subscription has unsubscribed or expired")
                            if path == "/push/gone" else (201, {}, b""))
        node = self.node_with([self.push()])
        pub = self.publisher(node, "push.")
        gone = Subscription(rcv.url("/push/gone"))
        live = Subscription(rcv.url("/push/live"))
        gone_id = str(uuid.UUID(bytes=pub.publish("push.a", json.dumps({"order": "1", "subscription": gone.json}).encode())))
        self.assertTrue(wait_for(lambda: self.channels(node)["push"]["dead"] == 1, timeout=10), self.channels(node))
        dead = json.loads(node.http("/channels/push/dead"))
        self.assertEqual(dead[0]["event_id"], gone_id)
        self.assertEqual(dead[0]["attempts"], 1)  # permanent: no retry
        self.assertEqual(dead[0]["last_code"], 410)
        self.assertIn("push subscription gone (HTTP 410)", dead[0]["last_detail"])
        # one gone subscription does not disable the channel: the next one is delivered
        pub.publish("push.b", json.dumps({"order": "2", "subscription": live.json}).encode())
        self.assertTrue(wait_for(lambda: self.channels(node)["push"]["delivered"] == 1, timeout=10), self.channels(node))
        self.assertFalse(self.channels(node)["push"]["disabled"])
        self.assertEqual(len(rcv.received("/push/gone")), 1)

    def test_503_is_retried_then_delivered(self):
        answers = iter([(503, {}, b"busy"), (503, {}, b"busy")])
        rcv = self.receiver(behave=lambda path, req: next(answers, (201, {}, b"{}")))
        ch = self.sms(rcv)
        ch["retry"] = {"schedule": ["0ms", "200ms", "200ms", "200ms"], "jitter": 0}
        ch["breaker"] = {"failures": 0}
        node = self.node_with([ch])
        pub = self.publisher(node, "sms.")
        eid = str(uuid.UUID(bytes=pub.publish("sms.x", json.dumps({"phone": "+1", "order": "1", "status": "ok"}).encode())))
        self.assertTrue(wait_for(lambda: self.channels(node)["sms"]["delivered"] == 1, timeout=10), self.channels(node))
        st = self.channels(node)["sms"]
        self.assertEqual((st["retried"], st["dead"], st["pending"]), (2, 0, 0))
        log = sorted(json.loads(node.http("/channels/sms/log?limit=10")), key=lambda r: r["attempt"])
        self.assertEqual([(r["event_id"], r["code"], r["outcome"]) for r in log],
                         [(eid, 503, "retry"), (eid, 503, "retry"), (eid, 201, "delivered")])
        bodies = {r["body"] for r in rcv.received()}
        self.assertEqual(len(rcv.received()), 3)
        self.assertEqual(len(bodies), 1)  # the same request each time

    def test_expired_token_file_is_retried_until_refreshed(self):
        with open(self.token_file, "w") as f:
            f.write("ya29.expired\n")
        rcv = self.receiver(behave=lambda path, req: (401, {}, b'{"error": {"status": "UNAUTHENTICATED"}}')
                            if req["headers"]["authorization"] == "Bearer ya29.expired" else (200, {}, b"{}"))
        ch = self.fcm(rcv)
        ch["retry"] = {"schedule": ["0ms"] + ["200ms"] * 20, "jitter": 0}
        ch["breaker"] = {"failures": 0}
        node = self.node_with([ch])
        self.publisher(node, "fcm.").publish("fcm.x", b'{"token": "device-token-1", "order": "1"}')
        self.assertTrue(wait_for(lambda: self.channels(node)["fcm"]["retried"] >= 2, timeout=10), self.channels(node))
        self.assertEqual(self.channels(node)["fcm"]["dead"], 0)
        with open(self.token_file, "w") as f:
            f.write("ya29.refreshed\n")
        self.assertTrue(wait_for(lambda: self.channels(node)["fcm"]["delivered"] == 1, timeout=10), self.channels(node))
        self.assertEqual(rcv.received()[-1]["headers"]["authorization"], "Bearer ya29.refreshed")

    def test_private_destinations_are_refused_unless_allowed(self):
        rcv = self.receiver()
        ch = self.sms(rcv)
        del ch["settings"]["allow_private"]
        node = self.node_with([ch])
        self.publisher(node, "sms.").publish("sms.x", b'{"phone": "+1"}')
        self.assertTrue(wait_for(lambda: self.channels(node)["sms"]["dead"] == 1, timeout=10), self.channels(node))
        self.assertIn("refused destination 127.0.0.1 (loopback)",
                      json.loads(node.http("/channels/sms/dead"))[0]["last_detail"])
        self.assertEqual(rcv.received(), [])

    def test_misconfigured_channels_stop_the_node_with_one_line(self):
        base = {"preset": "webpush", "vapid_subject": "mailto:a@b.c", "vapid_private_key": self.vapid_d}
        cases = [
            ({}, "http: settings.url is required"),
            ({"url": "ftp://x/"}, "http: settings.url must be an http:// or https:// URL"),
            ({"url": "https://x/{{data.phone}}"}, "http: settings.url writes {{data.phone}}, which is the literal text"),
            ({"url": "https://x/{nope}"}, "http: settings.url has an unknown field {nope}"),
            ({"url": "https://x/", "json": {"a": 1}, "form": {"b": "c"}}, "http: settings.form and settings.json are exclusive"),
            ({"preset": "sms-form", "url": "https://x/", "from": "+1"}, "http: settings.username is required"),
            ({"preset": "fcm-v1", "project_id": "p"}, "http: settings.bearer_token (or bearer_token_file) is required"),
            ({**base, "vapid_private_key": "AAAA"}, "http: settings.vapid_private_key must be the base64url P-256"),
            ({**base, "vapid_subject": "ops@example.com"}, "http: settings.vapid_subject must be a mailto: or https: URI"),
            ({**base, "urgency": "urgent"}, "http: settings.urgency must be one of"),
            ({**base, "headers": {"TTL": "5"}}, "http: settings.headers.TTL is set by the webpush preset"),
            ({"url": "https://x/", "headers": {"Host": "y"}}, "http: settings.headers.Host is set by the plugin"),
            ({"url": "https://x/", "bogus": 1}, "http: unknown setting settings.bogus"),
        ]
        for settings, needle in cases:
            path = write_config(self.tmp, [{"name": "h", "topics": ["x.>"], "settings": settings}])
            p = subprocess.run([NODE, "--check-config", path], capture_output=True, text=True, timeout=20)
            self.assertEqual(p.returncode, 2, (settings, p.stdout, p.stderr))
            self.assertIn(needle, p.stderr, settings)
            self.assertEqual(len(p.stderr.strip().splitlines()), 1, p.stderr)


if __name__ == "__main__":
    main()
