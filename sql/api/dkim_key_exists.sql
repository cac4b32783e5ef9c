-- Whether a DKIM key ($1 domain, $2 selector) exists.
SELECT EXISTS (SELECT 1 FROM email.dkim_keys WHERE domain = $1 AND selector = $2)
