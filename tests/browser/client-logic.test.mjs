// crier.js's own rules with a scripted server: what it sends to resume, and what it does
// with answers a real server cannot be made to send on demand (a duplicate offset, a
// "do not reconnect" close, a refused subscription). The resume itself is tested end to
// end against the real binary in client.test.mjs.
//
//   node --test tests/browser/client-logic.test.mjs
import { test, before, after } from 'node:test';
import assert from 'node:assert/strict';
import { readFile } from 'node:fs/promises';
import { join, resolve, dirname } from 'node:path';
import { fileURLToPath } from 'node:url';
import { launchBrowser } from './server.mjs';

const ASSETS = resolve(dirname(fileURLToPath(import.meta.url)), '..', '..', 'src', 'web', 'assets');
const ORIGIN = 'http://crier.test';
const WAIT = 10_000;

let browser;
before(async () => {
  browser = await launchBrowser();
});
after(async () => {
  await browser?.close();
});

/**
 * A page on a fake origin serving crier.js; `script(ws, n, url, onCommand)` plays each /ws
 * connection (`onCommand(fn)` gets the client's parsed frames, also kept in `page.frames[n]`).
 */
async function scriptedPage(script) {
  const context = await browser.newContext();
  const page = await context.newPage();
  page.setDefaultTimeout(WAIT);
  page.errors = [];
  page.on('pageerror', (e) => page.errors.push(e));
  await page.route(`${ORIGIN}/**`, async (route) => {
    const url = new URL(route.request().url());
    if (url.pathname === '/assets/crier.js') {
      const body = await readFile(join(ASSETS, 'crier.js'));
      return route.fulfill({ status: 200, contentType: 'text/javascript; charset=utf-8', body });
    }
    if (url.pathname === '/') return route.fulfill({ status: 200, contentType: 'text/html', body: '<!doctype html>' });
    return route.fulfill({ status: 404, body: 'not found' });
  });
  page.frames = []; // every client frame, per connection
  let n = 0;
  await page.routeWebSocket(/\/ws(\?|$)/, (ws) => {
    const i = n++;
    page.frames[i] = [];
    let onCmd = () => {};
    ws.onMessage((m) => {
      const cmd = JSON.parse(m);
      page.frames[i].push(cmd);
      onCmd(cmd);
    });
    script(ws, i, ws.url(), (fn) => (onCmd = fn));
  });
  await page.goto(`${ORIGIN}/`);
  return page;
}

/** Starts a Crier in the page recording deliveries, resets, errors and states. */
const startClient = (page, topics, backoff = { baseMs: 1, maxMs: 1 }) =>
  page.evaluate(
    async ({ topics, backoff }) => {
      const { Crier } = await import('/assets/crier.js');
      window.got = [];
      window.resets = [];
      window.recovered = [];
      window.errors = [];
      window.states = [];
      window.crier = new Crier({ transport: 'ws', backoff });
      window.crier.on('state', (s, info) => window.states.push({ s, ...info }));
      for (const t of topics) {
        window.crier.subscribe(t, {
          onMessage: (data, meta) => window.got.push([meta.topic, meta.offset, data, meta.replayed]),
          onReset: (r) => window.resets.push({ topic: t, ...r }),
          onRecovered: (r) => window.recovered.push({ topic: t, ...r }),
          onError: (e) => window.errors.push(e),
        });
      }
    },
    { topics, backoff },
  );

const pub = (topic, offset) => JSON.stringify({ topic, offset, data: { o: offset } });
const subscribed = (topic, offset, epoch, extra = {}) =>
  JSON.stringify({ op: 'subscribed', topic, offset, epoch, ...extra });

test('resumes each topic with since = its position; drops duplicates; replays are marked', { timeout: 30_000 }, async () => {
  const urls = [];
  const page = await scriptedPage((ws, i, url, onCommand) => {
    urls.push(url);
    if (i === 0) {
      ws.send(subscribed('a', 5, 'e1'));
      ws.send(subscribed('b', 0, 'e2'));
      ws.send(pub('a', 6));
      ws.send(pub('a', 7));
      ws.send(pub('a', 7)); // a duplicate: never delivered twice
      setTimeout(() => ws.close({ code: 1001, reason: 'shutdown' }), 100);
      return;
    }
    onCommand((cmd) => {
      if (cmd.op !== 'subscribe') return;
      if (cmd.topic === 'a') {
        ws.send(subscribed('a', 9, 'e1', { recovered: true, id: cmd.id }));
        for (const o of [7, 8, 9, 10]) ws.send(pub('a', o)); // 7 again: dropped
      } else {
        ws.send(subscribed('b', 3, 'e9', { recovered: false, id: cmd.id }));
        ws.send(pub('b', 4));
      }
    });
  });
  await startClient(page, ['a', 'b']);
  await page.waitForFunction(() => window.got.length >= 6);
  const got = await page.evaluate(() => window.got);
  assert.deepEqual(got, [
    ['a', 6, { o: 6 }, false],
    ['a', 7, { o: 7 }, false],
    ['a', 8, { o: 8 }, true],
    ['a', 9, { o: 9 }, true],
    ['a', 10, { o: 10 }, false],
    ['b', 4, { o: 4 }, false],
  ]);
  assert.equal(urls[0], `ws://crier.test/ws?topic=a&topic=b`, 'first connection: topics in the URL');
  assert.equal(urls[1], `ws://crier.test/ws`, 'positions known: topics by command');
  const cmds = page.frames[1].filter((f) => f.op === 'subscribe');
  assert.deepEqual(
    cmds.map(({ topic, since }) => ({ topic, since })),
    [
      { topic: 'a', since: { offset: 7, epoch: 'e1' } },
      { topic: 'b', since: { offset: 0, epoch: 'e2' } },
    ],
  );
  assert.ok(cmds.every((c) => c.id !== undefined), 'commands carry an id');
  assert.deepEqual(await page.evaluate(() => window.recovered), [
    { topic: 'a', position: { epoch: 'e1', offset: 9 }, since: { offset: 7, epoch: 'e1' } },
  ]);
  assert.deepEqual(await page.evaluate(() => window.resets), [
    { topic: 'b', position: { epoch: 'e9', offset: 3 }, since: { offset: 0, epoch: 'e2' } },
  ]);
  assert.deepEqual(page.errors, []);
  await page.context().close();
});

test('a "do not reconnect" close (4500) ends in state closed, without a new connection', { timeout: 30_000 }, async () => {
  let connections = 0;
  const page = await scriptedPage((ws) => {
    connections++;
    ws.send(subscribed('a', 0, 'e1'));
    setTimeout(() => ws.close({ code: 4500, reason: 'too_many_commands' }), 50);
  });
  await startClient(page, ['a']);
  await page.waitForFunction(() => window.crier.state === 'closed');
  const last = await page.evaluate(() => window.states.at(-1));
  assert.equal(last.final, true);
  assert.equal(last.code, 4500);
  // With a 1 ms backoff a reconnect would come at once; give it far more than that.
  await page.evaluate(() => new Promise((r) => setTimeout(r, 300)));
  assert.equal(connections, 1, 'no reconnect after 4500');
  assert.equal(await page.evaluate(() => window.crier.state), 'closed');
  // reconnect() is the explicit way back.
  await page.evaluate(() => window.crier.reconnect());
  await page.waitForFunction(() => window.crier.state === 'open');
  assert.equal(connections, 2);
  await page.context().close();
});

test('a refused subscription reaches onError; bad topic names throw at once', { timeout: 30_000 }, async () => {
  const page = await scriptedPage((ws, _i, _url, onCommand) => {
    onCommand((cmd) => {
      if (cmd.op === 'subscribe') {
        ws.send(JSON.stringify({ op: 'error', code: 'too_many_topics', message: 'full', id: cmd.id }));
      }
    });
  });
  await startClient(page, []);
  const thrown = await page.evaluate(() => {
    try {
      window.crier.subscribe('no spaces', () => {});
      return null;
    } catch (e) {
      return e.name;
    }
  });
  assert.equal(thrown, 'TypeError');
  // Open with a positioned topic (subscribed by command), so the refusal comes as an error frame.
  await page.evaluate(() => {
    window.crier.subscribe('late', { since: { epoch: 'e1', offset: 3 }, onError: (e) => window.errors.push(e) });
  });
  await page.waitForFunction(() => window.errors.length === 1);
  assert.deepEqual(await page.evaluate(() => window.errors), [{ code: 'too_many_topics', message: 'full', topic: 'late' }]);
  await page.context().close();
});
