-- The 'suppressed' receipts of one INSERT statement on email.messages, written when it ends:
-- message $1[i] (transport $2[i]) was not sent to recipient $3[i], for reason $4[i]. A row that
-- another trigger skipped after pg_email's saw it has no receipt.
INSERT INTO email.receipts (message_id, event, transport, recipient, response, source)
SELECT u.id, 'suppressed', u.transport, u.recipient, u.why, 'api'
FROM unnest($1::bigint[], $2::text[], $3::text[], $4::text[]) WITH ORDINALITY AS u(id, transport, recipient, why, n)
WHERE EXISTS (SELECT 1 FROM email.messages m WHERE m.id = u.id)
ORDER BY u.n
