// Drain on one gateway: the three triggers (POST /admin/drain, SIGTERM, the annotation file, and
// the `drain` subcommand the preStop hook runs), readiness, refused upgrades, reconnect slots
// spread over the window, 1012 closes, and no send persisted without its ack.
import { describe, it } from 'node:test';
import assert from 'node:assert/strict';
import { randomUUID } from 'node:crypto';
import { execFile } from 'node:child_process';
import http from 'node:http';
import { mkdtempSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { startGateway, gatewayBin, token, api, sleep, SECRET } from './lib/gateway.mjs';
import { socketio, ws } from './lib/clients.mjs';

const uid = (p) => `${p}-${randomUUID().slice(0, 8)}`;
const admin = () => token(uid('ops'), { roles: ['admin'] });

async function until(what, check, timeoutMs = 8000) {
  const started = Date.now();
  for (;;) {
    const v = await check();
    if (v) return v;
    if (Date.now() - started > timeoutMs) throw new Error(`timed out waiting for ${what}`);
    await sleep(50);
  }
}

/** Sends as fast as acks come back, ignoring server_draining, until the connection ends. */
async function flood(client, conversationId) {
  const acked = [];
  let failures = 0;
  for (;;) {
    let ack;
    try {
      ack = await client.request('send_message', { conversationId, content: `f${acked.length}`, type: 'text', clientMsgId: randomUUID() }, 2000);
    } catch { break; }
    if (ack?.message) acked.push(ack.message.id);
    else if (ack?.error) { failures += 1; if (failures > 20) break; await sleep(20); }
  }
  return acked;
}

describe('draining one gateway', () => {
  it('refuses the admin endpoint without an admin token', async () => {
    const gw = await startGateway();
    try {
      const none = await api(gw.url, null, 'POST', '/admin/drain');
      assert.equal(none.status, 401);
      assert.equal(none.body.error.code, 'unauthorized');
      const user = await api(gw.url, token(uid('user')), 'POST', '/admin/drain');
      assert.equal(user.status, 403);
      assert.equal(user.body.error.code, 'forbidden');
      const peek = await api(gw.url, token(uid('user')), 'GET', '/admin/drain');
      assert.equal(peek.status, 403);
      const status = await api(gw.url, admin(), 'GET', '/admin/drain');
      assert.equal(status.status, 200);
      assert.equal(status.body.state, 'serving');
      assert.equal((await api(gw.url, null, 'GET', '/readyz')).status, 200);
    } finally { await gw.stop('SIGKILL'); }
  });

  it('spreads reconnect slots over the window, refuses newcomers, answers in-flight sends, closes with 1012', async () => {
    const gw = await startGateway({ env: { CONFAB_DRAIN_SECONDS: '4', CONFAB_API_REQUEST_BURST: '1000', CONFAB_MESSAGES_PER_SECOND: '1000', CONFAB_MESSAGE_BURST: '1000', CONFAB_EVENTS_PER_SECOND: '1000', CONFAB_EVENT_BURST: '1000' } });
    try {
      const owner = uid('owner');
      const users = Array.from({ length: 12 }, (_, i) => uid(`u${i}`));
      const created = await api(gw.url, token(owner), 'POST', '/api/conversations', { kind: 'group', title: 'Drain', members: users });
      assert.equal(created.status, 201);
      const conversationId = created.body.conversation.id;
      const clients = [];
      for (const [i, u] of users.entries()) {
        const c = await (i % 2 ? ws : socketio)(gw.url, token(u));
        await c.request('join_conversation', { conversationId });
        clients.push(c);
      }
      // Two clients keep sending through the drain and never leave by themselves.
      const floods = [flood(clients[0], conversationId), flood(clients[1], conversationId)];
      await sleep(200);

      const t0 = Date.now();
      const started = await api(gw.url, admin(), 'POST', '/admin/drain');
      assert.equal(started.status, 202, JSON.stringify(started.body));
      assert.equal(started.body.state, 'draining');
      assert.equal(started.body.windowSeconds, 4);
      assert.equal((await api(gw.url, admin(), 'POST', '/admin/drain')).status, 202, 'idempotent');

      const ready = await api(gw.url, null, 'GET', '/readyz');
      assert.equal(ready.status, 503);
      assert.match(ready.body.error.message, /draining/);
      // Newcomers are sent elsewhere, on both transports.
      await assert.rejects(socketio(gw.url, token(uid('late'))), /503|draining|xhr|websocket error/i);
      const refused = await ws(gw.url, token(uid('late'))).then(() => null, (e) => e);
      assert.equal(refused?.status, 503, String(refused));
      const res = await new Promise((resolve, reject) => http.get(`${gw.url}/ws`, { headers: { connection: 'Upgrade', upgrade: 'websocket', 'sec-websocket-version': '13', 'sec-websocket-key': 'dGhlIHNhbXBsZSBub25jZQ==' } }, (r) => { r.resume(); resolve(r); }).on('error', reject));
      assert.equal(res.statusCode, 503);
      assert.equal(res.headers['retry-after'], '1');

      const slots = await Promise.all(clients.map((c) => c.waitFor('server_draining', () => true, 3000)));
      const delays = slots.map((s) => s.reconnectAfterMs).sort((a, b) => a - b);
      // 12 clients over a 4 s window: one per 333 ms stratum.
      for (const [i, d] of delays.entries()) {
        assert.ok(d >= Math.floor(i * 4000 / 12) - 1 && d <= Math.ceil((i + 1) * 4000 / 12) + 1, `slot ${i}: ${d} ms in ${delays}`);
      }

      // Nobody leaves by themselves here: the server closes each shortly after its slot.
      const ends = await Promise.all(clients.map((c) => c.disconnected.then((why) => ({ why, at: Date.now() - t0 }))));
      for (const [i, c] of clients.entries()) {
        if (c.transport === 'ws') assert.match(ends[i].why, /^close 1012: server restarting/, ends[i].why);
        else assert.equal(ends[i].why, 'io server disconnect');
        const slot = slots[i].reconnectAfterMs;
        assert.ok(ends[i].at >= slot && ends[i].at <= slot + 1500 + 2500, `closed at ${ends[i].at} ms, slot ${slot} ms`);
      }
      const [a0, a1] = await Promise.all(floods);
      assert.ok(a0.length > 5 && a1.length > 5, `the floods ran: ${a0.length}, ${a1.length}`);

      const drained = await until('drained', async () => {
        const s = await api(gw.url, admin(), 'GET', '/admin/drain');
        return s.body.state === 'drained' ? s.body : null;
      });
      assert.equal(drained.connections, 0);
      // Every message persisted was acked to its sender: nothing in flight was cut off.
      const history = await api(gw.url, token(owner), 'GET', `/api/conversations/${conversationId}/messages?limit=100`);
      const stored = [];
      let page = history.body;
      stored.push(...page.messages);
      while (page.nextBeforeSeq) {
        page = (await api(gw.url, token(owner), 'GET', `/api/conversations/${conversationId}/messages?limit=100&beforeSeq=${page.nextBeforeSeq}`)).body;
        stored.push(...page.messages);
      }
      const acked = new Set([...a0, ...a1]);
      assert.deepEqual(stored.map((m) => m.id).filter((id) => !acked.has(id)), [], 'persisted but never acked');
      assert.equal(stored.length, acked.size);

      // Drained over HTTP: the process waits, empty and not ready, for its signal; then exits 0.
      assert.equal(gw.proc.exitCode, null);
      const t1 = Date.now();
      const exit = await gw.stop('SIGTERM');
      assert.equal(exit.code, 0, gw.stderr());
      assert.ok(Date.now() - t1 < 3000, `exit took ${Date.now() - t1} ms`);
    } finally { await gw.stop('SIGKILL'); }
  });

  it('drains on SIGTERM and exits once the last client is gone', async () => {
    const gw = await startGateway({ env: { CONFAB_DRAIN_SECONDS: '3' } });
    try {
      const c = await ws(gw.url, token(uid('sig')));
      const t0 = Date.now();
      gw.proc.kill('SIGTERM');
      const slot = await c.waitFor('server_draining', () => true, 2000);
      assert.ok(slot.reconnectAfterMs >= 0 && slot.reconnectAfterMs < 3000, JSON.stringify(slot));
      // A well-behaved client leaves at its slot; the gateway then has nothing left and exits.
      await sleep(slot.reconnectAfterMs);
      c.close();
      const exit = await gw.exited;
      assert.equal(exit.code, 0, gw.stderr());
      // It exits once empty, not at the window's end.
      assert.ok(Date.now() - t0 < slot.reconnectAfterMs + 1000, `exited after ${Date.now() - t0} ms, slot ${slot.reconnectAfterMs} ms`);
    } finally { await gw.stop('SIGKILL'); }
  });

  it('drains when the downward-API annotation file asks for it', async () => {
    const dir = mkdtempSync(join(tmpdir(), 'confab-podinfo-'));
    const file = join(dir, 'annotations');
    writeFileSync(file, 'kubernetes.io/config.seen="2026-11-23T10:00:00Z"\n');
    const gw = await startGateway({ env: { CONFAB_DRAIN_SECONDS: '1', CONFAB_DRAIN_ANNOTATION_FILE: file } });
    try {
      await sleep(1200);
      assert.equal((await api(gw.url, null, 'GET', '/readyz')).status, 200);
      writeFileSync(file, 'kubernetes.io/config.seen="2026-11-23T10:00:00Z"\nconfab.dev/drain="true"\n');
      await until('readiness to fail', async () => (await api(gw.url, null, 'GET', '/readyz')).status === 503, 4000);
      const s = await until('drained', async () => {
        const r = await api(gw.url, admin(), 'GET', '/admin/drain');
        return r.body.state === 'drained' ? r.body : null;
      }, 5000);
      assert.equal(s.connections, 0);
    } finally { await gw.stop('SIGKILL'); }
  });

  it('`confab-gateway drain --wait` (the preStop hook) returns once the gateway has drained', async () => {
    const gw = await startGateway({ env: { CONFAB_DRAIN_SECONDS: '2' } });
    try {
      const c = await socketio(gw.url, token(uid('pre')));
      const t0 = Date.now();
      const out = await new Promise((resolve, reject) => execFile(gatewayBin(), ['drain', '--wait', '--url', gw.url], {
        env: { ...process.env, CONFAB_JWT_SECRET: SECRET, CONFAB_DATA_DIR: gw.dataDir },
      }, (err, stdout, stderr) => (err ? reject(new Error(`${err.message}\n${stderr}`)) : resolve(stdout))));
      const lines = out.trim().split('\n').map((l) => JSON.parse(l));
      assert.equal(lines[0].state, 'draining');
      assert.equal(lines.at(-1).state, 'drained');
      assert.equal(lines.at(-1).connections, 0);
      assert.ok(Date.now() - t0 < 2000 + 3000, `took ${Date.now() - t0} ms`);
      assert.equal(await c.disconnected, 'io server disconnect');
      // A wrong token is refused with one line naming the problem.
      const refused = await new Promise((resolve) => execFile(gatewayBin(), ['drain', '--url', gw.url, '--token', 'nope'], (err, stdout, stderr) => resolve({ code: err?.code ?? 0, stderr })));
      assert.equal(refused.code, 1);
      assert.match(refused.stderr, /refused the drain: 401/);
    } finally { await gw.stop('SIGKILL'); }
  });
});
