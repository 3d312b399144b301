// Shared helpers for the benchmark: process stats from /proc, percentiles,
// bounded waits and child processes that report their listening port.
import { spawn } from 'node:child_process';
import { readFileSync } from 'node:fs';
import { createInterface } from 'node:readline';

const TICKS = 100; // USER_HZ on Linux

/** CPU seconds (user + system) a process has used so far. */
export function cpuSeconds(pid) {
  const stat = readFileSync(`/proc/${pid}/stat`, 'utf8');
  // Fields after the command name, which may contain spaces: `pid (comm) state …`.
  const f = stat.slice(stat.lastIndexOf(')') + 2).split(' ');
  return (Number(f[11]) + Number(f[12])) / TICKS;
}

/** `{rss, peak}` in bytes: current and peak resident set size. */
export function memory(pid) {
  const status = readFileSync(`/proc/${pid}/status`, 'utf8');
  const kb = (key) => Number(new RegExp(`^${key}:\\s+(\\d+)`, 'm').exec(status)?.[1] ?? 0) * 1024;
  return { rss: kb('VmRSS'), peak: kb('VmHWM') };
}

/** Wall-clock now in ms, comparable across processes on one machine. */
export const now = () => performance.timeOrigin + performance.now();

export function percentile(sorted, p) {
  if (sorted.length === 0) return NaN;
  const i = Math.min(sorted.length - 1, Math.max(0, Math.ceil((p / 100) * sorted.length) - 1));
  return sorted[i];
}

export function median(xs) {
  const s = [...xs].sort((a, b) => a - b);
  return s.length % 2 ? s[(s.length - 1) / 2] : (s[s.length / 2 - 1] + s[s.length / 2]) / 2;
}

/** Resolve when `check()` is true, polled on every event-loop turn; reject after `ms`. */
export function until(check, ms, what = 'condition') {
  return new Promise((ok, fail) => {
    const deadline = Date.now() + ms;
    const tick = () => {
      let done = false;
      try {
        done = check();
      } catch (e) {
        fail(e);
        return;
      }
      if (done) ok();
      else if (Date.now() > deadline) fail(new Error(`timed out after ${ms} ms waiting for ${what}`));
      else setTimeout(tick, 1);
    };
    tick();
  });
}

/** Reject a promise that takes longer than `ms`. */
export function deadline(promise, ms, what) {
  let timer;
  return Promise.race([
    promise.finally(() => clearTimeout(timer)),
    new Promise((_, fail) => {
      timer = setTimeout(() => fail(new Error(`${what}: no result in ${ms} ms`)), ms);
    }),
  ]);
}

/**
 * Start a server process that prints a line matching `ready` (first group: the
 * port or host:port) on stdout; resolves to `{proc, port, stop()}`.
 */
export async function startProcess(cmd, args, { ready, env = {}, timeoutMs = 30_000, cwd } = {}) {
  const proc = spawn(cmd, args, {
    cwd,
    stdio: ['ignore', 'pipe', 'inherit'],
    env: { ...process.env, ...env },
  });
  // If the run dies (an uncaught error), its servers go with it instead of
  // holding their ports and cores for whatever runs next.
  const orphan = () => proc.kill('SIGKILL');
  process.once('exit', orphan);
  proc.once('exit', () => process.off('exit', orphan));
  const lines = createInterface({ input: proc.stdout });
  const addr = await new Promise((ok, fail) => {
    const timer = setTimeout(() => fail(new Error(`${cmd} did not start in ${timeoutMs} ms`)), timeoutMs);
    proc.once('error', fail); // e.g. the binary is missing
    proc.once('exit', (code) => fail(new Error(`${cmd} exited with ${code}`)));
    lines.on('line', (line) => {
      const m = ready.exec(line.trim());
      if (m) {
        clearTimeout(timer);
        ok(m[1]);
      }
    });
  });
  const port = Number(String(addr).split(':').pop());
  return {
    proc,
    port,
    pid: proc.pid,
    async stop() {
      if (proc.exitCode !== null || proc.signalCode !== null) return;
      const exited = new Promise((ok) => proc.once('exit', ok));
      proc.kill('SIGTERM');
      const t = setTimeout(() => proc.kill('SIGKILL'), 10_000);
      await exited;
      clearTimeout(t);
    },
  };
}

export const kb = (bytes) => bytes / 1024;

/**
 * For peers without acknowledgements: poll a bench peer server's `/rev?doc=`
 * endpoint until it reports every patch's `rev`, or throw after `ms`.
 */
export async function waitForRevs(httpBase, patches, ms = 60_000) {
  const end = Date.now() + ms;
  for (const p of patches) {
    for (;;) {
      const rev = await fetch(`${httpBase}/rev?doc=${p.id}`).then((r) => r.json());
      if (rev === p.patch.rev) break;
      if (Date.now() > end) throw new Error(`${httpBase}: ${p.id} did not reach the server in ${ms} ms`);
    }
  }
}
