//! Dates and times as pg_email reads and writes them, with no Postgres in it: the proleptic
//! Gregorian calendar, one reader of ISO 8601 / RFC 3339 times (the send API's schedule times,
//! the providers' webhook timestamps), the HTTP-date of a `Retry-After`, and RFC 3339 and RFC 5322
//! output. Pure functions, called from backends, the listener and the delivery worker alike.

/// The latest Unix time [`rfc3339_seconds`] writes (9999-12-31T23:59:59Z).
pub(crate) const MAX_UNIX: i64 = 253_402_300_799;

/// The proleptic Gregorian date of a day number (days since 1970-01-01), after Howard
/// Hinnant's `civil_from_days` (<http://howardhinnant.github.io/date_algorithms.html>).
pub(crate) fn civil_from_days(days: i64) -> (i64, u32, u32) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097); // day of the 400-year era, 0..=146096
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365; // 0..=399
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100); // day of the year from March 1st
    let mp = (5 * doy + 2) / 153; // month from March, 0..=11
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let y = yoe + era * 400 + i64::from(m <= 2);
    (y, m, d)
}

/// The day number (days since 1970-01-01) of a proleptic Gregorian date; the inverse of
/// [`civil_from_days`].
pub(crate) fn days_from_civil(y: i64, m: u32, d: u32) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y.rem_euclid(400);
    let mp = i64::from((m + 9) % 12);
    let doy = (153 * mp + 2) / 5 + i64::from(d) - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

/// The days of month `m` (1..=12) of year `y`; 0 for a month that does not exist.
pub(crate) fn days_in_month(y: i64, m: u32) -> u32 {
    match m {
        2 if y % 4 == 0 && (y % 100 != 0 || y % 400 == 0) => 29,
        2 => 28,
        4 | 6 | 9 | 11 => 30,
        1 | 3 | 5 | 7 | 8 | 10 | 12 => 31,
        _ => 0,
    }
}

/// A date and time read by [`parse_iso8601`], as written (no time-zone arithmetic yet).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Iso8601 {
    year: i64,
    month: u32,
    day: u32,
    hour: u32,
    minute: u32,
    second: u32,
    /// The digits of the fraction of a second, as written (none: empty).
    fraction: String,
    /// Minutes east of UTC; None for `Z` or no zone (UTC).
    offset: Option<i32>,
}

/// An ISO 8601 / RFC 3339 date and time as senders and providers write them:
/// `2024-08-05T11:52:01.858Z`, `…+02:00`, `…+0200`, `…+02`, a space or a lower-case `t` for the
/// `T`, seconds optional, a fraction of 1 to 9 digits after `.` or `,`; no zone is UTC. The date
/// must exist (2023-02-29 does not) and the year be 0001 or later. None for anything else, natural
/// language such as `in 1 min` included.
pub(crate) fn parse_iso8601(text: &str) -> Option<Iso8601> {
    let b = text.trim().as_bytes();
    let num = |at: usize, len: usize| -> Option<u32> {
        let part = b.get(at..at + len)?;
        if !part.iter().all(u8::is_ascii_digit) {
            return None;
        }
        part.iter().try_fold(0u32, |n, d| n.checked_mul(10)?.checked_add(u32::from(d - b'0')))
    };
    let is = |at: usize, c: &[u8]| b.get(at).is_some_and(|x| c.contains(x));
    let (year, month, day) = (num(0, 4)?, num(5, 2)?, num(8, 2)?);
    if !is(4, b"-") || !is(7, b"-") || !is(10, b"Tt ") || !is(13, b":") {
        return None;
    }
    let (hour, minute) = (num(11, 2)?, num(14, 2)?);
    let mut at = 16;
    let mut second = 0;
    let mut fraction = String::new();
    if is(16, b":") {
        second = num(17, 2)?;
        at = 19;
        if is(19, b".,") {
            let digits = b.get(20..).unwrap_or_default().iter().take_while(|c| c.is_ascii_digit()).count();
            if digits == 0 || digits > 9 {
                return None;
            }
            fraction.extend(b.get(20..20 + digits)?.iter().map(|&c| char::from(c)));
            at = 20 + digits;
        }
    }
    let offset = match b.get(at..)? {
        b"" | b"Z" | b"z" => None,
        [sign @ (b'+' | b'-'), rest @ ..] => {
            let (hh, mm) = match rest {
                [_, _] => (num(at + 1, 2)?, 0),
                [_, _, b':', _, _] => (num(at + 1, 2)?, num(at + 4, 2)?),
                [_, _, _, _] => (num(at + 1, 2)?, num(at + 3, 2)?),
                _ => return None,
            };
            if hh > 23 || mm > 59 {
                return None;
            }
            let minutes = (hh * 60 + mm) as i32;
            Some(if *sign == b'+' { minutes } else { -minutes })
        }
        _ => return None,
    };
    let year = i64::from(year);
    if year == 0 || day == 0 || day > days_in_month(year, month) || hour > 23 || minute > 59 || second > 60 {
        return None;
    }
    Some(Iso8601 { year, month, day, hour, minute, second, fraction, offset })
}

impl Iso8601 {
    /// Unix seconds (a leap second counts as the first second of the next minute).
    pub(crate) fn unix_seconds(&self) -> f64 {
        let days = days_from_civil(self.year, self.month, self.day);
        let clock = i64::from(self.hour * 3600 + self.minute * 60 + self.second);
        let offset = i64::from(self.offset.unwrap_or(0)) * 60;
        let fraction =
            if self.fraction.is_empty() { 0.0 } else { format!("0.{}", self.fraction).parse().unwrap_or(0.0) };
        (days * 86_400 + clock - offset) as f64 + fraction
    }

    /// The time written as RFC 3339, in its own zone: `2024-08-05T11:52:01.858+02:00`; `Z` for UTC
    /// or no zone.
    pub(crate) fn rfc3339(&self) -> String {
        let Self { year, month, day, hour, minute, second, .. } = self;
        let fraction = if self.fraction.is_empty() { String::new() } else { format!(".{}", self.fraction) };
        let zone = match self.offset {
            None => "Z".to_string(),
            Some(m) => format!("{}{:02}:{:02}", if m < 0 { '-' } else { '+' }, m.abs() / 60, m.abs() % 60),
        };
        format!("{year:04}-{month:02}-{day:02}T{hour:02}:{minute:02}:{second:02}{fraction}{zone}")
    }
}

/// Unix seconds as RFC 3339 in UTC with milliseconds, `2024-02-29T12:34:56.789Z`. The time is
/// rounded to microseconds (Postgres' precision) and then truncated to milliseconds, as
/// `date_trunc('milliseconds', at)`. Outside years 0000-9999 it is clamped to them; NaN is
/// the epoch.
pub fn rfc3339(unix_secs: f64) -> String {
    const MIN_MS: i64 = -62_167_219_200_000; // 0000-01-01T00:00:00.000Z
    const MAX_MS: i64 = MAX_UNIX * 1000 + 999; // 9999-12-31T23:59:59.999Z
                                               // `as` saturates and maps NaN to 0.
    let micros = (unix_secs * 1e6).round() as i64;
    let ms = micros.div_euclid(1000).clamp(MIN_MS, MAX_MS);
    let (days, ms) = (ms.div_euclid(86_400_000), ms.rem_euclid(86_400_000));
    let (y, m, d) = civil_from_days(days);
    let (h, min, s, milli) = (ms / 3_600_000, ms / 60_000 % 60, ms / 1000 % 60, ms % 1000);
    format!("{y:04}-{m:02}-{d:02}T{h:02}:{min:02}:{s:02}.{milli:03}Z")
}

/// Unix seconds as RFC 3339 in UTC to the second, `YYYY-MM-DDTHH:MM:SSZ`; None outside
/// 1970..=9999.
pub(crate) fn rfc3339_seconds(secs: i64) -> Option<String> {
    if !(0..=MAX_UNIX).contains(&secs) {
        return None;
    }
    let (y, m, d) = civil_from_days(secs.div_euclid(86_400));
    let s = secs.rem_euclid(86_400);
    Some(format!("{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}Z", s / 3600, s % 3600 / 60, s % 60))
}

/// Unix seconds as an RFC 5322 date in UTC, `Mon, 30 Nov 2026 12:34:56 +0000` (a Date field).
pub fn rfc5322_date(unix_secs: f64) -> String {
    const DAYS: [&str; 7] = ["Thu", "Fri", "Sat", "Sun", "Mon", "Tue", "Wed"]; // 1970-01-01 was a Thursday
    const MONTHS: [&str; 12] = ["Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec"];
    let secs = unix_secs.floor().clamp(0.0, MAX_UNIX as f64) as i64;
    let (days, s) = (secs.div_euclid(86_400), secs.rem_euclid(86_400));
    let (y, m, d) = civil_from_days(days);
    let weekday = DAYS[days.rem_euclid(7) as usize];
    let month = MONTHS[(m as usize).saturating_sub(1).min(11)];
    format!("{weekday}, {d:02} {month} {y:04} {:02}:{:02}:{:02} +0000", s / 3600, s / 60 % 60, s % 60)
}

/// Unix seconds of an HTTP-date: `Sun, 06 Nov 1994 08:49:37 GMT` (IMF-fixdate),
/// `Sunday, 06-Nov-94 08:49:37 GMT` (RFC 850) or `Sun Nov  6 08:49:37 1994` (asctime).
pub(crate) fn http_date(value: &str) -> Option<i64> {
    const MONTHS: [&str; 12] = ["Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec"];
    let spaced = value.replace([',', '-'], " ");
    let words: Vec<&str> = spaced.split_whitespace().collect();
    let (day, month, year, time) = match words.as_slice() {
        [_, day, month, year, time, "GMT"] => (*day, *month, *year, *time),
        [_, month, day, time, year] => (*day, *month, *year, *time),
        _ => return None,
    };
    let number = |s: &str, digits: std::ops::RangeInclusive<usize>| {
        (digits.contains(&s.len()) && s.bytes().all(|b| b.is_ascii_digit())).then(|| s.parse::<i64>().ok()).flatten()
    };
    let year = match year.len() {
        2 => number(year, 2..=2).map(|y| if y < 70 { 2000 + y } else { 1900 + y })?,
        _ => number(year, 4..=4)?,
    };
    let month = MONTHS.iter().position(|m| m.eq_ignore_ascii_case(month))? as u32 + 1;
    let day = number(day, 1..=2)?;
    let [h, m, s] = match time.split(':').collect::<Vec<_>>().as_slice() {
        [h, m, s] => [number(h, 2..=2)?, number(m, 2..=2)?, number(s, 2..=2)?],
        _ => return None,
    };
    if day < 1 || day > i64::from(days_in_month(year, month)) || h > 23 || m > 59 || s > 60 {
        return None;
    }
    Some(days_from_civil(year, month, day as u32) * 86_400 + h * 3600 + m * 60 + s)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn normalized(text: &str) -> Option<String> {
        parse_iso8601(text).map(|t| t.rfc3339())
    }

    fn unix(text: &str) -> Option<f64> {
        parse_iso8601(text).map(|t| t.unix_seconds())
    }

    #[test]
    fn iso8601_times_are_normalized() {
        let cases = [
            ("2024-08-05T11:52:01.858Z", Some("2024-08-05T11:52:01.858Z")),
            ("2024-08-05T11:52:01Z", Some("2024-08-05T11:52:01Z")),
            ("2024-08-05t11:52:01z", Some("2024-08-05T11:52:01Z")),
            ("2024-08-05 11:52:01+02:00", Some("2024-08-05T11:52:01+02:00")),
            ("2024-08-05T11:52:01-0530", Some("2024-08-05T11:52:01-05:30")),
            ("2024-08-05T11:52+01", Some("2024-08-05T11:52:00+01:00")),
            ("2024-08-05T11:52:01", Some("2024-08-05T11:52:01Z")),
            ("2024-08-05T11:52:01,5Z", Some("2024-08-05T11:52:01.5Z")),
            ("2024-08-05T11:52:01-00:00", Some("2024-08-05T11:52:01+00:00")),
            (" 2024-02-29T00:00:00Z ", Some("2024-02-29T00:00:00Z")),
            ("2016-12-31T23:59:60Z", Some("2016-12-31T23:59:60Z")),
            ("2023-02-29T00:00:00Z", None),
            ("2024-13-01T00:00:00Z", None),
            ("2024-00-01T00:00:00Z", None),
            ("2024-04-31T00:00:00Z", None),
            ("2024-08-05T24:00:00Z", None),
            ("2024-08-05T11:60:00Z", None),
            ("2024-08-05T11:52:01+24:00", None),
            ("2024-08-05T11:52:01.Z", None),
            ("2024-08-05T11:52:01.1234567890Z", None),
            ("2024-08-05T11:52:01ZZ", None),
            ("2024-01-02T03:04:05Zjunk", None),
            ("2024-01-02X03:04:05Z", None),
            ("2024-08-05", None),
            ("2024", None),
            ("0000-01-01T00:00:00Z", None),
            ("in 1 min", None),
            ("tomorrow at 9am", None),
            ("", None),
            ("2024-08-05T11:52:01+2", None),
            ("２０２４-08-05T11:52:01Z", None),
            ("+2024-08-05T11:52:01Z", None),
        ];
        for (text, want) in cases {
            assert_eq!(normalized(text).as_deref(), want, "{text}");
        }
    }

    #[test]
    fn iso8601_times_in_unix_seconds() {
        assert_eq!(unix("1970-01-01T00:00:00Z"), Some(0.0));
        assert_eq!(unix("2024-01-02T03:04:05Z"), Some(1_704_164_645.0));
        assert_eq!(unix("2024-01-02T03:04:05.5Z"), Some(1_704_164_645.5));
        assert_eq!(unix("2024-01-01T22:04:05-05:00"), Some(1_704_164_645.0));
        assert_eq!(unix("2024-01-02 04:04:05.000+01"), Some(1_704_164_645.0));
        assert_eq!(unix("2024-01-02T04:04:05+0100"), Some(1_704_164_645.0));
        assert_eq!(unix("2024-01-02T03:04:05"), Some(1_704_164_645.0));
        assert_eq!(unix("2024-01-02T03:04Z"), Some(1_704_164_640.0));
        assert_eq!(unix("2000-02-29T00:00:00Z"), Some(951_782_400.0));
        let ms = unix("2019-11-05T16:33:54.9070259Z").unwrap_or_default();
        assert!((ms - 1_572_971_634.907_025_9).abs() < 1e-6, "{ms}");
    }

    #[test]
    fn rfc5322_dates() {
        assert_eq!(rfc5322_date(0.0), "Thu, 01 Jan 1970 00:00:00 +0000");
        assert_eq!(rfc5322_date(1_796_040_000.5), "Mon, 30 Nov 2026 12:00:00 +0000");
        assert_eq!(rfc5322_date(951_782_400.0), "Tue, 29 Feb 2000 00:00:00 +0000");
    }

    /// Expected values from Python: `(datetime(1970,1,1,tzinfo=timezone.utc) +
    /// timedelta(seconds=t)).isoformat(timespec='microseconds')`, cut to milliseconds.
    #[test]
    fn rfc3339_formats_known_dates_including_leap_years() {
        let cases: [(f64, &str); 17] = [
            (0.0, "1970-01-01T00:00:00.000Z"),
            (951_782_400.0, "2000-02-29T00:00:00.000Z"), // 2000 is a leap year (÷400)
            (1_709_210_096.789, "2024-02-29T12:34:56.789Z"),
            (4_107_542_400.0, "2100-03-01T00:00:00.000Z"), // 2100 is not (÷100)
            (4_107_542_399.999_5, "2100-02-28T23:59:59.999Z"),
            (-2_203_891_200.0, "1900-03-01T00:00:00.000Z"), // 1900 is not either
            (1_704_164_645.123_456, "2024-01-02T03:04:05.123Z"),
            (1.000_5, "1970-01-01T00:00:01.000Z"),
            (68.2, "1970-01-01T00:01:08.200Z"),
            (-1.0, "1969-12-31T23:59:59.000Z"),
            (-0.5, "1969-12-31T23:59:59.500Z"),
            (-62_135_596_800.0, "0001-01-01T00:00:00.000Z"),
            (253_402_300_799.0, "9999-12-31T23:59:59.000Z"),
            (f64::NAN, "1970-01-01T00:00:00.000Z"),
            (f64::INFINITY, "9999-12-31T23:59:59.999Z"),
            (1e300, "9999-12-31T23:59:59.999Z"),
            (f64::NEG_INFINITY, "0000-01-01T00:00:00.000Z"),
        ];
        for (t, expected) in cases {
            assert_eq!(rfc3339(t), expected, "{t}");
        }
    }

    #[test]
    fn rfc3339_to_the_second() {
        assert_eq!(rfc3339_seconds(0).as_deref(), Some("1970-01-01T00:00:00Z"));
        assert_eq!(rfc3339_seconds(1_714_060_800).as_deref(), Some("2024-04-25T16:00:00Z"));
        assert_eq!(rfc3339_seconds(1_709_164_799).as_deref(), Some("2024-02-28T23:59:59Z"));
        assert_eq!(rfc3339_seconds(1_709_164_800).as_deref(), Some("2024-02-29T00:00:00Z"));
        assert_eq!(rfc3339_seconds(951_782_400).as_deref(), Some("2000-02-29T00:00:00Z"));
        assert_eq!(rfc3339_seconds(MAX_UNIX).as_deref(), Some("9999-12-31T23:59:59Z"));
        assert_eq!(rfc3339_seconds(MAX_UNIX + 1), None);
        assert_eq!(rfc3339_seconds(-1), None);
        assert_eq!(rfc3339_seconds(i64::MIN), None);
    }

    #[test]
    fn day_numbers_and_dates_round_trip() {
        let mut previous = civil_from_days(-800_001);
        for day in -800_000..800_000 {
            let (y, m, d) = civil_from_days(day);
            assert_eq!(days_from_civil(y, m, d), day);
            assert!((1..=12).contains(&m) && d >= 1 && d <= days_in_month(y, m), "{y}-{m}-{d}");
            let (py, pm, pd) = previous;
            let next_day = (y, m, d) == (py, pm, pd + 1);
            let next_month = d == 1 && pd == days_in_month(py, pm) && (y, m) == (py, pm + 1);
            let next_year = (y, m, d) == (py + 1, 1, 1) && (pm, pd) == (12, 31);
            assert!(next_day || next_month || next_year, "{previous:?} then {y}-{m}-{d}");
            previous = (y, m, d);
        }
        assert_eq!([2000, 2024, 1600].map(|y| days_in_month(y, 2)), [29; 3]);
        assert_eq!([1900, 2100, 2023].map(|y| days_in_month(y, 2)), [28; 3]);
        assert_eq!([0, 13].map(|m| days_in_month(2024, m)), [0; 2]);
    }

    #[test]
    fn http_dates() {
        assert_eq!(http_date("Sun, 06 Nov 1994 08:49:37 GMT"), Some(784_111_777));
        assert_eq!(http_date("Sunday, 06-Nov-94 08:49:37 GMT"), Some(784_111_777));
        assert_eq!(http_date("Sun Nov  6 08:49:37 1994"), Some(784_111_777));
        assert_eq!(http_date("Tue, 29 Feb 2000 00:00:00 GMT"), Some(951_782_400));
        assert_eq!(http_date("Wed, 29 Feb 2023 00:00:00 GMT"), None);
    }

    proptest! {
        #[test]
        fn iso8601_output_parses_again(y in 1u32..9999, mo in 1u32..13, d in 1u32..29, h in 0u32..24, mi in 0u32..60, s in 0u32..60) {
            let text = format!("{y:04}-{mo:02}-{d:02}T{h:02}:{mi:02}:{s:02}Z");
            prop_assert_eq!(normalized(&text), Some(text.clone()));
        }

        #[test]
        fn unix_times_round_trip_through_iso8601(secs in 0i64..=MAX_UNIX) {
            let text = rfc3339_seconds(secs).unwrap_or_default();
            prop_assert_eq!(normalized(&text), Some(text.clone()));
            prop_assert_eq!(unix(&text), Some(secs as f64));
        }

        #[test]
        fn what_is_read_is_written_to_read_back_the_same(
            text in "[0-9]{4}-[0-9]{2}-[0-9]{2}[Tt ][0-9]{2}:[0-9]{2}(:[0-9]{2}([.,][0-9]{0,10})?)?([Zz]|[+-][0-9]{2}(:?[0-9]{2})?)?|\\PC{0,30}"
        ) {
            if let Some(t) = parse_iso8601(&text) {
                // What was read is written so that it reads back the same.
                prop_assert_eq!(parse_iso8601(&t.rfc3339()), Some(t));
            }
        }
    }
}
