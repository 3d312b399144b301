// Documents declared as interfaces (no index signature) work everywhere a
// document type is taken: most apps write `interface Todo {…}`.
import type { SynclineDb } from 'syncline';
import { useDoc, useDocs } from 'syncline/react';
import type { Reducer } from '@reduxjs/toolkit';
import { synclineReducer, type DocsState } from 'syncline/redux';
import { useDoc as useVueDoc, useDocs as useVueDocs } from 'syncline/vue';

interface Todo {
  title: string;
  done: boolean;
  tags?: string[];
}

export async function plain(db: SynclineDb, todo: Todo): Promise<boolean> {
  await db.put('todo:1', todo);
  const got: Todo | undefined = db.get<Todo>('todo:1');
  const all: Record<string, Todo> = db.all<Todo>();
  await db.update<Todo>('todo:1', (d) => {
    d.done = !d.done;
  });
  return got?.done === true && Object.keys(all).length > 0;
}

export function react(db: SynclineDb): string {
  const [todo, { put, update }] = useDoc<Todo>(db, 'todo:1');
  const todos: Readonly<Record<string, Todo>> = useDocs<Todo>(db);
  void put({ title: 'milk', done: false });
  void update((d) => ({ ...d, done: true }));
  return `${todo?.title} ${Object.keys(todos).length}`;
}

export function vue(db: SynclineDb): number {
  const { doc } = useVueDoc<Todo>(db, 'todo:1');
  const todos = useVueDocs<Todo>(db);
  return (doc.value?.title.length ?? 0) + Object.keys(todos.value).length;
}

export const reducer = synclineReducer('todos', (state: DocsState<Todo> = {}) => state);
export const bare: Reducer<DocsState<Todo>> = synclineReducer<Reducer<DocsState<Todo>>>('todos');

// @ts-expect-error a document is an object, not a string
export const wrong = (db: SynclineDb) => db.put('x', 'not an object');

// Redux Toolkit: the store's state keeps its type through synclineReducer
// and synclineMiddleware (it was `any`).
import { configureStore, createSlice } from '@reduxjs/toolkit';
import { synclineMiddleware } from 'syncline/redux';

export function toolkit(db: SynclineDb): Todo | undefined {
  const todos = createSlice({ name: 'todos', initialState: {} as DocsState<Todo>, reducers: {} });
  const store = configureStore({
    reducer: { todos: synclineReducer('todos', todos.reducer) },
    middleware: (defaults) => defaults().concat(synclineMiddleware(db, { slice: 'todos' })),
  });
  // @ts-expect-error the state is typed, so a wrong assignment is caught
  const wrong: { x: 1 } = store.getState();
  void wrong;
  return store.getState().todos['todo:1'];
}
