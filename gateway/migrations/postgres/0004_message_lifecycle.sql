-- Messages that live: edits, deletions and reactions are entries of the conversation's log,
-- numbered from the same gap-free `conversations.last_seq` as messages (in the same transaction).
-- The message row keeps the current state, so history reads one row per message.
ALTER TABLE messages ADD COLUMN edited_at TIMESTAMPTZ;
ALTER TABLE messages ADD COLUMN version BIGINT NOT NULL DEFAULT 0;
-- Set by a deletion, which also empties `content`: the body is erased, not hidden.
ALTER TABLE messages ADD COLUMN deleted_at TIMESTAMPTZ;
-- A reply's quote, as the quoted message was when the reply was sent; the quote is erased when
-- the quoted message is deleted.
ALTER TABLE messages ADD COLUMN reply_to_seq BIGINT;
ALTER TABLE messages ADD COLUMN reply_sender_id TEXT;
ALTER TABLE messages ADD COLUMN reply_sender_name TEXT;
ALTER TABLE messages ADD COLUMN reply_quote TEXT;
-- The mentioned user ids as a JSON array (NULL: none); counted through message_mentions.
ALTER TABLE messages ADD COLUMN mentions TEXT;

-- The delivery watermark per member (`messages_received`), beside the read watermark.
ALTER TABLE conversation_members ADD COLUMN last_received_seq BIGINT NOT NULL DEFAULT 0;

CREATE TABLE message_changes (
    conversation_id UUID NOT NULL REFERENCES conversations (id) ON DELETE CASCADE,
    seq             BIGINT NOT NULL,
    kind            TEXT NOT NULL CHECK (kind IN ('edit', 'delete', 'reaction')),
    -- The seq of the message changed.
    target          BIGINT NOT NULL,
    actor_id        TEXT NOT NULL,
    -- Idempotency key of edits and reactions (NULL for deletions, idempotent by target).
    client_msg_id   TEXT,
    -- An edit's content; erased (NULL) when its message is deleted.
    content         TEXT,
    version         BIGINT,
    emoji           TEXT,
    reaction_on     BOOLEAN,
    reaction_count  BIGINT,
    created_at      TIMESTAMPTZ NOT NULL,
    PRIMARY KEY (conversation_id, seq),
    UNIQUE (conversation_id, actor_id, client_msg_id)
);
CREATE INDEX message_changes_by_target ON message_changes (conversation_id, target);

-- Current reactions: who reacted to which message with what.
CREATE TABLE message_reactions (
    conversation_id UUID NOT NULL REFERENCES conversations (id) ON DELETE CASCADE,
    target          BIGINT NOT NULL,
    emoji           TEXT NOT NULL,
    user_id         TEXT NOT NULL,
    created_at      TIMESTAMPTZ NOT NULL,
    PRIMARY KEY (conversation_id, target, emoji, user_id)
);

-- Who a message mentions (its sender excluded), so mention counts after a read watermark are a
-- range count; rows go with the message's deletion.
CREATE TABLE message_mentions (
    conversation_id UUID NOT NULL REFERENCES conversations (id) ON DELETE CASCADE,
    user_id         TEXT NOT NULL,
    seq             BIGINT NOT NULL,
    PRIMARY KEY (conversation_id, user_id, seq)
);
