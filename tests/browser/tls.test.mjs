// crier over TLS in real headless Chromium (issue 21): a test CA and a certificate for
// localhost made with openssl, the browser told to trust that certificate's key
// (--ignore-certificate-errors-spki-list, Chromium's switch for a locally trusted test
// certificate), and a page on https://localhost:PORT that opens a wss:// WebSocket and an
// EventSource on the same port and publishes with fetch. Each must receive the publication.
//
//   cargo build && (cd tests/browser && npm ci) && node --test tests/browser/tls.test.mjs
import { test, after } from 'node:test';
import assert from 'node:assert/strict';
import { execFileSync } from 'node:child_process';
import { mkdtempSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { CHROMIUM_ARGS, startServer } from './server.mjs';

const WAIT = 20_000;
const dir = mkdtempSync(join(tmpdir(), 'crier-tls-e2e-'));
after(() => rmSync(dir, { recursive: true, force: true }));

function openssl(...args) {
  return execFileSync('openssl', args, { cwd: dir, stdio: ['ignore', 'pipe', 'pipe'] });
}

/** A CA and a leaf for localhost and 127.0.0.1 signed by it; the leaf key's SPKI hash. */
function makeCertificate() {
  openssl('ecparam', '-name', 'prime256v1', '-genkey', '-noout', '-out', 'ca.key');
  openssl('req', '-x509', '-new', '-key', 'ca.key', '-subj', '/CN=crier browser test CA', '-days', '2', '-out', 'ca.pem');
  openssl('ecparam', '-name', 'prime256v1', '-genkey', '-noout', '-out', 'key.pem');
  openssl('req', '-new', '-key', 'key.pem', '-subj', '/CN=localhost', '-out', 'csr.pem');
  writeFileSync(join(dir, 'ext.cnf'), 'subjectAltName=DNS:localhost,IP:127.0.0.1\n');
  openssl('x509', '-req', '-in', 'csr.pem', '-CA', 'ca.pem', '-CAkey', 'ca.key', '-CAcreateserial', '-days', '2', '-extfile', 'ext.cnf', '-out', 'cert.pem');
  const spki = openssl('x509', '-in', 'cert.pem', '-noout', '-pubkey');
  const der = execFileSync('openssl', ['pkey', '-pubin', '-outform', 'der'], { input: spki });
  const hash = execFileSync('openssl', ['dgst', '-sha256', '-binary'], { input: der });
  return { cert: join(dir, 'cert.pem'), key: join(dir, 'key.pem'), spki: hash.toString('base64') };
}

test('a page over https gets publications over wss:// and an EventSource', async () => {
  const { cert, key, spki } = makeCertificate();
  const server = await startServer({ args: ['--tls-cert', cert, '--tls-key', key] });
  const { chromium } = await import('playwright-core');
  const browser = await chromium.launch({
    executablePath: process.env.CHROMIUM || '/usr/bin/chromium',
    args: [...CHROMIUM_ARGS, `--ignore-certificate-errors-spki-list=${spki}`],
    timeout: 30_000,
  });
  try {
    const page = await browser.newPage();
    const resp = await page.goto(`${server.baseURL}/healthz`);
    assert.equal(resp.status(), 200);
    assert.ok(server.baseURL.startsWith('https://'), server.baseURL);
    const got = await page.evaluate(async (wait) => {
      const timeout = (what) =>
        new Promise((_, reject) => setTimeout(() => reject(new Error(`no ${what}`)), wait));
      const ws = new WebSocket(`wss://${location.host}/ws?topic=tls`);
      const wsMessages = [];
      const wsAck = new Promise((resolve) =>
        ws.addEventListener('message', (e) => {
          const m = JSON.parse(e.data);
          wsMessages.push(m);
          if (m.op === 'subscribed') resolve();
        }),
      );
      const es = new EventSource('/sse?topic=tls');
      const esAck = new Promise((resolve) => es.addEventListener('subscribed', () => resolve()));
      await Promise.race([Promise.all([wsAck, esAck]), timeout('acknowledgements')]);
      const wsData = new Promise((resolve) =>
        ws.addEventListener('message', (e) => {
          const m = JSON.parse(e.data);
          if (m.data) resolve(m.data);
        }),
      );
      const esData = new Promise((resolve) =>
        es.addEventListener('message', (e) => resolve(JSON.parse(e.data).data)),
      );
      const r = await fetch('/api/publish/tls', {
        method: 'POST',
        headers: { 'content-type': 'application/json' },
        body: JSON.stringify({ n: 1 }),
      });
      const published = r.status;
      const [viaWs, viaSse] = await Promise.race([Promise.all([wsData, esData]), timeout('publication')]);
      ws.close();
      es.close();
      return { published, viaWs, viaSse, protocol: location.protocol };
    }, WAIT);
    assert.deepEqual(got, { published: 200, viaWs: { n: 1 }, viaSse: { n: 1 }, protocol: 'https:' });
  } finally {
    await browser.close();
    await server.stop();
  }
});
