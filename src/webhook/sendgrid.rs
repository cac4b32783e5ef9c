//! SendGrid's Signed Event Webhook. SendGrid signs `timestamp ‖ raw body` (no separator) with
//! ECDSA P-256 / SHA-256 and sends the base64 DER signature and the timestamp in the headers
//! `X-Twilio-Email-Event-Webhook-Signature` and `-Timestamp`. The key is the base64 SPKI SendGrid
//! shows in its settings (DSN option `webhook_key`). The body is a JSON array of events; each
//! carries our `custom_args` at its top level, so our message id is `pg_email_id`.
//!
//! SendGrid documents no replay window, so none is enforced: every event carries
//! `sg_event_id`, and an event stored twice is stored once.

use std::collections::BTreeMap;

use ring::signature::{UnparsedPublicKey, ECDSA_P256_SHA256_ASN1};
use serde_json::Value;
use x509_parser::oid_registry::{OID_EC_P256, OID_KEY_TYPE_EC_PUBLIC_KEY};
use x509_parser::prelude::FromDer;
use x509_parser::x509::SubjectPublicKeyInfo;

use super::{
    angle, b64, hash_id, json_body, number, permanent_kind, pg_email_id, refuse, str_at, valid_ip, Config, Event,
    Refused, Request, Verified,
};

const SIGNATURE: &str = "x-twilio-email-event-webhook-signature";
const TIMESTAMP: &str = "x-twilio-email-event-webhook-timestamp";

/// The webhook settings in a SendGrid DSN's options.
pub(super) fn config(options: &BTreeMap<String, String>) -> Result<Option<Config>, String> {
    match options.get("webhook_key") {
        None => Ok(None),
        Some(k) => Ok(Some(Config::SendGrid { public_key: parse_key(k)? })),
    }
}

/// The SPKI DER of a `webhook_key`: base64 as SendGrid shows it, or PEM.
pub fn parse_key(value: &str) -> Result<Vec<u8>, String> {
    const WRONG: &str = "option webhook_key must be the public key SendGrid shows for the signed event webhook: \
                         base64 of an ECDSA P-256 SubjectPublicKeyInfo, with or without PEM framing";
    let der = super::pem_or_base64(value).ok_or(WRONG)?;
    ec_point(&der).ok_or(WRONG)?;
    Ok(der)
}

/// The uncompressed P-256 point of an SPKI, which is what `ring` verifies with.
fn ec_point(spki: &[u8]) -> Option<Vec<u8>> {
    let (rest, info) = SubjectPublicKeyInfo::from_der(spki).ok()?;
    if !rest.is_empty() || info.algorithm.algorithm != OID_KEY_TYPE_EC_PUBLIC_KEY {
        return None;
    }
    if info.algorithm.parameters.as_ref()?.as_oid().ok()? != OID_EC_P256 {
        return None;
    }
    let point = info.subject_public_key.data.to_vec();
    (point.len() == 65 && point.first() == Some(&4)).then_some(point)
}

pub(super) fn verify(public_key: &[u8], req: &Request) -> Result<Verified, Refused> {
    let signature = req.header(SIGNATURE).ok_or_else(|| refuse(401, "no X-Twilio-Email-Event-Webhook-Signature"))?;
    let timestamp = req.header(TIMESTAMP).ok_or_else(|| refuse(401, "no X-Twilio-Email-Event-Webhook-Timestamp"))?;
    let signature = b64(signature).ok_or_else(|| refuse(401, "the signature is not base64"))?;
    let point = ec_point(public_key).ok_or_else(|| refuse(401, "the transport's webhook_key is not a P-256 key"))?;
    let mut signed = Vec::with_capacity(timestamp.len() + req.body.len());
    signed.extend_from_slice(timestamp.as_bytes());
    signed.extend_from_slice(req.body);
    UnparsedPublicKey::new(&ECDSA_P256_SHA256_ASN1, &point)
        .verify(&signed, &signature)
        .map_err(|_| refuse(401, "bad signature"))?;

    let Value::Array(items) = json_body(req.body, "SendGrid")? else {
        return Err(refuse(400, "a SendGrid event webhook body is a JSON array of events"));
    };
    items.into_iter().map(event).collect::<Result<Vec<_>, _>>().map(Verified::Events)
}

/// One element of the array.
fn event(v: Value) -> Result<Event, Refused> {
    if !v.is_object() {
        return Err(refuse(400, "a SendGrid event is a JSON object"));
    }
    let kind = str_at(&v, &["event"]).ok_or_else(|| refuse(400, "a SendGrid event without \"event\""))?;
    let id = str_at(&v, &["sg_event_id"]).map(str::to_string).unwrap_or_else(|| hash_id(&v));
    let mut e = Event::new("unknown", id);
    e.pg_email_id = pg_email_id(v.get("pg_email_id"));
    // `sg_message_id` is the send answer's X-Message-Id and a suffix after the first dot.
    e.provider_message_id =
        str_at(&v, &["sg_message_id"]).and_then(|m| m.split('.').next()).filter(|m| !m.is_empty()).map(str::to_string);
    e.rfc_message_id = angle(str_at(&v, &["smtp-id"]));
    e.recipient = str_at(&v, &["email"]).map(str::to_string);
    e.at = number(v.get("timestamp"));
    let status = str_at(&v, &["status"]).filter(|s| crate::reply::is_enhanced(s)).map(str::to_string);
    match kind {
        "delivered" => {
            e.event = "delivered";
            e.set_response(str_at(&v, &["response"]));
        }
        "deferred" => {
            e.event = "deferred";
            e.set_response(str_at(&v, &["response"]));
        }
        "bounce" => {
            e.event = "bounced";
            e.enhanced_code = status;
            e.set_response(str_at(&v, &["reason"]));
            e.provider_code = str_at(&v, &["bounce_classification"]).map(str::to_string);
            e.bounce_type = Some(match str_at(&v, &["type"]) {
                Some("blocked") => "block",
                _ => permanent_kind(e.enhanced_code.as_deref()),
            });
        }
        "open" => {
            e.event = "opened";
            e.set_user_agent(str_at(&v, &["useragent"]));
            e.ip = valid_ip(str_at(&v, &["ip"]));
            e.machine |= v.get("sg_machine_open").and_then(Value::as_bool) == Some(true);
        }
        "click" => {
            e.event = "clicked";
            e.url = str_at(&v, &["url"]).map(str::to_string);
            e.set_user_agent(str_at(&v, &["useragent"]));
            e.ip = valid_ip(str_at(&v, &["ip"]));
        }
        "spamreport" => e.event = "complained",
        "unsubscribe" | "group_unsubscribe" => e.event = "unsubscribed",
        // processed, dropped (SendGrid's own suppression: never sent), group_resubscribe and
        // whatever comes next.
        _ => {
            e.enhanced_code = status;
            e.set_response(str_at(&v, &["reason"]).or(str_at(&v, &["response"])));
        }
    }
    e.payload = v;
    Ok(e)
}

#[cfg(test)]
mod tests {
    use ring::rand::SystemRandom;
    use ring::signature::{EcdsaKeyPair, KeyPair, ECDSA_P256_SHA256_ASN1_SIGNING};
    use serde_json::json;

    use super::super::testing::{events, headers, hostile_bodies, status, well_formed};
    use super::super::{verify as verify_any, Config};
    use super::*;

    /// The DER prefix of a P-256 SubjectPublicKeyInfo; the 65-byte point follows.
    const SPKI_PREFIX: &str = "3059301306072a8648ce3d020106082a8648ce3d030107034200";

    struct Signer {
        pair: EcdsaKeyPair,
        spki: Vec<u8>,
    }

    fn signer() -> Signer {
        let rng = SystemRandom::new();
        let pkcs8 = EcdsaKeyPair::generate_pkcs8(&ECDSA_P256_SHA256_ASN1_SIGNING, &rng).unwrap();
        let pair = EcdsaKeyPair::from_pkcs8(&ECDSA_P256_SHA256_ASN1_SIGNING, pkcs8.as_ref(), &rng).unwrap();
        let mut spki = super::super::unhex(SPKI_PREFIX).unwrap();
        spki.extend_from_slice(pair.public_key().as_ref());
        Signer { pair, spki }
    }

    impl Signer {
        fn key_b64(&self) -> String {
            use base64::Engine;
            base64::engine::general_purpose::STANDARD.encode(&self.spki)
        }

        fn config(&self) -> Config {
            Config::from_options("sendgrid", &[("webhook_key".to_string(), self.key_b64())].into()).unwrap().unwrap()
        }

        /// The two headers for `body` at `ts`.
        fn sign(&self, ts: &str, body: &[u8]) -> Vec<(String, String)> {
            use base64::Engine;
            let mut msg = ts.as_bytes().to_vec();
            msg.extend_from_slice(body);
            let sig = self.pair.sign(&SystemRandom::new(), &msg).unwrap();
            headers(&[
                ("X-Twilio-Email-Event-Webhook-Signature", &base64::engine::general_purpose::STANDARD.encode(sig)),
                ("X-Twilio-Email-Event-Webhook-Timestamp", ts),
            ])
        }

        fn verify(&self, h: &[(String, String)], body: &[u8]) -> Result<Verified, Refused> {
            verify_any(&self.config(), &Request { headers: h, body, now: 1_700_000_000 }, None)
        }
    }

    /// The events of SendGrid's documented sample, with our custom arg.
    fn sample() -> Value {
        let mid = "<14c5d75ce93.dfd.64b469@ismtpd-555>";
        json!([
            {"email": "ann@example.net", "timestamp": 1513299569, "smtp-id": mid, "event": "processed",
             "category": "cat facts", "sg_event_id": "ev-processed", "sg_message_id": "14c5d75ce93.dfd.64b469.filter0001.16648.5515E0B88.0", "pg_email_id": "42"},
            {"email": "ann@example.net", "timestamp": 1513299569, "smtp-id": mid, "event": "deferred",
             "sg_event_id": "ev-deferred", "sg_message_id": "14c5d75ce93.dfd.64b469.filter0001", "response": "400 try again later", "attempt": "5", "pg_email_id": "42"},
            {"email": "ann@example.net", "timestamp": 1513299570, "smtp-id": mid, "event": "delivered",
             "sg_event_id": "ev-delivered", "sg_message_id": "14c5d75ce93.dfd.64b469.filter0001", "response": "250 OK", "pg_email_id": "42"},
            {"email": "ann@example.net", "timestamp": 1513299571, "event": "open", "sg_machine_open": false,
             "sg_event_id": "ev-open", "sg_message_id": "14c5d75ce93.dfd.64b469.filter0001", "useragent": "Mozilla/4.0 (compatible; MSIE 6.1; Windows XP; .NET CLR 1.1.4322; .NET CLR 2.0.50727)", "ip": "255.255.255.255", "pg_email_id": 42},
            {"email": "ann@example.net", "timestamp": 1513299572, "event": "click",
             "sg_event_id": "ev-click", "sg_message_id": "14c5d75ce93.dfd.64b469.filter0001", "useragent": "Mozilla/5.0", "ip": "2001:db8::7", "url": "http://www.sendgrid.com/", "pg_email_id": "42"},
            {"email": "bob@example.net", "timestamp": 1513299573, "smtp-id": mid, "event": "bounce",
             "sg_event_id": "ev-bounce", "sg_message_id": "14c5d75ce93.dfd.64b469.filter0001", "reason": "550 5.1.1 The email account that you tried to reach does not exist.",
             "status": "5.1.1", "type": "bounce", "bounce_classification": "Invalid Address", "pg_email_id": "42"},
            {"email": "carol@example.net", "timestamp": 1513299574, "event": "bounce", "sg_event_id": "ev-blocked",
             "reason": "unable to get mx info: failed to get IPs from PTR record", "type": "blocked", "bounce_classification": "Unclassified"},
            {"email": "ann@example.net", "timestamp": 1513299575, "event": "spamreport", "sg_event_id": "ev-spam", "sg_message_id": "14c5d75ce93.dfd.64b469.filter0001", "pg_email_id": "42"},
            {"email": "ann@example.net", "timestamp": 1513299576, "event": "group_unsubscribe", "asm_group_id": 10, "sg_event_id": "ev-unsub", "pg_email_id": "42"},
            {"email": "ann@example.net", "timestamp": 1513299577, "event": "dropped", "reason": "Bounced Address", "status": "5.0.0", "sg_event_id": "ev-dropped"},
        ])
    }

    #[test]
    fn a_signed_batch_is_normalized_event_by_event() {
        let s = signer();
        let body = serde_json::to_vec(&sample()).unwrap();
        let e = events(s.verify(&s.sign("1700000000", &body), &body));
        e.iter().for_each(well_formed);
        let names: Vec<&str> = e.iter().map(|e| e.event).collect();
        assert_eq!(
            names,
            [
                "unknown",
                "deferred",
                "delivered",
                "opened",
                "clicked",
                "bounced",
                "bounced",
                "complained",
                "unsubscribed",
                "unknown"
            ]
        );
        let ids: Vec<&str> = e.iter().map(|e| e.provider_event_id.as_str()).collect();
        assert_eq!(ids[0..3], ["ev-processed", "ev-deferred", "ev-delivered"]);

        let delivered = &e[2];
        assert_eq!(delivered.pg_email_id, Some(42));
        assert_eq!(delivered.provider_message_id.as_deref(), Some("14c5d75ce93"));
        assert_eq!(delivered.rfc_message_id.as_deref(), Some("<14c5d75ce93.dfd.64b469@ismtpd-555>"));
        assert_eq!(delivered.recipient.as_deref(), Some("ann@example.net"));
        assert_eq!((delivered.smtp_code, delivered.response.as_deref()), (Some(250), Some("250 OK")));
        assert_eq!(delivered.at, Some(1_513_299_570.0));
        assert_eq!(delivered.payload, sample()[2]);

        assert_eq!((e[1].smtp_code, e[1].response.as_deref()), (Some(400), Some("400 try again later")));

        let open = &e[3];
        assert_eq!(open.pg_email_id, Some(42), "a number works as well as a string");
        assert_eq!(open.ip.as_deref(), Some("255.255.255.255"));
        assert!(open.user_agent.as_deref().unwrap().starts_with("Mozilla/4.0"));
        assert!(!open.machine);

        let click = &e[4];
        assert_eq!(click.url.as_deref(), Some("http://www.sendgrid.com/"));
        assert_eq!(click.ip.as_deref(), Some("2001:db8::7"));

        let hard = &e[5];
        assert_eq!(hard.bounce_type, Some("hard"));
        assert_eq!((hard.smtp_code, hard.enhanced_code.as_deref()), (Some(550), Some("5.1.1")));
        assert_eq!(hard.provider_code.as_deref(), Some("Invalid Address"));
        assert_eq!(hard.recipient.as_deref(), Some("bob@example.net"));

        let blocked = &e[6];
        assert_eq!(blocked.bounce_type, Some("block"));
        assert_eq!((blocked.smtp_code, blocked.enhanced_code.as_deref()), (None, None));
        assert_eq!(blocked.pg_email_id, None);

        assert_eq!(e[9].response.as_deref(), Some("Bounced Address"));
    }

    #[test]
    fn machine_opens_and_events_without_an_id() {
        let s = signer();
        let body = br#"[{"email":"a@example.net","timestamp":1,"event":"open","sg_machine_open":true,"ip":"not an ip"},
            {"email":"a@example.net","timestamp":2,"event":"bounce","status":"5.7.1","reason":"550 5.7.1 rejected by policy","type":"bounce"}]"#;
        let e = events(s.verify(&s.sign("1", body), body));
        assert!(e[0].machine);
        assert_eq!(e[0].ip, None);
        assert!(e[0].provider_event_id.starts_with("sha256:") && e[0].provider_event_id.len() == 71);
        assert_ne!(e[0].provider_event_id, e[1].provider_event_id);
        assert_eq!(e[1].bounce_type, Some("block"), "5.7.x is a policy refusal");
        assert_eq!(events(s.verify(&s.sign("1", b"[]"), b"[]")), []);
    }

    #[test]
    fn only_the_exact_signed_bytes_pass() {
        let s = signer();
        let body = serde_json::to_vec(&sample()).unwrap();
        let h = s.sign("1700000000", &body);
        assert!(s.verify(&h, &body).is_ok());

        let mut tampered = body.clone();
        tampered[10] ^= 1;
        assert_eq!(status(s.verify(&h, &tampered)), 401, "tampered body");
        let other_ts = s.sign("1700000001", &body);
        let mixed = vec![h[0].clone(), other_ts[1].clone()];
        assert_eq!(status(s.verify(&mixed, &body)), 401, "signature of another timestamp");
        let other = signer();
        assert_eq!(status(other.verify(&h, &body)), 401, "another key");
        assert_eq!(status(s.verify(&h[..1], &body)), 401, "no timestamp");
        assert_eq!(status(s.verify(&h[1..], &body)), 401, "no signature");
        let garbage = headers(&[
            ("X-Twilio-Email-Event-Webhook-Signature", "not base64!"),
            ("X-Twilio-Email-Event-Webhook-Timestamp", "1"),
        ]);
        assert_eq!(status(s.verify(&garbage, &body)), 401);
        let refusal = s.verify(&h, &tampered).unwrap_err();
        assert!(!refusal.reason.contains(&s.key_b64()));
    }

    #[test]
    fn hostile_bodies_are_refused_even_when_signed() {
        let s = signer();
        let valid = serde_json::to_vec(&sample()).unwrap();
        for body in hostile_bodies(&valid) {
            let got = s.verify(&s.sign("1", &body), &body);
            assert_eq!(status(got), 400, "{:?}", String::from_utf8_lossy(&body[..body.len().min(40)]));
            assert_eq!(status(s.verify(&headers(&[]), &body)), 401);
        }
    }

    #[test]
    fn the_key_option_takes_base64_or_pem() {
        let s = signer();
        let pem = format!("-----BEGIN PUBLIC KEY-----\n{}\n-----END PUBLIC KEY-----\n", s.key_b64());
        assert_eq!(parse_key(&pem), Ok(s.spki.clone()));
        assert_eq!(parse_key(&s.key_b64()), Ok(s.spki.clone()));
        // As a form-decoded query value: `+` became a space.
        assert_eq!(parse_key(&s.key_b64().replace('+', " ")), Ok(s.spki.clone()));
        let mut rsa_spki = super::super::unhex("30820122300d06092a864886f70d01010105000382010f00").unwrap();
        rsa_spki.extend([0u8; 10]);
        use base64::Engine;
        for bad in [
            "".to_string(),
            "not base64".to_string(),
            "AAAA".to_string(),
            base64::engine::general_purpose::STANDARD.encode(&rsa_spki),
            base64::engine::general_purpose::STANDARD.encode(&s.spki[..60]),
        ] {
            let e = parse_key(&bad).unwrap_err();
            assert!(e.starts_with("option webhook_key must be"), "{e}");
        }
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig { cases: 128, ..Default::default() })]

        /// Random signed JSON: a 400 or well-formed events, never a panic.
        #[test]
        fn random_signed_json(v in super::super::testing::json_value(), kind in proptest::sample::select(
            &["processed", "deferred", "delivered", "bounce", "open", "click", "spamreport", "unsubscribe", "x"][..]
        )) {
            let mut v = v;
            if let Some(o) = v.as_object_mut() {
                o.insert("event".into(), json!(kind));
            }
            let s = signer();
            for body in [json!([v.clone()]), v] {
                let body = serde_json::to_vec(&body).unwrap();
                super::super::testing::sane(&s.verify(&s.sign("1", &body), &body));
            }
        }
    }
}
