//! Templates in SQL: the save-time check called by the `email.templates` trigger, the preview
//! `email.render`, and the enqueue-time check of `email.send_template`. All run in the caller's
//! backend; rendering itself is `crate::render`, the same code the worker uses.

use std::cell::RefCell;
use std::sync::Arc;

use pgrx::prelude::*;
use pgrx::JsonB;

use super::{raise, spi_failed, undefined};
use crate::gucs;
use crate::render::{self, Library, Limits, Parts, RenderError};

thread_local! {
    /// This backend's copy of the current templates, with the fingerprint it was read at.
    static LIBRARY: RefCell<(String, Arc<Library>)> = RefCell::new((String::new(), Arc::new(Library::new())));
}

pub(crate) const FINGERPRINT: &str =
    "SELECT count(*)::text || '/' || coalesce(max(updated_at)::text, '') || '/' || coalesce(sum(version), 0)::text FROM email.templates";
pub(crate) const LOAD: &str = "SELECT name, subject, body, html FROM email.templates";

/// The current templates, re-read only when they changed.
pub(crate) fn library() -> Arc<Library> {
    let fp = Spi::get_one::<String>(FINGERPRINT).unwrap_or_else(|e| spi_failed(e)).unwrap_or_default();
    LIBRARY.with(|cell| {
        let mut c = cell.borrow_mut();
        if c.0 != fp {
            *c = (fp, Arc::new(read_library()));
        }
        c.1.clone()
    })
}

/// Reads every current template (in the caller's transaction; the worker opens its own).
pub(crate) fn read_library() -> Library {
    Spi::connect(|client| {
        client
            .select(LOAD, None, &[])
            .unwrap_or_else(|e| spi_failed(e))
            .map(|r| {
                (
                    r.get::<String>(1).ok().flatten().unwrap_or_default(),
                    Parts {
                        subject: r.get::<String>(2).ok().flatten().unwrap_or_default(),
                        body: r.get::<String>(3).ok().flatten(),
                        html: r.get::<String>(4).ok().flatten(),
                    },
                )
            })
            .collect()
    })
}

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

/// Renders the current version of `name` with `data`, as the worker would; errors are raised.
pub(crate) fn render_current(name: &str, data: &serde_json::Value) -> Parts {
    let lib = library();
    let Some(main) = lib.get(name).cloned() else {
        undefined("template", name, Some("Store it first: INSERT INTO email.templates (name, subject, body) VALUES (...)."))
    };
    render::render(name, &main, &lib, data, limits()).unwrap_or_else(|e| report(e))
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
