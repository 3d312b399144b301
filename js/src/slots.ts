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
  if (!locks) {
    // No Web Locks (very old browsers, insecure origins): one replica,
    // as if this were the only tab.
    return { index: 0, release() {} };
  }
  for (let index = 0; index < MAX_SLOTS; index++) {
    let release = () => {};
    const held = new Promise<void>((resolve) => (release = resolve));
    const got = await new Promise<boolean>((resolve, reject) => {
      locks
        .request(`syncline:${name}:${index}`, { ifAvailable: true }, async (lock) => {
          resolve(lock !== null);
          if (lock !== null) await held;
        })
        .catch(reject);
    });
    if (got) return { index, release };
  }
  throw synclineError('TooManyTabs', `more than ${MAX_SLOTS} clients of "${name}" are open in this browser`);
}
