-- pg_email: views, triggers, row-level security, privileges and pg_dump registration.
-- Runs last in CREATE EXTENSION, after the Rust functions exist.

-- Template versions: every change bumps the version and keeps a copy.
CREATE FUNCTION email._template_version() RETURNS trigger
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, email, pg_temp AS $$
BEGIN
    IF TG_OP = 'UPDATE' THEN
        IF NEW.name <> OLD.name THEN
            RAISE EXCEPTION 'templates cannot be renamed (template "%")', OLD.name
                USING ERRCODE = 'feature_not_supported', HINT = 'Insert a new template and delete the old one.';
        END IF;
        IF (NEW.subject, NEW.body, NEW.html) IS NOT DISTINCT FROM (OLD.subject, OLD.body, OLD.html) THEN
            NEW.version := OLD.version;
            RETURN NEW;
        END IF;
        NEW.version := OLD.version + 1;
    ELSIF EXISTS (SELECT 1 FROM email.template_versions v
                  WHERE v.name = NEW.name AND v.version = NEW.version
                    AND (v.subject, v.body, v.html) IS NOT DISTINCT FROM (NEW.subject, NEW.body, NEW.html)) THEN
        -- The row is its own stored version (pg_restore puts template_versions back first).
        RETURN NEW;
    ELSE
        NEW.version := coalesce((SELECT max(v.version) FROM email.template_versions v WHERE v.name = NEW.name), 0) + 1;
    END IF;
    PERFORM email._check_template(NEW.name, NEW.subject, NEW.body, NEW.html);
    NEW.updated_at := now();
    INSERT INTO email.template_versions (name, version, subject, body, html)
    VALUES (NEW.name, NEW.version, NEW.subject, NEW.body, NEW.html);
    RETURN NEW;
END $$;

CREATE TRIGGER templates_version BEFORE INSERT OR UPDATE ON email.templates
    FOR EACH ROW EXECUTE FUNCTION email._template_version();

-- A template that another one extends or includes cannot be deleted: queued mail rendered
-- through that layout would break. (Every version of every template stays in
-- template_versions, so deleting a template never breaks mail that pinned it.)
CREATE FUNCTION email._template_in_use() RETURNS trigger
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, email, pg_temp AS $$
DECLARE
    used text;
    user_name text;
BEGIN
    -- Checked once per statement, after it, so that deleting a layout together with every
    -- template that uses it is allowed.
    SELECT g.name, t.name INTO used, user_name
    FROM gone g JOIN email.templates t
      ON concat_ws(E'\n', t.subject, t.body, t.html)
         ~ ('\{%-?\s*(extends|include|import|from)\s+[''"]' || regexp_replace(g.name, '([.\-/])', '\\\1', 'g') || '[''"]')
    LIMIT 1;
    IF used IS NOT NULL THEN
        RAISE EXCEPTION 'template "%" is used by template "%"', used, user_name
            USING ERRCODE = 'dependent_objects_still_exist',
                  HINT = 'Change or delete the templates that extend or include it first.';
    END IF;
    RETURN NULL;
END $$;

CREATE TRIGGER templates_in_use AFTER DELETE ON email.templates
    REFERENCING OLD TABLE AS gone FOR EACH STATEMENT EXECUTE FUNCTION email._template_in_use();

-- Backends cache transports and "are there suppressions at all"; these triggers tell them when
-- to read again.
CREATE FUNCTION email._config_trigger() RETURNS trigger
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, email, pg_temp AS $$
BEGIN
    PERFORM email._config_changed();
    RETURN NULL;
END $$;
CREATE TRIGGER transports_changed AFTER INSERT OR UPDATE OR DELETE OR TRUNCATE ON email.transports
    FOR EACH STATEMENT EXECUTE FUNCTION email._config_trigger();
CREATE TRIGGER suppressions_changed AFTER INSERT OR UPDATE OR DELETE OR TRUNCATE ON email.suppressions
    FOR EACH STATEMENT EXECUTE FUNCTION email._config_trigger();

-- Queue overview for operators: counts per status and transport, age of the oldest due message.
CREATE VIEW email.queue_summary WITH (security_invoker = true) AS
SELECT m.status,
       m.transport,
       count(*) AS messages,
       count(*) FILTER (WHERE m.status = 'queued' AND m.next_attempt_at <= now()) AS due,
       now() - min(m.next_attempt_at) FILTER (WHERE m.status = 'queued' AND m.next_attempt_at <= now())
           AS oldest_due_age,
       max(m.updated_at) AS last_change
FROM email.messages m
GROUP BY m.status, m.transport;

-- Per-day outcome counts from the receipts.
CREATE VIEW email.daily_stats WITH (security_invoker = true) AS
SELECT date_trunc('day', r.at)::date AS day,
       r.transport,
       count(*) FILTER (WHERE r.event = 'sent') AS sent,
       count(*) FILTER (WHERE r.event = 'deferred') AS deferred,
       count(*) FILTER (WHERE r.event = 'failed') AS failed,
       count(*) FILTER (WHERE r.event = 'bounced') AS bounced,
       count(*) FILTER (WHERE r.event = 'suppressed') AS suppressed,
       count(*) FILTER (WHERE r.event = 'delivered') AS delivered,
       count(*) FILTER (WHERE r.event IN ('opened', 'clicked', 'complained', 'unsubscribed')) AS engagement,
       round(avg(r.duration_ms) FILTER (WHERE r.event = 'sent')::numeric, 2) AS avg_send_ms
FROM email.receipts r
GROUP BY 1, 2;

-- Row-level security: a role other than the owner sees only what it queued.
ALTER TABLE email.messages ENABLE ROW LEVEL SECURITY;
CREATE POLICY messages_own ON email.messages FOR SELECT USING (created_by = current_user);
ALTER TABLE email.receipts ENABLE ROW LEVEL SECURITY;
CREATE POLICY receipts_own ON email.receipts FOR SELECT
    USING (EXISTS (SELECT 1 FROM email.messages m WHERE m.id = receipts.message_id));
ALTER TABLE email.attachments ENABLE ROW LEVEL SECURITY;
CREATE POLICY attachments_own ON email.attachments FOR SELECT
    USING (EXISTS (SELECT 1 FROM email.messages m WHERE m.id = attachments.message_id));
ALTER TABLE email.captured ENABLE ROW LEVEL SECURITY;
CREATE POLICY captured_own ON email.captured FOR SELECT
    USING (EXISTS (SELECT 1 FROM email.messages m WHERE m.id = captured.message_id));

-- Nothing is granted to PUBLIC: not the schema, not a table, not a function.
REVOKE ALL ON SCHEMA email FROM PUBLIC;
REVOKE ALL ON ALL TABLES IN SCHEMA email FROM PUBLIC;
REVOKE ALL ON ALL SEQUENCES IN SCHEMA email FROM PUBLIC;
REVOKE ALL ON ALL FUNCTIONS IN SCHEMA email FROM PUBLIC;

-- pg_dump keeps the data of these tables (configuration, outbox, history).
SELECT pg_catalog.pg_extension_config_dump('email.transports', '');
SELECT pg_catalog.pg_extension_config_dump('email.transport_secrets', '');
SELECT pg_catalog.pg_extension_config_dump('email.messages', '');
SELECT pg_catalog.pg_extension_config_dump('email.messages_id_seq', '');
SELECT pg_catalog.pg_extension_config_dump('email.receipts', '');
SELECT pg_catalog.pg_extension_config_dump('email.receipts_id_seq', '');
SELECT pg_catalog.pg_extension_config_dump('email.suppressions', '');
SELECT pg_catalog.pg_extension_config_dump('email.attachments', '');
SELECT pg_catalog.pg_extension_config_dump('email.captured', '');
SELECT pg_catalog.pg_extension_config_dump('email.captured_id_seq', '');
SELECT pg_catalog.pg_extension_config_dump('email.templates', '');
SELECT pg_catalog.pg_extension_config_dump('email.template_versions', '');
