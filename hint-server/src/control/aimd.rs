//! Additive increase, multiplicative decrease on the rate: above the setpoint the rate is cut by
//! `beta`; at or below it, it grows by `alpha` of the maximum per period.

use super::{Controller, Limits, Observation};
use tokenflow_schema::ControllerKind;

#[derive(Clone, Debug, serde::Serialize, serde::Deserialize)]
pub struct Aimd {
    rate: f64,
    /// Increase per period, fraction of the maximum rate.
    pub alpha: f64,
    /// Factor applied on congestion.
    pub beta: f64,
}

impl Aimd {
    pub fn new(l: &Limits) -> Self {
        Self {
            rate: (l.max_rps * 0.1).max(l.min_rps),
            alpha: 0.05,
            beta: 0.7,
        }
    }
}

impl Controller for Aimd {
    fn kind(&self) -> ControllerKind {
        ControllerKind::Aimd
    }

    fn update(&mut self, obs: &Observation, l: &Limits) -> (f64, String) {
        match obs.p95_rtt_ms {
            Some(y) if y > l.setpoint_ms => {
                self.rate *= self.beta;
                (
                    self.rate,
                    format!("p95 {y:.1} ms > {:.0} ms: ×{}", l.setpoint_ms, self.beta),
                )
            }
            _ => {
                self.rate += self.alpha * l.max_rps;
                (
                    self.rate,
                    format!(
                        "at or below {:.0} ms: +{:.0} % of max",
                        l.setpoint_ms,
                        self.alpha * 100.0
                    ),
                )
            }
        }
    }

    fn applied(&mut self, rate_rps: f64) {
        self.rate = rate_rps;
    }
}
