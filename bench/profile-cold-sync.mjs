// Profile one Syncline cold sync of W1's dataset (BENCHMARKS.md, issue 35):
// seeds a release `syncline serve` through a client, then cold-syncs from a
// child process run under `--cpu-prof`, and prints the child's time.
//
//   cd bench && node --experimental-websocket --no-warnings profile-cold-sync.mjs [--settle] [DIR]
//
// Without --settle the cold sync starts right after the seeding (the
// server's views are not built yet: W1a's first figure); with it, once they
// are (W1's). BENCH_TEXT=random selects the incompressible dataset. The
// profile goes to DIR (default /tmp/syncline-cold-profile); wasm frames
// show as wasm-function[N] unless the package was built with its names.
import { fork } from 'node:child_process';
import { dataset } from './lib/data.mjs';
import * as syncline from './systems/syncline.mjs';

const args = process.argv.slice(2);
if (args[0] === '--child') {
  const c = await syncline.client(args[1]);
  const t0 = performance.now();
  await c.loadAll(dataset(1000));
  console.log(`cold sync: ${(performance.now() - t0).toFixed(0)} ms`);
  await c.close();
  process.exit(0);
}
const settle = args.includes('--settle');
const dir = args.find((a) => !a.startsWith('--')) ?? '/tmp/syncline-cold-profile';
const server = await syncline.startServer({ docs: dataset(1000), settle });
try {
  const child = fork(new URL(import.meta.url).pathname, ['--child', server.url], {
    execArgv: ['--experimental-websocket', '--no-warnings', '--cpu-prof', `--cpu-prof-dir=${dir}`],
  });
  const code = await new Promise((done) => child.on('exit', done));
  if (code !== 0) throw new Error(`the profiled client exited with ${code}`);
  console.log(`profile in ${dir}`);
} finally {
  await server.stop();
}
