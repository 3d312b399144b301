// Replica slots without Web Locks: leases in localStorage (see src/slots.ts).
import { afterEach, beforeEach, describe, expect, it, vi } from 'vitest';
import { LEASE_MS, leaseSlot } from '../src/slots.js';

/** A Storage over a Map, as a browser's localStorage/sessionStorage. */
class MapStorage {
  #m = new Map<string, string>();
  get length() {
    return this.#m.size;
  }
  key(i: number) {
    return [...this.#m.keys()][i] ?? null;
  }
  getItem(k: string) {
    return this.#m.get(k) ?? null;
  }
  setItem(k: string, v: string) {
    this.#m.set(k, String(v));
  }
  removeItem(k: string) {
    this.#m.delete(k);
  }
  clear() {
    this.#m.clear();
  }
}

const g = globalThis as unknown as { localStorage?: MapStorage; sessionStorage?: MapStorage };

/** Resolve a lease claim (it waits a moment for a racing tab). */
async function take(name = 'app') {
  const p = leaseSlot(name);
  await vi.advanceTimersByTimeAsync(100);
  return p;
}

describe('replica slots without Web Locks', () => {
  beforeEach(() => {
    vi.useFakeTimers();
    g.localStorage = new MapStorage();
    g.sessionStorage = new MapStorage();
  });
  afterEach(() => {
    vi.useRealTimers();
    delete g.localStorage;
    delete g.sessionStorage;
  });

  it('tabs take separate slots and a released slot is free again', async () => {
    const a = await take();
    const b = await take();
    expect([a.index, b.index]).toEqual([0, 1]);
    a.release();
    g.sessionStorage = new MapStorage(); // another tab: no hint
    const c = await take();
    expect(c.index).toBe(0);
  });

  it('a duplicated tab (same sessionStorage hint) does not share the live slot', async () => {
    const a = await take();
    expect(a.index).toBe(0);
    // The duplicate copies sessionStorage, which names slot 0.
    expect(g.sessionStorage?.getItem('syncline-slot:app')).toBe('0');
    const dup = await take();
    expect(dup.index).toBe(1);
  });

  it('a reload asks for its previous slot first', async () => {
    const a = await take();
    const b = await take();
    expect(b.index).toBe(1);
    a.release(); // slot 0 is free, but this tab's hint says 1
    b.release(); // pagehide on reload
    const again = await take();
    expect(again.index).toBe(1);
  });

  it("a closed tab's expired lease is taken over (with its offline writes)", async () => {
    g.localStorage?.setItem('syncline-lease:app:0', `gone ${Date.now() + 1000}`);
    expect((await take()).index).toBe(1);
    await vi.advanceTimersByTimeAsync(LEASE_MS);
    g.sessionStorage = new MapStorage();
    // Slot 1's holder renewed while alive; slot 0's lease ran out.
    expect((await take()).index).toBe(0);
  });

  it('a live tab renews its lease; one whose lease was taken is told', async () => {
    const a = await take();
    const lost = vi.fn();
    a.onLost?.(lost);
    await vi.advanceTimersByTimeAsync(2 * LEASE_MS);
    expect(lost).not.toHaveBeenCalled();
    const [, until] = (g.localStorage?.getItem('syncline-lease:app:0') ?? '').split(' ');
    expect(Number(until)).toBeGreaterThan(Date.now());
    // Another tab took the slot while this one was frozen.
    g.localStorage?.setItem('syncline-lease:app:0', `other ${Date.now() + LEASE_MS}`);
    await vi.advanceTimersByTimeAsync(LEASE_MS);
    expect(lost).toHaveBeenCalledTimes(1);
    expect(g.localStorage?.getItem('syncline-lease:app:0')).toMatch(/^other /);
  });

  it('without localStorage it refuses with a typed error', async () => {
    delete g.localStorage;
    await expect(leaseSlot('app')).rejects.toMatchObject({ code: 'StorageUnavailable' });
  });
});
