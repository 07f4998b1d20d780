//! Labelled traces recorded by `cargo xtask record-trace`, and the time-ordered split.

use std::{io::BufRead, path::Path};

use anyhow::{Context, Result};
use tokenflow_schema::trace::TraceLine;

use crate::features::{FeatureBuilder, Features};

pub struct Trace {
    pub features: Vec<Features>,
    pub anomalous: Vec<bool>,
    pub phases: Vec<String>,
}

impl Trace {
    pub fn load(path: &Path) -> Result<Self> {
        let f = std::fs::File::open(path).with_context(|| format!("opening {}", path.display()))?;
        let mut lines: Vec<TraceLine> = Vec::new();
        for (i, l) in std::io::BufReader::new(f).lines().enumerate() {
            let l = l?;
            if l.trim().is_empty() {
                continue;
            }
            lines.push(
                serde_json::from_str(&l)
                    .with_context(|| format!("{}:{}: not a trace line", path.display(), i + 1))?,
            );
        }
        lines.sort_by_key(|l| l.window.end_unix_ms);
        let mut b = FeatureBuilder::default();
        Ok(Self {
            features: lines.iter().map(|l| b.push(&l.window)).collect(),
            anomalous: lines.iter().map(|l| l.label.anomalous).collect(),
            phases: lines.iter().map(|l| l.label.phase.clone()).collect(),
        })
    }

    pub fn len(&self) -> usize {
        self.features.len()
    }

    pub fn is_empty(&self) -> bool {
        self.features.is_empty()
    }

    /// Index where the held-out part starts: the last `test_fraction` of the windows, by time.
    pub fn split_at(&self, test_fraction: f64) -> usize {
        ((self.len() as f64) * (1.0 - test_fraction)).round() as usize
    }
}
