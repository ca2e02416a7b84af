#!/usr/bin/python3
"""Queue-group throughput: an evmesh durable consumer shared by M pull members against a NATS core
queue group and a NATS JetStream work-queue pull consumer with M members, in one run, on loopback
(use /usr/bin/python3; nats-server from Debian, started and stopped here by PID).

    queue_bench.py [--events N] [--members M] [--batch B] [--quick]

Every side is measured the same way: N events are stored (evmesh history; JetStream stream) or,
for the core queue group, published while the members run; then M member processes, each a Python
client written from the protocol (examples/python/pull.py for evmesh; a raw NATS protocol client
here), take them in batches of B and acknowledge each batch (evmesh; JetStream `+ACK` per
message, as its protocol has no batch ack). The figure is events processed per second from the
members' start to the last acknowledgement (or receipt, for core NATS, which has no acks).
Prints a table and the ratios; `--quick` runs small and prints "queue_bench: N passed, M failed".
"""
import argparse
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
import uuid

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "integration"))
from evmesh_testlib import BUILD, EXAMPLES, PYTHON, free_port, read_line, wait_for  # noqa: E402

NODE = os.path.join(BUILD, "nodes", "evmesh-node")
PY_CLIENT = os.path.join(EXAMPLES, "python", "evmesh_client.py")
PULL = os.path.join(EXAMPLES, "python", "pull.py")

# A NATS member (core queue group or JetStream pull), run as `queue_bench.py --nats-member ...`.


class Nats:
    def __init__(self, port):
        self.s = socket.create_connection(("127.0.0.1", port))
        self.s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.buf = b""
        self.line()
        self.s.sendall(b'CONNECT {"verbose":false,"pedantic":false,"headers":true}\r\nPING\r\n')
        while self.line() != b"PONG":
            pass

    def fill(self):
        c = self.s.recv(1 << 20)
        if not c:
            raise ConnectionError("closed")
        self.buf += c

    def line(self):
        while b"\r\n" not in self.buf:
            self.fill()
        ln, self.buf = self.buf.split(b"\r\n", 1)
        return ln

    def take(self, n):
        while len(self.buf) < n + 2:
            self.fill()
        d, self.buf = self.buf[:n], self.buf[n + 2:]
        return d

    def next(self):
        """(subject, reply, headers bytes, data) or None for PONG."""
        while True:
            ln = self.line()
            if ln == b"PING":
                self.s.sendall(b"PONG\r\n")
                continue
            if ln == b"PONG":
                return None
            p = ln.split()
            if p[0] == b"MSG":
                reply = p[3].decode() if len(p) == 5 else ""
                return p[1].decode(), reply, b"", self.take(int(p[-1]))
            if p[0] == b"HMSG":
                reply = p[3].decode() if len(p) == 6 else ""
                raw = self.take(int(p[-1]))
                h = int(p[-2])
                return p[1].decode(), reply, raw[:h], raw[h:]
            if p[0] == b"-ERR":
                raise RuntimeError(ln)

    def pub(self, subject, data=b"", reply=""):
        r = f" {reply}" if reply else ""
        self.s.sendall(f"PUB {subject}{r} {len(data)}\r\n".encode() + data + b"\r\n")

    def request(self, subject, body):
        inbox = "_INBOX." + uuid.uuid4().hex
        self.s.sendall(f"SUB {inbox} 99\r\n".encode())
        self.pub(subject, json.dumps(body).encode(), inbox)
        while True:
            m = self.next()
            if m and m[0] == inbox:
                self.s.sendall(b"UNSUB 99\r\n")
                return json.loads(m[3]) if m[3] else {}


def nats_member(kind, port, count_file, batch):
    n = Nats(port)
    got = 0
    last = time.monotonic()
    if kind == "core":
        n.s.sendall(b"SUB work.> workers 1\r\n")
        n.s.settimeout(0.5)
        while time.monotonic() - last < 2.0:
            try:
                m = n.next()
            except socket.timeout:
                continue
            if m:
                got += 1
                last = time.monotonic()
    else:  # JetStream pull from the durable consumer W of stream WORK, ack each message
        inbox = "_INBOX." + uuid.uuid4().hex
        n.s.sendall(f"SUB {inbox} 1\r\n".encode())
        while time.monotonic() - last < 2.0:
            n.pub("$JS.API.CONSUMER.MSG.NEXT.WORK.W", json.dumps({"batch": batch, "expires": 500_000_000}).encode(),
                  inbox)
            k = 0
            while k < batch:
                m = n.next()
                if m is None:
                    continue
                subject, reply, headers, data = m
                if headers.startswith(b"NATS/1.0 4"):  # 404 no messages, 408 timeout: the pull is over
                    break
                if reply:
                    got += 1
                    k += 1
                    last = time.monotonic()
                    n.pub(reply, b"+ACK")
    with open(count_file, "w") as f:
        f.write(str(got))


def stop(p):
    if p.poll() is None:
        p.kill()
    p.wait()


def evmesh_run(tmp, events, members, batch):
    hdir = os.path.join(tmp, "hist")
    cfg = os.path.join(tmp, "node.toml")
    with open(cfg, "w") as f:
        f.write(f'[[history]]\nname = "work"\npatterns = ["work.>"]\ndir = "{hdir}"\n')
    node = subprocess.Popen([NODE, "--config", cfg, "--no-mesh", "--pub-endpoint", "tcp://127.0.0.1:*",
                             "--sub-endpoint", "tcp://127.0.0.1:*", "--http", "127.0.0.1:0",
                             "--slow-subscriber", "block"], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
    try:
        ready = json.loads(read_line(node, 10)[6:])
        pub, sub, http = ready["pub"][0], ready["sub"][0], ready["http"]

        def metric(name, label=""):
            with urllib.request.urlopen(f"http://{http}/metrics", timeout=2) as r:
                for line in r.read().decode().splitlines():
                    if (line.startswith(name + "{") or line.startswith(name + " ")) and label in line:
                        return float(line.rsplit(" ", 1)[1])
            return 0.0
        subprocess.run([PYTHON, PY_CLIENT, "pub", pub, "work.jobs", str(events), "job"], check=True,
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        # stored = what the node received (a ZeroMQ PUB client may drop at its HWM), once stable
        seen = []
        while len(seen) < 3 or len(set(seen[-3:])) != 1 or seen[-1] != metric("evmesh_events_in_total", 'input="client"'):
            seen.append(metric("evmesh_history_events"))
            time.sleep(0.2)
        stored = seen[-1]
        t0 = time.monotonic()
        ps = [subprocess.Popen([PYTHON, PULL, pub, sub, "work", "bench", "--batch", str(batch), "--idle", "2",
                                "--wait", "200"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
              for _ in range(members)]
        ok = wait_for(lambda: metric("evmesh_consumer_acked_total") >= stored, 300, 0.02)
        t1 = time.monotonic()
        for p in ps:
            p.wait(timeout=30)
        return stored, stored / (t1 - t0), bool(ok)
    finally:
        stop(node)


def nats_run(tmp, kind, events, members, batch):
    port = free_port()
    args = ["nats-server", "-a", "127.0.0.1", "-p", str(port)]
    if kind == "js":
        args += ["-js", "-sd", os.path.join(tmp, f"js-{port}")]
    server = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_for(lambda: _port_open(port), 10)
        n = Nats(port)
        files = [os.path.join(tmp, f"n-{kind}-{i}") for i in range(members)]
        if kind == "js":
            n.request("$JS.API.STREAM.CREATE.WORK", {"name": "WORK", "subjects": ["work.>"], "retention": "workqueue",
                                                     "storage": "file"})
            n.request("$JS.API.CONSUMER.DURABLE.CREATE.WORK.W",
                      {"stream_name": "WORK", "config": {"durable_name": "W", "ack_policy": "explicit",
                                                         "ack_wait": 30_000_000_000, "max_ack_pending": 100000}})
            for i in range(events):
                n.pub("work.jobs", b"job")
            wait_for(lambda: n.request("$JS.API.STREAM.INFO.WORK", {}).get("state", {}).get("messages", 0) >= events,
                     60, 0.05)
            stored = n.request("$JS.API.STREAM.INFO.WORK", {})["state"]["messages"]
            t0 = time.monotonic()
            ps = [subprocess.Popen([PYTHON, __file__, "--nats-member", kind, str(port), f, str(batch)]) for f in files]
            ok = wait_for(lambda: n.request("$JS.API.CONSUMER.INFO.WORK.W", {}).get("ack_floor", {})
                          .get("stream_seq", 0) >= stored, 300, 0.02)
            t1 = time.monotonic()
            for p in ps:
                p.wait(timeout=30)
            return stored, stored / (t1 - t0), bool(ok)
        # core queue group: members subscribe first, then the events are published
        ps = [subprocess.Popen([PYTHON, __file__, "--nats-member", kind, str(port), f, str(batch)]) for f in files]
        time.sleep(1.0)
        t0 = time.monotonic()
        for i in range(events):
            n.pub("work.jobs", b"job")
        n.s.sendall(b"PING\r\n")
        for p in ps:
            p.wait(timeout=300)
        got = sum(int(open(f).read() or 0) for f in files)
        t1 = time.monotonic() - 2.0  # the members' idle time
        return got, got / (t1 - t0), got == events
    finally:
        stop(server)


def _port_open(port):
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.2):
            return True
    except OSError:
        return False


def main():
    if len(sys.argv) > 1 and sys.argv[1] == "--nats-member":
        nats_member(sys.argv[2], int(sys.argv[3]), sys.argv[4], int(sys.argv[5]))
        return 0
    ap = argparse.ArgumentParser()
    ap.add_argument("--events", type=int, default=50000)
    ap.add_argument("--members", type=int, default=3)
    ap.add_argument("--batch", type=int, default=100)
    ap.add_argument("--quick", action="store_true")
    a = ap.parse_args()
    if a.quick:
        a.events = 3000
    tmp = tempfile.mkdtemp(prefix="evmesh-qbench-")
    try:
        rows = [("evmesh consumer (pull, ack per batch)", *evmesh_run(tmp, a.events, a.members, a.batch))]
        if shutil.which("nats-server"):
            rows.append(("NATS JetStream work queue (pull, ack each)", *nats_run(tmp, "js", a.events, a.members, a.batch)))
            rows.append(("NATS core queue group (push, no ack)", *nats_run(tmp, "core", a.events, a.members, a.batch)))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    print(f"queue groups: {a.events} events, {a.members} member processes (Python), batch {a.batch}, loopback")
    print(f"  {'path':44} {'events':>8} {'events/s':>10} {'evmesh/x':>9}")
    base = rows[0][2]
    failed = 0
    for name, n, eps, ok in rows:
        print(f"  {name:44} {int(n):8d} {eps:10.0f} {base / eps if eps else 0:8.2f}x{'' if ok else '  INCOMPLETE'}")
        failed += 0 if ok else 1
    print(f"queue_bench: {len(rows) - failed} passed, {failed} failed")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
