//! Following the hint server: the SSE stream of the client's hint, polling as the fallback, and a
//! watchdog that decays the gate to a safe floor when hints stop (TTL passed, server gone) —
//! never to unbounded sending.

use std::{
    collections::BTreeMap,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use eventsource_stream::Eventsource;
use futures_util::StreamExt;
use tokenflow_schema::Hint;

use crate::{
    gate::{Gate, Limit},
    route::Target,
};

/// Where a followed hint's limit goes: the gate itself, or one node's share of it.
pub trait LimitSink: Send + Sync {
    fn set(&self, limit: Limit);
    fn limit(&self) -> Limit;
}

impl LimitSink for Gate {
    fn set(&self, limit: Limit) {
        Gate::set(self, limit);
    }

    fn limit(&self) -> Limit {
        Gate::limit(self)
    }
}

/// The id under which a pacer follows one node's hint: `CLIENT.NODE`.
pub fn node_client(client_id: &str, node: &str) -> String {
    format!("{client_id}.{node}")
}

/// Backends on several nodes (`--target URL#NODE`): one hint per node, each node's limit kept here
/// and handed to its backends as their routing weight; the gate obeys the sum of the nodes' limits.
pub struct NodeLimits {
    gate: Arc<Gate>,
    targets: Arc<Vec<Target>>,
    limits: Mutex<BTreeMap<String, Limit>>,
}

impl NodeLimits {
    /// Every node starts at `safe` until its first hint.
    pub fn new(gate: Arc<Gate>, targets: Arc<Vec<Target>>, safe: Limit) -> Arc<Self> {
        let limits = targets
            .iter()
            .filter_map(|t| t.node.clone())
            .map(|n| (n, safe))
            .collect();
        let this = Arc::new(Self {
            gate,
            targets,
            limits: Mutex::new(limits),
        });
        this.gate.set(this.total());
        this
    }

    /// The sink for one node's hint.
    pub fn node(self: &Arc<Self>, node: &str) -> Arc<dyn LimitSink> {
        Arc::new(NodeSlot {
            node: node.to_string(),
            all: self.clone(),
        })
    }

    fn total(&self) -> Limit {
        let limits = self.limits.lock().unwrap_or_else(|e| e.into_inner());
        limits.values().fold(
            Limit {
                rate: 0.0,
                concurrency: 0,
            },
            |a, l| Limit {
                rate: a.rate + l.rate,
                concurrency: a.concurrency.saturating_add(l.concurrency),
            },
        )
    }
}

struct NodeSlot {
    node: String,
    all: Arc<NodeLimits>,
}

impl LimitSink for NodeSlot {
    fn set(&self, limit: Limit) {
        self.all
            .limits
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(self.node.clone(), limit);
        let mine: Vec<&Target> = self
            .all
            .targets
            .iter()
            .filter(|t| t.node.as_deref() == Some(&self.node))
            .collect();
        for t in &mine {
            t.set_allowed_rps(limit.rate / mine.len() as f64);
        }
        self.all.gate.set(self.all.total());
    }

    fn limit(&self) -> Limit {
        self.all
            .limits
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(&self.node)
            .copied()
            .unwrap_or(Limit {
                rate: 0.0,
                concurrency: 0,
            })
    }
}

#[derive(Clone, Debug)]
pub struct HintSource {
    /// Hint server base URL, e.g. http://127.0.0.1:8700
    pub url: String,
    pub client_id: String,
    /// What the gate falls back to without a fresh hint.
    pub safe: Limit,
    /// Bearer token for the hint server's writes: with it the pacer reports what it dispatched.
    pub token: Option<String>,
}

/// How often the pacer tells the hint server how many requests it has dispatched: often enough
/// that the server reads each one-second telemetry window's share to a tenth of a second.
pub const DISPATCH_REPORT_EVERY: Duration = Duration::from_millis(100);

/// Requests dispatched so far, to the backends a hint governs.
pub type Dispatched = Arc<dyn Fn() -> u64 + Send + Sync>;

/// Dispatched so far to `targets` (those of `node`, or all of them).
pub fn dispatched_to(targets: Arc<Vec<Target>>, node: Option<String>) -> Dispatched {
    Arc::new(move || {
        targets
            .iter()
            .filter(|t| node.is_none() || t.node == node)
            .map(|t| t.sent.load(std::sync::atomic::Ordering::Relaxed))
            .sum()
    })
}

/// Reports `dispatched` to `POST /v1/clients/{id}/dispatched` every [`DISPATCH_REPORT_EVERY`], for
/// as long as the process runs. The hint server reads from the counter what this client sent in
/// each telemetry window and states it in the client's hint (its users may leave part of the
/// allowance unused). A refusal (no such client yet, a wrong token) or an unreachable server is
/// logged once for as long as it lasts, and retried; without a token nothing is reported.
pub async fn report_dispatched(http: reqwest::Client, src: HintSource, dispatched: Dispatched) {
    let Some(token) = src.token.clone() else {
        return;
    };
    let url = format!("{}/v1/clients/{}/dispatched", src.url, src.client_id);
    let mut tick = tokio::time::interval(DISPATCH_REPORT_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    // The last failure logged (its HTTP status, 0 when unreachable): each new kind is logged once,
    // a success clears it.
    let mut failing: Option<u16> = None;
    loop {
        tick.tick().await;
        let body = tokenflow_schema::DispatchReport {
            requests_total: dispatched(),
        };
        let r = http
            .post(&url)
            .bearer_auth(&token)
            .json(&body)
            .timeout(Duration::from_secs(1))
            .send()
            .await;
        let (kind, why) = match r {
            Ok(r) if r.status().is_success() => {
                failing = None;
                continue;
            }
            Ok(r) => (
                r.status().as_u16(),
                format!(
                    "HTTP {}: {}",
                    r.status(),
                    r.text().await.unwrap_or_default()
                ),
            ),
            Err(e) => (0, e.to_string()),
        };
        if failing != Some(kind) {
            failing = Some(kind);
            tracing::warn!("reporting dispatched requests to {url}: {why} (retrying)");
        }
    }
}

/// The latest hint and when it stops being valid.
#[derive(Default)]
pub struct Latest {
    pub hint: Option<Hint>,
    pub valid_until: Option<Instant>,
    pub fallbacks: u64,
}

pub fn apply(gate: &dyn LimitSink, latest: &Mutex<Latest>, h: Hint) {
    let limit = Limit {
        rate: h.rate_limit_rps.max(0.0),
        concurrency: h.max_concurrency.max(1) as usize,
    };
    gate.set(limit);
    if let Ok(mut l) = latest.lock() {
        l.valid_until = Some(Instant::now() + Duration::from_millis(h.ttl_ms.max(1)));
        l.hint = Some(h);
    }
}

/// Runs until the process ends: SSE first, polling when the stream fails, the watchdog always.
/// Reports what was dispatched alongside, when `dispatched` is given (see [`report_dispatched`]).
pub async fn follow(
    src: HintSource,
    gate: Arc<dyn LimitSink>,
    latest: Arc<Mutex<Latest>>,
    dispatched: Option<Dispatched>,
) {
    let http = reqwest::Client::builder()
        .connect_timeout(Duration::from_secs(1))
        .build()
        .unwrap_or_default();
    tokio::spawn(watchdog(src.safe, gate.clone(), latest.clone()));
    if let Some(d) = dispatched {
        tokio::spawn(report_dispatched(http.clone(), src.clone(), d));
    }
    loop {
        if let Err(e) = stream(&http, &src, &gate, &latest).await {
            tracing::debug!("hint stream: {e:#}; polling");
        }
        // Poll for a while, then try the stream again.
        for _ in 0..5 {
            let url = format!("{}/v1/hints/{}", src.url, src.client_id);
            match http.get(&url).timeout(Duration::from_secs(1)).send().await {
                Ok(r) if r.status().is_success() => {
                    if let Ok(h) = r.json::<Hint>().await {
                        apply(&*gate, &latest, h);
                    }
                }
                Ok(r) => tracing::debug!("hint poll: HTTP {}", r.status()),
                Err(e) => tracing::debug!("hint poll: {e}"),
            }
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
    }
}

async fn stream(
    http: &reqwest::Client,
    src: &HintSource,
    gate: &Arc<dyn LimitSink>,
    latest: &Mutex<Latest>,
) -> anyhow::Result<()> {
    let url = format!("{}/v1/hints/{}/stream", src.url, src.client_id);
    let r = http.get(&url).send().await?.error_for_status()?;
    let mut events = r.bytes_stream().eventsource();
    while let Some(ev) = events.next().await {
        let ev = ev?;
        if let Ok(h) = serde_json::from_str::<Hint>(&ev.data) {
            apply(&**gate, latest, h);
        }
    }
    anyhow::bail!("the hint stream ended")
}

/// Past the hint's TTL, the gate decays to the safe floor (and never above the last hint).
async fn watchdog(safe: Limit, gate: Arc<dyn LimitSink>, latest: Arc<Mutex<Latest>>) {
    let mut tick = tokio::time::interval(Duration::from_millis(100));
    loop {
        tick.tick().await;
        let expired = latest
            .lock()
            .map(|l| l.valid_until.is_none_or(|t| Instant::now() > t))
            .unwrap_or(true);
        if expired {
            let cur = gate.limit();
            let floor = Limit {
                rate: cur.rate.min(safe.rate),
                concurrency: cur.concurrency.min(safe.concurrency),
            };
            if floor != cur {
                gate.set(floor);
                if let Ok(mut l) = latest.lock() {
                    l.fallbacks += 1;
                }
                tracing::warn!(rate = floor.rate, "no fresh hint: pacing at the safe floor");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn the_gate_obeys_the_sum_of_the_nodes_hints_and_each_backend_learns_its_own() {
        let safe = Limit {
            rate: 0.5,
            concurrency: 1,
        };
        let gate = Gate::new(Limit::UNLIMITED);
        let targets = Arc::new(vec![
            Target::parse("http://a1:8000#a").unwrap(),
            Target::parse("http://a2:8000#a").unwrap(),
            Target::parse("http://b:8000#b").unwrap(),
        ]);
        let shares = NodeLimits::new(gate.clone(), targets.clone(), safe);
        assert_eq!(
            gate.limit(),
            Limit {
                rate: 1.0,
                concurrency: 2
            },
            "both nodes at the floor until their first hint"
        );
        let (a, b) = (shares.node("a"), shares.node("b"));
        a.set(Limit {
            rate: 30.0,
            concurrency: 8,
        });
        b.set(Limit {
            rate: 2.0,
            concurrency: 2,
        });
        assert_eq!(
            gate.limit(),
            Limit {
                rate: 32.0,
                concurrency: 10
            }
        );
        assert_eq!(a.limit().rate, 30.0);
        // Node a's rate is shared by its two backends.
        assert_eq!(targets[0].allowed_rps(), Some(15.0));
        assert_eq!(targets[1].allowed_rps(), Some(15.0));
        assert_eq!(targets[2].allowed_rps(), Some(2.0));
    }
}
