//! Syncs on the ring against syncs on threads, on the disk under a directory.
//!
//! `cargo run --release -p sluice-uring --example fsync_ring_vs_threads -- DIR [FILE_BYTES] [IN_FLIGHT] [SECS] [ROUNDS]`
//!
//! Each round, alternating: `IN_FLIGHT` threads each rewrite a file of `FILE_BYTES` (new file,
//! write, `fdatasync`) as fast as they can; then one thread keeps `IN_FLIGHT` files in flight
//! on a ring (the writes done on the thread, each `fdatasync` an `IORING_OP_FSYNC` with
//! `IORING_FSYNC_DATASYNC`, the next file written as a completion arrives); then the same
//! with the write and the sync linked on the ring (`IORING_OP_WRITE` → `IO_LINK` →
//! `IORING_OP_FSYNC`), so the thread does no file I/O at all. Reports files/s per variant.

use std::fs::{File, OpenOptions};
use std::os::fd::OwnedFd;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::rc::Rc;
use std::time::{Duration, Instant};

use sluice_uring::{Driver, DriverConfig, Op, SharedFd};

fn path(dir: &Path, slot: usize) -> PathBuf {
    dir.join(format!("sync-bench-{slot}"))
}

fn create(dir: &Path, slot: usize) -> File {
    let reuse = std::env::var_os("REUSE").is_some();
    OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(!reuse)
        .open(path(dir, slot))
        .expect("create")
}

fn threads(dir: &Path, bytes: usize, n: usize, secs: f64) -> f64 {
    let deadline = Instant::now() + Duration::from_secs_f64(secs);
    let start = Instant::now();
    let total: u64 = std::thread::scope(|s| {
        (0..n)
            .map(|slot| {
                s.spawn(move || {
                    let body = vec![slot as u8; bytes];
                    let mut count = 0u64;
                    while Instant::now() < deadline {
                        let f = create(dir, slot);
                        f.write_all_at(&body, 0).expect("write");
                        f.sync_data().expect("fdatasync");
                        count += 1;
                    }
                    count
                })
            })
            .collect::<Vec<_>>()
            .into_iter()
            .map(|h| h.join().expect("thread"))
            .sum()
    });
    total as f64 / start.elapsed().as_secs_f64()
}

fn ring(dir: &Path, bytes: usize, n: usize, secs: f64, linked: bool) -> f64 {
    let mut d = Driver::new(DriverConfig {
        ops_max: 4 * n as u32 + 8,
        fixed_buffers_count: n as u16,
        fixed_buffer_bytes: bytes.max(1),
        ..DriverConfig::default()
    })
    .expect("ring");
    let body = vec![7u8; bytes];
    let deadline = Instant::now() + Duration::from_secs_f64(secs);
    let start = Instant::now();
    let mut done = 0u64;
    let mut in_flight = 0usize;
    let submit = |d: &mut Driver, slot: usize| {
        let f = create(dir, slot);
        let fd: SharedFd = Rc::new(OwnedFd::from(f));
        if linked {
            let mut buf = d.fixed_buffers().lease().expect("buffer");
            buf.as_mut_capacity()[..bytes].copy_from_slice(&body);
            buf.set_len(bytes);
            let file = Rc::clone(&fd);
            let write = Op::WriteFixed {
                file,
                offset: 0,
                buf,
            };
            let sync = Op::Fsync {
                file: fd,
                datasync: true,
            };
            d.submit_linked(write, sync, slot as u64).expect("submit");
        } else {
            rustix::io::pwrite(&*fd, &body, 0).expect("write");
            d.submit(
                Op::Fsync {
                    file: fd,
                    datasync: true,
                },
                slot as u64,
            )
            .expect("submit");
        }
    };
    for slot in 0..n {
        submit(&mut d, slot);
        in_flight += 1;
    }
    let mut out = Vec::with_capacity(n * 2);
    while in_flight > 0 {
        d.wait(1, Some(Duration::from_millis(100))).expect("wait");
        d.complete(&mut out, n * 2);
        for c in out.drain(..) {
            if !matches!(c.kind, sluice_uring::OpKind::Fsync) {
                assert!(c.result.is_ok(), "{c:?}");
                continue;
            }
            assert!(c.result.is_ok(), "{c:?}");
            in_flight -= 1;
            done += 1;
            if Instant::now() < deadline {
                submit(&mut d, c.token as usize);
                in_flight += 1;
            }
        }
    }
    done as f64 / start.elapsed().as_secs_f64()
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let dir = PathBuf::from(args.get(1).map_or("bench/out/fsync", String::as_str));
    let bytes: usize = args.get(2).map_or(4096, |s| s.parse().expect("FILE_BYTES"));
    let n: usize = args.get(3).map_or(8, |s| s.parse().expect("IN_FLIGHT"));
    let secs: f64 = args.get(4).map_or(3.0, |s| s.parse().expect("SECS"));
    let rounds: usize = args.get(5).map_or(3, |s| s.parse().expect("ROUNDS"));
    std::fs::create_dir_all(&dir).expect("dir");
    let load = || std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    println!(
        "{bytes} B files, {n} in flight, {secs} s per variant, load {}",
        load().trim()
    );
    for round in 1..=rounds {
        let t = threads(&dir, bytes, n, secs);
        let r = ring(&dir, bytes, n, secs, false);
        let l = ring(&dir, bytes, n, secs, true);
        println!(
            "round {round}: threads {t:.0}/s, ring fsync {r:.0}/s, ring write+fsync linked {l:.0}/s (load {})",
            load().split_whitespace().next().unwrap_or("?")
        );
    }
    for slot in 0..n {
        let _ = std::fs::remove_file(path(&dir, slot));
    }
}
