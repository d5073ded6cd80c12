//! Tests of group commit and the commit journal, on real files.
//!
//! A kill -9 loses nothing the kernel has (the page cache survives it), so
//! the crash tests here stand in for a power cut: the store is dropped with
//! no final checkpoint, as a crash leaves it, and then what a power cut can
//! do to writes no sync covered is done by hand (an artifact file's bytes
//! never reached the disk, its rename never did, a record was cut). The
//! restart must bring back every acknowledged write, whole.

use super::*;
use std::collections::BTreeMap;

fn config(dir: &Path) -> StoreConfig {
    StoreConfig {
        data_dir: dir.to_path_buf(),
        store_bytes_max: 0,
        fsync: FsyncPolicy::Always,
    }
}

fn writer(store: &Store, ns: &str, key: &str, data: &[u8]) -> PutWriter {
    let mut w = store.begin_put(ns, key, PutOptions::default()).unwrap();
    w.write(data).unwrap();
    w
}

fn put(store: &Store, ns: &str, key: &str, data: &[u8]) -> Committed {
    writer(store, ns, key, data).commit().unwrap()
}

fn body(store: &Store, ns: &str, key: &str) -> Option<Vec<u8>> {
    let a = store.get(ns, key).unwrap()?;
    let mut out = vec![0u8; usize::try_from(a.len).unwrap()];
    a.file.read_exact_at(&mut out, a.body_offset).unwrap();
    Some(out)
}

/// Drops the store as a crash would leave it: no final checkpoint, so the
/// journal's segments stay for the next open to replay.
fn crash(store: Store) {
    if let Some(journal) = store.shared().journal.get() {
        journal.final_checkpoint.store(false, Ordering::Release);
    }
    drop(store);
}

/// What a power cut does to an artifact whose data no sync covered: the
/// name is there, the bytes are zeros.
fn lose_data(dir: &Path, ns: &str, key: &str) {
    let path = dir.join(relative_path(ns, key));
    let len = std::fs::metadata(&path).unwrap().len();
    std::fs::write(&path, vec![0u8; usize::try_from(len).unwrap()]).unwrap();
}

/// ...or its rename never reached the disk.
fn lose_name(dir: &Path, ns: &str, key: &str) {
    std::fs::remove_file(dir.join(relative_path(ns, key))).unwrap();
}

fn segments(dir: &Path) -> Vec<PathBuf> {
    let mut out: Vec<PathBuf> = std::fs::read_dir(dir.join(JOURNAL_DIR))
        .map(|rd| rd.flatten().map(|e| e.path()).collect())
        .unwrap_or_default();
    out.sort();
    out
}

fn data(seed: u8, len: usize) -> Vec<u8> {
    (0..len)
        .map(|i| seed.wrapping_add((i % 251) as u8))
        .collect()
}

#[test]
fn small_uploads_go_through_the_journal_and_large_ones_sync_their_files() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(config(dir.path())).unwrap();
    let small = data(1, 4096);
    let large = data(2, JOURNAL_FILE_BYTES_MAX as usize + 1);
    put(&store, "ns", "small", &small);
    put(&store, "ns", "large", &large);
    let stats = store.sync_stats();
    let journal = stats.journal.unwrap();
    assert_eq!(journal.puts_total, 1);
    assert_eq!(
        journal.markers_total, 1,
        "the large one orders itself with a marker"
    );
    assert_eq!(stats.file_syncs_total, 1);
    assert_eq!((stats.dir_syncs_total, stats.dir_renames_total), (1, 1));
    assert_eq!(body(&store, "ns", "small").unwrap(), small);
    assert_eq!(body(&store, "ns", "large").unwrap(), large);

    // A checkpoint makes the files themselves durable and empties the journal.
    store
        .shared()
        .journal
        .get()
        .unwrap()
        .checkpoint(store.shared())
        .unwrap();
    let journal = store.sync_stats().journal.unwrap();
    assert_eq!((journal.checkpoints_total, journal.bytes), (1, 0));
    assert_eq!(segments(dir.path()).len(), 1, "only the new, empty segment");
}

#[test]
fn fsync_never_has_no_journal_and_syncs_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(StoreConfig {
        fsync: FsyncPolicy::Never,
        ..config(dir.path())
    })
    .unwrap();
    put(&store, "ns", "k", b"hello");
    let stats = store.sync_stats();
    assert_eq!(stats, SyncStats::default());
    assert!(segments(dir.path()).is_empty());
}

#[test]
fn a_batch_commits_each_in_order_and_one_failure_fails_only_itself() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(config(dir.path())).unwrap();
    let bodies: Vec<Vec<u8>> = (0..20u8)
        .map(|i| {
            data(
                i,
                if i % 5 == 0 {
                    300_000
                } else {
                    1000 + usize::from(i)
                },
            )
        })
        .collect();
    let mut writers: Vec<PutWriter> = bodies
        .iter()
        .enumerate()
        .map(|(i, b)| writer(&store, "batch", &format!("k{i}"), b))
        .collect();
    // One that promised another digest: refused, nothing stored.
    let mut bad = store
        .begin_put(
            "batch",
            "bad",
            PutOptions {
                expected_sha256: Some([7; 32]),
                ..PutOptions::default()
            },
        )
        .unwrap();
    bad.write(b"not that").unwrap();
    writers.insert(3, bad);
    // One begun on another store is refused too.
    let other_dir = tempfile::tempdir().unwrap();
    let other = Store::open(config(other_dir.path())).unwrap();
    writers.push(writer(&other, "batch", "elsewhere", b"x"));

    let results = store.commit_batch(writers);
    assert_eq!(results.len(), 22);
    assert!(matches!(results[3], Err(StoreError::DigestMismatch { .. })));
    assert!(results[21].is_err());
    let ok: Vec<&Committed> = results.iter().filter_map(|r| r.as_ref().ok()).collect();
    assert_eq!(ok.len(), 20);
    for (i, b) in bodies.iter().enumerate() {
        let at = if i < 3 { i } else { i + 1 };
        let committed = results[at].as_ref().unwrap();
        assert_eq!(committed.sha256, <[u8; 32]>::from(Sha256::digest(b)));
        assert_eq!(body(&store, "batch", &format!("k{i}")).as_ref(), Some(b));
    }
    assert!(store.get("batch", "bad").unwrap().is_none());
    assert!(other.get("batch", "elsewhere").unwrap().is_none());
    let stats = store.sync_stats();
    let journal = stats.journal.unwrap();
    assert_eq!(journal.puts_total, 16);
    assert!(
        journal.syncs_total <= 2,
        "one journal sync covers the batch: {journal:?}"
    );
    assert_eq!(stats.file_syncs_total, 4, "the four large ones");
    assert!(stats.dir_syncs_total <= 4);
}

#[test]
fn concurrent_commits_share_journal_syncs() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(config(dir.path())).unwrap();
    let threads: Vec<_> = (0..8)
        .map(|t| {
            let store = store.clone();
            std::thread::spawn(move || {
                for i in 0..40 {
                    put(&store, "conc", &format!("t{t}-{i}"), &data(t, 4096));
                }
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
    let journal = store.sync_stats().journal.unwrap();
    assert_eq!(journal.puts_total, 320);
    assert!(journal.syncs_total <= 320, "{journal:?}");
    for t in 0..8u8 {
        for i in 0..40 {
            assert_eq!(
                body(&store, "conc", &format!("t{t}-{i}")).unwrap(),
                data(t, 4096)
            );
        }
    }
}

/// The power-cut test: every acknowledged write comes back whole.
#[test]
fn a_crash_replays_every_acknowledged_small_write() {
    let dir = tempfile::tempdir().unwrap();
    let mut expected: BTreeMap<String, Vec<u8>> = BTreeMap::new();
    {
        let store = Store::open(config(dir.path())).unwrap();
        for i in 0..30u8 {
            let b = data(i, 100 + 997 * usize::from(i));
            put(&store, "crash", &format!("k{i}"), &b);
            expected.insert(format!("k{i}"), b);
        }
        crash(store);
    }
    assert_eq!(segments(dir.path()).len(), 1);
    // None of these files was synced: lose what a power cut may lose.
    for i in 0..30 {
        match i % 3 {
            0 => lose_data(dir.path(), "crash", &format!("k{i}")),
            1 => lose_name(dir.path(), "crash", &format!("k{i}")),
            _ => {} // this one happened to be written back in time
        }
    }
    // And a record the crash cut in the middle (never acknowledged).
    let seg = segments(dir.path()).pop().unwrap();
    let mut torn = journal::Head {
        seq: 999,
        kind: journal::Kind::Put,
        lww: false,
        write_time_ms: 1,
        file_len: 100,
        body_len: 36,
        sha256: [1; 32],
    }
    .encode("crash/00/torn");
    torn.extend_from_slice(&[9u8; 20]);
    let mut f = std::fs::OpenOptions::new().append(true).open(&seg).unwrap();
    std::io::Write::write_all(&mut f, &torn).unwrap();
    drop(f);

    let store = Store::open(config(dir.path())).unwrap();
    for (key, b) in &expected {
        assert_eq!(body(&store, "crash", key).as_ref(), Some(b), "{key}");
    }
    assert!(store.get("crash", "torn").unwrap().is_none());
    assert_eq!(
        segments(dir.path()).len(),
        1,
        "the replayed segments are gone; a fresh one is open"
    );
    assert_eq!(store.stats().corrupt_total, 0);
}

/// Versions of one key replay to the last one that was visible: a put after
/// a larger (per-file) version, a delete, a put again.
#[test]
fn a_crash_replays_each_key_to_its_last_version() {
    let dir = tempfile::tempdir().unwrap();
    let large = data(3, JOURNAL_FILE_BYTES_MAX as usize + 10);
    {
        let store = Store::open(config(dir.path())).unwrap();
        // small, then large: the large one (synced, with its marker) stays.
        put(&store, "v", "a", b"small a");
        put(&store, "v", "a", &large);
        // large, then small: the small one is restored.
        put(&store, "v", "b", &large);
        put(&store, "v", "b", b"small b");
        // put, then delete: stays deleted.
        put(&store, "v", "c", b"small c");
        assert!(store.delete("v", "c").unwrap());
        // delete, then put: comes back.
        put(&store, "v", "d", b"small d1");
        assert!(store.delete("v", "d").unwrap());
        put(&store, "v", "d", b"small d2");
        crash(store);
    }
    lose_data(dir.path(), "v", "b");
    lose_name(dir.path(), "v", "d");
    // `c`'s unlink never reached the disk: its file is back, stale.
    std::fs::write(dir.path().join(relative_path("v", "c")), b"stale").unwrap();

    let store = Store::open(config(dir.path())).unwrap();
    assert_eq!(body(&store, "v", "a").unwrap(), large);
    assert_eq!(body(&store, "v", "b").unwrap(), b"small b");
    assert!(store.get("v", "c").unwrap().is_none());
    assert_eq!(body(&store, "v", "d").unwrap(), b"small d2");
}

/// A marker whose rename was lost (no 2xx was sent for it) leaves the
/// earlier small version, which is checked and restored if it was torn.
#[test]
fn a_lost_large_rename_falls_back_to_the_earlier_small_version() {
    let dir = tempfile::tempdir().unwrap();
    let large = data(4, JOURNAL_FILE_BYTES_MAX as usize + 10);
    let small_file;
    {
        let store = Store::open(config(dir.path())).unwrap();
        put(&store, "m", "k", b"the small one");
        small_file = std::fs::read(dir.path().join(relative_path("m", "k"))).unwrap();
        put(&store, "m", "k", &large);
        crash(store);
    }
    // The large rename is lost: the small version's file is back, and its
    // data was never synced either.
    let path = dir.path().join(relative_path("m", "k"));
    let mut zeroed = small_file[..HEADER_BYTES].to_vec();
    zeroed.resize(small_file.len(), 0);
    std::fs::write(&path, zeroed).unwrap();
    let store = Store::open(config(dir.path())).unwrap();
    assert_eq!(body(&store, "m", "k").unwrap(), b"the small one");
}

/// A replicated (last-writer-wins) write that lost to a newer local one is
/// not brought back by a replay.
#[test]
fn a_replay_keeps_last_writer_wins() {
    let dir = tempfile::tempdir().unwrap();
    {
        let store = Store::open(config(dir.path())).unwrap();
        let mut w = store
            .begin_put(
                "l",
                "k",
                PutOptions {
                    write_time_ms: Some(2_000),
                    last_writer_wins: true,
                    ..PutOptions::default()
                },
            )
            .unwrap();
        w.write(b"new").unwrap();
        assert!(!w.commit().unwrap().superseded);
        let mut w = store
            .begin_put(
                "l",
                "k",
                PutOptions {
                    write_time_ms: Some(1_000),
                    last_writer_wins: true,
                    ..PutOptions::default()
                },
            )
            .unwrap();
        w.write(b"old").unwrap();
        assert!(w.commit().unwrap().superseded);
        crash(store);
    }
    let store = Store::open(config(dir.path())).unwrap();
    assert_eq!(body(&store, "l", "k").unwrap(), b"new");
}

/// A replicated write that lost to a local one leaves its record after the
/// winner's; a crash that took the winner's bytes must restore the winner,
/// not the loser that came later in the journal.
#[test]
fn a_replay_restores_the_winner_not_a_later_loser() {
    let dir = tempfile::tempdir().unwrap();
    let lww = |time: u64| PutOptions {
        write_time_ms: Some(time),
        last_writer_wins: true,
        ..PutOptions::default()
    };
    {
        let store = Store::open(config(dir.path())).unwrap();
        let mut w = store.begin_put("l", "k", lww(2_000)).unwrap();
        w.write(b"the winner").unwrap();
        assert!(!w.commit().unwrap().superseded);
        let mut w = store.begin_put("l", "k", lww(1_000)).unwrap();
        w.write(b"the loser").unwrap();
        assert!(w.commit().unwrap().superseded);
        // And a replicated write older than a delete stays deleted.
        let mut w = store.begin_put("l", "gone", lww(3_000)).unwrap();
        w.write(b"before the delete").unwrap();
        w.commit().unwrap();
        assert!(matches!(
            store.delete_at("l", "gone", 5_000, false).unwrap(),
            DeleteAt::Deleted { existed: true, .. }
        ));
        let mut w = store.begin_put("l", "gone", lww(4_000)).unwrap();
        w.write(b"older than the delete").unwrap();
        assert!(w.commit().unwrap().superseded);
        crash(store);
    }
    lose_data(dir.path(), "l", "k");
    let store = Store::open(config(dir.path())).unwrap();
    assert_eq!(body(&store, "l", "k").unwrap(), b"the winner");
    assert!(store.get("l", "gone").unwrap().is_none());
}

#[test]
fn a_full_journal_sends_uploads_down_the_per_file_path() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(config(dir.path())).unwrap();
    let journal = store.shared().journal.get().unwrap();
    journal.paused.store(true, Ordering::Release);
    journal.bytes_max.store(10_000, Ordering::Relaxed);
    for i in 0..5 {
        put(&store, "full", &format!("k{i}"), &data(i, 3000));
    }
    let stats = store.sync_stats();
    let j = stats.journal.unwrap();
    assert_eq!(j.puts_total, 3, "three 3 KiB records fit in 10,000 bytes");
    assert_eq!(j.full_total, 2);
    assert_eq!(stats.file_syncs_total, 2);
    // A checkpoint frees the room.
    journal.checkpoint(store.shared()).unwrap();
    put(&store, "full", "after", &data(9, 3000));
    assert_eq!(store.sync_stats().journal.unwrap().puts_total, 4);
    for i in 0..5 {
        assert_eq!(
            body(&store, "full", &format!("k{i}")).unwrap(),
            data(i, 3000)
        );
    }
}

#[test]
fn records_round_trip_and_damage_is_refused() {
    let head = journal::Head {
        seq: 42,
        kind: journal::Kind::Marker,
        lww: true,
        write_time_ms: 1_700_000_000_000,
        file_len: 0,
        body_len: 12345,
        sha256: [5; 32],
    };
    let bytes = head.encode("ns/ab/key");
    let (decoded, path_len) = journal::Head::decode(&bytes).unwrap();
    assert_eq!((decoded, path_len), (head, 9));
    for i in 0..bytes.len() {
        let mut bad = bytes.clone();
        bad[i] ^= 0x40;
        let intact = journal::Head::decode(&bad)
            .is_some_and(|(_, n)| n == 9 && journal::Head::check(&bad, &bad[88..]));
        assert!(!intact, "flipping byte {i} went unnoticed");
    }
}

#[test]
fn write_back_starts_every_few_mib_here_or_by_the_caller() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(config(dir.path())).unwrap();
    let chunk = vec![1u8; 1 << 20];
    // Deferred: the caller is told which ranges to start, each once.
    let mut w = store
        .begin_put("wb", "deferred", PutOptions::default())
        .unwrap();
    w.defer_writeback();
    let mut started = Vec::new();
    for _ in 0..10 {
        w.write(&chunk).unwrap();
        if let Some((fd, offset, len)) = w.take_writeback() {
            drop(fd);
            started.push((offset, len));
        }
    }
    assert_eq!(started.len(), 2, "{started:?}");
    assert_eq!(started[0].0, 0);
    assert_eq!(started[1].0, started[0].1, "contiguous ranges");
    assert!(started.iter().all(|(_, len)| *len >= WRITEBACK_BYTES));
    assert!(w.take_writeback().is_none());
    w.commit().unwrap();
    // Inline (the default): the same body, started by the writer itself.
    let mut w = store
        .begin_put("wb", "inline", PutOptions::default())
        .unwrap();
    for _ in 0..10 {
        w.write(&chunk).unwrap();
        assert!(w.take_writeback().is_none());
    }
    w.commit().unwrap();
    assert_eq!(body(&store, "wb", "inline").unwrap().len(), 10 << 20);
}

/// Two processes on one data directory (a binary upgrade hands the
/// listeners over while both serve): the new one's open leaves the old
/// one's live segments alone, and they are replayed once nobody holds them.
#[test]
fn a_second_store_leaves_a_live_journal_alone() {
    let dir = tempfile::tempdir().unwrap();
    let old = Store::open(config(dir.path())).unwrap();
    put(&old, "up", "before", b"written by the old process");
    let new = Store::open(config(dir.path())).unwrap();
    assert_eq!(segments(dir.path()).len(), 2, "each has its own segment");
    put(&old, "up", "during", b"the old one still serves");
    put(&new, "up", "new", b"and so does the new one");
    crash(old);
    // The old process's writes lose their bytes; its journal is still there.
    lose_data(dir.path(), "up", "before");
    lose_name(dir.path(), "up", "during");
    drop(new);
    let after = Store::open(config(dir.path())).unwrap();
    assert_eq!(
        body(&after, "up", "before").unwrap(),
        b"written by the old process"
    );
    assert_eq!(
        body(&after, "up", "during").unwrap(),
        b"the old one still serves"
    );
    assert_eq!(
        body(&after, "up", "new").unwrap(),
        b"and so does the new one"
    );
}
