// TodoMVC (https://todomvc.com) on a Redux store whose `todos` slice is a
// Syncline database: every browser on the same list sees changes live, and
// edits made offline merge when the connection returns.
import { useEffect, useRef, useState, type KeyboardEvent } from 'react';
import { useDispatch, useSelector } from 'react-redux';
import type { SynclineDb } from 'syncline';
import { usePresence, useStatus } from 'syncline/react';
import { add, ordered, type Todo, type Todos } from './todos';

type Filter = 'all' | 'active' | 'completed';

function useHashFilter(): Filter {
  const read = (): Filter => {
    const h = location.hash.replace(/^#\/?/, '');
    return h === 'active' || h === 'completed' ? h : 'all';
  };
  const [filter, setFilter] = useState(read);
  useEffect(() => {
    const on = () => setFilter(read());
    addEventListener('hashchange', on);
    return () => removeEventListener('hashchange', on);
  }, []);
  return filter;
}

const STATUS_TEXT = {
  offline: 'Offline',
  connecting: 'Connecting…',
  online: 'Syncing…',
  synced: 'Synced',
  refused: 'Not synced: refused by the server',
} as const;

function SyncBar({ db, list }: { db: SynclineDb; list: string }) {
  const status = useStatus(db);
  const { online } = usePresence(db);
  return (
    <div className="sync-bar">
      <span className={`badge ${status}`} data-testid="status" data-status={status} title={db.refusal?.message}>
        {STATUS_TEXT[status]}
      </span>
      {(status === 'online' || status === 'synced') && (
        <span data-testid="online">
          {online} {online === 1 ? 'person' : 'people'} here
        </span>
      )}
      <a href={`?list=${encodeURIComponent(list)}${location.hash}`} title="Share this link to share the list">
        list “{list}”
      </a>
    </div>
  );
}

function Item({ id, todo }: { id: string; todo: Todo }) {
  const dispatch = useDispatch();
  const [editing, setEditing] = useState(false);
  const [draft, setDraft] = useState(todo.title);
  const input = useRef<HTMLInputElement>(null);
  useEffect(() => {
    if (editing) input.current?.focus();
  }, [editing]);

  const save = () => {
    if (!editing) return;
    setEditing(false);
    const title = draft.trim();
    if (!title) dispatch({ type: 'todos/destroy', id });
    else if (title !== todo.title) dispatch({ type: 'todos/edit', id, title });
  };
  const onKey = (e: KeyboardEvent<HTMLInputElement>) => {
    if (e.key === 'Enter') save();
    if (e.key === 'Escape') {
      setDraft(todo.title);
      setEditing(false);
    }
  };

  return (
    <li className={[todo.completed && 'completed', editing && 'editing'].filter(Boolean).join(' ')} data-id={id}>
      <div className="view">
        <input className="toggle" type="checkbox" checked={todo.completed} onChange={() => dispatch({ type: 'todos/toggle', id })} />
        <label
          onDoubleClick={() => {
            setDraft(todo.title);
            setEditing(true);
          }}
        >
          {todo.title}
        </label>
        <button className="destroy" aria-label="Delete" onClick={() => dispatch({ type: 'todos/destroy', id })} />
      </div>
      {editing && (
        <input ref={input} className="edit" value={draft} onChange={(e) => setDraft(e.target.value)} onBlur={save} onKeyDown={onKey} />
      )}
    </li>
  );
}

export function App({ db, list }: { db: SynclineDb; list: string }) {
  const todos = useSelector((s: { todos: Todos }) => s.todos);
  const dispatch = useDispatch();
  const filter = useHashFilter();
  const [title, setTitle] = useState('');

  const all = ordered(todos).filter(([, t]) => typeof t?.title === 'string');
  const active = all.filter(([, t]) => !t.completed).length;
  const completed = all.length - active;
  const shown = all.filter(([, t]) => (filter === 'all' ? true : filter === 'active' ? !t.completed : t.completed));

  const onNew = (e: KeyboardEvent<HTMLInputElement>) => {
    if (e.key !== 'Enter') return;
    const t = title.trim();
    if (t) dispatch(add(t));
    setTitle('');
  };

  return (
    <>
      <section className="todoapp">
        <header className="header">
          <h1>todos</h1>
          <input
            className="new-todo"
            placeholder="What needs to be done?"
            autoFocus
            value={title}
            onChange={(e) => setTitle(e.target.value)}
            onKeyDown={onNew}
          />
        </header>
        {all.length > 0 && (
          <main className="main">
            <div className="toggle-all-container">
              <input
                id="toggle-all"
                className="toggle-all"
                type="checkbox"
                checked={active === 0}
                onChange={() => dispatch({ type: 'todos/toggleAll', completed: active !== 0 })}
              />
              <label htmlFor="toggle-all">Mark all as complete</label>
            </div>
            <ul className="todo-list">
              {shown.map(([id, todo]) => (
                <Item key={id} id={id} todo={todo} />
              ))}
            </ul>
          </main>
        )}
        {all.length > 0 && (
          <footer className="footer">
            <span className="todo-count">
              <strong>{active}</strong> {active === 1 ? 'item' : 'items'} left
            </span>
            <ul className="filters">
              {(['all', 'active', 'completed'] as const).map((f) => (
                <li key={f}>
                  <a href={`#/${f === 'all' ? '' : f}`} className={filter === f ? 'selected' : undefined}>
                    {f[0].toUpperCase() + f.slice(1)}
                  </a>
                </li>
              ))}
            </ul>
            {completed > 0 && (
              <button className="clear-completed" onClick={() => dispatch({ type: 'todos/clearCompleted' })}>
                Clear completed
              </button>
            )}
          </footer>
        )}
      </section>
      <footer className="info">
        <SyncBar db={db} list={list} />
        <p>Double-click to edit a todo</p>
        <p>
          Synced by <a href="https://example.invalid/syncline">Syncline</a> · Part of <a href="https://todomvc.com">TodoMVC</a>
        </p>
      </footer>
    </>
  );
}
