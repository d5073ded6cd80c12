//! Every operation against the real kernel. Each test probes first and
//! skips loudly when the kernel lacks what it needs.

use std::ffi::CString;
use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::rc::Rc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use sluice_uring::{
    probe, Completion, Driver, DriverConfig, Errno, IoBuf, Op, Pipe, PipePool, ProbeReport,
    Returned, SharedFd,
};

const DEADLINE: Duration = Duration::from_secs(10);

/// Probes and builds a small driver, or prints SKIP and returns None.
fn setup(test: &str, ops: &[&str]) -> Option<(ProbeReport, Driver)> {
    setup_with(
        test,
        ops,
        DriverConfig {
            ops_max: 64,
            fixed_buffers_count: 4,
            fixed_buffer_bytes: 8192,
            ..DriverConfig::default()
        },
    )
}

fn setup_with(test: &str, ops: &[&str], config: DriverConfig) -> Option<(ProbeReport, Driver)> {
    let report = probe();
    if let Some(why) = &report.unavailable {
        eprintln!("SKIP: {test}: io_uring unavailable: {}", why.reason);
        return None;
    }
    for op in ops {
        if !report.supports(op) {
            eprintln!("SKIP: {test}: kernel {} lacks {op}", report.kernel_release);
            return None;
        }
    }
    let driver = Driver::new(config).expect("driver set-up");
    Some((report, driver))
}

/// Waits for the next completion (bounded by DEADLINE).
fn next(driver: &mut Driver) -> Completion {
    let start = Instant::now();
    let mut out = Vec::with_capacity(1);
    loop {
        if driver.complete(&mut out, 1) == 1 {
            return out.pop().unwrap();
        }
        assert!(
            start.elapsed() < DEADLINE,
            "no completion within {DEADLINE:?}"
        );
        driver.wait(1, Some(Duration::from_millis(200))).unwrap();
    }
}

fn tcp_pair() -> (SharedFd, TcpStream) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let client = TcpStream::connect(listener.local_addr().unwrap()).unwrap();
    let (server, _) = listener.accept().unwrap();
    (Rc::new(OwnedFd::from(server)), client)
}

/// A recv into a new `Vec` of `capacity` bytes.
fn recv_vec(fd: SharedFd, capacity: usize, flags: i32) -> Op {
    Op::Recv {
        fd,
        buf: IoBuf::Vec(Vec::with_capacity(capacity)),
        flags,
    }
}

/// A connected pair whose client end is read to its end on a thread: the server end, and the
/// thread that returns what the client read.
fn tcp_pair_read_on_a_thread() -> (SharedFd, std::thread::JoinHandle<Vec<u8>>) {
    let (server, mut client) = tcp_pair();
    let reader = std::thread::spawn(move || {
        let mut got = Vec::new();
        client.read_to_end(&mut got).unwrap();
        got
    });
    (server, reader)
}

/// Splices `len` bytes of `pipe` to `fd_out` on the ring (token 2); returns the pipe.
fn splice_from_pipe(d: &mut Driver, pipe: Pipe, fd_out: &SharedFd, len: u32) -> Pipe {
    let op = Op::SpliceFromPipe {
        pipe,
        fd_out: fd_out.clone(),
        len,
    };
    d.submit(op, 2).unwrap();
    let c = next(d);
    assert!(c.result.unwrap() > 0);
    let Returned::Pipe(p) = c.resources else {
        panic!("{c:?}")
    };
    p
}

/// A driver for one op at a time, with one small fixed buffer.
fn one_op_config() -> DriverConfig {
    DriverConfig {
        ops_max: 1,
        fixed_buffers_count: 1,
        fixed_buffer_bytes: 4096,
        ..DriverConfig::default()
    }
}

fn temp_path(name: &str) -> std::path::PathBuf {
    static N: AtomicU32 = AtomicU32::new(0);
    std::env::temp_dir().join(format!(
        "sluice-uring-{}-{}-{name}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    ))
}

/// A new temp file (see [`temp_path`]) holding `data`.
fn temp_file(name: &str, data: &[u8]) -> std::path::PathBuf {
    let path = temp_path(name);
    std::fs::write(&path, data).unwrap();
    path
}

fn pattern(len: usize) -> Vec<u8> {
    (0..len).map(|i| (i * 31 % 251) as u8).collect()
}

#[test]
fn accept_multishot_three_clients() {
    let Some((_, mut d)) = setup("accept_multishot", &["accept", "async_cancel"]) else {
        return;
    };
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let id = d
        .submit(
            Op::AcceptMulti {
                listener: Rc::new(OwnedFd::from(listener)),
            },
            7,
        )
        .unwrap();
    let clients: Vec<TcpStream> = (0..3).map(|_| TcpStream::connect(addr).unwrap()).collect();
    for _ in 0..3 {
        let c = next(&mut d);
        assert_eq!((c.token, c.op_id), (7, id));
        assert!(c.more, "multishot accept stays armed");
        let Returned::Fd(fd) = c.resources else {
            panic!("no fd: {c:?}")
        };
        assert_eq!(c.result, Ok(fd.as_raw_fd() as u32));
    }
    d.cancel(id).unwrap();
    let c = next(&mut d);
    assert_eq!((c.result, c.more), (Err(Errno::ECANCELED), false));
    assert_eq!(d.in_flight(), 0);
    drop(clients);
}

#[test]
fn recv_peek_then_recv_sees_same_bytes() {
    let Some((_, mut d)) = setup("recv_peek", &["recv"]) else {
        return;
    };
    let (server, mut client) = tcp_pair();
    client.write_all(b"GET / HTTP/1.1\r\n").unwrap();
    d.submit(recv_vec(server.clone(), 64, libc::MSG_PEEK), 1)
        .unwrap();
    let c = next(&mut d);
    let Returned::Buf(peeked) = c.resources else {
        panic!("{c:?}")
    };
    assert_eq!(peeked.as_slice(), b"GET / HTTP/1.1\r\n");
    d.submit(recv_vec(server, 64, 0), 2).unwrap();
    let c = next(&mut d);
    let Returned::Buf(read) = c.resources else {
        panic!("{c:?}")
    };
    assert_eq!(
        read.as_slice(),
        peeked.as_slice(),
        "the peek consumed nothing"
    );
}

/// A recvmsg on a socket accepted from a listener with `SO_TIMESTAMPING`
/// returns the kernel's receive stamp of the bytes: after the client wrote
/// them, before the completion was read, and older by the time the bytes
/// waited in the socket. The same socket read by a plain recv gives no
/// stamp, and a socket without the option gives none to recvmsg either.
#[test]
fn recvmsg_returns_the_kernel_receive_stamp_of_an_accepted_socket() {
    let Some((_, mut d)) = setup("recvmsg_stamp", &["recvmsg", "recv"]) else {
        return;
    };
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    sluice_uring::enable_rx_timestamps(std::os::fd::AsFd::as_fd(&listener)).unwrap();
    let mut client = TcpStream::connect(listener.local_addr().unwrap()).unwrap();
    let (server, _) = listener.accept().unwrap();
    assert_eq!(
        sluice_uring::stamp::rx_timestamp_flags(std::os::fd::AsFd::as_fd(&server)).unwrap(),
        sluice_uring::stamp::RX_TIMESTAMP_FLAGS,
        "the accepted socket inherits the listener's option"
    );
    let server: SharedFd = Rc::new(OwnedFd::from(server));
    // The kernel turns stamping on for the host from a work item: wait
    // until a byte arrives stamped before the measured bytes are sent.
    let started = Instant::now();
    loop {
        client.write_all(b"x").unwrap();
        let mut buf = Vec::with_capacity(8);
        let (_, stamp) =
            sluice_uring::recv_stamped(std::os::fd::AsFd::as_fd(&*server), &mut buf, 0).unwrap();
        if stamp.is_some() {
            break;
        }
        assert!(
            started.elapsed() < DEADLINE,
            "the kernel never stamped a packet"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
    let before = std::time::SystemTime::now();
    client.write_all(b"GET /a HTTP/1.1\r\n\r\n").unwrap();
    // The bytes wait in the socket for 30 ms before anyone reads them: the
    // stamp must say when they arrived, not when they were read.
    std::thread::sleep(Duration::from_millis(30));
    let op = |fd: &SharedFd, flags| Op::RecvMsg {
        fd: Rc::clone(fd),
        buf: IoBuf::Vec(Vec::with_capacity(64)),
        flags,
    };
    d.submit(op(&server, libc::MSG_PEEK), 1).unwrap();
    let c = next(&mut d);
    let read_at = std::time::SystemTime::now();
    let Returned::Stamped { buf, stamp } = c.resources else {
        panic!("{c:?}")
    };
    assert_eq!(buf.as_slice(), b"GET /a HTTP/1.1\r\n\r\n");
    let stamp = stamp.expect("a stamp for a stamped socket");
    assert!(stamp >= sluice_uring::RxStamp::of(before), "{stamp:?}");
    let age = stamp.age_at(read_at);
    assert!(
        age >= Duration::from_millis(25) && age < Duration::from_secs(5),
        "the stamp is the arrival, not the read: {age:?}"
    );
    // The plain recv of the same bytes: no control buffer, no stamp.
    d.submit(recv_vec(Rc::clone(&server), 64, 0), 2).unwrap();
    assert!(matches!(next(&mut d).resources, Returned::Buf(_)));

    // A socket without the option: recvmsg works, without a stamp.
    let (plain, mut plain_client) = tcp_pair();
    plain_client.write_all(b"x").unwrap();
    d.submit(op(&plain, 0), 3).unwrap();
    let c = next(&mut d);
    let Returned::Stamped { buf, stamp } = c.resources else {
        panic!("{c:?}")
    };
    assert_eq!(buf.as_slice(), b"x");
    assert_eq!(stamp, None);

    // The blocking form used by the epoll engine and the fallback.
    client.write_all(b"more").unwrap();
    std::thread::sleep(Duration::from_millis(20));
    let mut buf = Vec::with_capacity(16);
    let (n, stamp) =
        sluice_uring::recv_stamped(std::os::fd::AsFd::as_fd(&*server), &mut buf, 0).unwrap();
    assert_eq!((n, buf.as_slice()), (4, &b"more"[..]));
    let age = stamp.expect("stamped").age_at(std::time::SystemTime::now());
    assert!(age >= Duration::from_millis(15), "{age:?}");
}

#[test]
fn recv_multishot_provided_buffers_and_enobufs() {
    let Some((report, mut d)) = setup("recv_multishot", &["recv"]) else {
        return;
    };
    if !report.buf_ring {
        eprintln!(
            "SKIP: recv_multishot: no provided-buffer rings on {}",
            report.kernel_release
        );
        return;
    }
    let ring = d.register_buf_ring(4, 16).unwrap();
    let (server, mut client) = tcp_pair();
    let sent = pattern(100);
    client.write_all(&sent).unwrap();
    let mut got = Vec::new();
    let mut held = Vec::new();
    let op = || Op::RecvMulti {
        fd: server.clone(),
        ring: ring.clone(),
        flags: 0,
    };
    d.submit(op(), 3).unwrap();
    // 100 bytes need 7 buffers of 16; the ring has 4, so the kernel ends the
    // multishot with ENOBUFS while we hold the leases.
    loop {
        let c = next(&mut d);
        if let Returned::Provided(lease) = c.resources {
            got.extend_from_slice(lease.as_slice());
            held.push(lease);
        }
        if !c.more {
            assert_eq!(
                c.result.err(),
                Some(Errno::ENOBUFS),
                "ends for lack of buffers"
            );
            break;
        }
    }
    // Loopback delivers one write as one segment, so normally 64; never more.
    assert!(got.len() <= 64 && !got.is_empty(), "{}", got.len());
    assert_eq!(ring.leased(), 4);
    drop(held); // recycled into the kernel's ring
    assert_eq!(ring.leased(), 0);
    d.submit(op(), 3).unwrap();
    while got.len() < sent.len() {
        let c = next(&mut d);
        assert!(c.result.is_ok(), "{c:?}");
        if let Returned::Provided(lease) = c.resources {
            got.extend_from_slice(lease.as_slice());
        }
    }
    assert_eq!(got, sent);
    drop(client);
    // EOF ends the multishot (0 bytes, no more).
    let c = next(&mut d);
    assert_eq!((c.result, c.more), (Ok(0), false));
}

#[test]
fn send_vec_and_fixed_buffer() {
    let Some((_, mut d)) = setup("send", &["send"]) else {
        return;
    };
    let (server, mut client) = tcp_pair();
    let op = Op::Send {
        fd: server.clone(),
        buf: IoBuf::Vec(b"xxhello ".to_vec()),
        offset: 2,
        flags: libc::MSG_NOSIGNAL | libc::MSG_MORE,
    };
    d.submit(op, 1).unwrap();
    let c = next(&mut d);
    assert_eq!(c.result, Ok(6));
    assert!(matches!(c.resources, Returned::Buf(IoBuf::Vec(ref v)) if v == b"xxhello "));
    let mut lease = d.fixed_buffers().lease().unwrap();
    lease.fill_from(b"world");
    d.submit(
        Op::Send {
            fd: server,
            buf: IoBuf::Fixed(lease),
            offset: 0,
            flags: libc::MSG_NOSIGNAL,
        },
        2,
    )
    .unwrap();
    let c = next(&mut d);
    assert_eq!(c.result, Ok(5));
    let mut got = [0u8; 11];
    client.read_exact(&mut got).unwrap();
    assert_eq!(&got, b"hello world");
}

#[test]
fn splice_file_pipe_socket_with_short_splice_resumed() {
    let Some((report, mut d)) = setup("splice", &["splice"]) else {
        return;
    };
    let data = pattern(300 * 1024 + 17);
    let path = temp_file("splice", &data);
    let file: SharedFd = Rc::new(OwnedFd::from(std::fs::File::open(&path).unwrap()));
    let (server, reader) = tcp_pair_read_on_a_thread();
    let pool = PipePool::new(2, 64 * 1024, report.pipe_max_size_bytes);
    let mut pipe = pool.take().unwrap();
    let chunk = pipe.capacity_bytes().min(64 * 1024);
    let mut offset = 0u64;
    let mut short_splices = 0;
    while (offset as usize) < data.len() {
        let len = chunk.min(data.len() - offset as usize) as u32;
        d.submit(
            Op::SpliceToPipe {
                fd_in: file.clone(),
                offset_in: offset,
                pipe,
                len,
            },
            1,
        )
        .unwrap();
        let c = next(&mut d);
        let n = c.result.unwrap();
        assert!(n > 0);
        offset += u64::from(n);
        let Returned::Pipe(p) = c.resources else {
            panic!("{c:?}")
        };
        pipe = p;
        assert_eq!(pipe.held_bytes(), n as usize);
        // Drain in two splices: the first deliberately short, then resume.
        let mut first = true;
        while pipe.held_bytes() > 0 {
            let len = if first {
                (pipe.held_bytes() / 2).max(1)
            } else {
                pipe.held_bytes()
            } as u32;
            if first && (len as usize) < pipe.held_bytes() {
                short_splices += 1;
            }
            first = false;
            pipe = splice_from_pipe(&mut d, pipe, &server, len);
        }
    }
    assert!(short_splices > 0);
    drop(pipe);
    assert_eq!(pool.stats().idle, 1, "an empty pipe goes back to the pool");
    assert_eq!(pool.stats().closed_dirty, 0);
    drop(server);
    drop(d); // the driver holds no fd clones after completions, but be explicit
    let got = reader.join().unwrap();
    assert_eq!(got.len(), data.len());
    assert!(got == data, "spliced bytes differ");
    let _ = std::fs::remove_file(&path);
}

#[test]
fn read_fixed_write_fixed_round_trip() {
    let Some((_, mut d)) = setup("read_write_fixed", &["read_fixed", "write_fixed"]) else {
        return;
    };
    eprintln!("fixed buffers registered: {:?}", d.fixed_buffers_refused());
    // Nothing is pinned until a buffer is used; then only what was used at once (one).
    assert_eq!(d.fixed_buffers().registered_count(), 0);
    round_trip_fixed(&mut d);
    assert!(d.fixed_buffers_refused().is_none());
    assert_eq!(d.fixed_buffers().registered_count(), 1);
    assert_eq!(d.fixed_buffers().registered_bytes(), 8192);
}

fn round_trip_fixed(d: &mut Driver) {
    let path = temp_path("fixed");
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(true)
        .open(&path)
        .unwrap();
    let file: SharedFd = Rc::new(OwnedFd::from(file));
    let mut lease = d.fixed_buffers().lease().unwrap();
    let data = pattern(5000);
    lease.fill_from(&data);
    d.submit(
        Op::WriteFixed {
            file: file.clone(),
            offset: 4096,
            buf: lease,
        },
        1,
    )
    .unwrap();
    let c = next(d);
    assert_eq!(c.result, Ok(5000));
    assert!(matches!(c.resources, Returned::Fixed(_)));
    drop(c);
    let lease = d.fixed_buffers().lease().unwrap();
    d.submit(
        Op::ReadFixed {
            file,
            offset: 4096,
            buf: lease,
        },
        2,
    )
    .unwrap();
    let c = next(d);
    assert_eq!(c.result, Ok(5000));
    let Returned::Fixed(lease) = c.resources else {
        panic!("{c:?}")
    };
    assert_eq!(lease.as_slice(), &data[..]);
    let _ = std::fs::remove_file(&path);
}

#[test]
fn fadvise_willneed_reads_a_range_in_and_iowq_workers_can_be_limited() {
    let Some((_, mut d)) = setup("fadvise", &["fadvise"]) else {
        return;
    };
    let limits = d.limit_iowq_workers(3, 5).expect("limit io-wq workers");
    assert_eq!(limits, [3, 5]);
    let path = temp_file("fadvise", &pattern(256 * 1024));
    let file = std::fs::File::open(&path).unwrap();
    file.sync_all().unwrap();
    rustix::fs::fadvise(&file, 0, None, rustix::fs::Advice::DontNeed).unwrap();
    let fd: SharedFd = Rc::new(OwnedFd::from(file));
    if sluice_uring::residency(&*fd, 0, 256 * 1024) != sluice_uring::Residency::NotResident {
        eprintln!("SKIP: the pages could not be dropped or residency cannot be told here");
        return;
    }
    d.submit(
        Op::Fadvise {
            file: Rc::clone(&fd),
            offset: 0,
            len: 256 * 1024,
            advice: libc::POSIX_FADV_WILLNEED,
        },
        1,
    )
    .unwrap();
    let c = next(&mut d);
    assert_eq!(c.result, Ok(0), "{c:?}");
    assert!(matches!(c.resources, Returned::Nothing));
    // The read-ahead it started completes on its own; wait for it.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    while sluice_uring::residency(&*fd, 0, 256 * 1024) != sluice_uring::Residency::Resident {
        assert!(
            std::time::Instant::now() < deadline,
            "WILLNEED read nothing in"
        );
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
    let _ = std::fs::remove_file(&path);
}

#[test]
fn fsyncs_in_flight_together_and_sync_file_range_starts_write_back() {
    let Some((_, mut d)) = setup("fsync", &["fsync", "sync_file_range"]) else {
        return;
    };
    let data = pattern(1 << 20);
    let paths: Vec<_> = (0..8)
        .map(|i| temp_file(&format!("fsync{i}"), &[]))
        .collect();
    let files: Vec<SharedFd> = paths
        .iter()
        .map(|p| {
            let f = std::fs::OpenOptions::new().write(true).open(p).unwrap();
            Rc::new(OwnedFd::from(f))
        })
        .collect();
    for f in &files {
        rustix::io::pwrite(&**f, &data, 0).unwrap();
    }
    // Write-back of the first half of each, started and not waited for.
    for (i, f) in files.iter().enumerate() {
        d.submit(
            Op::SyncFileRange {
                file: Rc::clone(f),
                offset: 0,
                len: 512 * 1024,
                flags: libc::SYNC_FILE_RANGE_WRITE,
            },
            i as u64,
        )
        .unwrap();
    }
    for _ in 0..8 {
        let c = next(&mut d);
        assert_eq!(c.result, Ok(0), "{c:?}");
    }
    // Then every file's data synced, all eight in flight at once.
    for (i, f) in files.iter().enumerate() {
        d.submit(
            Op::Fsync {
                file: Rc::clone(f),
                datasync: i % 2 == 0,
            },
            100 + i as u64,
        )
        .unwrap();
    }
    assert_eq!(d.in_flight(), 8);
    let mut tokens = Vec::new();
    for _ in 0..8 {
        let c = next(&mut d);
        assert_eq!(c.result, Ok(0), "{c:?}");
        assert!(matches!(c.resources, Returned::Nothing));
        tokens.push(c.token);
    }
    tokens.sort_unstable();
    assert_eq!(tokens, (100..108).collect::<Vec<_>>());
    // An fd that cannot be synced answers with its errno, not a panic.
    let (sock, _peer) = tcp_pair();
    d.submit(
        Op::Fsync {
            file: sock,
            datasync: true,
        },
        9,
    )
    .unwrap();
    assert_eq!(next(&mut d).result, Err(Errno::EINVAL));
    // An offset past i64 is refused before it reaches the kernel.
    let refused = d.submit(
        Op::SyncFileRange {
            file: Rc::clone(&files[0]),
            offset: u64::MAX,
            len: 1,
            flags: libc::SYNC_FILE_RANGE_WRITE,
        },
        10,
    );
    assert!(refused.is_err());
    for p in paths {
        let _ = std::fs::remove_file(p);
    }
}

#[test]
fn a_write_linked_to_its_fsync_and_a_failed_link_cancelling_the_rest() {
    let Some((_, mut d)) = setup("linked", &["write", "fsync"]) else {
        return;
    };
    let path = temp_file("linked", &[]);
    let file = std::fs::OpenOptions::new().write(true).open(&path).unwrap();
    let fd: SharedFd = Rc::new(OwnedFd::from(file));
    let mut lease = d.fixed_buffers().lease().unwrap();
    let data = pattern(5000.min(lease.capacity()));
    lease.as_mut_capacity()[..data.len()].copy_from_slice(&data);
    lease.set_len(data.len());
    d.submit_linked(
        Op::WriteFixed {
            file: Rc::clone(&fd),
            offset: 0,
            buf: lease,
        },
        Op::Fsync {
            file: Rc::clone(&fd),
            datasync: true,
        },
        1,
    )
    .unwrap();
    let (first, second) = (next(&mut d), next(&mut d));
    assert_eq!(first.result, Ok(data.len() as u32), "{first:?}");
    assert!(matches!(first.resources, Returned::Fixed(_)));
    assert_eq!(second.result, Ok(0), "{second:?}");
    assert_eq!((first.token, second.token), (1, 1));
    assert_eq!(std::fs::read(&path).unwrap(), data);
    // A first op that fails cancels the one linked to it.
    let read_only: SharedFd = Rc::new(OwnedFd::from(std::fs::File::open(&path).unwrap()));
    let mut lease = d.fixed_buffers().lease().unwrap();
    lease.set_len(16);
    d.submit_linked(
        Op::WriteFixed {
            file: Rc::clone(&read_only),
            offset: 0,
            buf: lease,
        },
        Op::Fsync {
            file: read_only,
            datasync: true,
        },
        2,
    )
    .unwrap();
    let mut results = vec![next(&mut d).result, next(&mut d).result];
    results.sort_by_key(|r| format!("{r:?}"));
    assert_eq!(
        results,
        vec![Err(Errno(libc::EBADF)), Err(Errno::ECANCELED)]
    );
    assert_eq!(d.in_flight(), 0);
    let _ = std::fs::remove_file(&path);
}

#[test]
fn openat_and_statx_size() {
    let Some((_, mut d)) = setup("openat_statx", &["openat", "statx"]) else {
        return;
    };
    let path = temp_file("open", &pattern(12345));
    let cpath = CString::new(path.as_os_str().as_encoded_bytes()).unwrap();
    d.submit(
        Op::OpenAt {
            dir: None,
            path: cpath.clone(),
            flags: libc::O_RDONLY,
            mode: 0,
        },
        1,
    )
    .unwrap();
    let c = next(&mut d);
    let Returned::Fd(fd) = c.resources else {
        panic!("{c:?}")
    };
    let fd: SharedFd = Rc::new(fd);
    let empty = CString::new("").unwrap();
    let op = Op::Statx {
        dir: Some(fd),
        path: empty,
        flags: libc::AT_EMPTY_PATH,
        mask: libc::STATX_SIZE,
    };
    d.submit(op, 2).unwrap();
    let c = next(&mut d);
    let Returned::Statx(stx) = c.resources else {
        panic!("{c:?}")
    };
    assert_eq!(stx.size_bytes(), 12345);
    d.submit(
        Op::Statx {
            dir: None,
            path: cpath,
            flags: 0,
            mask: libc::STATX_SIZE,
        },
        3,
    )
    .unwrap();
    let Returned::Statx(stx) = next(&mut d).resources else {
        panic!("statx by path")
    };
    assert_eq!(stx.size_bytes(), 12345);
    let missing = CString::new("/nonexistent/sluice").unwrap();
    d.submit(
        Op::OpenAt {
            dir: None,
            path: missing,
            flags: libc::O_RDONLY,
            mode: 0,
        },
        4,
    )
    .unwrap();
    assert_eq!(next(&mut d).result, Err(Errno::ENOENT));
    let _ = std::fs::remove_file(&path);
}

#[test]
fn close_on_the_ring() {
    let Some((_, mut d)) = setup("close", &["close"]) else {
        return;
    };
    let mut fds = [0; 2];
    // SAFETY: fds is a valid array of two ints.
    assert_eq!(unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) }, 0);
    // SAFETY: pipe2 succeeded; we own both ends.
    let (read, write) = unsafe {
        (
            std::fs::File::from_raw_fd(fds[0]),
            OwnedFd::from_raw_fd(fds[1]),
        )
    };
    d.submit(Op::Close { fd: write }, 1).unwrap();
    let c = next(&mut d);
    assert_eq!(c.result, Ok(0));
    assert!(matches!(c.resources, Returned::Nothing));
    // The write end is really closed: the read end sees EOF.
    let mut buf = Vec::new();
    assert_eq!((&read).read_to_end(&mut buf).unwrap(), 0);
}

#[test]
fn timeout_fires() {
    let Some((_, mut d)) = setup("timeout", &["timeout"]) else {
        return;
    };
    let start = Instant::now();
    d.submit(
        Op::Timeout {
            duration: Duration::from_millis(50),
        },
        9,
    )
    .unwrap();
    let c = next(&mut d);
    assert_eq!((c.token, c.result), (9, Err(Errno::ETIME)));
    assert!(start.elapsed() >= Duration::from_millis(40));
}

#[test]
fn linked_timeout_cancels_a_recv_that_never_completes() {
    let config = one_op_config();
    let Some((_, mut d)) = setup_with("link_timeout", &["recv", "link_timeout"], config) else {
        return;
    };
    let (server, _client) = tcp_pair();
    let op = recv_vec(server, 16, 0);
    d.submit_with_timeout(op, 5, Duration::from_millis(50))
        .unwrap();
    let c = next(&mut d);
    assert_eq!(c.result, Err(Errno::ECANCELED));
    assert!(matches!(c.resources, Returned::Buf(IoBuf::Vec(ref v)) if v.capacity() >= 16));
    // The slot (ops_max = 1) is free again once the timeout's CQE is in.
    let start = Instant::now();
    loop {
        match d.submit(Op::Nop, 6) {
            Ok(_) => break,
            Err(e) => {
                assert!(start.elapsed() < DEADLINE, "slot never released: {e:?}");
                d.wait(1, Some(Duration::from_millis(100))).unwrap();
                d.complete(&mut Vec::new(), 0);
                let mut sink = Vec::new();
                d.complete(&mut sink, 8);
            }
        }
    }
    assert_eq!(next(&mut d).token, 6);
}

#[test]
fn async_cancel_returns_ecanceled_and_the_buffer() {
    let Some((_, mut d)) = setup("async_cancel", &["recv", "async_cancel"]) else {
        return;
    };
    let (server, _client) = tcp_pair();
    let mut buf = Vec::with_capacity(128);
    buf.extend_from_slice(b"xy");
    let id = d
        .submit(
            Op::Recv {
                fd: server,
                buf: IoBuf::Vec(buf),
                flags: 0,
            },
            4,
        )
        .unwrap();
    d.wait(0, None).unwrap();
    d.cancel(id).unwrap();
    let c = next(&mut d);
    assert_eq!((c.op_id, c.result), (id, Err(Errno::ECANCELED)));
    let Returned::Buf(IoBuf::Vec(v)) = c.resources else {
        panic!("buffer not returned")
    };
    assert_eq!(v, b"xy");
    assert_eq!(d.cancel(id), Err(sluice_uring::CancelError::NotInFlight));
}

#[test]
fn stale_generation_completion_is_ignored() {
    let config = one_op_config();
    let Some((_, mut d)) = setup_with("stale_generation", &["nop"], config) else {
        return;
    };
    let old = d.submit(Op::Nop, 1).unwrap();
    assert_eq!(next(&mut d).op_id, old);
    // A CQE naming the old generation of the (only) slot, as a late
    // completion of a finished op would.
    let stale = io_uring::opcode::Nop::new().build().user_data(old.raw());
    // SAFETY: a NOP points to no memory; its user_data is a finished op's.
    unsafe { d.push_raw(&stale) }.unwrap();
    let new = d.submit(Op::Nop, 2).unwrap();
    assert_eq!(new.user_data().slot, old.user_data().slot);
    assert_ne!(new.user_data().generation, old.user_data().generation);
    let c = next(&mut d);
    assert_eq!((c.op_id, c.token), (new, 2));
    assert_eq!(d.stats().stale_completions, 1);
}

#[test]
fn waker_from_another_thread_ends_a_blocked_wait() {
    let Some((_, mut d)) = setup("waker", &["read"]) else {
        return;
    };
    let waker = d.waker();
    let start = Instant::now();
    let t = std::thread::spawn(move || {
        std::thread::sleep(Duration::from_millis(100));
        waker.wake();
    });
    let mut out = Vec::new();
    while !d.take_woken() {
        assert!(start.elapsed() < DEADLINE, "never woken");
        d.wait(1, Some(Duration::from_secs(5))).unwrap();
        d.complete(&mut out, 8);
    }
    assert!(out.is_empty(), "a wake-up is not an op completion");
    assert!(start.elapsed() < Duration::from_secs(5));
    t.join().unwrap();
    // Re-armed: a second wake works too.
    d.waker().wake();
    let again = Instant::now();
    while !d.take_woken() {
        assert!(again.elapsed() < DEADLINE, "not re-armed");
        d.wait(1, Some(Duration::from_secs(1))).unwrap();
        d.complete(&mut out, 8);
    }
}

#[test]
fn dropping_driver_with_ops_in_flight_cancels_them() {
    let Some((_, mut d)) = setup("drop_in_flight", &["recv", "async_cancel"]) else {
        return;
    };
    let (server, _client) = tcp_pair();
    let lease = d.fixed_buffers().lease().unwrap();
    d.submit(
        Op::Recv {
            fd: server.clone(),
            buf: IoBuf::Fixed(lease),
            flags: 0,
        },
        1,
    )
    .unwrap();
    d.submit(
        Op::Timeout {
            duration: Duration::from_secs(3600),
        },
        2,
    )
    .unwrap();
    d.wait(0, None).unwrap();
    assert_eq!(d.in_flight(), 2);
    assert_eq!(d.shutdown(Duration::from_secs(5)), Ok(()));
    assert_eq!(d.fixed_buffers().available(), 4, "the lease came back");
    assert_eq!(
        Rc::strong_count(&server),
        1,
        "the op's fd clone was dropped"
    );
    assert!(
        d.submit(Op::Nop, 3).is_err(),
        "no submissions after shutdown"
    );
}

/// Drops CAP_IPC_LOCK from this thread only (capabilities are per thread)
/// and lowers RLIMIT_MEMLOCK (per process; other test threads keep
/// CAP_IPC_LOCK and so ignore it), then expects registration to be refused
/// and the pool to work unregistered.
#[test]
fn registration_refused_falls_back_to_unregistered() {
    let report = probe();
    if !report.available() {
        eprintln!("SKIP: registration_refused: io_uring unavailable");
        return;
    }
    let result = std::thread::spawn(|| {
        #[repr(C)]
        struct Header {
            version: u32,
            pid: i32,
        }
        #[repr(C)]
        #[derive(Clone, Copy)]
        struct Data {
            effective: u32,
            permitted: u32,
            inheritable: u32,
        }
        let mut header = Header {
            version: 0x2008_0522,
            pid: 0,
        };
        let mut data = [Data {
            effective: 0,
            permitted: 0,
            inheritable: 0,
        }; 2];
        // SAFETY: header and data match the kernel's v3 capability ABI.
        let got = unsafe { libc::syscall(libc::SYS_capget, &mut header, data.as_mut_ptr()) };
        assert_eq!(got, 0);
        data[0].effective &= !(1 << 14); // CAP_IPC_LOCK
                                         // SAFETY: as above.
        let set = unsafe { libc::syscall(libc::SYS_capset, &mut header, data.as_ptr()) };
        assert_eq!(set, 0);
        let mut old = libc::rlimit {
            rlim_cur: 0,
            rlim_max: 0,
        };
        // SAFETY: valid rlimit pointers.
        unsafe { libc::getrlimit(libc::RLIMIT_MEMLOCK, &mut old) };
        let low = libc::rlimit {
            rlim_cur: 64 * 1024,
            rlim_max: old.rlim_max,
        };
        // SAFETY: valid rlimit pointer.
        assert_eq!(unsafe { libc::setrlimit(libc::RLIMIT_MEMLOCK, &low) }, 0);
        // Buffers are registered when first leased (nothing is pinned at start), so the
        // refusal comes with the first read: a 128 KiB buffer over a 64 KiB limit.
        let config = DriverConfig {
            ops_max: 8,
            fixed_buffers_count: 16,
            fixed_buffer_bytes: 128 * 1024,
            ..DriverConfig::default()
        };
        let driver = Driver::new(config);
        let mut d = driver.expect("driver");
        assert!(d.fixed_buffers_refused().is_none(), "nothing pinned yet");
        round_trip_fixed(&mut d);
        // SAFETY: valid rlimit pointer.
        unsafe { libc::setrlimit(libc::RLIMIT_MEMLOCK, &old) };
        assert_eq!(d.fixed_buffers().registered_count(), 0);
        d.fixed_buffers_refused()
    })
    .join()
    .unwrap();
    let refused = result.expect("registration must be refused under a 64 KiB memlock limit");
    eprintln!("refused as expected: {}", refused.reason);
    assert_eq!(refused.errno, Errno(libc::ENOMEM));
    assert!(refused.reason.contains("memlock"));
}

#[test]
fn connect_to_a_loopback_listener_and_refused() {
    let Some((_, mut d)) = setup("connect", &["connect", "send"]) else {
        return;
    };
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let fd: SharedFd = Rc::new(new_tcp_socket());
    d.submit(
        Op::Connect {
            fd: Rc::clone(&fd),
            addr,
        },
        7,
    )
    .unwrap();
    let c = next(&mut d);
    assert_eq!((c.token, c.result), (7, Ok(0)));
    let (mut peer, _) = listener.accept().unwrap();
    d.submit(
        Op::Send {
            fd: Rc::clone(&fd),
            buf: IoBuf::Vec(b"hello".to_vec()),
            offset: 0,
            flags: libc::MSG_NOSIGNAL,
        },
        8,
    )
    .unwrap();
    assert_eq!(next(&mut d).result, Ok(5));
    let mut got = [0u8; 5];
    peer.read_exact(&mut got).unwrap();
    assert_eq!(&got, b"hello");

    // Nothing listens on a port we just freed: ECONNREFUSED, typed.
    let closed = {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap()
    };
    let fd: SharedFd = Rc::new(new_tcp_socket());
    d.submit(Op::Connect { fd, addr: closed }, 9).unwrap();
    assert_eq!(next(&mut d).result, Err(Errno(libc::ECONNREFUSED)));
}

fn new_tcp_socket() -> OwnedFd {
    // SAFETY: socket(2) with constant arguments; a non-negative result is a
    // new fd that nothing else owns.
    let raw = unsafe { libc::socket(libc::AF_INET, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0) };
    assert!(raw >= 0, "socket: {}", std::io::Error::last_os_error());
    // SAFETY: as above: `raw` is a fresh fd we own.
    unsafe { OwnedFd::from_raw_fd(raw) }
}

#[test]
fn fill_pipe_from_file_on_the_thread_then_splice_to_socket() {
    let Some((report, mut d)) = setup("fill_from_file", &["splice"]) else {
        return;
    };
    let data = pattern(200 * 1024 + 5);
    let path = temp_file("fill", &data);
    let file = std::fs::File::open(&path).unwrap();
    let (server, reader) = tcp_pair_read_on_a_thread();
    let pool = PipePool::new(1, 64 * 1024, report.pipe_max_size_bytes);
    let mut pipe = pool.take().unwrap();
    let mut offset = 0u64;
    loop {
        let n = pipe.fill_from_file(&file, offset, 64 * 1024).unwrap();
        if n == 0 {
            break;
        }
        assert_eq!(pipe.held_bytes(), n);
        offset += n as u64;
        while pipe.held_bytes() > 0 {
            let len = pipe.held_bytes() as u32;
            pipe = splice_from_pipe(&mut d, pipe, &server, len);
        }
    }
    assert_eq!(offset as usize, data.len());
    drop(pipe);
    drop(server);
    assert_eq!(reader.join().unwrap(), data);
    assert_eq!(pool.stats().idle, 1, "an empty pipe goes back to the pool");
    let _ = std::fs::remove_file(path);
}

/// The engine makes a socket O_NONBLOCK for its own non-blocking splices;
/// a ring recv on it must still wait for data (io_uring polls internally),
/// and POLL_ADD must report writability.
#[test]
fn ring_recv_waits_on_a_nonblocking_socket_and_poll_add_reports_pollout() {
    let Some((_, mut d)) = setup("nonblocking recv + poll_add", &["recv", "poll_add"]) else {
        return;
    };
    let (server, mut client) = tcp_pair();
    let flags = {
        // SAFETY: F_GETFL on an open fd.
        unsafe { libc::fcntl(server.as_raw_fd(), libc::F_GETFL) }
    };
    // SAFETY: F_SETFL with the flags just read plus O_NONBLOCK, on an open fd.
    let rc = unsafe { libc::fcntl(server.as_raw_fd(), libc::F_SETFL, flags | libc::O_NONBLOCK) };
    assert_eq!(rc, 0);
    d.submit(recv_vec(server.clone(), 64, 0), 1).unwrap();
    let mut out = Vec::new();
    d.wait(0, Some(Duration::from_millis(50))).unwrap();
    assert_eq!(
        d.complete(&mut out, 4),
        0,
        "recv must wait, not fail with EAGAIN: {out:?}"
    );
    client.write_all(b"late").unwrap();
    let c = next(&mut d);
    assert_eq!(c.result, Ok(4));
    d.submit(
        Op::PollAdd {
            fd: server.clone(),
            events: libc::POLLOUT as u32,
        },
        2,
    )
    .unwrap();
    let c = next(&mut d);
    assert!(c.result.unwrap() & libc::POLLOUT as u32 != 0);
}

/// `wait_spinning` sees a completion that arrives while it polls (a recv
/// whose data another thread sends 2 ms later, inside a 500 ms spin), and
/// with nothing to complete it still honours its timeout after the spin.
#[test]
fn wait_spinning_sees_a_completion_during_the_spin_and_times_out_without_one() {
    let Some((_, mut d)) = setup("wait_spinning", &["recv"]) else {
        return;
    };
    let (server, mut client) = tcp_pair();
    d.submit(recv_vec(server, 64, 0), 1).unwrap();
    let sender = std::thread::spawn(move || {
        std::thread::sleep(Duration::from_millis(2));
        client.write_all(b"ping").unwrap();
        client
    });
    let mut out = Vec::new();
    let start = Instant::now();
    while d.complete(&mut out, 1) == 0 {
        assert!(start.elapsed() < DEADLINE, "no completion");
        d.wait_spinning(Duration::from_millis(500), Some(Duration::from_secs(1)))
            .unwrap();
    }
    let c = out.pop().unwrap();
    assert_eq!((c.token, c.result), (1, Ok(4)));
    let _client = sender.join().unwrap();

    // Nothing in flight: spin 1 ms, then sleep out the 20 ms timeout.
    let start = Instant::now();
    d.wait_spinning(Duration::from_millis(1), Some(Duration::from_millis(20)))
        .unwrap();
    assert_eq!(d.complete(&mut out, 1), 0);
    assert!(start.elapsed() >= Duration::from_millis(15));
}
