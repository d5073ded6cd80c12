//! Authorisation: who may read and write which namespace.
//!
//! Rules (from the config, see [`Config::anonymous_writes`]):
//!
//! - **Reads** of a namespace with `read = "public"`, or of one with no `[namespaces.NAME]`
//!   table, are allowed to anyone. The `Authorization` header is then ignored, even when it
//!   holds a wrong token: Gradle and Bazel send their configured credentials on every
//!   request, and a public cache should not fail a build because of a stale one.
//! - Reads of a `read = "token"` namespace need any valid token (`ro` or `rw`); otherwise 401.
//! - **Writes** are allowed to anyone when writes are anonymous (no `rw` token configured;
//!   the header is ignored, as for public reads). Otherwise they need an `rw` token: an `ro`
//!   token gets 403, no or an unknown token 401.
//! - **Scopes.** A token with `namespaces = [...]` is limited to those namespaces: a write
//!   elsewhere, or a read of a `read = "token"` namespace elsewhere, gets 403
//!   ([`Denied::OutOfScope`]) and nothing is stored. A token without the key covers every
//!   namespace. Scopes name the namespace a route maps to ([`crate::route`]): `ac` for
//!   `/[{instance}/]ac/`, `cas` for `/[{instance}/]cas/` (the instance name does not partition
//!   the cache, so it is not part of the scope), `gradle` for `/cache/`, `{namespace}` for
//!   `/v1/artifacts/{namespace}/`. Reads of public namespaces ignore the header, so a scope
//!   never narrows them; anonymous writes (no `rw` token at all) ignore it too.
//! - A token is presented as `Bearer <secret>` or as the password of
//!   `Basic base64(user:password)`; the user part is ignored. Scheme names ignore case.
//!
//! Secrets are never stored here: only their SHA-256 digests, compared with `subtle` against
//! every configured token without early exit, so the time taken does not reveal which token
//! or how much of it matched.
use std::collections::HashMap;
use std::fmt;

use base64::engine::general_purpose::{GeneralPurpose, GeneralPurposeConfig};
use base64::engine::DecodePaddingMode;
use base64::Engine as _;
use sha2::{Digest as _, Sha256};
use subtle::{Choice, ConditionallySelectable as _, ConstantTimeEq};

use crate::config::{Config, NamespaceRead, TokenAccess};

/// What a request wants to do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Access {
    /// GET, HEAD.
    Read,
    /// PUT, DELETE.
    Write,
}

/// Why a request was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Denied {
    /// No valid credentials: answer 401 with [`Denied::WWW_AUTHENTICATE`].
    Unauthorized,
    /// Valid credentials that do not grant this access (a read-only token writing): answer 403.
    Forbidden,
    /// Valid credentials whose `namespaces` scope does not include the namespace: answer 403.
    OutOfScope,
}

impl Denied {
    /// The `WWW-Authenticate` value sent with a 401: both schemes sluice accepts.
    pub const WWW_AUTHENTICATE: &'static str = r#"Bearer realm="sluice", Basic realm="sluice""#;

    /// The HTTP status code: 401 or 403.
    pub fn status(self) -> u16 {
        match self {
            Self::Unauthorized => 401,
            Self::Forbidden | Self::OutOfScope => 403,
        }
    }

    /// The `WWW-Authenticate` header value to send, if this status needs one (401 only).
    pub fn www_authenticate(self) -> Option<&'static str> {
        match self {
            Self::Unauthorized => Some(Self::WWW_AUTHENTICATE),
            Self::Forbidden | Self::OutOfScope => None,
        }
    }
}

/// Longest base64 credential of a Basic header we decode, in bytes. A secret is at most 1024
/// bytes, so this leaves ample room for the user name; longer values are refused as invalid
/// rather than decoded into an unbounded buffer.
const BASIC_ENCODED_BYTES_MAX: usize = 4096;
/// Decoded size bound for [`BASIC_ENCODED_BYTES_MAX`] (3 bytes per 4 characters).
const BASIC_DECODED_BYTES_MAX: usize = BASIC_ENCODED_BYTES_MAX / 4 * 3;

/// Standard alphabet; padding optional, since some clients drop it.
const BASE64: GeneralPurpose = GeneralPurpose::new(
    &base64::alphabet::STANDARD,
    GeneralPurposeConfig::new().with_decode_padding_mode(DecodePaddingMode::Indifferent),
);

struct TokenEntry {
    name: String,
    digest: [u8; 32],
    read_write: bool,
    /// The namespaces this token is limited to, sorted for binary search; `None` covers all.
    scope: Option<Box<[Box<str>]>>,
}

impl TokenEntry {
    fn covers(&self, namespace: &str) -> bool {
        self.scope
            .as_ref()
            .is_none_or(|scope| scope.binary_search_by(|n| (**n).cmp(namespace)).is_ok())
    }
}

/// What the request presented.
enum Credential<'a> {
    /// No `Authorization` header.
    Absent,
    /// A header that is malformed or holds no configured secret.
    Invalid,
    /// A configured token.
    Valid(&'a TokenEntry),
}

/// The authoriser, built once from the config and shared by every front end.
pub struct Auth {
    namespaces: HashMap<String, NamespaceRead>,
    tokens: Box<[TokenEntry]>,
    anonymous_writes: bool,
}

impl Auth {
    /// Builds the authoriser: namespace policies, and the SHA-256 digest of each token secret.
    pub fn from_config(config: &Config) -> Auth {
        Auth {
            namespaces: config
                .namespaces
                .iter()
                .map(|(name, namespace)| (name.clone(), namespace.read))
                .collect(),
            tokens: config
                .tokens
                .iter()
                .map(|token| TokenEntry {
                    name: token.name.clone(),
                    digest: Sha256::digest(token.secret.expose()).into(),
                    read_write: token.access == TokenAccess::ReadWrite,
                    scope: token.namespaces.as_ref().map(|names| {
                        let mut scope: Box<[Box<str>]> =
                            names.iter().map(|name| name.as_str().into()).collect();
                        scope.sort_unstable();
                        scope
                    }),
                })
                .collect(),
            anonymous_writes: config.anonymous_writes(),
        }
    }

    /// Whether writes need no credentials (no `rw` token configured).
    pub fn anonymous_writes(&self) -> bool {
        self.anonymous_writes
    }

    /// Decides whether a request for `access` to `namespace` may proceed, given the raw
    /// `Authorization` header value (`None` when absent). See the module docs for the rules.
    pub fn check(
        &self,
        namespace: &str,
        access: Access,
        authorization: Option<&[u8]>,
    ) -> Result<(), Denied> {
        match access {
            Access::Read => match self.namespaces.get(namespace) {
                None | Some(NamespaceRead::Public) => Ok(()),
                Some(NamespaceRead::Token) => match self.credential(authorization) {
                    Credential::Valid(token) if token.covers(namespace) => Ok(()),
                    Credential::Valid(_) => Err(Denied::OutOfScope),
                    Credential::Absent | Credential::Invalid => Err(Denied::Unauthorized),
                },
            },
            Access::Write if self.anonymous_writes => Ok(()),
            Access::Write => match self.credential(authorization) {
                Credential::Valid(token) if !token.read_write => Err(Denied::Forbidden),
                Credential::Valid(token) if !token.covers(namespace) => Err(Denied::OutOfScope),
                Credential::Valid(_) => Ok(()),
                Credential::Absent | Credential::Invalid => Err(Denied::Unauthorized),
            },
        }
    }

    fn credential(&self, authorization: Option<&[u8]>) -> Credential<'_> {
        let Some(header) = authorization else {
            return Credential::Absent;
        };
        let header = header.trim_ascii();
        let split = header
            .iter()
            .position(|b| *b == b' ' || *b == b'\t')
            .unwrap_or(header.len());
        let (scheme, rest) = header.split_at(split);
        let rest = rest.trim_ascii();
        if rest.is_empty() {
            return Credential::Invalid;
        }
        if scheme.eq_ignore_ascii_case(b"bearer") {
            self.match_secret(rest)
        } else if scheme.eq_ignore_ascii_case(b"basic") {
            if rest.len() > BASIC_ENCODED_BYTES_MAX {
                return Credential::Invalid;
            }
            // A stack buffer: no allocation sized by the client.
            let mut decoded = [0u8; BASIC_DECODED_BYTES_MAX];
            let Ok(len) = BASE64.decode_slice(rest, &mut decoded) else {
                return Credential::Invalid;
            };
            let decoded = &decoded[..len];
            // RFC 7617: the user id cannot contain a colon, the password can.
            match decoded.iter().position(|b| *b == b':') {
                Some(colon) => self.match_secret(&decoded[colon + 1..]),
                None => Credential::Invalid,
            }
        } else {
            Credential::Invalid
        }
    }

    /// Compares the candidate's digest with every token's, without early exit; the matching
    /// index is picked with a constant-time select, so which token matched is known only once
    /// the loop is over. The config refuses two tokens with one secret, so at most one matches.
    fn match_secret(&self, candidate: &[u8]) -> Credential<'_> {
        let digest: [u8; 32] = Sha256::digest(candidate).into();
        let mut found = Choice::from(0);
        let mut matched = 0u64;
        for (index, token) in self.tokens.iter().enumerate() {
            let equal = token.digest.ct_eq(&digest);
            found |= equal;
            // TOKENS_MAX (1024) bounds the index, so it fits any u64.
            matched.conditional_assign(&(index as u64), equal);
        }
        if bool::from(found) {
            // `matched` was assigned by the one token whose digest is equal.
            usize::try_from(matched)
                .ok()
                .and_then(|index| self.tokens.get(index))
                .map_or(Credential::Invalid, Credential::Valid)
        } else {
            Credential::Invalid
        }
    }
}

/// Shows policies and token names, never secrets or their digests.
impl fmt::Debug for Auth {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        struct Tokens<'a>(&'a [TokenEntry]);
        impl fmt::Debug for Tokens<'_> {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.debug_map()
                    .entries(self.0.iter().map(|t| {
                        let access = if t.read_write { "rw" } else { "ro" };
                        (&t.name, (access, &t.scope))
                    }))
                    .finish()
            }
        }
        f.debug_struct("Auth")
            .field("namespaces", &self.namespaces)
            .field("tokens", &Tokens(&self.tokens))
            .field("anonymous_writes", &self.anonymous_writes)
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{load_text, Overrides};
    use base64::engine::general_purpose::STANDARD;
    use std::path::Path;

    const RO: &str = "ro-secret-0123456789";
    const RW: &str = "rw-secret-0123456789";

    fn auth(text: &str) -> Auth {
        let config = load_text(
            Some((Path::new("t.toml"), text)),
            &[],
            &Overrides::default(),
        )
        .unwrap_or_else(|e| panic!("{e}"));
        Auth::from_config(&config)
    }

    fn protected() -> Auth {
        auth(&format!(
            "[namespaces.pub]\nread = \"public\"\n[namespaces.priv]\nread = \"token\"\n\
             [[tokens]]\nname = \"reader\"\nsecret = \"{RO}\"\naccess = \"ro\"\n\
             [[tokens]]\nname = \"writer\"\nsecret = \"{RW}\"\naccess = \"rw\"\n"
        ))
    }

    type Outcome = Result<(), Denied>;

    fn basic(user_password: &str) -> String {
        format!("Basic {}", STANDARD.encode(user_password))
    }

    /// Public/token namespace × credentials × read/write, with rw tokens configured.
    #[test]
    fn matrix_with_write_protection() {
        use Access::{Read, Write};
        const OK: Outcome = Ok(());
        const U: Outcome = Err(Denied::Unauthorized);
        const F: Outcome = Err(Denied::Forbidden);
        let bearer_ro = format!("Bearer {RO}");
        let bearer_rw = format!("Bearer {RW}");
        let basic_ro = basic(&format!("gradle:{RO}"));
        let basic_rw = basic(&format!("gradle:{RW}"));
        let basic_rw_nopad = basic_rw.trim_end_matches('=').to_owned();
        let basic_rw_colon_user = basic(&format!(":{RW}"));
        let basic_user_is_secret = basic(&format!("{RW}:nope"));
        let basic_no_colon = basic(RW);
        let lowercase = format!("bearer   {RW} ");
        let bad = "Bearer not-a-configured-secret";
        // (credential, public read, token read, public write, token write)
        let rows: &[(Option<&str>, [Outcome; 4])] = &[
            (None, [OK, U, U, U]),
            (Some(&bearer_ro), [OK, OK, F, F]),
            (Some(&bearer_rw), [OK, OK, OK, OK]),
            (Some(&basic_ro), [OK, OK, F, F]),
            (Some(&basic_rw), [OK, OK, OK, OK]),
            (Some(&basic_rw_nopad), [OK, OK, OK, OK]),
            (Some(&basic_rw_colon_user), [OK, OK, OK, OK]),
            (Some(&lowercase), [OK, OK, OK, OK]),
            (Some(bad), [OK, U, U, U]),
            (Some(&basic_user_is_secret), [OK, U, U, U]),
            (Some(&basic_no_colon), [OK, U, U, U]),
            (Some("Basic !!!not-base64"), [OK, U, U, U]),
            (Some("Bearer"), [OK, U, U, U]),
            (Some(""), [OK, U, U, U]),
            (Some(RW), [OK, U, U, U]),
            (Some("Token rw-secret-0123456789"), [OK, U, U, U]),
            (Some("Bearer rw-secret-012345678"), [OK, U, U, U]),
            (Some("Bearer rw-secret-01234567890"), [OK, U, U, U]),
        ];
        let auth = protected();
        for (credential, want) in rows {
            let header = credential.map(str::as_bytes);
            let got = [
                auth.check("pub", Read, header),
                auth.check("priv", Read, header),
                auth.check("pub", Write, header),
                auth.check("priv", Write, header),
            ];
            assert_eq!(&got, want, "{credential:?}");
            // Unlisted namespaces behave as public ones.
            assert_eq!(auth.check("other", Read, header), Ok(()), "{credential:?}");
            assert_eq!(
                auth.check("other", Write, header),
                want[2],
                "{credential:?}"
            );
        }
    }

    /// With only a read-only token, writes are anonymous; reads of token namespaces are not.
    #[test]
    fn matrix_with_anonymous_writes() {
        let auth = auth(&format!(
            "[namespaces.ac]\nread = \"token\"\n\
             [[tokens]]\nname = \"reader\"\nsecret = \"{RO}\"\naccess = \"ro\"\n"
        ));
        assert!(auth.anonymous_writes());
        let bearer_ro = format!("Bearer {RO}");
        let rows: &[(Option<&str>, Outcome, Outcome)] = &[
            (None, Err(Denied::Unauthorized), Ok(())),
            (Some(&bearer_ro), Ok(()), Ok(())),
            (
                Some("Bearer wrong-wrong-wrong-wrong"),
                Err(Denied::Unauthorized),
                Ok(()),
            ),
        ];
        for (credential, read, write) in rows {
            let header = credential.map(str::as_bytes);
            assert_eq!(
                auth.check("ac", Access::Read, header),
                *read,
                "{credential:?}"
            );
            assert_eq!(
                auth.check("ac", Access::Write, header),
                *write,
                "{credential:?}"
            );
            assert_eq!(
                auth.check("cas", Access::Read, header),
                Ok(()),
                "{credential:?}"
            );
        }
    }

    const ADMIN: &str = "admin-secret-0123456789";
    const TEAM_A: &str = "team-a-secret-0123456789";
    const BAZEL: &str = "bazel-secret-0123456789";
    const GRADLE: &str = "gradle-secret-0123456789";
    const TEAM_B_READER: &str = "team-b-reader-secret-0123";

    /// Namespaces of [`scoped`], in the column order of [`scopes_by_namespace_and_access`]:
    /// `team-a-priv`, `team-b-priv` and `ac` are `read = "token"`, the rest public.
    const SCOPED_NAMESPACES: [&str; 7] = [
        "team-a",
        "team-a-priv",
        "team-b",
        "team-b-priv",
        "ac",
        "cas",
        "gradle",
    ];

    fn scoped() -> Auth {
        auth(&format!(
            "[namespaces.team-a-priv]\nread = \"token\"\n\
             [namespaces.team-b-priv]\nread = \"token\"\n\
             [namespaces.ac]\nread = \"token\"\n\
             [[tokens]]\nname = \"admin\"\nsecret = \"{ADMIN}\"\naccess = \"rw\"\n\
             [[tokens]]\nname = \"team-a\"\nsecret = \"{TEAM_A}\"\naccess = \"rw\"\n\
             namespaces = [\"team-a-priv\", \"team-a\"]\n\
             [[tokens]]\nname = \"bazel\"\nsecret = \"{BAZEL}\"\naccess = \"rw\"\n\
             namespaces = [\"cas\", \"ac\"]\n\
             [[tokens]]\nname = \"gradle\"\nsecret = \"{GRADLE}\"\naccess = \"rw\"\n\
             namespaces = [\"gradle\"]\n\
             [[tokens]]\nname = \"team-b-reader\"\nsecret = \"{TEAM_B_READER}\"\n\
             access = \"ro\"\nnamespaces = [\"team-b-priv\"]\n"
        ))
    }

    /// Token scope × namespace × read/write. A scope narrows writes everywhere and reads of
    /// `read = "token"` namespaces; public reads ignore it; an `ro` token's write is
    /// `Forbidden` whatever its scope.
    #[test]
    fn scopes_by_namespace_and_access() {
        const OK: Outcome = Ok(());
        const U: Outcome = Err(Denied::Unauthorized);
        const F: Outcome = Err(Denied::Forbidden);
        const S: Outcome = Err(Denied::OutOfScope);
        let bearer = |secret: &str| format!("Bearer {secret}");
        let admin = bearer(ADMIN);
        let team_a = bearer(TEAM_A);
        let team_a_basic = basic(&format!("gradle:{TEAM_A}"));
        let bazel = bearer(BAZEL);
        let gradle = basic(&format!("gradle:{GRADLE}"));
        let team_b_reader = bearer(TEAM_B_READER);
        // Columns as in SCOPED_NAMESPACES:
        //  team-a team-a-priv team-b team-b-priv ac cas gradle
        #[rustfmt::skip]
        let rows: &[(Option<&str>, [Outcome; 7], [Outcome; 7])] = &[
            (Some(&admin),
                [OK, OK, OK, OK, OK, OK, OK],
                [OK, OK, OK, OK, OK, OK, OK]),
            (Some(&team_a),
                [OK, OK, OK, S, S, OK, OK],
                [OK, OK, S, S, S, S, S]),
            (Some(&team_a_basic),
                [OK, OK, OK, S, S, OK, OK],
                [OK, OK, S, S, S, S, S]),
            (Some(&bazel),
                [OK, S, OK, S, OK, OK, OK],
                [S, S, S, S, OK, OK, S]),
            (Some(&gradle),
                [OK, S, OK, S, S, OK, OK],
                [S, S, S, S, S, S, OK]),
            (Some(&team_b_reader),
                [OK, S, OK, OK, S, OK, OK],
                [F, F, F, F, F, F, F]),
            (None,
                [OK, U, OK, U, U, OK, OK],
                [U, U, U, U, U, U, U]),
            (Some("Bearer team-a-secret-012345678"),
                [OK, U, OK, U, U, OK, OK],
                [U, U, U, U, U, U, U]),
        ];
        let auth = scoped();
        assert!(!auth.anonymous_writes());
        for (credential, reads, writes) in rows {
            let header = credential.map(str::as_bytes);
            let got_reads = SCOPED_NAMESPACES.map(|ns| auth.check(ns, Access::Read, header));
            let got_writes = SCOPED_NAMESPACES.map(|ns| auth.check(ns, Access::Write, header));
            assert_eq!(&got_reads, reads, "reads with {credential:?}");
            assert_eq!(&got_writes, writes, "writes with {credential:?}");
        }
    }

    /// A scope is matched by exact name: no prefixes, no case folding, no instance names.
    #[test]
    fn scopes_match_whole_namespace_names() {
        let auth = scoped();
        let team_a = format!("Bearer {TEAM_A}");
        let header = Some(team_a.as_bytes());
        for ns in ["team", "team-a-", "team-ab", "team-a-priv2", "TEAM-A", ""] {
            assert_eq!(
                auth.check(ns, Access::Write, header),
                Err(Denied::OutOfScope),
                "{ns:?}"
            );
        }
        assert_eq!(auth.check("team-a", Access::Write, header), Ok(()));
    }

    /// With no rw token, writes stay anonymous (the header is ignored, scoped or not), but a
    /// scoped ro token still reads only its own `read = "token"` namespaces.
    #[test]
    fn scopes_with_anonymous_writes() {
        let auth = auth(&format!(
            "[namespaces.a]\nread = \"token\"\n[namespaces.b]\nread = \"token\"\n\
             [[tokens]]\nname = \"reader\"\nsecret = \"{RO}\"\naccess = \"ro\"\n\
             namespaces = [\"a\"]\n"
        ));
        assert!(auth.anonymous_writes());
        let reader = format!("Bearer {RO}");
        let header = Some(reader.as_bytes());
        assert_eq!(auth.check("a", Access::Read, header), Ok(()));
        assert_eq!(
            auth.check("b", Access::Read, header),
            Err(Denied::OutOfScope)
        );
        assert_eq!(auth.check("b", Access::Write, header), Ok(()));
        assert_eq!(auth.check("c", Access::Read, header), Ok(()));
    }

    #[test]
    fn no_config_allows_everything() {
        let auth = Auth::from_config(&Config::default());
        for access in [Access::Read, Access::Write] {
            assert_eq!(auth.check("ac", access, None), Ok(()));
            assert_eq!(auth.check("gradle", access, Some(b"Bearer x")), Ok(()));
        }
    }

    #[test]
    fn oversized_basic_credentials_are_invalid_not_decoded() {
        let auth = protected();
        let long = format!("Basic {}", "A".repeat(BASIC_ENCODED_BYTES_MAX + 4));
        assert_eq!(
            auth.check("priv", Access::Read, Some(long.as_bytes())),
            Err(Denied::Unauthorized)
        );
        let fits = basic(&format!("{}:{RO}", "u".repeat(2000)));
        assert!(fits.len() - "Basic ".len() <= BASIC_ENCODED_BYTES_MAX);
        assert_eq!(
            auth.check("priv", Access::Read, Some(fits.as_bytes())),
            Ok(())
        );
    }

    #[test]
    fn denied_maps_to_status_and_challenge() {
        assert_eq!(Denied::Unauthorized.status(), 401);
        assert_eq!(Denied::Forbidden.status(), 403);
        assert_eq!(Denied::OutOfScope.status(), 403);
        assert_eq!(Denied::OutOfScope.www_authenticate(), None);
        assert_eq!(
            Denied::Unauthorized.www_authenticate(),
            Some(r#"Bearer realm="sluice", Basic realm="sluice""#)
        );
        assert_eq!(Denied::Forbidden.www_authenticate(), None);
    }

    #[test]
    fn debug_shows_names_not_secrets() {
        let shown = format!("{:?}", protected());
        assert!(
            shown.contains("reader") && shown.contains("writer"),
            "{shown}"
        );
        assert!(!shown.contains(RO) && !shown.contains(RW), "{shown}");
        let digest = hex::encode(Sha256::digest(RW.as_bytes()));
        assert!(!shown.contains(&digest[..8]), "{shown}");
        let shown = format!("{:?}", scoped());
        assert!(
            shown.contains(r#""bazel": ("rw", Some(["ac", "cas"]))"#),
            "{shown}"
        );
        assert!(!shown.contains(BAZEL), "{shown}");
    }
}
