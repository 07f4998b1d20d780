//! A plant model for the controllers: a bottleneck queue fed by the paced client.
//!
//! Fluid model stepped every 10 ms: the client's requests (each `request_bytes` on the wire) enter
//! a FIFO drained at the bottleneck's capacity, which cross traffic reduces by 0–10 % (a random
//! walk); the queue holds `buffer` of delay and drops beyond it. RTT = base + queue / capacity,
//! plus ±1 ms of jitter per sample. Each control period the controller sees the p95 of that
//! period's samples and a naive forecast (the last value plus its last rise) standing in for the
//! GBDT — this is a simulation, named as such; the real forecaster is evaluated on recorded
//! test-bed traces.
//!
//! With `burst_fraction` > 0 that share of each request arrives at once, at the pacer's evenly spaced
//! instants, as TCP's first flights of a long upload do: the p95 then sits well above the base
//! RTT at moderate load and rises little until the link is full — the knee the test bed showed
//! (p95 ≈ 40 ms at 40 % of 20 Mbit/s, base 14 ms) before the pacer paced its sockets
//! (`SO_MAX_PACING_RATE`); with paced sockets a rate below the link's reads lower (15 ms at 93 %
//! of the bandwidth step's narrowed 5 Mbit/s link, base 11 ms).
//! [`Plant::test_bed`] is that unpaced plant, the harder case.

use super::{Governor, Limits, Observation};
use tokenflow_schema::ControllerKind;

/// Payload bytes per TCP segment (Ethernet, timestamps): the plant's drops in retransmitted segments.
const MSS_BYTES: f64 = 1448.0;

#[derive(Clone, Debug)]
pub struct Plant {
    pub base_rtt_ms: f64,
    pub buffer_ms: f64,
    pub request_bytes: f64,
    /// (start second, capacity in Mbit/s), in order.
    pub capacity_steps: Vec<(f64, f64)>,
    pub duration_s: f64,
    /// Control period, seconds.
    pub period_s: f64,
    /// Step of the cross traffic's random walk per 10 ms (share of capacity): 0.002 moves the
    /// capacity left to the client by about ±1 % per second; 0 is a quiet link.
    pub cross_walk: f64,
    /// Share of each request that enters the queue at once when it arrives (0: a fluid flow).
    pub burst_fraction: f64,
    /// Periods between a decision and the window that first shows its effect (0: the next one).
    /// On the test bed a window closes, the hint server decides, and the pacer's next poll
    /// applies the rate half a period later on average: about one period.
    pub delay_periods: usize,
    /// Report the p95 as the agent does: the midpoint of its histogram bucket (buckets 1/8 of an
    /// octave wide, so a p95 of 48 ms reads 47.1 and one of 50 reads 51.2).
    pub agent_buckets: bool,
}

impl Default for Plant {
    /// 20 → 5 → 20 Mbit/s, 60 s each, after 40 s of warm-up at 20; 100 KB requests (long prompts).
    fn default() -> Self {
        Self {
            base_rtt_ms: 20.0,
            buffer_ms: 300.0,
            request_bytes: 100_000.0,
            capacity_steps: vec![(0.0, 20.0), (40.0, 5.0), (100.0, 20.0)],
            duration_s: 160.0,
            period_s: 1.0,
            cross_walk: 0.002,
            burst_fraction: 0.0,
            delay_periods: 0,
            agent_buckets: false,
        }
    }
}

impl Plant {
    /// The network-bound test bed at 20 Mbit/s with unpaced sockets: 14 ms base RTT, 90 % of each
    /// 100 KB upload in one burst (p95 ≈ 40 ms from 40 % to 90 % load, as measured there before
    /// the pacer set `SO_MAX_PACING_RATE`), p95 read from the agent's histogram buckets.
    pub fn test_bed() -> Self {
        Self {
            base_rtt_ms: 14.0,
            burst_fraction: 0.9,
            agent_buckets: true,
            capacity_steps: vec![(0.0, 20.0)],
            duration_s: 40.0,
            ..Self::default()
        }
    }

    pub fn capacity_mbit(&self, t: f64) -> f64 {
        self.capacity_steps
            .iter()
            .rev()
            .find(|(s, _)| *s <= t)
            .map_or(self.capacity_steps[0].1, |c| c.1)
    }
}

/// One control period of a simulation.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Period {
    pub t: f64,
    pub capacity_rps: f64,
    pub rate_rps: f64,
    pub p95_ms: f64,
    pub p50_ms: f64,
    pub delivered_rps: f64,
    pub dropped_bytes: f64,
}

pub fn simulate(kind: ControllerKind, plant: &Plant, limits: Limits, seed: u64) -> Vec<Period> {
    simulate_with(Governor::new(kind, limits), plant, seed)
}

/// Runs a given governor (for tuning experiments) on the plant.
pub fn simulate_with(mut gov: Governor, plant: &Plant, seed: u64) -> Vec<Period> {
    let mut rng = fastrand::Rng::with_seed(seed);
    let dt = 0.01;
    let steps_per_period = (plant.period_s / dt).round() as usize;
    let (mut q, mut cross, mut rate) = (0.0f64, 0.05f64, gov.last_rps());
    let mut credit = 0.0f64;
    let mut pending = std::collections::VecDeque::new();
    let (mut prev_p95, mut out) = (None::<f64>, Vec::new());
    let mut t = 0.0;
    while t < plant.duration_s {
        let mut samples = Vec::with_capacity(steps_per_period);
        let (mut delivered, mut dropped) = (0.0, 0.0);
        let nominal = plant.capacity_mbit(t) * 1e6 / 8.0;
        for _ in 0..steps_per_period {
            cross = (cross + (rng.f64() - 0.5) * plant.cross_walk).clamp(0.0, 0.1);
            let cap = nominal * (1.0 - cross);
            let f = plant.burst_fraction.clamp(0.0, 1.0);
            q += (1.0 - f) * rate * plant.request_bytes * dt;
            // The pacer spaces requests evenly: a burst each time a whole request's credit is in.
            credit += rate * dt;
            if f > 0.0 && credit >= 1.0 {
                credit -= 1.0;
                q += f * plant.request_bytes;
            }
            let out_bytes = (cap * dt).min(q);
            q -= out_bytes;
            delivered += out_bytes;
            let q_max = cap * plant.buffer_ms / 1000.0;
            if q > q_max {
                dropped += q - q_max;
                q = q_max;
            }
            samples.push(plant.base_rtt_ms + q / cap * 1000.0 + (rng.f64() - 0.5) * 2.0);
            t += dt;
        }
        // The agent's mean is exact (a sum over the samples), not read from its buckets.
        let mean = samples.iter().sum::<f64>() / samples.len().max(1) as f64;
        samples.sort_by(f64::total_cmp);
        let quantile = |q: f64| {
            let v = samples[((samples.len() as f64 * q) as usize).min(samples.len() - 1)];
            if plant.agent_buckets {
                let us = (v * 1000.0).clamp(0.0, u32::MAX as f64) as u32;
                let (lo, hi) =
                    agent_common::hist::bucket_bounds(agent_common::hist::bucket_index(us));
                (lo + (hi - lo) / 2) as f64 / 1000.0
            } else {
                v
            }
        };
        let (p50, p95) = (quantile(0.5), quantile(0.95));
        let forecast = prev_p95.map_or(p95, |p| p95 + (p95 - p).max(0.0));
        prev_p95 = Some(p95);
        out.push(Period {
            t,
            capacity_rps: nominal / plant.request_bytes,
            rate_rps: rate,
            p95_ms: p95,
            p50_ms: p50,
            delivered_rps: delivered / plant.request_bytes / plant.period_s,
            dropped_bytes: dropped,
        });
        let d = gov.update(&Observation {
            now: t,
            p95_rtt_ms: Some(p95),
            p50_rtt_ms: Some(p50),
            mean_rtt_ms: Some(mean),
            delivered_mbit_s: Some(delivered * 8.0 / 1e6 / plant.period_s),
            predicted_p95_ms: Some(forecast),
            anomaly: 0.4,
            inflight: None,
            // Every dropped segment is sent again.
            retransmits_per_s: dropped / MSS_BYTES / plant.period_s,
            backend_queued: false,
            stale: false,
        });
        pending.push_back(d.rate_rps);
        if pending.len() > plant.delay_periods {
            rate = pending.pop_front().unwrap_or(rate);
        }
    }
    out
}

/// How a controller did on the plant.
#[derive(Clone, Debug, PartialEq, serde::Serialize)]
pub struct SimFigures {
    pub controller: &'static str,
    /// Per capacity step after the first: control periods until the p95 enters ±20 % of the
    /// setpoint and stays there for the rest of the segment (`None`: never).
    pub settle_periods: Vec<Option<usize>>,
    /// Largest excursion above the setpoint after first entering the band, fraction of the
    /// setpoint, over the segments after each capacity step.
    pub overshoot: f64,
    /// Second half of every segment: share of periods with p95 within ±20 % of the setpoint.
    pub steady_in_band: f64,
    /// Second half of every segment: mean |p95 − setpoint| / setpoint.
    pub steady_mape: f64,
    /// Second half of every segment: delivered / capacity.
    pub steady_utilisation: f64,
    pub dropped_mb: f64,
}

pub fn figures(
    kind: ControllerKind,
    plant: &Plant,
    setpoint_ms: f64,
    run: &[Period],
) -> SimFigures {
    let band = |p: &Period| (p.p95_ms - setpoint_ms).abs() <= 0.2 * setpoint_ms;
    let mut segments: Vec<&[Period]> = Vec::new();
    for (i, (start, _)) in plant.capacity_steps.iter().enumerate() {
        let end = plant
            .capacity_steps
            .get(i + 1)
            .map_or(f64::INFINITY, |s| s.0);
        // A period belongs to the segment its start falls in (`t` is the period's end, summed
        // from 10 ms steps: compare with a tolerance, or the period before a step joins it).
        let starts_at_or_after = |p: &Period, s: f64| p.t - plant.period_s > s - 1e-6;
        let a = run
            .iter()
            .position(|p| starts_at_or_after(p, *start))
            .unwrap_or(run.len());
        let b = run
            .iter()
            .position(|p| starts_at_or_after(p, end))
            .unwrap_or(run.len());
        segments.push(&run[a..b]);
    }
    let mut settle = Vec::new();
    let mut overshoot: f64 = 0.0;
    let (mut steady, mut in_band, mut ape, mut util) = (0usize, 0usize, 0.0, 0.0);
    for (i, seg) in segments.iter().enumerate() {
        let settled = (0..seg.len()).find(|&k| seg[k..].iter().all(band));
        if i > 0 {
            settle.push(settled);
        }
        // Overshoot is judged after the capacity steps; the first segment is the start-up.
        if i > 0
            && let Some(first) = seg.iter().position(band)
        {
            for p in &seg[first..] {
                overshoot = overshoot.max((p.p95_ms - setpoint_ms) / setpoint_ms);
            }
        }
        for p in &seg[seg.len() / 2..] {
            steady += 1;
            in_band += usize::from(band(p));
            ape += (p.p95_ms - setpoint_ms).abs() / setpoint_ms;
            util += (p.delivered_rps / p.capacity_rps).min(1.0);
        }
    }
    let n = steady.max(1) as f64;
    SimFigures {
        controller: kind.as_str(),
        settle_periods: settle,
        overshoot: overshoot.max(0.0),
        steady_in_band: in_band as f64 / n,
        steady_mape: ape / n,
        steady_utilisation: util / n,
        dropped_mb: run.iter().map(|p| p.dropped_bytes).sum::<f64>() / 1e6,
    }
}
