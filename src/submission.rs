//! What SMTP submission (RFC 6409) changes in a submitted message before it is stored, and what
//! it reads of it. No pgrx: the listener calls it in its runtime, before the message is handed to
//! the main thread. The message is delivered as submitted: only `Bcc:` fields are taken out (a
//! recipient must not see the others' Bcc), and `Message-ID:` and `Date:` are added in front
//! when missing (RFC 6409 section 8); every other byte, the body included, stays as it came.

use mail_parser::{HeaderName, HeaderValue, MessageParser};

/// A submitted message, ready to store.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Prepared {
    /// The message to deliver: CRLF line ends, Bcc taken out, Message-ID and Date added.
    pub raw: Vec<u8>,
    /// Its Message-ID, with the angle brackets.
    pub message_id: String,
    /// The decoded Subject, for email.messages.subject.
    pub subject: Option<String>,
    /// The address of its From field.
    pub from: String,
}

/// Prepares `raw` (dot-unstuffed, CRLF line ends, as the SMTP server keeps it). `new_id` makes a
/// Message-ID (with brackets) for the From address's domain when the message has none; `date` is
/// the RFC 5322 date to add when it has no Date. Err: why the message is refused (no header
/// section, no From address).
pub fn prepare(raw: &[u8], new_id: impl FnOnce(&str) -> String, date: &str) -> Result<Prepared, String> {
    let end = header_end(raw).ok_or("the message has no header section (no empty line after the headers)")?;
    let (head, body) = raw.split_at(end);
    let parsed = MessageParser::default().parse_headers(head).ok_or("the message's header section cannot be parsed")?;
    let from = parsed
        .from()
        .and_then(|a| a.first())
        .and_then(|a| a.address())
        .map(str::to_string)
        .filter(|a| a.contains('@'))
        .ok_or("the message has no From field with an address")?;
    let subject = parsed.subject().map(str::to_string);
    let existing_id = parsed.headers().iter().find(|h| h.name == HeaderName::MessageId).and_then(|h| match &h.value {
        HeaderValue::Text(t) => Some(format!("<{t}>")),
        _ => None,
    });
    let has_date = parsed.headers().iter().any(|h| h.name == HeaderName::Date);

    let mut out = Vec::with_capacity(raw.len() + 128);
    let message_id = match existing_id {
        Some(id) => id,
        None => {
            let id = new_id(from.rsplit_once('@').map_or("localhost", |(_, d)| d));
            out.extend_from_slice(format!("Message-ID: {id}\r\n").as_bytes());
            id
        }
    };
    if !has_date {
        out.extend_from_slice(format!("Date: {date}\r\n").as_bytes());
    }
    for field in fields(head) {
        if !is_bcc(field) {
            out.extend_from_slice(field);
        }
    }
    out.extend_from_slice(body);
    Ok(Prepared { raw: out, message_id, subject, from })
}

/// The address of the From field of a stored message (for its DKIM signature's domain).
pub fn from_address(raw: &[u8]) -> Option<String> {
    let head = &raw[..header_end(raw)?];
    let parsed = MessageParser::default().parse_headers(head)?;
    parsed.from()?.first()?.address().map(str::to_string)
}

/// Where the header section ends: just after its last field's CRLF (the empty line and the body
/// follow). A message that starts with the empty line has an empty header section.
fn header_end(raw: &[u8]) -> Option<usize> {
    if raw.starts_with(b"\r\n") {
        return Some(0);
    }
    raw.windows(4).position(|w| w == b"\r\n\r\n").map(|i| i + 2)
}

/// The header fields of `head`, each with its continuation lines and CRLFs.
fn fields(head: &[u8]) -> Vec<&[u8]> {
    let mut out = Vec::new();
    let mut start = 0;
    let mut i = 0;
    while i < head.len() {
        let line_end = head[i..].iter().position(|&b| b == b'\n').map_or(head.len(), |p| i + p + 1);
        let continues = matches!(head.get(line_end), Some(b' ' | b'\t'));
        if !continues {
            out.push(&head[start..line_end]);
            start = line_end;
        }
        i = line_end;
    }
    if start < head.len() {
        out.push(&head[start..]);
    }
    out
}

/// Whether a field is `Bcc:` (any letter case, spaces allowed before the colon).
fn is_bcc(field: &[u8]) -> bool {
    let name_end = field.iter().position(|&b| b == b':').unwrap_or(0);
    let name = &field[..name_end];
    let name = name.strip_suffix(b" ").unwrap_or(name);
    name.eq_ignore_ascii_case(b"bcc") || name.eq_ignore_ascii_case(b"resent-bcc")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id(domain: &str) -> String {
        format!("<new@{domain}>")
    }

    const DATE: &str = "Mon, 30 Nov 2026 12:00:00 +0000";

    #[test]
    fn bcc_is_taken_out_and_message_id_and_date_added() {
        let raw = b"From: Ada <ada@example.org>\r\nTo: bob@example.test\r\nBcc: eve@example.test,\r\n  mallory@example.test\r\nSubject: =?utf-8?q?Gr=C3=BC=C3=9Fe?=\r\n\r\nBody line\r\n.. dots stay\r\n";
        let p = prepare(raw, id, DATE).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(p.message_id, "<new@example.org>");
        assert_eq!(p.subject.as_deref(), Some("Grüße"));
        assert_eq!(p.from, "ada@example.org");
        let expected = "Message-ID: <new@example.org>\r\nDate: Mon, 30 Nov 2026 12:00:00 +0000\r\nFrom: Ada <ada@example.org>\r\nTo: bob@example.test\r\nSubject: =?utf-8?q?Gr=C3=BC=C3=9Fe?=\r\n\r\nBody line\r\n.. dots stay\r\n";
        assert_eq!(String::from_utf8_lossy(&p.raw), expected);
    }

    #[test]
    fn an_existing_message_id_and_date_are_kept() {
        let raw = b"Date: Sun, 29 Nov 2026 10:00:00 +0100\r\nMessage-ID: <abc@client.test>\r\nFrom: a@x.test\r\nBCC : hidden@x.test\r\nResent-Bcc: r@x.test\r\n\r\nhi\r\n";
        let p = prepare(raw, |_| panic!("no new id expected"), DATE).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(p.message_id, "<abc@client.test>");
        assert_eq!(
            String::from_utf8_lossy(&p.raw),
            "Date: Sun, 29 Nov 2026 10:00:00 +0100\r\nMessage-ID: <abc@client.test>\r\nFrom: a@x.test\r\n\r\nhi\r\n"
        );
    }

    #[test]
    fn the_body_is_byte_identical() {
        let body: Vec<u8> =
            (0u8..=255).filter(|b| *b != b'\r' && *b != b'\n').chain(*b"\r\n\r\nBcc: not a header\r\n").collect();
        let mut raw = b"From: a@x.test\r\nMessage-ID: <m@x.test>\r\nDate: x\r\n\r\n".to_vec();
        raw.extend_from_slice(&body);
        let p = prepare(&raw, id, DATE).unwrap_or_else(|e| panic!("{e}"));
        assert!(p.raw.ends_with(&body));
        assert_eq!(p.raw, raw);
    }

    #[test]
    fn refusals() {
        assert!(prepare(b"From: a@x.test\r\nno empty line", id, DATE).is_err());
        assert!(prepare(b"To: b@x.test\r\n\r\nbody\r\n", id, DATE).unwrap_err().contains("From"));
        assert!(prepare(b"From: undisclosed\r\n\r\nbody\r\n", id, DATE).unwrap_err().contains("From"));
        assert!(prepare(b"\r\nbody only\r\n", id, DATE).is_err());
    }

    #[test]
    fn any_bytes_never_panic() {
        let mut seed = 7u64;
        for n in 0..2000 {
            let len = n % 300;
            let bytes: Vec<u8> = (0..len)
                .map(|_| {
                    seed = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
                    let b = (seed >> 33) as u8;
                    match b % 7 {
                        0 => b'\r',
                        1 => b'\n',
                        2 => b':',
                        _ => b,
                    }
                })
                .collect();
            let mut raw = b"From: a@x.test\r\n".to_vec();
            raw.extend_from_slice(&bytes);
            let _ = prepare(&raw, id, DATE);
            let _ = prepare(&bytes, id, DATE);
        }
    }
}
