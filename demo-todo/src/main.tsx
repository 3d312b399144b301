import 'todomvc-common/base.css';
import 'todomvc-app-css/index.css';
import './badge.css';

import { createRoot } from 'react-dom/client';
import { Provider } from 'react-redux';
import { applyMiddleware, createStore, type UnknownAction } from 'redux';
import { Syncline, isSynclineError } from 'syncline';
import { synclineMiddleware, synclineReducer } from 'syncline/redux';
import { App } from './App';
import { todosReducer, type Todo, type TodoAction, type Todos } from './todos';

/** `?list=NAME` picks the list (one database each); default: one shared list. */
function listName(): string {
  const raw = new URLSearchParams(location.search).get('list') ?? 'shared';
  const clean = raw.replace(/[^A-Za-z0-9._-]/g, '-').slice(0, 100);
  return clean || 'shared';
}

const list = listName();
// The server that serves this page also syncs it.
const server = new URL('/sync', location.href);
server.protocol = location.protocol === 'https:' ? 'wss:' : 'ws:';

const client = await Syncline.connect(server.toString(), { name: 'todomvc' });
const db = await client.open(`todo-${list}`);
const todos = synclineReducer('todos', todosReducer);
const store = createStore(
  (state: { todos: Todos } | undefined, action: UnknownAction) => ({
    todos: todos(state?.todos, action as TodoAction),
  }),
  applyMiddleware(
    synclineMiddleware(db, {
      slice: 'todos',
      onError: (e) => console.error(isSynclineError(e) ? `${e.code}: ${e.message}` : e),
    }),
  ),
);

createRoot(document.getElementById('root')!).render(
  <Provider store={store}>
    <App db={db} list={list} />
  </Provider>,
);

// Keep the app itself available offline (the data already is, in IndexedDB).
if ('serviceWorker' in navigator) {
  navigator.serviceWorker.register(`${import.meta.env.BASE_URL}sw.js`).catch((e) => console.warn('no offline app shell:', e));
}

// For the end-to-end tests and the curious: `syncline.db.get(id)` in the console.
Object.assign(globalThis, { syncline: { client, db, store } });
