//! The trained models as one versioned file: the Isolation Forest and the GBDT forecasters at
//! 1 and 5 windows ahead.

use std::path::Path;

use anyhow::{Context, Result, bail};
use serde::{Deserialize, Serialize};

use crate::{
    features::{ANOMALY_FEATURES, FEATURE_NAMES, Features, index},
    forecast::{Gbdt, Rows},
    iforest::IsolationForest,
};

/// Version of the model file; a server refuses files of another version.
pub const MODEL_FORMAT: u32 = 1;
/// Horizons of the forecasters, in windows.
pub const HORIZONS: [usize; 2] = [1, 5];
pub const IFOREST_TREES: usize = 100;
pub const IFOREST_SAMPLES: usize = 256;

#[derive(Serialize, Deserialize)]
struct ModelFile {
    format: u32,
    created_unix_ms: u64,
    rows: usize,
    baseline_rows: usize,
    feature_names: Vec<String>,
    anomaly_features: Vec<usize>,
    iforest: IsolationForest,
    gbdt_h1: String,
    gbdt_h5: String,
}

pub struct Models {
    pub iforest: IsolationForest,
    pub h1: Gbdt,
    pub h5: Gbdt,
    pub rows: usize,
    pub baseline_rows: usize,
    pub created_unix_ms: u64,
}

/// A window that looks calm without labels: p95 RTT within 1.5× the path's base (the 5th
/// percentile of the windows given) plus 10 ms, and under one retransmit per second. The online
/// refit fits the Isolation Forest on these.
pub fn calm_mask(f: &[Features]) -> Vec<bool> {
    let p95 = index("rtt_p95_ms");
    let mut v: Vec<f64> = f
        .iter()
        .filter(|x| x.p95_ms.is_some())
        .map(|x| x.values[p95])
        .collect();
    v.sort_by(f64::total_cmp);
    let base = v.get(v.len() / 20).copied().unwrap_or(0.0);
    let retrans = index("retransmits_per_s");
    f.iter()
        .map(|x| x.values[p95] <= 1.5 * base + 10.0 && x.values[retrans] < 1.0)
        .collect()
}

impl Models {
    /// Trains on `features` (in time order). The Isolation Forest sees only the rows marked in
    /// `baseline` (what normal looks like); the forecasters see every row.
    pub fn train(
        features: &[Features],
        baseline: &[bool],
        seed: u64,
        now_unix_ms: u64,
    ) -> Result<Self> {
        let normal: Vec<Vec<f64>> = features
            .iter()
            .zip(baseline)
            .filter(|(_, b)| **b)
            .map(|(f, _)| f.anomaly_vector())
            .collect();
        if normal.len() < 32 {
            bail!(
                "{} baseline windows are too few for the Isolation Forest (need 32)",
                normal.len()
            );
        }
        let iforest = IsolationForest::fit(&normal, IFOREST_TREES, IFOREST_SAMPLES, seed)
            .context("fitting the Isolation Forest")?;
        let h1 = Gbdt::fit(&Rows::build(features, HORIZONS[0])).context("GBDT at 1 window")?;
        let h5 = Gbdt::fit(&Rows::build(features, HORIZONS[1])).context("GBDT at 5 windows")?;
        Ok(Self {
            iforest,
            h1,
            h5,
            rows: features.len(),
            baseline_rows: normal.len(),
            created_unix_ms: now_unix_ms,
        })
    }

    pub fn anomaly(&self, f: &Features) -> f64 {
        self.iforest.score(&f.anomaly_vector())
    }

    /// p95 forecast one window ahead, milliseconds.
    pub fn forecast_h1(&self, f: &Features) -> f64 {
        self.h1.predict_one(&f.values, f.get("rtt_p95_ms")).max(0.0)
    }

    pub fn forecast_h5(&self, f: &Features) -> f64 {
        self.h5.predict_one(&f.values, f.get("rtt_p95_ms")).max(0.0)
    }

    pub fn save(&self, path: &Path) -> Result<()> {
        let file = ModelFile {
            format: MODEL_FORMAT,
            created_unix_ms: self.created_unix_ms,
            rows: self.rows,
            baseline_rows: self.baseline_rows,
            feature_names: FEATURE_NAMES.iter().map(|s| s.to_string()).collect(),
            anomaly_features: ANOMALY_FEATURES.to_vec(),
            iforest: self.iforest.clone(),
            gbdt_h1: self.h1.to_json()?,
            gbdt_h5: self.h5.to_json()?,
        };
        let tmp = path.with_extension("tmp");
        std::fs::write(&tmp, serde_json::to_vec(&file)?)
            .with_context(|| format!("writing {}", tmp.display()))?;
        std::fs::rename(&tmp, path)
            .with_context(|| format!("moving the model to {}", path.display()))
    }

    pub fn load(path: &Path) -> Result<Self> {
        let text = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
        let f: ModelFile = serde_json::from_slice(&text)
            .with_context(|| format!("{} is not a model file", path.display()))?;
        if f.format != MODEL_FORMAT {
            bail!(
                "{} has model format {}, this server reads {MODEL_FORMAT}: retrain with `tokenflow-hint-server train`",
                path.display(),
                f.format
            );
        }
        if f.feature_names != FEATURE_NAMES || f.anomaly_features != ANOMALY_FEATURES {
            bail!(
                "{} was trained on other features: retrain with `tokenflow-hint-server train`",
                path.display()
            );
        }
        Ok(Self {
            iforest: f.iforest,
            h1: Gbdt::from_json(&f.gbdt_h1)?,
            h5: Gbdt::from_json(&f.gbdt_h5)?,
            rows: f.rows,
            baseline_rows: f.baseline_rows,
            created_unix_ms: f.created_unix_ms,
        })
    }
}
