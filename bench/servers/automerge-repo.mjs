// The automerge-repo peer server: the official sync server's set-up
// (`Repo` + `NodeWSServerAdapter` + `NodeFSStorageAdapter`, sharePolicy
// false) built from automerge-repo 2.5.6. The benchmark's dataset is written
// into this repo before it listens (as if loaded from its store), and
// `GET /connections` how many WebSockets are open;
// `GET /rev?doc=ID` reports a document's `rev` so a benchmark can tell when
// another client's edit has arrived (automerge-repo has no acknowledgements).
//
// Usage: node automerge-repo.mjs DATA_DIR SEED_DOCS  → prints "listening on 127.0.0.1:PORT"
import { createServer } from 'node:http';
import { writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { Repo } from '@automerge/automerge-repo';
import { NodeWSServerAdapter } from '@automerge/automerge-repo-network-websocket';
import { NodeFSStorageAdapter } from '@automerge/automerge-repo-storage-nodefs';
import { WebSocketServer } from 'ws';
import { dataset } from '../lib/data.mjs';

const [dir, seedCount = '0'] = process.argv.slice(2);
const wss = new WebSocketServer({ noServer: true });
const repo = new Repo({
  network: [new NodeWSServerAdapter(wss)],
  storage: new NodeFSStorageAdapter(dir),
  peerId: 'bench-sync-server',
  sharePolicy: async () => false,
});

const urls = {};
for (const d of dataset(Number(seedCount))) {
  const h = repo.create(d.initial);
  for (const p of d.edits) h.change((doc) => void Object.assign(doc, p));
  urls[d.id] = h.url;
}
urls.ticker = repo.create({ seq: -1, t: 0 }).url;
await repo.flush();
writeFileSync(join(dir, 'urls.json'), JSON.stringify(urls));

const http = createServer(async (req, res) => {
  const u = new URL(req.url, 'http://x');
  if (u.pathname === '/rev') {
    const h = await repo.find(urls[u.searchParams.get('doc')]);
    res.end(JSON.stringify(h.doc()?.rev ?? null));
  } else if (u.pathname === '/connections') {
    res.end(JSON.stringify(wss.clients.size));
  } else {
    res.end('ok');
  }
});
http.on('upgrade', (req, socket, head) => wss.handleUpgrade(req, socket, head, (ws) => wss.emit('connection', ws, req)));
http.listen(0, '127.0.0.1', () => console.log(`listening on 127.0.0.1:${http.address().port}`));
process.on('SIGTERM', () => process.exit(0));
