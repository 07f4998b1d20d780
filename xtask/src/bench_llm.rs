//! Backend and pacer figures for `cargo xtask bench`: the tiny model's tokens/s and TTFT at 1, 4,
//! 16 and 64 concurrent users; the pacer's own cost per request (its gate, timed in-process by
//! the release binary) and the CPU it uses to drive 100 users.

use std::{
    path::Path,
    process::{Command, Stdio},
    time::Duration,
};

use anyhow::{Context, Result, bail};
use serde_json::Value;
use tokenflow_tests::{hint_server::http, redis_server::free_port};

use crate::{
    report::Figure,
    util::{cargo, output, root, run, step},
};

pub fn measure() -> Result<Vec<Figure>> {
    step("bench", "building the backend and the pacer (release)");
    run(cargo().args([
        "build",
        "--release",
        "-p",
        "tokenflow-backend",
        "-p",
        "tokenflow-pacer",
    ]))?;
    let backend = root().join("target/release/tokenflow-backend");
    let pacer = root().join("target/release/tokenflow-pacer");
    let dir = std::env::temp_dir().join(format!("tf-bench-model-{}", std::process::id()));
    run(Command::new(&backend)
        .args(["init-model", "--size", "tiny", "--out"])
        .arg(&dir))?;
    let port = free_port()?;
    let addr: std::net::SocketAddr = format!("127.0.0.1:{port}").parse()?;
    let mut child = Command::new(&backend)
        .args(["serve", "--model"])
        .arg(&dir)
        .args([
            "--listen",
            &addr.to_string(),
            "--max-running",
            "64",
            "--max-waiting",
            "256",
        ])
        .env("RUST_LOG", "warn")
        .stdout(Stdio::null())
        .spawn()
        .context("starting the backend")?;
    let result = (|| -> Result<Vec<Figure>> {
        let t0 = std::time::Instant::now();
        while http(addr, "GET", "/health", None, None)
            .map(|r| r.0)
            .unwrap_or(0)
            != 200
        {
            if t0.elapsed() > Duration::from_secs(20) {
                bail!("the backend did not start");
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        let model = dir
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        let mut figures = Vec::new();
        for users in [1u32, 4, 16, 64] {
            let s = pacer_run(&pacer, addr, &model, users, "off", 10)?.0;
            let tps = s["tokens_per_s"].as_f64().unwrap_or(f64::NAN);
            let (p50, p99) = (
                s["ttft"]["p50_ms"].as_f64().unwrap_or(f64::NAN),
                s["ttft"]["p99_ms"].as_f64().unwrap_or(f64::NAN),
            );
            step(
                "bench",
                format!(
                    "backend, {users:>2} users: {tps:.0} tokens/s, TTFT p50 {p50:.0} ms, p99 {p99:.0} ms"
                ),
            );
            figures.push(Figure::new(
                &format!("backend.tiny.users_{users}.tokens_per_s"),
                tps,
                "tokens/s",
                "tiny model (4 × 256), CPU, 32 output tokens per request, pacer unpaced, 10 s",
            ));
            figures.push(Figure::new(
                &format!("backend.tiny.users_{users}.ttft_p50_ms"),
                p50,
                "ms",
                "time to first token from submission",
            ));
            figures.push(Figure::new(
                &format!("backend.tiny.users_{users}.ttft_p99_ms"),
                p99,
                "ms",
                "same, 99th percentile",
            ));
        }
        // The pacer's CPU while it drives 100 users (paced at 20 req/s so the backend keeps up).
        let (s, cpu_s) = pacer_run(&pacer, addr, &model, 100, "fixed:20", 10)?;
        let pct = cpu_s / 10.0 * 100.0;
        let reqs = s["ok"].as_f64().unwrap_or(0.0);
        step(
            "bench",
            format!("pacer: {pct:.2} % of a core to drive 100 users ({reqs:.0} requests in 10 s)"),
        );
        figures.push(Figure::new("pacer.cpu_percent_100_users", pct, "%", "user + system CPU of tokenflow-pacer driving 100 closed-loop users at fixed:20 for 10 s; target ≤ 5 %"));
        let o: Value = serde_json::from_str(&output(Command::new(&pacer).arg("bench-gate"))?)?;
        let us = o["us_per_request"].as_f64().unwrap_or(f64::NAN);
        let queued = o["us_per_request_queued"].as_f64().unwrap_or(f64::NAN);
        step(
            "bench",
            format!(
                "pacer gate: {us:.2} µs per request with a free slot, {queued:.2} µs when requests queue"
            ),
        );
        figures.push(Figure::new("pacer.overhead_us_per_request", us, "µs", "the pacer's own work per request with a free slot: gate acquire and release (release build, 100k requests); target ≤ 50"));
        figures.push(Figure::new("pacer.overhead_us_per_request_queued", queued, "µs", "same when 64 tasks contend for one slot: every grant through the FIFO queue and the dispatcher task"));
        Ok(figures)
    })();
    let _ = child.kill();
    let _ = child.wait();
    let _ = std::fs::remove_dir_all(&dir);
    result
}

/// Runs the pacer; returns its summary and the CPU seconds it used.
fn pacer_run(
    pacer: &Path,
    addr: std::net::SocketAddr,
    model: &str,
    users: u32,
    pacing: &str,
    secs: u64,
) -> Result<(Value, f64)> {
    let out = std::env::temp_dir().join(format!("tf-bench-pacer-{}-{users}", std::process::id()));
    let child = Command::new(pacer)
        .args([
            "run",
            "--target",
            &format!("http://{addr}"),
            "--model",
            model,
            "--users",
            &users.to_string(),
        ])
        .args([
            "--duration",
            &format!("{secs}s"),
            "--pacing",
            pacing,
            "--max-tokens",
            "32",
            "--json",
            "--out",
        ])
        .arg(&out)
        .stdout(Stdio::piped())
        .spawn()?;
    let pid = child.id();
    // CPU time from the kernel's accounting of the child, read until it exits.
    let poll = std::thread::spawn(move || {
        let tick = 100.0; // USER_HZ
        let mut last = 0.0;
        while let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) {
            let f: Vec<&str> = stat
                .rsplit(')')
                .next()
                .unwrap_or("")
                .split_whitespace()
                .collect();
            let (u, s) = (
                f.get(11).and_then(|v| v.parse::<f64>().ok()),
                f.get(12).and_then(|v| v.parse::<f64>().ok()),
            );
            if let (Some(u), Some(s)) = (u, s) {
                last = (u + s) / tick;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        last
    });
    let o = child.wait_with_output()?;
    let cpu = poll.join().unwrap_or(f64::NAN);
    anyhow::ensure!(o.status.success(), "tokenflow-pacer failed");
    let v: Value = serde_json::from_slice(&o.stdout).context("pacer summary")?;
    let _ = std::fs::remove_dir_all(&out);
    Ok((v, cpu))
}
