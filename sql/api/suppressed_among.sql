-- Which of the addresses $1 (bare, lower-cased) are suppressed: listed themselves, their whole
-- domain listed as '*@domain', or erased by email.forget (kept as a salted hash: the hash is
-- written out here, as email._forgotten_hash would cost a function call per address). Primary-key
-- lookups only.
SELECT coalesce(array_agg(a), '{}') AS suppressed
FROM unnest($1::text[]) AS a
WHERE EXISTS (SELECT 1 FROM email.suppressions s WHERE s.address IN (a, '*@' || split_part(a, '@', 2)))
   OR EXISTS (SELECT 1 FROM email.forget_salt k JOIN email.forgotten f
                   ON f.hash = sha256(k.salt || convert_to(a, 'UTF8')))
