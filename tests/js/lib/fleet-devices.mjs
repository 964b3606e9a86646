// A worker thread holding a share of the drain-fleet test's devices (tests/js/drain-fleet.test.mjs).
// Thousands of clients in one event loop make the loop itself late: a late timer is a late
// reconnect, and late reconnects bunch into one second. So the devices are split over worker
// threads, each with its own loop; the test thread only orchestrates.
//
// Each device follows the drain contract: on `server_draining` it waits `reconnectAfterMs`,
// closes, and connects to another ready gateway with its last contiguous seq as the resume
// cursor: the server attaches it to its conversation and replays what it missed (no join, no
// sync).
// The test thread calls in with {id, op, ...}; every call is answered with {id, result} or
// {id, error}.
import { parentPort, workerData } from 'node:worker_threads';
import { randomUUID } from 'node:crypto';
import { monitorEventLoopDelay } from 'node:perf_hooks';
import { token, sleep } from './gateway.mjs';
import { socketio, ws } from './clients.mjs';

const { users, conversations, sendEveryMs, senderOffset, members, worker } = workerData;

let live = []; // URLs of the gateways accepting connections: what a Service routes to
let routed = worker; // this worker's round-robin position
let phase = null; // {url, t0}: the drain being measured
let reconnects = [];
let failures = [];
const stats = { refusedReconnects: 0, liveDuplicates: 0, duplicateSamples: [], gapSyncs: 0, gapSamples: [] };

class Device {
  constructor(user) {
    this.user = user;
    this.tok = token(user.id);
    this.conversationId = conversations[user.conv];
    this.seen = new Map(); // seq → id
    this.liveIds = new Set();
    this.moves = 0; this.drainings = 0; this.url = null; this.client = null; this.ready = null;
    this.kind = user.index % 4 === 3 ? ws : socketio; // a quarter on the plain WebSocket
    this.transport = this.kind === ws ? 'ws' : 'socketio';
  }

  record(m) {
    if (m.conversationId !== this.conversationId) return;
    const had = this.seen.get(m.seq);
    if (had !== undefined && had !== m.id) throw new Error(`seq ${m.seq} has two ids`);
    this.seen.set(m.seq, m.id);
  }

  contiguous() { let s = 0; while (this.seen.has(s + 1)) s += 1; return s; }

  async connect(url) {
    const generation = (this.generation ?? 0) + 1;
    this.generation = generation;
    // The replay arrives before the handshake's promise settles: events are this connection's
    // by generation, not by the client object.
    const onEvent = (name, payload) => {
      if (generation !== this.generation) return;
      if (name === 'new_message') this.onLive(payload);
      else if (name === 'server_draining') this.onDraining(payload);
    };
    const cursors = { [this.conversationId]: this.contiguous() };
    const client = await this.kind(url, this.tok, { keep: false, onEvent, cursors });
    if (generation !== this.generation) { client.close(); throw new Error('superseded'); }
    this.connectedAt = Date.now();
    this.client = client; this.url = url;
  }

  onLive(m) {
    const key = `${this.transport}:${m.id}:${this.moves}`;
    if (this.liveIds.has(key)) {
      stats.liveDuplicates += 1;
      if (stats.duplicateSamples.length < 5) {
        stats.duplicateSamples.push({ device: this.user.index, transport: this.transport, seq: m.seq, moves: this.moves, sender: m.senderId === this.user.id, contiguous: this.contiguous() });
      }
    }
    this.liveIds.add(key);
    const before = this.contiguous();
    this.record(m);
    // The client contract (DESIGN): a gap in seq means something is missing, and `sync` fills
    // it. Counted and reported: a gap is a live delivery that did not happen.
    if (m.seq > before + 1 && !this.filling) this.fill(before);
  }

  async fill(after) {
    this.filling = true;
    stats.gapSyncs += 1;
    if (stats.gapSamples.length < 5) stats.gapSamples.push({ device: this.user.index, transport: this.transport, after, url: this.url });
    try {
      for (let attempt = 0; attempt < 20; attempt += 1) {
        const c = this.client;
        if (c) {
          try {
            const synced = await c.request('sync', { conversations: [{ conversationId: this.conversationId, afterSeq: after }] }, 5000);
            if (synced?.messages) { for (const m of synced.messages) this.record(m); return; }
          } catch { /* moved under it: retry on the next connection */ }
        }
        await sleep(200);
      }
    } finally {
      this.filling = false;
    }
  }

  onDraining({ reconnectAfterMs }) {
    this.drainings += 1;
    this.ready = (async () => {
      await sleep(reconnectAfterMs);
      const from = this.url;
      const old = this.client;
      this.client = null;
      this.generation += 1; // what the old connection still delivers is not counted
      old?.close();
      this.moves += 1;
      const startedAt = Date.now();
      let failed = 0;
      for (let attempt = 0; ; attempt += 1) {
        // Like a Service: the next ready gateway in turn.
        const others = live.filter((u) => u !== from);
        const target = others[(routed++) % others.length];
        try {
          await this.connect(target);
          break;
        } catch (e) {
          stats.refusedReconnects += 1;
          failed += 1;
          if (failures.length < 5) failures.push(String(e?.message ?? e));
          if (attempt > 20) throw e;
          await sleep(200);
        }
      }
      if (phase) {
        // The reconnect is the new connection's handshake, which carries the resume.
        reconnects.push({
          startedAt: startedAt - phase.t0, at: this.connectedAt - phase.t0, failed,
          handshakeMs: this.connectedAt - startedAt,
        });
      }
    })();
    this.ready.catch(() => {}); // awaited (and reported) by `drained`
  }

  /** A request that survives the device moving: retried (same payload) on the next connection. */
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

const devices = users.map((u) => new Device(u));
const acked = [];
let sending = false;
let senders = [];
let sendError = null;
let armed = null; // the drain being waited for: {mine, told, movesBefore, lag}

const ops = {
  async live({ urls }) { live = urls; },

  /** Connects every device to the gateway at urls[user.index % urls.length], 100 at a time. */
  async connect({ urls }) {
    for (let i = 0; i < devices.length; i += 100) {
      await Promise.all(devices.slice(i, i + 100).map((d) => d.connect(urls[d.user.index % urls.length])));
    }
  },

  /** One sender per conversation whose sending member lives here. */
  async startSending() {
    sending = true;
    senders = devices.filter((d) => d.user.index % members === senderOffset).map(async (d) => {
      while (sending) {
        const clientMsgId = randomUUID();
        const ack = await d.request('send_message', { conversationId: d.conversationId, content: `m ${clientMsgId}`, type: 'text', clientMsgId });
        if (!ack?.message) throw new Error(`send refused: ${JSON.stringify(ack)}`);
        acked.push({ conversationId: ack.message.conversationId, seq: ack.message.seq, id: ack.message.id });
        await sleep(sendEveryMs);
      }
    }).map((p) => p.catch((e) => { sendError ??= e; }));
  },

  /** Before a drain: which devices are on `url`; the clock starts at t0 (the test thread's). */
  async arm({ url, t0 }) {
    reconnects = [];
    failures = [];
    phase = { url, t0 };
    const mine = devices.filter((d) => d.url === url && d.client);
    const lag = monitorEventLoopDelay({ resolution: 10 });
    lag.enable();
    armed = { mine, told: mine.map((d) => d.drainings), movesBefore: devices.map((d) => d.moves), lag };
    return { n: mine.length };
  },

  /** Waits for every armed device to be told, to move and to sync; reports what it measured. */
  async drained() {
    const { mine, told, movesBefore, lag } = armed;
    for (let waited = 0; mine.some((d, i) => d.drainings === told[i]); waited += 50) {
      if (waited >= 5000) {
        const silent = mine.filter((d, i) => d.drainings === told[i]);
        throw new Error(`${silent.length} of ${mine.length} clients never got server_draining: ${JSON.stringify(silent.slice(0, 5).map((d) => ({ t: d.client?.transport, connected: d.client?.socket.connected ?? d.client?.socket.readyState })))}`);
      }
      await sleep(50);
    }
    await Promise.all(mine.map((d) => d.ready));
    lag.disable();
    const moved = devices.filter((d, i) => d.moves !== movesBefore[i]);
    return {
      n: mine.length,
      moved: moved.length,
      movedOnce: moved.every((d) => d.moves === movesBefore[devices.indexOf(d)] + 1),
      movedWereMine: moved.every((d) => mine.includes(d)),
      reconnects,
      failures,
      lagP99Ms: lag.percentile(99) / 1e6,
      lagMaxMs: lag.max / 1e6,
    };
  },

  async stopSending() {
    sending = false;
    await Promise.all(senders);
    if (sendError) throw sendError;
    return { acked };
  },

  /** Waits (≤ 15 s) until every device has each conversation's last acked seq, then counts losses. */
  /** Waits until every device has a live message of its conversation: all are attached. */
  async attached() {
    const started = Date.now();
    while (devices.some((d) => d.contiguous() < 1)) {
      if (Date.now() - started > 30000) {
        const silent = devices.filter((d) => d.contiguous() < 1);
        const by = (f) => Object.entries(silent.reduce((a, d) => { a[f(d)] = (a[f(d)] ?? 0) + 1; return a; }, {}));
        throw new Error(`${silent.length} devices received nothing in 30 s: by conversation ${JSON.stringify(by((d) => d.user.conv))}, by gateway ${JSON.stringify(by((d) => d.url))}, by transport ${JSON.stringify(by((d) => d.transport))}`);
      }
      await sleep(100);
    }
    return { waitedMs: Date.now() - started };
  },

  async settle({ lastSeq }) {
    const last = (d) => lastSeq[d.conversationId] ?? 0;
    const started = Date.now();
    while (Date.now() - started < 15000 && devices.some((d) => d.contiguous() < last(d))) await sleep(100);
    return { waitedMs: Date.now() - started, ...stats };
  },

  /** Acked messages each device lacks (seq → id must match the ack). */
  async losses({ messages }) {
    let lost = 0;
    const losses = [];
    const byConversation = new Map();
    for (const m of messages) {
      if (!byConversation.has(m.conversationId)) byConversation.set(m.conversationId, []);
      byConversation.get(m.conversationId).push(m);
    }
    for (const d of devices) {
      const missing = (byConversation.get(d.conversationId) ?? []).filter((m) => d.seen.get(m.seq) !== m.id).map((m) => m.seq);
      lost += missing.length;
      if (missing.length && losses.length < 10) {
        losses.push({ device: d.user.index, transport: d.client?.transport, moves: d.moves, gateway: d.url, missing: missing.sort((a, b) => a - b).join(','), contiguous: d.contiguous() });
      }
    }
    return { lost, losses };
  },

  async close() {
    for (const d of devices) d.client?.close();
  },
};

parentPort.on('message', async ({ id, op, ...args }) => {
  try {
    parentPort.postMessage({ id, result: await ops[op](args) });
  } catch (e) {
    parentPort.postMessage({ id, error: String(e?.stack ?? e) });
  }
});
