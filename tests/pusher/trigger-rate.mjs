// HTTP API throughput as an app sees it: the `pusher` Node SDK triggering with 64 calls in
// flight for 5 s (one subscriber connected), events/s accepted. Client-bound on a small
// machine: a lower bound for the server.
//   CRIER_ADDR=127.0.0.1:PORT node tests/pusher/trigger-rate.mjs
import Pusher from "pusher";
import http from "node:http";
const [host, port] = process.env.CRIER_ADDR.split(":");
const sdk = new Pusher({ appId: "1", key: "key1", secret: "secret1", host, port, useTLS: false,
  agent: new http.Agent({ keepAlive: true, maxSockets: 64 }) });
const end = Date.now() + 5000;
let n = 0;
await Promise.all(Array.from({ length: 64 }, async () => {
  while (Date.now() < end) {
    await sdk.trigger("rate", "e", { n });
    n++;
  }
}));
console.log(`${n} events in 5 s: ${(n / 5).toFixed(0)} events/s through POST /apps/1/events`);
