//! The command line: config validation errors name the key, the value and
//! what is allowed; `check-config` prints the effective config; unsafe
//! combinations refuse to start.

mod common;
use common::run_sluice as sluice;

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
        (
            "log_format = \"logfmt\"\n",
            "",
            &["log_format", "logfmt", "one of text, json"],
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

/// `check-config` reads the TLS files as `serve` would: a missing file or
/// one that holds no certificate is an error naming the file, and a good
/// pair passes.
#[test]
fn check_config_reads_the_tls_files() {
    let dir = tempfile::tempdir().expect("tempdir");
    let cert = rcgen::generate_simple_self_signed(vec!["localhost".to_string()]).expect("rcgen");
    let cert_path = dir.path().join("cert.pem");
    let key_path = dir.path().join("key.pem");
    let junk_path = dir.path().join("junk.pem");
    std::fs::write(&cert_path, cert.cert.pem()).expect("write cert");
    std::fs::write(&key_path, cert.signing_key.serialize_pem()).expect("write key");
    std::fs::write(&junk_path, "not a certificate\n").expect("write junk");
    let check = |cert: &std::path::Path, key: &std::path::Path| {
        let path = dir.path().join("c.toml");
        std::fs::write(
            &path,
            format!(
                "tls_cert = {:?}\ntls_key = {:?}\n",
                cert.display().to_string(),
                key.display().to_string()
            ),
        )
        .expect("write config");
        sluice(&["check-config", path.to_str().expect("utf8")], &[])
    };
    let (code, _, err) = check(&cert_path, &key_path);
    assert_eq!(code, 0, "{err}");
    let missing = dir.path().join("missing.pem");
    let (code, _, err) = check(&missing, &key_path);
    assert_eq!(code, 2);
    assert!(err.contains("missing.pem"), "{err}");
    let (code, _, err) = check(&junk_path, &key_path);
    assert_eq!(code, 2);
    assert!(err.contains("junk.pem"), "{err}");
}
