//! `cargo xtask bench`: the capture's cost under a fixed loopback load, measured by the kernel
//! (`kernel.bpf_stats_enabled`: run_time_ns / run_cnt per program) beside a bpftrace
//! `hist(args->srtt)` one-liner on the same tracepoint in the same run, plus the agent's CPU and RSS.

use std::{
    collections::BTreeMap,
    io::{BufRead, BufReader},
    os::unix::process::CommandExt,
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail};
use clap::Args;
use nix::sys::signal::Signal;
use serde_json::Value;
use tokenflow_tests::{
    agent::Agent,
    redis_server::{RedisServer, free_port},
};

use crate::{
    report::{self, Figure},
    setup::setup,
    util::{cargo, install_stop_handler, is_root, output, run, step},
};

mod load;

#[derive(Args, Debug)]
pub struct BenchArgs {
    /// Measurement length (after a 2 s warm-up).
    #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
    pub duration: Duration,
    /// Target tcp_probe events per second (two per request/response round trip).
    #[arg(long, default_value_t = 100_000)]
    pub events_per_s: u64,
    /// Loopback connections carrying the load.
    #[arg(long, default_value_t = 8)]
    pub connections: usize,
    /// Measure only one component.
    #[arg(long, value_enum, default_value_t = Part::All)]
    pub only: Part,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Part {
    All,
    Agent,
    Hint,
    /// The candle backend and the pacer.
    Llm,
}

/// run_time_ns and run_cnt of one loaded program.
#[derive(Clone, Copy, Debug, Default)]
struct ProgStats {
    run_time_ns: u64,
    run_cnt: u64,
}

fn prog_stats() -> Result<BTreeMap<u64, (String, String, ProgStats)>> {
    let v: Value = serde_json::from_str(&output(
        Command::new("bpftool").args(["prog", "show", "--json"]),
    )?)?;
    let mut res = BTreeMap::new();
    for p in v.as_array().into_iter().flatten() {
        let id = p["id"].as_u64().unwrap_or(0);
        let s = ProgStats {
            run_time_ns: p["run_time_ns"].as_u64().unwrap_or(0),
            run_cnt: p["run_cnt"].as_u64().unwrap_or(0),
        };
        let name = p["name"].as_str().unwrap_or("").to_string();
        let ty = p["type"].as_str().unwrap_or("").to_string();
        res.insert(id, (name, ty, s));
    }
    Ok(res)
}

/// ns/event between two snapshots of one program.
fn ns_per_event(before: &ProgStats, after: &ProgStats) -> (f64, u64) {
    let cnt = after.run_cnt.saturating_sub(before.run_cnt);
    let ns = after.run_time_ns.saturating_sub(before.run_time_ns);
    (
        if cnt == 0 {
            0.0
        } else {
            ns as f64 / cnt as f64
        },
        cnt,
    )
}

/// CPU time in nanoseconds (summed over the process's threads, from schedstat: finer than the
/// 10 ms ticks of /proc/PID/stat), and VmRSS in bytes.
fn proc_usage(pid: i32) -> Result<(u64, u64)> {
    let mut cpu_ns = 0u64;
    for task in std::fs::read_dir(format!("/proc/{pid}/task"))? {
        let stat = std::fs::read_to_string(task?.path().join("schedstat")).unwrap_or_default();
        cpu_ns += stat
            .split_whitespace()
            .next()
            .and_then(|v| v.parse::<u64>().ok())
            .unwrap_or(0);
    }
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let rss_kb = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse::<u64>().ok())
        .unwrap_or(0);
    Ok((cpu_ns, rss_kb * 1024))
}

struct Bpftrace(Child);

impl Bpftrace {
    /// Starts a bpftrace program and waits until its `programs` BPF programs are in the kernel
    /// (bpftrace says "Attaching" before they are); returns their ids.
    fn start(program: &str, programs: usize) -> Result<(Self, Vec<u64>)> {
        let before = prog_stats()?;
        let mut child = Command::new("bpftrace")
            .args(["-e", program])
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            // Its own process group: signals meant for bpftrace never reach this process.
            .process_group(0)
            .spawn()
            .context("starting bpftrace (cargo xtask setup installs it)")?;
        let stdout = child.stdout.take().context("bpftrace stdout")?;
        let mut lines = BufReader::new(stdout).lines();
        let bt = Self(child);
        match lines.next() {
            Some(Ok(l)) if l.contains("Attaching") => {}
            other => bail!("bpftrace did not attach: {other:?}"),
        }
        // Keep draining so bpftrace never blocks on a full pipe.
        std::thread::spawn(move || for _ in lines {});
        let t0 = Instant::now();
        loop {
            let ids: Vec<u64> = prog_stats()?
                .into_keys()
                .filter(|id| !before.contains_key(id))
                .collect();
            if ids.len() >= programs {
                return Ok((bt, ids));
            }
            if t0.elapsed() > Duration::from_secs(15) {
                bail!(
                    "bpftrace loaded {} of {programs} programs in 15 s",
                    ids.len()
                );
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

impl Drop for Bpftrace {
    fn drop(&mut self) {
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(self.0.id() as i32),
            Signal::SIGINT,
        );
        let _ = self.0.wait();
    }
}

pub fn bench(a: &BenchArgs) -> Result<()> {
    if a.only == Part::Hint {
        setup()?;
        let figures = crate::bench_hint::measure()?;
        report::write(&figures, "cargo xtask bench --only hint")?;
        return Ok(());
    }
    if a.only == Part::Llm {
        setup()?;
        let figures = crate::bench_llm::measure()?;
        report::write(&figures, "cargo xtask bench --only llm")?;
        return Ok(());
    }
    if !is_root() {
        bail!(
            "the benchmark loads eBPF programs and reads their kernel stats: run `sudo cargo xtask bench`"
        );
    }
    setup()?;
    install_stop_handler()?;
    step("bench", "building the agent (release)");
    run(cargo().args(["build", "--release", "-p", "tokenflow-agent"]))?;
    let agent_bin = crate::util::root().join("target/release/tokenflow-agent");

    let old_stats = output(Command::new("sysctl").args(["-n", "kernel.bpf_stats_enabled"]))?;
    run(Command::new("sysctl").args(["-q", "-w", "kernel.bpf_stats_enabled=1"]))?;
    let result = measure(a, &agent_bin);
    let _ = run(Command::new("sysctl").args([
        "-q",
        "-w",
        &format!("kernel.bpf_stats_enabled={}", old_stats.trim()),
    ]));
    let mut figures = result?;
    if a.only == Part::All {
        figures.extend(crate::bench_hint::measure()?);
        figures.extend(crate::bench_llm::measure()?);
    }
    report::write(&figures, "cargo xtask bench")?;
    Ok(())
}

fn measure(a: &BenchArgs, agent_bin: &std::path::Path) -> Result<Vec<Figure>> {
    let (bpftrace, bt_ids) =
        Bpftrace::start("tracepoint:tcp:tcp_probe { @srtt = hist(args->srtt); }", 1)?;
    anyhow::ensure!(
        bt_ids.len() == 1,
        "expected one new bpftrace program, found {bt_ids:?}"
    );
    // Both sinks on, as in production, plus one uprobe on a function of this binary.
    let redis = RedisServer::start_ephemeral()?;
    let metrics: std::net::SocketAddr = format!("127.0.0.1:{}", free_port()?).parse()?;
    let exe = std::env::current_exe()?;
    // Two targets: one that starts with the 5-byte nop Linux ≥ 6.18 optimises
    // (what TokenFlow's own probe points use), and an ordinary function entry,
    // where every call traps.
    let uprobe_fast = format!("{}:tokenflow_bench_target:bench", exe.display());
    let uprobe_trap = format!("{}:tokenflow_bench_target_plain:bench_plain", exe.display());
    let calls = 200_000u64;
    let bare = time_calls(calls, tokenflow_bench_target);
    let bare_plain = time_calls(calls, tokenflow_bench_target_plain);
    // The floor: bpftrace's empty uprobe + uretprobe on the ordinary function, same machine.
    let bt_uprobe_ns = {
        let target = format!("{}:tokenflow_bench_target_plain", exe.display());
        let (bt, _) = Bpftrace::start(
            &format!("uprobe:{target} {{ }} uretprobe:{target} {{ }}"),
            2,
        )?;
        let t = time_calls(calls, tokenflow_bench_target_plain);
        drop(bt);
        per_call_ns(t, bare_plain, calls)
    };
    let mut agent = Agent::start_binary(
        agent_bin,
        &[
            "--interval",
            "1s",
            "--node-id",
            "bench",
            "--redis",
            &redis.url(),
            "--metrics-addr",
            &metrics.to_string(),
            "--sink",
            "stdout",
            "--uprobe",
            &uprobe_fast,
            "--uprobe",
            &uprobe_trap,
        ],
    )?;
    let u0 = prog_stats()?;
    let probed = time_calls(calls, tokenflow_bench_target);
    let u1 = prog_stats()?;
    let uprobe_ns = per_call_ns(probed, bare, calls);
    let uprobe_trap_ns = per_call_ns(
        time_calls(calls, tokenflow_bench_target_plain),
        bare_plain,
        calls,
    );
    // Both targets share the entry and return programs; only the first loop ran between u0 and u1.
    let uprobe_prog_ns: f64 = u1
        .iter()
        .filter(|(_, (n, _, _))| n == "tf_uprobe_entry" || n == "tf_uprobe_return")
        .map(|(id, (_, _, s))| ns_per_event(&u0.get(id).map(|x| x.2).unwrap_or_default(), s).0)
        .sum();
    let ours: BTreeMap<u64, String> = prog_stats()?
        .into_iter()
        .filter(|(_, (name, _, _))| name.starts_with("tf_") && !name.starts_with("tf_uprobe"))
        .map(|(id, (name, _, _))| (id, name))
        .collect();
    anyhow::ensure!(
        ours.len() == 4,
        "expected the agent's four capture programs, found {ours:?}"
    );

    step(
        "bench",
        format!(
            "loopback load: {} events/s target over {} connections",
            a.events_per_s, a.connections
        ),
    );
    let load = load::EchoLoad::start(a.connections, a.events_per_s / 2)?;
    std::thread::sleep(Duration::from_secs(2));
    let s0 = prog_stats()?;
    let (cpu0, _) = proc_usage(agent.pid().as_raw())?;
    let w0 = agent.windows().len();
    let rt0 = load.round_trips();
    let t0 = Instant::now();
    std::thread::sleep(a.duration);
    let secs = t0.elapsed().as_secs_f64();
    let s1 = prog_stats()?;
    let (cpu1, rss) = proc_usage(agent.pid().as_raw())?;
    let rt1 = load.round_trips();
    drop(load);
    let scraped = tokenflow_tests::scrape_metrics(metrics)?;
    let windows = agent.windows();
    agent.signal_and_wait(Signal::SIGTERM, Duration::from_secs(5))?;
    drop(bpftrace);

    let stat = |id: u64, s: &BTreeMap<u64, (String, String, ProgStats)>| {
        s.get(&id).map(|x| x.2).unwrap_or_default()
    };
    let mut figures = Vec::new();
    let mut probe_ns = 0.0;
    let mut probe_events = 0;
    for (id, name) in &ours {
        let (ns, cnt) = ns_per_event(&stat(*id, &s0), &stat(*id, &s1));
        if name == "tf_tcp_probe" {
            probe_ns = ns;
            probe_events = cnt;
        }
        if cnt == 0 {
            // No event, no figure: a 0 ns entry would read as "free".
            println!("  {name}: no events under this load (loopback does not retransmit)");
            continue;
        }
        figures.push(Figure::new(
            &format!("capture.{name}.ns_per_event"),
            ns,
            "ns",
            &format!("kernel bpf_stats run_time_ns/run_cnt; {cnt} events in the run"),
        ));
    }
    let (bt_ns, _) = ns_per_event(&stat(bt_ids[0], &s0), &stat(bt_ids[0], &s1));
    let cpu_pct = (cpu1 - cpu0) as f64 / 1e9 / secs * 100.0;
    let events_per_s = probe_events as f64 / secs;
    let lost: u64 = windows[w0..]
        .iter()
        .map(|w| w.capture.flow_insert_failed + w.capture.closed_dropped)
        .sum();
    let metric = |name: &str| -> f64 {
        scraped
            .lines()
            .find(|l| l.starts_with(name) && l[name.len()..].starts_with(' '))
            .and_then(|l| l.rsplit(' ').next()?.parse().ok())
            .unwrap_or(0.0)
    };
    let writes = metric("tokenflow_agent_redis_write_seconds_count");
    let write_s = metric("tokenflow_agent_redis_write_seconds_sum") / writes.max(1.0);
    let written = windows
        .last()
        .map(|w| w.sinks.redis_written_total)
        .unwrap_or(0);
    anyhow::ensure!(
        writes > 0.0 && written > 0,
        "no window reached Redis during the benchmark"
    );
    figures.extend([
        Figure::new("agent.uprobe_overhead_ns_per_call", uprobe_ns, "ns", "wall time per call of a probed function minus unprobed, entry+return, on a tokenflow-markers probe point (5-byte nop entry, optimised by Linux ≥ 6.18); target ≤ 1500"),
        Figure::new("agent.uprobe_trap_ns_per_call", uprobe_trap_ns, "ns", "same on an ordinary function entry, where every call traps (int3 + single step)"),
        Figure::new("agent.uprobe_bpftrace_empty_ns_per_call", bt_uprobe_ns, "ns", "bpftrace's empty uprobe + uretprobe on the ordinary function: this machine's trap floor"),
        Figure::new("agent.uprobe_programs_ns_per_call", uprobe_prog_ns, "ns", "bpf_stats run time of the entry and return programs per call"),
        Figure::new("agent.redis_write_us_mean", write_s * 1e6, "µs", "XADD + latest key per window (mean of the agent's tokenflow_agent_redis_write_seconds)"),
        Figure::new(
            "capture.bpftrace_hist_srtt.ns_per_event",
            bt_ns,
            "ns",
            "bpftrace 'tracepoint:tcp:tcp_probe { @srtt = hist(args->srtt); }' in the same run",
        ),
        Figure::new(
            "capture.tcp_probe_vs_bpftrace.ratio",
            if bt_ns > 0.0 { probe_ns / bt_ns } else { 0.0 },
            "ratio",
            "target ≤ 1.0",
        ),
        Figure::new(
            "capture.tcp_probe.events_per_s",
            events_per_s,
            "events/s",
            "tcp_probe program runs per second",
        ),
        Figure::new(
            "capture.load.round_trips_per_s",
            (rt1 - rt0) as f64 / secs,
            "req/s",
            "loopback echo round trips",
        ),
        Figure::new(
            "agent.cpu_percent_of_one_core",
            cpu_pct,
            "%",
            "CPU time of tokenflow-agent (release, all threads, schedstat) at that load; target ≤ 1 %",
        ),
        Figure::new(
            "agent.rss_bytes",
            rss as f64,
            "bytes",
            "VmRSS of tokenflow-agent at the end of the run",
        ),
        Figure::new(
            "capture.events_lost",
            lost as f64,
            "events",
            "flow inserts refused + closed events dropped; target 0",
        ),
    ]);
    println!("\ncapture cost, same run, same traffic ({events_per_s:.0} tcp_probe events/s):");
    println!("  tokenflow tf_tcp_probe (per-flow state + histograms): {probe_ns:>7.0} ns/event");
    println!("  bpftrace hist(args->srtt) one-liner:                  {bt_ns:>7.0} ns/event");
    println!(
        "  ratio {:.2} ({}), agent {cpu_pct:.2} % of one core, RSS {:.1} MB, {lost} events lost",
        probe_ns / bt_ns.max(1e-9),
        if probe_ns <= bt_ns {
            "target met: no dearer than bpftrace"
        } else {
            "target missed: dearer than bpftrace"
        },
        rss as f64 / 1e6
    );
    Ok(figures)
}

extern "C" fn bench_body(x: u64) -> u64 {
    std::hint::black_box(x.wrapping_add(1))
}

tokenflow_markers::probe_point!(
    /// The optimised uprobe target: a probe point that the benchmark calls in a loop.
    pub fn tokenflow_bench_target(x: u64) -> u64 => bench_body
);

/// The ordinary uprobe target: same body, ordinary entry.
#[unsafe(no_mangle)]
#[inline(never)]
pub extern "C" fn tokenflow_bench_target_plain(x: u64) -> u64 {
    std::hint::black_box(x.wrapping_add(1))
}

fn time_calls(n: u64, f: extern "C" fn(u64) -> u64) -> Duration {
    let f = std::hint::black_box(f);
    let t0 = Instant::now();
    let mut acc = 0u64;
    for i in 0..n {
        acc = acc.wrapping_add(f(std::hint::black_box(i)));
    }
    std::hint::black_box(acc);
    t0.elapsed()
}

fn per_call_ns(probed: Duration, bare: Duration, calls: u64) -> f64 {
    (probed.as_nanos() as f64 - bare.as_nanos() as f64) / calls as f64
}
