-- pg_email 0.1.0 -> 0.2.0. Run by ALTER EXTENSION pg_email UPDATE; keeps every row.
-- Grown by each change of the 0.2.0 cycle; a fresh CREATE EXTENSION of 0.2.0 and an updated
-- 0.1.0 must end with the same catalog (tests/e2e/test_upgrade.py compares them).

-- The one definition of "finished", and the index that uses it.
CREATE FUNCTION email._is_finished(status email.status) RETURNS boolean
LANGUAGE sql IMMUTABLE PARALLEL SAFE
RETURN status IN ('sent', 'delivered', 'bounced', 'failed', 'cancelled', 'suppressed');
REVOKE ALL ON FUNCTION email._is_finished(email.status) FROM PUBLIC;
DROP INDEX email.messages_finished;
CREATE INDEX messages_finished ON email.messages (created_at) WHERE email._is_finished(status);

-- A fallback names an existing transport. 0.1.0 let one point at a transport deleted later;
-- the worker ignored such a fallback, so clearing it changes nothing that happens.
UPDATE email.transports t SET fallback = NULL
WHERE fallback IS NOT NULL AND NOT EXISTS (SELECT 1 FROM email.transports f WHERE f.name = t.fallback);
ALTER TABLE email.transports ADD CONSTRAINT transports_fallback_fkey FOREIGN KEY (fallback)
    REFERENCES email.transports (name) ON DELETE SET NULL ON UPDATE CASCADE;

-- A provider's own error code gets its own column; enhanced_code is RFC 3463 only. Receipts
-- written by 0.1.0 held provider codes (Postmark "406", Resend "validation_error", SES
-- "MessageRejected") in enhanced_code: move them.
ALTER TABLE email.receipts ADD COLUMN provider_code text;
UPDATE email.receipts SET provider_code = enhanced_code, enhanced_code = NULL
WHERE enhanced_code IS NOT NULL AND enhanced_code !~ '^[245]\.[0-9]{1,3}\.[0-9]{1,3}$';

-- Template upserts (INSERT ... ON CONFLICT (name) DO UPDATE) record one version per real
-- change: the version copy moves from the BEFORE trigger to an AFTER trigger.
CREATE OR REPLACE FUNCTION email._template_version() RETURNS trigger
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, email, pg_temp AS $$
BEGIN
    IF TG_OP = 'UPDATE' THEN
        IF NEW.name <> OLD.name THEN
            RAISE EXCEPTION 'templates cannot be renamed (template "%")', OLD.name
                USING ERRCODE = 'feature_not_supported', HINT = 'Insert a new template and delete the old one.';
        END IF;
        IF (NEW.subject, NEW.body, NEW.html) IS NOT DISTINCT FROM (OLD.subject, OLD.body, OLD.html) THEN
            NEW.version := OLD.version;
            NEW.updated_at := OLD.updated_at;
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
    RETURN NEW;
END $$;

CREATE FUNCTION email._template_version_saved() RETURNS trigger
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, email, pg_temp AS $$
BEGIN
    INSERT INTO email.template_versions (name, version, subject, body, html)
    VALUES (NEW.name, NEW.version, NEW.subject, NEW.body, NEW.html)
    ON CONFLICT (name, version) DO NOTHING;
    RETURN NULL;
END $$;
REVOKE ALL ON FUNCTION email._template_version_saved() FROM PUBLIC;

CREATE TRIGGER templates_version_saved AFTER INSERT OR UPDATE ON email.templates
    FOR EACH ROW EXECUTE FUNCTION email._template_version_saved();

-- Transports: replacing one keeps its default and fallback unless the call says otherwise, and
-- the secret may come as its own argument.
DROP FUNCTION email.add_transport(text, text, bool, text);
CREATE FUNCTION email.add_transport(
    "name" TEXT, "dsn" TEXT, "is_default" bool DEFAULT NULL, "fallback" TEXT DEFAULT NULL,
    "secret" TEXT DEFAULT NULL
) RETURNS void
VOLATILE SECURITY DEFINER PARALLEL UNSAFE
SET search_path TO pg_catalog, email, pg_temp
LANGUAGE c AS 'MODULE_PATHNAME', 'add_transport_wrapper';
REVOKE ALL ON FUNCTION email.add_transport(text, text, bool, text, text) FROM PUBLIC;
CREATE FUNCTION email.update_transport("name" TEXT, "is_default" bool DEFAULT NULL, "fallback" TEXT DEFAULT NULL)
RETURNS void
VOLATILE SECURITY DEFINER PARALLEL UNSAFE
SET search_path TO pg_catalog, email, pg_temp
LANGUAGE c AS 'MODULE_PATHNAME', 'update_transport_wrapper';
REVOKE ALL ON FUNCTION email.update_transport(text, bool, text) FROM PUBLIC;

-- Retries: bulk recovery after an outage.
CREATE FUNCTION email.retry_all(
    "transport" TEXT DEFAULT NULL, "status" TEXT DEFAULT NULL, "since" timestamp with time zone DEFAULT NULL
) RETURNS bigint
VOLATILE SECURITY DEFINER PARALLEL UNSAFE
SET search_path TO pg_catalog, email, pg_temp
LANGUAGE c AS 'MODULE_PATHNAME', 'retry_all_wrapper';
REVOKE ALL ON FUNCTION email.retry_all(text, text, timestamp with time zone) FROM PUBLIC;

-- Idempotency keys are scoped to the role that used them, and remember the call's fingerprint.
ALTER TABLE email.messages ADD COLUMN request_hash text;
DROP INDEX email.messages_idempotency_key;
CREATE UNIQUE INDEX messages_idempotency_key ON email.messages (created_by, idempotency_key)
    WHERE idempotency_key IS NOT NULL;

-- worker_status names the database, and says so where no worker serves it.
DROP FUNCTION email.worker_status();
CREATE FUNCTION email.worker_status() RETURNS TABLE (
    "worker" INT, "pid" INT, "state" TEXT, "in_flight" INT, "sent" bigint, "deferred" bigint, "failed" bigint,
    "bounced" bigint, "started_at" timestamp with time zone, "last_activity" timestamp with time zone,
    "database" TEXT
)
STRICT VOLATILE PARALLEL UNSAFE
LANGUAGE c AS 'MODULE_PATHNAME', 'worker_status_wrapper';
REVOKE ALL ON FUNCTION email.worker_status() FROM PUBLIC;
CREATE FUNCTION email._warn_if_unserved() RETURNS void
STRICT VOLATILE PARALLEL UNSAFE
LANGUAGE c AS 'MODULE_PATHNAME', '_warn_if_unserved_wrapper';
REVOKE ALL ON FUNCTION email._warn_if_unserved() FROM PUBLIC;

-- Suppressions: any letter case, a default reason, helpers, and whole domains (*@domain).
ALTER TABLE email.suppressions ALTER COLUMN reason SET DEFAULT 'manual';
-- Suppressions: an address is stored bare and lower-cased, whatever case it is given in; a
-- whole domain is suppressed with '*@domain'.
CREATE FUNCTION email._suppression_address() RETURNS trigger
LANGUAGE plpgsql SET search_path = pg_catalog, email, pg_temp AS $$
BEGIN
    NEW.address := lower(btrim(NEW.address));
    IF NEW.address !~ '^[^@[:space:]]+@[^@[:space:]]+$' THEN
        RAISE EXCEPTION 'invalid address: "%" is not an address (local@domain) or a domain (*@domain)', NEW.address
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    IF NEW.address LIKE '%*%' AND NEW.address !~ '^\*@[^*]+$' THEN
        RAISE EXCEPTION 'invalid address: "%": only a whole domain can be suppressed with *, as in *@example.org', NEW.address
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    RETURN NEW;
END $$;
CREATE TRIGGER suppressions_address BEFORE INSERT OR UPDATE OF address ON email.suppressions
    FOR EACH ROW EXECUTE FUNCTION email._suppression_address();

-- Adds an address (or '*@domain') to the suppression list; true if it was not on it.
CREATE FUNCTION email.suppress(address text, reason text DEFAULT 'manual') RETURNS boolean
LANGUAGE sql SECURITY DEFINER SET search_path = pg_catalog, email, pg_temp
BEGIN ATOMIC
    WITH added AS (
        INSERT INTO email.suppressions (address, reason) VALUES (suppress.address, suppress.reason)
        ON CONFLICT DO NOTHING RETURNING 1
    )
    SELECT count(*) > 0 FROM added;
END;

-- Takes an address (or '*@domain') off the suppression list; true if it was on it.
CREATE FUNCTION email.unsuppress(address text) RETURNS boolean
LANGUAGE sql SECURITY DEFINER SET search_path = pg_catalog, email, pg_temp
BEGIN ATOMIC
    WITH removed AS (
        DELETE FROM email.suppressions s WHERE s.address = lower(btrim(unsuppress.address)) RETURNING 1
    )
    SELECT count(*) > 0 FROM removed;
END;

REVOKE ALL ON FUNCTION email._suppression_address() FROM PUBLIC;
REVOKE ALL ON FUNCTION email.suppress(text, text) FROM PUBLIC;
REVOKE ALL ON FUNCTION email.unsuppress(text) FROM PUBLIC;

-- A template may only extend, include or import templates that exist. Checked when the
-- transaction commits, so one migration may save a layout, its partials and its children in
-- any order.
CREATE FUNCTION email._template_references() RETURNS trigger
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, email, pg_temp AS $$
DECLARE
    missing text;
BEGIN
    SELECT m[2] INTO missing
    FROM email.templates t,
         regexp_matches(concat_ws(E'\n', t.subject, t.body, t.html),
                        '\{%-?\s*(extends|include|import|from)\s+[''"]([^''"]+)[''"]', 'g') AS m
    WHERE t.name = NEW.name AND m[2] <> t.name
      AND NOT EXISTS (SELECT 1 FROM email.templates u WHERE u.name = m[2])
    LIMIT 1;
    IF missing IS NOT NULL THEN
        RAISE EXCEPTION 'template "%" uses template "%", which does not exist', NEW.name, missing
            USING ERRCODE = 'undefined_object',
                  HINT = 'Save the layouts and partials a template uses in the same transaction or before it.';
    END IF;
    RETURN NULL;
END $$;
CREATE CONSTRAINT TRIGGER templates_references AFTER INSERT OR UPDATE ON email.templates
    DEFERRABLE INITIALLY DEFERRED FOR EACH ROW EXECUTE FUNCTION email._template_references();

REVOKE ALL ON FUNCTION email._template_references() FROM PUBLIC;

-- Checking a transport without waiting for real mail.
CREATE FUNCTION email.test_transport("name" TEXT, "recipient" TEXT DEFAULT NULL)
RETURNS TABLE ("step" TEXT, "ok" bool, "detail" TEXT)
VOLATILE SECURITY DEFINER PARALLEL UNSAFE
SET search_path TO pg_catalog, email, pg_temp
LANGUAGE c AS 'MODULE_PATHNAME', 'test_transport_wrapper';
REVOKE ALL ON FUNCTION email.test_transport(text, text) FROM PUBLIC;

-- DROP EXTENSION pg_email deletes the outbox: refuse it while mail is queued or being sent,
-- unless pg_email.drop_with_queued_mail is on. (Event triggers see only the command's text at
-- its start, so any DROP EXTENSION naming pg_email is checked.)
CREATE FUNCTION email._guard_drop() RETURNS event_trigger
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, email, pg_temp AS $$
DECLARE
    waiting bigint;
BEGIN
    IF current_query() !~* 'pg_email' OR current_setting('pg_email.drop_with_queued_mail')::boolean THEN
        RETURN;
    END IF;
    SELECT count(*) INTO waiting FROM email.messages WHERE status IN ('queued', 'sending');
    IF waiting > 0 THEN
        RAISE EXCEPTION 'pg_email still has % messages queued or being sent; DROP EXTENSION would delete them', waiting
            USING ERRCODE = 'dependent_objects_still_exist',
                  HINT = 'Let them be sent, cancel or purge them, or SET pg_email.drop_with_queued_mail = on to drop them anyway.';
    END IF;
END $$;
CREATE EVENT TRIGGER pg_email_guard_drop ON ddl_command_start WHEN TAG IN ('DROP EXTENSION')
    EXECUTE FUNCTION email._guard_drop();

REVOKE ALL ON FUNCTION email._guard_drop() FROM PUBLIC;

-- True when role `caller` may act on (cancel, retry) a message queued by `created_by`: it queued
-- the message, or it is a member of the extension owner's role. The one definition of that rule.
CREATE FUNCTION email._may_act(created_by text, caller text) RETURNS boolean
LANGUAGE sql STABLE
RETURN created_by = caller
    OR pg_has_role(caller, (SELECT e.extowner FROM pg_extension e WHERE e.extname = 'pg_email'), 'MEMBER');

REVOKE ALL ON FUNCTION email._may_act(text, text) FROM PUBLIC;

-- What each object is for, as \d+ and \df+ show it.
COMMENT ON TYPE email.status IS 'Where a message is: queued (due at next_attempt_at), sending (claimed by a worker under a lease), sent, delivered, bounced, failed, cancelled or suppressed (every recipient was on the suppression list).';
COMMENT ON FUNCTION email._may_act(text, text) IS 'True when a role may cancel or retry a message: it queued it, or it is a member of the extension owner''s role.';
COMMENT ON FUNCTION email._is_finished(email.status) IS 'True for the statuses a message does not leave by itself; the one definition used by indexes, email.purge and the retention purge.';

COMMENT ON TABLE email.transports IS 'Named transports (SMTP, provider APIs, file, capture). Register or replace them with email.add_transport; the DSN shown here has its secret replaced by ***.';
COMMENT ON COLUMN email.transports.kind IS 'What the DSN selects: smtp, sendgrid, postmark, resend, mailgun, ses, file or capture.';
COMMENT ON COLUMN email.transports.dsn IS 'The DSN with every secret replaced by ***; the full DSN is in email.transport_secrets.';
COMMENT ON COLUMN email.transports.is_default IS 'The transport email.send uses when the call names none; at most one.';
COMMENT ON COLUMN email.transports.fallback IS 'The transport a message moves to when this one fails transiently or is unreachable.';
COMMENT ON COLUMN email.transports.sender IS 'The from= option of the DSN: the sender used when a call gives none.';
COMMENT ON TABLE email.transport_secrets IS 'The full DSN of each transport, secrets included; readable by the extension owner only. pg_dump includes it: exclude it with --exclude-table-data=email.transport_secrets when a dump leaves the trusted host.';

COMMENT ON TABLE email.messages IS 'The outbox: one row per message queued with email.send or email.send_template, in exactly one status at a time.';
COMMENT ON COLUMN email.messages.recipients IS 'The To list, one "Name <address>" per element (suppressed addresses removed at enqueue, unless all were).';
COMMENT ON COLUMN email.messages.template IS 'For template mail: the template name; subject, body and html are rendered when the message is sent.';
COMMENT ON COLUMN email.messages.template_version IS 'The version of the template pinned when the message was queued.';
COMMENT ON COLUMN email.messages.data IS 'For template mail: the JSON object the template is rendered with.';
COMMENT ON COLUMN email.messages.headers IS 'Custom headers, a JSON object of name: value.';
COMMENT ON COLUMN email.messages.priority IS 'Higher goes first among due messages.';
COMMENT ON COLUMN email.messages.send_at IS 'The earliest time the message may be sent.';
COMMENT ON COLUMN email.messages.idempotency_key IS 'The same key again returns this message''s id and queues nothing.';
COMMENT ON COLUMN email.messages.message_id IS 'The RFC 5322 Message-ID, fixed at enqueue: every attempt, and any duplicate after a crash, carries it.';
COMMENT ON COLUMN email.messages.provider_message_id IS 'The id the provider or the receiving server gave the message, when it gave one.';
COMMENT ON COLUMN email.messages.attempts IS 'Delivery attempts started so far (a claim counts one).';
COMMENT ON COLUMN email.messages.next_attempt_at IS 'When a queued message is due (send_at, then the retry time after a transient failure).';
COMMENT ON COLUMN email.messages.lease_until IS 'While sending: when the claim expires and the message becomes due again (a crashed worker).';
COMMENT ON COLUMN email.messages.claimed_by IS 'While sending: the worker slot that claimed the message.';
COMMENT ON COLUMN email.messages.pending_recipients IS 'After a partial delivery: the recipients still to deliver to (NULL: all).';
COMMENT ON COLUMN email.messages.attachment_count IS 'How many rows of email.attachments belong to the message.';
COMMENT ON COLUMN email.messages.last_error IS 'The last failure''s reply, for a message that is retried or failed.';
COMMENT ON COLUMN email.messages.created_by IS 'The role that queued the message; row-level security shows each role its own messages.';
COMMENT ON COLUMN email.messages.sent_at IS 'When a recipient first accepted the message.';
COMMENT ON COLUMN email.messages.request_hash IS 'For a message with an idempotency key: a fingerprint of the call, so that the key reused with other content is refused.';

COMMENT ON TABLE email.receipts IS 'One row per delivery attempt and per later event of a message, with the reply that decided it.';
COMMENT ON COLUMN email.receipts.event IS 'sent, deferred, failed, bounced, suppressed, cancelled, delivered, opened, clicked, complained or unsubscribed.';
COMMENT ON COLUMN email.receipts.recipient IS 'The recipient the event is about (NULL: the whole message).';
COMMENT ON COLUMN email.receipts.smtp_code IS 'The SMTP reply code, or the HTTP status of a provider API.';
COMMENT ON COLUMN email.receipts.enhanced_code IS 'The RFC 3463 enhanced status code (e.g. 5.1.1), when there is one.';
COMMENT ON COLUMN email.receipts.provider_code IS 'A provider API''s own error code or name (Postmark ErrorCode, Resend error name, SES error type).';
COMMENT ON COLUMN email.receipts.response IS 'The reply text, with any secret of the transport replaced by ***.';
COMMENT ON COLUMN email.receipts.duration_ms IS 'How long the attempt took.';

COMMENT ON TABLE email.suppressions IS 'Addresses mail is never sent to: recipients on it are dropped at enqueue. Hard bounces (RFC 3463 5.1.x) add rows; so can you.';
COMMENT ON COLUMN email.suppressions.address IS 'The bare address, lower-cased (stored so whatever the case given), or *@domain for a whole domain.';
COMMENT ON COLUMN email.suppressions.reason IS 'bounced, complained, unsubscribed or manual.';
COMMENT ON COLUMN email.suppressions.message_id IS 'The message whose outcome added the address, if any.';

COMMENT ON TABLE email.attachments IS 'Decoded attachments of queued messages, in order.';
COMMENT ON TABLE email.captured IS 'What the capture:// transport "sent": the final message bytes and the envelope; nothing left the database.';
COMMENT ON TABLE email.templates IS 'Stored templates (minijinja). Saving a row checks its syntax, filters and tests, and (at commit) that the templates it extends or includes exist; it bumps version when the content changed; every version is kept in email.template_versions.';
COMMENT ON COLUMN email.templates.version IS 'The current version; set by the trigger, not by you.';
COMMENT ON TABLE email.template_versions IS 'Every saved version of every template; queued template mail renders the version it pinned.';

COMMENT ON VIEW email.queue_summary IS 'Messages per status and transport, how many are due, and the age of the oldest due message.';
COMMENT ON VIEW email.daily_stats IS 'Outcome counts per day and transport, from the receipts.';

COMMENT ON FUNCTION email.send IS 'Queues one message in the caller''s transaction and returns its id; validates every argument and names the field at fault. Sent by the worker after commit.';
COMMENT ON FUNCTION email.send_template IS 'Queues one message rendered from a stored template (the current version is pinned) and returns its id.';
COMMENT ON FUNCTION email.render IS 'Renders the current version of a stored template with data, exactly as the worker would: a preview.';
COMMENT ON FUNCTION email.add_transport IS 'Registers or replaces a named transport from a DSN (smtp://, smtps://, sendgrid+api://, postmark+api://, resend+api://, mailgun+api://, ses+api://, file://, capture://); on a replace, is_default and fallback left NULL are kept.';
COMMENT ON FUNCTION email.cancel IS 'Cancels a message that is still queued; true if it was.';
COMMENT ON FUNCTION email.retry IS 'Requeues a failed or bounced message for a fresh series of attempts (never to recipients suppressed now), or makes a queued message waiting for a retry due now; true if it did.';
COMMENT ON FUNCTION email.purge IS 'Deletes finished messages (with their receipts, attachments and captures) created longer ago than the interval; returns how many.';
COMMENT ON FUNCTION email.update_transport IS 'Changes whether a transport is the default and what its fallback is, keeping its DSN; NULL keeps, fallback => '''' removes the fallback.';
COMMENT ON FUNCTION email.test_transport IS 'Checks a transport without waiting for real mail: its DSN, what it needs on this machine, a connection (at most 10 s per step), and with a recipient queues a test message; one row per step, never a secret.';
COMMENT ON FUNCTION email.retry_all IS 'email.retry for every failed and bounced message (or the given status) the caller may act on, optionally by transport and since a time; returns how many. For recovery after an outage.';
COMMENT ON FUNCTION email.suppress IS 'Adds an address, or a whole domain as *@domain, to the suppression list (any letter case); true if it was not on it.';
COMMENT ON FUNCTION email.unsuppress IS 'Takes an address or *@domain off the suppression list; true if it was on it.';
COMMENT ON FUNCTION email.worker_status IS 'One row per delivery worker serving this database: pid, state (idle, sending, paused, ...), messages in flight, totals since start, last activity; in a database no worker serves, one row says so.';

-- Mail queued in a database no worker serves would wait for ever: say so now.
SELECT email._warn_if_unserved();
