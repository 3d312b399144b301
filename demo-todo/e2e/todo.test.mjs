// TodoMVC demo end to end: headless Chromium profiles against the server
// and site/todo/ that the README's main command (scripts/demo) built and
// serves.
import assert from 'node:assert/strict';
import { resolve } from 'node:path';
import { after, before, describe, it } from 'node:test';
import { fileURLToPath } from 'node:url';
import { DEMO, newUser, Server, until } from '../../js/e2e/harness.mjs';

const root = resolve(fileURLToPath(new URL('.', import.meta.url)), '../..');
const T = { timeout: 60_000 };
const loaded = () => !!window.syncline;

describe('TodoMVC demo', () => {
  let server;
  const cleanup = [];
  before(async () => {
    server = await new Server([], { command: DEMO }).start();
  });
  after(async () => {
    for (const f of cleanup.reverse()) await f();
    await server.dispose();
  });
  async function open(list, opts) {
    const u = await newUser(opts);
    cleanup.push(() => u.close());
    const page = await u.page(`http://127.0.0.1:${server.port}/todo/?list=${list}`, loaded);
    return { user: u, page };
  }
  const titles = (page) => page.locator('.todo-list li label').allTextContents();
  async function addTodos(page, ...items) {
    for (const t of items) {
      await page.locator('.new-todo').fill(t);
      await page.locator('.new-todo').press('Enter');
    }
  }

  it('does everything TodoMVC does', T, async () => {
    const { page, user } = await open('flows');
    await addTodos(page, 'buy milk', 'walk the dog', '  call mum  ', '   ');
    assert.deepEqual(await titles(page), ['buy milk', 'walk the dog', 'call mum']);
    assert.equal(await page.locator('.new-todo').inputValue(), '');
    await page.locator('.todo-list li').nth(1).locator('.toggle').check();
    assert.equal(await page.locator('.todo-count').textContent(), '2 items left');

    await page.goto(`${page.url().split('#')[0]}#/active`);
    assert.deepEqual(await titles(page), ['buy milk', 'call mum']);
    assert.equal(await page.locator('.filters a.selected').textContent(), 'Active');
    await page.goto(`${page.url().split('#')[0]}#/completed`);
    assert.deepEqual(await titles(page), ['walk the dog']);
    await page.goto(`${page.url().split('#')[0]}#/`);

    // Edit by double-click: Enter saves (trimmed), Escape cancels, empty deletes.
    const first = page.locator('.todo-list li').first();
    await first.locator('label').dblclick();
    await first.locator('.edit').fill('buy oat milk  ');
    await first.locator('.edit').press('Enter');
    assert.equal(await first.locator('label').textContent(), 'buy oat milk');
    await first.locator('label').dblclick();
    await first.locator('.edit').fill('nope');
    await first.locator('.edit').press('Escape');
    assert.equal(await first.locator('label').textContent(), 'buy oat milk');
    const last = page.locator('.todo-list li').last();
    await last.locator('label').dblclick();
    await last.locator('.edit').fill('');
    await last.locator('.edit').press('Enter');
    assert.deepEqual(await titles(page), ['buy oat milk', 'walk the dog']);

    await page.locator('.toggle-all').check();
    assert.equal(await page.locator('.todo-count').textContent(), '0 items left');
    await page.locator('.toggle-all').uncheck();
    assert.equal(await page.locator('.todo-count').textContent(), '2 items left');
    await page.locator('.todo-list li').first().locator('.toggle').check();
    await page.locator('.clear-completed').click();
    assert.deepEqual(await titles(page), ['walk the dog']);
    await page.locator('.todo-list li').first().hover();
    await page.locator('.todo-list li .destroy').first().click();
    assert.equal(await page.locator('.todo-list li').count(), 0);
    assert.equal(await page.locator('.footer').count(), 0);

    // Everything is in the database, not only on screen.
    await addTodos(page, 'persisted');
    await until(page, () => Object.values(syncline.db.all()).some((t) => t.title === 'persisted'));
    await until(page, () => document.querySelector('[data-testid=status]')?.dataset.status === 'synced');
    assert.deepEqual(user.errors, []);
  });

  it('works offline: reloads with the server down, and offline edits merge when it returns', T, async () => {
    const a = await open('offline-e2e');
    const b = await open('offline-e2e');
    await addTodos(a.page, 'water the plants');
    await until(b.page, () => document.querySelectorAll('.todo-list li').length === 1);
    // The service worker has cached the app (page, scripts, wasm).
    await until(a.page, () => navigator.serviceWorker.controller !== null);
    for (const p of [a.page, b.page]) await until(p, () => document.querySelector('[data-testid=status]')?.dataset.status === 'synced');

    await server.stop();
    await addTodos(a.page, 'added offline by A');
    await until(b.page, () => document.querySelector('[data-testid=status]')?.dataset.status !== 'synced');
    await b.page.locator('.todo-list li').first().locator('.toggle').check();
    await a.page.reload();
    await until(a.page, loaded);
    assert.deepEqual(await titles(a.page), ['water the plants', 'added offline by A']);
    assert.equal(await a.page.locator('[data-testid=status]').getAttribute('data-status').then((s) => s === 'synced'), false);

    await server.start();
    for (const p of [a.page, b.page]) {
      await until(p, () => document.querySelectorAll('.todo-list li').length === 2 && document.querySelector('.todo-list li')?.classList.contains('completed'));
      await until(p, () => document.querySelector('[data-testid=status]')?.dataset.status === 'synced');
    }
    assert.deepEqual(await titles(b.page), ['water the plants', 'added offline by A']);
  });

  it('two people on one list see each other live; concurrent title edits keep both', T, async () => {
    const viewport = { width: 640, height: 560 };
    const a = await open('shared-e2e', { viewport });
    const b = await open('shared-e2e', { viewport });
    await addTodos(a.page, 'buy milk', 'fix the bike');
    await until(b.page, () => document.querySelectorAll('.todo-list li').length === 2);
    await b.page.locator('.todo-list li').nth(1).locator('.toggle').check();
    await until(a.page, () => document.querySelector('.todo-list li:nth-child(2)')?.classList.contains('completed'));
    await until(a.page, () => document.querySelector('[data-testid=online]')?.textContent === '2 people here');

    // Both edit the same title while the server is away; both edits survive.
    for (const p of [a.page, b.page]) await until(p, () => document.querySelector('[data-testid=status]')?.dataset.status === 'synced');
    await server.stop();
    for (const p of [a.page, b.page]) await until(p, () => document.querySelector('[data-testid=status]')?.dataset.status === 'offline' || document.querySelector('[data-testid=status]')?.dataset.status === 'connecting');
    const edit = async (page, title) => {
      const li = page.locator('.todo-list li').first();
      await li.locator('label').dblclick();
      await li.locator('.edit').fill(title);
      await li.locator('.edit').press('Enter');
    };
    await edit(a.page, 'buy oat milk');
    await edit(b.page, 'buy milk today');
    await addTodos(b.page, 'added offline');
    await server.start();
    for (const p of [a.page, b.page]) {
      await until(p, () => document.querySelector('.todo-list li label')?.textContent === 'buy oat milk today');
      await until(p, () => document.querySelectorAll('.todo-list li').length === 3);
      await until(p, () => document.querySelector('[data-testid=status]')?.dataset.status === 'synced');
    }
    assert.deepEqual(await titles(a.page), await titles(b.page));

    // The README's screenshot: the two browsers side by side.
    const shots = await Promise.all([a.page, b.page].map((p) => p.screenshot()));
    const board = await a.user.context.newPage();
    await board.setViewportSize({ width: 2 * viewport.width + 24, height: viewport.height + 16 });
    await board.setContent(
      `<body style="margin:0;padding:8px;background:#ddd;display:flex;gap:8px">${shots
        .map((s) => `<img src="data:image/png;base64,${s.toString('base64')}" style="box-shadow:0 2px 6px #0004">`)
        .join('')}</body>`,
    );
    await board.screenshot({ path: resolve(root, 'docs/todo.png') });
  });
});
