// End-to-end in Node: the npm package's Node entry against the real
// `syncline serve` binary on 127.0.0.1, connecting with the `ws` package's
// WebSocket through `options.WebSocket`.
import assert from 'node:assert/strict';
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

  it('without any WebSocket, says what to do', T, async (t) => {
    if (typeof globalThis.WebSocket === 'function') return t.skip('this Node has a global WebSocket');
    await assert.rejects(Syncline.connect(server.url, { storage: 'memory' }), (e) => e.code === 'Unsupported' && /options\.WebSocket/.test(e.message));
  });
});
