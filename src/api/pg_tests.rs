//! `#[pg_test]`s for the SQL API. Each runs inside a transaction that is rolled back, so the
//! worker of the test cluster never sees their rows.

#[pgrx::pg_schema]
mod tests {
    use pgrx::prelude::*;

    fn setup() {
        Spi::run("SELECT email.add_transport('cap', 'capture://', is_default => true)").unwrap();
    }

    fn one<T: pgrx::IntoDatum + pgrx::FromDatum>(q: &str) -> T {
        Spi::get_one::<T>(q).unwrap().unwrap()
    }

    /// The value of `q` for message `id` (passed as $1).
    fn of<T: pgrx::IntoDatum + pgrx::FromDatum>(q: &str, id: i64) -> T {
        Spi::get_one_with_args::<T>(q, &[id.into()]).unwrap().unwrap()
    }

    #[pg_test]
    fn send_returns_the_new_id_and_stores_a_queued_row() {
        setup();
        let id: i64 =
            one("SELECT email.send(recipients => 'a@x.org', subject => 'Hi', body => 'Hello', sender => 'me@x.org')");
        assert_eq!(of::<String>("SELECT status::text FROM email.messages WHERE id = $1", id), "queued");
        assert_eq!(of::<String>("SELECT transport FROM email.messages WHERE id = $1", id), "cap");
        assert!(of::<String>("SELECT message_id FROM email.messages WHERE id = $1", id).ends_with("@x.org>"));
    }

    #[pg_test]
    fn idempotency_key_returns_the_same_id() {
        setup();
        let a: i64 = one("SELECT email.send(recipients => 'a@x.org', subject => 's', body => 'b', sender => 'me@x.org', idempotency_key => 'k')");
        let b: i64 = one("SELECT email.send(recipients => 'a@x.org', subject => 's', body => 'b', sender => 'me@x.org', idempotency_key => 'k')");
        assert_eq!(a, b);
        assert_eq!(one::<i64>("SELECT count(*) FROM email.messages"), 1);
    }

    #[pg_test(error = "invalid idempotency_key: \"k\" was already used for message 1 with different content")]
    fn an_idempotency_key_reused_with_other_content_is_refused() {
        setup();
        Spi::run("ALTER TABLE email.messages ALTER COLUMN id RESTART WITH 1").unwrap();
        Spi::run("SELECT email.send(recipients => 'a@x.org', subject => 's', body => 'b', sender => 'me@x.org', idempotency_key => 'k')").unwrap();
        Spi::run("SELECT email.send(recipients => 'b@x.org', subject => 't', body => 'c', sender => 'me@x.org', idempotency_key => 'k')").unwrap();
    }

    #[pg_test(error = "invalid recipients: \"nope\" is not a valid address: Missing domain or user")]
    fn a_bad_recipient_names_the_field_and_value() {
        setup();
        Spi::run("SELECT email.send(recipients => 'nope', subject => 's', body => 'b', sender => 'me@x.org')").unwrap();
    }

    #[pg_test(error = "transport \"missing\" does not exist")]
    fn an_unknown_transport_is_refused() {
        setup();
        Spi::run("SELECT email.send(recipients => 'a@x.org', subject => 's', body => 'b', sender => 'me@x.org', transport => 'missing')").unwrap();
    }

    #[pg_test]
    fn template_versions_are_kept() {
        Spi::run("INSERT INTO email.templates (name, subject, body) VALUES ('t', 'S', 'v1')").unwrap();
        Spi::run("UPDATE email.templates SET body = 'v2' WHERE name = 't'").unwrap();
        Spi::run("UPDATE email.templates SET body = 'v2' WHERE name = 't'").unwrap();
        assert_eq!(one::<i32>("SELECT version FROM email.templates WHERE name = 't'"), 2);
        assert_eq!(one::<i64>("SELECT count(*) FROM email.template_versions WHERE name = 't'"), 2);
    }

    #[pg_test]
    fn transports_show_no_secret() {
        Spi::run("SELECT email.add_transport('s', 'smtp://user:hunter22@mail.x.org:587')").unwrap();
        assert_eq!(
            one::<String>("SELECT dsn FROM email.transports WHERE name = 's'"),
            "smtp://user:***@mail.x.org:587"
        );
    }

    #[pg_test]
    fn a_template_upsert_keeps_one_version_per_real_change() {
        let upsert = |body: &str| {
            Spi::run_with_args(
                "INSERT INTO email.templates (name, subject, body) VALUES ('u', 'S', $1) \
                 ON CONFLICT (name) DO UPDATE SET subject = EXCLUDED.subject, body = EXCLUDED.body",
                &[body.into()],
            )
            .unwrap();
        };
        upsert("v1 {{ x }}");
        upsert("v1 {{ x }}"); // unchanged: no new version
        upsert("v2 {{ x }}");
        assert_eq!(one::<i32>("SELECT version FROM email.templates WHERE name = 'u'"), 2);
        assert_eq!(
            one::<String>("SELECT string_agg(version || '=' || body, ', ' ORDER BY version) FROM email.template_versions WHERE name = 'u'"),
            "1=v1 {{ x }}, 2=v2 {{ x }}"
        );
        setup();
        let id: i64 = one("SELECT email.send_template('u', 'a@x.org', '{\"x\": 1}', sender => 'me@x.org')");
        assert_eq!(of::<i32>("SELECT template_version FROM email.messages WHERE id = $1", id), 2);
        upsert("v3 {{ x }}");
        assert_eq!(of::<i32>("SELECT template_version FROM email.messages WHERE id = $1", id), 2);
        assert_eq!(one::<i64>("SELECT count(*) FROM email.template_versions WHERE name = 'u'"), 3);
        // An idempotent seed leaves no phantom version behind, so later updates still work.
        Spi::run("INSERT INTO email.templates (name, subject, body) VALUES ('u', 'S', 'seed') ON CONFLICT DO NOTHING")
            .unwrap();
        Spi::run("UPDATE email.templates SET body = 'v4' WHERE name = 'u'").unwrap();
        assert_eq!(
            one::<String>(
                "SELECT string_agg(version::text, ',' ORDER BY version) FROM email.template_versions WHERE name = 'u'"
            ),
            "1,2,3,4"
        );
    }

    #[pg_test]
    fn send_is_reentrant_from_a_trigger_on_messages() {
        setup();
        Spi::run(
            "CREATE FUNCTION audit_copy() RETURNS trigger LANGUAGE plpgsql AS $$ \
             BEGIN \
               IF NEW.subject NOT LIKE 'copy:%' THEN \
                 PERFORM email.send(recipients => 'audit@x.org', subject => 'copy: ' || NEW.subject, \
                                    body => 'audit', sender => 'me@x.org'); \
               END IF; \
               RETURN NULL; \
             END $$",
        )
        .unwrap();
        Spi::run("CREATE TRIGGER audit_copy AFTER INSERT ON email.messages FOR EACH ROW EXECUTE FUNCTION audit_copy()")
            .unwrap();
        let id: i64 =
            one("SELECT email.send(recipients => 'a@x.org', subject => 'Hi', body => 'Hello', sender => 'me@x.org')");
        assert_eq!(of::<String>("SELECT subject FROM email.messages WHERE id = $1", id), "Hi");
        assert_eq!(one::<i64>("SELECT count(*) FROM email.messages WHERE subject = 'copy: Hi'"), 1);
        // Again, now that every plan is prepared and cached.
        one::<i64>(
            "SELECT email.send(recipients => 'b@x.org', subject => 'Ho', body => 'Hello', sender => 'me@x.org')",
        );
        assert_eq!(one::<i64>("SELECT count(*) FROM email.messages"), 4);
    }

    #[pg_test]
    fn finished_is_defined_once_and_the_purge_index_uses_it() {
        assert!(one::<bool>("SELECT email._is_finished('sent') AND NOT email._is_finished('queued') AND NOT email._is_finished('sending')"));
        Spi::run("SET LOCAL enable_seqscan = off").unwrap();
        let plan = Spi::explain(
            "SELECT id FROM email.messages WHERE email._is_finished(status) AND created_at < now() - interval '1 day'",
        )
        .unwrap()
        .0
        .to_string();
        assert!(plan.contains("messages_finished"), "{plan}");
    }

    #[pg_test]
    fn a_fallback_must_exist_and_is_cleared_when_it_goes() {
        Spi::run("SELECT email.add_transport('b', 'capture://')").unwrap();
        Spi::run("SELECT email.add_transport('a', 'capture://', fallback => 'b')").unwrap();
        Spi::run("DELETE FROM email.transports WHERE name = 'b'").unwrap();
        assert_eq!(Spi::get_one::<String>("SELECT fallback FROM email.transports WHERE name = 'a'").unwrap(), None);
    }
}
