-- A cheap fingerprint of the current templates: it changes whenever a template is added,
-- deleted or saved, so a process re-reads them (catalog.sql) only then.
SELECT count(*)::text || '/' || coalesce(max(updated_at)::text, '') || '/' || coalesce(sum(version), 0)::text
FROM email.templates
