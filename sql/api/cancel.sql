-- Cancels message $1 if it is still queued and role $2 may act on it (it queued it, or
-- email._may_act_on_all), with a 'cancelled' receipt.
-- Returns the id when it was cancelled, no row otherwise.
WITH cancelled AS (
    UPDATE email.messages m
    SET status = 'cancelled', updated_at = now()
    WHERE m.id = $1 AND m.status = 'queued'
      AND (m.created_by = $2 OR email._may_act_on_all($2))
    RETURNING m.id, m.transport
)
INSERT INTO email.receipts (message_id, event, transport, response)
SELECT c.id, 'cancelled', c.transport, 'cancelled by ' || $2
FROM cancelled c
RETURNING message_id
