//! Mailgun webhooks. The signature travels in the JSON body:
//! `{"signature": {timestamp, token, signature}, "event-data": {...}}`, where `signature` is the
//! hex HMAC-SHA256 of `timestamp ‖ token` under the HTTP webhook signing key (DSN option
//! `webhook_signing_key`). A bad signature is answered 406, the one status after which Mailgun
//! stops retrying. The event id is the token, unique per request. Our message id comes back in
//! `event-data.user-variables.pg_email_id`.
//!
//! No freshness window is enforced on the timestamp. Mailgun's docs suggest one as an option,
//! but the token already makes a replay harmless (the event is stored once per token), Mailgun
//! itself retries for 8 hours, and `email.ingest_webhook` must accept a stored request replayed
//! days later.

use std::collections::BTreeMap;

use ring::hmac;
use serde_json::Value;

use super::{
    angle, id_string, json_body, number, permanent_kind, pg_email_id, refuse, str_at, unhex, valid_ip, Config, Event,
    Refused, Request, Verified,
};

/// The status Mailgun does not retry after.
const NOT_ACCEPTABLE: u16 = 406;

/// The webhook settings in a Mailgun DSN's options.
pub(super) fn config(options: &BTreeMap<String, String>) -> Result<Option<Config>, String> {
    match options.get("webhook_signing_key") {
        None => Ok(None),
        Some(k) if k.trim().is_empty() || k.contains(['\r', '\n', '\0']) => {
            Err("option webhook_signing_key must be the HTTP webhook signing key Mailgun shows, without line breaks"
                .into())
        }
        Some(k) => Ok(Some(Config::Mailgun { signing_key: k.trim().to_string() })),
    }
}

pub(super) fn verify(signing_key: &str, req: &Request) -> Result<Verified, Refused> {
    let v = json_body(req.body, "Mailgun")?;
    if !v.is_object() {
        return Err(refuse(400, "a Mailgun webhook body is a JSON object"));
    }
    let s = v.get("signature");
    let timestamp = id_string(s.and_then(|s| s.get("timestamp")));
    let token = str_at(&v, &["signature", "token"]);
    let signature = str_at(&v, &["signature", "signature"]).and_then(unhex);
    let (Some(timestamp), Some(token), Some(signature)) = (timestamp, token, signature) else {
        return Err(refuse(NOT_ACCEPTABLE, "no signature {timestamp, token, signature} in the body"));
    };
    let key = hmac::Key::new(hmac::HMAC_SHA256, signing_key.as_bytes());
    let signed = format!("{timestamp}{token}");
    hmac::verify(&key, signed.as_bytes(), &signature).map_err(|_| refuse(NOT_ACCEPTABLE, "bad signature"))?;

    let Some(data) = v.get("event-data").filter(|d| d.is_object()) else {
        return Err(refuse(400, "a Mailgun webhook body without \"event-data\""));
    };
    let kind = str_at(data, &["event"]).ok_or_else(|| refuse(400, "Mailgun event-data without \"event\""))?;
    let mut e = Event::new("unknown", token.to_string());
    e.pg_email_id = pg_email_id(data.get("user-variables").and_then(|u| u.get("pg_email_id")));
    // The send answer's id is the Message-ID with its brackets; events give it without them.
    let message_id = angle(str_at(data, &["message", "headers", "message-id"]));
    e.provider_message_id.clone_from(&message_id);
    e.rfc_message_id = message_id;
    e.recipient = str_at(data, &["recipient"]).map(str::to_string);
    e.at = number(data.get("timestamp"));
    let status = data.get("delivery-status");
    e.smtp_code = status.and_then(|s| s.get("code")).and_then(Value::as_i64).and_then(|c| i32::try_from(c).ok());
    e.smtp_code = e.smtp_code.filter(|c| (200..600).contains(c));
    e.enhanced_code = str_at(data, &["delivery-status", "enhanced-code"])
        .filter(|c| crate::reply::is_enhanced(c))
        .map(str::to_string);
    let message = str_at(data, &["delivery-status", "message"]).or(str_at(data, &["delivery-status", "description"]));
    let reason = str_at(data, &["reason"]);
    match kind {
        "delivered" => {
            e.event = "delivered";
            e.set_response(message);
        }
        "failed" => {
            e.set_response(message);
            e.provider_code = reason.map(str::to_string);
            let temporary = str_at(data, &["severity"]) == Some("temporary");
            match reason {
                _ if temporary => e.event = "deferred",
                // Mailgun's own suppression list: nothing was sent.
                Some(r) if r.starts_with("suppress-") => {}
                Some("espblock") => (e.event, e.bounce_type) = ("bounced", Some("block")),
                // Gave up after temporary failures.
                Some("old") => (e.event, e.bounce_type) = ("bounced", Some("soft")),
                _ => (e.event, e.bounce_type) = ("bounced", Some(permanent_kind(e.enhanced_code.as_deref()))),
            }
        }
        "opened" | "clicked" => {
            e.event = if kind == "opened" { "opened" } else { "clicked" };
            e.url = str_at(data, &["url"]).map(str::to_string).filter(|_| kind == "clicked");
            e.set_user_agent(str_at(data, &["client-info", "user-agent"]));
            e.ip = valid_ip(str_at(data, &["ip"]));
            // Mailgun names the proxy or scanner it recognised (`apple`, `gmail`...).
            e.machine |= str_at(data, &["client-info", "bot"]).is_some();
        }
        "complained" => e.event = "complained",
        "unsubscribed" => e.event = "unsubscribed",
        // accepted, rejected, stored, list_member_uploaded... and whatever comes next.
        _ => {
            e.provider_code = reason.map(str::to_string);
            e.set_response(message.or(str_at(data, &["reject", "description"])));
        }
    }
    e.payload = v;
    Ok(Verified::Events(vec![e]))
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::super::testing::{hostile_bodies, one, status, well_formed};
    use super::super::{hex, verify as verify_any, Config};
    use super::*;

    const KEY: &str = "key-7e55c003b2b8cbf1aa6f6a4c7bd2b2a2";

    fn config() -> Config {
        Config::Mailgun { signing_key: KEY.into() }
    }

    fn signature(key: &str, timestamp: &str, token: &str) -> Value {
        let tag =
            hmac::sign(&hmac::Key::new(hmac::HMAC_SHA256, key.as_bytes()), format!("{timestamp}{token}").as_bytes());
        json!({"timestamp": timestamp, "token": token, "signature": hex(tag.as_ref())})
    }

    fn post(body: &Value) -> Result<Verified, Refused> {
        let body = serde_json::to_vec(body).unwrap();
        verify_any(&config(), &Request { headers: &[], body: &body, now: 0 }, None)
    }

    fn signed(data: Value) -> Value {
        json!({"signature": signature(KEY, "1529006854", "a8ce0edb2dd8301dee6c2405235584e45aa91d1e9f979f3de0"), "event-data": data})
    }

    /// Mailgun's documented permanent failure.
    fn failed() -> Value {
        json!({
            "event": "failed", "id": "W3X4JOhFT-OZidZGKKr9iA", "timestamp": 1529692199.626182, "log-level": "error",
            "severity": "permanent", "reason": "bounce",
            "envelope": {"transport": "smtp", "sender": "bob@mg.example.org", "sending-ip": "209.61.154.250"},
            "recipient-domain": "example.com", "recipient": "alice@example.com",
            "message": {"headers": {"to": "Alice <alice@example.com>", "message-id": "20130503192659.13651.20287@mg.example.org",
                "from": "Bob <bob@mg.example.org>", "subject": "Test permanent_fail webhook"}, "attachments": [], "size": 111},
            "delivery-status": {"attempt-no": 1, "message": "", "code": 550, "enhanced-code": "5.1.1",
                "description": "550 5.1.1 The email account that you tried to reach does not exist.", "mx-host": "smtp-in.example.com"},
            "user-variables": {"my_var_1": "Mailgun Variable #1", "pg_email_id": 42},
            "tags": ["my_tag_1"], "campaigns": []
        })
    }

    fn ok(data: Value) -> Event {
        let body = signed(data);
        let e = one(post(&body));
        well_formed(&e);
        assert_eq!(e.payload, body);
        e
    }

    #[test]
    fn a_permanent_failure_is_a_hard_bounce() {
        let e = ok(failed());
        assert_eq!((e.event, e.bounce_type), ("bounced", Some("hard")));
        assert_eq!(e.provider_event_id, "a8ce0edb2dd8301dee6c2405235584e45aa91d1e9f979f3de0");
        assert_eq!(e.pg_email_id, Some(42));
        assert_eq!(e.provider_message_id.as_deref(), Some("<20130503192659.13651.20287@mg.example.org>"));
        assert_eq!(e.rfc_message_id, e.provider_message_id);
        assert_eq!(e.recipient.as_deref(), Some("alice@example.com"));
        assert_eq!((e.smtp_code, e.enhanced_code.as_deref()), (Some(550), Some("5.1.1")));
        assert!(e.response.as_deref().unwrap().starts_with("550 5.1.1 The email account"));
        assert_eq!(e.provider_code.as_deref(), Some("bounce"));
        assert_eq!(e.at, Some(1_529_692_199.626_182));
    }

    #[test]
    fn failures_are_classed() {
        let case = |severity: &str, reason: &str, enhanced: &str| {
            let mut d = failed();
            d["severity"] = json!(severity);
            d["reason"] = json!(reason);
            d["delivery-status"]["enhanced-code"] = json!(enhanced);
            let e = ok(d);
            (e.event, e.bounce_type)
        };
        assert_eq!(case("temporary", "generic", "4.2.2"), ("deferred", None));
        assert_eq!(case("permanent", "generic", "5.1.1"), ("bounced", Some("hard")));
        assert_eq!(case("permanent", "bounce", "5.7.1"), ("bounced", Some("block")));
        assert_eq!(case("permanent", "espblock", "5.1.1"), ("bounced", Some("block")));
        assert_eq!(case("permanent", "old", ""), ("bounced", Some("soft")));
        assert_eq!(case("permanent", "suppress-bounce", ""), ("unknown", None));
        assert_eq!(case("permanent", "suppress-unsubscribe", ""), ("unknown", None));
    }

    #[test]
    fn delivered_opened_clicked_complained_unsubscribed() {
        let base = |event: &str| {
            json!({"event": event, "timestamp": 1529692199.5, "recipient": "alice@example.com",
                   "message": {"headers": {"message-id": "m1@mg.example.org"}}, "user-variables": {"pg_email_id": "7"}})
        };
        let mut d = base("delivered");
        d["delivery-status"] = json!({"code": 250, "message": "OK", "description": "", "tls": true});
        let e = ok(d);
        assert_eq!(
            (e.event, e.smtp_code, e.response.as_deref(), e.pg_email_id),
            ("delivered", Some(250), Some("OK"), Some(7))
        );

        let mut o = base("opened");
        o["ip"] = json!("50.56.129.169");
        o["client-info"] = json!({"client-type": "browser", "client-os": "Linux", "device-type": "desktop",
            "client-name": "Chrome", "user-agent": "Mozilla/5.0 (X11; Linux x86_64) Chrome/26.0.1410.43", "bot": ""});
        let e = ok(o.clone());
        assert_eq!((e.event, e.ip.as_deref(), e.machine, e.url), ("opened", Some("50.56.129.169"), false, None));
        o["client-info"]["bot"] = json!("apple");
        assert!(ok(o).machine);

        let mut c = base("clicked");
        c["url"] = json!("https://example.com/x");
        c["ip"] = json!("::1");
        let e = ok(c);
        assert_eq!(
            (e.event, e.url.as_deref(), e.ip.as_deref()),
            ("clicked", Some("https://example.com/x"), Some("::1"))
        );

        assert_eq!(ok(base("complained")).event, "complained");
        assert_eq!(ok(base("unsubscribed")).event, "unsubscribed");
        assert_eq!(ok(base("accepted")).event, "unknown");
        assert_eq!(ok(base("rejected")).event, "unknown");
    }

    #[test]
    fn bad_signatures_are_answered_406() {
        let token = "a8ce0edb2dd8301dee6c2405235584e45aa91d1e9f979f3de0";
        let wrong_key = json!({"signature": signature("key-other", "1529006854", token), "event-data": failed()});
        let wrong_ts = {
            let mut s = signature(KEY, "1529006854", token);
            s["timestamp"] = json!("1529006855");
            json!({"signature": s, "event-data": failed()})
        };
        let not_hex = json!({"signature": {"timestamp": "1", "token": "t", "signature": "zz"}, "event-data": failed()});
        for body in [wrong_key, wrong_ts, not_hex, json!({"event-data": failed()}), json!({"signature": "x"})] {
            let r = post(&body).unwrap_err();
            assert_eq!(r.status, 406, "{body}");
            assert!(!r.reason.contains(KEY));
        }
        // A numeric timestamp is signed as written.
        let mut s = signature(KEY, "1529006854", token);
        s["timestamp"] = json!(1529006854);
        assert!(post(&json!({"signature": s, "event-data": failed()})).is_ok());
    }

    #[test]
    fn hostile_bodies_are_refused() {
        let valid = serde_json::to_vec(&signed(failed())).unwrap();
        for body in hostile_bodies(&valid) {
            let got = verify_any(&config(), &Request { headers: &[], body: &body, now: 0 }, None);
            assert!(matches!(status(got), 400 | 406));
        }
        // Authentic, with an unusable event-data.
        for data in [json!(null), json!([]), json!({"event": 5})] {
            assert_eq!(status(post(&signed(data.clone()))), 400, "{data}");
        }
        let e = ok(
            json!({"event": "failed", "delivery-status": {"code": 99999999999_i64}, "message": "x", "user-variables": []}),
        );
        assert_eq!((e.smtp_code, e.provider_message_id, e.pg_email_id), (None, None, None));
    }

    #[test]
    fn the_signing_key_option() {
        let o = |v: &str| -> BTreeMap<String, String> { [("webhook_signing_key".to_string(), v.to_string())].into() };
        assert_eq!(super::config(&BTreeMap::new()), Ok(None));
        assert_eq!(super::config(&o(KEY)), Ok(Some(config())));
        let e = super::config(&o(" ")).unwrap_err();
        assert!(e.starts_with("option webhook_signing_key"), "{e}");
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig { cases: 256, ..Default::default() })]

        /// Random signed event data: a 400 or a well-formed event, never a panic.
        #[test]
        fn random_signed_json(data in super::super::testing::json_value(), kind in proptest::sample::select(
            &["delivered", "failed", "opened", "clicked", "complained", "unsubscribed", "accepted"][..]
        )) {
            let mut data = data;
            if let Some(o) = data.as_object_mut() {
                o.insert("event".into(), json!(kind));
            }
            super::super::testing::sane(&post(&signed(data)));
        }
    }
}
