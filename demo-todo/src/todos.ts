// The todo list's Redux slice: documents by id, mirrored into a Syncline
// database by `syncline/redux` (each todo is one document).
import type { Reducer } from 'redux';

export type Todo = {
  title: string;
  completed: boolean;
  createdAt: number;
};

export type Todos = Record<string, Todo>;

export type TodoAction =
  | { type: 'todos/add'; id: string; title: string; createdAt: number }
  | { type: 'todos/edit'; id: string; title: string }
  | { type: 'todos/toggle'; id: string }
  | { type: 'todos/toggleAll'; completed: boolean }
  | { type: 'todos/destroy'; id: string }
  | { type: 'todos/clearCompleted' };

export const add = (title: string): TodoAction => ({
  type: 'todos/add',
  id: `todo:${crypto.randomUUID()}`,
  title,
  createdAt: Date.now(),
});

export const todosReducer: Reducer<Todos, TodoAction> = (state = {}, action) => {
  switch (action.type) {
    case 'todos/add':
      return { ...state, [action.id]: { title: action.title, completed: false, createdAt: action.createdAt } };
    case 'todos/edit': {
      const todo = state[action.id];
      return todo ? { ...state, [action.id]: { ...todo, title: action.title } } : state;
    }
    case 'todos/toggle': {
      const todo = state[action.id];
      return todo ? { ...state, [action.id]: { ...todo, completed: !todo.completed } } : state;
    }
    case 'todos/toggleAll':
      return Object.fromEntries(
        Object.entries(state).map(([id, t]) => [id, t.completed === action.completed ? t : { ...t, completed: action.completed }]),
      );
    case 'todos/destroy': {
      const { [action.id]: _gone, ...rest } = state;
      return rest;
    }
    case 'todos/clearCompleted':
      return Object.fromEntries(Object.entries(state).filter(([, t]) => !t.completed));
    default:
      return state;
  }
};

/** Oldest first; ties broken by id so every replica shows the same order. */
export function ordered(todos: Todos): [string, Todo][] {
  return Object.entries(todos).sort(([a, x], [b, y]) => (x.createdAt ?? 0) - (y.createdAt ?? 0) || (a < b ? -1 : 1));
}
