//! The example's figures, drawn with plotters as PNG and SVG: log-log line charts with one
//! series per parametrisation, width or activation.

use std::path::Path;

use plotters::coord::Shift;
use plotters::prelude::*;

/// One line of a chart.
pub struct Series {
    pub label: String,
    pub points: Vec<(f64, f64)>,
}

/// How a panel's y axis spans its data.
// Both examples draw with this file, each with some of the axes.
#[allow(dead_code)]
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum YAxis {
    /// Logarithmic, spanning the data.
    Log,
    /// Linear from zero, so that a small quantity looks small.
    Linear,
    /// Linear, spanning the data: for differences that matter within a narrow band (losses
    /// of one task).
    Fitted,
}

/// One panel: title, axis labels, series, and the y axis.
pub struct Panel {
    pub title: String,
    pub x_label: String,
    pub y_label: String,
    pub series: Vec<Series>,
    pub y_axis: YAxis,
    /// Base of the logarithmic x axis: 2 for widths and learning rates, 10 for batch sizes.
    pub x_base: f64,
}

/// A tick label with at most three significant digits and no float noise (0.3, 1, 2048).
fn tick(value: &f64) -> String {
    if *value == 0.0 {
        return "0".into();
    }
    let digits = (2 - value.abs().log10().floor() as i32).max(0) as usize;
    let text = format!("{value:.digits$}");
    if text.contains('.') {
        text.trim_end_matches('0').trim_end_matches('.').to_string()
    } else {
        text
    }
}

const FONT: &[u8] = include_bytes!("fonts/DejaVuSans.ttf");
const COLORS: [RGBColor; 6] = [
    RGBColor(31, 119, 180),
    RGBColor(255, 127, 14),
    RGBColor(44, 160, 44),
    RGBColor(214, 39, 40),
    RGBColor(148, 103, 189),
    RGBColor(140, 86, 75),
];

/// Registers the embedded font (plotters' `ab_glyph` text backend needs one).
pub fn init_font() -> Result<(), String> {
    plotters::style::register_font("sans-serif", FontStyle::Normal, FONT)
        .map_err(|_| "the embedded font is not a valid TTF".to_string())
}

/// Writes `<stem>.png` and `<stem>.svg` in `dir`, with the panels side by side.
pub fn save(dir: &Path, stem: &str, panels: &[Panel]) -> Result<(), String> {
    let size = (520 * panels.len() as u32, 420);
    let png = dir.join(format!("{stem}.png"));
    let svg = dir.join(format!("{stem}.svg"));
    draw(BitMapBackend::new(&png, size).into_drawing_area(), panels)
        .map_err(|e| format!("{}: {e}", png.display()))?;
    draw(SVGBackend::new(&svg, size).into_drawing_area(), panels)
        .map_err(|e| format!("{}: {e}", svg.display()))?;
    Ok(())
}

fn range(values: impl Iterator<Item = f64>, axis: YAxis) -> (f64, f64) {
    let (mut low, mut high) = (f64::INFINITY, f64::NEG_INFINITY);
    for v in values.filter(|v| v.is_finite() && (axis != YAxis::Log || *v > 0.0)) {
        low = low.min(v);
        high = high.max(v);
    }
    if !low.is_finite() {
        return (1.0, 2.0);
    }
    match axis {
        YAxis::Log => (low / 1.3, high * 1.3),
        YAxis::Linear => (0.0, high * 1.1),
        YAxis::Fitted => {
            let margin = ((high - low) * 0.08).max(high.abs() * 1e-3);
            (low - margin, high + margin)
        }
    }
}

fn draw<DB: DrawingBackend>(
    root: DrawingArea<DB, Shift>,
    panels: &[Panel],
) -> Result<(), Box<dyn std::error::Error>>
where
    DB::ErrorType: 'static,
{
    root.fill(&WHITE)?;
    let areas = root.split_evenly((1, panels.len()));
    for (area, panel) in areas.iter().zip(panels) {
        let xs = range(
            panel
                .series
                .iter()
                .flat_map(|s| s.points.iter().map(|p| p.0)),
            YAxis::Log,
        );
        let ys = range(
            panel
                .series
                .iter()
                .flat_map(|s| s.points.iter().map(|p| p.1)),
            panel.y_axis,
        );
        let mut builder = ChartBuilder::on(area);
        builder
            .caption(&panel.title, ("sans-serif", 18))
            .margin(12)
            .x_label_area_size(40)
            .y_label_area_size(60);
        let visible = |p: &(f64, f64)| {
            p.0 > 0.0 && p.1.is_finite() && (panel.y_axis != YAxis::Log || p.1 > 0.0)
        };
        macro_rules! body {
            ($chart:expr) => {{
                let mut chart = $chart;
                chart
                    .configure_mesh()
                    .x_desc(panel.x_label.as_str())
                    .y_desc(panel.y_label.as_str())
                    .label_style(("sans-serif", 13))
                    .light_line_style(RGBColor(238, 238, 238))
                    .x_labels(8)
                    .y_labels(8)
                    .x_label_formatter(&tick)
                    .y_label_formatter(&tick)
                    .draw()?;
                for (k, series) in panel.series.iter().enumerate() {
                    let color = COLORS[k % COLORS.len()];
                    let points: Vec<(f64, f64)> =
                        series.points.iter().copied().filter(visible).collect();
                    chart
                        .draw_series(LineSeries::new(points.clone(), color.stroke_width(2)))?
                        .label(series.label.as_str())
                        .legend(move |(x, y)| {
                            PathElement::new(vec![(x, y), (x + 18, y)], color.stroke_width(2))
                        });
                    chart.draw_series(points.iter().map(|&p| Circle::new(p, 3, color.filled())))?;
                }
                chart
                    .configure_series_labels()
                    .background_style(WHITE.mix(0.85))
                    .border_style(BLACK.mix(0.3))
                    .label_font(("sans-serif", 13))
                    // A fitted axis puts the data's extremes at the bottom corners.
                    .position(if panel.y_axis == YAxis::Fitted {
                        SeriesLabelPosition::UpperMiddle
                    } else {
                        SeriesLabelPosition::LowerLeft
                    })
                    .draw()?;
            }};
        }
        let x_axis = (xs.0..xs.1).log_scale().base(panel.x_base);
        if panel.y_axis == YAxis::Log {
            body!(builder.build_cartesian_2d(x_axis, (ys.0..ys.1).log_scale())?);
        } else {
            body!(builder.build_cartesian_2d(x_axis, ys.0..ys.1)?);
        }
    }
    root.present()?;
    Ok(())
}
