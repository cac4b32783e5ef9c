-- The dashboard's latest failures: the last 20 receipts of mail that failed or bounced, newest
-- first, with the answer that said so (the partial index receipts_failures finds them).
SELECT to_char(r.at AT TIME ZONE 'UTC', 'YYYY-MM-DD HH24:MI:SS') AS at, r.message_id,
       coalesce(r.transport, m.transport, '') AS transport, r.recipient, r.event, r.response
FROM email.receipts r
JOIN email.messages m ON m.id = r.message_id
WHERE r.event IN ('failed', 'bounced')
ORDER BY r.at DESC, r.id DESC
LIMIT 20
