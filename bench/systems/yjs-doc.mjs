// How the benchmark's JSON documents map onto a Y.Doc: one Y.Map `root`
// holding the top-level keys (values stored as JSON); one transaction per patch.
export function applyPatch(ydoc, patch) {
  const root = ydoc.getMap('root');
  ydoc.transact(() => {
    for (const [k, v] of Object.entries(patch)) root.set(k, v);
  });
}

export const rev = (ydoc) => ydoc.getMap('root').get('rev');
