//! On-disk format of one artifact file: a fixed 64-byte header, then the body.
//!
//! ```text
//! offset  size  field
//!      0     8  magic             b"SLUICEA\0"
//!      8     2  format version    u16 little-endian, currently 1
//!     10     2  header length     u16 little-endian, 64 for version 1
//!     12     4  flags             u32, reserved, must be 0
//!     16     8  body length       u64 little-endian, bytes after the header
//!     24    32  body sha256       raw digest of the body
//!     56     8  header checksum   first 8 bytes of sha256(bytes 0..56)
//! ```
//!
//! The header makes every file self-describing: a GET knows the length and the
//! strong ETag without reading the body or consulting another store, and a
//! torn or foreign file is recognised by the checksum and the file size. The
//! body digest is not re-verified on every read (that would cost a full read
//! per GET); the size check catches truncation, the usual damage.

use sha2::{Digest, Sha256};
use std::fmt;

/// Size of the fixed header in bytes; the body starts at this offset.
pub const HEADER_BYTES: usize = 64;
/// First eight bytes of every artifact file.
pub const MAGIC: [u8; 8] = *b"SLUICEA\0";
/// The only format version this build writes and reads.
pub const FORMAT_VERSION: u16 = 1;

const CHECKSUM_OFFSET: usize = 56;

/// A decoded, validated header.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Header {
    /// Length of the body in bytes (the file is `HEADER_BYTES + body_len` long).
    pub body_len: u64,
    /// sha256 of the body.
    pub sha256: [u8; 32],
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
                    "unsupported format version {version} (this build reads {FORMAT_VERSION})"
                )
            }
            Self::BadHeaderLength { header_len } => {
                write!(f, "header length {header_len}, expected {HEADER_BYTES}")
            }
            Self::ReservedFlags { flags } => write!(f, "reserved flags set: {flags:#x}"),
            Self::BodyTooLong { body_len } => write!(f, "body length {body_len} overflows"),
            Self::BadChecksum => write!(f, "header checksum mismatch"),
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
    let mut out = [0u8; HEADER_BYTES];
    out[0..8].copy_from_slice(&MAGIC);
    out[8..10].copy_from_slice(&FORMAT_VERSION.to_le_bytes());
    out[10..12].copy_from_slice(&(HEADER_BYTES as u16).to_le_bytes());
    // 12..16: flags, zero.
    out[16..24].copy_from_slice(&body_len.to_le_bytes());
    out[24..56].copy_from_slice(sha256);
    let sum = checksum(&out[..CHECKSUM_OFFSET]);
    out[CHECKSUM_OFFSET..].copy_from_slice(&sum);
    out
}

/// Decodes and validates a header from the start of `bytes` (extra bytes are
/// ignored). Never panics, whatever the input.
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
    if version != FORMAT_VERSION {
        return Err(FormatError::UnsupportedVersion { version });
    }
    let header_len = u16::from_le_bytes([h[10], h[11]]);
    if usize::from(header_len) != HEADER_BYTES {
        return Err(FormatError::BadHeaderLength { header_len });
    }
    let flags = u32::from_le_bytes([h[12], h[13], h[14], h[15]]);
    if flags != 0 {
        return Err(FormatError::ReservedFlags { flags });
    }
    let mut len_bytes = [0u8; 8];
    len_bytes.copy_from_slice(&h[16..24]);
    let body_len = u64::from_le_bytes(len_bytes);
    if body_len.checked_add(HEADER_BYTES as u64).is_none() {
        return Err(FormatError::BodyTooLong { body_len });
    }
    let mut sha256 = [0u8; 32];
    sha256.copy_from_slice(&h[24..56]);
    Ok(Header { body_len, sha256 })
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
                sha256: [7u8; 32]
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
        version[8] = 2;
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
                FormatError::UnsupportedVersion { version: 2 },
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
