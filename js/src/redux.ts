/**
 * Redux binding: mirror one slice of the store, `state[slice]` (documents by
 * id), into a Syncline database.
 *
 * How it works. `synclineMiddleware` remembers the slice it last saw in step
 * with the database. After any action that is not its own it compares that
 * with the new slice, by reference per id, and writes what differs: `db.put`
 * for changed or added documents, `db.delete` for removed ones. The other way
 * round, on each database change it compares `db.get(id)` with the slice
 * (deep equality) and, where they differ, dispatches one `syncline/changed`
 * action, which `synclineReducer` merges into the slice.
 *
 * Why there are no echo loops. The middleware's own `syncline/changed`
 * actions never cause writes: they only move the remembered slice forward.
 * The change event of a local write finds the database equal to the slice
 * (writes apply synchronously), so it dispatches nothing. And putting a value
 * the database already holds records nothing and fires no event.
 *
 * Keep the slice immutable, as Redux asks: a document mutated in place keeps
 * its reference and is not written.
 */

import type { Action, Middleware, Reducer } from 'redux';
import type { DbStatus, Doc, SynclineDb } from './client.js';
import { deepEqual } from './equal.js';
import { getOwn, setOwn } from './own.js';

/** The type of the action the middleware dispatches when the database changes. */
export const SYNCLINE_CHANGED = 'syncline/changed';

/** The type of the action the middleware dispatches when the database's status changes. */
export const SYNCLINE_STATUS = 'syncline/status';

/** The database's status changed (see `SynclineDb.status`). */
export type SynclineStatusAction = {
  type: typeof SYNCLINE_STATUS;
  payload: { slice: string; status: DbStatus };
};

/** A mirrored slice: documents by id. */
export type DocsState<D extends object = Doc> = Record<string, D>;

/** Documents that changed in the database; `null` means deleted. */
export type SynclineChangedAction<D extends object = Doc> = {
  type: typeof SYNCLINE_CHANGED;
  payload: { slice: string; docs: Record<string, D | null> };
};

/** Options of {@link synclineMiddleware}. */
export interface SynclineMiddlewareOptions {
  /** Key of the mirrored slice in the root state. */
  slice: string;
  /** Called when a write fails (default: `console.error`). */
  onError?: (error: unknown, info: { id: string; op: 'put' | 'delete' }) => void;
  /**
   * Keys whose strings are values replaced whole (e.g. `['status']`); every
   * other string is collaborative text (see `WriteOptions.atomic`).
   */
  atomic?: string[];
  /** @deprecated Strings are collaborative text by default; this changes nothing. */
  text?: string[];
}

/** Make a {@link SynclineChangedAction} (the middleware does this for you). */
export function synclineChanged<D extends object = Doc>(
  slice: string,
  docs: Record<string, D | null>,
): SynclineChangedAction<D> {
  return { type: SYNCLINE_CHANGED, payload: { slice, docs } };
}

/** Whether `action` is a {@link SynclineChangedAction} (for `slice`, if given). */
export function isSynclineChanged(action: unknown, slice?: string): action is SynclineChangedAction {
  const a = action as Partial<SynclineChangedAction> | null;
  return (
    typeof a === 'object' &&
    a !== null &&
    a.type === SYNCLINE_CHANGED &&
    typeof a.payload === 'object' &&
    a.payload !== null &&
    (slice === undefined || a.payload.slice === slice)
  );
}

/**
 * Mirror `state[slice]` into `db`. On the first action, or at the latest one
 * microtask after the store is created, the slice is replaced by the stored
 * documents (the database is the source of truth: seed it, not the
 * preloaded state).
 */
export function synclineMiddleware(db: SynclineDb, options: SynclineMiddlewareOptions): Middleware {
  const { slice } = options;
  const onError =
    options.onError ??
    ((error, { id, op }) => console.error(`syncline/redux: ${op} of ${JSON.stringify(id)} failed`, error));

  return ({ getState, dispatch }) => {
    const read = (): Partial<DocsState> => (getState() as Record<string, DocsState | undefined>)?.[slice] ?? {};
    // The slice as last known to match the database.
    let last: Partial<DocsState> = {};
    let started = false;

    const write = (op: 'put' | 'delete', id: string, run: () => Promise<boolean>) => {
      try {
        run().catch((e: unknown) => onError(e, { id, op }));
      } catch (e) {
        onError(e, { id, op });
      }
    };

    // Slice → database: write what differs from the last known slice.
    const push = () => {
      const current = read();
      if (current === last) return;
      const previous = last;
      last = current; // before writing, so nested dispatches diff from here
      for (const id of new Set([...Object.keys(previous), ...Object.keys(current)])) {
        const doc = getOwn(current, id);
        if (doc === getOwn(previous, id)) continue;
        if (doc == null) write('delete', id, () => db.delete(id));
        else write('put', id, () => db.put(id, doc, { atomic: options.atomic }));
      }
    };

    // Database → slice: one action with the documents that differ.
    const pull = (ids: Iterable<string>) => {
      const current = read();
      const docs: Record<string, Doc | null> = {};
      let any = false;
      for (const id of ids) {
        const stored = db.get(id);
        if (deepEqual(stored, getOwn(current, id) ?? undefined)) continue;
        setOwn(docs, id, stored ?? null);
        any = true;
      }
      if (any) dispatch(synclineChanged(slice, docs));
    };

    const start = () => {
      if (started) return;
      started = true;
      db.subscribe((e) => pull(e.ids));
      pull(new Set([...db.list(), ...Object.keys(read())]));
      last = read();
      const status = (s: DbStatus): SynclineStatusAction => ({ type: SYNCLINE_STATUS, payload: { slice, status: s } });
      db.onStatus((s) => dispatch(status(s)));
      dispatch(status(db.status));
    };
    // Dispatching is not allowed while the store is being built.
    queueMicrotask(start);

    return (next) => (action) => {
      start();
      const result = next(action);
      if (isSynclineChanged(action, slice)) last = read();
      else if ((action as Partial<SynclineStatusAction>)?.type !== SYNCLINE_STATUS) push();
      return result;
    };
  };
}

/**
 * The slice's reducer: merges `syncline/changed` for `slice` (a new object;
 * `null` documents are removed) and hands every other action to `reducer`
 * (or keeps the state, `{}` at first, when there is none).
 *
 * It has the type of the reducer it wraps (without one, a reducer of
 * `DocsState`; name another as `synclineReducer<Reducer<DocsState<Todo>>>`):
 * a type computed from generics would be inferred from its context inside
 * `configureStore({ reducer: {…}, middleware: … })`, making the store's
 * state `any`.
 */
export function synclineReducer<R extends Reducer<any, any, any> = Reducer<DocsState>>(slice: string, reducer?: R): R {
  const wrapped: Reducer<DocsState, Action> = (state, action) => {
    if (isSynclineChanged(action, slice)) {
      const next = { ...(state ?? {}) };
      for (const [id, doc] of Object.entries((action as SynclineChangedAction).payload.docs)) {
        if (doc === null) delete next[id];
        else setOwn(next, id, doc);
      }
      return next;
    }
    return reducer ? reducer(state, action) : (state ?? {});
  };
  return wrapped as R;
}

/**
 * A reducer of the mirrored database's status for `slice` (`offline`,
 * `connecting`, `online`, `synced`, `refused`; `connecting` until the
 * middleware reports), for a sync badge: `reducer: { todos:
 * synclineReducer('todos', …), todosStatus: synclineStatusReducer('todos') }`.
 * Why a database is refused: `db.refusal`.
 */
export function synclineStatusReducer(slice: string): Reducer<DbStatus> {
  return (state = 'connecting', action) => {
    const a = action as Partial<SynclineStatusAction>;
    return a.type === SYNCLINE_STATUS && a.payload?.slice === slice ? a.payload.status : state;
  };
}
