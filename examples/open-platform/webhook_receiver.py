#!/usr/bin/python3
"""A partner's webhook endpoint: verifies Standard Webhooks signatures (standard library only) and
prints one line per delivery. Usage: webhook_receiver.py PORT SECRET   (listens on 127.0.0.1)."""
import base64
import hashlib
import hmac
import http.server
import json
import socketserver
import sys
import time

port, secret = int(sys.argv[1]), sys.argv[2]
key = base64.b64decode(secret.removeprefix("whsec_"))
seen = set()


class Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    disable_nagle_algorithm = True

    def do_POST(self):
        body = self.rfile.read(int(self.headers.get("content-length", "0")))
        msg_id, ts = self.headers.get("webhook-id", ""), self.headers.get("webhook-timestamp", "0")
        expected = "v1," + base64.b64encode(
            hmac.new(key, f"{msg_id}.{ts}.".encode() + body, hashlib.sha256).digest()).decode()
        signed = any(hmac.compare_digest(expected, s) for s in self.headers.get("webhook-signature", "").split())
        fresh = abs(time.time() - int(ts)) < 300
        if not (signed and fresh):
            self.answer(401, b"bad signature")
            print(f"REJECTED webhook {msg_id}: signature {'ok' if signed else 'invalid'}, "
                  f"timestamp {'fresh' if fresh else 'stale'}", flush=True)
            return
        duplicate = msg_id in seen  # webhook-id is the idempotency key
        seen.add(msg_id)
        ce = json.loads(body)
        print(f"webhook {ce['type']} id={msg_id[:13]}… signature ok{' (duplicate, ignored)' if duplicate else ''}: "
              f"{json.dumps(ce.get('data'))}", flush=True)
        self.answer(200, b"ok")

    def answer(self, status, payload):
        self.send_response(status)
        self.send_header("content-length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)

    def log_message(self, *args):
        pass


class Server(socketserver.ThreadingMixIn, http.server.HTTPServer):
    daemon_threads = True


with Server(("127.0.0.1", port), Handler) as server:
    print(f"listening on http://127.0.0.1:{port}/hooks/evmesh", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
