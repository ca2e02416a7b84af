#!/usr/bin/python3
"""The mesh as separate processes on one host (issue 3): discovery with nothing configured but the
mesh name, exactly-once delivery, SIGKILL expiry, restart, goodbye."""
import json
import signal
import time

from evmesh_testlib import NodeTestCase, main, wait_for


class MeshProcesses(NodeTestCase):
    N = 5

    def full_mesh(self, nodes):
        def ok():
            for n in nodes:
                peers = n.peers()
                if len(peers) != len(nodes) - 1 or any(p["state"] != "connected" for p in peers):
                    return False
            return True
        return wait_for(ok, 10)

    def deliver(self, publisher_node, subscriber_nodes, topic, pattern, count):
        """Publishes `count` events on `topic` and returns what each subscriber received."""
        subs = [self.client("sub", n.sub, pattern, count, 15) for n in subscriber_nodes]
        # subscriptions travel client -> node -> peers: wait until they have arrived
        self.assertTrue(wait_for(lambda: all(n.metric("evmesh_subscriptions", origin="local") >= 1
                                             for n in subscriber_nodes), 10))
        self.assertTrue(wait_for(lambda: publisher_node.metric("evmesh_subscriptions", origin="mesh") >= 1, 10))
        pub = self.client("pub", publisher_node.pub, topic, count, "mesh")
        self.assertEqual(pub.wait(10), 0)
        results = []
        for s in subs:
            out, err = s.communicate(timeout=20)
            results.append([json.loads(l) for l in out.decode().splitlines()])
        return results

    def test_processes_form_a_full_mesh_and_deliver_exactly_once(self):
        nodes = [self.start_node(f"n{i}") for i in range(self.N)]
        self.assertTrue(self.full_mesh(nodes), [n.peers() for n in nodes])
        got = self.deliver(nodes[0], nodes[1:], "fleet.n0.evt", "fleet.*.evt", 30)
        for i, events in enumerate(got, 1):
            self.assertEqual(len(events), 30, f"node n{i}")
            self.assertEqual(len({e["id"] for e in events}), 30, f"duplicates at n{i}")
            self.assertEqual([e["seq"] for e in events], list(range(1, 31)))

    def test_sigkill_expires_peer_fast_and_restart_rejoins(self):
        nodes = [self.start_node(f"n{i}") for i in range(self.N)]
        self.assertTrue(self.full_mesh(nodes))
        victim = nodes[-1]
        t0 = time.monotonic()
        victim.proc.send_signal(signal.SIGKILL)
        victim.proc.wait(5)
        others = nodes[:-1]
        # the TCP link closes with the process: peers see it at once (link state), but keep the
        # peer (a blip must not become an outage) until its beacons stop for the expiry window
        def link_down(n):
            return all(p["state"] != "connected" for p in n.peers() if p["name"] == victim.ready["name"])
        self.assertTrue(wait_for(lambda: all(link_down(n) for n in others), 1.0))
        self.assertTrue(wait_for(lambda: all(len(n.peers()) == self.N - 2 for n in others), 4.0))
        elapsed = time.monotonic() - t0
        self.assertLess(elapsed, 2.4 + 1.0, "removed within the 2.4 s expiry window")
        self.assertGreaterEqual(sum(n.metric("evmesh_peer_changes_total", kind="link_lost")
                                    + n.metric("evmesh_peer_changes_total", kind="expired")
                                    for n in others), self.N - 1)
        # restart under the same name: a new incarnation rejoins and receives again
        back = self.start_node(victim.ready["name"])
        self.assertTrue(self.full_mesh(others + [back]))
        got = self.deliver(nodes[0], [back], "fleet.back", "fleet.>", 10)
        self.assertEqual(len(got[0]), 10)

    def test_clean_stop_removes_the_peer_at_once(self):
        nodes = [self.start_node(f"n{i}") for i in range(3)]
        self.assertTrue(self.full_mesh(nodes))
        t0 = time.monotonic()
        nodes[2].proc.send_signal(signal.SIGTERM)
        self.assertEqual(nodes[2].proc.wait(5), 0)
        self.assertTrue(wait_for(lambda: all(len(n.peers()) == 1 for n in nodes[:2]), 0.5))
        self.assertLess(time.monotonic() - t0, 0.7)
        self.assertGreaterEqual(nodes[0].metric("evmesh_peer_changes_total", kind="left")
                                + nodes[0].metric("evmesh_peer_changes_total", kind="link_lost"), 1)

    def test_other_mesh_on_same_port_stays_apart(self):
        a = self.start_node("a")
        saved = self.mesh
        self.mesh = saved + "-other"
        b = self.start_node("b")
        self.mesh = saved
        self.assertTrue(wait_for(lambda: a.metric("evmesh_beacons_total", outcome="foreign_mesh") > 2, 3))
        self.assertEqual(a.peers(), [])
        self.assertEqual(b.peers(), [])


if __name__ == "__main__":
    main()
