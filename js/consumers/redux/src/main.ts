// A Redux Toolkit store mirrored into Syncline, rendered with plain DOM calls.
// src/quickstart.ts (the quick start of js/README.md: `client`, `db`) and
// src/store.ts (its Redux example: `store`, `todos`) are written from the
// README by ../consumers.test.mjs.
import { store, todos } from './store.ts';

const add = (id: string, title: string) => todos.actions.add({ id, title });
const toggle = (id: string) => todos.actions.toggle(id);

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
