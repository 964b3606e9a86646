// Confab's own Engine.IO v4 / Socket.IO v5: the stock client in every transport mode, sids,
// compression, slow consumers, and conformance mode (the cases of the upstream protocol suites).
import { describe, it, before, after } from 'node:test';
import assert from 'node:assert/strict';
import { randomUUID } from 'node:crypto';
import { spawn } from 'node:child_process';
import WebSocket from 'ws';
import { startGateway, gatewayBin, token, api, sleep } from './lib/gateway.mjs';
import { socketio } from './lib/clients.mjs';

const uid = (p) => `${p}-${randomUUID().slice(0, 8)}`;
const ENGINE = { CONFAB_SOCKETIO_ENGINE: 'confab' };

function waitFor(socket, event) {
  return new Promise((resolve) => socket.once(event, (...args) => resolve(args)));
}

/** A raw Engine.IO WebSocket: every text frame kept, in order. */
async function rawSocket(url, options = {}) {
  const socket = new WebSocket(url, options);
  const texts = [];
  socket.on('message', (d, binary) => { if (!binary) texts.push(d.toString()); });
  const closed = new Promise((resolve) => socket.once('close', (code) => resolve(code)));
  await new Promise((resolve, reject) => { socket.once('open', resolve); socket.once('error', reject); });
  const next = async (pred, ms = 5000) => {
    const until = Date.now() + ms;
    while (Date.now() < until) {
      const i = texts.findIndex(pred);
      if (i >= 0) return texts.splice(i, 1)[0];
      await sleep(10);
    }
    throw new Error(`no matching frame within ${ms} ms; got ${texts.map((t) => t.slice(0, 60))}`);
  };
  return { socket, texts, closed, next };
}

describe('Socket.IO on Confab\'s Engine.IO', () => {
  let gw;
  before(async () => {
    gw = await startGateway({
      env: {
        ...ENGINE,
        CONFAB_PING_INTERVAL_MS: '500',
        CONFAB_PING_TIMEOUT_MS: '1000',
        CONFAB_SEND_QUEUE: '16',
        CONFAB_WS_SEND_DEADLINE_MS: '1000',
        CONFAB_MESSAGES_PER_SECOND: '1000',
        CONFAB_MESSAGE_BURST: '1000',
      },
    });
  });
  after(async () => { await gw.stop(); });

  for (const [mode, transports] of [['polling', ['polling']], ['websocket', ['websocket']], ['default (upgrade)', ['polling', 'websocket']]]) {
    it(`runs the chat flow with the stock client over ${mode}`, async () => {
      const [a, b] = [uid('alice'), uid('bob')];
      const created = await api(gw.url, token(a, { name: 'Alice' }), 'POST', '/api/conversations', { kind: 'group', title: 'T', members: [b] });
      const conversationId = created.body.conversation.id;
      let alice = await socketio(gw.url, token(a, { name: 'Alice' }), { transports });
      const bob = await socketio(gw.url, token(b, { name: 'Bob' }));
      if (transports.length === 2) {
        const engine = alice.socket.io.engine;
        if (engine.transport.name !== 'websocket') await waitFor(engine, 'upgrade');
        assert.equal(engine.transport.name, 'websocket', 'upgraded');
      } else {
        assert.equal(alice.socket.io.engine.transport.name, transports[0]);
      }
      for (const c of [alice, bob]) assert.equal((await c.request('join_conversation', { conversationId })).conversation.id, conversationId);
      const clientMsgId = randomUUID();
      const ack = await alice.request('send_message', { conversationId, content: `over ${mode}`, type: 'text', clientMsgId });
      assert.equal(ack.message.content, `over ${mode}`);
      assert.deepEqual(await bob.waitFor('new_message', (m) => m.clientMsgId === clientMsgId), ack.message);
      assert.equal((await alice.waitFor('message_delivered', (d) => d.clientMsgId === clientMsgId)).messageId, ack.message.id);
      assert.deepEqual(await alice.request('typing_start', { conversationId }), {});
      assert.equal((await bob.waitFor('user_typing', (t) => t.userId === a)).userName, 'Alice');
      // Reconnect: what was sent meanwhile comes back through sync.
      alice.close();
      const missed = await bob.request('send_message', { conversationId, content: 'while away', type: 'text', clientMsgId: randomUUID() });
      alice = await socketio(gw.url, token(a, { name: 'Alice' }), { transports });
      const synced = await alice.request('sync', { conversations: [{ conversationId, afterSeq: ack.message.seq }] });
      assert.deepEqual(synced.messages.map((m) => m.id), [missed.message.id]);
      alice.close(); bob.close();
    });
  }

  it('answers an unknown sid with Engine.IO error 1 and refuses a closed session\'s sid', async () => {
    const unknown = await fetch(`${gw.url}/socket.io/?EIO=4&transport=polling&sid=nope`);
    assert.equal(unknown.status, 400);
    assert.deepEqual(await unknown.json(), { code: 1, message: 'Session ID unknown' });
    const open = await (await fetch(`${gw.url}/socket.io/?EIO=4&transport=polling`)).text();
    const { sid, upgrades, pingInterval, pingTimeout, maxPayload } = JSON.parse(open.slice(1));
    assert.deepEqual({ upgrades, pingInterval, pingTimeout, maxPayload }, { upgrades: ['websocket'], pingInterval: 500, pingTimeout: 1000, maxPayload: 65536 });
    const closed = await fetch(`${gw.url}/socket.io/?EIO=4&transport=polling&sid=${sid}`, { method: 'POST', body: '1' });
    assert.equal(await closed.text(), 'ok');
    const reused = await fetch(`${gw.url}/socket.io/?EIO=4&transport=polling&sid=${sid}`);
    assert.equal(reused.status, 400);
    assert.equal((await reused.json()).code, 1);
    const badEio = await fetch(`${gw.url}/socket.io/?EIO=3&transport=polling`);
    assert.deepEqual([badEio.status, (await badEio.json()).code], [400, 5]);
    const badTransport = await fetch(`${gw.url}/socket.io/?EIO=4&transport=carrier-pigeon`);
    assert.deepEqual([badTransport.status, (await badTransport.json()).code], [400, 0]);
  });

  it('closes a second WebSocket for a session that already upgraded', async () => {
    const open = await (await fetch(`${gw.url}/socket.io/?EIO=4&transport=polling`)).text();
    const { sid } = JSON.parse(open.slice(1));
    const url = `${gw.url.replace('http', 'ws')}/socket.io/?EIO=4&transport=websocket&sid=${sid}`;
    const first = await rawSocket(url);
    first.socket.send('2probe');
    assert.equal(await first.next((t) => t === '3probe'), '3probe');
    first.socket.send('5');
    await sleep(100);
    const second = await rawSocket(url);
    assert.equal(await second.closed, 1008);
    first.socket.send(`40${JSON.stringify({ token: token(uid('up')) })}`);
    assert.match(await first.next((t) => t.startsWith('40')), /^40\{"sid":"/);
    first.socket.close();
  });

  it('compresses frames when the client offers deflate and refuses a deflate bomb after inflation', async () => {
    const c = await rawSocket(`${gw.url.replace('http', 'ws')}/socket.io/?EIO=4&transport=websocket`, { perMessageDeflate: { threshold: 0 } });
    assert.match(c.socket.extensions, /permessage-deflate/);
    c.socket.send(`40${JSON.stringify({ token: token(uid('zip')) })}`);
    await c.next((t) => t.startsWith('40{'));
    c.socket.send(`421${JSON.stringify(['sync', { conversations: [] }])}`);
    assert.deepEqual(JSON.parse((await c.next((t) => t.startsWith('431'))).slice(3)), [{ messages: [], changes: [], truncated: false, conversations: [] }]);
    // ~200 KB of text that deflates to a few hundred bytes: refused once inflated past 64 KiB.
    c.socket.send(`422${JSON.stringify(['sync', { pad: 'a'.repeat(200000) }])}`);
    assert.equal(await c.closed, 1009);
    assert.ok(!c.texts.some((t) => t.startsWith('432')), 'the bomb was never processed');
  });

  it('closes a Socket.IO client that never reads, on WebSocket and on polling', async () => {
    const [a, lazyWs, lazyPoll] = [uid('writer'), uid('lazyws'), uid('lazypoll')];
    const created = await api(gw.url, token(a), 'POST', '/api/conversations', { kind: 'group', title: 'R', members: [lazyWs, lazyPoll] });
    const conversationId = created.body.conversation.id;
    const alice = await socketio(gw.url, token(a));
    await alice.request('join_conversation', { conversationId });
    // WebSocket: the client's socket stops reading.
    const w = await socketio(gw.url, token(lazyWs));
    await w.request('join_conversation', { conversationId });
    w.socket.io.engine.transport.ws._socket.pause();
    // Polling: a client that connected and then never polls again.
    const open = await (await fetch(`${gw.url}/socket.io/?EIO=4&transport=polling`)).text();
    const { sid } = JSON.parse(open.slice(1));
    const post = (body) => fetch(`${gw.url}/socket.io/?EIO=4&transport=polling&sid=${sid}`, { method: 'POST', body });
    await post(`40${JSON.stringify({ token: token(lazyPoll) })}`);
    assert.match(await (await fetch(`${gw.url}/socket.io/?EIO=4&transport=polling&sid=${sid}`)).text(), /^40\{"sid"/);
    await post(`421${JSON.stringify(['join_conversation', { conversationId }])}`);
    const content = 'z'.repeat(15000);
    for (let i = 0; i < 40; i++) {
      await alice.request('send_message', { conversationId, content, type: 'text', clientMsgId: randomUUID() });
    }
    for (const lazy of [lazyWs, lazyPoll]) {
      const off = await alice.waitFor('user_offline', (u) => u.userId === lazy, 10000);
      assert.equal(off.userId, lazy);
    }
    const after = await fetch(`${gw.url}/socket.io/?EIO=4&transport=polling&sid=${sid}`);
    assert.equal(after.status, 400, 'the polling session is gone');
    alice.close();
    w.close();
  });
});

describe('conformance mode', () => {
  let proc;
  let base;
  before(async () => {
    const port = 20000 + Math.floor(Math.random() * 20000);
    proc = spawn(gatewayBin(), ['conformance', '--listen', `127.0.0.1:${port}`], { stdio: ['ignore', 'pipe', 'pipe'] });
    await new Promise((resolve, reject) => {
      proc.stdout.on('data', (d) => { if (String(d).includes('listening')) resolve(); });
      proc.once('exit', (code) => reject(new Error(`conformance mode exited with ${code}`)));
    });
    base = `http://127.0.0.1:${port}`;
  });
  after(() => { proc.kill(); });

  const poll = (path, sid, init) => fetch(`${base}${path}?EIO=4&transport=polling${sid ? `&sid=${sid}` : ''}`, init);
  const session = async (path) => JSON.parse((await (await poll(path)).text()).slice(1)).sid;

  it('opens Engine.IO sessions with the suites\' settings and refuses bad handshakes', async () => {
    const open = JSON.parse((await (await poll('/engine.io/')).text()).slice(1));
    assert.deepEqual(Object.keys(open).sort(), ['maxPayload', 'pingInterval', 'pingTimeout', 'sid', 'upgrades']);
    assert.deepEqual([open.pingInterval, open.pingTimeout, open.maxPayload], [300, 200, 1000000]);
    for (const q of ['transport=polling', 'EIO=abc&transport=polling', 'EIO=4', 'EIO=4&transport=abc']) {
      assert.equal((await fetch(`${base}/engine.io/?${q}`)).status, 400, q);
    }
    assert.equal((await poll('/engine.io/', undefined, { method: 'POST' })).status, 400);
    assert.equal((await poll('/engine.io/', undefined, { method: 'PUT' })).status, 400);
  });

  it('echoes text and base64 binary packets over polling, and closes on a bad packet or a duplicate poll', async () => {
    const sid = await session('/engine.io/');
    assert.equal(await (await poll('/engine.io/', sid, { method: 'POST', body: '4hello\x1ebAQIDBA==' })).text(), 'ok');
    assert.equal(await (await poll('/engine.io/', sid)).text(), '4hello\x1ebAQIDBA==');
    const bad = await session('/engine.io/');
    assert.equal((await poll('/engine.io/', bad, { method: 'POST', body: 'abc' })).status, 400);
    assert.equal((await poll('/engine.io/', bad)).status, 400);
    const dup = await session('/engine.io/');
    const [first, second] = await Promise.all([poll('/engine.io/', dup), sleep(5).then(() => poll('/engine.io/', dup))]);
    assert.equal(first.status, 200);
    assert.equal(await first.text(), '1');
    assert.equal(second.status, 400);
  });

  it('closes a polling session whose client misses the pong', async () => {
    const sid = await session('/engine.io/');
    await sleep(600);
    assert.equal((await poll('/engine.io/', sid)).status, 400);
  });

  it('upgrades from polling to WebSocket with the probe and a noop for the pending poll', async () => {
    const sid = await session('/engine.io/');
    const ws = await rawSocket(`${base.replace('http', 'ws')}/engine.io/?EIO=4&transport=websocket&sid=${sid}`);
    ws.socket.send('2probe');
    assert.equal(await ws.next((t) => t === '3probe'), '3probe');
    assert.equal(await (await poll('/engine.io/', sid)).text(), '6');
    ws.socket.send('5');
    ws.socket.send('4hello');
    assert.equal(await ws.next((t) => t.startsWith('4')), '4hello');
    ws.socket.close();
  });

  it('runs the Socket.IO suite\'s handlers: auth back, unknown namespaces refused, events, acks and binary attachments', async () => {
    const c = await rawSocket(`${base.replace('http', 'ws')}/socket.io/?EIO=4&transport=websocket`);
    const binaries = [];
    c.socket.on('message', (d, binary) => { if (binary) binaries.push([...d]); });
    await c.next((t) => t.startsWith('0'));
    c.socket.send('40{"token":"123"}');
    assert.match(await c.next((t) => t.startsWith('40')), /^40\{"sid":"[^"]+"\}$/);
    assert.equal(await c.next((t) => t.startsWith('42')), '42["auth",{"token":"123"}]');
    c.socket.send('40/random');
    assert.equal(await c.next((t) => t.startsWith('44')), '44/random,{"message":"Invalid namespace"}');
    c.socket.send('42456["message-with-ack",1,"2",{"3":[false]}]');
    assert.equal(await c.next((t) => t.startsWith('43')), '43456[1,"2",{"3":[false]}]');
    c.socket.send('452-789["message-with-ack",{"_placeholder":true,"num":0},{"_placeholder":true,"num":1}]');
    c.socket.send(Uint8Array.from([1, 2, 3]));
    c.socket.send(Uint8Array.from([4, 5, 6]));
    assert.equal(await c.next((t) => t.startsWith('46')), '462-789[{"_placeholder":true,"num":0},{"_placeholder":true,"num":1}]');
    while (binaries.length < 2) await sleep(10);
    assert.deepEqual(binaries, [[1, 2, 3], [4, 5, 6]]);
    c.socket.send('42{}');
    await c.closed;
  });
});
