//! The data behind `GET /dashboard`: read by the listener's main thread in its transaction
//! (SPI, the SQL in sql/listener/dashboard_*.sql), rendered by the pgrx-free
//! `crate::dashboard`. The handler only checks the password and waits for the page.

use pgrx::prelude::*;
use pgrx::spi::SpiHeapTupleData;

use crate::dashboard::{Bucket, Counts, Dashboard, Failure, QueueRow, WorkerRow};

const COUNTS: &str = include_str!("../../sql/listener/dashboard_counts.sql");
const QUEUE: &str = include_str!("../../sql/listener/dashboard_queue.sql");
const WORKERS: &str = include_str!("../../sql/listener/dashboard_workers.sql");
const FAILURES: &str = include_str!("../../sql/listener/dashboard_failures.sql");
const REASONS: &str = include_str!("../../sql/listener/dashboard_reasons.sql");
const NOW: &str = include_str!("../../sql/listener/dashboard_now.sql");

fn count(r: &SpiHeapTupleData, name: &str) -> u64 {
    r.get_by_name::<i64, _>(name).ok().flatten().unwrap_or(0).max(0) as u64
}

fn text(r: &SpiHeapTupleData, name: &str) -> Option<String> {
    r.get_by_name::<String, _>(name).ok().flatten()
}

fn fail(e: pgrx::spi::SpiError) -> ! {
    pgrx::error!("pg_email listener: reading the dashboard failed: {e}")
}

/// The buckets of one chart (`hour`: the last 24 hours, `day`: the last 30 days), oldest first.
fn buckets(client: &pgrx::spi::SpiClient, unit: &str) -> Vec<Bucket> {
    let rows = client.select(COUNTS, None, &[unit.into()]).unwrap_or_else(|e| fail(e));
    rows.map(|r| Bucket {
        label: text(&r, "label").unwrap_or_default(),
        counts: Counts {
            sent: count(&r, "sent"),
            delivered: count(&r, "delivered"),
            bounced: count(&r, "bounced"),
            complained: count(&r, "complained"),
            opened: count(&r, "opened"),
            clicked: count(&r, "clicked"),
        },
    })
    .collect()
}

fn total(buckets: &[Bucket]) -> Counts {
    buckets.iter().fold(Counts::default(), |t, b| Counts {
        sent: t.sent + b.counts.sent,
        delivered: t.delivered + b.counts.delivered,
        bounced: t.bounced + b.counts.bounced,
        complained: t.complained + b.counts.complained,
        opened: t.opened + b.counts.opened,
        clicked: t.clicked + b.counts.clicked,
    })
}

/// Everything the page shows, read in the caller's transaction.
pub fn read(database: &str) -> Dashboard {
    Spi::connect(|client| {
        let hourly = buckets(client, "hour");
        let daily = buckets(client, "day");
        let queue = client
            .select(QUEUE, None, &[])
            .unwrap_or_else(|e| fail(e))
            .map(|r| QueueRow {
                transport: text(&r, "transport").unwrap_or_default(),
                queued: count(&r, "queued"),
                due_now: count(&r, "due_now"),
                sending: count(&r, "sending"),
                oldest_due_secs: r.get_by_name::<f64, _>("oldest_due_secs").ok().flatten(),
            })
            .collect();
        let workers = client
            .select(WORKERS, None, &[])
            .unwrap_or_else(|e| fail(e))
            .map(|r| WorkerRow {
                kind: text(&r, "kind").unwrap_or_default(),
                slot: r.get_by_name::<i32, _>("slot").ok().flatten().unwrap_or(0),
                pid: r.get_by_name::<i32, _>("pid").ok().flatten(),
                state: text(&r, "state").unwrap_or_default(),
                in_flight: r.get_by_name::<i64, _>("in_flight").ok().flatten().unwrap_or(0),
                sent: r.get_by_name::<i64, _>("sent").ok().flatten().unwrap_or(0),
                failed: r.get_by_name::<i64, _>("failed").ok().flatten().unwrap_or(0),
                last_activity: text(&r, "last_activity"),
            })
            .collect();
        let failures = client
            .select(FAILURES, None, &[])
            .unwrap_or_else(|e| fail(e))
            .map(|r| Failure {
                at: text(&r, "at").unwrap_or_default(),
                message_id: r.get_by_name::<i64, _>("message_id").ok().flatten().unwrap_or(0),
                transport: text(&r, "transport").unwrap_or_default(),
                recipient: text(&r, "recipient"),
                event: text(&r, "event").unwrap_or_default(),
                response: text(&r, "response"),
            })
            .collect();
        let bounce_reasons = client
            .select(REASONS, None, &[])
            .unwrap_or_else(|e| fail(e))
            .map(|r| (text(&r, "reason").unwrap_or_default(), count(&r, "messages")))
            .collect();
        let generated_at = Spi::get_one::<String>(NOW).ok().flatten().unwrap_or_default();
        Dashboard {
            database: database.to_string(),
            generated_at,
            totals_24h: total(&hourly),
            totals_30d: total(&daily),
            hourly,
            daily,
            queue,
            workers,
            failures,
            bounce_reasons,
        }
    })
}
