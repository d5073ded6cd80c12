//! Store tests on real files in a temp dir.

use super::*;
use std::collections::BTreeSet;
use std::io::Read;
use std::time::Instant;

fn config(dir: &Path) -> StoreConfig {
    StoreConfig {
        data_dir: dir.to_path_buf(),
        store_bytes_max: 0,
        fsync: FsyncPolicy::Always,
    }
}

fn sha(data: &[u8]) -> [u8; 32] {
    Sha256::digest(data).into()
}

fn put(store: &Store, ns: &str, key: &str, data: &[u8]) -> Result<Committed, StoreError> {
    let mut w = store.begin_put(ns, key, PutOptions::default())?;
    // Uneven chunks exercise the write buffer's edges.
    for chunk in data.chunks(7000) {
        w.write(chunk)?;
    }
    w.commit()
}

fn read_body(a: &mut Artifact) -> Vec<u8> {
    let mut out = vec![0u8; usize::try_from(a.len).unwrap()];
    a.file.read_exact_at(&mut out, a.body_offset).unwrap();
    out
}

fn get_body(store: &Store, ns: &str, key: &str) -> Option<Vec<u8>> {
    store.get(ns, key).unwrap().map(|mut a| read_body(&mut a))
}

/// Every path under `dir`, relative, directories included.
fn listing(dir: &Path) -> BTreeSet<String> {
    fn walk(root: &Path, dir: &Path, out: &mut BTreeSet<String>) {
        for e in std::fs::read_dir(dir).unwrap() {
            let e = e.unwrap();
            let p = e.path();
            out.insert(p.strip_prefix(root).unwrap().to_string_lossy().into_owned());
            if e.file_type().unwrap().is_dir() {
                walk(root, &p, out);
            }
        }
    }
    let mut out = BTreeSet::new();
    walk(dir, dir, &mut out);
    out
}

/// Only files, relative paths; not the commit journal's segments (the
/// store's own bookkeeping, emptied by every checkpoint).
fn files(dir: &Path) -> BTreeSet<String> {
    listing(dir)
        .into_iter()
        .filter(|p| dir.join(p).is_file() && !p.starts_with(JOURNAL_DIR))
        .collect()
}

fn wait_for(what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !cond() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(5));
    }
}

fn both_modes() -> [Option<TmpfileMode>; 2] {
    [None, Some(TmpfileMode::Named)]
}

#[test]
fn round_trip_in_both_temp_modes() {
    for mode in both_modes() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open_with(config(dir.path()), mode).unwrap();
        if mode == Some(TmpfileMode::Named) {
            assert_eq!(store.stats().tmpfile_mode, "named_temp");
        }
        let data: Vec<u8> = (0..200_000u32).map(|i| (i % 251) as u8).collect();
        let c = put(&store, "cas", "ab12", &data).unwrap();
        assert_eq!(
            c,
            Committed {
                len: data.len() as u64,
                sha256: sha(&data),
                replaced: false,
                write_time_ms: c.write_time_ms,
                superseded: false,
            }
        );
        // The write time is the file's mtime, read back as such.
        let written = store.get("cas", "ab12").unwrap().unwrap();
        assert_eq!(written.write_time_ms().unwrap(), c.write_time_ms);
        let mut a = store.get("cas", "ab12").unwrap().unwrap();
        assert_eq!(a.len, data.len() as u64);
        assert_eq!(a.body_offset, HEADER_BYTES as u64);
        assert_eq!(a.sha256, sha(&data));
        assert_eq!(a.etag(), format!("\"{}\"", hex::encode(sha(&data))));
        assert_eq!(a.etag().len(), 66);
        assert_eq!(read_body(&mut a), data);
        // Laid out as documented, with no temp files left behind.
        assert_eq!(
            files(dir.path()),
            BTreeSet::from(["cas/ab/ab12".to_string()])
        );
        let s = store.stats();
        assert_eq!(
            (s.entries, s.bytes),
            (1, data.len() as u64 + HEADER_BYTES as u64)
        );
        // Empty bodies are artifacts too.
        put(&store, "gen", "empty", b"").unwrap();
        assert_eq!(get_body(&store, "gen", "empty").unwrap(), b"");
        assert!(store.get("cas", "ffff").unwrap().is_none());
        assert!(store.get("nope", "ab12").unwrap().is_none());
    }
}

#[test]
fn replace_and_delete() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(config(dir.path())).unwrap();
    assert!(!put(&store, "gen", "k", b"one").unwrap().replaced);
    let old = store.get("gen", "k").unwrap().unwrap();
    assert!(put(&store, "gen", "k", b"second").unwrap().replaced);
    assert_eq!(get_body(&store, "gen", "k").unwrap(), b"second");
    // An open artifact keeps serving the old content after a replace.
    let mut old = old;
    assert_eq!(read_body(&mut old), b"one");
    let s = store.stats();
    assert_eq!((s.entries, s.bytes), (1, 6 + HEADER_BYTES as u64));

    assert!(store.delete("gen", "k").unwrap());
    assert!(!store.delete("gen", "k").unwrap());
    assert!(store.get("gen", "k").unwrap().is_none());
    assert!(files(dir.path()).is_empty());
    let s = store.stats();
    assert_eq!((s.entries, s.bytes), (0, 0));
}

#[test]
fn invalid_names_are_rejected_everywhere() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(config(dir.path())).unwrap();
    for (ns, key) in [
        ("cas", "../x"),
        ("cas", "."),
        ("cas", "a/.."),
        ("../etc", "k"),
        ("", "k"),
        ("cas", ""),
        ("cas", "a/../../x"),
        ("cas", "a//b"),
        ("cas", "/abs"),
        ("cas", "a/"),
        ("cas", "a/./b"),
        ("cas", "a~b"),
    ] {
        assert!(
            matches!(store.get(ns, key), Err(StoreError::InvalidKey)),
            "{ns}/{key}"
        );
        assert!(matches!(store.delete(ns, key), Err(StoreError::InvalidKey)));
        let err = store.begin_put(ns, key, PutOptions::default()).unwrap_err();
        assert_eq!(err.status(), 400);
    }
}

#[test]
fn digest_and_length_mismatch_store_nothing() {
    for mode in both_modes() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open_with(config(dir.path()), mode).unwrap();
        let data = b"hello world";

        let mut w = store
            .begin_put(
                "cas",
                "aa",
                PutOptions {
                    expected_sha256: Some([1u8; 32]),
                    ..Default::default()
                },
            )
            .unwrap();
        w.write(data).unwrap();
        match w.commit() {
            Err(e @ StoreError::DigestMismatch { expected, actual }) => {
                assert_eq!((expected, actual), ([1u8; 32], sha(data)));
                assert_eq!(e.status(), 400);
                assert!(e.to_string().contains(&hex::encode(sha(data))), "{e}");
            }
            other => panic!("expected DigestMismatch, got {other:?}"),
        }

        // Shorter than announced: caught at commit.
        let opts = PutOptions {
            expected_len: Some(20),
            ..Default::default()
        };
        let mut w = store.begin_put("gen", "short", opts).unwrap();
        w.write(data).unwrap();
        match w.commit() {
            Err(StoreError::LengthMismatch {
                expected: 20,
                actual: 11,
            }) => {}
            other => panic!("expected LengthMismatch, got {other:?}"),
        }
        // Longer than announced: caught at the write that overshoots.
        let opts = PutOptions {
            expected_len: Some(5),
            ..Default::default()
        };
        let mut w = store.begin_put("gen", "long", opts).unwrap();
        match w.write(data) {
            Err(
                e @ StoreError::LengthMismatch {
                    expected: 5,
                    actual: 11,
                },
            ) => assert_eq!(e.status(), 400),
            other => panic!("expected LengthMismatch, got {other:?}"),
        }
        assert!(w.commit().is_err(), "a failed writer must not commit");

        // The right digest and length are accepted.
        let opts = PutOptions {
            expected_len: Some(data.len() as u64),
            expected_sha256: Some(sha(data)),
            body_bytes_max: 100,
            write_time_ms: Some(1_234_567),
            last_writer_wins: false,
        };
        let mut w = store.begin_put("cas", "bb", opts).unwrap();
        w.write(data).unwrap();
        assert_eq!(w.commit().unwrap().write_time_ms, 1_234_567);
        let kept = store.get("cas", "bb").unwrap().unwrap();
        assert_eq!(
            kept.write_time_ms().unwrap(),
            1_234_567,
            "a given write time is kept"
        );
        assert_eq!(files(dir.path()), BTreeSet::from(["cas/bb/bb".to_string()]));
        assert_eq!(store.stats().entries, 1);
    }
}

#[test]
fn too_large_is_refused_early_and_midway() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(config(dir.path())).unwrap();
    let opts = PutOptions {
        body_bytes_max: 10,
        ..Default::default()
    };
    let err = store
        .begin_put(
            "gen",
            "k",
            PutOptions {
                expected_len: Some(11),
                ..opts
            },
        )
        .unwrap_err();
    assert!(matches!(err, StoreError::TooLarge { limit_bytes: 10 }));
    assert_eq!(err.status(), 413);

    let mut w = store.begin_put("gen", "k", opts).unwrap();
    w.write(b"0123456789").unwrap();
    assert!(matches!(
        w.write(b"x"),
        Err(StoreError::TooLarge { limit_bytes: 10 })
    ));
    assert!(w.commit().is_err());

    // The store's own limit caps a body too.
    let dir2 = tempfile::tempdir().unwrap();
    let small = Store::open(StoreConfig {
        store_bytes_max: 1000,
        ..config(dir2.path())
    })
    .unwrap();
    let err = small
        .begin_put(
            "gen",
            "k",
            PutOptions {
                expected_len: Some(2000),
                ..Default::default()
            },
        )
        .unwrap_err();
    assert!(
        matches!(err, StoreError::TooLarge { limit_bytes: 936 }),
        "{err:?}"
    );
    assert!(files(dir.path()).is_empty());
    assert!(files(dir2.path()).is_empty());
}

#[test]
fn dropped_writer_leaves_nothing() {
    for mode in both_modes() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open_with(config(dir.path()), mode).unwrap();
        let before = listing(dir.path());
        let opts = PutOptions {
            expected_len: Some(1 << 20),
            ..Default::default()
        };
        let mut w = store.begin_put("gen", "partial", opts).unwrap();
        w.write(&vec![7u8; 300_000]).unwrap();
        if mode == Some(TmpfileMode::Named) {
            // While in flight, the named temp exists in .tmp/ and nowhere else.
            let in_flight = files(dir.path());
            assert_eq!(in_flight.len(), 1, "{in_flight:?}");
            assert!(
                in_flight.iter().all(|p| p.starts_with(".tmp/.tmp-")),
                "{in_flight:?}"
            );
        } else {
            assert!(files(dir.path()).is_empty());
        }
        drop(w);
        assert!(files(dir.path()).is_empty(), "{:?}", files(dir.path()));
        assert!(store.get("gen", "partial").unwrap().is_none());
        // Only the (empty) namespace and shard directories were added (all
        // 256 shards: a namespace gets them at once).
        let added: BTreeSet<_> = listing(dir.path()).difference(&before).cloned().collect();
        let shard = std::str::from_utf8(&shard_dir("partial"))
            .unwrap()
            .to_string();
        assert!(added.contains("gen") && added.contains(&format!("gen/{shard}")));
        assert_eq!(added.len(), 1 + 256, "{added:?}");
        assert!(added
            .iter()
            .all(|p| p == "gen" || (p.starts_with("gen/") && p.len() == 6)));
        assert_eq!(store.stats().entries, 0);
    }
}

#[test]
fn reopen_serves_at_once_and_accounting_catches_up() {
    let dir = tempfile::tempdir().unwrap();
    let mut expected_bytes = 0;
    {
        let store = Store::open(config(dir.path())).unwrap();
        for i in 0..300u32 {
            let data = vec![(i % 256) as u8; 100 + i as usize];
            put(&store, "gen", &format!("key{i}"), &data).unwrap();
            expected_bytes += data.len() as u64 + HEADER_BYTES as u64;
        }
        assert!(store.stats().accounting_complete);
    }
    // Leftovers of an interrupted write of a dead process: a named temp and a
    // linked-but-not-renamed upload. Both are removed (nobody holds them locked).
    std::fs::write(dir.path().join(".tmp/.tmp-999999-1"), b"junk").unwrap();
    let shard = std::str::from_utf8(&shard_dir("key0")).unwrap().to_string();
    let stray = dir.path().join(format!("gen/{shard}/.tmp-999999-2"));
    std::fs::write(&stray, b"junk").unwrap();

    let store = Store::open(config(dir.path())).unwrap();
    // Serve immediately and concurrently with the scan: these reads and
    // writes race with it and must not be double counted.
    assert_eq!(
        get_body(&store, "gen", "key299").unwrap(),
        vec![(299 % 256) as u8; 399]
    );
    put(&store, "gen", "key5", &[1u8; 50]).unwrap(); // replace during the scan
    expected_bytes = expected_bytes - 105 + 50;
    assert!(store.delete("gen", "key6").unwrap()); // delete during the scan
    expected_bytes -= 106 + HEADER_BYTES as u64;
    wait_for("accounting", || store.stats().accounting_complete);
    let s = store.stats();
    assert_eq!(s.entries, 299);
    assert_eq!(s.bytes, expected_bytes);
    assert!(!dir.path().join(".tmp/.tmp-999999-1").exists());
    assert!(!stray.exists());
    assert_eq!(get_body(&store, "gen", "key5").unwrap(), vec![1u8; 50]);
}

/// Keys starting with `.` (sccache's `.sccache_check`) and an artifact that
/// keeps response headers (a version-2 header): stored, served with their
/// metadata through both open paths, replaced, and accounted by the scan
/// after a restart; a dotted key's file name starts with `~`, so the scan
/// never takes it for a temp file.
#[test]
fn dotted_keys_and_kept_headers_survive_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let mut meta = format::Meta::default();
    meta.push("x-artifact-duration", b"256").unwrap();
    meta.push("x-artifact-tag", b"tag+/=").unwrap();
    let header_len = format::header_len_for(&meta);
    assert!(header_len > HEADER_BYTES as u64);
    {
        let store = Store::open(config(dir.path())).unwrap();
        put(&store, "sccache", ".sccache_check", b"Hello, World!").unwrap();
        put(&store, "sccache", ".tmp-1-1", b"not a temp file").unwrap();
        let mut w = store
            .begin_put_with(
                "team",
                "3c6dfcbfd60adb51",
                PutOptions::default(),
                meta.clone(),
            )
            .unwrap();
        w.write(b"turbo body").unwrap();
        let c = w.commit().unwrap();
        assert_eq!(c.sha256, sha(b"turbo body"));
        let mut a = store.get("team", "3c6dfcbfd60adb51").unwrap().unwrap();
        assert_eq!((a.body_offset, a.len), (header_len, 10));
        assert_eq!(a.meta.as_deref(), Some(&meta));
        assert_eq!(read_body(&mut a), b"turbo body");
        let mut cache = OpenCache::new(4);
        for _ in 0..2 {
            let mut a = store
                .get_cached("team", "3c6dfcbfd60adb51", &mut cache)
                .unwrap()
                .unwrap();
            assert_eq!(a.meta.as_deref(), Some(&meta));
            assert_eq!(read_body(&mut a), b"turbo body");
        }
        assert_eq!(cache.hits_total, 1);
    }
    let on_disk = files(dir.path());
    let dotted: Vec<_> = on_disk.iter().filter(|p| p.contains("~.")).collect();
    assert_eq!(dotted.len(), 2, "{on_disk:?}");
    let store = Store::open(config(dir.path())).unwrap();
    wait_for("accounting", || store.stats().accounting_complete);
    let s = store.stats();
    assert_eq!(s.entries, 3);
    assert_eq!(s.bytes, 13 + 15 + 2 * HEADER_BYTES as u64 + 10 + header_len);
    assert_eq!(
        get_body(&store, "sccache", ".sccache_check").unwrap(),
        b"Hello, World!"
    );
    assert_eq!(
        get_body(&store, "sccache", ".tmp-1-1").unwrap(),
        b"not a temp file"
    );
    // Replaced without metadata: a version-1 file again.
    put(&store, "team", "3c6dfcbfd60adb51", b"plain").unwrap();
    let a = store.get("team", "3c6dfcbfd60adb51").unwrap().unwrap();
    assert_eq!(
        (a.body_offset, a.meta.is_none()),
        (HEADER_BYTES as u64, true)
    );
    // A damaged metadata section makes the artifact a (removed) miss.
    let mut w = store
        .begin_put_with("team", "ab", PutOptions::default(), meta)
        .unwrap();
    w.write(b"x").unwrap();
    w.commit().unwrap();
    let path = dir.path().join(relative_path("team", "ab"));
    let mut bytes = std::fs::read(&path).unwrap();
    bytes[HEADER_BYTES + 2] ^= 1;
    std::fs::write(&path, &bytes).unwrap();
    assert!(store.get("team", "ab").unwrap().is_none());
    assert!(!path.exists());
}

/// A multi-segment key lives in one flat file in its shard (`/` written
/// `~`), and the background scan, eviction and delete account it like any
/// other artifact after a restart.
#[test]
fn multi_segment_keys_are_one_file_scanned_and_evicted() {
    let dir = tempfile::tempdir().unwrap();
    let key = "fe/a5c6ltr4q0kut6qjm9545n50fgo5cbi";
    let file_bytes = 1000 + HEADER_BYTES as u64;
    {
        let store = Store::open(config(dir.path())).unwrap();
        put(&store, "ccache", key, &[3u8; 1000]).unwrap();
        put(&store, "ccache", "fe", &[4u8; 1000]).unwrap();
        put(&store, "ccache", "a/b/c", &[5u8; 1000]).unwrap();
    }
    let on_disk = files(dir.path());
    assert!(
        on_disk.contains("ccache/fe/fe~a5c6ltr4q0kut6qjm9545n50fgo5cbi"),
        "{on_disk:?}"
    );
    assert!(on_disk.contains("ccache/fe/fe"), "{on_disk:?}");
    assert_eq!(on_disk.len(), 3, "{on_disk:?}");
    // A file no key maps to is neither served nor counted.
    std::fs::write(dir.path().join("ccache/fe/fe~~x"), b"junk").unwrap();
    // `key` is the one eviction keeps: the most recently used by the scan's
    // measure (its file times) as well as by the GET below, whichever of the
    // two the background thread sees first.
    let later = SystemTime::now() + Duration::from_secs(3600);
    std::fs::File::options()
        .write(true)
        .open(
            dir.path()
                .join("ccache/fe/fe~a5c6ltr4q0kut6qjm9545n50fgo5cbi"),
        )
        .unwrap()
        .set_times(
            std::fs::FileTimes::new()
                .set_accessed(later)
                .set_modified(later),
        )
        .unwrap();

    // Restart with a limit below what is there: the scan finds all three
    // and eviction brings the store back under 90% of the limit.
    let store = Store::open(StoreConfig {
        store_bytes_max: 2 * file_bytes,
        ..config(dir.path())
    })
    .unwrap();
    assert_eq!(get_body(&store, "ccache", key).unwrap(), vec![3u8; 1000]);
    wait_for("accounting", || store.stats().accounting_complete);
    wait_for("eviction", || store.stats().evictions_total >= 2);
    let s = store.stats();
    assert_eq!((s.entries, s.bytes), (1, file_bytes));
    // Eviction unlinked the files it accounted; the stray stays untouched.
    assert_eq!(files(dir.path()).len(), 2, "{:?}", files(dir.path()));
    assert!(dir.path().join("ccache/fe/fe~~x").exists());
    for k in [key, "fe", "a/b/c"] {
        if store.get("ccache", k).unwrap().is_some() {
            assert!(store.delete("ccache", k).unwrap());
        }
    }
    assert_eq!(store.stats().entries, 0);
}

#[test]
fn eviction_removes_least_recently_used_first() {
    let dir = tempfile::tempdir().unwrap();
    let file_bytes = 1000 + HEADER_BYTES as u64;
    // Four files fit; a fifth crosses the limit and eviction goes to 90%
    // (3.8 files), i.e. two files go.
    let limit = 4 * file_bytes + file_bytes / 4;
    let store = Store::open(StoreConfig {
        store_bytes_max: limit,
        ..config(dir.path())
    })
    .unwrap();
    wait_for("accounting", || store.stats().accounting_complete);
    for key in ["a", "b", "c", "d"] {
        put(&store, "gen", key, &[0u8; 1000]).unwrap();
        std::thread::sleep(Duration::from_millis(5));
    }
    assert_eq!(store.stats().evictions_total, 0);
    // Touch a and b: c and d become the least recently used.
    store.get("gen", "a").unwrap().unwrap();
    std::thread::sleep(Duration::from_millis(5));
    store.get("gen", "b").unwrap().unwrap();
    std::thread::sleep(Duration::from_millis(5));
    put(&store, "gen", "e", &[0u8; 1000]).unwrap();
    wait_for("eviction", || store.stats().evictions_total >= 2);
    let s = store.stats();
    assert_eq!(s.evictions_total, 2);
    assert_eq!(s.evicted_bytes_total, 2 * file_bytes);
    assert_eq!((s.entries, s.bytes), (3, 3 * file_bytes));
    assert!(s.bytes <= limit - limit / 10);
    for (key, present) in [
        ("a", true),
        ("b", true),
        ("c", false),
        ("d", false),
        ("e", true),
    ] {
        assert_eq!(
            store.get("gen", key).unwrap().is_some(),
            present,
            "key {key}"
        );
    }
    assert_eq!(files(dir.path()).len(), 3);
}

#[test]
fn restart_with_a_lower_limit_evicts_in_the_background() {
    let dir = tempfile::tempdir().unwrap();
    let file_bytes = 1000 + HEADER_BYTES as u64;
    {
        let store = Store::open(config(dir.path())).unwrap();
        for i in 0..20 {
            put(&store, "gen", &format!("k{i}"), &[0u8; 1000]).unwrap();
        }
    }
    let limit = 10 * file_bytes;
    let store = Store::open(StoreConfig {
        store_bytes_max: limit,
        ..config(dir.path())
    })
    .unwrap();
    wait_for("accounting", || store.stats().accounting_complete);
    let s = store.stats();
    // Eviction interleaves with the scan (down to 90% whenever over), so the
    // end state is anywhere at or under the limit, with evictions done.
    assert!(s.bytes <= limit && s.evictions_total > 0, "{s:?}");
    assert_eq!(s.entries + s.evictions_total, 20, "{s:?}");
    assert_eq!(files(dir.path()).len() as u64, s.entries);
}

#[test]
fn corrupt_files_are_misses_and_removed() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(config(dir.path())).unwrap();
    type Damage = Box<dyn Fn(&Path)>;
    let cases: Vec<(&str, Damage)> = vec![
        (
            "truncated",
            Box::new(|p: &Path| {
                let f = std::fs::OpenOptions::new().write(true).open(p).unwrap();
                f.set_len(HEADER_BYTES as u64 + 10).unwrap();
            }),
        ),
        (
            "short header",
            Box::new(|p: &Path| std::fs::write(p, b"SLUICEA").unwrap()),
        ),
        (
            "garbage header",
            Box::new(|p: &Path| {
                let f = std::fs::OpenOptions::new().write(true).open(p).unwrap();
                f.write_all_at(b"garbage!", 20).unwrap();
            }),
        ),
        (
            "appended",
            Box::new(|p: &Path| {
                let mut f = std::fs::OpenOptions::new().append(true).open(p).unwrap();
                std::io::Write::write_all(&mut f, b"extra").unwrap();
            }),
        ),
    ];
    for (i, (name, damage)) in cases.iter().enumerate() {
        put(&store, "gen", "victim", &[9u8; 100]).unwrap();
        let path = dir.path().join(relative_path("gen", "victim"));
        damage(&path);
        assert!(store.get("gen", "victim").unwrap().is_none(), "case {name}");
        assert!(!path.exists(), "case {name}: file not removed");
        let s = store.stats();
        assert_eq!(s.corrupt_total, i as u64 + 1, "case {name}");
        assert_eq!((s.entries, s.bytes), (0, 0), "case {name}");
    }
}

#[test]
fn concurrent_puts_of_one_key_leave_one_valid_artifact() {
    for mode in both_modes() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open_with(config(dir.path()), mode).unwrap();
        let bodies: Vec<Vec<u8>> = (0..8u8)
            .map(|i| vec![i; 50_000 + usize::from(i) * 1000])
            .collect();
        std::thread::scope(|s| {
            for body in &bodies {
                let store = store.clone();
                s.spawn(move || {
                    for _ in 0..5 {
                        put(&store, "gen", "contended", body).unwrap();
                    }
                });
            }
        });
        let a = store.get("gen", "contended").unwrap().unwrap();
        let mut a = a;
        let body = read_body(&mut a);
        assert!(bodies.contains(&body));
        assert_eq!(a.sha256, sha(&body));
        let s = store.stats();
        assert_eq!(
            (s.entries, s.bytes),
            (1, body.len() as u64 + HEADER_BYTES as u64)
        );
        assert_eq!(
            files(dir.path()),
            BTreeSet::from([relative_path("gen", "contended")])
        );
    }
}

#[test]
fn store_and_artifacts_outlive_threads() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(config(dir.path())).unwrap();
    let clone = store.clone();
    std::thread::spawn(move || put(&clone, "gen", "k", b"v").unwrap())
        .join()
        .unwrap();
    let mut a = store.get("gen", "k").unwrap().unwrap();
    // The file is header + body; a plain sequential read sees both.
    let mut all = Vec::new();
    a.file.read_to_end(&mut all).unwrap();
    assert_eq!(all.len(), HEADER_BYTES + 1);
    assert_eq!(format::decode_header(&all).unwrap().body_len, 1);
    assert_eq!(all[HEADER_BYTES..], *b"v");
    store.shutdown();
    // Serving continues after the background thread stopped.
    assert_eq!(get_body(&store, "gen", "k").unwrap(), b"v");
}

#[test]
fn error_statuses_and_messages() {
    let io = StoreError::Io(io::Error::other("open /x: boom"));
    let cases: Vec<(StoreError, u16, &str)> = vec![
        (StoreError::InvalidKey, 400, "invalid"),
        (StoreError::NoSpace, 507, "no space"),
        (
            StoreError::DigestMismatch {
                expected: [0; 32],
                actual: [1; 32],
            },
            400,
            "sha256",
        ),
        (
            StoreError::LengthMismatch {
                expected: 5,
                actual: 6,
            },
            400,
            "length 6",
        ),
        (StoreError::TooLarge { limit_bytes: 9 }, 413, "9 bytes"),
        (io, 500, "open /x: boom"),
    ];
    for (err, status, text) in cases {
        assert_eq!(err.status(), status, "{err}");
        assert!(err.to_string().contains(text), "{err} lacks {text}");
    }
}

/// A tmpfs of `size`, unmounted on drop. None (with a loud note) where
/// mounting is not permitted.
struct TinyFs {
    dir: tempfile::TempDir,
}

impl TinyFs {
    fn mount(size: &str) -> Option<TinyFs> {
        let dir = tempfile::tempdir().ok()?;
        let status = std::process::Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(dir.path())
            .stderr(std::process::Stdio::null())
            .status();
        if status.is_ok_and(|s| s.success()) {
            Some(TinyFs { dir })
        } else {
            eprintln!(
                "SKIPPED: cannot mount a tmpfs here (needs root); ENOSPC not tested for real"
            );
            None
        }
    }
}

impl Drop for TinyFs {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount")
            .arg(self.dir.path())
            .status();
    }
}

#[test]
fn enospc_answers_507_and_leaves_nothing_visible() {
    for mode in both_modes() {
        let Some(fs) = TinyFs::mount("1m") else {
            return;
        };
        let root = fs.dir.path().join("data");
        let store = Store::open_with(config(&root), mode).unwrap();
        put(&store, "gen", "small", &[1u8; 1000]).unwrap();
        let before = files(&root);

        // Announced length: refused up front by the space reservation.
        let opts = PutOptions {
            expected_len: Some(4 << 20),
            ..Default::default()
        };
        let err = store.begin_put("gen", "big", opts).unwrap_err();
        assert!(matches!(err, StoreError::NoSpace), "{mode:?}: {err:?}");
        assert_eq!(err.status(), 507);

        // Streamed without a length: fails at some write or at commit.
        let mut w = store
            .begin_put("gen", "big", PutOptions::default())
            .unwrap();
        let chunk = vec![5u8; 64 * 1024];
        let mut result = Ok(());
        for _ in 0..64 {
            result = w.write(&chunk);
            if result.is_err() {
                break;
            }
        }
        let err = match result {
            Err(e) => {
                drop(w);
                e
            }
            Ok(()) => w.commit().unwrap_err(),
        };
        assert!(matches!(err, StoreError::NoSpace), "{mode:?}: {err:?}");
        assert_eq!(err.status(), 507);
        assert_eq!(
            files(&root),
            before,
            "{mode:?}: something half-written is visible"
        );
        assert!(store.get("gen", "big").unwrap().is_none());
        // The space comes back once the writer is gone, and the store works.
        put(&store, "gen", "after", &[2u8; 1000]).unwrap();
        assert_eq!(get_body(&store, "gen", "small").unwrap(), vec![1u8; 1000]);
        store.shutdown();
        drop(store);
    }
}

#[test]
fn open_cache_hits_and_never_serves_a_replaced_or_deleted_artifact() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(config(dir.path())).unwrap();
    let mut cache = OpenCache::new(2);
    let cached_body = |store: &Store, cache: &mut OpenCache, key: &str| {
        store
            .get_cached("ns", key, cache)
            .unwrap()
            .map(|mut a| read_body(&mut a))
    };
    put(&store, "ns", "a", b"first").unwrap();
    assert_eq!(
        cached_body(&store, &mut cache, "a").as_deref(),
        Some(&b"first"[..])
    );
    assert_eq!((cache.hits_total, cache.misses_total), (0, 1));
    assert_eq!(
        cached_body(&store, &mut cache, "a").as_deref(),
        Some(&b"first"[..])
    );
    assert_eq!((cache.hits_total, cache.misses_total), (1, 1));

    // A replacement moves the shard's epoch: the next lookup reopens.
    put(&store, "ns", "a", b"second version").unwrap();
    assert_eq!(
        cached_body(&store, &mut cache, "a").as_deref(),
        Some(&b"second version"[..])
    );
    assert_eq!(cache.misses_total, 2);

    // A delete is never answered from the cache.
    assert!(store.delete("ns", "a").unwrap());
    assert_eq!(cached_body(&store, &mut cache, "a"), None);
    assert!(cache.is_empty(), "a miss drops the entry");

    // The bound holds, and a sweep closes entries whose shard changed.
    for key in ["b", "c", "d"] {
        put(&store, "ns", key, key.as_bytes()).unwrap();
        assert_eq!(
            cached_body(&store, &mut cache, key).as_deref(),
            Some(key.as_bytes())
        );
        assert!(cache.len() <= 2);
    }
    for key in ["b", "c", "d"] {
        store.delete("ns", key).unwrap();
    }
    store.sweep_cache(&mut cache);
    assert!(
        cache.is_empty(),
        "deleted artifacts' fds are closed by the sweep"
    );

    // Capacity 0 disables caching but still serves.
    let mut off = OpenCache::new(0);
    put(&store, "ns", "e", b"e").unwrap();
    assert_eq!(
        cached_body(&store, &mut off, "e").as_deref(),
        Some(&b"e"[..])
    );
    assert!(off.is_empty());
}

/// A cache hit shares the cached descriptor: no `dup` per request (it was
/// one `fcntl` and one `close` per small GET before), and the descriptor
/// stays open for a request that holds it after the cache let it go.
#[test]
fn open_cache_hit_shares_the_descriptor() {
    use std::os::fd::AsRawFd;
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(config(dir.path())).unwrap();
    let mut cache = OpenCache::new(4);
    put(&store, "ns", "a", b"shared").unwrap();
    let first = store.get_cached("ns", "a", &mut cache).unwrap().unwrap();
    let second = store.get_cached("ns", "a", &mut cache).unwrap().unwrap();
    assert_eq!(cache.hits_total, 1);
    assert_eq!(first.file.as_raw_fd(), second.file.as_raw_fd());
    assert!(std::sync::Arc::ptr_eq(&first.file, &second.file));

    store.delete("ns", "a").unwrap();
    store.sweep_cache(&mut cache);
    assert!(cache.is_empty());
    let mut held = second;
    assert_eq!(read_body(&mut held), b"shared");
    drop(first);
}

fn put_at(store: &Store, key: &str, data: &[u8], t: u64, lww: bool) -> Committed {
    let options = PutOptions {
        write_time_ms: Some(t),
        last_writer_wins: lww,
        ..Default::default()
    };
    let mut w = store.begin_put("g", key, options).unwrap();
    w.write(data).unwrap();
    w.commit().unwrap()
}

/// Last-writer-wins is decided under the key's lock at commit: an older
/// replicated write, or one older than the key's tombstone, changes nothing.
#[test]
fn last_writer_wins_and_tombstones() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(config(dir.path())).unwrap();
    put_at(&store, "k", b"new", 2_000, false);
    // Older: superseded, the local version stays.
    let c = put_at(&store, "k", b"old", 1_000, true);
    assert!(c.superseded);
    let a = store.get("g", "k").unwrap().unwrap();
    assert_eq!((a.write_time_ms().unwrap(), a.len), (2_000, 3));
    // Newer: published.
    assert!(!put_at(&store, "k", b"newest", 3_000, true).superseded);
    assert_eq!(store.get("g", "k").unwrap().unwrap().len, 6);

    // A replicated delete older than the artifact is kept out.
    assert_eq!(
        store.delete_at("g", "k", 2_500, false).unwrap(),
        DeleteAt::Kept
    );
    assert!(store.get("g", "k").unwrap().is_some());
    // A newer one deletes and leaves a tombstone.
    assert_eq!(
        store.delete_at("g", "k", 4_000, false).unwrap(),
        DeleteAt::Deleted {
            existed: true,
            time_ms: 4_000
        }
    );
    assert!(store.get("g", "k").unwrap().is_none());
    assert_eq!(store.tombstone_time("g", "k"), Some(4_000));
    // A replicated write from before the delete cannot resurrect it.
    assert!(put_at(&store, "k", b"stale", 3_500, true).superseded);
    assert!(store.get("g", "k").unwrap().is_none());
    // A client's write does, and clears the tombstone.
    assert!(!put_at(&store, "k", b"again", 5_000, false).superseded);
    assert_eq!(store.tombstone_time("g", "k"), None);

    // A client's delete always wins, even over a write time from the future.
    // Year 2100: a peer whose clock runs far ahead.
    put_at(&store, "f", b"future", 4_102_444_800_000, true);
    match store.delete_at("g", "f", 1, true).unwrap() {
        DeleteAt::Deleted {
            existed: true,
            time_ms,
        } => assert!(time_ms > 4_102_444_800_000),
        other => panic!("{other:?}"),
    }
    // ... and a client's delete of nothing leaves no tombstone.
    assert_eq!(
        store.delete_at("g", "none", 7, true).unwrap(),
        DeleteAt::Deleted {
            existed: false,
            time_ms: 7
        }
    );
    assert_eq!(store.tombstone_time("g", "none"), None);

    // Expiry drops tombstones older than the cutoff only.
    store.delete_at("g", "old", 10_000, false).unwrap();
    store.delete_at("g", "young", 20_000, false).unwrap();
    assert_eq!(store.expire_tombstones(15_000), 1);
    assert_eq!(store.tombstone_time("g", "old"), None);
    assert_eq!(store.tombstone_time("g", "young"), Some(20_000));
    store.shutdown();
}

/// The first write into a namespace makes all 256 of its shard directories
/// with one directory sync, so later first writes into a shard sync
/// nothing for their directory (a fresh peer synced one per new shard,
/// dozens in a row per batch of replicated writes).
#[test]
fn a_new_namespace_gets_every_shard_at_once() {
    let tmp = tempfile::tempdir().unwrap();
    let store = Store::open(config(tmp.path())).unwrap();
    put(&store, "fresh", "k", b"body").unwrap();
    let shards: Vec<String> = std::fs::read_dir(tmp.path().join("fresh"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert_eq!(shards.len(), 256, "{shards:?}");
    for key in ["a", "b", "0123", "ff00", "zz"] {
        put(&store, "fresh", key, key.as_bytes()).unwrap();
        assert_eq!(
            get_body(&store, "fresh", key).as_deref(),
            Some(key.as_bytes())
        );
    }
}
