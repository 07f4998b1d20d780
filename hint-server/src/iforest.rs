//! Isolation Forest (Liu, Ting & Zhou, 2008), as scikit-learn implements it: each tree is grown on
//! a subsample of `max_samples` rows (without replacement) to depth ⌈log2 max_samples⌉, splitting
//! on a random feature at a uniform random threshold between the node's min and max; the score
//! of a point is `2^(−E[h(x)] / c(max_samples))`, where `h` is the path length plus `c(n)` for the
//! `n` training points left in the leaf. Scores near 1 are anomalous, below 0.5 ordinary.
//!
//! linfa and smartcore have no Isolation Forest, and the crates that do are unmaintained or fix
//! the dimension at compile time; this one is small and checked against scikit-learn on the same
//! data (`tests/fixtures`).

use serde::{Deserialize, Serialize};

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
enum Node {
    Leaf {
        size: usize,
    },
    Split {
        feature: usize,
        threshold: f64,
        left: usize,
        right: usize,
    },
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
struct Tree {
    nodes: Vec<Node>,
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct IsolationForest {
    trees: Vec<Tree>,
    max_samples: usize,
    n_features: usize,
}

/// Average path length of an unsuccessful search in a binary search tree of `n` points.
pub fn c(n: usize) -> f64 {
    match n {
        0 | 1 => 0.0,
        2 => 1.0,
        n => {
            let n = n as f64;
            2.0 * ((n - 1.0).ln() + 0.577_215_664_901_532_9) - 2.0 * (n - 1.0) / n
        }
    }
}

impl IsolationForest {
    /// Fits `n_trees` trees on `rows` (each of the same length). Returns `None` without rows.
    pub fn fit(rows: &[Vec<f64>], n_trees: usize, max_samples: usize, seed: u64) -> Option<Self> {
        let n_features = rows.first()?.len();
        let psi = max_samples.min(rows.len()).max(1);
        let max_depth = (psi as f64).log2().ceil() as usize;
        let mut rng = fastrand::Rng::with_seed(seed);
        let trees = (0..n_trees)
            .map(|_| {
                let mut idx: Vec<usize> = (0..rows.len()).collect();
                rng.shuffle(&mut idx);
                idx.truncate(psi);
                let mut t = Tree { nodes: Vec::new() };
                grow(&mut t, rows, idx, 0, max_depth, n_features, &mut rng);
                t
            })
            .collect();
        Some(Self {
            trees,
            max_samples: psi,
            n_features,
        })
    }

    pub fn n_features(&self) -> usize {
        self.n_features
    }

    /// Anomaly score in (0, 1].
    pub fn score(&self, x: &[f64]) -> f64 {
        let mean = self.trees.iter().map(|t| path_length(t, x)).sum::<f64>()
            / self.trees.len().max(1) as f64;
        2f64.powf(-mean / c(self.max_samples).max(1e-12))
    }
}

fn grow(
    t: &mut Tree,
    rows: &[Vec<f64>],
    idx: Vec<usize>,
    depth: usize,
    max_depth: usize,
    n_features: usize,
    rng: &mut fastrand::Rng,
) -> usize {
    let me = t.nodes.len();
    t.nodes.push(Node::Leaf { size: idx.len() });
    if depth >= max_depth || idx.len() <= 1 {
        return me;
    }
    // A random feature that is not constant here (as scikit-learn's splitter skips constant
    // features); if all are constant, this is a leaf.
    let mut features: Vec<usize> = (0..n_features).collect();
    rng.shuffle(&mut features);
    for f in features {
        let (lo, hi) = idx
            .iter()
            .map(|&i| rows[i][f])
            .fold((f64::INFINITY, f64::NEG_INFINITY), |(lo, hi), v| {
                (lo.min(v), hi.max(v))
            });
        if hi.partial_cmp(&lo) != Some(std::cmp::Ordering::Greater) {
            continue;
        }
        let threshold = lo + rng.f64() * (hi - lo);
        let (l, r): (Vec<usize>, Vec<usize>) = idx.iter().partition(|&&i| rows[i][f] < threshold);
        let left = grow(t, rows, l, depth + 1, max_depth, n_features, rng);
        let right = grow(t, rows, r, depth + 1, max_depth, n_features, rng);
        t.nodes[me] = Node::Split {
            feature: f,
            threshold,
            left,
            right,
        };
        return me;
    }
    me
}

fn path_length(t: &Tree, x: &[f64]) -> f64 {
    let (mut i, mut depth) = (0usize, 0.0);
    loop {
        match &t.nodes[i] {
            Node::Leaf { size } => return depth + c(*size),
            Node::Split {
                feature,
                threshold,
                left,
                right,
            } => {
                i = if x.get(*feature).copied().unwrap_or(0.0) < *threshold {
                    *left
                } else {
                    *right
                };
                depth += 1.0;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn isolated_points_score_high() {
        let mut rng = fastrand::Rng::with_seed(1);
        let rows: Vec<Vec<f64>> = (0..500).map(|_| vec![rng.f64(), rng.f64()]).collect();
        let f = IsolationForest::fit(&rows, 100, 256, 7).unwrap();
        let inlier = f.score(&[0.5, 0.5]);
        let outlier = f.score(&[5.0, -4.0]);
        assert!(
            outlier > 0.65 && inlier < 0.5,
            "outlier {outlier} inlier {inlier}"
        );
    }

    #[test]
    fn c_matches_the_paper() {
        assert_eq!(c(1), 0.0);
        assert_eq!(c(2), 1.0);
        // c(256) ≈ 10.24 (2·(ln 255 + γ) − 2·255/256)
        assert!((c(256) - 10.2448).abs() < 1e-3, "{}", c(256));
    }

    #[test]
    fn constant_data_does_not_split() {
        let rows = vec![vec![1.0, 2.0]; 50];
        let f = IsolationForest::fit(&rows, 10, 256, 1).unwrap();
        // Every tree is one leaf of 50: all points score alike.
        assert!((f.score(&[1.0, 2.0]) - f.score(&[9.0, 9.0])).abs() < 1e-12);
    }
}
