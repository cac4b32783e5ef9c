//! The listener's HTTP side: routes, limits and the hand-off to the main thread. No pgrx here.
//! Everything runs inside the listener's current-thread runtime, which its main thread drives in
//! bounded slices; a handler never touches Postgres. It checks the request (signature, token),
//! queues what must be stored as `Work`, and, for webhooks and unsubscribes, waits for the main
//! thread to say the transaction that stored it committed before it answers 200.

use std::cell::{Cell, RefCell};
use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::rc::Rc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use hyper::header::{
    HeaderValue, AUTHORIZATION, CACHE_CONTROL, CONTENT_LENGTH, CONTENT_SECURITY_POLICY, CONTENT_TYPE, LOCATION,
    WWW_AUTHENTICATE,
};
use hyper::{Method, Request, Response, StatusCode};
use tokio::sync::{oneshot, Notify};

use crate::tracking::{self, Claims, Keys, Kind, PageState};
use crate::webhook::{self, Verified};

/// Largest request body a route takes (webhook batches are the largest).
pub const MAX_BODY: usize = 1024 * 1024;
/// Longest a client may take to send a request body.
pub const BODY_TIMEOUT: Duration = Duration::from_secs(10);
/// Longest a request waits for the database before it is answered 503.
pub const COMMIT_TIMEOUT: Duration = Duration::from_secs(10);
/// Rows of tracking hits that may wait for the next transaction; beyond it hits are answered and
/// not stored (counted as dropped), so a flood cannot grow memory without bound.
pub const MAX_QUEUED_ROWS: usize = 200_000;
/// Largest SNS certificate fetched.
const MAX_CERT: usize = 64 * 1024;
/// How long a rendered dashboard is served again before the database is read anew: reloading
/// the page in a loop costs one transaction per this interval, not one per request.
const DASHBOARD_CACHE: Duration = Duration::from_secs(5);

/// What the main thread is asked to do in its next transaction.
#[derive(Debug)]
pub enum Job {
    /// Rows for `email._record_events`.
    Record(Vec<serde_json::Value>),
    /// The address (and topic) an unsubscribe token names.
    Lookup(i64),
    /// A fetched SNS certificate, kept for `email.ingest_webhook`.
    Certificate { url: String, pem: String },
    /// A message received over SMTP or LMTP.
    Inbound(Box<super::smtp::Envelope>),
    /// The dashboard page, read and rendered.
    Dashboard,
    /// Messages of the HTTP send API, stored as the key's role.
    Send(Box<super::api_http::SendJob>),
    /// A message received by SMTP submission, stored as the key's role.
    Submit(Box<super::api_http::SubmitJob>),
}

/// The main thread's answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Answer {
    /// Committed; how many rows were stored.
    Stored(i64),
    /// The address and topic of a message, or None when it is gone.
    Found(Option<(String, Option<String>)>),
    /// The transaction failed: the caller answers 503 (SMTP: 451).
    Failed,
    /// Refused for good, with the reply to give (SMTP: a 5xx line).
    Refused(String),
    /// The dashboard page.
    Page(Rc<String>),
    /// The messages of a send request were stored (or, for a dry run, would have been): their ids.
    Sent(Vec<i64>),
    /// They were not: none of them is stored.
    NotSent(super::api_http::NotSent),
}

pub struct Work {
    pub job: Job,
    pub reply: Option<oneshot::Sender<Answer>>,
}

/// What the handlers read; replaced as a whole by the main thread when the configuration changes.
#[derive(Default)]
pub struct Config {
    /// The webhook settings of each transport that has them.
    pub webhooks: HashMap<String, webhook::Config>,
    pub keys: Keys,
    /// pg_email.dashboard_password; None: GET /dashboard is 404.
    pub dashboard_password: Option<String>,
    /// The keys of the HTTP send API.
    pub api_keys: super::api_http::ApiKeys,
}

/// Shared between the handlers and the main thread (one thread: `Rc`/`RefCell`).
pub struct State {
    pub queue: RefCell<Vec<Work>>,
    queued_rows: Cell<usize>,
    /// Queued work whose connection waits for the answer.
    awaiting: Cell<usize>,
    /// Woken when work is queued, so the slice ends and the main thread stores it.
    pub wake: Notify,
    pub config: RefCell<Rc<Config>>,
    /// The SMTP/LMTP service's settings (read again with the rest).
    pub smtp: RefCell<Rc<super::smtp::Config>>,
    /// The SMTP submission service's settings.
    pub submission: RefCell<Rc<super::smtp::Config>>,
    /// SNS certificates by URL (fetched or loaded from email.sns_certificates).
    pub certs: RefCell<HashMap<String, Rc<Vec<u8>>>>,
    /// False while the database cannot be reached: /health answers 503.
    pub healthy: Cell<bool>,
    pub client: reqwest::Client,
    /// Requests answered 4xx, and tracking hits dropped because the queue was full.
    pub refused: Cell<u64>,
    pub dropped: Cell<u64>,
    pub open_connections: Cell<usize>,
    /// Lines for the server log, written by the main thread (ereport is main-thread only).
    pub logs: RefCell<Vec<String>>,
    /// The dashboard page last rendered, and when.
    dashboard: RefCell<Option<(Instant, Rc<String>)>>,
    /// The send API's limiters and its note of keys used.
    pub send: super::api_http::SendState,
}

impl State {
    pub fn new() -> Result<State, String> {
        let client = reqwest::Client::builder()
            .timeout(Duration::from_secs(10))
            .redirect(reqwest::redirect::Policy::none())
            .build()
            .map_err(|e| e.to_string())?;
        Ok(State {
            queue: RefCell::new(Vec::new()),
            queued_rows: Cell::new(0),
            awaiting: Cell::new(0),
            wake: Notify::new(),
            config: RefCell::new(Rc::new(Config::default())),
            smtp: RefCell::new(Rc::new(super::smtp::Config::default())),
            submission: RefCell::new(Rc::new(super::smtp::Config { submission: true, ..Default::default() })),
            certs: RefCell::new(HashMap::new()),
            healthy: Cell::new(false),
            client,
            refused: Cell::new(0),
            dropped: Cell::new(0),
            open_connections: Cell::new(0),
            logs: RefCell::new(Vec::new()),
            dashboard: RefCell::new(None),
            send: super::api_http::SendState::default(),
        })
    }

    /// Whether every open connection is waiting for an answer from the main thread: nothing more
    /// can arrive before it stores what is queued, so gathering longer would only add latency.
    pub fn all_waiting(&self) -> bool {
        self.awaiting.get() >= self.open_connections.get()
    }

    /// Takes up to `max_rows` rows' worth of queued work (at least one item).
    pub fn take(&self, max_rows: usize) -> Vec<Work> {
        let mut q = self.queue.borrow_mut();
        let mut n = 0;
        let mut rows = 0;
        for w in q.iter() {
            let r = match &w.job {
                Job::Record(v) => v.len(),
                Job::Send(s) => s.calls.len(),
                _ => 1,
            };
            if n > 0 && rows + r > max_rows {
                break;
            }
            rows += r;
            n += 1;
        }
        self.queued_rows.set(self.queued_rows.get().saturating_sub(rows));
        let answered = q[..n].iter().filter(|w| w.reply.is_some()).count();
        self.awaiting.set(self.awaiting.get().saturating_sub(answered));
        q.drain(..n).collect()
    }

    pub fn log(&self, line: String) {
        let mut logs = self.logs.borrow_mut();
        if logs.len() < 100 {
            logs.push(line);
        }
    }

    fn push(&self, job: Job, reply: Option<oneshot::Sender<Answer>>) {
        let rows = match &job {
            Job::Record(v) => v.len(),
            _ => 1,
        };
        self.queued_rows.set(self.queued_rows.get() + rows);
        if reply.is_some() {
            self.awaiting.set(self.awaiting.get() + 1);
        }
        self.queue.borrow_mut().push(Work { job, reply });
        self.wake.notify_one();
    }

    /// Queues `job` and waits for the transaction that handles it.
    pub async fn ask(&self, job: Job) -> Answer {
        let (tx, rx) = oneshot::channel();
        self.push(job, Some(tx));
        match tokio::time::timeout(COMMIT_TIMEOUT, rx).await {
            Ok(Ok(a)) => a,
            _ => Answer::Failed,
        }
    }
}

type Body = Full<Bytes>;

pub(super) fn now_secs() -> f64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0.0, |d| d.as_secs_f64())
}

fn reply(status: StatusCode, content_type: &'static str, body: impl Into<Bytes>) -> Response<Body> {
    let mut r = Response::new(Full::new(body.into()));
    *r.status_mut() = status;
    r.headers_mut().insert(CONTENT_TYPE, HeaderValue::from_static(content_type));
    r.headers_mut().insert(CACHE_CONTROL, HeaderValue::from_static("no-store"));
    r
}

fn text(status: StatusCode, body: &str) -> Response<Body> {
    reply(status, "text/plain; charset=utf-8", format!("{body}\n"))
}

fn page(status: StatusCode, html: String) -> Response<Body> {
    reply(status, "text/html; charset=utf-8", html)
}

fn not_found() -> Response<Body> {
    text(StatusCode::NOT_FOUND, "not found")
}

/// The client's address: the peer, or, when the peer is on loopback (a reverse proxy on the
/// same host), the first address of `X-Forwarded-For` / `X-Real-IP`.
pub(super) fn client_ip(peer: SocketAddr, headers: &hyper::HeaderMap) -> IpAddr {
    if peer.ip().is_loopback() {
        let forwarded = headers
            .get("x-forwarded-for")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.split(',').next())
            .or_else(|| headers.get("x-real-ip").and_then(|v| v.to_str().ok()));
        if let Some(ip) = forwarded.and_then(|v| v.trim().parse::<IpAddr>().ok()) {
            return ip;
        }
    }
    peer.ip()
}

/// Reads the whole body, refusing it over `limit` (413) or when it comes too slowly (408).
pub(super) async fn read_body(
    body: Incoming,
    headers: &hyper::HeaderMap,
    limit: usize,
) -> Result<Bytes, Response<Body>> {
    let declared = headers.get(CONTENT_LENGTH).and_then(|v| v.to_str().ok()).and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|n| n > limit as u64) {
        return Err(text(StatusCode::PAYLOAD_TOO_LARGE, "request body over 1 MB"));
    }
    match tokio::time::timeout(BODY_TIMEOUT, Limited::new(body, limit).collect()).await {
        Err(_) => Err(text(StatusCode::REQUEST_TIMEOUT, "request body too slow")),
        Ok(Err(e)) if e.downcast_ref::<http_body_util::LengthLimitError>().is_some() => {
            Err(text(StatusCode::PAYLOAD_TOO_LARGE, "request body over 1 MB"))
        }
        Ok(Err(_)) => Err(text(StatusCode::BAD_REQUEST, "the request body could not be read")),
        Ok(Ok(c)) => Ok(c.to_bytes()),
    }
}

/// Serves one request. Never panics on input: every refusal is a response.
pub async fn handle(state: Rc<State>, peer: SocketAddr, req: Request<Incoming>) -> Result<Response<Body>, String> {
    let response = route(&state, peer, req).await;
    if response.status().is_client_error() {
        state.refused.set(state.refused.get() + 1);
    }
    Ok(response)
}

async fn route(state: &Rc<State>, peer: SocketAddr, req: Request<Incoming>) -> Response<Body> {
    let path = req.uri().path().to_string();
    let method = req.method().clone();
    if method == Method::POST {
        if let Some(r) = crate::sendapi::Route::from_path(true, &path) {
            return super::api_http::handle(state, peer, r, req).await;
        }
    }
    let segments: Vec<&str> = path.trim_start_matches('/').splitn(2, '/').collect();
    match (&method, segments.as_slice()) {
        (&Method::GET | &Method::HEAD, ["health"]) => {
            if state.healthy.get() {
                text(StatusCode::OK, "ok")
            } else {
                text(StatusCode::SERVICE_UNAVAILABLE, "the database is not reachable")
            }
        }
        (&Method::POST, ["webhooks", name]) if !name.is_empty() && !name.contains('/') => {
            let name = name.to_string();
            webhook_route(state, &name, req).await
        }
        (&Method::GET | &Method::HEAD, ["o", token]) => track(state, peer, &method, &req, token, Kind::Open),
        (&Method::GET | &Method::HEAD, ["c", token]) => track(state, peer, &method, &req, token, Kind::Click),
        (&Method::GET | &Method::HEAD, ["u", token]) => {
            let token = token.to_string();
            unsubscribe_page(state, &token).await
        }
        (&Method::POST, ["u", token]) => {
            let token = token.to_string();
            unsubscribe(state, peer, &token, req).await
        }
        (&Method::GET | &Method::HEAD, ["dashboard"]) => dashboard(state, &req).await,
        (_, ["webhooks" | "o" | "c" | "u", rest]) if !rest.is_empty() && !rest.contains('/') => method_not_allowed(),
        (_, ["health" | "dashboard"]) => method_not_allowed(),
        _ => not_found(),
    }
}

/// GET /dashboard: the page, behind HTTP Basic (user `admin`, `pg_email.dashboard_password`);
/// 404 while no password is set. The page loads nothing and runs no script (the CSP says so too).
async fn dashboard(state: &Rc<State>, req: &Request<Incoming>) -> Response<Body> {
    let Some(password) = state.config.borrow().dashboard_password.clone() else {
        return not_found();
    };
    let csp = HeaderValue::from_static(crate::dashboard::CONTENT_SECURITY_POLICY);
    let authorization = req.headers().get(AUTHORIZATION).and_then(|v| v.to_str().ok());
    if !crate::dashboard::check_basic_auth(authorization, "admin", &password) {
        let mut r = page(StatusCode::UNAUTHORIZED, crate::dashboard::unauthorized());
        r.headers_mut().insert(WWW_AUTHENTICATE, HeaderValue::from_static(crate::dashboard::WWW_AUTHENTICATE));
        r.headers_mut().insert(CONTENT_SECURITY_POLICY, csp);
        return r;
    }
    let cached =
        state.dashboard.borrow().as_ref().filter(|(at, _)| at.elapsed() < DASHBOARD_CACHE).map(|(_, p)| p.clone());
    let html = match cached {
        Some(html) => html,
        None => match state.ask(Job::Dashboard).await {
            Answer::Page(html) => {
                *state.dashboard.borrow_mut() = Some((Instant::now(), html.clone()));
                html
            }
            _ => return text(StatusCode::SERVICE_UNAVAILABLE, "the dashboard cannot be read now"),
        },
    };
    let mut r = reply(StatusCode::OK, "text/html; charset=utf-8", Bytes::from(html.as_bytes().to_vec()));
    r.headers_mut().insert(CONTENT_SECURITY_POLICY, csp);
    r
}

fn method_not_allowed() -> Response<Body> {
    let mut r = text(StatusCode::METHOD_NOT_ALLOWED, "method not allowed");
    r.headers_mut().insert(hyper::header::ALLOW, HeaderValue::from_static("GET, HEAD, POST"));
    r
}

async fn webhook_route(state: &Rc<State>, name: &str, req: Request<Incoming>) -> Response<Body> {
    let Some(cfg) = state.config.borrow().webhooks.get(name).cloned() else {
        return text(StatusCode::NOT_FOUND, "no transport with webhook settings has this name");
    };
    let headers: Vec<(String, String)> = req
        .headers()
        .iter()
        .map(|(k, v)| (k.as_str().to_ascii_lowercase(), String::from_utf8_lossy(v.as_bytes()).into_owned()))
        .collect();
    let (parts, body) = req.into_parts();
    let body = match read_body(body, &parts.headers, MAX_BODY).await {
        Ok(b) => b,
        Err(r) => return r,
    };
    let request = webhook::Request { headers: &headers, body: &body, now: now_secs() as i64 };
    let mut verified = webhook::verify(&cfg, &request, None);
    if let Ok(Verified::NeedCertificate(url)) = &verified {
        let cert = match certificate(state, url).await {
            Ok(c) => c,
            Err(e) => {
                state.log(format!("pg_email listener: the SNS certificate {url} cannot be fetched: {e}"));
                return text(StatusCode::SERVICE_UNAVAILABLE, "the signing certificate cannot be fetched");
            }
        };
        verified = webhook::verify(&cfg, &request, Some(&cert));
    }
    let events = match verified {
        Err(refused) => {
            let status = StatusCode::from_u16(refused.status).unwrap_or(StatusCode::BAD_REQUEST);
            return text(status, &refused.reason);
        }
        Ok(Verified::Ignore(why)) => return text(StatusCode::OK, &why),
        Ok(Verified::NeedCertificate(_)) => {
            return text(StatusCode::SERVICE_UNAVAILABLE, "the signing certificate cannot be used");
        }
        Ok(Verified::Confirm { subscribe_url, payload }) => {
            if let Err(e) = confirm(state, &subscribe_url).await {
                state.log(format!("pg_email listener: confirming the SNS subscription failed: {e}"));
                return text(StatusCode::SERVICE_UNAVAILABLE, "the subscription could not be confirmed");
            }
            vec![serde_json::json!({
                "transport": name, "source": "webhook", "event": "subscription_confirmation",
                "provider_event_id": payload.get("MessageId").and_then(|v| v.as_str()),
                "reason": "SNS subscription confirmed", "payload": payload,
            })]
        }
        Ok(Verified::Events(events)) => events.iter().map(|e| webhook::row(name, e)).collect(),
    };
    if events.is_empty() {
        return text(StatusCode::OK, "ok");
    }
    match state.ask(Job::Record(events)).await {
        Answer::Stored(_) => text(StatusCode::OK, "ok"),
        _ => text(StatusCode::SERVICE_UNAVAILABLE, "the events could not be stored now; try again"),
    }
}

async fn certificate(state: &Rc<State>, url: &str) -> Result<Rc<Vec<u8>>, String> {
    if let Some(c) = state.certs.borrow().get(url) {
        return Ok(c.clone());
    }
    let resp = state.client.get(url).send().await.map_err(|e| e.to_string())?;
    if !resp.status().is_success() {
        return Err(format!("HTTP {}", resp.status()));
    }
    let bytes = read_limited(resp, MAX_CERT).await?;
    let pem = String::from_utf8(bytes.clone()).map_err(|_| "the certificate is not PEM text".to_string())?;
    let cert = Rc::new(bytes);
    state.certs.borrow_mut().insert(url.to_string(), cert.clone());
    state.push(Job::Certificate { url: url.to_string(), pem }, None);
    Ok(cert)
}

async fn read_limited(mut resp: reqwest::Response, limit: usize) -> Result<Vec<u8>, String> {
    let mut out = Vec::new();
    while let Some(chunk) = resp.chunk().await.map_err(|e| e.to_string())? {
        if out.len() + chunk.len() > limit {
            return Err("the response is too large".into());
        }
        out.extend_from_slice(&chunk);
    }
    Ok(out)
}

async fn confirm(state: &Rc<State>, url: &str) -> Result<(), String> {
    let resp = state.client.get(url).send().await.map_err(|e| e.to_string())?;
    if resp.status().is_success() {
        Ok(())
    } else {
        Err(format!("HTTP {}", resp.status()))
    }
}

fn verify_token(state: &Rc<State>, token: &str, kind: Kind) -> Option<Claims> {
    state.config.borrow().keys.verify_kind(token, kind)
}

/// An open or a click: answered at once (the pixel, or the redirect the signed token names), and
/// stored in the next transaction.
fn track(
    state: &Rc<State>,
    peer: SocketAddr,
    method: &Method,
    req: &Request<Incoming>,
    token: &str,
    kind: Kind,
) -> Response<Body> {
    let Some(claims) = verify_token(state, token, kind) else {
        return not_found();
    };
    let user_agent = req.headers().get(hyper::header::USER_AGENT).map(|v| String::from_utf8_lossy(v.as_bytes()));
    let machine = *method == Method::HEAD || user_agent.as_deref().is_none_or(tracking::is_machine_agent);
    let row = serde_json::json!({
        "source": "tracking",
        "event": if kind == Kind::Open { "opened" } else { "clicked" },
        "pg_email_id": claims.message_id,
        "single": claims.single,
        "url": claims.url,
        "user_agent": user_agent,
        "ip": client_ip(peer, req.headers()).to_string(),
        "machine": machine,
        "at": now_secs(),
    });
    if state.queued_rows.get() < MAX_QUEUED_ROWS {
        state.push(Job::Record(vec![row]), None);
    } else {
        state.dropped.set(state.dropped.get() + 1);
    }
    match (kind, claims.url) {
        // The destination byte-for-byte (UTF-8 is allowed in a header value as obs-text, and
        // browsers read a Location as UTF-8); one with control characters in its canonical ASCII
        // form instead.
        (Kind::Click, Some(url)) => match HeaderValue::from_bytes(url.as_bytes())
            .ok()
            .or_else(|| tracking::redirect_location(&url).and_then(|u| HeaderValue::from_str(&u).ok()))
        {
            Some(location) => {
                let mut r = text(StatusCode::FOUND, "redirecting");
                r.headers_mut().insert(LOCATION, location);
                r
            }
            None => not_found(),
        },
        _ => reply(StatusCode::OK, "image/gif", Bytes::from_static(tracking::PIXEL_GIF)),
    }
}

/// GET /u/<token>: a page with a button. It changes nothing: link scanners fetch every GET.
async fn unsubscribe_page(state: &Rc<State>, token: &str) -> Response<Body> {
    let Some(claims) = verify_token(state, token, Kind::Unsubscribe) else {
        return not_found();
    };
    match state.ask(Job::Lookup(claims.message_id)).await {
        Answer::Found(Some((address, topic))) => page(
            StatusCode::OK,
            tracking::unsubscribe_page(
                Some(&address),
                topic.as_deref(),
                PageState::Confirm { action: format!("/u/{token}") },
            ),
        ),
        Answer::Found(None) => page(StatusCode::NOT_FOUND, tracking::unsubscribe_page(None, None, PageState::NotFound)),
        _ => text(StatusCode::SERVICE_UNAVAILABLE, "try again in a moment"),
    }
}

/// POST /u/<token>: RFC 8058 one-click (or the page's form). Answered 200 after the commit,
/// never with a redirect.
async fn unsubscribe(state: &Rc<State>, peer: SocketAddr, token: &str, req: Request<Incoming>) -> Response<Body> {
    let Some(claims) = verify_token(state, token, Kind::Unsubscribe) else {
        return not_found();
    };
    let ip = client_ip(peer, req.headers()).to_string();
    let user_agent =
        req.headers().get(hyper::header::USER_AGENT).map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned());
    let content_type = req.headers().get(CONTENT_TYPE).and_then(|v| v.to_str().ok()).map(str::to_string);
    let (parts, body) = req.into_parts();
    let body = match read_body(body, &parts.headers, 64 * 1024).await {
        Ok(b) => b,
        Err(r) => return r,
    };
    if !tracking::is_one_click_body(content_type.as_deref(), &body) {
        return text(StatusCode::BAD_REQUEST, "expected the body List-Unsubscribe=One-Click");
    }
    let row = serde_json::json!({
        "source": "tracking", "event": "unsubscribed", "pg_email_id": claims.message_id,
        "single": claims.single, "user_agent": user_agent, "ip": ip, "at": now_secs(),
    });
    match state.ask(Job::Record(vec![row])).await {
        Answer::Stored(_) => page(StatusCode::OK, tracking::unsubscribe_page(None, None, PageState::Done)),
        _ => text(StatusCode::SERVICE_UNAVAILABLE, "try again in a moment"),
    }
}
