//! Template rendering with minijinja, with no pgrx. Backends call it to check a template when it
//! is saved, to check `data` at `email.send_template` and for `email.render`; the worker calls
//! it when it sends a template message. Callers pass plain sources read from the database; here
//! nothing touches files, the network or the environment.
//!
//! A template row has three parts (subject, body, html). `{% extends "x" %}` and
//! `{% include "x" %}` in a part refer to the same part of template `x`. The main template is
//! the version pinned at enqueue; the layouts and partials it names are their current versions.

use std::collections::HashMap;
use std::fmt;
use std::io;
use std::sync::Arc;

use minijinja::{AutoEscape, Environment, Error, ErrorKind, UndefinedBehavior, Value};

/// The three parts of a template row (sources) or of a rendered message (results).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Parts {
    pub subject: String,
    pub body: Option<String>,
    pub html: Option<String>,
}

/// Which part of a template.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Part {
    Subject,
    Body,
    Html,
}

impl Part {
    pub fn name(self) -> &'static str {
        match self {
            Part::Subject => "subject",
            Part::Body => "body",
            Part::Html => "html",
        }
    }

    fn of(self, p: &Parts) -> Option<&str> {
        match self {
            Part::Subject => Some(p.subject.as_str()),
            Part::Body => p.body.as_deref(),
            Part::Html => p.html.as_deref(),
        }
    }
}

/// Limits on one render.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// minijinja fuel: instructions one part may execute.
    pub fuel: u64,
    /// Largest output of one part, in bytes.
    pub max_size: usize,
}

/// A template that cannot be saved or rendered.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RenderError {
    /// A syntax error, with its position in the part's source (1-based line and column).
    Syntax { template: String, part: &'static str, line: usize, column: usize, message: String },
    /// Variables the data does not provide.
    Missing { template: String, part: &'static str, names: Vec<String>, message: String },
    /// Anything else: fuel, recursion, size, a filter failing, a bad subject.
    Failed { template: String, part: &'static str, message: String },
}

impl fmt::Display for RenderError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            RenderError::Syntax { template, part, line, column, message } => {
                write!(f, "template \"{template}\", {part} part, line {line}, column {column}: {message}")
            }
            RenderError::Missing { template, part, names, message } if !names.is_empty() => write!(
                f,
                "template \"{template}\", {part} part: data has no {} ({message})",
                names.iter().map(|n| format!("\"{n}\"")).collect::<Vec<_>>().join(", ")
            ),
            RenderError::Missing { template, part, message, .. } | RenderError::Failed { template, part, message } => {
                write!(f, "template \"{template}\", {part} part: {message}")
            }
        }
    }
}

impl std::error::Error for RenderError {}

/// Current sources of every stored template, by name.
pub type Library = HashMap<String, Parts>;

fn column_of(source: &str, byte: usize) -> usize {
    let byte = byte.min(source.len());
    let line_start = source[..byte].rfind('\n').map_or(0, |i| i + 1);
    source[line_start..byte].chars().count() + 1
}

/// The most specific description of an error: include and extends wrap the inner error.
fn message_of(e: &Error) -> String {
    let mut inner = e;
    while let Some(next) = std::error::Error::source(inner).and_then(|s| s.downcast_ref::<Error>()) {
        inner = next;
    }
    let kind = inner.kind().to_string();
    match inner.detail() {
        Some(d) if !d.is_empty() => format!("{kind}: {d}"),
        _ => kind,
    }
}

/// A writer that refuses to grow past `limit` bytes.
struct Capped {
    out: Vec<u8>,
    limit: usize,
}

impl io::Write for Capped {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        if self.out.len() + buf.len() > self.limit {
            return Err(io::Error::other("output limit"));
        }
        self.out.extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

const MAIN: &str = "\u{0}main";

/// An environment whose error texts do not depend on the build: minijinja's debug mode (on by
/// default in debug builds) words errors differently.
fn plain_environment<'a>() -> Environment<'a> {
    let mut env = Environment::new();
    env.set_debug(false);
    env
}

fn environment<'a>(part: Part, main: &Parts, library: Arc<Library>, fuel: u64) -> Environment<'a> {
    let mut env = plain_environment();
    env.set_undefined_behavior(UndefinedBehavior::Strict);
    env.set_fuel(Some(fuel));
    env.set_recursion_limit(50);
    env.set_auto_escape_callback(move |_| if part == Part::Html { AutoEscape::Html } else { AutoEscape::None });
    minijinja_contrib::add_to_environment(&mut env);
    let own = Part::of(part, main).map(str::to_string);
    env.set_loader(move |name| {
        if name == MAIN {
            return Ok(own.clone());
        }
        Ok(library.get(name).and_then(|p| part.of(p)).map(str::to_string))
    });
    env
}

/// 1-based line and column of byte `at` in `src`.
fn position_of(src: &str, at: usize) -> (usize, usize) {
    let before = &src[..at.min(src.len())];
    let line = before.matches('\n').count() + 1;
    (line, column_of(src, at))
}

/// The first filter (`x | name`) or test (`x is name`) in `src` that the render environment
/// does not know, with its byte offset. minijinja resolves these only when the expression runs,
/// so without this check a typo would surface only when some data takes that branch.
fn unknown_names(src: &str) -> Option<(&'static str, String, usize)> {
    let env = environment(Part::Body, &Parts::default(), Arc::new(Library::new()), 10_000);
    let known = |kind: &str, name: &str| {
        let probe =
            if kind == "filter" { format!("{{{{ none | {name} }}}}") } else { format!("{{{{ none is {name} }}}}") };
        match env.render_str(&probe, ()) {
            Ok(_) => true,
            Err(e) => !matches!(e.kind(), minijinja::ErrorKind::UnknownFilter | minijinja::ErrorKind::UnknownTest),
        }
    };
    for (kind, name, at) in names_in_expressions(src) {
        if !known(kind, &name) {
            return Some((kind, name, at));
        }
    }
    None
}

/// Every filter and test name used inside `{{ }}` and `{% %}` blocks, outside string literals.
fn names_in_expressions(src: &str) -> Vec<(&'static str, String, usize)> {
    let bytes = src.as_bytes();
    let mut out = Vec::new();
    let mut i = 0;
    while i + 1 < bytes.len() {
        // Bytes, not &str slices: `i + 1` may be inside a multi-byte character.
        if bytes[i] != b'{' || (bytes[i + 1] != b'{' && bytes[i + 1] != b'%') {
            i += 1;
            continue;
        }
        let close = if bytes[i + 1] == b'{' { "}}" } else { "%}" };
        let Some(len) = src[i + 2..].find(close) else { break };
        let (start, end) = (i + 2, i + 2 + len);
        let mut j = start;
        let mut quote: Option<u8> = None;
        let mut expect: Option<&'static str> = None; // after `|` or `is`: the next word is a name
        while j < end {
            let c = bytes[j];
            if let Some(q) = quote {
                if c == b'\\' {
                    j += 1;
                } else if c == q {
                    quote = None;
                }
                j += 1;
                continue;
            }
            if c == b'"' || c == b'\'' {
                quote = Some(c);
                expect = None;
                j += 1;
            } else if c == b'|' {
                expect = Some("filter");
                j += 1;
            } else if c.is_ascii_alphabetic() || c == b'_' {
                let w = j;
                while j < end && (bytes[j].is_ascii_alphanumeric() || bytes[j] == b'_') {
                    j += 1;
                }
                let word = &src[w..j];
                match (expect, word) {
                    (Some("test"), "not") => {}
                    (Some(kind), _) => {
                        out.push((kind, word.to_string(), w));
                        expect = None;
                    }
                    (None, "is") => expect = Some("test"),
                    _ => {}
                }
            } else {
                if !c.is_ascii_whitespace() {
                    expect = None;
                }
                j += 1;
            }
        }
        i = end + 2;
    }
    out
}

/// Compiles every part of a template; the first syntax error is returned with its position, as
/// is the first unknown filter or test.
pub fn check_syntax(name: &str, parts: &Parts) -> Result<(), RenderError> {
    for part in [Part::Subject, Part::Body, Part::Html] {
        let Some(src) = part.of(parts) else { continue };
        let env = plain_environment();
        if let Err(e) = env.template_from_named_str(name, src) {
            let line = e.line().unwrap_or(1);
            let column = e.range().map_or(1, |r| column_of(src, r.start));
            return Err(RenderError::Syntax {
                template: name.into(),
                part: part.name(),
                line,
                column,
                message: message_of(&e),
            });
        }
        if let Some((kind, unknown, at)) = unknown_names(src) {
            let (line, column) = position_of(src, at);
            return Err(RenderError::Syntax {
                template: name.into(),
                part: part.name(),
                line,
                column,
                message: format!("unknown {kind} \"{unknown}\""),
            });
        }
    }
    Ok(())
}

fn render_part(
    name: &str,
    part: Part,
    main: &Parts,
    library: &Arc<Library>,
    data: &Value,
    limits: Limits,
) -> Result<Option<String>, RenderError> {
    let Some(src) = part.of(main) else { return Ok(None) };
    let env = environment(part, main, library.clone(), limits.fuel);
    let failed = |message: String| RenderError::Failed { template: name.into(), part: part.name(), message };
    let tmpl = env.get_template(MAIN).map_err(|e| {
        let line = e.line().unwrap_or(1);
        let column = e.range().map_or(1, |r| column_of(src, r.start));
        if e.kind() == ErrorKind::TemplateNotFound {
            failed(message_of(&e))
        } else {
            RenderError::Syntax { template: name.into(), part: part.name(), line, column, message: message_of(&e) }
        }
    })?;
    let mut out = Capped { out: Vec::new(), limit: limits.max_size };
    let result = tmpl.render_captured_to(data.clone(), &mut out).map(drop);
    match result {
        Ok(()) => Ok(Some(String::from_utf8_lossy(&out.out).into_owned())),
        Err(e) if e.kind() == ErrorKind::WriteFailure => {
            Err(failed(format!("the output is larger than pg_email.max_message_size ({} bytes)", limits.max_size)))
        }
        Err(e) if e.kind() == ErrorKind::UndefinedError => {
            let mut names: Vec<String> = tmpl
                .undeclared_variables(false)
                .into_iter()
                .filter(|v| data.get_attr(v).map_or(true, |x| x.is_undefined()))
                .collect();
            names.sort();
            let line = e.line().map(|l| format!(" at line {l}")).unwrap_or_default();
            Err(RenderError::Missing {
                template: name.into(),
                part: part.name(),
                names,
                message: format!("{}{line}", message_of(&e)),
            })
        }
        Err(e) if e.kind() == ErrorKind::OutOfFuel => Err(failed(format!(
            "the template ran out of fuel (pg_email.template_fuel = {}): an endless or very long loop?",
            limits.fuel
        ))),
        Err(e) => {
            let line = e.line().map(|l| format!(" (line {l})")).unwrap_or_default();
            Err(failed(format!("{}{line}", message_of(&e))))
        }
    }
}

/// Renders a template's three parts with `data`. The HTML part is auto-escaped; when there is
/// HTML but no text part, a readable text part is derived from the HTML.
pub fn render(
    name: &str,
    main: &Parts,
    library: &Arc<Library>,
    data: &serde_json::Value,
    limits: Limits,
) -> Result<Parts, RenderError> {
    let data = Value::from(minijinja::value::Serde(data));
    let subject = render_part(name, Part::Subject, main, library, &data, limits)?.unwrap_or_default();
    let subject = subject.trim_end_matches(['\r', '\n']).trim_start().to_string();
    if subject.contains(['\r', '\n', '\0']) {
        return Err(RenderError::Failed {
            template: name.into(),
            part: "subject",
            message: "the rendered subject contains a line break (subjects are one line)".into(),
        });
    }
    let html = render_part(name, Part::Html, main, library, &data, limits)?;
    let body = match render_part(name, Part::Body, main, library, &data, limits)? {
        Some(b) => Some(b),
        None => match &html {
            Some(h) => Some(html_to_text(h).map_err(|message| RenderError::Failed {
                template: name.into(),
                part: "html",
                message,
            })?),
            None => None,
        },
    };
    Ok(Parts { subject, body, html })
}

/// A plain-text rendering of HTML, links as numbered footnotes.
pub fn html_to_text(html: &str) -> Result<String, String> {
    html2text::config::plain()
        .link_footnotes(true)
        .string_from_read(html.as_bytes(), 78)
        .map(|s| s.trim_end().to_string() + "\n")
        .map_err(|e| format!("cannot derive a text part from the HTML: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;
    use std::time::Instant;

    fn parts(subject: &str, body: Option<&str>, html: Option<&str>) -> Parts {
        Parts { subject: subject.into(), body: body.map(Into::into), html: html.map(Into::into) }
    }

    fn limits() -> Limits {
        Limits { fuel: 1_000_000, max_size: 1 << 20 }
    }

    fn lib(items: &[(&str, Parts)]) -> Arc<Library> {
        Arc::new(items.iter().map(|(n, p)| (n.to_string(), p.clone())).collect())
    }

    #[test]
    fn unknown_filters_and_tests_are_refused_at_save_time_with_their_position() {
        let p = parts("s", Some("Hi\n  {{ name | nosuchfilter }}"), None);
        let RenderError::Syntax { line, column, message, part, .. } = check_syntax("t", &p).unwrap_err() else {
            panic!("not a syntax error")
        };
        assert_eq!((part, line, column, message.as_str()), ("body", 2, 13, "unknown filter \"nosuchfilter\""));
        let p = parts("{% if x is shiny %}y{% endif %}", None, Some("h"));
        let e = check_syntax("t", &p).unwrap_err().to_string();
        assert_eq!(e, "template \"t\", subject part, line 1, column 12: unknown test \"shiny\"");
        let fine = "{{ x | upper }}{% if x is not defined %}{% endif %}{{ 'a | nope' }}{{ \"x is nope\" }}\
                    {% for i in items | sort %}{{ i | default('-') | e }}{% endfor %}{{ d | datetimeformat }}";
        assert_eq!(check_syntax("t", &parts(fine, None, Some(fine))), Ok(()));
    }

    #[test]
    fn syntax_errors_name_part_line_and_column() {
        let e = check_syntax("t", &parts("ok", Some("line one\nhello {{ name }\n"), None)).unwrap_err();
        match e {
            RenderError::Syntax { part, line, column, .. } => {
                assert_eq!((part, line), ("body", 2));
                assert!(column > 1, "{column}");
            }
            other => panic!("{other:?}"),
        }
        let e = check_syntax("t", &parts("{% if %}", None, Some("x"))).unwrap_err();
        assert!(e.to_string().contains("subject part, line 1"), "{e}");
        assert!(check_syntax("t", &parts("Hi {{ name }}", Some("{% for x in xs %}{{ x }}{% endfor %}"), None)).is_ok());
    }

    #[test]
    fn escaping_applies_to_html_only() {
        let r = render(
            "t",
            &parts("{{ v }}", Some("{{ v }}"), Some("<p>{{ v }}</p>")),
            &lib(&[]),
            &json!({"v": "<script>x</script>"}),
            limits(),
        )
        .unwrap();
        assert_eq!(r.subject, "<script>x</script>");
        assert_eq!(r.body.as_deref(), Some("<script>x</script>"));
        assert_eq!(r.html.as_deref(), Some("<p>&lt;script&gt;x&lt;&#x2f;script&gt;</p>"));
    }

    #[test]
    fn missing_variables_are_named_and_defaults_pass() {
        let e = render("order", &parts("Hi {{ name }}", Some("{{ total }}"), None), &lib(&[]), &json!({}), limits())
            .unwrap_err();
        assert!(e.to_string().contains("\"name\""), "{e}");
        assert!(e.to_string().contains("template \"order\""), "{e}");
        let ok = render(
            "t",
            &parts("{{ x | default('y') }}", Some("{% if x is defined %}{{ x }}{% else %}none{% endif %}"), None),
            &lib(&[]),
            &json!({}),
            limits(),
        )
        .unwrap();
        assert_eq!((ok.subject.as_str(), ok.body.as_deref()), ("y", Some("none")));
    }

    #[test]
    fn layouts_and_partials_come_from_other_rows() {
        let library = lib(&[
            (
                "base",
                parts(
                    "[Shop] {% block s %}{% endblock %}",
                    Some("{% block b %}{% endblock %}\n-- {% include 'footer' %}"),
                    Some("<main>{% block b %}{% endblock %}</main>{% include 'footer' %}"),
                ),
            ),
            ("footer", parts("", Some("The Shop"), Some("<footer>The Shop</footer>"))),
        ]);
        let main = parts(
            "{% extends 'base' %}{% block s %}Order {{ n }}{% endblock %}",
            Some("{% extends 'base' %}{% block b %}Thanks for order {{ n }}{% endblock %}"),
            Some("{% extends 'base' %}{% block b %}<p>Order {{ n }}</p>{% endblock %}"),
        );
        let r = render("order", &main, &library, &json!({"n": 7}), limits()).unwrap();
        assert_eq!(r.subject, "[Shop] Order 7");
        assert_eq!(r.body.as_deref(), Some("Thanks for order 7\n-- The Shop"));
        assert_eq!(r.html.as_deref(), Some("<main><p>Order 7</p></main><footer>The Shop</footer>"));
    }

    #[test]
    fn a_newline_in_the_subject_is_an_error() {
        let e =
            render("t", &parts("a{{ nl }}b", Some("x"), None), &lib(&[]), &json!({"nl": "\r\nBcc: x@y.z"}), limits())
                .unwrap_err();
        assert!(e.to_string().contains("line break"), "{e}");
    }

    #[test]
    fn endless_loops_recursion_and_huge_output_fail_fast() {
        let start = Instant::now();
        let e = render(
            "t",
            &parts("x", Some("{% for i in range(1000000000) %}{{ i }}{% endfor %}"), None),
            &lib(&[]),
            &json!({}),
            limits(),
        )
        .unwrap_err();
        assert!(e.to_string().contains("range"), "{e}");
        let e = render(
            "t",
            &parts("x", Some("{% for i in range(99999) %}{% for j in range(99999) %}{% endfor %}{% endfor %}"), None),
            &lib(&[]),
            &json!({}),
            limits(),
        )
        .unwrap_err();
        assert!(e.to_string().contains("fuel"), "{e}");
        let selfish = lib(&[("me", parts("x", Some("again {% include 'me' %}"), None))]);
        let e =
            render("me", &parts("x", Some("{% include 'me' %}"), None), &selfish, &json!({}), limits()).unwrap_err();
        assert!(e.to_string().contains("recursion"), "{e}");
        let e = render(
            "t",
            &parts("x", Some("{% for i in range(50000) %}{{ 'x' * 1000 }}{% endfor %}"), None),
            &lib(&[]),
            &json!({}),
            Limits { fuel: u64::MAX / 2, max_size: 1 << 20 },
        )
        .unwrap_err();
        assert!(e.to_string().contains("max_message_size"), "{e}");
        assert!(start.elapsed().as_secs_f64() < 1.0, "{:?}", start.elapsed());
    }

    #[test]
    fn text_part_derived_from_html() {
        let r = render(
            "t",
            &parts("s", None, Some("<h1>Hi</h1><p>See <a href=\"https://x.org/a\">your order</a></p>")),
            &lib(&[]),
            &json!({}),
            limits(),
        )
        .unwrap();
        let body = r.body.unwrap();
        assert!(body.contains("Hi") && body.contains("your order") && body.contains("https://x.org/a"), "{body}");
    }

    #[test]
    fn mail_filters_exist() {
        let r = render(
            "t",
            &parts(
                "{{ 'a b&c' | urlencode }}",
                Some("{{ 1700000000 | datetimeformat(format='%Y-%m-%d %H:%M', tz='Europe/Berlin') }}"),
                None,
            ),
            &lib(&[]),
            &json!({}),
            limits(),
        )
        .unwrap();
        assert_eq!(r.subject, "a%20b%26c");
        assert_eq!(r.body.as_deref(), Some("2023-11-14 23:13"));
    }
}
