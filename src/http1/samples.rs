//! Request byte strings from the unit-test tables, with their expected outcomes, kept public
//! so a fuzz seed-corpus generator (and the ring engine's tests) can reuse them. Not an API.

use std::sync::OnceLock;

use super::{Framing, Method};

/// Expected outcome of [`super::parse_head`] with [`super::Limits::default`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Want {
    /// Parses to a head with these properties.
    Head {
        method: Method,
        path: &'static str,
        framing: Framing,
        keep_alive: bool,
    },
    /// Incomplete, within limits.
    Partial,
    /// Rejected with this status.
    Reject(u16),
}

const fn ok(method: Method, path: &'static str, framing: Framing, keep_alive: bool) -> Want {
    Want::Head {
        method,
        path,
        framing,
        keep_alive,
    }
}

use Framing::{Chunked, Length};
use Method::{Delete, Get, Head, Options, Other, Post, Put};

/// Heads: name, bytes, expected outcome.
pub static HEADS: &[(&str, &[u8], Want)] = &[
    // Valid.
    ("get_minimal", b"GET / HTTP/1.1\r\nHost: a\r\n\r\n", ok(Get, "/", Framing::None, true)),
    ("get_query", b"GET /cas/ab?x=1&y HTTP/1.1\r\nHost: a\r\n\r\n", ok(Get, "/cas/ab", Framing::None, true)),
    ("head", b"HEAD /ac/00 HTTP/1.1\r\nHost: a\r\n\r\n", ok(Head, "/ac/00", Framing::None, true)),
    ("delete", b"DELETE /v1/artifacts/n/k HTTP/1.1\r\nHost: a\r\n\r\n", ok(Delete, "/v1/artifacts/n/k", Framing::None, true)),
    ("post", b"POST /x HTTP/1.1\r\nHost: a\r\nContent-Length: 1\r\n\r\n", ok(Post, "/x", Length(1), true)),
    ("other_method", b"PATCH /x HTTP/1.1\r\nHost: a\r\n\r\n", ok(Other, "/x", Framing::None, true)),
    ("lowercase_method_is_other", b"get / HTTP/1.1\r\nHost: a\r\n\r\n", ok(Other, "/", Framing::None, true)),
    ("put_content_length", b"PUT /cache/k HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\n\r\n", ok(Put, "/cache/k", Length(5), true)),
    ("put_chunked", b"PUT /cache/k HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n", ok(Put, "/cache/k", Chunked, true)),
    ("te_chunked_uppercase", b"PUT /k HTTP/1.1\r\nHost: a\r\nTRANSFER-ENCODING: CHUNKED\r\n\r\n", ok(Put, "/k", Chunked, true)),
    ("te_chunked_ows", b"PUT /k HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: \t chunked \t\r\n\r\n", ok(Put, "/k", Chunked, true)),
    ("cl_zero", b"PUT /k HTTP/1.1\r\nHost: a\r\nContent-Length: 0\r\n\r\n", ok(Put, "/k", Length(0), true)),
    ("cl_leading_zeros", b"PUT /k HTTP/1.1\r\nHost: a\r\nContent-Length: 007\r\n\r\n", ok(Put, "/k", Length(7), true)),
    ("cl_ows", b"PUT /k HTTP/1.1\r\nHost: a\r\nContent-Length:   42 \t\r\n\r\n", ok(Put, "/k", Length(42), true)),
    ("cl_u64_max", b"PUT /k HTTP/1.1\r\nHost: a\r\nContent-Length: 18446744073709551615\r\n\r\n", ok(Put, "/k", Length(u64::MAX), true)),
    ("lowercase_names", b"PUT /k HTTP/1.1\r\nhost: a\r\ncontent-length: 3\r\n\r\n", ok(Put, "/k", Length(3), true)),
    ("http10_no_host", b"GET / HTTP/1.0\r\n\r\n", ok(Get, "/", Framing::None, false)),
    ("http10_keep_alive", b"GET / HTTP/1.0\r\nConnection: Keep-Alive\r\n\r\n", ok(Get, "/", Framing::None, true)),
    ("http10_cl", b"PUT /k HTTP/1.0\r\nContent-Length: 2\r\n\r\n", ok(Put, "/k", Length(2), false)),
    ("http11_close", b"GET / HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n", ok(Get, "/", Framing::None, false)),
    ("connection_list_close", b"GET / HTTP/1.1\r\nHost: a\r\nConnection: keep-alive, Close\r\n\r\n", ok(Get, "/", Framing::None, false)),
    ("connection_two_lines", b"GET / HTTP/1.1\r\nHost: a\r\nConnection: upgrade\r\nConnection: close\r\n\r\n", ok(Get, "/", Framing::None, false)),
    ("absolute_form", b"GET http://example.com:8080/v1/artifacts/n/k?x HTTP/1.1\r\nHost: example.com\r\n\r\n", ok(Get, "/v1/artifacts/n/k", Framing::None, true)),
    ("absolute_form_https_upper", b"GET HTTPS://h/cas/1 HTTP/1.1\r\nHost: h\r\n\r\n", ok(Get, "/cas/1", Framing::None, true)),
    ("absolute_form_no_path", b"GET http://example.com HTTP/1.1\r\nHost: example.com\r\n\r\n", ok(Get, "/", Framing::None, true)),
    ("absolute_form_ipv6", b"GET http://[::1]:8080/x?y=[1] HTTP/1.1\r\nHost: [::1]:8080\r\n\r\n", ok(Get, "/x", Framing::None, true)),
    ("target_all_rfc3986_punctuation", b"GET /-._~:@!$&'()*+,;=%41/?q=/?:@[] HTTP/1.1\r\nHost: a\r\n\r\n", ok(Get, "/-._~:@!$&'()*+,;=%41/", Framing::None, true)),
    ("options_asterisk", b"OPTIONS * HTTP/1.1\r\nHost: a\r\n\r\n", ok(Options, "*", Framing::None, true)),
    ("expect_continue", b"PUT /k HTTP/1.1\r\nHost: a\r\nExpect: 100-Continue\r\nContent-Length: 9\r\n\r\n", ok(Put, "/k", Length(9), true)),
    ("leading_crlf", b"\r\n\r\nGET / HTTP/1.1\r\nHost: a\r\n\r\n", ok(Get, "/", Framing::None, true)),
    ("obs_text_value", b"GET / HTTP/1.1\r\nHost: a\r\nX-Name: caf\xc3\xa9 \xff\r\n\r\n", ok(Get, "/", Framing::None, true)),
    ("empty_value", b"GET / HTTP/1.1\r\nHost: a\r\nX-Empty:\r\n\r\n", ok(Get, "/", Framing::None, true)),
    ("percent_encoded_path", b"GET /a%20b/c HTTP/1.1\r\nHost: a\r\n\r\n", ok(Get, "/a%20b/c", Framing::None, true)),
    // Incomplete.
    ("partial_empty", b"", Want::Partial),
    ("partial_request_line", b"GET / HT", Want::Partial),
    ("partial_headers", b"GET / HTTP/1.1\r\nHost: a\r\n", Want::Partial),
    ("partial_trailing_cr", b"GET / HTTP/1.1\r\nHost: a\r\n\r", Want::Partial),
    ("partial_leading_crlf", b"\r\n", Want::Partial),
    // Framing attacks.
    ("cl_te", b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n", Want::Reject(400)),
    ("te_cl", b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\nContent-Length: 5\r\n\r\n", Want::Reject(400)),
    ("cl_te_bad_te", b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\nTransfer-Encoding: gzip\r\n\r\n", Want::Reject(400)),
    ("cl_duplicate_equal", b"PUT /k HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\nContent-Length: 5\r\n\r\n", Want::Reject(400)),
    ("cl_duplicate_differ", b"PUT /k HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\ncontent-length: 6\r\n\r\n", Want::Reject(400)),
    ("cl_comma_list", b"PUT /k HTTP/1.1\r\nHost: a\r\nContent-Length: 5, 5\r\n\r\n", Want::Reject(400)),
    ("cl_plus", b"PUT /k HTTP/1.1\r\nHost: a\r\nContent-Length: +5\r\n\r\n", Want::Reject(400)),
    ("cl_minus", b"PUT /k HTTP/1.1\r\nHost: a\r\nContent-Length: -5\r\n\r\n", Want::Reject(400)),
    ("cl_inner_space", b"PUT /k HTTP/1.1\r\nHost: a\r\nContent-Length: 1 0\r\n\r\n", Want::Reject(400)),
    ("cl_empty", b"PUT /k HTTP/1.1\r\nHost: a\r\nContent-Length:\r\n\r\n", Want::Reject(400)),
    ("cl_hex", b"PUT /k HTTP/1.1\r\nHost: a\r\nContent-Length: 0x10\r\n\r\n", Want::Reject(400)),
    ("cl_decimal_point", b"PUT /k HTTP/1.1\r\nHost: a\r\nContent-Length: 1.0\r\n\r\n", Want::Reject(400)),
    ("cl_overflow", b"PUT /k HTTP/1.1\r\nHost: a\r\nContent-Length: 18446744073709551616\r\n\r\n", Want::Reject(400)),
    ("cl_space_before_colon", b"PUT /k HTTP/1.1\r\nHost: a\r\nContent-Length : 5\r\n\r\n", Want::Reject(400)),
    ("te_chunked_chunked", b"PUT /k HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked, chunked\r\n\r\n", Want::Reject(400)),
    ("te_gzip_chunked", b"PUT /k HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: gzip, chunked\r\n\r\n", Want::Reject(400)),
    ("te_chunked_gzip", b"PUT /k HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked, gzip\r\n\r\n", Want::Reject(400)),
    ("te_chunked_param", b"PUT /k HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked;x\r\n\r\n", Want::Reject(400)),
    ("te_empty", b"PUT /k HTTP/1.1\r\nHost: a\r\nTransfer-Encoding:\r\n\r\n", Want::Reject(400)),
    ("te_gzip", b"PUT /k HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: gzip\r\n\r\n", Want::Reject(400)),
    ("te_identity", b"PUT /k HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: identity\r\n\r\n", Want::Reject(400)),
    ("te_xchunked", b"PUT /k HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: xchunked\r\n\r\n", Want::Reject(400)),
    ("te_quoted", b"PUT /k HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: \"chunked\"\r\n\r\n", Want::Reject(400)),
    ("te_two_lines", b"PUT /k HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n\r\n", Want::Reject(400)),
    ("te_space_before_colon", b"PUT /k HTTP/1.1\r\nHost: a\r\nTransfer-Encoding : chunked\r\n\r\n", Want::Reject(400)),
    ("te_vertical_tab", b"PUT /k HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: \x0bchunked\r\n\r\n", Want::Reject(400)),
    ("te_http10", b"PUT /k HTTP/1.0\r\nTransfer-Encoding: chunked\r\n\r\n", Want::Reject(400)),
    // Line structure.
    ("obs_fold", b"GET / HTTP/1.1\r\nHost: a\r\nX-A: b\r\n  c\r\n\r\n", Want::Reject(400)),
    ("obs_fold_tab", b"GET / HTTP/1.1\r\nHost: a\r\nX-A: b\r\n\tc\r\n\r\n", Want::Reject(400)),
    ("obs_fold_te", b"PUT /k HTTP/1.1\r\nHost: a\r\nTransfer-Encoding:\r\n chunked\r\n\r\n", Want::Reject(400)),
    ("ws_before_first_header", b"GET / HTTP/1.1\r\n Host: a\r\n\r\n", Want::Reject(400)),
    ("bare_cr_in_value", b"GET / HTTP/1.1\r\nHost: a\r\nX-A: b\rc\r\n\r\n", Want::Reject(400)),
    ("bare_cr_in_request_line", b"GET /\r HTTP/1.1\r\nHost: a\r\n\r\n", Want::Reject(400)),
    ("bare_lf_everywhere", b"GET / HTTP/1.1\nHost: a\n\n", Want::Reject(400)),
    ("bare_lf_one_header", b"GET / HTTP/1.1\r\nHost: a\nX: y\r\n\r\n", Want::Reject(400)),
    ("bare_lf_end", b"GET / HTTP/1.1\r\nHost: a\r\n\n", Want::Reject(400)),
    ("bare_lf_leading", b"\nGET / HTTP/1.1\r\nHost: a\r\n\r\n", Want::Reject(400)),
    ("nul_in_value", b"GET / HTTP/1.1\r\nHost: a\r\nX-A: b\x00c\r\n\r\n", Want::Reject(400)),
    ("nul_in_partial", b"GET /\x00", Want::Reject(400)),
    ("del_in_value", b"GET / HTTP/1.1\r\nHost: a\r\nX-A: b\x7fc\r\n\r\n", Want::Reject(400)),
    ("header_without_colon", b"GET / HTTP/1.1\r\nHost: a\r\nNoColon\r\n\r\n", Want::Reject(400)),
    ("header_empty_name", b"GET / HTTP/1.1\r\nHost: a\r\n: v\r\n\r\n", Want::Reject(400)),
    // Request line.
    ("method_bad_token", b"G(T / HTTP/1.1\r\nHost: a\r\n\r\n", Want::Reject(400)),
    ("double_space", b"GET  / HTTP/1.1\r\nHost: a\r\n\r\n", Want::Reject(400)),
    ("missing_version", b"GET /\r\nHost: a\r\n\r\n", Want::Reject(400)),
    ("version_lowercase", b"GET / http/1.1\r\nHost: a\r\n\r\n", Want::Reject(400)),
    ("version_garbage", b"GET / HTTX/1.1\r\nHost: a\r\n\r\n", Want::Reject(400)),
    ("version_trailing_junk", b"GET / HTTP/1.1x\r\nHost: a\r\n\r\n", Want::Reject(400)),
    ("version_20", b"GET / HTTP/2.0\r\nHost: a\r\n\r\n", Want::Reject(505)),
    ("version_12", b"GET / HTTP/1.2\r\nHost: a\r\n\r\n", Want::Reject(505)),
    ("version_09", b"GET / HTTP/0.9\r\nHost: a\r\n\r\n", Want::Reject(505)),
    ("h2_preface", b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n", Want::Reject(505)),
    ("asterisk_get", b"GET * HTTP/1.1\r\nHost: a\r\n\r\n", Want::Reject(400)),
    ("authority_form", b"CONNECT a:443 HTTP/1.1\r\nHost: a\r\n\r\n", Want::Reject(400)),
    ("relative_target", b"GET cas/1 HTTP/1.1\r\nHost: a\r\n\r\n", Want::Reject(400)),
    ("absolute_form_empty_host", b"GET http:///x HTTP/1.1\r\nHost: a\r\n\r\n", Want::Reject(400)),
    ("authority_bad_port", b"GET http://[::1]:80p://[::1]:8080/x HTTP/1.1\r\nHost: a\r\n\r\n", Want::Reject(400)),
    ("authority_userinfo", b"GET http://user@a/x HTTP/1.1\r\nHost: a\r\n\r\n", Want::Reject(400)),
    ("authority_unclosed_bracket", b"GET http://[::1/x HTTP/1.1\r\nHost: a\r\n\r\n", Want::Reject(400)),
    ("authority_two_ports", b"GET http://a:1:2/x HTTP/1.1\r\nHost: a\r\n\r\n", Want::Reject(400)),
    ("authority_percent", b"GET http://a%41/x HTTP/1.1\r\nHost: a\r\n\r\n", Want::Reject(400)),
    ("ftp_scheme", b"GET ftp://a/x HTTP/1.1\r\nHost: a\r\n\r\n", Want::Reject(400)),
    ("fragment", b"GET /a#b HTTP/1.1\r\nHost: a\r\n\r\n", Want::Reject(400)),
    ("target_backtick", b"GET /cach`/k HTTP/1.1\r\nHost: a\r\n\r\n", Want::Reject(400)),
    ("target_angle_brackets", b"GET /a<b> HTTP/1.1\r\nHost: a\r\n\r\n", Want::Reject(400)),
    ("target_braces_pipe", b"GET /a{b}|c HTTP/1.1\r\nHost: a\r\n\r\n", Want::Reject(400)),
    ("target_quote_in_query", b"GET /a?\"b\" HTTP/1.1\r\nHost: a\r\n\r\n", Want::Reject(400)),
    ("target_backslash_caret", b"GET /a\\b^c HTTP/1.1\r\nHost: a\r\n\r\n", Want::Reject(400)),
    ("target_non_ascii", b"GET /caf\xc3\xa9 HTTP/1.1\r\nHost: a\r\n\r\n", Want::Reject(400)),
    // Host and Expect.
    ("host_missing", b"GET / HTTP/1.1\r\n\r\n", Want::Reject(400)),
    ("host_repeated", b"GET / HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n", Want::Reject(400)),
    ("host_repeated_http10", b"GET / HTTP/1.0\r\nHost: a\r\nhost: a\r\n\r\n", Want::Reject(400)),
    ("expect_other", b"PUT /k HTTP/1.1\r\nHost: a\r\nExpect: 200-ok\r\nContent-Length: 1\r\n\r\n", Want::Reject(417)),
    ("expect_continue_and_other", b"PUT /k HTTP/1.1\r\nHost: a\r\nExpect: 100-continue\r\nExpect: x\r\n\r\n", Want::Reject(417)),
];

macro_rules! chunked {
    ($body:expr) => {
        concat!(
            "PUT /cache/k HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n",
            $body
        )
        .as_bytes()
    };
}

/// Body limit used with [`CHUNKED`], in bytes.
pub const CHUNKED_BODY_BYTES_MAX: u64 = 64;

/// Expected outcome of decoding the body of a [`CHUNKED`] request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BodyWant {
    /// Complete, with this payload, and nothing after it consumed.
    Body(&'static [u8]),
    /// The input ends inside the body.
    Incomplete,
    /// Rejected with this status.
    Reject(u16),
}

/// Chunked requests (head plus body): name, bytes, expected body outcome with a
/// [`CHUNKED_BODY_BYTES_MAX`] limit.
pub static CHUNKED: &[(&str, &[u8], BodyWant)] = &[
    (
        "one_chunk",
        chunked!("5\r\nhello\r\n0\r\n\r\n"),
        BodyWant::Body(b"hello"),
    ),
    (
        "two_chunks",
        chunked!("5\r\nhello\r\n6\r\n world\r\n0\r\n\r\n"),
        BodyWant::Body(b"hello world"),
    ),
    ("empty_body", chunked!("0\r\n\r\n"), BodyWant::Body(b"")),
    (
        "zeros_last_chunk",
        chunked!("000\r\n\r\n"),
        BodyWant::Body(b""),
    ),
    (
        "hex_upper",
        chunked!("A\r\n0123456789\r\n0\r\n\r\n"),
        BodyWant::Body(b"0123456789"),
    ),
    (
        "hex_lower",
        chunked!("a\r\n0123456789\r\n0\r\n\r\n"),
        BodyWant::Body(b"0123456789"),
    ),
    (
        "leading_zeros",
        chunked!("0005\r\nhello\r\n0\r\n\r\n"),
        BodyWant::Body(b"hello"),
    ),
    (
        "sixteen_digits",
        chunked!("0000000000000005\r\nhello\r\n0\r\n\r\n"),
        BodyWant::Body(b"hello"),
    ),
    (
        "extension",
        chunked!("5;name=value\r\nhello\r\n0;last\r\n\r\n"),
        BodyWant::Body(b"hello"),
    ),
    (
        "extension_quoted",
        chunked!("5;a=\"b c;d\"\r\nhello\r\n0\r\n\r\n"),
        BodyWant::Body(b"hello"),
    ),
    (
        "extension_bws",
        chunked!("5 \t; a = b\r\nhello\r\n0\r\n\r\n"),
        BodyWant::Body(b"hello"),
    ),
    (
        "trailers",
        chunked!("5\r\nhello\r\n0\r\nX-Sum: 1\r\nX-Other: two words\r\n\r\n"),
        BodyWant::Body(b"hello"),
    ),
    (
        "data_with_crlf",
        chunked!("4\r\n\r\n\r\n\r\n0\r\n\r\n"),
        BodyWant::Body(b"\r\n\r\n"),
    ),
    (
        "exactly_limit",
        chunked!(
            "40\r\n0123456789012345678901234567890123456789012345678901234567890123\r\n0\r\n\r\n"
        ),
        BodyWant::Body(b"0123456789012345678901234567890123456789012345678901234567890123"),
    ),
    (
        "next_request_untouched",
        chunked!("1\r\nx\r\n0\r\n\r\nGET / HTTP/1.1\r\nHost: a\r\n\r\n"),
        BodyWant::Body(b"x"),
    ),
    (
        "incomplete_data",
        chunked!("5\r\nhel"),
        BodyWant::Incomplete,
    ),
    ("incomplete_size", chunked!("5"), BodyWant::Incomplete),
    (
        "incomplete_no_final_crlf",
        chunked!("5\r\nhello\r\n0\r\n"),
        BodyWant::Incomplete,
    ),
    (
        "incomplete_trailer",
        chunked!("0\r\nX-A: b"),
        BodyWant::Incomplete,
    ),
    (
        "size_0x",
        chunked!("0x5\r\nhello\r\n0\r\n\r\n"),
        BodyWant::Reject(400),
    ),
    (
        "size_plus",
        chunked!("+5\r\nhello\r\n0\r\n\r\n"),
        BodyWant::Reject(400),
    ),
    (
        "size_minus",
        chunked!("-5\r\nhello\r\n0\r\n\r\n"),
        BodyWant::Reject(400),
    ),
    (
        "size_leading_space",
        chunked!(" 5\r\nhello\r\n0\r\n\r\n"),
        BodyWant::Reject(400),
    ),
    (
        "size_trailing_space",
        chunked!("5 \r\nhello\r\n0\r\n\r\n"),
        BodyWant::Reject(400),
    ),
    (
        "size_inner_space",
        chunked!("1 0\r\n0123456789abcdef\r\n0\r\n\r\n"),
        BodyWant::Reject(400),
    ),
    (
        "size_empty",
        chunked!("\r\nhello\r\n0\r\n\r\n"),
        BodyWant::Reject(400),
    ),
    ("size_not_hex", chunked!("g\r\n"), BodyWant::Reject(400)),
    (
        "size_17_digits",
        chunked!("00000000000000005\r\nhello\r\n0\r\n\r\n"),
        BodyWant::Reject(400),
    ),
    (
        "size_overflow",
        chunked!("10000000000000000\r\n"),
        BodyWant::Reject(400),
    ),
    (
        "size_u64_max_too_large",
        chunked!("ffffffffffffffff\r\n"),
        BodyWant::Reject(413),
    ),
    ("size_over_limit", chunked!("41\r\n"), BodyWant::Reject(413)),
    (
        "total_over_limit",
        chunked!("20\r\n01234567890123456789012345678901\r\n21\r\n"),
        BodyWant::Reject(413),
    ),
    (
        "size_bare_lf",
        chunked!("5\nhello\r\n0\r\n\r\n"),
        BodyWant::Reject(400),
    ),
    (
        "size_cr_without_lf",
        chunked!("5\rhello\r\n0\r\n\r\n"),
        BodyWant::Reject(400),
    ),
    (
        "size_nul",
        chunked!("5\0\r\nhello\r\n0\r\n\r\n"),
        BodyWant::Reject(400),
    ),
    (
        "extension_bare_cr",
        chunked!("5;a\rb\r\nhello\r\n0\r\n\r\n"),
        BodyWant::Reject(400),
    ),
    (
        "extension_bare_lf",
        chunked!("5;a\nb\r\nhello\r\n0\r\n\r\n"),
        BodyWant::Reject(400),
    ),
    (
        "extension_nul",
        chunked!("5;a\0\r\nhello\r\n0\r\n\r\n"),
        BodyWant::Reject(400),
    ),
    (
        "data_too_long",
        chunked!("5\r\nhelloX\r\n0\r\n\r\n"),
        BodyWant::Reject(400),
    ),
    (
        "data_bare_lf",
        chunked!("5\r\nhello\n0\r\n\r\n"),
        BodyWant::Reject(400),
    ),
    (
        "data_no_crlf",
        chunked!("5\r\nhello0\r\n\r\n"),
        BodyWant::Reject(400),
    ),
    (
        "trailer_obs_fold",
        chunked!("0\r\nX: a\r\n b\r\n\r\n"),
        BodyWant::Reject(400),
    ),
    (
        "trailer_no_colon",
        chunked!("0\r\nbogus\r\n\r\n"),
        BodyWant::Reject(400),
    ),
    (
        "trailer_bare_lf",
        chunked!("0\r\nX: a\n\r\n"),
        BodyWant::Reject(400),
    ),
    (
        "trailer_bare_cr",
        chunked!("0\r\nX: a\rb\r\n\r\n"),
        BodyWant::Reject(400),
    ),
    ("final_bare_lf", chunked!("0\r\n\n"), BodyWant::Reject(400)),
    (
        "trailer_name_not_token",
        chunked!("0\r\nGET /admin HTTPHost: a\r\n\r\n"),
        BodyWant::Reject(400),
    ),
    (
        "trailer_empty_name",
        chunked!("0\r\n: v\r\n\r\n"),
        BodyWant::Reject(400),
    ),
];

/// A pipelined stream: GET, PUT with Content-Length, chunked PUT, HEAD with Expect, and a GET
/// with `Connection: close` followed by bytes that must never be read as a request.
pub static PIPELINE: &[u8] = b"GET /up HTTP/1.1\r\nHost: a\r\n\r\n\
PUT /cache/one HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\n\r\nhello\
PUT /cache/two HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n4;x=y\r\ndefg\r\n0\r\nT: v\r\n\r\n\
\r\nHEAD /cas/1 HTTP/1.1\r\nHost: a\r\nExpect: 100-continue\r\n\r\n\
GET /last HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n\
GET /never HTTP/1.1\r\nHost: a\r\n\r\n";

/// Every request byte string above, by name: heads, chunked requests and the pipeline.
pub fn sample_requests() -> &'static [(&'static str, &'static [u8])] {
    static ALL: OnceLock<Vec<(&'static str, &'static [u8])>> = OnceLock::new();
    ALL.get_or_init(|| {
        HEADS
            .iter()
            .map(|&(name, bytes, _)| (name, bytes))
            .chain(CHUNKED.iter().map(|&(name, bytes, _)| (name, bytes)))
            .chain([("pipeline", PIPELINE)])
            .collect()
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn samples_cover_every_table_with_unique_names() {
        let all = sample_requests();
        assert_eq!(all.len(), HEADS.len() + CHUNKED.len() + 1);
        let mut names: Vec<&str> = all.iter().map(|(name, _)| *name).collect();
        names.sort_unstable();
        let before = names.len();
        names.dedup();
        assert_eq!(
            names.len(),
            before,
            "sample names must be unique: they become file names"
        );
        assert!(all
            .iter()
            .any(|(name, bytes)| *name == "pipeline" && *bytes == PIPELINE));
    }
}
