// The chat scenarios, written once and run against every transport with its real client.
import { describe, it, before, after } from 'node:test';
import assert from 'node:assert/strict';
import { randomUUID } from 'node:crypto';
import { startGateway, token, api, sleep } from './lib/gateway.mjs';
import { transports } from './lib/clients.mjs';

const uid = (p) => `${p}-${randomUUID().slice(0, 8)}`;

for (const [transportName, connect] of Object.entries(transports)) {
  describe(`chat over ${transportName}`, () => {
    let gw;
    // A short auth deadline so a /ws client that never sends its token is refused quickly.
    before(async () => { gw = await startGateway({ env: { CONFAB_WS_AUTH_TIMEOUT_MS: '1000' } }); });
    after(async () => { await gw.stop(); });

    async function pair() {
      const [a, b] = [uid('alice'), uid('bob')];
      const [ta, tb] = [token(a, { name: 'Alice' }), token(b, { name: 'Bob' })];
      const created = await api(gw.url, ta, 'POST', '/api/conversations', { kind: 'group', title: 'Team', members: [b] });
      assert.equal(created.status, 201, JSON.stringify(created.body));
      const conversationId = created.body.conversation.id;
      const alice = await connect(gw.url, ta);
      const bob = await connect(gw.url, tb);
      for (const c of [alice, bob]) {
        const joined = await c.request('join_conversation', { conversationId });
        assert.equal(joined.conversation.id, conversationId);
      }
      return { a, b, ta, tb, alice, bob, conversationId };
    }

    it('delivers a sent message with its seq, acks the sender and tells it of delivery', async () => {
      const { alice, bob, conversationId, a } = await pair();
      const clientMsgId = randomUUID();
      const ack = await alice.request('send_message', { conversationId, content: 'hello bob', type: 'text', clientMsgId });
      assert.equal(ack.message.content, 'hello bob');
      assert.equal(ack.message.seq, 1);
      assert.equal(ack.message.senderId, a);
      assert.equal(ack.message.senderName, 'Alice');
      const got = await bob.waitFor('new_message', (m) => m.clientMsgId === clientMsgId);
      assert.deepEqual(got, ack.message);
      const delivered = await alice.waitFor('message_delivered', (d) => d.clientMsgId === clientMsgId);
      assert.equal(delivered.messageId, ack.message.id);
      alice.close(); bob.close();
    });

    it('answers a resend with the same clientMsgId with the original and broadcasts nothing', async () => {
      const { alice, bob, conversationId } = await pair();
      const clientMsgId = randomUUID();
      const first = await alice.request('send_message', { conversationId, content: 'once', type: 'text', clientMsgId });
      const again = await alice.request('send_message', { conversationId, content: 'once', type: 'text', clientMsgId });
      assert.equal(again.message.id, first.message.id);
      assert.equal(again.message.seq, first.message.seq);
      await bob.waitFor('new_message', (m) => m.clientMsgId === clientMsgId);
      await sleep(300);
      assert.equal(bob.of('new_message', (m) => m.clientMsgId === clientMsgId).length, 1);
      alice.close(); bob.close();
    });

    it('stores and delivers the same clientMsgId in a second conversation as a new message', async () => {
      const { alice, bob, conversationId, ta, b } = await pair();
      const other = await api(gw.url, ta, 'POST', '/api/conversations', { kind: 'group', title: 'Other', members: [b] });
      assert.equal(other.status, 201, JSON.stringify(other.body));
      const second = other.body.conversation.id;
      for (const c of [alice, bob]) await c.request('join_conversation', { conversationId: second });
      // Ids numbered per conversation, as a client may do.
      const clientMsgId = `c-1-${randomUUID().slice(0, 8)}`;
      const first = await alice.request('send_message', { conversationId, content: 'to the first', type: 'text', clientMsgId });
      const next = await alice.request('send_message', { conversationId: second, content: 'to the second', type: 'text', clientMsgId });
      assert.notEqual(next.message.id, first.message.id);
      assert.equal(next.message.conversationId, second);
      assert.equal(next.message.content, 'to the second');
      assert.equal(next.message.seq, 1);
      const got = await bob.waitFor('new_message', (m) => m.conversationId === second && m.clientMsgId === clientMsgId);
      assert.deepEqual(got, next.message);
      const page = await bob.request('history', { conversationId: second });
      assert.deepEqual(page.messages.map((m) => m.content), ['to the second']);
      alice.close(); bob.close();
    });

    it('shows typing and ends it 5 s after a start that is not renewed', async () => {
      const { alice, bob, conversationId, a } = await pair();
      const started = Date.now();
      assert.deepEqual(await alice.request('typing_start', { conversationId }), {});
      const typing = await bob.waitFor('user_typing', (t) => t.userId === a);
      assert.equal(typing.userName, 'Alice');
      assert.equal(typing.conversationId, conversationId);
      const stopped = await bob.waitFor('user_stopped_typing', (t) => t.userId === a, 8000);
      const took = Date.now() - started;
      assert.equal(stopped.conversationId, conversationId);
      assert.ok(took >= 4500 && took < 7000, `typing expired after ${took} ms`);
      alice.close(); bob.close();
    });

    it('pages history backwards with nextBeforeSeq', async () => {
      const { alice, conversationId } = await pair();
      for (let i = 1; i <= 7; i++) {
        await alice.request('send_message', { conversationId, content: `m${i}`, type: 'text', clientMsgId: randomUUID() });
      }
      const p1 = await alice.request('history', { conversationId, limit: 3 });
      assert.deepEqual(p1.messages.map((m) => m.content), ['m5', 'm6', 'm7']);
      assert.equal(p1.nextBeforeSeq, 5);
      const p2 = await alice.request('history', { conversationId, limit: 3, beforeSeq: p1.nextBeforeSeq });
      assert.deepEqual(p2.messages.map((m) => m.seq), [2, 3, 4]);
      const p3 = await alice.request('history', { conversationId, limit: 3, beforeSeq: p2.nextBeforeSeq });
      assert.deepEqual(p3.messages.map((m) => m.seq), [1]);
      assert.equal(p3.nextBeforeSeq ?? null, null);
      alice.close();
    });

    it('returns exactly the missed messages from sync after a reconnect', async () => {
      const { alice, bob, conversationId, tb } = await pair();
      await alice.request('send_message', { conversationId, content: 'seen', type: 'text', clientMsgId: randomUUID() });
      const seen = await bob.waitFor('new_message', (m) => m.content === 'seen');
      bob.close();
      const missed = [];
      for (let i = 0; i < 3; i++) {
        missed.push((await alice.request('send_message', { conversationId, content: `missed ${i}`, type: 'text', clientMsgId: randomUUID() })).message);
      }
      const back = await connect(gw.url, tb);
      const synced = await back.request('sync', { conversations: [{ conversationId, afterSeq: seen.seq }] });
      assert.deepEqual(synced.messages, missed);
      assert.equal(synced.truncated, false);
      alice.close(); back.close();
    });

    it('refuses a non-member join with forbidden', async () => {
      const { conversationId } = await pair();
      const eve = await connect(gw.url, token(uid('eve')));
      const ack = await eve.request('join_conversation', { conversationId });
      assert.equal(ack.error.code, 'forbidden');
      const send = await eve.request('send_message', { conversationId, content: 'let me in', type: 'text', clientMsgId: randomUUID() });
      assert.equal(send.error.code, 'forbidden');
      const err = await eve.waitFor('message_error');
      assert.equal(err.code, 'forbidden');
      eve.close();
    });

    it('refuses bad tokens at the handshake', async () => {
      await assert.rejects(connect(gw.url, 'not-a-token'), /unauthorized/);
      await assert.rejects(connect(gw.url, token('x', { secret: 'some-other-secret-some-other-secret!' })), /signature/);
      await assert.rejects(connect(gw.url, token('x', { ttlSeconds: -5 })), /expired/);
      await assert.rejects(connect(gw.url, undefined), /missing token/);
    });

    it('answers malformed payloads with invalid and keeps the connection', async () => {
      const { alice, conversationId } = await pair();
      const cases = [
        ['send_message', { conversationId, type: 'text', clientMsgId: 'x' }, /content/],
        ['send_message', { conversationId, content: 5, type: 'text', clientMsgId: 'x' }, /invalid type/],
        ['send_message', { conversationId, content: 'x', type: 'video', clientMsgId: 'x' }, /unknown variant/],
        ['send_message', { conversationId, content: 'x', clientMsgId: 'x', admin: true }, /unknown field/],
        ['join_conversation', { conversationId: 'not-a-uuid' }, /UUID|uuid/],
        ['history', { conversationId, limit: 1000 }, /limit/],
        ['history', 'just a string', /invalid/],
        ['sync', { conversations: 'all' }, /invalid/],
        ['no_such_event', {}, /unknown event/],
      ];
      for (const [event, payload, message] of cases) {
        const ack = await alice.request(event, payload);
        assert.equal(ack.error?.code, 'invalid', `${event} ${JSON.stringify(payload)} → ${JSON.stringify(ack)}`);
        assert.match(ack.error.message, message);
      }
      const ok = await alice.request('history', { conversationId });
      assert.ok(Array.isArray(ok.messages), 'the connection still works');
      alice.close();
    });

    it('refuses a frame over the size limit by closing the connection, and stores nothing', async () => {
      const { alice, conversationId } = await pair();
      const huge = 'x'.repeat(70 * 1024);
      alice.request('send_message', { conversationId, content: huge, type: 'text', clientMsgId: randomUUID() }, 3000).catch(() => {});
      const reason = await Promise.race([alice.disconnected, sleep(5000).then(() => 'still connected')]);
      assert.notEqual(reason, 'still connected');
      const page = await api(gw.url, token(uid('probe')), 'GET', `/api/conversations/${conversationId}/messages`);
      assert.equal(page.status, 403, 'a stranger cannot read it');
    });

    it('marks read for the room and the reader', async () => {
      const { alice, bob, conversationId, b } = await pair();
      const sent = await alice.request('send_message', { conversationId, content: 'read me', type: 'text', clientMsgId: randomUUID() });
      assert.deepEqual(await bob.request('mark_read', { conversationId, seq: sent.message.seq }), {});
      const read = await alice.waitFor('message_read', (r) => r.userId === b);
      assert.equal(read.seq, sent.message.seq);
      const bad = await bob.request('mark_read', { conversationId, seq: 99 });
      assert.equal(bad.error.code, 'invalid');
      alice.close(); bob.close();
    });

    it('tells co-members when a user comes online and goes offline', async () => {
      const { alice, tb, b, bob } = await pair();
      bob.close();
      const off = await alice.waitFor('user_offline', (u) => u.userId === b, 5000);
      assert.equal(off.userId, b);
      const onlineBefore = alice.of('user_online', (u) => u.userId === b).length;
      const back = await connect(gw.url, tb);
      const deadline = Date.now() + 5000;
      while (alice.of('user_online', (u) => u.userId === b).length === onlineBefore && Date.now() < deadline) await sleep(20);
      assert.equal(alice.of('user_online', (u) => u.userId === b).length, onlineBefore + 1, 'online again, once');
      const p = await alice.request('presence', { userIds: [b, 'nobody-at-all'] });
      assert.equal(p.statuses[b].status, 'online');
      // No shared conversation: nothing is told about them.
      assert.equal(p.statuses['nobody-at-all'].status, 'unknown');
      back.close(); alice.close();
    });

    it('tells a new member of the conversation and stops delivery to a removed one at once', async () => {
      const { alice, ta, conversationId } = await pair();
      const carolId = uid('carol');
      const carol = await connect(gw.url, token(carolId));
      assert.equal((await api(gw.url, ta, 'POST', `/api/conversations/${conversationId}/members`, { userId: carolId })).status, 204);
      const added = await carol.waitFor('conversation_added');
      assert.equal(added.conversation.id, conversationId);
      await carol.request('join_conversation', { conversationId });
      assert.equal((await api(gw.url, ta, 'DELETE', `/api/conversations/${conversationId}/members/${carolId}`)).status, 204);
      await carol.waitFor('conversation_removed', (r) => r.conversationId === conversationId);
      await alice.request('send_message', { conversationId, content: 'after removal', type: 'text', clientMsgId: randomUUID() });
      await sleep(300);
      assert.equal(carol.of('new_message', (m) => m.content === 'after removal').length, 0);
      carol.close(); alice.close();
    });

    it('warns before the token expires, renews with refresh_token, and disconnects at exp', async () => {
      const who = uid('short');
      const c = await connect(gw.url, token(who, { ttlSeconds: 62 }));
      const warn = await c.waitFor('token_expiring', () => true, 5000);
      assert.ok(warn.secondsLeft <= 62 && warn.secondsLeft >= 55, JSON.stringify(warn));
      const renewed = await c.request('refresh_token', { token: token(who, { ttlSeconds: 3600 }) });
      assert.ok(renewed.exp > Date.now() / 1000 + 3000);
      const other = await c.request('refresh_token', { token: token(uid('someone-else')) });
      assert.equal(other.error.code, 'forbidden');
      c.close();
      const doomed = await connect(gw.url, token(uid('doomed'), { ttlSeconds: 2 }));
      const reason = await Promise.race([doomed.disconnected, sleep(6000).then(() => 'still connected')]);
      // How a server-side close surfaces differs by transport; the reason is equally precise.
      const expected = { 'socket.io': 'io server disconnect', ws: 'close 4001: unauthorized: token expired' }[transportName];
      assert.equal(reason, expected);
      assert.equal(doomed.of('session_expired')[0].error.code, 'unauthorized');
    });
  });
}
