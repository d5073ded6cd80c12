//! Request sets: what the load generator asks for (one URL, a list file, or a size mix) and the
//! pre-rendered bytes of each request.

use std::fmt;
use std::sync::{Arc, OnceLock};

use sha2::{Digest, Sha256};

/// HTTP method the bench sends.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum Method {
    /// GET: the response body is received and verified.
    Get,
    /// HEAD: only the head is received; `Content-Length` is still checked against expectations.
    Head,
    /// PUT of a generated body (deterministic pseudo-random bytes).
    Put,
}

impl Method {
    /// The method token on the request line.
    pub fn as_str(self) -> &'static str {
        match self {
            Method::Get => "GET",
            Method::Head => "HEAD",
            Method::Put => "PUT",
        }
    }
}

impl std::str::FromStr for Method {
    type Err = String;
    fn from_str(s: &str) -> Result<Method, String> {
        match s.to_ascii_uppercase().as_str() {
            "GET" => Ok(Method::Get),
            "HEAD" => Ok(Method::Head),
            "PUT" => Ok(Method::Put),
            _ => Err(format!("method {s:?} is not one of GET, HEAD, PUT")),
        }
    }
}

impl fmt::Display for Method {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A parsed `http://host:port/path` URL (plain HTTP only: the bench measures the plaintext path).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Url {
    /// `host:port` to connect to and to send as `Host`.
    pub authority: String,
    /// Origin-form request target, starting with `/`.
    pub path: String,
}

impl Url {
    /// Parses `http://HOST[:PORT][/PATH]`; the port defaults to 80 and the path to `/`.
    pub fn parse(s: &str) -> Result<Url, String> {
        let rest = s
            .strip_prefix("http://")
            .ok_or_else(|| format!("URL {s:?} must start with http:// (https is not benched)"))?;
        let (authority, path) = match rest.find('/') {
            Some(i) => (&rest[..i], &rest[i..]),
            None => (rest, "/"),
        };
        if authority.is_empty() {
            return Err(format!("URL {s:?} has no host"));
        }
        let authority = if authority
            .rsplit_once(':')
            .is_some_and(|(_, p)| p.parse::<u16>().is_ok())
        {
            authority.to_string()
        } else {
            format!("{authority}:80")
        };
        Ok(Url {
            authority,
            path: path.to_string(),
        })
    }
}

/// A generated request body, shared by every connection that sends it.
#[derive(Debug)]
pub struct Body {
    /// The bytes sent.
    pub bytes: Vec<u8>,
    /// Their SHA-256.
    pub sha256: [u8; 32],
}

impl Body {
    /// Deterministic pseudo-random bytes (xorshift64 seeded from the length), so a PUT of a given
    /// size always carries the same content and digest from run to run, and compresses poorly.
    pub fn generate(len: usize) -> Body {
        let mut bytes = Vec::with_capacity(len);
        let mut state = 0x9E37_79B9_7F4A_7C15u64 ^ (len as u64);
        while bytes.len() < len {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            let take = (len - bytes.len()).min(8);
            bytes.extend_from_slice(&state.to_le_bytes()[..take]);
        }
        let sha256 = Sha256::digest(&bytes).into();
        Body { bytes, sha256 }
    }
}

/// One request of a set, ready to send.
#[derive(Debug)]
pub struct Request {
    /// Method.
    pub method: Method,
    /// Origin-form target.
    pub path: String,
    /// Request line and headers, ending with the blank line.
    pub head: Vec<u8>,
    /// Body for PUT.
    pub body: Option<Arc<Body>>,
    /// Response body length the server must announce, when known (list file or size mix).
    pub expected_len: Option<u64>,
    /// Response body digest the server must send, when known (list file). Without it, digest
    /// verification compares every body of this request with the first one received.
    pub expected_sha256: OnceLock<[u8; 32]>,
    /// Relative weight when the set is a size mix (1 otherwise).
    pub weight: u32,
}

impl Request {
    /// Builds a request and renders its head.
    pub fn new(
        method: Method,
        url: &Url,
        body: Option<Arc<Body>>,
        expected_len: Option<u64>,
    ) -> Request {
        let mut head = format!(
            "{} {} HTTP/1.1\r\nHost: {}\r\nUser-Agent: sluice-bench/{}\r\n",
            method.as_str(),
            url.path,
            url.authority,
            env!("CARGO_PKG_VERSION")
        );
        if let Some(b) = &body {
            head.push_str(&format!("Content-Length: {}\r\n", b.bytes.len()));
        }
        head.push_str("\r\n");
        Request {
            method,
            path: url.path.clone(),
            head: head.into_bytes(),
            body,
            expected_len,
            expected_sha256: OnceLock::new(),
            weight: 1,
        }
    }
}

/// What a run sends: requests to one `host:port`, chosen round-robin (URL, list) or by weight
/// (size mix).
#[derive(Debug)]
pub struct RequestSet {
    /// `host:port` every request goes to (one target per run keeps connections comparable).
    pub authority: String,
    /// The requests.
    pub requests: Vec<Request>,
    /// Pick by weight at random (size mix) instead of round-robin.
    pub weighted: bool,
    /// Send each request once across all connections, in order, and end the run when every
    /// one has been sent (a PUT list: N entries are N uploads, not N per connection).
    pub once: bool,
}

impl RequestSet {
    /// A set of one URL. For PUT, `body_bytes` is the generated body's length.
    pub fn single(url: &str, method: Method, body_bytes: usize) -> Result<RequestSet, String> {
        let url = Url::parse(url)?;
        let body = (method == Method::Put).then(|| Arc::new(Body::generate(body_bytes)));
        Ok(RequestSet {
            authority: url.authority.clone(),
            requests: vec![Request::new(method, &url, body, None)],
            weighted: false,
            once: false,
        })
    }

    /// A set from a list file: one request per line, `URL [LENGTH [SHA256-HEX]]`; blank lines
    /// and lines starting with `#` are skipped. For PUT, LENGTH is the generated body's length
    /// (default `body_bytes`), and each entry is sent once across the connections ([`once`]):
    /// a list of N keys is N uploads. GET and HEAD lists are walked round-robin for the whole
    /// run.
    ///
    /// [`once`]: RequestSet::once
    pub fn from_list(text: &str, method: Method, body_bytes: usize) -> Result<RequestSet, String> {
        let mut requests = Vec::new();
        let mut authority: Option<String> = None;
        for (n, line) in text.lines().enumerate() {
            let line = line.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let mut fields = line.split_whitespace();
            let url = Url::parse(fields.next().unwrap_or_default())
                .map_err(|e| format!("list line {}: {e}", n + 1))?;
            let len = match fields.next() {
                Some(f) => Some(f.parse::<u64>().map_err(|_| {
                    format!("list line {}: length {f:?} is not a number of bytes", n + 1)
                })?),
                None => None,
            };
            let digest = match fields.next() {
                Some(f) => Some(parse_sha256(f).map_err(|e| format!("list line {}: {e}", n + 1))?),
                None => None,
            };
            check_authority(&mut authority, &url)?;
            let req = if method == Method::Put {
                let size = len.map_or(body_bytes, |l| usize::try_from(l).unwrap_or(usize::MAX));
                Request::new(method, &url, Some(Arc::new(Body::generate(size))), None)
            } else {
                Request::new(method, &url, None, len)
            };
            if let Some(d) = digest {
                let _ = req.expected_sha256.set(d);
            }
            requests.push(req);
        }
        let authority = authority.ok_or("the list file holds no URL")?;
        Ok(RequestSet {
            authority,
            requests,
            weighted: false,
            once: method == Method::Put,
        })
    }

    /// A size mix: `template` is a URL holding `{size}` (e.g.
    /// `http://127.0.0.1:8080/v1/artifacts/bench/{size}`), `spec` is `SIZE[:WEIGHT],…` with
    /// sizes in bytes (suffixes k, m, g for KiB, MiB, GiB). GET and HEAD expect a body of exactly
    /// SIZE bytes; PUT sends a generated body of SIZE bytes.
    pub fn size_mix(template: &str, spec: &str, method: Method) -> Result<RequestSet, String> {
        if !template.contains("{size}") {
            return Err(format!("size-mix URL {template:?} must contain {{size}}"));
        }
        let mut requests = Vec::new();
        let mut authority = None;
        for item in spec.split(',').map(str::trim).filter(|s| !s.is_empty()) {
            let (size, weight) = match item.split_once(':') {
                Some((s, w)) => (
                    s,
                    w.parse::<u32>()
                        .map_err(|_| format!("size-mix weight {w:?} is not a whole number"))?,
                ),
                None => (item, 1),
            };
            let size = parse_bytes(size)?;
            let url = Url::parse(&template.replace("{size}", &size.to_string()))?;
            check_authority(&mut authority, &url)?;
            let mut req = if method == Method::Put {
                let len = usize::try_from(size).map_err(|_| format!("size {size} too large"))?;
                Request::new(method, &url, Some(Arc::new(Body::generate(len))), None)
            } else {
                Request::new(method, &url, None, Some(size))
            };
            req.weight = weight.max(1);
            requests.push(req);
        }
        let authority = authority.ok_or("the size mix names no size")?;
        Ok(RequestSet {
            authority,
            requests,
            weighted: true,
            once: false,
        })
    }
}

fn check_authority(seen: &mut Option<String>, url: &Url) -> Result<(), String> {
    match seen {
        Some(a) if *a != url.authority => Err(format!(
            "every URL of a run must use one host:port; saw {a} and {}",
            url.authority
        )),
        Some(_) => Ok(()),
        None => {
            *seen = Some(url.authority.clone());
            Ok(())
        }
    }
}

/// Parses 64 hex digits into a SHA-256 digest.
pub fn parse_sha256(s: &str) -> Result<[u8; 32], String> {
    let bytes = hex::decode(s).map_err(|_| format!("{s:?} is not hex"))?;
    <[u8; 32]>::try_from(bytes.as_slice()).map_err(|_| format!("{s:?} is not 64 hex digits"))
}

/// Parses a byte count: a number with an optional binary suffix `k`, `m`, `g` (KiB, MiB, GiB).
pub fn parse_bytes(s: &str) -> Result<u64, String> {
    let lower = s.trim().to_ascii_lowercase();
    let (digits, scale) = match lower.trim_end_matches(['b', 'i']).chars().last() {
        Some('k') => (lower.trim_end_matches(['b', 'i', 'k']), 1u64 << 10),
        Some('m') => (lower.trim_end_matches(['b', 'i', 'm']), 1 << 20),
        Some('g') => (lower.trim_end_matches(['b', 'i', 'g']), 1 << 30),
        _ => (lower.as_str(), 1),
    };
    digits
        .parse::<u64>()
        .ok()
        .and_then(|n| n.checked_mul(scale))
        .ok_or_else(|| format!("{s:?} is not a byte count (e.g. 4096, 64k, 17m)"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_byte_counts() {
        let cases = [
            ("4096", Some(4096)),
            ("4k", Some(4096)),
            ("64MiB", Some(64 << 20)),
            ("1g", Some(1 << 30)),
            ("17941067", Some(17_941_067)),
            ("x", None),
            ("", None),
        ];
        for (input, want) in cases {
            assert_eq!(parse_bytes(input).ok(), want, "input {input:?}");
        }
    }

    #[test]
    fn parses_urls() {
        let cases = [
            (
                "http://127.0.0.1:8080/a/b",
                Some(("127.0.0.1:8080", "/a/b")),
            ),
            ("http://localhost", Some(("localhost:80", "/"))),
            ("https://x/", None),
            ("http:///x", None),
        ];
        for (input, want) in cases {
            let got = Url::parse(input).ok();
            let got = got
                .as_ref()
                .map(|u| (u.authority.as_str(), u.path.as_str()));
            assert_eq!(got, want, "input {input:?}");
        }
    }

    #[test]
    fn list_file_with_lengths_and_digests() {
        let digest = "ab".repeat(32);
        let text = format!("# comment\n\nhttp://h:1/a 10 {digest}\nhttp://h:1/b\n");
        let set = RequestSet::from_list(&text, Method::Get, 0).unwrap();
        assert_eq!(set.requests.len(), 2);
        assert_eq!(set.requests[0].expected_len, Some(10));
        assert_eq!(set.requests[0].expected_sha256.get(), Some(&[0xab; 32]));
        assert_eq!(set.requests[1].expected_len, None);
        assert!(!set.once, "GET lists repeat");
        assert!(RequestSet::from_list(&text, Method::Put, 4).unwrap().once);
        assert!(RequestSet::from_list("http://h:1/a\nhttp://h:2/b", Method::Get, 0).is_err());
    }

    #[test]
    fn size_mix_renders_put_heads() {
        let set = RequestSet::size_mix(
            "http://h:9/v1/artifacts/bench/{size}",
            "4k:3,100",
            Method::Put,
        )
        .unwrap();
        assert_eq!(set.requests.len(), 2);
        assert_eq!(set.requests[0].weight, 3);
        let head = String::from_utf8(set.requests[1].head.clone()).unwrap();
        assert!(head.starts_with("PUT /v1/artifacts/bench/100 HTTP/1.1\r\nHost: h:9\r\n"));
        assert!(head.contains("Content-Length: 100\r\n"));
        assert_eq!(
            set.requests[0].body.as_ref().map(|b| b.bytes.len()),
            Some(4096)
        );
    }

    #[test]
    fn generated_bodies_are_deterministic() {
        let a = Body::generate(1000);
        let b = Body::generate(1000);
        assert_eq!(a.sha256, b.sha256);
        assert_ne!(a.sha256, Body::generate(1001).sha256);
    }
}
