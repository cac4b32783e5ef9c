//! Amazon SES v2 SendEmail: `POST /v2/email/outbound-emails`, signed with AWS Signature Version 4
//! by the `aws-sigv4` crate. The message goes as `Content.Raw`, our own MIME bytes, so it is
//! byte-for-byte what every other transport sends. DSN:
//! `ses+api://ACCESS_KEY_ID:SECRET_KEY@default?region=eu-west-1`, with `session_token=` for
//! temporary credentials and `configuration_set=`. The access key id is not a secret:
//! `email.transports` shows it.

use std::time::SystemTime;

use aws_credential_types::Credentials;
use aws_sigv4::http_request::{sign, SignableBody, SignableRequest, SigningSettings};
use aws_sigv4::sign::v4;
use lettre::message::Mailbox;
use serde_json::{json, Map, Value};

use super::super::{Delivery, Outgoing};
use super::common::{accepted, b64, classify, json_body, named_in, or_body, refused, tag_pairs};
use super::{Answer, Body, Config, Fields, Options, Provider, Request, SecretIn, Userinfo};

pub struct Ses;

const DEFAULT_REGION: &str = "us-east-1";

impl Provider for Ses {
    fn name(&self) -> &'static str {
        "ses"
    }

    fn schemes(&self) -> &'static [&'static str] {
        &["ses+api", "ses"]
    }

    fn options(&self) -> &'static [&'static str] {
        &["region", "session_token", "configuration_set", "sns_topic_arn", "sns_url_prefix", "sns_cert_pem"]
    }

    fn secret_in(&self) -> SecretIn {
        SecretIn::Password
    }

    fn secret_options(&self) -> &'static [&'static str] {
        &["session_token"]
    }

    /// Also fills in `region=us-east-1` when the DSN names none, so the stored DSN shows it.
    fn check_dsn(&self, u: Userinfo<'_>, options: &mut Options) -> Result<(), String> {
        if u.user.is_none() || u.password.unwrap_or("").is_empty() {
            return Err("an ses DSN needs the access key id and the secret key, as in ses+api://ACCESS_KEY:SECRET_KEY@default?region=eu-west-1".into());
        }
        let region = options.entry("region".into()).or_insert_with(|| DEFAULT_REGION.into());
        if region.is_empty() || !region.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-') {
            return Err(format!("option region=\"{region}\" is not an AWS region name such as eu-west-1"));
        }
        // The SNS topic events come from, and where its certificates may be fetched.
        crate::webhook::Config::from_options(self.name(), options).map(|_| ())
    }

    fn default_host(&self, options: &Options) -> String {
        format!("email.{}.amazonaws.com", options.get("region").map_or(DEFAULT_REGION, String::as_str))
    }

    fn request(&self, c: &Config, m: &Outgoing, f: &Fields) -> Result<Request, String> {
        request(c, m, f, SystemTime::now())
    }

    fn answer(&self, a: &Answer<'_>, f: &Fields) -> Delivery {
        answer(a, f)
    }
}

/// The request, signed as at `now`.
fn request(c: &Config, m: &Outgoing, f: &Fields, now: SystemTime) -> Result<Request, String> {
    let from = f.from.as_ref().ok_or("no sender")?;
    let emails = |v: &[Mailbox]| v.iter().map(|m| m.email.to_string()).collect::<Vec<_>>();
    let mut dest = Map::new();
    dest.insert("ToAddresses".into(), json!(emails(&f.to)));
    if !f.cc.is_empty() {
        dest.insert("CcAddresses".into(), json!(emails(&f.cc)));
    }
    if !f.bcc.is_empty() {
        dest.insert("BccAddresses".into(), json!(emails(&f.bcc)));
    }
    let mut body = Map::new();
    body.insert("FromEmailAddress".into(), json!(from.to_string()));
    body.insert("Destination".into(), dest.into());
    if !f.reply_to.is_empty() {
        body.insert("ReplyToAddresses".into(), json!(f.reply_to.iter().map(|m| m.to_string()).collect::<Vec<_>>()));
    }
    body.insert("Content".into(), json!({"Raw": {"Data": b64(&m.raw)}}));
    // Tags and metadata, then our message id, which wins over a user's `pg_email_id`.
    let tags: Vec<Value> = tag_pairs(f, m.id).into_iter().map(|(n, v)| json!({"Name": n, "Value": v})).collect();
    body.insert("EmailTags".into(), tags.into());
    if let Some(cs) = c.options.get("configuration_set") {
        body.insert("ConfigurationSetName".into(), json!(cs));
    }
    let bytes = json_body(&Value::Object(body))?;

    let path = "/v2/email/outbound-emails";
    let url = format!("{}{path}", c.base);
    let token = c.options.get("session_token").cloned();
    let identity =
        Credentials::new(c.key.clone(), c.secret.clone().unwrap_or_default(), token, None, "pg_email").into();
    let region = c.options.get("region").cloned().unwrap_or_else(|| DEFAULT_REGION.into());
    let params = v4::SigningParams::builder()
        .identity(&identity)
        .region(&region)
        .name("ses")
        .time(now)
        .settings(SigningSettings::default())
        .build()
        .map_err(|e| format!("SigV4 parameters: {e}"))?
        .into();
    let to_sign = [("host", c.host_header.as_str()), ("content-type", "application/json")];
    let signable = SignableRequest::new("POST", url.as_str(), to_sign.iter().copied(), SignableBody::Bytes(&bytes))
        .map_err(|e| format!("SigV4 request: {e}"))?;
    let (instructions, _) = sign(signable, &params).map_err(|e| format!("SigV4 signing failed: {e}"))?.into_parts();
    let (signed_headers, _) = instructions.into_parts();
    let headers = signed_headers.iter().map(|h| (h.name().to_string(), h.value().to_string())).collect();
    Ok(Request { path: path.into(), headers, body: Body::Json(bytes) })
}

/// `200 {"MessageId"}`; errors name their type in `x-amzn-ErrorType` (`MessageRejected`,
/// `TooManyRequestsException`...) with `{"message"}`. A `MessageRejected` naming recipients refuses
/// them; `TooManyRequestsException` is a rate limit whatever its status.
fn answer(a: &Answer<'_>, f: &Fields) -> Delivery {
    let status = a.status;
    if status == 200 {
        let id = a.json.get("MessageId").and_then(Value::as_str).map(str::to_string);
        return accepted(status, id, "accepted");
    }
    // "MessageRejected:http://internal.amazon.com/coral/..." → "MessageRejected"
    let kind = a
        .headers
        .get("x-amzn-errortype")
        .and_then(|v| v.to_str().ok())
        .map(|s| s.split(':').next().unwrap_or(s).to_string());
    let message =
        a.json.get("message").or_else(|| a.json.get("Message")).and_then(Value::as_str).unwrap_or("").to_string();
    let mut rejected = Vec::new();
    if kind.as_deref() == Some("MessageRejected") {
        for addr in named_in(f, &message) {
            rejected.push(refused(&addr, kind.as_deref(), &format!("HTTP {status}: MessageRejected: {message}")));
        }
    }
    let status = if kind.as_deref() == Some("TooManyRequestsException") { 429 } else { status };
    classify(status, a.headers, kind, or_body(message, &a.json), rejected)
}

#[cfg(test)]
mod tests {
    use std::time::{Duration, UNIX_EPOCH};

    use serde_json::json;

    use super::super::testing::{answer, config, error_reply, fields, header, json_of, outgoing, refusal};
    use super::*;

    /// 2024-01-02T03:04:05Z
    fn at() -> SystemTime {
        UNIX_EPOCH + Duration::from_secs(1_704_164_645)
    }

    fn config_eu(extra: &[(&str, &str)]) -> Config {
        let mut options = vec![("region", "eu-west-1")];
        options.extend_from_slice(extra);
        config("AKIDEXAMPLE", Some("wJalrXUtnFEMI/K7MDENG"), &options)
    }

    #[test]
    fn request_is_signed_and_carries_the_raw_message() {
        let r = request(&config_eu(&[]), &outgoing(), &fields(), at()).unwrap();
        assert_eq!(r.path, "/v2/email/outbound-emails");
        let auth = header(&r, "authorization").unwrap();
        assert!(
            auth.starts_with(
                "AWS4-HMAC-SHA256 Credential=AKIDEXAMPLE/20240102/eu-west-1/ses/aws4_request, SignedHeaders="
            ),
            "{auth}"
        );
        assert!(!auth.contains("wJalrXUtnFEMI"), "{auth}");
        assert_eq!(header(&r, "x-amz-date"), Some("20240102T030405Z"));
        assert_eq!(header(&r, "x-amz-security-token"), None);
        assert_eq!(
            json_of(&r),
            json!({
                "FromEmailAddress": "Shop <shop@example.org>",
                "Destination": {"ToAddresses": ["ann@example.net", "bob@example.net"], "CcAddresses": ["carol@example.net"]},
                "ReplyToAddresses": ["help@example.org"],
                // base64 of testing::RAW, the MIME bytes
                "Content": {"Raw": {"Data": "RnJvbTogc2hvcEBleGFtcGxlLm9yZw0KU3ViamVjdDogWW91ciBvcmRlcg0KDQpUaGFua3MNCg=="}},
                "EmailTags": [
                    {"Name": "welcome", "Value": "true"},
                    {"Name": "n", "Value": "7"},
                    {"Name": "order", "Value": "42"},
                    {"Name": "pg_email_id", "Value": "1001"},
                ],
            })
        );
        // The whole value, checked against botocore's SigV4Auth signing the same body at the same instant.
        assert_eq!(
            auth,
            "AWS4-HMAC-SHA256 Credential=AKIDEXAMPLE/20240102/eu-west-1/ses/aws4_request, \
             SignedHeaders=content-type;host;x-amz-date, \
             Signature=ffb9f80f062b34304babc9f4035838888934311f0dd3915a941c38db575eda10"
        );
    }

    #[test]
    fn our_message_id_goes_in_email_tags_and_wins() {
        let mut f = fields();
        f.metadata.insert("pg_email_id".into(), json!(5));
        let r = request(&config_eu(&[]), &outgoing(), &f, at()).unwrap();
        let tags = json!([
            {"Name": "welcome", "Value": "true"},
            {"Name": "n", "Value": "7"},
            {"Name": "order", "Value": "42"},
            {"Name": "pg_email_id", "Value": "1001"},
        ]);
        assert_eq!(json_of(&r)["EmailTags"], tags);
    }

    #[test]
    fn temporary_credentials_and_configuration_sets() {
        let c = config_eu(&[("session_token", "FQoGZXIvYXdz"), ("configuration_set", "transactional")]);
        let r = request(&c, &outgoing(), &fields(), at()).unwrap();
        assert_eq!(header(&r, "x-amz-security-token"), Some("FQoGZXIvYXdz"));
        assert_eq!(json_of(&r)["ConfigurationSetName"], "transactional");
    }

    #[test]
    fn region_defaults_to_us_east_1() {
        let mut options = Options::new();
        let u = Userinfo { scheme: "ses+api", user: Some("AKID"), password: Some("secret") };
        assert_eq!(Ses.check_dsn(u, &mut options), Ok(()));
        assert_eq!(options.get("region").map(String::as_str), Some("us-east-1"));
        assert_eq!(Ses.default_host(&options), "email.us-east-1.amazonaws.com");
    }

    #[test]
    fn success_carries_the_message_id() {
        let d = answer(&Ses, 200, &[], r#"{"MessageId":"0100018c-ses-id"}"#);
        assert_eq!(d, accepted(200, Some("0100018c-ses-id".into()), "accepted"));
    }

    #[test]
    fn throttling_is_retried_whatever_the_status() {
        let h = [("x-amzn-errortype", "TooManyRequestsException:http://internal.amazon.com/"), ("retry-after", "4")];
        let d = answer(&Ses, 400, &h, r#"{"message":"Maximum sending rate exceeded."}"#);
        let reply = error_reply(429, Some("TooManyRequestsException"), "HTTP 429: Maximum sending rate exceeded.");
        assert_eq!(d, Delivery::Transient { reply, retry_after: Some(Duration::from_secs(4)), rejected: vec![] });
        let h = [("x-amzn-errortype", "InternalServiceErrorException")];
        let d = answer(&Ses, 500, &h, r#"{"message":"Internal error"}"#);
        let reply = error_reply(500, Some("InternalServiceErrorException"), "HTTP 500: Internal error");
        assert_eq!(d, Delivery::Transient { reply, retry_after: None, rejected: vec![] });
    }

    #[test]
    fn other_errors_are_permanent_with_the_error_type() {
        let h = [("x-amzn-errortype", "MailFromDomainNotVerifiedException")];
        let d = answer(&Ses, 400, &h, r#"{"message":"Domain not verified"}"#);
        let reply = error_reply(400, Some("MailFromDomainNotVerifiedException"), "HTTP 400: Domain not verified");
        assert_eq!(d, Delivery::Permanent { reply, rejected: vec![] });
        // MessageRejected about the sender names no recipient: the whole message fails.
        let h = [("x-amzn-errortype", "MessageRejected")];
        let d = answer(&Ses, 400, &h, r#"{"message":"Email address is not verified: shop@example.org"}"#);
        let reply =
            error_reply(400, Some("MessageRejected"), "HTTP 400: Email address is not verified: shop@example.org");
        assert_eq!(d, Delivery::Permanent { reply, rejected: vec![] });
    }

    #[test]
    fn message_rejected_naming_recipients_refuses_them() {
        let message = "Email address is not verified. The following identities failed the check: bob@example.net";
        let h = [("x-amzn-errortype", "MessageRejected")];
        let d = answer(&Ses, 400, &h, &json!({ "message": message }).to_string());
        let bob = refusal("bob@example.net", Some("MessageRejected"), &format!("HTTP 400: MessageRejected: {message}"));
        let reply = error_reply(400, Some("MessageRejected"), &format!("HTTP 400: {message}"));
        // Only one of three refused: the others are retried.
        assert_eq!(d, Delivery::Transient { reply, retry_after: None, rejected: vec![bob] });
    }
}
