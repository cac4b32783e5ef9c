//! The page behind `GET /dashboard` on the listener, and the HTTP Basic check that guards it.
//! Pure: builds HTML from plain values the caller gathered; runs on the listener's main thread;
//! no Postgres, no I/O, no pgrx.
//!
//! The page holds no script and loads nothing: one inline `<style>`, inline SVG charts that
//! scale with their `viewBox`, and a `data:` favicon so the browser asks for none. It works under
//! [`CONTENT_SECURITY_POLICY`], which the server should send with it (and `Cache-Control:
//! no-store`). Everything that comes from data (the database name, transport names, recipients,
//! responses of remote mail servers, bounce reasons, bucket labels) goes through `Esc`: HTML
//! metacharacters are escaped and control or invisible characters are shown, never obeyed.
//!
//! Every figure carries a hook for tests and scrapers; the text shows numbers with thousands
//! separators, `data-value` holds the raw number:
//! - totals: `[data-metric=sent|delivered|bounced|complained|opened|clicked][data-window=24h|30d]`;
//!   rates: `[data-rate=delivery|bounce|complaint|open|click][data-window=…]` with `data-value`
//!   a fraction 0–1 of sent (no `data-value` and the text `—` when nothing was sent);
//! - charts: `svg[data-chart=hourly|daily]`, in each one `g[data-series=<metric>]` per metric
//!   holding one `circle[data-value][data-bucket]` per bucket, in the order given;
//! - tables: rows `tr[data-transport]` (queue), `tr[data-worker][data-slot]` (workers),
//!   `tr[data-failure]` (failures, `data-failure` is the message id), `tr[data-reason]` (bounce
//!   reasons, the first 300 characters); their cells `td[data-field]`, numeric ones with
//!   `data-value` (ids, slots and PIDs are shown without separators);
//! - header: `[data-field=database]`, `[data-field=generated_at]`, and the pills
//!   `[data-field=delivery_running]`, `[data-field=listener_running]` (`data-value`: how many run).
//!
//! Text longer than fits (responses and bounce reasons past 300 characters, names past 120) is
//! cut with a visible `…` and `(+N characters)`, the whole text in the element's `title`.

use std::fmt::{self, Write as _};

use base64::engine::general_purpose::{GeneralPurpose, GeneralPurposeConfig};
use base64::engine::DecodePaddingMode;
use base64::Engine as _;

/// The `Content-Security-Policy` to send with [`render`] and [`unauthorized`]: nothing may load,
/// only the inline style applies.
pub const CONTENT_SECURITY_POLICY: &str =
    "default-src 'none'; style-src 'unsafe-inline'; img-src data:; base-uri 'none'; form-action 'none'; frame-ancestors 'none'";

/// The `WWW-Authenticate` header that goes with the 401 answer.
pub const WWW_AUTHENTICATE: &str = "Basic realm=\"pg_email dashboard\", charset=\"UTF-8\"";

/// Seconds between reloads of the page (`<meta http-equiv="refresh">`).
const REFRESH_SECS: u32 = 30;

/// Characters of a server response or bounce reason shown before it is cut (the whole text is in
/// the element's `title`).
const SHOWN_CHARS: usize = 300;
/// Characters of a name (database, transport, recipient) shown before it is cut.
const NAME_CHARS: usize = 120;
/// Characters at most in a `title` attribute, so one huge response cannot swell the page.
const TITLE_CHARS: usize = 10_000;
/// Longest `Authorization` header looked at.
const MAX_AUTHORIZATION: usize = 4096;
/// Oldest due age (seconds) shown as a warning in the queue table.
const LATE_SECS: f64 = 300.0;

/// Counts of messages for one bucket or window.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Counts {
    pub sent: u64,
    pub delivered: u64,
    pub bounced: u64,
    pub complained: u64,
    pub opened: u64,
    pub clicked: u64,
}

/// One hour or one day of a chart.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Bucket {
    /// As shown: `"14:00"` for an hour, `"2026-11-30"` for a day (shown as `Nov 30`).
    pub label: String,
    pub counts: Counts,
}

/// The queue of one transport.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct QueueRow {
    pub transport: String,
    pub queued: u64,
    pub due_now: u64,
    pub sending: u64,
    /// How long the oldest due message has been due; `None` when nothing is due.
    pub oldest_due_secs: Option<f64>,
}

/// One background worker: a delivery worker or the listener.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct WorkerRow {
    /// `delivery` or `listener`.
    pub kind: String,
    pub slot: i32,
    /// `None`: not running.
    pub pid: Option<i32>,
    pub state: String,
    pub in_flight: i64,
    pub sent: i64,
    pub failed: i64,
    pub last_activity: Option<String>,
}

/// One recent failure.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Failure {
    pub at: String,
    pub message_id: i64,
    pub transport: String,
    pub recipient: Option<String>,
    /// The receipt event (`bounced`, `failed`, `deferred`, …).
    pub event: String,
    /// The remote server's or provider's answer, as received: hostile input.
    pub response: Option<String>,
}

/// Everything the page shows. The caller passes the buckets oldest first (24 hours, 30 days),
/// the last 20 failures newest first and the top bounce reasons most frequent first; every row
/// given is shown.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Dashboard {
    pub database: String,
    pub generated_at: String,
    pub hourly: Vec<Bucket>,
    pub daily: Vec<Bucket>,
    pub totals_24h: Counts,
    pub totals_30d: Counts,
    pub queue: Vec<QueueRow>,
    pub workers: Vec<WorkerRow>,
    pub failures: Vec<Failure>,
    /// (reason, messages).
    pub bounce_reasons: Vec<(String, u64)>,
}

/// The six counted events, in the order of the page.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Metric {
    Sent,
    Delivered,
    Bounced,
    Complained,
    Opened,
    Clicked,
}

const METRICS: [Metric; 6] =
    [Metric::Sent, Metric::Delivered, Metric::Bounced, Metric::Complained, Metric::Opened, Metric::Clicked];

impl Metric {
    /// The hook name (`data-metric`, `data-series`) and CSS class suffix.
    fn key(self) -> &'static str {
        match self {
            Metric::Sent => "sent",
            Metric::Delivered => "delivered",
            Metric::Bounced => "bounced",
            Metric::Complained => "complained",
            Metric::Opened => "opened",
            Metric::Clicked => "clicked",
        }
    }

    fn label(self) -> &'static str {
        match self {
            Metric::Sent => "Sent",
            Metric::Delivered => "Delivered",
            Metric::Bounced => "Bounced",
            Metric::Complained => "Complained",
            Metric::Opened => "Opened",
            Metric::Clicked => "Clicked",
        }
    }

    /// The rate of this event as a share of sent (`data-rate`); none for sent itself.
    fn rate(self) -> Option<&'static str> {
        match self {
            Metric::Sent => None,
            Metric::Delivered => Some("delivery"),
            Metric::Bounced => Some("bounce"),
            Metric::Complained => Some("complaint"),
            Metric::Opened => Some("open"),
            Metric::Clicked => Some("click"),
        }
    }

    fn of(self, c: &Counts) -> u64 {
        match self {
            Metric::Sent => c.sent,
            Metric::Delivered => c.delivered,
            Metric::Bounced => c.bounced,
            Metric::Complained => c.complained,
            Metric::Opened => c.opened,
            Metric::Clicked => c.clicked,
        }
    }
}

/// Text escaped for HTML, for element content and quoted attribute values alike. Control
/// characters show as their Unicode pictures (`␀`, `␍`, …; a CR before LF is dropped, LF and
/// tab stay), and characters that would hide or reorder text (C1 controls, bidi overrides and
/// isolates, non-characters) show as `�`.
struct Esc<'a>(&'a str);

impl fmt::Display for Esc<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut chars = self.0.chars().peekable();
        while let Some(c) = chars.next() {
            match c {
                '&' => f.write_str("&amp;")?,
                '<' => f.write_str("&lt;")?,
                '>' => f.write_str("&gt;")?,
                '"' => f.write_str("&quot;")?,
                '\'' => f.write_str("&#39;")?,
                '\r' if chars.peek() == Some(&'\n') => {}
                '\n' | '\t' => f.write_char(c)?,
                '\0'..='\x1f' => f.write_char(char::from_u32(0x2400 + u32::from(c)).unwrap_or('\u{fffd}'))?,
                '\x7f' => f.write_char('\u{2421}')?,
                c if hides_text(c) => f.write_char('\u{fffd}')?,
                c => f.write_char(c)?,
            }
        }
        Ok(())
    }
}

/// C1 controls, bidirectional controls and Unicode non-characters.
fn hides_text(c: char) -> bool {
    matches!(c, '\u{80}'..='\u{9f}' | '\u{61c}' | '\u{200e}' | '\u{200f}' | '\u{202a}'..='\u{202e}')
        || matches!(c, '\u{2066}'..='\u{2069}' | '\u{fdd0}'..='\u{fdef}')
        || u32::from(c) & 0xfffe == 0xfffe
}

/// A count with thousands separators: `1,234,567`.
struct Num(u64);

impl fmt::Display for Num {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let digits = self.0.to_string();
        for (i, d) in digits.chars().enumerate() {
            if i > 0 && (digits.len() - i).is_multiple_of(3) {
                f.write_char(',')?;
            }
            f.write_char(d)?;
        }
        Ok(())
    }
}

/// A signed count with thousands separators.
struct Int(i64);

impl fmt::Display for Int {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.0 < 0 {
            f.write_char('-')?;
        }
        Num(self.0.unsigned_abs()).fmt(f)
    }
}

/// `part` as a fraction of `sent`; `None` when nothing was sent.
fn rate(part: u64, sent: u64) -> Option<f64> {
    (sent > 0).then(|| part as f64 / sent as f64)
}

/// Writes a rate cell's content: `<span data-rate=… data-window=… data-value=…>97.50%</span>`.
fn rate_span(o: &mut String, key: &str, window: &str, r: Option<f64>) -> fmt::Result {
    match r {
        Some(r) => {
            write!(o, "<span data-rate=\"{key}\" data-window=\"{window}\" data-value=\"{r}\">{:.2}%</span>", r * 100.0)
        }
        None => write!(o, "<span data-rate=\"{key}\" data-window=\"{window}\" title=\"nothing sent\">—</span>"),
    }
}

/// An age in seconds, in words: `42 s`, `12 min 5 s`, `3 h 12 min`, `2 d 4 h`.
fn age(secs: f64) -> String {
    if !secs.is_finite() {
        return "—".into();
    }
    let s = secs.max(0.0).round() as u64;
    match s {
        0..60 => format!("{s} s"),
        60..3600 => format!("{} min {} s", s / 60, s % 60),
        3600..86400 => format!("{} h {} min", s / 3600, s % 3600 / 60),
        _ => format!("{} d {} h", Num(s / 86400), s % 86400 / 3600),
    }
}

/// The byte offset after the first `n` characters of `s`.
fn char_cut(s: &str, n: usize) -> usize {
    s.char_indices().nth(n).map_or(s.len(), |(i, _)| i)
}

/// The first `n` characters of `s` (for short fields that have no room for a cut marker).
fn first(s: &str, n: usize) -> &str {
    s.get(..char_cut(s, n)).unwrap_or(s)
}

/// Writes `s` escaped in a `<span class=…>`. Past `max` characters it is cut with a visible `…`
/// and the count of characters left out; the whole text (up to [`TITLE_CHARS`]) is then in the
/// span's `title`.
fn clipped(o: &mut String, class: &str, s: &str, max: usize) -> fmt::Result {
    let cut = char_cut(s, max);
    if cut == s.len() {
        return write!(o, "<span class=\"{class}\">{}</span>", Esc(s));
    }
    let left_out = s.get(cut..).unwrap_or_default().chars().count();
    let title_cut = char_cut(s, TITLE_CHARS);
    let more = if title_cut < s.len() { "…" } else { "" };
    write!(
        o,
        "<span class=\"{class} clipped\" title=\"{}{more}\">{}…<span class=\"more\"> (+{} characters)</span></span>",
        Esc(s.get(..title_cut).unwrap_or_default()),
        Esc(s.get(..cut).unwrap_or_default()),
        Num(left_out as u64)
    )
}

/// `2026-11-30` → `Nov 30`; any other label is kept.
fn short_label(label: &str) -> String {
    const MONTHS: [&str; 12] = ["Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec"];
    let b = label.as_bytes();
    let is_date = b.len() == 10
        && b[4] == b'-'
        && b[7] == b'-'
        && b.iter().enumerate().all(|(i, c)| i == 4 || i == 7 || c.is_ascii_digit());
    if is_date {
        let month: usize = label.get(5..7).and_then(|m| m.parse().ok()).unwrap_or(0);
        let day: u32 = label.get(8..10).and_then(|d| d.parse().ok()).unwrap_or(0);
        if let Some(m) = month.checked_sub(1).and_then(|m| MONTHS.get(m)) {
            return format!("{m} {day}");
        }
    }
    label.chars().take(16).collect()
}

/// `Basic <base64 of user:password>` matching `user` and `password`. The comparison takes time
/// that depends only on the expected credentials. Refuses a missing or malformed header, another
/// scheme, invalid base64, and everything when `password` is empty or `user` holds a colon (a
/// dashboard without a password is closed, not open).
pub fn check_basic_auth(authorization: Option<&str>, user: &str, password: &str) -> bool {
    const LENIENT: GeneralPurpose = GeneralPurpose::new(
        &base64::alphabet::STANDARD,
        GeneralPurposeConfig::new().with_decode_padding_mode(DecodePaddingMode::Indifferent),
    );
    if password.is_empty() || user.contains(':') {
        return false;
    }
    let Some(header) = authorization.filter(|h| h.len() <= MAX_AUTHORIZATION) else {
        return false;
    };
    let Some((scheme, credentials)) = header.trim().split_once(' ') else {
        return false;
    };
    if !scheme.eq_ignore_ascii_case("basic") {
        return false;
    }
    let Ok(given) = LENIENT.decode(credentials.trim()) else {
        return false;
    };
    let expected = format!("{user}:{password}");
    ct_eq(&given, expected.as_bytes())
}

/// Equality in time that depends only on the length of `expected`.
fn ct_eq(given: &[u8], expected: &[u8]) -> bool {
    let mut diff = u8::from(given.len() != expected.len());
    for (i, e) in expected.iter().enumerate() {
        diff |= given.get(i).copied().unwrap_or(!e) ^ e;
    }
    std::hint::black_box(diff) == 0
}

/// The 401 page: no data, no database name.
pub fn unauthorized() -> String {
    let mut o = String::with_capacity(4096);
    let _ = head(&mut o, "pg_email dashboard: sign in", false);
    o.push_str(concat!(
        "<main class=\"narrow\"><section class=\"card\"><h1>401: sign in needed</h1>",
        "<p>The pg_email dashboard needs HTTP Basic credentials: the user <code>admin</code> and the ",
        "password set in <code>pg_email.dashboard_password</code>.</p>",
        "<p class=\"sub\">Reload the page to try again.</p></section></main></body></html>\n"
    ));
    o
}

/// The dashboard page.
pub fn render(d: &Dashboard) -> String {
    let mut o = String::with_capacity(64 * 1024);
    // Writing to a String cannot fail.
    let _ = page(&mut o, d);
    o
}

const STYLE: &str = r#"
:root{color-scheme:light dark;--bg:#f4f5f7;--card:#fff;--fg:#1c2127;--muted:#5c6672;--line:#dfe3e8;--grid:#eceff2;--axis:#8d96a0;--ok:#1d6b3a;--okbg:#e2f3e7;--bad:#a8251c;--badbg:#fce6e4;--warn:#6f4c00;--warnbg:#fff1cc;
--c-sent:#4a5562;--c-delivered:#009e73;--c-bounced:#d55e00;--c-complained:#cc79a7;--c-opened:#0072b2;--c-clicked:#e69f00}
@media (prefers-color-scheme:dark){:root{--bg:#111417;--card:#1a1e23;--fg:#e5e8ec;--muted:#9aa4ae;--line:#2d333b;--grid:#252a31;--axis:#5f6873;--ok:#7fd3a0;--okbg:#16301f;--bad:#ff9b90;--badbg:#3a1c19;--warn:#f1c96b;--warnbg:#382c10;--c-sent:#c3cbd4;--c-opened:#56b4e9}}
*{box-sizing:border-box}
body{margin:0;background:var(--bg);color:var(--fg);font:14px/1.45 system-ui,-apple-system,"Segoe UI",Roboto,"Helvetica Neue",Arial,sans-serif;-webkit-text-size-adjust:100%;text-size-adjust:100%}
main{max-width:1280px;margin:0 auto;padding:16px}
main.narrow{max-width:560px;padding-top:12vh}
header{display:flex;flex-wrap:wrap;gap:8px 24px;align-items:flex-end;justify-content:space-between;margin:0 0 16px}
h1{font-size:20px;margin:0 0 2px;overflow-wrap:anywhere}
h2{font-size:15px;margin:0 0 10px}
h3{font-size:12px;margin:0;color:var(--muted);font-weight:600;text-transform:uppercase;letter-spacing:.04em}
p{margin:0}
code{font:13px ui-monospace,SFMono-Regular,Menlo,Consolas,monospace}
.sub{color:var(--muted);font-size:13px;overflow-wrap:anywhere}
.status{display:flex;flex-wrap:wrap;gap:6px}
.pill,.badge{display:inline-block;border-radius:999px;padding:2px 10px;font-size:12px;font-weight:600;background:var(--grid);color:var(--fg);white-space:nowrap}
.badge{padding:1px 8px;font-weight:500;max-width:100%;overflow:hidden;text-overflow:ellipsis;vertical-align:top}
.ok{background:var(--okbg);color:var(--ok)}.bad{background:var(--badbg);color:var(--bad)}.warn{background:var(--warnbg);color:var(--warn)}
.tiles{display:grid;gap:12px;grid-template-columns:repeat(auto-fit,minmax(150px,1fr));margin:0 0 16px}
.tile{background:var(--card);border:1px solid var(--line);border-top:4px solid var(--c);border-radius:10px;padding:10px 14px 12px;min-width:0}
.tile .big{font-size:26px;font-weight:650;line-height:1.2;margin:4px 0 2px;font-variant-numeric:tabular-nums;overflow-wrap:anywhere}
.tile .rate,.tile .win{font-size:13px;color:var(--muted);font-variant-numeric:tabular-nums}
.tile .rate span,.tile .win span{color:var(--fg);font-weight:600}
.grid{display:grid;gap:16px;grid-template-columns:repeat(auto-fit,minmax(min(100%,520px),1fr));margin:0 0 16px}
.card{background:var(--card);border:1px solid var(--line);border-radius:10px;padding:14px 16px;min-width:0;margin:0 0 16px}
.grid>.card{margin:0}
figure{margin:0}
.legend{display:flex;flex-wrap:wrap;gap:4px 14px;list-style:none;margin:0 0 6px;padding:0;font-size:12px;color:var(--muted)}
.legend li{display:flex;align-items:center;gap:5px}
.legend line{stroke:var(--c);stroke-width:2.5}.legend circle{fill:var(--c)}
svg.chart{display:block;width:100%;height:auto;max-width:760px;margin:0 auto}
.chart text{font-size:13px;fill:var(--muted);font-variant-numeric:tabular-nums}
.chart .gl{stroke:var(--grid);stroke-width:1px;vector-effect:non-scaling-stroke}
.chart .base,.chart .tick{stroke:var(--axis);stroke-width:1px;vector-effect:non-scaling-stroke}
.chart .yl{paint-order:stroke;stroke:var(--card);stroke-width:4px;stroke-linejoin:round}
.chart .nodata{font-size:16px;fill:var(--muted)}
.s polyline{fill:none;stroke:var(--c);stroke-width:2px;stroke-linejoin:round;stroke-linecap:round;vector-effect:non-scaling-stroke}
.s circle{fill:var(--c);stroke:var(--card);stroke-width:1px;vector-effect:non-scaling-stroke}
.s circle:hover{r:6px}
.s-sent polyline{stroke-width:2.5px}
.s-complained polyline,.legend .s-complained line{stroke-dasharray:6 4}
.s-clicked polyline,.legend .s-clicked line{stroke-dasharray:2 3}
.s-sent{--c:var(--c-sent)}.s-delivered{--c:var(--c-delivered)}.s-bounced{--c:var(--c-bounced)}.s-complained{--c:var(--c-complained)}.s-opened{--c:var(--c-opened)}.s-clicked{--c:var(--c-clicked)}
details{margin-top:8px;font-size:13px}
summary{cursor:pointer;color:var(--muted)}
.scroll{overflow-x:auto}
table{border-collapse:collapse;width:100%;font-variant-numeric:tabular-nums}
th,td{text-align:left;padding:6px 8px;border-bottom:1px solid var(--line);vertical-align:top}
thead th{font-size:12px;font-weight:600;color:var(--muted);white-space:nowrap}
tbody tr:last-child>*{border-bottom:0}
.n{text-align:right;white-space:nowrap}
.nowrap{white-space:nowrap}
td.name{overflow-wrap:anywhere;min-width:9em}
td.response{min-width:18em}
.empty{color:var(--muted);padding:8px 0}
.resp{display:block;white-space:pre-wrap;overflow-wrap:anywhere;overflow:hidden;font:12px/1.45 ui-monospace,SFMono-Regular,Menlo,Consolas,monospace}
.more{color:var(--muted);font-style:italic}
.clipped{cursor:help}
td.reason{width:100%;min-width:12em}
.bar{height:6px;border-radius:3px;background:var(--grid);margin-top:4px;min-width:40px}
.bar span{display:block;height:100%;border-radius:3px;background:var(--c-bounced)}
@media (max-width:560px){
main{padding:10px}
.tile .big{font-size:22px}
.chart text{font-size:22px}.chart .nodata{font-size:26px}.chart .minor{display:none}
table.stack,table.stack tbody{display:block}
table.stack thead{display:none}
table.stack tr{display:block;border-bottom:1px solid var(--line);padding:6px 0}
table.stack tbody tr:last-child{border-bottom:0}
table.stack td{display:flex;gap:10px;border:0;padding:2px 0;text-align:left;white-space:normal}
table.stack td::before{content:attr(data-label);flex:0 0 76px;color:var(--muted);font-size:12px}
table.stack td>*{min-width:0}
table.stack td.name,table.stack td.response{min-width:0}
}
"#;

/// `<!doctype html>` up to and including `<body>`.
fn head(o: &mut String, title: &str, refresh: bool) -> fmt::Result {
    o.push_str("<!doctype html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">\n");
    o.push_str("<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">\n");
    if refresh {
        writeln!(o, "<meta http-equiv=\"refresh\" content=\"{REFRESH_SECS}\">")?;
    }
    o.push_str(
        "<meta name=\"robots\" content=\"noindex, nofollow\"><meta name=\"referrer\" content=\"no-referrer\">\n",
    );
    o.push_str("<meta name=\"color-scheme\" content=\"light dark\"><link rel=\"icon\" href=\"data:,\">\n");
    writeln!(o, "<title>{}</title>", Esc(title))?;
    writeln!(o, "<style>{STYLE}</style></head><body>")
}

fn page(o: &mut String, d: &Dashboard) -> fmt::Result {
    let db: String = d.database.chars().take(NAME_CHARS).collect();
    head(o, &format!("pg_email dashboard · {db}"), true)?;
    o.push_str(
        "<main>\n<header><div><h1>pg_email dashboard</h1><p class=\"sub\">Database <strong data-field=\"database\">",
    );
    clipped(o, "db", &d.database, NAME_CHARS)?;
    write!(
        o,
        "</strong> · generated <span data-field=\"generated_at\">{}</span> · reloads every {REFRESH_SECS} s</p></div>",
        Esc(first(&d.generated_at, 40))
    )?;
    status(o, &d.workers)?;
    o.push_str("</header>\n");
    tiles(o, d)?;
    o.push_str("<div class=\"grid\">\n");
    chart(o, &HOURLY, &d.hourly)?;
    chart(o, &DAILY, &d.daily)?;
    o.push_str("</div>\n<div class=\"grid\">\n");
    queue(o, &d.queue)?;
    bounce_reasons(o, &d.bounce_reasons)?;
    o.push_str("</div>\n");
    workers(o, &d.workers)?;
    failures(o, &d.failures)?;
    o.push_str("</main>\n</body></html>\n");
    Ok(())
}

/// Pills in the header: how many delivery workers run, and whether the listener does.
fn status(o: &mut String, workers: &[WorkerRow]) -> fmt::Result {
    let count = |kind: &str| {
        let of_kind = workers.iter().filter(|w| w.kind == kind);
        (of_kind.clone().count(), of_kind.filter(|w| w.pid.is_some()).count())
    };
    o.push_str("<div class=\"status\">");
    let (total, running) = count("delivery");
    let class = if running == 0 {
        "bad"
    } else if running < total {
        "warn"
    } else {
        "ok"
    };
    write!(
        o,
        "<span class=\"pill {class}\" data-field=\"delivery_running\" data-value=\"{running}\">Delivery workers: {running} of {total} running</span>"
    )?;
    let (total, running) = count("listener");
    let (class, text) = match (total, running) {
        (0, _) => ("", "not reported"),
        (_, 0) => ("bad", "not running"),
        _ => ("ok", "running"),
    };
    write!(
        o,
        "<span class=\"pill {class}\" data-field=\"listener_running\" data-value=\"{running}\">Listener: {text}</span>"
    )?;
    o.push_str("</div>");
    Ok(())
}

/// One tile per event: the last 24 hours large, with its rate, and the last 30 days below.
fn tiles(o: &mut String, d: &Dashboard) -> fmt::Result {
    o.push_str("<section class=\"tiles\" aria-label=\"Totals\">\n");
    for m in METRICS {
        let (key, h, t) = (m.key(), &d.totals_24h, &d.totals_30d);
        write!(o, "<div class=\"tile s-{key}\"><h3>{}</h3>", m.label())?;
        write!(
            o,
            "<p class=\"big\"><span data-metric=\"{key}\" data-window=\"24h\" data-value=\"{}\">{}</span></p>",
            m.of(h),
            Num(m.of(h))
        )?;
        o.push_str("<p class=\"rate\">");
        match m.rate() {
            Some(r) => {
                rate_span(o, r, "24h", rate(m.of(h), h.sent))?;
                o.push_str(" of sent, 24 h");
            }
            None => o.push_str("last 24 h"),
        }
        write!(
            o,
            "</p><p class=\"win\">30 d: <span data-metric=\"{key}\" data-window=\"30d\" data-value=\"{}\">{}</span>",
            m.of(t),
            Num(m.of(t))
        )?;
        if let Some(r) = m.rate() {
            o.push_str(" · ");
            rate_span(o, r, "30d", rate(m.of(t), t.sent))?;
        }
        o.push_str("</p></div>\n");
    }
    o.push_str("</section>\n");
    Ok(())
}

/// What differs between the two charts.
struct ChartKind {
    key: &'static str,
    heading: &'static str,
    per: &'static str,
}

const HOURLY: ChartKind = ChartKind { key: "hourly", heading: "Last 24 hours", per: "hour" };
const DAILY: ChartKind = ChartKind { key: "daily", heading: "Last 30 days", per: "day" };

/// Chart geometry, in `viewBox` units. The SVG scales with its box; text is 13 units on wide
/// screens and 22 on narrow ones, where the x labels that would crowd are hidden (class `minor`).
const W: f64 = 600.0;
const H: f64 = 300.0;
const PAD_X: f64 = 30.0;
const PAD_TOP: f64 = 30.0;
const PAD_BOTTOM: f64 = 36.0;
const FONT_WIDE: f64 = 13.0;
const FONT_NARROW: f64 = 22.0;

/// The step between gridlines and the top of the y axis: steps of 1, 2 or 5 × 10ⁿ, at most five
/// of them up to a top at or above `max`.
fn y_scale(max: u64) -> (u64, u64) {
    let want = max.div_ceil(5).max(1);
    let mut pow: u64 = 1;
    loop {
        for m in [1, 2, 5] {
            if let Some(step) = pow.checked_mul(m).filter(|s| *s >= want) {
                return (step, max.div_ceil(step).max(1).saturating_mul(step));
            }
        }
        match pow.checked_mul(10) {
            Some(p) => pow = p,
            None => return (want, max.max(1)),
        }
    }
}

/// Every how many buckets an x label fits, for labels of `chars` characters in `font`.
fn label_every(chars: usize, font: f64, bucket_width: f64) -> usize {
    ((chars as f64 * 0.6 * font + 10.0) / bucket_width).ceil().max(1.0) as usize
}

/// A multi-line chart of the six events over `buckets`, with its legend and, folded, the same
/// figures as a table.
fn chart(o: &mut String, kind: &ChartKind, buckets: &[Bucket]) -> fmt::Result {
    let (key, per, n) = (kind.key, kind.per, buckets.len());
    let max = buckets.iter().flat_map(|b| METRICS.map(|m| m.of(&b.counts))).max().unwrap_or(0);
    let (step, top) = y_scale(max);
    let bottom = H - PAD_BOTTOM;
    let plot_h = bottom - PAD_TOP;
    let bucket_w = (W - 2.0 * PAD_X) / n.max(1) as f64;
    let x = |i: usize| PAD_X + (i as f64 + 0.5) * bucket_w;
    let y = |v: u64| bottom - (v as f64 / top as f64).min(1.0) * plot_h;
    let title = format!("Messages per {per}, {}", kind.heading.to_lowercase());

    write!(o, "<figure class=\"card\"><h2 id=\"{key}-h\">{}, per {per}</h2>\n<ul class=\"legend\">", kind.heading)?;
    for m in METRICS {
        write!(
            o,
            "<li class=\"s-{}\"><svg viewBox=\"0 0 26 10\" width=\"26\" height=\"10\" aria-hidden=\"true\"><line x1=\"1\" y1=\"5\" x2=\"25\" y2=\"5\"/><circle cx=\"13\" cy=\"5\" r=\"3\"/></svg>{}</li>",
            m.key(),
            m.label()
        )?;
    }
    o.push_str("</ul>\n");
    write!(
        o,
        "<svg class=\"chart\" data-chart=\"{key}\" viewBox=\"0 0 {W} {H}\" role=\"img\" aria-label=\"{title}\" aria-describedby=\"{key}-desc\">\n<title>{title}</title>\n<desc id=\"{key}-desc\">"
    )?;
    match (buckets.first(), buckets.last()) {
        (Some(first), Some(last)) => write!(
            o,
            "Lines for sent, delivered, bounced, complained, opened and clicked messages in {n} buckets from {} to {}; the largest count is {}. The table below the chart lists every value.",
            Esc(&first.label),
            Esc(&last.label),
            Num(max)
        )?,
        _ => o.push_str("No data."),
    }
    o.push_str("</desc>\n<g class=\"axis\">");

    // With nothing to show, only the zero line.
    let mut v = 0;
    while v <= top && (v == 0 || max > 0) {
        let gy = y(v);
        let class = if v == 0 { "base" } else { "gl" };
        write!(o, "<line class=\"{class}\" x1=\"{PAD_X}\" y1=\"{gy:.1}\" x2=\"{}\" y2=\"{gy:.1}\"/>", W - PAD_X)?;
        write!(o, "<text class=\"yl\" x=\"{PAD_X}\" y=\"{:.1}\">{}</text>", gy - 5.0, Num(v))?;
        match v.checked_add(step) {
            Some(next) => v = next,
            None => break,
        }
    }
    let labels: Vec<String> = buckets.iter().map(|b| short_label(&b.label)).collect();
    let chars = labels.iter().map(|l| l.chars().count()).max().unwrap_or(0);
    let wide = label_every(chars, FONT_WIDE, bucket_w);
    let narrow = wide * label_every(chars, FONT_NARROW, bucket_w).div_ceil(wide);
    for (i, label) in labels.iter().enumerate() {
        // Counted from the newest bucket, which always has its label.
        let from_end = n - 1 - i;
        if from_end % wide != 0 {
            continue;
        }
        let minor = if from_end % narrow == 0 { "" } else { " minor" };
        let lx = x(i);
        write!(
            o,
            "<line class=\"tick{minor}\" x1=\"{lx:.1}\" y1=\"{bottom}\" x2=\"{lx:.1}\" y2=\"{}\"/>",
            bottom + 5.0
        )?;
        write!(
            o,
            "<text class=\"xl{minor}\" x=\"{lx:.1}\" y=\"{}\" text-anchor=\"middle\">{}</text>",
            H - 6.0,
            Esc(label)
        )?;
    }
    o.push_str("</g>\n");

    for m in METRICS {
        write!(o, "<g class=\"s s-{0}\" data-series=\"{0}\">", m.key())?;
        if n > 1 {
            o.push_str("<polyline points=\"");
            for (i, b) in buckets.iter().enumerate() {
                let sep = if i == 0 { "" } else { " " };
                write!(o, "{sep}{:.1},{:.1}", x(i), y(m.of(&b.counts)))?;
            }
            o.push_str("\"/>");
        }
        for (i, b) in buckets.iter().enumerate() {
            let v = m.of(&b.counts);
            write!(
                o,
                "<circle cx=\"{:.1}\" cy=\"{:.1}\" r=\"3\" data-value=\"{v}\" data-bucket=\"{}\"><title>{} · {}: {}</title></circle>",
                x(i),
                y(v),
                Esc(&b.label),
                Esc(&b.label),
                m.label(),
                Num(v)
            )?;
        }
        o.push_str("</g>\n");
    }
    if max == 0 {
        let text = if n == 0 { "No data for this period" } else { "No messages in this period" };
        write!(
            o,
            "<text class=\"nodata\" x=\"{}\" y=\"{:.1}\" text-anchor=\"middle\">{text}</text>",
            W / 2.0,
            PAD_TOP + plot_h / 2.0
        )?;
    }
    o.push_str("</svg>\n");

    write!(
        o,
        "<details><summary>Show as a table</summary><div class=\"scroll\"><table><thead><tr><th>{}</th>",
        capitalized(per)
    )?;
    for m in METRICS {
        write!(o, "<th class=\"n\">{}</th>", m.label())?;
    }
    o.push_str("</tr></thead><tbody>");
    for b in buckets {
        write!(o, "<tr><td class=\"nowrap\">{}</td>", Esc(&b.label))?;
        for m in METRICS {
            write!(o, "<td class=\"n\">{}</td>", Num(m.of(&b.counts)))?;
        }
        o.push_str("</tr>");
    }
    o.push_str("</tbody></table></div></details></figure>\n");
    Ok(())
}

fn capitalized(s: &str) -> String {
    let mut c = s.chars();
    c.next().map(|f| f.to_uppercase().chain(c).collect()).unwrap_or_default()
}

fn queue(o: &mut String, rows: &[QueueRow]) -> fmt::Result {
    o.push_str("<section class=\"card\"><h2>Queue</h2>");
    if rows.is_empty() {
        o.push_str("<p class=\"empty\">No transports, nothing queued.</p></section>\n");
        return Ok(());
    }
    o.push_str(concat!(
        "<div class=\"scroll\"><table><thead><tr><th>Transport</th><th class=\"n\">Queued</th>",
        "<th class=\"n\">Due now</th><th class=\"n\">Sending</th><th class=\"n\">Oldest due</th></tr></thead><tbody>\n"
    ));
    for r in rows {
        write!(o, "<tr data-transport=\"{}\"><td class=\"name\" data-field=\"transport\">", Esc(&r.transport))?;
        clipped(o, "t", &r.transport, NAME_CHARS)?;
        o.push_str("</td>");
        for (field, v) in [("queued", r.queued), ("due_now", r.due_now), ("sending", r.sending)] {
            write!(o, "<td class=\"n\" data-field=\"{field}\" data-value=\"{v}\">{}</td>", Num(v))?;
        }
        match r.oldest_due_secs.filter(|s| s.is_finite()) {
            Some(s) => {
                let late = if s >= LATE_SECS { " <span class=\"badge warn\">late</span>" } else { "" };
                write!(o, "<td class=\"n\" data-field=\"oldest_due\" data-value=\"{s}\">{}{late}</td>", age(s))?;
            }
            None => o.push_str("<td class=\"n\" data-field=\"oldest_due\">—</td>"),
        }
        o.push_str("</tr>\n");
    }
    o.push_str("</tbody></table></div></section>\n");
    Ok(())
}

fn bounce_reasons(o: &mut String, reasons: &[(String, u64)]) -> fmt::Result {
    o.push_str("<section class=\"card\"><h2>Top bounce reasons</h2>");
    if reasons.is_empty() {
        o.push_str("<p class=\"empty\">No bounces.</p></section>\n");
        return Ok(());
    }
    let most = reasons.iter().map(|(_, n)| *n).max().unwrap_or(0).max(1);
    o.push_str(
        "<div class=\"scroll\"><table><thead><tr><th>Reason</th><th class=\"n\">Messages</th></tr></thead><tbody>\n",
    );
    for (reason, count) in reasons {
        write!(
            o,
            "<tr data-reason=\"{}\"><td class=\"reason\" data-field=\"reason\">",
            Esc(first(reason, SHOWN_CHARS))
        )?;
        clipped(o, "resp", reason, SHOWN_CHARS)?;
        let share = *count as f64 / most as f64 * 100.0;
        writeln!(
            o,
            "<div class=\"bar\" aria-hidden=\"true\"><span style=\"width:{share:.1}%\"></span></div></td><td class=\"n\" data-field=\"count\" data-value=\"{count}\">{}</td></tr>",
            Num(*count)
        )?;
    }
    o.push_str("</tbody></table></div></section>\n");
    Ok(())
}

/// The badge class of a worker's state: not running or a failing state is `bad`.
fn state_class(w: &WorkerRow) -> &'static str {
    let s = w.state.to_ascii_lowercase();
    let failing = ["stop", "dead", "crash", "fail", "exit", "error", "down"].iter().any(|b| s.contains(b));
    if w.pid.is_none() || failing {
        "bad"
    } else {
        "ok"
    }
}

fn workers(o: &mut String, rows: &[WorkerRow]) -> fmt::Result {
    o.push_str("<section class=\"card\"><h2>Workers</h2>");
    if rows.is_empty() {
        o.push_str("<p class=\"empty\">No worker is running or registered.</p></section>\n");
        return Ok(());
    }
    o.push_str(concat!(
        "<div class=\"scroll\"><table><thead><tr><th>Kind</th><th class=\"n\">Slot</th><th class=\"n\">PID</th>",
        "<th>State</th><th class=\"n\">In flight</th><th class=\"n\">Sent</th><th class=\"n\">Failed</th>",
        "<th>Last activity</th></tr></thead><tbody>\n"
    ));
    for w in rows {
        let kind = Esc(&w.kind);
        write!(o, "<tr data-worker=\"{kind}\" data-slot=\"{}\"><td data-field=\"kind\">{kind}</td>", w.slot)?;
        write!(o, "<td class=\"n\" data-field=\"slot\" data-value=\"{0}\">{0}</td>", w.slot)?;
        match w.pid {
            Some(pid) => write!(o, "<td class=\"n\" data-field=\"pid\" data-value=\"{pid}\">{pid}</td>")?,
            None => o.push_str("<td class=\"n\" data-field=\"pid\">—</td>"),
        }
        write!(o, "<td data-field=\"state\"><span class=\"badge {}\">", state_class(w))?;
        clipped(o, "st", &w.state, 60)?;
        o.push_str("</span></td>");
        for (field, v) in [("in_flight", w.in_flight), ("sent", w.sent), ("failed", w.failed)] {
            write!(o, "<td class=\"n\" data-field=\"{field}\" data-value=\"{v}\">{}</td>", Int(v))?;
        }
        writeln!(
            o,
            "<td class=\"nowrap\" data-field=\"last_activity\">{}</td></tr>",
            Esc(first(w.last_activity.as_deref().unwrap_or("—"), 40))
        )?;
    }
    o.push_str("</tbody></table></div></section>\n");
    Ok(())
}

/// The badge class of a failure's event.
fn event_class(event: &str) -> &'static str {
    match event {
        "deferred" | "retry" | "retrying" | "delayed" => "warn",
        _ => "bad",
    }
}

fn failures(o: &mut String, rows: &[Failure]) -> fmt::Result {
    o.push_str("<section class=\"card\"><h2>Last failures</h2>");
    if rows.is_empty() {
        o.push_str("<p class=\"empty\">No failures.</p></section>\n");
        return Ok(());
    }
    o.push_str(concat!(
        "<div class=\"scroll\"><table class=\"stack\"><thead><tr><th>When</th><th class=\"n\">Message</th>",
        "<th>Transport</th><th>Recipient</th><th>Event</th><th>Response</th></tr></thead><tbody>\n"
    ));
    for f in rows {
        write!(
            o,
            "<tr data-failure=\"{0}\"><td class=\"nowrap\" data-label=\"When\" data-field=\"at\">{1}</td><td class=\"n\" data-label=\"Message\" data-field=\"message_id\" data-value=\"{0}\">{0}</td><td class=\"name\" data-label=\"Transport\" data-field=\"transport\">",
            f.message_id,
            Esc(first(&f.at, 40))
        )?;
        clipped(o, "t", &f.transport, NAME_CHARS)?;
        o.push_str("</td><td class=\"name\" data-label=\"Recipient\" data-field=\"recipient\">");
        match &f.recipient {
            Some(r) => clipped(o, "r", r, NAME_CHARS)?,
            None => o.push('—'),
        }
        write!(
            o,
            "</td><td data-label=\"Event\" data-field=\"event\"><span class=\"badge {}\">{}</span></td><td class=\"response\" data-label=\"Response\" data-field=\"response\">",
            event_class(&f.event),
            Esc(first(&f.event, 40))
        )?;
        match &f.response {
            Some(r) => clipped(o, "resp", r, SHOWN_CHARS)?,
            None => o.push_str("<span class=\"more\">no response</span>"),
        }
        o.push_str("</td></tr>\n");
    }
    o.push_str("</tbody></table></div></section>\n");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every string field set to `s`, with small non-zero figures everywhere.
    fn filled_with(s: &str) -> Dashboard {
        let c = Counts { sent: 10, delivered: 9, bounced: 1, complained: 1, opened: 4, clicked: 2 };
        Dashboard {
            database: s.into(),
            generated_at: s.into(),
            hourly: vec![Bucket { label: s.into(), counts: c }; 24],
            daily: vec![Bucket { label: s.into(), counts: c }; 30],
            totals_24h: c,
            totals_30d: c,
            queue: vec![QueueRow {
                transport: s.into(),
                queued: 1,
                due_now: 1,
                sending: 0,
                oldest_due_secs: Some(1.0),
            }],
            workers: vec![WorkerRow {
                kind: s.into(),
                slot: 0,
                pid: Some(1),
                state: s.into(),
                in_flight: 0,
                sent: 1,
                failed: 0,
                last_activity: Some(s.into()),
            }],
            failures: vec![Failure {
                at: s.into(),
                message_id: 7,
                transport: s.into(),
                recipient: Some(s.into()),
                event: s.into(),
                response: Some(s.into()),
            }],
            bounce_reasons: vec![(s.into(), 3)],
        }
    }

    fn counts(n: u64) -> Counts {
        Counts { sent: n * 100, delivered: n * 97, bounced: n * 2, complained: n, opened: n * 40, clicked: n * 7 }
    }

    fn sample() -> Dashboard {
        Dashboard {
            database: "mail_prod".into(),
            generated_at: "2026-12-19 13:42:07 UTC".into(),
            hourly: (0..24)
                .map(|i| Bucket { label: format!("{:02}:00", (14 + i) % 24), counts: counts(i + 1) })
                .collect(),
            daily: (0..30)
                .map(|i| Bucket { label: format!("2026-12-{:02}", i % 28 + 1), counts: counts(100 + i) })
                .collect(),
            totals_24h: Counts {
                sent: 1_234_567,
                delivered: 1_200_000,
                bounced: 20_000,
                complained: 123,
                opened: 500_000,
                clicked: 0,
            },
            totals_30d: Counts { sent: 0, ..Counts::default() },
            queue: vec![QueueRow {
                transport: "ses-eu".into(),
                queued: 1284,
                due_now: 312,
                sending: 20,
                oldest_due_secs: Some(74.5),
            }],
            workers: vec![WorkerRow {
                kind: "delivery".into(),
                slot: 1,
                pid: Some(4242),
                state: "sending".into(),
                in_flight: 12,
                sent: 184_220,
                failed: -3,
                last_activity: Some("13:42:06".into()),
            }],
            failures: vec![Failure {
                at: "13:41:55".into(),
                message_id: 9_812_331,
                transport: "smtp-relay".into(),
                recipient: Some("jane@example.com".into()),
                event: "bounced".into(),
                response: Some("550 5.1.1 user unknown".into()),
            }],
            bounce_reasons: vec![("550 5.1.1 user unknown".into(), 1912), ("552 mailbox full".into(), 7)],
        }
    }

    /// The text between the first `start` and the next `end` after it.
    fn between<'a>(s: &'a str, start: &str, end: &str) -> &'a str {
        let from = s.find(start).unwrap_or_else(|| panic!("{start:?} not in the page")) + start.len();
        let rest = &s[from..];
        &rest[..rest.find(end).unwrap_or_else(|| panic!("{end:?} not after {start:?}"))]
    }

    /// The values of every `name="…"` attribute in `s`, in order.
    fn attrs(s: &str, name: &str) -> Vec<String> {
        let key = format!(" {name}=\"");
        s.match_indices(&key)
            .map(|(i, _)| {
                let v = &s[i + key.len()..];
                v[..v.find('"').unwrap_or(0)].to_string()
            })
            .collect()
    }

    /// The element whose opening tag starts with `open` (up to its first `>`), and its text up
    /// to the next `<`.
    fn text_of<'a>(page: &'a str, open: &str) -> &'a str {
        let at = page.find(open).unwrap_or_else(|| panic!("{open:?} not in the page"));
        let rest = &page[at..];
        let start = rest.find('>').unwrap_or(0) + 1;
        &rest[start..start + rest[start..].find('<').unwrap_or(0)]
    }

    /// The attribute names of every tag in `page`; data never adds a tag (it has no raw `<`), so
    /// these are the template's.
    fn attribute_names(page: &str) -> std::collections::BTreeSet<String> {
        let mut names = std::collections::BTreeSet::new();
        let body = &page[page.find("</style>").unwrap_or(0)..];
        for tag in body.split('<').skip(1) {
            let tag = &tag[..tag.find('>').unwrap_or(tag.len())];
            let mut rest = tag.trim_start_matches(|c: char| c != ' ');
            loop {
                rest = rest.trim_start_matches([' ', '/']);
                let end = rest.find(['=', ' ']).unwrap_or(rest.len());
                if end == 0 {
                    break;
                }
                names.insert(rest[..end].to_string());
                rest = &rest[end..];
                if let Some(value) = rest.strip_prefix("=\"") {
                    rest = &value[value.find('"').map_or(value.len(), |i| i + 1)..];
                }
            }
        }
        names
    }

    const KNOWN_ATTRIBUTES: &[&str] = &[
        "aria-describedby",
        "aria-hidden",
        "aria-label",
        "charset",
        "class",
        "content",
        "cx",
        "cy",
        "data-bucket",
        "data-chart",
        "data-failure",
        "data-field",
        "data-label",
        "data-metric",
        "data-rate",
        "data-reason",
        "data-series",
        "data-slot",
        "data-transport",
        "data-value",
        "data-window",
        "data-worker",
        "height",
        "href",
        "http-equiv",
        "id",
        "lang",
        "name",
        "points",
        "r",
        "rel",
        "role",
        "style",
        "text-anchor",
        "title",
        "viewBox",
        "width",
        "x",
        "x1",
        "x2",
        "y",
        "y1",
        "y2",
    ];

    const HOSTILE: &str = "<script>alert(1)</script>\"' onload=\"alert(2)\" & <img src=x onerror=alert(3)> </td></table><svg onload=alert(4)>";

    #[test]
    fn data_is_escaped_everywhere() {
        let page = render(&filled_with(HOSTILE));
        assert!(!page.contains("<script"), "a raw <script> tag");
        assert!(!page.contains("<img"));
        assert!(!page.contains("<svg onload"));
        assert!(!page.contains("\" onload=\"alert"), "a quote broke out of an attribute");
        assert!(!page.contains("</td></table><"));
        assert!(
            page.contains("&lt;script&gt;alert(1)&lt;/script&gt;&quot;&#39; onload=&quot;alert(2)&quot; &amp; &lt;img")
        );
        // Every string field shows up escaped: page title, database, generated_at, bucket labels,
        // transport, worker kind/state/activity, failure fields, bounce reason.
        assert!(page.matches("&lt;script&gt;alert(1)").count() > 24 + 30 + 10);
        // All markup is balanced: data opened or closed nothing.
        for (open, close) in
            [("<tr", "</tr>"), ("<td", "</td>"), ("<table", "</table>"), ("<g ", "</g>"), ("<section", "</section>")]
        {
            assert_eq!(page.matches(open).count(), page.matches(close).count(), "{open}");
        }
        assert_eq!(page.matches("<svg").count(), page.matches("</svg>").count());
    }

    #[test]
    fn control_and_invisible_characters_are_shown_not_obeyed() {
        let nasty = "a\0b\x07c\x1b[31md\re\r\nf\x7fg\u{85}h\u{202e}i\u{2066}j\u{fffe}k\u{10ffff}l\u{feff}m";
        let page = render(&filled_with(nasty));
        for raw in ['\0', '\x07', '\x1b', '\r', '\x7f', '\u{85}', '\u{202e}', '\u{2066}', '\u{fffe}', '\u{10ffff}'] {
            assert!(!page.contains(raw), "{:?} reached the page", raw);
        }
        let response = between(&page, "data-field=\"response\">", "</td>");
        assert_eq!(response, "<span class=\"resp\">a␀b␇c␛[31md␍e\nf␡g�h�i�j�k�l\u{feff}m</span>");
    }

    #[test]
    fn unicode_and_edge_cases_survive() {
        let s = "Grüße 👋🏽 ✉️ e\u{301} \u{fffd} 中文 ";
        let page = render(&filled_with(s));
        assert!(page.contains(s));
        let zalgo = "Z\u{336}\u{31b}\u{35d}".repeat(200);
        let page = render(&filled_with(&zalgo));
        assert!(page.contains("clipped"));
    }

    #[test]
    fn long_responses_are_cut_visibly_with_the_whole_text_in_the_title() {
        let long = format!("550 {}<x>", "ä".repeat(996));
        let mut d = sample();
        d.failures[0].response = Some(long.clone());
        let page = render(&d);
        let cell = between(&page, "data-field=\"response\">", "</td>");
        let title = between(cell, "title=\"", "\"");
        assert_eq!(title, long.replace('<', "&lt;").replace('>', "&gt;"));
        let shown = between(cell, "\">", "…");
        assert_eq!(shown.chars().count(), SHOWN_CHARS);
        assert!(long.starts_with(shown));
        assert!(cell.contains("(+703 characters)"), "{cell}");

        let huge = "x".repeat(TITLE_CHARS * 3);
        d.failures[0].response = Some(huge);
        let page = render(&d);
        let title = between(between(&page, "data-field=\"response\">", "</td>"), "title=\"", "\"");
        assert_eq!(title.chars().count(), TITLE_CHARS + 1);
        assert!(title.ends_with("x…"));
        assert!(page.len() < 120_000, "{}", page.len());

        // Exactly at the limit: not cut.
        d.failures[0].response = Some("y".repeat(SHOWN_CHARS));
        let page = render(&d);
        assert!(!between(&page, "data-field=\"response\">", "</td>").contains("clipped"));
    }

    #[test]
    fn totals_and_rates_carry_exact_hooks() {
        let page = render(&sample());
        let total = |metric: &str, window: &str| {
            let open = format!("<span data-metric=\"{metric}\" data-window=\"{window}\"");
            let tag = between(&page, &open, ">");
            (attrs(tag, "data-value").pop().unwrap_or_default(), text_of(&page, &open).to_string())
        };
        assert_eq!(total("sent", "24h"), ("1234567".into(), "1,234,567".into()));
        assert_eq!(total("delivered", "24h"), ("1200000".into(), "1,200,000".into()));
        assert_eq!(total("bounced", "24h"), ("20000".into(), "20,000".into()));
        assert_eq!(total("complained", "24h"), ("123".into(), "123".into()));
        assert_eq!(total("clicked", "24h"), ("0".into(), "0".into()));
        assert_eq!(total("sent", "30d"), ("0".into(), "0".into()));
        for m in METRICS {
            for w in ["24h", "30d"] {
                assert_eq!(page.matches(&format!("data-metric=\"{}\" data-window=\"{w}\"", m.key())).count(), 1);
            }
        }
        assert_eq!(text_of(&page, "<span data-rate=\"delivery\" data-window=\"24h\""), "97.20%");
        assert_eq!(text_of(&page, "<span data-rate=\"bounce\" data-window=\"24h\""), "1.62%");
        assert_eq!(text_of(&page, "<span data-rate=\"complaint\" data-window=\"24h\""), "0.01%");
        assert_eq!(text_of(&page, "<span data-rate=\"click\" data-window=\"24h\""), "0.00%");
        let tag = between(&page, "<span data-rate=\"bounce\" data-window=\"24h\"", ">");
        assert_eq!(attrs(tag, "data-value"), [(20_000.0 / 1_234_567.0f64).to_string()]);
        // Nothing sent in 30 days: every rate is a dash without a value.
        for r in ["delivery", "bounce", "complaint", "open", "click"] {
            let open = format!("<span data-rate=\"{r}\" data-window=\"30d\"");
            assert_eq!(text_of(&page, &open), "—");
            assert!(attrs(between(&page, &open, ">"), "data-value").is_empty());
        }
    }

    #[test]
    fn charts_have_one_series_per_metric_and_one_point_per_bucket() {
        let d = sample();
        let page = render(&d);
        for (chart, buckets, n) in [("hourly", &d.hourly, 24), ("daily", &d.daily, 30)] {
            let svg = between(&page, &format!("<svg class=\"chart\" data-chart=\"{chart}\""), "</svg>");
            assert!(svg.contains("viewBox=\"0 0 600 300\""));
            assert!(svg.contains("<title>Messages per "));
            assert!(svg.contains("aria-label=\"Messages per "));
            assert_eq!(svg.matches("data-series=").count(), 6);
            for m in METRICS {
                let g = between(svg, &format!("data-series=\"{}\">", m.key()), "</g>");
                let values = attrs(g, "data-value");
                assert_eq!(values.len(), n, "{chart} {}", m.key());
                let want: Vec<String> = buckets.iter().map(|b| m.of(&b.counts).to_string()).collect();
                assert_eq!(values, want, "{chart} {}", m.key());
                let labels: Vec<String> = buckets.iter().map(|b| b.label.clone()).collect();
                assert_eq!(attrs(g, "data-bucket"), labels);
                assert_eq!(g.matches("<circle").count(), n);
                assert_eq!(g.matches("<polyline").count(), 1);
            }
        }
        // Thousands separators in the tooltips, raw numbers in data-value.
        let hourly = between(&page, "data-chart=\"hourly\"", "</svg>");
        assert!(hourly.contains("data-value=\"2400\" data-bucket=\"13:00\"><title>13:00 · Sent: 2,400</title>"));
        assert!(hourly.contains("<title>14:00 · Sent: 100</title>"));
        let daily = between(&page, "data-chart=\"daily\"", "</svg>");
        assert!(daily.contains("<title>2026-12-01 · Sent: 10,000</title>"));
    }

    #[test]
    fn axes_use_round_ticks_and_thin_labels() {
        let page = render(&sample());
        let hourly = between(&page, "data-chart=\"hourly\"", "</svg>");
        // Largest value 2,400: gridlines every 500 up to 2,500.
        let ticks: Vec<&str> =
            hourly.match_indices("class=\"yl\"").map(|(i, _)| text_of(&hourly[i - 6..], "<text")).collect();
        assert_eq!(ticks, ["0", "500", "1,000", "1,500", "2,000", "2,500"]);
        let labels: Vec<&str> =
            hourly.match_indices("<text class=\"xl").map(|(i, _)| text_of(&hourly[i..], "<text")).collect();
        assert!((6..=12).contains(&labels.len()), "{labels:?}");
        assert_eq!(labels.last(), Some(&"13:00"), "the newest hour is labelled");
        let narrow = hourly.matches("<text class=\"xl\"").count();
        assert!((3..=6).contains(&narrow), "{narrow} labels on a phone");
        let daily = between(&page, "data-chart=\"daily\"", "</svg>");
        let labels: Vec<&str> =
            daily.match_indices("<text class=\"xl").map(|(i, _)| text_of(&daily[i..], "<text")).collect();
        assert_eq!(labels.last(), Some(&"Dec 2"));
        assert!(labels.len() <= 10, "{labels:?}");
    }

    #[test]
    fn y_scale_is_round_and_covers_the_maximum() {
        assert_eq!(y_scale(0), (1, 1));
        assert_eq!(y_scale(1), (1, 1));
        assert_eq!(y_scale(7), (2, 8));
        assert_eq!(y_scale(10), (2, 10));
        assert_eq!(y_scale(1234), (500, 1500));
        assert_eq!(y_scale(18_028), (5000, 20_000));
        for max in (0..5000).chain([999_999, 1_000_001, u64::MAX / 3, u64::MAX]) {
            let (step, top) = y_scale(max);
            assert!(top >= max, "{max}");
            assert!(top / step <= 5, "{max}: {step} {top}");
            let lead = step / 10u64.pow(step.ilog10());
            assert!([1, 2, 5].contains(&lead) && step.is_multiple_of(10u64.pow(step.ilog10())), "{max}: {step}");
        }
    }

    #[test]
    fn empty_dashboard_renders_with_empty_states() {
        let page = render(&Dashboard::default());
        assert!(page.starts_with("<!doctype html>"));
        assert!(page.ends_with("</html>\n"));
        for chart in ["hourly", "daily"] {
            let svg = between(&page, &format!("data-chart=\"{chart}\""), "</svg>");
            assert_eq!(svg.matches("data-series=").count(), 6);
            assert!(!svg.contains("<circle"));
            assert!(svg.contains("No data for this period"));
            assert_eq!(svg.matches("class=\"yl\"").count(), 1, "only the zero line");
        }
        assert!(page.contains("No transports, nothing queued."));
        assert!(page.contains("No worker is running or registered."));
        assert!(page.contains("No failures."));
        assert!(page.contains("No bounces."));
        assert!(page.contains("Delivery workers: 0 of 0 running"));
        assert!(page.contains("Listener: not reported"));
        assert_eq!(page.matches(">—</span>").count(), 10, "every rate of both windows is a dash");

        // Buckets present but all zero.
        let hourly = (0..24).map(|i| Bucket { label: format!("{i:02}:00"), counts: Counts::default() }).collect();
        let d = Dashboard { hourly, ..Dashboard::default() };
        let page = render(&d);
        let svg = between(&page, "data-chart=\"hourly\"", "</svg>");
        assert_eq!(svg.matches("data-value=\"0\"").count(), 24 * 6);
        assert!(svg.contains("No messages in this period"));
    }

    #[test]
    fn one_bucket_and_odd_lengths_render() {
        let mut d = sample();
        d.hourly.truncate(1);
        d.daily.truncate(7);
        let page = render(&d);
        let svg = between(&page, "data-chart=\"hourly\"", "</svg>");
        assert_eq!(svg.matches("<circle").count(), 6);
        assert!(!svg.contains("<polyline"));
        let svg = between(&page, "data-chart=\"daily\"", "</svg>");
        assert_eq!(svg.matches("<circle").count(), 42);
    }

    #[test]
    fn tables_carry_exact_hooks() {
        let page = render(&sample());
        let row = between(&page, "<tr data-transport=\"ses-eu\">", "</tr>");
        assert!(row.contains("data-field=\"queued\" data-value=\"1284\">1,284</td>"));
        assert!(row.contains("data-field=\"due_now\" data-value=\"312\">312</td>"));
        assert!(row.contains("data-field=\"sending\" data-value=\"20\">20</td>"));
        assert!(row.contains("data-field=\"oldest_due\" data-value=\"74.5\">1 min 15 s</td>"));
        let row = between(&page, "<tr data-worker=\"delivery\" data-slot=\"1\">", "</tr>");
        assert!(row.contains("data-field=\"pid\" data-value=\"4242\">4242</td>"));
        assert!(row.contains("data-field=\"sent\" data-value=\"184220\">184,220</td>"));
        assert!(row.contains("data-field=\"failed\" data-value=\"-3\">-3</td>"));
        assert!(row.contains("<span class=\"badge ok\"><span class=\"st\">sending</span></span>"));
        let row = between(&page, "<tr data-failure=\"9812331\">", "</tr>");
        assert!(row.contains("data-field=\"message_id\" data-value=\"9812331\">9812331</td>"));
        assert!(row.contains("<span class=\"resp\">550 5.1.1 user unknown</span>"));
        assert!(row.contains("<span class=\"r\">jane@example.com</span>"));
        let row = between(&page, "<tr data-reason=\"550 5.1.1 user unknown\">", "</tr>");
        assert!(row.contains("data-field=\"count\" data-value=\"1912\">1,912</td>"));
        assert!(page.contains("<strong data-field=\"database\"><span class=\"db\">mail_prod</span></strong>"));
        assert!(page.contains("<span data-field=\"generated_at\">2026-12-19 13:42:07 UTC</span>"));
        assert!(page.contains("data-field=\"delivery_running\" data-value=\"1\">Delivery workers: 1 of 1 running"));
    }

    #[test]
    fn missing_values_show_a_dash() {
        let mut d = sample();
        d.queue[0].oldest_due_secs = None;
        d.queue.push(QueueRow { transport: "nan".into(), oldest_due_secs: Some(f64::NAN), ..QueueRow::default() });
        d.workers[0].pid = None;
        d.workers[0].last_activity = None;
        d.failures[0].recipient = None;
        d.failures[0].response = None;
        let page = render(&d);
        assert!(page.contains("<td class=\"n\" data-field=\"oldest_due\">—</td></tr>\n<tr data-transport=\"nan\">"));
        assert!(between(&page, "<tr data-transport=\"nan\">", "</tr>").contains("data-field=\"oldest_due\">—</td>"));
        let row = between(&page, "<tr data-worker=\"delivery\"", "</tr>");
        assert!(row.contains("data-field=\"pid\">—</td>"));
        assert!(row.contains("badge bad"));
        assert!(row.contains("data-field=\"last_activity\">—</td>"));
        let row = between(&page, "<tr data-failure=", "</tr>");
        assert!(row.contains("data-field=\"recipient\">—</td>"));
        assert!(row.contains("no response"));
        assert!(page.contains("Delivery workers: 0 of 1 running"));
    }

    #[test]
    fn the_page_loads_nothing_and_runs_nothing() {
        for page in [render(&sample()), render(&Dashboard::default()), render(&filled_with(HOSTILE)), unauthorized()] {
            assert!(!page.contains("http://") && !page.contains("https://"));
            assert!(!page.to_ascii_lowercase().contains("<script"));
            assert!(!page.contains("javascript:"));
            assert!(!page.contains("@import") && !page.contains("url("));
            // Every attribute of every tag is one the template writes.
            let names = attribute_names(&page);
            let unknown: Vec<&String> = names.iter().filter(|n| !KNOWN_ATTRIBUTES.contains(&n.as_str())).collect();
            assert!(unknown.is_empty(), "{unknown:?}");
            assert_eq!(attrs(&page, "href"), ["data:,"]);
            assert!(page.contains("<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">"));
        }
    }

    #[test]
    fn the_401_page_holds_no_data() {
        let page = unauthorized();
        assert!(page.contains("401"));
        assert!(!page.contains("http-equiv=\"refresh\""), "a reload would not bring the password prompt back");
        assert!(!page.contains("data-metric") && !page.contains("data-chart") && !page.contains("data-field"));
    }

    #[test]
    fn basic_auth_accepts_only_the_right_pair() {
        use base64::engine::general_purpose::{STANDARD, STANDARD_NO_PAD};
        let basic = |pair: &str| format!("Basic {}", STANDARD.encode(pair));
        let ok = |h: &str| check_basic_auth(Some(h), "admin", "s3cret:pä ss");
        assert!(ok(&basic("admin:s3cret:pä ss")));
        assert!(ok(&format!("basic {}", STANDARD.encode("admin:s3cret:pä ss"))));
        assert!(ok(&format!("  BASIC   {}  ", STANDARD.encode("admin:s3cret:pä ss"))));
        assert!(ok(&format!("Basic {}", STANDARD_NO_PAD.encode("admin:s3cret:pä ss"))));
        for wrong in [
            "admin:s3cret:pä s",
            "admin:s3cret:pä ss ",
            "Admin:s3cret:pä ss",
            "admin:",
            ":s3cret:pä ss",
            "admin",
            "",
            "admins3cret:pä ss",
        ] {
            assert!(!ok(&basic(wrong)), "{wrong:?}");
        }
        for malformed in [
            "",
            "Basic",
            "Basic ",
            "Basic !!!!",
            "Basic YWRtaW46czNjcmV0OnDDpCBzcw==extra",
            "Bearer YWRtaW46czNjcmV0OnDDpCBzcw==",
            "Basic\tYWRtaW46czNjcmV0OnDDpCBzcw==",
            "YWRtaW46czNjcmV0OnDDpCBzcw==",
            "Basic YWRtaW46czNjcmV0OnDDpCBzcw== YWRtaW46czNjcmV0OnDDpCBzcw==",
            "Basic YWRtaW46czNjcmV0OnDDpCBzcw=\0",
        ] {
            assert!(!ok(malformed), "{malformed:?}");
        }
        assert!(ok("Basic YWRtaW46czNjcmV0OnDDpCBzcw=="));
        assert!(!check_basic_auth(None, "admin", "s3cret:pä ss"));
        let long = format!("Basic {}", STANDARD.encode(format!("admin:{}", "p".repeat(5000))));
        assert!(!check_basic_auth(Some(&long), "admin", &"p".repeat(5000)), "an overlong header is refused");
        // No password configured: closed, even to an empty password.
        assert!(!check_basic_auth(Some(&basic("admin:")), "admin", ""));
        // A user name with a colon could never be told apart.
        assert!(!check_basic_auth(Some(&basic("a:b:c")), "a:b", "c"));
    }

    #[test]
    fn constant_time_compare_is_exact() {
        assert!(ct_eq(b"admin:pw", b"admin:pw"));
        assert!(!ct_eq(b"admin:pW", b"admin:pw"));
        assert!(!ct_eq(b"admin:p", b"admin:pw"));
        assert!(!ct_eq(b"admin:pw\0", b"admin:pw"));
        assert!(!ct_eq(b"", b"x"));
        assert!(ct_eq(b"", b""));
    }

    #[test]
    fn numbers_and_ages_read_well() {
        let n = |v: u64| Num(v).to_string();
        assert_eq!([n(0), n(999), n(1000), n(12_345), n(1_234_567)], ["0", "999", "1,000", "12,345", "1,234,567"]);
        assert_eq!(n(u64::MAX), "18,446,744,073,709,551,615");
        assert_eq!(Int(-1_234).to_string(), "-1,234");
        assert_eq!(Int(i64::MIN).to_string(), "-9,223,372,036,854,775,808");
        assert_eq!(age(0.4), "0 s");
        assert_eq!(age(-5.0), "0 s");
        assert_eq!(age(59.4), "59 s");
        assert_eq!(age(61.0), "1 min 1 s");
        assert_eq!(age(3600.0), "1 h 0 min");
        assert_eq!(age(90_061.0), "1 d 1 h");
        assert_eq!(age(1e12), "11,574,074 d 1 h");
        assert_eq!(age(f64::INFINITY), "—");
        assert_eq!(short_label("2026-11-30"), "Nov 30");
        assert_eq!(short_label("2026-01-05"), "Jan 5");
        assert_eq!(short_label("2026-13-05"), "2026-13-05");
        assert_eq!(short_label("14:00"), "14:00");
        assert_eq!(short_label("2026-1ä-05"), "2026-1ä-05");
    }
}
