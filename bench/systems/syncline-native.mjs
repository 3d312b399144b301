// Syncline with native Rust subscribers: the same `syncline serve` and Node
// writer as ./syncline.mjs, but W3's subscribers are native clients
// (`native/examples/fanout`, in-memory replicas, one process, a two-thread
// tokio runtime) instead of the npm package in Node. W3 only.
import { spawn } from 'node:child_process';
import { join } from 'node:path';
import { createInterface } from 'node:readline';
import { client, fsyncs, startServer } from './syncline.mjs';

export { client, fsyncs, startServer };
export const name = 'syncline-native';
export const label = 'Syncline, native subscribers';
export const workloads = ['w3'];
/** Quick mode runs this system's W3 at N = 1,000 too (about a minute). */
export const quickSubscribers = [100, 1000];

const root = join(import.meta.dirname ?? new URL('.', import.meta.url).pathname, '../..');
const FANOUT = process.env.SYNCLINE_FANOUT ?? join(root, 'target/release/examples/fanout');

/** W3 subscribers: `{ready, done, collect(), kill()}` like the Node workers'. */
export function subscribers(server, count, changes) {
  const p = spawn(FANOUT, ['--url', server.url, '--db', 'bench', '--count', String(count), '--changes', String(changes)], {
    stdio: ['pipe', 'pipe', 'inherit'],
  });
  const lines = createInterface({ input: p.stdout });
  let onReady, onDone, onArrivals, onFail;
  const ready = new Promise((ok, fail) => ((onReady = ok), (onFail = fail)));
  const done = new Promise((ok) => (onDone = ok));
  const arrivals = new Promise((ok) => (onArrivals = ok));
  lines.on('line', (line) => {
    if (line === 'ready') onReady();
    else if (line === 'done') onDone();
    else if (line.startsWith('{')) onArrivals(JSON.parse(line).arrivals.map((a) => a.map((t) => t ?? NaN)));
  });
  p.once('error', (e) => onFail(new Error(`fanout (${FANOUT}): ${e.message}`)));
  p.once('exit', (code) => code && onFail(new Error(`fanout exited with ${code}`)));
  return {
    pids: [p.pid],
    ready,
    done,
    kill: () => p.kill('SIGKILL'),
    async collect() {
      p.stdin.end();
      return arrivals;
    },
  };
}
