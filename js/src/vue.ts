/**
 * Vue 3 composables over a Syncline database, for `setup()` or any
 * `effectScope()`; they unsubscribe when the scope is disposed.
 *
 * How it works. `useDoc` keeps a deep reactive copy of one document: a
 * database change replaces the copy, and a deep watcher writes the copy back
 * with `db.put` on every mutation (synchronously, so an edit is in the
 * database before anything else can change it). `useDocs`, `usePresence` and
 * `useStatus` are read-only refs refreshed from the database's events.
 *
 * Why there are no echo loops. Replacing the copy from the database is
 * flagged and not written back; a mutation equal to what the database holds
 * is not written either; and the change event of our own write finds the
 * copy already equal to the database, so it does not replace it.
 */

import {
  onScopeDispose,
  ref,
  shallowRef,
  toRaw,
  toValue,
  watch,
  type MaybeRefOrGetter,
  type Ref,
} from 'vue';
import type { DbStatus, Doc, Peer, SynclineDb } from './client.js';
import { deepEqual } from './equal.js';

/** Options of {@link useDoc}. */
export interface UseDocOptions {
  /** Called when writing a mutation back fails (default: `console.error`). */
  onError?: (error: unknown) => void;
  /** Keys whose strings are values replaced whole (see `WriteOptions.atomic`). */
  atomic?: string[];
}

/** What {@link useDoc} returns. */
export interface UseDoc<T extends object> {
  /** A live, writable deep copy: mutate it (or assign `undefined` to delete). */
  doc: Ref<T | undefined>;
  /** `db.put` for this document. */
  put(value: T): Promise<boolean>;
  /** `db.update` for this document. */
  update(fn: (draft: T) => T | void): Promise<boolean>;
  /** `db.delete` for this document. */
  remove(): Promise<boolean>;
}

/** What {@link usePresence} returns. */
export interface UsePresence<S> {
  peers: Readonly<Ref<readonly Peer<S>[]>>;
  online: Readonly<Ref<number>>;
  set(state: S | null): void;
}

/** A plain, mutable copy of a JSON-like value, without Vue proxies. */
function plain<T>(v: T): T {
  const raw = toRaw(v);
  if (typeof raw !== 'object' || raw === null) return raw;
  if (Array.isArray(raw)) return raw.map(plain) as T;
  const out: Record<string, unknown> = {};
  for (const [k, x] of Object.entries(raw)) out[k] = plain(x);
  return out as T;
}

/** One document as a live, writable deep reactive copy. `id` may be a ref or getter. */
export function useDoc<T extends object = Doc>(
  db: SynclineDb,
  id: MaybeRefOrGetter<string>,
  options: UseDocOptions = {},
): UseDoc<T> {
  const onError = options.onError ?? ((e) => console.error('syncline/vue: write failed', e));
  const doc = ref<T | undefined>() as Ref<T | undefined>;
  let current = toValue(id);
  let loading = false;

  const load = () => {
    const stored = db.get<T>(current);
    if (deepEqual(stored, toRaw(doc.value))) return;
    loading = true;
    try {
      doc.value = plain(stored);
    } finally {
      loading = false;
    }
  };

  const writeBack = () => {
    const local = plain(doc.value);
    if (deepEqual(local, db.get(current))) return;
    try {
      (local === undefined ? db.delete(current) : db.put(current, local, { atomic: options.atomic })).catch(onError);
    } catch (e) {
      onError(e);
    }
  };

  load();
  watch(
    doc,
    () => {
      if (!loading) writeBack();
    },
    { deep: true, flush: 'sync' },
  );
  watch(
    () => toValue(id),
    (next) => {
      current = next;
      load();
    },
    { flush: 'sync' },
  );
  const off = db.subscribe((e) => {
    if (e.ids.includes(current)) load();
  });
  onScopeDispose(off);

  return {
    doc,
    put: (value) => db.put(toValue(id), plain(value), { atomic: options.atomic }),
    update: (fn) => db.update<T>(toValue(id), fn),
    remove: () => db.delete(toValue(id)),
  };
}

/** Every document, by id (read-only; each document is a frozen snapshot). */
export function useDocs<T extends object = Doc>(db: SynclineDb): Readonly<Ref<Readonly<Record<string, T>>>> {
  const docs = shallowRef(db.all<T>());
  onScopeDispose(
    db.subscribe(() => {
      docs.value = db.all<T>();
    }),
  );
  return docs;
}

/** Who is on the database: live `peers` and `online`, and `set` to publish this client's state. */
export function usePresence<S = unknown>(db: SynclineDb): UsePresence<S> {
  const presence = db.presence;
  const peers = shallowRef(presence.peers as Peer<S>[]);
  const online = ref(presence.online);
  onScopeDispose(
    presence.subscribe(() => {
      peers.value = presence.peers as Peer<S>[];
      online.value = presence.online;
    }),
  );
  return { peers, online, set: (state) => presence.set(state) };
}

/** The database's status: `offline`, `connecting`, `online` or `synced`. */
export function useStatus(db: SynclineDb): Readonly<Ref<DbStatus>> {
  const status = ref(db.status);
  onScopeDispose(
    db.onStatus((s) => {
      status.value = s;
    }),
  );
  return status;
}
