-- The message already queued with idempotency key $1.
SELECT id FROM email.messages WHERE idempotency_key = $1
