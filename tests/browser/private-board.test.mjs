// Browser end-to-end tests of a private board (docs/auth.md): the bundled page watches it
// with the token of its URL, and says plainly why it cannot without one.
//
//   cargo build && (cd tests/browser && npm ci) && node --test tests/browser/private-board.test.mjs
import { test, before, after } from 'node:test';
import assert from 'node:assert/strict';
import { createHmac } from 'node:crypto';
import { request } from 'node:http';
import { launchBrowser, startServer, postScores } from './server.mjs';

const WAIT = 15_000;
const SECRET = 'browser-test-secret-of-32-bytes-or-more';
const SERVE_ARGS = ['--jwt-secret', SECRET, '--private-topic', 'board:vip*'];

/** An HS256 JWT, as an application backend would mint it. */
function mint(topics, ttlSeconds = 600) {
  const b64 = (v) => Buffer.from(JSON.stringify(v)).toString('base64url');
  const body = `${b64({ alg: 'HS256', typ: 'JWT' })}.${b64({
    sub: 'viewer',
    exp: Math.floor(Date.now() / 1000) + ttlSeconds,
    topics,
  })}`;
  return `${body}.${createHmac('sha256', SECRET).update(body).digest('base64url')}`;
}

let browser;
before(async () => {
  browser = await launchBrowser();
});
after(async () => {
  await browser?.close();
});

async function withServer(body) {
  const server = await startServer({ args: SERVE_ARGS });
  try {
    await body(server);
  } catch (e) {
    e.message += `\n--- crier log (last lines) ---\n${server.log.slice(-30).join('\n')}`;
    throw e;
  } finally {
    await server.stop();
  }
}

async function newPage() {
  const context = await browser.newContext({ viewport: { width: 1000, height: 800 } });
  const page = await context.newPage();
  page.setDefaultTimeout(WAIT);
  page.errors = [];
  page.on('pageerror', (e) => page.errors.push(e));
  return page;
}

/**
 * Whether this server refuses a WebSocket handshake for a private topic without a token
 * (the WebSocket side of issue 9); the page's no-token WebSocket path needs it.
 */
function wsHandshakeStatus(server) {
  return new Promise((resolve, reject) => {
    const req = request(`${server.baseURL}/ws?topic=board:vip`, {
      headers: {
        connection: 'Upgrade',
        upgrade: 'websocket',
        'sec-websocket-version': '13',
        'sec-websocket-key': 'dGhlIHNhbXBsZSBub25jZQ==',
      },
      timeout: WAIT,
    });
    req.on('upgrade', (res, socket) => {
      socket.destroy();
      resolve(res.statusCode);
    });
    req.on('response', (res) => {
      res.resume();
      resolve(res.statusCode);
    });
    req.on('timeout', () => req.destroy(new Error('no answer to the handshake')));
    req.on('error', reject);
    req.end();
  });
}

/** Opens the board page and checks that a posted score shows up live. */
async function watchesLive(server, query, transport) {
  await postScores(server.baseURL, 'vip', [
    { player: 'p1', score: 50, meta: { name: 'Ann' } },
    { player: 'p2', score: 40, meta: { name: 'Bob' } },
  ]);
  const page = await newPage();
  await page.goto(`${server.baseURL}/boards/vip${query}`);
  await page
    .locator(`#status[data-state="live"][data-transport="${transport}"]`)
    .waitFor({ state: 'attached', timeout: WAIT });
  await page.waitForFunction(() => document.querySelectorAll('#rows tr[data-player]').length === 2, null, {
    timeout: WAIT,
  });
  await postScores(server.baseURL, 'vip', { player: 'zed', score: 1000, meta: { name: 'Zed' } });
  await page.waitForFunction(
    () =>
      document.querySelector('#leader')?.textContent === 'Zed' &&
      document.querySelectorAll('#rows tr[data-player]').length === 3,
    null,
    { timeout: WAIT },
  );
  assert.equal(await page.isHidden('#access'), true, 'no access message');
  assert.deepEqual(page.errors, [], 'no uncaught page errors');
  await page.context().close();
}

/** Opens the board page and waits for the access message of `code`. */
async function refusedWith(server, query, code, text) {
  const page = await newPage();
  await page.goto(`${server.baseURL}/boards/vip${query}`);
  await page.waitForFunction((code) => document.body.dataset.access === code, code, { timeout: WAIT });
  assert.equal(await page.isVisible('#access'), true);
  assert.match(await page.textContent('#access'), text);
  assert.equal(await page.getAttribute('#status', 'data-state'), 'offline');
  assert.equal(await page.locator('#rows tr[data-player]').count(), 0, 'nothing of the board shown');
  assert.deepEqual(page.errors, [], 'no uncaught page errors');
  return page;
}

test('private board over SSE: the token of the URL shows the live ranking', { timeout: 60_000 }, async () => {
  await withServer((server) => watchesLive(server, `?transport=sse&token=${mint(['board:vip'])}`, 'sse'));
});

test('private board over WebSocket: the token goes in-band, the ranking is live', { timeout: 60_000 }, async () => {
  await withServer((server) => watchesLive(server, `?token=${mint(['board:vip*'])}`, 'ws'));
});

test('private board without a token: the page says it is private, over SSE', { timeout: 60_000 }, async () => {
  await withServer(async (server) => {
    await postScores(server.baseURL, 'vip', { player: 'p1', score: 1 });
    const page = await refusedWith(server, '?transport=sse', 'token_required', /private/);
    await page.context().close();
  });
});

test('private board without a token: the page says it is private (WebSocket first)', { timeout: 60_000 }, async (t) => {
  await withServer(async (server) => {
    const status = await wsHandshakeStatus(server);
    if (status === 101) {
      t.skip('this build does not check tokens at the WebSocket handshake yet');
      return;
    }
    assert.equal(status, 401);
    await postScores(server.baseURL, 'vip', { player: 'p1', score: 1 });
    const page = await refusedWith(server, '', 'token_required', /private/);
    await page.context().close();
  });
});

test('a token for another board: the page says it does not allow this one', { timeout: 60_000 }, async () => {
  await withServer(async (server) => {
    const page = await refusedWith(
      server,
      `?transport=sse&token=${mint(['board:other'])}`,
      'topic_forbidden',
      /does not allow/,
    );
    await page.context().close();
  });
});

/** Watches with a token that expires 3 s from now and waits for the page to say so. */
async function expiresWhileWatching(server, query, transport) {
  await postScores(server.baseURL, 'vip', { player: 'p1', score: 1 });
  const page = await newPage();
  // `exp` has whole seconds: 3 s ahead leaves 2-3 s of a live board, then the server ends
  // the connection, and the reconnect with the same token is refused.
  await page.goto(`${server.baseURL}/boards/vip?token=${mint(['board:vip'], 3)}${query}`);
  await page
    .locator(`#status[data-state="live"][data-transport="${transport}"]`)
    .waitFor({ state: 'attached', timeout: WAIT });
  await page.waitForFunction(() => document.body.dataset.access === 'token_expired', null, { timeout: WAIT });
  assert.match(await page.textContent('#access'), /expired/);
  assert.equal(await page.getAttribute('#status', 'data-state'), 'offline');
  assert.deepEqual(page.errors, [], 'no uncaught page errors');
  await page.context().close();
}

test('a token that expires while watching: the page says so and stops (SSE)', { timeout: 60_000 }, async () => {
  await withServer((server) => expiresWhileWatching(server, '&transport=sse', 'sse'));
});

test('a token that expires while watching: the page says so and stops (WebSocket)', { timeout: 60_000 }, async (t) => {
  await withServer(async (server) => {
    if ((await wsHandshakeStatus(server)) === 101) {
      t.skip('this build does not check tokens on WebSocket yet');
      return;
    }
    await expiresWhileWatching(server, '', 'ws');
  });
});
