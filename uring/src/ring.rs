//! Ring set-up with bounded sizes and set-up flags that fall back when the
//! kernel refuses them, plus the raw, unsafe submission level.

use std::time::Duration;

use io_uring::{squeue, types, IoUring};

use crate::errno::Errno;

/// Default submission queue size (entries).
pub const SQ_ENTRIES_DEFAULT: u32 = 256;
/// Default completion queue size (entries): four per SQ entry, because
/// multishot accept and receive post many completions per submission.
pub const CQ_ENTRIES_DEFAULT: u32 = 1024;
/// Largest SQ this crate sets up. The kernel allows 32768; more than 4096
/// per core only adds memory without adding throughput.
pub const SQ_ENTRIES_MAX: u32 = 4096;
/// Largest CQ this crate sets up.
pub const CQ_ENTRIES_MAX: u32 = 4 * SQ_ENTRIES_MAX;

// A full SQ turning into completions, plus the multishot ones, must fit in
// the CQ, or completions overflow into the kernel's slow backlog list.
const _: () = assert!(CQ_ENTRIES_DEFAULT >= 2 * SQ_ENTRIES_DEFAULT);
const _: () = assert!(CQ_ENTRIES_MAX >= 2 * SQ_ENTRIES_MAX);

/// Ring sizes. Defaults: [`SQ_ENTRIES_DEFAULT`], [`CQ_ENTRIES_DEFAULT`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RingConfig {
    /// Submission queue entries: a power of two in `1..=SQ_ENTRIES_MAX`.
    pub sq_entries: u32,
    /// Completion queue entries: a power of two, at least `2 * sq_entries`,
    /// at most [`CQ_ENTRIES_MAX`].
    pub cq_entries: u32,
}

impl Default for RingConfig {
    fn default() -> Self {
        RingConfig {
            sq_entries: SQ_ENTRIES_DEFAULT,
            cq_entries: CQ_ENTRIES_DEFAULT,
        }
    }
}

impl RingConfig {
    /// Checks the bounds; the message names the field, the value and what is
    /// allowed.
    pub fn validate(&self) -> Result<(), String> {
        if self.sq_entries == 0
            || self.sq_entries > SQ_ENTRIES_MAX
            || !self.sq_entries.is_power_of_two()
        {
            return Err(format!(
                "sq_entries = {}: must be a power of two from 1 to {SQ_ENTRIES_MAX}",
                self.sq_entries
            ));
        }
        if self.cq_entries > CQ_ENTRIES_MAX
            || !self.cq_entries.is_power_of_two()
            || self.cq_entries < 2 * self.sq_entries
        {
            return Err(format!(
                "cq_entries = {}: must be a power of two from 2 * sq_entries ({}) to {CQ_ENTRIES_MAX}",
                self.cq_entries,
                2 * self.sq_entries
            ));
        }
        Ok(())
    }
}

/// Which optional set-up flags the ring was created with.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SetupFlags {
    /// `IORING_SETUP_SINGLE_ISSUER` (6.0+): only the creating thread submits.
    pub single_issuer: bool,
    /// `IORING_SETUP_DEFER_TASKRUN` (6.1+): completions are produced only when
    /// this thread enters the kernel to wait ([`Ring::submit_and_wait`]).
    pub defer_taskrun: bool,
    /// `IORING_SETUP_COOP_TASKRUN` (5.19+): no IPI to interrupt the thread
    /// for task work; used when DEFER_TASKRUN is refused.
    pub coop_taskrun: bool,
    /// `IORING_SETUP_SUBMIT_ALL` (5.18+): one bad SQE does not stop the batch.
    pub submit_all: bool,
}

/// The SQ has no free entry even after flushing it to the kernel.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct QueueFull;

/// An io_uring instance with bounded sizes.
pub struct Ring {
    ring: IoUring,
    flags: SetupFlags,
    config: RingConfig,
}

impl Ring {
    /// Sets up a ring, trying the best flags first and falling back:
    /// SINGLE_ISSUER + DEFER_TASKRUN + SUBMIT_ALL, then SINGLE_ISSUER +
    /// COOP_TASKRUN + SUBMIT_ALL, then COOP_TASKRUN, then no flags. An
    /// invalid config is `EINVAL` (call [`RingConfig::validate`] for the
    /// message); a refusal of the plain ring returns its errno (ENOSYS,
    /// EPERM, ENOMEM: see [`crate::probe`]).
    pub fn new(config: RingConfig) -> Result<Ring, Errno> {
        config.validate().map_err(|_| Errno::EINVAL)?;
        let attempts = [
            SetupFlags {
                single_issuer: true,
                defer_taskrun: true,
                coop_taskrun: false,
                submit_all: true,
            },
            SetupFlags {
                single_issuer: true,
                defer_taskrun: false,
                coop_taskrun: true,
                submit_all: true,
            },
            SetupFlags {
                single_issuer: false,
                defer_taskrun: false,
                coop_taskrun: true,
                submit_all: false,
            },
            SetupFlags::default(),
        ];
        let mut last = Errno::EINVAL;
        for flags in attempts {
            let mut builder = IoUring::builder();
            builder.setup_cqsize(config.cq_entries);
            if flags.single_issuer {
                builder.setup_single_issuer();
            }
            if flags.defer_taskrun {
                builder.setup_defer_taskrun();
            }
            if flags.coop_taskrun {
                builder.setup_coop_taskrun();
            }
            if flags.submit_all {
                builder.setup_submit_all();
            }
            match builder.build(config.sq_entries) {
                Ok(ring) => {
                    return Ok(Ring {
                        ring,
                        flags,
                        config,
                    })
                }
                Err(err) => {
                    last = Errno::from_io(&err);
                    // Not a flag problem: no point trying fewer flags.
                    if matches!(last.0, libc::ENOSYS | libc::EPERM) {
                        return Err(last);
                    }
                }
            }
        }
        Err(last)
    }

    /// The flags that took.
    pub fn flags(&self) -> SetupFlags {
        self.flags
    }

    /// The sizes the ring was created with.
    pub fn config(&self) -> RingConfig {
        self.config
    }

    /// Pushes one SQE, flushing the SQ to the kernel once if it is full.
    ///
    /// # Safety
    ///
    /// Every buffer, path, timespec and fd the entry points to must stay
    /// valid (and buffers unaliased by Rust references) until the kernel
    /// posts the entry's final completion, and its `user_data` must not
    /// collide with a value the [`crate::Driver`] decodes as one of its own
    /// live operations (use a reserved tag or a value from a finished op).
    pub unsafe fn push(&mut self, entry: &squeue::Entry) -> Result<(), QueueFull> {
        // SAFETY: the caller upholds the entry's validity (this fn's contract).
        if unsafe { self.ring.submission().push(entry) }.is_ok() {
            return Ok(());
        }
        // The SQ is full: hand what is queued to the kernel and retry once.
        if self.ring.submit().is_err() {
            return Err(QueueFull);
        }
        // SAFETY: as above.
        unsafe { self.ring.submission().push(entry) }.map_err(|_| QueueFull)
    }

    /// Free SQ entries right now.
    pub fn sq_space_left(&mut self) -> usize {
        let mut sq = self.ring.submission();
        sq.sync();
        sq.capacity() - sq.len()
    }

    /// Submits queued entries without waiting.
    pub fn submit(&self) -> Result<usize, Errno> {
        self.ring.submit().map_err(|e| Errno::from_io(&e))
    }

    /// Submits queued entries and waits until at least `min_complete`
    /// completions are in the CQ or `timeout` passes. Always runs pending
    /// task work (needed with DEFER_TASKRUN), even for `min_complete = 0`.
    /// A timeout, a signal (EINTR) and EBUSY (CQ overflow backlog) are not
    /// errors: the caller drains the CQ and loops.
    pub fn submit_and_wait(
        &self,
        min_complete: usize,
        timeout: Option<Duration>,
    ) -> Result<(), Errno> {
        let result = match (min_complete, timeout) {
            (0, _) => {
                let submitter = self.ring.submitter();
                let to_submit = u32::try_from(self.sq_len()).unwrap_or(u32::MAX);
                // SAFETY: no argument pointer is passed (None), so the kernel
                // reads nothing from our memory for this call.
                unsafe {
                    submitter.enter::<libc::sigset_t>(
                        to_submit,
                        0,
                        io_uring::EnterFlags::GETEVENTS.bits(),
                        None,
                    )
                }
            }
            (n, Some(timeout)) => {
                let ts = types::Timespec::from(timeout);
                let args = types::SubmitArgs::new().timespec(&ts);
                self.ring.submitter().submit_with_args(n, &args)
            }
            (n, None) => self.ring.submit_and_wait(n),
        };
        match result {
            Ok(_) => Ok(()),
            Err(err) => match Errno::from_io(&err).0 {
                libc::ETIME | libc::EINTR | libc::EBUSY | libc::EAGAIN => Ok(()),
                errno => Err(Errno(errno)),
            },
        }
    }

    fn sq_len(&self) -> usize {
        // SAFETY: the shared SQ view is only used to read its length here,
        // and no other SubmissionQueue exists at the same time (we hold
        // `&self`, and every mutable use goes through `&mut self`).
        unsafe { self.ring.submission_shared().len() }
    }

    /// CQ overflow count reported by the kernel (completions it had to
    /// buffer because the CQ was full).
    pub fn cq_overflow(&mut self) -> u32 {
        self.ring.completion().overflow()
    }

    pub(crate) fn inner(&mut self) -> &mut IoUring {
        &mut self.ring
    }

    pub(crate) fn inner_ref(&self) -> &IoUring {
        &self.ring
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn config_bounds_table() {
        let table: &[(u32, u32, bool)] = &[
            (SQ_ENTRIES_DEFAULT, CQ_ENTRIES_DEFAULT, true),
            (1, 2, true),
            (8, 8, false),
            (0, 2, false),
            (3, 8, false),
            (8, 24, false),
            (SQ_ENTRIES_MAX * 2, CQ_ENTRIES_MAX, false),
            (SQ_ENTRIES_MAX, CQ_ENTRIES_MAX * 2, false),
        ];
        for &(sq, cq, ok) in table {
            let result = RingConfig {
                sq_entries: sq,
                cq_entries: cq,
            }
            .validate();
            assert_eq!(result.is_ok(), ok, "sq {sq} cq {cq}: {result:?}");
            if let Err(msg) = result {
                assert!(msg.contains("_entries = "), "{msg}");
            }
        }
    }

    #[test]
    fn ring_sets_up_with_best_flags() {
        let report = crate::probe();
        if !report.available() {
            eprintln!("SKIP: io_uring unavailable on this host");
            return;
        }
        let ring = Ring::new(RingConfig {
            sq_entries: 8,
            cq_entries: 16,
        })
        .unwrap();
        let flags = ring.flags();
        eprintln!("ring flags: {flags:?}");
        if report.setup_defer_taskrun {
            assert!(flags.defer_taskrun && flags.single_issuer);
        }
        assert_eq!(ring.config().cq_entries, 16);
    }
}
