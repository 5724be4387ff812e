// Hostile pages in a real browser (issue 6, items 4 and 8): another site's page tries to
// write through the visitor's browser (form posts, no-cors and CORS fetches), and a
// DNS-rebinding page tries crier's own endpoints under its own name. Chromium maps the
// attacker's names to 127.0.0.1 (--host-resolver-rules), so no traffic leaves loopback.
//
//   cargo build && (cd tests/browser && npm ci) && node --test tests/browser/
import { test, before, after } from 'node:test';
import assert from 'node:assert/strict';
import { createServer } from 'node:http';
import { chromium } from 'playwright-core';
import { CHROMIUM_ARGS, startServer, api } from './server.mjs';

const WAIT = 15_000;

let browser;
before(async () => {
  browser = await chromium.launch({
    executablePath: process.env.CHROMIUM || '/usr/bin/chromium',
    args: [...CHROMIUM_ARGS, '--host-resolver-rules=MAP evil.example 127.0.0.1'],
    timeout: 30_000,
  });
});
after(async () => {
  await browser?.close();
});

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

/** The attacker's site: an empty page on its own port, reached as http://evil.example:PORT. */
async function attackerSite() {
  const site = createServer((_, res) => {
    res.writeHead(200, { 'content-type': 'text/html' });
    res.end('<!doctype html><title>cute cats</title><iframe name="sink"></iframe>');
  });
  await new Promise((r) => site.listen(0, '127.0.0.1', r));
  return { site, url: `http://evil.example:${site.address().port}/` };
}

async function newPage() {
  const context = await browser.newContext();
  const page = await context.newPage();
  page.setDefaultTimeout(WAIT);
  return page;
}

/** The next publication on `topic` gets offset 1 only if nothing was published before. */
async function assertNothingPublished(server, topic) {
  const r = await api(server.baseURL, 'POST', `/api/publish/${topic}`, { legit: true });
  assert.equal(r.offset, 1, `something was published on ${topic} before the legit message`);
}

test('another site cannot write through the browser (forms, no-cors, CORS)', { timeout: 60_000 }, async () => {
  await withServer(async (server) => {
    await api(server.baseURL, 'PUT', '/api/boards/arena', { top: 5 });
    await api(server.baseURL, 'POST', '/api/boards/arena/scores', { player: 'ann', score: 7 });
    const { site, url } = await attackerSite();
    try {
      const page = await newPage();
      await page.goto(url);
      const crier = server.baseURL;
      const outcome = await page.evaluate(async (crier) => {
        const out = {};
        // no-cors fetches: the browser sends them (text/plain), the page cannot read the answer.
        const noCors = (path, body) =>
          fetch(crier + path, { method: 'POST', mode: 'no-cors', body, headers: { 'content-type': 'application/json' } })
            .then((r) => r.type)
            .catch((e) => 'error: ' + e);
        out.noCorsPublish = await noCors('/api/publish/t', '{"pwned":1}');
        out.noCorsScore = await noCors('/api/boards/arena/scores', '{"player":"mallory","score":1e9}');
        out.noCorsReset = await noCors('/api/boards/arena/reset', '');
        // A CORS fetch with the JSON content type needs a preflight, which crier never grants.
        out.cors = await fetch(crier + '/api/publish/t', {
          method: 'POST',
          headers: { 'content-type': 'application/json' },
          body: '{"pwned":2}',
        })
          .then((r) => 'status ' + r.status)
          .catch(() => 'blocked');
        // The classic JSON CSRF: a text/plain form whose one field spells a JSON object.
        const submit = (action, enctype, name, value) =>
          new Promise((resolve) => {
            const sink = document.querySelector('iframe[name=sink]');
            sink.onload = () => resolve('loaded');
            const form = document.createElement('form');
            Object.assign(form, { action: crier + action, method: 'POST', enctype, target: 'sink' });
            const input = document.createElement('input');
            Object.assign(input, { name, value, type: 'hidden' });
            form.append(input);
            document.body.append(form);
            form.submit();
          });
        out.formScore = await submit('/api/boards/arena/scores', 'text/plain', '{"player":"mallory","score":1e9,"x":"', '"}');
        out.formPublish = await submit('/api/publish/t', 'text/plain', '{"pwned":3,"x":"', '"}');
        out.formReset = await submit('/api/boards/arena/reset', 'application/x-www-form-urlencoded', 'a', 'b');
        return out;
      }, crier);
      // The requests reached crier and were answered (opaque responses, loaded frames)...
      assert.deepEqual(outcome, {
        noCorsPublish: 'opaque',
        noCorsScore: 'opaque',
        noCorsReset: 'opaque',
        cors: 'blocked',
        formScore: 'loaded',
        formPublish: 'loaded',
        formReset: 'loaded',
      });
      // ...and changed nothing.
      await assertNothingPublished(server, 't');
      const board = await api(server.baseURL, 'GET', '/api/boards/arena');
      assert.equal(board.players, 1, 'no score added, no reset');
      assert.equal(board.entries[0].player, 'ann');
    } finally {
      site.close();
    }
  });
});

/** From inside a page: can it open a WebSocket, an EventSource, and publish? */
const probe = (page) =>
  page.evaluate(async () => {
    const ws = await new Promise((resolve) => {
      const s = new WebSocket(`ws://${location.host}/ws?topic=probe`);
      s.onopen = () => {
        s.close();
        resolve('open');
      };
      s.onerror = () => resolve('refused');
    });
    const sse = await new Promise((resolve) => {
      const es = new EventSource('/sse?topic=probe');
      es.onopen = () => {
        es.close();
        resolve('open');
      };
      es.onerror = () => {
        es.close();
        resolve('refused');
      };
    });
    const r = await fetch('/api/publish/probe', {
      method: 'POST',
      headers: { 'content-type': 'application/json' },
      body: '{"from":"page"}',
    });
    const body = await r.json();
    return { ws, sse, publish: r.status, code: body.error?.code ?? null };
  });

test('a DNS-rebinding page can neither open a WebSocket nor write; by IP or localhost it can', { timeout: 60_000 }, async () => {
  await withServer(async (server) => {
    const page = await newPage();
    // crier's own page, but under the attacker's name: Origin and Host both say evil.example.
    await page.goto(`http://evil.example:${server.port}/`);
    // The page's own EventSource is a same-origin GET: the browser sends no Origin (and, on
    // plain http, no Sec-Fetch-Site), so nothing tells it from the real page. The documented
    // limit (docs/protocol.md, "Origins"): a rebinding page can read public topics over SSE,
    // but can neither open a WebSocket nor write.
    assert.deepEqual(await probe(page), { ws: 'refused', sse: 'open', publish: 403, code: 'origin_not_allowed' });
    await assertNothingPublished(server, 'probe');
    for (const host of ['127.0.0.1', 'localhost']) {
      await page.goto(`http://${host}:${server.port}/`);
      assert.deepEqual(await probe(page), { ws: 'open', sse: 'open', publish: 200, code: null }, host);
    }
  });
});
