//! `sluice doctor`: what this host allows, and what `serve` will use.

use std::fmt::Write as _;

/// The report `sluice doctor` prints.
pub fn report() -> String {
    let probe = sluice_uring::probe();
    let mut out = String::new();
    let _ = writeln!(out, "{probe}");
    let _ = writeln!(out, "sluice serve would use:");
    // The same check `serve` makes before it starts the rings (default
    // splice mode; copy mode also needs read_fixed, listed above).
    if let Some(reason) =
        crate::engine::ring_refusal(&probe, crate::config::FileServingMode::Splice)
    {
        let _ = writeln!(
            out,
            "  engine: epoll threads (one per core by default) for plaintext HTTP/1, because {reason}"
        );
        let _ = writeln!(
            out,
            "  file bodies: sendfile(2) on the engine thread; chunks not in the page cache are read by a reader thread per core"
        );
        let _ = writeln!(out, "  TLS and HTTP/2: the hyper fallback");
    } else {
        let _ = writeln!(
            out,
            "  engine: io_uring rings (one per core by default), multishot accept"
        );
        let _ = writeln!(
            out,
            "  file bodies: splice(2) file -> pipe -> socket on the engine thread, waiting on the ring (POLLOUT) when the socket is full; TCP_CORK per body"
        );
        let flags = if probe.setup_defer_taskrun {
            "SINGLE_ISSUER + DEFER_TASKRUN"
        } else if probe.setup_coop_taskrun {
            "COOP_TASKRUN"
        } else {
            "none"
        };
        let _ = writeln!(out, "  ring set-up flags: {flags}");
        let memlock = match probe.memlock_bytes_soft {
            None => "unlimited".to_string(),
            Some(b) => format!("{b} bytes"),
        };
        let needed = crate::engine::ring::FIXED_BUFFERS_COUNT as usize
            * crate::engine::ring::FIXED_BUFFER_BYTES;
        let fixed = probe.memlock_exempt
            || probe
                .memlock_bytes_soft
                .is_none_or(|b| b as usize >= needed);
        let _ = writeln!(
            out,
            "  fixed buffers: {} ({} bytes per ring; memlock limit {memlock})",
            if fixed {
                "registered"
            } else {
                "likely refused: copy mode will use plain reads"
            },
            needed
        );
        let _ = writeln!(
            out,
            "  splice pipes: up to {} per core of {} bytes (pipe-max-size {})",
            crate::engine::PIPES_PER_CORE_MAX,
            crate::engine::PIPE_BYTES.min(probe.pipe_max_size_bytes.unwrap_or(u64::MAX) as usize),
            probe
                .pipe_max_size_bytes
                .map_or("unknown".to_string(), |b| b.to_string())
        );
    }
    let _ = writeln!(
        out,
        "  TLS and HTTP/2: hyper + rustls fallback on the same port"
    );
    out
}
