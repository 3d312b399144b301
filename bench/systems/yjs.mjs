// Yjs: `@y/websocket-server` with `y-websocket` providers, one Y.Doc (and so
// one WebSocket) per document, as y-websocket is built to be used.
import { fileURLToPath } from 'node:url';
import { WebsocketProvider } from 'y-websocket';
import WebSocket from 'ws';
import * as Y from 'yjs';
import { deadline, now, startProcess, until, waitForRevs } from '../lib/util.mjs';
import { applyPatch, rev } from './yjs-doc.mjs';

export const name = 'yjs';
export const label = 'Yjs';
const SERVER = fileURLToPath(new URL('../servers/yjs.mjs', import.meta.url));

export async function startServer({ docs = [] } = {}) {
  const server = await startProcess(process.execPath, [SERVER, String(docs.length)], {
    ready: /^listening on (.+)$/,
  });
  return {
    ...server,
    url: `ws://127.0.0.1:${server.port}`,
    urlVia: (port) => `ws://127.0.0.1:${port}`,
    /** Open WebSockets on the server (W1/W2 wait for an offline client's to close). */
    connections: async () => (await fetch(`http://127.0.0.1:${server.port}/connections`)).json(),
    ctx: { http: `http://127.0.0.1:${server.port}` },
  };
}

function provider(url, room, ydoc) {
  return new WebsocketProvider(url, room, ydoc, { WebSocketPolyfill: WebSocket, disableBc: true });
}

const synced = (p) =>
  new Promise((ok) => {
    if (p.synced) ok();
    else p.once('sync', (s) => s && ok());
  });

export async function client(url, ctx) {
  const open = new Map(); // room → {doc, provider}
  const room = (id) => {
    let r = open.get(id);
    if (!r) {
      const doc = new Y.Doc();
      r = { doc, provider: provider(url, id, doc) };
      open.set(id, r);
    }
    return r;
  };
  return {
    async loadAll(docs) {
      const rooms = docs.map((d) => room(d.id));
      await deadline(Promise.all(rooms.map((r) => synced(r.provider))), 120_000, 'yjs cold sync');
      const last = docs[docs.length - 1];
      if (rev(room(last.id).doc) !== last.edits.at(-1).rev) throw new Error('yjs: incomplete sync');
    },
    goOffline() {
      for (const r of open.values()) r.provider.disconnect();
    },
    goOnline() {
      for (const r of open.values()) r.provider.connect();
    },
    async waitFor(patches) {
      const seen = () =>
        patches.every((p) => rev(room(p.id).doc) === p.patch.rev) && [...open.values()].every((r) => r.provider.synced);
      await until(seen, 60_000, 'yjs resume');
    },
    async write(patches) {
      await Promise.all(patches.map((p) => synced(room(p.id).provider)));
      for (const p of patches) applyPatch(room(p.id).doc, p.patch);
      // No acknowledgements in y-websocket: ask the server when it has them.
      await waitForRevs(ctx.http, patches);
    },
    tick(seq) {
      applyPatch(room('ticker').doc, { tick: { seq, t: now() } });
    },
    async subscribe(onTick) {
      const r = room('ticker');
      r.doc.getMap('root').observe(() => {
        const v = r.doc.getMap('root').get('tick');
        if (v) onTick(v.seq, v.t);
      });
      await deadline(synced(r.provider), 120_000, 'yjs subscribe');
    },
    async close() {
      for (const r of open.values()) {
        r.provider.destroy();
        r.doc.destroy();
      }
    },
  };
}
