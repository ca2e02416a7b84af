#!/usr/bin/python3
"""Queue groups and pull consumers (docs/HISTORY.md, PROTOCOL.md section 13), from outside: real
evmesh-node processes, members written from the protocol doc (examples/python/pull.py).

* 5 nodes; a history of `work.>` on node 0; events published on node 1; a queue group of 6
  members (one durable consumer) on nodes 2, 3 and 4; 3 members SIGKILLed mid-run: every event
  is processed, and the only duplicates are events a killed member had not acknowledged, fewer
  than what the node redelivered (counted in /metrics).
* nak and max_deliver: refused messages come back, then go to the dead-letter topic.
* the consumer's position survives a restart of its node.
"""
import json
import os
import signal
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(__file__))
from evmesh_testlib import BUILD, EXAMPLES, PYTHON, NodeTestCase, main, wait_for  # noqa: E402

PULL = os.path.join(EXAMPLES, "python", "pull.py")
CPP_MEMBER = os.path.join(BUILD, "examples", "pull_member")


class QueueTest(NodeTestCase):
    def history_node(self, name, hdir, *extra):
        cfg = os.path.join(self.tmp, f"{name}.toml")
        with open(cfg, "w") as f:
            f.write(f'[[history]]\nname = "work"\npatterns = ["work.>"]\ndir = "{hdir}"\n')
        return self.start_node(name, "--config", cfg, "--slow-subscriber", "block", *extra)

    def member(self, node, *args, consumer="workers"):
        """A member whose output goes to a file (a pipe nobody reads would stop it when full)."""
        path = os.path.join(self.tmp, f"member-{len(self.procs)}.out")
        with open(path, "wb") as out:
            p = self.spawn([PYTHON, PULL, node.pub, node.sub, "work", consumer, *map(str, args)],
                           stdout=out, stderr=subprocess.DEVNULL)
        p.out_path = path
        return p

    def finish(self, member, timeout=240):
        member.wait(timeout=timeout)
        with open(member.out_path, "rb") as f:
            return self.lines(f.read())

    def publish(self, node, topic, count):
        p = self.client("pub", node.pub, topic, count, "job", python=True)
        _, err = p.communicate(timeout=180)
        self.assertEqual(p.returncode, 0, err)

    @staticmethod
    def lines(out):
        return [json.loads(x) for x in out.decode().splitlines() if x.startswith("{")]

    def test_a_queue_group_across_the_mesh_survives_killed_members(self):
        nodes = [self.history_node("q0", os.path.join(self.tmp, "h0"))]
        nodes += [self.start_node(f"q{i}", "--slow-subscriber", "block") for i in range(1, 5)]
        self.assertTrue(wait_for(lambda: all(len(n.peers()) == 4 for n in nodes), 20))
        batch = 100
        members = [self.member(nodes[2 + i // 2], "--batch", batch, "--ack-wait", 2000, "--idle", 8)
                   for i in range(6)]
        total = 100000
        publisher = self.client("pub", nodes[1].pub, "work.jobs", total, "job", python=True)
        # kill one member on each of the three nodes once the work is well under way
        self.assertTrue(wait_for(lambda: nodes[0].metric("evmesh_consumer_acked_total") > 20000, 120),
                        nodes[0].metric("evmesh_consumer_acked_total"))
        killed = members[0::2]
        for m in killed:
            m.send_signal(signal.SIGKILL)
        publisher.communicate(timeout=180)
        # the history holds what node 1 accepted (the Python PUB client may drop at its own HWM)
        self.assertTrue(wait_for(lambda: nodes[0].metric("evmesh_history_events") ==
                                 nodes[1].metric("evmesh_events_in_total", input="client"), 20))
        stored = int(nodes[0].metric("evmesh_history_events"))
        self.assertGreater(stored, total // 2)
        processed = []
        for m in members:
            processed += self.finish(m)
        positions = [e["pos"] for e in processed]
        missing = set(range(stored)) - set(positions)
        self.assertEqual(len(missing), 0, f"{len(missing)} never processed, e.g. {sorted(missing)[:10]}")
        dups = len(positions) - len(set(positions))
        redelivered = nodes[0].metric("evmesh_consumer_redelivered_total")
        # a killed member had at most its last batch and the one before (whose ack may not have
        # left the process) processed and not acknowledged
        self.assertLessEqual(dups, 2 * batch * len(killed), f"duplicates {dups}")
        self.assertLessEqual(dups, redelivered)
        self.assertEqual(nodes[0].metric("evmesh_consumer_pending"), 0)
        self.assertEqual(nodes[0].metric("evmesh_consumer_ack_floor"), stored)
        print(f"queue group: {stored} events, {len(positions)} processed by 6 members on 3 nodes, 3 killed, "
              f"{dups} duplicates, {int(redelivered)} redelivered", file=sys.stderr)

    def test_nak_redelivers_then_dead_letters(self):
        node = self.history_node("dl0", os.path.join(self.tmp, "h"))
        dead = self.client("sub", node.sub, "dead.>", 1, 30, python=True)
        time.sleep(1.0)
        self.publish(node, "work.one", 1)
        # refuse every message: delivered 3 times, then dead-lettered
        m = self.member(node, "--nak-every", 1, "--max-deliver", 3, "--dead-letter", "dead.work",
                        "--idle", 3, "--wait", 200, consumer="picky")
        out, _ = dead.communicate(timeout=40)
        self.finish(m, 40)
        got = [json.loads(x) for x in out.decode().splitlines() if x]
        self.assertEqual(len(got), 1, out)
        self.assertEqual(nodes_metric(node, "evmesh_consumer_dead_lettered_total", "picky"), 1)
        self.assertEqual(nodes_metric(node, "evmesh_consumer_redelivered_total", "picky"), 2)

    def test_a_cpp_and_a_python_member_share_a_consumer(self):
        node = self.history_node("mix0", os.path.join(self.tmp, "h"))
        self.publish(node, "work.mixed", 30000)
        self.assertTrue(wait_for(lambda: node.metric("evmesh_history_events") ==
                                 node.metric("evmesh_events_in_total", input="client") > 0, 10))
        stored = int(node.metric("evmesh_history_events"))
        py = self.member(node, "--idle", 3, "--wait", 200, "--batch", 10, consumer="mixed")
        # the C++ member joins once the Python one is taking messages
        self.assertTrue(wait_for(lambda: os.path.getsize(py.out_path) > 0, 10))
        path = os.path.join(self.tmp, "cpp-member.out")
        with open(path, "wb") as out:
            cpp = self.spawn([CPP_MEMBER, node.pub, node.sub, "work", "mixed", "0", "3"], stdout=out,
                             stderr=subprocess.DEVNULL)
        cpp.wait(timeout=60)
        with open(path, "rb") as f:
            from_cpp = self.lines(f.read())
        from_py = self.finish(py, 60)
        positions = [e["pos"] for e in from_cpp + from_py]
        self.assertEqual(sorted(positions), list(range(stored)))
        self.assertGreater(len(from_cpp), 0)
        self.assertGreater(len(from_py), 0)

    def test_the_position_survives_a_restart(self):
        hdir = os.path.join(self.tmp, "h")
        node = self.history_node("pos0", hdir)
        self.publish(node, "work.a", 300)
        wait_for(lambda: node.metric("evmesh_history_events") == 300, 10)
        m = self.member(node, "--count", 200, "--batch", 50, consumer="keeper")
        first = [e["pos"] for e in self.finish(m, 60)]
        self.assertEqual(first, list(range(200)))
        time.sleep(1.0)  # the state file is written within 100 ms of the next pass (at most 500 ms)
        node.proc.send_signal(signal.SIGKILL)
        node.proc.wait(timeout=5)
        node = self.history_node("pos0", hdir)
        m = self.member(node, "--idle", 2, "--wait", 200, consumer="keeper")
        rest = [e["pos"] for e in self.finish(m, 60)]
        self.assertEqual(rest, list(range(200, 300)))


def nodes_metric(node, name, consumer):
    return node.metric(name, consumer=consumer)


if __name__ == "__main__":
    main()
