-- Disables the webhooks whose URL answered 410 Gone ($1 names, $2 why).
UPDATE email.webhooks w
SET enabled = false, disabled_at = now(), disabled_because = x.why
FROM unnest($1::text[], $2::text[]) AS x(name, why)
WHERE w.name = x.name AND w.enabled
