//! Postmark webhooks. Postmark signs nothing: the webhook URL carries HTTP Basic credentials
//! (`https://USER:PASSWORD@host/webhooks/<transport>`), checked here against the DSN options
//! `webhook_user` and `webhook_password` in constant time. One JSON object per POST, told apart
//! by `RecordType` (Bounce, SpamComplaint, Delivery, Open, Click, SubscriptionChange). Our
//! message id comes back in `Metadata.pg_email_id`.
//!
//! Only bounces and spam complaints carry an id (`ID`); every other event is identified by the
//! SHA-256 of the raw body, which a retry repeats byte for byte.

use std::collections::BTreeMap;

use serde_json::Value;

use super::{
    b64, ct_eq, id_string, json_body, permanent_kind, pg_email_id, refuse, sha256_hex, str_at, time, valid_ip, Config,
    Event, Refused, Request, Verified,
};

/// The webhook settings in a Postmark DSN's options.
pub(super) fn config(options: &BTreeMap<String, String>) -> Result<Option<Config>, String> {
    match (options.get("webhook_user"), options.get("webhook_password")) {
        (None, None) => Ok(None),
        (Some(_), None) => Err("option webhook_user needs webhook_password too".into()),
        (None, Some(_)) => Err("option webhook_password needs webhook_user too".into()),
        (Some(user), Some(password)) => {
            if user.is_empty() || user.contains([':', '\r', '\n', '\0']) {
                return Err("option webhook_user must be a non-empty user name without a colon".into());
            }
            if password.is_empty() || password.contains(['\r', '\n', '\0']) {
                return Err("option webhook_password must be non-empty, without line breaks".into());
            }
            Ok(Some(Config::Postmark { user: user.clone(), password: password.clone() }))
        }
    }
}

pub(super) fn verify(user: &str, password: &str, req: &Request) -> Result<Verified, Refused> {
    let auth = req.header("authorization").ok_or_else(|| refuse(401, "no Authorization header (HTTP Basic)"))?;
    let given = match auth.trim().split_once(' ') {
        Some((scheme, credentials)) if scheme.eq_ignore_ascii_case("basic") => b64(credentials),
        _ => None,
    }
    .ok_or_else(|| refuse(401, "the Authorization header is not HTTP Basic"))?;
    let expected = format!("{user}:{password}");
    if !ct_eq(&given, expected.as_bytes()) {
        return Err(refuse(401, "wrong webhook user or password"));
    }

    let v = json_body(req.body, "Postmark")?;
    if !v.is_object() {
        return Err(refuse(400, "a Postmark webhook body is a JSON object"));
    }
    let record = str_at(&v, &["RecordType"]).ok_or_else(|| refuse(400, "a Postmark event without \"RecordType\""))?;
    let body_id = || format!("sha256:{}", sha256_hex(req.body));
    let mut e = Event::new("unknown", String::new());
    e.pg_email_id = pg_email_id(v.get("Metadata").and_then(|m| m.get("pg_email_id")));
    e.provider_message_id = str_at(&v, &["MessageID"]).map(str::to_string);
    e.recipient = str_at(&v, &["Recipient"]).or(str_at(&v, &["Email"])).map(str::to_string);
    match record {
        "Bounce" | "SpamComplaint" => {
            e.provider_event_id = id_string(v.get("ID")).unwrap_or_else(body_id);
            e.at = time(v.get("BouncedAt"));
            let kind = str_at(&v, &["Type"]);
            e.provider_code = kind.map(str::to_string);
            e.set_response(str_at(&v, &["Details"]).or(str_at(&v, &["Description"])));
            (e.event, e.bounce_type) = if record == "SpamComplaint" { ("complained", None) } else { bounce(kind, &e) };
        }
        "Delivery" => {
            e.event = "delivered";
            e.at = time(v.get("DeliveredAt"));
            e.set_response(str_at(&v, &["Details"]));
        }
        "Open" => {
            e.event = "opened";
            e.at = time(v.get("ReceivedAt"));
            e.set_user_agent(str_at(&v, &["UserAgent"]));
            e.ip = valid_ip(str_at(&v, &["Geo", "IP"]));
        }
        "Click" => {
            e.event = "clicked";
            e.at = time(v.get("ReceivedAt"));
            e.url = str_at(&v, &["OriginalLink"]).map(str::to_string);
            e.set_user_agent(str_at(&v, &["UserAgent"]));
            e.ip = valid_ip(str_at(&v, &["Geo", "IP"]));
        }
        "SubscriptionChange" => {
            e.at = time(v.get("ChangedAt"));
            e.provider_code = str_at(&v, &["SuppressionReason"]).map(str::to_string);
            // A recipient's own unsubscribe; Postmark's suppressions after a hard bounce or a
            // complaint were reported by those events already, and reactivations undo nothing.
            let suppress = v.get("SuppressSending").and_then(Value::as_bool) == Some(true);
            if suppress && e.provider_code.as_deref() == Some("ManualSuppression") {
                e.event = "unsubscribed";
            }
        }
        _ => {}
    }
    if e.provider_event_id.is_empty() {
        e.provider_event_id = body_id();
    }
    e.payload = v;
    Ok(Verified::Events(vec![e]))
}

/// A bounce `Type` (Postmark's list, "Bounce webhook" docs) as an event and bounce type.
fn bounce(kind: Option<&str>, e: &Event) -> (&'static str, Option<&'static str>) {
    match kind.unwrap_or("") {
        "HardBounce" | "BadEmailAddress" => ("bounced", Some(permanent_kind(e.enhanced_code.as_deref()))),
        "SoftBounce" | "DnsError" => ("bounced", Some("soft")),
        // "Message delayed": Postmark keeps trying.
        "Transient" => ("deferred", None),
        "Blocked" | "DMARCPolicy" | "SpamNotification" | "VirusNotification" => ("bounced", Some("block")),
        "SpamComplaint" => ("complained", None),
        "Unsubscribe" => ("unsubscribed", None),
        // AutoResponder, AddressChange, Subscribe, ManuallyDeactivated (Postmark's own suppression),
        // ChallengeVerification, OpenRelayTest, Unknown, SMTPApiError, InboundError,
        // TemplateRenderingFailed, and whatever comes next.
        _ => ("unknown", None),
    }
}

#[cfg(test)]
mod tests {
    use base64::Engine;
    use serde_json::json;

    use super::super::testing::{headers, hostile_bodies, one, status, well_formed};
    use super::super::{verify as verify_any, Config};
    use super::*;

    fn config() -> Config {
        let options = [("webhook_user", "hook"), ("webhook_password", "s3cret:pw")]
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        Config::from_options("postmark", &options).unwrap().unwrap()
    }

    fn basic(user_password: &str) -> Vec<(String, String)> {
        let b = base64::engine::general_purpose::STANDARD.encode(user_password);
        headers(&[("Authorization", &format!("Basic {b}"))])
    }

    fn post(h: &[(String, String)], body: &Value) -> Result<Verified, Refused> {
        let body = serde_json::to_vec(body).unwrap();
        verify_any(&config(), &Request { headers: h, body: &body, now: 0 }, None)
    }

    fn ok(body: Value) -> Event {
        let e = one(post(&basic("hook:s3cret:pw"), &body));
        well_formed(&e);
        assert_eq!(e.payload, body);
        e
    }

    /// Postmark's documented Bounce sample.
    fn hard_bounce() -> Value {
        json!({
            "RecordType": "Bounce", "MessageStream": "outbound", "ID": 4323372036854775807_i64, "Type": "HardBounce",
            "TypeCode": 1, "Name": "Hard bounce", "Tag": "Test", "MessageID": "883953f4-6105-42a2-a16a-77a8eac79483",
            "Metadata": {"a_key": "a_value", "pg_email_id": "42"}, "ServerID": 23, "Description": "The server was unable to deliver your message (ex: unknown user, mailbox not found).",
            "Details": "smtp;550 5.1.1 The email account that you tried to reach does not exist.", "Email": "john@example.com",
            "From": "sender@example.com", "BouncedAt": "2019-11-05T16:33:54.9070259Z", "DumpAvailable": true,
            "Inactive": true, "CanActivate": true, "Subject": "Test subject", "Content": "<Full dump of bounce>"
        })
    }

    #[test]
    fn a_hard_bounce() {
        let e = ok(hard_bounce());
        assert_eq!((e.event, e.bounce_type), ("bounced", Some("hard")));
        assert_eq!(e.provider_event_id, "4323372036854775807");
        assert_eq!(e.pg_email_id, Some(42));
        assert_eq!(e.provider_message_id.as_deref(), Some("883953f4-6105-42a2-a16a-77a8eac79483"));
        assert_eq!(e.recipient.as_deref(), Some("john@example.com"));
        assert_eq!((e.smtp_code, e.enhanced_code.as_deref()), (Some(550), Some("5.1.1")));
        assert_eq!(e.provider_code.as_deref(), Some("HardBounce"));
        assert!(e.response.as_deref().unwrap().starts_with("smtp;550 5.1.1"));
        assert!((e.at.unwrap() - 1_572_971_634.907).abs() < 0.001);
    }

    #[test]
    fn bounce_types_are_classed() {
        let cases = [
            ("HardBounce", "bounced", Some("hard")),
            ("BadEmailAddress", "bounced", Some("hard")),
            ("SoftBounce", "bounced", Some("soft")),
            ("DnsError", "bounced", Some("soft")),
            ("Transient", "deferred", None),
            ("Blocked", "bounced", Some("block")),
            ("DMARCPolicy", "bounced", Some("block")),
            ("SpamNotification", "bounced", Some("block")),
            ("SpamComplaint", "complained", None),
            ("Unsubscribe", "unsubscribed", None),
            ("ManuallyDeactivated", "unknown", None),
            ("AutoResponder", "unknown", None),
            ("SomethingNew", "unknown", None),
        ];
        for (kind, event, bounce_type) in cases {
            let mut b = hard_bounce();
            b["Type"] = json!(kind);
            b["Details"] = json!("Test bounce details");
            let e = ok(b);
            assert_eq!((e.event, e.bounce_type), (event, bounce_type), "{kind}");
        }
        let mut b = hard_bounce();
        b["Details"] = json!("smtp;550 5.7.1 Message rejected due to local policy");
        assert_eq!(ok(b).bounce_type, Some("block"), "a hard bounce for policy is a block");
    }

    #[test]
    fn a_spam_complaint() {
        let mut b = hard_bounce();
        b["RecordType"] = json!("SpamComplaint");
        b["Type"] = json!("SpamComplaint");
        b["ID"] = json!("777");
        let e = ok(b);
        assert_eq!((e.event, e.provider_event_id.as_str(), e.bounce_type), ("complained", "777", None));
    }

    #[test]
    fn delivery_open_and_click() {
        let delivery = json!({
            "RecordType": "Delivery", "ServerID": 23, "MessageStream": "outbound", "MessageID": "00000000-0000-0000-0000-000000000000",
            "Recipient": "john@example.com", "Tag": "welcome-email", "DeliveredAt": "2019-11-05T16:33:54Z",
            "Details": "Test delivery webhook details", "Metadata": {"pg_email_id": 7}
        });
        let e = ok(delivery.clone());
        assert_eq!(e.event, "delivered");
        assert_eq!(e.pg_email_id, Some(7));
        assert_eq!(e.at, Some(1_572_971_634.0));
        assert_eq!(e.response.as_deref(), Some("Test delivery webhook details"));
        let body = serde_json::to_vec(&delivery).unwrap();
        assert_eq!(e.provider_event_id, format!("sha256:{}", sha256_hex(&body)));

        let open = json!({
            "RecordType": "Open", "MessageStream": "outbound", "FirstOpen": true,
            "Client": {"Name": "Chrome 35.0.1916.153", "Company": "Google", "Family": "Chrome"},
            "OS": {"Name": "OS X 10.7 Lion", "Company": "Apple Computer, Inc.", "Family": "OS X 10"},
            "Platform": "WebMail", "UserAgent": "Mozilla/5.0 (Macintosh; Intel Mac OS X 10_7_5) AppleWebKit/537.36",
            "ReadSeconds": 5, "Geo": {"CountryISOCode": "RS", "Country": "Serbia", "IP": "188.2.95.4"},
            "MessageID": "00000000-0000-0000-0000-000000000000", "Metadata": {"pg_email_id": "9"},
            "ReceivedAt": "2019-11-05T16:33:54.9070259Z", "Tag": "welcome-email", "Recipient": "john@example.com"
        });
        let e = ok(open);
        assert_eq!((e.event, e.ip.as_deref(), e.machine), ("opened", Some("188.2.95.4"), false));
        assert!(e.user_agent.as_deref().unwrap().contains("AppleWebKit"));
        assert_eq!(e.recipient.as_deref(), Some("john@example.com"));

        let click = json!({
            "RecordType": "Click", "MessageStream": "outbound", "ClickLocation": "HTML",
            "Client": {"Name": "Chrome 35.0.1916.153"}, "Platform": "Desktop",
            "UserAgent": "Mozilla/5.0 (Windows NT 5.1; rv:11.0) Gecko Firefox/11.0 (via ggpht.com GoogleImageProxy)",
            "OriginalLink": "https://example.com", "Geo": {"IP": "2001:db8::1"},
            "MessageID": "00000000-0000-0000-0000-000000000000", "ReceivedAt": "2017-10-25T15:21:11.0000000Z",
            "Tag": "welcome-email", "Recipient": "john@example.com"
        });
        let e = ok(click);
        assert_eq!((e.event, e.url.as_deref()), ("clicked", Some("https://example.com")));
        assert!(e.machine, "Gmail's image proxy");
    }

    #[test]
    fn subscription_changes() {
        let change = |suppress: bool, reason: &str| {
            json!({
                "RecordType": "SubscriptionChange", "MessageID": "883953f4-6105-42a2-a16a-77a8eac79483",
                "ServerID": 123456, "MessageStream": "outbound", "ChangedAt": "2020-02-01T10:53:34.416071Z",
                "Recipient": "bounced-address@wildbit.com", "Origin": "Recipient", "SuppressSending": suppress,
                "SuppressionReason": reason, "Tag": "my-tag", "Metadata": {"pg_email_id": "5"}
            })
        };
        let e = ok(change(true, "ManualSuppression"));
        assert_eq!((e.event, e.recipient.as_deref()), ("unsubscribed", Some("bounced-address@wildbit.com")));
        assert_eq!(ok(change(true, "HardBounce")).event, "unknown");
        assert_eq!(ok(change(false, "ManualSuppression")).event, "unknown");
    }

    #[test]
    fn credentials_are_checked() {
        let body = hard_bounce();
        assert!(post(&basic("hook:s3cret:pw"), &body).is_ok());
        assert!(post(&headers(&[("authorization", "basic aG9vazpzM2NyZXQ6cHc=")]), &body).is_ok());
        for h in [
            basic("hook:wrong"),
            basic("hook:s3cret:pw "),
            basic("other:s3cret:pw"),
            basic("hook"),
            headers(&[("Authorization", "Bearer aG9vazpzM2NyZXQ6cHc=")]),
            headers(&[("Authorization", "Basic %%%")]),
            headers(&[("Authorization", "Basic")]),
            headers(&[]),
        ] {
            let r = post(&h, &body).unwrap_err();
            assert_eq!(r.status, 401, "{h:?}");
            assert!(!r.reason.contains("s3cret"), "{}", r.reason);
        }
    }

    #[test]
    fn hostile_bodies_are_refused() {
        let valid = serde_json::to_vec(&hard_bounce()).unwrap();
        let h = basic("hook:s3cret:pw");
        for body in hostile_bodies(&valid) {
            let got = verify_any(&config(), &Request { headers: &h, body: &body, now: 0 }, None);
            assert_eq!(status(got), 400, "{:?}", String::from_utf8_lossy(&body[..body.len().min(40)]));
        }
        // Wrong types are read as absent, never trusted.
        let e = ok(json!({"RecordType": "Bounce", "ID": [1], "Type": 5, "Metadata": "x", "BouncedAt": {}, "Geo": 1}));
        assert!(e.provider_event_id.starts_with("sha256:"));
        assert_eq!((e.event, e.pg_email_id, e.at), ("unknown", None, None));
    }

    #[test]
    fn options() {
        let o = |pairs: &[(&str, &str)]| -> BTreeMap<String, String> {
            pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
        };
        assert_eq!(config_of(&o(&[])), Ok(None));
        assert_eq!(
            config_of(&o(&[("webhook_user", "u"), ("webhook_password", "p")])),
            Ok(Some(Config::Postmark { user: "u".into(), password: "p".into() }))
        );
        for (options, want) in [
            (o(&[("webhook_user", "u")]), "option webhook_user needs webhook_password"),
            (o(&[("webhook_password", "topsecret")]), "option webhook_password needs webhook_user"),
            (o(&[("webhook_user", "a:b"), ("webhook_password", "topsecret")]), "option webhook_user must be"),
            (o(&[("webhook_user", "u"), ("webhook_password", "")]), "option webhook_password must be"),
        ] {
            let e = config_of(&options).unwrap_err();
            assert!(e.starts_with(want) && !e.contains("topsecret"), "{e}");
        }
    }

    fn config_of(o: &BTreeMap<String, String>) -> Result<Option<Config>, String> {
        super::config(o)
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig { cases: 256, ..Default::default() })]

        /// Random authentic JSON: a 400 or a well-formed event, never a panic.
        #[test]
        fn random_authentic_json(v in super::super::testing::json_value(), record in proptest::sample::select(
            &["Bounce", "SpamComplaint", "Delivery", "Open", "Click", "SubscriptionChange", "Other"][..]
        )) {
            let mut v = v;
            if let Some(o) = v.as_object_mut() {
                o.insert("RecordType".into(), json!(record));
            }
            super::super::testing::sane(&post(&basic("hook:s3cret:pw"), &v));
        }
    }
}
