//! SendGrid v3 mail send: `POST /v3/mail/send`, Bearer key, one personalization.

use reqwest::header::HeaderMap;
use serde_json::{json, Map, Value};

use super::super::http::{classify, refused, Body, Config, Fields, Request};
use super::super::Delivery;
use super::{accepted, b64, json_body};
use lettre::message::Mailbox;

fn addr(m: &Mailbox) -> Value {
    match &m.name {
        Some(n) if !n.is_empty() => json!({"email": m.email.to_string(), "name": n}),
        _ => json!({"email": m.email.to_string()}),
    }
}

pub fn request(c: &Config, f: &Fields) -> Result<Request, String> {
    let from = f.from.as_ref().ok_or("no sender")?;
    let mut p = Map::new();
    p.insert("to".into(), f.to.iter().map(addr).collect());
    if !f.cc.is_empty() {
        p.insert("cc".into(), f.cc.iter().map(addr).collect());
    }
    if !f.bcc.is_empty() {
        p.insert("bcc".into(), f.bcc.iter().map(addr).collect());
    }
    let mut content = Vec::new();
    if let Some(t) = &f.text {
        content.push(json!({"type": "text/plain", "value": t}));
    }
    if let Some(h) = &f.html {
        content.push(json!({"type": "text/html", "value": h}));
    }
    let mut headers: Map<String, Value> = f.headers.iter().map(|(k, v)| (k.clone(), json!(v))).collect();
    headers.insert("Message-ID".into(), json!(f.message_id));
    let mut body = json!({
        "personalizations": [Value::Object(p)],
        "from": addr(from),
        "subject": f.subject,
        "content": content,
        "headers": headers,
    });
    let o = body.as_object_mut().ok_or("internal")?;
    if let Some(r) = f.reply_to.first() {
        o.insert("reply_to".into(), addr(r));
    }
    if !f.attachments.is_empty() {
        let list: Vec<Value> = f
            .attachments
            .iter()
            .map(|a| match &a.content_id {
                Some(cid) => json!({"content": b64(&a.content), "type": a.content_type, "filename": a.filename, "disposition": "inline", "content_id": cid}),
                None => json!({"content": b64(&a.content), "type": a.content_type, "filename": a.filename, "disposition": "attachment"}),
            })
            .collect();
        o.insert("attachments".into(), list.into());
    }
    if !f.tags.is_empty() {
        o.insert("categories".into(), f.tags.iter().take(10).cloned().collect());
    }
    if !f.metadata.is_empty() {
        o.insert("custom_args".into(), f.metadata_strings().into_iter().map(|(k, v)| (k, json!(v))).collect::<Map<_, _>>().into());
    }
    if c.options.get("sandbox").map(String::as_str) == Some("true") {
        o.insert("mail_settings".into(), json!({"sandbox_mode": {"enable": true}}));
    }
    Ok(Request {
        path: "/v3/mail/send".into(),
        headers: vec![("Authorization".into(), format!("Bearer {}", c.key))],
        body: Body::Json(json_body(&body)?),
    })
}

pub fn answer(status: u16, headers: &HeaderMap, json: &Value, f: &Fields) -> Delivery {
    if status == 202 || status == 200 {
        let id = headers.get("x-message-id").and_then(|v| v.to_str().ok()).map(str::to_string);
        return accepted(status, id, if status == 200 { "accepted (sandbox)" } else { "accepted" });
    }
    let errors = json.get("errors").and_then(Value::as_array).cloned().unwrap_or_default();
    let message = errors
        .iter()
        .filter_map(|e| e.get("message").and_then(Value::as_str))
        .collect::<Vec<_>>()
        .join("; ");
    let message = if message.is_empty() { json.to_string() } else { message };
    // personalizations.0.to.3.email → the fourth "to" recipient
    let mut rejected = Vec::new();
    for e in &errors {
        let field = e.get("field").and_then(Value::as_str).unwrap_or("");
        let parts: Vec<&str> = field.split('.').collect();
        if let ["personalizations", _, list, index, "email"] = parts.as_slice() {
            let list = match *list {
                "to" => &f.to,
                "cc" => &f.cc,
                "bcc" => &f.bcc,
                _ => continue,
            };
            if let Some(mb) = index.parse::<usize>().ok().and_then(|i| list.get(i)) {
                let text = e.get("message").and_then(Value::as_str).unwrap_or("invalid address");
                rejected.push(refused(&mb.email.to_string(), &format!("HTTP {status}: {text} ({field})")));
            }
        }
    }
    classify(status, headers, None, message, rejected)
}
