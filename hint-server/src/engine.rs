//! From a node's window to its clients' hints: features, models, controllers, sharing. No I/O:
//! the server loads a node's [`NodeState`] from Redis, calls [`on_window`] or [`on_stale`], and
//! stores the state and hints back.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use tokenflow_schema::{
    ClientClass, ClientConfig, ControllerKind, HINT_SCHEMA_VERSION, Hint, TelemetryWindow,
};

use crate::{
    control::{
        Decision, Governor, Limits, Observation,
        compute::{self, ComputeLimit, ServerLoad},
        concurrency, share,
    },
    features::{FeatureBuilder, Features},
    model::Models,
};

/// Windows missed before a node's input counts as stale.
pub const STALE_INTERVALS: u64 = 3;

/// Each client's dispatch reports, oldest first: (arrival unix ms, requests dispatched so far).
pub type Dispatched = std::collections::HashMap<String, Vec<(u64, u64)>>;

/// A report this much older than a window's end still counts for it (the pacer reports every
/// 100 ms; the window is decided on at once).
const REPORT_LAG_MS: u64 = 300;

/// Requests per second dispatched between `from_ms` and `to_ms`, read from a client's reports:
/// the counter at each end, interpolated between the reports around it. The newest report may be
/// up to [`REPORT_LAG_MS`] before the end: then the rate is of the span up to it (counting nothing
/// after it would read the window low by up to a tenth). None unless the reports cover the span
/// so and the counter never went back (a restarted pacer).
pub fn dispatched_rps(reports: &[(u64, u64)], from_ms: u64, to_ms: u64) -> Option<f64> {
    if reports
        .windows(2)
        .any(|p| p[1].1 < p[0].1 || p[1].0 < p[0].0)
    {
        return None;
    }
    let (first, last) = (reports.first()?, reports.last()?);
    let to_ms = if to_ms > last.0 && to_ms - last.0 <= REPORT_LAG_MS {
        last.0
    } else {
        to_ms
    };
    if from_ms < first.0 || to_ms > last.0 || to_ms <= from_ms {
        return None;
    }
    let at = |t: u64| {
        let k = reports.partition_point(|r| r.0 <= t).max(1);
        let a = reports[k - 1];
        let Some(&b) = reports.get(k) else {
            return a.1 as f64;
        };
        let f = (t - a.0) as f64 / (b.0 - a.0).max(1) as f64;
        a.1 as f64 + f * (b.1 - a.1) as f64
    };
    Some((at(to_ms) - at(from_ms)) / ((to_ms - from_ms) as f64 / 1000.0))
}

/// What the hint server remembers about a node between windows.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct NodeState {
    pub features: FeatureBuilder,
    /// One governor per controller kind in use on this node.
    pub groups: BTreeMap<String, Governor>,
    pub last_window_end_ms: u64,
    pub last_seq: u64,
    pub last_p95_ms: Option<f64>,
    pub last_anomaly: f64,
    pub last_predicted_ms: Option<f64>,
    /// Windows this state has seen.
    pub windows: u64,
    /// The backend's concurrency limit (applies to the `pid` group: TokenFlow's own controller).
    #[serde(default)]
    pub compute: ComputeLimit,
}

/// Everything one decision produced, for metrics and tests.
pub struct Outcome {
    pub hints: Vec<Hint>,
    pub features: Option<Features>,
}

/// A window arrived: update features and every group of the node's clients.
pub fn on_window(
    st: &mut NodeState,
    w: &TelemetryWindow,
    clients: &[(String, ClientConfig)],
    models: Option<&Models>,
    dispatched: &Dispatched,
    now_ms: u64,
    interval_ms: u64,
) -> Outcome {
    if w.end_unix_ms <= st.last_window_end_ms && st.windows > 0 {
        // Already seen (redelivered after a replica died): nothing new.
        return Outcome {
            hints: Vec::new(),
            features: None,
        };
    }
    let f = st.features.push(w);
    st.windows += 1;
    st.last_window_end_ms = w.end_unix_ms;
    st.last_seq = w.seq;
    st.last_p95_ms = f.p95_ms.or(st.last_p95_ms);
    st.last_anomaly = models.map_or(0.0, |m| m.anomaly(&f));
    st.last_predicted_ms = models.map(|m| m.forecast_h1(&f));
    let load = ServerLoad::from_window(w);
    let o = Observation {
        now: w.end_unix_ms as f64 / 1000.0,
        p95_rtt_ms: f.p95_ms,
        p50_rtt_ms: f.p50_ms,
        mean_rtt_ms: f.mean_ms,
        delivered_mbit_s: f.p95_ms.map(|_| f.get("throughput_mbit_s")),
        predicted_p95_ms: st.last_predicted_ms,
        anomaly: st.last_anomaly,
        inflight: None,
        retransmits_per_s: f.get("retransmits_per_s"),
        backend_queued: load.is_some_and(|l| l.queue_p95_ms > compute::QUEUE_OBJECTIVE_MS),
        stale: false,
    };
    let sent = |id: &str| {
        dispatched
            .get(id)
            .and_then(|r| dispatched_rps(r, w.start_unix_ms, w.end_unix_ms))
    };
    let hints = decide(
        st,
        &w.node_id,
        clients,
        &o,
        &sent,
        load,
        now_ms,
        interval_ms,
    );
    Outcome {
        hints,
        features: Some(f),
    }
}

/// No window for [`STALE_INTERVALS`]: conservative hints, marked stale.
pub fn on_stale(
    st: &mut NodeState,
    node_id: &str,
    clients: &[(String, ClientConfig)],
    now_ms: u64,
    interval_ms: u64,
) -> Vec<Hint> {
    let o = Observation {
        now: now_ms as f64 / 1000.0,
        p95_rtt_ms: st.last_p95_ms,
        p50_rtt_ms: None,
        mean_rtt_ms: None,
        delivered_mbit_s: None,
        predicted_p95_ms: None,
        anomaly: st.last_anomaly,
        inflight: None,
        retransmits_per_s: 0.0,
        backend_queued: false,
        stale: true,
    };
    decide(
        st,
        node_id,
        clients,
        &o,
        &|_| None,
        None,
        now_ms,
        interval_ms,
    )
}

pub fn is_stale(st: &NodeState, now_ms: u64, interval_ms: u64) -> bool {
    st.windows == 0 || now_ms.saturating_sub(st.last_window_end_ms) > STALE_INTERVALS * interval_ms
}

/// `sent`: a client's requests per second dispatched in the window, where its pacer reported them.
#[allow(clippy::too_many_arguments)]
fn decide(
    st: &mut NodeState,
    node_id: &str,
    clients: &[(String, ClientConfig)],
    obs: &Observation,
    sent: &dyn Fn(&str) -> Option<f64>,
    load: Option<ServerLoad>,
    now_ms: u64,
    interval_ms: u64,
) -> Vec<Hint> {
    let mine: Vec<&(String, ClientConfig)> = clients
        .iter()
        .filter(|(_, c)| c.node_id == node_id)
        .collect();
    let mut hints = Vec::with_capacity(mine.len());
    let mut in_use = Vec::new();
    for kind in ControllerKind::ALL {
        let members: Vec<&(String, ClientConfig)> = mine
            .iter()
            .copied()
            .filter(|(_, c)| c.controller == kind)
            .collect();
        if members.is_empty() {
            continue;
        }
        in_use.push(kind.as_str().to_string());
        let limits = group_limits(&members);
        let gov = st
            .groups
            .entry(kind.as_str().to_string())
            .or_insert_with(|| Governor::new(kind, limits));
        gov.limits = limits;
        let mut d = gov.update(obs);
        // TokenFlow's own controller also keeps the backend's queue short; the baselines are
        // the published algorithms, on RTT alone.
        let caps = if kind == ControllerKind::Pid {
            st.compute
                .update(load, f64::from(limits.max_concurrency))
                .map(|limit| {
                    if let Some(why) = st.compute.describe() {
                        d.reason = format!("{}; {why}", d.reason);
                    }
                    compute::split(
                        limit,
                        &members
                            .iter()
                            .map(|(_, c)| (c.class, c.weight, c.max_concurrency))
                            .collect::<Vec<_>>(),
                    )
                })
        } else {
            None
        };
        // The controller's rate is a fraction of the group's maximum; that fraction of the
        // group's maximum cost (requests weighted by `request_cost`) is shared in cost units,
        // then turned back into each client's requests per second. With every cost 1 this is
        // the controller's rate, shared as requests.
        let max_cost: f64 = members
            .iter()
            .map(|(_, c)| c.max_rps * c.request_cost)
            .sum();
        let shares = share::share(
            d.rate_rps / limits.max_rps.max(1e-9) * max_cost,
            &members
                .iter()
                .map(|(_, c)| share::Member {
                    class: c.class,
                    weight: c.weight,
                    min_rps: c.min_rps * c.request_cost,
                    max_rps: c.max_rps * c.request_cost,
                })
                .collect::<Vec<_>>(),
        );
        for (i, ((id, c), cost_rate)) in members.iter().zip(shares).enumerate() {
            let rate = cost_rate / c.request_cost;
            let mut h = hint(id, c, kind, &d, rate, st, now_ms, interval_ms);
            if let Some(cap) = caps.as_ref().and_then(|c| c.get(i)) {
                h.max_concurrency = h.max_concurrency.min(*cap);
            }
            // What the client's pacer says it dispatched in the window, beside what it is now
            // allowed: whether its users fill the allowance, and whether it paces at all.
            if let Some(s) = sent(id) {
                h.reason = format!("{}; this client sent {s:.1} req/s in the window", h.reason);
            }
            hints.push(h);
        }
    }
    // Groups nobody uses any more are forgotten, and with the `pid` group its backend limit: a
    // later group starts without the last one's.
    st.groups.retain(|k, _| in_use.contains(k));
    if !st.groups.contains_key(ControllerKind::Pid.as_str()) {
        st.compute = ComputeLimit::default();
    }
    hints
}

fn group_limits(members: &[&(String, ClientConfig)]) -> Limits {
    let interactive: Vec<f64> = members
        .iter()
        .filter(|(_, c)| c.class == ClientClass::Interactive)
        .map(|(_, c)| c.setpoint_ms)
        .collect();
    let setpoint = if interactive.is_empty() {
        members
            .iter()
            .map(|(_, c)| c.setpoint_ms)
            .fold(f64::INFINITY, f64::min)
    } else {
        interactive.iter().copied().fold(f64::INFINITY, f64::min)
    };
    Limits {
        setpoint_ms: setpoint,
        min_rps: members
            .iter()
            .map(|(_, c)| c.min_rps * c.request_cost)
            .sum(),
        max_rps: members
            .iter()
            .map(|(_, c)| c.max_rps * c.request_cost)
            .sum(),
        max_concurrency: members.iter().map(|(_, c)| c.max_concurrency).sum(),
    }
}

/// A client's own limits.
fn own_limits(c: &ClientConfig) -> Limits {
    Limits {
        setpoint_ms: c.setpoint_ms,
        min_rps: c.min_rps,
        max_rps: c.max_rps,
        max_concurrency: c.max_concurrency,
    }
}

/// What a hint says about the node and its controller, the same for every client of a group.
struct Basis {
    health: f64,
    anomaly: f64,
    predicted_ms: Option<f64>,
    observed_ms: Option<f64>,
    controller: ControllerKind,
    reason: String,
    stale: bool,
}

/// A client's hint at `rate` (concurrency and tokens/s follow from the rate and its settings).
fn make(id: &str, c: &ClientConfig, rate: f64, b: Basis, now_ms: u64, interval_ms: u64) -> Hint {
    Hint {
        schema_version: HINT_SCHEMA_VERSION,
        client_id: id.to_string(),
        node_id: c.node_id.clone(),
        rate_limit_rps: rate,
        max_concurrency: concurrency(rate, &own_limits(c)),
        tokens_per_s: rate * c.tokens_per_request,
        health: b.health,
        anomaly_score: b.anomaly,
        predicted_rtt_ms: b.predicted_ms,
        observed_rtt_ms: b.observed_ms,
        controller: b.controller,
        reason: b.reason,
        issued_at_unix_ms: now_ms,
        ttl_ms: STALE_INTERVALS * interval_ms,
        stale: b.stale,
    }
}

#[allow(clippy::too_many_arguments)]
fn hint(
    id: &str,
    c: &ClientConfig,
    kind: ControllerKind,
    d: &Decision,
    rate: f64,
    st: &NodeState,
    now_ms: u64,
    interval_ms: u64,
) -> Hint {
    let b = Basis {
        health: d.health,
        anomaly: st.last_anomaly,
        predicted_ms: st.last_predicted_ms,
        observed_ms: st.last_p95_ms,
        controller: kind,
        reason: d.reason.clone(),
        stale: d.stale,
    };
    make(id, c, rate, b, now_ms, interval_ms)
}

/// The hint for a registered client that has none yet (no window seen for its node, or the last
/// hint expired): its minimum rate, marked stale.
pub fn conservative(id: &str, c: &ClientConfig, now_ms: u64, interval_ms: u64, why: &str) -> Hint {
    let b = Basis {
        health: 0.0,
        anomaly: 0.0,
        predicted_ms: None,
        observed_ms: None,
        controller: c.controller,
        reason: why.to_string(),
        stale: true,
    };
    make(
        id,
        c,
        own_limits(c).stale_rps(c.min_rps),
        b,
        now_ms,
        interval_ms,
    )
}

#[cfg(test)]
mod tests {
    use tokenflow_schema::{ClientConfigInput, LatencySummary, ProbeLatency};

    use super::*;

    fn client(
        class: ClientClass,
        controller: ControllerKind,
        max_concurrency: u32,
    ) -> ClientConfig {
        ClientConfig::merge(
            None,
            &ClientConfigInput {
                node_id: Some("n".into()),
                controller: Some(controller),
                class: Some(class),
                max_concurrency: Some(max_concurrency),
                ..Default::default()
            },
        )
        .unwrap()
    }

    /// A calm network, and a backend that runs 8 requests with the rest queued for `queue_us`.
    fn window(seq: u64, queue_us: u64) -> TelemetryWindow {
        let mut w = crate::simulate::node_window("n", seq, 10_000 + seq * 1_000, 1_000, 20_000);
        let span = |label: &str, p95_us: u64, mean_us: u64| ProbeLatency {
            label: label.into(),
            target: "backend:a..b".into(),
            latency: LatencySummary {
                samples: 8,
                p95_us,
                mean_us,
                ..Default::default()
            },
        };
        w.uprobes = vec![
            span(compute::QUEUE_SPAN, queue_us, queue_us / 2),
            span(compute::SERVICE_SPAN, 1_100_000, 1_000_000),
        ];
        w
    }

    #[test]
    fn a_queueing_backend_caps_the_pid_groups_concurrency_interactive_first() {
        let clients = vec![
            (
                "batch".to_string(),
                client(ClientClass::Batch, ControllerKind::Pid, 24),
            ),
            (
                "chat".to_string(),
                client(ClientClass::Interactive, ControllerKind::Pid, 2),
            ),
            (
                "baseline".to_string(),
                client(ClientClass::Batch, ControllerKind::Gradient2, 24),
            ),
        ];
        let mut st = NodeState::default();
        // A few calm windows, so the RTT controllers climb out of their start-up rates; then the
        // backend queues for 2 s, two windows in a row (one alone is a burst).
        let mut hints = Vec::new();
        for seq in 1..=12 {
            let queue_us = if seq < 11 { 20_000 } else { 2_000_000 };
            let now = 10_000 + seq * 1_000;
            hints = on_window(
                &mut st,
                &window(seq, queue_us),
                &clients,
                None,
                &Dispatched::new(),
                now,
                1_000,
            )
            .hints;
        }
        let get = |id: &str| hints.iter().find(|h| h.client_id == id).unwrap();
        // 8 busy slots: the interactive client keeps its 2, the batch client gets the other 6.
        assert_eq!(get("chat").max_concurrency, 2);
        assert_eq!(get("batch").max_concurrency, 6);
        assert!(get("batch").reason.contains("backend queue p95 2000 ms"));
        // The baseline controllers are the published algorithms, on RTT alone.
        assert!(!get("baseline").reason.contains("backend queue"));
    }

    #[test]
    fn the_backend_limit_goes_with_the_pid_group() {
        let pid = vec![(
            "batch".to_string(),
            client(ClientClass::Batch, ControllerKind::Pid, 24),
        )];
        let other = vec![(
            "baseline".to_string(),
            client(ClientClass::Batch, ControllerKind::Gradient2, 24),
        )];
        let mut st = NodeState::default();
        let mut seq = 0;
        let mut next = |st: &mut NodeState, clients: &[(String, ClientConfig)], queue_us| {
            seq += 1;
            on_window(
                st,
                &window(seq, queue_us),
                clients,
                None,
                &Dispatched::new(),
                10_000 + seq * 1_000,
                1_000,
            )
            .hints
        };
        next(&mut st, &pid, 2_000_000);
        let h = next(&mut st, &pid, 2_000_000);
        assert!(st.compute.describe().is_some(), "no limit set: {h:?}");
        // The pid client leaves (another arm's client in its place), then a new pid client comes:
        // it starts as on a node that never had a limit.
        next(&mut st, &other, 20_000);
        let h = next(&mut st, &pid, 20_000);
        assert!(!h[0].reason.contains("backend queue"), "{h:?}");
        assert_eq!(st.compute.describe(), None, "no limit");
    }

    #[test]
    fn a_groups_rate_is_shared_by_request_cost() {
        let with = |class, max_rps: f64, cost: f64| {
            ClientConfig::merge(
                None,
                &ClientConfigInput {
                    node_id: Some("n".into()),
                    class: Some(class),
                    max_rps: Some(max_rps),
                    request_cost: Some(cost),
                    ..Default::default()
                },
            )
            .unwrap()
        };
        // 100 KB uploads beside 0.4 KB chat prompts, priced in KB.
        let clients = vec![
            (
                "uploads".to_string(),
                with(ClientClass::Batch, 100.0, 100.0),
            ),
            (
                "chat".to_string(),
                with(ClientClass::Interactive, 10.0, 0.4),
            ),
        ];
        let max_cost = 100.0 * 100.0 + 10.0 * 0.4;
        // A congested start: the group starts at a fraction of its maximum, in KB/s.
        let mut st = NodeState::default();
        let obs = Observation {
            now: 1.0,
            p95_rtt_ms: Some(300.0),
            p50_rtt_ms: None,
            mean_rtt_ms: None,
            delivered_mbit_s: None,
            predicted_p95_ms: None,
            anomaly: 0.0,
            inflight: None,
            retransmits_per_s: 0.0,
            backend_queued: false,
            stale: false,
        };
        let hints = decide(&mut st, "n", &clients, &obs, &|_| None, None, 1_000, 1_000);
        let rate = |hs: &[Hint], id: &str| {
            hs.iter()
                .find(|h| h.client_id == id)
                .unwrap()
                .rate_limit_rps
        };
        let (uploads, chat) = (rate(&hints, "uploads"), rate(&hints, "chat"));
        let fraction = (uploads * 100.0 + chat * 0.4) / max_cost;
        assert_eq!(chat, 10.0, "interactive first: {hints:?}");
        assert!(fraction > 0.0 && fraction < 1.0, "{fraction}");
        // The same start with every cost 1: the chat client's requests are reserved like uploads,
        // and the uploads keep what is left of the same fraction.
        let plain = vec![
            ("uploads".to_string(), with(ClientClass::Batch, 100.0, 1.0)),
            (
                "chat".to_string(),
                with(ClientClass::Interactive, 10.0, 1.0),
            ),
        ];
        let h2 = decide(
            &mut NodeState::default(),
            "n",
            &plain,
            &obs,
            &|_| None,
            None,
            1_000,
            1_000,
        );
        let up2 = rate(&h2, "uploads");
        assert!(
            (up2 + rate(&h2, "chat") - fraction * 110.0).abs() < 1e-6,
            "{h2:?}"
        );
        assert!(uploads > up2, "with costs {uploads} req/s, without {up2}");
    }

    #[test]
    fn what_was_dispatched_is_read_from_the_counter_between_the_windows_edges() {
        // Reports every 100 ms of a pacer sending 6 requests a second, from t = 1000 ms.
        let six: Vec<(u64, u64)> = (0..=30).map(|i| (1_000 + i * 100, i * 6 / 10)).collect();
        let r = dispatched_rps(&six, 1_500, 2_500).unwrap();
        assert!((r - 6.0).abs() < 0.7, "{r}");
        // Between reports the counter is interpolated: 2.5 s at 6/s from 0 is 15, not 12 or 18.
        let even = [(1_000, 0), (2_000, 6), (3_000, 12), (4_000, 18)];
        assert_eq!(dispatched_rps(&even, 1_500, 3_500), Some(6.0));
        // A window that starts before the first report, or ends long after the newest (the
        // pacer stopped), is not covered; one ending a report's lag after it is read up to it.
        assert_eq!(dispatched_rps(&even, 500, 1_500), None);
        assert_eq!(dispatched_rps(&even, 3_000, 4_250), Some(6.0));
        assert_eq!(dispatched_rps(&even, 3_500, 4_400), None);
        // A counter that went back (the pacer restarted) says nothing.
        assert_eq!(
            dispatched_rps(&[(1_000, 50), (2_000, 3), (3_000, 9)], 1_500, 2_500),
            None
        );
        assert_eq!(dispatched_rps(&[], 1_500, 2_500), None);
    }

    #[test]
    fn each_hint_says_what_its_client_sent_in_the_window_where_it_reported() {
        let with = |class| {
            ClientConfig::merge(
                None,
                &ClientConfigInput {
                    node_id: Some("n".into()),
                    class: Some(class),
                    ..Default::default()
                },
            )
            .unwrap()
        };
        let clients = vec![
            ("uploads".to_string(), with(ClientClass::Batch)),
            ("chat".to_string(), with(ClientClass::Interactive)),
        ];
        let obs = Observation {
            now: 1.0,
            p95_rtt_ms: Some(40.0),
            ..Default::default()
        };
        let hints = decide(
            &mut NodeState::default(),
            "n",
            &clients,
            &obs,
            &|id| (id == "uploads").then_some(6.04),
            None,
            1_000,
            1_000,
        );
        let reason = |id: &str| &hints.iter().find(|h| h.client_id == id).unwrap().reason;
        assert!(
            reason("uploads").ends_with("; this client sent 6.0 req/s in the window"),
            "{}",
            reason("uploads")
        );
        // A client whose pacer does not report (an old one, or one without the token).
        assert!(!reason("chat").contains("sent"), "{}", reason("chat"));
    }
}
