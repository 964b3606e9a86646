-- Messages that live: edits, deletions and reactions are entries of the conversation's log,
-- numbered from the same gap-free `conversations.last_seq` as messages (in the same transaction).
-- The message row keeps the current state, so history reads one row per message.
ALTER TABLE messages ADD COLUMN edited_at TEXT;
ALTER TABLE messages ADD COLUMN version INTEGER NOT NULL DEFAULT 0;
-- Set by a deletion, which also empties `content`: the body is erased, not hidden.
ALTER TABLE messages ADD COLUMN deleted_at TEXT;
-- A reply's quote, as the quoted message was when the reply was sent; the quote is erased when
-- the quoted message is deleted.
ALTER TABLE messages ADD COLUMN reply_to_seq INTEGER;
ALTER TABLE messages ADD COLUMN reply_sender_id TEXT;
ALTER TABLE messages ADD COLUMN reply_sender_name TEXT;
ALTER TABLE messages ADD COLUMN reply_quote TEXT;
-- The mentioned user ids as a JSON array (NULL: none); counted through message_mentions.
ALTER TABLE messages ADD COLUMN mentions TEXT;

-- The delivery watermark per member (`messages_received`), beside the read watermark.
ALTER TABLE conversation_members ADD COLUMN last_received_seq INTEGER NOT NULL DEFAULT 0;

CREATE TABLE message_changes (
    conversation_id TEXT NOT NULL REFERENCES conversations (id) ON DELETE CASCADE,
    seq             INTEGER NOT NULL,
    kind            TEXT NOT NULL CHECK (kind IN ('edit', 'delete', 'reaction')),
    -- The seq of the message changed.
    target          INTEGER NOT NULL,
    actor_id        TEXT NOT NULL,
    -- Idempotency key of edits and reactions (NULL for deletions, idempotent by target).
    client_msg_id   TEXT,
    -- An edit's content; erased (NULL) when its message is deleted.
    content         TEXT,
    version         INTEGER,
    emoji           TEXT,
    reaction_on     INTEGER,
    reaction_count  INTEGER,
    created_at      TEXT NOT NULL,
    PRIMARY KEY (conversation_id, seq),
    UNIQUE (conversation_id, actor_id, client_msg_id)
);
CREATE INDEX message_changes_by_target ON message_changes (conversation_id, target);

-- Current reactions: who reacted to which message with what.
CREATE TABLE message_reactions (
    conversation_id TEXT NOT NULL REFERENCES conversations (id) ON DELETE CASCADE,
    target          INTEGER NOT NULL,
    emoji           TEXT NOT NULL,
    user_id         TEXT NOT NULL,
    created_at      TEXT NOT NULL,
    PRIMARY KEY (conversation_id, target, emoji, user_id)
);

-- Who a message mentions (its sender excluded), so mention counts after a read watermark are a
-- range count; rows go with the message's deletion.
CREATE TABLE message_mentions (
    conversation_id TEXT NOT NULL REFERENCES conversations (id) ON DELETE CASCADE,
    user_id         TEXT NOT NULL,
    seq             INTEGER NOT NULL,
    PRIMARY KEY (conversation_id, user_id, seq)
);
