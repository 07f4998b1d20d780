//! `cargo xtask record-trace`: records the agent's windows from the network-namespace test bed
//! while the load, the bottleneck rate and the loss change, each window labelled with what was
//! done to the network during it. The hint server's models are trained and evaluated on these
//! traces (a short one is committed as `hint-server/fixtures/trace.jsonl`).

use std::{
    fs::File,
    io::Write,
    net::{SocketAddr, SocketAddrV4},
    path::PathBuf,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use anyhow::{Context, Result, bail};
use clap::Args;
use nix::sys::signal::Signal;
use serde::Serialize;
use tokenflow_schema::{TelemetryWindow, trace::TraceLabel};
use tokenflow_testbed::{
    SERVER_ADDR, Testbed, cleanup_stale,
    traffic::{DiscardServer, Sender},
};
use tokenflow_tests::agent::Agent;

use crate::{
    setup::setup,
    util::{cargo, install_stop_handler, is_root, root, run, step, stopped},
};

const BULK_PORT: u16 = 5201;
const PROBE_PORT: u16 = 5202;

#[derive(Args, Debug)]
pub struct RecordArgs {
    /// Total recording time.
    #[arg(long, default_value = "15m", value_parser = humantime::parse_duration)]
    pub duration: Duration,
    /// Length of one phase (one load/bandwidth/loss setting).
    #[arg(long, default_value = "30s", value_parser = humantime::parse_duration)]
    pub phase: Duration,
    /// Nominal bottleneck rate, kbit/s (the `step` phase drops it to a quarter).
    #[arg(long, default_value_t = 20_000)]
    pub rate_kbit: u64,
    /// Queue the bottleneck may hold (tbf latency), milliseconds.
    #[arg(long, default_value_t = 300)]
    pub buffer_ms: u64,
    /// Fixed one-way delay client→server, milliseconds.
    #[arg(long, default_value_t = 10)]
    pub delay_ms: u64,
    /// Seed of the phase order (the same seed gives the same schedule).
    #[arg(long, default_value_t = 7)]
    pub seed: u64,
    /// What makes the load: `requests` — users submitting whole uploads with Poisson arrivals
    /// and exponential sizes (LLM prompts; the RTT is as bursty as real traffic makes it), or
    /// `flows` — paced flows, each a token bucket holding at most 100 ms of credit (a smooth,
    /// nearly noise-free RTT). Unlimited bulk flows (the `bloat` phase) are the same in both.
    #[arg(long, value_enum, default_value_t = Load::Requests)]
    pub load: Load,
    /// Request users sharing the offered load (`--load requests`).
    #[arg(long, default_value_t = 12)]
    pub users: usize,
    /// Mean upload per request, bytes (`--load requests`).
    #[arg(long, default_value_t = 64 * 1024)]
    pub request_bytes: usize,
    /// Output JSONL file (default: results/trace-<unix time>.jsonl).
    #[arg(long)]
    pub out: Option<PathBuf>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Load {
    Requests,
    Flows,
}

/// One setting of the test bed, held for a phase.
#[derive(Clone, Copy, Debug)]
struct Phase {
    name: &'static str,
    /// Bulk load as a fraction of the nominal bottleneck rate; `None` = unlimited senders.
    load: Option<f64>,
    bulk_flows: usize,
    /// Bottleneck rate as a fraction of the nominal rate.
    rate: f64,
    loss_per_mille: u32,
    /// Whether the phase congests or damages the path (the anomaly label).
    anomalous: bool,
    /// Load ramp (from, to) over the phase, fractions of the nominal rate, instead of `load`;
    /// windows are anomalous once the offered load passes the bottleneck rate.
    ramp: Option<(f64, f64)>,
}

const fn phase(
    name: &'static str,
    load: Option<f64>,
    bulk_flows: usize,
    rate: f64,
    loss_per_mille: u32,
    anomalous: bool,
) -> Phase {
    Phase {
        name,
        load,
        bulk_flows,
        rate,
        loss_per_mille,
        anomalous,
        ramp: None,
    }
}

const PHASES: [Phase; 9] = [
    phase("idle", Some(0.0), 0, 1.0, 0, false),
    phase("light", Some(0.3), 1, 1.0, 0, false),
    phase("moderate", Some(0.5), 2, 1.0, 0, false),
    phase("busy", Some(0.7), 2, 1.0, 0, false),
    phase("bloat", None, 4, 1.0, 0, true),
    phase("loss", Some(0.4), 1, 1.0, 20, true),
    phase("step", Some(0.5), 2, 0.25, 0, true),
    // Load that grows past the bottleneck and one that falls below it: the queue builds and
    // drains gradually, which a forecaster can see coming.
    Phase {
        ramp: Some((0.5, 1.3)),
        ..phase("ramp-up", None, 2, 1.0, 0, false)
    },
    Phase {
        ramp: Some((1.3, 0.4)),
        ..phase("ramp-down", None, 2, 1.0, 0, false)
    },
];

impl Phase {
    /// The phase's load is unlimited bulk flows (no offered rate, fixed or ramped).
    fn unlimited(&self) -> bool {
        self.load.is_none() && self.ramp.is_none()
    }
}

/// Offered load (fraction of the nominal rate) `elapsed` into a ramp phase of length `len`.
fn ramp_load(p: &Phase, elapsed: Duration, len: Duration) -> Option<f64> {
    let (a, b) = p.ramp?;
    let x = (elapsed.as_secs_f64() / len.as_secs_f64()).clamp(0.0, 1.0);
    Some(a + (b - a) * x)
}

#[derive(Serialize)]
struct Line<'a> {
    label: TraceLabel,
    window: &'a TelemetryWindow,
}

pub fn record(a: &RecordArgs) -> Result<()> {
    if !is_root() {
        bail!(
            "recording builds network namespaces and loads eBPF programs: run `sudo cargo xtask record-trace`"
        );
    }
    setup()?;
    install_stop_handler()?;
    step("record", "building the agent");
    run(cargo().args(["build", "-p", "tokenflow-agent"]))?;
    for ns in cleanup_stale()? {
        step(
            "record",
            format!("removed namespace {ns} left by an earlier run"),
        );
    }
    let mut bed = Testbed::create("rec")?;
    bed.set_delay(Duration::from_millis(a.delay_ms))?;
    let buffer = Duration::from_millis(a.buffer_ms);
    bed.set_bottleneck(a.rate_kbit, buffer)?;
    let server = |port| SocketAddr::V4(SocketAddrV4::new(SERVER_ADDR, port));
    let _bulk_srv = DiscardServer::start(&bed.server, server(BULK_PORT))?;
    let _probe_srv = DiscardServer::start(&bed.server, server(PROBE_PORT))?;
    let netns = format!("/run/netns/{}", bed.client);
    let mut agent = Agent::start(&[
        "--interval",
        "1s",
        "--netns",
        &netns,
        "--node-id",
        "trace",
        "--metrics-addr",
        "off",
        "--sink",
        "stdout",
    ])?;
    let probe = Sender::start(&bed.client, server(PROBE_PORT), Some(50_000), 1_000)?;

    // A schedule that visits every phase once per cycle, in a seeded order, so that transitions
    // between all kinds of phases occur.
    let mut rng = fastrand::Rng::with_seed(a.seed);
    let n_phases = (a.duration.as_secs_f64() / a.phase.as_secs_f64()).ceil() as usize;
    let mut schedule = Vec::with_capacity(n_phases);
    while schedule.len() < n_phases {
        let mut cycle = PHASES.to_vec();
        rng.shuffle(&mut cycle);
        schedule.extend(cycle);
    }
    schedule.truncate(n_phases);

    let out = match &a.out {
        Some(p) => p.clone(),
        None => root()
            .join("results")
            .join(format!("trace-{}.jsonl", unix_ms() / 1000)),
    };
    if let Some(dir) = out.parent() {
        std::fs::create_dir_all(dir)?;
    }
    let mut file = File::create(&out).with_context(|| format!("creating {}", out.display()))?;
    // (start of phase in unix ms, phase), to label each window by its midpoint.
    let mut timeline: Vec<(u64, Phase)> = Vec::new();
    let t0 = Instant::now();
    // Windows taken from the agent so far, and how many of them were labelled and written.
    let (mut taken, mut written) = (0usize, 0usize);
    let mut bulk: Vec<Sender> = Vec::new();
    for (i, p) in schedule.iter().enumerate() {
        if stopped() {
            break;
        }
        bulk.clear();
        bed.set_bottleneck((a.rate_kbit as f64 * p.rate) as u64, buffer)?;
        if p.loss_per_mille > 0 {
            bed.set_loss(p.loss_per_mille, BULK_PORT)?;
        } else {
            let _ = bed.clear_loss();
        }
        let nominal_bytes_per_s = a.rate_kbit as f64 * 1000.0 / 8.0;
        // Load varies inside a phase too: ±20 % per phase, so the forecaster sees more than steps.
        let jitter = 0.8 + 0.4 * rng.f64();
        // The phase's offered load (fraction of the nominal rate) `elapsed` into it (none for
        // unlimited bulk flows).
        let load_at =
            |elapsed: Duration| ramp_load(p, elapsed, a.phase).or(p.load.map(|l| l * jitter));
        // Each paced sender's share of the offered load, bytes/s (ramps move it below).
        let per_sender = Arc::new(AtomicU64::new(0));
        let senders = match a.load {
            _ if p.unlimited() => 0,
            Load::Requests => a.users,
            Load::Flows => p.bulk_flows,
        };
        let set_rate = |elapsed: Duration| {
            let total = load_at(elapsed).unwrap_or(0.0) * nominal_bytes_per_s;
            per_sender.store((total / senders.max(1) as f64) as u64, Ordering::Relaxed);
        };
        set_rate(Duration::ZERO);
        if p.unlimited() {
            // Unlimited bulk flows: as fast as the network takes them.
            for _ in 0..p.bulk_flows {
                bulk.push(Sender::start(
                    &bed.client,
                    server(BULK_PORT),
                    None,
                    16 * 1024,
                )?);
            }
        }
        for u in 0..senders {
            bulk.push(match a.load {
                Load::Requests => Sender::start_requests(
                    &bed.client,
                    server(BULK_PORT),
                    per_sender.clone(),
                    a.request_bytes,
                    a.seed ^ ((i as u64) << 16) ^ u as u64,
                )?,
                Load::Flows => Sender::start_variable(
                    &bed.client,
                    server(BULK_PORT),
                    per_sender.clone(),
                    16 * 1024,
                )?,
            });
        }
        timeline.push((unix_ms(), *p));
        step(
            "record",
            format!(
                "phase {}/{} {:<8} load {:>4} rate {:>5} kbit/s loss {:>3}‰ — {:.0}/{:.0} s, {written} windows",
                i + 1,
                schedule.len(),
                p.name,
                match (p.ramp, p.load) {
                    (Some((x, y)), _) => format!("{:.0}→{:.0}%", x * 100.0, y * 100.0),
                    (None, Some(l)) => format!("{:.0}%", l * jitter * 100.0),
                    (None, None) => "max".into(),
                },
                (a.rate_kbit as f64 * p.rate) as u64,
                p.loss_per_mille,
                t0.elapsed().as_secs_f64(),
                a.duration.as_secs_f64(),
            ),
        );
        let started = Instant::now();
        while started.elapsed() < a.phase && !stopped() {
            if p.ramp.is_some() {
                set_rate(started.elapsed());
            }
            std::thread::sleep(Duration::from_millis(250));
            let (t, w) = flush(&agent, &timeline, taken, a, &mut file)?;
            taken += t;
            written += w;
        }
    }
    bulk.clear();
    drop(probe);
    agent.signal_and_wait(Signal::SIGTERM, Duration::from_secs(5))?;
    written += flush(&agent, &timeline, taken, a, &mut file)?.1;
    drop(bed);
    step(
        "record",
        format!("{written} labelled windows written to {}", out.display()),
    );
    if stopped() {
        bail!("interrupted (the windows so far are kept)");
    }
    Ok(())
}

/// Writes the windows the agent produced since the last call; returns how many were taken and how
/// many of those were labelled and written.
fn flush(
    agent: &Agent,
    timeline: &[(u64, Phase)],
    done: usize,
    a: &RecordArgs,
    f: &mut File,
) -> Result<(usize, usize)> {
    let windows = agent.windows();
    let (mut n, mut written) = (0, 0);
    for w in windows.iter().skip(done) {
        let mid = (w.start_unix_ms + w.end_unix_ms) / 2;
        let Some((start, p)) = timeline.iter().rev().find(|(t, _)| *t <= mid) else {
            // Before the first phase began: not labelled, not written.
            n += 1;
            continue;
        };
        let ramp = ramp_load(p, Duration::from_millis(mid - start), a.phase);
        let label = TraceLabel {
            phase: p.name.to_string(),
            anomalous: p.anomalous || ramp.is_some_and(|l| l > 1.0),
            bottleneck_kbit: (a.rate_kbit as f64 * p.rate) as u64,
            loss_per_mille: p.loss_per_mille,
            // Flows, not request users: with `--load requests` only the unlimited ones.
            bulk_flows: if a.load == Load::Flows || p.unlimited() {
                p.bulk_flows as u32
            } else {
                0
            },
        };
        serde_json::to_writer(&mut *f, &Line { label, window: w })?;
        f.write_all(b"\n")?;
        n += 1;
        written += 1;
    }
    Ok((n, written))
}

fn unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}
