import { applyMiddleware, combineReducers, createStore, type Middleware, type Reducer, type UnknownAction } from 'redux';
import { describe, expect, it } from 'vitest';
import { Syncline, type Doc, type SynclineDb } from '../src/node.js';
import {
  SYNCLINE_CHANGED,
  SYNCLINE_STATUS,
  synclineChanged,
  synclineMiddleware,
  synclineReducer,
  synclineStatusReducer,
  type DocsState,
} from '../src/redux.js';

interface Todo extends Doc {
  title: string;
  done: boolean;
}

type TodoAction =
  | { type: 'todos/add'; id: string; title: string }
  | { type: 'todos/toggle'; id: string }
  | { type: 'todos/remove'; id: string };

const todos: Reducer<DocsState<Todo>, UnknownAction> = (state = {}, action) => {
  const a = action as TodoAction;
  switch (a.type) {
    case 'todos/add':
      return { ...state, [a.id]: { title: a.title, done: false } };
    case 'todos/toggle': {
      const t = state[a.id];
      return t ? { ...state, [a.id]: { ...t, done: !t.done } } : state;
    }
    case 'todos/remove': {
      const { [a.id]: _gone, ...rest } = state;
      return rest;
    }
    default:
      return state;
  }
};

async function openDb(): Promise<{ client: Syncline; db: SynclineDb }> {
  const client = await Syncline.connect(null, { storage: 'memory' });
  return { client, db: await client.open('db') };
}

/** Count the middleware's writes; `put`/`delete` here bypass the counters (a "remote" change). */
function countWrites(db: SynclineDb) {
  const put = db.put.bind(db);
  const del = db.delete.bind(db);
  const counts = { puts: 0, deletes: 0 };
  db.put = (id, value) => {
    counts.puts++;
    return put(id, value);
  };
  db.delete = (id) => {
    counts.deletes++;
    return del(id);
  };
  return { counts, put, delete: del };
}

function makeStore(db: SynclineDb, extra: { onError?: (e: unknown) => void; preloaded?: DocsState<Todo> } = {}) {
  const actions: UnknownAction[] = [];
  // The status reports are left out (tested on their own).
  const record: Middleware = () => (next) => (action) => {
    if ((action as UnknownAction).type !== SYNCLINE_STATUS) actions.push(action as UnknownAction);
    return next(action);
  };
  const store = createStore(
    combineReducers({ todos: synclineReducer('todos', todos), other: (s: number = 0) => s }),
    extra.preloaded ? { todos: extra.preloaded } : undefined,
    applyMiddleware(synclineMiddleware(db, { slice: 'todos', onError: extra.onError }), record),
  );
  return { store, actions };
}

/** Resolves on the store's next notification (the initial load is one). */
function nextNotification(store: { subscribe(cb: () => void): () => void }): Promise<void> {
  return new Promise((resolve) => {
    const off = store.subscribe(() => {
      off();
      resolve();
    });
  });
}

describe('redux binding', () => {
  it('writes local actions to the database, deletes included, with no echo', async () => {
    const { client, db } = await openDb();
    const spy = countWrites(db);
    const { store, actions } = makeStore(db);
    store.dispatch({ type: 'todos/add', id: 'a', title: 'milk' });
    store.dispatch({ type: 'todos/add', id: 'b', title: 'eggs' });
    store.dispatch({ type: 'todos/toggle', id: 'a' });
    expect(db.get('a')).toEqual({ title: 'milk', done: true });
    expect(db.get('b')).toEqual({ title: 'eggs', done: false });
    expect(spy.counts).toEqual({ puts: 3, deletes: 0 });

    store.dispatch({ type: 'todos/remove', id: 'b' });
    expect(db.get('b')).toBeUndefined();
    expect(db.list()).toEqual(['a']);
    expect(spy.counts).toEqual({ puts: 3, deletes: 1 });

    // An action that leaves the slice alone writes nothing.
    store.dispatch({ type: 'unrelated' });
    expect(spy.counts).toEqual({ puts: 3, deletes: 1 });
    // Our own writes never come back as syncline/changed.
    expect(actions.map((a) => a.type)).toEqual([
      'todos/add',
      'todos/add',
      'todos/toggle',
      'todos/remove',
      'unrelated',
    ]);
    expect(store.getState().todos).toEqual({ a: { title: 'milk', done: true } });
    await client.close();
  });

  it('a change made in the database reaches the slice in one dispatch and zero writes', async () => {
    const { client, db } = await openDb();
    const spy = countWrites(db);
    const { store, actions } = makeStore(db);
    store.dispatch({ type: 'todos/add', id: 'a', title: 'milk' });
    expect(spy.counts.puts).toBe(1);
    actions.length = 0;

    expect(await spy.put('a', { title: 'oat milk', done: true })).toBe(true);
    expect(store.getState().todos.a).toEqual({ title: 'oat milk', done: true });
    expect(store.getState().todos.a).toBe(db.get('a'));
    expect(actions).toEqual([
      { type: SYNCLINE_CHANGED, payload: { slice: 'todos', docs: { a: { title: 'oat milk', done: true } } } },
    ]);

    expect(await spy.put('c', { title: 'tea', done: false })).toBe(true);
    expect(await spy.delete('a')).toBe(true);
    expect(store.getState().todos).toEqual({ c: { title: 'tea', done: false } });
    expect(actions.map((a) => a.payload)).toEqual([
      { slice: 'todos', docs: { a: { title: 'oat milk', done: true } } },
      { slice: 'todos', docs: { c: { title: 'tea', done: false } } },
      { slice: 'todos', docs: { a: null } },
    ]);
    expect(spy.counts).toEqual({ puts: 1, deletes: 0 });

    // The slice keeps working locally afterwards.
    store.dispatch({ type: 'todos/toggle', id: 'c' });
    expect(db.get('c')).toEqual({ title: 'tea', done: true });
    expect(spy.counts).toEqual({ puts: 2, deletes: 0 });
    await client.close();
  });

  it('loads the stored documents when the store starts', async () => {
    const { client, db } = await openDb();
    await db.put('a', { title: 'milk', done: false });
    await db.put('b', { title: 'eggs', done: true });
    const spy = countWrites(db);
    // The database is the source of truth: a preloaded document it lacks is dropped.
    const { store, actions } = makeStore(db, { preloaded: { stale: { title: 'old', done: false } } });
    await nextNotification(store);
    expect(store.getState().todos).toEqual({
      a: { title: 'milk', done: false },
      b: { title: 'eggs', done: true },
    });
    expect(actions.map((a) => a.type)).toEqual([SYNCLINE_CHANGED]);
    expect(spy.counts).toEqual({ puts: 0, deletes: 0 });
    expect(db.list().sort()).toEqual(['a', 'b']);
    await client.close();
  });

  it('loads before the first action when that comes first', async () => {
    const { client, db } = await openDb();
    await db.put('a', { title: 'milk', done: false });
    const spy = countWrites(db);
    const { store, actions } = makeStore(db);
    store.dispatch({ type: 'todos/add', id: 'b', title: 'eggs' });
    expect(store.getState().todos).toEqual({
      a: { title: 'milk', done: false },
      b: { title: 'eggs', done: false },
    });
    expect(actions.map((a) => a.type)).toEqual([SYNCLINE_CHANGED, 'todos/add']);
    expect(spy.counts).toEqual({ puts: 1, deletes: 0 });
    await client.close();
  });

  it('reports failed writes to onError', async () => {
    const { client, db } = await openDb();
    let onError!: (e: unknown) => void;
    const failed = new Promise<unknown>((resolve) => (onError = resolve));
    const { store } = makeStore(db, { onError });
    store.dispatch({ type: 'todos/add', id: '', title: 'no id' });
    expect(await failed).toMatchObject({ name: 'SynclineError', code: 'InvalidDocumentId' });
    await client.close();
  });

  it("reports the database's status to synclineStatusReducer, without writing", async () => {
    const { client, db } = await openDb();
    const store = createStore(
      combineReducers({ todos: synclineReducer('todos', todos), status: synclineStatusReducer('todos') }),
      applyMiddleware(synclineMiddleware(db, { slice: 'todos' })),
    );
    expect(store.getState().status).toBe('connecting');
    await nextNotification(store);
    // No server: the database is offline, and nothing was written for it.
    expect(store.getState().status).toBe('offline');
    expect(db.list()).toEqual([]);
    // Another slice's report is not this one's.
    store.dispatch({ type: SYNCLINE_STATUS, payload: { slice: 'other', status: 'refused' } });
    expect(store.getState().status).toBe('offline');
    await client.close();
  });

  it('synclineReducer merges its own slice, deletes nulls and delegates the rest', () => {
    const reducer = synclineReducer('todos', todos);
    const s0 = reducer(undefined, { type: '@@init' });
    expect(s0).toEqual({});
    const s1 = reducer(s0, { type: 'todos/add', id: 'a', title: 'milk' });
    const s2 = reducer(s1, synclineChanged('todos', { b: { title: 'eggs', done: false }, a: null }));
    expect(s2).toEqual({ b: { title: 'eggs', done: false } });
    expect(s1).toEqual({ a: { title: 'milk', done: false } });
    expect(reducer(s2, synclineChanged('elsewhere', { a: { title: 'x', done: false } }))).toBe(s2);
    expect(synclineReducer('todos')(undefined, { type: 'any' })).toEqual({});
  });
});

describe('document ids that are Object.prototype keys', () => {
  it('"__proto__" is kept as a document by the reducer and by all()', async () => {
    // JSON.parse makes an own "__proto__" key, as the middleware's action does.
    const docs = JSON.parse('{"__proto__": {"title": "odd id"}}') as Record<string, Doc>;
    const state = synclineReducer('todos')({}, synclineChanged('todos', docs));
    expect(Object.prototype.hasOwnProperty.call(state, '__proto__')).toBe(true);
    expect(Object.getPrototypeOf(state)).toBe(Object.prototype);
    expect(Object.keys(state)).toEqual(['__proto__']);

    const { client, db } = await openDb();
    await db.put('__proto__', { title: 'odd id' });
    const all = db.all();
    expect(Object.keys(all)).toEqual(['__proto__']);
    expect(Object.getPrototypeOf(all)).toBe(Object.prototype);
    await client.close();
  });
});
