//! Following the hint server: the SSE stream of the client's hint, polling as the fallback, and a
//! watchdog that decays the gate to a safe floor when hints stop (TTL passed, server gone) —
//! never to unbounded sending.

use std::{
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use eventsource_stream::Eventsource;
use futures_util::StreamExt;
use tokenflow_schema::Hint;

use crate::gate::{Gate, Limit};

#[derive(Clone, Debug)]
pub struct HintSource {
    /// Hint server base URL, e.g. http://127.0.0.1:8700
    pub url: String,
    pub client_id: String,
    /// What the gate falls back to without a fresh hint.
    pub safe: Limit,
}

/// The latest hint and when it stops being valid.
#[derive(Default)]
pub struct Latest {
    pub hint: Option<Hint>,
    pub valid_until: Option<Instant>,
    pub fallbacks: u64,
}

pub fn apply(gate: &Gate, latest: &Mutex<Latest>, h: Hint) {
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
pub async fn follow(src: HintSource, gate: Arc<Gate>, latest: Arc<Mutex<Latest>>) {
    let http = reqwest::Client::builder()
        .connect_timeout(Duration::from_secs(1))
        .build()
        .unwrap_or_default();
    tokio::spawn(watchdog(src.safe, gate.clone(), latest.clone()));
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
                        apply(&gate, &latest, h);
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
    gate: &Gate,
    latest: &Mutex<Latest>,
) -> anyhow::Result<()> {
    let url = format!("{}/v1/hints/{}/stream", src.url, src.client_id);
    let r = http.get(&url).send().await?.error_for_status()?;
    let mut events = r.bytes_stream().eventsource();
    while let Some(ev) = events.next().await {
        let ev = ev?;
        if let Ok(h) = serde_json::from_str::<Hint>(&ev.data) {
            apply(gate, latest, h);
        }
    }
    anyhow::bail!("the hint stream ended")
}

/// Past the hint's TTL, the gate decays to the safe floor (and never above the last hint).
async fn watchdog(safe: Limit, gate: Arc<Gate>, latest: Arc<Mutex<Latest>>) {
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
