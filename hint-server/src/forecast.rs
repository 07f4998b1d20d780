//! Forecasting the node's p95 RTT `h` windows ahead.
//!
//! Every learned model predicts the *change* from the current p95 (the target minus persistence)
//! from the current feature vector, and adds it back; the baselines are persistence (the p95
//! stays) and the EWMA. GBDT: forust-ml's `GradientBooster` (squared loss, histogram splits).
//! (perpetual, the other candidate, needs a nightly compiler.) Linear and random forest: smartcore.

use anyhow::{Context, Result, anyhow};
use forust_ml::{GradientBooster, Matrix, objective::ObjectiveType};
use serde::Serialize;
use smartcore::{
    ensemble::random_forest_regressor::{RandomForestRegressor, RandomForestRegressorParameters},
    linalg::basic::matrix::DenseMatrix,
    linear::linear_regression::{
        LinearRegression, LinearRegressionParameters, LinearRegressionSolverName,
    },
};

use crate::features::{Features, N_FEATURES, index};

/// Rows for horizon `h`: features at t, p95 at t + h (only where that window had RTT samples).
#[derive(Clone, Debug, Default)]
pub struct Rows {
    pub x: Vec<[f64; N_FEATURES]>,
    /// p95 at t (persistence).
    pub now: Vec<f64>,
    /// EWMA of p95 at t.
    pub ewma: Vec<f64>,
    /// p95 at t + h.
    pub y: Vec<f64>,
    pub t_ms: Vec<u64>,
}

impl Rows {
    pub fn build(f: &[Features], h: usize) -> Rows {
        let mut r = Rows::default();
        let (p95, ewma) = (index("rtt_p95_ms"), index("rtt_p95_ewma_ms"));
        for t in 0..f.len().saturating_sub(h) {
            let (Some(_), Some(target)) = (f[t].p95_ms, f[t + h].p95_ms) else {
                continue;
            };
            r.x.push(f[t].values);
            r.now.push(f[t].values[p95]);
            r.ewma.push(f[t].values[ewma]);
            r.y.push(target);
            r.t_ms.push(f[t].end_unix_ms);
        }
        r
    }
    pub fn len(&self) -> usize {
        self.y.len()
    }
    pub fn is_empty(&self) -> bool {
        self.y.is_empty()
    }
    fn residual(&self) -> Vec<f64> {
        self.y.iter().zip(&self.now).map(|(y, n)| y - n).collect()
    }
    fn column_major(&self) -> Vec<f64> {
        (0..N_FEATURES)
            .flat_map(|c| self.x.iter().map(move |r| r[c]))
            .collect()
    }
    fn dense(&self) -> Result<DenseMatrix<f64>> {
        DenseMatrix::from_2d_vec(&self.x.iter().map(|r| r.to_vec()).collect())
            .map_err(|e| anyhow!("building the feature matrix: {e}"))
    }
}

/// The GBDT forecaster of one horizon.
pub struct Gbdt {
    booster: GradientBooster,
}

impl Gbdt {
    pub const ITERATIONS: usize = 50;
    pub const LEARNING_RATE: f32 = 0.03;
    pub const MAX_DEPTH: usize = 4;
    pub const MIN_LEAF: f32 = 5.0;
    /// Residuals beyond ±this are clipped for training: a regime change (a bandwidth step, a
    /// load that starts) cannot be foreseen from the window before it, and squared loss would
    /// otherwise pull every prediction toward those jumps.
    pub const CLIP_MS: f64 = 20.0;

    pub fn fit(rows: &Rows) -> Result<Self> {
        Self::fit_with(
            rows,
            Self::ITERATIONS,
            Self::LEARNING_RATE,
            Self::MAX_DEPTH,
            Self::MIN_LEAF,
            Self::CLIP_MS,
        )
    }

    pub fn fit_with(
        rows: &Rows,
        iterations: usize,
        lr: f32,
        depth: usize,
        min_leaf: f32,
        clip_ms: f64,
    ) -> Result<Self> {
        anyhow::ensure!(
            rows.len() >= 20,
            "{} rows are too few to train on",
            rows.len()
        );
        let data = rows.column_major();
        let m = Matrix::new(&data, rows.len(), N_FEATURES);
        let target: Vec<f64> = rows
            .residual()
            .iter()
            .map(|r| r.clamp(-clip_ms, clip_ms))
            .collect();
        let mut booster = GradientBooster::default()
            .set_objective_type(ObjectiveType::SquaredLoss)
            .set_iterations(iterations)
            .set_learning_rate(lr)
            .set_max_depth(depth)
            .set_min_leaf_weight(min_leaf)
            .set_initialize_base_score(true)
            .set_parallel(false);
        booster
            .fit_unweighted(&m, &target, None)
            .map_err(|e| anyhow!("GBDT training failed: {e}"))?;
        Ok(Self { booster })
    }

    pub fn predict_one(&self, x: &[f64; N_FEATURES], now_p95: f64) -> f64 {
        let m = Matrix::new(x.as_slice(), 1, N_FEATURES);
        self.booster
            .predict(&m, false)
            .first()
            .copied()
            .unwrap_or(0.0)
            + now_p95
    }

    pub fn predict(&self, rows: &Rows) -> Vec<f64> {
        let data = rows.column_major();
        let m = Matrix::new(&data, rows.len(), N_FEATURES);
        self.booster
            .predict(&m, false)
            .iter()
            .zip(&rows.now)
            .map(|(d, n)| d + n)
            .collect()
    }

    pub fn to_json(&self) -> Result<String> {
        self.booster
            .json_dump()
            .map_err(|e| anyhow!("saving the GBDT: {e}"))
    }

    pub fn from_json(s: &str) -> Result<Self> {
        Ok(Self {
            booster: GradientBooster::from_json(s).map_err(|e| anyhow!("loading the GBDT: {e}"))?,
        })
    }
}

/// MAE of one model on the test rows.
#[derive(Clone, Debug, Serialize, PartialEq)]
pub struct ModelScore {
    pub model: String,
    pub mae_ms: f64,
}

/// Trains every model on `train`, scores all on `test`; also returns the GBDT's predictions.
pub fn compare(train: &Rows, test: &Rows, seed: u64) -> Result<(Vec<ModelScore>, Vec<f64>)> {
    use crate::metrics::mae;
    let mut scores = vec![
        ModelScore {
            model: "persistence".into(),
            mae_ms: mae(&test.now, &test.y),
        },
        ModelScore {
            model: "ewma".into(),
            mae_ms: mae(&test.ewma, &test.y),
        },
    ];
    let (xtr, xte) = (train.dense()?, test.dense()?);
    let resid = train.residual();
    let lin = LinearRegression::fit(
        &xtr,
        &resid,
        LinearRegressionParameters::default().with_solver(LinearRegressionSolverName::SVD),
    )
    .map_err(|e| anyhow!("linear regression: {e}"))?;
    let lin_pred: Vec<f64> = lin
        .predict(&xte)
        .map_err(|e| anyhow!("linear regression: {e}"))?
        .iter()
        .zip(&test.now)
        .map(|(d, n)| d + n)
        .collect();
    scores.push(ModelScore {
        model: "linear".into(),
        mae_ms: mae(&lin_pred, &test.y),
    });
    let rf = RandomForestRegressor::fit(
        &xtr,
        &resid,
        RandomForestRegressorParameters::default()
            .with_n_trees(100)
            .with_min_samples_leaf(3)
            .with_seed(seed),
    )
    .map_err(|e| anyhow!("random forest: {e}"))?;
    let rf_pred: Vec<f64> = rf
        .predict(&xte)
        .map_err(|e| anyhow!("random forest: {e}"))?
        .iter()
        .zip(&test.now)
        .map(|(d, n)| d + n)
        .collect();
    scores.push(ModelScore {
        model: "random_forest".into(),
        mae_ms: mae(&rf_pred, &test.y),
    });
    let gbdt = Gbdt::fit(train).context("GBDT")?;
    let g = gbdt.predict(test);
    scores.push(ModelScore {
        model: "gbdt".into(),
        mae_ms: mae(&g, &test.y),
    });
    Ok((scores, g))
}
