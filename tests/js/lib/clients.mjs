// One client interface over the transports, so every scenario runs against each of them:
// request(event, payload) → ack, recorded server events, waitFor(name, predicate).
import { io } from 'socket.io-client';
import WebSocket from 'ws';

class Recorded {
  /** keep: store every event (for `of`); off for load tests that only need `onEvent`. */
  constructor({ keep = true, onEvent } = {}) { this.events = []; this.waiters = []; this.keep = keep; this.onEvent = onEvent; }
  push(name, payload) {
    if (this.keep) this.events.push({ name, payload });
    this.onEvent?.(name, payload);
    this.waiters = this.waiters.filter((w) => {
      if (w.name === name && w.pred(payload)) { w.resolve(payload); return false; }
      return true;
    });
  }
  of(name, pred = () => true) { return this.events.filter((e) => e.name === name && pred(e.payload)).map((e) => e.payload); }
  waitFor(name, pred = () => true, timeoutMs = 5000) {
    const seen = this.of(name, pred);
    if (seen.length) return Promise.resolve(seen[0]);
    return new Promise((resolve, reject) => {
      const timer = setTimeout(() => reject(new Error(`no ${name} within ${timeoutMs} ms; got: ${this.events.map((e) => e.name).join(', ')}`)), timeoutMs);
      this.waiters.push({ name, pred, resolve: (p) => { clearTimeout(timer); resolve(p); } });
    });
  }
}

/** The stock socket.io-client 4.x. */
/** options.cursors: resume cursors {conversationId: lastSeq} sent in the handshake's auth. */
export async function socketio(url, tok, { transports = ['websocket'], namespace = '/', headers, keep, onEvent, cursors } = {}) {
  const rec = new Recorded({ keep, onEvent });
  const socket = io(`${url}${namespace === '/' ? '' : namespace}`, {
    auth: tok === undefined ? undefined : { token: tok, ...(cursors ? { cursors } : {}) },
    transports,
    reconnection: false,
    forceNew: true,
    extraHeaders: headers,
  });
  socket.onAny((name, payload) => rec.push(name, payload));
  const disconnected = new Promise((resolve) => socket.on('disconnect', (reason) => resolve(reason)));
  await new Promise((resolve, reject) => {
    socket.once('connect', resolve);
    socket.once('connect_error', (err) => reject(Object.assign(new Error(err.message), { connectError: err })));
  });
  return {
    transport: 'socket.io',
    socket,
    events: rec,
    disconnected,
    request: (event, payload, timeoutMs = 5000) => socket.timeout(timeoutMs).emitWithAck(event, payload),
    /** Sends raw arguments (for malformed-input tests). */
    requestRaw: (event, args, timeoutMs = 5000) => socket.timeout(timeoutMs).emitWithAck(event, ...args),
    sendRaw: (frame) => socket.io.engine.write(frame),
    waitFor: (n, p, t) => rec.waitFor(n, p, t),
    of: (n, p) => rec.of(n, p),
    close: () => socket.disconnect(),
  };
}

/**
 * The stock npm `ws` client on the plain WebSocket transport: JSON frames {type, id?, payload}.
 * options.auth: where the token goes — 'query' (?token=), 'header' (Authorization: Bearer) or
 * 'frame' (a first {"type":"auth"} frame). Resolves once the `connected` frame arrives; rejects
 * with "close CODE: REASON" when the server closes first, or "HTTP STATUS" when it refuses the
 * upgrade. options.cursors: resume cursors {conversationId: lastSeq}, in the auth frame when the
 * token goes there, else as ?cursors=<JSON>.
 */
export async function ws(url, tok, { auth = 'query', headers = {}, perMessageDeflate = false, autoPong = true, path = '/ws', keep = true, onEvent, cursors } = {}) {
  const rec = new Recorded({ keep, onEvent });
  const target = new URL(path, url.replace(/^http/, 'ws'));
  if (tok !== undefined && auth === 'query') target.searchParams.set('token', tok);
  if (cursors && auth !== 'frame') target.searchParams.set('cursors', JSON.stringify(cursors));
  const allHeaders = { ...headers };
  if (tok !== undefined && auth === 'header') allHeaders.authorization = `Bearer ${tok}`;
  const socket = new WebSocket(target, { headers: allHeaders, perMessageDeflate, autoPong });
  let nextId = 1;
  const pending = new Map();
  const frames = [];
  let upgradeHeaders = {};
  socket.on('upgrade', (res) => { upgradeHeaders = res.headers; });
  socket.on('message', (data, isBinary) => {
    const text = data.toString();
    let f;
    try { f = JSON.parse(text); } catch { rec.push('unparsable', text); return; }
    if (keep) frames.push(f);
    if ((f.type === 'ack' || f.type === 'error') && f.id !== undefined && pending.has(f.id)) {
      const p = pending.get(f.id);
      pending.delete(f.id);
      // Same shape as a Socket.IO ack: the payload, or {error: {code, message}}.
      p.resolve(f.type === 'ack' ? f.payload : { error: f.payload });
      return;
    }
    rec.push(f.type, f.payload);
  });
  const disconnected = new Promise((resolve) => socket.on('close', (code, reason) => {
    for (const p of pending.values()) p.reject(new Error(`closed with ${code} before the answer`));
    pending.clear();
    resolve(`close ${code}: ${reason.toString()}`);
  }));
  await new Promise((resolve, reject) => {
    const fail = (e) => { clearTimeout(timer); reject(e); };
    const timer = setTimeout(() => fail(new Error('no connected frame within 10 s')), 10000);
    socket.once('open', () => { if (tok !== undefined && auth === 'frame') socket.send(JSON.stringify({ type: 'auth', payload: { token: tok, ...(cursors ? { cursors } : {}) } })); });
    rec.waitFor('connected', () => true, 10000).then(() => { clearTimeout(timer); resolve(); }, () => {});
    disconnected.then((why) => fail(new Error(why)));
    socket.once('unexpected-response', (req, res) => { req.destroy(); fail(Object.assign(new Error(`HTTP ${res.statusCode}`), { status: res.statusCode })); });
    socket.on('error', (e) => fail(e));
  });
  const request = (event, payload, timeoutMs = 5000) => {
    const id = nextId++;
    return new Promise((resolve, reject) => {
      const timer = setTimeout(() => { pending.delete(id); reject(new Error(`no answer to ${event} #${id} within ${timeoutMs} ms`)); }, timeoutMs);
      pending.set(id, { resolve: (v) => { clearTimeout(timer); resolve(v); }, reject: (e) => { clearTimeout(timer); reject(e); } });
      socket.send(JSON.stringify({ type: event, id, payload }));
    });
  };
  return {
    transport: 'ws',
    socket,
    events: rec,
    disconnected,
    frames,
    upgradeHeaders: () => upgradeHeaders,
    request,
    /** Sends a frame as given: an object is JSON-encoded, a string or Buffer goes as is. */
    sendRaw: (frame, options = {}) => socket.send(typeof frame === 'object' && !Buffer.isBuffer(frame) ? JSON.stringify(frame) : frame, options),
    waitFor: (n, p, t) => rec.waitFor(n, p, t),
    of: (n, p) => rec.of(n, p),
    close: () => socket.close(),
  };
}

export const transports = { 'socket.io': socketio, ws };
