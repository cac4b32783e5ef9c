//! SMTP delivery with lettre's connection-level API, on the worker's tokio runtime. One pool of
//! connections per transport (`max_connections`), STARTTLS required unless the DSN says
//! otherwise, certificates always verified unless `verify=false`, every command bounded by the
//! DSN's `timeout`. Each recipient gets its own RCPT result, so one refused address does not stop
//! delivery to the others. Where the server offers PIPELINING (RFC 2920), MAIL, the RCPTs and
//! DATA go out in one write and their replies are read in order: two round trips a message
//! instead of three and one per recipient.

use std::future::Future;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use lettre::transport::smtp::authentication::{Credentials, Mechanism};
use lettre::transport::smtp::client::{AsyncSmtpConnection, Certificate, CertificateStore, TlsParameters};
use lettre::transport::smtp::commands::{Data, Ehlo, Mail, Rcpt, Rset};
use lettre::transport::smtp::extension::{ClientId, Extension, MailBodyParameter, MailParameter};
use lettre::transport::smtp::response::Response;
use lettre::transport::smtp::Error as SmtpError;
use lettre::Address;
use tokio::sync::Semaphore;

use super::dsn::{self, Dsn, Tls};
use super::{Delivery, Outgoing, Reply, TransportError};

/// Pooled connections idle longer than this are not reused (servers close idle sessions).
const MAX_IDLE: Duration = Duration::from_secs(30);

pub struct Smtp {
    host: String,
    port: u16,
    tls: Tls,
    tls_params: Option<TlsParameters>,
    credentials: Option<Credentials>,
    timeout: Duration,
    hello: ClientId,
    idle: Mutex<Vec<(Session, Instant)>>,
    permits: Semaphore,
    secrets: Vec<String>,
}

/// A connection, with what its server offers beyond what lettre keeps.
struct Session {
    conn: AsyncSmtpConnection,
    /// The server offered PIPELINING in its EHLO reply.
    pipelining: bool,
}

/// Commands sent as they are, in one write: lettre's `command` writes what it is given and
/// reads one reply, so a pipelined group is written whole and its other replies read after.
struct Group(String);

impl std::fmt::Display for Group {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

/// Whether an EHLO reply offers PIPELINING (one keyword per line after the greeting).
fn offers_pipelining<'a>(lines: impl Iterator<Item = &'a str>) -> bool {
    lines.skip(1).any(|l| l.split_whitespace().next().is_some_and(|k| k.eq_ignore_ascii_case("PIPELINING")))
}

/// The RCPT replies of one message.
#[derive(Default)]
struct Rcpts {
    accepted: usize,
    rejected: Vec<(String, Reply)>,
    deferred: Vec<(String, Reply)>,
}

impl Rcpts {
    /// Counts one RCPT reply; a broken connection is given back, to end the transaction.
    fn take(&mut self, smtp: &Smtp, rcpt: &Address, reply: Result<Response, Step>) -> Option<Step> {
        match reply {
            Ok(_) => self.accepted += 1,
            Err(Step::Refused(e)) if e.is_permanent() => self.rejected.push((rcpt.to_string(), smtp.reply_of(&e))),
            Err(Step::Refused(e)) => self.deferred.push((rcpt.to_string(), smtp.reply_of(&e))),
            Err(broken) => return Some(broken),
        }
        None
    }
}

/// A failure before the message was accepted, with whether the connection is still usable.
enum Step {
    /// The server answered; the connection can be reset and reused.
    Refused(SmtpError),
    /// Network, timeout or protocol trouble: the connection is dropped.
    Broken(Delivery),
}

/// Removes a prefix that an error chain repeats ("Connection error: Connection error: x" from
/// lettre wrapping an I/O error that already says so) so a receipt reads once.
fn collapse_repeats(text: &str) -> String {
    let mut out = text.to_string();
    while let Some((head, rest)) = out.split_once(": ") {
        let prefix = format!("{head}: ");
        match rest.strip_prefix(&prefix) {
            Some(tail) => out = format!("{prefix}{tail}"),
            None => break,
        }
    }
    out
}

/// The largest `ca=` file read: a bundle of a few hundred certificates.
const MAX_CA_BYTES: u64 = 1 << 20;

/// Reads a `ca=` file: a regular file (never a device or a FIFO, which could block or never
/// end), at most 1 MB.
fn read_ca(path: &str) -> std::io::Result<Vec<u8>> {
    use std::io::{Error, ErrorKind, Read};
    if !std::fs::metadata(path)?.is_file() {
        return Err(Error::new(ErrorKind::InvalidInput, "not a regular file"));
    }
    let mut pem = Vec::new();
    std::fs::File::open(path)?.take(MAX_CA_BYTES + 1).read_to_end(&mut pem)?;
    if pem.len() as u64 > MAX_CA_BYTES {
        return Err(Error::new(ErrorKind::InvalidData, "larger than 1 MB"));
    }
    Ok(pem)
}

impl Smtp {
    pub fn new(d: &Dsn) -> Result<Smtp, TransportError> {
        let host = d.host.clone().ok_or(TransportError::NoSmtpHost)?;
        let tls_params = if d.tls == Tls::None {
            None
        } else {
            let mut b = TlsParameters::builder(host.clone()).certificate_store(CertificateStore::Default);
            if let Some(ca) = &d.ca {
                let pem = read_ca(ca).map_err(|source| TransportError::ReadCa { path: ca.clone(), source })?;
                let cert =
                    Certificate::from_pem(&pem).map_err(|source| TransportError::BadCa { path: ca.clone(), source })?;
                b = b.add_root_certificate(cert);
            }
            if !d.verify {
                b = b.dangerous_accept_invalid_certs(true).dangerous_accept_invalid_hostnames(true);
            }
            Some(b.build_rustls().map_err(TransportError::Tls)?)
        };
        let hello = match d.options.get("helo") {
            Some(h) => ClientId::Domain(h.clone()),
            None => ClientId::default(),
        };
        Ok(Smtp {
            port: d.port.unwrap_or(25),
            host,
            tls: d.tls,
            tls_params,
            credentials: d.user.clone().map(|u| Credentials::new(u, d.password.clone().unwrap_or_default())),
            timeout: d.timeout,
            hello,
            idle: Mutex::new(Vec::new()),
            permits: Semaphore::new(d.max_connections as usize),
            secrets: d.secrets().iter().map(|s| s.to_string()).collect(),
        })
    }

    fn reply_of(&self, e: &SmtpError) -> Reply {
        let code = e.status().map(u16::from);
        let mut text = collapse_repeats(&e.to_string());
        // "permanent error (550): 5.1.1 ..." -> "5.1.1 ..."
        if code.is_some() {
            if let Some(at) = text.find("): ") {
                text = text[at + 3..].to_string();
            }
        }
        Reply::new(code, dsn::scrub(&text, &self.secrets.iter().map(String::as_str).collect::<Vec<_>>()))
    }

    /// Classifies an error from connecting or from a whole-message command.
    fn classify(&self, e: &SmtpError, rejected: Vec<(String, Reply)>) -> Delivery {
        let reply = self.reply_of(e);
        // rustls reports a refused certificate inside a connection error: it is a
        // configuration problem that retrying will not fix.
        let tls = e.is_tls() || reply.text.contains("invalid peer certificate") || reply.text.contains("certificate");
        if e.is_permanent() || tls || e.is_client() {
            let reply = if tls { Reply { text: format!("TLS failure: {}", reply.text), ..reply } } else { reply };
            Delivery::Permanent { reply, rejected }
        } else {
            Delivery::Transient { reply, retry_after: None, rejected }
        }
    }

    fn timed_out(&self, what: &str) -> Delivery {
        let text = format!("timed out after {:?} waiting for {what} from {}:{}", self.timeout, self.host, self.port);
        Delivery::transient(Reply::new(None, text))
    }

    async fn bounded<T>(&self, what: &str, f: impl Future<Output = Result<T, SmtpError>>) -> Result<T, Step> {
        match tokio::time::timeout(self.timeout, f).await {
            Err(_) => Err(Step::Broken(self.timed_out(what))),
            Ok(Ok(v)) => Ok(v),
            Ok(Err(e)) if e.is_permanent() || e.is_transient() => Err(Step::Refused(e)),
            Ok(Err(e)) => Err(Step::Broken(self.classify(&e, Vec::new()))),
        }
    }

    /// `bounded`, for a step of setting up a connection: any failure ends this attempt.
    async fn setup<T>(&self, what: &str, f: impl Future<Output = Result<T, SmtpError>>) -> Result<T, Delivery> {
        self.bounded(what, f).await.map_err(|step| match step {
            Step::Broken(d) => d,
            Step::Refused(e) => self.classify(&e, Vec::new()),
        })
    }

    async fn connect(&self) -> Result<Session, Delivery> {
        let mut conn = if self.tls == Tls::Implicit {
            let connecting = AsyncSmtpConnection::connect_tokio1(
                (self.host.as_str(), self.port),
                Some(self.timeout),
                &self.hello,
                self.tls_params.clone(),
                None,
            );
            self.setup("the greeting", connecting).await?
        } else {
            // Our own socket, with Nagle off: lettre writes the message and its final dot in
            // two writes, which Nagle plus delayed ACKs would stall for 40 ms per message.
            let connecting = tokio::net::TcpStream::connect((self.host.as_str(), self.port));
            let tcp = match tokio::time::timeout(self.timeout, connecting).await {
                Err(_) => return Err(self.timed_out("the connection")),
                Ok(Err(e)) => {
                    let text = format!("cannot connect to {}:{}: {e}", self.host, self.port);
                    return Err(Delivery::transient(Reply::new(None, text)));
                }
                Ok(Ok(tcp)) => tcp,
            };
            let _ = tcp.set_nodelay(true);
            self.setup("the greeting", AsyncSmtpConnection::connect_with_transport(Box::new(tcp), &self.hello)).await?
        };
        if self.tls == Tls::StartTls {
            if !conn.can_starttls() {
                let text = format!(
                    "{}:{} does not offer STARTTLS, which this transport requires (add tls=none to the DSN to allow plain text)",
                    self.host, self.port
                );
                return Err(Delivery::permanent(Reply::new(None, text)));
            }
            let params = self
                .tls_params
                .clone()
                .ok_or_else(|| Delivery::permanent(Reply::new(None, "TLS parameters missing")))?;
            self.setup("STARTTLS", conn.starttls(params, &self.hello)).await?;
        }
        // lettre keeps only the EHLO keywords it uses; PIPELINING is read from a second EHLO
        // (allowed at any time before MAIL: it resets the session as RSET would), once per
        // connection.
        let ehlo = self.setup("EHLO", conn.command(Ehlo::new(self.hello.clone()))).await?;
        let pipelining = offers_pipelining(ehlo.message());
        if let Some(creds) = &self.credentials {
            self.setup("AUTH", conn.auth(&[Mechanism::Plain, Mechanism::Login], creds)).await?;
        }
        Ok(Session { conn, pipelining })
    }

    /// Puts a connection back in the pool. The lock is never held across an await.
    fn park(&self, conn: Session) {
        self.idle.lock().unwrap_or_else(|e| e.into_inner()).push((conn, Instant::now()));
    }

    pub async fn send(&self, m: &Outgoing) -> Delivery {
        let Ok(_permit) = self.permits.acquire().await else {
            return Delivery::closed();
        };
        // A pooled connection may have been closed by the server; one fresh try is allowed.
        let pooled = loop {
            let next = self.idle.lock().unwrap_or_else(|e| e.into_inner()).pop();
            match next {
                Some((c, at)) if at.elapsed() < MAX_IDLE => break Some(c),
                Some(_) => continue,
                None => break None,
            }
        };
        let (mut conn, reused) = match pooled {
            Some(c) => (c, true),
            None => match self.connect().await {
                Ok(c) => (c, false),
                Err(d) => return d,
            },
        };
        let mut result = self.transaction(&mut conn, m).await;
        if reused && matches!(result, Err(Step::Broken(_))) {
            conn = match self.connect().await {
                Ok(c) => c,
                Err(d) => return d,
            };
            result = self.transaction(&mut conn, m).await;
        }
        // A connection that saw a temporary refusal is not reused: the server's state for this
        // session (a map, a limit) may be what said no, and a new session asks afresh.
        match result {
            Ok(d) => {
                if !has_deferral(&d) {
                    self.park(conn);
                }
                d
            }
            Err(Step::Broken(d)) => d,
            Err(Step::Refused(e)) => {
                let d = self.classify(&e, Vec::new());
                if !e.is_transient() && self.bounded("RSET", conn.conn.command(Rset)).await.is_ok() {
                    self.park(conn);
                }
                d
            }
        }
    }

    /// MAIL, one RCPT per recipient, DATA, the message. `Err(Refused)` is a whole-message
    /// refusal.
    async fn transaction(&self, session: &mut Session, m: &Outgoing) -> Result<Delivery, Step> {
        let conn = &mut session.conn;
        let mut params = Vec::new();
        let non_ascii = !m.from.to_string().is_ascii() || m.to.iter().any(|a| !a.to_string().is_ascii());
        if non_ascii {
            if !conn.server_info().supports_feature(Extension::SmtpUtfEight) {
                let text = "an address is not ASCII and the server does not support SMTPUTF8";
                return Ok(Delivery::permanent(Reply::new(None, text)));
            }
            params.push(MailParameter::SmtpUtfEight);
        }
        if !m.raw.is_ascii() && conn.server_info().supports_feature(Extension::EightBitMime) {
            params.push(MailParameter::Body(MailBodyParameter::EightBitMime));
        }
        let mail = Mail::new(Some(m.from.clone()), params);
        let mut rcpts = Rcpts::default();
        if session.pipelining {
            let mut group = mail.to_string();
            for rcpt in &m.to {
                group.push_str(&Rcpt::new(rcpt.clone(), Vec::new()).to_string());
            }
            group.push_str(&Data.to_string());
            let mail = match self.bounded("MAIL FROM", conn.command(Group(group))).await {
                Err(Step::Broken(d)) => return Err(Step::Broken(d)),
                mail => mail,
            };
            for rcpt in &m.to {
                if let Some(broken) = rcpts.take(self, rcpt, self.bounded("RCPT TO", conn.read_response()).await) {
                    return Err(broken);
                }
            }
            let data = match self.bounded("DATA", conn.read_response()).await {
                Err(Step::Broken(d)) => return Err(Step::Broken(d)),
                data => data,
            };
            if data.is_ok() && (mail.is_err() || rcpts.accepted == 0) {
                // RFC 2920: a server may open DATA although nothing before it was taken; an
                // empty message ends it, and is refused for want of recipients.
                let _ = self.bounded("the end of an empty message", conn.command(Group(".\r\n".into()))).await;
            }
            mail?;
            if rcpts.accepted > 0 {
                return self.message(conn, m, data, rcpts).await;
            }
        } else {
            self.bounded("MAIL FROM", conn.command(mail)).await?;
            for rcpt in &m.to {
                let reply = self.bounded("RCPT TO", conn.command(Rcpt::new(rcpt.clone(), Vec::new()))).await;
                if let Some(broken) = rcpts.take(self, rcpt, reply) {
                    return Err(broken);
                }
            }
            if rcpts.accepted > 0 {
                let data = self.bounded("DATA", conn.command(Data)).await;
                return self.message(conn, m, data, rcpts).await;
            }
        }
        // No recipient was taken.
        self.bounded("RSET", conn.command(Rset)).await?;
        let Rcpts { rejected, deferred, .. } = rcpts;
        Ok(match deferred.first() {
            Some((_, r)) => Delivery::Transient { reply: r.clone(), retry_after: None, rejected },
            None => Delivery::Permanent {
                reply: rejected.first().map(|(_, r)| r.clone()).unwrap_or_else(|| Reply::new(None, "no recipients")),
                rejected,
            },
        })
    }

    /// After DATA's reply: the message and the reply to it, or RSET when DATA was refused.
    async fn message(
        &self,
        conn: &mut AsyncSmtpConnection,
        m: &Outgoing,
        data: Result<Response, Step>,
        rcpts: Rcpts,
    ) -> Result<Delivery, Step> {
        let Rcpts { rejected, deferred, .. } = rcpts;
        match data {
            Ok(_) => {}
            Err(Step::Refused(e)) => {
                self.bounded("RSET", conn.command(Rset)).await?;
                return Ok(self.classify(&e, rejected));
            }
            Err(b) => return Err(b),
        }
        // lettre ends the data with CRLF "." CRLF itself: a message that already ends with a line
        // end (a submitted one always does) would gain an empty last line.
        let data = m.raw.strip_suffix(b"\r\n").unwrap_or(&m.raw);
        match self.bounded("the reply to the message", conn.message(data)).await {
            Ok(resp) => {
                let text = resp.message().collect::<Vec<_>>().join(" ");
                let provider_id =
                    text.split("queued as ").nth(1).and_then(|s| s.split_whitespace().next()).map(str::to_string);
                Ok(Delivery::Accepted {
                    reply: Reply::new(Some(u16::from(resp.code())), text),
                    provider_id,
                    rejected,
                    deferred,
                    captured: None,
                })
            }
            Err(Step::Refused(e)) => Ok(self.classify(&e, rejected)),
            Err(b) => Err(b),
        }
    }
}

fn has_deferral(d: &Delivery) -> bool {
    match d {
        Delivery::Transient { .. } => true,
        Delivery::Accepted { deferred, .. } => !deferred.is_empty(),
        Delivery::Permanent { .. } => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pipelining_is_read_from_the_ehlo_keywords() {
        assert!(offers_pipelining(["mx.example", "SIZE 10240000", "PIPELINING", "8BITMIME"].into_iter()));
        assert!(offers_pipelining(["mx.example", "pipelining"].into_iter()));
        assert!(!offers_pipelining(["mx.example", "8BITMIME", "X-PIPELINING-LATER", "AUTH PLAIN"].into_iter()));
        assert!(!offers_pipelining(["mx.example", "PIPELININGX"].into_iter()));
        // The first line is the server's name, not a keyword.
        assert!(!offers_pipelining(["PIPELINING"].into_iter()));
        assert!(!offers_pipelining(std::iter::empty()));
    }

    #[test]
    fn repeated_error_prefixes_are_said_once() {
        assert_eq!(
            collapse_repeats("Connection error: Connection error: invalid peer certificate: UnknownIssuer"),
            "Connection error: invalid peer certificate: UnknownIssuer"
        );
        assert_eq!(collapse_repeats("a: b: c"), "a: b: c");
    }
}
