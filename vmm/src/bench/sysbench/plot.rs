//! The plot: ratio to the baseline per workload (rows) and multi-node layout (bars), with the
//! baseline (1.0) and the 0.9 goal marked. One list of shapes is drawn twice: as SVG text, and
//! rasterised into a PNG (text through `ab_glyph` with a TrueType font from the system, by
//! default DejaVu Sans of Debian's `fonts-dejavu-core`, which `scripts/setup.sh` installs).

use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use ab_glyph::{Font, FontVec, PxScale, ScaleFont};

use super::layout::Layout;
use super::report::{Results, GOAL_RATIO};

/// Where the PNG's font is looked for, in order (`SPANVM_PLOT_FONT` first when set).
const FONTS: [&str; 3] = [
    "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf",
    "/usr/share/fonts/truetype/liberation/LiberationSans-Regular.ttf",
    "/usr/share/fonts/truetype/freefont/FreeSans.ttf",
];

/// Why the plot could not be made.
#[derive(Debug, thiserror::Error)]
pub enum PlotError {
    /// No font for the PNG's text.
    #[error("no TrueType font for the PNG plot (looked for {0}): install fonts-dejavu-core (scripts/setup.sh) or set SPANVM_PLOT_FONT")]
    NoFont(String),
    /// The font file is not a font.
    #[error("{0} is not a TrueType font")]
    BadFont(String),
    /// A file could not be written.
    #[error("cannot write {path}: {reason}")]
    Write {
        /// The file.
        path: String,
        /// What failed.
        reason: String,
    },
}

/// An RGB colour.
type Rgb = [u8; 3];

const BLACK: Rgb = [0, 0, 0];
const RED: Rgb = [200, 40, 40];
const WHITE: Rgb = [255, 255, 255];
const PALETTE: [Rgb; 6] = [
    [31, 119, 180],
    [255, 127, 14],
    [44, 160, 44],
    [148, 103, 189],
    [140, 86, 75],
    [23, 190, 207],
];

/// Where a text's x coordinate is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Anchor {
    Start,
    Middle,
    End,
}

/// What is drawn (coordinates in pixels, y downwards; a text's y is its baseline).
#[derive(Debug, Clone)]
enum Shape {
    Rect {
        x: f32,
        y: f32,
        w: f32,
        h: f32,
        fill: Rgb,
    },
    /// A horizontal or vertical line.
    Line {
        x1: f32,
        y1: f32,
        x2: f32,
        y2: f32,
        color: Rgb,
        dashed: bool,
    },
    Text {
        x: f32,
        y: f32,
        size: f32,
        text: String,
        anchor: Anchor,
        color: Rgb,
    },
}

/// A picture: its size and shapes.
#[derive(Debug, Clone)]
struct Picture {
    width: u32,
    height: u32,
    shapes: Vec<Shape>,
}

const ROW_GAP: f32 = 10.0;
const BAR: f32 = 14.0;
const LEFT: f32 = 190.0;
const PLOT_WIDTH: f32 = 560.0;
const TOP: f32 = 60.0;

// Pixel arithmetic on small counts (at most a few hundred rows and bars).
#[allow(clippy::cast_precision_loss)]
fn px(n: usize) -> f32 {
    n as f32
}

/// Lays out the chart of `results`.
fn picture(results: &Results, title: &str) -> Picture {
    let layouts: Vec<Layout> = results
        .layouts()
        .into_iter()
        .filter(|l| !l.is_baseline())
        .collect();
    let workloads = results.workloads();
    let ratio = |w: &str, l: Layout| results.row(w, l).and_then(|r| results.ratio(r));
    let top_ratio = workloads
        .iter()
        .flat_map(|w| layouts.iter().filter_map(move |&l| ratio(&w.name, l)))
        .fold(1.2_f64, f64::max);
    // The axis ends at the next 0.5 above the largest ratio.
    let axis_max = (top_ratio * 2.0).ceil() / 2.0;
    let group = px(layouts.len().max(1)) * BAR + ROW_GAP;
    let plot_height = px(workloads.len().max(1)) * group;
    let height = TOP + plot_height + 70.0;
    let width = LEFT + PLOT_WIDTH + 150.0;
    #[allow(clippy::cast_possible_truncation)]
    let x_of = |r: f64| LEFT + (r / axis_max) as f32 * PLOT_WIDTH;
    let mut shapes = vec![
        Shape::Rect {
            x: 0.0,
            y: 0.0,
            w: width,
            h: height,
            fill: WHITE,
        },
        Shape::Text {
            x: width / 2.0,
            y: 24.0,
            size: 16.0,
            text: title.to_string(),
            anchor: Anchor::Middle,
            color: BLACK,
        },
        Shape::Text {
            x: width / 2.0,
            y: 44.0,
            size: 12.0,
            text: "ratio to the 1xN baseline of the same run (1.0 = as fast as one node)".into(),
            anchor: Anchor::Middle,
            color: BLACK,
        },
    ];
    // Grid and tick labels: 0.25 apart up to 2, then wider, about ten in all.
    let step = match axis_max {
        m if m <= 2.0 => 0.25,
        m if m <= 4.0 => 0.5,
        m if m <= 10.0 => 1.0,
        m => (m / 10.0).ceil(),
    };
    let mut tick = 0.0;
    while tick <= axis_max + 1e-9 {
        let x = x_of(tick);
        shapes.push(Shape::Line {
            x1: x,
            y1: TOP,
            x2: x,
            y2: TOP + plot_height,
            color: [225, 225, 225],
            dashed: false,
        });
        shapes.push(Shape::Text {
            x,
            y: TOP + plot_height + 16.0,
            size: 11.0,
            text: format!("{tick:.2}"),
            anchor: Anchor::Middle,
            color: BLACK,
        });
        tick += step;
    }
    for (i, w) in workloads.iter().enumerate() {
        let y0 = TOP + px(i) * group + ROW_GAP / 2.0;
        shapes.push(Shape::Text {
            x: LEFT - 8.0,
            y: y0 + group / 2.0,
            size: 12.0,
            text: w.name.clone(),
            anchor: Anchor::End,
            color: BLACK,
        });
        for (j, &l) in layouts.iter().enumerate() {
            let y = y0 + px(j) * BAR;
            let color = PALETTE[j % PALETTE.len()];
            match ratio(&w.name, l) {
                Some(r) => {
                    let x = x_of(r);
                    shapes.push(Shape::Rect {
                        x: LEFT,
                        y: y + 1.0,
                        w: (x - LEFT).max(1.0),
                        h: BAR - 2.0,
                        fill: color,
                    });
                    shapes.push(Shape::Text {
                        x: x + 4.0,
                        y: y + BAR - 3.0,
                        size: 10.0,
                        text: format!("{r:.2}"),
                        anchor: Anchor::Start,
                        color: BLACK,
                    });
                }
                None => shapes.push(Shape::Text {
                    x: LEFT + 4.0,
                    y: y + BAR - 3.0,
                    size: 10.0,
                    text: format!("{l}: no figure"),
                    anchor: Anchor::Start,
                    color: RED,
                }),
            }
        }
    }
    for (r, color, dashed) in [(1.0, BLACK, false), (GOAL_RATIO, RED, true)] {
        let x = x_of(r);
        shapes.push(Shape::Line {
            x1: x,
            y1: TOP - 4.0,
            x2: x,
            y2: TOP + plot_height,
            color,
            dashed,
        });
    }
    shapes.push(Shape::Line {
        x1: LEFT,
        y1: TOP,
        x2: LEFT,
        y2: TOP + plot_height,
        color: BLACK,
        dashed: false,
    });
    // Legend, right of the plot.
    let lx = LEFT + PLOT_WIDTH + 20.0;
    for (j, l) in layouts.iter().enumerate() {
        let y = TOP + px(j) * 20.0;
        shapes.push(Shape::Rect {
            x: lx,
            y,
            w: 14.0,
            h: 14.0,
            fill: PALETTE[j % PALETTE.len()],
        });
        shapes.push(Shape::Text {
            x: lx + 20.0,
            y: y + 12.0,
            size: 12.0,
            text: format!("{l} / {}", l.baseline()),
            anchor: Anchor::Start,
            color: BLACK,
        });
    }
    let ly = TOP + px(layouts.len()) * 20.0 + 10.0;
    shapes.push(Shape::Line {
        x1: lx,
        y1: ly + 7.0,
        x2: lx + 14.0,
        y2: ly + 7.0,
        color: RED,
        dashed: true,
    });
    shapes.push(Shape::Text {
        x: lx + 20.0,
        y: ly + 12.0,
        size: 12.0,
        text: format!("goal {GOAL_RATIO}"),
        anchor: Anchor::Start,
        color: BLACK,
    });
    #[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)]
    let (width, height) = (width.ceil() as u32, height.ceil() as u32);
    Picture {
        width,
        height,
        shapes,
    }
}

fn escape(text: &str) -> String {
    text.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

fn rgb(c: Rgb) -> String {
    format!("rgb({},{},{})", c[0], c[1], c[2])
}

/// The picture as an SVG document.
fn svg(p: &Picture) -> String {
    let mut out = format!(
        "<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{}\" height=\"{}\" viewBox=\"0 0 {} {}\" font-family=\"DejaVu Sans, sans-serif\">\n",
        p.width, p.height, p.width, p.height
    );
    for shape in &p.shapes {
        let _ = match shape {
            Shape::Rect { x, y, w, h, fill } => writeln!(
                out,
                "<rect x=\"{x:.1}\" y=\"{y:.1}\" width=\"{w:.1}\" height=\"{h:.1}\" fill=\"{}\"/>",
                rgb(*fill)
            ),
            Shape::Line {
                x1,
                y1,
                x2,
                y2,
                color,
                dashed,
            } => writeln!(
                out,
                "<line x1=\"{x1:.1}\" y1=\"{y1:.1}\" x2=\"{x2:.1}\" y2=\"{y2:.1}\" stroke=\"{}\" stroke-width=\"1.5\"{}/>",
                rgb(*color),
                if *dashed { " stroke-dasharray=\"5,4\"" } else { "" }
            ),
            Shape::Text {
                x,
                y,
                size,
                text,
                anchor,
                color,
            } => writeln!(
                out,
                "<text x=\"{x:.1}\" y=\"{y:.1}\" font-size=\"{size}\" text-anchor=\"{}\" fill=\"{}\">{}</text>",
                match anchor {
                    Anchor::Start => "start",
                    Anchor::Middle => "middle",
                    Anchor::End => "end",
                },
                rgb(*color),
                escape(text)
            ),
        };
    }
    out.push_str("</svg>\n");
    out
}

/// An RGB raster.
struct Raster {
    width: u32,
    height: u32,
    pixels: Vec<u8>,
}

impl Raster {
    fn new(width: u32, height: u32) -> Raster {
        let len = usize::try_from(u64::from(width) * u64::from(height) * 3).unwrap_or(0);
        Raster {
            width,
            height,
            pixels: vec![255; len],
        }
    }

    /// Blends `color` into pixel (x, y) with `alpha` in [0, 1]; outside pixels are ignored.
    fn blend(&mut self, x: i64, y: i64, color: Rgb, alpha: f32) {
        let (Ok(x), Ok(y)) = (u32::try_from(x), u32::try_from(y)) else {
            return;
        };
        if x >= self.width || y >= self.height {
            return;
        }
        let Ok(i) = usize::try_from((u64::from(y) * u64::from(self.width) + u64::from(x)) * 3)
        else {
            return;
        };
        let a = alpha.clamp(0.0, 1.0);
        for (k, &c) in color.iter().enumerate() {
            let old = f32::from(self.pixels[i + k]);
            // A blend of two bytes with a weight in [0, 1] stays in [0, 255].
            #[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)]
            let new = (old + (f32::from(c) - old) * a).round() as u8;
            self.pixels[i + k] = new;
        }
    }

    fn fill(&mut self, x: f32, y: f32, w: f32, h: f32, color: Rgb) {
        #[allow(clippy::cast_possible_truncation)]
        let (x0, y0, x1, y1) = (
            x.round() as i64,
            y.round() as i64,
            (x + w).round() as i64,
            (y + h).round() as i64,
        );
        for yy in y0..y1 {
            for xx in x0..x1 {
                self.blend(xx, yy, color, 1.0);
            }
        }
    }

    fn line(&mut self, (x1, y1, x2, y2): (f32, f32, f32, f32), color: Rgb, dashed: bool) {
        let steps = (x2 - x1).abs().max((y2 - y1).abs()).max(1.0);
        #[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)]
        let n = steps.ceil() as u32;
        for i in 0..=n {
            // Dashes of 5 pixels on, 4 off.
            if dashed && i % 9 >= 5 {
                continue;
            }
            #[allow(clippy::cast_precision_loss)]
            let t = i as f32 / steps;
            let (x, y) = (x1 + (x2 - x1) * t, y1 + (y2 - y1) * t);
            #[allow(clippy::cast_possible_truncation)]
            let (xi, yi) = (x.floor() as i64, y.floor() as i64);
            self.blend(xi, yi, color, 1.0);
            // 1.5 pixels wide: a half-covered neighbour.
            if (x2 - x1).abs() < f32::EPSILON {
                self.blend(xi + 1, yi, color, 0.5);
            } else {
                self.blend(xi, yi + 1, color, 0.5);
            }
        }
    }

    fn text(
        &mut self,
        font: &FontVec,
        (x, y): (f32, f32),
        size: f32,
        text: &str,
        anchor: Anchor,
        color: Rgb,
    ) {
        let scaled = font.as_scaled(PxScale::from(size * 1.33));
        let mut width = 0.0;
        let mut last = None;
        for c in text.chars() {
            let id = scaled.glyph_id(c);
            if let Some(prev) = last {
                width += scaled.kern(prev, id);
            }
            width += scaled.h_advance(id);
            last = Some(id);
        }
        let mut pen = match anchor {
            Anchor::Start => x,
            Anchor::Middle => x - width / 2.0,
            Anchor::End => x - width,
        };
        let mut last = None;
        for c in text.chars() {
            let id = scaled.glyph_id(c);
            if let Some(prev) = last {
                pen += scaled.kern(prev, id);
            }
            let glyph = id.with_scale_and_position(scaled.scale(), ab_glyph::point(pen, y));
            if let Some(outline) = font.outline_glyph(glyph) {
                let bounds = outline.px_bounds();
                outline.draw(|gx, gy, coverage| {
                    #[allow(clippy::cast_possible_truncation)]
                    let (px_x, px_y) = (
                        bounds.min.x.floor() as i64 + i64::from(gx),
                        bounds.min.y.floor() as i64 + i64::from(gy),
                    );
                    self.blend(px_x, px_y, color, coverage);
                });
            }
            pen += scaled.h_advance(id);
            last = Some(id);
        }
    }
}

/// The picture as a PNG file's bytes.
fn png(p: &Picture, font: &FontVec) -> Result<Vec<u8>, String> {
    let mut raster = Raster::new(p.width, p.height);
    for shape in &p.shapes {
        match shape {
            Shape::Rect { x, y, w, h, fill } => raster.fill(*x, *y, *w, *h, *fill),
            Shape::Line {
                x1,
                y1,
                x2,
                y2,
                color,
                dashed,
            } => raster.line((*x1, *y1, *x2, *y2), *color, *dashed),
            Shape::Text {
                x,
                y,
                size,
                text,
                anchor,
                color,
            } => raster.text(font, (*x, *y), *size, text, *anchor, *color),
        }
    }
    let mut bytes = Vec::new();
    let mut encoder = png::Encoder::new(&mut bytes, raster.width, raster.height);
    encoder.set_color(png::ColorType::Rgb);
    encoder.set_depth(png::BitDepth::Eight);
    let mut writer = encoder.write_header().map_err(|e| e.to_string())?;
    writer
        .write_image_data(&raster.pixels)
        .map_err(|e| e.to_string())?;
    writer.finish().map_err(|e| e.to_string())?;
    Ok(bytes)
}

/// The font for the PNG's text.
fn load_font() -> Result<FontVec, PlotError> {
    let mut candidates: Vec<PathBuf> = Vec::new();
    if let Some(p) = std::env::var_os("SPANVM_PLOT_FONT") {
        candidates.push(PathBuf::from(p));
    }
    candidates.extend(FONTS.iter().map(PathBuf::from));
    let Some((path, bytes)) = candidates
        .iter()
        .find_map(|p| std::fs::read(p).ok().map(|b| (p, b)))
    else {
        let names: Vec<String> = candidates.iter().map(|p| p.display().to_string()).collect();
        return Err(PlotError::NoFont(names.join(", ")));
    };
    FontVec::try_from_vec(bytes).map_err(|_| PlotError::BadFont(path.display().to_string()))
}

/// Writes `ratios.svg` and `ratios.png` into `dir`; returns their paths.
pub fn write(results: &Results, title: &str, dir: &Path) -> Result<(PathBuf, PathBuf), PlotError> {
    let picture = picture(results, title);
    let svg_path = dir.join("ratios.svg");
    std::fs::write(&svg_path, svg(&picture)).map_err(|e| PlotError::Write {
        path: svg_path.display().to_string(),
        reason: e.to_string(),
    })?;
    let font = load_font()?;
    let png_path = dir.join("ratios.png");
    let bytes = png(&picture, &font).map_err(|reason| PlotError::Write {
        path: png_path.display().to_string(),
        reason,
    })?;
    std::fs::write(&png_path, bytes).map_err(|e| PlotError::Write {
        path: png_path.display().to_string(),
        reason: e.to_string(),
    })?;
    Ok((svg_path, png_path))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bench::sysbench::report::tests::sample;

    #[test]
    fn svg_names_every_workload_and_escapes_text() {
        let results = sample();
        let p = picture(&results, "a <title> & more");
        let text = svg(&p);
        assert!(text.starts_with("<?xml") && text.trim_end().ends_with("</svg>"));
        assert!(text.contains("a &lt;title&gt; &amp; more"));
        for w in results.workloads() {
            assert!(text.contains(&format!(">{}</text>", w.name)), "{}", w.name);
        }
        // The failed row shows as such, the others as bars with their ratio.
        assert!(text.contains("2x1: no figure"));
        assert!(text.contains(">0.50</text>"));
    }

    #[test]
    fn png_has_the_picture_size_when_a_font_is_installed() {
        let Ok(font) = load_font() else {
            // The bench test (tests/bench_sysbench.rs) fails loudly without a font; here
            // only the layout is checked.
            eprintln!("no font installed: PNG rasterising not checked here");
            return;
        };
        let p = picture(&sample(), "t");
        let bytes = png(&p, &font).unwrap();
        assert_eq!(&bytes[..8], b"\x89PNG\r\n\x1a\n");
        let decoder = png::Decoder::new(std::io::Cursor::new(bytes));
        let reader = decoder.read_info().unwrap();
        assert_eq!(
            (reader.info().width, reader.info().height),
            (p.width, p.height)
        );
    }
}
