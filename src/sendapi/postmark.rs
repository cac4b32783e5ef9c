//! Postmark: `POST /email`, `POST /email/batch` (a JSON array of up to 500 messages),
//! `POST /email/withTemplate` and `POST /email/batchWithTemplates` (`{"Messages": [...]}`),
//! authenticated with `X-Postmark-Server-Token: <key>`. Member names are PascalCase and matched
//! exactly, as Postmark documents them; unknown members are ignored, as Postmark ignores them.
//!
//! Mapping to `email.send`:
//! - `From` → sender; `To`, `Cc`, `Bcc` (comma-separated) → recipients, cc, bcc; `ReplyTo` →
//!   reply_to; `Subject`; `HtmlBody` → html; `TextBody` → body. An empty `Cc`, `Bcc`, `ReplyTo`,
//!   `Tag`, `HtmlBody` or `TextBody` counts as absent (some SDKs send `""` for unset members).
//! - `Tag` → tags `[Tag]`; `Metadata {}` → metadata; `Headers [{Name, Value}]` → headers `{Name:
//!   Value}` (a name given twice, in any letter case, is refused).
//! - `TrackOpens` → track_opens; `TrackLinks`: `None` → track_clicks false, `HtmlAndText` and
//!   `HtmlOnly` → true (pg_email rewrites the links of the HTML part; the text part is never
//!   changed), `TextOnly` is refused (pg_email cannot track text links, and silently tracking none
//!   would surprise).
//! - `Attachments [{Name, Content, ContentType, ContentID}]` → attachments (`cid:logo` → `logo`;
//!   a missing ContentType is guessed from the name).
//! - `MessageStream` and `InlineCss` are accepted and ignored: pg_email has no streams (the
//!   transport chosen by SQL decides where mail goes) and does not inline CSS.
//! - withTemplate: `TemplateAlias`, or `TemplateId` (its digits become the template's name), and
//!   `TemplateModel {}` → `email.send_template(template, recipients, data, …)` with the other
//!   members as above; `Subject`, `HtmlBody` and `TextBody` are not template members and are
//!   ignored there, as Postmark ignores unknown members.
//!
//! Answers: `200 {"To","SubmittedAt","MessageID","ErrorCode":0,"Message":"OK"}` (MessageID = our
//! id as text); batches `200 [..]` with one result per message, also when one message is refused
//! (the others then carry ErrorCode 300 and say they were not sent). Errors `{"ErrorCode",
//! "Message"}`: 401 ErrorCode 10 (missing or wrong token); 422 ErrorCode 300 (invalid request,
//! the member named in Message), 402 (invalid JSON), 405 (the token's role may not send), 410
//! (more than 500 messages), 1101 (unknown template); 413; 429 ErrorCode 429 with Retry-After; 503
//! ErrorCode 100 (the database did not answer in time).

use serde_json::{json, Map, Value};

use super::{
    attachment, json_reply, kind, retry_secs, sentence, show, wrong, Call, Obj, Parsed, Refusal, Reply, Route,
    IDEMPOTENCY_HEADER, REQUIRED,
};

/// Most messages in one batch.
pub const MAX_BATCH: usize = 500;
/// How a refusal for too many messages starts (ErrorCode 410).
const TOO_MANY: &str = "too many messages in one batch";

pub(super) fn parse(route: Route, v: &Value) -> Result<Parsed, Refusal> {
    let calls = match route {
        Route::PostmarkBatch => match v {
            Value::Array(items) => batch(items, false)?,
            other => {
                return Err(Refusal::general(format!(
                    "the request body must be a JSON array of messages, not {}",
                    kind(other)
                )))
            }
        },
        Route::PostmarkTemplateBatch => {
            let o = Obj::new(v, None, String::new())?;
            let items = o.array("Messages")?.ok_or_else(|| Refusal::missing("Messages"))?;
            batch(items, true)?
        }
        _ => {
            if v.is_array() {
                return Err(Refusal::general(
                    "the request body must be one message (a JSON object); send arrays to POST /email/batch",
                ));
            }
            vec![message(v, route == Route::PostmarkTemplate)?]
        }
    };
    Ok(Parsed { calls, dry_run: false })
}

fn batch(items: &[Value], templated: bool) -> Result<Vec<Call>, Refusal> {
    let n = items.len();
    if n == 0 {
        return Err(Refusal::general(format!("a batch holds 1 to {MAX_BATCH} messages (none given)")));
    }
    if n > MAX_BATCH {
        return Err(Refusal::general(format!("{TOO_MANY}: {n} given, at most {MAX_BATCH}")));
    }
    let mut calls = Vec::with_capacity(n);
    for (i, item) in items.iter().enumerate() {
        if !item.is_object() {
            let r = Refusal::general(format!("each message must be a JSON object, not {}", kind(item)));
            return Err(Refusal::batch(i, n, r));
        }
        calls.push(message(item, templated).map_err(|r| Refusal::batch(i, n, r))?);
    }
    Ok(calls)
}

/// One message object.
fn message(v: &Value, templated: bool) -> Result<Call, Refusal> {
    let o = Obj::new(v, None, String::new())?;
    let optional = |key: &str| -> Result<Option<String>, Refusal> { Ok(o.string(key)?.filter(|s| !s.is_empty())) };
    let mut c = Call {
        sender: o.string("From")?,
        recipients: o.string("To")?,
        cc: optional("Cc")?,
        bcc: optional("Bcc")?,
        reply_to: optional("ReplyTo")?,
        tags: optional("Tag")?.map(|t| vec![t]),
        track_opens: o.bool("TrackOpens")?,
        track_clicks: track_links(o.str("TrackLinks")?)?,
        ..Call::default()
    };
    if !templated {
        c.subject = o.string("Subject")?;
        c.html = optional("HtmlBody")?;
        c.body = optional("TextBody")?;
    }
    if let Some(list) = o.array("Headers")? {
        let h = headers_of(list)?;
        c.headers = (!h.is_empty()).then_some(Value::Object(h));
    }
    if let Some(items) = o.array("Attachments")?.filter(|a| !a.is_empty()) {
        let list = items.iter().enumerate().map(|(i, a)| attachment_of(i, a)).collect::<Result<Vec<_>, _>>()?;
        c.attachments = Some(Value::Array(list));
    }
    if let Some(m) = o.object("Metadata")?.filter(|m| !m.is_empty()) {
        c.metadata = Some(Value::Object(m.clone()));
    }
    // Accepted for compatibility and ignored (see the module documentation).
    o.str("MessageStream")?;
    if templated {
        o.bool("InlineCss")?;
        let alias = o.string("TemplateAlias")?.filter(|a| !a.is_empty());
        let id = match o.get("TemplateId") {
            None => None,
            Some(Value::Number(n)) if n.is_u64() => Some(n.to_string()),
            Some(Value::String(s)) if !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit()) => Some(s.clone()),
            Some(other) => return Err(wrong("TemplateId", "a whole number", other)),
        };
        c.template = Some(match (alias, id) {
            (Some(_), Some(_)) => {
                return Err(Refusal::invalid("TemplateId", "give TemplateId or TemplateAlias, not both"))
            }
            (Some(t), None) | (None, Some(t)) => t,
            (None, None) => return Err(Refusal::invalid("TemplateAlias", format!("{REQUIRED} (or TemplateId)"))),
        });
        c.data = match o.get("TemplateModel") {
            None => None,
            Some(Value::Object(m)) => Some(Value::Object(m.clone())),
            Some(other) => return Err(wrong("TemplateModel", "an object", other)),
        };
    }
    Ok(c)
}

/// `TrackLinks` → track_clicks.
fn track_links(v: Option<&str>) -> Result<Option<bool>, Refusal> {
    let Some(text) = v else {
        return Ok(None);
    };
    match text.to_ascii_lowercase().as_str() {
        "none" => Ok(Some(false)),
        "htmlandtext" | "htmlonly" => Ok(Some(true)),
        "textonly" => Err(Refusal::invalid(
            "TrackLinks",
            "TextOnly is not supported: pg_email tracks the links of the HTML part only; use HtmlOnly or HtmlAndText",
        )),
        _ => Err(Refusal::invalid(
            "TrackLinks",
            format!("{} must be one of None, HtmlAndText, HtmlOnly and TextOnly", show(text)),
        )),
    }
}

/// `[{Name, Value}]` → `{Name: Value}`.
fn headers_of(list: &[Value]) -> Result<Map<String, Value>, Refusal> {
    let mut m = Map::new();
    for (i, h) in list.iter().enumerate() {
        let o = Obj::new(h, Some(&format!("Headers[{i}]")), format!("Headers[{i}]."))?;
        let name = o.str("Name")?.filter(|n| !n.is_empty()).ok_or_else(|| Refusal::missing(o.field("Name")))?;
        let value = o.str("Value")?.ok_or_else(|| Refusal::missing(o.field("Value")))?;
        if m.keys().any(|k| k.eq_ignore_ascii_case(name)) {
            return Err(Refusal::invalid(
                o.field("Name"),
                format!("header {} is given twice; each custom header is set once", show(name)),
            ));
        }
        m.insert(name.to_string(), Value::from(value));
    }
    Ok(m)
}

/// One attachment: `Name` and `Content` are required.
fn attachment_of(i: usize, a: &Value) -> Result<Value, Refusal> {
    let o = Obj::new(a, Some(&format!("Attachments[{i}]")), format!("Attachments[{i}]."))?;
    let name = o.str("Name")?.ok_or_else(|| Refusal::missing(o.field("Name")))?;
    let content = o.string("Content")?.ok_or_else(|| Refusal::missing(o.field("Content")))?;
    Ok(attachment(name, o.str("ContentType")?, content, o.str("ContentID")?))
}

/// Postmark's name for one of `email.send`'s arguments; a template whose name is all digits came
/// as `TemplateId`.
pub(super) fn field_name(base: &str, template_name: Option<&str>) -> Option<&'static str> {
    Some(match base {
        "recipients" => "To",
        "subject" => "Subject",
        "body" => "TextBody",
        "html" => "HtmlBody",
        "sender" => "From",
        "cc" => "Cc",
        "bcc" => "Bcc",
        "reply_to" => "ReplyTo",
        "headers" => "Headers",
        "tags" => "Tag",
        "metadata" => "Metadata",
        "idempotency_key" => IDEMPOTENCY_HEADER,
        "template" => match template_name {
            Some(n) if !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()) => "TemplateId",
            _ => "TemplateAlias",
        },
        "data" => "TemplateModel",
        "track_opens" => "TrackOpens",
        "track_clicks" => "TrackLinks",
        _ => return None,
    })
}

/// `Attachments[i].Member`.
pub(super) fn attachment_field(index: Option<usize>, member: Option<&str>) -> String {
    let member = member.map(|m| match m {
        "filename" => "Name",
        "content" => "Content",
        "content_type" => "ContentType",
        "content_id" => "ContentID",
        _ => "",
    });
    match (index, member) {
        (Some(i), Some(m)) if !m.is_empty() => format!("Attachments[{i}].{m}"),
        (Some(i), _) => format!("Attachments[{i}]"),
        _ => "Attachments".into(),
    }
}

pub(super) fn refuse(r: &Refusal) -> Reply {
    if let Refusal::Batch { index, count, refusal } = r {
        let n = (*count).max(index.saturating_add(1)).min(MAX_BATCH);
        if !refusal.is_per_message() || *index >= n {
            return refuse(refusal);
        }
        let (_, code, message, _) = parts(refusal);
        let others = format!(
            "Not sent: the message at index {index} of this batch was refused, and pg_email stores a batch all or \
             nothing; correct it and send the batch again."
        );
        let results: Vec<Value> = (0..n)
            .map(|j| {
                if j == *index {
                    json!({"ErrorCode": code, "Message": message})
                } else {
                    json!({"ErrorCode": 300, "Message": others})
                }
            })
            .collect();
        return json_reply(200, &Value::Array(results), Vec::new());
    }
    let (status, code, message, headers) = parts(r);
    json_reply(status, &json!({"ErrorCode": code, "Message": message}), headers)
}

type Parts = (u16, u32, String, Vec<(&'static str, String)>);

fn parts(r: &Refusal) -> Parts {
    match r {
        Refusal::MissingKey => (
            401,
            10,
            "Request does not contain a valid Server token: send it in the X-Postmark-Server-Token header.".into(),
            Vec::new(),
        ),
        Refusal::InvalidKey => (
            401,
            10,
            "The Server Token you provided in the X-Postmark-Server-Token request header was invalid. Please verify \
             that you are using a valid token."
                .into(),
            Vec::new(),
        ),
        Refusal::Forbidden => (
            422,
            405,
            "Not allowed to send: the token is valid, but its database role may not send email (the database owner \
             can grant it with email.grant_send)."
                .into(),
            Vec::new(),
        ),
        Refusal::RateLimited { retry_after_secs, .. } => {
            let retry = retry_secs(*retry_after_secs);
            (429, 429, format!("Rate limit exceeded: retry after {retry} seconds."), vec![("retry-after", retry)])
        }
        Refusal::TooLarge => (413, 300, "The request body is too large.".into(), Vec::new()),
        Refusal::BadJson(m) => (422, 402, format!("Invalid JSON: {m}"), Vec::new()),
        Refusal::Invalid { field, message } => {
            let field = field.as_deref();
            let code = if message.starts_with(TOO_MANY) {
                410
            } else if matches!(field, Some("TemplateAlias" | "TemplateId")) && message.contains("does not exist") {
                1101
            } else {
                300
            };
            (422, code, sentence(field, message, "'"), Vec::new())
        }
        Refusal::IdempotencyConflict(m) => (422, 300, m.clone(), Vec::new()),
        Refusal::Unavailable => {
            (503, 100, "The database could not take the request in time; retry later.".into(), Vec::new())
        }
        Refusal::Batch { refusal, .. } => parts(refusal),
    }
}

/// One result: `{"To","SubmittedAt","MessageID","ErrorCode":0,"Message":"OK"}`.
fn result(call: Option<&Call>, id: Option<i64>, now: &str) -> Value {
    json!({
        "To": call.and_then(|c| c.recipients.clone()).unwrap_or_default(),
        "SubmittedAt": now,
        "MessageID": id.map(|i| i.to_string()).unwrap_or_default(),
        "ErrorCode": 0,
        "Message": "OK",
    })
}

pub(super) fn accepted(route: Route, calls: &[Call], ids: &[i64], now: &str) -> Reply {
    let body = if route.is_batch() {
        Value::Array(ids.iter().enumerate().map(|(i, id)| result(calls.get(i), Some(*id), now)).collect())
    } else {
        result(calls.first(), ids.first().copied(), now)
    };
    json_reply(200, &body, Vec::new())
}

#[cfg(test)]
mod tests {
    use super::super::{
        accepted as answer, batch_refused, from_sql_error, parse as parse_request, refuse as render, Provider,
    };
    use super::*;

    fn parse_json(route: Route, v: &Value) -> Result<Parsed, Refusal> {
        parse_request(route, &[], v.to_string().as_bytes())
    }

    fn one(v: Value) -> Result<Call, Refusal> {
        parse_json(Route::PostmarkEmail, &v).map(|mut p| p.calls.remove(0))
    }

    fn full() -> Value {
        json!({
            "From": "Acme <sender@acme.test>",
            "To": "Ada <ada@x.org>, bob@y.org",
            "Cc": "carol@z.org",
            "Bcc": "dan@z.org",
            "Subject": "Test",
            "Tag": "Invitation",
            "HtmlBody": "<b>Hello</b> <img src=\"cid:image.jpg\"/>",
            "TextBody": "Hello",
            "ReplyTo": "reply@acme.test",
            "Headers": [{"Name": "CUSTOM-HEADER", "Value": "value"}],
            "TrackOpens": true,
            "TrackLinks": "HtmlOnly",
            "Attachments": [
                {"Name": "readme.txt", "Content": "dGVzdCBjb250ZW50", "ContentType": "text/plain"},
                {"Name": "report.pdf", "Content": "dGVzdCBjb250ZW50", "ContentType": "application/octet-stream"},
                {"Name": "image.jpg", "ContentID": "cid:image.jpg", "Content": "dGVzdCBjb250ZW50", "ContentType": "image/jpeg"},
                {"Name": "guess.png", "Content": "dGVzdCBjb250ZW50"}
            ],
            "Metadata": {"color": "blue", "client-id": "12345"},
            "MessageStream": "outbound",
            "SomethingNew": 1
        })
    }

    #[test]
    fn a_full_email() {
        let want = Call {
            recipients: Some("Ada <ada@x.org>, bob@y.org".into()),
            subject: Some("Test".into()),
            body: Some("Hello".into()),
            html: Some("<b>Hello</b> <img src=\"cid:image.jpg\"/>".into()),
            sender: Some("Acme <sender@acme.test>".into()),
            cc: Some("carol@z.org".into()),
            bcc: Some("dan@z.org".into()),
            reply_to: Some("reply@acme.test".into()),
            headers: Some(json!({"CUSTOM-HEADER": "value"})),
            attachments: Some(json!([
                {"filename": "readme.txt", "content_type": "text/plain", "content": "dGVzdCBjb250ZW50"},
                {"filename": "report.pdf", "content_type": "application/octet-stream", "content": "dGVzdCBjb250ZW50"},
                {"filename": "image.jpg", "content_type": "image/jpeg", "content": "dGVzdCBjb250ZW50", "content_id": "image.jpg"},
                {"filename": "guess.png", "content_type": "image/png", "content": "dGVzdCBjb250ZW50"}
            ])),
            tags: Some(vec!["Invitation".into()]),
            metadata: Some(json!({"color": "blue", "client-id": "12345"})),
            track_opens: Some(true),
            track_clicks: Some(true),
            ..Call::default()
        };
        assert_eq!(one(full()), Ok(want));
    }

    #[test]
    fn empty_and_null_members_are_absent() {
        let c = one(json!({
            "From": "a@acme.test", "To": "b@x.org", "Subject": "s", "TextBody": "t", "HtmlBody": "",
            "Cc": "", "Bcc": null, "ReplyTo": "", "Tag": "", "Headers": [], "Attachments": null, "Metadata": {},
            "TrackOpens": null, "TrackLinks": null
        }));
        let want = Call {
            sender: Some("a@acme.test".into()),
            recipients: Some("b@x.org".into()),
            subject: Some("s".into()),
            body: Some("t".into()),
            ..Call::default()
        };
        assert_eq!(c, Ok(want));
    }

    #[test]
    fn track_links() {
        for (v, want) in
            [("None", Some(false)), ("HtmlAndText", Some(true)), ("HtmlOnly", Some(true)), ("htmlonly", Some(true))]
        {
            assert_eq!(one(json!({"TrackLinks": v})).map(|c| c.track_clicks), Ok(want), "{v}");
        }
        let r = one(json!({"TrackLinks": "TextOnly"})).unwrap_err();
        assert!(
            matches!(&r, Refusal::Invalid { field: Some(f), message } if f == "TrackLinks" && message.contains("HTML part only"))
        );
        let r = one(json!({"TrackLinks": "Always"})).unwrap_err();
        assert_eq!(
            r,
            Refusal::invalid("TrackLinks", "\"Always\" must be one of None, HtmlAndText, HtmlOnly and TextOnly")
        );
        assert_eq!(
            one(json!({"TrackLinks": true})),
            Err(Refusal::invalid("TrackLinks", "must be a string, not a boolean"))
        );
        assert_eq!(
            one(json!({"TrackOpens": "yes"})),
            Err(Refusal::invalid("TrackOpens", "must be true or false, not a string"))
        );
    }

    #[test]
    fn members_are_matched_exactly_and_typed() {
        // Postmark's member names are case-sensitive: `to` is an unknown member, ignored.
        assert_eq!(one(json!({"to": "a@x.org"})).map(|c| c.recipients), Ok(None));
        let cases = [
            (json!({"To": ["a@x.org"]}), "To", "must be a string, not an array"),
            (json!({"Headers": {"X-A": "1"}}), "Headers", "must be an array, not an object"),
            (json!({"Headers": [{"Name": "X-A", "Value": 1}]}), "Headers[0].Value", "must be a string, not a number"),
            (json!({"Metadata": ["a"]}), "Metadata", "must be an object, not an array"),
            (
                json!({"Attachments": [{"Name": "a", "Content": 5}]}),
                "Attachments[0].Content",
                "must be a string, not a number",
            ),
            (json!({"MessageStream": 1}), "MessageStream", "must be a string, not a number"),
            (json!({"Tag": ["a"]}), "Tag", "must be a string, not an array"),
        ];
        for (body, field, message) in cases {
            assert_eq!(one(body.clone()), Err(Refusal::invalid(field, message)), "{body}");
        }
        assert_eq!(one(json!({"Attachments": [{"Content": "aGk="}]})), Err(Refusal::missing("Attachments[0].Name")));
        assert_eq!(one(json!({"Attachments": [{"Name": "a"}]})), Err(Refusal::missing("Attachments[0].Content")));
        assert_eq!(one(json!({"Headers": [{"Value": "v"}]})), Err(Refusal::missing("Headers[0].Name")));
        assert_eq!(one(json!({"Headers": [{"Name": "X"}]})), Err(Refusal::missing("Headers[0].Value")));
        let r = one(json!({"Headers": [{"Name": "X-A", "Value": "1"}, {"Name": "x-a", "Value": "2"}]}));
        assert!(matches!(r, Err(Refusal::Invalid { field: Some(f), .. }) if f == "Headers[1].Name"));
        assert!(
            matches!(one(json!([{}])), Err(Refusal::Invalid { field: None, message }) if message.contains("/email/batch"))
        );
    }

    #[test]
    fn a_template_email() {
        let mut v = full();
        v["TemplateAlias"] = json!("welcome");
        v["TemplateModel"] = json!({"name": "Ada", "items": [1, 2]});
        v["InlineCss"] = json!(true);
        let c = parse_json(Route::PostmarkTemplate, &v).map(|mut p| p.calls.remove(0));
        let want = Call {
            subject: None,
            body: None,
            html: None,
            template: Some("welcome".into()),
            data: Some(json!({"name": "Ada", "items": [1, 2]})),
            ..one(full()).unwrap_or_default()
        };
        assert_eq!(c, Ok(want));

        let t = |v: Value| parse_json(Route::PostmarkTemplate, &v).map(|mut p| p.calls.remove(0));
        assert_eq!(t(json!({"TemplateId": 12345})).map(|c| c.template), Ok(Some("12345".into())));
        assert_eq!(t(json!({"TemplateId": "678"})).map(|c| c.template), Ok(Some("678".into())));
        assert_eq!(t(json!({"TemplateAlias": "w", "TemplateModel": null})).map(|c| c.data), Ok(None));
        assert_eq!(
            t(json!({"TemplateId": 1, "TemplateAlias": "w"})),
            Err(Refusal::invalid("TemplateId", "give TemplateId or TemplateAlias, not both"))
        );
        assert_eq!(t(json!({"To": "a@x.org"})), Err(Refusal::invalid("TemplateAlias", "is required (or TemplateId)")));
        assert_eq!(
            t(json!({"TemplateAlias": ""})),
            Err(Refusal::invalid("TemplateAlias", "is required (or TemplateId)"))
        );
        for bad in [json!(-1), json!(1.5), json!("x1"), json!(""), json!([1])] {
            assert!(
                matches!(t(json!({"TemplateId": bad})), Err(Refusal::Invalid { field: Some(f), .. }) if f == "TemplateId")
            );
        }
        assert_eq!(
            t(json!({"TemplateAlias": "w", "TemplateModel": "x"})),
            Err(Refusal::invalid("TemplateModel", "must be an object, not a string"))
        );
        assert_eq!(
            t(json!({"TemplateAlias": "w", "InlineCss": "yes"})),
            Err(Refusal::invalid("InlineCss", "must be true or false, not a string"))
        );
    }

    #[test]
    fn batches() {
        let a = json!({"From": "a@acme.test", "To": "x@x.org", "Subject": "One", "TextBody": "1"});
        let b = json!({"From": "a@acme.test", "To": "y@y.org", "Subject": "Two", "HtmlBody": "<i>2</i>"});
        let p = parse_json(Route::PostmarkBatch, &json!([a, b])).unwrap_or_else(|r| panic!("{r:?}"));
        assert_eq!(p.calls.len(), 2);
        assert_eq!(p.calls[1].html.as_deref(), Some("<i>2</i>"));
        assert_eq!(p.calls[1].recipients.as_deref(), Some("y@y.org"));

        let ta = json!({"From": "a@acme.test", "To": "x@x.org", "TemplateAlias": "w", "TemplateModel": {"n": 1}});
        let p = parse_json(Route::PostmarkTemplateBatch, &json!({"Messages": [ta, ta]}))
            .unwrap_or_else(|r| panic!("{r:?}"));
        assert_eq!(p.calls.len(), 2);
        assert_eq!(p.calls[0].data, Some(json!({"n": 1})));
        assert_eq!(parse_json(Route::PostmarkTemplateBatch, &json!({})), Err(Refusal::missing("Messages")));
        assert!(matches!(
            parse_json(Route::PostmarkTemplateBatch, &json!([ta])),
            Err(Refusal::Invalid { field: None, .. })
        ));
        assert!(matches!(parse_json(Route::PostmarkBatch, &a), Err(Refusal::Invalid { field: None, .. })));
        assert_eq!(
            parse_json(Route::PostmarkBatch, &json!([])),
            Err(Refusal::general("a batch holds 1 to 500 messages (none given)"))
        );

        assert!(parse_json(Route::PostmarkBatch, &Value::Array(vec![a.clone(); 500])).is_ok());
        let r = parse_json(Route::PostmarkBatch, &Value::Array(vec![a.clone(); 501])).unwrap_err();
        let reply = render(Provider::Postmark, &r);
        let j: Value = serde_json::from_str(&reply.body).unwrap_or_default();
        assert_eq!((reply.status, j["ErrorCode"].clone()), (422, json!(410)));
        assert_eq!(j["Message"], "too many messages in one batch: 501 given, at most 500");
    }

    #[test]
    fn a_bad_message_in_a_batch_answers_one_result_per_message() {
        let a = json!({"From": "a@acme.test", "To": "x@x.org", "Subject": "One", "TextBody": "1"});
        let bad = json!({"From": "a@acme.test", "To": "x@x.org", "TrackLinks": "TextOnly"});
        let r = parse_json(Route::PostmarkBatch, &json!([a, bad, a])).unwrap_err();
        assert!(matches!(&r, Refusal::Batch { index: 1, count: 3, .. }));
        let reply = render(Provider::Postmark, &r);
        assert_eq!(reply.status, 200);
        let j: Value = serde_json::from_str(&reply.body).unwrap_or_default();
        assert_eq!(j.as_array().map(Vec::len), Some(3));
        assert_eq!(j[1]["ErrorCode"], 300);
        assert!(j[1]["Message"].as_str().unwrap_or("").starts_with("Invalid 'TrackLinks' field: TextOnly"));
        assert!(j[0]["Message"].as_str().unwrap_or("").starts_with("Not sent"));
        let r = parse_json(Route::PostmarkBatch, &json!([a, "x"])).unwrap_err();
        assert_eq!(r, Refusal::batch(1, 2, Refusal::general("each message must be a JSON object, not a string")));
    }

    #[test]
    fn sql_errors_in_postmarks_words() {
        let r = from_sql_error(Route::PostmarkBatch, "22023", "invalid cc: \"x\" is not a valid address: missing @");
        let reply = batch_refused(Route::PostmarkBatch, 0, 2, &r);
        let j: Value = serde_json::from_str(&reply.body).unwrap_or_default();
        assert_eq!(
            j[0],
            json!({"ErrorCode": 300, "Message": "Invalid 'Cc' field: \"x\" is not a valid address: missing @"})
        );
        let r = from_sql_error(Route::PostmarkTemplate, "42704", "template \"42\" does not exist");
        let reply = render(Provider::Postmark, &r);
        let j: Value = serde_json::from_str(&reply.body).unwrap_or_default();
        assert_eq!((reply.status, j["ErrorCode"].clone()), (422, json!(1101)));
        assert_eq!(j["Message"], "Invalid 'TemplateId' field: template \"42\" does not exist");
        assert_eq!(field_name("track_clicks", None), Some("TrackLinks"));
        assert_eq!(field_name("template", Some("")), Some("TemplateAlias"));
        assert_eq!(field_name("send_at", None), None);
        assert_eq!(attachment_field(Some(0), Some("filename")), "Attachments[0].Name");
        assert_eq!(attachment_field(Some(0), Some("odd")), "Attachments[0]");
        assert_eq!(attachment_field(None, None), "Attachments");
    }

    #[test]
    fn answers() {
        let p = parse_json(Route::PostmarkEmail, &full()).unwrap_or_else(|r| panic!("{r:?}"));
        let reply = answer(Route::PostmarkEmail, &p.calls, &[1001], "2026-05-01T10:00:00Z");
        let j: Value = serde_json::from_str(&reply.body).unwrap_or_default();
        assert_eq!(
            j,
            json!({"To": "Ada <ada@x.org>, bob@y.org", "SubmittedAt": "2026-05-01T10:00:00Z", "MessageID": "1001", "ErrorCode": 0, "Message": "OK"})
        );
    }
}
