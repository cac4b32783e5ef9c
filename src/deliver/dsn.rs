//! Transport DSNs in Symfony Mailer's form, with no pgrx. `email.add_transport` parses and
//! validates a DSN in the caller's backend (and stores the masked form for display); the worker
//! parses the stored secret DSN again when it builds the transport. Errors describe what is
//! wrong without ever repeating the DSN, so a secret cannot leak through an error or a log line.
//! The common part (scheme, user and secret, host, the options every DSN takes) and the SMTP,
//! file and capture DSNs are handled here; for a provider DSN, the provider module checks its
//! keys and options and says which part is secret (`deliver::providers::Provider`).

use std::collections::BTreeMap;
use std::fmt;
use std::time::Duration;

use percent_encoding::percent_decode_str;

use super::providers::{self, Provider, SecretIn, Userinfo};

/// What a DSN selects.
#[derive(Clone, Copy)]
pub enum Kind {
    Smtp,
    /// A provider's HTTP API; the provider knows its part of the DSN.
    Http(&'static dyn Provider),
    File,
    Capture,
}

impl Kind {
    /// The name stored in `email.transports.kind`.
    pub fn name(self) -> &'static str {
        match self {
            Kind::Smtp => "smtp",
            Kind::Http(p) => p.name(),
            Kind::File => "file",
            Kind::Capture => "capture",
        }
    }

    pub fn is_http(self) -> bool {
        matches!(self, Kind::Http(_))
    }
}

impl PartialEq for Kind {
    fn eq(&self, other: &Kind) -> bool {
        self.name() == other.name()
    }
}

impl Eq for Kind {}

impl fmt::Debug for Kind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Kind::Http(p) => write!(f, "Http({})", p.name()),
            other => f.write_str(other.name()),
        }
    }
}

/// How an SMTP connection is secured.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Tls {
    /// STARTTLS is required (the default for `smtp://`).
    StartTls,
    /// TLS from the first byte (`smtps://`).
    Implicit,
    /// Plain text (`?tls=none`): tests and local relays only.
    None,
}

/// A request-rate cap: `count` per `per`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Rate {
    pub count: u32,
    pub per: Duration,
}

/// A parsed, validated DSN.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Dsn {
    pub kind: Kind,
    pub scheme: String,
    /// The SMTP user, or a provider's API key (SES: the access key id).
    pub user: Option<String>,
    /// The SMTP password, or a provider's second part (Mailgun: the domain; SES: the secret key).
    pub password: Option<String>,
    /// `None` for `@default` (the provider's public endpoint).
    pub host: Option<String>,
    pub port: Option<u16>,
    /// Directory of the file transport.
    pub path: Option<String>,
    pub tls: Tls,
    /// Verify TLS certificates (always, unless `verify=false`).
    pub verify: bool,
    /// Extra CA certificate (PEM file) to trust.
    pub ca: Option<String>,
    pub timeout: Duration,
    pub max_connections: u32,
    pub rate: Option<Rate>,
    /// Default sender for messages sent through this transport.
    pub from: Option<String>,
    /// `http` or `https` for provider endpoints.
    pub http_scheme: String,
    /// Provider options: region, message_stream, helo, sandbox...
    pub options: BTreeMap<String, String>,
}

/// A DSN refused by `parse`. It is only ever shown (`email.add_transport` raises it, the worker
/// logs it), so it is a message: what is wrong, never the DSN itself.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct DsnError(pub String);

fn err<T>(msg: impl Into<String>) -> Result<T, DsnError> {
    Err(DsnError(msg.into()))
}

/// Parses `10s`, `500ms`, `2min`, `1h` or a bare number of seconds.
pub fn parse_duration(s: &str) -> Option<Duration> {
    let s = s.trim();
    let split = s.find(|c: char| !c.is_ascii_digit() && c != '.').unwrap_or(s.len());
    let (num, unit) = s.split_at(split);
    let n: f64 = num.parse().ok()?;
    if !n.is_finite() || n < 0.0 {
        return None;
    }
    let secs = match unit.trim() {
        "" | "s" | "sec" => n,
        "ms" => n / 1000.0,
        "m" | "min" => n * 60.0,
        "h" => n * 3600.0,
        _ => return None,
    };
    (secs <= 86_400.0).then(|| Duration::from_secs_f64(secs))
}

/// Parses `50/s`, `1000/min`, `10000/h`.
pub fn parse_rate(s: &str) -> Option<Rate> {
    let (count, per) = s.split_once('/')?;
    let count: u32 = count.trim().parse().ok().filter(|c| *c > 0)?;
    let per = match per.trim() {
        "s" | "sec" | "second" => Duration::from_secs(1),
        "m" | "min" | "minute" => Duration::from_secs(60),
        "h" | "hour" => Duration::from_secs(3600),
        _ => return None,
    };
    Some(Rate { count, per })
}

/// Characters escaped when a user part is shown again.
const USERINFO: &percent_encoding::AsciiSet =
    &percent_encoding::CONTROLS.add(b' ').add(b':').add(b'@').add(b'/').add(b'?').add(b'#').add(b'%').add(b'&');

/// Options every DSN takes.
const COMMON: &[&str] = &["timeout", "max_connections", "rate", "from"];
/// Options of an SMTP DSN.
const SMTP: &[&str] = &["tls", "verify", "ca", "helo"];

/// The options a DSN of `kind` takes besides the common ones.
fn allowed(kind: Kind) -> Vec<&'static str> {
    match kind {
        Kind::Smtp => SMTP.to_vec(),
        Kind::Http(p) => std::iter::once("scheme").chain(p.options().iter().copied()).collect(),
        Kind::File | Kind::Capture => Vec::new(),
    }
}

/// The kind a scheme selects.
fn kind_of(scheme: &str) -> Result<Kind, DsnError> {
    match scheme {
        "smtp" | "smtps" => Ok(Kind::Smtp),
        "file" => Ok(Kind::File),
        "capture" => Ok(Kind::Capture),
        other => providers::by_scheme(other).map(Kind::Http).ok_or_else(|| {
            let mut known = vec!["smtp", "smtps"];
            known.extend(providers::ALL.iter().filter_map(|p| p.schemes().first().copied()));
            known.push("file");
            DsnError(format!("unknown DSN scheme \"{other}\" (expected {} or capture)", known.join(", ")))
        }),
    }
}

fn decode(s: &str, what: &str) -> Result<String, DsnError> {
    percent_decode_str(s)
        .decode_utf8()
        .map(|c| c.into_owned())
        .or_else(|_| err(format!("the {what} is not valid percent-encoded UTF-8")))
}

/// Puts `secret` into the part of `input` that holds the secret (an SMTP or SES password, a
/// provider's API key), for `add_transport(..., secret => ...)`: the secret can then travel as a
/// bind parameter, never in a statement's text. The DSN must leave that part empty.
pub fn with_secret(input: &str, secret: &str) -> Result<String, DsnError> {
    if secret.is_empty() || secret.contains(['\r', '\n', '\0']) {
        return err("the secret is empty or contains a line break or NUL character");
    }
    let mut url = url::Url::parse(input.trim())
        .or_else(|e| err(format!("the DSN is not a URL of the form scheme://[user@]host[:port][?options] ({e})")))?;
    let in_user = match url.scheme() {
        "smtp" | "smtps" => false,
        "file" | "capture" => return err(format!("a {} DSN has no secret", url.scheme())),
        scheme => match providers::by_scheme(scheme) {
            Some(p) => matches!(p.secret_in(), SecretIn::User),
            None => return err(format!("unknown DSN scheme \"{scheme}\"")),
        },
    };
    let taken = if in_user { !url.username().is_empty() } else { url.password().is_some() };
    if taken {
        return err("give the secret either in the DSN or as secret =>, not both");
    }
    if !in_user && url.username().is_empty() {
        return err("a DSN whose secret is a password needs the user name before the @, as in smtp://user@host:587");
    }
    let set = if in_user { url.set_username(secret) } else { url.set_password(Some(secret)) };
    set.or_else(|_| err("the secret cannot be put into this DSN"))?;
    Ok(url.to_string())
}

/// The timeout of a DSN that gives none.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(30);
/// The connections per worker of a DSN that gives none.
pub const DEFAULT_MAX_CONNECTIONS: u32 = 4;

/// Parses and validates a DSN: the common part here, then the part that depends on its kind.
pub fn parse(input: &str) -> Result<Dsn, DsnError> {
    if input.trim().is_empty() {
        return err("the DSN is empty");
    }
    if input.contains(['\r', '\n', '\0']) {
        return err("the DSN contains a line break or NUL character");
    }
    let url = url::Url::parse(input.trim()).or_else(|e| {
        err(format!("the DSN is not a URL of the form scheme://[user:secret@]host[:port][?options] ({e})"))
    })?;
    let scheme = url.scheme().to_string();
    let kind = kind_of(&scheme)?;
    let user = Some(url.username()).filter(|u| !u.is_empty()).map(|u| decode(u, "user part")).transpose()?;
    let password = url.password().map(|p| decode(p, "secret part")).transpose()?;
    let host = url.host_str().map(str::to_string).filter(|h| !h.is_empty());
    let options = options(&url, kind)?;

    let mut dsn = Dsn {
        kind,
        tls: if scheme == "smtps" { Tls::Implicit } else { Tls::StartTls },
        scheme,
        user,
        password,
        host,
        port: url.port(),
        path: None,
        verify: true,
        ca: None,
        timeout: DEFAULT_TIMEOUT,
        max_connections: DEFAULT_MAX_CONNECTIONS,
        rate: None,
        from: None,
        http_scheme: "https".into(),
        options,
    };
    take_common(&mut dsn)?;
    match kind {
        Kind::Smtp => smtp(&mut dsn)?,
        Kind::Http(p) => provider(p, &mut dsn)?,
        Kind::File => file(&mut dsn, url.path())?,
        Kind::Capture => {
            if dsn.user.is_some() || dsn.host.is_some() || !url.path().trim_matches('/').is_empty() {
                return err("a capture DSN is just capture://");
            }
        }
    }
    Ok(dsn)
}

/// The query options, each known for this kind and given once.
fn options(url: &url::Url, kind: Kind) -> Result<BTreeMap<String, String>, DsnError> {
    let allowed = allowed(kind);
    let mut options = BTreeMap::new();
    for (k, v) in url.query_pairs() {
        let k = k.into_owned();
        if !COMMON.contains(&k.as_str()) && !allowed.contains(&k.as_str()) {
            let mut known: Vec<&str> = COMMON.iter().chain(&allowed).copied().collect();
            known.sort();
            return err(format!("unknown option \"{k}\" for a {} DSN (known: {})", kind.name(), known.join(", ")));
        }
        if options.insert(k.clone(), v.into_owned()).is_some() {
            return err(format!("option \"{k}\" is given twice"));
        }
    }
    Ok(options)
}

/// Takes the options every DSN has out of `dsn.options`: timeout, max_connections, rate, from.
fn take_common(dsn: &mut Dsn) -> Result<(), DsnError> {
    if let Some(t) = dsn.options.remove("timeout") {
        dsn.timeout = match parse_duration(&t).filter(|d| !d.is_zero()) {
            Some(d) => d,
            None => return err(format!("option timeout=\"{t}\" is not a duration such as 10s or 500ms")),
        };
    }
    if let Some(m) = dsn.options.remove("max_connections") {
        dsn.max_connections = match m.parse::<u32>() {
            Ok(n) if (1..=1000).contains(&n) => n,
            _ => return err(format!("option max_connections=\"{m}\" must be a whole number from 1 to 1000")),
        };
    }
    if let Some(r) = dsn.options.remove("rate") {
        dsn.rate = match parse_rate(&r) {
            Some(rate) => Some(rate),
            None => return err(format!("option rate=\"{r}\" must look like 50/s, 1000/min or 10000/h")),
        };
    }
    dsn.from = dsn.options.remove("from");
    if let Some(f) = &dsn.from {
        crate::message::parse_mailbox("from", f).or_else(|e| err(format!("option from: {}", e.message)))?;
    }
    Ok(())
}

/// `smtp://` and `smtps://`: a host is required; `tls`, `verify` and `ca` are read here, `helo`
/// stays in the options.
fn smtp(dsn: &mut Dsn) -> Result<(), DsnError> {
    if dsn.host.is_none() || dsn.host.as_deref() == Some("default") {
        return err("an SMTP DSN needs a host, as in smtp://user:secret@mail.example.org:587");
    }
    let implicit = dsn.tls == Tls::Implicit;
    if let Some(t) = dsn.options.remove("tls") {
        dsn.tls = match (t.as_str(), implicit) {
            ("starttls", false) => Tls::StartTls,
            ("none", false) => Tls::None,
            ("implicit", _) => Tls::Implicit,
            (_, true) => return err("smtps:// always uses implicit TLS; drop the tls option"),
            _ => return err(format!("option tls=\"{t}\" must be starttls, implicit or none")),
        };
    }
    if let Some(v) = dsn.options.remove("verify") {
        dsn.verify = match v.as_str() {
            "true" | "1" | "yes" => true,
            "false" | "0" | "no" => false,
            _ => return err(format!("option verify=\"{v}\" must be true or false")),
        };
    }
    if let Some(ca) = dsn.options.remove("ca") {
        if !ca.starts_with('/') {
            return err(format!("option ca=\"{ca}\" must be an absolute path to a PEM file"));
        }
        dsn.ca = Some(ca);
    }
    if dsn.password.is_some() && dsn.user.is_none() {
        return err("an SMTP DSN with a password needs a user name too");
    }
    if dsn.port.is_none() {
        dsn.port = Some(if dsn.tls == Tls::Implicit { 465 } else { 25 });
    }
    Ok(())
}

/// A provider DSN: the provider checks its keys and options, then the endpoint is read here
/// (`@default` or `host:port`, and `scheme=http` for local test servers).
fn provider(p: &dyn Provider, dsn: &mut Dsn) -> Result<(), DsnError> {
    let u = Userinfo { scheme: &dsn.scheme, user: dsn.user.as_deref(), password: dsn.password.as_deref() };
    p.check_dsn(u, &mut dsn.options).map_err(DsnError)?;
    if dsn.host.is_none() {
        return err(format!("a {} DSN needs a host: @default for the public endpoint, or host:port", p.name()));
    }
    if dsn.host.as_deref() == Some("default") {
        dsn.host = None;
        if dsn.port.is_some() {
            return err("@default takes no port");
        }
    }
    if let Some(s) = dsn.options.remove("scheme") {
        if s != "http" && s != "https" {
            return err(format!("option scheme=\"{s}\" must be http or https"));
        }
        if s == "http" && dsn.host.is_none() {
            return err("scheme=http is only allowed with an explicit host (local test servers)");
        }
        dsn.http_scheme = s;
    }
    Ok(())
}

/// `file:///absolute/directory`.
fn file(dsn: &mut Dsn, url_path: &str) -> Result<(), DsnError> {
    if dsn.user.is_some() || dsn.host.is_some() {
        return err("a file DSN is file:///absolute/directory, with no user or host");
    }
    let path = decode(url_path, "path")?;
    if !path.starts_with('/') || path.len() < 2 {
        return err("a file DSN needs an absolute directory, as in file:///var/lib/pg_email/out");
    }
    dsn.path = Some(path.trim_end_matches('/').to_string());
    Ok(())
}

impl Dsn {
    /// The DSN as shown in `email.transports`: every secret replaced by `***`.
    pub fn masked(&self) -> String {
        let enc = |s: &str| percent_encoding::utf8_percent_encode(s, USERINFO).to_string();
        let mut out = format!("{}://", self.scheme);
        let mut q: Vec<String> = Vec::new();
        match self.kind {
            Kind::Smtp => {
                if let Some(u) = &self.user {
                    out.push_str(&enc(u));
                    if self.password.is_some() {
                        out.push_str(":***");
                    }
                    out.push('@');
                }
                out.push_str(self.host.as_deref().unwrap_or(""));
                match (self.tls, self.scheme.as_str()) {
                    (Tls::None, _) => q.push("tls=none".into()),
                    (Tls::Implicit, "smtp") => q.push("tls=implicit".into()),
                    _ => {}
                }
                if !self.verify {
                    q.push("verify=false".into());
                }
                if let Some(ca) = &self.ca {
                    q.push(format!("ca={ca}"));
                }
            }
            Kind::Http(p) => {
                let (user, password) = match p.secret_in() {
                    SecretIn::User => ("***", self.password.as_deref()),
                    SecretIn::Password => (self.user.as_deref().unwrap_or(""), self.password.as_ref().map(|_| "***")),
                };
                out.push_str(&enc(user));
                if let Some(pw) = password {
                    out.push(':');
                    out.push_str(&enc(pw));
                }
                out.push('@');
                out.push_str(self.host.as_deref().unwrap_or("default"));
                if self.http_scheme != "https" {
                    q.push(format!("scheme={}", self.http_scheme));
                }
            }
            Kind::File => out.push_str(self.path.as_deref().unwrap_or("")),
            Kind::Capture => {}
        }
        if let Some(p) = self.port {
            out.push_str(&format!(":{p}"));
        }
        let secret_options = match self.kind {
            Kind::Http(p) => p.secret_options(),
            _ => &[],
        };
        for (k, v) in &self.options {
            if secret_options.contains(&k.as_str()) {
                q.push(format!("{k}=***"));
            } else {
                q.push(format!("{k}={v}"));
            }
        }
        // Every setting that differs from its default is shown, so the public table tells how a
        // transport behaves without anyone reading the secrets table.
        if self.timeout != DEFAULT_TIMEOUT {
            let ms = self.timeout.as_millis();
            q.push(if ms.is_multiple_of(1000) { format!("timeout={}s", ms / 1000) } else { format!("timeout={ms}ms") });
        }
        if self.max_connections != DEFAULT_MAX_CONNECTIONS {
            q.push(format!("max_connections={}", self.max_connections));
        }
        if let Some(r) = &self.rate {
            let unit = match r.per.as_secs() {
                1 => "s",
                60 => "min",
                _ => "h",
            };
            q.push(format!("rate={}/{unit}", r.count));
        }
        if let Some(f) = &self.from {
            q.push(format!("from={}", enc(f)));
        }
        if !q.is_empty() {
            out.push('?');
            out.push_str(&q.join("&"));
        }
        out
    }

    /// The secrets in this DSN, so callers can scrub them from any text they pass on.
    pub fn secrets(&self) -> Vec<&str> {
        let mut s: Vec<&str> = match self.kind {
            Kind::Smtp => self.password.as_deref().into_iter().collect(),
            Kind::Http(p) => {
                let part = match p.secret_in() {
                    SecretIn::User => self.user.as_deref(),
                    SecretIn::Password => self.password.as_deref(),
                };
                let options = p.secret_options().iter().filter_map(|k| self.options.get(*k)).map(String::as_str);
                part.into_iter().chain(options).collect()
            }
            Kind::File | Kind::Capture => Vec::new(),
        };
        s.retain(|x| x.len() >= 3);
        s
    }
}

/// Replaces every secret of `dsn` in `text` by `***`.
pub fn scrub(text: &str, secrets: &[&str]) -> String {
    let mut out = text.to_string();
    for s in secrets {
        out = out.replace(s, "***");
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_documented_form_parses() {
        let smtp = parse("smtp://user:pa%3Ass@mail.example.org:587").unwrap();
        assert_eq!((smtp.kind, smtp.tls, smtp.port), (Kind::Smtp, Tls::StartTls, Some(587)));
        assert_eq!(smtp.password.as_deref(), Some("pa:ss"));
        assert_eq!(parse("smtps://u:p@mail.example.org:465").unwrap().tls, Tls::Implicit);
        assert_eq!(parse("smtp://localhost:2525?tls=none").unwrap().tls, Tls::None);
        assert_eq!(parse("sendgrid+api://SG.key@default").unwrap().kind.name(), "sendgrid");
        let pm = parse("postmark+api://TOKEN@default?message_stream=outbound").unwrap();
        assert_eq!(pm.options.get("message_stream").map(String::as_str), Some("outbound"));
        assert_eq!(parse("resend+api://re_123@default").unwrap().kind.name(), "resend");
        let mg = parse("mailgun+api://KEY:mg.example.org@default?region=eu").unwrap();
        assert_eq!(mg.password.as_deref(), Some("mg.example.org"));
        let ses = parse("ses+api://AKIA:SECRET%2Fx@default?region=eu-west-1").unwrap();
        assert_eq!(ses.password.as_deref(), Some("SECRET/x"));
        assert_eq!(parse("file:///var/tmp/out").unwrap().path.as_deref(), Some("/var/tmp/out"));
        assert_eq!(parse("capture://").unwrap().kind, Kind::Capture);
        let local = parse("resend+api://k@127.0.0.1:8025?scheme=http&timeout=5s&rate=50/s&max_connections=8").unwrap();
        assert_eq!(local.host.as_deref(), Some("127.0.0.1"));
        assert_eq!(local.http_scheme, "http");
        assert_eq!(local.timeout, Duration::from_secs(5));
        assert_eq!(local.rate, Some(Rate { count: 50, per: Duration::from_secs(1) }));
        assert_eq!(local.max_connections, 8);
    }

    #[test]
    fn bad_dsns_say_what_is_wrong_without_the_secret() {
        let cases = [
            ("", "empty"),
            ("nonsense", "not a URL"),
            ("gopher://h", "unknown DSN scheme"),
            ("smtp://u:topsecret@:25", "not a URL"),
            ("smtp://u:topsecret@h:25?tls=maybe", "tls"),
            ("smtp://u:topsecret@h:25?bogus=1", "unknown option \"bogus\""),
            ("smtp://u:topsecret@h:25?timeout=forever", "timeout"),
            ("smtp://u:topsecret@h:25?rate=lots", "rate"),
            ("smtp://u:topsecret@h:25?max_connections=0", "max_connections"),
            ("sendgrid+api://@default", "API key"),
            ("sendgrid+api://topsecret:x@default", "one key"),
            ("mailgun+api://topsecret@default", "sending domain"),
            ("ses+api://AKIA@default", "secret key"),
            ("ses+api://AKIA:topsecret@default?region=Mars%20One", "region"),
            ("postmark+api://topsecret@default?scheme=http", "explicit host"),
            ("file://relative", "absolute"),
            ("capture://x", "capture://"),
            ("smtps://u:topsecret@h?tls=none", "implicit"),
        ];
        for (dsn, want) in cases {
            let e = parse(dsn).expect_err(dsn).0;
            assert!(e.contains(want), "{dsn}: {e}");
            assert!(!e.contains("topsecret"), "{dsn}: {e}");
        }
    }

    #[test]
    fn masking_hides_every_secret() {
        let cases = [
            ("smtp://user:topsecret@mail.example.org:587", "smtp://user:***@mail.example.org:587"),
            ("sendgrid+api://topsecret@default", "sendgrid+api://***@default"),
            (
                "mailgun+api://topsecret:mg.example.org@default?region=eu",
                "mailgun+api://***:mg.example.org@default?region=eu",
            ),
            ("ses+api://AKIA:topsecret@default?region=eu-west-1", "ses+api://AKIA:***@default?region=eu-west-1"),
            ("file:///tmp/x", "file:///tmp/x"),
            ("capture://", "capture://"),
        ];
        for (dsn, want) in cases {
            let d = parse(dsn).unwrap();
            assert_eq!(d.masked(), want);
            assert!(!d.masked().contains("topsecret"));
        }
        let d = parse("smtp://u:topsecret@h:25").unwrap();
        assert_eq!(scrub("auth failed for topsecret", &d.secrets()), "auth failed for ***");
    }

    #[test]
    fn the_masked_dsn_shows_every_setting_that_is_not_the_default() {
        let d =
            parse("resend+api://topsecret@127.0.0.1:8025?scheme=http&timeout=5s&rate=50/s&max_connections=8").unwrap();
        assert_eq!(d.masked(), "resend+api://***@127.0.0.1:8025?scheme=http&timeout=5s&max_connections=8&rate=50/s");
        assert_eq!(parse("smtp://h:25?timeout=500ms").unwrap().masked(), "smtp://h:25?timeout=500ms");
        assert_eq!(parse("smtp://h:25?timeout=30s&max_connections=4").unwrap().masked(), "smtp://h:25");
    }

    #[test]
    fn a_separate_secret_goes_where_the_dsn_keeps_it() {
        let smtp = with_secret("smtp://user@mail.example.org:587", "p@ss:w/rd").unwrap();
        assert_eq!(parse(&smtp).unwrap().password.as_deref(), Some("p@ss:w/rd"));
        let sg = with_secret("sendgrid+api://default", "SG.key").unwrap();
        assert_eq!(parse(&sg).unwrap().masked(), "sendgrid+api://***@default");
        assert_eq!(parse(&sg).unwrap().user.as_deref(), Some("SG.key"));
        let mg = with_secret("mailgun+api://:mg.example.org@default?region=eu", "key-1").unwrap();
        assert_eq!(parse(&mg).unwrap().masked(), "mailgun+api://***:mg.example.org@default?region=eu");
        let ses = with_secret("ses+api://AKIA@default?region=eu-west-1", "sec/ret").unwrap();
        assert_eq!(parse(&ses).unwrap().password.as_deref(), Some("sec/ret"));
        for (dsn, want) in [
            ("smtp://user:old@h:587", "not both"),
            ("sendgrid+api://SG.old@default", "not both"),
            ("smtp://h:587", "needs the user name"),
            ("file:///tmp", "has no secret"),
            ("gopher://x", "unknown DSN scheme"),
        ] {
            let e = with_secret(dsn, "topsecret").unwrap_err().0;
            assert!(e.contains(want), "{dsn}: {e}");
            assert!(!e.contains("topsecret"), "{dsn}: {e}");
        }
        assert!(with_secret("smtp://u@h:587", "a\nb").is_err());
    }

    #[test]
    fn durations_and_rates() {
        assert_eq!(parse_duration("200ms"), Some(Duration::from_millis(200)));
        assert_eq!(parse_duration("2min"), Some(Duration::from_secs(120)));
        assert_eq!(parse_duration("7"), Some(Duration::from_secs(7)));
        assert_eq!(parse_duration("-1"), None);
        assert_eq!(parse_rate("1000/min").map(|r| r.count), Some(1000));
        assert_eq!(parse_rate("0/s"), None);
    }

    #[test]
    fn error_texts_and_masked_forms_are_exact() {
        // email.add_transport shows these texts and email.transports these forms, word for word.
        let errors = [
            ("gopher://h", "unknown DSN scheme \"gopher\" (expected smtp, smtps, sendgrid+api, postmark+api, resend+api, mailgun+api, ses+api, file or capture)"),
            ("sendgrid+api://k@default?tls=none", "unknown option \"tls\" for a sendgrid DSN (known: from, max_connections, rate, region, sandbox, scheme, timeout, webhook_key)"),
            ("resend+api://k@default?region=eu", "unknown option \"region\" for a resend DSN (known: from, max_connections, rate, scheme, timeout, webhook_secret)"),
            ("postmark+api://@default", "a postmark DSN needs the API key before the @, as in postmark+api://KEY@default"),
            ("postmark://a:b@default", "a postmark DSN takes one key: KEY@default, not KEY:SECRET@default"),
            ("sendgrid+api://k@default?sandbox=maybe", "option sandbox=\"maybe\" must be true or false"),
            ("mailgun+api://k:@default", "a mailgun DSN needs the API key and the sending domain, as in mailgun+api://KEY:DOMAIN@default"),
            ("mailgun+api://k:d@default?region=ap", "option region=\"ap\" must be us or eu"),
            ("ses+api://AKIA:s@default?region=", "option region=\"\" is not an AWS region name such as eu-west-1"),
            ("resend+api://k", "a resend DSN needs the API key before the @, as in resend+api://KEY@default"),
            ("sendgrid+api://k@default:443", "@default takes no port"),
            ("sendgrid+api://k@127.0.0.1:8025?scheme=ftp", "option scheme=\"ftp\" must be http or https"),
        ];
        for (dsn, want) in errors {
            assert_eq!(parse(dsn).map(|d| d.masked()), Err(DsnError(want.into())), "{dsn}");
        }
        let masked = [
            (
                "postmark+api://TOKEN@default?message_stream=outbound",
                "postmark+api://***@default?message_stream=outbound",
            ),
            (
                "resend+api://k@127.0.0.1:8025?scheme=http&rate=50/s",
                "resend+api://***@127.0.0.1:8025?scheme=http&rate=50/s",
            ),
            ("ses+api://AKIA:s3cret@default", "ses+api://AKIA:***@default?region=us-east-1"),
            (
                "ses+api://AKIA:s3cret@default?session_token=tok123&configuration_set=cs",
                "ses+api://AKIA:***@default?configuration_set=cs&region=us-east-1&session_token=***",
            ),
            ("smtp://localhost?tls=implicit&verify=false", "smtp://localhost:465?tls=implicit&verify=false"),
        ];
        for (dsn, want) in masked {
            assert_eq!(parse(dsn).map(|d| d.masked()).as_deref(), Ok(want), "{dsn}");
        }
        let ses = parse("ses+api://AKIA:s3cret@default?session_token=tok123").unwrap();
        assert_eq!(ses.secrets(), ["s3cret", "tok123"]);
        assert_eq!(parse("mailgun+api://KEY:mg.example.org@default").unwrap().secrets(), ["KEY"]);
    }

    /// A P-256 public key as SendGrid shows it (base64 SPKI), made with openssl.
    const SENDGRID_KEY: &str = "MFkwEwYHKoZIzj0CAQYIKoZIzj0DAQcDQgAEM8nUUFoL8pTVvbpo4gC6xDDhqQukPBUcyASoMvzJCMxeZZBChO3lVR2MpCzmcuhEKHy38g1YHWZVO9U2BOjvsQ==";

    #[test]
    fn webhook_options_are_checked_and_their_secrets_masked() {
        use crate::webhook::Config;
        let config = |dsn: &str| Config::from_dsn(&parse(dsn).unwrap()).unwrap();
        let sg = format!("sendgrid+api://SG.k@default?webhook_key={}", SENDGRID_KEY.replace('=', "%3D"));
        assert!(matches!(config(&sg), Some(Config::SendGrid { public_key }) if public_key.len() == 91));
        assert_eq!(parse(&sg).unwrap().masked(), format!("sendgrid+api://***@default?webhook_key={SENDGRID_KEY}"));

        let pm = "postmark+api://TOKEN@default?webhook_user=hook&webhook_password=topsecret";
        assert_eq!(config(pm), Some(Config::Postmark { user: "hook".into(), password: "topsecret".into() }));
        assert_eq!(parse(pm).unwrap().masked(), "postmark+api://***@default?webhook_password=***&webhook_user=hook");
        assert_eq!(parse(pm).unwrap().secrets(), ["TOKEN", "topsecret"]);

        // `+` written as %2B, or left as `+` (which a query decodes to a space), mean the same.
        for rs in [
            "resend+api://re_1@default?webhook_secret=whsec_C2FVsBQIhrscChlQIMV%2Bb5sSYspob7oD",
            "resend+api://re_1@default?webhook_secret=whsec_C2FVsBQIhrscChlQIMV+b5sSYspob7oD",
        ] {
            let Some(Config::Resend { secrets }) = config(rs) else { panic!("{rs}") };
            assert_eq!(secrets.len(), 1);
            assert_eq!(secrets[0].len(), 24);
            assert_eq!(parse(rs).unwrap().masked(), "resend+api://***@default?webhook_secret=***");
        }

        let mg = "mailgun+api://KEY:mg.example.org@default?webhook_signing_key=topsecret";
        assert_eq!(config(mg), Some(Config::Mailgun { signing_key: "topsecret".into() }));
        assert_eq!(parse(mg).unwrap().masked(), "mailgun+api://***:mg.example.org@default?webhook_signing_key=***");
        assert_eq!(scrub("bad key topsecret", &parse(mg).unwrap().secrets()), "bad key ***");

        let arn = "arn:aws:sns:eu-west-1:123456789012:ses-events";
        let ses = format!("ses+api://AKIA:s3cret@default?region=eu-west-1&sns_topic_arn={arn}");
        assert_eq!(
            config(&ses),
            Some(Config::Ses {
                topic_arn: arn.into(),
                url_prefix: "https://sns.eu-west-1.amazonaws.com/".into(),
                cert_pem: None
            })
        );
        assert_eq!(
            parse(&ses).unwrap().masked(),
            format!("ses+api://AKIA:***@default?region=eu-west-1&sns_topic_arn={arn}")
        );
        let local = format!("{ses}&sns_url_prefix=http://127.0.0.1:9000/");
        assert!(
            matches!(config(&local), Some(Config::Ses { url_prefix, .. }) if url_prefix == "http://127.0.0.1:9000/")
        );

        let errors = [
            ("sendgrid+api://k@default?webhook_key=AAAA", "option webhook_key must be"),
            ("postmark+api://k@default?webhook_user=u", "option webhook_user needs webhook_password too"),
            ("postmark+api://k@default?webhook_password=topsecret", "option webhook_password needs webhook_user too"),
            ("resend+api://k@default?webhook_secret=topsecret", "option webhook_secret must be"),
            ("resend+api://k@default?webhook_secret=whsec_top!secret", "option webhook_secret must be"),
            ("mailgun+api://k:d@default?webhook_signing_key=", "option webhook_signing_key must be"),
            ("ses+api://A:s@default?sns_topic_arn=topic", "option sns_topic_arn must be"),
            ("ses+api://A:s@default?sns_url_prefix=https://x/", "option sns_url_prefix needs sns_topic_arn"),
            ("ses+api://A:s@default?sns_topic_arn=arn:x&sns_url_prefix=https://x", "option sns_url_prefix must be"),
            ("ses+api://A:s@default?sns_topic_arn=arn:x&sns_cert_pem=xyz", "option sns_cert_pem must be"),
            ("smtp://h:25?webhook_key=x", "unknown option \"webhook_key\""),
        ];
        for (dsn, want) in errors {
            let e = parse(dsn).expect_err(dsn).0;
            assert!(e.starts_with(want), "{dsn}: {e}");
            assert!(!e.contains("topsecret") && !e.contains("top!secret"), "{dsn}: {e}");
        }
    }
}
