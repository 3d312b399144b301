/**
 * The TypeScript API over the WebAssembly client.
 *
 * `Syncline.connect()` opens a replica (IndexedDB in browsers, memory in
 * Node), `client.open(name)` loads a database from it and starts syncing,
 * and a `SynclineDb` reads and writes documents. Reads are synchronous (the
 * replica lives in memory); writes apply at once and resolve when durable
 * locally; nothing waits for the network.
 */

import { createClient, type WasmClient } from '../wasm/syncline_wasm.js';
import { deepFreeze } from './equal.js';
import { isSynclineError, synclineError, type SynclineError } from './errors.js';
import { setOwn } from './own.js';
import { acquireSlot, type Slot } from './slots.js';

/** A JSON-like document: the root is always an object. */
export type Doc = Record<string, unknown>;

/** A path into a document: keys and list indexes. */
export type Path = ReadonlyArray<string | number>;

/**
 * The connection's state. `refused`: the server refused the token or the
 * protocol version (or this runtime cannot connect: no Ed25519, a bad URL);
 * reconnecting cannot help, and `client.refusal` says why.
 */
export type ConnectionStatus = 'offline' | 'connecting' | 'online' | 'refused';

/**
 * A database's state: `synced` once the server has everything of ours and
 * we hold its reply durably; `refused` when the server refused this database
 * (`Forbidden`: no right to read it or to write our changes; `TooLarge`), or
 * the client is refused. `db.refusal` says why; it holds until the database
 * syncs.
 */
export type DbStatus = ConnectionStatus | 'synced';

/**
 * Where {@link Syncline.connect} syncs: one server's URL, or several
 * (nodes of one cluster, say) dialled in turn; `null`/omitted: local only.
 */
export type ServerUrls = string | readonly string[];

/** Options of {@link Syncline.connect}. */
export interface ConnectOptions {
  /** Token presented to the server (see `syncline token`). */
  token?: string;
  /**
   * `indexeddb` (browser default), `files` (Node, with `dir`: durable, as
   * the native store) or `memory` (Node's default without `dir`; nothing
   * survives a restart).
   */
  storage?: 'indexeddb' | 'files' | 'memory';
  /**
   * Node: the directory that holds this replica (`storage: 'files'`, the
   * default when `dir` is given). Created if missing; one process at a time
   * (a second is refused with `StorageBlocked`).
   */
  dir?: string;
  /** Namespace of the local replica (one per app and user, say); default `"default"`. */
  name?: string;
  /** Longest wait between reconnection attempts, in ms (default 10,000). */
  maxBackoffMs?: number;
  /**
   * The WebSocket class to connect with instead of `globalThis.WebSocket`:
   * in Node, for example, the `ws` package's (`import WebSocket from 'ws'`),
   * which Node 20 needs without `--experimental-websocket` and which costs
   * less per message than Node's built-in one.
   */
  WebSocket?: unknown;
}

/** Options of `put` and `update`. */
export interface WriteOptions {
  /**
   * Keys whose strings are values replaced whole (ids, enums such as a
   * status, timestamps, long opaque strings), at any depth: concurrent
   * writes of one of them keep one value. Every other string is
   * collaborative text: concurrent edits merge character by character, so
   * no one's typing is lost.
   */
  atomic?: string[];
  /** @deprecated Strings are collaborative text by default; this changes nothing. */
  text?: string[];
}

/** What `db.subscribe` callbacks receive. */
export interface ChangeEvent {
  /** Documents that changed. */
  ids: string[];
  /** Whether the change came from another replica. */
  remote: boolean;
}

/** One replica present on a database. */
export interface Peer<S = unknown> {
  /** Connection number on the server. */
  peer: number;
  /** Replica id (hex). */
  replica: string;
  /** Its published presence state, or `null`. */
  state: S | null;
}

type WasmEvent =
  | { type: 'status'; status: ConnectionStatus }
  | { type: 'changed'; db: string; docs: string[]; remote: boolean }
  | { type: 'acked'; db: string; counter: number }
  | { type: 'synced'; db: string }
  | { type: 'presence'; db: string }
  | { type: 'error'; db: string | null; code: string; message: string }
  | { type: 'tabEntries'; db: string; bytes: Uint8Array };

/** What tabs of one app send each other (see `Syncline.connect`). */
type TabMessage = { kind: 'entries' | 'ask'; db: string; bytes: Uint8Array };

/**
 * Call every listener; one that throws neither stops the others nor the
 * client: its error is reported asynchronously (like an event handler's).
 */
function emit<A>(listeners: Iterable<(a: A) => void>, arg: A): void {
  for (const cb of listeners) {
    try {
      cb(arg);
    } catch (e) {
      const report = (globalThis as { reportError?: (e: unknown) => void }).reportError;
      if (report) report(e);
      else
        queueMicrotask(() => {
          throw e;
        });
    }
  }
}

/** Deepest nesting a written value may have. */
const MAX_DEPTH = 100;

/**
 * Refuse values the wasm side could not convert safely: cycles, and nesting
 * deeper than {@link MAX_DEPTH} (its converter recurses).
 */
function checkValue(value: unknown): void {
  // `open` holds the objects on the current path (a repeat there is a
  // cycle; a shared, acyclic sub-object is fine). Depth is bounded first,
  // so this recursion is too.
  const open = new Set<unknown>();
  const walk = (v: unknown, depth: number): void => {
    if (typeof v !== 'object' || v === null) return;
    if (depth > MAX_DEPTH) throw synclineError('InvalidValue', `value nested deeper than ${MAX_DEPTH} levels`);
    if (open.has(v)) throw synclineError('InvalidValue', 'value contains a cycle');
    open.add(v);
    for (const child of Object.values(v)) walk(child, depth + 1);
    open.delete(v);
  };
  walk(value, 0);
}

let loader: (() => Promise<void>) | null = null;
let loaded: Promise<void> | null = null;
let openFiles: ((dir: string) => Promise<unknown>) | null = null;

/** @internal The Node entry provides the file store's I/O. */
export function setFileIo(open: (dir: string) => Promise<unknown>): void {
  openFiles = open;
}

/** @internal The entry points (browser, Node) say how to load the wasm. */
export function setWasmLoader(load: () => Promise<void>): void {
  loader = load;
}

function ensureWasm(): Promise<void> {
  if (!loaded) {
    if (!loader) throw synclineError('Unsupported', 'syncline: no WebAssembly loader (import "syncline")');
    loaded = loader();
  }
  return loaded;
}

function toWsUrl(url: string): string {
  let u: URL;
  try {
    u = new URL(url, (globalThis as { location?: { href: string } }).location?.href);
  } catch {
    throw synclineError('InvalidUrl', `not a URL: ${JSON.stringify(url)}`);
  }
  if (u.protocol === 'http:') u.protocol = 'ws:';
  if (u.protocol === 'https:') u.protocol = 'wss:';
  if (u.protocol !== 'ws:' && u.protocol !== 'wss:') {
    throw synclineError('InvalidUrl', `use a ws://, wss://, http:// or https:// URL, not ${JSON.stringify(url)}`);
  }
  if (u.pathname === '/' || u.pathname === '') u.pathname = '/sync';
  return u.toString();
}

/**
 * The WebSocket URLs `connect` dials: none for a local replica (no url, or
 * an empty string as before), one per entry of a list. A list must name at
 * least one server, each entry a non-empty URL (an empty one is most likely
 * an unset setting, not "the page's own URL").
 */
function toWsUrls(url: ServerUrls | null | undefined): string[] {
  if (!Array.isArray(url)) return url ? [toWsUrl(url as string)] : [];
  if (url.length === 0) {
    throw synclineError('InvalidUrl', 'an empty list of URLs: give at least one (or no url for a local replica)');
  }
  return url.map((u: unknown, i) => {
    if (typeof u !== 'string' || u === '') {
      throw synclineError('InvalidUrl', `URL #${i + 1} of the list is ${JSON.stringify(u) ?? String(u)}, not a URL`);
    }
    return toWsUrl(u);
  });
}

/** A client: one local replica, optionally synced with a server. */
export class Syncline {
  #wasm: WasmClient;
  #slot: Slot;
  #dbs = new Map<string, SynclineDb>();
  #statusListeners = new Set<(s: ConnectionStatus) => void>();
  #errorListeners = new Set<(e: SynclineError) => void>();
  #closed = false;
  #onOnline = () => this.#wasm.reconnectNow();
  /** The other tabs of this app and replica namespace (IndexedDB storage only). */
  #tabs: BroadcastChannel | null;

  private constructor(wasm: WasmClient, slot: Slot, tabs: BroadcastChannel | null) {
    this.#wasm = wasm;
    this.#slot = slot;
    this.#tabs = tabs;
    if (tabs) tabs.onmessage = (e: MessageEvent<TabMessage>) => this.#fromTab(e.data);
    globalThis.addEventListener?.('online', this.#onOnline);
    // Another tab took this replica (its lease ran out while this page was
    // frozen, or its Web Lock was stolen): writing on would corrupt its
    // log, so stop, loudly. (A failure to finish closing is reported by
    // the close itself, through onError.)
    slot.onLost?.((reason) => {
      emit(this.#errorListeners, synclineError('TooManyTabs', reason));
      this.close().catch(() => {});
    });
  }

  /**
   * Open the local replica and, with a `url`, keep it synced with that
   * server (`ws://host:7070/sync`; `http://host:7070` works too). With a
   * list of URLs (servers of one cluster, or one behind a load balancer)
   * the client dials them in turn: a failed dial or a dropped connection
   * moves on to the next, after the usual backoff, and resumes there in
   * one round trip. With no url the replica is purely local. Resolves once
   * local data is readable; connecting happens in the background.
   */
  static async connect(url?: ServerUrls | null, options: ConnectOptions = {}): Promise<Syncline> {
    await ensureWasm();
    const wsUrls = toWsUrls(url);
    const WebSocketClass = options.WebSocket ?? (globalThis as { WebSocket?: unknown }).WebSocket;
    if (wsUrls.length > 0 && typeof WebSocketClass !== 'function') {
      throw synclineError(
        'Unsupported',
        options.WebSocket === undefined
          ? "this runtime has no WebSocket (Node 20): pass one (the 'ws' package's) as options.WebSocket, connect() without a url for a local replica, or use Node 22+"
          : 'options.WebSocket must be a WebSocket class',
      );
    }
    const hasIdb = typeof (globalThis as { indexedDB?: unknown }).indexedDB !== 'undefined';
    const storage = options.storage ?? (options.dir !== undefined ? 'files' : hasIdb ? 'indexeddb' : 'memory');
    const name = options.name ?? 'default';
    let fileIo: unknown;
    if (storage === 'files') {
      if (!openFiles) throw synclineError('Unsupported', "storage 'files' is for Node (import 'syncline' there)");
      if (typeof options.dir !== 'string' || options.dir === '') {
        throw synclineError('InvalidOptions', "storage 'files' needs a dir (the replica's directory)");
      }
      fileIo = await openFiles(options.dir);
    }
    const slot = storage === 'indexeddb' ? await acquireSlot(name) : { index: 0, release() {} };
    // Tabs of this app (same origin and name, each its own replica) hand
    // each other their changes directly, so they agree with no server.
    const tabs =
      storage === 'indexeddb' && typeof BroadcastChannel === 'function' ? new BroadcastChannel(`syncline:${name}`) : null;
    let client: Syncline | null = null;
    const pending: WasmEvent[] = [];
    try {
      const wasm = await createClient(
        {
          urls: wsUrls,
          token: options.token,
          storage,
          idbName: `syncline:${name}:${slot.index}`,
          maxBackoffMs: options.maxBackoffMs,
          WebSocket: options.WebSocket,
          shareTabs: tabs !== null,
          fileIo,
        },
        (e: WasmEvent) => (client ? client.#event(e) : pending.push(e)),
      );
      client = new Syncline(wasm, slot, tabs);
    } catch (e) {
      tabs?.close();
      slot.release();
      (fileIo as { close?: () => void } | undefined)?.close?.();
      throw e;
    }
    for (const e of pending) client.#event(e);
    return client;
  }

  /** This replica's id (hex), stable for a browser profile's slot. */
  get replica(): string {
    return this.#wasm.replica;
  }

  /** The connection's state. */
  get status(): ConnectionStatus {
    return this.#wasm.status as ConnectionStatus;
  }

  /** Why the client is `refused` (a `SynclineError`), or `undefined`. */
  get refusal(): SynclineError | undefined {
    return this.#wasm.refusal() as SynclineError | undefined;
  }

  /** Call `cb` when the connection's state changes; returns an unsubscribe function. */
  onStatus(cb: (s: ConnectionStatus) => void): () => void {
    this.#statusListeners.add(cb);
    return () => this.#statusListeners.delete(cb);
  }

  /** Errors not tied to a call (a refused token, a failed background write). */
  onError(cb: (e: SynclineError) => void): () => void {
    this.#errorListeners.add(cb);
    return () => this.#errorListeners.delete(cb);
  }

  /** Load a database and start syncing it (idempotent). */
  async open(name: string): Promise<SynclineDb> {
    if (this.#closed) throw synclineError('Closed', 'the client is closed');
    const known = this.#dbs.get(name);
    if (known) return known;
    await this.#wasm.open(name);
    let db = this.#dbs.get(name);
    if (!db) {
      db = new SynclineDb(this.#wasm, name, this);
      this.#dbs.set(name, db);
      // What the other tabs wrote while this one did not hold the database.
      this.#toTabs({ kind: 'ask', db: name, bytes: this.#wasm.tabAsk(name) });
    }
    return db;
  }

  /**
   * Disconnect on purpose and stay offline until `goOnline()` (no reconnect
   * attempts). Reads and writes keep working locally and sync when back.
   */
  goOffline(): void {
    if (!this.#closed) this.#wasm.goOffline();
  }

  /** Undo `goOffline()`: connect now and catch up in one round trip. */
  goOnline(): void {
    if (!this.#closed) this.#wasm.goOnline();
  }

  /** Stop syncing, finish local writes and release local storage. */
  async close(): Promise<void> {
    if (this.#closed) return;
    this.#closed = true;
    globalThis.removeEventListener?.('online', this.#onOnline);
    try {
      await this.#wasm.close(); // its last writes are announced to the tabs
    } finally {
      this.#tabs?.close();
      this.#tabs = null;
      this.#slot.release();
    }
  }

  #toTabs(m: TabMessage): void {
    try {
      this.#tabs?.postMessage(m);
    } catch (e) {
      emit(this.#errorListeners, synclineError('StorageFailed', `could not reach the other tabs: ${String(e)}`));
    }
  }

  /** A message from another tab: applied or answered when it concerns an open database. */
  #fromTab(m: TabMessage): void {
    if (this.#closed || !m || typeof m.db !== 'string' || !(m.bytes instanceof Uint8Array)) return;
    if (!this.#dbs.has(m.db)) return; // asked again when it opens
    try {
      if (m.kind === 'entries') this.#wasm.tabApply(m.db, m.bytes);
      else if (m.kind === 'ask') {
        const answer = this.#wasm.tabAnswer(m.db, m.bytes) as Uint8Array | undefined;
        if (answer) this.#toTabs({ kind: 'entries', db: m.db, bytes: answer });
      }
    } catch (e) {
      emit(this.#errorListeners, isSynclineError(e) ? e : synclineError('Internal', String(e), m.db));
    }
  }

  #event(e: WasmEvent): void {
    switch (e.type) {
      case 'status':
        emit(this.#statusListeners, e.status);
        for (const db of this.#dbs.values()) {
          db._statusMaybeChanged();
          db.presence._changed();
        }
        break;
      case 'changed':
        this.#dbs.get(e.db)?._changed(e.docs, e.remote);
        break;
      case 'acked':
      case 'synced':
        this.#dbs.get(e.db)?._statusMaybeChanged();
        break;
      case 'presence':
        this.#dbs.get(e.db)?.presence._changed();
        break;
      case 'tabEntries':
        this.#toTabs({ kind: 'entries', db: e.db, bytes: e.bytes });
        break;
      case 'error': {
        const err = synclineError(e.code as SynclineError['code'], e.message, e.db ?? undefined);
        const db = e.db ? this.#dbs.get(e.db) : undefined;
        // A refusal changes the status: listeners hear it before the error.
        db?._statusMaybeChanged();
        if (db && db._error(err)) break;
        emit(this.#errorListeners, err);
        break;
      }
    }
  }
}

/** Splice helpers for a collaborative text field. */
export interface TextField {
  /** The current text. */
  toString(): string;
  /** Replace `del` UTF-16 code units at `pos` with `insert`. */
  splice(pos: number, del: number, insert?: string): Promise<boolean>;
  /** Insert at `pos`. */
  insert(pos: number, text: string): Promise<boolean>;
  /** Delete `count` code units at `pos`. */
  remove(pos: number, count: number): Promise<boolean>;
}

/** A database: a set of documents by id. */
export class SynclineDb {
  readonly name: string;
  readonly presence: Presence;
  #wasm: WasmClient;
  #client: Syncline;
  #cache = new Map<string, Doc | undefined>();
  #listeners = new Set<(e: ChangeEvent) => void>();
  #statusListeners = new Set<(s: DbStatus) => void>();
  #errorListeners = new Set<(e: SynclineError) => void>();
  #lastStatus: DbStatus;

  /** @internal */
  constructor(wasm: WasmClient, name: string, client: Syncline) {
    this.#wasm = wasm;
    this.name = name;
    this.#client = client;
    this.presence = new Presence(wasm, name);
    this.#lastStatus = this.status;
  }

  /** A document (a frozen snapshot), or `undefined` when absent or deleted. */
  get<T extends object = Doc>(id: string): T | undefined {
    if (!this.#cache.has(id)) {
      this.#cache.set(id, deepFreeze(this.#wasm.get(this.name, id) as Doc | undefined));
    }
    return this.#cache.get(id) as T | undefined;
  }

  /** Ids of the documents that exist. */
  list(): string[] {
    return this.#wasm.list(this.name);
  }

  /** Every document, by id. */
  all<T extends object = Doc>(): Record<string, T> {
    const out: Record<string, T> = {};
    for (const id of this.list()) {
      const v = this.get<T>(id);
      if (v !== undefined) setOwn(out, id, v);
    }
    return out;
  }

  /**
   * Make a document equal `value`, recording only what differs. Resolves
   * to whether anything changed, once the change is durable locally.
   */
  put(id: string, value: object, options?: WriteOptions): Promise<boolean> {
    try {
      checkValue(value);
    } catch (e) {
      return Promise.reject(e);
    }
    return this.#wasm.put(this.name, id, value, options?.atomic) as Promise<boolean>;
  }

  /** Change a document through a draft: mutate it, or return a new value. */
  update<T extends object = Doc>(id: string, fn: (draft: T) => T | void, options?: WriteOptions): Promise<boolean> {
    const current = this.get<T>(id);
    const draft = (current === undefined ? {} : structuredClone(current)) as T;
    const result = fn(draft);
    return this.put(id, result ?? draft, options);
  }

  /** Delete a document (the deletion syncs; a later put revives it). */
  delete(id: string): Promise<boolean> {
    return this.#wasm.delete(this.name, id) as Promise<boolean>;
  }

  /** Add `by` to the counter at `path` (a counter merges concurrent additions). */
  increment(id: string, path: Path, by = 1): Promise<boolean> {
    return this.#wasm.increment(this.name, id, path, by) as Promise<boolean>;
  }

  /** Collaborative text at `path` (created on first splice). */
  text(id: string, path: Path): TextField {
    const read = () => {
      let v: unknown = this.get(id);
      for (const seg of path) v = (v as Record<string | number, unknown> | undefined)?.[seg];
      return typeof v === 'string' ? v : '';
    };
    const splice = (pos: number, del: number, insert = '') =>
      this.#wasm.splice(this.name, id, path, pos, del, insert) as Promise<boolean>;
    return {
      toString: read,
      splice,
      insert: (pos, text) => splice(pos, 0, text),
      remove: (pos, count) => splice(pos, count, ''),
    };
  }

  /** Call `cb` with the ids of changed documents; returns an unsubscribe function. */
  subscribe(cb: (e: ChangeEvent) => void): () => void {
    this.#listeners.add(cb);
    return () => this.#listeners.delete(cb);
  }

  /**
   * `offline`, `connecting`, `online` (catching up or with unacknowledged
   * changes), `synced`, or `refused` (see {@link refusal}).
   */
  get status(): DbStatus {
    const s = this.#client.status;
    if (s === 'refused' || this.#wasm.refusal(this.name) !== undefined) return 'refused';
    if (s !== 'online') return s;
    return this.#wasm.isSynced(this.name) ? 'synced' : 'online';
  }

  /**
   * Why this database is `refused`: the server's error (`Forbidden`,
   * `TooLarge`, …) or the client's refusal; `undefined` otherwise. Local
   * reads and writes go on; refused changes stay pending here.
   */
  get refusal(): SynclineError | undefined {
    const own = this.#wasm.refusal(this.name) as SynclineError | undefined;
    if (own === undefined) return this.#client.refusal;
    own.db = this.name;
    return own;
  }

  /** Call `cb` when {@link status} changes. */
  onStatus(cb: (s: DbStatus) => void): () => void {
    // Unwatched, the status is not tracked (see _statusMaybeChanged).
    if (this.#statusListeners.size === 0) this.#lastStatus = this.status;
    this.#statusListeners.add(cb);
    return () => this.#statusListeners.delete(cb);
  }

  /** Local changes the server has not yet acknowledged as durable. */
  get pending(): number {
    return this.#wasm.pending(this.name);
  }

  /** Resolves when synced; rejects if the server refuses this database. */
  whenSynced(): Promise<void> {
    return this.#wasm.whenSynced(this.name) as Promise<void>;
  }

  /** Errors concerning this database (e.g. `Forbidden`). */
  onError(cb: (e: SynclineError) => void): () => void {
    this.#errorListeners.add(cb);
    return () => this.#errorListeners.delete(cb);
  }

  /** @internal */
  _changed(ids: string[], remote: boolean): void {
    for (const id of ids) this.#cache.delete(id);
    const e = { ids, remote };
    emit(this.#listeners, e);
    this._statusMaybeChanged();
  }

  /** @internal */
  _statusMaybeChanged(): void {
    // Called on every change: with nobody listening, skip reading the
    // status (two calls into the wasm); onStatus catches up when one comes.
    if (this.#statusListeners.size === 0) return;
    const s = this.status;
    if (s === this.#lastStatus) return;
    this.#lastStatus = s;
    emit(this.#statusListeners, s);
  }

  /** @internal Returns whether a listener took it. */
  _error(e: SynclineError): boolean {
    emit(this.#errorListeners, e);
    return this.#errorListeners.size > 0;
  }
}

/** Who is on a database right now (ephemeral, never stored). */
export class Presence<S = unknown> {
  #wasm: WasmClient;
  #db: string;
  #listeners = new Set<(_: undefined) => void>();
  #view: { online: number; peers: Peer<S>[] } | null = null;

  /** @internal */
  constructor(wasm: WasmClient, db: string) {
    this.#wasm = wasm;
    this.#db = db;
  }

  /** Publish this client's state (any JSON; `null` clears it). Sent while online. */
  set(state: S | null): void {
    this.#wasm.setPresence(this.#db, state);
  }

  /** Replicas on this database with their states (this one included). */
  get peers(): Peer<S>[] {
    return this.#current().peers;
  }

  /** Connections subscribed to this database right now, this one included. */
  get online(): number {
    return this.#current().online;
  }

  /** Call `cb` when presence changes. */
  subscribe(cb: () => void): () => void {
    this.#listeners.add(cb);
    return () => this.#listeners.delete(cb);
  }

  #current(): { online: number; peers: Peer<S>[] } {
    this.#view ??= deepFreeze(this.#wasm.presence(this.#db) as { online: number; peers: Peer<S>[] });
    return this.#view;
  }

  /** @internal */
  _changed(): void {
    this.#view = null;
    emit(this.#listeners, undefined);
  }
}

export { isSynclineError, synclineError };
