//! Message input rules, with no pgrx: address lists, header safety, custom headers, attachments
//! and Message-IDs. `email.send` calls these in the caller's backend before anything is stored;
//! the worker re-reads stored values with the same parsers when it builds the MIME message, so
//! what was accepted at enqueue is exactly what goes on the wire.

use std::str::FromStr;

use base64::Engine;
use lettre::message::Mailbox;
use lettre::Address;
use serde_json::Value;

/// A value refused at the edge. `field` names the argument (or the JSON member) at fault.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{}", self.describe())]
pub struct FieldError {
    pub field: String,
    pub message: String,
}

/// The message of a missing required argument.
const REQUIRED: &str = "is required";

impl FieldError {
    pub fn new(field: impl Into<String>, message: impl Into<String>) -> Self {
        FieldError { field: field.into(), message: message.into() }
    }

    /// A required argument (or JSON member) that is NULL or missing.
    pub fn required(field: impl Into<String>) -> Self {
        FieldError::new(field, REQUIRED)
    }

    fn describe(&self) -> String {
        if self.message == REQUIRED {
            format!("{} is required (it is NULL or missing)", self.field)
        } else {
            format!("invalid {}: {}", self.field, self.message)
        }
    }
}

/// Quotes a user value for an error message, cut to a readable length.
pub fn show(value: &str) -> String {
    const MAX: usize = 120;
    let mut out = String::from("\"");
    for (i, c) in value.chars().enumerate() {
        if i == MAX {
            out.push('…');
            break;
        }
        match c {
            '\r' => out.push_str("\\r"),
            '\n' => out.push_str("\\n"),
            '\0' => out.push_str("\\0"),
            '"' => out.push_str("\\\""),
            c if c.is_control() => out.push_str(&format!("\\u{{{:x}}}", c as u32)),
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

/// Refuses CR, LF and NUL: anything that ends up in a header must stay on one line.
pub fn check_single_line(field: &str, value: &str) -> Result<(), FieldError> {
    if value.contains(['\r', '\n', '\0']) {
        return Err(FieldError::new(
            field,
            format!("{} contains a line break or NUL character (header injection is refused)", show(value)),
        ));
    }
    Ok(())
}

/// Splits an address list on the commas that are not inside quotes, comments or angle brackets.
fn split_list(input: &str) -> Result<Vec<&str>, String> {
    let mut parts = Vec::new();
    let (mut quoted, mut escaped, mut angle, mut comment) = (false, false, 0i32, 0i32);
    let mut start = 0;
    for (i, c) in input.char_indices() {
        if escaped {
            escaped = false;
            continue;
        }
        match c {
            '\\' if quoted || comment > 0 => escaped = true,
            '"' if comment == 0 => quoted = !quoted,
            '(' if !quoted => comment += 1,
            ')' if !quoted && comment > 0 => comment -= 1,
            '<' if !quoted && comment == 0 => angle += 1,
            '>' if !quoted && comment == 0 => angle -= 1,
            ',' if !quoted && comment == 0 && angle == 0 => {
                parts.push(&input[start..i]);
                start = i + 1;
            }
            _ => {}
        }
        if !(0..=1).contains(&angle) {
            return Err("unbalanced angle brackets".into());
        }
    }
    if quoted || escaped {
        return Err("unterminated quoted string".into());
    }
    if angle != 0 {
        return Err("unbalanced angle brackets".into());
    }
    if comment != 0 {
        return Err("unterminated comment".into());
    }
    parts.push(&input[start..]);
    Ok(parts)
}

/// Unquotes an RFC 5322 quoted-string, or checks a bare phrase; returns the display name.
fn display_name(phrase: &str) -> Result<Option<String>, String> {
    let phrase = phrase.trim();
    if phrase.is_empty() {
        return Ok(None);
    }
    if let Some(inner) = phrase.strip_prefix('"') {
        let inner = inner.strip_suffix('"').ok_or("text after the quoted display name")?;
        let mut out = String::new();
        let mut chars = inner.chars();
        while let Some(c) = chars.next() {
            match c {
                '\\' => out.push(chars.next().ok_or("unterminated escape in display name")?),
                '"' => return Err("stray quote in display name".into()),
                c => out.push(c),
            }
        }
        return Ok(Some(out));
    }
    if let Some(bad) = phrase.chars().find(|c| "\"<>[]:;@\\,".contains(*c)) {
        return Err(format!("character '{bad}' in an unquoted display name (quote the name)"));
    }
    Ok(Some(phrase.split_whitespace().collect::<Vec<_>>().join(" ")))
}

/// Parses one mailbox: `a@x.org`, `Name <a@x.org>`, `"Doe, Jane" <j@x.org>`, IDN domains and
/// quoted local parts included.
fn parse_one(piece: &str) -> Result<Mailbox, String> {
    let piece = piece.trim();
    if piece.is_empty() {
        return Err("an empty entry (a trailing or doubled comma?)".into());
    }
    let (name, addr) = match piece.find('<').filter(|_| piece.ends_with('>')) {
        Some(open) if !in_quotes(piece, open) => {
            (display_name(&piece[..open])?, piece[open + 1..piece.len() - 1].trim())
        }
        _ => (None, piece),
    };
    if addr.is_empty() {
        return Err("empty address in angle brackets".into());
    }
    if addr.contains(';') && !addr.starts_with('"') {
        return Err("addresses are separated by commas, not semicolons".into());
    }
    if addr.chars().any(char::is_whitespace) && !addr.starts_with('"') {
        return Err(if addr.matches('@').count() > 1 {
            "two addresses without a comma between them?".into()
        } else {
            "white space inside an address".into()
        });
    }
    if addr.starts_with('"') && !addr.contains("\"@") {
        return Err("malformed quoted local part".into());
    }
    let address = Address::from_str(addr).map_err(|e| format!("{e}"))?;
    Ok(Mailbox::new(name, address))
}

fn in_quotes(s: &str, at: usize) -> bool {
    let mut quoted = false;
    let mut escaped = false;
    for (i, c) in s.char_indices() {
        if i >= at {
            break;
        }
        if escaped {
            escaped = false;
        } else if c == '\\' {
            escaped = true;
        } else if c == '"' {
            quoted = !quoted;
        }
    }
    quoted
}

/// Parses an RFC 5322 address list; an empty list is refused.
pub fn parse_mailboxes(field: &str, input: &str) -> Result<Vec<Mailbox>, FieldError> {
    check_single_line(field, input)?;
    if input.trim().is_empty() {
        return Err(FieldError::new(field, "the address list is empty"));
    }
    let pieces = split_list(input).map_err(|m| FieldError::new(field, format!("{m} in {}", show(input))))?;
    let mut out = Vec::with_capacity(pieces.len());
    for piece in pieces {
        let mb = parse_one(piece)
            .map_err(|m| FieldError::new(field, format!("{} is not a valid address: {m}", show(piece.trim()))))?;
        out.push(mb);
    }
    Ok(out)
}

/// Parses exactly one mailbox (the sender).
pub fn parse_mailbox(field: &str, input: &str) -> Result<Mailbox, FieldError> {
    let mut list = parse_mailboxes(field, input)?;
    if list.len() != 1 {
        return Err(FieldError::new(field, format!("{} must be exactly one address", show(input))));
    }
    Ok(list.remove(0))
}

/// The canonical text stored for a mailbox: `"Doe, Jane" <j@x.org>` or `a@x.org`. It parses
/// back to the same mailbox: a name is left bare only when it is words of RFC 5322 atext joined
/// by single spaces, and quoted otherwise (lettre's own form drops doubled spaces on the way
/// back).
pub fn mailbox_text(mb: &Mailbox) -> String {
    mailbox_of(mb.name.as_deref(), mb.email.as_ref())
}

/// `email`, `Name <email>`, or `"Doe, Jane" <email>` when the name is more than words of RFC 5322
/// atext (quotes and backslashes escaped): a mailbox as `email.send` reads it back.
pub fn mailbox_of(name: Option<&str>, email: &str) -> String {
    let Some(name) = name.filter(|n| !n.trim().is_empty()) else {
        return email.to_string();
    };
    let atext = |c: char| c.is_alphanumeric() || "!#$%&'*+-/=?^_`{|}~".contains(c);
    if name.split(' ').all(|w| !w.is_empty() && w.chars().all(atext)) {
        return format!("{name} <{email}>");
    }
    let mut quoted = String::with_capacity(name.len() + 2);
    quoted.push('"');
    for c in name.chars() {
        if c == '"' || c == '\\' {
            quoted.push('\\');
        }
        quoted.push(c);
    }
    quoted.push('"');
    format!("{quoted} <{email}>")
}

/// The lower-cased bare address, as stored in `email.suppressions`.
pub fn bare_address(mb: &Mailbox) -> String {
    mb.email.to_string().to_lowercase()
}

/// Headers a caller may not set: they are built from the message's own fields.
const STRUCTURAL: &[&str] = &[
    "from",
    "to",
    "cc",
    "bcc",
    "subject",
    "date",
    "message-id",
    "mime-version",
    "reply-to",
    "sender",
    "return-path",
    "dkim-signature",
];

/// Checks an RFC 5322 field name: printable ASCII, no colon, not structural.
pub fn check_header_name(name: &str) -> Result<(), FieldError> {
    let field = "headers";
    if name.is_empty() || name.len() > 76 {
        return Err(FieldError::new(field, format!("header name {} must be 1 to 76 characters", show(name))));
    }
    if !name.bytes().all(|b| (33..=126).contains(&b) && b != b':') {
        return Err(FieldError::new(
            field,
            format!("header name {} may hold only printable ASCII without ':' or spaces", show(name)),
        ));
    }
    let lower = name.to_ascii_lowercase();
    if STRUCTURAL.contains(&lower.as_str()) || lower.starts_with("content-") {
        return Err(FieldError::new(
            field,
            format!("header {} is set by pg_email itself and cannot be given in headers", show(name)),
        ));
    }
    Ok(())
}

/// Validates the `headers` argument: a JSON object of string values.
pub fn parse_headers(value: &Value) -> Result<Vec<(String, String)>, FieldError> {
    let obj = value
        .as_object()
        .ok_or_else(|| FieldError::new("headers", "must be a JSON object such as {\"X-Campaign\": \"spring\"}"))?;
    let mut out = Vec::with_capacity(obj.len());
    for (name, v) in obj {
        check_header_name(name)?;
        let text = v.as_str().ok_or_else(|| {
            FieldError::new("headers", format!("the value of header {} must be a JSON string", show(name)))
        })?;
        check_single_line(&format!("headers.{name}"), text)?;
        if text.len() > 998 {
            return Err(FieldError::new(format!("headers.{name}"), "value is longer than 998 bytes"));
        }
        out.push((name.clone(), text.to_string()));
    }
    Ok(out)
}

/// One decoded attachment, as stored in `email.attachments`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Attachment {
    pub filename: String,
    pub content_type: String,
    pub content_id: Option<String>,
    pub content: Vec<u8>,
}

/// Validates the `attachments` argument: a JSON array of
/// `{"filename","content_type"?,"content" (base64),"content_id"?}`.
pub fn parse_attachments(value: &Value) -> Result<Vec<Attachment>, FieldError> {
    let items = value.as_array().ok_or_else(|| {
        FieldError::new("attachments", "must be a JSON array of {\"filename\", \"content_type\", \"content\"} objects")
    })?;
    let mut out = Vec::with_capacity(items.len());
    for (i, item) in items.iter().enumerate() {
        let at = |k: &str| format!("attachments[{i}].{k}");
        let obj =
            item.as_object().ok_or_else(|| FieldError::new(format!("attachments[{i}]"), "must be a JSON object"))?;
        for key in obj.keys() {
            if !["filename", "content_type", "content", "content_id"].contains(&key.as_str()) {
                return Err(FieldError::new(format!("attachments[{i}]"), format!("unknown member {}", show(key))));
            }
        }
        let text = |k: &str| -> Result<Option<&str>, FieldError> {
            match obj.get(k) {
                None | Some(Value::Null) => Ok(None),
                Some(Value::String(s)) => Ok(Some(s.as_str())),
                Some(_) => Err(FieldError::new(at(k), "must be a JSON string")),
            }
        };
        let filename =
            text("filename")?.filter(|f| !f.trim().is_empty()).ok_or_else(|| FieldError::required(at("filename")))?;
        check_single_line(&at("filename"), filename)?;
        if filename.contains(['/', '\\']) {
            return Err(FieldError::new(
                at("filename"),
                format!("{} must not contain a path separator", show(filename)),
            ));
        }
        let content_type = text("content_type")?.unwrap_or("application/octet-stream");
        check_single_line(&at("content_type"), content_type)?;
        let parsed: mime::Mime = content_type.parse().map_err(|_| {
            FieldError::new(at("content_type"), format!("{} is not a valid MIME type", show(content_type)))
        })?;
        if parsed.type_() == mime::MULTIPART {
            return Err(FieldError::new(at("content_type"), "multipart types cannot be attached"));
        }
        let content_id = match text("content_id")? {
            None => None,
            Some(cid) => {
                let cid = cid.trim().trim_start_matches('<').trim_end_matches('>');
                if cid.is_empty() || !cid.bytes().all(|b| (33..=126).contains(&b) && !b"<>\"()[],;:\\".contains(&b)) {
                    return Err(FieldError::new(at("content_id"), format!("{} is not a valid content id", show(cid))));
                }
                Some(cid.to_string())
            }
        };
        let encoded = text("content")?.ok_or_else(|| FieldError::new(at("content"), "is required (base64)"))?;
        let compact: String = encoded.chars().filter(|c| !c.is_ascii_whitespace()).collect();
        let content = base64::engine::general_purpose::STANDARD
            .decode(compact.as_bytes())
            .map_err(|e| FieldError::new(at("content"), format!("is not valid base64: {e}")))?;
        out.push(Attachment { filename: filename.to_string(), content_type: parsed.to_string(), content_id, content });
    }
    Ok(out)
}

/// A new RFC 5322 Message-ID in the sender's domain: `<uuid@domain>`.
pub fn new_message_id(sender: &Mailbox) -> String {
    new_message_id_for(sender.email.domain())
}

/// A new RFC 5322 Message-ID in `domain`: `<uuid@domain>`.
pub fn new_message_id_for(domain: &str) -> String {
    format!("<{}@{}>", uuid::Uuid::new_v4().simple(), domain)
}

/// A stored message, as the worker reads it back (templates already rendered).
#[derive(Debug, Clone, Default)]
pub struct Stored {
    pub sender: String,
    pub recipients: Vec<String>,
    pub cc: Vec<String>,
    pub bcc: Vec<String>,
    pub reply_to: Option<String>,
    pub subject: String,
    pub body: Option<String>,
    pub html: Option<String>,
    pub headers: Vec<(String, String)>,
    pub attachments: Vec<Attachment>,
    pub message_id: String,
}

/// What goes on the wire: the envelope and the RFC 5322 bytes.
#[derive(Debug, Clone)]
pub struct Built {
    pub from: Address,
    /// Every recipient (to, cc, bcc), deduplicated, IDN domains in ASCII form.
    pub to: Vec<Address>,
    pub raw: Vec<u8>,
}

/// Converts an IDN domain to its ASCII (punycode) form, so that envelopes and headers stay ASCII.
/// True when `address` is still to be delivered: `pending` lists the recipients a retry after a
/// partial delivery is for (case-insensitively); `None` means every recipient.
pub fn is_pending(pending: Option<&[String]>, address: &str) -> bool {
    pending.is_none_or(|p| p.iter().any(|x| x.eq_ignore_ascii_case(address)))
}

pub fn ascii_address(addr: &Address) -> Address {
    match idna::domain_to_ascii(addr.domain()) {
        Ok(d) if d != addr.domain() => Address::new(addr.user(), d).unwrap_or_else(|_| addr.clone()),
        _ => addr.clone(),
    }
}

pub fn ascii_mailbox(mb: Mailbox) -> Mailbox {
    Mailbox::new(mb.name, ascii_address(&mb.email))
}

/// Parses stored address texts back into mailboxes, IDN domains in ASCII form.
pub fn stored_list(field: &str, list: &[String]) -> Result<Vec<Mailbox>, FieldError> {
    let mut out = Vec::with_capacity(list.len());
    for s in list {
        out.push(ascii_mailbox(parse_mailbox(field, s)?));
    }
    Ok(out)
}

/// Encodes an unstructured header value (RFC 5322 §3.2.5, RFC 2047). ASCII text is folded at
/// spaces; anything else becomes base64 encoded-words cut inside the text, never at its spaces,
/// because decoders drop the white space between two encoded-words (lettre cuts at spaces, which
/// loses double spaces such as "À  À").
pub fn encode_header_value(value: &str) -> String {
    use base64::Engine;
    let printable = value.bytes().all(|b| (0x20..0x7f).contains(&b) || b == b'\t');
    if printable && !value.contains("=?") {
        let mut out = String::with_capacity(value.len() + 8);
        let mut line = 0usize;
        for (i, word) in value.split(' ').enumerate() {
            if i > 0 {
                if line + 1 + word.len() > 76 && line > 0 {
                    out.push_str("\r\n ");
                    line = 1;
                } else {
                    out.push(' ');
                    line += 1;
                }
            }
            out.push_str(word);
            line += word.len();
        }
        return out;
    }
    let mut words = Vec::new();
    let mut chunk = String::new();
    for c in value.chars() {
        if chunk.len() + c.len_utf8() > 45 {
            words.push(std::mem::take(&mut chunk));
        }
        chunk.push(c);
    }
    if !chunk.is_empty() || words.is_empty() {
        words.push(chunk);
    }
    words
        .iter()
        .map(|w| format!("=?utf-8?b?{}?=", base64::engine::general_purpose::STANDARD.encode(w.as_bytes())))
        .collect::<Vec<_>>()
        .join("\r\n ")
}

/// Builds the MIME message: multipart/alternative (text first) when both parts exist, inline
/// parts in multipart/related next to the HTML, attachments in multipart/mixed.
pub fn build(m: &Stored) -> Result<Built, FieldError> {
    build_signed(m, None)
}

/// A stored message's mailboxes, header names and attachment types, parsed by every check
/// `build` makes of the message (`header_names` in the order of `headers`, `content_types` in
/// that of `attachments`).
struct Checked {
    from: Mailbox,
    to: Vec<Mailbox>,
    cc: Vec<Mailbox>,
    bcc: Vec<Mailbox>,
    reply_to: Vec<Mailbox>,
    header_names: Vec<lettre::message::header::HeaderName>,
    content_types: Vec<lettre::message::header::ContentType>,
}

impl Checked {
    /// The envelope recipients: to, cc and bcc, each address once.
    fn recipients(&self) -> Vec<Address> {
        let mut rcpts: Vec<Address> = Vec::new();
        for mb in self.to.iter().chain(&self.cc).chain(&self.bcc) {
            if !rcpts.iter().any(|a| AsRef::<str>::as_ref(a).eq_ignore_ascii_case(mb.email.as_ref())) {
                rcpts.push(mb.email.clone());
            }
        }
        rcpts
    }
}

fn content_type(a: &Attachment) -> Result<lettre::message::header::ContentType, FieldError> {
    lettre::message::header::ContentType::parse(&a.content_type)
        .map_err(|_| FieldError::new("attachments", format!("{} is not a valid MIME type", show(&a.content_type))))
}

/// Every check `build` makes of a stored message, in its order, without building it.
fn check(m: &Stored) -> Result<Checked, FieldError> {
    let from = ascii_mailbox(parse_mailbox("sender", &m.sender)?);
    let to = stored_list("recipients", &m.recipients)?;
    let cc = stored_list("cc", &m.cc)?;
    let bcc = stored_list("bcc", &m.bcc)?;
    check_single_line("subject", &m.subject)?;
    let mut reply_to = Vec::new();
    if let Some(r) = &m.reply_to {
        reply_to = parse_mailboxes("reply_to", r)?.into_iter().map(ascii_mailbox).collect();
    }
    let mut header_names = Vec::with_capacity(m.headers.len());
    for (name, value) in &m.headers {
        check_header_name(name)?;
        check_single_line(&format!("headers.{name}"), value)?;
        header_names.push(
            lettre::message::header::HeaderName::new_from_ascii(name.clone())
                .map_err(|_| FieldError::new("headers", format!("header name {} is not valid", show(name))))?,
        );
    }
    if m.body.is_none() && m.html.is_none() {
        return Err(FieldError::new("body", "the message has neither a text nor an HTML part"));
    }
    let content_types = m.attachments.iter().map(content_type).collect::<Result<Vec<_>, _>>()?;
    Ok(Checked { from, to, cc, bcc, reply_to, header_names, content_types })
}

/// What `build` checks and the envelope it gives, without the MIME bytes (`raw` is empty): for
/// the providers that take the message as fields and build their own MIME.
pub fn unbuilt(m: &Stored) -> Result<Built, FieldError> {
    let c = check(m)?;
    Ok(Built { to: c.recipients(), from: c.from.email, raw: Vec::new() })
}

/// `build`, DKIM-signed with the sender domain's keys among `dkim` (`.1`: for SES, which
/// rewrites Date and Message-ID).
pub fn build_signed(m: &Stored, dkim: Option<(&crate::dkim::Signers, bool)>) -> Result<Built, FieldError> {
    use lettre::message::header::{HeaderName, HeaderValue};
    use lettre::message::{Attachment as LAttachment, MultiPart, SinglePart};

    let checked = check(m)?;
    let Checked { from, to, cc, bcc, reply_to, header_names, content_types } = &checked;
    let subject = HeaderName::new_from_ascii("Subject".into()).map_err(|_| FieldError::new("subject", "internal"))?;
    let mut b = lettre::Message::builder()
        .from(from.clone())
        .raw_header(HeaderValue::dangerous_new_pre_encoded(subject, m.subject.clone(), encode_header_value(&m.subject)))
        .message_id(Some(m.message_id.clone()))
        .date_now();
    for mb in to {
        b = b.to(mb.clone());
    }
    for mb in cc {
        b = b.cc(mb.clone());
    }
    for mb in bcc {
        b = b.bcc(mb.clone());
    }
    for mb in reply_to {
        b = b.reply_to(mb.clone());
    }
    for ((_, value), hn) in m.headers.iter().zip(header_names) {
        b = b.raw_header(HeaderValue::dangerous_new_pre_encoded(hn.clone(), value.clone(), encode_header_value(value)));
    }

    type Typed<'a> = (&'a Attachment, &'a lettre::message::header::ContentType);
    let (inline, regular): (Vec<Typed<'_>>, Vec<Typed<'_>>) =
        m.attachments.iter().zip(content_types).partition(|(a, _)| a.content_id.is_some() && m.html.is_some());

    let html_part = match &m.html {
        None => None,
        Some(h) if inline.is_empty() => Some(MultiPart::alternative().singlepart(SinglePart::html(h.clone()))),
        Some(h) => {
            let mut rel = MultiPart::related().singlepart(SinglePart::html(h.clone()));
            for (a, ct) in &inline {
                let cid = a.content_id.clone().unwrap_or_default();
                rel = rel.singlepart(
                    LAttachment::new_inline_with_name(cid, a.filename.clone()).body(a.content.clone(), (*ct).clone()),
                );
            }
            Some(rel)
        }
    };
    // The readable body: one part, or alternative(text, html-or-related).
    enum Body {
        Single(SinglePart),
        Multi(MultiPart),
    }
    let body = match (&m.body, html_part, inline.is_empty()) {
        (Some(t), None, _) => Body::Single(SinglePart::plain(t.clone())),
        (None, Some(_), true) => Body::Single(SinglePart::html(m.html.clone().unwrap_or_default())),
        (None, Some(rel), false) => Body::Multi(rel),
        (Some(t), Some(_), true) => {
            Body::Multi(MultiPart::alternative_plain_html(t.clone(), m.html.clone().unwrap_or_default()))
        }
        (Some(t), Some(rel), false) => {
            Body::Multi(MultiPart::alternative().singlepart(SinglePart::plain(t.clone())).multipart(rel))
        }
        (None, None, _) => return Err(FieldError::new("body", "the message has neither a text nor an HTML part")),
    };
    let message = if regular.is_empty() {
        match body {
            Body::Single(p) => b.singlepart(p),
            Body::Multi(mp) => b.multipart(mp),
        }
    } else {
        let mut mixed = match body {
            Body::Single(p) => MultiPart::mixed().singlepart(p),
            Body::Multi(mp) => MultiPart::mixed().multipart(mp),
        };
        for (a, ct) in &regular {
            mixed = mixed.singlepart(LAttachment::new(a.filename.clone()).body(a.content.clone(), (*ct).clone()));
        }
        b.multipart(mixed)
    }
    .map_err(|e| FieldError::new("message", format!("cannot be built: {e}")))?;

    let rcpts = checked.recipients();
    let raw = match dkim {
        Some((signers, ses)) => {
            let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs());
            crate::dkim::sign(message.formatted(), signers.for_address(from.email.as_ref()), ses, now)
        }
        None => message.formatted(),
    };
    Ok(Built { from: checked.from.email, to: rcpts, raw })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn list(s: &str) -> Result<Vec<String>, FieldError> {
        parse_mailboxes("recipients", s).map(|v| v.iter().map(mailbox_text).collect())
    }

    #[test]
    fn address_lists_that_are_valid() {
        assert_eq!(list("a@x.org").unwrap(), vec!["a@x.org"]);
        assert_eq!(list("a@x.org, Bo <b@y.org>").unwrap(), vec!["a@x.org", "Bo <b@y.org>"]);
        assert_eq!(list("\"Doe, Jane\" <j@x.org>").unwrap(), vec!["\"Doe, Jane\" <j@x.org>"]);
        assert_eq!(list("Jörg Müller <jörg@bücher.de>").unwrap().len(), 1);
        assert_eq!(list("\"john doe\"@x.org").unwrap(), vec!["\"john doe\"@x.org"]);
        assert_eq!(list("user@münchen.de").unwrap(), vec!["user@münchen.de"]);
        assert_eq!(list(" a@x.org ,b@y.org ").unwrap().len(), 2);
    }

    #[test]
    fn address_lists_that_are_refused() {
        for bad in [
            "",
            "   ",
            "a",
            "a@",
            "@x.org",
            "a@x.org,",
            "a@x.org,,b@y.org",
            "a@x.org b@y.org",
            "Bo <b@y.org",
            "<>",
            "a@x.org\r\nBcc: evil@z.org",
            "\"unterminated <a@x.org>",
            "Bo <b@y.org> trailing",
            "a@@x.org",
            "a@-x.org",
        ] {
            let err = list(bad).expect_err(bad);
            assert_eq!(err.field, "recipients", "{bad}");
        }
    }

    #[test]
    fn error_names_the_offending_address() {
        let err = list("a@x.org, not-an-address").unwrap_err();
        assert!(err.message.contains("not-an-address"), "{}", err.message);
    }

    #[test]
    fn header_rules() {
        assert!(parse_headers(&json!({"X-Campaign": "spring"})).is_ok());
        for name in
            ["From", "subject", "Content-Type", "content-transfer-encoding", "Message-ID", "MIME-Version", "Bcc"]
        {
            assert!(parse_headers(&json!({ name: "x" })).is_err(), "{name}");
        }
        assert!(parse_headers(&json!({"X Bad": "x"})).is_err());
        assert!(parse_headers(&json!({"X-Bad:": "x"})).is_err());
        assert!(parse_headers(&json!({"X-A": "x\r\nBcc: y@z.org"})).is_err());
        assert!(parse_headers(&json!({"X-A": 1})).is_err());
        assert!(parse_headers(&json!(["X-A"])).is_err());
    }

    #[test]
    fn attachment_rules() {
        let ok =
            parse_attachments(&json!([{"filename": "a.txt", "content_type": "text/plain", "content": "aGVsbG8="}]))
                .unwrap();
        assert_eq!(ok[0].content, b"hello");
        assert_eq!(ok[0].content_type, "text/plain");
        let inline = parse_attachments(
            &json!([{"filename": "l.png", "content_type": "image/png", "content": "", "content_id": "<logo>"}]),
        )
        .unwrap();
        assert_eq!(inline[0].content_id.as_deref(), Some("logo"));
        let cases = [
            (json!({}), "attachments"),
            (json!([{"content": "aGk="}]), "attachments[0].filename"),
            (json!([{"filename": "a", "content": "!!"}]), "attachments[0].content"),
            (json!([{"filename": "a", "content_type": "not a type", "content": ""}]), "attachments[0].content_type"),
            (json!([{"filename": "a\r\n", "content": ""}]), "attachments[0].filename"),
            (json!([{"filename": "a"}]), "attachments[0].content"),
            (json!([{"filename": "a", "content": "", "extra": 1}]), "attachments[0]"),
        ];
        for (v, field) in cases {
            assert_eq!(parse_attachments(&v).unwrap_err().field, field, "{v}");
        }
    }

    #[test]
    fn message_ids_are_unique_and_in_the_sender_domain() {
        let s: Mailbox = "a@x.org".parse().unwrap();
        let (a, b) = (new_message_id(&s), new_message_id(&s));
        assert_ne!(a, b);
        assert!(a.starts_with('<') && a.ends_with("@x.org>"));
    }

    fn stored() -> Stored {
        Stored {
            sender: "Zoë <z@x.org>".into(),
            recipients: vec!["\"Doe, Jane\" <j@x.org>".into(), "k@bücher.de".into()],
            cc: vec!["c@x.org".into()],
            bcc: vec!["hidden@x.org".into()],
            reply_to: Some("r@x.org".into()),
            subject: "Grüße ✓".into(),
            body: Some("plain text".into()),
            html: Some("<p>html <img src=\"cid:logo\"></p>".into()),
            headers: vec![("X-Campaign".into(), "spring".into())],
            attachments: vec![
                Attachment {
                    filename: "a.txt".into(),
                    content_type: "text/plain".into(),
                    content_id: None,
                    content: b"hello".to_vec(),
                },
                Attachment {
                    filename: "l.png".into(),
                    content_type: "image/png".into(),
                    content_id: Some("logo".into()),
                    content: vec![137, 80, 78, 71],
                },
            ],
            message_id: "<abc@x.org>".into(),
        }
    }

    #[test]
    fn built_message_has_every_part_and_header() {
        let b = build(&stored()).unwrap();
        let raw = String::from_utf8(b.raw.clone()).unwrap();
        assert!(raw.contains("Message-ID: <abc@x.org>\r\n"), "{raw}");
        assert!(raw.contains("X-Campaign: spring\r\n"));
        assert!(raw.contains("Subject: =?utf-8?"), "non-ASCII subject is encoded: {raw}");
        assert!(
            raw.contains("multipart/mixed")
                && raw.contains("multipart/alternative")
                && raw.contains("multipart/related")
        );
        assert!(raw.contains("Content-ID: <logo>"));
        assert!(raw.contains("filename=\"a.txt\""));
        assert!(!raw.contains("hidden@x.org"), "Bcc is not in the headers");
        assert!(raw.contains("xn--bcher-kva.de"), "IDN domain in ASCII form");
        assert!(raw.lines().all(|l| l.len() <= 998));
        let text_at = raw.find("text/plain; charset=utf-8").unwrap();
        let html_at = raw.find("text/html").unwrap();
        assert!(text_at < html_at, "text part first");
        let to: Vec<String> = b.to.iter().map(|a| a.to_string()).collect();
        assert_eq!(to, vec!["j@x.org", "k@xn--bcher-kva.de", "c@x.org", "hidden@x.org"]);
    }

    #[test]
    fn built_message_text_only_is_single_part() {
        let mut s = stored();
        s.html = None;
        s.attachments.clear();
        let raw = String::from_utf8(build(&s).unwrap().raw).unwrap();
        assert!(!raw.contains("multipart"));
        assert!(raw.contains("plain text"));
    }

    #[test]
    fn unbuilt_checks_what_build_checks() {
        let (b, u) = (build(&stored()).unwrap(), unbuilt(&stored()).unwrap());
        assert_eq!((b.from, b.to), (u.from, u.to), "the same envelope");
        assert!(u.raw.is_empty());
        type Breaks = fn(&mut Stored);
        let broken: Vec<(&str, Breaks)> = vec![
            ("sender", |s| s.sender = "not an address".into()),
            ("recipients", |s| s.recipients = vec!["a@x.org, b@x.org".into()]),
            ("cc", |s| s.cc = vec!["c@".into()]),
            ("bcc", |s| s.bcc = vec!["@x.org".into()]),
            ("subject", |s| s.subject = "a\r\nBcc: e@z.org".into()),
            ("reply_to", |s| s.reply_to = Some("nobody".into())),
            ("headers", |s| s.headers = vec![("Bad Name".into(), "v".into())]),
            ("headers.X-A", |s| s.headers = vec![("X-A".into(), "a\nb".into())]),
            ("body", |s| (s.body, s.html) = (None, None)),
            ("attachments", |s| s.attachments[0].content_type = "no type".into()),
            ("attachments", |s| s.attachments[1].content_type = "image".into()),
        ];
        for (field, breaks) in broken {
            let mut s = stored();
            breaks(&mut s);
            let (b, u) = (build(&s).expect_err(field), unbuilt(&s).expect_err(field));
            assert_eq!(b, u, "{field}");
            assert_eq!(u.field, field, "{u}");
        }
    }

    #[test]
    fn show_escapes_controls() {
        assert_eq!(show("a\r\nb"), "\"a\\r\\nb\"");
    }
}
