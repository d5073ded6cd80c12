//! The ring, fixed buffers, typed operations and a per-core event loop.
//! Knows nothing about HTTP.
//!
//! # Two levels
//!
//! * **Raw**: [`Ring::push`] / [`Driver::push_raw`] take an
//!   `io_uring::squeue::Entry` and are `unsafe`: the caller promises that
//!   everything the entry points to outlives the operation.
//! * **Safe**: [`Driver::submit`] takes an [`Op`] that *owns* its resources
//!   (a `Vec<u8>` or [`FixedLease`], a [`Pipe`], a [`SharedFd`], a path, a
//!   [`BufRing`] handle). `src/` (which forbids `unsafe`) uses only this.
//!
//! # Ownership rules
//!
//! 1. Submitting moves the `Op` into a slot of a fixed table (`ops_max`
//!    slots, allocated at start). Memory the kernel reads or writes (buffer
//!    contents, the statx result, timespecs, paths) is heap memory owned by
//!    the slot and does not move while it is there.
//! 2. The slot is released only when the kernel posts the op's *final*
//!    completion (for multishot ops: the one without `IORING_CQE_F_MORE`;
//!    for an op with a linked timeout: after the timeout's CQE as well).
//!    The resources come back in [`Completion::resources`] ([`Returned`]).
//! 3. Fds used by ops are [`SharedFd`] (`Rc<OwnedFd>`): the op holds a
//!    clone, so the fd number cannot be closed and reused under it. New fds
//!    (accept, openat) come back as `OwnedFd`, so ignoring one closes it.
//! 4. Fixed buffers and provided buffers are RAII leases on memory allocated
//!    once; the pool memory is reference-counted by the leases and the
//!    driver, so it outlives the ring's registration.
//! 5. Pipes return to their pool only when empty; the driver counts bytes in
//!    each pipe from splice completions.
//!
//! # `user_data` layout
//!
//! `tag:8 | generation:24 | slot:32` ([`UserData`]). The tag is an
//! [`OpKind`] (1..=17) or one of the reserved tags declared in one place in
//! `driver.rs` (`WAKE`, `CANCEL`, `LINK_TIMEOUT`); 0 is never used. Each slot
//! bumps its generation when released, so a completion that names a reused
//! slot with an old generation is counted in
//! [`DriverStats::stale_completions`] and ignored.
//!
//! The caller's own `token` (given to [`Driver::submit`], returned in each
//! [`Completion`]) is a [`Token`]: listener, read-ahead, waker, or a
//! connection's or task's slot and generation. Its reserved values are
//! declared in `driver.rs` too, beside the driver's tags.
//!
//! # Cancel
//!
//! [`Driver::cancel`] pushes an `ASYNC_CANCEL` (tagged `CANCEL`, its own
//! result is not reported). The cancelled op's resources stay parked in its
//! slot, as monoio does, until the op's own completion (usually
//! `Err(ECANCELED)`, or a result if it finished first) hands them back.
//!
//! # Drop
//!
//! Dropping a [`Driver`] (or [`Driver::shutdown`]) cancels every op in
//! flight, including its own eventfd read, and waits up to
//! [`DROP_DRAIN_TIMEOUT`] for their completions, dropping the resources they
//! return. If the kernel still owns some after that, their slots, buffers
//! and pools are leaked on purpose (`mem::forget`) rather than freed under
//! the kernel. The io_uring fd is closed before any pool memory is freed
//! (field order).
//!
//! # Waiting
//!
//! On a DEFER_TASKRUN ring completions become visible only when the owning
//! thread enters the kernel, so a loop turn is: [`Driver::wait`] (submit and
//! wait), then [`Driver::complete`] into a bounded batch, then dispatch.
//! [`Waker::wake`] (an eventfd write) from any thread ends a blocked wait.
#![deny(
    unsafe_op_in_unsafe_fn,
    clippy::undocumented_unsafe_blocks,
    clippy::missing_safety_doc
)]

pub mod allocator;
pub mod buffers;
pub mod driver;
pub mod errno;
pub mod inherit;
pub mod ioprio;
pub mod pipe;
pub mod probe;
pub mod residency;
pub mod ring;
pub mod sched;
pub mod stamp;
pub mod writeback;

pub use buffers::{BufLease, BufRing, FixedBufferPool, FixedLease, RegistrationRefused};
pub use driver::{
    CancelError, Completion, Driver, DriverConfig, DriverStats, IoBuf, LinkedSubmitError, Op, OpId,
    OpKind, Returned, SharedFd, Statx, SubmitError, SubmitErrorKind, Token, UserData, Waker,
    DROP_DRAIN_TIMEOUT,
};
pub use errno::{Errno, ErrnoClass};
pub use pipe::{Pipe, PipePool, PipePoolStats};
pub use probe::{probe, unavailable_reason, OpSupport, ProbeReport, Unavailable, OPS_OF_INTEREST};
pub use residency::{residency, Residency};
pub use ring::{QueueFull, Ring, RingConfig, SetupFlags};
pub use stamp::{enable_rx_timestamps, recv_stamped, recv_stamped_into, RxStamp};
pub use writeback::sync_file_range;
