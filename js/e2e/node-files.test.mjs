// Node replicas in files (issue 31): `storage: 'files'` keeps a replica in a
// directory, in the native store's record format with its recovery rules.
// A writer killed with SIGKILL keeps every write whose promise resolved; a
// restarted process has its data and pushes what it wrote offline; a torn
// tail is cut, damage in the middle refused; one process per directory.
import assert from 'node:assert/strict';
import { spawn } from 'node:child_process';
import { appendFileSync, mkdtempSync, readdirSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { after, describe, it } from 'node:test';
import WebSocket from 'ws';
import { Syncline } from '../dist/node.js';
import { Server } from './harness.mjs';

const T = { timeout: 60_000 };
const DIST = new URL('../dist/node.js', import.meta.url).href;

/** Run `body` in a Node process with `Syncline` imported; resolves with its stdout lines and exit. */
function node(body, { killAfterLines = null } = {}) {
  const src = `import { Syncline } from ${JSON.stringify(DIST)};\n${body}`;
  return new Promise((ok) => {
    const p = spawn(process.execPath, ['--input-type=module', '-e', src], { stdio: ['ignore', 'pipe', 'pipe'] });
    const lines = [];
    let buf = '';
    let stderr = '';
    const limit = setTimeout(() => p.kill('SIGKILL'), 45_000);
    p.stdout.on('data', (d) => {
      buf += d;
      const parts = buf.split('\n');
      buf = parts.pop();
      lines.push(...parts);
      if (killAfterLines !== null && lines.length >= killAfterLines) p.kill('SIGKILL');
    });
    p.stderr.on('data', (d) => (stderr += d));
    p.on('exit', (code, signal) => {
      clearTimeout(limit);
      ok({ lines, code, signal, stderr });
    });
  });
}

const logOf = (dir) => join(dir, 'dbs', readdirSync(join(dir, 'dbs')).find((f) => f.endsWith('.log')));

describe('Node replicas in files', () => {
  const dirs = [];
  const fresh = () => {
    const d = mkdtempSync(join(tmpdir(), 'syncline-node-files-'));
    dirs.push(d);
    return d;
  };
  after(() => {
    for (const d of dirs) rmSync(d, { recursive: true, force: true });
  });

  it('a writer killed with SIGKILL keeps every acknowledged write', T, async () => {
    const dir = fresh();
    // Writes as fast as it can and prints each one once its promise resolves.
    const writer = await node(
      `const c = await Syncline.connect(null, { dir: ${JSON.stringify(dir)} });
       const db = await c.open('notes');
       for (let i = 0; ; i++) { await db.put('n' + i, { i, text: 'note ' + i }); console.log(i); }`,
      { killAfterLines: 200 },
    );
    assert.equal(writer.signal, 'SIGKILL', writer.stderr);
    const acked = writer.lines.map(Number);
    assert.ok(acked.length >= 200);
    // The next process (the LOCK of the dead one is stale) reads them all.
    const reader = await node(
      `const c = await Syncline.connect(null, { dir: ${JSON.stringify(dir)} });
       const db = await c.open('notes');
       console.log(JSON.stringify({ replica: c.replica, docs: db.list().map((id) => db.get(id).i) }));
       await c.close();`,
    );
    assert.equal(reader.code, 0, reader.stderr);
    const { docs } = JSON.parse(reader.lines[0]);
    const held = new Set(docs);
    for (const i of acked) assert.ok(held.has(i), `acknowledged write ${i} lost`);
  });

  it('a restarted process keeps its replica and data, and pushes what it wrote offline', T, async () => {
    const dir = fresh();
    const server = await new Server(['--anonymous', 'node*']).start();
    try {
      const offline = await node(
        `const c = await Syncline.connect(null, { dir: ${JSON.stringify(dir)} });
         const db = await c.open('node-files');
         await db.put('offline', { v: 1 });
         console.log(c.replica); await c.close();`,
      );
      assert.equal(offline.code, 0, offline.stderr);
      const c = await Syncline.connect(server.url, { dir, WebSocket });
      try {
        assert.equal(c.replica, offline.lines[0], 'the same replica after a restart');
        const db = await c.open('node-files');
        assert.deepEqual(db.get('offline'), { v: 1 });
        await db.whenSynced();
      } finally {
        await c.close();
      }
      // Another client gets it from the server.
      const other = await Syncline.connect(server.url, { storage: 'memory', WebSocket });
      try {
        const db = await other.open('node-files');
        await db.whenSynced();
        assert.deepEqual(db.get('offline'), { v: 1 });
      } finally {
        await other.close();
      }
    } finally {
      await server.dispose();
    }
  });

  it('cuts a torn tail, refuses damage in the middle, keeps the key private', T, async () => {
    const dir = fresh();
    let c = await Syncline.connect(null, { dir });
    let db = await c.open('notes');
    for (let i = 0; i < 3; i++) await db.put(`n${i}`, { i });
    await c.close();
    assert.equal(readFileSync(join(dir, 'meta', 'replica-key')).length > 32, true);
    const { statSync } = await import('node:fs');
    assert.equal(statSync(join(dir, 'meta', 'replica-key')).mode & 0o777, 0o600);
    // A crash mid-append leaves a partial record: cut, nothing else lost.
    const log = logOf(dir);
    appendFileSync(log, Buffer.from([200, 0, 0, 0, 1, 2, 3]));
    c = await Syncline.connect(null, { dir });
    db = await c.open('notes');
    assert.deepEqual(db.list().sort(), ['n0', 'n1', 'n2']);
    await db.put('n3', { i: 3 });
    await c.close();
    // A flipped byte inside an early record, with valid ones after it.
    const bytes = readFileSync(log);
    bytes[12] ^= 0xff;
    writeFileSync(log, bytes);
    c = await Syncline.connect(null, { dir });
    await assert.rejects(c.open('notes'), (e) => e.code === 'StorageCorrupt');
    await c.close();
    assert.deepEqual(readFileSync(log), bytes, 'the damaged log is left as it is');
  });

  it('one process per directory', T, async () => {
    const dir = fresh();
    const c = await Syncline.connect(null, { dir });
    try {
      await assert.rejects(Syncline.connect(null, { dir }), (e) => e.code === 'StorageBlocked');
      const other = await node(
        `try { await Syncline.connect(null, { dir: ${JSON.stringify(dir)} }); console.log('opened'); }
         catch (e) { console.log(e.code); }`,
      );
      assert.deepEqual(other.lines, ['StorageBlocked']);
    } finally {
      await c.close();
    }
    const again = await Syncline.connect(null, { dir });
    await again.close();
  });

  it("refuses 'files' without a dir", T, async () => {
    await assert.rejects(Syncline.connect(null, { storage: 'files' }), (e) => e.code === 'InvalidOptions');
  });
});

