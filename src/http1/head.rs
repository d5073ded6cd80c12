//! Request head parsing: a byte scanner for what httparse tolerates but we must not
//! (bare LF, bare CR, NUL, obs-fold, oversized heads and targets), then httparse for the
//! grammar, then the framing and connection rules of RFC 9112.

use super::{Framing, Limits, Method, Status};

/// Size of the fixed header array inside [`RequestHead`]. A fixed array, not a caller-provided
/// slice, keeps the API to one lifetime and makes the head path allocation-free; at 32 bytes
/// per entry the head is about 4 KiB, cheap to keep on an engine thread's stack.
pub const HEADERS_CAPACITY: usize = 128;

/// Why a head was rejected. Every variant means: answer [`HeadError::status`] with
/// `Connection: close` and close, because the rest of the stream cannot be framed reliably.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HeadError {
    /// Request line or a header line breaks the grammar (httparse rejected it). 400.
    Malformed,
    /// A CR not followed by LF. 400.
    BareCr,
    /// An LF not preceded by CR. Rejected rather than tolerated (RFC 9112 2.2 allows either):
    /// a proxy in front of us that disagrees about line ends is how smuggling starts, and no
    /// HTTP client we serve (curl, Bazel, Gradle, ccache) sends bare LF. 400.
    BareLf,
    /// A NUL byte in the head. 400.
    Nul,
    /// A line starting with SP or HTAB: obs-fold, or whitespace before the first field. 400.
    ObsFold,
    /// The request-target is neither origin-form, absolute-form (`http`/`https`), nor `*` for
    /// OPTIONS; or it carries a fragment. 400.
    InvalidTarget,
    /// `Content-Length` together with `Transfer-Encoding`. 400.
    ContentLengthWithTransferEncoding,
    /// `Content-Length` more than once, even with equal values. 400.
    ContentLengthRepeated,
    /// `Content-Length` that is not 1*DIGIT fitting in u64 (signs, inner spaces, lists, empty). 400.
    ContentLengthInvalid,
    /// `Transfer-Encoding` other than exactly one `chunked`. 400, not 501: RFC 9112 6.3 makes
    /// 400 mandatory when chunked is not final, and DESIGN.md lists an unknown
    /// Transfer-Encoding among the malformed inputs answered 4xx; one status for every
    /// doubtful framing keeps the ring engine and the hyper fallback easy to compare.
    TransferEncodingInvalid,
    /// `Transfer-Encoding` in an HTTP/1.0 request (RFC 9112 6.1: framing is faulty). 400.
    TransferEncodingInHttp10,
    /// HTTP/1.1 request without `Host`. 400.
    HostMissing,
    /// More than one `Host`. 400.
    HostRepeated,
    /// `Expect` other than `100-continue`. 417.
    ExpectationFailed,
    /// Head longer than [`Limits::head_bytes_max`]. 431.
    HeadTooLarge,
    /// More than [`Limits::headers_max`] header fields. 431.
    TooManyHeaders,
    /// Request-target longer than [`Limits::uri_bytes_max`]. 414.
    UriTooLong,
    /// Well-formed `HTTP/x.y` other than 1.0 or 1.1. 505.
    VersionUnsupported,
}

impl HeadError {
    /// Status code to answer with before closing.
    pub fn status(&self) -> u16 {
        match self {
            HeadError::HeadTooLarge | HeadError::TooManyHeaders => 431,
            HeadError::UriTooLong => 414,
            HeadError::VersionUnsupported => 505,
            HeadError::ExpectationFailed => 417,
            _ => 400,
        }
    }

    /// Short human description, for logs and the error body. Never includes request bytes.
    pub fn reason(&self) -> &'static str {
        match self {
            HeadError::Malformed => "malformed request line or header",
            HeadError::BareCr => "bare CR in request head",
            HeadError::BareLf => "bare LF line ending in request head",
            HeadError::Nul => "NUL byte in request head",
            HeadError::ObsFold => "obsolete line folding in request head",
            HeadError::InvalidTarget => "invalid request target",
            HeadError::ContentLengthWithTransferEncoding => {
                "Content-Length together with Transfer-Encoding"
            }
            HeadError::ContentLengthRepeated => "repeated Content-Length",
            HeadError::ContentLengthInvalid => "invalid Content-Length",
            HeadError::TransferEncodingInvalid => "Transfer-Encoding other than chunked",
            HeadError::TransferEncodingInHttp10 => "Transfer-Encoding in an HTTP/1.0 request",
            HeadError::HostMissing => "missing Host",
            HeadError::HostRepeated => "repeated Host",
            HeadError::ExpectationFailed => "unsupported Expect",
            HeadError::HeadTooLarge => "request head too large",
            HeadError::TooManyHeaders => "too many header fields",
            HeadError::UriTooLong => "request target too long",
            HeadError::VersionUnsupported => "HTTP version not supported",
        }
    }
}

impl core::fmt::Display for HeadError {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        write!(f, "{} ({})", self.reason(), self.status())
    }
}

impl std::error::Error for HeadError {}

/// Where the scanner is inside the head.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ScanPhase {
    /// Before the request line: empty lines are skipped (RFC 9112 2.2 robustness).
    Leading,
    /// Inside the request line; counts spaces so the target's length is known early.
    RequestLine { spaces: u8, target_bytes: usize },
    /// Inside the field lines.
    Fields,
}

/// Resumable byte scanner for a head. It checks each byte once, so feeding a head one byte at
/// a time costs O(n) overall, and it finds the end of the head before httparse runs once.
#[derive(Debug, Clone, Copy)]
pub(crate) struct HeadScanner {
    /// Bytes of the buffer already checked.
    pos: usize,
    /// Offset where the current line starts.
    line_start: usize,
    phase: ScanPhase,
}

impl HeadScanner {
    pub(crate) fn new() -> Self {
        HeadScanner {
            pos: 0,
            line_start: 0,
            phase: ScanPhase::Leading,
        }
    }

    /// Bytes already checked; the caller's buffer must keep them unchanged.
    pub(crate) fn scanned(&self) -> usize {
        self.pos
    }

    /// Scans on from where the last call stopped. `buf` must start with the bytes given
    /// before. Returns the head length once the blank line is seen.
    pub(crate) fn scan(&mut self, buf: &[u8], limits: &Limits) -> Result<Option<usize>, HeadError> {
        let head_bytes_max = limits.head_bytes_max;
        while self.pos < buf.len() {
            if self.pos >= head_bytes_max {
                return Err(HeadError::HeadTooLarge);
            }
            let byte = buf[self.pos];
            match byte {
                0 => return Err(HeadError::Nul),
                b'\r' => {
                    // The LF at pos + 1 must itself fit in the limit, so a CR in the last
                    // allowed byte already means the head cannot end in time.
                    if self.pos + 1 >= head_bytes_max {
                        return Err(HeadError::HeadTooLarge);
                    }
                    let Some(&next) = buf.get(self.pos + 1) else {
                        // The LF may still come; the CR is re-examined next time.
                        break;
                    };
                    if next != b'\n' {
                        return Err(HeadError::BareCr);
                    }
                    let line_empty = self.pos == self.line_start;
                    self.pos += 2;
                    self.line_start = self.pos;
                    match self.phase {
                        ScanPhase::Leading => {}
                        ScanPhase::RequestLine { .. } => self.phase = ScanPhase::Fields,
                        ScanPhase::Fields => {
                            if line_empty {
                                return Ok(Some(self.pos));
                            }
                        }
                    }
                    continue;
                }
                b'\n' => return Err(HeadError::BareLf),
                _ => {}
            }
            match &mut self.phase {
                ScanPhase::Leading => {
                    self.phase = ScanPhase::RequestLine {
                        spaces: 0,
                        target_bytes: 0,
                    };
                }
                ScanPhase::RequestLine {
                    spaces,
                    target_bytes,
                } => {
                    if byte == b' ' {
                        *spaces = spaces.saturating_add(1);
                    } else if *spaces == 1 {
                        *target_bytes += 1;
                        if *target_bytes > limits.uri_bytes_max {
                            return Err(HeadError::UriTooLong);
                        }
                    }
                }
                ScanPhase::Fields => {
                    if self.pos == self.line_start && (byte == b' ' || byte == b'\t') {
                        return Err(HeadError::ObsFold);
                    }
                }
            }
            self.pos += 1;
        }
        if self.pos >= head_bytes_max {
            return Err(HeadError::HeadTooLarge);
        }
        Ok(None)
    }
}

/// A parsed, validated request head borrowing the caller's buffer.
///
/// Built only by [`parse_head`] and [`crate::http1::RequestReader`], so every value here has
/// passed the framing rules: a handler can trust [`RequestHead::framing`] without re-checking
/// headers.
#[derive(Debug, Clone)]
pub struct RequestHead<'b> {
    method: Method,
    method_str: &'b str,
    target: &'b str,
    path: &'b str,
    query: Option<&'b str>,
    version_minor: u8,
    headers: [httparse::Header<'b>; HEADERS_CAPACITY],
    headers_len: usize,
    framing: Framing,
    keep_alive: bool,
    expect_continue: bool,
    head_len: usize,
}

impl<'b> RequestHead<'b> {
    /// The method, mapped to [`Method`].
    pub fn method(&self) -> Method {
        self.method
    }

    /// The method token exactly as sent.
    pub fn method_str(&self) -> &'b str {
        self.method_str
    }

    /// The request-target exactly as sent (origin-form, absolute-form or `*`).
    pub fn target(&self) -> &'b str {
        self.target
    }

    /// The path: the target without its query; for absolute-form (`http://host/p?q`) just `/p`,
    /// or `/` when the URI has no path; `*` for `OPTIONS *`. Not percent-decoded.
    pub fn path(&self) -> &'b str {
        self.path
    }

    /// The query after `?`, without the `?`, if any.
    pub fn query(&self) -> Option<&'b str> {
        self.query
    }

    /// Minor HTTP version: 0 for HTTP/1.0, 1 for HTTP/1.1.
    pub fn version_minor(&self) -> u8 {
        self.version_minor
    }

    /// Value of the first header named `name` (ASCII case-insensitive), OWS trimmed.
    pub fn header(&self, name: &str) -> Option<&'b [u8]> {
        self.headers()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v)
    }

    /// All header fields in the order received, as `(name, value)`; values OWS trimmed.
    pub fn headers(&self) -> Headers<'_, 'b> {
        Headers {
            inner: self.headers[..self.headers_len].iter(),
        }
    }

    /// How the body is delimited.
    pub fn framing(&self) -> Framing {
        self.framing
    }

    /// Whether the connection may carry another request after this one: HTTP/1.1 unless
    /// `Connection: close`; HTTP/1.0 only with `Connection: keep-alive` and no `close`.
    pub fn keep_alive(&self) -> bool {
        self.keep_alive
    }

    /// `Expect: 100-continue` on an HTTP/1.1 request: the client waits for `100 Continue` (or
    /// the final status) before sending the body. Always false for HTTP/1.0, which RFC 9110
    /// 10.1.1 says must ignore the expectation.
    pub fn expect_continue(&self) -> bool {
        self.expect_continue
    }

    /// Bytes of the buffer the head occupies; the body (or the next request) starts here.
    pub fn head_len(&self) -> usize {
        self.head_len
    }
}

/// Iterator over a head's `(name, value)` pairs.
#[derive(Debug, Clone)]
pub struct Headers<'h, 'b> {
    inner: core::slice::Iter<'h, httparse::Header<'b>>,
}

impl<'b> Iterator for Headers<'_, 'b> {
    type Item = (&'b str, &'b [u8]);

    fn next(&mut self) -> Option<Self::Item> {
        self.inner.next().map(|h| (h.name, h.value))
    }
}

/// Parses and validates a request head at the start of `buf`.
///
/// Returns [`Status::Partial`] while the head is incomplete and still within the limits;
/// limits are enforced on partial heads too, so callers can stop reading as soon as a head
/// can no longer be valid. On success [`RequestHead::head_len`] bytes belong to the head.
/// Allocates nothing.
pub fn parse_head<'b>(
    buf: &'b [u8],
    limits: &Limits,
) -> Result<Status<RequestHead<'b>>, HeadError> {
    let mut scanner = HeadScanner::new();
    match scanner.scan(buf, limits)? {
        None => Ok(Status::Partial),
        Some(head_len) => finish_head(buf, head_len, limits).map(Status::Complete),
    }
}

/// Parses a head whose end the scanner found at `head_len`.
pub(crate) fn finish_head<'b>(
    buf: &'b [u8],
    head_len: usize,
    limits: &Limits,
) -> Result<RequestHead<'b>, HeadError> {
    let head_bytes = &buf[..head_len];
    let mut headers = [httparse::EMPTY_HEADER; HEADERS_CAPACITY];
    let headers_max = limits.headers_max.min(HEADERS_CAPACITY);
    let (method_str, target, version_minor, headers_len) = {
        let mut req = httparse::Request::new(&mut headers[..headers_max]);
        match req.parse(head_bytes) {
            Ok(httparse::Status::Complete(n)) if n == head_len => {}
            // The scanner and httparse disagree on where the head ends: refuse rather than
            // guess, since that disagreement is exactly what smuggling exploits.
            Ok(_) => return Err(HeadError::Malformed),
            Err(httparse::Error::TooManyHeaders) => return Err(HeadError::TooManyHeaders),
            Err(httparse::Error::Version) => return Err(version_error(head_bytes)),
            Err(_) => return Err(HeadError::Malformed),
        }
        match (req.method, req.path, req.version) {
            (Some(m), Some(p), Some(v)) => (m, p, v, req.headers.len()),
            _ => return Err(HeadError::Malformed),
        }
    };
    if target.len() > limits.uri_bytes_max {
        return Err(HeadError::UriTooLong);
    }
    let method = Method::from_token(method_str);
    let (path, query) = split_target(method, target)?;

    let mut content_length: Option<u64> = None;
    let mut content_length_count = 0usize;
    let mut transfer_encoding: Option<&[u8]> = None;
    let mut transfer_encoding_count = 0usize;
    let mut host_count = 0usize;
    let mut connection_close = false;
    let mut connection_keep_alive = false;
    let mut expect_continue = false;
    let mut expect_other = false;
    for header in &headers[..headers_len] {
        let name = header.name;
        let value = trim_ows(header.value);
        if name.eq_ignore_ascii_case("content-length") {
            content_length_count += 1;
            content_length = parse_content_length(value);
        } else if name.eq_ignore_ascii_case("transfer-encoding") {
            transfer_encoding_count += 1;
            transfer_encoding = Some(value);
        } else if name.eq_ignore_ascii_case("host") {
            host_count += 1;
        } else if name.eq_ignore_ascii_case("connection") {
            // A value with bytes outside visible ASCII (obs-text) says nothing, as for hyper
            // (its `to_str` fails and the header is skipped): otherwise an HTTP/1.0 request
            // with `keep-alive` among such bytes stays open here and closes on the fallback
            // (found by http1_vs_hyper, fuzz/regressions/http1_vs_hyper/connection-obs-text).
            let visible = value
                .iter()
                .all(|&b| b == b'\t' || (0x20..=0x7e).contains(&b));
            for token in value
                .split(|&b| b == b',')
                .map(trim_ows)
                .filter(|_| visible)
            {
                connection_close |= token.eq_ignore_ascii_case(b"close");
                connection_keep_alive |= token.eq_ignore_ascii_case(b"keep-alive");
            }
        } else if name.eq_ignore_ascii_case("expect") {
            if value.eq_ignore_ascii_case(b"100-continue") {
                expect_continue = true;
            } else {
                expect_other = true;
            }
        }
    }

    // Framing first: a doubtful body length is the most dangerous fault, and every later
    // check also ends in "answer and close".
    let framing = match (content_length_count, transfer_encoding_count) {
        (0, 0) => Framing::None,
        (_, 1..) if content_length_count > 0 => {
            return Err(HeadError::ContentLengthWithTransferEncoding)
        }
        (0, _) => {
            if version_minor == 0 {
                return Err(HeadError::TransferEncodingInHttp10);
            }
            match transfer_encoding {
                Some(te) if transfer_encoding_count == 1 && te.eq_ignore_ascii_case(b"chunked") => {
                    Framing::Chunked
                }
                _ => return Err(HeadError::TransferEncodingInvalid),
            }
        }
        (1, 0) => match content_length {
            Some(n) => Framing::Length(n),
            None => return Err(HeadError::ContentLengthInvalid),
        },
        _ => return Err(HeadError::ContentLengthRepeated),
    };
    match host_count {
        0 if version_minor == 1 => return Err(HeadError::HostMissing),
        0 | 1 => {}
        _ => return Err(HeadError::HostRepeated),
    }
    if expect_other {
        return Err(HeadError::ExpectationFailed);
    }
    let keep_alive = match version_minor {
        1 => !connection_close,
        _ => connection_keep_alive && !connection_close,
    };
    Ok(RequestHead {
        method,
        method_str,
        target,
        path,
        query,
        version_minor,
        headers,
        headers_len,
        framing,
        keep_alive,
        expect_continue: expect_continue && version_minor == 1,
        head_len,
    })
}

/// httparse reports any version other than HTTP/1.0 and 1.1 the same way; a well-formed
/// `HTTP/d.d` we do not speak is 505, anything else is a malformed request line (400).
fn version_error(head: &[u8]) -> HeadError {
    let start = head
        .iter()
        .position(|&b| b != b'\r' && b != b'\n')
        .unwrap_or(head.len());
    let line = &head[start..];
    let end = line.iter().position(|&b| b == b'\r').unwrap_or(line.len());
    let line = &line[..end];
    let version = match line.iter().rposition(|&b| b == b' ') {
        Some(sp) => &line[sp + 1..],
        None => return HeadError::Malformed,
    };
    match version {
        [b'H', b'T', b'T', b'P', b'/', major, b'.', minor]
            if major.is_ascii_digit() && minor.is_ascii_digit() =>
        {
            HeadError::VersionUnsupported
        }
        _ => HeadError::Malformed,
    }
}

/// Splits the target into path and query, reducing absolute-form to its path.
fn split_target(method: Method, target: &str) -> Result<(&str, Option<&str>), HeadError> {
    if target == "*" {
        // Asterisk-form exists only for server-wide OPTIONS (RFC 9112 3.2.4).
        return match method {
            Method::Options => Ok(("*", None)),
            _ => Err(HeadError::InvalidTarget),
        };
    }
    // A fragment is never sent by a conforming client (RFC 9112 3.2); one here would make the
    // routed key depend on who strips it.
    if target.contains('#') {
        return Err(HeadError::InvalidTarget);
    }
    // Only characters RFC 3986 allows in a URI; the rest (`"<>\^`{|}`, non-ASCII) must be
    // percent-encoded by the client. Proxies differ on whether they reject, re-encode or pass
    // such bytes, and the hyper fallback refuses some of them (found by the `http1_vs_hyper`
    // fuzz target): one rule keeps both front ends, and any proxy, on the same routed key.
    if !target.bytes().all(is_uri_byte) {
        return Err(HeadError::InvalidTarget);
    }
    let origin = if target.starts_with('/') {
        target
    } else {
        let rest = strip_prefix_ignore_case(target, "http://")
            .or_else(|| strip_prefix_ignore_case(target, "https://"))
            .ok_or(HeadError::InvalidTarget)?;
        let authority_end = rest.find(['/', '?']).unwrap_or(rest.len());
        if !is_valid_authority(&rest[..authority_end]) {
            return Err(HeadError::InvalidTarget);
        }
        let after = &rest[authority_end..];
        if after.starts_with('/') {
            after
        } else {
            // `http://host` or `http://host?q`: the path is `/` (RFC 9112 3.2.1).
            return Ok(("/", after.strip_prefix('?')));
        }
    };
    Ok(match origin.split_once('?') {
        Some((path, query)) => (path, Some(query)),
        None => (origin, None),
    })
}

/// `host [":" port]` of an absolute-form target (RFC 3986 3.2): a reg-name without
/// percent-escapes, or a bracketed IPv6 literal, then an all-digit (possibly empty) port. No
/// userinfo (RFC 9110 4.2.4). Routing ignores the authority, but a proxy may route by it, and
/// hyper's URI parser refuses malformed ones (found by the `http1_vs_hyper` fuzz target), so
/// both front ends answer 400 rather than guess.
fn is_valid_authority(authority: &str) -> bool {
    let (host_ok, after) = match authority.strip_prefix('[') {
        Some(rest) => match rest.split_once(']') {
            Some((literal, after)) => (
                !literal.is_empty()
                    && literal.bytes().filter(|&b| b == b':').count() <= 8
                    && literal
                        .bytes()
                        .all(|b| b.is_ascii_hexdigit() || b == b':' || b == b'.'),
                after,
            ),
            None => return false,
        },
        None => {
            let (host, after) = authority.split_at(authority.find(':').unwrap_or(authority.len()));
            (
                !host.is_empty()
                    && host
                        .bytes()
                        .all(|b| b.is_ascii_alphanumeric() || b"-._~!$&'()*+,;=".contains(&b)),
                after,
            )
        }
    };
    host_ok
        && match after.strip_prefix(':') {
            Some(port) => port.bytes().all(|b| b.is_ascii_digit()),
            None => after.is_empty(),
        }
}

/// `unreserved / reserved / "%"` from RFC 3986 2: the bytes a URI may contain as they are.
fn is_uri_byte(byte: u8) -> bool {
    byte.is_ascii_alphanumeric() || b"-._~:/?#[]@!$&'()*+,;=%".contains(&byte)
}

fn strip_prefix_ignore_case<'a>(s: &'a str, prefix: &str) -> Option<&'a str> {
    let head = s.get(..prefix.len())?;
    head.eq_ignore_ascii_case(prefix)
        .then(|| &s[prefix.len()..])
}

/// `Content-Length = 1*DIGIT` (RFC 9110 8.6), fitting in u64. Leading zeros are digits and
/// allowed; anything else (sign, inner space, comma list, empty) is not a length.
fn parse_content_length(value: &[u8]) -> Option<u64> {
    if value.is_empty() {
        return None;
    }
    value.iter().try_fold(0u64, |acc, &b| {
        if !b.is_ascii_digit() {
            return None;
        }
        acc.checked_mul(10)?.checked_add(u64::from(b - b'0'))
    })
}

/// Strips optional whitespace (SP / HTAB) from both ends.
pub(crate) fn trim_ows(value: &[u8]) -> &[u8] {
    let start = value
        .iter()
        .position(|&b| b != b' ' && b != b'\t')
        .unwrap_or(value.len());
    let end = value
        .iter()
        .rposition(|&b| b != b' ' && b != b'\t')
        .map_or(start, |i| i + 1);
    &value[start..end]
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::http1::samples::{Want, HEADS};

    fn outcome(buf: &[u8], limits: &Limits) -> Want {
        match parse_head(buf, limits) {
            Ok(Status::Complete(head)) => Want::Head {
                method: head.method(),
                path: String::leak(head.path().to_owned()),
                framing: head.framing(),
                keep_alive: head.keep_alive(),
            },
            Ok(Status::Partial) => Want::Partial,
            Err(e) => Want::Reject(e.status()),
        }
    }

    #[test]
    fn table() {
        assert!(HEADS.len() >= 40);
        let limits = Limits::default();
        for (name, bytes, want) in HEADS {
            assert_eq!(outcome(bytes, &limits), *want, "case {name}");
            if let Want::Head { .. } = want {
                let Ok(Status::Complete(head)) = parse_head(bytes, &limits) else {
                    unreachable!()
                };
                assert_eq!(head.head_len(), bytes.len(), "case {name}");
            }
        }
    }

    /// A prefix of any input is either still partial or already fails with the same status
    /// the whole input fails with: limits and byte checks fire as early as possible and never
    /// contradict the final answer.
    #[test]
    fn prefixes_agree_with_whole() {
        let limits = Limits::default();
        for (name, bytes, want) in HEADS {
            for cut in 0..bytes.len() {
                let got = outcome(&bytes[..cut], &limits);
                match want {
                    Want::Reject(status) => assert!(
                        got == Want::Partial || got == Want::Reject(*status),
                        "case {name} cut {cut}: {got:?}"
                    ),
                    _ => assert_eq!(got, Want::Partial, "case {name} cut {cut}"),
                }
            }
        }
    }

    #[test]
    fn accessors() {
        let buf = b"PUT /cas/abc?x=1 HTTP/1.1\r\nHost: h\r\nX-Multi: one\r\nx-multi: two\r\n\
Expect: 100-continue\r\nContent-Length: 3\r\n\r\nabc";
        let Ok(Status::Complete(head)) = parse_head(buf, &Limits::default()) else {
            panic!("expected a head")
        };
        assert_eq!(head.method(), Method::Put);
        assert_eq!(head.method_str(), "PUT");
        assert_eq!(head.target(), "/cas/abc?x=1");
        assert_eq!(head.path(), "/cas/abc");
        assert_eq!(head.query(), Some("x=1"));
        assert_eq!(head.version_minor(), 1);
        assert_eq!(head.header("HOST"), Some(&b"h"[..]));
        assert_eq!(head.header("X-MULTI"), Some(&b"one"[..]));
        assert_eq!(head.header("absent"), None);
        let names: Vec<&str> = head.headers().map(|(n, _)| n).collect();
        assert_eq!(
            names,
            ["Host", "X-Multi", "x-multi", "Expect", "Content-Length"]
        );
        assert!(head.expect_continue());
        assert!(head.keep_alive());
        assert_eq!(head.framing(), Framing::Length(3));
        assert_eq!(&buf[head.head_len()..], b"abc");
    }

    #[test]
    fn expect_continue_ignored_in_http10() {
        let buf = b"PUT /k HTTP/1.0\r\nExpect: 100-continue\r\nContent-Length: 1\r\n\r\n";
        let Ok(Status::Complete(head)) = parse_head(buf, &Limits::default()) else {
            panic!("expected a head")
        };
        assert!(!head.expect_continue());
    }

    fn head_with_padding(padding_bytes: usize) -> Vec<u8> {
        let mut buf = b"GET / HTTP/1.1\r\nHost: a\r\nX-Pad: ".to_vec();
        buf.resize(buf.len() + padding_bytes, b'p');
        buf.extend_from_slice(b"\r\n\r\n");
        buf
    }

    #[test]
    fn head_size_limit() {
        let limits = Limits {
            head_bytes_max: 256,
            ..Limits::default()
        };
        let base = head_with_padding(0).len();
        let exact = head_with_padding(256 - base);
        assert_eq!(exact.len(), 256);
        assert!(matches!(
            parse_head(&exact, &limits),
            Ok(Status::Complete(_))
        ));
        let over = head_with_padding(257 - base);
        assert_eq!(
            parse_head(&over, &limits).err(),
            Some(HeadError::HeadTooLarge)
        );
        // Still partial but already past the limit: answered without waiting for the end.
        assert_eq!(
            parse_head(&over[..257], &limits).err(),
            Some(HeadError::HeadTooLarge)
        );
        // Exactly the limit and still no end: no completion can fit any more.
        assert_eq!(
            parse_head(&over[..256], &limits).err(),
            Some(HeadError::HeadTooLarge)
        );
        assert!(matches!(
            parse_head(&over[..255], &limits),
            Ok(Status::Partial)
        ));
        // The default limit, with a head well past it.
        let big = head_with_padding(20 * 1024);
        assert_eq!(
            parse_head(&big, &Limits::default()).err(),
            Some(HeadError::HeadTooLarge)
        );
        assert_eq!(HeadError::HeadTooLarge.status(), 431);
    }

    #[test]
    fn uri_limit() {
        let limits = Limits {
            uri_bytes_max: 64,
            ..Limits::default()
        };
        let request = |target_bytes: usize| {
            let mut buf = b"GET /".to_vec();
            buf.resize(buf.len() + target_bytes - 1, b'a');
            buf.extend_from_slice(b" HTTP/1.1\r\nHost: a\r\n\r\n");
            buf
        };
        assert!(matches!(
            parse_head(&request(64), &limits),
            Ok(Status::Complete(_))
        ));
        let long = request(65);
        assert_eq!(
            parse_head(&long, &limits).err(),
            Some(HeadError::UriTooLong)
        );
        // Detected while the request line is still arriving.
        assert_eq!(
            parse_head(&long[..4 + 65], &limits).err(),
            Some(HeadError::UriTooLong)
        );
        assert!(matches!(
            parse_head(&long[..4 + 64], &limits),
            Ok(Status::Partial)
        ));
        // Default limit: a 9 KiB target is 414 even though the head fits in 16 KiB.
        let mut big = b"GET /".to_vec();
        big.resize(9 * 1024, b'a');
        assert_eq!(
            parse_head(&big, &Limits::default()).err(),
            Some(HeadError::UriTooLong)
        );
        assert_eq!(HeadError::UriTooLong.status(), 414);
    }

    fn head_with_headers(count: usize) -> Vec<u8> {
        let mut buf = b"GET / HTTP/1.1\r\nHost: a\r\n".to_vec();
        for i in 1..count {
            buf.extend_from_slice(format!("X-H{i}: v\r\n").as_bytes());
        }
        buf.extend_from_slice(b"\r\n");
        buf
    }

    #[test]
    fn header_count_limit() {
        let with_max = |headers_max: usize| Limits {
            headers_max,
            ..Limits::default()
        };
        // (limits, the most headers they take). Above the array's capacity the capacity is
        // the limit.
        let cases = [
            (Limits::default(), 100),
            (with_max(2), 2),
            (with_max(10_000), HEADERS_CAPACITY),
        ];
        for (limits, most) in cases {
            assert!(
                matches!(
                    parse_head(&head_with_headers(most), &limits),
                    Ok(Status::Complete(_))
                ),
                "{most} headers"
            );
            assert_eq!(
                parse_head(&head_with_headers(most + 1), &limits).err(),
                Some(HeadError::TooManyHeaders),
                "{} headers",
                most + 1
            );
        }
        assert_eq!(HeadError::TooManyHeaders.status(), 431);
    }

    #[test]
    fn errors_have_status_and_reason() {
        let all = [
            HeadError::Malformed,
            HeadError::BareCr,
            HeadError::BareLf,
            HeadError::Nul,
            HeadError::ObsFold,
            HeadError::InvalidTarget,
            HeadError::ContentLengthWithTransferEncoding,
            HeadError::ContentLengthRepeated,
            HeadError::ContentLengthInvalid,
            HeadError::TransferEncodingInvalid,
            HeadError::TransferEncodingInHttp10,
            HeadError::HostMissing,
            HeadError::HostRepeated,
            HeadError::ExpectationFailed,
            HeadError::HeadTooLarge,
            HeadError::TooManyHeaders,
            HeadError::UriTooLong,
            HeadError::VersionUnsupported,
        ];
        for e in all {
            assert!((400..=505).contains(&e.status()), "{e:?}");
            assert!(!e.reason().is_empty(), "{e:?}");
        }
    }

    #[test]
    fn specific_errors() {
        let limits = Limits::default();
        let cases: &[(&[u8], HeadError)] = &[
            (b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 1\r\nTransfer-Encoding: chunked\r\n\r\n", HeadError::ContentLengthWithTransferEncoding),
            (b"PUT / HTTP/1.1\r\nHost: a\r\nContent-Length: 1\r\nContent-Length: 1\r\n\r\n", HeadError::ContentLengthRepeated),
            (b"PUT / HTTP/1.1\r\nHost: a\r\nContent-Length: -1\r\n\r\n", HeadError::ContentLengthInvalid),
            (b"PUT / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: gzip, chunked\r\n\r\n", HeadError::TransferEncodingInvalid),
            (b"PUT / HTTP/1.0\r\nTransfer-Encoding: chunked\r\n\r\n", HeadError::TransferEncodingInHttp10),
            (b"GET / HTTP/1.1\r\nHost: a\r\nX: a\r\n b\r\n\r\n", HeadError::ObsFold),
            (b"GET / HTTP/1.1\r\nHost: a\rX\r\n\r\n", HeadError::BareCr),
            (b"GET / HTTP/1.1\nHost: a\r\n\r\n", HeadError::BareLf),
            (b"GET / HTTP/1.1\r\nHost: \x00\r\n\r\n", HeadError::Nul),
            (b"GET / HTTP/1.1\r\n\r\n", HeadError::HostMissing),
            (b"GET / HTTP/1.1\r\nHost: a\r\nHost: a\r\n\r\n", HeadError::HostRepeated),
            (b"GET / HTTP/1.1\r\nHost: a\r\nExpect: nope\r\n\r\n", HeadError::ExpectationFailed),
            (b"GET / HTTP/3.0\r\nHost: a\r\n\r\n", HeadError::VersionUnsupported),
            (b"GET * HTTP/1.1\r\nHost: a\r\n\r\n", HeadError::InvalidTarget),
        ];
        for (bytes, want) in cases {
            assert_eq!(
                parse_head(bytes, &limits).err(),
                Some(*want),
                "{:?}",
                String::from_utf8_lossy(bytes)
            );
        }
    }
}
