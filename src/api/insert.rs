//! `INSERT INTO email.messages` as an API beside `email.send`: three triggers on the outbox,
//! run in the inserting backend, inside its statement, never touching the network.
//!
//! - `_messages_insert` (BEFORE INSERT, each row) applies `email.send`'s rules to the row: the
//!   same `draft::check`, transport, sender, topic, template, suppression and idempotency rules
//!   (shared with `send.rs`), the same messages and SQLSTATEs; it fills the columns email.send
//!   fills and refuses values in the worker's columns from anyone but the table's owner. A row the
//!   owner (or a superuser) inserts with a `message_id` is stored as it is: that is email.send's
//!   own INSERT, the listener's, and pg_dump's restore.
//! - `_messages_statement_start` / `_messages_statement_end` (BEFORE / AFTER each statement)
//!   bracket a statement: the row trigger counts its rows, looks suppressions up one index probe
//!   per row for the first `PROBED_ROWS` rows and from a set read once after that, and buffers
//!   the 'suppressed' receipts, which the AFTER trigger writes in one INSERT (the rows exist by
//!   then). A statement that fails leaves its frame behind; the subtransaction and transaction
//!   callbacks drop it.
//!
//! On a distributed outbox (Citus, `email.distribute()`) the triggers run on the row's shard, for
//! the outbox's owner only and without idempotency keys (see `_messages_insert` and `rules`);
//! their lookups of reference tables and the receipts written to the co-located shard run
//! nested (`citus::nested`).
//!
//! The row is read with one `heap_deform_tuple` and written with one `heap_modify_tuple`; column
//! numbers are resolved once per backend. Database lookups run as the table's owner with a fixed
//! search_path (as PostgreSQL's own foreign-key triggers switch user), so a role needs no rights
//! on the configuration tables, and only when a cache cannot answer.

use std::cell::RefCell;
use std::collections::HashSet;
use std::rc::Rc;
use std::sync::atomic::{AtomicBool, Ordering};

use lettre::message::Mailbox;
use pgrx::datum::TimestampWithTimeZone;
use pgrx::pg_sys;
use pgrx::prelude::*;
use pgrx::{FromDatum, IntoDatum, JsonB, PgTupleDesc};

use super::send::{self, Routing, Track};
use super::{invalid, raise, run_prepared};
use crate::draft::{self, texts};
use crate::message::{self, FieldError};

const STATUS_LABELS: &str = include_str!("../../sql/api/status_labels.sql");
const SUPPRESSION_SET: &str = include_str!("../../sql/api/suppression_set.sql");
const RECORD_SUPPRESSED_MANY: &str = include_str!("../../sql/api/record_suppressed_many.sql");
const EXISTING_IDS: &str = include_str!("../../sql/api/existing_ids.sql");
const RECORD_SUPPRESSED_LISTED: &str = include_str!("../../sql/api/record_suppressed_listed.sql");

/// Rows of a statement whose suppressions are looked up one index probe each; past them the
/// statement reads the suppression list once (a bulk INSERT … SELECT), unless it is longer than
/// `MAX_SET`, when probing goes on.
const PROBED_ROWS: u32 = 64;
/// Most suppressions (and erased addresses) a statement holds in memory.
const MAX_SET: i64 = 1_000_000;

macro_rules! columns {
    ($($name:ident),* $(,)?) => {
        /// The outbox's columns the trigger reads or writes, by name.
        #[allow(non_camel_case_types, dead_code)]
        #[derive(Clone, Copy)]
        enum C { $($name),* }
        const NAMES: &[&str] = &[$(stringify!($name)),*];
    };
}

columns!(
    id,
    status,
    transport,
    sender,
    recipients,
    cc,
    bcc,
    reply_to,
    subject,
    body,
    html,
    template,
    template_version,
    data,
    headers,
    tags,
    metadata,
    priority,
    send_at,
    idempotency_key,
    message_id,
    provider_message_id,
    attempts,
    next_attempt_at,
    lease_until,
    claimed_by,
    pending_recipients,
    attachment_count,
    last_error,
    created_at,
    created_by,
    sent_at,
    updated_at,
    request_hash,
    track_opens,
    track_clicks,
    list_unsubscribe,
    topic,
    raw,
);

/// Columns only pg_email writes (besides `created_by`, which must name the inserting role, and
/// the three timestamps, which must be the transaction's `now()`): NULL unless the owner inserts.
const WORKER_NULL: [C; 10] = [
    C::template_version,
    C::message_id,
    C::provider_message_id,
    C::lease_until,
    C::claimed_by,
    C::pending_recipients,
    C::last_error,
    C::sent_at,
    C::request_hash,
    C::raw,
];

/// Where each column is in the relation's tuples (0-based), and the `email.status` values.
struct Layout {
    rel: pg_sys::Oid,
    /// The descriptor's attribute count when read: a column added since reads it again.
    natts: i32,
    at: Vec<usize>,
    queued: pg_sys::Datum,
    suppressed: pg_sys::Datum,
}

/// The suppression list as read once by a statement: exact addresses and `*@domain`, and the
/// erased addresses' salted hashes.
struct SuppressionSet {
    addresses: HashSet<String>,
    salt: Option<Vec<u8>>,
    /// Hex SHA-256 of salt and address.
    forgotten: HashSet<String>,
}

impl SuppressionSet {
    fn holds(&self, bare: &str) -> bool {
        if self.addresses.contains(bare) {
            return true;
        }
        if let Some((_, domain)) = bare.rsplit_once('@') {
            if self.addresses.contains(&format!("*@{domain}")) {
                return true;
            }
        }
        match &self.salt {
            Some(salt) if !self.forgotten.is_empty() => {
                let mut input = salt.clone();
                input.extend_from_slice(bare.as_bytes());
                let digest = ring::digest::digest(&ring::digest::SHA256, &input);
                self.forgotten.contains(&digest.as_ref().iter().map(|b| format!("{b:02x}")).collect::<String>())
            }
            _ => false,
        }
    }
}

/// How a statement looks suppressions up.
enum Lookup {
    Probe,
    /// The list is too long to hold: probe every row.
    ProbeOnly,
    Set(Rc<SuppressionSet>),
}

/// One INSERT statement on the outbox in progress.
struct Frame {
    subxact: pg_sys::SubTransactionId,
    rows: u32,
    lookup: Lookup,
    /// 'suppressed' receipts to write when the statement ends: message id, transport,
    /// recipient, why.
    ids: Vec<i64>,
    transports: Vec<String>,
    recipients: Vec<String>,
    whys: Vec<String>,
}

thread_local! {
    static LAYOUT: RefCell<Option<Rc<Layout>>> = const { RefCell::new(None) };
    static FRAMES: RefCell<Vec<Frame>> = const { RefCell::new(Vec::new()) };
    /// The inserting role's name, by oid.
    static ROLE: RefCell<Option<(pg_sys::Oid, Rc<str>)>> = const { RefCell::new(None) };
}

static CALLBACKS: AtomicBool = AtomicBool::new(false);

fn new_frame() -> Frame {
    // SAFETY: reads the current subtransaction's id; always valid inside a transaction.
    let subxact = unsafe { pg_sys::GetCurrentSubTransactionId() };
    Frame {
        subxact,
        rows: 0,
        lookup: Lookup::Probe,
        ids: Vec::new(),
        transports: Vec::new(),
        recipients: Vec::new(),
        whys: Vec::new(),
    }
}

fn register_callbacks() {
    if !CALLBACKS.swap(true, Ordering::Relaxed) {
        // SAFETY: both callbacks are pg_guard'ed `extern "C-unwind"` functions with the
        // signatures PostgreSQL expects; they ignore their argument.
        unsafe {
            pg_sys::RegisterXactCallback(Some(on_xact), std::ptr::null_mut());
            pg_sys::RegisterSubXactCallback(Some(on_subxact), std::ptr::null_mut());
        }
    }
}

#[pg_guard]
unsafe extern "C-unwind" fn on_xact(event: pg_sys::XactEvent::Type, _arg: *mut std::ffi::c_void) {
    if matches!(
        event,
        pg_sys::XactEvent::XACT_EVENT_ABORT
            | pg_sys::XactEvent::XACT_EVENT_PARALLEL_ABORT
            | pg_sys::XactEvent::XACT_EVENT_COMMIT
            | pg_sys::XactEvent::XACT_EVENT_PARALLEL_COMMIT
            | pg_sys::XactEvent::XACT_EVENT_PREPARE
    ) {
        FRAMES.with(|f| f.borrow_mut().clear());
    }
}

#[pg_guard]
unsafe extern "C-unwind" fn on_subxact(
    event: pg_sys::SubXactEvent::Type,
    my_subid: pg_sys::SubTransactionId,
    _parent: pg_sys::SubTransactionId,
    _arg: *mut std::ffi::c_void,
) {
    if event == pg_sys::SubXactEvent::SUBXACT_EVENT_ABORT_SUB {
        // Statements begun in the aborted subtransaction (or in ones inside it) failed.
        FRAMES.with(|f| f.borrow_mut().retain(|frame| frame.subxact < my_subid));
    }
}

/// BEFORE INSERT FOR EACH STATEMENT on email.messages: a new frame for the statement.
#[pg_trigger]
fn _messages_statement_start<'a>(
    _trigger: &'a pgrx::PgTrigger<'a>,
) -> Result<Option<PgHeapTuple<'a, AllocatedByPostgres>>, pgrx::PgTriggerError> {
    register_callbacks();
    FRAMES.with(|f| f.borrow_mut().push(new_frame()));
    Ok(None)
}

/// AFTER INSERT FOR EACH STATEMENT on email.messages: writes the statement's 'suppressed'
/// receipts in one INSERT and forgets the statement.
#[pg_trigger]
fn _messages_statement_end<'a>(
    trigger: &'a pgrx::PgTrigger<'a>,
) -> Result<Option<PgHeapTuple<'a, AllocatedByPostgres>>, pgrx::PgTriggerError> {
    let Some(frame) = FRAMES.with(|f| f.borrow_mut().pop()) else { return Ok(None) };
    if frame.ids.is_empty() {
        return Ok(None);
    }
    // SAFETY: an AFTER trigger's relation is open for the call.
    let owner = unsafe { (*(*trigger.trigger_data().tg_relation).rd_rel).relowner };
    if super::citus::outbox().is_none() {
        as_owner(owner, || {
            Spi::connect_mut(|client| {
                let args = [frame.ids.into(), frame.transports.into(), frame.recipients.into(), frame.whys.into()];
                run_prepared(client, RECORD_SUPPRESSED_MANY, None, &args);
            })
        });
        return Ok(None);
    }
    // On Citus this runs on a shard of the outbox; its receipts go to the co-located shard.
    // Citus plans neither a generic plan here nor the one-statement form: which rows exist is
    // asked first.
    super::citus::nested(|| {
        as_owner(owner, || {
            Spi::connect_mut(|client| {
                let existing: HashSet<i64> = client
                    .select(EXISTING_IDS, None, &[frame.ids.clone().into()])
                    .unwrap_or_else(|e| super::spi_failed(e))
                    .first()
                    .get::<Vec<i64>>(1)
                    .ok()
                    .flatten()
                    .unwrap_or_default()
                    .into_iter()
                    .collect();
                let keep: Vec<usize> = (0..frame.ids.len()).filter(|&i| existing.contains(&frame.ids[i])).collect();
                if keep.is_empty() {
                    return;
                }
                let pick = |v: &[String]| keep.iter().map(|&i| v[i].clone()).collect::<Vec<_>>();
                let ids: Vec<i64> = keep.iter().map(|&i| frame.ids[i]).collect();
                let args = [
                    ids.into(),
                    pick(&frame.transports).into(),
                    pick(&frame.recipients).into(),
                    pick(&frame.whys).into(),
                ];
                if let Err(e) = client.update(RECORD_SUPPRESSED_LISTED, None, &args) {
                    super::spi_failed(e)
                }
            })
        })
    });
    Ok(None)
}

/// Runs `work` as `owner` with search_path `pg_catalog, email, pg_temp`, then switches back.
fn as_owner<R>(owner: pg_sys::Oid, work: impl FnOnce() -> R) -> R {
    super::switched(Some(owner), &[(c"search_path", c"pg_catalog, email, pg_temp")], work)
}

fn layout(rel: pg_sys::Relation, owner: pg_sys::Oid) -> Rc<Layout> {
    // SAFETY: the trigger's relation and its descriptor are open for the call.
    let (oid, natts) = unsafe { ((*rel).rd_id, (*(*rel).rd_att).natts) };
    if let Some(l) = LAYOUT.with(|l| l.borrow().clone()).filter(|l| l.rel == oid && l.natts == natts) {
        return l;
    }
    // SAFETY: as above; the descriptor is only read here.
    let desc = unsafe { PgTupleDesc::from_pg_unchecked((*rel).rd_att) };
    let at = NAMES
        .iter()
        .map(|name| {
            desc.iter().find(|a| !a.is_dropped() && a.name() == *name).map(|a| a.attnum as usize - 1).unwrap_or_else(
                || {
                    raise(
                        PgSqlErrorCode::ERRCODE_UNDEFINED_COLUMN,
                        format!("email.messages has no column {name}"),
                        None,
                    )
                },
            )
        })
        .collect();
    let (queued, suppressed) = as_owner(owner, || {
        Spi::connect_mut(|client| {
            let row = run_prepared(client, STATUS_LABELS, Some(1), &[]);
            let row = row.first();
            let get = |n: &str| row.get_by_name::<pg_sys::Oid, _>(n).ok().flatten().unwrap_or(pg_sys::InvalidOid);
            (get("queued"), get("suppressed"))
        })
    });
    let l = Rc::new(Layout { rel: oid, natts, at, queued: queued.into(), suppressed: suppressed.into() });
    LAYOUT.with(|c| *c.borrow_mut() = Some(l.clone()));
    l
}

/// The role a row is inserted as (current_user) and its name.
fn current_role() -> (pg_sys::Oid, Rc<str>) {
    // SAFETY: GetUserId reads backend state; GetUserNameFromId (noerr false) returns a palloc'd
    // NUL-terminated name or raises an ERROR; the name is copied at once.
    let oid = unsafe { pg_sys::GetUserId() };
    if let Some(known) = ROLE.with(|r| r.borrow().clone()).filter(|(o, _)| *o == oid) {
        return known;
    }
    let name: Rc<str> =
        unsafe { std::ffi::CStr::from_ptr(pg_sys::GetUserNameFromId(oid, false)) }.to_string_lossy().into();
    ROLE.with(|r| *r.borrow_mut() = Some((oid, name.clone())));
    (oid, name)
}

/// The deformed row.
struct Row<'l> {
    layout: &'l Layout,
    values: Vec<pg_sys::Datum>,
    nulls: Vec<bool>,
    replace: Vec<bool>,
}

impl Row<'_> {
    fn null(&self, c: C) -> bool {
        self.nulls[self.layout.at[c as usize]]
    }

    fn datum(&self, c: C) -> pg_sys::Datum {
        self.values[self.layout.at[c as usize]]
    }

    fn text(&self, c: C) -> Option<&str> {
        if self.null(c) {
            return None;
        }
        // SAFETY: a non-null text column of the deformed row; the datum points into the
        // trigger's tuple (or a detoasted copy in the trigger's memory context), which outlives
        // this borrow.
        unsafe { <&str as FromDatum>::from_datum(self.datum(c), false) }
    }

    /// A text[] column (its elements borrow from the array).
    fn array(&self, c: C) -> Option<pgrx::Array<'_, &str>> {
        if self.null(c) {
            return None;
        }
        // SAFETY: a non-null text[] column, valid for the call (as in `text`).
        unsafe { <pgrx::Array<&str> as FromDatum>::from_datum(self.datum(c), false) }
    }

    fn json(&self, c: C) -> Option<serde_json::Value> {
        if self.null(c) {
            return None;
        }
        // SAFETY: a non-null jsonb column, valid for the call.
        unsafe { JsonB::from_datum(self.datum(c), false) }.map(|j| j.0)
    }

    fn int(&self, c: C) -> Option<i32> {
        (!self.null(c)).then(|| self.datum(c).value() as i32)
    }

    fn boolean(&self, c: C) -> Option<bool> {
        (!self.null(c)).then(|| self.datum(c).value() != 0)
    }

    fn timestamp(&self, c: C) -> Option<i64> {
        (!self.null(c)).then(|| self.datum(c).value() as i64)
    }

    fn set(&mut self, c: C, value: Option<pg_sys::Datum>) {
        let i = self.layout.at[c as usize];
        self.values[i] = value.unwrap_or(pg_sys::Datum::from(0));
        self.nulls[i] = value.is_none();
        self.replace[i] = true;
    }
}

fn refuse_column(column: &str) -> ! {
    raise(
        PgSqlErrorCode::ERRCODE_INSUFFICIENT_PRIVILEGE,
        format!("column {column} of email.messages is set by pg_email; leave it out of the INSERT"),
        Some("Only the table's owner may store a row with these columns set (pg_dump, maintenance)."),
    )
}

/// Refuses a value in a column only pg_email writes.
fn check_worker_columns(row: &Row, role: &str, now: i64) {
    for c in WORKER_NULL {
        if !row.null(c) {
            refuse_column(NAMES[c as usize]);
        }
    }
    if row.datum(C::status) != row.layout.queued || row.null(C::status) {
        refuse_column("status");
    }
    for c in [C::attempts, C::attachment_count] {
        if row.int(c) != Some(0) {
            refuse_column(NAMES[c as usize]);
        }
    }
    for c in [C::created_at, C::updated_at, C::next_attempt_at] {
        if row.timestamp(c) != Some(now) {
            refuse_column(NAMES[c as usize]);
        }
    }
    if row.text(C::created_by) != Some(role) {
        raise(
            PgSqlErrorCode::ERRCODE_INSUFFICIENT_PRIVILEGE,
            format!(
                "created_by must be the inserting role ({}); a role cannot store mail under another role's name",
                message::show(role)
            ),
            Some("Leave created_by out of the INSERT."),
        )
    }
}

/// The elements of an address-list column (`recipients`, `cc`, `bcc`) joined for
/// `draft::check`, and how many there are. A NULL element is refused.
fn address_list(field: &str, elements: Option<pgrx::Array<'_, &str>>) -> (Option<String>, usize) {
    let Some(elements) = elements else { return (None, 0) };
    let mut joined = String::new();
    for (i, e) in elements.iter().enumerate() {
        let e = e.unwrap_or_else(|| invalid(FieldError::new(field, format!("element {} is NULL", i + 1))));
        if i > 0 {
            joined.push_str(", ");
        }
        joined.push_str(e);
    }
    (Some(joined), elements.len())
}

/// Each element of an address-list column is one mailbox.
fn one_mailbox_each(field: &str, elements: usize, parsed: &[Mailbox]) {
    if elements != parsed.len() {
        invalid(FieldError::new(
            field,
            format!(
                "each element must be one mailbox ('Name <addr@example.org>'); {elements} elements hold {} addresses",
                parsed.len()
            ),
        ))
    }
}

/// Runs `work` on the current statement's frame (a statement whose BEFORE STATEMENT trigger did
/// not run, should there be one, gets a frame here).
fn with_frame<R>(work: impl FnOnce(&mut Frame) -> R) -> R {
    FRAMES.with(|f| {
        let mut frames = f.borrow_mut();
        if frames.is_empty() {
            frames.push(new_frame());
        }
        let last = frames.len() - 1;
        work(&mut frames[last])
    })
}

/// The suppressed ones among `bare`, by the statement's way of looking them up.
fn suppressed_among(client: &mut pgrx::spi::SpiClient, bare: &[String]) -> Vec<String> {
    let (set, load) = with_frame(|frame| {
        frame.rows += 1;
        match &frame.lookup {
            Lookup::Set(s) => (Some(s.clone()), false),
            Lookup::Probe => (None, frame.rows > PROBED_ROWS),
            Lookup::ProbeOnly => (None, false),
        }
    });
    match if load { load_set(client) } else { set } {
        Some(s) => bare.iter().filter(|a| s.holds(a)).cloned().collect(),
        None => send::suppressed(client, bare),
    }
}

/// The suppression list, when it is at most `MAX_SET` long, kept for the rest of the
/// statement; otherwise the statement probes every row (and does not ask again).
fn load_set(client: &mut pgrx::spi::SpiClient) -> Option<Rc<SuppressionSet>> {
    let found = run_prepared(client, SUPPRESSION_SET, Some(1), &[MAX_SET.into()]);
    let row = found.first();
    let addresses: Option<Vec<String>> = row.get_by_name("addresses").ok().flatten();
    let set = addresses.map(|addresses| {
        let salt: Option<Vec<u8>> = row.get_by_name("salt").ok().flatten();
        let forgotten: Vec<String> = row.get_by_name("forgotten").ok().flatten().unwrap_or_default();
        Rc::new(SuppressionSet {
            addresses: addresses.into_iter().collect(),
            salt,
            forgotten: forgotten.into_iter().collect(),
        })
    });
    with_frame(|frame| frame.lookup = set.clone().map_or(Lookup::ProbeOnly, Lookup::Set));
    set
}

/// BEFORE INSERT FOR EACH ROW on email.messages: `email.send`'s rules for the row.
#[pg_trigger]
fn _messages_insert<'a>(
    trigger: &'a pgrx::PgTrigger<'a>,
) -> Result<Option<PgHeapTuple<'a, impl WhoAllocated>>, pgrx::PgTriggerError> {
    let td = trigger.trigger_data();
    if td.tg_trigtuple.is_null() || td.tg_relation.is_null() {
        raise(
            PgSqlErrorCode::ERRCODE_E_R_I_E_TRIGGER_PROTOCOL_VIOLATED,
            "email._messages_insert must be a BEFORE INSERT trigger FOR EACH ROW on email.messages",
            None,
        )
    }
    let rel = td.tg_relation;
    // SAFETY: a row trigger's relation is open for the call.
    let owner = unsafe { (*(*rel).rd_rel).relowner };
    let (role_oid, role) = current_role();
    // SAFETY: superuser() reads the current user's (cached) rolsuper.
    let privileged = role_oid == owner || unsafe { pg_sys::superuser() };
    let layout = layout(rel, owner);
    // SAFETY: tg_trigtuple is the row being inserted, rd_att its descriptor.
    if privileged
        && !unsafe {
            pg_sys::heap_attisnull(td.tg_trigtuple, layout.at[C::message_id as usize] as i32 + 1, (*rel).rd_att)
        }
    {
        // Stored mail (email.send's own INSERT, a restore): nothing to check or fill.
        return Ok(trigger.new());
    }
    let citus = super::citus::outbox().is_some();
    if citus && !privileged {
        // On Citus this runs on a shard, to which the coordinator sends every column, the id and
        // the worker's columns with their defaults: a role's row could not be told from one that
        // names them (README, "Scaling out with Citus"). Its column grants stop it before this.
        raise(
            PgSqlErrorCode::ERRCODE_FEATURE_NOT_SUPPORTED,
            "INSERT INTO email.messages by a role other than the outbox's owner is not supported on a distributed outbox (Citus)",
            Some("Queue mail with email.send or email.send_template."),
        )
    }
    // SAFETY: tg_trigtuple is the row being inserted, rd_att its descriptor; the arrays are
    // sized to the descriptor's attribute count, as heap_deform_tuple requires.
    let mut row = unsafe {
        let desc = (*rel).rd_att;
        let natts = (*desc).natts as usize;
        let mut row = Row {
            layout: &layout,
            values: vec![pg_sys::Datum::from(0); natts],
            nulls: vec![true; natts],
            replace: vec![false; natts],
        };
        pg_sys::heap_deform_tuple(td.tg_trigtuple, desc, row.values.as_mut_ptr(), row.nulls.as_mut_ptr());
        row
    };
    // SAFETY: reads the transaction's start time (now()).
    let now = unsafe { pg_sys::GetCurrentTransactionStartTimestamp() };
    if !privileged {
        check_worker_columns(&row, &role, now);
    }
    let fill = if citus {
        // The lookups read reference tables, from a trigger on a shard.
        super::citus::nested(|| rules(&row, owner, now, true))
    } else {
        rules(&row, owner, now, false)
    };
    let Some(fill) = fill else { return Ok(None) };
    fill.write(&mut row);
    let id = row.datum(C::id).value() as i64;
    if !fill.dropped.is_empty() {
        with_frame(|frame| {
            for (who, why) in fill.bare.iter().filter_map(|b| fill.dropped.iter().find(|(a, _)| a == b)) {
                frame.ids.push(id);
                frame.transports.push(fill.transport.clone());
                frame.recipients.push(who.clone());
                frame.whys.push(why.clone());
            }
        });
    }
    if !fill.all_suppressed {
        crate::xact::mark_queued();
    }
    // SAFETY: one new tuple from the old one and the replaced columns, formed in the trigger's
    // memory context, with the relation's descriptor.
    let formed = unsafe {
        let desc = (*rel).rd_att;
        let tuple = pg_sys::heap_modify_tuple(
            td.tg_trigtuple,
            desc,
            row.values.as_mut_ptr(),
            row.nulls.as_mut_ptr(),
            row.replace.as_mut_ptr(),
        );
        PgHeapTuple::from_heap_tuple(PgTupleDesc::from_pg_unchecked(desc), tuple)
    };
    Ok(Some(formed))
}

/// What the rules decided for a row: the values written back, and the dropped recipients.
struct Fill {
    transport: String,
    sender: String,
    lists: [Vec<Mailbox>; 3],
    reply_to: Option<String>,
    subject: Option<String>,
    message_id: String,
    all_suppressed: bool,
    request_hash: Option<String>,
    track: [bool; 3],
    priority: i32,
    send_at: i64,
    template_version: Option<i32>,
    data: Option<serde_json::Value>,
    bare: Vec<String>,
    dropped: Vec<(String, String)>,
}

impl Fill {
    fn write(&self, row: &mut Row) {
        let text = |s: &str| s.into_datum();
        let list = |l: &[Mailbox]| (!l.is_empty()).then(|| texts(l).into_datum()).flatten();
        let status = if self.all_suppressed { row.layout.suppressed } else { row.layout.queued };
        row.set(C::transport, text(&self.transport));
        row.set(C::sender, text(&self.sender));
        row.set(C::recipients, texts(&self.lists[0]).into_datum());
        row.set(C::cc, list(&self.lists[1]));
        row.set(C::bcc, list(&self.lists[2]));
        row.set(C::reply_to, self.reply_to.as_deref().and_then(text));
        if let Some(s) = &self.subject {
            row.set(C::subject, text(s));
        }
        row.set(C::message_id, text(&self.message_id));
        row.set(C::status, Some(status));
        row.set(C::request_hash, self.request_hash.as_deref().and_then(text));
        row.set(C::track_opens, self.track[0].into_datum());
        row.set(C::track_clicks, self.track[1].into_datum());
        row.set(C::list_unsubscribe, self.track[2].into_datum());
        row.set(C::priority, self.priority.into_datum());
        row.set(C::send_at, Some(pg_sys::Datum::from(self.send_at)));
        row.set(C::next_attempt_at, Some(pg_sys::Datum::from(self.send_at)));
        if let Some(v) = self.template_version {
            row.set(C::template_version, v.into_datum());
        }
        if let Some(d) = &self.data {
            row.set(C::data, JsonB(d.clone()).into_datum());
        }
    }
}

/// `email.send`'s rules for one row, in its order; None: the row repeats an idempotency key
/// with the same content and is skipped. `citus`: the row is on a shard of a distributed outbox,
/// where its id was chosen before an idempotency key could derive it (api/citus.rs).
fn rules(row: &Row, owner: pg_sys::Oid, now: i64, citus: bool) -> Option<Fill> {
    let (to_joined, to_count) = address_list("recipients", row.array(C::recipients));
    let (cc_joined, cc_count) = address_list("cc", row.array(C::cc));
    let (bcc_joined, bcc_count) = address_list("bcc", row.array(C::bcc));
    let headers = row.json(C::headers);
    let metadata = row.json(C::metadata);
    let tags: Option<Vec<Option<String>>> =
        row.array(C::tags).map(|t| t.iter().map(|e| e.map(str::to_string)).collect());
    let template = row.text(C::template);
    let send_at = row.timestamp(C::send_at);
    let track = Track {
        opens: row.boolean(C::track_opens),
        clicks: row.boolean(C::track_clicks),
        list_unsubscribe: row.boolean(C::list_unsubscribe),
    };
    let (subject, body, html) = (row.text(C::subject), row.text(C::body), row.text(C::html));
    // Template mail: the template renders subject, body and html (as email.send_template).
    let mut data = None;
    let mut rendered_subject = None;
    let mut version = None;
    if let Some(name) = template {
        for (field, given) in [("subject", subject.is_some()), ("body", body.is_some()), ("html", html.is_some())] {
            if given {
                invalid(FieldError::new(field, "must be NULL when template is given: the template renders it"));
            }
        }
        let d = row.json(C::data).unwrap_or_else(|| serde_json::json!({}));
        if !d.is_object() {
            invalid(FieldError::new("data", "must be a JSON object"));
        }
        let (v, rendered) = as_owner(owner, || {
            let v = send::template_version(name).unwrap_or_else(|| super::templates::no_such_template(name));
            (v, super::templates::render_current(name, &d))
        });
        let size = rendered.subject.len()
            + rendered.body.as_ref().map_or(0, String::len)
            + rendered.html.as_ref().map_or(0, String::len);
        draft::check_rendered_size(size, &send::limits()).unwrap_or_else(|e| invalid(e));
        version = Some(v);
        rendered_subject = Some(rendered.subject);
        data = Some(d);
    }
    let d = draft::Draft {
        recipients: to_joined.as_deref(),
        subject: rendered_subject.as_deref().or(subject),
        body,
        html,
        cc: cc_joined.as_deref(),
        bcc: bcc_joined.as_deref(),
        reply_to: row.text(C::reply_to),
        headers: headers.as_ref(),
        attachments: None,
        tags: tags.as_deref(),
        metadata: metadata.as_ref(),
        idempotency_key: row.text(C::idempotency_key),
        templated: template.is_some(),
    };
    let c = draft::check(&d, &send::limits()).unwrap_or_else(|e| invalid(e));
    if citus && d.idempotency_key.is_some() {
        raise(
            PgSqlErrorCode::ERRCODE_FEATURE_NOT_SUPPORTED,
            "idempotency_key in INSERT INTO email.messages is not supported on a distributed outbox (Citus)",
            Some("Queue mail with an idempotency key through email.send or email.send_template."),
        )
    }
    one_mailbox_each("recipients", to_count, &c.to);
    one_mailbox_each("cc", cc_count, &c.cc);
    one_mailbox_each("bcc", bcc_count, &c.bcc);
    let bare = c.bare_addresses();
    let r = Routing {
        sender: row.text(C::sender),
        transport: row.text(C::transport),
        // The column's default (now()) stands for "not given", as in email.send.
        send_at: send_at.filter(|t| *t != now).map(|t| {
            // SAFETY: a timestamptz datum's value is the timestamp itself.
            unsafe { TimestampWithTimeZone::from_datum(pg_sys::Datum::from(t), false) }.expect("a timestamp")
        }),
        priority: row.int(C::priority),
        template: template.zip(version).zip(data.as_ref()).map(|((n, v), d)| (n, v, d)),
        track,
        topic: row.text(C::topic),
    };
    let created_by = row.text(C::created_by).unwrap_or_default();
    // After the lookups, as email.send: the sender, the kept lists, the tracking flags.
    let settle = |route: &send::Route, dropped: &[(String, String)]| {
        let sender = send::resolve_sender(&r, route);
        let kept = send::drop_suppressed(&c, dropped);
        let track = r.track.resolve(r.topic.is_some());
        (sender, kept, track)
    };
    let fill = |route: &send::Route, dropped: Vec<(String, String)>, sender: Mailbox, kept: send::Kept, track| Fill {
        transport: route.name.clone(),
        sender: message::mailbox_text(&sender),
        message_id: message::new_message_id(&sender),
        all_suppressed: kept.all_suppressed,
        lists: kept.lists,
        reply_to: c.reply_to.clone(),
        subject: rendered_subject.clone(),
        request_hash: d.idempotency_key.map(|_| send::call_fingerprint(&d, &r)),
        track,
        priority: r.priority.unwrap_or(0),
        send_at: send_at.unwrap_or(now),
        template_version: version,
        data: data.clone(),
        bare: bare.clone(),
        dropped,
    };
    // The common row needs no database: its transport is cached, nothing is suppressed, and it
    // has neither a topic nor an idempotency key.
    if r.topic.is_none() && d.idempotency_key.is_none() {
        if let Some(route) = send::cached_route(r.transport).filter(|route| !route.any_suppressed) {
            let (sender, kept, track) = settle(&route, &[]);
            return Some(fill(&route, Vec::new(), sender, kept, track));
        }
    }
    as_owner(owner, || {
        Spi::connect_mut(|client| {
            let route = send::lookup_route(client, r.transport);
            let topic = r.topic.map(|t| (t, send::topic_default(client, t)));
            let listed = if route.any_suppressed { suppressed_among(client, &bare) } else { Vec::new() };
            let dropped = send::dropped_given(listed, topic, &bare);
            let (sender, kept, track) = settle(&route, &dropped);
            let made = fill(&route, dropped, sender, kept, track);
            if let Some(key) = d.idempotency_key {
                let existing = run_prepared(client, send::MESSAGE_BY_KEY, Some(1), &[key.into(), created_by.into()]);
                if !existing.is_empty() {
                    let row = existing.first();
                    let id: i64 = row.get_by_name("id").ok().flatten().unwrap_or_default();
                    let stored: Option<String> = row.get_by_name("request_hash").ok().flatten();
                    if stored.is_some() && stored != made.request_hash {
                        send::different_content(key, id);
                    }
                    return None;
                }
            }
            Some(made)
        })
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn set(addresses: &[&str], salt: Option<&[u8]>, forgotten: &[&str]) -> SuppressionSet {
        SuppressionSet {
            addresses: addresses.iter().map(|a| a.to_string()).collect(),
            salt: salt.map(<[u8]>::to_vec),
            forgotten: forgotten.iter().map(|a| a.to_string()).collect(),
        }
    }

    #[test]
    fn a_set_holds_addresses_domains_and_erased_hashes() {
        // sha256(b"salt" || b"gone@x.org"), computed with Python's hashlib.
        let gone = "519b10f086e1278b2262a675554a659c8e625908d1eb92c3260304a8e38798c1";
        let s = set(&["a@x.org", "*@blocked.org"], Some(b"salt"), &[gone]);
        assert!(s.holds("a@x.org"));
        assert!(!s.holds("b@x.org"));
        assert!(s.holds("anyone@blocked.org"));
        assert!(!s.holds("anyone@blocked.org.evil"));
        assert!(s.holds("gone@x.org"));
        assert!(!s.holds("kept@x.org"));
        // Without the salt, no hash can match.
        assert!(!set(&[], None, &[gone]).holds("gone@x.org"));
    }
}
