/**
 * The file store's I/O in Node (`storage: 'files'`): the bytes side of the
 * store the WebAssembly client keeps in the native server's record format
 * (see wasm/src/files.rs). Every append is followed by `fdatasync` of its
 * file (and a new file's directory is synced) before it resolves; metadata
 * is written to a temporary file, synced, renamed and its directory synced.
 * One process at a time uses a directory: a `LOCK` file holds its pid.
 */
import { mkdir, open, readFile, rename, unlink, type FileHandle } from 'node:fs/promises';
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

/** Take `dir/LOCK` for this process, or refuse with `StorageBlocked`. */
async function lock(dir: string): Promise<string> {
  const path = join(dir, 'LOCK');
  if (held.has(dir)) throw synclineError('StorageBlocked', `${dir} is already open in this process`);
  for (let attempt = 0; attempt < 2; attempt++) {
    try {
      const h = await open(path, 'wx', 0o600);
      await h.writeFile(String(process.pid));
      await h.close();
      held.add(dir);
      return path;
    } catch (e) {
      if ((e as NodeJS.ErrnoException).code !== 'EEXIST') throw e;
      const pid = Number(readFileSync(path, 'utf8').trim());
      if (Number.isInteger(pid) && pid > 0 && pid !== process.pid && alive(pid)) {
        throw synclineError('StorageBlocked', `${dir} is in use by process ${pid}`);
      }
      await unlink(path).catch(() => {}); // left by a process that is gone
    }
  }
  throw synclineError('StorageBlocked', `could not lock ${dir}`);
}

/** The I/O of a replica directory, created if missing and locked for this process. */
export async function fileIo(directory: string): Promise<FileIo> {
  const dir = resolve(directory);
  await mkdir(join(dir, 'dbs'), { recursive: true });
  await mkdir(join(dir, 'meta'), { recursive: true });
  const lockPath = await lock(dir);
  const logs = new Map<string, FileHandle>();
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
      await Promise.all(
        list.map(async ([name, bytes]) => {
          let h = logs.get(name);
          let created = false;
          if (!h) {
            h = await open(path(name), 'a');
            created = (await h.stat()).size === 0;
            logs.set(name, h);
          }
          await h.write(bytes);
          await h.datasync();
          if (created) await syncDir(dirname(path(name)));
        }),
      );
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
      for (const h of logs.values()) void h.close();
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
