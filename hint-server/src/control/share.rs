//! Dividing a group's allowed rate among its clients.
//!
//! Every client first gets its minimum. Interactive clients then fill up to their maximum, in
//! proportion to their weights; batch clients share what is left the same way. So when the
//! allowed rate falls, batch clients are cut first and interactive clients keep their rate until
//! the batch clients are at their minimum.

use tokenflow_schema::ClientClass;

#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Member {
    pub class: ClientClass,
    pub weight: f64,
    pub min_rps: f64,
    pub max_rps: f64,
}

/// Rates for `members` (same order) that sum to `total` clamped to [Σ min, Σ max].
pub fn share(total: f64, members: &[Member]) -> Vec<f64> {
    let mut rates: Vec<f64> = members.iter().map(|m| m.min_rps.max(0.0)).collect();
    let mut left = total - rates.iter().sum::<f64>();
    for class in [ClientClass::Interactive, ClientClass::Batch] {
        let idx: Vec<usize> = (0..members.len())
            .filter(|&i| members[i].class == class)
            .collect();
        left = fill(left, &idx, members, &mut rates);
    }
    rates
}

/// Water-filling by weight among `idx`; returns what is left.
fn fill(mut left: f64, idx: &[usize], m: &[Member], rates: &mut [f64]) -> f64 {
    let mut open: Vec<usize> = idx
        .iter()
        .copied()
        .filter(|&i| rates[i] < m[i].max_rps)
        .collect();
    while left > 1e-12 && !open.is_empty() {
        let weights: f64 = open.iter().map(|&i| m[i].weight.max(1e-9)).sum();
        let mut used = 0.0;
        for &i in &open {
            let give = (left * m[i].weight.max(1e-9) / weights).min(m[i].max_rps - rates[i]);
            rates[i] += give;
            used += give;
        }
        left -= used;
        let before = open.len();
        open.retain(|&i| rates[i] < m[i].max_rps - 1e-12);
        if open.len() == before {
            // Nobody hit a cap: everything was handed out.
            break;
        }
    }
    left.max(0.0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn m(class: ClientClass, weight: f64, max: f64) -> Member {
        Member {
            class,
            weight,
            min_rps: 1.0,
            max_rps: max,
        }
    }

    #[test]
    fn batch_is_cut_before_interactive() {
        let ms = [
            m(ClientClass::Interactive, 1.0, 10.0),
            m(ClientClass::Batch, 1.0, 30.0),
        ];
        // Plenty: both at max.
        assert_eq!(share(100.0, &ms), vec![10.0, 30.0]);
        // Congested: interactive keeps its 10, batch takes the rest.
        assert_eq!(share(15.0, &ms), vec![10.0, 5.0]);
        // Severe: batch at its minimum, interactive takes the rest.
        assert_eq!(share(6.0, &ms), vec![5.0, 1.0]);
    }

    #[test]
    fn weights_split_a_class() {
        let ms = [
            m(ClientClass::Batch, 3.0, 100.0),
            m(ClientClass::Batch, 1.0, 100.0),
        ];
        let r = share(42.0, &ms);
        assert!(
            (r[0] - 31.0).abs() < 1e-9 && (r[1] - 11.0).abs() < 1e-9,
            "{r:?}"
        );
    }

    proptest! {
        #[test]
        fn shares_are_bounded_and_sum_to_the_total(
            total in 0.0f64..500.0,
            spec in proptest::collection::vec((any::<bool>(), 0.1f64..5.0, 0.0f64..5.0, 5.0f64..100.0), 1..8),
        ) {
            let ms: Vec<Member> = spec.iter().map(|&(b, w, min, max)| Member {
                class: if b { ClientClass::Batch } else { ClientClass::Interactive },
                weight: w, min_rps: min, max_rps: max,
            }).collect();
            let r = share(total, &ms);
            let (lo, hi): (f64, f64) = (ms.iter().map(|m| m.min_rps).sum(), ms.iter().map(|m| m.max_rps).sum());
            let sum: f64 = r.iter().sum();
            prop_assert!((sum - total.clamp(lo, hi)).abs() < 1e-6, "sum {sum} total {total} [{lo}, {hi}]");
            for (x, m) in r.iter().zip(&ms) {
                prop_assert!(*x >= m.min_rps - 1e-9 && *x <= m.max_rps + 1e-9);
            }
            // Strict priority: a batch client above its minimum means every interactive one is at max.
            if ms.iter().zip(&r).any(|(m, x)| m.class == ClientClass::Batch && *x > m.min_rps + 1e-6) {
                for (m, x) in ms.iter().zip(&r) {
                    if m.class == ClientClass::Interactive {
                        prop_assert!((*x - m.max_rps).abs() < 1e-6);
                    }
                }
            }
        }
    }
}
