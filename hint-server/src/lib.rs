//! TokenFlow's hint server: from the agents' telemetry windows to per-client rate limits.

pub mod control;
