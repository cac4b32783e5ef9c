//! Mailgun: `POST /v3/{domain}/messages`, HTTP Basic `api:key`, multipart/form-data.

use reqwest::header::HeaderMap;
use reqwest::multipart::{Form, Part};
use serde_json::Value;

use super::super::http::{classify, named_in, refused, Body, Config, Fields, Request};
use super::super::Delivery;
use super::accepted;
use base64::Engine;

pub fn request(c: &Config, f: &Fields) -> Result<Request, String> {
    let from = f.from.as_ref().ok_or("no sender")?;
    let domain = c.secret.clone().unwrap_or_default();
    let mut form = Form::new().text("from", from.to_string()).text("subject", f.subject.clone());
    for m in &f.to {
        form = form.text("to", m.to_string());
    }
    for m in &f.cc {
        form = form.text("cc", m.to_string());
    }
    for m in &f.bcc {
        form = form.text("bcc", m.to_string());
    }
    if let Some(t) = &f.text {
        form = form.text("text", t.clone());
    }
    if let Some(h) = &f.html {
        form = form.text("html", h.clone());
    }
    if !f.reply_to.is_empty() {
        form = form.text("h:Reply-To", f.reply_to.iter().map(|m| m.to_string()).collect::<Vec<_>>().join(", "));
    }
    form = form.text("h:Message-Id", f.message_id.clone());
    for (k, v) in &f.headers {
        form = form.text(format!("h:{k}"), v.clone());
    }
    for t in &f.tags {
        form = form.text("o:tag", t.clone());
    }
    for (k, v) in &f.metadata {
        form = form.text(format!("v:{k}"), v.to_string());
    }
    for a in &f.attachments {
        // Inline parts are referenced as cid:<filename> by Mailgun, so they carry the content id.
        let (field, name) = match &a.content_id {
            Some(cid) => ("inline", cid.clone()),
            None => ("attachment", a.filename.clone()),
        };
        let part = Part::bytes(a.content.clone()).file_name(name).mime_str(&a.content_type).map_err(|e| format!("attachment {}: {e}", a.filename))?;
        form = form.part(field, part);
    }
    let auth = base64::engine::general_purpose::STANDARD.encode(format!("api:{}", c.key));
    Ok(Request {
        path: format!("/v3/{domain}/messages"),
        headers: vec![("Authorization".into(), format!("Basic {auth}"))],
        body: Body::Form(form),
    })
}

pub fn answer(status: u16, headers: &HeaderMap, json: &Value, raw: &[u8], f: &Fields) -> Delivery {
    let message = json
        .get("message")
        .and_then(Value::as_str)
        .map(str::to_string)
        .unwrap_or_else(|| String::from_utf8_lossy(raw).trim().to_string());
    if status == 200 {
        let id = json.get("id").and_then(Value::as_str).map(str::to_string);
        return accepted(status, id, &message);
    }
    let mut rejected = Vec::new();
    if status == 400 && message.contains("not a valid address") {
        for a in named_in(f, &message) {
            rejected.push(refused(&a, &format!("HTTP {status}: {message}")));
        }
    }
    classify(status, headers, None, message, rejected)
}
