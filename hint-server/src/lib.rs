//! TokenFlow's hint server: from the agents' telemetry windows to per-client rate limits.

pub mod api;
pub mod bench;
pub mod control;
pub mod engine;
pub mod evaluate;
pub mod features;
pub mod forecast;
pub mod iforest;
pub mod metrics;
pub mod model;
pub mod serve;
pub mod simulate;
pub mod store;
pub mod trace;
pub mod ui;
