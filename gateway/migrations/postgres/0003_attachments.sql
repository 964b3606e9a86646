-- Attachments: uploaded files recorded per conversation; their bytes are objects of the
-- attachment store, addressed by sha256. A retried upload (same conversation, uploader, bytes
-- and name) finds its record by the unique key instead of making a second one.
CREATE TABLE attachments (
    id              UUID PRIMARY KEY,
    conversation_id UUID NOT NULL REFERENCES conversations (id) ON DELETE CASCADE,
    uploader_id     TEXT NOT NULL,
    name            TEXT NOT NULL,
    content_type    TEXT NOT NULL,
    size            BIGINT NOT NULL CHECK (size >= 0),
    sha256          TEXT NOT NULL,
    width           INTEGER,
    height          INTEGER,
    created_at      TIMESTAMPTZ NOT NULL,
    CONSTRAINT attachments_retry UNIQUE (conversation_id, uploader_id, sha256, name)
);

-- What a file or image message carries of its attachment (JSON: id, name, contentType, size,
-- width, height), copied at send: attachments never change, and history reads need no join.
ALTER TABLE messages ADD COLUMN attachment TEXT;
