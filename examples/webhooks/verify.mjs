// A crier webhook receiver with nothing but Node's standard library (docs/webhooks.md).
// Checks X-Crier-Signature (HMAC-SHA256 of "timestamp.body", compared in constant time),
// refuses a timestamp more than 5 minutes off and a signature it already took (a
// replay), answers 204, and prints each event as one JSON line on stdout.
//
//   CRIER_WEBHOOK_SECRET=... node verify.mjs [port]      (port 0: any; logged on stderr)
import { createHmac, timingSafeEqual } from "node:crypto";
import { createServer } from "node:http";

const SECRET = process.env.CRIER_WEBHOOK_SECRET ?? "";
if (Buffer.byteLength(SECRET) < 32) {
  console.error("CRIER_WEBHOOK_SECRET must be at least 32 bytes");
  process.exit(2);
}
const MAX_SKEW_S = 300;
const seen = new Map(); // signature -> timestamp, kept for the skew window

function check(timestamp, signature, body) {
  const ts = Number(timestamp);
  if (!/^\d+$/.test(timestamp ?? "") || Math.abs(Date.now() / 1000 - ts) > MAX_SKEW_S) {
    return [400, "timestamp missing or too far off"];
  }
  const want = "sha256=" + createHmac("sha256", SECRET).update(`${timestamp}.`).update(body).digest("hex");
  const got = Buffer.from(signature ?? "");
  if (got.length !== want.length || !timingSafeEqual(got, Buffer.from(want))) {
    return [401, "bad signature"];
  }
  if (seen.has(want)) return [409, "replayed"];
  for (const [s, t] of seen) if (Date.now() / 1000 - t > MAX_SKEW_S) seen.delete(s);
  seen.set(want, ts);
  return [204, ""];
}

const server = createServer((req, res) => {
  const chunks = [];
  req.on("data", (c) => chunks.push(c));
  req.on("end", () => {
    const body = Buffer.concat(chunks);
    const [status, why] = check(req.headers["x-crier-timestamp"], req.headers["x-crier-signature"], body);
    if (status === 204) {
      for (const event of JSON.parse(body).events) console.log(JSON.stringify(event));
    } else {
      console.error(`refused: ${why}`);
    }
    res.writeHead(status).end(why);
  });
});
server.listen(Number(process.argv[2] ?? 9000), "127.0.0.1", () => {
  console.error(`listening on ${server.address().port}`);
});
