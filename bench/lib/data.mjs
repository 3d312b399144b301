// Seeded workload data, identical for every system: documents of ~1 KB of
// JSON, each created and then edited 10 times (one change per edit).

/** mulberry32: a small deterministic PRNG (the same data every run). */
export function rng(seed) {
  let a = seed >>> 0;
  return () => {
    a = (a + 0x6d2b79f5) >>> 0;
    let t = a;
    t = Math.imul(t ^ (t >>> 15), t | 1);
    t ^= t + Math.imul(t ^ (t >>> 7), t | 61);
    return ((t ^ (t >>> 14)) >>> 0) / 4294967296;
  };
}

const WORDS = (
  'sync offline replica vector clock change merge document server client ' +
  'browser tab write read delta snapshot log fsync durable network message ' +
  'presence list todo game board move player lobby title body note tag owner'
).split(' ');

/**
 * `BENCH_TEXT=random` (inherited by the peers' server processes, which
 * seed from this module too) makes every word random lowercase letters of
 * the same length range instead of one of the 40 above: text deflate cannot
 * shrink much, so bytes on the wire are the data's (issue 35).
 */
const RANDOM_TEXT = process.env.BENCH_TEXT === 'random';

function words(r, n) {
  const out = [];
  for (let i = 0; i < n; i++) {
    if (RANDOM_TEXT) {
      const len = 2 + Math.floor(r() * 8);
      let w = '';
      for (let k = 0; k < len; k++) w += String.fromCharCode(97 + Math.floor(r() * 26));
      out.push(w);
    } else {
      out.push(WORDS[Math.floor(r() * WORDS.length)]);
    }
  }
  return out.join(' ');
}

const NAMES = ['ada', 'grace', 'linus', 'barbara', 'ken', 'margaret', 'alan', 'radia'];

/** Document ids `doc-0000` … */
export const docId = (i) => `doc-${String(i).padStart(4, '0')}`;

/**
 * `count` documents, each `{id, initial, edits}`: `initial` is the created
 * value, `edits` are 10 patches of top-level keys applied one change each.
 */
export function dataset(count = 1000, edits = 10, seed = 42) {
  const r = rng(seed);
  const docs = [];
  for (let i = 0; i < count; i++) {
    const initial = {
      title: words(r, 6),
      body: words(r, 110),
      tags: [words(r, 1), words(r, 1), words(r, 1)],
      done: false,
      priority: Math.floor(r() * 5),
      owner: NAMES[Math.floor(r() * NAMES.length)],
      rev: 0,
    };
    const patches = [];
    for (let k = 1; k <= edits; k++) {
      const patch = { rev: k };
      switch (k % 5) {
        case 0:
          patch.title = words(r, 6);
          break;
        case 1:
          patch.priority = Math.floor(r() * 5);
          break;
        case 2:
          patch.done = r() < 0.5;
          break;
        case 3:
          patch.owner = NAMES[Math.floor(r() * NAMES.length)];
          break;
        default:
          patch.tags = [words(r, 1), words(r, 1), words(r, 1), words(r, 1)];
      }
      patches.push(patch);
    }
    docs.push({ id: docId(i), initial, edits: patches });
  }
  return docs;
}

/** The value a document has after all its edits. */
export function finalValue(d) {
  return Object.assign({}, d.initial, ...d.edits);
}

/** W2's remote edit: one small patch (with `rev`) to each of `n` documents spread over the set. */
export function resumePatches(n = 10, rev = 100) {
  const out = [];
  for (let i = 0; i < n; i++) out.push({ id: docId(i * 97), patch: { rev, title: `changed while away ${rev}.${i}` } });
  return out;
}
