// A Vue 3 app with render functions (no SFC plugin). src/quickstart.ts (the
// quick start of js/README.md: `client`, `db`) is written from the README by
// ../consumers.test.mjs.
import { createApp, defineComponent, h, ref } from 'vue';
import { useDoc, useDocs, useStatus } from 'syncline/vue';
import { db } from './quickstart.ts';

type Todo = { title: string; done: boolean };

const TodoItem = defineComponent({
  props: { id: { type: String, required: true } },
  setup(props) {
    // A live copy: mutating it writes the document back.
    const { doc, remove } = useDoc<Todo>(db, () => props.id);
    return () => {
      const todo = doc.value;
      if (!todo) return null;
      return h('li', [
        h('input', { type: 'checkbox', checked: todo.done, onChange: () => (todo.done = !todo.done) }),
        h('input', {
          class: 'title',
          value: todo.title,
          onInput: (e: Event) => (todo.title = (e.target as HTMLInputElement).value),
        }),
        h('button', { onClick: () => remove() }, '×'),
      ]);
    };
  },
});

const App = defineComponent({
  setup() {
    const todos = useDocs<Todo>(db);
    const status = useStatus(db);
    const title = ref('');
    const add = (e: Event) => {
      e.preventDefault();
      void db.put(`todo:${crypto.randomUUID()}`, { title: title.value, done: false });
      title.value = '';
    };
    return () =>
      h('main', { 'data-status': status.value }, [
        h('form', { onSubmit: add }, [
          h('input', {
            'aria-label': 'new todo',
            value: title.value,
            onInput: (e: Event) => (title.value = (e.target as HTMLInputElement).value),
          }),
        ]),
        h('ul', Object.keys(todos.value).map((id) => h(TodoItem, { key: id, id }))),
      ]);
  },
});

createApp(App).mount('#app');
