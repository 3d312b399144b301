// The npm package installs like a published one: apps made OUTSIDE the
// repository (fresh temp dirs, their own package.json and lockfile) install
// the packed tarball (scripts/package) with `npm install`, build with their
// own tools, and sync through the real server:
//
//   react/  Vite 8 + React 19: the quick start and the React example of
//           js/README.md, verbatim, with syncline/react
//   vue/    Vite 8 + Vue 3 (render functions): the quick start and syncline/vue
//   redux/  Vite 8 + Redux Toolkit: the quick start and the Redux example of
//           js/README.md, verbatim, with syncline/redux
//   node/   a Node script with `ws`: connects, writes, sees another client's
//           write and exits on its own
//
// Each browser app is type-checked against the package's .d.ts (`tsc`, with
// create-vite's tsconfig), bundled by `vite build`, served by `syncline serve
// --static <its dist>` and opened in two headless Chromium profiles.
//
// Run by scripts/test-package (SYNCLINE_TARBALL = the tarball, SYNCLINE_BIN =
// the server binary). SYNCLINE_KEEP_CONSUMERS=1 keeps the temp apps.
import assert from 'node:assert/strict';
import { spawn } from 'node:child_process';
import { cpSync, existsSync, lstatSync, mkdtempSync, readdirSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join, relative, resolve, sep } from 'node:path';
import { after, before, describe, it } from 'node:test';
import { fileURLToPath } from 'node:url';
import { newUser, Server, until } from '../e2e/harness.mjs';

const here = fileURLToPath(new URL('.', import.meta.url));
const pkgDir = resolve(here, '..');
const { version } = JSON.parse(readFileSync(join(pkgDir, 'package.json'), 'utf8'));
const TARBALL = resolve(process.env.SYNCLINE_TARBALL ?? join(pkgDir, '../target/package', `syncline-${version}.tgz`));
const KEEP = !!process.env.SYNCLINE_KEEP_CONSUMERS;
const SETUP = { timeout: 240_000 }; // npm install + tsc + vite build
const T = { timeout: 60_000 };

/** The code block right after `<!-- test:NAME … -->` in js/README.md. */
function readmeBlock(name) {
  const readme = readFileSync(join(pkgDir, 'README.md'), 'utf8');
  const marker = `<!-- test:${name} `;
  const at = readme.indexOf(marker);
  assert.ok(at >= 0, `js/README.md lost its "${marker}…-->" marker`);
  assert.equal(readme.indexOf(marker, at + 1), -1, `js/README.md has two "${marker}" markers`);
  const rest = readme.slice(readme.indexOf('\n', at) + 1);
  const m = /^```\w*\n([\s\S]*?)^```$/m.exec(rest);
  assert.ok(m && m.index === 0, `js/README.md: "${marker}…-->" must be directly followed by a code block`);
  return m[1];
}

/** The quick start as a module of the app, exporting what it made. */
const quickstart = () => `${readmeBlock('quickstart')}\nexport { client, db };\n`;

/** The server's flags as the quick start's comment gives them (`--anonymous '…'`). */
function quickstartServerArgs() {
  const patterns = [...readmeBlock('quickstart').matchAll(/--anonymous '([^']+)'/g)].map((m) => m[1]);
  assert.ok(patterns.length, "the quick start no longer says how to run the server (--anonymous '…')");
  return patterns.flatMap((p) => ['--anonymous', p]);
}

/** Run a command to completion (bounded); resolves to its output, rejects with it. */
function run(cmd, args, { cwd, timeout = 180_000 } = {}) {
  return new Promise((ok, fail) => {
    const started = Date.now();
    // Own process group, so a timeout kills what it started too.
    const p = spawn(cmd, args, { cwd, detached: true, stdio: ['ignore', 'pipe', 'pipe'] });
    let out = '';
    let timedOut = false;
    p.stdout.on('data', (d) => (out += d));
    p.stderr.on('data', (d) => (out += d));
    const timer = setTimeout(() => {
      timedOut = true;
      process.kill(-p.pid, 'SIGKILL');
    }, timeout);
    p.on('error', (e) => {
      clearTimeout(timer);
      fail(e);
    });
    p.on('close', (code, signal) => {
      clearTimeout(timer);
      const what = `${cmd} ${args.join(' ')} (in ${cwd})`;
      if (code === 0) {
        console.log(`${what}: ${((Date.now() - started) / 1000).toFixed(1)} s`);
        ok(out);
      } else {
        const why = timedOut ? `timed out after ${timeout / 1000} s` : signal ?? `exit ${code}`;
        fail(new Error(`${what}: ${why}\n${out}`));
      }
    });
  });
}

/**
 * Copy the template `name` to a fresh temp dir, add `files`, and install the
 * tarball there like a published package (plus the template's locked deps).
 */
async function makeApp(name, files = {}) {
  assert.ok(existsSync(TARBALL), `no tarball at ${TARBALL}: run ./scripts/package (or ./scripts/test-package)`);
  const template = join(here, name);
  const dir = mkdtempSync(join(tmpdir(), `syncline-consumer-${name}-`));
  cpSync(template, dir, {
    recursive: true,
    filter: (src) => !relative(template, src).split(sep).some((p) => p === 'node_modules' || p === 'dist'),
  });
  for (const [file, text] of Object.entries(files)) writeFileSync(join(dir, file), text);
  await run('npm', ['install', '--no-audit', '--no-fund', TARBALL], { cwd: dir });
  // Unpacked into node_modules, as from a registry (not a link to js/).
  const installed = join(dir, 'node_modules/syncline');
  assert.ok(!lstatSync(installed).isSymbolicLink(), 'syncline was linked, not installed');
  assert.equal(JSON.parse(readFileSync(join(installed, 'package.json'), 'utf8')).version, version);
  return dir;
}

function removeDir(dir) {
  if (!dir) return;
  if (KEEP) console.log(`kept ${dir}`);
  else rmSync(dir, { recursive: true, force: true });
}

/**
 * A browser app: installed, type-checked and built (`npm run build` = `tsc
 * && vite build`) in a temp dir, served by the real server; `open()` loads it
 * in a new browser profile and waits for `ready` there.
 */
function browserApp(name, files) {
  const app = { dir: null, server: null, users: [] };
  before(async () => {
    app.dir = await makeApp(name, files());
    await run('npm', ['run', 'build'], { cwd: app.dir });
    const dist = join(app.dir, 'dist');
    const assets = readdirSync(join(dist, 'assets'));
    assert.ok(
      assets.some((f) => f.endsWith('.wasm')),
      `vite build did not emit the .wasm as an asset: ${assets}`,
    );
    app.server = await new Server(['--static', dist, ...quickstartServerArgs()]).start();
  }, SETUP);
  after(async () => {
    for (const u of app.users) await u.close();
    await app.server?.dispose();
    removeDir(app.dir);
  });
  /** What the page shows (items, their inputs, status) and every error seen, for failures. */
  const report = async (page) => {
    const shown = await page
      .evaluate(() => ({
        status: document.querySelector('[data-status]')?.dataset.status ?? document.querySelector('ul[title]')?.title,
        items: [...document.querySelectorAll('li')].map((li) => [
          li.textContent.trim(),
          ...[...li.querySelectorAll('input')].map((i) => (i.type === 'checkbox' ? i.checked : i.value)),
        ]),
      }))
      .catch((e) => `(unreadable: ${e.message})`);
    const errors = app.users.flatMap((u) => [...u.errors, ...u.consoleErrors]);
    return `the page shows ${JSON.stringify(shown)}; errors in the browsers: ${JSON.stringify(errors)}`;
  };
  /** `until`, failing with what `page` shows. */
  app.until = async (page, what, fn, arg) => {
    try {
      await until(page, fn, arg);
    } catch (e) {
      throw new Error(`${what}: ${e.message}\n${await report(page)}`);
    }
  };
  /** A new browser profile on the app, once `ready` holds there. */
  app.open = async (what, ready, arg) => {
    const user = await newUser();
    app.users.push(user);
    user.consoleErrors = [];
    user.context.on('console', (m) => {
      if (m.type() === 'error') user.consoleErrors.push(m.text());
    });
    try {
      const page = await user.page(`http://127.0.0.1:${app.server.port}/`, () => true);
      await until(page, ready, arg);
      return { user, page };
    } catch (e) {
      const page = user.context.pages().at(-1);
      throw new Error(`${what}: ${e.message}\n${page ? await report(page) : ''}`);
    }
  };
  app.assertNoErrors = () => {
    for (const u of app.users) {
      assert.deepEqual(u.errors, [], 'page errors');
      assert.deepEqual(u.consoleErrors, [], 'console errors');
    }
  };
  return app;
}

// In-page predicates (serialised into the page by Playwright).
const shows = ([text, checked]) => {
  const li = [...document.querySelectorAll('li')].find((l) => l.textContent.includes(text));
  return !!li && (checked === undefined || li.querySelector('input[type=checkbox]').checked === checked);
};
const showsTitle = ([title, checked]) => {
  const li = [...document.querySelectorAll('li')].find((l) => l.querySelector('input.title')?.value === title);
  return !!li && (checked === undefined || li.querySelector('input[type=checkbox]').checked === checked);
};

describe('a new Vite + React app (README quick start and React example, syncline/react)', () => {
  const app = browserApp('react', () => ({
    'src/quickstart.ts': quickstart(),
    'src/readme-react.tsx': `import { db } from './quickstart.ts';\n${readmeBlock('react')}\nexport { App };\n`,
  }));

  it('syncs a todo added in one browser profile to another, and a toggle back', T, async () => {
    const a = await app.open('A ran the quick start (milk, done)', shows, ['milk', true]);
    const b = await app.open('B ran the quick start (milk, done)', shows, ['milk', true]);
    await a.page.getByLabel('new todo').fill('eggs');
    await a.page.getByLabel('new todo').press('Enter');
    await app.until(b.page, "B shows A's new todo", shows, ['eggs', false]);
    await b.page.locator('li', { hasText: 'eggs' }).getByRole('checkbox').click();
    await app.until(a.page, "A shows B's toggle", shows, ['eggs', true]);
    // useStatus and usePresence: both replicas synced, both connected.
    for (const { page } of [a, b]) {
      await app.until(page, 'synced, 2 online', () => document.querySelector('ul')?.title === 'synced, 2 online');
    }
    app.assertNoErrors();
  });
});

describe('a new Vite + Vue app (README quick start, syncline/vue)', () => {
  const app = browserApp('vue', () => ({ 'src/quickstart.ts': quickstart() }));

  it('syncs a todo added in one browser profile to another, and edits back', T, async () => {
    const a = await app.open('A ran the quick start (milk, done)', showsTitle, ['milk', true]);
    const b = await app.open('B ran the quick start (milk, done)', showsTitle, ['milk', true]);
    await a.page.getByLabel('new todo').fill('eggs');
    await a.page.getByLabel('new todo').press('Enter');
    await app.until(b.page, "B shows A's new todo", showsTitle, ['eggs', false]);
    // Mutating useDoc's copy writes the document back.
    const at = await b.page.evaluate(() => [...document.querySelectorAll('li')].findIndex((li) => li.querySelector('input.title').value === 'eggs'));
    const item = b.page.locator('li').nth(at);
    await item.getByRole('checkbox').click();
    await item.locator('input.title').fill('eggs and ham');
    await app.until(a.page, "A shows B's edits", showsTitle, ['eggs and ham', true]);
    for (const { page } of [a, b]) {
      await app.until(page, 'synced', () => document.querySelector('main')?.dataset.status === 'synced');
    }
    app.assertNoErrors();
  });
});

describe('a new Vite app with a Redux Toolkit store (README quick start and Redux example, syncline/redux)', () => {
  const app = browserApp('redux', () => ({
    'src/quickstart.ts': quickstart(),
    'src/store.ts': `import { db } from './quickstart.ts';\nconst showError = (e: unknown) => console.error(e);\n${readmeBlock('redux')}\nexport { store, todos };\n`,
  }));

  it('syncs a dispatched todo from one browser profile to another, and a toggle back', T, async () => {
    const a = await app.open('A ran the quick start (milk, done)', shows, ['milk', true]);
    const b = await app.open('B ran the quick start (milk, done)', shows, ['milk', true]);
    await a.page.getByLabel('new todo').fill('eggs');
    await a.page.getByLabel('new todo').press('Enter');
    await app.until(b.page, "B shows A's new todo", shows, ['eggs', false]);
    await b.page.locator('li', { hasText: 'eggs' }).getByRole('checkbox').click();
    await app.until(a.page, "A shows B's toggle", shows, ['eggs', true]);
    app.assertNoErrors();
  });
});

// How long a script may run on after its last output: close() must leave
// nothing that holds Node's event loop open (it once left the 15 s
// heartbeat timer armed).
const LINGER_MS = 3_000;

describe('a Node 20 script (syncline + ws)', () => {
  let dir;
  let server;
  before(async () => {
    dir = await makeApp('node');
    server = await new Server(['--anonymous', 'node-*']).start();
  }, SETUP);
  after(async () => {
    await server?.dispose();
    removeDir(dir);
  });

  /** `node sync.mjs URL ME OTHER`; resolves to its output and how long it lingered after printing. */
  function script(me, other, timeout = 45_000) {
    return new Promise((ok, fail) => {
      const p = spawn(process.execPath, ['sync.mjs', server.url, me, other], { cwd: dir, stdio: ['ignore', 'pipe', 'pipe'] });
      let out = '';
      let err = '';
      let printed = null;
      p.stdout.on('data', (d) => {
        out += d;
        printed ??= Date.now();
      });
      p.stderr.on('data', (d) => (err += d));
      const timer = setTimeout(() => {
        p.kill('SIGKILL');
        fail(new Error(`${me}: still running after ${timeout / 1000} s (printed: ${JSON.stringify(out)})\n${err}`));
      }, timeout);
      p.on('exit', (code) => {
        clearTimeout(timer);
        if (code !== 0) fail(new Error(`${me}: exit ${code}\n${err}`));
        else ok({ out: out.trim(), lingered: Date.now() - (printed ?? Date.now()) });
      });
    });
  }

  it("connects, writes, sees another client's write, and exits on its own", T, async () => {
    const [a, b] = await Promise.all([script('todo:a', 'todo:b'), script('todo:b', 'todo:a')]);
    assert.deepEqual(JSON.parse(a.out), { from: 'todo:b' });
    assert.deepEqual(JSON.parse(b.out), { from: 'todo:a' });
    console.log(`node ${process.version}: the scripts exited ${a.lingered} ms and ${b.lingered} ms after their last output`);
    assert.ok(Math.max(a.lingered, b.lingered) < LINGER_MS, `a script ran on for ${LINGER_MS / 1000} s after closing`);
  });
});
