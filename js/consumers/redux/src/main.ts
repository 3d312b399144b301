// A Redux store mirrored into Syncline, rendered with plain DOM calls.
// src/quickstart.ts (the quick start of js/README.md: `client`, `db`) is
// written from the README by ../consumers.test.mjs.
import { applyMiddleware, combineReducers, createStore, type UnknownAction } from 'redux';
import { synclineMiddleware, synclineReducer, type DocsState } from 'syncline/redux';
import { db } from './quickstart.ts';

type Todo = { title: string; done: boolean };
const add = (id: string, title: string) => ({ type: 'todos/add', id, title }) as const;
const toggle = (id: string) => ({ type: 'todos/toggle', id }) as const;
type TodoAction = ReturnType<typeof add> | ReturnType<typeof toggle>;
const isTodoAction = (a: UnknownAction): a is TodoAction => a.type === 'todos/add' || a.type === 'todos/toggle';

function todos(state: DocsState<Todo> = {}, action: UnknownAction): DocsState<Todo> {
  if (!isTodoAction(action)) return state;
  switch (action.type) {
    case 'todos/add':
      return { ...state, [action.id]: { title: action.title, done: false } };
    case 'todos/toggle': {
      const todo = state[action.id];
      return todo ? { ...state, [action.id]: { ...todo, done: !todo.done } } : state;
    }
  }
}

const store = createStore(
  combineReducers({ todos: synclineReducer('todos', todos) }),
  applyMiddleware(synclineMiddleware(db, { slice: 'todos', onError: (e) => console.error(e) })),
);

const app = document.querySelector<HTMLDivElement>('#app')!;
const input = document.createElement('input');
input.setAttribute('aria-label', 'new todo');
const form = document.createElement('form');
const list = document.createElement('ul');
form.append(input);
app.append(form, list);
form.addEventListener('submit', (e) => {
  e.preventDefault();
  store.dispatch(add(`todo:${crypto.randomUUID()}`, input.value));
  input.value = '';
});

function render() {
  const items = Object.entries(store.getState().todos).map(([id, todo]) => {
    const box = Object.assign(document.createElement('input'), { type: 'checkbox', checked: todo.done });
    box.addEventListener('change', () => store.dispatch(toggle(id)));
    const li = document.createElement('li');
    li.append(box, ` ${todo.title}`);
    return li;
  });
  list.replaceChildren(...items);
}
store.subscribe(render);
render();
