// src/quickstart.ts (the quick start of js/README.md: `client`, `db`) and
// src/readme-react.tsx (the README's React example: `App`, `Todo`) are
// written from the README by ../consumers.test.mjs.
import { StrictMode, useState } from 'react';
import { createRoot } from 'react-dom/client';
import { db } from './quickstart.ts';
import { App } from './readme-react.tsx';

function NewTodo() {
  const [title, setTitle] = useState('');
  return (
    <form
      onSubmit={(e) => {
        e.preventDefault();
        void db.put(`todo:${crypto.randomUUID()}`, { title, done: false });
        setTitle('');
      }}
    >
      <input aria-label="new todo" value={title} onChange={(e) => setTitle(e.target.value)} />
    </form>
  );
}

createRoot(document.getElementById('root')!).render(
  <StrictMode>
    <NewTodo />
    <App />
  </StrictMode>,
);
