//! SendGrid v3 mail send: `POST /v3/mail/send` with `Authorization: Bearer KEY`, one
//! personalization for all recipients. DSN: `sendgrid+api://KEY@default`, with `region=eu` for
//! the EU endpoint and `sandbox=true` for SendGrid's sandbox mode (validates, sends nothing).

use lettre::message::Mailbox;
use serde_json::{json, Map, Value};

use super::super::{Delivery, Outgoing};
use super::common::{accepted, b64, classify, json_body, one_key, or_body, refused};
use super::{Answer, Body, Config, Fields, Options, Provider, Request, SecretIn, Userinfo};

pub struct SendGrid;

impl Provider for SendGrid {
    fn name(&self) -> &'static str {
        "sendgrid"
    }

    fn schemes(&self) -> &'static [&'static str] {
        &["sendgrid+api", "sendgrid"]
    }

    fn options(&self) -> &'static [&'static str] {
        &["region", "sandbox", "webhook_key"]
    }

    fn secret_in(&self) -> SecretIn {
        SecretIn::User
    }

    fn check_dsn(&self, u: Userinfo<'_>, options: &mut Options) -> Result<(), String> {
        one_key(self.name(), u)?;
        match options.get("sandbox").map(String::as_str) {
            None | Some("true" | "false") => {}
            Some(v) => return Err(format!("option sandbox=\"{v}\" must be true or false")),
        }
        // The event webhook's public key (not a secret).
        crate::webhook::Config::from_options(self.name(), options).map(|_| ())
    }

    fn default_host(&self, options: &Options) -> String {
        match options.get("region").map(String::as_str) {
            Some("eu") => "api.eu.sendgrid.com".into(),
            _ => "api.sendgrid.com".into(),
        }
    }

    fn request(&self, c: &Config, m: &Outgoing, f: &Fields) -> Result<Request, String> {
        request(c, m.id, f)
    }

    fn answer(&self, a: &Answer<'_>, f: &Fields) -> Delivery {
        answer(a, f)
    }
}

/// `{"email", "name"}`, the name only when there is one.
fn addr(m: &Mailbox) -> Value {
    match &m.name {
        Some(n) if !n.is_empty() => json!({"email": m.email.to_string(), "name": n}),
        _ => json!({"email": m.email.to_string()}),
    }
}

/// The request for message `id`.
fn request(c: &Config, id: i64, f: &Fields) -> Result<Request, String> {
    let from = f.from.as_ref().ok_or("no sender")?;
    let mut p = Map::new();
    p.insert("to".into(), f.to.iter().map(addr).collect());
    if !f.cc.is_empty() {
        p.insert("cc".into(), f.cc.iter().map(addr).collect());
    }
    if !f.bcc.is_empty() {
        p.insert("bcc".into(), f.bcc.iter().map(addr).collect());
    }
    // text/plain must come first.
    let mut content = Vec::new();
    if let Some(t) = &f.text {
        content.push(json!({"type": "text/plain", "value": t}));
    }
    if let Some(h) = &f.html {
        content.push(json!({"type": "text/html", "value": h}));
    }
    let mut headers: Map<String, Value> = f.headers.iter().map(|(k, v)| (k.clone(), json!(v))).collect();
    headers.insert("Message-ID".into(), json!(f.message_id));
    let mut body = Map::new();
    body.insert("personalizations".into(), Value::Array(vec![Value::Object(p)]));
    body.insert("from".into(), addr(from));
    body.insert("subject".into(), json!(f.subject));
    body.insert("content".into(), content.into());
    body.insert("headers".into(), headers.into());
    if let Some(r) = f.reply_to.first() {
        body.insert("reply_to".into(), addr(r));
    }
    if !f.attachments.is_empty() {
        let list: Vec<Value> = f
            .attachments
            .iter()
            .map(|a| match &a.content_id {
                Some(cid) => json!({"content": b64(&a.content), "type": a.content_type, "filename": a.filename, "disposition": "inline", "content_id": cid}),
                None => json!({"content": b64(&a.content), "type": a.content_type, "filename": a.filename, "disposition": "attachment"}),
            })
            .collect();
        body.insert("attachments".into(), list.into());
    }
    if !f.tags.is_empty() {
        // SendGrid takes at most 10 categories.
        body.insert("categories".into(), f.tags.iter().take(10).cloned().collect());
    }
    // String values only; our message id always goes, and wins over a user's `pg_email_id`.
    let args: Map<String, Value> = f.metadata_with_id(id).into_iter().map(|(k, v)| (k, json!(v))).collect();
    body.insert("custom_args".into(), args.into());
    if c.options.get("sandbox").map(String::as_str) == Some("true") {
        body.insert("mail_settings".into(), json!({"sandbox_mode": {"enable": true}}));
    }
    Ok(Request {
        path: "/v3/mail/send".into(),
        headers: vec![("Authorization".into(), format!("Bearer {}", c.key))],
        body: Body::Json(json_body(&Value::Object(body))?),
    })
}

/// 202 (200 in sandbox mode) with the id in `X-Message-Id`; errors are
/// `{"errors":[{"message","field"}]}`, and a `field` such as `personalizations.0.to.3.email`
/// names a refused recipient (here the fourth `to`). SendGrid has no error codes.
fn answer(a: &Answer<'_>, f: &Fields) -> Delivery {
    let status = a.status;
    if status == 202 || status == 200 {
        let id = a.headers.get("x-message-id").and_then(|v| v.to_str().ok()).map(str::to_string);
        return accepted(status, id, if status == 200 { "accepted (sandbox)" } else { "accepted" });
    }
    let errors = a.json.get("errors").and_then(Value::as_array).cloned().unwrap_or_default();
    let message = errors.iter().filter_map(|e| e.get("message").and_then(Value::as_str)).collect::<Vec<_>>().join("; ");
    let message = or_body(message, &a.json);
    let mut rejected = Vec::new();
    for e in &errors {
        let field = e.get("field").and_then(Value::as_str).unwrap_or("");
        let parts: Vec<&str> = field.split('.').collect();
        if let ["personalizations", _, list, index, "email"] = parts.as_slice() {
            let list = match *list {
                "to" => &f.to,
                "cc" => &f.cc,
                "bcc" => &f.bcc,
                _ => continue,
            };
            if let Some(mb) = index.parse::<usize>().ok().and_then(|i| list.get(i)) {
                let text = e.get("message").and_then(Value::as_str).unwrap_or("invalid address");
                rejected.push(refused(mb.email.as_ref(), None, &format!("HTTP {status}: {text} ({field})")));
            }
        }
    }
    classify(status, a.headers, None, message, rejected)
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use serde_json::json;

    use super::super::testing::{answer, config, error_reply, fields, header, json_of, outgoing, refusal, request};
    use super::*;

    #[test]
    fn request_is_one_personalization_with_a_bearer_key() {
        let r = request(&SendGrid, &config("SG.key", None, &[]));
        assert_eq!(r.path, "/v3/mail/send");
        assert_eq!(header(&r, "Authorization"), Some("Bearer SG.key"));
        assert_eq!(
            json_of(&r),
            json!({
                "personalizations": [{
                    "to": [{"email": "ann@example.net", "name": "Ann"}, {"email": "bob@example.net"}],
                    "cc": [{"email": "carol@example.net"}],
                }],
                "from": {"email": "shop@example.org", "name": "Shop"},
                "reply_to": {"email": "help@example.org"},
                "subject": "Your order",
                "content": [{"type": "text/plain", "value": "Thanks"}, {"type": "text/html", "value": "<p>Thanks</p>"}],
                "headers": {"X-Order": "42", "Message-ID": "<m1@example.org>"},
                "attachments": [
                    {"content": "aGVsbG8=", "type": "text/plain", "filename": "a.txt", "disposition": "attachment"},
                    {"content": "AQID", "type": "image/png", "filename": "logo.png", "disposition": "inline", "content_id": "logo"},
                ],
                "categories": ["welcome"],
                "custom_args": {"order": "42", "n": "7", "pg_email_id": "1001"},
            })
        );
    }

    #[test]
    fn our_message_id_goes_in_custom_args_and_wins() {
        let c = config("SG.key", None, &[]);
        let mut f = fields();
        f.metadata.insert("pg_email_id".into(), json!("mine"));
        let r = SendGrid.request(&c, &outgoing(), &f).unwrap();
        assert_eq!(json_of(&r)["custom_args"], json!({"order": "42", "n": "7", "pg_email_id": "1001"}));
        f.metadata.clear();
        let r = SendGrid.request(&c, &outgoing(), &f).unwrap();
        assert_eq!(json_of(&r)["custom_args"], json!({"pg_email_id": "1001"}));
    }

    #[test]
    fn sandbox_option_sets_sandbox_mode() {
        let r = request(&SendGrid, &config("SG.key", None, &[("sandbox", "true")]));
        assert_eq!(json_of(&r)["mail_settings"], json!({"sandbox_mode": {"enable": true}}));
        let r = request(&SendGrid, &config("SG.key", None, &[("sandbox", "false")]));
        assert_eq!(json_of(&r).get("mail_settings"), None);
    }

    #[test]
    fn success_carries_the_message_id_header() {
        let d = answer(&SendGrid, 202, &[("x-message-id", "sg-123")], "");
        assert_eq!(d, accepted(202, Some("sg-123".into()), "accepted"));
        let d = answer(&SendGrid, 200, &[], "");
        assert_eq!(d, accepted(200, None, "accepted (sandbox)"));
    }

    #[test]
    fn rate_limits_and_server_errors_are_retried() {
        let body = r#"{"errors":[{"message":"too many requests"}]}"#;
        let d = answer(&SendGrid, 429, &[("retry-after", "7")], body);
        let reply = error_reply(429, None, "HTTP 429: too many requests");
        assert_eq!(d, Delivery::Transient { reply, retry_after: Some(Duration::from_secs(7)), rejected: vec![] });
        let d = answer(&SendGrid, 503, &[], r#"{"errors":[{"message":"unavailable"}]}"#);
        let reply = error_reply(503, None, "HTTP 503: unavailable");
        assert_eq!(d, Delivery::Transient { reply, retry_after: None, rejected: vec![] });
    }

    #[test]
    fn other_errors_are_permanent() {
        let body = r#"{"errors":[{"message":"The provided authorization grant is invalid","field":null}]}"#;
        let reply = error_reply(401, None, "HTTP 401: The provided authorization grant is invalid");
        assert_eq!(answer(&SendGrid, 401, &[], body), Delivery::Permanent { reply, rejected: vec![] });
    }

    #[test]
    fn a_refused_recipient_is_named_by_its_field() {
        let body =
            r#"{"errors":[{"message":"Does not contain a valid address.","field":"personalizations.0.to.1.email"}]}"#;
        let d = answer(&SendGrid, 400, &[], body);
        let reply = error_reply(400, None, "HTTP 400: Does not contain a valid address.");
        let bob = refusal(
            "bob@example.net",
            None,
            "HTTP 400: Does not contain a valid address. (personalizations.0.to.1.email)",
        );
        // Only one of three refused: the others are retried.
        assert_eq!(d, Delivery::Transient { reply: reply.clone(), retry_after: None, rejected: vec![bob.clone()] });

        let body = r#"{"errors":[
            {"message":"bad","field":"personalizations.0.to.0.email"},
            {"message":"bad","field":"personalizations.0.to.1.email"},
            {"message":"bad","field":"personalizations.0.cc.0.email"}]}"#;
        let Delivery::Permanent { reply, rejected } = answer(&SendGrid, 400, &[], body) else {
            panic!("not permanent")
        };
        assert_eq!(reply, error_reply(400, None, "HTTP 400: bad; bad; bad"));
        let who: Vec<&str> = rejected.iter().map(|(a, _)| a.as_str()).collect();
        assert_eq!(who, ["ann@example.net", "bob@example.net", "carol@example.net"]);
        assert!(rejected.iter().all(|(_, r)| r.enhanced.as_deref() == Some("5.1.1")));
    }
}
