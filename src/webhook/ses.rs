//! Amazon SES events through SNS. The body is the SNS envelope (sent as `text/plain`); its
//! `Message` field is a JSON string holding the SES event. Checks, in order:
//!
//! - `TopicArn` is the one configured (`sns_topic_arn`): anyone can point a topic of their own,
//!   with valid Amazon signatures, at our URL (403 otherwise);
//! - `SigningCertURL` (and a confirmation's `SubscribeURL`) start with `sns_url_prefix`, by
//!   default `https://sns.<region>.amazonaws.com/`, and the certificate's path ends in `.pem`
//!   (403 otherwise): nothing else is ever fetched;
//! - the RSA signature, `SignatureVersion` 1 (SHA-1) or 2 (SHA-256), over `Key\nValue\n` for
//!   each signed key in order, the last line included (403 otherwise).
//!
//! The certificate comes from the caller (`Verified::NeedCertificate` asks for it; the listener
//! fetches and caches it), or is pinned by the operator (`sns_cert_pem`). Certificate dates and
//! chains are not checked: the URL pin is what makes it Amazon's.
//!
//! An SES event becomes one [`Event`] per recipient it names; its id is the SNS `MessageId`
//! (stable across SNS retries), followed by `:recipient` when there are several.

use std::collections::BTreeMap;

use ring::signature::{UnparsedPublicKey, RSA_PKCS1_2048_8192_SHA1_FOR_LEGACY_USE_ONLY, RSA_PKCS1_2048_8192_SHA256};
use serde_json::Value;
use x509_parser::certificate::X509Certificate;
use x509_parser::oid_registry::OID_PKCS1_RSAENCRYPTION;
use x509_parser::prelude::FromDer;

use super::{
    angle, b64, json_body, permanent_kind, pg_email_id, refuse, str_at, time, valid_ip, Config, Event, Refused,
    Request, Verified,
};

/// The text of the one notification SES sends when a topic is set up.
const VALIDATED: &str = "Successfully validated SNS topic";

/// The webhook settings of a transport, borrowed from [`Config::Ses`].
pub(super) struct Settings<'a> {
    pub topic_arn: &'a str,
    pub url_prefix: &'a str,
    pub cert_pem: Option<&'a str>,
}

/// The webhook settings in an SES DSN's options. `region` is the DSN's (the SES check fills in
/// `us-east-1` when it names none).
pub(super) fn config(options: &BTreeMap<String, String>) -> Result<Option<Config>, String> {
    let Some(topic_arn) = options.get("sns_topic_arn") else {
        for o in ["sns_url_prefix", "sns_cert_pem"] {
            if options.contains_key(o) {
                return Err(format!("option {o} needs sns_topic_arn too"));
            }
        }
        return Ok(None);
    };
    let topic_arn = topic_arn.trim();
    if !topic_arn.starts_with("arn:")
        || topic_arn.len() > 512
        || topic_arn.contains(|c: char| c.is_whitespace() || c.is_control())
    {
        return Err(
            "option sns_topic_arn must be the ARN of an SNS topic, as in arn:aws:sns:eu-west-1:123456789012:ses-events"
                .into(),
        );
    }
    let url_prefix = match options.get("sns_url_prefix") {
        Some(p) => {
            if !url_prefix_ok(p) {
                return Err("option sns_url_prefix must be an http(s) URL ending its host with /, \
                            as in https://sns.eu-west-1.amazonaws.com/"
                    .into());
            }
            p.clone()
        }
        None => default_prefix(options.get("region").map_or("us-east-1", String::as_str)),
    };
    let cert_pem = match options.get("sns_cert_pem") {
        None => None,
        Some(pem) => {
            let der = super::pem_or_base64(pem)
                .filter(|der| rsa_key(der).is_some())
                .ok_or("option sns_cert_pem must be a PEM certificate with an RSA key")?;
            Some(to_pem(&der))
        }
    };
    Ok(Some(Config::Ses { topic_arn: topic_arn.to_string(), url_prefix, cert_pem }))
}

/// `https://sns.<region>.amazonaws.com/`, `.com.cn` in China.
fn default_prefix(region: &str) -> String {
    let cn = if region.starts_with("cn-") { ".cn" } else { "" };
    format!("https://sns.{region}.amazonaws.com{cn}/")
}

/// A prefix pins a host only when a `/` ends it: `https://sns.x.amazonaws.com` alone would also
/// match `https://sns.x.amazonaws.com.example.net/`.
fn url_prefix_ok(p: &str) -> bool {
    let Some(rest) = p.strip_prefix("https://").or_else(|| p.strip_prefix("http://")) else { return false };
    let Some((host, _)) = rest.split_once('/') else { return false };
    !host.is_empty()
        && !host.contains(['@', '\\', '?', '#'])
        && !p.contains(|c: char| c.is_whitespace() || c.is_control())
}

/// Whether `url` is under `prefix` and has nothing a fetch could read another way.
fn under(url: &str, prefix: &str) -> bool {
    url.starts_with(prefix) && !url.contains(|c: char| c.is_whitespace() || c.is_control() || c == '\\')
}

/// PEM of a certificate's DER.
fn to_pem(der: &[u8]) -> String {
    use base64::Engine;
    let b = base64::engine::general_purpose::STANDARD.encode(der);
    let lines: Vec<&str> = b.as_bytes().chunks(64).filter_map(|c| std::str::from_utf8(c).ok()).collect();
    format!("-----BEGIN CERTIFICATE-----\n{}\n-----END CERTIFICATE-----\n", lines.join("\n"))
}

/// The RSA public key (PKCS#1 DER, what `ring` verifies with) of a DER certificate.
fn rsa_key(der: &[u8]) -> Option<Vec<u8>> {
    let (_, cert) = X509Certificate::from_der(der).ok()?;
    let spki = cert.public_key();
    (spki.algorithm.algorithm == OID_PKCS1_RSAENCRYPTION).then(|| spki.subject_public_key.data.to_vec())
}

pub(super) fn verify(s: &Settings, req: &Request, cert: Option<&[u8]>) -> Result<Verified, Refused> {
    let v = json_body(req.body, "SNS")?;
    let field = |k: &str| v.get(k).and_then(Value::as_str);
    let kind = field("Type").ok_or_else(|| refuse(400, "an SNS message without \"Type\""))?;
    let keys: &[&str] = match kind {
        "Notification" => &["Message", "MessageId", "Subject", "Timestamp", "TopicArn", "Type"],
        "SubscriptionConfirmation" | "UnsubscribeConfirmation" => {
            &["Message", "MessageId", "SubscribeURL", "Timestamp", "Token", "TopicArn", "Type"]
        }
        _ => return Err(refuse(400, "an SNS message of an unknown Type")),
    };
    if field("TopicArn") != Some(s.topic_arn) {
        return Err(refuse(403, "the message is not for the transport's sns_topic_arn"));
    }
    let cert_url = field("SigningCertURL").or_else(|| field("SigningCertUrl")).unwrap_or("");
    if !under(cert_url, s.url_prefix) || cert_url.contains(['?', '#']) || !cert_url.ends_with(".pem") {
        return Err(refuse(403, "SigningCertURL is not a .pem under the transport's sns_url_prefix"));
    }
    let subscribe_url = field("SubscribeURL");
    if kind != "Notification" && !subscribe_url.is_some_and(|u| under(u, s.url_prefix)) {
        return Err(refuse(403, "SubscribeURL is not under the transport's sns_url_prefix"));
    }
    let mut to_sign = String::new();
    for k in keys {
        match field(k) {
            Some(value) => {
                to_sign.push_str(k);
                to_sign.push('\n');
                to_sign.push_str(value);
                to_sign.push('\n');
            }
            None if *k == "Subject" => {}
            None => return Err(refuse(400, format!("an SNS {kind} without \"{k}\""))),
        }
    }
    let algorithm: &dyn ring::signature::VerificationAlgorithm = match field("SignatureVersion") {
        Some("1") => &RSA_PKCS1_2048_8192_SHA1_FOR_LEGACY_USE_ONLY,
        Some("2") => &RSA_PKCS1_2048_8192_SHA256,
        _ => return Err(refuse(403, "SignatureVersion is not 1 or 2")),
    };
    let signature = field("Signature").and_then(b64).ok_or_else(|| refuse(403, "no base64 Signature"))?;
    let Some(pem) = s.cert_pem.map(str::as_bytes).or(cert) else {
        return Ok(Verified::NeedCertificate(cert_url.to_string()));
    };
    let key = std::str::from_utf8(pem)
        .ok()
        .and_then(super::pem_or_base64)
        .and_then(|der| rsa_key(&der))
        .ok_or_else(|| refuse(403, "the signing certificate is not a PEM certificate with an RSA key"))?;
    UnparsedPublicKey::new(algorithm, &key)
        .verify(to_sign.as_bytes(), &signature)
        .map_err(|_| refuse(403, "bad signature"))?;

    let message = field("Message").unwrap_or("");
    let message_id = field("MessageId").unwrap_or("");
    match kind {
        "SubscriptionConfirmation" => {
            let subscribe_url = subscribe_url.unwrap_or("").to_string();
            Ok(Verified::Confirm { subscribe_url, payload: v })
        }
        "UnsubscribeConfirmation" => Ok(Verified::Ignore(format!("SNS UnsubscribeConfirmation for {}", s.topic_arn))),
        _ => match serde_json::from_str::<Value>(message) {
            Ok(ses) if ses.is_object() => {
                if str_at(&ses, &["notificationType"]) == Some("AmazonSnsSubscriptionSucceeded") {
                    return Ok(Verified::Ignore("SES: SNS subscription succeeded".into()));
                }
                Ok(Verified::Events(events(ses, message_id, time(v.get("Timestamp")))))
            }
            _ if message.trim_start().starts_with(VALIDATED) => Ok(Verified::Ignore("SES: topic validated".into())),
            // Authentic, but not an SES event: kept as an unknown event.
            _ => {
                let mut e = Event::new("unknown", message_id.to_string());
                e.at = time(v.get("Timestamp"));
                e.payload = v;
                Ok(Verified::Events(vec![e]))
            }
        },
    }
}

/// The events of one SES event: one per recipient it names.
fn events(ses: Value, message_id: &str, sns_time: Option<f64>) -> Vec<Event> {
    let kind = str_at(&ses, &["eventType"]).or(str_at(&ses, &["notificationType"])).unwrap_or("");
    let mut base = Event::new("unknown", message_id.to_string());
    base.pg_email_id = pg_email_id(ses.get("mail").and_then(|m| m.get("tags")).and_then(|t| t.get("pg_email_id")));
    base.provider_message_id = str_at(&ses, &["mail", "messageId"]).map(str::to_string);
    base.rfc_message_id = angle(str_at(&ses, &["mail", "commonHeaders", "messageId"]));
    base.at = sns_time;
    // Opens, clicks and the rest name no recipient: the message's, when it had one.
    let destination = match ses.get("mail").and_then(|m| m.get("destination")).and_then(Value::as_array) {
        Some(list) if list.len() == 1 => list.first().and_then(Value::as_str).map(str::to_string),
        _ => None,
    };
    let list = |path: &[&str]| -> Vec<Value> {
        super::at_path(&ses, path).and_then(Value::as_array).cloned().unwrap_or_default()
    };
    let mut out: Vec<Event> = Vec::new();
    match kind {
        "Bounce" => {
            let b = ses.get("bounce").unwrap_or(&Value::Null);
            let (bounce_type, sub_type) = (str_at(b, &["bounceType"]), str_at(b, &["bounceSubType"]));
            for r in each(list(&["bounce", "bouncedRecipients"])) {
                let mut e = base.clone();
                e.event = "bounced";
                e.at = time(b.get("timestamp")).or(e.at);
                e.recipient = str_at(&r, &["emailAddress"]).map(str::to_string);
                e.enhanced_code = str_at(&r, &["status"]).filter(|c| crate::reply::is_enhanced(c)).map(str::to_string);
                e.set_response(str_at(&r, &["diagnosticCode"]));
                e.provider_code = sub_type.map(str::to_string);
                e.bounce_type = Some(bounce_kind(bounce_type, sub_type, e.enhanced_code.as_deref()));
                out.push(e);
            }
        }
        "Complaint" => {
            let c = ses.get("complaint").unwrap_or(&Value::Null);
            for r in each(list(&["complaint", "complainedRecipients"])) {
                let mut e = base.clone();
                e.event = "complained";
                e.at = time(c.get("timestamp")).or(e.at);
                e.recipient = str_at(&r, &["emailAddress"]).map(str::to_string);
                e.provider_code =
                    str_at(c, &["complaintFeedbackType"]).or(str_at(c, &["complaintSubType"])).map(str::to_string);
                out.push(e);
            }
        }
        "Delivery" => {
            let d = ses.get("delivery").unwrap_or(&Value::Null);
            for r in each(list(&["delivery", "recipients"])) {
                let mut e = base.clone();
                e.event = "delivered";
                e.at = time(d.get("timestamp")).or(e.at);
                e.recipient = r.as_str().map(str::to_string);
                e.set_response(str_at(d, &["smtpResponse"]));
                out.push(e);
            }
        }
        "DeliveryDelay" => {
            let d = ses.get("deliveryDelay").unwrap_or(&Value::Null);
            for r in each(list(&["deliveryDelay", "delayedRecipients"])) {
                let mut e = base.clone();
                e.event = "deferred";
                e.at = time(d.get("timestamp")).or(e.at);
                e.recipient = str_at(&r, &["emailAddress"]).map(str::to_string);
                e.enhanced_code = str_at(&r, &["status"]).filter(|c| crate::reply::is_enhanced(c)).map(str::to_string);
                e.set_response(str_at(&r, &["diagnosticCode"]));
                e.provider_code = str_at(d, &["delayType"]).map(str::to_string);
                out.push(e);
            }
        }
        "Open" | "Click" => {
            let key = if kind == "Open" { "open" } else { "click" };
            let o = ses.get(key).unwrap_or(&Value::Null);
            let mut e = base.clone();
            e.event = if kind == "Open" { "opened" } else { "clicked" };
            e.at = time(o.get("timestamp")).or(e.at);
            e.recipient = destination;
            e.url = str_at(o, &["link"]).map(str::to_string).filter(|_| kind == "Click");
            e.set_user_agent(str_at(o, &["userAgent"]));
            e.ip = valid_ip(str_at(o, &["ipAddress"]));
            out.push(e);
        }
        // Send, Reject, Rendering Failure, Subscription, and whatever comes next.
        _ => {
            let mut e = base.clone();
            e.recipient = destination;
            e.set_response(str_at(&ses, &["reject", "reason"]).or(str_at(&ses, &["failure", "errorMessage"])));
            out.push(e);
        }
    }
    if out.len() > 1 {
        for (i, e) in out.iter_mut().enumerate() {
            let who = e.recipient.clone().unwrap_or_else(|| i.to_string());
            e.provider_event_id = format!("{message_id}:{who}");
        }
    }
    for e in &mut out {
        e.payload = ses.clone();
    }
    out
}

/// The elements of a recipient list, or one empty entry when the list is empty (so an event
/// that names nobody is still recorded once).
fn each(list: Vec<Value>) -> Vec<Value> {
    if list.is_empty() {
        vec![Value::Null]
    } else {
        list
    }
}

/// The bounce type of an SES bounce (Resend reports SES's classes too): `block` for content
/// refusals and 5.7.x codes, `soft` for transient, undetermined and full-mailbox bounces, and for
/// permanent ones what their RFC 3463 code says (`hard` without one).
pub(super) fn bounce_kind(bounce_type: Option<&str>, sub_type: Option<&str>, enhanced: Option<&str>) -> &'static str {
    match (bounce_type, sub_type) {
        (_, Some("ContentRejected" | "AttachmentRejected")) => "block",
        (_, Some("MailboxFull")) => "soft",
        (Some("Permanent") | None, _) => permanent_kind(enhanced),
        _ => "soft",
    }
}

#[cfg(test)]
mod tests {
    use ring::rand::SystemRandom;
    use ring::signature::{RsaKeyPair, RSA_PKCS1_SHA256};
    use serde_json::json;

    use super::super::testing::{events, hostile_bodies, one, status, well_formed};
    use super::super::{verify as verify_any, Config};
    use super::*;

    /// A self-signed RSA-2048 test certificate (`openssl req -x509 -newkey rsa:2048 -nodes`).
    const TEST_CERT: &str = "\
-----BEGIN CERTIFICATE-----\n\
MIIDKzCCAhOgAwIBAgIUfAXGsD+zCKzXI4xU9+4mkyNCdVgwDQYJKoZIhvcNAQEL\n\
BQAwJDEiMCAGA1UEAwwZc25zLnRlc3QucGctZW1haWwuaW52YWxpZDAgFw0yNjEx\n\
MzAxNDEwMzBaGA8yMTI2MTEwNjE0MTAzMFowJDEiMCAGA1UEAwwZc25zLnRlc3Qu\n\
cGctZW1haWwuaW52YWxpZDCCASIwDQYJKoZIhvcNAQEBBQADggEPADCCAQoCggEB\n\
AOHY+3JZewm7SoyfEl6HRZxicbWo0NtgKRadRNVQjjop/C80zXlwMMGCz/uQPH3n\n\
c2UrqTeS9YCe7u/2R6ZsP8ObuZK6lgKDz4tlhYsP/haf8FulTSHiZguSrElcuwOs\n\
+Fr9/Cl8TWaFijjdLL1TIuZ7yFXSRN7gSCMvzWLjQQ1YkW/UzCml/im4cm9Cnpe0\n\
SoJlMQrA+PQgFLXEtGx3AJVituyhx5ez5h928s5vZ5JE2c/9CfvvRb8cv3JIVdqq\n\
XCJsvhR4+J9gGDJlQkkzDCetr0rVa2N+qWK/M6L5Q+RjMtnB509mg3JvUDTQEqVT\n\
hZ8Z4UTdtkfF05orS+8qodcCAwEAAaNTMFEwHQYDVR0OBBYEFKxsEexe7XFvU1rH\n\
29whhO4WVdKeMB8GA1UdIwQYMBaAFKxsEexe7XFvU1rH29whhO4WVdKeMA8GA1Ud\n\
EwEB/wQFMAMBAf8wDQYJKoZIhvcNAQELBQADggEBAD2JFAMGrKxZcbC0jF6yz7K0\n\
eW1Ke+1WiImLf/yh4Z1IhyefWNKiLWVF0E/JDTvVrQrTU2ETzfCbkrULRoXeUVHa\n\
zy9Go4Ys2k6jZVvNNk7/HYEE3lWrZzE1h39kpW/QStrOYZ2B6FmTL0u7uzuMkeSx\n\
kxC1u26fdcRm9TS77ABpU+WEELpPgkSq7HdeFdpn54m0HEFNHEvQvtfIA7U0vrGz\n\
LV3Ml0a2R+pQU9LNHjS4f3QP42ZusSutnOQLWjFvbumwn8yS2DVB1Cv22OyUCJtX\n\
Fqu7f8Qt0mi1fHAKAXMouFk7mbx1bPstLKajoskiy4d8ThtN2pWL+YE2Zu3pT5g=\n\
-----END CERTIFICATE-----\n";
    /// Its PKCS#8 private key: a test key, made for these tests and used nowhere else.
    const TEST_KEY: &str = "\
-----BEGIN PRIVATE KEY-----\n\
MIIEvgIBADANBgkqhkiG9w0BAQEFAASCBKgwggSkAgEAAoIBAQDh2PtyWXsJu0qM\n\
nxJeh0WcYnG1qNDbYCkWnUTVUI46KfwvNM15cDDBgs/7kDx953NlK6k3kvWAnu7v\n\
9kembD/Dm7mSupYCg8+LZYWLD/4Wn/BbpU0h4mYLkqxJXLsDrPha/fwpfE1mhYo4\n\
3Sy9UyLme8hV0kTe4EgjL81i40ENWJFv1Mwppf4puHJvQp6XtEqCZTEKwPj0IBS1\n\
xLRsdwCVYrbsoceXs+YfdvLOb2eSRNnP/Qn770W/HL9ySFXaqlwibL4UePifYBgy\n\
ZUJJMwwnra9K1WtjfqlivzOi+UPkYzLZwedPZoNyb1A00BKlU4WfGeFE3bZHxdOa\n\
K0vvKqHXAgMBAAECggEAGhJP2J/+xZ1S2k/ksXfhL8/ne4aM8b40kBFAqHVfrdQ5\n\
8gMg8zNh1Xzx4IMCkLA+0H+NTcaPw7TVNWtTUyFs7PpVnlwexBSOSXPDSk3i0Z7O\n\
Au5erJozmINqkx960U5O70YhrXJVhw/EaJMTvplRzpSciFe5LpdqjHFQvukoEc+f\n\
g4Dd6C3HNfZMqXU0UyBnRXenR3a5BUERUqS6gdYCJ2xf4BmH5G1QjYd89fGCYa+F\n\
rYMFQQjW52prlflMxj8DY8zZPA1G1h0DAIaLkftwyfGcIHchpv0Ydc10myRI4JWl\n\
Rb2j8p7A7WVApZXyUPjnWmMfJiG5OjGh6n72eQwYUQKBgQD+gIyYnOCJbkq/56Ae\n\
805H6vy6VKg+k3JxzNj2ZP/bNyZhtRFkO/Aejz7AFc2+VMkmKt/bWmeK/bQlgD34\n\
AJIESyq1R2uxDlDR/iGeKO1Rkpgdiq0K/tD8Ol/k9ZH3upoVsR3hl4tFW0PxznZy\n\
Tmpi9HlW19E534m0H72Z9bdRpwKBgQDjLUKSBgXaY8VzmYXHFFwvBl1j8bxVnAKI\n\
aF6IMOY4DIQxvS0BuIqCfR3fZd1+Bc5sQ1Dk7itwXxCfe0YMUXLAz+PhJXyTb0tv\n\
GIyo7huByhyN8PoZbmpS7r/VMkElDRchv2QhUi8S+eBu+AkhJVkGrDw6MBx2UbQg\n\
A+pn0YlUUQKBgQDoB38nbG9yHLHdwGlFjoGiI+WCY8h4NKm0gxSTn4V88Qz3K8PN\n\
ZLAIzIRjT/2iN16kg5ZQQF4CZEenoQHeZ3a4n2cymwjeBbU9nro7ngivxD0XQeV+\n\
Ds+uBfKDpjgMaX4tpKsfj7CT7R9HB/sJP+DSkx1FRcIlR14ecInGIjWeJQKBgFZt\n\
cKcnPXDRhlwtaxTLLSsCy+LrI9CaEuicdGJx4BQwxtY5d3bxI1jzirrkATkhsl/D\n\
2HHQHpyYvjU+a+7hybuLG9IbNeLNc7BncZQPSk29e9GQfUXRmQfGJxtQDDKxYTyI\n\
mOqIXrpkcDsniCmhENaWDi/BAAMPoGyRsMsgj5ORAoGBAKlid9CAUsMvUHaelyaW\n\
ThMVgIU+l2jmG1NWwioVwFA/QBUPFd1B2Bg13Vvh+fg67kyR9EEKa+BQHvJ6mmD+\n\
wDy3HSkMJJ/Wn5nJS+FSqGPkHKVkGG4S1TS+OYN9gMU+uRJUD9XPFZEr1bwY4e8b\n\
kDKHKELXne91xjJj/G1aVaZW\n\
-----END PRIVATE KEY-----\n";
    /// `openssl dgst -sha1 -sign` of [`V1_STRING_TO_SIGN`] with [`TEST_KEY`], base64.
    const V1_SIGNATURE: &str = "npEcjbNKzHX2VPks151vOL98s1eLcK2YLBeBAF3qYWaYaICMeHPrwUH+szF2wVnprzYjCWfKjsQhfnlpTFsBnbB541dIz/duxOf2JlrnyDooFKxmxoX5lfrpc7Dr5C9kJpe1LEBnLRaZuNxbyzfzjfZNm6F9rLdCJFIjpPmx3vAeGyrj0EILhMmM9TqZFDeIJFJsGewdbEukuvVrzxGOfJ/Hm907QFHnexT1kALyOeoRYJ+Fz8cBycrlsD8b9TT2dTDbTctDVJyVLSRhfM9sYiKkPR1cp95ZG1Bu1S7OA81a1NnYABoO632fEGcDeDLaC+ZTyKQQfvjrGXjhhyMqXA==";
    /// `openssl dgst -sha256 -sign` of the same string, base64.
    const V2_SIGNATURE: &str = "wsWoIXed8FS4ODkCkUTylKtiUUAbzSPCOSydMPtsr+4PjQcvOFb+rUM8pgRnHuaphoQLPppJS7EAqzoG82Ojkj0SgC6PDgQAne4ktwQb82I56ePf6y3GA7ftnJaMqNC0nKi1+AAy2z2Grltr8+85wxGPTkyVf3aH77QBZeW9O6n6L0spBjy+NcKPWusj5wQQ3O5JxqL5CRa954s78ymtfFycoceEI/wP8gQai4PpBuIUSwqqo4da/MlDY+HEvc5s70YtYFuV1+amdodCf5AwgKimgJIHSMThFOzf5rR1QAUINQQpmiZBSJfe0sbhf+FL0FgbbxCbFa35X1I6WT+sAQ==";

    const TOPIC: &str = "arn:aws:sns:eu-west-1:123456789012:pg-email-events";
    const PREFIX: &str = "https://sns.eu-west-1.amazonaws.com/";
    const CERT_URL: &str = "https://sns.eu-west-1.amazonaws.com/SimpleNotificationService-0000000000000000000000.pem";

    /// The Message of the known-answer notification.
    const V1_MESSAGE: &str = r#"{"eventType":"Delivery","mail":{"messageId":"0100018c-ses-1","timestamp":"2024-01-02T03:04:05.000Z","destination":["ann@example.net"],"tags":{"pg_email_id":["42"]}},"delivery":{"timestamp":"2024-01-02T03:04:06.500Z","recipients":["ann@example.net"],"smtpResponse":"250 2.6.0 Message received"}}"#;

    /// What SNS signs for that notification; made with printf for the openssl signatures.
    fn v1_string_to_sign() -> String {
        format!(
            "Message\n{V1_MESSAGE}\nMessageId\n22b80b92-fdea-4c2c-8f9d-bdfb0c7bf324\nTimestamp\n2024-01-02T03:04:07.000Z\n\
             TopicArn\n{TOPIC}\nType\nNotification\n"
        )
    }

    fn config(extra: &[(&str, &str)]) -> Config {
        let mut o: BTreeMap<String, String> = [("sns_topic_arn", TOPIC), ("region", "eu-west-1")]
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        o.extend(extra.iter().map(|(k, v)| (k.to_string(), v.to_string())));
        Config::from_options("ses", &o).unwrap().unwrap()
    }

    fn post(cfg: &Config, body: &Value, cert: Option<&str>) -> Result<Verified, Refused> {
        let body = serde_json::to_vec(body).unwrap();
        verify_any(cfg, &Request { headers: &[], body: &body, now: 0 }, cert.map(str::as_bytes))
    }

    fn known_answer(version: &str, signature: &str) -> Value {
        json!({
            "Type": "Notification",
            "MessageId": "22b80b92-fdea-4c2c-8f9d-bdfb0c7bf324",
            "TopicArn": TOPIC,
            "Message": V1_MESSAGE,
            "Timestamp": "2024-01-02T03:04:07.000Z",
            "SignatureVersion": version,
            "Signature": signature,
            "SigningCertURL": CERT_URL,
            "UnsubscribeURL": "https://sns.eu-west-1.amazonaws.com/?Action=Unsubscribe&SubscriptionArn=x"
        })
    }

    /// The fields of `envelope` SNS signs, signed with [`TEST_KEY`] (SignatureVersion 2).
    fn sign(mut envelope: Value) -> Value {
        let notification = envelope["Type"] == "Notification";
        let keys: &[&str] = if notification {
            &["Message", "MessageId", "Subject", "Timestamp", "TopicArn", "Type"]
        } else {
            &["Message", "MessageId", "SubscribeURL", "Timestamp", "Token", "TopicArn", "Type"]
        };
        let mut s = String::new();
        for k in keys {
            if let Some(v) = envelope[*k].as_str() {
                s.push_str(&format!("{k}\n{v}\n"));
            }
        }
        envelope["SignatureVersion"] = json!("2");
        envelope["Signature"] = json!(rsa_sign(&s));
        envelope
    }

    fn rsa_sign(s: &str) -> String {
        use base64::Engine;
        let der = super::super::pem_or_base64(TEST_KEY).unwrap();
        let pair = RsaKeyPair::from_pkcs8(&der).unwrap();
        let mut sig = vec![0; pair.public().modulus_len()];
        pair.sign(&RSA_PKCS1_SHA256, &SystemRandom::new(), s.as_bytes(), &mut sig).unwrap();
        base64::engine::general_purpose::STANDARD.encode(sig)
    }

    fn notification(message: &Value) -> Value {
        sign(json!({
            "Type": "Notification",
            "MessageId": "7f9e6c4a-0000-4000-8000-000000000001",
            "TopicArn": TOPIC,
            "Message": message.to_string(),
            "Timestamp": "2016-01-27T14:59:38.237Z",
            "SigningCertURL": CERT_URL,
        }))
    }

    #[test]
    fn the_known_answers_verify_with_sha1_and_sha256() {
        assert_eq!(rsa_sign(&v1_string_to_sign()), V2_SIGNATURE, "ring and openssl sign alike");
        let cfg = config(&[]);
        for (version, sig) in [("1", V1_SIGNATURE), ("2", V2_SIGNATURE)] {
            let body = known_answer(version, sig);
            assert_eq!(post(&cfg, &body, None), Ok(Verified::NeedCertificate(CERT_URL.into())));
            let e = one(post(&cfg, &body, Some(TEST_CERT)));
            well_formed(&e);
            assert_eq!(e.event, "delivered");
            assert_eq!(e.provider_event_id, "22b80b92-fdea-4c2c-8f9d-bdfb0c7bf324");
            assert_eq!(e.pg_email_id, Some(42));
            assert_eq!(e.provider_message_id.as_deref(), Some("0100018c-ses-1"));
            assert_eq!(e.recipient.as_deref(), Some("ann@example.net"));
            assert_eq!((e.smtp_code, e.enhanced_code.as_deref()), (Some(250), Some("2.6.0")));
            assert_eq!(e.at, Some(1_704_164_646.5));
            assert_eq!(e.payload, serde_json::from_str::<Value>(V1_MESSAGE).unwrap());
        }
        // The signature of one version does not pass as the other.
        assert_eq!(status(post(&cfg, &known_answer("2", V1_SIGNATURE), Some(TEST_CERT))), 403);
        assert_eq!(status(post(&cfg, &known_answer("1", V2_SIGNATURE), Some(TEST_CERT))), 403);
        assert_eq!(status(post(&cfg, &known_answer("3", V2_SIGNATURE), Some(TEST_CERT))), 403);
        // A pinned certificate needs no fetch.
        let pinned = config(&[("sns_cert_pem", TEST_CERT)]);
        assert_eq!(one(post(&pinned, &known_answer("1", V1_SIGNATURE), None)).event, "delivered");
    }

    #[test]
    fn the_string_to_sign_ends_with_a_newline() {
        // A signer that forgot the last newline (useSend's bug) makes a signature that fails.
        let s = v1_string_to_sign();
        let body = known_answer("2", &rsa_sign(s.strip_suffix('\n').unwrap()));
        assert_eq!(status(post(&config(&[]), &body, Some(TEST_CERT))), 403);
    }

    #[test]
    fn topic_urls_and_tampering_are_refused() {
        let cfg = config(&[]);
        let good = known_answer("2", V2_SIGNATURE);
        assert!(post(&cfg, &good, Some(TEST_CERT)).is_ok());
        let with = |k: &str, v: Value| {
            let mut b = good.clone();
            b[k] = v;
            b
        };
        let cases = [
            (with("TopicArn", json!("arn:aws:sns:eu-west-1:999999999999:theirs")), 403, "another topic"),
            (with("Message", json!(V1_MESSAGE.replace("250", "251"))), 403, "tampered message"),
            (with("Timestamp", json!("2024-01-02T03:04:08.000Z")), 403, "tampered timestamp"),
            (with("Subject", json!("added")), 403, "added subject"),
            (
                with("SigningCertURL", json!("https://sns.eu-west-1.amazonaws.com.evil.example/x.pem")),
                403,
                "other host",
            ),
            (
                with("SigningCertURL", json!("https://s3.amazonaws.com/bucket/SimpleNotificationService-x.pem")),
                403,
                "s3",
            ),
            (with("SigningCertURL", json!("https://sns.eu-west-1.amazonaws.com/cert.txt")), 403, "not .pem"),
            (with("SigningCertURL", json!("https://sns.eu-west-1.amazonaws.com/x.pem?y")), 403, "query"),
            (with("SigningCertURL", json!("http://sns.eu-west-1.amazonaws.com/x.pem")), 403, "http"),
            (with("SigningCertURL", json!(null)), 403, "no cert URL"),
            (with("Signature", json!("!!!")), 403, "not base64"),
            (with("SignatureVersion", json!(2)), 403, "version not a string"),
            (with("Type", json!("Surprise")), 400, "unknown type"),
            (with("MessageId", json!(null)), 400, "no message id"),
        ];
        for (body, want, what) in cases {
            assert_eq!(status(post(&cfg, &body, Some(TEST_CERT))), want, "{what}");
        }
        // The topic is checked before any certificate is asked for.
        let other = with("TopicArn", json!("arn:aws:sns:eu-west-1:999999999999:theirs"));
        assert_eq!(status(post(&cfg, &other, None)), 403);
        // A certificate that is not the signer's, or not a certificate.
        let other_cert = super::super::pem_or_base64(TEST_CERT).unwrap();
        let mut broken = other_cert.clone();
        broken.truncate(100);
        assert_eq!(status(post(&cfg, &good, Some(&to_pem(&broken)))), 403);
        assert_eq!(status(post(&cfg, &good, Some("garbage"))), 403);
    }

    #[test]
    fn subscription_confirmations() {
        let subscribe = "https://sns.eu-west-1.amazonaws.com/?Action=ConfirmSubscription&TopicArn=arn:aws:sns:eu-west-1:123456789012:pg-email-events&Token=2336412f37";
        let confirm = |kind: &str, url: &str| {
            sign(json!({
                "Type": kind, "MessageId": "165545c9-2a5c-472c-8df2-7ff2be2b3b1b", "Token": "2336412f37",
                "TopicArn": TOPIC, "Message": "You have chosen to subscribe to the topic. To confirm the subscription, visit the SubscribeURL included in this message.",
                "SubscribeURL": url, "Timestamp": "2012-04-26T20:45:04.751Z", "SigningCertURL": CERT_URL,
            }))
        };
        let body = confirm("SubscriptionConfirmation", subscribe);
        assert_eq!(
            post(&config(&[]), &body, Some(TEST_CERT)),
            Ok(Verified::Confirm { subscribe_url: subscribe.into(), payload: body.clone() })
        );
        let evil = confirm("SubscriptionConfirmation", "https://internal.example/admin?drop=1");
        assert_eq!(status(post(&config(&[]), &evil, Some(TEST_CERT))), 403, "never fetched");
        let unsub = confirm("UnsubscribeConfirmation", subscribe);
        assert!(matches!(post(&config(&[]), &unsub, Some(TEST_CERT)), Ok(Verified::Ignore(_))));
        let mut no_token = body.clone();
        no_token.as_object_mut().unwrap().remove("Token");
        assert_eq!(status(post(&config(&[]), &no_token, Some(TEST_CERT))), 400);
    }

    #[test]
    fn a_bounce_with_two_recipients_is_two_events() {
        // The shape of SES's documented bounce event.
        let ses = json!({
            "eventType": "Bounce",
            "bounce": {
                "bounceType": "Permanent", "bounceSubType": "General",
                "bouncedRecipients": [
                    {"emailAddress": "recipient@example.com", "action": "failed", "status": "5.1.1",
                     "diagnosticCode": "smtp; 550 5.1.1 user unknown"},
                    {"emailAddress": "other@example.com", "action": "failed", "status": "5.7.1",
                     "diagnosticCode": "smtp; 550 5.7.1 rejected by policy"}
                ],
                "timestamp": "2017-08-05T00:41:02.669Z", "feedbackId": "01000157c44f053b-61b59c11-9236-11e6-8f96-7be8aexample-000000",
                "reportingMTA": "dsn; mta.example.com"
            },
            "mail": {
                "timestamp": "2017-08-05T00:40:02.012Z", "source": "Sender Name <sender@example.com>",
                "messageId": "EXAMPLE7c191be45-e9aedb9a-02f9-4d12-a87d-dd0099a07f8a-000000",
                "destination": ["recipient@example.com", "other@example.com"],
                "commonHeaders": {"from": ["Sender Name <sender@example.com>"], "to": ["recipient@example.com"],
                                  "messageId": "EXAMPLE7c191be45-e9aedb9a-02f9-4d12-a87d-dd0099a07f8a-000000", "subject": "Message sent from Amazon SES"},
                "tags": {"ses:configuration-set": ["ConfigSet"], "pg_email_id": ["1001"]}
            }
        });
        let e = events(post(&config(&[]), &notification(&ses), Some(TEST_CERT)));
        assert_eq!(e.len(), 2);
        e.iter().for_each(well_formed);
        assert_eq!(e[0].provider_event_id, "7f9e6c4a-0000-4000-8000-000000000001:recipient@example.com");
        assert_eq!(e[1].provider_event_id, "7f9e6c4a-0000-4000-8000-000000000001:other@example.com");
        assert_eq!(
            (e[0].event, e[0].bounce_type, e[0].enhanced_code.as_deref()),
            ("bounced", Some("hard"), Some("5.1.1"))
        );
        assert_eq!((e[1].bounce_type, e[1].smtp_code), (Some("block"), Some(550)));
        assert_eq!(e[0].provider_code.as_deref(), Some("General"));
        assert_eq!(e[0].pg_email_id, Some(1001));
        assert_eq!(
            e[0].rfc_message_id.as_deref(),
            Some("<EXAMPLE7c191be45-e9aedb9a-02f9-4d12-a87d-dd0099a07f8a-000000>")
        );
        assert_eq!(e[0].response.as_deref(), Some("smtp; 550 5.1.1 user unknown"));
        assert_eq!(e[0].at, Some(1_501_893_662.669));
        assert_eq!(e[0].payload, ses);
    }

    #[test]
    fn complaints_opens_clicks_delays_and_others() {
        let mail = json!({"messageId": "m-1", "destination": ["ann@example.net"], "tags": {"pg_email_id": ["5"]}});
        let post_ses = |ses: Value| events(post(&config(&[]), &notification(&ses), Some(TEST_CERT)));

        let c = post_ses(json!({"notificationType": "Complaint", "mail": mail,
            "complaint": {"complainedRecipients": [{"emailAddress": "ann@example.net"}], "timestamp": "2017-08-05T00:41:02.669Z",
                          "feedbackId": "x", "userAgent": "Mozilla/5.0", "complaintFeedbackType": "abuse"}}));
        assert_eq!(
            (c[0].event, c[0].recipient.as_deref(), c[0].provider_code.as_deref()),
            ("complained", Some("ann@example.net"), Some("abuse"))
        );
        assert_eq!(c[0].provider_event_id, "7f9e6c4a-0000-4000-8000-000000000001");

        let o = post_ses(json!({"eventType": "Open", "mail": mail,
            "open": {"ipAddress": "192.0.2.1", "timestamp": "2017-08-09T22:00:19.652Z",
                     "userAgent": "Mozilla/5.0 (iPhone; CPU iPhone OS 10_3_3 like Mac OS X)"}}));
        assert_eq!(
            (o[0].event, o[0].ip.as_deref(), o[0].recipient.as_deref()),
            ("opened", Some("192.0.2.1"), Some("ann@example.net"))
        );
        assert!(o[0].user_agent.is_some() && !o[0].machine);

        let k = post_ses(json!({"eventType": "Click", "mail": mail,
            "click": {"ipAddress": "192.0.2.1", "link": "http://docs.aws.amazon.com/ses/latest/DeveloperGuide/send-email-smtp.html",
                      "linkTags": {"samplekey0": ["samplevalue0"]}, "timestamp": "2017-08-09T23:51:25.570Z",
                      "userAgent": "Mozilla/5.0 (via ggpht.com GoogleImageProxy)"}}));
        assert_eq!(k[0].event, "clicked");
        assert_eq!(
            k[0].url.as_deref(),
            Some("http://docs.aws.amazon.com/ses/latest/DeveloperGuide/send-email-smtp.html")
        );
        assert!(k[0].machine);

        let d = post_ses(json!({"eventType": "DeliveryDelay", "mail": mail,
            "deliveryDelay": {"timestamp": "2020-06-16T00:15:40.641Z", "delayType": "TransientCommunicationFailure",
                "expirationTime": "2020-06-16T00:25:40.914Z",
                "delayedRecipients": [{"emailAddress": "ann@example.net", "status": "4.4.1", "diagnosticCode": "smtp; 421 4.4.1 Unable to connect"}]}}));
        assert_eq!((d[0].event, d[0].enhanced_code.as_deref(), d[0].smtp_code), ("deferred", Some("4.4.1"), Some(421)));
        assert_eq!(d[0].provider_code.as_deref(), Some("TransientCommunicationFailure"));

        let t = post_ses(json!({"eventType": "Bounce", "mail": mail,
            "bounce": {"bounceType": "Transient", "bounceSubType": "MailboxFull", "bouncedRecipients": [{"emailAddress": "ann@example.net"}]}}));
        assert_eq!(t[0].bounce_type, Some("soft"));
        let u = post_ses(
            json!({"eventType": "Bounce", "mail": mail, "bounce": {"bounceType": "Undetermined", "bouncedRecipients": []}}),
        );
        assert_eq!((u[0].bounce_type, u[0].recipient.as_deref()), (Some("soft"), None));

        for kind in ["Send", "Reject", "Rendering Failure", "Subscription"] {
            let x = post_ses(json!({"eventType": kind, "mail": mail}));
            assert_eq!((x.len(), x[0].event, x[0].pg_email_id), (1, "unknown", Some(5)), "{kind}");
        }
        // Wrong types are read as absent.
        let w =
            post_ses(json!({"eventType": "Delivery", "mail": [], "delivery": {"recipients": [1, "b@example.net"]}}));
        assert_eq!(w.len(), 2);
        assert_eq!((w[0].recipient.as_deref(), w[1].recipient.as_deref()), (None, Some("b@example.net")));
        assert_eq!(w[0].provider_event_id, "7f9e6c4a-0000-4000-8000-000000000001:0");
    }

    #[test]
    fn the_setup_notifications_are_ignored() {
        let text = sign(json!({
            "Type": "Notification", "MessageId": "a", "TopicArn": TOPIC, "Subject": "Amazon SES Email Event Notification",
            "Message": "Successfully validated SNS topic for Amazon SES event publishing.",
            "Timestamp": "2016-01-27T14:59:38.237Z", "SigningCertURL": CERT_URL,
        }));
        assert!(matches!(post(&config(&[]), &text, Some(TEST_CERT)), Ok(Verified::Ignore(_))));
        let other = sign(json!({
            "Type": "Notification", "MessageId": "b", "TopicArn": TOPIC, "Message": "hello from someone's publish",
            "Timestamp": "2016-01-27T14:59:38.237Z", "SigningCertURL": CERT_URL,
        }));
        let e = one(post(&config(&[]), &other, Some(TEST_CERT)));
        assert_eq!((e.event, e.provider_event_id.as_str()), ("unknown", "b"));
    }

    #[test]
    fn hostile_bodies_are_refused() {
        let valid = serde_json::to_vec(&known_answer("1", V1_SIGNATURE)).unwrap();
        for body in hostile_bodies(&valid) {
            let got =
                verify_any(&config(&[]), &Request { headers: &[], body: &body, now: 0 }, Some(TEST_CERT.as_bytes()));
            assert!(matches!(status(got), 400 | 403));
        }
        // Authentic, with a Message nested past serde's limit: kept as an unknown event.
        let deep = format!("{}{}", "[".repeat(1000), "]".repeat(1000));
        let body = sign(json!({"Type": "Notification", "MessageId": "c", "TopicArn": TOPIC, "Message": deep,
            "Timestamp": "2016-01-27T14:59:38.237Z", "SigningCertURL": CERT_URL}));
        assert_eq!(one(post(&config(&[]), &body, Some(TEST_CERT))).event, "unknown");
    }

    #[test]
    fn options() {
        let o = |pairs: &[(&str, &str)]| -> BTreeMap<String, String> {
            pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
        };
        assert_eq!(super::config(&o(&[("region", "eu-west-1")])), Ok(None));
        let Ok(Some(Config::Ses { url_prefix, cert_pem, .. })) =
            super::config(&o(&[("sns_topic_arn", TOPIC), ("region", "eu-west-1")]))
        else {
            panic!()
        };
        assert_eq!((url_prefix.as_str(), cert_pem), (PREFIX, None));
        let Ok(Some(Config::Ses { url_prefix, .. })) =
            super::config(&o(&[("sns_topic_arn", TOPIC), ("region", "cn-north-1")]))
        else {
            panic!()
        };
        assert_eq!(url_prefix, "https://sns.cn-north-1.amazonaws.com.cn/");
        let local = super::config(&o(&[("sns_topic_arn", TOPIC), ("sns_url_prefix", "http://127.0.0.1:9000/sns/")]));
        assert!(
            matches!(local, Ok(Some(Config::Ses { url_prefix, .. })) if url_prefix == "http://127.0.0.1:9000/sns/")
        );
        // A pinned certificate, as a form-decoded query value: `+` became a space.
        let mangled = TEST_CERT.replace('+', " ");
        let Ok(Some(Config::Ses { cert_pem: Some(pem), .. })) =
            super::config(&o(&[("sns_topic_arn", TOPIC), ("sns_cert_pem", &mangled)]))
        else {
            panic!()
        };
        assert_eq!(super::super::pem_or_base64(&pem), super::super::pem_or_base64(TEST_CERT));
        for (options, want) in [
            (o(&[("sns_url_prefix", PREFIX)]), "option sns_url_prefix needs sns_topic_arn"),
            (o(&[("sns_cert_pem", TEST_CERT)]), "option sns_cert_pem needs sns_topic_arn"),
            (o(&[("sns_topic_arn", "topic")]), "option sns_topic_arn must be"),
            (o(&[("sns_topic_arn", "arn:a b")]), "option sns_topic_arn must be"),
            (
                o(&[("sns_topic_arn", TOPIC), ("sns_url_prefix", "https://sns.eu-west-1.amazonaws.com")]),
                "option sns_url_prefix must be",
            ),
            (o(&[("sns_topic_arn", TOPIC), ("sns_url_prefix", "ftp://x/")]), "option sns_url_prefix must be"),
            (o(&[("sns_topic_arn", TOPIC), ("sns_url_prefix", "https:///")]), "option sns_url_prefix must be"),
            (o(&[("sns_topic_arn", TOPIC), ("sns_url_prefix", "https://user@evil/")]), "option sns_url_prefix must be"),
            (o(&[("sns_topic_arn", TOPIC), ("sns_cert_pem", "garbage")]), "option sns_cert_pem must be"),
            (o(&[("sns_topic_arn", TOPIC), ("sns_cert_pem", TEST_KEY)]), "option sns_cert_pem must be"),
        ] {
            let e = super::config(&options).unwrap_err();
            assert!(e.starts_with(want), "{options:?}: {e}");
        }
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig { cases: 128, ..Default::default() })]

        /// Random SES events in signed notifications: well-formed events, never a panic.
        #[test]
        fn random_signed_events(ses in super::super::testing::json_value(), kind in proptest::sample::select(
            &["Bounce", "Complaint", "Delivery", "DeliveryDelay", "Open", "Click", "Send"][..]
        )) {
            let mut ses = ses;
            if let Some(o) = ses.as_object_mut() {
                o.insert("eventType".into(), json!(kind));
            }
            let got = post(&config(&[]), &notification(&ses), Some(TEST_CERT));
            super::super::testing::sane(&got);
            proptest::prop_assert!(got.is_ok(), "{got:?}");
        }
    }
}
