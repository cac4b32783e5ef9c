//! Delivery, with no pgrx: DSN parsing, the transports and the classification of outcomes.
//! DSN validation runs in backends; sends run as tasks on the worker's I/O thread (its tokio
//! runtime's one worker thread), on plain values the worker's main thread copied out of the
//! database, so they go on while the main thread claims and records. Nothing here touches
//! Postgres.
//!
//! Dependencies point one way: `dsn` parses the common part of a DSN and asks the provider it
//! names (`providers`) for the rest; `providers` holds everything about each provider API and
//! builds plain requests; `http` sends them. `smtp`, `file` and the capture transport stand alone;
//! `outcome` turns what any of them reports into changes to the outbox.

use std::sync::Arc;
use std::time::{Duration, Instant};

use lettre::Address;

pub mod dsn;
pub mod file;
pub mod http;
pub mod outcome;
pub mod probe;
pub mod providers;
pub mod rate;
pub mod smtp;

/// One message ready to go: the envelope and the final bytes.
#[derive(Debug, Clone)]
pub struct Outgoing {
    pub id: i64,
    pub attempt: i32,
    pub from: Address,
    pub to: Vec<Address>,
    /// The MIME bytes; empty for the providers that take fields (all but SES).
    pub raw: Arc<Vec<u8>>,
    pub message_id: String,
    /// The message as fields, for HTTP providers (None for SMTP, file and capture).
    pub fields: Option<Arc<providers::Fields>>,
}

/// A reply about one message or one recipient.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reply {
    /// The SMTP reply code, or the HTTP status of a provider's answer.
    pub code: Option<u16>,
    /// The RFC 3463 enhanced status code (`5.1.1`), and nothing else: `5.1.x` adds a suppression.
    pub enhanced: Option<String>,
    /// A provider's own error code or name (Postmark `406`, Resend `validation_error`, SES
    /// `MessageRejected`); `None` for SMTP.
    pub provider_code: Option<String>,
    pub text: String,
}

impl Reply {
    /// A reply whose enhanced code, if any, starts its text (as SMTP servers write it).
    pub fn new(code: Option<u16>, text: impl Into<String>) -> Self {
        let text = text.into();
        let enhanced = enhanced_code(&text);
        Reply { code, enhanced, provider_code: None, text }
    }
}

/// What happened to one send.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Delivery {
    /// Accepted for at least one recipient. `rejected` were refused for good (5xx), `deferred`
    /// refused for now (4xx); `captured` holds the bytes kept by the capture transport.
    Accepted {
        reply: Reply,
        provider_id: Option<String>,
        rejected: Vec<(String, Reply)>,
        deferred: Vec<(String, Reply)>,
        captured: Option<Arc<Vec<u8>>>,
    },
    /// Try again later (4xx, network, timeout, 429/5xx): `rejected` recipients are refused for good.
    Transient { reply: Reply, retry_after: Option<Duration>, rejected: Vec<(String, Reply)> },
    /// Refused for good; `rejected` lists the recipients refused one by one.
    Permanent { reply: Reply, rejected: Vec<(String, Reply)> },
}

impl Delivery {
    /// A failure worth retrying, about the whole message.
    pub fn transient(reply: Reply) -> Delivery {
        Delivery::Transient { reply, retry_after: None, rejected: Vec::new() }
    }

    /// A failure for good, about the whole message.
    pub fn permanent(reply: Reply) -> Delivery {
        Delivery::Permanent { reply, rejected: Vec::new() }
    }

    /// The transport was shut down while the send waited for a connection.
    pub fn closed() -> Delivery {
        Delivery::transient(Reply::new(None, "transport closed"))
    }
}

/// The result of one send, with its timing.
#[derive(Debug, Clone)]
pub struct Outcome {
    pub id: i64,
    pub attempt: i32,
    pub transport: String,
    pub duration: Duration,
    pub delivery: Delivery,
}

pub use crate::reply::enhanced_code;

/// True when a refusal says the address itself is bad (RFC 3463 `5.1.x`), which earns a suppression.
pub fn is_bad_address(reply: &Reply) -> bool {
    reply.enhanced.as_deref().is_some_and(|e| e.starts_with("5.1."))
}

/// `base · 2^(attempt-1)`, capped at `max`, with ±20 % jitter.
pub fn backoff(attempt: i32, base: Duration, max: Duration) -> Duration {
    let exp = attempt.clamp(1, 30) as u32 - 1;
    let raw = base.saturating_mul(1u32 << exp.min(30)).min(max);
    let jitter = 0.8 + fastrand::f64() * 0.4;
    raw.mul_f64(jitter).min(max.mul_f64(1.2))
}

/// Why a transport cannot be built from its DSN. The texts are shown to operators (the worker's
/// log), so they name the setting at fault and never a secret.
#[derive(Debug, thiserror::Error)]
pub enum TransportError {
    /// The stored DSN no longer parses.
    #[error(transparent)]
    Dsn(#[from] dsn::DsnError),
    #[error("an SMTP DSN needs a host")]
    NoSmtpHost,
    #[error("cannot read ca={path}: {source}")]
    ReadCa { path: String, source: std::io::Error },
    #[error("ca={path} is not a PEM certificate: {source}")]
    BadCa { path: String, source: lettre::transport::smtp::Error },
    #[error("TLS set-up failed: {0}")]
    Tls(#[source] lettre::transport::smtp::Error),
    #[error("cannot build the HTTP client: {0}")]
    HttpClient(#[source] reqwest::Error),
    #[error("cannot write to the directory {path}: {source}")]
    Directory { path: String, source: std::io::Error },
}

/// A built transport, ready to send.
pub enum Transport {
    Smtp(smtp::Smtp),
    Http(http::Http),
    File(file::FileTransport),
    Capture,
}

impl Transport {
    /// Checks on this machine what a transport needs besides the network, without sending:
    /// it can be built (a `ca=` file is read and parsed, TLS and HTTP clients set up) and a
    /// `file://` directory exists and is writable. `email.add_transport` calls it in the caller's
    /// backend, which runs as the same operating-system user as the worker.
    pub fn check(d: &dsn::Dsn) -> Result<(), TransportError> {
        Transport::new(d)?;
        if let (dsn::Kind::File, Some(dir)) = (d.kind, &d.path) {
            file::probe(std::path::Path::new(dir))
                .map_err(|source| TransportError::Directory { path: dir.clone(), source })?;
        }
        Ok(())
    }

    /// True for provider HTTP APIs, which need the message as fields besides its MIME bytes.
    pub fn is_http(&self) -> bool {
        matches!(self, Transport::Http(_))
    }

    /// How the built MIME bytes travel: `Some(false)` as they are (SMTP, file, capture),
    /// `Some(true)` through SES, which rewrites Date and Message-ID; `None` not at all (the
    /// other providers build their own MIME from the fields, and sign it themselves).
    pub fn carries_mime(&self) -> Option<bool> {
        match self {
            Transport::Http(h) => (h.provider_name() == "ses").then_some(true),
            _ => Some(false),
        }
    }

    /// Builds the transport a DSN describes.
    pub fn new(d: &dsn::Dsn) -> Result<Transport, TransportError> {
        Ok(match d.kind {
            dsn::Kind::Smtp => Transport::Smtp(smtp::Smtp::new(d)?),
            dsn::Kind::Http(provider) => Transport::Http(http::Http::new(provider, d)?),
            dsn::Kind::File => Transport::File(file::FileTransport::new(d)),
            dsn::Kind::Capture => Transport::Capture,
        })
    }

    /// Sends one message; never panics, every failure is a classified `Delivery`.
    pub async fn send(&self, m: &Outgoing) -> Delivery {
        match self {
            Transport::Smtp(s) => s.send(m).await,
            Transport::Http(h) => h.send(m).await,
            Transport::File(f) => f.send(m).await,
            Transport::Capture => Delivery::Accepted {
                reply: Reply::new(None, "captured"),
                provider_id: None,
                rejected: Vec::new(),
                deferred: Vec::new(),
                captured: Some(m.raw.clone()),
            },
        }
    }
}

/// Reserves a send slot under a transport's rate cap; returns how long to wait. It runs on the
/// worker's I/O thread, so it touches only atomics.
pub type Pacer = Arc<dyn Fn() -> Duration + Send + Sync>;

/// Waits for the transport's rate cap, then sends and times the send.
pub async fn timed(name: String, t: Arc<Transport>, pacer: Option<Pacer>, m: Outgoing) -> Outcome {
    if let Some(p) = pacer {
        let wait = p();
        if !wait.is_zero() {
            tokio::time::sleep(wait).await;
        }
    }
    let start = Instant::now();
    let delivery = t.send(&m).await;
    Outcome { id: m.id, attempt: m.attempt, transport: name, duration: start.elapsed(), delivery }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bad_addresses() {
        assert!(is_bad_address(&Reply::new(Some(550), "5.1.1 unknown user")));
        assert!(!is_bad_address(&Reply::new(Some(550), "5.7.1 policy")));
    }

    #[test]
    fn backoff_doubles_with_jitter_and_cap() {
        let base = Duration::from_secs(10);
        let max = Duration::from_secs(100);
        for _ in 0..100 {
            let first = backoff(1, base, max).as_secs_f64();
            assert!((8.0..=12.0).contains(&first), "{first}");
            let third = backoff(3, base, max).as_secs_f64();
            assert!((32.0..=48.0).contains(&third), "{third}");
            let capped = backoff(20, base, max).as_secs_f64();
            assert!((80.0..=120.0).contains(&capped), "{capped}");
        }
    }
}
