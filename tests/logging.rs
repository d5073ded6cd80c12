//! Log output as a log shipper sees it: stderr redirected to a file.

mod common;
use common::*;

/// Starts a server whose stderr goes to a file (as the harness always
/// does), serves a few requests and stops it cleanly; returns the log.
fn run_and_collect_log(env: &[(&str, &str)]) -> String {
    let mut builder = server().env("SLUICE_LOG_LEVEL", "debug");
    for (k, v) in env {
        builder = builder.env(k, v);
    }
    let mut server = builder.start();
    for front in FRONTS {
        assert_eq!(server.status(front, "GET", "/up"), 200);
    }
    let r = server.send(
        Front::Http1,
        req("PUT", "/v1/artifacts/logs/k").body(b"x".to_vec()),
    );
    assert_eq!(r.status, 201);
    assert!(server.stop().success());
    server.stderr()
}

/// Redirected to a file, text lines carry no ANSI colour codes (they did:
/// tracing-subscriber colours by default, terminal or not).
#[test]
fn text_logs_to_a_file_have_no_colour_codes() {
    let log = run_and_collect_log(&[]);
    assert!(log.lines().count() >= 2, "too little logged: {log}");
    assert!(
        !log.contains('\u{1b}'),
        "ANSI escape in a redirected log:\n{log}"
    );
}

/// `log_format = "json"`: every line is one JSON object with a timestamp,
/// a level and the event's fields.
#[test]
fn json_logs_are_one_object_a_line() {
    let log = run_and_collect_log(&[("SLUICE_LOG_FORMAT", "json")]);
    let mut lines = 0;
    for line in log.lines().filter(|l| !l.trim().is_empty()) {
        let v: serde_json::Value = serde_json::from_str(line)
            .unwrap_or_else(|e| panic!("not JSON ({e}): {line:?}\nwhole log:\n{log}"));
        assert!(v["timestamp"].is_string(), "{line}");
        assert!(v["level"].is_string(), "{line}");
        assert!(v["fields"].is_object(), "{line}");
        lines += 1;
    }
    assert!(lines >= 2, "too little logged: {log}");
    assert!(!log.contains('\u{1b}'), "ANSI escape in JSON:\n{log}");
}
