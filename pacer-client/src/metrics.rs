//! The pacer's Prometheus metrics (`--metrics-addr`): what its users feel, and the limit it obeys.
//! Latencies are measured from submission, the pacer's own wait included, as in the summary.

use std::net::SocketAddr;

use anyhow::Context;
use metrics::{counter, gauge, histogram};
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder};

use crate::{client::Record, gate::Limit};

pub const REQUESTS_TOTAL: &str = "tokenflow_pacer_requests_total";
pub const GENERATED_TOKENS_TOTAL: &str = "tokenflow_pacer_generated_tokens_total";
pub const WAIT_SECONDS: &str = "tokenflow_pacer_wait_seconds";
pub const TTFT_SECONDS: &str = "tokenflow_pacer_time_to_first_token_seconds";
pub const INTER_TOKEN_SECONDS: &str = "tokenflow_pacer_inter_token_seconds";
pub const E2E_SECONDS: &str = "tokenflow_pacer_e2e_request_latency_seconds";
pub const RATE_LIMIT: &str = "tokenflow_pacer_rate_limit_requests_per_second";
pub const CONCURRENCY_LIMIT: &str = "tokenflow_pacer_concurrency_limit";
pub const WAITING_REQUESTS: &str = "tokenflow_pacer_waiting_requests";
pub const IN_FLIGHT_REQUESTS: &str = "tokenflow_pacer_in_flight_requests";

/// Every name above, for the dashboards' test.
pub const METRIC_NAMES: [&str; 10] = [
    REQUESTS_TOTAL,
    GENERATED_TOKENS_TOTAL,
    WAIT_SECONDS,
    TTFT_SECONDS,
    INTER_TOKEN_SECONDS,
    E2E_SECONDS,
    RATE_LIMIT,
    CONCURRENCY_LIMIT,
    WAITING_REQUESTS,
    IN_FLIGHT_REQUESTS,
];

/// Serves `/metrics` on `addr`.
pub fn install(addr: SocketAddr) -> anyhow::Result<()> {
    PrometheusBuilder::new()
        .set_buckets_for_metric(
            Matcher::Suffix("seconds".into()),
            &[
                0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
            ],
        )
        .context("configuring histogram buckets")?
        .with_http_listener(addr)
        .install()
        .with_context(|| {
            format!("serving metrics on {addr} (is the port in use? use --metrics-addr)")
        })
}

/// The outcome label of a finished request.
pub fn outcome(r: &Record) -> &'static str {
    match (r.status, &r.error) {
        (429, _) => "rejected",
        (0, Some(_)) if r.target.is_empty() => "unsent",
        (200, None) => "ok",
        _ => "error",
    }
}

pub fn record(r: &Record) {
    let class = r.class.clone();
    counter!(REQUESTS_TOTAL, "class" => class.clone(), "outcome" => outcome(r)).increment(1);
    counter!(GENERATED_TOKENS_TOTAL, "class" => class.clone()).increment(r.tokens_out);
    histogram!(WAIT_SECONDS, "class" => class.clone()).record(r.wait_ms / 1e3);
    histogram!(E2E_SECONDS, "class" => class.clone()).record(r.e2e_ms / 1e3);
    if let Some(t) = r.ttft_ms {
        histogram!(TTFT_SECONDS, "class" => class.clone()).record(t / 1e3);
    }
    let itl = histogram!(INTER_TOKEN_SECONDS, "class" => class);
    for &x in &r.itl_ms {
        itl.record(x / 1e3);
    }
}

/// The gate's state, sampled periodically. An unlimited gate (pacing off) exports no rate.
pub fn gate(limit: Limit, waiting: usize, in_flight: usize) {
    if limit.rate.is_finite() {
        gauge!(RATE_LIMIT).set(limit.rate);
        gauge!(CONCURRENCY_LIMIT).set(limit.concurrency as f64);
    }
    gauge!(WAITING_REQUESTS).set(waiting as f64);
    gauge!(IN_FLIGHT_REQUESTS).set(in_flight as f64);
}
