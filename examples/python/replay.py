#!/usr/bin/python3
"""Replay then live, from docs/PROTOCOL.md section 12 alone, with Debian's python3-zmq and
python3-msgpack (run it with /usr/bin/python3).

    replay.py PUB_ENDPOINT SUB_ENDPOINT PATTERN [--from all|time|after_id|last|last_per_topic]
              [--time NS] [--id UUID] [--n N] [--live SECONDS] [--count N] [--answer-wait SECONDS]

PUB_ENDPOINT and SUB_ENDPOINT are a node's client endpoints (evmesh-node's `[client] pub` and
`sub`). Prints one JSON line per event ({"replayed": true|false, "topic", "id", "source", "seq",
"payload"}), first what the mesh's histories hold for PATTERN, then live events, with neither a
gap nor a duplicate per stream (source, topic); then a summary line on stderr:
{"replayed", "live", "duplicates", "gaps", "histories", "pages"}. Stops after --live seconds of
live events (default 2) or once --count events were printed.
"""
import argparse
import json
import sys
import time
import uuid

import msgpack
import zmq

FRAME_TYPE = "application/vnd.evmesh.frame"
END_TYPE = "application/vnd.evmesh.replay-end"


def literal_prefix(pattern):
    out = []
    for seg in pattern.split("."):
        if seg in ("*", ">"):
            return ".".join(out) + "." if out else ""
        out.append(seg)
    return ".".join(out)


def matches(pattern, topic):
    if topic.startswith("_evmesh.") and pattern.split(".")[0] != "_evmesh":
        return False
    p, t = pattern.split("."), topic.split(".")
    for i, seg in enumerate(p):
        if seg == ">":
            return len(t) > i
        if i >= len(t) or (seg != "*" and seg != t[i]):
            return False
    return len(t) == len(p)


def decode(body):
    """Section 3: [version, id, source, time, seq, content_type, headers, payload]."""
    v = msgpack.unpackb(body, raw=False)
    if not isinstance(v, list) or len(v) < 8 or v[0] != 1:
        raise ValueError("not an evmesh v1 event")
    return {"id": v[1].hex() if isinstance(v[1], bytes) else None, "source": v[2], "time": v[3],
            "seq": v[4] or 0, "content_type": v[5], "headers": v[6] or {}, "payload": v[7]}


def minimal_event(payload, content_type):
    return msgpack.packb([1, None, None, None, None, content_type, {}, payload], use_bin_type=True)


class Replay:
    def __init__(self, args):
        self.args = args
        self.ctx = zmq.Context()
        self.reply = "_evmesh.replay." + str(uuid.uuid4())
        self.sub = self.ctx.socket(zmq.SUB)
        self.sub.setsockopt(zmq.LINGER, 0)
        self.sub.setsockopt(zmq.RCVHWM, 0)
        self.sub.setsockopt(zmq.SUBSCRIBE, literal_prefix(args.pattern).encode())
        self.sub.setsockopt(zmq.SUBSCRIBE, self.reply.encode())
        self.sub.connect(args.sub)
        self.pub = self.ctx.socket(zmq.PUB)
        self.pub.setsockopt(zmq.LINGER, 1000)
        self.pub.connect(args.pub)
        self.delivered = {}     # (source, topic) -> set of seqs delivered
        self.buffered = []      # live events while replaying: (topic, event)
        self.first_live = {}    # (source, topic) -> first live seq seen
        self.histories = {}     # (node, history) -> {"next", "more", "asked"}
        self.counts = {"replayed": 0, "live": 0, "duplicates": 0, "gaps": 0, "histories": 0, "pages": 0}
        self.printed = 0

    def query(self, target, extra):
        q = {"reply": self.reply, "pattern": self.args.pattern, "from": self.args.from_,
             "limit": 1000}
        if self.args.from_ == "time":
            q["time"] = self.args.time
        if self.args.from_ == "after_id":
            q["id"] = self.args.id
        if self.args.from_ == "last":
            q["n"] = self.args.n
        q.update(extra)
        self.pub.send_multipart([("_evmesh.history.query." + target).encode(),
                                 minimal_event(msgpack.packb(q), "application/msgpack")])

    def emit(self, topic, ev, replayed):
        key = (ev["source"], topic)
        seq = ev["seq"]
        if seq:  # seq 0: unsequenced, cannot be deduplicated
            seen = self.delivered.setdefault(key, set())
            if seq in seen:
                self.counts["duplicates"] += 1
                return
            seen.add(seq)
        self.counts["replayed" if replayed else "live"] += 1
        payload = ev["payload"]
        if isinstance(payload, bytes):
            payload = payload.decode("utf-8", "replace")
        print(json.dumps({"replayed": replayed, "topic": topic, "id": ev["id"], "source": ev["source"],
                          "seq": seq, "payload": payload}), flush=True)
        self.printed += 1

    def receive(self, timeout_ms, live_mode):
        """Handles one message; False on timeout."""
        if not self.sub.poll(timeout_ms):
            return False
        frames = self.sub.recv_multipart()
        if len(frames) != 2:
            return True
        topic = frames[0].decode("utf-8", "replace")
        try:
            ev = decode(frames[1])
        except Exception:  # not an event: skip it
            return True
        if topic == self.reply:
            if ev["content_type"] == FRAME_TYPE:
                inner = ev["payload"]
                z = inner.find(b"\0")
                if z < 0:
                    return True
                itopic = inner[:z].decode("utf-8", "replace")
                if matches(self.args.pattern, itopic):
                    self.emit(itopic, decode(inner[z + 1:]), True)
            elif ev["content_type"] == END_TYPE:
                end = msgpack.unpackb(ev["payload"], raw=False)
                key = (end["node"], end["history"])
                if key not in self.histories:
                    self.counts["histories"] += 1
                self.counts["pages"] += 1
                self.histories[key] = {"next": end["next"], "more": end["more"], "asked": None}
                if end["more"]:
                    self.continue_from(key)
            return True
        if matches(self.args.pattern, topic):
            if live_mode:
                self.emit(topic, ev, False)
            else:
                self.buffered.append((topic, ev))
                self.first_live.setdefault((ev["source"], topic), ev["seq"])
        return True

    def continue_from(self, key):
        h = self.histories[key]
        h["asked"] = time.monotonic()
        h["more"] = True
        self.query(key[0], {"position": h["next"], "history": key[1]})

    def settle(self, deadline):
        """Receives until no history has a page outstanding (asking again after 2 s)."""
        while time.monotonic() < deadline:
            pending = [k for k, h in self.histories.items() if h["more"]]
            if not pending:
                return
            now = time.monotonic()
            for k in pending:
                if self.histories[k]["asked"] and now - self.histories[k]["asked"] > 2.0:
                    self.continue_from(k)  # the page did not come: ask again
            self.receive(50, False)

    def run(self):
        time.sleep(0.3)  # let both subscriptions reach the node (ZeroMQ's slow joiner)
        self.query("all", {})
        # 1. the first pages: every history that answers within --answer-wait seconds (on a link
        # busy with live events, answers queue behind them: give it more time there)
        t0 = time.monotonic()
        while True:
            # from the beginning, a live stream past seq 1 has older events that a history may
            # hold: while none has answered, wait up to 10 answer waits (a loaded mesh)
            expecting = (self.args.from_ == "all" and not self.histories
                         and any(f > 1 for f in self.first_live.values()))
            if time.monotonic() - t0 >= self.args.answer_wait * (10 if expecting else 1):
                break
            self.receive(50, False)
        self.settle(time.monotonic() + 60)
        # 2. once more from where each history ended: what reached it while we paged
        # 3. until every buffered stream's first live seq follows its last replayed one
        for _ in range(21):
            for k in self.histories:
                self.continue_from(k)
            self.settle(time.monotonic() + 30)
            missing = 0
            for key, first in self.first_live.items():
                top = max(self.delivered.get(key, {0}))
                if first and top and top + 1 < first:
                    missing += first - top - 1
            if missing == 0:
                break
            time.sleep(0.05)
        else:
            self.counts["gaps"] += missing
        # 4. the buffered live events, then live
        for topic, ev in self.buffered:
            self.emit(topic, ev, False)
        self.buffered = []
        stop = time.monotonic() + self.args.live
        while time.monotonic() < stop and (not self.args.count or self.printed < self.args.count):
            self.receive(50, True)
        print(json.dumps(self.counts), file=sys.stderr, flush=True)
        self.sub.close()
        self.pub.close()
        self.ctx.term()


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("pub")
    ap.add_argument("sub")
    ap.add_argument("pattern")
    ap.add_argument("--from", dest="from_", default="all",
                    choices=["all", "time", "after_id", "last", "last_per_topic"])
    ap.add_argument("--time", type=int, default=0)
    ap.add_argument("--id", default="")
    ap.add_argument("--n", type=int, default=10)
    ap.add_argument("--live", type=float, default=2.0)
    ap.add_argument("--answer-wait", type=float, default=1.0)
    ap.add_argument("--count", type=int, default=0)
    Replay(ap.parse_args()).run()


if __name__ == "__main__":
    main()
