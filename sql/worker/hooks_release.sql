-- Shutdown: deliveries claimed but not answered go back to the queue at once ($1: their ids),
-- their attempt not counted.
UPDATE email.webhook_deliveries SET lease_until = NULL WHERE id = ANY ($1) AND status = 'queued'
