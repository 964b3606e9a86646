-- Conversations, their members and their messages: the SQLite schema with native UUID and
-- timestamptz types (microsecond precision, the precision the domain stamps).
CREATE TABLE conversations (
    id            UUID PRIMARY KEY,
    kind          TEXT NOT NULL CHECK (kind IN ('direct', 'group', 'open', 'support')),
    title         TEXT,
    department_id TEXT,
    last_seq      BIGINT NOT NULL DEFAULT 0,
    created_at    TIMESTAMPTZ NOT NULL
);

CREATE TABLE conversation_members (
    conversation_id UUID NOT NULL REFERENCES conversations (id) ON DELETE CASCADE,
    user_id         TEXT NOT NULL,
    role            TEXT NOT NULL CHECK (role IN ('owner', 'member', 'agent')),
    last_read_seq   BIGINT NOT NULL DEFAULT 0,
    joined_at       TIMESTAMPTZ NOT NULL,
    PRIMARY KEY (conversation_id, user_id)
);
CREATE INDEX conversation_members_by_user ON conversation_members (user_id);

CREATE TABLE messages (
    id              UUID PRIMARY KEY,
    conversation_id UUID NOT NULL REFERENCES conversations (id) ON DELETE CASCADE,
    seq             BIGINT NOT NULL,
    sender_id       TEXT NOT NULL,
    sender_name     TEXT NOT NULL,
    client_msg_id   TEXT NOT NULL,
    kind            TEXT NOT NULL CHECK (kind IN ('text', 'file', 'image')),
    content         TEXT NOT NULL,
    created_at      TIMESTAMPTZ NOT NULL,
    -- History pages and sync both read by (conversation_id, seq): this unique index serves them.
    CONSTRAINT messages_conversation_seq UNIQUE (conversation_id, seq),
    CONSTRAINT messages_idempotency UNIQUE (sender_id, client_msg_id)
);
