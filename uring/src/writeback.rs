//! Starting write-back of a file range without waiting for it.
//!
//! A large upload is written to the page cache as it arrives; under
//! `fsync = always` its final `fdatasync` would then have to write all of it.
//! `sync_file_range(SYNC_FILE_RANGE_WRITE)` every few MiB starts that
//! write-back while the rest of the body is still arriving, so the final
//! sync finds little left to do. The ring engine submits the same call as
//! [`crate::Op::SyncFileRange`]; this is the plain syscall for the threads
//! that may block (the fallback's, the epoll engine's). It promises no
//! durability: no metadata, no cache flush.

use std::os::fd::{AsFd, AsRawFd};

use crate::Errno;

/// `sync_file_range(fd, offset, len, flags)`; `len` 0 means to the end of the
/// file. `EINVAL` for an offset or length past `i64`.
pub fn sync_file_range(fd: impl AsFd, offset: u64, len: u64, flags: u32) -> Result<(), Errno> {
    let (Ok(offset), Ok(len)) = (i64::try_from(offset), i64::try_from(len)) else {
        return Err(Errno::EINVAL);
    };
    // SAFETY: sync_file_range takes an fd, which `fd` keeps open for the
    // call, and plain integers; it reads or writes no memory of ours.
    let rc = unsafe { libc::sync_file_range(fd.as_fd().as_raw_fd(), offset, len, flags) };
    if rc == 0 {
        Ok(())
    } else {
        Err(Errno::from_io(&std::io::Error::last_os_error()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    #[test]
    fn starts_write_back_and_refuses_what_does_not_fit() {
        let mut file = tempfile::tempfile().unwrap();
        file.write_all(&vec![7u8; 1 << 20]).unwrap();
        sync_file_range(&file, 0, 0, libc::SYNC_FILE_RANGE_WRITE).unwrap();
        // Waiting for it works too, and then nothing of the range is dirty.
        sync_file_range(
            &file,
            0,
            1 << 20,
            libc::SYNC_FILE_RANGE_WAIT_BEFORE
                | libc::SYNC_FILE_RANGE_WRITE
                | libc::SYNC_FILE_RANGE_WAIT_AFTER,
        )
        .unwrap();
        assert_eq!(
            sync_file_range(&file, u64::MAX, 1, libc::SYNC_FILE_RANGE_WRITE),
            Err(Errno::EINVAL)
        );
        let (reader, _writer) = std::os::unix::net::UnixStream::pair().unwrap();
        assert_eq!(
            sync_file_range(&reader, 0, 0, libc::SYNC_FILE_RANGE_WRITE),
            Err(Errno(libc::ESPIPE))
        );
    }
}
