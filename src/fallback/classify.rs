//! Classification of a new connection by its first bytes, peeked and never read (DESIGN.md,
//! data flow step 2): `0x16` is a TLS ClientHello, the 24-byte h2 preface is h2c, anything else
//! is HTTP/1.1.

use std::io;
use std::time::Duration;

use tokio::net::TcpStream;

/// The h2 prior-knowledge connection preface (RFC 9113 §3.4).
const H2_PREFACE: &[u8; 24] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
/// First byte of a TLS handshake record (content type 22).
pub(super) const TLS_HANDSHAKE_BYTE: u8 = 0x16;
/// Pause between peeks while only part of the h2 preface has arrived: `peek` returns at once
/// while unread bytes remain, so re-peeking without a pause would spin.
const SNIFF_RETRY: Duration = Duration::from_millis(2);

/// The first bytes of a connection, classified.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Sniffed {
    Tls,
    H2c,
    Http1,
}

/// Classifies what has been peeked so far; `None` means "a strict prefix of the h2 preface,
/// wait for more". `bytes` must not be empty.
pub(super) fn classify_prefix(bytes: &[u8]) -> Option<Sniffed> {
    let len = bytes.len().min(H2_PREFACE.len());
    if bytes.first() == Some(&TLS_HANDSHAKE_BYTE) {
        Some(Sniffed::Tls)
    } else if bytes[..len] != H2_PREFACE[..len] {
        Some(Sniffed::Http1)
    } else if len == H2_PREFACE.len() {
        Some(Sniffed::H2c)
    } else {
        None
    }
}

/// Peeks (never reads) until the connection can be classified; `None` if the peer closed.
pub(super) async fn sniff(stream: &TcpStream) -> io::Result<Option<Sniffed>> {
    let mut buf = [0u8; H2_PREFACE.len()];
    loop {
        let seen = stream.peek(&mut buf).await?;
        if seen == 0 {
            return Ok(None);
        }
        if let Some(kind) = classify_prefix(&buf[..seen]) {
            return Ok(Some(kind));
        }
        tokio::time::sleep(SNIFF_RETRY).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn classify_prefix_table() {
        let cases: &[(&[u8], Option<Sniffed>)] = &[
            (&[0x16], Some(Sniffed::Tls)),
            (&[0x16, 0x03, 0x01, 0x02, 0x00], Some(Sniffed::Tls)),
            (b"GET / HTTP/1.1\r\n", Some(Sniffed::Http1)),
            (b"PUT /cas/ab HTTP/1.1\r\n", Some(Sniffed::Http1)),
            (b"P", None),
            (b"PRI * HTTP/2.0\r\n", None),
            (b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n", Some(Sniffed::H2c)),
            (
                b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\x00\x00\x12\x04",
                Some(Sniffed::H2c),
            ),
            (b"PRI * HTTP/1.1\r\n", Some(Sniffed::Http1)),
            (b"POST / HTTP/1.1\r\n", Some(Sniffed::Http1)),
            (b"\x00\x01", Some(Sniffed::Http1)),
        ];
        for (bytes, expected) in cases {
            assert_eq!(classify_prefix(bytes), *expected, "input {bytes:?}");
        }
    }
}
