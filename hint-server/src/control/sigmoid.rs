//! The original project's mapping, kept as a baseline exactly as it was:
//! `rtt_factor = 1 / (1 + rtt_us / 50000)`, `health = clamp(rtt_factor − 0.5·anomaly, 0.01, 1)`,
//! `rate = 5 + 95 / (1 + e^(−5·(health − 0.5)))` requests/s. It has no state and no notion of
//! the link's capacity: the same RTT always gives the same rate.

use super::{Controller, Limits, Observation};
use tokenflow_schema::ControllerKind;

#[derive(Clone, Debug, serde::Serialize, serde::Deserialize)]
pub struct Sigmoid;

impl Sigmoid {
    pub fn rate(rtt_us: f64, anomaly: f64) -> f64 {
        let rtt_factor = 1.0 / (1.0 + rtt_us / 50_000.0);
        let health = (rtt_factor - 0.5 * anomaly).clamp(0.01, 1.0);
        5.0 + 95.0 / (1.0 + (-5.0 * (health - 0.5)).exp())
    }
}

impl Controller for Sigmoid {
    fn kind(&self) -> ControllerKind {
        ControllerKind::Sigmoid
    }

    fn update(&mut self, obs: &Observation, _: &Limits) -> (f64, String) {
        let rtt_ms = obs.p95_rtt_ms.unwrap_or(0.0);
        let rate = Self::rate(rtt_ms * 1000.0, obs.anomaly);
        (
            rate,
            format!(
                "sigmoid of p95 {rtt_ms:.1} ms and anomaly {:.2}",
                obs.anomaly
            ),
        )
    }
}
