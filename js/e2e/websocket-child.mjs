// Run by node.test.mjs in a child Node whose flags decide whether there is a
// global WebSocket: `node [--experimental-websocket | --no-experimental-websocket]
// websocket-child.mjs MODE URL`. Prints one JSON line; exits non-zero (with
// why on stderr) when the runtime is not what MODE expects.
//   builtin: a global WebSocket exists; connect with it (no options.WebSocket),
//            write document `from-builtin` and wait until the server has it.
//   none:    no global WebSocket; connect must refuse, saying what to do.
import { Syncline } from '../dist/node.js';

const [mode, url] = process.argv.slice(2);
const fail = (why) => {
  console.error(`websocket-child ${mode}: ${why}`);
  process.exit(2);
};
const has = typeof globalThis.WebSocket === 'function';
if (mode === 'builtin') {
  if (!has) fail(`no global WebSocket in Node ${process.version} with flags ${process.execArgv.join(' ')}`);
  const timer = setTimeout(() => fail('not synced in 20 s'), 20_000);
  const client = await Syncline.connect(url, { storage: 'memory' });
  const db = await client.open('node-builtin');
  await db.put('from-builtin', { via: 'builtin' });
  await db.whenSynced();
  clearTimeout(timer);
  console.log(JSON.stringify({ replica: client.replica, status: db.status }));
  await client.close();
} else if (mode === 'none') {
  if (has) fail(`a global WebSocket in Node ${process.version} with flags ${process.execArgv.join(' ')}`);
  try {
    const client = await Syncline.connect(url, { storage: 'memory' });
    await client.close();
    fail('connect() resolved');
  } catch (e) {
    console.log(JSON.stringify({ code: e.code, message: e.message }));
  }
} else {
  fail('MODE is builtin or none');
}
