"""Real receivers for channel tests: an HTTP webhook receiver, a Standard Webhooks verifier written
from the spec (independent of the node's C++), and a publisher that waits for the node's
subscription. Use /usr/bin/python3."""
import base64
import hashlib
import hmac
import http.server
import json
import os
import socketserver
import threading
import time
import uuid

import msgpack
import zmq


def sign(secret, msg_id, timestamp, body):
    """Standard Webhooks v1 signature of `body` (bytes), computed from the spec."""
    key = base64.b64decode(secret[len("whsec_"):] if secret.startswith("whsec_") else secret)
    mac = hmac.new(key, f"{msg_id}.{timestamp}.".encode() + body, hashlib.sha256).digest()
    return "v1," + base64.b64encode(mac).decode()


def verify(secret, headers, body, tolerance=300):
    """True when the webhook-signature header carries a valid v1 signature of this request."""
    msg_id = headers.get("webhook-id")
    ts = headers.get("webhook-timestamp")
    sig = headers.get("webhook-signature")
    if not (msg_id and ts and sig):
        return False
    if abs(time.time() - int(ts)) > tolerance:
        return False
    expected = sign(secret, msg_id, ts, body)
    return any(hmac.compare_digest(expected, s) for s in sig.split(" "))


def new_secret():
    return "whsec_" + base64.b64encode(os.urandom(24)).decode()


class Receiver:
    """A threaded HTTP server on 127.0.0.1 recording every POST. `behave(path, req)` decides the
    answer: returns (status, headers dict, body) or the string "hang" (sleeps `hang_seconds`)."""

    def __init__(self, port=0, behave=None, hang_seconds=30.0, tls=None):
        self.requests = []  # (time, path, headers, body)
        self.lock = threading.Lock()
        self.behave = behave or (lambda path, req: (200, {}, b"ok"))
        self.hang_seconds = hang_seconds
        self.release = threading.Event()
        outer = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"
            disable_nagle_algorithm = True  # headers and body go out in separate writes

            def do_POST(self):
                n = int(self.headers.get("content-length", "0"))
                body = self.rfile.read(n)
                req = {"time": time.time(), "path": self.path,
                       "headers": {k.lower(): v for k, v in self.headers.items()}, "body": body}
                with outer.lock:
                    outer.requests.append(req)
                answer = outer.behave(self.path, req)
                if answer == "hang":
                    outer.release.wait(outer.hang_seconds)
                    answer = (200, {}, b"late")
                status, headers, payload = answer
                try:
                    self.send_response(status)
                    for k, v in headers.items():
                        self.send_header(k, v)
                    self.send_header("content-length", str(len(payload)))
                    self.end_headers()
                    self.wfile.write(payload)
                except OSError:
                    pass

            def log_message(self, *args):
                pass

        class Server(socketserver.ThreadingMixIn, http.server.HTTPServer):
            daemon_threads = True
            allow_reuse_address = True
            request_queue_size = 128

            def handle_error(self, request, client_address):
                pass  # a client killed mid-request (the crash test) is expected

        self.server = Server(("127.0.0.1", port), Handler)
        self.port = self.server.server_address[1]
        self.scheme = "http"
        if tls:  # (certfile, keyfile): serve https
            import ssl
            context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            context.load_cert_chain(*tls)
            self.server.socket = context.wrap_socket(self.server.socket, server_side=True)
            self.scheme = "https"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def url(self, path="/hook"):
        return f"{self.scheme}://127.0.0.1:{self.port}{path}"

    def received(self, path=None):
        with self.lock:
            return [r for r in self.requests if path is None or r["path"] == path]

    def close(self):
        self.release.set()
        self.server.shutdown()
        self.server.server_close()


def event_bytes(topic, payload, event_id=None, content_type="application/json", seq=0):
    """A complete envelope (docs/PROTOCOL.md) with a chosen id, or a fresh UUIDv4-shaped id."""
    eid = event_id or uuid.uuid4().bytes
    body = msgpack.packb([1, eid, "it/test", time.time_ns(), seq, content_type, {}, payload], use_bin_type=True)
    return [topic.encode(), body], eid


class Publisher:
    """An XPUB connected to the node's client endpoint: it sees the node's subscriptions, so the
    test waits for them instead of sleeping."""

    def __init__(self, ctx, endpoint, prefix, timeout=10.0):
        self.sock = ctx.socket(zmq.XPUB)
        self.sock.setsockopt(zmq.LINGER, 2000)
        self.sock.setsockopt(zmq.SNDHWM, 0)
        self.sock.connect(endpoint)
        self.sock.setsockopt(zmq.RCVTIMEO, int(timeout * 1000))
        want = b"\x01" + prefix.encode()
        while True:
            msg = self.sock.recv()  # raises zmq.Again after `timeout`
            if msg.startswith(want):
                break

    def publish(self, topic, payload, **kw):
        frames, eid = event_bytes(topic, payload, **kw)
        self.sock.send_multipart(frames)
        return eid

    def close(self):
        self.sock.close()


def channel_config(tmp, channels, outbox="outbox.db"):
    """Writes a node config with [outbox] and [[channel]] tables; `channels` is a list of dicts:
    name, plugin, topics, settings (dict), retry (dict), breaker (dict), concurrency."""
    lines = ["[outbox]", f'path = {json.dumps(os.path.join(tmp, outbox))}', ""]
    for ch in channels:
        lines += ["[[channel]]", f'name = {json.dumps(ch["name"])}', f'plugin = {json.dumps(ch["plugin"])}',
                  f'topics = {json.dumps(ch["topics"])}']
        if "concurrency" in ch:
            lines.append(f'concurrency = {ch["concurrency"]}')
        for table in ("retry", "breaker"):
            if table in ch:
                lines.append(f"[channel.{table}]")
                for k, v in ch[table].items():
                    lines.append(f"{k} = {json.dumps(v)}")
        lines.append("[channel.settings]")
        for k, v in ch.get("settings", {}).items():
            if isinstance(v, dict):
                lines.append(f"{k} = {{ " + ", ".join(f"{json.dumps(a)} = {json.dumps(b)}" for a, b in v.items()) + " }")
            else:
                lines.append(f"{k} = {json.dumps(v)}")
        lines.append("")
    path = os.path.join(tmp, "channels.toml")
    with open(path, "w") as f:
        f.write("\n".join(lines))
    return path
