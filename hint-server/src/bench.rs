//! `tokenflow-hint-server bench-decision`: the cost of one decision, measured in this (release)
//! binary for `cargo xtask bench`.

use std::{path::Path, time::Instant};

use anyhow::Result;
use tokenflow_schema::{ClientClass, ClientConfig, ControllerKind, trace::TraceLine};

use crate::{
    engine::{NodeState, on_window},
    model::{Models, calm_mask},
    trace::Trace,
};

pub fn decision(trace_path: &Path) -> Result<serde_json::Value> {
    let trace = Trace::load(trace_path)?;
    let calm = calm_mask(&trace.features);
    let t0 = Instant::now();
    let models = Models::train(&trace.features, &calm, 1, 0)?;
    let training_s = t0.elapsed().as_secs_f64();
    let text = std::fs::read_to_string(trace_path)?;
    let mut lines: Vec<TraceLine> = text
        .lines()
        .map(serde_json::from_str)
        .collect::<Result<_, _>>()?;
    lines.sort_by_key(|l| l.window.end_unix_ms);
    let node = lines
        .first()
        .map(|l| l.window.node_id.clone())
        .unwrap_or_default();
    let client = |class| ClientConfig {
        node_id: node.clone(),
        controller: ControllerKind::Pid,
        class,
        weight: 1.0,
        setpoint_ms: 50.0,
        min_rps: 0.5,
        max_rps: 50.0,
        max_concurrency: 64,
        request_cost: 1.0,
        tokens_per_request: 128.0,
    };
    let clients = vec![
        ("interactive".to_string(), client(ClientClass::Interactive)),
        ("batch".to_string(), client(ClientClass::Batch)),
    ];
    let mut us: Vec<f64> = Vec::new();
    for _ in 0..5 {
        let mut st = NodeState::default();
        for l in &lines {
            let t = Instant::now();
            let out = on_window(
                &mut st,
                &l.window,
                &clients,
                Some(&models),
                &Default::default(),
                l.window.end_unix_ms,
                1000,
            );
            us.push(t.elapsed().as_secs_f64() * 1e6);
            std::hint::black_box(out.hints);
        }
    }
    us.sort_by(f64::total_cmp);
    let mean = us.iter().sum::<f64>() / us.len().max(1) as f64;
    let p99 = us
        .get((us.len() as f64 * 0.99) as usize)
        .copied()
        .unwrap_or(f64::NAN);
    Ok(serde_json::json!({
        "windows": lines.len(),
        "decisions": us.len(),
        "decision_us_mean": mean,
        "decision_us_p99": p99,
        "training_s": training_s,
    }))
}
