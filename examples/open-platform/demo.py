#!/usr/bin/python3
"""Live mesh demo on this host (the README's first command runs it through scripts/demo.sh).

Three evmesh-node sidecars discover each other (host-only beacons), an embedded C++ service joins
with its own node, the Python orders service publishes orders.<region>.created on the first
sidecar, a C++ partner subscribes to orders.*.created on the second and a Python audit log to
orders.> on the third. The partner node also delivers orders.*.created to the partner's webhook
endpoint through a channel (durable outbox, Standard Webhooks signatures checked by the
receiver). Every line is prefixed with who printed it. Ends after DEMO_SECONDS
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


def webhook_channel(url, secret):
    """The partner node's config: one webhook channel with its outbox in the demo's temp dir."""
    path = os.path.join(tmp, "partner-node.toml")
    with open(path, "w") as f:
        f.write(f"""[outbox]
path = "{os.path.join(tmp, 'partner-outbox.db')}"

[[channel]]
name = "partner-webhook"
plugin = "webhook"
topics = ["orders.*.created"]
[channel.settings]
url = "{url}"
secret = "{secret}"
allow_private = true   # the demo's receiver is on loopback
""")
    return path


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
    cfg = webhook_channel(f"http://127.0.0.1:{hook_port}/hooks/evmesh", secret)
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
    for ch in json.loads(get(nodes["partner-node"], "/channels")):
        say("demo", f"  channel {ch['name']} ({ch['plugin']}): accepted {ch['accepted']}, delivered {ch['delivered']}, "
                    f"pending {ch['pending']}, retried {ch['retried']}, dead {ch['dead']}, "
                    f"avg attempt {ch['attempt_latency_avg_us']} us")


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
