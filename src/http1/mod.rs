//! Sans-IO HTTP/1.1 request core: bytes in, decisions out.
//!
//! Nothing in this module touches a socket. The io_uring engine, the hyper fallback's
//! classifier, the fuzz targets and the tests all drive the same functions:
//!
//! - [`parse_head`] turns a buffer into a [`RequestHead`] (or [`Status::Partial`], or a
//!   [`HeadError`] that carries the status to answer with before closing). The head path
//!   allocates nothing: header slices live in a fixed array inside [`RequestHead`].
//! - [`BodyDecoder`] decodes a `Content-Length` or `chunked` body incrementally.
//! - [`RequestReader`] ties both together for one connection's byte stream, pipelining
//!   included.
//! - [`encode_response_head`], [`parse_range`] and the preconditions ([`evaluate`],
//!   [`if_range`]) cover the response side.
//!
//! Every error in this module means "answer with `status()` and close the connection": once
//! framing is in doubt, nothing after the error can be trusted to start a new request.

mod body;
mod conditional;
mod date;
mod head;
mod linger;
mod range;
mod reader;
mod response;
#[doc(hidden)]
pub mod samples;

pub use body::{BodyDecoder, BodyError, BodyStep, CHUNK_LINE_BYTES_MAX, TRAILER_BYTES_MAX};
pub use conditional::{evaluate, if_match, if_none_match, if_range, Conditions, Precondition};
pub use date::{http_date_now, imf_fixdate};
pub use head::{parse_head, HeadError, Headers, RequestHead, HEADERS_CAPACITY};
pub use linger::{Linger, LingerLimits, LingerStep};
pub use range::{content_range, content_range_unsatisfied, parse_range, RangeOutcome};
pub use reader::{Event, ReaderError, RequestReader};
pub use response::{encode_response_head, reason_phrase, ResponseHead, CONTINUE_RESPONSE};

/// Bounds on a request head. Each is checked while the head is still arriving, so a client
/// cannot make the server buffer more than `head_bytes_max` bytes before it is answered.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Largest request head, from the first byte (leading empty lines included) through the
    /// blank line that ends it, in bytes. Larger heads answer 431. Default 16 KiB (nginx's
    /// `large_client_header_buffers` allows 8 KiB per line; Bazel and Gradle send < 1 KiB).
    pub head_bytes_max: usize,
    /// Largest request-target, in bytes. Longer targets answer 414, detected as soon as the
    /// target alone is too long even while the head is partial. Default 8 KiB.
    pub uri_bytes_max: usize,
    /// Most header fields in one head. More answer 431. Default 100. Values above
    /// [`HEADERS_CAPACITY`] are treated as [`HEADERS_CAPACITY`], the size of the fixed array that
    /// keeps head parsing allocation-free.
    pub headers_max: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            head_bytes_max: 16 * 1024,
            uri_bytes_max: 8 * 1024,
            headers_max: 100,
        }
    }
}

const _: () = assert!(
    100 <= HEADERS_CAPACITY,
    "the default headers_max must fit the array"
);

/// Result of a parse that may need more bytes, as in httparse.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Status<T> {
    /// Everything needed was in the buffer.
    Complete(T),
    /// The buffer ends before the item does; call again with more bytes appended.
    Partial,
}

/// Request method. Matching is case-sensitive (RFC 9110 9.1): `get` is [`Method::Other`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Method {
    Get,
    Head,
    Put,
    Delete,
    Post,
    Options,
    /// Any other syntactically valid method token; the raw name is
    /// [`RequestHead::method_str`]. Routes answer these with 405 or 501.
    Other,
}

impl Method {
    /// Maps a method token to the enum; unknown tokens are [`Method::Other`].
    pub fn from_token(token: &str) -> Method {
        match token {
            "GET" => Method::Get,
            "HEAD" => Method::Head,
            "PUT" => Method::Put,
            "DELETE" => Method::Delete,
            "POST" => Method::Post,
            "OPTIONS" => Method::Options,
            _ => Method::Other,
        }
    }
}

/// How the request body is delimited (RFC 9112 6.3).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Framing {
    /// Neither `Content-Length` nor `Transfer-Encoding`: the body is empty.
    None,
    /// `Content-Length`, in bytes.
    Length(u64),
    /// `Transfer-Encoding: chunked`.
    Chunked,
}
