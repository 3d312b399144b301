/**
 * Replica slots: how tabs of one origin share IndexedDB safely.
 *
 * Each open client holds an exclusive Web Lock on a numbered slot for as
 * long as it lives, and the slot names its IndexedDB database (and so its
 * replica id). The first tab gets slot 0, a second tab open at the same time
 * gets slot 1, and so on; a reloaded tab gets its slot back, with all its
 * data. Two tabs therefore never write the same replica's log, which is
 * what would corrupt it (two writers of one automerge actor). Tabs exchange
 * changes through the server like any two replicas.
 */

import { synclineError } from './errors.js';

/** A held slot. */
export interface Slot {
  index: number;
  release(): void;
  /**
   * Call `cb` (with why) if the slot is lost to another tab: without Web
   * Locks, after this page was frozen longer than a lease; with them, when
   * another context takes the lock with `steal: true`. The client must stop
   * writing, since two tabs on one replica would corrupt its log.
   */
  onLost?(cb: (reason: string) => void): void;
}

const MAX_SLOTS = 64;

interface LockManagerLike {
  request(
    name: string,
    options: { ifAvailable: boolean },
    callback: (lock: unknown) => Promise<void> | void,
  ): Promise<unknown>;
}

/** Take the lowest free slot of `name`. */
export async function acquireSlot(name: string): Promise<Slot> {
  const locks = (globalThis.navigator as { locks?: LockManagerLike } | undefined)?.locks;
  if (!locks) return leaseSlot(name);
  for (let index = 0; index < MAX_SLOTS; index++) {
    let free = () => {};
    const held = new Promise<void>((resolve) => (free = resolve));
    let granted = false;
    let released = false;
    const lost = new Set<(reason: string) => void>();
    const release = () => {
      released = true;
      free();
    };
    const got = await new Promise<boolean>((resolve, reject) => {
      locks
        .request(`syncline:${name}:${index}`, { ifAvailable: true }, async (lock) => {
          granted = lock !== null;
          resolve(granted);
          if (granted) await held;
        })
        .catch((e: unknown) => {
          if (!granted) {
            reject(synclineError('StorageUnavailable', `Web Locks refused: ${String(e)}`));
            return;
          }
          // Held, then taken away: another context requested it with
          // `steal: true` (the request rejects with an AbortError). Another
          // tab may now write this replica: this one must stop.
          if (released) return;
          release();
          for (const cb of lost) cb(`another tab took this replica's Web Lock (${String(e)}); reload`);
        });
    });
    if (got) return { index, release, onLost: (cb) => lost.add(cb) };
  }
  throw tooMany(name);
}

function tooMany(name: string) {
  return synclineError('TooManyTabs', `more than ${MAX_SLOTS} clients of "${name}" are open in this browser`);
}

/**
 * A lease outlives the longest a live page's timers are held back (Chrome
 * runs a hidden tab's timers once a minute), so a live tab always renews in
 * time; a tab closed without `pagehide` frees its slot after this long.
 */
export const LEASE_MS = 180_000;
const RENEW_MS = 15_000;
/** How long a claim waits for a tab that raced it to the same slot. */
const SETTLE_MS = 60;

/**
 * Without Web Locks (insecure origins such as `http://192.168.…`, where
 * browsers hide `navigator.locks`), tabs agree on slots through leases in
 * `localStorage`, which every tab of the origin shares: a tab claims the
 * lowest slot whose lease is absent or expired, waits for a racing tab's
 * claim to land (the last writer wins), renews while it lives and drops the
 * lease on `pagehide`. A reloaded tab asks for its previous slot first
 * (`sessionStorage`), so it keeps its replica; a duplicated tab copies that
 * hint, but the original still holds the lease, so the copy takes another
 * slot. A closed tab's slot (with any offline writes) is taken by the next tab.
 */
/** @internal Exported for tests. */
export async function leaseSlot(name: string): Promise<Slot> {
  const g = globalThis as { localStorage?: Storage; sessionStorage?: Storage };
  let shared: Storage | undefined;
  try {
    shared = g.localStorage;
  } catch {
    shared = undefined;
  }
  if (!shared) {
    throw synclineError(
      'StorageUnavailable',
      'neither Web Locks nor localStorage is available to keep tabs on separate replicas; use storage: "memory"',
    );
  }
  const store = shared;
  const me = randomId();
  const hintKey = `syncline-slot:${name}`;
  const hint = Number(g.sessionStorage?.getItem(hintKey) ?? NaN);
  const order = Array.from({ length: MAX_SLOTS }, (_, i) => i);
  if (Number.isInteger(hint) && hint >= 0 && hint < MAX_SLOTS) order.unshift(hint);
  const keyOf = (index: number) => `syncline-lease:${name}:${index}`;
  const owner = (key: string) => {
    const [id, until] = (store.getItem(key) ?? '').split(' ');
    return id && Number(until) > Date.now() ? id : null;
  };
  const claim = (key: string) => store.setItem(key, `${me} ${Date.now() + LEASE_MS}`);
  for (const index of order) {
    const key = keyOf(index);
    if (owner(key) !== null) continue;
    claim(key);
    await new Promise((ok) => setTimeout(ok, SETTLE_MS));
    if (owner(key) !== me) continue;
    g.sessionStorage?.setItem(hintKey, String(index));
    return holdLease(key, index, owner, claim, store);
  }
  throw tooMany(name);
}

function holdLease(
  key: string,
  index: number,
  owner: (key: string) => string | null,
  claim: (key: string) => void,
  store: Storage,
): Slot {
  const me = owner(key);
  const lost = new Set<(reason: string) => void>();
  let released = false;
  const check = () => {
    if (released) return;
    const now = owner(key);
    if (now === me || now === null) {
      claim(key);
    } else {
      release();
      for (const cb of lost) cb('another tab took over this replica while this page was frozen; reload');
    }
  };
  const timer = setInterval(check, RENEW_MS);
  const onHide = () => {
    if (owner(key) === me) store.removeItem(key);
  };
  // Back from the back/forward cache: take the lease again (or learn it is gone).
  const onShow = (e: Event) => {
    if ((e as PageTransitionEvent).persisted) check();
  };
  globalThis.addEventListener?.('pagehide', onHide);
  globalThis.addEventListener?.('pageshow', onShow);
  function release() {
    if (released) return;
    released = true;
    clearInterval(timer);
    globalThis.removeEventListener?.('pagehide', onHide);
    globalThis.removeEventListener?.('pageshow', onShow);
    onHide();
  }
  return { index, release, onLost: (cb) => lost.add(cb) };
}

function randomId(): string {
  const bytes = new Uint8Array(12);
  globalThis.crypto.getRandomValues(bytes);
  return Array.from(bytes, (b) => b.toString(16).padStart(2, '0')).join('');
}
