/**
 * Syncline for Node (scripts and tests): the WebAssembly module is read from
 * disk. Replicas live in memory here (Node has no IndexedDB).
 */
import { readFile } from 'node:fs/promises';
import { initSync } from '../wasm/syncline_wasm.js';
import { setWasmLoader } from './client.js';

setWasmLoader(async () => {
  const bytes = await readFile(new URL('../wasm/syncline_wasm_bg.wasm', import.meta.url));
  initSync({ module: bytes });
});

export * from './api.js';
