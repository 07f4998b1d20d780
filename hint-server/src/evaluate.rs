//! `tokenflow-hint-server evaluate`: every model scored on a recorded trace, split by time, and
//! every controller run on the plant simulation — written as JSON and an SVG plot.

use std::path::Path;

use anyhow::{Context, Result};
use plotters::prelude::*;
use serde::Serialize;
use tokenflow_schema::ControllerKind;

use crate::{
    control::{Limits, sim},
    forecast::{ModelScore, Rows, compare},
    metrics::{auroc, average_precision},
    model::{HORIZONS, Models},
    trace::Trace,
};

pub const TEST_FRACTION: f64 = 0.3;

#[derive(Clone, Debug, Serialize)]
pub struct AnomalyReport {
    pub auroc: f64,
    pub auprc: f64,
    /// Share of anomalous windows in the held-out part (AUPRC of a random score).
    pub prevalence: f64,
    pub test_windows: usize,
    pub baseline_windows: usize,
}

#[derive(Clone, Debug, Serialize)]
pub struct HorizonReport {
    pub horizon_windows: usize,
    pub models: Vec<ModelScore>,
    /// (persistence − gbdt) / persistence.
    pub gbdt_gain_vs_persistence: f64,
    pub gbdt_gain_vs_ewma: f64,
    pub train_rows: usize,
    pub test_rows: usize,
}

#[derive(Clone, Debug, Serialize)]
pub struct Report {
    pub trace: String,
    pub windows: usize,
    pub split: String,
    pub anomaly: AnomalyReport,
    pub forecast: Vec<HorizonReport>,
    /// The default plant: 20 → 5 → 20 Mbit/s with cross traffic wandering ±1 %/s.
    pub controllers: Vec<sim::SimFigures>,
    /// The same plant with constant cross traffic: what the controllers do without noise.
    pub controllers_quiet: Vec<sim::SimFigures>,
    pub targets: Vec<Target>,
}

#[derive(Clone, Debug, Serialize)]
pub struct Target {
    pub name: String,
    /// `null` when the figure never occurred (a controller that never settled).
    pub value: Option<f64>,
    pub target: String,
    pub met: bool,
}

/// Scores of the held-out windows and what is needed to plot them.
pub struct Evaluation {
    pub report: Report,
    /// The Isolation Forest's inputs, for the scikit-learn cross-check: (held out?, anomalous?, x).
    pub anomaly_rows: Vec<(bool, bool, Vec<f64>)>,
    pub test_anomaly_scores: Vec<f64>,
    pub test_labels: Vec<bool>,
    pub h1_truth: Vec<f64>,
    pub h1_gbdt: Vec<f64>,
    pub h1_persistence: Vec<f64>,
}

pub fn evaluate(trace_path: &Path, seed: u64) -> Result<Evaluation> {
    let trace = Trace::load(trace_path)?;
    anyhow::ensure!(
        trace.len() >= 100,
        "{} windows are too few to evaluate on",
        trace.len()
    );
    let cut = trace.split_at(TEST_FRACTION);
    let (train, test) = (&trace.features[..cut], &trace.features[cut..]);
    // The Isolation Forest learns normal from the training part's normal windows only.
    let baseline: Vec<bool> = trace.anomalous[..cut].iter().map(|a| !a).collect();
    let models = Models::train(train, &baseline, seed, 0)?;
    let scores: Vec<f64> = test.iter().map(|f| models.anomaly(f)).collect();
    let labels = trace.anomalous[cut..].to_vec();
    let anomaly = AnomalyReport {
        auroc: auroc(&scores, &labels)
            .context("the held-out part needs both normal and anomalous windows")?,
        auprc: average_precision(&scores, &labels).context("no anomalous window held out")?,
        prevalence: labels.iter().filter(|l| **l).count() as f64 / labels.len().max(1) as f64,
        test_windows: labels.len(),
        baseline_windows: models.baseline_rows,
    };
    let mut forecast = Vec::new();
    let mut h1 = (Vec::new(), Vec::new(), Vec::new());
    for h in HORIZONS {
        let (tr, te) = (Rows::build(train, h), Rows::build(test, h));
        let (models, gbdt) = compare(&tr, &te, seed)?;
        let get = |n: &str| {
            models
                .iter()
                .find(|m| m.model == n)
                .map_or(f64::NAN, |m| m.mae_ms)
        };
        let g = get("gbdt");
        forecast.push(HorizonReport {
            horizon_windows: h,
            gbdt_gain_vs_persistence: (get("persistence") - g) / get("persistence"),
            gbdt_gain_vs_ewma: (get("ewma") - g) / get("ewma"),
            models,
            train_rows: tr.len(),
            test_rows: te.len(),
        });
        if h == 1 {
            h1 = (te.y.clone(), gbdt, te.now.clone());
        }
    }
    let plant = sim::Plant::default();
    let quiet = sim::Plant {
        cross_walk: 0.0,
        ..sim::Plant::default()
    };
    let limits = Limits {
        setpoint_ms: 50.0,
        min_rps: 0.5,
        max_rps: 50.0,
        max_concurrency: 64,
    };
    let run_all = |plant: &sim::Plant| -> Vec<sim::SimFigures> {
        [
            ControllerKind::Pid,
            ControllerKind::Sigmoid,
            ControllerKind::Gradient2,
            ControllerKind::Aimd,
        ]
        .into_iter()
        .map(|k| {
            sim::figures(
                k,
                plant,
                limits.setpoint_ms,
                &sim::simulate(k, plant, limits, seed),
            )
        })
        .collect()
    };
    let controllers = run_all(&plant);
    let controllers_quiet = run_all(&quiet);
    let mut targets = vec![
        target(
            "anomaly.auroc",
            anomaly.auroc,
            "≥ 0.95",
            anomaly.auroc >= 0.95,
        ),
        target(
            "anomaly.auprc",
            anomaly.auprc,
            "≥ 0.5",
            anomaly.auprc >= 0.5,
        ),
    ];
    for f in &forecast {
        let h = f.horizon_windows;
        targets.push(target(
            &format!("forecast.h{h}.gain_vs_persistence"),
            f.gbdt_gain_vs_persistence,
            "≥ 0.20",
            f.gbdt_gain_vs_persistence >= 0.2,
        ));
        targets.push(target(
            &format!("forecast.h{h}.gain_vs_ewma"),
            f.gbdt_gain_vs_ewma,
            "> 0",
            f.gbdt_gain_vs_ewma > 0.0,
        ));
    }
    // The step response is judged twice: on the plant with cross traffic wandering (the noise a
    // real link has) and on a quiet link (the controller's own transient, as step-response
    // figures are usually given).
    for (plant_name, runs) in [("noisy", &controllers), ("quiet", &controllers_quiet)] {
        let Some(pid) = runs.iter().find(|c| c.controller == "pid") else {
            continue;
        };
        let worst_settle = pid
            .settle_periods
            .iter()
            .map(|s| s.map_or(f64::INFINITY, |v| v as f64))
            .fold(0.0, f64::max);
        let prefix = if plant_name == "noisy" {
            "pid".to_string()
        } else {
            format!("pid.{plant_name}")
        };
        targets.push(target(
            &format!("{prefix}.settle_periods_worst"),
            worst_settle,
            "≤ 5",
            worst_settle <= 5.0,
        ));
        targets.push(target(
            &format!("{prefix}.overshoot"),
            pid.overshoot,
            "≤ 0.20",
            pid.overshoot <= 0.2,
        ));
        targets.push(target(
            &format!("{prefix}.steady_in_band"),
            pid.steady_in_band,
            "≥ 0.95 (p95 within ±20 % of the setpoint)",
            pid.steady_in_band >= 0.95,
        ));
    }
    let anomaly_rows = trace
        .features
        .iter()
        .zip(&trace.anomalous)
        .enumerate()
        .map(|(i, (f, a))| (i >= cut, *a, f.anomaly_vector()))
        .collect();
    Ok(Evaluation {
        anomaly_rows,
        report: Report {
            trace: trace_path.display().to_string(),
            windows: trace.len(),
            split: format!(
                "first {:.0} % of windows by time for training, last {:.0} % held out",
                (1.0 - TEST_FRACTION) * 100.0,
                TEST_FRACTION * 100.0
            ),
            anomaly,
            forecast,
            controllers,
            controllers_quiet,
            targets,
        },
        test_anomaly_scores: scores,
        test_labels: labels,
        h1_truth: h1.0,
        h1_gbdt: h1.1,
        h1_persistence: h1.2,
    })
}

fn target(name: &str, value: f64, target: &str, met: bool) -> Target {
    Target {
        name: name.into(),
        value: value.is_finite().then_some(value),
        target: target.into(),
        met,
    }
}

/// Writes `report.json`, `report.svg` and `anomaly_rows.csv` (the Isolation Forest's inputs, for
/// `hint-server/fixtures/sklearn_iforest.py`) into `dir`.
pub fn write(e: &Evaluation, dir: &Path) -> Result<()> {
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    std::fs::write(
        dir.join("report.json"),
        serde_json::to_vec_pretty(&e.report)?,
    )?;
    let mut csv = String::from("held_out,anomalous");
    for &i in &crate::features::ANOMALY_FEATURES {
        csv.push(',');
        csv.push_str(crate::features::FEATURE_NAMES[i]);
    }
    csv.push('\n');
    for (held_out, anomalous, x) in &e.anomaly_rows {
        csv.push_str(&format!("{},{}", u8::from(*held_out), u8::from(*anomalous)));
        for v in x {
            csv.push_str(&format!(",{v}"));
        }
        csv.push('\n');
    }
    std::fs::write(dir.join("anomaly_rows.csv"), csv)?;
    plot(e, &dir.join("report.svg")).context("drawing the plot")?;
    Ok(())
}

fn plot(e: &Evaluation, path: &Path) -> Result<()> {
    let root = SVGBackend::new(path, (1100, 800)).into_drawing_area();
    root.fill(&WHITE)?;
    let (top, bottom) = root.split_vertically(400);
    let n = e.h1_truth.len();
    let ymax = e
        .h1_truth
        .iter()
        .chain(&e.h1_gbdt)
        .copied()
        .fold(10.0, f64::max)
        * 1.05;
    let mut c = ChartBuilder::on(&top)
        .caption(
            "p95 RTT one window ahead, held-out part",
            ("sans-serif", 20),
        )
        .margin(10)
        .x_label_area_size(30)
        .y_label_area_size(50)
        .build_cartesian_2d(0..n, 0.0..ymax)?;
    c.configure_mesh()
        .x_desc("held-out window")
        .y_desc("ms")
        .draw()?;
    c.draw_series(LineSeries::new(
        e.h1_truth.iter().copied().enumerate(),
        &BLACK,
    ))?
    .label("observed")
    .legend(|(x, y)| PathElement::new([(x, y), (x + 20, y)], BLACK));
    c.draw_series(LineSeries::new(
        e.h1_persistence.iter().copied().enumerate(),
        &BLUE.mix(0.5),
    ))?
    .label("persistence")
    .legend(|(x, y)| PathElement::new([(x, y), (x + 20, y)], BLUE));
    c.draw_series(LineSeries::new(e.h1_gbdt.iter().copied().enumerate(), &RED))?
        .label("GBDT")
        .legend(|(x, y)| PathElement::new([(x, y), (x + 20, y)], RED));
    c.configure_series_labels()
        .border_style(BLACK)
        .background_style(WHITE.mix(0.8))
        .draw()?;

    let m = e.test_anomaly_scores.len();
    let mut c = ChartBuilder::on(&bottom)
        .caption(
            "Isolation Forest score, held-out windows (red: loss or bloat injected)",
            ("sans-serif", 20),
        )
        .margin(10)
        .x_label_area_size(30)
        .y_label_area_size(50)
        .build_cartesian_2d(0..m, 0.3..0.9)?;
    c.configure_mesh()
        .x_desc("held-out window")
        .y_desc("score")
        .draw()?;
    c.draw_series(
        e.test_anomaly_scores
            .iter()
            .zip(&e.test_labels)
            .enumerate()
            .map(|(i, (s, l))| {
                Circle::new((i, *s), 3, if *l { RED.filled() } else { BLUE.filled() })
            }),
    )?;
    root.present()?;
    Ok(())
}
