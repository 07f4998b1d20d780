//! TokenFlow's controller: PID on the p95 RTT, acting on the logarithm of the rate.
//!
//! Why the logarithm: a bottleneck queue grows at `rate − capacity`, so the RTT's response to a
//! rate change scales with 1 / capacity. Acting on ln(rate) makes the loop gain the same at
//! 5 Mbit/s and at 20 Mbit/s, so one set of gains holds across bandwidth steps.
//!
//! - error `e = (setpoint − p95) / 1000`: seconds of queueing delay below (+) or above (−) target;
//! - derivative on the measurement (no kick when the setpoint changes);
//! - anti-windup by tracking: when the governor or the slew limit applies less than computed,
//!   the integrator is set back to what was applied;
//! - feed-forward from the forecast: a predicted rise cuts the rate before the queue builds;
//! - startup: a new group doubles its rate every period until the p95 first reaches the setpoint
//!   (as TCP's slow start does), then falls back to the last rate that showed no queue and
//!   remembers the rate that did — so a group reaches the path's capacity in a few periods
//!   instead of earning it at the slew limit from a tenth of the maximum;
//! - with no standing queue (p95 near the path's base RTT) the RTT says nothing about headroom, so
//!   the rate probes upward multiplicatively at the slew limit, and once well past the rate that
//!   last built a queue it forgets that rate (the path has widened);
//! - with a standing queue under twice the setpoint (the median lifted off its floor by a quarter
//!   of the room up to the setpoint) the loop tracks the link instead:
//!   the queue's slope between two windows and the rates that made it give the rate the link
//!   carries (in rate per Mbit/s delivered, smoothed), and the next rate is that fit plus or minus
//!   the queue's distance from its target over `track_horizon` — the target being the setpoint
//!   less the window's measured spread of the p95 over the mean. A bottleneck queue integrates
//!   the rate's excess, so a PID on the p95 alone swings around the link's rate (on the simulated
//!   20 → 5 → 20 Mbit/s plant, over 8 seeds, 63 % of steady periods in the band with the PID
//!   alone, 98 % tracking);
//! - below the setpoint the median decides how the integral climbs: a median lifted off its base
//!   is a standing queue, which grows by the rate's excess every second, so the integral moves on
//!   seconds of error (the same gain as above the setpoint — no limit cycle around it); a median
//!   at its base means bursts that drain between requests, and the integral moves on the error
//!   relative to the setpoint, fast;
//! - the link's ceiling — what the node's connections delivered in a window that showed the link
//!   saturated — holds the rate where bursts hide a full link from the RTT, lets a link with room
//!   skip the hold under the overload rate, and scales startup's fallback;
//! - a backend that queues past its objective (the node's model server cannot keep up) ends
//!   startup as a queue on the path does, and holds the rate from rising while it lasts;
//! - an anomaly score above 0.5 damps the rate by up to `anomaly_damping`, for that period only
//!   and only while the p95 is past the setpoint (or its forecast past it), ramping in up to the
//!   overload margin (no relay around the setpoint): the damping is
//!   not fed back into the integrator, so a lasting anomaly score does not ratchet the rate down
//!   period after period.

use super::{Controller, Limits, Observation};
use tokenflow_schema::ControllerKind;

#[derive(Clone, Copy, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct PidGains {
    /// Proportional gain, ln(rate) per second of queueing error.
    pub kp: f64,
    /// Integral gain, ln(rate) per second of queueing error per second.
    pub ki: f64,
    /// Derivative gain on the measurement, ln(rate) per (second of RTT change per second).
    pub kd: f64,
    /// Feed-forward gain on the predicted rise, ln(rate) per second of predicted RTT increase.
    pub kf: f64,
    /// Integral gain below the setpoint, ln(rate) per unit of relative headroom per second.
    #[serde(default)]
    pub ki_up: f64,
    /// Below `base + probe_fraction · (setpoint − base)` there is no standing queue and the rate
    /// probes upward at the slew limit instead.
    pub probe_fraction: f64,
    /// Largest increase per period (fraction); decreases are not limited.
    pub slew_up: f64,
    /// First probing step (fraction); doubles per period without a queue, up to `slew_up`.
    pub probe_start: f64,
    /// p95 above `severe` × setpoint and not falling: an extra multiplicative cut `severe_cut`.
    pub severe: f64,
    pub severe_cut: f64,
    /// Rate cut at anomaly score 1.0 (fraction).
    pub anomaly_damping: f64,
    /// Growth per period during startup (1.0 doubles); 0 starts a group in the normal loop.
    #[serde(default)]
    pub startup_growth: f64,
    /// After a queue above the setpoint, periods the rate stays under `hold_fraction` of the rate
    /// that built it; then it creeps past that by at most `creep` per period.
    #[serde(default)]
    pub hold_periods: u32,
    #[serde(default)]
    pub hold_fraction: f64,
    #[serde(default)]
    pub creep: f64,
    /// Weight of the newest anomaly score in the smoothed score that damps the rate (1 = none).
    #[serde(default)]
    pub anomaly_smoothing: f64,
    /// A queue counts as built by the rate (remembered, and held under) only with the p95 above
    /// the setpoint by this share of it: the agent's histogram buckets are 1/8 of an octave
    /// wide, so one reading of 51.2 ms is noise around a 50 ms setpoint, not an overload.
    #[serde(default)]
    pub overload_margin: f64,
    /// With no standing queue and the p95 under the setpoint, a window that delivered at least
    /// this share of the link's ceiling (what it delivered when last seen saturated) shows the
    /// link full: the rate stops growing there (0: never). The RTT of bursts that drain between
    /// requests barely moves until the link is full; what the link delivers stops growing with the
    /// rate — BBR's signal.
    #[serde(default)]
    pub link_full: f64,
    /// With a standing queue, seconds over which the tracking law closes the queue's distance
    /// from its target (0: no tracking, the PID alone).
    #[serde(default = "default_track_horizon")]
    pub track_horizon: f64,
}

fn default_track_horizon() -> f64 {
    0.7
}

impl Default for PidGains {
    fn default() -> Self {
        Self {
            kp: 1.0,
            ki: 0.5,
            kd: 0.3,
            kf: 0.5,
            ki_up: 0.3,
            probe_fraction: 0.25,
            slew_up: 0.25,
            probe_start: 0.05,
            severe: 3.0,
            severe_cut: 0.5,
            anomaly_damping: 0.3,
            startup_growth: 1.0,
            hold_periods: 5,
            hold_fraction: 0.95,
            creep: 0.06,
            anomaly_smoothing: 0.2,
            overload_margin: 0.2,
            link_full: 0.95,
            track_horizon: default_track_horizon(),
        }
    }
}

impl PidGains {
    /// Share of the ceiling under which a link has room (as far under `link_full` as it is under
    /// 1): it skips the hold under the overload rate, and a full link stays full down to it.
    fn room_share(&self) -> f64 {
        2.0 * self.link_full - 1.0
    }
}

/// Periods after startup during which its overshoot's queue drains without further cuts.
const STARTUP_DRAIN_PERIODS: u32 = 2;
/// A rate rise (fraction) large enough to tell whether what the link delivers rose with it.
const CEILING_RISE: f64 = 0.05;
/// Periods a full link holds the rate before a step of `FULL_PROBE_STEP` past it.
const FULL_PROBE_PERIODS: u32 = 16;
const FULL_PROBE_STEP: f64 = 0.03;
/// Half-width of the band around the setpoint the loop holds the p95 in (fraction).
const BAND: f64 = 0.2;
/// A p95 moving by less than this (seconds per second) shows a steady queue.
const STEADY_DRIFT: f64 = 0.01;
/// Growth of the remembered rate per Mbit/s with each window that measures it, so that it follows
/// a request that became cheaper on the wire.
const KAPPA_CREEP: f64 = 1.005;
/// A rate this far over the one that fits the link is cut to it.
const FIT_MARGIN: f64 = 0.1;
/// Most of a period's rate given up to drain a queue.
const MAX_DRAIN: f64 = 0.5;
/// The first step of a search restarted from a held fit (fraction).
const RESTART_STEP: f64 = 0.25;
/// Most of a period's rate added over a held fit to build the setpoint's missing queue.
const FILL_MAX: f64 = 0.1;
/// A period whose transient terms and damping put the rate this far under the integral's
/// (fraction) was a cut: an empty queue in the next window is the cut's doing.
const TRANSIENT_CUT: f64 = 0.03;
/// Histogram buckets (at the floor) the no-queue threshold must span over the floor for an empty
/// window to tell a vanished queue from the agent's bucket noise.
const RESOLVED_BUCKETS: f64 = 2.0;

/// Weight of the newest window in the smoothed rate per Mbit/s measured from the queue's slope,
/// and in the smoothed spread of the p95 over the mean.
const TRACK_SMOOTHING: f64 = 0.3;

/// Width (ms) of the agent's histogram bucket holding `ms`: a p95 is read to about this.
fn bucket_width_ms(ms: f64) -> f64 {
    use agent_common::hist::{bucket_bounds, bucket_index};
    let (lo, hi) = bucket_bounds(bucket_index(
        (ms * 1000.0).clamp(0.0, u32::MAX as f64) as u32
    ));
    (hi - lo) as f64 / 1000.0
}

#[derive(Clone, Debug, serde::Serialize, serde::Deserialize)]
pub struct Pid {
    g: PidGains,
    /// ln(rate / max_rps).
    integral: f64,
    last_terms: f64,
    prev_y: Option<f64>,
    /// The p95 of the window before the newest.
    #[serde(default)]
    prev_y_before: Option<f64>,
    prev_t: Option<f64>,
    base_ms: Option<f64>,
    /// The lowest median seen (creeping up as `base_ms` does).
    #[serde(default)]
    base50_ms: Option<f64>,
    probe_step: f64,
    /// Rate (fraction of max) at which a queue above the setpoint was last seen.
    congested_u: Option<f64>,
    /// `congested_u` is the rate measured to fit the link (what it delivered, saturated), not a
    /// guess between two rates.
    #[serde(default)]
    fit_bound: bool,
    /// … measured in a window whose queue stood all through it (the link busy from end to end).
    #[serde(default)]
    fit_full: bool,
    last_u: f64,
    /// The rate applied the period before `last_u`: a window's queue was built by the rates of
    /// the last two periods, not only by the newest.
    #[serde(default)]
    prev_u: f64,
    /// ln of the last period's anomaly damping (≤ 0), kept out of the integrator.
    #[serde(default)]
    last_damp_ln: f64,
    /// ln of how far the last period's transient terms and damping put the rate under the
    /// integral's (≤ 0; 0 after a drain sized to the queue, which has its own way back).
    #[serde(default)]
    last_cut_ln: f64,
    /// In startup: no p95 at the setpoint seen yet.
    #[serde(default)]
    startup: bool,
    /// This startup already stepped back once from a backend's queue.
    #[serde(default)]
    startup_backend_burst: bool,
    /// … and has not doubled since (its rate is already the one before the queue).
    #[serde(default)]
    stepped_back: bool,
    /// Periods left holding under the rate that last built a queue.
    #[serde(default)]
    hold: u32,
    /// Periods left in which startup's own queue drains without further cuts.
    #[serde(default)]
    drain: u32,
    /// The drain under way was sized to the queue's excess (a cut to the fit less it).
    #[serde(default)]
    drain_sized: bool,
    /// The next creep step past the remembered overload rate (0: `creep`); it doubles with each
    /// period that stays clearly under the setpoint, so a stale memory (the path widened) is left
    /// behind in a few periods, as BIC-TCP's max probing does.
    #[serde(default)]
    creep_step: f64,
    /// Smoothed anomaly score (`None` before the first).
    #[serde(default)]
    anomaly_ewma: Option<f64>,
    /// What the link delivered, Mbit/s, in a window that showed it saturated.
    #[serde(default)]
    ceiling_mbit: Option<f64>,
    /// What the previous window delivered, Mbit/s.
    #[serde(default)]
    prev_delivered: Option<f64>,
    /// Periods the rate has been held at a full link since the last probe past it.
    #[serde(default)]
    full_held: u32,
    /// The last window showed the link full: the next one stays full down to the `room` threshold
    /// (hysteresis, so a window delivering a little less does not release the rate to climb).
    #[serde(default)]
    was_full: bool,
    /// Rate (fraction of max) per Mbit/s the link delivered, the lowest seen in a window whose
    /// queue neither grew nor drained (what was sent was what got through), creeping up 0.5 %
    /// with each such window. Times what a saturated link delivers now, it is the rate that fits
    /// the link.
    #[serde(default)]
    u_per_mbit: Option<f64>,
    /// The last window showed a standing queue that held steady.
    #[serde(default)]
    was_standing: bool,
    /// The last window's queue vanished at a held rate: if the next shows none either, the
    /// path widened.
    #[serde(default)]
    widening: bool,
    /// Consecutive windows without a queue at the rate measured to fit the narrowed link.
    #[serde(default)]
    empties_at_fit: u32,
    /// The lowest p95 ever seen (unlike `base_ms`, it does not creep up under a queue that
    /// stands for long).
    #[serde(default)]
    floor_ms: Option<f64>,
    /// The last period drained a queue at a chosen rate: the next one reads no trend.
    #[serde(default)]
    drained: bool,
    /// A search restarted from a held fit: the next step's growth (fraction; 0 = startup's
    /// own), doubling with each step up to startup's.
    #[serde(default)]
    restart_step: f64,
    /// ln of startup's last step (0 = startup's own growth): the step an exit goes back by.
    #[serde(default)]
    last_growth_ln: f64,
    /// The last window's mean RTT, if its queue stood (the median lifted): with this window's,
    /// the queue's slope across both.
    #[serde(default)]
    prev_mean_ms: Option<f64>,
    /// Rate (fraction of max) per Mbit/s delivered, measured from the queue's slope over two
    /// windows whose queue stood throughout (smoothed). Unlike `u_per_mbit` (the lowest ratio
    /// seen, which errs low by design so that cuts after a step are never too deep) it is
    /// unbiased: a fit 2 % low, held, drains 14 ms of queue a second.
    #[serde(default)]
    slope_per_mbit: Option<f64>,
    /// The last period's drain went back under a fit read from windows with retransmissions.
    #[serde(default)]
    fit_read_dropping: bool,
    /// Smoothed spread of the p95 over the mean in windows with a standing queue, ms.
    #[serde(default)]
    spread_ms: Option<f64>,
    /// The last period's rate came from the tracking law (a rate near the link's, not a cut):
    /// a queue gone in the next window is the path widening.
    #[serde(default)]
    tracked: bool,
    max_rps: f64,
    min_ln: f64,
}

impl Pid {
    pub fn new(g: PidGains, limits: &Limits) -> Self {
        let start = (limits.max_rps * 0.1)
            .max(limits.min_rps)
            .min(limits.max_rps)
            / limits.max_rps.max(1e-9);
        Self {
            g,
            integral: start.max(1e-6).ln(),
            last_terms: 0.0,
            prev_y: None,
            prev_y_before: None,
            prev_t: None,
            base_ms: None,
            base50_ms: None,
            probe_step: 0.0,
            congested_u: None,
            fit_bound: false,
            fit_full: false,
            last_u: start,
            prev_u: start,
            last_damp_ln: 0.0,
            last_cut_ln: 0.0,
            startup: g.startup_growth > 0.0,
            startup_backend_burst: false,
            stepped_back: false,
            hold: 0,
            drain: 0,
            drain_sized: false,
            creep_step: 0.0,
            anomaly_ewma: None,
            ceiling_mbit: None,
            prev_delivered: None,
            full_held: 0,
            was_full: false,
            u_per_mbit: None,
            was_standing: false,
            widening: false,
            empties_at_fit: 0,
            floor_ms: None,
            drained: false,
            restart_step: 0.0,
            last_growth_ln: 0.0,
            prev_mean_ms: None,
            slope_per_mbit: None,
            fit_read_dropping: false,
            spread_ms: None,
            tracked: false,
            max_rps: limits.max_rps,
            min_ln: (limits.min_rps / limits.max_rps.max(1e-9)).max(1e-6).ln(),
        }
    }
}

impl Pid {
    /// Remembers the rate measured to fit the link as the one the loop holds under (the hold cap
    /// is `hold_fraction` of the remembered overload rate, so the cap is the fit itself).
    fn remember_fit(&mut self, fit_u: f64) {
        self.congested_u = Some(fit_u / self.g.hold_fraction.max(0.5));
        self.fit_bound = true;
        self.fit_full = false;
    }

    /// The rate measured to fit the link that the loop holds under, if the memory is one
    /// (the inverse of [`Self::remember_fit`]).
    fn held_fit(&self) -> Option<f64> {
        self.congested_u
            .filter(|_| self.fit_bound)
            .map(|c| self.g.hold_fraction.max(0.5) * c)
    }

    /// The rate (fraction of max) that fits a link delivering `mbit` Mbit/s, once the rate per
    /// Mbit/s has been measured.
    fn fit_at(&self, mbit: f64) -> Option<f64> {
        self.u_per_mbit.map(|k| (k * mbit).min(1.0))
    }

    /// The rate (fraction of max) a link delivering `mbit` Mbit/s carries, for the tracking law:
    /// from the queue's slope where measured (unbiased), else the fit.
    fn carried_at(&self, mbit: f64) -> Option<f64> {
        self.slope_per_mbit
            .or(self.u_per_mbit)
            .map(|k| (k * mbit).min(1.0))
    }

    /// Remembers a rate guessed to overload the path (`None`: forgets it).
    fn remember_overload(&mut self, u: Option<f64>) {
        self.congested_u = u;
        self.fit_bound = false;
    }
}

impl Controller for Pid {
    fn kind(&self) -> ControllerKind {
        ControllerKind::Pid
    }

    fn update(&mut self, obs: &Observation, l: &Limits) -> (f64, String) {
        let dt = self.prev_t.map_or(1.0, |t| (obs.now - t).clamp(0.1, 10.0));
        self.prev_t = Some(obs.now);
        let sp = l.setpoint_ms.max(1.0);
        self.max_rps = l.max_rps.max(1e-9);
        self.min_ln = (l.min_rps / self.max_rps).max(1e-6).ln();
        let Some(y) = obs.p95_rtt_ms else {
            // No RTT samples: no traffic to judge. Grow gently toward the maximum.
            let u = (self.last_u * (1.0 + self.g.slew_up * 0.5)).min(1.0);
            self.integral = u.max(1e-6).ln();
            self.last_terms = 0.0;
            return (u * l.max_rps, "no RTT samples: growing".into());
        };
        // The path's base RTT: the lowest p95 seen, allowed to creep up 1 % per period so that a
        // route change is eventually followed — but not while the p95 is in the band around the
        // setpoint: that is the queue the loop holds there, and a base that crept up to it would
        // read the queue as none (on a quiet simulated link, after about 90 s at the setpoint the
        // loop probed past the link's rate).
        let creep = if (y - sp).abs() <= BAND * sp {
            1.0
        } else {
            1.01
        };
        let base = self.base_ms.map_or(y, |b| (b * creep).min(y));
        self.base_ms = Some(base);
        // A standing queue: the median itself has lifted off its own base. Below the setpoint that
        // is a queue the rate holds, so the integral moves on seconds of error as it does above
        // it; with no standing queue (bursts that come and go) the p95 says little about the
        // headroom and the integral moves on the relative error instead.
        // Queueing delay under which the p95 shows no queue at all (a share of the room between
        // the base and the setpoint).
        let no_queue_ms = self.g.probe_fraction * (sp - base);
        let standing = obs.p50_rtt_ms.is_some_and(|m| {
            let b = self.base50_ms.map_or(m, |b| (b * creep).min(m));
            self.base50_ms = Some(b);
            m - b > no_queue_ms
        });
        // In the first search (not one restarted from a held fit, which ends in the band): the
        // median at its floor, where the p95 alone cannot tell bursts from a queue — the p95's
        // base is no help before it has seen a quiet window.
        let median_at_floor = obs
            .p50_rtt_ms
            .zip(self.base50_ms)
            .is_none_or(|(m, b)| m - b <= self.g.probe_fraction * (sp - b));
        let bursts = self.restart_step == 0.0 && obs.p50_rtt_ms.is_some() && median_at_floor;
        // A queue the loop can hold: the median lifted off its own floor by a quarter of the
        // room up to the setpoint (not by bursts alone, which lift the p95's base too), the p95
        // under twice the setpoint (not a full buffer draining).
        let holdable = standing && !median_at_floor && y <= 2.0 * sp;
        // The last period cut the rate under the integral's (the proportional term or the
        // anomaly damping, against a queue past the setpoint): a queue smaller now is the cut's
        // doing, not room over the integral's rate.
        let after_cut = self.last_cut_ln < (1.0 - TRANSIENT_CUT).ln();
        // After a drain the p95's fall is the drain's doing, not a trend to act on.
        let after_drain = std::mem::take(&mut self.drained);
        // The p95's fall, seconds per second (rising: negative).
        let falling = -self.prev_y.map_or(0.0, |p| (y - p) / 1000.0 / dt);
        let d = if after_drain { 0.0 } else { falling };
        self.prev_y_before = self.prev_y;
        self.prev_y = Some(y);
        let e = ((sp - y) / 1000.0).clamp(-0.5, 0.5);
        let ff = obs
            .predicted_p95_ms
            .map_or(0.0, |p| -((p - y).max(0.0) / 1000.0));

        let mut reason;
        let mut terms;
        // Back to a rate chosen from what the link delivers after a period under it to drain
        // a queue: not a probe, so the slew limit does not apply.
        let mut returning = false;
        // This period's rate was sized to drain the queue's excess within it (a cut to the fit
        // less the excess, or the fit held while the window still shows the drain).
        let mut sized = false;
        let overloaded = sp * (1.0 + self.g.overload_margin.max(0.0));
        let full_growth = (1.0 + self.g.startup_growth).ln();
        // The step startup last took, which an exit goes back by.
        let growth = if self.last_growth_ln > 0.0 {
            self.last_growth_ln
        } else {
            full_growth
        };
        // The rate that fits the link: in a window whose queue neither grew nor drained, at a
        // rate held steady, what was sent got through — the rate per Mbit/s delivered. Times what
        // the link delivers now, it is the rate the link carries. (A rate the users did not fill
        // reads high, so the fit errs toward cutting too little, never too much.)
        let got = obs.delivered_mbit_s.filter(|g| g.is_finite() && *g > 0.0);
        let steady_rate = self.last_u >= 0.95 * self.prev_u && self.last_u <= 1.05 * self.prev_u;
        self.u_per_mbit = match got {
            Some(g) if steady_rate && y <= overloaded && d.abs() < STEADY_DRIFT => Some(
                self.u_per_mbit
                    .map_or(self.last_u / g, |k| (k * KAPPA_CREEP).min(self.last_u / g)),
            ),
            _ => self.u_per_mbit,
        };
        let fit = got.and_then(|g| self.fit_at(g));
        // The queue's slope: with the queue standing through this window and the last (the link
        // busy throughout, the buffer not full), the mean RTT rose by the two windows' average
        // excess of the rate over what the link carries — which gives that rate, and over what
        // the link delivered, the rate per Mbit/s.
        let prev_mean =
            std::mem::replace(&mut self.prev_mean_ms, obs.mean_rtt_ms.filter(|_| holdable));
        if let (Some(m), Some(pm), Some(g), true) = (obs.mean_rtt_ms, prev_mean, got, holdable) {
            let carried = (self.prev_u + self.last_u) / 2.0 / (1.0 + (m - pm) / 1000.0 / dt);
            if carried.is_finite() && carried > 0.0 {
                crate::ewma(&mut self.slope_per_mbit, carried / g, TRACK_SMOOTHING);
            }
        }
        let tracked = std::mem::take(&mut self.tracked);
        // The window after a drain, with a queue still in its p95, delivered all the narrowed
        // link carries (the queue kept it busy; the step is behind it): where that fits clearly
        // less (by the fit's margin) than the fit the cut was measured on, the lower one is the
        // rate to hold — not over it, and not under (after the branches below). A window that
        // straddled the step delivered partly at the old rate and read high: on the test bed a
        // fit of 6.9 req/s where 6.0 fitted, and the loop climbed to 6.8 and filled the buffer
        // again. (Within the margin the two differ by noise: on the simulated noisy link a refit
        // 5 % lower held the rate just under the link, the queue emptied, and the search
        // restarted by doubling.)
        // (Not below a fit measured with the queue standing all through its window, but by
        // another such window: one whose queue drained partway delivered less than the link
        // carries.)
        // After a drain held under a fit read from dropping windows, the first window without
        // retransmissions refits even with its queue gone: the drain emptied the queue partway
        // through it, so it delivered a little less than the link carries (93–100 % on the test
        // bed), where the held fit read 10–25 % over it — back at that fit the loop refilled the
        // narrowed link's queue (p95 70–78 ms).
        let clean_after_dropping =
            std::mem::take(&mut self.fit_read_dropping) && obs.retransmits_per_s == 0.0;
        // (Under that fit at all, not by the margin: the held fit is the suspect one; on the test
        // bed clean windows read the link 5–7 % under it, and back at it the loop overshot to a
        // p95 of 119–127 ms.)
        let margin = if clean_after_dropping {
            0.0
        } else {
            FIT_MARGIN
        };
        let refit = match (fit, self.held_fit()) {
            (Some(f), Some(held))
                if after_drain
                    && (clean_after_dropping
                        || (y >= base + no_queue_ms && (standing || !self.fit_full)))
                    && f * (1.0 + margin) < held =>
            {
                self.remember_fit(f);
                Some(f)
            }
            _ => None,
        };
        // A standing queue gone at once, the rate not cut, and still none after a probe past
        // that rate: the path widened, and the rate that fitted it says nothing about the new
        // one. Search again as startup does. (One period without the queue is not enough: on a
        // link whose cross traffic wanders, a queue at the setpoint vanishes now and then, and
        // doubling then fills the buffer.)
        //
        // Only where that threshold is clear of the agent's histogram buckets: a p95 one bucket
        // over the floor is noise, not a vanished queue. On the test bed a 15 ms setpoint over a
        // 10.8 ms floor put the threshold one 1 ms bucket up; two readings of 11.8 ms after a
        // 6 % damping, at a held rate, restarted the search by doubling (47.9 req/s, 238 ms).
        let empty = self.floor_ms.is_some_and(|f| {
            let threshold = self.g.probe_fraction * (sp - f);
            y < f + threshold && threshold >= RESOLVED_BUCKETS * bucket_width_ms(f)
        });
        let widening = std::mem::take(&mut self.widening);
        let empties_at_fit = std::mem::take(&mut self.empties_at_fit);
        if !self.startup && self.g.startup_growth > 0.0 && self.drain == 0 && empty {
            let held = (0.98..=1.02).contains(&(self.last_u / self.prev_u.max(1e-9)));
            // At (or past) the rate measured to fill the narrowed link — held there, not just
            // drained under it — and no queue at all.
            let at_fit = !after_drain && self.held_fit().is_some_and(|h| self.last_u >= 0.95 * h);
            let not_cut = self.last_u >= 0.98 * self.prev_u;
            if not_cut && (widening || (at_fit && empties_at_fit >= 2)) {
                self.startup = true;
                self.startup_backend_burst = false;
                self.remember_overload(None);
                // A queue that vanished at a held rate is the path widening; a fit with no queue
                // may also be a fit read low (on the test bed the window after the step delivered
                // 3.3–3.9 Mbit/s of a 4.7 Mbit/s link while TCP recovered from the drops, and
                // doubling from there filled the 300 ms buffer): search from a quarter up, the
                // step doubling each period.
                self.restart_step = if widening {
                    0.0
                } else {
                    RESTART_STEP.min(self.g.startup_growth)
                };
            } else {
                // Not a queue the last period's cut emptied (the proportional term or the
                // anomaly damping): `held` compares two periods that may both have been cut alike.
                // In the full run at 3ba9d19 two periods damped 10 % and 9 % emptied a standing
                // queue, the next window read as the path widened, and startup doubled to 47.7
                // req/s (238 ms).
                self.widening = (held || tracked)
                    && !after_cut
                    && self.was_standing
                    && self
                        .prev_y_before
                        .is_some_and(|p| p >= (1.0 - BAND) * sp && p <= overloaded);
                // A rate that filled the link building no queue for three windows: it widened.
                // (Three, not two: on a link whose cross traffic wanders, two empty windows at the
                // fit happen, and doubling then fills the buffer.)
                if at_fit {
                    self.empties_at_fit = empties_at_fit + 1;
                }
            }
        }
        // A standing queue that held steady (a queue already draining does not count).
        self.was_standing = standing && d.abs() < STEADY_DRIFT && !after_drain;
        self.floor_ms = Some(self.floor_ms.map_or(y, |f| f.min(y)));
        let in_startup = self.startup;
        // Seconds of queue above the setpoint to drain within one period.
        let excess = ((y - sp) / 1000.0 / dt).clamp(0.0, MAX_DRAIN);
        if in_startup && self.restart_step > 0.0 && y >= (1.0 - BAND) * sp && y < sp {
            // A search restarted from a held fit that reaches the band has found the rate: the
            // loop takes over here. (The next step, half again, overshot it: on the test bed a
            // p95 of 47 ms at 6.2 req/s, then 139 ms at 9.3.)
            self.startup = false;
            self.probe_step = 0.0;
            terms = 0.0;
            reason = format!(
                "p95 {y:.1} ms within the band under setpoint {sp:.0} ms: search over at this rate"
            );
        } else if in_startup && !obs.backend_queued && (y < sp || bursts) {
            // Slow start: below the setpoint, double (the slew limit does not apply yet). At the
            // maximum the path has room for the whole group, and the loop takes over. A p95 past
            // the setpoint over a median at its floor (bursts — the first connections' slow
            // start, a 100 KB upload queued behind itself — not a queue) does not end it: on the
            // test bed the startups of 25 ms and 15 ms setpoints ended on their first windows
            // (p95 25.6 and 23.6 ms, median 10.8 and 9.7 ms, 0.5 Mbit/s delivered), and the loop
            // crept up 5 % a period from a quarter of the link for 15 s.
            let step = if self.restart_step > 0.0 {
                let s = self.restart_step;
                self.restart_step = (s * 2.0).min(self.g.startup_growth);
                s
            } else {
                self.g.startup_growth
            };
            self.last_growth_ln = (1.0 + step).ln();
            self.stepped_back = false;
            self.integral = (self.integral + self.last_growth_ln).min(0.0);
            self.startup = self.integral < 0.0;
            terms = 0.0;
            reason = if step < self.g.startup_growth {
                format!(
                    "p95 {y:.1} ms below setpoint {sp:.0} ms: searching again, ×{:.2}",
                    1.0 + step
                )
            } else if y >= sp {
                format!(
                    "p95 {y:.1} ms over a median at its floor (bursts, no queue): startup, doubling"
                )
            } else {
                format!("p95 {y:.1} ms below setpoint {sp:.0} ms: startup, doubling")
            };
        } else if in_startup && y < sp && !self.startup_backend_burst {
            // The backend queued before the path did — once: back to the rate before, still in
            // startup. A group's first requests reach the backend together, and a window of them
            // queues where the rate does not: on the network-bound test bed (a backend with room
            // for 24 req/s) the second window's queue ended startup at 10 req/s, and the loop
            // crept up 5 % a period under a remembered 14 req/s for 12 s. The same queue again
            // (the backend still draining it, or the next doubling's) ends startup below.
            self.startup_backend_burst = true;
            self.stepped_back = true;
            self.integral -= growth;
            self.probe_step = 0.0;
            terms = 0.0;
            reason = format!(
                "p95 {y:.1} ms below setpoint {sp:.0} ms, but the backend queued: startup steps back to the last rate"
            );
        } else if in_startup && y < sp {
            // The backend queued before the path did: this rate overloads the node's model server
            // (a link with room never shows it in the RTT). Back to the rate before; each doubling
            // past it would have added its requests to the backend's queue, which drains only as
            // fast as the backend serves — on the compute-bound test bed, startup's last two
            // doublings queued interactive users behind 2 s of batch requests.
            // (Right after the step back the rate is the one before already: it stays.)
            // The rate is not remembered as the one that overloads the *path*: the backend's side
            // is the concurrency limit's (`control::compute`), and under that memory the loop crept
            // past it 5 % a period once the backend kept up — on the compute-bound test bed the
            // batch rate held 10.6–12.2 req/s in every full run where the unpaced arm served 13–21
            // (15.4–16.1 without it, the interactive TTFT p99 unchanged).
            self.startup = false;
            let back = if std::mem::take(&mut self.stepped_back) {
                0.0
            } else {
                growth
            };
            self.remember_overload(None);
            self.integral -= back;
            self.probe_step = 0.0;
            terms = 0.0;
            reason = format!(
                "p95 {y:.1} ms below setpoint {sp:.0} ms, but the backend queued: startup over, back to the last rate"
            );
        } else if in_startup {
            // The first queue: this rate overloads the path and the one before it (a factor
            // `1 + startup_growth` lower) did not. Fall back to that one; the capacity lies
            // between the two, so the loop remembers their geometric mean as the rate that
            // overloads and creeps rather than probes near it.
            self.startup = false;
            self.remember_overload(Some((self.integral - growth / 2.0).exp()));
            self.integral -= growth;
            self.probe_step = 0.0;
            self.drain = STARTUP_DRAIN_PERIODS;
            self.drain_sized = false;
            terms = 0.0;
            reason = format!(
                "p95 {y:.1} ms reached setpoint {sp:.0} ms: startup over, back to the last rate without a queue"
            );
            // What the link delivered at the two rates places its capacity: the overloaded window
            // delivered all the link could, the one before what was sent. Scale the last rate
            // without a queue up to 90 % of that, but not past the hold under the remembered
            // overload rate (delivery need not scale with the group's rate: a reserved share of
            // small requests adds rate, not bytes).
            if let (Some(over), Some(before)) = (obs.delivered_mbit_s, self.prev_delivered)
                && before > 0.0
                && over > before
            {
                let most = self.g.hold_fraction.max(0.5) * (growth / 2.0).exp();
                let scale = (0.9 * over / before).clamp(1.0, most.max(1.0));
                if scale > 1.0 {
                    self.integral += scale.ln();
                    reason = format!(
                        "p95 {y:.1} ms reached setpoint {sp:.0} ms: startup over; the link delivered {over:.1} Mbit/s, \
                         {before:.1} at the last rate without a queue: back to ×{scale:.2} that rate"
                    );
                }
            }
            // What the link delivers now, times the rate per Mbit/s, is the rate that fits it:
            // where that is known and under the rate that overloaded, go to it rather than to
            // the rate before the doubling, less the share that drains the doubling's queue
            // within a period (BBR's drain).
            if let Some(f) = fit.filter(|&f| f < self.last_u) {
                self.integral = f.max(1e-6).ln();
                terms = (1.0 - excess).ln();
                self.drain = 1;
                self.drain_sized = true;
                sized = true;
                // The rate that overloads is the fit, not the mean of the last two doublings.
                self.remember_fit(f);
                reason = format!(
                    "p95 {y:.1} ms reached setpoint {sp:.0} ms: startup over; the link delivered {:.1} Mbit/s: {:.1} req/s fit it, {:.0} % under that for a period to drain",
                    got.unwrap_or(0.0),
                    f * self.max_rps,
                    excess * 100.0
                );
            }
        } else if let Some(f) = fit.filter(|&f| {
            y > overloaded && standing && d < 0.005 && self.last_u > f * (1.0 + FIT_MARGIN)
        }) {
            // A standing queue past the margin, not draining, at a rate clearly over what the link
            // now carries (it narrowed; also while a drain was meant to be under way: a window
            // that straddled the step delivered more than the link now carries, so the first cut
            // was not deep enough): the rate that fits, less the share that drains the queue's
            // excess within a period, then held at the fit while the window still shows the queue.
            // The PID would trim a few per cent a period, and a full buffer hides how far over
            // the rate is.
            self.integral = f.max(1e-6).ln();
            terms = (1.0 - excess).ln();
            self.probe_step = 0.0;
            self.drain = 1;
            self.drain_sized = true;
            sized = true;
            self.remember_fit(f);
            reason = format!(
                "p95 {y:.1} ms, the link delivering {:.1} Mbit/s: {:.1} req/s fit it; {:.0} % under that for a period to drain",
                got.unwrap_or(0.0),
                f * self.max_rps,
                excess * 100.0,
            );
        } else if self.drain > 0 && y > sp {
            // The queue built before a cut (startup's last doubling, or a link that narrowed)
            // drains at the rate the cut chose: the window still shows it, and cutting further
            // would only empty the link.
            self.drain -= 1;
            terms = 0.0;
            returning = true;
            sized = self.drain_sized;
            self.drained = true;
            reason = format!("p95 {y:.1} ms: draining the queue at the rate chosen for it");
            // With the queue standing all through this window (the median too), after the window
            // the cut answered (a queue past the setpoint), the link was busy through both: what
            // they delivered together is what it carries — or less, where the first window's
            // queue built only partway through it (startup's last doubling), which errs toward
            // the cut's fit. Where that fits clearly more than the fit the cut was sized on, that
            // fit read low — the step's first window, TCP recovering from the drops: on the test bed
            // 3.7 Mbit/s where the next window delivered 4.75, a fit of 4.7 req/s where 6.0
            // fitted; held there with no queue, the search restarted from it overshot to 86 ms.
            // Back to the two windows' fit instead. (Both, not this one alone: under loss the
            // acknowledgements the first window lacked arrive in the second — 3.6 then 5.3 Mbit/s
            // on a 5 Mbit/s link — and the second alone fitted 6.8 req/s, and overshot.)
            let both = self
                .prev_delivered
                .zip(got)
                .map(|(before, now)| (before + now) / 2.0);
            if let (true, Some(mbit), Some(held)) = (standing, both, self.held_fit())
                && let Some(f) = self.fit_at(mbit)
                && f > held * (1.0 + FIT_MARGIN)
            {
                self.remember_fit(f);
                self.fit_full = true;
                self.integral = f.max(1e-6).ln();
                reason = format!(
                    "p95 {y:.1} ms, draining; the link delivered {mbit:.1} Mbit/s over two windows with the queue standing: {:.1} req/s fit it, where the cut took {:.1}: back to it",
                    f * self.max_rps,
                    held * self.max_rps
                );
            }
            // Still dropping (the buffer full for part of the window): every fit so far was read
            // from windows that acknowledged late or straddled the step, and such fits err high
            // — on the test bed 5.4–6.0 Mbit/s read on a link that delivers 4.7, and the loop went
            // back to 6.8–7.4 req/s where 5.85 fitted, refilling the queue for two more windows.
            // Under the fit by its margin for this period; in the next, a window without
            // retransmissions refits the link (`clean_after_dropping`).
            if self.drain_sized && obs.retransmits_per_s > 0.0 {
                terms = (1.0 - FIT_MARGIN).ln();
                self.fit_read_dropping = true;
                reason.push_str(&format!(
                    "; {:.0} retransmits/s: the fit read from dropping windows errs high, {:.0} % under it",
                    obs.retransmits_per_s,
                    FIT_MARGIN * 100.0
                ));
            }
        } else if y < base + no_queue_ms {
            // No standing queue: the RTT says nothing about the headroom left. Probe upward,
            // multiplicatively; each further period without a queue doubles the step, up to
            // the slew limit — but near the rate at which a queue last appeared, creep (the
            // capacity is probably still there); that memory fades 2 % per probing period.
            // Unless the last period cut the rate under the integral's (the proportional term or
            // the anomaly damping against a queue past the setpoint): the queue emptied because
            // of the cut, which the integral's rate did not make — back to that rate without a
            // step past it. (On the test bed an 8 % damping at a p95 of 59 ms emptied the queue,
            // the probe went 5 % past a rate that had held the setpoint for 7 s, and the p95
            // reached 78 ms two windows later: a limit cycle around the link's rate.)
            self.probe_step = if after_cut {
                0.0
            } else if self.probe_step == 0.0 {
                self.g.probe_start
            } else {
                (self.probe_step * 2.0).min(self.g.slew_up)
            };
            if self.congested_u.is_some_and(|c| self.last_u > 1.1 * c) {
                // Well past the remembered overload rate with still no queue: the path has widened
                // since, and the memory only slows the search (BIC-TCP's max probing).
                self.remember_overload(None);
            }
            let step = match self.congested_u {
                Some(c) if !after_cut && self.last_u * (1.0 + self.probe_step) > c * 0.9 => {
                    self.congested_u = Some(c * 1.02);
                    self.g.probe_start.min(self.probe_step)
                }
                _ => self.probe_step,
            };
            self.integral += (1.0 + step).ln() * dt.min(1.0);
            terms = 0.0;
            reason = if after_cut {
                format!(
                    "p95 {y:.1} ms, no queue after a {:.0} % cut: back to the rate before it",
                    (1.0 - self.last_cut_ln.exp()) * 100.0
                )
            } else {
                format!("p95 {y:.1} ms, no queue (base {base:.1} ms): probing up")
            };
        } else if y > self.g.severe * sp && falling < 0.005 {
            // The queue is at or near the buffer and not draining (the p95 falls by less than
            // 5 ms per second): the size of the overload is hidden by the full buffer, so cut
            // geometrically until it drains. (The p95's own fall, right after a drain too: a
            // queue down from the buffer is draining. On the test bed a p95 of 172 ms after 344
            // read as not draining, and the cut by half left the narrowed link idle for five
            // periods.)
            self.probe_step = 0.0;
            self.integral += self.g.severe_cut.ln() + self.g.ki * e * dt;
            terms = self.g.kp * e;
            reason = format!(
                "p95 {y:.1} ms over {:.0}× setpoint and not draining: cut ×{}",
                self.g.severe, self.g.severe_cut
            );
        } else if let Some((f, mean)) = got
            .and_then(|g| self.carried_at(g))
            .zip(obs.mean_rtt_ms)
            .filter(|_| self.g.track_horizon > 0.0 && holdable && !after_drain)
        {
            // A standing queue under the buffer: track the link. The rate the link carries, plus
            // the share of a period that brings the queue to its target over the horizon. The
            // queue is read from the mean (the window's middle, moved on by half the window's
            // slope to its end): the p95 is a ramp's top whether it rose or fell, so a falling
            // queue reads a period late.
            // (At most half the room over the median's floor: the target stays a queue.)
            let floor = self.base50_ms.unwrap_or(base);
            let spread = crate::ewma(
                &mut self.spread_ms,
                (y - mean).clamp(0.0, (sp - floor).max(0.0) / 2.0),
                TRACK_SMOOTHING,
            );
            let slope = (self.last_u / f.max(1e-9) - 1.0) * dt;
            let queue_end = mean / 1000.0 + slope / 2.0;
            let target = (sp - spread) / 1000.0;
            let u = f * (1.0 + (target - queue_end) / self.g.track_horizon).max(1.0 - MAX_DRAIN);
            self.integral = u.max(1e-6).ln();
            self.probe_step = 0.0;
            self.tracked = true;
            terms = 0.0;
            reason = format!(
                "p95 {y:.1} ms, queue standing: the link carries {:.1} req/s; mean {mean:.1} ms to {:.1}: tracking",
                f * self.max_rps,
                sp - spread
            );
        } else {
            if y > overloaded {
                // Rising: this rate overloads the path. Falling: this rate drains it, so the
                // capacity is above it — but not above a rate remembered to overload it.
                // (A rate measured to fit the link stays marked so: this only raises it.)
                self.congested_u = Some(if d < 0.0 {
                    self.last_u.max(self.prev_u)
                } else {
                    self.congested_u
                        .map_or(self.last_u / 0.9, |c| c.max(self.last_u / 0.9))
                });
            }
            self.probe_step = 0.0;
            // Below the setpoint the integral grows on the error relative to the setpoint (the
            // RTT says little about headroom there, so seconds of error would crawl); above it,
            // on seconds of queueing, which a queue's growth makes large quickly. Not after a
            // cut: the room it shows is the cut's (on the test bed at a 20 ms setpoint, a 7 %
            // damping left a 13.8 ms p95, the integral rose 9 % on it, the rate went 18 % up in
            // one period as the damping lapsed, and the p95 reached 94 ms).
            let rise = if e > 0.0 && !standing && !after_cut {
                self.g.ki_up * (e * 1000.0 / sp)
            } else {
                self.g.ki * e
            };
            self.integral += rise * dt;
            terms = self.g.kp * e + self.g.kd * d + self.g.kf * ff;
            reason = format!(
                "p95 {y:.1} ms vs setpoint {sp:.0} ms: error {:+.1} ms",
                e * 1000.0
            );
        }
        if !self.startup {
            self.restart_step = 0.0;
            self.last_growth_ln = 0.0;
        }
        if y <= sp {
            // Startup's queue has drained: a later queue is this loop's to cut.
            self.drain = 0;
        }
        self.integral = self.integral.clamp(self.min_ln, 0.0);
        self.last_terms = terms;
        let mut u = (self.integral + terms).exp();
        if terms != 0.0 && ff < -0.005 {
            reason.push_str(&format!(
                "; forecast {:.1} ms: cutting early",
                obs.predicted_p95_ms.unwrap_or(y)
            ));
        }
        // The score is smoothed first: a score that jumps between periods would otherwise move
        // the rate by the damping's whole range from one period to the next.
        let a = if self.g.anomaly_smoothing > 0.0 {
            self.g.anomaly_smoothing.min(1.0)
        } else {
            1.0
        };
        let anomaly = crate::ewma(&mut self.anomaly_ewma, obs.anomaly, a);
        // The score damps only while the delay says the path is congested (p95 at or past the
        // setpoint, or a forecast past it): a full-but-fast link under heavy load looks unusual to
        // the forest, yet cutting it costs throughput and buys no latency (on the test bed the
        // score sits near 0.75 under any heavy load, and damping every p95 past 40 ms cut the rate
        // by 14 % each time bursts reached that bucket), and random loss without a queue is not
        // relieved by sending less.
        // It ramps in from nothing at the setpoint to all of it at the overload margin: a damping
        // that switched fully on at the setpoint would be a relay around it — on the test bed a
        // 16 % cut at p95 51 ms and none at 47 ms swung the rate between 19 and 26 req/s.
        let worst = obs.predicted_p95_ms.map_or(y, |p| p.max(y));
        let past = ((worst - sp) / (overloaded - sp).max(1e-9)).clamp(0.0, 1.0);
        // Nor while a drain chosen for the queue's excess is under way: the cut already removes
        // that queue within the period, and a further 10–15 % emptied it (on the test bed the
        // window after the step's drain read 11–16 ms, the link idle, and the loop went back to
        // a fit that one window under loss had read high, and refilled the buffer); the window
        // after a drain that leaves the queue near the setpoint is also the one that shows a
        // fit read high.
        // On a link narrowed under its ceiling, held at the rate measured to fit it since, never
        // more than drains the queue down to the band's lower edge within the period (seconds of
        // queue above it per second): the fit is fresh evidence of the rate, and a cut that
        // empties the queue leaves the band. On the test bed a 13 % damping at a p95 of 59 ms —
        // 130 ms of queue given up in a period where 19 ms stood over the band's edge — emptied
        // the narrowed link's queue to 21 ms. (On the full 20 Mbit/s link the same cap raised
        // the probe's p99 by about 10 ms: there the damping cuts rates that the probing took
        // past the link, and is left whole.)
        // The window delivered clearly less than the link's ceiling: a link with room, or one
        // that narrowed since the ceiling was measured (then the loop holds a fit measured since).
        let short_of_ceiling = obs
            .delivered_mbit_s
            .zip(self.ceiling_mbit)
            .is_some_and(|(d, c)| d < self.g.room_share() * c);
        let narrowed = self.fit_bound && short_of_ceiling;
        let above_band = if narrowed {
            ((worst - (1.0 - BAND) * sp) / 1000.0 / dt).max(0.0)
        } else {
            f64::INFINITY
        };
        let damp = if sized {
            0.0
        } else {
            (self.g.anomaly_damping * ((anomaly - 0.5) * 2.0).clamp(0.0, 1.0) * past)
                .min(above_band)
        };
        self.last_damp_ln = (1.0 - damp).max(1e-6).ln();
        self.last_cut_ln = if sized {
            0.0
        } else {
            (terms + self.last_damp_ln).min(0.0)
        };
        if damp > 0.0 {
            u *= 1.0 - damp;
            reason.push_str(&format!(
                "; anomaly {anomaly:.2} (smoothed): damped {:.0} %",
                damp * 100.0
            ));
        }
        // Near the rate that last built a queue, go slowly: hold under it for a while, then creep.
        if y > overloaded {
            self.creep_step = 0.0;
        }
        self.hold = if y > overloaded {
            self.g.hold_periods
        } else {
            self.hold.saturating_sub(1)
        };
        // A link that delivers clearly less than its ceiling has room, whatever rate last built a
        // queue: the delivery is the newer evidence (after startup the group's rate is no measure
        // of its bytes — a reserved share of small requests adds rate, not bytes).
        // Not, though, under a rate measured to fit the link since it narrowed: the ceiling is
        // the most the link ever delivered, which a narrowed link no longer reaches (lowering
        // the ceiling instead held the rate where bursts hide the room after the link widened).
        let room = !standing && !self.fit_bound && self.g.link_full > 0.0 && short_of_ceiling;
        // (Not under the tracking law: it holds the rate the link carries, measured, where the hold
        // stands in for that measure.)
        if !in_startup
            && y <= sp
            && !room
            && !self.tracked
            && self.g.hold_fraction > 0.0
            && let Some(c) = self.congested_u
        {
            let under = self.g.hold_fraction * c;
            let step = if self.creep_step > 0.0 {
                self.creep_step
            } else {
                self.g.creep
            };
            // Under the band at the rate measured to fit a narrowed link, the queue the setpoint
            // asks for is missing and the fit alone does not build it (at the fit the queue
            // neither grows nor drains): over the fit by the missing queue's share of the period,
            // as a drain is under it by the excess (on the test bed the p95 sat at 26–32 ms for
            // 3 periods at the held fit of a narrowed link, and reached the band in the 7th).
            let under = if narrowed && y < (1.0 - BAND) * sp {
                under * (1.0 + ((sp - y) / 1000.0 / dt).min(FILL_MAX))
            } else {
                under
            };
            let cap = if self.hold > 0 {
                under
            } else {
                (self.last_u * (1.0 + step).powf(dt.min(1.0))).max(under)
            };
            if self.hold == 0 && u > cap {
                // Well under the setpoint the step doubles, leaving a stale memory behind — but
                // not a rate measured to fit the link (it holds until the link shows it widened).
                self.creep_step = if y < sp * 0.9 && !self.fit_bound {
                    (step * 2.0).min(self.g.slew_up.max(self.g.creep))
                } else {
                    step
                };
            }
            if u > cap {
                u = cap.max(self.last_u.min(u));
                reason.push_str(if self.hold > 0 {
                    "; held under the rate that last built a queue"
                } else {
                    "; creeping past the rate that last built a queue"
                });
            }
        }
        // The link's ceiling: what it delivered in a window that shows it saturated — the p95
        // past the setpoint by the margin, or a rate that rose by `CEILING_RISE` or more while
        // what was delivered hardly rose with it (a third of that or less). A window that
        // delivers clearly more than the ceiling shows the path widened: the ceiling is forgotten.
        // With some queue in the p95 but no standing one (bursts), under the setpoint, a window
        // that delivers about the ceiling shows the link full while the RTT cannot: hold the rate,
        // and every `FULL_PROBE_PERIODS` periods let it try a small step past.
        let falling = d > 0.0;
        if let Some(got) = obs.delivered_mbit_s.filter(|g| g.is_finite() && *g > 0.0) {
            let rose = self.last_u / self.prev_u.max(1e-9) - 1.0;
            // A saturated window shows what the link can deliver — but not one whose queue is
            // draining, or that followed a cut (it delivered what the cut rate sent). The ceiling
            // is the most such windows showed: lowering it on a narrowed link would hold the rate
            // there after the link widens again, where the delivery cannot show the room.
            let uncut = self.last_u >= 0.95 * self.prev_u;
            let saturated = (y > overloaded && !falling && uncut)
                || self
                    .prev_delivered
                    .is_some_and(|p| rose >= CEILING_RISE && got / p.max(1e-9) - 1.0 < rose / 3.0);
            if saturated {
                self.ceiling_mbit = Some(self.ceiling_mbit.map_or(got, |c| c.max(got)));
            } else if self
                .ceiling_mbit
                .is_some_and(|c| got > c * (2.0 - self.g.link_full))
            {
                self.ceiling_mbit = None;
            }
            self.prev_delivered = Some(got);
            let some_queue = y >= base + no_queue_ms;
            // Once full, a window stays full down to the threshold under which the link has room:
            // a link delivering 95 % one window and 94 % the next has not emptied.
            let share = if self.was_full {
                self.g.room_share()
            } else {
                self.g.link_full
            };
            let full = self.g.link_full > 0.0
                && self.ceiling_mbit.is_some_and(|c| got >= share * c)
                && !in_startup
                && !standing
                && some_queue
                && y < sp;
            if full && u > self.last_u {
                self.full_held += 1;
                if self.full_held > FULL_PROBE_PERIODS {
                    self.full_held = 0;
                    u = u.min(self.last_u * (1.0 + FULL_PROBE_STEP));
                    reason.push_str(&format!(
                        "; link full ({got:.1} Mbit/s delivered): probing {:.0} % past it",
                        FULL_PROBE_STEP * 100.0
                    ));
                } else {
                    u = self.last_u;
                    reason.push_str(&format!(
                        "; link full ({got:.1} Mbit/s delivered, ceiling {:.1}): holding",
                        self.ceiling_mbit.unwrap_or(got)
                    ));
                }
            } else if !full {
                self.full_held = 0;
            }
            self.was_full = full;
        }
        if let Some(f) = refit
            && u > f
        {
            u = f;
            reason.push_str(&format!(
                "; after the drain the link fits {:.1} req/s: held there",
                f * l.max_rps
            ));
        }
        if obs.backend_queued && !in_startup && !returning && u > self.last_u {
            // The backend cannot keep up: a higher rate would only wait in its queue (or, under
            // its concurrency limit, wind this loop up against a cap the RTT never shows).
            // Not the way back from a period under the link to drain its queue: the uploads the
            // full buffer held back reach the backend together, and holding the drain's rate
            // left the loop 27 % under a narrowed link on the test bed, climbing 5 % a period.
            u = self.last_u;
            reason.push_str("; the backend queued: holding");
        }
        let ceiling = self.last_u * (1.0 + self.g.slew_up).powf(dt.min(1.0));
        if u > ceiling && !in_startup && !returning {
            u = ceiling;
            reason.push_str("; slew-limited");
        }
        (u * l.max_rps, reason)
    }

    fn applied(&mut self, rate_rps: f64) {
        // Tracking anti-windup: hold the integrator at what was applied, minus the transient
        // terms, so a clamp or the slew limit never lets it run away.
        let u = (rate_rps / self.max_rps).max(1e-6);
        self.prev_u = self.last_u;
        self.last_u = u;
        // What this controller asked for, damping included: only a cut by someone else (the
        // slew limit, the governor's bounds, the share) is tracked back into the integrator.
        let computed = self.integral + self.last_terms + self.last_damp_ln;
        if u.ln() < computed - 1e-9 {
            self.integral = (u.ln() - self.last_terms - self.last_damp_ln).clamp(self.min_ln, 0.0);
        }
    }
}
