import react from '@vitejs/plugin-react';
import { defineConfig } from 'vite';

// As create-vite's react-ts template makes it: nothing for syncline.
export default defineConfig({
  plugins: [react()],
});
