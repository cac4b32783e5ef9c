-- Stores a message received by SMTP submission: its MIME as it is to be delivered ($7), the
-- envelope sender and recipients, its Message-ID, the decoded subject, as role $5. $8 is
-- 'queued', or 'suppressed' when every recipient was dropped.
INSERT INTO email.messages (transport, sender, recipients, message_id, created_by, subject, raw, status)
VALUES ($1, $2, $3, $4, $5, $6, $7, $8::email.status)
RETURNING id
