// node sync.mjs URL ME OTHER: write document ME, wait until document OTHER
// (another client's write) is here, print it, close. Exits on its own.
import { Syncline } from 'syncline';
import WebSocket from 'ws';

const [url, me, other] = process.argv.slice(2);
const client = await Syncline.connect(url, { WebSocket });
const db = await client.open('node-todos');
await db.put(me, { from: me });
await new Promise((resolve) => {
  const off = db.subscribe(() => db.get(other) && resolve(off()));
  if (db.get(other)) resolve(off());
});
await db.whenSynced();
console.log(JSON.stringify(db.get(other)));
await client.close();
