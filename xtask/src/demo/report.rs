//! The demo's report: figures per run, per arm with bootstrap intervals, the targets, and the
//! files under `results/<timestamp>/` (report.json, runs.jsonl, requests.jsonl, index.html, PNGs).

use std::{collections::BTreeMap, fmt::Write as _, io::Write, path::Path};

use anyhow::{Context, Result};
use plotters::prelude::*;
use serde::Serialize;

use super::{
    DemoArgs, Run,
    scenario::{Role, Scenario},
    stats::{Estimate, bootstrap, over_repeats, quantile},
};
use crate::{report::Figure, util::step};

const ITERS: usize = 1000;

/// One run's figures over its measurement window (warm-up dropped).
#[derive(Clone, Debug, Default, Serialize)]
pub struct RunFigures {
    pub ttft: BTreeMap<String, Vec<f64>>,
    pub itl: BTreeMap<String, Vec<f64>>,
    pub e2e: BTreeMap<String, Vec<f64>>,
    pub rps: BTreeMap<String, f64>,
    pub tokens_per_s: BTreeMap<String, f64>,
    pub goodput_per_s: BTreeMap<String, f64>,
    /// Failed requests (not counting shed ones).
    pub errors: BTreeMap<String, usize>,
    /// Requests the pacer shed after `--max-wait` at its gate (never sent).
    pub shed: BTreeMap<String, usize>,
    pub timeouts: BTreeMap<String, usize>,
    pub probe: Vec<f64>,
    pub interactive_rtt_p99_ms: f64,
    pub retransmits: f64,
    pub link_utilization: f64,
    /// Control periods after the bottleneck fell until the node's p95 RTT was within ±20 % of the
    /// setpoint for the rest of the narrowed segment (None: never; absent without a step).
    pub settle_periods: Option<f64>,
    /// The same, counting only the queue's side: until the p95 was under 1.2 × the setpoint for
    /// the rest of the segment (a rate held under the link counts as back).
    pub under_periods: Option<f64>,
    /// The run stepped the bottleneck down.
    pub stepped: bool,
}

fn in_window(r: &Run, t_s: f64) -> bool {
    t_s >= r.warmup_s && t_s <= r.duration_s
}

pub fn figures(r: &Run, setpoint_ms: f64) -> RunFigures {
    let mut f = RunFigures::default();
    let span = (r.duration_s - r.warmup_s).max(1e-9);
    for c in &r.clients {
        let role = c.role.name().to_string();
        let reqs: Vec<_> = c
            .requests
            .iter()
            .filter(|q| in_window(r, q.submitted_ms / 1000.0))
            .collect();
        let ok: Vec<_> = reqs.iter().filter(|q| q.ok()).collect();
        f.ttft
            .insert(role.clone(), ok.iter().filter_map(|q| q.ttft_ms).collect());
        f.itl.insert(
            role.clone(),
            ok.iter().flat_map(|q| q.itl_ms.iter().copied()).collect(),
        );
        f.e2e
            .insert(role.clone(), ok.iter().map(|q| q.e2e_ms).collect());
        f.rps.insert(role.clone(), ok.len() as f64 / span);
        f.tokens_per_s.insert(
            role.clone(),
            ok.iter().map(|q| q.tokens_out as f64).sum::<f64>() / span,
        );
        f.goodput_per_s.insert(
            role.clone(),
            ok.iter()
                .filter(|q| q.ttft_ms.is_some_and(|t| t <= c.slo_ttft_ms))
                .count() as f64
                / span,
        );
        let shed = reqs
            .iter()
            .filter(|q| q.error.as_deref().is_some_and(|e| e.starts_with("shed:")))
            .count();
        f.errors.insert(role.clone(), reqs.len() - ok.len() - shed);
        f.shed.insert(role.clone(), shed);
        f.timeouts.insert(
            role,
            reqs.iter()
                .filter(|q| {
                    q.error
                        .as_deref()
                        .is_some_and(|e| e.contains("timed out") || e.contains("timeout"))
                })
                .count(),
        );
    }
    f.probe = r
        .probe
        .iter()
        .filter(|(t, _)| in_window(r, *t))
        .map(|(_, v)| *v)
        .collect();
    let ws: Vec<_> = r.windows.iter().filter(|w| in_window(r, w.t)).collect();
    let mut hist: BTreeMap<u64, u64> = BTreeMap::new();
    for w in &ws {
        for [_, hi, n] in &w.interactive_hist {
            *hist.entry(*hi).or_default() += n;
        }
    }
    let total: u64 = hist.values().sum();
    f.interactive_rtt_p99_ms = if total == 0 {
        f64::NAN
    } else {
        let mut acc = 0;
        let mut p = f64::NAN;
        for (hi, n) in &hist {
            acc += n;
            if acc as f64 >= 0.99 * total as f64 {
                p = *hi as f64 / 1000.0;
                break;
            }
        }
        p
    };
    f.retransmits = ws.iter().map(|w| w.retransmits as f64).sum();
    let kbit_s: f64 = ws.iter().map(|w| rate_at(r, w.t)).sum::<f64>() * 1000.0;
    f.link_utilization = if kbit_s > 0.0 {
        ws.iter().map(|w| w.bytes_acked as f64 * 8.0).sum::<f64>() / kbit_s
    } else {
        f64::NAN
    };
    if let Some(&(t_down, _)) = r.steps.get(1) {
        let t_up = r.steps.get(2).map_or(r.duration_s, |s| s.0);
        let p95: Vec<f64> = r
            .windows
            .iter()
            .filter(|w| w.t > t_down && w.t <= t_up)
            .map(|w| w.p95_ms)
            .collect();
        f.stepped = true;
        f.settle_periods = settle(&p95, |p| (p - setpoint_ms).abs() <= 0.2 * setpoint_ms);
        f.under_periods = settle(&p95, |p| p <= 1.2 * setpoint_ms);
    }
    f
}

/// Periods from a step until every later window's p95 is `inside` (0: none left it; None: the
/// last window is still outside, so the segment ended before the loop came back).
fn settle(p95: &[f64], inside: impl Fn(f64) -> bool) -> Option<f64> {
    match p95.iter().rposition(|&p| !inside(p)) {
        None => Some(0.0),
        Some(k) if k + 1 < p95.len() => Some((k + 1) as f64),
        Some(_) => None,
    }
}

fn rate_at(r: &Run, t: f64) -> f64 {
    r.steps
        .iter()
        .rev()
        .find(|(s, _)| *s <= t)
        .map(|(_, k)| *k as f64)
        .unwrap_or(f64::NAN)
}

/// One arm of one scenario, over its repeats.
#[derive(Clone, Debug, Serialize)]
pub struct ArmSummary {
    pub scenario: String,
    pub arm: String,
    pub repeats: usize,
    pub ttft_p50_ms: BTreeMap<String, Estimate>,
    pub ttft_p99_ms: BTreeMap<String, Estimate>,
    pub itl_p50_ms: BTreeMap<String, Estimate>,
    pub itl_p99_ms: BTreeMap<String, Estimate>,
    pub e2e_p50_ms: BTreeMap<String, Estimate>,
    pub e2e_p95_ms: BTreeMap<String, Estimate>,
    pub e2e_p99_ms: BTreeMap<String, Estimate>,
    pub requests_per_s: BTreeMap<String, Estimate>,
    pub tokens_per_s: BTreeMap<String, Estimate>,
    pub goodput_per_s: BTreeMap<String, Estimate>,
    pub errors: BTreeMap<String, usize>,
    pub shed: BTreeMap<String, usize>,
    pub timeouts: BTreeMap<String, usize>,
    pub probe_p50_ms: Estimate,
    pub probe_p99_ms: Estimate,
    pub interactive_rtt_p99_ms: Estimate,
    pub retransmits: Estimate,
    pub link_utilization: Estimate,
    pub settle_periods: Option<Estimate>,
    pub under_periods: Option<Estimate>,
}

fn summarize(scenario: &str, arm: &str, figs: &[RunFigures]) -> ArmSummary {
    let seed = 17;
    let roles: Vec<String> = figs
        .first()
        .map(|f| f.ttft.keys().cloned().collect())
        .unwrap_or_default();
    let pct = |m: &dyn Fn(&RunFigures) -> &BTreeMap<String, Vec<f64>>, q: f64| {
        roles
            .iter()
            .map(|role| {
                let reps: Vec<Vec<f64>> = figs
                    .iter()
                    .map(|f| m(f).get(role).cloned().unwrap_or_default())
                    .collect();
                (
                    role.clone(),
                    bootstrap(&reps, |v| quantile(v, q), ITERS, seed),
                )
            })
            .collect::<BTreeMap<_, _>>()
    };
    let rate = |m: &dyn Fn(&RunFigures) -> &BTreeMap<String, f64>| {
        roles
            .iter()
            .map(|role| {
                let v: Vec<f64> = figs
                    .iter()
                    .map(|f| m(f).get(role).copied().unwrap_or(f64::NAN))
                    .collect();
                (role.clone(), over_repeats(&v, ITERS, seed))
            })
            .collect::<BTreeMap<_, _>>()
    };
    let count = |m: &dyn Fn(&RunFigures) -> &BTreeMap<String, usize>| {
        roles
            .iter()
            .map(|role| {
                (
                    role.clone(),
                    figs.iter()
                        .map(|f| m(f).get(role).copied().unwrap_or(0))
                        .sum(),
                )
            })
            .collect::<BTreeMap<_, _>>()
    };
    let probes: Vec<Vec<f64>> = figs.iter().map(|f| f.probe.clone()).collect();
    let has_step = figs.iter().any(|f| f.stepped);
    // A run that never settled counts as not settled: the estimate is NaN unless all did.
    let periods = |get: &dyn Fn(&RunFigures) -> Option<f64>| {
        let v: Vec<f64> = figs.iter().map(|f| get(f).unwrap_or(f64::NAN)).collect();
        has_step.then(|| {
            if v.iter().all(|s| s.is_finite()) {
                over_repeats(&v, ITERS, seed)
            } else {
                Estimate::nan()
            }
        })
    };
    ArmSummary {
        scenario: scenario.to_string(),
        arm: arm.to_string(),
        repeats: figs.len(),
        ttft_p50_ms: pct(&|f| &f.ttft, 0.5),
        ttft_p99_ms: pct(&|f| &f.ttft, 0.99),
        itl_p50_ms: pct(&|f| &f.itl, 0.5),
        itl_p99_ms: pct(&|f| &f.itl, 0.99),
        e2e_p50_ms: pct(&|f| &f.e2e, 0.5),
        e2e_p95_ms: pct(&|f| &f.e2e, 0.95),
        e2e_p99_ms: pct(&|f| &f.e2e, 0.99),
        requests_per_s: rate(&|f| &f.rps),
        tokens_per_s: rate(&|f| &f.tokens_per_s),
        goodput_per_s: rate(&|f| &f.goodput_per_s),
        errors: count(&|f| &f.errors),
        shed: count(&|f| &f.shed),
        timeouts: count(&|f| &f.timeouts),
        probe_p50_ms: bootstrap(&probes, |v| quantile(v, 0.5), ITERS, seed),
        probe_p99_ms: bootstrap(&probes, |v| quantile(v, 0.99), ITERS, seed),
        interactive_rtt_p99_ms: over_repeats(
            &figs
                .iter()
                .map(|f| f.interactive_rtt_p99_ms)
                .collect::<Vec<_>>(),
            ITERS,
            seed,
        ),
        retransmits: over_repeats(
            &figs.iter().map(|f| f.retransmits).collect::<Vec<_>>(),
            ITERS,
            seed,
        ),
        link_utilization: over_repeats(
            &figs.iter().map(|f| f.link_utilization).collect::<Vec<_>>(),
            ITERS,
            seed,
        ),
        settle_periods: periods(&|f| f.settle_periods),
        under_periods: periods(&|f| f.under_periods),
    }
}

/// A target from the issue, evaluated.
#[derive(Clone, Debug, Serialize)]
pub struct Target {
    pub scenario: String,
    pub target: String,
    pub measured: String,
    pub met: bool,
}

pub struct Report {
    pub figures: Vec<Figure>,
    /// The README's block for this run: the lead picture, the table, the targets.
    pub markdown: String,
    pub pngs: Vec<String>,
}

const README_START: &str = "<!-- demo:start -->";
const README_END: &str = "<!-- demo:end -->";

/// Copies the plots it shows to docs/demo/ and puts the run's table into the README between the markers.
pub fn readme(out: &Path, rep: &Report) -> Result<()> {
    let docs = crate::util::root().join("docs/demo");
    std::fs::create_dir_all(&docs)?;
    // Only the plots the README shows; the rest stay in the run's folder.
    for p in rep
        .pngs
        .iter()
        .filter(|p| rep.markdown.contains(p.as_str()))
    {
        std::fs::copy(out.join(p), docs.join(p)).with_context(|| format!("copying {p}"))?;
    }
    let path = crate::util::root().join("README.md");
    let text = std::fs::read_to_string(&path)?;
    if let (Some(a), Some(b)) = (text.find(README_START), text.find(README_END)) {
        let new = format!(
            "{}{README_START}\n{}{}",
            &text[..a],
            rep.markdown,
            &text[b..]
        );
        std::fs::write(&path, new)?;
        step(
            "demo",
            "README: the demo's table and plots (docs/demo/) updated",
        );
    }
    Ok(())
}

fn markdown(out: &Path, sums: &[ArmSummary], targets: &[Target], a: &DemoArgs) -> String {
    let mut m = String::new();
    let _ = writeln!(
        m,
        "Latest full run: `{}` ({} repeats per arm, {:.0} s warm-up dropped; 95 % bootstrap intervals).\n",
        out.strip_prefix(crate::util::root())
            .unwrap_or(out)
            .display(),
        sums.first().map_or(0, |s| s.repeats),
        a.warmup.as_secs_f64()
    );
    m.push_str("![network-bound: probe RTT, hint rate and TTFT per arm](docs/demo/network-bound-timeseries.png)\n\n");
    m.push_str(
        "![network-bound: p99 vs throughput](docs/demo/network-bound-p99-vs-throughput.png)\n\n",
    );
    m.push_str("| scenario | arm | headline p99 ms [95 % CI] | throughput [95 % CI] | probe p99 ms | errors | shed |\n|---|---|---:|---:|---:|---:|---:|\n");
    for s in sums {
        let (pn, p, gn, g) = headline(s);
        let _ = writeln!(
            m,
            "| {} | {} | {} ({}) | {} ({}) | {} | {} | {} |",
            s.scenario,
            s.arm,
            ci(p),
            pn.trim_end_matches(" ms"),
            ci(g),
            gn,
            ci(s.probe_p99_ms),
            s.errors.values().sum::<usize>(),
            s.shed.values().sum::<usize>()
        );
    }
    let frontier: Vec<String> = sums
        .iter()
        .filter_map(|s| super::scenario::arm_setpoint(&s.arm).map(|sp| (s, sp)))
        .map(|(s, sp)| {
            format!(
                "`{}` is `pid` with a {sp:.0} ms setpoint ({})",
                s.arm, s.scenario
            )
        })
        .collect::<std::collections::BTreeSet<_>>()
        .into_iter()
        .collect();
    if !frontier.is_empty() {
        let _ = writeln!(
            m,
            "\n{}: a further point on its p99-vs-throughput frontier, for the comparison with the baselines at their throughput; every other `pid` target is on `pid` at the {:.0} ms setpoint.",
            frontier.join("; "),
            a.setpoint_ms
        );
    }
    m.push_str("\nTargets (issue 5/6):\n\n");
    for t in targets {
        let _ = writeln!(
            m,
            "- **{}** {}: {} — {}",
            if t.met { "met" } else { "missed" },
            t.scenario,
            t.target,
            t.measured
        );
    }
    m.push('\n');
    m
}

fn e(m: &BTreeMap<String, Estimate>, role: &str) -> Estimate {
    m.get(role).copied().unwrap_or_else(Estimate::nan)
}

fn targets(sums: &[ArmSummary], setpoint: f64) -> Vec<Target> {
    let get = |sc: &str, arm: &str| sums.iter().find(|s| s.scenario == sc && s.arm == arm);
    let mut t = Vec::new();
    let mut push = |scenario: &str, target: String, measured: String, met: bool| {
        t.push(Target {
            scenario: scenario.into(),
            target,
            measured,
            met,
        })
    };
    if let (Some(off), Some(pid)) = (get("network-bound", "off"), get("network-bound", "pid")) {
        let (po, io) = (off.probe_p99_ms.value, off.interactive_rtt_p99_ms.value);
        push(
            "network-bound",
            format!(
                "off: probe and interactive p99 RTT ≥ {:.0} ms",
                3.0 * setpoint
            ),
            format!("probe {po:.0} ms, interactive {io:.0} ms"),
            po >= 3.0 * setpoint && io >= 3.0 * setpoint,
        );
        let (pp, ip) = (pid.probe_p99_ms.value, pid.interactive_rtt_p99_ms.value);
        push(
            "network-bound",
            format!(
                "pid: probe and interactive p99 RTT ≤ {:.0} ms",
                1.5 * setpoint
            ),
            format!("probe {pp:.0} ms, interactive {ip:.0} ms"),
            pp <= 1.5 * setpoint && ip <= 1.5 * setpoint,
        );
        let g = e(&pid.goodput_per_s, "batch").value / e(&off.goodput_per_s, "batch").value;
        push(
            "network-bound",
            "pid: batch goodput ≥ 95 % of off".into(),
            format!("{:.0} %", 100.0 * g),
            g >= 0.95,
        );
        let (bp, bo) = (
            e(&pid.e2e_p99_ms, "batch").value,
            e(&off.e2e_p99_ms, "batch").value,
        );
        push(
            "network-bound",
            "pid: batch users' own p99 latency no worse than off".into(),
            format!("{bp:.0} ms vs {bo:.0} ms (end to end, from submission)"),
            bp <= bo,
        );
        // pid's frontier: the default arm and any pid@MS arm. Sending less never lengthens a
        // queue, so a pid point with at least a baseline's throughput (within 5 %) and no worse
        // p99 (within 5 %) is pid at least as good at that throughput.
        let frontier: Vec<&ArmSummary> = sums
            .iter()
            .filter(|s| {
                s.scenario == "network-bound" && super::scenario::arm_controller(&s.arm) == "pid"
            })
            .collect();
        for base in ["gradient2", "aimd"] {
            if let Some(b) = get("network-bound", base) {
                let (x, gx) = (b.probe_p99_ms.value, e(&b.goodput_per_s, "batch").value);
                let point =
                    |s: &ArmSummary| (s.probe_p99_ms.value, e(&s.goodput_per_s, "batch").value);
                let as_much: Vec<&&ArmSummary> = frontier
                    .iter()
                    .filter(|s| point(s).1 >= gx * 0.95)
                    .collect();
                // The best of pid's points that carry as much: the lowest p99.
                let best = as_much
                    .iter()
                    .min_by(|p, q| point(p).0.total_cmp(&point(q).0))
                    .copied()
                    .copied();
                let shown = best.unwrap_or(pid);
                let (y, gy) = point(shown);
                push(
                    "network-bound",
                    format!("pid at least as good as {base} on probe p99 at equal throughput"),
                    format!(
                        "{} {y:.0} ms at {gy:.1} req/s, {base} {x:.0} ms at {gx:.1} req/s{}",
                        shown.arm,
                        if best.is_none() {
                            " (no pid point carries as much)"
                        } else {
                            ""
                        }
                    ),
                    best.is_some() && y <= x * 1.05,
                );
            }
        }
        if let Some(s) = get("network-bound", "sigmoid") {
            let (x, y) = (s.probe_p99_ms.value, pid.probe_p99_ms.value);
            let (gx, gy) = (
                e(&s.goodput_per_s, "batch").value,
                e(&pid.goodput_per_s, "batch").value,
            );
            push(
                "network-bound",
                "pid clearly better than sigmoid".into(),
                format!("pid {y:.0} ms at {gy:.1} req/s, sigmoid {x:.0} ms at {gx:.1} req/s"),
                (pid.probe_p99_ms.hi < s.probe_p99_ms.lo && gy >= 0.95 * gx)
                    || (gy > s.goodput_per_s.get("batch").map_or(f64::NAN, |g| g.hi) && y <= x),
            );
        }
    }
    if let (Some(off), Some(pid)) = (get("compute-bound", "off"), get("compute-bound", "pid")) {
        let r = e(&off.ttft_p99_ms, "interactive").value / e(&pid.ttft_p99_ms, "interactive").value;
        push(
            "compute-bound",
            "pid: interactive TTFT p99 ≥ 5× lower than off".into(),
            format!(
                "{r:.2}× ({:.0} → {:.0} ms)",
                e(&off.ttft_p99_ms, "interactive").value,
                e(&pid.ttft_p99_ms, "interactive").value
            ),
            r >= 5.0,
        );
        let tot = |s: &ArmSummary| s.tokens_per_s.values().map(|x| x.value).sum::<f64>();
        let g = tot(pid) / tot(off);
        push(
            "compute-bound",
            "pid: total tokens/s ≥ 90 % of off".into(),
            format!("{:.1} %", 100.0 * g),
            g >= 0.9,
        );
        let to: usize = pid.timeouts.values().sum();
        push(
            "compute-bound",
            "pid: zero timeouts".into(),
            format!("{to}"),
            to == 0,
        );
    }
    if let (Some(off), Some(pid)) = (get("open-loop", "off"), get("open-loop", "pid")) {
        let (p, o) = (
            e(&pid.goodput_per_s, "batch").value,
            e(&off.goodput_per_s, "batch").value,
        );
        // Off at zero: any goodput is more than twice it, none is not.
        let met = if o > 0.0 { p / o >= 2.0 } else { p > 0.0 };
        let ratio = if o > 0.0 {
            format!("{:.2}×", p / o)
        } else if p > 0.0 {
            "off has none;".into()
        } else {
            "neither has any;".into()
        };
        push(
            "open-loop",
            "pid: goodput ≥ 2× off".into(),
            format!("{ratio} ({p:.2} vs {o:.2} req/s within the SLO)"),
            met,
        );
    }
    if let Some(pid) = get("bandwidth-step", "pid") {
        let s = pid.settle_periods.map_or(f64::NAN, |s| s.value);
        let u = pid.under_periods.map_or(f64::NAN, |s| s.value);
        let shown = |p: f64| {
            if p.is_finite() {
                format!("{p:.1} periods")
            } else {
                "not within the step".into()
            }
        };
        push(
            "bandwidth-step",
            "pid: p95 RTT back within ±20 % of the setpoint within 5 control periods of the step down".into(),
            format!("{} (back under 1.2 × the setpoint: {})", shown(s), shown(u)),
            s <= 5.0,
        );
    }
    t
}

/// One line per finished run for the progress output.
pub fn one_line(r: &Run, setpoint_ms: f64) -> String {
    let f = figures(r, setpoint_ms);
    let mut s = format!("{} · {} · #{}:", r.scenario, r.arm, r.repeat);
    for c in &r.clients {
        let role = c.role.name();
        let _ = write!(
            s,
            " {role} {:.1} req/s TTFT p99 {:.0} ms;",
            f.rps.get(role).copied().unwrap_or(f64::NAN),
            quantile(f.ttft.get(role).map(Vec::as_slice).unwrap_or(&[]), 0.99)
        );
    }
    let _ = write!(s, " probe p99 {:.0} ms", quantile(&f.probe, 0.99));
    s
}

pub fn write(
    runs: &[Run],
    plan: &[Scenario],
    arms: &[String],
    a: &DemoArgs,
    out: &Path,
) -> Result<Report> {
    let figs: Vec<(usize, RunFigures)> = runs
        .iter()
        .enumerate()
        .map(|(i, r)| {
            let sp = super::scenario::arm_setpoint(&r.arm).unwrap_or(a.setpoint_ms);
            (i, figures(r, sp))
        })
        .collect();
    let mut sums = Vec::new();
    for sc in plan {
        for arm in arms {
            let f: Vec<RunFigures> = figs
                .iter()
                .filter(|(i, _)| runs[*i].scenario == sc.name && &runs[*i].arm == arm)
                .map(|(_, f)| f.clone())
                .collect();
            if !f.is_empty() {
                sums.push(summarize(sc.name, arm, &f));
            }
        }
    }
    let targets = targets(&sums, a.setpoint_ms);
    // Raw data: one line per run, one per request.
    let mut runs_f = std::io::BufWriter::new(std::fs::File::create(out.join("runs.jsonl"))?);
    let mut reqs_f = std::io::BufWriter::new(std::fs::File::create(out.join("requests.jsonl"))?);
    for r in runs {
        serde_json::to_writer(&mut runs_f, r)?;
        runs_f.write_all(b"\n")?;
        for c in &r.clients {
            for q in &c.requests {
                let mut v = serde_json::to_value(q)?;
                v["scenario"] = r.scenario.clone().into();
                v["arm"] = r.arm.clone().into();
                v["repeat"] = r.repeat.into();
                v["role"] = c.role.name().into();
                serde_json::to_writer(&mut reqs_f, &v)?;
                reqs_f.write_all(b"\n")?;
            }
        }
    }
    runs_f.flush()?;
    reqs_f.flush()?;
    let report = serde_json::json!({
        "measurement": {
            "warmup_s": a.warmup.as_secs_f64(),
            "window": "requests submitted after the warm-up and before the run's end; latencies from submission (pacer wait included)",
            "setpoint_ms": a.setpoint_ms,
            "bootstrap": format!("{ITERS} hierarchical resamples (repeats, then observations); 95 % percentile intervals"),
        },
        "scenarios": plan,
        "arms": sums,
        "targets": targets,
    });
    std::fs::write(out.join("report.json"), serde_json::to_vec_pretty(&report)?)?;
    load_font()?;
    let mut pngs: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for sc in plan {
        let rs: Vec<&Run> = runs.iter().filter(|r| r.scenario == sc.name).collect();
        if rs.is_empty() {
            continue;
        }
        let mut v = Vec::new();
        let name = format!("{}-timeseries.png", sc.name);
        plot_timeseries(&rs, arms, &out.join(&name), a.setpoint_ms)
            .with_context(|| format!("plotting {name}"))?;
        v.push(name);
        let name = format!("{}-cdf.png", sc.name);
        plot_cdf(
            &rs,
            arms,
            &figs
                .iter()
                .filter(|(i, _)| runs[*i].scenario == sc.name)
                .map(|(i, f)| (runs[*i].arm.clone(), f.clone()))
                .collect::<Vec<_>>(),
            &out.join(&name),
        )
        .with_context(|| format!("plotting {name}"))?;
        v.push(name);
        let name = format!("{}-p99-vs-throughput.png", sc.name);
        plot_tradeoff(
            sc,
            &sums
                .iter()
                .filter(|s| s.scenario == sc.name)
                .cloned()
                .collect::<Vec<_>>(),
            &out.join(&name),
        )
        .with_context(|| format!("plotting {name}"))?;
        v.push(name);
        pngs.insert(sc.name.to_string(), v);
    }
    std::fs::write(
        out.join("index.html"),
        html(plan, &sums, &targets, &pngs, a),
    )?;
    print_table(&sums, &targets);
    step(
        "demo",
        format!(
            "report.json, runs.jsonl, requests.jsonl, index.html and {} plots in {}",
            pngs.values().map(Vec::len).sum::<usize>(),
            out.display()
        ),
    );
    Ok(Report {
        figures: bench_figures(&sums, &targets),
        markdown: markdown(out, &sums, &targets, a),
        pngs: pngs.values().flatten().cloned().collect(),
    })
}

fn headline(s: &ArmSummary) -> (String, Estimate, String, Estimate) {
    match s.scenario.as_str() {
        "network-bound" | "bandwidth-step" => (
            "probe p99 RTT ms".into(),
            s.probe_p99_ms,
            "batch goodput req/s".into(),
            e(&s.goodput_per_s, "batch"),
        ),
        "compute-bound" => (
            "interactive TTFT p99 ms".into(),
            e(&s.ttft_p99_ms, "interactive"),
            "total tokens/s".into(),
            Estimate {
                value: s.tokens_per_s.values().map(|x| x.value).sum(),
                lo: s.tokens_per_s.values().map(|x| x.lo).sum(),
                hi: s.tokens_per_s.values().map(|x| x.hi).sum(),
            },
        ),
        _ => (
            "TTFT p99 ms".into(),
            e(&s.ttft_p99_ms, "batch"),
            "goodput req/s".into(),
            e(&s.goodput_per_s, "batch"),
        ),
    }
}

fn ci(x: Estimate) -> String {
    if x.value.is_nan() {
        "–".into()
    } else if x.lo.is_nan() {
        format!("{:.1}", x.value)
    } else {
        format!("{:.1} [{:.1}, {:.1}]", x.value, x.lo, x.hi)
    }
}

fn print_table(sums: &[ArmSummary], targets: &[Target]) {
    println!(
        "\n│ {:<15} │ {:<9} │ {:>26} │ {:>26} │ {:>24} │ {:>9} │ {:>6} │",
        "scenario",
        "arm",
        "headline p99 (ms) [95 % CI]",
        "throughput [95 % CI]",
        "probe p99 ms [95 % CI]",
        "errors",
        "shed"
    );
    for s in sums {
        let (_, p, _, g) = headline(s);
        println!(
            "│ {:<15} │ {:<9} │ {:>26} │ {:>26} │ {:>24} │ {:>9} │ {:>6} │",
            s.scenario,
            s.arm,
            ci(p),
            ci(g),
            ci(s.probe_p99_ms),
            s.errors.values().sum::<usize>(),
            s.shed.values().sum::<usize>()
        );
    }
    println!("\ntargets:");
    for t in targets {
        println!(
            "  {} {:<15} {} — {}",
            if t.met { "met   " } else { "MISSED" },
            t.scenario,
            t.target,
            t.measured
        );
    }
}

fn bench_figures(sums: &[ArmSummary], targets: &[Target]) -> Vec<Figure> {
    let mut v = Vec::new();
    for s in sums {
        let (pn, p, gn, g) = headline(s);
        v.push(Figure::new(
            &format!("demo.{}.{}.p99_ms", s.scenario, s.arm),
            p.value,
            "ms",
            &format!("{pn}, 95 % CI [{:.1}, {:.1}]", p.lo, p.hi),
        ));
        v.push(Figure::new(
            &format!("demo.{}.{}.throughput", s.scenario, s.arm),
            g.value,
            if gn.contains("tokens") {
                "tokens/s"
            } else {
                "req/s"
            },
            &format!("{gn}, 95 % CI [{:.2}, {:.2}]", g.lo, g.hi),
        ));
    }
    let met = targets.iter().filter(|t| t.met).count();
    v.push(Figure::new(
        "demo.targets_met",
        met as f64,
        &format!("of {}", targets.len()),
        "issue 5/6 targets met by the latest full demo (see results/<ts>/index.html)",
    ));
    v
}

fn load_font() -> Result<()> {
    let path = "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf";
    let bytes = std::fs::read(path).with_context(|| {
        format!("reading {path} (Debian package fonts-dejavu-core; run `cargo xtask setup`)")
    })?;
    let bytes: &'static [u8] = Box::leak(bytes.into_boxed_slice());
    plotters::style::register_font("sans-serif", FontStyle::Normal, bytes)
        .map_err(|_| anyhow::anyhow!("{path} is not a usable font"))?;
    Ok(())
}

const COLORS: [RGBColor; 5] = [
    RGBColor(120, 120, 120),
    RGBColor(214, 39, 40),
    RGBColor(31, 119, 180),
    RGBColor(44, 160, 44),
    RGBColor(255, 127, 14),
];

/// `pid`'s further frontier points (`pid@MS`): a lighter red.
const PID_FRONTIER: RGBColor = RGBColor(240, 128, 128);

fn color(arms: &[String], arm: &str) -> RGBColor {
    if super::scenario::arm_setpoint(arm).is_some() {
        return PID_FRONTIER;
    }
    COLORS[arms.iter().position(|a| a == arm).unwrap_or(0) % COLORS.len()]
}

fn pe<E: std::fmt::Debug>(e: E) -> anyhow::Error {
    anyhow::anyhow!("{e:?}")
}

/// Per second: probe p99, the batch (or only) client's hint rate, and its TTFT p50, for the first
/// repeat of every arm; the bottleneck changes are marked.
fn plot_timeseries(rs: &[&Run], arms: &[String], path: &Path, setpoint: f64) -> Result<()> {
    let root = BitMapBackend::new(path, (1100, 900)).into_drawing_area();
    root.fill(&WHITE).map_err(pe)?;
    let panels = root.split_evenly((3, 1));
    let first: Vec<&Run> = arms
        .iter()
        .filter_map(|a| rs.iter().find(|r| &r.arm == a && r.repeat == 1).copied())
        .collect();
    let dur = first.iter().map(|r| r.duration_s).fold(1.0, f64::max);
    let per_sec = |pts: Vec<(f64, f64)>, q: f64| -> Vec<(f64, f64)> {
        let mut b: BTreeMap<i64, Vec<f64>> = BTreeMap::new();
        for (t, v) in pts {
            b.entry(t.floor() as i64).or_default().push(v);
        }
        b.into_iter()
            .map(|(t, v)| (t as f64 + 0.5, quantile(&v, q)))
            .collect()
    };
    type Lines = Vec<Vec<(f64, f64)>>;
    let series: Vec<(&str, Lines)> = vec![
        (
            "probe RTT p99 per second (ms)",
            first
                .iter()
                .map(|r| per_sec(r.probe.clone(), 0.99))
                .collect(),
        ),
        (
            "hint rate for the batch client (req/s; off: none)",
            first
                .iter()
                .map(|r| {
                    r.ticks
                        .iter()
                        .filter_map(|t| {
                            t.hint_rps
                                .iter()
                                .find(|(role, _)| role == "batch")
                                .map(|(_, v)| (t.t, *v))
                        })
                        .collect()
                })
                .collect(),
        ),
        (
            "TTFT p50 per second, from submission (ms)",
            first
                .iter()
                .map(|r| {
                    let c = r
                        .clients
                        .iter()
                        .find(|c| c.role == Role::Interactive)
                        .or(r.clients.first());
                    per_sec(
                        c.map(|c| {
                            c.requests
                                .iter()
                                .filter_map(|q| q.ttft_ms.map(|t| (q.submitted_ms / 1000.0, t)))
                                .collect()
                        })
                        .unwrap_or_default(),
                        0.5,
                    )
                })
                .collect(),
        ),
    ];
    for (i, (title, lines)) in series.iter().enumerate() {
        let ymax = lines
            .iter()
            .flatten()
            .map(|p| p.1)
            .filter(|v| v.is_finite())
            .fold(if i == 0 { setpoint * 1.5 } else { 1.0 }, f64::max)
            * 1.1;
        let mut ch = ChartBuilder::on(&panels[i])
            .caption(*title, ("sans-serif", 18))
            .margin(8)
            .x_label_area_size(28)
            .y_label_area_size(56)
            .build_cartesian_2d(0.0..dur, 0.0..ymax)
            .map_err(pe)?;
        ch.configure_mesh()
            .x_desc("seconds into the run")
            .draw()
            .map_err(pe)?;
        if let Some(r) = first.first() {
            for &(t, k) in r.steps.iter().skip(1) {
                ch.draw_series(LineSeries::new(
                    [(t, 0.0), (t, ymax)],
                    BLACK.stroke_width(1),
                ))
                .map_err(pe)?
                .label(format!("bottleneck → {} Mbit/s", k / 1000));
            }
        }
        if i == 0 {
            ch.draw_series(LineSeries::new(
                [(0.0, setpoint), (dur, setpoint)],
                RGBColor(150, 150, 150).stroke_width(1),
            ))
            .map_err(pe)?;
        }
        for (r, pts) in first.iter().zip(lines) {
            let c = color(arms, &r.arm);
            ch.draw_series(LineSeries::new(pts.iter().copied(), c.stroke_width(2)))
                .map_err(pe)?
                .label(r.arm.clone())
                .legend(move |(x, y)| PathElement::new([(x, y), (x + 16, y)], c.stroke_width(2)));
        }
        if i == 0 {
            ch.configure_series_labels()
                .background_style(WHITE.mix(0.8))
                .border_style(BLACK)
                .draw()
                .map_err(pe)?;
        }
    }
    root.present().map_err(pe)?;
    Ok(())
}

/// CDFs per arm: TTFT from submission (interactive client where there is one) and probe RTT.
fn plot_cdf(
    rs: &[&Run],
    arms: &[String],
    figs: &[(String, RunFigures)],
    path: &Path,
) -> Result<()> {
    let root = BitMapBackend::new(path, (1100, 450)).into_drawing_area();
    root.fill(&WHITE).map_err(pe)?;
    let halves = root.split_evenly((1, 2));
    let role = if rs
        .iter()
        .any(|r| r.clients.iter().any(|c| c.role == Role::Interactive))
    {
        "interactive"
    } else {
        "batch"
    };
    for (i, (title, get)) in [
        (
            format!("TTFT from submission, {role} (ms)"),
            Box::new(|f: &RunFigures| f.ttft.get(role).cloned().unwrap_or_default())
                as Box<dyn Fn(&RunFigures) -> Vec<f64>>,
        ),
        (
            "probe RTT (ms)".to_string(),
            Box::new(|f: &RunFigures| f.probe.clone()),
        ),
    ]
    .into_iter()
    .enumerate()
    {
        let per_arm: Vec<(String, Vec<f64>)> = arms
            .iter()
            .map(|a| {
                let mut v: Vec<f64> = figs
                    .iter()
                    .filter(|(x, _)| x == a)
                    .flat_map(|(_, f)| get(f))
                    .collect();
                v.sort_by(f64::total_cmp);
                (a.clone(), v)
            })
            .collect();
        let xmax = per_arm
            .iter()
            .filter_map(|(_, v)| v.last().copied())
            .fold(1.0, f64::max)
            .max(1.0);
        let mut ch = ChartBuilder::on(&halves[i])
            .caption(title, ("sans-serif", 18))
            .margin(8)
            .x_label_area_size(28)
            .y_label_area_size(40)
            .build_cartesian_2d((1.0..xmax * 1.05).log_scale(), 0.0..1.0)
            .map_err(pe)?;
        ch.configure_mesh()
            .x_desc("ms (log)")
            .y_desc("fraction")
            .draw()
            .map_err(pe)?;
        for (a, v) in &per_arm {
            if v.is_empty() {
                continue;
            }
            let c = color(arms, a);
            let n = v.len() as f64;
            let step = (v.len() / 400).max(1);
            let pts: Vec<(f64, f64)> = v
                .iter()
                .enumerate()
                .step_by(step)
                .map(|(k, x)| (x.max(1.0), (k + 1) as f64 / n))
                .chain(std::iter::once((v[v.len() - 1].max(1.0), 1.0)))
                .collect();
            ch.draw_series(LineSeries::new(pts, c.stroke_width(2)))
                .map_err(pe)?
                .label(a.clone())
                .legend(move |(x, y)| PathElement::new([(x, y), (x + 16, y)], c.stroke_width(2)));
        }
        ch.configure_series_labels()
            .position(SeriesLabelPosition::LowerRight)
            .background_style(WHITE.mix(0.8))
            .border_style(BLACK)
            .draw()
            .map_err(pe)?;
    }
    root.present().map_err(pe)?;
    Ok(())
}

/// p99 (the scenario's headline latency) against throughput per arm, with 95 % intervals.
fn plot_tradeoff(sc: &Scenario, sums: &[ArmSummary], path: &Path) -> Result<()> {
    let root = BitMapBackend::new(path, (800, 500)).into_drawing_area();
    root.fill(&WHITE).map_err(pe)?;
    let Some(first) = sums.first() else {
        return Ok(());
    };
    let (yn, _, xn, _) = headline(first);
    let pts: Vec<(String, Estimate, Estimate)> = sums
        .iter()
        .map(|s| {
            let (_, p, _, g) = headline(s);
            (s.arm.clone(), p, g)
        })
        .collect();
    let fin = |v: f64| if v.is_finite() { v } else { 0.0 };
    let xmax = pts
        .iter()
        .map(|p| fin(p.2.hi).max(fin(p.2.value)))
        .fold(1.0, f64::max)
        * 1.15;
    let ymax = pts
        .iter()
        .map(|p| fin(p.1.hi).max(fin(p.1.value)))
        .fold(1.0, f64::max)
        * 1.15;
    let arms: Vec<String> = sums.iter().map(|s| s.arm.clone()).collect();
    let mut ch = ChartBuilder::on(&root)
        .caption(
            format!("{}: {yn} vs {xn} (95 % CI)", sc.name),
            ("sans-serif", 18),
        )
        .margin(10)
        .x_label_area_size(36)
        .y_label_area_size(56)
        .build_cartesian_2d(0.0..xmax, 0.0..ymax)
        .map_err(pe)?;
    ch.configure_mesh()
        .x_desc(xn.as_str())
        .y_desc(yn.as_str())
        .draw()
        .map_err(pe)?;
    // pid at its setpoints, joined: its p99-vs-throughput frontier.
    let mut pid: Vec<(f64, f64)> = pts
        .iter()
        .filter(|(arm, p, g)| {
            super::scenario::arm_controller(arm) == "pid"
                && p.value.is_finite()
                && g.value.is_finite()
        })
        .map(|(_, p, g)| (g.value, p.value))
        .collect();
    if pid.len() >= 2 {
        pid.sort_by(|a, b| a.0.total_cmp(&b.0));
        let c = PID_FRONTIER;
        ch.draw_series(LineSeries::new(pid, c.stroke_width(1)))
            .map_err(pe)?
            .label("pid at its setpoints")
            .legend(move |(x, y)| PathElement::new([(x, y), (x + 16, y)], c.stroke_width(1)));
    }
    for (arm, p, g) in &pts {
        if !(p.value.is_finite() && g.value.is_finite()) {
            continue;
        }
        let c = color(&arms, arm);
        ch.draw_series(std::iter::once(Circle::new(
            (g.value, p.value),
            6,
            c.filled(),
        )))
        .map_err(pe)?
        .label(arm.clone())
        .legend(move |(x, y)| Circle::new((x + 8, y), 5, c.filled()));
        if p.lo.is_finite() {
            ch.draw_series(LineSeries::new(
                [(g.value, p.lo), (g.value, p.hi)],
                c.stroke_width(2),
            ))
            .map_err(pe)?;
        }
        if g.lo.is_finite() {
            ch.draw_series(LineSeries::new(
                [(g.lo, p.value), (g.hi, p.value)],
                c.stroke_width(2),
            ))
            .map_err(pe)?;
        }
    }
    ch.configure_series_labels()
        .background_style(WHITE.mix(0.8))
        .border_style(BLACK)
        .draw()
        .map_err(pe)?;
    root.present().map_err(pe)?;
    Ok(())
}

fn esc(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}

fn html(
    plan: &[Scenario],
    sums: &[ArmSummary],
    targets: &[Target],
    pngs: &BTreeMap<String, Vec<String>>,
    a: &DemoArgs,
) -> String {
    let mut h = String::from(
        "<!doctype html><html><head><meta charset=\"utf-8\"><title>TokenFlow A/B demo</title>\
         <style>body{font-family:sans-serif;max-width:1150px;margin:2em auto;color:#222}\
         table{border-collapse:collapse;margin:1em 0}td,th{border:1px solid #ccc;padding:4px 8px;text-align:right}\
         th{background:#f3f3f3}td:first-child,th:first-child{text-align:left}.met{color:#197a19}.missed{color:#b00020;font-weight:bold}\
         img{max-width:100%;border:1px solid #eee;margin:6px 0}</style></head><body>",
    );
    let _ = write!(
        h,
        "<h1>TokenFlow A/B demo</h1><p>Pacing <b>off</b> against TokenFlow's <b>pid</b> controller and the baselines \
         (<b>sigmoid</b>, the original mapping; <b>gradient2</b>; <b>aimd</b>), interleaved within each repeat; \
         <b>pid@MS</b> is pid with an MS ms setpoint, a further point on its p99-vs-throughput frontier. \
         Measurement window: requests submitted after a {:.0} s warm-up (the same for every arm) until the run's end; \
         every latency is timed from the moment a user submitted (time waiting in the pacer included). \
         Setpoint: p95 RTT {:.0} ms. Goodput: completed requests/s for batch clients, completed within the TTFT objective for \
         interactive and open-loop clients. Intervals: 95 % hierarchical bootstrap over repeats and observations.</p>",
        a.warmup.as_secs_f64(),
        a.setpoint_ms
    );
    h.push_str("<h2>Targets</h2><table><tr><th>scenario</th><th>target</th><th>measured</th><th>result</th></tr>");
    for t in targets {
        let _ = write!(
            h,
            "<tr><td>{}</td><td style=\"text-align:left\">{}</td><td>{}</td><td class=\"{}\">{}</td></tr>",
            esc(&t.scenario),
            esc(&t.target),
            esc(&t.measured),
            if t.met { "met" } else { "missed" },
            if t.met { "met" } else { "missed" }
        );
    }
    h.push_str("</table>");
    for sc in plan {
        let rows: Vec<&ArmSummary> = sums.iter().filter(|s| s.scenario == sc.name).collect();
        if rows.is_empty() {
            continue;
        }
        let _ = write!(h, "<h2>{}</h2><p>{}</p>", esc(sc.name), esc(sc.what));
        h.push_str("<table><tr><th>arm</th><th>client</th><th>TTFT p50 ms</th><th>TTFT p99 ms</th><th>inter-token p99 ms</th><th>e2e p99 ms</th><th>req/s</th><th>tokens/s</th><th>goodput req/s</th><th>errors</th><th>shed</th><th>timeouts</th></tr>");
        for s in &rows {
            for role in s.ttft_p99_ms.keys() {
                let _ = write!(
                    h,
                    "<tr><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td></tr>",
                    s.arm,
                    role,
                    ci(e(&s.ttft_p50_ms, role)),
                    ci(e(&s.ttft_p99_ms, role)),
                    ci(e(&s.itl_p99_ms, role)),
                    ci(e(&s.e2e_p99_ms, role)),
                    ci(e(&s.requests_per_s, role)),
                    ci(e(&s.tokens_per_s, role)),
                    ci(e(&s.goodput_per_s, role)),
                    s.errors.get(role).copied().unwrap_or(0),
                    s.shed.get(role).copied().unwrap_or(0),
                    s.timeouts.get(role).copied().unwrap_or(0),
                );
            }
        }
        h.push_str("</table><table><tr><th>arm</th><th>probe p50 ms</th><th>probe p99 ms</th><th>interactive stream RTT p99 ms</th><th>retransmits</th><th>link utilization</th><th>periods to settle within ±20 %</th><th>periods to get under +20 %</th></tr>");
        for s in &rows {
            let _ = write!(
                h,
                "<tr><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td></tr>",
                s.arm,
                ci(s.probe_p50_ms),
                ci(s.probe_p99_ms),
                ci(s.interactive_rtt_p99_ms),
                ci(s.retransmits),
                ci(Estimate {
                    value: s.link_utilization.value * 100.0,
                    lo: s.link_utilization.lo * 100.0,
                    hi: s.link_utilization.hi * 100.0
                }) + " %",
                s.settle_periods.map(ci).unwrap_or_else(|| "–".into()),
                s.under_periods.map(ci).unwrap_or_else(|| "–".into()),
            );
        }
        h.push_str("</table>");
        for p in pngs.get(sc.name).into_iter().flatten() {
            let _ = write!(h, "<img src=\"{p}\" alt=\"{p}\">");
        }
    }
    h.push_str("<p>Raw data: <a href=\"report.json\">report.json</a>, <a href=\"runs.jsonl\">runs.jsonl</a> (one run per line: time series, probe samples, agent windows), <a href=\"requests.jsonl\">requests.jsonl</a> (one request per line).</p></body></html>\n");
    h
}

/// The distinct reasons a run's hints gave from `from` on, in order, each cut to its first
/// clause: what a failed check prints, since CI keeps no report to look at.
fn reasons_from(r: &Run, from: f64) -> String {
    let mut seen: Vec<String> = Vec::new();
    for t in r.ticks.iter().filter(|t| t.t >= from) {
        let first = t.reason.split(';').next().unwrap_or_default().trim();
        let line = format!("{:.1} s {first}", t.t - from);
        if seen.last().is_none_or(|l| !l.ends_with(first)) {
            seen.push(line);
        }
    }
    seen.join(" | ")
}

/// The CI checks: the loop works (not timings).
pub fn check(runs: &[Run], arms: &[String]) -> Vec<String> {
    let mut p = Vec::new();
    for arm in arms {
        for r in runs.iter().filter(|r| &r.arm == arm) {
            for c in &r.clients {
                if !c.requests.iter().any(|q| q.ok()) {
                    p.push(format!(
                        "{} · {arm}: the {} client completed no request",
                        r.scenario,
                        c.role.name()
                    ));
                }
            }
            if r.windows.len() < (r.duration_s as usize).saturating_sub(2) {
                p.push(format!(
                    "{} · {arm}: {} agent windows in a {:.0} s run",
                    r.scenario,
                    r.windows.len(),
                    r.duration_s
                ));
            }
            if arm != "off" && r.ticks.iter().all(|t| t.hint_rps.is_empty()) {
                p.push(format!("{} · {arm}: no hint was served", r.scenario));
            }
        }
        if !runs.iter().any(|r| &r.arm == arm) {
            p.push(format!("arm {arm} produced no run"));
        }
    }
    // The hint falls after the bottleneck narrows and recovers after it widens (pid, step
    // scenario). Judged on the group's allowed rate, the sum of its clients' hints: under strict
    // priority the batch share may rightly stay at its floor while the interactive client's
    // share refills first.
    for r in runs.iter().filter(|r| r.arm == "pid" && r.steps.len() >= 3) {
        let (down, up) = (r.steps[1].0, r.steps[2].0);
        let rate = |from: f64, to: f64| -> Vec<f64> {
            r.ticks
                .iter()
                .filter(|t| t.t >= from && t.t < to && !t.hint_rps.is_empty())
                .map(|t| t.hint_rps.iter().map(|(_, v)| *v).sum())
                .collect()
        };
        let before = quantile(&rate(down - 2.0, down), 0.5);
        let during = rate(down, up);
        let low = during.iter().copied().fold(f64::INFINITY, f64::min);
        if low.is_nan() || before.is_nan() || low >= 0.75 * before {
            p.push(format!("pid: the group's hint did not fall after the bottleneck narrowed ({before:.1} → min {low:.1} req/s)"));
        }
        let fell_by = r
            .ticks
            .iter()
            .find(|t| {
                t.t >= down
                    && !t.hint_rps.is_empty()
                    && t.hint_rps.iter().map(|(_, v)| *v).sum::<f64>() < 0.75 * before
            })
            .map(|t| t.t - down);
        if fell_by.is_none_or(|d| d > 6.0) {
            p.push(format!(
                "pid: the hint took {fell_by:?} s to fall (a few windows expected)"
            ));
        }
        let after = rate(up, r.duration_s + 1.0);
        let high = after.iter().copied().fold(0.0, f64::max);
        if high <= 1.3 * low {
            p.push(format!(
                "pid: the group's hint did not recover after the bottleneck widened (min {low:.1}, after {high:.1} req/s); its reasons after the widening: {}",
                reasons_from(r, up)
            ));
        }
    }
    // The backend's queue reaches the controller: in the compute-bound scenario the `pid` group's
    // hints carry the compute limit (the agent's spans → the hint server → the hint's reason).
    for r in runs
        .iter()
        .filter(|r| r.arm == "pid" && r.scenario == "compute-bound")
    {
        if !r.ticks.iter().any(|t| t.reason.contains("backend queue")) {
            p.push(
                "compute-bound · pid: no hint carried the backend's concurrency limit (are the agent's spans on the backend's markers?)"
                    .into(),
            );
        }
    }
    // The pacer follows the hint: per second, requests sent ≤ the hinted rate (+ one burst).
    for r in runs.iter().filter(|r| r.arm == "pid") {
        let Some(c) = r.clients.iter().find(|c| c.role == Role::Batch) else {
            continue;
        };
        let mut sent: BTreeMap<i64, f64> = BTreeMap::new();
        for q in &c.requests {
            *sent
                .entry(((q.submitted_ms + q.wait_ms) / 1000.0).floor() as i64)
                .or_default() += 1.0;
        }
        let mut over = 0;
        let mut secs = 0;
        for (s, n) in &sent {
            let hinted: Vec<f64> = r
                .ticks
                .iter()
                .filter(|t| t.t >= *s as f64 - 0.5 && t.t < *s as f64 + 1.0)
                .filter_map(|t| {
                    t.hint_rps
                        .iter()
                        .find(|(role, _)| role == "batch")
                        .map(|(_, v)| *v)
                })
                .collect();
            if hinted.is_empty() || *s < 2 {
                continue;
            }
            secs += 1;
            let cap = hinted.iter().copied().fold(0.0, f64::max);
            if *n > cap * 1.5 + 3.0 {
                over += 1;
            }
        }
        if secs == 0 || over * 5 > secs {
            p.push(format!(
                "{} · pid: the pacer sent above the hinted rate in {over} of {secs} seconds",
                r.scenario
            ));
        }
    }
    p
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An arm whose probe p99 and batch goodput are exactly these.
    fn arm(name: &str, probe_ms: f64, goodput: f64) -> ArmSummary {
        let one = |v: f64| BTreeMap::from([("batch".to_string(), v)]);
        let f = RunFigures {
            ttft: BTreeMap::from([("batch".to_string(), vec![100.0; 10])]),
            goodput_per_s: one(goodput),
            probe: vec![probe_ms; 100],
            ..Default::default()
        };
        summarize("network-bound", name, &[f.clone(), f])
    }

    fn versus(sums: &[ArmSummary], base: &str) -> Target {
        targets(sums, 50.0)
            .into_iter()
            .find(|t| t.target.contains(base))
            .unwrap_or_else(|| panic!("no target against {base}"))
    }

    #[test]
    fn a_step_settles_only_once_the_p95_stays_inside_the_band_on_both_sides() {
        let inside = |p: f64| (p - 50.0).abs() <= 10.0;
        // The buffer's queue for two windows, then in the band to the end: settled after 2.
        assert_eq!(settle(&[311.0, 200.0, 55.0, 47.0, 51.0], inside), Some(2.0));
        // Back under 1.2 × the setpoint at once, but held far under the band (a rate well under
        // the narrowed link) until the fourth window: settled after 4, though under after 2.
        let p95 = [311.0, 200.0, 12.0, 14.0, 47.0, 51.0];
        assert_eq!(settle(&p95, inside), Some(4.0));
        assert_eq!(settle(&p95, |p| p <= 60.0), Some(2.0));
        // A queue again in the last window: not back within the segment.
        assert_eq!(settle(&[311.0, 50.0, 50.0, 102.0], inside), None);
        assert_eq!(settle(&[48.0, 52.0], inside), Some(0.0));
    }

    #[test]
    fn pid_meets_a_baseline_at_its_throughput_only_through_a_point_that_carries_as_much() {
        let (off, pid, g2) = (
            arm("off", 316.0, 23.6),
            arm("pid", 71.0, 23.1),
            arm("gradient2", 42.0, 18.9),
        );
        // pid alone: more throughput but a longer queue — no point at gradient2's throughput.
        let t = versus(&[off.clone(), pid.clone(), g2.clone()], "gradient2");
        assert!(!t.met, "{t:?}");
        // A lower setpoint carries as much as gradient2 at no worse p99.
        let sums = [
            off.clone(),
            pid.clone(),
            g2.clone(),
            arm("pid@20", 39.0, 23.0),
        ];
        let t = versus(&sums, "gradient2");
        assert!(t.met && t.measured.starts_with("pid@20 39 ms"), "{t:?}");
        // A point that gets its low p99 by sending less does not count.
        let sums = [
            off.clone(),
            pid.clone(),
            g2.clone(),
            arm("pid@20", 30.0, 17.0),
        ];
        let t = versus(&sums, "gradient2");
        assert!(!t.met && t.measured.starts_with("pid 71 ms"), "{t:?}");
        // Nor does one that carries as much with a longer queue.
        let sums = [off, pid, g2, arm("pid@20", 45.0, 23.0)];
        assert!(!versus(&sums, "gradient2").met);
    }
}
