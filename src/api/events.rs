//! Events heard back, from SQL: `email.ingest_webhook` (the listener's webhook route, for
//! replays and tests) and `email.rotate_tracking_key`. Runs in the caller's backend and
//! transaction; never touches the network (an SES event needs its SNS certificate already kept
//! by the listener, or pinned with `sns_cert_pem`).

use pgrx::prelude::*;
use pgrx::JsonB;

use super::{raise, spi_failed, undefined};
use crate::deliver::dsn;
use crate::webhook::{self, Verified};

const TRANSPORT_SECRET: &str = include_str!("../../sql/api/transport_secret.sql");
const SNS_CERTIFICATE: &str = include_str!("../../sql/api/sns_certificate.sql");
const NEW_TRACKING_KEY: &str = include_str!("../../sql/api/new_tracking_key.sql");
const RECORD_EVENTS: &str = include_str!("../../sql/api/record_events.sql");

/// Verifies and stores one provider webhook request exactly as the listener's
/// `POST /webhooks/<transport>` does; returns the rows stored (a repeat stores none).
#[pg_extern(volatile, security_definer, parallel_unsafe)]
#[search_path(pg_catalog, email, pg_temp)]
fn ingest_webhook(transport: Option<&str>, headers: Option<JsonB>, body: Option<&[u8]>) -> i32 {
    let name = transport.unwrap_or_else(|| super::invalid(crate::message::FieldError::required("transport")));
    let body = body.unwrap_or_else(|| super::invalid(crate::message::FieldError::required("body")));
    let headers = header_list(headers.map(|h| h.0));
    let raw = Spi::get_one_with_args::<String>(TRANSPORT_SECRET, &[name.into()])
        .unwrap_or_else(|e| match e {
            pgrx::spi::SpiError::InvalidPosition => None,
            e => spi_failed(e),
        })
        .unwrap_or_else(|| undefined("transport", name, Some("Register it with email.add_transport(name, dsn).")));
    let cfg = dsn::parse(&raw)
        .map_err(|e| e.to_string())
        .and_then(|d| webhook::Config::from_dsn(&d))
        .unwrap_or_else(|e| {
            raise(PgSqlErrorCode::ERRCODE_INVALID_PARAMETER_VALUE, format!("transport \"{name}\": {e}"), None)
        })
        .unwrap_or_else(|| {
            raise(
                PgSqlErrorCode::ERRCODE_INVALID_PARAMETER_VALUE,
                format!("transport \"{name}\" has no webhook settings"),
                Some("Add the provider's webhook option to its DSN (see the README: webhook set-up)."),
            )
        });
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs() as i64);
    let request = webhook::Request { headers: &headers, body, now };
    let mut verified = webhook::verify(&cfg, &request, None);
    if let Ok(Verified::NeedCertificate(url)) = &verified {
        let pem = Spi::get_one_with_args::<String>(SNS_CERTIFICATE, &[url.as_str().into()]).ok().flatten();
        let Some(pem) = pem else {
            raise(
                PgSqlErrorCode::ERRCODE_OBJECT_NOT_IN_PREREQUISITE_STATE,
                format!("the SNS signing certificate {url} is not known here"),
                Some("email.ingest_webhook does no network I/O: post the event to the listener once, or pin the certificate with the DSN option sns_cert_pem."),
            )
        };
        verified = webhook::verify(&cfg, &request, Some(pem.as_bytes()));
    }
    let rows: Vec<serde_json::Value> = match verified {
        Err(refused) => {
            let code = if refused.status == 400 {
                PgSqlErrorCode::ERRCODE_INVALID_PARAMETER_VALUE
            } else {
                PgSqlErrorCode::ERRCODE_INVALID_AUTHORIZATION_SPECIFICATION
            };
            raise(code, format!("webhook refused (HTTP {}): {}", refused.status, refused.reason), None)
        }
        Ok(Verified::Ignore(_)) | Ok(Verified::NeedCertificate(_)) => return 0,
        Ok(Verified::Confirm { subscribe_url, payload }) => {
            notice!("pg_email: an SNS subscription confirmation: confirm it by fetching {subscribe_url}");
            vec![serde_json::json!({
                "transport": name, "source": "webhook", "event": "subscription_confirmation",
                "provider_event_id": payload.get("MessageId").and_then(|v| v.as_str()),
                "reason": "SNS subscription confirmation, not confirmed (email.ingest_webhook does no network I/O)",
                "payload": payload,
            })]
        }
        Ok(Verified::Events(events)) => events.iter().map(|e| webhook::row(name, e)).collect(),
    };
    if rows.is_empty() {
        return 0;
    }
    Spi::get_one_with_args::<i32>(RECORD_EVENTS, &[JsonB(serde_json::Value::Array(rows)).into()])
        .unwrap_or_else(|e| spi_failed(e))
        .unwrap_or(0)
}

/// Headers given as a JSON object (`{"Name": "value"}`) or an array of `[name, value]` pairs.
fn header_list(h: Option<serde_json::Value>) -> Vec<(String, String)> {
    fn bad() -> ! {
        super::invalid(crate::message::FieldError::new(
            "headers",
            "must be a JSON object of header names to string values, or an array of [name, value] pairs",
        ))
    }
    match h {
        None | Some(serde_json::Value::Null) => Vec::new(),
        Some(serde_json::Value::Object(m)) => m
            .into_iter()
            .map(|(k, v)| match v {
                serde_json::Value::String(s) => (k.to_ascii_lowercase(), s),
                _ => bad(),
            })
            .collect(),
        Some(serde_json::Value::Array(a)) => a
            .into_iter()
            .map(|p| match p.as_array().map(|p| p.as_slice()) {
                Some([serde_json::Value::String(k), serde_json::Value::String(v)]) => {
                    (k.to_ascii_lowercase(), v.clone())
                }
                _ => bad(),
            })
            .collect(),
        Some(_) => bad(),
    }
}

/// Starts a new tracking key and returns its id. Links signed with older keys keep working.
#[pg_extern(volatile, security_definer, parallel_unsafe)]
#[search_path(pg_catalog, email, pg_temp)]
fn rotate_tracking_key() -> i32 {
    use ring::rand::SecureRandom;
    for _ in 0..8 {
        let mut secret = vec![0u8; 32];
        if ring::rand::SystemRandom::new().fill(&mut secret).is_err() {
            raise(PgSqlErrorCode::ERRCODE_INTERNAL_ERROR, "no random bytes for a tracking key", None);
        }
        let kid = Spi::get_one_with_args::<i32>(NEW_TRACKING_KEY, &[secret.into()]).unwrap_or_else(|e| match e {
            pgrx::spi::SpiError::InvalidPosition => None,
            e => spi_failed(e),
        });
        if let Some(kid) = kid {
            return kid;
        }
    }
    raise(PgSqlErrorCode::ERRCODE_INTERNAL_ERROR, "no free tracking key id was found", None)
}

const TRACKING_KEYS: &str = include_str!("../../sql/worker/tracking_keys.sql");
const RECORD_INBOUND: &str = include_str!("../../sql/api/record_inbound.sql");

/// The tracking keys (which also sign VERP and unsubscribe addresses).
fn tracking_keys() -> crate::tracking::Keys {
    let pairs = Spi::connect(|client| {
        client
            .select(TRACKING_KEYS, None, &[])
            .unwrap_or_else(|e| spi_failed(e))
            .filter_map(|r| Some((r.get_by_name::<i32, _>("kid").ok()??, r.get_by_name::<Vec<u8>, _>("secret").ok()??)))
            .collect()
    });
    crate::tracking::Keys::new(pairs)
}

/// Stores one received message exactly as the listener's SMTP/LMTP service does (for a Postfix
/// `pipe` and for replays): classified, matched to our message, its reports recorded with
/// their effects. Returns the `email.inbound` id.
#[pg_extern(volatile, security_definer, parallel_unsafe)]
#[search_path(pg_catalog, email, pg_temp)]
fn ingest_message(
    raw: Option<&[u8]>,
    rcpt_to: default!(Option<Vec<Option<String>>>, "NULL"),
    mail_from: default!(Option<&str>, "NULL"),
) -> i64 {
    let raw = raw.unwrap_or_else(|| super::invalid(crate::message::FieldError::required("raw")));
    let limit = crate::gucs::max_message_size();
    if raw.len() > limit {
        raise(
            PgSqlErrorCode::ERRCODE_PROGRAM_LIMIT_EXCEEDED,
            format!("invalid raw: the message is {} bytes, over pg_email.max_message_size ({limit} bytes)", raw.len()),
            None,
        )
    }
    let rcpt: Vec<String> = rcpt_to.unwrap_or_default().into_iter().flatten().collect();
    let parsed = crate::inbound::parse(raw, &rcpt, Some(crate::inbound::row::UNSUBSCRIBE_PREFIX))
        .unwrap_or_else(|e| super::invalid(crate::message::FieldError::new("raw", e)));
    let named = crate::inbound::row::return_of(&rcpt, crate::gucs::bounce_domain().as_deref(), &tracking_keys());
    let row = crate::inbound::row::row(&parsed, mail_from, &rcpt, named);
    Spi::get_one_with_args::<i64>(RECORD_INBOUND, &[JsonB(row).into(), raw.into()])
        .unwrap_or_else(|e| spi_failed(e))
        .unwrap_or_else(|| raise(PgSqlErrorCode::ERRCODE_INTERNAL_ERROR, "no inbound row was stored", None))
}
