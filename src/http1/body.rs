//! Incremental request body decoding: `Content-Length` and `chunked` (RFC 9112 7.1).

use core::ops::Range;

use super::Framing;

/// Longest chunk-size line (size, extensions and CRLF), in bytes. Extensions are legal but
/// carry nothing we use; the bound stops a client from streaming an endless size line.
/// 4 KiB, as nginx and hyper bound theirs.
pub const CHUNK_LINE_BYTES_MAX: usize = 4 * 1024;

/// Largest trailer section after the last chunk, in bytes. Trailers are parsed only to find
/// their end and are then discarded. 16 KiB, the same as the default head limit.
pub const TRAILER_BYTES_MAX: usize = 16 * 1024;

/// Most trailer fields after the last chunk. 100, the same as the head's `headers_max` default
/// and hyper's limit: with more, hyper rejects the body while an unbounded count here would
/// serve it (found by the `http1_vs_hyper` fuzz target).
pub const TRAILER_FIELDS_MAX: u16 = 100;

/// Most hex digits in a chunk size. 16 digits hold any u64, so the size cannot overflow; the
/// running total is still checked against `body_bytes_max`. Leading zeros count as digits:
/// no client pads a size to 17 digits, and an unbounded run of zeros is a slow-drip trick.
const CHUNK_SIZE_DIGITS_MAX: u8 = 16;

/// Why a body was rejected. Either way: answer [`BodyError::status`] and close.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BodyError {
    /// The body exceeds `body_bytes_max`. 413.
    TooLarge,
    /// The chunked framing is broken; the text says where. 400.
    Malformed(&'static str),
}

impl BodyError {
    /// Status code to answer with before closing.
    pub fn status(&self) -> u16 {
        match self {
            BodyError::TooLarge => 413,
            BodyError::Malformed(_) => 400,
        }
    }
}

impl core::fmt::Display for BodyError {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self {
            BodyError::TooLarge => write!(f, "request body too large (413)"),
            BodyError::Malformed(what) => write!(f, "malformed chunked body: {what} (400)"),
        }
    }
}

impl std::error::Error for BodyError {}

/// What one [`BodyDecoder::decode`] call did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BodyStep {
    /// Bytes of the input used (framing and payload); the caller drops them.
    pub consumed: usize,
    /// Payload bytes, as a range inside the input given to this call; may be empty.
    /// Always within `0..consumed`.
    pub data: Range<usize>,
    /// The body is complete; bytes after `consumed` belong to the next request.
    pub done: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    Length {
        remaining: u64,
    },
    /// Hex digits of a chunk size.
    Size {
        size: u64,
        digits: u8,
        line_bytes: usize,
    },
    /// BWS after the size: only legal when an extension follows.
    SizeWs {
        size: u64,
        line_bytes: usize,
    },
    /// Inside `;ext...` up to the CR.
    Ext {
        size: u64,
        line_bytes: usize,
    },
    /// Saw the CR ending the size line.
    SizeLf {
        size: u64,
    },
    Data {
        remaining: u64,
    },
    DataCr,
    DataLf,
    /// In the trailer section; `line_bytes == 0` means at the start of a line.
    Trailer {
        line_bytes: usize,
        colon: bool,
        section_bytes: usize,
        /// Field lines completed so far.
        fields: u16,
    },
    /// Saw the CR ending a trailer field line.
    TrailerLf {
        section_bytes: usize,
        fields: u16,
    },
    /// Saw the CR of the final empty line.
    EndLf,
    Done,
    Failed(BodyError),
}

/// Incremental decoder for one request body. Bounded state, no allocation, any split of the
/// input gives the same payload bytes.
#[derive(Debug, Clone)]
pub struct BodyDecoder {
    state: State,
    body_bytes_max: u64,
    /// Payload bytes decoded so far.
    received_bytes: u64,
}

impl BodyDecoder {
    /// Starts decoding a body with this framing. `body_bytes_max` (bytes) is the route's limit
    /// on payload bytes; a `Content-Length` above it fails at once with
    /// [`BodyError::TooLarge`], so the client is answered 413 before it sends the body.
    pub fn new(framing: Framing, body_bytes_max: u64) -> Result<BodyDecoder, BodyError> {
        let state = match framing {
            Framing::None | Framing::Length(0) => State::Done,
            Framing::Length(n) if n > body_bytes_max => return Err(BodyError::TooLarge),
            Framing::Length(n) => State::Length { remaining: n },
            Framing::Chunked => State::Size {
                size: 0,
                digits: 0,
                line_bytes: 0,
            },
        };
        Ok(BodyDecoder {
            state,
            body_bytes_max,
            received_bytes: 0,
        })
    }

    /// Payload bytes decoded so far.
    pub fn received_bytes(&self) -> u64 {
        self.received_bytes
    }

    /// Whether the body is complete.
    pub fn is_done(&self) -> bool {
        self.state == State::Done
    }

    /// Decodes from `input`, the unconsumed bytes after the head (or after what earlier calls
    /// consumed). A step returns at most one payload range and stops right after it, so the
    /// caller loops: drop `consumed` bytes, call again, until `done` or until `consumed == 0`
    /// (needs more input). Never consumes past the end of the body. Errors are sticky.
    pub fn decode(&mut self, input: &[u8]) -> Result<BodyStep, BodyError> {
        let mut pos = 0;
        loop {
            match self.state {
                State::Failed(e) => return Err(e),
                State::Done => break,
                State::Length { remaining } | State::Data { remaining } => {
                    let available = input.len() - pos;
                    if available == 0 {
                        break;
                    }
                    let take = usize::try_from(remaining).map_or(available, |r| r.min(available));
                    let start = pos;
                    pos += take;
                    self.received_bytes += take as u64;
                    let left = remaining - take as u64;
                    self.state = match (self.state, left) {
                        (State::Length { .. }, 0) => State::Done,
                        (State::Length { .. }, _) => State::Length { remaining: left },
                        (_, 0) => State::DataCr,
                        _ => State::Data { remaining: left },
                    };
                    return Ok(BodyStep {
                        consumed: pos,
                        data: start..pos,
                        done: self.state == State::Done,
                    });
                }
                _ => {
                    let Some(&byte) = input.get(pos) else { break };
                    pos += 1;
                    match self.framing_byte(byte) {
                        Ok(next) => self.state = next,
                        Err(e) => {
                            self.state = State::Failed(e);
                            return Err(e);
                        }
                    }
                }
            }
        }
        Ok(BodyStep {
            consumed: pos,
            data: pos..pos,
            done: self.state == State::Done,
        })
    }

    /// One byte of chunk framing: the transition function for everything but payload.
    fn framing_byte(&self, byte: u8) -> Result<State, BodyError> {
        use BodyError::Malformed;
        let line_limit = |line_bytes: usize| {
            if line_bytes >= CHUNK_LINE_BYTES_MAX {
                Err(Malformed("chunk size line too long"))
            } else {
                Ok(line_bytes + 1)
            }
        };
        Ok(match self.state {
            State::Size {
                size,
                digits,
                line_bytes,
            } => {
                let line_bytes = line_limit(line_bytes)?;
                if let Some(value) = hex_value(byte) {
                    if digits >= CHUNK_SIZE_DIGITS_MAX {
                        return Err(Malformed("chunk size over 16 hex digits"));
                    }
                    // Cannot overflow with at most 16 digits; checked anyway so the bound
                    // above is not load-bearing for memory safety of the arithmetic.
                    let size = size
                        .checked_mul(16)
                        .and_then(|s| s.checked_add(u64::from(value)))
                        .ok_or(Malformed("chunk size overflows"))?;
                    State::Size {
                        size,
                        digits: digits + 1,
                        line_bytes,
                    }
                } else if digits == 0 {
                    return Err(Malformed("chunk size must start with a hex digit"));
                } else {
                    match byte {
                        b'\r' => State::SizeLf { size },
                        b';' => State::Ext { size, line_bytes },
                        b' ' | b'\t' => State::SizeWs { size, line_bytes },
                        _ => return Err(Malformed("invalid byte after chunk size")),
                    }
                }
            }
            State::SizeWs { size, line_bytes } => {
                let line_bytes = line_limit(line_bytes)?;
                match byte {
                    b' ' | b'\t' => State::SizeWs { size, line_bytes },
                    b';' => State::Ext { size, line_bytes },
                    // RFC 9112 allows BWS only before an extension: `5 \r\n` is not a size.
                    _ => return Err(Malformed("whitespace after chunk size")),
                }
            }
            State::Ext { size, line_bytes } => {
                let line_bytes = line_limit(line_bytes)?;
                match byte {
                    b'\r' => State::SizeLf { size },
                    b'\t' | b' '..=b'~' | 0x80..=0xff => State::Ext { size, line_bytes },
                    _ => return Err(Malformed("control byte in chunk extension")),
                }
            }
            State::SizeLf { size } => {
                if byte != b'\n' {
                    return Err(Malformed("chunk size line not ended by CRLF"));
                }
                if size == 0 {
                    State::Trailer {
                        line_bytes: 0,
                        colon: false,
                        section_bytes: 0,
                        fields: 0,
                    }
                } else {
                    let total = self.received_bytes.checked_add(size);
                    if total.is_none_or(|t| t > self.body_bytes_max) {
                        return Err(BodyError::TooLarge);
                    }
                    State::Data { remaining: size }
                }
            }
            State::DataCr => match byte {
                b'\r' => State::DataLf,
                _ => return Err(Malformed("chunk data not followed by CRLF")),
            },
            State::DataLf => match byte {
                b'\n' => State::Size {
                    size: 0,
                    digits: 0,
                    line_bytes: 0,
                },
                _ => return Err(Malformed("chunk data not followed by CRLF")),
            },
            State::Trailer {
                line_bytes,
                colon,
                section_bytes,
                fields,
            } => {
                if section_bytes >= TRAILER_BYTES_MAX {
                    return Err(Malformed("trailer section too large"));
                }
                let section_bytes = section_bytes + 1;
                match byte {
                    b'\r' if line_bytes == 0 => State::EndLf,
                    b'\r' if colon => State::TrailerLf {
                        section_bytes,
                        fields,
                    },
                    b'\r' => return Err(Malformed("trailer line without colon")),
                    // Named apart from other control bytes: hyper takes a bare LF as a line end
                    // here, and the differential fuzz target allows exactly this disagreement.
                    b'\n' => return Err(Malformed("bare LF in trailer")),
                    b' ' | b'\t' if line_bytes == 0 => {
                        return Err(Malformed("obsolete line folding in trailer"))
                    }
                    // The name must be a token (RFC 9110 5.1): a line like `GET /x HTTP/1.1`
                    // with a colon later on is not a field, and taking it as one would let
                    // the trailer section swallow what another parser reads as the next
                    // request (found by the `http1_vs_hyper` fuzz target).
                    b':' if !colon && line_bytes > 0 => State::Trailer {
                        line_bytes: line_bytes + 1,
                        colon: true,
                        section_bytes,
                        fields,
                    },
                    _ if !colon && !is_tchar(byte) => {
                        return Err(Malformed("invalid trailer field name"))
                    }
                    b'\t' | b' '..=b'~' | 0x80..=0xff => State::Trailer {
                        line_bytes: line_bytes + 1,
                        colon: colon || byte == b':',
                        section_bytes,
                        fields,
                    },
                    _ => return Err(Malformed("control byte in trailer")),
                }
            }
            State::TrailerLf {
                section_bytes,
                fields,
            } => match byte {
                b'\n' if fields >= TRAILER_FIELDS_MAX => {
                    return Err(Malformed("too many trailer fields"))
                }
                b'\n' => State::Trailer {
                    line_bytes: 0,
                    colon: false,
                    section_bytes: section_bytes + 1,
                    fields: fields + 1,
                },
                _ => return Err(Malformed("trailer line not ended by CRLF")),
            },
            State::EndLf => match byte {
                b'\n' => State::Done,
                _ => return Err(Malformed("chunked body not ended by CRLF")),
            },
            // Payload, Done and Failed are handled by `decode` and never reach here.
            State::Length { .. } | State::Data { .. } | State::Done | State::Failed(_) => {
                return Err(Malformed("internal: framing byte outside framing"))
            }
        })
    }
}

/// `tchar` from RFC 9110 5.6.2: the bytes a field name is made of.
fn is_tchar(byte: u8) -> bool {
    byte.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&byte)
}

fn hex_value(byte: u8) -> Option<u8> {
    match byte {
        b'0'..=b'9' => Some(byte - b'0'),
        b'a'..=b'f' => Some(byte - b'a' + 10),
        b'A'..=b'F' => Some(byte - b'A' + 10),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::http1::samples::{BodyWant, CHUNKED, CHUNKED_BODY_BYTES_MAX};
    use crate::http1::{parse_head, Limits, Status};

    /// Feeds `input` in pieces of `piece_bytes` (the caller appends, drops consumed bytes),
    /// returning the payload, whether the body completed, and the bytes left unconsumed.
    fn run(
        decoder: &mut BodyDecoder,
        input: &[u8],
        piece_bytes: usize,
    ) -> Result<(Vec<u8>, bool, usize), BodyError> {
        let mut payload = Vec::new();
        let mut buffer: Vec<u8> = Vec::new();
        let mut fed = 0;
        loop {
            let step = decoder.decode(&buffer)?;
            assert!(step.data.start <= step.data.end && step.data.end <= step.consumed);
            payload.extend_from_slice(&buffer[step.data.clone()]);
            buffer.drain(..step.consumed);
            if step.done {
                return Ok((payload, true, buffer.len() + input.len() - fed));
            }
            if step.consumed == 0 {
                if fed == input.len() {
                    return Ok((payload, false, buffer.len()));
                }
                let end = (fed + piece_bytes).min(input.len());
                buffer.extend_from_slice(&input[fed..end]);
                fed = end;
            }
        }
    }

    /// [`run`] on a new chunked decoder whose body limit is 100 bytes.
    fn run_chunked(input: &[u8], piece_bytes: usize) -> Result<(Vec<u8>, bool, usize), BodyError> {
        let mut d = BodyDecoder::new(Framing::Chunked, 100).unwrap();
        run(&mut d, input, piece_bytes)
    }

    fn step(consumed: usize, data: std::ops::Range<usize>, done: bool) -> BodyStep {
        BodyStep {
            consumed,
            data,
            done,
        }
    }

    fn body_outcome(body: &[u8], piece_bytes: usize) -> (BodyWant, usize) {
        let mut decoder = match BodyDecoder::new(Framing::Chunked, CHUNKED_BODY_BYTES_MAX) {
            Ok(d) => d,
            Err(e) => return (BodyWant::Reject(e.status()), 0),
        };
        match run(&mut decoder, body, piece_bytes) {
            Ok((payload, true, left)) => (BodyWant::Body(Vec::leak(payload)), left),
            Ok((_, false, _)) => (BodyWant::Incomplete, 0),
            Err(e) => (BodyWant::Reject(e.status()), 0),
        }
    }

    #[test]
    fn chunked_table() {
        for (name, request, want) in CHUNKED {
            let Ok(Status::Complete(head)) = parse_head(request, &Limits::default()) else {
                panic!("case {name}: head did not parse")
            };
            assert_eq!(head.framing(), Framing::Chunked, "case {name}");
            let body = &request[head.head_len()..];
            for piece_bytes in [body.len().max(1), 1, 2, 3, 7] {
                let (got, left) = body_outcome(body, piece_bytes);
                assert_eq!(got, *want, "case {name} in pieces of {piece_bytes}");
                if *name == "next_request_untouched" {
                    assert_eq!(
                        left,
                        b"GET / HTTP/1.1\r\nHost: a\r\n\r\n".len(),
                        "case {name}"
                    );
                } else if let BodyWant::Body(_) = want {
                    assert_eq!(left, 0, "case {name}");
                }
            }
        }
    }

    #[test]
    fn content_length() {
        assert_eq!(
            BodyDecoder::new(Framing::Length(11), 10).err(),
            Some(BodyError::TooLarge)
        );
        assert_eq!(BodyError::TooLarge.status(), 413);
        for piece_bytes in [1, 4, 100] {
            let mut d = BodyDecoder::new(Framing::Length(10), 10).unwrap();
            let (payload, done, left) = run(&mut d, b"0123456789GET", piece_bytes).unwrap();
            assert_eq!(payload, b"0123456789");
            assert!(done);
            assert_eq!(left, 3);
            assert_eq!(d.received_bytes(), 10);
        }
        let mut d = BodyDecoder::new(Framing::Length(10), 10).unwrap();
        let (payload, done, _) = run(&mut d, b"01234", 2).unwrap();
        assert_eq!((payload.as_slice(), done), (&b"01234"[..], false));
    }

    #[test]
    fn empty_bodies_are_done_at_once() {
        for framing in [Framing::None, Framing::Length(0)] {
            let mut d = BodyDecoder::new(framing, 0).unwrap();
            assert!(d.is_done());
            assert_eq!(
                d.decode(b"GET / HTTP/1.1\r\n").unwrap(),
                step(0, 0..0, true)
            );
        }
    }

    #[test]
    fn huge_length_and_limits() {
        let mut d = BodyDecoder::new(Framing::Length(u64::MAX), u64::MAX).unwrap();
        assert_eq!(d.decode(b"abc").unwrap(), step(3, 0..3, false));
        // u64::MAX chunk with an unlimited body is accepted, then decoded incrementally.
        let mut d = BodyDecoder::new(Framing::Chunked, u64::MAX).unwrap();
        assert_eq!(
            d.decode(b"ffffffffffffffff\r\nab").unwrap(),
            step(20, 18..20, false)
        );
    }

    #[test]
    fn size_line_bounded() {
        let mut line = b"5;".to_vec();
        line.resize(CHUNK_LINE_BYTES_MAX - 2, b'x');
        line.extend_from_slice(b"\r\nhello\r\n0\r\n\r\n");
        assert_eq!(run_chunked(&line, 1000).unwrap().0, b"hello");

        let mut long = b"5;".to_vec();
        long.resize(CHUNK_LINE_BYTES_MAX + 10, b'x');
        assert_eq!(
            run_chunked(&long, 1000).err(),
            Some(BodyError::Malformed("chunk size line too long"))
        );
    }

    /// 100 trailer fields are accepted, the 101st is not (hyper draws the line in the same
    /// place: `fuzz/regressions/http1_vs_hyper/trailer-fields-over-100`).
    #[test]
    fn trailer_field_count_bounded() {
        let body_with = |n: usize| {
            let mut body = b"0\r\n".to_vec();
            for i in 0..n {
                body.extend_from_slice(format!("X-{i}: v\r\n").as_bytes());
            }
            body.extend_from_slice(b"\r\n");
            body
        };
        assert!(run_chunked(&body_with(100), 4096).is_ok());
        assert_eq!(
            run_chunked(&body_with(101), 4096).err(),
            Some(BodyError::Malformed("too many trailer fields"))
        );
    }

    #[test]
    fn trailers_bounded() {
        // Few long fields: the byte bound, not the field count, is what they hit.
        let mut body = b"0\r\n".to_vec();
        let field = format!("X-T: {}\r\n", "v".repeat(1000));
        while body.len() < TRAILER_BYTES_MAX + 100 {
            body.extend_from_slice(field.as_bytes());
        }
        body.extend_from_slice(b"\r\n");
        assert_eq!(
            run_chunked(&body, 4096).err(),
            Some(BodyError::Malformed("trailer section too large"))
        );
    }

    #[test]
    fn errors_are_sticky() {
        let mut d = BodyDecoder::new(Framing::Chunked, 100).unwrap();
        let e = d.decode(b"0x1\r\n").unwrap_err();
        assert_eq!(e.status(), 400);
        assert_eq!(d.decode(b"1\r\na\r\n0\r\n\r\n"), Err(e));
    }

    #[test]
    fn done_decoder_consumes_nothing_more() {
        let mut d = BodyDecoder::new(Framing::Chunked, 100).unwrap();
        assert_eq!(d.decode(b"0\r\n\r\nGET").unwrap(), step(5, 5..5, true));
        assert_eq!(d.decode(b"GET").unwrap(), step(0, 0..0, true));
    }
}
