import vue from '@vitejs/plugin-vue';
import { defineConfig } from 'vite';

// plugin-vue compiles the .vue files; syncline itself needs no plugin.
export default defineConfig({
  base: '/tictactoe/',
  plugins: [vue()],
  resolve: { dedupe: ['vue'] },
  build: { target: 'es2022', outDir: '../site/tictactoe', emptyOutDir: true },
});
