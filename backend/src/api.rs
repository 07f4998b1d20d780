//! The OpenAI-compatible API, as vLLM serves it: chat and text completions (streaming SSE with
//! `data:` chunks and `data: [DONE]`, or one JSON body), `/v1/models`, `/health`, `/metrics`.
//! Errors use OpenAI's body: `{"error": {"message", "type", "param", "code"}}`.

use std::{
    convert::Infallible,
    sync::Arc,
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use axum::{
    Json, Router,
    extract::{State, rejection::JsonRejection},
    http::{HeaderValue, StatusCode, header},
    response::{
        IntoResponse, Response,
        sse::{Event as SseEvent, Sse},
    },
    routing::{get, post},
};
use futures_util::{Stream, StreamExt};
use metrics_exporter_prometheus::PrometheusHandle;
use serde::Deserialize;
use serde_json::{Value, json};
use tokio::sync::mpsc::{UnboundedReceiver, unbounded_channel};
use tokio_stream::wrappers::UnboundedReceiverStream;

use crate::{
    engine::{Engine, Event, Finish, Refused, Request},
    model::Model,
};

pub struct AppState {
    pub engine: Arc<Engine>,
    pub tokenizer: tokenizers::Tokenizer,
    pub bos: Option<u32>,
    pub metrics: Option<PrometheusHandle>,
    pub started: Instant,
}

impl AppState {
    pub fn new(engine: Arc<Engine>, model: &Model, metrics: Option<PrometheusHandle>) -> Arc<Self> {
        Arc::new(Self {
            engine,
            tokenizer: model.tokenizer.clone(),
            bos: model.bos,
            metrics,
            started: Instant::now(),
        })
    }
}

pub struct ApiError {
    status: StatusCode,
    kind: &'static str,
    message: String,
    param: Option<String>,
    retry_after: Option<u64>,
}

impl ApiError {
    fn bad(param: &str, message: impl Into<String>) -> Self {
        Self {
            status: StatusCode::BAD_REQUEST,
            kind: "BadRequestError",
            message: message.into(),
            param: Some(param.into()),
            retry_after: None,
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = json!({"error": {
            "message": self.message,
            "type": self.kind,
            "param": self.param,
            "code": self.status.as_u16(),
        }});
        let mut r = (self.status, Json(body)).into_response();
        if let Some(s) = self.retry_after
            && let Ok(v) = HeaderValue::from_str(&s.to_string())
        {
            r.headers_mut().insert(header::RETRY_AFTER, v);
        }
        r
    }
}

impl From<JsonRejection> for ApiError {
    fn from(r: JsonRejection) -> Self {
        let text = r.body_text();
        let param = text
            .split("target type: ")
            .nth(1)
            .and_then(|rest| rest.split_once(": "))
            .map(|(p, _)| p.to_string())
            .filter(|p| !p.contains(' '))
            .unwrap_or_else(|| "body".into());
        Self {
            status: StatusCode::BAD_REQUEST,
            kind: "BadRequestError",
            message: text,
            param: Some(param),
            retry_after: None,
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(untagged)]
pub enum OneOrMany {
    One(String),
    Many(Vec<String>),
}

#[derive(Debug, Deserialize)]
pub struct Message {
    pub role: String,
    pub content: String,
}

#[derive(Debug, Deserialize)]
pub struct StreamOptions {
    #[serde(default)]
    pub include_usage: bool,
}

/// The body of both endpoints: `messages` for chat, `prompt` for completions, the rest shared.
/// Other OpenAI fields are accepted and ignored, as vLLM does.
#[derive(Debug, Deserialize)]
pub struct GenerateRequest {
    pub messages: Option<Vec<Message>>,
    pub prompt: Option<OneOrMany>,
    pub model: String,
    pub max_tokens: Option<u32>,
    pub max_completion_tokens: Option<u32>,
    pub temperature: Option<f64>,
    pub top_p: Option<f64>,
    pub seed: Option<u64>,
    pub stop: Option<OneOrMany>,
    #[serde(default)]
    pub stream: bool,
    pub stream_options: Option<StreamOptions>,
    pub n: Option<u32>,
    /// vLLM's extension: keep only the last k prompt tokens (long contexts on a short model).
    pub truncate_prompt_tokens: Option<u32>,
    /// vLLM's extension: keep generating past the end-of-sequence token (fixed output lengths,
    /// as benchmarks want).
    #[serde(default)]
    pub ignore_eos: bool,
}

fn check_model(st: &AppState, model: &str) -> Result<(), ApiError> {
    if model == st.engine.model_name {
        return Ok(());
    }
    Err(ApiError {
        status: StatusCode::NOT_FOUND,
        kind: "NotFoundError",
        message: format!("The model `{model}` does not exist."),
        param: Some("model".into()),
        retry_after: None,
    })
}

#[derive(Clone, Copy, PartialEq)]
enum Kind {
    Chat,
    Text,
}

/// The chat template: one line per message, then the assistant's turn.
pub fn chat_prompt(messages: &[Message]) -> String {
    let mut p = String::new();
    for m in messages {
        p.push_str(&m.role);
        p.push_str(": ");
        p.push_str(&m.content);
        p.push('\n');
    }
    p.push_str("assistant:");
    p
}

async fn chat(
    State(st): State<Arc<AppState>>,
    body: Result<Json<GenerateRequest>, JsonRejection>,
) -> Result<Response, ApiError> {
    let Json(mut req) = body?;
    check_model(&st, &req.model)?;
    let messages = req.messages.take().unwrap_or_default();
    if messages.is_empty() {
        return Err(ApiError::bad("messages", "messages must not be empty"));
    }
    if let Some(i) = messages.iter().position(|m| {
        !["system", "user", "assistant", "tool", "developer"].contains(&m.role.as_str())
    }) {
        return Err(ApiError::bad(
            &format!("messages[{i}].role"),
            format!("unknown role {}", messages[i].role),
        ));
    }
    generate(st, Kind::Chat, chat_prompt(&messages), req).await
}

async fn completions(
    State(st): State<Arc<AppState>>,
    body: Result<Json<GenerateRequest>, JsonRejection>,
) -> Result<Response, ApiError> {
    let Json(mut req) = body?;
    check_model(&st, &req.model)?;
    let prompt = match req.prompt.take() {
        Some(OneOrMany::One(p)) => p,
        Some(OneOrMany::Many(mut v)) if v.len() == 1 => v.remove(0),
        Some(OneOrMany::Many(_)) => return Err(ApiError::bad("prompt", "one prompt per request")),
        None => return Err(ApiError::bad("prompt", "prompt is required")),
    };
    generate(st, Kind::Text, prompt, req).await
}

async fn generate(
    st: Arc<AppState>,
    kind: Kind,
    prompt: String,
    c: GenerateRequest,
) -> Result<Response, ApiError> {
    let submitted = Instant::now();
    if c.n.unwrap_or(1) != 1 {
        return Err(ApiError::bad("n", "only n = 1 is served"));
    }
    let temperature = c.temperature.unwrap_or(1.0);
    if !(0.0..=2.0).contains(&temperature) {
        return Err(ApiError::bad(
            "temperature",
            "temperature must be within [0, 2]",
        ));
    }
    if let Some(p) = c.top_p
        && !(p > 0.0 && p <= 1.0)
    {
        return Err(ApiError::bad("top_p", "top_p must be within (0, 1]"));
    }
    let truncate = match c.truncate_prompt_tokens {
        Some(0) => {
            return Err(ApiError::bad(
                "truncate_prompt_tokens",
                "truncate_prompt_tokens must be ≥ 1",
            ));
        }
        t => t.map(|k| k as usize),
    };
    // With truncation only the prompt's tail is tokenized: no token is shorter than one byte, and a
    // BPE token here is far shorter than 16 bytes, so the last k tokens lie within the last 16·k bytes.
    let text = match truncate {
        Some(k) if prompt.len() > 16 * k => {
            let mut cut = prompt.len() - 16 * k;
            while !prompt.is_char_boundary(cut) {
                cut += 1;
            }
            &prompt[cut..]
        }
        _ => prompt.as_str(),
    };
    let enc = st
        .tokenizer
        .encode(text, false)
        .map_err(|e| ApiError::bad("prompt", format!("cannot tokenize: {e}")))?;
    let tokens = enc.get_ids();
    let tokens = &tokens[tokens.len() - truncate.unwrap_or(usize::MAX).min(tokens.len())..];
    let mut ids: Vec<u32> = st.bos.into_iter().collect();
    ids.extend_from_slice(tokens);
    let max_len = st.engine.max_len;
    let max_tokens = c.max_completion_tokens.or(c.max_tokens).unwrap_or(16) as usize;
    if max_tokens == 0 {
        return Err(ApiError::bad("max_tokens", "max_tokens must be ≥ 1"));
    }
    if ids.len() + max_tokens > max_len {
        return Err(ApiError::bad(
            "max_tokens",
            format!(
                "This model's maximum context length is {max_len} tokens. However, you requested {} tokens ({} in the messages, {max_tokens} in the completion).",
                ids.len() + max_tokens,
                ids.len()
            ),
        ));
    }
    let stop = match c.stop {
        None => Vec::new(),
        Some(OneOrMany::One(s)) => vec![s],
        Some(OneOrMany::Many(v)) => v,
    };
    if stop.iter().any(String::is_empty) || stop.len() > 4 {
        return Err(ApiError::bad("stop", "up to 4 non-empty stop sequences"));
    }
    let (tx, mut rx) = unbounded_channel();
    let id = st.engine.next_id();
    let req = Request {
        id,
        prompt: ids,
        max_tokens,
        temperature,
        top_p: c.top_p,
        seed: c.seed.unwrap_or_else(|| fastrand::u64(..)),
        stop,
        ignore_eos: c.ignore_eos,
        submitted,
        events: tx,
    };
    match st.engine.submit(req) {
        Ok(()) => {}
        Err(Refused::Overloaded) => {
            metrics::counter!("tokenflow_backend_rejected_total").increment(1);
            return Err(ApiError {
                status: StatusCode::TOO_MANY_REQUESTS,
                kind: "RateLimitError",
                message: format!(
                    "the waiting queue is full ({} requests): retry later",
                    st.engine.limits.max_waiting
                ),
                param: None,
                retry_after: Some(1),
            });
        }
        Err(Refused::Stopped) => {
            return Err(ApiError {
                status: StatusCode::SERVICE_UNAVAILABLE,
                kind: "ServiceUnavailableError",
                message: "the scheduler stopped".into(),
                param: None,
                retry_after: None,
            });
        }
    }
    let created = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    let rid = match kind {
        Kind::Chat => format!("chatcmpl-{id:016x}"),
        Kind::Text => format!("cmpl-{id:016x}"),
    };
    let model = st.engine.model_name.clone();
    if c.stream {
        // A stream answers at once, as vLLM's does: its headers leave before prefill (the request's
        // timing is in the final chunk), and the role chunk comes with the first token. Holding the
        // headers until prefill also held the kernel's acknowledgement of the request's last
        // segment (a delayed ACK rides on the response), so every RTT sample of a streaming
        // client's connection carried the server's queueing and prefill: on the network-bound test
        // bed 18 ms more than the probe's concurrent samples at the median, 31 ms at the p90.
        let include_usage = c.stream_options.is_some_and(|o| o.include_usage);
        return Ok(Sse::new(stream(rx, kind, rid, model, created, include_usage)).into_response());
    }
    // Wait for prefill, so the timing headers are known.
    let (queue, prefill) = match rx.recv().await {
        Some(Event::Started { queue, prefill }) => (queue, prefill),
        Some(Event::Failed(e)) => {
            return Err(ApiError {
                status: StatusCode::INTERNAL_SERVER_ERROR,
                kind: "InternalServerError",
                message: e,
                param: None,
                retry_after: None,
            });
        }
        _ => {
            return Err(ApiError {
                status: StatusCode::INTERNAL_SERVER_ERROR,
                kind: "InternalServerError",
                message: "the request ended before its first token".into(),
                param: None,
                retry_after: None,
            });
        }
    };
    let (text, fin) = collect(&mut rx).await?;
    let mut resp = Json(whole(kind, &rid, &model, created, &text, &fin)).into_response();
    let h = resp.headers_mut();
    for (k, v) in [("x-queue-time-ms", queue), ("x-prefill-time-ms", prefill)] {
        if let Ok(v) = HeaderValue::from_str(&format!("{:.3}", v.as_secs_f64() * 1000.0)) {
            h.insert(k, v);
        }
    }
    Ok(resp)
}

async fn collect(rx: &mut UnboundedReceiver<Event>) -> Result<(String, Finish), ApiError> {
    let mut text = String::new();
    while let Some(e) = rx.recv().await {
        match e {
            Event::Text(t) => text.push_str(&t),
            Event::Done(f) => return Ok((text, f)),
            Event::Failed(m) => {
                return Err(ApiError {
                    status: StatusCode::INTERNAL_SERVER_ERROR,
                    kind: "InternalServerError",
                    message: m,
                    param: None,
                    retry_after: None,
                });
            }
            Event::Started { .. } => {}
        }
    }
    Err(ApiError {
        status: StatusCode::INTERNAL_SERVER_ERROR,
        kind: "InternalServerError",
        message: "generation stopped".into(),
        param: None,
        retry_after: None,
    })
}

fn usage(f: &Finish) -> Value {
    json!({"prompt_tokens": f.prompt_tokens, "completion_tokens": f.completion_tokens, "total_tokens": f.prompt_tokens + f.completion_tokens})
}

fn timing(f: &Finish) -> Value {
    json!({"queue_time_ms": f.queue.as_secs_f64() * 1000.0, "prefill_time_ms": f.prefill.as_secs_f64() * 1000.0})
}

fn whole(kind: Kind, id: &str, model: &str, created: u64, text: &str, f: &Finish) -> Value {
    let choice = match kind {
        Kind::Chat => {
            json!({"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": null, "finish_reason": f.reason})
        }
        Kind::Text => {
            json!({"index": 0, "text": text, "logprobs": null, "finish_reason": f.reason})
        }
    };
    json!({
        "id": id,
        "object": if kind == Kind::Chat { "chat.completion" } else { "text_completion" },
        "created": created,
        "model": model,
        "choices": [choice],
        "usage": usage(f),
        "tokenflow": timing(f),
    })
}

fn chunk(kind: Kind, id: &str, model: &str, created: u64, choices: Value) -> Value {
    json!({
        "id": id,
        "object": if kind == Kind::Chat { "chat.completion.chunk" } else { "text_completion" },
        "created": created,
        "model": model,
        "choices": choices,
    })
}

fn stream(
    rx: UnboundedReceiver<Event>,
    kind: Kind,
    id: String,
    model: String,
    created: u64,
    include_usage: bool,
) -> impl Stream<Item = Result<SseEvent, Infallible>> {
    // Whether the request ended as it should (finished or failed, each with its own chunk): a
    // stream whose scheduler went away first ends with an error rather than a silent `[DONE]`.
    let ended = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let seen = ended.clone();
    let body = UnboundedReceiverStream::new(rx).flat_map(move |e| {
        if matches!(e, Event::Done(_) | Event::Failed(_)) {
            seen.store(true, std::sync::atomic::Ordering::Relaxed);
        }
        let out: Vec<Value> = match e {
            // Prefill is done: the role chunk comes with the first token, as vLLM's does.
            Event::Started { .. } => match kind {
                Kind::Chat => vec![chunk(kind, &id, &model, created, json!([{"index": 0, "delta": {"role": "assistant", "content": ""}, "logprobs": null, "finish_reason": null}]))],
                Kind::Text => Vec::new(),
            },
            Event::Text(t) => vec![match kind {
                Kind::Chat => chunk(kind, &id, &model, created, json!([{"index": 0, "delta": {"content": t}, "logprobs": null, "finish_reason": null}])),
                Kind::Text => chunk(kind, &id, &model, created, json!([{"index": 0, "text": t, "logprobs": null, "finish_reason": null}])),
            }],
            Event::Done(f) => {
                let last = match kind {
                    Kind::Chat => json!([{"index": 0, "delta": {}, "logprobs": null, "finish_reason": f.reason}]),
                    Kind::Text => json!([{"index": 0, "text": "", "logprobs": null, "finish_reason": f.reason}]),
                };
                let mut fin = chunk(kind, &id, &model, created, last);
                fin["tokenflow"] = timing(&f);
                let mut v = vec![fin];
                if include_usage {
                    let mut u = chunk(kind, &id, &model, created, json!([]));
                    u["usage"] = usage(&f);
                    v.push(u);
                }
                v
            }
            Event::Failed(m) => vec![json!({"error": {"message": m, "type": "InternalServerError", "param": null, "code": 500}})],
        };
        futures_util::stream::iter(out)
    });
    let cut_short = futures_util::stream::once(async move {
        (!ended.load(std::sync::atomic::Ordering::Relaxed)).then(|| {
            json!({"error": {"message": "the request ended before it finished", "type": "InternalServerError", "param": null, "code": 500}})
        })
    })
    .filter_map(futures_util::future::ready);
    body.chain(cut_short)
        .map(|v| Ok(SseEvent::default().data(v.to_string())))
        .chain(futures_util::stream::once(async {
            Ok(SseEvent::default().data("[DONE]"))
        }))
}

async fn models(State(st): State<Arc<AppState>>) -> Json<Value> {
    Json(json!({"object": "list", "data": [{
        "id": st.engine.model_name, "object": "model", "owned_by": "tokenflow",
        "created": SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0),
        "max_model_len": st.engine.max_len,
    }]}))
}

async fn health() -> StatusCode {
    StatusCode::OK
}

async fn metrics_text(State(st): State<Arc<AppState>>) -> Response {
    match &st.metrics {
        Some(h) => (
            [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
            h.render(),
        )
            .into_response(),
        None => (StatusCode::NOT_FOUND, "metrics are off\n").into_response(),
    }
}

async fn fallback() -> ApiError {
    ApiError {
        status: StatusCode::NOT_FOUND,
        kind: "NotFoundError",
        message: "no such route".into(),
        param: None,
        retry_after: None,
    }
}

pub fn router(st: Arc<AppState>) -> Router {
    Router::new()
        .route("/v1/chat/completions", post(chat))
        .route("/v1/completions", post(completions))
        .route("/v1/models", get(models))
        .route("/health", get(health))
        .route("/metrics", get(metrics_text))
        .fallback(fallback)
        .with_state(st)
}

/// The Prometheus recorder, installed globally, with vLLM's histogram buckets.
pub fn install_metrics() -> anyhow::Result<PrometheusHandle> {
    use metrics_exporter_prometheus::{Matcher, PrometheusBuilder};
    let b = PrometheusBuilder::new()
        .set_buckets_for_metric(
            Matcher::Full("vllm:time_to_first_token_seconds".into()),
            &[
                0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0,
                7.5, 10.0,
            ],
        )?
        .set_buckets_for_metric(
            Matcher::Full("vllm:time_per_output_token_seconds".into()),
            &[
                0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5,
            ],
        )?
        .set_buckets_for_metric(
            Matcher::Full("vllm:e2e_request_latency_seconds".into()),
            &[
                0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0,
            ],
        )?;
    let recorder = b.build_recorder();
    let handle = recorder.handle();
    metrics::set_global_recorder(recorder)
        .map_err(|e| anyhow::anyhow!("installing the metrics recorder: {e}"))?;
    // Counters of rare events exist from the start at 0, so rate() and alerts see them before
    // the first overload or disconnect.
    for name in [
        "tokenflow_backend_rejected_total",
        "tokenflow_backend_cancelled_total",
    ] {
        metrics::counter!(name).absolute(0);
    }
    Ok(handle)
}

pub const RETRY_AFTER_S: Duration = Duration::from_secs(1);
