// crier: the list of leaderboards (served at /). Polls GET /api/boards every few seconds:
// the first page, plus as many more as "Show more" asked for (the API pages by cursor).
"use strict";

(() => {
  const REFRESH_MS = 5000;
  const PAGE = 100;
  const MAX_PAGES = 100; // 10,000 boards at most on screen
  const status = document.querySelector("#status");
  const statusLabel = document.querySelector("#status .status-label");
  const list = document.querySelector("#boards");
  const empty = document.querySelector("#empty");
  const more = document.querySelector("#more");
  const items = new Map(); // board name -> <li>
  let pages = 1; // pages shown
  let timer = null;
  let latest = 0; // the newest refresh: an older one finishing later must not render

  function setStatus(state, label) {
    status.dataset.state = state;
    statusLabel.textContent = label;
  }

  function stat(label, value) {
    const span = document.createElement("span");
    span.className = "board-stat";
    const b = document.createElement("b");
    b.textContent = value === undefined || value === null ? "–" : String(value);
    span.append(b, " " + label);
    return span;
  }

  function item(board) {
    const li = document.createElement("li");
    li.className = "board-item";
    li.dataset.board = board.name;
    const a = document.createElement("a");
    a.href = "/boards/" + encodeURIComponent(board.name);
    const name = document.createElement("span");
    name.className = "board-name";
    name.textContent = board.name;
    const meta = document.createElement("span");
    meta.className = "board-meta";
    meta.append(stat(board.players === 1 ? "player" : "players", board.players), stat("watching", board.watchers));
    const kind = document.createElement("span");
    kind.className = "board-kind";
    kind.textContent = [board.order === "low" ? "lowest wins" : board.order ? "highest wins" : "", board.mode || ""]
      .filter(Boolean)
      .join(" · ");
    a.append(name, meta, kind);
    li.append(a);
    return li;
  }

  function render(boards) {
    const seen = new Set();
    let cursor = list.firstElementChild;
    for (const board of boards) {
      if (!board || typeof board.name !== "string" || seen.has(board.name)) continue;
      seen.add(board.name);
      const fresh = item(board);
      const old = items.get(board.name);
      if (old && old.innerHTML === fresh.innerHTML) {
        // unchanged: keep the node (and any focus on its link)
        if (old === cursor) cursor = cursor.nextElementSibling;
        else list.insertBefore(old, cursor);
        continue;
      }
      if (old) {
        if (old === cursor) cursor = cursor.nextElementSibling;
        old.remove();
      }
      items.set(board.name, fresh);
      list.insertBefore(fresh, cursor);
    }
    for (const [name, li] of items) {
      if (!seen.has(name)) {
        li.remove();
        items.delete(name);
      }
    }
    empty.hidden = seen.size > 0;
  }

  // The first `pages` pages, following next_cursor; whether more boards follow them.
  async function load() {
    const boards = [];
    let cursor = null;
    for (let i = 0; i < pages; i++) {
      const q = "?limit=" + PAGE + (cursor === null ? "" : "&cursor=" + encodeURIComponent(cursor));
      const res = await fetch("/api/boards" + q, { headers: { Accept: "application/json" }, cache: "no-store" });
      if (!res.ok) throw new Error("HTTP " + res.status);
      const body = await res.json();
      if (Array.isArray(body.boards)) boards.push(...body.boards);
      cursor = typeof body.next_cursor === "string" ? body.next_cursor : null;
      if (cursor === null) break;
    }
    return { boards, hasMore: cursor !== null };
  }

  async function refresh() {
    clearTimeout(timer);
    const mine = ++latest;
    try {
      const { boards, hasMore } = await load();
      if (mine !== latest) return;
      render(boards);
      more.hidden = !hasMore || pages >= MAX_PAGES;
      setStatus("live", "Updated " + new Date().toLocaleTimeString());
    } catch (e) {
      if (mine !== latest) return;
      setStatus(items.size ? "reconnecting" : "offline", "Cannot load boards (" + e.message + ")");
    } finally {
      if (mine === latest) timer = setTimeout(refresh, document.hidden ? REFRESH_MS * 3 : REFRESH_MS);
    }
  }

  more.addEventListener("click", () => {
    pages = Math.min(pages + 1, MAX_PAGES);
    more.hidden = true;
    refresh();
  });

  refresh();
})();
