//! Resend: `POST /emails`, Bearer key, an `Idempotency-Key` derived from the message so that a
//! retry after a lost answer is not sent twice.

use reqwest::header::HeaderMap;
use serde_json::{json, Map, Value};

use super::super::http::{classify, named_in, refused, Body, Config, Fields, Request};
use super::super::Delivery;
use super::{accepted, b64, json_body, tag_safe};

pub fn idempotency_key(f: &Fields) -> String {
    // Same message and same recipients → same key; a retry for fewer recipients gets a new one.
    let mut rcpts: Vec<String> = f.all_recipients().map(|m| m.email.to_string().to_lowercase()).collect();
    rcpts.sort();
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in rcpts.join(",").bytes() {
        h = (h ^ b as u64).wrapping_mul(0x100_0000_01b3);
    }
    let id: String = f.message_id.trim_matches(|c| c == '<' || c == '>').chars().take(200).collect();
    format!("{id}-{h:016x}")
}

pub fn request(c: &Config, f: &Fields) -> Result<Request, String> {
    let from = f.from.as_ref().ok_or("no sender")?;
    let s = |v: &[lettre::message::Mailbox]| v.iter().map(|m| m.to_string()).collect::<Vec<_>>();
    let mut b = Map::new();
    b.insert("from".into(), json!(from.to_string()));
    b.insert("to".into(), json!(s(&f.to)));
    if !f.cc.is_empty() {
        b.insert("cc".into(), json!(s(&f.cc)));
    }
    if !f.bcc.is_empty() {
        b.insert("bcc".into(), json!(s(&f.bcc)));
    }
    if !f.reply_to.is_empty() {
        b.insert("reply_to".into(), json!(s(&f.reply_to)));
    }
    b.insert("subject".into(), json!(f.subject));
    if let Some(h) = &f.html {
        b.insert("html".into(), json!(h));
    }
    if let Some(t) = &f.text {
        b.insert("text".into(), json!(t));
    }
    let mut headers: Map<String, Value> = f.headers.iter().map(|(k, v)| (k.clone(), json!(v))).collect();
    headers.insert("Message-ID".into(), json!(f.message_id));
    b.insert("headers".into(), headers.into());
    if !f.attachments.is_empty() {
        let atts: Vec<Value> = f
            .attachments
            .iter()
            .map(|a| {
                let mut o = json!({"content": b64(&a.content), "filename": a.filename, "content_type": a.content_type});
                if let (Some(cid), Some(m)) = (&a.content_id, o.as_object_mut()) {
                    m.insert("content_id".into(), json!(cid));
                }
                o
            })
            .collect();
        b.insert("attachments".into(), atts.into());
    }
    let mut tags: Vec<Value> = f.tags.iter().map(|t| json!({"name": tag_safe(t), "value": "true"})).collect();
    tags.extend(f.metadata_strings().iter().map(|(k, v)| json!({"name": tag_safe(k), "value": tag_safe(v)})));
    if !tags.is_empty() {
        b.insert("tags".into(), tags.into());
    }
    Ok(Request {
        path: "/emails".into(),
        headers: vec![("Authorization".into(), format!("Bearer {}", c.key)), ("Idempotency-Key".into(), idempotency_key(f))],
        body: Body::Json(json_body(&Value::Object(b))?),
    })
}

pub fn answer(status: u16, headers: &HeaderMap, json: &Value, f: &Fields) -> Delivery {
    if status == 200 {
        let id = json.get("id").and_then(Value::as_str).map(str::to_string);
        return accepted(status, id, "accepted");
    }
    let name = json.get("name").and_then(Value::as_str).map(str::to_string);
    let message = json.get("message").and_then(Value::as_str).unwrap_or("").to_string();
    let mut rejected = Vec::new();
    if status == 422 && name.as_deref() == Some("validation_error") {
        for a in named_in(f, &message) {
            rejected.push(refused(&a, &format!("HTTP {status}: {message}")));
        }
    }
    if status == 409 && name.as_deref() == Some("concurrent_idempotent_requests") {
        // The same key is still being processed: try again shortly.
        return classify(503, headers, name, message, rejected);
    }
    classify(status, headers, name, if message.is_empty() { json.to_string() } else { message }, rejected)
}
