//! Loss curves as a PNG: loss against step on a log scale, one line per optimizer with
//! its spread shaded (plotters, text drawn with a TrueType font found on the system).

use std::path::Path;
use std::sync::OnceLock;

use anyhow::{Context, Result, anyhow, bail};
use plotters::prelude::*;

/// One optimizer's curve: its mean and the band drawn around it.
pub struct Series {
    /// Legend text.
    pub name: String,
    /// Mean loss per step.
    pub mean: Vec<f64>,
    /// Lower edge of the band per step.
    pub low: Vec<f64>,
    /// Upper edge of the band per step.
    pub high: Vec<f64>,
}

/// Fonts tried in order (`$L2L_FONT` first): Debian's fonts-dejavu-core, other Linux
/// layouts, macOS.
const FONTS: [&str; 4] = [
    "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf",
    "/usr/share/fonts/TTF/DejaVuSans.ttf",
    "/usr/share/fonts/dejavu/DejaVuSans.ttf",
    "/System/Library/Fonts/Supplemental/Arial.ttf",
];

/// Registers a system font as plotters' "sans-serif", once.
fn font() -> Result<()> {
    static DONE: OnceLock<Result<(), String>> = OnceLock::new();
    DONE.get_or_init(|| {
        let candidates = std::env::var("L2L_FONT")
            .ok()
            .into_iter()
            .chain(FONTS.iter().map(|s| s.to_string()));
        for path in candidates {
            if let Ok(bytes) = std::fs::read(&path) {
                // plotters keeps fonts for the life of the process.
                let bytes: &'static [u8] = Box::leak(bytes.into_boxed_slice());
                return plotters::style::register_font("sans-serif", FontStyle::Normal, bytes)
                    .map_err(|_| format!("{path} is not a usable TrueType font"));
            }
        }
        Err(
            "no TrueType font for the plot's text: install fonts-dejavu-core (Debian/Ubuntu) \
             or set L2L_FONT=/path/to/font.ttf"
                .to_string(),
        )
    })
    .clone()
    .map_err(|e| anyhow!(e))
}

/// Width and height of the plot in pixels.
const SIZE: (u32, u32) = (1000, 650);

/// Draws `series` into a 1000×650 PNG at `path`.
pub fn plot_curves(path: &Path, title: &str, series: &[Series]) -> Result<()> {
    let mut pixels = vec![0u8; (SIZE.0 * SIZE.1 * 3) as usize];
    draw_curves(&mut pixels, path, title, series)?;
    // Encoded here rather than by plotters, for the smaller files of best compression.
    let file =
        std::fs::File::create(path).with_context(|| format!("cannot create {}", path.display()))?;
    let mut enc = png::Encoder::new(std::io::BufWriter::new(file), SIZE.0, SIZE.1);
    enc.set_color(png::ColorType::Rgb);
    enc.set_depth(png::BitDepth::Eight);
    enc.set_compression(png::Compression::Best);
    enc.write_header()
        .and_then(|mut w| w.write_image_data(&pixels))
        .with_context(|| format!("cannot write {}", path.display()))
}

fn draw_curves(pixels: &mut [u8], path: &Path, title: &str, series: &[Series]) -> Result<()> {
    font()?;
    let steps = series
        .first()
        .map(|s| s.mean.len())
        .context("nothing to plot")?;
    let finite = series
        .iter()
        .flat_map(|s| s.low.iter().chain(&s.high).chain(&s.mean))
        .copied()
        .filter(|v| v.is_finite() && *v > 0.0);
    let (lo, hi) = finite.fold((f64::INFINITY, 0f64), |(lo, hi), v| (lo.min(v), hi.max(v)));
    if !(lo.is_finite() && hi > 0.0) {
        bail!("no positive finite loss to plot");
    }
    let clamp = |v: f64| if v.is_finite() { v.clamp(lo, hi) } else { hi };
    let root = BitMapBackend::with_buffer(pixels, SIZE).into_drawing_area();
    let draw = |e: &dyn std::fmt::Display| anyhow!("cannot draw {}: {e}", path.display());
    root.fill(&WHITE).map_err(|e| draw(&e))?;
    let mut chart = ChartBuilder::on(&root)
        .caption(title, ("sans-serif", 26))
        .margin(15)
        .x_label_area_size(45)
        .y_label_area_size(80)
        .build_cartesian_2d(0f64..(steps - 1) as f64, (lo * 0.9..hi * 1.1).log_scale())
        .map_err(|e| draw(&e))?;
    chart
        .configure_mesh()
        .x_desc("step")
        .y_desc("loss (log scale)")
        .label_style(("sans-serif", 16))
        .y_labels(8)
        .x_label_formatter(&|v| format!("{v:.0}"))
        .y_label_formatter(&|v| format!("{v:.3}"))
        .draw()
        .map_err(|e| draw(&e))?;
    for (i, s) in series.iter().enumerate() {
        let color = Palette99::pick(i).to_rgba();
        let band: Vec<(f64, f64)> = (0..steps)
            .map(|t| (t as f64, clamp(s.high[t])))
            .chain((0..steps).rev().map(|t| (t as f64, clamp(s.low[t]))))
            .collect();
        chart
            .draw_series(std::iter::once(Polygon::new(
                band,
                color.mix(0.15).filled(),
            )))
            .map_err(|e| draw(&e))?;
        chart
            .draw_series(LineSeries::new(
                (0..steps).map(|t| (t as f64, clamp(s.mean[t]))),
                color.stroke_width(if i == 0 { 3 } else { 2 }),
            ))
            .map_err(|e| draw(&e))?
            .label(s.name.clone())
            .legend(move |(x, y)| {
                PathElement::new(vec![(x, y), (x + 20, y)], color.stroke_width(3))
            });
    }
    chart
        .configure_series_labels()
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK)
        .label_font(("sans-serif", 16))
        .position(SeriesLabelPosition::LowerLeft)
        .draw()
        .map_err(|e| draw(&e))?;
    root.present().map_err(|e| draw(&e))?;
    Ok(())
}
