// Type-check what the docs tell people to write: every TypeScript block of
// js/README.md and the top README (and the <script setup> of Vue blocks)
// becomes a module of its own, checked with `tsc --strict` against the built
// declarations (dist/*.d.ts), beside test/types/*.ts (documents as
// interfaces). Names a snippet uses without defining them (`db`, your own
// `showError`, …) are declared in test/types/docs-globals.d.ts.
//
//   node test/typecheck-docs.mjs      (after `npx tsc`; scripts/test runs it)
import { spawnSync } from 'node:child_process';
import { mkdirSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { dirname, join, relative } from 'node:path';
import { fileURLToPath } from 'node:url';

const here = dirname(fileURLToPath(import.meta.url));
const pkg = join(here, '..');
const out = join(here, '.docs');
const SOURCES = [join(pkg, 'README.md'), join(pkg, '..', 'README.md')];

rmSync(out, { recursive: true, force: true });
mkdirSync(out, { recursive: true });
let count = 0;
for (const file of SOURCES) {
  const text = readFileSync(file, 'utf8');
  for (const m of text.matchAll(/^```(ts|tsx|vue)\n([\s\S]*?)^```$/gm)) {
    const line = text.slice(0, m.index).split('\n').length;
    let [lang, body] = [m[1], m[2]];
    if (lang === 'vue') {
      const script = /<script setup lang="ts">\n([\s\S]*?)<\/script>/.exec(body);
      if (!script) throw new Error(`${relative(pkg, file)}:${line}: a Vue block without <script setup lang="ts">`);
      [lang, body] = ['ts', script[1]];
    }
    const name = `${relative(join(pkg, '..'), file).replace(/[/.]/g, '_')}_${line}.${lang}`;
    // A module of its own (its names do not clash with other blocks').
    writeFileSync(join(out, name), `// ${relative(pkg, file)}:${line}\n${body}\nexport {};\n`);
    count++;
  }
}
writeFileSync(
  join(out, 'tsconfig.json'),
  JSON.stringify(
    {
      compilerOptions: {
        target: 'es2022',
        module: 'esnext',
        moduleResolution: 'bundler',
        lib: ['es2022', 'dom'],
        strict: true,
        noEmit: true,
        skipLibCheck: true,
        jsx: 'react-jsx',
        types: [],
        // `syncline` as an app imports it: the built package.
        paths: {
          syncline: ['../../dist/index.d.ts'],
          'syncline/*': ['../../dist/*.d.ts'],
        },
      },
      include: ['*.ts', '*.tsx', '../types/*.ts'],
    },
    null,
    2,
  ),
);
const tsc = spawnSync('npx', ['--no-install', 'tsc', '-p', join(out, 'tsconfig.json')], { cwd: pkg, stdio: 'inherit' });
if (tsc.status !== 0) {
  console.error(`the docs' TypeScript does not type-check (blocks in test/.docs/)`);
  process.exit(1);
}
console.log(`${count} documentation blocks and test/types/*.ts type-check (strict)`);
