//! Turns cumulative kernel state into per-interval windows: deltas against the previous snapshot of
//! each flow, grouped per remote address and for the whole node. Pure: no maps, no clock.

use std::{
    collections::{BTreeMap, HashMap},
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
};

use agent_common::{AF_INET6, FlowState, HIST_BUCKETS, LatencyHist, counters};
use tokenflow_schema::{
    BacklogWindow, CaptureStats, FlowWindow, GpuWindow, LatencySummary, NodeWindow, PortLatency,
    ProbeLatency, RemoteWindow, SCHEMA_VERSION, SinkStats, TelemetryWindow,
};

use crate::hist::{merge, summarize};

/// Capture counters summed over CPUs, indexed by `agent_common::counters`.
pub type Counters = [u64; counters::COUNT as usize];

/// What the kernel held at the end of one interval.
pub struct Snapshot {
    /// Flows still in the map.
    pub live: Vec<FlowState>,
    /// Final state of flows that closed since the last snapshot.
    pub closed: Vec<FlowState>,
    pub counters: Counters,
    pub start_unix_ms: u64,
    pub end_unix_ms: u64,
    /// The node's GPUs, sampled when the interval closed.
    pub gpu: GpuWindow,
    pub backlog: BacklogWindow,
    /// Cumulative request latency per local port, and per uprobe id.
    pub req_lat: BTreeMap<u32, LatencyHist>,
    pub probe_lat: BTreeMap<u32, LatencyHist>,
    /// Runs of the programs the kernel skipped since they were loaded.
    pub skipped_runs: u64,
}

/// Snapshots a vanished flow's last live copy is kept waiting for its final state.
const VANISHED_SNAPSHOTS: u32 = 3;

/// Keeps the previous snapshot so each window holds only its own interval.
#[derive(Default)]
pub struct WindowBuilder {
    node_id: String,
    prev_flows: HashMap<u64, FlowState>,
    /// Flows that left the map without their final state having arrived yet, with the number
    /// of snapshots since: a flow that closes after the snapshot drained the ring buffer but
    /// before it listed the map is in neither, and its final state comes with the next snapshot.
    /// Without its last live copy as the baseline, that final state would count the flow's
    /// whole life into one window.
    vanished: HashMap<(u64, u64), (FlowState, u32)>,
    prev_counters: Counters,
    prev_skipped_runs: u64,
    next_seq: u64,
    /// (label, target) of each uprobe, by probe id.
    probes: Vec<(String, String)>,
    prev_req_lat: BTreeMap<u32, LatencyHist>,
    prev_probe_lat: BTreeMap<u32, LatencyHist>,
}

/// One flow's activity within the interval.
struct Delta {
    flow: FlowState,
    hist: Vec<u64>,
    samples: u64,
    rtt_sum_us: u64,
    bytes_acked: u64,
    retransmits: u64,
    state_changes: u64,
    closed: bool,
}

/// Growth of a 32-bit kernel counter: one wrap past `u32::MAX` is growth; a small step back (a
/// sample lost to two CPUs updating one slot at once) is none.
fn counter_delta(cur: u32, prev: u32) -> u32 {
    let d = cur.wrapping_sub(prev);
    if d < 1 << 31 { d } else { 0 }
}

impl Delta {
    fn between(prev: Option<&FlowState>, cur: &FlowState, closed: bool) -> Self {
        // A different first_seen_ns means the kernel reused the key for a new socket.
        let prev = prev.filter(|p| p.first_seen_ns == cur.first_seen_ns);
        let zero = FlowState::zeroed();
        let p = prev.unwrap_or(&zero);
        let hist = cur
            .rtt_hist
            .iter()
            .zip(p.rtt_hist.iter())
            .map(|(c, p)| u64::from(counter_delta(*c, *p)))
            .collect();
        Delta {
            flow: *cur,
            hist,
            samples: cur.rtt_samples.saturating_sub(p.rtt_samples),
            rtt_sum_us: cur.rtt_sum_us.saturating_sub(p.rtt_sum_us),
            bytes_acked: cur.bytes_acked.saturating_sub(p.bytes_acked),
            retransmits: cur.retrans_segs.saturating_sub(p.retrans_segs),
            state_changes: cur.state_changes.saturating_sub(p.state_changes),
            closed,
        }
    }

    fn add(&mut self, other: Delta) {
        merge(&mut self.hist, &other.hist);
        self.flow = other.flow;
        self.samples += other.samples;
        self.rtt_sum_us += other.rtt_sum_us;
        self.bytes_acked += other.bytes_acked;
        self.retransmits += other.retransmits;
        self.state_changes += other.state_changes;
        self.closed |= other.closed;
    }

    fn active(&self) -> bool {
        self.samples + self.bytes_acked + self.retransmits + self.state_changes > 0 || self.closed
    }
}

impl WindowBuilder {
    pub fn new(node_id: impl Into<String>) -> Self {
        Self {
            node_id: node_id.into(),
            ..Self::default()
        }
    }

    /// Names uprobe ids: `(label, PATH:SYMBOL)` in attach order.
    pub fn with_probes(mut self, probes: Vec<(String, String)>) -> Self {
        self.probes = probes;
        self
    }

    /// Builds the window for the interval that `snap` closes and remembers it as the new baseline.
    pub fn build(&mut self, snap: Snapshot) -> TelemetryWindow {
        let secs = (snap.end_unix_ms.saturating_sub(snap.start_unix_ms) as f64 / 1000.0).max(1e-3);
        // Keyed by socket and birth: the kernel reuses a closed socket's memory, so a new flow
        // can carry the key of one whose final state arrives in the same snapshot.
        let mut deltas: BTreeMap<(u64, u64), Delta> = BTreeMap::new();
        let mut next_prev = HashMap::with_capacity(snap.live.len());
        for cur in &snap.live {
            // connect() enters SYN_SENT before it picks the source port, which the kernel programs
            // learn at the flow's next event (its establishment, or its SYN's first retransmission):
            // a window ending in between would show the flow with local port 0. It waits for a later
            // window instead, where its changes count from nothing (it is no baseline yet).
            if cur.sport == 0 && cur.state == u32::from(agent_common::TCP_SYN_SENT) {
                continue;
            }
            deltas.insert(
                (cur.sk, cur.first_seen_ns),
                Delta::between(self.prev_flows.get(&cur.sk), cur, false),
            );
            next_prev.insert(cur.sk, *cur);
        }
        for cur in &snap.closed {
            let id = (cur.sk, cur.first_seen_ns);
            let same = |f: &&FlowState| f.first_seen_ns == cur.first_seen_ns;
            // The flow's newest live copy: in this same snapshot (it is closed now, so it leaves
            // the baselines), else the last one, else the one kept when it vanished from the map
            // before its final state arrived.
            let live_now = next_prev.get(&cur.sk).filter(same).copied();
            if live_now.is_some() {
                next_prev.remove(&cur.sk);
            }
            let base = live_now
                .or_else(|| self.prev_flows.get(&cur.sk).filter(same).copied())
                .or_else(|| self.vanished.remove(&id).map(|v| v.0));
            let d = Delta::between(base.as_ref(), cur, true);
            match deltas.get_mut(&id) {
                Some(existing) => existing.add(d),
                None => {
                    deltas.insert(id, d);
                }
            }
        }
        for v in self.vanished.values_mut() {
            v.1 += 1;
        }
        // A final state still missing after this many snapshots was lost (a full ring buffer
        // counts it in `closed_dropped`).
        self.vanished.retain(|_, v| v.1 < VANISHED_SNAPSHOTS);
        for (sk, f) in self.prev_flows.drain() {
            // Neither live nor closed in this snapshot (a live flow has its delta under the same id).
            let id = (sk, f.first_seen_ns);
            if !deltas.contains_key(&id) {
                self.vanished.insert(id, (f, 0));
            }
        }
        self.prev_flows = next_prev;

        let flows: Vec<FlowWindow> = deltas
            .values()
            .filter(|d| d.active())
            .map(|d| flow_window(d, secs))
            .collect();
        let remotes = remote_windows(deltas.values().filter(|d| d.active()), secs);

        let active: Vec<&Delta> = deltas.values().filter(|d| d.active()).collect();
        // The node's RTT histogram is the sum of its flows': every sample the kernel took belongs
        // to a tracked flow (a closed flow's last samples arrive with its final state).
        let mut node_hist = vec![0u64; HIST_BUCKETS];
        for d in &active {
            merge(&mut node_hist, &d.hist);
        }
        let retransmits: u64 = active.iter().map(|d| d.retransmits).sum();
        let node = NodeWindow {
            rtt: summarize(&node_hist, active.iter().map(|d| d.rtt_sum_us).sum()),
            active_flows: active.iter().filter(|d| !d.closed).count() as u32,
            closed_flows: active.iter().filter(|d| d.closed).count() as u32,
            bytes_acked: active.iter().map(|d| d.bytes_acked).sum(),
            retransmits,
            retransmit_rate_per_s: retransmits as f64 / secs,
            state_changes: active.iter().map(|d| d.state_changes).sum(),
        };

        let c = |i: u32| {
            let i = i as usize;
            snap.counters[i].saturating_sub(self.prev_counters[i])
        };
        let capture = CaptureStats {
            probe_events: c(counters::PROBE_EVENTS),
            retransmit_events: c(counters::RETRANSMIT_EVENTS),
            state_events: c(counters::STATE_EVENTS),
            flows_created: c(counters::FLOWS_CREATED),
            flow_insert_failed: c(counters::FLOW_INSERT_FAILED),
            closed_dropped: c(counters::CLOSED_DROPPED),
            filtered_events: c(counters::FILTERED_EVENTS),
            retransmits_untracked: c(counters::RETRANSMIT_UNTRACKED),
            flows_tracked: snap.live.len() as u32,
            runs_skipped: snap.skipped_runs.saturating_sub(self.prev_skipped_runs),
            states_inferred: c(counters::STATES_INFERRED),
        };
        self.prev_counters = snap.counters;
        self.prev_skipped_runs = snap.skipped_runs;
        let request_latency = latency_deltas(&snap.req_lat, &self.prev_req_lat)
            .map(|(port, latency)| PortLatency {
                port: port as u16,
                latency,
            })
            .collect();
        let uprobes = latency_deltas(&snap.probe_lat, &self.prev_probe_lat)
            .map(|(id, latency)| {
                let (label, target) = self.probes.get(id as usize).cloned().unwrap_or_default();
                ProbeLatency {
                    label,
                    target,
                    latency,
                }
            })
            .collect();
        self.prev_req_lat = snap.req_lat;
        self.prev_probe_lat = snap.probe_lat;
        let seq = self.next_seq;
        self.next_seq += 1;

        TelemetryWindow {
            schema_version: SCHEMA_VERSION,
            node_id: self.node_id.clone(),
            seq,
            start_unix_ms: snap.start_unix_ms,
            end_unix_ms: snap.end_unix_ms,
            flows,
            remotes,
            node,
            capture,
            sinks: SinkStats::default(),
            gpu: snap.gpu,
            backlog: snap.backlog,
            request_latency,
            uprobes,
        }
    }
}

fn flow_window(d: &Delta, secs: f64) -> FlowWindow {
    let f = &d.flow;
    FlowWindow {
        cookie: f.cookie,
        local: endpoint(f.family, &f.saddr, f.sport).to_string(),
        remote: endpoint(f.family, &f.daddr, f.dport).to_string(),
        service_port: service_port(f),
        netns: f.netns,
        cgroup_id: f.cgroup_id,
        pid: f.pid,
        state: tcp_state_name(f.state).to_string(),
        states_seen: (1..=12)
            .filter(|s| f.states_seen & (1 << s) != 0)
            .map(|s| tcp_state_name(s).to_string())
            .collect(),
        rtt: summarize(&d.hist, d.rtt_sum_us),
        rtt_hist: sparse(&d.hist),
        last_srtt_us: f.last_srtt_us,
        snd_cwnd: f.snd_cwnd,
        bytes_in_flight: f.bytes_in_flight,
        bytes_acked: d.bytes_acked,
        retransmits: d.retransmits,
        retransmit_rate_per_s: d.retransmits as f64 / secs,
        state_changes: d.state_changes,
        closed: d.closed,
    }
}

fn remote_windows<'a>(deltas: impl Iterator<Item = &'a Delta>, secs: f64) -> Vec<RemoteWindow> {
    #[derive(Default)]
    struct Acc {
        flows: u32,
        hist: Vec<u64>,
        sum: u64,
        bytes_acked: u64,
        retransmits: u64,
        state_changes: u64,
    }
    let mut by_remote: BTreeMap<IpAddr, Acc> = BTreeMap::new();
    for d in deltas {
        let a = by_remote
            .entry(address(d.flow.family, &d.flow.daddr))
            .or_default();
        a.flows += 1;
        merge(&mut a.hist, &d.hist);
        a.sum += d.rtt_sum_us;
        a.bytes_acked += d.bytes_acked;
        a.retransmits += d.retransmits;
        a.state_changes += d.state_changes;
    }
    by_remote
        .into_iter()
        .map(|(addr, a)| RemoteWindow {
            remote_addr: addr.to_string(),
            flows: a.flows,
            rtt: summarize(&a.hist, a.sum),
            bytes_acked: a.bytes_acked,
            retransmits: a.retransmits,
            retransmit_rate_per_s: a.retransmits as f64 / secs,
            state_changes: a.state_changes,
        })
        .collect()
}

/// Remote port for connections this host opened (it went through SYN_SENT), local port for those it
/// accepted; for flows already open when the agent started, the lower of the two.
pub fn service_port(f: &FlowState) -> u16 {
    if f.states_seen & (1 << agent_common::TCP_SYN_SENT) != 0 {
        f.dport
    } else if f.states_seen & (1 << 3/* SYN_RECV */) != 0 {
        f.sport
    } else {
        f.sport.min(f.dport)
    }
}

/// Non-empty buckets as `[lower µs, upper µs, count]`.
pub fn sparse(hist: &[u64]) -> Vec<[u64; 3]> {
    hist.iter()
        .enumerate()
        .filter(|(_, c)| **c > 0)
        .map(|(i, c)| {
            let (lo, hi) = agent_common::hist::bucket_bounds(i);
            [lo, hi, *c]
        })
        .collect()
}

/// Per key, the interval's samples (`cur - prev`) as a summary; keys without new samples are left out.
fn latency_deltas<'a>(
    cur: &'a BTreeMap<u32, LatencyHist>,
    prev: &'a BTreeMap<u32, LatencyHist>,
) -> impl Iterator<Item = (u32, LatencySummary)> + 'a {
    cur.iter().filter_map(move |(k, c)| {
        let p = prev.get(k);
        let hist: Vec<u64> = c
            .hist
            .iter()
            .enumerate()
            .map(|(i, v)| u64::from(v.saturating_sub(p.map(|p| p.hist[i]).unwrap_or(0))))
            .collect();
        let sum = c.sum_us.saturating_sub(p.map(|p| p.sum_us).unwrap_or(0));
        let s = summarize(&hist, sum);
        (s.samples > 0).then_some((*k, s))
    })
}

pub fn address(family: u16, raw: &[u8; 16]) -> IpAddr {
    if family == AF_INET6 {
        IpAddr::V6(Ipv6Addr::from(*raw))
    } else {
        IpAddr::V4(Ipv4Addr::new(raw[0], raw[1], raw[2], raw[3]))
    }
}

pub fn endpoint(family: u16, raw: &[u8; 16], port: u16) -> SocketAddr {
    SocketAddr::new(address(family, raw), port)
}

/// Names from `include/net/tcp_states.h`.
pub fn tcp_state_name(state: u32) -> &'static str {
    match state {
        1 => "ESTABLISHED",
        2 => "SYN_SENT",
        3 => "SYN_RECV",
        4 => "FIN_WAIT1",
        5 => "FIN_WAIT2",
        6 => "TIME_WAIT",
        7 => "CLOSE",
        8 => "CLOSE_WAIT",
        9 => "LAST_ACK",
        10 => "LISTEN",
        11 => "CLOSING",
        12 => "NEW_SYN_RECV",
        _ => "UNKNOWN",
    }
}

#[cfg(test)]
#[path = "window_tests.rs"]
mod tests;
