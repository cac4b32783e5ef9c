-- The webhooks that get deliveries now (hooks_claim.sql's $6). Read apart from the claim: on
-- Citus the webhooks are a reference table, which a claim on this node's deliveries cannot join.
SELECT coalesce(array_agg(name ORDER BY name), '{}') FROM email.webhooks WHERE enabled
