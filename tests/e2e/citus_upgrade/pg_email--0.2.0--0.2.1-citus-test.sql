-- A test-only update (tests/e2e/test_citus_upgrade.py installs it, runs it on a distributed
-- installation, then goes back with pg_email--0.2.1-citus-test--0.2.0.sql and removes both).
-- The kinds of change a real upgrade script makes, written as one must be written for Citus:
-- DDL on a table through email._upgrade_ddl, functions and new objects as usual.
SELECT email._upgrade_ddl('email.messages', 'ALTER TABLE email.messages ADD COLUMN upgrade_note text');
SELECT email._upgrade_ddl('email.messages', 'CREATE INDEX messages_upgrade_note ON email.messages (upgrade_note)');
SELECT email._upgrade_ddl('email.receipts',
    'ALTER TABLE email.receipts ADD COLUMN upgrade_flag boolean NOT NULL DEFAULT false');
SELECT email._upgrade_ddl('email.transports',
    'ALTER TABLE email.transports ADD COLUMN upgrade_weight int NOT NULL DEFAULT 1');
SELECT email._upgrade_ddl('email.suppressions',
    'ALTER TABLE email.suppressions ADD CONSTRAINT suppressions_upgrade_length CHECK (length(address) < 1000)');
SELECT email._upgrade_ddl('email.inbound', 'ALTER TABLE email.inbound ADD COLUMN upgrade_seen boolean');

CREATE OR REPLACE FUNCTION email._may_act_on_all(caller text) RETURNS boolean
LANGUAGE sql STABLE
RETURN pg_has_role(caller, (SELECT e.extowner FROM pg_extension e WHERE e.extname = 'pg_email'), 'MEMBER') AND true;

CREATE FUNCTION email.upgrade_probe() RETURNS text LANGUAGE sql IMMUTABLE RETURN 'citus-test';
