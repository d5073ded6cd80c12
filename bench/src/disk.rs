//! The disk's own bound for durable uploads: parallel writers each writing a body to a new
//! file, `fdatasync`ing it and renaming it over the last one, as fast as they can. This is
//! what `dd conv=fdatasync` measures, per file, with the publish step a store makes (a new
//! file, then a rename). A PUT that must be durable before its 2xx cannot beat it; a server
//! that does not sync (nginx's WebDAV PUT) can, by leaving the data in the page cache.
//! The directory is not fsynced (sluice fsyncs it too under `fsync = always`): the bound is the
//! data's.

use std::fs::{self, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::report::record_latency_us;
use crate::request::Body;
use crate::run::RunResult;

/// Writes `body` with `writers` threads into `dir` for `duration` (each file: create, write,
/// `fdatasync`, rename over the writer's previous file) and reports it as a run: one "request"
/// per durable file, its latency from create to rename, its bytes the body's. The files are
/// removed at the end.
pub fn write_bound(
    dir: &Path,
    body: &Arc<Body>,
    writers: usize,
    duration: Duration,
) -> Result<RunResult, String> {
    fs::create_dir_all(dir).map_err(|e| format!("creating {}: {e}", dir.display()))?;
    let writers = writers.max(1);
    let stop = Arc::new(AtomicBool::new(false));
    let started = Instant::now();
    let mut threads = Vec::with_capacity(writers);
    for w in 0..writers {
        let (body, stop) = (Arc::clone(body), Arc::clone(&stop));
        let target = dir.join(format!("writer-{w}"));
        let temp = dir.join(format!("writer-{w}.tmp"));
        threads.push(std::thread::spawn(move || {
            writer(&body, &temp, &target, &stop)
        }));
    }
    // Each writer checks the flag between files, so the run ends when the last file in
    // flight is durable; the elapsed time runs to then, as a load run's runs to its last
    // completion.
    std::thread::sleep(duration);
    stop.store(true, Ordering::Relaxed);
    let mut result = RunResult::default();
    let mut failure = None;
    for t in threads {
        match t.join() {
            Ok(Ok(w)) => {
                // Every histogram has the same bounds: adding cannot fail.
                let _ = result.add(&w);
            }
            Ok(Err(e)) => failure = Some(e),
            Err(_) => failure = Some("a disk writer thread panicked".to_string()),
        }
    }
    result.elapsed = started.elapsed();
    for w in 0..writers {
        let _ = fs::remove_file(dir.join(format!("writer-{w}")));
        let _ = fs::remove_file(dir.join(format!("writer-{w}.tmp")));
    }
    match failure {
        Some(e) => Err(e),
        None => Ok(result),
    }
}

fn writer(
    body: &Body,
    temp: &PathBuf,
    target: &PathBuf,
    stop: &AtomicBool,
) -> Result<RunResult, String> {
    let mut r = RunResult::default();
    // At least one file per writer, even if the run is over before the thread starts.
    loop {
        let t = Instant::now();
        let mut f = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .open(temp)
            .map_err(|e| format!("disk bound: creating {}: {e}", temp.display()))?;
        f.write_all(&body.bytes)
            .and_then(|()| f.sync_data())
            .map_err(|e| format!("disk bound: writing {}: {e}", temp.display()))?;
        drop(f);
        fs::rename(temp, target)
            .map_err(|e| format!("disk bound: renaming {}: {e}", temp.display()))?;
        record_latency_us(
            &mut r.histogram,
            u64::try_from(t.elapsed().as_micros()).unwrap_or(u64::MAX),
        );
        r.requests_ok += 1;
        r.body_bytes += body.bytes.len() as u64;
        if stop.load(Ordering::Relaxed) {
            return Ok(r);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn writes_durable_files_and_cleans_up() {
        let dir = std::env::temp_dir().join(format!("sluice-bench-disk-{}", std::process::id()));
        let body = Arc::new(Body::generate(4096));
        let r = write_bound(&dir, &body, 2, Duration::from_millis(100)).expect("disk bound");
        assert!(r.requests_ok >= 2, "{} files", r.requests_ok);
        assert_eq!(r.body_bytes, r.requests_ok * 4096);
        assert_eq!(r.histogram.len(), r.requests_ok);
        assert!(r.elapsed >= Duration::from_millis(100));
        let left = fs::read_dir(&dir).expect("dir").count();
        assert_eq!(left, 0, "writer files are removed");
        let _ = fs::remove_dir(&dir);
    }
}
