-- The name of the current default transport, if any.
SELECT name FROM email.transports WHERE is_default
