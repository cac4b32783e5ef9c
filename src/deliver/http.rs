//! The HTTP client for provider APIs: reqwest (rustls) on the worker's tokio runtime, one client
//! per transport with connection reuse, the request timeout from the DSN, `@default` mapped to
//! the provider's public endpoint. It sends the request a provider module builds, hands the answer
//! back to that module to read, and classifies what no answer came back for: network errors and
//! timeouts are transient. Every reply is scrubbed of the DSN's secrets.

use reqwest::multipart::{Form, Part};
use tokio::sync::Semaphore;

use super::dsn::{self, Dsn};
use super::providers::{self, Body, Config, FormValue, Provider};
use super::{Delivery, Outgoing, Reply, TransportError};

pub struct Http {
    provider: &'static dyn Provider,
    config: Config,
    client: reqwest::Client,
    permits: Semaphore,
    secrets: Vec<String>,
}

impl Http {
    /// The provider's name (`email.transports.kind`).
    pub fn provider_name(&self) -> &'static str {
        self.provider.name()
    }

    pub fn new(provider: &'static dyn Provider, d: &Dsn) -> Result<Http, TransportError> {
        let host = match (&d.host, d.port) {
            (Some(h), Some(p)) => format!("{h}:{p}"),
            (Some(h), None) => h.clone(),
            (None, _) => provider.default_host(&d.options),
        };
        let client = reqwest::Client::builder()
            .timeout(d.timeout)
            .connect_timeout(d.timeout)
            .pool_max_idle_per_host(d.max_connections as usize)
            .user_agent(concat!("pg_email/", env!("CARGO_PKG_VERSION")))
            .build()
            .map_err(TransportError::HttpClient)?;
        Ok(Http {
            provider,
            config: Config {
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
            return Delivery::closed();
        };
        let Some(fields) = &m.fields else {
            return Delivery::permanent(Reply::new(None, "no message fields for an HTTP transport"));
        };
        let req = match self.provider.request(&self.config, m, fields) {
            Ok(r) => r,
            Err(e) => return Delivery::permanent(Reply::new(None, self.scrub(&e))),
        };
        let mut builder = self.client.post(format!("{}{}", self.config.base, req.path));
        for (k, v) in &req.headers {
            builder = builder.header(k, v);
        }
        builder = match req.body {
            Body::Json(bytes) => builder.header("Content-Type", "application/json").body(bytes),
            Body::Form(parts) => match form(parts) {
                Ok(form) => builder.multipart(form),
                Err(e) => return Delivery::permanent(Reply::new(None, self.scrub(&e))),
            },
        };
        let resp = match builder.send().await {
            Ok(r) => r,
            Err(e) => {
                let what = if e.is_timeout() {
                    "timed out"
                } else if e.is_connect() {
                    "cannot connect"
                } else {
                    "request failed"
                };
                return Delivery::transient(Reply::new(None, self.scrub(&format!("{what}: {}", error_chain(&e)))));
            }
        };
        let status = resp.status().as_u16();
        let headers = resp.headers().clone();
        let body = match resp.bytes().await {
            Ok(b) => b.to_vec(),
            Err(e) => {
                let text = self.scrub(&format!("reading the answer failed: {}", error_chain(&e)));
                return Delivery::transient(Reply::new(Some(status), text));
            }
        };
        let mut d = providers::answer(self.provider, status, &headers, &body, fields);
        scrub_delivery(&mut d, |t| self.scrub(t));
        d
    }
}

/// A provider's form as reqwest's multipart body.
fn form(parts: Vec<(String, FormValue)>) -> Result<Form, String> {
    let mut form = Form::new();
    for (name, value) in parts {
        form = match value {
            FormValue::Text(text) => form.text(name, text),
            FormValue::File { file_name, content_type, content } => {
                let part = Part::bytes(content)
                    .file_name(file_name.clone())
                    .mime_str(&content_type)
                    .map_err(|e| format!("attachment {file_name}: {e}"))?;
                form.part(name, part)
            }
        };
    }
    Ok(form)
}

/// Applies `f` to the text of every reply in `d`: the message's and each recipient's.
fn scrub_delivery(d: &mut Delivery, f: impl Fn(&str) -> String) {
    let (reply, rejected, deferred) = match d {
        Delivery::Accepted { reply, rejected, deferred, .. } => (reply, rejected, Some(deferred)),
        Delivery::Transient { reply, rejected, .. } | Delivery::Permanent { reply, rejected } => {
            (reply, rejected, None)
        }
    };
    reply.text = f(&reply.text);
    for (_, r) in rejected.iter_mut().chain(deferred.into_iter().flatten()) {
        r.text = f(&r.text);
    }
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
