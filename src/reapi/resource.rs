//! ByteStream resource names and REAPI instance names (sans-IO: text in, parts or a reason
//! out; fuzzed by `fuzz/fuzz_targets/reapi_resource.rs`).
//!
//! ```text
//! read:  {instance}/blobs/{digest_function/}{hash}/{size}
//!        {instance}/compressed-blobs/{compressor}/{digest_function/}{hash}/{size}
//! write: {instance}/uploads/{uuid}/blobs/{digest_function/}{hash}/{size}{/optional_metadata}
//!        {instance}/uploads/{uuid}/compressed-blobs/{compressor}/{digest_function/}{hash}/{size}{/...}
//! ```
//!
//! Instance names are accepted as on the HTTP routes (`/{instance}/ac/…`): `/`-separated
//! segments of `[A-Za-z0-9._-]`, not starting with `.`, and (REAPI's rule, so the keywords
//! above can be found) none equal to a keyword. They do not partition the cache.
//! `digest_function` must be absent or `sha256`; the only compressor is `zstd`.

use crate::action_result::is_sha256_hex;

/// Longest resource or instance name accepted, in bytes.
pub const NAME_BYTES_MAX: usize = 4096;

/// Segments an instance name may not contain (REAPI), so resource names parse one way.
const KEYWORDS: [&str; 7] = [
    "blobs",
    "uploads",
    "actions",
    "actionResults",
    "operations",
    "capabilities",
    "compressed-blobs",
];

/// Whether a name is for `ByteStream.Read` or `Write` (which has `uploads/{uuid}/`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Access {
    Read,
    Write,
}

/// A parsed resource name.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Resource<'a> {
    /// The instance name (may be empty).
    pub instance: &'a str,
    /// The client's upload id (writes only).
    pub upload: Option<&'a str>,
    /// `compressed-blobs/zstd/`: the bytes on the stream are zstd frames.
    pub zstd: bool,
    /// SHA-256 of the uncompressed blob, 64 lowercase hex digits.
    pub hash: &'a str,
    /// Size of the uncompressed blob, bytes (at most `i64::MAX`).
    pub size_bytes: u64,
}

/// Check an instance name (`instance_name` fields, and the prefix of resource names).
pub fn check_instance(name: &str) -> Result<(), String> {
    if name.is_empty() {
        return Ok(());
    }
    if name.len() > NAME_BYTES_MAX {
        return Err(format!(
            "instance name is {} bytes; at most {NAME_BYTES_MAX}",
            name.len()
        ));
    }
    for segment in name.split('/') {
        if KEYWORDS.contains(&segment) {
            return Err(format!(
                "instance name segment {segment:?} is a reserved word ({})",
                KEYWORDS.join(", ")
            ));
        }
        if !crate::route::valid_key(segment) {
            return Err(format!(
                "instance name segment {:?} must match [A-Za-z0-9._-]+ and not start with '.'",
                cut(segment)
            ));
        }
    }
    Ok(())
}

/// Parse a ByteStream resource name for `access`.
pub fn parse(name: &str, access: Access) -> Result<Resource<'_>, String> {
    if name.len() > NAME_BYTES_MAX {
        return Err(format!(
            "resource name is {} bytes; at most {NAME_BYTES_MAX}",
            name.len()
        ));
    }
    let segments: Vec<&str> = name.split('/').collect();
    let first_keyword = segments
        .iter()
        .position(|s| matches!(*s, "blobs" | "uploads" | "compressed-blobs"))
        .ok_or_else(|| format!("resource name {:?} names no blobs", cut(name)))?;
    // The instance is the text before the keyword (without its trailing slash).
    let instance_len = segments[..first_keyword]
        .iter()
        .map(|s| s.len() + 1)
        .sum::<usize>()
        .saturating_sub(1);
    let instance = &name[..instance_len];
    check_instance(instance)?;
    let mut rest = &segments[first_keyword..];
    let upload = match (access, rest.first()) {
        (Access::Write, Some(&"uploads")) => {
            let uuid = rest.get(1).copied().unwrap_or_default();
            if uuid.is_empty() || uuid.len() > 128 {
                return Err("uploads/ must be followed by an upload id of 1 to 128 bytes".into());
            }
            rest = &rest[2..];
            Some(uuid)
        }
        (Access::Write, _) => {
            return Err(format!(
                "a write's resource name is {{instance}}/uploads/{{uuid}}/blobs/{{hash}}/{{size}}, not {:?}",
                cut(name)
            ))
        }
        (Access::Read, Some(&"uploads")) => {
            return Err("a read's resource name has no uploads/ part".into())
        }
        (Access::Read, _) => None,
    };
    let zstd = match rest.first() {
        Some(&"blobs") => {
            rest = &rest[1..];
            false
        }
        Some(&"compressed-blobs") => {
            match rest.get(1).copied() {
                Some("zstd") => {}
                Some(other) => {
                    return Err(format!(
                        "compressor {:?} is not supported (only zstd)",
                        cut(other)
                    ))
                }
                None => return Err("compressed-blobs/ names no compressor".into()),
            }
            rest = &rest[2..];
            true
        }
        _ => return Err(format!("resource name {:?} names no blobs", cut(name))),
    };
    // An optional digest function before the hash: only sha256 is spoken here.
    if let Some(first) = rest.first() {
        if !is_sha256_hex(first) && rest.len() > 2 {
            if *first != "sha256" {
                return Err(format!(
                    "digest function {:?} is not supported (only sha256)",
                    cut(first)
                ));
            }
            rest = &rest[1..];
        }
    }
    let (hash, size) = match rest {
        [hash, size, tail @ ..] => {
            if access == Access::Read && !tail.is_empty() {
                return Err(format!(
                    "resource name {:?} has extra segments after the size",
                    cut(name)
                ));
            }
            (*hash, *size)
        }
        _ => {
            return Err(format!(
                "resource name {:?} must end in {{hash}}/{{size}}",
                cut(name)
            ))
        }
    };
    if !is_sha256_hex(hash) {
        return Err(format!(
            "hash {:?} is not a sha256 digest (64 lowercase hex digits)",
            cut(hash)
        ));
    }
    let size_bytes = parse_size(size)
        .ok_or_else(|| format!("size {:?} is not a whole number of bytes", cut(size)))?;
    Ok(Resource {
        instance,
        upload,
        zstd,
        hash,
        size_bytes,
    })
}

/// A decimal size without sign or leading zeros (other than `0`), at most `i64::MAX`.
fn parse_size(text: &str) -> Option<u64> {
    if text.is_empty() || text.len() > 19 || !text.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    if text.len() > 1 && text.starts_with('0') {
        return None;
    }
    let value: u64 = text.parse().ok()?;
    (value <= i64::MAX as u64).then_some(value)
}

/// At most 80 characters of client text, for an error message.
fn cut(text: &str) -> String {
    text.chars().take(80).collect()
}

/// The canonical form of a parsed name (what a client sends for it).
pub fn format(resource: &Resource<'_>) -> String {
    let mut out = String::new();
    if !resource.instance.is_empty() {
        out.push_str(resource.instance);
        out.push('/');
    }
    if let Some(uuid) = resource.upload {
        out.push_str("uploads/");
        out.push_str(uuid);
        out.push('/');
    }
    out.push_str(if resource.zstd {
        "compressed-blobs/zstd/"
    } else {
        "blobs/"
    });
    out.push_str(resource.hash);
    out.push('/');
    out.push_str(&resource.size_bytes.to_string());
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    const H: &str = "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855";

    fn ok(name: &str, access: Access) -> Resource<'_> {
        parse(name, access).unwrap_or_else(|e| panic!("{name}: {e}"))
    }

    #[test]
    fn accepted_names() {
        let n = format!("blobs/{H}/0");
        assert_eq!(
            ok(&n, Access::Read),
            Resource {
                instance: "",
                upload: None,
                zstd: false,
                hash: H,
                size_bytes: 0
            }
        );
        let n = format!("my/inst/compressed-blobs/zstd/{H}/123");
        let r = ok(&n, Access::Read);
        assert_eq!((r.instance, r.zstd, r.size_bytes), ("my/inst", true, 123));
        let n = format!("uploads/5e1d/blobs/{H}/42");
        let r = ok(&n, Access::Write);
        assert_eq!((r.upload, r.size_bytes), (Some("5e1d"), 42));
        // Optional metadata after a write's size is ignored.
        let n = format!("i/uploads/u/compressed-blobs/zstd/{H}/7/some/metadata");
        let r = ok(&n, Access::Write);
        assert_eq!(
            (r.instance, r.upload, r.zstd, r.size_bytes),
            ("i", Some("u"), true, 7)
        );
        // The digest function may be named when it is sha256.
        let n = format!("blobs/sha256/{H}/9");
        assert_eq!(ok(&n, Access::Read).size_bytes, 9);
        // Canonical names round-trip.
        for (name, access) in [
            (format!("a/b/blobs/{H}/1"), Access::Read),
            (
                format!("uploads/x/compressed-blobs/zstd/{H}/2"),
                Access::Write,
            ),
        ] {
            assert_eq!(format(&ok(&name, access)), name);
        }
    }

    #[test]
    fn refused_names() {
        let cases = [
            (format!("blobs/{H}"), Access::Read, "must end in"),
            (
                format!("blobs/{}/1", &H[..63]),
                Access::Read,
                "not a sha256",
            ),
            (
                format!("blobs/{}/1", H.to_uppercase()),
                Access::Read,
                "not a sha256",
            ),
            (format!("blobs/{H}/-1"), Access::Read, "whole number"),
            (format!("blobs/{H}/01"), Access::Read, "whole number"),
            (
                format!("blobs/{H}/99999999999999999999"),
                Access::Read,
                "whole number",
            ),
            (
                format!("blobs/{H}/9223372036854775808"),
                Access::Read,
                "whole number",
            ),
            (format!("blobs/{H}/1/extra"), Access::Read, "extra segments"),
            (format!("blobs/md5/{H}/1"), Access::Read, "digest function"),
            (
                format!("compressed-blobs/brotli/{H}/1"),
                Access::Read,
                "only zstd",
            ),
            (
                format!("compressed-blobs/identity/{H}/1"),
                Access::Read,
                "only zstd",
            ),
            (
                format!("uploads/u/blobs/{H}/1"),
                Access::Read,
                "no uploads/",
            ),
            (format!("blobs/{H}/1"), Access::Write, "uploads/{uuid}"),
            (format!("uploads//blobs/{H}/1"), Access::Write, "upload id"),
            (
                format!("a//b/blobs/{H}/1"),
                Access::Read,
                "instance name segment",
            ),
            (
                format!(".x/blobs/{H}/1"),
                Access::Read,
                "instance name segment",
            ),
            (
                format!("actions/blobs/{H}/1"),
                Access::Read,
                "reserved word",
            ),
            ("nothing here".to_string(), Access::Read, "names no blobs"),
            ("x".repeat(NAME_BYTES_MAX + 1), Access::Read, "at most"),
        ];
        for (name, access, why) in cases {
            let err = parse(&name, access).expect_err(&name);
            assert!(err.contains(why), "{name}: {err:?} should say {why:?}");
        }
    }

    #[test]
    fn instance_names() {
        for good in ["", "main", "a/b.c/d-e_f"] {
            assert_eq!(check_instance(good), Ok(()), "{good}");
        }
        for bad in ["/a", "a/", "a//b", "..", "a b", "blobs", "x/uploads"] {
            assert!(check_instance(bad).is_err(), "{bad}");
        }
    }
}
