-- A digest of every transport as the worker builds it (secret DSN included, so a new password
-- is noticed; updated_at too, so touching a row asks for a rebuild, e.g. after a ca= file was
-- replaced), to rebuild the transports only when one changed: rebuilding drops pooled
-- connections.
SELECT md5(coalesce(string_agg(concat_ws('|', t.name, t.fallback, t.updated_at, s.dsn), E'\n' ORDER BY t.name), ''))
FROM email.transports t
JOIN email.transport_secrets s USING (name)
