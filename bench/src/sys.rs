//! The few raw Linux calls the load generator needs (splice, sendfile, pipe sizing, CPU
//! affinity), each wrapped in a tiny safe function so the `unsafe` stays here.

use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

/// Creates a pipe (close-on-exec) and returns its (read end, write end).
pub fn pipe() -> io::Result<(OwnedFd, OwnedFd)> {
    let mut fds = [0 as libc::c_int; 2];
    // SAFETY: `fds` is a valid, writable array of two c_ints, exactly what pipe2 fills in.
    let rc = unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: pipe2 succeeded, so both descriptors are open and owned by nobody else yet.
    let read_end = unsafe { OwnedFd::from_raw_fd(fds[0]) };
    // SAFETY: as above, for the write end.
    let write_end = unsafe { OwnedFd::from_raw_fd(fds[1]) };
    Ok((read_end, write_end))
}

/// Asks the kernel to size a pipe to `bytes` (rounded up to pages, capped by
/// `/proc/sys/fs/pipe-max-size`); returns the size granted.
pub fn set_pipe_size(fd: &impl AsRawFd, bytes: usize) -> io::Result<usize> {
    let want = libc::c_int::try_from(bytes).unwrap_or(libc::c_int::MAX);
    // SAFETY: F_SETPIPE_SZ takes an int argument and touches no memory of ours; a bad fd is
    // reported as an error, not undefined behaviour.
    let rc = unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_SETPIPE_SZ, want) };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(usize::try_from(rc).unwrap_or(0))
}

/// Moves up to `len` bytes from `from` to `to` with splice(2) (one side must be a pipe), with
/// `SPLICE_F_MOVE | SPLICE_F_MORE`. Returns the bytes moved; 0 means end of input.
pub fn splice(from: &impl AsRawFd, to: &impl AsRawFd, len: usize) -> io::Result<usize> {
    // SAFETY: null offsets make splice use and advance the file positions; no memory of ours is
    // read or written, so any fd values are at worst an error return.
    let rc = unsafe {
        libc::splice(
            from.as_raw_fd(),
            std::ptr::null_mut(),
            to.as_raw_fd(),
            std::ptr::null_mut(),
            len,
            libc::SPLICE_F_MOVE | libc::SPLICE_F_MORE,
        )
    };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(usize::try_from(rc).unwrap_or(0))
}

/// Sends up to `len` bytes of `file` starting at `*offset` into `socket` with sendfile(2) and
/// advances `*offset`. Returns the bytes sent.
pub fn sendfile(
    socket: &impl AsRawFd,
    file: &File,
    offset: &mut u64,
    len: usize,
) -> io::Result<usize> {
    let mut off = libc::off_t::try_from(*offset)
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "offset beyond off_t"))?;
    // SAFETY: `off` is a live, writable off_t for the duration of the call; the kernel reads and
    // updates only it.
    let rc = unsafe { libc::sendfile(socket.as_raw_fd(), file.as_raw_fd(), &mut off, len) };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    *offset = u64::try_from(off).unwrap_or(*offset);
    Ok(usize::try_from(rc).unwrap_or(0))
}

/// The size of a memory page, bytes (4096 if sysconf cannot tell).
pub fn page_bytes() -> u64 {
    // SAFETY: sysconf only reads the name passed and returns a value; no memory is shared.
    let rc = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    u64::try_from(rc).ok().filter(|&n| n > 0).unwrap_or(4096)
}

/// Sets or clears `TCP_CORK` on a TCP socket: while set, the kernel sends only full segments.
pub fn set_tcp_cork(socket: &impl AsRawFd, on: bool) -> io::Result<()> {
    let value: libc::c_int = on.into();
    // SAFETY: `value` is a live c_int for the duration of the call and its size is passed; the
    // kernel only reads it.
    let rc = unsafe {
        libc::setsockopt(
            socket.as_raw_fd(),
            libc::IPPROTO_TCP,
            libc::TCP_CORK,
            (&value as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Pins the calling thread to one CPU. Errors (CPU offline, not allowed by the cpuset) are
/// returned, and the caller decides whether a run without pinning is acceptable.
pub fn pin_current_thread(cpu: usize) -> io::Result<()> {
    if cpu >= libc::CPU_SETSIZE as usize {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "cpu index beyond CPU_SETSIZE",
        ));
    }
    // SAFETY: cpu_set_t is a plain bit array for which all-zero is the valid empty set.
    let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
    // SAFETY: `cpu` was checked against CPU_SETSIZE above, so CPU_SET stays inside `set`.
    unsafe { libc::CPU_SET(cpu, &mut set) };
    // SAFETY: `set` is a valid cpu_set_t and the size passed is its exact size; pid 0 is the
    // calling thread.
    let rc = unsafe { libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set) };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Clock ticks per second for the times in `/proc/PID/stat` (`sysconf(_SC_CLK_TCK)`, 100 on
/// every Linux port in practice, which is also the fallback).
pub fn clock_ticks_per_sec() -> u64 {
    // SAFETY: sysconf reads a constant and has no memory effects.
    let rc = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    u64::try_from(rc).ok().filter(|&t| t > 0).unwrap_or(100)
}

/// Sends SIGTERM to a process this program started (a server under test), so it can take its
/// own children down with it (nginx's master stops its workers; SIGKILL would orphan them).
pub fn terminate(pid: u32) -> io::Result<()> {
    let pid = libc::pid_t::try_from(pid)
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "pid beyond pid_t"))?;
    // SAFETY: kill(2) touches no memory; a stale pid is at worst ESRCH. Callers pass only the
    // pid of a child they still hold (not yet reaped), so it cannot have been reused.
    let rc = unsafe { libc::kill(pid, libc::SIGTERM) };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Stops `child`: SIGTERM, then SIGKILL if it has not exited within `grace`; reaps it.
pub fn stop_child(child: &mut std::process::Child, grace: std::time::Duration) {
    if terminate(child.id()).is_ok() {
        let deadline = std::time::Instant::now() + grace;
        while std::time::Instant::now() < deadline {
            if let Ok(Some(_)) = child.try_wait() {
                return;
            }
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
    }
    let _ = child.kill();
    let _ = child.wait();
}
