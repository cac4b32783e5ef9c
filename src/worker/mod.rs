//! The delivery worker. `init` runs in the postmaster from `_PG_init`: it reserves shared memory
//! and registers `pg_email.workers` background workers. Each worker process owns one
//! current-thread tokio runtime. Its main thread alone talks to Postgres: it claims rows in a
//! short transaction, builds the messages, hands them to the runtime as futures, drives the
//! runtime in bounded slices (so signals are seen within milliseconds), and records finished
//! sends in batches. Futures get plain values, never Postgres pointers.

pub mod queue;
pub mod wake;

use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::rc::Rc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use futures_util::stream::{FuturesUnordered, StreamExt};
use pgrx::bgworkers::{BackgroundWorker, BackgroundWorkerBuilder, SignalWakeFlags};
use pgrx::pg_shmem_init;
use pgrx::prelude::*;
use wake::SHARED;

use crate::deliver::outcome::{self, Plan, Policy};
use crate::deliver::{self, dsn, Delivery, Outcome, Outgoing, Reply, Transport};
use crate::gucs;

/// Called from `_PG_init`.
pub fn init() {
    pg_shmem_init!(SHARED);
    let n = gucs::workers().clamp(0, wake::MAX_WORKERS as i32);
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

type Sending = Pin<Box<dyn Future<Output = Outcome>>>;

/// A job on its way: what the recording step needs besides the outcome.
struct InFlight {
    rcpts: Vec<String>,
    envelope_from: String,
}

struct Route {
    transport: Rc<Transport>,
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
    let local = Rc::new(std::sync::atomic::AtomicU64::new(0));
    Rc::new(move || {
        let now = deliver::rate::monotonic_ns();
        let wait = match wake::rate_slot(key) {
            Some(cell) => deliver::rate::reserve(cell, now, interval),
            None => deliver::rate::reserve(&local, now, interval),
        };
        Duration::from_nanos(wait)
    })
}

struct Worker {
    slot: i32,
    rt: tokio::runtime::Runtime,
    sending: FuturesUnordered<Sending>,
    in_flight: HashMap<i64, InFlight>,
    routes: HashMap<String, Route>,
    routes_version: String,
    done: Vec<(Outcome, Option<InFlight>)>,
    state: u32,
    templates: std::sync::Arc<crate::render::Library>,
    templates_version: String,
}

fn slot_of(i: i32) -> Option<&'static wake::Slot> {
    wake::shared().and_then(|s| s.slots.get(i as usize))
}

fn now_ts() -> i64 {
    unsafe { pg_sys::GetCurrentTimestamp() }
}

/// Blocks every signal on the calling thread; used on runtime threads and around `block_on`, so
/// that Postgres' handlers only ever run on the main thread.
fn block_signals() -> libc::sigset_t {
    unsafe {
        let mut all: libc::sigset_t = std::mem::zeroed();
        let mut old: libc::sigset_t = std::mem::zeroed();
        libc::sigfillset(&mut all);
        libc::pthread_sigmask(libc::SIG_BLOCK, &all, &mut old);
        old
    }
}

fn restore_signals(old: libc::sigset_t) {
    unsafe {
        libc::pthread_sigmask(libc::SIG_SETMASK, &old, std::ptr::null_mut());
    }
}

#[pg_guard]
#[unsafe(no_mangle)]
pub extern "C-unwind" fn pg_email_worker_main(arg: pg_sys::Datum) {
    let slot = unsafe { i32::from_datum(arg, false) }.unwrap_or(0);
    BackgroundWorker::attach_signal_handlers(SignalWakeFlags::SIGHUP | SignalWakeFlags::SIGTERM);
    BackgroundWorker::connect_worker_to_spi(Some(&gucs::database()), None);

    let rt = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .max_blocking_threads(2)
        .on_thread_start(|| {
            block_signals();
        })
        .build()
    {
        Ok(rt) => rt,
        Err(e) => pgrx::error!("pg_email worker: cannot start its runtime: {e}"),
    };
    if let Some(s) = slot_of(slot) {
        s.pid.store(unsafe { pg_sys::MyProcPid }, Ordering::Relaxed);
        s.latch.store(unsafe { pg_sys::MyLatch } as usize, Ordering::Release);
        s.started_at.store(now_ts(), Ordering::Relaxed);
        s.in_flight.store(0, Ordering::Relaxed);
    }
    let mut w = Worker {
        slot,
        rt,
        sending: FuturesUnordered::new(),
        in_flight: HashMap::new(),
        routes: HashMap::new(),
        routes_version: String::new(),
        done: Vec::new(),
        state: u32::MAX,
        templates: Default::default(),
        templates_version: String::new(),
    };
    log!("pg_email worker {slot} started in database \"{}\"", gucs::database());
    w.run();
    if let Some(s) = slot_of(slot) {
        s.latch.store(0, Ordering::Release);
        s.pid.store(0, Ordering::Relaxed);
        s.state.store(0, Ordering::Relaxed);
        s.in_flight.store(0, Ordering::Relaxed);
    }
    log!("pg_email worker {slot} stopped");
    // Exit code 1: the postmaster restarts the worker after its restart time (unless the server
    // itself is shutting down), so pg_terminate_backend() acts as a restart, never a stop.
    unsafe { pg_sys::proc_exit(1) };
}

/// The message as fields for an HTTP provider; a retry for some recipients names only those.
fn http_fields(m: &crate::message::Stored, job: &queue::Job) -> Result<deliver::http::Fields, crate::message::FieldError> {
    use crate::message::{parse_mailbox, parse_mailboxes, stored_list};
    let keep = |list: Vec<lettre::message::Mailbox>| -> Vec<lettre::message::Mailbox> {
        match &job.pending {
            Some(p) => list.into_iter().filter(|mb| p.iter().any(|x| x.eq_ignore_ascii_case(&mb.email.to_string()))).collect(),
            None => list,
        }
    };
    let ascii = |mb: lettre::message::Mailbox| lettre::message::Mailbox::new(mb.name, crate::message::ascii_address(&mb.email));
    Ok(deliver::http::Fields {
        from: Some(ascii(parse_mailbox("sender", &m.sender)?)),
        to: keep(stored_list("recipients", &m.recipients)?),
        cc: keep(stored_list("cc", &m.cc)?),
        bcc: keep(stored_list("bcc", &m.bcc)?),
        reply_to: match &m.reply_to {
            Some(r) => parse_mailboxes("reply_to", r)?.into_iter().map(ascii).collect(),
            None => Vec::new(),
        },
        subject: m.subject.clone(),
        text: m.body.clone(),
        html: m.html.clone(),
        headers: m.headers.clone(),
        attachments: m.attachments.clone(),
        tags: job.tags.clone(),
        metadata: job.metadata.clone(),
        message_id: m.message_id.clone(),
    })
}

impl Worker {
    fn set_state(&mut self, state: u32, activity: &str) {
        if let Some(s) = slot_of(self.slot) {
            s.in_flight.store(self.in_flight.len() as u32, Ordering::Relaxed);
            s.last_activity.store(now_ts(), Ordering::Relaxed);
            s.state.store(state, Ordering::Relaxed);
        }
        if state != self.state {
            self.state = state;
            if let Ok(c) = std::ffi::CString::new(format!("pg_email: {activity}")) {
                let st = if state == 3 { pg_sys::BackendState::STATE_RUNNING } else { pg_sys::BackendState::STATE_IDLE };
                unsafe { pg_sys::pgstat_report_activity(st, c.as_ptr()) };
            }
        }
    }

    /// Waits on the latch; false when the worker must stop.
    fn wait(&mut self, timeout: Duration) -> bool {
        let alive = BackgroundWorker::wait_latch(Some(timeout));
        if BackgroundWorker::sighup_received() {
            unsafe { pg_sys::ProcessConfigFile(pg_sys::GucContext::PGC_SIGHUP) };
        }
        alive
    }

    fn run(&mut self) {
        // Wait quietly until the extension exists in the configured database.
        while !queue::extension_ready() {
            self.set_state(4, "waiting for CREATE EXTENSION pg_email");
            if !self.wait(Duration::from_secs(1)) {
                return;
            }
        }
        queue::configure_session();
        let released = queue::reap(Some(self.slot));
        if released > 0 {
            log!("pg_email worker {}: requeued {released} messages left claimed by its previous run", self.slot);
        }
        self.reload_routes(true);

        let mut maybe_due = true;
        let mut backlog = false;
        let mut last_tick = Instant::now();
        let mut last_purge = Instant::now();
        loop {
            let poll = gucs::poll_interval();
            let tick = last_tick.elapsed() >= poll;
            if tick {
                last_tick = Instant::now();
                maybe_due = true;
                let reaped = queue::reap(None);
                if reaped > 0 {
                    log!("pg_email worker {}: requeued {reaped} messages whose lease expired", self.slot);
                }
                self.reload_routes(false);
                if let Some(keep) = gucs::retention() {
                    if last_purge.elapsed() >= Duration::from_secs(60) {
                        last_purge = Instant::now();
                        queue::purge_older_than(keep.as_secs_f64());
                    }
                }
            }
            if wake::shared().is_some_and(|s| s.pending.swap(false, Ordering::AcqRel)) {
                maybe_due = true;
            }

            // Refill free send slots, in batches worth a transaction.
            let max = gucs::max_in_flight();
            let free = max.saturating_sub(self.in_flight.len());
            let worth = self.in_flight.is_empty() || free >= (max / 4).clamp(1, gucs::batch_size());
            if maybe_due && free > 0 && worth && !gucs::paused() {
                let want = free.min(gucs::batch_size());
                let jobs = queue::claim(want, gucs::lease().as_secs_f64() * 1000.0, self.slot, backlog);
                maybe_due = jobs.len() == want;
                backlog = maybe_due;
                if jobs.iter().any(|j| j.template.is_some()) {
                    self.reload_templates();
                }
                // A transport added since the last tick: look once per batch, not per message.
                if jobs.iter().any(|j| !self.routes.contains_key(&j.transport)) {
                    self.reload_routes(true);
                }
                for job in jobs {
                    self.start(job);
                }
            }

            if self.sending.is_empty() && self.done.is_empty() {
                self.set_state(2, "idle");
                let mut sleep = poll.saturating_sub(last_tick.elapsed());
                if !maybe_due && !gucs::paused() {
                    if let Some(ms) = queue::next_due_ms() {
                        sleep = sleep.min(Duration::from_secs_f64(ms / 1000.0));
                    }
                }
                if !self.wait(sleep.max(Duration::from_millis(1))) {
                    break;
                }
                continue;
            }

            self.set_state(3, "sending");
            self.drive(Duration::from_millis(5));
            self.record();
            if !self.wait(Duration::ZERO) {
                break;
            }
        }
        self.shutdown();
    }

    /// Rebuilds the transports when the table changed (or when forced).
    fn reload_routes(&mut self, force: bool) {
        let version = queue::transports_version();
        if !force && version == self.routes_version {
            return;
        }
        self.routes_version = version;
        let mut routes = HashMap::new();
        for row in queue::load_transports() {
            let built = dsn::parse(&row.dsn).map_err(|e| e.0).and_then(|d| Transport::new(&d).map(|t| (t, d.rate)));
            match built {
                Ok((t, rate)) => {
                    let pacer = rate.map(|r| pacer(&row.name, r));
                    routes.insert(row.name, Route { transport: Rc::new(t), fallback: row.fallback, pacer });
                }
                Err(e) => warning!("pg_email: transport \"{}\" cannot be used: {e}", row.name),
            }
        }
        self.routes = routes;
    }

    /// Re-reads the templates (layouts and partials) when they changed.
    fn reload_templates(&mut self) {
        let version = queue::templates_version();
        if version != self.templates_version {
            self.templates = std::sync::Arc::new(queue::load_templates());
            self.templates_version = version;
        }
    }

    /// Builds one claimed message and starts sending it.
    fn start(&mut self, job: queue::Job) {
        let failed = |reply: String| Outcome {
            id: job.id,
            attempt: job.attempt,
            transport: job.transport.clone(),
            duration: Duration::ZERO,
            delivery: Delivery::Permanent { reply: Reply::new(None, reply), rejected: Vec::new() },
        };
        let Some(route) = self.routes.get(&job.transport) else {
            let o = failed(format!("transport \"{}\" does not exist or cannot be built", job.transport));
            self.done.push((o, None));
            return;
        };
        let mut stored = job.stored.clone();
        if let Some((name, version, data)) = &job.template {
            let Some(pinned) = &job.pinned else {
                let o = failed(format!("template \"{name}\" version {version} no longer exists"));
                self.done.push((o, None));
                return;
            };
            let limits = crate::render::Limits { fuel: gucs::template_fuel(), max_size: gucs::max_message_size() };
            // Rendering is pure Rust on this thread; a panic in it must not take the worker down.
            let rendered = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                crate::render::render(name, pinned, &self.templates, data, limits)
            }))
            .unwrap_or_else(|_| {
                Err(crate::render::RenderError::Failed { template: name.clone(), part: "any", message: "the template engine panicked".into() })
            });
            match rendered {
                Ok(p) => {
                    stored.subject = p.subject;
                    stored.body = p.body;
                    stored.html = p.html;
                }
                Err(e) => {
                    let o = failed(format!("rendering failed: {e}"));
                    self.done.push((o, None));
                    return;
                }
            }
        }
        let built = match crate::message::build(&stored) {
            Ok(b) => b,
            Err(e) => {
                let o = failed(format!("the stored message cannot be built: {e}"));
                self.done.push((o, None));
                return;
            }
        };
        let to: Vec<lettre::Address> = match &job.pending {
            Some(p) => built.to.into_iter().filter(|a| p.iter().any(|x| x.eq_ignore_ascii_case(&a.to_string()))).collect(),
            None => built.to,
        };
        let fields = if route.transport.is_http() {
            match http_fields(&stored, &job) {
                Ok(f) => Some(Rc::new(f)),
                Err(e) => {
                    let o = failed(format!("the stored message cannot be built: {e}"));
                    self.done.push((o, None));
                    return;
                }
            }
        } else {
            None
        };
        let out = Outgoing {
            id: job.id,
            attempt: job.attempt,
            from: built.from.clone(),
            to: to.clone(),
            raw: Rc::new(built.raw),
            message_id: job.stored.message_id.clone(),
            fields,
        };
        self.in_flight.insert(
            job.id,
            InFlight { rcpts: to.iter().map(|a| a.to_string()).collect(), envelope_from: built.from.to_string() },
        );
        self.sending.push(Box::pin(deliver::timed(job.transport.clone(), route.transport.clone(), route.pacer.clone(), out)));
    }

    /// Runs the runtime for up to `slice`, collecting finished sends, and returns early when
    /// nothing is left in flight or a batch is complete. Signals are blocked meanwhile and taken
    /// as soon as it returns.
    fn drive(&mut self, slice: Duration) {
        let sending = &mut self.sending;
        let max = gucs::batch_size();
        let old = block_signals();
        let finished = self.rt.block_on(async {
            let deadline = tokio::time::Instant::now() + slice;
            let mut out = Vec::new();
            while let Ok(Some(o)) = tokio::time::timeout_at(deadline, sending.next()).await {
                out.push(o);
                if out.len() >= max {
                    break;
                }
            }
            out
        });
        restore_signals(old);
        for o in finished {
            let f = self.in_flight.remove(&o.id);
            self.done.push((o, f));
        }
    }

    /// Writes every finished send in one transaction.
    fn record(&mut self) {
        if self.done.is_empty() {
            return;
        }
        let policy = Policy { max_attempts: gucs::max_attempts(), retry_base: gucs::retry_base(), retry_max: gucs::retry_max() };
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
            plans.push(outcome::plan(&o, &rcpts, fallback.as_deref(), &policy));
        }
        queue::complete(&plans, &captured);
        if let Some(s) = slot_of(self.slot) {
            for p in &plans {
                match p.update.status {
                    "sent" => s.sent.fetch_add(1, Ordering::Relaxed),
                    "queued" => s.deferred.fetch_add(1, Ordering::Relaxed),
                    "bounced" => s.bounced.fetch_add(1, Ordering::Relaxed),
                    _ => s.failed.fetch_add(1, Ordering::Relaxed),
                };
            }
        }
        self.set_state(3, "sending");
    }

    /// Stops taking work: lets sends in flight finish for a moment, records them, and puts the
    /// rest back in the queue.
    fn shutdown(&mut self) {
        self.set_state(0, "stopping");
        let deadline = Instant::now() + Duration::from_secs(2);
        while !self.sending.is_empty() && Instant::now() < deadline {
            self.drive(Duration::from_millis(50));
        }
        self.record();
        let left: Vec<i64> = self.in_flight.keys().copied().collect();
        self.sending = FuturesUnordered::new();
        self.in_flight.clear();
        queue::release(left);
    }
}
