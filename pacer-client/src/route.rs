//! Several backends (one per node, as vLLM replicas are): each request goes to the healthy
//! backend with the fewest tokens in flight — prompt and answer, not just requests, since one
//! 100 KB prompt loads a server more than ten short chats. A backend that refuses a connection,
//! times out or answers 5xx before its first token is marked down and the request moves to
//! another one, once; a health check every second brings it back.

use std::{
    sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering},
    time::Duration,
};

/// One backend and its load as this pacer sees it.
pub struct Target {
    pub url: String,
    /// Requests in flight.
    pub requests: AtomicUsize,
    /// Estimated tokens in flight (prompt + `max_tokens` per request).
    pub tokens: AtomicU64,
    healthy: AtomicBool,
}

impl Target {
    pub fn new(url: &str) -> Self {
        Self {
            url: url.trim_end_matches('/').to_string(),
            requests: AtomicUsize::new(0),
            tokens: AtomicU64::new(0),
            healthy: AtomicBool::new(true),
        }
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

/// Tokens a request is expected to hold on its backend: its prompt (about 4 bytes a token) and
/// the answer it may generate.
pub fn cost(prompt_bytes: usize, max_tokens: u32) -> u64 {
    (prompt_bytes as u64).div_ceil(4) + u64::from(max_tokens)
}

/// The healthy target with the fewest tokens in flight, other than `except`; when none is
/// healthy, the least loaded of all (a health check may simply not have caught up).
pub fn pick(targets: &[Target], except: Option<usize>) -> Option<usize> {
    let load = |i: &usize| {
        (
            targets[*i].tokens.load(Ordering::Relaxed),
            targets[*i].requests.load(Ordering::Relaxed),
        )
    };
    let candidates = || (0..targets.len()).filter(|&i| Some(i) != except);
    candidates()
        .filter(|&i| targets[i].healthy())
        .min_by_key(load)
        .or_else(|| candidates().min_by_key(load))
}

/// Holds a request's share of a target's load until dropped.
pub struct Load<'a> {
    target: &'a Target,
    cost: u64,
}

impl<'a> Load<'a> {
    pub fn add(target: &'a Target, cost: u64) -> Self {
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
