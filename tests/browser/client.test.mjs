// The browser client module /assets/crier.js in real headless Chromium against the real
// crier binary. A small TCP proxy sits between the browser and crier, so a test can cut
// every connection at once (as a network drop does), keep the browser out for a while, or
// refuse WebSocket upgrades (as some corporate proxies do). Publications go straight to
// crier while the page is cut off; after the reconnect the page must hold every offset
// exactly once, in order, or have been told (onReset) that it could not.
//
//   cargo build && (cd tests/browser && npm ci) && node --test tests/browser/client.test.mjs
import { test, before, after } from 'node:test';
import assert from 'node:assert/strict';
import { createServer, connect } from 'node:net';
import { launchBrowser, startServer, api, postScores } from './server.mjs';

const WAIT = 20_000; // the longest any single wait may take

let browser;
before(async () => {
  browser = await launchBrowser();
});
after(async () => {
  await browser?.close();
});

/**
 * A TCP proxy on 127.0.0.1 to `target()`'s port. `cut()` destroys every connection through
 * it; while `blocked`, new connections are dropped at once; with `refuseUpgrades`, a request
 * asking for a WebSocket upgrade gets 403 instead.
 */
async function startProxy(target) {
  const sockets = new Set();
  const proxy = { blocked: false, refuseUpgrades: false, upgradesRefused: 0, connections: 0 };
  const server = createServer((client) => {
    if (proxy.blocked) {
      client.destroy();
      return;
    }
    proxy.connections++;
    const upstream = connect(target(), '127.0.0.1');
    sockets.add(client);
    sockets.add(upstream);
    const gone = () => {
      client.destroy();
      upstream.destroy();
      sockets.delete(client);
      sockets.delete(upstream);
    };
    client.on('error', gone).on('close', gone);
    upstream.on('error', gone).on('close', gone);
    client.on('data', (chunk) => {
      if (proxy.refuseUpgrades && /\r\nupgrade:\s*websocket/i.test(chunk.toString('latin1'))) {
        proxy.upgradesRefused++;
        client.end('HTTP/1.1 403 Forbidden\r\ncontent-length: 0\r\nconnection: close\r\n\r\n');
        upstream.destroy();
        return;
      }
      upstream.write(chunk);
    });
    upstream.pipe(client);
  });
  await new Promise((r) => server.listen(0, '127.0.0.1', r));
  proxy.port = server.address().port;
  proxy.url = `http://127.0.0.1:${proxy.port}`;
  proxy.cut = () => {
    for (const s of sockets) s.destroy();
    sockets.clear();
  };
  proxy.close = () => {
    proxy.cut();
    return new Promise((r) => server.close(r));
  };
  return proxy;
}

/**
 * A page on crier's origin (through the proxy) running crier.js: `window.log[topic]` holds
 * every delivered {offset, epoch, n, replayed}, `window.resets`/`window.recovered` the
 * callbacks, `window.states` the state changes.
 */
async function clientPage(proxy, options, topics) {
  const context = await browser.newContext();
  const page = await context.newPage();
  page.setDefaultTimeout(WAIT);
  page.errors = [];
  page.on('pageerror', (e) => page.errors.push(e));
  await page.goto(`${proxy.url}/assets/style.css`); // any page of crier's origin will do
  await page.evaluate(
    async ({ options, topics }) => {
      const { Crier } = await import('/assets/crier.js');
      window.log = {};
      window.resets = [];
      window.recovered = [];
      window.states = [];
      window.handles = {};
      window.crier = new Crier(options);
      window.crier.on('state', (s, info) => window.states.push({ s, transport: info.transport }));
      for (const topic of topics) {
        window.log[topic] = [];
        window.handles[topic] = window.crier.subscribe(topic, {
          onMessage: (data, meta) =>
            window.log[topic].push({
              offset: meta.offset,
              epoch: meta.epoch,
              n: data.n,
              top: data.top?.[0]?.score,
              rank: data.entry?.rank,
              score: data.entry?.score,
              replayed: meta.replayed,
            }),
          onReset: (info) => window.resets.push({ topic, ...info }),
          onRecovered: (info) => window.recovered.push({ topic, ...info }),
        });
      }
    },
    { options, topics },
  );
  return page;
}

const FAST = { baseMs: 100, maxMs: 1000, stableMs: 1000 };

/** Publishes {n} on `topic` for each n in `ns`, in order; returns the offsets. */
async function publish(server, topic, ns) {
  const offsets = [];
  for (const n of ns) offsets.push((await api(server.baseURL, 'POST', `/api/publish/${topic}`, { n })).offset);
  return offsets;
}

const range = (a, b) => Array.from({ length: b - a + 1 }, (_, i) => a + i);

const waitCount = (page, topic, n) =>
  page.waitForFunction(({ topic, n }) => window.log[topic].length >= n, { topic, n }, { timeout: WAIT });

const waitState = (page, state) =>
  page.waitForFunction((state) => window.crier.state === state, state, { timeout: WAIT });

async function withServer(body) {
  const server = await startServer();
  let proxy;
  try {
    proxy = await startProxy(() => server.port);
    await body(server, proxy);
  } catch (e) {
    e.message += `\n--- crier log (last lines) ---\n${server.log.slice(-30).join('\n')}`;
    throw e;
  } finally {
    await proxy?.close();
    await server.stop();
  }
}

/**
 * The cut scenario on `topics`: 3 publications each while connected, then every
 * connection cut and the browser kept out while 10 more each are published, then let back
 * in while 5 more each are published. Every topic must end with offsets 1..18 in order,
 * each once, the missed ones marked as replayed, and no reset.
 */
async function cutAndResume(server, proxy, page, topics, transport) {
  for (const t of topics) await publish(server, t, range(1, 3));
  for (const t of topics) await waitCount(page, t, 3);
  assert.equal(await page.evaluate(() => window.crier.transport), transport);

  proxy.blocked = true;
  proxy.cut();
  await waitState(page, 'reconnecting');
  for (const t of topics) await publish(server, t, range(4, 13));
  // Let at least one reconnect attempt fail while blocked, then let the browser back in.
  await page.waitForFunction(() => window.states.filter((x) => x.s === 'reconnecting').length >= 2, null, {
    timeout: WAIT,
  });
  proxy.blocked = false;
  const live = (async () => {
    for (const t of topics) await publish(server, t, range(14, 18));
  })();
  await waitState(page, 'open');
  await live;
  for (const t of topics) await waitCount(page, t, 18);

  const { log, resets, recovered, transportNow } = await page.evaluate(() => ({
    log: window.log,
    resets: window.resets,
    recovered: window.recovered,
    transportNow: window.crier.transport,
  }));
  assert.deepEqual(resets, [], 'nothing was lost, so no reset');
  assert.equal(transportNow, transport);
  for (const t of topics) {
    assert.deepEqual(
      log[t].map((e) => e.offset),
      range(1, 18),
      `${t}: every offset once, in order`,
    );
    assert.deepEqual(
      log[t].map((e) => e.n),
      range(1, 18),
      `${t}: the data of each offset`,
    );
    assert.equal(new Set(log[t].map((e) => e.epoch)).size, 1, `${t}: one epoch`);
    assert.ok(log[t].slice(3, 13).some((e) => e.replayed), `${t}: the missed ones came as a replay`);
    assert.ok(
      recovered.some((r) => r.topic === t && r.since.offset >= 3),
      `${t}: onRecovered was called: ${JSON.stringify(recovered)}`,
    );
  }
  assert.deepEqual(page.errors, [], 'no uncaught page errors');
}

test('WebSocket: two topics on one connection resume after a cut, every offset once', { timeout: 90_000 }, async () => {
  await withServer(async (server, proxy) => {
    const page = await clientPage(proxy, { transport: 'auto', backoff: FAST }, ['cl-a', 'cl-b']);
    await waitState(page, 'open');
    const before = proxy.connections;
    await cutAndResume(server, proxy, page, ['cl-a', 'cl-b'], 'ws');
    assert.ok(proxy.connections > before, 'it reconnected');
    await page.context().close();
  });
});

test('SSE (forced): two topics on one stream resume after a cut, every offset once', { timeout: 90_000 }, async () => {
  await withServer(async (server, proxy) => {
    const page = await clientPage(proxy, { transport: 'sse', backoff: FAST }, ['cs-a', 'cs-b']);
    await waitState(page, 'open');
    await cutAndResume(server, proxy, page, ['cs-a', 'cs-b'], 'sse');
    await page.context().close();
  });
});

test('auto with WebSocket refused by the proxy: falls back to SSE and resumes there', { timeout: 90_000 }, async () => {
  await withServer(async (server, proxy) => {
    proxy.refuseUpgrades = true;
    const page = await clientPage(proxy, { transport: 'auto', backoff: FAST }, ['cf-a']);
    await waitState(page, 'open');
    assert.equal(await page.evaluate(() => window.crier.transport), 'sse');
    assert.ok(proxy.upgradesRefused >= 1, 'WebSocket was tried first');
    await cutAndResume(server, proxy, page, ['cf-a'], 'sse');
    // The fallback is remembered for the tab's session: a new client starts with SSE.
    const refused = proxy.upgradesRefused;
    const again = await page.evaluate(async () => {
      const { Crier } = await import('/assets/crier.js');
      return new Crier().transport;
    });
    assert.equal(again, 'sse');
    assert.equal(proxy.upgradesRefused, refused);
    await page.context().close();
  });
});

test('a leaderboard (state topic): the resume brings the newest snapshot, no reset', { timeout: 90_000 }, async () => {
  await withServer(async (server, proxy) => {
    await postScores(server.baseURL, 'cl-board', { player: 'ann', score: 1 });
    const page = await clientPage(proxy, { transport: 'auto', backoff: FAST }, ['board:cl-board']);
    await waitCount(page, 'board:cl-board', 1); // the snapshot that was retained
    proxy.blocked = true;
    proxy.cut();
    await waitState(page, 'reconnecting');
    for (let i = 2; i <= 6; i++) await postScores(server.baseURL, 'cl-board', { player: 'ann', score: i });
    proxy.blocked = false;
    await page.waitForFunction(() => window.log['board:cl-board'].at(-1)?.top === 6, null, { timeout: WAIT });
    const { log, resets, recovered } = await page.evaluate(() => ({
      log: window.log['board:cl-board'],
      resets: window.resets,
      recovered: window.recovered,
    }));
    assert.deepEqual(resets, []);
    assert.equal(recovered.length, 1, JSON.stringify(recovered));
    const offsets = log.map((e) => e.offset);
    assert.deepEqual(offsets, [...new Set(offsets)].sort((a, b) => a - b), 'offsets rise, none twice');
    assert.deepEqual(page.errors, []);
    await page.context().close();
  });
});

test('following a player (board:{b}@{p}): the window keeps updating after the socket is cut', { timeout: 60_000 }, async () => {
  await withServer(async (server, proxy) => {
    const topic = 'board:cl-follow@ann';
    await postScores(server.baseURL, 'cl-follow', [
      { player: 'ann', score: 10 },
      { player: 'bob', score: 20 },
    ]);
    const page = await clientPage(proxy, { transport: 'ws', backoff: FAST }, [topic]);
    const waitWindow = (rank, score) =>
      page.waitForFunction(
        ({ topic, rank, score }) => {
          const last = window.log[topic].at(-1);
          return last?.rank === rank && last?.score === score;
        },
        { topic, rank, score },
        { timeout: WAIT },
      );
    await waitWindow(2, 10);
    // The socket dies; scores move ann while the browser is kept out.
    proxy.blocked = true;
    proxy.cut();
    await waitState(page, 'reconnecting');
    await postScores(server.baseURL, 'cl-follow', { player: 'ann', score: 30 });
    await postScores(server.baseURL, 'cl-follow', { player: 'bob', score: 40 });
    proxy.blocked = false;
    await waitState(page, 'open');
    await waitWindow(2, 30); // the newest window, not a stale one
    // And it keeps following on the new connection.
    await postScores(server.baseURL, 'cl-follow', { player: 'ann', score: 50 });
    await waitWindow(1, 50);
    const { log, resets } = await page.evaluate((topic) => ({ log: window.log[topic], resets: window.resets }), topic);
    assert.deepEqual(resets, [], 'resumed, no reset');
    const offsets = log.map((e) => e.offset);
    assert.deepEqual(offsets, [...new Set(offsets)].sort((a, b) => a - b), 'offsets rise, none twice');
    assert.equal(await page.evaluate(() => window.crier.transport), 'ws');
    assert.deepEqual(page.errors, []);
    await page.context().close();
  });
});

for (const transport of ['ws', 'sse']) {
  test(`${transport}: after a server restart (new epoch) the page gets onReset, then the new offsets`, { timeout: 90_000 }, async () => {
    let server = await startServer();
    const { port, dataDir } = server;
    const proxy = await startProxy(() => port);
    try {
      const page = await clientPage(proxy, { transport, backoff: FAST }, ['cr-a']);
      await waitState(page, 'open');
      await publish(server, 'cr-a', range(1, 4));
      await waitCount(page, 'cr-a', 4);
      const oldEpoch = await page.evaluate(() => window.log['cr-a'][0].epoch);
      assert.match(oldEpoch, /^[0-9a-f]{8}$/);

      proxy.blocked = true;
      await server.kill('SIGKILL');
      proxy.cut();
      await waitState(page, 'reconnecting');
      server = await startServer({ port, dataDir });
      proxy.blocked = false;
      await waitState(page, 'open');
      await page.waitForFunction(() => window.resets.length >= 1, null, { timeout: WAIT });
      const offsets = await publish(server, 'cr-a', [100, 101]);
      assert.deepEqual(offsets, [1, 2], 'a memory topic starts again after a restart');
      await waitCount(page, 'cr-a', 6);
      const { log, resets } = await page.evaluate(() => ({ log: window.log['cr-a'], resets: window.resets }));
      assert.equal(resets.length, 1, JSON.stringify(resets));
      assert.equal(resets[0].topic, 'cr-a');
      assert.deepEqual(resets[0].since, { offset: 4, epoch: oldEpoch }, 'the position it asked for');
      assert.match(resets[0].position.epoch, /^[0-9a-f]{8}$/);
      assert.notEqual(resets[0].position.epoch, oldEpoch, 'a new epoch');
      assert.deepEqual(
        log.map((e) => [e.offset, e.n]),
        [
          [1, 1],
          [2, 2],
          [3, 3],
          [4, 4],
          [1, 100],
          [2, 101],
        ],
      );
      assert.equal(log[4].epoch, resets[0].position.epoch);
      assert.deepEqual(page.errors, [], 'no uncaught page errors');
      await page.context().close();
    } catch (e) {
      e.message += `\n--- crier log (last lines) ---\n${server.log.slice(-30).join('\n')}`;
      throw e;
    } finally {
      await proxy.close();
      await server.stop();
      const { rm } = await import('node:fs/promises');
      await rm(dataDir, { recursive: true, force: true });
    }
  });
}

for (const transport of ['ws', 'sse']) {
  test(`${transport}: subscribing and unsubscribing mid-stream keeps the other topic exact`, { timeout: 60_000 }, async () => {
    await withServer(async (server, proxy) => {
      const page = await clientPage(proxy, { transport, backoff: FAST }, ['cm-a']);
      await waitState(page, 'open');
      await publish(server, 'cm-a', range(1, 2));
      await waitCount(page, 'cm-a', 2);
      // Another topic joins (over SSE: a new stream, resumed from cm-a's position).
      await page.evaluate(() => {
        window.log['cm-b'] = [];
        window.handles['cm-b'] = window.crier.subscribe('cm-b', {
          onMessage: (data, meta) => window.log['cm-b'].push({ offset: meta.offset, n: data.n }),
        });
      });
      await page.waitForFunction(() => window.crier.state === 'open' && window.handles['cm-b'].position);
      await publish(server, 'cm-a', range(3, 4));
      await publish(server, 'cm-b', [1]);
      await waitCount(page, 'cm-b', 1);
      await waitCount(page, 'cm-a', 4);
      // cm-a leaves: what is published on it after that is not delivered.
      const opens = () => window.states.filter((x) => x.s === 'open').length;
      const opened = await page.evaluate(opens);
      await page.evaluate(() => window.handles['cm-a'].unsubscribe());
      // Over SSE the stream is replaced by one without cm-a; over WebSocket an unsubscribe
      // command is sent, and the publication on cm-b below comes after its effect.
      if (transport === 'sse') await page.waitForFunction(`(${opens})() > ${opened}`);
      await publish(server, 'cm-a', [5]);
      await publish(server, 'cm-b', [2]);
      await waitCount(page, 'cm-b', 2);
      const { log, resets } = await page.evaluate(() => ({ log: window.log, resets: window.resets }));
      assert.deepEqual(
        log['cm-a'].map((e) => e.offset),
        [1, 2, 3, 4],
        'cm-a: once each, nothing after leaving',
      );
      assert.deepEqual(log['cm-b'], [
        { offset: 1, n: 1 },
        { offset: 2, n: 2 },
      ]);
      assert.deepEqual(resets, []);
      assert.equal(await page.evaluate(() => window.crier.transport), transport);
      assert.deepEqual(page.errors, []);
      await page.context().close();
    });
  });
}
