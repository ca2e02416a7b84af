#!/usr/bin/env node
// A Node.js client of evmesh-node's WebSocket stream (docs/STREAMS.md), on Debian's node-ws:
//
//   NODE_PATH=/usr/share/nodejs node examples/streams/ws_client.js ws://127.0.0.1:8080 'orders.>' [count] [key]
//
// Subscribes, prints one line per event, answers nothing but sends a ping every 20 s (the node
// pings too and closes a connection that stops answering). On a drop it reconnects and resumes
// after the last id it saw (`last_event_id`), so the node replays what it still holds or says
// with a `gap` notice what it cannot.
"use strict";
const WebSocket = require("ws");

const [url, topics = ">", countArg = "0", key] = process.argv.slice(2);
if (!url) {
  console.error("usage: ws_client.js ws://HOST:PORT PATTERNS [COUNT] [KEY]");
  process.exit(2);
}
const count = Number(countArg);
let got = 0;
let lastId = null;

function connect() {
  const target = `${url}/v1/ws${key ? "?access_token=" + encodeURIComponent(key) : ""}`;
  const ws = new WebSocket(target);
  let pinger = null;
  ws.on("open", () => {
    const sub = { control: "subscribe", topics: topics.split(",") };
    if (lastId) sub.last_event_id = lastId;
    ws.send(JSON.stringify(sub));
    pinger = setInterval(() => ws.send(JSON.stringify({ control: "ping" })), 20000);
  });
  ws.on("message", (data, isBinary) => {
    if (isBinary) return;  // msgpack frames only when asked for ("format": "msgpack")
    const msg = JSON.parse(data.toString());
    if (msg.control === "subscribed") console.log(`ws: subscribed ${msg.topics.join(",")}`);
    else if (msg.control === "gap") console.log(`gap ${JSON.stringify(msg)}`);
    else if (msg.control === "error") console.error(`ws: error ${msg.code}: ${msg.message}`);
    else if (!msg.control) {
      lastId = msg.id;
      got += 1;
      console.log(`event ${msg.id} ${msg.type} ${JSON.stringify(msg.data)}`);
      if (count && got >= count) {
        clearInterval(pinger);
        ws.close(1000, "done");
      }
    }
  });
  ws.on("close", (code, reason) => {
    clearInterval(pinger);
    if (count && got >= count) process.exit(0);
    console.error(`ws: closed ${code} ${reason}; reconnecting`);
    setTimeout(connect, 1000);
  });
  ws.on("error", (e) => console.error(`ws: ${e.message}`));
}

connect();
