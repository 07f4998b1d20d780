//! `tokenflow-hint-server simulate-nodes`: a SIMULATOR of many nodes' agents, for scale tests and
//! benchmarks only. It writes SYNTHETIC telemetry windows — not measurements — to Redis exactly as
//! `tokenflow-agent` does (`XADD` to each node's stream with the window's end time as entry ID,
//! the node set, a "latest" key) and registers one client per node, so that one or more hint-server
//! replicas can be driven at a scale no test machine has. Every window says `"provider":
//! "simulated"` in its GPU section and every node id starts with `sim-`.
//!
//! Each node's p95 RTT follows its own schedule: a base of 8–20 ms, and every sixth 10-second slot
//! (offset per node) a congestion episode at 150–250 ms, so that hints differ between nodes and
//! change over time.

use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use tokenflow_schema::{
    ClientClass, ClientConfig, ClientConfigInput, NodeSummary, TelemetryWindow, keys,
    store::{Batch, Target, Timeouts},
};

use crate::serve::unix_ms;

#[derive(Clone, Debug)]
pub struct SimSettings {
    pub redis: Target,
    pub nodes: usize,
    pub interval: Duration,
    pub duration: Duration,
    /// Register one `pid` client per node (`sim-client-<i>`).
    pub clients: bool,
}

/// The node id of simulated node `i`.
pub fn node_id(i: usize) -> String {
    format!("sim-node-{i:05}")
}

/// The client id registered for simulated node `i`.
pub fn client_id(i: usize) -> String {
    format!("sim-client-{i:05}")
}

/// The synthetic p95 RTT of node `i` at `t_ms`, microseconds.
pub fn p95_us(i: usize, t_ms: u64) -> u64 {
    let h = (i as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15) >> 40;
    let base = 8_000 + h % 12_000;
    let slot = t_ms / 10_000 + i as u64;
    if slot.is_multiple_of(6) {
        150_000 + h % 100_000
    } else {
        base
    }
}

/// One synthetic window of node `i`.
pub fn window(i: usize, seq: u64, end_ms: u64, interval_ms: u64) -> TelemetryWindow {
    node_window(&node_id(i), seq, end_ms, interval_ms, p95_us(i, end_ms))
}

/// A synthetic window of the node named `node` with this p95 RTT (µs).
pub fn node_window(
    node: &str,
    seq: u64,
    end_ms: u64,
    interval_ms: u64,
    p95: u64,
) -> TelemetryWindow {
    let rtt = serde_json::json!({"samples": 200, "p50_us": p95 * 7 / 10, "p95_us": p95,
        "p99_us": p95 * 11 / 10, "max_us": p95 * 12 / 10, "mean_us": p95 * 7 / 10});
    let w: TelemetryWindow = serde_json::from_value(serde_json::json!({
        "schema_version": tokenflow_schema::SCHEMA_VERSION, "node_id": node, "seq": seq,
        "start_unix_ms": end_ms.saturating_sub(interval_ms), "end_unix_ms": end_ms,
        "flows": [], "remotes": [],
        "node": {"rtt": rtt, "active_flows": 8, "closed_flows": 1, "bytes_acked": 2_000_000,
            "retransmits": u64::from(p95 > 100_000) * 3, "retransmit_rate_per_s": if p95 > 100_000 { 3.0 } else { 0.0 },
            "state_changes": 2},
        "capture": {"probe_events": 400, "retransmit_events": 0, "state_events": 2, "flows_created": 1,
            "flow_insert_failed": 0, "closed_dropped": 0, "filtered_events": 0, "retransmits_untracked": 0,
            "flows_tracked": 8},
        "sinks": {"redis_buffered": 0, "redis_dropped_total": 0, "redis_written_total": seq, "redis_connected": true},
        "gpu": {"available": false, "reason": "simulated node (synthetic windows)", "provider": "simulated", "devices": []},
        "request_latency": [], "uprobes": [], "backlog": {"listeners": [], "ports": []}
    }))
    .unwrap_or_else(|e| unreachable!("the synthetic window matches the schema: {e}"));
    w
}

/// Registers the clients and writes windows for every node once per interval until the duration
/// has passed. Returns the number of windows written.
pub async fn run(s: &SimSettings, progress: impl Fn(u64, usize)) -> Result<u64> {
    let timeouts = Timeouts {
        connect: Duration::from_secs(2),
        response: Duration::from_secs(10),
        retries: 2,
    };
    let mut con = s
        .redis
        .connect(timeouts)
        .await
        .with_context(|| format!("connecting to {}", s.redis))?;
    let mut b = Batch::new();
    for i in 0..s.nodes {
        let mut sadd = redis::cmd("SADD");
        sadd.arg(keys::NODES).arg(node_id(i));
        b.keyed(keys::NODES, sadd);
        if s.clients {
            // The defaults a client registered through the API gets; every fourth one is batch.
            let input = ClientConfigInput {
                node_id: Some(node_id(i)),
                class: Some(if i % 4 == 0 {
                    ClientClass::Batch
                } else {
                    ClientClass::Interactive
                }),
                ..Default::default()
            };
            let c = ClientConfig::merge(None, &input)
                .map_err(|(f, m)| anyhow::anyhow!("simulated client: {f}: {m}"))?;
            let mut hset = redis::cmd("HSET");
            hset.arg(keys::CLIENTS)
                .arg(client_id(i))
                .arg(serde_json::to_string(&c)?);
            b.keyed(keys::CLIENTS, hset);
        }
    }
    b.exec(&mut con, false)
        .await
        .context("registering simulated nodes")?;
    let interval_ms = s.interval.as_millis().max(1) as u64;
    let t0 = Instant::now();
    let mut next = t0;
    let mut seq = 0u64;
    let mut written = 0u64;
    while t0.elapsed() < s.duration {
        tokio::time::sleep_until(next.into()).await;
        next += s.interval;
        let end = unix_ms();
        let mut b = Batch::new();
        for i in 0..s.nodes {
            let w = window(i, seq, end, interval_ms);
            let summary = NodeSummary {
                schema_version: w.schema_version,
                node_id: w.node_id.clone(),
                seq,
                end_unix_ms: end,
                node: w.node.clone(),
            };
            let stream = keys::telemetry_stream(&w.node_id);
            let mut xadd = redis::cmd("XADD");
            xadd.arg(&stream)
                .arg("MAXLEN")
                .arg("~")
                .arg(600)
                .arg(format!("{end}-*"))
                .arg(keys::WINDOW_FIELD)
                .arg(serde_json::to_string(&w)?);
            b.keyed(&stream, xadd);
            let latest = keys::latest(&w.node_id);
            let mut set = redis::cmd("SET");
            set.arg(&latest).arg(serde_json::to_string(&summary)?);
            b.keyed(&latest, set);
            let mut announce = redis::cmd("PUBLISH");
            announce.arg(keys::WINDOWS_CHANNEL).arg(&w.node_id);
            b.keyed(keys::WINDOWS_CHANNEL, announce);
        }
        b.exec(&mut con, false)
            .await
            .context("writing simulated windows")?;
        written += s.nodes as u64;
        seq += 1;
        progress(seq, s.nodes);
    }
    Ok(written)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn synthetic_windows_are_named_and_vary() {
        let w = window(3, 7, 1_000_000, 1000);
        assert_eq!(w.node_id, "sim-node-00003");
        assert_eq!(w.gpu.provider, "simulated");
        // Every node has congestion episodes and calm periods.
        let p: Vec<u64> = (0..60).map(|k| p95_us(3, k * 1000)).collect();
        assert!(p.iter().any(|&x| x >= 150_000) && p.iter().any(|&x| x <= 20_000));
        // Nodes are not in step.
        assert_ne!(p95_us(0, 0) >= 150_000, p95_us(1, 0) >= 150_000);
    }
}
