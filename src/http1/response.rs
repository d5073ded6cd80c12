//! Response heads: status line, fields, framing. No `Date` (RFC 9110 6.6.1 excuses servers
//! without a reliable clock; leaving it out keeps output byte-comparable across front ends).

/// The interim response to `Expect: 100-continue`.
pub const CONTINUE_RESPONSE: &[u8] = b"HTTP/1.1 100 Continue\r\n\r\n";

/// A response head to encode.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct ResponseHead {
    /// Status code, 100..=999; anything else is encoded as 500 rather than as a broken line.
    pub status: u16,
    /// Header fields, in order. Names are `'static` because they come from our code, never from
    /// input. `Content-Length` entries here are ignored: framing comes only from
    /// `content_length`, so no route can emit two lengths. Values must not contain control
    /// bytes; any that do (other than HTAB) are written as SP, so a bug cannot split the
    /// response.
    pub headers: Vec<(&'static str, String)>,
    /// `Content-Length`, in bytes; `None` writes none. Never written for 1xx and 204, which
    /// must not carry one (RFC 9110 8.6).
    pub content_length: Option<u64>,
    /// Write `Connection: close`: the server closes after this response. When set, any
    /// `Connection` entry in `headers` is dropped so the two cannot disagree.
    pub close: bool,
}

/// Appends the encoded head (status line, fields, `Content-Length`, `Connection: close` when
/// `close`, blank line) to `out`.
pub fn encode_response_head(head: &ResponseHead, out: &mut Vec<u8>) {
    let status = if (100..=999).contains(&head.status) {
        head.status
    } else {
        500
    };
    out.extend_from_slice(b"HTTP/1.1 ");
    push_decimal(out, u64::from(status));
    out.push(b' ');
    out.extend_from_slice(reason_phrase(status).as_bytes());
    out.extend_from_slice(b"\r\n");
    for (name, value) in &head.headers {
        if name.eq_ignore_ascii_case("content-length")
            || (head.close && name.eq_ignore_ascii_case("connection"))
        {
            continue;
        }
        out.extend_from_slice(name.as_bytes());
        out.extend_from_slice(b": ");
        out.extend(value.bytes().map(|b| match b {
            b'\t' => b,
            0..=0x1f | 0x7f => b' ',
            _ => b,
        }));
        out.extend_from_slice(b"\r\n");
    }
    let length_forbidden = status < 200 || status == 204;
    if let (Some(length), false) = (head.content_length, length_forbidden) {
        out.extend_from_slice(b"Content-Length: ");
        push_decimal(out, length);
        out.extend_from_slice(b"\r\n");
    }
    if head.close {
        out.extend_from_slice(b"Connection: close\r\n");
    }
    out.extend_from_slice(b"\r\n");
}

/// Writes `n` in decimal without going through `fmt` (no allocation, nothing to unwrap).
fn push_decimal(out: &mut Vec<u8>, mut n: u64) {
    let mut digits = [0u8; 20];
    let mut i = digits.len();
    loop {
        i -= 1;
        digits[i] = b'0' + (n % 10) as u8;
        n /= 10;
        if n == 0 {
            break;
        }
    }
    out.extend_from_slice(&digits[i..]);
}

/// Reason phrase for the statuses sluice sends (RFC 9110 15); empty for others, which is
/// valid (`HTTP/1.1 599 \r\n`): clients must ignore the phrase.
pub fn reason_phrase(status: u16) -> &'static str {
    match status {
        100 => "Continue",
        101 => "Switching Protocols",
        200 => "OK",
        201 => "Created",
        202 => "Accepted",
        204 => "No Content",
        206 => "Partial Content",
        207 => "Multi-Status",
        301 => "Moved Permanently",
        302 => "Found",
        303 => "See Other",
        304 => "Not Modified",
        307 => "Temporary Redirect",
        308 => "Permanent Redirect",
        400 => "Bad Request",
        401 => "Unauthorized",
        403 => "Forbidden",
        404 => "Not Found",
        405 => "Method Not Allowed",
        406 => "Not Acceptable",
        408 => "Request Timeout",
        409 => "Conflict",
        410 => "Gone",
        411 => "Length Required",
        412 => "Precondition Failed",
        413 => "Content Too Large",
        414 => "URI Too Long",
        415 => "Unsupported Media Type",
        416 => "Range Not Satisfiable",
        417 => "Expectation Failed",
        421 => "Misdirected Request",
        422 => "Unprocessable Content",
        429 => "Too Many Requests",
        431 => "Request Header Fields Too Large",
        500 => "Internal Server Error",
        501 => "Not Implemented",
        502 => "Bad Gateway",
        503 => "Service Unavailable",
        504 => "Gateway Timeout",
        505 => "HTTP Version Not Supported",
        507 => "Insufficient Storage",
        _ => "",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn encode(head: &ResponseHead) -> String {
        let mut out = Vec::new();
        encode_response_head(head, &mut out);
        String::from_utf8(out).unwrap()
    }

    #[test]
    fn encodes_exact_bytes() {
        let cases: &[(ResponseHead, &str)] = &[
            (
                ResponseHead {
                    status: 200,
                    headers: vec![("ETag", "\"abc\"".into()), ("Accept-Ranges", "bytes".into())],
                    content_length: Some(12),
                    close: false,
                },
                "HTTP/1.1 200 OK\r\nETag: \"abc\"\r\nAccept-Ranges: bytes\r\nContent-Length: 12\r\n\r\n",
            ),
            (
                ResponseHead {
                    status: 400,
                    headers: vec![],
                    content_length: Some(0),
                    close: true,
                },
                "HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
            ),
            (
                ResponseHead {
                    status: 204,
                    headers: vec![],
                    content_length: Some(5),
                    close: false,
                },
                "HTTP/1.1 204 No Content\r\n\r\n",
            ),
            (
                ResponseHead {
                    status: 304,
                    headers: vec![("ETag", "\"e\"".into())],
                    content_length: None,
                    close: false,
                },
                "HTTP/1.1 304 Not Modified\r\nETag: \"e\"\r\n\r\n",
            ),
            (
                ResponseHead {
                    status: 405,
                    headers: vec![
                        ("Allow", "GET, HEAD".into()),
                        ("content-length", "99".into()),
                        ("Connection", "keep-alive".into()),
                    ],
                    content_length: Some(0),
                    close: true,
                },
                "HTTP/1.1 405 Method Not Allowed\r\nAllow: GET, HEAD\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
            ),
            (
                ResponseHead {
                    status: 200,
                    headers: vec![("X-Evil", "a\r\nSet-Cookie: b".into())],
                    content_length: Some(18_446_744_073_709_551_615),
                    close: false,
                },
                "HTTP/1.1 200 OK\r\nX-Evil: a  Set-Cookie: b\r\nContent-Length: 18446744073709551615\r\n\r\n",
            ),
            (
                ResponseHead {
                    status: 599,
                    ..ResponseHead::default()
                },
                "HTTP/1.1 599 \r\n\r\n",
            ),
            (
                ResponseHead {
                    status: 42,
                    content_length: Some(0),
                    ..ResponseHead::default()
                },
                "HTTP/1.1 500 Internal Server Error\r\nContent-Length: 0\r\n\r\n",
            ),
        ];
        for (head, want) in cases {
            assert_eq!(encode(head), *want, "{head:?}");
        }
    }

    #[test]
    fn continue_matches_encoder() {
        let mut out = Vec::new();
        encode_response_head(
            &ResponseHead {
                status: 100,
                content_length: Some(3),
                ..ResponseHead::default()
            },
            &mut out,
        );
        assert_eq!(out, CONTINUE_RESPONSE);
    }

    #[test]
    fn every_error_status_has_a_phrase() {
        for status in [400, 408, 413, 414, 416, 417, 431, 500, 501, 505, 507] {
            assert!(!reason_phrase(status).is_empty(), "{status}");
        }
    }
}
