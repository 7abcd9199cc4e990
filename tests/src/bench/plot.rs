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

/// One line of a panel: label, colour, points (N, value, sd).
struct Series {
    label: String,
    color: RGBColor,
    points: Vec<Point>,
}

const CHURN_COLOR: RGBColor = RGBColor(86, 180, 233);
const WIDE_COLOR: RGBColor = RGBColor(204, 121, 167);

/// A number for an axis label: few digits, no exponent.
fn tick(x: f64) -> String {
    if x == 0.0 {
        "0".into()
    } else if x >= 100.0 {
        format!("{x:.0}")
    } else if x >= 1.0 {
        format!("{x:.1}")
    } else if x >= 0.01 {
        format!("{x:.2}")
    } else {
        format!("{x:.4}")
    }
}

/// Draws one panel: every series against N (log scale). With `log_y` the values are
/// drawn as log10 on a linear axis labelled with the values themselves, so one code
/// path serves both kinds of axis.
fn panel(
    area: &DrawingArea<SVGBackend<'_>, plotters::coord::Shift>,
    title: &str,
    y_desc: &str,
    log_y: bool,
    max_n: f64,
    series: &[Series],
) -> Result<()> {
    let e = |x: &dyn std::fmt::Display| anyhow!("plot panel {title}: {x}");
    let tf = |y: f64| if log_y { y.max(1e-9).log10() } else { y };
    let all: Vec<f64> = series
        .iter()
        .flat_map(|s| s.points.iter().map(|(_, y, sd)| y + sd))
        .filter(|y| !log_y || *y > 0.0)
        .collect();
    let (y_lo, y_hi) = if log_y {
        let lo = series
            .iter()
            .flat_map(|s| s.points.iter().map(|(_, y, _)| *y))
            .filter(|y| *y > 0.0)
            .fold(f64::INFINITY, f64::min);
        let hi = all.iter().copied().fold(f64::NEG_INFINITY, f64::max);
        if lo.is_finite() && hi.is_finite() {
            (tf(lo) - 0.3, tf(hi) + 0.3)
        } else {
            (0.0, 1.0)
        }
    } else {
        (0.0, all.iter().copied().fold(1.0f64, f64::max) * 1.15)
    };
    let mut chart = ChartBuilder::on(area)
        .caption(title, ("sans-serif", 16))
        .margin(10)
        .x_label_area_size(36)
        .y_label_area_size(64)
        .build_cartesian_2d((0.5f64..max_n * 2.0).log_scale(), y_lo..y_hi)
        .map_err(|x| e(&x))?;
    chart
        .configure_mesh()
        .x_desc("Services (N)")
        .y_desc(y_desc)
        .x_label_formatter(&|x| format!("{x:.0}"))
        .y_label_formatter(&|y| {
            if log_y {
                tick(10f64.powf(*y))
            } else {
                tick(*y)
            }
        })
        .draw()
        .map_err(|x| e(&x))?;
    let mut any = false;
    for s in series {
        let pts: Vec<Point> = s
            .points
            .iter()
            .filter(|(_, y, _)| !log_y || *y > 0.0)
            .copied()
            .collect();
        if pts.is_empty() {
            continue;
        }
        any = true;
        let c = s.color;
        chart
            .draw_series(LineSeries::new(
                pts.iter().map(|(x, y, _)| (*x, tf(*y))),
                c.stroke_width(2),
            ))
            .map_err(|x| e(&x))?
            .label(s.label.as_str())
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 18, y)], c.stroke_width(2)));
        chart
            .draw_series(
                pts.iter()
                    .map(|(x, y, _)| Circle::new((*x, tf(*y)), 3, c.filled())),
            )
            .map_err(|x| e(&x))?;
        chart
            .draw_series(pts.iter().filter(|(_, _, sd)| *sd > 0.0).map(|(x, y, sd)| {
                PathElement::new(
                    vec![(*x, tf((y - sd).max(y / 10.0))), (*x, tf(y + sd))],
                    c.stroke_width(1),
                )
            }))
            .map_err(|x| e(&x))?;
    }
    if any {
        chart
            .configure_series_labels()
            .position(SeriesLabelPosition::LowerLeft)
            .background_style(WHITE.mix(0.85))
            .border_style(BLACK)
            .label_font(("sans-serif", 11))
            .draw()
            .map_err(|x| e(&x))?;
    }
    Ok(())
}

fn summary_point(n: usize, v: &[f64]) -> Option<Point> {
    let s = stats::summarize(v)?;
    Some((n.max(1) as f64, s.mean, if s.n > 1 { s.sd } else { 0.0 }))
}

/// Every metric against N, one panel each, for every mode that has it: the five rates,
/// full sync time, propagation p99 (svc-lb also under churn), agent memory and BPF map
/// memory, and the socket programs' cost per call. Wide points (more endpoints per
/// Service) are series of their own. The external path is measured once, not against
/// N, so it is in the report's table only.
pub fn metrics_svg(r: &Results, path: &Path) -> Result<()> {
    use super::results::DEFAULT_EPS;
    let root = SVGBackend::new(path, (1500, 1320)).into_drawing_area();
    let e = |e: &dyn std::fmt::Display| anyhow!("plot {}: {e}", path.display());
    root.fill(&WHITE).map_err(|x| e(&x))?;
    let panels = root.split_evenly((3, 3));
    let max_n = r
        .points()
        .into_iter()
        .map(|(n, _)| n)
        .max()
        .unwrap_or(1)
        .max(10) as f64;
    let mode_series = |f: &dyn Fn(Mode) -> Vec<Point>| -> Vec<Series> {
        Mode::ALL
            .into_iter()
            .map(|m| Series {
                label: m.name().into(),
                color: color(m),
                points: f(m),
            })
            .collect()
    };
    let mut specs: Vec<(String, &str, bool, Vec<Series>)> = Vec::new();
    for metric in [
        Metric::TcpVip,
        Metric::TcpVipSingle,
        Metric::TcpNonService,
        Metric::TcpHot,
        Metric::UdpVip,
    ] {
        specs.push((
            metric.short().into(),
            metric.unit(),
            false,
            mode_series(&|m| points(r, metric, m)),
        ));
    }
    let wide_label = |eps: usize| format!("svc-lb, {eps} endpoints/Service");
    // Full sync.
    let mut sync = mode_series(&|m| {
        r.scales()
            .into_iter()
            .filter_map(|n| {
                let c = r.sync(n, m)?;
                c.outcome.is_loaded().then_some(())?;
                summary_point(n, &c.samples_s)
            })
            .collect()
    });
    for (n, eps) in &r.meta.settings.wide {
        if let Some(p) = r
            .sync_eps(*n, *eps, Mode::SvcLb)
            .filter(|c| c.outcome.is_loaded())
            .and_then(|c| summary_point(*n, &c.samples_s))
        {
            sync.push(Series {
                label: wide_label(*eps),
                color: WIDE_COLOR,
                points: vec![p],
            });
        }
    }
    specs.push(("Full sync time (log)".into(), "seconds", true, sync));
    // Propagation p99.
    let p99 = |c: &super::results::PropCell, n: usize| {
        stats::percentile(&c.samples_ms, 99.0).map(|v| (n.max(1) as f64, v, 0.0))
    };
    let mut prop = mode_series(&|m| {
        r.scales()
            .into_iter()
            .filter_map(|n| p99(r.prop(n, m)?, n))
            .collect()
    });
    prop.push(Series {
        label: format!("svc-lb, churn {}/s", r.meta.settings.churn_hz),
        color: CHURN_COLOR,
        points: r
            .scales()
            .into_iter()
            .filter_map(|n| p99(r.prop_at(n, DEFAULT_EPS, Mode::SvcLb, true)?, n))
            .collect(),
    });
    for (n, eps) in &r.meta.settings.wide {
        if let Some(p) = r
            .prop_at(*n, *eps, Mode::SvcLb, false)
            .and_then(|c| p99(c, *n))
        {
            prop.push(Series {
                label: wide_label(*eps),
                color: WIDE_COLOR,
                points: vec![p],
            });
        }
    }
    specs.push((
        "Endpoint change propagation p99 (log)".into(),
        "milliseconds",
        true,
        prop,
    ));
    // Memory.
    let mem = |eps: usize, f: &dyn Fn(&super::results::MemCell) -> Vec<f64>| -> Vec<Point> {
        r.memory
            .iter()
            .filter(|m| m.eps == eps)
            .filter_map(|m| summary_point(m.n, &f(m)))
            .collect()
    };
    let rss = |m: &super::results::MemCell| -> Vec<f64> {
        m.rss_kib.iter().map(|k| *k as f64 / 1024.0).collect()
    };
    let maps = |m: &super::results::MemCell| -> Vec<f64> {
        m.map_kib.iter().map(|k| *k as f64 / 1024.0).collect()
    };
    let mut memory = vec![
        Series {
            label: "svc-lb agent VmRSS".into(),
            color: color(Mode::SvcLb),
            points: mem(DEFAULT_EPS, &rss),
        },
        Series {
            label: "svc-lb BPF maps (memlock)".into(),
            color: RGBColor(0, 0, 0),
            points: mem(DEFAULT_EPS, &maps),
        },
    ];
    let mut wide_eps: Vec<usize> = r.meta.settings.wide.iter().map(|(_, e)| *e).collect();
    wide_eps.dedup();
    for eps in wide_eps {
        memory.push(Series {
            label: format!("VmRSS, {eps} endpoints/Service"),
            color: WIDE_COLOR,
            points: mem(eps, &rss),
        });
    }
    specs.push(("Memory (log)".into(), "MiB", true, memory));
    // BPF per call.
    let mut progs: Vec<(String, String)> = r
        .bpf
        .iter()
        .map(|b| (b.window.clone(), b.program.clone()))
        .collect();
    progs.sort();
    progs.dedup();
    let palette = [
        color(Mode::SvcLb),
        CHURN_COLOR,
        RGBColor(230, 159, 0),
        RGBColor(0, 158, 115),
        WIDE_COLOR,
    ];
    let bpf: Vec<Series> = progs
        .iter()
        .enumerate()
        .map(|(i, (window, program))| Series {
            label: format!("{} ({window})", program.trim_start_matches("svclb_")),
            color: palette[i % palette.len()],
            points: r
                .bpf
                .iter()
                .filter(|b| &b.window == window && &b.program == program)
                .filter_map(|b| Some((b.n.max(1) as f64, b.ns_per_call()?, 0.0)))
                .collect(),
        })
        .collect();
    specs.push((
        "svc-lb socket programs, ns per call".into(),
        "ns",
        false,
        bpf,
    ));
    for (area, (title, unit, log_y, series)) in panels.iter().zip(&specs) {
        panel(area, title, unit, *log_y, max_n, series)?;
    }
    root.present().map_err(|x| e(&x))?;
    Ok(())
}
