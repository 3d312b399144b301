// The side-by-side benchmark: Syncline vs automerge-repo vs Yjs, every figure
// from this one run on this machine. Run through ../scripts/bench, which
// builds what it needs; see ../BENCHMARKS.md for the method.
//
//   node --experimental-websocket run.mjs [--full] [--only w1,w3] [--systems syncline,yjs]
import { execFileSync, fork, spawn } from 'node:child_process';
import { mkdirSync, mkdtempSync, readFileSync, writeFileSync } from 'node:fs';
import os, { tmpdir } from 'node:os';
import { dirname, join, resolve } from 'node:path';
import { fileURLToPath } from 'node:url';
import { gzipSync } from 'node:zlib';
import { dataset, resumePatches } from './lib/data.mjs';
import { ProxyProcess } from './lib/proxy.mjs';
import { cpuSeconds, deadline, median, memory, now, percentile } from './lib/util.mjs';
import { browserLoad } from './lib/browser.mjs';
import { writeReport } from './lib/report.mjs';

const here = dirname(fileURLToPath(import.meta.url));
const root = resolve(here, '..');
const args = process.argv.slice(2);
const flag = (name) => args.includes(name);
const option = (name, dflt) => {
  const i = args.indexOf(name);
  return i >= 0 ? args[i + 1] : dflt;
};
const FULL = flag('--full');
const ONLY = option('--only', 'w1,w2,w1a,w3,w4,w5,w6').split(',');
const SYSTEMS = option('--systems', 'syncline,syncline-native,automerge-repo,yjs').split(',');
const RUNS = 3;
const systems = {};
for (const s of SYSTEMS) systems[s] = await import(`./systems/${s}.mjs`);
/** The systems that take part in workload `w` (a system may name its own). */
const taking = (w) => Object.entries(systems).filter(([, s]) => !s.workloads || s.workloads.includes(w));

const results = {
  mode: FULL ? 'full' : 'quick',
  // BENCH_TEXT=random: the incompressible dataset (lib/data.mjs).
  text: process.env.BENCH_TEXT === 'random' ? 'random letters' : 'words',
  date: new Date().toISOString(),
  machine: machine(),
  w1: {},
  w2: {},
  w1a: {},
  held: {},
  w3: {},
  w4: null,
  w5: {},
  w6: null,
};

function machine() {
  const pkg = (p) => JSON.parse(readFileSync(join(here, 'node_modules', p, 'package.json'), 'utf8')).version;
  const git = (a) => {
    try {
      return execFileSync('git', a, { cwd: root, encoding: 'utf8' }).trim();
    } catch {
      return '?';
    }
  };
  return {
    cpus: os.cpus().length,
    cpu: os.cpus()[0]?.model ?? '?',
    memoryGiB: Math.round(os.totalmem() / 2 ** 30),
    kernel: os.release(),
    node: process.version,
    // "-dirty": the run measured changes not yet committed.
    syncline: git(['describe', '--always', '--dirty', '--abbrev=7']),
    automergeRepo: pkg('@automerge/automerge-repo'),
    automerge: pkg('@automerge/automerge'),
    yjs: pkg('yjs'),
    yWebsocket: pkg('y-websocket'),
    yWebsocketServer: pkg('@y/websocket-server'),
  };
}

const log = (...a) => console.error('[bench]', ...a);

// ---- W1 cold sync and W2 resume (one seeded server per system) ----

async function w1w2(name, sys) {
  const docs = dataset(1000);
  log(`${name}: seeding 1,000 documents × 11 changes`);
  const server = await sys.startServer({ docs });
  const proxy = await new ProxyProcess(server.port).listen();
  const writer = await sys.client(server.url, server.ctx);
  await writer.prepare?.();
  const cold = [];
  const resume = [];
  // What the counted run saw on the wire (bytes, messages, round trips).
  const traffic = { w1: {}, w2: {} };
  try {
    // Runs 0..RUNS-1 connect straight to the server and give the times;
    // the last goes through the counting proxy and gives the traffic
    // figures, in the steady state the timed runs left (a first resume
    // after seeding carries ~1.5 KB more for Syncline). Relaying costs a
    // core when there are many connections (Yjs opens 1,000), so a timed
    // run through it measured the proxy (§29).
    for (let run = 0; run <= RUNS; run++) {
      const counted = run === RUNS;
      const before = await server.connections();
      await proxy.reset();
      const cpu0 = process.cpuUsage();
      const t0 = now();
      const c = await sys.client(counted ? server.urlVia(proxy.port) : server.url, server.ctx);
      await c.loadAll(docs);
      const ms = now() - t0;
      const cpu = process.cpuUsage(cpu0);
      if (counted) {
        traffic.w1 = await proxy.stats();
        log(`${name}: W1 counted run: ${(traffic.w1.down / 1024).toFixed(0)} KB down (${ms.toFixed(0)} ms, not reported)`);
      } else {
        cold.push({ ms, clientCpuS: (cpu.user + cpu.system) / 1e6 });
        log(`${name}: W1 run ${run + 1}: ${ms.toFixed(0)} ms`);
      }

      c.goOffline();
      // Offline means disconnected: the server has seen the client's
      // connections close (and, counted, traffic in flight on them is not
      // part of the resume).
      await closed(server, before);
      const patches = resumePatches(10, 100 + run);
      await writer.write(patches);
      await proxy.reset();
      const t1 = now();
      c.goOnline();
      try {
        await c.waitFor(patches);
        const ms = now() - t1;
        if (counted) {
          traffic.w2 = await proxy.stats();
          log(`${name}: W2 counted run: ${traffic.w2.up} B up (${ms.toFixed(0)} ms, not reported)`);
        } else {
          resume.push({ ms });
          log(`${name}: W2 run ${run + 1}: ${ms.toFixed(0)} ms`);
        }
      } catch (e) {
        // Reported in the table as a failed run, not silently dropped.
        resume.push({ ms: Infinity, failed: String(e.message) });
        log(`${name}: W2 run ${run + 1} FAILED: ${e.message}`);
      }
      await c.close();
    }
    results.held[name] = memory(server.pid);
  } finally {
    await writer.close();
    await proxy.close();
    await server.stop();
  }
  results.w1[name] = { ...traffic.w1, ...summarize(cold) };
  results.w2[name] = { ...traffic.w2, ...summarize(resume) };
}

// ---- W1 on an active database ----

/**
 * The cold sync of W1 where the database is not at rest: once at the
 * moment the seeding client's last write is acknowledged (nothing has had
 * time to settle: Syncline's server has not built all its views), then
 * three times while another client keeps writing (10 documents every
 * 100 ms, each write waiting for its acknowledgement).
 */
async function w1active(name, sys) {
  const docs = dataset(1000);
  log(`${name}: W1a seeding 1,000 documents × 11 changes, no settling`);
  const server = await sys.startServer({ docs, settle: false });
  const writer = await sys.client(server.url, server.ctx);
  const out = { fresh: null, busy: [] };
  const load = async () => {
    const cpu0 = process.cpuUsage();
    const t0 = now();
    const c = await sys.client(server.url, server.ctx);
    await c.loadAll(docs);
    const ms = now() - t0;
    const cpu = process.cpuUsage(cpu0);
    await c.close();
    return { ms, clientCpuS: (cpu.user + cpu.system) / 1e6 };
  };
  let writing = true;
  let writes = 0;
  let busyWriter = null;
  try {
    out.fresh = await load();
    log(`${name}: W1a right after seeding: ${out.fresh.ms.toFixed(0)} ms`);
    await writer.prepare?.();
    busyWriter = (async () => {
      for (let rev = 1000; writing; rev++) {
        const t = now();
        await writer.write(resumePatches(10, rev));
        writes += 10;
        await new Promise((r) => setTimeout(r, Math.max(0, 100 - (now() - t))));
      }
    })();
    // Let the writes run a second before the first measured load.
    await new Promise((r) => setTimeout(r, 1000));
    for (let run = 0; run < RUNS; run++) {
      const r = await load();
      out.busy.push(r);
      log(`${name}: W1a run ${run + 1} while writing: ${r.ms.toFixed(0)} ms`);
    }
  } finally {
    writing = false;
    await busyWriter?.catch((e) => log(`${name}: W1a writer: ${e.message}`));
    await writer.close();
    await server.stop();
  }
  results.w1a[name] = { fresh: out.fresh, ...summarize(out.busy), writes };
}

/** Until the server has at most `count` WebSockets open (10 s at most). */
async function closed(server, count) {
  const end = now() + 10_000;
  while ((await server.connections()) > count) {
    if (now() > end) throw new Error(`the server still has more than ${count} connections after 10 s`);
    await new Promise((r) => setTimeout(r, 5));
  }
}

/** The median run by time among the runs that finished; failures are counted. */
function summarize(runs) {
  const ok = runs.filter((r) => !r.failed);
  const sorted = [...(ok.length ? ok : runs)].sort((a, b) => a.ms - b.ms);
  const failed = runs.filter((r) => r.failed).length;
  return { ...sorted[Math.floor(sorted.length / 2)], runs: runs.map((r) => r.ms), failedRuns: failed };
}

// ---- W3 fan-out ----

/**
 * Changes sent before W3 starts measuring (see `w3`). `W3_WARMUP=n` moves
 * the measured window along the stream: a stall that moves with it depends
 * on how many changes the replicas hold (how §22 found the log's growth).
 */
const W3_WARMUP = Number(process.env.W3_WARMUP ?? 100);

// Extra Node flags for the subscriber workers, for profiling them, e.g.
// BENCH_WORKER_FLAGS='--cpu-prof --cpu-prof-dir=/tmp/prof' (BENCHMARKS.md, Method).
const WORKER_NODE_FLAGS = (process.env.BENCH_WORKER_FLAGS ?? '').split(' ').filter(Boolean);

async function spawnWorkers(name, server, count, changes, workers) {
  const procs = [];
  const per = Math.ceil(count / workers);
  for (let w = 0; w < workers && w * per < count; w++) {
    const p = fork(join(here, 'lib/worker.mjs'), {
      execArgv: [
        '--experimental-websocket',
        '--no-warnings',
        '--max-old-space-size=8192',
        ...WORKER_NODE_FLAGS,
      ],
      serialization: 'advanced',
    });
    // IPC to a worker that died emits 'error'; its exit is reported below.
    p.on('error', () => {});
    const n = Math.min(per, count - w * per);
    const state = { proc: p, ready: null, done: null, n };
    state.ready = new Promise((ok, fail) => {
      state.done = new Promise((okDone) => {
        p.on('message', (m) => {
          if (m.ready) ok();
          if (m.done) okDone();
          if (m.error) fail(new Error(`${name} worker: ${m.error}`));
          if (m.arrivals) state.arrivals = m.arrivals;
        });
      });
      p.once('exit', (code) => code && fail(new Error(`${name} worker exited with ${code}`)));
    });
    p.send({ system: name, url: server.url, ctx: server.ctx, count: n, changes });
    procs.push(state);
  }
  const ready = Promise.all(procs.map((p) => p.ready));
  const kill = () => procs.forEach((p) => p.proc.kill('SIGKILL'));
  // Workers that did not get ready are killed, not left connected.
  await deadline(ready, 300_000, `${name}: ${count} subscribers`).catch((e) => {
    kill();
    throw e;
  });
  return {
    pids: procs.map((p) => p.proc.pid),
    ready,
    kill,
    done: Promise.all(procs.map((p) => p.done)),
    async collect() {
      const all = [];
      for (const p of procs) {
        // A worker that died mid-run has nothing to send (and no channel).
        if (!p.proc.connected) throw new Error(`${name}: a subscriber worker exited early`);
        const got = new Promise((ok) => p.proc.once('exit', ok));
        p.proc.send({ finish: true });
        await deadline(got, 60_000, 'collecting arrivals');
        all.push(...p.arrivals);
      }
      return all;
    },
  };
}

/**
 * The server's fsyncs between two histogram readings (`fsyncs`): how many,
 * how many took longer than 51.2 ms, and the bucket the slowest fell in (s).
 */
function fsyncDelta(before, after) {
  const num = (le) => (le === '+Inf' ? Infinity : Number(le));
  const les = Object.keys(after).sort((a, b) => num(a) - num(b));
  const d = (le) => after[le] - (before[le] ?? 0);
  const count = d('+Inf');
  return {
    count,
    over51ms: count - d('0.0512'),
    slowestS: num(les.find((le) => d(le) === count) ?? 'NaN'),
  };
}

async function w3(name, sys, subscribers, changes, rate) {
  const server = await sys.startServer({});
  let subs, writer;
  try {
    // Subscribers in two Node child processes, or a system's own (native) ones.
    subs = sys.subscribers
      ? sys.subscribers(server, subscribers, changes)
      : await spawnWorkers(name, server, subscribers, changes, 2);
    await deadline(subs.ready, 300_000, `${name}: ${subscribers} subscribers`);
    writer = await sys.client(server.url, server.ctx);
    await writer.subscribe(() => {});
    const period = 1000 / rate;
    // Unmeasured warm-up at the same rate (subscribers ignore negative
    // sequence numbers): without it the first ~150 changes of a run waited
    // for V8 to tier up the code they run (wasm and JS alike), and carried
    // most of the p99.
    for (let i = 0; i < W3_WARMUP; i++) {
      await new Promise((ok) => setTimeout(ok, period)); // pacing, not synchronisation
      await writer.tick(-1 - i);
    }
    // Write back what earlier workloads left in the page cache now: every
    // Syncline delivery waits for one fsync, which queues behind that
    // writeback (fsyncs of 100+ ms while another process writes in bulk).
    execFileSync('sync');
    const fsync0 = await sys.fsyncs?.(server);
    const subsCpu = () => subs.pids.reduce((sum, pid) => sum + cpuSeconds(pid), 0);
    const cpu0 = cpuSeconds(server.pid);
    const subsCpu0 = subsCpu();
    const sent = new Array(changes);
    const t0 = now();
    for (let i = 0; i < changes; i++) {
      const due = t0 + i * period;
      const wait = due - now();
      if (wait > 0) await new Promise((ok) => setTimeout(ok, wait)); // pacing the writer, not synchronisation
      sent[i] = now();
      await writer.tick(i);
    }
    let complete = true;
    await deadline(subs.done, 60_000, 'deliveries').catch(() => (complete = false));
    const cpu = cpuSeconds(server.pid) - cpu0;
    const subscriberCpu = subsCpu() - subsCpu0;
    const mem = memory(server.pid);
    // Work the subscribers do once the stream stops (Syncline's replicas
    // hand the changes they showed patched to automerge after 250 ms of
    // quiet; any system's garbage collection): counted until a quarter
    // second passes with under 5 ms of their CPU, at most 30 s.
    const settle0 = subsCpu();
    await new Promise((ok) => setTimeout(ok, 500)); // past the 250 ms idle wait, not synchronisation
    for (let last = subsCpu(), t = now(); now() - t < 30_000; ) {
      await new Promise((ok) => setTimeout(ok, 250)); // sampling CPU, not synchronisation
      const c = subsCpu();
      if (c - last < 0.005) break;
      last = c;
    }
    const afterCpu = subsCpu() - settle0;
    const fsync = fsync0 && fsyncDelta(fsync0, await sys.fsyncs(server));
    await writer.close();
    writer = undefined;
    const arrivals = await deadline(subs.collect(), 60_000, 'collecting arrivals');
    const lat = [];
    const worst = new Array(changes).fill(0);
    let missing = 0;
    for (const a of arrivals) {
      for (let i = 0; i < changes; i++) {
        if (Number.isNaN(a[i])) {
          missing++;
          worst[i] = Infinity;
          continue;
        }
        const l = a[i] - sent[i];
        lat.push(l);
        worst[i] = Math.max(worst[i], l);
      }
    }
    // Per change, in sending order: when the last subscriber had it (ms).
    const allBySeq = worst.map((w) => Math.round(w * 10) / 10);
    lat.sort((a, b) => a - b);
    worst.sort((a, b) => a - b);
    const delivered = lat.length;
    results.w3[`${name}@${subscribers}`] = {
      subscribers,
      changes,
      rate,
      complete,
      delivered,
      missing,
      p50: percentile(lat, 50),
      p99: percentile(lat, 99),
      allP50: percentile(worst, 50),
      allP99: percentile(worst, 99),
      serverCpuS: cpu,
      cpuPerDeliveryUs: (cpu / Math.max(1, delivered)) * 1e6,
      subscriberCpuS: subscriberCpu,
      subscriberCpuPerDeliveryUs: (subscriberCpu / Math.max(1, delivered)) * 1e6,
      subscriberAfterCpuS: afterCpu,
      subscriberCpuWithAfterPerDeliveryUs: ((subscriberCpu + afterCpu) / Math.max(1, delivered)) * 1e6,
      peakRss: mem.peak,
      fsync,
      cdf: [1, 5, 10, 25, 50, 75, 90, 95, 99, 99.9].map((p) => [p, percentile(lat, p)]),
      allBySeq,
    };
    log(`${name}: W3 N=${subscribers}: p50 ${percentile(lat, 50).toFixed(1)} ms, p99 ${percentile(lat, 99).toFixed(1)} ms`);
  } finally {
    // Only if something failed: then the subscribers and the writer may
    // still be connected (collected subscribers have exited already).
    subs?.kill();
    await writer?.close().catch(() => {});
    await server.stop();
  }
}

// ---- W4 durable ingest (Syncline; the peers acknowledge nothing) ----

async function w4() {
  // A cap, not the duration: the run ends once every prepared change is acknowledged.
  const seconds = FULL ? 20 : 8;
  const changes = FULL ? 100_000 : 30_000; // per writer, made before the clock starts
  const out = await new Promise((ok, fail) => {
    const p = spawn(
      join(root, 'target/release/examples/ingest'),
      ['--binary', join(root, 'target/release/syncline'), '--writers', '10', '--seconds', String(seconds), '--changes', String(changes)],
      { stdio: ['ignore', 'pipe', 'inherit'] },
    );
    let s = '';
    p.stdout.on('data', (d) => (s += d));
    p.on('exit', (code) => (code === 0 ? ok(s) : fail(new Error(`ingest exited with ${code}`))));
  });
  const rows = {};
  for (const line of out.split('\n')) {
    const m = /^\| (.+?) \| (.+?) \|$/.exec(line.trim());
    if (m && m[1] !== 'figure' && m[1] !== '---') rows[m[1]] = m[2];
  }
  results.w4 = { seconds, rows, raw: out };
  log(`syncline: W4 ${rows['changes/s']} changes/s`);
}

// ---- W5 idle connections ----

async function w5(name, sys, count) {
  const server = await sys.startServer({});
  let first, subs;
  try {
    // A first client so the database/document exists, then settle the baseline.
    first = await sys.client(server.url, server.ctx);
    await first.subscribe(() => {});
    await first.tick(0);
    const before = memory(server.pid).rss;
    subs = await spawnWorkers(name, server, count, 1, 4);
    const after = memory(server.pid);
    results.w5[name] = { connections: count, before, after: after.rss, peak: after.peak, perConnection: (after.rss - before) / count };
    log(`${name}: W5 ${count} connections: ${((after.rss - before) / count / 1024).toFixed(1)} KB each`);
  } finally {
    subs?.kill();
    try {
      await first?.close();
    } finally {
      await server.stop();
    }
  }
}

// ---- W6 browser ----

async function w6() {
  const ours = readFileSync(join(root, 'js/wasm/syncline_wasm_bg.wasm'));
  const am = readFileSync(
    join(here, 'node_modules/@automerge/automerge/dist/mjs/wasm_bindgen_output/web/automerge_wasm_bg.wasm'),
  );
  const size = (b) => ({ raw: b.length, gzip: gzipSync(b, { level: 9 }).length });
  results.w6 = { wasm: { syncline: size(ours), automerge: size(am) } };
  if (!systems.syncline) return;
  const docs = dataset(1000);
  const server = await systems.syncline.startServer({ docs });
  try {
    results.w6.load = await browserLoad({ root, syncUrl: server.url, count: docs.length, runs: RUNS });
    log(`syncline: W6 first visit ${results.w6.load.server.toFixed(0)} ms, reload ${results.w6.load.idb.toFixed(0)} ms`);
  } finally {
    await server.stop();
  }
}

// ---- main ----

// --report FILE: redraw the tables and charts from a saved results file.
if (option('--report')) {
  const saved = JSON.parse(readFileSync(option('--report'), 'utf8'));
  const outDir = join(root, 'docs/bench');
  console.log(await writeReport(saved, { root, outDir, publish: true }));
  process.exit(0);
}

/**
 * Run one system's workload; if it fails (a peer that cannot hold 10,000
 * connections within the deadline, say), record why under `results[w][key]`
 * and go on, so one system's failure does not cost the whole run.
 */
async function attempt(w, key, extra, run) {
  try {
    await run();
  } catch (e) {
    // One line without pipes: it goes into a Markdown table cell.
    const reason = String(e?.message ?? e).split('\n')[0].replaceAll('|', '/');
    log(`${key}: ${w.toUpperCase()} did not finish: ${reason}`);
    results[w][key] = { ...extra, failed: reason };
  }
}

const started = Date.now();
if (ONLY.includes('w1') || ONLY.includes('w2')) for (const [n, s] of taking('w1')) await w1w2(n, s);
if (ONLY.includes('w1a')) {
  for (const [n, s] of taking('w1')) await attempt('w1a', n, {}, () => w1active(n, s));
}
if (ONLY.includes('w3')) {
  // Quick mode runs N = 100, and N = 1,000 too for systems whose
  // subscribers are cheap enough to finish in the quick budget (native).
  const counts = (s) => option('--subscribers', FULL ? '100,1000' : (s.quickSubscribers ?? [100]).join(',')).split(',').map(Number);
  for (const n of [...new Set(taking('w3').flatMap(([, s]) => counts(s)))].sort((a, b) => a - b)) {
    for (const [name, s] of taking('w3')) {
      if (!counts(s).includes(n)) continue;
      const changes = Number(option('--changes', 1000));
      const rate = n >= 1000 ? 20 : 100;
      await attempt('w3', `${name}@${n}`, { subscribers: n, changes, rate }, () => w3(name, s, n, changes, rate));
    }
  }
}
if (ONLY.includes('w4') && systems.syncline) await w4();
if (ONLY.includes('w5')) {
  const count = FULL ? 10_000 : 1_000;
  for (const [n, s] of taking('w5')) await attempt('w5', n, { connections: count }, () => w5(n, s, count));
}
if (ONLY.includes('w6')) await w6();
results.seconds = (Date.now() - started) / 1000;

// Only a complete run replaces the published figures (every figure on the
// page comes from one run); a partial run (--only/--systems/...) just prints.
const complete =
  !args.some((a) => ['--only', '--systems', '--subscribers', '--changes'].includes(a)) && results.text === 'words';
const outDir = complete ? join(root, 'docs/bench') : mkdtempSync(join(tmpdir(), 'bench-partial-'));
mkdirSync(outDir, { recursive: true });
writeFileSync(join(outDir, `results-${results.mode}.json`), JSON.stringify(results, null, 1));
const table = await writeReport(results, { root, outDir, publish: complete });
console.log(table);
if (!complete) log(`partial run: BENCHMARKS.md left as it was; charts and JSON in ${outDir}`);
process.exit(0);
