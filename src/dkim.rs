//! DKIM (RFC 6376; Ed25519 from RFC 8463): the keys pg_email signs with, and the signing of a
//! built message. Pure Rust, no Postgres. `email.add_dkim_key` runs `import`/`generate` in the
//! caller's backend to turn a PEM (or a fresh key) into what is stored; the delivery worker
//! turns the stored rows into `Signers` once per configuration generation, and `sign` runs on
//! its main thread on each built message's bytes. It signs the bytes as they go out, not a
//! lettre `Message`: lettre's own signer does not see the Content-Type of a MIME message (it
//! lives in the body part), cannot add a second signature, and cannot sign submitted MIME.
//! `records` lists the DNS records a sending domain needs, for `email.domain_setup`.

use std::collections::HashMap;

use base64::Engine;
use rsa::pkcs1::{DecodeRsaPrivateKey, EncodeRsaPrivateKey, LineEnding};
use rsa::pkcs8::{DecodePrivateKey, EncodePublicKey, PrivateKeyInfo};
use rsa::traits::PublicKeyParts;
use rsa::RsaPrivateKey;

use crate::message::FieldError;

/// The signed header fields (DESIGN.md "DKIM"). Absent ones are signed as empty, so adding
/// one later (a second Cc, a List-Unsubscribe) breaks the signature, as it should.
const SIGNED: &[&str] = &[
    "From",
    "To",
    "Cc",
    "Subject",
    "Date",
    "Message-ID",
    "Reply-To",
    "MIME-Version",
    "Content-Type",
    "List-Unsubscribe",
    "List-Unsubscribe-Post",
];

/// SES rewrites Date and Message-ID of raw mail, so they are left out of its signatures.
const NOT_SIGNED_FOR_SES: &[&str] = &["Date", "Message-ID"];

/// The OID of Ed25519 keys (RFC 8410).
const ED25519_OID: &str = "1.3.101.112";

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Algorithm {
    Rsa,
    Ed25519,
}

impl Algorithm {
    pub fn parse(name: &str) -> Result<Algorithm, FieldError> {
        match name.trim().to_ascii_lowercase().as_str() {
            "rsa-sha256" => Ok(Algorithm::Rsa),
            "ed25519-sha256" => Ok(Algorithm::Ed25519),
            _ => Err(FieldError::new(
                "algorithm",
                format!("{} is not supported: use 'rsa-sha256' or 'ed25519-sha256'", crate::message::show(name)),
            )),
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Algorithm::Rsa => "rsa-sha256",
            Algorithm::Ed25519 => "ed25519-sha256",
        }
    }
}

/// A key as it is stored: the private half in the form `Signer` reads (a PKCS#1 PEM for RSA, the
/// base64 32-byte seed for Ed25519) and the TXT record value that publishes the public half.
pub struct Key {
    pub algorithm: Algorithm,
    pub private_key: String,
    pub dns_value: String,
}

impl std::fmt::Debug for Key {
    // The private key is never printed.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Key").field("algorithm", &self.algorithm).field("dns_value", &self.dns_value).finish()
    }
}

fn bad_key(why: &str) -> FieldError {
    FieldError::new("private_key", why)
}

/// Reads a private key given as PEM: RSA in PKCS#1 or PKCS#8 form, Ed25519 in PKCS#8 form.
/// Errors never quote the key.
pub fn import(pem: &str, algorithm: Algorithm) -> Result<Key, FieldError> {
    let pem = pem.trim();
    if !pem.starts_with("-----BEGIN ") {
        return Err(bad_key("is not PEM (expected -----BEGIN RSA PRIVATE KEY----- or -----BEGIN PRIVATE KEY-----)"));
    }
    let ed25519_seed = || -> Option<[u8; 32]> {
        let (label, der) = pem_rfc7468_decode(pem)?;
        if label != "PRIVATE KEY" {
            return None;
        }
        let info = PrivateKeyInfo::try_from(der.as_slice()).ok()?;
        if info.algorithm.oid.to_string() != ED25519_OID {
            return None;
        }
        // The private key is an OCTET STRING holding the 32-byte seed (04 20 <seed>).
        match info.private_key {
            [0x04, 0x20, seed @ ..] if seed.len() == 32 => seed.try_into().ok(),
            _ => None,
        }
    };
    match algorithm {
        Algorithm::Rsa => {
            let key = RsaPrivateKey::from_pkcs1_pem(pem).or_else(|_| RsaPrivateKey::from_pkcs8_pem(pem));
            let key = match key {
                Ok(k) => k,
                Err(_) if ed25519_seed().is_some() => {
                    return Err(bad_key("is an Ed25519 key: pass algorithm => 'ed25519-sha256'"))
                }
                Err(_) => return Err(bad_key("is not a readable RSA private key in PKCS#1 or PKCS#8 PEM form")),
            };
            rsa_key(key)
        }
        Algorithm::Ed25519 => match ed25519_seed() {
            Some(seed) => ed25519_key(&seed),
            None if RsaPrivateKey::from_pkcs1_pem(pem).is_ok() || RsaPrivateKey::from_pkcs8_pem(pem).is_ok() => {
                Err(bad_key("is an RSA key: pass algorithm => 'rsa-sha256'"))
            }
            None => Err(bad_key("is not a readable Ed25519 private key in PKCS#8 PEM form")),
        },
    }
}

/// A new key: RSA 2048 or Ed25519.
pub fn generate(algorithm: Algorithm) -> Result<Key, FieldError> {
    match algorithm {
        Algorithm::Rsa => {
            let key = RsaPrivateKey::new(&mut rsa::rand_core::OsRng, 2048)
                .map_err(|e| FieldError::new("private_key", format!("an RSA key could not be generated: {e}")))?;
            rsa_key(key)
        }
        Algorithm::Ed25519 => {
            let mut seed = [0u8; 32];
            ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut seed)
                .map_err(|_| FieldError::new("private_key", "the system random source failed"))?;
            ed25519_key(&seed)
        }
    }
}

fn rsa_key(key: RsaPrivateKey) -> Result<Key, FieldError> {
    let bits = key.size() * 8;
    if bits < 1024 {
        return Err(bad_key(&format!("is an RSA key of {bits} bits; DKIM needs at least 1024 (2048 recommended)")));
    }
    if bits > 8192 {
        return Err(bad_key(&format!("is an RSA key of {bits} bits; at most 8192 are accepted")));
    }
    key.validate().map_err(|_| bad_key("is not a consistent RSA key"))?;
    let public =
        key.to_public_key().to_public_key_der().map_err(|_| bad_key("has a public half that cannot be encoded"))?;
    let private = key.to_pkcs1_pem(LineEnding::LF).map_err(|_| bad_key("cannot be encoded as PKCS#1"))?.to_string();
    Ok(Key {
        algorithm: Algorithm::Rsa,
        private_key: private,
        dns_value: format!("v=DKIM1; k=rsa; p={}", b64(public.as_bytes())),
    })
}

fn ed25519_key(seed: &[u8; 32]) -> Result<Key, FieldError> {
    let pair = ring::signature::Ed25519KeyPair::from_seed_unchecked(seed)
        .map_err(|_| bad_key("is not a usable Ed25519 key"))?;
    let public = ring::signature::KeyPair::public_key(&pair);
    Ok(Key {
        algorithm: Algorithm::Ed25519,
        private_key: b64(seed),
        dns_value: format!("v=DKIM1; k=ed25519; p={}", b64(public.as_ref())),
    })
}

fn b64(bytes: &[u8]) -> String {
    base64::engine::general_purpose::STANDARD.encode(bytes)
}

/// The label and the decoded bytes of a single-block PEM.
fn pem_rfc7468_decode(pem: &str) -> Option<(String, Vec<u8>)> {
    let mut lines = pem.lines().map(str::trim).filter(|l| !l.is_empty());
    let label = lines.next()?.strip_prefix("-----BEGIN ")?.strip_suffix("-----")?.to_string();
    let end = format!("-----END {label}-----");
    let mut body = String::new();
    for line in lines.by_ref() {
        if line == end {
            return base64::engine::general_purpose::STANDARD.decode(body).ok().map(|der| (label, der));
        }
        body.push_str(line);
    }
    None
}

/// A sending domain as keys are stored under it: lower-case ASCII (IDN in punycode).
pub fn check_domain(domain: &str) -> Result<String, FieldError> {
    let bad = |why: &str| FieldError::new("domain", format!("{} {why}", crate::message::show(domain)));
    let ascii = idna::domain_to_ascii(domain.trim()).map_err(|_| bad("is not a domain name"))?;
    let ascii = ascii.trim_end_matches('.').to_string();
    if ascii.len() > 253 || !ascii.contains('.') {
        return Err(bad("is not a domain name (it needs at least two labels, like example.org)"));
    }
    for label in ascii.split('.') {
        let ok = !label.is_empty()
            && label.len() <= 63
            && !label.starts_with('-')
            && !label.ends_with('-')
            && label.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-');
        if !ok {
            return Err(bad("is not a domain name"));
        }
    }
    Ok(ascii)
}

/// A selector: one or more DNS labels (letters, digits, '-' and '_'), stored lower-cased.
pub fn check_selector(selector: &str) -> Result<String, FieldError> {
    let s = selector.trim().to_ascii_lowercase();
    let ok = !s.is_empty()
        && s.len() <= 63
        && s.split('.').all(|l| {
            !l.is_empty()
                && !l.starts_with('-')
                && l.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        });
    if ok {
        Ok(s)
    } else {
        Err(FieldError::new(
            "selector",
            format!(
                "{} is not a selector (DNS labels of letters, digits, '-' and '_')",
                crate::message::show(selector)
            ),
        ))
    }
}

/// A stored key as the worker reads it.
pub struct KeyRow {
    pub domain: String,
    pub selector: String,
    pub algorithm: String,
    pub private_key: String,
}

/// A private key ready to sign. ring signs RSA keys of 2048 bits and more (with blinding);
/// the `rsa` crate signs the 1024-bit keys ring refuses.
enum SigningKey {
    Ring(ring::signature::RsaKeyPair),
    Small(Box<RsaPrivateKey>),
    Ed25519(ring::signature::Ed25519KeyPair),
}

/// One key of one domain, ready to sign.
pub struct Signer {
    pub domain: String,
    pub selector: String,
    pub algorithm: Algorithm,
    key: SigningKey,
}

impl Signer {
    fn new(row: &KeyRow) -> Result<Signer, String> {
        let unreadable = || "the stored private key cannot be read".to_string();
        let algorithm = Algorithm::parse(&row.algorithm).map_err(|e| e.to_string())?;
        let key = match algorithm {
            Algorithm::Rsa => {
                let (_, der) = pem_rfc7468_decode(&row.private_key).ok_or_else(unreadable)?;
                match ring::signature::RsaKeyPair::from_der(&der) {
                    Ok(pair) => SigningKey::Ring(pair),
                    Err(_) => {
                        SigningKey::Small(Box::new(RsaPrivateKey::from_pkcs1_der(&der).map_err(|_| unreadable())?))
                    }
                }
            }
            Algorithm::Ed25519 => {
                let seed = base64::engine::general_purpose::STANDARD
                    .decode(row.private_key.trim())
                    .map_err(|_| unreadable())?;
                SigningKey::Ed25519(
                    ring::signature::Ed25519KeyPair::from_seed_unchecked(&seed).map_err(|_| unreadable())?,
                )
            }
        };
        Ok(Signer { domain: row.domain.to_ascii_lowercase(), selector: row.selector.clone(), algorithm, key })
    }

    /// The signature of `data` (the canonical header fields) as the algorithm defines it.
    fn signature(&self, data: &[u8]) -> Option<Vec<u8>> {
        match &self.key {
            SigningKey::Ring(pair) => {
                let mut out = vec![0u8; pair.public().modulus_len()];
                let rng = ring::rand::SystemRandom::new();
                pair.sign(&ring::signature::RSA_PKCS1_SHA256, &rng, data, &mut out).ok()?;
                Some(out)
            }
            SigningKey::Small(key) => {
                // PKCS#1 v1.5 over the DigestInfo of the SHA-256 hash (RFC 8017 section 9.2).
                const SHA256_PREFIX: [u8; 19] = [
                    0x30, 0x31, 0x30, 0x0d, 0x06, 0x09, 0x60, 0x86, 0x48, 0x01, 0x65, 0x03, 0x04, 0x02, 0x01, 0x05,
                    0x00, 0x04, 0x20,
                ];
                let mut info = SHA256_PREFIX.to_vec();
                info.extend_from_slice(ring::digest::digest(&ring::digest::SHA256, data).as_ref());
                key.sign(rsa::Pkcs1v15Sign::new_unprefixed(), &info).ok()
            }
            // RFC 8463: Ed25519 signs the SHA-256 hash of the data.
            SigningKey::Ed25519(pair) => {
                Some(pair.sign(ring::digest::digest(&ring::digest::SHA256, data).as_ref()).as_ref().to_vec())
            }
        }
    }
}

/// The keys of every domain: the newest of each algorithm, RSA first.
#[derive(Default)]
pub struct Signers {
    by_domain: HashMap<String, Vec<Signer>>,
}

impl Signers {
    /// `rows` oldest first: a later key of a domain and algorithm replaces an earlier one.
    /// Returns the keys that cannot be used, described without their contents.
    pub fn new(rows: &[KeyRow]) -> (Signers, Vec<String>) {
        let mut by_domain: HashMap<String, Vec<Signer>> = HashMap::new();
        let mut problems = Vec::new();
        for row in rows {
            match Signer::new(row) {
                Ok(s) => {
                    let list = by_domain.entry(s.domain.clone()).or_default();
                    list.retain(|old| old.algorithm != s.algorithm);
                    list.push(s);
                    list.sort_by_key(|s| s.algorithm == Algorithm::Ed25519);
                }
                Err(e) => problems.push(format!("DKIM key {} of {}: {e}", row.selector, row.domain)),
            }
        }
        (Signers { by_domain }, problems)
    }

    pub fn is_empty(&self) -> bool {
        self.by_domain.is_empty()
    }

    /// The keys for mail from `address`: its domain's, else its closest parent domain's.
    pub fn for_address(&self, address: &str) -> &[Signer] {
        let Some((_, domain)) = address.rsplit_once('@') else { return &[] };
        let mut domain = domain.trim_end_matches('.').to_ascii_lowercase();
        loop {
            if let Some(found) = self.by_domain.get(&domain) {
                return found;
            }
            match domain.split_once('.') {
                Some((_, parent)) if parent.contains('.') => domain = parent.to_string(),
                _ => return &[],
            }
        }
    }
}

/// `raw` (a whole message, CRLF line ends) with one DKIM-Signature field per signer in front,
/// signed relaxed/relaxed as at `now` (seconds since the epoch). `ses` leaves Date and
/// Message-ID out of the signed fields. The message's bytes themselves are not changed, so
/// nothing can re-fold what was signed.
pub fn sign(raw: Vec<u8>, signers: &[Signer], ses: bool, now: u64) -> Vec<u8> {
    if signers.is_empty() {
        return raw;
    }
    let (head, body) = split_message(&raw);
    let body_hash = b64(ring::digest::digest(&ring::digest::SHA256, &relaxed_body(body)).as_ref());
    let names: Vec<&str> = SIGNED.iter().copied().filter(|h| !ses || !NOT_SIGNED_FOR_SES.contains(h)).collect();
    let fields = header_fields(head);
    let mut signed = Vec::new();
    for name in &names {
        // Each name is signed once: its last occurrence (RFC 6376 section 5.4.2).
        if let Some((n, v)) = fields.iter().rev().find(|(n, _)| n.eq_ignore_ascii_case(name)) {
            signed.extend_from_slice(relaxed_header(n, v).as_bytes());
            signed.extend_from_slice(b"\r\n");
        }
    }
    let list = names.iter().map(|n| n.to_ascii_lowercase()).collect::<Vec<_>>().join(":");
    let mut out = Vec::with_capacity(raw.len() + 600 * signers.len());
    for s in signers {
        let value = format!(
            "v=1; a={}; c=relaxed/relaxed; d={}; s={};\r\n\tt={now}; h={list};\r\n\tbh={body_hash};\r\n\tb=",
            s.algorithm.as_str(),
            s.domain,
            s.selector
        );
        let mut data = signed.clone();
        data.extend_from_slice(relaxed_header("DKIM-Signature", &value).as_bytes());
        let Some(signature) = s.signature(&data) else { continue };
        out.extend_from_slice(b"DKIM-Signature: ");
        out.extend_from_slice(value.as_bytes());
        let b = b64(&signature);
        for (i, chunk) in b.as_bytes().chunks(72).enumerate() {
            if i > 0 {
                out.extend_from_slice(b"\r\n\t ");
            }
            out.extend_from_slice(chunk);
        }
        out.extend_from_slice(b"\r\n");
    }
    out.extend_from_slice(&raw);
    out
}

/// The header block (with its last CRLF) and the body of a message.
fn split_message(raw: &[u8]) -> (&[u8], &[u8]) {
    match raw.windows(4).position(|w| w == b"\r\n\r\n") {
        Some(i) => (&raw[..i + 2], &raw[i + 4..]),
        None => (raw, &[]),
    }
}

/// The header fields of a header block: (name, value with its folding).
fn header_fields(head: &[u8]) -> Vec<(String, String)> {
    let text = String::from_utf8_lossy(head);
    let mut fields: Vec<(String, String)> = Vec::new();
    for line in text.split("\r\n") {
        if line.starts_with(' ') || line.starts_with('\t') {
            if let Some((_, v)) = fields.last_mut() {
                v.push_str("\r\n");
                v.push_str(line);
            }
        } else if let Some((n, v)) = line.split_once(':') {
            fields.push((n.to_string(), v.to_string()));
        }
    }
    fields
}

/// Relaxed header canonicalization (RFC 6376 section 3.4.2), without the final CRLF.
fn relaxed_header(name: &str, value: &str) -> String {
    let unfolded = value.replace("\r\n", "");
    let mut v = String::with_capacity(unfolded.len());
    let mut space = false;
    for c in unfolded.chars() {
        if c == ' ' || c == '\t' {
            space = true;
        } else {
            if space && !v.is_empty() {
                v.push(' ');
            }
            space = false;
            v.push(c);
        }
    }
    format!("{}:{v}", name.trim_end_matches([' ', '\t']).to_ascii_lowercase())
}

/// Relaxed body canonicalization (RFC 6376 section 3.4.4).
fn relaxed_body(body: &[u8]) -> Vec<u8> {
    let mut lines: Vec<Vec<u8>> = Vec::new();
    let mut rest = body;
    loop {
        let (line, next) = match rest.windows(2).position(|w| w == b"\r\n") {
            Some(i) => (&rest[..i], Some(&rest[i + 2..])),
            None => (rest, None),
        };
        let mut out = Vec::with_capacity(line.len());
        let mut space = false;
        for &b in line {
            if b == b' ' || b == b'\t' {
                space = true;
            } else {
                if space {
                    out.push(b' ');
                }
                space = false;
                out.push(b);
            }
        }
        lines.push(out);
        match next {
            Some(n) => rest = n,
            None => break,
        }
    }
    while lines.last().is_some_and(Vec::is_empty) {
        lines.pop();
    }
    let mut out = Vec::with_capacity(body.len());
    for l in lines {
        out.extend_from_slice(&l);
        out.extend_from_slice(b"\r\n");
    }
    out
}

/// One DNS record to publish.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Record {
    pub record_type: &'static str,
    pub name: String,
    pub value: String,
    pub purpose: String,
}

/// What sends mail for a domain, as `records` needs it: a transport's kind and its DSN (masked).
pub struct Sender<'a> {
    pub kind: &'a str,
    pub dsn: &'a str,
}

/// The SPF mechanism that authorises a transport's sending hosts, when it is known: the SMTP
/// relay's host, a provider's published include.
fn spf_mechanism(s: &Sender) -> Option<String> {
    match s.kind {
        "smtp" => {
            let host = url::Url::parse(s.dsn).ok()?.host()?.to_owned();
            Some(match host {
                url::Host::Ipv4(ip) => format!("ip4:{ip}"),
                url::Host::Ipv6(ip) => format!("ip6:{ip}"),
                url::Host::Domain(d) if d == "localhost" => return None,
                // A DSN's scheme is not special to the URL parser, so an address comes as text.
                url::Host::Domain(d) => match d.trim_matches(['[', ']']).parse::<std::net::IpAddr>() {
                    Ok(std::net::IpAddr::V4(ip)) => format!("ip4:{ip}"),
                    Ok(std::net::IpAddr::V6(ip)) => format!("ip6:{ip}"),
                    Err(_) => format!("a:{d}"),
                },
            })
        }
        "sendgrid" => Some("include:sendgrid.net".into()),
        "postmark" => Some("include:spf.mtasv.net".into()),
        "mailgun" => Some("include:mailgun.org".into()),
        "ses" | "resend" => Some("include:amazonses.com".into()),
        _ => None,
    }
}

/// The DNS records for sending from `domain`: a DKIM TXT per key (`(selector, dns_value)`), an
/// SPF hint, a DMARC starter record, and for a `bounce_domain` under `domain` its MX (to
/// `mx_host`, the host that receives mail for the listener) and SPF.
pub fn records(
    domain: &str,
    keys: &[(String, String)],
    senders: &[Sender],
    bounce_domain: Option<&str>,
    mx_host: Option<&str>,
) -> Vec<Record> {
    let mut out = Vec::new();
    for (selector, value) in keys {
        out.push(Record {
            record_type: "TXT",
            name: format!("{selector}._domainkey.{domain}"),
            value: value.clone(),
            purpose: "DKIM: the public key receivers check pg_email's signatures with".into(),
        });
    }
    let mut mechanisms: Vec<String> = Vec::new();
    for s in senders {
        if let Some(m) = spf_mechanism(s) {
            if !mechanisms.contains(&m) {
                mechanisms.push(m);
            }
        }
    }
    let spf = |mechanisms: &[String]| {
        let mut v = String::from("v=spf1");
        for m in mechanisms {
            v.push(' ');
            v.push_str(m);
        }
        v.push_str(" ~all");
        v
    };
    out.push(Record {
        record_type: "TXT",
        name: domain.to_string(),
        value: spf(&mechanisms),
        purpose: "SPF (a hint): the hosts of this database's transports that may send as this domain; \
                  merge it with an SPF record the domain already has (only one may exist)"
            .into(),
    });
    out.push(Record {
        record_type: "TXT",
        name: format!("_dmarc.{domain}"),
        value: format!("v=DMARC1; p=none; adkim=r; aspf=r; rua=mailto:dmarc-reports@{domain}"),
        purpose: "DMARC (a starter): monitor only; the rua mailbox gets daily reports; raise p= to quarantine \
                  or reject once every sender is aligned"
            .into(),
    });
    let under = |b: &str| b.len() > domain.len() && b.ends_with(domain) && b[..b.len() - domain.len()].ends_with('.');
    if let Some(bounce) = bounce_domain.map(|b| b.trim_end_matches('.').to_ascii_lowercase()).filter(|b| under(b)) {
        if let Some(host) = mx_host {
            out.push(Record {
                record_type: "MX",
                name: bounce.clone(),
                value: format!("10 {host}."),
                purpose: "Bounces and List-Unsubscribe mail (pg_email.bounce_domain) reach the MTA that hands \
                          them to pg_email.inbound_address"
                    .into(),
            });
        }
        let smtp: Vec<String> = senders
            .iter()
            .filter(|s| s.kind == "smtp" || s.kind == "file" || s.kind == "capture")
            .filter_map(spf_mechanism)
            .collect();
        out.push(Record {
            record_type: "TXT",
            name: bounce,
            value: spf(&smtp),
            purpose: "SPF for the VERP return path (bounce+...@bounce_domain) of SMTP mail".into(),
        });
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    // A 1024-bit test key (PKCS#1), only for these tests.
    fn rsa_pem(bits: usize) -> String {
        let key = RsaPrivateKey::new(&mut rsa::rand_core::OsRng, bits).unwrap();
        key.to_pkcs1_pem(LineEnding::LF).unwrap().to_string()
    }

    fn message(from: &str) -> lettre::Message {
        lettre::Message::builder()
            .from(from.parse().unwrap())
            .to("b@y.org".parse().unwrap())
            .subject("Hello")
            .body("Hi there\r\n".to_string())
            .unwrap()
    }

    fn fields(raw: &[u8], name: &str) -> Vec<String> {
        let text = String::from_utf8_lossy(raw);
        let head = text.split("\r\n\r\n").next().unwrap_or_default().replace("\r\n ", " ").replace("\r\n\t", " ");
        head.lines()
            .filter_map(|l| l.split_once(':'))
            .filter(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.trim().to_string())
            .collect()
    }

    #[test]
    fn relaxed_canonicalization() {
        // RFC 6376 section 3.4.5.
        let head = b"A: X\r\nB : Y\t\r\n\tZ  \r\n";
        let got: Vec<String> = header_fields(head).iter().map(|(n, v)| relaxed_header(n, v)).collect();
        assert_eq!(got, ["a:X", "b:Y Z"]);
        assert_eq!(relaxed_body(b" C \r\nD \t E\r\n\r\n\r\n"), b" C\r\nD E\r\n");
        assert_eq!(relaxed_body(b""), b"");
        assert_eq!(relaxed_body(b"x"), b"x\r\n");
        let (h, b) = split_message(b"A: 1\r\n\r\nbody\r\n");
        assert_eq!((h, b), (&b"A: 1\r\n"[..], &b"body\r\n"[..]));
    }

    #[test]
    fn dns_records() {
        let keys = vec![("s1".to_string(), "v=DKIM1; k=rsa; p=AB".to_string())];
        let senders = [
            Sender { kind: "smtp", dsn: "smtp://u:***@smtp.example.net:587" },
            Sender { kind: "smtp", dsn: "smtps://192.0.2.7" },
            Sender { kind: "sendgrid", dsn: "sendgrid+api://***@default" },
            Sender { kind: "capture", dsn: "capture://" },
            Sender { kind: "smtp", dsn: "smtp://localhost:25" },
            Sender { kind: "smtp", dsn: "smtp://[2001:db8::1]:25" },
        ];
        let r = records("example.org", &keys, &senders, Some("bounce.example.org"), Some("mail.example.org"));
        let find = |t: &str, n: &str| r.iter().find(|x| x.record_type == t && x.name == n).map(|x| x.value.as_str());
        assert_eq!(find("TXT", "s1._domainkey.example.org"), Some("v=DKIM1; k=rsa; p=AB"));
        assert_eq!(
            find("TXT", "example.org"),
            Some("v=spf1 a:smtp.example.net ip4:192.0.2.7 include:sendgrid.net ip6:2001:db8::1 ~all")
        );
        assert!(find("TXT", "_dmarc.example.org").unwrap().starts_with("v=DMARC1; p=none"));
        assert_eq!(find("MX", "bounce.example.org"), Some("10 mail.example.org."));
        assert_eq!(
            find("TXT", "bounce.example.org"),
            Some("v=spf1 a:smtp.example.net ip4:192.0.2.7 ip6:2001:db8::1 ~all")
        );
        // A bounce domain elsewhere is not this domain's business.
        let other = records("example.org", &[], &[], Some("bounces.example.com"), Some("mx.example.com"));
        assert_eq!(other.len(), 2);
        assert!(records("ample.org", &[], &[], Some("bounce.example.org"), Some("x"))
            .iter()
            .all(|x| x.record_type != "MX"));
    }

    #[test]
    fn algorithms_and_names() {
        assert_eq!(Algorithm::parse("RSA-SHA256").unwrap(), Algorithm::Rsa);
        assert_eq!(Algorithm::parse("ed25519-sha256").unwrap(), Algorithm::Ed25519);
        let e = Algorithm::parse("rsa-sha1").unwrap_err().to_string();
        assert!(e.starts_with("invalid algorithm:"), "{e}");
        assert_eq!(check_domain("Example.ORG").unwrap(), "example.org");
        assert_eq!(check_domain("bücher.de").unwrap(), "xn--bcher-kva.de");
        for bad in ["", "org", "exa mple.org", "-a.org", "a..org", "a_b.org"] {
            assert!(check_domain(bad).unwrap_err().to_string().starts_with("invalid domain:"), "{bad}");
        }
        assert_eq!(check_selector("S2026").unwrap(), "s2026");
        assert_eq!(check_selector("mail_1.k").unwrap(), "mail_1.k");
        for bad in ["", "a b", "a..b", "-x", "x;y"] {
            assert!(check_selector(bad).unwrap_err().to_string().starts_with("invalid selector:"), "{bad}");
        }
    }

    #[test]
    fn bad_keys_are_refused_without_quoting_them() {
        let pem = rsa_pem(1024);
        let cut: String = pem.lines().filter(|l| !l.starts_with("MI")).collect::<Vec<_>>().join("\n");
        for bad in [cut.as_str(), "not a key", "-----BEGIN RSA PRIVATE KEY-----\nAAAA\n-----END RSA PRIVATE KEY-----"] {
            let e = import(bad, Algorithm::Rsa).unwrap_err().to_string();
            assert!(e.starts_with("invalid private_key:"), "{e}");
            for line in bad.lines().filter(|l| l.len() > 8 && !l.starts_with("-----")) {
                assert!(!e.contains(line), "{e}");
            }
        }
        let small = rsa_pem(512);
        assert!(import(&small, Algorithm::Rsa).unwrap_err().to_string().contains("512 bits"));
        // The wrong algorithm for a readable key says which one it is.
        assert!(import(&pem, Algorithm::Ed25519).unwrap_err().to_string().contains("RSA key"));
    }

    #[test]
    fn pkcs8_and_pkcs1_give_the_same_stored_key() {
        let key = RsaPrivateKey::new(&mut rsa::rand_core::OsRng, 1024).unwrap();
        let pkcs1 = import(&key.to_pkcs1_pem(LineEnding::LF).unwrap(), Algorithm::Rsa).unwrap();
        let pkcs8 =
            import(&rsa::pkcs8::EncodePrivateKey::to_pkcs8_pem(&key, LineEnding::CRLF).unwrap(), Algorithm::Rsa)
                .unwrap();
        assert_eq!(pkcs1.private_key, pkcs8.private_key);
        assert_eq!(pkcs1.dns_value, pkcs8.dns_value);
        assert!(pkcs1.dns_value.starts_with("v=DKIM1; k=rsa; p=MI"), "{}", pkcs1.dns_value);
        assert!(!format!("{pkcs1:?}").contains("PRIVATE"));
    }

    #[test]
    fn ed25519_pkcs8_is_read() {
        // RFC 8410 section 10.3's example key.
        let pem = "-----BEGIN PRIVATE KEY-----\nMC4CAQAwBQYDK2VwBCIEINTuctv5E1hK1bbY8fdp+K06/nwoy/HU++CXqI9EdVhC\n-----END PRIVATE KEY-----\n";
        let k = import(pem, Algorithm::Ed25519).unwrap();
        assert_eq!(k.dns_value, "v=DKIM1; k=ed25519; p=Gb9ECWmEzf6FQbrBZ9w7lshQhqowtrbLDFw4rXAxZuE=");
        assert!(import(pem, Algorithm::Rsa).unwrap_err().to_string().contains("Ed25519 key"));
        let fresh = generate(Algorithm::Ed25519).unwrap();
        assert_eq!(base64::engine::general_purpose::STANDARD.decode(&fresh.private_key).unwrap().len(), 32);
    }

    #[test]
    fn closest_domain_and_both_signatures() {
        let rows = vec![
            KeyRow {
                domain: "example.org".into(),
                selector: "old".into(),
                algorithm: "rsa-sha256".into(),
                private_key: rsa_pem(1024),
            },
            KeyRow {
                domain: "example.org".into(),
                selector: "ed".into(),
                algorithm: "ed25519-sha256".into(),
                private_key: generate(Algorithm::Ed25519).unwrap().private_key,
            },
            KeyRow {
                domain: "example.org".into(),
                selector: "new".into(),
                algorithm: "rsa-sha256".into(),
                private_key: rsa_pem(1024),
            },
            KeyRow {
                domain: "bad.org".into(),
                selector: "x".into(),
                algorithm: "rsa-sha256".into(),
                private_key: "junk".into(),
            },
        ];
        let (signers, problems) = Signers::new(&rows);
        assert_eq!(problems.len(), 1);
        assert!(!problems[0].contains("junk"));
        let found = signers.for_address("a@News.Example.org");
        assert_eq!(found.iter().map(|s| s.selector.as_str()).collect::<Vec<_>>(), ["new", "ed"]);
        assert!(signers.for_address("a@example.com").is_empty());
        assert!(signers.for_address("a@org").is_empty());

        let raw = sign(message("a@news.example.org").formatted(), found, false, 1);
        let sigs = fields(&raw, "DKIM-Signature");
        assert_eq!(sigs.len(), 2, "{}", String::from_utf8_lossy(&raw));
        assert!(sigs[0].contains("a=rsa-sha256") && sigs[0].contains("s=new") && sigs[0].contains("d=example.org"));
        assert!(sigs[1].contains("a=ed25519-sha256") && sigs[1].contains("c=relaxed/relaxed"));
        assert!(sigs[1].contains("h=from:to:cc:subject:date:message-id:reply-to:mime-version:content-type:list-unsubscribe:list-unsubscribe-post"));
        let ses = sign(message("a@example.org").formatted(), found, true, 1);
        for s in fields(&ses, "DKIM-Signature") {
            assert!(s.contains("h=from:to:cc:subject:reply-to:mime-version:content-type:"), "{s}");
        }
        let plain = sign(message("a@example.com").formatted(), &[], false, 1);
        assert!(fields(&plain, "DKIM-Signature").is_empty());
    }
}
