//! Benchmark figures: merged by key into `benchmarks/results.json` (stable keys, one entry per
//! figure, with the command and date that produced it) and rendered as the README's table.

use std::{collections::BTreeMap, time::SystemTime};

use anyhow::{Context, Result};
use serde::{Deserialize, Serialize};

use crate::util::{root, step};

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct Figure {
    #[serde(skip)]
    pub key: String,
    pub value: f64,
    pub unit: String,
    pub note: String,
    #[serde(default)]
    pub command: String,
    #[serde(default)]
    pub measured_at: String,
}

impl Figure {
    pub fn new(key: &str, value: f64, unit: &str, note: &str) -> Self {
        Self {
            key: key.to_string(),
            value,
            unit: unit.to_string(),
            note: note.to_string(),
            command: String::new(),
            measured_at: String::new(),
        }
    }
}

#[derive(Debug, Default, Serialize, Deserialize)]
struct Results {
    machine: String,
    figures: BTreeMap<String, Figure>,
}

const README_START: &str = "<!-- bench:start -->";
const README_END: &str = "<!-- bench:end -->";

pub fn write(figures: &[Figure], command: &str) -> Result<()> {
    store(figures, command, SystemTime::now(), None)
}

/// [`write`] for a run that measures every figure under `prefix`, measured at `when` (a report
/// rendered again from recorded runs keeps the time its runs were measured): the figures under
/// `prefix` it did not produce are removed rather than kept (a full demo no longer running an arm
/// would otherwise leave that arm's figures from an older run in the table, as the latest).
pub fn replace_measured_at(
    prefix: &str,
    figures: &[Figure],
    command: &str,
    when: SystemTime,
) -> Result<()> {
    store(figures, command, when, Some(prefix))
}

/// Merges `figures` into `results` by key, stamped with `command` and `now`; with `replace`, every
/// figure under that prefix is removed first.
fn merge(
    results: &mut Results,
    figures: &[Figure],
    command: &str,
    now: &str,
    replace: Option<&str>,
) {
    if let Some(prefix) = replace {
        results.figures.retain(|k, _| !k.starts_with(prefix));
    }
    for f in figures {
        let mut f = f.clone();
        f.command = command.to_string();
        f.measured_at = now.to_string();
        results.figures.insert(f.key.clone(), f);
    }
}

fn store(figures: &[Figure], command: &str, when: SystemTime, replace: Option<&str>) -> Result<()> {
    let path = root().join("benchmarks/results.json");
    let mut results: Results = std::fs::read_to_string(&path)
        .ok()
        .and_then(|t| serde_json::from_str(&t).ok())
        .unwrap_or_default();
    let now = humantime::format_rfc3339_seconds(when).to_string();
    results.machine = machine();
    merge(&mut results, figures, command, &now, replace);
    std::fs::create_dir_all(root().join("benchmarks"))?;
    std::fs::write(&path, serde_json::to_string_pretty(&results)? + "\n")
        .with_context(|| format!("writing {}", path.display()))?;
    step("bench", format!("figures written to {}", path.display()));

    let readme = root().join("README.md");
    let text = std::fs::read_to_string(&readme).context("reading README.md")?;
    if let (Some(a), Some(b)) = (text.find(README_START), text.find(README_END)) {
        let mut table = format!(
            "{README_START}\nMeasured on {} ({}).\n\n| figure | value | unit | how |\n|---|---:|---|---|\n",
            results.machine, now
        );
        for (k, f) in &results.figures {
            table.push_str(&format!(
                "| `{k}` | {} | {} | {} |\n",
                fmt(f.value),
                f.unit,
                f.note
            ));
        }
        let new = format!("{}{}{}", &text[..a], table, &text[b..]);
        std::fs::write(&readme, new)?;
        step("bench", "README benchmark table updated");
    }
    Ok(())
}

fn fmt(v: f64) -> String {
    if v.abs() >= 100.0 || v == v.trunc() {
        format!("{v:.0}")
    } else {
        format!("{v:.2}")
    }
}

fn machine() -> String {
    // The machine's online CPUs, not this thread's affinity (the benchmarks pin threads).
    let cpus = nix::unistd::sysconf(nix::unistd::SysconfVar::_NPROCESSORS_ONLN)
        .ok()
        .flatten()
        .unwrap_or(1);
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    format!("{cpus} CPUs, Linux {}", kernel.trim())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_run_that_replaces_its_prefix_drops_the_figures_it_no_longer_measures() {
        let mut r = Results::default();
        let old = [
            Figure::new("demo.network-bound.pid@25.p99_ms", 50.0, "ms", "old arm"),
            Figure::new("demo.network-bound.pid.p99_ms", 81.0, "ms", "old run"),
            Figure::new("agent.events_per_s", 1e5, "events/s", "another bench"),
        ];
        merge(&mut r, &old, "before", "t0", None);
        let new = [Figure::new(
            "demo.network-bound.pid.p99_ms",
            70.0,
            "ms",
            "new run",
        )];
        merge(&mut r, &new, "sudo cargo xtask demo", "t1", Some("demo."));
        let keys: Vec<&str> = r.figures.keys().map(String::as_str).collect();
        assert_eq!(
            keys,
            ["agent.events_per_s", "demo.network-bound.pid.p99_ms"]
        );
        assert_eq!(r.figures["demo.network-bound.pid.p99_ms"].value, 70.0);
        assert_eq!(r.figures["agent.events_per_s"].measured_at, "t0");
        // Without a prefix, figures merge by key and nothing else is removed.
        merge(&mut r, &old[..1], "later", "t2", None);
        assert_eq!(r.figures.len(), 3);
    }
}
