//! Fixtures for the provider tests: one message as fields and as MIME bytes, a DSN config, and
//! answers as a provider would send them.

use std::sync::Arc;

use lettre::message::Mailbox;
use reqwest::header::HeaderMap;
use serde_json::{json, Value};

use super::super::{Delivery, Outgoing, Reply};
use super::{Body, Config, Fields, Provider, Request};
use crate::message::Attachment;

pub fn mailbox(s: &str) -> Mailbox {
    s.parse().unwrap()
}

/// Three recipients (two To, one Cc), a reply-to, text and HTML, a header, a file and an inline
/// image, one tag and two metadata values (a string and a number).
pub fn fields() -> Fields {
    let metadata = json!({"order": "42", "n": 7});
    Fields {
        from: Some(mailbox("Shop <shop@example.org>")),
        to: vec![mailbox("Ann <ann@example.net>"), mailbox("bob@example.net")],
        cc: vec![mailbox("carol@example.net")],
        bcc: vec![],
        reply_to: vec![mailbox("help@example.org")],
        subject: "Your order".into(),
        text: Some("Thanks".into()),
        html: Some("<p>Thanks</p>".into()),
        headers: vec![("X-Order".into(), "42".into())],
        attachments: vec![
            Attachment {
                filename: "a.txt".into(),
                content_type: "text/plain".into(),
                content_id: None,
                content: b"hello".to_vec(),
            },
            Attachment {
                filename: "logo.png".into(),
                content_type: "image/png".into(),
                content_id: Some("logo".into()),
                content: vec![1, 2, 3],
            },
        ],
        tags: vec!["welcome".into()],
        metadata: metadata.as_object().cloned().unwrap(),
        message_id: "<m1@example.org>".into(),
    }
}

/// The MIME bytes the SES request carries.
pub const RAW: &[u8] = b"From: shop@example.org\r\nSubject: Your order\r\n\r\nThanks\r\n";

/// Message id 1001 (`email.messages.id`), sent to providers as `pg_email_id`.
pub fn outgoing() -> Outgoing {
    Outgoing {
        id: 1001,
        attempt: 1,
        from: "shop@example.org".parse().unwrap(),
        to: vec!["ann@example.net".parse().unwrap()],
        raw: Arc::new(RAW.to_vec()),
        message_id: "<m1@example.org>".into(),
        fields: None,
    }
}

pub fn config(key: &str, secret: Option<&str>, options: &[(&str, &str)]) -> Config {
    Config {
        key: key.into(),
        secret: secret.map(str::to_string),
        base: "https://api.example.test".into(),
        host_header: "api.example.test".into(),
        options: options.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect(),
    }
}

/// The request `p` builds for [`fields`].
pub fn request(p: &dyn Provider, c: &Config) -> Request {
    p.request(c, &outgoing(), &fields()).unwrap()
}

pub fn json_of(r: &Request) -> Value {
    match &r.body {
        Body::Json(bytes) => serde_json::from_slice(bytes).unwrap(),
        Body::Form(_) => panic!("a form, not JSON"),
    }
}

/// A request header, by name in any case.
pub fn header<'a>(r: &'a Request, name: &str) -> Option<&'a str> {
    r.headers.iter().find(|(k, _)| k.eq_ignore_ascii_case(name)).map(|(_, v)| v.as_str())
}

/// `p`'s reading of an answer to a send of [`fields`].
pub fn answer(p: &dyn Provider, status: u16, headers: &[(&str, &str)], body: &str) -> Delivery {
    let mut h = HeaderMap::new();
    for (k, v) in headers {
        h.insert(reqwest::header::HeaderName::from_bytes(k.as_bytes()).unwrap(), v.parse().unwrap());
    }
    super::answer(p, status, &h, body.as_bytes(), &fields())
}

/// The whole-message reply of an error answer.
pub fn error_reply(status: u16, provider_code: Option<&str>, text: &str) -> Reply {
    Reply { code: Some(status), enhanced: None, provider_code: provider_code.map(str::to_string), text: text.into() }
}

/// A recipient-level refusal as the provider modules record it.
pub fn refusal(address: &str, provider_code: Option<&str>, text: &str) -> (String, Reply) {
    let reply = Reply {
        code: None,
        enhanced: Some("5.1.1".into()),
        provider_code: provider_code.map(str::to_string),
        text: text.into(),
    };
    (address.into(), reply)
}
