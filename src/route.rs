//! Request classification: method + path → route, shared by every front end.
//!
//! Classification is pure (no I/O, no allocation) so the ring engine, the
//! hyper fallback, the fuzz targets and the tests all agree on what a path
//! means. Key segments are restricted to `[A-Za-z0-9._-]` and never start
//! with `.`, so a key can never name a directory or escape the data
//! directory; a percent-encoded key is therefore simply invalid (400), not
//! decoded. Generic keys may have several `/`-separated segments, as object
//! store keys do (ccache's default layout sends `fe/a5c6…`); the store keeps
//! such a key in one flat file name (see `store::file_name`).

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
    /// Generic blobs: `/v1/artifacts/{namespace}/{key}`.
    Generic,
}

impl ArtifactKind {
    /// The label used in metrics.
    pub fn label(self) -> &'static str {
        match self {
            ArtifactKind::Ac => "ac",
            ArtifactKind::Cas => "cas",
            ArtifactKind::Gradle => "gradle",
            ArtifactKind::Generic => "generic",
        }
    }

    /// The `Allow` header value for this route family.
    pub fn allow(self) -> &'static str {
        match self {
            ArtifactKind::Generic => "GET, HEAD, PUT, DELETE",
            _ => "GET, HEAD, PUT",
        }
    }
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
}

impl Route<'_> {
    /// The metrics label of the route.
    pub fn label(&self) -> &'static str {
        match self {
            Route::Artifact { kind, .. } => kind.label(),
            Route::Up => "up",
            Route::Ready => "ready",
            Route::Metrics => "metrics",
            Route::Status => "status",
        }
    }

    /// True for a route whose response depends only on the server (HEAD and
    /// GET both allowed, no body).
    pub fn is_admin(&self) -> bool {
        !matches!(self, Route::Artifact { .. })
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
const GENERIC_KEY_RULE: &str = "key must be 1 to 16 '/'-separated segments, 255 bytes in all, each matching [A-Za-z0-9._-]+ and not starting with '.'";

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

fn split_artifact_path(path: &str) -> Result<(ArtifactKind, &str, &str), RouteError> {
    if let Some(rest) = path.strip_prefix("/v1/artifacts/") {
        let (namespace, key) = rest.split_once('/').ok_or(RouteError::NotFound)?;
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
            "",
            "/",
            "a/",
            "/a",
            "a//b",
            ".",
            "..",
            "./a",
            "../a",
            "a/.",
            "a/..",
            "a/../b",
            "a/./b",
            "a/.hidden",
            ".hidden",
            "a%2fb",
            "a%2e%2e",
            "a~b",
            "a\\b",
            "a b",
            &deep_bad,
            &long_bad,
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
