//! The scheduling class of the calling thread: background work (replication
//! bodies, anti-entropy walks, tier uploads) runs in `SCHED_IDLE` or at nice
//! 19, so the kernel's scheduler, not only a rate, makes it give way to
//! public work. Linux applies both per thread (`sched_setscheduler(0, ..)`
//! and `setpriority(PRIO_PROCESS, tid, ..)` name the calling thread), and a
//! thread's class is inherited by the threads it starts, io_uring's io-wq
//! workers among them.

use crate::errno::Errno;

/// `SCHED_IDLE` for the calling thread: it runs only when no normal thread
/// of its CPU wants to (the kernel gives it a weight of 3 against 1024 for a
/// nice-0 thread). An unprivileged thread may always lower itself to it.
pub fn set_current_thread_idle() -> Result<(), Errno> {
    let param = libc::sched_param { sched_priority: 0 };
    // SAFETY: pid 0 names the calling thread; `param` is a live struct the
    // kernel only reads during the call.
    let rc = unsafe { libc::sched_setscheduler(0, libc::SCHED_IDLE, &param) };
    if rc == 0 {
        Ok(())
    } else {
        Err(Errno::from_io(&std::io::Error::last_os_error()))
    }
}

/// `SCHED_OTHER` at `nice` (-20..=19) for the calling thread.
pub fn set_current_thread_nice(nice: i32) -> Result<(), Errno> {
    let param = libc::sched_param { sched_priority: 0 };
    // SAFETY: as above; SCHED_OTHER takes priority 0.
    let rc = unsafe { libc::sched_setscheduler(0, libc::SCHED_OTHER, &param) };
    if rc != 0 {
        return Err(Errno::from_io(&std::io::Error::last_os_error()));
    }
    let tid = current_thread_id();
    // SAFETY: plain integers; PRIO_PROCESS with a thread id sets that
    // thread's nice value only (Linux).
    let rc = unsafe { libc::setpriority(libc::PRIO_PROCESS, tid as libc::id_t, nice) };
    if rc == 0 {
        Ok(())
    } else {
        Err(Errno::from_io(&std::io::Error::last_os_error()))
    }
}

/// The calling thread's policy (`libc::SCHED_IDLE`, `libc::SCHED_OTHER`, ...).
pub fn current_thread_policy() -> Result<i32, Errno> {
    // SAFETY: pid 0 names the calling thread; no pointers.
    let rc = unsafe { libc::sched_getscheduler(0) };
    if rc >= 0 {
        Ok(rc)
    } else {
        Err(Errno::from_io(&std::io::Error::last_os_error()))
    }
}

/// The calling thread's kernel id (what `/proc/self/task/` lists and a
/// cgroup's `cgroup.threads` takes).
pub fn current_thread_id() -> u32 {
    // SAFETY: gettid takes no arguments and cannot fail.
    let tid = unsafe { libc::gettid() };
    tid as u32
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_thread_lowers_itself_and_only_itself() {
        let before = current_thread_policy().expect("policy");
        let child = std::thread::spawn(|| {
            set_current_thread_idle().expect("SCHED_IDLE is always allowed");
            let idle = current_thread_policy().expect("policy");
            // A thread started from an idle thread inherits the class.
            let grandchild = std::thread::spawn(|| current_thread_policy().expect("policy"))
                .join()
                .expect("join");
            set_current_thread_nice(19).expect("raising nice is always allowed");
            (idle, grandchild, current_thread_policy().expect("policy"))
        })
        .join()
        .expect("join");
        assert_eq!(
            child,
            (libc::SCHED_IDLE, libc::SCHED_IDLE, libc::SCHED_OTHER)
        );
        assert_eq!(current_thread_policy().expect("policy"), before);
        assert!(current_thread_id() > 0);
    }
}
