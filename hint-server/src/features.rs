//! Features of a node, one vector per telemetry window.
//!
//! The builder keeps the little history the trends need (previous p95, EWMA), so windows must be
//! pushed in order. A window without RTT samples (an idle node) carries the last RTT figures
//! forward rather than reporting 0 ms, which would read as an impossibly good network.

use tokenflow_schema::TelemetryWindow;

pub const FEATURE_NAMES: [&str; 20] = [
    "rtt_p50_ms",
    "rtt_p95_ms",
    "rtt_p99_ms",
    "rtt_p95_delta_ms",
    "rtt_p95_ewma_ms",
    "rtt_p95_minus_ewma_ms",
    "retransmits_per_s",
    "throughput_mbit_s",
    "bytes_in_flight_kb",
    "active_flows",
    "accept_queue",
    "send_queue_kb",
    "request_p95_ms",
    "gpu_utilization",
    "gpu_memory_fraction",
    "rtt_mean_ms",
    "rtt_p95_mean5_ms",
    "rtt_p95_max5_ms",
    "throughput_ewma_mbit_s",
    "rtt_samples_per_s",
];
pub const N_FEATURES: usize = FEATURE_NAMES.len();

/// Index of a feature by name (compile-time checked by the tests).
pub fn index(name: &str) -> usize {
    FEATURE_NAMES
        .iter()
        .position(|n| *n == name)
        .unwrap_or(usize::MAX)
}

/// Features the Isolation Forest sees: the RTT distribution, its deviation from its own
/// recent average, and loss.
pub const ANOMALY_FEATURES: [usize; 6] = [0, 1, 2, 5, 6, 8];

/// Smoothing of the p95 EWMA (weight of the newest window).
pub const EWMA_ALPHA: f64 = 0.3;
/// Windows in the short rolling p95 statistics (mean and max): under bursty load one window's
/// p95 is a noisy reading of the queue, a few windows together a steadier one.
pub const ROLLING: usize = 5;

#[derive(Clone, Debug, PartialEq)]
pub struct Features {
    pub values: [f64; N_FEATURES],
    /// The window's own p95, when it had RTT samples.
    pub p95_ms: Option<f64>,
    /// The window's own median, when it had RTT samples.
    pub p50_ms: Option<f64>,
    /// The window's mean RTT, when it had RTT samples.
    pub mean_ms: Option<f64>,
    pub end_unix_ms: u64,
}

impl Features {
    pub fn get(&self, name: &str) -> f64 {
        self.values.get(index(name)).copied().unwrap_or(f64::NAN)
    }
    pub fn anomaly_vector(&self) -> Vec<f64> {
        ANOMALY_FEATURES.iter().map(|&i| self.values[i]).collect()
    }
}

#[derive(Clone, Debug, Default, serde::Serialize, serde::Deserialize)]
pub struct FeatureBuilder {
    last_rtt: Option<(f64, f64, f64)>,
    prev_p95: Option<f64>,
    ewma: Option<f64>,
    /// The newest [`ROLLING`] p95 values (carried forward like the others), oldest first.
    #[serde(default)]
    recent_p95: std::collections::VecDeque<f64>,
    #[serde(default)]
    last_mean: Option<f64>,
    #[serde(default)]
    throughput_ewma: Option<f64>,
}

impl FeatureBuilder {
    pub fn push(&mut self, w: &TelemetryWindow) -> Features {
        let ms = |us: u64| us as f64 / 1000.0;
        let own = (w.node.rtt.samples > 0).then(|| {
            (
                ms(w.node.rtt.p50_us),
                ms(w.node.rtt.p95_us),
                ms(w.node.rtt.p99_us),
            )
        });
        if own.is_some() {
            self.last_rtt = own;
        }
        let (p50, p95, p99) = self.last_rtt.unwrap_or((0.0, 0.0, 0.0));
        if own.is_some() {
            self.last_mean = Some(ms(w.node.rtt.mean_us));
        }
        self.recent_p95.push_back(p95);
        while self.recent_p95.len() > ROLLING {
            self.recent_p95.pop_front();
        }
        let mean5 = self.recent_p95.iter().sum::<f64>() / self.recent_p95.len() as f64;
        let max5 = self.recent_p95.iter().copied().fold(0.0, f64::max);
        let delta = self.prev_p95.map_or(0.0, |p| p95 - p);
        self.prev_p95 = Some(p95);
        let ewma = crate::ewma(&mut self.ewma, p95, EWMA_ALPHA);
        let secs = ((w.end_unix_ms.saturating_sub(w.start_unix_ms)) as f64 / 1000.0).max(1e-3);
        let throughput = w.node.bytes_acked as f64 * 8.0 / secs / 1e6;
        let throughput_ewma = crate::ewma(&mut self.throughput_ewma, throughput, EWMA_ALPHA);
        let inflight: u64 = w.flows.iter().map(|f| f.bytes_in_flight as u64).sum();
        let accept: u64 = w
            .backlog
            .listeners
            .iter()
            .map(|l| l.accept_queue as u64)
            .sum();
        let sendq: u64 = w.backlog.ports.iter().map(|p| p.send_queue_bytes).sum();
        let req_p95 = w
            .request_latency
            .iter()
            .map(|p| ms(p.latency.p95_us))
            .fold(0.0, f64::max);
        let (gpu_util, gpu_mem) = if w.gpu.available && !w.gpu.devices.is_empty() {
            let n = w.gpu.devices.len() as f64;
            let util = w
                .gpu
                .devices
                .iter()
                .filter_map(|d| d.utilization_percent)
                .sum::<u32>() as f64
                / n
                / 100.0;
            let mem = w
                .gpu
                .devices
                .iter()
                .filter_map(|d| {
                    Some(d.memory_used_bytes? as f64 / d.memory_total_bytes?.max(1) as f64)
                })
                .sum::<f64>()
                / n;
            (util, mem)
        } else {
            (0.0, 0.0)
        };
        Features {
            values: [
                p50,
                p95,
                p99,
                delta,
                ewma,
                p95 - ewma,
                w.node.retransmit_rate_per_s,
                throughput,
                inflight as f64 / 1000.0,
                w.node.active_flows as f64,
                accept as f64,
                sendq as f64 / 1000.0,
                req_p95,
                gpu_util,
                gpu_mem,
                self.last_mean.unwrap_or(p50),
                mean5,
                max5,
                throughput_ewma,
                w.node.rtt.samples as f64 / secs,
            ],
            p95_ms: own.map(|o| o.1),
            p50_ms: own.map(|o| o.0),
            mean_ms: own.map(|_| ms(w.node.rtt.mean_us)),
            end_unix_ms: w.end_unix_ms,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn anomaly_features_are_named() {
        for name in ["rtt_p95_ms", "retransmits_per_s", "rtt_p95_minus_ewma_ms"] {
            assert!(index(name) < N_FEATURES, "{name}");
        }
        assert!(ANOMALY_FEATURES.iter().all(|&i| i < N_FEATURES));
    }
}
