// Drives crier's Pusher mode with the real, unchanged libraries: pusher-js (the client, as
// in a browser or Laravel Echo) and pusher (the Node server SDK: trigger, triggerBatch,
// get, authorizeChannel). Run by tests/it/pusher.rs against a server it started:
//   CRIER_ADDR=127.0.0.1:PORT node tests/pusher/drive.mjs
// App "1"/"key1"/"secret1" (client events on); app "2"/"key2"/"secret2".
// Exits non-zero, naming the step, on the first thing that is not as Pusher does it.
import Pusher from "pusher";
import PusherJs from "pusher-js";

const [host, port] = process.env.CRIER_ADDR.split(":");
const APP = { appId: "1", key: "key1", secret: "secret1" };
const server = new Pusher({ ...APP, host, port, useTLS: false });
const forged = new Pusher({ ...APP, secret: "not-the-secret", host, port, useTLS: false });
const other = new Pusher({ appId: "2", key: "key2", secret: "secret2", host, port, useTLS: false });

let step = "start";
const fail = (msg) => {
  console.error(`FAILED at ${step}: ${msg}`);
  process.exit(1);
};
const timeout = (ms, what) =>
  new Promise((_, rej) => setTimeout(() => rej(new Error(`timed out: ${what}`)), ms));
const within = (p, what, ms = 5000) => Promise.race([p, timeout(ms, what)]);

/// A pusher-js client of app `key`; private and presence channels are authorized by the
/// server SDK's authorizeChannel, as an app's auth endpoint does (user `user`).
function client(key = APP.key, user = null, sdk = server) {
  return new PusherJs(key, {
    cluster: "mt1",
    wsHost: host,
    wsPort: Number(port),
    forceTLS: false,
    enabledTransports: ["ws"],
    disableStats: true,
    channelAuthorization: {
      customHandler: ({ socketId, channelName }, cb) => {
        const data = channelName.startsWith("presence-")
          ? { user_id: user.id, user_info: user.info }
          : undefined;
        cb(null, sdk.authorizeChannel(socketId, channelName, data));
      },
    },
  });
}

const connected = (c) =>
  within(
    new Promise((res, rej) => {
      c.connection.bind("connected", () => res(c.connection.socket_id));
      c.connection.bind("error", (e) => rej(new Error(JSON.stringify(e))));
    }),
    "connected",
  );

const subscribed = (c, name) =>
  within(
    new Promise((res, rej) => {
      const ch = c.subscribe(name);
      ch.bind("pusher:subscription_succeeded", (data) => res([ch, data]));
      ch.bind("pusher:subscription_error", (e) => rej(new Error(JSON.stringify(e))));
    }),
    `subscribed to ${name}`,
  );

/// The next `event` on `ch`, with every other `event` seen before it collected.
const next = (ch, event, ms = 5000) =>
  within(new Promise((res) => ch.bind(event, function h(d) { ch.unbind(event, h); res(d); })), `${event} on ${ch.name}`, ms);

// Webhooks of app 1 (when CRIER_WEBHOOK_PORT is given): every delivery must pass the SDK's
// own check (X-Pusher-Key, X-Pusher-Signature); its events are collected.
const hooks = [];
if (process.env.CRIER_WEBHOOK_PORT) {
  const http = await import("node:http");
  await new Promise((res) =>
    http
      .createServer((req, resp) => {
        let body = "";
        req.on("data", (c) => (body += c));
        req.on("end", () => {
          const wh = server.webhook({ headers: req.headers, rawBody: body });
          if (!wh.isValid()) {
            hooks.push({ name: "INVALID" });
          } else {
            hooks.push(...wh.getEvents());
          }
          resp.end("ok");
        });
      })
      .listen(Number(process.env.CRIER_WEBHOOK_PORT), "127.0.0.1", res),
  );
}

const t0 = Date.now();
try {
  step = "connect";
  const a = client(APP.key, { id: "alice", info: { name: "Alice" } });
  const b = client(APP.key, { id: "bob", info: { name: "Bob" } });
  const [sa, sb] = await Promise.all([connected(a), connected(b)]);
  if (!/^\d+\.\d+$/.test(sa) || sa === sb) fail(`socket ids ${sa} ${sb}`);

  step = "public channel: trigger from the Node SDK";
  const [cha] = await subscribed(a, "my-channel");
  const [chb] = await subscribed(b, "my-channel");
  let got = next(cha, "my-event");
  const r = await server.trigger("my-channel", "my-event", { message: "hello" });
  if (r.status !== 200) fail(`trigger answered ${r.status}`);
  const d = await got;
  if (d.message !== "hello") fail(`got ${JSON.stringify(d)}`);

  step = "socket_id exclusion";
  const seenA = [];
  cha.bind("ex", (d) => seenA.push(d.n));
  const bGot = next(chb, "ex");
  await server.trigger("my-channel", "ex", { n: 1 }, { socket_id: sa });
  await bGot;
  const aGot = next(cha, "ex");
  await server.trigger("my-channel", "ex", { n: 2 });
  await aGot;
  if (JSON.stringify(seenA) !== "[2]") fail(`the excluded socket saw ${JSON.stringify(seenA)}`);

  step = "several channels and triggerBatch";
  const [chx] = await subscribed(a, "other-channel");
  const both = Promise.all([next(cha, "multi"), next(chx, "multi")]);
  await server.trigger(["my-channel", "other-channel"], "multi", "text");
  const [m1, m2] = await both;
  if (m1 !== "text" || m2 !== "text") fail(`${m1} ${m2}`);
  const batch = Promise.all([next(cha, "b1"), next(chx, "b2")]);
  await server.triggerBatch([
    { channel: "my-channel", name: "b1", data: { k: 1 } },
    { channel: "other-channel", name: "b2", data: { k: 2 } },
  ]);
  const [b1, b2] = await batch;
  if (b1.k !== 1 || b2.k !== 2) fail(`${JSON.stringify(b1)} ${JSON.stringify(b2)}`);

  step = "a forged signature is refused with 401 and publishes nothing";
  const seen = [];
  cha.bind("forged", (d) => seen.push(d));
  try {
    await forged.trigger("my-channel", "forged", {});
    fail("a forged trigger was accepted");
  } catch (e) {
    if (e.status !== 401) fail(`forged trigger: ${e.status} ${e.body}`);
  }
  step = "a stale timestamp is refused with 401";
  {
    // Signed correctly by hand, but 700 s old.
    const crypto = await import("node:crypto");
    const body = JSON.stringify({ name: "forged", channel: "my-channel", data: "{}" });
    const md5 = crypto.createHash("md5").update(body).digest("hex");
    const ts = Math.floor(Date.now() / 1000) - 700;
    const q = `auth_key=${APP.key}&auth_timestamp=${ts}&auth_version=1.0&body_md5=${md5}`;
    const sig = crypto.createHmac("sha256", APP.secret).update(`POST\n/apps/1/events\n${q}`).digest("hex");
    const res = await fetch(`http://${host}:${port}/apps/1/events?${q}&auth_signature=${sig}`, {
      method: "POST",
      headers: { "content-type": "application/json" },
      body,
    });
    if (res.status !== 401) fail(`stale timestamp: ${res.status}`);
    const fresh = Math.floor(Date.now() / 1000);
    const q2 = q.replace(String(ts), String(fresh));
    const sig2 = crypto.createHmac("sha256", APP.secret).update(`POST\n/apps/1/events\n${q2}`).digest("hex");
    const tampered = body.replace("{}", "{\"x\":1}");
    const res2 = await fetch(`http://${host}:${port}/apps/1/events?${q2}&auth_signature=${sig2}`, {
      method: "POST",
      headers: { "content-type": "application/json" },
      body: tampered,
    });
    if (res2.status !== 401) fail(`tampered body: ${res2.status}`);
  }
  step = "another app's channel of the same name is another channel";
  await other.trigger("my-channel", "forged", {});
  const after = next(cha, "fence");
  await server.trigger("my-channel", "fence", {});
  await after;
  if (seen.length) fail(`refused or foreign triggers arrived: ${JSON.stringify(seen)}`);

  step = "private channel";
  const [pa] = await subscribed(a, "private-room");
  const [pb] = await subscribed(b, "private-room");
  got = next(pb, "secret");
  await server.trigger("private-room", "secret", { s: 1 });
  if ((await got).s !== 1) fail("private event");
  step = "a private channel signed with the wrong secret is refused";
  const c = client(APP.key, null, forged);
  await connected(c);
  try {
    await subscribed(c, "private-room");
    fail("subscribed with a forged auth");
  } catch (e) {
    if (!/AuthError|invalid signature/.test(e.message)) fail(e.message);
  }
  c.disconnect();

  step = "client events: to the others, not echoed";
  const echoed = [];
  pa.bind("client-typing", (d) => echoed.push(d));
  got = next(pb, "client-typing");
  if (!pa.trigger("client-typing", { who: "alice" })) fail("trigger returned false");
  const ce = await got;
  if (ce.who !== "alice") fail(JSON.stringify(ce));
  const fenceA = next(pa, "fence2");
  await server.trigger("private-room", "fence2", {});
  await fenceA;
  if (echoed.length) fail("the sender got its own client event");

  step = "presence: members, member_added, member_removed";
  const [pra, membersA] = await subscribed(a, "presence-lobby");
  if (membersA.count !== 1 || membersA.me.id !== "alice") fail(`alice alone: ${membersA.count}`);
  const added = next(pra, "pusher:member_added");
  const [prb, membersB] = await subscribed(b, "presence-lobby");
  const m = await added;
  if (m.id !== "bob" || m.info.name !== "Bob") fail(`member_added ${JSON.stringify(m)}`);
  if (membersB.count !== 2 || membersB.get("alice").info.name !== "Alice")
    fail(`bob sees ${membersB.count}`);
  step = "presence: a client event names its sender's user_id";
  {
    const hi = within(new Promise((res) => prb.bind("client-hi", (d, meta) => res([d, meta]))), "client-hi");
    pra.trigger("client-hi", { x: 1 });
    const [d, meta] = await hi;
    if (d.x !== 1 || meta?.user_id !== "alice") fail(`${JSON.stringify(d)} ${JSON.stringify(meta)}`);
  }
  step = "presence: a second connection of the same user adds no member";
  const b2c = client(APP.key, { id: "bob", info: { name: "Bob" } });
  await connected(b2c);
  const dup = [];
  pra.bind("pusher:member_added", (x) => dup.push(x));
  await subscribed(b2c, "presence-lobby");
  step = "HTTP API: channels, channel, users";
  let res = await server.get({ path: "/channels/presence-lobby/users" });
  const users = (await res.json()).users.map((u) => u.id).sort();
  if (JSON.stringify(users) !== '["alice","bob"]') fail(JSON.stringify(users));
  res = await server.get({ path: "/channels", params: { filter_by_prefix: "presence-", info: "user_count" } });
  const chans = (await res.json()).channels;
  if (chans["presence-lobby"]?.user_count !== 2) fail(JSON.stringify(chans));
  res = await server.get({ path: "/channels/my-channel", params: { info: "subscription_count" } });
  const info = await res.json();
  if (!info.occupied || info.subscription_count !== 2) fail(JSON.stringify(info));
  res = await server.get({ path: "/channels" });
  const all = Object.keys((await res.json()).channels).sort();
  for (const n of ["my-channel", "other-channel", "presence-lobby", "private-room"])
    if (!all.includes(n)) fail(`${n} missing from ${all}`);
  step = "presence: removed once, when the user's last connection leaves";
  const removed = next(pra, "pusher:member_removed");
  b2c.disconnect();
  b.unsubscribe("presence-lobby");
  const r2 = await removed;
  if (r2.id !== "bob") fail(JSON.stringify(r2));
  if (dup.length) fail(`a second connection of bob was announced: ${JSON.stringify(dup)}`);

  step = "cache channel: pusher:cache_miss, then the last event on subscribe";
  {
    const miss = within(
      new Promise((res) => {
        const ch = a.subscribe("cache-scores");
        ch.bind("pusher:cache_miss", () => res(ch));
      }),
      "cache_miss",
    );
    const cch = await miss;
    got = next(cch, "score");
    await server.trigger("cache-scores", "score", { v: 1 });
    await got;
    await server.trigger("cache-scores", "score", { v: 2 });
    const late = client();
    await connected(late);
    const ch = late.subscribe("cache-scores");
    const cached = await next(ch, "score");
    if (cached.v !== 2) fail(`cached ${JSON.stringify(cached)}`);
    late.disconnect();
  }

  step = "a leaderboard watched as channel board@NAME";
  {
    const post = (score) =>
      fetch(`http://${host}:${port}/api/boards/arena/scores`, {
        method: "POST",
        headers: { "content-type": "application/json" },
        body: JSON.stringify({ player: "p1", score }),
      });
    const r0 = await post(10);
    if (!r0.ok) fail(`score: ${r0.status} ${await r0.text()}`);
    const ch = a.subscribe("board@arena");
    const snap = await next(ch, "crier:publication");
    const board = typeof snap === "string" ? JSON.parse(snap) : snap;
    if (!JSON.stringify(board).includes("p1")) fail(`snapshot ${JSON.stringify(board)}`);
    const upd = next(ch, "crier:publication");
    await post(20);
    const u = await upd;
    if (!JSON.stringify(u).includes("20")) fail(`update ${JSON.stringify(u)}`);
  }

  step = "a followed player board@NAME@P and a friends view board@NAME;friends@A@B";
  {
    const post = async (player, score) => {
      const r = await fetch(`http://${host}:${port}/api/boards/arena/scores`, {
        method: "POST",
        headers: { "content-type": "application/json" },
        body: JSON.stringify({ player, score }),
      });
      if (!r.ok) fail(`score: ${r.status} ${await r.text()}`);
    };
    const parse = (d) => (typeof d === "string" ? JSON.parse(d) : d);
    await post("p2", 15); // p1 has 20: p2 is second
    const me = a.subscribe("board@arena@p2");
    const w = parse(await next(me, "crier:publication"));
    if (w.entry?.player !== "p2" || w.entry?.rank !== 2) fail(`window ${JSON.stringify(w)}`);
    const fr = a.subscribe("board@arena;friends@p1@p2@nobody");
    const v = parse(await next(fr, "crier:publication"));
    const order = (v) => v.ranking.map((e) => e.player).join(",");
    if (order(v) !== "p1,p2" || JSON.stringify(v.missing) !== '["nobody"]') fail(`friends ${JSON.stringify(v)}`);
    const w2 = next(me, "crier:publication");
    const v2 = next(fr, "crier:publication");
    await post("p2", 30); // first now
    const moved = parse(await w2);
    if (moved.entry?.rank !== 1) fail(`window after the move ${JSON.stringify(moved)}`);
    if (order(parse(await v2)) !== "p2,p1") fail("friends after the move");
    // A set the topic rules refuse (a player twice) is the request's fault: 400.
    const bad = a.subscribe("board@arena;friends@p1@p1");
    const err = await within(new Promise((res) => bad.bind("pusher:subscription_error", res)), "subscription_error");
    if (err.status !== 400) fail(`refused set: ${JSON.stringify(err)}`);
    a.unsubscribe("board@arena;friends@p1@p1");
  }

  step = "an unknown app key gets 4001";
  {
    const ws = new WebSocket(`ws://${host}:${port}/app/nope?protocol=7&client=js&version=8.4.0`);
    const [msg, code] = await within(
      new Promise((res) => {
        let first;
        ws.onmessage = (e) => (first ??= JSON.parse(e.data));
        ws.onclose = (e) => res([first, e.code]);
      }),
      "4001",
    );
    if (msg?.event !== "pusher:error" || msg.data.code !== 4001 || code !== 4001)
      fail(`${JSON.stringify(msg)} ${code}`);
  }
  step = "pusher:ping answered with pusher:pong";
  {
    const ws = new WebSocket(`ws://${host}:${port}/app/${APP.key}?protocol=7`);
    const events = [];
    await within(
      new Promise((res) => {
        ws.onmessage = (e) => {
          const m = JSON.parse(e.data);
          events.push(m.event);
          if (m.event === "pusher:connection_established") ws.send('{"event":"pusher:ping","data":{}}');
          if (m.event === "pusher:pong") res();
        };
      }),
      "pong",
    );
    step = "malformed messages get pusher:error, and the connection stays";
    const errors = [];
    await within(
      new Promise((res) => {
        ws.onmessage = (e) => {
          const m = JSON.parse(e.data);
          if (m.event === "pusher:error") errors.push(m.data);
          if (m.event === "pusher:pong") res();
        };
        ws.send("not json");
        ws.send('{"event":"pusher:subscribe","data":{"channel":"bad channel"}}');
        ws.send('{"event":"pusher:subscribe","data":{"channel":"private-x","auth":"key1:00"}}');
        ws.send('{"event":"pusher:ping","data":{}}');
      }),
      "errors then pong",
    );
    if (errors.length !== 3 || errors[2].code !== 4009) fail(JSON.stringify(errors));
    ws.close();
  }
  step = "user sign-in: pusher-js signin() signed by the SDK's authenticateUser";
  {
    // A pusher-js client that signs in as `id`, its user data signed by `sdk`.
    const userClient = (id, sdk = server) => {
      const c = new PusherJs(APP.key, {
        cluster: "mt1",
        wsHost: host,
        wsPort: Number(port),
        forceTLS: false,
        enabledTransports: ["ws"],
        disableStats: true,
        userAuthentication: {
          customHandler: ({ socketId }, cb) => cb(null, sdk.authenticateUser(socketId, { id, name: id })),
        },
      });
      return c;
    };
    const signedIn = async (c, id) => {
      await connected(c);
      c.signin();
      await within(c.user.signinDonePromise, `signin of ${id}`);
      if (c.user.user_data?.id !== id) fail(`signed in as ${JSON.stringify(c.user.user_data)}`);
      const deadline = Date.now() + 5000;
      while (!c.user.serverToUserChannel?.subscribed) {
        if (Date.now() > deadline) fail(`#server-to-user-${id} not subscribed`);
        await new Promise((r) => setTimeout(r, 10));
      }
    };
    const carol = userClient("carol");
    await signedIn(carol, "carol");
    const carol2 = userClient("carol");
    await signedIn(carol2, "carol");
    const dave = userClient("dave");
    await signedIn(dave, "dave");
    step = "sendToUser reaches each connection of that user, and no other";
    const toDave = [];
    dave.user.bind("hello", (d) => toDave.push(d));
    const got = [next(carol.user, "hello"), next(carol2.user, "hello")];
    const r = await server.sendToUser("carol", "hello", { msg: "hi carol" });
    if (r.status !== 200) fail(`sendToUser: ${r.status}`);
    for (const d of await Promise.all(got)) if (d.msg !== "hi carol") fail(JSON.stringify(d));
    step = "a sign-in with a forged signature gets pusher:error 4009";
    {
      const mallory = userClient("mallory", forged);
      await connected(mallory);
      const err = within(
        new Promise((res) => mallory.connection.bind("error", (e) => res(e))),
        "pusher:error for the forged signin",
      );
      mallory.signin();
      const e = await err;
      if (e?.data?.code !== 4009) fail(JSON.stringify(e));
      if (mallory.user.user_data) fail("mallory is signed in");
      mallory.disconnect();
    }
    step = "terminateUserConnections closes every connection of the user, and no other";
    const left = (c) =>
      within(
        new Promise((res) =>
          c.connection.bind("state_change", ({ current }) => current !== "connected" && res(current)),
        ),
        "the connection ends",
      );
    const ends = [left(carol), left(carol2)];
    const t = await server.terminateUserConnections("carol");
    if (t.status !== 200) fail(`terminateUserConnections: ${t.status}`);
    await Promise.all(ends);
    if (dave.connection.state !== "connected") fail(`dave is ${dave.connection.state}`);
    const dd = next(dave.user, "still");
    await server.sendToUser("dave", "still", "here");
    if ((await dd) !== "here") fail("dave lost his channel");
    if (toDave.length !== 0) fail(`dave got carol's event: ${JSON.stringify(toDave)}`);
    carol.disconnect();
    carol2.disconnect();
    dave.disconnect();
  }
  a.disconnect();
  b.disconnect();
  if (process.env.CRIER_WEBHOOK_PORT) {
    step = "webhooks in Pusher's format, validated by the SDK";
    const want = [
      "channel_occupied my-channel",
      "member_added presence-lobby alice",
      "member_added presence-lobby bob",
      "member_removed presence-lobby bob",
      "client_event private-room client-typing",
      "cache_miss cache-scores",
      "channel_vacated my-channel",
    ];
    const key = (e) => [e.name, e.channel, e.user_id ?? e.event].filter(Boolean).join(" ");
    const deadline = Date.now() + 10000;
    while (!want.every((w) => hooks.map(key).includes(w))) {
      if (Date.now() > deadline) fail(`got ${JSON.stringify(hooks.map(key))}`);
      await new Promise((r) => setTimeout(r, 50));
    }
    if (hooks.some((h) => h.name === "INVALID")) fail("a delivery failed the SDK's check");
    const bobAdded = hooks.filter((h) => key(h) === "member_added presence-lobby bob");
    if (bobAdded.length !== 1) fail(`bob added ${bobAdded.length} times`);
    const ce = hooks.find((h) => h.name === "client_event");
    if (ce.socket_id !== sa || JSON.parse(ce.data).who !== "alice") fail(JSON.stringify(ce));
  }
  console.log(`ok: every step in ${Date.now() - t0} ms`);
  process.exit(0);
} catch (e) {
  fail(e.stack || e.message);
}
