-- One 'suppressed' receipt for each recipient ($3) of message $1 that was dropped at enqueue
-- because it is on the suppression list.
INSERT INTO email.receipts (message_id, event, transport, recipient, response)
SELECT $1, 'suppressed', $2, r, 'recipient is on the suppression list'
FROM unnest($3::text[]) AS r
