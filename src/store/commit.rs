//! Group commit: how finished uploads become durable, then visible, with
//! one sync covering many of them.
//!
//! A commit runs in three steps, for one upload ([`PutWriter::commit`]) or
//! for a batch ([`Store::commit_batch`]) alike:
//!
//! 1. **Durable data.** Under `fsync = always`, a small artifact (at most
//!    [`super::JOURNAL_FILE_BYTES_MAX`] bytes) is copied into the commit
//!    journal and waits for a journal sync, which covers every record
//!    appended before it began, from every thread; a larger one is
//!    `fdatasync`ed in its own file, by its own thread (the engines'
//!    publisher pools and the fallback's blocking pool have many commits in
//!    flight at once; a batch syncs its large files in parallel).
//! 2. **Publish.** Under the key's index lock: the last-writer-wins and
//!    journal-order checks, a marker record for a per-file upload, the
//!    rename over the key, the index. Nothing is visible before its data is
//!    durable.
//! 3. **Durable name.** A journaled upload needs nothing more: its record
//!    replays the rename after a crash. A per-file upload's directory is
//!    synced, one `fsync` per directory covering every rename into it done
//!    before that `fsync` began ([`DirSyncs`]), and its marker waits for a
//!    journal sync.
//!
//! Only then does the commit return, and only then does the front end send
//! its 2xx.

use super::journal::{Appended, Head, Kind};
use super::*;
use crate::group_sync::{GroupSync, Ticket};
use std::collections::HashMap;

/// Most threads one batch uses to sync its per-file uploads at once.
pub const BATCH_SYNC_THREADS_MAX: usize = 8;
/// Syncs of one directory in flight at once (see `group_sync`).
pub const DIR_SYNCS_IN_FLIGHT: usize = 2;

/// A finished upload whose temp file is complete (header, body, write
/// time): not yet durable, not yet visible.
pub(super) struct Prepared {
    writer: PutWriter,
    sha256: [u8; 32],
    write_time_ms: u64,
    size_bytes: u64,
    /// The put record that makes it durable, when it went through the
    /// journal.
    journaled: Option<Appended>,
}

impl Prepared {
    pub(super) fn new(
        writer: PutWriter,
        sha256: [u8; 32],
        write_time_ms: u64,
        size_bytes: u64,
    ) -> Prepared {
        Prepared {
            writer,
            sha256,
            write_time_ms,
            size_bytes,
            journaled: None,
        }
    }

    fn head(&self, kind: Kind) -> Head {
        Head {
            seq: 0,
            kind,
            lww: self.writer.last_writer_wins,
            write_time_ms: self.write_time_ms,
            file_len: if kind == Kind::Put {
                self.size_bytes
            } else {
                0
            },
            body_len: self.writer.body_len,
            sha256: self.sha256,
        }
    }

    fn committed(&self, replaced: bool, superseded: bool) -> Committed {
        Committed {
            len: self.writer.body_len,
            sha256: self.sha256,
            replaced,
            write_time_ms: self.write_time_ms,
            superseded,
        }
    }
}

/// A published upload and what its durability still waits for.
struct Published {
    committed: Committed,
    /// A per-file upload's directory sync.
    dir: Option<(Arc<GroupSync>, Ticket, PutWriter)>,
    /// A per-file upload's marker record.
    marker: Option<Appended>,
}

/// The directory syncs in flight, one [`GroupSync`] per directory that has
/// renames waiting; a directory's entry is dropped when nothing waits on it,
/// so the table holds at most one entry per commit in flight.
#[derive(Default)]
pub(super) struct DirSyncs {
    groups: Mutex<HashMap<Box<str>, Arc<GroupSync>>>,
    syncs_total: AtomicU64,
    renames_total: AtomicU64,
}

impl DirSyncs {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<Box<str>, Arc<GroupSync>>> {
        self.groups.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// A rename into `dir_rel` has happened: the directory's next sync
    /// covers it.
    fn register(&self, dir_rel: &str) -> (Arc<GroupSync>, Ticket) {
        self.renames_total.fetch_add(1, Ordering::Relaxed);
        let group = Arc::clone(
            self.lock()
                .entry(dir_rel.into())
                .or_insert_with(|| Arc::new(GroupSync::with_syncs_in_flight(DIR_SYNCS_IN_FLIGHT))),
        );
        let ticket = group.register();
        (group, ticket)
    }

    /// Returns once the rename behind `ticket` is durable: a directory
    /// sync (of `dir_fd`) that began after it completed.
    fn wait(
        &self,
        sh: &Shared,
        dir_rel: &str,
        group: Arc<GroupSync>,
        ticket: Ticket,
        dir_fd: &OwnedFd,
    ) -> Result<(), StoreError> {
        let result = group.wait(ticket, || {
            self.syncs_total.fetch_add(1, Ordering::Relaxed);
            rustix::fs::fsync(dir_fd)
                .map_err(|e| sh.errno("fsync directory", &sh.path(dir_rel).display(), e))
        });
        let mut groups = self.lock();
        // Two holders: the table and this thread. Anyone else holds a clone
        // and has registered, so the group is not idle for them.
        if Arc::strong_count(&group) == 2 && group.is_idle() {
            groups.remove(dir_rel);
        }
        result
    }

    /// `(directory fsyncs, renames they covered)` so far.
    pub(super) fn totals(&self) -> (u64, u64) {
        (
            self.syncs_total.load(Ordering::Relaxed),
            self.renames_total.load(Ordering::Relaxed),
        )
    }
}

/// Per-file data syncs done by commits (not the journal's).
#[derive(Default)]
pub(super) struct FileSyncs {
    pub total: AtomicU64,
}

/// Commits `writers` (all of one store) and answers each, in order.
pub(super) fn commit_all(writers: Vec<PutWriter>) -> Vec<Result<Committed, StoreError>> {
    let Some(sh) = writers.first().map(|w| Arc::clone(&w.shared)) else {
        return Vec::new();
    };
    let mut items: Vec<Result<Prepared, StoreError>> =
        writers.into_iter().map(PutWriter::prepare).collect();
    if sh.fsync == FsyncPolicy::Always {
        make_data_durable(&sh, &mut items);
    }
    let published: Vec<Result<Published, StoreError>> = items
        .into_iter()
        .map(|item| item.and_then(|p| publish(&sh, p)))
        .collect();
    let results = published
        .into_iter()
        .map(|item| item.and_then(|p| make_name_durable(&sh, p)))
        .collect();
    if sh.over_limit() {
        sh.wake();
    }
    results
}

/// Step 1: journal the small ones (one wait covers the batch) and sync the
/// others' files, several at once.
fn make_data_durable(sh: &Arc<Shared>, items: &mut [Result<Prepared, StoreError>]) {
    let journal = sh.journal.get();
    let mut own = Vec::new();
    for (i, item) in items.iter_mut().enumerate() {
        let Ok(p) = item else { continue };
        p.journaled = journal
            .and_then(|j| j.append_put(sh, &p.writer.rel, p.head(Kind::Put), &p.writer.file));
        if p.journaled.is_none() {
            own.push(i);
        }
    }
    sync_own_files(sh, items, &own);
    let Some(journal) = journal else { return };
    for item in items.iter_mut() {
        let Ok(p) = item else { continue };
        let Some(appended) = p.journaled.take() else {
            continue;
        };
        match journal.wait(sh, &appended) {
            Ok(()) => p.journaled = Some(appended),
            Err(e) => {
                journal.finish(&p.writer.rel, appended, true);
                *item = Err(e);
            }
        }
    }
}

/// `fdatasync` the files of `items[own]`: inline for one, on up to
/// [`BATCH_SYNC_THREADS_MAX`] threads for more (the device works on
/// several syncs at once, and merges their cache flushes).
fn sync_own_files(sh: &Shared, items: &mut [Result<Prepared, StoreError>], own: &[usize]) {
    let sync = |p: &Prepared| -> Result<(), StoreError> {
        sh.file_syncs.total.fetch_add(1, Ordering::Relaxed);
        rustix::fs::fdatasync(&p.writer.file)
            .map_err(|e| sh.errno("fdatasync", &p.writer.path().display(), e))
    };
    let outcomes: Vec<(usize, Result<(), StoreError>)> = if own.len() <= 1 {
        own.iter()
            .filter_map(|&i| match &items[i] {
                Ok(p) => Some((i, sync(p))),
                Err(_) => None,
            })
            .collect()
    } else {
        let next = AtomicU64::new(0);
        let items_ref = &*items;
        let threads = own.len().min(BATCH_SYNC_THREADS_MAX);
        std::thread::scope(|scope| {
            let handles: Vec<_> = (0..threads)
                .map(|_| {
                    scope.spawn(|| {
                        let mut out = Vec::new();
                        loop {
                            let n = next.fetch_add(1, Ordering::Relaxed) as usize;
                            let Some(&i) = own.get(n) else { break };
                            if let Ok(p) = &items_ref[i] {
                                out.push((i, sync(p)));
                            }
                        }
                        out
                    })
                })
                .collect();
            handles
                .into_iter()
                .flat_map(|h| h.join().unwrap_or_default())
                .collect()
        })
    };
    for (i, outcome) in outcomes {
        if let Err(e) = outcome {
            items[i] = Err(e);
        }
    }
}

/// Step 2: the rename, under the key's index lock.
fn publish(sh: &Arc<Shared>, mut p: Prepared) -> Result<Published, StoreError> {
    let journal = sh.journal.get();
    let journaled = p.journaled.take();
    let journal_seq = journaled.as_ref().map(|a| a.seq);
    let result = publish_inner(sh, &mut p, journal_seq);
    if let (Some(journal), Some(appended)) = (journal, journaled) {
        journal.finish(&p.writer.rel, appended, true);
    }
    let (committed, renamed, marker) = result?;
    // A per-file upload's rename must reach the disk through its directory.
    let dir = (renamed && sh.fsync == FsyncPolicy::Always && journal_seq.is_none()).then(|| {
        let (group, ticket) = sh.dir_syncs.register(&p.writer.rel[..p.writer.key_at - 1]);
        (group, ticket, p.writer)
    });
    Ok(Published {
        committed,
        dir,
        marker,
    })
}

/// The rename and its checks: the commit's outcome, whether a rename
/// happened, and a per-file upload's marker.
fn publish_inner(
    sh: &Arc<Shared>,
    p: &mut Prepared,
    journal_seq: Option<u64>,
) -> Result<(Committed, bool, Option<Appended>), StoreError> {
    let path = p.writer.path();
    // Where the finished file is now, as (directory, name).
    let anonymous_link;
    let w = &p.writer;
    let (from_dir, from_name) = match &w.named_temp {
        Some(name) => (&sh.tmp_dir_fd, name.as_str()),
        None => {
            anonymous_link = w.link_anonymous(&path)?;
            (&w.dir_fd, anonymous_link.as_str())
        }
    };
    let upload_bytes = p.size_bytes;
    let discard = |w: &PutWriter| {
        if w.named_temp.is_none() {
            let _ = rustix::fs::unlinkat(from_dir, from_name, AtFlags::empty());
        } // a named temp is unlinked by Drop
        if let Ok(dup) = rustix::io::dup(&w.file) {
            // Its blocks are freed when its last descriptor closes: on the
            // release thread, not here (see `release`).
            sh.releaser.release(dup, Some(upload_bytes));
        }
    };
    let key = &w.rel[w.key_at..];
    let mut locked = sh.index.lock(&w.rel);
    if w.last_writer_wins {
        let ours = (p.write_time_ms, p.sha256);
        let superseded = sh.version_at(&w.rel).is_some_and(|local| local >= ours)
            || sh
                .tombstone_time(&w.rel)
                .is_some_and(|t| t >= p.write_time_ms);
        if superseded {
            drop(locked);
            discard(w);
            return Ok((p.committed(false, true), false, None));
        }
    }
    let journal = sh.journal.get();
    if let (Some(journal), Some(seq)) = (journal, journal_seq) {
        if !journal.may_publish(&w.rel, seq) {
            // A later write of this key is visible already: in the journal's
            // order (the order a replay follows) this version came before
            // it, so it stays invisible. Acknowledged all the same: it was
            // durable, then replaced.
            drop(locked);
            discard(w);
            return Ok((p.committed(true, false), false, None));
        }
    }
    // A per-file upload under `fsync = always` orders itself in the journal
    // right before its rename (see `journal`).
    let marker = match (journal, journal_seq) {
        (Some(journal), None) if sh.fsync == FsyncPolicy::Always => {
            match journal.append_mark(sh, &w.rel, p.head(Kind::Marker)) {
                Ok(appended) => Some(appended),
                Err(e) => {
                    drop(locked);
                    discard(w);
                    return Err(e);
                }
            }
        }
        _ => None,
    };
    // The version this replaces, held open across the rename so that its
    // blocks are freed after the commit (`release`), not inside the rename.
    let old = rustix::fs::openat(
        &w.dir_fd,
        key,
        OFlags::PATH | OFlags::NOFOLLOW | OFlags::CLOEXEC,
        Mode::empty(),
    )
    .ok();
    let replaced = old.is_some();
    if let Err(e) = rustix::fs::renameat(from_dir, from_name, &w.dir_fd, key) {
        drop(locked);
        discard(w);
        if let (Some(journal), Some(marker)) = (journal, marker) {
            journal.finish(&w.rel, marker, false);
        }
        return Err(sh.errno("rename into place", &path.display(), e));
    }
    p.writer.named_temp = None; // published: nothing left for Drop to remove
    let w = &p.writer;
    sh.clear_tombstone(&w.rel);
    let old_entry = locked.upsert(
        &w.rel,
        Entry {
            size_bytes: p.size_bytes,
            last_access_ms: now_ms(),
        },
    );
    drop(locked);
    if let Some(old) = old {
        sh.releaser.release(old, old_entry.map(|e| e.size_bytes));
    }
    sh.nospace_logged.store(false, Ordering::Relaxed);
    Ok((p.committed(replaced, false), true, marker))
}

/// Step 3: a per-file upload's directory sync and marker.
fn make_name_durable(sh: &Arc<Shared>, p: Published) -> Result<Committed, StoreError> {
    let mut result = Ok(p.committed);
    if let Some((group, ticket, writer)) = p.dir {
        let dir_rel = &writer.rel[..writer.key_at - 1];
        if let Err(e) = sh
            .dir_syncs
            .wait(sh, dir_rel, group, ticket, &writer.dir_fd)
        {
            result = Err(e);
        }
    }
    if let (Some(journal), Some(marker)) = (sh.journal.get(), p.marker) {
        let waited = journal.wait(sh, &marker);
        journal.finish("", marker, false);
        if let Err(e) = waited {
            result = result.and(Err(e));
        }
    }
    result
}
