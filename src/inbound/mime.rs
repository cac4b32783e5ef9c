//! How `mail-parser` is used on untrusted mail, so that the work stays linear in the message's
//! size. No pgrx here: it runs in the listener worker's main thread and in backends
//! (`email.ingest_message`).
//!
//! mail-parser 0.11 never panics by design and walks nested parts without recursing, but three
//! of its paths cost more than linear time, measured on crafted input (release build):
//!
//! - every `multipart` whose boundary never comes scans to the end of the message: 20,000 such
//!   parts in 1.1 MB took 6 s (quadratic);
//! - at every `--` it compares the whole boundary: a 300 KB boundary over 300 KB of dashes took
//!   0.2 s, and four times that at twice the size;
//! - RFC 2231 parameter continuations (`name*0=…; name*1=…`) are merged by re-copying: a 2 MB
//!   `Content-Type` took 0.8 s.
//!
//! So before the MIME parse, `linear_enough` scans the raw bytes and estimates that cost: a
//! `multipart` whose boundary comes later is cheap (the parser moves forward to it); one whose
//! boundary never comes costs a scan to the end. It finds every `boundary` parameter, and counts
//! it as found only when written simply and followed, after its header block, by a delimiter
//! line that the parser is sure to match (else it counts the scan). It adds the boundary
//! comparisons at each `--`, and bounds the length of every `Content-Type` and
//! `Content-Disposition` field. A message over the budget is read for its header fields only
//! (`Depth::Headers`). And the parser is told to ignore `Content-Transfer-Encoding`: it then never
//! decodes a part, so it never parses bytes that the scan did not see (an encoded
//! `message/rfc822` would otherwise be decoded and parsed again, hiding its content from the
//! scan). The few parts read here are decoded by `decoded` instead.
//!
//! mail-parser's result is a tree: its default drop recurses once per nested message (a message
//! nesting 100,000 `message/rfc822` parts overflows an 8 MB stack there). `drop_flat` takes it
//! apart without recursion.

use std::borrow::Cow;
use std::collections::HashMap;

use mail_parser::decoders::charsets::map::charset_decoder;
use mail_parser::{ContentType, Header, HeaderName, HeaderValue, Message, MessageParser, MessagePart, PartType};

/// Estimated bytes the MIME parse may scan: about 0.1 s in a release build. An ordinary message
/// costs about twice its size, so messages up to 100 MB are read whole.
const BUDGET: u64 = 200_000_000;
/// The longest `Content-Type` or `Content-Disposition` field (with its folded lines) that the
/// MIME parse is given; RFC 2046 boundaries are at most 70 characters.
const MAX_CONTENT_TYPE_FIELD: usize = 16 * 1024;
/// More `boundary` parameters than this: not an ordinary message.
const MAX_BOUNDARIES: usize = 10_000;
/// How far after `boundary` its value is looked for.
const BOUNDARY_WINDOW: usize = 1024;

/// How deep a message can be read in bounded time.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Depth {
    /// Its MIME structure.
    Mime,
    /// Its top header fields only.
    Headers,
}

/// Whether the MIME parse of `raw` stays within `BUDGET`: see the module documentation.
pub(crate) fn linear_enough(raw: &[u8]) -> Depth {
    let n = raw.len() as u64;
    let lines = Lines::of(raw);
    if lines.longest_content_type_field > MAX_CONTENT_TYPE_FIELD {
        return Depth::Headers;
    }
    // One forward pass (the parts, and seeking boundaries that come), and one more for luck.
    let mut cost: u64 = 2 * n;
    let mut boundaries = 0;
    let mut longest_boundary: u64 = 0;
    let mut dashes: u64 = 0;
    let mut previous = 0u8;
    for (i, &b) in raw.iter().enumerate() {
        if b == b'-' && previous == b'-' {
            dashes += 1;
        }
        previous = b;
        if !matches!(b, b'b' | b'B') || !raw.get(i..i + 8).is_some_and(|w| w.eq_ignore_ascii_case(b"boundary")) {
            continue;
        }
        boundaries += 1;
        if boundaries > MAX_BOUNDARIES {
            return Depth::Headers;
        }
        let after = raw.get(i + 8..).unwrap_or_default();
        let Some(len) = value_length(after) else { return Depth::Headers };
        longest_boundary = longest_boundary.max(len as u64);
        let found = simple_boundary(after).is_some_and(|v| lines.delimited_after(v, i));
        if !found {
            // The parser may seek it to the end, then come back.
            cost = cost.saturating_add(n - i as u64);
        }
    }
    // Each `--` met on a pass compares up to a boundary's length (a memcmp: counted as an eighth
    // of a byte scanned a byte).
    let passes = cost / n.max(1) + 1;
    cost = cost.saturating_add(passes.saturating_mul(dashes).saturating_mul(longest_boundary) / 8);
    if cost > BUDGET {
        Depth::Headers
    } else {
        Depth::Mime
    }
}

/// What `linear_enough` needs to know of the lines of a message.
struct Lines<'r> {
    /// The last delimiter line (`--V` or `--V--`) for each `V`, by position.
    last_delimiter: HashMap<&'r [u8], usize>,
    /// The positions of the empty lines (which end a header block), ascending.
    empty: Vec<usize>,
    longest_content_type_field: usize,
}

impl<'r> Lines<'r> {
    fn of(raw: &'r [u8]) -> Lines<'r> {
        let mut lines = Lines { last_delimiter: HashMap::new(), empty: Vec::new(), longest_content_type_field: 0 };
        let mut field: Option<usize> = None;
        let mut at = 0;
        for line in raw.split(|&b| b == b'\n') {
            let start = at;
            at += line.len() + 1;
            let content = line.strip_suffix(b"\r").unwrap_or(line);
            if content.is_empty() {
                lines.empty.push(start);
            }
            if let Some(v) = content.strip_prefix(b"--").map(|v| v.trim_ascii_end()) {
                if v.len() <= MAX_DELIMITER {
                    lines.last_delimiter.insert(v, start);
                    if let Some(v) = v.strip_suffix(b"--") {
                        lines.last_delimiter.insert(v, start);
                    }
                }
            }
            // Content-Type and Content-Disposition fields, with their folded lines.
            let folded = line.first().is_some_and(|&c| c == b' ' || c == b'\t');
            field = match field {
                Some(len) if folded => Some(len + line.len() + 1),
                _ => is_content_type_name(line).then_some(line.len()),
            };
            lines.longest_content_type_field = lines.longest_content_type_field.max(field.unwrap_or(0));
        }
        lines
    }

    /// Whether a delimiter line for `boundary` comes after the header block holding `at`.
    fn delimited_after(&self, boundary: &[u8], at: usize) -> bool {
        let block_end = self.empty.get(self.empty.partition_point(|&e| e <= at)).copied().unwrap_or(usize::MAX);
        self.last_delimiter.get(boundary).is_some_and(|&d| d > block_end)
    }
}

/// Delimiter lines longer than this are not remembered (a boundary is at most 70 characters).
const MAX_DELIMITER: usize = 256;

/// The boundary written after a `boundary` parameter name, when it is written simply: `=token`
/// or `="quoted"`, with no escape, folding, comment, encoded word or RFC 2231 form, and nothing
/// else before the `;` or the end of the line. The parser reads such a value the same way.
fn simple_boundary(after: &[u8]) -> Option<&[u8]> {
    let rest = after.get(..after.len().min(BOUNDARY_WINDOW))?;
    let blanks = |r: &[u8]| r.iter().take_while(|&&c| c == b' ' || c == b'\t').count();
    let rest = rest.get(blanks(rest)..)?.strip_prefix(b"=")?;
    let rest = rest.get(blanks(rest)..)?;
    let end_of_param = |r: &[u8]| r.iter().position(|&c| matches!(c, b';' | b'\r' | b'\n')).unwrap_or(r.len());
    let (value, tail) = match rest.strip_prefix(b"\"") {
        Some(quoted) => {
            let close = quoted.iter().position(|&c| c == b'"')?;
            let (value, after_quote) = (quoted.get(..close)?, quoted.get(close + 1..)?);
            (value, after_quote.get(..end_of_param(after_quote))?)
        }
        None => {
            let token = rest.get(..end_of_param(rest))?.trim_ascii_end();
            (token, &b""[..])
        }
    };
    let plain = !value.is_empty()
        && value.len() <= MAX_DELIMITER
        && !value.iter().any(|&c| c.is_ascii_whitespace() || matches!(c, b'"' | b'\\' | b'(' | b')'))
        && !value.windows(2).any(|w| w == b"=?")
        && tail.iter().all(|&c| c == b' ' || c == b'\t');
    plain.then_some(value)
}

/// An upper bound of the length of the value after a `boundary` name: up to the first `;` or the
/// end of its field (a line break not followed by a fold). None when that is not within
/// `BOUNDARY_WINDOW` bytes.
fn value_length(after: &[u8]) -> Option<usize> {
    let window = after.get(..after.len().min(BOUNDARY_WINDOW))?;
    let mut i = 0;
    while let Some(&c) = window.get(i) {
        match c {
            b';' => return Some(i),
            b'\n' if !matches!(after.get(i + 1), Some(b' ' | b'\t')) => return Some(i),
            _ => i += 1,
        }
    }
    (after.len() <= BOUNDARY_WINDOW).then_some(after.len())
}

fn is_content_type_name(line: &[u8]) -> bool {
    let mut name = [0u8; 24];
    let mut len = 0;
    for &c in line {
        match c {
            b':' => break,
            c if c.is_ascii_whitespace() => {}
            c => {
                match name.get_mut(len) {
                    Some(slot) => *slot = c.to_ascii_lowercase(),
                    None => return false,
                }
                len += 1;
            }
        }
    }
    matches!(name.get(..len), Some(b"content-type" | b"content-disposition"))
}

/// The MIME parser: the header fields this module reads are parsed by type, every other one
/// raw, and `Content-Transfer-Encoding` is ignored (parts stay as received; see `decoded`).
pub(crate) fn mime_parser() -> MessageParser {
    MessageParser::new()
        .with_mime_headers()
        .with_message_ids()
        .with_address_headers()
        .header_text(HeaderName::Subject)
        .ignore_header(HeaderName::ContentTransferEncoding)
        .default_header_raw()
}

/// The parser for header blocks only (a returned message's, or a message over the budget): no
/// field is parsed as a content type.
pub(crate) fn headers_parser() -> MessageParser {
    MessageParser::new()
        .with_message_ids()
        .with_address_headers()
        .header_text(HeaderName::Subject)
        .header_raw(HeaderName::ContentType)
        .default_header_raw()
}

/// The parser for `Parsed::headers`: every value decoded as text.
pub(crate) fn text_parser() -> MessageParser {
    MessageParser::new().header_text(HeaderName::Subject).default_header_text()
}

/// Drops a parsed message without recursing into its nested messages.
pub(crate) fn drop_flat(message: Message<'_>) {
    let mut stack = vec![message];
    while let Some(mut m) = stack.pop() {
        for part in &mut m.parts {
            if matches!(part.body, PartType::Message(_)) {
                if let PartType::Message(inner) = std::mem::take(&mut part.body) {
                    stack.push(inner);
                }
            }
        }
    }
}

/// The first header field called `name` (any case).
pub(crate) fn find<'a, 'x>(headers: &'a [Header<'x>], name: &str) -> Option<&'a Header<'x>> {
    headers.iter().find(|h| h.name.as_str().eq_ignore_ascii_case(name))
}

/// The value of the first header field called `name`.
pub(crate) fn value<'a, 'x>(headers: &'a [Header<'x>], name: &str) -> Option<&'a HeaderValue<'x>> {
    find(headers, name).map(|h| &h.value)
}

pub(crate) fn content_type<'a, 'x>(part: &'a MessagePart<'x>) -> Option<&'a ContentType<'x>> {
    value(&part.headers, "content-type").and_then(HeaderValue::as_content_type)
}

/// `(type, subtype)` of a part, lower-case (mail-parser lower-cases them).
pub(crate) fn mime_type<'a>(part: &'a MessagePart) -> Option<(&'a str, &'a str)> {
    content_type(part).map(|ct| (ct.ctype(), ct.subtype().unwrap_or("")))
}

/// The transfer encoding of a top-level part, read from the raw field (the parser ignores it).
pub(crate) fn transfer_encoding(raw: &[u8], part: &MessagePart) -> Option<String> {
    let h = find(&part.headers, "content-transfer-encoding")?;
    let bytes = raw.get(h.offset_start as usize..h.offset_end as usize)?;
    Some(String::from_utf8_lossy(bytes).trim().to_ascii_lowercase())
}

/// The content of a part of the top message (`raw` is that message), transfer-decoded.
pub(crate) fn decoded<'r>(raw: &'r [u8], part: &MessagePart) -> Cow<'r, [u8]> {
    let body = raw.get(part.offset_body as usize..part.offset_end as usize).unwrap_or_default();
    match transfer_encoding(raw, part).as_deref() {
        Some("base64") => Cow::Owned(base64(body)),
        Some("quoted-printable") => Cow::Owned(quoted_printable(body)),
        _ => Cow::Borrowed(body),
    }
}

/// The content of a text part of the top message, transfer-decoded and converted from its
/// charset (UTF-8 when it names none or one unknown; invalid bytes become U+FFFD).
pub(crate) fn decoded_text(raw: &[u8], part: &MessagePart) -> String {
    let bytes = decoded(raw, part);
    let charset = content_type(part).and_then(|ct| ct.attribute("charset")).and_then(|c| charset_decoder(c.as_bytes()));
    match charset {
        Some(decode) => decode(&bytes),
        None => String::from_utf8_lossy(&bytes).into_owned(),
    }
}

/// Lenient MIME base64: characters outside the alphabet are skipped, decoding stops at `=`.
fn base64(input: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(input.len() / 4 * 3);
    let (mut acc, mut bits) = (0u32, 0u32);
    for &c in input {
        let v = match c {
            b'A'..=b'Z' => c - b'A',
            b'a'..=b'z' => c - b'a' + 26,
            b'0'..=b'9' => c - b'0' + 52,
            b'+' => 62,
            b'/' => 63,
            b'=' => break,
            _ => continue,
        };
        acc = (acc << 6) | u32::from(v);
        bits += 6;
        if bits >= 8 {
            bits -= 8;
            out.push((acc >> bits) as u8);
            acc &= (1 << bits) - 1;
        }
    }
    out
}

/// Lenient quoted-printable: `=XX` decoded, soft line breaks removed, a malformed `=` kept.
fn quoted_printable(input: &[u8]) -> Vec<u8> {
    let hex = |c: u8| (c as char).to_digit(16).map(|d| d as u8);
    let mut out = Vec::with_capacity(input.len());
    let mut i = 0;
    while let Some(&c) = input.get(i) {
        if c != b'=' {
            out.push(c);
            i += 1;
            continue;
        }
        match (input.get(i + 1).copied(), input.get(i + 2).copied()) {
            (Some(b'\r'), Some(b'\n')) => i += 3,
            (Some(b'\n'), _) => i += 2,
            (Some(h), Some(l)) if hex(h).is_some() && hex(l).is_some() => {
                out.push(hex(h).unwrap_or(0) << 4 | hex(l).unwrap_or(0));
                i += 3;
            }
            _ => {
                out.push(b'=');
                i += 1;
            }
        }
    }
    out
}

#[cfg(test)]
#[allow(clippy::indexing_slicing, clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn decoders() {
        assert_eq!(base64(b"SGVs\r\nbG8=\r\n"), b"Hello");
        assert_eq!(base64(b"SG!V*sbG8"), b"Hello");
        assert_eq!(base64(b""), b"");
        assert_eq!(quoted_printable(b"a=3Db=\r\nc=\nd =ZZ=4"), b"a=bcd =ZZ=4");
        assert_eq!(quoted_printable(b"caf=C3=A9"), "café".as_bytes());
    }

    #[test]
    fn budget() {
        let ok = b"Content-Type: multipart/mixed; boundary=\"abc\"\r\n\r\n--abc\r\n\r\nx\r\n--abc--\r\n";
        assert_eq!(linear_enough(ok), Depth::Mime);
        let many: String =
            (0..20_000).map(|i| format!("--x\r\nContent-Type: multipart/mixed; boundary=n{i}\r\n\r\n")).collect();
        assert_eq!(linear_enough(many.as_bytes()), Depth::Headers);
        let long = format!(
            "Content-Type: multipart/mixed; boundary=\"{}\"\r\n\r\n{}",
            "-".repeat(100_000),
            "-".repeat(300_000)
        );
        assert_eq!(linear_enough(long.as_bytes()), Depth::Headers);
        let params = format!("Content-Type: text/plain;\r\n {}\r\n\r\nx", "a*1*=b; ".repeat(3000));
        assert_eq!(linear_enough(params.as_bytes()), Depth::Headers);
        let spaced = format!("Content - Type : text/plain; {}\r\n\r\nx", "a*1*=b; ".repeat(3000));
        assert_eq!(linear_enough(spaced.as_bytes()), Depth::Headers);
        // A large ordinary message is read whole.
        let big = format!(
            "Content-Type: multipart/mixed; boundary=b\r\n\r\n--b\r\n\r\n{}\r\n--b--\r\n",
            "x".repeat(20_000_000)
        );
        assert_eq!(linear_enough(big.as_bytes()), Depth::Mime);
    }

    /// A message nesting 100,000 `message/rfc822` parts (over the budget, so `parse` never builds
    /// it; parsed directly here) is dropped in a 2 MiB stack.
    #[test]
    fn deep_trees_drop_flat() {
        let raw = b"From: a@b\r\nContent-Type: multipart/mixed; boundary=\"b\"\r\n\r\n--b\r\nContent-Type: message/rfc822\r\n\r\n"
            .repeat(100_000);
        let depth = std::thread::Builder::new()
            .stack_size(2 << 20)
            .spawn(move || {
                let m = mime_parser().parse(&raw).unwrap();
                let mut depth = 0;
                let mut at = &m;
                while let Some(inner) = at.parts.iter().find_map(|p| p.message()) {
                    depth += 1;
                    at = inner;
                }
                drop_flat(m);
                depth
            })
            .unwrap()
            .join()
            .unwrap();
        assert_eq!(depth, 99_999, "the innermost message is empty");
    }

    #[test]
    fn boundary_values() {
        assert_eq!(simple_boundary(b"=\"abc\"; x"), Some(&b"abc"[..]));
        assert_eq!(simple_boundary(b" = abc ;"), Some(&b"abc"[..]));
        assert_eq!(simple_boundary(b"=----=_Part_1\r\n"), Some(&b"----=_Part_1"[..]));
        assert_eq!(simple_boundary(b"*0=abcd"), None);
        assert_eq!(simple_boundary(b"=\"ab\r\n cd\""), None);
        assert_eq!(simple_boundary(b"=ab cd"), None);
        assert_eq!(simple_boundary(b"=\"ab\" cd"), None);
        assert_eq!(simple_boundary(b"=\"=?utf-8?q?x?=\""), None);
        assert_eq!(simple_boundary(b"\r\n =abc"), None);
        assert_eq!(simple_boundary(b" condition"), None);
        assert_eq!(value_length(b"=\"abc\"; x"), Some(6));
        assert_eq!(value_length(b"=\"ab\r\n cd\"\r\nX: y"), Some(11));
        assert_eq!(value_length(&[b'a'; 2000]), None);
    }

    #[test]
    fn delimiters() {
        let raw = b"Content-Type: multipart/mixed; boundary=b\r\n--b\r\n\r\nbody\r\n--b--\r\n";
        let lines = Lines::of(raw);
        // The `--b` inside the header block does not count; the closing one after it does.
        assert!(lines.delimited_after(b"b", 31));
        let raw = b"Content-Type: multipart/mixed; boundary=b\r\n--b\r\n\r\nbody\r\n";
        assert!(!Lines::of(raw).delimited_after(b"b", 31));
    }
}
