// The rules, as a pure function of the game document. Every replica derives
// the board from the same move log with the same rule, so concurrent moves
// (two clicks for one turn, from anywhere) end in the same board everywhere:
// moves are read in the log's order (automerge orders concurrent appends
// identically on every replica) and a move that is not legal at its place in
// that order is ignored.

export type Mark = 'X' | 'O';

export type Seat = { replica: string; name: string };

export type Move = { cell: number; by: Mark; player: string; round: number };

export type Game = {
  name: string;
  createdAt: number;
  round: number;
  players: { X?: Seat | null; O?: Seat | null };
  moves: Move[];
};

export type Board = {
  cells: (Mark | null)[];
  /** Whose turn it is (when not over). */
  turn: Mark;
  winner: Mark | null;
  /** The winning cells. */
  line: number[] | null;
  draw: boolean;
  over: boolean;
};

const LINES = [
  [0, 1, 2], [3, 4, 5], [6, 7, 8],
  [0, 3, 6], [1, 4, 7], [2, 5, 8],
  [0, 4, 8], [2, 4, 6],
];

export function boardOf(game: Game | undefined): Board {
  const cells: (Mark | null)[] = Array(9).fill(null);
  let turn: Mark = 'X';
  let winner: Mark | null = null;
  let line: number[] | null = null;
  for (const m of game?.moves ?? []) {
    if (winner || !cells.includes(null)) break;
    const legal =
      m.round === game!.round &&
      m.by === turn &&
      m.player === game!.players[m.by]?.replica &&
      Number.isInteger(m.cell) &&
      m.cell >= 0 &&
      m.cell < 9 &&
      cells[m.cell] === null;
    if (!legal) continue;
    cells[m.cell] = m.by;
    line = LINES.find((l) => l.every((c) => cells[c] === m.by)) ?? null;
    if (line) winner = m.by;
    turn = turn === 'X' ? 'O' : 'X';
  }
  const draw = !winner && !cells.includes(null);
  return { cells, turn, winner, line, draw, over: !!winner || draw };
}

/**
 * Strings written as values, not collaborative text: replica ids and marks
 * must never merge character by character (two players taking one seat at
 * once: one of them gets it, whole).
 */
export const ATOMIC = ['replica', 'player', 'by'];

export function newGame(name: string): Game {
  return { name, createdAt: Date.now(), round: 1, players: { X: null, O: null }, moves: [] };
}
