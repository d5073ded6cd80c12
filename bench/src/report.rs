//! Latency histograms and the reports made from them: the summary percentiles and the classic
//! HdrHistogram percentile-distribution text (`.hgrm`).

use std::fmt::Write as _;

use hdrhistogram::Histogram;

/// Latency histogram: values are microseconds, from 1 µs to one hour, three significant digits
/// (the resolution wrk2 and the HdrHistogram plotter assume).
pub type LatencyHistogram = Histogram<u64>;

/// Highest latency the histogram tracks, in microseconds (one hour). Larger values saturate.
pub const LATENCY_US_MAX: u64 = 3_600_000_000;

/// Significant decimal digits kept by every latency histogram.
pub const LATENCY_SIGFIG: u8 = 3;

/// Percentiles printed in the summary and stored in the JSON record, as quantiles.
pub const SUMMARY_QUANTILES: [f64; 5] = [0.5, 0.9, 0.99, 0.999, 0.9999];

/// Makes an empty latency histogram with the bounds every part of the tool shares, so histograms
/// from different connections can always be added together.
pub fn new_latency_histogram() -> LatencyHistogram {
    // The bounds are constants well inside what the crate accepts (low >= 1, high >= 2 * low,
    // sigfig <= 5); failing here would be a programming error, not something input can cause.
    match Histogram::new_with_bounds(1, LATENCY_US_MAX, LATENCY_SIGFIG) {
        Ok(h) => h,
        Err(e) => panic!("latency histogram bounds are constants and valid: {e:?}"),
    }
}

/// Records one latency, saturating at [`LATENCY_US_MAX`] and lifting 0 µs to 1 µs (the lowest
/// discernible value).
pub fn record_latency_us(h: &mut LatencyHistogram, latency_us: u64) {
    h.saturating_record(latency_us.max(1));
}

/// One row of the percentile distribution: the value (milliseconds), the percentile as a fraction
/// in `[0, 1]`, and how many values lie at or below it.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct PercentileRow {
    /// Latency at this percentile, milliseconds.
    pub value_ms: f64,
    /// Percentile as a fraction (0.99 is p99).
    pub percentile: f64,
    /// Number of recorded values at or below `value_ms`.
    pub total_count: u64,
}

/// The percentile distribution as the HdrHistogram Java `outputPercentileDistribution` walks it,
/// with `ticks_per_half_distance` steps per halving of the distance to 100 % (5 in the classic
/// output). Values are scaled from microseconds to milliseconds.
pub fn percentile_rows(h: &LatencyHistogram, ticks_per_half_distance: u32) -> Vec<PercentileRow> {
    let mut rows = Vec::new();
    if h.is_empty() {
        return rows;
    }
    let mut total_count = 0u64;
    for v in h.iter_quantiles(ticks_per_half_distance.max(1)) {
        total_count += v.count_since_last_iteration();
        rows.push(PercentileRow {
            value_ms: v.value_iterated_to() as f64 / 1000.0,
            percentile: v.quantile_iterated_to(),
            total_count,
        });
    }
    rows
}

/// Number of sub-buckets per bucket, computed as the Java implementation does, for the footer.
fn sub_bucket_count(sigfig: u8) -> u64 {
    let largest_single_unit = 2.0 * 10f64.powi(i32::from(sigfig));
    1u64 << (largest_single_unit.log2().ceil() as u32)
}

/// The classic `.hgrm` text of `outputPercentileDistribution(out, 5, 1000.0)` in HdrHistogram
/// Java (and wrk2's `--latency` output): values in milliseconds with three decimals, a header,
/// one line per tick, and the `#[Mean …]`, `#[Max …]`, `#[Buckets …]` footer. The public
/// HdrHistogram plotter reads exactly this.
pub fn hgrm_text(h: &LatencyHistogram) -> String {
    let decimals = usize::from(h.sigfig());
    let mut out = String::new();
    // `write!` into a String cannot fail; the results are ignored for that reason.
    let _ = write!(
        out,
        "{:>12} {:>14} {:>10} {:>14}\n\n",
        "Value", "Percentile", "TotalCount", "1/(1-Percentile)"
    );
    for row in percentile_rows(h, 5) {
        if row.percentile < 1.0 {
            let _ = writeln!(
                out,
                "{:>12.decimals$} {:>2.12} {:>10} {:>14.2}",
                row.value_ms,
                row.percentile,
                row.total_count,
                1.0 / (1.0 - row.percentile),
            );
        } else {
            let _ = writeln!(
                out,
                "{:>12.decimals$} {:>2.12} {:>10}",
                row.value_ms, row.percentile, row.total_count,
            );
        }
    }
    let (mean, stdev, max) = if h.is_empty() {
        (0.0, 0.0, 0.0)
    } else {
        (
            h.mean() / 1000.0,
            h.stdev() / 1000.0,
            h.max() as f64 / 1000.0,
        )
    };
    let _ = writeln!(
        out,
        "#[Mean    = {mean:>12.decimals$}, StdDeviation   = {stdev:>12.decimals$}]"
    );
    let _ = writeln!(
        out,
        "#[Max     = {max:>12.decimals$}, Total count    = {:>12}]",
        h.len()
    );
    let _ = writeln!(
        out,
        "#[Buckets = {:>12}, SubBuckets     = {:>12}]",
        h.buckets(),
        sub_bucket_count(h.sigfig())
    );
    out
}

/// Parses the value/percentile rows of an `.hgrm` text (header, blank and `#` lines are skipped),
/// so runs recorded by other tools (wrk2, HdrHistogram Java) can be plotted too.
pub fn parse_hgrm(text: &str) -> Vec<PercentileRow> {
    text.lines()
        .filter_map(|line| {
            let mut fields = line.split_whitespace();
            let value_ms = fields.next()?.parse::<f64>().ok()?;
            let percentile = fields.next()?.parse::<f64>().ok()?;
            let total_count = fields.next()?.parse::<u64>().ok()?;
            Some(PercentileRow {
                value_ms,
                percentile,
                total_count,
            })
        })
        .collect()
}

/// Summary latency figures in milliseconds.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct LatencySummary {
    /// Median, ms.
    pub p50_ms: f64,
    /// 90th percentile, ms.
    pub p90_ms: f64,
    /// 99th percentile, ms.
    pub p99_ms: f64,
    /// 99.9th percentile, ms.
    pub p99_9_ms: f64,
    /// 99.99th percentile, ms.
    pub p99_99_ms: f64,
    /// Largest recorded latency, ms.
    pub max_ms: f64,
    /// Mean, ms.
    pub mean_ms: f64,
}

impl LatencySummary {
    /// Summarises `h` (all zero when it is empty).
    pub fn of(h: &LatencyHistogram) -> LatencySummary {
        let at = |q: f64| {
            if h.is_empty() {
                0.0
            } else {
                h.value_at_quantile(q) as f64 / 1000.0
            }
        };
        let [p50, p90, p99, p99_9, p99_99] = SUMMARY_QUANTILES.map(at);
        LatencySummary {
            p50_ms: p50,
            p90_ms: p90,
            p99_ms: p99,
            p99_9_ms: p99_9,
            p99_99_ms: p99_99,
            max_ms: if h.is_empty() {
                0.0
            } else {
                h.max() as f64 / 1000.0
            },
            mean_ms: if h.is_empty() { 0.0 } else { h.mean() / 1000.0 },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// 1..=1000 ms recorded once each (in µs): every percentile is known in closed form.
    fn uniform_ms() -> LatencyHistogram {
        let mut h = new_latency_histogram();
        for ms in 1..=1000u64 {
            record_latency_us(&mut h, ms * 1000);
        }
        h
    }

    #[test]
    fn summary_percentiles_match_known_histogram() {
        let s = LatencySummary::of(&uniform_ms());
        // Three significant digits: a value is reported as the top of its bucket, which is within
        // 0.1 % above the recorded value.
        let cases = [
            (s.p50_ms, 500.0),
            (s.p90_ms, 900.0),
            (s.p99_ms, 990.0),
            (s.p99_9_ms, 999.0),
            (s.p99_99_ms, 1000.0),
            (s.max_ms, 1000.0),
        ];
        for (got, want) in cases {
            assert!(
                got >= want && got <= want * 1.001 + 0.001,
                "got {got}, want {want}"
            );
        }
        assert!((s.mean_ms - 500.5).abs() < 0.5, "mean {}", s.mean_ms);
    }

    #[test]
    fn empty_histogram_summarises_to_zero() {
        let s = LatencySummary::of(&new_latency_histogram());
        assert_eq!(s.p99_ms, 0.0);
        assert_eq!(s.max_ms, 0.0);
    }

    #[test]
    fn hgrm_has_classic_layout() {
        let text = hgrm_text(&uniform_ms());
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(
            lines[0],
            "       Value     Percentile TotalCount 1/(1-Percentile)"
        );
        assert_eq!(lines[1], "");
        // First row: the lowest value, percentile 0 (wrk2 prints exactly this shape).
        assert_eq!(
            lines[2],
            "       1.000 0.000000000000          1           1.00"
        );
        // The last data row reaches 100 % and has no 1/(1-p) column.
        let last_row = lines[lines.len() - 4];
        assert_eq!(last_row, "    1000.447 1.000000000000       1000");
        assert_eq!(
            lines[lines.len() - 3],
            "#[Mean    =      500.505, StdDeviation   =      288.676]"
        );
        assert_eq!(
            lines[lines.len() - 2],
            "#[Max     =     1000.447, Total count    =         1000]"
        );
        assert_eq!(
            lines[lines.len() - 1],
            "#[Buckets =           22, SubBuckets     =         2048]"
        );
        // Every data row has the fixed column widths of the Java format.
        for row in &lines[2..lines.len() - 4] {
            assert_eq!(row.len(), 12 + 1 + 14 + 1 + 10 + 1 + 14, "row {row:?}");
        }
    }

    #[test]
    fn hgrm_round_trips_through_parser() {
        let h = uniform_ms();
        let rows = percentile_rows(&h, 5);
        let parsed = parse_hgrm(&hgrm_text(&h));
        assert_eq!(rows.len(), parsed.len());
        for (a, b) in rows.iter().zip(&parsed) {
            assert!((a.value_ms - b.value_ms).abs() < 0.001);
            assert!((a.percentile - b.percentile).abs() < 1e-12);
            assert_eq!(a.total_count, b.total_count);
        }
        let last = parsed.last().map(|r| (r.percentile, r.total_count));
        assert_eq!(last, Some((1.0, 1000)));
    }

    #[test]
    fn sub_bucket_count_matches_java() {
        let cases = [(1u8, 32u64), (2, 256), (3, 2048), (4, 32768), (5, 262144)];
        for (sigfig, want) in cases {
            assert_eq!(sub_bucket_count(sigfig), want, "sigfig {sigfig}");
        }
    }
}
