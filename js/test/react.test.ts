// @vitest-environment jsdom
import { act, createElement as h, type ReactNode } from 'react';
import { createRoot, type Root } from 'react-dom/client';
import { afterEach, beforeEach, describe, expect, it, vi } from 'vitest';
import { Syncline, type Doc, type SynclineDb } from '../src/node.js';
import { useDoc, useDocs, usePresence, useStatus, type DocActions } from '../src/react.js';

(globalThis as { IS_REACT_ACT_ENVIRONMENT?: boolean }).IS_REACT_ACT_ENVIRONMENT = true;

interface Todo extends Doc {
  title: string;
}

let client: Syncline;
let db: SynclineDb;
let container: HTMLElement;
let root: Root;
let consoleError: ReturnType<typeof vi.spyOn>;

beforeEach(async () => {
  client = await Syncline.connect(null, { storage: 'memory' });
  db = await client.open('db');
  container = document.createElement('div');
  root = createRoot(container);
  // React reports unstable snapshots and act() misuse here.
  consoleError = vi.spyOn(console, 'error');
});

afterEach(async () => {
  act(() => root.unmount());
  expect(consoleError).not.toHaveBeenCalled();
  consoleError.mockRestore();
  await client.close();
});

function render(node: ReactNode) {
  act(() => root.render(node));
}

describe('react binding', () => {
  it('useDoc re-renders on database changes, and only on its own document', async () => {
    await db.put('a', { title: 'milk' });
    let renders = 0;
    let actions!: DocActions<Todo>;
    function Title({ id }: { id: string }) {
      renders++;
      const [doc, act] = useDoc<Todo>(db, id);
      actions = act;
      return h('p', null, doc ? doc.title : '(none)');
    }
    render(h(Title, { id: 'a' }));
    expect(container.textContent).toBe('milk');
    const afterMount = renders;

    await act(() => db.put('a', { title: 'oat milk' }));
    expect(container.textContent).toBe('oat milk');
    expect(renders).toBe(afterMount + 1);

    await act(() => db.put('b', { title: 'eggs' }));
    expect(renders).toBe(afterMount + 1);

    await act(() =>
      actions.update((d) => {
        d.title = 'tea';
      }),
    );
    expect(db.get('a')).toEqual({ title: 'tea' });
    expect(container.textContent).toBe('tea');

    await act(() => actions.put({ title: 'coffee' }));
    expect(container.textContent).toBe('coffee');

    await act(() => actions.remove());
    expect(db.get('a')).toBeUndefined();
    expect(container.textContent).toBe('(none)');

    render(h(Title, { id: 'b' }));
    expect(container.textContent).toBe('eggs');
  });

  it('useDocs lists the documents live', async () => {
    await db.put('a', { title: 'milk' });
    function List() {
      const docs = useDocs<Todo>(db);
      return h(
        'ul',
        null,
        Object.entries(docs)
          .sort(([x], [y]) => x.localeCompare(y))
          .map(([id, d]) => h('li', { key: id }, d.title)),
      );
    }
    render(h('div', null, h(List), h(List)));
    expect(container.textContent).toBe('milkmilk');
    await act(() => db.put('b', { title: 'eggs' }));
    expect(container.textContent).toBe('milkeggsmilkeggs');
    await act(() => db.delete('a'));
    expect(container.textContent).toBe('eggseggs');
  });

  it('useStatus and usePresence without a server', () => {
    let presence!: ReturnType<typeof usePresence<{ name: string }>>;
    function Status() {
      presence = usePresence<{ name: string }>(db);
      return h('span', null, `${useStatus(db)} ${presence.online} ${presence.peers.length}`);
    }
    render(h(Status));
    expect(container.textContent).toBe('offline 0 0');
    act(() => presence.set({ name: 'ada' }));
    expect(container.textContent).toBe('offline 0 0');
  });
});
