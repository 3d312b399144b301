/**
 * Syncline for browsers (and bundlers such as Vite, with no plugin): the
 * WebAssembly module is fetched next to this file on first `connect()`.
 */
import init from '../wasm/syncline_wasm.js';
import { setWasmLoader } from './client.js';

setWasmLoader(async () => {
  await init();
});

export * from './api.js';
