//! Push parser for one connection's request stream, pipelining included.

use core::ops::Range;

use super::body::{BodyDecoder, BodyError};
use super::head::{finish_head, HeadError, HeadScanner, RequestHead};
use super::{Framing, Limits};

/// Why a [`RequestReader`] stopped. Sticky: once returned, every later call returns it again.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReaderError {
    /// The head was rejected.
    Head(HeadError),
    /// The body was rejected (too large or broken chunked framing).
    Body(BodyError),
    /// The caller broke the protocol: it called `next` after a `Head` without choosing
    /// [`RequestReader::begin_body`], [`RequestReader::skip_body`] or
    /// [`RequestReader::reject`], or chose twice. A bug on our side, hence 500.
    OutOfOrder,
}

impl ReaderError {
    /// Status code to answer with before closing.
    pub fn status(&self) -> u16 {
        match self {
            ReaderError::Head(e) => e.status(),
            ReaderError::Body(e) => e.status(),
            ReaderError::OutOfOrder => 500,
        }
    }
}

impl core::fmt::Display for ReaderError {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self {
            ReaderError::Head(e) => e.fmt(f),
            ReaderError::Body(e) => e.fmt(f),
            ReaderError::OutOfOrder => write!(f, "request reader used out of order (500)"),
        }
    }
}

impl std::error::Error for ReaderError {}

/// What [`RequestReader::next`] found. Offsets are relative to the buffer passed to that call.
// `Head` is ~4 KiB (the fixed header array) while the others are small; boxing it would put a
// heap allocation on every request, which the head path must not have.
#[allow(clippy::large_enum_variant)]
#[derive(Debug)]
pub enum Event<'b> {
    /// Nothing complete yet; nothing consumed. Append bytes and call again.
    NeedMore,
    /// A validated head; its [`RequestHead::head_len`] bytes are consumed. Before the next
    /// call choose [`RequestReader::begin_body`], [`RequestReader::skip_body`] or
    /// [`RequestReader::reject`].
    Head(RequestHead<'b>),
    /// Body progress: drop `consumed` bytes; `data` (inside `0..consumed`) is payload, possibly
    /// empty when only chunk framing was consumed or the body is being skipped.
    Body { consumed: usize, data: Range<usize> },
    /// The body is complete: drop `consumed` bytes (the last chunk and trailers, or nothing).
    /// The next call reads the next pipelined head, or returns `Closed` if the request did not
    /// allow keep-alive.
    MessageEnd { consumed: usize },
    /// No further request may be read on this connection (the last one ended with
    /// `Connection: close` semantics, or the caller rejected it). Bytes after it are ignored,
    /// as nginx ignores data pipelined after a closing request.
    Closed,
    /// The stream is broken; answer `status()` with `Connection: close` and close.
    Error(ReaderError),
}

#[derive(Debug, Clone)]
enum ReaderState {
    ReadingHead(HeadScanner),
    AwaitingDecision {
        framing: Framing,
        keep_alive: bool,
    },
    ReadingBody {
        decoder: BodyDecoder,
        keep_alive: bool,
        /// False when the caller skips the body: payload is consumed but not handed out.
        deliver: bool,
        /// The last payload step also finished the body; `MessageEnd` is owed.
        end_pending: bool,
    },
    Closed,
    Failed(ReaderError),
}

/// Push parser for a connection's byte stream: heads and bodies, one request after another.
///
/// Protocol (the caller owns the buffer; the reader owns only bounded state):
///
/// 1. Call [`RequestReader::next`] with all unconsumed bytes. After each event drop the bytes
///    it consumed from the front of the buffer; `NeedMore` consumes nothing, so while a head
///    is arriving the caller appends to the same buffer (the reader remembers how far it has
///    already checked, so a head trickling in byte by byte is scanned once, not re-parsed).
/// 2. On `Head(head)` the caller routes the request, then calls exactly one of
///    `begin_body(limit)` (hand me the payload), `skip_body(limit)` (answer without reading
///    it, but keep the connection: the body is consumed and discarded) or `reject()` (answer
///    and close). Requests without a body still go through this step and then yield
///    `MessageEnd { consumed: 0 }`.
/// 3. `Body` events carry payload, then `MessageEnd`; then back to 1 for the next pipelined
///    request, or `Closed`.
/// 4. `Error` is sticky: answer its status and close.
///
/// The event sequence depends only on the bytes, not on how they were split across calls,
/// apart from how payload is cut into `Body` events (and `Body` events with empty `data`,
/// which only report consumed framing).
#[derive(Debug, Clone)]
pub struct RequestReader {
    limits: Limits,
    state: ReaderState,
}

impl RequestReader {
    /// A reader at the start of a connection.
    pub fn new(limits: Limits) -> Self {
        RequestReader {
            limits,
            state: ReaderState::ReadingHead(HeadScanner::new()),
        }
    }

    /// True while waiting for (the rest of) a head; the engine uses this to tell a slow head
    /// (408) from an idle keep-alive connection.
    pub fn is_reading_head(&self) -> bool {
        matches!(self.state, ReaderState::ReadingHead(_))
    }

    /// Advances over `buf`, the unconsumed bytes of the stream. See the type's documentation.
    pub fn next<'b>(&mut self, buf: &'b [u8]) -> Event<'b> {
        match &mut self.state {
            ReaderState::Failed(e) => Event::Error(*e),
            ReaderState::Closed => Event::Closed,
            ReaderState::AwaitingDecision { .. } => self.fail(ReaderError::OutOfOrder),
            ReaderState::ReadingHead(scanner) => {
                if buf.len() < scanner.scanned() {
                    // The caller dropped bytes it never got an event for; rescanning from the
                    // start is still correct, only slower.
                    *scanner = HeadScanner::new();
                }
                match scanner.scan(buf, &self.limits) {
                    Err(e) => self.fail(ReaderError::Head(e)),
                    Ok(None) => Event::NeedMore,
                    Ok(Some(head_len)) => match finish_head(buf, head_len, &self.limits) {
                        Err(e) => self.fail(ReaderError::Head(e)),
                        Ok(head) => {
                            self.state = ReaderState::AwaitingDecision {
                                framing: head.framing(),
                                keep_alive: head.keep_alive(),
                            };
                            Event::Head(head)
                        }
                    },
                }
            }
            ReaderState::ReadingBody {
                decoder,
                keep_alive,
                deliver,
                end_pending,
            } => {
                let keep_alive = *keep_alive;
                if *end_pending {
                    self.end_message(keep_alive);
                    return Event::MessageEnd { consumed: 0 };
                }
                let step = match decoder.decode(buf) {
                    Ok(step) => step,
                    Err(e) => return self.fail(ReaderError::Body(e)),
                };
                if step.data.is_empty() {
                    if step.done {
                        self.end_message(keep_alive);
                        return Event::MessageEnd {
                            consumed: step.consumed,
                        };
                    }
                    if step.consumed == 0 {
                        return Event::NeedMore;
                    }
                }
                *end_pending = step.done;
                let data = if *deliver {
                    step.data
                } else {
                    step.consumed..step.consumed
                };
                Event::Body {
                    consumed: step.consumed,
                    data,
                }
            }
        }
    }

    /// After a `Head`: read the body, handing payload out in `Body` events. `body_bytes_max`
    /// (bytes) is the route's limit; a larger `Content-Length` fails here with 413 (answer it
    /// before sending `100 Continue`), a chunked body fails once it grows past the limit.
    /// Errors are sticky.
    pub fn begin_body(&mut self, body_bytes_max: u64) -> Result<(), ReaderError> {
        self.start_body(body_bytes_max, true)
    }

    /// After a `Head`: consume and discard the body, keeping the connection (e.g. a 404 for a
    /// PUT whose body is small enough to drain). `body_bytes_max` bounds how much the server
    /// is willing to drain; above it the reader fails with 413 and the caller closes.
    pub fn skip_body(&mut self, body_bytes_max: u64) -> Result<(), ReaderError> {
        self.start_body(body_bytes_max, false)
    }

    /// After a `Head`: the caller answers and closes without reading the body; every later
    /// `next` returns `Closed`.
    pub fn reject(&mut self) {
        if !matches!(self.state, ReaderState::Failed(_)) {
            self.state = ReaderState::Closed;
        }
    }

    fn start_body(&mut self, body_bytes_max: u64, deliver: bool) -> Result<(), ReaderError> {
        let ReaderState::AwaitingDecision {
            framing,
            keep_alive,
        } = self.state
        else {
            return match self.state {
                ReaderState::Failed(e) => Err(e),
                _ => Err(ReaderError::OutOfOrder),
            };
        };
        match BodyDecoder::new(framing, body_bytes_max) {
            Ok(decoder) => {
                self.state = ReaderState::ReadingBody {
                    decoder,
                    keep_alive,
                    deliver,
                    end_pending: false,
                };
                Ok(())
            }
            Err(e) => {
                self.state = ReaderState::Failed(ReaderError::Body(e));
                Err(ReaderError::Body(e))
            }
        }
    }

    fn end_message(&mut self, keep_alive: bool) {
        self.state = if keep_alive {
            ReaderState::ReadingHead(HeadScanner::new())
        } else {
            ReaderState::Closed
        };
    }

    fn fail<'b>(&mut self, e: ReaderError) -> Event<'b> {
        self.state = ReaderState::Failed(e);
        Event::Error(e)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::http1::samples::PIPELINE;
    use crate::http1::Method;

    /// Events with owned contents, and payload merged, so runs with different splits compare.
    #[derive(Debug, Clone, PartialEq, Eq)]
    enum Seen {
        Head {
            method: Method,
            path: String,
            expect_continue: bool,
        },
        Body(Vec<u8>),
        End,
        Closed,
        Error(u16),
    }

    /// Drives a reader over `stream` delivered in pieces of `piece_bytes`, choosing
    /// begin_body for every head, until Closed, Error or the input runs out.
    fn drive(stream: &[u8], piece_bytes: usize) -> Vec<Seen> {
        let mut reader = RequestReader::new(Limits::default());
        let mut seen: Vec<Seen> = Vec::new();
        let mut buffer: Vec<u8> = Vec::new();
        let mut fed = 0;
        loop {
            let (consumed, item) = match reader.next(&buffer) {
                Event::NeedMore => {
                    if fed == stream.len() {
                        return seen;
                    }
                    let end = (fed + piece_bytes).min(stream.len());
                    buffer.extend_from_slice(&stream[fed..end]);
                    fed = end;
                    continue;
                }
                Event::Head(head) => {
                    let item = Seen::Head {
                        method: head.method(),
                        path: head.path().to_owned(),
                        expect_continue: head.expect_continue(),
                    };
                    let consumed = head.head_len();
                    if let Err(e) = reader.begin_body(1024) {
                        seen.extend([item, Seen::Error(e.status())]);
                        return seen;
                    }
                    (consumed, Some(item))
                }
                Event::Body { consumed, data } => {
                    assert!(data.end <= consumed);
                    let bytes = buffer[data].to_vec();
                    if bytes.is_empty() {
                        (consumed, None)
                    } else if let Some(Seen::Body(prev)) = seen.last_mut() {
                        prev.extend_from_slice(&bytes);
                        (consumed, None)
                    } else {
                        (consumed, Some(Seen::Body(bytes)))
                    }
                }
                Event::MessageEnd { consumed } => (consumed, Some(Seen::End)),
                Event::Closed => {
                    seen.push(Seen::Closed);
                    return seen;
                }
                Event::Error(e) => {
                    seen.push(Seen::Error(e.status()));
                    // Sticky.
                    assert!(matches!(reader.next(&buffer), Event::Error(again) if again == e));
                    return seen;
                }
            };
            buffer.drain(..consumed);
            seen.extend(item);
        }
    }

    fn head(method: Method, path: &str, expect_continue: bool) -> Seen {
        Seen::Head {
            method,
            path: path.to_owned(),
            expect_continue,
        }
    }

    #[test]
    fn pipeline_same_events_whole_and_byte_by_byte() {
        let want = vec![
            head(Method::Get, "/up", false),
            Seen::End,
            head(Method::Put, "/cache/one", false),
            Seen::Body(b"hello".to_vec()),
            Seen::End,
            head(Method::Put, "/cache/two", false),
            Seen::Body(b"abcdefg".to_vec()),
            Seen::End,
            head(Method::Head, "/cas/1", true),
            Seen::End,
            head(Method::Get, "/last", false),
            Seen::End,
            Seen::Closed,
        ];
        for piece_bytes in [PIPELINE.len(), 1, 2, 5, 13, 64] {
            assert_eq!(
                drive(PIPELINE, piece_bytes),
                want,
                "pieces of {piece_bytes}"
            );
        }
    }

    #[test]
    fn errors_stop_the_stream() {
        let stream = b"GET /a HTTP/1.1\r\nHost: a\r\n\r\nPUT /b HTTP/1.1\r\nHost: a\r\n\
Content-Length: 1\r\nTransfer-Encoding: chunked\r\n\r\nGET /c HTTP/1.1\r\nHost: a\r\n\r\n";
        let want = vec![head(Method::Get, "/a", false), Seen::End, Seen::Error(400)];
        for piece_bytes in [stream.len(), 1] {
            assert_eq!(drive(stream, piece_bytes), want);
        }
        let chunked = b"PUT /b HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n\
3\r\nabc\r\n0x1\r\n";
        let want = vec![
            head(Method::Put, "/b", false),
            Seen::Body(b"abc".to_vec()),
            Seen::Error(400),
        ];
        for piece_bytes in [chunked.len(), 1] {
            assert_eq!(drive(chunked, piece_bytes), want);
        }
    }

    #[test]
    fn skip_reject_and_misuse() {
        let stream = b"PUT /a HTTP/1.1\r\nHost: a\r\nContent-Length: 3\r\n\r\nabcGET /b HTTP/1.1\r\nHost: a\r\n\r\n";
        let mut reader = RequestReader::new(Limits::default());
        let Event::Head(h) = reader.next(stream) else {
            panic!("head")
        };
        let mut off = h.head_len();
        reader.skip_body(10).unwrap();
        let Event::Body { consumed, data } = reader.next(&stream[off..]) else {
            panic!("body")
        };
        assert_eq!((consumed, data.is_empty()), (3, true));
        off += consumed;
        assert!(matches!(
            reader.next(&stream[off..]),
            Event::MessageEnd { consumed: 0 }
        ));
        assert!(reader.is_reading_head());
        let Event::Head(h) = reader.next(&stream[off..]) else {
            panic!("head")
        };
        assert_eq!(h.path(), "/b");
        // A second decision is out of order, but does not break the first.
        reader.begin_body(0).unwrap();
        assert_eq!(reader.begin_body(0), Err(ReaderError::OutOfOrder));
        assert!(matches!(
            reader.next(b""),
            Event::MessageEnd { consumed: 0 }
        ));

        // next() without a decision is a sticky 500.
        let mut reader = RequestReader::new(Limits::default());
        assert!(matches!(reader.next(stream), Event::Head(_)));
        let Event::Error(e) = reader.next(stream) else {
            panic!("error")
        };
        assert_eq!(e, ReaderError::OutOfOrder);
        assert_eq!(e.status(), 500);

        // reject() closes.
        let mut reader = RequestReader::new(Limits::default());
        assert!(matches!(reader.next(stream), Event::Head(_)));
        reader.reject();
        assert!(matches!(reader.next(stream), Event::Closed));

        // A Content-Length over the route's limit fails at begin_body, sticky, with 413.
        let mut reader = RequestReader::new(Limits::default());
        assert!(matches!(reader.next(stream), Event::Head(_)));
        let e = reader.begin_body(2).unwrap_err();
        assert_eq!(e.status(), 413);
        assert!(matches!(reader.next(stream), Event::Error(again) if again == e));
    }

    /// Every sample request gives the same events however it is split, and the reader
    /// agrees with `parse_head` about the first head.
    #[test]
    fn every_sample_is_split_invariant() {
        use crate::http1::samples::{sample_requests, Want, HEADS};
        for (name, bytes) in sample_requests() {
            let whole = drive(bytes, bytes.len().max(1));
            for piece_bytes in [1, 3] {
                assert_eq!(
                    drive(bytes, piece_bytes),
                    whole,
                    "sample {name}, pieces of {piece_bytes}"
                );
            }
        }
        for (name, bytes, want) in HEADS {
            let first = drive(bytes, bytes.len().max(1)).into_iter().next();
            match (want, first) {
                (
                    Want::Head { method, path, .. },
                    Some(Seen::Head {
                        method: m, path: p, ..
                    }),
                ) => {
                    assert_eq!((*method, *path), (m, p.as_str()), "sample {name}")
                }
                (Want::Partial, None) => {}
                (Want::Reject(status), Some(Seen::Error(s))) => {
                    assert_eq!(*status, s, "sample {name}")
                }
                (want, got) => panic!("sample {name}: want {want:?}, reader saw {got:?}"),
            }
        }
    }

    #[test]
    fn http10_closes_after_first() {
        let stream = b"GET /a HTTP/1.0\r\n\r\nGET /b HTTP/1.0\r\n\r\n";
        assert_eq!(
            drive(stream, 1),
            vec![head(Method::Get, "/a", false), Seen::End, Seen::Closed]
        );
    }
}

#[cfg(test)]
mod limit_tests {
    use super::*;

    #[test]
    fn oversized_head_fails_while_trickling_in() {
        let limits = Limits {
            head_bytes_max: 64,
            ..Limits::default()
        };
        let mut stream = b"GET / HTTP/1.1\r\nHost: a\r\nX-Pad: ".to_vec();
        stream.resize(200, b'p');
        let mut reader = RequestReader::new(limits);
        let mut fed = 0;
        let error = loop {
            match reader.next(&stream[..fed]) {
                Event::NeedMore => fed += 1,
                Event::Error(e) => break e,
                other => panic!("unexpected {other:?}"),
            }
        };
        assert_eq!(error, ReaderError::Head(HeadError::HeadTooLarge));
        assert_eq!(error.status(), 431);
        // Answered as soon as the limit was crossed, not when the client stopped sending.
        assert_eq!(fed, 64);
    }
}
