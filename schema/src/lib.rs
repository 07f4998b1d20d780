//! Wire contracts shared by every TokenFlow process: the telemetry window the agent emits each interval.
//! Every type is serde + JSON Schema; `SCHEMA_VERSION` changes whenever a field changes meaning.

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

pub mod openai;
#[cfg(feature = "redis")]
pub mod store;

/// Version of the telemetry window format.
pub const SCHEMA_VERSION: u32 = 1;

/// One interval of a node's TCP telemetry.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct TelemetryWindow {
    pub schema_version: u32,
    pub node_id: String,
    /// Index of this window since the agent started (0, 1, 2, ...): a gap in a stream is a lost window.
    pub seq: u64,
    /// Start and end of the interval, milliseconds since the Unix epoch.
    pub start_unix_ms: u64,
    pub end_unix_ms: u64,
    /// Every flow with activity in the interval (closed flows included, with `closed: true`).
    pub flows: Vec<FlowWindow>,
    /// The same flows grouped by remote address.
    pub remotes: Vec<RemoteWindow>,
    /// Node-wide RTT over every watched flow.
    pub node: NodeWindow,
    /// Health of the capture itself.
    pub capture: CaptureStats,
    /// Health of the sinks, as of the moment this window was closed.
    pub sinks: SinkStats,
    /// The node's GPUs at the end of the interval (NVML); `available: false` with a reason otherwise.
    pub gpu: GpuWindow,
    /// Socket queues at the end of the interval (sock_diag netlink).
    pub backlog: BacklogWindow,
    /// Served requests per local port, measured in the kernel: from request bytes reaching a
    /// connection this host accepted to the first response bytes its application sends.
    pub request_latency: Vec<PortLatency>,
    /// Entry→return latency of each `--uprobe` target, then marker-to-marker latency per request
    /// of each `--span`.
    pub uprobes: Vec<ProbeLatency>,
}

/// Latency figures are µs, in the same summary form as RTT.
pub type LatencySummary = RttSummary;

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct PortLatency {
    pub port: u16,
    pub latency: LatencySummary,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ProbeLatency {
    pub label: String,
    /// `PATH:SYMBOL` (`--uprobe`) or `PATH:START..END` (`--span`) as given.
    pub target: String,
    pub latency: LatencySummary,
}

/// Queues of listening sockets and of the connections they serve, read through sock_diag.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct BacklogWindow {
    pub listeners: Vec<ListenerBacklog>,
    /// Established connections grouped by the local listening port they arrived on (those still
    /// waiting in the accept queue included).
    pub ports: Vec<PortQueues>,
    /// Why the queues could not be read, when they could not.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ListenerBacklog {
    /// `ip:port` the socket listens on.
    pub local: String,
    pub port: u16,
    /// Connections completed by the kernel and waiting for `accept()`.
    pub accept_queue: u32,
    /// The `listen()` backlog (capped by net.core.somaxconn).
    pub accept_queue_limit: u32,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct PortQueues {
    pub port: u16,
    pub connections: u32,
    /// Bytes received but not yet read by the server, summed and the largest single socket.
    pub recv_queue_bytes: u64,
    pub recv_queue_max_bytes: u32,
    /// Bytes written by the server but not yet acknowledged by the client.
    pub send_queue_bytes: u64,
    pub send_queue_max_bytes: u32,
}

/// GPU state of the node. No GPU or no driver is a normal state, reported with its reason.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct GpuWindow {
    pub available: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// Where the figures come from: `nvml`, or `fake` in tests (never in production).
    pub provider: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub driver_version: Option<String>,
    pub devices: Vec<GpuDevice>,
}

/// One GPU. A figure the driver does not report for this device is `null`.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct GpuDevice {
    pub index: u32,
    pub name: String,
    pub uuid: String,
    /// Share of the last sample period in which a kernel ran, 0–100.
    pub utilization_percent: Option<u32>,
    pub memory_used_bytes: Option<u64>,
    pub memory_total_bytes: Option<u64>,
    pub power_watts: Option<f64>,
    pub sm_clock_mhz: Option<u32>,
    pub temperature_celsius: Option<u32>,
    pub pcie_tx_bytes_per_s: Option<u64>,
    pub pcie_rx_bytes_per_s: Option<u64>,
    /// Processes holding GPU memory, by pid (compute and graphics contexts).
    pub processes: Vec<GpuProcess>,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct GpuProcess {
    pub pid: u32,
    pub used_memory_bytes: Option<u64>,
}

/// Delivery state of the agent's sinks (cumulative since the agent started).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct SinkStats {
    /// Windows waiting in the agent for Redis to come back.
    pub redis_buffered: u64,
    /// Windows dropped because Redis was away longer than the buffer holds.
    pub redis_dropped_total: u64,
    pub redis_written_total: u64,
    pub redis_connected: bool,
}

/// Redis key names every process agrees on. A node's keys carry its id as a hash tag (`{node}`), so
/// that in a Redis Cluster everything one node writes lives on one slot.
pub mod keys {
    /// Set of node ids that have written telemetry.
    pub const NODES: &str = "tokenflow:nodes";
    /// Stream of `TelemetryWindow`s of one node (entry field `window`, JSON; IDs are window end times).
    pub fn telemetry_stream(node_id: &str) -> String {
        format!("tokenflow:telemetry:{{{node_id}}}")
    }
    /// The node's latest [`super::NodeSummary`] (JSON), expiring when the agent stops writing.
    pub fn latest(node_id: &str) -> String {
        format!("tokenflow:latest:{{{node_id}}}")
    }
    /// Field of a stream entry that holds the window.
    pub const WINDOW_FIELD: &str = "window";
    /// Hash of client id → [`super::ClientConfig`] (JSON), shared by every hint-server replica.
    pub const CLIENTS: &str = "tokenflow:clients";
    /// The client's current [`super::Hint`] (JSON), expiring with the hint's TTL.
    pub fn hint(client_id: &str) -> String {
        format!("tokenflow:hint:{client_id}")
    }
    /// The hint server's per-node state (features' history, controller state), so that any
    /// replica can continue where another left off.
    pub fn hint_state(node_id: &str) -> String {
        format!("tokenflow:hint-state:{{{node_id}}}")
    }
    /// The client's recent [`super::DispatchReport`]s, oldest first, each `"<arrival unix ms> <requests_total>"`,
    /// kept short and expiring when the client stops reporting.
    pub fn dispatched(client_id: &str) -> String {
        format!("tokenflow:dispatched:{client_id}")
    }
    /// Short lock a hint-server replica takes to do a node's periodic stale check.
    pub fn stale_lock(node_id: &str) -> String {
        format!("tokenflow:stale-lock:{{{node_id}}}")
    }
    /// Pub/sub channel on which agents announce a new window (the node id), so that in a Redis
    /// Cluster a hint server reads just that node's stream.
    pub const WINDOWS_CHANNEL: &str = "tokenflow:windows";
    /// Pub/sub channel on which every new hint is published (JSON).
    pub const HINTS_CHANNEL: &str = "tokenflow:hints";
    /// Consumer group of the hint servers on every telemetry stream.
    pub const HINT_GROUP: &str = "tokenflow-hint";
    /// Sorted set of hint-server replicas (consumer name → ms last seen, by the Redis node's
    /// clock): in a Redis Cluster the replicas split the announced nodes between them instead of
    /// racing for each, and a replica gone for a minute is taken out of the consumer group.
    pub const HINT_REPLICAS: &str = "tokenflow:hint-replicas";
}

/// The small "latest" record: enough for a cheap read of a node's state.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct NodeSummary {
    pub schema_version: u32,
    pub node_id: String,
    pub seq: u64,
    pub end_unix_ms: u64,
    pub node: NodeWindow,
}

/// RTT percentiles of one interval, microseconds, from a log2 histogram with 8 linear sub-buckets
/// (each figure within 6.25 % of the exact sample percentile).
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct RttSummary {
    pub samples: u64,
    pub p50_us: u64,
    pub p95_us: u64,
    pub p99_us: u64,
    pub max_us: u64,
    pub mean_us: u64,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct FlowWindow {
    /// Kernel socket cookie (0 until tcp_probe has seen the socket receive a segment).
    pub cookie: u64,
    /// `ip:port`, IPv6 in brackets.
    pub local: String,
    pub remote: String,
    /// The service side's port: the remote port of a connection this host opened, the local port of
    /// one it accepted.
    pub service_port: u16,
    /// Network namespace inode (as in `/proc/PID/ns/net`), 0 when unknown.
    pub netns: u32,
    pub cgroup_id: u64,
    /// Process that called `connect()`, 0 when unknown (accepted sockets).
    pub pid: u32,
    /// TCP state at the end of the interval (`ESTABLISHED`, `CLOSE`, …).
    pub state: String,
    /// Every TCP state the socket has entered since the agent first saw it, in `tcp_states.h` order.
    pub states_seen: Vec<String>,
    pub rtt: RttSummary,
    /// Non-empty histogram buckets of the interval: `[lower bound µs, upper bound µs, count]`, so
    /// windows can be merged exactly.
    pub rtt_hist: Vec<[u64; 3]>,
    /// Smoothed RTT at the last sample, µs.
    pub last_srtt_us: u32,
    pub snd_cwnd: u32,
    pub bytes_in_flight: u32,
    pub bytes_acked: u64,
    /// Retransmitted segments in the interval.
    pub retransmits: u64,
    /// Retransmitted segments per second.
    pub retransmit_rate_per_s: f64,
    pub state_changes: u64,
    pub closed: bool,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct RemoteWindow {
    pub remote_addr: String,
    pub flows: u32,
    pub rtt: RttSummary,
    pub bytes_acked: u64,
    pub retransmits: u64,
    pub retransmit_rate_per_s: f64,
    pub state_changes: u64,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct NodeWindow {
    pub rtt: RttSummary,
    pub active_flows: u32,
    pub closed_flows: u32,
    pub bytes_acked: u64,
    pub retransmits: u64,
    pub retransmit_rate_per_s: f64,
    pub state_changes: u64,
}

/// Events the kernel programs handled in the interval, and anything lost.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct CaptureStats {
    pub probe_events: u64,
    pub retransmit_events: u64,
    pub state_events: u64,
    pub flows_created: u64,
    /// Flows the per-flow map could not hold (their events are missing).
    pub flow_insert_failed: u64,
    /// Flow-closed events lost because the ring buffer was full.
    pub closed_dropped: u64,
    pub filtered_events: u64,
    /// Retransmits of sockets not tracked yet (opened before the agent started and silent since).
    pub retransmits_untracked: u64,
    /// Flows in the kernel map at the end of the interval.
    pub flows_tracked: u32,
    /// Runs of the agent's programs that the kernel skipped (their `recursion_misses`): events
    /// never seen. A classic tracepoint (`tcp_probe`) or a uprobe is skipped while a BPF map
    /// syscall or another tracing program holds the CPU; a raw tracepoint only when it would
    /// interrupt itself (a softirq's state change during a connect() or close() on the same CPU).
    #[serde(default)]
    pub runs_skipped: u64,
    /// State changes no run saw, recovered from the next change's old state (counted in the
    /// flows' `state_changes` and `states_seen`): a skipped run, or a change the kernel ran no
    /// program for.
    #[serde(default)]
    pub states_inferred: u64,
}

/// Labelled telemetry recorded from the test bed (`cargo xtask record-trace`), one JSON line per
/// window: what was done to the network during the window, and the window itself.
pub mod trace {
    use super::*;

    /// What the recorder did to the test bed while the window was open.
    #[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
    #[serde(deny_unknown_fields)]
    pub struct TraceLabel {
        /// Phase name (`idle`, `light`, `moderate`, `busy`, `bloat`, `loss`, `step`).
        pub phase: String,
        /// True when the phase congested or damaged the path (queue overflow, injected loss,
        /// bandwidth cut below the offered load).
        pub anomalous: bool,
        pub bottleneck_kbit: u64,
        pub loss_per_mille: u32,
        pub bulk_flows: u32,
    }

    #[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
    #[serde(deny_unknown_fields)]
    pub struct TraceLine {
        pub label: TraceLabel,
        pub window: TelemetryWindow,
    }
}

/// Version of the hint format.
pub const HINT_SCHEMA_VERSION: u32 = 1;

/// Which controller turns a node's telemetry into a client's rate limit.
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum ControllerKind {
    /// PID on p95 RTT with the forecast as feed-forward (TokenFlow's controller).
    #[default]
    Pid,
    /// The original project's mapping, kept as a baseline.
    Sigmoid,
    /// Netflix concurrency-limits' Gradient2.
    Gradient2,
    /// Additive increase, multiplicative decrease.
    Aimd,
    /// No pacing: the client's own maximum.
    Off,
}

impl ControllerKind {
    pub const ALL: [ControllerKind; 5] = [
        ControllerKind::Pid,
        ControllerKind::Sigmoid,
        ControllerKind::Gradient2,
        ControllerKind::Aimd,
        ControllerKind::Off,
    ];
    pub fn as_str(self) -> &'static str {
        match self {
            ControllerKind::Pid => "pid",
            ControllerKind::Sigmoid => "sigmoid",
            ControllerKind::Gradient2 => "gradient2",
            ControllerKind::Aimd => "aimd",
            ControllerKind::Off => "off",
        }
    }
}

/// Traffic class of a client: under congestion `batch` is cut before `interactive`.
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum ClientClass {
    #[default]
    Interactive,
    Batch,
}

/// A client's pacing settings (`PUT /v1/clients/{client_id}`); every field optional on input,
/// defaults filled in by the hint server.
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ClientConfig {
    /// Node whose telemetry governs this client.
    pub node_id: String,
    pub controller: ControllerKind,
    pub class: ClientClass,
    /// Share of the node's allowed load within the class (> 0).
    pub weight: f64,
    /// p95 RTT the controller holds, milliseconds.
    pub setpoint_ms: f64,
    /// Lowest rate ever handed out, requests/s (> 0: a client is slowed, never stopped).
    pub min_rps: f64,
    /// Highest rate, requests/s.
    pub max_rps: f64,
    /// Highest concurrency handed out.
    pub max_concurrency: u32,
    /// Output tokens per request, for the advisory tokens/s.
    pub tokens_per_request: f64,
    /// What one request of this client costs the node's bottleneck, relative to its other clients
    /// (e.g. the typical upload in KB). A group's allowed load is shared in these units, so ten
    /// small prompts are not charged like ten 100 KB uploads. Default 1: every request alike.
    #[serde(default = "one")]
    pub request_cost: f64,
}

fn one() -> f64 {
    1.0
}

/// Body of `POST /v1/clients/{client_id}/dispatched`: how many requests the client's pacer has sent
/// since it started, a counter that only grows. The hint server stamps each report on arrival,
/// reads from the counter what the client sent in each telemetry window and says so in the
/// client's next hint: a hint is an allowance, and users may leave part of it unused — or a client
/// may not pace at all.
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct DispatchReport {
    pub requests_total: u64,
}

/// Body of `PUT /v1/clients/{client_id}`: every field optional; omitted fields keep their current
/// value (or the default for a new client, which must name its `node_id`).
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ClientConfigInput {
    pub node_id: Option<String>,
    pub controller: Option<ControllerKind>,
    pub class: Option<ClientClass>,
    pub weight: Option<f64>,
    pub setpoint_ms: Option<f64>,
    pub min_rps: Option<f64>,
    pub max_rps: Option<f64>,
    pub max_concurrency: Option<u32>,
    pub tokens_per_request: Option<f64>,
    pub request_cost: Option<f64>,
}

impl ClientConfig {
    pub const DEFAULT_SETPOINT_MS: f64 = 50.0;

    /// Applies `input` over `current` (or over the defaults), checking every field. The error
    /// names the offending field.
    pub fn merge(
        current: Option<&ClientConfig>,
        input: &ClientConfigInput,
    ) -> Result<ClientConfig, (String, String)> {
        let err = |f: &str, m: &str| Err((f.to_string(), m.to_string()));
        let node_id = match (&input.node_id, current) {
            (Some(n), _) => n.clone(),
            (None, Some(c)) => c.node_id.clone(),
            (None, None) => {
                return err(
                    "node_id",
                    "a new client must name the node whose telemetry governs it",
                );
            }
        };
        if node_id.is_empty()
            || node_id.len() > 128
            || !node_id
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
        {
            return err("node_id", "1–128 characters of [A-Za-z0-9._-]");
        }
        let d = current.cloned().unwrap_or(ClientConfig {
            node_id: node_id.clone(),
            controller: ControllerKind::Pid,
            class: ClientClass::Interactive,
            weight: 1.0,
            setpoint_ms: Self::DEFAULT_SETPOINT_MS,
            min_rps: 0.5,
            max_rps: 100.0,
            max_concurrency: 64,
            tokens_per_request: 128.0,
            request_cost: 1.0,
        });
        let c = ClientConfig {
            node_id,
            controller: input.controller.unwrap_or(d.controller),
            class: input.class.unwrap_or(d.class),
            weight: input.weight.unwrap_or(d.weight),
            setpoint_ms: input.setpoint_ms.unwrap_or(d.setpoint_ms),
            min_rps: input.min_rps.unwrap_or(d.min_rps),
            max_rps: input.max_rps.unwrap_or(d.max_rps),
            max_concurrency: input.max_concurrency.unwrap_or(d.max_concurrency),
            tokens_per_request: input.tokens_per_request.unwrap_or(d.tokens_per_request),
            request_cost: input.request_cost.unwrap_or(d.request_cost),
        };
        let positive = |v: f64| v.is_finite() && v > 0.0;
        if !positive(c.weight) {
            return err("weight", "must be a number > 0");
        }
        if !positive(c.setpoint_ms) || c.setpoint_ms > 60_000.0 {
            return err("setpoint_ms", "must be > 0 and ≤ 60000");
        }
        if !positive(c.min_rps) {
            return err(
                "min_rps",
                "must be > 0: a paced client is slowed, never stopped",
            );
        }
        if !positive(c.max_rps) || c.max_rps < c.min_rps {
            return err("max_rps", "must be ≥ min_rps");
        }
        if c.max_concurrency == 0 {
            return err("max_concurrency", "must be ≥ 1");
        }
        if !positive(c.tokens_per_request) {
            return err("tokens_per_request", "must be > 0");
        }
        if !positive(c.request_cost) || c.request_cost > 1e9 {
            return err("request_cost", "must be > 0 and ≤ 1e9");
        }
        Ok(c)
    }
}

/// The rate limit a client should apply now (`GET /v1/hints/{client_id}`).
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Hint {
    pub schema_version: u32,
    pub client_id: String,
    pub node_id: String,
    /// Requests per second the client may start.
    pub rate_limit_rps: f64,
    /// Requests the client may have in flight at once.
    pub max_concurrency: u32,
    /// Advisory output tokens per second (rate × tokens per request).
    pub tokens_per_s: f64,
    /// 0 (congested) … 1 (healthy).
    pub health: f64,
    /// Isolation Forest score of the latest window, 0 … 1 (≥ 0.6 is unusual).
    pub anomaly_score: f64,
    /// GBDT forecast of the node's p95 RTT one interval ahead, milliseconds.
    pub predicted_rtt_ms: Option<f64>,
    /// p95 RTT of the latest window, milliseconds.
    pub observed_rtt_ms: Option<f64>,
    pub controller: ControllerKind,
    /// Why the limit is what it is, for people.
    pub reason: String,
    /// Unix time in milliseconds.
    pub issued_at_unix_ms: u64,
    /// How long the hint is valid; a client past it falls back to its safe rate.
    pub ttl_ms: u64,
    /// True when no window arrived for 3 intervals: the hint is conservative.
    pub stale: bool,
}

/// JSON Schema of [`TelemetryWindow`].
pub fn telemetry_window_schema() -> serde_json::Value {
    serde_json::to_value(schemars::schema_for!(TelemetryWindow)).unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn schema_names_every_field() {
        let schema = telemetry_window_schema();
        let text = schema.to_string();
        for field in [
            "schema_version",
            "flows",
            "remotes",
            "retransmit_rate_per_s",
            "p99_us",
            "flows_tracked",
        ] {
            assert!(text.contains(field), "schema lacks {field}");
        }
    }

    #[test]
    fn unknown_fields_are_rejected() {
        let bad =
            r#"{"samples":1,"p50_us":1,"p95_us":1,"p99_us":1,"max_us":1,"mean_us":1,"extra":2}"#;
        assert!(serde_json::from_str::<RttSummary>(bad).is_err());
    }
}
