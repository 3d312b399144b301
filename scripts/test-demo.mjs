// The README's main command, run as a newcomer runs it: `scripts/demo`
// installs what is missing, builds, and serves (here on an ephemeral port,
// with a throw-away data dir). Then: /healthz answers, /todo/ and
// /tictactoe/ load in headless Chromium, a todo added in the page is read
// back with `syncline list` and `syncline get`, and SIGTERM stops the
// server cleanly.
//
//   node scripts/test-demo.mjs
//
// Imports only Node built-ins until the demo has built, because on a fresh
// clone the browser driver (playwright-core, in js/node_modules) is one of
// the things `scripts/demo` installs.
import assert from 'node:assert/strict';
import { execFile, spawn } from 'node:child_process';
import { mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join, resolve } from 'node:path';
import { createInterface } from 'node:readline';
import { fileURLToPath } from 'node:url';
import { promisify } from 'node:util';

const root = resolve(fileURLToPath(new URL('.', import.meta.url)), '..');
// A first run compiles the wasm-bindgen CLI, the wasm and the release server.
const BUILD_LIMIT_MS = 45 * 60_000;
const STEP_MS = 30_000;

const data = mkdtempSync(join(tmpdir(), 'syncline-demo-smoke-'));
const started = Date.now();
const demo = spawn(join(root, 'scripts/demo'), ['--listen', '127.0.0.1:0', '--data', data], {
  cwd: root,
  stdio: ['ignore', 'pipe', 'inherit'],
});
const exited = new Promise((ok) => demo.once('exit', (code, signal) => ok({ code, signal })));
let user;
try {
  const addr = await new Promise((ok, fail) => {
    const timer = setTimeout(() => fail(new Error('scripts/demo did not start serving in 45 min')), BUILD_LIMIT_MS);
    exited.then(({ code, signal }) => fail(new Error(`scripts/demo exited (${code ?? signal}) before serving`)));
    createInterface({ input: demo.stdout }).on('line', (line) => {
      console.log(line);
      const m = /^listening on http:\/\/(\S+)$/.exec(line.trim());
      if (m) {
        clearTimeout(timer);
        ok(m[1]);
      }
    });
  });
  const base = `http://${addr}`;
  console.log(`\nscripts/demo served on ${base} after ${((Date.now() - started) / 1000).toFixed(0)} s`);

  const health = await fetch(`${base}/healthz`, { signal: AbortSignal.timeout(STEP_MS) });
  assert.equal(health.status, 200, '/healthz');
  const index = await fetch(`${base}/`, { signal: AbortSignal.timeout(STEP_MS) }).then((r) => r.text());
  assert.match(index, /href="todo\/"/, 'the index links the demos');

  const { newUser, until } = await import('../js/e2e/harness.mjs');
  user = await newUser();
  const list = `smoke-${process.pid}`;
  const title = `added by the smoke test ${started}`;
  const todo = await user.page(`${base}/todo/?list=${list}`, () => !!window.syncline);
  await todo.locator('.new-todo').fill(title);
  await todo.locator('.new-todo').press('Enter');
  await until(todo, () => document.querySelector('[data-testid=status]')?.dataset.status === 'synced', null, STEP_MS);

  // Read it back as another client would: the release CLI scripts/demo built.
  const cli = (...args) =>
    promisify(execFile)(join(root, 'target/release/syncline'), [...args, '--url', `ws://${addr}/sync`], {
      timeout: STEP_MS,
      // Its replica beside the server's data, not in the user's config directory.
      env: { ...process.env, SYNCLINE_CLI_DIR: join(data, 'cli') },
    }).then((r) => r.stdout.trim());
  const ids = (await cli('list', `todo-${list}`)).split('\n');
  assert.equal(ids.length, 1, `one document in todo-${list}: ${ids}`);
  const doc = JSON.parse(await cli('get', `todo-${list}`, ids[0]));
  assert.equal(doc.title, title);
  assert.equal(doc.completed, false);

  const ttt = await user.page(`${base}/tictactoe/`, () => !!window.syncline);
  await until(ttt, () => document.querySelector('[data-testid=status]')?.dataset.status === 'synced', null, STEP_MS);
  assert.ok(await ttt.locator('[data-testid=create]').isVisible(), 'the tic-tac-toe lobby shows');
  assert.deepEqual(user.errors, []);

  demo.kill('SIGTERM');
  const { code } = await exited;
  assert.equal(code, 0, 'the server stops cleanly on SIGTERM');
  console.log('scripts/demo: served both demos; a todo added in the page was read back with `syncline get`');
} finally {
  await user?.close();
  if (demo.exitCode === null && demo.signalCode === null) demo.kill('SIGKILL');
  rmSync(data, { recursive: true, force: true });
}
