// crier.js: the browser client for crier (served at /assets/crier.js). An ES module with no
// dependencies and no build step; see docs/client.md.
//
//   import { Crier } from "/assets/crier.js";
//   const c = new Crier();
//   c.subscribe("news", { onMessage(data, meta) { ... }, onReset({ position }) { ... } });
//
// One connection carries every topic: a WebSocket, or Server-Sent Events when WebSocket
// cannot get through. The client remembers each topic's position (epoch + last offset) and,
// after any reconnect, asks the server to resume from it, so the application sees every
// offset once and in order, or is told explicitly (onReset) that the gap could not be filled.

// The server's rule (crates/protocol/src/names.rs): `.` and `..` are path segments, not names.
const TOPIC_RE = /^(?!\.\.?$)[A-Za-z0-9_.:@-]{1,128}$/;
const DEFAULTS = {
  baseMs: 500, // first reconnect ceiling; doubles per failed attempt
  maxMs: 30000, // ceiling of the ceiling
  stableMs: 5000, // a connection open this long resets the backoff
  refusedMs: 0, // after a "do not reconnect" close: 0 = stay closed, else retry after this
  wsFailuresBeforeSse: 2, // WebSocket attempts that never opened before trying SSE
  pingMs: 20000, // WebSocket application ping, so a silently dead socket shows up here
  silenceMs: 50000, // nothing received for this long on a WebSocket: reconnect
};
// Topics put in the WebSocket URL (no position to resume from); the rest go by command, which
// keeps the URL short and lets one bad topic fail alone.
const MAX_QUERY_TOPICS = 16;
const STORAGE_KEY = "crier.transport:";

/** Close codes 4500-4999 mean "do not reconnect without changing something" (docs/protocol.md). */
export const isFinalCloseCode = (code) => code >= 4500 && code <= 4999;

/** `{epoch, offset}` -> the SSE id entry `EPOCH:OFFSET`, or "" when there is no position. */
function idEntry(pos) {
  return pos && typeof pos.epoch === "string" && pos.epoch !== "" && Number.isSafeInteger(pos.offset)
    ? `${pos.epoch}:${pos.offset}`
    : "";
}

/** A valid `{epoch, offset}` position (an epoch the SSE id can carry: alphanumeric, at most 32), or null. */
function position(p) {
  return p && typeof p === "object" && typeof p.epoch === "string" && /^[A-Za-z0-9]{1,32}$/.test(p.epoch) &&
    Number.isSafeInteger(p.offset) && p.offset >= 0
    ? { epoch: p.epoch, offset: p.offset }
    : null;
}

export class Crier {
  /**
   * @param {object} [options]
   * @param {string} [options.url] the server's base URL (http or https); the page's origin by default
   * @param {"auto"|"ws"|"sse"} [options.transport] "auto" (default): WebSocket, falling back to SSE
   * @param {object} [options.backoff] {baseMs, maxMs, stableMs, refusedMs}; see docs/client.md
   * @param {string} [options.token] a subscriber token for private topics (docs/auth.md): sent as the
   *   WebSocket's first message (`{"op":"auth"}`, so it stays out of URLs and logs), or as `?token=`
   *   on SSE (EventSource cannot send headers)
   */
  constructor(options = {}) {
    const base = new URL(options.url ?? globalThis.location?.origin ?? "http://127.0.0.1:7700");
    this._http = base.origin + base.pathname.replace(/\/$/, "");
    this._wsUrl = this._http.replace(/^http/, "ws");
    this._opts = { ...DEFAULTS, ...(options.backoff || {}) };
    this._token = typeof options.token === "string" && options.token !== "" ? options.token : null;
    const forced = options.transport === "ws" || options.transport === "sse" ? options.transport : null;
    this._forced = forced;
    const hasWs = typeof globalThis.WebSocket === "function";
    const hasSse = typeof globalThis.EventSource === "function";
    this._canFallBack = !forced && hasWs && hasSse;
    let remembered = null;
    try {
      remembered = globalThis.sessionStorage?.getItem(STORAGE_KEY + this._http);
    } catch {}
    this._transport = forced ?? (!hasWs || (remembered === "sse" && hasSse) ? "sse" : "ws");
    this._wsEverOpened = false;
    this._wsFailures = 0;

    this._subs = new Map(); // topic -> Sub
    this._listeners = new Map(); // event name -> Set<fn>
    this._state = "idle";
    this._conn = null; // the live connection object, or null
    this._gen = 0; // bumps with each connection; events of older ones are ignored
    this._attempt = 0; // consecutive failures, for the backoff
    this._timer = null;
    this._everOpen = false;
    this._closed = false;
    this._nextId = 1;
    this._pendingSync = false;

    if (typeof globalThis.addEventListener === "function") {
      this._onOnline = () => {
        if (!this._closed && !this._conn) this._connectNow();
      };
      this._onPageHide = () => {
        // Leaving (maybe into the back/forward cache): a page there must hold no socket.
        clearTimeout(this._timer);
        this._timer = null;
        this._drop();
      };
      this._onPageShow = (ev) => {
        if (ev.persisted && !this._closed) this._connectNow();
      };
      globalThis.addEventListener("online", this._onOnline);
      globalThis.addEventListener("pagehide", this._onPageHide);
      globalThis.addEventListener("pageshow", this._onPageShow);
    }
  }

  /** "idle" | "connecting" | "open" | "reconnecting" | "closed" */
  get state() {
    return this._state;
  }

  /** "ws" | "sse": the transport in use (or to be tried next). */
  get transport() {
    return this._transport;
  }

  /**
   * Listens to "state" (fn(state, info)), "error" (fn({code, message, topic?})) or "authed"
   * (fn({sub, exp}), WebSocket with a token) events.
   * Returns a function that removes the listener.
   */
  on(event, fn) {
    if (!this._listeners.has(event)) this._listeners.set(event, new Set());
    this._listeners.get(event).add(fn);
    return () => this._listeners.get(event)?.delete(fn);
  }

  /**
   * Subscribes to `topic`. `handlers.onMessage(data, meta)` gets each publication once, in
   * offset order; meta = {topic, offset, epoch, replayed, prior}: `prior` when it was
   * published before this subscription was acknowledged (a replayed publication, or the
   * retained state of a state topic, whose counts do not include this subscriber yet). `onRecovered({position, since})`:
   * a reconnect resumed without loss. `onReset({position})`: what was missed could not be
   * replayed; reload your state (for a state topic the snapshot that follows is the state).
   * `onError({code, message})`: the server refused the subscription. On a topic with presence
   * and `join_leave` (docs/protocol.md, "Presence"): `onJoin(member, {topic})` and
   * `onLeave(member, {topic})`, member = {client, user, info}; joins and leaves are not
   * replayed, so read `presence(topic)` again after `onRecovered`/`onReset`. `handlers.since`
   * (`{epoch, offset}`, e.g. saved from an earlier page) resumes the very first subscribe.
   */
  subscribe(topic, handlers = {}) {
    if (this._closed) throw new Error("crier: subscribe on a closed client");
    if (typeof topic !== "string" || !TOPIC_RE.test(topic)) {
      throw new TypeError("crier: a topic name is 1-128 bytes of A-Z a-z 0-9 _ - . : @, not . or ..");
    }
    if (typeof handlers === "function") handlers = { onMessage: handlers };
    let sub = this._subs.get(topic);
    const fresh = !sub;
    if (fresh) {
      const since = position(handlers.since);
      sub = {
        topic,
        handles: new Set(),
        epoch: since ? since.epoch : null,
        offset: since ? since.offset : 0,
        acceptNext: !since, // no position yet: the first publication sets it
        seen: !!since, // had a position once: a fresh subscribe without it is a reset
        awaiting: false, // WebSocket: subscribe sent, reply not yet received
        sentSince: null, // the position sent with the pending subscribe
        replayUpTo: 0,
        ackedAt: 0, // the offset of the last `subscribed`: what is at or below it came before
        onConn: false, // subscribed on the current connection
      };
      this._subs.set(topic, sub);
    }
    const handle = {
      topic,
      handlers,
      get position() {
        return sub.epoch ? { epoch: sub.epoch, offset: sub.offset } : null;
      },
      unsubscribe: () => this._unsubscribe(sub, handle),
    };
    sub.handles.add(handle);
    if (fresh) this._sync();
    return handle;
  }

  /**
   * The members of a presence topic (docs/protocol.md, "Presence"): resolves to every member,
   * [{client, user, info}], in client-id order, read page by page over HTTP (whichever
   * transport carries the topics; a private topic with the client's token). Rejects with an
   * Error carrying `code` and `status` (e.g. `presence_disabled`, `topic_forbidden`, or
   * `store_unavailable` while a cluster's Redis is down).
   */
  async presence(topic, { pageSize = 1000 } = {}) {
    const members = [];
    let cursor = null;
    // Bounded: each page moves the cursor forward; a member is on at most one page.
    for (;;) {
      const q = new URLSearchParams({ limit: String(pageSize) });
      if (cursor !== null) q.set("cursor", cursor);
      const page = await this._read(topic, "/presence?" + q.toString());
      if (Array.isArray(page.members)) members.push(...page.members);
      if (typeof page.next_cursor !== "string" || page.next_cursor === cursor) return members;
      cursor = page.next_cursor;
    }
  }

  /** A presence topic's counts: resolves to {clients, users} (O(1) on the server). */
  async presenceStats(topic) {
    const s = await this._read(topic, "/presence/stats");
    return { clients: s.clients, users: s.users };
  }

  async _read(topic, path) {
    if (typeof topic !== "string" || !TOPIC_RE.test(topic)) {
      throw new TypeError("crier: a topic name is 1-128 bytes of A-Z a-z 0-9 _ - . :, not . or ..");
    }
    const headers = this._token ? { authorization: "Bearer " + this._token } : {};
    const res = await fetch(this._http + "/api/topics/" + encodeURIComponent(topic) + path, { headers });
    let body = null;
    try {
      body = await res.json();
    } catch {}
    if (!res.ok) {
      const e = (body && body.error) || {};
      const err = new Error(e.message || `crier: presence read failed (HTTP ${res.status})`);
      err.code = e.code || "http_" + res.status;
      err.status = res.status;
      throw err;
    }
    return body || {};
  }

  /** Closes the connection for good; no more reconnects, no more callbacks. */
  close() {
    if (this._closed) return;
    this._closed = true;
    clearTimeout(this._timer);
    this._drop();
    if (typeof globalThis.removeEventListener === "function" && this._onOnline) {
      globalThis.removeEventListener("online", this._onOnline);
      globalThis.removeEventListener("pagehide", this._onPageHide);
      globalThis.removeEventListener("pageshow", this._onPageShow);
    }
    this._setState("closed", {});
  }

  /** Connects again now (after a "do not reconnect" close, or to skip a backoff wait). */
  reconnect() {
    if (this._closed) return;
    this._connectNow();
  }

  // ---- internals -------------------------------------------------------------------------

  _emit(event, ...args) {
    for (const fn of [...(this._listeners.get(event) || [])]) {
      try {
        fn(...args);
      } catch (e) {
        setTimeout(() => {
          throw e;
        });
      }
    }
  }

  _setState(state, info) {
    this._state = state;
    this._emit("state", state, { transport: this._transport, ...info });
  }

  _call(sub, name, ...args) {
    for (const h of [...sub.handles]) {
      const fn = h.handlers[name];
      if (typeof fn !== "function") continue;
      try {
        fn.apply(h.handlers, args);
      } catch (e) {
        setTimeout(() => {
          throw e; // the application's bug: report it without breaking delivery
        });
      }
    }
  }

  _unsubscribe(sub, handle) {
    if (!sub.handles.delete(handle) || sub.handles.size > 0) return;
    if (this._subs.get(sub.topic) !== sub) return;
    this._subs.delete(sub.topic);
    const c = this._conn;
    if (c && c.kind === "ws" && c.open && sub.onConn) {
      c.send({ op: "unsubscribe", topic: sub.topic });
    } else {
      this._sync();
    }
  }

  /** The subscription set changed: subscribe on the open WebSocket, or (re)open a stream. */
  _sync() {
    if (this._closed || this._pendingSync) return;
    this._pendingSync = true;
    // Batched: several subscribe() calls in one task make one connection (or one SSE URL).
    queueMicrotask(() => {
      this._pendingSync = false;
      if (this._closed) return;
      const c = this._conn;
      if (c && c.kind === "ws") {
        if (c.open) for (const sub of this._subs.values()) if (!sub.onConn) this._wsSubscribe(c, sub);
        return; // still opening: everything is subscribed on open
      }
      if (c && c.kind === "sse") {
        const same = c.topics.length === this._subs.size && c.topics.every((t) => this._subs.has(t));
        if (same) return;
        if (this._subs.size === 0) {
          this._drop();
          this._setState("idle", {});
          return;
        }
        this._connectNow(); // an SSE stream's topics are fixed: open a new one
        return;
      }
      if (this._timer === null && this._subs.size > 0) this._connectNow();
    });
  }

  _connectNow() {
    clearTimeout(this._timer);
    this._timer = null;
    this._drop();
    if (this._subs.size === 0) {
      this._setState("idle", {}); // nothing to carry: the next subscribe() connects
      return;
    }
    const gen = ++this._gen;
    this._setState(this._everOpen ? "reconnecting" : "connecting", {});
    for (const sub of this._subs.values()) {
      sub.onConn = false;
      sub.awaiting = false;
      // Without a position nothing can be resumed: what comes first is the new baseline.
      if (!sub.epoch) sub.acceptNext = true;
    }
    this._conn = this._transport === "ws" ? this._openWs(gen) : this._openSse(gen);
  }

  /** Closes the current connection without scheduling anything. */
  _drop() {
    const c = this._conn;
    this._conn = null;
    this._gen++;
    if (c) c.close();
  }

  _opened(gen, kind) {
    if (gen !== this._gen) return;
    this._everOpen = true;
    if (kind === "ws") {
      this._wsEverOpened = true;
      this._wsFailures = 0;
    } else if (this._canFallBack && !this._wsEverOpened) {
      // SSE works where WebSocket did not: stay with it for this tab's session.
      try {
        globalThis.sessionStorage?.setItem(STORAGE_KEY + this._http, "sse");
      } catch {}
    }
    this._setState("open", {});
    const c = this._conn;
    c.stableTimer = setTimeout(() => {
      if (gen === this._gen) this._attempt = 0;
    }, this._opts.stableMs);
  }

  /** The connection of `gen` ended: pick the transport and the delay of the next try. */
  _ended(gen, opened, code, reason) {
    if (gen !== this._gen) return;
    const c = this._conn;
    this._conn = null;
    this._gen++;
    if (c) c.close();
    if (this._closed) return;
    if (this._canFallBack) {
      if (this._transport === "ws" && !opened && !this._wsEverOpened) {
        if (++this._wsFailures >= this._opts.wsFailuresBeforeSse) {
          this._transport = "sse"; // WebSocket never worked here: probably blocked on the way
          this._wsFailures = 0;
          this._attempt = 0;
        }
      } else if (this._transport === "sse" && !opened && !this._wsEverOpened) {
        // SSE failed too: the server is more likely down than WebSocket blocked. Alternate,
        // so that whichever works first when it is back wins.
        this._transport = "ws";
      }
    }
    if (isFinalCloseCode(code)) {
      const info = { code, reason, final: true };
      if (this._opts.refusedMs > 0) {
        this._timer = setTimeout(() => this._connectNow(), this._opts.refusedMs);
        info.delay = this._opts.refusedMs;
      }
      this._setState("closed", info);
      return;
    }
    if (globalThis.navigator && navigator.onLine === false) {
      this._setState("reconnecting", { code, offline: true }); // the "online" event reconnects
      return;
    }
    // Full jitter: uniform in [0, min(max, base * 2^attempt)].
    const ceiling = Math.min(this._opts.maxMs, this._opts.baseMs * 2 ** Math.min(this._attempt, 30));
    const delay = Math.random() * ceiling;
    this._attempt++;
    this._timer = setTimeout(() => this._connectNow(), delay);
    this._setState(this._everOpen ? "reconnecting" : "connecting", { code, delay });
  }

  // ---- delivery (both transports) ------------------------------------------------------

  /** A `subscribed` reply: where the topic stands now and whether our position was served. */
  _subscribed(msg) {
    const sub = this._subs.get(msg.topic);
    if (!sub) return;
    const current = position(msg);
    const since = sub.sentSince;
    sub.awaiting = false;
    sub.onConn = true;
    sub.sentSince = null;
    sub.ackedAt = current ? current.offset : 0;
    if (since && msg.recovered === true && current && current.epoch === since.epoch) {
      sub.acceptNext = false;
      sub.offset = since.offset;
      sub.replayUpTo = current.offset;
      this._call(sub, "onRecovered", { position: current, since });
      return;
    }
    const wasSeen = sub.seen;
    sub.epoch = current ? current.epoch : null;
    sub.offset = current ? current.offset : 0;
    sub.acceptNext = true;
    sub.replayUpTo = 0;
    sub.seen = true;
    // No position sent while one was had (epoch unknown), or one sent and not served.
    if (since || wasSeen) this._call(sub, "onReset", { position: current, since });
  }

  /** A publication envelope {topic, offset, data}. */
  _publication(msg, gated) {
    const sub = this._subs.get(msg.topic);
    if (!sub || (gated && sub.awaiting)) return;
    const offset = msg.offset;
    if (!Number.isSafeInteger(offset)) return;
    if (!sub.acceptNext && offset <= sub.offset) return; // already delivered: never twice
    sub.acceptNext = false;
    sub.offset = offset;
    sub.seen = true;
    const meta = {
      topic: sub.topic,
      offset,
      epoch: sub.epoch,
      replayed: offset <= sub.replayUpTo,
      prior: offset <= sub.ackedAt,
    };
    this._call(sub, "onMessage", msg.data, meta);
  }

  /** A presence notice {topic, join|leave: member}: no offset, never replayed. */
  _notice(msg, gated) {
    const sub = this._subs.get(msg.topic);
    if (!sub || (gated && sub.awaiting)) return;
    for (const [key, name] of [["join", "onJoin"], ["leave", "onLeave"]]) {
      const m = msg[key];
      if (m && typeof m === "object") return this._call(sub, name, m, { topic: sub.topic });
    }
  }

  _error(msg, sub) {
    const err = { code: msg.code, message: msg.message };
    if (sub) {
      err.topic = sub.topic;
      sub.awaiting = false;
      sub.sentSince = null;
      this._call(sub, "onError", err);
    }
    this._emit("error", err);
  }

  /** One text frame or SSE data: JSON, else ignored. */
  _parse(text) {
    try {
      const msg = JSON.parse(text);
      return msg && typeof msg === "object" && !Array.isArray(msg) ? msg : null;
    } catch {
      return null;
    }
  }

  // ---- WebSocket ------------------------------------------------------------------------

  _wsSubscribe(c, sub) {
    const since = sub.epoch ? { offset: sub.offset, epoch: sub.epoch } : null;
    const id = this._nextId++;
    c.ids.set(id, sub);
    sub.awaiting = true;
    sub.onConn = true;
    sub.sentSince = since;
    c.send(since ? { op: "subscribe", topic: sub.topic, since, id } : { op: "subscribe", topic: sub.topic, id });
  }

  _openWs(gen) {
    // Topics without a position go in the URL (the page's first connection: no extra round
    // trip); topics with one are resumed by command once open. With a token, every topic goes
    // by command after the in-band `auth`: a private topic in the URL would be refused at the
    // handshake, before the token could be sent.
    const query = [];
    for (const sub of this._subs.values()) {
      if (this._token || sub.epoch || query.length >= MAX_QUERY_TOPICS) continue;
      query.push(sub.topic);
    }
    const qs = query.map((t) => "topic=" + encodeURIComponent(t)).join("&");
    const c = {
      kind: "ws",
      open: false,
      ids: new Map(), // command id -> sub
      ws: null,
      pinger: null,
      stableTimer: null,
      lastHeard: Date.now(),
      send(obj) {
        if (this.ws && this.ws.readyState === 1) this.ws.send(JSON.stringify(obj));
      },
      close() {
        clearInterval(this.pinger);
        clearTimeout(this.stableTimer);
        const ws = this.ws;
        if (!ws) return;
        ws.onopen = ws.onmessage = ws.onclose = ws.onerror = null;
        try {
          ws.close(1000);
        } catch {}
      },
    };
    try {
      c.ws = new WebSocket(this._wsUrl + "/ws" + (qs ? "?" + qs : ""));
    } catch {
      setTimeout(() => this._ended(gen, false, 0, ""), 0);
      return c;
    }
    for (const t of query) {
      const sub = this._subs.get(t);
      sub.onConn = true; // a fresh socket: no leftover of an earlier subscription to wait out
      sub.sentSince = null;
    }
    const ws = c.ws;
    ws.onopen = () => {
      if (gen !== this._gen) return;
      c.open = true;
      c.lastHeard = Date.now();
      // First, so that the subscribes after it are checked against it (the server handles
      // one connection's commands in order). Its id maps to no topic: an error frame for it
      // is the connection's, emitted as "error".
      if (this._token) c.send({ op: "auth", token: this._token, id: this._nextId++ });
      // Unsubscribed while the socket was opening: the URL still subscribed it.
      for (const t of query) if (!this._subs.has(t)) c.send({ op: "unsubscribe", topic: t });
      for (const sub of this._subs.values()) if (!sub.onConn) this._wsSubscribe(c, sub);
      this._opened(gen, "ws");
      c.pinger = setInterval(() => {
        if (Date.now() - c.lastHeard > this._opts.silenceMs) {
          this._ended(gen, true, 0, "silent");
          return;
        }
        c.send({ op: "ping" });
      }, this._opts.pingMs);
    };
    ws.onmessage = (ev) => {
      if (gen !== this._gen) return;
      c.lastHeard = Date.now();
      if (typeof ev.data !== "string") return;
      const msg = this._parse(ev.data);
      if (!msg) return;
      if (msg.op === undefined) {
        if (msg.offset === undefined && (msg.join || msg.leave)) return this._notice(msg, true);
        return this._publication(msg, true);
      }
      if (msg.op === "subscribed") {
        const sub = this._subs.get(msg.topic);
        if (msg.id !== undefined) {
          const owner = c.ids.get(msg.id);
          c.ids.delete(msg.id);
          if (owner !== sub) return; // the reply of a subscription since replaced
        }
        return this._subscribed(msg);
      }
      if (msg.op === "error") {
        const sub = msg.id !== undefined ? c.ids.get(msg.id) : undefined;
        if (msg.id !== undefined) c.ids.delete(msg.id);
        return this._error(msg, sub && this._subs.get(sub.topic) === sub ? sub : undefined);
      }
      if (msg.op === "authed") return this._emit("authed", { sub: msg.sub, exp: msg.exp });
      // pong, unsubscribed: nothing to do
    };
    ws.onerror = () => {}; // always followed by close
    ws.onclose = (ev) => this._ended(gen, c.open, ev.code, ev.reason);
    return c;
  }

  // ---- Server-Sent Events ---------------------------------------------------------------

  _openSse(gen) {
    const topics = [...this._subs.keys()];
    const params = new URLSearchParams();
    for (const t of topics) params.append("topic", t);
    const entries = topics.map((t) => {
      const sub = this._subs.get(t);
      return sub.epoch ? idEntry(sub) : "";
    });
    if (entries.some((e) => e !== "")) params.set("lastEventId", entries.join(","));
    if (this._token) params.set("token", this._token);
    for (const t of topics) {
      const sub = this._subs.get(t);
      sub.sentSince = sub.epoch ? { offset: sub.offset, epoch: sub.epoch } : null;
      sub.onConn = true;
    }
    const c = {
      kind: "sse",
      topics,
      es: null,
      stableTimer: null,
      open: false,
      close() {
        clearTimeout(this.stableTimer);
        if (this.es) {
          this.es.onopen = this.es.onmessage = this.es.onerror = null;
          this.es.close();
        }
      },
    };
    const es = new EventSource(this._http + "/sse?" + params.toString());
    c.es = es;
    es.onopen = () => {
      if (gen !== this._gen) return;
      c.open = true;
      this._opened(gen, "sse");
    };
    es.addEventListener("subscribed", (ev) => {
      if (gen !== this._gen) return;
      const msg = this._parse(ev.data);
      if (msg && msg.op === "subscribed") this._subscribed(msg);
    });
    for (const kind of ["join", "leave"]) {
      es.addEventListener(kind, (ev) => {
        if (gen !== this._gen) return;
        const msg = this._parse(ev.data);
        if (msg) this._notice(msg, false);
      });
    }
    es.onmessage = (ev) => {
      if (gen !== this._gen) return;
      const msg = this._parse(ev.data);
      if (msg && msg.op === undefined) this._publication(msg, false);
    };
    // EventSource would retry by itself, but on a fixed delay for every client at once and
    // without our transport choice: close it and reconnect our way, with the positions.
    es.onerror = () => this._ended(gen, c.open, 0, "");
    return c;
  }
}

export default Crier;
