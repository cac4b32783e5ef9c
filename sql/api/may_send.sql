-- Whether role $1 may send: it exists, and has USAGE on schema email and EXECUTE on email.send
-- (what SMTP submission requires of an API key's role, as the HTTP API's email.send call does).
SELECT CASE WHEN EXISTS (SELECT FROM pg_catalog.pg_roles r WHERE r.rolname = $1)
            THEN pg_catalog.has_schema_privilege($1, 'email', 'USAGE')
                 AND pg_catalog.has_function_privilege($1, 'email.send(text, text, text, text, text, text, text, text, jsonb, jsonb, text[], jsonb, timestamptz, text, text, integer, boolean, boolean, text, boolean)', 'EXECUTE')
            ELSE false END AS may_send
