//! Open and click tracking and unsubscribe links: signed tokens, the HTML rewriter, machine
//! detection, the pixel and the unsubscribe page. No pgrx here: the delivery worker rewrites
//! messages with it when it builds them, and the listener checks tokens with it.
//!
//! A token is `<b64url(payload)>.<b64url(mac)>` (no padding, so only `A-Z a-z 0-9 - _ .`): the
//! payload is `version, kind, kid (i32 BE), message_id (i64 BE), flags, url bytes`, and the mac
//! the first 16 bytes of HMAC-SHA256 under key `kid` over a fixed context string followed by the
//! payload. Verifying needs no database: the listener answers a click from the token alone, and
//! nobody without the key can mint a token for a URL of their choosing (no open redirect).

use std::borrow::Cow;
use std::cell::Cell;
use std::collections::BTreeMap;
use std::fmt;
use std::rc::Rc;

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine as _;
use lol_html::html_content::{ContentType, Element, EndTag};
use lol_html::{element, end, rewrite_str, RewriteStrSettings};
use ring::hmac;

/// What a token stands for; also its route on the listener (`/o/`, `/c/`, `/u/`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Open,
    Click,
    Unsubscribe,
}

impl Kind {
    /// The listener's path segment for this kind: `o`, `c` or `u`.
    pub fn route(self) -> &'static str {
        match self {
            Kind::Open => "o",
            Kind::Click => "c",
            Kind::Unsubscribe => "u",
        }
    }

    fn byte(self) -> u8 {
        match self {
            Kind::Open => b'o',
            Kind::Click => b'c',
            Kind::Unsubscribe => b'u',
        }
    }

    fn from_byte(b: u8) -> Option<Kind> {
        match b {
            b'o' => Some(Kind::Open),
            b'c' => Some(Kind::Click),
            b'u' => Some(Kind::Unsubscribe),
            _ => None,
        }
    }
}

/// What a token says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Claims {
    pub kind: Kind,
    pub message_id: i64,
    /// The message has exactly one recipient in To, Cc and Bcc together, so the token identifies
    /// that recipient.
    pub single: bool,
    /// Clicks only (and then required): the destination, exactly as decoded from the HTML.
    pub url: Option<String>,
}

/// Token layout version (first payload byte).
const VERSION: u8 = 1;
/// Bytes of the HMAC-SHA256 tag kept in the token.
const MAC_LEN: usize = 16;
/// Domain separation: these keys may sign other things one day (VERP addresses, say).
const MAC_CONTEXT: &[u8] = b"pg_email tracking token v1\0";
/// version, kind, kid, message_id, flags.
const HEADER_LEN: usize = 1 + 1 + 4 + 8 + 1;
const FLAG_SINGLE: u8 = 1;
/// Longer tokens are refused before any decoding (a cheap guard for the listener).
const MAX_TOKEN_LEN: usize = 16 * 1024;

/// The tracking keys: `(kid, secret)` pairs, the highest kid signs, every kid verifies (so tokens
/// in mail already sent stay valid after `email.rotate_tracking_key()`).
#[derive(Clone, Default)]
pub struct Keys {
    keys: BTreeMap<i32, hmac::Key>,
    /// The key that signs: the last pair given (email.tracking_keys is read oldest first).
    current: Option<i32>,
}

impl Keys {
    /// Keys from `(kid, secret)` pairs, oldest first: the last one signs. Empty secrets are
    /// ignored; of two pairs with the same kid the later wins.
    pub fn new(pairs: Vec<(i32, Vec<u8>)>) -> Keys {
        let pairs: Vec<(i32, Vec<u8>)> = pairs.into_iter().filter(|(_, secret)| !secret.is_empty()).collect();
        let current = pairs.last().map(|(kid, _)| *kid);
        let keys = pairs.into_iter().map(|(kid, secret)| (kid, hmac::Key::new(hmac::HMAC_SHA256, &secret))).collect();
        Keys { keys, current }
    }

    /// The kid that signs new tokens, if there is any key.
    pub fn current_kid(&self) -> Option<i32> {
        self.current
    }

    pub fn is_empty(&self) -> bool {
        self.keys.is_empty()
    }

    /// A token for `claims` under the current key. `None` when there is no key, or when the claims
    /// are inconsistent: a click needs a non-empty `url`, opens and unsubscribes must have none.
    pub fn sign(&self, claims: &Claims) -> Option<String> {
        let kid = self.current?;
        let url = match (claims.kind, &claims.url) {
            (Kind::Click, Some(url)) if !url.is_empty() => url.as_bytes(),
            (Kind::Open | Kind::Unsubscribe, None) => &[],
            _ => return None,
        };
        let mut payload = Vec::with_capacity(HEADER_LEN + url.len());
        payload.push(VERSION);
        payload.push(claims.kind.byte());
        payload.extend_from_slice(&kid.to_be_bytes());
        payload.extend_from_slice(&claims.message_id.to_be_bytes());
        payload.push(if claims.single { FLAG_SINGLE } else { 0 });
        payload.extend_from_slice(url);
        self.seal(kid, &payload)
    }

    /// The claims of a token signed by any known key; `None` for anything else (a changed
    /// character, an unknown kid, a malformed or non-canonical encoding, an unknown version, kind
    /// or flag, a url where none belongs).
    pub fn verify(&self, token: &str) -> Option<Claims> {
        if token.len() > MAX_TOKEN_LEN {
            return None;
        }
        let (payload_b64, mac_b64) = token.split_once('.')?;
        let payload = decode_canonical(payload_b64)?;
        let mac = decode_canonical(mac_b64)?;
        if mac.len() != MAC_LEN || payload.len() < HEADER_LEN || payload[0] != VERSION {
            return None;
        }
        let kid = i32::from_be_bytes(payload[2..6].try_into().ok()?);
        let key = self.keys.get(&kid)?;
        let expected = mac_of(key, &payload);
        // Constant time: compare the HMACs of both tags rather than the tags themselves.
        hmac::verify(key, &expected, hmac::sign(key, &mac).as_ref()).ok()?;

        let kind = Kind::from_byte(payload[1])?;
        let message_id = i64::from_be_bytes(payload[6..14].try_into().ok()?);
        let flags = payload[14];
        if flags & !FLAG_SINGLE != 0 {
            return None;
        }
        let rest = &payload[HEADER_LEN..];
        let url = match kind {
            Kind::Click if !rest.is_empty() => Some(String::from_utf8(rest.to_vec()).ok()?),
            Kind::Open | Kind::Unsubscribe if rest.is_empty() => None,
            _ => return None,
        };
        Some(Claims { kind, message_id, single: flags & FLAG_SINGLE != 0, url })
    }

    /// [`Keys::verify`], and the token must be of `kind` (the route it came in on).
    pub fn verify_kind(&self, token: &str, kind: Kind) -> Option<Claims> {
        self.verify(token).filter(|c| c.kind == kind)
    }

    fn seal(&self, kid: i32, payload: &[u8]) -> Option<String> {
        let key = self.keys.get(&kid)?;
        let mac = mac_of(key, payload);
        Some(format!("{}.{}", URL_SAFE_NO_PAD.encode(payload), URL_SAFE_NO_PAD.encode(mac)))
    }
}

/// What a return-path (VERP) or List-Unsubscribe mailto address names: mail to
/// `bounce+<token>@<bounce_domain>` reports on `message_id`, mail to `unsubscribe+<token>@...`
/// unsubscribes its recipient.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Return {
    pub unsubscribe: bool,
    pub message_id: i64,
    /// The recipient's position when the message has exactly one (0); None for a message with
    /// several recipients, whose reports name the recipient themselves.
    pub recipient: Option<u16>,
}

/// Return tokens are local parts: at most 64 characters with the `bounce+` prefix, and of one
/// letter case (some systems fold the case of a return path), so lower-case base32 with a
/// shorter MAC: 16 payload bytes and 10 MAC bytes make 42 characters.
const RETURN_VERSION: u8 = 1;
const RETURN_PAYLOAD: usize = 16;
const RETURN_MAC: usize = 10;
const RETURN_CONTEXT: &[u8] = b"pg_email return token v1\0";

impl Keys {
    /// The token of a return-path or unsubscribe address, under the current key.
    pub fn return_token(&self, r: &Return) -> Option<String> {
        let kid = self.current?;
        let key = self.keys.get(&kid)?;
        let mut bytes = Vec::with_capacity(RETURN_PAYLOAD + RETURN_MAC);
        bytes.push(RETURN_VERSION);
        bytes.push(if r.unsubscribe { b'u' } else { b'b' });
        bytes.extend_from_slice(&kid.to_be_bytes());
        bytes.extend_from_slice(&r.message_id.to_be_bytes());
        bytes.extend_from_slice(&r.recipient.unwrap_or(u16::MAX).to_be_bytes());
        let mac = return_mac(key, &bytes);
        bytes.extend_from_slice(&mac);
        Some(base32::encode(&bytes))
    }

    /// What a return token names; None for anything not signed by a known key (any letter case
    /// is accepted).
    pub fn verify_return(&self, token: &str) -> Option<Return> {
        let bytes = base32::decode(&token.to_ascii_lowercase())?;
        if bytes.len() != RETURN_PAYLOAD + RETURN_MAC || bytes[0] != RETURN_VERSION {
            return None;
        }
        let (payload, mac) = bytes.split_at(RETURN_PAYLOAD);
        let kid = i32::from_be_bytes(payload[2..6].try_into().ok()?);
        let key = self.keys.get(&kid)?;
        let expected = return_mac(key, payload);
        // Constant time: compare the HMACs of both tags rather than the tags themselves.
        hmac::verify(key, &expected, hmac::sign(key, mac).as_ref()).ok()?;
        let unsubscribe = match payload[1] {
            b'u' => true,
            b'b' => false,
            _ => return None,
        };
        let message_id = i64::from_be_bytes(payload[6..14].try_into().ok()?);
        let recipient = u16::from_be_bytes(payload[14..16].try_into().ok()?);
        Some(Return { unsubscribe, message_id, recipient: (recipient != u16::MAX).then_some(recipient) })
    }
}

fn return_mac(key: &hmac::Key, payload: &[u8]) -> [u8; RETURN_MAC] {
    let mut ctx = hmac::Context::with_key(key);
    ctx.update(RETURN_CONTEXT);
    ctx.update(payload);
    let tag = ctx.sign();
    let mut out = [0u8; RETURN_MAC];
    out.copy_from_slice(&tag.as_ref()[..RETURN_MAC]);
    out
}

/// Lower-case RFC 4648 base32 without padding; decoding accepts only the canonical form.
mod base32 {
    const ALPHABET: &[u8; 32] = b"abcdefghijklmnopqrstuvwxyz234567";

    pub fn encode(bytes: &[u8]) -> String {
        let mut out = String::with_capacity(bytes.len().div_ceil(5) * 8);
        let (mut acc, mut bits) = (0u32, 0u32);
        for &b in bytes {
            acc = (acc << 8) | u32::from(b);
            bits += 8;
            while bits >= 5 {
                bits -= 5;
                out.push(ALPHABET[((acc >> bits) & 31) as usize] as char);
            }
        }
        if bits > 0 {
            out.push(ALPHABET[((acc << (5 - bits)) & 31) as usize] as char);
        }
        out
    }

    pub fn decode(s: &str) -> Option<Vec<u8>> {
        let mut out = Vec::with_capacity(s.len() * 5 / 8);
        let (mut acc, mut bits) = (0u32, 0u32);
        for c in s.bytes() {
            let v = ALPHABET.iter().position(|&a| a == c)? as u32;
            acc = ((acc << 5) | v) & 0xffff;
            bits += 5;
            if bits >= 8 {
                bits -= 8;
                out.push(((acc >> bits) & 0xff) as u8);
            }
        }
        // Leftover bits must be zero and fewer than 5: one encoding per byte string.
        (bits < 5 && acc & ((1 << bits) - 1) == 0).then_some(out)
    }
}

impl fmt::Debug for Keys {
    /// Kids only: secrets never reach a log.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Keys").field("kids", &self.keys.keys().collect::<Vec<_>>()).finish()
    }
}

fn mac_of(key: &hmac::Key, payload: &[u8]) -> [u8; MAC_LEN] {
    let mut ctx = hmac::Context::with_key(key);
    ctx.update(MAC_CONTEXT);
    ctx.update(payload);
    let tag = ctx.sign();
    let mut out = [0u8; MAC_LEN];
    out.copy_from_slice(&tag.as_ref()[..MAC_LEN]);
    out
}

/// Base64url without padding, accepted only in its one canonical spelling, so that no two
/// strings verify as the same token.
fn decode_canonical(s: &str) -> Option<Vec<u8>> {
    let bytes = URL_SAFE_NO_PAD.decode(s).ok()?;
    (URL_SAFE_NO_PAD.encode(&bytes) == s).then_some(bytes)
}

/// `public_url/<route>/<token>`: the link the listener answers for `kind`.
pub fn link(public_url: &str, kind: Kind, token: &str) -> String {
    format!("{}/{}/{}", public_url.trim_end_matches('/'), kind.route(), token)
}

/// The `Location` for a click's destination: the URL parsed and serialized as ASCII (non-ASCII
/// percent-encoded, IDN hosts in punycode), as a browser would have requested it. `None` unless it
/// is an absolute http(s) URL.
pub fn redirect_location(url: &str) -> Option<String> {
    let parsed = url::Url::parse(url).ok()?;
    matches!(parsed.scheme(), "http" | "https").then(|| parsed.to_string())
}

// ------------------------------------------------------------------------------------------
// HTML rewriting

/// The click-tracking callback of [`rewrite_html`]: the destination in, the tracked URL out (or
/// `None` to leave the link as it is).
pub type ClickTracker<'a> = &'a dyn Fn(&str) -> Option<String>;

/// The attribute that keeps an `<a>` out of click tracking; it is removed from the output.
pub const NOTRACK_ATTRIBUTE: &str = "data-pg-email-notrack";

/// Rewrites the HTML part of a message, with lol_html (a streaming tokenizer: everything not
/// rewritten comes out byte for byte; a start tag that changed is written anew, its attributes
/// separated by single spaces).
///
/// - `track_clicks`: called with the href of every `<a>` whose href, HTML-decoded and trimmed as
///   a browser does, is an absolute http(s) URL; the href becomes what it returns (escaped), or
///   stays as it was when it returns `None` (the caller's own unsubscribe link, say). `<a>`
///   elements with [`NOTRACK_ATTRIBUTE`] are left alone (the attribute is always removed).
/// - `pixel_url`: a 1×1 `<img>` appended at the end of `<body>` (before the first `</body>`), or
///   at the end of the document when there is no `</body>`.
///
/// Malformed HTML is rewritten as well as it can be (lol_html's non-strict mode); `Err` only
/// when lol_html gives up.
pub fn rewrite_html(
    html: &str,
    track_clicks: Option<ClickTracker<'_>>,
    pixel_url: Option<&str>,
) -> Result<String, String> {
    let mut settings = RewriteStrSettings::new()
        .with_strict(false)
        .with_enable_esi_tags(false)
        .append_element_content_handler(element!("a", move |el: &mut Element| {
            if el.has_attribute(NOTRACK_ATTRIBUTE) {
                el.remove_attribute(NOTRACK_ATTRIBUTE);
                return Ok(());
            }
            let (Some(track), Some(raw)) = (track_clicks, el.get_attribute("href")) else {
                return Ok(());
            };
            let decoded = decode_html_attribute(&raw);
            let target = trim_url(&decoded);
            if !is_absolute_http(target) {
                return Ok(());
            }
            if let Some(new) = track(target) {
                el.set_attribute("href", &escape_html(&new))?;
            }
            Ok(())
        }));

    if let Some(pixel_url) = pixel_url {
        let pixel: Rc<str> = format!(
            r#"<img src="{}" width="1" height="1" alt="" style="display:block;width:1px;height:1px;border:0">"#,
            escape_html(pixel_url)
        )
        .into();
        let placed = Rc::new(Cell::new(false));
        let (body_pixel, body_placed) = (Rc::clone(&pixel), Rc::clone(&placed));
        settings = settings
            .append_element_content_handler(element!("body", move |el: &mut Element| {
                // The end tag handler runs only if `</body>` is really there; otherwise the
                // document end handler places the pixel.
                if let Some(handlers) = el.end_tag_handlers() {
                    let (pixel, placed) = (Rc::clone(&body_pixel), Rc::clone(&body_placed));
                    handlers.push(Box::new(move |end: &mut EndTag| {
                        if !placed.replace(true) {
                            end.before(&pixel, ContentType::Html);
                        }
                        Ok(())
                    }));
                }
                Ok(())
            }))
            .append_document_content_handler(end!(move |end| {
                if !placed.replace(true) {
                    end.append(&pixel, ContentType::Html);
                }
                Ok(())
            }));
    }

    rewrite_str(html, settings).map_err(|e| format!("cannot rewrite the HTML part: {e}"))
}

/// `<`, `>`, `&`, `"` and `'` as character references: safe in text and in quoted attributes.
pub fn escape_html(s: &str) -> Cow<'_, str> {
    if !s.contains(['&', '<', '>', '"', '\'']) {
        return Cow::Borrowed(s);
    }
    let mut out = String::with_capacity(s.len() + 16);
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    Cow::Owned(out)
}

/// A URL as a browser takes it from an attribute: leading and trailing C0 controls and spaces
/// stripped.
fn trim_url(s: &str) -> &str {
    s.trim_matches(|c: char| c <= ' ')
}

fn is_absolute_http(s: &str) -> bool {
    url::Url::parse(s).is_ok_and(|u| matches!(u.scheme(), "http" | "https") && u.has_host())
}

/// Decodes character references in an attribute value the way the HTML5 tokenizer does:
/// numeric references (with or without `;`, C1 code points mapped through windows-1252, invalid
/// ones to U+FFFD), named references from [`NAMED_ENTITIES`] with `;`, and the legacy names of
/// [`LEGACY_ENTITIES`] without `;` unless followed by `=` or an alphanumeric. Anything else
/// (`&foo;`, a lone `&`) stays as written.
pub fn decode_html_attribute(s: &str) -> Cow<'_, str> {
    if !s.contains('&') {
        return Cow::Borrowed(s);
    }
    let bytes = s.as_bytes();
    let mut out = String::with_capacity(s.len());
    let mut i = 0;
    while let Some(off) = s[i..].find('&') {
        let amp = i + off;
        out.push_str(&s[i..amp]);
        i = amp + 1;
        if bytes.get(i) == Some(&b'#') {
            if let Some((c, next)) = numeric_reference(bytes, i + 1) {
                out.push(c);
                i = next;
                continue;
            }
        } else {
            let end = i + bytes[i..].iter().take_while(|b| b.is_ascii_alphanumeric()).count();
            let name = &s[i..end];
            let found = if bytes.get(end) == Some(&b';') {
                lookup(NAMED_ENTITIES, name).or_else(|| lookup(LEGACY_ENTITIES, name)).map(|c| (c, end + 1))
            } else if bytes.get(end) != Some(&b'=') {
                lookup(LEGACY_ENTITIES, name).map(|c| (c, end))
            } else {
                None
            };
            if let Some((c, next)) = found {
                out.push(c);
                i = next;
                continue;
            }
        }
        out.push('&');
    }
    out.push_str(&s[i..]);
    Cow::Owned(out)
}

fn lookup(table: &[(&str, char)], name: &str) -> Option<char> {
    table.iter().find(|(n, _)| *n == name).map(|&(_, c)| c)
}

/// `&#...` starting after the `#`: the character and the index after the reference.
fn numeric_reference(bytes: &[u8], start: usize) -> Option<(char, usize)> {
    let (radix, digits_start) = match bytes.get(start) {
        Some(b'x' | b'X') => (16, start + 1),
        _ => (10, start),
    };
    let mut i = digits_start;
    let mut value: u32 = 0;
    while let Some(d) = bytes.get(i).and_then(|&b| (b as char).to_digit(radix)) {
        value = value.saturating_mul(radix).saturating_add(d);
        i += 1;
    }
    if i == digits_start {
        return None;
    }
    if bytes.get(i) == Some(&b';') {
        i += 1;
    }
    let c = match value {
        0x80..=0x9f => WINDOWS_1252_C1[(value - 0x80) as usize],
        0 => '\u{FFFD}',
        v => char::from_u32(v).unwrap_or('\u{FFFD}'),
    };
    Some((c, i))
}

/// The HTML5 replacements for `&#128;`..`&#159;` (windows-1252); unassigned ones stay C1.
const WINDOWS_1252_C1: [char; 32] = [
    '\u{20AC}', '\u{81}', '\u{201A}', '\u{0192}', '\u{201E}', '\u{2026}', '\u{2020}', '\u{2021}', '\u{02C6}',
    '\u{2030}', '\u{0160}', '\u{2039}', '\u{0152}', '\u{8D}', '\u{017D}', '\u{8F}', '\u{90}', '\u{2018}', '\u{2019}',
    '\u{201C}', '\u{201D}', '\u{2022}', '\u{2013}', '\u{2014}', '\u{02DC}', '\u{2122}', '\u{0161}', '\u{203A}',
    '\u{0153}', '\u{9D}', '\u{017E}', '\u{0178}',
];

/// The named references HTML5 also accepts without `;` (all of Latin-1, and the capitalized
/// AMP, LT, GT, QUOT, COPY, REG).
const LEGACY_ENTITIES: &[(&str, char)] = &[
    ("amp", '&'),
    ("AMP", '&'),
    ("lt", '<'),
    ("LT", '<'),
    ("gt", '>'),
    ("GT", '>'),
    ("quot", '"'),
    ("QUOT", '"'),
    ("COPY", '\u{A9}'),
    ("REG", '\u{AE}'),
    ("nbsp", '\u{A0}'),
    ("iexcl", '\u{A1}'),
    ("cent", '\u{A2}'),
    ("pound", '\u{A3}'),
    ("curren", '\u{A4}'),
    ("yen", '\u{A5}'),
    ("brvbar", '\u{A6}'),
    ("sect", '\u{A7}'),
    ("uml", '\u{A8}'),
    ("copy", '\u{A9}'),
    ("ordf", '\u{AA}'),
    ("laquo", '\u{AB}'),
    ("not", '\u{AC}'),
    ("shy", '\u{AD}'),
    ("reg", '\u{AE}'),
    ("macr", '\u{AF}'),
    ("deg", '\u{B0}'),
    ("plusmn", '\u{B1}'),
    ("sup2", '\u{B2}'),
    ("sup3", '\u{B3}'),
    ("acute", '\u{B4}'),
    ("micro", '\u{B5}'),
    ("para", '\u{B6}'),
    ("middot", '\u{B7}'),
    ("cedil", '\u{B8}'),
    ("sup1", '\u{B9}'),
    ("ordm", '\u{BA}'),
    ("raquo", '\u{BB}'),
    ("frac14", '\u{BC}'),
    ("frac12", '\u{BD}'),
    ("frac34", '\u{BE}'),
    ("iquest", '\u{BF}'),
    ("Agrave", '\u{C0}'),
    ("Aacute", '\u{C1}'),
    ("Acirc", '\u{C2}'),
    ("Atilde", '\u{C3}'),
    ("Auml", '\u{C4}'),
    ("Aring", '\u{C5}'),
    ("AElig", '\u{C6}'),
    ("Ccedil", '\u{C7}'),
    ("Egrave", '\u{C8}'),
    ("Eacute", '\u{C9}'),
    ("Ecirc", '\u{CA}'),
    ("Euml", '\u{CB}'),
    ("Igrave", '\u{CC}'),
    ("Iacute", '\u{CD}'),
    ("Icirc", '\u{CE}'),
    ("Iuml", '\u{CF}'),
    ("ETH", '\u{D0}'),
    ("Ntilde", '\u{D1}'),
    ("Ograve", '\u{D2}'),
    ("Oacute", '\u{D3}'),
    ("Ocirc", '\u{D4}'),
    ("Otilde", '\u{D5}'),
    ("Ouml", '\u{D6}'),
    ("times", '\u{D7}'),
    ("Oslash", '\u{D8}'),
    ("Ugrave", '\u{D9}'),
    ("Uacute", '\u{DA}'),
    ("Ucirc", '\u{DB}'),
    ("Uuml", '\u{DC}'),
    ("Yacute", '\u{DD}'),
    ("THORN", '\u{DE}'),
    ("szlig", '\u{DF}'),
    ("agrave", '\u{E0}'),
    ("aacute", '\u{E1}'),
    ("acirc", '\u{E2}'),
    ("atilde", '\u{E3}'),
    ("auml", '\u{E4}'),
    ("aring", '\u{E5}'),
    ("aelig", '\u{E6}'),
    ("ccedil", '\u{E7}'),
    ("egrave", '\u{E8}'),
    ("eacute", '\u{E9}'),
    ("ecirc", '\u{EA}'),
    ("euml", '\u{EB}'),
    ("igrave", '\u{EC}'),
    ("iacute", '\u{ED}'),
    ("icirc", '\u{EE}'),
    ("iuml", '\u{EF}'),
    ("eth", '\u{F0}'),
    ("ntilde", '\u{F1}'),
    ("ograve", '\u{F2}'),
    ("oacute", '\u{F3}'),
    ("ocirc", '\u{F4}'),
    ("otilde", '\u{F5}'),
    ("ouml", '\u{F6}'),
    ("divide", '\u{F7}'),
    ("oslash", '\u{F8}'),
    ("ugrave", '\u{F9}'),
    ("uacute", '\u{FA}'),
    ("ucirc", '\u{FB}'),
    ("uuml", '\u{FC}'),
    ("yacute", '\u{FD}'),
    ("thorn", '\u{FE}'),
    ("yuml", '\u{FF}'),
];

/// Other named references, recognized only with `;`: URL punctuation and common typography.
/// (Not all 2,231 of HTML5; an unknown name stays as written.)
const NAMED_ENTITIES: &[(&str, char)] = &[
    ("apos", '\''),
    ("Tab", '\t'),
    ("NewLine", '\n'),
    ("excl", '!'),
    ("num", '#'),
    ("dollar", '$'),
    ("percnt", '%'),
    ("lpar", '('),
    ("rpar", ')'),
    ("ast", '*'),
    ("midast", '*'),
    ("plus", '+'),
    ("comma", ','),
    ("period", '.'),
    ("sol", '/'),
    ("colon", ':'),
    ("semi", ';'),
    ("equals", '='),
    ("quest", '?'),
    ("commat", '@'),
    ("lsqb", '['),
    ("lbrack", '['),
    ("bsol", '\\'),
    ("rsqb", ']'),
    ("rbrack", ']'),
    ("Hat", '^'),
    ("lowbar", '_'),
    ("grave", '`'),
    ("lcub", '{'),
    ("lbrace", '{'),
    ("verbar", '|'),
    ("vert", '|'),
    ("VerticalLine", '|'),
    ("rcub", '}'),
    ("rbrace", '}'),
    ("OElig", '\u{152}'),
    ("oelig", '\u{153}'),
    ("Scaron", '\u{160}'),
    ("scaron", '\u{161}'),
    ("Yuml", '\u{178}'),
    ("fnof", '\u{192}'),
    ("circ", '\u{2C6}'),
    ("tilde", '\u{2DC}'),
    ("ensp", '\u{2002}'),
    ("emsp", '\u{2003}'),
    ("thinsp", '\u{2009}'),
    ("zwnj", '\u{200C}'),
    ("zwj", '\u{200D}'),
    ("lrm", '\u{200E}'),
    ("rlm", '\u{200F}'),
    ("ndash", '\u{2013}'),
    ("mdash", '\u{2014}'),
    ("lsquo", '\u{2018}'),
    ("rsquo", '\u{2019}'),
    ("sbquo", '\u{201A}'),
    ("ldquo", '\u{201C}'),
    ("rdquo", '\u{201D}'),
    ("bdquo", '\u{201E}'),
    ("dagger", '\u{2020}'),
    ("Dagger", '\u{2021}'),
    ("bull", '\u{2022}'),
    ("hellip", '\u{2026}'),
    ("permil", '\u{2030}'),
    ("prime", '\u{2032}'),
    ("Prime", '\u{2033}'),
    ("lsaquo", '\u{2039}'),
    ("rsaquo", '\u{203A}'),
    ("oline", '\u{203E}'),
    ("frasl", '\u{2044}'),
    ("euro", '\u{20AC}'),
    ("trade", '\u{2122}'),
    ("larr", '\u{2190}'),
    ("uarr", '\u{2191}'),
    ("rarr", '\u{2192}'),
    ("darr", '\u{2193}'),
    ("harr", '\u{2194}'),
    ("minus", '\u{2212}'),
    ("hearts", '\u{2665}'),
];

// ------------------------------------------------------------------------------------------
// Machines

/// Substrings (lower case) of the user agents of mail-privacy image proxies and link scanners.
const MACHINE_AGENTS: &[&str] = &[
    "googleimageproxy",
    "ggpht.com",
    "yahoomailproxy",
    "bingpreview",
    "google-safety",
    "facebookexternalhit",
    "barracuda",
    "proofpoint",
    "mimecast",
    "safelinks",
    "messagelabs",
    "headlesschrome",
    "bot",
    "spider",
    "crawler",
    "preview",
    "scanner",
];

/// A user agent that is surely not a person: empty, a known mail-privacy proxy or link scanner,
/// a bot, or Apple Mail Privacy Protection's bare `Mozilla/5.0` (no browser sends only that).
/// Generic browsers, curl and script clients are not flagged. Timing and HEAD requests are the
/// listener's to judge.
pub fn is_machine_agent(user_agent: &str) -> bool {
    let ua = user_agent.trim();
    if ua.is_empty() || ua == "Mozilla/5.0" {
        return true;
    }
    let ua = ua.to_ascii_lowercase();
    MACHINE_AGENTS.iter().any(|m| ua.contains(m))
}

/// A 1×1 transparent GIF89a (43 bytes): the open pixel's body.
pub const PIXEL_GIF: &[u8] = &[
    b'G', b'I', b'F', b'8', b'9', b'a', // signature
    0x01, 0x00, 0x01, 0x00, 0x80, 0x00, 0x00, // 1x1, global colour table of 2, background 0
    0x00, 0x00, 0x00, 0xff, 0xff, 0xff, // colours: black, white
    0x21, 0xf9, 0x04, 0x01, 0x00, 0x00, 0x00, 0x00, // graphic control: colour 0 is transparent
    0x2c, 0x00, 0x00, 0x00, 0x00, 0x01, 0x00, 0x01, 0x00, 0x00, // image at 0,0, 1x1
    0x02, 0x02, 0x44, 0x01, 0x00, // LZW: clear, pixel 0, end
    0x3b, // trailer
];

// ------------------------------------------------------------------------------------------
// Unsubscribe

/// What the unsubscribe page shows.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PageState {
    /// `GET /u/<token>`: a button that POSTs the one-click body to `action` (the page's own path).
    Confirm { action: String },
    /// After the POST: the address is unsubscribed.
    Done,
    /// A token that does not verify.
    NotFound,
}

/// The unsubscribe page: small, self-contained (no script, no external resources), every value
/// escaped. Its form posts exactly `List-Unsubscribe=One-Click`, the RFC 8058 body, so the
/// listener has one way to unsubscribe.
pub fn unsubscribe_page(address: Option<&str>, topic: Option<&str>, state: PageState) -> String {
    let who = match address {
        Some(a) => format!("<strong>{}</strong>", escape_html(a)),
        None => "this address".to_string(),
    };
    let what = match topic {
        Some(t) => format!("emails about <strong>{}</strong>", escape_html(t)),
        None => "emails from this sender".to_string(),
    };
    let (title, main) = match state {
        PageState::Confirm { action } => (
            "Unsubscribe",
            format!(
                "<h1>Unsubscribe</h1>\n<p>Stop sending {what} to {who}?</p>\n\
                 <form method=\"post\" action=\"{}\">\n\
                 <input type=\"hidden\" name=\"List-Unsubscribe\" value=\"One-Click\">\n\
                 <button type=\"submit\">Unsubscribe</button>\n</form>",
                escape_html(&action)
            ),
        ),
        PageState::Done => {
            ("Unsubscribed", format!("<h1>You are unsubscribed</h1>\n<p>{who} will no longer receive {what}.</p>"))
        }
        PageState::NotFound => {
            ("Link not valid", "<h1>Link not valid</h1>\n<p>This unsubscribe link is not valid.</p>".to_string())
        }
    };
    format!(
        "<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n\
         <meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">\n\
         <meta name=\"robots\" content=\"noindex, nofollow\">\n\
         <meta name=\"referrer\" content=\"no-referrer\">\n<title>{title}</title>\n\
         <style>body{{font-family:system-ui,sans-serif;max-width:32rem;margin:4rem auto;padding:0 1rem;\
         color:#222;line-height:1.5}}button{{font:inherit;padding:.5rem 1.25rem;cursor:pointer}}</style>\n\
         </head>\n<body>\n<main>\n{main}\n</main>\n</body>\n</html>\n"
    )
}

/// Whether a `POST /u/<token>` body asks to unsubscribe: a field `List-Unsubscribe` with value
/// `One-Click` (RFC 8058; the page's own form sends the same), as
/// `application/x-www-form-urlencoded` (also assumed when there is no Content-Type) or as
/// `multipart/form-data`. Names and values compare ASCII case-insensitively and surrounding
/// whitespace and line breaks are ignored; other fields may be present. Everything else — an
/// empty body, another field or value, another media type, multipart without its boundary — is
/// `false`.
pub fn is_one_click_body(content_type: Option<&str>, body: &[u8]) -> bool {
    let Some(content_type) = content_type else {
        return urlencoded_has_one_click(body);
    };
    let (essence, params) = content_type.split_once(';').unwrap_or((content_type, ""));
    let essence = essence.trim();
    if essence.eq_ignore_ascii_case("application/x-www-form-urlencoded") {
        urlencoded_has_one_click(body)
    } else if essence.eq_ignore_ascii_case("multipart/form-data") {
        match parameters(params).into_iter().find(|(n, _)| n == "boundary") {
            Some((_, boundary)) => multipart_has_one_click(body, &boundary),
            None => false,
        }
    } else {
        false
    }
}

fn is_one_click_field(name: &str, value: &str) -> bool {
    name.trim().eq_ignore_ascii_case("List-Unsubscribe") && value.trim().eq_ignore_ascii_case("One-Click")
}

fn urlencoded_has_one_click(body: &[u8]) -> bool {
    let Ok(body) = std::str::from_utf8(body) else {
        return false;
    };
    let decode = |s: &str| {
        let s = s.replace('+', " ");
        percent_encoding::percent_decode_str(&s).decode_utf8().map(|d| d.into_owned()).ok()
    };
    body.split('&').any(|pair| {
        let Some((name, value)) = pair.split_once('=') else {
            return false;
        };
        matches!((decode(name), decode(value)), (Some(n), Some(v)) if is_one_click_field(&n, &v))
    })
}

/// `; name=value; name="quoted value"` (Content-Type, Content-Disposition): lower-cased names,
/// unquoted values.
fn parameters(s: &str) -> Vec<(String, String)> {
    let mut out = Vec::new();
    let mut chars = s.chars().peekable();
    loop {
        while chars.next_if(|&c| c == ';' || c.is_whitespace()).is_some() {}
        if chars.peek().is_none() {
            return out;
        }
        let mut name = String::new();
        while let Some(c) = chars.next_if(|&c| c != '=' && c != ';') {
            name.push(c);
        }
        let mut value = String::new();
        if chars.next_if_eq(&'=').is_some() {
            while chars.next_if(|c| c.is_whitespace()).is_some() {}
            if chars.next_if_eq(&'"').is_some() {
                while let Some(c) = chars.next() {
                    match c {
                        '"' => break,
                        '\\' => value.extend(chars.next()),
                        c => value.push(c),
                    }
                }
                // Anything between the closing quote and the next `;` is ignored.
                while chars.next_if(|&c| c != ';').is_some() {}
            } else {
                while let Some(c) = chars.next_if(|&c| c != ';') {
                    value.push(c);
                }
                value.truncate(value.trim_end().len());
            }
        }
        out.push((name.trim().to_ascii_lowercase(), value));
    }
}

fn find(haystack: &[u8], needle: &[u8], from: usize) -> Option<usize> {
    haystack.get(from..)?.windows(needle.len()).position(|w| w == needle).map(|p| p + from)
}

fn multipart_has_one_click(body: &[u8], boundary: &str) -> bool {
    if boundary.is_empty() || boundary.len() > 70 {
        return false;
    }
    let delimiter = [b"--", boundary.as_bytes()].concat();
    // Delimiters start a line: at the start of the body or after a line feed.
    let at = |from: usize| {
        let mut from = from;
        loop {
            let p = find(body, &delimiter, from)?;
            if p == 0 || body[p - 1] == b'\n' {
                return Some(p);
            }
            from = p + 1;
        }
    };
    let Some(mut start) = at(0) else {
        return false;
    };
    loop {
        let after = start + delimiter.len();
        if body[after..].starts_with(b"--") {
            return false; // the close delimiter
        }
        // The rest of the delimiter line (transport padding) ends at the line feed.
        let Some(line_end) = find(body, b"\n", after) else {
            return false;
        };
        let Some(next) = at(line_end + 1) else {
            return false; // no closing delimiter: a truncated body
        };
        if part_is_one_click(&body[line_end + 1..next]) {
            return true;
        }
        start = next;
    }
}

fn part_is_one_click(part: &[u8]) -> bool {
    let Ok(part) = std::str::from_utf8(part) else {
        return false;
    };
    // The line break before the next delimiter belongs to the delimiter.
    let part = part.strip_suffix('\n').map_or(part, |p| p.strip_suffix('\r').unwrap_or(p));
    let (headers, content) = if let Some(rest) = part.strip_prefix("\r\n").or_else(|| part.strip_prefix('\n')) {
        ("", rest)
    } else if let Some(split) = part.split_once("\r\n\r\n").or_else(|| part.split_once("\n\n")) {
        split
    } else {
        return false;
    };
    let name = headers.lines().find_map(|line| {
        let (header, value) = line.split_once(':')?;
        if !header.trim().eq_ignore_ascii_case("content-disposition") {
            return None;
        }
        let (disposition, params) = value.split_once(';').unwrap_or((value, ""));
        if !disposition.trim().eq_ignore_ascii_case("form-data") {
            return None;
        }
        parameters(params).into_iter().find(|(n, _)| n == "name").map(|(_, v)| v)
    });
    name.is_some_and(|name| is_one_click_field(&name, content))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn keys() -> Keys {
        Keys::new(vec![(1, b"first secret".to_vec()), (2, b"second secret".to_vec())])
    }

    fn click(url: &str) -> Claims {
        Claims { kind: Kind::Click, message_id: 42, single: true, url: Some(url.to_string()) }
    }

    #[test]
    fn tokens_round_trip_for_each_kind() {
        let keys = keys();
        let claims = [
            Claims { kind: Kind::Open, message_id: 1, single: true, url: None },
            Claims { kind: Kind::Unsubscribe, message_id: i64::MAX, single: false, url: None },
            Claims {
                kind: Kind::Click,
                message_id: -7,
                single: false,
                url: Some("https://example.org/ü?a=1&b".into()),
            },
        ];
        for c in claims {
            let token = keys.sign(&c).expect("a key");
            assert!(!token.contains(['/', '?', '#', '=', '+', '%']), "{token}");
            assert_eq!(keys.verify(&token), Some(c.clone()));
            assert_eq!(keys.verify_kind(&token, c.kind), Some(c.clone()));
            let other = if c.kind == Kind::Open { Kind::Click } else { Kind::Open };
            assert_eq!(keys.verify_kind(&token, other), None);
        }
        // An open token is compact.
        let open = keys.sign(&Claims { kind: Kind::Open, message_id: 1, single: true, url: None }).unwrap();
        assert_eq!(open.len(), 20 + 1 + 22);
    }

    #[test]
    fn inconsistent_claims_and_no_key_are_not_signed() {
        let keys = keys();
        assert_eq!(keys.sign(&Claims { kind: Kind::Click, message_id: 1, single: true, url: None }), None);
        assert_eq!(keys.sign(&click("")), None);
        assert_eq!(keys.sign(&Claims { kind: Kind::Open, message_id: 1, single: true, url: Some("x".into()) }), None);
        let none = Keys::new(vec![(3, Vec::new())]);
        assert!(none.is_empty());
        assert_eq!(none.sign(&click("https://example.org/")), None);
        assert_eq!(none.verify(&keys.sign(&click("https://example.org/")).unwrap()), None);
    }

    #[test]
    fn any_changed_character_is_rejected() {
        let keys = keys();
        let alphabet: Vec<char> =
            "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_./=+ %".chars().collect();
        for claims in
            [click("https://example.org/a?b=c"), Claims { kind: Kind::Open, message_id: 9, single: false, url: None }]
        {
            let token = keys.sign(&claims).unwrap();
            let chars: Vec<char> = token.chars().collect();
            for i in 0..chars.len() {
                for &c in alphabet.iter().filter(|&&c| c != chars[i]) {
                    let mut changed = chars.clone();
                    changed[i] = c;
                    let changed: String = changed.into_iter().collect();
                    assert_eq!(keys.verify(&changed), None, "position {i} changed to {c:?}: {changed}");
                }
                // Removing or inserting a character fails too.
                let removed: String = chars.iter().enumerate().filter(|&(j, _)| j != i).map(|(_, c)| c).collect();
                assert_eq!(keys.verify(&removed), None);
                let mut inserted = chars.clone();
                inserted.insert(i, 'A');
                assert_eq!(keys.verify(&inserted.into_iter().collect::<String>()), None);
            }
            assert_eq!(keys.verify(&format!("{token}A")), None);
            assert_eq!(keys.verify(&format!("{token}.")), None);
        }
    }

    #[test]
    fn unknown_kid_and_malformed_tokens_are_rejected() {
        let token = keys().sign(&click("https://example.org/")).unwrap();
        // The same secret under another kid: the kid is in the payload, so this is unknown.
        let other = Keys::new(vec![(1, b"first secret".to_vec())]);
        assert_eq!(other.verify(&token), None);
        let wrong_secret = Keys::new(vec![(2, b"another secret".to_vec())]);
        assert_eq!(wrong_secret.verify(&token), None);
        for bad in ["", ".", "abc", "abc.", ".abc", "a.b.c", "AAAA.AAAA", "🙂.🙂"] {
            assert_eq!(keys().verify(bad), None, "{bad:?}");
        }
        assert_eq!(keys().verify(&"A".repeat(MAX_TOKEN_LEN + 1)), None);
    }

    #[test]
    fn wrong_version_kind_flags_or_url_are_rejected_even_when_signed() {
        let keys = keys();
        let payload = |version: u8, kind: u8, flags: u8, url: &[u8]| {
            let mut p = vec![version, kind];
            p.extend_from_slice(&2i32.to_be_bytes());
            p.extend_from_slice(&5i64.to_be_bytes());
            p.push(flags);
            p.extend_from_slice(url);
            p
        };
        let good = keys.seal(2, &payload(VERSION, b'c', 1, b"https://example.org/")).unwrap();
        assert_eq!(keys.verify(&good), Some(Claims { message_id: 5, ..click("https://example.org/") }));
        for bad in [
            payload(2, b'c', 1, b"https://example.org/"),
            payload(VERSION, b'x', 1, b"https://example.org/"),
            payload(VERSION, b'C', 1, b"https://example.org/"),
            payload(VERSION, b'c', 3, b"https://example.org/"),
            payload(VERSION, b'c', 1, b""),
            payload(VERSION, b'c', 1, b"\xff\xfe"),
            payload(VERSION, b'o', 1, b"https://example.org/"),
            payload(VERSION, b'u', 0, b"x"),
            payload(VERSION, b'o', 0, b"")[..HEADER_LEN - 1].to_vec(),
        ] {
            assert_eq!(keys.verify(&keys.seal(2, &bad).unwrap()), None, "{bad:?}");
        }
    }

    #[test]
    fn return_tokens_round_trip_fit_a_local_part_and_refuse_any_change() {
        let k = keys();
        for r in [
            Return { unsubscribe: false, message_id: 42, recipient: Some(0) },
            Return { unsubscribe: true, message_id: i64::MAX, recipient: None },
        ] {
            let t = k.return_token(&r).unwrap();
            assert!(t.len() + "unsubscribe+".len() <= 64, "{t}");
            assert!(t.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit()), "{t}");
            assert_eq!(k.verify_return(&t), Some(r));
            assert_eq!(k.verify_return(&t.to_ascii_uppercase()), Some(r));
            for i in 0..t.len() {
                let mut b = t.clone().into_bytes();
                b[i] = if b[i] == b'a' { b'b' } else { b'a' };
                assert_eq!(k.verify_return(std::str::from_utf8(&b).unwrap()), None, "position {i}");
            }
            assert_eq!(k.verify_return(&t[..t.len() - 1]), None);
            assert_eq!(k.verify_return(&format!("{t}a")), None);
        }
        assert_eq!(
            Keys::new(vec![(9, b"other".to_vec())]).verify_return(
                &k.return_token(&Return { unsubscribe: false, message_id: 1, recipient: None }).unwrap()
            ),
            None
        );
    }

    #[test]
    fn base32_is_canonical() {
        for n in 0..40 {
            let bytes: Vec<u8> = (0..n).map(|i| (i * 37 + 11) as u8).collect();
            let e = base32::encode(&bytes);
            assert_eq!(base32::decode(&e), Some(bytes));
        }
        assert_eq!(base32::decode("ab"), None); // non-zero leftover bits
        assert_eq!(base32::decode("a1"), None);
    }

    #[test]
    fn rotation_keeps_old_tokens_valid() {
        let old = Keys::new(vec![(1, b"first secret".to_vec())]);
        let old_token = old.sign(&click("https://example.org/")).unwrap();
        let rotated = keys();
        assert_eq!(rotated.current_kid(), Some(2));
        assert_eq!(rotated.verify(&old_token), Some(click("https://example.org/")));
        let new_token = rotated.sign(&click("https://example.org/")).unwrap();
        assert_ne!(new_token, old_token);
        assert_eq!(old.verify(&new_token), None);
        // The last pair signs (kids are random, not ordered): both still verify.
        let reversed = Keys::new(vec![(2, b"second secret".to_vec()), (1, b"first secret".to_vec())]);
        assert_eq!(reversed.current_kid(), Some(1));
        assert_eq!(reversed.sign(&click("https://example.org/")), Some(old_token));
        assert_eq!(reversed.verify(&new_token), Some(click("https://example.org/")));
        assert_eq!(format!("{reversed:?}"), "Keys { kids: [1, 2] }");
    }

    #[test]
    fn links_and_locations() {
        assert_eq!(link("https://mail.example.org/", Kind::Click, "T.M"), "https://mail.example.org/c/T.M");
        assert_eq!(link("http://127.0.0.1:8025", Kind::Open, "x"), "http://127.0.0.1:8025/o/x");
        assert_eq!(
            redirect_location("https://example.org/p?a=1&c=ü#frag").as_deref(),
            Some("https://example.org/p?a=1&c=%C3%BC#frag")
        );
        assert_eq!(redirect_location("javascript:alert(1)"), None);
        assert_eq!(redirect_location("/relative"), None);
    }

    #[test]
    fn attribute_decoding_follows_html5() {
        let cases = [
            ("a&amp;b", "a&b"),
            ("a&#38;b&#x26;c&#X26;d", "a&b&c&d"),
            ("&quot;&lt;&gt;&apos;&eacute;&Eacute;", "\"<>'éÉ"),
            ("&foo;&amp", "&foo;&"),
            ("?a=1&copy=2", "?a=1&copy=2"),
            ("?a=1&copy;=2", "?a=1©=2"),
            ("?a=1&copy&b", "?a=1©&b"),
            ("?x&notit;", "?x&notit;"),
            ("&amp;amp;", "&amp;"),
            ("&#128;&#0;&#xD800;&#x110000;&#99999999999;", "€\u{FFFD}\u{FFFD}\u{FFFD}\u{FFFD}"),
            ("&#65&#x42z&#;&#x;&", "ABz&#;&#x;&"),
            ("&hellip;&sol;&colon;", "…/:"),
            ("no entities", "no entities"),
        ];
        for (raw, decoded) in cases {
            assert_eq!(decode_html_attribute(raw), decoded, "{raw}");
        }
        assert_eq!(escape_html(r#"<a href="x">&'"#), "&lt;a href=&quot;x&quot;&gt;&amp;&#39;");
    }

    /// What a browser does with the rewritten document: the href of the first `<a>`, decoded.
    fn hrefs(html: &str) -> Vec<String> {
        let found = std::cell::RefCell::new(Vec::new());
        rewrite_str(
            html,
            RewriteStrSettings::new().append_element_content_handler(element!("a[href]", |el| {
                found.borrow_mut().push(decode_html_attribute(&el.get_attribute("href").unwrap()).into_owned());
                Ok(())
            })),
        )
        .unwrap();
        found.into_inner()
    }

    #[test]
    fn tracked_urls_survive_entities_fragments_and_non_ascii() {
        let keys = keys();
        let seen = std::cell::RefCell::new(Vec::new());
        let track = |url: &str| {
            seen.borrow_mut().push(url.to_string());
            Some(link("https://mail.example.org", Kind::Click, &keys.sign(&click(url))?))
        };
        let html = "<p>Hi <a class=x href=\"https://example.org/p?a=1&amp;b=%C3%A9&amp;c=ü#frag\">one</a> \
                    <a href='  HTTP://Example.org/q?x=&quot;y&quot;&#38;z=&eacute;&amp&copy=1 '>two</a></p>";
        let out = rewrite_html(html, Some(&track), None).unwrap();
        let expected = ["https://example.org/p?a=1&b=%C3%A9&c=ü#frag", "HTTP://Example.org/q?x=\"y\"&z=é&&copy=1"];
        assert_eq!(*seen.borrow(), expected);
        let got = hrefs(&out);
        assert_eq!(got.len(), 2);
        for (href, url) in got.iter().zip(expected) {
            let token = href.strip_prefix("https://mail.example.org/c/").expect(href);
            assert_eq!(keys.verify_kind(token, Kind::Click).unwrap().url.as_deref(), Some(url));
        }
        assert!(out.starts_with("<p>Hi <a class=x href=\"https://mail.example.org/c/"), "{out}");
        assert!(out.ends_with(">two</a></p>"), "{out}");
    }

    #[test]
    fn new_hrefs_are_escaped() {
        let track = |_: &str| Some("https://t.example/c?a=1&b=\"2\"<".to_string());
        let out = rewrite_html(r#"<a href="https://example.org/">x</a>"#, Some(&track), None).unwrap();
        assert_eq!(out, r#"<a href="https://t.example/c?a=1&amp;b=&quot;2&quot;&lt;">x</a>"#);
        assert_eq!(hrefs(&out), ["https://t.example/c?a=1&b=\"2\"<"]);
    }

    #[test]
    fn untracked_links_are_left_alone() {
        let calls = Cell::new(0);
        let track = |url: &str| {
            calls.set(calls.get() + 1);
            (!url.contains("/u/")).then(|| "https://t.example/c/T".to_string())
        };
        let html = concat!(
            "<a href=\"mailto:a@example.org?subject=x&amp;body=y\">m</a>",
            "<a href=\"tel:+123\">t</a><a href=\"/relative?a&amp;b\">r</a><a href=\"#top\">h</a>",
            "<a href=\"//example.org/x\">p</a><a href=\"ftp://example.org/\">f</a><a name=\"x\">n</a>",
            "<a href=\"https://mail.example.org/u/TOKEN\">unsubscribe</a>",
            "<a data-pg-email-notrack href=\"https://example.org/keep?a&amp;b\">k</a>",
            "<a href=\"https://example.org/keep2\" DATA-PG-EMAIL-NOTRACK=\"1\">k2</a>",
        );
        let out = rewrite_html(html, Some(&track), None).unwrap();
        assert_eq!(calls.get(), 1, "only the unsubscribe link reaches the callback");
        let expected =
            html.replace("<a data-pg-email-notrack href", "<a href").replace(" DATA-PG-EMAIL-NOTRACK=\"1\"", "");
        assert_eq!(out, expected);
        // Without click tracking the marker is still removed.
        assert_eq!(rewrite_html(html, None, None).unwrap(), expected);
    }

    const PIXEL: &str = concat!(
        r#"<img src="https://m.example/o/T?a=1&amp;b" width="1" height="1" "#,
        r#"alt="" style="display:block;width:1px;height:1px;border:0">"#
    );

    #[test]
    fn pixel_goes_at_the_end_of_body_or_of_the_document() {
        let px = Some("https://m.example/o/T?a=1&b");
        let cases = [
            ("<html><body><p>x</p></body></html>\n", format!("<html><body><p>x</p>{PIXEL}</body></html>\n")),
            (
                "<html><BODY class=a><p>x</p></Body >\n</html>",
                format!("<html><BODY class=a><p>x</p>{PIXEL}</Body >\n</html>"),
            ),
            ("<p>no body</p>", format!("<p>no body</p>{PIXEL}")),
            ("<html><body><p>unclosed body", format!("<html><body><p>unclosed body{PIXEL}")),
            ("", PIXEL.to_string()),
            ("<body>a</body><body>b</body>", format!("<body>a{PIXEL}</body><body>b</body>")),
        ];
        for (html, expected) in cases {
            assert_eq!(rewrite_html(html, None, px).unwrap(), expected, "{html}");
        }
    }

    #[test]
    fn the_rest_of_the_document_is_unchanged() {
        let html = "<!DOCTYPE html>\n<html><head><meta charset=utf-8><style>a{color:red}</style>\
                    <!--[if mso]><a href=\"https://x.example/\">c</a><![endif]--></head>\n\
                    <body><table><tr><td>Caf&eacute; ü &amp; <b>bold</td></table>\
                    <a  href = 'https://example.org/a'  target=_blank >link</a>\
                    <script>var a = '<a href=\"https://y.example/\">';</script>\
                    <textarea><a href=\"https://z.example/\"></textarea></body></html>";
        let track = |_: &str| Some("https://t.example/c/T".to_string());
        let out = rewrite_html(html, Some(&track), None).unwrap();
        // Only the real link changed (not the one in a comment, a script or a textarea); its start
        // tag is written anew, with single spaces between attributes.
        let expected = html.replace(
            "<a  href = 'https://example.org/a'  target=_blank >",
            "<a href=\"https://t.example/c/T\" target=_blank>",
        );
        assert_eq!(out, expected);
        assert_eq!(rewrite_html(html, None, None).unwrap(), html);
    }

    #[test]
    fn huge_and_broken_html_is_rewritten() {
        let huge = format!(
            "<a href=\"https://example.org/?q={}\" title=\"{}\">x</a>",
            "a".repeat(1 << 20),
            "&".repeat(1 << 16)
        );
        let out = rewrite_html(&huge, Some(&|_| Some("https://t/c/T".into())), Some("https://t/o/T")).unwrap();
        assert!(out.starts_with("<a href=\"https://t/c/T\" title=\"&&&"));
        assert!(out.ends_with(concat!(
            r#"x</a><img src="https://t/o/T" width="1" height="1" alt="" "#,
            r#"style="display:block;width:1px;height:1px;border:0">"#
        )));
        for html in [
            "<a href=\"https://e.org/",
            "<a href",
            "<<a>></a></b></body><body",
            "<select><xmp><a href='https://e.org/'></select>",
        ] {
            let out = rewrite_html(html, None, None).unwrap();
            assert_eq!(out, html);
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 300, failure_persistence: None, ..ProptestConfig::default() })]

        #[test]
        fn hostile_html_never_panics_and_keeps_the_document(parts in prop::collection::vec(prop_oneof![
            Just("<a href=\"https://e.org/?a=1&amp;b".to_string()),
            Just("<a href='http://e.org/".to_string()),
            Just("<a data-pg-email-notrack href=https://e.org/".to_string()),
            Just("<body>".to_string()), Just("</body>".to_string()), Just("<html>".to_string()),
            Just("<table><tr><td>".to_string()), Just("<select><xmp>".to_string()), Just("<script>".to_string()),
            Just("<!--".to_string()), Just("-->".to_string()), Just("<![CDATA[".to_string()), Just("<svg>".to_string()),
            Just("\"".to_string()), Just("'".to_string()), Just(">".to_string()), Just("</a>".to_string()),
            "[a-z&#;<>\"'=/ \n\t!?-]{0,12}",
            "\\PC{0,6}",
        ], 0..40)) {
            let html: String = parts.concat();
            // Untouched without tracking (the notrack marker aside).
            let plain = rewrite_html(&html, None, None).unwrap();
            prop_assert!(plain.len() <= html.len());
            let calls = Cell::new(0usize);
            let track = |url: &str| {
                calls.set(calls.get() + 1);
                Some(format!("https://t.example/c/{}", url.len()))
            };
            let out = rewrite_html(&html, Some(&track), Some("https://t.example/o/PIXELQ")).unwrap();
            prop_assert!(calls.get() <= html.matches("<a").count());
            prop_assert_eq!(out.matches("PIXELQ").count(), 1);
            if !html.contains("data-pg-email-notrack") && calls.get() == 0 {
                // Then the only change is the pixel: removing it gives the input back.
                let tag = out.find("<img src=\"https://t.example/o/PIXELQ\"").unwrap();
                let end = tag + out[tag..].find('>').unwrap() + 1;
                prop_assert_eq!(format!("{}{}", &out[..tag], &out[end..]), html.clone());
                prop_assert_eq!(plain, html);
            }
        }
    }

    #[test]
    fn machine_agents() {
        for ua in [
            "",
            "  ",
            "Mozilla/5.0",
            "Mozilla/5.0 (Windows NT 5.1; rv:11.0) Gecko Firefox/11.0 (via ggpht.com GoogleImageProxy)",
            "YahooMailProxy; https://help.yahoo.com/kb/yahoo-mail-proxy-SLN28749.html",
            "Mozilla/5.0 (compatible; bingbot/2.0; +http://www.bing.com/bingbot.htm)",
            "Mozilla/5.0 (Windows NT 10.0; Win64; x64) AppleWebKit/537.36 (KHTML, like Gecko) BingPreview/1.0b",
            "Google-Safety",
            "facebookexternalhit/1.1",
            "Barracuda Sentinel (EE)",
            "Proofpoint URL Defense",
            "Mimecast Link Scanner",
            "Mozilla/5.0 (X11; Linux x86_64) AppleWebKit/537.36 (KHTML, like Gecko) HeadlessChrome/120.0 Safari/537.36",
            "SomeSpider/1.0",
            "link-crawler",
        ] {
            assert!(is_machine_agent(ua), "{ua:?}");
        }
        for ua in [
            concat!(
                "Mozilla/5.0 (Macintosh; Intel Mac OS X 10_15_7) AppleWebKit/605.1.15 (KHTML, like Gecko) ",
                "Version/17.0 Safari/605.1.15"
            ),
            "Mozilla/5.0 (Windows NT 10.0; Win64; x64; rv:128.0) Gecko/20100101 Firefox/128.0",
            concat!(
                "Mozilla/5.0 (iPhone; CPU iPhone OS 17_0 like Mac OS X) AppleWebKit/605.1.15 (KHTML, like Gecko) ",
                "Mobile/15E148"
            ),
            "curl/8.5.0",
            "Python-urllib/3.11",
            "Microsoft Office/16.0 (Windows NT 10.0; Microsoft Outlook 16.0.17126; Pro)",
        ] {
            assert!(!is_machine_agent(ua), "{ua:?}");
        }
    }

    #[test]
    fn pixel_gif_is_a_1x1_transparent_gif89a() {
        assert_eq!(PIXEL_GIF.len(), 43);
        assert!(PIXEL_GIF.starts_with(b"GIF89a"));
        assert_eq!(&PIXEL_GIF[6..10], &[1, 0, 1, 0]);
        assert_eq!(PIXEL_GIF[19..23], [0x21, 0xf9, 0x04, 0x01]); // transparency flag set
        assert_eq!(PIXEL_GIF.last(), Some(&0x3b));
    }

    #[test]
    fn unsubscribe_pages() {
        let page = unsubscribe_page(
            Some("a<b>&\"c\"@example.org"),
            Some("news & <offers>"),
            PageState::Confirm { action: "/u/abc.def?x=\"y\"".into() },
        );
        assert!(page.contains("<strong>a&lt;b&gt;&amp;&quot;c&quot;@example.org</strong>"), "{page}");
        assert!(page.contains("<strong>news &amp; &lt;offers&gt;</strong>"));
        assert!(page.contains("<form method=\"post\" action=\"/u/abc.def?x=&quot;y&quot;\">"));
        assert!(page.contains("<input type=\"hidden\" name=\"List-Unsubscribe\" value=\"One-Click\">"));
        assert!(page.contains("<button type=\"submit\">"));
        for forbidden in ["<script", "<link", "src=", "http://", "https://", "@import"] {
            assert!(!page.contains(forbidden), "{forbidden}");
        }
        // The form posts exactly the one-click body: one named field, the button has no name.
        assert_eq!(hidden_fields(&page), ["List-Unsubscribe=One-Click"]);

        let done = unsubscribe_page(Some("x@example.org"), None, PageState::Done);
        assert!(done.contains("You are unsubscribed"));
        assert!(done.contains("<strong>x@example.org</strong> will no longer receive emails from this sender."));
        assert!(!done.contains("<form"));
        let missing = unsubscribe_page(None, None, PageState::NotFound);
        assert!(missing.contains("not valid") && !missing.contains("<form"));
    }

    fn hidden_fields(page: &str) -> Vec<String> {
        let fields = std::cell::RefCell::new(Vec::new());
        rewrite_str(
            page,
            RewriteStrSettings::new().append_element_content_handler(element!("input[name], button[name]", |el| {
                let value = el.get_attribute("value").unwrap_or_default();
                fields.borrow_mut().push(format!("{}={value}", el.get_attribute("name").unwrap()));
                Ok(())
            })),
        )
        .unwrap();
        fields.into_inner()
    }

    #[test]
    fn one_click_bodies() {
        let form = Some("application/x-www-form-urlencoded");
        let multipart = "multipart/form-data; boundary=------------------------d74496d66958873e";
        let part = |name: &str, value: &str| {
            format!(
                "--------------------------d74496d66958873e\r\n\
                 Content-Disposition: form-data; name=\"{name}\"\r\n\r\n{value}\r\n"
            )
        };
        let close = "--------------------------d74496d66958873e--\r\n";
        let yes: Vec<(Option<&str>, Vec<u8>)> = vec![
            (form, b"List-Unsubscribe=One-Click".to_vec()),
            (form, b"List-Unsubscribe=One-Click\r\n".to_vec()),
            (Some("Application/X-WWW-Form-Urlencoded; charset=UTF-8"), b" list-unsubscribe=one-click ".to_vec()),
            (form, b"List-Unsubscribe=One%2DClick&other=1".to_vec()),
            (form, b"x=1&List%2DUnsubscribe=One-Click".to_vec()),
            (None, b"List-Unsubscribe=One-Click".to_vec()),
            (Some(multipart), format!("{}{close}", part("List-Unsubscribe", "One-Click")).into_bytes()),
            (
                Some(multipart),
                format!("preamble\r\n{}{}{close}epilogue", part("a", "b"), part("List-Unsubscribe", " One-Click\r\n"))
                    .into_bytes(),
            ),
            (
                Some("multipart/form-data; charset=utf-8; boundary=\"a b;c\""),
                b"--a b;c\nContent-Disposition: form-data; name=List-Unsubscribe\nContent-Type: text/plain\n\n\
                  One-Click\n--a b;c--"
                    .to_vec(),
            ),
        ];
        for (ct, body) in &yes {
            assert!(is_one_click_body(*ct, body), "{ct:?} {:?}", String::from_utf8_lossy(body));
        }
        let no: Vec<(Option<&str>, Vec<u8>)> = vec![
            (form, Vec::new()),
            (None, Vec::new()),
            (form, b"List-Unsubscribe=Two-Click".to_vec()),
            (form, b"List-Unsubscribe".to_vec()),
            (form, b"List-Unsubscribe=One-Click-Extra".to_vec()),
            (form, b"Unsubscribe=One-Click".to_vec()),
            (form, b"List-Unsubscribe=One-Click\xff=".to_vec()),
            (Some("text/plain"), b"List-Unsubscribe=One-Click".to_vec()),
            (Some("application/json"), br#"{"List-Unsubscribe":"One-Click"}"#.to_vec()),
            (Some("multipart/form-data"), format!("{}{close}", part("List-Unsubscribe", "One-Click")).into_bytes()),
            (Some(multipart), b"List-Unsubscribe=One-Click".to_vec()),
            (Some(multipart), format!("{}{close}", part("other", "One-Click")).into_bytes()),
            (Some(multipart), format!("{}{close}", part("List-Unsubscribe", "no")).into_bytes()),
            // Truncated: no closing delimiter.
            (Some(multipart), part("List-Unsubscribe", "One-Click").into_bytes()),
            // The field only in the preamble or the epilogue.
            (Some(multipart), format!("List-Unsubscribe=One-Click\r\n{}{close}", part("a", "b")).into_bytes()),
            (
                Some(multipart),
                format!("{}{close}{}", part("a", "b"), part("List-Unsubscribe", "One-Click")).into_bytes(),
            ),
        ];
        for (ct, body) in &no {
            assert!(!is_one_click_body(*ct, body), "{ct:?} {:?}", String::from_utf8_lossy(body));
        }
    }

    #[test]
    fn parameters_parse_quotes_and_escapes() {
        assert_eq!(
            parameters(r#" Boundary="a\"b;c" ; name=x ;flag; q="x" junk"#),
            [
                ("boundary".to_string(), "a\"b;c".to_string()),
                ("name".into(), "x".into()),
                ("flag".into(), String::new()),
                ("q".into(), "x".into())
            ]
        );
    }
}
