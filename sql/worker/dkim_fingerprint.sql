-- A digest of the DKIM keys (which exist, and when each was made), to read and parse them again
-- only when they changed: the configuration generation also moves with every suppression.
SELECT md5(coalesce(string_agg(concat_ws('|', domain, selector, algorithm, created_at), E'\n' ORDER BY domain, selector), ''))
FROM email.dkim_keys
