-- The API keys the listener accepts: name, role, rate and the SHA-256 of the key.
SELECT k.name, k.role::text AS role, k.prefix, k.rate, h.hash
FROM email.api_keys k JOIN email.api_key_hashes h USING (name)
