//! Netflix concurrency-limits' Gradient2, applied to a rate instead of a concurrency limit.
//!
//! A long-term RTT (exponential average over `long_window` samples) is compared with the latest
//! one: `gradient = clamp(tolerance · long / short, 0.5, 1)`; the new limit is
//! `limit · gradient + queue_size`, smoothed by `smoothing`. When the short RTT falls far below
//! the long one (long / short > 2) the long average decays by 5 % per sample so that it can
//! follow the path down. When the group uses less than half its limit, the limit is held
//! (the application, not the network, is the bottleneck).
//!
//! A sample is the window's *mean* RTT (its p95 when the window has no mean), as in
//! concurrency-limits, whose windowed limits average a window's RTTs by default
//! (`AverageSampleWindow`): fed the p95, Gradient2 read every burst of a busy link as a 3×
//! gradient and held the link half empty.

use super::{Controller, Limits, Observation};
use tokenflow_schema::ControllerKind;

#[derive(Clone, Debug, serde::Serialize, serde::Deserialize)]
pub struct Gradient2 {
    limit: f64,
    long_rtt: Option<f64>,
    samples: u32,
    pub tolerance: f64,
    pub smoothing: f64,
    pub long_window: u32,
    /// Additive headroom per update, requests/s (Gradient2's queue size).
    pub queue_size: f64,
}

impl Gradient2 {
    pub fn new(l: &Limits) -> Self {
        Self {
            limit: (l.max_rps * 0.1).max(l.min_rps),
            long_rtt: None,
            samples: 0,
            tolerance: 1.5,
            smoothing: 0.2,
            long_window: 600,
            queue_size: (l.max_rps * 0.04).max(1.0),
        }
    }
}

impl Controller for Gradient2 {
    fn kind(&self) -> ControllerKind {
        ControllerKind::Gradient2
    }

    fn update(&mut self, obs: &Observation, _: &Limits) -> (f64, String) {
        let Some(short) = obs.mean_rtt_ms.or(obs.p95_rtt_ms).filter(|r| *r > 0.0) else {
            return (self.limit, "no RTT samples: holding".into());
        };
        self.samples += 1;
        // Exponential average with a warm-up: a plain mean over the first 10 samples.
        let long = match self.long_rtt {
            None => short,
            Some(l) if self.samples <= 10 => l + (short - l) / self.samples as f64,
            Some(l) => l + (short - l) * 2.0 / (self.long_window as f64 + 1.0),
        };
        let long = if long / short > 2.0 {
            long * 0.95
        } else {
            long
        };
        self.long_rtt = Some(long);
        if let Some(inflight) = obs.inflight
            && inflight < self.limit / 2.0
        {
            return (self.limit, "application-limited: holding".into());
        }
        let gradient = (self.tolerance * long / short).clamp(0.5, 1.0);
        let new = self.limit * gradient + self.queue_size;
        self.limit = self.limit * (1.0 - self.smoothing) + new * self.smoothing;
        (
            self.limit,
            format!("gradient {gradient:.2} (long {long:.1} ms, short {short:.1} ms)"),
        )
    }

    fn applied(&mut self, rate_rps: f64) {
        self.limit = rate_rps;
    }
}
