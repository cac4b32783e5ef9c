//! Postmark: `POST /email`, `X-Postmark-Server-Token`, PascalCase JSON.

use reqwest::header::HeaderMap;
use serde_json::{json, Map, Value};

use super::super::http::{classify, named_in, refused, Body, Config, Fields, Request};
use super::super::Delivery;
use super::{accepted, b64, json_body};

fn list(v: &[lettre::message::Mailbox]) -> String {
    v.iter().map(|m| m.to_string()).collect::<Vec<_>>().join(", ")
}

pub fn request(c: &Config, f: &Fields) -> Result<Request, String> {
    let from = f.from.as_ref().ok_or("no sender")?;
    let mut b = Map::new();
    b.insert("From".into(), json!(from.to_string()));
    b.insert("To".into(), json!(list(&f.to)));
    if !f.cc.is_empty() {
        b.insert("Cc".into(), json!(list(&f.cc)));
    }
    if !f.bcc.is_empty() {
        b.insert("Bcc".into(), json!(list(&f.bcc)));
    }
    b.insert("Subject".into(), json!(f.subject));
    if let Some(t) = f.tags.first() {
        b.insert("Tag".into(), json!(t));
    }
    if let Some(h) = &f.html {
        b.insert("HtmlBody".into(), json!(h));
    }
    if let Some(t) = &f.text {
        b.insert("TextBody".into(), json!(t));
    }
    if !f.reply_to.is_empty() {
        b.insert("ReplyTo".into(), json!(list(&f.reply_to)));
    }
    let mut headers: Vec<Value> = f.headers.iter().map(|(k, v)| json!({"Name": k, "Value": v})).collect();
    headers.push(json!({"Name": "Message-ID", "Value": f.message_id}));
    b.insert("Headers".into(), headers.into());
    if !f.attachments.is_empty() {
        let atts: Vec<Value> = f
            .attachments
            .iter()
            .map(|a| {
                let mut o = json!({"Name": a.filename, "Content": b64(&a.content), "ContentType": a.content_type});
                if let (Some(cid), Some(m)) = (&a.content_id, o.as_object_mut()) {
                    m.insert("ContentID".into(), json!(format!("cid:{cid}")));
                }
                o
            })
            .collect();
        b.insert("Attachments".into(), atts.into());
    }
    if !f.metadata.is_empty() {
        b.insert("Metadata".into(), f.metadata_strings().into_iter().map(|(k, v)| (k, json!(v))).collect::<Map<_, _>>().into());
    }
    b.insert("MessageStream".into(), json!(c.options.get("message_stream").cloned().unwrap_or_else(|| "outbound".into())));
    Ok(Request {
        path: "/email".into(),
        headers: vec![("X-Postmark-Server-Token".into(), c.key.clone()), ("Accept".into(), "application/json".into())],
        body: Body::Json(json_body(&Value::Object(b))?),
    })
}

pub fn answer(status: u16, headers: &HeaderMap, json: &Value, f: &Fields) -> Delivery {
    let code = json.get("ErrorCode").and_then(Value::as_i64);
    let message = json.get("Message").and_then(Value::as_str).unwrap_or("").to_string();
    if status == 200 && code.unwrap_or(0) == 0 {
        let id = json.get("MessageID").and_then(Value::as_str).map(str::to_string);
        return accepted(status, id, if message.is_empty() { "OK" } else { &message });
    }
    let mut rejected = Vec::new();
    if code == Some(406) {
        // "Found inactive addresses: a@x.org, b@y.org. Inactive recipients are ..."
        let named = message.split("Found inactive addresses:").nth(1).unwrap_or(&message);
        for a in named_in(f, named.split(". ").next().unwrap_or(named)) {
            rejected.push(refused(&a, &format!("HTTP {status}: Postmark ErrorCode 406: {message}")));
        }
    }
    classify(status, headers, code.map(|c| c.to_string()), if message.is_empty() { json.to_string() } else { message }, rejected)
}
