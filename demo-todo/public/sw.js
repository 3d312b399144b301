// A small service worker so the TodoMVC opens with no server: every GET of
// this app (its page, scripts, styles and the wasm) is fetched from the
// network when possible and kept in a cache that answers when it is not.
// (Syncline keeps the data itself in IndexedDB; this only keeps the app.)
const CACHE = 'syncline-todo-v1';

// Install: cache the page and every file of the build (listed by Vite's
// manifest), so the app opens offline even after a single visit.
self.addEventListener('install', (event) => {
  event.waitUntil(
    (async () => {
      const base = self.registration.scope;
      const manifest = await (await fetch(new URL('manifest.json', base))).json();
      const files = new Set([base]);
      for (const chunk of Object.values(manifest)) {
        for (const f of [chunk.file, ...(chunk.css ?? []), ...(chunk.assets ?? [])]) files.add(new URL(f, base).href);
      }
      await (await caches.open(CACHE)).addAll([...files]);
      await self.skipWaiting();
    })(),
  );
});
self.addEventListener('activate', (event) => event.waitUntil(self.clients.claim()));

self.addEventListener('fetch', (event) => {
  const req = event.request;
  const scope = new URL(self.registration.scope);
  const url = new URL(req.url);
  if (req.method !== 'GET' || url.origin !== scope.origin || !url.pathname.startsWith(scope.pathname)) return;
  event.respondWith(
    (async () => {
      const cache = await caches.open(CACHE);
      try {
        const res = await fetch(req);
        if (res.ok) await cache.put(req, res.clone());
        return res;
      } catch (e) {
        const hit =
          (await cache.match(req)) ?? (req.mode === 'navigate' ? await cache.match(scope.href) : undefined);
        if (hit) return hit;
        throw e;
      }
    })(),
  );
});
