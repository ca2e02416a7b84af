#!/usr/bin/python3
"""`mesh-inspector top` on a real pseudo-terminal against a live node (issue 13): rows shown, resize
re-fits the screen, sort keys, help, q / Esc / Ctrl-C / SIGTERM quit at once and restore the
terminal, and the plain mode when stdout is a pipe. Use /usr/bin/python3."""
import fcntl
import os
import re
import select
import signal
import struct
import subprocess
import termios
import threading
import time

import zmq

from channel_helpers import Publisher
from evmesh_testlib import INSPECTOR, NodeTestCase, main, wait_for

ANSI = re.compile(r"\x1b\[[0-9;?]*[@-~]|\x1b[()][0-9A-Za-z]|\x1b[=>78]")
TOPICS = [f"tt.t{i:02d}" for i in range(16)]
DROPPED = "tt.t03"


def set_size(fd, cols, rows):
    fcntl.ioctl(fd, termios.TIOCSWINSZ, struct.pack("HHHH", rows, cols, 0, 0))


def parse_rate(text):
    """human_rate() back to events per second: 12.0/s, 1.5k/s, 2.00M/s."""
    m = re.fullmatch(r"([0-9.]+)([kM]?)/s", text)
    return float(m.group(1)) * {"": 1, "k": 1e3, "M": 1e6}[m.group(2)]


class PtyReader:
    """Drains the pty master on a thread (a full pty would block the inspector's writes)."""

    def __init__(self, fd):
        self.fd = fd
        self.buf = bytearray()
        self.lock = threading.Lock()
        self.stopped = threading.Event()
        self.thread = threading.Thread(target=self.run, daemon=True)
        self.thread.start()

    def run(self):
        while not self.stopped.is_set():
            r, _, _ = select.select([self.fd], [], [], 0.05)
            if not r:
                continue
            try:
                chunk = os.read(self.fd, 65536)
            except OSError:
                return
            if not chunk:
                return
            with self.lock:
                self.buf += chunk

    def text(self, start=0):
        with self.lock:
            return self.buf[start:].decode(errors="replace")

    def offset(self):
        with self.lock:
            return len(self.buf)

    def stop(self):
        self.stopped.set()
        self.thread.join(2)


def frames(text):
    """The complete frames in `text`: what lies between two frame starts (ESC[H), as lists of
    lines with the escapes removed. The last frame may still be arriving: it is left out."""
    parts = text.split("\x1b[H")[1:-1]
    out = []
    for p in parts:
        plain = ANSI.sub("", p).replace("\r", "")
        out.append(plain.split("\n"))
    return out


class InspectorTop(NodeTestCase):
    def setUp(self):
        super().setUp()
        self.ctx = zmq.Context()
        self.stop_traffic = threading.Event()
        self.fds = []
        self.readers = []
        self.threads = []

    def tearDown(self):
        self.stop_traffic.set()
        for t in self.threads:
            t.join(5)
        for r in self.readers:
            r.stop()
        try:
            super().tearDown()  # kills every process it started, by PID
        finally:
            for fd in self.fds:
                os.close(fd)
            self.ctx.destroy(0)

    def start_traffic(self):
        """One node, a subscriber client on tt.>, and 16 topics published at 10..160 events/s; the
        node rejects one malformed event on tt.t03 per round (its only drops)."""
        node = self.start_node("n0")
        self.client("sub", node.sub, "tt.>", 100000000, 120)
        self.assertTrue(wait_for(lambda: node.metric("evmesh_subscriptions", origin="local") >= 1, 10))
        pub = Publisher(self.ctx, node.pub, "tt.")

        def run():
            while not self.stop_traffic.is_set():
                for i, topic in enumerate(TOPICS):
                    for _ in range(i + 1):
                        pub.publish(topic, b'{"i": %d}' % i)
                pub.sock.send_multipart([DROPPED.encode(), b"not an event"])
                self.stop_traffic.wait(0.1)
            pub.close()

        t = threading.Thread(target=run, daemon=True)
        t.start()
        self.threads.append(t)
        return node

    def top_on_pty(self, cols=100, rows=30):
        """mesh-inspector top on a new pty (its controlling terminal, so that Ctrl-C and SIGWINCH
        come from the line discipline as in a real terminal). Returns (proc, reader, slave fd,
        terminal attributes before)."""
        master, slave = os.openpty()
        self.fds += [master, slave]
        set_size(slave, cols, rows)
        before = termios.tcgetattr(slave)
        err = open(os.path.join(self.tmp, f"top-{len(self.procs)}.err"), "w")
        # setsid -c: a session of its own with the pty as controlling terminal; it execs in place
        # (the child is no process group leader), so the PID is the inspector's
        p = self.spawn(["setsid", "-c", INSPECTOR, "top", "--mesh", self.mesh, "--beacon-port",
                        str(self.beacon_port)], stdin=slave, stdout=slave, stderr=err, close_fds=True)
        err.close()
        reader = PtyReader(master)
        self.readers.append(reader)
        return p, reader, master, slave, before

    def wait_frame(self, reader, start, pred, timeout=10.0):
        """The first complete frame after byte `start` for which pred(lines) holds."""
        def find():
            for f in frames(reader.text(start)):
                if pred(f):
                    return f
            return None
        f = wait_for(find, timeout, 0.05)
        self.assertTrue(f, f"no such frame; output since: {reader.text(start)[-3000:]!r}")
        return f

    def assert_fits(self, frame, cols, rows):
        self.assertLessEqual(len(frame), rows, frame)
        for line in frame:
            self.assertLessEqual(len(line), cols, f"{line!r} is wider than {cols}")

    def topic_rows(self, frame):
        return [l.split() for l in frame if l.startswith("tt.t")]

    def assert_quits(self, p, reader, slave, before, action):
        start = reader.offset()
        t0 = time.monotonic()
        action()
        self.assertEqual(p.wait(timeout=2), 0)
        self.assertLess(time.monotonic() - t0, 2.0)
        self.assertEqual(termios.tcgetattr(slave), before, "terminal attributes not restored")
        time.sleep(0.1)  # the reader drains the last bytes
        tail = reader.text(start)
        self.assertIn("\x1b[?25h", tail)   # cursor shown
        self.assertIn("\x1b[?1049l", tail)  # main screen back

    def test_rows_resize_sort_keys_help_and_q(self):
        self.start_traffic()
        p, reader, master, slave, before = self.top_on_pty(100, 30)
        # raw mode on the terminal while top runs, and the alternate screen
        self.assertTrue(wait_for(lambda: not termios.tcgetattr(slave)[3] & termios.ICANON, 10))
        self.assertNotEqual(termios.tcgetattr(slave), before)
        f = self.wait_frame(reader, 0, lambda f: len(self.topic_rows(f)) == len(TOPICS), 15)
        self.assertIn("\x1b[?1049h", reader.text())
        self.assertTrue(f[0].startswith("mesh-inspector top   sort: rate"), f[0])
        self.assertTrue(any(l.startswith("n0 ") for l in f), f)
        self.assert_fits(f, 100, 30)
        self.assertIn("DROPS", "\n".join(f))

        # resize to 60x12: SIGWINCH (the kernel sends one too), full redraw, everything fits
        start = reader.offset()
        set_size(slave, 60, 12)
        os.kill(p.pid, signal.SIGWINCH)
        self.assertTrue(wait_for(lambda: "\x1b[H\x1b[2J" in reader.text(start), 3), "no full redraw after resize")

        def since_redraw():  # the frames from the full redraw on
            text = reader.text(start)
            return frames(text[text.index("\x1b[H\x1b[2J"):])
        # the redraw and the next regular frame
        fitted = wait_for(lambda: len(since_redraw()) >= 2 and since_redraw(), 5, 0.05)
        self.assertTrue(fitted, reader.text(start)[-3000:])
        for fr in fitted:
            self.assert_fits(fr, 60, 12)
        self.assertTrue(any(l.startswith("n0 ") for l in fitted[0]), fitted[0])
        self.assertTrue(self.topic_rows(fitted[0]), fitted[0])

        # sort keys: the header names the sort, and the rows follow it
        for key, name in ((b"d", "drops"), (b"l", "latency"), (b"n", "name"), (b"r", "rate")):
            start = reader.offset()
            t0 = time.monotonic()
            os.write(master, key)
            # redrawn at once, not at the next one-second refresh
            self.assertTrue(wait_for(lambda n=name: f"sort: {n}" in reader.text(start), 3))
            self.assertLess(time.monotonic() - t0, 0.5, "a key redraws at once")
            # (a frame counts as complete once the next one starts)
            fr = self.wait_frame(reader, start, lambda f, n=name: f[0].startswith(f"mesh-inspector top   sort: {n}"), 3)
            self.assert_fits(fr, 60, 12)
            rows = self.topic_rows(fr)
            self.assertTrue(rows, fr)
            if name == "drops":
                self.assertEqual(rows[0][0], DROPPED, fr)
                self.assertGreater(int(rows[0][2]), 0, fr)
            if name == "name":
                self.assertEqual([r[0] for r in rows], TOPICS[:len(rows)])
            if name == "rate":
                rates = [parse_rate(r[1]) for r in rows]
                self.assertEqual(rates, sorted(rates, reverse=True), fr)

        # ? shows the keys in the footer (last row), ? again hides them
        start = reader.offset()
        os.write(master, b"?")
        fr = self.wait_frame(reader, start, lambda f: f[-1].startswith("keys: q"), 3)
        self.assertEqual(len(fr), 12)
        self.assert_fits(fr, 60, 12)
        start = reader.offset()
        os.write(master, b"h")
        self.wait_frame(reader, start, lambda f: not any(l.startswith("keys:") for l in f), 3)

        # q quits at once, terminal restored
        self.assert_quits(p, reader, slave, before, lambda: os.write(master, b"q"))

    def test_esc_ctrl_c_and_sigterm_quit_and_restore_the_terminal(self):
        self.start_traffic()
        actions = {
            "Esc": lambda p, master: os.write(master, b"\x1b"),
            "Ctrl-C": lambda p, master: os.write(master, b"\x03"),  # SIGINT from the line discipline
            "SIGTERM": lambda p, master: p.send_signal(signal.SIGTERM),
        }
        for name, act in actions.items():
            with self.subTest(name):
                p, reader, master, slave, before = self.top_on_pty(80, 24)
                self.wait_frame(reader, 0, lambda f: any(l.startswith("n0 ") for l in f), 15)
                # an arrow key is an escape sequence, not Esc: top keeps running
                os.write(master, b"\x1b[A")
                time.sleep(0.2)
                self.assertIsNone(p.poll(), f"{name}: an arrow key quit top")
                self.assert_quits(p, reader, slave, before, lambda: act(p, master))

    def test_plain_mode_when_stdout_is_a_pipe(self):
        self.start_traffic()
        t0 = time.monotonic()
        r = subprocess.run([INSPECTOR, "top", "--duration", "3.5", "--mesh", self.mesh, "--beacon-port",
                            str(self.beacon_port)], stdin=subprocess.DEVNULL, capture_output=True, timeout=30)
        self.assertEqual(r.returncode, 0, r.stderr)
        self.assertLess(time.monotonic() - t0, 8)
        out = r.stdout.decode()
        self.assertNotIn("\x1b", out)
        self.assertGreaterEqual(out.count("mesh-inspector top   sort: rate"), 2, out)
        last = out[out.rindex("mesh-inspector top"):]
        self.assertTrue(any(l.startswith("n0 ") for l in last.splitlines()), last)
        self.assertEqual(len([l for l in last.splitlines() if l.startswith("tt.t")]), len(TOPICS), last)


if __name__ == "__main__":
    main()
