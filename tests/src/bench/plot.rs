//! The connection-rate plot: rate against N (log scale) for every mode, through the VIP
//! and to a non-Service destination, with ±1 sd bars. SVG, so no font files are needed:
//! text is left to the viewer.
use std::path::Path;

use anyhow::{Result, anyhow};
use plotters::prelude::*;

use super::{
    results::{Metric, Mode, Results},
    stats,
};

fn color(mode: Mode) -> RGBColor {
    match mode {
        Mode::Direct => RGBColor(90, 90, 90),
        Mode::SvcLb => RGBColor(0, 114, 178),
        Mode::Iptables => RGBColor(213, 94, 0),
        Mode::Nftables => RGBColor(0, 158, 115),
    }
}

/// Points (N, mean, sd) of one mode and metric, skipping scales it did not load.
/// (N, mean, sd).
type Point = (f64, f64, f64);

fn points(r: &Results, metric: Metric, mode: Mode) -> Vec<Point> {
    r.scales()
        .into_iter()
        .filter_map(|n| {
            let s = stats::summarize(&r.rate(metric, n, mode)?.samples)?;
            Some((n.max(1) as f64, s.mean, s.sd))
        })
        .collect()
}

pub fn conn_rate_svg(r: &Results, path: &Path) -> Result<()> {
    let root = SVGBackend::new(path, (1100, 460)).into_drawing_area();
    let e = |e: &dyn std::fmt::Display| anyhow!("plot {}: {e}", path.display());
    root.fill(&WHITE).map_err(|x| e(&x))?;
    let panels = root.split_evenly((1, 2));
    let max_n = r.scales().into_iter().max().unwrap_or(1).max(10) as f64;
    for (area, metric) in panels.iter().zip([Metric::TcpVip, Metric::TcpNonService]) {
        let series: Vec<(Mode, Vec<Point>)> = Mode::ALL
            .into_iter()
            .map(|m| (m, points(r, metric, m)))
            .collect();
        let y_max = series
            .iter()
            .flat_map(|(_, p)| p.iter().map(|(_, m, sd)| m + sd))
            .fold(1.0f64, f64::max)
            * 1.15;
        let title = match metric {
            Metric::TcpVip => "TCP conn/s through the VIP",
            _ => "TCP conn/s to a non-Service address",
        };
        let mut chart = ChartBuilder::on(area)
            .caption(title, ("sans-serif", 18))
            .margin(12)
            .x_label_area_size(40)
            .y_label_area_size(70)
            .build_cartesian_2d((0.5f64..max_n * 2.0).log_scale(), 0f64..y_max)
            .map_err(|x| e(&x))?;
        chart
            .configure_mesh()
            .x_desc("Services (N)")
            .y_desc("connections per second")
            .x_label_formatter(&|x| format!("{x:.0}"))
            .y_label_formatter(&|y| format!("{y:.0}"))
            .draw()
            .map_err(|x| e(&x))?;
        for (mode, pts) in &series {
            if pts.is_empty() {
                continue;
            }
            let c = color(*mode);
            chart
                .draw_series(LineSeries::new(
                    pts.iter().map(|(x, y, _)| (*x, *y)),
                    c.stroke_width(2),
                ))
                .map_err(|x| e(&x))?
                .label(mode.name())
                .legend(move |(x, y)| {
                    PathElement::new(vec![(x, y), (x + 18, y)], c.stroke_width(2))
                });
            chart
                .draw_series(
                    pts.iter()
                        .map(|(x, y, _)| Circle::new((*x, *y), 3, c.filled())),
                )
                .map_err(|x| e(&x))?;
            chart
                .draw_series(pts.iter().map(|(x, y, sd)| {
                    PathElement::new(
                        vec![(*x, (y - sd).max(0.0)), (*x, y + sd)],
                        c.stroke_width(1),
                    )
                }))
                .map_err(|x| e(&x))?;
        }
        chart
            .configure_series_labels()
            .position(SeriesLabelPosition::LowerLeft)
            .background_style(WHITE.mix(0.85))
            .border_style(BLACK)
            .draw()
            .map_err(|x| e(&x))?;
    }
    root.present().map_err(|x| e(&x))?;
    Ok(())
}
