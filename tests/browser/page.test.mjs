// Tests of the board page's own logic with a scripted server: the assets are served from
// src/web/assets through Playwright's request routing and /ws is scripted. Only what a real
// server cannot be made to send on demand is here (an out-of-order stale version, a
// reconnect whose snapshot differs); everything else runs against the real binary in
// board.test.mjs.
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

/** A page on a fake origin serving the real assets (the tests script /ws themselves). */
async function mockPage() {
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
  // Every status the page shows, recorded as it changes: "reconnecting" may last only as
  // long as the jittered backoff (0-250 ms), too short to be sure a poll would see it.
  await page.addInitScript(() => {
    window.__states = [];
    new MutationObserver((records) => {
      for (const r of records) {
        if (r.target.id === 'status') window.__states.push(r.target.dataset.state);
      }
    }).observe(document, { subtree: true, attributes: true, attributeFilter: ['data-state'] });
  });
  await page.goto(`${ORIGIN}/boards/mock`);
  await page.waitForFunction(() => document.querySelector('tr[data-player="first"]'));
  await page.waitForFunction(
    () => document.querySelector('#status').dataset.state === 'live' && document.querySelector('tr[data-player="second"]'),
  );
  const states = await page.evaluate(() => window.__states);
  const reconnecting = states.indexOf('reconnecting');
  assert.ok(reconnecting >= 0, `the page said it was reconnecting: ${states}`);
  assert.ok(states.lastIndexOf('live') > reconnecting, `then live again: ${states}`);
  assert.equal(connections, 2);
  assert.deepEqual(page.errors, []);
  await page.context().close();
});
