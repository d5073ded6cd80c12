//! The command line: config validation errors name the key, the value and
//! what is allowed; `check-config` prints the effective config; unsafe
//! combinations refuse to start.

use std::process::Command;

fn sluice(args: &[&str], env: &[(&str, &str)]) -> (i32, String, String) {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_sluice"));
    cmd.args(args);
    for (k, _) in std::env::vars() {
        if k.starts_with("SLUICE_") {
            cmd.env_remove(k);
        }
    }
    for (k, v) in env {
        cmd.env(k, v);
    }
    let out = cmd.output().expect("run sluice");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).to_string(),
        String::from_utf8_lossy(&out.stderr).to_string(),
    )
}

#[test]
fn check_config_prints_effective_config_and_redacts_secrets() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("c.toml");
    std::fs::write(&path, "listen = \"127.0.0.1:9999\"\n[[tokens]]\nname = \"ci\"\nsecret = \"0123456789abcdef-secret\"\naccess = \"rw\"\n").expect("write");
    let (code, out, err) = sluice(&["check-config", path.to_str().expect("utf8")], &[]);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("127.0.0.1:9999"), "{out}");
    assert!(!out.contains("0123456789abcdef-secret"), "{out}");
}

#[test]
fn bad_values_name_key_value_and_allowed() {
    let dir = tempfile::tempdir().expect("tempdir");
    let rows: &[(&str, &str, &[&str])] = &[
        (
            "engine_threads = \"many\"\n",
            "",
            &["engine_threads", "many"],
        ),
        (
            "listen = \"not-an-address\"\n",
            "",
            &["listen", "not-an-address"],
        ),
        ("no_such_key = 1\n", "", &["no_such_key"]),
        (
            "fsync = \"sometimes\"\n",
            "",
            &["fsync", "sometimes", "always"],
        ),
    ];
    for (toml, _, needles) in rows {
        let path = dir.path().join("bad.toml");
        std::fs::write(&path, toml).expect("write");
        let (code, _, err) = sluice(&["check-config", path.to_str().expect("utf8")], &[]);
        assert_ne!(code, 0, "{toml}");
        for needle in *needles {
            assert!(
                err.contains(needle),
                "{toml}: `{needle}` missing from: {err}"
            );
        }
        assert!(!err.contains("panicked"), "{err}");
    }
    let (code, _, err) = sluice(&["serve", "--engine-threads=-3"], &[]);
    assert_ne!(code, 0);
    assert!(
        err.contains("engine_threads") && err.contains("-3"),
        "{err}"
    );
    let (code, _, err) = sluice(&["serve"], &[("SLUICE_FILE_SERVING_MODE", "mmap")]);
    assert_ne!(code, 0);
    assert!(
        err.contains("file_serving_mode") && err.contains("mmap"),
        "{err}"
    );
}

#[test]
fn public_bind_with_anonymous_writes_refuses_without_the_flag() {
    let dir = tempfile::tempdir().expect("tempdir");
    let data = dir.path().join("d");
    let (code, _, err) = sluice(
        &[
            "serve",
            "--listen",
            "0.0.0.0:0",
            "--data-dir",
            data.to_str().expect("utf8"),
        ],
        &[],
    );
    assert_ne!(code, 0);
    assert!(
        err.contains("allow-anonymous-writes") || err.contains("allow_anonymous_writes"),
        "{err}"
    );
}

#[test]
fn doctor_reports_io_uring_and_limits() {
    let (code, out, err) = sluice(&["doctor"], &[]);
    assert_eq!(code, 0, "{err}");
    assert!(out.to_lowercase().contains("io_uring"), "{out}");
    assert!(out.to_lowercase().contains("memlock"), "{out}");
}
