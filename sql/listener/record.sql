-- Stores a batch of events heard back ($1: jsonb array) and applies their effects.
SELECT email._record_events($1)
