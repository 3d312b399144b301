// Tic-tac-toe demo end to end: three headless Chromium profiles (two
// players and a spectator) against the server and site/tictactoe/ that the
// README's main command (scripts/demo) built and serves.
import assert from 'node:assert/strict';
import { resolve } from 'node:path';
import { after, before, describe, it } from 'node:test';
import { fileURLToPath } from 'node:url';
import { DEMO, newUser, Server, until } from '../../js/e2e/harness.mjs';

const root = resolve(fileURLToPath(new URL('.', import.meta.url)), '../..');
const T = { timeout: 90_000 };
const loaded = () => !!window.syncline;
const viewport = { width: 520, height: 640 };

describe('tic-tac-toe demo', () => {
  let server;
  const cleanup = [];
  before(async () => {
    server = await new Server([], { command: DEMO }).start();
  });
  after(async () => {
    for (const f of cleanup.reverse()) await f();
    await server.dispose();
  });
  const url = (hash = '') => `http://127.0.0.1:${server.port}/tictactoe/${hash}`;
  async function user() {
    const u = await newUser({ viewport });
    cleanup.push(() => u.close());
    return u;
  }
  const cells = (page) => page.locator('.board .cell').allTextContents();
  async function move(page, cell) {
    await until(page, () => document.querySelector('[data-testid=message]')?.textContent === 'Your turn');
    await page.locator(`.cell[data-cell="${cell}"]`).click();
  }
  /** X creates a game, O joins from the lobby, a spectator watches. */
  async function table(name) {
    const [ux, uo, us] = [await user(), await user(), await user()];
    const x = await ux.page(url(), loaded);
    await x.locator('[data-testid=new-game-name]').fill(name);
    await x.locator('[data-testid=create]').click();
    await until(x, () => location.hash.startsWith('#/game/'));
    const id = decodeURIComponent((await x.evaluate(() => location.hash)).slice('#/game/'.length));
    const o = await uo.page(url(), loaded);
    const row = o.locator(`.games li[data-game="${id}"]`);
    await until(o, (id) => document.querySelector(`.games li[data-game="${id}"] [data-testid=here]`)?.textContent === '1 here', id);
    await row.getByRole('button', { name: 'Play O' }).click();
    const s = await us.page(url(), loaded);
    await until(s, (id) => document.querySelector(`.games li[data-game="${id}"] [data-testid=here]`)?.textContent === '2 here', id);
    await s.locator(`.games li[data-game="${id}"] .watch`).click();
    for (const p of [x, o, s]) await until(p, () => document.querySelector('.spectators')?.textContent === '1 watching');
    return { id, x, o, s, users: [ux, uo, us] };
  }

  it('a full game won by X, seen identically by the spectator, then a rematch', T, async () => {
    const { x, o, s, users } = await table('final');
    // The first table: everyone online is here.
    for (const p of [x, o, s]) await until(p, () => document.querySelector('[data-testid=online]')?.textContent === '3 online');
    for (const [page, cell] of [[x, 0], [o, 3], [x, 1], [o, 4], [x, 2]]) await move(page, cell);
    for (const p of [x, o, s]) await until(p, () => document.querySelector('[data-testid=message]')?.textContent === 'X wins!');
    const want = ['X', 'X', 'X', 'O', 'O', '', '', '', ''];
    for (const p of [x, o, s]) {
      assert.deepEqual(await cells(p), want);
      assert.deepEqual(await p.locator('.cell.win').evaluateAll((els) => els.map((e) => Number(e.dataset.cell))), [0, 1, 2]);
    }
    // The README's screenshot: the three browsers side by side.
    const shots = await Promise.all([x, o, s].map((p) => p.screenshot()));
    const board = await users[0].context.newPage();
    await board.setViewportSize({ width: 3 * viewport.width + 32, height: viewport.height + 16 });
    await board.setContent(
      `<body style="margin:0;padding:8px;background:#ccd;display:flex;gap:8px">${shots
        .map((b) => `<img src="data:image/png;base64,${b.toString('base64')}" style="box-shadow:0 2px 6px #0004">`)
        .join('')}</body>`,
    );
    await board.screenshot({ path: resolve(root, 'docs/tictactoe.png') });
    await board.close();

    await o.locator('[data-testid=rematch]').click();
    for (const p of [x, o, s]) await until(p, () => [...document.querySelectorAll('.board .cell')].every((c) => c.textContent === ''));
    await move(x, 8);
    await until(s, () => document.querySelector('.cell[data-cell="8"]')?.textContent === 'X');
    for (const u of users) assert.deepEqual(u.errors, []);
  });

  it('moves sent at once for one turn end in the same legal board everywhere', T, async () => {
    const { id, x, o, s } = await table('race');
    await move(x, 4);
    await until(o, () => document.querySelector('[data-testid=message]')?.textContent === 'Your turn');
    for (const p of [x, o, s]) await until(p, () => document.querySelector('[data-testid=status]')?.dataset.status === 'synced');
    // Cut the server, then everyone appends a move for O's turn: O (legal),
    // X (out of turn) and the spectator (not seated; claims O).
    await server.stop();
    for (const p of [x, o, s]) await until(p, () => document.querySelector('[data-testid=status]')?.dataset.status !== 'synced');
    const push = (page, cell, by) =>
      page.evaluate(
        ({ id, cell, by }) =>
          syncline.db.update(id, (g) => {
            g.moves.push({ cell, by, player: syncline.me.replica, round: g.round });
          }),
        { id, cell, by },
      );
    await Promise.all([push(o, 0, 'O'), push(x, 8, 'X'), push(s, 2, 'O')]);
    await server.start();
    for (const p of [x, o, s]) {
      await until(p, (id) => syncline.db.get(id)?.moves.length === 4, id);
      await until(p, () => document.querySelector('[data-testid=status]')?.dataset.status === 'synced');
    }
    const boards = await Promise.all([x, o, s].map(cells));
    assert.deepEqual(boards[1], boards[0]);
    assert.deepEqual(boards[2], boards[0]);
    const count = (m) => boards[0].filter((c) => c === m).length;
    assert.ok(count('X') - count('O') === 0 || count('X') - count('O') === 1, `legal board: ${boards[0]}`);
    assert.equal(boards[0][2], '', "the spectator's forged move never counts");
    // Whose turn it is agrees too (the messages differ by viewer: "Your turn").
    const turn = (p) => p.locator('.player.turn b').textContent();
    assert.equal(await turn(x), await turn(s));
    assert.equal(await turn(o), await turn(s));
  });

  it('a player who leaves is shown away, and resumes after coming back; the game survives reloads', T, async () => {
    const { id, x, o, s, users } = await table('resume');
    await move(x, 0);
    await o.close();
    await until(x, () => document.querySelector('[data-testid=away]') !== null);
    await until(s, () => document.querySelector('[data-testid=away]') !== null);
    // O comes back in the same browser profile: same replica, same seat.
    const o2 = await users[1].page(url(`#/game/${id}`), loaded);
    await until(x, () => document.querySelector('[data-testid=away]') === null);
    await move(o2, 4);
    await until(x, () => document.querySelector('.cell[data-cell="4"]')?.textContent === 'O');
    await x.reload();
    await until(x, loaded);
    await until(x, () => document.querySelector('.cell[data-cell="0"]')?.textContent === 'X' && document.querySelector('.cell[data-cell="4"]')?.textContent === 'O');
    await move(x, 8);
    await until(s, () => document.querySelector('.cell[data-cell="8"]')?.textContent === 'X');
  });
});
