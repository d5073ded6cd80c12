//! REAPI action results: whether one is well formed, which CAS blobs it names, and whether
//! they are all there (completeness checking).
//!
//! An action result in the action cache is a promise that its outputs can be downloaded.
//! A cache that keeps the result after a blob it names was evicted (or never uploaded)
//! breaks that promise, and the client fails with "missing digest" instead of rebuilding
//! (Kura did this). So a lookup is a hit only when every blob the result names is present:
//! each output file, stdout and stderr, each output directory's `Tree` and every file that
//! tree names. The check runs at read time, so eviction can never make a served result
//! incomplete; it is sans-IO here (the caller says which blobs are present and hands over
//! the bytes of trees), and every front asks the same function: the HTTP `/ac/` GET
//! ([`crate::app`]) and the gRPC `GetActionResult` (`crate::reapi`).
//!
//! Digests are SHA-256 (the only function sluice speaks): 64 lowercase hex digits and a
//! non-negative size. The empty blob is always present (REAPI requires it).

use bazel_remote_apis::build::bazel::remote::execution::v2::{
    ActionResult, Digest, Directory, Tree,
};
use prost::Message as _;

/// Most blobs one check looks at (the files of every tree included). A result naming more is
/// not judged: it is served as it is. 1 Mi digests is far beyond any real action (Bazel's
/// largest tree artifacts hold tens of thousands of files).
pub const CHECKED_BLOBS_MAX: usize = 1 << 20;

/// Largest `Tree` blob read to find the files of an output directory, in bytes. Larger trees
/// are checked for their own presence only.
pub const TREE_BYTES_MAX: u64 = 64 << 20;

/// Hash of the empty blob, which every CAS holds implicitly.
pub const EMPTY_SHA256: &str = "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855";

/// A CAS blob: its SHA-256 (64 lowercase hex digits) and size in bytes.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Blob {
    pub hash: String,
    pub size_bytes: u64,
}

impl Blob {
    /// The blob a REAPI digest names, when the digest is well formed.
    pub fn from_digest(digest: &Digest) -> Option<Blob> {
        if !is_sha256_hex(&digest.hash) {
            return None;
        }
        let size_bytes = u64::try_from(digest.size_bytes).ok()?;
        Some(Blob {
            hash: digest.hash.clone(),
            size_bytes,
        })
    }

    /// The empty blob needs no storage: every CAS has it.
    pub fn is_empty(&self) -> bool {
        self.size_bytes == 0
    }

    /// As a REAPI digest.
    pub fn to_digest(&self) -> Digest {
        Digest {
            hash: self.hash.clone(),
            size_bytes: i64::try_from(self.size_bytes).unwrap_or(i64::MAX),
        }
    }
}

/// 64 lowercase hex digits.
pub fn is_sha256_hex(s: &str) -> bool {
    s.len() == 64
        && s.bytes()
            .all(|c| c.is_ascii_digit() || (b'a'..=b'f').contains(&c))
}

/// Why an action result (or a digest in it) is not well formed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Invalid(pub String);

impl std::fmt::Display for Invalid {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

/// Decode a stored action result. `None` when the bytes are not a well-formed
/// [`ActionResult`] (what clients other than Bazel may keep under `/ac/`): such an entry
/// names no blobs sluice could check.
pub fn decode(bytes: &[u8]) -> Option<ActionResult> {
    let result = ActionResult::decode(bytes).ok()?;
    validate(&result).ok()?;
    Some(result)
}

/// Check the shape of an action result before it is stored (`UpdateActionResult`): every
/// digest it carries is a SHA-256 digest, every output path is relative, normalised and
/// named once.
pub fn validate(result: &ActionResult) -> Result<(), Invalid> {
    let mut paths = std::collections::HashSet::new();
    let mut path = |kind: &str, p: &str, empty_ok: bool| -> Result<(), Invalid> {
        if !(empty_ok && p.is_empty()) {
            check_output_path(p).map_err(|why| Invalid(format!("{kind} path {p:?}: {why}")))?;
        }
        if !paths.insert(p.to_string()) {
            return Err(Invalid(format!("output path {p:?} is named twice")));
        }
        Ok(())
    };
    for file in &result.output_files {
        path("output file", &file.path, false)?;
        required_digest(&format!("output file {:?}", file.path), &file.digest)?;
        if !file.contents.is_empty()
            && file.digest.as_ref().map(|d| d.size_bytes) != Some(file.contents.len() as i64)
        {
            return Err(Invalid(format!(
                "output file {:?}: inline contents are not the digest's size",
                file.path
            )));
        }
    }
    for dir in &result.output_directories {
        path("output directory", &dir.path, true)?;
        required_digest(
            &format!("output directory {:?}", dir.path),
            &dir.tree_digest,
        )?;
        if let Some(digest) = &dir.root_directory_digest {
            checked_digest(&format!("output directory {:?} root", dir.path), digest)?;
        }
    }
    // The two older lists are deprecated since API 2.1, but 2.0 clients still fill them.
    #[allow(deprecated)]
    let symlinks = result
        .output_symlinks
        .iter()
        .chain(&result.output_file_symlinks)
        .chain(&result.output_directory_symlinks);
    for link in symlinks {
        path("output symlink", &link.path, false)?;
        if link.target.is_empty() {
            return Err(Invalid(format!(
                "output symlink {:?} has no target",
                link.path
            )));
        }
    }
    for (what, digest) in [
        ("stdout", &result.stdout_digest),
        ("stderr", &result.stderr_digest),
    ] {
        if let Some(digest) = digest {
            checked_digest(what, digest)?;
        }
    }
    Ok(())
}

fn required_digest(what: &str, digest: &Option<Digest>) -> Result<(), Invalid> {
    match digest {
        Some(digest) => checked_digest(what, digest).map(|_| ()),
        None => Err(Invalid(format!("{what} has no digest"))),
    }
}

/// The blob `digest` names, or why it is not a SHA-256 digest.
pub fn checked_digest(what: &str, digest: &Digest) -> Result<Blob, Invalid> {
    if !is_sha256_hex(&digest.hash) {
        return Err(Invalid(format!(
            "{what}: digest hash {:?} is not 64 lowercase hex digits (SHA-256)",
            truncated(&digest.hash)
        )));
    }
    Blob::from_digest(digest).ok_or_else(|| {
        Invalid(format!(
            "{what}: digest size {} is negative",
            digest.size_bytes
        ))
    })
}

/// A string cut to a length fit for an error message.
fn truncated(s: &str) -> String {
    s.chars().take(80).collect()
}

/// An output path: relative, `/`-separated, no empty, `.` or `..` segment, no NUL.
fn check_output_path(path: &str) -> Result<(), &'static str> {
    if path.is_empty() {
        return Err("is empty");
    }
    if path.starts_with('/') {
        return Err("is absolute");
    }
    if path.contains('\0') {
        return Err("contains NUL");
    }
    if path
        .split('/')
        .any(|segment| segment.is_empty() || segment == "." || segment == "..")
    {
        return Err("has an empty, '.' or '..' segment");
    }
    Ok(())
}

/// What an action result names directly: output files, stdout and stderr, and (separately)
/// the trees of its output directories, whose files are found by reading them. Empty blobs
/// are left out.
pub fn named_blobs(result: &ActionResult) -> (Vec<Blob>, Vec<Blob>) {
    let mut files = Vec::new();
    let mut trees = Vec::new();
    let push = |into: &mut Vec<Blob>, digest: &Option<Digest>| {
        if let Some(blob) = digest.as_ref().and_then(Blob::from_digest) {
            if !blob.is_empty() {
                into.push(blob);
            }
        }
    };
    for file in &result.output_files {
        push(&mut files, &file.digest);
    }
    push(&mut files, &result.stdout_digest);
    push(&mut files, &result.stderr_digest);
    for dir in &result.output_directories {
        push(&mut trees, &dir.tree_digest);
        push(&mut files, &dir.root_directory_digest);
    }
    (files, trees)
}

/// The file blobs a `Tree` names (its root and every child directory), empty ones left out.
/// `None` when the bytes are not a `Tree`.
pub fn tree_files(bytes: &[u8]) -> Option<Vec<Blob>> {
    let tree = Tree::decode(bytes).ok()?;
    let mut files = Vec::new();
    for dir in tree.root.iter().chain(&tree.children) {
        directory_files(dir, &mut files);
    }
    Some(files)
}

fn directory_files(dir: &Directory, into: &mut Vec<Blob>) {
    for file in &dir.files {
        if let Some(blob) = file.digest.as_ref().and_then(Blob::from_digest) {
            if !blob.is_empty() {
                into.push(blob);
            }
        }
    }
}

/// What a completeness check needs from the CAS. `E` is the caller's reason to stop (a
/// lookup that would wait for the disk on an engine thread).
pub trait Cas {
    type Error;
    /// Whether the CAS holds `blob` (with that size).
    fn contains(&mut self, blob: &Blob) -> Result<bool, Self::Error>;
    /// The bytes of `blob` when present and at most [`TREE_BYTES_MAX`] long.
    fn read(&mut self, blob: &Blob) -> Result<Option<Vec<u8>>, Self::Error>;
}

/// The outcome of a completeness check.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Completeness {
    /// Every blob the result names is present.
    Complete,
    /// These are missing (each at most once, in the order met).
    Missing(Vec<Blob>),
    /// The result names more than [`CHECKED_BLOBS_MAX`] blobs: not judged.
    TooLarge,
}

/// Check that every blob `result` names is in `cas`, reading output directory trees to find
/// their files. Each blob is asked about once.
pub fn check<C: Cas>(result: &ActionResult, cas: &mut C) -> Result<Completeness, C::Error> {
    let (mut files, trees) = named_blobs(result);
    let mut missing = Vec::new();
    let mut seen = std::collections::HashSet::with_capacity(files.len() + trees.len());
    for tree in &trees {
        if !seen.insert(tree.clone()) {
            continue;
        }
        if !cas.contains(tree)? {
            missing.push(tree.clone());
            continue;
        }
        if tree.size_bytes > TREE_BYTES_MAX {
            continue;
        }
        match cas.read(tree)? {
            Some(bytes) => match tree_files(&bytes) {
                Some(found) => files.extend(found),
                // Not a Tree: the result names something that is not what it says.
                None => missing.push(tree.clone()),
            },
            // Gone between the two questions.
            None => missing.push(tree.clone()),
        }
        if files.len() > CHECKED_BLOBS_MAX {
            return Ok(Completeness::TooLarge);
        }
    }
    if files.len() > CHECKED_BLOBS_MAX {
        return Ok(Completeness::TooLarge);
    }
    for blob in files {
        if !seen.insert(blob.clone()) {
            continue;
        }
        if !cas.contains(&blob)? {
            missing.push(blob);
        }
    }
    Ok(if missing.is_empty() {
        Completeness::Complete
    } else {
        Completeness::Missing(missing)
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use bazel_remote_apis::build::bazel::remote::execution::v2::{
        FileNode, OutputDirectory, OutputFile, OutputSymlink,
    };
    use sha2::{Digest as _, Sha256};
    use std::collections::HashMap;

    fn blob(data: &[u8]) -> (Digest, Vec<u8>) {
        (
            Digest {
                hash: hex::encode(Sha256::digest(data)),
                size_bytes: data.len() as i64,
            },
            data.to_vec(),
        )
    }

    #[derive(Default)]
    struct Mem {
        blobs: HashMap<String, Vec<u8>>,
        asked: usize,
    }

    impl Mem {
        fn put(&mut self, data: &[u8]) -> Digest {
            let (digest, bytes) = blob(data);
            self.blobs.insert(digest.hash.clone(), bytes);
            digest
        }
    }

    impl Cas for Mem {
        type Error = ();
        fn contains(&mut self, blob: &Blob) -> Result<bool, ()> {
            self.asked += 1;
            Ok(self
                .blobs
                .get(&blob.hash)
                .is_some_and(|b| b.len() as u64 == blob.size_bytes))
        }
        fn read(&mut self, blob: &Blob) -> Result<Option<Vec<u8>>, ()> {
            Ok(self.blobs.get(&blob.hash).cloned())
        }
    }

    fn file(path: &str, digest: Digest) -> OutputFile {
        OutputFile {
            path: path.to_string(),
            digest: Some(digest),
            ..Default::default()
        }
    }

    #[test]
    fn complete_when_every_named_blob_is_present() {
        let mut cas = Mem::default();
        let out = cas.put(b"output");
        let stdout = cas.put(b"stdout text");
        let inner = cas.put(b"a file in a tree");
        let tree = Tree {
            root: Some(Directory {
                files: vec![FileNode {
                    name: "f".into(),
                    digest: Some(inner.clone()),
                    ..Default::default()
                }],
                ..Default::default()
            }),
            children: vec![],
        };
        let tree_digest = cas.put(&tree.encode_to_vec());
        let result = ActionResult {
            output_files: vec![file("bazel-out/bin/out", out)],
            output_directories: vec![OutputDirectory {
                path: "bazel-out/bin/dir".into(),
                tree_digest: Some(tree_digest),
                ..Default::default()
            }],
            stdout_digest: Some(stdout),
            stderr_digest: Some(blob(b"").0),
            ..Default::default()
        };
        assert_eq!(validate(&result), Ok(()));
        assert_eq!(check(&result, &mut cas), Ok(Completeness::Complete));
        // The empty stderr blob is never asked about.
        assert_eq!(cas.asked, 4);

        // Evict the file inside the tree: the result is incomplete.
        cas.blobs.remove(&inner.hash);
        assert_eq!(
            check(&result, &mut cas),
            Ok(Completeness::Missing(vec![
                Blob::from_digest(&inner).unwrap()
            ]))
        );
    }

    #[test]
    fn missing_tree_output_and_wrong_size_are_missing() {
        let mut cas = Mem::default();
        let out = cas.put(b"output");
        let mut wrong_size = out.clone();
        wrong_size.size_bytes += 1;
        let absent_tree = blob(b"not stored").0;
        let result = ActionResult {
            output_files: vec![file("a", out.clone()), file("b", wrong_size.clone())],
            output_directories: vec![OutputDirectory {
                path: "d".into(),
                tree_digest: Some(absent_tree.clone()),
                ..Default::default()
            }],
            ..Default::default()
        };
        let Ok(Completeness::Missing(missing)) = check(&result, &mut cas) else {
            panic!("expected missing blobs");
        };
        assert_eq!(
            missing,
            vec![
                Blob::from_digest(&absent_tree).unwrap(),
                Blob::from_digest(&wrong_size).unwrap()
            ]
        );
    }

    #[test]
    fn a_tree_blob_that_is_not_a_tree_is_missing() {
        let mut cas = Mem::default();
        // 0xff is an invalid protobuf tag: not a Tree.
        let not_tree = cas.put(&[0xff, 0xff, 0xff]);
        let result = ActionResult {
            output_directories: vec![OutputDirectory {
                path: "d".into(),
                tree_digest: Some(not_tree.clone()),
                ..Default::default()
            }],
            ..Default::default()
        };
        assert_eq!(
            check(&result, &mut cas),
            Ok(Completeness::Missing(vec![
                Blob::from_digest(&not_tree).unwrap()
            ]))
        );
    }

    #[test]
    fn validation_table() {
        let good = blob(b"x").0;
        let bad_hash = Digest {
            hash: "ABC".into(),
            size_bytes: 1,
        };
        let negative = Digest {
            hash: good.hash.clone(),
            size_bytes: -1,
        };
        let cases: Vec<(ActionResult, Option<&str>)> = vec![
            (ActionResult::default(), None),
            (
                ActionResult {
                    output_files: vec![file("ok/path", good.clone())],
                    ..Default::default()
                },
                None,
            ),
            (
                ActionResult {
                    output_files: vec![file("/abs", good.clone())],
                    ..Default::default()
                },
                Some("is absolute"),
            ),
            (
                ActionResult {
                    output_files: vec![file("a/../b", good.clone())],
                    ..Default::default()
                },
                Some("segment"),
            ),
            (
                ActionResult {
                    output_files: vec![file("", good.clone())],
                    ..Default::default()
                },
                Some("is empty"),
            ),
            (
                ActionResult {
                    output_files: vec![file("a", good.clone()), file("a", good.clone())],
                    ..Default::default()
                },
                Some("named twice"),
            ),
            (
                ActionResult {
                    output_files: vec![file("a", bad_hash.clone())],
                    ..Default::default()
                },
                Some("not 64 lowercase hex"),
            ),
            (
                ActionResult {
                    output_files: vec![file("a", negative)],
                    ..Default::default()
                },
                Some("negative"),
            ),
            (
                ActionResult {
                    output_files: vec![OutputFile {
                        path: "a".into(),
                        digest: None,
                        ..Default::default()
                    }],
                    ..Default::default()
                },
                Some("has no digest"),
            ),
            (
                ActionResult {
                    stdout_digest: Some(bad_hash),
                    ..Default::default()
                },
                Some("stdout"),
            ),
            (
                ActionResult {
                    output_symlinks: vec![OutputSymlink {
                        path: "l".into(),
                        target: String::new(),
                        ..Default::default()
                    }],
                    ..Default::default()
                },
                Some("no target"),
            ),
            (
                ActionResult {
                    output_directories: vec![OutputDirectory {
                        path: String::new(),
                        tree_digest: Some(good.clone()),
                        ..Default::default()
                    }],
                    ..Default::default()
                },
                None,
            ),
            (
                ActionResult {
                    output_files: vec![OutputFile {
                        path: "a".into(),
                        digest: Some(good.clone()),
                        contents: b"xy".to_vec(),
                        ..Default::default()
                    }],
                    ..Default::default()
                },
                Some("inline contents"),
            ),
        ];
        for (result, want) in cases {
            let got = validate(&result);
            match want {
                None => assert_eq!(got, Ok(()), "{result:?}"),
                Some(text) => {
                    let err = got.expect_err(text);
                    assert!(err.0.contains(text), "{err} should say {text:?}");
                }
            }
        }
    }

    #[test]
    fn decode_refuses_what_is_not_an_action_result() {
        assert!(decode(b"").is_some(), "an empty result is well formed");
        assert!(decode(&[0xff, 0xff]).is_none());
        // A field 1 (output_files) whose digest hash is not hex: decodes, fails validation.
        let result = ActionResult {
            output_files: vec![file(
                "a",
                Digest {
                    hash: "zz".into(),
                    size_bytes: 1,
                },
            )],
            ..Default::default()
        };
        assert!(decode(&result.encode_to_vec()).is_none());
    }
}
