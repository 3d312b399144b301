/**
 * Syncline for Node (scripts, bots, Electron's main process, tests): the
 * WebAssembly module is read from disk. Replicas live in files with
 * `storage: 'files'` and a `dir` (durable, as the native store), else in
 * memory (Node has no IndexedDB).
 */
import { readFile } from 'node:fs/promises';
import { initSync } from '../wasm/syncline_wasm.js';
import { setFileIo, setWasmLoader } from './client.js';
import { fileIo } from './files.js';

setFileIo(fileIo);

setWasmLoader(async () => {
  const bytes = await readFile(new URL('../wasm/syncline_wasm_bg.wasm', import.meta.url));
  initSync({ module: bytes });
});

export * from './api.js';
