//! The HTTP send API's handler: the Resend, Postmark and SendGrid send routes (`crate::sendapi`
//! parses and answers in each provider's shape). No pgrx here: it runs in the listener's
//! runtime, checks the key (constant time, per-source limit on wrong keys), the key's rate and
//! the body, and hands the calls to the main thread, which stores them as the key's role; the
//! client is answered only after that transaction committed.

use std::cell::Cell;
use std::collections::HashMap;
use std::net::SocketAddr;
use std::rc::Rc;
use std::time::Instant;

use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::header::{HeaderName, HeaderValue, CACHE_CONTROL, CONTENT_TYPE};
use hyper::{Request, Response, StatusCode};

use super::http::{client_ip, now_secs, read_body, Answer, Job, State};
use crate::sendapi::{self, keys, Call, Refusal, Reply, Route};

/// Largest request body of a send route (a batch with attachments; providers take 30 to 50 MB).
pub const MAX_SEND_BODY: usize = 16 * 1024 * 1024;
/// Send requests whose bodies may be read at once; beyond it a request is answered 429 at once,
/// so that memory stays bounded (this many times MAX_SEND_BODY at worst).
pub const MAX_SEND_BODIES: usize = 32;

/// An API key as the listener keeps it (read from email.api_keys and email.api_key_hashes).
#[derive(Debug, Clone)]
pub struct ApiKey {
    pub name: String,
    pub role: String,
    /// SHA-256 of the key.
    pub hash: Vec<u8>,
    pub rate: Option<keys::Rate>,
}

/// The keys by their prefix (the first 12 characters), as the handlers look them up.
#[derive(Debug, Default)]
pub struct ApiKeys(HashMap<String, Vec<Rc<ApiKey>>>);

impl ApiKeys {
    pub fn new(list: Vec<(String, ApiKey)>) -> ApiKeys {
        let mut map: HashMap<String, Vec<Rc<ApiKey>>> = HashMap::new();
        for (prefix, key) in list {
            map.entry(prefix).or_default().push(Rc::new(key));
        }
        ApiKeys(map)
    }

    /// The key presented, if it is one of ours (compared in constant time).
    pub fn find(&self, presented: &str) -> Option<Rc<ApiKey>> {
        let prefix: String = presented.chars().take(12).collect();
        self.0.get(&prefix)?.iter().find(|k| keys::matches(&k.hash, presented)).cloned()
    }

    /// Whether the key named `name` with this hash still exists (it may have been revoked since
    /// the request was checked).
    pub fn still_valid(&self, name: &str, hash: &[u8]) -> bool {
        self.0.values().flatten().any(|k| k.name == name && k.hash == hash)
    }

    /// The key with this name.
    pub fn by_name(&self, name: &str) -> Option<Rc<ApiKey>> {
        self.0.values().flatten().find(|k| k.name == name).cloned()
    }

    pub fn names(&self) -> Vec<String> {
        self.0.values().flatten().map(|k| k.name.clone()).collect()
    }
}

/// What the main thread stores for one request.
#[derive(Debug)]
pub struct SendJob {
    pub key: String,
    pub hash: Vec<u8>,
    pub role: String,
    pub calls: Rc<[Call]>,
    pub dry_run: bool,
}

/// Why a request's calls were not stored: which call (its index) and the error it raised.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NotSent {
    pub index: usize,
    pub sqlstate: String,
    pub message: String,
}

/// The send API's share of the listener state.
#[derive(Default)]
pub struct SendState {
    pub limiter: std::cell::RefCell<keys::Limiter>,
    pub failed_auth: std::cell::RefCell<keys::FailedAuth>,
    /// Keys used since the last note in email.api_keys, with when (Unix seconds).
    pub used: std::cell::RefCell<HashMap<String, f64>>,
    bodies: Cell<usize>,
}

type Body = Full<Bytes>;

fn respond(r: Reply) -> Response<Body> {
    let mut out = Response::new(Full::new(Bytes::from(r.body)));
    *out.status_mut() = StatusCode::from_u16(r.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    out.headers_mut().insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    out.headers_mut().insert(CACHE_CONTROL, HeaderValue::from_static("no-store"));
    for (name, value) in r.headers {
        if let (Ok(n), Ok(v)) = (HeaderName::try_from(name), HeaderValue::from_str(&value)) {
            out.headers_mut().insert(n, v);
        }
    }
    out
}

/// Counts a body being read; dropped when it is done.
struct Reading<'a>(&'a Cell<usize>);

impl Drop for Reading<'_> {
    fn drop(&mut self) {
        self.0.set(self.0.get().saturating_sub(1));
    }
}

/// POST to one of the send routes.
pub async fn handle(state: &Rc<State>, peer: SocketAddr, route: Route, req: Request<Incoming>) -> Response<Body> {
    let provider = route.provider();
    let refuse = |r: Refusal| respond(sendapi::refuse(provider, &r));
    let now = Instant::now();
    let ip = client_ip(peer, req.headers());
    if let Err(wait) = state.send.failed_auth.borrow_mut().check(ip, now) {
        return refuse(Refusal::RateLimited { retry_after_secs: keys::retry_after_secs(wait), limit: None });
    }
    let headers: Vec<(String, String)> = req
        .headers()
        .iter()
        .map(|(k, v)| (k.as_str().to_ascii_lowercase(), String::from_utf8_lossy(v.as_bytes()).into_owned()))
        .collect();
    let Some(presented) = keys::presented_key(provider, &headers) else {
        return refuse(Refusal::MissingKey);
    };
    let found = state.config.borrow().api_keys.find(presented);
    let Some(key) = found else {
        state.send.failed_auth.borrow_mut().fail(ip, now);
        return refuse(Refusal::InvalidKey);
    };
    if let Some(rate) = &key.rate {
        if let Err(wait) = state.send.limiter.borrow_mut().take(&key.name, rate, now) {
            return refuse(Refusal::RateLimited {
                retry_after_secs: keys::retry_after_secs(wait),
                limit: Some(rate.count.into()),
            });
        }
    }
    state.send.used.borrow_mut().insert(key.name.clone(), now_secs());

    if state.send.bodies.get() >= MAX_SEND_BODIES {
        return refuse(Refusal::RateLimited { retry_after_secs: 1, limit: None });
    }
    state.send.bodies.set(state.send.bodies.get() + 1);
    let reading = Reading(&state.send.bodies);
    let (parts, body) = req.into_parts();
    let body = match read_body(body, &parts.headers, MAX_SEND_BODY).await {
        Ok(b) => b,
        Err(r) if r.status() == StatusCode::PAYLOAD_TOO_LARGE => return refuse(Refusal::TooLarge),
        Err(r) => return r,
    };
    drop(reading);
    let parsed = match sendapi::parse(route, &headers, &body) {
        Ok(p) => p,
        Err(r) => return refuse(r),
    };
    drop(body);
    let dry_run = parsed.dry_run;
    let calls: Rc<[Call]> = parsed.calls.into();
    let job = SendJob {
        key: key.name.clone(),
        hash: key.hash.clone(),
        role: key.role.clone(),
        calls: calls.clone(),
        dry_run,
    };
    match state.ask(Job::Send(Box::new(job))).await {
        Answer::Sent(_) if dry_run => respond(sendapi::validated(route, &calls, &crate::datetime::rfc3339(now_secs()))),
        Answer::Sent(ids) => respond(sendapi::accepted(route, &calls, &ids, &crate::datetime::rfc3339(now_secs()))),
        Answer::NotSent(n) if n.sqlstate == super::send::ROLE_UNUSABLE => refuse(Refusal::Forbidden),
        Answer::NotSent(n) if n.sqlstate == KEY_REVOKED => refuse(Refusal::InvalidKey),
        Answer::NotSent(n) => {
            let why = sendapi::from_sql_error(route, &n.sqlstate, &n.message);
            respond(sendapi::batch_refused(route, n.index, calls.len(), &why))
        }
        _ => refuse(Refusal::Unavailable),
    }
}

/// The SQLSTATE the main thread answers for a key revoked after its request was checked.
pub const KEY_REVOKED: &str = "28P01";

/// A message received by SMTP submission, prepared (`crate::submission`) and ready to store.
#[derive(Debug)]
pub struct SubmitJob {
    pub key: String,
    pub hash: Vec<u8>,
    pub role: String,
    /// MAIL FROM.
    pub sender: String,
    /// The RCPT addresses.
    pub recipients: Vec<String>,
    pub prepared: crate::submission::Prepared,
}

/// The identity a session's AUTH gives (`smtp::Login::Ok`): the key's name and the hex SHA-256
/// of the key presented, so that a key revoked (or made again under its name) since is refused.
fn identity(key: &ApiKey) -> String {
    let hex: String = key.hash.iter().map(|b| format!("{b:02x}")).collect();
    format!("{hex}:{}", key.name)
}

fn from_identity(identity: &str) -> Option<(Vec<u8>, &str)> {
    let (hex, name) = identity.split_once(':')?;
    let hash = (0..hex.len())
        .step_by(2)
        .map(|i| hex.get(i..i + 2).and_then(|h| u8::from_str_radix(h, 16).ok()))
        .collect::<Option<Vec<u8>>>()?;
    Some((hash, name))
}

/// Checks SMTP AUTH credentials: the user is the key's name, the password the key. Wrong ones
/// count against the client's address, as wrong keys do over HTTP.
pub fn login(state: &Rc<State>, user: &str, password: &str, ip: std::net::IpAddr) -> super::smtp::Login {
    let now = Instant::now();
    if state.send.failed_auth.borrow().check(ip, now).is_err() {
        return super::smtp::Login::Locked;
    }
    let found = state.config.borrow().api_keys.find(password).filter(|k| k.name == user);
    match found {
        Some(key) => super::smtp::Login::Ok(identity(&key)),
        None => {
            state.send.failed_auth.borrow_mut().fail(ip, now);
            super::smtp::Login::Wrong
        }
    }
}

/// Stores one submitted message as the session's key's role; the answer to its DATA.
pub async fn submit(state: &Rc<State>, envelope: super::smtp::Envelope) -> super::smtp::Stored {
    use super::smtp::Stored;
    let Some((hash, name)) = envelope.login.as_deref().and_then(from_identity) else {
        return Stored::Refused("530 5.7.0 Authentication required".into());
    };
    let key = state.config.borrow().api_keys.by_name(name).filter(|k| k.hash == hash);
    let Some(key) = key else {
        return Stored::Refused("535 5.7.8 Error: the API key was revoked".into());
    };
    let now = Instant::now();
    if let Some(rate) = &key.rate {
        if let Err(wait) = state.send.limiter.borrow_mut().take(&key.name, rate, now) {
            return Stored::Refused(format!(
                "451 4.7.0 Error: rate {rate} of API key {} exceeded; try again in {} s",
                key.name,
                keys::retry_after_secs(wait)
            ));
        }
    }
    state.send.used.borrow_mut().insert(key.name.clone(), now_secs());
    let date = crate::datetime::rfc5322_date(now_secs());
    let prepared = match crate::submission::prepare(&envelope.raw, crate::message::new_message_id_for, &date) {
        Ok(p) => p,
        Err(why) => return Stored::Refused(format!("554 5.6.0 {why}")),
    };
    let job = SubmitJob {
        key: key.name.clone(),
        hash: key.hash.clone(),
        role: key.role.clone(),
        sender: envelope.mail_from,
        recipients: envelope.rcpt_to,
        prepared,
    };
    match state.ask(Job::Submit(Box::new(job))).await {
        Answer::Stored(id) => Stored::Queued(id),
        Answer::Refused(line) => Stored::Refused(line),
        _ => Stored::Failed,
    }
}

/// The SMTP reply for a submission `email.send`'s rules refused.
pub fn submission_refusal(n: &NotSent) -> String {
    let one_line = |m: &str| m.split_whitespace().collect::<Vec<_>>().join(" ");
    match n.sqlstate.as_str() {
        super::send::ROLE_UNUSABLE => {
            format!("554 5.7.1 Error: the API key's role may not send mail: {}", one_line(&n.message))
        }
        s if s.starts_with("22") || s.starts_with("23") || s == "42704" || s == "P0001" || s.starts_with("54") => {
            format!("554 5.6.0 Error: {}", one_line(&n.message))
        }
        _ => format!("451 4.3.0 Error: the message cannot be stored now: {}", one_line(&n.message)),
    }
}

/// The submission service's TLS settings from PEM files (certificate chain, private key).
pub fn tls_config(cert: &str, key: &str) -> Result<rustls::ServerConfig, String> {
    use rustls_pki_types::pem::PemObject;
    use rustls_pki_types::{CertificateDer, PrivateKeyDer};
    let certs = CertificateDer::pem_file_iter(cert)
        .and_then(|i| i.collect::<Result<Vec<_>, _>>())
        .map_err(|e| format!("pg_email.submission_tls_cert {cert}: {e}"))?;
    if certs.is_empty() {
        return Err(format!("pg_email.submission_tls_cert {cert} holds no certificate"));
    }
    let key = PrivateKeyDer::from_pem_file(key).map_err(|e| format!("pg_email.submission_tls_key {key}: {e}"))?;
    rustls::ServerConfig::builder_with_provider(std::sync::Arc::new(rustls::crypto::ring::default_provider()))
        .with_safe_default_protocol_versions()
        .and_then(|b| b.with_no_client_auth().with_single_cert(certs, key))
        .map_err(|e| format!("the submission certificate cannot be used: {e}"))
}
