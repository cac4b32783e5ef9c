-- insert_message.sql for a call with an idempotency key ($20): when the calling role ($5)
-- already queued a message with that key (possibly committed by a concurrent call this one
-- waited for), nothing is inserted and no row is returned; the caller then looks the existing
-- message up (message_by_key.sql). Keys are scoped to the role: another role's key never
-- swallows this role's mail. $23 is the fingerprint of the call's content.
INSERT INTO email.messages (transport, sender, recipients, message_id, created_by, cc, bcc, reply_to, subject,
                            body, html, template, template_version, data, headers, tags, metadata, priority,
                            send_at, next_attempt_at, idempotency_key, attachment_count, status, request_hash,
                            track_opens, track_clicks, list_unsubscribe, topic)
VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15, $16, $17, coalesce($18, 0),
        coalesce($19, now()), coalesce($19, now()), $20, $21, $22::email.status, $23, $24, $25, $26, $27)
ON CONFLICT (created_by, idempotency_key) WHERE idempotency_key IS NOT NULL DO NOTHING
RETURNING id
