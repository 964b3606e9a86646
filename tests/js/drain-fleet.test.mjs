// A fleet of three gateways (shared Postgres, Redis, RabbitMQ) with a few thousand clients in
// shared conversations, senders sending all along. One gateway is drained with a 10 s window,
// then all three are replaced one after the other. Every client of a drained gateway
// reconnects elsewhere once and `sync`s the gap: 0 acked messages lost, 0 duplicates, and the
// reconnect rate stays within the budget (+20 %) in every second.
import { describe, it, before, after } from 'node:test';
import assert from 'node:assert/strict';
import { randomUUID } from 'node:crypto';
import { monitorEventLoopDelay } from 'node:perf_hooks';
import { token, api, sleep, gatewayBin } from './lib/gateway.mjs';
import { socketio, ws } from './lib/clients.mjs';
import { createFleetBackends, startFleetGateway } from './lib/cluster.mjs';

const CLIENTS = Number(process.env.CONFAB_DRAIN_CLIENTS ?? 2400);
const MEMBERS = 50; // per conversation
const DRAIN_SECONDS = 10;
/**
 * The fleet's reconnect budget (the operator's rollout.maxReconnectsPerSecond). A drain sheds a
 * pod's N clients at N ÷ DRAIN_SECONDS per second, and a rolling replacement leaves the last old
 * pods fuller than the first (they took in the earlier pods' clients): with 2,400 clients the
 * fullest drained pod holds about 1,420, so 150/s × 10 s covers every pod of the roll.
 */
const BUDGET = Number(process.env.CONFAB_DRAIN_BUDGET ?? 150);
const CONVERSATIONS = Math.ceil(CLIENTS / MEMBERS);
/** One sender per conversation; about 40 messages a second across the fleet. */
const SEND_EVERY_MS = Math.max(300, Math.round((CONVERSATIONS * 1000) / 40));

const uid = (p) => `${p}-${randomUUID().slice(0, 8)}`;

describe('draining gateways of a busy fleet', () => {
  let backends;
  const gateways = []; // every gateway process started, for clean-up
  let live = []; // gateways accepting connections: what a Service would route to
  before(async () => {
    backends = createFleetBackends();
  });
  after(async () => {
    await Promise.all(gateways.map((g) => g.stop('SIGKILL')));
    backends?.drop();
  });

  const start = () => startFleetGateway(backends, {
    bin: gatewayBin('release'),
    env: {
      CONFAB_DRAIN_SECONDS: String(DRAIN_SECONDS),
      CONFAB_DATABASE_POOL_SIZE: '8',
      CONFAB_CONNECTS_PER_SECOND: '100000',
      CONFAB_CONNECT_BURST: '100000',
      CONFAB_EVENTS_PER_SECOND: '1000',
      CONFAB_EVENT_BURST: '1000',
      CONFAB_PRESENCE_TTL_MS: '10000',
    },
  }).then((g) => { gateways.push(g); return g; });

  it('hands every client of a drained gateway to the others, losing and duplicating nothing', async () => {
    const first = await start();
    live = [first, ...(await Promise.all([start(), start()]))];

    // Conversations of MEMBERS users each; one user per client.
    const users = Array.from({ length: CLIENTS }, (_, i) => ({ id: uid(`u${i}`), conv: Math.floor(i / MEMBERS) }));
    const conversations = [];
    for (let c = 0; c < CONVERSATIONS; c += 1) {
      const members = users.filter((u) => u.conv === c).map((u) => u.id);
      const created = await api(first.url, token(members[0]), 'POST', '/api/conversations', { kind: 'group', title: `fleet ${c}`, members: members.slice(1) });
      assert.equal(created.status, 201, JSON.stringify(created.body));
      conversations.push(created.body.conversation.id);
    }

    const stats = { reconnects: [], refusedReconnects: 0, liveDuplicates: 0, failures: [] };
    let phase = null; // {drained: gateway, t0}
    let routed = 0; // reconnects routed so far (round-robin)

    /** One user's device: follows the drain contract (wait the slot, reconnect elsewhere, sync). */
    class Device {
      constructor(user, index) {
        this.user = user; this.index = index; this.tok = token(user.id);
        this.conversationId = conversations[user.conv];
        this.seen = new Map(); // seq → id
        this.liveIds = new Set();
        this.moves = 0; this.drainings = 0; this.gateway = null; this.client = null; this.ready = null;
        this.kind = index % 4 === 3 ? ws : socketio; // a quarter on the plain WebSocket
      }
      record(m) {
        if (m.conversationId !== this.conversationId) return;
        const had = this.seen.get(m.seq);
        if (had !== undefined && had !== m.id) throw new Error(`seq ${m.seq} has two ids`);
        this.seen.set(m.seq, m.id);
      }
      contiguous() { let s = 0; while (this.seen.has(s + 1)) s += 1; return s; }
      async connect(gateway) {
        const holder = {};
        const onEvent = (name, payload) => {
          if (name === 'new_message') this.onLive(holder.client, payload);
          else if (name === 'server_draining') this.onDraining(holder.client, payload);
        };
        const client = await this.kind(gateway.url, this.tok, { keep: false, onEvent });
        holder.client = client;
        this.connectedAt = Date.now();
        this.client = client; this.gateway = gateway;
        try {
          const joined = await client.request('join_conversation', { conversationId: this.conversationId }, 15000);
          if (joined?.error) throw new Error(`join: ${joined.error.code}: ${joined.error.message}`);
          this.joinedAt = Date.now();
          const after = this.contiguous();
          const synced = await client.request('sync', { conversations: [{ conversationId: this.conversationId, afterSeq: after }] }, 15000);
          if (synced?.error) throw new Error(`sync: ${synced.error.code}: ${synced.error.message}`);
          for (const m of synced.messages) this.record(m);
          this.syncedAt = Date.now();
        } catch (e) {
          // A failed attempt leaves no connection behind: the retry starts from scratch.
          this.client = null;
          client.close();
          throw e;
        }
      }
      onLive(client, m) {
        if (client !== this.client) return;
        if (this.liveIds.has(`${client.transport}:${m.id}:${this.moves}`)) stats.liveDuplicates += 1;
        this.liveIds.add(`${client.transport}:${m.id}:${this.moves}`);
        this.record(m);
      }
      onDraining(client, { reconnectAfterMs }) {
        if (client !== this.client) return;
        this.drainings += 1;
        this.ready = (async () => {
          await sleep(reconnectAfterMs);
          const old = this.client;
          this.client = null;
          old.close();
          this.moves += 1;
          const startedAt = Date.now();
          let failures = 0;
          for (let attempt = 0; ; attempt += 1) {
            // Like a Service: the next ready pod in turn, over every reconnect of the fleet.
            const others = live.filter((g) => g !== this.gateway);
            const target = others[(routed++) % others.length];
            try {
              await this.connect(target);
              break;
            } catch (e) {
              stats.refusedReconnects += 1;
              failures += 1;
              if (stats.failures.length < 5) stats.failures.push(String(e?.message ?? e));
              if (attempt > 20) throw e;
              await sleep(200);
            }
          }
          // The reconnect is the new connection's handshake; join and sync follow it.
          if (phase) {
            stats.reconnects.push({
              startedAt: startedAt - phase.t0, at: this.connectedAt - phase.t0, from: phase.drained, failures,
              handshakeMs: this.connectedAt - startedAt, joinMs: this.joinedAt - this.connectedAt, syncMs: this.syncedAt - this.joinedAt,
            });
          }
        })();
      }
      async request(event, payload) {
        for (;;) {
          const c = this.client;
          if (c) {
            try {
              const ack = await c.request(event, payload, 5000);
              if (ack?.message || !ack?.error || ack.error.code !== 'unavailable') return ack;
            } catch { /* closed under it: retry, same clientMsgId */ }
          }
          await (this.ready ?? sleep(100));
          await sleep(20);
        }
      }
    }

    const devices = users.map((u, i) => new Device(u, i));
    // Connect in batches: round-robin over the three gateways.
    for (let i = 0; i < devices.length; i += 100) {
      await Promise.all(devices.slice(i, i + 100).map((d) => d.connect(live[d.index % 3])));
    }
    const onGateway = (g) => devices.filter((d) => d.gateway === g && d.client).length;

    // One sender per conversation, all along.
    const acked = new Map(); // clientMsgId → message
    let sending = true;
    const senders = conversations.map(async (conversationId, c) => {
      const d = devices[c * MEMBERS + 1];
      while (sending) {
        const clientMsgId = randomUUID();
        const ack = await d.request('send_message', { conversationId, content: `m ${clientMsgId}`, type: 'text', clientMsgId });
        assert.ok(ack.message, JSON.stringify(ack));
        acked.set(clientMsgId, ack.message);
        await sleep(SEND_EVERY_MS);
      }
    });

    const report = [];
    async function drain(g, how) {
      const n = onGateway(g);
      live = live.filter((x) => x !== g); // not ready: the Service stops routing to it
      stats.reconnects = [];
      phase = { drained: g, t0: Date.now() };
      const movesBefore = devices.map((d) => d.moves);
      const mine = devices.filter((d) => d.gateway === g);
      // The clients' own lag: a late timer here is a late reconnect there.
      const lag = monitorEventLoopDelay({ resolution: 10 });
      lag.enable();
      const told = mine.map((d) => d.drainings);
      if (how === 'SIGTERM') g.proc.kill('SIGTERM');
      else assert.equal((await api(g.url, token(uid('ops'), { roles: ['admin'] }), 'POST', '/admin/drain')).status, 202);
      for (let waited = 0; mine.some((d, i) => d.drainings === told[i]); waited += 50) {
        const silent = mine.filter((d, i) => d.drainings === told[i]);
        if (waited >= 5000) console.log(g.stderr().split('\n').filter((l) => /drain/.test(l)).slice(0, 5).join('\n'), 'expected', mine.length);
        assert.ok(waited < 5000, `drain #${report.length + 1} (${how}): ${silent.length} clients never got server_draining: ${JSON.stringify(silent.map((d) => ({ t: d.client?.transport, connected: d.client?.socket.connected ?? d.client?.socket.readyState })))}`);
        await sleep(50);
      }
      await Promise.all(mine.map((d) => d.ready));
      const exit = how === 'SIGTERM' ? await g.exited : null;
      if (exit) assert.equal(exit.code, 0, g.stderr());
      const elapsed = Date.now() - phase.t0;
      const histogram = (key) => {
        const counts = Array.from({ length: Math.ceil(elapsed / 1000) + 1 }, () => 0);
        for (const r of stats.reconnects) counts[Math.floor(r[key] / 1000)] += 1;
        return counts;
      };
      const perSecond = histogram('at');
      const startedPerSecond = histogram('startedAt');
      const peak = Math.max(...perSecond);
      const pct = (key) => {
        const v = stats.reconnects.map((r) => r[key]).sort((a, b) => a - b);
        const at = (q) => v[Math.min(v.length - 1, Math.floor(q * v.length))];
        return `${at(0.5)}/${at(0.99)}/${v[v.length - 1]}`;
      };
      if (peak > BUDGET * 1.2) console.log(`# warnings:\n${gateways.map((x) => x.stderr().split('\n').filter((l) => /WARN|ERROR/.test(l)).slice(-5).join('\n')).join('\n')}`);
      const moved = devices.filter((d, i) => d.moves !== movesBefore[i]);
      report.push({
        how, clients: n, reconnected: stats.reconnects.length, peakPerSecond: peak, budget: BUDGET, elapsedMs: elapsed,
        perSecond: perSecond.join(' '), startedPerSecond: startedPerSecond.join(' '),
        latency: `handshake ${pct('handshakeMs')}, join ${pct('joinMs')}, sync ${pct('syncMs')} ms (p50/p99/max)`,
        failed: stats.reconnects.reduce((a, r) => a + r.failures, 0),
        clientLoopDelayMs: `${(lag.percentile(99) / 1e6).toFixed(0)}/${(lag.max / 1e6).toFixed(0)} (p99/max)`,
      });
      lag.disable();
      console.log(`# drain #${report.length} (${how}): ${JSON.stringify(report.at(-1))}${stats.failures.length ? ` failures: ${stats.failures.join(' | ')}` : ''}`);
      stats.failures = [];
      assert.equal(moved.length, n, 'every client of the drained gateway moved');
      assert.ok(moved.every((d, i) => d.moves === movesBefore[devices.indexOf(d)] + 1), 'each exactly once');
      assert.equal(stats.reconnects.length, n);
      // The budget holds for this pod only if its clients fit in it over the window (the
      // operator's arithmetic); beyond that the scenario, not the drain, would be wrong.
      assert.ok(n <= BUDGET * DRAIN_SECONDS, `drain #${report.length}: ${n} clients exceed ${BUDGET}/s × ${DRAIN_SECONDS} s`);
      assert.ok(peak <= BUDGET * 1.2, `reconnects peaked at ${peak}/s; budget ${BUDGET}/s: ${perSecond}`);
      // And the ramp is flat: no second far above this pod's own average rate.
      const even = n / DRAIN_SECONDS;
      assert.ok(peak <= even * 1.2 + 5, `reconnects peaked at ${peak}/s; ${n} clients over ${DRAIN_SECONDS} s average ${even}/s: ${perSecond}`);
      assert.ok(elapsed < (DRAIN_SECONDS + 6) * 1000, `drain took ${elapsed} ms`);
    }

    await sleep(1000);
    // As a Deployment with maxSurge 1 and maxUnavailable 0 does it: the new pod is ready before
    // an old one drains, and the drained clients spread over every other ready pod.
    live.push(await start());
    await drain(first, 'POST /admin/drain');
    await first.stop('SIGTERM');
    // A rolling replacement of all three, one after the other.
    for (const g of [...live]) {
      live.push(await start());
      await drain(g, 'SIGTERM');
    }

    sending = false;
    await Promise.all(senders);
    // Live deliveries still in flight arrive; a message missing after this is lost.
    const lastSeq = new Map();
    for (const m of acked.values()) lastSeq.set(m.conversationId, Math.max(lastSeq.get(m.conversationId) ?? 0, m.seq));
    const settled = Date.now();
    while (Date.now() - settled < 15000 && devices.some((d) => d.contiguous() < (lastSeq.get(d.conversationId) ?? 0))) await sleep(100);
    console.log(`# settled ${Date.now() - settled} ms after the last ack`);
    // Losses: each device has every acked message of its conversation, gap-free.
    let lost = 0;
    const losses = [];
    for (const d of devices) {
      const missing = [];
      for (const m of acked.values()) {
        if (m.conversationId === d.conversationId && d.seen.get(m.seq) !== m.id) missing.push(m.seq);
      }
      lost += missing.length;
      if (missing.length) losses.push({ device: d.index, transport: d.client?.transport, moves: d.moves, gateway: gateways.indexOf(d.gateway), missing: missing.sort((a, b) => a - b).join(','), last: lastSeq.get(d.conversationId), contiguous: d.contiguous() });
    }
    if (losses.length) console.log(`# losses: ${JSON.stringify(losses.slice(0, 10))}`);
    // Duplicates in the store: one message per clientMsgId, seqs 1..n with no repeats.
    let storeDuplicates = 0;
    for (const [c, conversationId] of conversations.entries()) {
      const owner = token(users[c * MEMBERS].id);
      const ids = new Set(); const seqs = new Set(); let before;
      for (;;) {
        const q = before ? `?limit=100&beforeSeq=${before}` : '?limit=100';
        const page = (await api(live[0].url, owner, 'GET', `/api/conversations/${conversationId}/messages${q}`)).body;
        for (const m of page.messages) {
          if (ids.has(m.id) || seqs.has(m.seq)) storeDuplicates += 1;
          ids.add(m.id); seqs.add(m.seq);
        }
        if (!page.nextBeforeSeq) break;
        before = page.nextBeforeSeq;
      }
      assert.equal(ids.size, lastSeq.get(conversationId) ?? 0, `conversation ${c}: stored ${ids.size}, last acked seq ${lastSeq.get(conversationId)}`);
    }
    const sent = acked.size;
    console.log(`# ${CLIENTS} clients, ${conversations.length} conversations, ${sent} messages acked; lost ${lost}, live duplicates ${stats.liveDuplicates}, store duplicates ${storeDuplicates}, refused reconnect attempts ${stats.refusedReconnects}`);
    for (const r of report) {
      console.log(`# drain (${r.how}): ${r.clients} clients, ${r.reconnected} reconnected (${r.failed} failed attempts), peak ${r.peakPerSecond}/s (budget ${r.budget}/s), ${r.elapsedMs} ms`);
      console.log(`#   reconnected per second: ${r.perSecond}`);
      console.log(`#   reconnects begun per second: ${r.startedPerSecond}`);
      console.log(`#   ${r.latency}; the clients' event loop lagged ${r.clientLoopDelayMs} ms`);
    }
    assert.equal(lost, 0);
    assert.equal(stats.liveDuplicates, 0);
    assert.equal(storeDuplicates, 0);
    for (const d of devices) d.client?.close();
  });
});
