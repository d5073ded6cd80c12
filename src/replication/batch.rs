//! Many small replicated writes in one peer request: `POST /_peer/v1/batch`.
//!
//! One `PUT /_peer/v1/put/...` per write cost the receiver one durable
//! commit each (its receiving threads took them one at a time), which held
//! replication near 660 small writes a second per peer while a node takes
//! several thousand. A batch carries up to [`ENTRIES_MAX`] small writes; the
//! receiver checks each as a single PUT would and commits them together
//! (`Store::commit_batch`: one journal sync for all).
//!
//! The body is the entries one after the other, each a line and then its
//! bytes:
//!
//! ```text
//! {ns} {key} {write_time_ms} {sha256 hex} {len} {x-sluice-meta value or -}\n
//! {len bytes of the artifact}
//! ```
//!
//! Names never hold spaces or newlines (`store::valid_key`), and the meta
//! value is base64, so a line splits on single spaces. The answer is 200
//! when every entry was stored, kept (the peer holds the same or newer) or
//! refused for good (bad name, digest mismatch); 507 when any found the
//! disk full and 503 when any failed otherwise: the sender keeps the whole
//! batch and sends it again (last-writer-wins makes the entries already
//! stored a no-op). Its body says, one line per entry, what happened.

/// Entries in one batch at most.
pub const ENTRIES_MAX: usize = 64;
/// An artifact larger than this travels on its own (spliced from its file;
/// a batch is built in memory).
pub const ENTRY_BYTES_MAX: u64 = 64 * 1024;
/// The sender stops adding entries at this many artifact bytes.
pub const BODY_BYTES_TARGET: u64 = 512 * 1024;
/// Artifact bytes of the batches in flight (or waiting for a retry) to one
/// peer at most: each batch holds its body in the sender's memory (a single
/// write is spliced from its file). Past it, the next small write waits for
/// an answer. Bytes, not batches: while writes trickle in, batches are small
/// and many may be in flight (as many as the peer's window).
pub const IN_FLIGHT_BYTES_MAX: u64 = 2 * 1024 * 1024;

// A batch the sender builds always fits what a receiver takes, and the
// in-flight bound leaves room for at least one batch.
const _: () = assert!(ENTRY_BYTES_MAX <= BODY_BYTES_TARGET);
const _: () = assert!(BODY_BYTES_TARGET < IN_FLIGHT_BYTES_MAX);
const _: () = assert!(BODY_BYTES_MAX >= BODY_BYTES_TARGET + ENTRY_BYTES_MAX);
const _: () = {
    use crate::store::{KEY_BYTES_MAX, KEY_SEGMENTS_MAX, NAMESPACE_BYTES_MAX};
    let key = KEY_SEGMENTS_MAX * (KEY_BYTES_MAX + 1);
    let meta = crate::store::format::META_BYTES_MAX.div_ceil(3) * 4;
    // Three u64s (20 digits each), 64 hex digits, five spaces, a newline.
    assert!(NAMESPACE_BYTES_MAX + key + meta + 3 * 20 + 64 + 6 <= LINE_BYTES_MAX);
};
/// Longest entry line: the longest namespace and key, a meta value of at
/// most 4 KiB as base64, three numbers and the separators fit (checked
/// below).
pub const LINE_BYTES_MAX: usize = 16 * 1024;
/// The largest batch body a receiver takes (413 past it): every entry at
/// its largest with its longest line.
pub const BODY_BYTES_MAX: u64 = ENTRIES_MAX as u64 * (ENTRY_BYTES_MAX + LINE_BYTES_MAX as u64);

/// Whether the outbox entry `record` may go in a batch: a write of a small
/// artifact (deletes and large artifacts go one per request).
pub fn fits(record: &crate::delivery::outbox::Record) -> bool {
    record.op == crate::delivery::outbox::Op::Put && record.len <= ENTRY_BYTES_MAX
}

/// One entry of a batch, borrowed from the body.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry<'a> {
    pub ns: &'a str,
    pub key: &'a str,
    pub write_time_ms: u64,
    pub sha256: [u8; 32],
    /// The `x-sluice-meta` value, if the artifact keeps response headers.
    pub meta: Option<&'a str>,
    pub body: &'a [u8],
}

/// Appends one entry to `out`.
pub fn encode_entry(
    out: &mut Vec<u8>,
    ns: &str,
    key: &str,
    write_time_ms: u64,
    sha256: &[u8; 32],
    meta: Option<&str>,
    body: &[u8],
) {
    let line = format!(
        "{ns} {key} {write_time_ms} {} {} {}\n",
        hex::encode(sha256),
        body.len(),
        meta.unwrap_or("-")
    );
    out.extend_from_slice(line.as_bytes());
    out.extend_from_slice(body);
}

/// Reads a whole batch body; the error says what is wrong (a 400). Names
/// are not checked here (the receiver checks each entry as a PUT would).
pub fn decode(mut body: &[u8]) -> Result<Vec<Entry<'_>>, String> {
    let mut entries = Vec::new();
    while !body.is_empty() {
        if entries.len() == ENTRIES_MAX {
            return Err(format!("more than {ENTRIES_MAX} entries"));
        }
        let at = entries.len();
        let search = &body[..body.len().min(LINE_BYTES_MAX + 1)];
        let Some(nl) = search.iter().position(|&b| b == b'\n') else {
            return Err(format!(
                "entry {at}: no line end within {LINE_BYTES_MAX} bytes"
            ));
        };
        let line = std::str::from_utf8(&body[..nl])
            .map_err(|_| format!("entry {at}: the line is not UTF-8"))?;
        let fields: Vec<&str> = line.split(' ').collect();
        let [ns, key, time, sha, len, meta] = fields[..] else {
            return Err(format!(
                "entry {at}: want 6 fields (ns key write_time_ms sha256 len meta), got {}",
                fields.len()
            ));
        };
        let write_time_ms = time
            .parse::<u64>()
            .map_err(|_| format!("entry {at}: write time {time:?} is not a number"))?;
        let mut sha256 = [0u8; 32];
        hex::decode_to_slice(sha, &mut sha256)
            .map_err(|_| format!("entry {at}: sha256 must be 64 hex digits"))?;
        let len = len
            .parse::<u64>()
            .ok()
            .filter(|&n| n <= ENTRY_BYTES_MAX)
            .ok_or_else(|| format!("entry {at}: length {len:?} is not 0..={ENTRY_BYTES_MAX}"))?;
        let rest = &body[nl + 1..];
        let len = len as usize;
        if rest.len() < len {
            return Err(format!(
                "entry {at}: the body ends {} bytes into a {len}-byte artifact",
                rest.len()
            ));
        }
        entries.push(Entry {
            ns,
            key,
            write_time_ms,
            sha256,
            meta: (meta != "-").then_some(meta),
            body: &rest[..len],
        });
        body = &rest[len..];
    }
    Ok(entries)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entries_round_trip() {
        let mut body = Vec::new();
        encode_entry(&mut body, "ns", "a/b", 7, &[1; 32], None, b"hello");
        encode_entry(&mut body, "cas", "k", 8, &[2; 32], Some("bWV0YQ=="), b"");
        encode_entry(&mut body, "ns", "c", 9, &[3; 32], None, b"x y\nz");
        let got = decode(&body).unwrap();
        assert_eq!(got.len(), 3);
        assert_eq!(
            got[0],
            Entry {
                ns: "ns",
                key: "a/b",
                write_time_ms: 7,
                sha256: [1; 32],
                meta: None,
                body: b"hello",
            }
        );
        assert_eq!((got[1].meta, got[1].body), (Some("bWV0YQ=="), &b""[..]));
        assert_eq!(got[2].body, b"x y\nz");
        assert_eq!(decode(b"").unwrap(), Vec::new());
    }

    #[test]
    fn bad_bodies_say_what_is_wrong() {
        let sha = "00".repeat(32);
        for (body, want) in [
            (
                format!("ns k 1 {sha} 5 -\nabc"),
                "ends 3 bytes into a 5-byte",
            ),
            (format!("ns k 1 {sha} 5\nabcde"), "want 6 fields"),
            (format!("ns k x {sha} 1 -\na"), "write time"),
            ("ns k 1 zz 1 -\na".to_string(), "sha256"),
            (format!("ns k 1 {sha} 99999999 -\n"), "length"),
            (format!("ns k 1 {sha} -1 -\n"), "length"),
            ("ns k 1".to_string(), "no line end"),
        ] {
            let err = decode(body.as_bytes()).unwrap_err();
            assert!(err.contains(want), "{body:?}: {err}");
        }
        let mut many = Vec::new();
        for i in 0..=ENTRIES_MAX {
            encode_entry(&mut many, "ns", &format!("k{i}"), 1, &[0; 32], None, b"");
        }
        assert!(decode(&many).unwrap_err().contains("more than"));
        assert!(decode(&[b'a'; LINE_BYTES_MAX + 10]).is_err());
        // The longest names and meta a store allows make a line that fits.
        let key = vec!["k".repeat(255); 16].join("/");
        let meta = "A".repeat(4096 / 3 * 4 + 4);
        let mut long = Vec::new();
        encode_entry(
            &mut long,
            &"n".repeat(64),
            &key,
            u64::MAX,
            &[9; 32],
            Some(&meta),
            b"x",
        );
        let got = decode(&long).unwrap();
        assert_eq!((got[0].key, got[0].body), (key.as_str(), &b"x"[..]));
        assert!(decode(b"\xff \xfe\n").is_err());
    }
}
