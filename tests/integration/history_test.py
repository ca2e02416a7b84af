#!/usr/bin/python3
"""Durable history of evmesh-node (docs/HISTORY.md), from outside: real evmesh-node processes
with `[[history]]`, events published by the Python client, replays by examples/python/replay.py
(written from PROTOCOL.md section 12 alone). A history survives SIGKILL of its node; a replay
that starts during a flood switches to live with no gap and no duplicate; retention holds under a
flood; a full disk (a 256 KiB tmpfs the test mounts, root only) is reported in /metrics and the log
while the node goes on delivering; a bad [[history]] is one line and exit 2.
"""
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
import unittest

sys.path.insert(0, os.path.dirname(__file__))
from evmesh_testlib import EXAMPLES, NODE, PYTHON, NodeTestCase, main, wait_for  # noqa: E402

REPLAY = os.path.join(EXAMPLES, "python", "replay.py")


def seq_report(seqs, first, last):
    """'' when seqs is exactly first..last once each, else what is wrong (lists this long make
    unittest's diff take minutes)."""
    want = set(range(first, last + 1))
    got = set(seqs)
    missing = sorted(want - got)
    extra = sorted(got - want)
    dups = len(seqs) - len(got)
    if not missing and not extra and not dups:
        return ""
    return (f"{len(missing)} missing (first {missing[:5]}, last {missing[-5:]}), {len(extra)} unexpected "
            f"({extra[:5]}), {dups} duplicates, of {first}..{last}")


class HistoryTest(NodeTestCase):
    def config(self, name, history):
        path = os.path.join(self.tmp, f"{name}.toml")
        with open(path, "w") as f:
            f.write(history)
        return path

    def history_node(self, name, hdir, *extra, more=""):
        cfg = self.config(name, f'''
[[history]]
name = "h"
patterns = ["orders.>"]
dir = "{hdir}"
{more}
''')
        return self.start_node(name, "--config", cfg, "--slow-subscriber", "block", *extra)

    def publish(self, node, topic, count, payload="x"):
        p = self.client("pub", node.pub, topic, count, payload, python=True)
        _, err = p.communicate(timeout=120)
        self.assertEqual(p.returncode, 0, err)

    def replay(self, node, pattern, *args, live=1.0):
        p = self.spawn([PYTHON, REPLAY, node.pub, node.sub, pattern, "--live", str(live), *args],
                       stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        return p

    def finish(self, p, timeout=180):
        out, err = p.communicate(timeout=timeout)
        self.assertEqual(p.returncode, 0, err)
        events = [json.loads(line) for line in out.decode().splitlines() if line]
        summary = json.loads(err.decode().strip().splitlines()[-1])
        return events, summary

    def test_history_survives_sigkill_of_its_node(self):
        hdir = os.path.join(self.tmp, "hist")
        a = self.history_node("hist-a", hdir)
        self.publish(a, "orders.eu", 3000)
        # n = what the node received (its Python PUB client may drop under load), all stored
        self.assertTrue(wait_for(lambda: a.metric("evmesh_history_events") ==
                                 a.metric("evmesh_events_in_total", input="client") > 0, 10),
                        a.metric("evmesh_history_events"))
        n = int(a.metric("evmesh_history_events"))
        self.assertGreater(n, 1000)
        a.proc.send_signal(signal.SIGKILL)
        a.proc.wait(timeout=5)
        a = self.history_node("hist-a", hdir)
        self.assertTrue(wait_for(lambda: a.metric("evmesh_history_events") == n, 5))
        events, summary = self.finish(self.replay(a, "orders.>", live=0.5))
        seqs = [e["seq"] for e in events if e["replayed"]]
        self.assertEqual(seq_report(seqs, 1, n), "", summary)
        self.assertEqual(summary["duplicates"], 0)
        self.assertEqual(summary["gaps"], 0)
        # the last 10 only, and the newest per topic
        events, _ = self.finish(self.replay(a, "orders.>", "--from", "last", "--n", "10", live=0.2))
        self.assertEqual([e["seq"] for e in events], list(range(n - 9, n + 1)))
        self.publish(a, "orders.us", 5)
        self.assertTrue(wait_for(lambda: a.metric("evmesh_history_events") > n, 10))
        time.sleep(0.5)  # the rest of the five (if the PUB client dropped none)
        us = int(a.metric("evmesh_history_events")) - n
        events, _ = self.finish(self.replay(a, "orders.>", "--from", "last_per_topic", live=0.2))
        self.assertEqual(sorted((e["topic"], e["seq"]) for e in events), [("orders.eu", n), ("orders.us", us)])

    def test_a_replay_during_a_flood_switches_to_live_without_gap_or_duplicate(self):
        a = self.history_node("flood-a", os.path.join(self.tmp, "ha"))
        b = self.start_node("flood-b", "--slow-subscriber", "block")
        self.assertTrue(wait_for(lambda: len(a.peers()) == 1 and len(b.peers()) == 1, 10))
        total = 100000
        self.publish(a, "orders.eu", 5000)  # some history before the replay starts
        wait_for(lambda: a.metric("evmesh_history_events") >= 5000, 10)
        pub = self.client("pub", a.pub, "orders.eu", total - 5000, "flood", python=True)
        time.sleep(0.5)  # the flood is running: replay from the other node
        # answers from node A share the link with the flood: give them time to come
        r = self.replay(b, "orders.>", "--count", str(total), "--answer-wait", "5", live=20)
        pub.communicate(timeout=120)
        self.assertEqual(pub.returncode, 0)
        # the Python PUB client drops at its own HWM when the node holds it back (block): the
        # node's sequence numbers count what it received, and every one of those must arrive
        wait_for(lambda: a.metric("evmesh_events_in_total", input="client") == a.metric("evmesh_history_events"), 10)
        received = int(a.metric("evmesh_events_in_total", input="client"))
        self.assertGreater(received, total // 2)
        events, summary = self.finish(r)
        seqs = [e["seq"] for e in events]
        self.assertEqual(seq_report(seqs, 1, received), "", summary)
        self.assertGreater(summary["replayed"], 0, summary)
        # the live subscription overlapped the replay: events came live, or both ways (dropped once)
        self.assertGreater(summary["live"] + summary["duplicates"], 0, summary)
        # replayed first, then live: no live event before a replayed one
        first_live = next((i for i, e in enumerate(events) if not e["replayed"]), len(events))
        late = [(i, e["seq"]) for i, e in enumerate(events[first_live:], first_live) if e["replayed"]]
        self.assertEqual(late, [], f"replayed after the first live event (at {first_live}, seq "
                                   f"{events[first_live]['seq'] if first_live < len(events) else None}): {summary}")
        # and in order of seq (one publisher, one stream)
        self.assertEqual(seq_report([e["seq"] for e in events], 1, received), "")
        self.assertTrue(all(events[i]["seq"] < events[i + 1]["seq"] for i in range(len(events) - 1)))

    def test_retention_holds_under_a_flood(self):
        hdir = os.path.join(self.tmp, "ret")
        a = self.history_node("ret-a", hdir, more="max_bytes = 1048576\nsegment_bytes = 131072")
        self.publish(a, "orders.eu", 30000, "y" * 200)
        self.assertTrue(wait_for(lambda: a.metric("evmesh_history_expired_total") > 0, 10))
        # what the node received (a Python PUB client may drop at its own HWM) is all stored
        self.assertTrue(wait_for(lambda: a.metric("evmesh_history_appended_total") ==
                                 a.metric("evmesh_events_in_total", input="client"), 20),
                        a.metric("evmesh_history_appended_total"))
        received = int(a.metric("evmesh_events_in_total", input="client"))
        self.assertGreater(received, 20000)
        time.sleep(0.5)  # one more retention pass
        on_disk = sum(os.path.getsize(os.path.join(hdir, f)) for f in os.listdir(hdir))
        self.assertLessEqual(on_disk, 1048576 + 131072, "retention: at most one segment over max_bytes")
        self.assertEqual(a.metric("evmesh_history_bytes"), on_disk)
        events, summary = self.finish(self.replay(a, "orders.>", live=0.2))
        seqs = [e["seq"] for e in events]
        self.assertEqual(seq_report(seqs, seqs[0], received), "", "the newest are kept, contiguous")
        self.assertEqual(seqs, sorted(seqs))

    @unittest.skipUnless(os.geteuid() == 0, "mounting a tmpfs needs root")
    def test_a_full_disk_is_reported_and_the_node_goes_on(self):
        # outside self.tmp: cleanups run after tearDown (which ends the node), last added first
        mnt = tempfile.mkdtemp(prefix="evmesh-full-")
        self.addCleanup(os.rmdir, mnt)
        subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", mnt], check=True)
        self.addCleanup(subprocess.run, ["umount", "-l", mnt], check=False)
        a = self.history_node("full-a", mnt)
        sub = self.client("sub", a.sub, "orders.>", 10000, 60, python=True)
        time.sleep(1.5)  # the subscriber is connected and subscribed
        self.publish(a, "orders.eu", 10000, "z" * 200)  # ~2.7 MB: far more than the disk holds
        # a ZeroMQ PUB client may itself drop at its HWM: count what the node received, once the
        # count has settled (a slow machine may still be reading the last events)
        received, last = -1, a.metric("evmesh_events_in_total", input="client")
        while received != last:
            time.sleep(0.5)
            received, last = last, a.metric("evmesh_events_in_total", input="client")
        self.assertGreater(received, 3000)  # > 800 KB: more than the 256 KiB disk
        try:
            out, _ = sub.communicate(timeout=15 if received < 10000 else 90)
        except subprocess.TimeoutExpired:
            sub.kill()
            out, _ = sub.communicate()
        self.assertEqual(len(out.splitlines()), received, "delivery goes on while the history cannot write")
        self.assertTrue(wait_for(lambda: a.metric("evmesh_history_dropped_total") > 0, 10))
        self.assertGreater(a.metric("evmesh_history_write_errors_total"), 0)
        # the gauge says whether the last write failed: a last small batch may fit in what a cut
        # write left free, so it is 1 or 0 here; it is 1 while writes keep failing (the unit test)
        self.assertTrue(wait_for(lambda: "No space left on device" in a.log(), 5), a.log()[-2000:])
        kept = a.metric("evmesh_history_events")
        self.assertGreater(kept, 0)
        self.assertEqual(kept + a.metric("evmesh_history_dropped_total"), received, "every event kept or counted")
        self.assertIsNone(a.proc.poll())

    def test_a_bad_history_is_one_line_and_exit_2(self):
        cases = [
            ('[[history]]\nname = "h"\ndir = "/tmp/x"\n', "patterns must list at least one topic pattern"),
            ('[[history]]\nname = "h"\npatterns = ["a..b"]\ndir = "/tmp/x"\n', "'a..b' is not a valid topic pattern"),
            ('[[history]]\nname = "h"\npatterns = ["a.>"]\n', "dir is required"),
            ('[[history]]\nname = "h"\npatterns = ["a.>"]\ndir = "/tmp/x"\nmax_age = "soon"\n', "must be a duration"),
        ]
        for text, want in cases + [
            # the environment, not the file: exit 3 (cannot start), as for an outbox
            ('[[history]]\nname = "h"\npatterns = ["a.>"]\ndir = "/proc/evmesh-no"\n',
             "history 'h': cannot create directory '/proc/evmesh-no'")]:
            cfg = self.config("bad", text)
            p = subprocess.run([NODE, "--config", cfg, "--no-mesh", "--pub-endpoint", "tcp://127.0.0.1:*",
                                "--sub-endpoint", "tcp://127.0.0.1:*"], capture_output=True, timeout=20)
            self.assertEqual(p.returncode, 3 if "/proc" in text else 2, (text, p.stderr))
            self.assertIn(want, p.stderr.decode(), text)


if __name__ == "__main__":
    main()
