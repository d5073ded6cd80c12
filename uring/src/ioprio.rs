//! I/O priorities (`ioprio_set(2)` encoding): bulk reads of cold bodies go below the rest,
//! where the block device's scheduler honours priorities.
//!
//! What honours them: BFQ per class and level; mq-deadline per class only (real-time,
//! best-effort, idle), so a best-effort level changes nothing there; `none` (common on
//! virtio and NVMe) nothing at all. A cgroup's `blkio.throttle` queues bios before any
//! scheduler sees them, so under a throttle the priority cannot reorder what it holds.

use crate::errno::Errno;

/// `IOPRIO_CLASS_BE`: best effort, the default class.
pub const CLASS_BEST_EFFORT: u16 = 2;
/// `IOPRIO_WHO_PROCESS`: with id 0, the calling thread.
const WHO_PROCESS: libc::c_int = 1;

/// The encoded priority of `class` at `level` (0 highest, 7 lowest).
pub const fn value(class: u16, level: u16) -> u16 {
    (class << 13) | (level & 7)
}

/// What bulk cold reads carry: best effort, the lowest level (7), so that where levels
/// count, any other read of the process (a cold open, a small body) goes first, and no
/// class change can starve them (an idle-class read waits for every other I/O).
pub const BULK_READ: u16 = value(CLASS_BEST_EFFORT, 7);

/// Set the calling thread's I/O priority (`ioprio_set(IOPRIO_WHO_PROCESS, 0, prio)`).
pub fn set_current_thread(prio: u16) -> Result<(), Errno> {
    // SAFETY: ioprio_set takes three integers and touches no memory of ours.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_ioprio_set,
            WHO_PROCESS,
            0 as libc::c_int,
            libc::c_int::from(prio),
        )
    };
    if rc < 0 {
        return Err(Errno::from_io(&std::io::Error::last_os_error()));
    }
    Ok(())
}

/// The calling thread's I/O priority, as `ioprio_get` reports it.
pub fn current_thread() -> Result<u16, Errno> {
    // SAFETY: as above.
    let rc = unsafe { libc::syscall(libc::SYS_ioprio_get, WHO_PROCESS, 0 as libc::c_int) };
    if rc < 0 {
        return Err(Errno::from_io(&std::io::Error::last_os_error()));
    }
    Ok(u16::try_from(rc).unwrap_or(0))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_thread_lowers_its_own_priority_only() {
        let other = std::thread::spawn(|| {
            set_current_thread(BULK_READ).expect("ioprio_set");
            current_thread().expect("ioprio_get")
        })
        .join()
        .expect("thread");
        assert_eq!(other, BULK_READ);
        assert_ne!(current_thread().expect("ioprio_get"), BULK_READ);
    }
}
