#!/usr/bin/python3
"""A pull consumer (a queue-group member) from docs/PROTOCOL.md section 13 alone, with Debian's
python3-zmq and python3-msgpack (run it with /usr/bin/python3).

    pull.py PUB_ENDPOINT SUB_ENDPOINT HISTORY CONSUMER [--batch N] [--wait MS] [--count N]
            [--idle SECONDS] [--filter PATTERN] [--ack-wait MS] [--max-deliver N]
            [--dead-letter TOPIC] [--start all|new] [--nak-every N]

Fetches up to --batch messages at a time from the durable consumer CONSUMER of the history
HISTORY (created with the given settings by the first fetch anywhere in the mesh), prints one
JSON line per message ({"pos", "deliveries", "topic", "id", "source", "seq", "payload"}), then
acknowledges the batch. Several processes with the same HISTORY and CONSUMER share the messages:
each goes to one of them at a time, and what one of them fetched and did not acknowledge within
the ack wait goes to another. Stops after --count messages or --idle seconds without one, then
prints {"processed", "fetches"} on stderr. --nak-every N refuses every Nth message (nak) instead
of acknowledging it, to show redelivery.
"""
import argparse
import json
import sys
import time
import uuid

import msgpack
import zmq

FRAME_TYPE = "application/vnd.evmesh.frame"
END_TYPE = "application/vnd.evmesh.fetch-end"


def decode(body):
    v = msgpack.unpackb(body, raw=False)
    if not isinstance(v, list) or len(v) < 8 or v[0] != 1:
        raise ValueError("not an evmesh v1 event")
    return {"id": v[1].hex() if isinstance(v[1], bytes) else None, "source": v[2], "time": v[3],
            "seq": v[4] or 0, "content_type": v[5], "headers": v[6] or {}, "payload": v[7]}


def request(pub, body):
    """A consumer request: a minimal event on _evmesh.consumer.all (every node with the history)."""
    env = msgpack.packb([1, None, None, None, None, "application/msgpack", {}, msgpack.packb(body)],
                        use_bin_type=True)
    pub.send_multipart([b"_evmesh.consumer.all", env])


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("pub")
    ap.add_argument("sub")
    ap.add_argument("history")
    ap.add_argument("consumer")
    ap.add_argument("--batch", type=int, default=100)
    ap.add_argument("--wait", type=int, default=1000, help="ms a fetch waits for messages")
    ap.add_argument("--count", type=int, default=0)
    ap.add_argument("--idle", type=float, default=5.0)
    ap.add_argument("--filter", default=">")
    ap.add_argument("--ack-wait", type=int, default=30000)
    ap.add_argument("--max-deliver", type=int, default=5)
    ap.add_argument("--dead-letter", default="")
    ap.add_argument("--start", default="all", choices=["all", "new"])
    ap.add_argument("--nak-every", type=int, default=0)
    args = ap.parse_args()

    ctx = zmq.Context()
    reply = "_evmesh.pull." + str(uuid.uuid4())
    sub = ctx.socket(zmq.SUB)
    sub.setsockopt(zmq.LINGER, 0)
    sub.setsockopt(zmq.SUBSCRIBE, reply.encode())
    sub.connect(args.sub)
    pub = ctx.socket(zmq.PUB)
    pub.setsockopt(zmq.LINGER, 2000)
    pub.connect(args.pub)
    time.sleep(0.3)  # the reply subscription reaches the node (ZeroMQ's slow joiner)

    base = {"history": args.history, "consumer": args.consumer}
    fetch = dict(base, op="fetch", reply=reply, batch=args.batch, wait_ms=args.wait, filter=args.filter,
                 ack_wait_ms=args.ack_wait, max_deliver=args.max_deliver, start=args.start)
    if args.dead_letter:
        fetch["dead_letter"] = args.dead_letter
    processed = fetches = 0
    last_message = time.monotonic()
    while (not args.count or processed < args.count) and time.monotonic() - last_message < args.idle:
        request(pub, fetch)
        fetches += 1
        acks, naks = [], []
        deadline = time.monotonic() + args.wait / 1000.0 + 3.0  # no end: ask again
        while time.monotonic() < deadline:
            if not sub.poll(100):
                continue
            frames = sub.recv_multipart()
            if len(frames) != 2:
                continue
            ev = decode(frames[1])
            if ev["content_type"] == END_TYPE:
                break
            if ev["content_type"] != FRAME_TYPE:
                continue
            inner = ev["payload"]
            z = inner.find(b"\0")
            topic = inner[:z].decode("utf-8", "replace")
            msg = decode(inner[z + 1:])
            pos = int(ev["headers"]["evmesh-pos"])
            payload = msg["payload"]
            if isinstance(payload, bytes):
                payload = payload.decode("utf-8", "replace")
            processed += 1
            last_message = time.monotonic()
            if args.nak_every and processed % args.nak_every == 0:
                naks.append(pos)
                continue
            print(json.dumps({"pos": pos, "deliveries": int(ev["headers"]["evmesh-deliveries"]), "topic": topic,
                              "id": msg["id"], "source": msg["source"], "seq": msg["seq"], "payload": payload}),
                  flush=True)
            acks.append(pos)
        if acks:
            request(pub, dict(base, op="ack", positions=acks))
        if naks:
            request(pub, dict(base, op="nak", positions=naks))
    print(json.dumps({"processed": processed, "fetches": fetches}), file=sys.stderr, flush=True)
    sub.close()
    pub.close()
    ctx.term()


if __name__ == "__main__":
    main()
