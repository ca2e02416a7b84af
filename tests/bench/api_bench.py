#!/usr/bin/python3
"""The endpoint registry at scale (docs/API.md, issue 12): many registered endpoints, some of them
receiving, one hung; signed deliveries through evmesh-node's libcurl-multi dispatcher, against the
same events reaching a raw ZeroMQ subscriber of the node in the same run.

    api_bench.py [--endpoints 10000] [--receiving 1000] [--events 20000] [--rate 1000] [--quick]

--rate 0 publishes as fast as the API takes events (throughput); the default 1000 events/s
measures latency below saturation.

Prints: registration rate, delivery throughput, publish-to-webhook latency p50/p99 beside
publish-to-ZeroMQ-subscriber latency (ratio), node RSS with N endpoints, and whether a hung
endpoint held anything but its own slots. Loopback only; every process it starts is stopped.
"""
import argparse
import asyncio
import http.client
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid

import msgpack
import zmq

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "integration"))
from evmesh_testlib import NODE, free_port, read_line  # noqa: E402


class FastReceiver:
    """A keep-alive HTTP/1.1 receiver on asyncio (one thread): records (time, webhook-id, path)."""

    def __init__(self, hang_paths=()):
        self.got = []
        self.hang_paths = set(hang_paths)
        self.hung = 0
        self.loop = asyncio.new_event_loop()
        self.ready = threading.Event()
        self.thread = threading.Thread(target=self.run, daemon=True)
        self.thread.start()
        self.ready.wait(5)

    async def handle(self, reader, writer):
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                lines = head.decode("latin-1").split("\r\n")
                path = lines[0].split(" ")[1]
                hdr = {}
                for line in lines[1:]:
                    if ":" in line:
                        k, v = line.split(":", 1)
                        hdr[k.strip().lower()] = v.strip()
                await reader.readexactly(int(hdr.get("content-length", "0")))
                if path in self.hang_paths:
                    self.hung += 1
                    await asyncio.sleep(3600)
                self.got.append((time.time(), hdr.get("webhook-id"), path))
                writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")
        except (asyncio.IncompleteReadError, ConnectionError, asyncio.CancelledError):
            pass
        finally:
            writer.close()

    def run(self):
        asyncio.set_event_loop(self.loop)
        self.server = self.loop.run_until_complete(asyncio.start_server(self.handle, "127.0.0.1", 0, backlog=1024))
        self.port = self.server.sockets[0].getsockname()[1]
        self.ready.set()
        self.loop.run_forever()

    def close(self):
        async def shutdown():
            self.server.close()
            for t in asyncio.all_tasks():
                if t is not asyncio.current_task():
                    t.cancel()
            await asyncio.sleep(0.1)

        asyncio.run_coroutine_threadsafe(shutdown(), self.loop).result(5)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)


def call(addr, method, path, body=None, headers=None):
    host, port = addr.rsplit(":", 1)
    c = http.client.HTTPConnection(host, int(port), timeout=60)
    h = {"Content-Type": "application/json", **(headers or {})}
    c.request(method, path, body=json.dumps(body).encode() if isinstance(body, (dict, list)) else body, headers=h)
    r = c.getresponse()
    data = r.read()
    c.close()
    if r.status >= 300:
        raise SystemExit(f"{method} {path}: {r.status} {data[:200]!r}")
    return json.loads(data) if data else None


def rss_kib(pid):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


def pct(xs, p):
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(p / 100 * len(xs)))] if xs else float("nan")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--endpoints", type=int, default=10000)
    ap.add_argument("--receiving", type=int, default=1000)
    ap.add_argument("--events", type=int, default=20000)
    ap.add_argument("--rate", type=float, default=1000, help="events/s published (0 = as fast as possible)")
    ap.add_argument("--quick", action="store_true", help="1000 endpoints, 100 receiving, 2000 events (ctest)")
    a = ap.parse_args()
    if a.quick:
        a.endpoints, a.receiving, a.events = 1000, 100, 2000
    tmp = tempfile.mkdtemp(prefix="evmesh-api-bench-")
    cfg = os.path.join(tmp, "node.toml")
    with open(cfg, "w") as f:
        f.write(f'[api]\ndatabase = "{tmp}/api.db"\npublish = true\nallow_private_urls = true\n'
                f'max_endpoints = {a.endpoints + 10}\nrequest_timeout = "60s"\n')
    rcv = FastReceiver(hang_paths={"/hung"})
    node = subprocess.Popen([NODE, "--name", "bench", "--no-mesh", "--no-discovery", "--config", cfg,
                             "--http", "127.0.0.1:0", "--pub-endpoint", "tcp://127.0.0.1:*",
                             "--sub-endpoint", "tcp://127.0.0.1:*", "--log-level", "warn",
                             "--slow-subscriber", "block"],
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
    ctx = zmq.Context()
    try:
        line = read_line(node, 10)
        if not line.startswith(b"READY "):
            raise SystemExit(f"node did not start: {line!r}")
        ready = json.loads(line[6:])
        addr = ready["http"]
        rss0 = rss_kib(node.pid)
        call(addr, "POST", "/v1/apps", {"id": "bench", "name": "bench"})
        t0 = time.perf_counter()
        for i in range(a.endpoints):
            receiving = i < a.receiving
            url = f"http://127.0.0.1:{rcv.port}/ep{i}" if receiving else f"http://127.0.0.1:{rcv.port}/idle{i}"
            call(addr, "POST", "/v1/apps/bench/endpoints",
                 {"url": url, "topics": [f"bench.t{i}" if receiving else f"idle.t{i}"], "uid": f"ep{i}"})
        reg_s = time.perf_counter() - t0
        # one hung endpoint on every receiving topic: it must hold only its own slots
        call(addr, "POST", "/v1/apps/bench/endpoints",
             {"url": f"http://127.0.0.1:{rcv.port}/hung", "topics": ["bench.>"], "uid": "hung", "concurrency": 4})
        rss1 = rss_kib(node.pid)

        sub = ctx.socket(zmq.SUB)
        sub.setsockopt(zmq.RCVHWM, 0)
        sub.connect(ready["sub"][0])
        sub.setsockopt(zmq.SUBSCRIBE, b"bench.")
        zmq_got = {}

        def zmq_loop():
            while len(zmq_got) < a.events:
                if sub.poll(5000) == 0:
                    return
                topic, body = sub.recv_multipart()
                zmq_got[str(uuid.UUID(bytes=msgpack.unpackb(body, raw=True)[1]))] = time.time()

        zt = threading.Thread(target=zmq_loop, daemon=True)
        zt.start()
        time.sleep(0.5)  # the SUB's subscription reaches the node

        sent = {}
        batch = 10 if a.rate else 100
        t1 = time.perf_counter()
        for start in range(0, a.events, batch):
            if a.rate:
                ahead = t1 + start / a.rate - time.perf_counter()
                if ahead > 0:
                    time.sleep(ahead)
            evs = [{"specversion": "1.0", "id": str(uuid.uuid4()), "source": "bench",
                    "type": f"bench.t{(start + k) % a.receiving}", "data": {"k": start + k}}
                   for k in range(min(batch, a.events - start))]
            now = time.time()
            ids = call(addr, "POST", "/v1/events", json.dumps(evs).encode(),
                       {"Content-Type": "application/cloudevents-batch+json"})["ids"]
            for i in ids:
                sent[i] = now
        deadline = time.time() + 600
        while time.time() < deadline:
            if sum(1 for g in rcv.got if g[2] != "/hung") >= a.events:
                break
            time.sleep(0.05)
        t_done = time.perf_counter()
        zt.join(10)
        got = [g for g in rcv.got if g[2] != "/hung"]
        lat = [(t - sent[i]) * 1000 for t, i, _ in got if i in sent]
        zlat = [(t - sent[i]) * 1000 for i, t in zmq_got.items() if i in sent]
        rss2 = rss_kib(node.pid)
        metrics = urllib_get(addr, "/metrics")
        in_flight = [l for l in metrics.splitlines() if l.startswith("evmesh_api_deliveries_in_flight")]
        print(f"endpoints registered: {a.endpoints} (+1 hung) in {reg_s:.1f} s = {a.endpoints / reg_s:.0f}/s")
        print(f"node RSS: {rss0 / 1024:.1f} MiB empty, {rss1 / 1024:.1f} MiB with {a.endpoints} endpoints "
              f"({(rss1 - rss0) / max(1, a.endpoints):.2f} KiB/endpoint), {rss2 / 1024:.1f} MiB after the run")
        print(f"delivered: {len(got)}/{a.events} to {a.receiving} receiving endpoints in "
              f"{t_done - t1:.1f} s = {len(got) / (t_done - t1):.0f} deliveries/s "
              f"(published at {'full speed' if not a.rate else f'{a.rate:.0f} events/s'})")
        print(f"latency publish->webhook ms: p50 {pct(lat, 50):.1f} p99 {pct(lat, 99):.1f}")
        print(f"latency publish->ZeroMQ subscriber ms: p50 {pct(zlat, 50):.2f} p99 {pct(zlat, 99):.2f} "
              f"({len(zlat)} events)")
        if zlat and lat:
            print(f"ratio webhook/ZeroMQ p50: {pct(lat, 50) / max(pct(zlat, 50), 1e-3):.1f}x")
        print(f"hung endpoint: {rcv.hung} requests held (its concurrency is 4); {in_flight[0] if in_flight else ''}")
        ok = len(got) == a.events and rcv.hung <= 4
        print("RESULT", "ok" if ok else "FAILED")
        return 0 if ok else 1
    finally:
        node.terminate()
        try:
            node.wait(10)
        except subprocess.TimeoutExpired:
            node.kill()
            node.wait()
        node.stdout.close()
        rcv.close()
        ctx.destroy(linger=0)
        for name in os.listdir(tmp):
            os.unlink(os.path.join(tmp, name))
        os.rmdir(tmp)


def urllib_get(addr, path):
    import urllib.request
    with urllib.request.urlopen(f"http://{addr}{path}", timeout=5) as r:
        return r.read().decode()


if __name__ == "__main__":
    sys.exit(main())
