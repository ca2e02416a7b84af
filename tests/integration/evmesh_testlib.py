"""Helpers for integration tests that run real evmesh-node processes (use /usr/bin/python3).

Every process a test starts is recorded by PID and killed in tearDown, even when the test fails.
Traffic stays on loopback; each test class gets its own mesh name and beacon port.
"""
import json
import os
import shutil
import random
import select
import signal
import socket
import subprocess
import sys
import tempfile
import time
import unittest
import urllib.request

BUILD = os.environ.get("EVMESH_BUILD_DIR", os.path.join(os.path.dirname(__file__), "..", "..", "build"))
NODE = os.path.join(BUILD, "nodes", "evmesh-node")
CPP_CLIENT = os.path.join(BUILD, "examples", "sidecar_client")
INSPECTOR = os.path.join(BUILD, "tools", "mesh-inspector")
SLOW_NODE = os.path.join(BUILD, "tests", "evmesh_test_slow_node")
EXAMPLES = os.path.join(os.path.dirname(__file__), "..", "..", "examples")
PY_CLIENT = os.path.join(EXAMPLES, "python", "evmesh_client.py")
PYTHON = "/usr/bin/python3"


def free_port(kind=socket.SOCK_STREAM):
    s = socket.socket(socket.AF_INET, kind)
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


def wait_for(pred, timeout=5.0, step=0.01):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = pred()
        if value:
            return value
        time.sleep(step)
    return pred()


class Node:
    """One evmesh-node process; `ready` is the JSON of its READY line."""

    def __init__(self, proc, ready, stderr_path):
        self.proc = proc
        self.ready = ready
        self.stderr_path = stderr_path

    @property
    def pid(self):
        return self.proc.pid

    @property
    def pub(self):
        return self.ready["pub"][0]

    @property
    def sub(self):
        return self.ready["sub"][0]

    def http(self, path):
        with urllib.request.urlopen(f"http://{self.ready['http']}{path}", timeout=2) as r:
            return r.read().decode()

    def peers(self):
        return json.loads(self.http("/peers"))

    def metrics(self):
        out = {}
        for line in self.http("/metrics").splitlines():
            if line and not line.startswith("#"):
                name, value = line.rsplit(" ", 1)
                out[name] = float(value)
        return out

    def metric(self, name, **labels):
        total = 0.0
        for key, value in self.metrics().items():
            if key.split("{")[0] == name and all(f'{k}="{v}"' in key for k, v in labels.items()):
                total += value
        return total

    def log(self):
        with open(self.stderr_path, encoding="utf-8", errors="replace") as f:
            return f.read()


class NodeTestCase(unittest.TestCase):
    """Base class: starts nodes, cleans them up by PID."""

    def setUp(self):
        self.procs = []
        self.tmp = tempfile.mkdtemp(prefix="evmesh-it-")
        self.mesh = f"it-{os.getpid()}-{random.randrange(1 << 30)}"
        self.beacon_port = free_port(socket.SOCK_DGRAM)

    def tearDown(self):
        for p in self.procs:
            if p.poll() is None:
                p.kill()
            try:
                p.wait(timeout=5)
            except subprocess.TimeoutExpired:
                pass
            for f in (p.stdout, p.stderr):
                if f is not None:
                    f.close()
        keep = os.environ.get("EVMESH_KEEP_LOGS")  # a directory: the nodes' logs are copied there
        if keep:
            os.makedirs(keep, exist_ok=True)
            for name in os.listdir(self.tmp):
                if name.endswith(".log"):
                    shutil.copy(os.path.join(self.tmp, name), os.path.join(keep, f"{self.id()}.{name}"))
        for name in os.listdir(self.tmp):
            path = os.path.join(self.tmp, name)
            if os.path.isdir(path) and not os.path.islink(path):
                shutil.rmtree(path, ignore_errors=True)
            else:
                os.unlink(path)
        os.rmdir(self.tmp)

    def spawn(self, args, **kw):
        p = subprocess.Popen(args, **kw)
        self.procs.append(p)
        return p

    def start_node(self, name, *extra, http=True, timeout=10.0, beacon_port=None, env=None):
        args = [NODE, "--name", name, "--mesh", self.mesh,
                "--beacon-port", str(beacon_port or self.beacon_port),
                "--pub-endpoint", "tcp://127.0.0.1:*", "--sub-endpoint", "tcp://127.0.0.1:*",
                "--log-level", "debug"]
        if http:
            args += ["--http", "127.0.0.1:0"]
        args += list(extra)
        err = os.path.join(self.tmp, f"{name}-{len(self.procs)}.log")
        with open(err, "w") as errf:
            p = self.spawn(args, stdout=subprocess.PIPE, stderr=errf,
                           env=None if env is None else {**os.environ, **env})
        line = read_line(p, timeout)
        if not line or not line.startswith(b"READY "):
            p.kill()
            with open(err) as f:
                raise AssertionError(f"{name} did not become ready: {line!r}\n{f.read()}")
        return Node(p, json.loads(line[6:]), err)

    def client(self, *args, python=False):
        cmd = [PYTHON, PY_CLIENT] if python else [CPP_CLIENT]
        return self.spawn(cmd + [str(a) for a in args], stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def read_line(proc, timeout):
    """One stdout line of `proc`, waiting at most `timeout` seconds (no sleeps)."""
    deadline = time.monotonic() + timeout
    buf = b""
    fd = proc.stdout.fileno()
    while time.monotonic() < deadline:
        r, _, _ = select.select([fd], [], [], max(0.0, deadline - time.monotonic()))
        if not r:
            break
        chunk = os.read(fd, 1)
        if not chunk:
            break
        buf += chunk
        if chunk == b"\n":
            return buf.rstrip(b"\n")
    return buf


def main():
    result = unittest.main(exit=False, verbosity=2).result
    failed = len(result.failures) + len(result.errors)
    print(f"{result.testsRun - failed - len(result.skipped)} passed, {failed} failed, "
          f"{len(result.skipped)} skipped")
    sys.exit(1 if failed else 0)
