// The Yjs peer server: `@y/websocket-server`'s own connection handler (as in
// its bin), in memory (its LevelDB persistence needs a native build, and it
// acknowledges nothing either way). The dataset is written into the server's
// documents before it listens; `GET /rev?doc=ID` reports a document's `rev`,
// `GET /connections` how many WebSockets are open.
//
// Usage: node yjs.mjs SEED_DOCS  → prints "listening on 127.0.0.1:PORT"
import { createServer } from 'node:http';
import { docs, getYDoc, setupWSConnection } from '@y/websocket-server/utils';
import { WebSocketServer } from 'ws';
import { dataset } from '../lib/data.mjs';
import { applyPatch } from '../systems/yjs-doc.mjs';

const [seedCount = '0'] = process.argv.slice(2);
for (const d of dataset(Number(seedCount))) {
  const ydoc = getYDoc(d.id);
  applyPatch(ydoc, d.initial);
  for (const p of d.edits) applyPatch(ydoc, p);
}

const wss = new WebSocketServer({ noServer: true });
wss.on('connection', setupWSConnection);
const http = createServer((req, res) => {
  const u = new URL(req.url, 'http://x');
  if (u.pathname === '/rev') {
    const doc = docs.get(u.searchParams.get('doc'));
    res.end(JSON.stringify(doc ? (doc.getMap('root').get('rev') ?? null) : null));
  } else if (u.pathname === '/connections') {
    res.end(JSON.stringify(wss.clients.size));
  } else {
    res.end('ok');
  }
});
http.on('upgrade', (req, socket, head) => wss.handleUpgrade(req, socket, head, (ws) => wss.emit('connection', ws, req)));
http.listen(0, '127.0.0.1', () => console.log(`listening on 127.0.0.1:${http.address().port}`));
process.on('SIGTERM', () => process.exit(0));
