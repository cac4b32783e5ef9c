//! The delivery worker. `init` runs in the postmaster from `_PG_init`: it reserves shared memory
//! and registers `pg_email.workers` background workers. Each worker process owns one tokio
//! runtime with one I/O thread. Its main thread alone talks to Postgres: it claims rows in a
//! short transaction, builds the messages, and spawns each send as a task on the I/O thread,
//! where SMTP sessions and HTTP requests go on while the main thread claims and records. The
//! main thread collects finished sends in bounded slices (so signals are seen within
//! milliseconds) and records them in batches. The same loop posts outbound webhook deliveries
//! (`hooks`), claimed apart from mail, and folds the email.stats rollup at its tick. Tasks get
//! plain values, never Postgres pointers, and touch shared memory only through atomics.

pub mod hooks;
pub mod queue;

use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::rc::Rc;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures_util::stream::{FuturesUnordered, StreamExt};
use futures_util::FutureExt;
use pgrx::bgworkers::{BackgroundWorker, BackgroundWorkerBuilder, SignalWakeFlags};
use pgrx::prelude::*;

use crate::bgw::{block_signals, now_ts, restore_signals};
use crate::deliver::outcome::{self, Plan, Policy};
use crate::deliver::{self, dsn, Delivery, Outcome, Outgoing, Reply, Transport};
use crate::shmem::{self, WorkerState};
use crate::{gucs, tracking};

/// Called from `_PG_init`, after `shmem::init`.
pub fn init() {
    let n = gucs::workers().clamp(0, shmem::MAX_WORKERS as i32);
    for i in 0..n {
        BackgroundWorkerBuilder::new(&format!("pg_email worker {i}"))
            .set_type("pg_email worker")
            .set_library("pg_email")
            .set_function("pg_email_worker_main")
            .set_argument(i.into_datum())
            .enable_spi_access()
            .set_restart_time(Some(Duration::from_secs(2)))
            .load();
    }
}

/// The extension version this library implements; the worker serves only a schema of it.
const LIBRARY_VERSION: &str = env!("CARGO_PKG_VERSION");
/// How often a worker folds pending receipts into the email.stats rollup (at its tick).
const STATS_FOLD_EVERY: Duration = Duration::from_secs(2);

/// A send's task as the main thread awaits it: None when the worker stopped it at shutdown.
type Sending = Pin<Box<dyn Future<Output = Option<Outcome>>>>;

/// A job on its way: what the recording step needs besides the outcome.
struct InFlight {
    /// Stops the send's task when the worker puts its message back in the queue.
    task: tokio::task::AbortHandle,
    rcpts: Vec<String>,
    envelope_from: String,
    /// Template mail: what it was rendered to, written back to the row with the outcome.
    rendered: Option<crate::render::Parts>,
}

struct Route {
    transport: Arc<Transport>,
    fallback: Option<String>,
    pacer: Option<deliver::Pacer>,
}

/// A pacer for a `rate=` cap, shared with every worker through shared memory.
fn pacer(name: &str, rate: dsn::Rate) -> deliver::Pacer {
    let mut key: u64 = 0xcbf2_9ce4_8422_2325;
    for b in format!("{name}/{}/{}", rate.count, rate.per.as_nanos()).bytes() {
        key = (key ^ b as u64).wrapping_mul(0x100_0000_01b3);
    }
    let interval = (rate.per.as_nanos() / rate.count.max(1) as u128) as u64;
    // The shared cell is found here, on the main thread; the closure runs in send tasks on the
    // I/O thread and only touches that atomic in shared memory (or a local one without it).
    let shared = shmem::rate_slot(key);
    let local = std::sync::atomic::AtomicU64::new(0);
    Arc::new(move || {
        let cell = shared.unwrap_or(&local);
        Duration::from_nanos(deliver::rate::reserve(cell, deliver::rate::monotonic_ns(), interval))
    })
}

struct Worker {
    slot: i32,
    rt: tokio::runtime::Runtime,
    sending: FuturesUnordered<Sending>,
    in_flight: HashMap<i64, InFlight>,
    routes: HashMap<String, Route>,
    routes_version: String,
    /// The shared configuration generation the routes were last checked at.
    config_generation: u64,
    /// Transports that exist but cannot be built, with the reason (for the receipts).
    unusable: HashMap<String, String>,
    done: Vec<(Outcome, Option<InFlight>)>,
    /// The state last reported to pg_stat_activity (None before the first report).
    state: Option<WorkerState>,
    templates: std::sync::Arc<crate::render::Library>,
    /// The tracking keys, read at start and whenever the configuration generation moves.
    keys: Rc<tracking::Keys>,
    /// The DKIM keys, parsed again only when their fingerprint changes.
    dkim: Rc<crate::dkim::Signers>,
    dkim_version: Option<String>,
    /// Outbound webhook deliveries in flight.
    hooks: hooks::Hooks,
    /// Where the outbox is (on Citus: this worker's shards), read every poll interval.
    outbox: queue::Outbox,
}

#[pg_guard]
#[unsafe(no_mangle)]
pub extern "C-unwind" fn pg_email_worker_main(arg: pg_sys::Datum) {
    // SAFETY: the postmaster passes the Int32 datum set with `set_argument` in `init`.
    let slot = unsafe { i32::from_datum(arg, false) }.unwrap_or(0);
    BackgroundWorker::attach_signal_handlers(SignalWakeFlags::SIGHUP | SignalWakeFlags::SIGTERM);
    BackgroundWorker::connect_worker_to_spi(Some(&gucs::database()), None);

    let rt = match crate::bgw::runtime_with_io_thread() {
        Ok(rt) => rt,
        Err(e) => pgrx::error!("pg_email worker: cannot start its runtime: {e}"),
    };
    if let Some(s) = shmem::slot(slot) {
        // SAFETY: MyProcPid and MyLatch are set by Postgres before a background worker's main
        // function runs, and MyLatch stays valid for the life of the process; the latch is
        // unpublished below before the process exits.
        let (pid, latch) = unsafe { (pg_sys::MyProcPid, pg_sys::MyLatch) };
        s.pid.store(pid, Ordering::Relaxed);
        s.latch.store(latch as usize, Ordering::Release);
        s.started_at.store(now_ts(), Ordering::Relaxed);
        s.in_flight.store(0, Ordering::Relaxed);
        s.set_state(WorkerState::Starting);
    }
    let mut w = Worker {
        slot,
        rt,
        sending: FuturesUnordered::new(),
        in_flight: HashMap::new(),
        routes: HashMap::new(),
        routes_version: String::new(),
        config_generation: 0,
        unusable: HashMap::new(),
        done: Vec::new(),
        state: None,
        templates: Default::default(),
        keys: Rc::new(tracking::Keys::new(Vec::new())),
        dkim: Rc::default(),
        dkim_version: None,
        hooks: hooks::Hooks::default(),
        outbox: queue::Outbox::Local,
    };
    log!("pg_email worker {slot} started in database \"{}\"", gucs::database());
    w.run();
    if let Some(s) = shmem::slot(slot) {
        s.latch.store(0, Ordering::Release);
        s.pid.store(0, Ordering::Relaxed);
        s.set_state(WorkerState::Stopped);
        s.in_flight.store(0, Ordering::Relaxed);
    }
    log!("pg_email worker {slot} stopped");
    // Exit code 1: the postmaster restarts the worker after its restart time (unless the server
    // itself is shutting down), so pg_terminate_backend() acts as a restart, never a stop.
    // SAFETY: proc_exit runs Postgres' exit callbacks and never returns; no Rust value that needs
    // dropping is alive here but the runtime, whose threads are about to end with the process.
    unsafe { pg_sys::proc_exit(1) };
}

/// What signs the links of outgoing mail: the tracking keys and the listener's public URL.
struct Links {
    keys: Rc<tracking::Keys>,
    /// pg_email.public_url (None: no links can be made).
    base: Option<String>,
    /// pg_email.bounce_domain (None: no VERP return path, no unsubscribe mailto).
    bounce_domain: Option<String>,
}

impl Links {
    fn url(&self, route: &str, id: i64, single: bool, kind: tracking::Kind, url: Option<String>) -> Option<String> {
        let base = self.base.as_ref()?;
        let token = self.keys.sign(&tracking::Claims { kind, message_id: id, single, url })?;
        Some(format!("{base}/{route}/{token}"))
    }

    /// `bounce+TOKEN@bounce_domain` (or `unsubscribe+...`): the VERP return path names the
    /// message, and its recipient when it has one; a message with several recipients has one
    /// return path, and the reports name the recipient.
    fn return_address(&self, id: i64, single: bool, unsubscribe: bool) -> Option<String> {
        let domain = self.bounce_domain.as_ref()?;
        let r = tracking::Return { unsubscribe, message_id: id, recipient: single.then_some(0) };
        let token = self.keys.return_token(&r)?;
        Some(format!("{}+{token}@{domain}", if unsubscribe { "unsubscribe" } else { "bounce" }))
    }

    /// The unsubscribe link of a message with one recipient.
    fn unsubscribe(&self, id: i64, stored: &crate::message::Stored) -> Option<String> {
        single_recipient(stored).then(|| self.url("u", id, true, tracking::Kind::Unsubscribe, None)).flatten()
    }
}

fn single_recipient(stored: &crate::message::Stored) -> bool {
    stored.recipients.len() + stored.cc.len() + stored.bcc.len() == 1
}

/// Adds what the message asked for at enqueue: a List-Unsubscribe header (one recipient only,
/// and not when the caller set their own), tracked links and the open pixel in the HTML part.
fn decorate(stored: &mut crate::message::Stored, id: i64, track: queue::Track, links: &Links) -> Result<(), String> {
    let single = single_recipient(stored);
    let unsubscribe = links.unsubscribe(id, stored);
    if track.list_unsubscribe && !stored.headers.iter().any(|(k, _)| k.eq_ignore_ascii_case("list-unsubscribe")) {
        if let Some(u) = &unsubscribe {
            let value = match links.return_address(id, true, true) {
                Some(mailto) => format!("<{u}>, <mailto:{mailto}>"),
                None => format!("<{u}>"),
            };
            stored.headers.push(("List-Unsubscribe".into(), value));
            stored.headers.push(("List-Unsubscribe-Post".into(), "List-Unsubscribe=One-Click".into()));
        }
    }
    if !(track.opens || track.clicks) {
        return Ok(());
    }
    let Some(html) = &stored.html else { return Ok(()) };
    let click = |url: &str| -> Option<String> {
        if unsubscribe.as_deref() == Some(url) {
            return None;
        }
        links.url("c", id, single, tracking::Kind::Click, Some(url.to_string()))
    };
    let pixel = if track.opens { links.url("o", id, single, tracking::Kind::Open, None) } else { None };
    let clicks: Option<tracking::ClickTracker<'_>> = if track.clicks { Some(&click) } else { None };
    stored.html = Some(tracking::rewrite_html(html, clicks, pixel.as_deref()).map_err(|e| format!("tracking: {e}"))?);
    Ok(())
}

/// The stored message as it will be built: its template rendered (template mail), and a text
/// part derived for HTML-only mail.
fn rendered(
    job: &queue::Job,
    templates: &std::sync::Arc<crate::render::Library>,
    links: Option<&Links>,
) -> Result<crate::message::Stored, String> {
    let mut stored = job.stored.clone();
    if let Some((name, version, data)) = &job.template {
        let pinned =
            job.pinned.as_ref().ok_or_else(|| format!("template \"{name}\" version {version} no longer exists"))?;
        let limits = crate::render::Limits { fuel: gucs::template_fuel(), max_size: gucs::max_message_size() };
        // Templates get the message's unsubscribe link as `unsubscribe_url` (an empty string
        // when it has none: several recipients, or no public URL).
        let unsubscribe = links.and_then(|l| l.unsubscribe(job.id, &job.stored)).unwrap_or_default();
        let data = match data {
            serde_json::Value::Object(m) if !m.contains_key("unsubscribe_url") => {
                let mut m = m.clone();
                m.insert("unsubscribe_url".into(), unsubscribe.into());
                std::borrow::Cow::Owned(serde_json::Value::Object(m))
            }
            _ => std::borrow::Cow::Borrowed(data),
        };
        let p = crate::render::render(name, pinned, templates, &data, limits)
            .map_err(|e| format!("rendering failed: {e}"))?;
        stored.subject = p.subject;
        stored.body = p.body;
        stored.html = p.html;
    }
    // HTML-only mail gets a text part derived from the HTML, as template mail does: spam filters
    // score HTML-only mail worse, and text-only clients need something to show.
    if let (None, Some(html)) = (&stored.body, &stored.html) {
        stored.body = crate::render::html_to_text(html).ok();
    }
    Ok(stored)
}

/// Everything a send needs: the rendered message, built and signed when the transport carries
/// MIME (`dkim` is `Some`), its envelope (only the recipients still pending on a retry) and, for
/// HTTP providers, its fields.
fn prepare(
    job: &queue::Job,
    templates: &std::sync::Arc<crate::render::Library>,
    links: Option<&Links>,
    http: bool,
    dkim: Option<(&crate::dkim::Signers, bool)>,
) -> Result<(Outgoing, Option<crate::render::Parts>), String> {
    if let Some(raw) = &job.raw {
        return prepare_submitted(job, raw, links, http, dkim).map(|out| (out, None));
    }
    let mut stored = rendered(job, templates, links)?;
    // What is written back to a template message's row is what it rendered to, before links
    // are signed (they differ per attempt only in nothing, but the row stays readable).
    let parts = job.template.as_ref().map(|_| crate::render::Parts {
        subject: stored.subject.clone(),
        body: stored.body.clone(),
        html: stored.html.clone(),
    });
    if job.track != queue::Track::default() {
        match links {
            Some(l) => decorate(&mut stored, job.id, job.track, l)?,
            None => {
                return Err("tracking or List-Unsubscribe was asked for, but pg_email.public_url and \
                                pg_email.listen_address are both empty, or there is no tracking key"
                    .into())
            }
        }
    }
    // Providers that take fields build their own MIME: the message is checked as for building,
    // and not built.
    let built = match dkim {
        Some(dkim) => crate::message::build_signed(&stored, Some(dkim).filter(|(s, _)| !s.is_empty())),
        None => crate::message::unbuilt(&stored),
    }
    .map_err(|e| format!("the stored message cannot be built: {e}"))?;
    let pending = job.pending.as_deref();
    let to: Vec<lettre::Address> =
        built.to.into_iter().filter(|a| crate::message::is_pending(pending, a.as_ref())).collect();
    let fields = if http {
        let f = deliver::providers::Fields::from_stored(&stored, pending, job.tags.clone(), job.metadata.clone())
            .map_err(|e| format!("the stored message cannot be built: {e}"))?;
        Some(Arc::new(f))
    } else {
        None
    };
    // SMTP, file and capture mail gets the VERP return path when pg_email.bounce_domain is set
    // (provider APIs choose their own).
    let verp = if http { None } else { links.and_then(|l| l.return_address(job.id, single_recipient(&stored), false)) };
    let from = match verp.map(|v| v.parse::<lettre::Address>()) {
        Some(Ok(a)) => a,
        Some(Err(e)) => return Err(format!("the VERP return path is not an address: {e}")),
        None => built.from,
    };
    let out = Outgoing {
        id: job.id,
        attempt: job.attempt,
        from,
        to,
        raw: Arc::new(built.raw),
        message_id: job.stored.message_id.clone(),
        fields,
    };
    Ok((out, parts))
}

/// A message received by SMTP submission: its stored bytes as they are (Bcc already taken out,
/// Message-ID and Date added when it was stored), DKIM signed for the domain of its From field,
/// to the envelope recipients still pending.
fn prepare_submitted(
    job: &queue::Job,
    raw: &Arc<Vec<u8>>,
    links: Option<&Links>,
    http: bool,
    dkim: Option<(&crate::dkim::Signers, bool)>,
) -> Result<Outgoing, String> {
    if http {
        return Err("a message received by SMTP submission is delivered as it was submitted, which takes an \
                    smtp://, file:// or capture:// transport, not a provider's HTTP API"
            .into());
    }
    let address = |a: &str| {
        a.parse::<lettre::Address>()
            .map(|a| crate::message::ascii_address(&a))
            .map_err(|e| format!("the stored address {} is not valid: {e}", crate::message::show(a)))
    };
    let pending = job.pending.as_deref();
    let to = job
        .stored
        .recipients
        .iter()
        .filter(|a| crate::message::is_pending(pending, a))
        .map(|a| address(a))
        .collect::<Result<Vec<_>, _>>()?;
    let raw = match dkim.filter(|(s, _)| !s.is_empty()) {
        Some((signers, ses)) => {
            let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs());
            let from = crate::submission::from_address(raw).unwrap_or_default();
            Arc::new(crate::dkim::sign(raw.to_vec(), signers.for_address(&from), ses, now))
        }
        None => raw.clone(),
    };
    let verp = links.and_then(|l| l.return_address(job.id, single_recipient(&job.stored), false));
    let from = match verp {
        Some(v) => address(&v)?,
        None => address(&job.stored.sender)?,
    };
    Ok(Outgoing {
        id: job.id,
        attempt: job.attempt,
        from,
        to,
        raw,
        message_id: job.stored.message_id.clone(),
        fields: None,
    })
}

/// The outcome of a send that never reached the network: a message that cannot be prepared, or
/// a send whose task panicked.
fn unsent(id: i64, attempt: i32, transport: String, delivery: Delivery) -> Outcome {
    Outcome { id, attempt, transport, duration: Duration::ZERO, delivery }
}

impl Worker {
    fn set_state(&mut self, state: WorkerState, activity: &str) {
        if let Some(s) = shmem::slot(self.slot) {
            s.in_flight.store(self.in_flight.len() as u32, Ordering::Relaxed);
            s.last_activity.store(now_ts(), Ordering::Relaxed);
            s.set_state(state);
        }
        if self.state != Some(state) {
            self.state = Some(state);
            if let Ok(c) = std::ffi::CString::new(format!("pg_email: {activity}")) {
                let st = if state == WorkerState::Sending {
                    pg_sys::BackendState::STATE_RUNNING
                } else {
                    pg_sys::BackendState::STATE_IDLE
                };
                // SAFETY: called on the worker's main thread with a valid NUL-terminated string,
                // which pgstat copies into shared memory.
                unsafe { pg_sys::pgstat_report_activity(st, c.as_ptr()) };
            }
        }
    }

    /// Waits on the latch; false when the worker must stop.
    fn wait(&mut self, timeout: Duration) -> bool {
        let alive = BackgroundWorker::wait_latch(Some(timeout));
        if BackgroundWorker::sighup_received() {
            // SAFETY: re-reading the configuration file on the main thread outside any
            // transaction is what Postgres' own processes do on SIGHUP.
            unsafe { pg_sys::ProcessConfigFile(pg_sys::GucContext::PGC_SIGHUP) };
        }
        alive
    }

    fn run(&mut self) {
        // Wait quietly until the extension exists in the configured database, at the version of
        // this library: after a new build is installed and the server restarted, the schema is
        // the old one until ALTER EXTENSION pg_email UPDATE, and this worker's statements would
        // fail on it (a message sent but not recorded would be sent again).
        let mut told = None;
        loop {
            let installed = queue::extension_version();
            if installed.as_deref() == Some(LIBRARY_VERSION) {
                break;
            }
            let waiting = match &installed {
                None => "waiting for CREATE EXTENSION pg_email".to_string(),
                Some(v) => {
                    format!("waiting for ALTER EXTENSION pg_email UPDATE (installed {v}, library {LIBRARY_VERSION})")
                }
            };
            if installed.is_some() && told != installed {
                log!("pg_email worker {}: {waiting}", self.slot);
                told = installed.clone();
            }
            self.set_state(WorkerState::WaitingForDatabase, &waiting);
            if !self.wait(Duration::from_secs(1)) {
                return;
            }
        }
        queue::configure_session();
        self.outbox = queue::Outbox::read(self.slot, gucs::workers());
        let released = queue::reap(&self.outbox, Some(self.outbox.claimer(self.slot)));
        if released > 0 {
            log!("pg_email worker {}: requeued {released} messages left claimed by its previous run", self.slot);
        }
        self.reload_routes(true);
        self.reload_keys();

        let mut maybe_due = true;
        let mut backlog = false;
        let mut last_tick = Instant::now();
        let mut last_purge = Instant::now();
        let mut last_fold = Instant::now();
        loop {
            let poll = gucs::poll_interval();
            let tick = last_tick.elapsed() >= poll;
            if tick {
                last_tick = Instant::now();
                maybe_due = true;
                self.hooks.maybe_due = true;
                self.outbox = queue::Outbox::read(self.slot, gucs::workers());
                let reaped = queue::reap(&self.outbox, None);
                if reaped > 0 {
                    log!("pg_email worker {}: requeued {reaped} messages whose lease expired", self.slot);
                }
                self.reload_routes(false);
                // The receipts' trigger only queues what they count for; the counts behind
                // email.stats are brought up to date here, apart from any mail transaction.
                if last_fold.elapsed() >= STATS_FOLD_EVERY {
                    last_fold = Instant::now();
                    queue::fold_stats(self.slot);
                }
                if let Some(keep) = gucs::retention() {
                    if last_purge.elapsed() >= Duration::from_secs(60) {
                        last_purge = Instant::now();
                        queue::purge_older_than(keep.as_secs_f64());
                    }
                }
            }
            if shmem::shared().is_some_and(|s| s.pending.swap(false, Ordering::AcqRel)) {
                maybe_due = true;
            }
            // Mail and webhook deliveries are woken for apart: a commit that queued only mail
            // costs the workers no claim of deliveries (measured: with it, 4 sessions queueing
            // single messages got 0.4 of a plain INSERT's rate).
            if shmem::shared().is_some_and(|s| s.hooks_pending.swap(false, Ordering::AcqRel)) {
                self.hooks.maybe_due = true;
            }

            // Refill free send slots, in batches worth a transaction.
            let max = gucs::max_in_flight();
            let free = max.saturating_sub(self.in_flight.len());
            let worth = self.in_flight.is_empty() || free >= (max / 4).clamp(1, gucs::batch_size());
            if maybe_due && free > 0 && worth && !gucs::paused() {
                // A transport changed by a transaction that committed before this claim is used
                // for it: backends bump the generation at commit, after their change is visible.
                let generation = shmem::config_generation();
                if generation != self.config_generation {
                    self.config_generation = generation;
                    self.reload_routes(false);
                    self.reload_keys();
                }
                let want = free.min(gucs::batch_size());
                let lease_ms = gucs::lease().as_secs_f64() * 1000.0;
                let jobs = queue::claim(&self.outbox, want, lease_ms, self.outbox.claimer(self.slot), backlog);
                // Again after the claim: a backend bumps the generation during its transaction
                // too, so the reload above may have read the state before its commit while the
                // claim saw mail queued after it (a rotated tracking key, say). A change the
                // claim's rows can follow was bumped at its commit, before they were queued.
                let generation = shmem::config_generation();
                if generation != self.config_generation {
                    self.config_generation = generation;
                    self.reload_routes(false);
                    self.reload_keys();
                }
                maybe_due = jobs.len() == want;
                backlog = maybe_due;
                if jobs.iter().any(|j| j.template.is_some()) {
                    self.templates = queue::templates();
                }
                // A transport added since the last tick: look once per batch, not per message.
                if jobs.iter().any(|j| !self.routes.contains_key(&j.transport)) {
                    self.reload_routes(true);
                }
                for job in jobs {
                    self.start(job);
                }
            }
            // Webhook deliveries: answers recorded and due ones claimed apart from mail, each
            // webhook capped, so that neither waits for the other; while mail is backed up, mail
            // goes first (deliveries are claimed twice a second, and catch up after).
            self.hooks.cycle(self.slot, self.rt.handle(), backlog && !gucs::paused());

            if self.sending.is_empty() && self.done.is_empty() && !self.hooks.is_idle() {
                // Only webhook posts in flight: drive them until half have finished (at most
                // 2 ms), then look at the latch, so new mail never waits behind a slow endpoint;
                // the next turn records the answers and refills the slots.
                self.set_state(WorkerState::Sending, "sending webhooks");
                self.drive(Duration::from_millis(2));
                if !self.wait(Duration::ZERO) {
                    break;
                }
                continue;
            }
            if self.sending.is_empty() && self.done.is_empty() {
                if gucs::paused() {
                    self.set_state(WorkerState::Paused, "paused (pg_email.paused)");
                } else {
                    self.set_state(WorkerState::Idle, "idle");
                }
                let mut sleep = poll.saturating_sub(last_tick.elapsed());
                if !maybe_due && !gucs::paused() {
                    if let Some(ms) = queue::next_due_ms(&self.outbox) {
                        sleep = sleep.min(Duration::from_secs_f64(ms / 1000.0));
                    }
                }
                if !self.wait(sleep.max(Duration::from_millis(1))) {
                    break;
                }
                continue;
            }

            self.set_state(WorkerState::Sending, "sending");
            self.drive(Duration::from_millis(5));
            self.record();
            if !self.wait(Duration::ZERO) {
                break;
            }
        }
        self.shutdown();
    }

    /// What signs links now (None without a public URL).
    fn links(&self) -> Option<Rc<Links>> {
        if self.keys.is_empty() {
            return None;
        }
        Some(Rc::new(Links { keys: self.keys.clone(), base: gucs::public_url(), bounce_domain: gucs::bounce_domain() }))
    }

    /// Reads the tracking keys again, and the DKIM keys when they changed. A DKIM key that
    /// cannot be used is logged (never its contents) and its domain's mail goes unsigned by it.
    fn reload_keys(&mut self) {
        self.keys = Rc::new(tracking::Keys::new(queue::tracking_keys()));
        let version = queue::dkim_version();
        if self.dkim_version.as_ref() == Some(&version) {
            return;
        }
        self.dkim_version = Some(version);
        let (signers, problems) = crate::dkim::Signers::new(&queue::dkim_keys());
        for p in problems {
            warning!("pg_email worker {}: {p}", self.slot);
        }
        self.dkim = Rc::new(signers);
    }

    /// Rebuilds the transports when the table changed (or when forced).
    fn reload_routes(&mut self, force: bool) {
        let version = queue::transports_version();
        if !force && version == self.routes_version {
            return;
        }
        self.routes_version = version;
        let mut routes = HashMap::new();
        self.unusable.clear();
        for row in queue::load_transports() {
            let built = dsn::parse(&row.dsn)
                .map_err(deliver::TransportError::from)
                .and_then(|d| Transport::new(&d).map(|t| (t, d.rate)));
            match built {
                Ok((t, rate)) => {
                    let pacer = rate.map(|r| pacer(&row.name, r));
                    routes.insert(row.name, Route { transport: Arc::new(t), fallback: row.fallback, pacer });
                }
                Err(e) => {
                    warning!("pg_email: transport \"{}\" cannot be used: {e}", row.name);
                    self.unusable.insert(row.name, e.to_string());
                }
            }
        }
        self.routes = routes;
    }

    /// Builds one claimed message and starts sending it. A message that cannot be prepared
    /// fails for good, with the reason in its receipt.
    fn start(&mut self, job: queue::Job) {
        let Some(route) = self.routes.get(&job.transport) else {
            let reason = match self.unusable.get(&job.transport) {
                Some(e) => format!("transport \"{}\" cannot be used: {e}", job.transport),
                None => format!("transport \"{}\" does not exist", job.transport),
            };
            self.fail(&job, reason);
            return;
        };
        let (transport, pacer) = (route.transport.clone(), route.pacer.clone());
        // Rendering and building are pure Rust on this thread; a panic in them must not take
        // the worker down.
        let templates = &self.templates;
        let links = self.links();
        let dkim = transport.carries_mime().map(|ses| (&*self.dkim, ses));
        let prepared = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            prepare(&job, templates, links.as_deref(), transport.is_http(), dkim)
        }))
        .unwrap_or_else(|_| Err("preparing the message panicked".to_string()));
        match prepared {
            Ok((out, rendered)) => {
                let rcpts = out.to.iter().map(|a| a.to_string()).collect();
                let envelope_from = out.from.to_string();
                let (id, attempt, name) = (job.id, job.attempt, job.transport.clone());
                let task = self.rt.spawn(deliver::timed(name.clone(), transport, pacer, out));
                self.in_flight.insert(job.id, InFlight { task: task.abort_handle(), rcpts, envelope_from, rendered });
                // A send that panicked (a bug) is tried again later, like a lost connection.
                self.sending.push(Box::pin(async move {
                    match task.await {
                        Ok(o) => Some(o),
                        Err(e) if e.is_panic() => {
                            Some(unsent(id, attempt, name, Delivery::transient(Reply::new(None, "the send panicked"))))
                        }
                        Err(_) => None,
                    }
                }));
            }
            Err(reason) => self.fail(&job, reason),
        }
    }

    /// Records a permanent failure of `job` that happened before any send.
    fn fail(&mut self, job: &queue::Job, reason: String) {
        let delivery = Delivery::permanent(Reply::new(None, reason));
        self.done.push((unsent(job.id, job.attempt, job.transport.clone(), delivery), None));
    }

    /// Runs the runtime for up to `slice`, collecting finished sends and webhook posts, and
    /// returns early when half the sends have finished, or when no mail is left in flight (while mail is
    /// sent, webhook posts are collected as they finish). Signals are blocked meanwhile and taken
    /// as soon as it returns.
    fn drive(&mut self, slice: Duration) {
        let sending = &mut self.sending;
        let posting = &mut self.hooks.posting;
        // Back as soon as half the sends have finished (at most a batch): the other half keeps
        // the connections busy while this thread records the finished ones and claims more.
        // Waiting for a whole batch (or the slice) left them idle meanwhile: at the defaults (64
        // in flight) an SMTP drain went from 4,500 to 8,000 msg/s with this (README).
        let max = (sending.len() / 2).clamp(1, gucs::batch_size());
        let old = block_signals();
        let (finished, posted) = self.rt.block_on(async {
            let deadline = tokio::time::Instant::now() + slice;
            let (mut out, mut posted) = (Vec::new(), Vec::new());
            let hooks_only = sending.is_empty();
            let posting_at_start = posting.len();
            while !(sending.is_empty() && (posting.is_empty() || !hooks_only)) {
                tokio::select! {
                    Some(o) = sending.next(), if !sending.is_empty() => {
                        out.extend(o);
                        if out.len() >= max {
                            break;
                        }
                    }
                    Some(d) = posting.next(), if !posting.is_empty() => {
                        posted.push(d);
                        if posted.len() >= hooks::CLAIM_BATCH {
                            break;
                        }
                        if hooks_only && posted.len() * 2 >= posting_at_start {
                            // Half the posts are back: take what else finished, then go and
                            // refill the slots (one transaction records and claims them all).
                            while let Some(Some(d)) = posting.next().now_or_never() {
                                posted.push(d);
                            }
                            break;
                        }
                    }
                    _ = tokio::time::sleep_until(deadline) => break,
                }
            }
            (out, posted)
        });
        restore_signals(old);
        for o in finished {
            let f = self.in_flight.remove(&o.id);
            self.done.push((o, f));
        }
        for d in posted {
            self.hooks.finish(d);
        }
    }

    /// Writes every finished send in one transaction.
    fn record(&mut self) {
        if self.done.is_empty() {
            return;
        }
        let policy =
            Policy { max_attempts: gucs::max_attempts(), retry_base: gucs::retry_base(), retry_max: gucs::retry_max() };
        let mut plans: Vec<Plan> = Vec::with_capacity(self.done.len());
        let mut captured = Vec::new();
        for (o, f) in self.done.drain(..) {
            let rcpts = f.as_ref().map(|f| f.rcpts.clone()).unwrap_or_default();
            let fallback = self.routes.get(&o.transport).and_then(|r| r.fallback.clone());
            let fallback = fallback.filter(|fb| self.routes.contains_key(fb));
            if let (Delivery::Accepted { captured: Some(raw), .. }, Some(f)) = (&o.delivery, &f) {
                use base64::Engine;
                captured.push(queue::Captured {
                    message_id: o.id,
                    transport: o.transport.clone(),
                    envelope_from: f.envelope_from.clone(),
                    envelope_to: f.rcpts.clone(),
                    raw: base64::engine::general_purpose::STANDARD.encode(raw.as_slice()),
                });
            }
            let mut plan = outcome::plan(&o, &rcpts, fallback.as_deref(), &policy);
            if let Some(p) = f.and_then(|f| f.rendered) {
                (plan.update.subject, plan.update.body, plan.update.html) = (Some(p.subject), p.body, p.html);
            }
            plans.push(plan);
        }
        queue::complete(&self.outbox, &plans, &captured);
        if let Some(s) = shmem::slot(self.slot) {
            for p in &plans {
                match p.update.status {
                    outcome::Status::Sent => s.sent.fetch_add(1, Ordering::Relaxed),
                    outcome::Status::Queued => s.deferred.fetch_add(1, Ordering::Relaxed),
                    outcome::Status::Bounced => s.bounced.fetch_add(1, Ordering::Relaxed),
                    outcome::Status::Failed => s.failed.fetch_add(1, Ordering::Relaxed),
                };
            }
        }
        self.set_state(WorkerState::Sending, "sending");
    }

    /// Stops taking work: lets sends in flight finish for a moment, records them, and puts the
    /// rest back in the queue.
    fn shutdown(&mut self) {
        self.set_state(WorkerState::Stopping, "stopping");
        let deadline = Instant::now() + Duration::from_secs(2);
        while !(self.sending.is_empty() && self.hooks.posting.is_empty()) && Instant::now() < deadline {
            self.drive(Duration::from_millis(50));
        }
        // Stop the sends still going. One that finished before it was stopped is recorded; the
        // others' messages go back in the queue.
        for f in self.in_flight.values() {
            f.task.abort();
        }
        let deadline = Instant::now() + Duration::from_millis(500);
        while !self.sending.is_empty() && Instant::now() < deadline {
            self.drive(Duration::from_millis(50));
        }
        self.record();
        self.hooks.release(self.slot, self.rt.handle());
        let left: Vec<i64> = self.in_flight.keys().copied().collect();
        self.sending = FuturesUnordered::new();
        self.in_flight.clear();
        queue::release(left);
    }
}
