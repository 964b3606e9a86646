// A device's view of a conversation's log, shared by the lifecycle and fleet drain tests: the
// entry events, an identity for each entry, and the messages as the entries leave them.

/** The events that carry an entry of a conversation's log, each with its own seq. */
export const LOG_EVENTS = ['new_message', 'message_updated', 'message_deleted', 'reaction_updated'];

/**
 * What one entry of the log is, the same whichever way it arrived (live event, resume, `sync`,
 * or the ack that committed it), so two different entries at one seq are told apart.
 */
export function entryKey(name, p) {
  switch (name) {
    case 'new_message': return p.id;
    case 'message_updated': return `edit ${p.target} v${p.version}`;
    case 'message_deleted': return `delete ${p.target}`;
    case 'reaction_updated': return `react ${p.target} ${p.emoji} ${p.userId} ${p.on ? 'on' : 'off'}`;
    default: throw new Error(`${name} is not an entry of the log`);
  }
}

/** A device's view of one conversation, built by applying log events in the order given. */
export class View {
  constructor(me) { this.me = me; this.messages = new Map(); this.lastSeq = 0; }

  apply(name, p) {
    this.lastSeq = Math.max(this.lastSeq, p.seq);
    if (name === 'new_message') {
      this.messages.set(p.seq, {
        seq: p.seq,
        content: p.deleted ? undefined : p.content,
        deleted: Boolean(p.deleted),
        version: p.version ?? 0,
        reactions: new Map((p.reactions ?? []).map((r) => [r.emoji, { count: r.count, me: r.me }])),
      });
      return;
    }
    const m = this.messages.get(p.target);
    if (!m) return;
    if (name === 'message_updated' && !m.deleted) { m.content = p.content; m.version = p.version; }
    if (name === 'message_deleted') { m.deleted = true; m.content = undefined; m.reactions = new Map(); }
    if (name === 'reaction_updated' && !m.deleted) {
      const r = m.reactions.get(p.emoji) ?? { count: 0, me: false };
      r.count = p.count;
      if (p.userId === this.me) r.me = p.on;
      if (r.count === 0) m.reactions.delete(p.emoji); else m.reactions.set(p.emoji, r);
    }
  }

  /** Sync's answer: messages and changes, merged back into seq order. */
  applySync(synced) {
    for (const [name, p] of syncedEntries(synced)) this.apply(name, p);
  }

  state() {
    return [...this.messages.values()].sort((x, y) => x.seq - y.seq).map((m) => ({
      seq: m.seq, content: m.content, deleted: m.deleted, version: m.version,
      reactions: [...m.reactions.entries()].sort().map(([emoji, r]) => `${emoji}:${r.count}:${r.me}`),
    }));
  }
}

/** Sync's answer as [event name, payload] entries in seq order. */
export function syncedEntries(synced) {
  return [
    ...synced.messages.map((m) => ['new_message', m]),
    ...(synced.changes ?? []).map((c) => [c.type, c]),
  ].sort((x, y) => x[1].seq - y[1].seq);
}
