//! What the provider modules share: reading error answers the way every provider means them
//! (429, 408 and 5xx transient with `Retry-After` honoured, other 4xx permanent), recipient-level
//! refusals, the one-API-key DSN check, and small encoders.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use base64::Engine;
use reqwest::header::HeaderMap;
use serde_json::Value;

use super::super::{Delivery, Reply};
use super::{Fields, Userinfo, ID_KEY};

/// The DSN check of providers that take one API key: `KEY@default`.
pub fn one_key(name: &str, u: Userinfo<'_>) -> Result<(), String> {
    if u.user.is_none() {
        return Err(format!("a {name} DSN needs the API key before the @, as in {}://KEY@default", u.scheme));
    }
    if u.password.is_some() {
        return Err(format!("a {name} DSN takes one key: KEY@default, not KEY:SECRET@default"));
    }
    Ok(())
}

/// A success answer.
pub fn accepted(status: u16, provider_id: Option<String>, text: &str) -> Delivery {
    Delivery::Accepted {
        reply: Reply { code: Some(status), enhanced: None, provider_code: None, text: text.to_string() },
        provider_id,
        rejected: Vec::new(),
        deferred: Vec::new(),
        captured: None,
    }
}

/// Classifies an error answer. `provider_code` is the provider's own error code or name,
/// `message` its text; `rejected` are the recipient-level refusals it named.
pub fn classify(
    status: u16,
    headers: &HeaderMap,
    provider_code: Option<String>,
    message: String,
    rejected: Vec<(String, Reply)>,
) -> Delivery {
    let reply = Reply { code: Some(status), enhanced: None, provider_code, text: format!("HTTP {status}: {message}") };
    match status {
        429 | 500 | 502 | 503 | 504 | 408 => Delivery::Transient { reply, retry_after: retry_after(headers), rejected },
        _ => Delivery::Permanent { reply, rejected },
    }
}

/// A recipient-level refusal: recorded with RFC 3463 `5.1.1` (bad destination address), which
/// adds a suppression, plus the provider's own code and words.
pub fn refused(address: &str, provider_code: Option<&str>, provider_text: &str) -> (String, Reply) {
    let reply = Reply {
        code: None,
        enhanced: Some("5.1.1".into()),
        provider_code: provider_code.map(str::to_string),
        text: provider_text.to_string(),
    };
    (address.to_lowercase(), reply)
}

/// The recipients of `fields` whose address appears in `text`, lowercased, each once.
pub fn named_in(fields: &Fields, text: &str) -> Vec<String> {
    let lower = text.to_lowercase();
    let mut out: Vec<String> = Vec::new();
    for mb in fields.all_recipients() {
        let a = mb.email.to_string().to_lowercase();
        if lower.contains(&a) && !out.contains(&a) {
            out.push(a);
        }
    }
    out
}

/// The message of an error answer, or the whole body when the provider gave none.
pub fn or_body(message: String, json: &Value) -> String {
    if message.is_empty() {
        json.to_string()
    } else {
        message
    }
}

/// `Retry-After` as seconds or an HTTP date.
pub fn retry_after(headers: &HeaderMap) -> Option<Duration> {
    let v = headers.get("retry-after")?.to_str().ok()?.trim();
    if let Ok(secs) = v.parse::<f64>() {
        return (secs.is_finite() && secs >= 0.0).then(|| Duration::from_secs_f64(secs.min(86_400.0)));
    }
    let when = httpdate_parse(v)?;
    Some(when.duration_since(SystemTime::now()).unwrap_or(Duration::ZERO))
}

/// An IMF-fixdate (`Sun, 06 Nov 1994 08:49:37 GMT`), the form RFC 9110 requires senders to use.
fn httpdate_parse(v: &str) -> Option<SystemTime> {
    let parts: Vec<&str> = v.split_whitespace().collect();
    if parts.len() != 6 || parts[5] != "GMT" {
        return None;
    }
    let day: u64 = parts[1].parse().ok()?;
    const MONTHS: [&str; 12] = ["Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec"];
    let month = MONTHS.iter().position(|m| *m == parts[2])? as u64 + 1;
    let year: i64 = parts[3].parse().ok()?;
    let hms: Vec<u64> = parts[4].split(':').filter_map(|x| x.parse().ok()).collect();
    if hms.len() != 3 {
        return None;
    }
    // days from civil (Howard Hinnant's algorithm)
    let (y, m) = if month <= 2 { (year - 1, month + 9) } else { (year, month - 3) };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let doy = (153 * m as i64 + 2) / 5 + day as i64 - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146_097 + doe - 719_468;
    let secs = days * 86_400 + (hms[0] * 3600 + hms[1] * 60 + hms[2]) as i64;
    (secs >= 0).then(|| UNIX_EPOCH + Duration::from_secs(secs as u64))
}

pub fn b64(bytes: &[u8]) -> String {
    base64::engine::general_purpose::STANDARD.encode(bytes)
}

/// Letters, digits, `_` and `-` only, at most 256 characters (Resend and SES tags).
pub fn tag_safe(s: &str) -> String {
    let t: String =
        s.chars().map(|c| if c.is_ascii_alphanumeric() || c == '_' || c == '-' { c } else { '_' }).take(256).collect();
    if t.is_empty() {
        "_".into()
    } else {
        t
    }
}

/// The tags of Resend and SES, as name/value pairs of letters, digits, `_` and `-`: a tag becomes
/// `name=true`, a metadata entry `key=value`, and our message id `id` comes last under [`ID_KEY`].
/// A tag or entry whose name comes out as `pg_email_id` is left out: ours wins (see [`ID_KEY`]).
pub fn tag_pairs(f: &Fields, id: i64) -> Vec<(String, String)> {
    let tags = f.tags.iter().map(|t| (tag_safe(t), "true".to_string()));
    let metadata = f.metadata_strings().into_iter().map(|(k, v)| (tag_safe(&k), tag_safe(&v)));
    let mut pairs: Vec<(String, String)> = tags.chain(metadata).filter(|(name, _)| name != ID_KEY).collect();
    pairs.push((ID_KEY.to_string(), id.to_string()));
    pairs
}

pub fn json_body(v: &Value) -> Result<Vec<u8>, String> {
    serde_json::to_vec(v).map_err(|e| format!("cannot encode the request: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retry_after_forms() {
        let mut h = HeaderMap::new();
        h.insert("retry-after", "2".parse().unwrap());
        assert_eq!(retry_after(&h), Some(Duration::from_secs(2)));
        h.insert("retry-after", "Sun, 06 Nov 1994 08:49:37 GMT".parse().unwrap());
        assert_eq!(retry_after(&h), Some(Duration::ZERO));
        h.insert("retry-after", "soon".parse().unwrap());
        assert_eq!(retry_after(&h), None);
        assert_eq!(httpdate_parse("Sun, 06 Nov 1994 08:49:37 GMT"), Some(UNIX_EPOCH + Duration::from_secs(784111777)));
        assert_eq!(httpdate_parse("Sunday, 06-Nov-94 08:49:37 GMT"), None);
    }

    #[test]
    fn classification() {
        let h = HeaderMap::new();
        for s in [408, 429, 500, 502, 503, 504] {
            assert!(matches!(classify(s, &h, None, "x".into(), vec![]), Delivery::Transient { .. }), "{s}");
        }
        for s in [400, 401, 403, 404, 413, 422] {
            assert!(matches!(classify(s, &h, None, "x".into(), vec![]), Delivery::Permanent { .. }), "{s}");
        }
        let reply =
            Reply { code: Some(422), enhanced: None, provider_code: Some("300".into()), text: "HTTP 422: bad".into() };
        assert_eq!(
            classify(422, &h, Some("300".into()), "bad".into(), vec![]),
            Delivery::Permanent { reply, rejected: vec![] }
        );
    }

    #[test]
    fn tags_are_made_safe() {
        assert_eq!(tag_safe("order.shipped 2"), "order_shipped_2");
        assert_eq!(tag_safe(""), "_");
        assert_eq!(tag_safe(&"x".repeat(300)).len(), 256);
    }

    #[test]
    fn tag_pairs_end_with_our_message_id() {
        let pair = |n: &str, v: &str| (n.to_string(), v.to_string());
        let mut f = Fields { tags: vec!["order shipped".into()], ..Fields::default() };
        f.metadata.insert("plan".into(), Value::from("pro.2"));
        f.metadata.insert("n".into(), Value::from(7));
        assert_eq!(
            tag_pairs(&f, 1001),
            [pair("order_shipped", "true"), pair("n", "7"), pair("plan", "pro_2"), pair("pg_email_id", "1001")]
        );
        // A user's tag or metadata entry named (or made safe into) pg_email_id never replaces ours.
        f.tags.push("pg_email_id".into());
        f.metadata.insert("pg_email_id".into(), Value::from("mine"));
        f.metadata.insert("pg.email.id".into(), Value::from(5));
        let ours: Vec<_> = tag_pairs(&f, 1001).into_iter().filter(|(n, _)| n == ID_KEY).collect();
        assert_eq!(ours, [pair("pg_email_id", "1001")]);
        assert_eq!(tag_pairs(&Fields::default(), 1), [pair("pg_email_id", "1")]);
    }
}
