-- Conversations, their members and their messages. Ids are UUIDv7 text, times RFC 3339 text.
CREATE TABLE conversations (
    id            TEXT PRIMARY KEY NOT NULL,
    kind          TEXT NOT NULL CHECK (kind IN ('direct', 'group', 'open', 'support')),
    title         TEXT,
    department_id TEXT,
    last_seq      INTEGER NOT NULL DEFAULT 0,
    created_at    TEXT NOT NULL
);

CREATE TABLE conversation_members (
    conversation_id TEXT NOT NULL REFERENCES conversations (id) ON DELETE CASCADE,
    user_id         TEXT NOT NULL,
    role            TEXT NOT NULL CHECK (role IN ('owner', 'member', 'agent')),
    last_read_seq   INTEGER NOT NULL DEFAULT 0,
    joined_at       TEXT NOT NULL,
    PRIMARY KEY (conversation_id, user_id)
);
CREATE INDEX conversation_members_by_user ON conversation_members (user_id);

CREATE TABLE messages (
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
    UNIQUE (sender_id, client_msg_id)
);
