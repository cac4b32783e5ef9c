//! A message as a caller hands it to `email.send` / `email.send_template`, and every rule it
//! must pass that needs no database: addresses, recipient count, subject, body, headers,
//! attachments, tags, metadata, idempotency key and size. No pgrx here: the SQL surface
//! (`api/send.rs`) converts its arguments, calls `check` in the caller's backend and maps a
//! `FieldError` to SQLSTATE 22023; the rules themselves are unit-tested below.

use lettre::message::Mailbox;
use serde_json::Value;

use crate::message::{self, check_single_line, show, Attachment, FieldError};

/// Most tags one message may carry.
pub const MAX_TAGS: usize = 20;
/// Most characters in one tag.
pub const MAX_TAG_CHARS: usize = 128;
/// Most characters in an idempotency key.
pub const MAX_KEY_CHARS: usize = 256;

/// The limits that come from settings (`pg_email.max_recipients`, `pg_email.max_message_size`).
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    pub max_recipients: usize,
    pub max_message_size: usize,
}

/// The caller's arguments, as plain values.
#[derive(Debug, Default, Clone, Copy)]
pub struct Draft<'a> {
    pub recipients: Option<&'a str>,
    pub subject: Option<&'a str>,
    pub body: Option<&'a str>,
    pub html: Option<&'a str>,
    pub cc: Option<&'a str>,
    pub bcc: Option<&'a str>,
    pub reply_to: Option<&'a str>,
    pub headers: Option<&'a Value>,
    pub attachments: Option<&'a Value>,
    pub tags: Option<&'a [Option<String>]>,
    pub metadata: Option<&'a Value>,
    pub idempotency_key: Option<&'a str>,
    /// Template mail: subject and body come from the template, not the call.
    pub templated: bool,
}

/// What `check` parsed out of a draft.
#[derive(Debug, Clone)]
pub struct Checked {
    pub to: Vec<Mailbox>,
    pub cc: Vec<Mailbox>,
    pub bcc: Vec<Mailbox>,
    /// The Reply-To list as stored (`Name <a@x>, b@y`), if any.
    pub reply_to: Option<String>,
    pub attachments: Vec<Attachment>,
    pub tags: Option<Vec<String>>,
}

impl Checked {
    /// Every recipient's bare address (to, cc, bcc), lower-cased as suppressions store them.
    pub fn bare_addresses(&self) -> Vec<String> {
        self.to.iter().chain(&self.cc).chain(&self.bcc).map(message::bare_address).collect()
    }
}

/// Checks every argument that needs no database; the first failure names its field.
pub fn check(d: &Draft, limits: &Limits) -> Result<Checked, FieldError> {
    let to = match d.recipients {
        None => return Err(FieldError::required("recipients")),
        Some(r) => message::parse_mailboxes("recipients", r)?,
    };
    let cc = optional_list("cc", d.cc)?;
    let bcc = optional_list("bcc", d.bcc)?;
    let reply_to = optional_list("reply_to", d.reply_to)?;
    check_recipient_count(to.len() + cc.len() + bcc.len(), limits)?;
    if !d.templated {
        match d.subject {
            None => return Err(FieldError::required("subject")),
            Some(s) => check_single_line("subject", s)?,
        }
        if d.body.is_none() && d.html.is_none() {
            return Err(FieldError::new("body", "at least one of body and html is required"));
        }
    }
    if let Some(h) = d.headers {
        message::parse_headers(h)?;
    }
    let attachments = match d.attachments {
        None => Vec::new(),
        Some(a) => message::parse_attachments(a)?,
    };
    let tags = d.tags.map(check_tags).transpose()?;
    if let Some(m) = d.metadata {
        check_metadata(m)?;
    }
    if let Some(k) = d.idempotency_key {
        check_idempotency_key(k)?;
    }
    let content = [d.subject, d.body, d.html].iter().map(|p| p.map_or(0, str::len)).sum::<usize>();
    check_size(content, &attachments, limits)?;
    Ok(Checked {
        to,
        cc,
        bcc,
        reply_to: (!reply_to.is_empty()).then(|| texts(&reply_to).join(", ")),
        attachments,
        tags,
    })
}

/// A fingerprint of a call's content (every argument, as JSON): a reused idempotency key with
/// a different fingerprint is refused. Not a security measure, only a check for mistakes.
pub fn fingerprint(call: &Value) -> String {
    format!("{:016x}", crate::deliver::rate::fnv1a(call.to_string().as_bytes()))
}

/// The stored form of an address list: one `Name <addr>` text per mailbox.
pub fn texts(list: &[Mailbox]) -> Vec<String> {
    list.iter().map(message::mailbox_text).collect()
}

/// Treats NULL and blank optional address lists alike.
fn optional_list(field: &str, v: Option<&str>) -> Result<Vec<Mailbox>, FieldError> {
    match v {
        Some(s) if !s.trim().is_empty() => message::parse_mailboxes(field, s),
        _ => Ok(Vec::new()),
    }
}

fn check_recipient_count(total: usize, limits: &Limits) -> Result<(), FieldError> {
    if total > limits.max_recipients {
        return Err(FieldError::new(
            "recipients",
            format!("{total} recipients in to, cc and bcc exceed pg_email.max_recipients ({})", limits.max_recipients),
        ));
    }
    Ok(())
}

/// At most 20 tags of 1 to 128 characters, none NULL, no control characters.
pub fn check_tags(tags: &[Option<String>]) -> Result<Vec<String>, FieldError> {
    if tags.len() > MAX_TAGS {
        return Err(FieldError::new("tags", format!("{} tags given; at most {MAX_TAGS} are allowed", tags.len())));
    }
    tags.iter()
        .map(|t| {
            let t = t.as_deref().ok_or_else(|| FieldError::new("tags", "a tag is NULL"))?;
            if t.is_empty() || t.chars().count() > MAX_TAG_CHARS || t.chars().any(char::is_control) {
                return Err(FieldError::new(
                    "tags",
                    format!("tag {} must be 1 to {MAX_TAG_CHARS} characters without control characters", show(t)),
                ));
            }
            Ok(t.to_string())
        })
        .collect()
}

/// Metadata is a JSON object.
pub fn check_metadata(m: &Value) -> Result<(), FieldError> {
    if m.is_object() {
        Ok(())
    } else {
        Err(FieldError::new("metadata", "must be a JSON object"))
    }
}

/// 1 to 256 characters, no control characters.
pub fn check_idempotency_key(k: &str) -> Result<(), FieldError> {
    if k.is_empty() || k.chars().count() > MAX_KEY_CHARS || k.chars().any(char::is_control) {
        return Err(FieldError::new(
            "idempotency_key",
            format!("{} must be 1 to {MAX_KEY_CHARS} characters without control characters", show(k)),
        ));
    }
    Ok(())
}

/// Subject, body and html (`content` bytes) plus decoded attachments fit in
/// `pg_email.max_message_size`; the field named is the one most likely at fault.
pub fn check_size(content: usize, attachments: &[Attachment], limits: &Limits) -> Result<(), FieldError> {
    let size = content + attachments.iter().map(|a| a.content.len()).sum::<usize>();
    if size > limits.max_message_size {
        return Err(FieldError::new(
            if attachments.is_empty() { "body" } else { "attachments" },
            format!("the message is {size} bytes, over pg_email.max_message_size ({} bytes)", limits.max_message_size),
        ));
    }
    Ok(())
}

/// A rendered template (subject, body, html: `size` bytes) fits in `pg_email.max_message_size`.
pub fn check_rendered_size(size: usize, limits: &Limits) -> Result<(), FieldError> {
    if size > limits.max_message_size {
        return Err(FieldError::new(
            "data",
            format!(
                "the rendered message is {size} bytes, over pg_email.max_message_size ({} bytes)",
                limits.max_message_size
            ),
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    const LIMITS: Limits = Limits { max_recipients: 3, max_message_size: 100 };

    fn base() -> Draft<'static> {
        Draft { recipients: Some("a@x.org"), subject: Some("Hi"), body: Some("Hello"), ..Draft::default() }
    }

    fn field(r: Result<Checked, FieldError>) -> (String, String) {
        let e = r.expect_err("must be refused");
        (e.field.to_string(), e.to_string())
    }

    #[test]
    fn a_plain_message_passes_and_parses_every_list() {
        let d = Draft { cc: Some("Bo <B@Y.org>"), reply_to: Some("r@x.org, s@x.org"), ..base() };
        let c = check(&d, &LIMITS).unwrap();
        assert_eq!(c.to.len(), 1);
        assert_eq!(c.bare_addresses(), vec!["a@x.org".to_string(), "b@y.org".to_string()]);
        assert_eq!(c.reply_to.as_deref(), Some("r@x.org, s@x.org"));
        assert!(c.attachments.is_empty() && c.tags.is_none());
    }

    #[test]
    fn required_fields_are_named() {
        assert_eq!(field(check(&Draft { recipients: None, ..base() }, &LIMITS)).0, "recipients");
        assert_eq!(field(check(&Draft { subject: None, ..base() }, &LIMITS)).0, "subject");
        let (f, m) = field(check(&Draft { body: None, html: None, ..base() }, &LIMITS));
        assert_eq!(f, "body");
        assert!(m.contains("at least one of body and html"), "{m}");
        // Template mail takes subject and body from the template.
        assert!(check(&Draft { subject: None, body: None, templated: true, ..base() }, &LIMITS).is_ok());
    }

    #[test]
    fn recipients_over_the_limit_are_counted_across_to_cc_and_bcc() {
        let d = Draft { recipients: Some("a@x.org, b@x.org"), cc: Some("c@x.org"), bcc: Some("d@x.org"), ..base() };
        let (f, m) = field(check(&d, &LIMITS));
        assert_eq!(f, "recipients");
        assert!(m.contains("4 recipients in to, cc and bcc exceed pg_email.max_recipients (3)"), "{m}");
    }

    #[test]
    fn tags_are_limited_in_number_length_and_content() {
        let ok = vec![Some("spring".to_string()), Some("é".repeat(128))];
        assert_eq!(check_tags(&ok).unwrap().len(), 2);
        let many: Vec<Option<String>> = (0..21).map(|i| Some(format!("t{i}"))).collect();
        assert!(check_tags(&many).unwrap_err().to_string().contains("21 tags given; at most 20"));
        assert!(check_tags(&[None]).unwrap_err().to_string().contains("a tag is NULL"));
        for bad in ["", "a\nb", &"x".repeat(129)] {
            let e = check_tags(&[Some(bad.to_string())]).unwrap_err();
            assert_eq!(e.field, "tags");
            assert!(e.to_string().contains("must be 1 to 128 characters"), "{e}");
        }
    }

    #[test]
    fn metadata_must_be_an_object() {
        assert!(check_metadata(&json!({"order": 7})).is_ok());
        for bad in [json!([1]), json!("x"), json!(null), json!(3)] {
            assert_eq!(check_metadata(&bad).unwrap_err().field, "metadata");
        }
    }

    #[test]
    fn idempotency_keys_are_1_to_256_characters_without_control_characters() {
        assert!(check_idempotency_key("order-7/receipt").is_ok());
        assert!(check_idempotency_key(&"ü".repeat(256)).is_ok());
        for bad in ["", "a\tb", &"k".repeat(257)] {
            let e = check_idempotency_key(bad).unwrap_err();
            assert_eq!(e.field, "idempotency_key");
        }
    }

    #[test]
    fn size_counts_content_and_decoded_attachments_and_names_the_likely_field() {
        let d = Draft { body: Some("x"), ..base() };
        assert!(check(&d, &LIMITS).is_ok());
        let long = "y".repeat(99);
        let (f, m) = field(check(&Draft { body: Some(&long), ..base() }, &LIMITS));
        assert_eq!(f, "body");
        assert!(m.contains("the message is 101 bytes, over pg_email.max_message_size (100 bytes)"), "{m}");
        let att =
            json!([{"filename": "a.bin", "content_type": "application/octet-stream", "content": "A".repeat(140)}]);
        let (f, _) = field(check(&Draft { attachments: Some(&att), ..base() }, &LIMITS));
        assert_eq!(f, "attachments");
        assert_eq!(check_rendered_size(101, &LIMITS).unwrap_err().field, "data");
        assert!(check_rendered_size(100, &LIMITS).is_ok());
    }

    #[test]
    fn fingerprints_tell_calls_apart() {
        let a = fingerprint(&json!(["a@x.org", "Hi", "Hello"]));
        assert_eq!(a, fingerprint(&json!(["a@x.org", "Hi", "Hello"])));
        assert_ne!(a, fingerprint(&json!(["a@x.org", "Hi", "Hello!"])));
        assert_ne!(a, fingerprint(&json!(["a@x.org", "Hi", null, "Hello"])));
        assert_eq!(a.len(), 16);
    }

    #[test]
    fn structural_headers_are_refused_by_name() {
        let h = json!({"Bcc": "x@y.org"});
        let (f, _) = field(check(&Draft { headers: Some(&h), ..base() }, &LIMITS));
        assert_eq!(f, "headers");
    }
}
