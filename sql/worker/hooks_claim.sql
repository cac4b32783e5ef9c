-- Claims due webhook deliveries for one worker: per enabled webhook at most $3 minus what this
-- worker already has in flight for it ($1 names, $2 counts), $5 in all, under a lease of $4
-- milliseconds (an attempt whose worker died is claimed again when it expires). SKIP LOCKED lets
-- the workers share the queue. Each row comes back with what its POST needs: the URL, the
-- secret and the event (the receipt and its message). The attempt is counted when it is recorded.
WITH picked AS MATERIALIZED (
    SELECT d.id
    FROM email.webhooks w
    LEFT JOIN unnest($1::text[], $2::int[]) AS busy(name, n) ON busy.name = w.name
    CROSS JOIN LATERAL (
        SELECT d.id FROM email.webhook_deliveries d
        WHERE d.webhook = w.name AND d.status = 'queued' AND d.next_attempt_at <= now()
          AND (d.lease_until IS NULL OR d.lease_until < now())
        ORDER BY d.next_attempt_at, d.id
        LIMIT greatest($3 - coalesce(busy.n, 0), 0)
        FOR UPDATE OF d SKIP LOCKED
    ) d
    WHERE w.enabled
    LIMIT $5
)
UPDATE email.webhook_deliveries d
SET lease_until = now() + $4 * interval '1 millisecond'
FROM picked, email.webhooks w, email.webhook_secrets s, email.receipts r, email.messages m
WHERE d.id = picked.id AND w.name = d.webhook AND s.name = d.webhook AND r.id = d.receipt_id AND m.id = r.message_id
RETURNING d.id, d.webhook, d.attempts, w.url AS url_to, s.secret, r.event, r.id AS receipt_id, r.message_id,
          m.message_id AS rfc_message_id, r.recipient, coalesce(r.transport, m.transport) AS transport, m.tags,
          m.metadata::text AS metadata, r.smtp_code, r.enhanced_code, r.response, r.bounce_type::text AS bounce_type,
          r.url, extract(epoch FROM r.at)::float8 AS at
