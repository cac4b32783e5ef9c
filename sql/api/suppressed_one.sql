-- suppressed_among.sql for one address $1 (the common case, in fewer plan nodes).
SELECT CASE WHEN EXISTS (SELECT 1 FROM email.suppressions s WHERE s.address IN ($1, '*@' || split_part($1, '@', 2)))
              OR EXISTS (SELECT 1 FROM email.forget_salt k JOIN email.forgotten f
                         ON f.hash = sha256(k.salt || convert_to($1, 'UTF8')))
            THEN ARRAY[$1::text] ELSE '{}'::text[] END AS suppressed
