//! Crash tests: kill -9 while group commits are in flight under load, on
//! every engine, then restart on the same data directory. Every write the
//! server acknowledged (a 2xx) must be there and whole; a write in flight at
//! the kill may or may not be (it was never acknowledged), but nothing torn
//! is ever served. And with a peer, every acknowledged write still reaches
//! it after the restart: its outbox entry was durable before the 2xx.
//!
//! A kill -9 keeps what the kernel holds (the page cache survives it); what
//! a power cut adds (writes no sync covered are lost) is tested in the
//! store's own tests (`store::commit_tests`), which take those writes away
//! by hand and replay the journal.

mod common;

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::{http, server, sha256_hex, wait_for, xorshift_bytes};

fn free_ports(n: usize) -> Vec<u16> {
    common::free_ports_in(24_000, 60, n)
}

/// What one writer thread knows about its keys: the last version the server
/// acknowledged, and the one in flight when the server died (if any).
#[derive(Default)]
struct KeyState {
    acked: Option<Option<Vec<u8>>>, // Some(None): acknowledged DELETE
    in_flight: Option<Option<Vec<u8>>>,
}

type Ledger = Arc<Mutex<BTreeMap<String, KeyState>>>;

/// One PUT or DELETE on a keep-alive connection; the status, or None when
/// the connection broke (the server died).
fn exchange(
    conn: &mut Option<TcpStream>,
    addr: SocketAddr,
    method: &str,
    path: &str,
    body: &[u8],
) -> Option<u16> {
    if conn.is_none() {
        let s = TcpStream::connect(addr).ok()?;
        s.set_read_timeout(Some(Duration::from_secs(20))).ok()?;
        s.set_nodelay(true).ok()?;
        *conn = Some(s);
    }
    let s = conn.as_mut()?;
    let head = format!(
        "{method} {path} HTTP/1.1\r\nHost: x\r\nContent-Length: {}\r\n\r\n",
        body.len()
    );
    let sent = s
        .write_all(head.as_bytes())
        .and_then(|()| s.write_all(body));
    if sent.is_err() {
        *conn = None;
        return None;
    }
    let mut buf = Vec::with_capacity(1024);
    let mut chunk = [0u8; 4096];
    loop {
        if let Some((resp, used)) = common::parse_response(&buf, false) {
            if used <= buf.len() {
                if resp
                    .header("connection")
                    .is_some_and(|v| v.eq_ignore_ascii_case("close"))
                {
                    *conn = None;
                }
                return Some(resp.status);
            }
        }
        match s.read(&mut chunk) {
            Ok(0) | Err(_) => {
                *conn = None;
                return None;
            }
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
        }
    }
}

/// A writer: its own keys, so "the last acknowledged version" is defined.
/// Mixes small bodies (the journal's), large ones (their own syncs),
/// overwrites and deletes, until the server dies.
fn writer(addr: SocketAddr, id: u64, ledger: Ledger, stop: Arc<AtomicBool>) {
    let mut conn = None;
    let mut n = 0u64;
    while !stop.load(Ordering::Relaxed) {
        n += 1;
        let key = format!("/v1/artifacts/crash/w{id}-k{}", n % 7);
        let len = match n % 5 {
            0 => 300_000 + (n as usize % 1000), // larger than the journal takes
            1 => 40_000,
            _ => 100 + (n as usize * 37) % 4000,
        };
        let delete = n.is_multiple_of(11);
        let body = xorshift_bytes(id * 1_000_000 + n, len);
        let version = if delete { None } else { Some(body.clone()) };
        ledger
            .lock()
            .unwrap()
            .entry(key.clone())
            .or_default()
            .in_flight = Some(version.clone());
        let status = if delete {
            exchange(&mut conn, addr, "DELETE", &key, b"")
        } else {
            exchange(&mut conn, addr, "PUT", &key, &body)
        };
        let mut ledger = ledger.lock().unwrap();
        let state = ledger.entry(key).or_default();
        match status {
            Some(s) if (200..300).contains(&s) => {
                state.acked = Some(version);
                state.in_flight = None;
            }
            // A 404 for a DELETE of a key deleted already: nothing changed.
            Some(404) if delete => state.in_flight = None,
            Some(s) => panic!("writer {id}: status {s} before the kill"),
            // The server died with this one in flight: keep it as possible.
            None => return,
        }
        // CAS blobs too, each acknowledged one checked after the restart.
        drop(ledger);
    }
}

/// CAS uploads: content-addressed, acknowledged ones recorded.
fn cas_writer(addr: SocketAddr, id: u64, acked: Arc<Mutex<Vec<Vec<u8>>>>, stop: Arc<AtomicBool>) {
    let mut conn = None;
    let mut n = 0u64;
    while !stop.load(Ordering::Relaxed) {
        n += 1;
        let len = if n.is_multiple_of(9) {
            600_000
        } else {
            1 + (n as usize * 131) % 20_000
        };
        let body = xorshift_bytes(0xCA5_0000 + id * 1_000_000 + n, len);
        let path = format!("/cas/{}", sha256_hex(&body));
        match exchange(&mut conn, addr, "PUT", &path, &body) {
            Some(s) if (200..300).contains(&s) => acked.lock().unwrap().push(body),
            Some(s) => panic!("cas writer {id}: status {s} before the kill"),
            None => return,
        }
    }
}

fn kill9(child: &mut std::process::Child) {
    let pid = rustix::process::Pid::from_raw(child.id() as i32).expect("pid");
    let _ = rustix::process::kill_process(pid, rustix::process::Signal::KILL);
    let _ = child.wait();
}

/// Load for a while, kill -9 with writes in flight, restart, check.
fn crash_and_check(engine: &str, data: &Path) {
    let mut s = server()
        .no_tls()
        .data_dir(data)
        .env("SLUICE_ENGINE", engine)
        .env("SLUICE_FSYNC", "always")
        .start();
    let addr = s.addr;
    let ledger: Ledger = Arc::default();
    let cas: Arc<Mutex<Vec<Vec<u8>>>> = Arc::default();
    let stop = Arc::new(AtomicBool::new(false));
    let mut threads = Vec::new();
    for id in 0..6 {
        let (ledger, stop) = (Arc::clone(&ledger), Arc::clone(&stop));
        threads.push(std::thread::spawn(move || writer(addr, id, ledger, stop)));
    }
    for id in 0..3 {
        let (cas, stop) = (Arc::clone(&cas), Arc::clone(&stop));
        threads.push(std::thread::spawn(move || cas_writer(addr, id, cas, stop)));
    }
    // Enough acknowledged writes that the kill lands among commits in flight.
    wait_for("writes to be acknowledged", Duration::from_secs(60), || {
        cas.lock().unwrap().len() >= 60
            && ledger
                .lock()
                .unwrap()
                .values()
                .filter(|k| k.acked.is_some())
                .count()
                >= 30
    });
    kill9(&mut s.child);
    stop.store(true, Ordering::Relaxed);
    for t in threads {
        t.join().expect("writer");
    }
    drop(s);

    let s = server()
        .no_tls()
        .data_dir(data)
        .env("SLUICE_ENGINE", engine)
        .start();
    let ledger = ledger.lock().unwrap();
    let mut checked = 0;
    for (key, state) in ledger.iter() {
        let Some(acked) = &state.acked else { continue };
        let r = http(s.addr, "GET", key, &[], b"");
        let got = (r.status == 200).then_some(r.body);
        let ok = got == *acked || state.in_flight.as_ref().is_some_and(|v| got == *v);
        assert!(
            ok,
            "{engine}: {key} after the restart: status {}, {} bytes; acknowledged {}",
            r.status,
            got.as_ref().map_or(0, Vec::len),
            match acked {
                Some(b) => format!("a PUT of {} bytes", b.len()),
                None => "a DELETE".into(),
            }
        );
        checked += 1;
    }
    for body in cas.lock().unwrap().iter() {
        let path = format!("/cas/{}", sha256_hex(body));
        let r = http(s.addr, "GET", &path, &[], b"");
        assert_eq!(r.status, 200, "{engine}: acknowledged {path} lost");
        assert!(r.body == *body, "{engine}: {path} torn");
        checked += 1;
    }
    assert!(checked >= 90, "{engine}: only {checked} writes checked");
}

#[test]
fn acknowledged_writes_survive_kill_9_on_every_engine() {
    for engine in ["uring", "epoll", "fallback"] {
        if engine == "uring" && !common_uring_available() {
            eprintln!("SKIPPED: the ring engine: io_uring is not available here");
            continue;
        }
        let tmp = tempfile::tempdir().expect("tempdir");
        let data = tmp.path().join("data");
        // Twice on one directory: the second restart replays what the
        // first run's journal left, on top of the first crash.
        crash_and_check(engine, &data);
        crash_and_check(engine, &data);
    }
}

fn common_uring_available() -> bool {
    let (ok, _) = common::engine_status(&server().no_tls().start());
    ok
}

/// The outbox entry of every acknowledged write is durable before the 2xx:
/// written while the peer is away, killed -9, restarted with the peer up,
/// every acknowledged write arrives.
#[test]
fn acknowledged_writes_reach_a_peer_after_kill_9() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let ports = free_ports(2);
    let secret = "durability-peer-secret-0123456789";
    let node = |port: u16, dir: &Path, peer: u16| {
        server()
            .no_tls()
            .listen(&format!("127.0.0.1:{port}"))
            .data_dir(dir)
            .arg("--peers")
            .arg(&format!("127.0.0.1:{peer}"))
            .env("SLUICE_PEER_SECRET", secret)
            .env("SLUICE_READ_THROUGH", "false")
            .env("SLUICE_FSYNC", "always")
            .start()
    };
    let a_dir = tmp.path().join("a");
    let mut a = node(ports[0], &a_dir, ports[1]);
    let cas: Arc<Mutex<Vec<Vec<u8>>>> = Arc::default();
    let stop = Arc::new(AtomicBool::new(false));
    let threads: Vec<_> = (0..4)
        .map(|id| {
            let (cas, stop, addr) = (Arc::clone(&cas), Arc::clone(&stop), a.addr);
            std::thread::spawn(move || cas_writer(addr, 10 + id, cas, stop))
        })
        .collect();
    wait_for("writes to be acknowledged", Duration::from_secs(60), || {
        cas.lock().unwrap().len() >= 80
    });
    kill9(&mut a.child);
    stop.store(true, Ordering::Relaxed);
    for t in threads {
        t.join().expect("writer");
    }
    drop(a);
    let b = node(ports[1], &tmp.path().join("b"), ports[0]);
    let _a = node(ports[0], &a_dir, ports[1]);
    let acked = cas.lock().unwrap().clone();
    let deadline = Instant::now() + Duration::from_secs(120);
    for body in &acked {
        let path = format!("/cas/{}", sha256_hex(body));
        loop {
            let r = http(b.addr, "GET", &path, &[], b"");
            if r.status == 200 {
                assert!(r.body == *body, "{path} arrived torn");
                break;
            }
            assert!(
                Instant::now() < deadline,
                "acknowledged {path} never reached the peer"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}
