#!/usr/bin/python3
"""The "orders service" of the open-platform scenario: publishes orders.<region>.created events
to its evmesh-node sidecar, with only Debian's python3-zmq and python3-msgpack.

    orders_service.py PUB_ENDPOINT COUNT [INTERVAL_SECONDS]
"""
import json
import random
import sys
import time

import msgpack
import zmq

endpoint, count = sys.argv[1], int(sys.argv[2])
interval = float(sys.argv[3]) if len(sys.argv) > 3 else 0.2

ctx = zmq.Context()
# An XPUB publishes like a PUB and also shows the subscriptions the sidecar forwards to it: wait
# for the first `orders.` one instead of guessing how long they take to arrive.
pub = ctx.socket(zmq.XPUB)
pub.setsockopt(zmq.LINGER, 2000)
pub.setsockopt(zmq.RCVTIMEO, 10000)
pub.connect(endpoint)
try:
    while not pub.recv().startswith(b"\x01orders."):
        pass
except zmq.Again:
    print("orders-service: nobody subscribed to orders.* within 10 s; publishing anyway", flush=True)
for n in range(1, count + 1):
    region = random.choice(["eu", "us", "apac"])
    order = {"order_id": f"o-{n:05d}", "region": region, "total": round(random.uniform(5, 500), 2)}
    # a minimal event: the sidecar fills id, source, time and sequence (docs/PROTOCOL.md)
    body = msgpack.packb([1, None, None, None, None, "application/json",
                          {"traceparent": f"00-{random.getrandbits(128):032x}-{random.getrandbits(64):016x}-01"},
                          json.dumps(order).encode()], use_bin_type=True)
    pub.send_multipart([f"orders.{region}.created".encode(), body])
    print(f"orders-service: published orders.{region}.created {order}", flush=True)
    time.sleep(interval)
pub.close()
ctx.term()
