-- Stores a batch of events heard back ($1: a JSON array, as text) and applies their effects.
SELECT email._record_events($1::jsonb)
