-- The DKIM keys with their private halves (owner-only table), oldest first: for each domain
-- and algorithm the last one signs.
SELECT k.domain, k.selector, k.algorithm, s.private_key
FROM email.dkim_keys k
JOIN email.dkim_secrets s USING (domain, selector)
ORDER BY k.created_at, k.selector
