// Three gateways sharing Postgres, Redis and RabbitMQ behave as one chat service: chat, typing
// and presence across nodes, seq order everywhere, a crashed node's users go offline, and
// broker and database outages lose no acked message.
import { describe, it, before, after } from 'node:test';
import assert from 'node:assert/strict';
import { randomUUID } from 'node:crypto';
import { token, api, sleep } from './lib/gateway.mjs';
import { socketio as connect, transports } from './lib/clients.mjs';
import { startFaultProxy } from './lib/faultproxy.mjs';
import { createFleetBackends, startFleetGateway, AMQP_PORT, PG_PORT_DEFAULT } from './lib/cluster.mjs';

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

describe('three gateways as one service', () => {
  let backends; let g1; let g2; let g3; let amqpProxy; let pgProxy;
  before(async () => {
    backends = createFleetBackends();
    amqpProxy = await startFaultProxy(AMQP_PORT);
    pgProxy = await startFaultProxy(PG_PORT_DEFAULT);
    // g1 runs the migrations; the others start once the schema is there.
    g1 = await startFleetGateway(backends);
    [g2, g3] = await Promise.all([
      startFleetGateway(backends),
      startFleetGateway(backends, { amqpPort: amqpProxy.port, pgPort: pgProxy.port }),
    ]);
  });
  after(async () => {
    await Promise.all([g1, g2, g3].filter(Boolean).map((g) => g.stop('SIGKILL')));
    await amqpProxy?.close(); await pgProxy?.close();
    backends?.drop();
  });

  async function conversation(creatorToken, members, via = g1) {
    const created = await api(via.url, creatorToken, 'POST', '/api/conversations', { kind: 'group', title: 'Fleet', members });
    assert.equal(created.status, 201, JSON.stringify(created.body));
    return created.body.conversation.id;
  }

  it('is ready on every node with every backend up', async () => {
    for (const g of [g1, g2, g3]) {
      const r = await api(g.url, null, 'GET', '/readyz');
      assert.equal(r.status, 200, `${g.url}: ${JSON.stringify(r.body)}`);
    }
  });

  it('lets users on different gateways chat, type and see presence, in one seq order', async () => {
    const [a, b, c] = [uid('alice'), uid('bob'), uid('carol')];
    const [ta, tb, tc] = [token(a, { name: 'Alice' }), token(b, { name: 'Bob' }), token(c, { name: 'Carol' })];
    const conversationId = await conversation(ta, [b, c]);
    const alice = await connect(g1.url, ta);
    const bob = await connect(g2.url, tb);
    // Carol arrives last, on the third node: the others are told she is online, once.
    const carol = await connect(g3.url, tc);
    await alice.waitFor('user_online', (u) => u.userId === c);
    await bob.waitFor('user_online', (u) => u.userId === c);
    for (const x of [alice, bob, carol]) await x.request('join_conversation', { conversationId });

    const statuses = await alice.request('presence', { userIds: [b, c] });
    assert.equal(statuses.statuses[b].status, 'online');
    assert.equal(statuses.statuses[c].status, 'online');

    await bob.request('typing_start', { conversationId });
    const typing = await alice.waitFor('user_typing', (t) => t.userId === b);
    assert.deepEqual(typing, { conversationId, userId: b, userName: 'Bob' });
    await carol.waitFor('user_typing', (t) => t.userId === b);
    // Stopped on another device, on another node: the stop crosses nodes too.
    const bob2 = await connect(g3.url, tb);
    await bob2.request('typing_stop', { conversationId });
    await alice.waitFor('user_stopped_typing', (t) => t.userId === b);
    await carol.waitFor('user_stopped_typing', (t) => t.userId === b);
    bob2.close();

    const sends = [];
    for (let i = 0; i < 10; i += 1) {
      for (const [who, client] of [['a', alice], ['b', bob], ['c', carol]]) {
        sends.push(client.request('send_message', { conversationId, content: `${who}${i}`, type: 'text', clientMsgId: randomUUID() }));
      }
    }
    const acks = await Promise.all(sends);
    for (const ack of acks) assert.ok(ack.message, JSON.stringify(ack));
    assert.deepEqual(acks.map((x) => x.message.seq).sort((p, q) => p - q), Array.from({ length: 30 }, (_, i) => i + 1));
    const bySeq = (client) => client.of('new_message', (m) => m.conversationId === conversationId)
      .sort((p, q) => p.seq - q.seq).map((m) => `${m.seq}:${m.content}`);
    await until('every node to deliver all 30', () => [alice, bob, carol].every((x) => bySeq(x).length >= 30));
    const expected = acks.map((x) => x.message).sort((p, q) => p.seq - q.seq).map((m) => `${m.seq}:${m.content}`);
    for (const x of [alice, bob, carol]) assert.deepEqual(bySeq(x), expected, 'same messages, same seq order, each once');
    alice.close(); bob.close(); carol.close();
  });

  it('survives a RabbitMQ outage between one gateway and the broker without losing an acked message', async () => {
    const [f, g] = [uid('frank'), uid('gina')];
    const [tf, tg] = [token(f), token(g)];
    const conversationId = await conversation(tg, [f]);
    const frank = await connect(g3.url, tf); // behind the fault proxy
    const gina = await connect(g1.url, tg);
    for (const x of [frank, gina]) await x.request('join_conversation', { conversationId });

    const acked = new Set();
    const failed = [];
    let outage = false;
    const sender = async (client, who) => {
      for (let i = 0; i < 40; i += 1) {
        const ack = await client.request('send_message', { conversationId, content: `${who}${i} ${outage ? 'during' : ''}`, type: 'text', clientMsgId: randomUUID() });
        if (ack.message) acked.add(ack.message.id); else failed.push(ack);
        await sleep(25);
      }
    };
    const traffic = Promise.all([sender(frank, 'f'), sender(gina, 'g')]);
    await sleep(300);
    amqpProxy.cut(); outage = true;
    const notReady = await until('g3 to report not ready', async () => (await api(g3.url, null, 'GET', '/readyz')).status === 503 || null, 5000);
    assert.ok(notReady);
    await sleep(1000);
    amqpProxy.restore(); outage = false;
    await traffic;
    assert.deepEqual(failed, [], 'sends are acked during the outage: the store is up');
    await until('g3 to be ready again', async () => (await api(g3.url, null, 'GET', '/readyz')).status === 200, 10000);
    assert.equal(acked.size, 80);

    // Each client: what arrived live plus what sync returns covers every acked message.
    for (const client of [frank, gina]) {
      const live = new Set(client.of('new_message', (m) => m.conversationId === conversationId).map((m) => m.id));
      const synced = await client.request('sync', { conversations: [{ conversationId, afterSeq: 0 }] });
      const all = new Set([...live, ...synced.messages.map((m) => m.id)]);
      const missing = [...acked].filter((id) => !all.has(id));
      console.log(`# ${client === frank ? 'frank (g3, behind the cut)' : 'gina (g1)'}: acked ${acked.size}, live ${[...acked].filter((id) => live.has(id)).length}, recovered by sync ${[...acked].filter((id) => !live.has(id)).length}`);
      assert.deepEqual(missing, [], `acked ${acked.size}, live ${live.size}, synced ${synced.messages.length}`);
      assert.deepEqual(synced.messages.map((m) => m.seq), Array.from({ length: 80 }, (_, i) => i + 1), 'gap-free');
    }
    // And live delivery across nodes works again after the reconnect (bindings restored).
    const after = await gina.request('send_message', { conversationId, content: 'after the outage', type: 'text', clientMsgId: randomUUID() });
    await frank.waitFor('new_message', (m) => m.id === after.message.id);
    const back = await frank.request('send_message', { conversationId, content: 'back', type: 'text', clientMsgId: randomUUID() });
    await gina.waitFor('new_message', (m) => m.id === back.message.id);
    frank.close(); gina.close();
  });

  it('answers sends during a Postgres outage with unavailable, and the retry succeeds', async () => {
    const h = uid('hank');
    const th = token(h);
    const conversationId = await conversation(th, []);
    const hank = await connect(g3.url, th); // its database connections go through the proxy
    await hank.request('join_conversation', { conversationId });
    pgProxy.cut();
    const clientMsgId = randomUUID();
    const refused = await hank.request('send_message', { conversationId, content: 'during', type: 'text', clientMsgId }, 10000);
    assert.equal(refused.error?.code, 'unavailable', JSON.stringify(refused));
    const ready = await api(g3.url, null, 'GET', '/readyz');
    assert.equal(ready.status, 503);
    pgProxy.restore();
    const retried = await until('the retry to succeed', async () => {
      const ack = await hank.request('send_message', { conversationId, content: 'during', type: 'text', clientMsgId }, 10000);
      return ack.message ? ack : null;
    }, 15000);
    assert.equal(retried.message.seq, 1);
    const again = await hank.request('send_message', { conversationId, content: 'during', type: 'text', clientMsgId });
    assert.equal(again.message.id, retried.message.id, 'still idempotent');
    hank.close();
  });

  for (const [transportName, client] of Object.entries(transports)) {
    it(`resumes over ${transportName} after a kill -9 of the client's gateway: what was missed arrives once, in seq order, before live traffic, with no join or sync`, async () => {
      const [a, b] = [uid('ann'), uid('ben')];
      const [ta, tb] = [token(a), token(b)];
      const convs = [await conversation(ta, [b]), await conversation(ta, [b])];
      const doomed = await startFleetGateway(backends);
      const ann = await connect(g1.url, ta);
      const ben = await client(doomed.url, tb, { cursors: {} });
      // Attached to both conversations at connect: live delivery with no join.
      const sent = [];
      const send = async (conversationId, content) => {
        const ack = await ann.request('send_message', { conversationId, content, type: 'text', clientMsgId: randomUUID() });
        assert.ok(ack.message, JSON.stringify(ack));
        sent.push(ack.message);
        return ack.message;
      };
      for (const c of convs) {
        const m = await send(c, 'before');
        await ben.waitFor('new_message', (x) => x.id === m.id);
      }
      const cursors = Object.fromEntries(convs.map((c) => [c, 1]));
      await doomed.stop('SIGKILL');
      for (let i = 0; i < 5; i += 1) for (const c of convs) await send(c, `missed ${i}`);
      // Live traffic keeps flowing while ben comes back, on another gateway.
      let sending = true;
      const live = (async () => {
        for (let i = 0; sending; i += 1) { await send(convs[i % 2], `live ${i}`); await sleep(10); }
      })();
      await sleep(50);
      const back = await client(g2.url, tb, { cursors });
      await sleep(400);
      sending = false;
      await live;
      const last = Object.fromEntries(convs.map((c) => [c, Math.max(...sent.filter((m) => m.conversationId === c).map((m) => m.seq))]));
      await until('ben to have every message', () => convs.every((c) => back.of('new_message', (m) => m.conversationId === c && m.seq === last[c]).length));
      assert.deepEqual(back.of('resume_truncated'), []);
      for (const c of convs) {
        const got = back.of('new_message', (m) => m.conversationId === c);
        const expected = sent.filter((m) => m.conversationId === c && m.seq > 1).sort((p, q) => p.seq - q.seq);
        assert.deepEqual(got.map((m) => m.seq), expected.map((m) => m.seq), `conversation ${c}: each once, in seq order`);
        assert.deepEqual(got.map((m) => m.id), expected.map((m) => m.id));
        // The missed ones come first, before anything sent after the reconnect began.
        assert.deepEqual(got.slice(0, 5).map((m) => m.content), [0, 1, 2, 3, 4].map((i) => `missed ${i}`));
      }
      ann.close(); back.close();
    });
  }

  it('takes a killed gateway\'s users offline within the TTL, and sync after reconnecting returns what they missed', async () => {
    const [d, e] = [uid('dave'), uid('erin')];
    const [td, te] = [token(d), token(e)];
    const conversationId = await conversation(te, [d]);
    const erin = await connect(g1.url, te);
    const dave = await connect(g2.url, td);
    await erin.waitFor('user_online', (u) => u.userId === d);
    for (const x of [erin, dave]) await x.request('join_conversation', { conversationId });
    const first = await erin.request('send_message', { conversationId, content: 'before', type: 'text', clientMsgId: randomUUID() });
    await dave.waitFor('new_message', (m) => m.id === first.message.id);
    const lastSeen = first.message.seq;

    const killedAt = Date.now();
    await g2.stop('SIGKILL');
    await erin.waitFor('user_offline', (u) => u.userId === d, 8000);
    const offlineAfterMs = Date.now() - killedAt;
    // TTL 2 s, heartbeat/sweep every 2/3 s: offline within TTL + one sweep (+ slack).
    assert.ok(offlineAfterMs < 4000, `offline after ${offlineAfterMs} ms`);
    console.log(`# user offline ${offlineAfterMs} ms after kill -9 (TTL 2000 ms)`);
    assert.equal(erin.of('user_offline', (u) => u.userId === d).length, 1, 'announced once');
    const p = await erin.request('presence', { userIds: [d] });
    assert.equal(p.statuses[d].status, 'offline');

    const missed = [];
    for (let i = 0; i < 3; i += 1) {
      missed.push((await erin.request('send_message', { conversationId, content: `missed ${i}`, type: 'text', clientMsgId: randomUUID() })).message);
    }
    const daveAgain = await connect(g3.url, td);
    await erin.waitFor('user_online', (u) => u.userId === d && erin.of('user_online', (x) => x.userId === d).length >= 2);
    const synced = await daveAgain.request('sync', { conversations: [{ conversationId, afterSeq: lastSeen }] });
    assert.deepEqual(synced.messages.map((m) => m.id), missed.map((m) => m.id));
    assert.equal(synced.truncated, false);
    erin.close(); daveAgain.close();
  });
});

describe('a gateway with an unreachable backend', () => {
  it('refuses to start with one line naming it', async () => {
    const backends = createFleetBackends();
    try {
      await assert.rejects(
        startFleetGateway(backends, { amqpPort: 1 }),
        (err) => {
          const lines = err.message.split('\n').filter((l) => l.startsWith('confab-gateway:'));
          assert.equal(lines.length, 1, err.message);
          assert.match(lines[0], /cannot reach RabbitMQ \(CONFAB_AMQP_URL\)/);
          return true;
        },
      );
    } finally { backends.drop(); }
  });

  it('waits for it when told to, and serves once it is there', async () => {
    const backends = createFleetBackends();
    const proxy = await startFaultProxy(AMQP_PORT);
    proxy.cut();
    let gw;
    try {
      const starting = startFleetGateway(backends, { amqpPort: proxy.port, env: { CONFAB_WAIT_FOR_BACKENDS: 'true' } });
      await sleep(1500);
      proxy.restore();
      gw = await starting;
      const r = await api(gw.url, null, 'GET', '/readyz');
      assert.equal(r.status, 200);
    } finally { await gw?.stop('SIGKILL'); await proxy.close(); backends.drop(); }
  });
});
