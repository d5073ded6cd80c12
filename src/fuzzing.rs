//! Checks shared by the cargo-fuzz targets in `fuzz/` and the corpus replay test
//! `tests/fuzz_corpus.rs`. Not an API: hidden from the docs and free to change. Compiled only
//! with the `fuzzing` feature (off by default: the server does not carry its oracles);
//! `fuzz/Cargo.toml` turns it on, and so does this crate's dev-dependency on itself, so
//! `cargo test` replays the corpus without flags.
//!
//! Each `check_*` function takes the raw fuzz input and panics when a property is violated,
//! which is what a fuzz target reports as a crash. The fuzz targets are one call each, and the
//! replay test feeds every committed corpus file and reproducer through the same function, so
//! a normal `cargo test` on stable re-checks everything the fuzzers ever found.
//!
//! Panicking is deliberate here (this module is an oracle, not server code); nothing on a
//! serving path calls it.
//!
//! Input formats (so a corpus file can be written by hand):
//! - `http1_request`, `http1_vs_hyper`: the bytes of a request stream, as sent on a socket.
//! - `http1_stream`, `chunked`: a split prefix, then the stream or chunked body. The first byte
//!   `n` gives the count of piece-size bytes that follow (`n % 16`); each piece is `b + 1`
//!   bytes and the pieces repeat until the input is used up. `\x00` means "no pieces": the
//!   input is still compared whole against byte by byte.
//! - `range_header`: 8 bytes of little-endian representation length, then the header value.
//! - `config`: the text of a TOML config file (invalid UTF-8 is replaced, as a file read
//!   lossily would be; the loader itself takes `&str`).
//! - `artifact_header`: bytes read from the start of an artifact file (see
//!   [`check_artifact_header`] for how the same bytes also drive the encoder).
//! - `artifact_meta`: a version-2 metadata section (entries and checksum); the same bytes
//!   are also read as bare entries, as an `x-sluice-meta` value, and as `name:value` lines
//!   that build a [`crate::store::format::Meta`] for the encoder.
//! - `turbo_bodies`: a request body of `POST /v8/artifacts` or `POST /v8/artifacts/events`
//!   (both parsers get every input), also read as a query string naming a team.

use core::cell::RefCell;
use std::rc::Rc;

use crate::http1::{
    parse_head, parse_range, BodyDecoder, BodyError, Event, Framing, HeadError, Limits,
    RangeOutcome, ReaderError, RequestHead, RequestReader, Status,
};

/// A fuzz target's name (its directory under `fuzz/corpus/`) and its check.
#[derive(Debug, Clone, Copy)]
pub struct Target {
    /// Name of the cargo-fuzz binary and of its corpus directory.
    pub name: &'static str,
    /// Panics when the input breaks a property.
    pub check: fn(&[u8]),
}

/// Every target, in the order `fuzz/run` runs them.
pub const TARGETS: &[Target] = &[
    Target {
        name: "http1_request",
        check: check_http1_request,
    },
    Target {
        name: "http1_stream",
        check: check_http1_stream,
    },
    Target {
        name: "http1_vs_hyper",
        check: check_http1_vs_hyper,
    },
    Target {
        name: "chunked",
        check: check_chunked,
    },
    Target {
        name: "range_header",
        check: check_range_header,
    },
    Target {
        name: "peer_summaries",
        check: check_peer_summaries,
    },
    Target {
        name: "outbox_record",
        check: check_outbox_record,
    },
    Target {
        name: "peer_get_response",
        check: check_peer_get_response,
    },
    Target {
        name: "artifact_header",
        check: check_artifact_header,
    },
    Target {
        name: "config",
        check: check_config,
    },
    Target {
        name: "artifact_meta",
        check: check_artifact_meta,
    },
    Target {
        name: "turbo_bodies",
        check: check_turbo_bodies,
    },
    Target {
        name: "reapi_resource",
        check: check_reapi_resource,
    },
    Target {
        name: "action_result",
        check: check_action_result,
    },
    Target {
        name: "peer_batch",
        check: check_peer_batch,
    },
];

/// The check registered for `name`, if any.
pub fn target(name: &str) -> Option<Target> {
    TARGETS.iter().copied().find(|t| t.name == name)
}

/// Limits small enough that a fuzzer reaches every limit error within its default 4 KiB
/// inputs.
const TIGHT_LIMITS: Limits = Limits {
    head_bytes_max: 256,
    uri_bytes_max: 64,
    headers_max: 8,
};

/// Body limit the stream and chunked targets give every request, in bytes: small enough that
/// 413 is reachable, large enough for real bodies.
pub const FUZZ_BODY_BYTES_MAX: u64 = 1024;

/// Everything a head says, owned, so two parses can be compared.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HeadView {
    pub method: String,
    pub target: String,
    pub path: String,
    pub query: Option<String>,
    pub version_minor: u8,
    pub headers: Vec<(String, Vec<u8>)>,
    pub framing: Framing,
    pub keep_alive: bool,
    pub expect_continue: bool,
}

impl HeadView {
    pub fn of(head: &RequestHead<'_>) -> HeadView {
        HeadView {
            method: head.method_str().to_owned(),
            target: head.target().to_owned(),
            path: head.path().to_owned(),
            query: head.query().map(str::to_owned),
            version_minor: head.version_minor(),
            headers: head
                .headers()
                .map(|(n, v)| (n.to_owned(), v.to_vec()))
                .collect(),
            framing: head.framing(),
            keep_alive: head.keep_alive(),
            expect_continue: head.expect_continue(),
        }
    }
}

/// Serialises a head from its parts: request line, then `name:value` lines. No space after
/// the colon and no leading empty lines, so the result is never longer than the input and
/// fits the same limits.
pub fn serialise_head(head: &RequestHead<'_>) -> Vec<u8> {
    let mut out = Vec::with_capacity(head.head_len());
    out.extend_from_slice(head.method_str().as_bytes());
    out.push(b' ');
    out.extend_from_slice(head.target().as_bytes());
    out.extend_from_slice(if head.version_minor() == 0 {
        b" HTTP/1.0\r\n"
    } else {
        b" HTTP/1.1\r\n"
    });
    for (name, value) in head.headers() {
        out.extend_from_slice(name.as_bytes());
        out.push(b':');
        out.extend_from_slice(value);
        out.extend_from_slice(b"\r\n");
    }
    out.extend_from_slice(b"\r\n");
    out
}

/// `http1_request`: `parse_head` never panics; the reader agrees with it about the first
/// head; tighter limits only ever add limit errors; a strict prefix of an accepted head is
/// partial; an accepted head re-serialised from its parts re-parses to an equivalent head,
/// and serialising that again is a fixed point.
pub fn check_http1_request(data: &[u8]) {
    let limits = Limits::default();
    let result = parse_head(data, &limits);

    let mut reader = RequestReader::new(limits);
    match (&result, reader.next(data)) {
        (Ok(Status::Partial), Event::NeedMore) => {}
        (Ok(Status::Complete(a)), Event::Head(b)) => {
            assert_eq!(HeadView::of(a), HeadView::of(&b), "reader vs parse_head");
            assert_eq!(a.head_len(), b.head_len(), "reader vs parse_head head_len");
        }
        (Err(e), Event::Error(ReaderError::Head(f))) => assert_eq!(*e, f, "reader vs parse_head"),
        (r, ev) => panic!("parse_head gave {r:?} but the reader gave {ev:?}"),
    }

    let limit_errors = [
        HeadError::HeadTooLarge,
        HeadError::TooManyHeaders,
        HeadError::UriTooLong,
    ];
    match (&result, parse_head(data, &TIGHT_LIMITS)) {
        (Ok(Status::Complete(a)), Ok(Status::Complete(b))) => {
            assert_eq!(
                HeadView::of(a),
                HeadView::of(&b),
                "tight limits changed the head"
            )
        }
        (Ok(Status::Partial), Ok(Status::Partial)) => {}
        (Err(e), Err(f)) if *e == f => {}
        (_, Err(f)) if limit_errors.contains(&f) => {}
        (r, t) => panic!("default limits gave {r:?}, tight limits gave {t:?}"),
    }

    let Ok(Status::Complete(head)) = result else {
        return;
    };
    let head_len = head.head_len();
    assert!(
        head_len > 0 && head_len <= data.len(),
        "head_len {head_len}"
    );
    for cut in [head_len - 1, head_len / 2] {
        assert!(
            matches!(parse_head(&data[..cut], &limits), Ok(Status::Partial)),
            "prefix of {cut} bytes of an accepted head is not partial"
        );
    }

    let bytes = serialise_head(&head);
    assert!(bytes.len() <= head_len, "re-serialised head grew");
    let again = match parse_head(&bytes, &limits) {
        Ok(Status::Complete(again)) => again,
        other => panic!(
            "re-serialised head {:?} did not re-parse: {other:?}",
            String::from_utf8_lossy(&bytes)
        ),
    };
    assert_eq!(HeadView::of(&head), HeadView::of(&again), "round trip");
    assert_eq!(again.head_len(), bytes.len());
    assert_eq!(
        serialise_head(&again),
        bytes,
        "serialisation is not a fixed point"
    );
}

/// Splits a `http1_stream` / `chunked` input into piece sizes and payload (see the module
/// docs for the format).
pub fn split_control(data: &[u8]) -> (Vec<usize>, &[u8]) {
    let Some((&first, rest)) = data.split_first() else {
        return (Vec::new(), data);
    };
    let n = usize::from(first % 16).min(rest.len());
    let pieces = rest[..n].iter().map(|&b| usize::from(b) + 1).collect();
    (pieces, &rest[n..])
}

/// How a stream is handed to a parser.
#[derive(Debug, Clone, Copy)]
pub enum Feed<'p> {
    /// Everything in one call.
    Whole,
    /// Pieces of these sizes, repeated until the input is used up; never empty.
    Pieces(&'p [usize]),
}

impl Feed<'_> {
    fn piece(&self, index: usize, left: usize) -> usize {
        match self {
            Feed::Whole => left,
            Feed::Pieces(sizes) => sizes[index % sizes.len()].clamp(1, left.max(1)),
        }
    }
}

/// What a reader saw, with payload merged across `Body` events so that different splits
/// compare equal.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Seen {
    Head(Box<HeadView>),
    Body(Vec<u8>),
    /// The message ended; offset of its last byte + 1 in the stream.
    MessageEnd {
        stream_offset: usize,
    },
    Closed,
    Error(ReaderError),
    /// The input ran out while the reader wanted more; this many bytes were buffered.
    Eof {
        buffered_bytes: usize,
    },
}

/// Drives a [`RequestReader`] over `stream`, choosing `begin_body(body_bytes_max)` for every
/// head, and checks the reader's buffer contract on the way: ranges inside the buffer, a
/// head never buffered past `head_bytes_max`, a body never left unconsumed, and progress on
/// every call.
pub fn drive_reader(stream: &[u8], feed: Feed<'_>, body_bytes_max: u64) -> Vec<Seen> {
    let limits = Limits::default();
    let mut reader = RequestReader::new(limits);
    let mut seen: Vec<Seen> = Vec::new();
    let mut buffer: Vec<u8> = Vec::new();
    let mut fed = 0;
    let mut pieces = 0;
    let mut dropped = 0;
    // Every call consumes bytes, feeds bytes, or emits one of at most two zero-length events
    // per head (Head itself consumes, MessageEnd may not): a bound any correct reader meets.
    let calls_max = 4 * stream.len() + 16;
    for _ in 0..calls_max {
        let reading_head = reader.is_reading_head();
        let (consumed, item) = match reader.next(&buffer) {
            Event::NeedMore => {
                if reading_head {
                    assert!(
                        buffer.len() <= limits.head_bytes_max,
                        "NeedMore with {} head bytes buffered",
                        buffer.len()
                    );
                } else {
                    assert!(buffer.is_empty(), "NeedMore with body bytes left in buffer");
                }
                if fed == stream.len() {
                    seen.push(Seen::Eof {
                        buffered_bytes: buffer.len(),
                    });
                    return seen;
                }
                let end = fed + feed.piece(pieces, stream.len() - fed);
                pieces += 1;
                buffer.extend_from_slice(&stream[fed..end]);
                fed = end;
                continue;
            }
            Event::Head(head) => {
                let view = HeadView::of(&head);
                let consumed = head.head_len();
                assert!(consumed > 0 && consumed <= buffer.len());
                seen.push(Seen::Head(Box::new(view)));
                if let Err(e) = reader.begin_body(body_bytes_max) {
                    assert!(matches!(reader.next(&buffer), Event::Error(again) if again == e));
                    seen.push(Seen::Error(e));
                    return seen;
                }
                (consumed, None)
            }
            Event::Body { consumed, data } => {
                assert!(consumed > 0, "Body event without progress");
                assert!(data.start <= data.end && data.end <= consumed && consumed <= buffer.len());
                let bytes = &buffer[data];
                if !bytes.is_empty() {
                    if let Some(Seen::Body(prev)) = seen.last_mut() {
                        prev.extend_from_slice(bytes);
                    } else {
                        seen.push(Seen::Body(bytes.to_vec()));
                    }
                }
                (consumed, None)
            }
            Event::MessageEnd { consumed } => {
                assert!(consumed <= buffer.len());
                let stream_offset = dropped + consumed;
                (consumed, Some(Seen::MessageEnd { stream_offset }))
            }
            Event::Closed => {
                seen.push(Seen::Closed);
                return seen;
            }
            Event::Error(e) => {
                assert!(matches!(reader.next(&buffer), Event::Error(again) if again == e));
                seen.push(Seen::Error(e));
                return seen;
            }
        };
        buffer.drain(..consumed);
        dropped += consumed;
        seen.extend(item);
    }
    panic!("reader made no progress within {calls_max} calls");
}

/// `http1_stream`: a pipelined stream gives the same events fed whole, byte by byte and in
/// the fuzzer's pieces.
pub fn check_http1_stream(data: &[u8]) {
    let (pieces, stream) = split_control(data);
    let whole = drive_reader(stream, Feed::Whole, FUZZ_BODY_BYTES_MAX);
    let bytewise = drive_reader(stream, Feed::Pieces(&[1]), FUZZ_BODY_BYTES_MAX);
    assert_eq!(whole, bytewise, "whole vs byte by byte");
    if !pieces.is_empty() {
        let split = drive_reader(stream, Feed::Pieces(&pieces), FUZZ_BODY_BYTES_MAX);
        assert_eq!(whole, split, "whole vs pieces {pieces:?}");
    }
}

/// Where a chunked decode stopped.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BodyEnd {
    /// Complete after this many input bytes.
    Done {
        consumed_bytes: usize,
    },
    /// The input ran out first.
    Incomplete,
    Error(BodyError),
}

/// Decodes `input` as one chunked body fed as `feed` says; returns the payload and the end.
pub fn decode_chunked(input: &[u8], feed: Feed<'_>, body_bytes_max: u64) -> (Vec<u8>, BodyEnd) {
    let mut decoder = match BodyDecoder::new(Framing::Chunked, body_bytes_max) {
        Ok(d) => d,
        Err(e) => return (Vec::new(), BodyEnd::Error(e)),
    };
    let mut payload = Vec::new();
    let mut buffer: Vec<u8> = Vec::new();
    let (mut fed, mut pieces, mut dropped) = (0, 0, 0);
    loop {
        let step = match decoder.decode(&buffer) {
            Ok(step) => step,
            Err(e) => {
                assert_eq!(decoder.decode(&buffer), Err(e), "errors are sticky");
                return (payload, BodyEnd::Error(e));
            }
        };
        assert!(step.data.start <= step.data.end && step.data.end <= step.consumed);
        assert!(step.consumed <= buffer.len());
        payload.extend_from_slice(&buffer[step.data.clone()]);
        buffer.drain(..step.consumed);
        dropped += step.consumed;
        if step.done {
            assert_eq!(decoder.decode(b"more").map(|s| s.consumed), Ok(0));
            assert_eq!(decoder.received_bytes(), payload.len() as u64);
            return (
                payload,
                BodyEnd::Done {
                    consumed_bytes: dropped,
                },
            );
        }
        if step.consumed == 0 {
            assert!(buffer.is_empty(), "decoder left bytes it could use");
            if fed == input.len() {
                return (payload, BodyEnd::Incomplete);
            }
            let end = fed + feed.piece(pieces, input.len() - fed);
            pieces += 1;
            buffer.extend_from_slice(&input[fed..end]);
            fed = end;
        }
    }
}

/// Encodes `payload` as chunked framing, cutting it into chunks of the given sizes (cycled),
/// with the syntax variations chosen by `style` bits: 1 upper-case hex, 2 leading zeros,
/// 4 a chunk extension, 8 a trailer section.
pub fn encode_chunked(payload: &[u8], sizes: &[usize], style: u8) -> Vec<u8> {
    let mut out = Vec::with_capacity(payload.len() + 16 * (sizes.len() + 2));
    let mut rest = payload;
    let mut index = 0;
    let size_line = |out: &mut Vec<u8>, size: usize| {
        if style & 2 != 0 {
            out.extend_from_slice(b"00");
        }
        let hex = if style & 1 != 0 {
            format!("{size:X}")
        } else {
            format!("{size:x}")
        };
        out.extend_from_slice(hex.as_bytes());
        if style & 4 != 0 {
            out.extend_from_slice(b";ext=\"v\"");
        }
        out.extend_from_slice(b"\r\n");
    };
    while !rest.is_empty() {
        let want = sizes
            .get(index % sizes.len().max(1))
            .copied()
            .unwrap_or(rest.len());
        let take = want.clamp(1, rest.len());
        size_line(&mut out, take);
        out.extend_from_slice(&rest[..take]);
        out.extend_from_slice(b"\r\n");
        rest = &rest[take..];
        index += 1;
    }
    size_line(&mut out, 0);
    if style & 8 != 0 {
        out.extend_from_slice(b"X-Trailer: v\r\n");
    }
    out.extend_from_slice(b"\r\n");
    out
}

/// `chunked`: the decoder gives the same payload and end fed whole, byte by byte and in the
/// fuzzer's pieces; and arbitrary data encoded as chunked framing decodes back to itself,
/// ending exactly where the encoding ends, and respecting an exact body limit.
pub fn check_chunked(data: &[u8]) {
    let (pieces, body) = split_control(data);
    let whole = decode_chunked(body, Feed::Whole, FUZZ_BODY_BYTES_MAX);
    assert_eq!(
        whole,
        decode_chunked(body, Feed::Pieces(&[1]), FUZZ_BODY_BYTES_MAX),
        "whole vs byte by byte"
    );
    if !pieces.is_empty() {
        assert_eq!(
            whole,
            decode_chunked(body, Feed::Pieces(&pieces), FUZZ_BODY_BYTES_MAX),
            "whole vs pieces {pieces:?}"
        );
    }
    if let BodyEnd::Done { consumed_bytes } = whole.1 {
        assert!(consumed_bytes <= body.len());
    }

    let style = data.first().copied().unwrap_or(0) >> 4;
    let mut encoded = encode_chunked(body, &pieces, style);
    let encoded_bytes = encoded.len();
    // Bytes of the next pipelined request must stay untouched.
    encoded.extend_from_slice(b"GET / HTTP/1.1\r\n");
    let limit = body.len() as u64;
    let want = (
        body.to_vec(),
        BodyEnd::Done {
            consumed_bytes: encoded_bytes,
        },
    );
    for feed in [Feed::Whole, Feed::Pieces(&[1]), Feed::Pieces(&[7, 1, 30])] {
        assert_eq!(
            decode_chunked(&encoded, feed, limit),
            want,
            "round trip {feed:?}"
        );
    }
    if let Some(below) = limit.checked_sub(1) {
        assert_eq!(
            decode_chunked(&encoded, Feed::Whole, below).1,
            BodyEnd::Error(BodyError::TooLarge),
            "a body one byte over the limit"
        );
    }
}

/// `outbox_record`: the replication outbox is read back after a crash, torn tail and all.
/// `Record::parse` never panics on any line, and a line it accepts is exactly what
/// `Record::line` writes for the record it returns, so a restart replays the same entries.
pub fn check_outbox_record(data: &[u8]) {
    use crate::delivery::outbox::Record;
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    for line in text.lines() {
        if let Some(record) = Record::parse(line) {
            let written = record.line();
            assert_eq!(Record::parse(written.trim_end_matches('\n')), Some(record));
        }
    }
}

/// `peer_batch`: the body of a `POST /_peer/v1/batch` (many replicated writes). `decode`
/// never panics; what it accepts stays within a batch's bounds, every body lies inside the
/// input, and encoding the entries it returned decodes to the same entries (the sender's
/// encoder and the receiver's decoder agree).
pub fn check_peer_batch(data: &[u8]) {
    use crate::replication::batch::{decode, encode_entry, ENTRIES_MAX, ENTRY_BYTES_MAX};
    let Ok(entries) = decode(data) else {
        return;
    };
    assert!(entries.len() <= ENTRIES_MAX);
    let mut again = Vec::new();
    for e in &entries {
        assert!(e.body.len() as u64 <= ENTRY_BYTES_MAX);
        let within = data.as_ptr_range();
        assert!(e.body.is_empty() || within.contains(&e.body.as_ptr()));
        encode_entry(
            &mut again,
            e.ns,
            e.key,
            e.write_time_ms,
            &e.sha256,
            e.meta,
            e.body,
        );
    }
    assert_eq!(decode(&again).as_ref(), Ok(&entries));
}

/// `peer_get_response`: a peer's answer to a read-through (`GET /_peer/v1/get/...`), as the
/// fetch reads it: `parse_response` and `read_through::verify` never panic on any bytes; an
/// answer `verify` accepts has a body that hashes to what it returns (so nothing unchecked is
/// ever stored), and under `cas` the key it was asked for is that hash.
pub fn check_peer_get_response(data: &[u8]) {
    use crate::outgoing::parse_response;
    use crate::replication::read_through::verify;
    use sha2::{Digest, Sha256};
    for eof in [false, true] {
        let Some(Ok(resp)) = parse_response(data, eof) else {
            continue;
        };
        let digest: [u8; 32] = Sha256::digest(&resp.body).into();
        if let Ok(v) = verify("gradle", "k", &resp) {
            assert_eq!(v.sha256, digest);
        }
        let key = resp
            .sluice_header("x-sluice-sha256")
            .and_then(|v| std::str::from_utf8(v).ok())
            .unwrap_or("")
            .trim()
            .to_ascii_lowercase();
        if let Ok(v) = verify("cas", &key, &resp) {
            assert_eq!(v.sha256, digest);
            assert_eq!(key, hex::encode(digest));
        }
    }
    // The same bytes as the head of a streamed fetch (artifacts over the
    // in-memory bound): never panics, and a head it accepts ends inside the
    // input, at an empty line (httparse takes `\n` or `\r\n` line ends,
    // mixed too: `...17\n\r\n` is a complete head).
    use crate::replication::read_through::parse_stream_head;
    if let Ok(Some((_, head_len))) = parse_stream_head(data) {
        assert!(head_len <= data.len());
        let head = &data[..head_len];
        assert!(head.ends_with(b"\n\n") || head.ends_with(b"\n\r\n"));
    }
}

/// `peer_summaries`: what a peer sends during anti-entropy (a bucket summary, a page of a
/// listing of entries, the key a page starts after) never panics the decoders, and whatever
/// decodes encodes back to bytes that decode to the same thing, so two nodes never disagree
/// about what was said.
pub fn check_peer_summaries(data: &[u8]) {
    use crate::replication::summary::{
        decode_listing, decode_summary, encode_listing, encode_summary,
    };
    if let Some(buckets) = decode_summary(data) {
        assert_eq!(decode_summary(&encode_summary(&buckets)), Some(buckets));
    }
    if let Some((entries, more)) = decode_listing(data) {
        assert_eq!(
            decode_listing(&encode_listing(&entries, more)),
            Some((entries, more))
        );
    }
    // A later page's start, as the peer API reads it from the path: what
    // it accepts is a valid namespace and key, and asks for the same page
    // when written back.
    if let Ok(text) = std::str::from_utf8(data) {
        use crate::replication::summary::Query;
        if let Some(after) = Query::parse_after(text.trim()) {
            assert!(crate::store::valid_namespace(&after.0) && crate::store::valid_key(&after.1));
            let path = Query::Buckets(vec![0], Some(after.clone())).path();
            let hex = path.rsplit('/').next().unwrap_or_default();
            assert_eq!(Query::parse_after(hex), Some(after));
        }
    }
}

/// `reapi_resource`: a ByteStream resource name (the first byte picks read or write, the
/// rest is the name, as UTF-8 since protobuf strings are). `resource::parse` and
/// `check_instance` never panic; a name that parses has a SHA-256 hash, a size that fits
/// REAPI's int64 and an instance the instance check accepts, and its canonical form parses
/// back to the same parts; refusals say why in a bounded message.
pub fn check_reapi_resource(data: &[u8]) {
    use crate::reapi::resource::{check_instance, format, parse, Access};
    let Some((&first, rest)) = data.split_first() else {
        return;
    };
    let Ok(name) = std::str::from_utf8(rest) else {
        return;
    };
    let access = if first % 2 == 0 {
        Access::Read
    } else {
        Access::Write
    };
    let _ = check_instance(name);
    match parse(name, access) {
        Ok(res) => {
            assert!(crate::action_result::is_sha256_hex(res.hash), "{res:?}");
            assert!(res.size_bytes <= i64::MAX as u64);
            assert_eq!(check_instance(res.instance), Ok(()));
            assert_eq!(res.upload.is_some(), access == Access::Write);
            let canonical = format(&res);
            assert_eq!(parse(&canonical, access), Ok(res), "{canonical}");
        }
        Err(why) => assert!(!why.is_empty() && why.len() < 1024, "{why}"),
    }
}

/// `action_result`: an action result as a client sends it (`UpdateActionResult`) or as the
/// action cache holds it (a protobuf `ActionResult`). Decoding and validation never panic;
/// what validates names only well-formed blobs, re-encodes to bytes that validate again, and
/// the completeness check against a CAS holding everything finds it complete, against an empty
/// one finds each named blob missing once; the same bytes read as a `Tree` never panic.
pub fn check_action_result(data: &[u8]) {
    use crate::action_result::{check, decode, named_blobs, tree_files, Blob, Cas, Completeness};
    use prost::Message as _;
    struct Fake {
        present: bool,
        tree: Vec<u8>,
    }
    impl Cas for Fake {
        type Error = ();
        fn contains(&mut self, _: &Blob) -> Result<bool, ()> {
            Ok(self.present)
        }
        fn read(&mut self, _: &Blob) -> Result<Option<Vec<u8>>, ()> {
            Ok(self.present.then(|| self.tree.clone()))
        }
    }
    let _ = tree_files(data);
    let Some(result) = decode(data) else {
        return;
    };
    let (files, trees) = named_blobs(&result);
    for blob in files.iter().chain(&trees) {
        assert!(crate::action_result::is_sha256_hex(&blob.hash) && !blob.is_empty());
    }
    assert_eq!(decode(&result.encode_to_vec()), Some(result.clone()));
    // Every tree reads as an empty Tree: no more files to find.
    let mut all = Fake {
        present: true,
        tree: Vec::new(),
    };
    assert!(matches!(
        check(&result, &mut all),
        Ok(Completeness::Complete | Completeness::TooLarge)
    ));
    let mut none = Fake {
        present: false,
        tree: Vec::new(),
    };
    match check(&result, &mut none) {
        Ok(Completeness::Complete) => assert!(files.is_empty() && trees.is_empty()),
        Ok(Completeness::Missing(missing)) => {
            let unique: std::collections::HashSet<_> = missing.iter().collect();
            assert_eq!(unique.len(), missing.len(), "a blob reported twice");
            assert!(missing
                .iter()
                .all(|b| files.contains(b) || trees.contains(b)));
        }
        Ok(Completeness::TooLarge) | Err(()) => {}
    }
}

/// `range_header`: `parse_range` never panics; a `Partial` range lies inside the
/// representation with `start <= end`; the answer does not depend on anything but the value
/// and the length.
pub fn check_range_header(data: &[u8]) {
    let split = data.len().min(8);
    let mut len_bytes = [0u8; 8];
    len_bytes[..split].copy_from_slice(&data[..split]);
    let value = &data[split..];
    let fuzzed_len = u64::from_le_bytes(len_bytes);
    for len in [fuzzed_len, 0, 1, 10, 4096, u64::MAX - 1, u64::MAX] {
        let outcome = parse_range(value, len);
        assert_eq!(outcome, parse_range(value, len), "not deterministic");
        match outcome {
            RangeOutcome::Partial {
                start,
                end_inclusive,
            } => {
                assert!(
                    start <= end_inclusive && end_inclusive < len,
                    "{start}-{end_inclusive} outside len {len}"
                );
            }
            RangeOutcome::Unsatisfiable => {
                // Selecting nothing from a longer representation would mean selecting
                // something from a shorter one was possible: only ever shrinks.
                if let Some(shorter) = len.checked_sub(1) {
                    assert!(
                        !matches!(parse_range(value, shorter), RangeOutcome::Partial { .. }),
                        "unsatisfiable at {len} but partial at {shorter}"
                    );
                }
            }
            RangeOutcome::Full => {}
        }
    }
}

/// `artifact_header`: `decode_header` never panics, accepts only the canonical encoding of
/// what it returns, and round-trips `encode_header`. Because the header carries a checksum a
/// fuzzer cannot forge, the first 56 input bytes are also re-sealed with a correct checksum and
/// decoded, which reaches the version, length, flag and body-length checks; and one byte of a
/// valid header, chosen by the input, is flipped, which must be rejected.
pub fn check_artifact_header(data: &[u8]) {
    use crate::store::format::{decode_header, encode_header, HEADER_BYTES};
    use sha2::{Digest, Sha256};

    let canonical = |bytes: &[u8]| {
        if let Ok(h) = decode_header(bytes) {
            assert_eq!(
                crate::store::format::encode_fixed_part(&h)[..],
                bytes[..HEADER_BYTES],
                "accepted a non-canonical header"
            );
            if h.header_len == HEADER_BYTES as u64 {
                assert_eq!(
                    encode_header(h.body_len, &h.sha256)[..],
                    bytes[..HEADER_BYTES],
                    "accepted a non-canonical version-1 header"
                );
            }
        }
    };
    canonical(data);

    let mut sealed = [0u8; HEADER_BYTES];
    let n = data.len().min(56);
    sealed[..n].copy_from_slice(&data[..n]);
    let sum = Sha256::digest(&sealed[..56]);
    sealed[56..].copy_from_slice(&sum[..8]);
    canonical(&sealed);

    let mut fields = [0u8; 40];
    let n = data.len().min(40);
    fields[..n].copy_from_slice(&data[..n]);
    let mut len_bytes = [0u8; 8];
    len_bytes.copy_from_slice(&fields[..8]);
    let body_len = u64::from_le_bytes(len_bytes);
    let mut sha256 = [0u8; 32];
    sha256.copy_from_slice(&fields[8..]);
    let encoded = encode_header(body_len, &sha256);
    match decode_header(&encoded) {
        // The only value the encoder can write that the decoder must refuse.
        Err(e) if body_len.checked_add(HEADER_BYTES as u64).is_none() => {
            assert!(matches!(
                e,
                crate::store::format::FormatError::BodyTooLong { .. }
            ))
        }
        Ok(h) => assert_eq!((h.body_len, h.sha256), (body_len, sha256), "round trip"),
        Err(e) => panic!("encoded header rejected: {e}"),
    }
    let flip_at = usize::from(data.get(40).copied().unwrap_or(0)) % HEADER_BYTES;
    let flip_bits = data.get(41).copied().unwrap_or(1).max(1);
    let mut damaged = encoded;
    damaged[flip_at] ^= flip_bits;
    assert!(
        decode_header(&damaged).is_err(),
        "damaged header at byte {flip_at} accepted"
    );
    // Any shorter prefix is truncated.
    assert!(decode_header(&encoded[..usize::from(flip_bits) % HEADER_BYTES]).is_err());
}

/// `artifact_meta`: the metadata decoders never panic and accept only canonical encodings
/// (a section, bare entries and an `x-sluice-meta` value re-encode to what was read); a
/// `Meta` built from the input's `name:value` lines through `push` (which refuses what
/// breaks a rule) round-trips through a whole version-2 header, whose length is what
/// `header_len_for` promised; and one flipped byte of the section is always refused.
pub fn check_artifact_meta(data: &[u8]) {
    use crate::store::format::{
        decode_header, decode_meta_section, encode_header_with, header_len_for, Meta, HEADER_BYTES,
    };

    if let Ok(meta) = decode_meta_section(data) {
        let encoded = encode_header_with(0, &[0; 32], &meta);
        assert_eq!(
            &encoded[HEADER_BYTES..],
            data,
            "accepted a non-canonical section"
        );
    }
    if let Ok(meta) = Meta::decode_entries(data) {
        assert_eq!(
            meta.encode_entries(),
            data,
            "accepted non-canonical entries"
        );
    }
    if let Ok(meta) = Meta::from_header_value(data) {
        let again = Meta::from_header_value(meta.to_header_value().as_bytes());
        assert_eq!(again.as_ref(), Ok(&meta), "header value round trip");
    }

    let mut meta = Meta::default();
    for line in data.split(|&b| b == b'\n') {
        let (name, value) = match line.iter().position(|&b| b == b':') {
            Some(at) => (&line[..at], &line[at + 1..]),
            None => (line, &[][..]),
        };
        let before = meta.clone();
        if meta.push(&String::from_utf8_lossy(name), value).is_err() {
            assert_eq!(meta, before, "a refused entry changed the metadata");
        }
    }
    let body_len = data.len() as u64;
    let header = encode_header_with(body_len, &[7; 32], &meta);
    assert_eq!(header.len() as u64, header_len_for(&meta));
    let h = decode_header(&header).expect("an encoded header decodes");
    assert_eq!((h.body_len, h.header_len), (body_len, header.len() as u64));
    if meta.is_empty() {
        return;
    }
    let section = &header[HEADER_BYTES..];
    assert_eq!(
        decode_meta_section(section).as_ref(),
        Ok(&meta),
        "section round trip"
    );
    let mut damaged = section.to_vec();
    let at = usize::from(data.first().copied().unwrap_or(0)) % damaged.len();
    damaged[at] ^= data.get(1).copied().unwrap_or(1).max(1);
    assert!(
        decode_meta_section(&damaged).is_err(),
        "damaged section at {at} accepted"
    );
}

/// `turbo_bodies`: the JSON bodies of Turborepo's `POST /v8/artifacts` and `POST
/// /v8/artifacts/events` never panic their parsers; an accepted query names at most
/// `QUERY_HASHES_MAX` valid hashes, accepted events are all counted once; the input read as
/// a query string names a valid, unreserved namespace or is refused.
pub fn check_turbo_bodies(data: &[u8]) {
    use crate::app::turbo::{parse_events, parse_query, team_namespace, QUERY_HASHES_MAX};

    if let Ok(hashes) = parse_query(data) {
        assert!(hashes.len() <= QUERY_HASHES_MAX);
        assert!(hashes.iter().all(|h| crate::route::is_turbo_hash(h)));
    }
    if let Ok(tally) = parse_events(data) {
        // Counted as the parser reads them: a number JSON allows but an f64
        // cannot hold (`1E400`) in an ignored field is fine (found by fuzzing).
        let events: Vec<serde::de::IgnoredAny> =
            serde_json::from_slice(data).expect("accepted events are a JSON array");
        assert_eq!(
            tally.iter().sum::<u64>(),
            events.len() as u64,
            "every event counted once"
        );
    }
    let query = String::from_utf8_lossy(data);
    if let Ok(ns) = team_namespace(Some(&query)) {
        assert!(crate::route::valid_namespace(ns), "{ns}");
        assert!(!crate::route::RESERVED_NAMESPACES.contains(&ns), "{ns}");
    }
}

/// `config`: the TOML loader and validation never panic on any file text; an error's message
/// is non-empty and bounded; an accepted configuration without inline secrets renders with
/// `to_toml` into text that loads back into an equal configuration.
pub fn check_config(data: &[u8]) {
    use crate::config::{load_text, Overrides};

    let text = String::from_utf8_lossy(data);
    let path = std::path::Path::new("fuzz.toml");
    let overrides = Overrides::default();
    match load_text(Some((path, &text)), &config_env(), &overrides) {
        Err(e) => {
            let message = e.to_string();
            assert!(!message.is_empty(), "empty config error");
            // Values are quoted back truncated, so a huge input cannot make a huge log line.
            assert!(
                message.len() <= 4096 + 2 * data.len().min(1024),
                "config error of {} bytes",
                message.len()
            );
        }
        Ok(config) => {
            if config.tokens.iter().any(|t| t.secret_env.is_none()) {
                return;
            }
            let rendered = config.to_toml();
            match load_text(Some((path, &rendered)), &config_env(), &overrides) {
                Ok(again) => assert_eq!(config, again, "to_toml round trip:\n{rendered}"),
                Err(e) => panic!("to_toml output does not load: {e}\n{rendered}"),
            }
        }
    }
}

/// The environment the config target loads with: one variable a `secret_env` can name, so
/// tokens from the environment are reachable.
fn config_env() -> Vec<(String, String)> {
    vec![("FUZZ_TOKEN".to_owned(), "fuzz-token-0123456789".to_owned())]
}

/// One request as hyper's service saw it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HyperMessage {
    pub method: String,
    pub path: String,
    pub query: Option<String>,
    /// The body, or hyper's error while reading it.
    pub body: Result<Vec<u8>, String>,
}

/// One request as sluice's reader saw it, in the same terms.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SluiceMessage {
    pub method: String,
    pub path: String,
    pub query: Option<String>,
    pub body: Vec<u8>,
}

thread_local! {
    static RUNTIME: tokio::runtime::Runtime = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .build()
        .unwrap_or_else(|e| panic!("fuzz oracle cannot build a tokio runtime: {e}"));
}

/// How long hyper may take for one input before the run counts as a hang. Inputs are a few
/// KiB over an in-memory pipe; anything near this is a bug, not slowness.
const HYPER_TIMEOUT_MS: u64 = 10_000;

/// Runs `stream` through a hyper 1.x HTTP/1 server over an in-memory duplex: the client side
/// writes everything, half-closes, and reads whatever comes back. The service reads every
/// body and answers 404, so no request is upgraded (CONNECT and `Upgrade` stay ordinary
/// requests, as they are for sluice's routes). Returns the requests the service saw and how
/// the connection ended.
pub fn run_hyper(stream: &[u8]) -> (Vec<HyperMessage>, Result<(), String>) {
    use http_body_util::{BodyExt, Empty};
    use hyper::body::Incoming;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    let log: Rc<RefCell<Vec<HyperMessage>>> = Rc::new(RefCell::new(Vec::new()));
    let service_log = Rc::clone(&log);
    let service = hyper::service::service_fn(move |req: hyper::Request<Incoming>| {
        let log = Rc::clone(&service_log);
        async move {
            let (parts, body) = req.into_parts();
            let body = match body.collect().await {
                Ok(collected) => Ok(collected.to_bytes().to_vec()),
                Err(e) => Err(e.to_string()),
            };
            log.borrow_mut().push(HyperMessage {
                method: parts.method.as_str().to_owned(),
                path: parts.uri.path().to_owned(),
                query: parts.uri.query().map(str::to_owned),
                body,
            });
            let mut response = hyper::Response::new(Empty::<bytes::Bytes>::new());
            *response.status_mut() = hyper::StatusCode::NOT_FOUND;
            Ok::<_, core::convert::Infallible>(response)
        }
    });
    let result = RUNTIME.with(|rt| {
        rt.block_on(async {
            let (client, server) = tokio::io::duplex(64 * 1024);
            let conn = hyper::server::conn::http1::Builder::new()
                .half_close(true)
                .serve_connection(hyper_util::rt::TokioIo::new(server), service);
            let (mut rd, mut wr) = tokio::io::split(client);
            let client_side = async move {
                // Either may fail once hyper has closed its end; that is an answer, not an
                // error of the harness.
                let _ = wr.write_all(stream).await;
                let _ = wr.shutdown().await;
                let mut sink = Vec::new();
                let _ = rd.read_to_end(&mut sink).await;
            };
            let both = async { tokio::join!(conn, client_side).0 };
            tokio::time::timeout(std::time::Duration::from_millis(HYPER_TIMEOUT_MS), both).await
        })
    });
    let conn = match result {
        Ok(conn) => conn.map_err(|e| e.to_string()),
        Err(_) => panic!("hyper did not finish within {HYPER_TIMEOUT_MS} ms"),
    };
    let messages = log.borrow().clone();
    (messages, conn)
}

/// How sluice's reader ended a stream, for the differential.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SluiceEnd {
    /// `Connection: close` semantics or the input ended between messages.
    Clean,
    /// The input ended inside a message.
    Incomplete,
    Error(ReaderError),
}

/// Runs `stream` through sluice's reader as the differential sees it: no body limit (hyper
/// has none), complete messages only.
pub fn run_sluice(stream: &[u8]) -> (Vec<SluiceMessage>, SluiceEnd) {
    let mut messages = Vec::new();
    let mut current: Option<SluiceMessage> = None;
    for seen in drive_reader(stream, Feed::Whole, u64::MAX) {
        match seen {
            Seen::Head(view) => {
                current = Some(SluiceMessage {
                    method: view.method,
                    path: view.path,
                    query: view.query,
                    body: Vec::new(),
                })
            }
            Seen::Body(bytes) => {
                if let Some(m) = current.as_mut() {
                    m.body.extend_from_slice(&bytes)
                }
            }
            Seen::MessageEnd { .. } => messages.extend(current.take()),
            Seen::Closed => return (messages, SluiceEnd::Clean),
            Seen::Error(e) => return (messages, SluiceEnd::Error(e)),
            Seen::Eof { buffered_bytes } => {
                // Empty lines before a request line are not a request (RFC 9112 2.2).
                let idle = current.is_none()
                    && stream[stream.len() - buffered_bytes..]
                        .iter()
                        .all(|&b| b == b'\r' || b == b'\n');
                let end = if idle {
                    SluiceEnd::Clean
                } else {
                    SluiceEnd::Incomplete
                };
                return (messages, end);
            }
        }
    }
    (messages, SluiceEnd::Incomplete)
}

/// Classes of input sluice rejects on purpose where hyper accepts, each with its entry in
/// `docs/security.md`. The differential accepts "sluice rejects, hyper serves" only when
/// sluice's error is one of these; any other disagreement fails the check.
pub fn sluice_stricter_class(e: &ReaderError) -> Option<&'static str> {
    Some(match e {
        ReaderError::Head(h) => match h {
            HeadError::BareLf => "bare LF line endings",
            HeadError::ContentLengthWithTransferEncoding => "Content-Length with Transfer-Encoding",
            HeadError::ContentLengthRepeated => "repeated Content-Length",
            HeadError::TransferEncodingInvalid => "Transfer-Encoding lists and repeats",
            HeadError::HostMissing | HeadError::HostRepeated => "missing or repeated Host",
            HeadError::ExpectationFailed => "unknown Expect",
            HeadError::InvalidTarget => "request-target forms",
            _ => return None,
        },
        ReaderError::Body(BodyError::Malformed(reason)) => match *reason {
            "bare LF in trailer" => "bare LF line endings",
            "whitespace after chunk size" => "whitespace after a chunk size",
            "chunk size over 16 hex digits" => "chunk sizes over 16 hex digits",
            "control byte in chunk extension" => "control bytes in chunk extensions",
            _ => return None,
        },
        _ => return None,
    })
}

/// `http1_vs_hyper`: sluice's reader and hyper agree on the sequence of (method, path, query,
/// body) of every complete request, or sluice rejects where it is documented to be stricter.
/// Agreement on every body and on the next request also pins down where each message ends:
/// a framing difference shifts every later byte.
pub fn check_http1_vs_hyper(data: &[u8]) {
    let (sluice, end) = run_sluice(data);
    let (hyper, conn) = run_hyper(data);
    let served: Vec<SluiceMessage> = hyper
        .iter()
        .filter_map(|m| {
            Some(SluiceMessage {
                method: m.method.clone(),
                path: m.path.clone(),
                query: m.query.clone(),
                body: m.body.clone().ok()?,
            })
        })
        .collect();
    let report = || {
        format!(
            "input {:?}\nsluice: {sluice:?} then {end:?}\nhyper: {hyper:?} then {conn:?}",
            String::from_utf8_lossy(data)
        )
    };
    // Requests both completed must be identical, in order.
    let common = sluice.len().min(served.len());
    assert_eq!(sluice[..common], served[..common], "{}", report());
    // A message hyper started but could not finish is a rejection; only the last one can be.
    if let Some(pos) = hyper.iter().position(|m| m.body.is_err()) {
        assert_eq!(pos + 1, hyper.len(), "{}", report());
    }
    match sluice.len().cmp(&served.len()) {
        core::cmp::Ordering::Equal => {}
        core::cmp::Ordering::Less => {
            let allowed = matches!(&end, SluiceEnd::Error(e) if sluice_stricter_class(e).is_some());
            assert!(allowed, "hyper served more requests: {}", report());
        }
        core::cmp::Ordering::Greater => panic!("sluice served more requests: {}", report()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::http1::samples::{sample_requests, PIPELINE};

    #[test]
    fn every_target_has_a_unique_name() {
        let mut names: Vec<&str> = TARGETS.iter().map(|t| t.name).collect();
        names.sort_unstable();
        names.dedup();
        assert_eq!(names.len(), TARGETS.len());
        assert!(target("http1_request").is_some());
        assert!(target("nope").is_none());
    }

    /// Reproducer from `fuzz/regressions/http1_vs_hyper/trailer-bare-lf-end`: hyper ends the
    /// trailer section at a bare LF, sluice rejects it as a documented stricter class.
    #[test]
    fn bare_lf_ending_trailers_is_a_documented_class() {
        let input = b"POST /k HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\nGET /x HTTP/1.1\r\nHost: a\r\n\r\n";
        let (messages, end) = run_sluice(input);
        assert!(messages.is_empty());
        let SluiceEnd::Error(e) = end else {
            panic!("sluice accepted: {end:?}")
        };
        assert_eq!(sluice_stricter_class(&e), Some("bare LF line endings"));
        check_http1_vs_hyper(input);
    }

    #[test]
    fn split_control_format() {
        assert_eq!(split_control(b""), (vec![], &b""[..]));
        assert_eq!(split_control(b"\x00GET"), (vec![], &b"GET"[..]));
        assert_eq!(split_control(b"\x02\x00\x04GET"), (vec![1, 5], &b"GET"[..]));
        // More pieces announced than bytes present: takes what is there.
        assert_eq!(split_control(b"\x0f\x01"), (vec![2], &b""[..]));
    }

    #[test]
    fn round_trip_encoder_styles() {
        for style in 0..16 {
            let encoded = encode_chunked(b"hello world", &[3, 1], style);
            let (payload, end) = decode_chunked(&encoded, Feed::Whole, 11);
            assert_eq!(payload, b"hello world", "style {style}");
            assert_eq!(
                end,
                BodyEnd::Done {
                    consumed_bytes: encoded.len()
                }
            );
        }
        assert_eq!(encode_chunked(b"", &[], 0), b"0\r\n\r\n");
        assert_eq!(encode_chunked(b"abc", &[], 1), b"3\r\nabc\r\n0\r\n\r\n");
    }

    /// The targets of [`PIPELINE`]'s requests, in order.
    const PIPELINE_PATHS: [&str; 5] = ["/up", "/cache/one", "/cache/two", "/cas/1", "/last"];

    #[test]
    fn pipeline_messages_from_sluice() {
        let (messages, end) = run_sluice(PIPELINE);
        let paths: Vec<&str> = messages.iter().map(|m| m.path.as_str()).collect();
        assert_eq!(paths, PIPELINE_PATHS);
        assert_eq!(messages[2].body, b"abcdefg");
        assert_eq!(end, SluiceEnd::Clean);
    }

    #[test]
    fn hyper_sees_the_pipeline() {
        let (messages, conn) = run_hyper(PIPELINE);
        let paths: Vec<&str> = messages.iter().map(|m| m.path.as_str()).collect();
        assert_eq!(paths, PIPELINE_PATHS);
        assert_eq!(messages[2].body, Ok(b"abcdefg".to_vec()));
        assert!(conn.is_ok(), "{conn:?}");
    }

    #[test]
    fn every_sample_passes_every_check() {
        for (_, bytes) in sample_requests() {
            check_http1_request(bytes);
            check_http1_vs_hyper(bytes);
            let mut prefixed = vec![2u8, 2, 9];
            prefixed.extend_from_slice(bytes);
            check_http1_stream(&prefixed);
            check_chunked(&prefixed);
            check_range_header(bytes);
        }
    }
}
