//! Property tests over hostile input, with no pgrx: address lists, header names and values, DSNs,
//! attachments JSON and template sources. Every input is either refused with an error or
//! accepted and turned into a message that an independent parser (`mailparse`) reads back with
//! the same values — and nothing ever panics.

mod tests {
    use proptest::prelude::*;
    use serde_json::json;

    use crate::deliver::dsn;
    use crate::message::{self, Stored};
    use crate::render;

    fn hostile_text() -> impl Strategy<Value = String> {
        prop_oneof![
            ".{0,80}",
            "[a-zA-Z0-9 ,<>\"@.:;()\\\\\r\n\t\u{0}-]{0,60}",
            "[\u{0}-\u{7f}]{0,60}",
            Just("a@x.org\r\nBcc: evil@z.org".to_string()),
            Just("\"Doe, Jane\" <j@x.org>".to_string()),
            Just("Ⅿallory <admin@аpple.com>".to_string()),
        ]
    }

    fn stored(
        to: Vec<String>,
        subject: String,
        headers: Vec<(String, String)>,
        attachments: Vec<message::Attachment>,
    ) -> Stored {
        Stored {
            sender: "Sender <s@x.org>".into(),
            recipients: to,
            subject,
            body: Some("body".into()),
            headers,
            attachments,
            message_id: "<id@x.org>".into(),
            ..Default::default()
        }
    }

    fn parse_back(raw: &[u8]) -> mailparse::ParsedMail<'_> {
        mailparse::parse_mail(raw).expect("an accepted message must parse")
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 400, ..ProptestConfig::default() })]

        #[test]
        fn address_lists(input in prop_oneof![
            hostile_text(),
            "[a-z0-9._+-]{1,10}@[a-z0-9-]{1,10}\\.(org|com|de)",
            "[A-Za-zÀ-ÿ ,.()'\"-]{0,14} <[a-z0-9._-]{1,8}@[a-zü-]{1,8}\\.(org|de)>(, [a-z]{1,5}@x\\.org){0,3}",
            "\"[A-Za-z ,@<>()\\\\\"]{0,12}\" <[a-z]{1,6}@[a-z]{1,6}\\.org>",
        ]) {
            if let Ok(list) = message::parse_mailboxes("recipients", &input) {
                let texts: Vec<String> = list.iter().map(message::mailbox_text).collect();
                // what is stored parses again to the same mailboxes, and builds a message
                for t in &texts {
                    prop_assert_eq!(message::parse_mailbox("recipients", t).map(|m| message::mailbox_text(&m)).ok(), Some(t.clone()));
                }
                let built = message::build(&stored(texts.clone(), "s".into(), vec![], vec![])).expect("accepted addresses build");
                let parsed = parse_back(&built.raw);
                let to = parsed.headers.iter().find(|h| h.get_key_ref().eq_ignore_ascii_case("To")).map(|h| h.get_value());
                let to = to.unwrap_or_default();
                for mb in &list {
                    let addr = message::ascii_address(&mb.email).to_string();
                    prop_assert!(to.contains(&addr), "{} not in To: {}", addr, to);
                }
                prop_assert_eq!(built.to.len() <= list.len(), true);
            }
        }

        #[test]
        fn subjects_and_headers(subject in prop_oneof![hostile_text(), "[ -~À-ÿ✓]{0,120}"], name in "X-[A-Za-z0-9-]{1,20}|[ -~]{0,20}|.{0,10}", value in prop_oneof![hostile_text(), "[ -~À-ÿ]{0,200}"]) {
            let headers = json!({ name.clone(): value.clone() });
            let ok_headers = message::parse_headers(&headers);
            let ok_subject = message::check_single_line("subject", &subject);
            if let (Ok(h), Ok(())) = (ok_headers, ok_subject) {
                let built = message::build(&stored(vec!["a@x.org".into()], subject.clone(), h, vec![])).expect("accepted input builds");
                let parsed = parse_back(&built.raw);
                let got_subject = parsed.headers.iter().find(|x| x.get_key_ref() == "Subject").map(|x| x.get_value()).unwrap_or_default();
                prop_assert_eq!(got_subject.trim(), subject.trim());
                let got = parsed.headers.iter().find(|x| x.get_key_ref() == name).map(|x| x.get_value()).unwrap_or_default();
                prop_assert_eq!(got.trim(), value.trim());
                // no header line was injected
                let count = parsed.headers.iter().filter(|x| x.get_key_ref().eq_ignore_ascii_case("Bcc")).count();
                prop_assert_eq!(count, 0);
            }
        }

        #[test]
        fn dsns(input in prop_oneof![
            ".{0,60}",
            "(smtp|smtps|sendgrid\\+api|postmark\\+api|resend\\+api|mailgun\\+api|ses\\+api|file|capture)://[a-z:@%0-9./?&=_-]{0,40}",
        ]) {
            if let Ok(d) = dsn::parse(&input) {
                // the masked form parses again and shows the same kind, never a secret
                let masked = d.masked();
                for s in d.secrets() {
                    prop_assert!(!masked.contains(s), "{} leaks {}", masked, s);
                }
                prop_assert_eq!(dsn::parse(&masked.replace("***", "x")).map(|m| m.kind).ok(), Some(d.kind));
            }
        }

        #[test]
        fn attachments(filename in hostile_text(), ctype in "[a-z/+.; =-]{0,30}|.{0,20}", content in "[A-Za-z0-9+/=\\s!]{0,40}", cid in proptest::option::of("[ -~]{0,12}")) {
            let v = json!([{ "filename": filename, "content_type": ctype, "content": content, "content_id": cid }]);
            if let Ok(atts) = message::parse_attachments(&v) {
                let mut s = stored(vec!["a@x.org".into()], "s".into(), vec![], atts.clone());
                s.html = Some("<p>x</p>".into());
                let built = message::build(&s).expect("accepted attachments build");
                let parsed = parse_back(&built.raw);
                let mut bodies = Vec::new();
                fn walk(p: &mailparse::ParsedMail, out: &mut Vec<Vec<u8>>) {
                    if p.subparts.is_empty() { out.push(p.get_body_raw().unwrap_or_default()); }
                    for s in &p.subparts { walk(s, out); }
                }
                walk(&parsed, &mut bodies);
                prop_assert!(bodies.iter().any(|b| *b == atts[0].content), "attachment content not found");
            }
        }

        #[test]
        fn template_sources(src in prop_oneof![
            ".{0,60}",
            "[{}%#a-z ()|'\"0-9.,=\\[\\]-]{0,60}",
            Just("{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}".to_string()),
            Just("{{ x | default('y') }}{% if a is defined %}{{ a }}{% endif %}".to_string()),
        ]) {
            let parts = render::Parts { subject: "s".into(), body: Some(src.clone()), html: Some(src) };
            match render::check_syntax("t", &parts) {
                // A refused source is a syntax error that names the template and a position.
                Err(e) => {
                    let positioned = matches!(&e, render::RenderError::Syntax { line, column, .. } if *line >= 1 && *column >= 1);
                    prop_assert!(positioned, "not a positioned syntax error: {:?}", e);
                    prop_assert!(e.to_string().starts_with("template \"t\""), "{}", e);
                }
                // An accepted one renders within the limits, or fails with an error naming it.
                Ok(()) => {
                    let lib = std::sync::Arc::new(render::Library::new());
                    let limits = render::Limits { fuel: 100_000, max_size: 1 << 20 };
                    match render::render("t", &parts, &lib, &json!({"x": "<b>", "items": [1, 2]}), limits) {
                        Ok(p) => {
                            prop_assert_eq!(p.subject.as_str(), "s");
                            let size = p.body.as_ref().map_or(0, String::len) + p.html.as_ref().map_or(0, String::len);
                            prop_assert!(p.body.is_some() && p.html.is_some());
                            prop_assert!(size <= 1 << 20, "{} bytes", size);
                        }
                        Err(e) => prop_assert!(e.to_string().starts_with("template \"t\""), "{}", e),
                    }
                }
            }
        }
    }
}
