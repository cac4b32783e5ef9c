//! `email.send` on a Citus cluster whose outbox `email.distribute()` distributed: runs in the
//! caller's backend, in its transaction, on any node. What a send needs to know is read once
//! per transaction (without Citus installed, a catalog cache lookup decides it with no query):
//! whether the outbox is distributed, and which hash ranges of its shards this node holds.
//!
//! - On a node that holds shards, a message gets an id whose shard is on this node: its row is
//!   written locally, in this node's part of the transaction, and sent by this node's worker
//!   (woken at commit). That is also what lets a trigger on a distributed table send mail: such
//!   a trigger runs on a shard, where Citus refuses any statement that could reach another node;
//!   a write to a local shard is allowed (`citus.allow_nested_distributed_execution`, set at a
//!   GUC nest level of its own for the send only).
//! - A message with an idempotency key gets an id derived from (role, key), so that the primary
//!   key is the uniqueness check Citus can enforce (it cannot enforce the single-node unique
//!   index on (created_by, idempotency_key), which does not include the distribution column).

use std::cell::RefCell;

use pgrx::prelude::*;
use ring::digest::{digest, SHA256};

use super::spi_failed;

const OUTBOX: &str = include_str!("../../sql/api/citus_outbox.sql");

/// Ids derived from an idempotency key live at 2^62 and above, far from every node's sequence
/// range (group id << 48, for group ids below 16384).
const KEYED_IDS: i64 = 1 << 62;

/// How a distributed outbox looks from this node.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Node {
    /// The hash ranges (inclusive) of the email.messages shards placed on this node.
    local: Vec<(i32, i32)>,
    /// email.messages_id_seq, and its owner.
    sequence: pg_sys::Oid,
    owner: pg_sys::Oid,
}

thread_local! {
    /// (local transaction id, what it found) for the transaction that last asked.
    static SEEN: RefCell<Option<(u32, Option<Node>)>> = const { RefCell::new(None) };
}

/// The distributed outbox as this node sees it, or None when email.messages is an ordinary
/// table (always, when Citus is not installed in this database).
pub(crate) fn outbox() -> Option<Node> {
    // SAFETY: a catalog cache lookup by name in pg_catalog, on the backend's main thread inside
    // a transaction; it returns InvalidOid when there is no such relation.
    let citus = unsafe {
        pg_sys::get_relname_relid(c"pg_dist_partition".as_ptr(), pg_sys::Oid::from(pg_sys::PG_CATALOG_NAMESPACE))
    };
    if citus == pg_sys::InvalidOid {
        return None;
    }
    // SAFETY: MyProc is this backend's PGPROC, valid for its life; lxid changes with each
    // transaction.
    let xact = unsafe { (*pg_sys::MyProc).lxid };
    if let Some(found) = SEEN.with(|s| s.borrow().as_ref().filter(|(x, _)| *x == xact).map(|(_, n)| n.clone())) {
        return found;
    }
    let found = Spi::connect(|client| {
        let rows = client.select(OUTBOX, Some(1), &[]).unwrap_or_else(|e| spi_failed(e));
        let row = rows.into_iter().next()?;
        let mins: Vec<i32> = row.get_by_name("mins").ok().flatten().unwrap_or_default();
        let maxs: Vec<i32> = row.get_by_name("maxs").ok().flatten().unwrap_or_default();
        let sequence: pg_sys::Oid = row.get_by_name("sequence").ok().flatten().unwrap_or(pg_sys::InvalidOid);
        let owner: pg_sys::Oid = row.get_by_name("owner").ok().flatten().unwrap_or(pg_sys::InvalidOid);
        Some(Node { local: mins.into_iter().zip(maxs).collect(), sequence, owner })
    });
    SEEN.with(|s| *s.borrow_mut() = Some((xact, found.clone())));
    found
}

impl Node {
    /// Whether message `id`'s shard is on this node.
    pub(crate) fn holds(&self, id: i64) -> bool {
        let hash = hash_int8(id);
        self.local.iter().any(|(lo, hi)| (*lo..=*hi).contains(&hash))
    }

    /// A new message id whose shard is on this node; None on a node without shards.
    pub(crate) fn local_id(&self) -> Option<i64> {
        if self.local.is_empty() {
            return None;
        }
        // With a share s of the shards here, a draw is local with probability s: 1,000 draws
        // miss only when s is below a thousandth, and then the plain next id is used.
        // The sequence is the identity of email.messages, which a role that may send fills
        // anyway: it is advanced as its owner.
        super::switched(Some(self.owner), &[], || {
            let mut id = 0;
            for _ in 0..1000 {
                // SAFETY: nextval_oid of the outbox's own sequence, its oid read from the catalog
                // in this transaction.
                id = unsafe { pgrx::direct_function_call::<i64>(pg_sys::nextval_oid, &[self.sequence.into_datum()]) }
                    .unwrap_or_default();
                if self.holds(id) {
                    break;
                }
            }
            Some(id)
        })
    }
}

/// The id of the message role `creator` queues with idempotency key `key` on a distributed
/// outbox: the same (role, key) always gives the same id.
pub(crate) fn keyed_id(creator: &str, key: &str) -> i64 {
    let input = [creator.as_bytes(), &[0], key.as_bytes()].concat();
    let mut first = [0u8; 8];
    first.copy_from_slice(&digest(&SHA256, &input).as_ref()[..8]);
    KEYED_IDS | (i64::from_be_bytes(first) & (KEYED_IDS - 1))
}

/// PostgreSQL's hash of a bigint (hashint8), which Citus uses to place it in a shard.
fn hash_int8(id: i64) -> i32 {
    // SAFETY: hashint8 is a strict, pure function of one int8 argument.
    unsafe { pgrx::direct_function_call::<i32>(pg_sys::hashint8, &[id.into_datum()]) }.unwrap_or_default()
}

/// Runs `work` with citus.allow_nested_distributed_execution on, at a GUC nest level of its own.
/// Only for statements that write this node's own shards: see the module's doc.
pub(crate) fn nested<T>(work: impl FnOnce() -> T) -> T {
    super::switched(None, &[(c"citus.allow_nested_distributed_execution", c"on")], work)
}

#[cfg(any(test, feature = "pg_test"))]
#[pg_schema]
mod tests {
    use pgrx::prelude::*;

    #[pg_test]
    fn hash_int8_is_postgres_hashint8() {
        for id in [0_i64, 1, -1, 42, 1 << 32, (1 << 48) + 7, i64::MAX, i64::MIN, super::keyed_id("app", "k")] {
            let theirs = Spi::get_one_with_args::<i32>("SELECT hashint8($1)", &[id.into()]).unwrap().unwrap();
            assert_eq!(super::hash_int8(id), theirs, "id {id}");
        }
    }

    #[pg_test]
    fn keyed_ids_are_stable_per_role_and_key_and_above_every_sequence() {
        let a = super::keyed_id("app", "order-1");
        assert_eq!(a, super::keyed_id("app", "order-1"));
        assert_ne!(a, super::keyed_id("other", "order-1"));
        assert_ne!(a, super::keyed_id("app", "order-2"));
        // ("ap", "porder-1") must not collide with ("app", "order-1").
        assert_ne!(a, super::keyed_id("ap", "porder-1"));
        assert!(a >= super::KEYED_IDS);
    }
}
