//! Postmark: `POST /email` with `X-Postmark-Server-Token: TOKEN`, PascalCase JSON. DSN:
//! `postmark+api://TOKEN@default`, with `message_stream=` (default `outbound`).

use lettre::message::Mailbox;
use serde_json::{json, Map, Value};

use super::super::{Delivery, Outgoing};
use super::common::{accepted, b64, classify, json_body, named_in, one_key, or_body, refused};
use super::{Answer, Body, Config, Fields, Options, Provider, Request, SecretIn, Userinfo};

pub struct Postmark;

/// Postmark's ErrorCode for "inactive recipient": hard bounce, complaint or manual suppression.
const INACTIVE_RECIPIENT: i64 = 406;

impl Provider for Postmark {
    fn name(&self) -> &'static str {
        "postmark"
    }

    fn schemes(&self) -> &'static [&'static str] {
        &["postmark+api", "postmark"]
    }

    fn options(&self) -> &'static [&'static str] {
        &["message_stream", "webhook_user", "webhook_password"]
    }

    fn secret_options(&self) -> &'static [&'static str] {
        &["webhook_password"]
    }

    fn secret_in(&self) -> SecretIn {
        SecretIn::User
    }

    fn check_dsn(&self, u: Userinfo<'_>, options: &mut Options) -> Result<(), String> {
        one_key(self.name(), u)?;
        // The webhook's HTTP Basic credentials, both or neither.
        crate::webhook::Config::from_options(self.name(), options).map(|_| ())
    }

    fn default_host(&self, _: &Options) -> String {
        "api.postmarkapp.com".into()
    }

    fn request(&self, c: &Config, m: &Outgoing, f: &Fields) -> Result<Request, String> {
        request(c, m.id, f)
    }

    fn answer(&self, a: &Answer<'_>, f: &Fields) -> Delivery {
        answer(a, f)
    }
}

/// Mailboxes as one comma-separated header value.
fn list(v: &[Mailbox]) -> String {
    v.iter().map(|m| m.to_string()).collect::<Vec<_>>().join(", ")
}

/// The request for message `id`.
fn request(c: &Config, id: i64, f: &Fields) -> Result<Request, String> {
    let from = f.from.as_ref().ok_or("no sender")?;
    let mut b = Map::new();
    b.insert("From".into(), json!(from.to_string()));
    b.insert("To".into(), json!(list(&f.to)));
    if !f.cc.is_empty() {
        b.insert("Cc".into(), json!(list(&f.cc)));
    }
    if !f.bcc.is_empty() {
        b.insert("Bcc".into(), json!(list(&f.bcc)));
    }
    b.insert("Subject".into(), json!(f.subject));
    // Postmark takes one tag.
    if let Some(t) = f.tags.first() {
        b.insert("Tag".into(), json!(t));
    }
    if let Some(h) = &f.html {
        b.insert("HtmlBody".into(), json!(h));
    }
    if let Some(t) = &f.text {
        b.insert("TextBody".into(), json!(t));
    }
    if !f.reply_to.is_empty() {
        b.insert("ReplyTo".into(), json!(list(&f.reply_to)));
    }
    let mut headers: Vec<Value> = f.headers.iter().map(|(k, v)| json!({"Name": k, "Value": v})).collect();
    headers.push(json!({"Name": "Message-ID", "Value": f.message_id}));
    b.insert("Headers".into(), headers.into());
    if !f.attachments.is_empty() {
        let atts: Vec<Value> = f
            .attachments
            .iter()
            .map(|a| {
                let mut o = json!({"Name": a.filename, "Content": b64(&a.content), "ContentType": a.content_type});
                if let (Some(cid), Some(m)) = (&a.content_id, o.as_object_mut()) {
                    m.insert("ContentID".into(), json!(format!("cid:{cid}")));
                }
                o
            })
            .collect();
        b.insert("Attachments".into(), atts.into());
    }
    // String values only; our message id always goes, and wins over a user's `pg_email_id`.
    let metadata: Map<String, Value> = f.metadata_with_id(id).into_iter().map(|(k, v)| (k, json!(v))).collect();
    b.insert("Metadata".into(), metadata.into());
    let stream = c.options.get("message_stream").cloned().unwrap_or_else(|| "outbound".into());
    b.insert("MessageStream".into(), json!(stream));
    Ok(Request {
        path: "/email".into(),
        headers: vec![("X-Postmark-Server-Token".into(), c.key.clone()), ("Accept".into(), "application/json".into())],
        body: Body::Json(json_body(&Value::Object(b))?),
    })
}

/// `{"ErrorCode", "Message", "MessageID"}`: ErrorCode 0 is success; 406 names the inactive
/// recipients in its message ("Found inactive addresses: a@x.org, b@y.org. Inactive ...").
fn answer(a: &Answer<'_>, f: &Fields) -> Delivery {
    let status = a.status;
    let code = a.json.get("ErrorCode").and_then(Value::as_i64);
    let message = a.json.get("Message").and_then(Value::as_str).unwrap_or("").to_string();
    if status == 200 && code.unwrap_or(0) == 0 {
        let id = a.json.get("MessageID").and_then(Value::as_str).map(str::to_string);
        return accepted(status, id, if message.is_empty() { "OK" } else { &message });
    }
    // ErrorCode 0 means "no error": it is no code to record.
    let provider_code = code.filter(|c| *c != 0).map(|c| c.to_string());
    let mut rejected = Vec::new();
    if code == Some(INACTIVE_RECIPIENT) {
        let named = message.split("Found inactive addresses:").nth(1).unwrap_or(&message);
        for addr in named_in(f, named.split(". ").next().unwrap_or(named)) {
            let text = format!("HTTP {status}: Postmark ErrorCode 406: {message}");
            rejected.push(refused(&addr, provider_code.as_deref(), &text));
        }
    }
    classify(status, a.headers, provider_code, or_body(message, &a.json), rejected)
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use serde_json::json;

    use super::super::testing::{answer, config, error_reply, fields, header, json_of, outgoing, refusal, request};
    use super::*;

    #[test]
    fn request_is_pascal_case_json_with_the_server_token() {
        let r = request(&Postmark, &config("pm-token", None, &[]));
        assert_eq!(r.path, "/email");
        assert_eq!(header(&r, "X-Postmark-Server-Token"), Some("pm-token"));
        assert_eq!(header(&r, "Accept"), Some("application/json"));
        assert_eq!(
            json_of(&r),
            json!({
                "From": "Shop <shop@example.org>",
                "To": "Ann <ann@example.net>, bob@example.net",
                "Cc": "carol@example.net",
                "Subject": "Your order",
                "Tag": "welcome",
                "HtmlBody": "<p>Thanks</p>",
                "TextBody": "Thanks",
                "ReplyTo": "help@example.org",
                "Headers": [{"Name": "X-Order", "Value": "42"}, {"Name": "Message-ID", "Value": "<m1@example.org>"}],
                "Attachments": [
                    {"Name": "a.txt", "Content": "aGVsbG8=", "ContentType": "text/plain"},
                    {"Name": "logo.png", "Content": "AQID", "ContentType": "image/png", "ContentID": "cid:logo"},
                ],
                "Metadata": {"order": "42", "n": "7", "pg_email_id": "1001"},
                "MessageStream": "outbound",
            })
        );
        let r = request(&Postmark, &config("pm-token", None, &[("message_stream", "broadcast")]));
        assert_eq!(json_of(&r)["MessageStream"], "broadcast");
    }

    #[test]
    fn our_message_id_goes_in_metadata_and_wins() {
        let c = config("pm-token", None, &[]);
        let mut f = fields();
        f.metadata.insert("pg_email_id".into(), json!(5));
        let r = Postmark.request(&c, &outgoing(), &f).unwrap();
        assert_eq!(json_of(&r)["Metadata"], json!({"order": "42", "n": "7", "pg_email_id": "1001"}));
        f.metadata.clear();
        let r = Postmark.request(&c, &outgoing(), &f).unwrap();
        assert_eq!(json_of(&r)["Metadata"], json!({"pg_email_id": "1001"}));
    }

    #[test]
    fn success_carries_the_message_id() {
        let body = r#"{"To":"ann@example.net","SubmittedAt":"2024-01-01T00:00:00Z","MessageID":"pm-1","ErrorCode":0,"Message":"OK"}"#;
        assert_eq!(answer(&Postmark, 200, &[], body), accepted(200, Some("pm-1".into()), "OK"));
    }

    #[test]
    fn rate_limits_and_server_errors_are_retried() {
        let d = answer(&Postmark, 429, &[("retry-after", "3")], r#"{"ErrorCode":429,"Message":"Rate limit exceeded"}"#);
        let reply = error_reply(429, Some("429"), "HTTP 429: Rate limit exceeded");
        assert_eq!(d, Delivery::Transient { reply, retry_after: Some(Duration::from_secs(3)), rejected: vec![] });
        let d = answer(&Postmark, 500, &[], r#"{"ErrorCode":0,"Message":"Internal Server Error"}"#);
        let reply = error_reply(500, None, "HTTP 500: Internal Server Error");
        assert_eq!(d, Delivery::Transient { reply, retry_after: None, rejected: vec![] });
    }

    #[test]
    fn other_errors_are_permanent_with_the_error_code() {
        let d = answer(&Postmark, 422, &[], r#"{"ErrorCode":300,"Message":"Invalid email request"}"#);
        let reply = error_reply(422, Some("300"), "HTTP 422: Invalid email request");
        assert_eq!(d, Delivery::Permanent { reply, rejected: vec![] });
        let d = answer(&Postmark, 401, &[], r#"{"ErrorCode":10,"Message":"Bad or missing API token"}"#);
        let reply = error_reply(401, Some("10"), "HTTP 401: Bad or missing API token");
        assert_eq!(d, Delivery::Permanent { reply, rejected: vec![] });
    }

    #[test]
    fn inactive_recipients_are_refused() {
        let message = "Found inactive addresses: bob@example.net. Inactive recipients are ones that have generated a hard bounce.";
        let d = answer(&Postmark, 422, &[], &json!({"ErrorCode": 406, "Message": message}).to_string());
        let text = format!("HTTP 422: Postmark ErrorCode 406: {message}");
        let bob = refusal("bob@example.net", Some("406"), &text);
        let reply = error_reply(422, Some("406"), &format!("HTTP 422: {message}"));
        // Only one of three refused: the others are retried.
        assert_eq!(d, Delivery::Transient { reply, retry_after: None, rejected: vec![bob] });

        let message = "Found inactive addresses: ann@example.net, bob@example.net, carol@example.net. Inactive recipients are ...";
        let d = answer(&Postmark, 422, &[], &json!({"ErrorCode": 406, "Message": message}).to_string());
        let Delivery::Permanent { reply, rejected } = d else { panic!("not permanent: {d:?}") };
        assert_eq!((reply.enhanced, reply.provider_code.as_deref()), (None, Some("406")));
        let who: Vec<&str> = rejected.iter().map(|(a, _)| a.as_str()).collect();
        assert_eq!(who, ["ann@example.net", "bob@example.net", "carol@example.net"]);
        assert!(rejected.iter().all(|(_, r)| r.enhanced.as_deref() == Some("5.1.1")));
    }
}
