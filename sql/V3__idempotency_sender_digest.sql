-- Idempotency keyed by sender and checked by body: a message_id is one sender's key, and the record keeps the
-- SHA-256 of the body it was first used with, so another sender cannot take over a key and a reused key with another
-- body is refused instead of answered with the first reply.
-- sender: the AMQP user_id (vouched for by the broker), '' when the message had none. body_digest: NULL for records
-- written before this migration (their bodies are not compared).
ALTER TABLE processed_message
    ADD COLUMN sender text NOT NULL DEFAULT '',
    ADD COLUMN body_digest bytea;
ALTER TABLE processed_message DROP CONSTRAINT processed_message_pkey;
ALTER TABLE processed_message ADD PRIMARY KEY (sender, message_type, message_id);

-- A connection opened by a heartbeat before its connection.open: the open completes it (its connection_type and
-- client_info) without announcing it again.
ALTER TABLE agent_connection ADD COLUMN opened_by_heartbeat boolean NOT NULL DEFAULT false;
