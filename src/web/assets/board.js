// crier: one live leaderboard (served at /boards/{name}), an ES module.
//
// Subscribes to the topic `board:{name}` through crier.js (WebSocket, falling back to SSE;
// reconnects with backoff and jitter and resumes from the last offset) and renders each
// board update. A board is a state topic: after a reset (the gap could not be replayed) the
// snapshot that follows is the whole state. No framework, no build step.
//
// Query parameters: ?transport=sse forces SSE, ?transport=ws forces WebSocket (no fallback);
// ?token=JWT watches a private board (docs/auth.md): the token goes as the WebSocket's first
// message, `?token=` on the SSE fallback and `Authorization: Bearer` on fetches.
// ?player=ID follows that player (`board:{name}@{ID}`, on the same connection): their row is
// highlighted in the top, or pinned below it with their neighbours, live.
// ?friends=ID,ID,... shows those players' own ranking below the top, live
// (`board:{name}:friends@ID@ID...`, at most 32 players; docs/leaderboards.md, "Friends").
import { Crier } from "./crier.js";

{
  const BACKOFF = {
    baseMs: 250,
    maxMs: 10000,
    stableMs: 3000, // an open connection this old resets the backoff
    refusedMs: 60000, // retry delay after a "do not reconnect" close (4500-4999)
  };
  const HIGHLIGHT_MS = 1500;

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
    season: $("#season"),
    resetStat: $("#reset-stat"),
    countdown: $("#countdown"),
    rows: $("#rows"),
    empty: $("#empty"),
    access: $("#access"),
    me: $("#me"),
    meStatus: $("#me-status"),
    pinned: $("#pinned"),
    pinnedRows: $("#pinned-rows"),
    friends: $("#friends"),
    friendsStatus: $("#friends-status"),
    friendsTable: $("#friends-table"),
    friendsRows: $("#friends-rows"),
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
  const token = params.get("token") || null;
  // The followed player: only ids a topic can carry (docs/leaderboards.md).
  const followed = (() => {
    const p = params.get("player");
    if (!p || !/^[A-Za-z0-9_.:@-]{1,128}$/.test(p) || (topic + "@" + p).length > 128) return null;
    return p;
  })();
  // The friends view: ids as given (comma-separated, blanks and repeats dropped), its topic
  // when the server would take it, else the reason it is not watched.
  const MAX_FRIENDS = 32;
  const friends = (() => {
    const raw = params.get("friends");
    if (raw === null) return null;
    const ids = [...new Set(raw.split(",").map((p) => p.trim()).filter((p) => p !== ""))];
    let invalid = null;
    if (ids.length === 0) invalid = "no players given";
    else if (ids.length > MAX_FRIENDS) invalid = `at most ${MAX_FRIENDS} players`;
    else if (ids.some((p) => !/^[A-Za-z0-9_.:-]{1,128}$/.test(p))) invalid = "a player id with a character a topic cannot carry";
    const friendsTopic = topic + ":friends@" + ids.join("@");
    if (!invalid && friendsTopic.length > 128) invalid = "the list is too long for one topic (128 bytes)";
    return { ids, topic: invalid ? null : friendsTopic, invalid };
  })();
  const reduceMotion = window.matchMedia && matchMedia("(prefers-reduced-motion: reduce)").matches;

  // ---- connection status -------------------------------------------------------------
  const LABELS = {
    connecting: "Connecting…",
    live: "Live",
    reconnecting: "Reconnecting…",
    offline: "Offline",
  };
  function setStatus(state, detail, transport) {
    el.status.dataset.state = state;
    el.status.dataset.transport = transport || "";
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

  // Shows entry `e` (rank, name, score) in row `tr`, marked when it is the followed player.
  function fillRow(tr, e) {
    setText(tr.cells[0], fmt(e.rank));
    setText(tr.cells[1], displayName(e));
    setText(tr.cells[2], fmt(e.score));
    tr.dataset.rank = fmt(e.rank);
    tr.dataset.score = fmt(e.score);
    markMe(tr, String(e.player));
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
      fillRow(tr, entry);
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
    renderMe();
  }

  // ---- the followed player (?player=ID) ---------------------------------------------------
  // Its window (`board:{name}@{ID}`: entry and neighbours) comes on its own topic; the row is
  // highlighted where the top shows it, else the window's rows below the top are pinned
  // under the table. `body[data-me]`: waiting | top | pinned | none (no score this season).
  let shownWindow = null;
  let windowVersion = -Infinity;

  function markMe(tr, player) {
    const me = followed !== null && player === followed;
    tr.classList.toggle("me", me);
    if (me) tr.setAttribute("aria-current", "true");
    else tr.removeAttribute("aria-current");
  }

  // A row outside the top's table (the pinned window, the friends view): rebuilt whole.
  function entryRow(e) {
    const tr = makeRow(String(e.player));
    fillRow(tr, e);
    return tr;
  }

  function renderMe() {
    if (followed === null) return;
    el.me.hidden = false;
    const inTop = shownTop.find((e) => String(e.player) === followed);
    let state;
    const rows = [];
    if (inTop) {
      state = "top";
      setText(el.meStatus, `${displayName(inTop)} is #${fmt(inTop.rank)}, in the top ${shownTop.length}.`);
    } else if (!shownWindow) {
      state = "waiting";
      setText(el.meStatus, `Looking for ${followed}…`);
    } else if (!shownWindow.entry) {
      state = "none";
      setText(el.meStatus, `${followed} has no score this season yet.`);
    } else {
      state = "pinned";
      setText(el.meStatus, "");
      // The window's rows the top does not show already.
      for (const e of shownWindow.around) if (Number(e.rank) > shownTop.length) rows.push(e);
    }
    const trs = rows.map(entryRow);
    el.pinnedRows.replaceChildren(...trs);
    el.pinned.hidden = trs.length === 0;
    document.body.dataset.me = state;
    const rank = inTop ? inTop.rank : shownWindow && shownWindow.entry ? shownWindow.entry.rank : "";
    document.body.dataset.meRank = fmt(rank === "" ? undefined : rank);
  }

  // One window update: the same version rules as the board's updates.
  function onWindow(data, first) {
    if (!data || typeof data !== "object" || !Array.isArray(data.around)) return;
    const v = Number(data.version);
    if (!Number.isFinite(v) || (v <= windowVersion && !first)) return;
    windowVersion = v;
    shownWindow = data;
    renderMe();
  }

  // ---- the friends view (?friends=ID,ID,...) ----------------------------------------------
  // `body[data-friends]`: waiting | shown | invalid; each row carries its board rank.
  let friendsVersion = -Infinity;

  function renderFriends(view) {
    if (friends === null) return;
    el.friends.hidden = false;
    if (friends.invalid) {
      setText(el.friendsStatus, `Friends not shown: ${friends.invalid}.`);
      document.body.dataset.friends = "invalid";
      return;
    }
    if (!view) {
      setText(el.friendsStatus, `Looking for ${friends.ids.join(", ")}…`);
      document.body.dataset.friends = "waiting";
      return;
    }
    const ranking = Array.isArray(view.ranking) ? view.ranking : [];
    const missing = Array.isArray(view.missing) ? view.missing.map(String) : [];
    const trs = ranking.map(entryRow);
    el.friendsRows.replaceChildren(...trs);
    el.friendsTable.hidden = trs.length === 0;
    setText(el.friendsStatus, missing.length ? `No score this season yet: ${missing.join(", ")}.` : "");
    el.friendsStatus.dataset.missing = missing.join(",");
    document.body.dataset.friends = "shown";
  }

  function onFriends(data, first) {
    if (!data || typeof data !== "object" || !Array.isArray(data.ranking)) return;
    const v = Number(data.version);
    if (!Number.isFinite(v) || (v <= friendsVersion && !first)) return;
    friendsVersion = v;
    renderFriends(data);
  }

  function updateCounts(data) {
    if (data.watchers !== undefined) setText(el.watchers, fmt(data.watchers));
    if (data.players !== undefined) setText(el.players, fmt(data.players));
    if (data.season !== undefined) setText(el.season, fmt(data.season));
    setNextReset(typeof data.next_reset === "string" ? data.next_reset : "");
  }

  // ---- season countdown -------------------------------------------------------------
  // `next_reset` (RFC 3339) comes with every update of a board with a schedule; the page
  // counts down to it once a second on the viewer's clock. At zero it says so until the
  // server's update of the new season arrives.
  let nextReset = NaN;
  let countdownTimer = null;

  function setNextReset(text) {
    el.countdown.dataset.nextReset = text;
    nextReset = text ? Date.parse(text) : NaN;
    el.resetStat.hidden = !Number.isFinite(nextReset);
    if (Number.isFinite(nextReset) && countdownTimer === null) {
      countdownTimer = setInterval(tick, 1000);
    } else if (!Number.isFinite(nextReset) && countdownTimer !== null) {
      clearInterval(countdownTimer);
      countdownTimer = null;
    }
    tick();
  }

  function tick() {
    if (!Number.isFinite(nextReset)) return;
    const left = Math.max(0, Math.floor((nextReset - Date.now()) / 1000));
    if (left === 0) {
      setText(el.countdown, "now");
      return;
    }
    const d = Math.floor(left / 86400);
    const pad = (n) => String(n).padStart(2, "0");
    const hms = `${pad(Math.floor((left % 86400) / 3600))}:${pad(Math.floor((left % 3600) / 60))}:${pad(left % 60)}`;
    setText(el.countdown, d > 0 ? `${d}d ${hms}` : hms);
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

  // ---- access to a private board ----------------------------------------------------------
  // What the server's refusal means for the viewer: these are not cured by retrying, so the
  // page says so and stops instead of reconnecting forever.
  const ACCESS = {
    token_required: "This board is private: open it with a link that carries an access token.",
    topic_forbidden: "This access token does not allow this board.",
    token_expired: "This access token has expired: get a new link.",
    bad_token: "This access token is not valid.",
  };
  let refused = null; // the refusal's code, once refused

  function showRefusal(code, crier) {
    if (refused || !ACCESS[code]) return;
    refused = code;
    crier.close();
    el.access.textContent = ACCESS[code];
    el.access.hidden = false;
    document.body.dataset.access = code;
    setStatus("offline", "access refused", crier.transport);
  }

  // A WebSocket refused at its handshake and an EventSource refused with 401/403 both look
  // like a network failure to the page: after a connection that never opened, the same
  // board read over fetch (which sees the status and code) tells which it was.
  let probing = false;
  async function probe(crier) {
    if (probing || refused) return;
    probing = true;
    try {
      const res = await fetch("/api/boards/" + encodeURIComponent(boardName) + "?limit=1", {
        headers: token ? { authorization: "Bearer " + token } : {},
        cache: "no-store",
      });
      if (res.status === 401 || res.status === 403) {
        const body = await res.json().catch(() => null);
        showRefusal(body && body.error && body.error.code, crier);
      }
    } catch {
      // The server is unreachable: crier.js keeps retrying.
    } finally {
      probing = false;
    }
  }

  // ---- connection (crier.js) -----------------------------------------------------------------
  function start() {
    const crier = new Crier({
      transport: forced === "sse" || forced === "ws" ? forced : "auto",
      backoff: BACKOFF,
      token,
    });
    crier.on("state", (state, info) => {
      if (refused) return;
      if (state === "open") setStatus("live", "", info.transport);
      else if (state === "connecting") setStatus("connecting", "", info.transport);
      else if (state === "reconnecting") {
        setStatus(info.offline ? "offline" : "reconnecting", info.offline ? "no network" : "", info.transport);
      } else if (state === "closed") setStatus("offline", info.final ? "server refused" : "", info.transport);
      // A connection ended: `delay` (a retry is scheduled) or `final` (none is).
      if (info.delay !== undefined || info.final) probe(crier);
    });
    crier.on("error", (e) => {
      console.warn("crier:", e.code, e.message);
      showRefusal(e.code, crier);
    });
    // The first update after subscribing or after a reset is taken as it is, even with a
    // lower version (the server's state was reset); later ones must be newer.
    let takeAsIs = true;
    crier.subscribe(topic, {
      onMessage(data, meta) {
        // The retained snapshot was published before this page subscribed: its watchers
        // do not count the page yet, so a freshly opened page counts itself (the server's
        // next snapshot, within about a second, counts it too).
        if (meta && meta.prior && data && Number.isSafeInteger(data.watchers)) {
          data = { ...data, watchers: data.watchers + 1 };
        }
        onUpdate(data, takeAsIs);
        takeAsIs = false;
      },
      onReset() {
        takeAsIs = true;
      },
    });
    if (followed !== null) {
      renderMe();
      let windowAsIs = true;
      crier.subscribe(topic + "@" + followed, {
        onMessage(data) {
          onWindow(data, windowAsIs);
          windowAsIs = false;
        },
        onReset() {
          windowAsIs = true;
        },
      });
    }
    if (friends !== null) {
      renderFriends(null);
      if (friends.topic) {
        let friendsAsIs = true;
        crier.subscribe(friends.topic, {
          onMessage(data) {
            onFriends(data, friendsAsIs);
            friendsAsIs = false;
          },
          onReset() {
            friendsAsIs = true;
          },
        });
      }
    }
    window.addEventListener("offline", () => {
      if (crier.state !== "open") setStatus("offline", "no network", crier.transport);
    });
  }

  if (!boardName) {
    setStatus("offline", "no board in the address");
  } else if (!/^[A-Za-z0-9_.:-]{1,128}$/.test(topic)) {
    // The server refuses a bad topic name (400): say so instead of retrying forever.
    setStatus("offline", "invalid board name");
  } else {
    start();
  }
}
