//! The machine-readable parts of report mail: the field blocks of an RFC 3464
//! `message/delivery-status` (and its RFC 6533 `message/global-delivery-status` twin), of an
//! RFC 5965 `message/feedback-report` and of an RFC 8098 `message/disposition-notification`, and
//! the SMTP replies quoted in them. No pgrx here: it runs in the listener worker's main thread
//! and in backends (`email.ingest_message`).
//!
//! mail-parser hands these parts over as bytes (it does not know their types), so the fields are
//! read here: header-like `Name: value` lines, folded lines unfolded, blocks separated by blank
//! lines. The reading is lenient (a missing blank line between two recipients still gives two
//! recipients) and bounded: at most `MAX_RECIPIENT_BLOCKS` recipients, `MAX_FIELDS` fields a
//! block and `MAX_FIELD` bytes a value; the rest is skipped, never an error.

use crate::inbound::{bounded, MAX_RECIPIENT_BLOCKS};
use crate::reply::strip_type;

/// Fields kept in one block; the rest of the block is skipped.
const MAX_FIELDS: usize = 64;
/// Bytes kept of one field value (a `Diagnostic-Code` is cut to `MAX_RESPONSE` later).
const MAX_FIELD: usize = 4 * 1024;
/// Length of a field name that is still taken for one.
const MAX_NAME: usize = 64;

/// The fields of one block, in order: names lower-case, values unfolded and trimmed.
pub(crate) type Block = Vec<(String, String)>;

/// Splits a field-block body into its blocks. Stops after `max_blocks` blocks.
pub(crate) fn blocks(text: &str, max_blocks: usize) -> Vec<Block> {
    let mut out: Vec<Block> = Vec::new();
    let mut current: Block = Vec::new();
    for line in text.split('\n') {
        let line = line.strip_suffix('\r').unwrap_or(line);
        if line.trim().is_empty() {
            if !current.is_empty() {
                out.push(std::mem::take(&mut current));
                if out.len() >= max_blocks {
                    return out;
                }
            }
            continue;
        }
        if line.starts_with([' ', '\t']) {
            // A folded line continues the last field's value.
            if let Some((_, value)) = current.last_mut() {
                if value.len() < MAX_FIELD {
                    value.push(' ');
                    value.push_str(line.trim());
                    *value = bounded(value, MAX_FIELD);
                }
            }
            continue;
        }
        let Some((name, value)) = line.split_once(':') else { continue };
        let name = name.trim();
        let is_name = !name.is_empty()
            && name.len() <= MAX_NAME
            && name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_');
        if is_name && current.len() < MAX_FIELDS {
            current.push((name.to_ascii_lowercase(), bounded(value.trim(), MAX_FIELD)));
        }
    }
    if !current.is_empty() && out.len() < max_blocks {
        out.push(current);
    }
    out
}

/// The value of the first field `name` (lower-case) in `fields`, when not empty.
pub(crate) fn field<'a>(fields: &'a [(String, String)], name: &str) -> Option<&'a str> {
    fields.iter().find(|(n, v)| n == name && !v.is_empty()).map(|(_, v)| v.as_str())
}

/// A `message/delivery-status` body.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct DeliveryStatus {
    /// `Reporting-MTA`, without its type (`dns;`).
    pub reporting_mta: Option<String>,
    /// Gmail's `X-Original-Message-ID` per-message field, when present.
    pub original_message_id: Option<String>,
    pub recipients: Vec<RecipientFields>,
}

/// The fields of one per-recipient block, as written.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct RecipientFields {
    pub final_recipient: Option<String>,
    pub original_recipient: Option<String>,
    pub action: Option<String>,
    pub status: Option<String>,
    pub diagnostic_code: Option<String>,
}

impl RecipientFields {
    fn is_empty(&self) -> bool {
        *self == RecipientFields::default()
    }

    /// Sets a per-recipient field; false when it is already set (a new recipient starts).
    fn set(&mut self, name: &str, value: &str) -> bool {
        let slot = match name {
            "final-recipient" => &mut self.final_recipient,
            "original-recipient" => &mut self.original_recipient,
            "action" => &mut self.action,
            "status" => &mut self.status,
            "diagnostic-code" => &mut self.diagnostic_code,
            _ => return true,
        };
        if slot.is_some() {
            return false;
        }
        *slot = Some(value.to_string());
        true
    }
}

/// Reads a `message/delivery-status` body: the per-message fields, then one record per
/// recipient. A record ends at a blank line, or where one of its fields comes again (some MTAs
/// forget the blank line). At most `MAX_RECIPIENT_BLOCKS` records.
pub(crate) fn delivery_status(text: &str) -> DeliveryStatus {
    let mut out = DeliveryStatus::default();
    // The per-message block, then the recipients' (a little slack for empty blocks).
    for block in blocks(text, MAX_RECIPIENT_BLOCKS + 1) {
        let mut record = RecipientFields::default();
        for (name, value) in &block {
            match name.as_str() {
                "reporting-mta" if out.reporting_mta.is_none() => out.reporting_mta = without_type(value),
                "x-original-message-id" if out.original_message_id.is_none() => {
                    out.original_message_id = Some(value.clone())
                }
                _ => {
                    if !record.set(name, value) {
                        push_record(&mut out.recipients, std::mem::take(&mut record));
                        record.set(name, value);
                    }
                }
            }
        }
        push_record(&mut out.recipients, record);
        if out.recipients.len() >= MAX_RECIPIENT_BLOCKS {
            break;
        }
    }
    out
}

fn push_record(records: &mut Vec<RecipientFields>, record: RecipientFields) {
    if !record.is_empty() && records.len() < MAX_RECIPIENT_BLOCKS {
        records.push(record);
    }
}

/// A `message/feedback-report` body (RFC 5965).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct Feedback {
    /// `Feedback-Type`, lower-case (`abuse`, `fraud`, `virus`, `other`, `not-spam`,
    /// `auth-failure`).
    pub feedback_type: Option<String>,
    /// The first `Original-Rcpt-To`, bare.
    pub original_rcpt_to: Option<String>,
    /// `Reporting-MTA`, without its type.
    pub reporting_mta: Option<String>,
}

/// Reads a `message/feedback-report` body (one block; blank lines are tolerated).
pub(crate) fn feedback(text: &str) -> Feedback {
    let fields: Block = blocks(text, 4).into_iter().flatten().collect();
    Feedback {
        feedback_type: field(&fields, "feedback-type")
            .and_then(|t| t.split([' ', ';', '(']).next())
            .map(str::to_ascii_lowercase),
        original_rcpt_to: fields
            .iter()
            .filter(|(n, _)| n == "original-rcpt-to")
            .find_map(|(_, v)| recipient_address(v)),
        reporting_mta: field(&fields, "reporting-mta").and_then(without_type),
    }
}

/// The `Original-Message-ID` of a `message/disposition-notification` body (RFC 8098).
pub(crate) fn disposition_original_id(text: &str) -> Option<String> {
    let fields: Block = blocks(text, 4).into_iter().flatten().collect();
    field(&fields, "original-message-id").map(str::to_string)
}

/// A value with its RFC 3464 type prefix removed: `dns; mx.example.com` → `mx.example.com`.
fn without_type(value: &str) -> Option<String> {
    let v = strip_type(value).trim();
    (!v.is_empty()).then(|| bounded(v, 255))
}

/// The bare, lower-cased address of a recipient field (`rfc822; <A@B.example>` →
/// `a@b.example`). None unless it looks like an address: one token with an `@` inside.
pub(crate) fn recipient_address(value: &str) -> Option<String> {
    let v = strip_type(value).trim();
    let v = v.strip_prefix('<').unwrap_or(v);
    let v = v.split('>').next().unwrap_or(v).trim();
    let (local, domain) = v.rsplit_once('@')?;
    let ok = !local.is_empty()
        && !domain.is_empty()
        && v.len() <= 320
        && !v.chars().any(|c| c.is_whitespace() || c.is_control() || matches!(c, '<' | '>' | ',' | ';'));
    ok.then(|| v.trim_end_matches('.').to_lowercase())
}

/// The text of a `Diagnostic-Code` without its type: `smtp; 550 5.1.1 …` → `550 5.1.1 …`.
pub(crate) fn diagnostic_text(value: &str) -> &str {
    strip_type(value).trim()
}

#[cfg(test)]
#[allow(clippy::indexing_slicing, clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn blocks_unfold_and_split() {
        let b = blocks("A: 1\r\nB: two\r\n  lines\r\n\r\n\r\nC: 3\nnot a field\n: empty\n", 10);
        assert_eq!(b.len(), 2);
        assert_eq!(b[0], vec![("a".into(), "1".into()), ("b".into(), "two lines".into())]);
        assert_eq!(b[1], vec![("c".into(), "3".into())]);
        assert_eq!(blocks("A: 1\n\nB: 2\n\nC: 3", 2).len(), 2);
    }

    #[test]
    fn records_split_without_blank_lines() {
        let d = delivery_status(
            "Reporting-MTA: dns; mx.example.net\n\nFinal-Recipient: rfc822; a@x.org\nAction: failed\nStatus: 5.1.1\n\
             Final-Recipient: rfc822; b@x.org\nAction: delayed\nStatus: 4.4.1\n",
        );
        assert_eq!(d.reporting_mta.as_deref(), Some("mx.example.net"));
        assert_eq!(d.recipients.len(), 2);
        assert_eq!(d.recipients[1].final_recipient.as_deref(), Some("rfc822; b@x.org"));
        assert_eq!(d.recipients[1].status.as_deref(), Some("4.4.1"));
    }

    #[test]
    fn recipients_are_capped() {
        let text: String =
            (0..3000).map(|i| format!("Final-Recipient: rfc822; u{i}@x.org\nAction: failed\n\n")).collect();
        assert_eq!(delivery_status(&text).recipients.len(), MAX_RECIPIENT_BLOCKS);
    }

    #[test]
    fn addresses() {
        assert_eq!(recipient_address("rfc822; <Jane.Doe@Example.COM>").as_deref(), Some("jane.doe@example.com"));
        assert_eq!(recipient_address("rfc822;a@b.org").as_deref(), Some("a@b.org"));
        assert_eq!(recipient_address("a@b.org").as_deref(), Some("a@b.org"));
        assert_eq!(recipient_address("x400; /c=us/o=x/"), None);
        assert_eq!(recipient_address("rfc822; two words@x.org"), None);
        assert_eq!(recipient_address("rfc822; @x.org"), None);
    }
}
