//! A primary-key lookup without SPI, for the topic check `email.send` makes on every call (on a
//! distributed outbox, a query: there the rows are in Citus' copies). Runs
//! in the caller's backend, inside its transaction. A one-row SPI statement costs about 7 µs of
//! executor set-up and tear-down per call, more than the rest of the check; an index probe
//! costs about 1.5 µs. It reads with the calling statement's snapshot (the active one), so an
//! `INSERT … SELECT email.send(...)` sees one subscription list from its start to its end, as
//! any single statement does.

use std::cell::Cell;
use std::ffi::CStr;

use pgrx::pg_sys;
use pgrx::{FromDatum, IntoDatum};

/// The OIDs of email.subscriptions and its primary key, and the attribute number of
/// `subscribed`, as last looked up.
#[derive(Clone, Copy)]
struct Found {
    heap: pg_sys::Oid,
    index: pg_sys::Oid,
    attnum: pg_sys::AttrNumber,
}

thread_local! {
    static FOUND: Cell<Option<Found>> = const { Cell::new(None) };
}

/// Looks the relations up by name in schema email.
///
/// # Safety
/// Backend main thread, inside a transaction.
unsafe fn look_up() -> Option<Found> {
    let schema = pg_sys::get_namespace_oid(c"email".as_ptr(), true);
    if schema == pg_sys::InvalidOid {
        return None;
    }
    let heap = pg_sys::get_relname_relid(c"subscriptions".as_ptr(), schema);
    let index = pg_sys::get_relname_relid(c"subscriptions_pkey".as_ptr(), schema);
    if heap == pg_sys::InvalidOid || index == pg_sys::InvalidOid {
        return None;
    }
    let attnum = pg_sys::get_attnum(heap, c"subscribed".as_ptr());
    (attnum > 0).then_some(Found { heap, index, attnum })
}

/// Opens relation `oid` if it still is the one named `name` (an OID remembered from an earlier
/// transaction may have been dropped, or reused).
///
/// # Safety
/// Backend main thread, inside a transaction.
unsafe fn open_named(oid: pg_sys::Oid, name: &CStr) -> Option<pg_sys::Relation> {
    let rel = pg_sys::try_relation_open(oid, pg_sys::AccessShareLock as pg_sys::LOCKMODE);
    if rel.is_null() {
        return None;
    }
    if CStr::from_ptr((*(*rel).rd_rel).relname.data.as_ptr()) == name {
        Some(rel)
    } else {
        pg_sys::relation_close(rel, pg_sys::AccessShareLock as pg_sys::LOCKMODE);
        None
    }
}

/// Opens email.subscriptions and its primary key, looking them up again when needed.
///
/// # Safety
/// Backend main thread, inside a transaction.
unsafe fn open() -> Option<(Found, pg_sys::Relation, pg_sys::Relation)> {
    for fresh in [false, true] {
        let found = match FOUND.get() {
            Some(f) if !fresh => f,
            _ => {
                let f = look_up()?;
                FOUND.set(Some(f));
                f
            }
        };
        let Some(heap) = open_named(found.heap, c"subscriptions") else { continue };
        let Some(index) = open_named(found.index, c"subscriptions_pkey") else {
            pg_sys::relation_close(heap, pg_sys::AccessShareLock as pg_sys::LOCKMODE);
            continue;
        };
        return Some((found, heap, index));
    }
    None
}

const SUBSCRIBED: &str = include_str!("../../sql/api/subscribed.sql");

/// `email.subscriptions.subscribed` for (`address`, `topic`), or None without a row.
pub(crate) fn subscribed(address: &str, topic: &str) -> Option<bool> {
    // On Citus the rows are in this node's copy of the reference table, which Citus reads.
    if super::citus::outbox().is_some() {
        return match pgrx::Spi::get_one_with_args::<bool>(SUBSCRIBED, &[address.into(), topic.into()]) {
            Ok(v) => v,
            Err(pgrx::spi::SpiError::InvalidPosition) => None,
            Err(e) => super::spi_failed(e),
        };
    }
    // SAFETY: runs on the backend's main thread inside a transaction (email.send). The
    // relations are opened with AccessShareLock, kept to the end of the transaction as any
    // query would; the scan keys point at text datums that live in the current memory context
    // for the whole scan; the scan, its slot and the snapshot are used only before this
    // function returns, and everything opened is closed (an ERROR meanwhile aborts the
    // transaction, whose resource owner releases them).
    unsafe {
        let (found, heap, index) = open()?;
        // The key (address, topic), compared with the index's own collations.
        let mut keys: [pg_sys::ScanKeyData; 2] = std::mem::zeroed();
        for (i, value) in [address, topic].into_iter().enumerate() {
            pg_sys::ScanKeyEntryInitialize(
                &mut keys[i],
                0,
                (i + 1) as pg_sys::AttrNumber,
                pg_sys::BTEqualStrategyNumber as pg_sys::StrategyNumber,
                pg_sys::InvalidOid,
                *(*index).rd_indcollation.add(i),
                pg_sys::Oid::from(pg_sys::F_TEXTEQ),
                value.into_datum().unwrap_or(pg_sys::Datum::from(0)),
            );
        }
        let snapshot =
            if pg_sys::ActiveSnapshotSet() { pg_sys::GetActiveSnapshot() } else { pg_sys::GetTransactionSnapshot() };
        let scan = pg_sys::index_beginscan(heap, index, snapshot, 2, 0);
        pg_sys::index_rescan(scan, keys.as_mut_ptr(), 2, std::ptr::null_mut(), 0);
        let slot = pg_sys::table_slot_create(heap, std::ptr::null_mut());
        let subscribed = if pg_sys::index_getnext_slot(scan, pg_sys::ScanDirection::ForwardScanDirection, slot) {
            let mut isnull = false;
            let datum = pg_sys::slot_getattr(slot, found.attnum.into(), &mut isnull);
            bool::from_datum(datum, isnull)
        } else {
            None
        };
        pg_sys::ExecDropSingleTupleTableSlot(slot);
        pg_sys::index_endscan(scan);
        pg_sys::relation_close(index, pg_sys::NoLock as pg_sys::LOCKMODE);
        pg_sys::relation_close(heap, pg_sys::NoLock as pg_sys::LOCKMODE);
        subscribed
    }
}
