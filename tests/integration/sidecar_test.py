#!/usr/bin/python3
"""evmesh-node as a sidecar: real processes, real clients in Python and C++ (issue 4)."""
import json
import os
import signal
import socket
import subprocess
import time

import msgpack
import zmq

from evmesh_testlib import NODE, NodeTestCase, main, wait_for


def sub_socket(ctx, endpoint, prefix):
    s = ctx.socket(zmq.SUB)
    s.setsockopt(zmq.SUBSCRIBE, prefix.encode())
    s.setsockopt(zmq.RCVTIMEO, 3000)
    s.setsockopt(zmq.LINGER, 0)
    s.connect(endpoint)
    return s


def pub_socket(ctx, endpoint):
    s = ctx.socket(zmq.PUB)
    s.setsockopt(zmq.LINGER, 1000)
    s.connect(endpoint)
    return s


def minimal(payload):
    return msgpack.packb([1, None, None, None, None, None, None, payload], use_bin_type=True)


def warm_up(pub, sub, topic):
    """Publish until the subscriber sees one: subscriptions travel asynchronously."""
    sub.setsockopt(zmq.RCVTIMEO, 20)
    try:
        deadline = time.monotonic() + 10
        while True:
            if time.monotonic() > deadline:
                raise AssertionError("subscription never became ready")
            pub.send_multipart([topic.encode(), minimal(b"warm")])
            try:
                if sub.recv_multipart()[0].decode() == topic:
                    break
            except zmq.Again:
                pass
        while True:  # drain the other warm-up events
            try:
                sub.recv_multipart()
            except zmq.Again:
                return
    finally:
        sub.setsockopt(zmq.RCVTIMEO, 3000)


class Sidecar(NodeTestCase):
    def two_nodes(self):
        a = self.start_node("A")
        b = self.start_node("B")
        self.assertTrue(wait_for(lambda: len(a.peers()) == 1 and len(b.peers()) == 1
                                 and a.peers()[0]["state"] == "connected"
                                 and b.peers()[0]["state"] == "connected", 10))
        return a, b

    def test_python_to_cpp_and_back_across_two_nodes(self):
        a, b = self.two_nodes()
        # C++ subscriber on B, wildcard; Python publisher on A
        cpp_sub = self.client("sub", b.sub, "orders.*", 20, 15)
        py_sub = self.client("sub", a.sub, "replies.>", 20, 15, python=True)
        time.sleep(0.5)  # both SUB sockets connect and subscribe (the clients have no readiness)
        # publish in rounds until every subscriber has its 20 (the first round may race)
        py_pub = self.client("pub", a.pub, "orders.created", 20, "from python", python=True)
        cpp_pub = self.client("pub", b.pub, "replies.ok", 20, "from c++")
        self.assertEqual(py_pub.wait(10), 0)
        self.assertEqual(cpp_pub.wait(10), 0)
        out, err = cpp_sub.communicate(timeout=20)
        self.assertEqual(cpp_sub.returncode, 0, err.decode())
        events = [json.loads(l) for l in out.decode().splitlines()]
        self.assertEqual(len(events), 20)
        self.assertTrue(all(e["topic"] == "orders.created" and e["source"] == "A/client" for e in events))
        self.assertEqual([e["seq"] for e in events], list(range(1, 21)))
        self.assertEqual(len({e["id"] for e in events}), 20)
        out, err = py_sub.communicate(timeout=20)
        self.assertEqual(py_sub.returncode, 0, err.decode())
        back = [json.loads(l) for l in out.decode().splitlines()]
        self.assertEqual(len(back), 20)
        self.assertTrue(all(e["source"] == "B/client" and e["headers"] == {"client": "cpp"} for e in back))

    def test_minimal_events_are_completed_by_the_node(self):
        a = self.start_node("A", "--no-mesh")
        ctx = zmq.Context()
        try:
            sub = sub_socket(ctx, a.sub, "min.")
            pub = pub_socket(ctx, a.pub)
            warm_up(pub, sub, "min.warm")
            before = time.time_ns()
            pub.send_multipart([b"min.x", minimal(b"payload")])
            topic, body = sub.recv_multipart()
            v = msgpack.unpackb(body, raw=False)
            self.assertEqual(topic, b"min.x")
            self.assertEqual(v[0], 1)
            self.assertEqual(len(v[1]), 16)
            self.assertEqual(v[1][6] >> 4, 7, "id is a UUIDv7")
            self.assertEqual(v[2], "A/client")
            self.assertGreaterEqual(v[3], before)
            self.assertGreaterEqual(v[4], 1)
            self.assertEqual(v[5], "application/octet-stream")
            self.assertEqual(v[7], b"payload")
            # a complete event passes through byte for byte
            full = msgpack.packb([1, b"0123456789abcdef", "me/app", 5, 9, "text/plain", {"k": "v"}, b"x"],
                                 use_bin_type=True)
            pub.send_multipart([b"min.full", full])
            self.assertEqual(sub.recv_multipart(), [b"min.full", full])
            self.assertGreaterEqual(a.metric("evmesh_client_events_completed_total"), 2)
        finally:
            ctx.destroy(0)

    def test_malformed_client_input_is_counted_and_harms_nobody(self):
        a = self.start_node("A", "--no-mesh")
        ctx = zmq.Context()
        try:
            sub = sub_socket(ctx, a.sub, "good.")
            good = pub_socket(ctx, a.pub)
            bad = pub_socket(ctx, a.pub)
            warm_up(good, sub, "good.warm")
            junk = [
                [b"good.x"],                                   # one frame
                [b"good.x", b"a", b"b"],                       # three frames
                [b"good.x", b"\xc1\xc1"],                      # not msgpack
                [b"good.x", msgpack.packb({"a": 1})],         # a map, not the envelope
                [b"good.x", msgpack.packb([2, None, None, None, None, None, None, b""])],  # version 2
                [b"good..x", minimal(b"bad topic")],           # empty segment
                [b"good.x", minimal(b"x") + b"trailing"],
                [b"good.x", msgpack.packb([1, b"short", None, None, None, None, None, b""], use_bin_type=True)],
            ]
            # warm the bad publisher too, so its frames are really delivered to the node
            warm_up(bad, sub, "good.warm")
            for i in range(50):
                good.send_multipart([b"good.data", minimal(str(i).encode())])
                bad.send_multipart(junk[i % len(junk)])
            got = []
            while len(got) < 50:
                topic, body = sub.recv_multipart()
                if topic == b"good.data":
                    got.append(msgpack.unpackb(body)[7])
            self.assertEqual(got, [str(i).encode() for i in range(50)])
            self.assertTrue(wait_for(lambda: a.metric("evmesh_client_events_rejected_total") == 50, 5),
                            a.metric("evmesh_client_events_rejected_total"))
            self.assertIn("rejected client event", a.log())
            self.assertIsNone(a.proc.poll(), "node died")
        finally:
            ctx.destroy(0)

    def bad_config(self, text, *extra):
        path = os.path.join(self.tmp, "bad.toml")
        with open(path, "w") as f:
            f.write(text)
        p = subprocess.run([NODE, "--config", path, "--mesh", self.mesh, "--beacon-port",
                            str(self.beacon_port), *extra], capture_output=True, timeout=10)
        return p.returncode, p.stderr.decode()

    def test_bad_configs_stop_startup_with_one_clear_message(self):
        rc, err = self.bad_config('name = "x"\nbogus = 1\n')
        self.assertEqual(rc, 2)
        self.assertIn("key 'bogus' is unknown", err)
        rc, err = self.bad_config('[discovery]\ninterval_ms = "fast"\n')
        self.assertEqual(rc, 2)
        self.assertIn("key 'discovery.interval_ms' must be an integer", err)
        rc, err = self.bad_config('[endpoints]\npub = ["udp://127.0.0.1:1"]\n')
        self.assertEqual(rc, 2)
        self.assertIn("endpoint 'udp://127.0.0.1:1'", err)
        rc, err = self.bad_config('name = \n')
        self.assertEqual(rc, 2)
        self.assertIn("line 1", err)
        # port in use: the message names the endpoint; exit code 3
        busy = socket.socket()
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        try:
            rc, err = self.bad_config('[endpoints]\npub = ["tcp://127.0.0.1:%d"]\n' % port)
        finally:
            busy.close()
        self.assertEqual(rc, 3)
        self.assertIn(f"tcp://127.0.0.1:{port}", err)
        self.assertEqual(len(err.strip().splitlines()), 1, err)
        # --check-config validates without starting
        good = os.path.join(self.tmp, "good.toml")
        with open(good, "w") as f:
            f.write('name = "ok"\nmesh = "m"\n[flow]\nslow_subscriber = "block"\n')
        p = subprocess.run([NODE, "--check-config", good], capture_output=True, timeout=10)
        self.assertEqual(p.returncode, 0, p.stderr)
        self.assertIn(b"valid", p.stdout)

    def test_example_config_in_docs_is_valid(self):
        path = os.path.join(os.path.dirname(__file__), "..", "..", "docs", "evmesh-node.example.toml")
        p = subprocess.run([NODE, "--check-config", path], capture_output=True, timeout=10)
        self.assertEqual(p.returncode, 0, p.stderr.decode())

    def test_sigterm_drains_and_exits_zero_leaving_nothing_behind(self):
        pid_file = os.path.join(self.tmp, "n.pid")
        ipc = os.path.join(self.tmp, "n.pub")
        a = self.start_node("A", "--pid-file", pid_file, "--pub-endpoint", f"ipc://{ipc}",
                            "--drain-ms", "1000")
        with open(pid_file) as f:
            self.assertEqual(int(f.read()), a.pid)
        self.assertTrue(os.path.exists(ipc))
        b = self.start_node("B")
        self.assertTrue(wait_for(lambda: len(b.peers()) == 1, 10))
        t0 = time.monotonic()
        a.proc.send_signal(signal.SIGTERM)
        self.assertEqual(a.proc.wait(5), 0)
        self.assertLess(time.monotonic() - t0, 1.5)
        self.assertFalse(os.path.exists(pid_file))
        self.assertFalse(os.path.exists(ipc))
        # no port left behind: the sub endpoint's and the mesh link's tcp ports bind again
        for ep in (a.sub, a.ready["mesh_endpoint"]):
            s = socket.socket()
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            s.bind(("127.0.0.1", int(ep.rsplit(":", 1)[1])))
            s.close()
        # goodbye: B drops A at once
        self.assertTrue(wait_for(lambda: len(b.peers()) == 0, 0.5))
        b.proc.send_signal(signal.SIGINT)
        self.assertEqual(b.proc.wait(5), 0)

    def test_second_node_on_the_same_endpoints_is_refused(self):
        ipc = os.path.join(self.tmp, "shared.pub")
        a = self.start_node("A", "--no-mesh", "--pub-endpoint", f"ipc://{ipc}")
        port = a.ready["http"].rsplit(":", 1)[1]
        p = subprocess.run([NODE, "--no-mesh", "--pub-endpoint", f"ipc://{ipc}", "--sub-endpoint",
                            "tcp://127.0.0.1:*"], capture_output=True, timeout=10)
        self.assertEqual(p.returncode, 3)
        self.assertIn(f"ipc://{ipc}", p.stderr.decode())
        self.assertIn("in use", p.stderr.decode())
        p = subprocess.run([NODE, "--no-mesh", "--pub-endpoint", "tcp://127.0.0.1:*", "--sub-endpoint",
                            "tcp://127.0.0.1:*", "--http", f"127.0.0.1:{port}"], capture_output=True, timeout=10)
        self.assertEqual(p.returncode, 3, p.stderr)
        self.assertIn("http", p.stderr.decode())
        self.assertEqual(a.http("/healthz"), "ok\n")
        self.assertIsNone(a.proc.poll())

    def test_flag_errors_exit_2(self):
        for args in (["--bogus"], ["--http", "127.0.0.1:abc"], ["--hwm", "0"],
                     ["--scope", "lan", "--no-mesh"]):
            p = subprocess.run([NODE, *args], capture_output=True, timeout=10)
            self.assertEqual(p.returncode, 2, (args, p.stderr))
            self.assertEqual(len(p.stderr.decode().strip().splitlines()), 1, p.stderr)

    def test_json_logs(self):
        a = self.start_node("A", "--no-mesh", "--log-format", "json")
        a.proc.send_signal(signal.SIGTERM)
        a.proc.wait(5)
        lines = [json.loads(l) for l in a.log().splitlines() if l.strip()]
        self.assertTrue(any("ready" in l["msg"] for l in lines))
        self.assertTrue(all({"time", "level", "msg"} <= set(l) for l in lines))


if __name__ == "__main__":
    main()
