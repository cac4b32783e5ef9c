//! Reading SMTP replies and delivery-report fields: the three-digit reply code and the RFC 3463
//! enhanced status code. Pure functions, shared by the delivery worker (SMTP servers' replies),
//! the webhook parsers (providers' bounce texts) and the inbound parser (DSN fields).

/// Whether `s` is an RFC 3463 enhanced status code: class 2, 4 or 5, then a subject and a
/// detail of 1 to 3 digits.
pub fn is_enhanced(s: &str) -> bool {
    let mut parts = s.split('.');
    let ok = |p: Option<&str>, max: usize| {
        p.is_some_and(|p| (1..=max).contains(&p.len()) && p.bytes().all(|b| b.is_ascii_digit()))
    };
    matches!(parts.next(), Some("2" | "4" | "5"))
        && ok(parts.next(), 3)
        && ok(parts.next(), 3)
        && parts.next().is_none()
}

/// The RFC 3463 code a reply text starts with (`5.1.1 <a@x.org>: Recipient address rejected`).
pub fn enhanced_code(text: &str) -> Option<String> {
    text.split_whitespace().next().filter(|w| is_enhanced(w)).map(str::to_string)
}

/// A value without its RFC 3464 type prefix: `smtp; 550 …` → ` 550 …`, `rfc822;a@b` → `a@b`.
pub fn strip_type(value: &str) -> &str {
    match value.split_once(';') {
        Some((kind, rest))
            if !kind.trim().is_empty()
                && kind.trim().len() <= 32
                && kind.trim().bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'.') =>
        {
            rest
        }
        _ => value,
    }
}

/// The SMTP code and RFC 3463 code of a reply such as `smtp; 550 5.1.1 <a@b>: user unknown`,
/// `550-5.1.1 ...`, `250 2.6.0 Message received` or `5.1.1 user unknown`. The RFC 3463 code is
/// looked for in the first few words only, so a number in the text is not taken for one.
pub fn parse_reply(text: &str) -> (Option<i32>, Option<String>) {
    let mut t = strip_type(text.trim()).trim_start();
    let b = t.as_bytes();
    let mut code = None;
    if matches!(b.first(), Some(b'2'..=b'5'))
        && b.get(1).is_some_and(u8::is_ascii_digit)
        && b.get(2).is_some_and(u8::is_ascii_digit)
        && matches!(b.get(3), None | Some(b' ' | b'-' | b'\t'))
    {
        code = t.get(..3).and_then(|c| c.parse::<i32>().ok());
        t = t.get(3..).unwrap_or("").trim_start_matches(['-', ' ', '\t']);
    }
    // Right after the code, or among the first words when there is none.
    let enhanced = t
        .split_whitespace()
        .take(if code.is_some() { 1 } else { 3 })
        .map(trim_punctuation)
        .find(|w| is_enhanced(w))
        .map(str::to_string);
    (code, enhanced)
}

/// A word without the punctuation that surrounds codes and addresses in prose.
pub fn trim_punctuation(w: &str) -> &str {
    w.trim_matches(|c: char| matches!(c, '(' | ')' | '[' | ']' | ',' | ':' | ';' | '#' | '<' | '>' | '"' | '\''))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn replies() {
        let cases: &[(&str, Option<i32>, Option<&str>)] = &[
            ("smtp; 550 5.1.1 <a@b>: nope", Some(550), Some("5.1.1")),
            ("smtp;550-5.1.10 RESOLVER", Some(550), Some("5.1.10")),
            ("X-Postfix; connect to x[1.2.3.4]:25: timed out", None, None),
            ("X-Postfix; host said: 552 5.2.2 mailbox full", None, None),
            ("5.2.2 full", None, Some("5.2.2")),
            ("Mailbox full (5.2.2)", None, Some("5.2.2")),
            ("550 user unknown 5.1.1", Some(550), None),
            ("550 see https://x.example/5.1.1/help 5.1.1", Some(550), None),
            ("550 5.1.1", Some(550), Some("5.1.1")),
            ("600 1.2.3 not a code", None, None),
            ("", None, None),
            ("5", None, None),
            ("55", None, None),
            ("550", Some(550), None),
            ("smtp;", None, None),
            ("é;550", None, None),
            ("é;550 5.1.1", None, Some("5.1.1")),
        ];
        for (text, code, enhanced) in cases {
            assert_eq!(parse_reply(text), (*code, enhanced.map(str::to_string)), "{text}");
        }
    }

    #[test]
    fn enhanced_codes() {
        assert!(is_enhanced("5.1.1") && is_enhanced("4.7.650") && is_enhanced("2.0.0"));
        assert!(!is_enhanced("5.1") && !is_enhanced("3.1.1") && !is_enhanced("5.1.1.1") && !is_enhanced("5.1234.1"));
        assert!(!is_enhanced("5..1") && !is_enhanced("5.a.1") && !is_enhanced(""));
        assert_eq!(enhanced_code("5.1.1 <a@x.org>: Recipient address rejected"), Some("5.1.1".into()));
        assert_eq!(enhanced_code("4.7.1 try later"), Some("4.7.1".into()));
        assert_eq!(enhanced_code("Service unavailable"), None);
        assert_eq!(enhanced_code("1.2.3 no"), None);
        assert_eq!(strip_type("rfc822;a@b"), "a@b");
        assert_eq!(strip_type("no type here"), "no type here");
        assert_eq!(trim_punctuation("(5.1.1):"), "5.1.1");
    }
}
