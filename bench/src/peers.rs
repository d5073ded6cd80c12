//! The servers sluice is compared with besides nginx (`compare --peers nginx,h2o,caddy`): each
//! one's configuration, written by the comparison into a directory of its own, serving the same
//! files from the same directory with the same certificate, access logs off, on loopback
//! ports. nginx's configuration stays in `compare.rs` (it is the default peer and also the
//! WebDAV peer for PUT).

use std::fmt;
use std::path::Path;
use std::str::FromStr;

/// A server sluice is measured against.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Peer {
    /// nginx (Debian package): `sendfile`, 2 worker processes. The default peer.
    Nginx,
    /// h2o (Debian package): 2 threads.
    H2o,
    /// Caddy (Debian package): Go's runtime, one OS thread per core.
    Caddy,
    /// Not a server: `sluice-bench h2-floor`, the h2 crate and rustls without hyper or sluice,
    /// every GET from memory (`h2floor.rs`). The floor of sluice's HTTP/2 stack; never the
    /// "best peer".
    H2Floor,
}

impl Peer {
    /// Name in labels, tables and `--peers`.
    pub fn name(self) -> &'static str {
        match self {
            Peer::Nginx => "nginx",
            Peer::H2o => "h2o",
            Peer::Caddy => "caddy",
            Peer::H2Floor => "h2-floor",
        }
    }
}

impl fmt::Display for Peer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for Peer {
    type Err = String;
    fn from_str(s: &str) -> Result<Peer, String> {
        match s.trim().to_ascii_lowercase().as_str() {
            "nginx" => Ok(Peer::Nginx),
            "h2o" => Ok(Peer::H2o),
            "caddy" => Ok(Peer::Caddy),
            "h2-floor" => Ok(Peer::H2Floor),
            _ => Err(format!(
                "peer {s:?} is not one of nginx, h2o, caddy, h2-floor"
            )),
        }
    }
}

/// A TLS listener: port, certificate and key (PEM files).
#[derive(Debug, Clone, Copy)]
pub struct TlsListener<'a> {
    /// Loopback port.
    pub port: u16,
    /// Certificate chain, PEM.
    pub cert: &'a Path,
    /// Private key, PEM.
    pub key: &'a Path,
}

/// h2o's YAML configuration: files under `www` on a plaintext loopback listener (which also
/// takes h2c with prior knowledge) and, when asked, a TLS 1.3 listener with ALPN h2 and
/// http/1.1. Two threads as nginx's two workers; no access log (h2o writes one only when
/// `access-log` is configured). `user: root` only when started as root, so it can read what
/// the comparison wrote (h2o would otherwise switch to `nobody`).
pub fn h2o_conf(
    prefix: &Path,
    www: &Path,
    port: u16,
    tls: Option<TlsListener<'_>>,
    as_root: bool,
) -> String {
    let mut out = String::new();
    if as_root {
        out.push_str("user: root\n");
    }
    out.push_str(&format!(
        "num-threads: 2\nerror-log: {p}/error.log\npid-file: {p}/h2o.pid\n\
         listen:\n  host: 127.0.0.1\n  port: {port}\n",
        p = prefix.display()
    ));
    if let Some(t) = tls {
        // h2o's YAML reader takes `listen` more than once, one listener each.
        out.push_str(&format!(
            "listen:\n  host: 127.0.0.1\n  port: {}\n  ssl:\n    certificate-file: {}\n    \
             key-file: {}\n    minimum-version: TLSv1.3\n",
            t.port,
            t.cert.display(),
            t.key.display()
        ));
    }
    out.push_str(&format!(
        "hosts:\n  \"default\":\n    paths:\n      \"/\":\n        file.dir: {}\n",
        www.display()
    ));
    out
}

/// Caddy's Caddyfile: `file_server` over `www` on a plaintext loopback site (HTTP/1.1 and h2c)
/// and, when asked, a TLS 1.3 site with the given certificate. No admin endpoint, no automatic
/// HTTPS (no ACME, no redirects, no certificate of its own), no access log (Caddy logs
/// requests only with a `log` directive).
pub fn caddyfile(www: &Path, port: u16, tls: Option<TlsListener<'_>>) -> String {
    let mut out = String::from(
        "{\n\tadmin off\n\tauto_https off\n\tservers {\n\t\tprotocols h1 h2 h2c\n\t}\n}\n",
    );
    out.push_str(&format!(
        "http://127.0.0.1:{port} {{\n\troot * {}\n\tfile_server\n}}\n",
        www.display()
    ));
    if let Some(t) = tls {
        out.push_str(&format!(
            "https://127.0.0.1:{} {{\n\ttls {} {} {{\n\t\tprotocols tls1.3\n\t}}\n\t\
             root * {}\n\tfile_server\n}}\n",
            t.port,
            t.cert.display(),
            t.key.display(),
            www.display()
        ));
    }
    out
}

/// Parses `--peers`: a comma-separated list, duplicates dropped, order kept; never empty.
pub fn parse_peers(list: &[String]) -> Result<Vec<Peer>, String> {
    let mut peers = Vec::new();
    for s in list.iter().flat_map(|s| s.split(',')) {
        if s.trim().is_empty() {
            continue;
        }
        let p: Peer = s.parse()?;
        if !peers.contains(&p) {
            peers.push(p);
        }
    }
    if peers.is_empty() {
        return Err("--peers needs at least one of nginx, h2o, caddy".into());
    }
    Ok(peers)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_peer_lists() {
        let s = |v: &[&str]| v.iter().map(|x| x.to_string()).collect::<Vec<_>>();
        type Case<'a> = (&'a [&'a str], Result<Vec<Peer>, ()>);
        let cases: [Case; 5] = [
            (&["nginx"], Ok(vec![Peer::Nginx])),
            (
                &["nginx,h2o,caddy"],
                Ok(vec![Peer::Nginx, Peer::H2o, Peer::Caddy]),
            ),
            (&["H2O", "nginx", "h2o"], Ok(vec![Peer::H2o, Peer::Nginx])),
            (&["apache"], Err(())),
            (&[""], Err(())),
        ];
        for (input, want) in cases {
            assert_eq!(parse_peers(&s(input)).map_err(|_| ()), want, "{input:?}");
        }
    }

    #[test]
    fn h2o_conf_listens_on_both_ports_without_access_log() {
        let tls = TlsListener {
            port: 9443,
            cert: Path::new("/c.pem"),
            key: Path::new("/k.pem"),
        };
        let conf = h2o_conf(Path::new("/p"), Path::new("/w"), 9080, Some(tls), true);
        for want in [
            "user: root\n",
            "num-threads: 2\n",
            "  port: 9080\n",
            "  port: 9443\n",
            "certificate-file: /c.pem\n",
            "key-file: /k.pem\n",
            "minimum-version: TLSv1.3\n",
            "file.dir: /w\n",
        ] {
            assert!(conf.contains(want), "missing {want:?} in\n{conf}");
        }
        assert!(!conf.contains("access-log"), "{conf}");
        let plain = h2o_conf(Path::new("/p"), Path::new("/w"), 9080, None, false);
        assert!(
            !plain.contains("ssl:") && !plain.contains("user:"),
            "{plain}"
        );
    }

    #[test]
    fn caddyfile_has_no_automatic_https_and_an_explicit_certificate() {
        let tls = TlsListener {
            port: 9443,
            cert: Path::new("/c.pem"),
            key: Path::new("/k.pem"),
        };
        let conf = caddyfile(Path::new("/w"), 9080, Some(tls));
        for want in [
            "auto_https off",
            "admin off",
            "http://127.0.0.1:9080 {",
            "https://127.0.0.1:9443 {",
            "tls /c.pem /k.pem {",
            "protocols tls1.3",
            "root * /w",
            "file_server",
        ] {
            assert!(conf.contains(want), "missing {want:?} in\n{conf}");
        }
        assert!(!conf.contains("\tlog"), "{conf}");
        assert!(!caddyfile(Path::new("/w"), 9080, None).contains("https://"));
    }
}
