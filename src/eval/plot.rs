//! Accuracy-against-compute plots, one line per strategy, and value heads' reliability plots,
//! as PNG and SVG with `plotters`.
//!
//! Text is drawn with Noto Sans embedded in the binary (`ttf-noto-sans`) through plotters'
//! `ab_glyph` feature, so the PNG renders the same on a machine without any installed font; the
//! SVG names the family and leaves glyphs to the viewer.

use std::path::Path;
use std::sync::Once;

use anyhow::{anyhow, Result};
use plotters::coord::Shift;
use plotters::prelude::*;

use super::summary::Row;

/// Pixel size of both plots.
pub(crate) const SIZE: (u32, u32) = (960, 640);

/// The font family name the plots ask for, registered once from the embedded font.
const FAMILY: &str = "sans-serif";

/// Distinct, colour-blind-friendly line colours (Okabe–Ito), one per strategy in command-line
/// order.
const COLOURS: [RGBColor; 8] = [
    RGBColor(213, 94, 0),
    RGBColor(0, 114, 178),
    RGBColor(0, 158, 115),
    RGBColor(204, 121, 167),
    RGBColor(230, 159, 0),
    RGBColor(86, 180, 233),
    RGBColor(0, 0, 0),
    RGBColor(240, 228, 66),
];

/// Which cost goes on the x axis.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Axis {
    /// Mean generated tokens.
    Generated,
    /// Mean total computed tokens (generated + computed prompt + reward model).
    Computed,
}

impl Axis {
    fn value(self, row: &Row) -> f64 {
        match self {
            Axis::Generated => row.generated,
            Axis::Computed => row.total_computed,
        }
    }

    fn label(self) -> &'static str {
        match self {
            Axis::Generated => "mean generated tokens per question (log scale)",
            Axis::Computed => {
                "mean computed tokens per question: generated + prompt + reward model (log scale)"
            }
        }
    }

    /// File name without extension.
    pub(crate) fn stem(self) -> &'static str {
        match self {
            Axis::Generated => "accuracy_vs_generated",
            Axis::Computed => "accuracy_vs_computed",
        }
    }
}

fn register_font() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        if plotters::style::register_font(FAMILY, FontStyle::Normal, ttf_noto_sans::REGULAR)
            .is_err()
        {
            tracing::error!("the embedded Noto Sans font did not load; plots will lack text");
        }
    });
}

/// Writes `<stem>.png` and `<stem>.svg` for both axes into `dir`.
pub(crate) fn write_all(dir: &Path, rows: &[Row]) -> Result<()> {
    register_font();
    for axis in [Axis::Generated, Axis::Computed] {
        let png = dir.join(format!("{}.png", axis.stem()));
        draw(
            BitMapBackend::new(&png, SIZE).into_drawing_area(),
            rows,
            axis,
        )
        .map_err(|e| anyhow!("drawing {}: {e}", png.display()))?;
        let svg = dir.join(format!("{}.svg", axis.stem()));
        draw(SVGBackend::new(&svg, SIZE).into_drawing_area(), rows, axis)
            .map_err(|e| anyhow!("drawing {}: {e}", svg.display()))?;
    }
    Ok(())
}

/// One bin of a reliability plot: mean predicted probability, observed positive rate, count.
pub(crate) type Bin = (f64, f64, usize);

/// Writes `png` and the same name with `.svg`: a value head's reliability plot (observed positive
/// rate against mean prediction per bin, point area by count, the diagonal for reference).
pub(crate) fn write_reliability(png: &Path, title: &str, bins: &[Bin]) -> Result<()> {
    register_font();
    draw_reliability(
        BitMapBackend::new(png, SIZE).into_drawing_area(),
        title,
        bins,
    )
    .map_err(|e| anyhow!("drawing {}: {e}", png.display()))?;
    let svg = png.with_extension("svg");
    draw_reliability(SVGBackend::new(&svg, SIZE).into_drawing_area(), title, bins)
        .map_err(|e| anyhow!("drawing {}: {e}", svg.display()))?;
    Ok(())
}

fn draw_reliability<DB: DrawingBackend>(
    root: DrawingArea<DB, Shift>,
    title: &str,
    bins: &[Bin],
) -> Result<(), DrawingAreaErrorKind<DB::ErrorType>> {
    root.fill(&WHITE)?;
    let mut chart = ChartBuilder::on(&root)
        .caption(title, (FAMILY, 22))
        .margin(20)
        .x_label_area_size(56)
        .y_label_area_size(64)
        .build_cartesian_2d(0f64..1f64, 0f64..1f64)?;
    chart
        .configure_mesh()
        .x_desc("mean predicted value in the bin")
        .y_desc("share of the bin's steps labelled right")
        .light_line_style(RGBColor(242, 242, 242))
        .label_style((FAMILY, 15))
        .axis_desc_style((FAMILY, 17))
        .draw()?;
    chart
        .draw_series(LineSeries::new(
            [(0.0, 0.0), (1.0, 1.0)],
            RGBColor(150, 150, 150).stroke_width(1),
        ))?
        .label("perfect calibration")
        .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 24, y)], RGBColor(150, 150, 150)));
    let colour = COLOURS[1];
    chart
        .draw_series(LineSeries::new(
            bins.iter().map(|b| (b.0, b.1)),
            colour.stroke_width(2),
        ))?
        .label("held-out steps (point area: count)")
        .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 24, y)], colour.stroke_width(3)));
    let most = bins.iter().map(|b| b.2).max().unwrap_or(1).max(1) as f64;
    chart.draw_series(bins.iter().map(|b| {
        let r = 3.0 + 12.0 * (b.2 as f64 / most).sqrt();
        Circle::new((b.0, b.1), r as i32, colour.mix(0.7).filled())
    }))?;
    legend_and_present(&mut chart, &root)
}

/// One strategy's points: (x, accuracy %, CI low %, CI high %), by budget.
type Line = (String, Vec<(f64, f64, f64, f64)>);

fn lines(rows: &[Row], axis: Axis) -> Vec<Line> {
    let mut lines: Vec<Line> = Vec::new();
    for row in rows {
        let point = (
            axis.value(row).max(1.0),
            100.0 * row.accuracy(),
            100.0 * row.ci.0,
            100.0 * row.ci.1,
        );
        let name = if row.derived > 0 {
            format!("{} (from samples)", row.strategy)
        } else {
            row.strategy.clone()
        };
        match lines.last_mut() {
            Some((last, points)) if *last == name => points.push(point),
            _ => lines.push((name, vec![point])),
        }
    }
    for (_, points) in &mut lines {
        points.sort_by(|a, b| a.0.total_cmp(&b.0));
    }
    lines
}

/// Round tick values for a log axis over `lo..hi`: the coarsest series of "nice" mantissas
/// (1-2-5, then finer) that puts at least four ticks in the range.
fn ticks(lo: f64, hi: f64) -> Vec<f64> {
    const SERIES: [&[f64]; 3] = [
        &[1.0, 2.0, 5.0],
        &[1.0, 1.5, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0],
        &[
            1.0, 1.25, 1.5, 1.75, 2.0, 2.5, 3.0, 3.5, 4.0, 4.5, 5.0, 6.0, 7.0, 8.0, 9.0,
        ],
    ];
    let mut best = Vec::new();
    for mantissas in SERIES {
        best = (lo.log10().floor() as i32..=hi.log10().ceil() as i32)
            .flat_map(|e| mantissas.iter().map(move |m| m * 10f64.powi(e)))
            .filter(|&t| t >= lo && t <= hi)
            .collect();
        if best.len() >= 4 {
            break;
        }
    }
    best
}

fn draw<DB: DrawingBackend>(
    root: DrawingArea<DB, Shift>,
    rows: &[Row],
    axis: Axis,
) -> Result<(), DrawingAreaErrorKind<DB::ErrorType>> {
    root.fill(&WHITE)?;
    let lines = lines(rows, axis);
    let xs = lines.iter().flat_map(|(_, p)| p.iter().map(|q| q.0));
    let (lo, hi) = xs.fold((f64::INFINITY, 0.0f64), |(lo, hi), x| {
        (lo.min(x), hi.max(x))
    });
    let (lo, hi) = if lo.is_finite() {
        (lo / 1.3, hi * 1.3)
    } else {
        (1.0, 10.0)
    };
    let n: u64 = rows.iter().map(|r| r.n).max().unwrap_or(0);
    let title = format!("Accuracy against compute ({n} questions; bars: 95% Wilson CI)");
    let mut chart = ChartBuilder::on(&root)
        .caption(title, (FAMILY, 24))
        .margin(20)
        .x_label_area_size(56)
        .y_label_area_size(64)
        .build_cartesian_2d(
            (lo..hi).log_scale().with_key_points(ticks(lo, hi)),
            0f64..100f64,
        )?;
    chart
        .configure_mesh()
        .x_desc(axis.label())
        .y_desc("accuracy (%)")
        .x_label_formatter(&|x| format!("{x}"))
        .y_label_formatter(&|y| format!("{y:.0}"))
        .light_line_style(RGBColor(242, 242, 242))
        .label_style((FAMILY, 15))
        .axis_desc_style((FAMILY, 17))
        .draw()?;
    for (i, (name, points)) in lines.iter().enumerate() {
        let colour = COLOURS[i % COLOURS.len()];
        chart
            .draw_series(LineSeries::new(
                points.iter().map(|p| (p.0, p.1)),
                colour.stroke_width(2),
            ))?
            .label(name)
            .legend(move |(x, y)| {
                PathElement::new(vec![(x, y), (x + 24, y)], colour.stroke_width(3))
            });
        chart.draw_series(
            points
                .iter()
                .map(|p| Circle::new((p.0, p.1), 4, colour.filled())),
        )?;
        chart.draw_series(points.iter().map(|p| {
            PathElement::new(
                vec![(p.0, p.2), (p.0, p.3)],
                colour.mix(0.6).stroke_width(1),
            )
        }))?;
    }
    legend_and_present(&mut chart, &root)
}

/// Draws the legend in the upper left corner and writes the plot out.
fn legend_and_present<'a, DB: DrawingBackend + 'a, CT: plotters::coord::CoordTranslate>(
    chart: &mut ChartContext<'a, DB, CT>,
    root: &DrawingArea<DB, Shift>,
) -> Result<(), DrawingAreaErrorKind<DB::ErrorType>> {
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::UpperLeft)
        .label_font((FAMILY, 15))
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK)
        .draw()?;
    root.present()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn log_ticks_are_round_and_inside_the_range() {
        // 1-2-5 gives four ticks here.
        assert_eq!(ticks(90.0, 1100.0), vec![100.0, 200.0, 500.0, 1000.0]);
        // Too few: the next finer series.
        assert_eq!(
            ticks(150.0, 1400.0),
            vec![150.0, 200.0, 300.0, 400.0, 500.0, 600.0, 700.0, 800.0, 1000.0]
        );
        assert_eq!(ticks(155.0, 356.0), vec![175.0, 200.0, 250.0, 300.0, 350.0]);
    }
}
