//! Kernel receive timestamps of socket data: when the kernel took a
//! request's first bytes off the wire, the moment the client's clock started
//! (give or take the network), as opposed to when a busy thread got round to
//! parsing them.
//!
//! A socket with `SO_TIMESTAMPING` (`SOF_TIMESTAMPING_RX_SOFTWARE |
//! SOF_TIMESTAMPING_SOFTWARE`) gets every received packet stamped by the
//! kernel as it enters the stack; a `recvmsg(2)` with a control buffer then
//! returns the stamp of the last packet it read as an `SCM_TIMESTAMPING`
//! control message (`struct scm_timestamping`, `ts[0]` the software stamp,
//! `CLOCK_REALTIME`). A plain `recv` passes no control buffer, so the stamp
//! costs nothing there: callers choose per receive whether they want it.
//! Accepted TCP sockets inherit the option from their listener, so setting
//! it once on the listener covers every connection without a syscall each.
//!
//! Two ways to read the stamp, with the same memory layout:
//! [`recv_stamped`], a plain syscall for the epoll engine and the fallback,
//! and [`crate::Op::RecvMsg`] on the ring, whose [`MsgBox`] the driver owns
//! until the completion arrives (the kernel writes the control buffer and
//! the header's `msg_controllen` then).

use std::os::fd::{AsRawFd, BorrowedFd};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use crate::errno::Errno;

/// `SOF_TIMESTAMPING_RX_SOFTWARE`: stamp received packets in software.
const SOF_TIMESTAMPING_RX_SOFTWARE: u32 = 1 << 3;
/// `SOF_TIMESTAMPING_SOFTWARE`: report software stamps in control messages.
const SOF_TIMESTAMPING_SOFTWARE: u32 = 1 << 4;
/// The flags [`enable_rx_timestamps`] sets.
pub const RX_TIMESTAMP_FLAGS: u32 = SOF_TIMESTAMPING_RX_SOFTWARE | SOF_TIMESTAMPING_SOFTWARE;

/// Bytes of control buffer one receive offers: room for one
/// `SCM_TIMESTAMPING` (a 16-byte header and three timespecs) with margin
/// for one more small message; anything else is cut (`MSG_CTRUNC`) and the
/// stamp, which comes first, is still read.
pub const CONTROL_BYTES: usize = 128;
const CONTROL_WORDS: usize = CONTROL_BYTES / 8;

/// A kernel receive timestamp: `CLOCK_REALTIME`, nanoseconds since the
/// Unix epoch.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct RxStamp {
    pub unix_ns: u64,
}

impl RxStamp {
    /// The stamp of `t` (for tests and for callers that stamp themselves).
    pub fn of(t: SystemTime) -> RxStamp {
        let ns = t
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX));
        RxStamp { unix_ns: ns }
    }

    /// Time from the stamp to `now`; zero if the wall clock stepped back
    /// past it (the stamp is `CLOCK_REALTIME`, so an NTP step can do that).
    pub fn age_at(self, now: SystemTime) -> Duration {
        Duration::from_nanos(RxStamp::of(now).unix_ns.saturating_sub(self.unix_ns))
    }
}

/// Turns on software receive stamps for `fd` (a listener: accepted sockets
/// inherit it). Turning it on for any socket makes the kernel stamp every
/// received packet on the host (a clock read each), which is the cost
/// docs/replication.md measures. The kernel switches stamping on for the
/// host from a work item, so packets in the first moments after the first
/// socket asks may arrive unstamped (their receives report no stamp).
pub fn enable_rx_timestamps(fd: BorrowedFd<'_>) -> Result<(), Errno> {
    let flags: libc::c_int = RX_TIMESTAMP_FLAGS as libc::c_int;
    // SAFETY: passes a pointer to a live c_int and its exact size; the
    // kernel only reads it during the call.
    let rc = unsafe {
        libc::setsockopt(
            fd.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_TIMESTAMPING,
            std::ptr::addr_of!(flags).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(Errno::from_io(&std::io::Error::last_os_error()))
    }
}

/// The `SO_TIMESTAMPING` flags in force on `fd`.
pub fn rx_timestamp_flags(fd: BorrowedFd<'_>) -> Result<u32, Errno> {
    let mut flags: libc::c_int = 0;
    let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
    // SAFETY: the kernel writes at most `len` bytes into the live c_int and
    // updates `len`, both valid for the call's duration.
    let rc = unsafe {
        libc::getsockopt(
            fd.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_TIMESTAMPING,
            std::ptr::addr_of_mut!(flags).cast(),
            &mut len,
        )
    };
    if rc == 0 {
        Ok(flags as u32)
    } else {
        Err(Errno::from_io(&std::io::Error::last_os_error()))
    }
}

/// The memory of one `recvmsg`: its header, one iovec and the control
/// buffer, kept together so that the header's pointers into the other two
/// stay valid while the box does not move (the driver keeps it boxed in the
/// operation's slot until the completion).
pub struct MsgBox {
    hdr: libc::msghdr,
    iov: libc::iovec,
    /// u64 words, so the buffer has the alignment `cmsghdr` needs.
    control: [u64; CONTROL_WORDS],
}

impl MsgBox {
    /// An empty box on the heap, for a ring operation: [`MsgBox::prepare`]
    /// stores pointers into it, so it must not move until the receive
    /// completes, which a `Box` owned by the operation's slot ensures.
    pub(crate) fn new_boxed() -> Box<MsgBox> {
        Box::new(MsgBox::zeroed())
    }

    /// An empty box (for a syscall, where it can live on the stack: the
    /// kernel uses it only during the call).
    fn zeroed() -> MsgBox {
        // SAFETY: msghdr and iovec are plain C structs for which all-zero
        // bytes are a valid value (null pointers, zero lengths).
        let (hdr, iov) = unsafe { (std::mem::zeroed(), std::mem::zeroed()) };
        MsgBox {
            hdr,
            iov,
            control: [0; CONTROL_WORDS],
        }
    }

    /// Points the header at `len` bytes at `data` and at the control
    /// buffer; returns the header for the kernel. `data` must stay valid
    /// for writes of `len` bytes until the receive completes.
    pub(crate) fn prepare(&mut self, data: *mut u8, len: usize) -> *mut libc::msghdr {
        self.iov.iov_base = data.cast();
        self.iov.iov_len = len;
        self.control = [0; CONTROL_WORDS];
        self.hdr.msg_name = std::ptr::null_mut();
        self.hdr.msg_namelen = 0;
        self.hdr.msg_iov = std::ptr::addr_of_mut!(self.iov);
        self.hdr.msg_iovlen = 1;
        self.hdr.msg_control = self.control.as_mut_ptr().cast();
        self.hdr.msg_controllen = CONTROL_BYTES as _;
        self.hdr.msg_flags = 0;
        std::ptr::addr_of_mut!(self.hdr)
    }

    /// The receive timestamp among the control messages the kernel wrote
    /// (after the receive completed), if any.
    pub(crate) fn stamp(&self) -> Option<RxStamp> {
        // size_t on glibc, socklen_t on musl.
        #[allow(clippy::unnecessary_cast)]
        let written = (self.hdr.msg_controllen as usize).min(CONTROL_BYTES);
        let control = &self.control;
        // SAFETY: a byte view of the u64 array: same memory, u8 has no
        // alignment or validity requirement, and the array lives as long
        // as `control`.
        let bytes =
            unsafe { std::slice::from_raw_parts(control.as_ptr().cast::<u8>(), CONTROL_BYTES) };
        parse_control(&bytes[..written])
    }
}

/// Reads `SCM_TIMESTAMPING` out of a control buffer of `cmsghdr`-framed
/// messages (the layout `CMSG_NXTHDR` walks: a header of `cmsg_len` (usize),
/// level and type (i32 each), the data, padding to 8 bytes). Safe code over
/// bytes, so a malformed buffer yields `None`, never a bad read.
pub fn parse_control(buf: &[u8]) -> Option<RxStamp> {
    const HDR: usize = std::mem::size_of::<libc::cmsghdr>();
    const ALIGN: usize = std::mem::size_of::<usize>();
    let mut at = 0usize;
    while at + HDR <= buf.len() {
        let word = |i: usize| -> Option<[u8; 8]> { buf.get(i..i + 8)?.try_into().ok() };
        let int = |i: usize| -> Option<i32> {
            Some(i32::from_ne_bytes(buf.get(i..i + 4)?.try_into().ok()?))
        };
        let len = usize::try_from(u64::from_ne_bytes(word(at)?)).ok()?;
        let level = int(at + 8)?;
        let kind = int(at + 12)?;
        if len < HDR || at + len > buf.len() {
            return None;
        }
        if level == libc::SOL_SOCKET && kind == libc::SCM_TIMESTAMPING && len >= HDR + 16 {
            // ts[0]: the software stamp (tv_sec: i64, tv_nsec: i64).
            let sec = i64::from_ne_bytes(word(at + HDR)?);
            let nsec = i64::from_ne_bytes(word(at + HDR + 8)?);
            if sec <= 0 || !(0..1_000_000_000).contains(&nsec) {
                // All zero: the packet was not stamped (timestamping was
                // turned on after it arrived).
                return None;
            }
            let ns = u64::try_from(sec)
                .ok()?
                .checked_mul(1_000_000_000)?
                .checked_add(u64::try_from(nsec).ok()?)?;
            return Some(RxStamp { unix_ns: ns });
        }
        at += len.div_ceil(ALIGN) * ALIGN;
    }
    None
}

/// `recvmsg(2)` into `buf` (already initialised memory, as tokio's
/// `ReadBuf::initialize_unfilled` gives), asking for the receive timestamp.
pub fn recv_stamped_into(
    fd: BorrowedFd<'_>,
    buf: &mut [u8],
    flags: i32,
) -> Result<(usize, Option<RxStamp>), Errno> {
    if buf.is_empty() {
        return Err(Errno::EINVAL);
    }
    let mut msg = MsgBox::zeroed();
    let hdr = msg.prepare(buf.as_mut_ptr(), buf.len());
    // SAFETY: `hdr` points into `msg`, alive and unmoved for the call; its
    // iovec points at `buf`, borrowed mutably here and valid for writes of
    // its length; its control pointer at the box's own buffer.
    let n = unsafe { libc::recvmsg(fd.as_raw_fd(), hdr, flags) };
    if n < 0 {
        return Err(Errno::from_io(&std::io::Error::last_os_error()));
    }
    Ok(((n as usize).min(buf.len()), msg.stamp()))
}

/// `recvmsg(2)` into the spare capacity of `buf` (its length grows by the
/// bytes received), asking for the receive timestamp. `flags` are `MSG_*`
/// (`MSG_PEEK`, `MSG_DONTWAIT`). `Ok((0, _))` is the peer's end of stream.
/// The epoll engine and the fallback use it on their sampled receives.
pub fn recv_stamped(
    fd: BorrowedFd<'_>,
    buf: &mut Vec<u8>,
    flags: i32,
) -> Result<(usize, Option<RxStamp>), Errno> {
    let spare = buf.spare_capacity_mut();
    if spare.is_empty() {
        return Err(Errno::EINVAL);
    }
    // On the stack: the kernel uses it only during the call.
    let mut msg = MsgBox::zeroed();
    let hdr = msg.prepare(spare.as_mut_ptr().cast(), spare.len());
    // SAFETY: `hdr` points into `msg`, which is alive and does not move for
    // the call; its iovec points at the spare capacity of `buf` (valid for
    // writes of its length, borrowed mutably here) and its control pointer
    // at the box's own buffer of `CONTROL_BYTES`.
    let n = unsafe { libc::recvmsg(fd.as_raw_fd(), hdr, flags) };
    if n < 0 {
        return Err(Errno::from_io(&std::io::Error::last_os_error()));
    }
    let n = n as usize;
    let n = n.min(buf.capacity() - buf.len());
    // SAFETY: the kernel initialised `n` bytes of the spare capacity (the
    // call's result), clamped to the spare capacity.
    unsafe { buf.set_len(buf.len() + n) };
    Ok((n, msg.stamp()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cmsg(level: i32, kind: i32, data: &[u8]) -> Vec<u8> {
        let len = 16 + data.len();
        let mut out = Vec::new();
        out.extend_from_slice(&(len as u64).to_ne_bytes());
        out.extend_from_slice(&level.to_ne_bytes());
        out.extend_from_slice(&kind.to_ne_bytes());
        out.extend_from_slice(data);
        while out.len() % 8 != 0 {
            out.push(0);
        }
        out
    }

    fn timespecs(sec: i64, nsec: i64) -> Vec<u8> {
        let mut d = Vec::new();
        d.extend_from_slice(&sec.to_ne_bytes());
        d.extend_from_slice(&nsec.to_ne_bytes());
        d.extend_from_slice(&[0u8; 32]); // ts[1], ts[2]: hardware, unused
        d
    }

    #[test]
    fn control_messages_table() {
        let stamp = cmsg(libc::SOL_SOCKET, libc::SCM_TIMESTAMPING, &timespecs(5, 7));
        let other = cmsg(libc::SOL_SOCKET, libc::SCM_RIGHTS, &[1, 2, 3, 4]);
        let zero = cmsg(libc::SOL_SOCKET, libc::SCM_TIMESTAMPING, &timespecs(0, 0));
        let bad_nsec = cmsg(
            libc::SOL_SOCKET,
            libc::SCM_TIMESTAMPING,
            &timespecs(5, 1_000_000_000),
        );
        let mut long_len = stamp.clone();
        long_len[..8].copy_from_slice(&4096u64.to_ne_bytes());
        let mut short_len = stamp.clone();
        short_len[..8].copy_from_slice(&4u64.to_ne_bytes());
        let want = Some(RxStamp {
            unix_ns: 5_000_000_007,
        });
        let rows: Vec<(&str, Vec<u8>, Option<RxStamp>)> = vec![
            ("empty", vec![], None),
            ("the stamp alone", stamp.clone(), want),
            (
                "after another message",
                [other.clone(), stamp.clone()].concat(),
                want,
            ),
            ("only another message", other.clone(), None),
            ("unstamped packet", zero, None),
            ("nanoseconds out of range", bad_nsec, None),
            ("length past the buffer", long_len, None),
            ("length shorter than a header", short_len, None),
            ("cut in the middle", stamp[..20].to_vec(), None),
        ];
        for (name, buf, expect) in rows {
            assert_eq!(parse_control(&buf), expect, "{name}");
        }
    }

    #[test]
    fn age_saturates_when_the_clock_steps_back() {
        let now = SystemTime::now();
        let stamp = RxStamp::of(now + Duration::from_secs(5));
        assert_eq!(stamp.age_at(now), Duration::ZERO);
        let stamp = RxStamp::of(now - Duration::from_millis(3));
        assert_eq!(stamp.age_at(now), Duration::from_millis(3));
    }
}
