//! The HTTP API. Every error is JSON (`{"error": {"code", "message", "field"}}`) with a 4xx/5xx
//! status; bad input never gets a 200 with defaults.

use std::{convert::Infallible, net::SocketAddr, sync::Arc, time::Instant};

use anyhow::Context;
use axum::{
    Json, Router,
    extract::{
        FromRequestParts, Path, Query, State,
        rejection::{JsonRejection, QueryRejection},
    },
    http::{HeaderMap, StatusCode, request::Parts},
    middleware::{self, Next},
    response::{
        IntoResponse, Response,
        sse::{Event, KeepAlive, Sse},
    },
    routing::{get, post, put},
};
use futures_util::{Stream, StreamExt};
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder};
use redis::{AsyncCommands, streams::StreamRangeReply};
use serde::{Deserialize, Serialize};
use tokenflow_schema::{ClientConfig, ClientConfigInput, DispatchReport, Hint, keys};
use tokio_stream::wrappers::BroadcastStream;
use utoipa::{OpenApi, ToSchema};

use crate::serve::{App, conservative, unix_ms};

type AppState = Arc<App>;

#[derive(Debug, Serialize, ToSchema)]
pub struct ErrorBody {
    pub error: ErrorDetail,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct ErrorDetail {
    /// Machine-readable: `bad_request`, `unauthorized`, `forbidden`, `not_found`, `unavailable`.
    pub code: &'static str,
    pub message: String,
    /// The offending input field, when one is to blame.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub field: Option<String>,
}

pub struct ApiError {
    status: StatusCode,
    code: &'static str,
    message: String,
    field: Option<String>,
}

impl ApiError {
    pub(crate) fn bad(field: &str, message: impl Into<String>) -> Self {
        Self {
            status: StatusCode::BAD_REQUEST,
            code: "bad_request",
            message: message.into(),
            field: Some(field.into()),
        }
    }
    pub(crate) fn not_found(message: impl Into<String>) -> Self {
        Self {
            status: StatusCode::NOT_FOUND,
            code: "not_found",
            message: message.into(),
            field: None,
        }
    }
    pub(crate) fn unavailable(e: anyhow::Error) -> Self {
        metrics::counter!("tokenflow_hint_redis_errors_total").increment(1);
        Self {
            status: StatusCode::SERVICE_UNAVAILABLE,
            code: "unavailable",
            message: format!("Redis: {e:#}"),
            field: None,
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = ErrorBody {
            error: ErrorDetail {
                code: self.code,
                message: self.message,
                field: self.field,
            },
        };
        (self.status, Json(body)).into_response()
    }
}

impl From<JsonRejection> for ApiError {
    fn from(r: JsonRejection) -> Self {
        let text = r.body_text();
        // serde names the field: "unknown field `x`", or a path before the message
        // ("… target type: weight: invalid type …").
        let field = if let Some(rest) = text.split("unknown field `").nth(1) {
            rest.split('`').next().unwrap_or("body").to_string()
        } else if let Some(rest) = text.split("target type: ").nth(1)
            && let Some((path, _)) = rest.split_once(": ")
            && !path.contains(' ')
        {
            path.to_string()
        } else {
            "body".to_string()
        };
        Self {
            status: r.status(),
            code: "bad_request",
            message: text,
            field: Some(field),
        }
    }
}

impl From<QueryRejection> for ApiError {
    fn from(r: QueryRejection) -> Self {
        let text = r.body_text();
        let field = ["node", "from", "to", "limit"]
            .into_iter()
            .find(|f| text.contains(f))
            .unwrap_or("query");
        Self::bad(field, text)
    }
}

/// A client id from the path: 1–128 characters of [A-Za-z0-9._-].
pub struct ClientId(String);

impl FromRequestParts<AppState> for ClientId {
    type Rejection = ApiError;
    async fn from_request_parts(
        parts: &mut Parts,
        state: &AppState,
    ) -> Result<Self, Self::Rejection> {
        let Path(id) = Path::<String>::from_request_parts(parts, state)
            .await
            .map_err(|e| ApiError::bad("client_id", e.body_text()))?;
        if id.is_empty()
            || id.len() > 128
            || !id
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
        {
            return Err(ApiError::bad(
                "client_id",
                "1–128 characters of [A-Za-z0-9._-]",
            ));
        }
        Ok(Self(id))
    }
}

pub(crate) fn authorize(app: &App, headers: &HeaderMap, write: bool) -> Result<(), ApiError> {
    if !write && !app.settings.auth_reads {
        return Ok(());
    }
    let Some(token) = &app.settings.token else {
        return if write {
            Err(ApiError {
                status: StatusCode::FORBIDDEN,
                code: "forbidden",
                message: "writes are disabled: start the hint server with --token (or TOKENFLOW_HINT_TOKEN)".into(),
                field: None,
            })
        } else {
            Ok(())
        };
    };
    let given = headers
        .get(axum::http::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "));
    if given.is_some_and(|g| constant_time_eq(g.as_bytes(), token.as_bytes())) {
        Ok(())
    } else {
        Err(ApiError {
            status: StatusCode::UNAUTHORIZED,
            code: "unauthorized",
            message: "missing or wrong bearer token (Authorization: Bearer <token>)".into(),
            field: None,
        })
    }
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

#[utoipa::path(get, path = "/v1/hints/{client_id}",
    params(("client_id" = String, Path, description = "A registered client")),
    responses((status = 200, body = Hint), (status = 404, body = ErrorBody), (status = 400, body = ErrorBody)))]
async fn get_hint(
    State(app): State<AppState>,
    headers: HeaderMap,
    ClientId(id): ClientId,
) -> Result<Json<Hint>, ApiError> {
    authorize(&app, &headers, false)?;
    Ok(Json(current_hint(&app, &id).await?))
}

async fn current_hint(app: &App, id: &str) -> Result<Hint, ApiError> {
    if let Some(h) = app.cached(id, unix_ms()) {
        return Ok(h);
    }
    let Some(cfg) = app.store.client(id).await.map_err(ApiError::unavailable)? else {
        return Err(ApiError::not_found(format!(
            "client {id} is not registered: PUT /v1/clients/{id} first"
        )));
    };
    match app.store.hint(id).await.map_err(ApiError::unavailable)? {
        Some(h) => Ok(h),
        None => Ok(conservative(
            id,
            &cfg,
            unix_ms(),
            app.settings.interval.as_millis() as u64,
            "no recent telemetry for this client's node: conservative rate",
        )),
    }
}

#[utoipa::path(get, path = "/v1/hints/{client_id}/stream",
    params(("client_id" = String, Path)),
    responses((status = 200, description = "text/event-stream of Hint JSON, one event per change")))]
async fn stream_hint(
    State(app): State<AppState>,
    headers: HeaderMap,
    ClientId(id): ClientId,
) -> Result<Sse<impl Stream<Item = Result<Event, Infallible>>>, ApiError> {
    authorize(&app, &headers, false)?;
    let first = current_hint(&app, &id).await?;
    let rx = BroadcastStream::new(app.hints.subscribe());
    // Every issued hint, also an unchanged one: each renews the TTL the client holds it by, so a
    // steady limit must keep arriving or the client would fall back to its safe floor.
    let updates = rx.filter_map(move |h| {
        std::future::ready(match h {
            Ok(h) if h.client_id == id => Some(h),
            _ => None,
        })
    });
    let events = futures_util::stream::once(std::future::ready(first))
        .chain(updates)
        .map(|h| {
            Ok(Event::default()
                .event("hint")
                .json_data(&h)
                .unwrap_or_default())
        });
    Ok(Sse::new(events).keep_alive(KeepAlive::default()))
}

#[derive(Debug, Serialize, ToSchema)]
pub struct NodeInfo {
    pub node_id: String,
    /// The agent's latest summary (absent when it stopped writing).
    #[schema(value_type = Object)]
    pub latest: Option<tokenflow_schema::NodeSummary>,
    pub windows_seen: u64,
    pub last_window_end_unix_ms: u64,
    pub anomaly_score: f64,
    pub predicted_rtt_ms: Option<f64>,
    pub observed_rtt_ms: Option<f64>,
    pub stale: bool,
    pub clients: Vec<String>,
}

#[utoipa::path(get, path = "/v1/nodes", responses((status = 200, body = Vec<NodeInfo>)))]
async fn nodes(
    State(app): State<AppState>,
    headers: HeaderMap,
) -> Result<Json<Vec<NodeInfo>>, ApiError> {
    authorize(&app, &headers, false)?;
    let clients = app.store.clients().await.map_err(ApiError::unavailable)?;
    let interval_ms = app.settings.interval.as_millis() as u64;
    let mut out = Vec::new();
    for n in app.store.nodes().await.map_err(ApiError::unavailable)? {
        let st = app
            .store
            .node_state(&n)
            .await
            .map_err(ApiError::unavailable)?;
        out.push(NodeInfo {
            latest: app.store.latest(&n).await.map_err(ApiError::unavailable)?,
            windows_seen: st.windows,
            last_window_end_unix_ms: st.last_window_end_ms,
            anomaly_score: st.last_anomaly,
            predicted_rtt_ms: st.last_predicted_ms,
            observed_rtt_ms: st.last_p95_ms,
            stale: crate::engine::is_stale(&st, unix_ms(), interval_ms),
            clients: clients
                .iter()
                .filter(|(_, c)| c.node_id == n)
                .map(|(id, _)| id.clone())
                .collect(),
            node_id: n,
        });
    }
    Ok(Json(out))
}

#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[serde(deny_unknown_fields)]
pub struct HistoryQuery {
    /// Node id.
    pub node: String,
    /// Start, unix milliseconds (inclusive).
    pub from: u64,
    /// End, unix milliseconds (inclusive).
    pub to: u64,
    /// Most windows returned (default and maximum 3600).
    pub limit: Option<usize>,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct History {
    pub node: String,
    pub from: u64,
    pub to: u64,
    pub count: usize,
    /// Telemetry windows (JSON Schema at /v1/schema/telemetry-window).
    #[schema(value_type = Vec<Object>)]
    pub windows: Vec<serde_json::Value>,
}

pub const HISTORY_MAX: usize = 3600;

#[utoipa::path(get, path = "/v1/history", params(HistoryQuery),
    responses((status = 200, body = History), (status = 400, body = ErrorBody)))]
async fn history(
    State(app): State<AppState>,
    headers: HeaderMap,
    q: Result<Query<HistoryQuery>, QueryRejection>,
) -> Result<Json<History>, ApiError> {
    authorize(&app, &headers, false)?;
    let Query(q) = q?;
    if q.from > q.to {
        return Err(ApiError::bad("from", "from must not be after to"));
    }
    let limit = q.limit.unwrap_or(HISTORY_MAX);
    if limit == 0 || limit > HISTORY_MAX {
        return Err(ApiError::bad("limit", format!("1 … {HISTORY_MAX}")));
    }
    // Stream IDs are window end times in ms (the agent writes `<end_ms>-*`).
    let reply: StreamRangeReply = app
        .store
        .con
        .clone()
        .xrange_count(
            keys::telemetry_stream(&q.node),
            q.from,
            format!("{}-18446744073709551615", q.to),
            limit,
        )
        .await
        .map_err(|e| ApiError::unavailable(e.into()))?;
    let windows: Vec<serde_json::Value> = reply
        .ids
        .iter()
        .filter_map(|e| e.get::<String>(keys::WINDOW_FIELD))
        .filter_map(|j| serde_json::from_str(&j).ok())
        .collect();
    Ok(Json(History {
        node: q.node,
        from: q.from,
        to: q.to,
        count: windows.len(),
        windows,
    }))
}

#[utoipa::path(put, path = "/v1/clients/{client_id}", request_body = ClientConfigInput,
    params(("client_id" = String, Path)),
    responses((status = 200, body = ClientConfig), (status = 400, body = ErrorBody), (status = 401, body = ErrorBody), (status = 403, body = ErrorBody)))]
async fn put_client(
    State(app): State<AppState>,
    headers: HeaderMap,
    ClientId(id): ClientId,
    body: Result<Json<ClientConfigInput>, JsonRejection>,
) -> Result<Json<ClientConfig>, ApiError> {
    authorize(&app, &headers, true)?;
    let Json(input) = body?;
    let current = app.store.client(&id).await.map_err(ApiError::unavailable)?;
    let cfg =
        ClientConfig::merge(current.as_ref(), &input).map_err(|(f, m)| ApiError::bad(&f, m))?;
    app.store
        .put_client(&id, &cfg)
        .await
        .map_err(ApiError::unavailable)?;
    app.clients_changed();
    tracing::info!(client = %id, node = %cfg.node_id, controller = cfg.controller.as_str(), "client settings stored");
    Ok(Json(cfg))
}

#[utoipa::path(post, path = "/v1/clients/{client_id}/dispatched", request_body = DispatchReport,
    params(("client_id" = String, Path, description = "A registered client")),
    responses((status = 204, description = "recorded: the client's next hints say what it sent in each telemetry window"),
        (status = 400, body = ErrorBody), (status = 401, body = ErrorBody), (status = 403, body = ErrorBody), (status = 404, body = ErrorBody)))]
async fn post_dispatched(
    State(app): State<AppState>,
    headers: HeaderMap,
    ClientId(id): ClientId,
    body: Result<Json<DispatchReport>, JsonRejection>,
) -> Result<StatusCode, ApiError> {
    authorize(&app, &headers, true)?;
    let Json(report) = body?;
    let clients = app.clients().await.map_err(ApiError::unavailable)?;
    if !clients.iter().any(|(c, _)| *c == id) {
        return Err(ApiError::not_found(format!(
            "client {id} is not registered"
        )));
    }
    app.store
        .record_dispatched(&id, unix_ms(), report.requests_total)
        .await
        .map_err(ApiError::unavailable)?;
    Ok(StatusCode::NO_CONTENT)
}

#[utoipa::path(get, path = "/v1/clients/{client_id}", params(("client_id" = String, Path)),
    responses((status = 200, body = ClientConfig), (status = 404, body = ErrorBody)))]
async fn get_client(
    State(app): State<AppState>,
    headers: HeaderMap,
    ClientId(id): ClientId,
) -> Result<Json<ClientConfig>, ApiError> {
    authorize(&app, &headers, false)?;
    app.store
        .client(&id)
        .await
        .map_err(ApiError::unavailable)?
        .map(Json)
        .ok_or_else(|| ApiError::not_found(format!("client {id} is not registered")))
}

#[utoipa::path(delete, path = "/v1/clients/{client_id}", params(("client_id" = String, Path)),
    responses((status = 204, description = "the client and its hint are removed; its share goes to the node's other clients"), (status = 401, body = ErrorBody), (status = 403, body = ErrorBody), (status = 404, body = ErrorBody)))]
async fn delete_client(
    State(app): State<AppState>,
    headers: HeaderMap,
    ClientId(id): ClientId,
) -> Result<StatusCode, ApiError> {
    authorize(&app, &headers, true)?;
    let removed = app
        .store
        .delete_client(&id)
        .await
        .map_err(ApiError::unavailable)?;
    app.clients_changed();
    app.cache
        .write()
        .unwrap_or_else(|p| p.into_inner())
        .remove(&id);
    if !removed {
        return Err(ApiError::not_found(format!(
            "client {id} is not registered"
        )));
    }
    tracing::info!(client = %id, "client removed");
    Ok(StatusCode::NO_CONTENT)
}

#[utoipa::path(get, path = "/healthz", responses((status = 200, description = "the process is up")))]
async fn healthz() -> &'static str {
    "ok\n"
}

#[utoipa::path(get, path = "/readyz", responses((status = 200, description = "Redis answers and ingest runs"), (status = 503, body = ErrorBody)))]
async fn readyz(State(app): State<AppState>) -> Result<&'static str, ApiError> {
    app.store.ping().await.map_err(ApiError::unavailable)?;
    if !app.ingest_alive.load(std::sync::atomic::Ordering::Relaxed) {
        return Err(ApiError {
            status: StatusCode::SERVICE_UNAVAILABLE,
            code: "unavailable",
            message: "ingest is not running yet".into(),
            field: None,
        });
    }
    Ok("ready\n")
}

#[derive(OpenApi)]
#[openapi(
    info(
        title = "TokenFlow hint server",
        description = "Per-client rate limits from TCP telemetry"
    ),
    paths(
        get_hint,
        stream_hint,
        nodes,
        history,
        put_client,
        post_dispatched,
        get_client,
        delete_client,
        healthz,
        readyz
    ),
    components(schemas(
        Hint,
        ClientConfig,
        ClientConfigInput,
        DispatchReport,
        ErrorBody,
        ErrorDetail,
        NodeInfo,
        History
    ))
)]
pub struct ApiDoc;

async fn openapi() -> Json<utoipa::openapi::OpenApi> {
    Json(ApiDoc::openapi())
}

async fn window_schema() -> Json<serde_json::Value> {
    Json(tokenflow_schema::telemetry_window_schema())
}

async fn fallback() -> ApiError {
    ApiError::not_found("no such route; see /openapi.json")
}

async fn track(req: axum::extract::Request, next: Next) -> Response {
    let route = req
        .extensions()
        .get::<axum::extract::MatchedPath>()
        .map_or("unmatched".to_string(), |p| p.as_str().to_string());
    let t0 = Instant::now();
    let resp = next.run(req).await;
    let status = resp.status().as_u16().to_string();
    metrics::counter!("tokenflow_hint_http_requests_total", "route" => route.clone(), "status" => status).increment(1);
    metrics::histogram!("tokenflow_hint_http_request_duration_seconds", "route" => route)
        .record(t0.elapsed().as_secs_f64());
    resp
}

pub fn router(app: AppState) -> Router {
    Router::new()
        .route("/v1/hints/{client_id}", get(get_hint))
        .route("/v1/hints/{client_id}/stream", get(stream_hint))
        .route("/v1/nodes", get(nodes))
        .route("/v1/history", get(history))
        .route(
            "/v1/clients/{client_id}",
            put(put_client).get(get_client).delete(delete_client),
        )
        .route("/v1/clients/{client_id}/dispatched", post(post_dispatched))
        .route("/v1/schema/telemetry-window", get(window_schema))
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .route("/openapi.json", get(openapi))
        .merge(crate::ui::routes())
        .fallback(fallback)
        .route_layer(middleware::from_fn(track))
        .with_state(app)
}

/// Serves `/metrics` on its own port.
pub fn install_metrics(addr: SocketAddr) -> anyhow::Result<()> {
    PrometheusBuilder::new()
        .set_buckets_for_metric(
            Matcher::Suffix("seconds".into()),
            &[
                1e-5, 2.5e-5, 5e-5, 1e-4, 2.5e-4, 5e-4, 1e-3, 2.5e-3, 5e-3, 1e-2, 2.5e-2, 0.1, 0.5,
                2.0, 10.0,
            ],
        )
        .context("configuring histogram buckets")?
        .with_http_listener(addr)
        .install()
        .with_context(|| {
            format!("serving metrics on {addr} (is the port in use? use --metrics-addr)")
        })?;
    // Counters of rare events exist from the start at 0 (Prometheus' advice: a series that
    // appears only on the first error makes rate() and alerts miss it).
    for name in [
        "tokenflow_hint_redis_errors_total",
        "tokenflow_hint_stale_decisions_total",
        "tokenflow_hint_model_refits_total",
        "tokenflow_hint_windows_total",
    ] {
        metrics::counter!(name).absolute(0);
    }
    Ok(())
}

/// Names this server exports, for the convention test and the dashboards.
pub const METRIC_NAMES: [&str; 13] = [
    "tokenflow_hint_windows_total",
    "tokenflow_hint_hints_total",
    "tokenflow_hint_decision_seconds",
    "tokenflow_hint_anomaly_score",
    "tokenflow_hint_predicted_rtt_seconds",
    "tokenflow_hint_rate_limit_requests_per_second",
    "tokenflow_hint_stale_decisions_total",
    "tokenflow_hint_redis_errors_total",
    "tokenflow_hint_training_seconds",
    "tokenflow_hint_model_refits_total",
    "tokenflow_hint_http_requests_total",
    "tokenflow_hint_http_request_duration_seconds",
    "tokenflow_hint_replicas",
];
