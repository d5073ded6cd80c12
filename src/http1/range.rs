//! Single byte-range requests (RFC 9110 14).

use super::head::trim_ows;

/// What a `Range` header asks of a representation `len` bytes long.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RangeOutcome {
    /// Serve the whole representation (200). Also the answer for anything we choose to ignore:
    /// other units, several ranges, or invalid syntax (RFC 9110 14.2 lets a server ignore
    /// `Range`; serving everything is what nginx does for multi-range when it is configured
    /// not to build multipart bodies, and it keeps responses single-part).
    Full,
    /// Serve bytes `start..=end_inclusive` (206); always `start <= end_inclusive < len`.
    Partial { start: u64, end_inclusive: u64 },
    /// No byte of the representation is selected (416 with `Content-Range: bytes */len`).
    Unsatisfiable,
}

/// Interprets a `Range` header value for a representation of `len` bytes.
///
/// Accepts one `bytes=` range (unit case-insensitive, OWS around it tolerated): `N-`,
/// `N-M` (M clipped to `len - 1`) or the suffix `-N` (the last N bytes; N = 0 selects
/// nothing). A start at or past `len` is unsatisfiable. Numbers of any length are accepted
/// and saturate at u64::MAX, which is past every representation, so nothing overflows.
pub fn parse_range(value: &[u8], len: u64) -> RangeOutcome {
    let value = trim_ows(value);
    let Some(eq) = value.iter().position(|&b| b == b'=') else {
        return RangeOutcome::Full;
    };
    if !trim_ows(&value[..eq]).eq_ignore_ascii_case(b"bytes") {
        return RangeOutcome::Full;
    }
    let spec = trim_ows(&value[eq + 1..]);
    if spec.contains(&b',') {
        return RangeOutcome::Full;
    }
    let Some(dash) = spec.iter().position(|&b| b == b'-') else {
        return RangeOutcome::Full;
    };
    let (first, last) = (&spec[..dash], &spec[dash + 1..]);
    if first.is_empty() {
        let Some(suffix) = parse_digits(last) else {
            return RangeOutcome::Full;
        };
        if suffix == 0 || len == 0 {
            return RangeOutcome::Unsatisfiable;
        }
        return RangeOutcome::Partial {
            start: len.saturating_sub(suffix),
            end_inclusive: len - 1,
        };
    }
    let Some(start) = parse_digits(first) else {
        return RangeOutcome::Full;
    };
    let end = if last.is_empty() {
        None
    } else {
        match parse_digits(last) {
            // `last-pos < first-pos` makes the range invalid, so it is ignored (14.1.1).
            Some(end) if end < start => return RangeOutcome::Full,
            Some(end) => Some(end),
            None => return RangeOutcome::Full,
        }
    };
    if start >= len {
        return RangeOutcome::Unsatisfiable;
    }
    let last_byte = len - 1;
    RangeOutcome::Partial {
        start,
        end_inclusive: end.map_or(last_byte, |e| e.min(last_byte)),
    }
}

/// 1*DIGIT, saturating at u64::MAX.
fn parse_digits(digits: &[u8]) -> Option<u64> {
    if digits.is_empty() {
        return None;
    }
    digits.iter().try_fold(0u64, |acc, &b| {
        b.is_ascii_digit()
            .then(|| acc.saturating_mul(10).saturating_add(u64::from(b - b'0')))
    })
}

/// `Content-Range` value for a 206: `bytes start-end/len`.
pub fn content_range(start: u64, end_inclusive: u64, len: u64) -> String {
    format!("bytes {start}-{end_inclusive}/{len}")
}

/// `Content-Range` value for a 416: `bytes */len`.
pub fn content_range_unsatisfied(len: u64) -> String {
    format!("bytes */{len}")
}

#[cfg(test)]
mod tests {
    use super::RangeOutcome::{Full, Partial, Unsatisfiable};
    use super::*;

    fn p(start: u64, end_inclusive: u64) -> RangeOutcome {
        Partial {
            start,
            end_inclusive,
        }
    }

    #[test]
    fn table() {
        let cases: &[(&str, u64, RangeOutcome)] = &[
            ("bytes=0-0", 10, p(0, 0)),
            ("bytes=0-9", 10, p(0, 9)),
            ("bytes=2-5", 10, p(2, 5)),
            ("bytes=2-", 10, p(2, 9)),
            ("bytes=2-100", 10, p(2, 9)),
            ("bytes=9-", 10, p(9, 9)),
            ("bytes=10-", 10, Unsatisfiable),
            ("bytes=10-20", 10, Unsatisfiable),
            ("bytes=-3", 10, p(7, 9)),
            ("bytes=-10", 10, p(0, 9)),
            ("bytes=-100", 10, p(0, 9)),
            ("bytes=-0", 10, Unsatisfiable),
            ("bytes=0-", 0, Unsatisfiable),
            ("bytes=-5", 0, Unsatisfiable),
            ("BYTES=1-2", 10, p(1, 2)),
            (" bytes = 1-2 ", 10, p(1, 2)),
            ("bytes=5-3", 10, Full),
            ("bytes=0-1,3-4", 10, Full),
            ("bytes=0-1,", 10, Full),
            ("bytes=", 10, Full),
            ("bytes=-", 10, Full),
            ("bytes=abc", 10, Full),
            ("bytes=1", 10, Full),
            ("bytes=+1-2", 10, Full),
            ("bytes=1--2", 10, Full),
            ("bytes=0x1-2", 10, Full),
            ("bytes=1 - 2", 10, Full),
            ("items=0-1", 10, Full),
            ("0-1", 10, Full),
            ("", 10, Full),
            ("bytes=99999999999999999999999999-", 10, Unsatisfiable),
            ("bytes=0-99999999999999999999999999", 10, p(0, 9)),
            ("bytes=-99999999999999999999999999", 10, p(0, 9)),
            (
                "bytes=18446744073709551614-",
                u64::MAX,
                p(u64::MAX - 1, u64::MAX - 1),
            ),
            (
                "bytes=99999999999999999999-99999999999999999999",
                u64::MAX,
                Unsatisfiable,
            ),
        ];
        for (value, len, want) in cases {
            assert_eq!(
                parse_range(value.as_bytes(), *len),
                *want,
                "{value:?} len {len}"
            );
        }
    }

    #[test]
    fn content_range_values() {
        assert_eq!(content_range(0, 9, 10), "bytes 0-9/10");
        assert_eq!(content_range_unsatisfied(10), "bytes */10");
    }
}
