// Browser end-to-end tests of the embedded leaderboard page, against a real crier server.
//
//   cargo build && (cd tests/browser && npm ci) && node --test tests/browser/
//
// Env: CRIER_BIN (server binary, default target/debug/crier), CHROMIUM (default
// /usr/bin/chromium), CRIER_E2E_LOG=1 (echo the server's log), CRIER_E2E_SCREENSHOT (where
// the board screenshot goes, default /tmp/crier-board.png).
import { test, before, after } from 'node:test';
import assert from 'node:assert/strict';
import { launchBrowser, startServer, postScores, api } from './server.mjs';

const WAIT = 15_000; // the longest any single wait may take
const SCREENSHOT = process.env.CRIER_E2E_SCREENSHOT || '/tmp/crier-board.png';

let browser;
before(async () => {
  browser = await launchBrowser();
});
after(async () => {
  await browser?.close();
});

/** A fresh page that records its uncaught errors. */
async function newPage() {
  const context = await browser.newContext({ viewport: { width: 1000, height: 800 } });
  const page = await context.newPage();
  page.setDefaultTimeout(WAIT);
  page.errors = [];
  page.on('pageerror', (e) => page.errors.push(e));
  return page;
}

/** Runs `body(server)` with a fresh server, stopping it whatever happens. */
async function withServer(body) {
  const server = await startServer();
  try {
    await body(server);
  } catch (e) {
    e.message += `\n--- crier log (last lines) ---\n${server.log.slice(-30).join('\n')}`;
    throw e;
  } finally {
    await server.stop();
  }
}

const seed = [
  { player: 'p1', score: 50, meta: { name: 'Ann' } },
  { player: 'p2', score: 40, meta: { name: 'Bob' } },
  { player: 'p3', score: 30 },
  { player: 'p4', score: 20, meta: { name: 'Dee' } },
  { player: 'p5', score: 10, meta: { name: 'Eve' } },
];

const waitLive = (page, transport) =>
  page
    .locator(`#status[data-state="live"]${transport ? `[data-transport="${transport}"]` : ''}`)
    .waitFor({ state: 'attached', timeout: WAIT });

const waitRows = (page, n) =>
  page.waitForFunction((n) => document.querySelectorAll('#rows tr[data-player]').length === n, n, {
    timeout: WAIT,
  });

/** The table as [{player, rank, name, score}], in document order. */
const readTable = (page) =>
  page.$$eval('#rows tr[data-player]', (trs) =>
    trs.map((tr) => ({
      player: tr.dataset.player,
      rank: Number(tr.querySelector('td.rank').textContent),
      name: tr.querySelector('td.name').textContent,
      score: Number(tr.querySelector('td.score').textContent),
    })),
  );

function assertRankOrder(rows) {
  assert.ok(rows.length > 0, 'the table has rows');
  rows.forEach((r, i) => {
    assert.equal(r.rank, i + 1, `row ${i} has rank ${i + 1}: ${JSON.stringify(rows)}`);
    if (i > 0) assert.ok(rows[i - 1].score >= r.score, `scores descend: ${JSON.stringify(rows)}`);
  });
}

/** Posts a new top score and checks the page highlights the new leader. */
async function newLeaderScenario(server, board, query, transport, prepare) {
  await postScores(server.baseURL, board, seed);
  const page = await newPage();
  if (prepare) await prepare(page);
  await page.goto(`${server.baseURL}/boards/${board}${query}`);
  await waitLive(page, transport);
  await waitRows(page, seed.length); // the snapshot is shown
  // The first snapshot (retained, published before the page came) counts the page itself.
  assert.equal(await page.textContent('#watchers'), '1', 'a fresh page counts itself');
  assert.equal(await page.textContent('#board-title'), board);
  assert.equal(await page.textContent('#leader'), 'Ann');
  assert.equal(await page.textContent('tr[data-player="p3"] td.name'), 'p3', 'no meta.name: the player id');
  assertRankOrder(await readTable(page));

  const [res] = (await postScores(server.baseURL, board, { player: 'zed', score: 1000, meta: { name: 'Zed' } }))
    .results;
  assert.equal(res.rank, 1);
  // Leader name and the row's highlight, seen together (the highlight lasts ~1.5 s).
  await page.waitForFunction(
    () => {
      const tr = document.querySelector('tr[data-player="zed"]');
      return (
        document.querySelector('#leader')?.textContent === 'Zed' &&
        tr &&
        (tr.classList.contains('moved-up') || tr.classList.contains('new-leader'))
      );
    },
    null,
    { timeout: WAIT },
  );
  const rows = await readTable(page);
  assertRankOrder(rows);
  assert.deepEqual(rows[0], { player: 'zed', rank: 1, name: 'Zed', score: 1000 });
  assert.deepEqual(
    rows.map((r) => r.player),
    ['zed', 'p1', 'p2', 'p3', 'p4', 'p5'],
  );
  await page.waitForFunction(() => document.querySelector('#players').textContent.trim() === '6', null, {
    timeout: WAIT,
  });
  assert.match(await page.textContent('#watchers'), /^\d+$/);
  assert.equal(await page.getAttribute('#status', 'data-transport'), transport);
  assert.deepEqual(page.errors, [], 'no uncaught page errors');
  return page;
}

test('new leader: the page shows and highlights it (WebSocket)', { timeout: 60_000 }, async () => {
  await withServer(async (server) => {
    const page = await newLeaderScenario(server, 'e2e-arena', '', 'ws');
    await page.screenshot({ path: SCREENSHOT, fullPage: true });
    await page.context().close();
  });
});

test('SSE transport: ?transport=sse gets the same updates', { timeout: 60_000 }, async () => {
  await withServer(async (server) => {
    const page = await newLeaderScenario(server, 'e2e-arena', '?transport=sse', 'sse');
    await page.context().close();
  });
});

test('WebSocket blocked on the way: the page falls back to SSE by itself', { timeout: 60_000 }, async () => {
  await withServer(async (server) => {
    // What a proxy that refuses upgrades looks like to a page: the handshake fails (1006)
    // without ever opening. The real server then serves the page over SSE.
    const page = await newLeaderScenario(server, 'e2e-blocked', '', 'sse', async (page) => {
      await page.addInitScript(() => {
        window.__wsAttempts = 0;
        const Real = window.WebSocket;
        window.WebSocket = class extends Real {
          constructor(url, protocols) {
            window.__wsAttempts++;
            // An address nothing listens on: the attempt errors before opening.
            super(url.replace(/^ws:\/\/[^/]+/, 'ws://127.0.0.1:9'), protocols);
          }
        };
      });
    });
    assert.ok((await page.evaluate(() => window.__wsAttempts)) >= 2, 'tried WebSocket first');
    await page.context().close();
  });
});

test('a browser without WebSocket uses SSE from the start', { timeout: 60_000 }, async () => {
  await withServer(async (server) => {
    const page = await newLeaderScenario(server, 'e2e-nows', '', 'sse', (page) =>
      page.addInitScript(() => {
        delete window.WebSocket;
      }),
    );
    await page.context().close();
  });
});

test('reconnect: the page recovers by itself after the server restarts', { timeout: 90_000 }, async () => {
  let server = await startServer();
  const { port, dataDir } = server;
  try {
    await postScores(server.baseURL, 'e2e-reconnect', seed.slice(0, 3));
    const page = await newPage();
    await page.goto(`${server.baseURL}/boards/e2e-reconnect`);
    await waitLive(page, 'ws');
    await waitRows(page, 3);
    await page.evaluate(() => {
      window.__notReloaded = true;
    });

    await server.kill('SIGKILL');
    await page.waitForFunction(() => document.querySelector('#status').dataset.state !== 'live', null, {
      timeout: WAIT,
    });
    assert.match(await page.getAttribute('#status', 'data-state'), /^(reconnecting|offline)$/);

    server = await startServer({ port, dataDir });
    await postScores(server.baseURL, 'e2e-reconnect', { player: 'phoenix', score: 500, meta: { name: 'Phoenix' } });
    await page.waitForFunction(
      () =>
        document.querySelector('#status').dataset.state === 'live' &&
        document.querySelector('tr[data-player="phoenix"] td.score')?.textContent === '500' &&
        document.querySelector('#leader').textContent === 'Phoenix',
      null,
      { timeout: 30_000 },
    );
    assert.equal(await page.evaluate(() => window.__notReloaded), true, 'the page was not reloaded');
    const rows = await readTable(page);
    assertRankOrder(rows);
    assert.deepEqual(
      rows.map((r) => r.player),
      ['phoenix', 'p1', 'p2', 'p3'],
      'the scores from before the restart are still there (same --data-dir)',
    );
    assert.deepEqual(page.errors, [], 'no uncaught page errors');
    await page.context().close();
  } catch (e) {
    e.message += `\n--- crier log (last lines) ---\n${server.log.slice(-30).join('\n')}`;
    throw e;
  } finally {
    await server.stop();
    const { rm } = await import('node:fs/promises');
    await rm(dataDir, { recursive: true, force: true });
  }
});

test('seasons: the page shows the season and counts down to the next reset', { timeout: 60_000 }, async () => {
  await withServer(async (server) => {
    await api(server.baseURL, 'PUT', '/api/boards/e2e-season', {
      reset: '0 0 * * MON',
      timezone: 'Asia/Tokyo',
    });
    await postScores(server.baseURL, 'e2e-season', seed.slice(0, 2));
    await postScores(server.baseURL, 'e2e-plain', seed.slice(0, 1));
    const board = await api(server.baseURL, 'GET', '/api/boards/e2e-season');
    assert.equal(board.season.number, 1);
    const page = await newPage();
    await page.goto(`${server.baseURL}/boards/e2e-season`);
    await waitLive(page);
    await waitRows(page, 2);
    await page.waitForFunction(() => document.querySelector('#season').textContent === '1', null, {
      timeout: WAIT,
    });
    assert.equal(await page.getAttribute('#countdown', 'data-next-reset'), board.next_reset);
    assert.equal(await page.isVisible('#reset-stat'), true);
    const first = await page.textContent('#countdown');
    assert.match(first, /^(\d+d )?\d\d:\d\d:\d\d$/, `a countdown: ${first}`);
    // It ticks: within a few seconds the text changes.
    await page.waitForFunction((t) => document.querySelector('#countdown').textContent !== t, first, {
      timeout: WAIT,
    });
    // A board without a schedule shows its season and no countdown.
    await page.goto(`${server.baseURL}/boards/e2e-plain`);
    await waitLive(page);
    await waitRows(page, 1);
    await page.waitForFunction(() => document.querySelector('#season').textContent === '1', null, {
      timeout: WAIT,
    });
    assert.equal(await page.isVisible('#reset-stat'), false);
    assert.deepEqual(page.errors, [], 'no uncaught page errors');
    await page.context().close();
  });
});

test('?player: the followed row is pinned below the top with its neighbours, then highlighted in it, live', { timeout: 60_000 }, async () => {
  await withServer(async (server) => {
    // `latest` mode, so the followed player can fall back out of the top.
    await api(server.baseURL, 'PUT', '/api/boards/e2e-me', { top: 3, mode: 'latest' });
    await postScores(
      server.baseURL,
      'e2e-me',
      Array.from({ length: 8 }, (_, i) => ({ player: `p${i + 1}`, score: 80 - 10 * i })),
    );
    const page = await newPage();
    await page.goto(`${server.baseURL}/boards/e2e-me?player=p6`);
    await waitLive(page, 'ws');
    await waitRows(page, 3);
    const pinned = () =>
      page.$$eval('#pinned-rows tr[data-player]', (trs) =>
        trs.map((tr) => [tr.dataset.player, Number(tr.dataset.rank), tr.classList.contains('me')]),
      );
    const waitMe = (state, rank) =>
      page.waitForFunction(
        ({ state, rank }) => document.body.dataset.me === state && document.body.dataset.meRank === String(rank),
        { state, rank },
        { timeout: WAIT },
      );
    // Rank 6 of a top 3: pinned below it, with the window's rows the top does not show.
    await waitMe('pinned', 6);
    assert.equal(await page.isVisible('#pinned'), true);
    assert.deepEqual(await pinned(), [
      ['p4', 4, false],
      ['p5', 5, false],
      ['p6', 6, true],
      ['p7', 7, false],
      ['p8', 8, false],
    ]);
    assert.equal(await page.locator('#rows tr.me').count(), 0);

    // Into the top: highlighted there, nothing pinned.
    await postScores(server.baseURL, 'e2e-me', { player: 'p6', score: 75 });
    await waitMe('top', 2);
    assert.equal(await page.getAttribute('#rows tr.me', 'data-player'), 'p6');
    assert.equal(await page.getAttribute('#rows tr.me', 'aria-current'), 'true');
    assert.equal(await page.isVisible('#pinned'), false);

    // Out again, to the bottom: pinned with the neighbours above it.
    await postScores(server.baseURL, 'e2e-me', { player: 'p6', score: 1 });
    await waitMe('pinned', 8);
    assert.deepEqual(await pinned(), [
      ['p4', 4, false],
      ['p5', 5, false],
      ['p7', 6, false],
      ['p8', 7, false],
      ['p6', 8, true],
    ]);
    assert.equal(await page.locator('#rows tr.me').count(), 0);
    assert.deepEqual(page.errors, [], 'no uncaught page errors');
    await page.context().close();
  });
});

test('?friends: the chosen players ranked among themselves, live, the missing ones named', { timeout: 60_000 }, async () => {
  await withServer(async (server) => {
    await api(server.baseURL, 'PUT', '/api/boards/e2e-fr', { top: 3, mode: 'latest' });
    await postScores(
      server.baseURL,
      'e2e-fr',
      Array.from({ length: 8 }, (_, i) => ({ player: `p${i + 1}`, score: 80 - 10 * i })),
    );
    const page = await newPage();
    // A repeat is dropped; `nobody` has no score yet; p7 is also the followed player.
    await page.goto(`${server.baseURL}/boards/e2e-fr?friends=p7,p2,nobody,p2&player=p7`);
    await waitLive(page, 'ws');
    const rows = () =>
      page.$$eval('#friends-rows tr[data-player]', (trs) =>
        trs.map((tr) => [tr.dataset.player, Number(tr.dataset.rank), tr.classList.contains('me')]),
      );
    const waitFriends = (first, n) =>
      page.waitForFunction(
        ({ first, n }) =>
          document.body.dataset.friends === 'shown' &&
          document.querySelectorAll('#friends-rows tr').length === n &&
          document.querySelector('#friends-rows tr').dataset.player === first,
        { first, n },
        { timeout: WAIT },
      );
    await waitFriends('p2', 2);
    assert.deepEqual(await rows(), [
      ['p2', 2, false],
      ['p7', 7, true],
    ]);
    assert.equal(await page.getAttribute('#friends-status', 'data-missing'), 'nobody');
    assert.equal(await page.isVisible('#friends-table'), true);

    // p7 passes p2: the view follows, live.
    await postScores(server.baseURL, 'e2e-fr', { player: 'p7', score: 75 });
    await waitFriends('p7', 2);
    assert.deepEqual(await rows(), [
      ['p7', 2, true],
      ['p2', 3, false],
    ]);

    // `nobody` posts: ranked, no longer missing.
    await postScores(server.baseURL, 'e2e-fr', { player: 'nobody', score: 1 });
    await waitFriends('p7', 3);
    assert.deepEqual(await rows(), [
      ['p7', 2, true],
      ['p2', 3, false],
      ['nobody', 9, false],
    ]);
    assert.equal(await page.getAttribute('#friends-status', 'data-missing'), '');

    // A list the server would refuse is said so, and the board itself still works.
    const bad = await newPage();
    await bad.goto(`${server.baseURL}/boards/e2e-fr?friends=a@b`);
    await waitLive(bad);
    await bad.waitForFunction(() => document.body.dataset.friends === 'invalid', null, { timeout: WAIT });
    assert.match(await bad.textContent('#friends-status'), /cannot carry/);
    await waitRows(bad, 3);
    assert.deepEqual(page.errors, [], 'no uncaught page errors');
    assert.deepEqual(bad.errors, [], 'no uncaught page errors');
    await page.context().close();
    await bad.context().close();
  });
});

test('index: / lists the boards and links to them', { timeout: 60_000 }, async () => {
  await withServer(async (server) => {
    await postScores(server.baseURL, 'e2e-index', seed.slice(0, 2));
    const page = await newPage();
    await page.goto(`${server.baseURL}/`);
    const link = page.locator('#boards a[href="/boards/e2e-index"]');
    await link.waitFor({ state: 'visible', timeout: WAIT });
    assert.match(await link.textContent(), /e2e-index/);
    await link.click();
    await page.waitForURL(`${server.baseURL}/boards/e2e-index`, { timeout: WAIT });
    await page.waitForFunction(() => document.querySelector('#board-title').textContent === 'e2e-index', null, {
      timeout: WAIT,
    });
    await waitLive(page);
    await waitRows(page, 2);
    assert.deepEqual(page.errors, [], 'no uncaught page errors');
    await page.context().close();
  });
});

test('index: the list pages, and "Show more" loads the next page', { timeout: 90_000 }, async () => {
  await withServer(async (server) => {
    const names = Array.from({ length: 130 }, (_, i) => `many-${String(i).padStart(3, '0')}`);
    for (let i = 0; i < names.length; i += 10) {
      await Promise.all(names.slice(i, i + 10).map((n) => postScores(server.baseURL, n, { player: 'p', score: 1 })));
    }
    const page = await newPage();
    await page.goto(`${server.baseURL}/`);
    const items = page.locator('#boards li.board-item');
    const more = page.locator('#more');
    await more.waitFor({ state: 'visible', timeout: WAIT });
    assert.equal(await items.count(), 100, 'the first page');
    assert.equal(await items.first().getAttribute('data-board'), 'many-000');
    await more.click();
    await page.waitForFunction(() => document.querySelectorAll('#boards li.board-item').length === 130, null, {
      timeout: WAIT,
    });
    await more.waitFor({ state: 'hidden', timeout: WAIT });
    const shown = await items.evaluateAll((lis) => lis.map((li) => li.dataset.board));
    assert.deepEqual(shown, names, 'every board once, in name order');
    // The next poll (every 5 s) keeps both pages.
    const label = await page.locator('#status .status-label').textContent();
    await page.waitForFunction(
      (label) => document.querySelector('#status .status-label').textContent !== label,
      label,
      { timeout: WAIT },
    );
    assert.equal(await items.count(), 130, 'a poll refreshes every page shown');
    assert.deepEqual(page.errors, [], 'no uncaught page errors');
    await page.context().close();
  });
});
