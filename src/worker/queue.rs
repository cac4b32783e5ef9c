//! The worker's SQL, all of it run on the worker's main thread in short transactions: claim due
//! rows, read what they need, record outcomes in batches, reap expired leases, find the next due
//! time, load transports. Network I/O never happens while one of these transactions is open.

use pgrx::bgworkers::BackgroundWorker;
use pgrx::datum::DatumWithOid;
use pgrx::prelude::*;
use pgrx::JsonB;

use crate::deliver::outcome::Plan;
use crate::message::{Attachment, Stored};
use crate::render::{Library, Parts};

const CLAIM: &str = concat!(include_str!("../../sql/worker/claim.sql"), include_str!("../../sql/worker/claim_update.sql"));
const CLAIM_WINDOW: &str =
    concat!(include_str!("../../sql/worker/claim_window.sql"), include_str!("../../sql/worker/claim_update.sql"));
const COMPLETE: &str = include_str!("../../sql/worker/complete.sql");
const RECEIPTS: &str = include_str!("../../sql/worker/receipts.sql");
const MAINTAIN: &str = include_str!("../../sql/worker/maintain.sql");

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
    pub tags: Vec<String>,
    pub metadata: serde_json::Map<String, serde_json::Value>,
}

/// A transport row with its secret DSN.
#[derive(Debug, Clone)]
pub struct TransportRow {
    pub name: String,
    pub fallback: Option<String>,
    pub dsn: String,
}

fn spi<T>(r: Result<T, pgrx::spi::SpiError>) -> T {
    r.unwrap_or_else(|e| pgrx::error!("pg_email worker: SPI failed: {e}"))
}

/// Session settings for the worker's own queries. The claim must walk the partial index of
/// queued rows in order and stop after a batch; with statistics that lag behind a freshly filled
/// queue the planner may prefer a sequential scan and a sort of the whole queue (seen in
/// profiles: O(queue) per claim). Every worker query has an index that fits, so seq scans and
/// sorts are simply discouraged for this session.
pub fn configure_session() {
    BackgroundWorker::transaction(|| {
        Spi::run("SET enable_seqscan = off").ok();
        Spi::run("SET enable_sort = off").ok();
        // Disabled plan types carry a huge cost, which would otherwise trigger JIT compilation.
        Spi::run("SET jit = off").ok();
        Spi::run("SET application_name = 'pg_email worker'").ok();
    });
}

/// True when the extension is installed in the worker's database.
pub fn extension_ready() -> bool {
    BackgroundWorker::transaction(|| {
        Spi::get_one::<bool>("SELECT EXISTS (SELECT 1 FROM pg_extension WHERE extname = 'pg_email')")
            .ok()
            .flatten()
            .unwrap_or(false)
    })
}

/// Claims up to `limit` due rows, with their attachments. `backlog` says the last claim came
/// back full: walk the priority index; otherwise take the batch from a window of the oldest
/// due rows, which stays cheap however many rows wait for a later time.
pub fn claim(limit: usize, lease_ms: f64, slot: i32, backlog: bool) -> Vec<Job> {
    BackgroundWorker::transaction(move || {
        Spi::connect_mut(|client| {
            let mut args: Vec<DatumWithOid> = vec![(limit as i64).into(), lease_ms.into(), slot.into()];
            let sql = if backlog {
                CLAIM
            } else {
                args.push(((limit * 4).max(1000) as i64).into());
                CLAIM_WINDOW
            };
            let rows = spi(client.update(sql, None, &args));
            let mut jobs = Vec::with_capacity(rows.len());
            let mut with_files = Vec::new();
            for row in rows {
                let text = |n: usize| row.get::<String>(n).ok().flatten();
                let list = |n: usize| row.get::<Vec<String>>(n).ok().flatten();
                let id: i64 = row.get(1).ok().flatten().unwrap_or_default();
                let template = match (text(12), row.get::<i32>(13).ok().flatten()) {
                    (Some(name), Some(v)) => {
                        let data = text(14).and_then(|d| serde_json::from_str(&d).ok()).unwrap_or(serde_json::Value::Null);
                        Some((name, v, data))
                    }
                    _ => None,
                };
                let headers: Vec<(String, String)> = text(15)
                    .and_then(|h| serde_json::from_str::<serde_json::Map<String, serde_json::Value>>(&h).ok())
                    .map(|m| m.into_iter().map(|(k, v)| (k, v.as_str().unwrap_or_default().to_string())).collect())
                    .unwrap_or_default();
                if row.get::<i32>(18).ok().flatten().unwrap_or(0) > 0 {
                    with_files.push(id);
                }
                jobs.push(Job {
                    id,
                    attempt: row.get(2).ok().flatten().unwrap_or(1),
                    transport: text(3).unwrap_or_default(),
                    stored: Stored {
                        sender: text(4).unwrap_or_default(),
                        recipients: list(5).unwrap_or_default(),
                        cc: list(6).unwrap_or_default(),
                        bcc: list(7).unwrap_or_default(),
                        reply_to: text(8),
                        subject: text(9).unwrap_or_default(),
                        body: text(10),
                        html: text(11),
                        headers,
                        attachments: Vec::new(),
                        message_id: text(16).unwrap_or_default(),
                    },
                    template,
                    pinned: None,
                    pending: list(17),
                    tags: list(19).unwrap_or_default(),
                    metadata: text(20).and_then(|m| serde_json::from_str(&m).ok()).unwrap_or_default(),
                });
            }
            if !with_files.is_empty() {
                let files = spi(client.select(
                    "SELECT message_id, filename, content_type, content_id, content FROM email.attachments \
                     WHERE message_id = ANY($1) ORDER BY message_id, position",
                    None,
                    &[with_files.into()],
                ));
                for f in files {
                    let id: i64 = f.get(1).ok().flatten().unwrap_or_default();
                    let a = Attachment {
                        filename: f.get(2).ok().flatten().unwrap_or_default(),
                        content_type: f.get(3).ok().flatten().unwrap_or_default(),
                        content_id: f.get(4).ok().flatten(),
                        content: f.get::<Vec<u8>>(5).ok().flatten().unwrap_or_default(),
                    };
                    if let Some(j) = jobs.iter_mut().find(|j| j.id == id) {
                        j.stored.attachments.push(a);
                    }
                }
            }
            let templated: Vec<(String, i32)> =
                jobs.iter().filter_map(|j| j.template.as_ref().map(|(n, v, _)| (n.clone(), *v))).collect();
            if !templated.is_empty() {
                let (names, versions): (Vec<String>, Vec<i32>) = templated.into_iter().unzip();
                let rows = spi(client.select(
                    "SELECT v.name, v.version, v.subject, v.body, v.html FROM email.template_versions v \
                     JOIN unnest($1::text[], $2::int[]) AS w(name, version) USING (name, version)",
                    None,
                    &[names.into(), versions.into()],
                ));
                for r in rows {
                    let name: String = r.get(1).ok().flatten().unwrap_or_default();
                    let version: i32 = r.get(2).ok().flatten().unwrap_or_default();
                    let parts = Parts {
                        subject: r.get(3).ok().flatten().unwrap_or_default(),
                        body: r.get(4).ok().flatten(),
                        html: r.get(5).ok().flatten(),
                    };
                    for j in jobs.iter_mut() {
                        if j.template.as_ref().is_some_and(|(n, v, _)| *n == name && *v == version) {
                            j.pinned = Some(parts.clone());
                        }
                    }
                }
            }
            jobs
        })
    })
}

/// The current templates' fingerprint.
pub fn templates_version() -> String {
    BackgroundWorker::transaction(|| {
        Spi::get_one::<String>(crate::api::templates::FINGERPRINT).ok().flatten().unwrap_or_default()
    })
}

/// Every current template, for layouts and partials.
pub fn load_templates() -> Library {
    BackgroundWorker::transaction(crate::api::templates::read_library)
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

/// Records a batch of outcomes in one transaction.
pub fn complete(plans: &[Plan], captured: &[Captured]) {
    let updates = serde_json::to_value(plans.iter().map(|p| &p.update).collect::<Vec<_>>()).unwrap_or_default();
    let receipts = serde_json::to_value(plans.iter().flat_map(|p| &p.receipts).collect::<Vec<_>>()).unwrap_or_default();
    let suppress: Vec<serde_json::Value> = plans
        .iter()
        .flat_map(|p| p.suppress.iter().map(move |a| serde_json::json!({"address": a, "message_id": p.update.id})))
        .collect();
    let captured = serde_json::to_value(captured).unwrap_or_default();
    let has_captured = captured.as_array().is_some_and(|a| !a.is_empty());
    BackgroundWorker::transaction(move || {
        Spi::connect_mut(|client| {
            spi(client.update(COMPLETE, None, &[JsonB(updates).into()]));
            spi(client.update(RECEIPTS, None, &[JsonB(receipts).into(), JsonB(serde_json::Value::Array(suppress)).into()]));
            if has_captured {
                spi(client.update(
                    "INSERT INTO email.captured (message_id, transport, envelope_from, envelope_to, raw) \
                     SELECT c.message_id, c.transport, c.envelope_from, c.envelope_to, decode(c.raw, 'base64') \
                     FROM jsonb_to_recordset($1) AS c(message_id bigint, transport text, envelope_from text, envelope_to text[], raw text)",
                    None,
                    &[JsonB(captured).into()],
                ));
            }
        })
    });
}

/// Puts rows claimed but not sent (shutdown) back in the queue, without counting the attempt.
pub fn release(ids: Vec<i64>) {
    if ids.is_empty() {
        return;
    }
    BackgroundWorker::transaction(move || {
        Spi::connect_mut(|client| {
            spi(client.update(
                "UPDATE email.messages SET status = 'queued', attempts = greatest(attempts - 1, 0), lease_until = NULL, \
                 claimed_by = NULL, next_attempt_at = now(), updated_at = now() WHERE id = ANY($1) AND status = 'sending'",
                None,
                &[ids.into()],
            ));
        })
    });
}

/// Requeues expired leases (and, with `slot`, everything this slot left claimed); returns how many.
pub fn reap(slot: Option<i32>) -> usize {
    BackgroundWorker::transaction(move || {
        Spi::connect_mut(|client| {
            let sql = format!("WITH r AS ({MAINTAIN} RETURNING 1) SELECT count(*) FROM r");
            spi(client.update(sql.as_str(), None, &[slot.unwrap_or(-1).into()]))
                .first()
                .get::<i64>(1)
                .ok()
                .flatten()
                .unwrap_or(0) as usize
        })
    })
}

/// Milliseconds until the earliest queued row is due (0 when one is due now), `None` when empty.
pub fn next_due_ms() -> Option<f64> {
    BackgroundWorker::transaction(|| {
        Spi::get_one::<f64>(
            "SELECT greatest(extract(epoch FROM min(next_attempt_at) - now()) * 1000, 0)::float8 \
             FROM email.messages WHERE status = 'queued'",
        )
        .ok()
        .flatten()
    })
}

/// A cheap fingerprint of the transport table, to notice changes.
pub fn transports_version() -> String {
    BackgroundWorker::transaction(|| {
        Spi::get_one::<String>("SELECT count(*)::text || '/' || coalesce(max(updated_at)::text, '') FROM email.transports")
            .ok()
            .flatten()
            .unwrap_or_default()
    })
}

pub fn load_transports() -> Vec<TransportRow> {
    BackgroundWorker::transaction(|| {
        Spi::connect(|client| {
            spi(client.select(
                "SELECT t.name, t.fallback, s.dsn FROM email.transports t JOIN email.transport_secrets s USING (name)",
                None,
                &[],
            ))
            .map(|r| TransportRow {
                name: r.get(1).ok().flatten().unwrap_or_default(),
                fallback: r.get(2).ok().flatten(),
                dsn: r.get(3).ok().flatten().unwrap_or_default(),
            })
            .collect()
        })
    })
}

/// Deletes finished messages older than the retention, a bounded batch at a time.
pub fn purge_older_than(secs: f64) -> i64 {
    BackgroundWorker::transaction(move || {
        Spi::connect_mut(|client| {
            spi(client.update(
                "WITH d AS (DELETE FROM email.messages WHERE id IN (SELECT id FROM email.messages \
                 WHERE status IN ('sent', 'delivered', 'bounced', 'failed', 'cancelled', 'suppressed') \
                 AND created_at < now() - $1 * interval '1 second' LIMIT 10000) RETURNING 1) SELECT count(*) FROM d",
                None,
                &[secs.into()],
            ))
            .first()
            .get::<i64>(1)
            .ok()
            .flatten()
            .unwrap_or(0)
        })
    })
}
