//! The backend's side of the limit: how many requests a node may have in flight before they queue
//! inside the model server.
//!
//! The network controllers see the path (RTT); they cannot see a backend whose running slots are
//! full, where requests wait in its queue while the link is idle. The agent measures that wait in
//! the kernel with `--span` on the backend's markers: `queue` (request accepted → scheduled) and
//! `service` (scheduled → finished). From them, each window:
//!
//! - *overloaded*: the queue's p95 exceeds [`QUEUE_OBJECTIVE_MS`] (with no limit yet, in
//!   [`CONFIRM_WINDOWS`] windows in a row: one is a burst) — the concurrency limit drops to
//!   the number of requests the backend was actually serving (Little's law over the `service`
//!   spans: busy slot-seconds per second, smoothed over windows) or to the limit less the requests
//!   that waited (Little's law over the `queue` spans), whichever is higher, and by half a request
//!   at least, so requests stop piling up in the backend and wait in the pacer instead, where
//!   classes are served in order;
//! - *calm* (p95 within the objective): after [`PROBE_PERIODS`] calm windows the limit grows by one,
//!   to find room the backend gained — after every window while the queue's p95 stays under
//!   [`ROOM_QUEUE_MS`] and no probe has failed since the last calm one. A probe that brings the queue back doubles the wait before
//!   the next (up to [`MAX_PROBE_PERIODS`]): a backend whose sequences finish in step makes a request
//!   one over its slots wait for a whole generation, and the interactive users pay for every probe;
//!   a probe that stays calm resets the wait;
//! - *idle*: calm for [`LAPSE_PERIODS`] windows while the backend serves fewer than half the limit —
//!   the limit is not what holds the load back (the link is, or demand), so it lapses until the
//!   backend queues again;
//! - *no requests scheduled*: nothing is learnt; the limit holds.
//!
//! Until a node's backend queues beyond the objective there is no limit, so a node without the
//! markers (vLLM, or an agent run without `--span`) is paced by the network alone.

use serde::{Deserialize, Serialize};
use tokenflow_schema::TelemetryWindow;

/// Queueing in the backend above which its concurrency is cut, ms. One waiting request costs about
/// one decode slot's turnover (≈ 100 ms for the demo's backend), so this asks for "no queue".
pub const QUEUE_OBJECTIVE_MS: f64 = 100.0;
/// Calm windows before a probe one request above the limit …
pub const PROBE_PERIODS: u32 = 3;
/// … doubled after each probe that brought the queue back, up to this.
pub const MAX_PROBE_PERIODS: u32 = 24;
/// Windows in a row over the objective before a first limit is set.
pub const CONFIRM_WINDOWS: u32 = 2;
/// A queue p95 under this, ms, shows room: the limit probes every window (see `update`).
pub const ROOM_QUEUE_MS: f64 = QUEUE_OBJECTIVE_MS / 4.0;
/// Calm windows in a row with the backend under half the limit before the limit lapses.
pub const LAPSE_PERIODS: u32 = 5;
/// Weight of the newest window in the smoothed busy-slot count: one window sees only the
/// requests that ended in it, and generations that finish in step make that lumpy.
const BUSY_ALPHA: f64 = 0.3;
/// Span labels the limit reads.
pub const QUEUE_SPAN: &str = "queue";
pub const SERVICE_SPAN: &str = "service";

/// What one window says about the backend.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct ServerLoad {
    /// p95 of the time requests scheduled in the window waited in the backend's queue, ms.
    pub queue_p95_ms: f64,
    /// Mean number of requests the backend was serving (busy slots), when `service` spans ended
    /// in the window.
    pub busy: Option<f64>,
    /// Mean number of requests waiting in its queue (Little's law over the `queue` spans).
    pub waiting: f64,
}

impl ServerLoad {
    /// `None` when no request was scheduled in the window (or the agent has no `queue` span).
    pub fn from_window(w: &TelemetryWindow) -> Option<Self> {
        let secs = (w.end_unix_ms.saturating_sub(w.start_unix_ms) as f64 / 1000.0).max(1e-3);
        let spans = |label: &'static str| {
            w.uprobes
                .iter()
                .filter(move |p| p.label == label && p.latency.samples > 0)
        };
        let queue_p95_ms = spans(QUEUE_SPAN)
            .map(|p| p.latency.p95_us as f64 / 1000.0)
            .reduce(f64::max)?;
        let waiting = spans(QUEUE_SPAN)
            .map(|p| p.latency.mean_us as f64 * p.latency.samples as f64)
            .sum::<f64>()
            / 1e6
            / secs;
        let busy_us: f64 = spans(SERVICE_SPAN)
            .map(|p| p.latency.mean_us as f64 * p.latency.samples as f64)
            .sum();
        Some(Self {
            queue_p95_ms,
            busy: (busy_us > 0.0).then(|| busy_us / 1e6 / secs),
            waiting,
        })
    }
}

/// The node's concurrency limit for its backend, as a state machine (serialisable with the node).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct ComputeLimit {
    /// `None` while the backend has not queued (or the limit lapsed).
    limit: Option<f64>,
    /// Calm windows since the last cut or probe.
    calm: u32,
    /// Calm windows wanted before the next probe (0: [`PROBE_PERIODS`]).
    probe_every: u32,
    /// The last change was a probe whose outcome is not known yet.
    probing: bool,
    /// Smoothed busy slots (`None` before the first `service` span).
    busy: Option<f64>,
    /// Calm windows in a row with the backend under half the limit.
    idle: u32,
    /// The last window's reading, for the hint's reason.
    last_queue_ms: Option<f64>,
    /// Windows in a row over the objective while there is no limit (reset when a limit lapses).
    #[serde(default)]
    over: u32,
}

impl ComputeLimit {
    /// The limit after this window (`None`: no limit), given the group's maximum concurrency.
    pub fn update(&mut self, load: Option<ServerLoad>, max: f64) -> Option<f64> {
        let max = max.max(1.0);
        let Some(load) = load else {
            return self.limit.map(|l| l.min(max));
        };
        self.last_queue_ms = Some(load.queue_p95_ms);
        if let Some(b) = load.busy {
            crate::ewma(&mut self.busy, b, BUSY_ALPHA);
        }
        let queued = load.queue_p95_ms > QUEUE_OBJECTIVE_MS;
        if self.limit.is_none() {
            self.over = if queued { self.over + 1 } else { 0 };
            if queued && self.over < CONFIRM_WINDOWS {
                // One window of queue with no limit yet is a burst (a group's start doubling its
                // rate), not a backend that cannot keep up: cutting to the slots it was serving
                // then would hold a link-bound load to a few requests in flight.
                return None;
            }
        }
        if queued {
            self.idle = 0;
            let every = self.probe_every.max(PROBE_PERIODS);
            let l = self.limit.unwrap_or(max).min(max);
            if self.probing {
                self.probe_every = (every * 2).min(MAX_PROBE_PERIODS);
            }
            self.probing = false;
            self.calm = 0;
            // While it queues the backend is saturated: it serves all it can, and what waits is
            // the excess. Two estimates of what it can take — what it served (a low reading is a
            // lumpy window, so the higher of this window's count and the smoothed one) and the
            // limit less what waited — the higher of the two, half a request under the limit at
            // least.
            let served = match (load.busy, self.busy) {
                (Some(b), Some(e)) => b.max(e),
                (b, e) => b.or(e).unwrap_or(l * 0.75),
            };
            // (The limit less what waited says nothing while there was no limit to fill.)
            let fits = if self.limit.is_some() {
                served.max(l - load.waiting)
            } else {
                served
            };
            self.limit = Some(fits.min(l - 0.5).clamp(1.0, max));
            return self.limit;
        }
        let l = self.limit?.min(max);
        if self.busy.is_some_and(|b| b < 0.5 * l) {
            self.idle += 1;
        } else {
            self.idle = 0;
        }
        if self.idle >= LAPSE_PERIODS {
            // The backend has had room to spare at this limit for a while: something else holds
            // the load back (the link, or demand).
            *self = Self {
                last_queue_ms: self.last_queue_ms,
                busy: self.busy,
                ..Self::default()
            };
            return None;
        }
        self.calm += 1;
        if self.probing && self.calm >= PROBE_PERIODS {
            // The last probe stayed calm: probe at the base pace again.
            self.probing = false;
            self.probe_every = PROBE_PERIODS;
        }
        let mut next = l;
        // A backend that hardly queues at all has room: while no probe has failed since the last
        // calm one, probe every window — a limit cut by a burst (a group's start, say) is back
        // within a few windows instead of earning a request every few.
        let every = if load.queue_p95_ms < ROOM_QUEUE_MS && self.probe_every <= PROBE_PERIODS {
            1
        } else {
            self.probe_every.max(PROBE_PERIODS)
        };
        if self.calm >= every {
            self.calm = 0;
            self.probing = true;
            next = l + 1.0;
        }
        self.limit = Some(next.clamp(1.0, max));
        self.limit
    }

    /// Why the limit is what it is, for the hint's reason.
    pub fn describe(&self) -> Option<String> {
        let (l, q) = (self.limit?, self.last_queue_ms?);
        Some(format!(
            "backend queue p95 {q:.0} ms vs {QUEUE_OBJECTIVE_MS:.0} ms: {l:.1} in flight"
        ))
    }
}

/// Splits a group's concurrency among its clients like rates: interactive clients first, at least
/// one each, none above its own maximum.
pub fn split(limit: f64, members: &[(tokenflow_schema::ClientClass, f64, u32)]) -> Vec<u32> {
    let m: Vec<super::share::Member> = members
        .iter()
        .map(|&(class, weight, max)| super::share::Member {
            class,
            weight,
            min_rps: 1.0,
            max_rps: f64::from(max.max(1)),
        })
        .collect();
    super::share::share(limit, &m)
        .into_iter()
        // Rounded: flooring every share would leave up to a request per client unused.
        .map(|c| c.round().max(1.0) as u32)
        .collect()
}

#[cfg(test)]
mod tests {
    use tokenflow_schema::{ClientClass, LatencySummary, ProbeLatency};

    use super::*;

    fn load(q: f64, busy: Option<f64>) -> Option<ServerLoad> {
        Some(ServerLoad {
            queue_p95_ms: q,
            busy,
            waiting: 0.0,
        })
    }

    #[test]
    fn off_until_the_backend_queues_and_holds_without_requests() {
        let mut c = ComputeLimit::default();
        assert_eq!(c.update(None, 26.0), None);
        assert_eq!(c.update(load(5.0, Some(3.0)), 26.0), None, "calm: no limit");
        assert_eq!(
            c.update(load(1800.0, Some(8.0)), 26.0),
            None,
            "one window: a burst"
        );
        assert_eq!(c.update(load(5.0, Some(3.0)), 26.0), None, "calm again");
        assert_eq!(
            c.update(load(1800.0, Some(8.0)), 26.0),
            None,
            "a burst again"
        );
        assert_eq!(
            c.update(load(1800.0, Some(8.0)), 26.0),
            Some(8.0),
            "two in a row"
        );
        assert_eq!(c.update(None, 26.0), Some(8.0), "no requests: holds");
    }

    #[test]
    fn a_queue_cuts_to_what_the_backend_serves_and_calm_probes_back_up() {
        let mut c = ComputeLimit::default();
        // 26 allowed, the backend runs 8 and queues the rest.
        assert_eq!(
            c.update(load(1800.0, Some(8.0)), 26.0),
            None,
            "a first window over the objective is a burst"
        );
        assert_eq!(c.update(load(1800.0, Some(8.0)), 26.0), Some(8.0));
        // A small queue still cuts, by half a request at least.
        assert_eq!(c.update(load(150.0, Some(8.0)), 26.0), Some(7.5));
        // Calm, with some queue: one more after PROBE_PERIODS windows.
        for _ in 1..PROBE_PERIODS {
            assert_eq!(c.update(load(40.0, Some(7.0)), 26.0), Some(7.5));
        }
        assert_eq!(c.update(load(40.0, Some(7.0)), 26.0), Some(8.5));
        // A probe that queued one request for the whole window: back under it.
        let one_waiting = Some(ServerLoad {
            queue_p95_ms: 900.0,
            busy: Some(7.0),
            waiting: 1.0,
        });
        assert_eq!(c.update(one_waiting, 26.0), Some(7.5));
        assert!(c.describe().unwrap().contains("900 ms"));
        // Never below one, never above the maximum.
        for _ in 0..50 {
            c.update(load(5000.0, Some(0.1)), 26.0);
        }
        assert_eq!(c.update(None, 26.0), Some(1.0));
        for _ in 0..500 {
            c.update(load(1.0, Some(10.0)), 10.0);
        }
        assert_eq!(c.update(None, 10.0), Some(10.0));
    }

    #[test]
    fn a_probe_that_brings_the_queue_back_waits_twice_as_long_for_the_next() {
        let mut c = ComputeLimit::default();
        c.update(load(900.0, Some(8.0)), 26.0);
        c.update(load(900.0, Some(8.0)), 26.0);
        // Calm windows until the limit moves; returns how many it took.
        let until_probe = |c: &mut ComputeLimit| {
            let before = c.update(None, 26.0).unwrap();
            (1..=100)
                .find(|_| c.update(load(40.0, Some(8.0)), 26.0).unwrap() > before)
                .unwrap()
        };
        assert_eq!(until_probe(&mut c), PROBE_PERIODS);
        c.update(load(400.0, Some(8.0)), 26.0); // the probe queued
        assert_eq!(until_probe(&mut c), 2 * PROBE_PERIODS);
        c.update(load(400.0, Some(8.0)), 26.0); // and again
        assert_eq!(until_probe(&mut c), 4 * PROBE_PERIODS);
        // This probe stays calm: the next comes at the base pace.
        assert_eq!(until_probe(&mut c), PROBE_PERIODS);
    }

    #[test]
    fn with_hardly_any_queue_the_limit_climbs_every_window_until_a_probe_fails() {
        let mut c = ComputeLimit::default();
        // A burst queued the backend: cut to the 3 it served.
        assert_eq!(
            c.update(load(300.0, Some(3.0)), 26.0),
            None,
            "a first window over the objective is a burst"
        );
        assert_eq!(c.update(load(300.0, Some(3.0)), 26.0), Some(3.0));
        // Then no queue at all, the backend busy up to the limit: one more every window.
        for want in [4.0, 5.0, 6.0, 7.0] {
            assert_eq!(c.update(load(5.0, Some(want - 1.0)), 26.0), Some(want));
        }
        // The probe to 7 queued: back under it, and from now on the slow pace even without a
        // queue, until a probe stays calm.
        assert_eq!(c.update(load(400.0, Some(6.0)), 26.0), Some(6.5));
        let mut windows = 0;
        while c.update(load(5.0, Some(6.0)), 26.0) == Some(6.5) {
            windows += 1;
        }
        assert_eq!(windows, 2 * PROBE_PERIODS - 1);
    }

    #[test]
    fn the_limit_lapses_when_the_backend_serves_far_below_it() {
        let mut c = ComputeLimit::default();
        assert_eq!(
            c.update(load(900.0, Some(8.0)), 34.0),
            None,
            "a first window over the objective is a burst"
        );
        assert_eq!(c.update(load(900.0, Some(8.0)), 34.0), Some(8.0));
        // The load moved to a link-bound phase: one request at a time in the backend. The
        // smoothed count falls under half the limit within a few windows, then it must stay there.
        let windows = (1..=20)
            .find(|_| c.update(load(0.0, Some(1.0)), 34.0).is_none())
            .unwrap();
        assert!(
            windows > LAPSE_PERIODS && windows <= LAPSE_PERIODS + 3,
            "{windows}"
        );
        assert_eq!(c.describe(), None);
        // A new queue, two windows of it, sets a new limit.
        assert_eq!(c.update(load(500.0, Some(12.0)), 34.0), None);
        assert_eq!(c.update(load(500.0, Some(12.0)), 34.0), Some(12.0));
    }

    #[test]
    fn reads_queue_and_service_spans_of_a_window() {
        let span = |label: &str, samples: u64, p95_us: u64, mean_us: u64| ProbeLatency {
            label: label.into(),
            target: "bin:a..b".into(),
            latency: LatencySummary {
                samples,
                p95_us,
                mean_us,
                ..Default::default()
            },
        };
        // A one-second window.
        let mut w = crate::simulate::node_window("n", 1, 2_000, 1_000, 10_000);
        assert_eq!(ServerLoad::from_window(&w), None, "no spans");
        w.uprobes = vec![
            span(QUEUE_SPAN, 8, 240_000, 100_000),
            span(SERVICE_SPAN, 8, 900_000, 1_000_000),
            span("prefill", 8, 15_000, 12_000),
        ];
        assert_eq!(
            ServerLoad::from_window(&w),
            Some(ServerLoad {
                queue_p95_ms: 240.0,
                busy: Some(8.0),
                waiting: 0.8,
            })
        );
    }

    #[test]
    fn split_serves_interactive_first() {
        let ms = [
            (ClientClass::Batch, 1.0, 24),
            (ClientClass::Interactive, 1.0, 2),
        ];
        assert_eq!(split(8.0, &ms), vec![6, 2]);
        assert_eq!(split(7.5, &ms), vec![6, 2]);
        assert_eq!(split(2.5, &ms), vec![1, 2]);
        assert_eq!(split(100.0, &ms), vec![24, 2]);
    }
}
