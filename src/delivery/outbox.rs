//! The durable outbox: every acknowledged write, recorded for the peers
//! before the client hears 2xx.
//!
//! One log for all peers, in segment files `outbox/{base offset:020}.log`,
//! one text line per write (`P|D seq enqueued_ms ns key write_time_ms len
//! bytes_total`: `len` the artifact's bytes, `bytes_total` the sum of `len`
//! over the log so far, so the bytes between two offsets are one
//! subtraction; lines written before these two fields read as 0).
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

use super::Lag;

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
    /// The artifact's bytes when it was written (0 for a delete).
    pub len: u64,
    /// `len` summed over the log up to and including this record.
    pub bytes_total: u64,
}

impl Record {
    /// What this entry owes a target that has not taken it.
    pub fn owed(&self) -> Lag {
        Lag::one(self.len, self.enqueued_ms)
    }

    /// The record as one line of the outbox file, newline included.
    pub fn line(&self) -> String {
        let op = match self.op {
            Op::Put => 'P',
            Op::Delete => 'D',
        };
        format!(
            "{op} {} {} {} {} {} {} {}\n",
            self.seq,
            self.enqueued_ms,
            self.ns,
            self.key,
            self.write_time_ms,
            self.len,
            self.bytes_total
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
        let mut record = Record {
            seq: it.next()?.parse().ok()?,
            enqueued_ms: it.next()?.parse().ok()?,
            op,
            ns: it.next()?.to_string(),
            key: it.next()?.to_string(),
            write_time_ms: it.next()?.parse().ok()?,
            len: 0,
            bytes_total: 0,
        };
        // Lines from before the sizes were recorded end here.
        if let Some(len) = it.next() {
            record.len = len.parse().ok()?;
            record.bytes_total = it.next()?.parse().ok()?;
        }
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
    /// What the peer is owed outside the log since it overflowed: its
    /// backlog at the overflow and every write not queued for it since.
    /// Kept (through anti-entropy's start) until the comparison that covers
    /// it has listed what to repair ([`Outbox::settle_owed`]).
    pub owed: Lag,
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
    /// `bytes_total` of the last record.
    bytes_total: u64,
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
        let mut bytes_total = 0;
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
                bytes_total = record.bytes_total;
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
                        // Then what it is owed outside the log (absent in
                        // files written before it was kept).
                        let mut num = || it.next().and_then(|n| n.parse::<u64>().ok());
                        let owed = match (num(), num(), num()) {
                            (Some(writes), Some(bytes), Some(oldest_ms)) => Lag {
                                writes,
                                bytes,
                                oldest_ms,
                            },
                            _ => Lag::default(),
                        };
                        let overflow = overflow == "1";
                        peers.insert(
                            peer.to_string(),
                            PeerMark {
                                acked: acked.min(end),
                                overflow,
                                // An overflow mark owes at least one write, even
                                // if a crash lost the count.
                                owed: if overflow {
                                    owed.at_least(Lag::one(0, now_ms()))
                                } else {
                                    owed
                                },
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
                bytes_total,
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
                ..PeerMark::default()
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
                        ..PeerMark::default()
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

    /// Record a write of `len` artifact bytes for every peer. Returns once
    /// it is durable (under fsync) or an error: the caller must then not
    /// acknowledge the write.
    pub fn append(
        &self,
        op: Op,
        ns: &str,
        key: &str,
        write_time_ms: u64,
        len: u64,
    ) -> io::Result<()> {
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
            len,
            bytes_total: inner.bytes_total.saturating_add(len),
        };
        let line = record.line();
        let line_len = line.len() as u64;
        let new_end = inner.end + line_len;
        let newly_overflowed: Vec<String> = inner
            .peers
            .iter()
            .filter(|(_, m)| !m.overflow && new_end - m.acked > self.bytes_max)
            .map(|(p, _)| p.clone())
            .collect();
        for peer in &newly_overflowed {
            // What it had queued is now owed outside the log.
            let acked = inner.peers.get(peer).map_or(inner.end, |m| m.acked);
            let backlog = self.lag_locked(&inner, acked);
            if let Some(mark) = inner.peers.get_mut(peer) {
                mark.overflow = true;
                mark.owed.add(backlog);
            }
        }
        let anyone = inner.peers.values().any(|m| !m.overflow);
        let mut written = None;
        if anyone {
            written = Some(self.write_line(&mut inner, line.as_bytes())?);
            inner.next_seq += 1;
            inner.bytes_total = record.bytes_total;
        }
        let end = inner.end;
        for mark in inner.peers.values_mut().filter(|m| m.overflow) {
            mark.acked = end;
            mark.owed.add(record.owed());
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
            } else {
                // Reopened after a failed write (ENOSPC midway, say): cut what
                // it left of its line, or every offset after it would be off by
                // that much and each later line would read as damaged.
                let len = inner.segments.last().map_or(0, |s| s.len);
                file.set_len(len)?;
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
            Self::segment_of(&inner, pos)?
        };
        self.read_in(base, len, pos).map(Some)
    }

    /// The segment (base, length) holding offset `pos`.
    fn segment_of(inner: &Inner, pos: u64) -> io::Result<(u64, u64)> {
        match inner.segments.iter().rev().find(|s| s.base <= pos) {
            Some(seg) => Ok((seg.base, seg.len)),
            None => Err(io::Error::other(format!("outbox offset {pos} was deleted"))),
        }
    }

    /// What the log owes a target whose next unsent entry is at `pos`:
    /// every record from there to the end (the count from the sequence
    /// numbers, the bytes from the running totals, the age from the
    /// record at `pos`). Zero at the end; an unreadable record counts
    /// the entries anyway, as if acknowledged now.
    pub fn lag_from(&self, pos: u64) -> Lag {
        let (found, next_seq, bytes_total) = {
            let inner = self.lock();
            if pos >= inner.end {
                return Lag::default();
            }
            (
                Self::segment_of(&inner, pos),
                inner.next_seq,
                inner.bytes_total,
            )
        };
        let first = found.and_then(|(base, len)| self.read_in(base, len, pos));
        Self::lag_since(first.ok().map(|(r, _)| r), next_seq, bytes_total)
    }

    /// [`Outbox::lag_from`] with the lock held (the overflow path).
    fn lag_locked(&self, inner: &Inner, pos: u64) -> Lag {
        if pos >= inner.end {
            return Lag::default();
        }
        let first =
            Self::segment_of(inner, pos).and_then(|(base, len)| self.read_in(base, len, pos));
        Self::lag_since(
            first.ok().map(|(r, _)| r),
            inner.next_seq,
            inner.bytes_total,
        )
    }

    fn lag_since(first: Option<Record>, next_seq: u64, bytes_total: u64) -> Lag {
        match first {
            Some(r) => Lag {
                writes: next_seq.saturating_sub(r.seq).max(1),
                bytes: bytes_total.saturating_sub(r.bytes_total.saturating_sub(r.len)),
                oldest_ms: r.enqueued_ms.max(1),
            },
            None => Lag::one(0, now_ms()),
        }
    }

    /// Read the record at `pos` of the segment at `base` (`len` bytes long).
    fn read_in(&self, base: u64, len: u64, pos: u64) -> io::Result<(Record, u64)> {
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
            Some(record) => Ok((record, pos + nl as u64 + 1)),
            None => Err(io::Error::other(format!(
                "outbox record at {pos} is damaged"
            ))),
        }
    }

    /// `peer` has taken everything before `acked`. Never moves the mark
    /// back: a sender's positions only grow, and a PUT about to be refused
    /// may pass a fresher one than the sender's last sync (the tier's
    /// `refuse_put`).
    pub fn set_acked(&self, peer: &str, acked: u64) {
        let mut inner = self.lock();
        let acked = acked.min(inner.end);
        if let Some(mark) = inner.peers.get_mut(peer) {
            if !mark.overflow && acked > mark.acked {
                mark.acked = acked;
                inner.dirty = true;
            }
        }
        self.gc_locked(&mut inner);
    }

    /// Anti-entropy with an overflowed `peer` starts: queue for it again
    /// from the end. Every write before this moment is in the store, where
    /// the summary comparison that follows finds it; what the peer is owed
    /// stays counted until that comparison has listed its repairs
    /// ([`Outbox::settle_owed`]). Returns the new cursor, `None` when the
    /// peer was not overflowed (its cursor stays).
    pub fn clear_overflow(&self, peer: &str) -> io::Result<Option<u64>> {
        let mut inner = self.lock();
        let end = inner.end;
        let Some(mark) = inner.peers.get_mut(peer) else {
            return Ok(None);
        };
        if !mark.overflow {
            return Ok(None);
        }
        mark.overflow = false;
        mark.acked = end;
        inner.dirty = true;
        self.persist_locked(&mut inner, true)?;
        Ok(Some(end))
    }

    /// The comparison that followed an overflow has listed what `peer`
    /// lacks (its repairs carry the count from now on): forget what the
    /// overflow owed, unless it overflowed again meanwhile.
    pub fn settle_owed(&self, peer: &str) {
        let mut inner = self.lock();
        if let Some(mark) = inner.peers.get_mut(peer) {
            if !mark.overflow && !mark.owed.is_zero() {
                mark.owed = Lag::default();
                inner.dirty = true;
            }
        }
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
                "{peer} {} {} {} {} {}\n",
                mark.acked,
                u8::from(mark.overflow),
                mark.owed.writes,
                mark.owed.bytes,
                mark.owed.oldest_ms
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
        self.backlog_at(peer, 0)
    }

    /// `peer`'s backlog now, from `acked` if its sender knows it took more
    /// than the outbox was told yet (the cursors are brought up to date
    /// every 200 ms).
    pub fn backlog_at(&self, peer: &str, acked: u64) -> Backlog {
        let (mark, end, next_seq, overflows_total) = {
            let inner = self.lock();
            let Some(mut mark) = inner.peers.get(peer).copied() else {
                return Backlog::default();
            };
            if !mark.overflow {
                mark.acked = mark.acked.max(acked).min(inner.end);
            }
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

/// Bytes one read of a [`Reader`] takes from a segment file.
pub const READ_AHEAD_BYTES: usize = 64 * 1024;

/// Reads an outbox's records in order from a position, for one target.
///
/// It takes the outbox's lock only to find the segment it starts in: an
/// append holds that lock through its sync, and a sender that took it for
/// every entry it sends waited behind every sync (that was the ceiling of
/// replication at a few hundred small writes a second). Records are read
/// from the segment files as the appender leaves them: a line is complete
/// once its newline is there, a segment is done once the next one (named by
/// the offset it ends at) exists. A line may be read before the sync that
/// makes it durable, which is harmless: the write it names is already in the
/// store, and sending it early changes nothing on the target.
#[derive(Debug)]
pub struct Reader {
    dir: PathBuf,
    /// Where the next record starts.
    pos: u64,
    /// The segment being read: its base offset and file.
    segment: Option<(u64, File)>,
    /// Bytes read from `pos` on (complete lines, then perhaps part of one).
    buf: Vec<u8>,
}

impl Reader {
    /// A reader of `outbox` whose next record starts at `pos`.
    pub fn new(outbox: &Outbox, pos: u64) -> Reader {
        Reader {
            dir: outbox.dir.clone(),
            pos,
            segment: None,
            buf: Vec::new(),
        }
    }

    /// Where the next record starts.
    pub fn pos(&self) -> u64 {
        self.pos
    }

    /// Read on from `pos` (past an overflow, or back to an entry). The
    /// segment is found again on the next read (seeks are rare).
    pub fn seek(&mut self, pos: u64) {
        if pos != self.pos {
            self.pos = pos;
            self.buf.clear();
            self.segment = None;
        }
    }

    /// The next complete record: its start, the record, and where the one
    /// after it starts; `None` while there is none yet. An error names a
    /// record that cannot be read (damaged, or its segment deleted): the
    /// caller decides what replaces it (anti-entropy).
    pub fn next(&mut self, outbox: &Outbox) -> io::Result<Option<(u64, Record, u64)>> {
        for _ in 0..3 {
            if let Some(nl) = self.buf.iter().position(|&b| b == b'\n') {
                let start = self.pos;
                let line = std::str::from_utf8(&self.buf[..nl]).ok();
                let record = line.and_then(Record::parse);
                self.buf.drain(..=nl);
                self.pos += nl as u64 + 1;
                return match record {
                    Some(r) => Ok(Some((start, r, self.pos))),
                    None => Err(io::Error::other(format!(
                        "outbox record at {start} is damaged"
                    ))),
                };
            }
            if self.buf.len() > RECORD_BYTES_MAX {
                let start = self.pos;
                return Err(io::Error::other(format!(
                    "outbox record at {start} has no end"
                )));
            }
            if !self.fill(outbox)? {
                return Ok(None);
            }
        }
        Ok(None)
    }

    /// Read more of the current segment, or move to the next one. False
    /// when nothing new was there.
    fn fill(&mut self, outbox: &Outbox) -> io::Result<bool> {
        if self.segment.is_none() {
            let (base, _) = {
                let inner = outbox.lock();
                if self.pos >= inner.end {
                    return Ok(false);
                }
                Outbox::segment_of(&inner, self.pos)?
            };
            let file = File::open(segment_path(&self.dir, base))?;
            self.segment = Some((base, file));
        }
        let Some((base, file)) = self.segment.as_ref() else {
            return Ok(false);
        };
        let at = self.pos + self.buf.len() as u64 - base;
        let have = self.buf.len();
        self.buf.resize(have + READ_AHEAD_BYTES, 0);
        let n = loop {
            match file.read_at(&mut self.buf[have..], at) {
                Ok(n) => break n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => {
                    self.buf.truncate(have);
                    return Err(e);
                }
            }
        };
        self.buf.truncate(have + n);
        if n > 0 {
            return Ok(true);
        }
        // Nothing more in this segment. It is finished when the next one,
        // which starts where this one ends, exists (this reader is then at
        // its start: a segment ends with a whole line).
        if self.buf.is_empty() && *base < self.pos {
            if let Ok(next) = File::open(segment_path(&self.dir, self.pos)) {
                self.segment = Some((self.pos, next));
                return Ok(true);
            }
        }
        Ok(false)
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
        ob.append(Op::Put, "ns", "k1", 5, 300).unwrap();
        ob.append(Op::Delete, "ns", "k2", 6, 0).unwrap();
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
        ob.append(Op::Put, "ns", "k4", 7, 40).unwrap();
        let (r4, _) = ob.read_at(end).unwrap().unwrap();
        assert_eq!((r4.seq, r4.key.as_str()), (2, "k4"));
        assert_eq!(ob.backlog("a:1").entries, 2);
        // The running byte total survived the reopen: what a:1 lacks from
        // its cursor is the delete (0 bytes) and k4 (40 bytes).
        assert_eq!(r4.bytes_total, 340);
        let lag = ob.lag_from(next);
        assert_eq!((lag.writes, lag.bytes), (2, 40));
        assert!(lag.oldest_ms > 0);
        assert!(ob.lag_from(ob.end()).is_zero());
        // A line from before sizes were recorded still reads.
        let old = Record::parse("P 9 100 ns k 5").unwrap();
        assert_eq!((old.len, old.bytes_total, old.seq), (0, 0, 9));
        assert!(
            Record::parse("P 9 100 ns k 5 7").is_none(),
            "a half-written size"
        );
    }

    /// A write that failed midway (ENOSPC) left part of its line in the
    /// segment; the next append must cut it, so offsets stay true and every
    /// later line reads whole (before the cut, the reader found each later
    /// line damaged and replication stalled).
    #[test]
    fn an_append_after_a_failed_write_cuts_its_partial_line() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("outbox");
        let ob = Outbox::open(&dir, true, 1 << 20).unwrap();
        ob.set_peers(&peers(&["a:1"]));
        ob.append(Op::Put, "ns", "k1", 5, 300).unwrap();
        let end = ob.end();
        // What `write_line` leaves when a write fails midway: part of a
        // line in the file, and no open segment.
        let seg = segment_path(&dir, 0);
        let mut f = OpenOptions::new().append(true).open(&seg).unwrap();
        f.write_all(b"P 1 17965 ns k2 17").unwrap();
        ob.lock().current = None;
        ob.append(Op::Put, "ns", "k3", 7, 40).unwrap();
        ob.append(Op::Delete, "ns", "k4", 8, 0).unwrap();
        let (r3, next) = ob.read_at(end).unwrap().unwrap();
        assert_eq!(r3.key, "k3");
        let (r4, last) = ob.read_at(next).unwrap().unwrap();
        assert_eq!((r4.key.as_str(), r4.op), ("k4", Op::Delete));
        assert_eq!(last, ob.end());
        // A sender's reader sees the same lines at the same offsets.
        let mut reader = Reader::new(&ob, end);
        let (at, r, after) = reader.next(&ob).unwrap().unwrap();
        assert_eq!((at, r.key.as_str(), after), (end, "k3", next));
        let (_, r, after) = reader.next(&ob).unwrap().unwrap();
        assert_eq!((r.key.as_str(), after), ("k4", ob.end()));
        assert_eq!(std::fs::metadata(&seg).unwrap().len(), ob.end());
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
                        ob.append(Op::Put, "ns", &format!("t{t}-{i}"), i, 100)
                            .unwrap();
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
            ob.append(Op::Put, "ns", &format!("key{i}"), i, 10).unwrap();
            // fast takes everything at once
            while let Some((_, next)) = ob.read_at(pos).unwrap() {
                pos = next;
            }
            ob.set_acked("fast:1", pos);
            let dead = ob.backlog("dead:1");
            assert!(dead.bytes <= OUTBOX_BYTES_MIN, "bounded: {}", dead.bytes);
            // Whatever the overflow took out of the log is owed outside it:
            // dead:1 lacks every write so far, fast:1 none.
            let mark = ob.mark("dead:1").unwrap();
            let lag = mark.owed.plus(if mark.overflow {
                Lag::default()
            } else {
                ob.lag_from(mark.acked)
            });
            assert_eq!((lag.writes, lag.bytes), (i + 1, 10 * (i + 1)), "write {i}");
            assert!(ob.lag_from(ob.mark("fast:1").unwrap().acked).is_zero());
        }
        let dead = ob.mark("dead:1").unwrap();
        assert!(dead.overflow);
        assert_eq!(ob.backlog("dead:1").overflows_total, 1);
        let disk: u64 = std::fs::read_dir(&dir)
            .unwrap()
            .map(|e| e.unwrap().metadata().unwrap().len())
            .sum();
        assert!(disk <= 3 * OUTBOX_BYTES_MIN, "disk {disk}");
        ob.persist().unwrap();
        // The overflow is durable, and so is what it owes.
        drop(ob);
        let ob = Outbox::open(&dir, false, OUTBOX_BYTES_MIN).unwrap();
        let mark = ob.mark("dead:1").unwrap();
        assert!(mark.overflow);
        assert_eq!(mark.owed, dead.owed);
        assert_eq!(
            ob.clear_overflow("fast:1").unwrap(),
            None,
            "never overflowed"
        );
        let end = ob.clear_overflow("dead:1").unwrap().unwrap();
        assert_eq!(
            ob.mark("dead:1").unwrap(),
            PeerMark {
                acked: end,
                overflow: false,
                owed: dead.owed,
            },
            "owed until the comparison lists the repairs"
        );
        ob.settle_owed("dead:1");
        assert!(ob.mark("dead:1").unwrap().owed.is_zero());
    }

    /// The reader walks the records the appender leaves, across segment
    /// rolls, stops at a partial line and goes on once it is whole, and
    /// seeks back for a retry.
    #[test]
    fn the_reader_follows_appends_across_segments() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("outbox");
        // Small segments: many rolls.
        let ob = Outbox::open(&dir, false, OUTBOX_BYTES_MIN * 64).unwrap();
        ob.set_peers(&peers(&["a:1"]));
        let mut reader = Reader::new(&ob, 0);
        assert!(reader.next(&ob).unwrap().is_none(), "empty outbox");
        let mut starts = Vec::new();
        let mut seen = 0u64;
        for i in 0..3000u64 {
            ob.append(Op::Put, "ns", &format!("key-{i}"), i, i).unwrap();
            if i % 7 == 0 {
                while let Some((start, r, end)) = reader.next(&ob).unwrap() {
                    assert_eq!(r.seq, seen, "in order, none skipped");
                    assert_eq!(reader.pos(), end);
                    starts.push(start);
                    seen += 1;
                }
            }
        }
        while let Some((start, r, _)) = reader.next(&ob).unwrap() {
            assert_eq!(r.seq, seen);
            starts.push(start);
            seen += 1;
        }
        assert_eq!(seen, 3000);
        assert_eq!(reader.pos(), ob.end());
        let segments = std::fs::read_dir(&dir).unwrap().count();
        assert!(segments > 3, "{segments} files: the test rolled segments");
        // Back to an old entry (a retry), then on again in order.
        reader.seek(starts[10]);
        assert_eq!(reader.next(&ob).unwrap().unwrap().1.seq, 10);
        assert_eq!(reader.next(&ob).unwrap().unwrap().1.seq, 11);
        // A line being written is not a record yet.
        while reader.next(&ob).unwrap().is_some() {}
        assert_eq!(reader.pos(), ob.end());
        let seg = std::fs::read_dir(&dir)
            .unwrap()
            .filter_map(|e| e.ok())
            .map(|e| e.path())
            .filter(|p| p.extension().is_some_and(|x| x == "log"))
            .max()
            .unwrap();
        let mut f = OpenOptions::new().append(true).open(&seg).unwrap();
        f.write_all(b"P 3000 1 ns key-3000 9").unwrap();
        assert!(reader.next(&ob).unwrap().is_none());
        f.write_all(b" 0 0\n").unwrap();
        let (_, r, _) = reader.next(&ob).unwrap().unwrap();
        assert_eq!((r.seq, r.key.as_str()), (3000, "key-3000"));
        // Damage is an error naming the offset, and the reader goes on after it.
        f.write_all(b"garbage\nP 3001 1 ns key-3001 9 0 0\n")
            .unwrap();
        assert!(reader.next(&ob).is_err());
        assert_eq!(reader.next(&ob).unwrap().unwrap().1.seq, 3001);
    }
}
