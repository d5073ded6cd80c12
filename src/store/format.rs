//! On-disk format of one artifact file: a fixed 64-byte header, an optional
//! metadata section, then the body.
//!
//! ```text
//! offset  size  field
//!      0     8  magic             b"SLUICEA\0"
//!      8     2  format version    u16 little-endian: 1, or 2 with a metadata section
//!     10     2  header length     u16 little-endian: where the body starts (64 for version 1)
//!     12     4  flags             u32, reserved, must be 0
//!     16     8  body length       u64 little-endian, bytes after the header
//!     24    32  body sha256       raw digest of the body
//!     56     8  header checksum   first 8 bytes of sha256(bytes 0..56)
//!     64     n  metadata section  version 2 only: entries, then their 8-byte checksum
//! ```
//!
//! The header makes every file self-describing: a GET knows the length and the
//! strong ETag without reading the body or consulting another store, and a
//! torn or foreign file is recognised by the checksum and the file size. The
//! body digest is not re-verified on every read (that would cost a full read
//! per GET); the size check catches truncation, the usual damage.
//!
//! **Version 2** adds the response headers a client asked the server to keep
//! with the artifact (Turborepo's `x-artifact-duration`, `x-artifact-tag`, …;
//! see [`Meta`]). It is written only for an artifact that has some, so every
//! other file is byte for byte what version 1 wrote, and a version-1 file
//! reads as before. The fixed part keeps its layout and its checksum (which
//! covers the header length), so code that needs only length and digest
//! (the anti-entropy walk, last-writer-wins) reads the first 64 bytes of
//! either version; the section carries its own checksum. A build from before
//! version 2 reads a version-2 file as damaged (unsupported version).
//!
//! Metadata section: `count` entries of `name length (u8) | name | value
//! length (u16 LE) | value`, then the first 8 bytes of sha256 of the entries.
//! Names are `[a-z0-9-]{1,64}`, values printable ASCII (and tab) of at most
//! [`META_VALUE_BYTES_MAX`] bytes, at most [`META_ENTRIES_MAX`] entries and
//! [`META_BYTES_MAX`] bytes in all.

use sha2::{Digest, Sha256};
use std::fmt;

/// Size of the fixed header in bytes; the body starts at this offset.
pub const HEADER_BYTES: usize = 64;
/// First eight bytes of every artifact file.
pub const MAGIC: [u8; 8] = *b"SLUICEA\0";
/// The format version of a file without metadata (64-byte header).
pub const FORMAT_VERSION: u16 = 1;
/// The format version of a file with a metadata section.
pub const FORMAT_VERSION_META: u16 = 2;
/// Most bytes of a metadata section, entries and checksum included.
pub const META_BYTES_MAX: usize = 4096;
/// Most entries in a metadata section.
pub const META_ENTRIES_MAX: usize = 16;
/// Longest metadata name, bytes.
pub const META_NAME_BYTES_MAX: usize = 64;
/// Longest metadata value, bytes (Turborepo's `x-artifact-tag` is at most 600).
pub const META_VALUE_BYTES_MAX: usize = 1024;
const META_CHECKSUM_BYTES: usize = 8;
/// Longest header of either version, bytes.
pub const HEADER_BYTES_MAX: usize = HEADER_BYTES + META_BYTES_MAX;
const _: () = assert!(HEADER_BYTES_MAX <= u16::MAX as usize);
const _: () = assert!(
    META_ENTRIES_MAX * (3 + META_NAME_BYTES_MAX + META_VALUE_BYTES_MAX) + META_CHECKSUM_BYTES
        > META_BYTES_MAX,
    "the section bound is the binding one"
);

const CHECKSUM_OFFSET: usize = 56;

/// The header that carries an artifact's [`Meta`] between nodes (peer API
/// PUTs, read-through answers) and to the object-store tier (as metadata
/// `sluice-meta`): [`Meta::to_header_value`].
pub const META_HEADER: &str = "x-sluice-meta";

/// A decoded, validated header (its fixed part).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Header {
    /// Length of the body in bytes (the file is `header_len + body_len` long).
    pub body_len: u64,
    /// sha256 of the body.
    pub sha256: [u8; 32],
    /// Where the body starts: [`HEADER_BYTES`], plus the metadata section's
    /// length in a version-2 file.
    pub header_len: u64,
}

impl Header {
    /// Bytes of the metadata section that follows the fixed part (0 for version 1).
    pub fn meta_len(&self) -> usize {
        // header_len is at most HEADER_BYTES_MAX, checked by decode_header.
        (self.header_len as usize).saturating_sub(HEADER_BYTES)
    }
}

/// Why a header was rejected.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FormatError {
    /// Fewer than [`HEADER_BYTES`] bytes were given.
    Truncated { len: usize },
    /// The magic bytes do not match: not a sluice artifact.
    BadMagic,
    /// Written by a format version this build does not read.
    UnsupportedVersion { version: u16 },
    /// The header length field disagrees with the version's fixed size.
    BadHeaderLength { header_len: u16 },
    /// Reserved flag bits are set.
    ReservedFlags { flags: u32 },
    /// `HEADER_BYTES + body_len` does not fit in a u64.
    BodyTooLong { body_len: u64 },
    /// The header checksum does not match: the header is damaged.
    BadChecksum,
    /// The metadata section (or a metadata value given to encode) breaks a rule.
    BadMeta(&'static str),
}

impl fmt::Display for FormatError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Truncated { len } => {
                write!(f, "header truncated: {len} of {HEADER_BYTES} bytes")
            }
            Self::BadMagic => write!(f, "bad magic: not a sluice artifact file"),
            Self::UnsupportedVersion { version } => {
                write!(
                    f,
                    "unsupported format version {version} (this build reads {FORMAT_VERSION} and {FORMAT_VERSION_META})"
                )
            }
            Self::BadHeaderLength { header_len } => {
                write!(f, "header length {header_len} does not fit the version")
            }
            Self::ReservedFlags { flags } => write!(f, "reserved flags set: {flags:#x}"),
            Self::BodyTooLong { body_len } => write!(f, "body length {body_len} overflows"),
            Self::BadChecksum => write!(f, "header checksum mismatch"),
            Self::BadMeta(why) => write!(f, "bad metadata: {why}"),
        }
    }
}

impl std::error::Error for FormatError {}

fn checksum(prefix: &[u8]) -> [u8; 8] {
    let digest = Sha256::digest(prefix);
    let mut out = [0u8; 8];
    out.copy_from_slice(&digest[..8]);
    out
}

/// Encodes the header for a body of `body_len` bytes with digest `sha256`.
pub fn encode_header(body_len: u64, sha256: &[u8; 32]) -> [u8; HEADER_BYTES] {
    encode_fixed(FORMAT_VERSION, HEADER_BYTES as u16, body_len, sha256)
}

fn encode_fixed(
    version: u16,
    header_len: u16,
    body_len: u64,
    sha256: &[u8; 32],
) -> [u8; HEADER_BYTES] {
    let mut out = [0u8; HEADER_BYTES];
    out[0..8].copy_from_slice(&MAGIC);
    out[8..10].copy_from_slice(&version.to_le_bytes());
    out[10..12].copy_from_slice(&header_len.to_le_bytes());
    // 12..16: flags, zero.
    out[16..24].copy_from_slice(&body_len.to_le_bytes());
    out[24..56].copy_from_slice(sha256);
    let sum = checksum(&out[..CHECKSUM_OFFSET]);
    out[CHECKSUM_OFFSET..].copy_from_slice(&sum);
    out
}

/// The fixed 64 bytes that `h` was decoded from (either version).
pub fn encode_fixed_part(h: &Header) -> [u8; HEADER_BYTES] {
    let version = match h.header_len {
        len if len == HEADER_BYTES as u64 => FORMAT_VERSION,
        _ => FORMAT_VERSION_META,
    };
    // decode_header bounds header_len by HEADER_BYTES_MAX, which fits a u16.
    encode_fixed(version, h.header_len as u16, h.body_len, &h.sha256)
}

/// The whole header for a body with `meta`: version 1 when `meta` is empty,
/// else version 2 with its section. Its length is [`header_len_for`].
pub fn encode_header_with(body_len: u64, sha256: &[u8; 32], meta: &Meta) -> Vec<u8> {
    if meta.is_empty() {
        return encode_header(body_len, sha256).to_vec();
    }
    let section = meta.section();
    // Meta's constructors keep the section within META_BYTES_MAX.
    let header_len = (HEADER_BYTES + section.len()) as u16;
    let mut out = encode_fixed(FORMAT_VERSION_META, header_len, body_len, sha256).to_vec();
    out.extend_from_slice(&section);
    out
}

/// Where the body starts in a file holding `meta`.
pub fn header_len_for(meta: &Meta) -> u64 {
    if meta.is_empty() {
        HEADER_BYTES as u64
    } else {
        (HEADER_BYTES + meta.section_len()) as u64
    }
}

/// Decodes and validates a header's fixed part from the start of `bytes`
/// (extra bytes are ignored; a version-2 section is read with
/// [`decode_meta_section`]). Never panics, whatever the input.
pub fn decode_header(bytes: &[u8]) -> Result<Header, FormatError> {
    let Some(h) = bytes.get(..HEADER_BYTES) else {
        return Err(FormatError::Truncated { len: bytes.len() });
    };
    if h[0..8] != MAGIC {
        return Err(FormatError::BadMagic);
    }
    // Checksum before the other fields: a damaged header is reported as
    // damaged rather than as a confusing "unsupported version".
    if h[CHECKSUM_OFFSET..] != checksum(&h[..CHECKSUM_OFFSET]) {
        return Err(FormatError::BadChecksum);
    }
    let version = u16::from_le_bytes([h[8], h[9]]);
    let header_len = u16::from_le_bytes([h[10], h[11]]);
    let len_ok = match version {
        FORMAT_VERSION => usize::from(header_len) == HEADER_BYTES,
        FORMAT_VERSION_META => {
            let section = usize::from(header_len).saturating_sub(HEADER_BYTES);
            section > META_CHECKSUM_BYTES && section <= META_BYTES_MAX
        }
        _ => return Err(FormatError::UnsupportedVersion { version }),
    };
    if !len_ok {
        return Err(FormatError::BadHeaderLength { header_len });
    }
    let flags = u32::from_le_bytes([h[12], h[13], h[14], h[15]]);
    if flags != 0 {
        return Err(FormatError::ReservedFlags { flags });
    }
    let mut len_bytes = [0u8; 8];
    len_bytes.copy_from_slice(&h[16..24]);
    let body_len = u64::from_le_bytes(len_bytes);
    if body_len.checked_add(u64::from(header_len)).is_none() {
        return Err(FormatError::BodyTooLong { body_len });
    }
    let mut sha256 = [0u8; 32];
    sha256.copy_from_slice(&h[24..56]);
    Ok(Header {
        body_len,
        sha256,
        header_len: u64::from(header_len),
    })
}

/// Decodes a version-2 metadata section (entries and checksum, exactly
/// [`Header::meta_len`] bytes). Never panics, whatever the input.
pub fn decode_meta_section(section: &[u8]) -> Result<Meta, FormatError> {
    if section.len() <= META_CHECKSUM_BYTES || section.len() > META_BYTES_MAX {
        return Err(FormatError::BadMeta("section length out of bounds"));
    }
    let (entries, sum) = section.split_at(section.len() - META_CHECKSUM_BYTES);
    if sum != checksum(entries) {
        return Err(FormatError::BadChecksum);
    }
    Meta::decode_entries(entries)
}

/// Response headers kept with an artifact and sent back with it (Turborepo's
/// `x-artifact-*`): an ordered list of (name, value), validated on the way
/// in, bounded by [`META_ENTRIES_MAX`] and [`META_BYTES_MAX`].
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Meta {
    entries: Vec<(String, String)>,
    /// Encoded length of the entries (without the checksum), bytes.
    entries_len: usize,
}

impl Meta {
    /// No entries.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// The entries, in the order they were added.
    pub fn iter(&self) -> impl Iterator<Item = (&str, &str)> {
        self.entries.iter().map(|(n, v)| (n.as_str(), v.as_str()))
    }

    /// The value of `name`, if present.
    pub fn get(&self, name: &str) -> Option<&str> {
        self.iter().find(|(n, _)| *n == name).map(|(_, v)| v)
    }

    /// Adds an entry: `name` is lowercased and must then match `[a-z0-9-]{1,64}`,
    /// `value` must be printable ASCII or tab, at most [`META_VALUE_BYTES_MAX`]
    /// bytes; the whole must stay within the bounds. A name already present
    /// is refused (one value per header).
    pub fn push(&mut self, name: &str, value: &[u8]) -> Result<(), FormatError> {
        let name = name.to_ascii_lowercase();
        if name.is_empty()
            || name.len() > META_NAME_BYTES_MAX
            || !name
                .bytes()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == b'-')
        {
            return Err(FormatError::BadMeta("a name must match [a-z0-9-]{1,64}"));
        }
        if value.len() > META_VALUE_BYTES_MAX {
            return Err(FormatError::BadMeta("a value is over 1024 bytes"));
        }
        if !value
            .iter()
            .all(|&c| c == b'\t' || (b' '..=b'~').contains(&c))
        {
            return Err(FormatError::BadMeta("a value must be printable ASCII"));
        }
        if self.get(&name).is_some() {
            return Err(FormatError::BadMeta("a name appears twice"));
        }
        if self.entries.len() >= META_ENTRIES_MAX {
            return Err(FormatError::BadMeta("more than 16 entries"));
        }
        let grown = self.entries_len + 3 + name.len() + value.len();
        if grown + META_CHECKSUM_BYTES > META_BYTES_MAX {
            return Err(FormatError::BadMeta("more than 4096 bytes in all"));
        }
        // Checked above: every byte is ASCII.
        let value = String::from_utf8_lossy(value).into_owned();
        self.entries.push((name, value));
        self.entries_len = grown;
        Ok(())
    }

    /// The entries encoded (no checksum): what replication and the tier carry.
    pub fn encode_entries(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(self.entries_len);
        for (name, value) in &self.entries {
            // Bounded by push: a name fits a u8, a value a u16.
            out.push(name.len() as u8);
            out.extend_from_slice(name.as_bytes());
            out.extend_from_slice(&(value.len() as u16).to_le_bytes());
            out.extend_from_slice(value.as_bytes());
        }
        out
    }

    /// Decodes [`Meta::encode_entries`]' output, applying every rule of
    /// [`Meta::push`]. Never panics, whatever the input.
    pub fn decode_entries(mut bytes: &[u8]) -> Result<Meta, FormatError> {
        let mut meta = Meta::default();
        if bytes.len() + META_CHECKSUM_BYTES > META_BYTES_MAX {
            return Err(FormatError::BadMeta("more than 4096 bytes in all"));
        }
        while let Some((&name_len, rest)) = bytes.split_first() {
            let name_len = usize::from(name_len);
            let (Some(name), Some(len)) = (rest.get(..name_len), rest.get(name_len..name_len + 2))
            else {
                return Err(FormatError::BadMeta("an entry is cut short"));
            };
            let value_len = usize::from(u16::from_le_bytes([len[0], len[1]]));
            let start = name_len + 2;
            let Some(value) = rest.get(start..start + value_len) else {
                return Err(FormatError::BadMeta("an entry is cut short"));
            };
            let name = std::str::from_utf8(name)
                .map_err(|_| FormatError::BadMeta("a name must match [a-z0-9-]{1,64}"))?;
            if name.bytes().any(|c| c.is_ascii_uppercase()) {
                return Err(FormatError::BadMeta("a name must match [a-z0-9-]{1,64}"));
            }
            meta.push(name, value)?;
            bytes = &rest[start + value_len..];
        }
        if meta.is_empty() {
            return Err(FormatError::BadMeta("no entries"));
        }
        Ok(meta)
    }

    /// The entries as one header value (base64 of [`Meta::encode_entries`]),
    /// for [`META_HEADER`] on replication and read-through answers.
    pub fn to_header_value(&self) -> String {
        use base64::Engine as _;
        base64::engine::general_purpose::STANDARD.encode(self.encode_entries())
    }

    /// Decodes a [`META_HEADER`] value, applying every rule of
    /// [`Meta::push`]. Never panics, whatever the input.
    pub fn from_header_value(value: &[u8]) -> Result<Meta, FormatError> {
        use base64::Engine as _;
        // Base64 of at most META_BYTES_MAX bytes, checked before decoding.
        if value.len() > META_BYTES_MAX.div_ceil(3) * 4 {
            return Err(FormatError::BadMeta("more than 4096 bytes in all"));
        }
        let entries = base64::engine::general_purpose::STANDARD
            .decode(value.trim_ascii())
            .map_err(|_| FormatError::BadMeta("not base64"))?;
        Meta::decode_entries(&entries)
    }

    /// The section as written after the fixed header: entries, checksum.
    fn section(&self) -> Vec<u8> {
        let mut out = self.encode_entries();
        let sum = checksum(&out);
        out.extend_from_slice(&sum);
        out
    }

    fn section_len(&self) -> usize {
        self.entries_len + META_CHECKSUM_BYTES
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> [u8; HEADER_BYTES] {
        encode_header(12345, &[7u8; 32])
    }

    /// Rewrites the checksum so a test can reach the field checks behind it.
    fn resum(mut h: [u8; HEADER_BYTES]) -> [u8; HEADER_BYTES] {
        let sum = checksum(&h[..CHECKSUM_OFFSET]);
        h[CHECKSUM_OFFSET..].copy_from_slice(&sum);
        h
    }

    #[test]
    fn round_trip() {
        let h = decode_header(&sample()).unwrap();
        assert_eq!(
            h,
            Header {
                body_len: 12345,
                sha256: [7u8; 32],
                header_len: 64,
            }
        );
        let mut longer = sample().to_vec();
        longer.extend_from_slice(b"body bytes");
        assert_eq!(decode_header(&longer).unwrap().body_len, 12345);
    }

    #[test]
    fn rejects_garbage() {
        let mut flipped_len = sample();
        flipped_len[16] ^= 1;
        let mut flipped_digest = sample();
        flipped_digest[40] ^= 0x80;
        let mut flipped_sum = sample();
        flipped_sum[63] ^= 1;
        let mut version = sample();
        version[8] = 3;
        let mut header_len = sample();
        header_len[10] = 65;
        let mut flags = sample();
        flags[12] = 1;
        let mut huge = sample();
        huge[16..24].copy_from_slice(&u64::MAX.to_le_bytes());
        let cases: Vec<(&str, Vec<u8>, FormatError)> = vec![
            ("empty", vec![], FormatError::Truncated { len: 0 }),
            (
                "short",
                sample()[..63].to_vec(),
                FormatError::Truncated { len: 63 },
            ),
            ("zeros", vec![0u8; 64], FormatError::BadMagic),
            (
                "text",
                b"GET / HTTP/1.1\r\n".repeat(8),
                FormatError::BadMagic,
            ),
            (
                "flipped len",
                flipped_len.to_vec(),
                FormatError::BadChecksum,
            ),
            (
                "flipped digest",
                flipped_digest.to_vec(),
                FormatError::BadChecksum,
            ),
            (
                "flipped sum",
                flipped_sum.to_vec(),
                FormatError::BadChecksum,
            ),
            (
                "version",
                resum(version).to_vec(),
                FormatError::UnsupportedVersion { version: 3 },
            ),
            (
                "header len",
                resum(header_len).to_vec(),
                FormatError::BadHeaderLength { header_len: 65 },
            ),
            (
                "flags",
                resum(flags).to_vec(),
                FormatError::ReservedFlags { flags: 1 },
            ),
            (
                "overflow",
                resum(huge).to_vec(),
                FormatError::BodyTooLong { body_len: u64::MAX },
            ),
        ];
        for (name, bytes, want) in cases {
            assert_eq!(decode_header(&bytes), Err(want), "case {name}");
        }
    }

    fn turbo_meta() -> Meta {
        let mut meta = Meta::default();
        meta.push("x-artifact-duration", b"256").unwrap();
        meta.push(
            "X-Artifact-Tag",
            b"Mx0BnNBEdW4rhFJd2mdwRfAd0llqFFMxsimK91qFj6g=",
        )
        .unwrap();
        meta
    }

    #[test]
    fn version_two_round_trips_and_version_one_is_unchanged() {
        assert_eq!(
            encode_header_with(5, &[1; 32], &Meta::default()),
            encode_header(5, &[1; 32]).to_vec()
        );
        let meta = turbo_meta();
        let bytes = encode_header_with(5, &[1; 32], &meta);
        assert_eq!(bytes.len() as u64, header_len_for(&meta));
        let h = decode_header(&bytes).unwrap();
        assert_eq!(h.header_len, bytes.len() as u64);
        assert_eq!((h.body_len, h.sha256), (5, [1; 32]));
        let back = decode_meta_section(&bytes[HEADER_BYTES..]).unwrap();
        assert_eq!(back, meta);
        assert_eq!(
            back.get("x-artifact-tag"),
            Some("Mx0BnNBEdW4rhFJd2mdwRfAd0llqFFMxsimK91qFj6g=")
        );
        assert_eq!(Meta::decode_entries(&meta.encode_entries()).unwrap(), meta);
        assert_eq!(
            Meta::from_header_value(meta.to_header_value().as_bytes()).unwrap(),
            meta
        );
        assert!(Meta::from_header_value(b"!!").is_err());
        assert!(Meta::from_header_value(&[b'A'; 6000]).is_err());
        // A flipped bit in the section is caught by its own checksum.
        let mut damaged = bytes.clone();
        let last = damaged.len() - 9;
        damaged[last] ^= 1;
        assert_eq!(
            decode_meta_section(&damaged[HEADER_BYTES..]),
            Err(FormatError::BadChecksum)
        );
    }

    #[test]
    fn meta_rules() {
        let mut m = Meta::default();
        let cases: Vec<(&str, Vec<u8>, Result<(), FormatError>)> = vec![
            ("ok", b"v".to_vec(), Ok(())),
            (
                "",
                b"v".to_vec(),
                Err(FormatError::BadMeta("a name must match [a-z0-9-]{1,64}")),
            ),
            (
                "a b",
                b"v".to_vec(),
                Err(FormatError::BadMeta("a name must match [a-z0-9-]{1,64}")),
            ),
            (
                "ok",
                b"v".to_vec(),
                Err(FormatError::BadMeta("a name appears twice")),
            ),
            (
                "cr",
                b"a\r\nb".to_vec(),
                Err(FormatError::BadMeta("a value must be printable ASCII")),
            ),
            (
                "nul",
                vec![0],
                Err(FormatError::BadMeta("a value must be printable ASCII")),
            ),
            (
                "long",
                vec![b'a'; 1025],
                Err(FormatError::BadMeta("a value is over 1024 bytes")),
            ),
            ("tab", b"a\tb".to_vec(), Ok(())),
        ];
        for (name, value, want) in cases {
            assert_eq!(m.push(name, &value), want, "{name}");
        }
        let mut full = Meta::default();
        for i in 0..3 {
            full.push(&format!("n{i}"), &[b'v'; 1024]).unwrap();
        }
        assert_eq!(
            full.push("n3", &[b'v'; 1024]),
            Err(FormatError::BadMeta("more than 4096 bytes in all"))
        );
        let mut many = Meta::default();
        for i in 0..META_ENTRIES_MAX {
            many.push(&format!("n{i}"), b"v").unwrap();
        }
        assert_eq!(
            many.push("last", b"v"),
            Err(FormatError::BadMeta("more than 16 entries"))
        );
        for bad in [
            &[][..],
            &[3, b'a'],
            &[1, b'A', 0, 0],
            &[1, b'a', 5, 0, b'x'],
        ] {
            assert!(Meta::decode_entries(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn version_two_lengths_are_checked() {
        let meta = turbo_meta();
        let mut bytes = encode_header_with(5, &[1; 32], &meta);
        for bad_len in [64u16, 72, 64 + 4097] {
            bytes[10..12].copy_from_slice(&bad_len.to_le_bytes());
            let mut fixed = [0u8; HEADER_BYTES];
            fixed.copy_from_slice(&bytes[..HEADER_BYTES]);
            assert_eq!(
                decode_header(&resum(fixed)),
                Err(FormatError::BadHeaderLength {
                    header_len: bad_len
                })
            );
        }
    }

    #[test]
    fn never_panics_on_pseudo_random_input() {
        // A cheap in-tree stand-in for the fuzz target: many lengths and
        // byte patterns, including ones that start with the magic.
        let mut state = 0x9e37_79b9_7f4a_7c15u64;
        for len in 0..200usize {
            let mut buf: Vec<u8> = (0..len)
                .map(|_| {
                    state ^= state << 13;
                    state ^= state >> 7;
                    state ^= state << 17;
                    state as u8
                })
                .collect();
            assert!(decode_header(&buf).is_err());
            if buf.len() >= 8 {
                buf[..8].copy_from_slice(&MAGIC);
                assert!(decode_header(&buf).is_err());
            }
        }
    }
}
