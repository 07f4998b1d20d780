//! `cargo xtask demo`: the A/B experiment. The same workload runs with pacing `off`, with
//! TokenFlow's `pid` controller and with the baselines (`sigmoid`, the original mapping;
//! `gradient2`; `aimd`), interleaved within each repeat so drift hits every arm alike, on real
//! network namespaces with a real bottleneck, a real backend and the neighbour's probe.

mod report;
mod scenario;
mod stack;
pub mod stats;

use std::{
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use anyhow::{Context, Result, bail};
use clap::Args;
use serde::Serialize;
use serde_json::json;
use tokenflow_testbed::{SERVER_ADDR, SERVER_ADDR_2, cleanup_stale};

use crate::util::{cargo, install_stop_handler, is_root, root, run, step, stopped};
use scenario::{ARMS, ClientSpec, NAMES, Role, Scenario};
use stack::{BACKEND_PORT, Bins, NODE, Stack};

#[derive(Args, Debug, Clone)]
pub struct DemoArgs {
    /// A short run for CI (≤ 3 minutes): one repeat of short runs — network-bound with every arm,
    /// then the bandwidth step with `off` and `pid` (the step's check is on `pid`'s hint).
    #[arg(long)]
    pub quick: bool,
    /// Scenarios to run (default: all four; with --quick network-bound and bandwidth-step).
    #[arg(long, value_delimiter = ',', value_parser = clap::builder::PossibleValuesParser::new(NAMES))]
    pub scenario: Vec<String>,
    /// Arms to compare (default: all five): off, pid, sigmoid, gradient2, aimd, or pid@MS — pid
    /// with a setpoint of MS ms (e.g. pid@30), a further point on its p99-vs-throughput frontier.
    #[arg(long, value_delimiter = ',', value_parser = scenario::parse_arm)]
    pub arms: Vec<String>,
    /// Repeats of every arm (interleaved). Default 2, with --quick 1.
    #[arg(long)]
    pub repeats: Option<usize>,
    /// Length of one run; the bandwidth step runs 1.5× as long. Default 20 s; with --quick 10 s
    /// and 27 s for the step.
    #[arg(long, value_parser = humantime::parse_duration)]
    pub duration: Option<Duration>,
    /// Warm-up dropped from every run's figures (the same for every arm).
    #[arg(long, default_value = "4s", value_parser = humantime::parse_duration)]
    pub warmup: Duration,
    /// Bottleneck rate (tbf on the router), kbit/s. The compute-bound and open-loop scenarios
    /// use 5× this so that the link is not their bottleneck.
    #[arg(long, default_value_t = 20_000)]
    pub rate_kbit: u64,
    /// The hint server's setpoint for every paced client: p95 RTT, ms.
    #[arg(long, default_value_t = 50.0)]
    pub setpoint_ms: f64,
    /// Use the debug build (faster to build; dependencies are optimised either way).
    #[arg(long)]
    pub debug_build: bool,
    /// Fail unless the loop demonstrably works (CI): hints fall under congestion and recover, the
    /// pacer follows the hint, every arm completes, nothing is left behind.
    #[arg(long)]
    pub check: bool,
    /// Report folder (default results/<timestamp>).
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// Run nothing: render the report again from a finished demo's runs.jsonl (into its folder;
    /// the README's demo table and benchmarks/results.json follow only the newest full run under
    /// results/).
    #[arg(long, value_name = "RUNS_JSONL")]
    pub from_runs: Option<PathBuf>,
}

fn inf_if_null<'de, D: serde::Deserializer<'de>>(d: D) -> Result<f64, D::Error> {
    Ok(<Option<f64> as serde::Deserialize>::deserialize(d)?.unwrap_or(f64::INFINITY))
}

impl DemoArgs {
    /// `--quick --debug-build --check`, as `cargo xtask test` runs it (report under target/).
    pub fn quick_check() -> Self {
        // Through clap, so every other setting keeps the CLI's own defaults.
        #[derive(clap::Parser)]
        struct Cli {
            #[command(flatten)]
            demo: DemoArgs,
        }
        let out = root().join("target/demo-check");
        <Cli as clap::Parser>::parse_from([
            "demo".as_ref(),
            "--quick".as_ref(),
            "--debug-build".as_ref(),
            "--check".as_ref(),
            "--out".as_ref(),
            out.as_os_str(),
        ])
        .demo
    }
}

/// One request as the pacer recorded it (its `requests.jsonl`).
#[derive(Clone, Debug, serde::Deserialize, Serialize)]
pub struct Req {
    pub submitted_ms: f64,
    pub wait_ms: f64,
    pub ttft_ms: Option<f64>,
    #[serde(default)]
    pub itl_ms: Vec<f64>,
    pub e2e_ms: f64,
    pub tokens_out: u64,
    pub status: u16,
    pub error: Option<String>,
}

impl Req {
    pub fn ok(&self) -> bool {
        self.status == 200 && self.error.is_none() && self.ttft_ms.is_some()
    }
}

#[derive(Clone, Debug, Serialize, serde::Deserialize)]
pub struct ClientRun {
    pub role: Role,
    pub id: String,
    /// Infinite for batch clients (JSON null).
    #[serde(deserialize_with = "inf_if_null")]
    pub slo_ttft_ms: f64,
    pub offered: String,
    pub requests: Vec<Req>,
}

/// A sample of the run's time series (seconds since the run started).
#[derive(Clone, Debug, Default, Serialize, serde::Deserialize)]
pub struct Tick {
    pub t: f64,
    pub kbit: u64,
    pub hint_rps: Vec<(String, f64)>,
    pub observed_p95_ms: Option<f64>,
    /// The batch (or only) client's hint: stale flag and the controller's reason.
    pub stale: bool,
    pub reason: String,
}

#[derive(Clone, Debug, Serialize, serde::Deserialize)]
pub struct WindowSample {
    pub t: f64,
    pub p95_ms: f64,
    /// The node's median RTT in the window (what tells the controller a standing queue from
    /// bursts); absent in runs recorded before it was kept.
    #[serde(default)]
    pub p50_ms: Option<f64>,
    pub retransmits: u64,
    pub bytes_acked: u64,
    /// RTT histogram of the interactive client's connections: [lo µs, hi µs, count].
    pub interactive_hist: Vec<[u64; 3]>,
}

#[derive(Clone, Debug, Serialize, serde::Deserialize)]
pub struct Run {
    pub scenario: String,
    pub arm: String,
    pub repeat: usize,
    pub started_unix_ms: u64,
    pub duration_s: f64,
    pub warmup_s: f64,
    pub clients: Vec<ClientRun>,
    /// (seconds since the run started, probe round trip ms).
    pub probe: Vec<(f64, f64)>,
    pub ticks: Vec<Tick>,
    pub windows: Vec<WindowSample>,
    pub steps: Vec<(f64, u64)>,
}

/// The arms a scenario runs: all of them, except that `--quick` (without `--arms`) runs the
/// bandwidth step with `off` and `pid` only — every arm has run in network-bound by then, and the
/// step is the longest run, so five of them would put the quick demo past its 3 minutes.
fn arms_of<'a>(a: &DemoArgs, sc: &Scenario, arms: &'a [String]) -> Vec<&'a String> {
    arms.iter()
        .filter(|arm| {
            (!(a.quick && a.arms.is_empty() && sc.name == "bandwidth-step")
                || matches!(arm.as_str(), "off" | "pid"))
                // Frontier arms the run added itself go only where their scenario asks.
                && (!a.arms.is_empty() || ARMS.contains(&arm.as_str()) || sc.frontier.contains(&arm.as_str()))
        })
        .collect()
}

/// The arms of a run: those named, or all five plus the scenarios' frontier arms (not in the
/// quick run).
fn all_arms(a: &DemoArgs, plan: &[Scenario]) -> Vec<String> {
    if !a.arms.is_empty() {
        return a.arms.clone();
    }
    let mut arms: Vec<String> = ARMS.iter().map(|s| s.to_string()).collect();
    if !a.quick {
        for f in plan.iter().flat_map(|sc| &sc.frontier) {
            if !arms.iter().any(|x| x == f) {
                arms.push(f.to_string());
            }
        }
    }
    arms
}

pub fn demo(a: &DemoArgs) -> Result<()> {
    if let Some(f) = &a.from_runs {
        return rerender(a, f);
    }
    if !is_root() {
        bail!(
            "the demo builds network namespaces and loads eBPF programs: run `sudo cargo xtask demo`"
        );
    }
    crate::setup::setup()?;
    install_stop_handler()?;
    let scenarios: Vec<String> = if !a.scenario.is_empty() {
        a.scenario.clone()
    } else if a.quick {
        vec!["network-bound".into(), "bandwidth-step".into()]
    } else {
        NAMES.iter().map(|s| s.to_string()).collect()
    };
    let repeats = a.repeats.unwrap_or(if a.quick { 1 } else { 2 }).max(1);
    let duration = a
        .duration
        .unwrap_or(Duration::from_secs(if a.quick { 10 } else { 20 }));
    anyhow::ensure!(
        duration > a.warmup + Duration::from_secs(2),
        "--duration must exceed the warm-up ({:?}) by at least 2 s",
        a.warmup
    );
    // The step scenario needs the controllers to have found the link before it narrows: its
    // first third must outlast their ramp from a fresh start. Its last third must outlast the
    // narrow phase's queue draining and the search that follows: in 22 s (7 s a third) the CI
    // run at 94c71dd, on a loaded machine, saw the hint not yet risen after the widening.
    let step_duration = match (a.quick, a.duration) {
        (true, None) => Duration::from_secs(27),
        _ => duration.mul_f64(1.5),
    };
    let plan: Vec<Scenario> = scenarios
        .iter()
        .map(|n| {
            scenario::scenario(n, duration, step_duration, a.warmup, a.rate_kbit)
                .context("unknown scenario")
        })
        .collect::<Result<_>>()?;
    let arms = all_arms(a, &plan);

    let profile = if a.debug_build { "debug" } else { "release" };
    step("demo", format!("building the binaries ({profile})"));
    let mut b = cargo();
    if a.debug_build {
        // What `cargo xtask test` builds: nothing to rebuild after it.
        b.args([
            "build",
            "--workspace",
            "--exclude",
            "xtask",
            "--all-targets",
        ]);
    } else {
        b.args(["build", "--release", "-p", "tokenflow-agent"])
            .args(["-p", "tokenflow-hint-server", "-p", "tokenflow-backend"])
            .args(["-p", "tokenflow-pacer"]);
    }
    run(&mut b)?;
    for ns in cleanup_stale()? {
        step(
            "demo",
            format!("removed namespace {ns} left by an earlier run"),
        );
    }
    let ts = humantime::format_rfc3339_seconds(SystemTime::now())
        .to_string()
        .replace(':', "-");
    let out = a
        .out
        .clone()
        .unwrap_or_else(|| root().join("results").join(&ts));
    std::fs::create_dir_all(out.join("raw"))
        .with_context(|| format!("creating {}", out.display()))?;

    let total_s: f64 = plan
        .iter()
        .map(|s| {
            (s.duration.as_secs_f64() + 3.0) * (arms_of(a, s, &arms).len() * repeats) as f64
                + if s.clients.iter().any(|c| c.open_loop_x_capacity.is_some()) {
                    10.0
                } else {
                    0.0
                }
        })
        .sum();
    let bar = indicatif::ProgressBar::new(total_s.ceil() as u64);
    bar.set_style(
        indicatif::ProgressStyle::with_template(
            "{elapsed_precise} [{bar:32}] {percent:>3}% · {msg} · about {eta} left",
        )
        .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
    );
    // Without a terminal the bar is hidden and so are its lines: print them plainly then.
    let say = |m: String| {
        if bar.is_hidden() {
            eprintln!("[demo] {m}");
        } else {
            bar.println(format!("[demo] {m}"));
        }
    };
    let bins = Bins {
        dir: root().join("target").join(profile),
    };
    let mut runs: Vec<Run> = Vec::new();
    let started = Instant::now();
    let result = (|| -> Result<()> {
        let mut stack = Stack::start(bins, &out, &say)?;
        // The idle path's round trip, against which "drained" is judged.
        std::thread::sleep(Duration::from_secs(2));
        let idle: Vec<f64> = stack.probe.samples().iter().map(|s| s.1).collect();
        let base_ms = stats::quantile(&idle, 0.5);
        say(format!("idle round trip: {base_ms:.1} ms (probe median)"));
        for sc in &plan {
            if stopped() {
                break;
            }
            say(format!("scenario {}: {}", sc.name, sc.what));
            stack.start_backend(
                sc.max_running,
                sc.max_waiting,
                &out.join(format!("backend-{}.log", sc.name)),
            )?;
            stack.set_rate(sc.rate_kbit, sc.buffer_ms)?;
            let capacity = if sc.clients.iter().any(|c| c.open_loop_x_capacity.is_some()) {
                bar.set_message(format!("{} · measuring the backend's capacity", sc.name));
                let c = measure_capacity(&stack, sc, &out)?;
                say(format!(
                    "{}: backend capacity {c:.1} requests/s (closed loop, 2× its running slots, 8 s)",
                    sc.name
                ));
                bar.inc(10);
                Some(c)
            } else {
                None
            };
            for rep in 0..repeats {
                for arm in arms_of(a, sc, &arms) {
                    if stopped() {
                        return Ok(());
                    }
                    bar.set_message(format!(
                        "{} · {arm} · repeat {}/{repeats}",
                        sc.name,
                        rep + 1
                    ));
                    let r = run_one(&stack, sc, arm, rep, capacity, a.setpoint_ms, &out, &bar)?;
                    say(report::one_line(&r, a.setpoint_ms));
                    runs.push(r);
                    // Drain: the next arm starts on an empty queue, whatever this one left.
                    stack.set_rate(sc.rate_kbit, sc.buffer_ms)?;
                    let waited = drain(&stack, base_ms);
                    if waited > Duration::from_secs(6) {
                        say(format!(
                            "the bottleneck took {:.0} s to drain",
                            waited.as_secs_f64()
                        ));
                    }
                    bar.inc(3);
                }
            }
        }
        Ok(())
    })();
    bar.finish_and_clear();
    // Everything the stack started is stopped and removed by now (Drop), also on error.
    let leftovers = leftovers();
    if let Err(e) = result {
        step(
            "demo",
            format!(
                "stopped everything it started; leftovers: {}",
                if leftovers.is_empty() {
                    "none".to_string()
                } else {
                    leftovers.join(", ")
                }
            ),
        );
        return Err(e);
    }
    if stopped() {
        step(
            "demo",
            "interrupted: everything it started is stopped and removed",
        );
        bail!("interrupted");
    }
    step(
        "demo",
        format!(
            "{} runs in {:.0} s; test bed, processes and probes removed",
            runs.len(),
            started.elapsed().as_secs_f64()
        ),
    );
    let rep = report::write(&runs, &plan, &arms, a, &out)?;
    if !a.quick && a.scenario.is_empty() && a.arms.is_empty() {
        report::readme(&out, &rep)?;
        crate::report::replace_measured_at(
            "demo.",
            &rep.figures,
            "sudo cargo xtask demo",
            std::time::SystemTime::now(),
        )?;
    }
    step(
        "demo",
        format!("report: {}", out.join("index.html").display()),
    );
    if a.check {
        let mut problems = report::check(&runs, &arms);
        problems.extend(leftovers.into_iter().map(|l| format!("left behind: {l}")));
        if !problems.is_empty() {
            for p in &problems {
                step("demo", format!("check failed: {p}"));
            }
            bail!("{} check(s) failed", problems.len());
        }
        step(
            "demo",
            "checks passed: the loop works and nothing is left behind",
        );
    }
    Ok(())
}

/// The newest demo report under `dir` (its folders are named by the run's start time).
fn newest_report(dir: &Path) -> Option<PathBuf> {
    std::fs::read_dir(dir)
        .ok()?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.join("runs.jsonl").is_file())
        .max()
}

/// `--from-runs`: the report of a finished demo, rendered again from its raw runs.
fn rerender(a: &DemoArgs, file: &Path) -> Result<()> {
    let text =
        std::fs::read_to_string(file).with_context(|| format!("reading {}", file.display()))?;
    let runs: Vec<Run> = text
        .lines()
        .map(|l| serde_json::from_str(l).context("a run in runs.jsonl"))
        .collect::<Result<_>>()?;
    let out = file.parent().map(Path::to_path_buf).unwrap_or_default();
    let mut names: Vec<String> = Vec::new();
    let mut arms: Vec<String> = Vec::new();
    for r in &runs {
        if !names.contains(&r.scenario) {
            names.push(r.scenario.clone());
        }
        if !arms.contains(&r.arm) {
            arms.push(r.arm.clone());
        }
    }
    let secs = |n: &str| {
        runs.iter()
            .find(|r| r.scenario == n)
            .map_or(20.0, |r| r.duration_s)
    };
    let base = names
        .iter()
        .find(|n| *n != "bandwidth-step")
        .map_or(20.0, |n| secs(n));
    let plan: Vec<Scenario> = names
        .iter()
        .filter_map(|n| {
            scenario::scenario(
                n,
                Duration::from_secs_f64(base),
                Duration::from_secs_f64(secs("bandwidth-step")),
                a.warmup,
                a.rate_kbit,
            )
        })
        .collect();
    let rep = report::write(&runs, &plan, &arms, a, &out)?;
    let full = plan.len() == NAMES.len()
        && ARMS.iter().all(|x| arms.iter().any(|a| a == x))
        && runs.iter().all(|r| !r.clients.is_empty());
    // The README and benchmarks/results.json show the latest full run: an older one, rendered
    // again, only gets its own report.
    let latest = newest_report(&root().join("results"));
    let is_latest = latest.is_some_and(|l| l.canonicalize().ok() == out.canonicalize().ok());
    if full && !is_latest {
        step(
            "demo",
            format!(
                "{} is not the newest run under results/: README and benchmarks/results.json left as they are",
                out.display()
            ),
        );
    }
    if full && is_latest {
        report::readme(&out, &rep)?;
        // Measured when the last run ended, not now.
        let ended_ms = runs
            .iter()
            .map(|r| r.started_unix_ms as f64 + r.duration_s * 1000.0)
            .fold(0.0, f64::max);
        let when = std::time::UNIX_EPOCH + Duration::from_millis(ended_ms as u64);
        crate::report::replace_measured_at("demo.", &rep.figures, "sudo cargo xtask demo", when)?;
    }
    Ok(())
}

/// Waits until the probe's round trip is back near the idle one (the queue is gone) and then
/// until the agent has published a whole window that began after that, so the next arm's
/// controller starts from a window that saw no queue; at most 20 s.
fn drain(stack: &Stack, base_ms: f64) -> Duration {
    let t0 = Instant::now();
    let mut drained_at: Option<u64> = None;
    while t0.elapsed() < Duration::from_secs(20) && !stopped() {
        std::thread::sleep(Duration::from_millis(100));
        match drained_at {
            None => {
                let now = stack.probe.started().elapsed().as_secs_f64();
                let recent: Vec<f64> = stack
                    .probe
                    .samples_since(now - 1.0)
                    .iter()
                    .map(|s| s.1)
                    .collect();
                if !recent.is_empty() && stats::quantile(&recent, 0.99) <= base_ms + 5.0 {
                    drained_at = Some(unix_ms());
                }
            }
            Some(at) => {
                if stack
                    .agent
                    .latest_window()
                    .is_some_and(|w| w.start_unix_ms >= at)
                {
                    break;
                }
            }
        }
    }
    t0.elapsed()
}

/// What a finished demo may not leave: test-bed namespaces, management links, TokenFlow
/// processes, and eBPF programs whose loader is gone.
fn leftovers() -> Vec<String> {
    let mut v = Vec::new();
    if let Ok(ns) = tokenflow_testbed::testbed_namespaces() {
        let mine = format!("-{}-", std::process::id());
        v.extend(
            ns.into_iter()
                .filter(|n| n.contains(&mine))
                .map(|n| format!("namespace {n}")),
        );
    }
    let link = format!("tfm{}", std::process::id());
    if crate::util::succeeds(Command::new("ip").args(["link", "show", &link])) {
        v.push(format!("link {link}"));
    }
    if let Ok(o) = crate::util::output(Command::new("pgrep").args([
        "-a",
        "-P",
        &std::process::id().to_string(),
    ])) {
        v.extend(
            o.lines()
                .filter(|l| l.contains("tokenflow-"))
                .map(|l| format!("process {l}")),
        );
    }
    v
}

/// The backend's throughput for the scenario's request shape: unpaced closed loop with twice as
/// many users as running slots, 8 s.
fn measure_capacity(stack: &Stack, sc: &Scenario, out: &Path) -> Result<f64> {
    let c = sc.clients.first().context("scenario without clients")?;
    let mut spec = c.clone();
    spec.users = Some((sc.max_running * 2).min(100));
    spec.open_loop_x_capacity = None;
    let dir = out.join("raw").join(format!("{}-capacity", sc.name));
    let mut p = spawn_pacer(
        stack,
        &spec,
        "off",
        "capacity",
        Duration::from_secs(8),
        None,
        &dir,
    )?;
    let status = p.child.wait()?;
    anyhow::ensure!(
        status.success(),
        "the capacity run failed (see {})",
        dir.display()
    );
    let reqs = read_requests(&dir)?;
    let ok = reqs
        .iter()
        .filter(|r| r.ok() && r.submitted_ms >= 2000.0)
        .count();
    Ok(ok as f64 / 6.0)
}

#[allow(clippy::too_many_arguments)]
fn spawn_pacer(
    stack: &Stack,
    c: &ClientSpec,
    pacing: &str,
    id: &str,
    duration: Duration,
    open_rate: Option<f64>,
    dir: &Path,
) -> Result<stack::Proc> {
    std::fs::create_dir_all(dir)?;
    let addr = if c.second_address {
        SERVER_ADDR_2
    } else {
        SERVER_ADDR
    };
    let mut cmd = stack.bed.exec(
        &stack.bed.client,
        &stack.bins.path("tokenflow-pacer").to_string_lossy(),
    );
    cmd.args(["run", "--target", &format!("http://{addr}:{BACKEND_PORT}")])
        .args([
            "--model",
            &stack.model_name,
            "--pacing",
            pacing,
            "--client-id",
            id,
        ])
        .args(["--class", c.role.name()])
        .args(["--duration", &format!("{}ms", duration.as_millis())])
        .args(["--prompt-bytes", &c.prompt_bytes.to_string()])
        .args(["--max-tokens", &c.max_tokens.to_string(), "--ignore-eos"])
        .args(["--slo-ttft-ms", &c.slo_ttft_ms.to_string()])
        .args(["--timeout", "20s", "--retries", "2", "--json", "--out"])
        .arg(dir)
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(dir.join("pacer.log"))?);
    if pacing.starts_with("hints:") {
        // Registered by the demo; the token lets it report what it dispatched.
        cmd.env("TOKENFLOW_HINT_TOKEN", stack::TOKEN);
    }
    if let Some(k) = c.truncate_prompt_tokens {
        cmd.args(["--truncate-prompt-tokens", &k.to_string()]);
    }
    if let Some(ms) = c.max_wait_ms {
        cmd.args(["--max-wait", &format!("{ms}ms")]);
    }
    match (open_rate, c.users) {
        (Some(r), _) => cmd.args(["--rate", &format!("{r:.3}")]),
        (None, Some(u)) => cmd.args(["--users", &u.to_string()]),
        (None, None) => bail!("client without users or rate"),
    };
    stack::Proc::spawn("tokenflow-pacer", &mut cmd)
}

fn read_requests(dir: &Path) -> Result<Vec<Req>> {
    let text = std::fs::read_to_string(dir.join("requests.jsonl"))
        .with_context(|| format!("reading {}/requests.jsonl", dir.display()))?;
    text.lines()
        .map(|l| serde_json::from_str(l).context("a request record"))
        .collect()
}

#[allow(clippy::too_many_arguments)]
fn run_one(
    stack: &Stack,
    sc: &Scenario,
    arm: &str,
    rep: usize,
    capacity: Option<f64>,
    setpoint_ms: f64,
    out: &Path,
    bar: &indicatif::ProgressBar,
) -> Result<Run> {
    // Client ids and folder names: `pid@30` → `pid-sp30`.
    let tag = format!("{}-{}-{}", sc.name, arm.replace('@', "-sp"), rep + 1);
    let hint_url = format!("http://{}", stack.hint_addr);
    let mut pacers = Vec::new();
    let mut clients = Vec::new();
    for c in &sc.clients {
        let id = format!("{tag}-{}", c.role.name());
        let pacing = if arm == "off" {
            "off".to_string()
        } else {
            stack.register(
                &id,
                &json!({
                    "node_id": NODE,
                    "controller": scenario::arm_controller(arm),
                    "class": c.role.name(),
                    "setpoint_ms": scenario::arm_setpoint(arm).unwrap_or(setpoint_ms),
                    "min_rps": 0.5,
                    "max_rps": c.max_rps,
                    "max_concurrency": c.max_concurrency,
                    "tokens_per_request": c.max_tokens,
                    "request_cost": c.request_cost,
                }),
            )?;
            format!("hints:{hint_url}")
        };
        let open = c.open_loop_x_capacity.zip(capacity).map(|(x, cap)| x * cap);
        let offered = match (open, c.users) {
            (Some(r), _) => format!("Poisson {r:.1} req/s"),
            (None, Some(u)) => format!("{u} users"),
            _ => String::new(),
        };
        let dir = out.join("raw").join(&tag).join(c.role.name());
        pacers.push((
            spawn_pacer(stack, c, &pacing, &id, sc.duration, open, &dir)?,
            dir,
        ));
        clients.push((c.clone(), id, offered));
    }
    let t0 = Instant::now();
    let started_unix_ms = unix_ms();
    let probe_from = stack.probe.started().elapsed().as_secs_f64();
    let windows_from = stack.agent.windows().len();
    let mut ticks = Vec::new();
    let mut steps = vec![(0.0, sc.rate_kbit)];
    let mut kbit = sc.rate_kbit;
    let mut next_step = 0;
    let mut last_inc = 0.0;
    // The loop looks at the pacers every 100 ms (the next run starts soon after they finish) and
    // records the hints every 500 ms.
    let mut next_tick = 0.0;
    loop {
        let t = t0.elapsed().as_secs_f64();
        if stopped() {
            break;
        }
        if let Some(&(frac, k)) = sc.steps.get(next_step)
            && t >= frac * sc.duration.as_secs_f64()
        {
            stack.set_rate(k, sc.buffer_ms)?;
            steps.push((t, k));
            kbit = k;
            next_step += 1;
        }
        let running = pacers
            .iter_mut()
            .any(|(p, _)| matches!(p.child.try_wait(), Ok(None)));
        if !running {
            break;
        }
        if t > sc.duration.as_secs_f64() + 40.0 {
            bail!("{tag}: the pacers did not finish within 40 s of the run's end");
        }
        if t >= next_tick {
            next_tick = (next_tick + 0.5).max(t);
            let mut tick = Tick {
                t,
                kbit,
                ..Default::default()
            };
            if arm != "off" {
                for (c, id, _) in &clients {
                    if let Some(h) = stack.hint(id) {
                        tick.hint_rps
                            .push((c.role.name().to_string(), h.rate_limit_rps));
                        tick.observed_p95_ms = tick.observed_p95_ms.or(h.observed_rtt_ms);
                        if c.role == Role::Batch {
                            tick.stale = h.stale;
                            tick.reason = h.reason;
                        }
                    }
                }
            }
            ticks.push(tick);
            if t - last_inc >= 1.0 {
                bar.inc(1);
                last_inc = t;
            }
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let mut runs = Vec::new();
    for ((mut p, dir), (c, id, offered)) in pacers.into_iter().zip(clients) {
        p.stop();
        if stopped() {
            bail!("interrupted");
        }
        let status = p.child.wait()?;
        anyhow::ensure!(
            status.success(),
            "{tag}: the {} pacer failed ({status}); see {}/pacer.log",
            c.role.name(),
            dir.display()
        );
        if arm != "off" {
            stack.deregister(&id)?;
        }
        runs.push(ClientRun {
            role: c.role,
            id,
            slo_ttft_ms: c.slo_ttft_ms,
            offered,
            requests: read_requests(&dir)?,
        });
    }
    let probe = stack
        .probe
        .samples_since(probe_from)
        .into_iter()
        .map(|(t, rtt)| (t - probe_from, rtt))
        .collect();
    let inter = format!("{SERVER_ADDR_2}:{BACKEND_PORT}");
    let windows = stack.agent.windows()[windows_from..]
        .iter()
        .map(|w| WindowSample {
            t: (w.end_unix_ms as f64 - started_unix_ms as f64) / 1000.0,
            p95_ms: w.node.rtt.p95_us as f64 / 1000.0,
            p50_ms: Some(w.node.rtt.p50_us as f64 / 1000.0),
            retransmits: w.node.retransmits,
            bytes_acked: w.node.bytes_acked,
            interactive_hist: w
                .flows
                .iter()
                .filter(|f| f.remote == inter)
                .flat_map(|f| f.rtt_hist.iter().copied())
                .collect(),
        })
        .collect();
    Ok(Run {
        scenario: sc.name.to_string(),
        arm: arm.to_string(),
        repeat: rep + 1,
        started_unix_ms,
        duration_s: sc.duration.as_secs_f64(),
        warmup_s: sc.warmup.as_secs_f64(),
        clients: runs,
        probe,
        ticks,
        windows,
        steps,
    })
}

fn unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_newest_report_is_the_latest_run_folder_that_holds_runs() {
        let dir = std::env::temp_dir().join(format!("tokenflow-newest-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        for (name, runs) in [
            ("2026-12-06T11-59-16Z", true),
            ("2026-12-06T14-08-24Z", true),
            ("2026-12-06T15-00-00Z", false),
        ] {
            std::fs::create_dir_all(dir.join(name)).unwrap();
            if runs {
                std::fs::write(dir.join(name).join("runs.jsonl"), "").unwrap();
            }
        }
        // The newest folder was stopped before it wrote any run: the one before it is the latest.
        let newest = newest_report(&dir);
        let _ = std::fs::remove_dir_all(&dir);
        assert_eq!(newest, Some(dir.join("2026-12-06T14-08-24Z")));
        assert_eq!(newest_report(&dir), None);
    }

    #[test]
    fn the_ci_check_is_the_quick_demo_with_the_cli_defaults() {
        let a = DemoArgs::quick_check();
        assert!(a.quick && a.check && a.debug_build);
        assert_eq!(a.warmup, Duration::from_secs(4));
        assert_eq!((a.rate_kbit, a.setpoint_ms), (20_000, 50.0));
        assert!(a.out.is_some_and(|o| o.ends_with("target/demo-check")));
    }

    #[test]
    fn the_quick_demo_runs_every_arm_but_steps_only_off_and_pid() {
        let all: Vec<String> = ARMS.iter().map(|s| s.to_string()).collect();
        let d = Duration::from_secs(10);
        let sc = |n| scenario::scenario(n, d, d, Duration::from_secs(4), 20_000).unwrap();
        let names = |v: Vec<&String>| v.into_iter().cloned().collect::<Vec<_>>();
        let quick = DemoArgs::quick_check();
        assert_eq!(names(arms_of(&quick, &sc("network-bound"), &all)), all);
        assert_eq!(
            names(arms_of(&quick, &sc("bandwidth-step"), &all)),
            ["off", "pid"]
        );
        // Named arms, or the full run, run every arm everywhere.
        let mut named = quick.clone();
        named.arms = all.clone();
        assert_eq!(names(arms_of(&named, &sc("bandwidth-step"), &all)), all);
        let mut full = quick.clone();
        full.quick = false;
        assert_eq!(names(arms_of(&full, &sc("bandwidth-step"), &all)), all);
    }

    #[test]
    fn the_full_run_adds_pids_frontier_arm_only_where_its_scenario_asks() {
        let d = Duration::from_secs(10);
        let plan: Vec<Scenario> = NAMES
            .iter()
            .map(|n| scenario::scenario(n, d, d, Duration::from_secs(4), 20_000).unwrap())
            .collect();
        let names = |v: Vec<&String>| v.into_iter().cloned().collect::<Vec<_>>();
        let mut full = DemoArgs::quick_check();
        full.quick = false;
        let arms = all_arms(&full, &plan);
        assert_eq!(
            arms,
            ["off", "pid", "sigmoid", "gradient2", "aimd", "pid@15"]
        );
        assert_eq!(names(arms_of(&full, &plan[0], &arms)), arms);
        for sc in &plan[1..] {
            assert_eq!(names(arms_of(&full, sc, &arms)), &arms[..5], "{}", sc.name);
        }
        // Not in the quick run; named arms are run as named.
        assert_eq!(all_arms(&DemoArgs::quick_check(), &plan), &arms[..5]);
        let mut named = full;
        named.arms = vec!["pid@30".into(), "off".into()];
        assert_eq!(all_arms(&named, &plan), ["pid@30", "off"]);
        assert_eq!(
            names(arms_of(&named, &plan[3], &named.arms)),
            ["pid@30", "off"]
        );
    }

    #[test]
    fn arms_name_a_controller_and_pid_may_carry_its_own_setpoint() {
        use scenario::{arm_controller, arm_setpoint, parse_arm};
        assert_eq!(parse_arm("pid@30").as_deref(), Ok("pid@30"));
        assert_eq!(
            (arm_controller("pid@30"), arm_setpoint("pid@30")),
            ("pid", Some(30.0))
        );
        assert_eq!(
            (arm_controller("gradient2"), arm_setpoint("gradient2")),
            ("gradient2", None)
        );
        for bad in ["pid@", "pid@-5", "pid@0", "pid@x", "aimd@20", "fast"] {
            assert!(parse_arm(bad).is_err(), "{bad}");
        }
    }
}
