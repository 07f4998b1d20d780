//! Where windows go: stdout (JSON lines), Redis streams, Prometheus.

pub mod prometheus;
pub mod redis;
