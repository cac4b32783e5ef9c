-- insert_message.sql for a call with an idempotency key ($20): when a message with that key
-- exists (possibly committed by a concurrent call this one waited for), nothing is inserted
-- and no row is returned; the caller then looks the existing id up (message_by_key.sql).
INSERT INTO email.messages (transport, sender, recipients, message_id, created_by, cc, bcc, reply_to, subject,
                            body, html, template, template_version, data, headers, tags, metadata, priority,
                            send_at, next_attempt_at, idempotency_key, attachment_count, status)
VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15, $16, $17, coalesce($18, 0),
        coalesce($19, now()), coalesce($19, now()), $20, $21, $22::email.status)
ON CONFLICT (idempotency_key) WHERE idempotency_key IS NOT NULL DO NOTHING
RETURNING id
