//! The address and URL forms some keys take: `host:port` (`peers`, `peers_dns`), the peer
//! list's two spellings, the tier's `s3://` URL and an S3-compatible endpoint. Each answers
//! only whether the text is well-formed; the key's rule in `rules.rs` says what is allowed.
use std::fmt;

/// Most entries in `peers`.
pub const PEERS_MAX: usize = 256;

/// `host:port` with a non-empty host of name or IP characters (or a bracketed IPv6 literal)
/// and a port from 1 to 65535.
pub(super) fn is_host_port(text: &str) -> bool {
    let Some((host, port)) = text.rsplit_once(':') else {
        return false;
    };
    let host_ok = !host.is_empty()
        && host.len() <= 253
        && (host
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'.' || b == b'-' || b == b'_')
            || (host.starts_with('[') && host.ends_with(']')));
    host_ok && port.parse::<u16>().is_ok_and(|p| p > 0)
}

/// `tier_url`: `s3://bucket[/prefix]` with an S3 bucket name and a prefix of key characters.
pub(super) fn is_tier_url(text: &str) -> bool {
    let Some(rest) = text.strip_prefix("s3://") else {
        return false;
    };
    let (bucket, prefix) = rest.split_once('/').unwrap_or((rest, ""));
    let bucket_ok = (3..=63).contains(&bucket.len())
        && bucket
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'.' || b == b'-');
    let prefix_ok = prefix.len() <= 512
        && !prefix.starts_with('/')
        && !prefix.contains("//")
        && prefix
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"/._-".contains(&b));
    bucket_ok && prefix_ok
}

/// `tier_endpoint`: `http://` or `https://`, then `host[:port]` and nothing else but a `/`.
pub(super) fn is_endpoint(text: &str) -> bool {
    let Some(rest) = text
        .strip_prefix("http://")
        .or_else(|| text.strip_prefix("https://"))
    else {
        return false;
    };
    let rest = rest.strip_suffix('/').unwrap_or(rest);
    if rest.is_empty() || rest.contains('/') {
        return false;
    }
    is_host_port(rest) || (!rest.contains(':') && is_host_port(&format!("{rest}:443")))
}

/// `peers`: a TOML array of strings, or one comma-separated string (the form an environment
/// variable or a flag can carry); empty items are dropped.
pub(super) fn peer_list<'de, D: serde::Deserializer<'de>>(
    deserializer: D,
) -> Result<Vec<String>, D::Error> {
    struct Peers;
    impl<'de> serde::de::Visitor<'de> for Peers {
        type Value = Vec<String>;
        fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_str("a list of host:port")
        }
        fn visit_str<E: serde::de::Error>(self, text: &str) -> Result<Vec<String>, E> {
            Ok(text
                .split(',')
                .map(|p| p.trim().to_owned())
                .filter(|p| !p.is_empty())
                .collect())
        }
        fn visit_seq<A: serde::de::SeqAccess<'de>>(
            self,
            mut seq: A,
        ) -> Result<Vec<String>, A::Error> {
            let mut out = Vec::new();
            while let Some(item) = seq.next_element::<String>()? {
                out.push(item);
            }
            Ok(out)
        }
    }
    deserializer.deserialize_any(Peers)
}
