//! TokenFlow's hint server: from the agents' telemetry windows to per-client rate limits.

pub mod api;
pub mod bench;
pub mod control;
pub mod engine;
pub mod evaluate;
pub mod features;
pub mod forecast;
pub mod iforest;
pub mod metrics;
pub mod model;
pub mod serve;
pub mod simulate;
pub mod store;
pub mod trace;
pub mod ui;

/// An exponentially weighted moving average kept in `state`: the newest value `x` weighs `alpha`,
/// the first one is taken as it is. Returns the new average.
pub(crate) fn ewma(state: &mut Option<f64>, x: f64, alpha: f64) -> f64 {
    let next = state.map_or(x, |e| e + alpha * (x - e));
    *state = Some(next);
    next
}
