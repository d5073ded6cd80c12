//! SVG plot of latency by percentile with several runs overlaid, in the layout of the public
//! HdrHistogram plotter: x is `1/(1-percentile)` on a log scale labelled as percentiles, y is
//! latency in milliseconds.

use std::path::Path;

use plotters::prelude::*;

use crate::record::RunRecord;
use crate::report::{parse_hgrm, PercentileRow};

/// One run to draw.
#[derive(Debug, Clone)]
pub struct Series {
    /// Legend label.
    pub label: String,
    /// Percentile rows.
    pub rows: Vec<PercentileRow>,
}

/// Loads a series from a JSON run record or an `.hgrm` text (decided by content: a JSON record
/// starts with `{`). The label is the record's label, or the file stem for `.hgrm`.
pub fn load_series(path: &Path) -> Result<Series, String> {
    let text =
        std::fs::read_to_string(path).map_err(|e| format!("reading {}: {e}", path.display()))?;
    if text.trim_start().starts_with('{') {
        let rec: RunRecord =
            serde_json::from_str(&text).map_err(|e| format!("parsing {}: {e}", path.display()))?;
        Ok(Series {
            label: rec.label,
            rows: rec.percentiles,
        })
    } else {
        let rows = parse_hgrm(&text);
        if rows.is_empty() {
            return Err(format!("{} holds no percentile rows", path.display()));
        }
        let label = path.file_stem().map_or_else(
            || path.display().to_string(),
            |s| s.to_string_lossy().into_owned(),
        );
        Ok(Series { label, rows })
    }
}

/// Largest `1/(1-p)` drawn: p99.9999.
const X_MAX: f64 = 1e6;

fn x_of(percentile: f64) -> f64 {
    if percentile >= 1.0 {
        X_MAX
    } else {
        (1.0 / (1.0 - percentile)).min(X_MAX)
    }
}

fn percentile_label(x: &f64) -> String {
    let p = 100.0 * (1.0 - 1.0 / x);
    let s = format!("{p:.4}");
    let s = s.trim_end_matches('0').trim_end_matches('.');
    format!("{s}%")
}

/// Writes the overlay of `series` as an SVG file at `out` (1000 x 600 px).
pub fn plot_svg(series: &[Series], title: &str, out: &Path) -> Result<(), String> {
    let y_max = series
        .iter()
        .flat_map(|s| s.rows.iter().map(|r| r.value_ms))
        .fold(0.0f64, f64::max)
        .max(0.001)
        * 1.1;
    let root = SVGBackend::new(out, (1000, 600)).into_drawing_area();
    let err = |e: &dyn std::fmt::Display| format!("drawing {}: {e}", out.display());
    root.fill(&WHITE).map_err(|e| err(&e))?;
    let mut chart = ChartBuilder::on(&root)
        .caption(title, ("sans-serif", 22))
        .margin(15)
        .x_label_area_size(45)
        .y_label_area_size(70)
        .build_cartesian_2d((1.0f64..X_MAX).log_scale(), 0.0f64..y_max)
        .map_err(|e| err(&e))?;
    chart
        .configure_mesh()
        .x_desc("percentile")
        .y_desc("latency (ms)")
        .x_label_formatter(&percentile_label)
        .draw()
        .map_err(|e| err(&e))?;
    for (i, s) in series.iter().enumerate() {
        let color = Palette99::pick(i).to_rgba();
        let points: Vec<(f64, f64)> = s
            .rows
            .iter()
            .map(|r| (x_of(r.percentile), r.value_ms))
            .collect();
        chart
            .draw_series(LineSeries::new(points, color.stroke_width(2)))
            .map_err(|e| err(&e))?
            .label(s.label.clone())
            .legend(move |(x, y)| {
                PathElement::new(vec![(x, y), (x + 20, y)], color.stroke_width(2))
            });
    }
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::UpperLeft)
        .background_style(WHITE.mix(0.8))
        .border_style(BLACK)
        .draw()
        .map_err(|e| err(&e))?;
    root.present().map_err(|e| err(&e))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentile_axis_labels() {
        let cases = [
            (1.0, "0%"),
            (2.0, "50%"),
            (100.0, "99%"),
            (1000.0, "99.9%"),
            (1e4, "99.99%"),
        ];
        for (x, want) in cases {
            assert_eq!(percentile_label(&x), want);
        }
    }

    #[test]
    fn plots_two_series_to_svg() {
        let dir = std::env::temp_dir().join(format!("sluice-bench-plot-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let rows = |scale: f64| {
            [0.0, 0.5, 0.9, 0.99, 1.0]
                .iter()
                .enumerate()
                .map(|(i, &p)| PercentileRow {
                    value_ms: scale * (i + 1) as f64,
                    percentile: p,
                    total_count: i as u64 + 1,
                })
                .collect()
        };
        let series = [
            Series {
                label: "alpha".into(),
                rows: rows(1.0),
            },
            Series {
                label: "beta".into(),
                rows: rows(2.0),
            },
        ];
        let out = dir.join("p.svg");
        plot_svg(&series, "test", &out).unwrap();
        let svg = std::fs::read_to_string(&out).unwrap();
        assert!(svg.starts_with("<svg"));
        assert!(svg.contains("alpha") && svg.contains("beta"));
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
