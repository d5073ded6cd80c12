//! Process lifecycle: listening sockets handed from an old process to a new one (binary
//! upgrade on SIGUSR2), the pid file, and systemd's readiness protocol.
//!
//! The upgrade hands over the very same listening sockets, not new binds: the old and the
//! new process then share each socket's accept queue, so a connection queued on any of the
//! `SO_REUSEPORT` listeners is accepted by whichever process takes it, and the queue outlives
//! the old process (a closed reuseport socket would drop its queue). The hand-off socket is a
//! `SOCK_SEQPACKET` pair, so each message arrives whole with its descriptors:
//!
//! ```text
//! old -> new   "sluice-listeners N\n" + N fds (SCM_RIGHTS)
//! new -> old   "ready PID\n"            once its engine accepts on them
//! old -> new   "go\n"                   the old one commits: it drains and exits,
//!                                       the new one writes the pid file
//! ```
//!
//! If the new process exits first (its socket end closes) or says nothing within
//! `upgrade_ready_timeout_ms`, the old one sends it SIGTERM (it drains whatever it accepted)
//! and keeps serving.

use std::ffi::OsString;
use std::io::{self, IoSlice, IoSliceMut};
use std::mem::MaybeUninit;
use std::net::TcpListener;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use rustix::net::{
    AddressFamily, RecvAncillaryBuffer, RecvAncillaryMessage, RecvFlags, SendAncillaryBuffer,
    SendAncillaryMessage, SendFlags, SocketFlags, SocketType,
};

use crate::config::ENV_UPGRADE_FD;

/// Most listening sockets one hand-off carries: the kernel's `SCM_MAX_FD`, the most
/// descriptors one `SCM_RIGHTS` message may hold.
pub const LISTENERS_MAX: usize = 253;
/// Largest hand-off message, in bytes (all are one short line).
const MESSAGE_BYTES_MAX: usize = 128;
/// How long a new process waits for its listeners once started: the old process sends them
/// right after the spawn, so this only bounds a broken parent.
const LISTENERS_WAIT_MS: u64 = 10_000;

/// How this process was started, resolved once at start: an upgrade re-runs the same path
/// with the same arguments even if the file at that path was replaced since (that is the
/// point), and `/proc/self/exe` would then name the old, deleted file.
#[derive(Debug, Clone)]
pub struct Launch {
    /// The executable path, or `None` if it could not be resolved (upgrades are refused).
    pub exe: Option<PathBuf>,
    /// Arguments after the program name.
    pub args: Vec<OsString>,
}

impl Launch {
    /// The running process's path and arguments; call it first thing in `main`.
    pub fn current() -> Launch {
        Launch {
            exe: std::env::current_exe().ok(),
            args: std::env::args_os().skip(1).collect(),
        }
    }
}

/// Listening sockets this process was given instead of binding its own.
pub struct Inherited {
    pub listeners: Vec<TcpListener>,
    /// The old process, when this one is the new side of an upgrade.
    pub parent: Option<Parent>,
}

/// The new process's end of the hand-off socket.
pub struct Parent {
    socket: OwnedFd,
}

/// Listeners handed over by an old process (`SLUICE_UPGRADE_FD`), else those systemd
/// passed (`LISTEN_FDS` with `LISTEN_PID` naming this process), else `None` (bind `listen`).
pub fn inherited(env: &[(String, String)]) -> Result<Option<Inherited>, String> {
    let var = |name: &str| env.iter().find(|(k, _)| k == name).map(|(_, v)| v.as_str());
    let Some(fd) = var(ENV_UPGRADE_FD) else {
        let Some(fds) =
            sluice_uring::inherit::take_listen_fds(var("LISTEN_PID"), var("LISTEN_FDS"))?
        else {
            return Ok(None);
        };
        let listeners = fds
            .into_iter()
            .map(|fd| match rustix::net::sockopt::socket_acceptconn(&fd) {
                Ok(true) => Ok(TcpListener::from(fd)),
                _ => Err(
                    "a LISTEN_FDS socket is not a listening stream socket (sluice.socket needs \
                     ListenStream= and Accept=no)"
                        .to_string(),
                ),
            })
            .collect::<Result<Vec<_>, _>>()?;
        return Ok(Some(Inherited {
            listeners,
            parent: None,
        }));
    };
    // The old process always passes the socket as stdin: std's `Stdio` puts it there
    // without any unsafe descriptor juggling, and stdin is reachable safely here.
    if fd.trim() != "0" {
        return Err(format!(
            "{ENV_UPGRADE_FD} = `{fd}`: only 0 (the hand-off socket on stdin) is supported"
        ));
    }
    let socket = std::io::stdin()
        .as_fd()
        .try_clone_to_owned()
        .map_err(|e| format!("cannot take the upgrade hand-off socket: {e}"))?;
    let listeners = recv_listeners(&socket, Duration::from_millis(LISTENERS_WAIT_MS))
        .map_err(|e| format!("cannot receive the listeners from the old process: {e}"))?;
    Ok(Some(Inherited {
        listeners,
        parent: Some(Parent { socket }),
    }))
}

impl Parent {
    /// Tells the old process that this one serves, then waits (at most `wait`) for its
    /// decision. `true`: it committed (this process now owns the listeners); `false`: it gave
    /// up on this upgrade and is about to stop this process.
    pub fn report_ready(&self, wait: Duration) -> Result<(), String> {
        let line = format!("ready {}\n", std::process::id());
        send_line(&self.socket, &line).map_err(|e| format!("cannot report ready: {e}"))?;
        match recv_line(&self.socket, wait) {
            Ok(Some(l)) if l.trim() == "go" => Ok(()),
            Ok(Some(l)) => Err(format!("it answered {:?} instead of go", l.trim())),
            Ok(None) => Err("it closed the hand-off socket without go".to_string()),
            Err(e) => Err(format!("no go within {} ms: {e}", wait.as_millis())),
        }
    }
}

fn send_line(socket: impl AsFd, line: &str) -> io::Result<()> {
    rustix::net::send(socket, line.as_bytes(), SendFlags::NOSIGNAL)?;
    Ok(())
}

/// One message, or `None` at end of stream (the peer is gone). Times out with `WouldBlock`.
fn recv_line(socket: impl AsFd, wait: Duration) -> io::Result<Option<String>> {
    let socket = socket.as_fd();
    let deadline = Instant::now() + wait;
    let mut buf = [0u8; MESSAGE_BYTES_MAX];
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        rustix::net::sockopt::set_socket_timeout(
            socket,
            rustix::net::sockopt::Timeout::Recv,
            Some(left.max(Duration::from_millis(1))),
        )?;
        // A recv with SO_RCVTIMEO is not restarted after a signal handler ran (signal(7)),
        // and this process handles SIGTERM, SIGINT and SIGUSR2: an interrupted wait is
        // resumed, not taken for the peer's answer.
        match rustix::net::recv(socket, &mut buf, RecvFlags::empty()) {
            Err(rustix::io::Errno::INTR) if Instant::now() < deadline => continue,
            Err(e) => return Err(e.into()),
            Ok((0, _)) => return Ok(None),
            Ok((n, _)) => return Ok(Some(String::from_utf8_lossy(&buf[..n]).into_owned())),
        }
    }
}

/// Sends the listeners in one message.
fn send_listeners(socket: impl AsFd, listeners: &[BorrowedFd<'_>]) -> io::Result<()> {
    if listeners.len() > LISTENERS_MAX {
        return Err(io::Error::other(format!(
            "{} listeners, but one hand-off carries at most {LISTENERS_MAX}",
            listeners.len()
        )));
    }
    let line = format!("sluice-listeners {}\n", listeners.len());
    let mut space = vec![MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(listeners.len()))];
    let mut control = SendAncillaryBuffer::new(&mut space);
    if !control.push(SendAncillaryMessage::ScmRights(listeners)) {
        return Err(io::Error::other(
            "the descriptors do not fit the control buffer",
        ));
    }
    rustix::net::sendmsg(
        socket,
        &[IoSlice::new(line.as_bytes())],
        &mut control,
        SendFlags::NOSIGNAL,
    )?;
    Ok(())
}

fn recv_listeners(socket: impl AsFd, wait: Duration) -> io::Result<Vec<TcpListener>> {
    let socket = socket.as_fd();
    rustix::net::sockopt::set_socket_timeout(
        socket,
        rustix::net::sockopt::Timeout::Recv,
        Some(wait),
    )?;
    let mut buf = [0u8; MESSAGE_BYTES_MAX];
    let mut space = vec![MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(LISTENERS_MAX))];
    let mut control = RecvAncillaryBuffer::new(&mut space);
    let got = rustix::net::recvmsg(
        socket,
        &mut [IoSliceMut::new(&mut buf)],
        &mut control,
        RecvFlags::CMSG_CLOEXEC,
    )?;
    let mut fds: Vec<OwnedFd> = Vec::new();
    for message in control.drain() {
        if let RecvAncillaryMessage::ScmRights(received) = message {
            fds.extend(received);
        }
    }
    let text = String::from_utf8_lossy(&buf[..got.bytes.min(buf.len())]);
    let announced: Option<usize> = text
        .trim()
        .strip_prefix("sluice-listeners ")
        .and_then(|n| n.parse().ok());
    if announced != Some(fds.len()) || fds.is_empty() {
        return Err(io::Error::other(format!(
            "unexpected hand-off message {:?} with {} descriptor(s)",
            text.trim(),
            fds.len()
        )));
    }
    fds.into_iter()
        .map(|fd| {
            // Only a listening TCP socket is of use; anything else is a broken parent.
            let listening = rustix::net::sockopt::socket_acceptconn(&fd)?;
            if !listening {
                return Err(io::Error::other(
                    "a handed-over descriptor is not listening",
                ));
            }
            Ok(TcpListener::from(fd))
        })
        .collect()
}

/// A new process that reported ready and was told to take over.
#[derive(Debug)]
pub struct Successor {
    pub pid: u32,
}

/// The two ends of a hand-off socket: Unix, SEQPACKET (each message arrives whole, with its
/// descriptors), close-on-exec.
fn hand_off_pair() -> rustix::io::Result<(OwnedFd, OwnedFd)> {
    rustix::net::socketpair(
        AddressFamily::UNIX,
        SocketType::SEQPACKET,
        SocketFlags::CLOEXEC,
        None,
    )
}

/// Starts `launch` again with `listeners` and waits up to `ready_timeout` for it to serve.
/// `Err` says why the upgrade did not happen; the caller keeps serving.
pub fn upgrade(
    launch: &Launch,
    listeners: &[BorrowedFd<'_>],
    ready_timeout: Duration,
) -> Result<Successor, String> {
    let exe = launch
        .exe
        .as_ref()
        .ok_or("the executable path could not be resolved at start")?;
    let (ours, theirs) =
        hand_off_pair().map_err(|e| format!("cannot create the hand-off socket: {e}"))?;
    let started = Instant::now();
    let mut child = {
        let mut command = Command::new(exe);
        command
            .args(&launch.args)
            .env(ENV_UPGRADE_FD, "0")
            // Socket activation was for this process; the new one gets the sockets below.
            .env_remove("LISTEN_PID")
            .env_remove("LISTEN_FDS")
            .env_remove("LISTEN_FDNAMES")
            .stdin(Stdio::from(theirs));
        // The command (and with it our copy of the child's end) is dropped at the end of
        // this block, so the child's exit reads as end of stream below.
        command
            .spawn()
            .map_err(|e| format!("cannot start {}: {e}", exe.display()))?
    };
    let pid = child.id();
    if let Err(e) = send_listeners(&ours, listeners) {
        return Err(give_up(
            child,
            format!("cannot hand the listeners to pid {pid}: {e}"),
        ));
    }
    let remaining = ready_timeout.saturating_sub(started.elapsed());
    match recv_line(&ours, remaining) {
        Ok(Some(line)) if line.starts_with("ready ") => {
            if let Err(e) = send_line(&ours, "go\n") {
                return Err(give_up(
                    child,
                    format!("pid {pid} was ready but cannot be told to take over: {e}"),
                ));
            }
            Ok(Successor { pid })
        }
        Ok(Some(line)) => Err(give_up(
            child,
            format!("pid {pid} sent {:?} instead of ready", line.trim()),
        )),
        Ok(None) => {
            let status = child.wait().map_or("unknown".to_string(), |s| s.to_string());
            Err(format!(
                "the new process (pid {pid}) exited ({status}) before it was ready; see its log"
            ))
        }
        Err(e) if e.kind() == io::ErrorKind::WouldBlock || e.kind() == io::ErrorKind::TimedOut => {
            Err(give_up(
                child,
                format!(
                    "the new process (pid {pid}) was not ready within upgrade_ready_timeout_ms = {} ms; it was sent SIGTERM",
                    ready_timeout.as_millis()
                ),
            ))
        }
        Err(e) => Err(give_up(
            child,
            format!("cannot read from the new process (pid {pid}): {e}"),
        )),
    }
}

/// Sends SIGTERM to a new process that will not take over, and reaps it off this thread.
/// SIGTERM, not SIGKILL: a new process that already accepted connections on the shared
/// listeners drains them instead of dropping them.
fn give_up(mut child: std::process::Child, why: String) -> String {
    if let Some(pid) = i32::try_from(child.id())
        .ok()
        .and_then(rustix::process::Pid::from_raw)
    {
        let _ = rustix::process::kill_process(pid, rustix::process::Signal::TERM);
    }
    let _ = std::thread::Builder::new()
        .name("sluice-upgrade-reap".into())
        .spawn(move || {
            let _ = child.wait();
        });
    why
}

/// Writes this process's pid to `path` atomically (a temporary file renamed over it), so
/// a reader never sees a half-written pid.
pub fn write_pid_file(path: &Path) -> io::Result<()> {
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(".tmp");
    std::fs::write(&tmp, format!("{}\n", std::process::id()))?;
    std::fs::rename(&tmp, path)
}

/// Removes the pid file if it still names this process (after an upgrade it names the
/// successor and must stay).
pub fn remove_pid_file_if_ours(path: &Path) {
    if read_pid_file(path) == Some(std::process::id()) {
        let _ = std::fs::remove_file(path);
    }
}

/// The pid in `path`, if it holds one.
pub fn read_pid_file(path: &Path) -> Option<u32> {
    std::fs::read_to_string(path).ok()?.trim().parse().ok()
}

/// Sends `state` to systemd's notification socket (`NOTIFY_SOCKET`), if there is one: the
/// `Type=notify` protocol (`READY=1`, `MAINPID=…`, `STOPPING=1`). Best effort: a failure is
/// logged, never fatal.
pub fn sd_notify(env: &[(String, String)], state: &str) {
    let Some((_, path)) = env.iter().find(|(k, _)| k == "NOTIFY_SOCKET") else {
        return;
    };
    let sent = (|| -> io::Result<()> {
        let socket = std::os::unix::net::UnixDatagram::unbound()?;
        if let Some(name) = path.strip_prefix('@') {
            use std::os::linux::net::SocketAddrExt as _;
            let addr = std::os::unix::net::SocketAddr::from_abstract_name(name.as_bytes())?;
            socket.send_to_addr(state.as_bytes(), &addr)?;
        } else {
            socket.send_to(state.as_bytes(), path)?;
        }
        Ok(())
    })();
    if let Err(err) = sent {
        tracing::warn!(%err, socket = %path, "cannot notify systemd");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn listeners_cross_the_hand_off_socket_with_their_queues() {
        let (a, b) = hand_off_pair().expect("socketpair");
        let l1 = TcpListener::bind("127.0.0.1:0").expect("bind");
        let l2 = TcpListener::bind("127.0.0.1:0").expect("bind");
        let addr = l1.local_addr().expect("addr");
        // Queued before the hand-off: it must be accepted through the received copy.
        let _client = std::net::TcpStream::connect(addr).expect("connect");
        send_listeners(&a, &[l1.as_fd(), l2.as_fd()]).expect("send");
        drop(l1);
        let got = recv_listeners(&b, Duration::from_secs(1)).expect("recv");
        assert_eq!(got.len(), 2);
        assert_eq!(got[0].local_addr().expect("addr"), addr);
        got[0]
            .accept()
            .expect("the queued connection moved with the socket");
    }

    #[test]
    fn a_message_without_descriptors_is_refused() {
        let (a, b) = hand_off_pair().expect("socketpair");
        send_line(&a, "sluice-listeners 2\n").expect("send");
        assert!(recv_listeners(&b, Duration::from_secs(1)).is_err());
        drop(a);
        assert!(matches!(recv_line(&b, Duration::from_secs(1)), Ok(None)));
    }

    #[test]
    fn the_new_process_owns_the_listeners_only_after_go() {
        let pair = || hand_off_pair().expect("socketpair");
        let (old, new) = pair();
        let old_side = std::thread::spawn(move || {
            let line = recv_line(&old, Duration::from_secs(5)).expect("recv");
            assert!(line.is_some_and(|l| l.starts_with("ready ")));
            send_line(&old, "go\n").expect("send");
        });
        let parent = Parent { socket: new };
        assert_eq!(parent.report_ready(Duration::from_secs(5)), Ok(()));
        old_side.join().expect("old side");

        // An old process that gave up closes the socket (and sends SIGTERM).
        let (old, new) = pair();
        let old_side = std::thread::spawn(move || {
            let _ = recv_line(&old, Duration::from_secs(5));
            drop(old);
        });
        let parent = Parent { socket: new };
        let refused = parent.report_ready(Duration::from_secs(5));
        assert!(refused.is_err_and(|e| e.contains("without go")));
        old_side.join().expect("old side");
    }

    #[test]
    fn pid_file_is_removed_only_while_it_names_this_process() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("sluice.pid");
        write_pid_file(&path).expect("write");
        assert_eq!(read_pid_file(&path), Some(std::process::id()));
        std::fs::write(&path, "1\n").expect("write");
        remove_pid_file_if_ours(&path);
        assert!(path.exists(), "a successor's pid file stays");
        write_pid_file(&path).expect("write");
        remove_pid_file_if_ours(&path);
        assert!(!path.exists());
    }
}
