/**
 * The file store's I/O in Node (`storage: 'files'`): the bytes side of the
 * store the WebAssembly client keeps in the native server's record format
 * (see wasm/src/files.rs). Every append is followed by `fdatasync` of its
 * file (and a new file's directory is synced) before it resolves; metadata
 * is written to a temporary file, synced, renamed and its directory synced.
 * One process at a time uses a directory: a `LOCK` file holds its pid.
 */
import { link, mkdir, open, readFile, realpath, rename, unlink, writeFile, type FileHandle } from 'node:fs/promises';
import { readFileSync, unlinkSync } from 'node:fs';
import { dirname, join, resolve } from 'node:path';
import { synclineError } from './errors.js';

/** What the WebAssembly file store calls. */
export interface FileIo {
  read(name: string): Promise<Uint8Array | null>;
  append(list: [string, Uint8Array][]): Promise<void>;
  truncate(name: string, len: number): Promise<void>;
  writeAtomic(name: string, bytes: Uint8Array, secret: boolean): Promise<void>;
  close(): void;
}

/** Directories this process holds (a second client on one would corrupt it). */
const held = new Set<string>();

function alive(pid: number): boolean {
  try {
    process.kill(pid, 0);
    return true;
  } catch (e) {
    return (e as NodeJS.ErrnoException).code === 'EPERM';
  }
}

async function syncDir(path: string): Promise<void> {
  const d = await open(path, 'r');
  try {
    await d.sync();
  } finally {
    await d.close();
  }
}

/**
 * Take `dir/LOCK` for this process, or refuse with `StorageBlocked`. The
 * lock appears with its pid in it (a temporary file hard-linked into place),
 * so no one ever reads an empty lock; only a lock naming a process that is
 * gone is taken over.
 */
async function lock(dir: string): Promise<string> {
  const path = join(dir, 'LOCK');
  if (held.has(dir)) throw synclineError('StorageBlocked', `${dir} is already open in this process`);
  const mine = join(dir, `LOCK.${process.pid}.${Math.random().toString(36).slice(2)}`);
  await writeFile(mine, String(process.pid), { mode: 0o600 });
  try {
    for (let attempt = 0; attempt < 2; attempt++) {
      try {
        await link(mine, path);
        held.add(dir);
        return path;
      } catch (e) {
        if ((e as NodeJS.ErrnoException).code !== 'EEXIST') throw e;
        let pid = NaN;
        try {
          pid = Number(readFileSync(path, 'utf8').trim());
        } catch {
          // gone meanwhile: try again
        }
        if (!Number.isInteger(pid) || pid <= 0 || alive(pid)) {
          throw synclineError('StorageBlocked', `${dir} is in use (LOCK names process ${pid})`);
        }
        await unlink(path).catch(() => {}); // left by a process that is gone
      }
    }
    throw synclineError('StorageBlocked', `could not lock ${dir}`);
  } finally {
    await unlink(mine).catch(() => {});
  }
}

/** Write all of `bytes` at the end of `h` (a write may be short). */
async function writeAll(h: FileHandle, bytes: Uint8Array): Promise<void> {
  let at = 0;
  while (at < bytes.length) {
    const { bytesWritten } = await h.write(bytes, at, bytes.length - at);
    if (bytesWritten <= 0) throw new Error('the disk took no bytes');
    at += bytesWritten;
  }
}

/** The I/O of a replica directory, created if missing and locked for this process. */
export async function fileIo(directory: string): Promise<FileIo> {
  await mkdir(resolve(directory), { recursive: true });
  const dir = await realpath(resolve(directory));
  for (const sub of ['dbs', 'meta']) {
    await mkdir(join(dir, sub), { recursive: true });
  }
  await syncDir(dir);
  await syncDir(dirname(dir));
  const lockPath = await lock(dir);
  /** Open logs and their lengths (what has been written and synced). */
  const logs = new Map<string, { h: FileHandle; size: number }>();
  const path = (name: string) => join(dir, name);
  const missing = (e: unknown) => (e as NodeJS.ErrnoException).code === 'ENOENT';

  return {
    async read(name) {
      try {
        return new Uint8Array(await readFile(path(name)));
      } catch (e) {
        if (missing(e)) return null;
        throw e;
      }
    },
    async append(list) {
      // Each file gets its records, then fdatasync; a failure anywhere cuts
      // every file of the group back to where it was, so a retry appends
      // to whole records and nothing half-written is ever acknowledged.
      const started: [string, number][] = [];
      try {
        for (const [name, bytes] of list) {
          let log = logs.get(name);
          if (!log) {
            const h = await open(path(name), 'a');
            const size = (await h.stat()).size;
            log = { h, size };
            logs.set(name, log);
            // The file's name must survive a crash as well as its data.
            if (size === 0) await syncDir(dirname(path(name)));
          }
          started.push([name, log.size]);
          await writeAll(log.h, bytes);
          await log.h.datasync();
        }
      } catch (e) {
        for (const [name, size] of started) {
          const log = logs.get(name);
          await log?.h.truncate(size).then(() => log.h.datasync()).catch(() => {});
        }
        throw e;
      }
      for (const [name, bytes] of list) {
        const log = logs.get(name);
        if (log) log.size += bytes.length;
      }
    },
    async truncate(name, len) {
      const h = await open(path(name), 'r+');
      try {
        await h.truncate(len);
        await h.datasync();
      } finally {
        await h.close();
      }
    },
    async writeAtomic(name, bytes, secret) {
      const tmp = `${path(name)}.tmp`;
      const h = await open(tmp, 'w', secret ? 0o600 : 0o644);
      try {
        await h.writeFile(bytes);
        await h.sync();
      } finally {
        await h.close();
      }
      await rename(tmp, path(name));
      await syncDir(dirname(path(name)));
    },
    close() {
      for (const { h } of logs.values()) void h.close();
      logs.clear();
      held.delete(dir);
      try {
        unlinkSync(lockPath);
      } catch {
        // already gone
      }
    },
  };
}
