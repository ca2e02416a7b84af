#!/usr/bin/python3
"""Bridge benchmark (docs/BRIDGES.md#throughput): per broker, events/s through an evmesh-node
channel with the bridge plugin, from the first event published to the last one acknowledged by the
broker, beside the broker's own client sending the same number of messages of the same size with
the same acknowledgement, in the same run on the same machine:

  mqtt       mosquitto_pub -l -q 1 (one message per stdin line)
  redis      redis-cli --pipe (XADD ... MAXLEN ~)
  nats       libnats publish + one flush            (evmesh_bridge_native nats)
  jetstream  libnats async JetStream publish, acks  (evmesh_bridge_native jetstream)
  amqp       rabbitmq-c with confirms, 256 in flight (evmesh_bridge_native amqp)
  kafka      librdkafka idempotent producer        (evmesh_kafka_mock produce), against the mock cluster

The bridge waits for each event's acknowledgement before the worker takes the next one, so its
rate is about concurrency / round trip; the native clients pipeline. Every broker is started on
free loopback ports in a temporary directory and killed at the end (also on failure).

  bridge_bench.py [--quick] [--events N] [--size BYTES] [--concurrency C] [--only a,b] [--reps R]
"""
import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import uuid

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "integration"))

import msgpack  # noqa: E402
import zmq  # noqa: E402

from broker_helpers import (KAFKA_MOCK, KafkaMock, Mosquitto, Nats, NatsClient, Rabbit, Redis,  # noqa: E402
                            stop_all)
from channel_helpers import Publisher, channel_config  # noqa: E402
from evmesh_testlib import BUILD, NODE, read_line, wait_for  # noqa: E402

NATIVE = os.path.join(BUILD, "tests", "evmesh_bridge_native")


class Bench:
    def __init__(self, args):
        self.args = args
        self.tmp = tempfile.mkdtemp(prefix="evmesh-bridge-bench-")
        self.brokers = []
        self.nodes = []
        self.ctx = zmq.Context()
        self.payload = json.dumps({"pad": "x" * max(0, args.size - 12)}).encode()[:max(args.size, 12)]

    def close(self):
        for p in self.nodes:
            if p.poll() is None:
                p.kill()
            p.wait()
            p.stdout.close()
        self.ctx.destroy(linger=0)
        stop_all(self.brokers)
        shutil.rmtree(self.tmp, ignore_errors=True)

    def broker(self, b):
        self.brokers.append(b)
        return b.start()

    def node(self, name, plugin, settings):
        d = os.path.join(self.tmp, "node-" + name)
        os.makedirs(d)
        cfg = channel_config(d, [{"name": name, "plugin": plugin, "topics": ["bench.>"], "settings": settings,
                                  "concurrency": self.args.concurrency}])
        with open(os.path.join(d, "node.log"), "w") as log:
            p = subprocess.Popen([NODE, "--name", name, "--config", cfg, "--no-mesh", "--mesh", f"bench-{os.getpid()}",
                                  "--pub-endpoint", "tcp://127.0.0.1:*", "--sub-endpoint", "tcp://127.0.0.1:*",
                                  "--http", "127.0.0.1:0"], stdout=subprocess.PIPE, stderr=log)
        self.nodes.append(p)
        line = read_line(p, 15)
        if not line.startswith(b"READY "):
            raise AssertionError(f"node did not start: {line!r}")
        return json.loads(line[6:])

    def through_node(self, name, plugin, settings):
        """events/s of N events published into a node and acknowledged by the broker."""
        import urllib.request
        ready = self.node(name, plugin, settings)

        def stats():
            with urllib.request.urlopen(f"http://{ready['http']}/channels", timeout=5) as r:
                return {c["name"]: c for c in json.loads(r.read())}[name]
        pub = Publisher(self.ctx, ready["pub"][0], "bench.")
        n = self.args.events
        frames = []
        for _ in range(n):
            body = msgpack.packb([1, uuid.uuid4().bytes, "bench", time.time_ns(), 0, "application/json", {},
                                  self.payload], use_bin_type=True)
            frames.append([b"bench.orders.created", body])
        t0 = time.perf_counter()
        for f in frames:
            pub.sock.send_multipart(f)
        ok = wait_for(lambda: stats()["delivered"] >= n, timeout=300, step=0.005)
        secs = time.perf_counter() - t0
        pub.close()
        st = stats()
        if not ok or st["dead"] or st["failed"]:
            raise AssertionError(f"{name}: {st}")
        return n / secs, st["retried"]

    def native(self, argv, stdin=None):
        t0 = time.perf_counter()
        p = subprocess.run(argv, input=stdin, capture_output=True, timeout=300)
        secs = time.perf_counter() - t0
        if p.returncode != 0:
            raise AssertionError(f"{argv[0]} failed: {p.stderr.decode(errors='replace')[-500:]}")
        return p, secs

    # --- one function per bridge: (bridge rate, native rate, native client, retried)

    def mqtt(self):
        m = self.broker(Mosquitto(self.tmp))
        rate, retried = self.through_node("mqtt", "mqtt", {"url": m.url, "qos": 1})
        line = self.payload.replace(b"\n", b" ")
        _, secs = self.native(["mosquitto_pub", "-h", "127.0.0.1", "-p", str(m.port), "-q", "1", "-t", "bench/native",
                               "-l"], stdin=(line + b"\n") * self.args.events)
        return rate, self.args.events / secs, "mosquitto_pub -l -q 1", retried

    def redis(self):
        r = self.broker(Redis(self.tmp))
        rate, retried = self.through_node("redis", "redis", {"url": r.url, "stream": "bench"})

        def resp(*parts):
            out = b"*%d\r\n" % len(parts)
            for x in parts:
                x = x if isinstance(x, bytes) else str(x).encode()
                out += b"$%d\r\n%s\r\n" % (len(x), x)
            return out
        cmd = resp("XADD", "native", "MAXLEN", "~", "1000000", "*", "data", self.payload) * self.args.events
        p, secs = self.native(["redis-cli", "-p", str(r.port), "--pipe"], stdin=cmd)
        if b"errors: 0" not in p.stdout:
            raise AssertionError(p.stdout)
        return rate, self.args.events / secs, "redis-cli --pipe", retried

    def nats(self):
        n = self.broker(Nats(self.tmp))
        rate, retried = self.through_node("nats", "nats", {"url": n.url})
        p, _ = self.native([NATIVE, "nats", n.url, "bench.native", str(self.args.events), str(len(self.payload))])
        return rate, json.loads(p.stdout)["rate"], "libnats publish + flush", retried

    def jetstream(self):
        n = self.broker(Nats(self.tmp, jetstream=True))
        c = NatsClient(n.port)
        for name, subj in (("BRIDGE", "bench.>"), ("NATIVE", "native.>")):
            res = c.request(f"$JS.API.STREAM.CREATE.{name}", json.dumps({"name": name, "subjects": [subj],
                                                                          "storage": "file"}).encode())
            if "error" in res:
                raise AssertionError(res)
        c.close()
        rate, retried = self.through_node("jetstream", "nats", {"url": n.url, "jetstream": True})
        p, _ = self.native([NATIVE, "jetstream", n.url, "native.x", str(self.args.events), str(len(self.payload))])
        return rate, json.loads(p.stdout)["rate"], "libnats async JetStream publish", retried

    def amqp(self):
        rb = self.broker(Rabbit(self.tmp))
        conn, ch = rb.channel()
        for q in ("bridge", "native"):
            ch.queue_declare(q, durable=True)
        conn.close()
        rate, retried = self.through_node("amqp", "amqp", {"url": rb.url, "routing_key": "bridge"})
        p, _ = self.native([NATIVE, "amqp", "127.0.0.1", str(rb.port), "native", str(self.args.events),
                            str(len(self.payload))])
        return rate, json.loads(p.stdout)["rate"], "rabbitmq-c confirms, 256 in flight", retried

    def kafka(self):
        k = self.broker(KafkaMock(self.tmp, topics=["bench", "native"]))
        rate, retried = self.through_node("kafka", "kafka", {"brokers": k.bootstrap, "topic": "bench"})
        p, _ = self.native([KAFKA_MOCK, "produce", "--bootstrap", k.bootstrap, "--topic", "native", "--count",
                            str(self.args.events), "--size", str(len(self.payload))])
        return rate, json.loads(p.stdout)["rate"], "librdkafka idempotent producer", retried


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="a short run that proves the benchmark works")
    ap.add_argument("--events", type=int, default=20000)
    ap.add_argument("--size", type=int, default=200, help="payload bytes")
    ap.add_argument("--concurrency", type=int, default=64, help="the channel's workers")
    ap.add_argument("--only", default="mqtt,redis,nats,jetstream,amqp,kafka")
    ap.add_argument("--reps", type=int, default=1, help="runs of everything; the table shows medians")
    args = ap.parse_args()
    if args.quick:
        args.events = min(args.events, 1000)
        args.reps = 1
    names = args.only.split(",")
    runs = {name: [] for name in names}
    clients = {}
    payload_len = 0
    for rep in range(args.reps):
        bench = Bench(args)  # fresh brokers, nodes and directories each run
        payload_len = len(bench.payload)
        try:
            for name in names:
                t0 = time.perf_counter()
                rate, native, client, retried = getattr(bench, name)()
                runs[name].append((rate, native, retried))
                clients[name] = client
                print(f"# run {rep + 1} {name}: {rate:,.0f} vs {native:,.0f} /s ({time.perf_counter() - t0:.1f} s)",
                      file=sys.stderr, flush=True)
        finally:
            bench.close()
    print(f"bridge benchmark: {args.events} events of {payload_len} bytes, channel concurrency "
          f"{args.concurrency}, {os.cpu_count()} cores, median of {args.reps} run(s)")
    print(f"{'bridge':<10} {'evmesh events/s':>16} {'native msgs/s':>14} {'ratio':>6}  native client")
    for name in names:
        rate = statistics.median(r[0] for r in runs[name])
        native = statistics.median(r[1] for r in runs[name])
        retried = sum(r[2] for r in runs[name])
        note = f" ({retried} retried)" if retried else ""
        print(f"{name:<10} {rate:>16,.0f} {native:>14,.0f} {rate / native:>6.2f}  {clients[name]}{note}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
