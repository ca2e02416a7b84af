#!/usr/bin/python3
"""The web dashboard (docs/DASHBOARD.md) and the browser stream example in a real browser: Debian's
headless Chromium driven by Selenium (python3-selenium, chromium-driver). A 3-node mesh on
loopback; the page must load without console errors, show the three nodes, tail a published
event, show rates moving, and replay a dead letter through the page. Every process (nodes,
chromedriver, chromium) is stopped by PID; the browser profile lives in the test's temp dir.

EVMESH_SCREENSHOTS=DIR saves the screenshots there (docs/img is where the docs take them from)."""
import json
import os
import shutil
import socket
import subprocess
import tempfile
import threading
import time
import unittest
import uuid
import http.server
import socketserver
import functools

import zmq

from channel_helpers import Publisher, Receiver, channel_config
from evmesh_testlib import NodeTestCase, main, wait_for

CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"
EXAMPLES = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", "..", "examples", "streams"))

try:
    from selenium import webdriver
    from selenium.webdriver.chrome.options import Options
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By
    HAVE_SELENIUM = True
except ImportError:  # scripts/deps.sh installs it; a missing piece fails the test (below)
    HAVE_SELENIUM = False


class BrowserBase(NodeTestCase):
    def setUp(self):
        super().setUp()
        # a missing browser is a failed test, not a skip: the suite promises a real browser
        self.assertTrue(HAVE_SELENIUM, "python3-selenium is not installed (scripts/deps.sh)")
        self.assertTrue(os.access(CHROMIUM, os.X_OK) and os.access(CHROMEDRIVER, os.X_OK),
                        "chromium / chromium-driver are not installed (scripts/deps.sh)")
        self.ctx = zmq.Context()
        self.receivers = []
        self.servers = []
        self.driver = None
        self.profile = tempfile.mkdtemp(prefix="evmesh-chromium-")
        self.addCleanup(self.cleanup)

    def tearDown(self):
        pass  # self.cleanup runs even when setUp fails half-way

    def cleanup(self):
        try:
            if self.driver is not None:
                service_pid = self.driver.service.process.pid if self.driver.service.process else None
                try:
                    self.driver.quit()
                finally:
                    if service_pid is not None:
                        try:
                            os.kill(service_pid, 9)  # chromedriver, if quit() could not end it
                        except ProcessLookupError:
                            pass
            for r in self.receivers:
                r.close()
            for s in self.servers:
                s.shutdown()
                s.server_close()
            self.ctx.destroy(linger=0)
        finally:
            shutil.rmtree(self.profile, ignore_errors=True)
            NodeTestCase.tearDown(self)

    def browser(self):
        o = Options()
        o.binary_location = CHROMIUM
        for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                    "--no-first-run", "--disable-extensions", "--disable-background-networking",
                    "--disable-sync", "--metrics-recording-only", "--disable-default-apps",
                    "--window-size=1400,1700", f"--user-data-dir={self.profile}"):
            o.add_argument(arg)
        o.set_capability("goog:loggingPrefs", {"browser": "ALL"})
        log = os.path.join(self.profile, "chromedriver.log")
        self.driver = webdriver.Chrome(service=Service(CHROMEDRIVER, log_output=log), options=o)
        self.driver.set_page_load_timeout(20)
        return self.driver

    def console_errors(self):
        return [e for e in self.driver.get_log("browser") if e.get("level") == "SEVERE"]

    def text(self, css):
        # read in one script call: the page re-renders its tables every second, so an element
        # found first and read second can already be gone (StaleElementReferenceException)
        return self.driver.execute_script(
            "const e = document.querySelector(arguments[0]); return e ? e.innerText.trim() : '';",
            css)

    def attrs(self, css, name):
        return self.driver.execute_script(
            "return [...document.querySelectorAll(arguments[0])].map(e => e.getAttribute(arguments[1]));",
            css, name)

    def screenshot(self, name):
        path = os.path.join(self.tmp, name)
        self.assertTrue(self.driver.save_screenshot(path))
        with open(path, "rb") as f:
            self.assertEqual(f.read(8), b"\x89PNG\r\n\x1a\n")
        out = os.environ.get("EVMESH_SCREENSHOTS")
        if out:
            os.makedirs(out, exist_ok=True)
            shutil.copy(path, os.path.join(out, name))
        os.unlink(path)

    def static_server(self, directory):
        handler = functools.partial(QuietHandler, directory=directory)
        srv = socketserver.ThreadingTCPServer(("127.0.0.1", 0), handler)
        srv.daemon_threads = True
        threading.Thread(target=srv.serve_forever, daemon=True).start()
        self.servers.append(srv)
        return srv.server_address[1]


class QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass


class DashboardTest(BrowserBase):
    def test_three_nodes_live_tail_rates_and_replay_in_a_browser(self):
        failing = {"on": True}
        rcv = Receiver(behave=lambda path, req: (500, {}, b"down") if failing["on"] else (200, {}, b"ok"))
        self.receivers.append(rcv)
        cfg = channel_config(self.tmp, [{
            "name": "partner", "plugin": "webhook", "topics": ["orders.failing"],
            "retry": {"schedule": ["0ms"], "jitter": 0},
            "settings": {"url": rcv.url("/hook"), "allow_private": True}}])
        with open(cfg, "a") as f:
            f.write("\n[api]\nstreams = true\n")
        a = self.start_node("alpha", "--config", cfg)
        b = self.start_node("bravo")
        c = self.start_node("charlie")
        self.assertTrue(wait_for(lambda: len(a.peers()) == 2 and len(b.peers()) == 2 and len(c.peers()) == 2, 15))

        d = self.browser()
        d.get(f"http://{a.ready['http']}/")
        self.assertTrue(wait_for(lambda: d.title == "evmesh · alpha", 10), d.title)
        # all three nodes, from their stats events
        self.assertTrue(wait_for(lambda: self.text("#nodes-count") == "3", 15), self.text("#nodes-count"))
        names = set(self.attrs("#graph g.node", "data-name"))
        self.assertEqual(names, {"alpha", "bravo", "charlie"})
        rows = set(self.attrs("#nodes tr.node-row", "data-name"))
        self.assertEqual(rows, {"alpha", "bravo", "charlie"})
        self.assertTrue(wait_for(lambda: self.text("#links-count") == "3", 10), self.text("#links-count"))

        # a published event on another node appears in the live tail, id and all
        pub = Publisher(self.ctx, b.pub, "")  # waits for the dashboard's subscription to reach bravo
        eid = str(uuid.UUID(bytes=pub.publish("orders.created", json.dumps({"order": 42}).encode())))
        self.assertTrue(wait_for(lambda: d.find_elements(By.CSS_SELECTOR, f'#tail li[data-id="{eid}"]'), 10))
        line = self.text(f'#tail li[data-id="{eid}"]')
        self.assertIn("orders.created", line)
        self.assertIn('"order":42', line)

        # a pattern that does not match: the next event is not tailed, one that matches is
        d.find_element(By.ID, "tail-pattern").clear()
        d.find_element(By.ID, "tail-pattern").send_keys("users.>")
        d.find_element(By.ID, "tail-go").click()
        time.sleep(0.5)
        skipped = str(uuid.UUID(bytes=pub.publish("orders.created", b'{"order": 43}')))
        shown = str(uuid.UUID(bytes=pub.publish("users.created", b'{"user": 7}')))
        self.assertTrue(wait_for(lambda: d.find_elements(By.CSS_SELECTOR, f'#tail li[data-id="{shown}"]'), 10))
        self.assertEqual(d.find_elements(By.CSS_SELECTOR, f'#tail li[data-id="{skipped}"]'), [])

        # rates move: a steady flow for a few seconds shows in the total and the topic legend
        stop = threading.Event()

        def flow():
            while not stop.is_set():
                for _ in range(20):
                    pub.publish("orders.flow", b"{}")
                time.sleep(0.05)
        t = threading.Thread(target=flow, daemon=True)
        t.start()
        try:
            self.assertTrue(wait_for(lambda: float(self.text("#rate-total") or 0) >= 50, 10), self.text("#rate-total"))
            self.assertTrue(wait_for(lambda: "orders.flow" in self.text("#rates-legend"), 5), self.text("#rates-legend"))
        finally:
            stop.set()
            t.join()

        # a dead letter on alpha's channel, replayed from the page, reaches the receiver
        dead_id = str(uuid.UUID(bytes=Publisher(self.ctx, a.pub, "orders.").publish("orders.failing", b'{"n": 1}')))
        self.assertTrue(wait_for(lambda: self.text('#channels tr[data-channel="partner"] td.dead') == "1", 15),
                        self.text("#channels"))
        self.assertEqual(len(rcv.received()), 1)
        failing["on"] = False
        self.screenshot("dashboard.png")
        d.find_element(By.CSS_SELECTOR, 'button.replay[data-channel="partner"]').click()
        self.assertTrue(wait_for(lambda: "replayed 1 dead letter" in self.text("#message"), 10), self.text("#message"))
        self.assertTrue(wait_for(lambda: len(rcv.received()) == 2, 10))
        self.assertEqual(rcv.received()[1]["headers"]["webhook-id"], dead_id)
        self.assertTrue(wait_for(lambda: self.text('#channels tr[data-channel="partner"] td.dead') == "0", 10))

        self.assertEqual(self.console_errors(), [])
        pub.close()

    def test_a_node_with_keys_asks_for_one_and_then_works(self):
        cfg = os.path.join(self.tmp, "keys.toml")
        with open(cfg, "w") as f:
            f.write(f'[api]\nstreams = true\ndatabase = {json.dumps(os.path.join(self.tmp, "api.db"))}\n')
        n = self.start_node("keyed", "--no-mesh", "--config", cfg)
        out = subprocess.run([n.proc.args[0], "--config", cfg, "api-key", "create", "--scope", "admin"],
                             capture_output=True, text=True, timeout=10)
        self.assertEqual(out.returncode, 0, out.stderr)
        key = json.loads(out.stdout)["key"]
        d = self.browser()
        d.get(f"http://{n.ready['http']}/")
        self.assertTrue(wait_for(lambda: "needs a key" in self.text("#message"), 10), self.text("#message"))
        d.find_element(By.ID, "key").send_keys(key)
        d.find_element(By.ID, "key-save").click()
        self.assertTrue(wait_for(lambda: self.text("#self-name") == "keyed", 10))
        self.assertTrue(wait_for(lambda: self.text("#nodes-count") == "1", 10))
        self.assertTrue(wait_for(lambda: self.text("#status-text") == "live", 5))
        # 401s for the first GET /v1/node are expected console entries; nothing else may fail
        errors = [e for e in self.console_errors() if "401" not in e.get("message", "")]
        self.assertEqual(errors, [])


class BrowserExampleTest(BrowserBase):
    def test_the_browser_example_page_receives_events_from_another_origin(self):
        port = self.static_server(EXAMPLES)
        origin = f"http://127.0.0.1:{port}"
        cfg = os.path.join(self.tmp, "origin.toml")
        with open(cfg, "w") as f:
            f.write(f"[api]\nstreams = true\nallowed_origins = [{json.dumps(origin)}]\n")
        n = self.start_node("web", "--no-mesh", "--config", cfg)
        d = self.browser()
        d.get(f"{origin}/browser.html?node=ws://{n.ready['http']}&topics=orders.>")
        self.assertTrue(wait_for(lambda: self.text("#status").startswith("subscribed"), 10), self.text("#status"))
        pub = Publisher(self.ctx, n.pub, "orders.")
        ids = [str(uuid.UUID(bytes=pub.publish("orders.created", json.dumps({"i": i}).encode()))) for i in range(5)]
        pub.publish("users.created", b"{}")
        self.assertTrue(wait_for(lambda: len(d.find_elements(By.CSS_SELECTOR, "#events li.event")) >= 5, 10))
        time.sleep(0.3)
        got = [e.get_attribute("data-id") for e in d.find_elements(By.CSS_SELECTOR, "#events li.event")]
        self.assertEqual(got, ids)
        self.assertEqual(self.console_errors(), [])
        pub.close()
        # a page of an origin the node does not list is refused (403 on the handshake): it never
        # subscribes, and the node opens no stream for it
        opened = n.metric("evmesh_stream_opened_total")
        other = self.static_server(EXAMPLES)
        d.get(f"http://localhost:{other}/browser.html?node=ws://{n.ready['http']}&topics=orders.>")
        self.assertTrue(wait_for(lambda: self.text("#status").startswith("closed"), 10), self.text("#status"))
        time.sleep(1.5)  # a reconnect or two
        self.assertEqual(n.metric("evmesh_stream_opened_total"), opened)
        self.assertEqual(len(d.find_elements(By.CSS_SELECTOR, "#events li.event")), 0)


if __name__ == "__main__":
    main()
