-- A 'suppressed' receipt for recipient $3 of message $1 (transport $2), dropped at enqueue or
-- by a retry, with why ($4): the suppression list, or the message's topic. One row per call:
-- with arrays the plan would be made again for every call (see ONE_ADDRESS in send.rs).
INSERT INTO email.receipts (message_id, event, transport, recipient, response, source)
VALUES ($1, 'suppressed', $2, $3, $4, 'api')
