//! Prometheus sink: each window updates counters, gauges and an RTT histogram per remote address and
//! service port, served on the agent's own port. Names follow `tokenflow_agent_<what>_<unit>`,
//! `_total` for counters, base units (seconds, bytes).
//!
//! Counters and gauges live in `metrics-exporter-prometheus`. The RTT histograms do not: a window
//! carries them already bucketed, and the exporter's histograms take one sample at a time
//! (`record_many` pushes each of its `count` copies), which at 100k RTT samples per second cost
//! the agent a third of its CPU and grew its memory between scrapes. [`RttHistograms`] adds a
//! window's bucket counts in O(buckets) and renders the standard `_bucket`/`_sum`/`_count` lines.

use std::{collections::BTreeMap, fmt::Write as _, net::SocketAddr, sync::Arc, sync::Mutex};

use anyhow::{Context, Result};
use metrics::{counter, gauge};
use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle, PrometheusRecorder};
use tokenflow_schema::TelemetryWindow;

pub const RTT_SECONDS: &str = "tokenflow_agent_rtt_seconds";
pub const NODE_RTT_P99_SECONDS: &str = "tokenflow_agent_node_rtt_p99_seconds";
pub const RETRANSMITS_TOTAL: &str = "tokenflow_agent_retransmits_total";
pub const BYTES_ACKED_TOTAL: &str = "tokenflow_agent_bytes_acked_total";
pub const STATE_CHANGES_TOTAL: &str = "tokenflow_agent_state_changes_total";
pub const FLOWS_CLOSED_TOTAL: &str = "tokenflow_agent_flows_closed_total";
pub const ACTIVE_FLOWS: &str = "tokenflow_agent_active_flows";
pub const FLOWS_TRACKED: &str = "tokenflow_agent_flows_tracked";
pub const WINDOWS_TOTAL: &str = "tokenflow_agent_windows_total";
pub const CAPTURE_EVENTS_TOTAL: &str = "tokenflow_agent_capture_events_total";
pub const CAPTURE_LOST_EVENTS_TOTAL: &str = "tokenflow_agent_capture_lost_events_total";
/// State changes no program run saw, recovered from the next change: counted apart from the lost
/// events, since the flows do not miss them.
pub const CAPTURE_STATES_INFERRED_TOTAL: &str = "tokenflow_agent_capture_states_inferred_total";
pub const REDIS_BUFFERED_WINDOWS: &str = "tokenflow_agent_redis_buffered_windows";
pub const REDIS_DROPPED_WINDOWS_TOTAL: &str = "tokenflow_agent_redis_dropped_windows_total";
pub const REDIS_CONNECTED: &str = "tokenflow_agent_redis_connected";
/// Round trip of one window's XADD + latest-key write.
pub const REDIS_WRITE_SECONDS: &str = "tokenflow_agent_redis_write_seconds";
pub const GPU_AVAILABLE: &str = "tokenflow_agent_gpu_available";
pub const ACCEPT_QUEUE_LENGTH: &str = "tokenflow_agent_accept_queue_length";
pub const ACCEPT_QUEUE_LIMIT: &str = "tokenflow_agent_accept_queue_limit";
pub const SERVING_CONNECTIONS: &str = "tokenflow_agent_serving_connections";
pub const RECV_QUEUE_BYTES: &str = "tokenflow_agent_recv_queue_bytes";
pub const SEND_QUEUE_BYTES: &str = "tokenflow_agent_send_queue_bytes";

/// RTT buckets, seconds: 250 µs (same rack) to 5 s (a dying path).
const RTT_BUCKETS: [f64; 14] = [
    0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
];

/// Buckets for the few histograms left to the exporter (one sample per window each).
const WRITE_BUCKETS: [f64; 10] = [
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.1, 1.0,
];

/// Cumulative RTT histograms, one series per (remote address, service port).
#[derive(Debug, Default)]
pub struct RttHistograms {
    series: BTreeMap<(String, u16), RttSeries>,
}

#[derive(Debug, Default)]
struct RttSeries {
    /// Samples at or under each of [`RTT_BUCKETS`] (not cumulative; summed when rendered).
    buckets: [u64; RTT_BUCKETS.len()],
    count: u64,
    sum_seconds: f64,
}

impl RttHistograms {
    /// Adds one window's per-flow RTT histograms.
    pub fn record(&mut self, w: &TelemetryWindow) {
        for f in &w.flows {
            if f.rtt_hist.is_empty() {
                continue;
            }
            let s = self
                .series
                .entry((remote_address(&f.remote).to_string(), f.service_port))
                .or_default();
            for [lo, hi, count] in &f.rtt_hist {
                // The bucket's midpoint stands for its samples (within 6.25 %).
                let v = (lo + hi) as f64 / 2.0 / 1e6;
                if let Some(i) = RTT_BUCKETS.iter().position(|le| v <= *le) {
                    s.buckets[i] += count;
                }
                s.count += count;
                s.sum_seconds += v * *count as f64;
            }
        }
    }

    /// Appends the histograms in the Prometheus text format.
    pub fn render(&self, out: &mut String) {
        if self.series.is_empty() {
            return;
        }
        let _ = writeln!(out, "# TYPE {RTT_SECONDS} histogram");
        for ((remote, port), s) in &self.series {
            let labels = format!("remote=\"{}\",port=\"{port}\"", escape(remote));
            let mut cumulative = 0;
            for (le, n) in RTT_BUCKETS.iter().zip(s.buckets) {
                cumulative += n;
                let _ = writeln!(
                    out,
                    "{RTT_SECONDS}_bucket{{{labels},le=\"{le}\"}} {cumulative}"
                );
            }
            let _ = writeln!(
                out,
                "{RTT_SECONDS}_bucket{{{labels},le=\"+Inf\"}} {}",
                s.count
            );
            let _ = writeln!(out, "{RTT_SECONDS}_sum{{{labels}}} {}", s.sum_seconds);
            let _ = writeln!(out, "{RTT_SECONDS}_count{{{labels}}} {}", s.count);
        }
        out.push('\n');
    }
}

/// A label value in the text format: backslash, double quote and newline escaped.
fn escape(v: &str) -> String {
    v.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

/// `10.0.0.2:8000` → `10.0.0.2`, `[::1]:8000` → `::1`.
fn remote_address(remote: &str) -> &str {
    remote
        .rsplit_once(':')
        .map(|(a, _)| a)
        .unwrap_or(remote)
        .trim_matches(['[', ']'])
}

/// What `/metrics` serves: the exporter's counters and gauges, then the RTT histograms.
pub struct Exporter {
    handle: PrometheusHandle,
    rtt: Mutex<RttHistograms>,
}

impl Exporter {
    fn new(handle: PrometheusHandle) -> Self {
        Self {
            handle,
            rtt: Mutex::new(RttHistograms::default()),
        }
    }

    /// Updates every metric from one window (and the sink state it carries).
    pub fn record(&self, w: &TelemetryWindow) {
        record(w);
        self.rtt.lock().unwrap_or_else(|e| e.into_inner()).record(w);
        // Folds the exporter's pending histogram samples (Redis write times) into their buckets.
        self.handle.run_upkeep();
    }

    pub fn render(&self) -> String {
        let mut text = self.handle.render();
        self.rtt
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .render(&mut text);
        text
    }
}

fn builder() -> Result<PrometheusBuilder> {
    PrometheusBuilder::new()
        .set_buckets(&WRITE_BUCKETS)
        .context("configuring the histogram buckets")
}

/// Installs the global recorder and serves `/metrics` on `addr` for the life of the process.
pub async fn install(addr: SocketAddr) -> Result<Arc<Exporter>> {
    let listener = tokio::net::TcpListener::bind(addr).await.with_context(|| {
        format!("serving Prometheus metrics on {addr} (is the port in use? use --metrics-addr)")
    })?;
    let handle = builder()?
        .install_recorder()
        .context("installing the metrics recorder")?;
    let exporter = Arc::new(Exporter::new(handle));
    let served = exporter.clone();
    let app = axum::Router::new().route(
        "/metrics",
        axum::routing::get(move || {
            let e = served.clone();
            async move {
                (
                    [(
                        axum::http::header::CONTENT_TYPE,
                        "text/plain; version=0.0.4; charset=utf-8",
                    )],
                    e.render(),
                )
            }
        }),
    );
    tokio::spawn(async move {
        if let Err(e) = axum::serve(listener, app).await {
            tracing::error!("the metrics endpoint stopped: {e}");
        }
    });
    Ok(exporter)
}

/// A recorder not installed globally, for tests and tools that render the text themselves: record
/// with `metrics::with_local_recorder(&recorder, || exporter.record(&w))`.
pub fn local_recorder() -> Result<(PrometheusRecorder, Exporter)> {
    let recorder = builder()?.build_recorder();
    let exporter = Exporter::new(recorder.handle());
    Ok((recorder, exporter))
}

/// Counters and gauges from one window, into whichever recorder is current.
fn record(w: &TelemetryWindow) {
    for f in &w.flows {
        let labels = [
            ("remote", remote_address(&f.remote).to_string()),
            ("port", f.service_port.to_string()),
        ];
        counter!(RETRANSMITS_TOTAL, &labels).increment(f.retransmits);
        counter!(BYTES_ACKED_TOTAL, &labels).increment(f.bytes_acked);
        counter!(STATE_CHANGES_TOTAL, &labels).increment(f.state_changes);
    }
    counter!(FLOWS_CLOSED_TOTAL).increment(u64::from(w.node.closed_flows));
    gauge!(ACTIVE_FLOWS).set(f64::from(w.node.active_flows));
    gauge!(NODE_RTT_P99_SECONDS).set(w.node.rtt.p99_us as f64 / 1e6);
    gauge!(FLOWS_TRACKED).set(f64::from(w.capture.flows_tracked));
    counter!(WINDOWS_TOTAL).increment(1);
    let c = &w.capture;
    for (program, n) in [
        ("tcp_probe", c.probe_events),
        ("tcp_retransmit_skb", c.retransmit_events),
        ("inet_sock_set_state", c.state_events),
    ] {
        counter!(CAPTURE_EVENTS_TOTAL, "program" => program).increment(n);
    }
    counter!(CAPTURE_LOST_EVENTS_TOTAL, "reason" => "flow_map_full")
        .increment(c.flow_insert_failed);
    counter!(CAPTURE_LOST_EVENTS_TOTAL, "reason" => "ringbuf_full").increment(c.closed_dropped);
    counter!(CAPTURE_LOST_EVENTS_TOTAL, "reason" => "skipped_by_kernel").increment(c.runs_skipped);
    counter!(CAPTURE_STATES_INFERRED_TOTAL).increment(c.states_inferred);
    record_gpu(&w.gpu);
    for l in &w.backlog.listeners {
        let port = [("port", l.port.to_string())];
        gauge!(ACCEPT_QUEUE_LENGTH, &port).set(f64::from(l.accept_queue));
        gauge!(ACCEPT_QUEUE_LIMIT, &port).set(f64::from(l.accept_queue_limit));
    }
    for q in &w.backlog.ports {
        let port = [("port", q.port.to_string())];
        gauge!(SERVING_CONNECTIONS, &port).set(f64::from(q.connections));
        gauge!(RECV_QUEUE_BYTES, &port).set(q.recv_queue_bytes as f64);
        gauge!(SEND_QUEUE_BYTES, &port).set(q.send_queue_bytes as f64);
    }
    gauge!(REDIS_BUFFERED_WINDOWS).set(w.sinks.redis_buffered as f64);
    // Cumulative in the window: set the counter's absolute value.
    counter!(REDIS_DROPPED_WINDOWS_TOTAL).absolute(w.sinks.redis_dropped_total);
    gauge!(REDIS_CONNECTED).set(if w.sinks.redis_connected { 1.0 } else { 0.0 });
}

/// GPU gauges under the DCGM exporter's names and units (memory in MiB, power in W, clocks in MHz),
/// so dashboards built for dcgm-exporter work unchanged.
fn record_gpu(g: &tokenflow_schema::GpuWindow) {
    gauge!(GPU_AVAILABLE).set(if g.available { 1.0 } else { 0.0 });
    for d in &g.devices {
        let labels = [
            ("gpu", d.index.to_string()),
            ("UUID", d.uuid.clone()),
            ("modelName", d.name.clone()),
        ];
        let mib = |b: u64| b as f64 / (1024.0 * 1024.0);
        let pairs: [(&'static str, Option<f64>); 8] = [
            ("DCGM_FI_DEV_GPU_UTIL", d.utilization_percent.map(f64::from)),
            ("DCGM_FI_DEV_FB_USED", d.memory_used_bytes.map(mib)),
            (
                "DCGM_FI_DEV_FB_FREE",
                d.memory_total_bytes
                    .zip(d.memory_used_bytes)
                    .map(|(t, u)| mib(t.saturating_sub(u))),
            ),
            ("DCGM_FI_DEV_POWER_USAGE", d.power_watts),
            ("DCGM_FI_DEV_SM_CLOCK", d.sm_clock_mhz.map(f64::from)),
            ("DCGM_FI_DEV_GPU_TEMP", d.temperature_celsius.map(f64::from)),
            (
                "DCGM_FI_PROF_PCIE_TX_BYTES",
                d.pcie_tx_bytes_per_s.map(|v| v as f64),
            ),
            (
                "DCGM_FI_PROF_PCIE_RX_BYTES",
                d.pcie_rx_bytes_per_s.map(|v| v as f64),
            ),
        ];
        for (name, value) in pairs {
            if let Some(v) = value {
                gauge!(name, &labels).set(v);
            }
        }
    }
}

/// The naming convention every exported metric must follow.
pub fn follows_convention(name: &str) -> bool {
    let Some(rest) = name.strip_prefix("tokenflow_agent_") else {
        // DCGM exporter names are reused as they are, for existing GPU dashboards.
        return name.starts_with("DCGM_FI_");
    };
    let lower = rest
        .chars()
        .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_');
    let banned_units = ["_ms", "_us", "_millis", "_kb", "_mb", "_percent_total"];
    lower && !rest.is_empty() && !banned_units.iter().any(|u| rest.ends_with(u))
}

#[cfg(test)]
mod tests {
    use tokenflow_schema::{FlowWindow, RttSummary};

    use super::*;

    fn window() -> TelemetryWindow {
        let flow = FlowWindow {
            cookie: 1,
            local: "198.18.1.2:40000".into(),
            remote: "198.18.2.2:8000".into(),
            service_port: 8000,
            netns: 0,
            cgroup_id: 0,
            pid: 0,
            state: "ESTABLISHED".into(),
            states_seen: vec![],
            rtt: RttSummary {
                samples: 3,
                ..Default::default()
            },
            rtt_hist: vec![[19456, 20480, 3]],
            last_srtt_us: 20000,
            snd_cwnd: 10,
            bytes_in_flight: 0,
            bytes_acked: 4096,
            retransmits: 2,
            retransmit_rate_per_s: 2.0,
            state_changes: 0,
            closed: false,
        };
        let mut w: TelemetryWindow = serde_json::from_value(serde_json::json!({
            "schema_version": 1, "node_id": "n", "seq": 0, "start_unix_ms": 0, "end_unix_ms": 1000,
            "flows": [], "remotes": [], "node": {
                "rtt": {"samples":0,"p50_us":0,"p95_us":0,"p99_us":0,"max_us":0,"mean_us":0},
                "active_flows": 1, "closed_flows": 0, "bytes_acked": 0, "retransmits": 0,
                "retransmit_rate_per_s": 0.0, "state_changes": 0},
            "capture": {"probe_events":0,"retransmit_events":0,"state_events":0,"flows_created":0,
                "flow_insert_failed":0,"closed_dropped":0,"filtered_events":0,"retransmits_untracked":0,"flows_tracked":1},
            "sinks": {"redis_buffered":0,"redis_dropped_total":0,"redis_written_total":0,"redis_connected":false},
            "gpu": {"available": true, "provider": "fake", "devices": [{"index": 0, "name": "fake-gpu",
                "uuid": "GPU-fake", "utilization_percent": 87, "memory_used_bytes": 1073741824,
                "memory_total_bytes": 2147483648u64, "power_watts": 300.5, "sm_clock_mhz": 1980,
                "temperature_celsius": 61, "pcie_tx_bytes_per_s": 1024, "pcie_rx_bytes_per_s": 2048,
                "processes": []}]},
            "request_latency": [], "uprobes": [],
            "backlog": {"listeners": [{"local": "0.0.0.0:8000", "port": 8000, "accept_queue": 3,
                "accept_queue_limit": 128}], "ports": []}
        }))
        .unwrap();
        w.flows.push(flow);
        w
    }

    #[test]
    fn every_exported_name_follows_the_convention() {
        let (recorder, exporter) = local_recorder().unwrap();
        let mut w = window();
        w.capture.runs_skipped = 1;
        w.capture.states_inferred = 2;
        metrics::with_local_recorder(&recorder, || exporter.record(&w));
        let text = exporter.render();
        // A change recovered from the next is counted apart from the events lost.
        assert!(
            text.contains("tokenflow_agent_capture_states_inferred_total 2")
                && text.contains(
                    r#"tokenflow_agent_capture_lost_events_total{reason="skipped_by_kernel"} 1"#
                )
                && !text.contains("inferred\"}"),
            "{text}"
        );
        let names: Vec<&str> = text
            .lines()
            .filter_map(|l| l.strip_prefix("# TYPE "))
            .filter_map(|l| l.split_whitespace().next())
            .collect();
        assert!(names.len() >= 10, "{text}");
        for n in &names {
            assert!(
                follows_convention(n),
                "metric {n} breaks tokenflow_agent_<what>_<unit>"
            );
        }
        let counters: Vec<&str> = text
            .lines()
            .filter(|l| l.starts_with("# TYPE ") && l.ends_with(" counter"))
            .collect();
        for c in counters {
            assert!(
                c.split_whitespace()
                    .nth(2)
                    .is_some_and(|n| n.ends_with("_total")),
                "{c}"
            );
        }
        assert!(text.contains(r#"tokenflow_agent_rtt_seconds_bucket{remote="198.18.2.2",port="8000",le="0.025"} 3"#), "{text}");
        assert!(
            text.contains(
                r#"tokenflow_agent_retransmits_total{remote="198.18.2.2",port="8000"} 2"#
            ),
            "{text}"
        );
        // The fake GPU (tests only) under DCGM names and units: memory in MiB.
        let gpu = r#"{gpu="0",UUID="GPU-fake",modelName="fake-gpu"}"#;
        assert!(
            text.contains(&format!("DCGM_FI_DEV_GPU_UTIL{gpu} 87")),
            "{text}"
        );
        assert!(
            text.contains(&format!("DCGM_FI_DEV_FB_USED{gpu} 1024")),
            "{text}"
        );
        assert!(
            text.contains(&format!("DCGM_FI_DEV_FB_FREE{gpu} 1024")),
            "{text}"
        );
    }

    #[test]
    fn rtt_histograms_accumulate_bucket_counts_across_windows() {
        let mut h = RttHistograms::default();
        let mut w = window();
        // 3 samples near 20 ms and 1000 near 3 s in one window.
        w.flows[0].rtt_hist = vec![[19456, 20480, 3], [3_000_000, 3_100_000, 1000]];
        h.record(&w);
        h.record(&w);
        let mut text = String::new();
        h.render(&mut text);
        let series = r#"{remote="198.18.2.2",port="8000""#;
        for (le, n) in [
            ("0.01", 0),
            ("0.025", 6),
            ("2.5", 6),
            ("5", 2006),
            ("+Inf", 2006),
        ] {
            let line = format!("tokenflow_agent_rtt_seconds_bucket{series},le=\"{le}\"}} {n}");
            assert!(text.contains(&line), "{line} missing from\n{text}");
        }
        assert!(text.contains(&format!("tokenflow_agent_rtt_seconds_count{series}}} 2006")));
        let sum: f64 = text
            .lines()
            .find(|l| l.starts_with("tokenflow_agent_rtt_seconds_sum"))
            .and_then(|l| l.rsplit(' ').next()?.parse().ok())
            .unwrap();
        assert!(
            (sum - (6.0 * 0.019968 + 2000.0 * 3.05)).abs() < 1e-6,
            "{sum}"
        );
    }

    #[test]
    fn label_values_are_escaped() {
        assert_eq!(escape("a\"b\\c\nd"), "a\\\"b\\\\c\\nd");
    }

    #[test]
    fn convention_rejects_bad_names() {
        assert!(!follows_convention("rtt_ms"));
        assert!(!follows_convention("tokenflow_agent_rtt_ms"));
        assert!(!follows_convention("tokenflow_agent_RTT"));
        assert!(follows_convention("DCGM_FI_DEV_GPU_UTIL"));
    }
}
