//! What an outcome does to the outbox, with no pgrx: the next status, the retry time, the
//! receipts and the suppressions. The worker's main thread turns a batch of these plans into a
//! few set-based statements in one short transaction.

use std::time::Duration;

use serde::Serialize;

use super::{backoff, is_bad_address, Delivery, Outcome, Reply};

/// The retry policy, read from the settings (`pg_email.max_attempts`, `retry_base`, `retry_max`).
#[derive(Debug, Clone)]
pub struct Policy {
    pub max_attempts: i32,
    pub retry_base: Duration,
    pub retry_max: Duration,
}

/// The status an outcome leaves a message in: a value of the `email.status` enum.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Status {
    /// To be tried again (`delay_ms` later).
    Queued,
    Sent,
    Failed,
    /// Every recipient refused as a bad address.
    Bounced,
}

impl Status {
    pub fn as_str(self) -> &'static str {
        match self {
            Status::Queued => "queued",
            Status::Sent => "sent",
            Status::Failed => "failed",
            Status::Bounced => "bounced",
        }
    }
}

/// What a receipt records: a value of the `email.receipts.event` check list.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Event {
    Sent,
    /// Refused for now; tried again.
    Deferred,
    Failed,
    /// Refused as a bad address; the address is suppressed.
    Bounced,
}

impl Event {
    pub fn as_str(self) -> &'static str {
        match self {
            Event::Sent => "sent",
            Event::Deferred => "deferred",
            Event::Failed => "failed",
            Event::Bounced => "bounced",
        }
    }
}

/// One `email.receipts` row.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Receipt {
    pub message_id: i64,
    pub event: Event,
    pub transport: String,
    pub attempt: i32,
    pub recipient: Option<String>,
    pub smtp_code: Option<i32>,
    /// RFC 3463 only (`5.1.1`).
    pub enhanced_code: Option<String>,
    /// The provider's own error code or name (Postmark `406`, SES `MessageRejected`).
    pub provider_code: Option<String>,
    pub response: String,
    pub provider_message_id: Option<String>,
    pub duration_ms: f64,
}

/// The change to one `email.messages` row.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Update {
    pub id: i64,
    pub attempt: i32,
    pub status: Status,
    /// Delay before the next attempt, for `queued`.
    pub delay_ms: f64,
    pub transport: String,
    pub last_error: Option<String>,
    pub provider_message_id: Option<String>,
    /// Recipients still to deliver to (NULL: all).
    pub pending: Option<Vec<String>>,
    /// For template mail: the subject and parts as rendered for this attempt, kept on the row
    /// so the outbox shows what was sent (absent from the JSON otherwise).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub subject: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub body: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub html: Option<String>,
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
    let receipt = |event: Event, recipient: Option<String>, r: &Reply, provider: Option<String>| Receipt {
        message_id: o.id,
        event,
        transport: o.transport.clone(),
        attempt: o.attempt,
        recipient,
        smtp_code: r.code.map(i32::from),
        enhanced_code: r.enhanced.clone(),
        provider_code: r.provider_code.clone(),
        response: r.text.clone(),
        provider_message_id: provider,
        duration_ms: ms,
    };
    let mut receipts = Vec::new();
    let mut suppress = Vec::new();
    let mut refuse = |rejected: &[(String, Reply)], receipts: &mut Vec<Receipt>| {
        for (addr, r) in rejected {
            if is_bad_address(r) {
                receipts.push(receipt(Event::Bounced, Some(addr.clone()), r, None));
                suppress.push(addr.to_lowercase());
            } else {
                receipts.push(receipt(Event::Failed, Some(addr.clone()), r, None));
            }
        }
    };
    let last = o.attempt >= policy.max_attempts;
    let mut update = Update {
        id: o.id,
        attempt: o.attempt,
        status: Status::Sent,
        delay_ms: 0.0,
        transport: o.transport.clone(),
        last_error: None,
        provider_message_id: None,
        pending: None,
        subject: None,
        body: None,
        html: None,
    };
    let retry_in = |after: Option<Duration>| {
        let b = backoff(o.attempt, policy.retry_base, policy.retry_max);
        after.map_or(b, |a| a.max(b)).as_secs_f64() * 1000.0
    };

    match &o.delivery {
        Delivery::Accepted { reply, provider_id, rejected, deferred, .. } => {
            receipts.push(receipt(Event::Sent, None, reply, provider_id.clone()));
            update.provider_message_id = provider_id.clone();
            refuse(rejected, &mut receipts);
            if !deferred.is_empty() {
                for (addr, r) in deferred {
                    if last {
                        let gave_up =
                            Reply { text: format!("{} (gave up after {} attempts)", r.text, o.attempt), ..r.clone() };
                        receipts.push(receipt(Event::Failed, Some(addr.clone()), &gave_up, None));
                    } else {
                        receipts.push(receipt(Event::Deferred, Some(addr.clone()), r, None));
                    }
                }
                if !last {
                    update.status = Status::Queued;
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
                    let gave_up = Reply {
                        text: format!("{} (gave up after {} attempts)", reply.text, o.attempt),
                        ..reply.clone()
                    };
                    receipts.push(receipt(Event::Failed, None, &gave_up, None));
                    update.status = Status::Failed;
                }
                Some(fb) if fb != o.transport => {
                    let moved = Reply {
                        text: format!("{} (next attempt through fallback transport \"{fb}\")", reply.text),
                        ..reply.clone()
                    };
                    receipts.push(receipt(Event::Deferred, None, &moved, None));
                    update.status = Status::Queued;
                    update.transport = fb.to_string();
                    update.delay_ms = retry_after.map_or(0.0, |d| d.as_secs_f64() * 1000.0);
                }
                _ => {
                    receipts.push(receipt(Event::Deferred, None, reply, None));
                    update.status = Status::Queued;
                    update.delay_ms = retry_in(*retry_after);
                }
            }
        }
        Delivery::Permanent { reply, rejected } => {
            refuse(rejected, &mut receipts);
            let all_refused = !rejected.is_empty() && rejected.len() >= rcpts.len();
            if !all_refused {
                receipts.push(receipt(Event::Failed, None, reply, None));
            }
            let all_bounced = all_refused && rejected.iter().all(|(_, r)| is_bad_address(r));
            update.status = if all_bounced { Status::Bounced } else { Status::Failed };
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
            &outcome(
                1,
                Delivery::Accepted {
                    reply: r(250, "2.0.0 Ok: queued as ABC"),
                    provider_id: Some("ABC".into()),
                    rejected: vec![],
                    deferred: vec![],
                    captured: None,
                },
            ),
            &rcpts(),
            None,
            &policy(),
        );
        assert_eq!(p.update.status, Status::Sent);
        assert_eq!(p.update.provider_message_id.as_deref(), Some("ABC"));
        assert_eq!(p.receipts.len(), 1);
        assert_eq!((p.receipts[0].event, p.receipts[0].smtp_code), (Event::Sent, Some(250)));
        assert_eq!(p.receipts[0].enhanced_code.as_deref(), Some("2.0.0"));
    }

    #[test]
    fn one_bad_recipient_bounces_and_is_suppressed_the_other_is_sent() {
        let p = plan(
            &outcome(
                1,
                Delivery::Accepted {
                    reply: r(250, "ok"),
                    provider_id: None,
                    rejected: vec![("A@x.org".into(), r(550, "5.1.1 unknown"))],
                    deferred: vec![],
                    captured: None,
                },
            ),
            &rcpts(),
            None,
            &policy(),
        );
        assert_eq!(p.update.status, Status::Sent);
        assert_eq!(p.suppress, vec!["a@x.org"]);
        assert_eq!(p.receipts.iter().map(|r| r.event).collect::<Vec<_>>(), vec![Event::Sent, Event::Bounced]);
        assert_eq!(p.receipts[1].enhanced_code.as_deref(), Some("5.1.1"));
    }

    #[test]
    fn transient_retries_with_backoff_then_fails() {
        let t = Delivery::Transient { reply: r(450, "4.2.0 busy"), retry_after: None, rejected: vec![] };
        let p = plan(&outcome(1, t.clone()), &rcpts(), None, &policy());
        assert_eq!((p.update.status, p.receipts[0].event), (Status::Queued, Event::Deferred));
        assert!((8000.0..=12000.0).contains(&p.update.delay_ms), "{}", p.update.delay_ms);
        let p = plan(&outcome(3, t), &rcpts(), None, &policy());
        assert_eq!((p.update.status, p.receipts[0].event), (Status::Failed, Event::Failed));
        assert!(p.receipts[0].response.contains("gave up after 3 attempts"));
    }

    #[test]
    fn retry_after_is_the_earliest_next_attempt() {
        let t = Delivery::Transient {
            reply: r(429, "slow down"),
            retry_after: Some(Duration::from_secs(30)),
            rejected: vec![],
        };
        let p = plan(&outcome(1, t), &rcpts(), None, &policy());
        assert!(p.update.delay_ms >= 30_000.0);
    }

    #[test]
    fn transient_moves_to_the_fallback_at_once() {
        let t =
            Delivery::Transient { reply: Reply::new(None, "connection refused"), retry_after: None, rejected: vec![] };
        let p = plan(&outcome(1, t), &rcpts(), Some("backup"), &policy());
        assert_eq!((p.update.status, p.update.transport.as_str(), p.update.delay_ms), (Status::Queued, "backup", 0.0));
        assert!(p.receipts[0].response.contains("fallback transport \"backup\""));
        assert_eq!(p.receipts[0].transport, "smtp");
    }

    #[test]
    fn deferred_recipient_is_retried_alone() {
        let d = Delivery::Accepted {
            reply: r(250, "ok"),
            provider_id: None,
            rejected: vec![],
            deferred: vec![("b@x.org".into(), r(450, "4.2.2 mailbox full"))],
            captured: None,
        };
        let p = plan(&outcome(1, d), &rcpts(), None, &policy());
        assert_eq!(p.update.status, Status::Queued);
        assert_eq!(p.update.pending, Some(vec!["b@x.org".to_string()]));
    }

    #[test]
    fn permanent_failures_and_bounces() {
        let p = plan(
            &outcome(1, Delivery::Permanent { reply: r(535, "5.7.8 bad credentials"), rejected: vec![] }),
            &rcpts(),
            None,
            &policy(),
        );
        assert_eq!((p.update.status, p.receipts[0].event), (Status::Failed, Event::Failed));
        assert_eq!(p.update.last_error.as_deref(), Some("5.7.8 bad credentials"));
        let all = vec![("a@x.org".to_string(), r(550, "5.1.1 no")), ("b@x.org".to_string(), r(550, "5.1.2 no"))];
        let p = plan(
            &outcome(1, Delivery::Permanent { reply: r(550, "5.1.1 no"), rejected: all }),
            &rcpts(),
            None,
            &policy(),
        );
        assert_eq!(p.update.status, Status::Bounced);
        assert_eq!(p.suppress.len(), 2);
        assert!(p.receipts.iter().all(|r| r.event == Event::Bounced));
    }

    #[test]
    fn statuses_and_events_serialize_to_their_sql_names() {
        for s in [Status::Queued, Status::Sent, Status::Failed, Status::Bounced] {
            assert_eq!(serde_json::to_value(s).unwrap(), serde_json::json!(s.as_str()));
        }
        for e in [Event::Sent, Event::Deferred, Event::Failed, Event::Bounced] {
            assert_eq!(serde_json::to_value(e).unwrap(), serde_json::json!(e.as_str()));
        }
        assert_eq!(Status::Queued.as_str(), "queued");
        assert_eq!(Event::Deferred.as_str(), "deferred");
    }

    #[test]
    fn updates_and_receipts_keep_their_json_shape() {
        let p = plan(
            &outcome(
                1,
                Delivery::Accepted {
                    reply: r(250, "2.0.0 Ok: queued as ABC"),
                    provider_id: Some("ABC".into()),
                    rejected: vec![],
                    deferred: vec![],
                    captured: None,
                },
            ),
            &rcpts(),
            None,
            &policy(),
        );
        assert_eq!(
            serde_json::to_value(&p.update).unwrap(),
            serde_json::json!({
                "id": 7, "attempt": 1, "status": "sent", "delay_ms": 0.0, "transport": "smtp",
                "last_error": null, "provider_message_id": "ABC", "pending": null,
            })
        );
        assert_eq!(
            serde_json::to_value(&p.receipts[0]).unwrap(),
            serde_json::json!({
                "message_id": 7, "event": "sent", "transport": "smtp", "attempt": 1, "recipient": null,
                "smtp_code": 250, "enhanced_code": "2.0.0", "provider_code": null,
                "response": "2.0.0 Ok: queued as ABC", "provider_message_id": "ABC", "duration_ms": 12.0,
            })
        );
    }

    #[test]
    fn provider_codes_are_kept_apart_from_enhanced_codes() {
        // A Postmark 422 with ErrorCode 300: permanent, no RFC 3463 code.
        let reply = Reply {
            code: Some(422),
            enhanced: None,
            provider_code: Some("300".into()),
            text: "HTTP 422: Invalid email request".into(),
        };
        let p = plan(&outcome(1, Delivery::Permanent { reply, rejected: vec![] }), &rcpts(), None, &policy());
        assert_eq!((p.update.status, p.receipts[0].event), (Status::Failed, Event::Failed));
        assert_eq!(
            (p.receipts[0].enhanced_code.as_deref(), p.receipts[0].provider_code.as_deref()),
            (None, Some("300"))
        );
        assert!(p.suppress.is_empty());

        // Postmark 406 for one recipient: that one bounces (5.1.1) with the code kept; the other is retried.
        let refused = Reply {
            code: None,
            enhanced: Some("5.1.1".into()),
            provider_code: Some("406".into()),
            text: "inactive".into(),
        };
        let reply = Reply {
            code: Some(422),
            enhanced: None,
            provider_code: Some("406".into()),
            text: "HTTP 422: inactive".into(),
        };
        let t = Delivery::Transient { reply, retry_after: None, rejected: vec![("b@x.org".into(), refused)] };
        let p = plan(&outcome(1, t), &rcpts(), None, &policy());
        assert_eq!(p.update.status, Status::Queued);
        assert_eq!(p.update.pending, Some(vec!["a@x.org".to_string()]));
        assert_eq!(p.suppress, vec!["b@x.org"]);
        let bounced = &p.receipts[0];
        assert_eq!((bounced.event, bounced.recipient.as_deref()), (Event::Bounced, Some("b@x.org")));
        assert_eq!((bounced.enhanced_code.as_deref(), bounced.provider_code.as_deref()), (Some("5.1.1"), Some("406")));
        assert_eq!((p.receipts[1].event, p.receipts[1].enhanced_code.as_deref()), (Event::Deferred, None));
    }
}
