// What tripped up a new user of the npm package in Node (issue 31): a script
// that does not exit after close(), a crash on close() right after
// connect(), and a status that reads healthy after the server refused the
// token or the database. Against the real server on 127.0.0.1.
import assert from 'node:assert/strict';
import { spawn } from 'node:child_process';
import { after, before, describe, it } from 'node:test';
import { configureStore } from '@reduxjs/toolkit';
import { SignJWT } from 'jose';
import WebSocket from 'ws';
import { Syncline } from '../dist/node.js';
import { synclineMiddleware, synclineReducer, synclineStatusReducer } from '../dist/redux.js';
import { Server } from './harness.mjs';

const T = { timeout: 60_000 };
const SECRET = 'first-hour-e2e-secret-0123456789abcdef-0123';
const DIST = new URL('../dist/node.js', import.meta.url).href;
const WS = new URL('../node_modules/ws/index.js', import.meta.url).href;

/**
 * Run `body` as a Node script (the client is `c`, connected to `url` with the
 * ws package) and resolve `{ code, stderr, exitMs }`: how long the process
 * lived after printing `closed`. Killed (and so failing) after 30 s.
 */
function script(url, body) {
  const src = `
    import WebSocket from ${JSON.stringify(WS)};
    import { Syncline } from ${JSON.stringify(DIST)};
    const c = await Syncline.connect(${JSON.stringify(url)}, { storage: 'memory', WebSocket });
    ${body}
    console.log('closed');
  `;
  return new Promise((ok) => {
    const p = spawn(process.execPath, ['--input-type=module', '-e', src], { stdio: ['ignore', 'pipe', 'pipe'] });
    let closedAt = null;
    let stderr = '';
    const kill = setTimeout(() => p.kill('SIGKILL'), 30_000);
    p.stdout.on('data', (d) => {
      if (String(d).includes('closed')) closedAt ??= Date.now();
    });
    p.stderr.on('data', (d) => (stderr += d));
    p.on('exit', (code, signal) => {
      clearTimeout(kill);
      ok({ code: code ?? signal, stderr, exitMs: closedAt === null ? null : Date.now() - closedAt });
    });
  });
}

function hs256(claims, secret = SECRET) {
  return new SignJWT(claims)
    .setProtectedHeader({ alg: 'HS256' })
    .setIssuedAt()
    .setExpirationTime('1h')
    .sign(new TextEncoder().encode(secret));
}

/** Resolve once `read()` equals `want`, checked on each `on(cb)` event; bounded. */
function until(on, read, want, ms = 20_000) {
  return new Promise((ok, fail) => {
    if (read() === want) return ok();
    let off = () => {};
    const timer = setTimeout(() => (off(), fail(new Error(`still ${read()}, not ${want}`))), ms);
    off = on(() => {
      if (read() === want) {
        clearTimeout(timer);
        off();
        ok();
      }
    });
  });
}

describe('the npm package in Node: exit, close, refusals', () => {
  let server;
  before(async () => {
    server = await new Server(['--secret', SECRET, '--anonymous', 'node*']).start();
  });
  after(() => server?.dispose());

  it('a script exits on its own right after close(), with or without a database', T, async () => {
    // The heartbeat's and the catch-up's timers used to hold the event loop
    // for up to 15 s after close(). Exiting takes milliseconds; 5 s is a
    // bound far above that and far below the timers.
    const synced = await script(
      server.url,
      `await new Promise((ok) => c.onStatus((s) => s === 'online' && ok()));
       const db = await c.open('node-exit');
       await db.put('a', { x: 1 });
       await db.whenSynced();
       await c.close();`,
    );
    assert.equal(synced.code, 0, synced.stderr);
    assert.ok(synced.exitMs < 5_000, `exited ${synced.exitMs} ms after close()`);
    const bare = await script(server.url, `await new Promise((ok) => c.onStatus((s) => s === 'online' && ok())); await c.close();`);
    assert.equal(bare.code, 0, bare.stderr);
    assert.ok(bare.exitMs < 5_000, `exited ${bare.exitMs} ms after close()`);
  });

  it('close() straight after connect() does not crash the process', T, async () => {
    const r = await script(server.url, 'await c.close();');
    assert.equal(r.code, 0, r.stderr);
    assert.doesNotMatch(r.stderr, /Unhandled|Error/);
  });

  it('a database the token may not write reads refused, with the reason, and stays so', T, async () => {
    const token = await hs256({ sub: 'reader', grants: [{ db: 'org-*', rights: 'read' }] });
    const c = await Syncline.connect(server.url, { storage: 'memory', WebSocket, token });
    try {
      const db = await c.open('org-42');
      await db.whenSynced();
      assert.equal(db.status, 'synced');
      const seen = [];
      db.onStatus((s) => seen.push(s));
      await db.put('doc', { by: 'reader' }); // applied locally
      await until((cb) => db.onStatus(cb), () => db.status, 'refused');
      assert.equal(db.refusal?.code, 'Forbidden');
      assert.equal(db.refusal?.db, 'org-42');
      assert.equal(db.pending, 1);
      assert.equal(c.status, 'online'); // the connection itself is fine
      assert.equal(seen.at(-1), 'refused');
      // A reconnection asks again and is refused again: still refused.
      c.goOffline();
      assert.equal(db.status, 'refused');
      c.goOnline();
      await until((cb) => c.onStatus(cb), () => c.status, 'online');
      await assert.rejects(db.whenSynced(), (e) => e.code === 'Forbidden');
      assert.equal(db.status, 'refused');
      assert.deepEqual(db.get('doc'), { by: 'reader' });
    } finally {
      await c.close();
    }
  });

  it('the Redux status of a database the token may not write reads refused', T, async () => {
    const token = await hs256({ sub: 'reader', grants: [{ db: 'org-*', rights: 'read' }] });
    const c = await Syncline.connect(server.url, { storage: 'memory', WebSocket, token });
    try {
      const db = await c.open('org-redux');
      const add = (state = {}, action) => (action.type === 'add' ? { ...state, [action.id]: { v: 1 } } : state);
      const store = configureStore({
        reducer: { docs: synclineReducer('docs', add), status: synclineStatusReducer('docs') },
        middleware: (defaults) => defaults().concat(synclineMiddleware(db, { slice: 'docs', onError: () => {} })),
      });
      await db.whenSynced();
      await until((cb) => store.subscribe(cb), () => store.getState().status, 'synced');
      store.dispatch({ type: 'add', id: 'x' });
      await until((cb) => store.subscribe(cb), () => store.getState().status, 'refused');
      assert.equal(db.refusal?.code, 'Forbidden');
    } finally {
      await c.close();
    }
  });

  it('a database the token may not read reads refused', T, async () => {
    const token = await hs256({ sub: 'x', grants: [{ db: 'user-1', rights: 'write' }] });
    const c = await Syncline.connect(server.url, { storage: 'memory', WebSocket, token });
    try {
      const db = await c.open('org-7');
      await assert.rejects(db.whenSynced(), (e) => e.code === 'Forbidden');
      assert.equal(db.status, 'refused');
      assert.equal(db.refusal?.code, 'Forbidden');
      const mine = await c.open('user-1');
      await mine.whenSynced();
      assert.equal(mine.status, 'synced');
      assert.equal(mine.refusal, undefined);
    } finally {
      await c.close();
    }
  });

  it('two offline edits of one string merge (strings are text); atomic keys keep one whole value', T, async () => {
    const a = await Syncline.connect(server.url, { storage: 'memory', WebSocket });
    const b = await Syncline.connect(server.url, { storage: 'memory', WebSocket });
    try {
      const [da, dbb] = [await a.open('node-strings'), await b.open('node-strings')];
      await da.put('t', { title: 'buy milk', status: 'todo' }, { atomic: ['status'] });
      await da.whenSynced();
      await until((cb) => dbb.subscribe(cb), () => dbb.get('t')?.title, 'buy milk');
      a.goOffline();
      b.goOffline();
      await da.put('t', { title: 'buy oat milk', status: 'done' }, { atomic: ['status'] });
      await dbb.update('t', (d) => ({ ...d, title: 'buy milk today', status: 'doing' }), { atomic: ['status'] });
      a.goOnline();
      b.goOnline();
      await Promise.all([da.whenSynced(), dbb.whenSynced()]);
      const merged = (db) => until((cb) => db.subscribe(cb), () => db.get('t')?.title, 'buy oat milk today');
      await Promise.all([merged(da), merged(dbb)]);
      const status = da.get('t').status;
      assert.ok(status === 'done' || status === 'doing', status);
      await until((cb) => dbb.subscribe(cb), () => dbb.get('t')?.status, status);
    } finally {
      await a.close();
      await b.close();
    }
  });

  it('a refused token leaves the client refused (not connecting), with the reason', T, async () => {
    const token = await hs256({ sub: 'x', grants: [{ db: 'org-*', rights: 'read' }] }, 'a-different-secret-0123456789abcdef-0123');
    const c = await Syncline.connect(server.url, { storage: 'memory', WebSocket, token });
    try {
      const statuses = [];
      c.onStatus((s) => statuses.push(s));
      const db = await c.open('org-1');
      await until((cb) => c.onStatus(cb), () => c.status, 'refused');
      assert.equal(c.refusal?.code, 'Unauthorized');
      assert.equal(db.status, 'refused');
      assert.equal(db.refusal?.code, 'Unauthorized');
      assert.equal(statuses.at(-1), 'refused');
      await assert.rejects(db.whenSynced(), (e) => e.code === 'Unauthorized');
    } finally {
      await c.close();
    }
  });
});
