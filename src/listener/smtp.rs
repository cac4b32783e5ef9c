//! The listener's inbound mail side: an SMTP (RFC 5321) and LMTP (RFC 2033) server for the MTA in
//! front of pg_email. No pgrx here: it runs inside the listener's current-thread runtime, and a
//! session never touches Postgres. It hands each message to `submit`, which queues it for the main
//! thread and returns once the transaction that stored it committed (or failed); only then is the
//! message answered 250.
//!
//! One port speaks both: the greeting command picks the dialect (EHLO/HELO: SMTP, one reply after
//! the message; LHLO: LMTP, one reply per accepted recipient, in RCPT order). Offered: SIZE,
//! 8BITMIME, PIPELINING, ENHANCEDSTATUSCODES. Not offered: STARTTLS and AUTH (the MTA in front
//! handles them; this listens on loopback or a private network), SMTPUTF8, DSN, CHUNKING.
//!
//! Limits: command lines of at most 1000 bytes (longer ones are read to their end without being
//! kept, then refused); a message is never kept beyond `max_message_size` (an oversized one is
//! read to its end and refused with 552); `command_timeout` for each command line,
//! `data_timeout` for the whole DATA phase; 20 failed commands in a row end the session.
//!
//! Line ends: CRLF, and a bare LF is taken as a line end too, in commands and in the message, but
//! only `<CRLF>.<CRLF>` ends a message (see `read_data`). The message is kept dot-unstuffed with
//! every line ended by CRLF.
//!
//! Submission (RFC 6409, `Config::submission`), on its own port: SMTP only, STARTTLS (RFC 3207)
//! when a certificate is configured, AUTH PLAIN and LOGIN (RFC 4954) once TLS is on or when the
//! client is on loopback, and MAIL only after AUTH; recipients in any domain. Commands pipelined
//! behind STARTTLS are dropped, never run inside the TLS session (CVE-2011-0411). Credentials are
//! checked by the caller's `authenticate`, which also says when an address has failed too often.

use std::future::Future;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::rc::Rc;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use base64::Engine;
use tokio::io::{AsyncBufRead, AsyncBufReadExt, AsyncRead, AsyncWrite, AsyncWriteExt, BufReader, ReadBuf};
use tokio::time::timeout;

/// Longest command line, CRLF included (RFC 5321 4.5.3.1.4 allows 512; extensions add to it).
pub const MAX_LINE: usize = 1000;
/// Failed commands in a row before the session is closed with 421.
pub const MAX_ERRORS: usize = 20;
/// Size of the read buffer of a connection.
const READ_BUFFER: usize = 8 * 1024;
/// Replies kept back while pipelined commands are waiting; beyond it they are written at once.
const WRITE_BUFFER: usize = 4 * 1024;
/// Longest piece of a message line handled at a time (message lines may be of any length).
const DATA_CHUNK: usize = 16 * 1024;

/// The settings of the inbound listener, shared by its sessions.
#[derive(Debug, Clone)]
pub struct Config {
    /// Names the server in the greeting and in the HELO/EHLO/LHLO reply.
    pub hostname: String,
    /// Largest message taken, in bytes as stored (dot-unstuffed, CRLF line ends); advertised as
    /// SIZE. Over it: 552 5.3.4, at MAIL time for a declared SIZE or after DATA.
    pub max_message_size: usize,
    /// Recipient domains taken, lower-case; a recipient's domain must be one of them exactly
    /// (550 5.7.1 otherwise: never a relay).
    pub accept_domains: Vec<String>,
    /// Most recipients of one message (100); 452 4.5.3 beyond.
    pub max_recipients: usize,
    /// Longest wait for a command line (RFC 5321 4.5.3.2: 5 minutes); 421 4.4.2 after it.
    pub command_timeout: Duration,
    /// Longest the whole DATA phase may take (the 354 to the final dot).
    pub data_timeout: Duration,
    /// Submission instead of inbound mail: AUTH before MAIL, any recipient domain, no LMTP.
    pub submission: bool,
    /// STARTTLS, when a certificate is configured (submission only).
    pub tls: Option<Arc<rustls::ServerConfig>>,
}

impl Default for Config {
    /// Accepts no domain: until the listener has read its settings, every recipient is refused.
    fn default() -> Config {
        Config {
            hostname: "localhost".into(),
            max_message_size: 25 * 1024 * 1024,
            accept_domains: Vec::new(),
            max_recipients: 100,
            command_timeout: Duration::from_secs(300),
            data_timeout: Duration::from_secs(600),
            submission: false,
            tls: None,
        }
    }
}

impl Config {
    /// Whether mail for `domain` is taken (ASCII case-insensitive, exact: no subdomains).
    pub fn accepts_domain(&self, domain: &str) -> bool {
        self.accept_domains.iter().any(|d| d.eq_ignore_ascii_case(domain))
    }
}

/// One received message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Envelope {
    /// The reverse path; empty for the null sender `<>`.
    pub mail_from: String,
    /// The accepted recipients, in RCPT order, as the client spelled them.
    pub rcpt_to: Vec<String>,
    /// The message as received: dot-unstuffed, every line ended by CRLF.
    pub raw: Vec<u8>,
    /// Received over LMTP (LHLO) rather than SMTP.
    pub lmtp: bool,
    /// The name the client gave in HELO, EHLO or LHLO.
    pub helo: String,
    pub peer: SocketAddr,
    /// Submission: what `authenticate` answered for the session's AUTH.
    pub login: Option<String>,
}

/// What `authenticate` says of a user name and password.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Login {
    /// Right: the identity to hand on with each message (`Envelope::login`).
    Ok(String),
    /// Wrong: 535 5.7.8.
    Wrong,
    /// This client address failed too often lately: 454 4.7.0, whatever it sends.
    Locked,
}

/// What became of a submitted message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Stored {
    /// Committed: 250 2.0.0.
    Ok,
    /// Committed as this outbox message: 250 2.0.0 Ok: queued as <id>.
    Queued(i64),
    /// Not stored now (the database could not take it): 451 4.3.0, the client tries again.
    Failed,
    /// Refused: the whole reply line, code first, such as `554 5.6.0 the message cannot be
    /// parsed` (or a 4xx line: refused for now). A line that does not start with a 4xx or 5xx
    /// code is sent as `554 5.0.0 <line>`.
    Refused(String),
}

/// Serves one connection until QUIT, a timeout, the client closing, or an error. `submit` is
/// called once per accepted message (never for a refused or incomplete one) and returns when it is
/// committed, or not; the client is answered after that. `authenticate` checks AUTH credentials
/// (submission only; user, password, client address).
pub async fn serve<S, F, Fut, A>(stream: S, peer: SocketAddr, cfg: Rc<Config>, submit: F, authenticate: A)
where
    S: AsyncRead + AsyncWrite + Unpin,
    F: Fn(Envelope) -> Fut,
    Fut: Future<Output = Stored>,
    A: Fn(&str, &str, IpAddr) -> Login,
{
    let host = printable(&cfg.hostname);
    let host = if host.is_empty() { "localhost".to_string() } else { host };
    let mut session = Session {
        io: BufReader::with_capacity(READ_BUFFER, Conn::Plain(stream)),
        out: Vec::with_capacity(512),
        cfg,
        host,
        peer,
        hello: None,
        tx: None,
        errors: 0,
        login: None,
    };
    // An error here is the connection failing; there is nobody left to answer.
    let _ = session.run(&submit, &authenticate).await;
    let _ = timeout(Duration::from_secs(1), session.io.get_mut().shutdown()).await;
}

/// The connection: plain until STARTTLS.
enum Conn<S> {
    Plain(S),
    Tls(Box<tokio_rustls::server::TlsStream<S>>),
    /// While the handshake has it, or after it failed.
    Gone,
}

impl<S> Conn<S> {
    fn is_tls(&self) -> bool {
        matches!(self, Conn::Tls(_))
    }

    fn is_gone(&self) -> bool {
        matches!(self, Conn::Gone)
    }
}

fn gone() -> io::Error {
    io::Error::new(io::ErrorKind::NotConnected, "the connection is gone")
}

impl<S: AsyncRead + AsyncWrite + Unpin> AsyncRead for Conn<S> {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Conn::Plain(s) => Pin::new(s).poll_read(cx, buf),
            Conn::Tls(s) => Pin::new(s.as_mut()).poll_read(cx, buf),
            Conn::Gone => Poll::Ready(Err(gone())),
        }
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> AsyncWrite for Conn<S> {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Conn::Plain(s) => Pin::new(s).poll_write(cx, buf),
            Conn::Tls(s) => Pin::new(s.as_mut()).poll_write(cx, buf),
            Conn::Gone => Poll::Ready(Err(gone())),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Conn::Plain(s) => Pin::new(s).poll_flush(cx),
            Conn::Tls(s) => Pin::new(s.as_mut()).poll_flush(cx),
            Conn::Gone => Poll::Ready(Ok(())),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Conn::Plain(s) => Pin::new(s).poll_shutdown(cx),
            Conn::Tls(s) => Pin::new(s.as_mut()).poll_shutdown(cx),
            Conn::Gone => Poll::Ready(Ok(())),
        }
    }
}

struct Hello {
    name: String,
    lmtp: bool,
}

/// A mail transaction: from MAIL to the end of DATA, or RSET.
struct Transaction {
    mail_from: String,
    rcpt_to: Vec<String>,
    /// The SIZE the client declared.
    size: Option<usize>,
}

enum Next {
    Go,
    Quit,
    Data(Transaction),
    StartTls,
    Auth(String),
}

struct Session<S> {
    io: BufReader<Conn<S>>,
    /// Replies not yet written.
    out: Vec<u8>,
    cfg: Rc<Config>,
    host: String,
    peer: SocketAddr,
    hello: Option<Hello>,
    tx: Option<Transaction>,
    /// Failed commands in a row.
    errors: usize,
    /// Submission: the identity `authenticate` gave for this session's AUTH.
    login: Option<String>,
}

impl<S: AsyncRead + AsyncWrite + Unpin> Session<S> {
    async fn run<F, Fut, A>(&mut self, submit: &F, authenticate: &A) -> io::Result<()>
    where
        F: Fn(Envelope) -> Fut,
        Fut: Future<Output = Stored>,
        A: Fn(&str, &str, IpAddr) -> Login,
    {
        self.reply(&format!("220 {} ESMTP pg_email", self.host));
        let mut line = Vec::with_capacity(MAX_LINE);
        loop {
            // Pipelining (RFC 2920): replies wait while more commands are already here.
            if self.io.buffer().is_empty() || self.out.len() >= WRITE_BUFFER {
                self.flush().await?;
            }
            let input = match timeout(self.cfg.command_timeout, read_command(&mut self.io, &mut line)).await {
                Ok(input) => input?,
                Err(_) => {
                    self.reply(&format!("421 4.4.2 {} Error: timeout exceeded", self.host));
                    return self.flush().await;
                }
            };
            match input {
                Input::Eof => return self.flush().await,
                Input::TooLong => self.fail("500 5.5.2 Error: line too long"),
                Input::Line => match self.command(&line) {
                    Next::Go => {}
                    Next::Quit => return self.flush().await,
                    Next::Data(tx) => {
                        if !self.data(tx, submit).await? {
                            return Ok(());
                        }
                    }
                    Next::StartTls => {
                        if !self.start_tls().await? {
                            return Ok(());
                        }
                    }
                    Next::Auth(arg) => {
                        if !self.auth(&arg, authenticate).await? {
                            return Ok(());
                        }
                    }
                },
            }
            if self.errors >= MAX_ERRORS {
                self.reply(&format!("421 4.7.0 {} Error: too many errors", self.host));
                return self.flush().await;
            }
        }
    }

    /// After `220 Ready to start TLS`: drops whatever the client sent behind STARTTLS (it must
    /// wait for the 220), then the handshake; the session starts over (RFC 3207: no EHLO, no
    /// AUTH, no transaction is kept). False when the connection must end.
    async fn start_tls(&mut self) -> io::Result<bool> {
        self.flush().await?;
        let Some(tls) = self.cfg.tls.clone() else { return Ok(false) };
        let old = std::mem::replace(&mut self.io, BufReader::with_capacity(READ_BUFFER, Conn::Gone));
        let Conn::Plain(stream) = old.into_inner() else { return Ok(false) };
        let accept = tokio_rustls::TlsAcceptor::from(tls).accept(stream);
        match timeout(self.cfg.command_timeout, accept).await {
            Ok(Ok(s)) => {
                self.io = BufReader::with_capacity(READ_BUFFER, Conn::Tls(Box::new(s)));
                self.hello = None;
                self.tx = None;
                self.login = None;
                Ok(true)
            }
            // A failed or slow handshake leaves nothing to talk to.
            _ => Ok(false),
        }
    }

    /// AUTH PLAIN or LOGIN (RFC 4954, 4616), with or without an initial response. False when
    /// the connection must end.
    async fn auth<A>(&mut self, arg: &str, authenticate: &A) -> io::Result<bool>
    where
        A: Fn(&str, &str, IpAddr) -> Login,
    {
        if self.hello.is_none() {
            self.fail("503 5.5.1 Error: send EHLO first");
            return Ok(true);
        }
        if self.login.is_some() {
            self.fail("503 5.5.1 Error: already authenticated");
            return Ok(true);
        }
        if self.tx.is_some() {
            self.fail("503 5.5.1 Error: AUTH is not allowed during a mail transaction");
            return Ok(true);
        }
        if !self.io.get_ref().is_tls() && !self.peer.ip().is_loopback() {
            self.fail("530 5.7.0 Must issue a STARTTLS command first");
            return Ok(true);
        }
        let (mechanism, initial) = match arg.split_once(' ') {
            Some((m, i)) => (m, Some(i.trim())),
            None => (arg, None),
        };
        let credentials = match mechanism.to_ascii_uppercase().as_str() {
            "PLAIN" => {
                let response = match initial {
                    Some(i) => Some(i.to_string()),
                    None => self.challenge("334 ").await?,
                };
                response.map(|r| decode(&r).and_then(|b| plain(&b)))
            }
            "LOGIN" => {
                let user = match initial {
                    Some(i) => Some(i.to_string()),
                    None => self.challenge("334 VXNlcm5hbWU6").await?,
                };
                match user.map(|u| decode(&u)) {
                    None => None,
                    Some(None) => Some(None),
                    Some(Some(user)) => {
                        self.challenge("334 UGFzc3dvcmQ6").await?.map(|p| decode(&p).map(|pass| (user, pass)))
                    }
                }
                .map(|c| c.and_then(|(u, p)| Some((String::from_utf8(u).ok()?, String::from_utf8(p).ok()?))))
            }
            "" => {
                self.fail("501 5.5.4 Syntax: AUTH mechanism");
                return Ok(true);
            }
            _ => {
                self.fail("504 5.5.4 Error: unsupported authentication mechanism; use PLAIN or LOGIN");
                return Ok(true);
            }
        };
        match credentials {
            // The client went away, or was too slow.
            _ if self.io.get_ref().is_gone() => Ok(false),
            None => {
                self.fail("501 5.7.0 Error: authentication cancelled");
                Ok(true)
            }
            Some(None) => {
                self.fail("501 5.5.2 Error: cannot decode the response");
                Ok(true)
            }
            Some(Some((user, password))) => {
                match authenticate(&user, &password, self.peer.ip()) {
                    Login::Ok(identity) => {
                        self.login = Some(identity);
                        self.ok("235 2.7.0 Authentication successful");
                    }
                    Login::Wrong => self.fail("535 5.7.8 Error: authentication failed"),
                    Login::Locked => self.fail("454 4.7.0 Error: too many failed authentications; try again later"),
                }
                Ok(true)
            }
        }
    }

    /// Sends a 334 challenge and reads the client's line: None when it cancels with `*`, or
    /// when the connection ends or times out (the connection is then marked gone).
    async fn challenge(&mut self, line: &str) -> io::Result<Option<String>> {
        self.reply(line);
        self.flush().await?;
        let mut buf = Vec::with_capacity(MAX_LINE);
        match timeout(self.cfg.command_timeout, read_command(&mut self.io, &mut buf)).await {
            Ok(Ok(Input::Line)) => {
                let text = String::from_utf8_lossy(strip_eol(&buf)).trim().to_string();
                Ok((text != "*").then_some(text))
            }
            Ok(Ok(Input::TooLong)) => Ok(Some("!".into())),
            Ok(Ok(Input::Eof)) | Err(_) => {
                *self.io.get_mut() = Conn::Gone;
                Ok(None)
            }
            Ok(Err(e)) => Err(e),
        }
    }

    fn reply(&mut self, line: &str) {
        self.out.extend_from_slice(line.as_bytes());
        self.out.extend_from_slice(b"\r\n");
    }

    fn ok(&mut self, line: &str) {
        self.errors = 0;
        self.reply(line);
    }

    fn fail(&mut self, line: &str) {
        self.errors += 1;
        self.reply(line);
    }

    async fn flush(&mut self) -> io::Result<()> {
        if self.out.is_empty() {
            return Ok(());
        }
        let write = async {
            let stream = self.io.get_mut();
            stream.write_all(&self.out).await?;
            stream.flush().await
        };
        match timeout(self.cfg.command_timeout, write).await {
            Ok(r) => r?,
            Err(_) => return Err(io::Error::new(io::ErrorKind::TimedOut, "the client does not read its replies")),
        }
        self.out.clear();
        Ok(())
    }

    fn command(&mut self, line: &[u8]) -> Next {
        let text = String::from_utf8_lossy(strip_eol(line));
        let text = text.trim_end_matches([' ', '\t']);
        let (verb, arg) = match text.find(' ') {
            Some(i) => (&text[..i], text[i + 1..].trim_start_matches(' ')),
            None => (text, ""),
        };
        match verb.to_ascii_uppercase().as_str() {
            "EHLO" => self.hello(arg, "EHLO", false),
            "LHLO" => self.hello(arg, "LHLO", true),
            "HELO" => self.hello(arg, "HELO", false),
            "MAIL" => self.mail(arg),
            "RCPT" => self.rcpt(arg),
            "DATA" => return self.data_command(arg),
            "RSET" => {
                self.tx = None;
                self.ok("250 2.0.0 Ok");
            }
            "NOOP" => self.ok("250 2.0.0 Ok"),
            "QUIT" => {
                self.reply(&format!("221 2.0.0 {} Bye", self.host));
                return Next::Quit;
            }
            "VRFY" => self.ok("252 2.5.2 Cannot VRFY a user; send some mail"),
            "STARTTLS" if self.cfg.submission && self.cfg.tls.is_some() => {
                if !arg.is_empty() {
                    self.fail("501 5.5.4 Syntax: STARTTLS");
                } else if self.io.get_ref().is_tls() {
                    self.fail("503 5.5.1 Error: TLS already active");
                } else {
                    self.reply("220 2.0.0 Ready to start TLS");
                    return Next::StartTls;
                }
            }
            "AUTH" if self.cfg.submission => return Next::Auth(arg.to_string()),
            "STARTTLS" | "AUTH" | "BDAT" | "EXPN" | "HELP" | "ETRN" | "TURN" => {
                self.fail("502 5.5.1 Error: command not implemented")
            }
            _ => self.fail("500 5.5.2 Error: command not recognized"),
        }
        Next::Go
    }

    fn hello(&mut self, arg: &str, verb: &str, lmtp: bool) {
        if arg.is_empty() {
            return self.fail(&format!("501 5.5.4 Syntax: {verb} hostname"));
        }
        if lmtp && self.cfg.submission {
            return self.fail("500 5.5.2 Error: this is an SMTP submission service; use EHLO");
        }
        let mut name = printable(arg);
        name.truncate(255);
        self.hello = Some(Hello { name, lmtp });
        self.tx = None;
        if verb == "HELO" {
            return self.ok(&format!("250 {}", self.host));
        }
        let mut extensions =
            format!("250-{}\r\n250-SIZE {}\r\n250-8BITMIME\r\n250-PIPELINING", self.host, self.cfg.max_message_size);
        if self.cfg.submission {
            let tls = self.io.get_ref().is_tls();
            if self.cfg.tls.is_some() && !tls {
                extensions.push_str("\r\n250-STARTTLS");
            }
            if tls || self.peer.ip().is_loopback() {
                extensions.push_str("\r\n250-AUTH PLAIN LOGIN");
            }
        }
        extensions.push_str("\r\n250 ENHANCEDSTATUSCODES");
        self.ok(&extensions);
    }

    fn mail(&mut self, arg: &str) {
        if self.hello.is_none() {
            return self.fail("503 5.5.1 Error: send HELO, EHLO or LHLO first");
        }
        if self.tx.is_some() {
            return self.fail("503 5.5.1 Error: nested MAIL command");
        }
        if self.cfg.submission && self.login.is_none() {
            return self.fail("530 5.7.0 Authentication required");
        }
        let Some((address, params)) = prefixed(arg, "FROM:").and_then(parse_path) else {
            return self.fail("501 5.5.4 Syntax: MAIL FROM:<address>");
        };
        if self.cfg.submission && address.is_empty() {
            return self.fail("501 5.1.7 Error: a submitted message needs a sender address");
        }
        if !address.is_empty() && !valid_sender(address) {
            return self.fail("501 5.1.7 Error: bad sender address syntax");
        }
        let mut size = None;
        for param in params.split_ascii_whitespace() {
            let (key, value) = param.split_once('=').unwrap_or((param, ""));
            if key.eq_ignore_ascii_case("SIZE") {
                if value.is_empty() || !value.bytes().all(|b| b.is_ascii_digit()) {
                    return self.fail("501 5.5.4 Error: bad SIZE parameter");
                }
                // Digits too many for a usize are over any limit.
                let n = value.parse::<usize>().unwrap_or(usize::MAX);
                if n > self.cfg.max_message_size {
                    return self.fail(&format!(
                        "552 5.3.4 Error: message size exceeds the fixed maximum of {} bytes",
                        self.cfg.max_message_size
                    ));
                }
                size = Some(n);
            } else if key.eq_ignore_ascii_case("BODY") {
                if !value.eq_ignore_ascii_case("7BIT") && !value.eq_ignore_ascii_case("8BITMIME") {
                    return self.fail("501 5.5.4 Error: BODY is 7BIT or 8BITMIME");
                }
            } else {
                return self.fail(&format!("555 5.5.4 Error: unsupported parameter {}", printable(key)));
            }
        }
        self.tx = Some(Transaction { mail_from: address.to_string(), rcpt_to: Vec::new(), size });
        self.ok("250 2.1.0 Ok");
    }

    fn rcpt(&mut self, arg: &str) {
        let Some(count) = self.tx.as_ref().map(|tx| tx.rcpt_to.len()) else {
            return self.fail("503 5.5.1 Error: need MAIL command");
        };
        let Some((address, params)) = prefixed(arg, "TO:").and_then(parse_path) else {
            return self.fail("501 5.5.4 Syntax: RCPT TO:<address>");
        };
        let Some(domain) = valid_mailbox(address) else {
            return self.fail("501 5.1.3 Error: bad recipient address syntax");
        };
        if let Some(param) = params.split_ascii_whitespace().next() {
            let key = param.split_once('=').map_or(param, |(k, _)| k);
            return self.fail(&format!("555 5.5.4 Error: unsupported parameter {}", printable(key)));
        }
        if !self.cfg.submission && !self.cfg.accepts_domain(domain) {
            return self.fail(&format!("550 5.7.1 <{address}>: relay access denied"));
        }
        if count >= self.cfg.max_recipients {
            return self.fail("452 4.5.3 Error: too many recipients");
        }
        let address = address.to_string();
        if let Some(tx) = self.tx.as_mut() {
            tx.rcpt_to.push(address);
        }
        self.ok("250 2.1.5 Ok");
    }

    fn data_command(&mut self, arg: &str) -> Next {
        if !arg.is_empty() {
            self.fail("501 5.5.4 Syntax: DATA");
        } else if self.hello.is_none() {
            self.fail("503 5.5.1 Error: send HELO, EHLO or LHLO first");
        } else if self.tx.is_none() {
            self.fail("503 5.5.1 Error: need MAIL command");
        } else if self.tx.as_ref().is_some_and(|tx| tx.rcpt_to.is_empty()) {
            self.fail("503 5.5.1 Error: need RCPT command");
        } else if let Some(tx) = self.tx.take() {
            self.ok("354 End data with <CR><LF>.<CR><LF>");
            return Next::Data(tx);
        }
        Next::Go
    }

    /// Reads the message, submits it and answers; false when the session must end (the client
    /// went away or was too slow).
    async fn data<F, Fut>(&mut self, tx: Transaction, submit: &F) -> io::Result<bool>
    where
        F: Fn(Envelope) -> Fut,
        Fut: Future<Output = Stored>,
    {
        self.flush().await?;
        let limit = self.cfg.max_message_size;
        let mut raw = Vec::new();
        if let Some(n) = tx.size {
            raw.reserve_exact(n.min(limit));
        }
        let end = match timeout(self.cfg.data_timeout, read_data(&mut self.io, &mut raw, limit)).await {
            Ok(end) => end?,
            Err(_) => {
                self.reply(&format!("421 4.4.2 {} Error: timeout exceeded", self.host));
                self.flush().await?;
                return Ok(false);
            }
        };
        let (lmtp, helo) = self.hello.as_ref().map_or((false, String::new()), |h| (h.lmtp, h.name.clone()));
        let answer = match end {
            DataEnd::Eof => return Ok(false),
            DataEnd::TooBig => format!("552 5.3.4 Error: message size exceeds the fixed maximum of {limit} bytes"),
            DataEnd::Complete => {
                let envelope = Envelope {
                    mail_from: tx.mail_from,
                    rcpt_to: tx.rcpt_to.clone(),
                    raw,
                    lmtp,
                    helo,
                    peer: self.peer,
                    login: self.login.clone(),
                };
                match submit(envelope).await {
                    Stored::Ok => "250 2.0.0 Ok: stored".to_string(),
                    Stored::Queued(id) => format!("250 2.0.0 Ok: queued as {id}"),
                    Stored::Failed => "451 4.3.0 Error: the message cannot be stored now; try again later".to_string(),
                    Stored::Refused(line) => refusal(&line),
                }
            }
        };
        if lmtp {
            let (code, text) = split_reply(&answer);
            for rcpt in &tx.rcpt_to {
                self.reply(&format!("{code} <{rcpt}> {text}"));
            }
        } else {
            self.reply(&answer);
        }
        self.errors = 0;
        Ok(true)
    }
}

enum Line {
    /// A whole line, its LF included.
    Complete,
    /// `max` bytes (or one less, to keep a CR with the LF that may follow) without a line end.
    Partial,
    /// The client closed the connection (what was read of an unfinished line is dropped).
    Eof,
}

/// Reads up to the next LF into `line` (cleared first), keeping at most `max` bytes (`max` >= 2).
async fn read_line<R: AsyncBufRead + Unpin>(r: &mut R, line: &mut Vec<u8>, max: usize) -> io::Result<Line> {
    line.clear();
    loop {
        let buf = r.fill_buf().await?;
        if buf.is_empty() {
            return Ok(Line::Eof);
        }
        let room = max - line.len();
        let window = &buf[..buf.len().min(room)];
        if let Some(i) = window.iter().position(|&b| b == b'\n') {
            line.extend_from_slice(&window[..=i]);
            r.consume(i + 1);
            return Ok(Line::Complete);
        }
        let mut n = window.len();
        if n < room {
            line.extend_from_slice(window);
            r.consume(n);
            continue;
        }
        if window[n - 1] == b'\r' && line.len() + n > 1 {
            n -= 1;
        }
        line.extend_from_slice(&window[..n]);
        r.consume(n);
        return Ok(Line::Partial);
    }
}

enum Input {
    /// A command line of at most MAX_LINE bytes.
    Line,
    /// A longer line, read to its end and dropped.
    TooLong,
    Eof,
}

/// Reads one command line into `line`, never keeping more than MAX_LINE bytes.
async fn read_command<R: AsyncBufRead + Unpin>(r: &mut R, line: &mut Vec<u8>) -> io::Result<Input> {
    match read_line(r, line, MAX_LINE).await? {
        Line::Complete => Ok(Input::Line),
        Line::Eof => Ok(Input::Eof),
        Line::Partial => loop {
            match read_line(r, line, MAX_LINE).await? {
                Line::Complete => {
                    line.clear();
                    return Ok(Input::TooLong);
                }
                Line::Eof => return Ok(Input::Eof),
                Line::Partial => {}
            }
        },
    }
}

#[derive(Debug, PartialEq, Eq)]
enum DataEnd {
    /// The final dot was read; `raw` holds the message.
    Complete,
    /// The final dot was read, but the message was over the limit and was not kept.
    TooBig,
    /// The client closed the connection first.
    Eof,
}

/// Reads a message up to its final `.` line: dot-unstuffed, each line ended by CRLF, into `raw`
/// (never beyond `limit` bytes of capacity: past it, the rest is read and dropped).
///
/// A bare LF ends a line too (stored as CRLF), but only `<CRLF>.<CRLF>` ends the message, as with
/// Postfix's `smtpd_forbid_bare_newline = normalize`: a `.` line next to a bare LF is kept as
/// content, so a message cannot end early here where the MTA in front saw it go on (SMTP
/// smuggling, which would let the rest of it be read as a second, forged message).
async fn read_data<R: AsyncBufRead + Unpin>(r: &mut R, raw: &mut Vec<u8>, limit: usize) -> io::Result<DataEnd> {
    let mut chunk = Vec::with_capacity(DATA_CHUNK);
    // Whether the next piece starts a line, and whether the line before ended with CRLF (the
    // 354 counts as one).
    let mut line_start = true;
    let mut after_crlf = true;
    let mut too_big = false;
    loop {
        let ended = match read_line(r, &mut chunk, DATA_CHUNK).await? {
            Line::Eof => return Ok(DataEnd::Eof),
            Line::Complete => true,
            Line::Partial => false,
        };
        let mut piece: &[u8] = if ended { strip_eol(&chunk) } else { &chunk };
        if line_start && piece.first() == Some(&b'.') {
            if piece.len() > 1 || !ended {
                piece = &piece[1..];
            } else if after_crlf && chunk.ends_with(b"\r\n") {
                return Ok(if too_big { DataEnd::TooBig } else { DataEnd::Complete });
            }
        }
        line_start = ended;
        if ended {
            after_crlf = chunk.ends_with(b"\r\n");
        }
        if too_big {
            continue;
        }
        let eol: &[u8] = if ended { b"\r\n" } else { b"" };
        if raw.len() + piece.len() + eol.len() > limit {
            too_big = true;
            *raw = Vec::new();
            continue;
        }
        append(raw, piece, limit);
        append(raw, eol, limit);
    }
}

/// Appends to `raw`, growing it as a Vec does but never past `limit` bytes of capacity (unless
/// `raw` itself needs more).
fn append(raw: &mut Vec<u8>, bytes: &[u8], limit: usize) {
    let need = raw.len() + bytes.len();
    if need > raw.capacity() {
        let target = (raw.capacity() * 2).max(4096).min(limit).max(need);
        raw.reserve_exact(target - raw.len());
    }
    raw.extend_from_slice(bytes);
}

/// A base64 SASL response (`=` alone is the empty response).
fn decode(text: &str) -> Option<Vec<u8>> {
    if text == "=" {
        return Some(Vec::new());
    }
    base64::engine::general_purpose::STANDARD.decode(text).ok()
}

/// The user and password of a PLAIN response (`authzid NUL authcid NUL passwd`); an authzid other
/// than the user itself is refused.
fn plain(response: &[u8]) -> Option<(String, String)> {
    let mut parts = response.split(|&b| b == 0);
    let (authzid, user, password) = (parts.next()?, parts.next()?, parts.next()?);
    if parts.next().is_some() || (!authzid.is_empty() && authzid != user) {
        return None;
    }
    Some((String::from_utf8(user.to_vec()).ok()?, String::from_utf8(password.to_vec()).ok()?))
}

/// The line without its LF and a CR before it.
fn strip_eol(line: &[u8]) -> &[u8] {
    let line = line.strip_suffix(b"\n").unwrap_or(line);
    line.strip_suffix(b"\r").unwrap_or(line)
}

/// `arg` after `prefix` (ASCII case-insensitive) and any spaces.
fn prefixed<'a>(arg: &'a str, prefix: &str) -> Option<&'a str> {
    let head = arg.get(..prefix.len())?;
    head.eq_ignore_ascii_case(prefix).then(|| arg[prefix.len()..].trim_start_matches(' '))
}

/// Splits `<path> params` into the address (a source route dropped; empty for `<>`) and the
/// parameters. An address without angle brackets is taken up to the first space.
fn parse_path(s: &str) -> Option<(&str, &str)> {
    let (path, rest) = match s.strip_prefix('<') {
        Some(inner) => {
            let mut quoted = false;
            let mut escaped = false;
            let mut close = None;
            for (i, c) in inner.char_indices() {
                match c {
                    _ if escaped => escaped = false,
                    '\\' if quoted => escaped = true,
                    '"' => quoted = !quoted,
                    '>' if !quoted => {
                        close = Some(i);
                        break;
                    }
                    _ => {}
                }
            }
            let close = close?;
            (&inner[..close], &inner[close + 1..])
        }
        None => {
            let end = s.find(' ').unwrap_or(s.len());
            if end == 0 {
                return None;
            }
            (&s[..end], &s[end..])
        }
    };
    if !rest.is_empty() && !rest.starts_with(' ') {
        return None;
    }
    // A source route (`@a.example,@b.example:user@c.example`) is ignored (RFC 5321 4.1.2, C).
    let path = match path.strip_prefix('@') {
        Some(route) => &route[route.find(':')? + 1..],
        None => path,
    };
    Some((path, rest))
}

/// The domain of an RFC 5321 Mailbox in ASCII (`local-part@domain`, a dot-atom or quoted local
/// part, a domain name or an address literal), or None when `address` is not one.
fn valid_mailbox(address: &str) -> Option<&str> {
    if address.len() > 254 {
        return None;
    }
    let (local, domain) = address.rsplit_once('@')?;
    (valid_local_part(local) && (valid_domain(domain) || valid_address_literal(domain))).then_some(domain)
}

/// A reverse path: a valid mailbox, or, since the message already passed the MTA in front,
/// anything of printable ASCII with a local part and a domain.
fn valid_sender(address: &str) -> bool {
    valid_mailbox(address).is_some()
        || (address.len() <= 254
            && address.bytes().all(|b| b.is_ascii_graphic())
            && address.rsplit_once('@').is_some_and(|(l, d)| !l.is_empty() && !d.is_empty()))
}

fn valid_local_part(local: &str) -> bool {
    if let Some(inner) = local.strip_prefix('"').and_then(|l| l.strip_suffix('"')) {
        let mut bytes = inner.bytes();
        while let Some(b) = bytes.next() {
            let ok = match b {
                b'\\' => bytes.next().is_some_and(|e| (32..=126).contains(&e)),
                b'"' => false,
                _ => (32..=126).contains(&b),
            };
            if !ok {
                return false;
            }
        }
        return true;
    }
    !local.is_empty()
        && local.split('.').all(|atom| {
            !atom.is_empty() && atom.bytes().all(|b| b.is_ascii_alphanumeric() || b"!#$%&'*+-/=?^_`{|}~".contains(&b))
        })
}

fn valid_domain(domain: &str) -> bool {
    !domain.is_empty()
        && domain.len() <= 253
        && domain.split('.').all(|label| {
            !label.is_empty()
                && label.len() <= 63
                && !label.starts_with('-')
                && !label.ends_with('-')
                && label.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
        })
}

fn valid_address_literal(domain: &str) -> bool {
    domain.strip_prefix('[').and_then(|d| d.strip_suffix(']')).is_some_and(|inner| {
        !inner.is_empty() && inner.bytes().all(|b| b.is_ascii_graphic() && b != b'[' && b != b']' && b != b'\\')
    })
}

/// `s` with control characters and non-ASCII made safe for a reply line.
fn printable(s: &str) -> String {
    s.chars().map(|c| if c.is_ascii_graphic() || c == ' ' { c } else { '?' }).collect()
}

/// The reply line for a `Stored::Refused`.
fn refusal(line: &str) -> String {
    let line = printable(line.trim());
    let b = line.as_bytes();
    if b.len() > 4 && (b[0] == b'4' || b[0] == b'5') && b[1].is_ascii_digit() && b[2].is_ascii_digit() && b[3] == b' ' {
        line
    } else {
        format!("554 5.0.0 {line}")
    }
}

/// Splits a reply line into its code (with the enhanced code, when there is one) and its text.
fn split_reply(line: &str) -> (&str, &str) {
    let enhanced = line.get(4..).and_then(|rest| {
        let token = rest.split(' ').next()?;
        let parts: Vec<&str> = token.split('.').collect();
        (parts.len() == 3 && parts.iter().all(|p| !p.is_empty() && p.bytes().all(|b| b.is_ascii_digit())))
            .then_some(4 + token.len())
    });
    let end = enhanced.unwrap_or(3.min(line.len()));
    (&line[..end], line[end..].trim_start())
}

#[cfg(test)]
mod tests {
    use std::cell::RefCell;
    use std::time::Instant;

    use tokio::io::{AsyncReadExt, DuplexStream};

    use super::*;

    fn config() -> Config {
        Config {
            hostname: "mx.pg-email.test".into(),
            max_message_size: 1000,
            accept_domains: vec!["bounce.test".into(), "reply.test".into()],
            max_recipients: 100,
            command_timeout: Duration::from_secs(10),
            data_timeout: Duration::from_secs(10),
            submission: false,
            tls: None,
        }
    }

    /// Inbound mode never asks; submission tests pass their own.
    fn no_login(_: &str, _: &str, _: IpAddr) -> Login {
        Login::Wrong
    }

    fn peer() -> SocketAddr {
        "127.0.0.1:40000".parse().unwrap()
    }

    /// Envelopes `submit` was called with.
    type Submitted = Rc<RefCell<Vec<Envelope>>>;

    fn submitter(outcome: Stored) -> (Submitted, impl Fn(Envelope) -> std::future::Ready<Stored>) {
        let seen: Submitted = Rc::default();
        let s = seen.clone();
        (seen, move |env: Envelope| {
            s.borrow_mut().push(env);
            std::future::ready(outcome.clone())
        })
    }

    /// Sends all of `input` in one write (then closes the write side) and returns every reply
    /// line the server wrote until it closed the connection.
    async fn exchange(cfg: Config, outcome: Stored, input: &[u8]) -> (Vec<String>, Vec<Envelope>) {
        let (client, server) = tokio::io::duplex(64 * 1024);
        let (seen, submit) = submitter(outcome);
        let (mut rd, mut wr) = tokio::io::split(client);
        let mut replies = Vec::new();
        tokio::join!(
            serve(server, peer(), Rc::new(cfg), submit, no_login),
            async {
                // The server may close before reading everything (a timeout): that is not an error
                // of the test.
                let _ = wr.write_all(input).await;
                let _ = wr.shutdown().await;
            },
            async {
                let _ = rd.read_to_end(&mut replies).await;
            }
        );
        let text = String::from_utf8(replies).expect("replies are ASCII");
        assert!(text.is_empty() || text.ends_with("\r\n"), "replies end with CRLF: {text:?}");
        let lines = text.split_terminator("\r\n").map(str::to_string).collect();
        (lines, seen.take())
    }

    /// The lines, each ended by CRLF.
    fn crlf(lines: &[&str]) -> String {
        lines.iter().map(|l| format!("{l}\r\n")).collect()
    }

    /// The code of each reply (the last line of a multi-line reply).
    fn codes(lines: &[String]) -> Vec<&str> {
        lines.iter().filter(|l| l.as_bytes().get(3) != Some(&b'-')).map(|l| &l[..3]).collect()
    }

    /// A client that talks step by step.
    struct Client {
        io: BufReader<DuplexStream>,
    }

    impl Client {
        async fn send(&mut self, line: &str) {
            self.io.get_mut().write_all(line.as_bytes()).await.unwrap();
        }

        /// One reply, all its lines.
        async fn reply(&mut self) -> String {
            let mut all = String::new();
            loop {
                let mut line = String::new();
                let n = self.io.read_line(&mut line).await.unwrap();
                assert!(n > 0, "the server closed the connection; so far: {all:?}");
                all.push_str(&line);
                if line.as_bytes().get(3) != Some(&b'-') {
                    return all;
                }
            }
        }

        async fn expect(&mut self, line: &str, prefix: &str) -> String {
            self.send(line).await;
            let r = self.reply().await;
            assert!(r.starts_with(prefix), "{line:?} answered {r:?}, expected {prefix:?}");
            r
        }

        async fn closed(&mut self) -> bool {
            let mut rest = Vec::new();
            matches!(self.io.read_to_end(&mut rest).await, Ok(0))
        }
    }

    /// Runs `serve` against `script`, which drives a `Client`.
    async fn talk<Fs, Fut>(cfg: Config, outcome: Stored, script: Fs) -> Vec<Envelope>
    where
        Fs: FnOnce(Client) -> Fut,
        Fut: Future<Output = ()>,
    {
        let (client, server) = tokio::io::duplex(64 * 1024);
        let (seen, submit) = submitter(outcome);
        let client = Client { io: BufReader::new(client) };
        tokio::join!(serve(server, peer(), Rc::new(cfg), submit, no_login), script(client));
        seen.take()
    }

    #[tokio::test]
    async fn smtp_session() {
        let seen = talk(config(), Stored::Ok, |mut c| async move {
            let greeting = c.reply().await;
            assert_eq!(greeting, "220 mx.pg-email.test ESMTP pg_email\r\n");
            let ehlo = c.expect("EHLO mta.example\r\n", "250-").await;
            assert_eq!(
                ehlo,
                "250-mx.pg-email.test\r\n250-SIZE 1000\r\n250-8BITMIME\r\n250-PIPELINING\r\n250 ENHANCEDSTATUSCODES\r\n"
            );
            assert!(!ehlo.contains("STARTTLS") && !ehlo.contains("AUTH"));
            c.expect("MAIL FROM:<sender@example.org> BODY=8BITMIME SIZE=120\r\n", "250 2.1.0").await;
            c.expect("RCPT TO:<bounce+abc@bounce.test>\r\n", "250 2.1.5").await;
            c.expect("DATA\r\n", "354 ").await;
            c.expect("Subject: hi\r\n\r\nbody\r\n.\r\n", "250 2.0.0").await;
            c.expect("QUIT\r\n", "221 2.0.0").await;
            assert!(c.closed().await);
        })
        .await;
        assert_eq!(
            seen,
            vec![Envelope {
                mail_from: "sender@example.org".into(),
                rcpt_to: vec!["bounce+abc@bounce.test".into()],
                raw: b"Subject: hi\r\n\r\nbody\r\n".to_vec(),
                lmtp: false,
                helo: "mta.example".into(),
                peer: peer(),
                login: None,
            }]
        );
    }

    #[tokio::test]
    async fn lmtp_answers_once_per_recipient_in_order() {
        let seen = talk(config(), Stored::Ok, |mut c| async move {
            c.reply().await;
            let lhlo = c.expect("LHLO mta.example\r\n", "250-mx.pg-email.test").await;
            assert!(lhlo.contains("250-PIPELINING\r\n") && lhlo.ends_with("250 ENHANCEDSTATUSCODES\r\n"));
            c.expect("MAIL FROM:<>\r\n", "250 2.1.0").await;
            c.expect("RCPT TO:<a@bounce.test>\r\n", "250 2.1.5").await;
            c.expect("RCPT TO:<b@reply.test>\r\n", "250 2.1.5").await;
            c.expect("RCPT TO:<c@foreign.test>\r\n", "550 5.7.1").await;
            c.expect("RCPT TO:<C@Bounce.Test>\r\n", "250 2.1.5").await;
            c.expect("DATA\r\n", "354 ").await;
            c.send("Subject: report\r\n\r\nx\r\n.\r\n").await;
            assert_eq!(c.reply().await, "250 2.0.0 <a@bounce.test> Ok: stored\r\n");
            assert_eq!(c.reply().await, "250 2.0.0 <b@reply.test> Ok: stored\r\n");
            assert_eq!(c.reply().await, "250 2.0.0 <C@Bounce.Test> Ok: stored\r\n");
            c.expect("QUIT\r\n", "221").await;
        })
        .await;
        assert_eq!(seen.len(), 1, "stored once with all recipients");
        assert_eq!(seen[0].rcpt_to, ["a@bounce.test", "b@reply.test", "C@Bounce.Test"]);
        assert_eq!(seen[0].mail_from, "");
        assert!(seen[0].lmtp);
        assert_eq!(seen[0].raw, b"Subject: report\r\n\r\nx\r\n");
    }

    #[tokio::test]
    async fn helo_and_a_second_transaction() {
        let input = crlf(&[
            "HELO old.example",
            "MAIL FROM:<a@x.test>",
            "RCPT TO:<r@bounce.test>",
            "DATA",
            "1",
            ".",
            "MAIL FROM:<b@x.test>",
            "RCPT TO:<s@bounce.test>",
            "DATA",
            "2",
            ".",
            "QUIT",
        ]);
        let (lines, seen) = exchange(config(), Stored::Ok, input.as_bytes()).await;
        assert_eq!(lines[1], "250 mx.pg-email.test");
        assert_eq!(codes(&lines), ["220", "250", "250", "250", "354", "250", "250", "250", "354", "250", "221"]);
        assert_eq!(seen.len(), 2);
        assert_eq!((seen[1].mail_from.as_str(), seen[1].raw.as_slice()), ("b@x.test", &b"2\r\n"[..]));
        assert!(!seen[0].lmtp && seen[0].helo == "old.example");
    }

    #[tokio::test]
    async fn pipelined_transaction_in_one_write() {
        let input = crlf(&[
            "EHLO c",
            "MAIL FROM:<a@x.test>",
            "RCPT TO:<r1@bounce.test>",
            "RCPT TO:<nobody@else.test>",
            "RCPT TO:<r2@bounce.test>",
            "DATA",
            "Subject: p",
            "",
            "hello",
            ".",
            "NOOP",
            "QUIT",
        ]);
        let (lines, seen) = exchange(config(), Stored::Ok, input.as_bytes()).await;
        assert_eq!(codes(&lines), ["220", "250", "250", "250", "550", "250", "354", "250", "250", "221"]);
        assert_eq!(seen.len(), 1);
        assert_eq!(seen[0].rcpt_to, ["r1@bounce.test", "r2@bounce.test"]);
        assert_eq!(seen[0].raw, b"Subject: p\r\n\r\nhello\r\n");
    }

    #[tokio::test]
    async fn recipients_outside_the_domains_are_refused() {
        let input = crlf(&[
            "EHLO c",
            "MAIL FROM:<a@x.test>",
            "RCPT TO:<a@example.com>",
            "RCPT TO:<a@sub.bounce.test>",
            "RCPT TO:<a@bounce.test.evil>",
            "RCPT TO:<a@[127.0.0.1]>",
            "RCPT TO:<@relay.test:a@example.com>",
            "RCPT TO:<\"a@bounce.test\"@example.com>",
            "DATA",
            "QUIT",
        ]);
        let (lines, seen) = exchange(config(), Stored::Ok, input.as_bytes()).await;
        assert_eq!(codes(&lines), ["220", "250", "250", "550", "550", "550", "550", "550", "550", "503", "221"]);
        assert_eq!(lines[7], "550 5.7.1 <a@example.com>: relay access denied");
        assert!(lines[12].starts_with("550 5.7.1"), "the quoted local part is not the domain: {}", lines[12]);
        assert!(seen.is_empty());
    }

    #[tokio::test]
    async fn recipient_syntax() {
        let bad =
            ["<>", "<no-at-sign>", "<a@@bounce.test>", "<a@-x.bounce.test>", "<.a@bounce.test>", "<a..b@bounce.test>"];
        let mut input = String::from("EHLO c\r\nMAIL FROM:<a@x.test>\r\n");
        for b in bad {
            input.push_str(&format!("RCPT TO:{b}\r\n"));
        }
        input.push_str("RCPT TO:<a@bounce.test\r\nRCPT FOO\r\nRCPT TO:<a@bounce.test> NOTIFY=NEVER\r\n");
        input.push_str("RCPT TO: <\"x y\"@bounce.test>\r\nrcpt to:plain@bounce.test\r\nQUIT\r\n");
        let (lines, _) = exchange(config(), Stored::Ok, input.as_bytes()).await;
        let replies: Vec<&String> = lines.iter().filter(|l| !l.starts_with("250-")).skip(3).collect();
        for r in &replies[..bad.len()] {
            assert!(r.starts_with("501 5.1.3"), "{r}");
        }
        assert!(replies[bad.len()].starts_with("501 5.5.4"), "unclosed <: {}", replies[bad.len()]);
        assert!(replies[bad.len() + 1].starts_with("501 5.5.4"), "no TO: {}", replies[bad.len() + 1]);
        assert!(replies[bad.len() + 2].starts_with("555 5.5.4"), "parameter: {}", replies[bad.len() + 2]);
        assert!(replies[bad.len() + 3].starts_with("250 2.1.5"), "quoted local part: {}", replies[bad.len() + 3]);
        assert!(replies[bad.len() + 4].starts_with("250 2.1.5"), "no brackets: {}", replies[bad.len() + 4]);
    }

    #[tokio::test]
    async fn declared_size_over_the_limit_is_refused_at_mail() {
        let input = crlf(&[
            "EHLO c",
            "MAIL FROM:<a@x.test> SIZE=1001",
            "MAIL FROM:<a@x.test> SIZE=99999999999999999999999",
            "MAIL FROM:<a@x.test> SIZE=abc",
            "MAIL FROM:<a@x.test> SIZE=1000",
            "QUIT",
        ]);
        let (lines, seen) = exchange(config(), Stored::Ok, input.as_bytes()).await;
        assert_eq!(codes(&lines), ["220", "250", "552", "552", "501", "250", "221"]);
        assert!(lines[6].starts_with("552 5.3.4"), "{}", lines[6]);
        assert!(seen.is_empty());
    }

    #[tokio::test]
    async fn message_over_the_limit_is_read_to_its_end_and_refused() {
        let body = "x".repeat(98) + "\r\n"; // 100 bytes a line
        let input = format!(
            "EHLO c\r\nMAIL FROM:<a@x.test>\r\nRCPT TO:<r@bounce.test>\r\nDATA\r\n{}.\r\nNOOP\r\nQUIT\r\n",
            body.repeat(11)
        );
        let (lines, seen) = exchange(config(), Stored::Ok, input.as_bytes()).await;
        assert_eq!(codes(&lines), ["220", "250", "250", "250", "354", "552", "250", "221"]);
        assert!(lines[9].starts_with("552 5.3.4"), "{}", lines[9]);
        assert!(seen.is_empty(), "submit is never called for an oversized message");

        // Exactly at the limit is taken.
        let input = format!(
            "EHLO c\r\nMAIL FROM:<a@x.test>\r\nRCPT TO:<r@bounce.test>\r\nDATA\r\n{}.\r\nQUIT\r\n",
            body.repeat(10)
        );
        let (lines, seen) = exchange(config(), Stored::Ok, input.as_bytes()).await;
        assert_eq!(codes(&lines), ["220", "250", "250", "250", "354", "250", "221"]);
        assert_eq!(seen[0].raw.len(), 1000);
        assert!(seen[0].raw.capacity() <= 1000);

        // LMTP: one 552 per recipient.
        let input = format!(
            "LHLO c\r\nMAIL FROM:<a@x.test>\r\nRCPT TO:<r@bounce.test>\r\nRCPT TO:<s@bounce.test>\r\nDATA\r\n{}.\r\nQUIT\r\n",
            body.repeat(20)
        );
        let (lines, seen) = exchange(config(), Stored::Ok, input.as_bytes()).await;
        assert_eq!(codes(&lines), ["220", "250", "250", "250", "250", "354", "552", "552", "221"]);
        assert!(lines[10].starts_with("552 5.3.4 <r@bounce.test> "), "{}", lines[10]);
        assert!(lines[11].starts_with("552 5.3.4 <s@bounce.test> "), "{}", lines[11]);
        assert!(seen.is_empty());
    }

    #[tokio::test]
    async fn failed_store_is_451() {
        let smtp = "EHLO c\r\nMAIL FROM:<a@x.test>\r\nRCPT TO:<r@bounce.test>\r\nDATA\r\nx\r\n.\r\nQUIT\r\n";
        let (lines, seen) = exchange(config(), Stored::Failed, smtp.as_bytes()).await;
        assert_eq!(codes(&lines), ["220", "250", "250", "250", "354", "451", "221"]);
        assert!(lines[9].starts_with("451 4.3.0 "), "{}", lines[9]);
        assert_eq!(seen.len(), 1);

        let lmtp = crlf(&[
            "LHLO c",
            "MAIL FROM:<a@x.test>",
            "RCPT TO:<r@bounce.test>",
            "RCPT TO:<s@bounce.test>",
            "DATA",
            "x",
            ".",
            "QUIT",
        ]);
        let (lines, seen) = exchange(config(), Stored::Failed, lmtp.as_bytes()).await;
        assert_eq!(codes(&lines), ["220", "250", "250", "250", "250", "354", "451", "451", "221"]);
        assert!(lines[10].starts_with("451 4.3.0 <r@bounce.test> "), "{}", lines[10]);
        assert!(lines[11].starts_with("451 4.3.0 <s@bounce.test> "), "{}", lines[11]);
        assert_eq!(seen.len(), 1);
    }

    #[tokio::test]
    async fn refused_store_sends_the_callers_reply() {
        let smtp = "EHLO c\r\nMAIL FROM:<a@x.test>\r\nRCPT TO:<r@bounce.test>\r\nDATA\r\nx\r\n.\r\nQUIT\r\n";
        let refused = Stored::Refused("554 5.6.0 the message cannot be parsed".into());
        let (lines, _) = exchange(config(), refused.clone(), smtp.as_bytes()).await;
        assert_eq!(lines[9], "554 5.6.0 the message cannot be parsed");

        let lmtp = "LHLO c\r\nMAIL FROM:<a@x.test>\r\nRCPT TO:<r@bounce.test>\r\nDATA\r\nx\r\n.\r\nQUIT\r\n";
        let (lines, _) = exchange(config(), refused, lmtp.as_bytes()).await;
        assert_eq!(lines[9], "554 5.6.0 <r@bounce.test> the message cannot be parsed");

        // Not a 5xx line, or one with a line break in it: still one 5xx reply line.
        let (lines, _) = exchange(config(), Stored::Refused("250 fine\r\n250 ok".into()), smtp.as_bytes()).await;
        assert_eq!(lines[9], "554 5.0.0 250 fine??250 ok");
        assert_eq!(codes(&lines).last(), Some(&"221"));
    }

    #[tokio::test]
    async fn dot_unstuffing() {
        let input = crlf(&["EHLO c", "MAIL FROM:<a@x.test>", "RCPT TO:<r@bounce.test>", "DATA"])
            + &crlf(&["..x", "...", ". ", "mid.dle", "..", "", ".", "QUIT"]);
        let (lines, seen) = exchange(config(), Stored::Ok, input.as_bytes()).await;
        assert_eq!(codes(&lines), ["220", "250", "250", "250", "354", "250", "221"]);
        assert_eq!(String::from_utf8_lossy(&seen[0].raw), ".x\r\n..\r\n \r\nmid.dle\r\n.\r\n\r\n");
    }

    #[tokio::test]
    async fn bare_lf_is_a_line_end_but_not_an_end_of_data() {
        // Commands with bare LF; a message with bare LF lines, and two `.` lines next to a bare
        // LF that do not end it (an SMTP smuggling attempt).
        let input = "EHLO c\nMAIL FROM:<a@x.test>\nRCPT TO:<r@bounce.test>\nDATA\n".to_string()
            + "bare\nbare cr\r\r\n.\nMAIL FROM:<evil@x.test>\n.\r\nRCPT TO:<forged@bounce.test>\r\n.\r\nQUIT\n";
        let (lines, seen) = exchange(config(), Stored::Ok, input.as_bytes()).await;
        assert_eq!(codes(&lines), ["220", "250", "250", "250", "354", "250", "221"]);
        assert_eq!(seen.len(), 1);
        assert_eq!(
            String::from_utf8_lossy(&seen[0].raw),
            "bare\r\nbare cr\r\r\n.\r\nMAIL FROM:<evil@x.test>\r\n.\r\nRCPT TO:<forged@bounce.test>\r\n",
            "bare LF made CRLF; the lone dots are content"
        );
        // A client that ends the message with LF . LF is not done yet: EOF, nothing stored.
        let input = "EHLO c\nMAIL FROM:<a@x.test>\nRCPT TO:<r@bounce.test>\nDATA\nx\n.\n";
        let (lines, seen) = exchange(config(), Stored::Ok, input.as_bytes()).await;
        assert_eq!(codes(&lines), ["220", "250", "250", "250", "354"]);
        assert!(seen.is_empty());
    }

    #[tokio::test]
    async fn eof_in_data_submits_nothing() {
        let input = "EHLO c\r\nMAIL FROM:<a@x.test>\r\nRCPT TO:<r@bounce.test>\r\nDATA\r\nSubject: cut\r\n\r\nhalf";
        let (lines, seen) = exchange(config(), Stored::Ok, input.as_bytes()).await;
        assert_eq!(codes(&lines), ["220", "250", "250", "250", "354"]);
        assert!(seen.is_empty());
        // Cut right after a line end too.
        let (_, seen) = exchange(config(), Stored::Ok, &input.as_bytes()[..input.len() - 4]).await;
        assert!(seen.is_empty());
    }

    #[tokio::test]
    async fn command_timeout_is_421() {
        let cfg = Config { command_timeout: Duration::from_millis(150), ..config() };
        let started = Instant::now();
        talk(cfg, Stored::Ok, |mut c| async move {
            c.reply().await;
            c.expect("EHLO c\r\n", "250").await;
            c.send("NO").await; // half a command, then nothing
            assert!(c.reply().await.starts_with("421 4.4.2 "));
            assert!(c.closed().await);
        })
        .await;
        assert!(started.elapsed() < Duration::from_secs(5));
    }

    #[tokio::test]
    async fn data_timeout_closes_without_250() {
        let cfg = Config { data_timeout: Duration::from_millis(150), ..config() };
        let seen = talk(cfg, Stored::Ok, |mut c| async move {
            c.reply().await;
            c.expect("EHLO c\r\nMAIL FROM:<a@x.test>\r\nRCPT TO:<r@bounce.test>\r\n", "250").await;
            c.reply().await;
            c.reply().await;
            c.expect("DATA\r\n", "354").await;
            c.send("Subject: slow\r\n").await;
            let r = c.reply().await;
            assert!(r.starts_with("421 4.4.2 "), "{r}");
            assert!(c.closed().await);
        })
        .await;
        assert!(seen.is_empty());
    }

    #[tokio::test]
    async fn long_command_line_is_refused_and_not_kept() {
        let mut input = b"EHLO c\r\nNOOP ".to_vec();
        input.extend(std::iter::repeat_n(b'a', 1024 * 1024));
        input.extend_from_slice(b"\r\nNOOP\r\nQUIT\r\n");
        let (lines, _) = exchange(config(), Stored::Ok, &input).await;
        assert_eq!(codes(&lines), ["220", "250", "500", "250", "221"]);
        assert_eq!(lines[6], "500 5.5.2 Error: line too long");

        // The line buffer never holds more than MAX_LINE bytes.
        let mut reader = BufReader::new(&input[8..]);
        let mut line = Vec::with_capacity(MAX_LINE);
        assert!(matches!(read_command(&mut reader, &mut line).await.unwrap(), Input::TooLong));
        assert!(line.capacity() <= MAX_LINE, "capacity {}", line.capacity());
        assert!(matches!(read_command(&mut reader, &mut line).await.unwrap(), Input::Line));
        assert_eq!(line, b"NOOP\r\n");

        // 1000 bytes with the CRLF is a line; 1001 is too long.
        for (len, ok) in [(1000, true), (1001, false)] {
            let cmd = format!("NOOP {}\r\n", "a".repeat(len - 7));
            let mut reader = BufReader::new(cmd.as_bytes());
            let got = read_command(&mut reader, &mut line).await.unwrap();
            assert_eq!(matches!(got, Input::Line), ok, "{len} bytes");
        }
    }

    #[tokio::test]
    async fn long_message_lines_are_kept_whole() {
        // A line longer than the chunk, with its CR right at a chunk boundary.
        for len in [DATA_CHUNK - 2, DATA_CHUNK - 1, DATA_CHUNK, DATA_CHUNK + 1, 3 * DATA_CHUNK] {
            let line = ".".to_string() + &"y".repeat(len);
            let input = format!("{line}\r\nend\r\n.\r\n");
            let mut raw = Vec::new();
            let end = read_data(&mut BufReader::new(input.as_bytes()), &mut raw, 1 << 20).await.unwrap();
            assert_eq!(end, DataEnd::Complete);
            assert_eq!(raw, format!("{}\r\nend\r\n", &line[1..]).as_bytes(), "line of {len}");
        }
    }

    #[tokio::test]
    async fn message_reading_does_not_depend_on_how_bytes_arrive() {
        let input: &[u8] = b"..a\r\n.\r\r\nb\n.\n.\r\n..\r\n\r\n.\r\nNOOP\r\n";
        let expected: &[u8] = b".a\r\n\r\r\nb\r\n.\r\n.\r\n.\r\n\r\n";
        for capacity in 1..=input.len() {
            let mut reader = BufReader::with_capacity(capacity, input);
            let mut raw = Vec::new();
            assert_eq!(read_data(&mut reader, &mut raw, 1000).await.unwrap(), DataEnd::Complete);
            assert_eq!(raw, expected, "read buffer of {capacity}");
            let mut rest = Vec::new();
            reader.read_to_end(&mut rest).await.unwrap();
            assert_eq!(rest, b"NOOP\r\n", "the commands after the message stay unread");
        }
    }

    #[test]
    fn the_message_buffer_never_grows_past_the_limit() {
        let mut raw = Vec::new();
        for _ in 0..999 {
            append(&mut raw, b"x", 1000);
            assert!(raw.capacity() <= 1000);
        }
        let mut raw = Vec::new();
        for _ in 0..100 {
            append(&mut raw, &[b'x'; 99], 10_000);
            assert!(raw.capacity() <= 10_000);
        }
    }

    #[tokio::test]
    async fn sequence_and_unknown_commands() {
        let input = crlf(&[
            "MAIL FROM:<a@x.test>",
            "DATA",
            "VRFY root",
            "EHLO",
            "EHLO c",
            "RCPT TO:<r@bounce.test>",
            "DATA",
            "MAIL FROM:<a@x.test>",
            "MAIL FROM:<b@x.test>",
            "DATA",
            "RSET",
            "RCPT TO:<r@bounce.test>",
            "STARTTLS",
            "AUTH PLAIN x",
            "FOO",
            "",
            "MAIL FROM:<a b@x.test>",
            "MAIL FROM:<a@x.test> SMTPUTF8",
            "DATA x",
            "NOOP",
            "QUIT",
        ]);
        let (lines, seen) = exchange(config(), Stored::Ok, input.as_bytes()).await;
        let expected = [
            "220", "503", "503", "252", "501", "250", "503", "503", "250", "503", "503", "250", "503", "502", "502",
            "500", "500", "501", "555", "501", "250", "221",
        ];
        assert_eq!(codes(&lines), expected);
        let finals: Vec<&String> = lines.iter().filter(|l| l.as_bytes().get(3) != Some(&b'-')).collect();
        assert!(finals[1].starts_with("503 5.5.1 "), "{}", finals[1]);
        assert!(finals[15].starts_with("500 5.5.2 "), "{}", finals[15]);
        assert!(finals[17].starts_with("501 5.1.7 "), "{}", finals[17]);
        assert!(seen.is_empty());
    }

    #[tokio::test]
    async fn too_many_recipients_is_452() {
        let cfg = Config { max_recipients: 2, ..config() };
        let input = crlf(&[
            "EHLO c",
            "MAIL FROM:<a@x.test>",
            "RCPT TO:<r1@bounce.test>",
            "RCPT TO:<r2@bounce.test>",
            "RCPT TO:<r3@bounce.test>",
            "DATA",
            "x",
            ".",
            "QUIT",
        ]);
        let (lines, seen) = exchange(cfg, Stored::Ok, input.as_bytes()).await;
        assert_eq!(codes(&lines), ["220", "250", "250", "250", "250", "452", "354", "250", "221"]);
        assert!(lines[9].starts_with("452 4.5.3 "), "{}", lines[9]);
        assert_eq!(seen[0].rcpt_to, ["r1@bounce.test", "r2@bounce.test"]);
    }

    #[tokio::test]
    async fn too_many_errors_end_the_session() {
        let input = "EHLO c\r\nFOO\r\nNOOP\r\n".to_string() + &"BAR\r\n".repeat(30);
        let (lines, _) = exchange(config(), Stored::Ok, input.as_bytes()).await;
        let codes = codes(&lines);
        assert_eq!(codes.len(), 3 + 1 + MAX_ERRORS + 1, "{codes:?}");
        assert_eq!(codes[..4], ["220", "250", "500", "250"], "a success resets the count");
        assert!(codes[4..4 + MAX_ERRORS].iter().all(|c| *c == "500"));
        assert!(lines.last().unwrap().starts_with("421 4.7.0 "));
    }

    #[test]
    fn reply_splitting() {
        assert_eq!(split_reply("554 5.6.0 bad"), ("554 5.6.0", "bad"));
        assert_eq!(split_reply("550 no enhanced code"), ("550", "no enhanced code"));
        assert_eq!(split_reply("550 5.7 text"), ("550", "5.7 text"));
        assert_eq!(refusal("  553 5.1.8 no  "), "553 5.1.8 no");
        assert_eq!(refusal("bad"), "554 5.0.0 bad");
    }

    /// A small fixed-seed generator (xorshift64*), so the garbage is the same on every run.
    struct Rng(u64);

    impl Rng {
        fn next(&mut self) -> u64 {
            self.0 ^= self.0 >> 12;
            self.0 ^= self.0 << 25;
            self.0 ^= self.0 >> 27;
            self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
        }

        fn below(&mut self, n: usize) -> usize {
            (self.next() % n as u64) as usize
        }
    }

    /// Each reply line is a code, then a space or a dash.
    fn well_formed(lines: &[String]) -> bool {
        lines.iter().all(|l| {
            let b = l.as_bytes();
            b.len() >= 4 && b[..3].iter().all(u8::is_ascii_digit) && (b[3] == b' ' || b[3] == b'-')
        })
    }

    #[tokio::test]
    async fn random_bytes_get_only_errors() {
        let mut rng = Rng(0x5eed_0f9e_e3a1);
        for round in 0..200 {
            let len = rng.below(3000);
            let input: Vec<u8> = (0..len)
                .map(|_| match rng.below(20) {
                    0 => b'\n',
                    1 => b'\r',
                    _ => rng.next() as u8,
                })
                .collect();
            let (lines, seen) = exchange(config(), Stored::Ok, &input).await;
            assert!(well_formed(&lines), "round {round}: {lines:?}");
            assert!(seen.is_empty(), "round {round}");
            let codes = codes(&lines);
            assert_eq!(codes[0], "220");
            assert!(codes[1..].iter().all(|c| c.starts_with('4') || c.starts_with('5')), "round {round}: {codes:?}");
        }
    }

    #[tokio::test]
    async fn random_commands_never_panic() {
        #[rustfmt::skip]
        let words = [
            "EHLO c", "LHLO c", "HELO", "MAIL FROM:<a@x.test>", "MAIL FROM:<>", "MAIL FROM:<a@x.test> SIZE=999999",
            "RCPT TO:<r@bounce.test>", "RCPT TO:<r@other.test>", "RCPT TO:<\"q\\", "DATA", ".", "..", "RSET", "NOOP",
            "VRFY", "QUIT", "x", "", "\u{fffd}", "\0", "<", ">", "@", "SIZE=", "\t",
        ];
        let ends = ["\r\n", "\n", "\r", " "];
        let mut rng = Rng(20_240_601);
        let (mut data, mut submitted) = (0, 0);
        for round in 0..300 {
            // A few transactions, each line kept, dropped, doubled or replaced by a random word,
            // with now and then a line end other than CRLF.
            let mut plan = vec![["EHLO c", "LHLO c"][rng.below(2)]];
            for _ in 0..=rng.below(3) {
                plan.extend(["MAIL FROM:<a@x.test>", "RCPT TO:<r@bounce.test>", "RCPT TO:<s@bounce.test>", "DATA"]);
                plan.extend(["Subject: x", "", "..dot", "body"].iter().take(rng.below(5)));
                plan.push(".");
            }
            plan.push("QUIT");
            let mut input = String::new();
            for line in plan {
                let end = if rng.below(10) == 0 { ends[rng.below(ends.len())] } else { "\r\n" };
                match rng.below(12) {
                    0 => continue,
                    1 => input.push_str(&format!("{line}{end}{line}{end}")),
                    2 => input.push_str(&format!("{}{end}", words[rng.below(words.len())])),
                    _ => input.push_str(&format!("{line}{end}")),
                }
            }
            let cfg = Config { max_recipients: 3, max_message_size: 200, ..config() };
            let (lines, seen) = exchange(cfg, Stored::Failed, input.as_bytes()).await;
            assert!(well_formed(&lines), "round {round}: {input:?} → {lines:?}");
            // Every stored message was answered 451: once over SMTP, once per recipient over LMTP.
            let failed = lines.iter().filter(|l| l.starts_with("451 4.3.0 ")).count();
            let expected: usize = seen.iter().map(|e| if e.lmtp { e.rcpt_to.len() } else { 1 }).sum();
            assert_eq!(failed, expected, "round {round}: {input:?} → {lines:?}");
            for env in &seen {
                assert!(env.raw.len() <= 200 && !env.rcpt_to.is_empty() && env.rcpt_to.len() <= 3);
            }
            data += lines.iter().filter(|l| l.starts_with("354 ")).count();
            submitted += seen.len();
        }
        assert!(data > 150 && submitted > 100, "the commands reach DATA ({data}) and submit ({submitted})");
    }
}
