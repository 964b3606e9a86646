// A worker thread holding a share of the drain-fleet test's devices (tests/js/drain-fleet.test.mjs).
// Thousands of clients in one event loop make the loop itself late: a late timer is a late
// reconnect, and late reconnects bunch into one second. So the devices are split over worker
// threads, each with its own loop; the test thread only orchestrates.
//
// Each device follows the drain contract: on `server_draining` it waits `reconnectAfterMs`,
// closes, and connects to another ready gateway with its last contiguous seq as the resume
// cursor: the server attaches it to its conversation and replays what it missed (no join, no
// sync).
//
// Every entry of the log counts, messages and changes alike (edits, deletions, reactions take
// seqs of the same gap-free sequence): a device holds each entry by seq and applies them to its
// view of the conversation in seq order, which the test compares with the store at the end.
// The test thread calls in with {id, op, ...}; every call is answered with {id, result} or
// {id, error}.
import { parentPort, workerData } from 'node:worker_threads';
import { randomUUID } from 'node:crypto';
import { monitorEventLoopDelay } from 'node:perf_hooks';
import { token, sleep } from './gateway.mjs';
import { socketio, ws } from './clients.mjs';
import { LOG_EVENTS, View, entryKey, syncedEntries } from './log-view.mjs';

const { users, conversations, sendEveryMs, senderOffset, reactorOffset, members, worker } = workerData;

let live = []; // URLs of the gateways accepting connections: what a Service routes to
let routed = worker; // this worker's round-robin position
let phase = null; // {url, t0}: the drain being measured
let reconnects = [];
let failures = [];
let drains = 0; // drains armed so far
/** gapsBy: gaps counted by the entry the device lacked and when (before the first drain, or since drain #n began). */
const stats = { refusedReconnects: 0, liveDuplicates: 0, duplicateSamples: [], gapSyncs: 0, gapSamples: [], gapsBy: {} };

class Device {
  constructor(user) {
    this.user = user;
    this.tok = token(user.id);
    this.conversationId = conversations[user.conv];
    this.seen = new Map(); // seq → entryKey: every entry of the log this device holds
    this.ahead = new Map(); // seq → [event, payload]: held past a gap, not yet in the view
    this.applied = 0; // entries 1..applied are in the view: the last contiguous seq
    this.view = new View(user.id);
    this.liveSeqs = new Set();
    this.moves = 0; this.drainings = 0; this.url = null; this.client = null; this.ready = null;
    this.kind = user.index % 4 === 3 ? ws : socketio; // a quarter on the plain WebSocket
    this.transport = this.kind === ws ? 'ws' : 'socketio';
  }

  record(name, p) {
    if (p.conversationId !== this.conversationId) return;
    const key = entryKey(name, p);
    const had = this.seen.get(p.seq);
    if (had !== undefined) {
      if (had !== key) throw new Error(`seq ${p.seq} is two entries: ${had} and ${key}`);
      return;
    }
    this.seen.set(p.seq, key);
    this.ahead.set(p.seq, [name, p]);
    // Into the view in seq order only: a change carries absolute state (an edit's content, an
    // emoji's count after it), so an earlier entry applied after a later one would undo it.
    while (this.ahead.has(this.applied + 1)) {
      const [n, entry] = this.ahead.get(this.applied + 1);
      this.ahead.delete(this.applied + 1);
      this.view.apply(n, entry);
      this.applied += 1;
    }
  }

  contiguous() { return this.applied; }

  async connect(url) {
    const generation = (this.generation ?? 0) + 1;
    this.generation = generation;
    // The replay arrives before the handshake's promise settles: events are this connection's
    // by generation, not by the client object.
    const onEvent = (name, payload) => {
      if (generation !== this.generation) return;
      if (LOG_EVENTS.includes(name)) this.onLive(name, payload);
      else if (name === 'server_draining') this.onDraining(payload);
    };
    const cursors = { [this.conversationId]: this.contiguous() };
    const client = await this.kind(url, this.tok, { keep: false, onEvent, cursors });
    if (generation !== this.generation) { client.close(); throw new Error('superseded'); }
    this.connectedAt = Date.now();
    this.client = client; this.url = url;
  }

  onLive(name, p) {
    // One connection (`moves` counts them) delivers each entry once, live or replayed.
    const key = `${p.seq}:${this.moves}`;
    if (this.liveSeqs.has(key)) {
      stats.liveDuplicates += 1;
      if (stats.duplicateSamples.length < 5) {
        stats.duplicateSamples.push({ device: this.user.index, transport: this.transport, event: name, seq: p.seq, moves: this.moves, actor: (p.senderId ?? p.userId) === this.user.id, contiguous: this.contiguous() });
      }
    }
    this.liveSeqs.add(key);
    const before = this.contiguous();
    this.record(name, p);
    // The client contract (DESIGN): a gap in seq means something is missing, and `sync` fills
    // it. Counted and reported: a gap is a live delivery that did not happen.
    if (p.seq > before + 1 && !this.filling) this.fill(before);
  }

  async fill(after) {
    this.filling = true;
    stats.gapSyncs += 1;
    const when = drains ? `since drain #${drains}` : 'before the first drain';
    if (stats.gapSamples.length < 5) stats.gapSamples.push({ device: this.user.index, transport: this.transport, after, url: this.url, when });
    let lacked = 'unfilled';
    try {
      for (let attempt = 0; attempt < 20;) {
        const synced = await this.client?.request('sync', { conversations: [{ conversationId: this.conversationId, afterSeq: after }] }, 5000)
          .catch(() => null); // moved under it: retry on the next connection
        if (synced?.messages) {
          // Messages as they are now and the change entries, each recorded at its seq.
          const entries = syncedEntries(synced);
          if (lacked === 'unfilled') lacked = entries.find(([, p]) => p.seq === after + 1)?.[0] ?? 'none';
          for (const [name, p] of entries) this.record(name, p);
          if (!synced.truncated || !entries.length) return;
          after = entries.at(-1)[1].seq; // a page of the log: the rest follows
          continue;
        }
        attempt += 1;
        await sleep(200);
      }
    } finally {
      const by = `${lacked} ${when}`;
      stats.gapsBy[by] = (stats.gapsBy[by] ?? 0) + 1;
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

const REACTIONS = ['👍', '🎉', ':eyes:'];
const pick = (xs) => xs[Math.floor(Math.random() * xs.length)];

/**
 * One conversation's traffic, an entry every `sendEveryMs`: its sender sends (about half the
 * entries), edits and deletes its own messages, and it and one more member react and take
 * reactions back. One request at a time, each retried with the same payload across moves
 * (edits and reactions carry a clientMsgId, a second deletion returns the tombstone), so the
 * state known here is the store's and every request commits an entry.
 */
async function converse(sender, reactor) {
  const { conversationId } = sender;
  const alive = []; // seqs of the sender's messages not deleted
  const reacting = new Set(); // `${userId} ${target} ${emoji}` now on
  while (sending) {
    const roll = Math.random();
    let device = sender;
    let event;
    let payload;
    if (alive.length < 3 || roll < 0.5) {
      const clientMsgId = randomUUID();
      [event, payload] = ['send_message', { content: `m ${clientMsgId}`, type: 'text', clientMsgId }];
    } else if (roll < 0.7) {
      const clientMsgId = randomUUID();
      [event, payload] = ['edit_message', { seq: pick(alive), content: `e ${clientMsgId}`, clientMsgId }];
    } else if (roll < 0.93) {
      device = pick([sender, reactor].filter(Boolean));
      const [target, emoji] = [pick(alive), pick(REACTIONS)];
      const on = !reacting.has(`${device.user.id} ${target} ${emoji}`);
      [event, payload] = ['react', { target, emoji, on, clientMsgId: randomUUID() }];
    } else {
      [event, payload] = ['delete_message', { seq: pick(alive) }];
    }
    const ack = await device.request(event, { conversationId, ...payload });
    const [name, entry] = ack?.message ? ['new_message', ack.message] : [ack?.change?.type, ack?.change];
    if (!entry) throw new Error(`${event} ${JSON.stringify(payload)} committed nothing: ${JSON.stringify(ack)}`);
    if (name === 'new_message') alive.push(entry.seq);
    if (name === 'message_deleted') alive.splice(alive.indexOf(entry.target), 1);
    if (name === 'reaction_updated') {
      const key = `${entry.userId} ${entry.target} ${entry.emoji}`;
      if (entry.on) reacting.add(key); else reacting.delete(key);
    }
    acked.push({ conversationId, seq: entry.seq, key: entryKey(name, entry), event: name });
    await sleep(sendEveryMs);
  }
}

const ops = {
  async live({ urls }) { live = urls; },

  /** Connects every device to the gateway at urls[user.index % urls.length], 100 at a time. */
  async connect({ urls }) {
    for (let i = 0; i < devices.length; i += 100) {
      await Promise.all(devices.slice(i, i + 100).map((d) => d.connect(urls[d.user.index % urls.length])));
    }
  },

  /** The traffic of every conversation whose sending member lives here (see `converse`). */
  async startSending() {
    sending = true;
    const reactors = new Map(devices.filter((d) => d.user.index % members === reactorOffset).map((d) => [d.conversationId, d]));
    senders = devices.filter((d) => d.user.index % members === senderOffset)
      .map((d) => converse(d, reactors.get(d.conversationId)).catch((e) => { sendError ??= e; }));
  },

  /** Before a drain: which devices are on `url`; the clock starts at t0 (the test thread's). */
  async arm({ url, t0 }) {
    reconnects = [];
    failures = [];
    drains += 1;
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

  /** Waits (≤ 15 s) until every device has its conversation's last acked seq. */
  async settle({ lastSeq }) {
    const last = (d) => lastSeq[d.conversationId] ?? 0;
    const started = Date.now();
    while (Date.now() - started < 15000 && devices.some((d) => d.contiguous() < last(d))) await sleep(100);
    return { waitedMs: Date.now() - started, ...stats };
  },

  /**
   * Acked entries each device lacks: the entry at each acked seq must be the one acked (a
   * message by id, a change by what it changed).
   */
  async losses({ entries }) {
    let lost = 0;
    let lostChanges = 0;
    const losses = [];
    const byConversation = new Map();
    for (const e of entries) {
      if (!byConversation.has(e.conversationId)) byConversation.set(e.conversationId, []);
      byConversation.get(e.conversationId).push(e);
    }
    for (const d of devices) {
      const missing = (byConversation.get(d.conversationId) ?? []).filter((e) => d.seen.get(e.seq) !== e.key);
      lost += missing.length;
      lostChanges += missing.filter((e) => e.event !== 'new_message').length;
      if (missing.length && losses.length < 10) {
        losses.push({ device: d.user.index, transport: d.client?.transport, moves: d.moves, gateway: d.url, missing: missing.sort((a, b) => a.seq - b.seq).map((e) => `${e.seq} ${e.event}`).join(','), contiguous: d.contiguous() });
      }
    }
    return { lost, lostChanges, losses };
  },

  /**
   * Devices whose view differs from the store's: `states[conversationId]` holds what history
   * returns to each member who reacted (by user id) and, as `others`, to one who never did.
   */
  async converged({ states }) {
    let diverged = 0;
    const samples = [];
    for (const d of devices) {
      const truth = states[d.conversationId];
      const expected = truth[d.user.id] ?? truth.others;
      const seen = d.view.state();
      if (JSON.stringify(seen) === JSON.stringify(expected)) continue;
      diverged += 1;
      if (samples.length < 5) {
        const at = seen.findIndex((m, i) => JSON.stringify(m) !== JSON.stringify(expected[i]));
        const first = at === -1 ? seen.length : at;
        samples.push({ device: d.user.index, transport: d.transport, moves: d.moves, messages: `${seen.length} of ${expected.length}`, deviceHas: seen[first], storeHas: expected[first] });
      }
    }
    return { diverged, samples };
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
