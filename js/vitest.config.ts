import { defineConfig } from 'vitest/config';

export default defineConfig({
  test: {
    include: ['test/**/*.test.ts'],
    testTimeout: 20_000,
    // jsdom tests would get Vite's web transform, which rewrites
    // `new URL('../wasm/…', import.meta.url)` in src/node.ts to an http://
    // URL; the Node transform keeps the file URL the wasm is read from.
    testTransformMode: { ssr: ['**/*'] },
  },
});
