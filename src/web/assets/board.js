// crier: one live leaderboard (served at /boards/{name}).
//
// Subscribes to the topic `board:{name}` over WebSocket (/ws), falling back to SSE (/sse),
// and renders each board update. Reconnects by itself with exponential backoff and full
// jitter; every (re)connect starts with a fresh snapshot. No framework, no build step.
//
// Query parameters: ?transport=sse forces SSE, ?transport=ws forces WebSocket (no fallback).
"use strict";

(() => {
  const BACKOFF_BASE_MS = 250;
  const BACKOFF_CAP_MS = 10000;
  const GIVE_UP_CAP_MS = 60000; // retry delay after a "do not reconnect" close (4500-4999)
  const HEALTHY_AFTER_MS = 3000; // an open connection this old resets the backoff
  const HIGHLIGHT_MS = 1500;
  const WS_FAILURES_BEFORE_SSE = 2;
  const WS_PING_EVERY_MS = 20000;
  const WS_SILENCE_LIMIT_MS = 50000; // nothing at all received for this long: reconnect

  const $ = (sel) => document.querySelector(sel);
  const el = {
    title: $("#board-title"),
    kind: $("#board-kind"),
    status: $("#status"),
    statusLabel: $("#status .status-label"),
    leader: $("#leader"),
    leaderScore: $("#leader-score"),
    leaderCard: $("#leader-card"),
    watchers: $("#watchers"),
    players: $("#players"),
    rows: $("#rows"),
    empty: $("#empty"),
  };

  // ---- which board ------------------------------------------------------------------
  const boardName = (() => {
    const m = location.pathname.match(/^\/boards\/([^/]+)\/?$/);
    if (!m) return "";
    try {
      return decodeURIComponent(m[1]);
    } catch {
      return m[1];
    }
  })();
  const topic = "board:" + boardName;
  el.title.textContent = boardName || "Unknown board";
  document.title = (boardName || "Leaderboard") + " · crier";

  const params = new URLSearchParams(location.search);
  const forced = params.get("transport"); // "sse" | "ws" | null
  const reduceMotion = window.matchMedia && matchMedia("(prefers-reduced-motion: reduce)").matches;

  // ---- connection status -------------------------------------------------------------
  const LABELS = {
    connecting: "Connecting…",
    live: "Live",
    reconnecting: "Reconnecting…",
    offline: "Offline",
  };
  function setStatus(state, detail) {
    el.status.dataset.state = state;
    el.status.dataset.transport = transport;
    const via = transport === "sse" ? "SSE" : "WebSocket";
    let label = LABELS[state];
    if (state === "live") label += " · " + via;
    if (detail) label += " · " + detail;
    el.statusLabel.textContent = label;
    el.status.title = "Connection: " + label;
  }

  // ---- rendering -----------------------------------------------------------------------
  let shownVersion = -Infinity;
  let shownTop = []; // entries currently in the table, in order
  let everRendered = false;
  const rowByPlayer = new Map(); // player id -> <tr>
  const highlightTimers = new WeakMap();

  const displayName = (e) =>
    e && e.meta && typeof e.meta.name === "string" && e.meta.name !== "" ? e.meta.name : String(e.player);
  const fmt = (n) => (n === undefined || n === null ? "–" : String(n));

  function makeRow(player) {
    const tr = document.createElement("tr");
    tr.dataset.player = player;
    const rank = document.createElement("td");
    rank.className = "rank";
    const name = document.createElement("td");
    name.className = "name";
    const score = document.createElement("td");
    score.className = "score";
    tr.append(rank, name, score);
    return tr;
  }

  function setText(node, text) {
    if (node.textContent !== text) node.textContent = text;
  }

  // Adds a class for HIGHLIGHT_MS, restarting its animation if it is already there.
  function flash(tr, classes) {
    const old = highlightTimers.get(tr);
    if (old) clearTimeout(old);
    tr.classList.remove("moved-up", "moved-down", "new-leader");
    void tr.offsetWidth; // restart the CSS animation
    tr.classList.add(...classes);
    highlightTimers.set(
      tr,
      setTimeout(() => {
        tr.classList.remove(...classes);
        tr.cells[0].removeAttribute("data-delta");
        highlightTimers.delete(tr);
      }, HIGHLIGHT_MS),
    );
  }

  function render(data) {
    const top = Array.isArray(data.top) ? data.top : [];
    const prevRank = new Map(shownTop.map((e) => [String(e.player), e.rank]));
    const prevLeader = shownTop.length ? String(shownTop[0].player) : null;
    const compare = everRendered; // no highlights on the very first snapshot

    // Where each row is now, for a smooth slide to its new place (FLIP).
    const before = new Map();
    if (compare && !reduceMotion) {
      for (const [player, tr] of rowByPlayer) before.set(player, tr.getBoundingClientRect().top);
    }

    const keep = new Set();
    let cursor = el.rows.firstElementChild;
    for (const entry of top) {
      const player = String(entry.player);
      if (keep.has(player)) continue; // a duplicate in one update: keep the first
      keep.add(player);
      let tr = rowByPlayer.get(player);
      if (!tr) {
        tr = makeRow(player);
        rowByPlayer.set(player, tr);
      }
      setText(tr.cells[0], fmt(entry.rank));
      setText(tr.cells[1], displayName(entry));
      setText(tr.cells[2], fmt(entry.score));
      tr.dataset.rank = fmt(entry.rank);
      tr.dataset.score = fmt(entry.score);
      // Put the row in place without touching rows that already are.
      if (tr === cursor) {
        cursor = cursor.nextElementSibling;
      } else {
        el.rows.insertBefore(tr, cursor);
      }

      if (compare) {
        const was = prevRank.get(player);
        const classes = [];
        if (was === undefined || entry.rank < was) {
          classes.push("moved-up");
          tr.cells[0].dataset.delta = was === undefined ? "new" : String(was - entry.rank);
        } else if (entry.rank > was) {
          classes.push("moved-down");
          tr.cells[0].dataset.delta = String(entry.rank - was);
        }
        if (entry === top[0] && player !== prevLeader) classes.push("new-leader");
        if (classes.length) flash(tr, classes);
      }
    }
    for (const [player, tr] of rowByPlayer) {
      if (!keep.has(player)) {
        tr.remove();
        rowByPlayer.delete(player);
      }
    }

    if (before.size) {
      for (const [player, tr] of rowByPlayer) {
        const was = before.get(player);
        if (was === undefined) continue;
        const dy = was - tr.getBoundingClientRect().top;
        if (Math.abs(dy) < 1) continue;
        tr.animate([{ transform: `translateY(${dy}px)` }, { transform: "translateY(0)" }], {
          duration: 350,
          easing: "cubic-bezier(.2,.8,.2,1)",
        });
      }
    }

    // Leader, counts, labels.
    const leader = top[0];
    const leaderText = leader ? displayName(leader) : "—";
    setText(el.leader, leaderText);
    el.leader.dataset.player = leader ? String(leader.player) : "";
    setText(el.leaderScore, leader ? fmt(leader.score) + " pts" : "");
    if (compare && leader && String(leader.player) !== prevLeader) {
      el.leaderCard.classList.remove("new-leader");
      void el.leaderCard.offsetWidth;
      el.leaderCard.classList.add("new-leader");
      setTimeout(() => el.leaderCard.classList.remove("new-leader"), HIGHLIGHT_MS);
    }
    el.empty.hidden = top.length > 0;
    const kind = [];
    if (data.order) kind.push(data.order === "low" ? "lowest score wins" : "highest score wins");
    if (data.mode) kind.push(data.mode === "best" ? "best score counts" : data.mode + " scores");
    setText(el.kind, kind.join(" · "));

    shownTop = top;
    everRendered = true;
    document.body.dataset.version = String(data.version);
  }

  function updateCounts(data) {
    if (data.watchers !== undefined) setText(el.watchers, fmt(data.watchers));
    if (data.players !== undefined) setText(el.players, fmt(data.players));
  }

  // One board update. `first` is true for the first update of a connection: the fresh
  // snapshot, which is taken as it is even when its version is lower than the one shown
  // (the server's state was reset); later updates with a version <= the shown one are
  // stale (a reconnect race, a lagging node) and dropped.
  function onUpdate(data, first) {
    if (!data || typeof data !== "object" || !Array.isArray(data.top)) return;
    const v = Number(data.version);
    if (!Number.isFinite(v)) return;
    if (v === shownVersion) {
      updateCounts(data); // same ranking; counts may have moved
      return;
    }
    if (v < shownVersion && !first) return;
    shownVersion = v;
    updateCounts(data);
    render(data);
  }

  // ---- transports ------------------------------------------------------------------------
  let transport = forced === "sse" || typeof window.WebSocket !== "function" ? "sse" : "ws";
  if (typeof window.EventSource !== "function") transport = "ws";
  let generation = 0; // bumps on every new connection; late events of old ones are ignored
  let conn = null; // {close()}
  let attempt = 0; // consecutive failed attempts, for the backoff
  let wsFailuresBeforeOpen = 0;
  let wsEverOpened = false;
  let everLive = false;
  let retryTimer = null;

  function connect() {
    clearTimeout(retryTimer);
    retryTimer = null;
    if (conn) conn.close(); // never two connections at once
    conn = null;
    const gen = ++generation;
    setStatus(everLive ? "reconnecting" : "connecting");
    const handlers = {
      open() {
        if (gen !== generation) return;
        everLive = true;
        setStatus("live");
      },
      message(text, first) {
        if (gen !== generation) return;
        let msg;
        try {
          msg = JSON.parse(text);
        } catch {
          return;
        }
        if (!msg || typeof msg !== "object") return;
        if (msg.op !== undefined) {
          if (msg.op === "error") console.warn("crier:", msg.code, msg.message);
          return; // subscribed, pong, ...: nothing to show
        }
        if (msg.topic !== topic) return;
        onUpdate(msg.data, first());
      },
      // The connection ended. `opened`: it had opened; `giveUp`: the server asked not to
      // reconnect without a change (close codes 4500-4999).
      closed(opened, giveUp) {
        if (gen !== generation) return;
        conn = null;
        scheduleReconnect(opened, giveUp);
      },
      healthy() {
        if (gen === generation) attempt = 0;
      },
    };
    conn = transport === "ws" ? openWs(handlers) : openSse(handlers);
  }

  function scheduleReconnect(opened, giveUp) {
    if (transport === "ws" && forced !== "ws") {
      if (opened) {
        wsFailuresBeforeOpen = 0;
      } else if (++wsFailuresBeforeOpen >= WS_FAILURES_BEFORE_SSE && !wsEverOpened && typeof EventSource === "function") {
        // WebSocket never worked on this page: it is probably blocked on the way.
        transport = "sse";
        wsFailuresBeforeOpen = 0;
        attempt = 0;
      }
    } else if (transport === "sse" && forced !== "sse" && !opened && !wsEverOpened && typeof WebSocket === "function") {
      // SSE did not work either: the server is probably down, not WebSocket blocked. Go on
      // alternating so that whichever works first when it is back wins.
      transport = "ws";
    }
    if (!navigator.onLine) {
      setStatus("offline", "no network");
      return; // the "online" event reconnects
    }
    let delay;
    if (giveUp) {
      delay = GIVE_UP_CAP_MS;
      setStatus("offline", "server refused");
    } else {
      // Full jitter: uniform in [0, min(cap, base * 2^attempt)].
      const ceiling = Math.min(BACKOFF_CAP_MS, BACKOFF_BASE_MS * 2 ** Math.min(attempt, 16));
      delay = Math.random() * ceiling;
      attempt++;
      setStatus(everLive ? "reconnecting" : "connecting");
    }
    clearTimeout(retryTimer);
    retryTimer = setTimeout(connect, delay);
  }

  function openWs(h) {
    const proto = location.protocol === "https:" ? "wss:" : "ws:";
    const url = `${proto}//${location.host}/ws?topic=${encodeURIComponent(topic)}`;
    let ws;
    try {
      ws = new WebSocket(url);
    } catch (e) {
      setTimeout(() => h.closed(false, false), 0);
      return { close() {} };
    }
    let opened = false;
    let gotUpdate = false;
    let lastHeard = Date.now();
    let pingId = 0;
    let pinger = null;
    let healthyTimer = null;
    let done = false;
    const finish = (giveUp) => {
      if (done) return;
      done = true;
      clearInterval(pinger);
      clearTimeout(healthyTimer);
      h.closed(opened, giveUp);
    };
    ws.onopen = () => {
      opened = true;
      wsEverOpened = true;
      h.open();
      healthyTimer = setTimeout(h.healthy, HEALTHY_AFTER_MS);
      // Browsers answer server pings on their own but cannot see them; an application
      // ping makes a silently dead connection show up on this side too.
      pinger = setInterval(() => {
        if (Date.now() - lastHeard > WS_SILENCE_LIMIT_MS) {
          ws.close(4000, "silent");
          finish(false);
          return;
        }
        if (ws.readyState === WebSocket.OPEN) ws.send(JSON.stringify({ op: "ping", id: ++pingId }));
      }, WS_PING_EVERY_MS);
    };
    ws.onmessage = (ev) => {
      lastHeard = Date.now();
      if (typeof ev.data !== "string") return;
      h.message(ev.data, () => {
        const first = !gotUpdate;
        gotUpdate = true;
        return first;
      });
    };
    ws.onerror = () => {}; // always followed by close
    ws.onclose = (ev) => finish(ev.code >= 4500 && ev.code <= 4999);
    return {
      close() {
        done = true;
        clearInterval(pinger);
        clearTimeout(healthyTimer);
        try {
          ws.close(1000);
        } catch {}
      },
    };
  }

  function openSse(h) {
    const es = new EventSource(`/sse?topic=${encodeURIComponent(topic)}`);
    let opened = false;
    let gotUpdate = false;
    let healthyTimer = null;
    let done = false;
    es.onopen = () => {
      opened = true;
      h.open();
      healthyTimer = setTimeout(h.healthy, HEALTHY_AFTER_MS);
    };
    es.onmessage = (ev) => {
      h.message(ev.data, () => {
        const first = !gotUpdate;
        gotUpdate = true;
        return first;
      });
    };
    // EventSource would retry by itself, but without our backoff, status and transport
    // choice: close it and reconnect our way (a new stream starts with a fresh snapshot).
    es.onerror = () => {
      if (done) return;
      done = true;
      clearTimeout(healthyTimer);
      es.close();
      h.closed(opened, false);
    };
    return {
      close() {
        done = true;
        clearTimeout(healthyTimer);
        es.close();
      },
    };
  }

  window.addEventListener("online", () => {
    if (!conn) {
      clearTimeout(retryTimer);
      attempt = 0;
      connect();
    }
  });
  window.addEventListener("offline", () => {
    if (!conn) setStatus("offline", "no network");
  });
  window.addEventListener("pagehide", () => {
    clearTimeout(retryTimer);
    generation++;
    if (conn) conn.close();
    conn = null;
  });
  // Coming back from the back/forward cache: the old connection is gone.
  window.addEventListener("pageshow", (ev) => {
    if (ev.persisted) {
      clearTimeout(retryTimer);
      attempt = 0;
      connect();
    }
  });

  if (!boardName) {
    setStatus("offline", "no board in the address");
    return;
  }
  // The server refuses a bad topic name (400): say so instead of retrying forever.
  if (!/^[A-Za-z0-9_.:-]{1,128}$/.test(topic)) {
    setStatus("offline", "invalid board name");
    return;
  }
  connect();
})();
