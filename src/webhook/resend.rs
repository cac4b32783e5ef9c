//! Resend webhooks, delivered by Svix (the Standard Webhooks scheme). Svix signs
//! `{svix-id}.{svix-timestamp}.{raw body}` with HMAC-SHA256 under the base64-decoded part of the
//! `whsec_` secret (DSN option `webhook_secret`; several, space-separated, while rotating) and
//! sends `v1,<base64>` signatures, several space-separated, in `svix-signature`. The
//! `webhook-id/-timestamp/-signature` header names of Standard Webhooks are accepted too. As
//! the Svix libraries do, a timestamp more than 5 minutes from now is refused: every retry is
//! signed anew, so only a replay is that old.
//!
//! The body is one `{type, created_at, data}` object. The event id is `svix-id`, which a retry
//! keeps. Resend gives no recipient per event for a message with several: the recipient is only
//! set when `data.to` names exactly one.

use std::collections::BTreeMap;

use ring::hmac;
use serde_json::Value;

use super::ses::bounce_kind;
use super::{b64, json_body, pg_email_id, refuse, str_at, time, valid_ip, Config, Event, Refused, Request, Verified};

/// How far a timestamp may be from now, in seconds (the Svix libraries' tolerance).
const TOLERANCE: u64 = 5 * 60;

/// The webhook settings in a Resend DSN's options.
pub(super) fn config(options: &BTreeMap<String, String>) -> Result<Option<Config>, String> {
    match options.get("webhook_secret") {
        None => Ok(None),
        Some(s) => Ok(Some(Config::Resend { secrets: parse_secrets(s)? })),
    }
}

/// The keys of a `webhook_secret`: each `whsec_<base64>`, separated by spaces. DSN option values
/// are form-decoded, so a `+` of the base64 not written as `%2B` arrives as a space: a word that
/// does not start with `whsec_` continues the previous secret after a `+`.
pub fn parse_secrets(value: &str) -> Result<Vec<Vec<u8>>, String> {
    const WRONG: &str = "option webhook_secret must be the signing secret Resend shows, whsec_ followed by base64 \
                         (several separated by spaces while rotating)";
    let mut secrets: Vec<String> = Vec::new();
    for word in value.split(' ').filter(|w| !w.is_empty()) {
        match (word.strip_prefix("whsec_"), secrets.last_mut()) {
            (Some(b), _) => secrets.push(b.to_string()),
            (None, Some(last)) => {
                last.push('+');
                last.push_str(word);
            }
            (None, None) => return Err(WRONG.into()),
        }
    }
    if secrets.is_empty() {
        return Err(WRONG.into());
    }
    secrets.iter().map(|s| b64(s).filter(|k| !k.is_empty()).ok_or_else(|| WRONG.to_string())).collect()
}

pub(super) fn verify(secrets: &[Vec<u8>], req: &Request) -> Result<Verified, Refused> {
    let header = |name: &str| req.header(&format!("svix-{name}")).or_else(|| req.header(&format!("webhook-{name}")));
    let (Some(id), Some(timestamp), Some(signatures)) = (header("id"), header("timestamp"), header("signature")) else {
        return Err(refuse(401, "no svix-id, svix-timestamp and svix-signature headers"));
    };
    let ts: i64 = timestamp.trim().parse().map_err(|_| refuse(401, "svix-timestamp is not a number"))?;
    if ts.abs_diff(req.now) > TOLERANCE {
        return Err(refuse(401, "svix-timestamp is more than 5 minutes from now"));
    }
    let mut signed = Vec::with_capacity(id.len() + timestamp.len() + req.body.len() + 2);
    signed.extend_from_slice(id.as_bytes());
    signed.push(b'.');
    signed.extend_from_slice(timestamp.as_bytes());
    signed.push(b'.');
    signed.extend_from_slice(req.body);
    let given: Vec<Vec<u8>> = signatures
        .split(' ')
        .filter_map(|s| s.split_once(','))
        .filter(|(version, _)| *version == "v1")
        .filter_map(|(_, sig)| b64(sig))
        .collect();
    let authentic = secrets.iter().any(|secret| {
        let key = hmac::Key::new(hmac::HMAC_SHA256, secret);
        given.iter().any(|sig| hmac::verify(&key, &signed, sig).is_ok())
    });
    if !authentic {
        return Err(refuse(401, "bad signature"));
    }

    let v = json_body(req.body, "Resend")?;
    let (Some(kind), Some(data)) = (str_at(&v, &["type"]), v.get("data").filter(|d| d.is_object())) else {
        return Err(refuse(400, "a Resend event is an object with \"type\" and \"data\""));
    };
    let mut e = Event::new("unknown", id.trim().to_string());
    e.pg_email_id = pg_email_id(tag(data, "pg_email_id"));
    e.provider_message_id = str_at(data, &["email_id"]).map(str::to_string);
    e.recipient = only_recipient(data.get("to"));
    e.at = time(v.get("created_at"));
    match kind {
        "email.delivered" => e.event = "delivered",
        "email.delivery_delayed" => e.event = "deferred",
        "email.bounced" => {
            e.event = "bounced";
            e.set_response(str_at(data, &["bounce", "message"]));
            e.provider_code = str_at(data, &["bounce", "subType"]).map(str::to_string);
            let kind =
                bounce_kind(str_at(data, &["bounce", "type"]), e.provider_code.as_deref(), e.enhanced_code.as_deref());
            e.bounce_type = Some(kind);
        }
        "email.complained" => e.event = "complained",
        "email.opened" => {
            e.event = "opened";
            e.set_user_agent(str_at(data, &["open", "userAgent"]));
            e.ip = valid_ip(str_at(data, &["open", "ipAddress"]));
            e.at = time(data.get("open").and_then(|o| o.get("timestamp"))).or(e.at);
        }
        "email.clicked" => {
            e.event = "clicked";
            e.url = str_at(data, &["click", "link"]).map(str::to_string);
            e.set_user_agent(str_at(data, &["click", "userAgent"]));
            e.ip = valid_ip(str_at(data, &["click", "ipAddress"]));
            e.at = time(data.get("click").and_then(|c| c.get("timestamp"))).or(e.at);
        }
        // email.sent, email.failed, email.scheduled, contact.*, domain.*, and whatever comes next.
        _ => e.set_response(str_at(data, &["failed", "reason"])),
    }
    e.payload = v;
    Ok(Verified::Events(vec![e]))
}

/// A tag's value: Resend sends `data.tags` as an object, or as a list of `{name, value}`.
fn tag<'a>(data: &'a Value, name: &str) -> Option<&'a Value> {
    match data.get("tags")? {
        Value::Object(m) => m.get(name),
        Value::Array(list) => {
            list.iter().find(|t| t.get("name").and_then(Value::as_str) == Some(name)).and_then(|t| t.get("value"))
        }
        _ => None,
    }
}

/// The recipient, when `to` names exactly one.
fn only_recipient(to: Option<&Value>) -> Option<String> {
    let one = match to? {
        Value::Array(list) if list.len() == 1 => list.first()?.as_str()?,
        Value::String(s) => s.as_str(),
        _ => return None,
    };
    let one = one.trim();
    (!one.is_empty() && !one.contains(',')).then(|| one.to_string())
}

#[cfg(test)]
mod tests {
    use base64::Engine;
    use serde_json::json;

    use super::super::testing::{headers, hostile_bodies, one, status, well_formed};
    use super::super::{verify as verify_any, Config};
    use super::*;

    /// The Svix known answer (svix-webhooks `test_sign`, research §2.1).
    const SECRET: &str = "whsec_C2FVsBQIhrscChlQIMV+b5sSYspob7oD";
    const MSG_ID: &str = "msg_27UH4WbU6Z5A5EzD8u03UvzRbpk";
    const TS: i64 = 1_649_367_553;
    const BODY: &str = r#"{"email":"test@example.com","username":"test_user"}"#;
    const SIGNATURE: &str = "v1,tZ1I4/hDygAJgO5TYxiSd6Sd0kDW6hPenDe+bTa3Kkw=";

    fn config(secret: &str) -> Config {
        Config::from_options("resend", &[("webhook_secret".to_string(), secret.to_string())].into()).unwrap().unwrap()
    }

    fn sign(secret: &str, id: &str, ts: i64, body: &[u8]) -> String {
        let key = b64(secret.strip_prefix("whsec_").unwrap()).unwrap();
        let mut msg = format!("{id}.{ts}.").into_bytes();
        msg.extend_from_slice(body);
        let tag = hmac::sign(&hmac::Key::new(hmac::HMAC_SHA256, &key), &msg);
        format!("v1,{}", base64::engine::general_purpose::STANDARD.encode(tag.as_ref()))
    }

    fn svix(id: &str, ts: i64, sig: &str) -> Vec<(String, String)> {
        headers(&[("svix-id", id), ("svix-timestamp", &ts.to_string()), ("svix-signature", sig)])
    }

    fn post(cfg: &Config, h: &[(String, String)], body: &[u8], now: i64) -> Result<Verified, Refused> {
        verify_any(cfg, &Request { headers: h, body, now }, None)
    }

    #[test]
    fn the_svix_known_answer() {
        assert_eq!(sign(SECRET, MSG_ID, TS, BODY.as_bytes()), SIGNATURE);
        // Authentic, but not a Resend event: past the signature, refused as a body.
        let got = post(&config(SECRET), &svix(MSG_ID, TS, SIGNATURE), BODY.as_bytes(), TS);
        assert_eq!(status(got), 400);
        let got = post(&config(SECRET), &svix(MSG_ID, TS, SIGNATURE), BODY.replace("test_user", "x").as_bytes(), TS);
        assert_eq!(status(got), 401);
    }

    fn bounced() -> Value {
        json!({
            "type": "email.bounced",
            "created_at": "2024-11-22T23:41:12.126Z",
            "data": {
                "broadcast_id": "8b146471-e88e-4322-86af-016cd36fd216",
                "created_at": "2024-11-22T23:41:11.894719+00:00",
                "email_id": "56761188-7520-42d8-8898-ff6fc54ce618",
                "from": "Acme <onboarding@resend.dev>",
                "to": ["delivered@resend.dev"],
                "subject": "Sending this example",
                "bounce": {
                    "message": "The recipient's email address is on the suppression list because it has a recent history of producing hard bounces.",
                    "subType": "Suppressed",
                    "type": "Permanent"
                },
                "tags": {"category": "confirm_email", "pg_email_id": "42"}
            }
        })
    }

    fn event_of(body: &Value) -> Event {
        let body = serde_json::to_vec(body).unwrap();
        let h = svix("msg_1", 1_700_000_000, &sign(SECRET, "msg_1", 1_700_000_000, &body));
        let e = one(post(&config(SECRET), &h, &body, 1_700_000_100));
        well_formed(&e);
        e
    }

    #[test]
    fn events_are_normalized() {
        let e = event_of(&bounced());
        assert_eq!((e.event, e.bounce_type), ("bounced", Some("hard")));
        assert_eq!(e.provider_event_id, "msg_1");
        assert_eq!(e.pg_email_id, Some(42));
        assert_eq!(e.provider_message_id.as_deref(), Some("56761188-7520-42d8-8898-ff6fc54ce618"));
        assert_eq!(e.recipient.as_deref(), Some("delivered@resend.dev"));
        assert_eq!(e.provider_code.as_deref(), Some("Suppressed"));
        assert!(e.response.as_deref().unwrap().contains("suppression list"));
        assert_eq!(e.at, Some(1_732_318_872.126));
        assert_eq!(e.payload, bounced());

        let mut b = bounced();
        b["data"]["bounce"] = json!({"message": "mailbox full", "type": "Transient", "subType": "MailboxFull"});
        assert_eq!(event_of(&b).bounce_type, Some("soft"));
        b["data"]["bounce"] = json!({"message": "550 5.7.1 blocked by policy"});
        let e = event_of(&b);
        assert_eq!((e.bounce_type, e.smtp_code, e.enhanced_code.as_deref()), (Some("block"), Some(550), Some("5.7.1")));
        b["data"].as_object_mut().unwrap().remove("bounce");
        assert_eq!(event_of(&b).bounce_type, Some("hard"), "no bounce type: permanent");

        let mut d = bounced();
        d["type"] = json!("email.delivered");
        d["data"]["tags"] = json!([{"name": "category", "value": "x"}, {"name": "pg_email_id", "value": "43"}]);
        let e = event_of(&d);
        assert_eq!((e.event, e.pg_email_id, e.bounce_type), ("delivered", Some(43), None));

        let mut c = bounced();
        c["type"] = json!("email.clicked");
        c["data"]["to"] = json!(["a@example.net", "b@example.net"]);
        c["data"]["click"] = json!({"ipAddress": "122.115.53.11", "link": "https://resend.com",
            "timestamp": "2024-11-24T05:00:57.163Z", "userAgent": "Mozilla/5.0 (Macintosh; Intel Mac OS X 10_15_7)"});
        let e = event_of(&c);
        assert_eq!(
            (e.event, e.url.as_deref(), e.ip.as_deref()),
            ("clicked", Some("https://resend.com"), Some("122.115.53.11"))
        );
        assert_eq!(e.recipient, None, "which of two recipients clicked is not known");
        assert_eq!(e.at, Some(1_732_424_457.163));

        for (kind, want) in [
            ("email.complained", "complained"),
            ("email.opened", "opened"),
            ("email.delivery_delayed", "deferred"),
            ("email.sent", "unknown"),
            ("email.failed", "unknown"),
            ("contact.created", "unknown"),
        ] {
            let mut x = bounced();
            x["type"] = json!(kind);
            assert_eq!(event_of(&x).event, want, "{kind}");
        }
    }

    #[test]
    fn signatures_windows_and_rotation() {
        let body = serde_json::to_vec(&bounced()).unwrap();
        let now = 1_700_000_000;
        let good = sign(SECRET, "msg_2", now, &body);
        let cfg = config(SECRET);
        assert!(post(&cfg, &svix("msg_2", now, &good), &body, now).is_ok());
        assert!(post(&cfg, &svix("msg_2", now, &good), &body, now + 300).is_ok());
        assert_eq!(status(post(&cfg, &svix("msg_2", now, &good), &body, now + 301)), 401, "stale");
        assert_eq!(status(post(&cfg, &svix("msg_2", now, &good), &body, now - 301)), 401, "from the future");
        assert_eq!(status(post(&cfg, &svix("msg_3", now, &good), &body, now)), 401, "another id");
        let mut tampered = body.clone();
        tampered[5] ^= 1;
        assert_eq!(status(post(&cfg, &svix("msg_2", now, &good), &tampered, now)), 401, "tampered");
        let other = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";
        assert_eq!(status(post(&config(other), &svix("msg_2", now, &good), &body, now)), 401, "another secret");

        // Several signatures in the header, and several secrets while rotating.
        let both = format!("v1,AAAA {} v2,xyz", good);
        assert!(post(&cfg, &svix("msg_2", now, &both), &body, now).is_ok());
        let rotating = config(&format!("{other} {SECRET}"));
        assert!(post(&rotating, &svix("msg_2", now, &good), &body, now).is_ok());
        // The Standard Webhooks header names.
        let h =
            headers(&[("webhook-id", "msg_2"), ("webhook-timestamp", &now.to_string()), ("webhook-signature", &good)]);
        assert_eq!(one(post(&cfg, &h, &body, now)).provider_event_id, "msg_2");

        for h in [
            svix("msg_2", now, "v1,"),
            svix("msg_2", now, &good.replace("v1,", "v2,")),
            svix("msg_2", now, &good.replace("v1,", "")),
            headers(&[("svix-id", "msg_2"), ("svix-timestamp", "soon"), ("svix-signature", &good)]),
            headers(&[("svix-id", "msg_2"), ("svix-signature", &good)]),
            headers(&[]),
        ] {
            let r = post(&cfg, &h, &body, now).unwrap_err();
            assert_eq!(r.status, 401, "{h:?}");
            assert!(!r.reason.contains("C2FVsBQ"));
        }
    }

    #[test]
    fn hostile_bodies_are_refused_even_when_signed() {
        let valid = serde_json::to_vec(&bounced()).unwrap();
        for body in hostile_bodies(&valid) {
            let h = svix("msg_9", 5, &sign(SECRET, "msg_9", 5, &body));
            assert_eq!(status(post(&config(SECRET), &h, &body, 5)), 400);
        }
        for bad in [json!({"type": 1, "data": {}}), json!({"type": "email.sent", "data": []}), json!({"type": "x"})] {
            let body = serde_json::to_vec(&bad).unwrap();
            let h = svix("msg_9", 5, &sign(SECRET, "msg_9", 5, &body));
            assert_eq!(status(post(&config(SECRET), &h, &body, 5)), 400, "{bad}");
        }
        // Wrong types inside data are read as absent.
        let e =
            event_of(&json!({"type": "email.clicked", "data": {"to": 5, "tags": "x", "click": [], "email_id": {}}}));
        assert_eq!((e.recipient, e.pg_email_id, e.url, e.provider_message_id), (None, None, None, None));
    }

    #[test]
    fn the_secret_option() {
        let key = b64("C2FVsBQIhrscChlQIMV+b5sSYspob7oD").unwrap();
        assert_eq!(parse_secrets(SECRET), Ok(vec![key.clone()]));
        // Form-decoded: the `+` became a space.
        assert_eq!(parse_secrets("whsec_C2FVsBQIhrscChlQIMV b5sSYspob7oD"), Ok(vec![key.clone()]));
        let two = parse_secrets("whsec_AAAA  whsec_C2FVsBQIhrscChlQIMV+b5sSYspob7oD").unwrap();
        assert_eq!(two, [vec![0, 0, 0], key]);
        for bad in ["", " ", "C2FVsBQIhrscChlQIMV+b5sSYspob7oD", "whsec_", "whsec_!!!!", "topsecret whsec_AAAA"] {
            let e = parse_secrets(bad).unwrap_err();
            assert!(e.starts_with("option webhook_secret must be") && !e.contains("topsecret"), "{bad}: {e}");
        }
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig { cases: 256, ..Default::default() })]

        /// Random signed JSON: a 400 or a well-formed event, never a panic.
        #[test]
        fn random_signed_json(data in super::super::testing::json_value(), kind in proptest::sample::select(
            &["email.delivered", "email.delivery_delayed", "email.bounced", "email.complained", "email.opened",
              "email.clicked", "email.sent"][..]
        ), wrap in proptest::prelude::any::<bool>()) {
            let body = if wrap { json!({"type": kind, "created_at": "2024-01-02T03:04:05Z", "data": data}) } else { data };
            let body = serde_json::to_vec(&body).unwrap();
            let h = svix("msg_p", 5, &sign(SECRET, "msg_p", 5, &body));
            super::super::testing::sane(&post(&config(SECRET), &h, &body, 5));
        }
    }
}
