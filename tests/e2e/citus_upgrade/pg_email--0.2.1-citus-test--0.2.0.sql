-- Back from the test-only update (see pg_email--0.2.0--0.2.1-citus-test.sql): every change undone.
SELECT email._upgrade_ddl('email.messages', 'DROP INDEX email.messages_upgrade_note');
SELECT email._upgrade_ddl('email.messages', 'ALTER TABLE email.messages DROP COLUMN upgrade_note');
SELECT email._upgrade_ddl('email.receipts', 'ALTER TABLE email.receipts DROP COLUMN upgrade_flag');
SELECT email._upgrade_ddl('email.transports', 'ALTER TABLE email.transports DROP COLUMN upgrade_weight');
SELECT email._upgrade_ddl('email.suppressions', 'ALTER TABLE email.suppressions DROP CONSTRAINT suppressions_upgrade_length');
SELECT email._upgrade_ddl('email.inbound', 'ALTER TABLE email.inbound DROP COLUMN upgrade_seen');

CREATE OR REPLACE FUNCTION email._may_act_on_all(caller text) RETURNS boolean
LANGUAGE sql STABLE
RETURN pg_has_role(caller, (SELECT e.extowner FROM pg_extension e WHERE e.extname = 'pg_email'), 'MEMBER');

DROP FUNCTION email.upgrade_probe();
