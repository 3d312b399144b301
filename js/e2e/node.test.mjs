// End-to-end in Node: the npm package's Node entry against the real
// `syncline serve` binary on 127.0.0.1, connecting with the `ws` package's
// WebSocket through `options.WebSocket`.
import assert from 'node:assert/strict';
import { execFile } from 'node:child_process';
import { fileURLToPath } from 'node:url';
import { after, before, describe, it } from 'node:test';
import WebSocket from 'ws';
import { Syncline } from '../dist/node.js';
import { Server } from './harness.mjs';

const T = { timeout: 60_000 };

/** Resolve once `check()` holds, re-checked on each change of `db`; bounded. */
function whenChanged(db, check, ms = 20_000) {
  return new Promise((ok, fail) => {
    if (check()) return ok();
    const timer = setTimeout(() => (off(), fail(new Error('condition not reached in time'))), ms);
    const off = db.subscribe(() => {
      if (check()) {
        clearTimeout(timer);
        off();
        ok();
      }
    });
  });
}

/**
 * Run e2e/websocket-child.mjs in a child Node with `flags`; resolves with its
 * output, rejects (with its stderr) if it fails or takes over 30 s.
 */
function child(flags, mode, url) {
  const script = fileURLToPath(new URL('./websocket-child.mjs', import.meta.url));
  return new Promise((ok, fail) => {
    execFile(process.execPath, [...flags, script, mode, url], { timeout: 30_000 }, (err, stdout, stderr) => {
      if (err) fail(new Error(`node ${flags.join(' ')} websocket-child.mjs ${mode}: ${err.message}\n${stderr}`));
      else ok(stdout.trim());
    });
  });
}

describe('Node package against the real server', () => {
  let server;
  before(async () => {
    server = await new Server(['--anonymous', 'node*']).start();
  });
  after(() => server?.dispose());

  it('syncs live between two Node clients over the ws package', T, async () => {
    const a = await Syncline.connect(server.url, { storage: 'memory', WebSocket });
    const b = await Syncline.connect(server.url, { storage: 'memory', WebSocket });
    try {
      const [da, dbb] = [await a.open('node-1'), await b.open('node-1')];
      await da.put('t1', { title: 'milk' });
      await da.whenSynced();
      await whenChanged(dbb, () => dbb.get('t1')?.title === 'milk');
      await dbb.update('t1', (d) => void (d.title = 'eggs'));
      await whenChanged(da, () => da.get('t1')?.title === 'eggs');
      assert.equal(a.status, 'online');
      assert.equal(dbb.get('t1').title, 'eggs');
    } finally {
      await a.close();
      await b.close();
    }
  });

  it('refuses a WebSocket option that is not a class', T, async () => {
    await assert.rejects(Syncline.connect(server.url, { storage: 'memory', WebSocket: 42 }), (e) => e.code === 'Unsupported');
  });

  // Whether this Node has a global WebSocket (22+; 20 only with
  // --experimental-websocket), both cases are tested: this process's one
  // here, the other in a child Node run with the flag that gives it.
  const builtIn = typeof globalThis.WebSocket === 'function';

  it(`connects with the built-in WebSocket when there is one (${builtIn ? 'this process' : 'a child with --experimental-websocket'})`, T, async () => {
    const reader = await Syncline.connect(server.url, { storage: 'memory', WebSocket });
    try {
      const seen = await reader.open('node-builtin');
      if (builtIn) {
        const a = await Syncline.connect(server.url, { storage: 'memory' }); // no options.WebSocket
        try {
          const da = await a.open('node-builtin');
          await da.put('from-builtin', { via: 'builtin' });
          await da.whenSynced();
          assert.equal(a.status, 'online');
          await seen.put('from-ws', { via: 'ws' });
          await whenChanged(da, () => da.get('from-ws')?.via === 'ws');
        } finally {
          await a.close();
        }
      } else {
        const out = JSON.parse(await child(['--experimental-websocket'], 'builtin', server.url));
        assert.equal(out.status, 'synced');
        assert.match(out.replica, /^[0-9a-f]{32}$/);
      }
      // Written through the built-in WebSocket, it reached the server.
      await whenChanged(seen, () => seen.get('from-builtin')?.via === 'builtin');
    } finally {
      await reader.close();
    }
  });

  it(`without any WebSocket, says what to do (${builtIn ? 'a child with --no-experimental-websocket' : 'this process'})`, T, async () => {
    const refusal = (e) => e.code === 'Unsupported' && /options\.WebSocket/.test(e.message);
    if (builtIn) {
      const out = JSON.parse(await child(['--no-experimental-websocket'], 'none', server.url));
      assert.ok(refusal(out), `unexpected refusal: ${JSON.stringify(out)}`);
    } else {
      await assert.rejects(Syncline.connect(server.url, { storage: 'memory' }), refusal);
    }
  });
});
