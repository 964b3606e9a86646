// What is particular to the plain WebSocket transport /ws: handshake, frames, limits,
// compression, heartbeats and slow readers — with the stock npm `ws` client.
import { describe, it, before, after } from 'node:test';
import assert from 'node:assert/strict';
import { randomUUID } from 'node:crypto';
import WebSocket from 'ws';
import { startGateway, token, api, sleep } from './lib/gateway.mjs';
import { ws, socketio } from './lib/clients.mjs';

const uid = (p) => `${p}-${randomUUID().slice(0, 8)}`;
const LIMIT = 65536;

async function room(gw, members) {
  const [owner, ...others] = members;
  const created = await api(gw.url, token(owner), 'POST', '/api/conversations', { kind: 'group', title: 'Room', members: others });
  assert.equal(created.status, 201, JSON.stringify(created.body));
  return created.body.conversation.id;
}

describe('/ws handshake and frames', () => {
  let gw;
  before(async () => {
    gw = await startGateway({ env: { CONFAB_WS_AUTH_TIMEOUT_MS: '800', CONFAB_MAX_FRAME_BYTES: String(LIMIT) } });
  });
  after(async () => { await gw.stop(); });

  it('sends connected {connectionId, serverId} as the very first frame', async () => {
    const c = await ws(gw.url, token(uid('first')));
    assert.equal(c.frames[0].type, 'connected');
    const { connectionId, serverId } = c.frames[0].payload;
    assert.match(serverId, /^node-[0-9a-f]{32}$/);
    assert.ok(connectionId.startsWith(`${serverId}:`), connectionId);
    const other = await ws(gw.url, token(uid('second')));
    assert.equal(other.frames[0].payload.serverId, serverId);
    assert.notEqual(other.frames[0].payload.connectionId, connectionId);
    c.close(); other.close();
  });

  it('takes the token from the Authorization header and from a first auth frame', async () => {
    const who = uid('hdr');
    const viaHeader = await ws(gw.url, token(who), { auth: 'header' });
    const p = await viaHeader.request('presence', { userIds: [who] });
    assert.equal(p.statuses[who].status, 'online');
    const viaFrame = await ws(gw.url, token(uid('frm')), { auth: 'frame' });
    assert.equal(viaFrame.frames[0].type, 'connected');
    assert.ok(Array.isArray((await viaFrame.request('sync', { conversations: [] })).messages));
    viaHeader.close(); viaFrame.close();
  });

  it('closes with 4001 and a reason on a bad, foreign, expired or missing token', async () => {
    await assert.rejects(ws(gw.url, 'garbage'), /^Error: close 4001: unauthorized: /);
    await assert.rejects(ws(gw.url, token('x', { secret: 'another-secret-another-secret-another!' })), /close 4001: .*signature/);
    await assert.rejects(ws(gw.url, token('x', { ttlSeconds: -5 })), /close 4001: .*expired/);
    await assert.rejects(ws(gw.url, 'garbage', { auth: 'header' }), /close 4001: unauthorized/);
    await assert.rejects(ws(gw.url, 'garbage', { auth: 'frame' }), /close 4001: unauthorized/);
  });

  it('waits for the auth frame only until the deadline, and processes nothing before it', async () => {
    const started = Date.now();
    await assert.rejects(ws(gw.url, undefined), /close 4001: unauthorized: missing token/);
    const took = Date.now() - started;
    assert.ok(took >= 700 && took < 3000, `refused after ${took} ms`);
    // A request sent before authenticating is not run: it ends the handshake instead.
    const raw = new WebSocket(gw.url.replace(/^http/, 'ws') + '/ws');
    const got = [];
    raw.on('message', (d) => got.push(d.toString()));
    await new Promise((r) => raw.on('open', r));
    raw.send(JSON.stringify({ type: 'presence', id: 1, payload: { userIds: ['x'] } }));
    const [code, reason] = await new Promise((r) => raw.on('close', (c, why) => r([c, why.toString()])));
    assert.equal(code, 4001);
    assert.match(reason, /first frame must be auth/);
    assert.deepEqual(got, [], 'no answer, no events before a valid token');
  });

  it('refuses a foreign Origin with 403 before the upgrade', async () => {
    await assert.rejects(ws(gw.url, token(uid('o')), { headers: { origin: 'https://evil.example' } }), /HTTP 403/);
    await assert.rejects(ws(gw.url, token(uid('o')), { headers: { origin: 'null' } }), /HTTP 403/);
    const ok = await ws(gw.url, token(uid('o')), { headers: { origin: gw.url } });
    ok.close();
  });

  it('answers an unknown type with an error frame carrying the id, and the connection stays', async () => {
    const c = await ws(gw.url, token(uid('unk')));
    c.sendRaw({ type: 'launch_rockets', id: 'req-7', payload: {} });
    const err = await c.waitFor('error');
    assert.equal(err.code, 'invalid');
    assert.match(err.message, /unknown event "launch_rockets"/);
    assert.equal(c.frames.find((f) => f.type === 'error').id, 'req-7');
    const ok = await c.request('sync', { conversations: [] });
    assert.deepEqual(ok, { messages: [], changes: [], truncated: false, conversations: [] });
    c.close();
  });

  it('answers malformed JSON and bad envelopes with error frames, and the connection stays', async () => {
    const c = await ws(gw.url, token(uid('bad')));
    c.sendRaw('{"type": "sync", "id": 1, "payload": ');
    const err = await c.waitFor('error');
    assert.equal(err.code, 'invalid');
    assert.match(err.message, /malformed frame/);
    assert.equal(c.frames.find((f) => f.type === 'error').id, undefined, 'no id could be read');
    c.sendRaw({ type: 'sync', id: 2, payload: { conversations: [] }, extra: true });
    await c.waitFor('error', (e) => /unknown field `extra`/.test(e.message));
    assert.equal(c.frames.filter((f) => f.type === 'error').at(-1).id, 2, 'the id is kept when it can be read');
    c.sendRaw({ type: 'sync', id: 'x'.repeat(65), payload: { conversations: [] } });
    await c.waitFor('error', (e) => /request id/.test(e.message));
    const ack = await c.request('history', { conversationId: 'nope' });
    assert.equal(ack.error.code, 'invalid');
    assert.deepEqual(await c.request('sync', { conversations: [] }), { messages: [], changes: [], truncated: false, conversations: [] });
    c.close();
  });

  it('closes with 1007 on invalid UTF-8 and with 1003 on a binary frame', async () => {
    const c = await ws(gw.url, token(uid('utf')));
    c.sendRaw(Buffer.from([0x7b, 0x22, 0xff, 0xfe, 0x22, 0x7d]), { binary: false });
    assert.match(await c.disconnected, /^close 1007: /);
    const b = await ws(gw.url, token(uid('bin')));
    b.sendRaw(Buffer.from('{"type":"sync"}'), { binary: true });
    assert.match(await b.disconnected, /^close 1003: binary frames are not part of the protocol/);
  });

  it('takes a message of exactly the limit and refuses limit+1, also split across continuation frames', async () => {
    const pad = (n) => {
      const base = { type: 'sync', id: 1, payload: { conversations: [] }, pad: '' };
      return JSON.stringify({ ...base, pad: 'x'.repeat(n - JSON.stringify(base).length) });
    };
    const exact = pad(LIMIT);
    assert.equal(Buffer.byteLength(exact), LIMIT);
    const c = await ws(gw.url, token(uid('lim')));
    // Exactly the limit, in two fragments: read whole, then refused only for its unknown field.
    c.sendRaw(exact.slice(0, 40000), { fin: false });
    c.sendRaw(exact.slice(40000), { fin: true });
    const err = await c.waitFor('error', (e) => /unknown field `pad`/.test(e.message));
    assert.equal(err.code, 'invalid');
    // One byte more, in fragments each well under the limit: the connection is closed with 1009.
    const over = pad(LIMIT + 1);
    c.sendRaw(over.slice(0, 30000), { fin: false });
    c.sendRaw(over.slice(30000, 60000), { fin: false });
    c.sendRaw(over.slice(60000), { fin: true });
    assert.match(await c.disconnected, /^close 1009: /);
    // And in one frame.
    const d = await ws(gw.url, token(uid('lim1')));
    d.sendRaw(over);
    assert.match(await d.disconnected, /^close 1009: /);
  });

  it('compresses messages over 1 KiB when offered, and applies the limit after inflation', async () => {
    const [a, b] = [uid('za'), uid('zb')];
    const conversationId = await room(gw, [a, b]);
    const alice = await ws(gw.url, token(a), { perMessageDeflate: { threshold: 1024 } });
    const bob = await ws(gw.url, token(b), { perMessageDeflate: { threshold: 1024 } });
    assert.match(alice.upgradeHeaders()['sec-websocket-extensions'] ?? '', /permessage-deflate/);
    assert.match(alice.socket.extensions, /permessage-deflate/);
    for (const c of [alice, bob]) await c.request('join_conversation', { conversationId });
    const content = 'compressible '.repeat(800);
    const sent = await alice.request('send_message', { conversationId, content, type: 'text', clientMsgId: randomUUID() });
    assert.equal(sent.message.content, content);
    const got = await bob.waitFor('new_message', (m) => m.id === sent.message.id);
    assert.equal(got.content, content);
    // A deflate bomb: ~200 KB of text compresses to a few hundred bytes on the wire.
    const bomb = JSON.stringify({ type: 'sync', id: 9, payload: { conversations: [] }, pad: 'a'.repeat(200000) });
    alice.sendRaw(bomb);
    assert.match(await alice.disconnected, /^close 1009: /);
    bob.close();
  });

  it('does not negotiate compression with a client that does not offer it', async () => {
    const c = await ws(gw.url, token(uid('plain')));
    assert.equal(c.upgradeHeaders()['sec-websocket-extensions'], undefined);
    assert.equal(c.socket.extensions, '');
    c.close();
  });
});

describe('/ws mixed room with Socket.IO', () => {
  let gw;
  before(async () => { gw = await startGateway(); });
  after(async () => { await gw.stop(); });

  it('lets a Socket.IO user and a /ws user chat with each other with the same payloads', async () => {
    const [a, b] = [uid('sio'), uid('plain')];
    const conversationId = await room(gw, [a, b]);
    const alice = await socketio(gw.url, token(a, { name: 'Alice' }));
    const bob = await ws(gw.url, token(b, { name: 'Bob' }));
    for (const c of [alice, bob]) {
      const joined = await c.request('join_conversation', { conversationId });
      assert.equal(joined.conversation.id, conversationId);
    }
    const fromAlice = await alice.request('send_message', { conversationId, content: 'hi from socket.io', type: 'text', clientMsgId: randomUUID() });
    assert.deepEqual(await bob.waitFor('new_message', (m) => m.id === fromAlice.message.id), fromAlice.message);
    const fromBob = await bob.request('send_message', { conversationId, content: 'hi from /ws', type: 'text', clientMsgId: randomUUID() });
    assert.equal(fromBob.message.seq, fromAlice.message.seq + 1);
    assert.equal(fromBob.message.senderName, 'Bob');
    assert.deepEqual(await alice.waitFor('new_message', (m) => m.id === fromBob.message.id), fromBob.message);
    const delivered = await bob.waitFor('message_delivered', (d) => d.messageId === fromBob.message.id);
    assert.equal(delivered.clientMsgId, fromBob.message.clientMsgId);
    await bob.request('typing_start', { conversationId });
    const typing = await alice.waitFor('user_typing', (t) => t.userId === b);
    assert.deepEqual(typing, { conversationId, userId: b, userName: 'Bob' });
    await alice.request('mark_read', { conversationId, seq: fromBob.message.seq });
    assert.deepEqual(await bob.waitFor('message_read', (r) => r.userId === a), { conversationId, userId: a, seq: fromBob.message.seq });
    alice.close(); bob.close();
  });
});

describe('/ws heartbeats and slow readers', () => {
  let gw;
  before(async () => {
    gw = await startGateway({
      env: {
        CONFAB_PING_INTERVAL_MS: '300',
        CONFAB_PING_TIMEOUT_MS: '400',
        CONFAB_SEND_QUEUE: '16',
        CONFAB_WS_SEND_DEADLINE_MS: '1000',
        CONFAB_MESSAGES_PER_SECOND: '1000',
        CONFAB_MESSAGE_BURST: '1000',
      },
    });
  });
  after(async () => { await gw.stop(); });

  it('pings on the interval, keeps a client that answers, and answers client pings', async () => {
    const c = await ws(gw.url, token(uid('hb')));
    let pings = 0;
    c.socket.on('ping', () => { pings += 1; });
    const pong = new Promise((r) => c.socket.once('pong', (data) => r(data.toString())));
    c.socket.ping('are you there');
    assert.equal(await pong, 'are you there');
    await sleep(1500);
    assert.ok(pings >= 3, `${pings} pings in 1.5 s at a 300 ms interval`);
    assert.equal(c.socket.readyState, WebSocket.OPEN);
    assert.deepEqual(await c.request('sync', { conversations: [] }), { messages: [], changes: [], truncated: false, conversations: [] });
    c.close();
  });

  it('closes a client that does not answer pings within the timeout', async () => {
    const started = Date.now();
    const c = await ws(gw.url, token(uid('mute')), { autoPong: false });
    const reason = await Promise.race([c.disconnected, sleep(4000).then(() => 'still connected')]);
    assert.equal(reason, 'close 1008: no pong within 400 ms');
    const took = Date.now() - started;
    assert.ok(took >= 600 && took < 2500, `closed after ${took} ms`);
  });

  it('disconnects a client that never reads once its writes stall past the deadline', async () => {
    const [a, lazyId] = [uid('writer'), uid('lazy')];
    const conversationId = await room(gw, [a, lazyId]);
    const alice = await ws(gw.url, token(a));
    const lazy = await ws(gw.url, token(lazyId));
    for (const c of [alice, lazy]) await c.request('join_conversation', { conversationId });
    const content = 'z'.repeat(15000);
    for (let i = 0; i < 100; i++) {
      await alice.request('send_message', { conversationId, content, type: 'text', clientMsgId: randomUUID() });
    }
    // From here on the lazy client reads nothing, while asking for ~1.5 MB per request.
    lazy.socket._socket.pause();
    for (let i = 0; i < 16; i++) lazy.sendRaw({ type: 'history', id: 1000 + i, payload: { conversationId, limit: 100 } });
    const off = await alice.waitFor('user_offline', (u) => u.userId === lazyId, 10000);
    assert.equal(off.userId, lazyId);
    const p = await alice.request('presence', { userIds: [lazyId] });
    assert.equal(p.statuses[lazyId].status, 'offline');
    alice.close();
    lazy.socket.terminate();
  });
});

describe('/ws logs', () => {
  let gw;
  before(async () => { gw = await startGateway({ env: { RUST_LOG: 'debug' } }); });
  after(async () => { await gw.stop(); });

  it('never writes a token to the log, from the URL, the header or a refused handshake', async () => {
    const good = token(uid('logged'));
    const viaUrl = await ws(gw.url, good);
    const viaHeader = await ws(gw.url, good, { auth: 'header' });
    const bad = `${token(uid('x'))}tampered`;
    await assert.rejects(ws(gw.url, bad), /close 4001/);
    viaUrl.close(); viaHeader.close();
    await sleep(300);
    const log = gw.stderr();
    assert.match(log, /audit: connection opened action="connect" transport="ws"/, 'debug logging is on and covers /ws');
    assert.match(log, /audit: token refused action="auth_failure" transport="ws" reason="malformed"/);
    for (const t of [good, bad]) {
      assert.ok(!log.includes(t.split('.')[2]), 'a token signature appears in the log');
    }
  });
});

describe('/ws connect budget', () => {
  let gw;
  before(async () => { gw = await startGateway({ env: { CONFAB_CONNECT_BURST: '3', CONFAB_CONNECTS_PER_SECOND: '1' } }); });
  after(async () => { await gw.stop(); });

  it('refuses upgrades past the per-address connect budget with 429 before any frame', async () => {
    const open = [];
    for (let i = 0; i < 3; i++) open.push(await ws(gw.url, token(uid('burst'))));
    const refused = await ws(gw.url, token(uid('burst'))).catch((e) => e);
    assert.equal(refused.status, 429, String(refused));
    for (const c of open) c.close();
  });
});
