-- The message role $2 already queued with idempotency key $1, and the fingerprint of the call
-- that queued it (NULL for messages queued before 0.2.0).
SELECT id, request_hash FROM email.messages WHERE created_by = $2 AND idempotency_key = $1
