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
    write_measured_at(figures, command, SystemTime::now())
}

/// [`write`] for figures measured at `when` (a report rendered again from recorded runs keeps
/// the time its runs were measured).
pub fn write_measured_at(figures: &[Figure], command: &str, when: SystemTime) -> Result<()> {
    let path = root().join("benchmarks/results.json");
    let mut results: Results = std::fs::read_to_string(&path)
        .ok()
        .and_then(|t| serde_json::from_str(&t).ok())
        .unwrap_or_default();
    let now = humantime::format_rfc3339_seconds(when).to_string();
    results.machine = machine();
    for f in figures {
        let mut f = f.clone();
        f.command = command.to_string();
        f.measured_at = now.clone();
        results.figures.insert(f.key.clone(), f);
    }
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
