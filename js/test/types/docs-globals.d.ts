// What the documentation's snippets use without defining: an open database
// and the app's own functions.
import type { SynclineDb } from 'syncline';

declare global {
  const db: SynclineDb;
  const id: string;
  const value: { title: string };
  function showError(e: unknown): void;
  function showStorageFullBanner(): void;
  // Vue's compiler macro, available in <script setup>.
  function defineProps<T>(): T;
}
