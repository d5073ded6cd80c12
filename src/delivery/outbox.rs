//! The durable outbox: every acknowledged write, recorded for the peers
//! before the client hears 2xx.
//!
//! One log for all peers, in segment files `outbox/{base offset:020}.log`,
//! one text line per write (`P|D seq enqueued_ms ns key write_time_ms`).
//! Each peer has a cursor, the byte offset below which it has taken
//! everything; cursors live in `outbox/cursors` (rewritten, renamed into
//! place). A segment every cursor has passed is deleted. Entries carry no
//! body: a send reads the artifact's current version from the store, which
//! is what last-writer-wins wants anyway (a later write supersedes).
//!
//! Durability: under `fsync = always` the line is fdatasynced before
//! `append` returns, so a kill -9 or a power cut after the client's 2xx keeps
//! it. The sync is a group commit ([`GroupSync`]): lines are written under
//! the lock and synced outside it, and one `fdatasync` covers every line
//! written before it began, so concurrent appends share syncs instead of
//! queueing for one each. A torn last line (a crash inside `write`, before
//! any 2xx) is cut off at open.
//! Cursors are written lazily: a stale cursor after a crash re-sends a few
//! entries, and applying a replicated write twice is harmless.
//!
//! Bound: a peer's backlog (log bytes from its cursor to the end) never
//! passes `replication_outbox_bytes_max`. The append that would pass it
//! marks the peer overflowed instead (durably): its cursor follows the end
//! and the replication thread runs anti-entropy with it, which finds every
//! write the outbox did not keep. Nothing acknowledged is silently dropped,
//! and disk use stays under the bound plus one segment.

use std::collections::BTreeMap;
use std::fs::{File, OpenOptions};
use std::io::{self, Write as _};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use crate::group_sync::{GroupSync, Ticket};
use std::time::{SystemTime, UNIX_EPOCH};

/// Longest record line in bytes: namespace (64) + key (255) + numbers.
pub const RECORD_BYTES_MAX: usize = 512;
/// Largest segment file in bytes; smaller when the bound is small, so disk
/// use stays near the bound.
pub const SEGMENT_BYTES_MAX: u64 = 4 * 1024 * 1024;
/// Smallest `replication_outbox_bytes_max`.
pub const OUTBOX_BYTES_MIN: u64 = 4096;
/// Syncs of the log in flight at once: an append no running sync covers
/// starts its own rather than wait for one to end (see `group_sync`).
pub const SYNCS_IN_FLIGHT: usize = 2;

/// What a record asks the peer to do.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Op {
    Put,
    Delete,
}

/// One outbox entry.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Record {
    pub seq: u64,
    pub enqueued_ms: u64,
    pub op: Op,
    pub ns: String,
    pub key: String,
    pub write_time_ms: u64,
}

impl Record {
    /// The record as one line of the outbox file, newline included.
    pub fn line(&self) -> String {
        let op = match self.op {
            Op::Put => 'P',
            Op::Delete => 'D',
        };
        format!(
            "{op} {} {} {} {} {}\n",
            self.seq, self.enqueued_ms, self.ns, self.key, self.write_time_ms
        )
    }

    /// A line of the outbox file (without its newline), or `None` when it is
    /// not one `line` wrote: a torn tail after a crash, or damage.
    pub fn parse(line: &str) -> Option<Record> {
        let mut it = line.split(' ');
        let op = match it.next()? {
            "P" => Op::Put,
            "D" => Op::Delete,
            _ => return None,
        };
        let record = Record {
            seq: it.next()?.parse().ok()?,
            enqueued_ms: it.next()?.parse().ok()?,
            op,
            ns: it.next()?.to_string(),
            key: it.next()?.to_string(),
            write_time_ms: it.next()?.parse().ok()?,
        };
        it.next().is_none().then_some(record)
    }
}

/// A peer's place in the log.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PeerMark {
    /// Everything before this offset is taken (or covered by anti-entropy).
    pub acked: u64,
    /// Its backlog passed the bound: anti-entropy must run before the
    /// outbox queues for it again.
    pub overflow: bool,
}

/// A peer's backlog, for metrics and `/status`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Backlog {
    pub entries: u64,
    pub bytes: u64,
    pub oldest_age_ms: u64,
    pub overflow: bool,
    pub overflows_total: u64,
}

#[derive(Debug)]
struct Segment {
    base: u64,
    len: u64,
}

/// The segment being appended to and the syncs of what was written to it.
/// Shared with the appends waiting for a sync, which may outlive a roll to
/// the next segment.
#[derive(Debug)]
struct Current {
    file: File,
    group: GroupSync,
}

#[derive(Debug)]
struct Inner {
    segments: Vec<Segment>,
    current: Option<Arc<Current>>,
    end: u64,
    next_seq: u64,
    peers: BTreeMap<String, PeerMark>,
    overflows_total: BTreeMap<String, u64>,
    dirty: bool,
}

/// The outbox. Shared by the front ends (append) and the replication
/// thread (read, acknowledge).
#[derive(Debug)]
pub struct Outbox {
    dir: PathBuf,
    fsync: bool,
    bytes_max: u64,
    segment_bytes: u64,
    inner: Mutex<Inner>,
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

fn segment_path(dir: &Path, base: u64) -> PathBuf {
    dir.join(format!("{base:020}.log"))
}

impl Outbox {
    /// Open (creating) the outbox in `dir`; cut a torn tail.
    pub fn open(dir: &Path, fsync: bool, bytes_max: u64) -> io::Result<Outbox> {
        std::fs::create_dir_all(dir)?;
        let mut bases: Vec<u64> = std::fs::read_dir(dir)?
            .filter_map(|e| e.ok())
            .filter_map(|e| {
                let name = e.file_name().into_string().ok()?;
                name.strip_suffix(".log")?.parse::<u64>().ok()
            })
            .collect();
        bases.sort_unstable();
        let mut segments = Vec::with_capacity(bases.len());
        for base in bases {
            let len = std::fs::metadata(segment_path(dir, base))?.len();
            segments.push(Segment { base, len });
        }
        // Cut a torn last line, and learn the next sequence number.
        let mut next_seq = 0;
        if let Some(last) = segments.last_mut() {
            let file = OpenOptions::new()
                .read(true)
                .write(true)
                .open(segment_path(dir, last.base))?;
            let tail_start = last.len.saturating_sub(2 * RECORD_BYTES_MAX as u64);
            let mut tail = vec![0u8; (last.len - tail_start) as usize];
            file.read_exact_at(&mut tail, tail_start)?;
            let keep = tail.iter().rposition(|&b| b == b'\n').map_or(0, |i| i + 1);
            let good_len = tail_start + keep as u64;
            if good_len != last.len {
                tracing::warn!(
                    dropped_bytes = last.len - good_len,
                    "outbox: cut a torn last record (written, never acknowledged)"
                );
                file.set_len(good_len)?;
                file.sync_data()?;
                last.len = good_len;
            }
            let text = String::from_utf8_lossy(&tail[..keep]);
            if let Some(record) = text.lines().filter_map(Record::parse).next_back() {
                next_seq = record.seq + 1;
            }
        }
        let end = segments.last().map_or(0, |s| s.base + s.len);
        let mut peers = BTreeMap::new();
        if let Ok(text) = std::fs::read_to_string(dir.join("cursors")) {
            for line in text.lines() {
                let mut it = line.split(' ');
                if let (Some(peer), Some(acked), Some(overflow)) = (it.next(), it.next(), it.next())
                {
                    if let Ok(acked) = acked.parse::<u64>() {
                        peers.insert(
                            peer.to_string(),
                            PeerMark {
                                acked: acked.min(end),
                                overflow: overflow == "1",
                            },
                        );
                    }
                }
            }
        }
        let segment_bytes = (bytes_max / 8).clamp(OUTBOX_BYTES_MIN, SEGMENT_BYTES_MAX);
        Ok(Outbox {
            dir: dir.to_path_buf(),
            fsync,
            bytes_max,
            segment_bytes,
            inner: Mutex::new(Inner {
                segments,
                current: None,
                end,
                next_seq,
                peers,
                overflows_total: BTreeMap::new(),
                dirty: false,
            }),
        })
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// The bound on each peer's backlog, bytes.
    pub fn bytes_max(&self) -> u64 {
        self.bytes_max
    }

    /// End offset of the log.
    pub fn end(&self) -> u64 {
        self.lock().end
    }

    /// The peer set is now `peers`. A peer new to the outbox starts at the
    /// oldest entry kept (re-sending is harmless, missing is not).
    pub fn set_peers(&self, peers: &[String]) {
        let mut inner = self.lock();
        let oldest = inner.segments.first().map_or(inner.end, |s| s.base);
        inner.peers.retain(|p, _| peers.contains(p));
        for p in peers {
            inner.peers.entry(p.clone()).or_insert(PeerMark {
                acked: oldest,
                overflow: false,
            });
        }
        inner.dirty = true;
    }

    /// Add `peers` (keeping every other): the static peers, before anything
    /// is served, so no write acknowledged before the replication thread's
    /// first membership round finds the outbox without peers.
    pub fn add_peers(&self, peers: &[String]) {
        let mut inner = self.lock();
        let oldest = inner.segments.first().map_or(inner.end, |s| s.base);
        for p in peers {
            if !inner.peers.contains_key(p) {
                inner.peers.insert(
                    p.clone(),
                    PeerMark {
                        acked: oldest,
                        overflow: false,
                    },
                );
                inner.dirty = true;
            }
        }
    }

    /// The peers the outbox keeps cursors for (from the cursors file at
    /// start, then the replication thread's set).
    pub fn peers(&self) -> Vec<String> {
        self.lock().peers.keys().cloned().collect()
    }

    pub fn mark(&self, peer: &str) -> Option<PeerMark> {
        self.lock().peers.get(peer).copied()
    }

    /// Record a write for every peer. Returns once it is durable (under
    /// fsync) or an error: the caller must then not acknowledge the write.
    pub fn append(&self, op: Op, ns: &str, key: &str, write_time_ms: u64) -> io::Result<()> {
        let mut inner = self.lock();
        if inner.peers.is_empty() {
            return Ok(());
        }
        let record = Record {
            seq: inner.next_seq,
            enqueued_ms: now_ms(),
            op,
            ns: ns.to_string(),
            key: key.to_string(),
            write_time_ms,
        };
        let line = record.line();
        let len = line.len() as u64;
        let new_end = inner.end + len;
        let mut newly_overflowed = Vec::new();
        for (peer, mark) in inner.peers.iter_mut() {
            if !mark.overflow && new_end - mark.acked > self.bytes_max {
                mark.overflow = true;
                newly_overflowed.push(peer.clone());
            }
        }
        let anyone = inner.peers.values().any(|m| !m.overflow);
        let mut written = None;
        if anyone {
            written = Some(self.write_line(&mut inner, line.as_bytes())?);
            inner.next_seq += 1;
        }
        let end = inner.end;
        for mark in inner.peers.values_mut().filter(|m| m.overflow) {
            mark.acked = end;
        }
        if !newly_overflowed.is_empty() {
            for peer in &newly_overflowed {
                *inner.overflows_total.entry(peer.clone()).or_default() += 1;
                tracing::warn!(
                    %peer,
                    bytes_max = self.bytes_max,
                    "outbox: peer backlog over replication_outbox_bytes_max; \
                     stopped queueing for it, anti-entropy will repair it"
                );
            }
            // The overflow mark is what keeps the un-queued writes from being
            // forgotten: it must be durable before this write is acknowledged.
            inner.dirty = true;
            self.persist_locked(&mut inner, true)?;
        }
        self.gc_locked(&mut inner);
        drop(inner);
        match written {
            Some(Some((current, ticket))) => {
                current.group.wait(ticket, || current.file.sync_data())
            }
            _ => Ok(()),
        }
    }

    /// Writes `line` at the end of the log. Under fsync, what to wait on for
    /// it to be durable (the caller waits after releasing the lock).
    fn write_line(
        &self,
        inner: &mut Inner,
        line: &[u8],
    ) -> io::Result<Option<(Arc<Current>, Ticket)>> {
        let roll = match inner.segments.last() {
            None => true,
            Some(s) => s.len >= self.segment_bytes,
        };
        if roll || inner.current.is_none() {
            let base = if roll {
                inner.end
            } else {
                inner.segments.last().map_or(inner.end, |s| s.base)
            };
            let path = segment_path(&self.dir, base);
            let file = OpenOptions::new().create(true).append(true).open(&path)?;
            if roll {
                inner.segments.push(Segment { base, len: 0 });
                if self.fsync {
                    File::open(&self.dir)?.sync_all()?;
                }
            }
            inner.current = Some(Arc::new(Current {
                file,
                group: GroupSync::with_syncs_in_flight(SYNCS_IN_FLIGHT),
            }));
        }
        let Some(current) = inner.current.clone() else {
            return Err(io::Error::other("outbox segment not open"));
        };
        if let Err(err) = (&current.file).write_all(line) {
            // A partial line would corrupt the next one: reopen (and cut) next time.
            inner.current = None;
            return Err(err);
        }
        if let Some(s) = inner.segments.last_mut() {
            s.len += line.len() as u64;
        }
        inner.end += line.len() as u64;
        if !self.fsync {
            return Ok(None);
        }
        let ticket = current.group.register();
        Ok(Some((current, ticket)))
    }

    /// `(fdatasyncs, lines they covered)` so far in the current segment:
    /// fewer syncs than lines when appends shared them.
    pub fn sync_totals(&self) -> (u64, u64) {
        self.lock()
            .current
            .as_ref()
            .map_or((0, 0), |c| (c.group.syncs_total(), c.group.writes_total()))
    }

    /// The record at `pos` and the offset after it; `None` at the end.
    pub fn read_at(&self, pos: u64) -> io::Result<Option<(Record, u64)>> {
        let (base, len) = {
            let inner = self.lock();
            if pos >= inner.end {
                return Ok(None);
            }
            let Some(seg) = inner.segments.iter().rev().find(|s| s.base <= pos) else {
                return Err(io::Error::other(format!("outbox offset {pos} was deleted")));
            };
            (seg.base, seg.len)
        };
        let file = File::open(segment_path(&self.dir, base))?;
        let want = (base + len - pos).min(RECORD_BYTES_MAX as u64) as usize;
        let mut buf = vec![0u8; want];
        file.read_exact_at(&mut buf, pos - base)?;
        let Some(nl) = buf.iter().position(|&b| b == b'\n') else {
            return Err(io::Error::other(format!(
                "outbox record at {pos} has no end"
            )));
        };
        let line = std::str::from_utf8(&buf[..nl]).map_err(io::Error::other)?;
        match Record::parse(line) {
            Some(record) => Ok(Some((record, pos + nl as u64 + 1))),
            None => Err(io::Error::other(format!(
                "outbox record at {pos} is damaged"
            ))),
        }
    }

    /// `peer` has taken everything before `acked`.
    pub fn set_acked(&self, peer: &str, acked: u64) {
        let mut inner = self.lock();
        if let Some(mark) = inner.peers.get_mut(peer) {
            if !mark.overflow && mark.acked != acked {
                mark.acked = acked;
                inner.dirty = true;
            }
        }
        self.gc_locked(&mut inner);
    }

    /// Anti-entropy with `peer` starts: queue for it again from the end.
    /// Every write before this moment is in the store, where the summary
    /// comparison that follows finds it. Returns the new cursor.
    pub fn clear_overflow(&self, peer: &str) -> io::Result<u64> {
        let mut inner = self.lock();
        let end = inner.end;
        if let Some(mark) = inner.peers.get_mut(peer) {
            if mark.overflow {
                mark.overflow = false;
                mark.acked = end;
                inner.dirty = true;
                self.persist_locked(&mut inner, true)?;
            }
        }
        Ok(end)
    }

    /// Write the cursors file if anything changed.
    pub fn persist(&self) -> io::Result<()> {
        let mut inner = self.lock();
        self.persist_locked(&mut inner, false)
    }

    fn persist_locked(&self, inner: &mut Inner, sync: bool) -> io::Result<()> {
        if !inner.dirty {
            return Ok(());
        }
        let mut text = String::new();
        for (peer, mark) in &inner.peers {
            text.push_str(&format!(
                "{peer} {} {}\n",
                mark.acked,
                u8::from(mark.overflow)
            ));
        }
        let tmp = self.dir.join("cursors.tmp");
        let mut file = File::create(&tmp)?;
        file.write_all(text.as_bytes())?;
        if sync && self.fsync {
            file.sync_data()?;
        }
        std::fs::rename(&tmp, self.dir.join("cursors"))?;
        if sync && self.fsync {
            File::open(&self.dir)?.sync_all()?;
        }
        inner.dirty = false;
        Ok(())
    }

    /// Delete segments every peer has passed (never the one being written).
    fn gc_locked(&self, inner: &mut Inner) {
        let low = inner
            .peers
            .values()
            .map(|m| m.acked)
            .min()
            .unwrap_or(inner.end);
        while inner.segments.len() > 1 && inner.segments[0].base + inner.segments[0].len <= low {
            let seg = inner.segments.remove(0);
            if let Err(err) = std::fs::remove_file(segment_path(&self.dir, seg.base)) {
                tracing::warn!(error = %err, "outbox: cannot delete a finished segment");
            }
        }
    }

    /// `peer`'s backlog now.
    pub fn backlog(&self, peer: &str) -> Backlog {
        let (mark, end, next_seq, overflows_total) = {
            let inner = self.lock();
            let Some(mark) = inner.peers.get(peer).copied() else {
                return Backlog::default();
            };
            (
                mark,
                inner.end,
                inner.next_seq,
                inner.overflows_total.get(peer).copied().unwrap_or(0),
            )
        };
        let mut backlog = Backlog {
            bytes: end - mark.acked,
            overflow: mark.overflow,
            overflows_total,
            ..Backlog::default()
        };
        if let Ok(Some((record, _))) = self.read_at(mark.acked) {
            backlog.entries = next_seq.saturating_sub(record.seq);
            backlog.oldest_age_ms = now_ms().saturating_sub(record.enqueued_ms);
        }
        backlog
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn peers(names: &[&str]) -> Vec<String> {
        names.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn records_round_trip_and_survive_reopen_with_a_torn_tail() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("outbox");
        let ob = Outbox::open(&dir, true, 1 << 20).unwrap();
        ob.set_peers(&peers(&["a:1"]));
        ob.append(Op::Put, "ns", "k1", 5).unwrap();
        ob.append(Op::Delete, "ns", "k2", 6).unwrap();
        let (r1, next) = ob.read_at(0).unwrap().unwrap();
        assert_eq!(
            (r1.op, r1.key.as_str(), r1.write_time_ms),
            (Op::Put, "k1", 5)
        );
        let (r2, end) = ob.read_at(next).unwrap().unwrap();
        assert_eq!((r2.op, r2.seq), (Op::Delete, 1));
        assert_eq!(ob.read_at(end).unwrap(), None);
        ob.set_acked("a:1", next);
        ob.persist().unwrap();
        drop(ob);
        // A torn write after the last acknowledged one.
        let seg = segment_path(&dir, 0);
        let mut f = OpenOptions::new().append(true).open(&seg).unwrap();
        f.write_all(b"P 2 0 ns k3").unwrap();
        let ob = Outbox::open(&dir, true, 1 << 20).unwrap();
        assert_eq!(ob.end(), end);
        assert_eq!(ob.mark("a:1").unwrap().acked, next);
        ob.set_peers(&peers(&["a:1"]));
        ob.append(Op::Put, "ns", "k4", 7).unwrap();
        let (r4, _) = ob.read_at(end).unwrap().unwrap();
        assert_eq!((r4.seq, r4.key.as_str()), (2, "k4"));
        assert_eq!(ob.backlog("a:1").entries, 2);
    }

    #[test]
    fn concurrent_appends_share_syncs_and_every_line_is_kept() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("outbox");
        let ob = std::sync::Arc::new(Outbox::open(&dir, true, 1 << 30).unwrap());
        ob.set_peers(&peers(&["a:1"]));
        let threads: Vec<_> = (0..8)
            .map(|t| {
                let ob = std::sync::Arc::clone(&ob);
                std::thread::spawn(move || {
                    for i in 0..50 {
                        ob.append(Op::Put, "ns", &format!("t{t}-{i}"), i).unwrap();
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        let (syncs, lines) = ob.sync_totals();
        assert_eq!(lines, 400);
        assert!((1..=400).contains(&syncs), "{syncs} syncs");
        drop(ob);
        let ob = Outbox::open(&dir, true, 1 << 30).unwrap();
        let mut keys = std::collections::BTreeSet::new();
        let mut pos = 0;
        while let Some((record, next)) = ob.read_at(pos).unwrap() {
            keys.insert(record.key);
            pos = next;
        }
        assert_eq!(keys.len(), 400);
    }

    #[test]
    fn a_backlog_past_the_bound_overflows_and_segments_are_collected() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("outbox");
        let ob = Outbox::open(&dir, false, OUTBOX_BYTES_MIN).unwrap();
        ob.set_peers(&peers(&["fast:1", "dead:1"]));
        let mut pos = 0;
        for i in 0..2000 {
            ob.append(Op::Put, "ns", &format!("key{i}"), i).unwrap();
            // fast takes everything at once
            while let Some((_, next)) = ob.read_at(pos).unwrap() {
                pos = next;
            }
            ob.set_acked("fast:1", pos);
            let dead = ob.backlog("dead:1");
            assert!(dead.bytes <= OUTBOX_BYTES_MIN, "bounded: {}", dead.bytes);
        }
        let dead = ob.mark("dead:1").unwrap();
        assert!(dead.overflow);
        assert_eq!(ob.backlog("dead:1").overflows_total, 1);
        let disk: u64 = std::fs::read_dir(&dir)
            .unwrap()
            .map(|e| e.unwrap().metadata().unwrap().len())
            .sum();
        assert!(disk <= 3 * OUTBOX_BYTES_MIN, "disk {disk}");
        // The overflow is durable.
        drop(ob);
        let ob = Outbox::open(&dir, false, OUTBOX_BYTES_MIN).unwrap();
        assert!(ob.mark("dead:1").unwrap().overflow);
        let end = ob.clear_overflow("dead:1").unwrap();
        assert_eq!(
            ob.mark("dead:1").unwrap(),
            PeerMark {
                acked: end,
                overflow: false
            }
        );
    }
}
