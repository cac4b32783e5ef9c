//! Resend: `POST /emails` with `Authorization: Bearer KEY` and an `Idempotency-Key` derived
//! from the message, so that a retry after a lost answer is not sent twice. DSN:
//! `resend+api://KEY@default`.

use lettre::message::Mailbox;
use serde_json::{json, Map, Value};

use super::super::rate::fnv1a;
use super::super::{Delivery, Outgoing};
use super::common::{accepted, b64, classify, json_body, named_in, one_key, or_body, refused, tag_pairs};
use super::{Answer, Body, Config, Fields, Options, Provider, Request, SecretIn, Userinfo};

pub struct Resend;

impl Provider for Resend {
    fn name(&self) -> &'static str {
        "resend"
    }

    fn schemes(&self) -> &'static [&'static str] {
        &["resend+api", "resend"]
    }

    fn options(&self) -> &'static [&'static str] {
        &["webhook_secret"]
    }

    fn secret_options(&self) -> &'static [&'static str] {
        &["webhook_secret"]
    }

    fn secret_in(&self) -> SecretIn {
        SecretIn::User
    }

    fn check_dsn(&self, u: Userinfo<'_>, options: &mut Options) -> Result<(), String> {
        one_key(self.name(), u)?;
        // The webhook's `whsec_` signing secrets.
        crate::webhook::Config::from_options(self.name(), options).map(|_| ())
    }

    fn default_host(&self, _: &Options) -> String {
        "api.resend.com".into()
    }

    fn request(&self, c: &Config, m: &Outgoing, f: &Fields) -> Result<Request, String> {
        request(c, m.id, f)
    }

    fn answer(&self, a: &Answer<'_>, f: &Fields) -> Delivery {
        answer(a, f)
    }
}

/// The same message to the same recipients gets the same key; a retry for fewer recipients (after
/// some were refused) gets a new one.
fn idempotency_key(f: &Fields) -> String {
    let mut rcpts: Vec<String> = f.all_recipients().map(|m| m.email.to_string().to_lowercase()).collect();
    rcpts.sort();
    let h = fnv1a(rcpts.join(",").as_bytes());
    let id: String = f.message_id.trim_matches(|c| c == '<' || c == '>').chars().take(200).collect();
    format!("{id}-{h:016x}")
}

/// The request for message `id`.
fn request(c: &Config, id: i64, f: &Fields) -> Result<Request, String> {
    let from = f.from.as_ref().ok_or("no sender")?;
    let s = |v: &[Mailbox]| v.iter().map(|m| m.to_string()).collect::<Vec<_>>();
    let mut b = Map::new();
    b.insert("from".into(), json!(from.to_string()));
    b.insert("to".into(), json!(s(&f.to)));
    if !f.cc.is_empty() {
        b.insert("cc".into(), json!(s(&f.cc)));
    }
    if !f.bcc.is_empty() {
        b.insert("bcc".into(), json!(s(&f.bcc)));
    }
    if !f.reply_to.is_empty() {
        b.insert("reply_to".into(), json!(s(&f.reply_to)));
    }
    b.insert("subject".into(), json!(f.subject));
    if let Some(h) = &f.html {
        b.insert("html".into(), json!(h));
    }
    if let Some(t) = &f.text {
        b.insert("text".into(), json!(t));
    }
    let mut headers: Map<String, Value> = f.headers.iter().map(|(k, v)| (k.clone(), json!(v))).collect();
    headers.insert("Message-ID".into(), json!(f.message_id));
    b.insert("headers".into(), headers.into());
    if !f.attachments.is_empty() {
        let atts: Vec<Value> = f
            .attachments
            .iter()
            .map(|a| {
                let mut o = json!({"content": b64(&a.content), "filename": a.filename, "content_type": a.content_type});
                if let (Some(cid), Some(m)) = (&a.content_id, o.as_object_mut()) {
                    m.insert("content_id".into(), json!(cid));
                }
                o
            })
            .collect();
        b.insert("attachments".into(), atts.into());
    }
    // Tags and metadata, then our message id, which wins over a user's `pg_email_id`.
    let tags: Vec<Value> = tag_pairs(f, id).into_iter().map(|(n, v)| json!({"name": n, "value": v})).collect();
    b.insert("tags".into(), tags.into());
    Ok(Request {
        path: "/emails".into(),
        headers: vec![
            ("Authorization".into(), format!("Bearer {}", c.key)),
            ("Idempotency-Key".into(), idempotency_key(f)),
        ],
        body: Body::Json(json_body(&Value::Object(b))?),
    })
}

/// `200 {"id"}`; errors are `{"statusCode", "name", "message"}`, and a 422 `validation_error`
/// may name refused recipients in its message.
fn answer(a: &Answer<'_>, f: &Fields) -> Delivery {
    let status = a.status;
    if status == 200 {
        let id = a.json.get("id").and_then(Value::as_str).map(str::to_string);
        return accepted(status, id, "accepted");
    }
    let name = a.json.get("name").and_then(Value::as_str).map(str::to_string);
    let message = a.json.get("message").and_then(Value::as_str).unwrap_or("").to_string();
    let mut rejected = Vec::new();
    if status == 422 && name.as_deref() == Some("validation_error") {
        for addr in named_in(f, &message) {
            rejected.push(refused(&addr, name.as_deref(), &format!("HTTP {status}: {message}")));
        }
    }
    if status == 409 && name.as_deref() == Some("concurrent_idempotent_requests") {
        // The same key is still being processed: try again shortly.
        return classify(503, a.headers, name, message, rejected);
    }
    classify(status, a.headers, name, or_body(message, &a.json), rejected)
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use serde_json::json;

    use super::super::testing::{answer, config, error_reply, fields, header, json_of, outgoing, refusal, request};
    use super::*;

    #[test]
    fn request_carries_a_bearer_key_and_an_idempotency_key() {
        let r = request(&Resend, &config("re_key", None, &[]));
        assert_eq!(r.path, "/emails");
        assert_eq!(header(&r, "Authorization"), Some("Bearer re_key"));
        let h = fnv1a(b"ann@example.net,bob@example.net,carol@example.net");
        assert_eq!(header(&r, "Idempotency-Key"), Some(format!("m1@example.org-{h:016x}").as_str()));
        assert_eq!(
            json_of(&r),
            json!({
                "from": "Shop <shop@example.org>",
                "to": ["Ann <ann@example.net>", "bob@example.net"],
                "cc": ["carol@example.net"],
                "reply_to": ["help@example.org"],
                "subject": "Your order",
                "html": "<p>Thanks</p>",
                "text": "Thanks",
                "headers": {"X-Order": "42", "Message-ID": "<m1@example.org>"},
                "attachments": [
                    {"content": "aGVsbG8=", "filename": "a.txt", "content_type": "text/plain"},
                    {"content": "AQID", "filename": "logo.png", "content_type": "image/png", "content_id": "logo"},
                ],
                "tags": [
                    {"name": "welcome", "value": "true"},
                    {"name": "n", "value": "7"},
                    {"name": "order", "value": "42"},
                    {"name": "pg_email_id", "value": "1001"},
                ],
            })
        );
    }

    #[test]
    fn our_message_id_goes_in_tags_and_wins() {
        let c = config("re_key", None, &[]);
        let mut f = fields();
        f.tags.push("pg_email_id".into());
        f.metadata.insert("pg_email_id".into(), json!("mine"));
        let r = Resend.request(&c, &outgoing(), &f).unwrap();
        let tags = json!([
            {"name": "welcome", "value": "true"},
            {"name": "n", "value": "7"},
            {"name": "order", "value": "42"},
            {"name": "pg_email_id", "value": "1001"},
        ]);
        assert_eq!(json_of(&r)["tags"], tags);
        let f = Fields { tags: vec![], metadata: Map::new(), ..fields() };
        let r = Resend.request(&c, &outgoing(), &f).unwrap();
        assert_eq!(json_of(&r)["tags"], json!([{"name": "pg_email_id", "value": "1001"}]));
    }

    #[test]
    fn idempotency_key_changes_with_the_recipients_only() {
        let mut f = fields();
        let all = idempotency_key(&f);
        f.subject = "Another subject".into();
        f.to.reverse();
        assert_eq!(idempotency_key(&f), all);
        f.cc.clear();
        assert_ne!(idempotency_key(&f), all);
        assert!(idempotency_key(&f).starts_with("m1@example.org-"));
    }

    #[test]
    fn success_carries_the_id() {
        let d = answer(&Resend, 200, &[], r#"{"id":"49a3999c-0ce1-4ea6-ab68-afcd6dc2e794"}"#);
        assert_eq!(d, accepted(200, Some("49a3999c-0ce1-4ea6-ab68-afcd6dc2e794".into()), "accepted"));
    }

    #[test]
    fn rate_limits_and_busy_keys_are_retried() {
        let body = r#"{"statusCode":429,"name":"rate_limit_exceeded","message":"Too many requests"}"#;
        let d = answer(&Resend, 429, &[("retry-after", "1")], body);
        let reply = error_reply(429, Some("rate_limit_exceeded"), "HTTP 429: Too many requests");
        assert_eq!(d, Delivery::Transient { reply, retry_after: Some(Duration::from_secs(1)), rejected: vec![] });
        let body = r#"{"statusCode":409,"name":"concurrent_idempotent_requests","message":"Same key in progress"}"#;
        let d = answer(&Resend, 409, &[], body);
        let reply = error_reply(503, Some("concurrent_idempotent_requests"), "HTTP 503: Same key in progress");
        assert_eq!(d, Delivery::Transient { reply, retry_after: None, rejected: vec![] });
    }

    #[test]
    fn other_errors_are_permanent_with_the_error_name() {
        let body = r#"{"statusCode":403,"name":"invalid_api_key","message":"API key is invalid"}"#;
        let reply = error_reply(403, Some("invalid_api_key"), "HTTP 403: API key is invalid");
        assert_eq!(answer(&Resend, 403, &[], body), Delivery::Permanent { reply, rejected: vec![] });
    }

    #[test]
    fn validation_errors_naming_recipients_refuse_them() {
        let message = "Invalid `to` field. bob@example.net is not a valid email address.";
        let body = json!({"statusCode": 422, "name": "validation_error", "message": message}).to_string();
        let d = answer(&Resend, 422, &[], &body);
        let text = format!("HTTP 422: {message}");
        let bob = refusal("bob@example.net", Some("validation_error"), &text);
        let reply = error_reply(422, Some("validation_error"), &text);
        // Only one of three refused: the others are retried.
        assert_eq!(d, Delivery::Transient { reply, retry_after: None, rejected: vec![bob] });

        let message = "ann@example.net, bob@example.net and carol@example.net are not valid";
        let body = json!({"statusCode": 422, "name": "validation_error", "message": message}).to_string();
        let Delivery::Permanent { reply, rejected } = answer(&Resend, 422, &[], &body) else { panic!("not permanent") };
        assert_eq!((reply.enhanced, reply.provider_code.as_deref()), (None, Some("validation_error")));
        assert_eq!(rejected.len(), 3);
        assert!(rejected.iter().all(|(_, r)| r.enhanced.as_deref() == Some("5.1.1")));
    }
}
