// crier.js's presence API (docs/client.md) in real headless Chromium against the real crier
// binary: onJoin/onLeave over WebSocket and over SSE, presence() and presenceStats() read
// over HTTP, and the error a topic without presence gets.
//
//   cargo build && (cd tests/browser && npm ci) && node --test tests/browser/presence.test.mjs
import { test, before, after } from 'node:test';
import assert from 'node:assert/strict';
import { mkdtemp, writeFile, rm } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { launchBrowser, startServer } from './server.mjs';

const WAIT = 15_000;
const TOPIC = 'lobby:browser';

let browser;
let settingsDir;
before(async () => {
  browser = await launchBrowser();
  settingsDir = await mkdtemp(join(tmpdir(), 'crier-presence-'));
  await writeFile(
    join(settingsDir, 'crier.toml'),
    '[[namespace]]\npattern = "lobby:*"\npresence = true\njoin_leave = true\n',
  );
});
after(async () => {
  await browser?.close();
  if (settingsDir) await rm(settingsDir, { recursive: true, force: true });
});

/** A page running crier.js on `transport`, subscribed to TOPIC: window.notices records
 * every join and leave as [kind, client]. */
async function presencePage(server, transport) {
  const context = await browser.newContext();
  const page = await context.newPage();
  page.setDefaultTimeout(WAIT);
  page.errors = [];
  page.on('pageerror', (e) => page.errors.push(e));
  await page.goto(`${server.baseURL}/assets/style.css`); // any page of crier's origin
  await page.evaluate(
    async ({ transport, topic }) => {
      const { Crier } = await import('/assets/crier.js');
      window.notices = [];
      window.crier = new Crier({ transport });
      window.crier.subscribe(topic, {
        onJoin: (m, meta) => window.notices.push(['join', m.client, meta.topic, m.user]),
        onLeave: (m, meta) => window.notices.push(['leave', m.client, meta.topic, m.user]),
      });
    },
    { transport, topic: TOPIC },
  );
  return page;
}

const waitNotices = (page, n) =>
  page.waitForFunction((n) => window.notices.length >= n, n, { timeout: WAIT });

async function withServer(body) {
  const server = await startServer({ args: ['--config', join(settingsDir, 'crier.toml')] });
  try {
    await body(server);
  } catch (e) {
    e.message += `\n--- crier log (last lines) ---\n${server.log.slice(-30).join('\n')}`;
    throw e;
  } finally {
    await server.stop();
  }
}

for (const [first, second] of [
  ['ws', 'sse'],
  ['sse', 'ws'],
]) {
  test(`presence: joins, leaves, members and stats (${first} watching, ${second} joining)`, { timeout: 60_000 }, async () => {
    await withServer(async (server) => {
      const a = await presencePage(server, first);
      await waitNotices(a, 1); // its own join
      const [kind, aId, topic, user] = await a.evaluate(() => window.notices[0]);
      assert.deepEqual([kind, topic, user], ['join', TOPIC, null]);

      const b = await presencePage(server, second);
      await waitNotices(b, 1);
      const bId = await b.evaluate(() => window.notices[0][1]);
      await waitNotices(a, 2);
      assert.deepEqual(await a.evaluate(() => window.notices[1].slice(0, 2)), ['join', bId]);

      const members = await a.evaluate((t) => window.crier.presence(t), TOPIC);
      assert.deepEqual(members.map((m) => m.client).sort(), [aId, bId].sort());
      assert.deepEqual(members[0], { client: members[0].client, user: null, info: null });
      // Paged reads give the same list.
      const paged = await a.evaluate((t) => window.crier.presence(t, { pageSize: 1 }), TOPIC);
      assert.deepEqual(paged, members);
      assert.deepEqual(await a.evaluate((t) => window.crier.presenceStats(t), TOPIC), { clients: 2, users: 0 });

      // A topic without presence: a clear error, not an empty list.
      const err = await a.evaluate(() =>
        window.crier.presence('plain').then(
          () => null,
          (e) => ({ code: e.code, status: e.status }),
        ),
      );
      assert.deepEqual(err, { code: 'presence_disabled', status: 404 });

      await b.close();
      await waitNotices(a, 3);
      assert.deepEqual(await a.evaluate(() => window.notices[2].slice(0, 2)), ['leave', bId]);
      assert.deepEqual(await a.evaluate((t) => window.crier.presenceStats(t), TOPIC), { clients: 1, users: 0 });
      assert.deepEqual(a.errors, []);
      await a.close();
    });
  });
}
