// Tokens from outside (issue 30, part 2): JWTs minted in Node with the
// `jose` package — what an app backend or an identity provider does — open
// databases through the npm package against the real server. HS256 with the
// server's secret; EdDSA against a JWKS file with `kid`s (rotated without a
// restart); one token for several databases; typed refusals.
import assert from 'node:assert/strict';
import { mkdtempSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { setTimeout as pause } from 'node:timers/promises';
import { after, before, describe, it } from 'node:test';
import { SignJWT, exportJWK, generateKeyPair } from 'jose';
import WebSocket from 'ws';
import { Syncline } from '../dist/node.js';
import { Server } from './harness.mjs';

const T = { timeout: 60_000 };
const SECRET = 'jwt-e2e-secret-0123456789abcdef-0123456789';
const now = () => Math.floor(Date.now() / 1000);
const GRANTS = [
  { db: 'org-*', rights: 'read' },
  { db: 'user-7', rights: 'write' },
];

function hs256(claims, secret = SECRET) {
  return new SignJWT(claims)
    .setProtectedHeader({ alg: 'HS256' })
    .setIssuedAt()
    .setExpirationTime('1h')
    .sign(new TextEncoder().encode(secret));
}

function eddsa(claims, key, kid) {
  return new SignJWT(claims).setProtectedHeader({ alg: 'EdDSA', kid }).setIssuedAt().setExpirationTime('1h').sign(key);
}

async function keyPair(kid) {
  const { publicKey, privateKey } = await generateKeyPair('EdDSA', { crv: 'Ed25519' });
  return { kid, privateKey, jwk: { ...(await exportJWK(publicKey)), kid, alg: 'EdDSA', use: 'sig' } };
}

/** The code a database's sync ends with: 'synced' or the refusal's. */
async function outcome(token, name, write) {
  const c = await Syncline.connect(server.url, { storage: 'memory', WebSocket, token });
  try {
    const db = await c.open(name);
    if (write) await db.put('doc', { by: 'jwt' });
    return await db.whenSynced().then(
      () => 'synced',
      (e) => e.code,
    );
  } finally {
    await c.close();
  }
}

let server;
let keysDir;
let jwksPath;
let first;

describe('JWTs minted with jose', () => {
  before(async () => {
    first = await keyPair('key-1');
    keysDir = mkdtempSync(join(tmpdir(), 'syncline-jwks-'));
    jwksPath = join(keysDir, 'jwks.json');
    writeFileSync(jwksPath, JSON.stringify({ keys: [first.jwk] }));
    server = await new Server(['--secret', SECRET, '--jwks-file', jwksPath]).start();
  });
  after(async () => {
    await server?.dispose();
    rmSync(keysDir, { recursive: true, force: true });
  });

  it('HS256: one token reads org-* and writes user-7 on one connection', T, async () => {
    const token = await hs256({ sub: 'user-7', grants: GRANTS });
    const c = await Syncline.connect(server.url, { storage: 'memory', WebSocket, token });
    try {
      const [org, mine] = [await c.open('org-42'), await c.open('user-7')];
      await mine.put('note', { text: 'hello' });
      await mine.whenSynced();
      await org.whenSynced();
      await org.put('note', { text: 'not allowed' });
      await assert.rejects(org.whenSynced(), (e) => e.code === 'Forbidden');
    } finally {
      await c.close();
    }
  });

  it('EdDSA against the JWKS file, selected by kid', T, async () => {
    const token = await eddsa({ sub: 'user-7', grants: GRANTS }, first.privateKey, first.kid);
    assert.equal(await outcome(token, 'user-7', true), 'synced');
  });

  it('refuses expired, not-yet-valid, wrong-key and unknown-kid tokens with typed errors', T, async () => {
    const claims = { sub: 'user-7', grants: GRANTS };
    const expired = await new SignJWT(claims)
      .setProtectedHeader({ alg: 'HS256' })
      .setIssuedAt(now() - 7200)
      .setExpirationTime(now() - 3600)
      .sign(new TextEncoder().encode(SECRET));
    const early = await new SignJWT(claims)
      .setProtectedHeader({ alg: 'HS256' })
      .setNotBefore(now() + 3600)
      .setExpirationTime('2h')
      .sign(new TextEncoder().encode(SECRET));
    const wrongSecret = await hs256(claims, 'another-secret-0123456789abcdef-0123456789');
    const stranger = await keyPair('key-1');
    const wrongKey = await eddsa(claims, stranger.privateKey, 'key-1');
    const unknownKid = await eddsa(claims, first.privateKey, 'key-404');
    for (const [what, token] of Object.entries({ expired, early, wrongSecret, wrongKey, unknownKid })) {
      assert.equal(await outcome(token, 'user-7', true), 'Unauthorized', what);
    }
  });

  it('a key added to the JWKS file is used without a restart', T, async () => {
    const second = await keyPair('key-2');
    const token = await eddsa({ sub: 'user-7', grants: GRANTS }, second.privateKey, second.kid);
    writeFileSync(jwksPath, JSON.stringify({ keys: [first.jwk, second.jwk] }));
    // The server looks at the file at most once a second.
    const deadline = Date.now() + 20_000;
    let got;
    while ((got = await outcome(token, 'user-7', true)) !== 'synced' && Date.now() < deadline) {
      assert.equal(got, 'Unauthorized');
      await pause(250); // a bounded poll: the server rereads the file within a second
    }
    assert.equal(got, 'synced');
  });
});
