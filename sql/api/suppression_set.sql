-- The suppression list for a long INSERT into email.messages, read once by the statement:
-- every listed address (and '*@domain'), and the salt and hashes of erased addresses. NULL
-- addresses when the two lists hold more than $1 entries together: the statement then goes on
-- probing the index for each row.
WITH n AS (
    SELECT (SELECT count(*) FROM (SELECT 1 FROM email.suppressions LIMIT $1 + 1) s)
         + (SELECT count(*) FROM (SELECT 1 FROM email.forgotten LIMIT $1 + 1) f) AS entries
)
SELECT CASE WHEN n.entries <= $1 THEN (SELECT coalesce(array_agg(address), '{}') FROM email.suppressions) END AS addresses,
       (SELECT salt FROM email.forget_salt) AS salt,
       CASE WHEN n.entries <= $1 THEN (SELECT coalesce(array_agg(encode(hash, 'hex')), '{}') FROM email.forgotten) END AS forgotten
FROM n
