//! Percentiles and bootstrap confidence intervals for the demo's report.
//!
//! Runs are the unit of repetition: a hierarchical bootstrap resamples repeats with replacement and,
//! within each chosen repeat, its observations with replacement, then pools them and takes the
//! statistic. With one repeat this is the plain bootstrap over observations.

use serde::Serialize;

/// The `q` quantile (0 … 1) of `v` by the nearest-rank method; NaN for an empty slice.
pub fn quantile(v: &[f64], q: f64) -> f64 {
    if v.is_empty() {
        return f64::NAN;
    }
    let mut s: Vec<f64> = v.to_vec();
    let rank = ((q * s.len() as f64).ceil() as usize).clamp(1, s.len());
    // Selection, not a sort: the bootstrap takes thousands of quantiles of large samples.
    *s.select_nth_unstable_by(rank - 1, f64::total_cmp).1
}

pub fn mean(v: &[f64]) -> f64 {
    if v.is_empty() {
        f64::NAN
    } else {
        v.iter().sum::<f64>() / v.len() as f64
    }
}

/// A point estimate with its 95 % bootstrap interval.
#[derive(Clone, Copy, Debug, Serialize, PartialEq)]
pub struct Estimate {
    pub value: f64,
    pub lo: f64,
    pub hi: f64,
}

impl Estimate {
    pub fn nan() -> Self {
        Self {
            value: f64::NAN,
            lo: f64::NAN,
            hi: f64::NAN,
        }
    }
}

/// Statistic `f` of the pooled observations of all repeats, with a 95 % hierarchical bootstrap
/// interval from `iters` resamples (seeded: the same data gives the same interval).
pub fn bootstrap(
    repeats: &[Vec<f64>],
    f: impl Fn(&[f64]) -> f64,
    iters: usize,
    seed: u64,
) -> Estimate {
    let pooled: Vec<f64> = repeats.iter().flatten().copied().collect();
    if pooled.is_empty() {
        return Estimate::nan();
    }
    let value = f(&pooled);
    let mut rng = fastrand::Rng::with_seed(seed);
    let reps: Vec<&Vec<f64>> = repeats.iter().filter(|r| !r.is_empty()).collect();
    let mut stats = Vec::with_capacity(iters);
    let mut buf = Vec::with_capacity(pooled.len());
    for _ in 0..iters {
        buf.clear();
        for _ in 0..reps.len() {
            let r = reps[rng.usize(..reps.len())];
            for _ in 0..r.len() {
                buf.push(r[rng.usize(..r.len())]);
            }
        }
        let s = f(&buf);
        if s.is_finite() {
            stats.push(s);
        }
    }
    Estimate {
        value,
        lo: quantile(&stats, 0.025),
        hi: quantile(&stats, 0.975),
    }
}

/// A per-repeat figure (a rate, a count) averaged over repeats, with a bootstrap interval over
/// the repeats.
pub fn over_repeats(per_repeat: &[f64], iters: usize, seed: u64) -> Estimate {
    let v: Vec<f64> = per_repeat
        .iter()
        .copied()
        .filter(|x| x.is_finite())
        .collect();
    if v.is_empty() {
        return Estimate::nan();
    }
    let mut rng = fastrand::Rng::with_seed(seed);
    let mut stats = Vec::with_capacity(iters);
    for _ in 0..iters {
        let m = (0..v.len()).map(|_| v[rng.usize(..v.len())]).sum::<f64>() / v.len() as f64;
        stats.push(m);
    }
    Estimate {
        value: mean(&v),
        lo: quantile(&stats, 0.025),
        hi: quantile(&stats, 0.975),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Standard normal by Box–Muller.
    fn normal(rng: &mut fastrand::Rng) -> f64 {
        let (u, v) = (1.0 - rng.f64(), rng.f64());
        (-2.0 * u.ln()).sqrt() * (std::f64::consts::TAU * v).cos()
    }

    #[test]
    fn quantiles_by_nearest_rank() {
        let v: Vec<f64> = (1..=100).map(f64::from).collect();
        assert_eq!(quantile(&v, 0.5), 50.0);
        assert_eq!(quantile(&v, 0.99), 99.0);
        assert_eq!(quantile(&v, 1.0), 100.0);
        assert_eq!(quantile(&v, 0.0), 1.0);
        assert!(quantile(&[], 0.5).is_nan());
    }

    #[test]
    fn the_mean_interval_of_a_normal_sample_has_the_textbook_width() {
        // n = 2000 from N(0, 1): the 95 % interval of the mean is ±1.96/√n ≈ ±0.0438.
        let mut rng = fastrand::Rng::with_seed(1);
        let v: Vec<f64> = (0..2000).map(|_| normal(&mut rng)).collect();
        let e = bootstrap(&[v], mean, 2000, 7);
        let half = (e.hi - e.lo) / 2.0;
        assert!((half - 0.0438).abs() < 0.006, "half width {half}");
        assert!(e.lo < e.value && e.value < e.hi);
    }

    #[test]
    fn the_median_interval_covers_the_true_median_about_95_percent_of_the_time() {
        // Exponential(1): true median ln 2. 200 independent samples of 300.
        let mut rng = fastrand::Rng::with_seed(3);
        let truth = std::f64::consts::LN_2;
        let trials = 200;
        let covered = (0..trials)
            .filter(|&t| {
                let v: Vec<f64> = (0..300).map(|_| -(1.0 - rng.f64()).ln()).collect();
                let e = bootstrap(&[v], |x| quantile(x, 0.5), 500, t);
                e.lo <= truth && truth <= e.hi
            })
            .count();
        let rate = covered as f64 / trials as f64;
        assert!((0.88..=0.99).contains(&rate), "coverage {rate}");
    }

    #[test]
    fn repeats_that_disagree_widen_the_interval() {
        // Same within-run noise; in the second set the runs' means differ by ±1 (drift).
        let mut rng = fastrand::Rng::with_seed(5);
        let mut runs = |shift: &[f64]| -> Vec<Vec<f64>> {
            shift
                .iter()
                .map(|s| (0..500).map(|_| s + 0.1 * normal(&mut rng)).collect())
                .collect()
        };
        let same = bootstrap(&runs(&[0.0, 0.0, 0.0, 0.0]), mean, 1000, 1);
        let drift = bootstrap(&runs(&[-1.0, 1.0, -1.0, 1.0]), mean, 1000, 1);
        assert!(
            drift.hi - drift.lo > 10.0 * (same.hi - same.lo),
            "{same:?} {drift:?}"
        );
        let r = over_repeats(&[1.0, 2.0, 3.0], 1000, 1);
        assert_eq!(r.value, 2.0);
        assert!(r.lo >= 1.0 && r.hi <= 3.0 && r.lo < 2.0 && r.hi > 2.0);
        assert!(bootstrap(&[vec![]], mean, 10, 1).value.is_nan());
    }
}
