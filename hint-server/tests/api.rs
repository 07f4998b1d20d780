//! The API in process (no socket: `tower::ServiceExt::oneshot` on the router) against a real
//! redis-server, fed with windows recorded on the test bed.
// Helpers outside `#[test]` functions panic on set-up failures: that is the test failing.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::{
    path::{Path, PathBuf},
    sync::Arc,
    time::Duration,
};

use axum::{
    Router,
    body::Body,
    http::{Request, StatusCode},
};
use http_body_util::BodyExt;
use redis::AsyncCommands;
use serde_json::{Value, json};
use tokenflow_hint_server::{
    api::router,
    model::Models,
    serve::{App, Settings, process},
    store::Store,
    trace::Trace,
};
use tokenflow_schema::{Hint, TelemetryWindow, keys, trace::TraceLine};
use tokenflow_tests::redis_server::RedisServer;
use tower::ServiceExt;

const TOKEN: &str = "s3cret";

fn fixture() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("fixtures/trace.jsonl")
}

fn windows() -> Vec<(bool, String, TelemetryWindow)> {
    let text = std::fs::read_to_string(fixture()).unwrap();
    let mut v: Vec<TraceLine> = text
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    v.sort_by_key(|l| l.window.end_unix_ms);
    v.into_iter()
        .map(|l| (l.label.anomalous, l.label.phase, l.window))
        .collect()
}

async fn app(redis: &RedisServer, token: Option<&str>, models: Option<Arc<Models>>) -> Arc<App> {
    app_with_results(redis, token, models, None).await
}

async fn app_with_results(
    redis: &RedisServer,
    token: Option<&str>,
    models: Option<Arc<Models>>,
    results: Option<PathBuf>,
) -> Arc<App> {
    let settings = Settings {
        redis: tokenflow_schema::store::Target::Server(redis.url()),
        listen: "127.0.0.1:0".parse().unwrap(),
        metrics: None,
        token: token.map(str::to_string),
        auth_reads: false,
        interval: Duration::from_secs(1),
        model: None,
        refit_every: Duration::from_secs(3600),
        train_windows: 400,
        consumer: "test".into(),
        results,
    };
    App::new(
        settings.clone(),
        Store::connect(&settings.redis).await.unwrap(),
        models,
    )
}

async fn call(
    r: &Router,
    method: &str,
    uri: &str,
    token: Option<&str>,
    body: Option<&str>,
) -> (StatusCode, Value) {
    let mut b = Request::builder().method(method).uri(uri);
    if let Some(t) = token {
        b = b.header("authorization", format!("Bearer {t}"));
    }
    if body.is_some() {
        b = b.header("content-type", "application/json");
    }
    let req = b
        .body(body.map_or(Body::empty(), |s| Body::from(s.to_string())))
        .unwrap();
    let resp = r.clone().oneshot(req).await.unwrap();
    let status = resp.status();
    let bytes = resp.into_body().collect().await.unwrap().to_bytes();
    let v = serde_json::from_slice(&bytes)
        .unwrap_or_else(|_| Value::String(String::from_utf8_lossy(&bytes).into()));
    (status, v)
}

#[tokio::test(flavor = "multi_thread")]
async fn writes_need_the_token_and_bad_input_names_the_field() {
    let redis = RedisServer::start_ephemeral().unwrap();
    let r = router(app(&redis, Some(TOKEN), None).await);
    let good = r#"{"node_id":"n1","class":"batch","max_rps":20}"#;
    let (s, v) = call(&r, "PUT", "/v1/clients/c1", None, Some(good)).await;
    assert_eq!(s, StatusCode::UNAUTHORIZED, "{v}");
    assert_eq!(v["error"]["code"], "unauthorized");
    let (s, _) = call(&r, "PUT", "/v1/clients/c1", Some("wrong"), Some(good)).await;
    assert_eq!(s, StatusCode::UNAUTHORIZED);
    let (s, v) = call(&r, "PUT", "/v1/clients/c1", Some(TOKEN), Some(good)).await;
    assert_eq!(s, StatusCode::OK, "{v}");
    assert_eq!(v["class"], "batch");
    assert_eq!(v["max_rps"], 20.0);
    assert_eq!(v["controller"], "pid");

    for (body, field) in [
        (r#"{"weight":-1}"#, "weight"),
        (r#"{"min_rps":0}"#, "min_rps"),
        (r#"{"max_rps":0.1,"min_rps":1}"#, "max_rps"),
        (r#"{"setpoint_ms":"fast"}"#, "setpoint_ms"),
        (r#"{"controller":"magic"}"#, "controller"),
        (r#"{"colour":"red"}"#, "colour"),
    ] {
        let (s, v) = call(&r, "PUT", "/v1/clients/c1", Some(TOKEN), Some(body)).await;
        assert_eq!(s.as_u16() / 100, 4, "{body}: {s} {v}");
        assert_eq!(v["error"]["field"], field, "{body}: {v}");
    }
    let (s, v) = call(&r, "PUT", "/v1/clients/c1", Some(TOKEN), Some("{not json")).await;
    assert_eq!(s, StatusCode::BAD_REQUEST, "{v}");
    // A new client must name its node.
    let (s, v) = call(&r, "PUT", "/v1/clients/c2", Some(TOKEN), Some("{}")).await;
    assert_eq!(
        (s, v["error"]["field"].as_str()),
        (StatusCode::BAD_REQUEST, Some("node_id"))
    );
    let (s, v) = call(&r, "PUT", "/v1/clients/bad%20id", Some(TOKEN), Some(good)).await;
    assert_eq!(
        (s, v["error"]["field"].as_str()),
        (StatusCode::BAD_REQUEST, Some("client_id"))
    );
    // Nothing was lost: the stored settings are the good ones.
    let (s, v) = call(&r, "GET", "/v1/clients/c1", None, None).await;
    assert_eq!((s, v["max_rps"].as_f64()), (StatusCode::OK, Some(20.0)));

    // Deregistration: token required; afterwards the client and its hint are gone.
    let (s, _) = call(&r, "DELETE", "/v1/clients/c1", None, None).await;
    assert_eq!(s, StatusCode::UNAUTHORIZED);
    let (s, _) = call(&r, "DELETE", "/v1/clients/c1", Some(TOKEN), None).await;
    assert_eq!(s, StatusCode::NO_CONTENT);
    let (s, _) = call(&r, "GET", "/v1/clients/c1", None, None).await;
    assert_eq!(s, StatusCode::NOT_FOUND);
    let (s, v) = call(&r, "DELETE", "/v1/clients/c1", Some(TOKEN), None).await;
    assert_eq!(s, StatusCode::NOT_FOUND, "{v}");
    let (s, _) = call(&r, "PUT", "/v1/clients/c1", Some(TOKEN), Some(good)).await;
    assert_eq!(s, StatusCode::OK);

    // Without a configured token, writes are refused rather than open.
    let open = router(app(&redis, None, None).await);
    let (s, v) = call(&open, "PUT", "/v1/clients/c1", None, Some(good)).await;
    assert_eq!(s, StatusCode::FORBIDDEN, "{v}");
}

#[tokio::test(flavor = "multi_thread")]
async fn dispatch_reports_need_the_token_and_a_registered_client_and_are_kept_for_the_engine() {
    let redis = RedisServer::start_ephemeral().unwrap();
    let app = app(&redis, Some(TOKEN), None).await;
    let r = router(app.clone());
    let good = r#"{"requests_total":42}"#;
    let url = "/v1/clients/c1/dispatched";
    let (s, v) = call(&r, "POST", url, None, Some(good)).await;
    assert_eq!(s, StatusCode::UNAUTHORIZED, "{v}");
    let (s, v) = call(&r, "POST", url, Some(TOKEN), Some(good)).await;
    assert_eq!(s, StatusCode::NOT_FOUND, "not registered yet: {v}");
    let (s, _) = call(
        &r,
        "PUT",
        "/v1/clients/c1",
        Some(TOKEN),
        Some(r#"{"node_id":"n1"}"#),
    )
    .await;
    assert_eq!(s, StatusCode::OK);
    for (body, field) in [
        (r#"{"requests_total":-1}"#, Some("requests_total")),
        (r#"{"requests_total":"many"}"#, Some("requests_total")),
        (r#"{"requests":42}"#, Some("requests")),
        ("{not json", Some("body")),
    ] {
        let (s, v) = call(&r, "POST", url, Some(TOKEN), Some(body)).await;
        assert_eq!(s.as_u16() / 100, 4, "{body}: {s} {v}");
        assert_eq!(v["error"]["field"].as_str(), field, "{body}: {v}");
    }
    for total in [40, 42] {
        let body = format!(r#"{{"requests_total":{total}}}"#);
        let (s, v) = call(&r, "POST", url, Some(TOKEN), Some(&body)).await;
        assert_eq!(s, StatusCode::NO_CONTENT, "{v}");
    }
    // What the engine reads for the node's clients: both reports, stamped on arrival, in order.
    let kept = app.store.dispatched(&["c1", "c2"]).await.unwrap();
    let c1 = &kept["c1"];
    assert_eq!(
        c1.iter().map(|r| r.1).collect::<Vec<_>>(),
        vec![40, 42],
        "{kept:?}"
    );
    assert!(c1[0].0 <= c1[1].0 && !kept.contains_key("c2"), "{kept:?}");
    // Deregistering forgets them.
    let (s, _) = call(&r, "DELETE", "/v1/clients/c1", Some(TOKEN), None).await;
    assert_eq!(s, StatusCode::NO_CONTENT);
    assert!(app.store.dispatched(&["c1"]).await.unwrap().is_empty());
}

#[tokio::test(flavor = "multi_thread")]
async fn hints_follow_the_recorded_windows() {
    let redis = RedisServer::start_ephemeral().unwrap();
    let trace = Trace::load(&fixture()).unwrap();
    let models = Arc::new(
        Models::train(
            &trace.features,
            &tokenflow_hint_server::model::calm_mask(&trace.features),
            1,
            0,
        )
        .unwrap(),
    );
    let a = app(&redis, Some(TOKEN), Some(models)).await;
    let r = router(a.clone());

    let (s, v) = call(&r, "GET", "/v1/hints/nobody", None, None).await;
    assert_eq!(s, StatusCode::NOT_FOUND, "{v}");
    assert_eq!(v["error"]["code"], "not_found");

    let windows = windows();
    let node = windows[0].2.node_id.clone();
    let body = json!({"node_id": node, "max_rps": 50.0, "min_rps": 0.5}).to_string();
    assert_eq!(
        call(&r, "PUT", "/v1/clients/pacer", Some(TOKEN), Some(&body))
            .await
            .0,
        StatusCode::OK
    );

    // Registered, no telemetry yet: a conservative hint marked stale.
    let (s, v) = call(&r, "GET", "/v1/hints/pacer", None, None).await;
    assert_eq!(s, StatusCode::OK, "{v}");
    let h: Hint = serde_json::from_value(v).unwrap();
    assert!(h.stale && h.rate_limit_rps <= 5.0, "{h:?}");

    // Replay the trace through the decision path; windows are re-stamped to now so they are fresh.
    let mut by_phase: std::collections::BTreeMap<String, Vec<f64>> = Default::default();
    let now = tokenflow_hint_server::serve::unix_ms();
    let offset = now - windows.last().unwrap().2.end_unix_ms;
    for (_, phase, w) in &windows {
        let mut w = w.clone();
        w.start_unix_ms += offset;
        w.end_unix_ms += offset;
        process(&a, &w).await.unwrap();
        let (s, v) = call(&r, "GET", "/v1/hints/pacer", None, None).await;
        assert_eq!(s, StatusCode::OK);
        let h: Hint = serde_json::from_value(v).unwrap();
        assert!(!h.stale, "{h:?}");
        assert!(h.rate_limit_rps >= 0.5 && h.rate_limit_rps <= 50.0);
        by_phase
            .entry(phase.clone())
            .or_default()
            .push(h.rate_limit_rps);
    }
    let mean = |p: &str| {
        let v = &by_phase[p];
        v.iter().sum::<f64>() / v.len() as f64
    };
    println!(
        "{:?}",
        by_phase
            .keys()
            .map(|k| (k.clone(), mean(k)))
            .collect::<Vec<_>>()
    );
    // Congested phases get less than calm ones.
    assert!(
        mean("step") < mean("idle"),
        "step {} idle {}",
        mean("step"),
        mean("idle")
    );

    // Nodes list shows the node (registered by its agent) with its state.
    let _: () = a.store.con.clone().sadd(keys::NODES, &node).await.unwrap();
    let (s, v) = call(&r, "GET", "/v1/nodes", None, None).await;
    assert_eq!(s, StatusCode::OK);
    let n = v
        .as_array()
        .unwrap()
        .iter()
        .find(|n| n["node_id"] == node.as_str());
    assert!(
        n.is_some_and(|n| n["windows_seen"].as_u64() == Some(windows.len() as u64)),
        "{v}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn history_returns_the_windows_in_range() {
    let redis = RedisServer::start_ephemeral().unwrap();
    let a = app(&redis, None, None).await;
    let r = router(a.clone());
    let windows = windows();
    let node = windows[0].2.node_id.clone();
    let mut con = a.store.con.clone();
    for (_, _, w) in windows.iter().take(100) {
        append(&mut con, w).await;
    }
    let (from, to) = (windows[10].2.end_unix_ms, windows[39].2.end_unix_ms);
    let (s, v) = call(
        &r,
        "GET",
        &format!("/v1/history?node={node}&from={from}&to={to}"),
        None,
        None,
    )
    .await;
    assert_eq!(s, StatusCode::OK, "{v}");
    assert_eq!(v["count"], 30);
    assert_eq!(v["windows"][0]["end_unix_ms"].as_u64(), Some(from));
    for (q, field) in [
        (format!("node={node}&from={to}&to={from}"), "from"),
        (format!("from={from}&to={to}"), "node"),
        (format!("node={node}&from=yesterday&to={to}"), "from"),
        (format!("node={node}&from={from}&to={to}&limit=0"), "limit"),
    ] {
        let (s, v) = call(&r, "GET", &format!("/v1/history?{q}"), None, None).await;
        assert_eq!(s, StatusCode::BAD_REQUEST, "{q}: {v}");
        assert_eq!(v["error"]["field"], field, "{q}: {v}");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn openapi_health_and_unknown_routes() {
    let redis = RedisServer::start_ephemeral().unwrap();
    let r = router(app(&redis, None, None).await);
    let (s, v) = call(&r, "GET", "/openapi.json", None, None).await;
    assert_eq!(s, StatusCode::OK);
    for p in [
        "/v1/hints/{client_id}",
        "/v1/hints/{client_id}/stream",
        "/v1/nodes",
        "/v1/history",
        "/v1/clients/{client_id}",
    ] {
        assert!(v["paths"].get(p).is_some(), "openapi lacks {p}");
    }
    assert!(v["components"]["schemas"].get("Hint").is_some());
    assert_eq!(
        call(&r, "GET", "/healthz", None, None).await.0,
        StatusCode::OK
    );
    // Ingest is not running in this test: not ready, and says why.
    let (s, v) = call(&r, "GET", "/readyz", None, None).await;
    assert_eq!(s, StatusCode::SERVICE_UNAVAILABLE, "{v}");
    let (s, v) = call(&r, "GET", "/v2/nothing", None, None).await;
    assert_eq!(
        (s, v["error"]["code"].as_str()),
        (StatusCode::NOT_FOUND, Some("not_found"))
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn the_stream_sends_the_current_hint_then_every_new_one() {
    let redis = RedisServer::start_ephemeral().unwrap();
    let a = app(&redis, Some(TOKEN), None).await;
    let r = router(a.clone());
    let body = json!({"node_id": "n1", "max_rps": 40.0}).to_string();
    assert_eq!(
        call(&r, "PUT", "/v1/clients/s1", Some(TOKEN), Some(&body))
            .await
            .0,
        StatusCode::OK
    );
    let req = Request::builder()
        .uri("/v1/hints/s1/stream")
        .body(Body::empty())
        .unwrap();
    let resp = r.clone().oneshot(req).await.unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    assert_eq!(resp.headers()["content-type"], "text/event-stream");
    let mut body = resp.into_body();
    let first = next_event(&mut body).await;
    assert!(
        first.starts_with("event: hint\ndata: ") && first.contains("\"stale\":true"),
        "{first}"
    );
    // A new hint for this client, as the ingest of any replica publishes it.
    let mut h: Hint =
        serde_json::from_str(first.trim_start_matches("event: hint\ndata: ").trim()).unwrap();
    h.rate_limit_rps = 17.0;
    h.stale = false;
    let _: () = a
        .store
        .con
        .clone()
        .publish(keys::HINTS_CHANNEL, serde_json::to_string(&h).unwrap())
        .await
        .unwrap();
    // (This test runs no pub/sub listener: deliver as the listener would.)
    a.remember(h.clone());
    let second = next_event(&mut body).await;
    assert!(second.contains("\"rate_limit_rps\":17.0"), "{second}");
    // The same limit issued again a period later still arrives: it renews the client's TTL (a
    // stream that only sent changes left steady clients to fall back to their safe floor).
    h.issued_at_unix_ms += 1000;
    a.remember(h.clone());
    let third = next_event(&mut body).await;
    assert!(
        third.contains("\"rate_limit_rps\":17.0")
            && third.contains(&format!("\"issued_at_unix_ms\":{}", h.issued_at_unix_ms)),
        "{third}"
    );
}

async fn next_event(b: &mut Body) -> String {
    let frame = tokio::time::timeout(Duration::from_secs(5), b.frame())
        .await
        .expect("an event within 5 s");
    String::from_utf8(frame.unwrap().unwrap().into_data().unwrap().to_vec()).unwrap()
}

#[tokio::test(flavor = "multi_thread")]
async fn refit_trains_on_the_streams_and_swaps_the_models_in() {
    let redis = RedisServer::start_ephemeral().unwrap();
    let a = app(&redis, None, None).await;
    assert!(a.models.load().is_none());
    let windows = windows();
    let node = windows[0].2.node_id.clone();
    let mut con = a.store.con.clone();
    let _: () = con.sadd(keys::NODES, &node).await.unwrap();
    // Too few windows: no refit, no models.
    for (_, _, w) in windows.iter().take(100) {
        append(&mut con, w).await;
    }
    assert_eq!(tokenflow_hint_server::serve::refit(&a).await.unwrap(), None);
    assert!(a.models.load().is_none());
    for (_, _, w) in windows.iter().skip(100) {
        append(&mut con, w).await;
    }
    let rows = tokenflow_hint_server::serve::refit(&a).await.unwrap();
    // The newest `train_windows` (400 in these settings) of the node's stream.
    assert_eq!(rows, Some(a.settings.train_windows.min(windows.len())));
    let m = a.models.load_full().expect("models swapped in");
    // The refitted models score a congested window above a calm one.
    let trace = Trace::load(&fixture()).unwrap();
    let mean = |want: bool| {
        let v: Vec<f64> = trace
            .features
            .iter()
            .zip(&trace.anomalous)
            .filter(|(_, a)| **a == want)
            .map(|(f, _)| m.anomaly(f))
            .collect();
        v.iter().sum::<f64>() / v.len() as f64
    };
    assert!(
        mean(true) > mean(false),
        "anomalous {} vs normal {}",
        mean(true),
        mean(false)
    );
}

/// Appends a window to its node's stream as the agent does (entry ID = window end time).
async fn append(con: &mut tokenflow_schema::store::Redis, w: &TelemetryWindow) {
    let _: String = con
        .xadd(
            keys::telemetry_stream(&w.node_id),
            format!("{}-*", w.end_unix_ms),
            &[(keys::WINDOW_FIELD, serde_json::to_string(w).unwrap())],
        )
        .await
        .unwrap();
}

#[tokio::test(flavor = "multi_thread")]
async fn the_dashboard_and_its_report_endpoints() {
    let redis = RedisServer::start_ephemeral().unwrap();
    let reports = Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/ab-reports");
    let r = router(app_with_results(&redis, None, None, Some(reports)).await);
    let (s, v) = call(&r, "GET", "/ui", None, None).await;
    assert_eq!(s, StatusCode::OK);
    assert!(
        v.as_str()
            .is_some_and(|h| h.contains("<title>TokenFlow dashboard</title>"))
    );
    let (s, v) = call(&r, "GET", "/ui/vendor/echarts.min.js", None, None).await;
    assert_eq!(s, StatusCode::OK);
    // Vendored by `cargo xtask setup` (the build says so when it is missing).
    assert!(
        v.as_str().is_some_and(|js| js.len() > 100_000),
        "ECharts not vendored"
    );

    let (s, v) = call(&r, "GET", "/v1/ab/reports", None, None).await;
    assert_eq!(s, StatusCode::OK, "{v}");
    let name = v[0]["name"].as_str().unwrap().to_string();
    assert_eq!(v[0]["arms"].as_array().unwrap().len(), 5, "{v}");
    let (s, v) = call(&r, "GET", &format!("/v1/ab/reports/{name}"), None, None).await;
    assert_eq!(s, StatusCode::OK);
    let nb = &v["cdf"]["network-bound"];
    assert_eq!(nb.as_object().unwrap().len(), 5, "arms with CDFs");
    let q = nb["off"]["batch"]["ttft_ms"].as_array().unwrap();
    assert_eq!(q.len(), 101);
    assert!(
        q.windows(2).all(|w| w[0].as_f64() <= w[1].as_f64()),
        "quantiles ascend"
    );

    for (uri, status) in [
        ("/v1/ab/reports/..", StatusCode::BAD_REQUEST),
        ("/v1/ab/reports/..%2F..%2Fetc", StatusCode::BAD_REQUEST),
        ("/v1/ab/reports/no-such-run", StatusCode::NOT_FOUND),
    ] {
        let (s, v) = call(&r, "GET", uri, None, None).await;
        assert_eq!(s, status, "{uri}: {v}");
        assert!(
            v["error"]["code"].is_string(),
            "{uri}: a JSON error, got {v}"
        );
    }
    // Without a results folder the A/B endpoints say how to get one.
    let bare = router(app(&redis, None, None).await);
    let (s, v) = call(&bare, "GET", "/v1/ab/reports", None, None).await;
    assert_eq!(s, StatusCode::NOT_FOUND);
    assert!(
        v["error"]["message"]
            .as_str()
            .unwrap()
            .contains("--results"),
        "{v}"
    );
}
