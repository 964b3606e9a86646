// Starts real confab-gateway processes for tests, on port 0, with a private data directory.
import { spawn } from 'node:child_process';
import { mkdtempSync, existsSync } from 'node:fs';
import { tmpdir, homedir } from 'node:os';
import { join } from 'node:path';
import { createHmac } from 'node:crypto';

export const SECRET = 'e2e-secret-e2e-secret-e2e-secret-e2e!';

/**
 * The gateway binary: the cargo build of `profile` ('debug', or 'release' for load tests, where
 * an unoptimised build would measure itself, not the fleet). CONFAB_GATEWAY_BIN (debug) or
 * CONFAB_GATEWAY_RELEASE_BIN (release) name it outright.
 */
export function gatewayBin(profile = 'debug') {
  const candidates = [
    profile === 'release' ? process.env.CONFAB_GATEWAY_RELEASE_BIN : process.env.CONFAB_GATEWAY_BIN,
    process.env.CARGO_TARGET_DIR && join(process.env.CARGO_TARGET_DIR, profile, 'confab-gateway'),
    join(homedir(), '.cache', 'confab-target', profile, 'confab-gateway'),
  ].filter(Boolean);
  const found = candidates.find((p) => existsSync(p));
  if (!found) throw new Error(`confab-gateway binary not found (tried ${candidates.join(', ')}); run cargo build${profile === 'release' ? ' --release' : ''} first`);
  return found;
}

const b64url = (v) => Buffer.from(typeof v === 'string' ? v : JSON.stringify(v)).toString('base64url');

/** An HS256 token, as any identity provider sharing the secret would sign it. */
export function token(sub, { name = sub, roles, departments, ttlSeconds = 3600, secret = SECRET } = {}) {
  const now = Math.floor(Date.now() / 1000);
  const claims = { sub, name, exp: now + ttlSeconds, iat: now };
  if (roles) claims.roles = roles;
  if (departments) claims.departments = departments;
  const head = `${b64url({ alg: 'HS256', typ: 'JWT' })}.${b64url(claims)}`;
  return `${head}.${createHmac('sha256', secret).update(head).digest('base64url')}`;
}

/**
 * Starts a gateway and resolves once it prints its URL.
 * options.env: extra CONFAB_* variables; options.dataDir: reuse a data directory (restart tests);
 * options.port: listen on a fixed port (restart on the same address); options.bin: another binary.
 */
export async function startGateway(options = {}) {
  const dataDir = options.dataDir ?? mkdtempSync(join(tmpdir(), 'confab-e2e-'));
  const env = {
    ...process.env,
    RUST_LOG: process.env.RUST_LOG ?? 'warn',
    CONFAB_LISTEN: `127.0.0.1:${options.port ?? 0}`,
    CONFAB_DATA_DIR: dataDir,
    CONFAB_JWT_SECRET: SECRET,
    CONFAB_PRESENCE_GRACE_MS: '300',
    // A SIGTERM drains: keep the window short so stopping a gateway in a test stays quick.
    CONFAB_DRAIN_SECONDS: '2',
    ...options.env,
  };
  const proc = spawn(options.bin ?? gatewayBin(), options.args ?? [], { env, stdio: ['ignore', 'pipe', 'pipe'] });
  let stderr = '';
  proc.stderr.on('data', (d) => { stderr += d; if (process.env.CONFAB_E2E_LOGS) process.stderr.write(d); });
  const url = await new Promise((resolve, reject) => {
    let out = '';
    const timer = setTimeout(() => reject(new Error(`gateway did not start in 20 s; stderr:\n${stderr}`)), 20000);
    proc.stdout.on('data', (d) => {
      out += d;
      const m = out.match(/listening on (http:\/\/[^\s]+)/);
      if (m) { clearTimeout(timer); resolve(m[1]); }
    });
    proc.on('exit', (code) => { clearTimeout(timer); reject(new Error(`gateway exited with ${code}; stderr:\n${stderr}`)); });
  });
  const port = Number(new URL(url).port);
  const exited = new Promise((resolve) => proc.on('exit', (code, signal) => resolve({ code, signal })));
  return {
    url, port, dataDir, proc, exited,
    stderr: () => stderr,
    async stop(signal = 'SIGTERM') {
      if (proc.exitCode === null && proc.signalCode === null) proc.kill(signal);
      return exited;
    },
  };
}

/** Calls the HTTP API; resolves to {status, body}. */
export async function api(base, tok, method, path, body, headers = {}) {
  const res = await fetch(`${base}${path}`, {
    method,
    headers: {
      ...(tok ? { authorization: `Bearer ${tok}` } : {}),
      ...(body !== undefined ? { 'content-type': 'application/json' } : {}),
      ...headers,
    },
    body: body === undefined ? undefined : typeof body === 'string' ? body : JSON.stringify(body),
  });
  const text = await res.text();
  let parsed = text;
  try { parsed = text ? JSON.parse(text) : null; } catch { /* not JSON */ }
  return { status: res.status, body: parsed, headers: res.headers };
}

export const sleep = (ms) => new Promise((r) => setTimeout(r, ms));
