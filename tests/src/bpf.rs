//! The kernel's view of the loaded BPF programs (`bpftool prog show --json`), for tests that must
//! tell an event the agent lost from one the kernel never ran its program for.

use anyhow::Result;

/// Every loaded BPF program as `bpftool prog show --json` describes it.
pub fn programs() -> Result<Vec<serde_json::Value>> {
    let out = tokenflow_testbed::run(
        std::process::Command::new("bpftool").args(["prog", "show", "--json"]),
    )?;
    let v: serde_json::Value = serde_json::from_slice(&out.stdout)?;
    Ok(v.as_array().cloned().unwrap_or_default())
}

/// The runs the kernel skipped (`recursion_misses`; absent means none) of each loaded program of
/// the agent's, by its name as the kernel keeps it (15 characters at most).
#[derive(Clone, Debug, Default)]
pub struct Misses(Vec<(String, u64)>);

impl Misses {
    pub fn now() -> Result<Self> {
        Ok(Self(
            programs()?
                .iter()
                .filter_map(|p| {
                    let name = p["name"].as_str()?;
                    name.starts_with("tf_").then(|| {
                        (
                            name.to_string(),
                            p["recursion_misses"].as_u64().unwrap_or(0),
                        )
                    })
                })
                .collect(),
        ))
    }

    /// Skipped runs of the program `name` (its full name; the kernel's is truncated), summed
    /// over every loaded copy.
    pub fn of(&self, name: &str) -> u64 {
        self.0
            .iter()
            .filter(|(n, _)| name.starts_with(n.as_str()))
            .map(|(_, m)| m)
            .sum()
    }

    /// Runs of `name` skipped since `before`.
    pub fn since(&self, before: &Misses, name: &str) -> u64 {
        self.of(name).saturating_sub(before.of(name))
    }
}
