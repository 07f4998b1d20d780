//! `cargo xtask demo`: the capture on the network-namespace test bed. A probe flow (a light, steady
//! sender — the innocent neighbour) shares a tbf bottleneck with bulk flows that start and stop
//! mid-run; the agent's windows show the neighbour's RTT and the retransmits as the queue fills.

use std::{
    fs::File,
    io::Write,
    net::{SocketAddr, SocketAddrV4},
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use anyhow::{Context, Result, bail};
use clap::Args;
use nix::sys::signal::Signal;
use tokenflow_schema::TelemetryWindow;
use tokenflow_testbed::{
    CLIENT_ADDR, SERVER_ADDR, Testbed, cleanup_stale,
    traffic::{DiscardServer, Sender},
};
use tokenflow_tests::{
    agent::Agent,
    redis_server::{RedisServer, free_port},
};

use crate::{
    setup::setup,
    util::{cargo, install_stop_handler, is_root, root, run, step, stopped},
};

const BULK_PORT: u16 = 5201;
const PROBE_PORT: u16 = 5202;

#[derive(Args, Debug)]
pub struct DemoArgs {
    /// Total run time: idle, then bulk load for all but the first and last quarter, then idle.
    #[arg(long, default_value = "40s", value_parser = humantime::parse_duration)]
    pub duration: Duration,
    /// Bottleneck rate on the router (tbf), kbit/s.
    #[arg(long, default_value_t = 20_000)]
    pub rate_kbit: u64,
    /// Queue the bottleneck may hold before it drops (tbf latency), milliseconds.
    #[arg(long, default_value_t = 300)]
    pub buffer_ms: u64,
    /// Fixed one-way delay client→server (the path's base RTT), milliseconds.
    #[arg(long, default_value_t = 10)]
    pub delay_ms: u64,
    /// Bulk flows that load the link during the middle of the run.
    #[arg(long, default_value_t = 4)]
    pub bulk_flows: usize,
}

pub fn demo(a: &DemoArgs) -> Result<()> {
    if !is_root() {
        bail!(
            "the demo builds network namespaces and loads eBPF programs: run `sudo cargo xtask demo`"
        );
    }
    setup()?;
    install_stop_handler()?;
    step("demo", "building the agent");
    run(cargo().args(["build", "-p", "tokenflow-agent"]))?;
    for ns in cleanup_stale()? {
        step(
            "demo",
            format!("removed namespace {ns} left by an earlier run"),
        );
    }

    let mut bed = Testbed::create("demo")?;
    bed.set_delay(Duration::from_millis(a.delay_ms))?;
    bed.set_bottleneck(a.rate_kbit, Duration::from_millis(a.buffer_ms))?;
    step(
        "demo",
        format!(
            "test bed {} — {} — {}: {} kbit/s tbf, {} ms buffer, +{} ms one way",
            bed.client, bed.router, bed.server, a.rate_kbit, a.buffer_ms, a.delay_ms
        ),
    );
    let server = |port| SocketAddr::V4(SocketAddrV4::new(SERVER_ADDR, port));
    let _bulk_srv = DiscardServer::start(&bed.server, server(BULK_PORT))?;
    let _probe_srv = DiscardServer::start(&bed.server, server(PROBE_PORT))?;
    let netns = format!("/run/netns/{}", bed.client);
    let redis = RedisServer::start_ephemeral()?;
    step(
        "demo",
        format!(
            "redis-server on {} (temporary directory, removed at the end)",
            redis.url()
        ),
    );
    let metrics = format!("127.0.0.1:{}", free_port()?);
    let mut agent = Agent::start(&[
        "--interval",
        "1s",
        "--netns",
        &netns,
        "--node-id",
        "demo",
        "--redis",
        &redis.url(),
        "--metrics-addr",
        &metrics,
        "--sink",
        "stdout",
    ])?;
    step(
        "demo",
        format!(
            "agent attached; watching the client namespace; metrics at http://{metrics}/metrics"
        ),
    );

    // The neighbour: 50 KB/s in 1 KB writes, a few percent of the link.
    let probe = Sender::start(&bed.client, server(PROBE_PORT), Some(50_000), 1_000)?;
    let load_from = a.duration / 4;
    let load_until = a.duration - a.duration / 4;
    let mut bulk: Vec<Sender> = Vec::new();
    let t0 = Instant::now();
    let t0_ms = unix_ms();
    let phase = |w: &TelemetryWindow| {
        // Phase of the window's midpoint, in run time.
        let mid =
            Duration::from_millis(((w.start_unix_ms + w.end_unix_ms) / 2).saturating_sub(t0_ms));
        (mid, mid >= load_from && mid < load_until)
    };
    let mut shown = 0;
    println!(
        "│ {:>5} │ {:<6} │ {:>12} │ {:>12} │ {:>11} │ {:>11} │ {:>7} │ {:>14} │",
        "t (s)",
        "phase",
        "probe p50 ms",
        "probe p99 ms",
        "bulk p50 ms",
        "bulk p99 ms",
        "retrans",
        "goodput Mbit/s"
    );
    while t0.elapsed() < a.duration && !stopped() {
        let t = t0.elapsed();
        let loaded = t >= load_from && t < load_until;
        if loaded && bulk.is_empty() {
            step("demo", format!("starting {} bulk flows", a.bulk_flows));
            for _ in 0..a.bulk_flows {
                bulk.push(Sender::start(
                    &bed.client,
                    server(BULK_PORT),
                    None,
                    64 * 1024,
                )?);
            }
        } else if !loaded && !bulk.is_empty() {
            step("demo", "stopping the bulk flows");
            bulk.clear();
        }
        let windows = agent.windows();
        for w in &windows[shown..] {
            println!("{}", row(w, phase(w), probe.local_port));
        }
        shown = windows.len();
        std::thread::sleep(Duration::from_millis(200));
    }
    bulk.clear();
    drop(probe);
    agent.signal_and_wait(Signal::SIGTERM, Duration::from_secs(5))?;
    let windows = agent.windows();
    let path = save(&windows)?;
    let stream: usize = redis::cmd("XLEN")
        .arg(tokenflow_schema::keys::telemetry_stream("demo"))
        .query(&mut redis.client()?)
        .context("reading the stream length")?;
    step(
        "demo",
        format!(
            "{stream} windows in Redis stream {}",
            tokenflow_schema::keys::telemetry_stream("demo")
        ),
    );
    drop(redis);
    drop(bed);
    step(
        "demo",
        format!("{} windows written to {}", windows.len(), path.display()),
    );
    step("demo", "test bed removed; programs detached");
    if stopped() {
        bail!("interrupted");
    }
    Ok(())
}

fn row(w: &TelemetryWindow, (t, loaded): (Duration, bool), probe_port: u16) -> String {
    let probe_local = format!("{CLIENT_ADDR}:{probe_port}");
    let probe = w.flows.iter().find(|f| f.local == probe_local);
    let bulk: Vec<_> = w
        .flows
        .iter()
        .filter(|f| f.remote.ends_with(&format!(":{BULK_PORT}")))
        .collect();
    let ms = |us: u64| format!("{:.1}", us as f64 / 1000.0);
    let (bp50, bp99) = if bulk.is_empty() {
        ("-".to_string(), "-".to_string())
    } else {
        (
            ms(bulk.iter().map(|f| f.rtt.p50_us).max().unwrap_or(0)),
            ms(bulk.iter().map(|f| f.rtt.p99_us).max().unwrap_or(0)),
        )
    };
    let secs = ((w.end_unix_ms - w.start_unix_ms) as f64 / 1000.0).max(1e-3);
    format!(
        "│ {:>5.0} │ {:<6} │ {:>12} │ {:>12} │ {:>11} │ {:>11} │ {:>7} │ {:>14.2} │",
        t.as_secs_f64(),
        if loaded { "loaded" } else { "idle" },
        probe
            .map(|f| ms(f.rtt.p50_us))
            .unwrap_or_else(|| "-".into()),
        probe
            .map(|f| ms(f.rtt.p99_us))
            .unwrap_or_else(|| "-".into()),
        bp50,
        bp99,
        w.node.retransmits,
        w.node.bytes_acked as f64 * 8.0 / secs / 1e6,
    )
}

fn unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

fn save(windows: &[TelemetryWindow]) -> Result<std::path::PathBuf> {
    let dir = root().join("results");
    std::fs::create_dir_all(&dir)?;
    let ts = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    let path = dir.join(format!("capture-{ts}.jsonl"));
    let mut f = File::create(&path).with_context(|| format!("creating {}", path.display()))?;
    for w in windows {
        serde_json::to_writer(&mut f, w)?;
        f.write_all(b"\n")?;
    }
    Ok(path)
}
