// Laravel Echo (laravel-echo, unchanged, its browser build) over pusher-js (its web build)
// in headless Chromium, against crier, as a Laravel page uses them: Echo.channel().listen(),
// Echo.private() authorized by the app's /broadcasting/auth, Echo.join() presence with
// here()/joining()/leaving(), whisper() (client events). Events are triggered by the
// `pusher` Node SDK, as Laravel's broadcaster does.
//   CRIER_ADDR=127.0.0.1:PORT CRIER_PAGE_PORT=PORT node tests/pusher/echo.mjs
// crier must allow the page's origin (http://127.0.0.1:CRIER_PAGE_PORT) and know app 1.
import http from "node:http";
import { readFileSync } from "node:fs";
import Pusher from "pusher";
import { chromium } from "playwright-core";

const [host, port] = process.env.CRIER_ADDR.split(":");
const pagePort = Number(process.env.CRIER_PAGE_PORT);
const sdk = new Pusher({ appId: "1", key: "key1", secret: "secret1", host, port, useTLS: false });
const file = (p) => readFileSync(new URL(`./node_modules/${p}`, import.meta.url));
const WAIT = 10_000;

const page = (user) => `<!doctype html><meta charset="utf-8">
<script src="/pusher.js"></script><script src="/echo.js"></script>
<script>
  window.got = [];
  window.Pusher = Pusher; // presence user_info is {name}
  window.Echo = new Echo.default({
    broadcaster: "pusher", key: "key1", cluster: "mt1", Pusher,
    wsHost: "${host}", wsPort: ${port}, forceTLS: false, enabledTransports: ["ws"],
    disableStats: true,
    authEndpoint: "/broadcasting/auth", auth: { params: { user: "${user}" } },
  });
  Echo.channel("orders").listen(".OrderShipped", (e) => got.push(["shipped", e.id]));
  Echo.private("room").listen(".Secret", (e) => got.push(["secret", e.s]))
    .listenForWhisper("typing", (e) => got.push(["whisper", e.who]));
  Echo.join("chat")
    .here((users) => got.push(["here", users.map((u) => u.name).sort().join(",")]))
    .joining((u) => got.push(["joining", u.name]))
    .leaving((u) => got.push(["leaving", u.name]));
</script>`;

const server = http.createServer((req, res) => {
  const url = new URL(req.url, "http://x");
  if (url.pathname === "/pusher.js" || url.pathname === "/echo.js") {
    res.setHeader("content-type", "text/javascript");
    return res.end(file(url.pathname === "/pusher.js" ? "pusher-js/dist/web/pusher.min.js" : "laravel-echo/dist/echo.iife.js"));
  }
  if (url.pathname === "/broadcasting/auth") {
    let body = "";
    req.on("data", (c) => (body += c));
    return req.on("end", () => {
      const f = new URLSearchParams(body);
      const channel = f.get("channel_name");
      const user = f.get("user");
      const data = channel.startsWith("presence-") ? { user_id: user, user_info: { name: user } } : undefined;
      res.setHeader("content-type", "application/json");
      res.end(JSON.stringify(sdk.authorizeChannel(f.get("socket_id"), channel, data)));
    });
  }
  res.setHeader("content-type", "text/html");
  res.end(page(url.searchParams.get("user")));
});
await new Promise((r) => server.listen(pagePort, "127.0.0.1", r));

const browser = await chromium.launch({
  executablePath: process.env.CHROMIUM || "/usr/bin/chromium",
  args: ["--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking"],
  timeout: 30_000,
});
let step = "open";
const has = (p, kind, value) =>
  p.waitForFunction(([k, v]) => window.got.some(([a, b]) => a === k && b === v), [kind, value], { timeout: WAIT });
try {
  const ctx = await browser.newContext();
  const alice = await ctx.newPage();
  alice.on("pageerror", (e) => console.error("page error:", e));
  alice.on("console", (m) => process.env.CRIER_E2E_LOG && console.error("console:", m.text()));
  await alice.goto(`http://127.0.0.1:${pagePort}/?user=alice`);
  step = "presence here()";
  await has(alice, "here", "alice");
  const bob = await ctx.newPage();
  await bob.goto(`http://127.0.0.1:${pagePort}/?user=bob`);
  await has(bob, "here", "alice,bob");
  step = "presence joining()";
  await has(alice, "joining", "bob");
  step = "public and private events from the SDK";
  // The private subscription is authorized by then (here() came after it was sent).
  await bob.waitForFunction(() => Echo.connector.pusher.channel("private-room")?.subscribed, null, { timeout: WAIT });
  await sdk.trigger("orders", "OrderShipped", { id: 42 });
  await sdk.trigger("private-room", "Secret", { s: "x" });
  await has(alice, "shipped", 42);
  await has(bob, "secret", "x");
  step = "whisper (client event), not echoed";
  await alice.waitForFunction(() => Echo.connector.pusher.channel("private-room")?.subscribed, null, { timeout: WAIT });
  await bob.evaluate(() => Echo.private("room").whisper("typing", { who: "bob" }));
  await has(alice, "whisper", "bob");
  step = "presence leaving()";
  await bob.close();
  await has(alice, "leaving", "bob");
  const echoed = await alice.evaluate(() => window.got.filter(([k]) => k === "whisper").length);
  if (echoed !== 1) throw new Error(`alice saw ${echoed} whispers`);
  console.log("ok: Laravel Echo in Chromium");
} catch (e) {
  console.error(`FAILED at ${step}: ${e.stack || e}`);
  process.exitCode = 1;
} finally {
  await browser.close();
  server.close();
}
