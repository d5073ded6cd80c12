//! Durable commits per second through the store alone (no HTTP), for choosing how the store
//! syncs: `cargo run --release --example commit_bench -- DIR [THREADS] [BODY_BYTES] [SECS]`.
//! Each thread commits distinct keys of `BODY_BYTES` under `fsync = always` for `SECS`; prints
//! commits/s and how they synced.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use sluice::store::{FsyncPolicy, PutOptions, Store, StoreConfig};

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let dir = std::path::PathBuf::from(args.get(1).map_or("bench/out/commit", String::as_str));
    let threads: usize = args.get(2).map_or(8, |s| s.parse().expect("THREADS"));
    let bytes: usize = args.get(3).map_or(4096, |s| s.parse().expect("BODY_BYTES"));
    let secs: f64 = args.get(4).map_or(3.0, |s| s.parse().expect("SECS"));
    let _ = std::fs::remove_dir_all(&dir);
    let store = Store::open(StoreConfig {
        data_dir: dir.clone(),
        store_bytes_max: 0,
        fsync: FsyncPolicy::Always,
    })
    .expect("open");
    let stop = Arc::new(AtomicBool::new(false));
    let done = Arc::new(AtomicU64::new(0));
    let start = Instant::now();
    let handles: Vec<_> = (0..threads)
        .map(|t| {
            let (store, stop, done) = (store.clone(), Arc::clone(&stop), Arc::clone(&done));
            std::thread::spawn(move || {
                let body = vec![t as u8; bytes];
                let mut i = 0u64;
                while !stop.load(Ordering::Relaxed) {
                    let mut w = store
                        .begin_put("bench", &format!("t{t}-{i}"), PutOptions::default())
                        .expect("begin");
                    w.write(&body).expect("write");
                    w.commit().expect("commit");
                    done.fetch_add(1, Ordering::Relaxed);
                    i += 1;
                }
            })
        })
        .collect();
    std::thread::sleep(Duration::from_secs_f64(secs));
    stop.store(true, Ordering::Relaxed);
    for h in handles {
        h.join().expect("thread");
    }
    let n = done.load(Ordering::Relaxed);
    let s = store.sync_stats();
    let load = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    println!(
        "{threads} threads, {bytes} B: {:.0} commits/s; {s:?} (load {})",
        n as f64 / start.elapsed().as_secs_f64(),
        load.split_whitespace().next().unwrap_or("?")
    );
    drop(store);
    let _ = std::fs::remove_dir_all(&dir);
}
