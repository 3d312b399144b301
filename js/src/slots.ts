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
  if (!locks) return tabSlot(name);
  for (let index = 0; index < MAX_SLOTS; index++) {
    let release = () => {};
    const held = new Promise<void>((resolve) => (release = resolve));
    const got = await new Promise<boolean>((resolve, reject) => {
      locks
        .request(`syncline:${name}:${index}`, { ifAvailable: true }, async (lock) => {
          resolve(lock !== null);
          if (lock !== null) await held;
        })
        .catch((e: unknown) => reject(synclineError('StorageUnavailable', `Web Locks refused: ${String(e)}`)));
    });
    if (got) return { index, release };
  }
  throw synclineError('TooManyTabs', `more than ${MAX_SLOTS} clients of "${name}" are open in this browser`);
}

/**
 * Without Web Locks (insecure origins such as `http://192.168.…`, where
 * browsers hide `navigator.locks`), tabs cannot agree on slots. Each tab then
 * keeps a random slot of its own in `sessionStorage` (it survives reloads of
 * that tab), so no two tabs ever share a replica; a new tab starts with an
 * empty local replica and catches up from the server.
 */
function tabSlot(name: string): Slot {
  const key = `syncline-slot:${name}`;
  const storage = (globalThis as { sessionStorage?: Storage }).sessionStorage;
  let index = Number(storage?.getItem(key));
  if (!Number.isInteger(index) || index < MAX_SLOTS) {
    index = MAX_SLOTS + Math.floor(Math.random() * 1e9);
    storage?.setItem(key, String(index));
  }
  return { index, release() {} };
}
