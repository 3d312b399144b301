// End-to-end: a client given a list of server URLs (issue 34) dials them in
// turn. A failed dial moves on to the next URL; so does a dropped
// connection, and the client resumes on the next server. Against the real
// `syncline serve` binary on 127.0.0.1, from Node (the `ws` package's
// WebSocket) and from headless Chromium.
//
// The servers here have data directories of their own and share nothing
// (no cluster), so after a failover the test asserts only what one server
// can show: the client is online there, and a write it makes there reaches
// another client of that server. That write goes to a database the client
// has not written to on the first server: its own entries there carry on
// from those the first server acknowledged, which the second never saw (a
// gap it refuses; nodes of a real cluster share their data).
import assert from 'node:assert/strict';
import { createServer } from 'node:net';
import { after, before, describe, it } from 'node:test';
import WebSocket from 'ws';
import { Syncline } from '../dist/node.js';
import { newUser, Server, startStatic, until } from './harness.mjs';

// Each test is bounded; a hang fails that test, not the whole run.
const T = { timeout: 60_000 };
/** How long any one awaited condition may take. */
const WAIT_MS = 20_000;

/** `promise`, or a rejection naming `what` after WAIT_MS. */
function within(promise, what) {
  let timer;
  const late = new Promise((_, fail) => {
    timer = setTimeout(() => fail(new Error(`${what}: not within ${WAIT_MS} ms`)), WAIT_MS);
  });
  return Promise.race([promise, late]).finally(() => clearTimeout(timer));
}

/** Resolve once `check()` holds, re-checked on each change of `db`; bounded. */
function whenChanged(db, check, what) {
  let off = () => {};
  const met = new Promise((ok) => {
    if (check()) return ok();
    off = db.subscribe(() => check() && ok());
  });
  return within(met, what).finally(() => off());
}

/** Resolve once `check()` holds, re-checked on each presence change of `db`; bounded. */
function whenPresence(db, check, what) {
  let off = () => {};
  const met = new Promise((ok) => {
    if (check()) return ok();
    off = db.presence.subscribe(() => check() && ok());
  });
  return within(met, what).finally(() => off());
}

/**
 * A URL no server listens on: a port bound on 127.0.0.1 and closed again
 * (dialling it is refused at once).
 */
async function closedPortUrl() {
  const s = createServer();
  await new Promise((ok, fail) => s.once('error', fail).listen(0, '127.0.0.1', ok));
  const { port } = s.address();
  await new Promise((ok) => s.close(ok));
  return `ws://127.0.0.1:${port}/sync`;
}

/** A Node client with a fast backoff (so a failover takes well under a second). */
function node(url) {
  return Syncline.connect(url, { storage: 'memory', WebSocket, maxBackoffMs: 250 });
}

describe('a list of server URLs', () => {
  const cleanup = [];
  after(async () => {
    for (const f of cleanup.reverse()) await f();
  });
  async function server() {
    const s = await new Server(['--anonymous', 'urls*']).start();
    cleanup.push(() => s.dispose());
    return s;
  }
  async function client(url) {
    const c = await node(url);
    cleanup.push(() => c.close());
    return c;
  }

  it('a failed dial moves on: [closed port, server] syncs through the server', T, async () => {
    const s = await server();
    const a = await client([await closedPortUrl(), s.url]);
    const errors = [];
    a.onError((e) => errors.push(e.code));
    const da = await a.open('urls-dial');
    await da.put('t1', { title: 'milk' });
    // Acknowledged as durable by the server: it went through the second URL.
    await within(da.whenSynced(), 'synced through the second URL');
    assert.equal(a.status, 'online');
    assert.equal(a.refusal, undefined);

    const b = await client(s.url);
    const dbb = await b.open('urls-dial');
    await whenChanged(dbb, () => dbb.get('t1')?.title === 'milk', "the list client's write read on the server");
    assert.deepEqual(errors, []);
  });

  it('a dropped connection moves on: [S1, S2] with S1 killed resumes on S2', T, async () => {
    const [s1, s2] = [await server(), await server()];
    const a = await client([s1.url, s2.url]);
    const da = await a.open('urls-failover');
    await da.put('before', { on: 's1' });
    await within(da.whenSynced(), 'synced on S1 (the first URL)');
    // Only S1 has it: the client is on S1.
    const onS1 = await client(s1.url);
    const d1 = await onS1.open('urls-failover');
    await whenChanged(d1, () => d1.get('before')?.on === 's1', 'read back on S1');
    await onS1.close();

    // Kill S1. From then on the client can only be online on S2.
    const statuses = [];
    a.onStatus((s) => statuses.push(s));
    await s1.stop('SIGKILL');
    const back = new Promise((ok) => {
      const check = () => statuses.includes('offline') && a.status === 'online' && ok();
      a.onStatus(check);
      check();
    });
    await within(back, 'online again after S1 died');
    assert.deepEqual(statuses.slice(0, 1), ['offline']);

    const da2 = await a.open('urls-failover-2');
    await da2.put('after', { on: 's2' });
    await within(da2.whenSynced(), 'synced on S2');
    const b = await client(s2.url);
    const dbb = await b.open('urls-failover-2');
    await whenChanged(dbb, () => dbb.get('after')?.on === 's2', "the list client's write read back on S2");
    // Both are subscribed on S2 right now.
    await whenPresence(dbb, () => dbb.presence.online === 2, 'both clients present on S2');
    assert.equal(a.status, 'online');
    assert.equal(a.refusal, undefined);
  });

  it('refuses an empty list and bad entries with InvalidUrl, before opening anything', T, async () => {
    const invalid = (e) => e.code === 'InvalidUrl';
    await assert.rejects(node([]), invalid);
    await assert.rejects(node(['ws://127.0.0.1:9/sync', 'ftp://127.0.0.1/']), invalid);
    await assert.rejects(node(['ws://127.0.0.1:9/sync', '']), invalid);
    await assert.rejects(node(['ws://127.0.0.1:9/sync', 42]), invalid);
  });
});

describe('a list of server URLs in the browser', () => {
  let web;
  const cleanup = [];
  before(async () => {
    web = await startStatic();
  });
  after(async () => {
    for (const f of cleanup.reverse()) await f();
    await web.close();
  });

  it('[closed port, S1, S2]: syncs through S1, then S2 once S1 is killed', T, async () => {
    const s1 = await new Server(['--anonymous', 'urls*']).start();
    cleanup.push(() => s1.dispose());
    const s2 = await new Server(['--anonymous', 'urls*']).start();
    cleanup.push(() => s2.dispose());
    const u = await newUser();
    cleanup.push(() => u.close());
    const page = await u.page(web.url);
    const urls = [await closedPortUrl(), s1.url, s2.url];
    await page.evaluate(async (urls) => {
      window.errors = [];
      window.statuses = [];
      window.client = await Syncline.connect(urls, { maxBackoffMs: 250 });
      window.client.onError((e) => window.errors.push(e.code));
      window.client.onStatus((s) => window.statuses.push(s));
      window.db = await window.client.open('urls-browser');
      await window.db.put('one', { on: 's1' });
    }, urls);
    await until(page, () => db.status === 'synced', undefined, WAIT_MS);

    const onS1 = await client(s1.url);
    const d1 = await onS1.open('urls-browser');
    await whenChanged(d1, () => d1.get('one')?.on === 's1', 'the page write read on S1');
    await onS1.close();

    await page.evaluate(() => (window.statuses = []));
    await s1.stop('SIGKILL');
    await until(page, () => statuses.includes('offline') && client.status === 'online', undefined, WAIT_MS);
    await page.evaluate(async () => {
      window.db2 = await window.client.open('urls-browser-2');
      await window.db2.put('two', { on: 's2' });
    });
    await until(page, () => db2.status === 'synced', undefined, WAIT_MS);
    const onS2 = await client(s2.url);
    const d2 = await onS2.open('urls-browser-2');
    await whenChanged(d2, () => d2.get('two')?.on === 's2', 'the page write read back on S2');
    assert.deepEqual(await page.evaluate(() => window.errors), []);
    assert.deepEqual(u.errors, []);

    async function client(url) {
      const c = await node(url);
      cleanup.push(() => c.close());
      return c;
    }
  });
});
