//! What `email._record_inbound` takes: a parsed message with the message its VERP or
//! unsubscribe address names. No pgrx here: the listener's main thread and
//! `email.ingest_message` (in a backend) build it the same way.

use serde_json::{json, Value};

use super::Parsed;
use crate::tracking::{Keys, Return};

/// The local-part prefix of the List-Unsubscribe mailto address (`unsubscribe+TOKEN@...`).
pub const UNSUBSCRIBE_PREFIX: &str = "unsubscribe+";

/// The return token of the first recipient at `bounce_domain` whose local part is
/// `bounce+TOKEN` or `unsubscribe+TOKEN` and verifies.
pub fn return_of(rcpt_to: &[String], bounce_domain: Option<&str>, keys: &Keys) -> Option<Return> {
    let domain = bounce_domain?;
    rcpt_to.iter().find_map(|rcpt| {
        let rcpt = rcpt.trim().trim_start_matches('<').trim_end_matches('>');
        let (local, at) = rcpt.rsplit_once('@')?;
        if !at.trim_end_matches('.').eq_ignore_ascii_case(domain) {
            return None;
        }
        let (prefix, token) = local.split_once('+')?;
        let r = keys.verify_return(token)?;
        let expected = if r.unsubscribe { "unsubscribe" } else { "bounce" };
        prefix.eq_ignore_ascii_case(expected).then_some(r)
    })
}

/// The row for `email._record_inbound` ($1; the raw bytes go as $2).
pub fn row(parsed: &Parsed, mail_from: Option<&str>, rcpt_to: &[String], named: Option<Return>) -> Value {
    let events: Vec<Value> = parsed
        .events
        .iter()
        .map(|e| {
            json!({
                "event": e.event,
                "recipient": e.recipient,
                "bounce_type": e.bounce_type,
                "smtp_code": e.smtp_code,
                "enhanced_code": e.enhanced_code,
                "response": e.response,
            })
        })
        .collect();
    let mut v = json!({
        "mail_from": mail_from,
        "rcpt_to": rcpt_to,
        "kind": parsed.kind.as_str(),
        "from_address": parsed.from_address,
        "subject": parsed.subject,
        "rfc_message_id": parsed.rfc_message_id,
        "in_reply_to": parsed.in_reply_to,
        "text_body": parsed.text_body,
        "html_body": parsed.html_body,
        "headers": parsed.headers,
        "refers_to": parsed.refers_to,
        "verp_message_id": named.map(|r| r.message_id),
        "events": events,
    });
    crate::webhook::without_nul(&mut v);
    v
}
