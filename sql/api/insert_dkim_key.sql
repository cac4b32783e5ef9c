-- Stores a DKIM key: the public half in email.dkim_keys, the private half in the owner-only
-- email.dkim_secrets. $1 domain, $2 selector, $3 algorithm, $4 TXT value, $5 private key.
WITH k AS (
    INSERT INTO email.dkim_keys (domain, selector, algorithm, dns_value) VALUES ($1, $2, $3, $4)
    RETURNING domain, selector
)
INSERT INTO email.dkim_secrets (domain, selector, private_key) SELECT domain, selector, $5 FROM k
