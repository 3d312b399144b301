// A byte-counting TCP proxy in front of a server: counts bytes each way
// (HTTP upgrade included), WebSocket data messages each way, connections,
// and round trips (per connection, each time the client sends after the
// server has sent; the figure reported is the busiest connection's count).
import { connect, createServer } from 'node:net';

/** Incremental WebSocket frame reader that only counts (payloads are skipped). */
class FrameCounter {
  constructor(onMessage) {
    this.onMessage = onMessage;
    this.handshake = true;
    this.head = Buffer.alloc(0);
    this.skip = 0;
  }

  push(chunk) {
    let buf = chunk;
    if (this.handshake) {
      const all = Buffer.concat([this.head, buf]);
      const end = all.indexOf('\r\n\r\n');
      if (end < 0) {
        this.head = all;
        return;
      }
      this.handshake = false;
      this.head = Buffer.alloc(0);
      buf = all.subarray(end + 4);
    }
    while (buf.length > 0) {
      if (this.skip > 0) {
        const n = Math.min(this.skip, buf.length);
        this.skip -= n;
        buf = buf.subarray(n);
        continue;
      }
      const all = this.head.length ? Buffer.concat([this.head, buf]) : buf;
      if (all.length < 2) {
        this.head = Buffer.from(all);
        return;
      }
      const fin = (all[0] & 0x80) !== 0;
      const opcode = all[0] & 0x0f;
      const masked = (all[1] & 0x80) !== 0;
      let len = all[1] & 0x7f;
      let at = 2;
      if (len === 126) {
        if (all.length < 4) {
          this.head = Buffer.from(all);
          return;
        }
        len = all.readUInt16BE(2);
        at = 4;
      } else if (len === 127) {
        if (all.length < 10) {
          this.head = Buffer.from(all);
          return;
        }
        len = Number(all.readBigUInt64BE(2));
        at = 10;
      }
      if (masked) at += 4;
      if (all.length < at) {
        this.head = Buffer.from(all);
        return;
      }
      this.head = Buffer.alloc(0);
      if (fin && opcode < 8) this.onMessage();
      this.skip = len;
      buf = all.subarray(at);
    }
  }
}

export class CountingProxy {
  constructor(targetPort, targetHost = '127.0.0.1') {
    this.targetPort = targetPort;
    this.targetHost = targetHost;
    this.sockets = new Set();
    this.idleWaiters = [];
    this.reset();
    this.server = createServer((client) => this.#pipe(client));
  }

  reset() {
    this.stats = { up: 0, down: 0, msgsUp: 0, msgsDown: 0, connections: 0, roundTrips: 0 };
  }

  /** Resolves once no connection is open (a client that went offline has really gone). */
  disconnected(timeoutMs = 10_000) {
    if (this.sockets.size === 0) return Promise.resolve();
    return new Promise((ok, fail) => {
      const timer = setTimeout(() => fail(new Error(`connections still open after ${timeoutMs} ms`)), timeoutMs);
      this.idleWaiters.push(() => {
        clearTimeout(timer);
        ok();
      });
    });
  }

  async listen() {
    await new Promise((ok) => this.server.listen(0, '127.0.0.1', ok));
    this.port = this.server.address().port;
    return this;
  }

  #pipe(client) {
    const s = this.stats;
    s.connections++;
    let turns = 0;
    let lastDown = true; // a client's first message opens its first round trip
    const upstream = connect(this.targetPort, this.targetHost);
    client.setNoDelay(true);
    upstream.setNoDelay(true);
    this.sockets.add(client).add(upstream);
    const ups = new FrameCounter(() => {
      const st = this.stats;
      st.msgsUp++;
      if (lastDown) {
        turns++;
        st.roundTrips = Math.max(st.roundTrips, turns);
      }
      lastDown = false;
    });
    const downs = new FrameCounter(() => {
      this.stats.msgsDown++;
      lastDown = true;
    });
    client.on('data', (d) => {
      this.stats.up += d.length;
      ups.push(d);
    });
    upstream.on('data', (d) => {
      this.stats.down += d.length;
      downs.push(d);
    });
    client.pipe(upstream);
    upstream.pipe(client);
    const close = () => {
      client.destroy();
      upstream.destroy();
      this.sockets.delete(client);
      this.sockets.delete(upstream);
      if (this.sockets.size === 0) for (const w of this.idleWaiters.splice(0)) w();
    };
    client.on('error', close).on('close', close);
    upstream.on('error', close).on('close', close);
  }

  async close() {
    for (const s of this.sockets) s.destroy();
    await new Promise((ok) => this.server.close(ok));
  }
}

/**
 * The proxy in a child process of its own, so that relaying (a thousand
 * connections for Yjs) takes neither the measured client's event loop nor
 * its `process.cpuUsage()`. Run in-process it did both: Yjs' W2 took
 * 1.2–1.5 s through it and 0.36–1.0 s without it (BENCHMARKS.md §29).
 * The same calls as `CountingProxy`, asynchronous: `await proxy.stats()`.
 */
export class ProxyProcess {
  constructor(targetPort, targetHost = '127.0.0.1') {
    this.target = [String(targetPort), targetHost];
    this.pending = new Map();
    this.next = 0;
  }

  async listen() {
    const { fork } = await import('node:child_process');
    this.child = fork(new URL(import.meta.url).pathname, this.target, { stdio: ['ignore', 'inherit', 'inherit', 'ipc'] });
    this.child.on('message', ({ id, value, error }) => {
      const p = this.pending.get(id);
      if (!p) return;
      this.pending.delete(id);
      if (error) p.fail(new Error(error));
      else p.ok(value);
    });
    this.child.on('exit', (code) => {
      for (const p of this.pending.values()) p.fail(new Error(`the proxy process exited (${code})`));
      this.pending.clear();
    });
    this.port = await this.#call('port');
    return this;
  }

  #call(op, arg) {
    const id = this.next++;
    return new Promise((ok, fail) => {
      this.pending.set(id, { ok, fail });
      this.child.send({ id, op, arg });
    });
  }

  reset() {
    return this.#call('reset');
  }

  stats() {
    return this.#call('stats');
  }

  disconnected(timeoutMs = 10_000) {
    return this.#call('disconnected', timeoutMs);
  }

  async close() {
    if (!this.child || this.child.exitCode !== null) return;
    await this.#call('close');
    await new Promise((ok) => (this.child.exitCode !== null ? ok() : this.child.once('exit', ok)));
  }
}

// Run as the child of a ProxyProcess: `proxy.mjs TARGET_PORT [TARGET_HOST]`.
if (process.send && process.argv[1] === new URL(import.meta.url).pathname) {
  const proxy = await new CountingProxy(Number(process.argv[2]), process.argv[3]).listen();
  const ops = {
    port: () => proxy.port,
    reset: () => proxy.reset(),
    stats: () => proxy.stats,
    disconnected: (ms) => proxy.disconnected(ms),
    close: async () => {
      await proxy.close();
      setImmediate(() => process.exit(0));
    },
  };
  process.on('message', async ({ id, op, arg }) => {
    try {
      process.send({ id, value: await ops[op](arg) });
    } catch (e) {
      process.send({ id, error: String(e?.message ?? e) });
    }
  });
  process.on('disconnect', () => process.exit(0));
}
