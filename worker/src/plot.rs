//! Loss curves as a PNG: loss against step on a log scale, one line per optimizer with
//! its spread shaded (plotters, text drawn with a TrueType font found on the system).

use std::path::Path;
use std::sync::OnceLock;

use ab_glyph::{Font as _, FontRef, PxScale, ScaleFont as _, point};
use anyhow::{Context, Result, anyhow, bail};
use plotters::prelude::*;
use plotters_backend::text_anchor::{HPos, VPos};
// `BackendStyle` is named by path: imported, its `stroke_width` would clash with `Color`'s.
use plotters_backend::{BackendColor, BackendCoord, BackendTextStyle, DrawingErrorKind};

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

/// A system font, read once; also registered as plotters' "sans-serif" (its text
/// styles name a family, though [`Glyphs`] draws every text).
fn font() -> Result<&'static FontRef<'static>> {
    static DONE: OnceLock<Result<FontRef<'static>, String>> = OnceLock::new();
    DONE.get_or_init(|| {
        let candidates = std::env::var("L2L_FONT")
            .ok()
            .into_iter()
            .chain(FONTS.iter().map(|s| s.to_string()));
        for path in candidates {
            if let Ok(bytes) = std::fs::read(&path) {
                // Kept for the life of the process, as plotters keeps its fonts.
                let bytes: &'static [u8] = Box::leak(bytes.into_boxed_slice());
                let unusable = |_| format!("{path} is not a usable TrueType font");
                let font = FontRef::try_from_slice(bytes).map_err(unusable)?;
                plotters::style::register_font("sans-serif", FontStyle::Normal, bytes)
                    .map_err(|_| format!("{path} is not a usable TrueType font"))?;
                return Ok(font);
            }
        }
        Err(
            "no TrueType font for the plot's text: install fonts-dejavu-core (Debian/Ubuntu) \
             or set L2L_FONT=/path/to/font.ttf"
                .to_string(),
        )
    })
    .as_ref()
    .map_err(|e| anyhow!(e.clone()))
}

/// plotters' bitmap with every text laid out and drawn here, from the font's metrics:
/// plotters 0.3.7 puts each glyph's ink at the pen position without the glyph's left
/// side bearing, which opens gaps inside words ("con v", "0. 562").
struct Glyphs<'a> {
    inner: BitMapBackend<'a>,
    font: &'static FontRef<'static>,
}

impl Glyphs<'_> {
    /// Width and height of `text` at `size` pixels, and its pen positions along the line.
    fn layout(&self, text: &str, size: f64) -> (f32, f32, Vec<(ab_glyph::GlyphId, f32)>) {
        let scaled = self.font.as_scaled(PxScale::from(size as f32));
        let mut x = 0f32;
        let mut prev = None;
        let mut pens = Vec::with_capacity(text.len());
        for c in text.chars() {
            let id = scaled.glyph_id(c);
            if let Some(p) = prev {
                x += scaled.kern(p, id);
            }
            pens.push((id, x));
            x += scaled.h_advance(id);
            prev = Some(id);
        }
        (x, scaled.ascent() - scaled.descent(), pens)
    }
}

impl DrawingBackend for Glyphs<'_> {
    type ErrorType = <BitMapBackend<'static> as DrawingBackend>::ErrorType;

    fn get_size(&self) -> (u32, u32) {
        self.inner.get_size()
    }
    fn ensure_prepared(&mut self) -> Result<(), DrawingErrorKind<Self::ErrorType>> {
        self.inner.ensure_prepared()
    }
    fn present(&mut self) -> Result<(), DrawingErrorKind<Self::ErrorType>> {
        self.inner.present()
    }
    fn draw_pixel(
        &mut self,
        point: BackendCoord,
        color: BackendColor,
    ) -> Result<(), DrawingErrorKind<Self::ErrorType>> {
        self.inner.draw_pixel(point, color)
    }
    fn draw_line<S: plotters_backend::BackendStyle>(
        &mut self,
        from: BackendCoord,
        to: BackendCoord,
        style: &S,
    ) -> Result<(), DrawingErrorKind<Self::ErrorType>> {
        self.inner.draw_line(from, to, style)
    }
    fn draw_rect<S: plotters_backend::BackendStyle>(
        &mut self,
        upper_left: BackendCoord,
        bottom_right: BackendCoord,
        style: &S,
        fill: bool,
    ) -> Result<(), DrawingErrorKind<Self::ErrorType>> {
        self.inner.draw_rect(upper_left, bottom_right, style, fill)
    }
    fn draw_path<S: plotters_backend::BackendStyle, I: IntoIterator<Item = BackendCoord>>(
        &mut self,
        path: I,
        style: &S,
    ) -> Result<(), DrawingErrorKind<Self::ErrorType>> {
        self.inner.draw_path(path, style)
    }
    fn fill_polygon<S: plotters_backend::BackendStyle, I: IntoIterator<Item = BackendCoord>>(
        &mut self,
        vert: I,
        style: &S,
    ) -> Result<(), DrawingErrorKind<Self::ErrorType>> {
        self.inner.fill_polygon(vert, style)
    }

    fn estimate_text_size<TStyle: BackendTextStyle>(
        &self,
        text: &str,
        style: &TStyle,
    ) -> Result<(u32, u32), DrawingErrorKind<Self::ErrorType>> {
        let (w, h, _) = self.layout(text, style.size());
        Ok((w.ceil() as u32, h.ceil() as u32))
    }

    /// The text's box (advance width × ascent − descent) placed by its anchor, the
    /// baseline at the ascent; each glyph's ink where its outline says, then turned by
    /// the style's transform about `pos`.
    fn draw_text<TStyle: BackendTextStyle>(
        &mut self,
        text: &str,
        style: &TStyle,
        pos: BackendCoord,
    ) -> Result<(), DrawingErrorKind<Self::ErrorType>> {
        let color = style.color();
        if color.alpha == 0.0 {
            return Ok(());
        }
        let size = style.size();
        let (width, height, pens) = self.layout(text, size);
        let (width, height) = (width.round() as i32, height.round() as i32);
        let dx = match style.anchor().h_pos {
            HPos::Left => 0,
            HPos::Right => -width,
            HPos::Center => -width / 2,
        };
        let dy = match style.anchor().v_pos {
            VPos::Top => 0,
            VPos::Center => -height / 2,
            VPos::Bottom => -height,
        };
        let scale = PxScale::from(size as f32);
        let ascent = self.font.as_scaled(scale).ascent();
        let transform = style.transform();
        let mut ink = Vec::new();
        for (id, x) in pens {
            let glyph = id.with_scale_and_position(scale, point(x, ascent));
            if let Some(outline) = self.font.outline_glyph(glyph) {
                let bounds = outline.px_bounds();
                outline.draw(|gx, gy, coverage| {
                    let x = bounds.min.x as i32 + gx as i32 + dx;
                    let y = bounds.min.y as i32 + gy as i32 + dy;
                    ink.push((x, y, coverage));
                });
            }
        }
        for (x, y, coverage) in ink {
            let (x, y) = transform.transform(x, y);
            let alpha = color.alpha * f64::from(coverage.clamp(0.0, 1.0));
            if alpha > 0.0 {
                let c = BackendColor {
                    alpha,
                    rgb: color.rgb,
                };
                self.inner.draw_pixel((pos.0 + x, pos.1 + y), c)?;
            }
        }
        Ok(())
    }
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
    let font = font()?;
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
    let root = Glyphs {
        inner: BitMapBackend::with_buffer(pixels, SIZE),
        font,
    }
    .into_drawing_area();
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

/// One picture of a grid: an RGB image `[3, h, w]` (values clamped to [0, 1] when
/// drawn) and the line written under it.
pub struct Picture {
    /// The image.
    pub image: l2l_common::problems::images::Image,
    /// The caption under it (e.g. the loss).
    pub caption: String,
}

/// Largest side of a picture in a grid, pixels.
const CELL: u32 = 160;

/// How a picture is drawn: its longer side on screen, and the factors up / down it is
/// scaled by (a whole enlargement up to [`CELL`], or a whole reduction below it, nearest
/// neighbour so pixels stay pixels).
fn shown(image: &l2l_common::problems::images::Image) -> (u32, u32, u32) {
    let side = image.height.max(image.width).max(1) as u32;
    if side <= CELL {
        let up = CELL / side;
        (side * up, up, 1)
    } else {
        let down = side.div_ceil(CELL);
        (side / down, 1, down)
    }
}

/// Margin around and between cells, pixels.
const GAP: u32 = 10;
/// Height of a text line, pixels.
const LINE: u32 = 22;

/// Draws a grid of pictures into a PNG at `path`: a title, the column headings, then one
/// row per entry of `rows` (its heading on the left, `None` cells left blank); each
/// image scaled as [`shown`] says.
pub fn picture_grid(
    path: &Path,
    title: &str,
    columns: &[String],
    rows: &[(String, Vec<Option<Picture>>)],
) -> Result<()> {
    let font = font()?;
    let cell = rows
        .iter()
        .flat_map(|(_, r)| r.iter().flatten())
        .map(|p| shown(&p.image).0)
        .max()
        .context("no picture to draw")?;
    let left = 90;
    let (w, h) = (
        left + columns.len() as u32 * (cell + GAP) + GAP,
        2 * LINE + GAP + rows.len() as u32 * (cell + LINE + GAP) + GAP,
    );
    let mut pixels = vec![255u8; (w * h * 3) as usize];
    {
        let root = Glyphs {
            inner: BitMapBackend::with_buffer(&mut pixels, (w, h)),
            font,
        }
        .into_drawing_area();
        let draw = |e: &dyn std::fmt::Display| anyhow!("cannot draw {}: {e}", path.display());
        let text = |size: f64| TextStyle::from(("sans-serif", size).into_font()).color(&BLACK);
        root.fill(&WHITE).map_err(|e| draw(&e))?;
        root.draw(&Text::new(title.to_string(), (GAP as i32, 4), text(18.0)))
            .map_err(|e| draw(&e))?;
        for (i, name) in columns.iter().enumerate() {
            let x = (left + i as u32 * (cell + GAP)) as i32;
            root.draw(&Text::new(name.clone(), (x, (LINE + 4) as i32), text(16.0)))
                .map_err(|e| draw(&e))?;
        }
        for (r, (name, cells)) in rows.iter().enumerate() {
            let y = 2 * LINE + GAP + r as u32 * (cell + LINE + GAP);
            root.draw(&Text::new(
                name.clone(),
                (GAP as i32, (y + cell / 2) as i32),
                text(16.0),
            ))
            .map_err(|e| draw(&e))?;
            for (i, p) in cells.iter().enumerate() {
                if let Some(p) = p {
                    let x = (left + i as u32 * (cell + GAP)) as i32;
                    root.draw(&Text::new(
                        p.caption.clone(),
                        (x, (y + cell + 2) as i32),
                        text(14.0),
                    ))
                    .map_err(|e| draw(&e))?;
                }
            }
        }
        root.present().map_err(|e| draw(&e))?;
    }
    for (r, (_, cells)) in rows.iter().enumerate() {
        let y0 = 2 * LINE + GAP + r as u32 * (cell + LINE + GAP);
        for (i, p) in cells.iter().enumerate() {
            let Some(p) = p else { continue };
            let x0 = left + i as u32 * (cell + GAP);
            let rgb = p.image.to_rgb8();
            let (_, up, down) = shown(&p.image);
            let (iw, ih) = (p.image.width as u32, p.image.height as u32);
            for y in 0..(ih * up / down).min(cell) {
                for x in 0..(iw * up / down).min(cell) {
                    let (sy, sx) = (y * down / up, x * down / up);
                    let src = ((sy * iw + sx) * 3) as usize;
                    let dst = (((y0 + y) * w + x0 + x) * 3) as usize;
                    pixels[dst..dst + 3].copy_from_slice(&rgb[src..src + 3]);
                }
            }
        }
    }
    let file =
        std::fs::File::create(path).with_context(|| format!("cannot create {}", path.display()))?;
    let mut enc = png::Encoder::new(std::io::BufWriter::new(file), w, h);
    enc.set_color(png::ColorType::Rgb);
    enc.set_depth(png::BitDepth::Eight);
    enc.set_compression(png::Compression::Best);
    enc.write_header()
        .and_then(|mut wr| wr.write_image_data(&pixels))
        .with_context(|| format!("cannot write {}", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    const W: usize = 300;
    const H: usize = 100;

    /// Which columns of `text`, drawn in black at (10, 10) anchored top left, have ink.
    fn inked_columns(text: &str, size: f64) -> Vec<bool> {
        let mut px = vec![255u8; W * H * 3];
        {
            let mut b = Glyphs {
                inner: BitMapBackend::with_buffer(&mut px, (W as u32, H as u32)),
                font: font().expect("a font (fonts-dejavu-core, or L2L_FONT)"),
            };
            let style = TextStyle::from(("sans-serif", size).into_font()).color(&BLACK);
            b.draw_text(text, &style, (10, 10)).unwrap();
            b.present().unwrap();
        }
        (0..W)
            .map(|x| (0..H).any(|y| px[(y * W + x) * 3] < 128))
            .collect()
    }

    /// Each glyph's ink starts at its pen position plus its left side bearing (from the
    /// font's metrics table), which plotters' own text drawing leaves out.
    #[test]
    fn glyphs_keep_their_side_bearings() {
        let font = font().unwrap();
        let size = 40.0;
        let scaled = font.as_scaled(PxScale::from(size as f32));
        let (v, n) = (scaled.glyph_id('v'), scaled.glyph_id('n'));
        let bearing = scaled.h_side_bearing(n);
        assert!(bearing > 2.0, "n's bearing {bearing}: too small to tell");

        let ink = inked_columns("n", size);
        let first = ink.iter().position(|i| *i).unwrap() as f32;
        assert!(
            (first - (10.0 + bearing)).abs() <= 1.0,
            "n's ink at {first}, bearing {bearing}"
        );

        // The n of "vn": its pen is after v's advance and the pair's kerning; its ink is
        // the first after the blank columns that follow v's.
        let pen = 10.0 + scaled.h_advance(v) + scaled.kern(v, n);
        let ink = inked_columns("vn", size);
        let v_end = (10..W).find(|x| ink[*x - 1] && !ink[*x]).unwrap();
        let n_start = (v_end..W).find(|x| ink[*x]).unwrap() as f32;
        assert!(
            (n_start - (pen + bearing)).abs() <= 1.0,
            "vn's n at {n_start}, pen {pen}, bearing {bearing}"
        );
    }
}
