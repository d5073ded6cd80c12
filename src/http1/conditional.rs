//! Conditional requests (RFC 9110 13): `If-Match`, `If-None-Match` and `If-Range`.
//!
//! sluice sends a strong `ETag` (the content's sha256) and no `Last-Modified`, so the
//! date-based preconditions (`If-Modified-Since`, `If-Unmodified-Since`) have no validator to
//! compare with and are ignored, as RFC 9110 13.1.3 and 13.1.4 allow; an `If-Range` that
//! carries a date can therefore never match and the full representation is sent.
//!
//! [`evaluate`] applies the precedence of RFC 9110 13.2.2 once for every front end, so a
//! request gets the same status whichever way it arrived.

use super::head::trim_ows;

/// What the preconditions of a request decide before its method is applied.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Precondition {
    /// Every precondition present holds: carry out the method.
    Proceed,
    /// `If-None-Match` matched on a GET or HEAD: answer 304.
    NotModified,
    /// A precondition failed: answer 412 and change nothing.
    Failed,
}

/// The conditional header fields of one request, as raw values.
#[derive(Debug, Clone, Copy, Default)]
pub struct Conditions<'a> {
    pub if_match: Option<&'a [u8]>,
    pub if_none_match: Option<&'a [u8]>,
}

/// Evaluates `If-Match` then `If-None-Match` (RFC 9110 13.2.2, steps 1 and 3) against the
/// current representation's entity-tag, `None` when the target has no current representation.
/// `safe` is true for GET and HEAD, where a matching `If-None-Match` means 304 rather than 412.
pub fn evaluate(
    conditions: Conditions<'_>,
    current_etag: Option<&str>,
    safe: bool,
) -> Precondition {
    if let Some(value) = conditions.if_match {
        if !if_match(value, current_etag) {
            return Precondition::Failed;
        }
    }
    if let Some(value) = conditions.if_none_match {
        let matched = match current_etag {
            Some(etag) => if_none_match(value, etag),
            // No current representation: nothing can match, `*` included (13.1.2).
            None => false,
        };
        if matched {
            return if safe {
                Precondition::NotModified
            } else {
                Precondition::Failed
            };
        }
    }
    Precondition::Proceed
}

/// Whether `If-Match: value` holds for the current representation (RFC 9110 13.1.1): `*`
/// holds when there is one; otherwise one listed entity-tag must match `etag` by the strong
/// comparison, so a weak tag on either side never matches. A malformed value never holds: the
/// client asked for a guard it did not spell, and refusing the change is the safe answer.
pub fn if_match(value: &[u8], current_etag: Option<&str>) -> bool {
    let Some(etag) = current_etag else {
        return false;
    };
    if trim_ows(value) == b"*" {
        return true;
    }
    let Some(ours) = strong_tag(etag.as_bytes()) else {
        return false;
    };
    let mut matched = false;
    let well_formed = for_each_tag(value, |weak, tag| matched |= !weak && tag == ours);
    well_formed && matched
}

/// Whether a `Range` request may be honoured under `If-Range: value` (RFC 9110 13.1.5): the
/// value must be one entity-tag that strongly matches `etag`. A weak tag, a date (sluice sends
/// no `Last-Modified`), a list or anything malformed is false, and the caller then ignores
/// `Range` and sends the whole current representation with 200: a client resuming a download
/// of an artifact that has changed meanwhile must not stitch two artifacts together.
pub fn if_range(value: &[u8], etag: &str) -> bool {
    let Some(ours) = strong_tag(etag.as_bytes()) else {
        return false;
    };
    match split_entity_tag_weak(trim_ows(value)) {
        Some((false, tag, [])) => tag == ours,
        _ => false,
    }
}

/// Calls `each(weak, opaque_tag)` for every entity-tag of a `#entity-tag` list; false when the
/// list is malformed (`*` is not a list element).
fn for_each_tag(value: &[u8], mut each: impl FnMut(bool, &[u8])) -> bool {
    let mut rest = trim_ows(value);
    loop {
        // Skip list separators and OWS; empty list elements are allowed (RFC 9110 5.6.1.2).
        let start = rest
            .iter()
            .position(|&b| !matches!(b, b' ' | b'\t' | b','))
            .unwrap_or(rest.len());
        rest = &rest[start..];
        if rest.is_empty() {
            return true;
        }
        let Some((weak, tag, after)) = split_entity_tag_weak(rest) else {
            return false;
        };
        each(weak, tag);
        let after = trim_ows(after);
        match after.first() {
            None => return true,
            Some(b',') => rest = after,
            Some(_) => return false,
        }
    }
}

/// Our own tag's quoted opaque part if it is a strong, valid entity-tag.
fn strong_tag(etag: &[u8]) -> Option<&[u8]> {
    match split_entity_tag_weak(trim_ows(etag)) {
        Some((false, tag, [])) => Some(tag),
        _ => None,
    }
}

/// [`split_entity_tag`], also saying whether the tag was weak (`W/`).
fn split_entity_tag_weak(input: &[u8]) -> Option<(bool, &[u8], &[u8])> {
    let weak = input.starts_with(b"W/");
    split_entity_tag(input).map(|(tag, rest)| (weak, tag, rest))
}

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
    let mut matched = false;
    let well_formed = for_each_tag(value, |_, tag| matched |= !ours.is_empty() && tag == ours);
    well_formed && matched
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

    /// Checks `f(value, etag)` against each row's answer.
    fn check<E: Copy + std::fmt::Debug>(cases: &[(&str, E, bool)], f: impl Fn(&[u8], E) -> bool) {
        for &(value, etag, want) in cases {
            assert_eq!(f(value.as_bytes(), etag), want, "{value:?} vs {etag:?}");
        }
    }

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
        check(cases, if_none_match);
    }

    #[test]
    fn if_match_table() {
        let tag = Some("\"abc\"");
        let cases: &[(&str, Option<&str>, bool)] = &[
            ("\"abc\"", tag, true),
            ("\"x\", \"abc\"", tag, true),
            ("\"abd\"", tag, false),
            // Strong comparison: a weak tag never matches.
            ("W/\"abc\"", tag, false),
            ("\"abc\"", Some("W/\"abc\""), false),
            ("*", tag, true),
            ("*", None, false),
            ("\"abc\"", None, false),
            ("abc", tag, false),
            ("\"abc\" junk", tag, false),
            ("", tag, false),
        ];
        check(cases, if_match);
    }

    #[test]
    fn if_range_table() {
        let cases: &[(&str, &str, bool)] = &[
            ("\"abc\"", "\"abc\"", true),
            (" \"abc\" ", "\"abc\"", true),
            ("\"abd\"", "\"abc\"", false),
            ("W/\"abc\"", "\"abc\"", false),
            ("\"abc\"", "W/\"abc\"", false),
            ("\"abc\", \"abc\"", "\"abc\"", false),
            ("*", "\"abc\"", false),
            ("Wed, 21 Oct 2015 07:28:00 GMT", "\"abc\"", false),
            ("", "\"abc\"", false),
        ];
        check(cases, if_range);
    }

    #[test]
    fn evaluate_follows_rfc9110_precedence() {
        use Precondition::{Failed, NotModified, Proceed};
        let tag = Some("\"abc\"");
        let c = |im: Option<&'static str>, inm: Option<&'static str>| Conditions {
            if_match: im.map(str::as_bytes),
            if_none_match: inm.map(str::as_bytes),
        };
        let cases: &[(Conditions<'_>, Option<&str>, bool, Precondition)] = &[
            (c(None, None), tag, false, Proceed),
            (c(None, None), None, false, Proceed),
            // If-Match on a write.
            (c(Some("\"abc\""), None), tag, false, Proceed),
            (c(Some("\"old\""), None), tag, false, Failed),
            (c(Some("*"), None), None, false, Failed),
            (c(Some("\"abc\""), None), None, false, Failed),
            // Create-only writes.
            (c(None, Some("*")), tag, false, Failed),
            (c(None, Some("*")), None, false, Proceed),
            (c(None, Some("\"abc\"")), tag, false, Failed),
            (c(None, Some("\"old\"")), tag, false, Proceed),
            // Reads: If-None-Match means 304, If-Match still 412.
            (c(None, Some("\"abc\"")), tag, true, NotModified),
            (c(None, Some("*")), tag, true, NotModified),
            (c(Some("\"old\""), None), tag, true, Failed),
            // If-Match is evaluated first (13.2.2 step 1).
            (c(Some("\"old\""), Some("\"abc\"")), tag, true, Failed),
        ];
        for (i, (conditions, etag, safe, want)) in cases.iter().enumerate() {
            assert_eq!(evaluate(*conditions, *etag, *safe), *want, "case {i}");
        }
    }
}
