// Test harness: the real `syncline serve` binary, a static server for the
// test page, and headless Chromium through playwright-core.
import { spawn } from 'node:child_process';
import { createReadStream, existsSync, mkdtempSync, rmSync, statSync } from 'node:fs';
import { createServer } from 'node:http';
import { tmpdir } from 'node:os';
import { extname, join, normalize, resolve } from 'node:path';
import { createInterface } from 'node:readline';
import { fileURLToPath } from 'node:url';
import { chromium } from 'playwright-core';

const here = fileURLToPath(new URL('.', import.meta.url));
const pkg = resolve(here, '..');
export const BIN = process.env.SYNCLINE_BIN ?? resolve(pkg, '../target/debug/syncline');
/** The README's main command, serving what its last run built (no rebuild). */
export const DEMO = [resolve(pkg, '../scripts/demo'), '--no-build'];

/**
 * A running `syncline serve`; `restart()` brings it back on the same port and
 * data. `command` replaces `[BIN, 'serve']`, e.g. `DEMO`.
 */
export class Server {
  constructor(args = [], { command = [BIN, 'serve'] } = {}) {
    this.data = mkdtempSync(join(tmpdir(), 'syncline-e2e-data-'));
    this.command = command;
    this.args = args;
    this.port = 0;
    this.proc = null;
  }

  async start() {
    const [program, ...first] = this.command;
    const proc = spawn(
      program,
      [...first, '--listen', `127.0.0.1:${this.port}`, '--data', this.data, ...this.args],
      { stdio: ['ignore', 'pipe', 'inherit'], env: { ...process.env, RUST_LOG: process.env.RUST_LOG ?? 'warn' } },
    );
    this.proc = proc;
    const lines = createInterface({ input: proc.stdout });
    const addr = await new Promise((ok, fail) => {
      const timer = setTimeout(() => fail(new Error('server did not start in 20 s')), 20_000);
      proc.once('exit', (code) => fail(new Error(`server exited with ${code}`)));
      lines.on('line', (line) => {
        const m = /^listening on https?:\/\/(.+)$/.exec(line.trim());
        if (m) {
          clearTimeout(timer);
          ok(m[1]);
        }
      });
    });
    this.port = Number(addr.split(':').pop());
    this.url = `ws://127.0.0.1:${this.port}/sync`;
    return this;
  }

  /** Stop: SIGTERM (graceful) or SIGKILL (a crash). */
  async stop(signal = 'SIGTERM') {
    const proc = this.proc;
    if (!proc || proc.exitCode !== null) return;
    const exited = new Promise((ok) => proc.once('exit', ok));
    proc.kill(signal);
    await exited;
    this.proc = null;
  }

  async restart(signal = 'SIGTERM') {
    await this.stop(signal);
    return this.start();
  }

  async dispose() {
    await this.stop('SIGKILL');
    rmSync(this.data, { recursive: true, force: true });
  }

  /** Run a CLI subcommand against this server's data or secret. */
  cli(args) {
    return new Promise((ok, fail) => {
      const p = spawn(BIN, args, { stdio: ['ignore', 'pipe', 'inherit'] });
      let out = '';
      p.stdout.on('data', (d) => (out += d));
      p.on('exit', (code) => (code === 0 ? ok(out.trim()) : fail(new Error(`${args.join(' ')}: exit ${code}`))));
    });
  }
}

const TYPES = { '.html': 'text/html', '.js': 'text/javascript', '.wasm': 'application/wasm', '.map': 'application/json' };

/** Serve the package directory (dist/, wasm/, e2e/page.html) on 127.0.0.1. */
export async function startStatic() {
  const server = createServer((req, res) => {
    const path = normalize(decodeURIComponent(new URL(req.url, 'http://x').pathname));
    const file = join(pkg, path === '/' ? 'e2e/page.html' : path);
    if (!file.startsWith(pkg) || !existsSync(file) || !statSync(file).isFile()) {
      res.writeHead(404).end();
      return;
    }
    res.writeHead(200, { 'content-type': TYPES[extname(file)] ?? 'application/octet-stream' });
    createReadStream(file).pipe(res);
  });
  await new Promise((ok) => server.listen(0, '127.0.0.1', ok));
  return { url: `http://127.0.0.1:${server.address().port}/`, close: () => new Promise((ok) => server.close(ok)) };
}

const ARGS = [
  '--headless',
  '--no-sandbox',
  '--disable-gpu',
  '--disable-quic',
  '--no-first-run',
  '--disable-background-networking',
  '--disable-component-update',
  '--disable-sync',
];

/** A browser profile of its own (its own IndexedDB): one "user". */
export async function newUser({ viewport, args = [] } = {}) {
  const dir = mkdtempSync(join(tmpdir(), 'syncline-e2e-profile-'));
  const context = await chromium.launchPersistentContext(dir, {
    executablePath: process.env.CHROMIUM ?? '/usr/bin/chromium',
    headless: true,
    args: [...ARGS, ...args],
    ...(viewport ? { viewport } : {}),
  });
  const errors = [];
  context.on('weberror', (e) => errors.push(String(e.error())));
  return {
    context,
    errors,
    /** Open `url`; resolves once `ready()` holds in the page. */
    async page(url, ready = () => window.ready === true) {
      const page = await context.newPage();
      page.on('pageerror', (e) => errors.push(String(e)));
      if (process.env.E2E_CONSOLE) page.on('console', (m) => console.log('[page]', m.text()));
      page.on('crash', () => errors.push('page crashed'));
      await page.goto(url);
      await page.waitForFunction(ready, null, { timeout: 20_000 });
      return page;
    },
    async close() {
      await context.close();
      rmSync(dir, { recursive: true, force: true });
    },
  };
}

/** Wait until `fn(arg)` is truthy in the page. */
export function until(page, fn, arg, timeout = 20_000) {
  return page.waitForFunction(fn, arg, { timeout, polling: 50 });
}

/**
 * Chromium on the profile directory `dir`, started by us in a process group
 * of its own so that `kill()` can SIGKILL all of it at once (a crash or a
 * power cut as the browser sees it: no graceful close, no flush). Playwright
 * drives it over CDP.
 */
export async function killableBrowser(dir) {
  const proc = spawn(
    process.env.CHROMIUM ?? '/usr/bin/chromium',
    [...ARGS, `--user-data-dir=${dir}`, '--remote-debugging-port=0', 'about:blank'],
    { detached: true, stdio: ['ignore', 'ignore', 'pipe'] },
  );
  const exited = new Promise((ok) => proc.once('exit', ok));
  const endpoint = await new Promise((ok, fail) => {
    const timer = setTimeout(() => fail(new Error('chromium printed no DevTools endpoint in 20 s')), 20_000);
    proc.once('exit', (code) => fail(new Error(`chromium exited with ${code} before listening`)));
    createInterface({ input: proc.stderr }).on('line', (line) => {
      const m = /^DevTools listening on (ws:\/\/\S+)/.exec(line.trim());
      if (m) {
        clearTimeout(timer);
        ok(m[1]);
      }
    });
  });
  const browser = await chromium.connectOverCDP(endpoint);
  const context = browser.contexts()[0];
  const errors = [];
  return {
    context,
    errors,
    pid: proc.pid,
    async page(url, ready = () => window.ready === true) {
      const page = await context.newPage();
      page.on('pageerror', (e) => errors.push(String(e)));
      if (process.env.E2E_CONSOLE) page.on('console', (m) => console.log('[page]', m.text()));
      await page.goto(url);
      await page.waitForFunction(ready, null, { timeout: 20_000 });
      return page;
    },
    /** SIGKILL the whole process group (idempotent); resolves once the browser process is gone. */
    async kill() {
      if (proc.exitCode === null && proc.signalCode === null) {
        try {
          process.kill(-proc.pid, 'SIGKILL');
        } catch (e) {
          if (e.code !== 'ESRCH') throw e;
        }
      }
      await exited;
      await browser.close().catch(() => {});
    },
  };
}
