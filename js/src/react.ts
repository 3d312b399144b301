/**
 * React hooks over a Syncline database, built on `useSyncExternalStore`.
 *
 * How it works. Each hook subscribes to the database's events and reads a
 * snapshot that stays the same object until what it shows changes:
 * `db.get(id)` is cached by the database until that document changes, the
 * record of `useDocs` is rebuilt only after a change event, the presence
 * view only when the client replaces its peer list, and the status is a
 * string. So a component re-renders only when what it reads changed.
 *
 * Why there are no echo loops. Nothing here writes on its own: the database
 * is the only state, and writes happen only when you call `put`, `update` or
 * `remove`. Their change event re-renders the component, once.
 */

import { useCallback, useMemo, useSyncExternalStore } from 'react';
import type { DbStatus, Doc, Peer, Presence, SynclineDb, WriteOptions } from './client.js';

/** Writes to the document of {@link useDoc}. */
export interface DocActions<T extends object> {
  /** `db.put` for this document. */
  put(value: T, options?: WriteOptions): Promise<boolean>;
  /** `db.update` for this document. */
  update(fn: (draft: T) => T | void, options?: WriteOptions): Promise<boolean>;
  /** `db.delete` for this document. */
  remove(): Promise<boolean>;
}

/** What {@link usePresence} returns (the same object until presence changes). */
export interface PresenceView<S> {
  peers: readonly Peer<S>[];
  online: number;
  set(state: S | null): void;
}

/** One document (a frozen snapshot, `undefined` when absent) and its writers. */
export function useDoc<T extends object = Doc>(db: SynclineDb, id: string): [T | undefined, DocActions<T>] {
  const subscribe = useCallback(
    (onChange: () => void) =>
      db.subscribe((e) => {
        if (e.ids.includes(id)) onChange();
      }),
    [db, id],
  );
  const get = useCallback(() => db.get<T>(id), [db, id]);
  const doc = useSyncExternalStore(subscribe, get, get);
  const actions = useMemo<DocActions<T>>(
    () => ({
      put: (value, options) => db.put(id, value, options),
      update: (fn, options) => db.update<T>(id, fn, options),
      remove: () => db.delete(id),
    }),
    [db, id],
  );
  return [doc, actions];
}

interface DocsStore {
  subscribe(onChange: () => void): () => void;
  get(): Record<string, Doc>;
}

// One store per database, shared by every `useDocs` on it.
const docsStores = new WeakMap<SynclineDb, DocsStore>();

function docsStore(db: SynclineDb): DocsStore {
  let store = docsStores.get(db);
  if (!store) {
    let cache: Record<string, Doc> | null = null;
    const listeners = new Set<() => void>();
    // Always listening, so the cache is never stale, subscribers or not.
    db.subscribe(() => {
      cache = null;
      for (const cb of listeners) cb();
    });
    store = {
      subscribe(onChange) {
        listeners.add(onChange);
        return () => listeners.delete(onChange);
      },
      get: () => (cache ??= db.all()),
    };
    docsStores.set(db, store);
  }
  return store;
}

/** Every document, by id (the same object until a document changes). */
export function useDocs<T extends object = Doc>(db: SynclineDb): Readonly<Record<string, T>> {
  const store = docsStore(db);
  return useSyncExternalStore(store.subscribe, store.get, store.get) as Record<string, T>;
}

// The last view per presence, rebuilt when its peers list is (the client
// replaces both together).
const presenceViews = new WeakMap<Presence, PresenceView<unknown>>();

function presenceView(presence: Presence): PresenceView<unknown> {
  const peers = presence.peers;
  let view = presenceViews.get(presence);
  if (view?.peers !== peers) {
    view = { peers, online: presence.online, set: (state) => presence.set(state) };
    presenceViews.set(presence, view);
  }
  return view;
}

/** Who is on the database, and `set` to publish this client's state. */
export function usePresence<S = unknown>(db: SynclineDb): PresenceView<S> {
  const presence = db.presence;
  const subscribe = useCallback((onChange: () => void) => presence.subscribe(onChange), [presence]);
  const get = useCallback(() => presenceView(presence), [presence]);
  return useSyncExternalStore(subscribe, get, get) as PresenceView<S>;
}

/** The database's status: `offline`, `connecting`, `online` or `synced`. */
export function useStatus(db: SynclineDb): DbStatus {
  const subscribe = useCallback((onChange: () => void) => db.onStatus(() => onChange()), [db]);
  const get = useCallback(() => db.status, [db]);
  return useSyncExternalStore(subscribe, get, get);
}
