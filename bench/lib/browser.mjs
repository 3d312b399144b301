// W6 in headless Chromium (Debian's, through playwright-core): the time to
// show 1,000 documents on a first visit (from the server) and after a
// reload (from IndexedDB), each in a fresh browser profile.
import { createReadStream, existsSync, mkdtempSync, rmSync, statSync } from 'node:fs';
import { createServer } from 'node:http';
import { tmpdir } from 'node:os';
import { extname, join, normalize } from 'node:path';
import { chromium } from 'playwright-core';
import { median } from './util.mjs';

const TYPES = { '.html': 'text/html', '.js': 'text/javascript', '.wasm': 'application/wasm' };
const ARGS = [
  '--headless',
  '--no-sandbox',
  '--disable-gpu',
  '--disable-quic',
  '--no-first-run',
  '--disable-background-networking',
  '--disable-component-update',
  '--disable-sync',
];

/** Serve the repository's `js/` and `bench/browser/` read-only on 127.0.0.1. */
async function serve(root) {
  const server = createServer((req, res) => {
    const path = normalize(decodeURIComponent(new URL(req.url, 'http://x').pathname));
    const file = join(root, path);
    const allowed = file.startsWith(join(root, 'js')) || file.startsWith(join(root, 'bench/browser'));
    if (!allowed || !existsSync(file) || !statSync(file).isFile()) {
      res.writeHead(404).end();
      return;
    }
    res.writeHead(200, { 'content-type': TYPES[extname(file)] ?? 'application/octet-stream' });
    createReadStream(file).pipe(res);
  });
  await new Promise((ok) => server.listen(0, '127.0.0.1', ok));
  return { url: `http://127.0.0.1:${server.address().port}`, close: () => new Promise((ok) => server.close(ok)) };
}

export async function browserLoad({ root, syncUrl, count, runs }) {
  const web = await serve(root);
  const first = [];
  const reload = [];
  try {
    for (let r = 0; r < runs; r++) {
      const dir = mkdtempSync(join(tmpdir(), 'bench-w6-profile-'));
      const context = await chromium.launchPersistentContext(dir, {
        executablePath: process.env.CHROMIUM ?? '/usr/bin/chromium',
        headless: true,
        args: ARGS,
      });
      try {
        const errors = [];
        const page = await context.newPage();
        page.on('pageerror', (e) => errors.push(String(e)));
        const url = `${web.url}/bench/browser/w6.html?count=${count}&server=${encodeURIComponent(syncUrl)}`;
        await page.goto(url);
        await page.waitForFunction(() => window.shownAt && window.synced, null, { timeout: 60_000 });
        first.push(await page.evaluate(() => window.shownAt));
        await page.reload();
        await page.waitForFunction(() => window.shownAt, null, { timeout: 60_000 });
        const [t, source] = await page.evaluate(() => [window.shownAt, window.source]);
        if (source !== 'indexeddb') throw new Error(`W6 reload showed documents from ${source}, not IndexedDB`);
        if (errors.length) throw new Error(`W6 page errors: ${errors.join('; ')}`);
        reload.push(t);
      } finally {
        await context.close();
        rmSync(dir, { recursive: true, force: true });
      }
    }
  } finally {
    await web.close();
  }
  return { server: median(first), idb: median(reload), serverRuns: first, idbRuns: reload };
}
