// Messages that live, with the stock clients across three gateways: edits, deletions, reactions,
// replies and mentions reach every online device once, in the log's seq order; a device that was
// offline converges through resume or sync to exactly what history returns; a deleted body is
// gone from every API and from the SQLite file; delivery receipts reach the sender once per
// recipient, across a drain.
import { describe, it, before, after } from 'node:test';
import assert from 'node:assert/strict';
import { randomUUID } from 'node:crypto';
import { readdirSync, readFileSync, statSync } from 'node:fs';
import { join } from 'node:path';
import { token, api, sleep, startGateway } from './lib/gateway.mjs';
import { socketio, ws } from './lib/clients.mjs';
import { createFleetBackends, startFleetGateway } from './lib/cluster.mjs';
import { LOG_EVENTS, View } from './lib/log-view.mjs';

const uid = (p) => `${p}-${randomUUID().slice(0, 8)}`;

async function until(what, check, timeoutMs = 8000) {
  const started = Date.now();
  for (;;) {
    const v = await check();
    if (v) return v;
    if (Date.now() - started > timeoutMs) throw new Error(`timed out waiting for ${what}`);
    await sleep(50);
  }
}

/** What history returns, in the shape of a View. */
async function historyState(client, conversationId, me) {
  const page = await client.request('history', { conversationId, limit: 100 });
  assert.ok(page.messages, JSON.stringify(page));
  const view = new View(me);
  for (const m of page.messages) view.apply('new_message', m);
  return view.state();
}

/** Records a client's log events of one conversation into a View, and their seqs. */
function follow(client, conversationId, me) {
  const view = new View(me);
  const seqs = [];
  const on = (name, p) => {
    if (!LOG_EVENTS.includes(name) || p.conversationId !== conversationId) return;
    seqs.push(p.seq);
    view.apply(name, p);
  };
  for (const e of client.events.events) on(e.name, e.payload);
  client.events.onEvent = on;
  return { view, seqs };
}

describe('message lifecycle across three gateways', () => {
  let backends; let g1; let g2; let g3;
  before(async () => {
    backends = createFleetBackends();
    g1 = await startFleetGateway(backends);
    [g2, g3] = await Promise.all([startFleetGateway(backends), startFleetGateway(backends)]);
  });
  after(async () => {
    await Promise.all([g1, g2, g3].filter(Boolean).map((g) => g.stop('SIGKILL')));
    backends?.drop();
  });

  it('delivers every change to every online device once and an offline device converges to history', async () => {
    const [a, b, c] = [uid('alice'), uid('bob'), uid('carol')];
    const [ta, tb, tc] = [token(a, { name: 'Alice' }), token(b, { name: 'Bob' }), token(c, { name: 'Carol' })];
    const created = await api(g1.url, ta, 'POST', '/api/conversations', { kind: 'group', title: 'Life', members: [b, c] });
    assert.equal(created.status, 201, JSON.stringify(created.body));
    const conversationId = created.body.conversation.id;

    const alice = await socketio(g1.url, ta);
    const bob = await ws(g2.url, tb); // the plain WebSocket transport
    const carol = await socketio(g3.url, tc);
    const carolOffline = await socketio(g3.url, tc);
    const online = [[alice, a], [bob, b], [carol, c]].map(([client, me]) => ({ client, ...follow(client, conversationId, me) }));
    const offline = follow(carolOffline, conversationId, c);

    const send = async (client, content, extra = {}) => {
      const ack = await client.request('send_message', { conversationId, content, type: 'text', clientMsgId: randomUUID(), ...extra });
      assert.ok(ack.message, JSON.stringify(ack));
      return ack.message;
    };
    const change = async (client, event, payload) => {
      const ack = await client.request(event, { conversationId, ...payload });
      assert.ok(!ack.error, `${event}: ${JSON.stringify(ack)}`);
      return ack.change;
    };

    const m1 = await send(alice, 'first');
    const m2 = await send(bob, 'second');
    await until('the offline device to see two messages', () => offline.view.lastSeq >= m2.seq);
    carolOffline.close();
    const cursor = offline.view.lastSeq;

    const key = randomUUID();
    const edit = await change(alice, 'edit_message', { seq: m1.seq, content: 'first, edited', clientMsgId: key });
    assert.equal(edit.type, 'message_updated');
    assert.equal(edit.version, 1);
    const retried = await change(alice, 'edit_message', { seq: m1.seq, content: 'first, edited', clientMsgId: key });
    assert.deepEqual(retried, edit, 'a retry returns the committed entry and publishes nothing');
    const refused = await bob.request('edit_message', { conversationId, seq: m1.seq, content: 'not mine', clientMsgId: randomUUID() });
    assert.equal(refused.error?.code, 'forbidden', JSON.stringify(refused));
    const badEmoji = await carol.request('react', { conversationId, target: m1.seq, emoji: 'lol', on: true });
    assert.equal(badEmoji.error?.code, 'invalid', JSON.stringify(badEmoji));

    await change(bob, 'react', { target: m1.seq, emoji: '👍', on: true });
    await change(carol, 'react', { target: m1.seq, emoji: '👍', on: true });
    await change(carol, 'react', { target: m2.seq, emoji: ':tada:', on: true });
    await change(carol, 'react', { target: m2.seq, emoji: ':tada:', on: false });
    const reply = await send(carol, 'a reply', { replyTo: m1.seq, mentions: [a] });
    assert.equal(reply.replyTo.seq, m1.seq);
    assert.equal(reply.replyTo.quote, 'first, edited');
    assert.deepEqual(reply.mentions, [a]);
    const notMember = await carol.request('send_message', { conversationId, content: 'x', clientMsgId: randomUUID(), mentions: [uid('stranger')] });
    assert.equal(notMember.error?.code, 'invalid');
    await change(bob, 'edit_message', { seq: m2.seq, content: 'second, edited', clientMsgId: randomUUID() });
    await change(bob, 'delete_message', { seq: m2.seq });
    const again = await bob.request('edit_message', { conversationId, seq: m2.seq, content: 'back', clientMsgId: randomUUID() });
    assert.equal(again.error?.code, 'conflict', JSON.stringify(again));
    await change(alice, 'delete_message', { seq: reply.seq }); // the creator moderates
    const m3 = await send(bob, `hello @${a}`, { mentions: [a] });

    const last = m3.seq;
    for (const device of online) {
      await until(`every entry on ${device.client.transport}`, () => device.view.lastSeq >= last);
      assert.deepEqual([...device.seqs].sort((x, y) => x - y), Array.from({ length: last }, (_, i) => i + 1),
        'each entry of the log once, none missing');
    }
    const truth = await historyState(alice, conversationId, a);
    assert.equal(truth.length, 4);
    assert.equal(truth[0].content, 'first, edited');
    assert.deepEqual(truth[0].reactions, ['👍:2:false']);
    assert.equal(truth[1].deleted, true);
    assert.equal(truth[1].content, undefined);
    for (const [device, me] of [[online[0], a], [online[1], b], [online[2], c]]) {
      assert.deepEqual(device.view.state(), await historyState(device.client, conversationId, me), `${me}'s live view is history`);
    }

    // The offline device comes back on another gateway with its cursor: the replay brings it to
    // exactly what history returns.
    const back = await socketio(g1.url, tc, { cursors: { [conversationId]: cursor } });
    const resumed = follow(back, conversationId, c);
    resumed.view.messages = offline.view.messages;
    resumed.view.lastSeq = cursor;
    await until('the resume to replay the log', () => resumed.view.lastSeq >= last);
    assert.deepEqual(resumed.seqs, Array.from({ length: last - cursor }, (_, i) => cursor + i + 1), 'replayed in seq order, once');
    assert.deepEqual(resumed.view.state(), await historyState(back, conversationId, c));

    // A device with nothing converges through sync alone.
    const fresh = new View(b);
    const synced = await bob.request('sync', { conversations: [{ conversationId, afterSeq: 0 }] });
    assert.equal(synced.truncated, false);
    fresh.applySync(synced);
    assert.deepEqual(fresh.state(), await historyState(bob, conversationId, b));
    const counts = synced.conversations.find((x) => x.id === conversationId);
    assert.ok(counts, JSON.stringify(synced.conversations));
    assert.deepEqual([counts.unread, counts.mentions], [1, 0], 'bob: alice\'s m1 unread; his own m3 is not');

    // Unread and mention counts in the conversation list.
    const listed = await api(g2.url, ta, 'GET', '/api/conversations');
    const mine = listed.body.conversations.find((x) => x.id === conversationId);
    assert.equal(mine.unread, 1, 'bob\'s m3 (m2 deleted, the reply deleted)');
    assert.equal(mine.mentions, 1, 'm3 mentions alice; the deleted reply does not count');
    await alice.request('mark_read', { conversationId, seq: last });
    const after = (await api(g3.url, ta, 'GET', '/api/conversations')).body.conversations.find((x) => x.id === conversationId);
    assert.deepEqual([after.unread, after.mentions], [0, 0]);

    for (const x of [alice, bob, carol, back]) x.close();
  });

  it('sends each recipient\'s delivery receipt to the sender once, across a drain', async () => {
    const [a, b, c] = [uid('alice'), uid('bob'), uid('carol')];
    const [ta, tb, tc] = [token(a), token(b), token(c)];
    const created = await api(g1.url, ta, 'POST', '/api/conversations', { kind: 'group', members: [b, c] });
    const conversationId = created.body.conversation.id;
    const alice1 = await socketio(g1.url, ta);
    const alice2 = await ws(g3.url, ta);
    const bob = await socketio(g2.url, tb);
    const carol = await socketio(g3.url, tc);
    for (let i = 0; i < 3; i += 1) {
      const ack = await alice1.request('send_message', { conversationId, content: `m${i}`, clientMsgId: randomUUID() });
      assert.ok(ack.message);
    }
    await bob.waitFor('new_message', (m) => m.seq === 3);
    assert.deepEqual(await bob.request('messages_received', { conversationId, seq: 3 }), {});
    await carol.request('messages_received', { conversationId, seq: 2 });

    // Bob's gateway drains; his device reconnects elsewhere and acknowledges again what it had.
    const admin = token(uid('admin'), { roles: ['admin'] });
    const drained = await api(g2.url, admin, 'POST', '/admin/drain');
    assert.equal(drained.status, 202, JSON.stringify(drained.body));
    await bob.waitFor('server_draining');
    bob.close();
    const bobAgain = await socketio(g1.url, tb, { cursors: { [conversationId]: 3 } });
    await bobAgain.request('messages_received', { conversationId, seq: 3 });
    const four = await alice1.request('send_message', { conversationId, content: 'm3', clientMsgId: randomUUID() });
    await carol.waitFor('new_message', (m) => m.seq === four.message.seq);
    await carol.request('messages_received', { conversationId, seq: four.message.seq });
    await bobAgain.waitFor('new_message', (m) => m.seq === four.message.seq);
    await bobAgain.request('messages_received', { conversationId, seq: four.message.seq });

    for (const device of [alice1, alice2]) {
      await until('every receipt', () => device.of('message_delivered_to').length >= 4);
      await sleep(300); // and no more come
      const receipts = device.of('message_delivered_to').filter((r) => r.conversationId === conversationId);
      const by = (user) => receipts.filter((r) => r.userId === user).map((r) => r.seq);
      assert.deepEqual(by(b), [3, 4], 'bob: up to 3, then 4; the repeat after the drain announced nothing');
      assert.deepEqual(by(c), [2, 4]);
    }
    // Stored: the sender reads the watermarks after a reconnect of its own.
    const joined = await alice2.request('join_conversation', { conversationId, members: true });
    const received = Object.fromEntries(joined.members.map((m) => [m.userId, m.lastReceivedSeq]));
    assert.deepEqual([received[b], received[c]], [4, 4]);
    for (const x of [alice1, alice2, bobAgain, carol]) x.close();
  });
});

describe('a deleted body on the embedded store', () => {
  let g;
  before(async () => { g = await startGateway(); });
  after(async () => { await g?.stop('SIGKILL'); });

  it('is absent from history, sync, the HTTP API and the SQLite files', async () => {
    const [a, b] = [uid('alice'), uid('bob')];
    const [ta, tb] = [token(a), token(b)];
    const created = await api(g.url, ta, 'POST', '/api/conversations', { kind: 'group', members: [b] });
    const conversationId = created.body.conversation.id;
    const alice = await socketio(g.url, ta);
    const bob = await ws(g.url, tb);
    const secret = `SECRET-${randomUUID()}`;
    const edited = `EDITED-${randomUUID()}`;
    const sent = await alice.request('send_message', { conversationId, content: `the body ${secret}`, clientMsgId: randomUUID() });
    await alice.request('edit_message', { conversationId, seq: sent.message.seq, content: `the edit ${edited}`, clientMsgId: randomUUID() });
    const reply = await bob.request('send_message', { conversationId, content: 'quoting', clientMsgId: randomUUID(), replyTo: sent.message.seq });
    assert.ok(reply.message.replyTo.quote.includes(edited), 'the quote holds the body until the deletion');
    for (let i = 0; i < 50; i += 1) {
      await bob.request('send_message', { conversationId, content: `filler ${i} ${'x'.repeat(200)}`, clientMsgId: randomUUID() });
    }
    const del = await alice.request('delete_message', { conversationId, seq: sent.message.seq });
    assert.equal(del.change.type, 'message_deleted');

    const served = [
      await bob.request('history', { conversationId, limit: 100 }),
      await bob.request('sync', { conversations: [{ conversationId, afterSeq: 0 }] }),
      (await api(g.url, tb, 'GET', `/api/conversations/${conversationId}/messages?limit=100`)).body,
    ];
    for (const body of served) {
      const text = JSON.stringify(body);
      assert.ok(!text.includes(secret) && !text.includes(edited), text.slice(0, 400));
      const m = body.messages.find((x) => x.seq === sent.message.seq);
      assert.equal(m.deleted, true);
      assert.equal(m.content, undefined);
      assert.equal(body.messages.find((x) => x.seq === reply.message.seq).replyTo.deleted, true);
    }
    const files = readdirSync(g.dataDir).map((f) => join(g.dataDir, f)).filter((p) => statSync(p).isFile());
    assert.ok(files.some((p) => p.endsWith('confab.db')), files.join(', '));
    for (const path of files) {
      const bytes = readFileSync(path);
      assert.equal(bytes.indexOf(secret), -1, `${path} still holds the body`);
      assert.equal(bytes.indexOf(edited), -1, `${path} still holds the edit`);
    }
    alice.close(); bob.close();
  });
});
