import { describe, expect, it } from 'vitest';
import { effectScope, nextTick, ref, watch } from 'vue';
import { Syncline, type Doc, type SynclineDb } from '../src/node.js';
import { useDoc, useDocs, usePresence, useStatus } from '../src/vue.js';

interface Todo extends Doc {
  title: string;
  tags: string[];
}

async function openDb(): Promise<{ client: Syncline; db: SynclineDb }> {
  const client = await Syncline.connect(null, { storage: 'memory' });
  return { client, db: await client.open('db') };
}

/** Count puts made through `db.put`; the returned `put` bypasses the count (a "remote" change). */
function countPuts(db: SynclineDb) {
  const put = db.put.bind(db);
  const counts = { puts: 0 };
  db.put = (id, value) => {
    counts.puts++;
    return put(id, value);
  };
  return { counts, put };
}

describe('vue binding', () => {
  it('useDoc follows the database live', async () => {
    const { client, db } = await openDb();
    await db.put('a', { title: 'milk', tags: [] });
    const scope = effectScope();
    const { doc } = scope.run(() => useDoc<Todo>(db, 'a'))!;
    expect(doc.value).toEqual({ title: 'milk', tags: [] });

    const seen: string[] = [];
    scope.run(() => watch(() => doc.value?.title, (t) => seen.push(String(t))));
    await db.put('a', { title: 'oat milk', tags: ['dairy-free'] });
    await nextTick();
    expect(doc.value).toEqual({ title: 'oat milk', tags: ['dairy-free'] });
    expect(seen).toEqual(['oat milk']);

    await db.delete('a');
    await nextTick();
    expect(doc.value).toBeUndefined();
    scope.stop();
    await client.close();
  });

  it('useDoc writes deep mutations back, without echo', async () => {
    const { client, db } = await openDb();
    await db.put('a', { title: 'milk', tags: ['x'] });
    const spy = countPuts(db);
    const scope = effectScope();
    const { doc, update, remove } = scope.run(() => useDoc<Todo>(db, 'a'))!;

    doc.value!.title = 'tea';
    await nextTick();
    expect(db.get('a')).toEqual({ title: 'tea', tags: ['x'] });
    doc.value!.tags.push('y');
    await nextTick();
    expect(db.get('a')).toEqual({ title: 'tea', tags: ['x', 'y'] });
    expect(spy.counts.puts).toBe(2);

    // Assigning an equal copy writes nothing.
    doc.value = { title: 'tea', tags: ['x', 'y'] };
    await nextTick();
    expect(spy.counts.puts).toBe(2);

    // A change from elsewhere updates the copy and is not written back.
    expect(await spy.put('a', { title: 'coffee', tags: [] })).toBe(true);
    await nextTick();
    expect(doc.value).toEqual({ title: 'coffee', tags: [] });
    expect(spy.counts.puts).toBe(2);

    // The copy is mutable and separate from the frozen snapshot.
    expect(Object.isFrozen(db.get('a'))).toBe(true);
    expect(Object.isFrozen(doc.value)).toBe(false);

    await update((d) => {
      d.title = 'cocoa';
    });
    await nextTick();
    expect(doc.value?.title).toBe('cocoa');
    expect(spy.counts.puts).toBe(3); // update's own put, nothing more

    await remove();
    await nextTick();
    expect(doc.value).toBeUndefined();
    expect(db.get('a')).toBeUndefined();

    // Assigning a whole document creates it.
    doc.value = { title: 'new', tags: [] };
    await nextTick();
    expect(db.get('a')).toEqual({ title: 'new', tags: [] });
    scope.stop();
    await client.close();
  });

  it('useDoc follows a reactive id', async () => {
    const { client, db } = await openDb();
    await db.put('a', { title: 'A', tags: [] });
    await db.put('b', { title: 'B', tags: [] });
    const id = ref('a');
    const scope = effectScope();
    const { doc } = scope.run(() => useDoc<Todo>(db, id))!;
    expect(doc.value?.title).toBe('A');
    id.value = 'b';
    await nextTick();
    expect(doc.value?.title).toBe('B');
    doc.value!.title = 'B2';
    await nextTick();
    expect(db.get('b')?.title).toBe('B2');
    expect(db.get('a')?.title).toBe('A');
    await db.put('a', { title: 'A2', tags: [] });
    await nextTick();
    expect(doc.value?.title).toBe('B2');
    scope.stop();
    await client.close();
  });

  it('stops when its scope is disposed', async () => {
    const { client, db } = await openDb();
    await db.put('a', { title: 'milk', tags: [] });
    const spy = countPuts(db);
    const scope = effectScope();
    const { doc, docs, status } = scope.run(() => ({
      ...useDoc<Todo>(db, 'a'),
      docs: useDocs<Todo>(db),
      status: useStatus(db),
    }))!;
    scope.stop();

    await spy.put('a', { title: 'tea', tags: [] });
    await spy.put('b', { title: 'eggs', tags: [] });
    await nextTick();
    expect(doc.value?.title).toBe('milk');
    expect(Object.keys(docs.value)).toEqual(['a']);
    expect(status.value).toBe('offline');

    doc.value!.title = 'local only';
    await nextTick();
    expect(spy.counts.puts).toBe(0);
    expect(db.get('a')?.title).toBe('tea');
    await client.close();
  });

  it('useDocs lists every document live', async () => {
    const { client, db } = await openDb();
    await db.put('a', { title: 'milk', tags: [] });
    const scope = effectScope();
    const docs = scope.run(() => useDocs<Todo>(db))!;
    expect(docs.value).toEqual({ a: { title: 'milk', tags: [] } });
    const first = docs.value;
    await db.put('b', { title: 'eggs', tags: [] });
    await nextTick();
    expect(docs.value).toEqual({ a: { title: 'milk', tags: [] }, b: { title: 'eggs', tags: [] } });
    expect(docs.value.a).toBe(first.a); // unchanged documents keep their snapshot
    await db.delete('a');
    await nextTick();
    expect(Object.keys(docs.value)).toEqual(['b']);
    scope.stop();
    await client.close();
  });

  it('useStatus and usePresence without a server', async () => {
    const { client, db } = await openDb();
    const scope = effectScope();
    const { status, presence } = scope.run(() => ({ status: useStatus(db), presence: usePresence<{ name: string }>(db) }))!;
    expect(status.value).toBe('offline');
    expect(presence.online.value).toBe(0);
    expect(presence.peers.value).toEqual([]);
    presence.set({ name: 'ada' }); // kept for when a connection comes up
    scope.stop();
    await client.close();
  });
});
