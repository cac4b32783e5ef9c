//! The stored templates as both sides read them: backends (preview, the enqueue-time check of
//! `email.send_template`) and the worker (rendering at send time, with layouts and partials).
//! Runs on the calling process's main thread, inside the caller's transaction (the worker opens
//! a short one for it). Each process keeps one copy of the library and reads it again only
//! when the templates' fingerprint changes.

use std::cell::RefCell;
use std::sync::Arc;

use pgrx::prelude::*;

use crate::render::{Library, Parts};

const FINGERPRINT: &str = include_str!("../sql/catalog/template_fingerprint.sql");
const TEMPLATES: &str = include_str!("../sql/catalog/templates.sql");

thread_local! {
    /// This process's copy of the current templates, with the fingerprint it was read at.
    static LIBRARY: RefCell<Option<(String, Arc<Library>)>> = const { RefCell::new(None) };
}

/// The current templates, read again only when they changed. Needs a transaction.
pub fn library() -> Result<Arc<Library>, pgrx::spi::SpiError> {
    let fingerprint = Spi::get_one::<String>(FINGERPRINT)?.unwrap_or_default();
    let cached = LIBRARY.with(|c| match &*c.borrow() {
        Some((fp, lib)) if *fp == fingerprint => Some(lib.clone()),
        _ => None,
    });
    if let Some(lib) = cached {
        return Ok(lib);
    }
    // No borrow is held while SPI runs: nothing here can re-enter, but keep it that way.
    let lib = Arc::new(read_library()?);
    LIBRARY.with(|c| *c.borrow_mut() = Some((fingerprint, lib.clone())));
    Ok(lib)
}

/// Reads every current template.
fn read_library() -> Result<Library, pgrx::spi::SpiError> {
    Spi::connect(|client| {
        let mut lib = Library::new();
        for r in client.select(TEMPLATES, None, &[])? {
            let name: String = r.get_by_name("name")?.unwrap_or_default();
            let parts = Parts {
                subject: r.get_by_name("subject")?.unwrap_or_default(),
                body: r.get_by_name("body")?,
                html: r.get_by_name("html")?,
            };
            lib.insert(name, parts);
        }
        Ok(lib)
    })
}
