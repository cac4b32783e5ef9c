//! One module per provider HTTP API, each holding everything pg_email knows about that provider:
//! the DSN schemes and options it takes, which part of its DSN is the secret, its public
//! endpoint, the send request it builds from plain message fields and how it reads the answers.
//! Each implements [`Provider`] and is listed once in [`ALL`]: adding a provider means adding a
//! module and a line there. Requests follow each provider's published send call (SendGrid v3
//! mail send, Postmark `/email`, Resend `/emails`, Mailgun `/v3/{domain}/messages`, SES v2
//! `SendEmail`). No pgrx and no I/O here: `deliver::http` sends a [`Request`] and hands the
//! [`Answer`] back; `deliver::dsn` asks the provider about its part of a DSN.

use std::collections::BTreeMap;

use lettre::message::Mailbox;
use reqwest::header::HeaderMap;
use serde_json::Value;

use super::{Delivery, Outgoing};
use crate::message::{self, Attachment, FieldError, Stored};

mod common;
mod mailgun;
mod postmark;
mod resend;
mod sendgrid;
mod ses;
#[cfg(test)]
mod testing;

/// Every provider. The DSN error for an unknown scheme lists their first schemes in this order.
pub static ALL: &[&dyn Provider] =
    &[&sendgrid::SendGrid, &postmark::Postmark, &resend::Resend, &mailgun::Mailgun, &ses::Ses];

/// The provider a DSN scheme selects.
pub fn by_scheme(scheme: &str) -> Option<&'static dyn Provider> {
    ALL.iter().copied().find(|p| p.schemes().contains(&scheme))
}

/// DSN options, by name.
pub type Options = BTreeMap<String, String>;

/// The key our message id (`email.messages.id`) is sent under as custom data: SendGrid
/// `custom_args`, Postmark `Metadata`, Mailgun `v:` variables, Resend and SES tags. Providers echo
/// it in their webhook events, which are matched back to the message by it first.
///
/// Ours wins: a user's own metadata entry (or, for Resend and SES, tag) under this key is left out
/// of the request, since the user's value would match the provider's events to another message or
/// to none.
pub const ID_KEY: &str = "pg_email_id";

/// Which part of `scheme://USER:SECRET@host` holds the provider's secret. That part is shown as
/// `***` in `email.transports` and scrubbed from every reply; the other part is shown as it is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SecretIn {
    /// The user part is the API key (`KEY@default`, or Mailgun's `KEY:DOMAIN@default`).
    User,
    /// The secret part is the secret (SES's `ACCESS_KEY_ID:SECRET_KEY@default`).
    Password,
}

/// The user and secret parts of a provider DSN, percent-decoded.
#[derive(Debug, Clone, Copy)]
pub struct Userinfo<'a> {
    /// The scheme as written (`sendgrid+api` or `sendgrid`), for error messages.
    pub scheme: &'a str,
    pub user: Option<&'a str>,
    pub password: Option<&'a str>,
}

/// Everything about one provider. Implementations are unit structs listed in [`ALL`].
pub trait Provider: Sync {
    /// The transport kind stored in `email.transports.kind` and named in messages.
    fn name(&self) -> &'static str;
    /// The DSN schemes that select this provider, the documented `NAME+api` form first.
    fn schemes(&self) -> &'static [&'static str];
    /// The DSN options this provider takes besides the common ones (`timeout`, `max_connections`,
    /// `rate`, `from`) and `scheme`.
    fn options(&self) -> &'static [&'static str];
    /// Which part of the DSN is the secret.
    fn secret_in(&self) -> SecretIn;
    /// Options whose values are secrets too: masked and scrubbed like the secret part.
    fn secret_options(&self) -> &'static [&'static str] {
        &[]
    }
    /// Checks the user and secret parts and this provider's options, and may fill in a default
    /// option. The error is shown to the user as it is: it says what is wrong and never repeats
    /// a secret.
    fn check_dsn(&self, u: Userinfo<'_>, options: &mut Options) -> Result<(), String>;
    /// The public endpoint `@default` stands for, as `host`.
    fn default_host(&self, options: &Options) -> String;
    /// The send request for one message (`m` carries the MIME bytes and the message id, `f` the
    /// same message as fields). The request carries `m.id` as custom data under [`ID_KEY`]. An
    /// error is a permanent failure of this message.
    fn request(&self, c: &Config, m: &Outgoing, f: &Fields) -> Result<Request, String>;
    /// Reads the answer to a request. Use [`answer`], which also turns a refusal of only some
    /// recipients into a retry for the others.
    fn answer(&self, a: &Answer<'_>, f: &Fields) -> Delivery;
}

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
    pub metadata: serde_json::Map<String, Value>,
    pub message_id: String,
}

impl Fields {
    /// The fields of a stored (already rendered) message; a retry after a partial delivery
    /// (`pending`) names only the recipients still to deliver to.
    pub fn from_stored(
        m: &Stored,
        pending: Option<&[String]>,
        tags: Vec<String>,
        metadata: serde_json::Map<String, Value>,
    ) -> Result<Fields, FieldError> {
        let keep = |list: Vec<Mailbox>| -> Vec<Mailbox> {
            list.into_iter().filter(|mb| message::is_pending(pending, mb.email.as_ref())).collect()
        };
        Ok(Fields {
            from: Some(message::ascii_mailbox(message::parse_mailbox("sender", &m.sender)?)),
            to: keep(message::stored_list("recipients", &m.recipients)?),
            cc: keep(message::stored_list("cc", &m.cc)?),
            bcc: keep(message::stored_list("bcc", &m.bcc)?),
            reply_to: match &m.reply_to {
                Some(r) => message::parse_mailboxes("reply_to", r)?.into_iter().map(message::ascii_mailbox).collect(),
                None => Vec::new(),
            },
            subject: m.subject.clone(),
            text: m.body.clone(),
            html: m.html.clone(),
            headers: m.headers.clone(),
            attachments: m.attachments.clone(),
            tags,
            metadata,
            message_id: m.message_id.clone(),
        })
    }

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

    /// [`Fields::metadata_strings`] followed by our message id `id` under [`ID_KEY`]. A user's own
    /// entry under that key is left out: ours wins (see [`ID_KEY`]).
    pub fn metadata_with_id(&self, id: i64) -> Vec<(String, String)> {
        let mut out: Vec<(String, String)> = self.metadata_strings().into_iter().filter(|(k, _)| k != ID_KEY).collect();
        out.push((ID_KEY.to_string(), id.to_string()));
        out
    }
}

/// What a provider's request needs from its DSN.
#[derive(Debug, Clone)]
pub struct Config {
    /// The DSN's user part: the API key, or the SES access key id.
    pub key: String,
    /// The DSN's secret part: the Mailgun sending domain, or the SES secret key.
    pub secret: Option<String>,
    /// `scheme://host[:port]`, where requests go.
    pub base: String,
    /// The `Host` header requests carry (SES signs it).
    pub host_header: String,
    pub options: Options,
}

/// A request a provider wants sent: a POST to `path` under the transport's base URL.
#[derive(Debug)]
pub struct Request {
    pub path: String,
    pub headers: Vec<(String, String)>,
    pub body: Body,
}

#[derive(Debug, PartialEq)]
pub enum Body {
    /// `application/json`.
    Json(Vec<u8>),
    /// `multipart/form-data`: named parts, in order (a name may repeat).
    Form(Vec<(String, FormValue)>),
}

/// One part of a form.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FormValue {
    Text(String),
    File { file_name: String, content_type: String, content: Vec<u8> },
}

/// A provider's answer as the HTTP client received it.
#[derive(Debug)]
pub struct Answer<'a> {
    pub status: u16,
    pub headers: &'a HeaderMap,
    /// The body parsed as JSON; `Null` when it is not JSON.
    pub json: Value,
    pub body: &'a [u8],
}

/// Reads a provider's answer. A refusal of only some recipients becomes a transient outcome for
/// the others: they are retried without the refused ones.
pub fn answer(p: &dyn Provider, status: u16, headers: &HeaderMap, body: &[u8], f: &Fields) -> Delivery {
    let a = Answer { status, headers, json: serde_json::from_slice(body).unwrap_or(Value::Null), body };
    match p.answer(&a, f) {
        Delivery::Permanent { reply, rejected }
            if !rejected.is_empty() && rejected.len() < f.all_recipients().count() =>
        {
            Delivery::Transient { reply, retry_after: None, rejected }
        }
        other => other,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_scheme_selects_one_provider() {
        let names: Vec<&str> = ALL.iter().map(|p| p.name()).collect();
        assert_eq!(names, ["sendgrid", "postmark", "resend", "mailgun", "ses"]);
        for p in ALL {
            assert_eq!(p.schemes(), [format!("{}+api", p.name()), p.name().to_string()]);
            for s in p.schemes() {
                assert_eq!(by_scheme(s).map(|q| q.name()), Some(p.name()), "{s}");
            }
            assert!(!p.options().contains(&"scheme"), "{} lists a common option", p.name());
        }
        assert!(by_scheme("smtp").is_none());
    }

    #[test]
    fn default_hosts() {
        let o =
            |pairs: &[(&str, &str)]| -> Options { pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect() };
        let host = |scheme: &str, options: &Options| by_scheme(scheme).map(|p| p.default_host(options));
        assert_eq!(host("sendgrid", &o(&[])).as_deref(), Some("api.sendgrid.com"));
        assert_eq!(host("sendgrid", &o(&[("region", "eu")])).as_deref(), Some("api.eu.sendgrid.com"));
        assert_eq!(host("postmark", &o(&[])).as_deref(), Some("api.postmarkapp.com"));
        assert_eq!(host("resend", &o(&[])).as_deref(), Some("api.resend.com"));
        assert_eq!(host("mailgun", &o(&[("region", "us")])).as_deref(), Some("api.mailgun.net"));
        assert_eq!(host("mailgun", &o(&[("region", "eu")])).as_deref(), Some("api.eu.mailgun.net"));
        assert_eq!(host("ses", &o(&[])).as_deref(), Some("email.us-east-1.amazonaws.com"));
        assert_eq!(host("ses", &o(&[("region", "eu-west-1")])).as_deref(), Some("email.eu-west-1.amazonaws.com"));
    }
}
