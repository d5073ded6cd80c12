//! What this host allows: whether io_uring can be used at all, which opcodes
//! and set-up flags the kernel has, and the limits that decide whether fixed
//! buffers and large pipes are possible. Printed by `sluice doctor`, kept as
//! plain fields for `/status`.

use std::fmt;

use io_uring::{opcode, IoUring};

use crate::buffers::PageAlloc;
use crate::errno::Errno;

/// One opcode of interest and whether the kernel supports it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct OpSupport {
    /// Short name, e.g. `"splice"`.
    pub name: &'static str,
    /// The `IORING_OP_*` code.
    pub code: u8,
    /// True when the kernel's probe lists the opcode as supported.
    pub supported: bool,
}

/// Why io_uring cannot be used at all.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Unavailable {
    /// The errno `io_uring_setup` returned.
    pub errno: Errno,
    /// A sentence an operator can act on.
    pub reason: String,
}

/// The result of [`probe`]. All fields are plain data for `/status`.
#[derive(Clone, Debug)]
pub struct ProbeReport {
    /// `uname -r`, or `"unknown"` if uname failed.
    pub kernel_release: String,
    /// `None` when a ring could be set up; otherwise why not.
    pub unavailable: Option<Unavailable>,
    /// The value of `/proc/sys/kernel/io_uring_disabled` (0, 1, 2), if the
    /// file exists (kernels from 6.6).
    pub io_uring_disabled_sysctl: Option<u32>,
    /// Opcodes of interest; empty when io_uring is unavailable.
    pub ops: Vec<OpSupport>,
    /// `IORING_SETUP_SINGLE_ISSUER` accepted.
    pub setup_single_issuer: bool,
    /// `IORING_SETUP_COOP_TASKRUN` accepted.
    pub setup_coop_taskrun: bool,
    /// `IORING_SETUP_DEFER_TASKRUN` (with SINGLE_ISSUER) accepted.
    pub setup_defer_taskrun: bool,
    /// `IORING_SETUP_SUBMIT_ALL` accepted.
    pub setup_submit_all: bool,
    /// `IORING_REGISTER_PBUF_RING` worked (provided-buffer rings, 5.19+).
    pub buf_ring: bool,
    /// Soft RLIMIT_MEMLOCK in bytes; `None` means unlimited.
    pub memlock_bytes_soft: Option<u64>,
    /// Whether the process may lock memory beyond that limit (root or
    /// CAP_IPC_LOCK): then fixed-buffer registration is not limited by it.
    pub memlock_exempt: bool,
    /// `/proc/sys/fs/pipe-max-size` in bytes, if readable.
    pub pipe_max_size_bytes: Option<u64>,
}

impl ProbeReport {
    /// True when a ring could be set up.
    pub fn available(&self) -> bool {
        self.unavailable.is_none()
    }

    /// Whether the named opcode (as in [`OpSupport::name`]) is supported.
    pub fn supports(&self, name: &str) -> bool {
        self.ops.iter().any(|op| op.name == name && op.supported)
    }

    /// Whether the opcode code is supported.
    pub fn supports_code(&self, code: u8) -> bool {
        self.ops.iter().any(|op| op.code == code && op.supported)
    }
}

/// The opcodes sluice uses, by name. One table so doctor, `/status` and the
/// tests agree on the names.
pub const OPS_OF_INTEREST: &[(&str, u8)] = &[
    ("accept", opcode::Accept::CODE),
    ("connect", opcode::Connect::CODE),
    ("poll_add", opcode::PollAdd::CODE),
    ("recv", opcode::Recv::CODE),
    ("recvmsg", opcode::RecvMsg::CODE),
    ("send", opcode::Send::CODE),
    ("splice", opcode::Splice::CODE),
    ("openat", opcode::OpenAt::CODE),
    ("statx", opcode::Statx::CODE),
    ("close", opcode::Close::CODE),
    ("read", opcode::Read::CODE),
    ("write", opcode::Write::CODE),
    ("read_fixed", opcode::ReadFixed::CODE),
    ("write_fixed", opcode::WriteFixed::CODE),
    ("timeout", opcode::Timeout::CODE),
    ("link_timeout", opcode::LinkTimeout::CODE),
    ("async_cancel", opcode::AsyncCancel::CODE),
    ("msg_ring", opcode::MsgRingData::CODE),
    ("provide_buffers", opcode::ProvideBuffers::CODE),
    ("nop", opcode::Nop::CODE),
    ("fadvise", opcode::Fadvise::CODE),
    ("fsync", opcode::Fsync::CODE),
    ("sync_file_range", opcode::SyncFileRange::CODE),
];

/// Probes the running kernel. Never fails: what cannot be learned is
/// reported as unavailable or `None`. Costs a handful of short-lived rings.
pub fn probe() -> ProbeReport {
    let mut report = ProbeReport {
        kernel_release: kernel_release(),
        unavailable: None,
        io_uring_disabled_sysctl: read_u64("/proc/sys/kernel/io_uring_disabled")
            .and_then(|v| u32::try_from(v).ok()),
        ops: Vec::new(),
        setup_single_issuer: false,
        setup_coop_taskrun: false,
        setup_defer_taskrun: false,
        setup_submit_all: false,
        buf_ring: false,
        memlock_bytes_soft: memlock_soft(),
        memlock_exempt: memlock_exempt(),
        pipe_max_size_bytes: read_u64("/proc/sys/fs/pipe-max-size"),
    };
    let ring: IoUring = match IoUring::new(4) {
        Ok(ring) => ring,
        Err(err) => {
            let errno = Errno::from_io(&err);
            report.unavailable = Some(Unavailable {
                errno,
                reason: unavailable_reason(errno, report.io_uring_disabled_sysctl),
            });
            return report;
        }
    };
    let mut kernel_probe = io_uring::Probe::new();
    let probed = ring.submitter().register_probe(&mut kernel_probe).is_ok();
    report.ops = OPS_OF_INTEREST
        .iter()
        .map(|&(name, code)| OpSupport {
            name,
            code,
            supported: probed && kernel_probe.is_supported(code),
        })
        .collect();
    // Whether the kernel sets up a small ring with what `setup` asks for.
    type Builder = io_uring::Builder<io_uring::squeue::Entry, io_uring::cqueue::Entry>;
    let accepts = |setup: fn(&mut Builder) -> &mut Builder| {
        let mut builder = IoUring::builder();
        setup(&mut builder).build(4).is_ok()
    };
    report.setup_single_issuer = accepts(|b| b.setup_single_issuer());
    report.setup_coop_taskrun = accepts(|b| b.setup_coop_taskrun());
    report.setup_defer_taskrun = accepts(|b| b.setup_single_issuer().setup_defer_taskrun());
    report.setup_submit_all = accepts(|b| b.setup_submit_all());
    report.buf_ring = probe_buf_ring(&ring);
    report
}

/// Registers and unregisters a one-page provided-buffer ring.
fn probe_buf_ring(ring: &IoUring) -> bool {
    let Ok(mem) = PageAlloc::new(4096) else {
        return false;
    };
    // SAFETY: `mem` is a live, page-aligned, zeroed allocation of one page,
    // which holds 256 ring entries of 16 bytes (more than the 8 registered).
    // The kernel only reads a buffer ring while serving an operation that
    // selects a buffer, and this probe ring never has one, so the memory is
    // never read after `mem` is freed, even if the unregister below failed.
    let registered = unsafe {
        ring.submitter()
            .register_buf_ring_with_flags(mem.addr_u64(), 8, 0, 0)
            .is_ok()
    };
    if registered {
        // Best effort: the ring is a throwaway probe ring (see SAFETY above).
        let _ = ring.submitter().unregister_buf_ring(0);
    }
    registered
}

/// An operator-facing sentence for an `io_uring_setup` failure with
/// `errno`, given `kernel.io_uring_disabled` (if known): what blocks it and
/// what to change.
pub fn unavailable_reason(errno: Errno, sysctl: Option<u32>) -> String {
    match errno.0 {
        libc::ENOSYS => "io_uring_setup is not implemented: kernel older than 5.1, built without \
                         CONFIG_IO_URING, or a seccomp filter answers ENOSYS"
            .to_string(),
        libc::EPERM => match sysctl {
            Some(2) => {
                "io_uring is disabled for all processes (kernel.io_uring_disabled = 2)".to_string()
            }
            Some(1) => "io_uring is restricted to privileged processes and the io_uring_group \
                        (kernel.io_uring_disabled = 1)"
                .to_string(),
            _ => "io_uring_setup was refused (EPERM): a seccomp filter or LSM policy (e.g. a \
                  container runtime's default profile) blocks it"
                .to_string(),
        },
        libc::ENOMEM => "io_uring_setup failed with ENOMEM: the memlock limit (RLIMIT_MEMLOCK) \
                         is too low for the ring on this kernel; raise it (ulimit -l, \
                         LimitMEMLOCK= in systemd) or grant CAP_IPC_LOCK"
            .to_string(),
        _ => format!("io_uring_setup failed: {errno}"),
    }
}

fn kernel_release() -> String {
    // SAFETY: utsname is plain old data; an all-zero value is valid.
    let mut uts: libc::utsname = unsafe { std::mem::zeroed() };
    // SAFETY: `uts` is a valid, writable utsname for the duration of the call.
    if unsafe { libc::uname(&mut uts) } != 0 {
        return "unknown".to_string();
    }
    let bytes: Vec<u8> = uts
        .release
        .iter()
        .take_while(|&&c| c != 0)
        .map(|&c| c.to_ne_bytes()[0])
        .collect();
    String::from_utf8_lossy(&bytes).into_owned()
}

fn memlock_soft() -> Option<u64> {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: `lim` is a valid, writable rlimit for the duration of the call.
    if unsafe { libc::getrlimit(libc::RLIMIT_MEMLOCK, &mut lim) } != 0
        || lim.rlim_cur == libc::RLIM_INFINITY
    {
        return None;
    }
    Some(lim.rlim_cur)
}

/// Whether CAP_IPC_LOCK is in the effective set (bit 14 of CapEff).
fn memlock_exempt() -> bool {
    let Ok(status) = std::fs::read_to_string("/proc/self/status") else {
        return false;
    };
    status
        .lines()
        .find_map(|line| line.strip_prefix("CapEff:"))
        .and_then(|hex| u64::from_str_radix(hex.trim(), 16).ok())
        .is_some_and(|caps| caps & (1 << 14) != 0)
}

fn read_u64(path: &str) -> Option<u64> {
    std::fs::read_to_string(path).ok()?.trim().parse().ok()
}

impl fmt::Display for ProbeReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "kernel: {}", self.kernel_release)?;
        match &self.unavailable {
            Some(why) => writeln!(f, "io_uring: unavailable ({}): {}", why.errno, why.reason)?,
            None => writeln!(f, "io_uring: available")?,
        }
        if let Some(v) = self.io_uring_disabled_sysctl {
            writeln!(f, "kernel.io_uring_disabled: {v}")?;
        }
        if !self.ops.is_empty() {
            let yes: Vec<&str> = self
                .ops
                .iter()
                .filter(|o| o.supported)
                .map(|o| o.name)
                .collect();
            let no: Vec<&str> = self
                .ops
                .iter()
                .filter(|o| !o.supported)
                .map(|o| o.name)
                .collect();
            writeln!(f, "ops supported: {}", yes.join(" "))?;
            if !no.is_empty() {
                writeln!(f, "ops missing: {}", no.join(" "))?;
            }
            let flag = |b: bool| if b { "yes" } else { "no" };
            writeln!(
                f,
                "setup flags: single_issuer={} coop_taskrun={} defer_taskrun={} submit_all={}",
                flag(self.setup_single_issuer),
                flag(self.setup_coop_taskrun),
                flag(self.setup_defer_taskrun),
                flag(self.setup_submit_all)
            )?;
            writeln!(f, "provided-buffer ring: {}", flag(self.buf_ring))?;
        }
        match self.memlock_bytes_soft {
            Some(bytes) => write!(f, "memlock limit: {bytes} bytes")?,
            None => write!(f, "memlock limit: unlimited")?,
        }
        if self.memlock_exempt {
            write!(f, " (CAP_IPC_LOCK: not enforced)")?;
        }
        writeln!(f)?;
        match self.pipe_max_size_bytes {
            Some(bytes) => writeln!(f, "pipe-max-size: {bytes} bytes"),
            None => writeln!(f, "pipe-max-size: unknown"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn probe_reports_this_host() {
        let report = probe();
        let text = report.to_string();
        eprintln!("{text}");
        assert!(text.starts_with("kernel: "));
        assert_ne!(report.kernel_release, "unknown");
        assert!(text.contains("pipe-max-size"));
        if report.available() {
            assert_eq!(report.ops.len(), OPS_OF_INTEREST.len());
            assert!(report.supports("nop"), "every io_uring kernel has NOP");
        } else {
            eprintln!("SKIP: io_uring unavailable, opcode checks skipped");
            assert!(report.ops.is_empty());
        }
    }

    #[test]
    fn reasons_name_the_cause() {
        let table: &[(i32, Option<u32>, &str)] = &[
            (libc::ENOSYS, None, "ENOSYS"),
            (libc::EPERM, Some(2), "io_uring_disabled = 2"),
            (libc::EPERM, Some(1), "io_uring_disabled = 1"),
            (libc::EPERM, Some(0), "seccomp"),
            (libc::ENOMEM, None, "RLIMIT_MEMLOCK"),
            (libc::EFAULT, None, "EFAULT"),
        ];
        for &(errno, sysctl, needle) in table {
            let reason = unavailable_reason(Errno(errno), sysctl);
            assert!(reason.contains(needle), "{errno} {sysctl:?}: {reason}");
        }
    }
}
