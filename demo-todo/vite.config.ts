import { defineConfig } from 'vite';

// No plugin: Vite compiles TSX with esbuild and bundles syncline's .wasm
// as an asset by itself. Served by `syncline serve --static site` at /todo/.
export default defineConfig({
  base: '/todo/',
  esbuild: { jsx: 'automatic' },
  // One copy of React and Redux, even though `syncline` is linked from ../js.
  resolve: { dedupe: ['react', 'react-dom', 'redux'] },
  // The manifest lists the build's files for the service worker (public/sw.js).
  build: { target: 'es2022', outDir: '../site/todo', emptyOutDir: true, manifest: 'manifest.json' },
});
