-- The 'suppressed' receipts of one INSERT statement on a distributed outbox (Citus), for rows
-- known to exist (existing_ids.sql): message $1[i] (transport $2[i]) was not sent to recipient
-- $3[i], for reason $4[i].
INSERT INTO email.receipts (message_id, event, transport, recipient, response, source)
SELECT u.id, 'suppressed', u.transport, u.recipient, u.why, 'api'
FROM unnest($1::bigint[], $2::text[], $3::text[], $4::text[]) AS u(id, transport, recipient, why)
