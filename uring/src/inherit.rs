//! Listening sockets inherited through systemd's socket activation: `LISTEN_PID` names this
//! process and `LISTEN_FDS` counts descriptors starting at 3 (`SD_LISTEN_FDS_START`).
//! Taking ownership of a descriptor by number is the one thing here `src/` cannot do safely,
//! so it lives in this crate with its checks.

use std::os::fd::{FromRawFd, OwnedFd, RawFd};
use std::sync::atomic::{AtomicBool, Ordering};

/// First inherited descriptor (`SD_LISTEN_FDS_START`).
pub const LISTEN_FDS_START: RawFd = 3;
/// Most descriptors taken: a bound against a corrupt `LISTEN_FDS`.
pub const LISTEN_FDS_MAX: usize = 256;

/// Set by the first call: a second one must not create a second owner of the same numbers.
static TAKEN: AtomicBool = AtomicBool::new(false);

/// The sockets systemd passed to this process, owned from now on, or `Ok(None)` when the
/// variables are absent or meant for another process (`LISTEN_PID` is not ours: a parent's
/// variables leaked into the environment). Each descriptor must be an open socket; it is
/// marked close-on-exec so that only an explicit hand-off passes it on. Works once per
/// process; later calls answer `Ok(None)`.
pub fn take_listen_fds(
    listen_pid: Option<&str>,
    listen_fds: Option<&str>,
) -> Result<Option<Vec<OwnedFd>>, String> {
    let (Some(pid), Some(count)) = (listen_pid, listen_fds) else {
        return Ok(None);
    };
    let pid: u32 = pid
        .trim()
        .parse()
        .map_err(|_| format!("LISTEN_PID = `{pid}` is not a process id"))?;
    if pid != std::process::id() {
        return Ok(None);
    }
    let count: usize = count
        .trim()
        .parse()
        .map_err(|_| format!("LISTEN_FDS = `{count}` is not a count"))?;
    if count == 0 || count > LISTEN_FDS_MAX {
        return Err(format!(
            "LISTEN_FDS = {count}: expected 1 to {LISTEN_FDS_MAX} sockets"
        ));
    }
    if TAKEN.swap(true, Ordering::SeqCst) {
        return Ok(None);
    }
    let mut fds = Vec::with_capacity(count);
    for i in 0..count {
        let fd = LISTEN_FDS_START + RawFd::try_from(i).map_err(|_| "too many fds".to_string())?;
        // SAFETY: fstat only writes into `stat`, which lives on this stack frame; an fd
        // number that is not open makes it fail with EBADF, nothing else.
        let mut stat: libc::stat = unsafe { std::mem::zeroed() };
        // SAFETY: as above; `&mut stat` is a valid pointer to a `libc::stat`.
        if unsafe { libc::fstat(fd, &mut stat) } != 0 {
            return Err(format!(
                "LISTEN_FDS = {count} but descriptor {fd} is not open"
            ));
        }
        if stat.st_mode & libc::S_IFMT != libc::S_IFSOCK {
            return Err(format!(
                "LISTEN_FDS = {count} but descriptor {fd} is not a socket"
            ));
        }
        // SAFETY: the descriptor is open (fstat above) and was open since exec: systemd
        // passed it to this very process (LISTEN_PID matched), so nothing in this process
        // opened it and nothing else owns it; TAKEN makes this the only place that ever
        // wraps these numbers, so there is exactly one owner.
        let owned = unsafe { OwnedFd::from_raw_fd(fd) };
        // SAFETY: fcntl(F_SETFD) on a descriptor this function now owns; it reads no memory.
        unsafe { libc::fcntl(fd, libc::F_SETFD, libc::FD_CLOEXEC) };
        fds.push(owned);
    }
    Ok(Some(fds))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn variables_for_another_process_or_malformed_ones_are_not_taken() {
        assert!(matches!(take_listen_fds(None, Some("1")), Ok(None)));
        assert!(matches!(take_listen_fds(Some("1"), Some("1")), Ok(None)));
        let me = std::process::id().to_string();
        assert!(take_listen_fds(Some(&me), Some("zero")).is_err());
        assert!(take_listen_fds(Some(&me), Some("0")).is_err());
        assert!(take_listen_fds(Some("x"), Some("1")).is_err());
    }
}
