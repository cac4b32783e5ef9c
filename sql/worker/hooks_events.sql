-- What the POSTs of claimed deliveries need ($1 ids, $2 webhooks, $3 attempts so far, $4
-- receipts, from hooks_claim.sql): the URL, the secret and the event (the receipt and its
-- message). A delivery whose receipt is gone (its message was purged) has no row here.
SELECT c.id, c.webhook, c.attempts, w.url AS url_to, s.secret, r.event, r.id AS receipt_id, r.message_id,
       m.message_id AS rfc_message_id, r.recipient, coalesce(r.transport, m.transport) AS transport, m.tags,
       m.metadata::text AS metadata, r.smtp_code, r.enhanced_code, r.response, r.bounce_type::text AS bounce_type,
       r.url, extract(epoch FROM r.at)::float8 AS at
FROM unnest($1::bigint[], $2::text[], $3::int[], $4::bigint[]) AS c(id, webhook, attempts, receipt_id)
JOIN email.receipts r ON r.id = c.receipt_id
JOIN email.messages m ON m.id = r.message_id
JOIN email.webhooks w ON w.name = c.webhook
JOIN email.webhook_secrets s ON s.name = c.webhook
