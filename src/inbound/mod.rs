//! Inbound mail: parses one received message and says what it is — a delivery report (bounce or
//! delay), a complaint, an auto-reply, an unsubscribe request, a reply, or any other message —
//! with the receipt events it reports. No pgrx here: it runs in the listener worker's main
//! thread (mail taken over SMTP/LMTP) and in backends (`email.ingest_message`), the same way.
//!
//! The input is untrusted: nothing here panics (no `unwrap`, `expect` or indexing on input — the
//! lints below hold the module to that), and a panic inside the parser crate is caught and
//! returned as an error. The caller bounds the message size; the work here stays linear in it
//! (`mime` says how mail-parser is kept linear), and what is kept is bounded by the `MAX_`
//! constants. Only the top message's parts are read, and one level into a returned message.

#![deny(clippy::indexing_slicing, clippy::string_slice, clippy::unwrap_used, clippy::expect_used, clippy::panic)]

pub mod classify;
pub mod mime;
pub mod report;
pub mod row;

use std::panic::{catch_unwind, AssertUnwindSafe};

use mail_parser::{Header, HeaderValue, Message, MessagePart, PartType};
use serde::Serialize;
use serde_json::Value;

use crate::inbound::classify::{Notice, Signals};
use crate::inbound::mime::{content_type, decoded, decoded_text, mime_type, value as header, Depth};
use crate::inbound::report::RecipientFields;

/// Header fields kept in `Parsed::headers`.
pub const MAX_HEADERS: usize = 200;
/// Bytes kept of one header value in `Parsed::headers` (and of a header name).
pub const MAX_HEADER_VALUE: usize = 8 * 1024;
/// Per-recipient blocks read from one delivery report.
pub const MAX_RECIPIENT_BLOCKS: usize = 1000;
/// Bytes kept of a report's `response`.
pub const MAX_RESPONSE: usize = 2 * 1024;
/// Bytes kept of `text_body` and of `html_body` (the raw message is stored whole by the caller).
pub const MAX_BODY: usize = 1024 * 1024;
/// Message-IDs kept in `references` and in `refers_to` (the most recent ones of `References`).
pub const MAX_REFERENCES: usize = 100;
/// Parts of a report read as returned messages.
const MAX_RETURNED_PARTS: usize = 8;

/// What a received message is (`email.inbound.kind`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Kind {
    /// A delivery report with a failure (or success) in it, or a non-standard failure notice.
    Bounce,
    /// A delivery report whose every recipient is delayed, or a non-standard delay warning.
    Delay,
    /// An RFC 5965 feedback report (ARF).
    Complaint,
    /// An automatic reply: RFC 3834, vacation responders, read receipts (RFC 8098 MDNs).
    AutoReply,
    /// Mail to the List-Unsubscribe mailto address.
    Unsubscribe,
    /// A message with `In-Reply-To` or `References`.
    Reply,
    /// Anything else.
    Message,
}

impl Kind {
    pub const fn as_str(self) -> &'static str {
        match self {
            Kind::Bounce => "bounce",
            Kind::Delay => "delay",
            Kind::Complaint => "complaint",
            Kind::AutoReply => "auto_reply",
            Kind::Unsubscribe => "unsubscribe",
            Kind::Reply => "reply",
            Kind::Message => "message",
        }
    }
}

/// One received message, parsed.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Parsed {
    pub kind: Kind,
    /// The bare address of `From`.
    pub from_address: Option<String>,
    pub subject: Option<String>,
    /// This message's Message-ID, with angle brackets.
    pub rfc_message_id: Option<String>,
    /// With angle brackets.
    pub in_reply_to: Option<String>,
    /// With angle brackets; the last `MAX_REFERENCES`.
    pub references: Vec<String>,
    /// The first `text/plain` body part (for a report, its human-readable part).
    pub text_body: Option<String>,
    /// The first `text/html` body part.
    pub html_body: Option<String>,
    /// `[[name, value], …]` as received, values decoded to text (RFC 2047) and unfolded: at most
    /// `MAX_HEADERS` fields, each value cut at `MAX_HEADER_VALUE` bytes.
    pub headers: Value,
    /// Message-IDs this message refers to that may be ours, most telling first, no duplicates:
    /// for reports, the Message-ID of the returned message (`message/rfc822`,
    /// `text/rfc822-headers`, or the text of a non-standard bounce; Gmail's
    /// `X-Original-Message-ID`); then, for every kind, `In-Reply-To`, then `References` newest
    /// first (ours is most likely the message replied to). At most `MAX_REFERENCES`.
    pub refers_to: Vec<String>,
    /// One per recipient of a delivery report; one for a complaint (none for `not-spam` and
    /// `auth-failure` feedback); one for an unsubscribe; none for other kinds.
    pub events: Vec<Report>,
}

/// One receipt event a message reports, named and shaped like `webhook::Event`'s fields.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Report {
    /// `bounced`, `deferred`, `delivered`, `complained` or `unsubscribed`.
    pub event: &'static str,
    /// Bare and lower-case: `Final-Recipient`, else `Original-Recipient`; for a complaint
    /// `Original-Rcpt-To`, else the returned message's `To`. None for an unsubscribe (the caller
    /// knows the recipient from the address's token).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub recipient: Option<String>,
    /// `bounced` only: `hard`, `soft` or `block` (see `classify::bounce_type`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub bounce_type: Option<&'static str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub smtp_code: Option<i32>,
    /// RFC 3463 `x.y.z` only.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub enhanced_code: Option<String>,
    /// The `Diagnostic-Code` text without its type (else the first lines of the human-readable
    /// part); a complaint's `Feedback-Type`. At most `MAX_RESPONSE` bytes.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub response: Option<String>,
    /// `Reporting-MTA` without its type.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reporting_mta: Option<String>,
}

impl Report {
    fn new(event: &'static str) -> Report {
        Report {
            event,
            recipient: None,
            bounce_type: None,
            smtp_code: None,
            enhanced_code: None,
            response: None,
            reporting_mta: None,
        }
    }
}

/// Parses one received message. `rcpt_to` are its envelope recipients (empty when unknown);
/// mail to `<unsubscribe_local_part>+TOKEN@…` is an unsubscribe request. An error only when the
/// bytes hold no header field at all, or the MIME parser failed on them.
pub fn parse(raw: &[u8], rcpt_to: &[String], unsubscribe_local_part: Option<&str>) -> Result<Parsed, String> {
    let message = guarded(PARSER_FAILED, || match mime::linear_enough(raw) {
        Depth::Mime => mime::mime_parser().parse(raw),
        Depth::Headers => mime::headers_parser().parse_headers(raw),
    })?;
    let Some(message) = message else { return Err(NO_HEADERS.into()) };
    if message.parts.first().is_none_or(|p| p.headers.is_empty()) {
        mime::drop_flat(message);
        return Err(NO_HEADERS.into());
    }
    let parsed = guarded(READ_FAILED, || read(&message, raw, rcpt_to, unsubscribe_local_part));
    mime::drop_flat(message);
    parsed
}

const NO_HEADERS: &str = "the message has no header fields";

/// Runs `f`, turning a panic in it into the error `failed` rather than a crashed worker: a
/// bug, in the parser crate (it has `debug_assert!`s and indexing of its own) or here.
fn guarded<T>(failed: &str, f: impl FnOnce() -> T) -> Result<T, String> {
    catch_unwind(AssertUnwindSafe(f)).map_err(|_| failed.to_string())
}

const PARSER_FAILED: &str = "the MIME parser failed on this message";
const READ_FAILED: &str = "the parsed message could not be read";

/// The machine-readable report a message carries.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ReportKind {
    /// RFC 3464 / RFC 6533.
    Delivery,
    /// RFC 5965.
    Feedback,
    /// RFC 8098 (a read receipt).
    Disposition,
}

fn read(message: &Message, raw: &[u8], rcpt_to: &[String], unsubscribe_local_part: Option<&str>) -> Parsed {
    let top: &[Header] = message.parts.first().map_or(&[], |p| p.headers.as_slice());
    let from_address = first_address(header(top, "from"));
    let subject = header(top, "subject").and_then(text_of).map(|s| bounded(s.trim(), MAX_HEADER_VALUE));
    let in_reply_to = header(top, "in-reply-to").and_then(|v| ids(v).into_iter().next());
    let references = {
        let all = header(top, "references").map(ids).unwrap_or_default();
        let skip = all.len().saturating_sub(MAX_REFERENCES);
        all.into_iter().skip(skip).collect::<Vec<_>>()
    };
    let text_body = body(message, raw, false);
    let signals = Signals {
        from: from_address.as_deref(),
        subject: subject.as_deref(),
        auto_submitted: header(top, "auto-submitted").and_then(text_of),
        x_autoreply: header(top, "x-autoreply").and_then(text_of),
        x_autorespond: header(top, "x-autorespond").map(|v| text_of(v).unwrap_or("")),
        x_autogenerated: header(top, "x-autogenerated").and_then(text_of),
        precedence: header(top, "precedence").and_then(text_of),
        x_auto_response_suppress: header(top, "x-auto-response-suppress").map(|v| text_of(v).unwrap_or("")),
    };
    // Our own addresses, never a failed recipient.
    let mut ours: Vec<String> = rcpt_to.iter().filter_map(|r| report::recipient_address(r)).collect();
    ours.extend(from_address.as_deref().and_then(report::recipient_address));

    let mut refers_to = Vec::new();
    let mut events = Vec::new();
    let kind = if let Some((report_kind, part)) = find_report(&message.parts) {
        let machine = part.map(|p| decoded_text(raw, p)).unwrap_or_default();
        let returned: Vec<Returned> = returned_parts(&message.parts).filter_map(|p| returned(raw, p)).collect();
        for r in &returned {
            push_id(&mut refers_to, r.message_id.clone());
        }
        match report_kind {
            ReportKind::Delivery => {
                let status = report::delivery_status(&machine);
                push_id(&mut refers_to, status.original_message_id.as_deref().and_then(classify::message_id_in));
                let mta = status.reporting_mta.as_deref();
                events =
                    status.recipients.iter().filter_map(|r| recipient_report(r, mta, text_body.as_deref())).collect();
                if events.is_empty() {
                    // A report with no readable recipient block: read its text as a notice's.
                    let human = classify::human_part(text_body.as_deref().unwrap_or(""));
                    events = classify::text_reports(human, header(top, "x-failed-recipients").and_then(text_of), &ours);
                }
                let delayed = if events.is_empty() {
                    classify::notice(&signals) == Some(Notice::Delay)
                } else {
                    events.iter().all(|e| e.event == "deferred")
                };
                if delayed {
                    Kind::Delay
                } else {
                    Kind::Bounce
                }
            }
            ReportKind::Feedback => {
                let fb = report::feedback(&machine);
                if !matches!(fb.feedback_type.as_deref(), Some("not-spam" | "auth-failure")) {
                    events.push(Report {
                        recipient: fb.original_rcpt_to.or_else(|| returned.iter().find_map(|r| r.to.clone())),
                        response: fb.feedback_type,
                        reporting_mta: fb.reporting_mta,
                        ..Report::new("complained")
                    });
                }
                Kind::Complaint
            }
            ReportKind::Disposition => {
                push_id(
                    &mut refers_to,
                    report::disposition_original_id(&machine).as_deref().and_then(classify::message_id_in),
                );
                Kind::AutoReply
            }
        }
    } else if let Some(notice) = classify::notice(&signals) {
        let text = text_body.as_deref().unwrap_or("");
        for r in returned_parts(&message.parts).filter_map(|p| returned(raw, p)) {
            push_id(&mut refers_to, r.message_id);
        }
        push_id(&mut refers_to, classify::returned_message_id(text));
        match notice {
            Notice::Failure => {
                let failed = header(top, "x-failed-recipients").and_then(text_of);
                events = classify::text_reports(classify::human_part(text), failed, &ours);
                Kind::Bounce
            }
            Notice::Delay => Kind::Delay,
        }
    } else if classify::is_unsubscribe(rcpt_to, unsubscribe_local_part) {
        events.push(Report::new("unsubscribed"));
        Kind::Unsubscribe
    } else if classify::is_auto_reply(&signals) {
        Kind::AutoReply
    } else if in_reply_to.is_some() || !references.is_empty() {
        Kind::Reply
    } else {
        Kind::Message
    };
    push_id(&mut refers_to, in_reply_to.clone());
    for id in references.iter().rev() {
        push_id(&mut refers_to, Some(id.clone()));
    }

    Parsed {
        kind,
        from_address: from_address.map(|a| bounded(&a, 320)),
        subject,
        rfc_message_id: header(top, "message-id").and_then(|v| ids(v).into_iter().next()),
        in_reply_to,
        references,
        text_body,
        html_body: body(message, raw, true),
        headers: header_pairs(raw),
        refers_to,
        events,
    }
}

/// The report of one per-recipient block; None when the block says nothing usable (no action
/// and no status class).
fn recipient_report(r: &RecipientFields, mta: Option<&str>, human: Option<&str>) -> Option<Report> {
    let status = r
        .status
        .as_deref()
        .and_then(|s| s.split_whitespace().next())
        .map(crate::reply::trim_punctuation)
        .filter(|s| crate::reply::is_enhanced(s));
    let diagnostic = r.diagnostic_code.as_deref().map(report::diagnostic_text).filter(|t| !t.is_empty());
    let (smtp_code, diagnostic_code) = diagnostic.map(crate::reply::parse_reply).unwrap_or_default();
    let enhanced = match (status, diagnostic_code) {
        // `5.0.0` says little; the reply quoted may say more (`550 5.1.1`), in the same class.
        (Some(s), Some(d)) if s.ends_with(".0.0") && s.get(..1) == d.get(..1) => Some(d),
        (Some(s), _) => Some(s.to_string()),
        (None, d) => d,
    };
    let class =
        enhanced.as_deref().and_then(|e| e.bytes().next()).or_else(|| smtp_code.map(|c| b'0' + (c / 100) as u8));
    let action = r.action.as_deref().map(|a| a.split([' ', '(', ';']).next().unwrap_or("").to_ascii_lowercase());
    let event = match action.as_deref() {
        Some("failed") => "bounced",
        Some("delayed") => "deferred",
        Some("delivered" | "relayed" | "expanded") => "delivered",
        // No (known) action: the status class says.
        _ => match class {
            Some(b'5') => "bounced",
            Some(b'4') => "deferred",
            Some(b'2') => "delivered",
            _ => return None,
        },
    };
    let response = diagnostic.map(|d| bounded(d, MAX_RESPONSE)).or_else(|| human.and_then(first_lines));
    Some(Report {
        event,
        recipient: r
            .final_recipient
            .as_deref()
            .and_then(report::recipient_address)
            .or_else(|| r.original_recipient.as_deref().and_then(report::recipient_address)),
        bounce_type: (event == "bounced")
            .then(|| classify::bounce_type(enhanced.as_deref(), smtp_code, response.as_deref())),
        smtp_code,
        enhanced_code: enhanced,
        response,
        reporting_mta: mta.map(str::to_string),
    })
}

/// The first few non-empty lines of a text, joined, at most `MAX_RESPONSE` bytes.
fn first_lines(text: &str) -> Option<String> {
    let lines: Vec<&str> = text.lines().map(str::trim).filter(|l| !l.is_empty()).take(5).collect();
    (!lines.is_empty()).then(|| bounded(&lines.join(" "), MAX_RESPONSE))
}

/// The machine-readable part of a report and its kind: the first `message/delivery-status`
/// (`message/global-delivery-status`), `message/feedback-report` or
/// `message/disposition-notification` part; else a `multipart/report` of a known `report-type`
/// whose machine part is missing.
fn find_report<'m, 'x>(parts: &'m [MessagePart<'x>]) -> Option<(ReportKind, Option<&'m MessagePart<'x>>)> {
    let mut declared = None;
    for part in parts {
        let Some(ct) = content_type(part) else { continue };
        match (ct.ctype(), ct.subtype().unwrap_or("")) {
            ("message", "delivery-status" | "global-delivery-status") => {
                return Some((ReportKind::Delivery, Some(part)))
            }
            ("message", "feedback-report") => return Some((ReportKind::Feedback, Some(part))),
            ("message", "disposition-notification" | "global-disposition-notification") => {
                return Some((ReportKind::Disposition, Some(part)))
            }
            ("multipart", "report") if declared.is_none() => {
                let t = ct.attribute("report-type").unwrap_or("").trim().to_ascii_lowercase();
                declared = match t.as_str() {
                    "delivery-status" | "global-delivery-status" => Some(ReportKind::Delivery),
                    "feedback-report" => Some(ReportKind::Feedback),
                    "disposition-notification" | "global-disposition-notification" => Some(ReportKind::Disposition),
                    _ => None,
                };
            }
            _ => {}
        }
    }
    declared.map(|k| (k, None))
}

/// The parts of the top message that hold a returned message or its headers.
fn returned_parts<'m, 'x>(parts: &'m [MessagePart<'x>]) -> impl Iterator<Item = &'m MessagePart<'x>> {
    parts
        .iter()
        .filter(|p| {
            matches!(
                mime_type(p),
                Some(("message", "rfc822" | "global" | "global-headers") | ("text", "rfc822-headers"))
            )
        })
        .take(MAX_RETURNED_PARTS)
}

/// What a returned message says about itself.
struct Returned {
    message_id: Option<String>,
    /// The bare, lower-cased first `To` address.
    to: Option<String>,
}

/// The returned message in a part of the top message (`raw`): parsed already (a
/// `message/rfc822` sent as it should be, unencoded), or header fields to parse (headers only,
/// an encoded message, or one mail-parser left as text).
fn returned(raw: &[u8], part: &MessagePart) -> Option<Returned> {
    let of = |headers: &[Header]| Returned {
        message_id: header(headers, "message-id").and_then(|v| ids(v).into_iter().next()),
        to: first_address(header(headers, "to")).as_deref().and_then(report::recipient_address),
    };
    let encoded = matches!(mime::transfer_encoding(raw, part).as_deref(), Some("base64" | "quoted-printable"));
    match &part.body {
        PartType::Message(m) if !encoded => m.parts.first().map(|p| of(&p.headers)),
        PartType::Multipart(_) => None,
        _ => {
            let bytes = decoded(raw, part);
            let m = mime::headers_parser().parse_headers(bytes.as_ref())?;
            let r = m.parts.first().map(|p| of(&p.headers));
            mime::drop_flat(m);
            r
        }
    }
}

/// A header value as text (the first of a list).
fn text_of<'a>(v: &'a HeaderValue) -> Option<&'a str> {
    match v {
        HeaderValue::Text(t) => Some(t.as_ref()),
        HeaderValue::TextList(l) => l.first().map(|t| t.as_ref()),
        _ => None,
    }
}

/// The Message-IDs of an id header, with angle brackets; invalid ones left out.
fn ids(v: &HeaderValue) -> Vec<String> {
    match v {
        HeaderValue::Text(t) => angle(t).into_iter().collect(),
        HeaderValue::TextList(l) => l.iter().filter_map(|t| angle(t)).collect(),
        _ => Vec::new(),
    }
}

/// The first address of an address header, as written.
fn first_address(v: Option<&HeaderValue>) -> Option<String> {
    let addr = v?.as_address()?.first()?.address()?.trim();
    (!addr.is_empty() && !addr.contains(char::is_control)).then(|| addr.to_string())
}

/// The first body part of the type (`text/html` when `html`), decoded, bounded.
fn body(message: &Message, raw: &[u8], html: bool) -> Option<String> {
    let ids = if html { &message.html_body } else { &message.text_body };
    ids.iter().find_map(|&id| {
        let part = message.parts.get(id as usize)?;
        match part.body {
            PartType::Html(_) if html => Some(bounded(&decoded_text(raw, part), MAX_BODY)),
            PartType::Text(_) if !html => Some(bounded(&decoded_text(raw, part), MAX_BODY)),
            _ => None,
        }
    })
}

/// The top header fields as `[[name, value], …]`: names as written, values decoded to text.
fn header_pairs(raw: &[u8]) -> Value {
    let Some(m) = mime::text_parser().parse_headers(raw) else { return Value::Array(Vec::new()) };
    let pairs = m.parts.first().map_or(&[][..], |p| p.headers.as_slice()).iter().take(MAX_HEADERS).map(|h| {
        let written = raw.get(h.offset_field as usize..h.offset_start as usize).map(String::from_utf8_lossy);
        let name = written
            .as_deref()
            .map(|n| n.trim().trim_end_matches(':').trim())
            .filter(|n| !n.is_empty())
            .unwrap_or(h.name.as_str());
        let value = match &h.value {
            HeaderValue::Text(t) => t.as_ref().to_string(),
            HeaderValue::TextList(l) => l.join(", "),
            _ => String::new(),
        };
        Value::Array(vec![
            Value::String(bounded(name, MAX_HEADER_VALUE)),
            Value::String(bounded(value.trim(), MAX_HEADER_VALUE)),
        ])
    });
    let pairs = Value::Array(pairs.collect());
    mime::drop_flat(m);
    pairs
}

/// Appends a Message-ID unless it is there already or the list is full.
fn push_id(ids: &mut Vec<String>, id: Option<String>) {
    if let Some(id) = id {
        if !ids.contains(&id) && ids.len() < MAX_REFERENCES {
            ids.push(id);
        }
    }
}

/// A Message-ID with angle brackets (`<x@y>`), from one written with or without them; None when
/// it is empty, holds spaces, controls or brackets, or is longer than a header line may be.
pub(crate) fn angle(id: &str) -> Option<String> {
    let inner = id.trim().trim_start_matches('<').trim_end_matches('>').trim();
    let bad = |c: char| c.is_whitespace() || c.is_control() || c == '<' || c == '>';
    (!inner.is_empty() && inner.len() <= 995 && !inner.contains(bad)).then(|| format!("<{inner}>"))
}

/// `s` with NUL (which `text` and `jsonb` cannot hold) replaced by U+FFFD, cut to at most `max`
/// bytes on a character boundary.
pub(crate) fn bounded(s: &str, max: usize) -> String {
    let cut = s.get(..s.floor_char_boundary(max)).unwrap_or("");
    if cut.contains('\0') {
        cut.replace('\0', "\u{FFFD}")
    } else {
        cut.to_string()
    }
}

#[cfg(test)]
mod tests;
