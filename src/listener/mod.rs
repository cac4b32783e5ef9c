//! The listener worker: one background process that accepts HTTP (provider webhooks, open and
//! click tracking, unsubscribe, the provider-compatible send API) when `pg_email.listen_address`
//! is set, inbound SMTP/LMTP on `pg_email.inbound_address`, and SMTP submission on
//! `pg_email.submission_address`. `init` registers it from
//! `_PG_init` in the postmaster. Its main thread drives a current-thread tokio runtime (hyper
//! HTTP/1.1, see `http`) in bounded slices with signals blocked, and between slices runs one
//! short transaction for everything the handlers queued; only then are the waiting webhook and
//! unsubscribe requests answered. Postgres is only ever called from the main thread.

pub mod api_http;
pub mod dashboard;
pub mod http;
pub mod send;
pub mod smtp;

use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::rc::Rc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use futures_util::stream::{FuturesUnordered, StreamExt};
use pgrx::bgworkers::{BackgroundWorker, BackgroundWorkerBuilder, SignalWakeFlags};
use pgrx::prelude::*;

use self::http::{Answer, Job, State};
use crate::bgw::{block_signals, now_ts, restore_signals};
use crate::shmem::{self, WorkerState};
use crate::{gucs, tracking, webhook};

const SESSION: &str = include_str!("../../sql/listener/session.sql");
const TRANSPORTS: &str = include_str!("../../sql/listener/transports.sql");
const TRACKING_KEYS: &str = include_str!("../../sql/worker/tracking_keys.sql");
const SNS_CERTIFICATES: &str = include_str!("../../sql/listener/sns_certificates.sql");
const SAVE_CERTIFICATE: &str = include_str!("../../sql/listener/save_certificate.sql");
const RECORD: &str = include_str!("../../sql/listener/record.sql");
const LOOKUP: &str = include_str!("../../sql/listener/lookup.sql");
const RECORD_INBOUND: &str = include_str!("../../sql/listener/record_inbound.sql");
const EXTENSION_VERSION: &str = include_str!("../../sql/worker/extension_version.sql");
const API_KEYS: &str = include_str!("../../sql/listener/api_keys.sql");

/// The extension version this library implements; the listener serves only a schema of it.
const LIBRARY_VERSION: &str = env!("CARGO_PKG_VERSION");
/// Most open connections; beyond it new ones wait in the kernel's accept queue.
const MAX_CONNECTIONS: usize = 512;
/// Longest slice of HTTP work between two looks at signals and the queue.
const SLICE: Duration = Duration::from_millis(50);
/// Once something is queued, how long the slice goes on gathering more for the same transaction.
const GATHER: Duration = Duration::from_millis(2);
/// Most event rows stored per transaction.
const MAX_BATCH_ROWS: usize = 2000;
/// How often the configuration is read again without a change signal.
const RELOAD_EVERY: Duration = Duration::from_secs(5);
/// How often the keys used since are noted in email.api_keys.last_used_at.
const NOTE_KEYS_EVERY: Duration = Duration::from_secs(2);

/// Called from `_PG_init`: registers the listener when `pg_email.listen_address` (HTTP) or
/// `pg_email.inbound_address` (SMTP/LMTP) is set.
pub fn init() {
    if gucs::listen_address().is_none() && gucs::inbound_address().is_none() && gucs::submission_address().is_none() {
        return;
    }
    BackgroundWorkerBuilder::new("pg_email listener")
        .set_type("pg_email listener")
        .set_library("pg_email")
        .set_function("pg_email_listener_main")
        .enable_spi_access()
        .set_restart_time(Some(Duration::from_secs(2)))
        .load();
}

type Connection = Pin<Box<dyn Future<Output = ()>>>;

fn slot() -> Option<&'static shmem::Slot> {
    shmem::shared().map(|s| &s.listener)
}

fn set_state(state: WorkerState, activity: &str) {
    if let Some(s) = slot() {
        if s.state() == Some(state) {
            return;
        }
        s.set_state(state);
    }
    if let Ok(c) = std::ffi::CString::new(format!("pg_email listener: {activity}")) {
        // SAFETY: called on the main thread with a valid NUL-terminated string, which pgstat
        // copies into shared memory.
        unsafe { pg_sys::pgstat_report_activity(pg_sys::BackendState::STATE_IDLE, c.as_ptr()) };
    }
}

#[pg_guard]
#[unsafe(no_mangle)]
pub extern "C-unwind" fn pg_email_listener_main(_arg: pg_sys::Datum) {
    BackgroundWorker::attach_signal_handlers(SignalWakeFlags::SIGHUP | SignalWakeFlags::SIGTERM);
    BackgroundWorker::connect_worker_to_spi(Some(&gucs::database()), None);
    if let Some(s) = slot() {
        // SAFETY: MyProcPid is set by Postgres before a background worker's main function runs.
        s.pid.store(unsafe { pg_sys::MyProcPid }, Ordering::Relaxed);
        s.started_at.store(now_ts(), Ordering::Relaxed);
        s.set_state(WorkerState::Starting);
    }
    let rt = match crate::bgw::runtime() {
        Ok(rt) => rt,
        Err(e) => pgrx::error!("pg_email listener: cannot start its runtime: {e}"),
    };
    let state = match State::new() {
        Ok(s) => Rc::new(s),
        Err(e) => pgrx::error!("pg_email listener: cannot start its HTTP client: {e}"),
    };
    let mut l = Listener { rt, state, generation: u64::MAX, loaded_at: None, keys_noted_at: Instant::now(), tls: None };
    l.run();
    if let Some(s) = slot() {
        s.pid.store(0, Ordering::Relaxed);
        s.in_flight.store(0, Ordering::Relaxed);
        s.set_state(WorkerState::Stopped);
    }
    log!("pg_email listener stopped");
    // SAFETY: proc_exit runs Postgres' exit callbacks and never returns. Exit code 1: the
    // postmaster starts the listener again after its restart time, unless the server is stopping.
    unsafe { pg_sys::proc_exit(1) };
}

struct Listener {
    rt: tokio::runtime::Runtime,
    state: Rc<State>,
    /// The configuration generation the settings were read at.
    generation: u64,
    loaded_at: Option<Instant>,
    /// When the keys used were last noted.
    keys_noted_at: Instant,
    /// The submission service's certificate files (with their modification times) as last
    /// read, and the TLS settings made of them.
    tls: Option<TlsFiles>,
}

/// The HTTP, inbound SMTP/LMTP and submission addresses, each when set.
type Addresses = (Option<SocketAddr>, Option<SocketAddr>, Option<SocketAddr>);

type TlsFiles = (
    ((String, String), Option<std::time::SystemTime>, Option<std::time::SystemTime>),
    Option<std::sync::Arc<rustls::ServerConfig>>,
);

impl Listener {
    /// Waits on the latch; false when the worker must stop.
    fn wait(&mut self, timeout: Duration) -> bool {
        let alive = BackgroundWorker::wait_latch(Some(timeout));
        if BackgroundWorker::sighup_received() {
            // SAFETY: re-reading the configuration file on the main thread outside any
            // transaction is what Postgres' own processes do on SIGHUP.
            unsafe { pg_sys::ProcessConfigFile(pg_sys::GucContext::PGC_SIGHUP) };
            // The handlers' copy of the settings (the dashboard password) is rebuilt at once.
            self.loaded_at = None;
        }
        alive
    }

    /// Parses `pg_email.listen_address` / `inbound_address` / `submission_address`; Err: one is set
    /// but invalid.
    fn addresses() -> Result<Addresses, String> {
        let parse = |setting: &str, value: Option<String>| match value {
            None => Ok(None),
            Some(v) => v
                .trim()
                .parse::<SocketAddr>()
                .map(Some)
                .map_err(|_| format!("pg_email.{setting} = \"{v}\" is not host:port (for example 127.0.0.1:8025)")),
        };
        Ok((
            parse("listen_address", gucs::listen_address())?,
            parse("inbound_address", gucs::inbound_address())?,
            parse("submission_address", gucs::submission_address())?,
        ))
    }

    /// Binds `addr`, retrying while it is still taken (a restart right after a crash); None when
    /// the worker must stop meanwhile.
    fn bind_retrying(&mut self, addr: SocketAddr) -> Option<tokio::net::TcpListener> {
        let mut backoff = Duration::from_millis(100);
        loop {
            let old = block_signals();
            let bound = self.rt.block_on(bind(addr));
            restore_signals(old);
            match bound {
                Ok(l) => return Some(l),
                Err(e) => {
                    warning!("pg_email listener: cannot listen on {addr}: {e}; trying again");
                    if !self.wait(backoff) {
                        return None;
                    }
                    backoff = (backoff * 2).min(Duration::from_secs(5));
                }
            }
        }
    }

    fn run(&mut self) {
        let (http_addr, smtp_addr, submission_addr) = match Self::addresses() {
            Ok(a) => a,
            Err(e) => {
                warning!("pg_email listener: {e}; the listener does not start");
                set_state(WorkerState::Stopped, "an address setting is invalid");
                while self.wait(Duration::from_secs(3600)) {}
                return;
            }
        };
        // Wait until the extension exists in the database, at this library's version.
        let mut told = None;
        loop {
            let installed = BackgroundWorker::transaction(|| Spi::get_one::<String>(EXTENSION_VERSION).ok().flatten());
            if installed.as_deref() == Some(LIBRARY_VERSION) {
                break;
            }
            if installed.is_some() && told != installed {
                log!(
                    "pg_email listener: waiting for ALTER EXTENSION pg_email UPDATE (installed {}, library \
                     {LIBRARY_VERSION})",
                    installed.as_deref().unwrap_or("")
                );
                told = installed.clone();
            }
            set_state(WorkerState::WaitingForDatabase, "waiting for the extension");
            if !self.wait(Duration::from_secs(1)) {
                return;
            }
        }
        BackgroundWorker::transaction(|| {
            if let Err(e) = Spi::run(SESSION) {
                warning!("pg_email listener: session settings failed: {e}");
            }
        });
        self.reload();

        let mut http = None;
        if let Some(addr) = http_addr {
            let Some(l) = self.bind_retrying(addr) else { return };
            log!("pg_email listener accepting HTTP on {addr} for database \"{}\"", gucs::database());
            http = Some(l);
        }
        let mut smtp = None;
        if let Some(addr) = smtp_addr {
            let Some(l) = self.bind_retrying(addr) else { return };
            log!("pg_email listener accepting SMTP and LMTP on {addr} for database \"{}\"", gucs::database());
            smtp = Some(l);
        }
        let mut submission = None;
        if let Some(addr) = submission_addr {
            let Some(l) = self.bind_retrying(addr) else { return };
            log!("pg_email listener accepting SMTP submission on {addr} for database \"{}\"", gucs::database());
            submission = Some(l);
        }
        let on: Vec<String> =
            http_addr.iter().chain(smtp_addr.iter()).chain(submission_addr.iter()).map(|a| a.to_string()).collect();
        set_state(WorkerState::Listening, &format!("listening on {}", on.join(", ")));

        let mut connections: FuturesUnordered<Connection> = FuturesUnordered::new();
        loop {
            self.drive(http.as_ref(), smtp.as_ref(), submission.as_ref(), &mut connections);
            if !self.wait(Duration::ZERO) {
                break;
            }
            if shmem::config_generation() != self.generation
                || self.loaded_at.is_none_or(|t| t.elapsed() >= RELOAD_EVERY)
            {
                self.reload();
            }
            self.store();
            self.note_keys_used(false);
            self.flush_logs();
            if let Some(s) = slot() {
                s.in_flight.store(self.state.open_connections.get() as u32, Ordering::Relaxed);
                s.failed.store(self.state.refused.get(), Ordering::Relaxed);
            }
        }
        set_state(WorkerState::Stopping, "stopping");
        // Store what was already queued, answer the rest, and let answers go out for a moment.
        self.store();
        self.note_keys_used(true);
        drop(http);
        drop(smtp);
        drop(submission);
        let deadline = Instant::now() + Duration::from_millis(500);
        let old = block_signals();
        self.rt.block_on(async {
            let _ =
                tokio::time::timeout_at(deadline.into(), async { while connections.next().await.is_some() {} }).await;
        });
        restore_signals(old);
        for w in self.state.take(usize::MAX) {
            if let Some(r) = w.reply {
                let _ = r.send(Answer::Failed);
            }
        }
    }

    /// One slice of HTTP work: accept, serve, and return once something is queued (after a short
    /// gathering window) or the slice is over.
    fn drive(
        &self,
        http: Option<&tokio::net::TcpListener>,
        smtp: Option<&tokio::net::TcpListener>,
        submission: Option<&tokio::net::TcpListener>,
        connections: &mut FuturesUnordered<Connection>,
    ) {
        let state = &self.state;
        let old = block_signals();
        self.rt.block_on(async {
            let mut deadline = tokio::time::Instant::now() + SLICE;
            if !state.queue.borrow().is_empty() {
                return;
            }
            loop {
                let room = connections.len() < MAX_CONNECTIONS;
                tokio::select! {
                    biased;
                    _ = tokio::time::sleep_until(deadline) => break,
                    _ = state.wake.notified() => {
                        if state.all_waiting() {
                            break;
                        }
                        deadline = deadline.min(tokio::time::Instant::now() + GATHER);
                    }
                    accepted = accept(http), if room => match accepted {
                        Ok((stream, peer)) => connections.push(serve(state.clone(), stream, peer)),
                        // Out of file descriptors, say: let connections finish for a moment
                        // instead of spinning on the error.
                        Err(_) => tokio::time::sleep(Duration::from_millis(10)).await,
                    },
                    accepted = accept(smtp), if room => match accepted {
                        Ok((stream, peer)) => connections.push(serve_smtp(state.clone(), stream, peer, false)),
                        // Out of file descriptors, say: let connections finish for a moment
                        // instead of spinning on the error.
                        Err(_) => tokio::time::sleep(Duration::from_millis(10)).await,
                    },
                    accepted = accept(submission), if room => match accepted {
                        Ok((stream, peer)) => connections.push(serve_smtp(state.clone(), stream, peer, true)),
                        Err(_) => tokio::time::sleep(Duration::from_millis(10)).await,
                    },
                    Some(()) = connections.next(), if !connections.is_empty() => {}
                }
            }
        });
        restore_signals(old);
    }

    /// Runs everything queued in one transaction (each piece in a subtransaction, so that one
    /// failure fails only its own requests), then answers the requests that waited for it.
    fn store(&self) {
        loop {
            let (work, replies): (Vec<Job>, Vec<_>) =
                self.state.take(MAX_BATCH_ROWS).into_iter().map(|w| (w.job, w.reply)).unzip();
            if work.is_empty() {
                return;
            }
            let keys = self.state.config.borrow().keys.clone();
            // A key revoked since its request was checked is refused now (the configuration was
            // read again before this, when it changed).
            let revoked: Vec<bool> = work
                .iter()
                .map(|job| match job {
                    Job::Send(s) => !self.state.config.borrow().api_keys.still_valid(&s.key, &s.hash),
                    Job::Submit(s) => !self.state.config.borrow().api_keys.still_valid(&s.key, &s.hash),
                    _ => false,
                })
                .collect();
            let answers = BackgroundWorker::transaction(|| {
                send::forget_roles();
                let mut answers = Vec::with_capacity(work.len());
                // One dashboard read per transaction, however many asked.
                let mut page: Option<Rc<String>> = None;
                // The event rows of every request, in one statement; should it fail, each request
                // on its own.
                let rows: Vec<&serde_json::Value> = work
                    .iter()
                    .filter_map(|job| match job {
                        Job::Record(r) => Some(r.iter()),
                        _ => None,
                    })
                    .flatten()
                    .collect();
                let together = if rows.is_empty() { Ok(0) } else { crate::subxact::run(|| record(&rows)) };
                if let Err(e) = &together {
                    warning!("pg_email listener: storing a batch of events failed: {e}; storing one request at a time");
                }
                for (job, revoked) in work.iter().zip(&revoked) {
                    let answer = match job {
                        Job::Record(r) => match &together {
                            Ok(_) => Answer::Stored(r.len() as i64),
                            Err(_) => match crate::subxact::run(|| record(&r.iter().collect::<Vec<_>>())) {
                                Ok(n) => Answer::Stored(n),
                                Err(e) => {
                                    warning!("pg_email listener: storing events failed: {e}");
                                    Answer::Failed
                                }
                            },
                        },
                        Job::Lookup(id) => match crate::subxact::run(|| lookup(*id)) {
                            Ok(found) => Answer::Found(found),
                            Err(e) => {
                                warning!("pg_email listener: looking up message {id} failed: {e}");
                                Answer::Failed
                            }
                        },
                        Job::Certificate { url, pem } => {
                            if let Err(e) = crate::subxact::run(|| save_certificate(url, pem)) {
                                warning!("pg_email listener: keeping the SNS certificate failed: {e}");
                            }
                            Answer::Stored(0)
                        }
                        Job::Dashboard => match &page {
                            Some(p) => Answer::Page(p.clone()),
                            None => match crate::subxact::run(|| dashboard::read(&gucs::database())) {
                                Ok(d) => {
                                    let p = Rc::new(crate::dashboard::render(&d));
                                    page = Some(p.clone());
                                    Answer::Page(p)
                                }
                                Err(e) => {
                                    warning!("pg_email listener: reading the dashboard failed: {e}");
                                    Answer::Failed
                                }
                            },
                        },
                        Job::Send(job) => {
                            if *revoked {
                                Answer::NotSent(api_http::NotSent {
                                    index: 0,
                                    sqlstate: api_http::KEY_REVOKED.into(),
                                    message: "the API key was revoked".into(),
                                })
                            } else {
                                match send::store(&job.role, &job.calls, job.dry_run) {
                                    Ok(ids) => Answer::Sent(ids),
                                    Err(n) => Answer::NotSent(n),
                                }
                            }
                        }
                        Job::Submit(job) => {
                            if *revoked {
                                Answer::Refused("535 5.7.8 Error: the API key was revoked".into())
                            } else {
                                match send::submit(job) {
                                    Ok(id) => Answer::Stored(id),
                                    Err(n) => Answer::Refused(api_http::submission_refusal(&n)),
                                }
                            }
                        }
                        Job::Inbound(envelope) => match crate::subxact::run(|| inbound(envelope, &keys)) {
                            Ok(Ok(id)) => Answer::Stored(id),
                            Ok(Err(why)) => Answer::Refused(why),
                            Err(e) => {
                                warning!("pg_email listener: storing received mail failed: {e}");
                                Answer::Failed
                            }
                        },
                    };
                    answers.push(answer);
                }
                answers
            });
            self.state.healthy.set(true);
            let mut stored = 0;
            let mut failed = 0;
            for ((job, reply), a) in work.iter().zip(replies).zip(answers) {
                match (job, &a) {
                    (Job::Record(r), Answer::Stored(_)) => stored += r.len() as u64,
                    (_, Answer::Failed) => failed += 1,
                    _ => {}
                }
                if let Some(reply) = reply {
                    let _ = reply.send(a);
                }
            }
            if let Some(s) = slot() {
                s.sent.fetch_add(stored, Ordering::Relaxed);
                s.deferred.fetch_add(failed, Ordering::Relaxed);
                s.last_activity.store(now_ts(), Ordering::Relaxed);
            }
        }
    }

    /// Reads the webhook settings of every transport, the tracking keys and the kept SNS
    /// certificates.
    fn reload(&mut self) {
        let generation = shmem::config_generation();
        let loaded = BackgroundWorker::transaction(|| {
            crate::subxact::run(|| {
                let mut webhooks = std::collections::HashMap::new();
                let mut keys = Vec::new();
                let mut certs = Vec::new();
                let mut api_keys = Vec::new();
                Spi::connect(|client| {
                    if let Ok(rows) = client.select(API_KEYS, None, &[]) {
                        for row in rows {
                            let text = |c: &str| row.get_by_name::<String, _>(c).ok().flatten();
                            let hash = row.get_by_name::<Vec<u8>, _>("hash").ok().flatten();
                            if let (Some(name), Some(role), Some(prefix), Some(hash)) =
                                (text("name"), text("role"), text("prefix"), hash)
                            {
                                api_keys.push((name, role, prefix, text("rate"), hash));
                            }
                        }
                    }
                    if let Ok(rows) = client.select(TRANSPORTS, None, &[]) {
                        for row in rows {
                            let name = row.get_by_name::<String, _>("name").ok().flatten().unwrap_or_default();
                            let dsn = row.get_by_name::<String, _>("dsn").ok().flatten().unwrap_or_default();
                            webhooks.insert(name, dsn);
                        }
                    }
                    if let Ok(rows) = client.select(TRACKING_KEYS, None, &[]) {
                        for row in rows {
                            let kid = row.get_by_name::<i32, _>("kid").ok().flatten();
                            let secret = row.get_by_name::<Vec<u8>, _>("secret").ok().flatten();
                            if let (Some(k), Some(s)) = (kid, secret) {
                                keys.push((k, s));
                            }
                        }
                    }
                    if let Ok(rows) = client.select(SNS_CERTIFICATES, None, &[]) {
                        for row in rows {
                            let url = row.get_by_name::<String, _>("url").ok().flatten();
                            let pem = row.get_by_name::<String, _>("pem").ok().flatten();
                            if let (Some(u), Some(p)) = (url, pem) {
                                certs.push((u, p));
                            }
                        }
                    }
                });
                (webhooks, keys, certs, api_keys)
            })
        });
        let (dsns, keys, certs, api_keys) = match loaded {
            Ok(l) => l,
            Err(e) => {
                warning!("pg_email listener: reading its settings failed: {e}");
                self.state.healthy.set(false);
                return;
            }
        };
        let mut webhooks = std::collections::HashMap::new();
        for (name, dsn) in dsns {
            let cfg =
                crate::deliver::dsn::parse(&dsn).map_err(|e| e.to_string()).and_then(|d| webhook::Config::from_dsn(&d));
            match cfg {
                Ok(Some(c)) => {
                    webhooks.insert(name, c);
                }
                Ok(None) => {}
                Err(e) => {
                    warning!("pg_email listener: the webhook settings of transport \"{name}\" cannot be used: {e}")
                }
            }
        }
        *self.state.config.borrow_mut() = Rc::new(http::Config {
            webhooks,
            keys: tracking::Keys::new(keys),
            dashboard_password: gucs::dashboard_password(),
            api_keys: api_http::ApiKeys::new(
                api_keys
                    .into_iter()
                    .map(|(name, role, prefix, rate, hash)| {
                        // The table's CHECK allows only rates that parse.
                        let rate = rate.and_then(|r| crate::sendapi::keys::parse_rate(&r).ok());
                        (prefix, api_http::ApiKey { name, role, hash, rate })
                    })
                    .collect(),
            ),
        });
        let names = self.state.config.borrow().api_keys.names();
        self.state.send.limiter.borrow_mut().retain(&names);
        *self.state.smtp.borrow_mut() = Rc::new(smtp::Config {
            hostname: gucs::bounce_domain().unwrap_or_else(|| "localhost".into()),
            max_message_size: gucs::max_message_size(),
            accept_domains: gucs::inbound_domains(),
            max_recipients: 100,
            command_timeout: Duration::from_secs(300),
            data_timeout: Duration::from_secs(600),
            submission: false,
            tls: None,
        });
        *self.state.submission.borrow_mut() = Rc::new(smtp::Config {
            hostname: gucs::bounce_domain().unwrap_or_else(|| "localhost".into()),
            max_message_size: gucs::max_message_size(),
            accept_domains: Vec::new(),
            max_recipients: gucs::max_recipients(),
            command_timeout: Duration::from_secs(300),
            data_timeout: Duration::from_secs(600),
            submission: true,
            tls: self.submission_tls(),
        });
        let mut cache = self.state.certs.borrow_mut();
        for (url, pem) in certs {
            cache.entry(url).or_insert_with(|| Rc::new(pem.into_bytes()));
        }
        self.state.healthy.set(true);
        self.generation = generation;
        self.loaded_at = Some(Instant::now());
    }

    /// Notes when keys were last used, every NOTE_KEYS_EVERY (`now`: whatever is pending).
    fn note_keys_used(&mut self, now: bool) {
        if !now && self.keys_noted_at.elapsed() < NOTE_KEYS_EVERY {
            return;
        }
        self.keys_noted_at = Instant::now();
        let used: Vec<(String, f64)> = self.state.send.used.borrow_mut().drain().collect();
        if used.is_empty() {
            return;
        }
        let noted = BackgroundWorker::transaction(|| crate::subxact::run(|| send::keys_used(&used)));
        if let Err(e) = noted {
            warning!("pg_email listener: noting when API keys were used failed: {e}");
        }
    }

    /// The submission service's TLS settings, read from the files again when they changed; None
    /// (no STARTTLS) when none are set or they cannot be used.
    fn submission_tls(&mut self) -> Option<std::sync::Arc<rustls::ServerConfig>> {
        let files = gucs::submission_tls()?;
        let stamp = |p: &str| std::fs::metadata(p).and_then(|m| m.modified()).ok();
        let seen = (files.clone(), stamp(&files.0), stamp(&files.1));
        if let Some((at, tls)) = &self.tls {
            if *at == seen {
                return tls.clone();
            }
        }
        let tls = match api_http::tls_config(&files.0, &files.1) {
            Ok(c) => Some(std::sync::Arc::new(c)),
            Err(e) => {
                warning!("pg_email listener: the submission service offers no STARTTLS: {e}");
                None
            }
        };
        self.tls = Some((seen, tls.clone()));
        tls
    }

    fn flush_logs(&self) {
        for line in self.state.logs.borrow_mut().drain(..) {
            log!("{line}");
        }
    }
}

/// Accepts on `listener`; never ready without one.
async fn accept(listener: Option<&tokio::net::TcpListener>) -> std::io::Result<(tokio::net::TcpStream, SocketAddr)> {
    match listener {
        Some(l) => l.accept().await,
        None => std::future::pending().await,
    }
}

/// Serves one SMTP or LMTP connection (the client's EHLO or LHLO says which), or one submission
/// connection; each DATA is answered after the transaction that stored the message committed.
fn serve_smtp(state: Rc<State>, stream: tokio::net::TcpStream, peer: SocketAddr, submission: bool) -> Connection {
    let _ = stream.set_nodelay(true);
    Box::pin(async move {
        state.open_connections.set(state.open_connections.get() + 1);
        let cfg = if submission { state.submission.borrow().clone() } else { state.smtp.borrow().clone() };
        let submit_state = state.clone();
        let submit = move |envelope: smtp::Envelope| {
            let state = submit_state.clone();
            async move {
                if submission {
                    return api_http::submit(&state, envelope).await;
                }
                match state.ask(Job::Inbound(Box::new(envelope))).await {
                    Answer::Stored(_) => smtp::Stored::Ok,
                    Answer::Refused(why) => smtp::Stored::Refused(why),
                    _ => smtp::Stored::Failed,
                }
            }
        };
        let login_state = state.clone();
        let authenticate = move |user: &str, password: &str, ip| api_http::login(&login_state, user, password, ip);
        smtp::serve(stream, peer, cfg, submit, authenticate).await;
        state.open_connections.set(state.open_connections.get().saturating_sub(1));
    })
}

async fn bind(addr: SocketAddr) -> std::io::Result<tokio::net::TcpListener> {
    let socket = if addr.is_ipv4() { tokio::net::TcpSocket::new_v4()? } else { tokio::net::TcpSocket::new_v6()? };
    socket.set_reuseaddr(true)?;
    socket.bind(addr)?;
    socket.listen(1024)
}

/// Serves one connection until it closes (keep-alive, header timeout, no HTTP/2).
fn serve(state: Rc<State>, stream: tokio::net::TcpStream, peer: SocketAddr) -> Connection {
    let _ = stream.set_nodelay(true);
    Box::pin(async move {
        state.open_connections.set(state.open_connections.get() + 1);
        let service_state = state.clone();
        let service = hyper::service::service_fn(move |req| http::handle(service_state.clone(), peer, req));
        let conn = hyper::server::conn::http1::Builder::new()
            .timer(hyper_util::rt::TokioTimer::new())
            .header_read_timeout(Duration::from_secs(10))
            .max_buf_size(64 * 1024)
            .max_header_size(64 * 1024)
            .keep_alive(true)
            .serve_connection(hyper_util::rt::TokioIo::new(stream), service);
        let _ = conn.await;
        state.open_connections.set(state.open_connections.get().saturating_sub(1));
    })
}

/// Stores rows through `email._record_events`, passed as JSON text (serialized once, no copy).
fn record(rows: &[&serde_json::Value]) -> i64 {
    let text = serde_json::to_string(rows).unwrap_or_else(|e| pgrx::error!("{e}"));
    Spi::get_one_with_args::<i32>(RECORD, &[text.as_str().into()]).unwrap_or_else(|e| pgrx::error!("{e}")).unwrap_or(0)
        as i64
}

/// Parses, classifies and stores one received message; Err: it is refused (the reason goes to
/// the SMTP client).
fn inbound(envelope: &smtp::Envelope, keys: &tracking::Keys) -> Result<i64, String> {
    let mail_from = (!envelope.mail_from.is_empty()).then_some(envelope.mail_from.as_str());
    let parsed = crate::inbound::parse(&envelope.raw, &envelope.rcpt_to, Some(crate::inbound::row::UNSUBSCRIBE_PREFIX))
        .map_err(|e| format!("554 5.6.0 the message cannot be parsed: {e}"))?;
    let named = crate::inbound::row::return_of(&envelope.rcpt_to, gucs::bounce_domain().as_deref(), keys);
    let row = crate::inbound::row::row(&parsed, mail_from, &envelope.rcpt_to, named);
    let text = serde_json::to_string(&row).map_err(|e| format!("554 5.6.0 the message cannot be stored: {e}"))?;
    let id = Spi::get_one_with_args::<i64>(RECORD_INBOUND, &[text.as_str().into(), envelope.raw.as_slice().into()])
        .unwrap_or_else(|e| pgrx::error!("{e}"))
        .unwrap_or(0);
    Ok(id)
}

/// The address and topic an unsubscribe link of message `id` names.
fn lookup(id: i64) -> Option<(String, Option<String>)> {
    match Spi::get_two_with_args::<String, String>(LOOKUP, &[id.into()]) {
        Ok((Some(address), topic)) => Some((address, topic)),
        _ => None,
    }
}

fn save_certificate(url: &str, pem: &str) {
    if let Err(e) = Spi::run_with_args(SAVE_CERTIFICATE, &[url.into(), pem.into()]) {
        pgrx::error!("{e}");
    }
}
