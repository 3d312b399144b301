import { describe, expect, it } from 'vitest';
import WebSocket, { WebSocketServer } from 'ws';
import { Syncline, isSynclineError } from '../src/node.js';

async function local() {
  return Syncline.connect(null, { storage: 'memory' });
}

describe('local API (Node, memory store)', () => {
  it('put, get, update, list, delete', async () => {
    const client = await local();
    const db = await client.open('org-42');
    expect(db.get('a')).toBeUndefined();
    expect(await db.put('a', { title: 'milk', done: false, n: 3, tags: ['x'] })).toBe(true);
    expect(db.get('a')).toEqual({ title: 'milk', done: false, n: 3, tags: ['x'] });
    expect(await db.put('a', { title: 'milk', done: false, n: 3, tags: ['x'] })).toBe(false);
    await db.update('a', (d) => {
      d.done = true;
      (d.tags as string[]).push('y');
    });
    expect(db.get('a')).toEqual({ title: 'milk', done: true, n: 3, tags: ['x', 'y'] });
    await db.put('b', { title: 'eggs' });
    expect(db.list().sort()).toEqual(['a', 'b']);
    expect(Object.keys(db.all()).sort()).toEqual(['a', 'b']);
    expect(await db.delete('a')).toBe(true);
    expect(db.get('a')).toBeUndefined();
    expect(db.list()).toEqual(['b']);
    await client.close();
  });

  it('snapshots are frozen and stable until changed', async () => {
    const client = await local();
    const db = await client.open('db');
    await db.put('a', { list: [1] });
    const first = db.get('a');
    expect(db.get('a')).toBe(first);
    expect(Object.isFrozen(first)).toBe(true);
    await db.update('a', (d) => {
      (d.list as number[]).push(2);
    });
    expect(db.get('a')).not.toBe(first);
    expect(first).toEqual({ list: [1] });
    await client.close();
  });

  it('subscribe reports changed ids', async () => {
    const client = await local();
    const db = await client.open('db');
    const seen: string[][] = [];
    const off = db.subscribe((e) => {
      expect(e.remote).toBe(false);
      seen.push(e.ids);
    });
    await db.put('x', { a: 1 });
    await db.put('y', { a: 1 });
    off();
    await db.put('z', { a: 1 });
    expect(seen).toEqual([['x'], ['y']]);
    await client.close();
  });

  it('text splices and counters', async () => {
    const client = await local();
    const db = await client.open('db');
    const t = db.text('note', ['body']);
    await t.insert(0, 'hello');
    await t.insert(5, ' world');
    await t.remove(0, 1);
    await t.insert(0, 'H');
    expect(t.toString()).toBe('Hello world');
    // UTF-16 positions, as JS strings count them.
    await t.insert(0, '😀');
    await t.insert(2, '!');
    expect(t.toString()).toBe('😀!Hello world');
    await db.increment('note', ['views']);
    await db.increment('note', ['views'], 41);
    expect(db.get('note')?.views).toBe(42);
    await client.close();
  });

  it('errors carry a code', async () => {
    const client = await local();
    await expect(client.open('bad name!')).rejects.toSatisfy((e) => isSynclineError(e, 'InvalidDatabaseName'));
    const db = await client.open('db');
    await expect(db.put('a', [1, 2] as never)).rejects.toSatisfy((e) => isSynclineError(e, 'InvalidValue'));
    await expect(db.put('', { a: 1 })).rejects.toSatisfy((e) => isSynclineError(e, 'InvalidDocumentId'));
    await client.close();
    await expect(db.put('a', { a: 1 })).rejects.toSatisfy((e) => isSynclineError(e, 'Closed'));
    await expect(client.open('db2')).rejects.toSatisfy((e) => isSynclineError(e, 'Closed'));
    // A closed client has released its replicas: reads say so too.
    expect(() => db.get('never-read')).toThrow(expect.objectContaining({ code: 'Closed' }));
    expect(() => db.list()).toThrow(expect.objectContaining({ code: 'Closed' }));
    expect(() => db.pending).toThrow(expect.objectContaining({ code: 'Closed' }));
    expect(db.status).toBe('offline');
  });

  // Node 22+ (or 20 with --experimental-websocket) has a global WebSocket:
  // then a server url connects with it; without one, connect says what to
  // do. (e2e/node.test.mjs runs the other case in a child Node too.)
  it(
    typeof (globalThis as { WebSocket?: unknown }).WebSocket === 'function'
      ? 'connects to a server url with the global WebSocket (no options.WebSocket)'
      : 'refuses a server url where there is no WebSocket, with a clear error',
    async () => {
      if (typeof (globalThis as { WebSocket?: unknown }).WebSocket === 'function') {
        // A bare WebSocket server: the handshake reaching it is the proof.
        const server = new WebSocketServer({ host: '127.0.0.1', port: 0 });
        try {
          await new Promise((ok) => server.once('listening', ok));
          const reached = new Promise<string | undefined>((ok) => server.once('connection', (_ws, req) => ok(req.url)));
          const { port } = server.address() as { port: number };
          const client = await Syncline.connect(`ws://127.0.0.1:${port}/sync`, { storage: 'memory' });
          try {
            expect(await reached).toBe('/sync');
            expect(client.status).not.toBe('refused');
          } finally {
            await client.close();
          }
        } finally {
          await new Promise((ok) => server.close(ok));
        }
      } else {
        await expect(Syncline.connect('ws://127.0.0.1:9/sync')).rejects.toSatisfy(
          (e) => isSynclineError(e, 'Unsupported') && /options\.WebSocket/.test((e as Error).message),
        );
      }
    },
  );

  it('status is offline without a server', async () => {
    const client = await local();
    const db = await client.open('db');
    expect(client.status).toBe('offline');
    expect(db.status).toBe('offline');
    await db.put('a', { x: 1 });
    expect(db.pending).toBe(1);
    expect(db.presence.online).toBe(0);
    await client.close();
  });
});

describe('listeners', () => {
  it('a throwing subscriber neither stops the others nor the write', async () => {
    const client = await local();
    const db = await client.open('db');
    const reported: unknown[] = [];
    const g = globalThis as { reportError?: (e: unknown) => void };
    const saved = g.reportError;
    g.reportError = (e) => reported.push(e);
    try {
      const seen: string[] = [];
      db.subscribe(() => {
        throw new Error('app bug');
      });
      db.subscribe((e) => seen.push(...e.ids));
      expect(await db.put('a', { x: 1 })).toBe(true);
      expect(seen).toEqual(['a']);
      expect(reported).toHaveLength(1);
    } finally {
      g.reportError = saved;
      await client.close();
    }
  });
});

describe('presence limits', () => {
  it('refuses a presence state over the protocol limit with TooLarge (instead of losing the connection)', async () => {
    const client = await local();
    const db = await client.open('db');
    expect(() => db.presence.set({ blob: 'x'.repeat(20_000) })).toThrow(expect.objectContaining({ code: 'TooLarge' }));
    db.presence.set({ name: 'ok' });
    await client.close();
  });
});

describe('hostile or odd input', () => {
  it('refuses cycles and absurd nesting with InvalidValue, and keeps working', async () => {
    const client = await local();
    const db = await client.open('db');
    const cyclic: Record<string, unknown> = { a: 1 };
    cyclic.self = cyclic;
    await expect(db.put('c', cyclic)).rejects.toSatisfy((e) => isSynclineError(e, 'InvalidValue'));
    let deep: Record<string, unknown> = {};
    for (let i = 0; i < 500; i++) deep = { d: deep };
    await expect(db.put('d', deep)).rejects.toSatisfy((e) => isSynclineError(e, 'InvalidValue'));
    const shared = { x: 1 };
    expect(await db.put('ok', { a: shared, b: shared })).toBe(true);
    expect(db.get('ok')).toEqual({ a: { x: 1 }, b: { x: 1 } });
    await expect(db.increment('ok', ['n'], 1.5)).rejects.toSatisfy((e) => isSynclineError(e, 'InvalidValue'));
    await expect(db.increment('ok', ['n'], Number.NaN)).rejects.toSatisfy((e) => isSynclineError(e, 'InvalidValue'));
    await client.close();
  });

  it('a "__proto__" key stays data: no prototype injection on read', async () => {
    const client = await local();
    const db = await client.open('db');
    await db.put('p', JSON.parse('{"__proto__": {"admin": true}, "x": 1}'));
    const got = db.get('p') as Record<string, unknown>;
    expect((got as { admin?: unknown }).admin).toBeUndefined();
    expect(Object.getPrototypeOf(got)).toBe(Object.prototype);
    expect(Object.hasOwn(got, '__proto__')).toBe(true);
    await client.close();
  });

  it('whenSynced rejects for a local-only client and after close', async () => {
    const client = await local();
    const db = await client.open('db');
    await expect(db.whenSynced()).rejects.toSatisfy((e) => isSynclineError(e, 'NoServer'));
    await client.close();
    await expect(db.whenSynced()).rejects.toSatisfy((e) => isSynclineError(e, 'Closed'));
  });
});

describe('a list of server URLs', () => {
  const invalid = (e: unknown) => isSynclineError(e, 'InvalidUrl');

  it('refuses an empty list and any bad entry with InvalidUrl', async () => {
    await expect(Syncline.connect([], { storage: 'memory', WebSocket })).rejects.toSatisfy(invalid);
    for (const bad of ['ftp://127.0.0.1/', '', 'http://[::1', 7]) {
      await expect(
        Syncline.connect(['ws://127.0.0.1:9/sync', bad as string], { storage: 'memory', WebSocket }),
      ).rejects.toSatisfy(invalid);
    }
  });

  it('dials the URLs in turn: a connection dropped by the first moves on to the second', async () => {
    // Two bare WebSocket servers: the first drops every connection it
    // gets, the second keeps it (the handshake reaching it is the proof).
    const order: string[] = [];
    const [first, second] = [0, 1].map(() => new WebSocketServer({ host: '127.0.0.1', port: 0 }));
    try {
      await Promise.all([first, second].map((s) => new Promise((ok) => s.once('listening', ok))));
      first.on('connection', (ws) => {
        order.push('first');
        ws.terminate();
      });
      const reached = new Promise<void>((ok) =>
        second.on('connection', () => {
          order.push('second');
          ok();
        }),
      );
      const url = (s: WebSocketServer) => `http://127.0.0.1:${(s.address() as { port: number }).port}`;
      const client = await Syncline.connect([url(first), url(second)] as const, {
        storage: 'memory',
        WebSocket,
        maxBackoffMs: 100,
      });
      try {
        await reached;
        expect(order.slice(0, 2)).toEqual(['first', 'second']);
        expect(client.status).not.toBe('refused');
      } finally {
        await client.close();
      }
    } finally {
      await Promise.all([first, second].map((s) => new Promise((ok) => s.close(ok))));
    }
  });

  it('a URL the runtime cannot open leaves the rotation (reported); alone, it refuses the client as before', async () => {
    // A WebSocket class whose constructor throws for one URL, as a browser's
    // does for a URL it will not dial.
    class Picky extends WebSocket {
      constructor(url: string) {
        if (url.includes('unopenable')) throw new SyntaxError(`cannot open ${url}`);
        super(url);
      }
    }
    const server = new WebSocketServer({ host: '127.0.0.1', port: 0 });
    try {
      await new Promise((ok) => server.once('listening', ok));
      const reached = new Promise((ok) => server.once('connection', ok));
      const good = `ws://127.0.0.1:${(server.address() as { port: number }).port}/sync`;
      const client = await Syncline.connect(['ws://unopenable.invalid/sync', good], {
        storage: 'memory',
        WebSocket: Picky,
        maxBackoffMs: 100,
      });
      try {
        await reached;
        expect(client.status).not.toBe('refused');
        expect(client.refusal).toBeUndefined();
      } finally {
        await client.close();
      }

      const alone = await Syncline.connect(['ws://unopenable.invalid/sync'], { storage: 'memory', WebSocket: Picky });
      try {
        expect(alone.status).toBe('refused');
        expect(alone.refusal?.code).toBe('InvalidUrl');
      } finally {
        await alone.close();
      }
    } finally {
      await new Promise((ok) => server.close(ok));
    }
  });
});
