-- Stores one validated message in the outbox and returns its id. NULL priority means 0 and
-- NULL send_at means now; the first attempt is due at send_at. $22 is 'queued', or
-- 'suppressed' when every recipient was suppressed; $23 is
-- the fingerprint of the call's content when it has an idempotency key; $24-$26 are
-- track_opens, track_clicks and list_unsubscribe as resolved at enqueue; $27 the topic.
INSERT INTO email.messages (transport, sender, recipients, message_id, created_by, cc, bcc, reply_to, subject,
                            body, html, template, template_version, data, headers, tags, metadata, priority,
                            send_at, next_attempt_at, idempotency_key, attachment_count, status, request_hash,
                            track_opens, track_clicks, list_unsubscribe, topic)
VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15, $16, $17, coalesce($18, 0),
        coalesce($19, now()), coalesce($19, now()), $20, $21, $22::email.status, $23, $24, $25, $26, $27)
RETURNING id
