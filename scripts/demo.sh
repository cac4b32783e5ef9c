#!/usr/bin/env bash
# make demo: a throwaway cluster with the worker, mail queued by email.send, by a trigger and by
# an INSERT into the outbox, delivered through the default local transport (file:// into
# demo-out/), then the receipts.
# SMTP_DSN=smtp://... make demo sends through that SMTP server instead.
set -euo pipefail
cd "$(dirname "$0")/.."
DIR=$PWD/.demo; PORT=${DEMO_PORT:-5498}; OUT=$PWD/demo-out
scripts/cluster.sh start "$DIR" "$PORT" demo "pg_email.default_sender = 'pg_email demo <demo@example.org>'" \
    "pg_email.poll_interval = '500ms'"
rm -rf "$OUT"; mkdir -p "$OUT"; chown postgres:postgres "$OUT"
DSN=${SMTP_DSN:-file://$OUT}
psql() { command psql -X -q -v ON_ERROR_STOP=1 -h 127.0.0.1 -p "$PORT" -U postgres -d demo "$@"; }

psql -v dsn="$DSN" <<'SQL'
CREATE EXTENSION pg_email;
SELECT email.add_transport('local', :'dsn', is_default => true);

-- An application table whose inserts send a welcome mail from a trigger.
CREATE TABLE users (id serial PRIMARY KEY, name text NOT NULL, email text NOT NULL);
CREATE FUNCTION users_welcome() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    PERFORM email.send(
        recipients => format('%s <%s>', NEW.name, NEW.email),
        subject    => 'Welcome, ' || NEW.name,
        body       => 'Hello ' || NEW.name || E',\n\nyour account is ready.\n',
        tags       => ARRAY['welcome'],
        idempotency_key => 'welcome-' || NEW.id);
    RETURN NEW;
END $$;
CREATE TRIGGER users_welcome AFTER INSERT ON users FOR EACH ROW EXECUTE FUNCTION users_welcome();

BEGIN;
SELECT email.send(recipients => 'Ada <ada@example.org>, bob@example.org',
                  subject => 'Quarterly report ✓',
                  body => 'The numbers are in.',
                  html => '<p>The numbers are <b>in</b>.</p>',
                  headers => '{"X-Campaign": "q3"}') AS queued_id;
INSERT INTO users (name, email) VALUES ('Grace', 'grace@example.org'), ('Linus', 'linus@example.org');
-- The outbox is an INSERT target too: the same rules as email.send, a row per message.
INSERT INTO email.messages (recipients, subject, body, tags)
SELECT ARRAY[format('%s <%s>', u.name, u.email)], 'Your first week', 'Tips for getting started.', ARRAY['onboarding']
FROM users u;
COMMIT;

BEGIN;  -- rolled back: this mail is never sent
SELECT email.send(recipients => 'nobody@example.org', subject => 'never sent', body => 'x');
ROLLBACK;
SQL

echo "waiting for the worker..."
for _ in $(seq 1 50); do
    left=$(psql -At -c "SELECT count(*) FROM email.messages WHERE status IN ('queued', 'sending')")
    [ "$left" = 0 ] && break
    sleep 0.2
done
echo; echo "== email.queue_summary"; psql -c "SELECT status, transport, messages, due FROM email.queue_summary ORDER BY 1, 2"
echo "== email.messages"; psql -c "SELECT id, status, recipients, subject, attempts, sent_at IS NOT NULL AS sent FROM email.messages ORDER BY id"
echo "== email.receipts"; psql -c "SELECT message_id, event, transport, attempt, recipient, response, round(duration_ms::numeric, 1) AS ms FROM email.receipts ORDER BY id"
if [ -z "${SMTP_DSN:-}" ]; then echo "== delivered files in demo-out/"; ls -1 "$OUT" | tail -n 5; fi
echo
echo "The demo cluster keeps running: psql -h 127.0.0.1 -p $PORT -U postgres demo"
echo "Stop it with: scripts/cluster.sh stop $DIR"
