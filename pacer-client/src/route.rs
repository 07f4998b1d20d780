//! Several backends (one per node, as vLLM replicas are): each request goes to the healthy
//! backend with the fewest tokens in flight — prompt and answer, not just requests, since one
//! 100 KB prompt loads a server more than ten short chats. When each backend names its node
//! (`URL#NODE`) and the pacer follows hints, a backend whose node's hint allows more than it has
//! lately been sent has headroom: the request goes to the one with the fewest tokens among those,
//! or, when none has headroom, to the least over its node's rate — so a congested node gets what
//! its hint allows and the rest goes elsewhere. A backend that refuses a connection, times out,
//! answers 5xx or cuts its stream off before its first token is marked down and the request
//! moves to another one, once; a health check every second brings it back.

use std::{
    sync::{
        Mutex,
        atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering},
    },
    time::{Duration, Instant},
};

/// Time constant of a target's recent request rate, seconds.
const RECENT_TAU_S: f64 = 1.0;

/// Requests sent lately: a count that decays with [`RECENT_TAU_S`], so count / τ estimates the
/// current request rate.
#[derive(Default)]
struct Recent {
    count: f64,
    at: Option<Instant>,
}

impl Recent {
    fn decayed(&self, now: Instant) -> f64 {
        self.at.map_or(0.0, |t| {
            self.count * (-now.saturating_duration_since(t).as_secs_f64() / RECENT_TAU_S).exp()
        })
    }
}

/// One backend and its load as this pacer sees it.
pub struct Target {
    pub url: String,
    /// The node the backend runs on (`--target URL#NODE`), whose hint weighs it.
    pub node: Option<String>,
    /// Requests in flight.
    pub requests: AtomicUsize,
    /// Requests sent to it since the start (a retry on another backend counts there too).
    pub sent: AtomicU64,
    /// Estimated tokens in flight (prompt + `max_tokens` per request).
    pub tokens: AtomicU64,
    healthy: AtomicBool,
    /// Requests/s its node's hint allows this client (`f64` bits; 0 = no hint yet).
    allowed_rps: AtomicU64,
    recent: Mutex<Recent>,
}

impl Target {
    pub fn new(url: &str) -> Self {
        Self {
            url: url.trim_end_matches('/').to_string(),
            node: None,
            requests: AtomicUsize::new(0),
            sent: AtomicU64::new(0),
            tokens: AtomicU64::new(0),
            healthy: AtomicBool::new(true),
            allowed_rps: AtomicU64::new(0),
            recent: Mutex::new(Recent::default()),
        }
    }

    /// `URL` or `URL#NODE` (a URL fragment is never sent to the server: it names the node here).
    pub fn parse(spec: &str) -> anyhow::Result<Self> {
        let (url, node) = match spec.split_once('#') {
            Some((url, node)) => {
                anyhow::ensure!(
                    !node.is_empty()
                        && node
                            .chars()
                            .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c)),
                    "--target {spec}: the node after `#` must be a node id (letters, digits, `-_.`)"
                );
                (url, Some(node.to_string()))
            }
            None => (spec, None),
        };
        anyhow::ensure!(
            url.starts_with("http://") || url.starts_with("https://"),
            "--target {spec}: give an http:// or https:// URL"
        );
        Ok(Self {
            node,
            ..Self::new(url)
        })
    }

    /// The rate this backend's node allows, once its first hint has arrived.
    pub fn allowed_rps(&self) -> Option<f64> {
        let r = f64::from_bits(self.allowed_rps.load(Ordering::Relaxed));
        (r > 0.0).then_some(r)
    }

    /// Requests/s sent to this backend lately (one-second time constant).
    pub fn recent_rps(&self, now: Instant) -> f64 {
        self.recent
            .lock()
            .map_or(0.0, |r| r.decayed(now) / RECENT_TAU_S)
    }

    fn record_sent(&self, now: Instant) {
        self.sent.fetch_add(1, Ordering::Relaxed);
        if let Ok(mut r) = self.recent.lock() {
            r.count = r.decayed(now) + 1.0;
            r.at = Some(now);
        }
    }

    pub fn set_allowed_rps(&self, rps: f64) {
        self.allowed_rps
            .store(rps.max(0.0).to_bits(), Ordering::Relaxed);
    }

    pub fn healthy(&self) -> bool {
        self.healthy.load(Ordering::Relaxed)
    }

    pub fn set_healthy(&self, up: bool) {
        if self.healthy.swap(up, Ordering::Relaxed) != up {
            if up {
                tracing::info!(target = %self.url, "backend healthy again");
            } else {
                tracing::warn!(target = %self.url, "backend down: routing around it");
            }
        }
    }
}

/// Parses `--target` specs; they name a node each (`URL#NODE`) or none does. Returns the targets
/// and the nodes they name.
pub fn parse_targets(
    specs: &[String],
) -> anyhow::Result<(Vec<Target>, std::collections::BTreeSet<String>)> {
    let targets = specs
        .iter()
        .map(|s| Target::parse(s))
        .collect::<anyhow::Result<Vec<_>>>()?;
    let nodes: std::collections::BTreeSet<String> =
        targets.iter().filter_map(|t| t.node.clone()).collect();
    anyhow::ensure!(
        nodes.is_empty() || targets.iter().all(|t| t.node.is_some()),
        "give every --target a #NODE, or none"
    );
    Ok((targets, nodes))
}

/// Tokens a request is expected to hold on its backend: its prompt (about 4 bytes a token) and
/// the answer it may generate.
pub fn cost(prompt_bytes: usize, max_tokens: u32) -> u64 {
    (prompt_bytes as u64).div_ceil(4) + u64::from(max_tokens)
}

/// The healthy target with the fewest tokens in flight, other than `except`; when none is
/// healthy, the least loaded of all (a health check may simply not have caught up). Once every
/// target's node has sent a hint, only targets sent less than their node allows compete on tokens;
/// when none is under, the least over its node's rate is taken.
pub fn pick(targets: &[Target], except: Option<usize>) -> Option<usize> {
    pick_at(targets, except, Instant::now())
}

pub fn pick_at(targets: &[Target], except: Option<usize>, now: Instant) -> Option<usize> {
    let weighted = targets.iter().all(|t| t.allowed_rps().is_some());
    let key = |i: &usize| {
        let t = &targets[*i];
        let tokens = t.tokens.load(Ordering::Relaxed) as f64;
        let requests = t.requests.load(Ordering::Relaxed);
        let used = if weighted {
            t.recent_rps(now) / t.allowed_rps().unwrap_or(1.0).max(1e-3)
        } else {
            0.0
        };
        if used < 1.0 {
            (0u8, tokens, requests)
        } else {
            (1u8, used, requests)
        }
    };
    let least = |a: &usize, b: &usize| {
        let (ka, kb) = (key(a), key(b));
        ka.0.cmp(&kb.0)
            .then(ka.1.total_cmp(&kb.1))
            .then(ka.2.cmp(&kb.2))
    };
    let candidates = || (0..targets.len()).filter(|&i| Some(i) != except);
    candidates()
        .filter(|&i| targets[i].healthy())
        .min_by(least)
        .or_else(|| candidates().min_by(least))
}

/// Holds a request's share of a target's load until dropped.
pub struct Load<'a> {
    target: &'a Target,
    cost: u64,
}

impl<'a> Load<'a> {
    pub fn add(target: &'a Target, cost: u64) -> Self {
        Self::add_at(target, cost, Instant::now())
    }

    pub fn add_at(target: &'a Target, cost: u64, now: Instant) -> Self {
        target.record_sent(now);
        target.requests.fetch_add(1, Ordering::Relaxed);
        target.tokens.fetch_add(cost, Ordering::Relaxed);
        Self { target, cost }
    }
}

impl Drop for Load<'_> {
    fn drop(&mut self) {
        self.target.requests.fetch_sub(1, Ordering::Relaxed);
        self.target.tokens.fetch_sub(self.cost, Ordering::Relaxed);
    }
}

/// Checks `GET /health` of every target each second, for as long as the run lasts.
pub async fn health_checks(targets: std::sync::Arc<Vec<Target>>) {
    let http = reqwest::Client::builder()
        .connect_timeout(Duration::from_millis(500))
        .timeout(Duration::from_secs(1))
        .build()
        .unwrap_or_default();
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    loop {
        tick.tick().await;
        for t in targets.iter() {
            let up = http
                .get(format!("{}/health", t.url))
                .send()
                .await
                .is_ok_and(|r| r.status().is_success());
            t.set_healthy(up);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn picks_the_fewest_tokens_among_healthy_targets() {
        let ts = vec![Target::new("a"), Target::new("b"), Target::new("c")];
        // One long prompt on a outweighs three short chats on b.
        let _long = Load::add(&ts[0], cost(100_000, 32));
        let _short: Vec<_> = (0..3).map(|_| Load::add(&ts[1], cost(400, 32))).collect();
        assert_eq!(pick(&ts, None), Some(2), "c is idle");
        let _c = Load::add(&ts[2], cost(100_000, 64));
        assert_eq!(pick(&ts, None), Some(1), "b holds the fewest tokens");
        ts[1].set_healthy(false);
        assert_eq!(pick(&ts, None), Some(0), "b is down");
        assert_eq!(pick(&ts, Some(0)), Some(2), "a excluded");
        for t in &ts {
            t.set_healthy(false);
        }
        assert_eq!(pick(&ts, None), Some(1), "all down: the least loaded");
        assert_eq!(pick(&ts[..1], Some(0)), None, "nothing else to move to");
    }

    #[test]
    fn each_node_gets_the_rate_its_hint_allows() {
        let ts = vec![
            Target::parse("http://a:8000#gpu-a").unwrap(),
            Target::parse("http://b:8000#gpu-b").unwrap(),
        ];
        assert_eq!(ts[0].node.as_deref(), Some("gpu-a"));
        assert_eq!(ts[0].url, "http://a:8000");
        let _a = Load::add(&ts[0], 1000);
        assert_eq!(pick(&ts, None), Some(1), "no hints yet: fewest tokens");
        ts[0].set_allowed_rps(40.0);
        assert_eq!(pick(&ts, None), Some(1), "b has no hint yet: fewest tokens");
        ts[1].set_allowed_rps(2.0);
        drop(_a);
        // 42 requests/s (what the gate lets through: the sum of the hints) for 10 s: node a
        // allows 40 of them, congested node b 2.
        let t0 = Instant::now();
        let mut on = [0usize; 2];
        for k in 0..420 {
            let now = t0 + Duration::from_secs_f64(k as f64 / 42.0);
            let t = pick_at(&ts, None, now).unwrap();
            on[t] += 1;
            drop(Load::add_at(&ts[t], 100, now));
        }
        assert!((390..=410).contains(&on[0]), "{on:?}: a should take ~400");
        assert!(on[1] >= 10, "{on:?}: b should still take ~20");
        assert!(ts[1].recent_rps(t0 + Duration::from_secs(10)) < 3.0);
    }

    #[test]
    fn target_specs_are_checked() {
        assert!(Target::parse("http://a:8000").unwrap().node.is_none());
        assert!(Target::parse("a:8000").is_err());
        assert!(Target::parse("http://a:8000#").is_err());
        assert!(Target::parse("http://a:8000#no spaces").is_err());
        let specs = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        let (ts, nodes) = parse_targets(&specs(&["http://a:1#x", "http://b:1#y"])).unwrap();
        assert_eq!((ts.len(), nodes.len()), (2, 2));
        assert!(parse_targets(&specs(&["http://a:1#x", "http://b:1"])).is_err());
    }

    #[test]
    fn a_finished_request_releases_its_load() {
        let t = Target::new("a");
        {
            let _l = Load::add(&t, 10);
            assert_eq!(t.tokens.load(Ordering::Relaxed), 10);
        }
        assert_eq!(t.tokens.load(Ordering::Relaxed), 0);
        assert_eq!(t.requests.load(Ordering::Relaxed), 0);
    }
}
