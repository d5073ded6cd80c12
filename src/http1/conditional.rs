//! `If-None-Match` evaluation (RFC 9110 13.1.2).

use super::head::trim_ows;

/// Whether `If-None-Match: value` matches the current `etag`, i.e. whether a GET or HEAD should
/// answer 304 (a PUT would answer 412).
///
/// `etag` is the representation's entity-tag as sent in `ETag`, quotes included (`"abc"` or
/// `W/"abc"`). `*` matches any current representation. Comparison is weak (RFC 9110 8.8.3.2),
/// as If-None-Match requires: `W/` prefixes on either side are ignored. A malformed value
/// matches nothing, so the precondition is ignored and the full response is sent, which is
/// always safe.
pub fn if_none_match(value: &[u8], etag: &str) -> bool {
    let value = trim_ows(value);
    if value == b"*" {
        return true;
    }
    let ours = opaque_tag(etag.as_bytes());
    let mut rest = value;
    let mut matched = false;
    loop {
        // Skip list separators and OWS; empty list elements are allowed (RFC 9110 5.6.1.2).
        let start = rest
            .iter()
            .position(|&b| !matches!(b, b' ' | b'\t' | b','))
            .unwrap_or(rest.len());
        rest = &rest[start..];
        if rest.is_empty() {
            return matched;
        }
        let Some((tag, after)) = split_entity_tag(rest) else {
            return false;
        };
        matched |= !ours.is_empty() && tag == ours;
        let after = trim_ows(after);
        match after.first() {
            None => return matched,
            Some(b',') => rest = after,
            Some(_) => return false,
        }
    }
}

/// Splits `[W/]"etagc*"` off the front, returning the quoted opaque tag and the rest.
fn split_entity_tag(input: &[u8]) -> Option<(&[u8], &[u8])> {
    let input = input.strip_prefix(b"W/").unwrap_or(input);
    if input.first() != Some(&b'"') {
        return None;
    }
    let close = input[1..].iter().position(|&b| b == b'"')? + 1;
    let tag = &input[..=close];
    // etagc = %x21 / %x23-7E / obs-text
    if !tag[1..close]
        .iter()
        .all(|&b| b == 0x21 || (0x23..=0x7e).contains(&b) || b >= 0x80)
    {
        return None;
    }
    Some((tag, &input[close + 1..]))
}

/// Our own tag with any `W/` removed; empty if it is not a valid entity-tag.
fn opaque_tag(etag: &[u8]) -> &[u8] {
    match split_entity_tag(trim_ows(etag)) {
        Some((tag, [])) => tag,
        _ => b"",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn table() {
        let cases: &[(&str, &str, bool)] = &[
            ("\"abc\"", "\"abc\"", true),
            ("\"abc\"", "\"abd\"", false),
            ("*", "\"abc\"", true),
            (" * ", "\"abc\"", true),
            ("W/\"abc\"", "\"abc\"", true),
            ("\"abc\"", "W/\"abc\"", true),
            ("W/\"abc\"", "W/\"abc\"", true),
            ("\"x\", \"abc\"", "\"abc\"", true),
            ("\"x\",W/\"abc\" ,\"y\"", "\"abc\"", true),
            ("\"x\", \"y\"", "\"abc\"", false),
            (", ,\"abc\",", "\"abc\"", true),
            ("\"a,b\"", "\"a,b\"", true),
            ("\"a,b\"", "\"a\"", false),
            ("abc", "\"abc\"", false),
            ("\"abc", "\"abc\"", false),
            ("\"abc\"x", "\"abc\"", false),
            ("\"abc\" \"abc\"", "\"abc\"", false),
            ("w/\"abc\"", "\"abc\"", false),
            ("\"x\", *", "\"abc\"", false),
            ("", "\"abc\"", false),
            ("\"\"", "\"\"", true),
            ("\"a b\"", "\"a b\"", false),
            ("\"abc\"", "abc", false),
        ];
        for (value, etag, want) in cases {
            assert_eq!(
                if_none_match(value.as_bytes(), etag),
                *want,
                "{value:?} vs {etag:?}"
            );
        }
    }
}
