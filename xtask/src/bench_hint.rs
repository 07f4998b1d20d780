//! Hint-server figures for `cargo xtask bench`: decision cost per window (features, Isolation
//! Forest, GBDT, controller, sharing), training time on the committed trace, and the HTTP API's
//! throughput on one core (wrk) with its latency at half that load (an open-loop client that
//! measures from each request's scheduled send time, so queueing in the client counts).

use std::{
    io::{Read, Write},
    net::{SocketAddr, TcpStream},
    path::Path,
    process::Command,
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail};
use tokenflow_schema::{ControllerKind, HINT_SCHEMA_VERSION, Hint, keys};
use tokenflow_tests::{
    hint_server::http,
    redis_server::{RedisServer, free_port},
};

use crate::{
    report::Figure,
    util::{cargo, output, root, run, step},
};

pub fn measure() -> Result<Vec<Figure>> {
    step("bench", "building the hint server (release)");
    run(cargo().args(["build", "--release", "-p", "tokenflow-hint-server"]))?;
    let bin = root().join("target/release/tokenflow-hint-server");
    let mut figures = decision_cost(&bin, &root().join("hint-server/fixtures/trace.jsonl"))?;
    figures.extend(http_figures(&bin)?);
    Ok(figures)
}

fn decision_cost(bin: &Path, fixture: &Path) -> Result<Vec<Figure>> {
    let out = output(
        Command::new(bin)
            .arg("bench-decision")
            .arg("--trace")
            .arg(fixture),
    )?;
    let v: serde_json::Value =
        serde_json::from_str(&out).with_context(|| format!("bench-decision printed {out}"))?;
    let get = |k: &str| {
        v[k].as_f64()
            .with_context(|| format!("bench-decision lacks {k}"))
    };
    let (mean, p99, train_s) = (
        get("decision_us_mean")?,
        get("decision_us_p99")?,
        get("training_s")?,
    );
    step(
        "bench",
        format!("decision per window: mean {mean:.1} µs, p99 {p99:.1} µs; training {train_s:.2} s"),
    );
    Ok(vec![
        Figure::new(
            "hint.decision_us_mean",
            mean,
            "µs",
            "per window: features + Isolation Forest + GBDT + PID + sharing, 2 clients (release); target ≤ 100",
        ),
        Figure::new(
            "hint.decision_us_p99",
            p99,
            "µs",
            "same, 99th percentile over 5 passes of the committed trace",
        ),
        Figure::new(
            "hint.training_s",
            train_s,
            "s",
            "Isolation Forest + GBDT at 1 and 5 windows on the committed trace (release)",
        ),
    ])
}

fn http_figures(bin: &Path) -> Result<Vec<Figure>> {
    let redis = RedisServer::start_ephemeral()?;
    // Redis and the load generators share CPU 0; the hint server has CPU 1 to itself.
    if let Some(pid) = redis.pid() {
        run(Command::new("taskset").args(["-p", "-c", "0", &pid.to_string()]))?;
    }
    let addr: SocketAddr = format!("127.0.0.1:{}", free_port()?).parse()?;
    // One core for the server (CPU 1, one worker), the load generator on the other.
    let mut child = Command::new("taskset")
        .args(["-c", "1"])
        .arg(bin)
        .args([
            "serve",
            "--redis",
            &redis.url(),
            "--listen",
            &addr.to_string(),
            "--metrics-addr",
            "off",
        ])
        .args(["--token", "bench", "--workers", "1"])
        .env("RUST_LOG", "warn")
        .spawn()
        .context("starting the hint server")?;
    let result = (|| -> Result<Vec<Figure>> {
        let t0 = Instant::now();
        while http(addr, "GET", "/healthz", None, None)
            .map(|r| r.0)
            .unwrap_or(0)
            != 200
        {
            if t0.elapsed() > Duration::from_secs(10) {
                bail!("the hint server did not start");
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        let (code, body) = http(
            addr,
            "PUT",
            "/v1/clients/bench",
            Some("bench"),
            Some(r#"{"node_id":"bench"}"#),
        )?;
        anyhow::ensure!(code == 200, "registering the client: {code} {body}");
        // A current hint, as the ingest would have stored it: the read path is HGET + GET.
        let hint = Hint {
            schema_version: HINT_SCHEMA_VERSION,
            client_id: "bench".into(),
            node_id: "bench".into(),
            rate_limit_rps: 12.5,
            max_concurrency: 8,
            tokens_per_s: 1600.0,
            health: 0.8,
            anomaly_score: 0.4,
            predicted_rtt_ms: Some(31.0),
            observed_rtt_ms: Some(30.0),
            controller: ControllerKind::Pid,
            reason: "bench".into(),
            issued_at_unix_ms: 0,
            ttl_ms: 3_600_000,
            stale: false,
        };
        let _: () = redis::cmd("PSETEX")
            .arg(keys::hint("bench"))
            .arg(3_600_000)
            .arg(serde_json::to_string(&hint)?)
            .query(&mut redis.client()?)?;
        let url = format!("http://{addr}/v1/hints/bench");
        let out = output(Command::new("taskset").args([
            "-c",
            "0",
            "wrk",
            "-t1",
            "-c32",
            "-d10s",
            "--latency",
            &url,
        ]))?;
        let rps = out
            .lines()
            .find_map(|l| l.strip_prefix("Requests/sec:"))
            .and_then(|v| v.trim().parse::<f64>().ok())
            .with_context(|| format!("no Requests/sec in wrk's output:\n{out}"))?;
        step(
            "bench",
            format!("GET /v1/hints: {rps:.0} requests/s on one core (wrk -c32)"),
        );
        let (p50, p99, sent) = open_loop(
            addr,
            "/v1/hints/bench",
            rps / 2.0,
            Duration::from_secs(10),
            8,
        )?;
        step(
            "bench",
            format!(
                "at {:.0} requests/s (half): p50 {:.0} µs, p99 {:.0} µs over {sent} requests",
                rps / 2.0,
                p50,
                p99
            ),
        );
        Ok(vec![
            Figure::new(
                "hint.http_requests_per_s_one_core",
                rps,
                "req/s",
                "GET /v1/hints/{id}, server on one core with one worker, wrk -t1 -c32 -d10s on the other",
            ),
            Figure::new(
                "hint.http_p50_us_at_half_load",
                p50,
                "µs",
                "open-loop at half the wrk rate, 8 keep-alive connections, from each request's scheduled send time",
            ),
            Figure::new(
                "hint.http_p99_us_at_half_load",
                p99,
                "µs",
                "same, 99th percentile; target ≤ 1000",
            ),
        ])
    })();
    let _ = nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(child.id() as i32),
        nix::sys::signal::Signal::SIGTERM,
    );
    let _ = child.wait();
    result
}

/// Sends GETs at a fixed total `rate` over `conns` keep-alive connections; latency counts from
/// when each request was due, so a slow response delays the next one's clock, not hides it.
fn open_loop(
    addr: SocketAddr,
    path: &str,
    rate: f64,
    d: Duration,
    conns: usize,
) -> Result<(f64, f64, usize)> {
    let per_conn = rate / conns as f64;
    let handles: Vec<_> = (0..conns)
        .map(|i| {
            let path = path.to_string();
            std::thread::spawn(move || -> Result<Vec<f64>> {
                let mut cpu0 = nix::sched::CpuSet::new();
                cpu0.set(0)?;
                nix::sched::sched_setaffinity(nix::unistd::Pid::from_raw(0), &cpu0)?;
                let mut s = TcpStream::connect(addr)?;
                s.set_nodelay(true)?;
                let req = format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\n\r\n");
                let gap = Duration::from_secs_f64(1.0 / per_conn);
                let start = Instant::now() + gap.mul_f64(i as f64 / conns as f64);
                let mut lat = Vec::new();
                let mut buf = vec![0u8; 64 * 1024];
                let mut k = 0u32;
                loop {
                    let due = start + gap * k;
                    if due.duration_since(start) > d {
                        break;
                    }
                    if let Some(w) = due.checked_duration_since(Instant::now()) {
                        std::thread::sleep(w);
                    }
                    s.write_all(req.as_bytes())?;
                    read_response(&mut s, &mut buf)?;
                    lat.push(due.elapsed().as_secs_f64() * 1e6);
                    k += 1;
                }
                Ok(lat)
            })
        })
        .collect();
    let mut all = Vec::new();
    for h in handles {
        all.extend(
            h.join()
                .map_err(|_| anyhow::anyhow!("load thread panicked"))??,
        );
    }
    all.sort_by(f64::total_cmp);
    let q = |p: f64| all[((all.len() as f64 * p) as usize).min(all.len() - 1)];
    Ok((q(0.5), q(0.99), all.len()))
}

/// Reads one HTTP/1.1 response with a Content-Length body.
fn read_response(s: &mut TcpStream, buf: &mut [u8]) -> Result<()> {
    let mut have = 0;
    loop {
        let n = s.read(&mut buf[have..])?;
        if n == 0 {
            bail!("connection closed");
        }
        have += n;
        let text = &buf[..have];
        if let Some(end) = text.windows(4).position(|w| w == b"\r\n\r\n") {
            let head = std::str::from_utf8(&text[..end]).unwrap_or("");
            let len: usize = head
                .lines()
                .find_map(|l| {
                    l.to_ascii_lowercase()
                        .strip_prefix("content-length:")
                        .map(|v| v.trim().parse().unwrap_or(0))
                })
                .unwrap_or(0);
            if have >= end + 4 + len {
                return Ok(());
            }
        }
    }
}
