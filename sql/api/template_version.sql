-- The current version of template $1 (no row: no such template).
SELECT version FROM email.templates WHERE name = $1
