//! Mailgun: `POST /v3/{domain}/messages` with HTTP Basic `api:KEY`, as multipart/form-data.
//! DSN: `mailgun+api://KEY:DOMAIN@default`, with `region=eu` for the EU endpoint. The domain is
//! not a secret: `email.transports` shows it.

use base64::Engine;

use super::super::{Delivery, Outgoing};
use super::common::{accepted, classify, named_in, refused};
use super::{Answer, Body, Config, Fields, FormValue, Options, Provider, Request, SecretIn, Userinfo, ID_KEY};

pub struct Mailgun;

impl Provider for Mailgun {
    fn name(&self) -> &'static str {
        "mailgun"
    }

    fn schemes(&self) -> &'static [&'static str] {
        &["mailgun+api", "mailgun"]
    }

    fn options(&self) -> &'static [&'static str] {
        &["region", "webhook_signing_key"]
    }

    fn secret_options(&self) -> &'static [&'static str] {
        &["webhook_signing_key"]
    }

    fn secret_in(&self) -> SecretIn {
        SecretIn::User
    }

    fn check_dsn(&self, u: Userinfo<'_>, options: &mut Options) -> Result<(), String> {
        if u.user.is_none() || u.password.unwrap_or("").is_empty() {
            return Err(
                "a mailgun DSN needs the API key and the sending domain, as in mailgun+api://KEY:DOMAIN@default".into(),
            );
        }
        match options.get("region").map(String::as_str) {
            None | Some("us" | "eu") => {}
            Some(r) => return Err(format!("option region=\"{r}\" must be us or eu")),
        }
        // The webhook signing key.
        crate::webhook::Config::from_options(self.name(), options).map(|_| ())
    }

    fn default_host(&self, options: &Options) -> String {
        match options.get("region").map(String::as_str) {
            Some("eu") => "api.eu.mailgun.net".into(),
            _ => "api.mailgun.net".into(),
        }
    }

    fn request(&self, c: &Config, m: &Outgoing, f: &Fields) -> Result<Request, String> {
        request(c, m.id, f)
    }

    fn answer(&self, a: &Answer<'_>, f: &Fields) -> Delivery {
        answer(a, f)
    }
}

/// The request for message `id`.
fn request(c: &Config, id: i64, f: &Fields) -> Result<Request, String> {
    let from = f.from.as_ref().ok_or("no sender")?;
    let domain = c.secret.clone().unwrap_or_default();
    let mut form: Vec<(String, FormValue)> = Vec::new();
    let mut text = |name: &str, value: String| form.push((name.to_string(), FormValue::Text(value)));
    text("from", from.to_string());
    text("subject", f.subject.clone());
    for m in &f.to {
        text("to", m.to_string());
    }
    for m in &f.cc {
        text("cc", m.to_string());
    }
    for m in &f.bcc {
        text("bcc", m.to_string());
    }
    if let Some(t) = &f.text {
        text("text", t.clone());
    }
    if let Some(h) = &f.html {
        text("html", h.clone());
    }
    if !f.reply_to.is_empty() {
        text("h:Reply-To", f.reply_to.iter().map(|m| m.to_string()).collect::<Vec<_>>().join(", "));
    }
    text("h:Message-Id", f.message_id.clone());
    for (k, v) in &f.headers {
        text(&format!("h:{k}"), v.clone());
    }
    for t in &f.tags {
        text("o:tag", t.clone());
    }
    // `v:` variables are JSON, echoed in Mailgun's events. Our message id (a JSON number) comes
    // last and wins over a user's `pg_email_id`.
    for (k, v) in f.metadata.iter().filter(|(k, _)| k.as_str() != ID_KEY) {
        text(&format!("v:{k}"), v.to_string());
    }
    text(&format!("v:{ID_KEY}"), id.to_string());
    for a in &f.attachments {
        // Mailgun refers to inline parts as cid:<file name>, so they are named by their content id.
        let (field, file_name) = match &a.content_id {
            Some(cid) => ("inline", cid.clone()),
            None => ("attachment", a.filename.clone()),
        };
        let file = FormValue::File { file_name, content_type: a.content_type.clone(), content: a.content.clone() };
        form.push((field.to_string(), file));
    }
    let auth = base64::engine::general_purpose::STANDARD.encode(format!("api:{}", c.key));
    Ok(Request {
        path: format!("/v3/{domain}/messages"),
        headers: vec![("Authorization".into(), format!("Basic {auth}"))],
        body: Body::Form(form),
    })
}

/// `200 {"id", "message"}`; errors are `{"message"}` or plain text, and a 400 "... is not a valid
/// address" may name refused recipients. Mailgun has no error codes.
fn answer(a: &Answer<'_>, f: &Fields) -> Delivery {
    let status = a.status;
    let message = a
        .json
        .get("message")
        .and_then(serde_json::Value::as_str)
        .map(str::to_string)
        .unwrap_or_else(|| String::from_utf8_lossy(a.body).trim().to_string());
    if status == 200 {
        let id = a.json.get("id").and_then(serde_json::Value::as_str).map(str::to_string);
        return accepted(status, id, &message);
    }
    let mut rejected = Vec::new();
    if status == 400 && message.contains("not a valid address") {
        for addr in named_in(f, &message) {
            rejected.push(refused(&addr, None, &format!("HTTP {status}: {message}")));
        }
    }
    classify(status, a.headers, None, message, rejected)
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::super::testing::{answer, config, error_reply, fields, header, outgoing, refusal, request};
    use super::*;

    fn text(name: &str, value: &str) -> (String, FormValue) {
        (name.into(), FormValue::Text(value.into()))
    }

    #[test]
    fn request_is_a_form_with_basic_auth_under_the_domain() {
        let r = request(&Mailgun, &config("key-1", Some("mg.example.org"), &[]));
        assert_eq!(r.path, "/v3/mg.example.org/messages");
        // base64("api:key-1")
        assert_eq!(header(&r, "Authorization"), Some("Basic YXBpOmtleS0x"));
        let file = |name: &str, file_name: &str, content_type: &str, content: &[u8]| {
            let v = FormValue::File {
                file_name: file_name.into(),
                content_type: content_type.into(),
                content: content.to_vec(),
            };
            (name.to_string(), v)
        };
        let expected = vec![
            text("from", "Shop <shop@example.org>"),
            text("subject", "Your order"),
            text("to", "Ann <ann@example.net>"),
            text("to", "bob@example.net"),
            text("cc", "carol@example.net"),
            text("text", "Thanks"),
            text("html", "<p>Thanks</p>"),
            text("h:Reply-To", "help@example.org"),
            text("h:Message-Id", "<m1@example.org>"),
            text("h:X-Order", "42"),
            text("o:tag", "welcome"),
            text("v:n", "7"),
            text("v:order", "\"42\""),
            text("v:pg_email_id", "1001"),
            file("attachment", "a.txt", "text/plain", b"hello"),
            file("inline", "logo", "image/png", &[1, 2, 3]),
        ];
        assert_eq!(r.body, Body::Form(expected));
    }

    #[test]
    fn our_message_id_goes_as_a_variable_and_wins() {
        let mut f = fields();
        f.metadata.insert("pg_email_id".into(), serde_json::json!("mine"));
        let r = Mailgun.request(&config("key-1", Some("mg.example.org"), &[]), &outgoing(), &f).unwrap();
        let Body::Form(form) = r.body else { panic!("not a form") };
        let vars: Vec<(String, FormValue)> = form.into_iter().filter(|(k, _)| k.starts_with("v:")).collect();
        assert_eq!(vars, [text("v:n", "7"), text("v:order", "\"42\""), text("v:pg_email_id", "1001")]);
    }

    #[test]
    fn success_carries_the_id() {
        let d = answer(&Mailgun, 200, &[], r#"{"id":"<2024.1@mg.example.org>","message":"Queued. Thank you."}"#);
        assert_eq!(d, accepted(200, Some("<2024.1@mg.example.org>".into()), "Queued. Thank you."));
    }

    #[test]
    fn rate_limits_and_server_errors_are_retried() {
        let d = answer(&Mailgun, 429, &[("retry-after", "5")], "Too many requests");
        let reply = error_reply(429, None, "HTTP 429: Too many requests");
        assert_eq!(d, Delivery::Transient { reply, retry_after: Some(Duration::from_secs(5)), rejected: vec![] });
        let d = answer(&Mailgun, 502, &[], r#"{"message":"Bad gateway"}"#);
        assert_eq!(
            d,
            Delivery::Transient {
                reply: error_reply(502, None, "HTTP 502: Bad gateway"),
                retry_after: None,
                rejected: vec![]
            }
        );
    }

    #[test]
    fn other_errors_are_permanent() {
        let d = answer(&Mailgun, 401, &[], "Forbidden\n");
        assert_eq!(d, Delivery::Permanent { reply: error_reply(401, None, "HTTP 401: Forbidden"), rejected: vec![] });
        let d = answer(&Mailgun, 404, &[], r#"{"message":"Domain not found: mg.example.org"}"#);
        let reply = error_reply(404, None, "HTTP 404: Domain not found: mg.example.org");
        assert_eq!(d, Delivery::Permanent { reply, rejected: vec![] });
    }

    #[test]
    fn invalid_addresses_are_refused() {
        let message = "to parameter 'bob@example.net' is not a valid address. please check documentation";
        let d = answer(&Mailgun, 400, &[], &serde_json::json!({ "message": message }).to_string());
        let text = format!("HTTP 400: {message}");
        let bob = refusal("bob@example.net", None, &text);
        // Only one of three refused: the others are retried.
        assert_eq!(
            d,
            Delivery::Transient { reply: error_reply(400, None, &text), retry_after: None, rejected: vec![bob] }
        );
    }
}
