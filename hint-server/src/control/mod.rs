//! Controllers: pure state machines that turn one observation of a node per control period into
//! an allowed request rate. No I/O, no clocks of their own — `now` comes in with the observation —
//! so the same code runs in the server, in the plant simulations and in the property tests.
//!
//! Every controller works on a *group*: the clients of one node that chose the same controller.
//! [`Governor`] wraps a controller with what every kind shares — the limits, the stale-input rule
//! and the concurrency that goes with a rate — and [`share`] divides the group's rate among its
//! clients by class and weight.

mod aimd;
pub mod compute;
mod gradient2;
mod pid;
pub mod share;
mod sigmoid;
pub mod sim;

pub use aimd::Aimd;
pub use gradient2::Gradient2;
pub use pid::{Pid, PidGains};
use serde::{Deserialize, Serialize};
pub use sigmoid::Sigmoid;
use tokenflow_schema::ControllerKind;

/// What a controller sees of a node once per control period.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct Observation {
    /// Seconds on a monotonic clock.
    pub now: f64,
    /// p95 RTT of the latest window, milliseconds; `None` when the window had no RTT samples.
    pub p95_rtt_ms: Option<f64>,
    /// Median RTT of the same window, milliseconds, when known. Beside the p95 it tells a standing
    /// queue (the median lifts off the path's base) from bursts that come and go (it stays there).
    pub p50_rtt_ms: Option<f64>,
    /// Mean RTT of the same window, milliseconds, when known (Gradient2's sample: Netflix's
    /// windowed limits average a window's RTTs).
    pub mean_rtt_ms: Option<f64>,
    /// What the node's connections delivered in the window (bytes acknowledged), Mbit/s.
    pub delivered_mbit_s: Option<f64>,
    /// Segments the node's connections retransmitted in the window, per second. A window with
    /// retransmissions acknowledges late — repairing a hole acknowledges at once the bytes
    /// received past it, delivered in an earlier window — so what it delivered misreads the link.
    pub retransmits_per_s: f64,
    /// Forecast of the p95 RTT one interval ahead, milliseconds.
    pub predicted_p95_ms: Option<f64>,
    /// Isolation Forest score, 0 … 1.
    pub anomaly: f64,
    /// Requests in flight for the group, when known.
    pub inflight: Option<f64>,
    /// The node's backend queued past its objective in this window (its model server cannot keep
    /// up): more rate only lengthens its queue, whatever the RTT says. Only TokenFlow's `pid`
    /// reads it; the baselines are the published algorithms, on RTT alone.
    pub backend_queued: bool,
    /// No window arrived for 3 intervals.
    pub stale: bool,
}

/// Bounds and target of a group.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct Limits {
    pub setpoint_ms: f64,
    pub min_rps: f64,
    pub max_rps: f64,
    pub max_concurrency: u32,
}

impl Limits {
    /// Rate handed out on stale input: never above the last rate, never above a tenth of the
    /// maximum, never below the minimum.
    pub fn stale_rps(&self, last: f64) -> f64 {
        last.min(self.max_rps * 0.1).max(self.min_rps)
    }
}

/// A controller's answer for one period.
#[derive(Clone, Debug, PartialEq)]
pub struct Decision {
    pub rate_rps: f64,
    pub max_concurrency: u32,
    /// 0 (congested) … 1 (healthy): the observed p95 against the setpoint, damped by anomaly.
    pub health: f64,
    pub stale: bool,
    pub reason: String,
}

/// One controller kind's state machine.
pub trait Controller: Send + Sync {
    fn kind(&self) -> ControllerKind;
    /// The next rate (requests/s) for a fresh observation. Implementations may return any finite
    /// value; the [`Governor`] clamps it.
    fn update(&mut self, obs: &Observation, limits: &Limits) -> (f64, String);
    /// Told the rate the governor actually handed out, so that internal state (integrators,
    /// estimated limits) does not wind up beyond what was applied.
    fn applied(&mut self, _rate_rps: f64) {}
}

/// Any controller, as a value: serialisable, so that a group's state can live in Redis and be
/// continued by whichever hint-server replica receives the node's next window.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "lowercase")]
// One value per controller group of a node: a few hundred bytes each, not worth a box.
#[allow(clippy::large_enum_variant)]
pub enum AnyController {
    Pid(Pid),
    Sigmoid(Sigmoid),
    Gradient2(Gradient2),
    Aimd(Aimd),
    Off(Off),
}

impl AnyController {
    /// A fresh controller of a kind with default parameters.
    pub fn new(kind: ControllerKind, limits: &Limits) -> Self {
        match kind {
            ControllerKind::Pid => Self::Pid(Pid::new(PidGains::default(), limits)),
            ControllerKind::Sigmoid => Self::Sigmoid(Sigmoid),
            ControllerKind::Gradient2 => Self::Gradient2(Gradient2::new(limits)),
            ControllerKind::Aimd => Self::Aimd(Aimd::new(limits)),
            ControllerKind::Off => Self::Off(Off),
        }
    }

    fn inner(&mut self) -> &mut dyn Controller {
        match self {
            Self::Pid(c) => c,
            Self::Sigmoid(c) => c,
            Self::Gradient2(c) => c,
            Self::Aimd(c) => c,
            Self::Off(c) => c,
        }
    }
}

/// No pacing: the group's maximum, always.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Off;

impl Controller for Off {
    fn kind(&self) -> ControllerKind {
        ControllerKind::Off
    }
    fn update(&mut self, _: &Observation, limits: &Limits) -> (f64, String) {
        (limits.max_rps, "pacing off".into())
    }
}

/// A controller plus the rules every kind obeys.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Governor {
    controller: AnyController,
    pub limits: Limits,
    last_rps: f64,
}

impl Governor {
    pub fn new(kind: ControllerKind, limits: Limits) -> Self {
        Self::with_controller(AnyController::new(kind, &limits), limits)
    }

    pub fn with_controller(controller: AnyController, limits: Limits) -> Self {
        Self {
            controller,
            // Start from the bottom: a new group earns its rate.
            last_rps: limits.min_rps.max(limits.max_rps * 0.1).min(limits.max_rps),
            limits,
        }
    }

    pub fn kind(&self) -> ControllerKind {
        match self.controller {
            AnyController::Pid(_) => ControllerKind::Pid,
            AnyController::Sigmoid(_) => ControllerKind::Sigmoid,
            AnyController::Gradient2(_) => ControllerKind::Gradient2,
            AnyController::Aimd(_) => ControllerKind::Aimd,
            AnyController::Off(_) => ControllerKind::Off,
        }
    }

    pub fn last_rps(&self) -> f64 {
        self.last_rps
    }

    pub fn update(&mut self, obs: &Observation) -> Decision {
        let l = self.limits;
        let health = health(obs, &l);
        if obs.stale {
            let rate = if self.kind() == ControllerKind::Off {
                l.max_rps
            } else {
                l.stale_rps(self.last_rps)
            };
            self.last_rps = rate;
            self.controller.inner().applied(rate);
            return Decision {
                rate_rps: rate,
                max_concurrency: concurrency(rate, &l),
                health: 0.0,
                stale: true,
                reason: "no telemetry for 3 intervals: conservative rate".into(),
            };
        }
        let (raw, reason) = self.controller.inner().update(obs, &l);
        let rate = if raw.is_finite() {
            raw.clamp(l.min_rps, l.max_rps)
        } else {
            l.min_rps
        };
        self.last_rps = rate;
        self.controller.inner().applied(rate);
        Decision {
            rate_rps: rate,
            max_concurrency: concurrency(rate, &l),
            health,
            stale: false,
            reason,
        }
    }
}

/// Health in 0 … 1: 1 at or below the setpoint, falling to 0 at three times it, damped by the
/// anomaly score above 0.5.
pub fn health(obs: &Observation, l: &Limits) -> f64 {
    let rtt = match obs.p95_rtt_ms {
        Some(r) if obs.stale => r.max(3.0 * l.setpoint_ms),
        Some(r) => r,
        None => l.setpoint_ms,
    };
    let queue = ((rtt - l.setpoint_ms) / (2.0 * l.setpoint_ms)).clamp(0.0, 1.0);
    let anomaly = ((obs.anomaly - 0.5) * 2.0).clamp(0.0, 1.0);
    ((1.0 - queue) * (1.0 - 0.5 * anomaly)).clamp(0.0, 1.0)
}

/// Concurrency that goes with a rate: the same fraction of the maximum, at least 1.
pub fn concurrency(rate: f64, l: &Limits) -> u32 {
    if l.max_rps <= 0.0 {
        return 1;
    }
    ((l.max_concurrency as f64 * rate / l.max_rps).ceil() as u32).clamp(1, l.max_concurrency.max(1))
}

#[cfg(test)]
mod tests;
