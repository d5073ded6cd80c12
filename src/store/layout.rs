//! Name validation and the on-disk layout `data_dir/{ns}/{2 hex}/{key}`.

use sha2::{Digest, Sha256};

/// Longest namespace name in bytes.
pub const NAMESPACE_BYTES_MAX: usize = 64;
/// Longest key in bytes, separators included. A key is stored under one
/// file name (see [`file_name`]), so this is the file-name limit, `NAME_MAX`.
pub const KEY_BYTES_MAX: usize = 255;
/// Most `/`-separated segments in a key. ccache's default layout uses two
/// (`fe/a5c6…`); object-store style keys rarely need more than a few.
pub const KEY_SEGMENTS_MAX: usize = 16;
/// What stands for `/` in a multi-segment key's file name. It is outside the
/// key alphabet, so the mapping is one-to-one and no single-segment key (whose
/// file name is the key itself) can collide with a multi-segment one.
pub const SEGMENT_SEPARATOR_ON_DISK: &str = "~";

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

/// One key segment: `[A-Za-z0-9_.-]{1,255}`, not starting with `.`. A leading
/// dot is reserved for the store's own temporary names (`.tmp-…`), so a key
/// can never collide with one, and it also excludes `.` and `..`.
pub fn valid_key_segment(segment: &str) -> bool {
    let b = segment.as_bytes();
    !b.is_empty()
        && b.len() <= KEY_BYTES_MAX
        && b[0] != b'.'
        && b.iter()
            .all(|c| c.is_ascii_alphanumeric() || *c == b'_' || *c == b'.' || *c == b'-')
}

/// One segment of a multi-segment key: [`valid_key_segment`], except that it
/// may start with `.` when it is not `.` or `..` (sccache's start-up probe
/// writes `.sccache_check`). A leading dot cannot collide with the store's
/// temporary names because [`file_name`] never lets a file name start with
/// `.` (see there).
pub fn valid_key_part(segment: &str) -> bool {
    match segment.strip_prefix('.') {
        Some(rest) => !rest.is_empty() && rest != "." && valid_tail(rest.as_bytes()),
        None => valid_key_segment(segment),
    }
}

fn valid_tail(b: &[u8]) -> bool {
    b.len() < KEY_BYTES_MAX
        && b.iter()
            .all(|c| c.is_ascii_alphanumeric() || *c == b'_' || *c == b'.' || *c == b'-')
}

/// A key: 1 to [`KEY_SEGMENTS_MAX`] `/`-separated [parts](valid_key_part),
/// [`KEY_BYTES_MAX`] bytes in all. No empty, `.` or `..` segment, no leading
/// or trailing `/`, so a key never names a directory or leaves its namespace.
pub fn valid_key(key: &str) -> bool {
    // A key starting with `.` gets one byte more in its file name.
    key.len() + usize::from(key.starts_with('.')) <= KEY_BYTES_MAX
        && key.split('/').count() <= KEY_SEGMENTS_MAX
        && key.split('/').all(valid_key_part)
}

/// The file name of `key` inside its shard directory: the key itself with
/// each `/` written as [`SEGMENT_SEPARATOR_ON_DISK`]. One flat name instead
/// of nested directories: nothing to create or remove per segment, the scan
/// and eviction keep walking a fixed depth, and a single-segment key's file
/// keeps the name it always had. Callers validate `key` first.
///
/// A key starting with `.` (`.sccache_check`) gets a `~` in front, so no
/// artifact's file name starts with `.`: those stay the store's temporary
/// names (`.tmp-…`), and the scan can tell them apart by their first byte.
/// The mapping stays one-to-one: no other key's file name starts with `~`,
/// since a key never starts with `/`.
pub fn file_name(key: &str) -> std::borrow::Cow<'_, str> {
    let dotted = key.starts_with('.');
    if key.contains('/') || dotted {
        let mut name = String::with_capacity(key.len() + 1);
        if dotted {
            name.push_str(SEGMENT_SEPARATOR_ON_DISK);
        }
        name.push_str(&key.replace('/', SEGMENT_SEPARATOR_ON_DISK));
        std::borrow::Cow::Owned(name)
    } else {
        std::borrow::Cow::Borrowed(key)
    }
}

/// The key a file name in a shard directory stands for, if it is one
/// [`file_name`] can produce (the background scan ignores anything else).
pub fn key_of_file_name(name: &str) -> Option<String> {
    if name.contains('/') || name.starts_with('.') {
        return None;
    }
    let name = match name.strip_prefix(SEGMENT_SEPARATOR_ON_DISK) {
        Some(rest) if rest.starts_with('.') => rest,
        _ => name,
    };
    let key = name.replace(SEGMENT_SEPARATOR_ON_DISK, "/");
    valid_key(&key).then_some(key)
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

/// `{ns}/{2 hex}/{file name}`, the artifact's path relative to the data dir;
/// also its identity in the in-memory index. The shard is that of the
/// [`file_name`], so the scan can check a file's placement from its name
/// alone. Callers validate `ns` and `key` first.
pub fn relative_path(ns: &str, key: &str) -> String {
    let name = file_name(key);
    let shard = shard_dir(&name);
    let mut rel = String::with_capacity(ns.len() + name.len() + 4);
    rel.push_str(ns);
    rel.push('/');
    rel.push(char::from(shard[0]));
    rel.push(char::from(shard[1]));
    rel.push('/');
    rel.push_str(&name);
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
        let dotted_max = format!(".{}", "k".repeat(253));
        let dotted_long = format!(".{}", "k".repeat(254));
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
            (".tmp-1-2", true),
            ("a/b", true),
            ("fe/a5c6ltr4q0kut6qjm9545n50fgo5cbi", true),
            ("a/b/c/d/e/f/g/h/i/j/k/l/m/n/o/p", true),
            ("a/b/c/d/e/f/g/h/i/j/k/l/m/n/o/p/q", false),
            ("/a", false),
            ("a/", false),
            ("a//b", false),
            ("a/./b", false),
            ("a/../b", false),
            ("../a", false),
            ("a/..", false),
            ("a/.hidden", true),
            (".sccache_check", true),
            (&dotted_max, true),
            (&dotted_long, false),
            ("a/.", false),
            ("./a", false),
            ("a/../b", false),
            ("a~b", false),
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

    /// A multi-segment key is one flat file name; single-segment keys keep
    /// the names existing data already has.
    #[test]
    fn multi_segment_keys_map_to_one_file_name() {
        assert_eq!(
            relative_path("ccache", "fe/a5c6ltr4q0kut6qjm9545n50fgo5cbi"),
            "ccache/fe/fe~a5c6ltr4q0kut6qjm9545n50fgo5cbi"
        );
        assert_eq!(file_name("plain.bin"), "plain.bin");
        assert_eq!(
            relative_path("cache", "AB12"),
            format!(
                "cache/{}/AB12",
                std::str::from_utf8(&shard_dir("AB12")).unwrap()
            )
        );
        let long = format!("{}/{}", "a".repeat(127), "b".repeat(127));
        assert!(valid_key(&long));
        assert_eq!(file_name(&long).len(), KEY_BYTES_MAX);
        for key in ["a/b", "x", "a/b/c.d-e_f", ".sccache_check", ".a/.b", "a/.b"] {
            assert_eq!(key_of_file_name(&file_name(key)).as_deref(), Some(key));
            assert!(!file_name(key).starts_with('.'), "{key}");
        }
        assert_eq!(file_name(".sccache_check"), "~.sccache_check");
        assert_eq!(file_name(".tmp-1-2"), "~.tmp-1-2");
        for name in [
            "~a", "a~", "a~~b", "a~..~b", ".tmp-1-2", ".x", "a/b", "~~.a", "~.",
        ] {
            assert_eq!(key_of_file_name(name), None, "{name:?}");
        }
    }
}
