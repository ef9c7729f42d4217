//! Plots with plotters: latency by percentile on a logarithmic "nines" axis
//! (one line per run), and for sweeps throughput against latency. SVG or
//! PNG, by the file's extension.
//!
//! Text needs a TrueType font: the first of `QUASAR_PLOT_FONT` and a few
//! usual system paths (DejaVu Sans, which `.ci/setup.sh` installs, Liberation
//! Sans, Arial) is loaded once.

use std::path::Path;
use std::sync::OnceLock;

use plotters::coord::Shift;
use plotters::prelude::*;
use plotters::style::register_font;
use thiserror::Error;

use super::report::RunReport;

/// Why a plot could not be drawn.
#[derive(Debug, Error)]
#[non_exhaustive]
pub enum PlotError {
    /// No usable font was found.
    #[error(
        "plots need a TrueType font: install fonts-dejavu-core (Debian/Ubuntu) or set QUASAR_PLOT_FONT to a .ttf file"
    )]
    NoFont,
    /// The extension is neither .svg nor .png.
    #[error("plot file must end in .svg or .png: {0}")]
    Extension(String),
    /// Drawing failed.
    #[error("drawing the plot: {0}")]
    Draw(String),
    /// There is nothing to plot.
    #[error("no successful calls to plot")]
    Empty,
}

const FONT_PATHS: &[&str] = &[
    "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf",
    "/usr/share/fonts/TTF/DejaVuSans.ttf",
    "/usr/share/fonts/dejavu/DejaVuSans.ttf",
    "/usr/share/fonts/truetype/liberation/LiberationSans-Regular.ttf",
    "/System/Library/Fonts/Supplemental/Arial.ttf",
    "/Library/Fonts/Arial.ttf",
    "C:\\Windows\\Fonts\\arial.ttf",
];

/// Registers a font for plotters once per process.
fn ensure_font() -> Result<(), PlotError> {
    static FONT: OnceLock<bool> = OnceLock::new();
    let ok = FONT.get_or_init(|| {
        let from_env = std::env::var_os("QUASAR_PLOT_FONT").map(std::path::PathBuf::from);
        let candidates = from_env
            .into_iter()
            .chain(FONT_PATHS.iter().map(std::path::PathBuf::from));
        for path in candidates {
            if let Ok(bytes) = std::fs::read(&path) {
                // plotters keeps fonts for the life of the process.
                let bytes: &'static [u8] = Box::leak(bytes.into_boxed_slice());
                if register_font("sans-serif", FontStyle::Normal, bytes).is_ok() {
                    return true;
                }
            }
        }
        false
    });
    if *ok { Ok(()) } else { Err(PlotError::NoFont) }
}

/// Maps a quantile to the "nines" axis: 0.9 -> 1, 0.99 -> 2.
fn nines(q: f64) -> f64 {
    -(1.0 - q).max(1e-9).log10()
}

/// A latency tick label in milliseconds with as many decimals as it needs.
fn ms_label(y: f64) -> String {
    match y {
        y if y >= 10.0 => format!("{y:.0}"),
        y if y >= 1.0 => format!("{y:.1}"),
        y if y >= 0.1 => format!("{y:.2}"),
        y => format!("{y:.3}"),
    }
}

fn nines_label(x: f64) -> String {
    let p = 100.0 * (1.0 - 10f64.powf(-x));
    if x < 0.5 {
        format!("{p:.0}%")
    } else {
        let digits = (x.round() as usize).saturating_sub(2);
        format!("{p:.digits$}%")
    }
}

/// Draws `runs` into `path` (.svg or .png).
///
/// # Errors
/// [`PlotError`] if there is no font, the extension is unknown, or there is
/// nothing to draw.
pub fn plot(runs: &[RunReport], sweep: bool, path: &Path) -> Result<(), PlotError> {
    ensure_font()?;
    let runs: Vec<&RunReport> = runs
        .iter()
        .filter(|r| !r.recorder.corrected().is_empty())
        .collect();
    if runs.is_empty() {
        return Err(PlotError::Empty);
    }
    let height = if sweep { 1100 } else { 650 };
    match path.extension().and_then(|e| e.to_str()) {
        Some("svg") => draw(
            SVGBackend::new(path, (1100, height)).into_drawing_area(),
            &runs,
            sweep,
        ),
        Some("png") => draw(
            BitMapBackend::new(path, (1100, height)).into_drawing_area(),
            &runs,
            sweep,
        ),
        _ => Err(PlotError::Extension(path.display().to_string())),
    }
}

fn err(e: impl std::fmt::Display) -> PlotError {
    PlotError::Draw(e.to_string())
}

fn draw<DB: DrawingBackend>(
    root: DrawingArea<DB, Shift>,
    runs: &[&RunReport],
    sweep: bool,
) -> Result<(), PlotError> {
    root.fill(&WHITE).map_err(err)?;
    let (top, bottom) = if sweep {
        let (a, b) = root.split_vertically(650);
        (a, Some(b))
    } else {
        (root.clone(), None)
    };

    // Latency by percentile.
    let mut max_nines = 2.0f64;
    let (mut lo, mut hi) = (f64::MAX, 0f64);
    let mut lines = Vec::new();
    for r in runs {
        let h = r.recorder.corrected();
        let mut pts = Vec::new();
        for v in h.iter_quantiles(5) {
            let q = v.quantile_iterated_to();
            if q >= 1.0 {
                continue;
            }
            let ms = (v.value_iterated_to() as f64 / 1000.0).max(0.001);
            pts.push((nines(q), ms));
            lo = lo.min(ms);
            hi = hi.max(ms);
        }
        // The number of nines the sample supports.
        max_nines = max_nines.max((h.len() as f64).log10().floor());
        lines.push((r.label.clone(), pts));
    }
    let max_nines = max_nines.min(6.0);
    for (_, pts) in &mut lines {
        pts.retain(|p| p.0 <= max_nines);
    }
    let mut chart = ChartBuilder::on(&top)
        .caption("Latency by percentile", ("sans-serif", 24))
        .margin(15)
        .x_label_area_size(45)
        .y_label_area_size(70)
        .build_cartesian_2d(0f64..max_nines, (lo * 0.8..hi * 1.25).log_scale())
        .map_err(err)?;
    chart
        .configure_mesh()
        .x_desc("percentile")
        .y_desc("latency (ms)")
        .x_labels(max_nines as usize + 1)
        .x_label_formatter(&|x| nines_label(*x))
        .y_label_formatter(&|y| ms_label(*y))
        .draw()
        .map_err(err)?;
    for (i, (label, pts)) in lines.into_iter().enumerate() {
        let color = Palette99::pick(i).to_rgba();
        chart
            .draw_series(LineSeries::new(pts, color.stroke_width(2)))
            .map_err(err)?
            .label(label)
            .legend(move |(x, y)| {
                PathElement::new(vec![(x, y), (x + 20, y)], color.stroke_width(2))
            });
    }
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::UpperLeft)
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK)
        .label_font(("sans-serif", 15))
        .draw()
        .map_err(err)?;

    // Throughput against latency, one point per sweep step and target.
    if let Some(bottom) = bottom {
        // Per target: (throughput, p50 ms, p99 ms) per step.
        type Points = Vec<(f64, f64, f64)>;
        let mut series: Vec<(&'static str, Points)> = Vec::new();
        for r in runs {
            let s = &r.summary;
            let point = (
                s.throughput.calls_per_s,
                s.latency_us.p50 as f64 / 1000.0,
                s.latency_us.p99 as f64 / 1000.0,
            );
            match series.iter_mut().find(|(t, _)| *t == r.target) {
                Some((_, v)) => v.push(point),
                None => series.push((r.target, vec![point])),
            }
        }
        let xmax = series
            .iter()
            .flat_map(|(_, v)| v.iter().map(|p| p.0))
            .fold(1.0f64, f64::max);
        let ys = series
            .iter()
            .flat_map(|(_, v)| v.iter().flat_map(|p| [p.1, p.2]));
        let (ylo, yhi) = ys.fold((f64::MAX, 0f64), |(a, b), y| (a.min(y), b.max(y)));
        let mut chart = ChartBuilder::on(&bottom)
            .caption("Throughput against latency", ("sans-serif", 24))
            .margin(15)
            .x_label_area_size(45)
            .y_label_area_size(70)
            .build_cartesian_2d(
                0f64..xmax * 1.1,
                (ylo.max(0.001) * 0.8..yhi * 1.25).log_scale(),
            )
            .map_err(err)?;
        chart
            .configure_mesh()
            .x_desc("throughput (calls/s)")
            .y_desc("latency (ms)")
            .y_label_formatter(&|y| ms_label(*y))
            .draw()
            .map_err(err)?;
        // Points joined in sweep order, so the curve shows what each step of
        // load did to throughput and latency.
        for (i, (target, pts)) in series.into_iter().enumerate() {
            for (which, pick, width) in [("p50", 0usize, 2u32), ("p99", 1, 1)] {
                let color = Palette99::pick(i).to_rgba();
                let data: Vec<(f64, f64)> = pts
                    .iter()
                    .map(|p| (p.0, if pick == 0 { p.1 } else { p.2 }))
                    .collect();
                chart
                    .draw_series(LineSeries::new(data.clone(), color.stroke_width(width)))
                    .map_err(err)?
                    .label(format!("{target} {which}"))
                    .legend(move |(x, y)| {
                        PathElement::new(vec![(x, y), (x + 20, y)], color.stroke_width(width))
                    });
                chart
                    .draw_series(data.into_iter().map(|p| Circle::new(p, 3, color.filled())))
                    .map_err(err)?;
            }
        }
        chart
            .configure_series_labels()
            .position(SeriesLabelPosition::UpperLeft)
            .background_style(WHITE.mix(0.85))
            .border_style(BLACK)
            .label_font(("sans-serif", 15))
            .draw()
            .map_err(err)?;
    }
    root.present().map_err(err)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nines_axis_labels() {
        assert_eq!(nines_label(0.0), "0%");
        assert_eq!(nines_label(1.0), "90%");
        assert_eq!(nines_label(2.0), "99%");
        assert_eq!(nines_label(3.0), "99.9%");
        assert_eq!(nines_label(4.0), "99.99%");
        assert!((nines(0.99) - 2.0).abs() < 1e-9);
    }
}
