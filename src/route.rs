//! Request classification: method + path → route, shared by every front end.
//!
//! Classification is pure (no I/O, no allocation) so the ring engine, the
//! hyper fallback, the fuzz targets and the tests all agree on what a path
//! means. Key segments are restricted to `[A-Za-z0-9._-]` and never start
//! with `.`, so a key can never name a directory or escape the data
//! directory; a percent-encoded key is therefore simply invalid (400), not
//! decoded. Generic keys may have several `/`-separated segments, as object
//! store keys do (ccache's default layout sends `fe/a5c6…`); the store keeps
//! such a key in one flat file name (see `store::file_name`). A generic
//! segment may start with `.` (sccache's `.sccache_check`) unless it is `.`
//! or `..`.
//!
//! Besides the artifact routes of Bazel, Gradle and the generic blobs, three
//! client APIs are classified here: Turborepo's remote cache
//! (`/v8/artifacts...`, [`TurboRoute`]; its team, the namespace, is in the
//! query, which the app reads), Nx's self-hosted cache (`/v1/cache/{hash}`,
//! namespace [`NX_NAMESPACE`]) and the WebDAV methods sccache's storage layer
//! sends on the generic route (`PROPFIND`, `MKCOL`: [`Route::Dav`]).

/// Which family of artifact routes a request addressed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ArtifactKind {
    /// Bazel action cache: `/[{instance}/]ac/{sha256}`.
    Ac,
    /// Bazel content-addressed store: `/[{instance}/]cas/{sha256}`; a PUT body
    /// must hash to the key.
    Cas,
    /// Gradle HttpBuildCache: `/cache/{key}`.
    Gradle,
    /// Generic blobs: `/v1/artifacts/{namespace}/{key}` (also WebDAV's GET and PUT).
    Generic,
    /// Turborepo's artifacts: `/v8/artifacts/{hash}`; the namespace is the team.
    Turbo,
    /// Nx's self-hosted cache: `/v1/cache/{hash}`.
    Nx,
}

impl ArtifactKind {
    /// The label used in metrics.
    pub fn label(self) -> &'static str {
        match self {
            ArtifactKind::Ac => "ac",
            ArtifactKind::Cas => "cas",
            ArtifactKind::Gradle => "gradle",
            ArtifactKind::Generic => "generic",
            ArtifactKind::Turbo => "turbo",
            ArtifactKind::Nx => "nx",
        }
    }

    /// The `Allow` header value for this route family.
    pub fn allow(self) -> &'static str {
        match self {
            ArtifactKind::Generic => "GET, HEAD, PUT, DELETE, PROPFIND, MKCOL",
            ArtifactKind::Turbo => "GET, HEAD, PUT, OPTIONS",
            _ => "GET, HEAD, PUT",
        }
    }
}

/// The namespace Nx's `/v1/cache/{hash}` reads and writes (Nx has no notion
/// of a team; a token's scope names this namespace).
pub const NX_NAMESPACE: &str = "nx";

/// Turborepo's remote cache API, under `/v8/artifacts`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TurboRoute<'a> {
    /// `GET`, `HEAD`, `PUT /v8/artifacts/{hash}`.
    Artifact { hash: &'a str, action: Action },
    /// `POST /v8/artifacts`: which of these hashes exist.
    Query,
    /// `POST /v8/artifacts/events`: cache hit and miss events.
    Events,
    /// `GET /v8/artifacts/status`.
    Status,
    /// `OPTIONS` anywhere under `/v8/artifacts` (`TURBO_PREFLIGHT`).
    Preflight,
}

/// The WebDAV methods answered on the generic route.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DavMethod {
    Propfind,
    Mkcol,
}

/// Store namespaces the Bazel and Gradle routes use. A generic namespace may
/// not take one of these names, so `/v1/artifacts/cas/x` cannot bypass the
/// CAS digest check.
pub const RESERVED_NAMESPACES: [&str; 3] = ["ac", "cas", "gradle"];

/// What the request is for, and what it may do there.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Action {
    Get,
    Head,
    Put,
    Delete,
}

/// A classified request.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Route<'a> {
    Artifact {
        kind: ArtifactKind,
        /// Store namespace (`ac`, `cas`, `gradle` or the generic namespace).
        namespace: &'a str,
        key: &'a str,
        action: Action,
    },
    /// `/up`: liveness.
    Up,
    /// `/ready`: readiness, 503 while draining.
    Ready,
    /// `/metrics`: Prometheus text.
    Metrics,
    /// `/status`: JSON summary.
    Status,
    /// Turborepo's remote cache API; the team (namespace) is in the query.
    Turbo(TurboRoute<'a>),
    /// `PROPFIND` or `MKCOL` under `/v1/artifacts/{namespace}/`. `path` is
    /// what follows the namespace's `/`: empty for its root, ending in `/`
    /// for a collection, else a key.
    Dav {
        namespace: &'a str,
        path: &'a str,
        method: DavMethod,
    },
}

impl Route<'_> {
    /// The metrics label of the route.
    pub fn label(&self) -> &'static str {
        match self {
            Route::Artifact { kind, .. } => kind.label(),
            Route::Turbo(_) => "turbo",
            Route::Dav { .. } => "generic",
            Route::Up => "up",
            Route::Ready => "ready",
            Route::Metrics => "metrics",
            Route::Status => "status",
        }
    }

    /// True for a route whose response depends only on the server (HEAD and
    /// GET both allowed, no body).
    pub fn is_admin(&self) -> bool {
        matches!(
            self,
            Route::Up | Route::Ready | Route::Metrics | Route::Status
        )
    }
}

/// Why a request could not be classified.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RouteError {
    /// No route has this path: 404.
    NotFound,
    /// The path has the shape of a route but its key or namespace is not
    /// valid: 400 with the reason.
    BadRequest(&'static str),
    /// The route exists but not for this method: 405 with `Allow`.
    MethodNotAllowed {
        /// The route's metrics label.
        route: &'static str,
        allow: &'static str,
    },
}

impl RouteError {
    pub fn status(&self) -> u16 {
        match self {
            RouteError::NotFound => 404,
            RouteError::BadRequest(_) => 400,
            RouteError::MethodNotAllowed { .. } => 405,
        }
    }
}

/// Longest accepted key (bytes, separators included). Matches the store's
/// limit on a file name.
pub const KEY_BYTES_MAX: usize = crate::store::KEY_BYTES_MAX;
/// Most `/`-separated segments in a generic key.
pub const KEY_SEGMENTS_MAX: usize = crate::store::KEY_SEGMENTS_MAX;
/// Longest accepted namespace (bytes).
pub const NAMESPACE_BYTES_MAX: usize = 64;

const KEY_RULE: &str = "key must match [A-Za-z0-9._-]{1,255} and not start with '.'";
const GENERIC_KEY_RULE: &str = "key must be 1 to 16 '/'-separated segments, 255 bytes in all, each matching [A-Za-z0-9._-]+ and not '.' or '..'";
const TURBO_HASH_RULE: &str = "Turborepo artifact hashes are 1 to 255 hex digits";
const NX_HASH_RULE: &str = "Nx hashes must match [A-Za-z0-9._-]{1,255} and not start with '.'";
const DAV_PATH_RULE: &str = "a collection path must be up to 16 '/'-separated segments ending in '/', each matching [A-Za-z0-9._-]+ and not '.' or '..'";

/// The metrics route label of a request: its route's, also when the route
/// exists but not for this method (a POST to an artifact path counts under
/// that artifact route), `none` when no route matched.
pub fn route_label(method: &str, path: &str) -> &'static str {
    // The replication peer API is answered before classification.
    if path.starts_with("/_peer/") {
        return "peer";
    }
    match classify(method, path) {
        Ok(route) => route.label(),
        Err(RouteError::MethodNotAllowed { route, .. }) => route,
        Err(_) => "none",
    }
}

/// Classify `method` and `path` (the request-target without its query).
pub fn classify<'a>(method: &str, path: &'a str) -> Result<Route<'a>, RouteError> {
    let admin = match path {
        "/up" => Some(Route::Up),
        "/ready" => Some(Route::Ready),
        "/metrics" => Some(Route::Metrics),
        "/status" => Some(Route::Status),
        _ => None,
    };
    if let Some(route) = admin {
        return match method {
            "GET" | "HEAD" => Ok(route),
            _ => Err(RouteError::MethodNotAllowed {
                route: route.label(),
                allow: "GET, HEAD",
            }),
        };
    }
    if let Some(rest) = path.strip_prefix("/v8/artifacts") {
        return classify_turbo(method, rest);
    }
    if let Some(route) = classify_dav(method, path)? {
        return Ok(route);
    }
    let (kind, namespace, key) = split_artifact_path(path)?;
    let action = match (method, kind) {
        ("GET", _) => Action::Get,
        ("HEAD", _) => Action::Head,
        ("PUT", _) => Action::Put,
        ("DELETE", ArtifactKind::Generic) => Action::Delete,
        _ => {
            return Err(RouteError::MethodNotAllowed {
                route: kind.label(),
                allow: kind.allow(),
            })
        }
    };
    Ok(Route::Artifact {
        kind,
        namespace,
        key,
        action,
    })
}

/// `rest` follows `/v8/artifacts` in the path.
fn classify_turbo<'a>(method: &str, rest: &'a str) -> Result<Route<'a>, RouteError> {
    let not_allowed = |allow| RouteError::MethodNotAllowed {
        route: "turbo",
        allow,
    };
    if method == "OPTIONS" {
        return match rest {
            "" | "/" => Ok(Route::Turbo(TurboRoute::Preflight)),
            _ if rest.starts_with('/') => Ok(Route::Turbo(TurboRoute::Preflight)),
            _ => Err(RouteError::NotFound),
        };
    }
    let route = match (rest, method) {
        ("", "POST") => TurboRoute::Query,
        ("", _) => return Err(not_allowed("POST, OPTIONS")),
        ("/status", "GET" | "HEAD") => TurboRoute::Status,
        ("/status", _) => return Err(not_allowed("GET, HEAD")),
        ("/events", "POST") => TurboRoute::Events,
        ("/events", _) => return Err(not_allowed("POST, OPTIONS")),
        _ => {
            let Some(hash) = rest.strip_prefix('/') else {
                return Err(RouteError::NotFound);
            };
            let action = match method {
                "GET" => Action::Get,
                "HEAD" => Action::Head,
                "PUT" => Action::Put,
                _ => return Err(not_allowed(ArtifactKind::Turbo.allow())),
            };
            if !is_turbo_hash(hash) {
                return Err(RouteError::BadRequest(TURBO_HASH_RULE));
            }
            TurboRoute::Artifact { hash, action }
        }
    };
    Ok(Route::Turbo(route))
}

/// A Turborepo artifact hash: 1 to [`KEY_BYTES_MAX`] hex digits (the API's
/// `^[a-fA-F0-9]+$`, bounded by the store's file-name limit).
pub fn is_turbo_hash(hash: &str) -> bool {
    !hash.is_empty() && hash.len() <= KEY_BYTES_MAX && hash.bytes().all(|c| c.is_ascii_hexdigit())
}

/// `PROPFIND` and `MKCOL` under `/v1/artifacts/{namespace}/`: `Ok(None)` for
/// any other method or path.
fn classify_dav<'a>(method: &str, path: &'a str) -> Result<Option<Route<'a>>, RouteError> {
    let method = match method {
        "PROPFIND" => DavMethod::Propfind,
        "MKCOL" => DavMethod::Mkcol,
        _ => return Ok(None),
    };
    let Some(rest) = path.strip_prefix("/v1/artifacts/") else {
        return Ok(None);
    };
    let (namespace, dav_path) = match rest.split_once('/') {
        Some(split) => split,
        // `/v1/artifacts/{ns}`: the namespace's root without its slash.
        None => (rest, ""),
    };
    check_generic_namespace(namespace)?;
    let valid = match dav_path.strip_suffix('/') {
        Some(dir) => valid_generic_key(dir),
        None => dav_path.is_empty() || valid_generic_key(dav_path),
    };
    if !valid {
        return Err(RouteError::BadRequest(DAV_PATH_RULE));
    }
    Ok(Some(Route::Dav {
        namespace,
        path: dav_path,
        method,
    }))
}

fn check_generic_namespace(namespace: &str) -> Result<(), RouteError> {
    if !valid_namespace(namespace) {
        return Err(RouteError::BadRequest(
            "namespace must match [a-z0-9][a-z0-9_-]{0,63}",
        ));
    }
    if RESERVED_NAMESPACES.contains(&namespace) {
        return Err(RouteError::BadRequest(
            "namespaces ac, cas and gradle are reserved for the Bazel and Gradle routes",
        ));
    }
    Ok(())
}

fn split_artifact_path(path: &str) -> Result<(ArtifactKind, &str, &str), RouteError> {
    if let Some(hash) = path.strip_prefix("/v1/cache/") {
        if !valid_key(hash) {
            return Err(RouteError::BadRequest(NX_HASH_RULE));
        }
        return Ok((ArtifactKind::Nx, NX_NAMESPACE, hash));
    }
    if let Some(rest) = path.strip_prefix("/v1/artifacts/") {
        let (namespace, key) = rest.split_once('/').ok_or(RouteError::NotFound)?;
        check_generic_namespace(namespace)?;
        if !valid_generic_key(key) {
            return Err(RouteError::BadRequest(GENERIC_KEY_RULE));
        }
        return Ok((ArtifactKind::Generic, namespace, key));
    }
    if let Some(key) = path.strip_prefix("/cache/") {
        if !valid_key(key) {
            return Err(RouteError::BadRequest(KEY_RULE));
        }
        return Ok((ArtifactKind::Gradle, "gradle", key));
    }
    // Bazel: the last two segments are `ac|cas` and the digest; anything
    // before them is the instance name, which (like bazel-remote) does not
    // partition the cache.
    let (prefix, key) = path.rsplit_once('/').ok_or(RouteError::NotFound)?;
    let kind = if prefix == "/ac" || prefix.ends_with("/ac") {
        ArtifactKind::Ac
    } else if prefix == "/cas" || prefix.ends_with("/cas") {
        ArtifactKind::Cas
    } else {
        return Err(RouteError::NotFound);
    };
    // `prefix` ends with `/ac` or `/cas`; what comes before is the instance.
    let instance = &prefix[..prefix.len() - kind.label().len() - 1];
    if !instance.is_empty() && !valid_instance(instance) {
        return Err(RouteError::NotFound);
    }
    if !is_sha256_hex(key) {
        return Err(RouteError::BadRequest(
            "Bazel keys are sha256 digests: 64 lowercase hex digits",
        ));
    }
    Ok((kind, kind.label(), key))
}

/// `instance` is everything before `/ac` or `/cas` and starts with `/`; its
/// segments must be non-empty and made of key characters.
fn valid_instance(instance: &str) -> bool {
    instance
        .strip_prefix('/')
        .is_some_and(|inner| inner.split('/').all(valid_key))
}

/// A store namespace: `[a-z0-9][a-z0-9_-]{0,63}`.
pub fn valid_namespace(ns: &str) -> bool {
    let b = ns.as_bytes();
    !b.is_empty()
        && b.len() <= NAMESPACE_BYTES_MAX
        && (b[0].is_ascii_lowercase() || b[0].is_ascii_digit())
        && b.iter()
            .all(|&c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == b'_' || c == b'-')
}

/// A single-segment key (Gradle) or instance segment:
/// `[A-Za-z0-9._-]{1,255}`, not starting with `.`.
pub fn valid_key(key: &str) -> bool {
    crate::store::valid_key_segment(key)
}

/// A generic key: 1 to [`KEY_SEGMENTS_MAX`] `/`-separated segments, each a
/// [`valid_key`], [`KEY_BYTES_MAX`] bytes in all. The store applies the same
/// rule, so a key the router accepts always has a file.
pub fn valid_generic_key(key: &str) -> bool {
    crate::store::valid_key(key)
}

/// 64 lowercase hex digits.
pub fn is_sha256_hex(key: &str) -> bool {
    key.len() == 64
        && key
            .bytes()
            .all(|c| c.is_ascii_digit() || (b'a'..=b'f').contains(&c))
}

#[cfg(test)]
mod tests {
    use super::*;

    const SHA: &str = "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855";

    fn art(
        kind: ArtifactKind,
        ns: &'static str,
        key: &'static str,
        action: Action,
    ) -> Route<'static> {
        Route::Artifact {
            kind,
            namespace: ns,
            key,
            action,
        }
    }

    #[test]
    fn table() {
        let ac_path = format!("/ac/{SHA}");
        let cas_path = format!("/cas/{SHA}");
        let inst_path = format!("/my/instance/cas/{SHA}");
        let upper = format!("/ac/{}", SHA.to_uppercase());
        let short = format!("/ac/{}", &SHA[..63]);
        let rows: Vec<(&str, &str, Result<Route<'_>, RouteError>)> = vec![
            ("GET", "/up", Ok(Route::Up)),
            ("HEAD", "/ready", Ok(Route::Ready)),
            ("GET", "/metrics", Ok(Route::Metrics)),
            ("GET", "/status", Ok(Route::Status)),
            (
                "PUT",
                "/up",
                Err(RouteError::MethodNotAllowed {
                    route: "up",
                    allow: "GET, HEAD",
                }),
            ),
            (
                "GET",
                &ac_path,
                Ok(art(ArtifactKind::Ac, "ac", SHA, Action::Get)),
            ),
            (
                "PUT",
                &cas_path,
                Ok(art(ArtifactKind::Cas, "cas", SHA, Action::Put)),
            ),
            (
                "HEAD",
                &inst_path,
                Ok(art(ArtifactKind::Cas, "cas", SHA, Action::Head)),
            ),
            (
                "DELETE",
                &cas_path,
                Err(RouteError::MethodNotAllowed {
                    route: "cas",
                    allow: "GET, HEAD, PUT",
                }),
            ),
            (
                "GET",
                &upper,
                Err(RouteError::BadRequest(
                    "Bazel keys are sha256 digests: 64 lowercase hex digits",
                )),
            ),
            (
                "GET",
                &short,
                Err(RouteError::BadRequest(
                    "Bazel keys are sha256 digests: 64 lowercase hex digits",
                )),
            ),
            (
                "GET",
                "/cache/abc123",
                Ok(art(ArtifactKind::Gradle, "gradle", "abc123", Action::Get)),
            ),
            (
                "POST",
                "/cache/abc123",
                Err(RouteError::MethodNotAllowed {
                    route: "gradle",
                    allow: "GET, HEAD, PUT",
                }),
            ),
            (
                "GET",
                "/cache/../etc",
                Err(RouteError::BadRequest(
                    "key must match [A-Za-z0-9._-]{1,255} and not start with '.'",
                )),
            ),
            (
                "GET",
                "/cache/",
                Err(RouteError::BadRequest(
                    "key must match [A-Za-z0-9._-]{1,255} and not start with '.'",
                )),
            ),
            (
                "GET",
                "/cache/a%2fb",
                Err(RouteError::BadRequest(
                    "key must match [A-Za-z0-9._-]{1,255} and not start with '.'",
                )),
            ),
            (
                "DELETE",
                "/v1/artifacts/blobs/x.tar",
                Ok(art(ArtifactKind::Generic, "blobs", "x.tar", Action::Delete)),
            ),
            (
                "PUT",
                "/v1/artifacts/my-ns/k",
                Ok(art(ArtifactKind::Generic, "my-ns", "k", Action::Put)),
            ),
            (
                "GET",
                "/v1/artifacts/Upper/k",
                Err(RouteError::BadRequest(
                    "namespace must match [a-z0-9][a-z0-9_-]{0,63}",
                )),
            ),
            (
                "GET",
                "/v1/artifacts/cas/k",
                Err(RouteError::BadRequest(
                    "namespaces ac, cas and gradle are reserved for the Bazel and Gradle routes",
                )),
            ),
            ("GET", "/v1/artifacts/ns", Err(RouteError::NotFound)),
            ("GET", "/", Err(RouteError::NotFound)),
            ("GET", "/nothing/here", Err(RouteError::NotFound)),
            ("GET", "//ac/x", Err(RouteError::NotFound)),
        ];
        for (method, path, want) in rows {
            assert_eq!(classify(method, path), want, "{method} {path}");
        }
    }

    /// Generic keys: accepted and refused, one row each.
    #[test]
    fn generic_keys() {
        let ccache = "fe/a5c6ltr4q0kut6qjm9545n50fgo5cbi";
        let deep_ok = ["s"; KEY_SEGMENTS_MAX].join("/");
        let deep_bad = ["s"; KEY_SEGMENTS_MAX + 1].join("/");
        let long_ok = format!("{}/{}", "a".repeat(127), "b".repeat(127));
        let long_bad = format!("{}/{}", "a".repeat(128), "b".repeat(127));
        let accepted = [
            "x.tar",
            "a/b",
            ccache,
            "a/b.c/d-e_f",
            &deep_ok,
            &long_ok,
            "x..y/z",
            ".sccache_check",
            "a/.hidden",
            "team1/ci/.sccache_check",
        ];
        for key in accepted {
            let path = format!("/v1/artifacts/ccache/{key}");
            assert_eq!(
                classify("PUT", &path),
                Ok(Route::Artifact {
                    kind: ArtifactKind::Generic,
                    namespace: "ccache",
                    key,
                    action: Action::Put,
                }),
                "{path}"
            );
        }
        let refused = [
            "", "/", "a/", "/a", "a//b", ".", "..", "./a", "../a", "a/.", "a/..", "a/../b",
            "a/./b", "a%2fb", "a%2e%2e", "a~b", "a\\b", "a b", &deep_bad, &long_bad,
        ];
        for key in refused {
            let path = format!("/v1/artifacts/ccache/{key}");
            assert_eq!(
                classify("GET", &path),
                Err(RouteError::BadRequest(GENERIC_KEY_RULE)),
                "{path}"
            );
        }
        // Gradle keys stay one segment.
        assert_eq!(
            classify("GET", "/cache/a/b"),
            Err(RouteError::BadRequest(KEY_RULE))
        );
    }

    /// Turborepo, Nx and WebDAV: one row per path shape.
    #[test]
    fn client_routes() {
        let turbo = |r| Ok(Route::Turbo(r));
        let dav = |namespace, path, method| {
            Ok(Route::Dav {
                namespace,
                path,
                method,
            })
        };
        let rows: Vec<(&str, &str, Result<Route<'_>, RouteError>)> = vec![
            ("GET", "/v8/artifacts/status", turbo(TurboRoute::Status)),
            ("POST", "/v8/artifacts", turbo(TurboRoute::Query)),
            ("POST", "/v8/artifacts/events", turbo(TurboRoute::Events)),
            ("OPTIONS", "/v8/artifacts/abc", turbo(TurboRoute::Preflight)),
            ("OPTIONS", "/v8/artifacts", turbo(TurboRoute::Preflight)),
            (
                "GET",
                "/v8/artifacts/3c6dfcbfd60adb51",
                turbo(TurboRoute::Artifact {
                    hash: "3c6dfcbfd60adb51",
                    action: Action::Get,
                }),
            ),
            (
                "PUT",
                "/v8/artifacts/ABCdef",
                turbo(TurboRoute::Artifact {
                    hash: "ABCdef",
                    action: Action::Put,
                }),
            ),
            (
                "GET",
                "/v8/artifacts/xyz",
                Err(RouteError::BadRequest(TURBO_HASH_RULE)),
            ),
            (
                "GET",
                "/v8/artifacts/ab/cd",
                Err(RouteError::BadRequest(TURBO_HASH_RULE)),
            ),
            (
                "DELETE",
                "/v8/artifacts/abcd",
                Err(RouteError::MethodNotAllowed {
                    route: "turbo",
                    allow: "GET, HEAD, PUT, OPTIONS",
                }),
            ),
            (
                "PUT",
                "/v8/artifacts/status",
                Err(RouteError::MethodNotAllowed {
                    route: "turbo",
                    allow: "GET, HEAD",
                }),
            ),
            (
                "GET",
                "/v8/artifacts",
                Err(RouteError::MethodNotAllowed {
                    route: "turbo",
                    allow: "POST, OPTIONS",
                }),
            ),
            ("GET", "/v8/artifactsx", Err(RouteError::NotFound)),
            (
                "GET",
                "/v1/cache/5939140485192582302",
                Ok(art(
                    ArtifactKind::Nx,
                    "nx",
                    "5939140485192582302",
                    Action::Get,
                )),
            ),
            (
                "PUT",
                "/v1/cache/15702055814572563823",
                Ok(art(
                    ArtifactKind::Nx,
                    "nx",
                    "15702055814572563823",
                    Action::Put,
                )),
            ),
            (
                "GET",
                "/v1/cache/a/b",
                Err(RouteError::BadRequest(NX_HASH_RULE)),
            ),
            (
                "GET",
                "/v1/cache/.x",
                Err(RouteError::BadRequest(NX_HASH_RULE)),
            ),
            (
                "DELETE",
                "/v1/cache/1",
                Err(RouteError::MethodNotAllowed {
                    route: "nx",
                    allow: "GET, HEAD, PUT",
                }),
            ),
            (
                "PROPFIND",
                "/v1/artifacts/sccache/",
                dav("sccache", "", DavMethod::Propfind),
            ),
            (
                "PROPFIND",
                "/v1/artifacts/sccache",
                dav("sccache", "", DavMethod::Propfind),
            ),
            (
                "PROPFIND",
                "/v1/artifacts/sccache/1/7/8/",
                dav("sccache", "1/7/8/", DavMethod::Propfind),
            ),
            (
                "MKCOL",
                "/v1/artifacts/sccache/1/",
                dav("sccache", "1/", DavMethod::Mkcol),
            ),
            (
                "PROPFIND",
                "/v1/artifacts/sccache/1/7/8/k",
                dav("sccache", "1/7/8/k", DavMethod::Propfind),
            ),
            (
                "PROPFIND",
                "/v1/artifacts/sccache//",
                Err(RouteError::BadRequest(DAV_PATH_RULE)),
            ),
            (
                "MKCOL",
                "/v1/artifacts/sccache/a/../",
                Err(RouteError::BadRequest(DAV_PATH_RULE)),
            ),
            (
                "MKCOL",
                "/v1/artifacts/cas/",
                Err(RouteError::BadRequest(
                    "namespaces ac, cas and gradle are reserved for the Bazel and Gradle routes",
                )),
            ),
            (
                "GET",
                "/v1/artifacts/sccache/.sccache_check",
                Ok(art(
                    ArtifactKind::Generic,
                    "sccache",
                    ".sccache_check",
                    Action::Get,
                )),
            ),
            (
                "PROPFIND",
                "/cache/x",
                Err(RouteError::MethodNotAllowed {
                    route: "gradle",
                    allow: "GET, HEAD, PUT",
                }),
            ),
            (
                "PATCH",
                "/v1/artifacts/ns/k",
                Err(RouteError::MethodNotAllowed {
                    route: "generic",
                    allow: "GET, HEAD, PUT, DELETE, PROPFIND, MKCOL",
                }),
            ),
        ];
        for (method, path, want) in rows {
            assert_eq!(classify(method, path), want, "{method} {path}");
        }
        assert_eq!(route_label("GET", "/v8/artifacts/status"), "turbo");
        assert_eq!(route_label("PROPFIND", "/v1/artifacts/s/"), "generic");
        assert_eq!(route_label("PUT", "/v1/cache/1"), "nx");
    }

    #[test]
    fn route_labels_include_method_not_allowed() {
        assert_eq!(route_label("POST", "/v1/artifacts/ns/k"), "generic");
        assert_eq!(route_label("DELETE", "/cache/k"), "gradle");
        assert_eq!(route_label("POST", "/up"), "up");
        assert_eq!(route_label("GET", "/cache/a~b"), "none");
        assert_eq!(route_label("GET", "/nothing"), "none");
    }

    #[test]
    fn long_keys_are_bounded() {
        let key = "k".repeat(KEY_BYTES_MAX);
        let path = format!("/cache/{key}");
        assert!(classify("GET", &path).is_ok());
        let path = format!("/cache/{key}k");
        assert_eq!(classify("GET", &path).map_err(|e| e.status()), Err(400));
    }
}
