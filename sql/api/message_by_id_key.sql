-- message_by_key.sql on a distributed outbox, where the message's id $3 comes from its key (one
-- shard to look at); no row when that id belongs to another role's or key's message.
SELECT id, request_hash FROM email.messages WHERE id = $3 AND created_by = $2 AND idempotency_key = $1
