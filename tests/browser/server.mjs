// Helpers for the browser end-to-end tests: start and stop a crier server, talk to its API,
// launch Debian's chromium through playwright-core (never a downloaded browser).
import { spawn } from 'node:child_process';
import { mkdtemp, rm } from 'node:fs/promises';
import { existsSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join, resolve, dirname } from 'node:path';
import { fileURLToPath } from 'node:url';

const repoRoot = resolve(dirname(fileURLToPath(import.meta.url)), '..', '..');

/** The crier binary: `$CRIER_BIN`, else `target/debug/crier` of this repository. */
export const CRIER_BIN = process.env.CRIER_BIN || join(repoRoot, 'target', 'debug', 'crier');

export const CHROMIUM_ARGS = [
  '--no-sandbox',
  '--disable-gpu',
  '--disable-quic',
  '--no-first-run',
  '--disable-background-networking',
  '--disable-component-update',
  '--disable-sync',
];

/** Launches the system chromium (`$CHROMIUM`, else /usr/bin/chromium), headless. */
export async function launchBrowser() {
  const { chromium } = await import('playwright-core');
  const executablePath = process.env.CHROMIUM || '/usr/bin/chromium';
  if (!existsSync(executablePath)) {
    throw new Error(`no chromium at ${executablePath} (apt-get install chromium, or set CHROMIUM)`);
  }
  return chromium.launch({ executablePath, args: CHROMIUM_ARGS, timeout: 30_000 });
}

const live = new Set(); // every server process started, killed on exit whatever happens
process.on('exit', () => {
  for (const child of live) {
    try {
      child.kill('SIGKILL');
    } catch {}
  }
});

const LISTENING = /listening on (https?):\/\/127\.0\.0\.1:(\d+)/;
// eslint-disable-next-line no-control-regex
const ANSI = /\x1b\[[0-9;]*m/g;

/**
 * Starts `crier serve --listen 127.0.0.1:{port} --data-dir {dataDir}` and resolves once it
 * printed its `listening on http://127.0.0.1:PORT` line. `port` 0 (default) picks a free
 * port; `dataDir` defaults to a fresh temporary directory (removed by `stop()`, unless it
 * was given). Restarting on a port just freed may race its release: `bindRetries` more
 * tries are made when the process exits before listening. `args` are more `serve` flags.
 */
export async function startServer({ port = 0, dataDir, timeoutMs = 20_000, bindRetries = 5, args = [] } = {}) {
  if (!existsSync(CRIER_BIN)) {
    throw new Error(`no crier binary at ${CRIER_BIN}: run \`cargo build\` first (or set CRIER_BIN)`);
  }
  const ownDir = !dataDir;
  const dir = dataDir ?? (await mkdtemp(join(tmpdir(), 'crier-e2e-')));
  let lastError;
  for (let attempt = 0; attempt <= bindRetries; attempt++) {
    try {
      const server = await spawnOnce(port, dir, timeoutMs, args);
      server.ownDir = ownDir;
      return server;
    } catch (e) {
      lastError = e;
      if (!e.exitedEarly || port === 0) break;
      await new Promise((r) => setTimeout(r, 200 * (attempt + 1))); // bounded retry of a bind race
    }
  }
  if (ownDir) await rm(dir, { recursive: true, force: true });
  throw lastError;
}

function spawnOnce(port, dataDir, timeoutMs, extra = []) {
  const args = ['serve', '--listen', `127.0.0.1:${port}`, '--data-dir', dataDir, ...extra];
  const child = spawn(CRIER_BIN, args, {
    stdio: ['ignore', 'pipe', 'pipe'],
    env: { RUST_LOG: 'info', ...process.env, NO_COLOR: '1' },
  });
  live.add(child);
  const log = [];
  const exited = new Promise((r) => child.once('exit', (code, signal) => r({ code, signal })));
  exited.then(() => live.delete(child));

  return new Promise((resolveStart, rejectStart) => {
    let settled = false;
    const settle = (fn, v) => {
      if (settled) return;
      settled = true;
      clearTimeout(timer);
      fn(v);
    };
    const onData = (stream) => {
      let buf = '';
      stream.setEncoding('utf8');
      stream.on('data', (chunk) => {
        buf += chunk;
        let nl;
        while ((nl = buf.indexOf('\n')) >= 0) {
          const line = buf.slice(0, nl).replace(ANSI, '');
          buf = buf.slice(nl + 1);
          log.push(line);
          if (log.length > 200) log.shift();
          if (process.env.CRIER_E2E_LOG) process.stderr.write(`[crier ${child.pid}] ${line}\n`);
          const m = line.match(LISTENING);
          if (m) settle(resolveStart, makeServer(child, Number(m[2]), dataDir, log, exited, m[1]));
        }
      });
    };
    onData(child.stdout);
    onData(child.stderr);
    const timer = setTimeout(() => {
      child.kill('SIGKILL');
      settle(rejectStart, new Error(`crier did not print its listening line within ${timeoutMs} ms:\n${log.join('\n')}`));
    }, timeoutMs);
    child.once('error', (e) => settle(rejectStart, new Error(`cannot start ${CRIER_BIN}: ${e.message}`)));
    exited.then(({ code, signal }) => {
      const e = new Error(
        `crier exited (code ${code}, signal ${signal}) before listening; ${CRIER_BIN} ${args.join(' ')}\n${log.join('\n')}`,
      );
      e.exitedEarly = true;
      settle(rejectStart, e);
    });
  });
}

function makeServer(child, port, dataDir, log, exited, scheme = 'http') {
  // A TLS server's certificate names localhost (tls.test.mjs).
  const baseURL = scheme === 'https' ? `https://localhost:${port}` : `http://127.0.0.1:${port}`;
  return {
    child,
    port,
    dataDir,
    baseURL,
    log,
    ownDir: false,
    exited,
    /** Sends `signal` and waits (bounded) for the process to be gone. */
    async kill(signal = 'SIGKILL', timeoutMs = 10_000) {
      if (child.exitCode === null && child.signalCode === null) child.kill(signal);
      const gone = await Promise.race([exited.then(() => true), delay(timeoutMs).then(() => false)]);
      if (!gone) {
        child.kill('SIGKILL');
        await Promise.race([exited, delay(5_000)]);
      }
    },
    /** Kills the server (gracefully first) and removes its data dir when it made it. */
    async stop() {
      await this.kill('SIGTERM', 5_000);
      if (this.ownDir) await rm(dataDir, { recursive: true, force: true });
    },
  };
}

const delay = (ms) => new Promise((r) => setTimeout(r, ms));

/** JSON request to the server with a timeout; throws on a non-2xx answer. */
export async function api(baseURL, method, path, body, timeoutMs = 10_000) {
  const res = await fetch(baseURL + path, {
    method,
    // Every write needs this content type, a body-less one (reset) too.
    headers: method === 'GET' ? {} : { 'content-type': 'application/json' },
    body: body === undefined ? undefined : JSON.stringify(body),
    signal: AbortSignal.timeout(timeoutMs),
  });
  const text = await res.text();
  if (!res.ok) throw new Error(`${method} ${path}: HTTP ${res.status} ${text}`);
  return text ? JSON.parse(text) : null;
}

/** POSTs one score or an array of scores to a board. */
export const postScores = (baseURL, board, scores) =>
  api(baseURL, 'POST', `/api/boards/${encodeURIComponent(board)}/scores`, scores);
