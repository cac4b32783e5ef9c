//! The worker's SQL, all of it run on the worker's main thread in short transactions: claim due
//! rows, read what they need, record outcomes in batches, reap expired leases, find the next due
//! time, load transports. Network I/O never happens while one of these transactions is open.

use std::ffi::CStr;

use pgrx::bgworkers::BackgroundWorker;
use pgrx::datum::DatumWithOid;
use pgrx::prelude::*;
use pgrx::spi::SpiHeapTupleData;
use pgrx::JsonB;

use crate::deliver::outcome::Plan;
use crate::message::{Attachment, Stored};
use crate::render::{Library, Parts};

const SESSION: &str = include_str!("../../sql/worker/session.sql");
const EXTENSION_VERSION: &str = include_str!("../../sql/worker/extension_version.sql");
const CLAIM: &str = include_str!("../../sql/worker/claim.sql");
const CLAIM_WINDOW: &str = include_str!("../../sql/worker/claim_window.sql");
const ATTACHMENTS: &str = include_str!("../../sql/worker/attachments.sql");
const PINNED_VERSIONS: &str = include_str!("../../sql/worker/pinned_versions.sql");
const RECORD_OUTCOMES: &str = include_str!("../../sql/worker/record_outcomes.sql");
const RECORD_RECEIPTS: &str = include_str!("../../sql/worker/record_receipts.sql");
const RECORD_SUPPRESSIONS: &str = include_str!("../../sql/worker/record_suppressions.sql");
const RECORD_CAPTURED: &str = include_str!("../../sql/worker/record_captured.sql");
const MESSAGE_EXISTS: &str = include_str!("../../sql/worker/message_exists.sql");
const USER_TRIGGERS_OFF: &str = include_str!("../../sql/worker/user_triggers_off.sql");
const USER_TRIGGERS_ON: &str = include_str!("../../sql/worker/user_triggers_on.sql");
const RELEASE: &str = include_str!("../../sql/worker/release.sql");
const REAP_LEASES: &str = include_str!("../../sql/worker/reap_leases.sql");
const NEXT_DUE_MS: &str = include_str!("../../sql/worker/next_due_ms.sql");
const TRANSPORTS_FINGERPRINT: &str = include_str!("../../sql/worker/transports_fingerprint.sql");
const TRANSPORTS: &str = include_str!("../../sql/worker/transports.sql");
const TRACKING_KEYS: &str = include_str!("../../sql/worker/tracking_keys.sql");
const DKIM_KEYS: &str = include_str!("../../sql/worker/dkim_keys.sql");
const DKIM_FINGERPRINT: &str = include_str!("../../sql/worker/dkim_fingerprint.sql");
const CITUS_PRESENT: &str = include_str!("../../sql/worker/citus_present.sql");
const CITUS_SHARDS: &str = include_str!("../../sql/worker/citus_shards.sql");
const CITUS_DUE: &str = include_str!("../../sql/worker/citus_due.sql");
const CLAIM_IDS: &str = include_str!("../../sql/worker/claim_ids.sql");
const CITUS_LEASED: &str = include_str!("../../sql/worker/citus_leased.sql");
const REAP_IDS: &str = include_str!("../../sql/worker/reap_ids.sql");
const CITUS_NEXT_DUE_MS: &str = include_str!("../../sql/worker/citus_next_due_ms.sql");
const PURGE_FINISHED: &str = include_str!("../../sql/worker/purge_finished.sql");
const STATS_FOLD: &str = include_str!("../../sql/worker/stats_fold.sql");
const STATS_FOLD_SESSION: &str = include_str!("../../sql/worker/stats_fold_session.sql");

/// A claimed row, as read back.
#[derive(Debug, Clone)]
pub struct Job {
    pub id: i64,
    pub attempt: i32,
    pub transport: String,
    pub stored: Stored,
    pub template: Option<(String, i32, serde_json::Value)>,
    /// The pinned version's sources, for template mail.
    pub pinned: Option<Parts>,
    pub pending: Option<Vec<String>>,
    pub attachment_count: i32,
    pub tags: Vec<String>,
    pub metadata: serde_json::Map<String, serde_json::Value>,
    pub track: Track,
    /// A message received by SMTP submission: delivered as these bytes (DKIM signed), not built.
    pub raw: Option<std::sync::Arc<Vec<u8>>>,
}

/// What a message asked for, resolved at enqueue: tracking and a List-Unsubscribe header.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Track {
    pub opens: bool,
    pub clicks: bool,
    pub list_unsubscribe: bool,
}

/// A transport row with its secret DSN.
#[derive(Debug, Clone)]
pub struct TransportRow {
    pub name: String,
    pub fallback: Option<String>,
    pub dsn: String,
}

/// An SPI result, or an ERROR saying it failed.
pub(super) fn spi<T>(r: Result<T, pgrx::spi::SpiError>) -> T {
    r.unwrap_or_else(|e| pgrx::error!("pg_email worker: SPI failed: {e}"))
}

/// Session settings for the worker's own queries (see session.sql for why).
pub fn configure_session() {
    BackgroundWorker::transaction(|| {
        if let Err(e) = Spi::run(SESSION) {
            warning!("pg_email worker: session settings failed: {e}");
        }
    });
}

/// The version of the extension installed in the worker's database, if it is installed.
pub fn extension_version() -> Option<String> {
    BackgroundWorker::transaction(|| Spi::get_one::<String>(EXTENSION_VERSION).ok().flatten())
}

/// A text column of a claimed row, by name.
fn text(row: &SpiHeapTupleData, name: &str) -> Option<String> {
    row.get_by_name::<String, _>(name).ok().flatten()
}

/// A text[] column of a claimed row, by name.
fn list(row: &SpiHeapTupleData, name: &str) -> Option<Vec<String>> {
    row.get_by_name::<Vec<String>, _>(name).ok().flatten()
}

/// Reads one row of claim.sql / claim_window.sql.
fn job(row: &SpiHeapTupleData) -> Job {
    let template = match (text(row, "template"), row.get_by_name::<i32, _>("template_version").ok().flatten()) {
        (Some(name), Some(v)) => {
            let data = text(row, "data").and_then(|d| serde_json::from_str(&d).ok()).unwrap_or(serde_json::Value::Null);
            Some((name, v, data))
        }
        _ => None,
    };
    let headers: Vec<(String, String)> = text(row, "headers")
        .and_then(|h| serde_json::from_str::<serde_json::Map<String, serde_json::Value>>(&h).ok())
        .map(|m| m.into_iter().map(|(k, v)| (k, v.as_str().unwrap_or_default().to_string())).collect())
        .unwrap_or_default();
    Job {
        id: row.get_by_name("id").ok().flatten().unwrap_or_default(),
        attempt: row.get_by_name("attempt").ok().flatten().unwrap_or(1),
        transport: text(row, "transport").unwrap_or_default(),
        stored: Stored {
            sender: text(row, "sender").unwrap_or_default(),
            recipients: list(row, "recipients").unwrap_or_default(),
            cc: list(row, "cc").unwrap_or_default(),
            bcc: list(row, "bcc").unwrap_or_default(),
            reply_to: text(row, "reply_to"),
            subject: text(row, "subject").unwrap_or_default(),
            body: text(row, "body"),
            html: text(row, "html"),
            headers,
            attachments: Vec::new(),
            message_id: text(row, "message_id").unwrap_or_default(),
        },
        template,
        pinned: None,
        pending: list(row, "pending_recipients"),
        attachment_count: row.get_by_name("attachment_count").ok().flatten().unwrap_or(0),
        tags: list(row, "tags").unwrap_or_default(),
        metadata: text(row, "metadata").and_then(|m| serde_json::from_str(&m).ok()).unwrap_or_default(),
        track: Track {
            opens: flag(row, "track_opens"),
            clicks: flag(row, "track_clicks"),
            list_unsubscribe: flag(row, "list_unsubscribe"),
        },
        raw: row.get_by_name::<Vec<u8>, _>("raw").ok().flatten().map(std::sync::Arc::new),
    }
}

fn flag(row: &SpiHeapTupleData, name: &str) -> bool {
    row.get_by_name::<bool, _>(name).ok().flatten().unwrap_or(false)
}

/// Where the outbox lives, as the worker sees it.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum Outbox {
    /// `email.messages` is an ordinary table: every worker claims from all of it.
    #[default]
    Local,
    /// Citus distributes it (`email.distribute()`): this node (its Citus group id) drains the
    /// shards placed on it, and this worker the ones of those its slot is given.
    Citus { node: i32, shards: Vec<String> },
}

impl Outbox {
    /// Where the outbox is now: read every poll interval, since Citus moves shards.
    pub fn read(slot: i32, workers: i32) -> Outbox {
        BackgroundWorker::transaction(|| {
            if !Spi::get_one::<bool>(CITUS_PRESENT).ok().flatten().unwrap_or(false) {
                return Outbox::Local;
            }
            Spi::connect(|client| {
                let rows = spi(client.select(CITUS_SHARDS, None, &[]));
                let Some(row) = rows.into_iter().next() else {
                    return Outbox::Local;
                };
                let node: i32 = row.get_by_name("node").ok().flatten().unwrap_or_default();
                let all: Vec<String> = row.get_by_name("shards").ok().flatten().unwrap_or_default();
                Outbox::Citus { node, shards: mine(all, slot, workers) }
            })
        })
    }

    /// Whether the claim and the write-back run as statements prepared once per worker
    /// (`run_planned`). On Citus they are planned per batch, so that its router sees the batch's
    /// ids.
    pub fn prepared(&self) -> bool {
        matches!(self, Outbox::Local)
    }

    /// What `claimed_by` says for this worker: its slot, and on Citus its node too, so that a
    /// worker restarting on one node never takes back what another node's worker holds.
    pub fn claimer(&self, slot: i32) -> i32 {
        match self {
            Outbox::Local => slot,
            Outbox::Citus { node, .. } => node * 1000 + slot,
        }
    }
}

/// The shards of a node that worker `slot` of `workers` drains: every `workers`-th one.
fn mine(all: Vec<String>, slot: i32, workers: i32) -> Vec<String> {
    let (slot, workers) = (slot.max(0) as usize, workers.max(1) as usize);
    all.into_iter().enumerate().filter(|(i, _)| i % workers == slot).map(|(_, s)| s).collect()
}

/// A statement over local shards: the (not commented) line of `sql` that holds `{shard}`, once
/// per shard, joined by UNION ALL (shard names come from Citus' catalog, already quoted).
fn over_shards(sql: &str, shards: &[String]) -> String {
    let mut out = String::with_capacity(sql.len() + shards.len() * 160);
    for line in sql.lines() {
        if line.contains("{shard}") && !line.trim_start().starts_with("--") {
            let each: Vec<String> = shards.iter().map(|s| line.replace("{shard}", s)).collect();
            out.push_str(&each.join("\n        UNION ALL\n"));
        } else {
            out.push_str(line);
        }
        out.push('\n');
    }
    out
}

/// The ids a statement over this worker's local shards (`over_shards`, one argument) returns.
fn local_ids(client: &mut pgrx::spi::SpiClient, sql: &str, shards: &[String], arg: DatumWithOid) -> Vec<i64> {
    let sql = over_shards(sql, shards);
    spi(client.select(&sql, None, &[arg])).first().get(1).ok().flatten().unwrap_or_default()
}

/// Planned for each batch: a claim's plan depends on how many rows it takes and how many wait
/// (a generic plan, not knowing, was seen hashing the whole primary key).
const CUSTOM_PLAN: &[(&CStr, &CStr)] = &[(c"plan_cache_mode", c"force_custom_plan")];
/// Planned once per worker: the write-back finds its batch by primary key, whatever its size
/// (record_outcomes.sql says how), so one plan serves every batch and planning is skipped.
const GENERIC_PLAN: &[(&CStr, &CStr)] = &[(c"plan_cache_mode", c"force_generic_plan")];

/// Runs one of the worker's hot statements through a plan prepared once per worker, planned as
/// `mode` says. Parsing and planning them for every batch took about a fifth of the worker's
/// main thread at the default settings (README, "Performance").
fn run_planned<'conn>(
    client: &mut pgrx::spi::SpiClient<'conn>,
    mode: &[(&CStr, &CStr)],
    sql: &'static str,
    args: &[DatumWithOid],
) -> pgrx::spi::SpiTupleTable<'conn> {
    crate::api::switched(None, mode, || crate::api::run_prepared(client, sql, None, args))
}

/// Claims up to `limit` due rows, with their attachments. `backlog` says the last claim came
/// back full: walk the priority index; otherwise take the batch from a window of the oldest
/// due rows, which stays cheap however many rows wait for a later time.
pub fn claim(outbox: &Outbox, limit: usize, lease_ms: f64, claimer: i32, backlog: bool) -> Vec<Job> {
    BackgroundWorker::transaction(move || {
        Spi::connect_mut(|client| {
            let mut jobs: Vec<Job> = match outbox {
                Outbox::Local => {
                    let mut args: Vec<DatumWithOid> = vec![(limit as i64).into(), lease_ms.into(), claimer.into()];
                    let sql = if backlog {
                        CLAIM
                    } else {
                        args.push(((limit * 4).max(1000) as i64).into());
                        CLAIM_WINDOW
                    };
                    run_planned(client, CUSTOM_PLAN, sql, &args).map(|row| job(&row)).collect()
                }
                Outbox::Citus { shards, .. } if shards.is_empty() => Vec::new(),
                Outbox::Citus { shards, .. } => {
                    let ids = local_ids(client, CITUS_DUE, shards, (limit as i64).into());
                    if ids.is_empty() {
                        return Vec::new();
                    }
                    let args: Vec<DatumWithOid> = vec![ids.into(), lease_ms.into(), claimer.into()];
                    spi(client.update(CLAIM_IDS, None, &args)).map(|row| job(&row)).collect()
                }
            };
            attach_files(client, &mut jobs);
            attach_pinned_versions(client, &mut jobs);
            jobs
        })
    })
}

/// Reads the attachments of the claimed jobs that have any.
fn attach_files(client: &mut pgrx::spi::SpiClient, jobs: &mut [Job]) {
    let with_files: Vec<i64> = jobs.iter().filter(|j| j.attachment_count > 0).map(|j| j.id).collect();
    if with_files.is_empty() {
        return;
    }
    for f in spi(client.select(ATTACHMENTS, None, &[with_files.into()])) {
        let id: i64 = f.get_by_name("message_id").ok().flatten().unwrap_or_default();
        let a = Attachment {
            filename: f.get_by_name("filename").ok().flatten().unwrap_or_default(),
            content_type: f.get_by_name("content_type").ok().flatten().unwrap_or_default(),
            content_id: f.get_by_name("content_id").ok().flatten(),
            content: f.get_by_name::<Vec<u8>, _>("content").ok().flatten().unwrap_or_default(),
        };
        if let Some(j) = jobs.iter_mut().find(|j| j.id == id) {
            j.stored.attachments.push(a);
        }
    }
}

/// Reads the template versions the claimed template mail pinned.
fn attach_pinned_versions(client: &mut pgrx::spi::SpiClient, jobs: &mut [Job]) {
    let (names, versions): (Vec<String>, Vec<i32>) =
        jobs.iter().filter_map(|j| j.template.as_ref().map(|(n, v, _)| (n.clone(), *v))).unzip();
    if names.is_empty() {
        return;
    }
    for r in spi(client.select(PINNED_VERSIONS, None, &[names.into(), versions.into()])) {
        let name: String = r.get_by_name("name").ok().flatten().unwrap_or_default();
        let version: i32 = r.get_by_name("version").ok().flatten().unwrap_or_default();
        let parts = Parts {
            subject: r.get_by_name("subject").ok().flatten().unwrap_or_default(),
            body: r.get_by_name("body").ok().flatten(),
            html: r.get_by_name("html").ok().flatten(),
        };
        for j in jobs.iter_mut() {
            if j.template.as_ref().is_some_and(|(n, v, _)| *n == name && *v == version) {
                j.pinned = Some(parts.clone());
            }
        }
    }
}

/// The current templates (layouts and partials), read again only when they changed.
pub fn templates() -> std::sync::Arc<Library> {
    BackgroundWorker::transaction(|| spi(crate::catalog::library()))
}

/// One captured message for `email.captured`.
#[derive(serde::Serialize)]
pub struct Captured {
    pub message_id: i64,
    pub transport: String,
    pub envelope_from: String,
    pub envelope_to: Vec<String>,
    pub raw: String,
}

/// The arguments of the record statements for some outcomes.
struct Rows {
    updates: serde_json::Value,
    ids: Vec<i64>,
    receipts: serde_json::Value,
    suppress: serde_json::Value,
    captured: Option<serde_json::Value>,
}

impl Rows {
    fn of<'a>(plans: impl Iterator<Item = &'a Plan> + Clone, captured: Vec<&Captured>) -> Rows {
        let json = |v: Result<serde_json::Value, _>| v.unwrap_or_default();
        let suppress: Vec<serde_json::Value> = plans
            .clone()
            .flat_map(|p| p.suppress.iter().map(move |a| serde_json::json!({"address": a, "message_id": p.update.id})))
            .collect();
        Rows {
            updates: json(serde_json::to_value(plans.clone().map(|p| &p.update).collect::<Vec<_>>())),
            ids: plans.clone().map(|p| p.update.id).collect(),
            receipts: json(serde_json::to_value(plans.flat_map(|p| &p.receipts).collect::<Vec<_>>())),
            suppress: serde_json::Value::Array(suppress),
            captured: (!captured.is_empty()).then(|| json(serde_json::to_value(captured))),
        }
    }

    /// Runs the record statements; an error (a user trigger's, say) is raised. On a local outbox
    /// the two that run for every batch are prepared once per worker (see `Outbox::prepared`).
    fn write(self, prepared: bool) {
        Spi::connect_mut(|client| {
            let ids: Vec<i64> = self.ids;
            let outcomes = [JsonB(self.updates).into(), ids.into()];
            let receipts = [JsonB(self.receipts).into()];
            if prepared {
                run_planned(client, GENERIC_PLAN, RECORD_OUTCOMES, &outcomes);
                run_planned(client, GENERIC_PLAN, RECORD_RECEIPTS, &receipts);
            } else {
                spi(client.update(RECORD_OUTCOMES, None, &outcomes));
                spi(client.update(RECORD_RECEIPTS, None, &receipts));
            }
            if self.suppress.as_array().is_some_and(|a| !a.is_empty()) {
                spi(client.update(RECORD_SUPPRESSIONS, None, &[JsonB(self.suppress).into()]));
            }
            if let Some(c) = self.captured {
                spi(client.update(RECORD_CAPTURED, None, &[JsonB(c).into()]));
            }
        })
    }
}

/// Records a batch of outcomes in one transaction. A user trigger on the outbox tables cannot
/// stop it: the batch is written in a subtransaction; if that fails, each outcome in its own;
/// an outcome that still fails is written with user triggers off, its receipts saying why, so
/// that the message keeps its true status and is never sent again because of a trigger. The
/// outcome of a message deleted meanwhile is left out.
pub fn complete(outbox: &Outbox, plans: &[Plan], captured: &[Captured]) {
    let prepared = outbox.prepared();
    let captured_of = |id: i64| captured.iter().filter(|c| c.message_id == id).collect::<Vec<_>>();
    let bypassed_suppressions = BackgroundWorker::transaction(|| {
        if crate::subxact::run(|| Rows::of(plans.iter(), captured.iter().collect()).write(prepared)).is_ok() {
            return false;
        }
        let mut bypassed_suppressions = false;
        for plan in plans {
            let id = plan.update.id;
            let Err(error) = crate::subxact::run(|| Rows::of(std::iter::once(plan), captured_of(id)).write(prepared))
            else {
                continue;
            };
            // Deleted while it was being sent: its receipts have no message to belong to.
            if !spi(Spi::get_one_with_args::<bool>(MESSAGE_EXISTS, &[id.into()])).unwrap_or(true) {
                log!("pg_email worker: message {id} was deleted while it was being sent; its outcome is not recorded");
                continue;
            }
            warning!(
                "pg_email worker: recording the outcome of message {id} failed in a user trigger: {error}; \
                 it is recorded with user triggers off"
            );
            let mut plan = plan.clone();
            for r in &mut plan.receipts {
                r.response = format!("{} (recorded with user triggers off: a trigger failed: {error})", r.response);
            }
            let bypass = crate::subxact::run(|| {
                spi(Spi::run(USER_TRIGGERS_OFF));
                Rows::of(std::iter::once(&plan), captured_of(id)).write(prepared);
                spi(Spi::run(USER_TRIGGERS_ON));
            });
            match bypass {
                Ok(()) => bypassed_suppressions |= !plan.suppress.is_empty(),
                Err(e) => warning!(
                    "pg_email worker: the outcome of message {id} cannot be recorded: {e}; \
                     it will be tried again when its lease expires"
                ),
            }
        }
        bypassed_suppressions
    });
    // The suppressions trigger did not run for outcomes written with user triggers off.
    if bypassed_suppressions {
        crate::shmem::bump_config_generation();
    }
}

/// Puts rows claimed but not sent (shutdown) back in the queue, without counting the attempt.
pub fn release(ids: Vec<i64>) {
    if ids.is_empty() {
        return;
    }
    BackgroundWorker::transaction(move || {
        Spi::connect_mut(|client| {
            spi(client.update(RELEASE, None, &[ids.into()]));
        })
    });
}

/// Requeues expired leases (and, with `claimer`, everything it left claimed); returns how many.
/// On Citus, only in this worker's shards: each node reaps its own, by its own clock.
pub fn reap(outbox: &Outbox, claimer: Option<i32>) -> usize {
    let claimer = claimer.unwrap_or(-1);
    BackgroundWorker::transaction(move || {
        Spi::connect_mut(|client| {
            let count = match outbox {
                Outbox::Local => spi(client.update(REAP_LEASES, None, &[claimer.into()])),
                Outbox::Citus { shards, .. } if shards.is_empty() => return 0,
                Outbox::Citus { shards, .. } => {
                    let ids = local_ids(client, CITUS_LEASED, shards, claimer.into());
                    if ids.is_empty() {
                        return 0;
                    }
                    spi(client.update(REAP_IDS, None, &[ids.into(), claimer.into()]))
                }
            };
            count.first().get::<i64>(1).ok().flatten().unwrap_or(0) as usize
        })
    })
}

/// Milliseconds until the earliest queued row is due (0 when one is due now), `None` when empty.
pub fn next_due_ms(outbox: &Outbox) -> Option<f64> {
    BackgroundWorker::transaction(|| match outbox {
        Outbox::Local => Spi::get_one::<f64>(NEXT_DUE_MS).ok().flatten(),
        Outbox::Citus { shards, .. } if shards.is_empty() => None,
        Outbox::Citus { shards, .. } => Spi::get_one::<f64>(&over_shards(CITUS_NEXT_DUE_MS, shards)).ok().flatten(),
    })
}

/// A cheap fingerprint of the transport table, to notice changes.
pub fn transports_version() -> String {
    BackgroundWorker::transaction(|| Spi::get_one::<String>(TRANSPORTS_FINGERPRINT).ok().flatten().unwrap_or_default())
}

/// A cheap fingerprint of the DKIM keys, to notice changes.
pub fn dkim_version() -> String {
    BackgroundWorker::transaction(|| Spi::get_one::<String>(DKIM_FINGERPRINT).ok().flatten().unwrap_or_default())
}

/// The DKIM keys, oldest first.
pub fn dkim_keys() -> Vec<crate::dkim::KeyRow> {
    BackgroundWorker::transaction(|| {
        Spi::connect(|client| {
            spi(client.select(DKIM_KEYS, None, &[]))
                .filter_map(|r| {
                    Some(crate::dkim::KeyRow {
                        domain: r.get_by_name("domain").ok()??,
                        selector: r.get_by_name("selector").ok()??,
                        algorithm: r.get_by_name("algorithm").ok()??,
                        private_key: r.get_by_name("private_key").ok()??,
                    })
                })
                .collect()
        })
    })
}

/// The tracking keys (id, secret); the newest signs.
pub fn tracking_keys() -> Vec<(i32, Vec<u8>)> {
    BackgroundWorker::transaction(|| {
        Spi::connect(|client| {
            spi(client.select(TRACKING_KEYS, None, &[]))
                .filter_map(|r| Some((r.get_by_name("kid").ok()??, r.get_by_name("secret").ok()??)))
                .collect()
        })
    })
}

pub fn load_transports() -> Vec<TransportRow> {
    BackgroundWorker::transaction(|| {
        Spi::connect(|client| {
            spi(client.select(TRANSPORTS, None, &[]))
                .map(|r| TransportRow {
                    name: r.get_by_name("name").ok().flatten().unwrap_or_default(),
                    fallback: r.get_by_name("fallback").ok().flatten(),
                    dsn: r.get_by_name("dsn").ok().flatten().unwrap_or_default(),
                })
                .collect()
        })
    })
}

/// Deletes finished messages older than the retention, a bounded batch at a time.
pub fn purge_older_than(secs: f64) -> i64 {
    BackgroundWorker::transaction(move || {
        Spi::connect_mut(|client| {
            spi(client.update(PURGE_FINISHED, None, &[secs.into()])).first().get::<i64>(1).ok().flatten().unwrap_or(0)
        })
    })
}

/// Folds pending receipts into the email.stats rollup, a bounded number of batches (each its
/// own transaction); returns how many rows were folded. An error is logged, never raised: the
/// statistics wait, mail does not.
pub fn fold_stats(slot: i32) -> i64 {
    let mut folded = 0;
    for _ in 0..20 {
        let n = BackgroundWorker::transaction(|| {
            crate::subxact::run(|| {
                spi(Spi::run(STATS_FOLD_SESSION));
                spi(Spi::get_one::<i32>(STATS_FOLD)).unwrap_or(0)
            })
        });
        match n {
            Ok(n) => {
                folded += n as i64;
                if n < 1000 {
                    break;
                }
            }
            Err(e) => {
                warning!("pg_email worker {slot}: folding the statistics failed: {e}");
                break;
            }
        }
    }
    folded
}

#[cfg(test)]
mod tests {
    use super::{mine, over_shards, CITUS_DUE, CITUS_LEASED};

    #[test]
    fn each_worker_slot_gets_its_own_shards_and_together_all() {
        let all: Vec<String> = (0..7).map(|i| format!("email.messages_{i}")).collect();
        let parts: Vec<Vec<String>> = (0..3).map(|slot| mine(all.clone(), slot, 3)).collect();
        assert_eq!(parts[0], ["email.messages_0", "email.messages_3", "email.messages_6"]);
        let mut joined: Vec<String> = parts.concat();
        joined.sort();
        assert_eq!(joined, all);
        assert_eq!(mine(all.clone(), 0, 1), all);
        assert_eq!(mine(all.clone(), 0, 0), all, "no workers setting: one");
    }

    #[test]
    fn a_statement_over_shards_repeats_only_the_shard_line() {
        let sql = over_shards(CITUS_DUE, &["email.messages_1".into(), "email.messages_2".into()]);
        assert_eq!(sql.matches("FROM email.messages_1 WHERE").count(), 1);
        assert_eq!(sql.matches("FROM email.messages_2 WHERE").count(), 1);
        assert_eq!(sql.lines().filter(|l| l.trim() == "UNION ALL").count(), 1);
        assert!(!sql.lines().any(|l| !l.trim_start().starts_with("--") && l.contains("{shard}")), "{sql}");
        // The comments that mention the placeholder are kept as they are, not repeated.
        assert_eq!(sql.matches("{shard}").count(), CITUS_DUE.matches("{shard}").count() - 1);
        let one = over_shards(CITUS_LEASED, &["email.messages_9".into()]);
        assert!(!one.lines().any(|l| l.trim() == "UNION ALL") && one.contains("FROM email.messages_9 WHERE"));
    }
}
