#!/usr/bin/python3
"""A Python evmesh client written from docs/PROTOCOL.md, using only Debian's python3-zmq and
python3-msgpack (run it with /usr/bin/python3).

    evmesh_client.py pub ENDPOINT TOPIC COUNT [PAYLOAD]
    evmesh_client.py sub ENDPOINT PATTERN COUNT [SECONDS]   prints one JSON line per event
"""
import json
import sys
import time

import msgpack
import zmq


def literal_prefix(pattern):
    """ZeroMQ subscription for a pattern: its segments up to the first wildcard."""
    out = []
    for seg in pattern.split("."):
        if seg in ("*", ">"):
            return ".".join(out) + "." if out else ""
        out.append(seg)
    return ".".join(out)


def matches(pattern, topic):
    if topic.startswith("_evmesh.") and pattern.split(".")[0] != "_evmesh":
        return False  # reserved topics (node stats, ping) only match `_evmesh...` patterns
    p, t = pattern.split("."), topic.split(".")
    for i, seg in enumerate(p):
        if seg == ">":
            return len(t) > i
        if i >= len(t) or (seg != "*" and seg != t[i]):
            return False
    return len(t) == len(p)


def minimal_event(payload, content_type="application/json", headers=None):
    """Version 1 envelope; nil id/source/time/seq are filled in by the node."""
    return msgpack.packb([1, None, None, None, None, content_type, headers or {}, payload],
                         use_bin_type=True)


def decode(topic, body):
    v = msgpack.unpackb(body, raw=False)
    if not isinstance(v, list) or len(v) < 8 or v[0] != 1:
        raise ValueError("not an evmesh v1 event")
    return {"topic": topic, "id": v[1].hex(), "source": v[2], "time": v[3], "seq": v[4],
            "content_type": v[5], "headers": v[6] or {},
            "payload": v[7].decode("utf-8", "replace") if isinstance(v[7], bytes) else v[7]}


def publish(endpoint, topic, count, payload):
    ctx = zmq.Context()
    sock = ctx.socket(zmq.PUB)
    sock.setsockopt(zmq.LINGER, 2000)
    sock.connect(endpoint)
    time.sleep(0.3)  # let the node's subscriptions reach this PUB socket
    for i in range(count):
        body = json.dumps({"n": i, "text": payload}).encode()
        sock.send_multipart([topic.encode(), minimal_event(body, headers={"client": "python"})])
    print(f"published {count} events on {topic}", file=sys.stderr)
    sock.close()
    ctx.term()


def subscribe(endpoint, pattern, count, seconds):
    ctx = zmq.Context()
    sock = ctx.socket(zmq.SUB)
    sock.setsockopt(zmq.SUBSCRIBE, literal_prefix(pattern).encode())
    sock.setsockopt(zmq.RCVTIMEO, 200)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(endpoint)
    got, deadline = 0, time.monotonic() + seconds
    while got < count and time.monotonic() < deadline:
        try:
            frames = sock.recv_multipart()
        except zmq.Again:
            continue
        if len(frames) != 2 or not matches(pattern, frames[0].decode()):
            continue
        try:
            print(json.dumps(decode(frames[0].decode(), frames[1])), flush=True)
            got += 1
        except (ValueError, msgpack.exceptions.ExtraData) as e:
            print(f"undecodable event: {e}", file=sys.stderr)
    print(f"received {got} events", file=sys.stderr)
    sock.close()
    ctx.term()
    return 0 if got >= count else 1


if __name__ == "__main__":
    a = sys.argv[1:]
    if len(a) >= 4 and a[0] == "pub":
        publish(a[1], a[2], int(a[3]), a[4] if len(a) > 4 else "hello from Python")
    elif len(a) >= 4 and a[0] == "sub":
        sys.exit(subscribe(a[1], a[2], int(a[3]), float(a[4]) if len(a) > 4 else 10))
    else:
        print(__doc__, file=sys.stderr)
        sys.exit(2)
