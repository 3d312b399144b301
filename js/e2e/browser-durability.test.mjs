// Durability in a real browser: a write whose promise has resolved survives
// Chromium being SIGKILLed (the whole process group, no graceful close) the
// moment after, and reads back exactly from the same profile's IndexedDB.
import assert from 'node:assert/strict';
import { after, before, describe, it } from 'node:test';
import { killableBrowser, startStatic } from './harness.mjs';
import { mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { isDeepStrictEqual } from 'node:util';

// A build that resolved writes before IndexedDB's `complete` lost the last
// transaction in about a quarter of the rounds here (3 rounds caught it in 3
// runs of 5; 6 rounds in 10 of 10), so 6 rounds (~18 s).
const ROUNDS = 6;
/** Documents written (and awaited) per round just before the kill. */
const PER_ROUND = 5;

/**
 * The value written as document `i` of `round`: distinct per document and
 * round, with ~48 KB of text so the transaction has something to flush.
 */
function valueOf(round, i) {
  return { round, i, tag: `r${round}-d${i}`, body: `${round}:${i}:`.padEnd(48_000, String.fromCharCode(97 + ((round * 7 + i) % 26))) };
}

/** Ids whose document is missing, extra or not exactly as written (short, for the message). */
function differences(all, expected) {
  const ids = [...new Set([...Object.keys(all), ...Object.keys(expected)])].sort();
  return ids
    .filter((id) => !isDeepStrictEqual(all[id], expected[id]))
    .map((id) => `${id}: ${id in all ? (id in expected ? 'differs' : 'unexpected') : 'missing'}`);
}

describe('browser durability under SIGKILL', () => {
  let web;
  let profile;
  before(async () => {
    web = await startStatic();
    profile = mkdtempSync(join(tmpdir(), 'syncline-e2e-kill-profile-'));
  });
  after(async () => {
    await web?.close();
    if (profile) rmSync(profile, { recursive: true, force: true });
  });

  it(`${ROUNDS} rounds: writes awaited, Chromium SIGKILLed at once, relaunched on the same profile, every write is there`, { timeout: 120_000 }, async () => {
    let replica = null;
    for (let round = 0; round < ROUNDS; round++) {
      const browser = await killableBrowser(profile);
      try {
        const page = await browser.page(web.url);
        // Local only (no server): nothing else holds a copy of the data.
        const seen = await page.evaluate(async (n) => {
          window.client = await Syncline.connect(null, { name: 'kill' });
          window.db = await window.client.open('e2e-kill');
          return { replica: window.client.replica, all: window.db.all(), n };
        }, round);
        if (replica === null) replica = seen.replica;
        assert.equal(seen.replica, replica, `round ${round}: the same replica after the relaunch`);
        // Everything acknowledged in earlier rounds, exactly.
        const expected = {};
        for (let r = 0; r < round; r++) for (let i = 0; i < PER_ROUND; i++) expected[`r${r}-d${i}`] = valueOf(r, i);
        assert.deepEqual(differences(seen.all, expected), [], `round ${round}: what the earlier rounds acknowledged`);

        const values = Array.from({ length: PER_ROUND }, (_, i) => [`r${round}-d${i}`, valueOf(round, i)]);
        // Resolve once every write's promise has; then kill with no delay.
        const acked = await page.evaluate(
          (values) => Promise.all(values.map(([id, v]) => db.put(id, v, { atomic: ['tag', 'body'] }))),
          values,
        );
        assert.deepEqual(acked, values.map(() => true));
      } finally {
        await browser.kill();
      }
    }
    // And a last launch reads every round back.
    const browser = await killableBrowser(profile);
    try {
      const page = await browser.page(web.url);
      const all = await page.evaluate(async () => {
        window.client = await Syncline.connect(null, { name: 'kill' });
        return (await window.client.open('e2e-kill')).all();
      });
      const expected = {};
      for (let r = 0; r < ROUNDS; r++) for (let i = 0; i < PER_ROUND; i++) expected[`r${r}-d${i}`] = valueOf(r, i);
      assert.deepEqual(differences(all, expected), []);
    } finally {
      await browser.kill();
    }
  });
});
