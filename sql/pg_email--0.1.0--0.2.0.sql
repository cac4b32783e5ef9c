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

-- The relation through which a trigger on `via` (a table of pg_email, or on Citus one node's copy
-- of it) writes or joins `tbl`. On Citus a trigger on a reference table runs on every node's
-- copy (placement), and there must touch that node's copy of `tbl`: each node does the same,
-- and a statement that reached the other nodes from there is refused (and would deadlock).
-- Elsewhere, `tbl` itself.
CREATE FUNCTION email._placement(tbl regclass, via oid, logical regclass) RETURNS text
LANGUAGE plpgsql STABLE SET search_path = pg_catalog, email, pg_temp AS $$
DECLARE
    copy text;
BEGIN
    IF via = logical THEN
        RETURN tbl::text;
    END IF;
    EXECUTE 'SELECT shard_name(s.logicalrelid, s.shardid)::text FROM pg_dist_shard s JOIN pg_dist_placement p USING (shardid)
             WHERE s.logicalrelid = $1 AND p.groupid = (SELECT groupid FROM pg_dist_local_group)'
        INTO copy USING tbl;
    RETURN coalesce(copy, tbl::text);
END $$;

REVOKE ALL ON FUNCTION email._placement(regclass, oid, regclass) FROM PUBLIC;

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
    EXECUTE format('INSERT INTO %s (name, version, subject, body, html) VALUES ($1, $2, $3, $4, $5) '
                   'ON CONFLICT (name, version) DO NOTHING',
                   email._placement('email.template_versions', TG_RELID, 'email.templates'))
        USING NEW.name, NEW.version, NEW.subject, NEW.body, NEW.html;
    RETURN NULL;
END $$;
REVOKE ALL ON FUNCTION email._template_version_saved() FROM PUBLIC;

CREATE TRIGGER templates_version_saved AFTER INSERT OR UPDATE ON email.templates
    FOR EACH ROW EXECUTE FUNCTION email._template_version_saved();

-- Deleting a template checks its users through the copy of email.templates the trigger runs on
-- (on Citus, each node's).
CREATE OR REPLACE FUNCTION email._template_in_use() RETURNS trigger
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, email, pg_temp AS $$
DECLARE
    used text;
    user_name text;
BEGIN
    -- Checked once per statement, after it, so that deleting a layout together with every
    -- template that uses it is allowed.
    EXECUTE format($q$
        SELECT g.name, t.name
        FROM gone g JOIN %s t
          ON concat_ws(E'\n', t.subject, t.body, t.html)
             ~ ('\{%%-?\s*(extends|include|import|from)\s+[''"]' || regexp_replace(g.name, '([.\-/])', '\\\1', 'g') || '[''"]')
        LIMIT 1$q$, email._placement('email.templates', TG_RELID, 'email.templates'))
        INTO used, user_name;
    IF used IS NOT NULL THEN
        RAISE EXCEPTION 'template "%" is used by template "%"', used, user_name
            USING ERRCODE = 'dependent_objects_still_exist',
                  HINT = 'Change or delete the templates that extend or include it first.';
    END IF;
    RETURN NULL;
END $$;

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
CREATE FUNCTION email._worker_status_local() RETURNS TABLE (
    "worker" INT, "pid" INT, "state" TEXT, "in_flight" INT, "sent" bigint, "deferred" bigint, "failed" bigint,
    "bounced" bigint, "started_at" timestamp with time zone, "last_activity" timestamp with time zone,
    "database" TEXT, "kind" TEXT
)
STRICT VOLATILE PARALLEL UNSAFE
LANGUAGE c AS 'MODULE_PATHNAME', 'worker_status_wrapper';
REVOKE ALL ON FUNCTION email._worker_status_local() FROM PUBLIC;
-- One row per worker serving this database (email._worker_status_local, from shared memory); on
-- Citus after email.distribute(), those of every node, each named by `node` (host:port; NULL
-- on a single server).
CREATE FUNCTION email.worker_status() RETURNS TABLE (
    worker int, pid int, state text, in_flight int, sent bigint, deferred bigint, failed bigint, bounced bigint,
    started_at timestamptz, last_activity timestamptz, database text, kind text, node text
)
LANGUAGE plpgsql SET search_path = pg_catalog, email, pg_temp AS $$
DECLARE
    distributed boolean := false;
BEGIN
    IF to_regclass('pg_catalog.pg_dist_partition') IS NOT NULL THEN
        EXECUTE $q$SELECT EXISTS (SELECT 1 FROM pg_dist_partition WHERE logicalrelid = 'email.messages'::regclass)$q$
            INTO distributed;
    END IF;
    IF NOT distributed THEN
        RETURN QUERY SELECT s.*, NULL::text FROM email._worker_status_local() s;
        RETURN;
    END IF;
    RETURN QUERY EXECUTE $q$
        SELECT s.*, n.nodename || ':' || n.nodeport
        FROM run_command_on_all_nodes('SELECT coalesce(json_agg(s), ''[]'') FROM email._worker_status_local() s') r
        JOIN pg_dist_node n ON n.nodeid = r.nodeid
        CROSS JOIN LATERAL json_to_recordset(CASE WHEN r.success THEN r.result::json ELSE '[]' END) AS s(
            worker int, pid int, state text, in_flight int, sent bigint, deferred bigint, failed bigint, bounced bigint,
            started_at timestamptz, last_activity timestamptz, database text, kind text)
        ORDER BY n.groupid, s.kind, s.worker$q$;
END $$;
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
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, email, pg_temp AS $$
DECLARE
    n bigint;
BEGIN
    INSERT INTO email.suppressions (address, reason) VALUES (suppress.address, suppress.reason)
    ON CONFLICT DO NOTHING;
    GET DIAGNOSTICS n = ROW_COUNT;
    RETURN n > 0;
END $$;

-- Takes an address (or '*@domain') off the suppression list; true if it was on it.
CREATE FUNCTION email.unsuppress(address text) RETURNS boolean
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, email, pg_temp AS $$
DECLARE
    n bigint;
BEGIN
    DELETE FROM email.suppressions s WHERE s.address = lower(btrim(unsuppress.address));
    GET DIAGNOSTICS n = ROW_COUNT;
    RETURN n > 0;
END $$;

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

-- True when role `caller` may act on (cancel, retry) every message, not only those it queued:
-- it is a member of the extension owner's role. A role may act on a message when
-- `m.created_by = caller OR email._may_act_on_all(caller)`; the function takes no column, so
-- Citus can evaluate it once on the coordinator in an UPDATE of the distributed outbox.
CREATE FUNCTION email._may_act_on_all(caller text) RETURNS boolean
LANGUAGE sql STABLE
RETURN pg_has_role(caller, (SELECT e.extowner FROM pg_extension e WHERE e.extname = 'pg_email'), 'MEMBER');

REVOKE ALL ON FUNCTION email._may_act_on_all(text) FROM PUBLIC;

-- Hearing back: every event is a receipt (webhooks, tracking, inbound), with where it came
-- from and what the provider said. Receipts written by 0.1.0 came from the worker, except the
-- suppressed and cancelled ones, written by the SQL functions.
CREATE DOMAIN email.receipt_source AS text CHECK (VALUE IN ('worker', 'webhook', 'tracking', 'inbound', 'api'));
CREATE DOMAIN email.bounce_type AS text CHECK (VALUE IN ('hard', 'soft', 'block'));
ALTER TABLE email.receipts
    ADD COLUMN source email.receipt_source NOT NULL DEFAULT 'worker',
    ADD COLUMN bounce_type email.bounce_type,
    ADD COLUMN url text,
    ADD COLUMN user_agent text,
    ADD COLUMN ip inet,
    ADD COLUMN machine boolean,
    ADD COLUMN provider_event_id text,
    ADD COLUMN payload jsonb;
UPDATE email.receipts SET source = 'api' WHERE event IN ('suppressed', 'cancelled');
CREATE UNIQUE INDEX receipts_provider_event ON email.receipts (message_id, transport, provider_event_id)
    WHERE provider_event_id IS NOT NULL;
-- Ending with id makes "the newest message with this id" (email._record_events) a single index
-- probe; with the looked-up column alone the planner may walk the primary key backwards with a
-- filter, which reads the whole table for an id that matches nothing (a purged message's event).
CREATE INDEX messages_provider_message_id ON email.messages (provider_message_id, id)
    WHERE provider_message_id IS NOT NULL;
CREATE INDEX messages_message_id ON email.messages (message_id, id);
ALTER TABLE email.messages
    ADD COLUMN track_opens boolean,
    ADD COLUMN track_clicks boolean,
    ADD COLUMN list_unsubscribe boolean;

CREATE TABLE email.unmatched_events (
    id                  bigint GENERATED BY DEFAULT AS IDENTITY PRIMARY KEY,
    transport           text NOT NULL,
    received_at         timestamptz NOT NULL DEFAULT now(),
    event               text,
    provider_event_id   text,
    provider_message_id text,
    recipient           text,
    reason              text NOT NULL,
    payload             jsonb
);
CREATE UNIQUE INDEX unmatched_events_provider_event ON email.unmatched_events (transport, provider_event_id)
    WHERE provider_event_id IS NOT NULL;
CREATE INDEX unmatched_events_received_at ON email.unmatched_events (received_at);
CREATE TABLE email.tracking_keys (
    kid         integer PRIMARY KEY DEFAULT (1 + floor(random() * 2147483646))::integer,
    secret      bytea NOT NULL CHECK (length(secret) >= 32),
    created_at  timestamptz NOT NULL DEFAULT clock_timestamp()
);
CREATE TABLE email.sns_certificates (
    url         text PRIMARY KEY,
    pem         text NOT NULL,
    fetched_at  timestamptz NOT NULL DEFAULT now()
);
REVOKE ALL ON email.unmatched_events, email.tracking_keys, email.sns_certificates FROM PUBLIC;
REVOKE ALL ON SEQUENCE email.unmatched_events_id_seq FROM PUBLIC;
SELECT pg_catalog.pg_extension_config_dump('email.unmatched_events', '');
SELECT pg_catalog.pg_extension_config_dump('email.unmatched_events_id_seq', '');
SELECT pg_catalog.pg_extension_config_dump('email.tracking_keys', '');
CREATE TRIGGER tracking_keys_changed AFTER INSERT OR UPDATE OR DELETE OR TRUNCATE ON email.tracking_keys
    FOR EACH STATEMENT EXECUTE FUNCTION email._config_trigger();

-- The bare, lower-cased address of a stored mailbox ('Ada <Ada@X.org>' -> 'ada@x.org').
CREATE FUNCTION email._address(mailbox text) RETURNS text
LANGUAGE sql IMMUTABLE PARALLEL SAFE
RETURN lower(coalesce(substring(mailbox FROM '<([^<>]*)>\s*$'), btrim(mailbox)));

-- Stores events heard back (provider webhooks, tracking hits, unsubscribes) and applies their
-- effects, in the caller's transaction: the listener worker's batch and email.ingest_webhook.
-- $1 is a jsonb array of webhook::Event / listener items (see src/listener/mod.rs). Each event
-- is matched to its message by our id, then the provider's message id, then the Message-ID;
-- the same provider event again is skipped; provider events that match no message, or of a
-- type pg_email does not know, go to email.unmatched_events (tracking hits of a message that is
-- gone are dropped). Returns the rows stored.
CREATE FUNCTION email._record_events(events jsonb) RETURNS integer
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, email, pg_temp AS $$
DECLARE
    stored bigint;
    unmatched bigint;
    hard bigint[];
BEGIN
    WITH ev AS (
        SELECT e.*
        FROM jsonb_to_recordset(events) AS e(
            transport text, source text, event text, provider_event_id text, pg_email_id bigint,
            provider_message_id text, rfc_message_id text, recipient text, bounce_type text,
            smtp_code integer, enhanced_code text, provider_code text, response text, url text,
            user_agent text, ip inet, machine boolean, at double precision, payload jsonb,
            single boolean, reason text)
    ), rows AS (
        -- One lookup per event: the first branch that finds the message wins.
        SELECT ev.*, m.id AS mid, m.sent_at,
               CASE WHEN ev.recipient IS NOT NULL THEN lower(ev.recipient)
                    WHEN ev.single THEN email._address(coalesce(m.recipients[1], m.cc[1], m.bcc[1]))
               END AS rcpt
        FROM ev LEFT JOIN LATERAL (
            (SELECT x.id, x.sent_at, x.recipients, x.cc, x.bcc FROM email.messages x WHERE x.id = ev.pg_email_id)
            UNION ALL
            (SELECT x.id, x.sent_at, x.recipients, x.cc, x.bcc FROM email.messages x
             WHERE ev.provider_message_id IS NOT NULL AND x.provider_message_id = ev.provider_message_id
             ORDER BY x.id DESC LIMIT 1)
            UNION ALL
            (SELECT x.id, x.sent_at, x.recipients, x.cc, x.bcc FROM email.messages x
             WHERE ev.rfc_message_id IS NOT NULL AND x.message_id = ev.rfc_message_id
             ORDER BY x.id DESC LIMIT 1)
            LIMIT 1
        ) m ON true
    ), ins AS (
        INSERT INTO email.receipts (message_id, at, event, transport, recipient, smtp_code, enhanced_code,
                                    provider_code, response, provider_message_id, source, bounce_type, url,
                                    user_agent, ip, machine, provider_event_id, payload)
        SELECT r.mid, coalesce(to_timestamp(r.at), now()), r.event, r.transport, r.rcpt, r.smtp_code,
               r.enhanced_code, r.provider_code, r.response, r.provider_message_id, r.source, r.bounce_type,
               r.url, r.user_agent, r.ip,
               CASE WHEN r.source = 'tracking' AND r.event IN ('opened', 'clicked') THEN
                        coalesce(r.machine, false) OR r.sent_at IS NULL
                        OR coalesce(to_timestamp(r.at), now()) < r.sent_at + interval '2 seconds'
                    ELSE r.machine END,
               r.provider_event_id, r.payload
        FROM rows r
        WHERE r.mid IS NOT NULL AND r.event <> 'unknown'
        ON CONFLICT (message_id, transport, provider_event_id) WHERE provider_event_id IS NOT NULL DO NOTHING
        RETURNING message_id, event, recipient, bounce_type, source
    ), suppressed AS (
        INSERT INTO email.suppressions (address, reason, message_id)
        SELECT DISTINCT ON (i.recipient) i.recipient,
               CASE i.event WHEN 'bounced' THEN 'bounced' ELSE i.event END, i.message_id
        FROM ins i
        WHERE i.recipient IS NOT NULL
          AND (i.event = 'complained' OR (i.event = 'bounced' AND i.bounce_type = 'hard')
               -- Leaving a topic's mail leaves that topic (below), unless the topic is gone.
               OR (i.event = 'unsubscribed' AND NOT EXISTS (
                       SELECT 1 FROM email.messages m JOIN email.topics t ON t.name = m.topic
                       WHERE m.id = i.message_id)))
        ORDER BY i.recipient, i.event
        ON CONFLICT (address) DO NOTHING
    ), left_topic AS (
        INSERT INTO email.subscriptions AS s (address, topic, subscribed, updated_at, source)
        SELECT DISTINCT ON (i.recipient, m.topic) i.recipient, m.topic, false, now(), i.source
        FROM ins i
        JOIN email.messages m ON m.id = i.message_id
        JOIN email.topics t ON t.name = m.topic
        WHERE i.event = 'unsubscribed' AND i.recipient IS NOT NULL
        ORDER BY i.recipient, m.topic
        ON CONFLICT ON CONSTRAINT subscriptions_pkey
        DO UPDATE SET subscribed = false, updated_at = excluded.updated_at, source = excluded.source
    ), delivered AS (
        UPDATE email.messages m SET status = 'delivered', updated_at = now()
        WHERE m.id IN (SELECT i.message_id FROM ins i WHERE i.event = 'delivered') AND m.status = 'sent'
    ), kept AS (
        INSERT INTO email.unmatched_events (transport, received_at, event, provider_event_id, provider_message_id,
                                            recipient, reason, payload)
        SELECT r.transport, now(), r.event, r.provider_event_id, r.provider_message_id, r.recipient,
               coalesce(r.reason, CASE WHEN r.event = 'unknown' THEN 'an event type pg_email does not record'
                                       ELSE 'no message matches it' END),
               r.payload
        FROM rows r
        WHERE (r.mid IS NULL OR r.event = 'unknown') AND r.transport IS NOT NULL
        ON CONFLICT (transport, provider_event_id) WHERE provider_event_id IS NOT NULL DO NOTHING
        RETURNING 1
    )
    SELECT (SELECT count(*) FROM ins), (SELECT count(*) FROM kept),
           (SELECT array_agg(DISTINCT i.message_id) FROM ins i WHERE i.event = 'bounced' AND i.bounce_type = 'hard')
    INTO stored, unmatched, hard;
    -- A message every recipient of which hard-bounced is bounced.
    IF hard IS NOT NULL THEN
        UPDATE email.messages m SET status = 'bounced', updated_at = now()
        WHERE m.id = ANY (hard) AND m.status IN ('sent', 'delivered')
          AND NOT EXISTS (
              SELECT 1 FROM unnest(m.recipients || coalesce(m.cc, '{}') || coalesce(m.bcc, '{}')) AS r(mailbox)
              WHERE NOT EXISTS (
                  SELECT 1 FROM email.receipts x
                  WHERE x.message_id = m.id AND x.event = 'bounced' AND x.bounce_type = 'hard'
                    AND x.recipient = email._address(r.mailbox)));
    END IF;
    RETURN stored + unmatched;
END $$;

REVOKE ALL ON FUNCTION email._address(text) FROM PUBLIC;
REVOKE ALL ON FUNCTION email._record_events(jsonb) FROM PUBLIC;

-- email.send and email.send_template take track_opens, track_clicks, topic and list_unsubscribe.
DROP FUNCTION email.send(text, text, text, text, text, text, text, text, jsonb, jsonb, text[], jsonb, timestamp with time zone, text, text, integer);
CREATE FUNCTION email.send(
    "recipients" TEXT, "subject" TEXT, "body" TEXT DEFAULT NULL, "html" TEXT DEFAULT NULL,
    "sender" TEXT DEFAULT NULL, "cc" TEXT DEFAULT NULL, "bcc" TEXT DEFAULT NULL, "reply_to" TEXT DEFAULT NULL,
    "headers" jsonb DEFAULT NULL, "attachments" jsonb DEFAULT NULL, "tags" TEXT[] DEFAULT NULL,
    "metadata" jsonb DEFAULT NULL, "send_at" timestamp with time zone DEFAULT NULL,
    "idempotency_key" TEXT DEFAULT NULL, "transport" TEXT DEFAULT NULL, "priority" INT DEFAULT 0,
    "track_opens" bool DEFAULT NULL, "track_clicks" bool DEFAULT NULL, "topic" TEXT DEFAULT NULL,
    "list_unsubscribe" bool DEFAULT NULL
) RETURNS bigint
VOLATILE SECURITY DEFINER PARALLEL UNSAFE
SET search_path TO pg_catalog, email, pg_temp
LANGUAGE c AS 'MODULE_PATHNAME', 'send_message_wrapper';
REVOKE ALL ON FUNCTION email.send FROM PUBLIC;
DROP FUNCTION email.send_template(text, text, jsonb, text, text, text, text, jsonb, jsonb, text[], jsonb, timestamp with time zone, text, text, integer);
CREATE FUNCTION email.send_template(
    "template" TEXT, "recipients" TEXT, "data" jsonb DEFAULT '{}', "sender" TEXT DEFAULT NULL,
    "cc" TEXT DEFAULT NULL, "bcc" TEXT DEFAULT NULL, "reply_to" TEXT DEFAULT NULL, "headers" jsonb DEFAULT NULL,
    "attachments" jsonb DEFAULT NULL, "tags" TEXT[] DEFAULT NULL, "metadata" jsonb DEFAULT NULL,
    "send_at" timestamp with time zone DEFAULT NULL, "idempotency_key" TEXT DEFAULT NULL,
    "transport" TEXT DEFAULT NULL, "priority" INT DEFAULT 0,
    "track_opens" bool DEFAULT NULL, "track_clicks" bool DEFAULT NULL, "topic" TEXT DEFAULT NULL,
    "list_unsubscribe" bool DEFAULT NULL
) RETURNS bigint
VOLATILE SECURITY DEFINER PARALLEL UNSAFE
SET search_path TO pg_catalog, email, pg_temp
LANGUAGE c AS 'MODULE_PATHNAME', 'send_template_message_wrapper';
REVOKE ALL ON FUNCTION email.send_template FROM PUBLIC;

-- Provider webhooks from SQL, and tracking keys.
CREATE FUNCTION email.ingest_webhook("transport" TEXT, "headers" jsonb, "body" bytea) RETURNS INT
VOLATILE SECURITY DEFINER PARALLEL UNSAFE
SET search_path TO pg_catalog, email, pg_temp
LANGUAGE c AS 'MODULE_PATHNAME', 'ingest_webhook_wrapper';
REVOKE ALL ON FUNCTION email.ingest_webhook(text, jsonb, bytea) FROM PUBLIC;
CREATE FUNCTION email.rotate_tracking_key() RETURNS INT
STRICT VOLATILE SECURITY DEFINER PARALLEL UNSAFE
SET search_path TO pg_catalog, email, pg_temp
LANGUAGE c AS 'MODULE_PATHNAME', 'rotate_tracking_key_wrapper';
REVOKE ALL ON FUNCTION email.rotate_tracking_key() FROM PUBLIC;

-- Hearing back by mail: every received message is a row.
CREATE TABLE email.inbound (
    id              bigint GENERATED BY DEFAULT AS IDENTITY PRIMARY KEY,
    received_at     timestamptz NOT NULL DEFAULT now(),
    mail_from       text,
    rcpt_to         text[] NOT NULL DEFAULT '{}',
    kind            text NOT NULL CHECK (kind IN ('bounce', 'delay', 'complaint', 'auto_reply', 'unsubscribe',
                                                  'reply', 'message')),
    from_address    text,
    subject         text,
    rfc_message_id  text,
    in_reply_to     text,
    message_id      bigint REFERENCES email.messages (id) ON DELETE SET NULL,
    text_body       text,
    html_body       text,
    headers         jsonb,
    raw             bytea NOT NULL
);
CREATE INDEX inbound_message_id ON email.inbound (message_id) WHERE message_id IS NOT NULL;
CREATE INDEX inbound_received_at ON email.inbound (received_at);
REVOKE ALL ON email.inbound FROM PUBLIC;
REVOKE ALL ON SEQUENCE email.inbound_id_seq FROM PUBLIC;
SELECT pg_catalog.pg_extension_config_dump('email.inbound', '');
SELECT pg_catalog.pg_extension_config_dump('email.inbound_id_seq', '');

-- Stores one received message ($1: what src/inbound parsed, with the VERP token's message
-- when a recipient carried one; $2: the raw bytes) as a row of email.inbound, matched to our
-- message (the VERP token's, else the first Message-ID it refers to that is ours), and records
-- its reports (bounced, deferred, delivered, complained, unsubscribed) through
-- email._record_events with their effects. Returns the email.inbound id.
CREATE FUNCTION email._record_inbound(msg jsonb, raw bytea) RETURNS bigint
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, email, pg_temp AS $$
DECLARE
    mid bigint;
    mtransport text;
    single text;
    iid bigint;
BEGIN
    -- The VERP token's message, else the first referred-to Message-ID that is ours (the second
    -- branch runs only when the first finds nothing).
    SELECT m.id, m.transport,
           CASE WHEN cardinality(m.recipients) + coalesce(cardinality(m.cc), 0) + coalesce(cardinality(m.bcc), 0) = 1
                THEN email._address(coalesce(m.recipients[1], m.cc[1], m.bcc[1])) END
    INTO mid, mtransport, single
    FROM (
        (SELECT x.id, x.transport, x.recipients, x.cc, x.bcc FROM email.messages x
         WHERE x.id = (msg->>'verp_message_id')::bigint)
        UNION ALL
        (SELECT x.id, x.transport, x.recipients, x.cc, x.bcc
         FROM jsonb_array_elements_text(coalesce(msg->'refers_to', '[]')) WITH ORDINALITY AS r(rfc_id, n)
         JOIN email.messages x ON x.message_id = r.rfc_id
         ORDER BY r.n, x.id DESC
         LIMIT 1)
        LIMIT 1
    ) m;
    INSERT INTO email.inbound (mail_from, rcpt_to, kind, from_address, subject, rfc_message_id, in_reply_to,
                               message_id, text_body, html_body, headers, raw)
    VALUES (msg->>'mail_from', ARRAY(SELECT jsonb_array_elements_text(coalesce(msg->'rcpt_to', '[]'))),
            -- A reply is a reply to our mail; In-Reply-To naming someone else's makes it a message.
            CASE WHEN msg->>'kind' = 'reply' AND mid IS NULL THEN 'message' ELSE msg->>'kind' END,
            msg->>'from_address', msg->>'subject', msg->>'rfc_message_id', msg->>'in_reply_to',
            mid, msg->>'text_body', msg->>'html_body', msg->'headers', raw)
    RETURNING id INTO iid;
    IF mid IS NOT NULL AND jsonb_typeof(msg->'events') = 'array' AND jsonb_array_length(msg->'events') > 0 THEN
        -- A report received twice (an MTA that did not see our 250) is recorded once: its
        -- Message-ID and recipient name the event.
        PERFORM email._record_events((
            SELECT jsonb_agg(e || jsonb_build_object(
                       'transport', mtransport, 'source', 'inbound', 'pg_email_id', mid,
                       'recipient', coalesce(e->>'recipient', single),
                       'provider_event_id',
                           CASE WHEN msg->>'rfc_message_id' IS NOT NULL
                                THEN 'inbound:' || (msg->>'rfc_message_id') || ':' || coalesce(e->>'recipient', single, '')
                           END,
                       'payload', jsonb_build_object('inbound_id', iid)))
            FROM jsonb_array_elements(msg->'events') AS e));
    END IF;
    RETURN iid;
END $$;

REVOKE ALL ON FUNCTION email._record_inbound(jsonb, bytea) FROM PUBLIC;
CREATE FUNCTION email.ingest_message("raw" bytea, "rcpt_to" TEXT[] DEFAULT NULL, "mail_from" TEXT DEFAULT NULL)
RETURNS bigint
VOLATILE SECURITY DEFINER PARALLEL UNSAFE
SET search_path TO pg_catalog, email, pg_temp
LANGUAGE c AS 'MODULE_PATHNAME', 'ingest_message_wrapper';
REVOKE ALL ON FUNCTION email.ingest_message(bytea, text[], text) FROM PUBLIC;

-- Deliverability and consent: DKIM keys, topics and subscriptions, erasure.
ALTER TABLE email.messages ADD COLUMN topic text;
-- Messages received by SMTP submission keep their MIME (email.messages.raw).
ALTER TABLE email.messages ADD COLUMN raw bytea;
-- DKIM keys: the public half. A message from a domain (or a subdomain of one) with a key is
-- signed with the newest key of each algorithm.
CREATE TABLE email.dkim_keys (
    domain      text NOT NULL,
    selector    text NOT NULL,
    algorithm   text NOT NULL CHECK (algorithm IN ('rsa-sha256', 'ed25519-sha256')),
    dns_name    text GENERATED ALWAYS AS (selector || '._domainkey.' || domain) STORED,
    dns_value   text NOT NULL,
    created_at  timestamptz NOT NULL DEFAULT clock_timestamp(),
    PRIMARY KEY (domain, selector)
);

-- DKIM keys: the private half, readable by the extension's owner only.
CREATE TABLE email.dkim_secrets (
    domain      text NOT NULL,
    selector    text NOT NULL,
    private_key text NOT NULL,
    PRIMARY KEY (domain, selector),
    FOREIGN KEY (domain, selector) REFERENCES email.dkim_keys (domain, selector) ON DELETE CASCADE ON UPDATE CASCADE
);

-- Topics a message can be about; a recipient gets topic mail when subscribed to it (or, for a
-- topic subscribed by default, unless they left it).
CREATE TABLE email.topics (
    name                text PRIMARY KEY CHECK (name ~ '^[A-Za-z0-9_.\-/]{1,128}$'),
    description         text,
    default_subscribed  boolean NOT NULL DEFAULT false,
    created_at          timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE email.subscriptions (
    address     text NOT NULL CHECK (address = lower(address)),
    topic       text NOT NULL REFERENCES email.topics (name) ON DELETE CASCADE ON UPDATE CASCADE,
    subscribed  boolean NOT NULL,
    updated_at  timestamptz NOT NULL DEFAULT now(),
    source      text NOT NULL DEFAULT 'manual'
                    CHECK (source IN ('api', 'tracking', 'webhook', 'inbound', 'manual')),
    PRIMARY KEY (address, topic)
);
CREATE INDEX subscriptions_topic ON email.subscriptions (topic, subscribed);

-- Addresses erased with email.forget are never mailed again: kept as a salted SHA-256 of the
-- lower-cased address, with the installation's salt beside it (owner only).
CREATE TABLE email.forgotten (
    hash            bytea PRIMARY KEY,
    forgotten_at    timestamptz NOT NULL DEFAULT now()
);
CREATE TABLE email.forget_salt (
    one     boolean PRIMARY KEY DEFAULT true CHECK (one),
    salt    bytea NOT NULL CHECK (length(salt) >= 16)
);
REVOKE ALL ON email.dkim_keys, email.dkim_secrets, email.topics, email.subscriptions, email.forgotten,
    email.forget_salt FROM PUBLIC;
SELECT pg_catalog.pg_extension_config_dump('email.dkim_keys', '');
SELECT pg_catalog.pg_extension_config_dump('email.dkim_secrets', '');
SELECT pg_catalog.pg_extension_config_dump('email.topics', '');
SELECT pg_catalog.pg_extension_config_dump('email.subscriptions', '');
SELECT pg_catalog.pg_extension_config_dump('email.forgotten', '');
SELECT pg_catalog.pg_extension_config_dump('email.forget_salt', '');

-- Consent: topics, subscriptions, and the right to erasure.

-- The salted hash under which email.forget keeps an erased address (NULL before the first
-- email.forget made the salt).
CREATE FUNCTION email._forgotten_hash(address text) RETURNS bytea
LANGUAGE sql STABLE SET search_path = pg_catalog, email, pg_temp
RETURN (SELECT sha256(s.salt || convert_to(lower(address), 'UTF8')) FROM email.forget_salt s);

-- The bare, lower-cased address of an argument; 22023 naming `field` when it is not one.
CREATE FUNCTION email._checked_address(mailbox text, field text) RETURNS text
LANGUAGE plpgsql IMMUTABLE SET search_path = pg_catalog, email, pg_temp AS $$
DECLARE
    a text := email._address(mailbox);
BEGIN
    IF a IS NULL OR a !~ '^[^@[:space:]<>,;"]+@[^@[:space:]<>,;"*]+$' THEN
        RAISE EXCEPTION 'invalid %: "%" is not an email address', field, mailbox
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    RETURN a;
END $$;

-- 42704 unless topic `name` exists.
CREATE FUNCTION email._require_topic(name text) RETURNS void
LANGUAGE plpgsql STABLE SET search_path = pg_catalog, email, pg_temp AS $$
BEGIN
    IF NOT EXISTS (SELECT 1 FROM email.topics t WHERE t.name = _require_topic.name) THEN
        RAISE EXCEPTION 'topic "%" does not exist', name
            USING ERRCODE = 'undefined_object',
                  HINT = 'Create it with INSERT INTO email.topics (name, description, default_subscribed).';
    END IF;
END $$;

-- Records that an address joined or left a topic through the SQL API.
CREATE FUNCTION email._set_subscription(address text, topic text, subscribed boolean) RETURNS void
LANGUAGE plpgsql SET search_path = pg_catalog, email, pg_temp AS $$
DECLARE
    a text := email._checked_address(_set_subscription.address, 'address');
BEGIN
    PERFORM email._require_topic(_set_subscription.topic);
    INSERT INTO email.subscriptions AS s (address, topic, subscribed, updated_at, source)
    VALUES (a, _set_subscription.topic, _set_subscription.subscribed, now(), 'api')
    ON CONFLICT ON CONSTRAINT subscriptions_pkey
    DO UPDATE SET subscribed = excluded.subscribed, updated_at = excluded.updated_at, source = 'api';
END $$;

-- Subscribes an address to a topic.
CREATE FUNCTION email.subscribe(address text, topic text) RETURNS void
LANGUAGE sql SECURITY DEFINER SET search_path = pg_catalog, email, pg_temp
RETURN email._set_subscription(address, topic, true);

-- Takes an address off a topic; without a topic, off all mail (a suppression, 'unsubscribed').
CREATE FUNCTION email.unsubscribe(address text, topic text DEFAULT NULL) RETURNS void
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, email, pg_temp AS $$
BEGIN
    IF unsubscribe.topic IS NULL THEN
        INSERT INTO email.suppressions (address, reason)
        VALUES (email._checked_address(unsubscribe.address, 'address'), 'unsubscribed')
        ON CONFLICT DO NOTHING;
    ELSE
        PERFORM email._set_subscription(unsubscribe.address, unsubscribe.topic, false);
    END IF;
END $$;

-- Removes a DKIM key; true if it existed.
CREATE FUNCTION email.remove_dkim_key(domain text, selector text) RETURNS boolean
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, email, pg_temp AS $$
DECLARE
    n bigint;
BEGIN
    DELETE FROM email.dkim_keys k
    WHERE k.domain = lower(btrim(remove_dkim_key.domain)) AND k.selector = lower(btrim(remove_dkim_key.selector));
    GET DIAGNOSTICS n = ROW_COUNT;
    RETURN n > 0;
END $$;

-- Erases an address from every pg_email table in the caller's transaction (DESIGN.md
-- "Consent"): messages sent to it alone lose their contents, attachments and captured bytes;
-- messages to several people lose it from their recipient lists; receipts keep their event
-- (statistics do not change) but lose the recipient, client and payload; inbound mail from or
-- about it, unmatched events naming it and its subscriptions are deleted; any other text,
-- jsonb or array value naming it is redacted to '[forgotten]'. Configuration (transports,
-- templates, keys) is not rewritten. The address stays suppressed as a salted hash. Returns
-- how many rows of each table were changed or deleted.
CREATE FUNCTION email.forget(address text) RETURNS TABLE (relation text, "rows" bigint)
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, email, pg_temp AS $$
#variable_conflict use_column
DECLARE
    a text := email._checked_address($1, 'address');
    -- The address, and its percent-encoded form (in URLs), as a case-insensitive pattern.
    re text;
    needle text;
    alone bigint[];
    shared bigint[];
    counts jsonb := '{}';
    n bigint;
    c record;
BEGIN
    -- Its statements reach into every row of the outbox in ways Citus does not run on
    -- distributed tables (README, "Scaling out with Citus").
    IF email._citus_table('email.messages') THEN
        RAISE EXCEPTION 'email.forget is not supported on a distributed outbox (Citus) yet'
            USING ERRCODE = 'feature_not_supported';
    END IF;
    -- Every character but letters, digits, '@' and '_' is escaped (a backslash makes it literal).
    re := '(' || regexp_replace(a, '([^[:alnum:]@_])', '\\\1', 'g') || '|'
              || regexp_replace(replace(a, '@', '%40'), '([^[:alnum:]@_])', '\\\1', 'g') || ')';
    needle := lower(encode(convert_to(a, 'UTF8'), 'escape'));

    -- Messages it was a recipient of: to it alone, or to several people.
    SELECT coalesce(array_agg(x.id) FILTER (WHERE x.alone), '{}'), coalesce(array_agg(x.id) FILTER (WHERE NOT x.alone), '{}')
    INTO alone, shared
    FROM (
        SELECT m.id, bool_and(email._address(r) = a) AS alone
        FROM email.messages m, unnest(m.recipients || coalesce(m.cc, '{}') || coalesce(m.bcc, '{}')) AS r
        WHERE array_to_string(m.recipients || coalesce(m.cc, '{}') || coalesce(m.bcc, '{}'), ' ') ~* re
        GROUP BY m.id
        HAVING bool_or(email._address(r) = a)
    ) x;

    UPDATE email.messages m
    SET recipients = '{}', cc = NULL, bcc = NULL, pending_recipients = NULL, reply_to = NULL, subject = NULL,
        body = NULL, html = NULL, data = NULL, headers = NULL, metadata = NULL, attachment_count = 0,
        last_error = NULL,
        -- Mail not sent yet is not sent now.
        status = CASE WHEN m.status = 'queued' THEN 'cancelled' ELSE m.status END,
        updated_at = now()
    WHERE m.id = ANY (alone);
    GET DIAGNOSTICS n = ROW_COUNT;
    UPDATE email.messages m
    SET recipients = ARRAY(SELECT r FROM unnest(m.recipients) r WHERE email._address(r) <> a),
        cc = nullif(ARRAY(SELECT r FROM unnest(m.cc) r WHERE email._address(r) <> a), '{}'),
        bcc = nullif(ARRAY(SELECT r FROM unnest(m.bcc) r WHERE email._address(r) <> a), '{}'),
        pending_recipients = CASE WHEN m.pending_recipients IS NOT NULL THEN
            ARRAY(SELECT r FROM unnest(m.pending_recipients) r WHERE email._address(r) <> a) END,
        updated_at = now()
    WHERE m.id = ANY (shared);
    counts := counts || jsonb_build_object('email.messages', n + (SELECT count(*) FROM unnest(shared)));

    DELETE FROM email.attachments t WHERE t.message_id = ANY (alone);
    GET DIAGNOSTICS n = ROW_COUNT;
    counts := counts || jsonb_build_object('email.attachments', n);
    DELETE FROM email.captured t
    WHERE t.message_id = ANY (alone || shared) OR array_to_string(t.envelope_to, ' ') ~* re;
    GET DIAGNOSTICS n = ROW_COUNT;
    counts := counts || jsonb_build_object('email.captured', n);

    UPDATE email.receipts t
    SET recipient = NULL, ip = NULL, user_agent = NULL, payload = NULL,
        url = CASE WHEN t.url ~* re THEN NULL ELSE t.url END,
        response = regexp_replace(t.response, re, '[forgotten]', 'gi')
    WHERE t.recipient = a OR t.message_id = ANY (alone);
    GET DIAGNOSTICS n = ROW_COUNT;
    counts := counts || jsonb_build_object('email.receipts', n);

    DELETE FROM email.inbound t
    WHERE t.message_id = ANY (alone) OR email._address(t.from_address) = a OR lower(t.mail_from) = a
       OR array_to_string(t.rcpt_to, ' ') ~* re;
    GET DIAGNOSTICS n = ROW_COUNT;
    counts := counts || jsonb_build_object('email.inbound', n);

    DELETE FROM email.unmatched_events t WHERE lower(t.recipient) = a;
    GET DIAGNOSTICS n = ROW_COUNT;
    counts := counts || jsonb_build_object('email.unmatched_events', n);
    DELETE FROM email.subscriptions t WHERE t.address = a;
    GET DIAGNOSTICS n = ROW_COUNT;
    counts := counts || jsonb_build_object('email.subscriptions', n);
    DELETE FROM email.suppressions t WHERE t.address = a;
    GET DIAGNOSTICS n = ROW_COUNT;
    counts := counts || jsonb_build_object('email.suppressions', n);

    -- Whatever else names it: every text, json, array and bytea column of pg_email's other
    -- tables. Rows of bytes (captured, inbound, attachments) that contain it are deleted.
    FOR c IN
        SELECT cl.relname, at.attname, format_type(at.atttypid, at.atttypmod) AS type
        FROM pg_class cl
        JOIN pg_namespace ns ON ns.oid = cl.relnamespace AND ns.nspname = 'email'
        JOIN pg_attribute at ON at.attrelid = cl.oid AND at.attnum > 0 AND NOT at.attisdropped
        WHERE cl.relkind = 'r'
          AND cl.relname NOT IN ('transports', 'transport_secrets', 'templates', 'template_versions', 'dkim_keys',
                                 'dkim_secrets', 'tracking_keys', 'sns_certificates', 'forgotten', 'forget_salt')
          AND at.atttypid IN ('text'::regtype, 'varchar'::regtype, 'text[]'::regtype, 'jsonb'::regtype,
                              'json'::regtype, 'bytea'::regtype)
          AND at.attgenerated = ''
        ORDER BY cl.relname, at.attnum
    LOOP
        IF c.type = 'bytea' THEN
            EXECUTE format('DELETE FROM email.%I WHERE strpos(lower(encode(%I, ''escape'')), $1) > 0', c.relname, c.attname)
                USING needle;
        ELSIF c.type = 'text[]' THEN
            EXECUTE format('UPDATE email.%1$I SET %2$I = ARRAY(SELECT regexp_replace(x, $1, ''[forgotten]'', ''gi'') '
                           'FROM unnest(%2$I) WITH ORDINALITY AS u(x, o) ORDER BY o) WHERE array_to_string(%2$I, '' '') ~* $1',
                           c.relname, c.attname)
                USING re;
        ELSE
            EXECUTE format('UPDATE email.%1$I SET %2$I = regexp_replace(%2$I::text, $1, ''[forgotten]'', ''gi'')::%3$s '
                           'WHERE %2$I::text ~* $1', c.relname, c.attname, c.type)
                USING re;
        END IF;
        GET DIAGNOSTICS n = ROW_COUNT;
        IF n > 0 THEN
            counts := jsonb_set(counts, ARRAY['email.' || c.relname],
                                to_jsonb(coalesce((counts->>('email.' || c.relname))::bigint, 0) + n));
        END IF;
    END LOOP;

    -- Never mailed again: the salt is made by the first erasure.
    INSERT INTO email.forget_salt (salt) VALUES (uuid_send(gen_random_uuid()) || uuid_send(gen_random_uuid()))
    ON CONFLICT DO NOTHING;
    INSERT INTO email.forgotten (hash) VALUES (email._forgotten_hash(a)) ON CONFLICT DO NOTHING;
    RETURN QUERY SELECT e.key, e.value::bigint FROM jsonb_each_text(counts) AS e ORDER BY e.key;
END $$;

CREATE TRIGGER dkim_keys_changed AFTER INSERT OR UPDATE OR DELETE OR TRUNCATE ON email.dkim_keys
    FOR EACH STATEMENT EXECUTE FUNCTION email._config_trigger();
CREATE TRIGGER topics_changed AFTER INSERT OR UPDATE OR DELETE OR TRUNCATE ON email.topics
    FOR EACH STATEMENT EXECUTE FUNCTION email._config_trigger();
CREATE TRIGGER forgotten_changed AFTER INSERT OR UPDATE OR DELETE OR TRUNCATE ON email.forgotten
    FOR EACH STATEMENT EXECUTE FUNCTION email._config_trigger();
REVOKE ALL ON FUNCTION email._forgotten_hash(text), email._checked_address(text, text), email._require_topic(text),
    email._set_subscription(text, text, boolean),
    email.subscribe(text, text), email.unsubscribe(text, text), email.remove_dkim_key(text, text), email.forget(text)
    FROM PUBLIC;
CREATE FUNCTION email.add_dkim_key(
    "domain" TEXT, "selector" TEXT, "private_key" TEXT DEFAULT NULL, "algorithm" TEXT DEFAULT 'rsa-sha256'
) RETURNS TEXT
VOLATILE SECURITY DEFINER PARALLEL UNSAFE
SET search_path TO pg_catalog, email, pg_temp
LANGUAGE c AS 'MODULE_PATHNAME', 'add_dkim_key_wrapper';
REVOKE ALL ON FUNCTION email.add_dkim_key(text, text, text, text) FROM PUBLIC;
CREATE FUNCTION email.domain_setup("domain" TEXT)
RETURNS TABLE ("record_type" TEXT, "name" TEXT, "value" TEXT, "purpose" TEXT)
STABLE SECURITY DEFINER PARALLEL SAFE
SET search_path TO pg_catalog, email, pg_temp
LANGUAGE c AS 'MODULE_PATHNAME', 'domain_setup_wrapper';
REVOKE ALL ON FUNCTION email.domain_setup(text) FROM PUBLIC;

-- Outbound webhooks: where the application hears about events. The secret is in the owner-only
-- email.webhook_secrets.
CREATE TABLE email.webhooks (
    name        text PRIMARY KEY CHECK (name ~ '^[A-Za-z0-9_.-]{1,63}$'),
    url         text NOT NULL,
    events      text[],
    enabled     boolean NOT NULL DEFAULT true,
    created_at  timestamptz NOT NULL DEFAULT now(),
    disabled_at timestamptz,
    disabled_because text
);
CREATE TABLE email.webhook_secrets (
    name    text PRIMARY KEY REFERENCES email.webhooks (name) ON DELETE CASCADE ON UPDATE CASCADE,
    secret  text NOT NULL
);
-- One row per event to deliver to a webhook, queued in the transaction that stored the event.
CREATE TABLE email.webhook_deliveries (
    id              bigint GENERATED BY DEFAULT AS IDENTITY PRIMARY KEY,
    webhook         text NOT NULL REFERENCES email.webhooks (name) ON DELETE CASCADE ON UPDATE CASCADE,
    receipt_id      bigint NOT NULL REFERENCES email.receipts (id) ON DELETE CASCADE,
    status          text NOT NULL DEFAULT 'queued' CHECK (status IN ('queued', 'sent', 'failed')),
    attempts        integer NOT NULL DEFAULT 0,
    next_attempt_at timestamptz NOT NULL DEFAULT now(),
    lease_until     timestamptz,
    response_status integer,
    last_error      text,
    created_at      timestamptz NOT NULL DEFAULT now(),
    sent_at         timestamptz
) WITH (fillfactor = 70);  -- room on the page: a claim's lease is a HOT update
-- The latest failures (the dashboard's list and its bounce reasons) without walking every receipt.
CREATE INDEX receipts_failures ON email.receipts (at) WHERE event IN ('failed', 'bounced');
-- The due deliveries of each webhook, in order (the claim takes a few per webhook).
CREATE INDEX webhook_deliveries_due ON email.webhook_deliveries (webhook, next_attempt_at, id) WHERE status = 'queued';
CREATE INDEX webhook_deliveries_receipt ON email.webhook_deliveries (receipt_id);
REVOKE ALL ON email.webhooks, email.webhook_secrets, email.webhook_deliveries FROM PUBLIC;
REVOKE ALL ON SEQUENCE email.webhook_deliveries_id_seq FROM PUBLIC;
SELECT pg_catalog.pg_extension_config_dump('email.webhooks', '');
SELECT pg_catalog.pg_extension_config_dump('email.webhook_secrets', '');
SELECT pg_catalog.pg_extension_config_dump('email.webhook_deliveries', '');
SELECT pg_catalog.pg_extension_config_dump('email.webhook_deliveries_id_seq', '');

CREATE FUNCTION email._wake_workers() RETURNS void
STRICT VOLATILE PARALLEL UNSAFE
LANGUAGE c AS 'MODULE_PATHNAME', '_wake_workers_wrapper';
REVOKE ALL ON FUNCTION email._wake_workers() FROM PUBLIC;

-- Events out: after every statement that stores receipts, the deliveries of the webhooks that
-- want them are queued, and one NOTIFY email_events is sent per receipt
-- with its ids and event only (any role can LISTEN); PostgreSQL delivers them at commit, and
-- none on rollback. pg_email.notify = off stops them.
CREATE FUNCTION email._receipts_stored() RETURNS trigger
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, email, pg_temp AS $$
DECLARE
    hooks jsonb;
BEGIN
    -- Not on Citus, where this runs on a shard of the receipts: a NOTIFY there would reach only
    -- that node's listeners, and a transaction that sent one cannot take part in a two-phase
    -- commit.
    IF current_setting('pg_email.notify', true)::boolean IS NOT FALSE AND TG_RELID = 'email.receipts'::regclass THEN
        PERFORM pg_notify('email_events',
                          json_build_object('id', s.id, 'message_id', s.message_id, 'event', s.event)::text)
        FROM stored s
        ORDER BY s.id;
    END IF;
    -- One delivery per receipt and enabled webhook that wants its event. The webhooks are read
    -- apart from the transition table: on Citus (email.distribute) this trigger runs on a shard
    -- of the receipts, where a query may join a transition table with local tables only.
    SELECT jsonb_agg(jsonb_build_object('name', w.name, 'events', w.events)) INTO hooks
    FROM email.webhooks w WHERE w.enabled;
    IF hooks IS NULL THEN
        RETURN NULL;
    END IF;
    INSERT INTO email.webhook_deliveries (webhook, receipt_id)
    SELECT w.name, s.id
    FROM stored s
    JOIN jsonb_to_recordset(hooks) AS w(name text, events text[]) ON w.events IS NULL OR s.event = ANY (w.events)
    ORDER BY s.id, w.name;
    IF FOUND THEN
        PERFORM email._wake_workers();
    END IF;
    RETURN NULL;
END $$;
-- Registers (or replaces) an outbound webhook and returns its signing secret (Standard
-- Webhooks: whsec_ and the base64 of 24 to 64 bytes; 32 random bytes when none is given).
CREATE FUNCTION email.add_webhook(name text, url text, events text[] DEFAULT NULL, secret text DEFAULT NULL)
RETURNS text
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, email, pg_temp AS $$
DECLARE
    known text[] := ARRAY['sent', 'deferred', 'failed', 'bounced', 'suppressed', 'cancelled', 'delivered', 'opened',
                          'clicked', 'complained', 'unsubscribed'];
    key bytea;
    s text := add_webhook.secret;
BEGIN
    IF add_webhook.name IS NULL OR add_webhook.name !~ '^[A-Za-z0-9_.-]{1,63}$' THEN
        RAISE EXCEPTION 'invalid name: "%" is not a webhook name (1 to 63 letters, digits, _ . -)', add_webhook.name
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    IF add_webhook.url IS NULL OR add_webhook.url !~* '^https?://[^/?#@[:space:]]+([/?#][^[:space:]]*)?$'
       OR length(add_webhook.url) > 2048 THEN
        RAISE EXCEPTION 'invalid url: "%" is not an http or https URL without a user name', left(add_webhook.url, 200)
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    IF add_webhook.events IS NOT NULL AND (cardinality(add_webhook.events) = 0 OR NOT add_webhook.events <@ known
                                          OR array_position(add_webhook.events, NULL) IS NOT NULL) THEN
        RAISE EXCEPTION 'invalid events: % (each must be one of %)', add_webhook.events, array_to_string(known, ', ')
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    IF s IS NULL THEN
        s := 'whsec_' || encode(uuid_send(gen_random_uuid()) || uuid_send(gen_random_uuid()), 'base64');
    ELSE
        BEGIN
            key := decode(substr(s, 7), 'base64');
        EXCEPTION WHEN OTHERS THEN
            key := NULL;
        END;
        IF left(s, 6) <> 'whsec_' OR key IS NULL OR length(key) NOT BETWEEN 24 AND 64 THEN
            RAISE EXCEPTION 'invalid secret: expected whsec_ and the base64 of 24 to 64 bytes'
                USING ERRCODE = 'invalid_parameter_value';
        END IF;
    END IF;
    INSERT INTO email.webhooks AS w (name, url, events)
    VALUES (add_webhook.name, add_webhook.url, add_webhook.events)
    ON CONFLICT ON CONSTRAINT webhooks_pkey DO UPDATE
    SET url = excluded.url, events = excluded.events, enabled = true, disabled_at = NULL, disabled_because = NULL;
    INSERT INTO email.webhook_secrets AS k (name, secret) VALUES (add_webhook.name, s)
    ON CONFLICT ON CONSTRAINT webhook_secrets_pkey DO UPDATE SET secret = excluded.secret;
    RETURN s;
END $$;

-- Removes a webhook with its queued deliveries; true if it existed.
CREATE FUNCTION email.remove_webhook(name text) RETURNS boolean
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, email, pg_temp AS $$
DECLARE
    n bigint;
BEGIN
    DELETE FROM email.webhooks w WHERE w.name = remove_webhook.name;
    GET DIAGNOSTICS n = ROW_COUNT;
    RETURN n > 0;
END $$;

CREATE TRIGGER receipts_stored AFTER INSERT ON email.receipts
    REFERENCING NEW TABLE AS stored FOR EACH STATEMENT EXECUTE FUNCTION email._receipts_stored();
ALTER TABLE email.receipts ENABLE ALWAYS TRIGGER receipts_stored;

-- Engagement statistics (DESIGN.md "Events out": email.stats), for sql/finalize.sql.
--
-- What each figure means (one message counts at most once per figure; per (day, transport,
-- template, tag), a message with several tags once under each, an untagged one under NULL):
--   sent          the message was accepted by its transport for at least one recipient (a 'sent'
--                 receipt: the worker writes it with messages.sent_at, in the same transaction),
--                 or it was refused at send as a bad address (below). Its `day` is the UTC day of
--                 messages.sent_at, else of its first refusal; every later event of the message
--                 counts in that row, whenever it arrives.
--   delivered     a 'delivered' receipt (a provider's webhook, an RFC 3464 report with Action
--                 delivered/relayed). Plain SMTP transports rarely report one.
--   bounced       a hard bounce ('bounced', bounce_type 'hard': webhook or bounce mail), or a
--                 permanent refusal of an address at send: the worker writes 'bounced' with no
--                 bounce_type (source 'worker') for a recipient refused with RFC 3463 5.1.x
--                 (deliver::outcome::plan, is_bad_address) - the two events that suppress the
--                 address as 'bounced'. Soft and block bounces are not counted, nor 'failed'
--                 receipts (policy refusals 5.7.x, a provider's HTTP 4xx such as a bad key,
--                 content refused, local errors, retries given up): no address is at fault.
--   complained    a 'complained' receipt (feedback loop, provider webhook).
--   opened        a human 'opened' receipt: receipts.machine IS NOT TRUE (mail-privacy proxies,
--                 scanners, HEAD requests and hits within 2 s of sending are machine = true).
--   clicked       a human 'clicked' receipt, likewise; repeated clicks count once. A click does
--                 not imply an open.
--   unsubscribed  an 'unsubscribed' receipt (one-click link, List-Unsubscribe mail, provider).
--   *_rate        that count / sent, a fraction 0-1 (float8; NULL when sent = 0).
-- A message that was never accepted nor refused as a bad address (queued, failed, cancelled,
-- suppressed) is in no row.
--
-- How it stays fast. Measured at 10 million receipts (2.75 million messages, 225,000 sent in
-- June) on the 2-core machine: a plain view over messages and receipts answers one month in
-- about 1 s even with covering indexes (grouping 225,000 per-message rows alone takes 175 ms),
-- so the figures are kept in a rollup; and doing that work in the receipts' trigger costs
-- 15-25 us per event, which would take the listener's webhook ingest below its 20,000
-- events/s. So the work is split:
--   - the receipts' statement trigger only appends one row per statement to
--     email._stats_pending: per message, what its new receipts count for (bits). It costs
--     about 35 us per statement and under 1 us per receipt (the foreign-key check of a receipt
--     alone costs 4.5 us);
--   - email._stats_fold() moves pending rows into email._message_engagement (one narrow row
--     per counted message: what it did so far, when it was sent and what it is counted under)
--     and email._stats_daily (the counts per day, transport, template, tag and role), about
--     20 us per pending receipt. The delivery worker must call it every few seconds (in a short
--     transaction of its own), and the dashboard before it reads;
--   - email.stats and email._engagement add what is still pending when they are read, so they
--     are exact at any time: a month of email.stats reads about 12,000 rows of
--     email._stats_daily (15 ms), plus about 6 us per pending receipt.
-- email._stats_rebuild() computes everything again from messages and receipts (after a
-- data-only restore with triggers disabled, or to check the rollup: the tests compare the two).
-- A message counts under the transport, template, tags and role it had when its first counted
-- receipt was folded (they do not change after sending, but for email.forget redacting a tag
-- that contains the address). Deleting messages (email.purge) takes them out of the counts;
-- TRUNCATE of the receipts empties them. Receipts deleted or updated by hand are not followed
-- until a rebuild.

-- What one receipt counts for, as bits: 1 accepted ('sent'), 2 refused at send as a bad
-- address, 4 delivered, 8 bounced (hard, or refused at send), 16 complained, 32 opened (human),
-- 64 clicked (human), 128 unsubscribed; 0 for a receipt that counts for nothing. The one
-- definition of which receipts count, used by the trigger and by the rebuild.
CREATE FUNCTION email._receipt_flags(event text, bounce_type text, source text, machine boolean) RETURNS integer
LANGUAGE sql IMMUTABLE PARALLEL SAFE
RETURN CASE event
    WHEN 'sent' THEN 1
    WHEN 'delivered' THEN 4
    WHEN 'bounced' THEN CASE WHEN bounce_type = 'hard' THEN 8
                             WHEN bounce_type IS NULL AND source = 'worker' THEN 2 | 8
                             ELSE 0 END
    WHEN 'complained' THEN 16
    WHEN 'opened' THEN CASE WHEN machine IS NOT TRUE THEN 32 ELSE 0 END
    WHEN 'clicked' THEN CASE WHEN machine IS NOT TRUE THEN 64 ELSE 0 END
    WHEN 'unsubscribed' THEN 128
    ELSE 0
END;

-- The tags a message counts under: each distinct tag once, NULL for an untagged message.
CREATE FUNCTION email._stats_tags(tags text[]) RETURNS SETOF text
LANGUAGE sql IMMUTABLE PARALLEL SAFE
AS $$
    SELECT u.tag
    FROM unnest(CASE WHEN cardinality(tags) > 0 THEN tags ELSE '{NULL}'::text[] END) WITH ORDINALITY AS u(tag, n)
    WHERE u.n = coalesce(array_position(tags, u.tag), 1)
$$;

-- Per counted message, as of the last fold: the bits of its receipts (flags), when it was sent
-- (sent_at: NULL until it was accepted or refused at send) and what it is counted under.
CREATE TABLE email._message_engagement (
    message_id      bigint PRIMARY KEY,
    sent_at         timestamptz,
    flags           integer NOT NULL,
    transport       text NOT NULL,
    template        text,
    tags            text[],
    created_by      text NOT NULL
) WITH (fillfactor = 80);
-- The dashboard's windows (last 24 hours, last 30 days): recent rows, whose pages change too
-- often for an index-only scan to pay.
CREATE INDEX message_engagement_sent_at ON email._message_engagement (sent_at) WHERE sent_at IS NOT NULL;

-- The counts as of the last fold, per UTC day of sending, transport, template, tag (NULL:
-- untagged) and the role that queued the messages (row-level security, as for email.messages).
CREATE TABLE email._stats_daily (
    day             date NOT NULL,
    transport       text NOT NULL,
    template        text,
    tag             text,
    created_by      text NOT NULL,
    sent            integer NOT NULL,
    delivered       integer NOT NULL,
    bounced         integer NOT NULL,
    complained      integer NOT NULL,
    opened          integer NOT NULL,
    clicked         integer NOT NULL,
    unsubscribed    integer NOT NULL,
    CONSTRAINT stats_daily_key UNIQUE NULLS NOT DISTINCT (day, transport, template, tag, created_by)
) WITH (fillfactor = 70);

-- Receipts not folded yet: one row per statement that stored counted receipts, one array element
-- per message (its bits, and the first time it was accepted / refused at send in that statement).
CREATE TABLE email._stats_pending (
    id              bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    message_ids     bigint[] NOT NULL,
    flags           integer[] NOT NULL,
    accepted_at     timestamptz[] NOT NULL,
    refused_at      timestamptz[] NOT NULL
);
-- A queue, emptied by every fold: vacuumed early.
ALTER TABLE email._stats_pending SET (autovacuum_vacuum_scale_factor = 0, autovacuum_vacuum_threshold = 1000,
                                      autovacuum_vacuum_cost_delay = 0);

-- After every statement that stores receipts: what they count for, per message, in one row.
CREATE FUNCTION email._stats_receipts() RETURNS trigger
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, email, pg_temp AS $$
BEGIN
    INSERT INTO email._stats_pending (message_ids, flags, accepted_at, refused_at)
    SELECT array_agg(b.message_id), array_agg(b.flags), array_agg(b.accepted_at), array_agg(b.refused_at)
    FROM (
        SELECT s.message_id,
               bit_or(email._receipt_flags(s.event, s.bounce_type, s.source, s.machine)) AS flags,
               min(s.at) FILTER (WHERE s.event = 'sent') AS accepted_at,
               min(s.at) FILTER (WHERE s.event = 'bounced' AND s.bounce_type IS NULL AND s.source = 'worker') AS refused_at
        FROM stored s
        WHERE s.event IN ('sent', 'delivered', 'bounced', 'complained', 'opened', 'clicked', 'unsubscribed')
        GROUP BY s.message_id
    ) b
    WHERE b.flags <> 0
    HAVING count(*) > 0;
    RETURN NULL;
END $$;

-- Per message whose pending receipts (the rows of email._stats_pending with these ids; NULL:
-- all) change what it counts for: its state as of the last fold (old_*; old_flags 0: no row
-- yet), with them (sent_at, flags), and what it is counted under. A message deleted since, and
-- not counted yet, drops out here.
CREATE FUNCTION email._stats_changes(pending bigint[])
RETURNS TABLE (message_id bigint, old_sent_at timestamptz, old_flags integer, sent_at timestamptz, flags integer,
               transport text, template text, tags text[], created_by text)
LANGUAGE sql STABLE
AS $$
    WITH p AS (
        SELECT u.message_id, bit_or(u.flags) AS flags, min(u.accepted_at) AS accepted_at, min(u.refused_at) AS refused_at
        FROM email._stats_pending p,
             unnest(p.message_ids, p.flags, p.accepted_at, p.refused_at) AS u(message_id, flags, accepted_at, refused_at)
        WHERE pending IS NULL OR p.id = ANY (pending)
        GROUP BY u.message_id
    )
    SELECT p.message_id,
           e.sent_at,
           coalesce(e.flags, 0),
           -- the day is that of messages.sent_at (set with the first 'sent' receipt), else of the
           -- first refusal; the first acceptance moves a message refused for a recipient before
           CASE WHEN (coalesce(e.flags, 0) | p.flags) & 3 = 0 THEN NULL
                WHEN e.flags & 1 <> 0 THEN e.sent_at
                WHEN p.flags & 1 <> 0 THEN coalesce(m.sent_at, p.accepted_at)
                WHEN e.flags & 2 <> 0 THEN least(e.sent_at, p.refused_at)
                ELSE coalesce(m.sent_at, p.refused_at)
           END,
           coalesce(e.flags, 0) | p.flags,
           coalesce(e.transport, m.transport),
           CASE WHEN e.message_id IS NULL THEN m.template ELSE e.template END,
           CASE WHEN e.message_id IS NULL THEN m.tags ELSE e.tags END,
           coalesce(e.created_by, m.created_by)
    FROM p
    LEFT JOIN email._message_engagement e ON e.message_id = p.message_id
    -- the message is read only for its first counted receipt and when it is sent (OFFSET 0 keeps
    -- the condition a test before the lookup)
    LEFT JOIN LATERAL (
        SELECT x.sent_at, x.transport, x.template, x.tags, x.created_by
        FROM email.messages x
        WHERE x.id = p.message_id AND (e.message_id IS NULL OR (e.flags & 1 = 0 AND p.flags & 3 <> 0))
        OFFSET 0
    ) m ON true
    -- a repeated event (the second open) changes nothing
    WHERE coalesce(e.flags, 0) | p.flags <> coalesce(e.flags, 0)
      AND (e.message_id IS NOT NULL OR m.transport IS NOT NULL)
$$;

-- What those pending receipts add to email._stats_daily: each changed message's new state
-- counted (+1) and its old state taken back (-1), per key; keys where that nets to nothing are
-- left out. (email._stats_fold does the same over the changes it has already read.)
CREATE FUNCTION email._stats_counts(pending bigint[])
RETURNS TABLE (day date, transport text, template text, tag text, created_by text, sent integer, delivered integer,
               bounced integer, complained integer, opened integer, clicked integer, unsubscribed integer)
LANGUAGE sql STABLE
AS $$
    SELECT (c.sent_at AT TIME ZONE 'UTC')::date, u.transport, u.template, t.tag, u.created_by,
           sum(c.sign)::integer, sum(c.sign * (c.flags >> 2 & 1))::integer, sum(c.sign * (c.flags >> 3 & 1))::integer,
           sum(c.sign * (c.flags >> 4 & 1))::integer, sum(c.sign * (c.flags >> 5 & 1))::integer,
           sum(c.sign * (c.flags >> 6 & 1))::integer, sum(c.sign * (c.flags >> 7 & 1))::integer
    FROM email._stats_changes(pending) u
    CROSS JOIN LATERAL (VALUES (u.sent_at, u.flags, 1), (u.old_sent_at, u.old_flags, -1)) AS c(sent_at, flags, sign)
    CROSS JOIN LATERAL email._stats_tags(u.tags) AS t(tag)
    WHERE c.flags & 3 <> 0
    GROUP BY 1, 2, 3, 4, 5
    HAVING sum(c.sign) <> 0 OR sum(c.sign * (c.flags >> 2 & 1)) <> 0 OR sum(c.sign * (c.flags >> 3 & 1)) <> 0
        OR sum(c.sign * (c.flags >> 4 & 1)) <> 0 OR sum(c.sign * (c.flags >> 5 & 1)) <> 0
        OR sum(c.sign * (c.flags >> 6 & 1)) <> 0 OR sum(c.sign * (c.flags >> 7 & 1)) <> 0
$$;

-- Moves the oldest pending rows (at most max_rows statements' worth) into
-- email._message_engagement and email._stats_daily, in the caller's transaction; returns how
-- many pending rows it folded (call again while that is max_rows), or NULL at once when another
-- fold is running: one fold at a time, so the pending rows it read are the ones it deletes.
CREATE FUNCTION email._stats_fold(max_rows integer DEFAULT 1000) RETURNS integer
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, email, pg_temp AS $$
DECLARE
    ids bigint[];
BEGIN
    IF NOT pg_try_advisory_xact_lock(hashtext('pg_email._stats_fold')) THEN
        RETURN NULL;
    END IF;
    SELECT array_agg(p.id) INTO ids FROM (SELECT x.id FROM email._stats_pending x ORDER BY x.id LIMIT max_rows) p;
    IF ids IS NULL THEN
        RETURN 0;
    END IF;
    WITH c AS MATERIALIZED (
        SELECT * FROM email._stats_changes(ids)
    ), counts AS (
        -- as email._stats_counts(ids); upserted in key order, as the deletion trigger does, so the
        -- two wait for each other instead of deadlocking
        INSERT INTO email._stats_daily AS d (day, transport, template, tag, created_by, sent, delivered, bounced,
                                             complained, opened, clicked, unsubscribed)
        SELECT (k.sent_at AT TIME ZONE 'UTC')::date, u.transport, u.template, t.tag, u.created_by,
               sum(k.sign), sum(k.sign * (k.flags >> 2 & 1)), sum(k.sign * (k.flags >> 3 & 1)),
               sum(k.sign * (k.flags >> 4 & 1)), sum(k.sign * (k.flags >> 5 & 1)), sum(k.sign * (k.flags >> 6 & 1)),
               sum(k.sign * (k.flags >> 7 & 1))
        FROM c u
        CROSS JOIN LATERAL (VALUES (u.sent_at, u.flags, 1), (u.old_sent_at, u.old_flags, -1)) AS k(sent_at, flags, sign)
        CROSS JOIN LATERAL email._stats_tags(u.tags) AS t(tag)
        WHERE k.flags & 3 <> 0
        GROUP BY 1, 2, 3, 4, 5
        HAVING sum(k.sign) <> 0 OR sum(k.sign * (k.flags >> 2 & 1)) <> 0 OR sum(k.sign * (k.flags >> 3 & 1)) <> 0
            OR sum(k.sign * (k.flags >> 4 & 1)) <> 0 OR sum(k.sign * (k.flags >> 5 & 1)) <> 0
            OR sum(k.sign * (k.flags >> 6 & 1)) <> 0 OR sum(k.sign * (k.flags >> 7 & 1)) <> 0
        ORDER BY 1, 2, 3, 4, 5
        ON CONFLICT (day, transport, template, tag, created_by) DO UPDATE
        SET sent = d.sent + excluded.sent, delivered = d.delivered + excluded.delivered,
            bounced = d.bounced + excluded.bounced, complained = d.complained + excluded.complained,
            opened = d.opened + excluded.opened, clicked = d.clicked + excluded.clicked,
            unsubscribed = d.unsubscribed + excluded.unsubscribed
    ), updated AS (
        UPDATE email._message_engagement e SET sent_at = c.sent_at, flags = c.flags
        FROM c
        WHERE e.message_id = c.message_id AND c.old_flags <> 0
    )
    INSERT INTO email._message_engagement (message_id, sent_at, flags, transport, template, tags, created_by)
    SELECT c.message_id, c.sent_at, c.flags, c.transport, c.template, c.tags, c.created_by
    FROM c
    WHERE c.old_flags = 0;
    DELETE FROM email._stats_pending p WHERE p.id = ANY (ids);
    RETURN cardinality(ids);
END $$;

-- After messages are deleted (email.purge, DELETE): they leave the counts.
CREATE FUNCTION email._stats_messages_deleted() RETURNS trigger
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, email, pg_temp AS $$
BEGIN
    WITH gone AS (
        DELETE FROM email._message_engagement e
        USING deleted m
        WHERE e.message_id = m.id
        RETURNING e.sent_at, e.flags, e.transport, e.template, e.tags, e.created_by
    )
    INSERT INTO email._stats_daily AS d (day, transport, template, tag, created_by, sent, delivered, bounced,
                                         complained, opened, clicked, unsubscribed)
    SELECT (g.sent_at AT TIME ZONE 'UTC')::date, g.transport, g.template, t.tag, g.created_by,
           -count(*), -sum(g.flags >> 2 & 1), -sum(g.flags >> 3 & 1), -sum(g.flags >> 4 & 1),
           -sum(g.flags >> 5 & 1), -sum(g.flags >> 6 & 1), -sum(g.flags >> 7 & 1)
    FROM gone g
    CROSS JOIN LATERAL email._stats_tags(g.tags) AS t(tag)
    WHERE g.flags & 3 <> 0
    GROUP BY 1, 2, 3, 4, 5
    ORDER BY 1, 2, 3, 4, 5
    ON CONFLICT (day, transport, template, tag, created_by) DO UPDATE
    SET sent = d.sent + excluded.sent, delivered = d.delivered + excluded.delivered,
        bounced = d.bounced + excluded.bounced, complained = d.complained + excluded.complained,
        opened = d.opened + excluded.opened, clicked = d.clicked + excluded.clicked,
        unsubscribed = d.unsubscribed + excluded.unsubscribed;
    RETURN NULL;
END $$;

-- TRUNCATE of the receipts (also by TRUNCATE email.messages CASCADE) empties the rollup.
CREATE FUNCTION email._stats_truncated() RETURNS trigger
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, email, pg_temp AS $$
BEGIN
    TRUNCATE email._message_engagement, email._stats_daily, email._stats_pending;
    RETURN NULL;
END $$;

-- Computes the rollup again from email.messages and email.receipts (receipt writers wait
-- meanwhile); returns how many messages are counted.
CREATE FUNCTION email._stats_rebuild() RETURNS bigint
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, email, pg_temp AS $$
DECLARE
    n bigint;
BEGIN
    LOCK TABLE email.receipts IN SHARE MODE;
    TRUNCATE email._message_engagement, email._stats_daily, email._stats_pending;
    INSERT INTO email._message_engagement (message_id, sent_at, flags, transport, template, tags, created_by)
    SELECT r.message_id,
           CASE WHEN r.flags & 3 <> 0 THEN coalesce(m.sent_at, r.accepted_at, r.refused_at) END,
           r.flags, m.transport, m.template, m.tags, m.created_by
    FROM (
        SELECT x.message_id,
               bit_or(email._receipt_flags(x.event, x.bounce_type, x.source, x.machine)) AS flags,
               min(x.at) FILTER (WHERE x.event = 'sent') AS accepted_at,
               min(x.at) FILTER (WHERE x.event = 'bounced' AND x.bounce_type IS NULL AND x.source = 'worker') AS refused_at
        FROM email.receipts x
        WHERE x.event IN ('sent', 'delivered', 'bounced', 'complained', 'opened', 'clicked', 'unsubscribed')
        GROUP BY x.message_id
    ) r
    JOIN email.messages m ON m.id = r.message_id
    WHERE r.flags <> 0;
    INSERT INTO email._stats_daily (day, transport, template, tag, created_by, sent, delivered, bounced,
                                    complained, opened, clicked, unsubscribed)
    SELECT (e.sent_at AT TIME ZONE 'UTC')::date, e.transport, e.template, t.tag, e.created_by,
           count(*), sum(e.flags >> 2 & 1), sum(e.flags >> 3 & 1), sum(e.flags >> 4 & 1),
           sum(e.flags >> 5 & 1), sum(e.flags >> 6 & 1), sum(e.flags >> 7 & 1)
    FROM email._message_engagement e
    CROSS JOIN LATERAL email._stats_tags(e.tags) AS t(tag)
    WHERE e.flags & 3 <> 0
    GROUP BY 1, 2, 3, 4, 5;
    SELECT count(*) INTO n FROM email._message_engagement e WHERE e.flags & 3 <> 0;
    ANALYZE email._message_engagement;
    ANALYZE email._stats_daily;
    RETURN n;
END $$;

CREATE TRIGGER receipts_stats AFTER INSERT ON email.receipts
    REFERENCING NEW TABLE AS stored FOR EACH STATEMENT EXECUTE FUNCTION email._stats_receipts();
CREATE TRIGGER receipts_stats_truncated AFTER TRUNCATE ON email.receipts
    FOR EACH STATEMENT EXECUTE FUNCTION email._stats_truncated();
CREATE TRIGGER messages_stats_deleted AFTER DELETE ON email.messages
    REFERENCING OLD TABLE AS deleted FOR EACH STATEMENT EXECUTE FUNCTION email._stats_messages_deleted();
-- The rollup must follow every receipt, also those the worker records with user triggers off
-- (session_replication_role = replica, after a user trigger failed) and rows a replica applies.
ALTER TABLE email.receipts ENABLE ALWAYS TRIGGER receipts_stats;
ALTER TABLE email.receipts ENABLE ALWAYS TRIGGER receipts_stats_truncated;
ALTER TABLE email.messages ENABLE ALWAYS TRIGGER messages_stats_deleted;

-- Per sent message: when, through what, and what happened since, by the definitions of
-- email.stats (pending receipts included), without a row per tag: what the dashboard
-- aggregates per hour and per day.
CREATE VIEW email._engagement WITH (security_invoker = true) AS
SELECT e.message_id,
       e.sent_at,
       (e.sent_at AT TIME ZONE 'UTC')::date AS day,
       date_trunc('hour', e.sent_at AT TIME ZONE 'UTC') AT TIME ZONE 'UTC' AS hour,
       e.transport,
       e.template,
       e.tags,
       e.flags & 4 <> 0 AS delivered,
       e.flags & 8 <> 0 AS bounced,
       e.flags & 16 <> 0 AS complained,
       e.flags & 32 <> 0 AS opened,
       e.flags & 64 <> 0 AS clicked,
       e.flags & 128 <> 0 AS unsubscribed
FROM email._message_engagement e
WHERE e.sent_at IS NOT NULL
  AND NOT EXISTS (SELECT 1 FROM email._stats_changes(NULL) u WHERE u.message_id = e.message_id)
UNION ALL
SELECT u.message_id,
       u.sent_at,
       (u.sent_at AT TIME ZONE 'UTC')::date,
       date_trunc('hour', u.sent_at AT TIME ZONE 'UTC') AT TIME ZONE 'UTC',
       u.transport,
       u.template,
       u.tags,
       u.flags & 4 <> 0,
       u.flags & 8 <> 0,
       u.flags & 16 <> 0,
       u.flags & 32 <> 0,
       u.flags & 64 <> 0,
       u.flags & 128 <> 0
FROM email._stats_changes(NULL) u
WHERE u.sent_at IS NOT NULL;

CREATE VIEW email.stats WITH (security_invoker = true) AS
SELECT s.day,
       s.transport,
       s.template,
       s.tag,
       sum(s.sent) AS sent,
       sum(s.delivered) AS delivered,
       sum(s.bounced) AS bounced,
       sum(s.complained) AS complained,
       sum(s.opened) AS opened,
       sum(s.clicked) AS clicked,
       sum(s.unsubscribed) AS unsubscribed,
       sum(s.delivered)::float8 / nullif(sum(s.sent), 0) AS delivery_rate,
       sum(s.bounced)::float8 / nullif(sum(s.sent), 0) AS bounce_rate,
       sum(s.complained)::float8 / nullif(sum(s.sent), 0) AS complaint_rate,
       sum(s.opened)::float8 / nullif(sum(s.sent), 0) AS open_rate,
       sum(s.clicked)::float8 / nullif(sum(s.sent), 0) AS click_rate
FROM (
    SELECT d.day, d.transport, d.template, d.tag, d.sent, d.delivered, d.bounced, d.complained, d.opened,
           d.clicked, d.unsubscribed
    FROM email._stats_daily d
    UNION ALL
    SELECT u.day, u.transport, u.template, u.tag, u.sent, u.delivered, u.bounced, u.complained, u.opened,
           u.clicked, u.unsubscribed
    FROM email._stats_counts(NULL) u
) s
GROUP BY s.day, s.transport, s.template, s.tag
HAVING sum(s.sent) > 0;

-- Row-level security as for the outbox: a role other than the owner counts only what it queued.
ALTER TABLE email._stats_daily ENABLE ROW LEVEL SECURITY;
CREATE POLICY stats_daily_own ON email._stats_daily FOR SELECT USING (created_by = current_user);
ALTER TABLE email._message_engagement ENABLE ROW LEVEL SECURITY;
CREATE POLICY message_engagement_own ON email._message_engagement FOR SELECT USING (created_by = current_user);

COMMENT ON VIEW email.stats IS 'Per UTC day of sending, transport, template and tag (each tag of a message; NULL: untagged): messages sent (accepted, or refused at send as a bad address), delivered, bounced (hard, or refused at send as a bad address), complained, opened and clicked (by a person), unsubscribed - each message once, its later events on the day it was sent - and the rates as fractions 0-1 of sent.';
COMMENT ON COLUMN email.stats.day IS 'The UTC day the messages were sent (accepted by the transport, else refused at send); their later events count here.';
COMMENT ON COLUMN email.stats.tag IS 'One of the messages'' tags (a message with several counts under each), NULL for untagged messages.';
COMMENT ON COLUMN email.stats.sent IS 'Messages accepted by the transport for a recipient, or refused at send as a bad address (RFC 3463 5.1.x).';
COMMENT ON COLUMN email.stats.delivered IS 'Of those, messages with a delivered report (provider webhook or delivery status notification).';
COMMENT ON COLUMN email.stats.bounced IS 'Of those, messages with a hard bounce or an address refused at send; soft and block bounces and other failures are not counted.';
COMMENT ON COLUMN email.stats.complained IS 'Of those, messages a recipient marked as spam.';
COMMENT ON COLUMN email.stats.opened IS 'Of those, messages opened by a person (machine opens left out).';
COMMENT ON COLUMN email.stats.clicked IS 'Of those, messages with a link clicked by a person (scanner clicks left out; repeated clicks count once).';
COMMENT ON COLUMN email.stats.unsubscribed IS 'Of those, messages whose recipient unsubscribed through them.';
COMMENT ON COLUMN email.stats.delivery_rate IS 'delivered / sent (0-1).';
COMMENT ON COLUMN email.stats.bounce_rate IS 'bounced / sent (0-1).';
COMMENT ON COLUMN email.stats.complaint_rate IS 'complained / sent (0-1).';
COMMENT ON COLUMN email.stats.open_rate IS 'opened / sent (0-1).';
COMMENT ON COLUMN email.stats.click_rate IS 'clicked / sent (0-1).';
COMMENT ON VIEW email._engagement IS 'One row per sent message: its UTC day and hour of sending, transport, template, tags, and whether it was delivered, bounced, complained about, opened, clicked (by a person) or unsubscribed from, by the definitions of email.stats. For per-hour and per-day totals without counting a message once per tag.';
COMMENT ON TABLE email._message_engagement IS 'Internal: per counted message, as of the last email._stats_fold(), the bits of its receipts (1 accepted, 2 refused at send as a bad address, 4 delivered, 8 bounced, 16 complained, 32 opened, 64 clicked, 128 unsubscribed; opens and clicks by a person only), when it was sent and what it is counted under. Read email._engagement.';
COMMENT ON TABLE email._stats_daily IS 'Internal: the counts behind email.stats per UTC day, transport, template, tag and role, as of the last email._stats_fold(). Read email.stats.';
COMMENT ON TABLE email._stats_pending IS 'Internal: what receipts stored since the last email._stats_fold() count for, one row per statement; email.stats and email._engagement add it when read.';
COMMENT ON FUNCTION email._receipt_flags(text, text, text, boolean) IS 'What a receipt counts for in email.stats, as bits (see email._message_engagement); 0 for receipts that count for nothing.';
COMMENT ON FUNCTION email._stats_tags(text[]) IS 'The tags a message counts under in email.stats: each distinct tag once, NULL when untagged.';
COMMENT ON FUNCTION email._stats_receipts() IS 'Appends what the receipts a statement stored count for to email._stats_pending.';
COMMENT ON FUNCTION email._stats_changes(bigint[]) IS 'Internal: per message whose pending receipts (these rows of email._stats_pending; NULL: all) change its figures, its state as of the last fold and with them.';
COMMENT ON FUNCTION email._stats_counts(bigint[]) IS 'Internal: what those pending receipts add to email._stats_daily, per key.';
COMMENT ON FUNCTION email._stats_fold(integer) IS 'Moves the oldest rows of email._stats_pending (at most max_rows) into email._message_engagement and email._stats_daily; returns how many it folded (NULL when another fold is running). Called by the delivery worker every few seconds and before the dashboard reads.';
COMMENT ON FUNCTION email._stats_messages_deleted() IS 'Takes deleted messages out of email._message_engagement and email._stats_daily.';
COMMENT ON FUNCTION email._stats_truncated() IS 'Empties the email.stats rollup when the receipts are truncated.';
COMMENT ON FUNCTION email._stats_rebuild() IS 'Computes the email.stats rollup again from email.messages and email.receipts; returns how many messages are counted.';
REVOKE ALL ON email._message_engagement, email._stats_daily, email._stats_pending, email._engagement, email.stats
    FROM PUBLIC;
REVOKE ALL ON SEQUENCE email._stats_pending_id_seq FROM PUBLIC;
REVOKE ALL ON FUNCTION email._receipt_flags(text, text, text, boolean), email._stats_tags(text[]),
    email._stats_receipts(), email._stats_changes(bigint[]), email._stats_counts(bigint[]), email._stats_fold(integer),
    email._stats_messages_deleted(), email._stats_truncated(), email._stats_rebuild()
    FROM PUBLIC;
-- The counts of the mail already stored.
SELECT email._stats_rebuild();
REVOKE ALL ON FUNCTION email._receipts_stored(), email.add_webhook(text, text, text[], text), email.remove_webhook(text)
    FROM PUBLIC;

-- What each object is for, as \d+ and \df+ show it.
COMMENT ON TYPE email.status IS 'Where a message is: queued (due at next_attempt_at), sending (claimed by a worker under a lease), sent, delivered, bounced, failed, cancelled or suppressed (every recipient was on the suppression list).';
COMMENT ON FUNCTION email._may_act_on_all(text) IS 'True when a role may cancel or retry every message, not only those it queued: it is a member of the extension owner''s role.';
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
COMMENT ON COLUMN email.receipts.source IS 'Where the event came from: worker (a delivery attempt), webhook (a provider event), tracking (a pixel, link or unsubscribe hit on the listener), inbound (bounce or complaint mail) or api (email.send, email.cancel).';
COMMENT ON DOMAIN email.receipt_source IS 'Where a receipt came from: worker, webhook, tracking, inbound or api.';
COMMENT ON DOMAIN email.bounce_type IS 'What a bounce says about the address: hard (it does not exist: suppressed), soft (try later) or block (refused by policy).';
COMMENT ON COLUMN email.receipts.bounce_type IS 'For bounced: hard (the address does not work; suppressed), soft (temporary, e.g. a full mailbox) or block (policy or reputation; never suppressed).';
COMMENT ON COLUMN email.receipts.url IS 'For clicked: the link''s destination.';
COMMENT ON COLUMN email.receipts.user_agent IS 'For opened, clicked and unsubscribed: the client''s User-Agent.';
COMMENT ON COLUMN email.receipts.ip IS 'For opened, clicked and unsubscribed: the client''s address.';
COMMENT ON COLUMN email.receipts.machine IS 'The open or click came from a mail-privacy proxy, a link scanner, a HEAD request, or arrived within 2 s of sending: kept, and left out of human engagement figures.';
COMMENT ON COLUMN email.receipts.provider_event_id IS 'The provider''s id of the event (or a hash of it); the same event is stored once per transport.';
COMMENT ON COLUMN email.receipts.payload IS 'The provider''s event as received.';

COMMENT ON TABLE email.suppressions IS 'Addresses mail is never sent to: recipients on it are dropped at enqueue. Hard bounces (RFC 3463 5.1.x) add rows; so can you.';
COMMENT ON COLUMN email.suppressions.address IS 'The bare address, lower-cased (stored so whatever the case given), or *@domain for a whole domain.';
COMMENT ON COLUMN email.suppressions.reason IS 'bounced, complained, unsubscribed or manual.';
COMMENT ON COLUMN email.suppressions.message_id IS 'The message whose outcome added the address, if any.';

COMMENT ON TABLE email.unmatched_events IS 'Authentic provider events that name no message here, or of a type pg_email does not record: kept, never dropped.';
COMMENT ON TABLE email.tracking_keys IS 'Keys that sign tracking and unsubscribe links (the newest signs, all verify); owner only. email.rotate_tracking_key() adds one.';
COMMENT ON TABLE email.sns_certificates IS 'SNS signing certificates the listener fetched, by URL, so email.ingest_webhook can check SES events without network I/O.';
COMMENT ON COLUMN email.messages.track_opens IS 'An open pixel is added to the HTML part (resolved at enqueue from the call or pg_email.track_opens).';
COMMENT ON COLUMN email.messages.track_clicks IS 'The HTML part''s links go through the listener (resolved at enqueue from the call or pg_email.track_clicks).';
COMMENT ON COLUMN email.messages.list_unsubscribe IS 'List-Unsubscribe and List-Unsubscribe-Post (RFC 8058) headers are added (one recipient only).';
COMMENT ON TABLE email.inbound IS 'Every message received by the listener''s SMTP/LMTP service or email.ingest_message: bounces, delays, complaints, auto-replies, unsubscribes, replies and other mail, with the message it is about when known.';
COMMENT ON COLUMN email.inbound.kind IS 'bounce (a delivery report with a failure), delay (only delays), complaint (an ARF feedback report), auto_reply (RFC 3834 or a vacation notice), unsubscribe (mail to the List-Unsubscribe address), reply (In-Reply-To or References name our message) or message.';
COMMENT ON COLUMN email.inbound.message_id IS 'The email.messages row it is about: named by the VERP return path, else by the Message-ID it refers to.';
COMMENT ON COLUMN email.inbound.raw IS 'The message as received.';
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
COMMENT ON FUNCTION email.ingest_webhook IS 'Verifies and stores one provider webhook request (headers as a JSON object, the raw body) exactly as the listener''s POST /webhooks/<transport> does; returns the rows stored.';
COMMENT ON FUNCTION email.rotate_tracking_key IS 'Starts a new key for tracking and unsubscribe links and returns its id; links signed with older keys keep working.';
COMMENT ON FUNCTION email._record_events(jsonb) IS 'Stores events heard back (webhooks, tracking) and applies their effects: status, suppressions; unmatched ones go to email.unmatched_events.';
COMMENT ON FUNCTION email.ingest_message IS 'Stores one received message (raw bytes, envelope recipients and sender) exactly as the listener''s SMTP/LMTP service does: classified, matched to our message, its reports recorded; returns the email.inbound id.';
COMMENT ON FUNCTION email._record_inbound(jsonb, bytea) IS 'Stores a parsed received message in email.inbound and records its reports through email._record_events.';
COMMENT ON FUNCTION email._address(text) IS 'The bare, lower-cased address of a stored mailbox.';
COMMENT ON FUNCTION email.worker_status IS 'One row per worker serving this database (on Citus, of every node: node is its host:port): the delivery workers (kind delivery: pid, state, messages in flight, totals since start, last activity) and the listener (kind listener: events stored as sent, requests answered 503 as deferred, refused requests as failed, open connections as in_flight); in a database no worker serves, one row says so.';
COMMENT ON COLUMN email.messages.topic IS 'The topic the message is about (email.topics): recipients not subscribed to it were dropped at enqueue, and an unsubscribe from it leaves the topic only.';
COMMENT ON COLUMN email.messages.raw IS 'A message received by SMTP submission: its MIME as it is delivered (Bcc fields taken out, Message-ID and Date added when missing; DKIM signed on the way out). NULL for messages built from their fields.';
COMMENT ON TABLE email.dkim_keys IS 'DKIM keys of sending domains (public half); add them with email.add_dkim_key. Mail from a domain or its subdomains is signed with its newest key of each algorithm.';
COMMENT ON COLUMN email.dkim_keys.dns_name IS 'Where to publish the key: <selector>._domainkey.<domain>.';
COMMENT ON COLUMN email.dkim_keys.dns_value IS 'The TXT record value to publish at dns_name.';
COMMENT ON TABLE email.dkim_secrets IS 'The private half of each DKIM key; readable by the extension owner only. pg_dump includes it: exclude it with --exclude-table-data=email.dkim_secrets when a dump leaves the trusted host.';
COMMENT ON TABLE email.topics IS 'What mail can be about (newsletter, product updates...); email.send(..., topic => name) sends only to its subscribers.';
COMMENT ON COLUMN email.topics.default_subscribed IS 'true: everyone gets the topic''s mail until they leave it (opt-out); false: only those who subscribed (opt-in).';
COMMENT ON TABLE email.subscriptions IS 'Who joined or left which topic, and through what: api (email.subscribe / email.unsubscribe), tracking (the unsubscribe link), inbound (the List-Unsubscribe address), webhook (a provider event) or manual.';
COMMENT ON TABLE email.forgotten IS 'Addresses erased with email.forget, as salted SHA-256 hashes: they are never mailed again.';
COMMENT ON TABLE email.forget_salt IS 'The salt of email.forgotten, made by the first email.forget; owner only.';
COMMENT ON FUNCTION email.subscribe IS 'Subscribes an address to a topic (42704 when the topic does not exist).';
COMMENT ON FUNCTION email.unsubscribe IS 'Takes an address off a topic, or without a topic off all mail (a suppression with reason unsubscribed).';
COMMENT ON FUNCTION email.forget IS 'Erases an address from every pg_email table in one transaction, keeps it suppressed as a salted hash, and returns how many rows of each table changed.';
COMMENT ON FUNCTION email.add_dkim_key IS 'Stores a DKIM key for a sending domain (a PEM in PKCS#1 or PKCS#8 form, or a new RSA 2048 / Ed25519 key when none is given) and returns the TXT value to publish at <selector>._domainkey.<domain>.';
COMMENT ON FUNCTION email.remove_dkim_key IS 'Removes a DKIM key; true if it existed. Mail is signed with the remaining keys at once.';
COMMENT ON FUNCTION email.domain_setup IS 'The DNS records to publish for sending from a domain: DKIM TXT per key, an SPF hint from the transports, a DMARC starter, and the MX and SPF of pg_email.bounce_domain when it lies under the domain.';
COMMENT ON FUNCTION email._forgotten_hash(text) IS 'The salted hash under which email.forget keeps an erased address.';
COMMENT ON FUNCTION email._checked_address(text, text) IS 'The bare, lower-cased address of an argument; 22023 naming the field when it is not an address.';
COMMENT ON FUNCTION email._require_topic(text) IS '42704 unless the topic exists.';
COMMENT ON FUNCTION email._set_subscription(text, text, boolean) IS 'Records that an address joined or left a topic through the SQL API.';
COMMENT ON FUNCTION email._receipts_stored() IS 'Queues the webhook deliveries of stored receipts and sends one NOTIFY email_events per receipt (ids and event only), unless pg_email.notify is off.';
COMMENT ON TABLE email.webhooks IS 'Outbound webhooks: URLs that get each event (of events, NULL: all) as Standard Webhooks-signed JSON. Add them with email.add_webhook; a 410 answer disables one.';
COMMENT ON TABLE email.webhook_secrets IS 'The signing secret of each webhook; readable by the extension owner only.';
COMMENT ON TABLE email.webhook_deliveries IS 'One row per event to deliver to a webhook, queued in the transaction that stored the event: queued, sent or failed.';
COMMENT ON FUNCTION email.add_webhook IS 'Registers or replaces an outbound webhook (enabled again) and returns its Standard Webhooks signing secret (generated when none is given).';
COMMENT ON FUNCTION email.remove_webhook IS 'Removes a webhook and its deliveries; true if it existed.';

-- API keys of the HTTP send API and SMTP submission. Each maps to a role, as which its requests
-- run; only the SHA-256 of a key is kept, in the owner-only email.api_key_hashes.
CREATE TABLE email.api_keys (
    name         text PRIMARY KEY CHECK (name ~ '^[A-Za-z0-9_.@-]{1,63}$'),
    role         name NOT NULL,
    prefix       text NOT NULL,
    rate         text CHECK (rate ~ '^[1-9][0-9]{0,8}/(s|sec|min|h|hour|day)$'),
    created_at   timestamptz NOT NULL DEFAULT now(),
    last_used_at timestamptz
);
CREATE TABLE email.api_key_hashes (
    name text PRIMARY KEY REFERENCES email.api_keys (name) ON DELETE CASCADE ON UPDATE CASCADE,
    hash bytea NOT NULL CHECK (length(hash) = 32)
);

-- API keys (DESIGN.md "Apps that do not speak SQL"). The key is made here, returned once and
-- kept only as its SHA-256; the listener reads the hashes again when they change.
CREATE FUNCTION email.create_api_key(name text, role name, rate text DEFAULT NULL) RETURNS text
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, email, pg_temp AS $$
DECLARE
    key text;
    role_oid oid;
BEGIN
    IF create_api_key.name IS NULL THEN
        RAISE EXCEPTION 'name is required (it is NULL or missing)' USING ERRCODE = 'invalid_parameter_value';
    END IF;
    IF create_api_key.name !~ '^[A-Za-z0-9_.@-]{1,63}$' THEN
        RAISE EXCEPTION 'invalid name: % (1 to 63 letters, digits, _ . @ or -; it is the user name of SMTP submission)',
            quote_literal(left(create_api_key.name, 120)) USING ERRCODE = 'invalid_parameter_value';
    END IF;
    IF create_api_key.role IS NULL THEN
        RAISE EXCEPTION 'role is required (it is NULL or missing)' USING ERRCODE = 'invalid_parameter_value';
    END IF;
    SELECT r.oid INTO role_oid FROM pg_roles r WHERE r.rolname = create_api_key.role;
    IF role_oid IS NULL THEN
        RAISE EXCEPTION 'role % does not exist', quote_ident(create_api_key.role) USING ERRCODE = 'undefined_object';
    END IF;
    IF create_api_key.rate IS NOT NULL AND create_api_key.rate !~ '^[1-9][0-9]{0,8}/(s|sec|min|h|hour|day)$' THEN
        RAISE EXCEPTION 'invalid rate: % (expected requests/unit, for example ''10/s'', ''600/min'', ''1000/h'' or ''50000/day'')',
            quote_literal(left(create_api_key.rate, 120)) USING ERRCODE = 'invalid_parameter_value';
    END IF;
    IF EXISTS (SELECT FROM email.api_keys k WHERE k.name = create_api_key.name) THEN
        RAISE EXCEPTION 'API key % already exists', quote_literal(create_api_key.name)
            USING ERRCODE = 'duplicate_object', HINT = 'Revoke it with email.revoke_api_key(name) first, or choose another name.';
    END IF;
    -- 32 random bytes (two version 4 UUIDs: 244 random bits), URL-safe base64.
    key := 'pge_' || rtrim(translate(encode(uuid_send(gen_random_uuid()) || uuid_send(gen_random_uuid()), 'base64'),
                                     '+/', '-_'), '=');
    INSERT INTO email.api_keys (name, role, prefix, rate)
    VALUES (create_api_key.name, create_api_key.role, left(key, 12), create_api_key.rate);
    INSERT INTO email.api_key_hashes (name, hash) VALUES (create_api_key.name, sha256(convert_to(key, 'UTF8')));
    IF NOT (has_schema_privilege(role_oid, 'email', 'USAGE')
            AND has_function_privilege(role_oid, 'email.send(text, text, text, text, text, text, text, text, jsonb, jsonb, text[], jsonb, timestamptz, text, text, integer, boolean, boolean, text, boolean)', 'EXECUTE')) THEN
        RAISE WARNING 'role % cannot send yet: its requests will be refused until it can', quote_ident(create_api_key.role)
            USING HINT = format('GRANT USAGE ON SCHEMA email TO %1$s; GRANT EXECUTE ON FUNCTION email.send, email.send_template TO %1$s;',
                                quote_ident(create_api_key.role));
    END IF;
    RETURN key;
END $$;

-- Revokes a key at once (the listener refuses it from its next request); true if it existed.
CREATE FUNCTION email.revoke_api_key(name text) RETURNS boolean
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, email, pg_temp AS $$
DECLARE
    n bigint;
BEGIN
    DELETE FROM email.api_keys k WHERE k.name = revoke_api_key.name;
    GET DIAGNOSTICS n = ROW_COUNT;
    RETURN n > 0;
END $$;

-- The listener's batched note of when keys were last used (one statement per few seconds, not
-- a write per request).
CREATE FUNCTION email._api_keys_used(names text[], used timestamptz[]) RETURNS void
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, email, pg_temp AS $$
BEGIN
    UPDATE email.api_keys k SET last_used_at = u.at
    FROM unnest(_api_keys_used.names, _api_keys_used.used) AS u (name, at)
    WHERE k.name = u.name AND (k.last_used_at IS NULL OR k.last_used_at < u.at);
END $$;

-- The listener's copy of the keys is read again when one is created, revoked or changed.
CREATE TRIGGER api_keys_changed AFTER INSERT OR DELETE OR TRUNCATE OR UPDATE OF name, role, rate ON email.api_keys
    FOR EACH STATEMENT EXECUTE FUNCTION email._config_trigger();
CREATE TRIGGER api_key_hashes_changed AFTER INSERT OR UPDATE OR DELETE OR TRUNCATE ON email.api_key_hashes
    FOR EACH STATEMENT EXECUTE FUNCTION email._config_trigger();
REVOKE ALL ON email.api_keys, email.api_key_hashes FROM PUBLIC;
REVOKE ALL ON FUNCTION email.create_api_key(text, name, text), email.revoke_api_key(text),
    email._api_keys_used(text[], timestamptz[]) FROM PUBLIC;
SELECT pg_catalog.pg_extension_config_dump('email.api_keys', '');
SELECT pg_catalog.pg_extension_config_dump('email.api_key_hashes', '');
COMMENT ON TABLE email.api_keys IS 'Keys of the HTTP send API and SMTP submission: each request runs as role (grants and row-level security apply), at most rate requests (NULL: no cap). Create one with email.create_api_key, revoke it with email.revoke_api_key.';
COMMENT ON COLUMN email.api_keys.prefix IS 'The first 12 characters of the key, to tell keys apart; the key itself is not kept.';
COMMENT ON COLUMN email.api_keys.last_used_at IS 'When a request last authenticated with the key (written every few seconds by the listener).';
COMMENT ON TABLE email.api_key_hashes IS 'The SHA-256 of each API key; readable by the extension owner only.';
COMMENT ON FUNCTION email.create_api_key IS 'Creates an API key for role (rate: ''10/s'', ''600/min'', ''1000/h'', ''50000/day''; NULL: no cap) and returns it; it is shown only this once.';
COMMENT ON FUNCTION email.revoke_api_key IS 'Deletes an API key; the listener refuses it from its next request. True if it existed.';
COMMENT ON FUNCTION email._api_keys_used IS 'Internal: the listener notes when keys were last used.';

-- INSERT INTO email.messages as an API (the trigger functions are in the library).
CREATE FUNCTION email."_messages_insert"() RETURNS TRIGGER
LANGUAGE c AS 'MODULE_PATHNAME', '_messages_insert_wrapper';
CREATE FUNCTION email."_messages_statement_start"() RETURNS TRIGGER
LANGUAGE c AS 'MODULE_PATHNAME', '_messages_statement_start_wrapper';
CREATE FUNCTION email."_messages_statement_end"() RETURNS TRIGGER
LANGUAGE c AS 'MODULE_PATHNAME', '_messages_statement_end_wrapper';

-- INSERT INTO email.messages is an API beside email.send: the triggers apply email.send's rules
-- to each row (see src/api/insert.rs). Named to sort after a user's own BEFORE triggers, so
-- those can fill columns the rules then check.
CREATE TRIGGER zz_pg_email_statement BEFORE INSERT ON email.messages
    FOR EACH STATEMENT EXECUTE FUNCTION email._messages_statement_start();
CREATE TRIGGER zz_pg_email_rules BEFORE INSERT ON email.messages
    FOR EACH ROW EXECUTE FUNCTION email._messages_insert();
CREATE TRIGGER zz_pg_email_receipts AFTER INSERT ON email.messages
    FOR EACH STATEMENT EXECUTE FUNCTION email._messages_statement_end();
COMMENT ON FUNCTION email._messages_insert() IS 'BEFORE INSERT on email.messages: validates the row as email.send validates its arguments, fills the columns email.send fills, drops suppressed and unsubscribed recipients; skips a row that repeats an idempotency key with the same content.';
COMMENT ON FUNCTION email._messages_statement_start() IS 'BEFORE INSERT on email.messages, per statement: starts counting the statement''s rows (a long statement reads the suppression list once).';
COMMENT ON FUNCTION email._messages_statement_end() IS 'AFTER INSERT on email.messages, per statement: writes the statement''s ''suppressed'' receipts.';

-- True when Citus manages table `tbl` (distributed or reference) in this node's metadata;
-- false without Citus.
CREATE FUNCTION email._citus_table(tbl regclass) RETURNS boolean
LANGUAGE plpgsql STABLE SET search_path = pg_catalog, email, pg_temp AS $$
DECLARE
    found boolean := false;
BEGIN
    IF to_regclass('pg_catalog.pg_dist_partition') IS NOT NULL THEN
        EXECUTE 'SELECT EXISTS (SELECT 1 FROM pg_dist_partition WHERE logicalrelid = $1)' INTO found USING tbl;
    END IF;
    RETURN found;
END $$;

-- On Citus, after email.distribute(): runs `command` on every worker node, from the coordinator
-- (Citus does not send an extension's grants there itself); elsewhere, nothing.
CREATE FUNCTION email._on_worker_nodes(command text) RETURNS void
LANGUAGE plpgsql SET search_path = pg_catalog, email, pg_temp AS $$
DECLARE
    coordinator boolean;
    failed text;
BEGIN
    IF NOT email._citus_table('email.messages') THEN
        RETURN;
    END IF;
    EXECUTE 'SELECT citus_is_coordinator()' INTO STRICT coordinator;
    IF NOT coordinator THEN
        RETURN;
    END IF;
    -- A worker node refuses DDL on objects Citus propagates unless propagation is off there.
    EXECUTE $q$SELECT string_agg(format('%s:%s: %s', nodename, nodeport, result), '; ')
               FROM run_command_on_workers('SET citus.enable_ddl_propagation = off; ' || $1) WHERE NOT success$q$
        INTO failed USING command;
    IF failed IS NOT NULL THEN
        RAISE EXCEPTION 'on the worker nodes: %', failed;
    END IF;
END $$;

-- For upgrade scripts (sql/pg_email--A--B.sql): runs `command`, a DDL statement on table `tbl`,
-- so that ALTER EXTENSION pg_email UPDATE also works after email.distribute(). Run on the
-- coordinator, Citus sends a statement on a distributed or reference table to every shard as
-- the statement's text, and in an extension script that text would be the whole script; through
-- EXECUTE it is the one statement. Citus then runs ALTER EXTENSION UPDATE on each worker node,
-- whose copy of `tbl` and shards the coordinator has already changed: there it does nothing.
-- Elsewhere (one server, or a Citus table not distributed) it runs `command`.
CREATE FUNCTION email._upgrade_ddl(tbl regclass, command text) RETURNS void
LANGUAGE plpgsql SET search_path = pg_catalog, email, pg_temp AS $$
DECLARE
    coordinator boolean;
BEGIN
    IF email._citus_table(tbl) THEN
        EXECUTE 'SELECT citus_is_coordinator()' INTO STRICT coordinator;
        IF NOT coordinator THEN
            RETURN;
        END IF;
    END IF;
    EXECUTE command;
END $$;
-- What sending takes, in one call: email.send and email.send_template, INSERT on the columns a
-- message is made of, SELECT on the outbox and its receipts (row-level security shows a role
-- its own mail only).
CREATE FUNCTION email.grant_send(role name) RETURNS void
LANGUAGE plpgsql SET search_path = pg_catalog, email, pg_temp AS $$
BEGIN
    -- An unknown role is refused by GRANT itself (42704, naming it).
    IF role IS NULL THEN
        RAISE EXCEPTION 'invalid role: NULL' USING ERRCODE = 'invalid_parameter_value';
    END IF;
    EXECUTE format('GRANT USAGE ON SCHEMA email TO %I', role);
    -- email._is_finished is in an outbox index's predicate, which an INSERT evaluates;
    -- email._message_visible in the policies of receipts, attachments and captured on Citus.
    EXECUTE format('GRANT EXECUTE ON FUNCTION email.send, email.send_template, email._is_finished, email._message_visible TO %I', role);
    EXECUTE format('GRANT INSERT (recipients, cc, bcc, sender, reply_to, subject, body, html, template, data, '
                   'headers, tags, metadata, priority, send_at, idempotency_key, transport, topic, track_opens, '
                   'track_clicks, list_unsubscribe) ON email.messages TO %I', role);
    EXECUTE format('GRANT SELECT ON email.messages, email.receipts, email.attachments TO %I', role);
    -- Citus sends the schema's and the tables' grants to every node itself, not an extension's
    -- function grants: those are sent here.
    PERFORM email._on_worker_nodes(format('GRANT EXECUTE ON FUNCTION email.send, email.send_template, '
                                          'email._is_finished, email._message_visible TO %I', role));
END $$;
-- And takes it back.
CREATE FUNCTION email.revoke_send(role name) RETURNS void
LANGUAGE plpgsql SET search_path = pg_catalog, email, pg_temp AS $$
BEGIN
    -- An unknown role is refused by GRANT itself (42704, naming it).
    IF role IS NULL THEN
        RAISE EXCEPTION 'invalid role: NULL' USING ERRCODE = 'invalid_parameter_value';
    END IF;
    EXECUTE format('REVOKE EXECUTE ON FUNCTION email.send, email.send_template, email._is_finished, email._message_visible FROM %I', role);
    EXECUTE format('REVOKE INSERT, SELECT ON email.messages FROM %I', role);
    EXECUTE format('REVOKE SELECT ON email.receipts, email.attachments FROM %I', role);
    PERFORM email._on_worker_nodes(format('REVOKE EXECUTE ON FUNCTION email.send, email.send_template, '
                                          'email._is_finished, email._message_visible FROM %I', role));
END $$;
COMMENT ON FUNCTION email.grant_send(name) IS 'Grants role what sending takes: USAGE on schema email, EXECUTE on email.send and email.send_template, INSERT on the columns of a message in email.messages, SELECT on email.messages, email.receipts and email.attachments (row-level security shows it its own mail only).';
COMMENT ON FUNCTION email.revoke_send(name) IS 'Takes back what email.grant_send granted (but USAGE on schema email, which other grants may need).';
CREATE POLICY messages_insert_own ON email.messages FOR INSERT WITH CHECK (created_by = current_user);
REVOKE ALL ON FUNCTION email._messages_insert(), email._messages_statement_start(), email._messages_statement_end(),
    email.grant_send(name), email.revoke_send(name) FROM PUBLIC;

-- Whether the caller may see message `id` (row-level security of email.messages applies): the
-- child tables' policies on Citus, where a policy cannot hold a subquery. Run on a shard of
-- receipts, attachments or captured, it looks at the co-located messages shard on the same node.
CREATE FUNCTION email._message_visible(id bigint) RETURNS boolean
LANGUAGE plpgsql STABLE SET search_path = pg_catalog, email, pg_temp SET citus.allow_nested_distributed_execution = on
AS $$
BEGIN
    RETURN EXISTS (SELECT 1 FROM email.messages m WHERE m.id = _message_visible.id);
END $$;

-- Scale-out on Citus (README "Scaling out with Citus"). Run once on the coordinator, after the
-- worker nodes are added, also with mail queued (it is kept and delivered): the outbox becomes
-- hash-distributed on id, with receipts, attachments and captured co-located with it (each
-- message's rows on one node, whose worker sends it); the configuration becomes reference tables
-- (a copy on every node); the bookkeeping of each node's own work (webhook deliveries, inbound
-- mail, unmatched events, the statistics rollup) stays local to that node. Every node's
-- sequences get a range of their own (group id << 48), as Citus gives its own tables. One-way:
-- Citus cannot undistribute tables an extension owns.
CREATE FUNCTION email.distribute(shard_count integer DEFAULT NULL) RETURNS text
LANGUAGE plpgsql SET search_path = pg_catalog, email, pg_temp AS $$
DECLARE
    -- What Citus cannot distribute, made so on every node (the tables are created by CREATE
    -- EXTENSION on each node, and Citus does not send DDL on an extension's local tables):
    -- unique indexes must include the distribution column, child-table policies cannot hold a
    -- subquery, a local table cannot reference a distributed one, and reference tables get
    -- their foreign keys back once all are reference tables. Written to run twice.
    prepare constant text := $ddl$
        DROP INDEX IF EXISTS email.messages_idempotency_key;
        ALTER TABLE email.inbound DROP CONSTRAINT IF EXISTS inbound_message_id_fkey;
        ALTER TABLE email.webhook_deliveries DROP CONSTRAINT IF EXISTS webhook_deliveries_receipt_id_fkey,
                                             DROP CONSTRAINT IF EXISTS webhook_deliveries_webhook_fkey;
        ALTER TABLE email.receipts DROP CONSTRAINT IF EXISTS receipts_pkey, ADD PRIMARY KEY (message_id, id);
        ALTER TABLE email.captured DROP CONSTRAINT IF EXISTS captured_pkey, ADD PRIMARY KEY (message_id, id);
        DROP POLICY IF EXISTS receipts_own ON email.receipts;
        DROP POLICY IF EXISTS attachments_own ON email.attachments;
        DROP POLICY IF EXISTS captured_own ON email.captured;
        ALTER TABLE email.transports DROP CONSTRAINT IF EXISTS transports_fallback_fkey;
        ALTER TABLE email.transport_secrets DROP CONSTRAINT IF EXISTS transport_secrets_name_fkey;
        ALTER TABLE email.dkim_secrets DROP CONSTRAINT IF EXISTS dkim_secrets_domain_selector_fkey;
        ALTER TABLE email.subscriptions DROP CONSTRAINT IF EXISTS subscriptions_topic_fkey;
        ALTER TABLE email.webhook_secrets DROP CONSTRAINT IF EXISTS webhook_secrets_name_fkey;
        ALTER TABLE email.api_key_hashes DROP CONSTRAINT IF EXISTS api_key_hashes_name_fkey;
    $ddl$;
    -- Each worker node's bigint sequences start at its group id << 48.
    ranges constant text := $ddl$
        SELECT count(setval(s.oid::regclass, greatest((SELECT groupid FROM pg_dist_local_group)::bigint << 48,
                                                      q.seqstart) + 1, false))
        FROM pg_class s JOIN pg_sequence q ON q.seqrelid = s.oid
        WHERE s.relnamespace = 'email'::regnamespace AND q.seqtypid = 'bigint'::regtype
    $ddl$;
    failed text;
BEGIN
    IF shard_count IS NOT NULL AND shard_count NOT BETWEEN 1 AND 64000 THEN
        RAISE EXCEPTION 'invalid shard_count: % (expected 1 to 64000)', shard_count USING ERRCODE = 'invalid_parameter_value';
    END IF;
    IF to_regclass('pg_catalog.pg_dist_partition') IS NULL THEN
        RAISE EXCEPTION 'email.distribute() needs Citus in this database'
            USING ERRCODE = 'feature_not_supported', HINT = 'CREATE EXTENSION citus, add the worker nodes, then call it.';
    END IF;
    IF NOT citus_is_coordinator() THEN
        RAISE EXCEPTION 'email.distribute() runs on the coordinator' USING ERRCODE = 'feature_not_supported';
    END IF;
    IF EXISTS (SELECT 1 FROM pg_dist_partition WHERE logicalrelid = 'email.messages'::regclass) THEN
        RETURN 'already distributed';
    END IF;
    IF NOT EXISTS (SELECT 1 FROM pg_dist_node WHERE groupid <> 0 AND noderole = 'primary' AND isactive) THEN
        RAISE EXCEPTION 'email.distribute() needs worker nodes: none is active'
            USING ERRCODE = 'feature_not_supported', HINT = 'Add them with citus_add_node first.';
    END IF;
    SELECT string_agg(format('%s:%s: %s', nodename, nodeport, result), '; ') INTO failed
    FROM run_command_on_workers(format('DO %L', 'BEGIN ' || prepare || ' END')) WHERE NOT success;
    IF failed IS NOT NULL THEN
        RAISE EXCEPTION 'email.distribute(): preparing the worker nodes failed: %', failed;
    END IF;
    EXECUTE prepare;
    -- The extension's triggers are pg_email's own and safe on every placement; the foreign keys
    -- between reference tables need one connection per node; Citus' notices about the copied
    -- rows are not the caller's business.
    PERFORM set_config('citus.enable_unsafe_triggers', 'on', true);
    PERFORM set_config('citus.multi_shard_modify_mode', 'sequential', true);
    PERFORM set_config('client_min_messages', 'warning', true);
    PERFORM create_distributed_table('email.messages', 'id',
                                     shard_count => coalesce(shard_count, current_setting('citus.shard_count')::int));
    PERFORM create_distributed_table('email.receipts', 'message_id', colocate_with => 'email.messages');
    PERFORM create_distributed_table('email.attachments', 'message_id', colocate_with => 'email.messages');
    PERFORM create_distributed_table('email.captured', 'message_id', colocate_with => 'email.messages');
    CREATE POLICY receipts_own ON email.receipts FOR SELECT USING (email._message_visible(message_id));
    CREATE POLICY attachments_own ON email.attachments FOR SELECT USING (email._message_visible(message_id));
    CREATE POLICY captured_own ON email.captured FOR SELECT USING (email._message_visible(message_id));
    PERFORM create_reference_table(t)
    FROM unnest(ARRAY['email.transports', 'email.transport_secrets', 'email.suppressions', 'email.templates',
                      'email.template_versions', 'email.topics', 'email.subscriptions', 'email.webhooks',
                      'email.webhook_secrets', 'email.dkim_keys', 'email.dkim_secrets', 'email.tracking_keys',
                      'email.api_keys', 'email.api_key_hashes', 'email.forgotten', 'email.forget_salt']::regclass[]) t;
    ALTER TABLE email.transports ADD CONSTRAINT transports_fallback_fkey FOREIGN KEY (fallback)
        REFERENCES email.transports (name) ON DELETE SET NULL ON UPDATE CASCADE;
    ALTER TABLE email.transport_secrets ADD CONSTRAINT transport_secrets_name_fkey FOREIGN KEY (name)
        REFERENCES email.transports (name) ON UPDATE CASCADE ON DELETE CASCADE;
    ALTER TABLE email.dkim_secrets ADD CONSTRAINT dkim_secrets_domain_selector_fkey FOREIGN KEY (domain, selector)
        REFERENCES email.dkim_keys (domain, selector) ON UPDATE CASCADE ON DELETE CASCADE;
    ALTER TABLE email.subscriptions ADD CONSTRAINT subscriptions_topic_fkey FOREIGN KEY (topic)
        REFERENCES email.topics (name) ON UPDATE CASCADE ON DELETE CASCADE;
    ALTER TABLE email.webhook_secrets ADD CONSTRAINT webhook_secrets_name_fkey FOREIGN KEY (name)
        REFERENCES email.webhooks (name) ON UPDATE CASCADE ON DELETE CASCADE;
    ALTER TABLE email.api_key_hashes ADD CONSTRAINT api_key_hashes_name_fkey FOREIGN KEY (name)
        REFERENCES email.api_keys (name) ON UPDATE CASCADE ON DELETE CASCADE;
    SELECT string_agg(format('%s:%s: %s', nodename, nodeport, result), '; ') INTO failed
    FROM run_command_on_workers(ranges) WHERE NOT success;
    IF failed IS NOT NULL THEN
        RAISE EXCEPTION 'email.distribute(): giving the worker nodes their id ranges failed: %', failed;
    END IF;
    -- Roles granted sending before now get the same grants on every node.
    PERFORM email.grant_send(r.rolname)
    FROM pg_roles r
    WHERE has_function_privilege(r.oid, (SELECT p.oid FROM pg_proc p
                                         WHERE p.proname = 'send' AND p.pronamespace = 'email'::regnamespace), 'EXECUTE')
      AND NOT r.rolsuper AND r.oid <> (SELECT relowner FROM pg_class WHERE oid = 'email.messages'::regclass);
    RETURN format('distributed: email.messages in %s shards on %s worker nodes',
                  (SELECT count(*) FROM pg_dist_shard WHERE logicalrelid = 'email.messages'::regclass),
                  (SELECT count(*) FROM pg_dist_node WHERE groupid <> 0 AND noderole = 'primary'));
END $$;
COMMENT ON FUNCTION email.distribute(integer) IS 'On Citus, run once on the coordinator after adding the worker nodes: distributes the outbox on id (receipts, attachments, captured co-located), makes the configuration reference tables, and gives each node its own id range. See the README, "Scaling out with Citus".';
REVOKE ALL ON FUNCTION email.distribute(integer), email._message_visible(bigint), email._on_worker_nodes(text),
    email._upgrade_ddl(regclass, text), email._citus_table(regclass) FROM PUBLIC;

-- Mail queued in a database no worker serves would wait for ever: say so now.
SELECT email._warn_if_unserved();

-- The first tracking key, so tracking and unsubscribe links can be signed from the start.
SELECT email.rotate_tracking_key();
