// automerge-repo 2.5.6: the sync server set-up in ../servers/automerge-repo.mjs
// and Node clients made of the same packages (in-memory repos).
import { mkdtempSync, readFileSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { Repo } from '@automerge/automerge-repo';
import { WebSocketClientAdapter } from '@automerge/automerge-repo-network-websocket';
import { deadline, now, startProcess, until, waitForRevs } from '../lib/util.mjs';

export const name = 'automerge-repo';
export const label = 'automerge-repo';
const SERVER = fileURLToPath(new URL('../servers/automerge-repo.mjs', import.meta.url));

export async function startServer({ docs = [] } = {}) {
  const dir = mkdtempSync(join(tmpdir(), 'bench-amrepo-'));
  const server = await startProcess(process.execPath, [SERVER, dir, String(docs.length)], {
    ready: /^listening on (.+)$/,
    timeoutMs: 300_000,
  });
  const urls = JSON.parse(readFileSync(join(dir, 'urls.json'), 'utf8'));
  return {
    ...server,
    url: `ws://127.0.0.1:${server.port}`,
    urlVia: (port) => `ws://127.0.0.1:${port}`,
    /** Open WebSockets on the server (W1/W2 wait for an offline client's to close). */
    connections: async () => (await fetch(`http://127.0.0.1:${server.port}/connections`)).json(),
    ctx: { http: `http://127.0.0.1:${server.port}`, urls },
    async stop() {
      await server.stop();
      rmSync(dir, { recursive: true, force: true });
    },
  };
}

export async function client(url, ctx) {
  let adapter = new WebSocketClientAdapter(url);
  const repo = new Repo({ network: [adapter] });
  const handles = new Map();
  // A find before the server is connected would report "unavailable".
  const connected = new Promise((ok) => repo.networkSubsystem.once('peer', ok));
  const find = async (id) => {
    let h = handles.get(id);
    if (!h) {
      await connected;
      h = await repo.find(ctx.urls[id]);
      handles.set(id, h);
    }
    return h;
  };
  return {
    async loadAll(docs) {
      await deadline(Promise.all(docs.map((d) => find(d.id))), 300_000, 'automerge-repo cold sync');
      const last = docs[docs.length - 1];
      if (handles.get(last.id).doc()?.rev !== last.edits.at(-1).rev) throw new Error('automerge-repo: incomplete');
    },
    goOffline() {
      repo.networkSubsystem.removeNetworkAdapter(adapter);
    },
    goOnline() {
      // A fresh adapter, as an app coming back online would make.
      adapter = new WebSocketClientAdapter(url);
      repo.networkSubsystem.addNetworkAdapter(adapter);
    },
    async waitFor(patches) {
      const seen = () => patches.every((p) => handles.get(p.id)?.doc()?.rev === p.patch.rev);
      await until(seen, 60_000, 'automerge-repo resume');
    },
    async write(patches) {
      for (const p of patches) (await find(p.id)).change((d) => void Object.assign(d, p.patch));
      // No acknowledgements in automerge-repo: ask the server when it has them.
      await waitForRevs(ctx.http, patches);
    },
    async tick(seq) {
      (await find('ticker')).change((d) => {
        d.seq = seq;
        d.t = now();
      });
    },
    async subscribe(onTick) {
      const h = await deadline(find('ticker'), 120_000, 'automerge-repo subscribe');
      h.on('change', ({ doc }) => onTick(doc.seq, doc.t));
    },
    async close() {
      await repo.shutdown();
    },
  };
}
