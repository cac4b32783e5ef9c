-- Suppresses the addresses a batch of outcomes earned ($1: jsonb array of {address,
-- message_id}: recipients refused with an RFC 3463 5.1.x code). Run only when there are some:
-- on Citus the suppressions are a reference table, written on every node.
INSERT INTO email.suppressions (address, reason, message_id)
SELECT DISTINCT ON (x.address) x.address, 'bounced', x.message_id
FROM jsonb_to_recordset($1) AS x(address text, message_id bigint)
ON CONFLICT (address) DO NOTHING
