//! Name validation and the on-disk layout `data_dir/{ns}/{2 hex}/{key}`.

use sha2::{Digest, Sha256};

/// Longest namespace name in bytes.
pub const NAMESPACE_BYTES_MAX: usize = 64;
/// Longest key in bytes (a common file-name limit, `NAME_MAX`).
pub const KEY_BYTES_MAX: usize = 255;

/// `[a-z0-9][a-z0-9_-]{0,63}`. Namespaces become directory names, so the rule
/// keeps out `.`/`..`, separators, the store's own `.tmp`, and case aliases.
pub fn valid_namespace(ns: &str) -> bool {
    let b = ns.as_bytes();
    match b.first() {
        Some(c) if c.is_ascii_lowercase() || c.is_ascii_digit() => {}
        _ => return false,
    }
    b.len() <= NAMESPACE_BYTES_MAX
        && b.iter()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || *c == b'_' || *c == b'-')
}

/// `[A-Za-z0-9_.-]{1,255}`, not starting with `.`. Keys become file names; a
/// leading dot is reserved for the store's own temporary names (`.tmp-…`), so
/// a key can never collide with one, and it also excludes `.` and `..`.
pub fn valid_key(key: &str) -> bool {
    let b = key.as_bytes();
    !b.is_empty()
        && b.len() <= KEY_BYTES_MAX
        && b[0] != b'.'
        && b.iter()
            .all(|c| c.is_ascii_alphanumeric() || *c == b'_' || *c == b'.' || *c == b'-')
}

fn is_lower_hex(c: u8) -> bool {
    c.is_ascii_digit() || (b'a'..=b'f').contains(&c)
}

/// The two-hex-digit fan-out directory of `key`: its own first two characters
/// when they are lowercase hex (sha256 keys of Bazel's CAS/AC, laid out as
/// bazel-remote does, so an operator finds `cas/ab/ab12…`), otherwise the
/// first byte of sha256(key), which spreads arbitrary keys evenly.
pub fn shard_dir(key: &str) -> [u8; 2] {
    let b = key.as_bytes();
    if b.len() >= 2 && is_lower_hex(b[0]) && is_lower_hex(b[1]) {
        return [b[0], b[1]];
    }
    let first = Sha256::digest(b)[0];
    const HEX: &[u8; 16] = b"0123456789abcdef";
    [HEX[usize::from(first >> 4)], HEX[usize::from(first & 0xf)]]
}

/// `{ns}/{2 hex}/{key}`, the artifact's path relative to the data dir; also its
/// identity in the in-memory index. Callers validate `ns` and `key` first.
pub fn relative_path(ns: &str, key: &str) -> String {
    let shard = shard_dir(key);
    let mut rel = String::with_capacity(ns.len() + key.len() + 4);
    rel.push_str(ns);
    rel.push('/');
    rel.push(char::from(shard[0]));
    rel.push(char::from(shard[1]));
    rel.push('/');
    rel.push_str(key);
    rel
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn namespaces() {
        let long = "a".repeat(64);
        let too_long = "a".repeat(65);
        let cases: &[(&str, bool)] = &[
            ("cas", true),
            ("ac", true),
            ("0", true),
            ("my_ns-2", true),
            (&long, true),
            ("", false),
            (&too_long, false),
            ("_x", false),
            ("-x", false),
            (".tmp", false),
            ("..", false),
            ("Cas", false),
            ("a/b", false),
            ("a b", false),
            ("a.b", false),
            ("é", false),
        ];
        for (ns, want) in cases {
            assert_eq!(valid_namespace(ns), *want, "namespace {ns:?}");
        }
    }

    #[test]
    fn keys() {
        let long = "k".repeat(255);
        let too_long = "k".repeat(256);
        let cases: &[(&str, bool)] = &[
            ("a", true),
            (
                "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855",
                true,
            ),
            ("Gradle-Key_1.bin", true),
            ("x..y", true),
            (&long, true),
            ("", false),
            (&too_long, false),
            (".", false),
            ("..", false),
            (".tmp-1-2", false),
            ("a/b", false),
            ("a\\b", false),
            ("a b", false),
            ("a\0b", false),
            ("ключ", false),
        ];
        for (key, want) in cases {
            assert_eq!(valid_key(key), *want, "key {key:?}");
        }
    }

    #[test]
    fn layout() {
        assert_eq!(relative_path("cas", "ab12"), "cas/ab/ab12");
        assert_eq!(relative_path("ac", "0f"), "ac/0f/0f");
        // Uppercase hex and non-hex keys are spread by their digest.
        let rel = relative_path("cache", "AB12");
        let shard = shard_dir("AB12");
        assert_eq!(
            rel,
            format!("cache/{}/AB12", std::str::from_utf8(&shard).unwrap())
        );
        assert!(shard.iter().all(|c| is_lower_hex(*c)));
        // Known values: sha256("zz") starts 4a, sha256("a") starts ca.
        assert_eq!(shard_dir("zz"), *b"4a");
        assert_eq!(shard_dir("a"), *b"ca");
    }
}
