//! Provider HTTP APIs over reqwest (rustls), on the worker's tokio runtime: one client per
//! transport with connection reuse, the request timeout from the DSN, `@default` mapped to the
//! provider's public endpoint. Each provider module builds its request from plain message
//! fields and reads its own answers; this module sends and classifies what is common to all:
//! network errors, timeouts, 429 and 5xx (transient, `Retry-After` honoured), other 4xx
//! (permanent).

use std::time::Duration;

use lettre::message::Mailbox;
use reqwest::header::HeaderMap;
use tokio::sync::Semaphore;

use super::dsn::{self, Dsn, Kind};
use super::{providers, Delivery, Outgoing, Reply};
use crate::message::Attachment;

/// The message as fields, for providers that take JSON or forms instead of MIME.
#[derive(Debug, Clone, Default)]
pub struct Fields {
    pub from: Option<Mailbox>,
    pub to: Vec<Mailbox>,
    pub cc: Vec<Mailbox>,
    pub bcc: Vec<Mailbox>,
    pub reply_to: Vec<Mailbox>,
    pub subject: String,
    pub text: Option<String>,
    pub html: Option<String>,
    pub headers: Vec<(String, String)>,
    pub attachments: Vec<Attachment>,
    pub tags: Vec<String>,
    pub metadata: serde_json::Map<String, serde_json::Value>,
    pub message_id: String,
}

impl Fields {
    pub fn all_recipients(&self) -> impl Iterator<Item = &Mailbox> {
        self.to.iter().chain(&self.cc).chain(&self.bcc)
    }

    /// Metadata values as strings (providers take string maps).
    pub fn metadata_strings(&self) -> Vec<(String, String)> {
        self.metadata
            .iter()
            .map(|(k, v)| (k.clone(), v.as_str().map(str::to_string).unwrap_or_else(|| v.to_string())))
            .collect()
    }
}

/// A request a provider module wants sent.
pub struct Request {
    pub path: String,
    pub headers: Vec<(String, String)>,
    pub body: Body,
}

pub enum Body {
    Json(Vec<u8>),
    Form(reqwest::multipart::Form),
}

/// What a provider needs from its DSN.
#[derive(Debug, Clone)]
pub struct Config {
    pub kind: Kind,
    pub key: String,
    pub secret: Option<String>,
    pub base: String,
    pub host_header: String,
    pub options: std::collections::BTreeMap<String, String>,
}

pub struct Http {
    config: Config,
    client: reqwest::Client,
    permits: Semaphore,
    secrets: Vec<String>,
}

fn default_host(d: &Dsn) -> String {
    let region = d.options.get("region").map(String::as_str);
    match d.kind {
        Kind::SendGrid if region == Some("eu") => "api.eu.sendgrid.com".into(),
        Kind::SendGrid => "api.sendgrid.com".into(),
        Kind::Postmark => "api.postmarkapp.com".into(),
        Kind::Resend => "api.resend.com".into(),
        Kind::Mailgun if region == Some("eu") => "api.eu.mailgun.net".into(),
        Kind::Mailgun => "api.mailgun.net".into(),
        Kind::Ses => format!("email.{}.amazonaws.com", region.unwrap_or("us-east-1")),
        _ => String::new(),
    }
}

impl Http {
    pub fn new(d: &Dsn) -> Result<Http, String> {
        let host = match (&d.host, d.port) {
            (Some(h), Some(p)) => format!("{h}:{p}"),
            (Some(h), None) => h.clone(),
            (None, _) => default_host(d),
        };
        let client = reqwest::Client::builder()
            .timeout(d.timeout)
            .connect_timeout(d.timeout)
            .pool_max_idle_per_host(d.max_connections as usize)
            .user_agent(concat!("pg_email/", env!("CARGO_PKG_VERSION")))
            .build()
            .map_err(|e| format!("cannot build the HTTP client: {e}"))?;
        Ok(Http {
            config: Config {
                kind: d.kind,
                key: d.user.clone().unwrap_or_default(),
                secret: d.password.clone(),
                base: format!("{}://{host}", d.http_scheme),
                host_header: host,
                options: d.options.clone(),
            },
            client,
            permits: Semaphore::new(d.max_connections as usize),
            secrets: d.secrets().iter().map(|s| s.to_string()).collect(),
        })
    }

    fn scrub(&self, text: &str) -> String {
        dsn::scrub(text, &self.secrets.iter().map(String::as_str).collect::<Vec<_>>())
    }

    pub async fn send(&self, m: &Outgoing) -> Delivery {
        let Ok(_permit) = self.permits.acquire().await else {
            return Delivery::Transient { reply: Reply::new(None, "transport closed"), retry_after: None, rejected: Vec::new() };
        };
        let Some(fields) = &m.fields else {
            return Delivery::Permanent { reply: Reply::new(None, "no message fields for an HTTP transport"), rejected: Vec::new() };
        };
        let req = match providers::request(&self.config, m, fields) {
            Ok(r) => r,
            Err(e) => return Delivery::Permanent { reply: Reply::new(None, self.scrub(&e)), rejected: Vec::new() },
        };
        let mut builder = self.client.post(format!("{}{}", self.config.base, req.path));
        for (k, v) in &req.headers {
            builder = builder.header(k, v);
        }
        builder = match req.body {
            Body::Json(bytes) => builder.header("Content-Type", "application/json").body(bytes),
            Body::Form(form) => builder.multipart(form),
        };
        let resp = match builder.send().await {
            Ok(r) => r,
            Err(e) => {
                let what = if e.is_timeout() { "timed out" } else if e.is_connect() { "cannot connect" } else { "request failed" };
                return Delivery::Transient {
                    reply: Reply::new(None, self.scrub(&format!("{what}: {}", error_chain(&e)))),
                    retry_after: None,
                    rejected: Vec::new(),
                };
            }
        };
        let status = resp.status().as_u16();
        let headers = resp.headers().clone();
        let body = match resp.bytes().await {
            Ok(b) => b.to_vec(),
            Err(e) => {
                return Delivery::Transient {
                    reply: Reply::new(Some(status), self.scrub(&format!("reading the answer failed: {}", error_chain(&e)))),
                    retry_after: None,
                    rejected: Vec::new(),
                }
            }
        };
        let mut d = providers::answer(&self.config, status, &headers, &body, fields);
        scrub_delivery(&mut d, |t| self.scrub(t));
        d
    }
}

fn scrub_delivery(d: &mut Delivery, f: impl Fn(&str) -> String) {
    let r = match d {
        Delivery::Accepted { reply, .. } | Delivery::Transient { reply, .. } | Delivery::Permanent { reply, .. } => reply,
    };
    r.text = f(&r.text);
}

fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(inner) = cur {
        s.push_str(": ");
        s.push_str(&inner.to_string());
        cur = inner.source();
    }
    s
}

/// `Retry-After` as seconds or an HTTP date.
pub fn retry_after(headers: &HeaderMap) -> Option<Duration> {
    let v = headers.get("retry-after")?.to_str().ok()?.trim();
    if let Ok(secs) = v.parse::<f64>() {
        return (secs.is_finite() && secs >= 0.0).then(|| Duration::from_secs_f64(secs.min(86_400.0)));
    }
    let when = httpdate_parse(v)?;
    Some(when.duration_since(std::time::SystemTime::now()).unwrap_or(Duration::ZERO))
}

fn httpdate_parse(v: &str) -> Option<std::time::SystemTime> {
    // IMF-fixdate: "Sun, 06 Nov 1994 08:49:37 GMT"
    let parts: Vec<&str> = v.split_whitespace().collect();
    if parts.len() != 6 || parts[5] != "GMT" {
        return None;
    }
    let day: u64 = parts[1].parse().ok()?;
    let month = ["Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec"].iter().position(|m| *m == parts[2])? as u64 + 1;
    let year: i64 = parts[3].parse().ok()?;
    let hms: Vec<u64> = parts[4].split(':').filter_map(|x| x.parse().ok()).collect();
    if hms.len() != 3 {
        return None;
    }
    // days from civil (Howard Hinnant's algorithm)
    let (y, m) = if month <= 2 { (year - 1, month + 9) } else { (year, month - 3) };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let doy = (153 * m as i64 + 2) / 5 + day as i64 - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146_097 + doe - 719_468;
    let secs = days * 86_400 + (hms[0] * 3600 + hms[1] * 60 + hms[2]) as i64;
    (secs >= 0).then(|| std::time::UNIX_EPOCH + Duration::from_secs(secs as u64))
}

/// Classifies an error answer common to every provider. `code` is the provider's own error code
/// or name, `message` its text; `rejected` are recipient-level refusals the provider named.
pub fn classify(status: u16, headers: &HeaderMap, code: Option<String>, message: String, rejected: Vec<(String, Reply)>) -> Delivery {
    let reply = Reply { code: Some(status), enhanced: code, text: format!("HTTP {status}: {message}") };
    match status {
        429 | 500 | 502 | 503 | 504 | 408 => Delivery::Transient { reply, retry_after: retry_after(headers), rejected },
        _ => Delivery::Permanent { reply, rejected },
    }
}

/// A recipient-level refusal: recorded with RFC 3463 `5.1.1` (bad destination address), which
/// adds a suppression, plus the provider's own words.
pub fn refused(address: &str, provider_text: &str) -> (String, Reply) {
    (address.to_lowercase(), Reply { code: None, enhanced: Some("5.1.1".into()), text: provider_text.to_string() })
}

/// The recipients of `fields` whose address appears in `text`.
pub fn named_in(fields: &Fields, text: &str) -> Vec<String> {
    let lower = text.to_lowercase();
    let mut out: Vec<String> = Vec::new();
    for mb in fields.all_recipients() {
        let a = mb.email.to_string().to_lowercase();
        if lower.contains(&a) && !out.contains(&a) {
            out.push(a);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retry_after_forms() {
        let mut h = HeaderMap::new();
        h.insert("retry-after", "2".parse().unwrap());
        assert_eq!(retry_after(&h), Some(Duration::from_secs(2)));
        h.insert("retry-after", "Sun, 06 Nov 1994 08:49:37 GMT".parse().unwrap());
        assert_eq!(retry_after(&h), Some(Duration::ZERO));
        assert_eq!(httpdate_parse("Sun, 06 Nov 1994 08:49:37 GMT"), Some(std::time::UNIX_EPOCH + Duration::from_secs(784111777)));
    }

    #[test]
    fn classification() {
        let h = HeaderMap::new();
        for s in [429, 500, 502, 503, 504] {
            assert!(matches!(classify(s, &h, None, "x".into(), vec![]), Delivery::Transient { .. }), "{s}");
        }
        for s in [400, 401, 403, 404, 413, 422] {
            assert!(matches!(classify(s, &h, None, "x".into(), vec![]), Delivery::Permanent { .. }), "{s}");
        }
    }
}
