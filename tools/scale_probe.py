#!/usr/bin/python3
"""Idle cost of a host-only mesh: N evmesh-node processes that discover each other (default
discovery, a private mesh name and beacon port), measured once every node sees N-1 peers.

    tools/scale_probe.py [--nodes 8,16,32,48] [--seconds 20] [--node build/nodes/evmesh-node]

For each N it prints the CPU time the N processes used over --seconds of idleness (utime+stime
from /proc/PID/stat) as a percentage of one core, total and per node, and the RSS sum. Every
node listens on 127.0.0.1 only; each one is killed by its pid afterwards.
"""
import argparse
import json
import os
import socket
import subprocess
import sys
import time
import urllib.request

HERE = os.path.dirname(os.path.abspath(__file__))


def free_udp_port():
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def peers(http):
    with urllib.request.urlopen(f"http://{http}/peers", timeout=2) as r:
        return [p for p in json.loads(r.read()) if not p.get("observer") and p.get("state") == "connected"]


def cpu_ticks(pid):
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return int(fields[11]) + int(fields[12])  # utime + stime


def rss_kib(pid):
    with open(f"/proc/{pid}/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS:"))


def probe(node, n, seconds, form_timeout):
    mesh, port = f"scale-probe-{os.getpid()}-{n}", free_udp_port()
    procs, https = [], []
    try:
        for i in range(n):
            p = subprocess.Popen([node, "--name", f"probe{i}", "--mesh", mesh, "--beacon-port", str(port),
                                  "--pub-endpoint", "tcp://127.0.0.1:*", "--sub-endpoint", "tcp://127.0.0.1:*",
                                  "--http", "127.0.0.1:0", "--log-level", "warn"],
                                 stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
            procs.append(p)
            line = p.stdout.readline()
            if not line.startswith(b"READY "):
                raise SystemExit(f"node {i} did not start: {line!r}")
            https.append(json.loads(line[6:])["http"])
        t0 = time.monotonic()
        while any(len(peers(h)) < n - 1 for h in https):
            if time.monotonic() - t0 > form_timeout:
                raise SystemExit(f"N={n}: the mesh did not form within {form_timeout} s")
            time.sleep(0.5)
        formed_s = time.monotonic() - t0
        time.sleep(2)  # let the last joins settle before measuring
        pids = [p.pid for p in procs]
        c0, w0 = sum(cpu_ticks(p) for p in pids), time.monotonic()
        time.sleep(seconds)
        c1, w1 = sum(cpu_ticks(p) for p in pids), time.monotonic()
        rss = sum(rss_kib(p) for p in pids) / 1024
        still = all(len(peers(h)) == n - 1 for h in https)
        cpu_s = (c1 - c0) / os.sysconf("SC_CLK_TCK")
        return {"nodes": n, "formed_s": formed_s, "cpu_s": cpu_s, "cpu_pct": cpu_s / (w1 - w0) * 100,
                "rss_mib": rss, "stable": still}
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()  # by pid, only the processes started here
            p.wait()
            p.stdout.close()


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--nodes", default="8,16,32,48", help="comma-separated mesh sizes")
    ap.add_argument("--seconds", type=float, default=20.0, help="idle measurement window")
    ap.add_argument("--node", default=os.path.join(HERE, "..", "build", "nodes", "evmesh-node"))
    ap.add_argument("--form-timeout", type=float, default=60.0, help="seconds for each mesh to form")
    ap.add_argument("--json", action="store_true", help="one JSON line per mesh size")
    a = ap.parse_args()
    if not a.json:
        print(f"{'N':>4} {'formed s':>9} {'CPU s':>7} {'CPU % of a core':>16} {'per node %':>11} "
              f"{'RSS total MiB':>14} {'per node MiB':>13}  stable")
    for n in (int(x) for x in a.nodes.split(",")):
        r = probe(a.node, n, a.seconds, a.form_timeout)
        if a.json:
            print(json.dumps(r), flush=True)
        else:
            print(f"{n:>4} {r['formed_s']:>9.1f} {r['cpu_s']:>7.2f} {r['cpu_pct']:>16.1f} {r['cpu_pct'] / n:>11.2f} "
                  f"{r['rss_mib']:>14.1f} {r['rss_mib'] / n:>13.1f}  {'yes' if r['stable'] else 'NO'}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
