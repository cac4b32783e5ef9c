//! What an outcome does to the outbox, with no pgrx: the next status, the retry time, the
//! receipts and the suppressions. The worker's main thread turns a batch of these plans into a
//! few set-based statements in one short transaction.

use std::time::Duration;

use serde::Serialize;

use super::{backoff, is_bad_address, Delivery, Outcome, Reply};

/// Retry policy and routing, read from the settings and the transport table.
#[derive(Debug, Clone)]
pub struct Policy {
    pub max_attempts: i32,
    pub retry_base: Duration,
    pub retry_max: Duration,
}

/// One `email.receipts` row.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Receipt {
    pub message_id: i64,
    pub event: &'static str,
    pub transport: String,
    pub attempt: i32,
    pub recipient: Option<String>,
    pub smtp_code: Option<i32>,
    pub enhanced_code: Option<String>,
    pub response: String,
    pub provider_message_id: Option<String>,
    pub duration_ms: f64,
}

/// The change to one `email.messages` row.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Update {
    pub id: i64,
    pub attempt: i32,
    pub status: &'static str,
    /// Delay before the next attempt, for `queued`.
    pub delay_ms: f64,
    pub transport: String,
    pub last_error: Option<String>,
    pub provider_message_id: Option<String>,
    /// Recipients still to deliver to (NULL: all).
    pub pending: Option<Vec<String>>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Plan {
    pub update: Update,
    pub receipts: Vec<Receipt>,
    /// Addresses to suppress (bounced).
    pub suppress: Vec<String>,
}

/// Decides what an outcome means. `rcpts` are the envelope recipients of this attempt and
/// `fallback` the transport to move to after a transient failure.
pub fn plan(o: &Outcome, rcpts: &[String], fallback: Option<&str>, policy: &Policy) -> Plan {
    let ms = o.duration.as_secs_f64() * 1000.0;
    let receipt = |event: &'static str, recipient: Option<String>, r: &Reply, provider: Option<String>| Receipt {
        message_id: o.id,
        event,
        transport: o.transport.clone(),
        attempt: o.attempt,
        recipient,
        smtp_code: r.code.map(i32::from),
        enhanced_code: r.enhanced.clone(),
        response: r.text.clone(),
        provider_message_id: provider,
        duration_ms: ms,
    };
    let mut receipts = Vec::new();
    let mut suppress = Vec::new();
    let mut refuse = |rejected: &[(String, Reply)], receipts: &mut Vec<Receipt>| {
        for (addr, r) in rejected {
            if is_bad_address(r) {
                receipts.push(receipt("bounced", Some(addr.clone()), r, None));
                suppress.push(addr.to_lowercase());
            } else {
                receipts.push(receipt("failed", Some(addr.clone()), r, None));
            }
        }
    };
    let last = o.attempt >= policy.max_attempts;
    let mut update = Update {
        id: o.id,
        attempt: o.attempt,
        status: "sent",
        delay_ms: 0.0,
        transport: o.transport.clone(),
        last_error: None,
        provider_message_id: None,
        pending: None,
    };
    let retry_in = |after: Option<Duration>| {
        let b = backoff(o.attempt, policy.retry_base, policy.retry_max);
        after.map_or(b, |a| a.max(b)).as_secs_f64() * 1000.0
    };

    match &o.delivery {
        Delivery::Accepted { reply, provider_id, rejected, deferred, .. } => {
            receipts.push(receipt("sent", None, reply, provider_id.clone()));
            update.provider_message_id = provider_id.clone();
            refuse(rejected, &mut receipts);
            if !deferred.is_empty() {
                for (addr, r) in deferred {
                    if last {
                        let gave_up = Reply { text: format!("{} (gave up after {} attempts)", r.text, o.attempt), ..r.clone() };
                        receipts.push(receipt("failed", Some(addr.clone()), &gave_up, None));
                    } else {
                        receipts.push(receipt("deferred", Some(addr.clone()), r, None));
                    }
                }
                if !last {
                    update.status = "queued";
                    update.delay_ms = retry_in(None);
                    update.pending = Some(deferred.iter().map(|(a, _)| a.clone()).collect());
                    update.last_error = deferred.first().map(|(_, r)| r.text.clone());
                }
            }
        }
        Delivery::Transient { reply, retry_after, rejected } => {
            refuse(rejected, &mut receipts);
            let remaining: Vec<String> =
                rcpts.iter().filter(|a| !rejected.iter().any(|(r, _)| r.eq_ignore_ascii_case(a))).cloned().collect();
            if !rejected.is_empty() {
                update.pending = Some(remaining);
            }
            update.last_error = Some(reply.text.clone());
            match fallback {
                _ if last => {
                    let gave_up = Reply { text: format!("{} (gave up after {} attempts)", reply.text, o.attempt), ..reply.clone() };
                    receipts.push(receipt("failed", None, &gave_up, None));
                    update.status = "failed";
                }
                Some(fb) if fb != o.transport => {
                    let moved = Reply { text: format!("{} (next attempt through fallback transport \"{fb}\")", reply.text), ..reply.clone() };
                    receipts.push(receipt("deferred", None, &moved, None));
                    update.status = "queued";
                    update.transport = fb.to_string();
                    update.delay_ms = retry_after.map_or(0.0, |d| d.as_secs_f64() * 1000.0);
                }
                _ => {
                    receipts.push(receipt("deferred", None, reply, None));
                    update.status = "queued";
                    update.delay_ms = retry_in(*retry_after);
                }
            }
        }
        Delivery::Permanent { reply, rejected } => {
            refuse(rejected, &mut receipts);
            let all_refused = !rejected.is_empty() && rejected.len() >= rcpts.len();
            if !all_refused {
                receipts.push(receipt("failed", None, reply, None));
            }
            let all_bounced = all_refused && rejected.iter().all(|(_, r)| is_bad_address(r));
            update.status = if all_bounced { "bounced" } else { "failed" };
            update.last_error = Some(reply.text.clone());
        }
    }
    Plan { update, receipts, suppress }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy() -> Policy {
        Policy { max_attempts: 3, retry_base: Duration::from_secs(10), retry_max: Duration::from_secs(60) }
    }

    fn outcome(attempt: i32, delivery: Delivery) -> Outcome {
        Outcome { id: 7, attempt, transport: "smtp".into(), duration: Duration::from_millis(12), delivery }
    }

    fn r(code: u16, text: &str) -> Reply {
        Reply::new(Some(code), text)
    }

    fn rcpts() -> Vec<String> {
        vec!["a@x.org".into(), "b@x.org".into()]
    }

    #[test]
    fn accepted_is_sent_with_a_receipt() {
        let p = plan(
            &outcome(1, Delivery::Accepted { reply: r(250, "2.0.0 Ok: queued as ABC"), provider_id: Some("ABC".into()), rejected: vec![], deferred: vec![], captured: None }),
            &rcpts(), None, &policy(),
        );
        assert_eq!(p.update.status, "sent");
        assert_eq!(p.update.provider_message_id.as_deref(), Some("ABC"));
        assert_eq!(p.receipts.len(), 1);
        assert_eq!((p.receipts[0].event, p.receipts[0].smtp_code), ("sent", Some(250)));
        assert_eq!(p.receipts[0].enhanced_code.as_deref(), Some("2.0.0"));
    }

    #[test]
    fn one_bad_recipient_bounces_and_is_suppressed_the_other_is_sent() {
        let p = plan(
            &outcome(1, Delivery::Accepted { reply: r(250, "ok"), provider_id: None, rejected: vec![("A@x.org".into(), r(550, "5.1.1 unknown"))], deferred: vec![], captured: None }),
            &rcpts(), None, &policy(),
        );
        assert_eq!(p.update.status, "sent");
        assert_eq!(p.suppress, vec!["a@x.org"]);
        assert_eq!(p.receipts.iter().map(|r| r.event).collect::<Vec<_>>(), vec!["sent", "bounced"]);
        assert_eq!(p.receipts[1].enhanced_code.as_deref(), Some("5.1.1"));
    }

    #[test]
    fn transient_retries_with_backoff_then_fails() {
        let t = Delivery::Transient { reply: r(450, "4.2.0 busy"), retry_after: None, rejected: vec![] };
        let p = plan(&outcome(1, t.clone()), &rcpts(), None, &policy());
        assert_eq!((p.update.status, p.receipts[0].event), ("queued", "deferred"));
        assert!((8000.0..=12000.0).contains(&p.update.delay_ms), "{}", p.update.delay_ms);
        let p = plan(&outcome(3, t), &rcpts(), None, &policy());
        assert_eq!((p.update.status, p.receipts[0].event), ("failed", "failed"));
        assert!(p.receipts[0].response.contains("gave up after 3 attempts"));
    }

    #[test]
    fn retry_after_is_the_earliest_next_attempt() {
        let t = Delivery::Transient { reply: r(429, "slow down"), retry_after: Some(Duration::from_secs(30)), rejected: vec![] };
        let p = plan(&outcome(1, t), &rcpts(), None, &policy());
        assert!(p.update.delay_ms >= 30_000.0);
    }

    #[test]
    fn transient_moves_to_the_fallback_at_once() {
        let t = Delivery::Transient { reply: Reply::new(None, "connection refused"), retry_after: None, rejected: vec![] };
        let p = plan(&outcome(1, t), &rcpts(), Some("backup"), &policy());
        assert_eq!((p.update.status, p.update.transport.as_str(), p.update.delay_ms), ("queued", "backup", 0.0));
        assert!(p.receipts[0].response.contains("fallback transport \"backup\""));
        assert_eq!(p.receipts[0].transport, "smtp");
    }

    #[test]
    fn deferred_recipient_is_retried_alone() {
        let d = Delivery::Accepted { reply: r(250, "ok"), provider_id: None, rejected: vec![], deferred: vec![("b@x.org".into(), r(450, "4.2.2 mailbox full"))], captured: None };
        let p = plan(&outcome(1, d), &rcpts(), None, &policy());
        assert_eq!(p.update.status, "queued");
        assert_eq!(p.update.pending, Some(vec!["b@x.org".to_string()]));
    }

    #[test]
    fn permanent_failures_and_bounces() {
        let p = plan(&outcome(1, Delivery::Permanent { reply: r(535, "5.7.8 bad credentials"), rejected: vec![] }), &rcpts(), None, &policy());
        assert_eq!((p.update.status, p.receipts[0].event), ("failed", "failed"));
        assert_eq!(p.update.last_error.as_deref(), Some("5.7.8 bad credentials"));
        let all = vec![("a@x.org".to_string(), r(550, "5.1.1 no")), ("b@x.org".to_string(), r(550, "5.1.2 no"))];
        let p = plan(&outcome(1, Delivery::Permanent { reply: r(550, "5.1.1 no"), rejected: all }), &rcpts(), None, &policy());
        assert_eq!(p.update.status, "bounced");
        assert_eq!(p.suppress.len(), 2);
        assert!(p.receipts.iter().all(|r| r.event == "bounced"));
    }
}
