//! Amazon SES v2 SendEmail: `POST /v2/email/outbound-emails`, signed with AWS Signature
//! Version 4 by the `aws-sigv4` crate. The message goes as `Content.Raw`, our own MIME bytes, so
//! it is byte-for-byte what every other transport sends.

use std::time::SystemTime;

use aws_credential_types::Credentials;
use aws_sigv4::http_request::{sign, SignableBody, SignableRequest, SigningSettings};
use aws_sigv4::sign::v4;
use reqwest::header::HeaderMap;
use serde_json::{json, Map, Value};

use super::super::http::{classify, named_in, refused, Body, Config, Fields, Request};
use super::super::{Delivery, Outgoing};
use super::{accepted, b64, json_body, tag_safe};

pub fn request(c: &Config, m: &Outgoing, f: &Fields) -> Result<Request, String> {
    let from = f.from.as_ref().ok_or("no sender")?;
    let emails = |v: &[lettre::message::Mailbox]| v.iter().map(|m| m.email.to_string()).collect::<Vec<_>>();
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
    let mut tags: Vec<Value> = f.tags.iter().map(|t| json!({"Name": tag_safe(t), "Value": "true"})).collect();
    tags.extend(f.metadata_strings().iter().map(|(k, v)| json!({"Name": tag_safe(k), "Value": tag_safe(v)})));
    if !tags.is_empty() {
        body.insert("EmailTags".into(), tags.into());
    }
    if let Some(cs) = c.options.get("configuration_set") {
        body.insert("ConfigurationSetName".into(), json!(cs));
    }
    let bytes = json_body(&Value::Object(body))?;

    let path = "/v2/email/outbound-emails";
    let url = format!("{}{path}", c.base);
    let token = c.options.get("session_token").cloned();
    let identity = Credentials::new(c.key.clone(), c.secret.clone().unwrap_or_default(), token, None, "pg_email").into();
    let region = c.options.get("region").cloned().unwrap_or_else(|| "us-east-1".into());
    let params = v4::SigningParams::builder()
        .identity(&identity)
        .region(&region)
        .name("ses")
        .time(SystemTime::now())
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

pub fn answer(status: u16, headers: &HeaderMap, json: &Value, f: &Fields) -> Delivery {
    if status == 200 {
        let id = json.get("MessageId").and_then(Value::as_str).map(str::to_string);
        return accepted(status, id, "accepted");
    }
    let kind = headers
        .get("x-amzn-errortype")
        .and_then(|v| v.to_str().ok())
        .map(|s| s.split(':').next().unwrap_or(s).to_string());
    let message = json.get("message").or_else(|| json.get("Message")).and_then(Value::as_str).unwrap_or("").to_string();
    let mut rejected = Vec::new();
    if kind.as_deref() == Some("MessageRejected") {
        for a in named_in(f, &message) {
            rejected.push(refused(&a, &format!("HTTP {status}: MessageRejected: {message}")));
        }
    }
    let status = if kind.as_deref() == Some("TooManyRequestsException") { 429 } else { status };
    classify(status, headers, kind, if message.is_empty() { json.to_string() } else { message }, rejected)
}
