-- Starts a new tracking key ($1: 32 random bytes) under a random key id; the newest key signs,
-- every key verifies. No row when the random id is taken (the caller draws again).
INSERT INTO email.tracking_keys (secret) VALUES ($1) ON CONFLICT (kid) DO NOTHING RETURNING kid
