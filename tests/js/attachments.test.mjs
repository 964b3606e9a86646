// Attachments end to end with the stock clients: uploads over HTTP and as Socket.IO binary
// attachments, file and image messages, downloads with ranges and safe headers, thumbnails,
// the limits, and what is (not) stored, read from the gateway's local attachment directory.
import { describe, it, before, after } from 'node:test';
import assert from 'node:assert/strict';
import { createHash, randomUUID } from 'node:crypto';
import { readdirSync, existsSync } from 'node:fs';
import { join } from 'node:path';
import { request as httpRequest } from 'node:http';
import { spawn } from 'node:child_process';
import { createServer } from 'node:net';
import { homedir } from 'node:os';
import { startGateway, token, api } from './lib/gateway.mjs';
import { socketio, ws } from './lib/clients.mjs';
import { png, pngSize } from './lib/images.mjs';

const uid = (p) => `${p}-${randomUUID().slice(0, 8)}`;
const sha256 = (buf) => createHash('sha256').update(buf).digest('hex');
/** Small, so the over-limit case is quick; the default (10 MiB) is checked by the Rust tests. */
const LIMIT = 256 * 1024;

describe('attachments', () => {
  let gw;
  before(async () => {
    gw = await startGateway({
      env: {
        CONFAB_MAX_ATTACHMENT_BYTES: String(LIMIT),
        // Socket.IO uploads are capped by the frame limit: room for the 100 KiB one below.
        CONFAB_MAX_FRAME_BYTES: String(512 * 1024),
        CONFAB_API_REQUEST_BURST: '1000',
        CONFAB_MESSAGE_BURST: '1000',
      },
    });
  });
  after(async () => { await gw.stop(); });

  /** Objects in the local store, and temp files of uploads in progress. */
  const objects = () => {
    const dir = join(gw.dataDir, 'attachments', 'objects');
    if (!existsSync(dir)) return 0;
    return readdirSync(dir).reduce((n, shard) => n + readdirSync(join(dir, shard)).length, 0);
  };
  const temps = () => readdirSync(join(gw.dataDir, 'attachments', 'tmp')).length;

  async function upload(tok, conversationId, name, body, contentType = 'application/octet-stream', extra = {}) {
    const res = await fetch(`${gw.url}/api/conversations/${conversationId}/attachments?name=${encodeURIComponent(name)}`, {
      method: 'POST',
      headers: { authorization: `Bearer ${tok}`, 'content-type': contentType, ...extra.headers },
      body,
      ...(extra.duplex ? { duplex: extra.duplex } : {}),
    });
    const text = await res.text();
    let parsed = text;
    try { parsed = JSON.parse(text); } catch { /* not JSON */ }
    return { status: res.status, body: parsed };
  }

  async function download(tok, path, headers = {}) {
    const res = await fetch(`${gw.url}${path}`, { headers: { authorization: `Bearer ${tok}`, ...headers } });
    return { status: res.status, headers: res.headers, bytes: Buffer.from(await res.arrayBuffer()) };
  }

  /** A group of alice and bob, both connected with the given client. */
  async function team(connect = socketio) {
    const [a, b] = [uid('alice'), uid('bob')];
    const [ta, tb] = [token(a, { name: 'Alice' }), token(b, { name: 'Bob' })];
    const created = await api(gw.url, ta, 'POST', '/api/conversations', { kind: 'group', title: 'Files', members: [b] });
    assert.equal(created.status, 201, JSON.stringify(created.body));
    const conversationId = created.body.conversation.id;
    const alice = await connect(gw.url, ta);
    const bob = await connect(gw.url, tb);
    return { a, b, ta, tb, alice, bob, conversationId };
  }

  it('uploads an image over HTTP, sends it, and another member receives and downloads it', async () => {
    const { alice, bob, ta, tb, a, conversationId } = await team();
    const image = png(40, 30);
    const up = await upload(ta, conversationId, 'chart.png', image, 'image/png');
    assert.equal(up.status, 201, JSON.stringify(up.body));
    const att = up.body.attachment;
    assert.equal(att.conversationId, conversationId);
    assert.equal(att.name, 'chart.png');
    assert.equal(att.contentType, 'image/png');
    assert.equal(att.size, image.length);
    assert.equal(att.sha256, sha256(image));
    assert.deepEqual([att.width, att.height], [40, 30]);
    assert.equal(att.uploaderId, a);

    const clientMsgId = randomUUID();
    const ack = await alice.request('send_message', { conversationId, type: 'image', attachmentId: att.id, content: 'the chart', clientMsgId });
    assert.equal(ack.error, undefined, JSON.stringify(ack));
    const carried = { id: att.id, name: 'chart.png', contentType: 'image/png', size: image.length, width: 40, height: 30 };
    assert.deepEqual(ack.message.attachment, carried);
    assert.equal(ack.message.type, 'image');
    const got = await bob.waitFor('new_message', (m) => m.clientMsgId === clientMsgId);
    assert.deepEqual(got.attachment, carried);
    assert.equal(got.content, 'the chart');

    const file = await download(tb, `/api/attachments/${att.id}`);
    assert.equal(file.status, 200);
    assert.ok(file.bytes.equals(image), 'the downloaded bytes are the uploaded ones');
    assert.equal(file.headers.get('content-type'), 'image/png');
    assert.equal(file.headers.get('x-content-type-options'), 'nosniff');
    assert.equal(file.headers.get('content-security-policy'), "default-src 'none'; sandbox");
    assert.match(file.headers.get('content-disposition'), /^inline; filename="chart.png"/);
    assert.equal(file.headers.get('accept-ranges'), 'bytes');

    const part = await download(tb, `/api/attachments/${att.id}`, { range: 'bytes=8-23' });
    assert.equal(part.status, 206);
    assert.ok(part.bytes.equals(image.subarray(8, 24)));
    assert.equal(part.headers.get('content-range'), `bytes 8-23/${image.length}`);
    const tail = await download(tb, `/api/attachments/${att.id}`, { range: 'bytes=-4' });
    assert.ok(tail.bytes.equals(image.subarray(image.length - 4)));
    const past = await download(tb, `/api/attachments/${att.id}`, { range: `bytes=${image.length}-` });
    assert.equal(past.status, 416);
    assert.equal(past.headers.get('content-range'), `bytes */${image.length}`);
    alice.close(); bob.close();
  });

  it('uploads over Socket.IO as a binary attachment, and a file is served as a download', async () => {
    const { alice, bob, tb, conversationId } = await team();
    const notes = Buffer.from('minutes: ship attachments\n'.repeat(4000)); // ~100 KiB, one binary frame
    const ack = await alice.socket.timeout(5000).emitWithAck('upload_attachment', {
      conversationId, name: 'minutes.txt', contentType: 'text/plain', data: notes,
    });
    assert.equal(ack.error, undefined, JSON.stringify(ack));
    assert.equal(ack.attachment.contentType, 'text/plain');
    assert.equal(ack.attachment.size, notes.length);
    assert.equal(ack.attachment.sha256, sha256(notes));
    assert.equal(ack.attachment.width, undefined);

    const clientMsgId = randomUUID();
    const sent = await alice.request('send_message', { conversationId, type: 'file', attachmentId: ack.attachment.id, clientMsgId });
    // No caption: an empty `content` is left out of the message, as a deleted message's is.
    assert.equal(sent.message.content, undefined);
    const got = await bob.waitFor('new_message', (m) => m.clientMsgId === clientMsgId);
    assert.deepEqual(got.attachment, { id: ack.attachment.id, name: 'minutes.txt', contentType: 'text/plain', size: notes.length });

    const file = await download(tb, `/api/attachments/${ack.attachment.id}`);
    assert.ok(file.bytes.equals(notes));
    assert.equal(file.headers.get('content-type'), 'text/plain; charset=utf-8');
    assert.match(file.headers.get('content-disposition'), /^attachment; filename="minutes.txt"/);
    const thumb = await download(tb, `/api/attachments/${ack.attachment.id}/thumbnail`);
    assert.equal(thumb.status, 404, 'a text file has no thumbnail');

    // A disguised type over the socket too.
    const html = await alice.socket.timeout(5000).emitWithAck('upload_attachment', {
      conversationId, name: 'cat.png', contentType: 'image/png', data: Buffer.from('<html><script>alert(1)</script></html>'),
    });
    assert.equal(html.error.code, 'invalid');
    alice.close(); bob.close();
  });

  it('closes a Socket.IO session whose upload is over the frame cap, storing nothing: larger files go over HTTP', async () => {
    const { alice, bob, conversationId } = await team();
    const before = objects();
    alice.socket.emit('upload_attachment', { conversationId, name: 'big.bin', data: Buffer.alloc(600 * 1024, 5) });
    const reason = await Promise.race([alice.disconnected, new Promise((r) => setTimeout(() => r('still connected'), 5000))]);
    assert.notEqual(reason, 'still connected');
    assert.equal(objects(), before);
    bob.close();
  });

  it('answers upload_attachment on /ws with the HTTP upload to use, and /ws clients send and receive files', async () => {
    const { alice, bob, ta, conversationId } = await team(ws);
    const refused = await alice.request('upload_attachment', { conversationId, name: 'a.txt', contentType: 'text/plain', data: { base64: 'aGk=' } });
    assert.equal(refused.error.code, 'invalid');
    assert.match(refused.error.message, /POST \/api\/conversations\/\{id\}\/attachments/);
    const up = await upload(ta, conversationId, 'report.pdf', Buffer.from('%PDF-1.7\n%âãÏÓ\n1 0 obj\n<<>>\nendobj\n'), 'application/pdf');
    assert.equal(up.status, 201, JSON.stringify(up.body));
    const clientMsgId = randomUUID();
    await alice.request('send_message', { conversationId, type: 'file', attachmentId: up.body.attachment.id, content: 'the report', clientMsgId });
    const got = await bob.waitFor('new_message', (m) => m.clientMsgId === clientMsgId);
    assert.equal(got.attachment.contentType, 'application/pdf');
    assert.equal(got.attachment.name, 'report.pdf');
    alice.close(); bob.close();
  });

  it('refuses a non-member everywhere: upload, download, thumbnail, and a message referring to the attachment', async () => {
    const { alice, bob, ta, conversationId } = await team();
    const up = await upload(ta, conversationId, 'private.png', png(8, 8), 'image/png');
    assert.equal(up.status, 201);
    const m = uid('mallory');
    const tm = token(m);
    const before = objects();
    const theirs = await upload(tm, conversationId, 'spam.png', png(9, 9), 'image/png');
    assert.equal(theirs.status, 403);
    assert.equal(theirs.body.error.code, 'forbidden');
    assert.equal(objects(), before, 'a refused upload stored nothing');
    for (const path of [`/api/attachments/${up.body.attachment.id}`, `/api/attachments/${up.body.attachment.id}/thumbnail`]) {
      const res = await download(tm, path);
      assert.equal(res.status, 403, path);
      assert.equal(JSON.parse(res.bytes.toString()).error.code, 'forbidden');
    }
    // Mallory's own conversation cannot carry alice's attachment.
    const own = await api(gw.url, tm, 'POST', '/api/conversations', { kind: 'group', title: 'mine', members: [] });
    const mallory = await socketio(gw.url, tm);
    const ack = await mallory.request('send_message', { conversationId: own.body.conversation.id, type: 'image', attachmentId: up.body.attachment.id, clientMsgId: randomUUID() });
    assert.equal(ack.error.code, 'forbidden');
    assert.match(ack.error.message, /another conversation/);
    const missing = await download(tm, `/api/attachments/${randomUUID()}`);
    assert.equal(missing.status, 404);
    // A file or image message needs an attachment, and a text message takes none.
    const bare = await alice.request('send_message', { conversationId, type: 'image', content: 'x', clientMsgId: randomUUID() });
    assert.equal(bare.error.code, 'invalid');
    const mixed = await alice.request('send_message', { conversationId, type: 'text', content: 'x', attachmentId: up.body.attachment.id, clientMsgId: randomUUID() });
    assert.equal(mixed.error.code, 'invalid');
    mallory.close(); alice.close(); bob.close();
  });

  it('refuses limit+1 bytes with too_large before storing anything, declared or streamed', async () => {
    const { alice, bob, ta, conversationId } = await team();
    const before = objects();
    const big = Buffer.alloc(LIMIT + 1, 7);
    // Content-Length says it: answered before the body is read (node:http, which tolerates
    // the server not reading what it refuses).
    const declared = await new Promise((resolve, reject) => {
      const req = httpRequest(`${gw.url}/api/conversations/${conversationId}/attachments?name=big.bin`, {
        method: 'POST',
        headers: { authorization: `Bearer ${ta}`, 'content-type': 'application/octet-stream', 'content-length': big.length },
      }, (res) => {
        let text = '';
        res.on('data', (d) => { text += d; });
        res.on('end', () => resolve({ status: res.statusCode, body: JSON.parse(text) }));
      });
      req.on('error', (e) => { if (!['EPIPE', 'ECONNRESET'].includes(e.code)) reject(e); });
      req.end(big);
    });
    assert.equal(declared.status, 413);
    assert.equal(declared.body.error.code, 'too_large');
    assert.match(declared.body.error.message, new RegExp(String(LIMIT)));
    // No Content-Length (chunked): cut off as the count passes the limit.
    const chunks = [Buffer.alloc(100 * 1024, 1), Buffer.alloc(100 * 1024, 2), Buffer.alloc(LIMIT + 1 - 200 * 1024, 3)];
    const stream = new ReadableStream({
      pull(controller) { const c = chunks.shift(); if (c) controller.enqueue(c); else controller.close(); },
    });
    const streamed = await upload(ta, conversationId, 'big.bin', stream, 'application/octet-stream', { duplex: 'half' });
    assert.equal(streamed.status, 413, JSON.stringify(streamed.body));
    assert.equal(streamed.body.error.code, 'too_large');
    assert.equal(objects(), before, 'nothing was stored');
    assert.equal(temps(), 0, 'no temp file was left');
    // Exactly the limit is accepted.
    const fits = await upload(ta, conversationId, 'fits.bin', Buffer.alloc(LIMIT, 9));
    assert.equal(fits.status, 201, JSON.stringify(fits.body));
    assert.equal(fits.body.attachment.size, LIMIT);
    assert.equal(objects(), before + 1);
    alice.close(); bob.close();
  });

  it('refuses an HTML file declared image/png, and a decompression bomb, storing neither', async () => {
    const { alice, bob, ta, conversationId } = await team();
    const before = objects();
    const html = await upload(ta, conversationId, 'cat.png', Buffer.from('<!DOCTYPE html><html><script>steal()</script></html>'), 'image/png');
    assert.equal(html.status, 415);
    assert.equal(html.body.error.code, 'invalid');
    assert.match(html.body.error.message, /text\/html/);
    const svg = await upload(ta, conversationId, 'logo.svg', Buffer.from('<svg xmlns="http://www.w3.org/2000/svg" onload="steal()"/>'), 'image/svg+xml');
    assert.equal(svg.status, 415);
    const lying = await upload(ta, conversationId, 'photo.jpg', png(4, 4), 'image/jpeg');
    assert.equal(lying.status, 415, 'a PNG declared as JPEG');
    const bomb = await upload(ta, conversationId, 'bomb.png', png(1, 1, { claim: [100000, 100000] }), 'image/png');
    assert.equal(bomb.status, 413, JSON.stringify(bomb.body));
    assert.match(bomb.body.error.message, /100000×100000/);
    assert.equal(objects(), before);
    alice.close(); bob.close();
  });

  it('stores a retried upload once and answers it with the same attachment', async () => {
    const { alice, bob, ta, conversationId } = await team();
    const bytes = Buffer.from(`retry ${randomUUID()}`);
    const before = objects();
    const first = await upload(ta, conversationId, 'retry.txt', bytes, 'text/plain');
    const again = await upload(ta, conversationId, 'retry.txt', bytes, 'text/plain');
    assert.equal(first.status, 201);
    assert.equal(again.status, 201);
    assert.deepEqual(again.body.attachment, first.body.attachment);
    // Another name for the same bytes is another attachment, and still the one object.
    const renamed = await upload(ta, conversationId, 'copy.txt', bytes, 'text/plain');
    assert.notEqual(renamed.body.attachment.id, first.body.attachment.id);
    assert.equal(renamed.body.attachment.sha256, first.body.attachment.sha256);
    assert.equal(objects(), before + 1);
    alice.close(); bob.close();
  });

  it('carries the attachment in history and sync, over the socket and HTTP', async () => {
    const { alice, bob, ta, conversationId } = await team();
    const up = await upload(ta, conversationId, 'map.png', png(20, 10), 'image/png');
    await alice.request('send_message', { conversationId, type: 'text', content: 'before', clientMsgId: randomUUID() });
    const sent = await alice.request('send_message', { conversationId, type: 'image', attachmentId: up.body.attachment.id, clientMsgId: randomUUID() });
    const carried = sent.message.attachment;
    assert.equal(carried.id, up.body.attachment.id);
    const history = await bob.request('history', { conversationId });
    assert.equal(history.messages.length, 2);
    assert.equal(history.messages[0].attachment, undefined, 'a text message has none');
    assert.deepEqual(history.messages[1].attachment, carried);
    const synced = await bob.request('sync', { conversations: [{ conversationId, afterSeq: 1 }] });
    assert.deepEqual(synced.messages.map((m) => m.attachment), [carried]);
    const page = await api(gw.url, ta, 'GET', `/api/conversations/${conversationId}/messages`);
    assert.deepEqual(page.body.messages[1].attachment, carried);
    alice.close(); bob.close();
  });

  it('serves a thumbnail that fits 320 pixels and keeps none of the original\'s metadata', async () => {
    const { alice, bob, ta, tb, conversationId } = await team();
    const original = png(800, 400, { text: { GPSPosition: '52.5200N 13.4050E', Comment: 'secret-location' } });
    assert.ok(original.includes('secret-location'));
    const up = await upload(ta, conversationId, 'wide.png', original, 'image/png');
    assert.equal(up.status, 201, JSON.stringify(up.body));
    const thumb = await download(tb, `/api/attachments/${up.body.attachment.id}/thumbnail`);
    assert.equal(thumb.status, 200);
    assert.equal(thumb.headers.get('content-type'), 'image/png');
    assert.equal(thumb.headers.get('x-content-type-options'), 'nosniff');
    assert.deepEqual(pngSize(thumb.bytes), [320, 160]);
    assert.ok(!thumb.bytes.includes('secret-location'), 'the text chunk was dropped');
    assert.ok(!thumb.bytes.includes('GPSPosition'));
    alice.close(); bob.close();
  });
});

/** moto's S3 emulator on a free port (scripts/test.sh installs it; missing, this fails). */
async function startMoto() {
  const port = await new Promise((resolve) => {
    const srv = createServer().listen(0, '127.0.0.1', () => { const { port: p } = srv.address(); srv.close(() => resolve(p)); });
  });
  const venv = join(homedir(), '.cache', 'confab-venv', 'bin', 'moto_server');
  const bin = process.env.CONFAB_MOTO_SERVER ?? (existsSync(venv) ? venv : 'moto_server');
  const proc = spawn(bin, ['-H', '127.0.0.1', '-p', String(port)], { stdio: 'ignore' });
  const spawnFailed = new Promise((_, reject) => proc.on('error', (e) => reject(new Error(`cannot start ${bin} (${e.message}): run scripts/test.sh once`))));
  const endpoint = `http://127.0.0.1:${port}`;
  const deadline = Date.now() + 30000;
  for (;;) {
    try { await Promise.race([fetch(endpoint), spawnFailed]); break; } catch (e) {
      if (e.message.startsWith('cannot start') || Date.now() > deadline) { proc.kill(); throw e; }
      await new Promise((r) => setTimeout(r, 100));
    }
  }
  return { endpoint, stop: () => proc.kill() };
}

describe('attachments in an S3 bucket', () => {
  let moto;
  let gw;
  const bucket = `confab-e2e-${randomUUID().slice(0, 8)}`;
  before(async () => {
    moto = await startMoto();
    const made = await fetch(`${moto.endpoint}/${bucket}`, { method: 'PUT' });
    assert.ok(made.ok, `bucket: ${made.status}`);
    gw = await startGateway({
      env: {
        CONFAB_ATTACHMENTS: 's3', CONFAB_S3_BUCKET: bucket, CONFAB_S3_ENDPOINT: moto.endpoint,
        CONFAB_S3_ACCESS_KEY_ID: 'test', CONFAB_S3_SECRET_ACCESS_KEY: 'test',
      },
    });
  });
  after(async () => { await gw?.stop(); moto?.stop(); });

  it('stores an upload in the bucket, not on local disk, and serves it back to another member', async () => {
    const [a, b] = [uid('alice'), uid('bob')];
    const [ta, tb] = [token(a), token(b)];
    const created = await api(gw.url, ta, 'POST', '/api/conversations', { kind: 'group', title: 'S3', members: [b] });
    const conversationId = created.body.conversation.id;
    const image = png(64, 32);
    const res = await fetch(`${gw.url}/api/conversations/${conversationId}/attachments?name=s3.png`, {
      method: 'POST', headers: { authorization: `Bearer ${ta}`, 'content-type': 'image/png' }, body: image,
    });
    assert.equal(res.status, 201);
    const { attachment } = await res.json();
    assert.equal(attachment.sha256, sha256(image));
    // The local attachment directory stays empty: the bytes went to the bucket.
    assert.ok(!existsSync(join(gw.dataDir, 'attachments')), 'nothing was written locally');
    const back = await fetch(`${gw.url}/api/attachments/${attachment.id}`, { headers: { authorization: `Bearer ${tb}`, range: 'bytes=0-7' } });
    assert.equal(back.status, 206);
    assert.ok(Buffer.from(await back.arrayBuffer()).equals(image.subarray(0, 8)));
    const thumb = await fetch(`${gw.url}/api/attachments/${attachment.id}/thumbnail`, { headers: { authorization: `Bearer ${tb}` } });
    assert.equal(thumb.status, 200);
    assert.deepEqual(pngSize(Buffer.from(await thumb.arrayBuffer())), [64, 32]);
    const ready = await fetch(`${gw.url}/readyz`);
    assert.equal(ready.status, 200);
  });
});

