//! Typed decoding of the negative errno values that completions carry.
//!
//! STYLE.md asks every operation's errno to be decoded into what the caller
//! should do about it, so that the engine's transition function matches on a
//! small enum instead of scattering `libc::E*` comparisons.

use std::fmt;

/// A positive errno value taken from a completion's negative result.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct Errno(pub i32);

/// What the caller should do about an [`Errno`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ErrnoClass {
    /// `EINTR`, `EAGAIN`: transient, submit the same operation again.
    Resubmit,
    /// `ECANCELED`: the operation was cancelled (expected at shutdown or after
    /// [`crate::Driver::cancel`]); not an error worth a log line.
    Cancelled,
    /// `ETIME`: a timeout fired (the normal outcome of a timeout operation, or
    /// a linked timeout that cut the operation short).
    TimedOut,
    /// `ENOBUFS`: a multishot receive ran out of provided buffers; return the
    /// leases and arm it again.
    NoBuffers,
    /// `EPIPE`, `ECONNRESET`, `ECONNABORTED`, `ENOTCONN`, `ESHUTDOWN`: the
    /// peer went away; end the connection quietly.
    PeerGone,
    /// Anything else: the caller logs it once and counts it.
    Other,
}

impl Errno {
    pub const EINTR: Errno = Errno(libc::EINTR);
    pub const EAGAIN: Errno = Errno(libc::EAGAIN);
    pub const ECANCELED: Errno = Errno(libc::ECANCELED);
    pub const ETIME: Errno = Errno(libc::ETIME);
    pub const ENOBUFS: Errno = Errno(libc::ENOBUFS);
    pub const EPIPE: Errno = Errno(libc::EPIPE);
    pub const ECONNRESET: Errno = Errno(libc::ECONNRESET);
    pub const ENOENT: Errno = Errno(libc::ENOENT);
    pub const EINVAL: Errno = Errno(libc::EINVAL);

    /// Decodes a raw completion result: `res >= 0` is a success value,
    /// `res < 0` an errno.
    pub fn from_result(res: i32) -> Result<u32, Errno> {
        if res >= 0 {
            Ok(res.unsigned_abs())
        } else {
            Err(Errno(res.saturating_neg()))
        }
    }

    /// Decodes an [`std::io::Error`] from a syscall; errors without an OS
    /// code become `EINVAL` (they only come from argument checks in Rust).
    pub fn from_io(err: &std::io::Error) -> Errno {
        Errno(err.raw_os_error().unwrap_or(libc::EINVAL))
    }

    /// The action class for this errno.
    pub fn class(self) -> ErrnoClass {
        match self.0 {
            // EWOULDBLOCK == EAGAIN on Linux; listed once.
            libc::EINTR | libc::EAGAIN => ErrnoClass::Resubmit,
            libc::ECANCELED => ErrnoClass::Cancelled,
            libc::ETIME => ErrnoClass::TimedOut,
            libc::ENOBUFS => ErrnoClass::NoBuffers,
            libc::EPIPE
            | libc::ECONNRESET
            | libc::ECONNABORTED
            | libc::ENOTCONN
            | libc::ESHUTDOWN => ErrnoClass::PeerGone,
            _ => ErrnoClass::Other,
        }
    }

    /// The symbolic name (`"ECONNRESET"`) for the errnos sluice meets often,
    /// `None` for the rest.
    pub fn name(self) -> Option<&'static str> {
        Some(match self.0 {
            libc::EPERM => "EPERM",
            libc::ENOENT => "ENOENT",
            libc::EINTR => "EINTR",
            libc::EBADF => "EBADF",
            libc::EAGAIN => "EAGAIN",
            libc::ENOMEM => "ENOMEM",
            libc::EACCES => "EACCES",
            libc::EFAULT => "EFAULT",
            libc::EBUSY => "EBUSY",
            libc::EINVAL => "EINVAL",
            libc::ENOSPC => "ENOSPC",
            libc::EPIPE => "EPIPE",
            libc::ENOSYS => "ENOSYS",
            libc::ETIME => "ETIME",
            libc::EOPNOTSUPP => "EOPNOTSUPP",
            libc::ECONNABORTED => "ECONNABORTED",
            libc::ECONNRESET => "ECONNRESET",
            libc::ENOBUFS => "ENOBUFS",
            libc::ENOTCONN => "ENOTCONN",
            libc::ESHUTDOWN => "ESHUTDOWN",
            libc::ECANCELED => "ECANCELED",
            libc::EALREADY => "EALREADY",
            _ => return None,
        })
    }
}

impl fmt::Debug for Errno {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.name() {
            Some(name) => write!(f, "{name}"),
            None => write!(f, "Errno({})", self.0),
        }
    }
}

impl fmt::Display for Errno {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let text = std::io::Error::from_raw_os_error(self.0);
        match self.name() {
            Some(name) => write!(f, "{name}: {text}"),
            None => write!(f, "errno {}: {text}", self.0),
        }
    }
}

impl std::error::Error for Errno {}

impl From<Errno> for std::io::Error {
    fn from(errno: Errno) -> Self {
        std::io::Error::from_raw_os_error(errno.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn classes_table() {
        let table: &[(i32, ErrnoClass)] = &[
            (libc::EINTR, ErrnoClass::Resubmit),
            (libc::EAGAIN, ErrnoClass::Resubmit),
            (libc::ECANCELED, ErrnoClass::Cancelled),
            (libc::ETIME, ErrnoClass::TimedOut),
            (libc::ENOBUFS, ErrnoClass::NoBuffers),
            (libc::EPIPE, ErrnoClass::PeerGone),
            (libc::ECONNRESET, ErrnoClass::PeerGone),
            (libc::ECONNABORTED, ErrnoClass::PeerGone),
            (libc::ENOSPC, ErrnoClass::Other),
            (libc::EBADF, ErrnoClass::Other),
        ];
        for &(raw, class) in table {
            assert_eq!(Errno(raw).class(), class, "errno {raw}");
        }
    }

    #[test]
    fn from_result_table() {
        assert_eq!(Errno::from_result(0), Ok(0));
        assert_eq!(Errno::from_result(4096), Ok(4096));
        assert_eq!(Errno::from_result(-libc::EPIPE), Err(Errno::EPIPE));
        assert_eq!(Errno::from_result(i32::MIN), Err(Errno(i32::MAX)));
    }

    #[test]
    fn display_names_the_errno() {
        assert!(Errno::ECONNRESET.to_string().starts_with("ECONNRESET: "));
        assert_eq!(format!("{:?}", Errno(9999)), "Errno(9999)");
    }
}
