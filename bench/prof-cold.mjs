// Scratch: seed a Syncline server with W1's dataset, no settling, then
// cold-sync from a child process under --cpu-prof (not committed).
import { fork } from 'node:child_process';
const s = await import('./systems/syncline.mjs');
const { dataset } = await import('./lib/data.mjs');
if (process.argv[2] === 'child') {
  const docs = dataset(1000);
  const c = await s.client(process.argv[3]);
  const t0 = performance.now();
  await c.loadAll(docs);
  console.log('cold sync', (performance.now() - t0).toFixed(0), 'ms');
  await c.close();
  process.exit(0);
} else {
  const docs = dataset(1000);
  const srv = await s.startServer({ docs, settle: false });
  const child = fork(new URL(import.meta.url).pathname, ['child', srv.url], {
    execArgv: ['--experimental-websocket', '--no-warnings', '--cpu-prof', '--cpu-prof-dir=/tmp/prof'],
  });
  await new Promise((r) => child.on('exit', r));
  await srv.stop();
}
