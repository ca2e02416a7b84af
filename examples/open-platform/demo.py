#!/usr/bin/python3
"""Live mesh demo on this host (the README's first command runs it through scripts/demo.sh).

Three evmesh-node sidecars discover each other (host-only beacons), an embedded C++ service joins
with its own node, the Python orders service publishes orders.<region>.created on the first
sidecar, a C++ partner subscribes to orders.*.created on the second and a Python audit log to
orders.> on the third. The partner node runs the open-platform API (docs/API.md): the operator
creates an admin key with `evmesh-node api-key`, an application for the partner and a key scoped
to it; the partner then registers its own callback URL over the API, and the node delivers
orders.*.created there (durable, retried, Standard Webhooks signatures checked by the receiver). Every line is prefixed with who printed it. Ends after DEMO_SECONDS
(default 12) or Ctrl-C; every process it started is stopped by PID.
"""
import base64
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
BUILD = os.environ.get("EVMESH_BUILD_DIR", os.path.join(ROOT, "build"))
NODE = os.path.join(BUILD, "nodes", "evmesh-node")
seconds = float(os.environ.get("DEMO_SECONDS", "12"))
mesh = f"demo-{os.getpid()}"
COLORS = {"inspector": 92, "orders-node": 33, "partner-node": 35, "audit-node": 36, "orders-service": 32,
          "partner(C++)": 95, "audit(Python)": 96, "embedded(C++)": 94, "demo": 1, "partner-webhook": 91}
procs = []
lock = threading.Lock()
tmp = tempfile.mkdtemp(prefix="evmesh-demo-")


def say(who, line):
    color = COLORS.get(who, 0) if sys.stdout.isatty() else 0
    with lock:
        if color:
            print(f"\033[{color}m{who:>15}\033[0m | {line}", flush=True)
        else:
            print(f"{who:>15} | {line}", flush=True)


def pump(who, stream):
    for raw in iter(stream.readline, b""):
        line = raw.decode(errors="replace").rstrip()
        if line.startswith("{"):  # a subscriber's JSON line: show it compactly
            try:
                e = json.loads(line)
                line = f"got {e['topic']} seq={e['seq']} from {e['source']}: {e['payload']}"
            except (ValueError, KeyError):
                pass
        if " debug " not in line:
            say(who, line)


def spawn(who, args, quiet_stdout=False):
    p = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    procs.append(p)
    threading.Thread(target=pump, args=(who, p.stderr), daemon=True).start()
    if not quiet_stdout:
        threading.Thread(target=pump, args=(who, p.stdout), daemon=True).start()
    return p


def free_port(kind):
    s = socket.socket(socket.AF_INET, kind)
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


def api_config():
    """The partner node's config: the API with its database in the demo's temp dir."""
    path = os.path.join(tmp, "partner-node.toml")
    with open(path, "w") as f:
        f.write(f"""[api]
database = "{os.path.join(tmp, 'partner-api.db')}"
allow_private_urls = true   # the demo's receiver is on loopback
""")
    return path


def api(ready, method, path, key, body=None):
    req = urllib.request.Request(f"http://{ready['http']}{path}", method=method,
                                 data=json.dumps(body).encode() if body is not None else None,
                                 headers={"Authorization": f"Bearer {key}", "Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=5) as r:
        return json.loads(r.read())


def start_node(name, beacon_port, *extra):
    p = spawn(name, [NODE, "--name", name, "--mesh", mesh, "--beacon-port", str(beacon_port),
                     "--pub-endpoint", "tcp://127.0.0.1:*", "--sub-endpoint", "tcp://127.0.0.1:*",
                     "--http", "127.0.0.1:0", *extra], quiet_stdout=True)
    line = p.stdout.readline().decode()
    if not line.startswith("READY "):
        raise SystemExit(f"{name} failed to start")
    ready = json.loads(line[6:])
    say("demo", f"{name} ready: pub {ready['pub'][0]}  sub {ready['sub'][0]}  mesh {ready['mesh_endpoint']}")
    return ready


def get(ready, path):
    with urllib.request.urlopen(f"http://{ready['http']}{path}", timeout=2) as r:
        return r.read().decode()


def metric(ready, name, **labels):
    total = 0.0
    for line in get(ready, "/metrics").splitlines():
        if line.startswith(name + "{") and all(f'{k}="{v}"' in line for k, v in labels.items()):
            total += float(line.rsplit(" ", 1)[1])
    return int(total)


def main():
    beacon_port = free_port(socket.SOCK_DGRAM)
    say("demo", f"mesh '{mesh}', host-only discovery on UDP {beacon_port}; running {seconds:.0f} s")
    secret = "whsec_" + base64.b64encode(os.urandom(24)).decode()
    hook_port = free_port(socket.SOCK_STREAM)
    receiver = spawn("partner-webhook", ["/usr/bin/python3", os.path.join(ROOT, "examples", "open-platform",
                                                                          "webhook_receiver.py"), str(hook_port), secret],
                     quiet_stdout=True)
    say("partner-webhook", receiver.stdout.readline().decode().rstrip())
    threading.Thread(target=pump, args=("partner-webhook", receiver.stdout), daemon=True).start()
    cfg = api_config()
    nodes = {n: start_node(n, beacon_port, *(["--config", cfg] if n == "partner-node" else []))
             for n in ("orders-node", "partner-node", "audit-node")}
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        if all(len(json.loads(get(r, "/peers"))) == 2 for r in nodes.values()):
            break
        time.sleep(0.01)
    for name, r in nodes.items():
        peers = ", ".join(f"{p['name']} ({p['state']})" for p in json.loads(get(r, "/peers")))
        say("demo", f"{name} sees: {peers}")
    # the platform operator: an admin key (printed once, stored hashed), an application for the
    # partner and a key that can touch nothing but that application
    partner_node = nodes["partner-node"]
    out = subprocess.run([NODE, "--config", cfg, "api-key", "create", "--scope", "admin",
                          "--description", "demo operator"], capture_output=True, text=True, timeout=10, check=True)
    admin = json.loads(out.stdout)["key"]
    say("demo", f"$ evmesh-node api-key create --scope admin  ->  {admin[:20]}... (shown once)")
    api(partner_node, "POST", "/v1/apps", admin, {"id": "partner", "name": "Partner Inc."})
    partner_key = api(partner_node, "POST", "/v1/keys", admin, {"scopes": ["app:partner"]})["key"]
    say("demo", "operator created app 'partner' and a key scoped to app:partner")
    # the partner registers its own callback URL with its own signing secret
    ep = api(partner_node, "POST", "/v1/apps/partner/endpoints", partner_key,
             {"url": f"http://127.0.0.1:{hook_port}/hooks/evmesh", "topics": ["orders.*.created"],
              "secret": secret, "description": "partner order feed"})
    say("demo", f"partner registered {ep['url']} for {ep['topics']} -> endpoint {ep['id']}")
    count = int(seconds * 5)
    spawn("partner(C++)", [os.path.join(BUILD, "examples", "sidecar_client"), "sub",
                           nodes["partner-node"]["sub"][0], "orders.*.created", str(count + 10), str(int(seconds) + 5)])
    spawn("audit(Python)", ["/usr/bin/python3", os.path.join(ROOT, "examples", "python", "evmesh_client.py"),
                            "sub", nodes["audit-node"]["sub"][0], "orders.>", str(count + 10), str(seconds + 5)])
    spawn("embedded(C++)", [os.path.join(BUILD, "examples", "embedded_service"), mesh, "3",
                            str(beacon_port), str(int(seconds))])
    # the subscribers have subscribed when their sidecars count a local subscription
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and not all(
            metric(nodes[n], "evmesh_subscriptions", origin="local") >= 1 for n in ("partner-node", "audit-node")):
        time.sleep(0.01)
    orders = spawn("orders-service", ["/usr/bin/python3", os.path.join(ROOT, "examples", "open-platform", "orders_service.py"),
                                      nodes["orders-node"]["pub"][0], str(count), "0.2"])
    time.sleep(min(3.0, seconds / 2))
    inspector = os.path.join(BUILD, "tools", "mesh-inspector")
    common = ["--mesh", mesh, "--beacon-port", str(beacon_port)]
    for args in (["nodes"], ["topics"], ["ping", "partner-node", "-c", "3"]):
        say("demo", f"$ mesh-inspector {' '.join(args)}")
        out = subprocess.run([inspector, *args, *common], capture_output=True, timeout=30)
        for line in out.stdout.decode().splitlines():
            say("inspector", line)
    orders.wait()
    time.sleep(1.0)
    say("demo", "summary (from each node's /metrics):")
    for name, r in nodes.items():
        say("demo", f"  {name:13} in: client {metric(r, 'evmesh_events_in_total', input='client'):4}"
                    f"  mesh {metric(r, 'evmesh_events_in_total', input='mesh'):4}"
                    f" | out: local {metric(r, 'evmesh_events_out_total', output='local'):4}"
                    f"  mesh {metric(r, 'evmesh_events_out_total', output='mesh'):4}"
                    f" | peers {metric(r, 'evmesh_peers')} | rejected {metric(r, 'evmesh_client_events_rejected_total')}")
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        got = api(partner_node, "GET", f"/v1/apps/partner/endpoints/{ep['id']}", partner_key)
        if got["stats"]["pending"] == 0 and got["stats"]["in_flight"] == 0:
            break
        time.sleep(0.05)
    st = got["stats"]
    say("demo", f"  endpoint {ep['id']} (partner): delivered {st['delivered']}, pending {st['pending']}, "
                f"dead {st['dead']}, in flight {st['in_flight']}")
    last = api(partner_node, "GET", f"/v1/apps/partner/endpoints/{ep['id']}/attempts?limit=1", partner_key)["data"]
    if last:
        a = last[0]
        say("demo", f"  last attempt: event {a['event_id']} -> {a['outcome']} {a['status_code']} "
                    f"in {a['latency_ms']:.1f} ms")


def cleanup():
    for p in reversed(procs):
        if p.poll() is None:
            p.send_signal(signal.SIGTERM)
    for p in reversed(procs):
        try:
            p.wait(timeout=5)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()
    shutil.rmtree(tmp, ignore_errors=True)
    say("demo", "all processes stopped; bye")


if __name__ == "__main__":
    try:
        main()
    except KeyboardInterrupt:
        say("demo", "interrupted")
    finally:
        cleanup()
