// Tests of the board page's own logic with no crier server: the assets are served from
// src/web/assets through Playwright's request routing, and /ws and /sse are mocked. They
// cover what is hard to provoke from a real server: stale versions, WebSocket blocked.
//
//   node --test tests/browser/page.test.mjs
import { test, before, after } from 'node:test';
import assert from 'node:assert/strict';
import { readFile } from 'node:fs/promises';
import { join, resolve, dirname } from 'node:path';
import { fileURLToPath } from 'node:url';
import { launchBrowser } from './server.mjs';

const ASSETS = resolve(dirname(fileURLToPath(import.meta.url)), '..', '..', 'src', 'web', 'assets');
const ORIGIN = 'http://crier.test';
const WAIT = 10_000;
const TYPES = { html: 'text/html; charset=utf-8', css: 'text/css; charset=utf-8', js: 'text/javascript; charset=utf-8' };

let browser;
before(async () => {
  browser = await launchBrowser();
});
after(async () => {
  await browser?.close();
});

const update = (version, top, extra = {}) => ({
  topic: 'board:mock',
  offset: version,
  data: { board: 'mock', version, players: top.length, watchers: 1, order: 'high', mode: 'best', top, ...extra },
});
const entry = (rank, player, score, name) => ({ rank, player, score, ...(name ? { meta: { name } } : {}) });

/** A page on a fake origin serving the real assets; `sse` answers /sse requests. */
async function mockPage({ sse } = {}) {
  const context = await browser.newContext();
  const page = await context.newPage();
  page.setDefaultTimeout(WAIT);
  page.errors = [];
  page.on('pageerror', (e) => page.errors.push(e));
  await page.route(`${ORIGIN}/**`, async (route) => {
    const url = new URL(route.request().url());
    let file = null;
    if (url.pathname === '/') file = 'index.html';
    else if (url.pathname.startsWith('/boards/')) file = 'board.html';
    else if (url.pathname.startsWith('/assets/')) file = url.pathname.slice('/assets/'.length);
    if (file) {
      const body = await readFile(join(ASSETS, file)).catch(() => null);
      if (body) return route.fulfill({ status: 200, contentType: TYPES[file.split('.').pop()], body });
    }
    if (url.pathname === '/sse' && sse) return route.fulfill(sse(url));
    return route.fulfill({ status: 404, body: 'not found' });
  });
  return page;
}

const text = (page, sel) => page.$eval(sel, (e) => e.textContent);

test('stale updates (version <= shown) are dropped; moves are highlighted', { timeout: 30_000 }, async () => {
  const page = await mockPage();
  let server;
  await page.routeWebSocket(/\/ws\?topic=board%3Amock$/, (ws) => {
    server = ws;
    ws.send(JSON.stringify({ op: 'subscribed', topic: 'board:mock', offset: 0, epoch: 'e' }));
    ws.send(JSON.stringify(update(5, [entry(1, 'a', 30, 'Ann'), entry(2, 'b', 20), entry(3, 'c', 10)])));
  });
  await page.goto(`${ORIGIN}/boards/mock`);
  await page.locator('#status[data-state="live"][data-transport="ws"]').waitFor({ state: 'attached' });
  await page.waitForFunction(() => document.querySelectorAll('#rows tr').length === 3);
  assert.equal(await text(page, '#leader'), 'Ann');
  assert.equal(await text(page, 'tr[data-player="b"] td.name'), 'b');
  assert.equal(await page.$$eval('tr.moved-up, tr.new-leader', (t) => t.length), 0, 'no highlight on the snapshot');

  // c overtakes everyone: moved-up and new-leader.
  server.send(JSON.stringify(update(6, [entry(1, 'c', 99, 'Cy'), entry(2, 'a', 30, 'Ann'), entry(3, 'b', 20)])));
  await page.waitForFunction(() => {
    const tr = document.querySelector('tr[data-player="c"]');
    return tr?.classList.contains('moved-up') && tr.classList.contains('new-leader');
  });
  assert.equal(await text(page, '#leader'), 'Cy');
  assert.equal(await page.$eval('tr[data-player="c"] td.rank', (td) => td.dataset.delta), '2');
  assert.deepEqual(
    await page.$$eval('#rows tr', (trs) => trs.map((tr) => tr.dataset.player)),
    ['c', 'a', 'b'],
  );

  // An older and an equal version must not change the table; a newer one does.
  server.send(JSON.stringify(update(4, [entry(1, 'z', 1000, 'Old')])));
  server.send(JSON.stringify(update(6, [entry(1, 'y', 2000, 'Same')], { watchers: 7 })));
  server.send(JSON.stringify(update(7, [entry(1, 'c', 99, 'Cy'), entry(2, 'b', 50), entry(3, 'a', 30, 'Ann')])));
  await page.waitForFunction(() => document.body.dataset.version === '7');
  assert.deepEqual(
    await page.$$eval('#rows tr', (trs) => trs.map((tr) => tr.dataset.player)),
    ['c', 'b', 'a'],
  );
  assert.equal(await text(page, '#watchers'), '1', 'counts come from the newest update');
  assert.equal(await text(page, '#leader'), 'Cy');

  // Leaving players are removed; an empty board says so.
  server.send(JSON.stringify(update(8, [])));
  await page.waitForFunction(() => document.querySelectorAll('#rows tr').length === 0);
  assert.equal(await page.$eval('#empty', (e) => e.hidden), false);
  assert.equal(await text(page, '#leader'), '—');
  assert.deepEqual(page.errors, []);
  await page.context().close();
});

test('after a reconnect the fresh snapshot is shown and status goes live again', { timeout: 30_000 }, async () => {
  const page = await mockPage();
  let connections = 0;
  await page.routeWebSocket(/\/ws\?/, (ws) => {
    connections++;
    const n = connections;
    ws.send(JSON.stringify(update(n === 1 ? 10 : 11, [entry(1, n === 1 ? 'first' : 'second', n)])));
    if (n === 1) setTimeout(() => ws.close({ code: 1001, reason: 'shutdown' }), 300);
  });
  await page.goto(`${ORIGIN}/boards/mock`);
  await page.waitForFunction(() => document.querySelector('tr[data-player="first"]'));
  await page.waitForFunction(() => document.querySelector('#status').dataset.state === 'reconnecting');
  await page.waitForFunction(
    () => document.querySelector('#status').dataset.state === 'live' && document.querySelector('tr[data-player="second"]'),
  );
  assert.equal(connections, 2);
  assert.deepEqual(page.errors, []);
  await page.context().close();
});

test('falls back to SSE when WebSocket never opens', { timeout: 30_000 }, async () => {
  let sseRequests = 0;
  const page = await mockPage({
    sse: () => {
      sseRequests++;
      return {
        status: 200,
        headers: { 'content-type': 'text/event-stream', 'cache-control': 'no-cache' },
        body: `retry: 2000\n\nid: 3\ndata: ${JSON.stringify(update(3, [entry(1, 's', 5, 'Sse')]))}\n\n`,
      };
    },
  });
  // A WebSocket blocked on the way: every attempt errors and closes without opening.
  await page.addInitScript(() => {
    window.__wsAttempts = 0;
    window.WebSocket = class {
      static OPEN = 1;
      constructor() {
        window.__wsAttempts++;
        this.readyState = 0;
        setTimeout(() => {
          this.readyState = 3;
          this.onerror?.(new Event('error'));
          this.onclose?.({ code: 1006, reason: '' });
        }, 10);
      }
      send() {}
      close() {}
    };
  });
  await page.goto(`${ORIGIN}/boards/mock`);
  await page.waitForFunction(() => document.querySelector('tr[data-player="s"]'));
  assert.equal(await page.getAttribute('#status', 'data-transport'), 'sse');
  assert.equal(await page.evaluate(() => window.__wsAttempts), 2, 'two failed WebSocket attempts, then SSE');
  assert.ok(sseRequests >= 1);
  assert.equal(await text(page, '#leader'), 'Sse');
  assert.deepEqual(page.errors, []);
  await page.context().close();
});

test('?transport=sse and a missing window.WebSocket both use SSE from the start', { timeout: 30_000 }, async () => {
  for (const [query, init] of [
    ['?transport=sse', null],
    ['', () => delete window.WebSocket],
  ]) {
    const page = await mockPage({
      sse: () => ({
        status: 200,
        headers: { 'content-type': 'text/event-stream' },
        body: `data: ${JSON.stringify(update(1, [entry(1, 'p', 1)]))}\n\n`,
      }),
    });
    let wsUsed = false;
    await page.routeWebSocket(/.*/, (ws) => {
      wsUsed = true;
      ws.close();
    });
    if (init) await page.addInitScript(init);
    await page.goto(`${ORIGIN}/boards/mock${query}`);
    await page.waitForFunction(() => document.querySelector('tr[data-player="p"]'));
    assert.equal(await page.getAttribute('#status', 'data-transport'), 'sse', query || 'no WebSocket');
    assert.equal(wsUsed, false);
    assert.deepEqual(page.errors, []);
    await page.context().close();
  }
});

test('index lists boards from /api/boards with links', { timeout: 30_000 }, async () => {
  const page = await mockPage();
  await page.route(`${ORIGIN}/api/boards`, (route) =>
    route.fulfill({
      status: 200,
      contentType: 'application/json',
      body: JSON.stringify({
        boards: [
          { name: 'arena', players: 3, watchers: 2, order: 'high', mode: 'best', top: 10 },
          { name: 'golf', players: 1, watchers: 0, order: 'low', mode: 'best', top: 10 },
        ],
      }),
    }),
  );
  await page.goto(`${ORIGIN}/`);
  await page.locator('#boards a[href="/boards/golf"]').waitFor();
  assert.deepEqual(
    await page.$$eval('#boards li', (lis) => lis.map((li) => li.dataset.board)),
    ['arena', 'golf'],
  );
  assert.match(await text(page, '#boards li[data-board="golf"]'), /1 player(?!s).*lowest wins/);
  assert.deepEqual(page.errors, []);
  await page.context().close();
});
