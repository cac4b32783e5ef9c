-- Takes the default away from every transport but $1, before $1 becomes the default.
UPDATE email.transports SET is_default = false, updated_at = now()
WHERE is_default AND name <> $1
