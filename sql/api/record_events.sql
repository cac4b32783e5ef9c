-- Stores events heard back ($1: jsonb array) and applies their effects (email._record_events).
SELECT email._record_events($1)
