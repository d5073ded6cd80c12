//! Lifecycle under load: binary upgrades (SIGUSR2 through `sluice upgrade`), a failed
//! upgrade, SIGTERM to an old process while its successor serves, a long download across an
//! upgrade, refused shutdown budgets and a second SIGTERM. Load comes from the real
//! `sluice-bench` in open loop (mixed 4 KiB and 17 MB GETs, 1 MiB PUTs) for the whole test;
//! every load test requires zero failed requests, zero refused connections and every PUT
//! readable afterwards.

mod common;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::{req, server, sha256_hex, Front, Server};

const SMALL_BYTES: usize = 4096;
const LARGE_BYTES: usize = 17_000_000;
const PUT_BYTES: usize = 1 << 20;
/// PUT keys in the list; more than a run sends, so each key is written by few requests.
const PUT_KEYS: usize = 400;

/// One load test at a time: they share two cores with everything else, and a starved
/// server would fail the open-loop rate rather than the lifecycle.
static LOAD: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn serial() -> std::sync::MutexGuard<'static, ()> {
    LOAD.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

fn bench_binary() -> PathBuf {
    // The bench is a workspace member, not a dependency: build it once (cheap when fresh).
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let status = Command::new(env!("CARGO"))
        .args(["build", "-q", "-p", "sluice-bench"])
        .current_dir(root)
        .status()
        .expect("cargo build -p sluice-bench");
    assert!(status.success(), "cannot build sluice-bench");
    let exe = Path::new(env!("CARGO_BIN_EXE_sluice"));
    exe.with_file_name("sluice-bench")
}

fn body(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|n| (n as u32).wrapping_mul(2_654_435_761).to_le_bytes()[0] ^ seed)
        .collect()
}

/// The two GET artifacts and the bench's list files.
struct Workload {
    dir: tempfile::TempDir,
    get_list: PathBuf,
    put_list: PathBuf,
}

fn prepare(server: &Server) -> Workload {
    let dir = tempfile::tempdir().expect("tempdir");
    let small = body(SMALL_BYTES, 1);
    let large = body(LARGE_BYTES, 2);
    for (path, data) in [
        ("/v1/artifacts/life/small", &small),
        ("/v1/artifacts/life/large", &large),
    ] {
        let r = server.send(Front::Http1, req("PUT", path).body(data.clone()));
        assert!(
            r.status == 201 || r.status == 204,
            "PUT {path}: {}",
            r.status
        );
    }
    let base = format!("http://{}", server.addr);
    // 19 small GETs to 1 large: about 0.85 MB per 20 requests, which debug builds sharing
    // two cores keep up with at GET_RATE.
    let mut gets = String::new();
    for _ in 0..19 {
        gets.push_str(&format!(
            "{base}/v1/artifacts/life/small {SMALL_BYTES} {}\n",
            sha256_hex(&small)
        ));
    }
    gets.push_str(&format!(
        "{base}/v1/artifacts/life/large {LARGE_BYTES} {}\n",
        sha256_hex(&large)
    ));
    let puts: String = (0..PUT_KEYS)
        .map(|i| format!("{base}/v1/artifacts/life/put-{i} {PUT_BYTES}\n"))
        .collect();
    let get_list = dir.path().join("gets.txt");
    let put_list = dir.path().join("puts.txt");
    std::fs::write(&get_list, gets).expect("write list");
    std::fs::write(&put_list, puts).expect("write list");
    Workload {
        dir,
        get_list,
        put_list,
    }
}

/// Bench processes running for `secs`: GETs and PUTs, each in open loop.
struct Load {
    children: Vec<(Child, PathBuf)>,
    put_connections: usize,
    secs: u32,
}

const GET_RATE: u32 = 100;
const GET_CONNECTIONS: usize = 4;
const PUT_RATE: u32 = 10;
const PUT_CONNECTIONS: usize = 2;

fn start_load(work: &Workload, secs: u32) -> Load {
    let bench = bench_binary();
    let mut children = Vec::new();
    for (name, list, method, rate, conns) in [
        ("get", &work.get_list, "GET", GET_RATE, GET_CONNECTIONS),
        ("put", &work.put_list, "PUT", PUT_RATE, PUT_CONNECTIONS),
    ] {
        let prefix = work.dir.path().join(name);
        let child = Command::new(&bench)
            .args(["run", "--list"])
            .arg(list)
            .args(["-m", method, "-c", &conns.to_string()])
            .args(["-d", &format!("{secs}s"), "-r", &rate.to_string()])
            // Lengths are always checked; digests would cost the debug bench more CPU than
            // the server gets (the 64 MiB test compares its bytes itself).
            .args(["--quiet", "-o"])
            .arg(&prefix)
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(prefix.with_extension("stderr")).expect("stderr"))
            .spawn()
            .expect("start sluice-bench");
        children.push((child, prefix));
    }
    Load {
        children,
        put_connections: PUT_CONNECTIONS,
        secs,
    }
}

/// [`start_load`], then lets it run for `settle` before the test goes on.
fn start_load_then_wait(work: &Workload, secs: u32, settle: Duration) -> Load {
    let load = start_load(work, secs);
    std::thread::sleep(settle);
    load
}

/// What one bench process measured.
#[derive(Debug)]
struct Measured {
    requests: u64,
    errors: u64,
    errors_by_kind: serde_json::Value,
    retries: u64,
    /// What the bench said on stderr (which status a status error was).
    said: String,
}

impl Load {
    /// Waits for both bench processes; returns (GETs, PUTs).
    fn finish(self) -> (Measured, Measured, usize) {
        let mut out = Vec::new();
        for (mut child, prefix) in self.children {
            let status = child.wait().expect("wait bench");
            assert!(status.success(), "sluice-bench failed: {status}");
            let text = std::fs::read_to_string(prefix.with_extension("json")).expect("bench json");
            let json: serde_json::Value = serde_json::from_str(&text).expect("json");
            let errors = json["errors"]
                .as_object()
                .expect("errors")
                .values()
                .map(|v| v.as_u64().unwrap_or(0))
                .sum();
            out.push(Measured {
                requests: json["requests"].as_u64().unwrap_or(0),
                errors,
                errors_by_kind: json["errors"].clone(),
                retries: json["retries"].as_u64().unwrap_or(0),
                said: std::fs::read_to_string(prefix.with_extension("stderr")).unwrap_or_default(),
            });
        }
        let puts = out.pop().expect("puts");
        let gets = out.pop().expect("gets");
        (gets, puts, self.put_connections)
    }

    /// [`Load::finish`], then [`check_load`] against `server`, whose log is printed first when
    /// any request failed.
    fn finish_and_check(self, server: &Server) {
        let secs = self.secs;
        let (gets, puts, conns) = self.finish();
        if gets.errors + puts.errors > 0 {
            eprintln!("server log:\n{}", server.stderr());
        }
        check_load(&gets, &puts, conns, server.addr, secs);
    }
}

/// Zero errors of any kind, a plausible request count, and every PUT key the bench must have
/// written readable with its length. Each PUT connection walks the list from its own index, so
/// the first `requests / connections` keys were written by every connection.
fn check_load(gets: &Measured, puts: &Measured, put_conns: usize, addr: SocketAddr, secs: u32) {
    eprintln!(
        "load: GETs {gets:?}, PUTs {puts:?}; {} request(s) retried after the keep-alive race",
        gets.retries + puts.retries
    );
    assert_eq!(
        gets.errors, 0,
        "GET errors: {} {}",
        gets.errors_by_kind, gets.said
    );
    assert_eq!(
        puts.errors, 0,
        "PUT errors: {} {}",
        puts.errors_by_kind, puts.said
    );
    // Open loop: nearly every scheduled request was sent and answered.
    // Half the schedule at least: the machine is shared, and the property under test is that
    // nothing fails, not the rate a debug build sustains.
    let want_gets = u64::from(GET_RATE * secs) / 2;
    let want_puts = u64::from(PUT_RATE * secs) / 2;
    assert!(gets.requests >= want_gets, "only {} GETs", gets.requests);
    assert!(puts.requests >= want_puts, "only {} PUTs", puts.requests);
    let written = (puts.requests as usize / put_conns).min(PUT_KEYS);
    for i in 0..written {
        let path = format!("/v1/artifacts/life/put-{i}");
        let raw = format!("HEAD {path} HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n");
        let resp = common::raw_exchange(addr, raw.as_bytes());
        let text = String::from_utf8_lossy(&resp);
        assert!(text.starts_with("HTTP/1.1 200"), "{path}: {text}");
        assert!(
            text.to_ascii_lowercase()
                .contains(&format!("content-length: {PUT_BYTES}")),
            "{path}: {text}"
        );
    }
}

fn pid_of(pid_file: &Path) -> u32 {
    std::fs::read_to_string(pid_file)
        .expect("pid file")
        .trim()
        .parse()
        .expect("pid")
}

fn alive(pid: u32) -> bool {
    rustix::process::Pid::from_raw(pid as i32)
        .is_some_and(|p| rustix::process::test_kill_process(p).is_ok())
        // A zombie still answers kill(0); /proc says whether it has exited.
        && std::fs::read_to_string(format!("/proc/{pid}/stat"))
            .map(|s| !s.contains(") Z "))
            .unwrap_or(false)
}

fn signal(pid: u32, sig: rustix::process::Signal) {
    let p = rustix::process::Pid::from_raw(pid as i32).expect("pid");
    rustix::process::kill_process(p, sig).expect("kill");
}

fn wait_gone(pid: u32, within: Duration) -> bool {
    let deadline = Instant::now() + within;
    while Instant::now() < deadline {
        if !alive(pid) {
            return true;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    false
}

/// `sluice upgrade`, which must succeed; the server log says why when it does not.
fn must_upgrade(server: &Server, pid_file: &Path, what: &str) {
    if !upgrade(pid_file, 40_000) {
        panic!("{what} failed; server log:\n{}", server.stderr());
    }
}

/// `sluice upgrade --pid-file`; returns whether it reported success.
fn upgrade(pid_file: &Path, wait_ms: u64) -> bool {
    Command::new(env!("CARGO_BIN_EXE_sluice"))
        .arg("upgrade")
        .arg("--pid-file")
        .arg(pid_file)
        .args(["--wait-ms", &wait_ms.to_string()])
        .status()
        .expect("sluice upgrade")
        .success()
}

fn ready_status(addr: SocketAddr) -> String {
    let resp = common::raw_exchange(
        addr,
        b"GET /ready HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n",
    );
    String::from_utf8_lossy(&resp)
        .lines()
        .next()
        .unwrap_or_default()
        .to_string()
}

/// Kills whatever the pid file names when a test ends, passed or not: successors are not
/// children of the test, so the harness's own clean-up does not reach them.
struct OwnerGuard(PathBuf);

impl Drop for OwnerGuard {
    fn drop(&mut self) {
        if let Some(pid) = std::fs::read_to_string(&self.0)
            .ok()
            .and_then(|s| s.trim().parse::<u32>().ok())
        {
            if alive(pid) {
                signal(pid, rustix::process::Signal::KILL);
            }
        }
    }
}

/// A server with a pid file and two engine threads (two SO_REUSEPORT listeners to hand over).
fn lifecycle_server(extra_toml: &str) -> (Server, tempfile::TempDir, PathBuf) {
    let dir = tempfile::tempdir().expect("tempdir");
    let pid_file = dir.path().join("sluice.pid");
    let config = dir.path().join("sluice.toml");
    std::fs::write(
        &config,
        format!(
            "pid_file = \"{}\"\nengine_threads = 2\nupgrade_ready_timeout_ms = 30000\n{extra_toml}",
            pid_file.display()
        ),
    )
    .expect("config");
    let s = server()
        .no_tls()
        .arg("--config")
        .arg(config.to_str().expect("path"))
        .start();
    (s, dir, pid_file)
}

/// What a load test holds to its end: the load lock (one load test at a time) and an
/// [`OwnerGuard`] for the pid file. Dropped in that order.
struct Held {
    _serial: std::sync::MutexGuard<'static, ()>,
    _owner: OwnerGuard,
}

/// A [`lifecycle_server`] with the workload prepared, and what the test must hold meanwhile
/// (the load lock is taken once the server is up).
fn load_test() -> (Server, tempfile::TempDir, PathBuf, Workload, Held) {
    let (server, dir, pid_file) = lifecycle_server("");
    let _owner = OwnerGuard(pid_file.clone());
    let _serial = serial();
    let work = prepare(&server);
    (server, dir, pid_file, work, Held { _serial, _owner })
}

/// Stops whichever process owns the listeners now, and waits for it.
fn stop_owner(pid_file: &Path) {
    let pid = pid_of(pid_file);
    signal(pid, rustix::process::Signal::TERM);
    assert!(
        wait_gone(pid, Duration::from_secs(20)),
        "pid {pid} did not exit"
    );
}

#[test]
fn two_upgrades_in_a_row_under_load_lose_nothing() {
    let (mut server, _dir, pid_file, work, _held) = load_test();
    let first = pid_of(&pid_file);
    let load = start_load_then_wait(&work, 8, Duration::from_millis(2000));
    must_upgrade(&server, &pid_file, "first upgrade");
    let second = pid_of(&pid_file);
    assert_ne!(second, first);
    std::thread::sleep(Duration::from_millis(2000));
    must_upgrade(&server, &pid_file, "second upgrade");
    let third = pid_of(&pid_file);
    assert_ne!(third, second);
    load.finish_and_check(&server);
    assert!(
        wait_gone(first, Duration::from_secs(15)),
        "first process still running"
    );
    let status = server.child.wait().expect("wait");
    assert!(
        status.success(),
        "the first process exits 0 after its drain: {status}"
    );
    assert!(
        wait_gone(second, Duration::from_secs(15)),
        "second process still running"
    );
    assert!(ready_status(server.addr).contains("200"));
    let log = server.stderr();
    assert!(log.contains("the new process serves"), "{log}");
    stop_owner(&pid_file);
    assert!(!pid_file.exists(), "the last owner removes its pid file");
}

#[test]
fn an_upgrade_that_never_gets_ready_leaves_the_old_process_serving() {
    let (server, dir, pid_file, work, _held) = load_test();
    let old = pid_of(&pid_file);
    let load = start_load_then_wait(&work, 5, Duration::from_millis(1500));
    // The new process reads the config file as it is at upgrade time (like nginx's
    // binary upgrade re-reading nginx.conf): a certificate that does not exist makes it
    // exit before it is ready.
    let config = dir.path().join("sluice.toml");
    let mut text = std::fs::read_to_string(&config).expect("config");
    text.push_str("tls_cert = \"/nonexistent/cert.pem\"\ntls_key = \"/nonexistent/key.pem\"\n");
    std::fs::write(&config, text).expect("config");
    assert!(
        !upgrade(&pid_file, 2_000),
        "the upgrade must report failure"
    );
    assert_eq!(
        pid_of(&pid_file),
        old,
        "the pid file still names the old process"
    );
    load.finish_and_check(&server);
    assert!(alive(old));
    assert!(ready_status(server.addr).contains("200"));
    let log = server.stderr();
    assert!(log.contains("upgrade abandoned"), "{log}");
    assert!(log.contains("exited"), "{log}");
    stop_owner(&pid_file);
}

#[test]
fn sigterm_to_the_old_process_while_its_successor_serves_loses_nothing() {
    let (server, _dir, pid_file, work, _held) = load_test();
    let old = pid_of(&pid_file);
    let load = start_load_then_wait(&work, 5, Duration::from_millis(1500));
    must_upgrade(&server, &pid_file, "upgrade");
    let new = pid_of(&pid_file);
    // An orchestrator that stops the old pid while it drains: it keeps draining.
    signal(old, rustix::process::Signal::TERM);
    assert!(
        wait_gone(old, Duration::from_secs(15)),
        "old process still running"
    );
    load.finish_and_check(&server);
    assert!(alive(new));
    let log = server.stderr();
    assert!(!log.contains("drain is cut short"), "{log}");
    stop_owner(&pid_file);
}

#[test]
fn a_64_mib_download_in_flight_across_an_upgrade_completes_byte_identical() {
    let (server, _dir, pid_file, work, _held) = load_test();
    let big = body(64 << 20, 3);
    let digest = sha256_hex(&big);
    let r = server.send(Front::Http1, req("PUT", "/v1/artifacts/life/big").body(big));
    assert_eq!(r.status, 201);
    let load = start_load(&work, 5);
    let mut stream = TcpStream::connect(server.addr).expect("connect");
    stream
        .write_all(b"GET /v1/artifacts/life/big HTTP/1.1\r\nhost: x\r\n\r\n")
        .expect("send");
    stream
        .set_read_timeout(Some(Duration::from_secs(20)))
        .expect("timeout");
    // Read slowly (about 16 MB/s) so the download spans the upgrade.
    let mut got = Vec::with_capacity(65 << 20);
    let mut buf = vec![0u8; 64 * 1024];
    let started = Instant::now();
    let mut upgraded = false;
    let head_len = loop {
        let n = stream.read(&mut buf).expect("read");
        assert!(n > 0, "closed before the head");
        got.extend_from_slice(&buf[..n]);
        if let Some(i) = got.windows(4).position(|w| w == b"\r\n\r\n") {
            break i + 4;
        }
    };
    loop {
        if !upgraded && started.elapsed() > Duration::from_millis(500) {
            must_upgrade(&server, &pid_file, "upgrade");
            upgraded = true;
        }
        let n = stream
            .read(&mut buf)
            .expect("read the body across the upgrade");
        if n == 0 {
            break;
        }
        got.extend_from_slice(&buf[..n]);
        if got.len() - head_len >= 64 << 20 {
            break;
        }
        std::thread::sleep(Duration::from_millis(4));
    }
    assert!(upgraded, "the download ended before the upgrade");
    assert_eq!(got.len() - head_len, 64 << 20);
    assert_eq!(sha256_hex(&got[head_len..]), digest);
    load.finish_and_check(&server);
    stop_owner(&pid_file);
}

#[test]
fn shutdown_budgets_over_the_grace_ceiling_are_refused_with_the_sums() {
    let out = Command::new(env!("CARGO_BIN_EXE_sluice"))
        .args([
            "serve",
            "--listen",
            "127.0.0.1:0",
            "--data-dir",
            "/nonexistent",
        ])
        .env("SLUICE_SHUTDOWN_PRE_DRAIN_MS", "5000")
        .env("SLUICE_SHUTDOWN_DRAIN_MS", "20000")
        .env("SLUICE_SHUTDOWN_REPLICATION_MS", "4000")
        .env("SLUICE_SHUTDOWN_TEARDOWN_MS", "2000")
        .env("SLUICE_SHUTDOWN_GRACE_MS", "30000")
        .output()
        .expect("run sluice");
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    for part in [
        "`shutdown_pre_drain_ms` = `5000`",
        "`shutdown_drain_ms` = `20000`",
        "`shutdown_replication_ms` = `4000`",
        "`shutdown_teardown_ms` = `2000`",
        "= 31000 ms",
        "`shutdown_grace_ms` = `30000`",
    ] {
        assert!(err.contains(part), "{part} missing from: {err}");
    }
}

#[test]
fn a_second_sigterm_cuts_the_drain_short_and_exits_cleanly() {
    second_sigterm_cuts_the_drain("");
}

/// The same with every connection on the fallback (as on a host without io_uring): its drain
/// is cut too, not waited for until teardown's budget runs out (5 s here).
#[test]
fn a_second_sigterm_cuts_the_fallback_drain_too() {
    second_sigterm_cuts_the_drain("engine = \"fallback\"\nshutdown_teardown_ms = 5000\n");
}

fn second_sigterm_cuts_the_drain(extra_toml: &str) {
    let (mut server, _dir, _pid_file) = lifecycle_server(&format!(
        "shutdown_drain_ms = 20000\nshutdown_grace_ms = 30000\n{extra_toml}"
    ));
    let big = body(64 << 20, 4);
    let r = server.send(
        Front::Http1,
        req("PUT", "/v1/artifacts/life/held").body(big),
    );
    assert_eq!(r.status, 201);
    // A download the client stops reading: the drain would wait for it for 20 s.
    let mut stream = TcpStream::connect(server.addr).expect("connect");
    stream
        .write_all(b"GET /v1/artifacts/life/held HTTP/1.1\r\nhost: x\r\n\r\n")
        .expect("send");
    let mut first = [0u8; 1024];
    let _ = stream.read(&mut first).expect("head");
    let pid = server.child.id();
    signal(pid, rustix::process::Signal::TERM);
    std::thread::sleep(Duration::from_millis(1000));
    assert!(
        server.child.try_wait().expect("try_wait").is_none(),
        "the first SIGTERM drains, it does not exit at once"
    );
    let cut_at = Instant::now();
    signal(pid, rustix::process::Signal::TERM);
    let status = loop {
        if let Some(status) = server.child.try_wait().expect("try_wait") {
            break status;
        }
        assert!(
            cut_at.elapsed() < Duration::from_secs(3),
            "the second SIGTERM did not cut the drain"
        );
        std::thread::sleep(Duration::from_millis(20));
    };
    assert!(status.success(), "{status}");
    assert!(server.stderr().contains("drain is cut short"));
    drop(stream);
}

#[test]
fn systemd_socket_activation_serves_the_passed_socket_and_its_queued_connection() {
    let Ok(activate) = which("systemd-socket-activate") else {
        eprintln!("SKIPPED: systemd-socket-activate is not installed");
        return;
    };
    // A free port (the tool needs a number); the window between close and its bind is small.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("free port")
        .port();
    let dir = tempfile::tempdir().expect("tempdir");
    let addr: SocketAddr = format!("127.0.0.1:{port}").parse().expect("addr");
    // Listen on a different port in the config: the passed socket must win.
    let mut child = Command::new(activate)
        .args([
            "-l",
            &addr.to_string(),
            "-E",
            "SLUICE_ENGINE_THREADS=2",
            "--",
        ])
        .arg(env!("CARGO_BIN_EXE_sluice"))
        .args(["serve", "--listen", "127.0.0.1:1", "--data-dir"])
        .arg(dir.path().join("data"))
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(dir.path().join("stderr")).expect("stderr"))
        .spawn()
        .expect("systemd-socket-activate");
    let _kill = KillOnDrop(child.id());
    // The tool starts sluice on the first connection: that connection waits in the queue of
    // the socket sluice inherits, and must be answered.
    let deadline = Instant::now() + Duration::from_secs(10);
    let status = loop {
        let first = TcpStream::connect(addr).and_then(|mut s| {
            s.set_read_timeout(Some(Duration::from_secs(10)))?;
            s.write_all(b"GET /up HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n")?;
            let mut out = Vec::new();
            s.read_to_end(&mut out)?;
            Ok(out)
        });
        match first {
            Ok(out) if !out.is_empty() => break String::from_utf8_lossy(&out).to_string(),
            _ if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(50)),
            other => panic!("no answer on the activated socket: {other:?}"),
        }
    };
    assert!(status.starts_with("HTTP/1.1 200"), "{status}");
    signal(child.id(), rustix::process::Signal::TERM);
    let exit = child.wait().expect("wait");
    assert!(exit.success(), "{exit}");
    let log = std::fs::read_to_string(dir.path().join("stderr")).unwrap_or_default();
    assert!(
        log.contains("from=\"systemd\"") || log.contains("from=systemd"),
        "{log}"
    );
}

struct KillOnDrop(u32);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        if alive(self.0) {
            signal(self.0, rustix::process::Signal::KILL);
        }
    }
}

fn which(name: &str) -> Result<PathBuf, ()> {
    std::env::var_os("PATH")
        .into_iter()
        .flat_map(|p| std::env::split_paths(&p).collect::<Vec<_>>())
        .map(|d| d.join(name))
        .find(|p| p.is_file())
        .ok_or(())
}
