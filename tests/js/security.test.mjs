// Abuse at the edges, as an attacker would try it: raw sockets where a client library would
// hide the abuse (slowloris, slow bodies, descriptor exhaustion, idle upgrades), forged
// X-Forwarded-For chains, API floods, expired agents, tokens in logs. SECURITY.md maps each
// checklist item to the test proving it.
import { describe, it, before, after } from 'node:test';
import assert from 'node:assert/strict';
import net from 'node:net';
import { randomUUID, createHmac } from 'node:crypto';
import WebSocket from 'ws';
import { startGateway, gatewayBin, token, api, sleep, SECRET } from './lib/gateway.mjs';
import { socketio, ws } from './lib/clients.mjs';

const uid = (p) => `${p}-${randomUUID().slice(0, 8)}`;

/**
 * A raw TCP connection that records what it reads and when the server closed it.
 * `localAddress` picks the client address (any 127.x.y.z works on Linux loopback).
 */
function raw(port, { localAddress } = {}) {
  const socket = net.connect({ host: '127.0.0.1', port, localAddress });
  const opened = Date.now();
  let data = '';
  socket.on('data', (d) => { data += d; });
  socket.on('error', () => {});
  const closed = new Promise((resolve) => socket.on('close', () => resolve(Date.now() - opened)));
  const connected = new Promise((resolve, reject) => { socket.once('connect', resolve); socket.once('error', reject); });
  return { socket, connected, closed, data: () => data, write: (s) => socket.write(s), destroy: () => socket.destroy() };
}

/** Resolves to the ms after which `closed` settled, or 'open' if still open after `ms`. */
const closedWithin = (c, ms) => Promise.race([c.closed, sleep(ms).then(() => 'open')]);

/** One HTTP/1.1 request on a fresh raw connection; resolves to {status, headers, body, raw}. */
async function rawRequest(port, path, { localAddress, timeoutMs = 3000 } = {}) {
  const c = raw(port, { localAddress });
  await c.connected;
  c.write(`GET ${path} HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n`);
  const done = await closedWithin(c, timeoutMs);
  c.destroy();
  const text = c.data();
  const [head, ...rest] = text.split('\r\n\r\n');
  const [statusLine, ...headerLines] = head.split('\r\n');
  const headers = Object.fromEntries(headerLines.map((l) => { const i = l.indexOf(':'); return [l.slice(0, i).toLowerCase(), l.slice(i + 1).trim()]; }));
  return { status: Number(statusLine.split(' ')[1]) || 0, headers, body: rest.join('\r\n\r\n'), done, raw: text };
}

describe('slow clients are cut off', () => {
  let gw;
  before(async () => {
    gw = await startGateway({ env: { CONFAB_HTTP_HEADER_TIMEOUT_MS: '1500', CONFAB_HTTP_IDLE_TIMEOUT_MS: '1000', CONFAB_HTTP_BODY_TIMEOUT_MS: '1500', CONFAB_WS_AUTH_TIMEOUT_MS: '800' } });
  });
  after(async () => { await gw.stop(); });

  it('closes connections sending partial headers (slowloris) and idle ones, and keeps serving', async () => {
    const partial = [];
    const idle = [];
    for (let i = 0; i < 50; i++) {
      const p = raw(gw.port);
      await p.connected;
      p.write('GET /healthz HTTP/1.1\r\nhost: x\r\n');
      partial.push(p);
      const q = raw(gw.port);
      await q.connected;
      idle.push(q);
    }
    // Trickling one header byte every 300 ms does not extend the header deadline.
    const trickler = raw(gw.port);
    await trickler.connected;
    trickler.write('GET /healthz HTTP/1.1\r\n');
    const drip = setInterval(() => trickler.write('x'), 300);
    const ok = await api(gw.url, undefined, 'GET', '/healthz');
    assert.equal(ok.status, 200, 'serving during the attack');
    const partialTimes = await Promise.all(partial.map((p) => closedWithin(p, 6000)));
    const idleTimes = await Promise.all(idle.map((p) => closedWithin(p, 6000)));
    const trickled = await closedWithin(trickler, 6000);
    clearInterval(drip);
    assert.ok(partialTimes.every((t) => t !== 'open' && t >= 1000 && t < 4500), `partial headers closed after ~1.5 s: ${partialTimes}`);
    assert.ok(idleTimes.every((t) => t !== 'open' && t >= 700 && t < 4000), `idle connections closed after ~1 s: ${idleTimes}`);
    assert.ok(trickled !== 'open' && trickled < 4500, `a trickled header is closed at the header deadline: ${trickled}`);
    // Partial headers may get a 408 from hyper before the close; never a 200.
    assert.ok(partial.every((p) => !p.data().includes(' 200 ')), 'no partial request was served');
  });

  it('closes a kept-alive connection once it has been idle for the idle timeout', async () => {
    const c = raw(gw.port);
    await c.connected;
    c.write('GET /healthz HTTP/1.1\r\nhost: x\r\n\r\n');
    const deadline = Date.now() + 3000;
    while (!c.data().includes('ok') && Date.now() < deadline) await sleep(20);
    assert.match(c.data(), /^HTTP\/1.1 200/);
    const answeredAt = Date.now();
    const closed = await closedWithin(c, 5000);
    assert.notEqual(closed, 'open');
    const idleFor = Date.now() - answeredAt;
    assert.ok(idleFor >= 700 && idleFor < 3000, `closed ${idleFor} ms after the answer`);
  });

  it('answers a body arriving one byte at a time with 408 at the body deadline and closes', async () => {
    const t = token(uid('slowbody'));
    const body = JSON.stringify({ kind: 'group', title: 'slow', members: [] });
    const c = raw(gw.port);
    await c.connected;
    c.write(`POST /api/conversations HTTP/1.1\r\nhost: x\r\nauthorization: Bearer ${t}\r\ncontent-type: application/json\r\ncontent-length: ${body.length}\r\n\r\n`);
    let i = 0;
    const drip = setInterval(() => { if (i < body.length) c.write(body[i++]); }, 400);
    const closed = await closedWithin(c, 6000);
    clearInterval(drip);
    assert.notEqual(closed, 'open', 'the slow body holds the connection no longer');
    assert.ok(closed >= 1200 && closed < 4500, `closed after ${closed} ms`);
    assert.match(c.data(), /^HTTP\/1.1 408/, c.data());
    assert.match(c.data(), /did not arrive within 1500 ms/);
    assert.ok(i < body.length, 'cut off before the body was complete');
    const list = await api(gw.url, t, 'GET', '/api/conversations');
    assert.equal(list.body.conversations.length, 0, 'nothing was created');
  });

  it('closes an Engine.IO WebSocket that never sends CONNECT, and a /ws upgrade that never authenticates', async () => {
    const eio = new WebSocket(`${gw.url.replace('http', 'ws')}/socket.io/?EIO=4&transport=websocket`);
    const frames = [];
    eio.on('message', (d) => frames.push(d.toString()));
    const started = Date.now();
    await new Promise((resolve, reject) => { eio.once('open', resolve); eio.once('error', reject); });
    const eioClosed = await Promise.race([new Promise((r) => eio.once('close', () => r(Date.now() - started))), sleep(5000).then(() => 'open')]);
    assert.notEqual(eioClosed, 'open', `still open; got ${frames}`);
    assert.ok(eioClosed >= 600 && eioClosed < 3500, `closed after ${eioClosed} ms`);
    assert.ok(frames[0].startsWith('0{'), 'the Engine.IO open packet came first');
    assert.ok(!frames.some((f) => f.startsWith('40')), 'never connected to a namespace');
    const t0 = Date.now();
    await assert.rejects(ws(gw.url, undefined), /close 4001: unauthorized: missing token/);
    assert.ok(Date.now() - t0 < 3500);
  });
});

describe('connection caps', () => {
  it('keeps /healthz answering with a low descriptor limit while one client holds hundreds of idle sockets', async () => {
    // ulimit -n 256: the default cap is 256 - 128 = 128 connections.
    const gw = await startGateway({ bin: '/bin/bash', args: ['-c', 'ulimit -n 256 && exec "$0"', gatewayBin()], env: { CONFAB_HTTP_IDLE_TIMEOUT_MS: '10000' } });
    try {
      const attacker = [];
      for (let i = 0; i < 400; i++) {
        const c = raw(gw.port, { localAddress: '127.0.0.2' });
        attacker.push(c);
        await c.connected.catch(() => {});
      }
      await sleep(300);
      const stillOpen = (await Promise.all(attacker.map((c) => closedWithin(c, 0)))).filter((t) => t === 'open').length;
      assert.ok(stillOpen >= 128 && stillOpen <= 128 + 8 + 20, `the cap held (${stillOpen} of 400 attacker sockets open)`);
      for (let i = 0; i < 10; i++) {
        const t0 = Date.now();
        const probe = await rawRequest(gw.port, '/healthz');
        assert.equal(probe.status, 200, `probe ${i}: ${probe.raw}`);
        assert.ok(Date.now() - t0 < 1000, `probe ${i} answered in ${Date.now() - t0} ms`);
        await sleep(100);
      }
      // Anything but a health probe over the cap: 503 + Retry-After.
      const refused = await rawRequest(gw.port, '/api/conversations');
      assert.equal(refused.status, 503, refused.raw);
      assert.equal(refused.headers['retry-after'], '1');
      assert.equal(JSON.parse(refused.body).error.code, 'unavailable');
      const lines = gw.stderr().split('\n').filter((l) => l.includes('connection cap reached (CONFAB_MAX_CONNECTIONS)'));
      assert.equal(lines.length, 1, `one line per cap reached, not per refusal: ${lines.length}`);
      assert.doesNotMatch(gw.stderr(), /Too many open files|EMFILE/i, 'never out of descriptors');
      for (const c of attacker) c.destroy();
      await sleep(500);
      assert.equal((await api(gw.url, token(uid('after')), 'GET', '/api/conversations')).status, 200, 'serves again once they are gone');
    } finally {
      await gw.stop();
    }
  });

  it('caps connections per address with 503 + Retry-After, logs the cap once, and lets others in', async () => {
    const gw = await startGateway({ env: { CONFAB_MAX_CONNECTIONS_PER_ADDRESS: '5', RUST_LOG: 'warn' } });
    try {
      const held = [];
      for (let i = 0; i < 5; i++) {
        const c = raw(gw.port, { localAddress: '127.0.0.3' });
        await c.connected;
        held.push(c);
      }
      for (let i = 0; i < 6; i++) {
        const r = await rawRequest(gw.port, '/api/conversations', { localAddress: '127.0.0.3' });
        assert.equal(r.status, 503, r.raw);
        assert.equal(r.headers['retry-after'], '1');
      }
      const probe = await rawRequest(gw.port, '/healthz', { localAddress: '127.0.0.3' });
      assert.equal(probe.status, 200, 'the capped address can still probe health');
      const other = await api(gw.url, token(uid('other')), 'GET', '/api/conversations');
      assert.equal(other.status, 200, 'another address is not affected');
      const lines = gw.stderr().split('\n').filter((l) => l.includes('per-address connection cap reached'));
      assert.equal(lines.length, 1, `one line for the address: ${lines}`);
      assert.match(lines[0], /127\.0\.0\.3/);
      for (const c of held) c.destroy();
      await sleep(300);
      const again = await rawRequest(gw.port, '/api/conversations', { localAddress: '127.0.0.3' });
      assert.equal(again.status, 401, 'served again (unauthenticated: 401, not 503)');
    } finally {
      await gw.stop();
    }
  });

  it('caps the pod at CONFAB_MAX_CONNECTIONS, counting upgraded WebSockets until they close', async () => {
    const gw = await startGateway({ env: { CONFAB_MAX_CONNECTIONS: '3' } });
    try {
      const open = [];
      for (let i = 0; i < 3; i++) open.push(await ws(gw.url, token(uid('capped'))));
      await assert.rejects(ws(gw.url, token(uid('capped'))), /HTTP 503/);
      const probe = await rawRequest(gw.port, '/healthz');
      assert.equal(probe.status, 200);
      open[0].close();
      await open[0].disconnected;
      await sleep(200);
      const next = await ws(gw.url, token(uid('capped')));
      next.close();
      for (const c of open.slice(1)) c.close();
    } finally {
      await gw.stop();
    }
  });
});

describe('the HTTP API and forwarded addresses', () => {
  let gw;
  before(async () => {
    gw = await startGateway({
      env: {
        CONFAB_API_REQUEST_BURST: '5', CONFAB_API_REQUESTS_PER_SECOND: '1',
        CONFAB_TRUSTED_PROXIES: '127.0.0.1', CONFAB_CONNECT_BURST: '2', CONFAB_CONNECTS_PER_SECOND: '1',
      },
    });
  });
  after(async () => { await gw.stop(); });

  it('answers a flood of API calls from one user with 429 and Retry-After, other users unaffected', async () => {
    const t = token(uid('flood'));
    const results = await Promise.all(Array.from({ length: 20 }, () => api(gw.url, t, 'POST', '/api/conversations', { kind: 'group', title: 'flood', members: [] })));
    const created = results.filter((r) => r.status === 201).length;
    const limited = results.filter((r) => r.status === 429);
    assert.ok(created >= 5 && created <= 6, `the burst passes (${created})`);
    assert.equal(created + limited.length, 20);
    for (const r of limited) {
      assert.equal(r.body.error.code, 'rate_limited');
      assert.ok(Number(r.headers.get('retry-after')) >= 1, 'Retry-After in seconds');
    }
    const other = await api(gw.url, token(uid('calm')), 'GET', '/api/conversations');
    assert.equal(other.status, 200);
    await sleep(1100);
    assert.equal((await api(gw.url, t, 'GET', '/api/conversations')).status, 200, 'the bucket refills');
  });

  it('takes the client address from the rightmost untrusted X-Forwarded-For hop, whatever the client claims', async () => {
    // The per-address connect budget is 2: the third connection of one real address is refused,
    // however the client varies the hops it claims on the left.
    // All at once, so the bucket (1/s) has no time to refill in between.
    const hop = (claim) => ({ 'x-forwarded-for': `${claim}, 198.51.100.77` });
    const settled = await Promise.allSettled(['1.1.1.1', '2.2.2.2', '3.3.3.3'].map((claim) => ws(gw.url, token(uid('xff')), { headers: hop(claim) })));
    const refused = settled.filter((s) => s.status === 'rejected');
    assert.equal(refused.length, 1, `a forged leftmost hop is no new address: ${settled.map((s) => s.reason ?? 'ok')}`);
    assert.equal(refused[0].reason.status, 429);
    // A different real address (what the proxy appended) has its own budget.
    const c = await ws(gw.url, token(uid('xff')), { headers: { 'x-forwarded-for': '1.1.1.1, 198.51.100.78' } });
    for (const s of settled) if (s.status === 'fulfilled') s.value.close();
    c.close();
  });
});

describe('expiry on /department', () => {
  let gw;
  before(async () => { gw = await startGateway({ env: { CONFAB_TOKEN_WARNING_SECONDS: '1' } }); });
  after(async () => { await gw.stop(); });

  it('warns, then disconnects an agent whose token expired, so it receives no more support traffic', async () => {
    const dept = uid('dept');
    const agent = await socketio(gw.url, token(uid('agent'), { roles: ['agent'], departments: [dept], ttlSeconds: 3 }), { namespace: '/department' });
    const visitor = token(uid('visitor'));
    const before = await api(gw.url, visitor, 'POST', '/api/conversations', { kind: 'support', departmentId: dept });
    assert.equal(before.status, 201);
    const seen = await agent.waitFor('conversation_created');
    assert.equal(seen.conversation.id, before.body.conversation.id, 'the inbox works before expiry');
    await agent.waitFor('token_expiring', () => true, 4000);
    const expired = await agent.waitFor('session_expired', () => true, 4000);
    assert.equal(expired.error.code, 'unauthorized');
    assert.equal(await Promise.race([agent.disconnected, sleep(3000).then(() => 'connected')]), 'io server disconnect');
    const after = await api(gw.url, visitor, 'POST', '/api/conversations', { kind: 'support', departmentId: dept });
    assert.equal(after.status, 201);
    const v = await socketio(gw.url, visitor);
    await v.request('send_message', { conversationId: before.body.conversation.id, content: 'after expiry', type: 'text', clientMsgId: randomUUID() });
    await sleep(500);
    assert.equal(agent.of('conversation_created').length, 1, 'nothing created after expiry reached the agent');
    assert.equal(agent.of('new_message').length, 0, 'no message content after expiry');
    v.close();
  });
});

const b64url = (v) => Buffer.from(JSON.stringify(v)).toString('base64url');
const signed = (claims) => {
  const head = `${b64url({ alg: 'HS256', typ: 'JWT' })}.${b64url(claims)}`;
  return `${head}.${createHmac('sha256', SECRET).update(head).digest('base64url')}`;
};

describe('tokens', () => {
  let gw;
  before(async () => { gw = await startGateway({ env: { RUST_LOG: 'trace', CONFAB_WS_AUTH_TIMEOUT_MS: '800' } }); });
  after(async () => { await gw.stop(); });

  it('refuses a token that is not valid yet (nbf an hour ahead) on every transport', async () => {
    const now = Math.floor(Date.now() / 1000);
    const early = signed({ sub: uid('early'), exp: now + 7200, nbf: now + 3600 });
    const r = await api(gw.url, early, 'GET', '/api/conversations');
    assert.equal(r.status, 401);
    assert.match(r.body.error.message, /not valid yet/);
    await assert.rejects(ws(gw.url, early), /close 4001: unauthorized: token not valid yet/);
    await assert.rejects(socketio(gw.url, early), /unauthorized: token not valid yet/);
    const skewed = signed({ sub: uid('skewed'), exp: now + 7200, nbf: now + 5 });
    assert.equal((await api(gw.url, skewed, 'GET', '/api/conversations')).status, 200, 'a few seconds of clock skew pass');
  });

  it('never writes a token or a fragment of one to the log, at trace level, on any path', async () => {
    const tokens = [];
    const mint = (p, o) => { const t = token(uid(p), o); tokens.push(t); return t; };
    // Good tokens everywhere they may travel.
    (await ws(gw.url, mint('q'))).close();
    (await ws(gw.url, mint('h'), { auth: 'header' })).close();
    (await ws(gw.url, mint('f'), { auth: 'frame' })).close();
    const sio = await socketio(gw.url, mint('sio'));
    await sio.request('refresh_token', { token: mint('sio-other') });
    await sio.requestRaw('refresh_token', [mint('sio-string')]);
    sio.close();
    (await socketio(gw.url, mint('poll'), { transports: ['polling'] })).close();
    (await socketio(gw.url, mint('agent', { roles: ['agent'], departments: ['d'] }), { namespace: '/department' })).close();
    await api(gw.url, mint('api'), 'GET', '/api/conversations');
    // Refused ones, and tokens in the wrong place (the case: payload a string).
    await api(gw.url, `${mint('bad')}x`, 'GET', '/api/conversations');
    await assert.rejects(ws(gw.url, `${mint('badws')}x`), /close 4001/);
    await assert.rejects(socketio(gw.url, `${mint('badsio')}x`), /unauthorized/);
    for (const frame of [
      (t) => JSON.stringify({ type: 'auth', payload: t }),
      (t) => JSON.stringify({ type: t }),
      (t) => JSON.stringify({ type: 'auth', payload: { [t]: 1 } }),
      (t) => `{"type":"auth","payload":"${t}`,
      (t) => t,
    ]) {
      const t = mint('misplaced');
      const c = new WebSocket(`${gw.url.replace('http', 'ws')}/ws`);
      await new Promise((r) => c.once('open', r));
      c.send(frame(t));
      const [code] = await new Promise((r) => c.once('close', (...a) => r(a)));
      assert.equal(code, 4001);
    }
    const authed = await ws(gw.url, mint('payload'));
    await authed.request('refresh_token', mint('as-string'));
    await authed.request(mint('as-type'), {});
    authed.close();
    await sleep(500);
    const log = gw.stderr();
    assert.match(log, /DEBUG .*socket\.io connected/, 'debug and trace logging are on');
    assert.match(log, /token refused/, 'the refusals were logged');
    const header = tokens[0].split('.')[0];
    assert.ok(!log.includes(header), 'a token header segment appears in the log');
    for (const t of tokens) {
      const [, claims, signature] = t.split('.');
      for (const part of [claims, signature]) {
        for (const piece of [part, part.slice(0, 24), part.slice(-24)]) {
          assert.ok(!log.includes(piece), `a token fragment appears in the log: ${piece}\n${log.split('\n').filter((l) => l.includes(piece)).slice(0, 3).join('\n')}`);
        }
      }
    }
  });
});

describe('what a stranger can learn', () => {
  let gw;
  before(async () => { gw = await startGateway(); });
  after(async () => { await gw.stop(); });

  it('answers an agent the same 404 for a conversation it may not see as for a missing one', async () => {
    const owner = uid('owner');
    const created = await api(gw.url, token(owner), 'POST', '/api/conversations', { kind: 'group', title: 'private', members: [uid('m')] });
    assert.equal(created.status, 201);
    const agent = token(uid('agent'), { roles: ['agent'], departments: ['billing'] });
    const existing = await api(gw.url, agent, 'POST', `/api/conversations/${created.body.conversation.id}/members`, { userId: 'x' });
    const missing = await api(gw.url, agent, 'POST', `/api/conversations/${randomUUID()}/members`, { userId: 'x' });
    assert.equal(existing.status, 404);
    assert.deepEqual(existing.body, missing.body);
    const s = await socketio(gw.url, agent);
    const joinExisting = await s.request('join_conversation', { conversationId: created.body.conversation.id });
    const joinMissing = await s.request('join_conversation', { conversationId: randomUUID() });
    assert.deepEqual(joinExisting, joinMissing);
    assert.equal(joinExisting.error.code, 'not_found');
    s.close();
  });

  it('tells presence only of users sharing a conversation with the asker; others are unknown', async () => {
    const [alice, bob, mallory] = [uid('alice'), uid('bob'), uid('mallory')];
    assert.equal((await api(gw.url, token(alice), 'POST', '/api/conversations', { kind: 'group', members: [bob] })).status, 201);
    const a = await socketio(gw.url, token(alice));
    const m = await ws(gw.url, token(mallory));
    const b = await socketio(gw.url, token(bob));
    const seenByMallory = await m.request('presence', { userIds: [alice, bob] });
    assert.deepEqual(seenByMallory.statuses[alice], { status: 'unknown', lastSeen: null });
    assert.deepEqual(seenByMallory.statuses[bob], { status: 'unknown', lastSeen: null });
    const seenByBob = await b.request('presence', { userIds: [alice, mallory] });
    assert.equal(seenByBob.statuses[alice].status, 'online');
    assert.equal(seenByBob.statuses[mallory].status, 'unknown');
    a.close(); m.close(); b.close();
  });

  it('stores text that looks like SQL as text: every statement binds its parameters', async () => {
    const alice = uid('alice');
    const evil = "x'); DELETE FROM messages; DROP TABLE conversations; --";
    const c = await api(gw.url, token(alice), 'POST', '/api/conversations', { kind: 'group', title: evil, members: [`${evil}-member`] });
    assert.equal(c.status, 201, JSON.stringify(c.body));
    assert.equal(c.body.conversation.title, evil);
    const s = await socketio(gw.url, token(alice));
    for (const content of [evil, "' OR '1'='1", 'Robert"); DROP TABLE members;--']) {
      const ack = await s.request('send_message', { conversationId: c.body.conversation.id, content, type: 'text', clientMsgId: content });
      assert.equal(ack.message.content, content);
    }
    const page = await api(gw.url, token(alice), 'GET', `/api/conversations/${c.body.conversation.id}/messages`);
    assert.deepEqual(page.body.messages.map((m) => m.content), [evil, "' OR '1'='1", 'Robert"); DROP TABLE members;--']);
    const list = await api(gw.url, token(alice), 'GET', '/api/conversations');
    assert.equal(list.body.conversations.length, 1, 'the tables are all still there');
    s.close();
  });
});
