//! What a request's arrival time costs to learn, and how faithful each way is, on loopback.
//!
//! `cargo run --release -p sluice-uring --example rx_stamp_cost [rounds]`
//!
//! A client writes a 100-byte "request" on a TCP connection and the server reads it, over and
//! over, one at a time (ping-pong, so every read finds exactly one request). The server reads
//! each one four ways, in turn:
//!
//! - `recv`: a plain read, the baseline;
//! - `recvmsg + SO_TIMESTAMPING`: the read with a control buffer; the kernel's software
//!   receive stamp of the bytes comes back with them (what sluice's fronts use);
//! - `recv + TCP_INFO`: a plain read followed by `getsockopt(TCP_INFO)`, whose
//!   `tcpi_last_data_recv` says how long ago (ms, in jiffies) the last data arrived;
//! - both kernels' clocks: each read is also timed with `clock_gettime`, and the reported
//!   arrival is compared with the client's own send time (fidelity).
//!
//! Fidelity is measured with the request left waiting in the socket for a known time
//! (`--wait-us`, default 700 µs: about a p99 this server must see) before the server reads it:
//! the stamp should report that wait, TCP_INFO rounds it to its clock's tick.
//!
//! Prints ns per read for each way (median of 5 rounds) and the error of each reported wait.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::os::fd::{AsFd, AsRawFd};
use std::time::{Duration, Instant, SystemTime};

use sluice_uring::stamp::{enable_rx_timestamps, recv_stamped};

const REQUEST: [u8; 100] = [b'x'; 100];

fn pair(stamped: bool) -> (TcpStream, TcpStream) {
    let l = TcpListener::bind("127.0.0.1:0").expect("bind");
    if stamped {
        enable_rx_timestamps(l.as_fd()).expect("SO_TIMESTAMPING");
    }
    let c = TcpStream::connect(l.local_addr().expect("addr")).expect("connect");
    c.set_nodelay(true).expect("nodelay");
    let (s, _) = l.accept().expect("accept");
    (c, s)
}

/// `tcpi_last_data_recv` in ms (the kernel's jiffies since the last data segment arrived).
fn tcp_info_last_data_recv_ms(s: &TcpStream) -> u32 {
    let mut info: libc::tcp_info =
        // SAFETY: tcp_info is a plain C struct; all-zero bytes are a valid value.
        unsafe { std::mem::zeroed() };
    let mut len = std::mem::size_of::<libc::tcp_info>() as libc::socklen_t;
    // SAFETY: the kernel writes at most `len` bytes into `info`, a live local, and updates
    // `len`; both outlive the call.
    let rc = unsafe {
        libc::getsockopt(
            s.as_raw_fd(),
            libc::IPPROTO_TCP,
            libc::TCP_INFO,
            std::ptr::addr_of_mut!(info).cast(),
            &mut len,
        )
    };
    assert_eq!(rc, 0, "TCP_INFO: {}", std::io::Error::last_os_error());
    info.tcpi_last_data_recv
}

#[derive(Clone, Copy, Debug, PartialEq)]
enum Way {
    Recv,
    Stamp,
    TcpInfo,
}

/// ns per request for `way` over `n` ping-pongs.
fn cost(way: Way, n: usize) -> f64 {
    let (mut c, mut s) = pair(way == Way::Stamp);
    // Let the kernel's stamping switch on (a work item) before measuring.
    std::thread::sleep(Duration::from_millis(50));
    let mut buf = vec![0u8; 4096];
    let mut vbuf = Vec::with_capacity(4096);
    let mut spent = Duration::ZERO;
    let mut sink = 0u64;
    for _ in 0..n {
        c.write_all(&REQUEST).expect("write");
        let t = Instant::now();
        match way {
            Way::Recv => {
                let got = s.read(&mut buf).expect("read");
                sink += got as u64;
            }
            Way::Stamp => {
                vbuf.clear();
                let (got, stamp) = recv_stamped(s.as_fd(), &mut vbuf, 0).expect("recvmsg");
                sink += got as u64 + stamp.map_or(0, |x| x.unix_ns & 1);
            }
            Way::TcpInfo => {
                let got = s.read(&mut buf).expect("read");
                sink += got as u64 + u64::from(tcp_info_last_data_recv_ms(&s));
            }
        }
        spent += t.elapsed();
        // Answer, so the next request arrives in an empty socket (as between requests).
        s.write_all(b"ok").expect("answer");
        let mut two = [0u8; 2];
        c.read_exact(&mut two).expect("answer read");
    }
    assert!(sink > 0);
    spent.as_nanos() as f64 / n as f64
}

/// Reported waits (µs) for requests left `wait` in the socket: (stamp, TCP_INFO) errors.
fn fidelity(wait: Duration, n: usize) -> (Vec<f64>, Vec<f64>) {
    let (mut c, s) = pair(true);
    std::thread::sleep(Duration::from_millis(50));
    let mut vbuf = Vec::with_capacity(4096);
    let (mut stamp_err, mut info_err) = (Vec::new(), Vec::new());
    for _ in 0..n {
        let sent = SystemTime::now();
        c.write_all(&REQUEST).expect("write");
        let until = Instant::now() + wait;
        while Instant::now() < until {
            std::hint::spin_loop();
        }
        vbuf.clear();
        let (_, stamp) = recv_stamped(s.as_fd(), &mut vbuf, 0).expect("recvmsg");
        let now = SystemTime::now();
        let truth = now.duration_since(sent).unwrap_or_default().as_secs_f64() * 1e6;
        if let Some(stamp) = stamp {
            stamp_err.push(stamp.age_at(now).as_secs_f64() * 1e6 - truth);
        }
        info_err.push(f64::from(tcp_info_last_data_recv_ms(&s)) * 1000.0 - truth);
        let mut sw = &s;
        sw.write_all(b"ok").expect("answer");
        let mut two = [0u8; 2];
        c.read_exact(&mut two).expect("answer read");
    }
    (stamp_err, info_err)
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v.get(v.len() / 2).copied().unwrap_or(f64::NAN)
}

fn percentile(mut v: Vec<f64>, p: f64) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    let i = ((v.len() as f64 - 1.0) * p).round() as usize;
    v.get(i).copied().unwrap_or(f64::NAN)
}

fn main() {
    let rounds: usize = std::env::args()
        .nth(1)
        .and_then(|a| a.parse().ok())
        .unwrap_or(20_000);
    let wait_us: u64 = std::env::args()
        .nth(2)
        .and_then(|a| a.parse().ok())
        .unwrap_or(700);
    let mut by_way = vec![
        (Way::Recv, Vec::new()),
        (Way::Stamp, Vec::new()),
        (Way::TcpInfo, Vec::new()),
    ];
    // Five alternating rounds, so a noisy neighbour hits every way alike.
    for _ in 0..5 {
        for (way, out) in by_way.iter_mut() {
            out.push(cost(*way, rounds));
        }
    }
    let base = median(by_way[0].1.clone());
    println!("ns per read of a 100-byte request (median of 5 rounds of {rounds}):");
    for (way, v) in &by_way {
        let m = median(v.clone());
        println!("  {way:?}: {m:.0} ns ({:+.0} ns over recv)", m - base);
    }
    let (stamp_err, info_err) = fidelity(Duration::from_micros(wait_us), 2000);
    println!(
        "error of the reported wait for requests left {wait_us} µs in the socket (2000 requests):"
    );
    println!(
        "  SO_TIMESTAMPING: median {:+.1} µs, p1 {:+.1} µs, p99 {:+.1} µs ({} stamped)",
        median(stamp_err.clone()),
        percentile(stamp_err.clone(), 0.01),
        percentile(stamp_err.clone(), 0.99),
        stamp_err.len()
    );
    println!(
        "  TCP_INFO tcpi_last_data_recv: median {:+.1} µs, p1 {:+.1} µs, p99 {:+.1} µs",
        median(info_err.clone()),
        percentile(info_err.clone(), 0.01),
        percentile(info_err, 0.99)
    );
}
