-- A cheap fingerprint of the transport table, to notice changes between polls.
SELECT count(*)::text || '/' || coalesce(max(updated_at)::text, '') FROM email.transports
