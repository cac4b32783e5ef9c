//! One module per provider API, as `../shared/PROVIDERS.md` documents each send call: each
//! builds its request from plain message fields and reads its own answers. No pgrx, no I/O here:
//! `deliver::http` sends.

use base64::Engine;
use reqwest::header::HeaderMap;
use serde_json::Value;

use super::dsn::Kind;
use super::http::{classify, Config, Fields, Request};
use super::{Delivery, Outgoing, Reply};

mod mailgun;
mod postmark;
mod resend;
mod sendgrid;
mod ses;

pub fn request(c: &Config, m: &Outgoing, f: &Fields) -> Result<Request, String> {
    match c.kind {
        Kind::SendGrid => sendgrid::request(c, f),
        Kind::Postmark => postmark::request(c, f),
        Kind::Resend => resend::request(c, f),
        Kind::Mailgun => mailgun::request(c, f),
        Kind::Ses => ses::request(c, m, f),
        other => Err(format!("{} is not an HTTP provider", other.name())),
    }
}

/// Reads a provider's answer. Recipient-level refusals of only some recipients become a
/// transient outcome for the others (they are retried without the refused ones).
pub fn answer(c: &Config, status: u16, headers: &HeaderMap, body: &[u8], f: &Fields) -> Delivery {
    let json: Value = serde_json::from_slice(body).unwrap_or(Value::Null);
    let d = match c.kind {
        Kind::SendGrid => sendgrid::answer(status, headers, &json, f),
        Kind::Postmark => postmark::answer(status, headers, &json, f),
        Kind::Resend => resend::answer(status, headers, &json, f),
        Kind::Mailgun => mailgun::answer(status, headers, &json, body, f),
        Kind::Ses => ses::answer(status, headers, &json, f),
        _ => classify(status, headers, None, String::from_utf8_lossy(body).into_owned(), Vec::new()),
    };
    match d {
        Delivery::Permanent { reply, rejected } if !rejected.is_empty() && rejected.len() < f.all_recipients().count() => {
            Delivery::Transient { reply, retry_after: None, rejected }
        }
        other => other,
    }
}

/// A success answer.
pub(crate) fn accepted(status: u16, provider_id: Option<String>, text: &str) -> Delivery {
    Delivery::Accepted {
        reply: Reply { code: Some(status), enhanced: None, text: text.to_string() },
        provider_id,
        rejected: Vec::new(),
        deferred: Vec::new(),
        captured: None,
    }
}

pub(crate) fn b64(bytes: &[u8]) -> String {
    base64::engine::general_purpose::STANDARD.encode(bytes)
}

/// Letters, digits, `_` and `-` only (Resend tags, SES tags).
pub(crate) fn tag_safe(s: &str) -> String {
    let t: String = s.chars().map(|c| if c.is_ascii_alphanumeric() || c == '_' || c == '-' { c } else { '_' }).take(256).collect();
    if t.is_empty() { "_".into() } else { t }
}

pub(crate) fn json_body(v: &Value) -> Result<Vec<u8>, String> {
    serde_json::to_vec(v).map_err(|e| format!("cannot encode the request: {e}"))
}
