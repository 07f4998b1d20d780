//! Percentiles from the kernel's bucket counts (layout in `agent_common::hist`).

use agent_common::hist::bucket_bounds;
use tokenflow_schema::RttSummary;

/// Representative value of a bucket: its midpoint, exact for the single-value buckets below 8.
fn bucket_value(i: usize) -> u64 {
    let (lo, hi) = bucket_bounds(i);
    lo + (hi - lo) / 2
}

/// The `q`-quantile (0 < q ≤ 1) of the samples counted in `counts`, 0 when there are none.
/// Uses the nearest-rank definition: the smallest value with at least ⌈q·n⌉ samples at or below it.
pub fn quantile(counts: &[u64], q: f64) -> u64 {
    let n: u64 = counts.iter().sum();
    if n == 0 {
        return 0;
    }
    let rank = ((q * n as f64).ceil() as u64).clamp(1, n);
    let mut seen = 0;
    for (i, &c) in counts.iter().enumerate() {
        seen += c;
        if seen >= rank {
            return bucket_value(i);
        }
    }
    bucket_value(counts.len().saturating_sub(1))
}

/// Summary of one interval's histogram; `sum_us` is the exact sum of the samples, for the mean.
pub fn summarize(counts: &[u64], sum_us: u64) -> RttSummary {
    let samples: u64 = counts.iter().sum();
    let max_us = counts
        .iter()
        .rposition(|&c| c > 0)
        .map(bucket_value)
        .unwrap_or(0);
    RttSummary {
        samples,
        p50_us: quantile(counts, 0.50),
        p95_us: quantile(counts, 0.95),
        p99_us: quantile(counts, 0.99),
        max_us,
        mean_us: sum_us.checked_div(samples).unwrap_or(0),
    }
}

/// Adds `other` bucket by bucket into `acc`, growing it as needed.
pub fn merge(acc: &mut Vec<u64>, other: &[u64]) {
    if acc.len() < other.len() {
        acc.resize(other.len(), 0);
    }
    for (a, b) in acc.iter_mut().zip(other) {
        *a += b;
    }
}

#[cfg(test)]
mod tests {
    use agent_common::{HIST_BUCKETS, bucket_index};
    use proptest::prelude::*;

    use super::*;

    fn histogram(samples: &[u32]) -> Vec<u64> {
        let mut h = vec![0u64; HIST_BUCKETS];
        for &s in samples {
            h[bucket_index(s)] += 1;
        }
        h
    }

    fn exact(samples: &[u32], q: f64) -> u64 {
        let mut s = samples.to_vec();
        s.sort_unstable();
        let rank = ((q * s.len() as f64).ceil() as usize).clamp(1, s.len());
        s[rank - 1] as u64
    }

    proptest! {
        /// The bound: every percentile within 12.5 % of the exact sample percentile.
        #[test]
        fn percentiles_within_bound(samples in prop::collection::vec(1u32..20_000_000, 1..400)) {
            let h = histogram(&samples);
            for q in [0.5, 0.95, 0.99, 1.0] {
                let est = quantile(&h, q) as f64;
                let want = exact(&samples, q) as f64;
                let err = (est - want).abs() / want;
                prop_assert!(err <= 0.125, "q={} est={} exact={} err={}", q, est, want, err);
                // The midpoint rule actually guarantees half of a bucket width: 1/16.
                prop_assert!(err <= 0.0625 + 1e-9, "q={} err={}", q, err);
            }
        }

        #[test]
        fn percentiles_are_monotonic(samples in prop::collection::vec(0u32..u32::MAX, 1..200)) {
            let h = histogram(&samples);
            let s = summarize(&h, 0);
            prop_assert!(s.p50_us <= s.p95_us && s.p95_us <= s.p99_us && s.p99_us <= s.max_us);
            prop_assert_eq!(s.samples, samples.len() as u64);
        }
    }

    #[test]
    fn empty_histogram_is_zero() {
        assert_eq!(summarize(&[0; 8], 0), RttSummary::default());
    }

    #[test]
    fn mean_uses_exact_sum() {
        let h = histogram(&[1000, 3000]);
        assert_eq!(summarize(&h, 4000).mean_us, 2000);
    }

    #[test]
    fn merge_adds_and_grows() {
        let mut a = vec![1, 2];
        merge(&mut a, &[1, 1, 5]);
        assert_eq!(a, vec![2, 3, 5]);
    }
}
