// The Node peer Confab is measured against: Socket.IO 4.x with the same events, payloads and acks
// (persist in SQLite, then broadcast, then ack), the stack of the designs people copy.
// Env: PORT (0 = any), HOST, DB (SQLite file), JWT_SECRET (HS256, as the gateway's CONFAB_JWT_SECRET).
import { createServer } from "node:http";
import { createHmac, randomUUID, timingSafeEqual } from "node:crypto";
import Database from "better-sqlite3";
import { Server } from "socket.io";

const secret = process.env.JWT_SECRET ?? "";
if (secret.length < 32) throw new Error("JWT_SECRET must be at least 32 bytes");

// Same store shape and durability settings as the gateway's SQLite store (WAL, synchronous=NORMAL).
const db = new Database(process.env.DB ?? "node-peer.db");
db.pragma("journal_mode = WAL");
db.pragma("synchronous = NORMAL");
db.exec(`
create table if not exists conversations (id text primary key, kind text not null, title text,
  last_seq integer not null default 0, created_at text not null);
create table if not exists conversation_members (conversation_id text not null, user_id text not null,
  role text not null default 'member', last_read_seq integer not null default 0, joined_at text not null,
  primary key (conversation_id, user_id));
create table if not exists messages (id text primary key, conversation_id text not null, seq integer not null,
  sender_id text not null, client_msg_id text not null, kind text not null, content text not null,
  created_at text not null, unique (conversation_id, seq), unique (sender_id, client_msg_id));`);

const q = {
  conv: db.prepare("select id, kind, title, last_seq as lastSeq, created_at as createdAt from conversations where id = ?"),
  insertConv: db.prepare("insert into conversations (id, kind, title, created_at) values (?, ?, ?, ?)"),
  member: db.prepare("select 1 from conversation_members where conversation_id = ? and user_id = ?"),
  addMember: db.prepare("insert or ignore into conversation_members (conversation_id, user_id, joined_at) values (?, ?, ?)"),
  members: db.prepare("select user_id from conversation_members where conversation_id = ?"),
  bumpSeq: db.prepare("update conversations set last_seq = last_seq + 1 where id = ? returning last_seq"),
  byClientId: db.prepare("select * from messages where sender_id = ? and client_msg_id = ?"),
  insertMsg: db.prepare(`insert into messages (id, conversation_id, seq, sender_id, client_msg_id, kind, content, created_at)
    values (?, ?, ?, ?, ?, ?, ?, ?)`),
  after: db.prepare("select * from messages where conversation_id = ? and seq > ? order by seq limit ?"),
  before: db.prepare("select * from messages where conversation_id = ? and seq < ? order by seq desc limit ?"),
};

const wire = (m, names) => ({
  id: m.id, conversationId: m.conversation_id, seq: m.seq, senderId: m.sender_id,
  senderName: names?.get(m.sender_id) ?? m.sender_id, type: m.kind, content: m.content,
  clientMsgId: m.client_msg_id, createdAt: m.created_at,
});

// Persist with a gap-free per-conversation seq in one transaction; a retried clientMsgId returns
// the original message.
const persist = db.transaction((convId, sender, clientMsgId, kind, content) => {
  const existing = q.byClientId.get(sender, clientMsgId);
  if (existing) return { message: existing, fresh: false };
  const { last_seq: seq } = q.bumpSeq.get(convId);
  const row = { id: randomUUID(), conversation_id: convId, seq, sender_id: sender, client_msg_id: clientMsgId,
    kind, content, created_at: new Date().toISOString() };
  q.insertMsg.run(row.id, convId, seq, sender, clientMsgId, kind, content, row.created_at);
  return { message: row, fresh: true };
});

function verify(token) {
  const parts = String(token ?? "").split(".");
  if (parts.length !== 3) return null;
  const mac = createHmac("sha256", secret).update(`${parts[0]}.${parts[1]}`).digest();
  const sig = Buffer.from(parts[2], "base64url");
  if (sig.length !== mac.length || !timingSafeEqual(sig, mac)) return null;
  const claims = JSON.parse(Buffer.from(parts[1], "base64url").toString());
  if (typeof claims.sub !== "string" || !(claims.exp > Date.now() / 1000)) return null;
  return { userId: claims.sub, name: claims.name ?? claims.sub };
}

const err = (code, message) => ({ error: { code, message } });

const http = createServer((req, res) => {
  if (req.method === "POST" && req.url === "/api/conversations") {
    const who = verify((req.headers.authorization ?? "").replace(/^Bearer /, ""));
    if (!who) { res.writeHead(401).end(JSON.stringify(err("unauthorized", "bad token"))); return; }
    let body = "";
    req.on("data", (c) => { body += c; });
    req.on("end", () => {
      const b = JSON.parse(body || "{}");
      const id = randomUUID();
      const now = new Date().toISOString();
      q.insertConv.run(id, b.kind ?? "open", b.title ?? null, now);
      q.addMember.run(id, who.userId, now);
      res.writeHead(201, { "content-type": "application/json" })
        .end(JSON.stringify({ conversation: { ...q.conv.get(id) } }));
    });
    return;
  }
  if (req.url === "/healthz") { res.writeHead(200).end("ok"); return; }
  res.writeHead(404).end();
});

const io = new Server(http, { transports: ["websocket", "polling"], serveClient: false });

io.use((socket, next) => {
  const who = verify(socket.handshake.auth?.token);
  if (!who) return next(new Error("unauthorized"));
  socket.data.who = who;
  next();
});

io.on("connection", (socket) => {
  const who = socket.data.who;
  const room = (id) => `conv:${id}`;
  const handle = (name, fn) => socket.on(name, (payload, ack) => {
    let out;
    try { out = fn(payload ?? {}); } catch (e) { out = err("invalid", String(e.message ?? e)); }
    if (typeof ack === "function") ack(out);
  });

  handle("join_conversation", ({ conversationId }) => {
    const conv = q.conv.get(conversationId);
    if (!conv) return err("not_found", "no such conversation");
    if (conv.kind !== "open" && !q.member.get(conversationId, who.userId)) return err("forbidden", "not a member");
    q.addMember.run(conversationId, who.userId, new Date().toISOString());
    socket.join(room(conversationId));
    socket.to(room(conversationId)).emit("user_joined", { conversationId, userId: who.userId });
    return { conversation: conv, lastSeq: conv.lastSeq, members: q.members.all(conversationId).map((r) => r.user_id) };
  });

  handle("leave_conversation", ({ conversationId }) => {
    socket.leave(room(conversationId));
    socket.to(room(conversationId)).emit("user_left", { conversationId, userId: who.userId });
    return {};
  });

  handle("send_message", ({ conversationId, content, type = "text", clientMsgId }) => {
    if (typeof content !== "string" || content.length > 16384) return err("invalid", "content");
    if (typeof clientMsgId !== "string") return err("invalid", "clientMsgId");
    if (!q.member.get(conversationId, who.userId)) return err("forbidden", "not a member");
    const { message, fresh } = persist(conversationId, who.userId, clientMsgId, type, content);
    const m = wire(message, new Map([[who.userId, who.name]]));
    if (fresh) {
      io.to(room(conversationId)).emit("new_message", m);
      socket.emit("message_delivered", { messageId: m.id, clientMsgId });
    }
    return { message: m };
  });

  handle("sync", ({ conversations = [] }) => {
    const messages = [];
    let truncated = false;
    for (const { conversationId, afterSeq = 0 } of conversations) {
      if (!q.member.get(conversationId, who.userId)) return err("forbidden", "not a member");
      const rows = q.after.all(conversationId, afterSeq, 501);
      if (rows.length > 500) { truncated = true; rows.pop(); }
      messages.push(...rows.map((r) => wire(r)));
    }
    return { messages, truncated };
  });

  handle("history", ({ conversationId, beforeSeq = Number.MAX_SAFE_INTEGER, limit = 50 }) => {
    if (!q.member.get(conversationId, who.userId)) return err("forbidden", "not a member");
    const rows = q.before.all(conversationId, beforeSeq, Math.min(limit, 100)).reverse();
    return { messages: rows.map((r) => wire(r)), nextBeforeSeq: rows.length ? rows[0].seq : null };
  });

  handle("typing_start", ({ conversationId }) => {
    socket.to(room(conversationId)).emit("user_typing", { conversationId, userId: who.userId, userName: who.name });
    return {};
  });
  handle("typing_stop", ({ conversationId }) => {
    socket.to(room(conversationId)).emit("user_stopped_typing", { conversationId, userId: who.userId });
    return {};
  });
});

http.listen(Number(process.env.PORT ?? 0), process.env.HOST ?? "127.0.0.1", () => {
  const { address, port } = http.address();
  // The same first line as the gateway, so the harness starts both the same way.
  console.log(`Node peer listening on http://${address}:${port}`);
});
