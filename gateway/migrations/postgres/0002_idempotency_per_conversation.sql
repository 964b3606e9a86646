-- The idempotency key is per conversation: (conversation_id, sender_id, client_msg_id). Keyed by
-- (sender_id, client_msg_id) alone, a client numbering its ids per conversation had its second
-- conversation's message answered with the first conversation's (and nothing stored).
ALTER TABLE messages DROP CONSTRAINT messages_idempotency;
ALTER TABLE messages ADD CONSTRAINT messages_idempotency UNIQUE (conversation_id, sender_id, client_msg_id);
