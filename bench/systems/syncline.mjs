// Syncline: `syncline serve` (release build) with the npm package's Node
// clients (wasm, in-memory replicas), connecting with the `ws` package's
// WebSocket as the Yjs clients do (Node's built-in one cost ~45 µs more per
// message received; BENCHMARKS.md §21).
import { mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join, resolve } from 'node:path';
import { fileURLToPath } from 'node:url';
import WebSocket from 'ws';
import { Syncline } from '../../js/dist/node.js';
import { finalValue } from '../lib/data.mjs';
import { deadline, now, startProcess, until } from '../lib/util.mjs';

const root = resolve(fileURLToPath(new URL('.', import.meta.url)), '../..');
export const BIN = process.env.SYNCLINE_BIN ?? join(root, 'target/release/syncline');
const DB = 'bench';

export const name = 'syncline';
/** How long the last seeding waited for the server's views (ms). */
export let viewsReadyMs = null;
export const label = 'Syncline';

/** The server; `docs` (optional) are written through a client and acknowledged before it returns. */
export async function startServer({ docs = [], settle = true } = {}) {
  const dir = mkdtempSync(join(tmpdir(), 'bench-syncline-'));
  const server = await startProcess(
    BIN,
    ['serve', '--listen', '127.0.0.1:0', '--data', dir, '--anonymous', 'bench*', '--max-connections', '50000', '--max-connections-per-ip', '50000'],
    { ready: /^listening on http:\/\/(.+)$/, env: { RUST_LOG: 'warn' } },
  );
  if (docs.length) {
    const c = await Syncline.connect(`ws://127.0.0.1:${server.port}/sync`, { storage: 'memory', WebSocket });
    const db = await c.open(DB);
    const writes = [];
    for (const d of docs) {
      writes.push(db.put(d.id, d.initial));
      for (const p of d.edits) writes.push(db.update(d.id, (draft) => void Object.assign(draft, p)));
    }
    await Promise.all(writes);
    await deadline(db.whenSynced(), 120_000, 'seeding syncline');
    await c.close();
    // The server builds each document's JSON view once the database has
    // been quiet for 100 ms, off its hot path, and sends the views with
    // cold syncs. Measure the steady state a server at rest is in, not the
    // race with that build (the wait is reported in BENCHMARKS.md).
    const t0 = now();
    const ready = /^syncline_views_pending 0$/m;
    for (; settle && process.env.SYNCLINE_VIEWS !== 'false'; ) {
      const text = await (await fetch(`http://127.0.0.1:${server.port}/metrics`)).text();
      if (ready.test(text)) break;
      if (now() - t0 > 30_000) throw new Error('syncline: views not built in 30 s');
      await new Promise((r) => setTimeout(r, 10));
    }
    if (settle) viewsReadyMs = now() - t0;
  }
  return {
    ...server,
    url: `ws://127.0.0.1:${server.port}/sync`,
    urlVia: (port) => `ws://127.0.0.1:${port}/sync`,
    /** Open WebSockets on the server (W1/W2 wait for an offline client's to close). */
    async connections() {
      const text = await (await fetch(`http://127.0.0.1:${server.port}/metrics`)).text();
      return Number(/^syncline_connections (\d+)$/m.exec(text)?.[1] ?? NaN);
    },
    ctx: {},
    async stop() {
      await server.stop();
      rmSync(dir, { recursive: true, force: true });
    },
  };
}

/**
 * The server's fsync latencies so far: `{le: count}` from its cumulative
 * `syncline_fsync_seconds` histogram (seconds; `+Inf` included). W3 reads it
 * before and after, since every change it fans out waits for one fsync.
 */
export async function fsyncs(server) {
  const text = await (await fetch(`http://127.0.0.1:${server.port}/metrics`)).text();
  const out = {};
  for (const m of text.matchAll(/^syncline_fsync_seconds_bucket\{le="([^"]+)"\} (\d+)$/gm)) out[m[1]] = Number(m[2]);
  return out;
}

/** A client replica (in memory) connected to `url`. */
export async function client(url) {
  const c = await Syncline.connect(url, { storage: 'memory', WebSocket });
  const db = await c.open(DB);
  return {
    /** W1: resolve when every document is here with its final value. */
    async loadAll(docs) {
      await deadline(db.whenSynced(), 120_000, 'syncline cold sync');
      const last = docs[docs.length - 1];
      const got = db.get(last.id);
      if (db.list().length !== docs.length || got?.rev !== finalValue(last).rev) {
        throw new Error(`syncline: ${db.list().length} documents after sync`);
      }
    },
    /** Before measuring: a Syncline client syncs its whole database at once. */
    prepare: () => deadline(db.whenSynced(), 120_000, 'syncline writer'),
    goOffline: () => c.goOffline(),
    goOnline: () => c.goOnline(),
    /** W2: resolve when these patches are visible. */
    async waitFor(patches) {
      const seen = () => patches.every((p) => db.get(p.id)?.rev === p.patch.rev);
      await until(seen, 60_000, 'syncline resume');
    },
    /** W2's other client: apply patches and wait until the server acknowledged them. */
    async write(patches) {
      await deadline(db.whenSynced(), 60_000, 'syncline writer catching up');
      await Promise.all(patches.map((p) => db.update(p.id, (draft) => void Object.assign(draft, p.patch))));
      await deadline(db.whenSynced(), 60_000, 'syncline write');
    },
    /** W3 writer: one small change. */
    tick(seq) {
      return db.put('ticker', { seq, t: now() });
    },
    /** W3/W5 subscriber: `onTick(seq, t)` for every change seen; resolves once subscribed. */
    async subscribe(onTick) {
      db.subscribe(() => {
        const v = db.get('ticker');
        if (v) onTick(v.seq, v.t);
      });
      await deadline(db.whenSynced(), 120_000, 'syncline subscribe');
    },
    close: () => c.close(),
  };
}
