// Confab web page: a small chat client on the gateway's protocol (Socket.IO events with acks,
// HTTP API for the conversation list). Written to be read as an example of how a front end keeps
// nothing lost: every send carries a clientMsgId (safe to resend), every conversation has a seq
// cursor, and after any reconnect the page asks `sync` for what it missed.
// All user-supplied text goes into the DOM through textContent, never innerHTML.

const TOKEN_KEY = 'confab.token'; // sessionStorage: each tab may be a different user
const ACK_TIMEOUT_MS = 10000;
const TYPING_RENEW_MS = 3000; // the server forgets a typing_start after 5 s
const TYPING_IDLE_MS = 4000;
const HISTORY_PAGE = 50;

const $ = (id) => document.getElementById(id);
const el = (tag, props = {}, ...children) => {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(props)) {
    if (k === 'dataset') Object.assign(node.dataset, v);
    else if (k in node) node[k] = v;
    else node.setAttribute(k, v);
  }
  node.append(...children.filter((c) => c !== null && c !== undefined));
  return node;
};

const state = {
  token: null,
  me: null, // {id, name}
  socket: null,
  generation: 0, // bumps on each connect: stale async work from a previous connection stops
  devMode: false,
  conversations: new Map(), // id → Conv
  openId: null,
  names: new Map(), // userId → display name, learned from messages and typing
  presence: new Map(), // userId → 'online' | 'offline'
  outbox: new Map(), // clientMsgId → {clientMsgId, conversationId, content, status, error, replyTo, mentions}
  replyTo: null, // {conversationId, seq, senderName, quote} while composing a reply
  editing: null, // {conversationId, seq} while editing one of my messages
  acked: new Set(), // ids of messages this page sent (they start as "sent")
  delivered: new Set(), // ids confirmed by message_delivered (it may arrive before the ack)
  draining: false,
  everConnected: false,
  offline: !navigator.onLine,
};

/** A conversation as the page tracks it. `synced` is the sync cursor: every message up to it
 * (from where this page started following the conversation) has been received. */
function newConv(summary) {
  return {
    id: summary.id,
    kind: summary.kind,
    title: summary.title,
    lastSeq: summary.lastSeq ?? 0,
    lastReadSeq: summary.lastReadSeq ?? 0,
    unread: summary.unread ?? 0,
    mentions: summary.mentions ?? 0,
    synced: null,
    seen: new Set(), // seqs of change entries received (messages are in `messages`)
    receivedBy: new Map(), // userId → delivery watermark (message_delivered_to)
    receivedSent: 0, // the delivery watermark this page last reported
    messages: new Map(), // seq → message
    nextBeforeSeq: undefined, // undefined: history not loaded yet; null: at the beginning
    loadingHistory: false,
    members: [], // user ids
    readBy: new Map(), // userId → last read seq
    typing: new Map(), // userId → userName
  };
}

// ---- identity and HTTP ---------------------------------------------------------------------

/** The claims of a JWT, read (not verified: the gateway does that) to show who is signed in. */
function claimsOf(token) {
  const part = token.split('.')[1];
  if (!part) throw new Error('that is not a JWT');
  const b64 = part.replace(/-/g, '+').replace(/_/g, '/');
  const bytes = Uint8Array.from(atob(b64), (c) => c.charCodeAt(0));
  const claims = JSON.parse(new TextDecoder().decode(bytes));
  if (typeof claims.sub !== 'string') throw new Error('the token has no sub claim');
  return claims;
}

async function api(method, path, body) {
  const res = await fetch(path, {
    method,
    headers: {
      authorization: `Bearer ${state.token}`,
      ...(body === undefined ? {} : { 'content-type': 'application/json' }),
    },
    body: body === undefined ? undefined : JSON.stringify(body),
  });
  if (res.status === 401) {
    signOut('Your session is no longer valid; sign in again.');
    throw new Error('unauthorized');
  }
  const text = await res.text();
  const data = text ? JSON.parse(text) : null;
  if (!res.ok) throw new Error(data?.error?.message ?? `HTTP ${res.status}`);
  return data;
}

/** A Socket.IO request: resolves to the ack, rejects with the ack's {error} or on timeout. */
async function request(event, payload) {
  const reply = await state.socket.timeout(ACK_TIMEOUT_MS).emitWithAck(event, payload);
  if (reply && reply.error) {
    throw Object.assign(new Error(reply.error.message), { code: reply.error.code });
  }
  return reply;
}

async function devToken(userId, name) {
  const res = await fetch('/api/dev/token', {
    method: 'POST',
    headers: { 'content-type': 'application/json' },
    body: JSON.stringify({ userId, name }),
  });
  const data = await res.json();
  if (!res.ok) throw new Error(data?.error?.message ?? `HTTP ${res.status}`);
  return data.token;
}

// ---- sign-in -------------------------------------------------------------------------------

function signIn(token) {
  const claims = claimsOf(token);
  state.token = token;
  state.me = { id: claims.sub, name: claims.name ?? claims.sub };
  state.names.set(state.me.id, state.me.name);
  sessionStorage.setItem(TOKEN_KEY, token);
  $('signin').hidden = true;
  $('chat').hidden = false;
  $('sign-out').hidden = false;
  $('me').textContent = `Signed in as ${state.me.name} (${state.me.id})`;
  connect();
}

function signOut(reason = '') {
  sessionStorage.removeItem(TOKEN_KEY);
  if (state.socket) {
    state.socket.removeAllListeners();
    state.socket.disconnect();
    state.socket = null;
  }
  Object.assign(state, { token: null, me: null, openId: null, draining: false });
  state.conversations.clear();
  state.outbox.clear();
  state.acked.clear();
  state.delivered.clear();
  $('chat').hidden = true;
  $('sign-out').hidden = true;
  $('me').textContent = '';
  $('signin').hidden = false;
  $('signin-error').textContent = reason;
  setBanner(null);
  (state.devMode ? $('dev-user') : $('token-input')).focus();
}

/** Dev mode (the gateway's generated secret) offers one-click sign-in and renews tokens. */
async function detectDevMode() {
  try {
    state.devMode = (await fetch('/api/dev')).ok;
  } catch {
    state.devMode = false;
  }
  $('dev-signin').hidden = !state.devMode;
}

function showSignIn() {
  $('signin').hidden = false;
  (state.devMode ? $('dev-user') : $('token-input')).focus();
}

$('dev-form').addEventListener('submit', async (e) => {
  e.preventDefault();
  $('signin-error').textContent = '';
  try {
    signIn(await devToken($('dev-user').value.trim(), $('dev-name').value.trim()));
  } catch (err) {
    $('signin-error').textContent = `Sign-in failed: ${err.message}`;
  }
});

$('token-form').addEventListener('submit', (e) => {
  e.preventDefault();
  $('signin-error').textContent = '';
  try {
    signIn($('token-input').value.trim());
    $('token-input').value = '';
  } catch (err) {
    $('signin-error').textContent = `That token cannot be used: ${err.message}`;
  }
});

$('sign-out').addEventListener('click', () => signOut());

// ---- connection ----------------------------------------------------------------------------

/** The banner: connecting, reconnecting, offline, draining; hidden while all is well. */
function setBanner(kind, text) {
  const banner = $('banner');
  banner.dataset.state = kind ?? 'idle';
  banner.hidden = !kind;
  banner.textContent = text ?? '';
}

function showConnectionState() {
  const s = state.socket;
  if (!s) return;
  if (state.offline) setBanner('offline', 'Offline: messages will be sent when the network is back.');
  else if (state.draining) setBanner('draining', 'The server is restarting; moving to another one…');
  else if (s.connected) setBanner(null);
  else if (state.everConnected) setBanner('reconnecting', 'Connection lost: reconnecting…');
  else setBanner('connecting', 'Connecting…');
}

function connect() {
  state.everConnected = false;
  // The auth callback runs on every (re)connect, so a refreshed token is used, and the resume
  // cursors are the ones of that moment: the server replays what was missed after them, before
  // any live event, with no join or sync from here.
  const socket = io({
    auth: (cb) => cb({ token: state.token, cursors: resumeCursors() }),
    reconnectionDelay: 500,
    reconnectionDelayMax: 5000,
  });
  state.socket = socket;
  showConnectionState();

  socket.on('connect', () => {
    state.everConnected = true;
    state.draining = false;
    showConnectionState();
    onConnected(++state.generation).catch((err) => {
      if (state.socket === socket) showError(`Could not load your conversations: ${err.message}`);
    });
  });
  socket.on('disconnect', (reason) => {
    showConnectionState();
    // The server closed us on purpose (restart, shutdown): Socket.IO does not retry that by
    // itself, but the server will be back (or another one behind the same address).
    if (reason === 'io server disconnect') setTimeout(() => state.socket === socket && socket.connect(), 1000);
  });
  socket.on('connect_error', (err) => {
    if (socket.active) return showConnectionState(); // transport trouble: Socket.IO retries
    if (/^unauthorized/.test(err.message)) return signOut(`The gateway refused the token: ${err.message}`);
    // Refused for another reason (rate limited): try again a little later.
    showConnectionState();
    setTimeout(() => state.socket === socket && socket.connect(), 2000);
  });

  socket.on('new_message', (m) => onMessage(m, { live: true }));
  // Edits, deletions and reactions are entries of the log with their own seq, like messages.
  for (const type of ['message_updated', 'message_deleted', 'reaction_updated']) {
    socket.on(type, (c) => {
      const conv = applyChange({ ...c, type }, { live: true });
      if (conv) afterMessages(conv);
    });
  }
  socket.on('message_delivered_to', ({ conversationId, seq, userId }) => {
    const conv = state.conversations.get(conversationId);
    if (!conv) return;
    conv.receivedBy.set(userId, Math.max(conv.receivedBy.get(userId) ?? 0, seq));
    if (conversationId === state.openId) renderMessages();
  });
  // More was missed than a resume replays: page the rest with sync.
  socket.on('resume_truncated', ({ conversationId }) => {
    const conv = state.conversations.get(conversationId);
    if (conv) syncGap(conv);
  });
  socket.on('message_delivered', onDelivered);
  socket.on('message_error', (e) => {
    const item = state.outbox.get(e.clientMsgId);
    if (item) failOutbox(item, e.message);
  });
  socket.on('message_read', onRead);
  socket.on('user_typing', (t) => {
    if (t.userId === state.me.id) return;
    state.names.set(t.userId, t.userName);
    state.conversations.get(t.conversationId)?.typing.set(t.userId, t.userName);
    if (t.conversationId === state.openId) renderTyping();
  });
  socket.on('user_stopped_typing', (t) => {
    state.conversations.get(t.conversationId)?.typing.delete(t.userId);
    if (t.conversationId === state.openId) renderTyping();
  });
  socket.on('user_joined', ({ conversationId, userId }) => {
    const conv = state.conversations.get(conversationId);
    if (conv && !conv.members.includes(userId)) {
      conv.members.push(userId);
      if (conversationId === state.openId) renderRoomHead();
    }
  });
  socket.on('user_online', ({ userId }) => setPresence(userId, 'online'));
  socket.on('user_offline', ({ userId }) => setPresence(userId, 'offline'));
  socket.on('conversation_added', ({ conversation }) => {
    if (!state.conversations.has(conversation.id)) followConversation(conversation).catch(showError);
  });
  socket.on('conversation_removed', ({ conversationId }) => {
    state.conversations.delete(conversationId);
    if (state.openId === conversationId) closeRoom();
    renderList();
  });
  socket.on('rate_limit_exceeded', ({ retryAfterMs }) => {
    showError(`Slow down: try again in ${Math.ceil(retryAfterMs / 1000)} s.`);
  });
  socket.on('token_expiring', async ({ secondsLeft }) => {
    if (!state.devMode) {
      showError(`Your session ends in ${secondsLeft} s; sign in again with a fresh token.`);
      return;
    }
    try {
      const token = await devToken(state.me.id, state.me.name);
      await request('refresh_token', { token });
      state.token = token;
      sessionStorage.setItem(TOKEN_KEY, token);
    } catch (err) {
      showError(`Could not renew the session: ${err.message}`);
    }
  });
  socket.on('session_expired', () => signOut('Your session expired; sign in again.'));
  socket.on('server_draining', ({ reconnectAfterMs }) => {
    // Leave when told (the server spreads clients over its drain window), then reconnect and
    // sync like after any other reconnect.
    state.draining = true;
    showConnectionState();
    setTimeout(() => {
      if (state.socket !== socket) return;
      socket.disconnect();
      socket.connect();
    }, reconnectAfterMs ?? 0);
  });
}

window.addEventListener('offline', () => { state.offline = true; showConnectionState(); });
window.addEventListener('online', () => {
  state.offline = false;
  if (state.socket && !state.socket.connected && !state.socket.active) state.socket.connect();
  showConnectionState();
});

/** Every conversation's sync cursor, for the handshake's resume. */
function resumeCursors() {
  const cursors = {};
  for (const conv of state.conversations.values()) if (conv.synced !== null) cursors[conv.id] = conv.synced;
  return cursors;
}

/**
 * After every connect: refresh the list, join (for its members and lastSeq) each conversation
 * not followed yet, flush the outbox. The connection is already in every room of its user, and
 * the handshake's cursors brought back what was missed in the ones followed.
 */
async function onConnected(generation) {
  const { conversations } = await api('GET', '/api/conversations');
  if (generation !== state.generation) return;
  const listed = new Set(conversations.map((c) => c.id));
  for (const id of [...state.conversations.keys()]) {
    if (!listed.has(id)) state.conversations.delete(id);
  }
  for (const summary of conversations) {
    const known = state.conversations.get(summary.id);
    if (known) Object.assign(known, { unread: summary.unread, mentions: summary.mentions ?? 0, lastReadSeq: summary.lastReadSeq, title: summary.title });
    else state.conversations.set(summary.id, newConv(summary));
  }
  renderList();
  await Promise.all([...state.conversations.values()].filter((c) => c.synced === null).map((c) => joinRoom(c, generation)));
  if (generation !== state.generation) return;
  await refreshPresence();
  if (state.openId && !state.conversations.has(state.openId)) closeRoom();
  if (state.openId) {
    await openRoom(state.openId, { focus: false });
  } else if (!matchMedia('(max-width: 699px)').matches && state.conversations.size) {
    await openRoom([...state.conversations.keys()][0], { focus: false });
  }
  flushOutbox();
}

async function joinRoom(conv, generation) {
  const joined = await request('join_conversation', { conversationId: conv.id, members: true });
  if (generation !== state.generation) return;
  conv.members = joined.members.map((m) => m.userId);
  conv.ownerId = joined.members.find((m) => m.role === 'owner')?.userId ?? null;
  for (const m of joined.members) {
    conv.readBy.set(m.userId, Math.max(conv.readBy.get(m.userId) ?? 0, m.lastReadSeq));
    // Stored delivery watermarks: receipts that arrived while this page was away.
    conv.receivedBy.set(m.userId, Math.max(conv.receivedBy.get(m.userId) ?? 0, m.lastReceivedSeq ?? 0));
  }
  conv.lastSeq = Math.max(conv.lastSeq, joined.lastSeq);
  // First time: follow from here; older messages come from history when the room is opened.
  if (conv.synced === null) conv.synced = joined.lastSeq;
}

/** Asks for every message after each conversation's cursor, page by page while truncated. */
async function syncConversations(convs, generation) {
  for (let round = 0; round < 50; round += 1) {
    const cursors = convs.filter((c) => c.synced !== null).map((c) => ({ conversationId: c.id, afterSeq: c.synced }));
    if (!cursors.length) return;
    const before = cursors.map((c) => c.afterSeq).join();
    const { messages, changes = [], truncated } = await request('sync', { conversations: cursors });
    if (generation !== state.generation) return;
    // Messages (as they are now) and change entries, applied together in seq order.
    const entries = [...messages.map((m) => ({ m })), ...changes.map((c) => ({ c }))]
      .sort((x, y) => (x.m ?? x.c).seq - (y.m ?? y.c).seq);
    for (const e of entries) {
      if (e.m) addMessage(e.m, { live: false }); else applyChange(e.c, { live: false });
    }
    for (const conv of convs) afterMessages(conv);
    const after = convs.filter((c) => c.synced !== null).map((c) => c.synced).join();
    if (!truncated || before === after) return;
  }
}

const pendingGapSync = new Set();
/** A seq jumped: something was missed (e.g. a dropped broadcast). Sync that conversation. */
function syncGap(conv) {
  if (pendingGapSync.has(conv.id) || !state.socket?.connected) return;
  pendingGapSync.add(conv.id);
  syncConversations([conv], state.generation)
    .catch(() => {})
    .finally(() => pendingGapSync.delete(conv.id));
}

async function followConversation(conversation) {
  const conv = newConv(conversation);
  state.conversations.set(conv.id, conv);
  renderList();
  await joinRoom(conv, state.generation);
  // Messages sent before the join are not live events: take the unread count from the server.
  const { conversations } = await api('GET', '/api/conversations');
  const summary = conversations.find((c) => c.id === conv.id);
  if (summary) Object.assign(conv, { unread: summary.unread, mentions: summary.mentions ?? 0, lastReadSeq: summary.lastReadSeq });
  await refreshPresence();
  renderList();
  return conv;
}

// ---- messages ------------------------------------------------------------------------------

function onMessage(m, { live }) {
  const conv = addMessage(m, { live });
  if (conv) afterMessages(conv);
}

/** Records a message (idempotent: keyed by seq) and advances the sync cursor. */
function addMessage(m, { live }) {
  const conv = state.conversations.get(m.conversationId);
  if (!conv) return null;
  state.names.set(m.senderId, m.senderName);
  const fresh = !conv.messages.has(m.seq);
  conv.messages.set(m.seq, m);
  if (m.senderId === state.me.id) state.outbox.delete(m.clientMsgId);
  conv.typing.delete(m.senderId);
  noteSeq(conv, m.seq, live);
  const viewing = conv.id === state.openId && document.visibilityState === 'visible';
  if (fresh && live && m.senderId !== state.me.id && !viewing && m.seq > conv.lastReadSeq) {
    conv.unread += 1;
    if (m.mentions?.includes(state.me.id)) conv.mentions += 1;
  }
  return conv;
}

/** Advances the sync cursor over every entry of the log seen (messages and changes). */
function noteSeq(conv, seq, live) {
  conv.lastSeq = Math.max(conv.lastSeq, seq);
  if (!conv.messages.has(seq)) conv.seen.add(seq);
  if (conv.synced !== null) {
    while (conv.messages.has(conv.synced + 1) || conv.seen.has(conv.synced + 1)) conv.synced += 1;
    if (live && seq > conv.synced + 1) syncGap(conv);
  }
}

/** Applies an edit, deletion or reaction entry (`type` = its event name) to the message it
 * targets. Applied in seq order over any earlier state, they end at what history returns. */
function applyChange(c, { live }) {
  const conv = state.conversations.get(c.conversationId);
  if (!conv) return null;
  const m = conv.messages.get(c.target);
  if (m && c.type === 'message_updated' && !m.deleted) Object.assign(m, { content: c.content, version: c.version, editedAt: c.editedAt });
  if (m && c.type === 'message_deleted') { m.deleted = true; m.content = undefined; m.reactions = []; }
  if (m && c.type === 'reaction_updated' && !m.deleted) {
    const list = m.reactions ?? [];
    const before = list.find((r) => r.emoji === c.emoji);
    const me = c.userId === state.me.id ? c.on : Boolean(before?.me);
    const next = { emoji: c.emoji, count: c.count, me };
    m.reactions = (before ? list.map((r) => (r.emoji === c.emoji ? next : r)) : [...list, next]).filter((r) => r.count > 0);
  }
  if (c.type === 'message_deleted') {
    for (const x of conv.messages.values()) {
      if (x.replyTo?.seq === c.target) x.replyTo = { ...x.replyTo, quote: undefined, deleted: true };
    }
  }
  noteSeq(conv, c.seq, live);
  return conv;
}

/** Redraws after one or a batch of messages, and reports them read if they are on screen. */
function afterMessages(conv, renderOptions) {
  reportReceived(conv);
  if (conv.id === state.openId) {
    renderMessages(renderOptions);
    renderTyping();
    markRead(conv);
  }
  renderList();
}

/** Tells the senders this device has everything up to the sync cursor (`messages_received`). */
function reportReceived(conv) {
  const seq = conv.synced ?? 0;
  if (seq <= conv.receivedSent || !state.socket?.connected) return;
  conv.receivedSent = seq;
  request('messages_received', { conversationId: conv.id, seq }).catch(() => { conv.receivedSent = 0; });
}

function onDelivered({ messageId }) {
  state.delivered.add(messageId);
  if (state.openId) renderMessages();
}

function onRead({ conversationId, userId, seq }) {
  const conv = state.conversations.get(conversationId);
  if (!conv) return;
  conv.readBy.set(userId, Math.max(conv.readBy.get(userId) ?? 0, seq));
  if (userId === state.me.id) {
    // Read on another of my devices: the watermark counts for all of them.
    conv.lastReadSeq = Math.max(conv.lastReadSeq, seq);
    if (seq >= conv.lastSeq) conv.unread = 0;
    renderList();
  }
  if (conversationId === state.openId) renderMessages();
}

function markRead(conv) {
  if (document.visibilityState !== 'visible' || !state.socket?.connected) return;
  const top = Math.max(0, ...conv.messages.keys());
  if (top <= conv.lastReadSeq) return;
  conv.lastReadSeq = top;
  conv.unread = 0;
  conv.mentions = 0;
  renderList();
  request('mark_read', { conversationId: conv.id, seq: top }).catch(() => {
    conv.lastReadSeq = 0; // try again on the next render
  });
}

document.addEventListener('visibilitychange', () => {
  const conv = state.conversations.get(state.openId);
  if (conv) markRead(conv);
});

/** Loads the page of history before the oldest loaded message (the newest page at first). */
async function loadHistory(conv) {
  if (conv.loadingHistory || conv.nextBeforeSeq === null) return;
  conv.loadingHistory = true;
  $('history-state').textContent = 'Loading earlier messages…';
  try {
    const beforeSeq = conv.nextBeforeSeq;
    const page = await request('history', { conversationId: conv.id, limit: HISTORY_PAGE, ...(beforeSeq ? { beforeSeq } : {}) });
    for (const m of page.messages) addMessage(m, { live: false });
    conv.nextBeforeSeq = page.nextBeforeSeq ?? null;
    afterMessages(conv, { keepOffset: true });
  } finally {
    conv.loadingHistory = false;
    $('history-state').textContent = conv.nextBeforeSeq === null ? 'This is the beginning of the conversation.' : '';
  }
}

// ---- attachments ---------------------------------------------------------------------------

/** Image types the gateway makes thumbnails of (anything else is a file chip). */
const THUMBNAIL_TYPES = ['image/png', 'image/jpeg', 'image/gif', 'image/webp'];
const thumbnails = new Map(); // attachment id → object URL (a Promise while loading)

function formatSize(bytes) {
  if (bytes < 1024) return `${bytes} B`;
  if (bytes < 1024 * 1024) return `${(bytes / 1024).toFixed(1)} KB`;
  return `${(bytes / 1024 / 1024).toFixed(1)} MB`;
}

/** An attachment's bytes (or thumbnail) as a Blob: downloads need the Authorization header,
 * which an <img src> or <a href> cannot send. */
async function attachmentBlob(path) {
  const res = await fetch(path, { headers: { authorization: `Bearer ${state.token}` } });
  if (!res.ok) throw new Error(`HTTP ${res.status}`);
  return res.blob();
}

function thumbnailUrl(id) {
  if (!thumbnails.has(id)) {
    thumbnails.set(id, attachmentBlob(`/api/attachments/${id}/thumbnail`).then(
      (blob) => { const url = URL.createObjectURL(blob); thumbnails.set(id, url); return url; },
      (err) => { thumbnails.delete(id); throw err; }));
  }
  return thumbnails.get(id);
}

async function downloadAttachment(a) {
  try {
    const url = URL.createObjectURL(await attachmentBlob(`/api/attachments/${a.id}`));
    const link = el('a', { href: url, download: a.name });
    document.body.append(link);
    link.click();
    link.remove();
    setTimeout(() => URL.revokeObjectURL(url), 60000);
  } catch (err) {
    showError(`Could not download ${a.name}: ${err.message}`);
  }
}

function attachmentView(a) {
  const chip = el('button', { type: 'button', className: 'file-chip', title: `Download ${a.name}` },
    el('span', { className: 'file-name', textContent: a.name }),
    el('span', { className: 'file-size', textContent: formatSize(a.size) }));
  chip.addEventListener('click', () => downloadAttachment(a));
  if (!THUMBNAIL_TYPES.includes(a.contentType)) return chip;
  const img = el('img', { className: 'thumbnail', alt: a.name, dataset: { attachmentId: a.id } });
  if (a.width && a.height) {
    // Reserve the thumbnail's box before it loads, so the list does not jump.
    const scale = Math.min(1, 320 / Math.max(a.width, a.height));
    img.width = Math.round(a.width * scale);
    img.height = Math.round(a.height * scale);
  }
  const cached = thumbnails.get(a.id);
  if (typeof cached === 'string') img.src = cached;
  else thumbnailUrl(a.id).then((url) => { img.src = url; }, () => { img.alt = `${a.name} (no preview)`; });
  img.addEventListener('click', () => downloadAttachment(a));
  return el('figure', { className: 'attachment' }, img, chip);
}

/** Uploads each file over HTTP (streamed by the gateway, typed by its bytes), then sends it as
 * an image or file message; the message text box's content becomes the first one's caption. */
async function attachFiles(files) {
  const conversationId = state.openId;
  if (!conversationId) return;
  for (const file of files) {
    $('room-error').textContent = '';
    $('upload-state').textContent = `Uploading ${file.name}…`;
    try {
      const res = await fetch(`/api/conversations/${conversationId}/attachments?name=${encodeURIComponent(file.name)}`, {
        method: 'POST',
        headers: { authorization: `Bearer ${state.token}`, 'content-type': file.type || 'application/octet-stream' },
        body: file,
      });
      const data = await res.json().catch(() => null);
      if (!res.ok) throw new Error(data?.error?.message ?? `HTTP ${res.status}`);
      const { attachment } = data;
      const type = THUMBNAIL_TYPES.includes(attachment.contentType) ? 'image' : 'file';
      const input = $('composer-input');
      const caption = input.value.trim();
      input.value = '';
      send(conversationId, caption, { type, attachment });
    } catch (err) {
      showError(`Could not upload ${file.name}: ${err.message}`);
    } finally {
      $('upload-state').textContent = '';
    }
  }
}

// ---- sending -------------------------------------------------------------------------------

function send(conversationId, content, { type = 'text', attachment } = {}) {
  const conv = state.conversations.get(conversationId);
  // @userId of a member mentions them.
  const mentions = (conv?.members ?? []).filter((u) => u !== state.me.id && content.includes(`@${u}`));
  const replyTo = state.replyTo?.conversationId === conversationId ? state.replyTo.seq : undefined;
  setReplyTo(null);
  const item = { clientMsgId: crypto.randomUUID(), conversationId, content, type, attachment, status: 'pending', error: '', replyTo, mentions };
  state.outbox.set(item.clientMsgId, item);
  renderMessages({ stick: true });
  deliver(item);
}

/** Sends one outbox item. Safe to repeat: the server answers a repeated clientMsgId with the
 * original message instead of storing it twice. */
async function deliver(item) {
  if (!state.socket?.connected || item.sending) return; // flushOutbox sends it after reconnect
  item.sending = true;
  try {
    const { message } = await request('send_message', {
      conversationId: item.conversationId,
      content: item.content,
      type: item.type ?? 'text',
      ...(item.attachment ? { attachmentId: item.attachment.id } : {}),
      clientMsgId: item.clientMsgId,
      ...(item.replyTo ? { replyTo: item.replyTo } : {}),
      ...(item.mentions?.length ? { mentions: item.mentions } : {}),
    });
    state.acked.add(message.id);
    onMessage(message, { live: true });
  } catch (err) {
    // No ack (connection lost, timeout): stays pending and is resent on reconnect.
    if (err.code && err.code !== 'unavailable') failOutbox(item, err.message);
  } finally {
    item.sending = false;
    if (state.openId) renderMessages();
  }
}

function failOutbox(item, message) {
  if (!state.outbox.has(item.clientMsgId)) return;
  item.status = 'failed';
  item.error = message;
  renderMessages();
}

function flushOutbox() {
  for (const item of state.outbox.values()) {
    if (item.status === 'pending') deliver(item);
  }
}

// ---- typing --------------------------------------------------------------------------------

const typing = { conversationId: null, sentAt: 0, idle: null };

function typingActivity() {
  const conversationId = state.openId;
  if (!conversationId || !state.socket?.connected) return;
  if ($('composer-input').value.trim() === '') return stopTyping();
  const now = Date.now();
  if (typing.conversationId !== conversationId || now - typing.sentAt > TYPING_RENEW_MS) {
    if (typing.conversationId && typing.conversationId !== conversationId) stopTyping();
    typing.conversationId = conversationId;
    typing.sentAt = now;
    request('typing_start', { conversationId }).catch(() => {});
  }
  clearTimeout(typing.idle);
  typing.idle = setTimeout(stopTyping, TYPING_IDLE_MS);
}

function stopTyping() {
  clearTimeout(typing.idle);
  const { conversationId } = typing;
  typing.conversationId = null;
  typing.sentAt = 0;
  if (conversationId && state.socket?.connected) request('typing_stop', { conversationId }).catch(() => {});
}

// ---- rendering -----------------------------------------------------------------------------

function displayName(userId) {
  return state.names.get(userId) ?? userId;
}

function convTitle(conv) {
  if (conv.title) return conv.title;
  if (conv.kind === 'direct') {
    const other = conv.members.find((u) => u !== state.me.id);
    if (other) return displayName(other);
  }
  return `${conv.kind} ${conv.id.slice(0, 8)}`;
}

function presenceDot(userId) {
  const status = state.presence.get(userId) ?? 'offline';
  return el('span', { className: 'dot', role: 'img', 'aria-label': status, title: status, dataset: { status } });
}

function renderList() {
  const list = $('conversations');
  const items = [...state.conversations.values()].map((conv) => {
    const other = conv.kind === 'direct' ? conv.members.find((u) => u !== state.me.id) : null;
    const button = el('button', { type: 'button', dataset: { conversationId: conv.id } },
      other ? presenceDot(other) : null,
      el('span', { className: 'name', textContent: convTitle(conv) }),
      el('span', { className: 'kind', textContent: conv.kind }),
      conv.mentions > 0 ? el('span', { className: 'mention-badge', textContent: `@${conv.mentions}`, 'aria-label': `${conv.mentions} mentions` }) : null,
      conv.unread > 0 ? el('span', { className: 'unread', textContent: String(conv.unread), 'aria-label': `${conv.unread} unread` }) : null);
    button.setAttribute('aria-current', String(conv.id === state.openId));
    button.addEventListener('click', () => openRoom(conv.id).catch(showError));
    return el('li', {}, button);
  });
  list.replaceChildren(...items);
  if (!items.length) list.append(el('li', { className: 'empty', textContent: 'No conversations yet: create one below.' }));
}

function renderRoomHead() {
  const conv = state.conversations.get(state.openId);
  $('room-title').textContent = conv ? convTitle(conv) : 'Pick a conversation';
  $('room-id').textContent = conv ? `${conv.kind} · ${conv.id}` : '';
  $('members').replaceChildren(...(conv?.members ?? []).map((u) =>
    el('li', { dataset: { userId: u } }, presenceDot(u), el('span', { textContent: u === state.me.id ? `${displayName(u)} (you)` : displayName(u) }))));
  $('add-member-form').hidden = !conv || conv.kind === 'direct';
}

function renderTyping() {
  const conv = state.conversations.get(state.openId);
  const names = conv ? [...conv.typing.values()] : [];
  $('typing').textContent = names.length === 0 ? ''
    : names.length === 1 ? `${names[0]} is typing…` : `${names.join(', ')} are typing…`;
}

function statusOf(conv, m) {
  const readByOther = [...conv.readBy].some(([user, seq]) => user !== state.me.id && seq >= m.seq);
  if (readByOther) return ['read', 'Read'];
  if (state.acked.has(m.id) && !state.delivered.has(m.id)) return ['sent', 'Sent'];
  return ['delivered', 'Delivered'];
}

const QUICK_REACTIONS = ['👍', '❤️', '😂', '🎉'];

function messageItem(conv, m) {
  const mine = m.senderId === state.me.id;
  const time = new Date(m.createdAt);
  const classes = ['message', mine ? 'mine' : '', m.deleted ? 'deleted' : '', m.mentions?.includes(state.me.id) ? 'mentions-me' : ''];
  const li = el('li', { className: classes.filter(Boolean).join(' '), dataset: { seq: String(m.seq), clientMsgId: m.clientMsgId, senderId: m.senderId } },
    el('div', { className: 'meta' },
      el('span', { className: 'sender', textContent: mine ? 'You' : m.senderName }),
      el('time', { dateTime: m.createdAt, textContent: time.toLocaleTimeString([], { hour: '2-digit', minute: '2-digit' }) }),
      m.editedAt && !m.deleted ? el('span', { className: 'edited', textContent: '(edited)' }) : null),
    m.replyTo ? el('blockquote', { className: 'quote', dataset: { seq: String(m.replyTo.seq) },
      textContent: m.replyTo.deleted ? 'Deleted message' : `${m.replyTo.senderName}: ${m.replyTo.quote}` }) : null,
    m.attachment && !m.deleted ? attachmentView(m.attachment) : null,
    m.content || m.deleted ? el('p', { className: 'content', textContent: m.deleted ? 'This message was deleted.' : m.content }) : null);
  if (!m.deleted) {
    const reactions = el('div', { className: 'reactions' }, ...(m.reactions ?? []).map((r) => {
      const chip = el('button', { type: 'button', className: 'reaction', textContent: `${r.emoji} ${r.count}`,
        'aria-pressed': String(r.me), dataset: { emoji: r.emoji } });
      chip.addEventListener('click', () => react(conv, m, r.emoji, !r.me));
      return chip;
    }));
    const actions = el('div', { className: 'actions' },
      ...QUICK_REACTIONS.filter((e) => !(m.reactions ?? []).some((r) => r.emoji === e && r.me)).map((emoji) => {
        const b = el('button', { type: 'button', className: 'react', textContent: emoji, 'aria-label': `React ${emoji}`, dataset: { emoji } });
        b.addEventListener('click', () => react(conv, m, emoji, true));
        return b;
      }),
      actionButton('Reply', 'reply', () => setReplyTo({ conversationId: conv.id, seq: m.seq, senderName: m.senderName, quote: m.content })),
      mine ? actionButton('Edit', 'edit', () => startEdit(conv, m)) : null,
      mine || isModerator(conv) ? actionButton('Delete', 'delete', () => change('delete_message', { conversationId: conv.id, seq: m.seq })) : null);
    li.append(reactions, actions);
  }
  if (mine) {
    const [status, label] = statusOf(conv, m);
    li.append(el('span', { className: 'status', dataset: { status }, textContent: label }));
    // A recipient's device has it (message_delivered_to).
    const received = [...conv.receivedBy].filter(([user, seq]) => user !== state.me.id && seq >= m.seq).length;
    if (received > 0) li.append(el('span', { className: 'receipt', dataset: { received: String(received) }, textContent: `✓✓ received by ${received}` }));
  }
  return li;
}

function actionButton(label, action, onClick) {
  const b = el('button', { type: 'button', className: 'action', textContent: label, dataset: { action } });
  b.addEventListener('click', onClick);
  return b;
}

/** The creator moderates (deletes anything); the server checks it again. */
function isModerator(conv) {
  return conv.ownerId === state.me.id;
}

/** Sends a change request; the entry comes back live (message_updated / _deleted / reaction_updated). */
async function change(event, payload) {
  try {
    const { change: entry } = await request(event, payload);
    if (entry) {
      const conv = applyChange(entry, { live: true });
      if (conv) afterMessages(conv);
    }
  } catch (err) {
    showError(err);
  }
}

function react(conv, m, emoji, on) {
  return change('react', { conversationId: conv.id, target: m.seq, emoji, on, clientMsgId: crypto.randomUUID() });
}

function startEdit(conv, m) {
  state.editing = { conversationId: conv.id, seq: m.seq };
  setReplyTo(null, { keepEditing: true });
  $('composer-input').value = m.content;
  showComposerContext('Editing your message', () => { state.editing = null; $('composer-input').value = ''; });
  $('composer-input').focus();
}

function setReplyTo(reply, { keepEditing = false } = {}) {
  state.replyTo = reply;
  if (!keepEditing) state.editing = null;
  if (reply) showComposerContext(`Replying to ${reply.senderName}: ${reply.quote}`, () => setReplyTo(null));
  else if (!state.editing) showComposerContext(null);
  if (reply) $('composer-input').focus();
}

function showComposerContext(text, onCancel) {
  const box = $('composer-context');
  box.hidden = !text;
  $('composer-context-text').textContent = text ?? '';
  $('composer-context-cancel').onclick = () => { onCancel?.(); showComposerContext(null); };
}

function pendingItem(item) {
  const status = el('span', { className: 'status', dataset: { status: item.status },
    textContent: item.status === 'failed' ? `Not sent: ${item.error}` : 'Sending…' });
  if (item.status === 'failed') {
    const retry = el('button', { type: 'button', textContent: 'Retry' });
    retry.addEventListener('click', () => { item.status = 'pending'; item.error = ''; renderMessages(); deliver(item); });
    status.append(retry);
  }
  return el('li', { className: 'message mine pending', dataset: { clientMsgId: item.clientMsgId } },
    el('div', { className: 'meta' }, el('span', { className: 'sender', textContent: 'You' })),
    item.attachment ? attachmentView(item.attachment) : null,
    item.content ? el('p', { className: 'content', textContent: item.content }) : null,
    status);
}

/** Redraws the open conversation in seq order, pending sends last. Keeps the reader's place:
 * at the bottom it follows new messages; after loading older ones it stays on what it showed. */
function renderMessages({ keepOffset = false, stick = false } = {}) {
  const list = $('messages');
  const conv = state.conversations.get(state.openId);
  if (!conv) return list.replaceChildren();
  const atBottom = stick || list.scrollHeight - list.scrollTop - list.clientHeight < 40;
  const fromBottom = list.scrollHeight - list.scrollTop;
  const seqs = [...conv.messages.keys()].sort((a, b) => a - b);
  const items = seqs.map((s) => messageItem(conv, conv.messages.get(s)));
  for (const item of state.outbox.values()) {
    if (item.conversationId === conv.id) items.push(pendingItem(item));
  }
  list.replaceChildren(...items);
  if (keepOffset && !atBottom) list.scrollTop = list.scrollHeight - fromBottom;
  else if (atBottom || keepOffset) list.scrollTop = list.scrollHeight;
}

async function openRoom(id, { focus = true } = {}) {
  const conv = state.conversations.get(id);
  if (!conv) return;
  if (state.openId !== id) stopTyping();
  state.openId = id;
  $('chat').classList.add('room-open');
  $('composer-input').disabled = false;
  $('send').disabled = false;
  $('attach').disabled = false;
  $('room-error').textContent = '';
  renderList();
  renderRoomHead();
  renderTyping();
  renderMessages({ stick: true });
  if (focus) $('composer-input').focus();
  if (conv.nextBeforeSeq === undefined) await loadHistory(conv);
  else $('history-state').textContent = conv.nextBeforeSeq === null ? 'This is the beginning of the conversation.' : '';
  // Fill the view: keep loading while there is no scrollbar and more history exists.
  const list = $('messages');
  while (state.openId === id && conv.nextBeforeSeq && list.scrollHeight <= list.clientHeight) await loadHistory(conv);
  markRead(conv);
}

function closeRoom() {
  stopTyping();
  state.openId = null;
  $('chat').classList.remove('room-open');
  $('composer-input').disabled = true;
  $('send').disabled = true;
  $('attach').disabled = true;
  renderRoomHead();
  renderMessages();
  renderTyping();
  renderList();
}

function setPresence(userId, status) {
  state.presence.set(userId, status);
  renderList();
  if (state.openId) renderRoomHead();
}

async function refreshPresence() {
  const users = new Set();
  for (const conv of state.conversations.values()) conv.members.forEach((u) => users.add(u));
  const ids = [...users].slice(0, 100); // the server answers at most 100 per request
  if (!ids.length) return;
  const { statuses } = await request('presence', { userIds: ids });
  for (const [userId, s] of Object.entries(statuses)) state.presence.set(userId, s.status);
  renderList();
  if (state.openId) renderRoomHead();
}

function showError(err) {
  $('room-error').textContent = typeof err === 'string' ? err : err.message;
}

// ---- forms ---------------------------------------------------------------------------------

$('composer').addEventListener('submit', (e) => {
  e.preventDefault();
  const input = $('composer-input');
  const content = input.value;
  if (!state.openId || content.trim() === '') return;
  input.value = '';
  stopTyping();
  hideMentionSuggestions();
  if (state.editing?.conversationId === state.openId) {
    const { seq } = state.editing;
    state.editing = null;
    showComposerContext(null);
    change('edit_message', { conversationId: state.openId, seq, content, clientMsgId: crypto.randomUUID() });
  } else {
    send(state.openId, content);
  }
  input.focus();
});

// @-completion from the member list: typing @ and a prefix offers the matching members.
function mentionPrefix() {
  const input = $('composer-input');
  const before = input.value.slice(0, input.selectionStart);
  const m = before.match(/@([\w.-]*)$/);
  return m ? m[1] : null;
}

function hideMentionSuggestions() { $('mention-suggestions').hidden = true; }

function showMentionSuggestions() {
  const conv = state.conversations.get(state.openId);
  const prefix = mentionPrefix();
  const list = $('mention-suggestions');
  const matches = prefix === null || !conv ? [] : conv.members.filter((u) => u !== state.me.id && u.startsWith(prefix)).slice(0, 8);
  list.hidden = matches.length === 0;
  list.replaceChildren(...matches.map((u) => {
    const b = el('button', { type: 'button', textContent: `@${u} ${displayName(u) === u ? '' : displayName(u)}`.trim(), dataset: { userId: u } });
    b.addEventListener('mousedown', (e) => {
      e.preventDefault(); // keep the focus in the composer
      const input = $('composer-input');
      const start = input.selectionStart - prefix.length - 1;
      input.value = `${input.value.slice(0, start)}@${u} ${input.value.slice(input.selectionStart)}`;
      input.selectionStart = input.selectionEnd = start + u.length + 2;
      hideMentionSuggestions();
    });
    return el('li', {}, b);
  }));
}
$('composer-input').addEventListener('input', showMentionSuggestions);

$('composer-input').addEventListener('keydown', (e) => {
  // Enter sends; Shift+Enter keeps the newline. Not while an IME is composing a character.
  if (e.key === 'Enter' && !e.shiftKey && !e.isComposing) {
    e.preventDefault();
    $('composer').requestSubmit();
  }
});
$('composer-input').addEventListener('input', typingActivity);
$('attach').addEventListener('click', () => $('attach-input').click());
$('attach-input').addEventListener('change', (e) => {
  const files = [...e.target.files];
  e.target.value = '';
  attachFiles(files);
});
// Drag and drop onto the open conversation.
$('room').addEventListener('dragover', (e) => {
  if (!state.openId || !e.dataTransfer?.types.includes('Files')) return;
  e.preventDefault();
  $('room').classList.add('dropping');
});
$('room').addEventListener('dragleave', (e) => {
  if (!$('room').contains(e.relatedTarget)) $('room').classList.remove('dropping');
});
$('room').addEventListener('drop', (e) => {
  $('room').classList.remove('dropping');
  if (!state.openId || !e.dataTransfer?.files.length) return;
  e.preventDefault();
  attachFiles([...e.dataTransfer.files]);
});
$('composer-input').addEventListener('blur', stopTyping);

// A reader at the bottom stays there when the list changes size (rotation, resize, keyboard).
let followingBottom = true;
new ResizeObserver(() => {
  const list = $('messages');
  if (followingBottom) list.scrollTop = list.scrollHeight;
}).observe($('messages'));

$('messages').addEventListener('scroll', () => {
  const list = $('messages');
  followingBottom = list.scrollHeight - list.scrollTop - list.clientHeight < 40;
  const conv = state.conversations.get(state.openId);
  if (conv && $('messages').scrollTop < 60) loadHistory(conv).catch(showError);
});

$('back').addEventListener('click', () => {
  closeRoom();
  $('conversations').querySelector('button')?.focus();
});

$('create-form').addEventListener('submit', async (e) => {
  e.preventDefault();
  $('create-error').textContent = '';
  const members = $('create-members').value.split(',').map((s) => s.trim()).filter(Boolean);
  const title = $('create-title').value.trim();
  try {
    const { conversation } = await api('POST', '/api/conversations', {
      kind: $('create-kind').value,
      members,
      ...(title ? { title } : {}),
    });
    // conversation_added may have arrived first; either way follow it once.
    if (!state.conversations.has(conversation.id)) await followConversation(conversation);
    $('create-title').value = '';
    $('create-members').value = '';
    $('new-conversation').open = false;
    await openRoom(conversation.id);
  } catch (err) {
    $('create-error').textContent = `Could not create it: ${err.message}`;
  }
});

$('join-form').addEventListener('submit', async (e) => {
  e.preventDefault();
  $('create-error').textContent = '';
  const conversationId = $('join-id').value.trim();
  try {
    const { conversation } = await request('join_conversation', { conversationId });
    if (!state.conversations.has(conversation.id)) await followConversation(conversation);
    $('join-id').value = '';
    await openRoom(conversation.id);
  } catch (err) {
    $('create-error').textContent = `Could not join: ${err.message}`;
  }
});

$('add-member-form').addEventListener('submit', async (e) => {
  e.preventDefault();
  const userId = $('add-member-id').value.trim();
  if (!state.openId || !userId) return;
  try {
    await api('POST', `/api/conversations/${state.openId}/members`, { userId });
    $('add-member-id').value = '';
    const conv = state.conversations.get(state.openId);
    if (conv && !conv.members.includes(userId)) conv.members.push(userId);
    renderRoomHead();
  } catch (err) {
    showError(`Could not add ${userId}: ${err.message}`);
  }
});

// ---- start ---------------------------------------------------------------------------------

await detectDevMode();
const saved = sessionStorage.getItem(TOKEN_KEY);
if (saved) {
  try {
    signIn(saved);
  } catch {
    sessionStorage.removeItem(TOKEN_KEY);
    showSignIn();
  }
} else {
  showSignIn();
}
