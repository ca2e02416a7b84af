#!/usr/bin/python3
"""A Python client of evmesh-node's Server-Sent Events stream (docs/STREAMS.md).

    /usr/bin/python3 examples/streams/sse_client.py http://127.0.0.1:8080 'orders.>' [--key KEY] [--count N]

Prints one line per event (id, type, data). It remembers the last event id and, when the
connection drops, reconnects with Last-Event-ID: the node replays what it still holds, or sends a
`gap` notice saying what it could not. The standard library only: http.client reads the stream
line by line as it arrives (requests' iter_lines would hold the last events back until its chunk
fills).
"""
import argparse
import http.client
import json
import sys
import time
import urllib.parse


def events(resp):
    """(event, id, data) of each SSE message; comment lines (heartbeats) are skipped."""
    kind, eid, data = "message", None, []
    while True:
        line = resp.fp.readline()
        if not line:
            return  # the node closed the stream
        raw = line.decode("utf-8").rstrip("\r\n")
        if raw == "":
            if data:
                yield kind, eid, "\n".join(data)
            kind, data = "message", []
            continue
        if raw.startswith(":"):
            continue  # heartbeat
        field, _, value = raw.partition(":")
        value = value[1:] if value.startswith(" ") else value
        if field == "data":
            data.append(value)
        elif field == "id":
            eid = value
        elif field == "event":
            kind = value


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("url", help="the node's API base URL, e.g. http://127.0.0.1:8080")
    ap.add_argument("topics", help="comma-separated topic patterns, e.g. 'orders.>'")
    ap.add_argument("--key", help="an API key with a subscribe:<pattern> scope")
    ap.add_argument("--count", type=int, default=0, help="exit after N events (0: run until Ctrl-C)")
    args = ap.parse_args()

    headers = {"Accept": "text/event-stream"}
    if args.key:
        headers["Authorization"] = f"Bearer {args.key}"
    url = urllib.parse.urlsplit(args.url)
    conn_class = http.client.HTTPSConnection if url.scheme == "https" else http.client.HTTPConnection
    path = "/v1/stream?" + urllib.parse.urlencode({"topics": args.topics})
    last_id, got = None, 0
    while True:
        if last_id:
            headers["Last-Event-ID"] = last_id
        try:
            conn = conn_class(url.hostname, url.port, timeout=60)  # the node's heartbeat: every 15 s
            conn.request("GET", path, headers=headers)
            resp = conn.getresponse()
            if resp.status != 200:
                print(f"sse: HTTP {resp.status}: {resp.read().decode().strip()}", file=sys.stderr)
                return 1
            print("sse: connected", flush=True)
            for kind, eid, data in events(resp):
                if kind == "gap":
                    print(f"gap {data}", flush=True)
                    continue
                if kind != "message":
                    continue
                ev = json.loads(data)
                last_id = eid
                got += 1
                print(f"event {eid} {ev['type']} {json.dumps(ev.get('data'))}", flush=True)
                if args.count and got >= args.count:
                    conn.close()
                    return 0
            conn.close()
        except OSError as e:
            print(f"sse: {e}; reconnecting", file=sys.stderr, flush=True)
            time.sleep(1)
        except KeyboardInterrupt:
            return 0


if __name__ == "__main__":
    sys.exit(main())
