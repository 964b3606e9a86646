-- The idempotency key is per conversation: (conversation_id, sender_id, client_msg_id). Keyed by
-- (sender_id, client_msg_id) alone, a client numbering its ids per conversation had its second
-- conversation's message answered with the first conversation's (and nothing stored).
-- SQLite cannot drop a table constraint, so the table is rebuilt (nothing references it).
CREATE TABLE messages_new (
    id              TEXT PRIMARY KEY NOT NULL,
    conversation_id TEXT NOT NULL REFERENCES conversations (id) ON DELETE CASCADE,
    seq             INTEGER NOT NULL,
    sender_id       TEXT NOT NULL,
    sender_name     TEXT NOT NULL,
    client_msg_id   TEXT NOT NULL,
    kind            TEXT NOT NULL CHECK (kind IN ('text', 'file', 'image')),
    content         TEXT NOT NULL,
    created_at      TEXT NOT NULL,
    UNIQUE (conversation_id, seq),
    UNIQUE (conversation_id, sender_id, client_msg_id)
);
INSERT INTO messages_new (id, conversation_id, seq, sender_id, sender_name, client_msg_id, kind, content, created_at)
    SELECT id, conversation_id, seq, sender_id, sender_name, client_msg_id, kind, content, created_at
    FROM messages;
DROP TABLE messages;
ALTER TABLE messages_new RENAME TO messages;
