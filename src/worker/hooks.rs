//! Outbound webhook deliveries, run by each delivery worker beside its mail. The main thread
//! claims due rows of `email.webhook_deliveries` in a short transaction (at most
//! `pg_email.webhook_concurrency` in flight per webhook in this worker), turns each into a signed
//! POST (see `crate::outbound`) that runs as a task on the worker's I/O thread; the next turn's
//! transaction records the answers and claims more. A webhook that hangs holds only its own
//! slots: mail and the other webhooks go on. Postgres is only called from the main thread.

use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::time::{Duration, Instant};

use futures_util::stream::FuturesUnordered;
use pgrx::bgworkers::BackgroundWorker;
use pgrx::datum::DatumWithOid;
use pgrx::prelude::*;
use pgrx::spi::{SpiClient, SpiHeapTupleData};
use pgrx::JsonB;

use crate::outbound::{self, AllowList, Clients};
use crate::{deliver, gucs};

const ENABLED: &str = include_str!("../../sql/worker/hooks_enabled.sql");
const CLAIM: &str = include_str!("../../sql/worker/hooks_claim.sql");
const EVENTS: &str = include_str!("../../sql/worker/hooks_events.sql");
const ORPHANED: &str = include_str!("../../sql/worker/hooks_orphaned.sql");
const RECORD: &str = include_str!("../../sql/worker/hooks_record.sql");
const DISABLE: &str = include_str!("../../sql/worker/hooks_disable.sql");
const RELEASE: &str = include_str!("../../sql/worker/hooks_release.sql");
const ASYNC_COMMIT: &str = include_str!("../../sql/worker/hooks_async_commit.sql");

/// The most bytes of an answer's body kept in `last_error`.
const EXCERPT: usize = 500;
/// The most deliveries claimed in one transaction.
pub(super) const CLAIM_BATCH: usize = 256;
/// While mail is backed up, deliveries are claimed at most this often (each claim up to the
/// per-webhook caps): mail goes first, and the deliveries queued meanwhile go out after it.
const WHILE_MAIL_BACKED_UP: Duration = Duration::from_millis(500);

/// One claimed delivery, as read back.
struct Claimed {
    id: i64,
    webhook: String,
    url: String,
    secret: String,
    /// Attempts made before this one.
    attempts: i32,
    event: outbound::Event,
}

/// What one attempt came to.
pub(super) struct Done {
    id: i64,
    webhook: String,
    /// This attempt's number (1 for the first).
    attempt: i32,
    status: Option<u16>,
    outcome: outbound::Outcome,
}

type Posting = Pin<Box<dyn Future<Output = Done>>>;

/// A worker's webhook deliveries in flight and the clients that send them.
#[derive(Default)]
pub struct Hooks {
    clients: Option<(Clients, String, Duration)>,
    /// The settings clients could not be built with (warned about once).
    unusable: Option<(String, Duration)>,
    pub(super) posting: FuturesUnordered<Posting>,
    per_webhook: HashMap<String, usize>,
    /// The deliveries being posted, with what stops their task at shutdown.
    in_flight: Vec<(i64, tokio::task::AbortHandle)>,
    done: Vec<Done>,
    /// Deliveries may be due: claim at the next chance.
    pub maybe_due: bool,
    /// When deliveries were last claimed.
    last_claim: Option<Instant>,
}

impl Hooks {
    pub fn is_idle(&self) -> bool {
        self.posting.is_empty() && self.done.is_empty()
    }

    /// The clients for the current settings, built again when the allow list or the timeout
    /// changed. None when the allow list cannot be read or TLS cannot be set up: nothing is
    /// claimed then, and the reason is logged once per setting.
    fn clients(&mut self, slot: i32) -> Option<Clients> {
        let allow = gucs::webhook_allow_hosts().unwrap_or_default();
        let timeout = gucs::webhook_timeout();
        let stale = !matches!(&self.clients, Some((_, a, t)) if *a == allow && *t == timeout);
        if stale {
            self.clients = None;
            if self.unusable.as_ref() == Some(&(allow.clone(), timeout)) {
                return None;
            }
            let built = AllowList::parse(&allow)
                .map_err(|e| format!("pg_email.webhook_allow_hosts: {e}"))
                .and_then(|list| Clients::new(timeout, list).map_err(|e| format!("webhook clients: {e}")));
            match built {
                Ok(c) => {
                    self.clients = Some((c, allow, timeout));
                    self.unusable = None;
                }
                Err(e) => {
                    warning!("pg_email worker {slot}: {e}; no webhook is sent until this is fixed");
                    self.unusable = Some((allow, timeout));
                    return None;
                }
            }
        }
        self.clients.as_ref().map(|(c, _, _)| c.clone())
    }

    /// One short transaction: records the attempts that finished and, when deliveries may be
    /// due, claims them (those of webhooks below their cap) and starts posting them. While
    /// `mail_backed_up` (the worker's last mail claim was a full batch) they are claimed only
    /// every WHILE_MAIL_BACKED_UP.
    pub fn cycle(&mut self, slot: i32, rt: &tokio::runtime::Handle, mail_backed_up: bool) {
        let waiting = mail_backed_up && self.last_claim.is_some_and(|t| t.elapsed() < WHILE_MAIL_BACKED_UP);
        let claim_now = self.maybe_due && !waiting;
        if !claim_now && self.done.is_empty() {
            return;
        }
        let deferred = self.maybe_due && !claim_now;
        if claim_now {
            self.last_claim = Some(Instant::now());
        }
        self.maybe_due = false;
        let rows = self.rows(slot);
        let cap = gucs::webhook_concurrency();
        let clients = if claim_now { self.clients(slot) } else { None };
        let room = if clients.is_some() { CLAIM_BATCH.saturating_sub(self.posting.len()) } else { 0 };
        let lease_ms = gucs::lease().max(gucs::webhook_timeout() * 2).as_secs_f64() * 1000.0;
        let (names, counts): (Vec<String>, Vec<i32>) =
            self.per_webhook.iter().map(|(k, v)| (k.clone(), *v as i32)).unzip();
        // Each statement in a subtransaction: an error (a user trigger on the deliveries, say)
        // is logged and costs this turn only, never the worker (mail goes on).
        let claimed = BackgroundWorker::transaction(move || {
            let _ = Spi::run(ASYNC_COMMIT);
            if let Some(rows) = rows {
                let recorded = crate::subxact::run(|| {
                    Spi::connect_mut(|client| {
                        let (names, whys): (Vec<String>, Vec<String>) =
                            crate::api::run_prepared(client, RECORD, None, &[JsonB(rows).into()])
                                .filter_map(|r| Some((text(&r, "webhook")?, text(&r, "disable")?)))
                                .unzip();
                        if !names.is_empty() {
                            // Not a kept plan: Citus cannot plan a generic one over a reference table.
                            super::queue::spi(client.update(DISABLE, None, &[names.into(), whys.into()]));
                        }
                    })
                });
                if let Err(e) = recorded {
                    warning!("pg_email worker {slot}: recording webhook deliveries failed: {e}");
                }
            }
            if room == 0 {
                return Vec::new();
            }
            crate::subxact::run(|| Spi::connect_mut(|client| claim(client, names, counts, cap as i32, lease_ms, room)))
                .unwrap_or_else(|e| {
                    warning!("pg_email worker {slot}: claiming webhook deliveries failed: {e}");
                    Vec::new()
                })
        });
        // A full batch: more may be waiting.
        self.maybe_due = deferred || (room > 0 && claimed.len() == room);
        if claimed.is_empty() {
            return;
        }
        let (Some(clients), version) = (clients, env!("CARGO_PKG_VERSION")) else {
            return;
        };
        for c in claimed {
            *self.per_webhook.entry(c.webhook.clone()).or_default() += 1;
            let (id, webhook, attempt) = (c.id, c.webhook.clone(), c.attempts + 1);
            let task = rt.spawn(post(clients.clone(), c, version));
            self.in_flight.push((id, task.abort_handle()));
            // A post that panicked (a bug) is tried again later, like a lost connection.
            self.posting.push(Box::pin(async move {
                task.await.unwrap_or_else(|e| {
                    let reason = if e.is_panic() { "the post panicked" } else { "the post was stopped" };
                    let outcome = outbound::Outcome::Retry { reason: reason.into(), after: None };
                    Done { id, webhook, attempt, status: None, outcome }
                })
            }));
        }
    }

    /// Takes one finished attempt (from the worker's `drive`).
    pub(super) fn finish(&mut self, d: Done) {
        if let Some(n) = self.per_webhook.get_mut(&d.webhook) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                self.per_webhook.remove(&d.webhook);
            }
        }
        self.in_flight.retain(|(id, _)| *id != d.id);
        // A slot came free: deliveries waiting behind the cap may go now.
        self.maybe_due = true;
        self.done.push(d);
    }

    /// The finished attempts as hooks_record.sql's argument (None: none finished).
    fn rows(&mut self, slot: i32) -> Option<serde_json::Value> {
        if self.done.is_empty() {
            return None;
        }
        let (max_attempts, base, max) = (gucs::max_attempts(), gucs::retry_base(), gucs::retry_max());
        let rows: Vec<serde_json::Value> = self.done.drain(..).map(|d| row(&d, max_attempts, base, max)).collect();
        for why in rows.iter().filter_map(|r| r["disable"].as_str()) {
            log!("pg_email worker {slot}: {why}");
        }
        Some(serde_json::Value::Array(rows))
    }

    /// Shutdown: records what finished; what is still in flight goes back to the queue (its
    /// attempt not counted).
    pub fn release(&mut self, slot: i32, rt: &tokio::runtime::Handle) {
        self.maybe_due = false;
        self.cycle(slot, rt, false);
        let ids: Vec<i64> = std::mem::take(&mut self.in_flight)
            .into_iter()
            .map(|(id, task)| {
                task.abort();
                id
            })
            .collect();
        self.posting = FuturesUnordered::new();
        self.per_webhook.clear();
        if ids.is_empty() {
            return;
        }
        BackgroundWorker::transaction(move || {
            Spi::connect_mut(|client| {
                let _ = client.update(RELEASE, None, &[ids.into()]);
            })
        });
    }
}

/// The record of one attempt for hooks_record.sql.
fn row(d: &Done, max_attempts: i32, base: Duration, max: Duration) -> serde_json::Value {
    let (status, error, delay, disable) = match &d.outcome {
        outbound::Outcome::Sent => ("sent", None, None, None),
        outbound::Outcome::Disable => (
            "failed",
            Some("HTTP 410 Gone: the webhook is disabled".to_string()),
            None,
            Some(format!("webhook \"{}\" disabled: its URL answered 410 Gone", d.webhook)),
        ),
        outbound::Outcome::Retry { reason, after } => {
            if d.attempt >= max_attempts {
                ("failed", Some(format!("{reason} (attempt {} of {max_attempts}, giving up)", d.attempt)), None, None)
            } else {
                let wait = deliver::backoff(d.attempt, base, max).max(after.unwrap_or_default());
                ("queued", Some(reason.clone()), Some(wait.as_secs_f64() * 1000.0), None)
            }
        }
    };
    serde_json::json!({
        "id": d.id,
        "attempt": d.attempt,
        "status": status,
        "response_status": d.status,
        "last_error": error,
        "delay_ms": delay,
        "disable": disable,
    })
}

/// One attempt: sign, POST, read the answer. Never panics, never waits past the client's timeout.
async fn post(clients: Clients, c: Claimed, version: &'static str) -> Done {
    let attempt = c.attempts + 1;
    let done = |status: Option<u16>, outcome| Done { id: c.id, webhook: c.webhook.clone(), attempt, status, outcome };
    let retry = |reason: String| outbound::Outcome::Retry { reason, after: None };
    let url = match outbound::check_url(&c.url) {
        Ok(u) => u,
        Err(e) => return done(None, retry(e.to_string())),
    };
    let secret = match outbound::Secret::parse(&c.secret) {
        Ok(s) => s,
        Err(e) => return done(None, retry(format!("the webhook's secret: {e}"))),
    };
    let client = match clients.pick(&url) {
        Ok(client) => client,
        Err(e) => return done(None, retry(e.to_string())),
    };
    let body = outbound::body(&c.event);
    let timestamp =
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs() as i64);
    let msg_id = format!("msg_{}", c.id);
    let mut request = client.post(url);
    for (k, v) in outbound::headers(&secret, &msg_id, timestamp, &body, version) {
        request = request.header(k, v);
    }
    match request.body(body).send().await {
        Ok(response) => {
            let status = response.status().as_u16();
            let retry_after =
                response.headers().get(reqwest::header::RETRY_AFTER).and_then(|v| v.to_str().ok()).map(str::to_string);
            let outcome = outbound::classify(status, retry_after.as_deref());
            let outcome = match outcome {
                outbound::Outcome::Retry { reason, after } => {
                    let text = outbound::excerpt(response, EXCERPT).await;
                    let text = text.trim();
                    let reason = if text.is_empty() { reason } else { format!("{reason}: {text}") };
                    outbound::Outcome::Retry { reason, after }
                }
                other => other,
            };
            done(Some(status), outcome)
        }
        Err(e) => done(None, retry(outbound::describe(&e))),
    }
}

/// Claims up to `room` due deliveries (hooks_claim.sql) and reads what their POSTs need
/// (hooks_events.sql); a delivery whose event is gone is failed (hooks_orphaned.sql). Three
/// statements, so that on Citus the deliveries of this node, the reference tables and the
/// distributed receipts are each read in a way Citus runs.
fn claim(
    client: &mut SpiClient,
    names: Vec<String>,
    counts: Vec<i32>,
    cap: i32,
    lease_ms: f64,
    room: usize,
) -> Vec<Claimed> {
    let enabled: Vec<String> =
        crate::api::run_prepared(client, ENABLED, Some(1), &[]).first().get(1).ok().flatten().unwrap_or_default();
    if enabled.is_empty() {
        return Vec::new();
    }
    let args: Vec<DatumWithOid> =
        vec![names.into(), counts.into(), cap.into(), lease_ms.into(), (room as i64).into(), enabled.into()];
    let mut ids = Vec::new();
    let mut webhooks = Vec::new();
    let mut attempts = Vec::new();
    let mut receipts = Vec::new();
    for r in crate::api::run_prepared(client, CLAIM, None, &args) {
        ids.push(r.get_by_name::<i64, _>("id").ok().flatten().unwrap_or_default());
        webhooks.push(text(&r, "webhook").unwrap_or_default());
        attempts.push(r.get_by_name::<i32, _>("attempts").ok().flatten().unwrap_or_default());
        receipts.push(r.get_by_name::<i64, _>("receipt_id").ok().flatten().unwrap_or_default());
    }
    if ids.is_empty() {
        return Vec::new();
    }
    let all = ids.clone();
    let args: Vec<DatumWithOid> = vec![ids.into(), webhooks.into(), attempts.into(), receipts.into()];
    // Planned afresh each time: Citus cannot plan this join of distributed tables generically (with
    // its parameters unknown), as a kept plan may be.
    let claimed: Vec<Claimed> = super::queue::spi(client.select(EVENTS, None, &args)).map(|r| claimed(&r)).collect();
    if claimed.len() < all.len() {
        let gone: Vec<i64> = all.into_iter().filter(|id| !claimed.iter().any(|c| c.id == *id)).collect();
        crate::api::run_prepared(client, ORPHANED, None, &[gone.into()]);
    }
    claimed
}

fn text(row: &SpiHeapTupleData, name: &str) -> Option<String> {
    row.get_by_name::<String, _>(name).ok().flatten()
}

/// Reads one row of hooks_claim.sql.
fn claimed(r: &SpiHeapTupleData) -> Claimed {
    let event = outbound::Event {
        event: text(r, "event").unwrap_or_default(),
        receipt_id: r.get_by_name("receipt_id").ok().flatten().unwrap_or_default(),
        message_id: r.get_by_name("message_id").ok().flatten().unwrap_or_default(),
        rfc_message_id: text(r, "rfc_message_id"),
        recipient: text(r, "recipient"),
        transport: text(r, "transport"),
        tags: r.get_by_name::<Vec<String>, _>("tags").ok().flatten().unwrap_or_default(),
        metadata: text(r, "metadata").and_then(|m| serde_json::from_str(&m).ok()).unwrap_or(serde_json::Value::Null),
        smtp_code: r.get_by_name("smtp_code").ok().flatten(),
        enhanced_code: text(r, "enhanced_code"),
        response: text(r, "response"),
        bounce_type: text(r, "bounce_type"),
        url: text(r, "url"),
        at: r.get_by_name("at").ok().flatten().unwrap_or_default(),
    };
    Claimed {
        id: r.get_by_name("id").ok().flatten().unwrap_or_default(),
        webhook: text(r, "webhook").unwrap_or_default(),
        url: text(r, "url_to").unwrap_or_default(),
        secret: text(r, "secret").unwrap_or_default(),
        attempts: r.get_by_name("attempts").ok().flatten().unwrap_or_default(),
        event,
    }
}
