-- True when a transport named $1 exists (a fallback must name one).
SELECT EXISTS (SELECT 1 FROM email.transports WHERE name = $1)
