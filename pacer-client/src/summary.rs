//! Per-run summaries from HDR histograms.

use hdrhistogram::Histogram;
use serde::Serialize;

use crate::client::Record;

#[derive(Clone, Debug, Default, Serialize, PartialEq)]
pub struct Percentiles {
    pub count: u64,
    pub p50_ms: f64,
    pub p95_ms: f64,
    pub p99_ms: f64,
    pub max_ms: f64,
}

fn pct(values: impl Iterator<Item = f64>) -> Percentiles {
    let mut h = Histogram::<u64>::new_with_bounds(1, 3_600_000_000, 3)
        .unwrap_or_else(|_| Histogram::new(3).unwrap_or_else(|_| unreachable!()));
    for v in values {
        let _ = h.record(((v * 1000.0).round() as u64).max(1));
    }
    let q = |p: f64| h.value_at_quantile(p) as f64 / 1000.0;
    Percentiles {
        count: h.len(),
        p50_ms: q(0.5),
        p95_ms: q(0.95),
        p99_ms: q(0.99),
        max_ms: h.max() as f64 / 1000.0,
    }
}

#[derive(Clone, Debug, Serialize, PartialEq)]
pub struct Summary {
    pub requests: usize,
    pub ok: usize,
    pub errors: usize,
    pub rejected_429: usize,
    /// Shed by the pacer after `--max-wait` (among the errors; never sent).
    pub shed: usize,
    pub duration_s: f64,
    pub requests_per_s: f64,
    pub tokens_per_s: f64,
    /// Completed requests per second whose TTFT (from submission) met the SLO.
    pub goodput_per_s: f64,
    pub slo_ttft_ms: f64,
    pub ttft: Percentiles,
    pub ttft_from_send: Percentiles,
    pub inter_token: Percentiles,
    pub e2e: Percentiles,
    pub pacer_wait: Percentiles,
}

/// How the error of a request shed by the pacer begins.
pub const SHED: &str = "shed:";

pub fn summarize(r: &[Record], duration_s: f64, slo_ttft_ms: f64) -> Summary {
    let ok: Vec<&Record> = r
        .iter()
        .filter(|x| x.status == 200 && x.error.is_none() && x.ttft_ms.is_some())
        .collect();
    let d = duration_s.max(1e-9);
    Summary {
        requests: r.len(),
        ok: ok.len(),
        errors: r.len() - ok.len(),
        rejected_429: r.iter().filter(|x| x.status == 429).count(),
        shed: r
            .iter()
            .filter(|x| x.error.as_deref().is_some_and(|e| e.starts_with(SHED)))
            .count(),
        duration_s,
        requests_per_s: ok.len() as f64 / d,
        tokens_per_s: ok.iter().map(|x| x.tokens_out as f64).sum::<f64>() / d,
        goodput_per_s: ok
            .iter()
            .filter(|x| x.ttft_ms.is_some_and(|t| t <= slo_ttft_ms))
            .count() as f64
            / d,
        slo_ttft_ms,
        ttft: pct(ok.iter().filter_map(|x| x.ttft_ms)),
        ttft_from_send: pct(ok.iter().filter_map(|x| x.ttft_sent_ms)),
        inter_token: pct(ok.iter().flat_map(|x| x.itl_ms.iter().copied())),
        e2e: pct(ok.iter().map(|x| x.e2e_ms)),
        pacer_wait: pct(r.iter().map(|x| x.wait_ms)),
    }
}
