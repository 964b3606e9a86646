// The gateway as a process: restarts keep history, origin checks, rate limits, long-polling,
// the /department namespace and the HTTP API's errors.
import { describe, it, before, after } from 'node:test';
import assert from 'node:assert/strict';
import { randomUUID } from 'node:crypto';
import { startGateway, token, api, sleep } from './lib/gateway.mjs';
import { socketio } from './lib/clients.mjs';
import WebSocket from 'ws';

const uid = (p) => `${p}-${randomUUID().slice(0, 8)}`;

describe('a restarted gateway', () => {
  it('still has the history, and a client that reconnects recovers with sync', async () => {
    const gw = await startGateway();
    const [a, b] = [uid('alice'), uid('bob')];
    const [ta, tb] = [token(a), token(b)];
    const c = await api(gw.url, ta, 'POST', '/api/conversations', { kind: 'direct', members: [b] });
    assert.equal(c.status, 201);
    const id = c.body.conversation.id;
    const alice = await socketio(gw.url, ta);
    await alice.request('join_conversation', { conversationId: id });
    const before = [];
    for (let i = 0; i < 3; i++) {
      before.push((await alice.request('send_message', { conversationId: id, content: `before ${i}`, type: 'text', clientMsgId: randomUUID() })).message);
    }
    const exit = await gw.stop('SIGTERM');
    assert.equal(exit.code, 0, `clean exit on SIGTERM: ${JSON.stringify(exit)}\n${gw.stderr()}`);
    assert.notEqual(await alice.disconnected, undefined);

    const again = await startGateway({ dataDir: gw.dataDir, port: gw.port });
    try {
      const page = await api(again.url, tb, 'GET', `/api/conversations/${id}/messages`);
      assert.equal(page.status, 200);
      assert.deepEqual(page.body.messages, before);
      const bob = await socketio(again.url, tb);
      const synced = await bob.request('sync', { conversations: [{ conversationId: id, afterSeq: 1 }] });
      assert.deepEqual(synced.messages.map((m) => m.content), ['before 1', 'before 2']);
      const next = await bob.request('send_message', { conversationId: id, content: 'after', type: 'text', clientMsgId: randomUUID() });
      assert.equal(next.message.seq, 4, 'seq continues after the restart');
      bob.close();
    } finally {
      await again.stop();
    }
  });
});

describe('a gateway with tight limits', () => {
  let gw;
  before(async () => {
    gw = await startGateway({
      env: {
        CONFAB_MESSAGES_PER_SECOND: '1',
        CONFAB_MESSAGE_BURST: '3',
        CONFAB_ALLOWED_ORIGINS: 'https://chat.example.com',
      },
    });
  });
  after(async () => { await gw.stop(); });

  it('refuses realtime requests from origins not on the allow-list, exactly', async () => {
    const poll = (origin) => api(gw.url, undefined, 'GET', '/socket.io/?EIO=4&transport=polling', undefined, origin ? { origin } : {});
    assert.equal((await poll('https://chat.example.com')).status, 200);
    assert.equal((await poll(undefined)).status, 200, 'non-browser clients send no Origin');
    for (const evil of ['https://evil.example', 'null', 'https://chat.example.com.evil.io', 'http://chat.example.com', 'https://chat.example.com:444']) {
      const r = await poll(evil);
      assert.equal(r.status, 403, evil);
      assert.equal(r.body.error.code, 'forbidden');
    }
    await assert.rejects(
      socketio(gw.url, token(uid('x')), { headers: { origin: 'https://evil.example' } }),
      /websocket error|xhr poll error|403/i,
    );
    const ok = await socketio(gw.url, token(uid('x')), { headers: { origin: 'https://chat.example.com' } });
    ok.close();
  });

  it('answers a burst over the user limit with rate_limited and rate_limit_exceeded', async () => {
    const a = uid('chatty');
    const ta = token(a);
    const c = await api(gw.url, ta, 'POST', '/api/conversations', { kind: 'open', title: 'lobby' });
    const id = c.body.conversation.id;
    const client = await socketio(gw.url, ta);
    const acks = [];
    for (let i = 0; i < 5; i++) {
      acks.push(await client.request('send_message', { conversationId: id, content: `m${i}`, type: 'text', clientMsgId: randomUUID() }));
    }
    assert.equal(acks.filter((x) => x.message).length, 3);
    const refused = acks.filter((x) => x.error);
    assert.equal(refused.length, 2);
    assert.equal(refused[0].error.code, 'rate_limited');
    const notice = await client.waitFor('rate_limit_exceeded');
    assert.ok(notice.retryAfterMs > 0 && notice.retryAfterMs <= 1000, JSON.stringify(notice));
    const errors = client.of('message_error');
    assert.equal(errors.length, 2);
    assert.equal(errors[0].code, 'rate_limited');
    const page = await api(gw.url, ta, 'GET', `/api/conversations/${id}/messages`);
    assert.equal(page.body.messages.length, 3, 'refused messages are not stored');
    client.close();
  });
});

describe('a gateway on defaults', () => {
  let gw;
  before(async () => { gw = await startGateway(); });
  after(async () => { await gw.stop(); });

  it('works over HTTP long-polling as well as WebSocket', async () => {
    const [a, b] = [uid('poller'), uid('ws')];
    const c = await api(gw.url, token(a), 'POST', '/api/conversations', { kind: 'group', members: [b] });
    const id = c.body.conversation.id;
    const poller = await socketio(gw.url, token(a), { transports: ['polling'] });
    const ws = await socketio(gw.url, token(b));
    await poller.request('join_conversation', { conversationId: id });
    await ws.request('join_conversation', { conversationId: id });
    await ws.request('send_message', { conversationId: id, content: 'to the poller', type: 'text', clientMsgId: randomUUID() });
    const got = await poller.waitFor('new_message');
    assert.equal(got.content, 'to the poller');
    assert.equal(poller.socket.io.engine.transport.name, 'polling');
    poller.close(); ws.close();
  });

  it('feeds agents on /department with new support conversations and their messages, and refuses others', async () => {
    const agentId = uid('agent');
    const agent = await socketio(gw.url, token(agentId, { roles: ['agent'], departments: ['billing'] }), { namespace: '/department' });
    await assert.rejects(socketio(gw.url, token(uid('visitor')), { namespace: '/department' }), /agents/);
    const visitor = uid('visitor');
    const tv = token(visitor);
    const c = await api(gw.url, tv, 'POST', '/api/conversations', { kind: 'support', departmentId: 'billing' });
    assert.equal(c.status, 201);
    const id = c.body.conversation.id;
    const created = await agent.waitFor('conversation_created');
    assert.equal(created.conversation.id, id);
    const v = await socketio(gw.url, tv);
    await v.request('send_message', { conversationId: id, content: 'help with my invoice', type: 'text', clientMsgId: randomUUID() });
    const msg = await agent.waitFor('new_message');
    assert.equal(msg.content, 'help with my invoice');
    const main = await socketio(gw.url, token(agentId, { roles: ['agent'], departments: ['billing'] }));
    const joined = await main.request('join_conversation', { conversationId: id, members: true });
    assert.ok(joined.members.some((m) => m.userId === agentId && m.role === 'agent'));
    agent.close(); v.close(); main.close();
  });

  it('refuses a Socket.IO packet over the frame limit even when split across continuation frames', async () => {
    const t = token(uid('fragmenter'));
    const raw = new WebSocket(`${gw.url.replace('http', 'ws')}/socket.io/?EIO=4&transport=websocket`);
    const frames = [];
    raw.on('message', (d) => frames.push(d.toString()));
    await new Promise((resolve, reject) => { raw.once('open', resolve); raw.once('error', reject); });
    raw.send(`40${JSON.stringify({ token: t })}`);
    const deadline = Date.now() + 5000;
    while (!frames.some((f) => f.startsWith('40{')) && Date.now() < deadline) await sleep(20);
    assert.ok(frames.some((f) => f.startsWith('40{"sid"')), `connected: ${frames}`);
    const closed = new Promise((resolve) => raw.once('close', (code) => resolve(code)));
    // Under the limit in three fragments: processed and answered (an invalid payload, with its ack id).
    const small = 'y'.repeat(20 * 1024);
    raw.send(`421["history",{"pad":"${small}`, { fin: false });
    raw.send(small, { fin: false });
    raw.send(`${small}"}]`, { fin: true });
    while (!frames.some((f) => f.startsWith('431')) && Date.now() < deadline + 5000) await sleep(20);
    const answer = frames.find((f) => f.startsWith('431'));
    assert.ok(answer, `the fragmented message under the limit is answered: ${frames.map((f) => f.slice(0, 40))}`);
    assert.equal(JSON.parse(answer.slice(3))[0].error.code, 'invalid');
    // Over the limit in three fragments of 30 KiB: every frame is under 64 KiB, the message is not.
    const chunk = 'x'.repeat(30 * 1024);
    raw.send(`422["history",{"pad":"${chunk}`, { fin: false });
    raw.send(chunk, { fin: false });
    raw.send(`${chunk}"}]`, { fin: true });
    const code = await Promise.race([closed, sleep(5000).then(() => 'open')]);
    assert.notEqual(code, 'open', 'the connection is closed');
    assert.ok(code === 1009 || code === 1005 || code === 1006, `closed (too big / dropped): ${code}`);
    assert.ok(!frames.some((f) => f.startsWith('432')), 'the oversize message was never processed');
  });

  it('answers HTTP API errors with the right status and a stable code', async () => {
    const t = token(uid('api'));
    const cases = [
      [await api(gw.url, undefined, 'GET', '/api/conversations'), 401, 'unauthorized'],
      [await api(gw.url, 'garbage', 'GET', '/api/conversations'), 401, 'unauthorized'],
      [await api(gw.url, t, 'POST', '/api/conversations', { kind: 'castle' }), 422, 'invalid'],
      [await api(gw.url, t, 'POST', '/api/conversations', '{"kind":'), 422, 'invalid'],
      [await api(gw.url, t, 'POST', '/api/conversations', { kind: 'direct', members: [] }), 422, 'invalid'],
      [await api(gw.url, t, 'POST', '/api/conversations', { kind: 'group', members: [], extra: 1 }), 422, 'invalid'],
      [await api(gw.url, t, 'GET', `/api/conversations/${randomUUID()}/messages`), 403, 'forbidden'],
      [await api(gw.url, t, 'GET', '/api/conversations/not-a-uuid/messages'), 422, 'invalid'],
      [await api(gw.url, t, 'POST', `/api/conversations/${randomUUID()}/members`, { userId: 'x' }), 404, 'not_found'],
      [await api(gw.url, t, 'POST', '/api/conversations', JSON.stringify({ kind: 'group', title: 'x'.repeat(70 * 1024) })), 413, 'too_large'],
      [await api(gw.url, t, 'GET', '/api/nothing-here'), 404, 'not_found'],
    ];
    for (const [res, status, code] of cases) {
      assert.equal(res.status, status, JSON.stringify(res.body));
      assert.equal(res.body.error.code, code);
      assert.ok(res.body.error.message.length > 0);
    }
    const list = await api(gw.url, t, 'GET', '/api/conversations');
    assert.deepEqual(list.body, { conversations: [] });
  });

  it('serves liveness, readiness and a generated OpenAPI document', async () => {
    assert.equal((await api(gw.url, undefined, 'GET', '/healthz')).status, 200);
    assert.equal((await api(gw.url, undefined, 'GET', '/readyz')).status, 200);
    const doc = await api(gw.url, undefined, 'GET', '/openapi.json');
    assert.equal(doc.status, 200);
    assert.match(doc.body.openapi, /^3\./);
    for (const path of ['/api/conversations', '/api/conversations/{id}/members', '/api/conversations/{id}/members/{userId}', '/api/conversations/{id}/messages']) {
      assert.ok(doc.body.paths[path], `OpenAPI documents ${path}`);
    }
    assert.ok(doc.body.components.schemas.Message.properties.seq);
  });
});
