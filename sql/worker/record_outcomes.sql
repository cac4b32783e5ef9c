-- Records a batch of outcomes ($1: jsonb array of deliver::outcome::Update; $2: their ids). A
-- row is only changed while it is still this attempt's lease, so a late result never overwrites
-- a newer claim. What the statuses mean is decided in Rust (deliver/outcome.rs); this statement
-- only keeps what must be derived from the row itself: sent_at is set once, by the first attempt
-- that reached a recipient, and pending_recipients lives only while the message is queued.
-- Template mail brings the subject and parts it was rendered to, so the row shows them.
-- Written so that Citus can run it on a distributed outbox (email.distribute()): the times are
-- computed in the subquery (Citus refuses STABLE functions next to column references in an
-- UPDATE), status comes typed, and `id = ANY ($2)` routes it to the shards holding the batch.
-- On a local outbox the worker prepares it once and runs that one generic plan for every batch;
-- `id = ANY ($2)` is what finds the batch there too, by primary key. The lease check is written
-- as a range from 'sending' to 'sending' (the same rows) so that it does not match the partial
-- index of leased rows: a generic plan, not knowing the batch, would take that index for one
-- row and walk all of it every time. (Not `status::text`: a cast to text is STABLE, which
-- Citus refuses here.)
UPDATE email.messages m
SET status = u.status,
    next_attempt_at = CASE WHEN u.status = 'queued' THEN u.next_at ELSE m.next_attempt_at END,
    transport = u.transport,
    last_error = u.last_error,
    provider_message_id = coalesce(u.provider_message_id, m.provider_message_id),
    pending_recipients = CASE WHEN u.status = 'queued' THEN coalesce(u.pending, m.pending_recipients) END,
    sent_at = CASE WHEN u.status = 'sent' OR (u.status = 'queued' AND u.provider_message_id IS NOT NULL)
                   THEN coalesce(m.sent_at, u.now_at) ELSE m.sent_at END,
    subject = coalesce(u.subject, m.subject), body = coalesce(u.body, m.body), html = coalesce(u.html, m.html),
    lease_until = NULL, claimed_by = NULL, updated_at = u.now_at
FROM (SELECT x.*, now() AS now_at, now() + x.delay_ms * interval '1 millisecond' AS next_at
      FROM jsonb_to_recordset($1) AS x(id bigint, attempt int, status email.status, delay_ms float8, transport text,
                                       last_error text, provider_message_id text, pending text[],
                                       subject text, body text, html text)) u
WHERE m.id = u.id AND m.id = ANY ($2) AND m.status >= 'sending' AND m.status <= 'sending' AND m.attempts = u.attempt
