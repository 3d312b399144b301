// A child process holding `count` subscribed clients of one system (W3
// fan-out and W5 idle connections), so subscribers do not share the
// writer's event loop. Protocol over IPC:
//   parent → {system, url, ctx, count, changes}
//   child  → {ready: true} once every client is subscribed
//   child  → {done: true} once every client has seen the last change (W3)
//   parent → {finish: true}; child → {arrivals: number[][]} and exits.
import { now } from './util.mjs';

process.once('message', async ({ system, url, ctx, count, changes }) => {
  try {
    const sys = await import(`../systems/${system}.mjs`);
    const clients = [];
    const arrivals = [];
    let complete = 0;
    // Open in small batches: thousands of simultaneous handshakes would
    // measure the accept queue, not the steady state.
    for (let i = 0; i < count; i += 50) {
      const batch = [];
      for (let j = i; j < Math.min(count, i + 50); j++) {
        const seen = new Array(changes).fill(NaN);
        arrivals.push(seen);
        let next = 0;
        batch.push(
          sys.client(url, ctx).then(async (c) => {
            clients.push(c);
            await c.subscribe((seq) => {
              // A subscriber may see several changes at once (coalesced):
              // every change up to `seq` has arrived now. Negative `seq`s
              // are the writer's warm-up, not measured.
              if (!Number.isInteger(seq) || seq < next) return;
              const t = now();
              for (; next <= Math.min(seq, changes - 1); next++) seen[next] = t;
              if (next === changes && ++complete === count) process.send({ done: true });
            });
          }),
        );
      }
      await Promise.all(batch);
    }
    process.send({ ready: true });
    process.once('message', async () => {
      process.send({ arrivals }, () => process.exit(0));
    });
  } catch (e) {
    process.send({ error: String(e?.stack ?? e) });
    process.exit(1);
  }
});
