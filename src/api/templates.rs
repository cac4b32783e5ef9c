//! Templates in SQL: the save-time check called by the `email.templates` trigger, the preview
//! `email.render`, and the enqueue-time check of `email.send_template`. All run in the caller's
//! backend; the templates are read through `crate::catalog` and rendered by `crate::render`,
//! the same code the worker uses.

use pgrx::prelude::*;
use pgrx::JsonB;

use super::{raise, spi_failed, undefined};
use crate::gucs;
use crate::render::{self, Limits, Parts, RenderError};

const NO_TEMPLATE_HINT: &str = "Store it first: INSERT INTO email.templates (name, subject, body) VALUES (...).";

pub(crate) fn limits() -> Limits {
    Limits { fuel: gucs::template_fuel(), max_size: gucs::max_message_size() }
}

fn report(e: RenderError) -> ! {
    let code = match e {
        RenderError::Syntax { .. } => PgSqlErrorCode::ERRCODE_SYNTAX_ERROR,
        _ => PgSqlErrorCode::ERRCODE_INVALID_PARAMETER_VALUE,
    };
    raise(code, e.to_string(), None)
}

/// Raises "template ... does not exist".
pub(crate) fn no_such_template(name: &str) -> ! {
    undefined("template", name, Some(NO_TEMPLATE_HINT))
}

/// Renders the current version of `name` with `data`, as the worker would; errors are raised.
/// Templates always get `unsubscribe_url` (the worker puts the message's own link there, or an
/// empty string when the message has no single recipient); a preview shows a stand-in link.
pub(crate) fn render_current(name: &str, data: &serde_json::Value) -> Parts {
    let lib = crate::catalog::library().unwrap_or_else(|e| spi_failed(e));
    let Some(main) = lib.get(name).cloned() else { no_such_template(name) };
    let data = match data {
        serde_json::Value::Object(m) if !m.contains_key("unsubscribe_url") => {
            let mut m = m.clone();
            let link = crate::gucs::public_url().map(|u| format!("{u}/u/preview")).unwrap_or_default();
            m.insert("unsubscribe_url".into(), link.into());
            std::borrow::Cow::Owned(serde_json::Value::Object(m))
        }
        _ => std::borrow::Cow::Borrowed(data),
    };
    render::render(name, &main, &lib, &data, limits()).unwrap_or_else(|e| report(e))
}

/// Called by the `email.templates` trigger: refuses a row whose parts do not compile.
#[pg_extern(volatile, parallel_unsafe)]
fn _check_template(name: &str, subject: &str, body: Option<&str>, html: Option<&str>) {
    let parts = Parts { subject: subject.into(), body: body.map(Into::into), html: html.map(Into::into) };
    render::check_syntax(name, &parts).unwrap_or_else(|e| report(e));
}

/// Renders a stored template exactly as the worker would, for a preview.
#[pg_extern(volatile, parallel_unsafe, security_definer)]
#[search_path(pg_catalog, email, pg_temp)]
fn render(
    template: &str,
    data: default!(JsonB, "'{}'"),
) -> TableIterator<'static, (name!(subject, String), name!(body, Option<String>), name!(html, Option<String>))> {
    let p = render_current(template, &data.0);
    TableIterator::once((p.subject, p.body, p.html))
}
