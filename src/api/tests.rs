//! `#[pg_test]`s for the SQL API. Each runs inside a transaction that is rolled back, so the
//! worker of the test cluster never sees their rows.

#[cfg(any(test, feature = "pg_test"))]
#[pgrx::pg_schema]
mod tests {
    use pgrx::prelude::*;

    fn setup() {
        Spi::run("SELECT email.add_transport('cap', 'capture://', is_default => true)").unwrap();
    }

    fn one<T: pgrx::IntoDatum + pgrx::FromDatum>(q: &str) -> T {
        Spi::get_one::<T>(q).unwrap().unwrap()
    }

    #[pg_test]
    fn send_returns_the_new_id_and_stores_a_queued_row() {
        setup();
        let id: i64 = one("SELECT email.send(recipients => 'a@x.org', subject => 'Hi', body => 'Hello', sender => 'me@x.org')");
        assert_eq!(one::<String>(&format!("SELECT status::text FROM email.messages WHERE id = {id}")), "queued");
        assert_eq!(one::<String>(&format!("SELECT transport FROM email.messages WHERE id = {id}")), "cap");
        assert!(one::<String>(&format!("SELECT message_id FROM email.messages WHERE id = {id}")).ends_with("@x.org>"));
    }

    #[pg_test]
    fn idempotency_key_returns_the_same_id() {
        setup();
        let a: i64 = one("SELECT email.send(recipients => 'a@x.org', subject => 's', body => 'b', sender => 'me@x.org', idempotency_key => 'k')");
        let b: i64 = one("SELECT email.send(recipients => 'b@x.org', subject => 't', body => 'c', sender => 'me@x.org', idempotency_key => 'k')");
        assert_eq!(a, b);
        assert_eq!(one::<i64>("SELECT count(*) FROM email.messages"), 1);
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
        assert_eq!(one::<String>("SELECT dsn FROM email.transports WHERE name = 's'"), "smtp://user:***@mail.x.org:587");
    }
}
