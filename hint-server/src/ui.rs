//! The web dashboard at `/ui`: a live view per node (SSE of compact frames built from the agent's
//! newest window and the node's hints), an A/B view of `cargo xtask demo` reports, and a history
//! view over `/v1/history`. The page draws with Apache ECharts, vendored from the npm registry by
//! `cargo xtask setup` (see `build.rs`); the page and its script are embedded in the binary.

use std::{collections::BTreeMap, convert::Infallible, path::Path, time::Duration};

use axum::{
    Json, Router,
    extract::{Path as UrlPath, State},
    http::{HeaderMap, HeaderValue, header},
    response::{
        IntoResponse, Response,
        sse::{Event, KeepAlive, Sse},
    },
    routing::get,
};
use futures_util::Stream;
use redis::streams::StreamRangeReply;
use serde::Serialize;
use tokenflow_schema::{GpuWindow, Hint, TelemetryWindow, keys};

use crate::{
    api::{ApiError, authorize},
    serve::App,
};

type AppState = std::sync::Arc<App>;

const INDEX_HTML: &str = include_str!("../ui/index.html");
const APP_JS: &str = include_str!("../ui/app.js");
const ECHARTS_JS: &str = include_str!(concat!(env!("OUT_DIR"), "/echarts.min.js"));

pub fn routes() -> Router<AppState> {
    Router::new()
        .route(
            "/ui",
            get(|| async { page(INDEX_HTML, "text/html; charset=utf-8") }),
        )
        .route(
            "/ui/",
            get(|| async { page(INDEX_HTML, "text/html; charset=utf-8") }),
        )
        .route(
            "/ui/app.js",
            get(|| async { page(APP_JS, "text/javascript") }),
        )
        .route(
            "/ui/vendor/echarts.min.js",
            get(|| async { page(ECHARTS_JS, "text/javascript") }),
        )
        .route("/v1/nodes/{node}/live", get(live))
        .route("/v1/ab/reports", get(reports))
        .route("/v1/ab/reports/{name}", get(report))
}

fn page(body: &'static str, mime: &'static str) -> Response {
    (
        [
            (header::CONTENT_TYPE, HeaderValue::from_static(mime)),
            (header::CACHE_CONTROL, HeaderValue::from_static("no-cache")),
        ],
        body,
    )
        .into_response()
}

/// Upper bounds (ms) of the heatmap's RTT buckets: powers of two from 0.5 ms to 2 s.
pub const HEAT_BOUNDS_MS: [f64; 13] = [
    0.5, 1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0, 512.0, 1024.0, 2048.0,
];

/// What the live view shows of one window.
#[derive(Debug, Serialize)]
pub struct LiveFrame {
    pub node: String,
    pub seq: u64,
    pub end_unix_ms: u64,
    /// p50, p95, p99 of every RTT sample of the window, ms (absent without samples).
    pub rtt_ms: Option<[f64; 3]>,
    /// RTT samples per [`HEAT_BOUNDS_MS`] bucket (the last also holds everything above).
    pub rtt_heat: Vec<u64>,
    pub retransmits: u64,
    pub retransmit_rate_per_s: f64,
    pub bytes_acked: u64,
    pub active_flows: u32,
    pub accept_queue: u32,
    pub accept_queue_limit: u32,
    pub recv_queue_bytes: u64,
    pub send_queue_bytes: u64,
    pub gpu: GpuWindow,
    /// Per listening port: p50 and p99 of the kernel-measured request latency, ms.
    pub request_latency: Vec<(u16, f64, f64)>,
    pub anomaly_score: f64,
    pub predicted_rtt_ms: Option<f64>,
    pub hints: Vec<Hint>,
}

pub fn frame(
    w: &TelemetryWindow,
    anomaly: f64,
    predicted: Option<f64>,
    hints: Vec<Hint>,
) -> LiveFrame {
    let mut heat = vec![0u64; HEAT_BOUNDS_MS.len()];
    for f in &w.flows {
        for &[lo, hi, n] in &f.rtt_hist {
            let mid_ms = (lo + hi) as f64 / 2.0 / 1000.0;
            let i = HEAT_BOUNDS_MS
                .iter()
                .position(|&b| mid_ms <= b)
                .unwrap_or(HEAT_BOUNDS_MS.len() - 1);
            heat[i] += n;
        }
    }
    let r = &w.node.rtt;
    let ms = |us: u64| us as f64 / 1000.0;
    LiveFrame {
        node: w.node_id.clone(),
        seq: w.seq,
        end_unix_ms: w.end_unix_ms,
        rtt_ms: (r.samples > 0).then(|| [ms(r.p50_us), ms(r.p95_us), ms(r.p99_us)]),
        rtt_heat: heat,
        retransmits: w.node.retransmits,
        retransmit_rate_per_s: w.node.retransmit_rate_per_s,
        bytes_acked: w.node.bytes_acked,
        active_flows: w.node.active_flows,
        accept_queue: w.backlog.listeners.iter().map(|l| l.accept_queue).sum(),
        accept_queue_limit: w
            .backlog
            .listeners
            .iter()
            .map(|l| l.accept_queue_limit)
            .sum(),
        recv_queue_bytes: w.backlog.ports.iter().map(|p| p.recv_queue_bytes).sum(),
        send_queue_bytes: w.backlog.ports.iter().map(|p| p.send_queue_bytes).sum(),
        gpu: w.gpu.clone(),
        request_latency: w
            .request_latency
            .iter()
            .map(|p| (p.port, ms(p.latency.p50_us), ms(p.latency.p99_us)))
            .collect(),
        anomaly_score: anomaly,
        predicted_rtt_ms: predicted,
        hints,
    }
}

async fn newest_window(app: &App, node: &str) -> anyhow::Result<Option<TelemetryWindow>> {
    let reply: StreamRangeReply = redis::AsyncCommands::xrevrange_count(
        &mut app.store.con.clone(),
        keys::telemetry_stream(node),
        "+",
        "-",
        1,
    )
    .await?;
    Ok(reply
        .ids
        .first()
        .and_then(|e| e.get::<String>(keys::WINDOW_FIELD))
        .and_then(|j| serde_json::from_str(&j).ok()))
}

async fn live_frame(app: &App, node: &str, last_end: u64) -> anyhow::Result<Option<LiveFrame>> {
    let Some(w) = newest_window(app, node).await? else {
        return Ok(None);
    };
    if w.end_unix_ms == last_end {
        return Ok(None);
    }
    let st = app.store.node_state(node).await?;
    let mut hints = Vec::new();
    for (id, c) in app.clients().await?.iter() {
        if c.node_id == node
            && let Some(h) = app.store.hint(id).await?
        {
            hints.push(h);
        }
    }
    Ok(Some(frame(
        &w,
        st.last_anomaly,
        st.last_predicted_ms,
        hints,
    )))
}

/// SSE: one `window` event per new window of the node (polled once per interval), `error`
/// events while Redis is unreachable.
async fn live(
    State(app): State<AppState>,
    headers: HeaderMap,
    UrlPath(node): UrlPath<String>,
) -> Result<Sse<impl Stream<Item = Result<Event, Infallible>>>, ApiError> {
    authorize(&app, &headers, false)?;
    if node.is_empty() || node.len() > 128 {
        return Err(ApiError::bad("node", "1 … 128 characters"));
    }
    let period = app
        .settings
        .interval
        .clamp(Duration::from_millis(100), Duration::from_secs(5));
    let events = futures_util::stream::unfold(
        (app, node, 0u64, true),
        move |(app, node, last, first)| async move {
            if !first {
                tokio::time::sleep(period / 2).await;
            }
            let (ev, last) = match live_frame(&app, &node, last).await {
                Ok(Some(f)) => {
                    let end = f.end_unix_ms;
                    (
                        Some(
                            Event::default()
                                .event("window")
                                .json_data(&f)
                                .unwrap_or_default(),
                        ),
                        end,
                    )
                }
                Ok(None) => (None, last),
                Err(e) => (
                    Some(
                        Event::default()
                            .event("error")
                            .data(format!("Redis: {e:#}")),
                    ),
                    last,
                ),
            };
            Some((ev, (app, node, last, false)))
        },
    );
    let events = futures_util::StreamExt::filter_map(events, |e| std::future::ready(e.map(Ok)));
    Ok(Sse::new(events).keep_alive(KeepAlive::default()))
}

/// One demo report folder.
#[derive(Debug, Serialize)]
pub struct ReportInfo {
    pub name: String,
    pub scenarios: Vec<String>,
    pub arms: Vec<String>,
}

fn results_dir(app: &App) -> Result<&Path, ApiError> {
    app.settings.results.as_deref().ok_or_else(|| {
        ApiError::not_found("no results folder: start the hint server with --results DIR")
    })
}

async fn reports(
    State(app): State<AppState>,
    headers: HeaderMap,
) -> Result<Json<Vec<ReportInfo>>, ApiError> {
    authorize(&app, &headers, false)?;
    let dir = results_dir(&app)?.to_path_buf();
    let list = tokio::task::spawn_blocking(move || list_reports(&dir))
        .await
        .map_err(|e| ApiError::unavailable(e.into()))?;
    Ok(Json(list))
}

/// Report folders (those holding a `report.json`), newest first.
pub fn list_reports(dir: &Path) -> Vec<ReportInfo> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        let path = e.path();
        let Ok(text) = std::fs::read_to_string(path.join("report.json")) else {
            continue;
        };
        let Ok(r) = serde_json::from_str::<serde_json::Value>(&text) else {
            continue;
        };
        let names = |key: &str, field: &str| -> Vec<String> {
            let mut v: Vec<String> = r[key]
                .as_array()
                .into_iter()
                .flatten()
                .filter_map(|x| x[field].as_str().map(String::from))
                .collect();
            v.dedup();
            v
        };
        let mut arms = names("arms", "arm");
        arms.sort();
        arms.dedup();
        out.push(ReportInfo {
            name: e.file_name().to_string_lossy().into_owned(),
            scenarios: names("scenarios", "name"),
            arms,
        });
    }
    out.sort_by(|a, b| b.name.cmp(&a.name));
    out
}

/// A report folder's `report.json` plus latency CDFs per scenario, arm and role, computed from
/// its `requests.jsonl`: 101 quantiles (0 … 100 %) of TTFT and end-to-end latency, ms.
#[derive(Debug, Serialize)]
pub struct ReportView {
    pub name: String,
    pub report: serde_json::Value,
    /// scenario → arm → role → {"ttft_ms": [...], "e2e_ms": [...], "n": count}
    pub cdf: BTreeMap<String, BTreeMap<String, BTreeMap<String, serde_json::Value>>>,
}

async fn report(
    State(app): State<AppState>,
    headers: HeaderMap,
    UrlPath(name): UrlPath<String>,
) -> Result<Json<ReportView>, ApiError> {
    authorize(&app, &headers, false)?;
    // A folder name, never a path: no separators, no `..`.
    if name.is_empty() || name.contains(['/', '\\']) || name.starts_with('.') {
        return Err(ApiError::bad(
            "name",
            "a report folder name as listed by /v1/ab/reports",
        ));
    }
    let dir = results_dir(&app)?.join(&name);
    let view = tokio::task::spawn_blocking(move || load_report(&dir, name))
        .await
        .map_err(|e| ApiError::unavailable(e.into()))?;
    view.ok_or_else(|| ApiError::not_found("no such report (see /v1/ab/reports)"))
        .map(Json)
}

pub fn load_report(dir: &Path, name: String) -> Option<ReportView> {
    let report: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("report.json")).ok()?).ok()?;
    type Key = (String, String, String);
    let mut samples: BTreeMap<Key, (Vec<f64>, Vec<f64>)> = BTreeMap::new();
    if let Ok(text) = std::fs::read_to_string(dir.join("requests.jsonl")) {
        for line in text.lines() {
            let Ok(r) = serde_json::from_str::<serde_json::Value>(line) else {
                continue;
            };
            let s = |k: &str| r[k].as_str().unwrap_or_default().to_string();
            let e = samples
                .entry((s("scenario"), s("arm"), s("role")))
                .or_default();
            if let Some(t) = r["ttft_ms"].as_f64() {
                e.0.push(t);
            }
            if let Some(t) = r["e2e_ms"].as_f64() {
                e.1.push(t);
            }
        }
    }
    let mut cdf: BTreeMap<String, BTreeMap<String, BTreeMap<String, serde_json::Value>>> =
        BTreeMap::new();
    for ((scenario, arm, role), (mut ttft, mut e2e)) in samples {
        let n = e2e.len();
        cdf.entry(scenario).or_default().entry(arm).or_default().insert(
            role,
            serde_json::json!({"ttft_ms": quantiles(&mut ttft), "e2e_ms": quantiles(&mut e2e), "n": n}),
        );
    }
    Some(ReportView { name, report, cdf })
}

/// 101 quantiles (nearest rank) of `v`; empty without samples.
pub fn quantiles(v: &mut [f64]) -> Vec<f64> {
    if v.is_empty() {
        return Vec::new();
    }
    v.sort_by(f64::total_cmp);
    (0..=100)
        .map(|q| {
            let i = ((q as f64 / 100.0) * (v.len() - 1) as f64).round() as usize;
            (v[i] * 1000.0).round() / 1000.0
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quantiles_of_a_uniform_sample() {
        let mut v: Vec<f64> = (0..=1000).map(f64::from).collect();
        let q = quantiles(&mut v);
        assert_eq!(q.len(), 101);
        assert_eq!(q[0], 0.0);
        assert_eq!(q[50], 500.0);
        assert_eq!(q[99], 990.0);
        assert_eq!(q[100], 1000.0);
        assert!(quantiles(&mut []).is_empty());
    }

    #[test]
    fn heat_buckets_take_every_sample() {
        let mut w: TelemetryWindow =
            serde_json::from_str(include_str!("../fixtures/window.json")).expect("fixture window");
        let total: u64 = w
            .flows
            .iter()
            .flat_map(|f| f.rtt_hist.iter().map(|h| h[2]))
            .sum();
        let f = frame(&w, 0.2, Some(12.0), Vec::new());
        assert_eq!(f.rtt_heat.iter().sum::<u64>(), total);
        assert_eq!(f.rtt_heat.len(), HEAT_BOUNDS_MS.len());
        w.node.rtt.samples = 0;
        assert!(frame(&w, 0.0, None, Vec::new()).rtt_ms.is_none());
    }
}
