#!/usr/bin/python3
"""The examples and the README's main job (the live demo) run in the test suite."""
import os
import re
import subprocess
import unittest

from evmesh_testlib import BUILD, main

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))


class Examples(unittest.TestCase):
    def test_live_demo_runs_and_cleans_up(self):
        env = dict(os.environ, DEMO_SECONDS="6", EVMESH_BUILD_DIR=BUILD)
        p = subprocess.run(["/usr/bin/python3", os.path.join(ROOT, "examples", "open-platform", "demo.py")],
                           capture_output=True, timeout=90, env=env)
        out = p.stdout.decode()
        self.assertEqual(p.returncode, 0, out + p.stderr.decode())
        for node in ("orders-node", "partner-node", "audit-node"):
            self.assertIn(f"{node} ready", out)
        lines = out.splitlines()
        partner = [l for l in lines if "partner(C++) | got orders." in l and "from orders-node/client" in l]
        audit = [l for l in lines if "audit(Python) | got orders." in l and "from orders-node/client" in l]
        # the embedded service's own events cross the mesh to the partner too
        self.assertTrue(any("partner(C++) | got orders.eu.created" in l and "embedded-service/orders" in l
                            for l in lines), out)
        published = [l for l in out.splitlines() if "orders-service: published" in l]
        self.assertEqual(len(published), 30)
        self.assertEqual(len(partner), 30, out)
        self.assertEqual(len(audit), 30, out)
        self.assertIn("embedded(C++) | done", out)
        self.assertIn("all processes stopped", out)
        # mesh-inspector watched the live mesh: it listed the sidecars and the order topics
        inspector = [l for l in lines if "inspector |" in l]
        for node in ("orders-node", "partner-node", "audit-node"):
            self.assertTrue(any(node in l and " ok " in l for l in inspector), out)
        self.assertTrue(any("orders." in l and "orders-node" in l for l in inspector), out)
        self.assertTrue(any("3 answered" in l for l in inspector), out)
        # the embedded service joined the mesh and saw the orders service's events
        done = [l for l in out.splitlines() if "embedded(C++) | done" in l][0]
        self.assertGreater(int(re.search(r"; (\d+) from peers", done).group(1)), 0, done)
        # the partner registered its callback URL over the API; the node delivered every order
        # there, and the partner's own signature check accepted each one
        hooks = [l for l in lines if "partner-webhook | webhook orders." in l and "signature ok" in l]
        orders = {re.search(r'"order_id": "(o-\d+)"', l).group(1) for l in hooks if '"order_id"' in l}
        self.assertEqual(len(orders), 30, out)
        self.assertNotIn("REJECTED", out)
        self.assertTrue(any("partner registered http://127.0.0.1:" in l for l in lines), out)
        summary = [l for l in lines if "(partner): delivered" in l]
        self.assertTrue(summary, out)
        self.assertRegex(summary[0], r"delivered (\d+), pending 0, dead 0")
        self.assertGreaterEqual(int(re.search(r"delivered (\d+)", summary[0]).group(1)), 30)


if __name__ == "__main__":
    main()
