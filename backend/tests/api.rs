//! The OpenAI contract, in process (no socket), against the real tiny model.
// Helpers outside `#[test]` functions panic on set-up failures: that is the test failing.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::{
    path::PathBuf,
    sync::{
        Arc, OnceLock,
        atomic::{AtomicUsize, Ordering},
    },
    time::{Duration, Instant},
};

use axum::{
    Router,
    body::Body,
    http::{Request, StatusCode},
};
use http_body_util::BodyExt;
use serde_json::{Value, json};
use tokenflow_backend::{
    api::{AppState, Message, chat_prompt, router},
    engine::{Engine, Limits},
    model::{Model, Size, init},
};
use tower::ServiceExt;

fn model_dir() -> PathBuf {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let d = std::env::temp_dir().join(format!("tf-backend-test-{}", std::process::id()));
        init(Size::Tiny, &d, 7).unwrap();
        d
    })
    .clone()
}

fn app(limits: Limits) -> (Router, Arc<Engine>, Model) {
    let dir = model_dir();
    let engine = Engine::start(Model::load(&dir, candle_core::Device::Cpu).unwrap(), limits);
    let model = Model::load(&dir, candle_core::Device::Cpu).unwrap();
    let st = AppState::new(engine.clone(), &model, None);
    (router(st), engine, model)
}

fn limits() -> Limits {
    Limits {
        max_running: 4,
        max_waiting: 16,
        token_budget: 512,
    }
}

async fn post(r: &Router, path: &str, body: Value) -> (StatusCode, axum::http::HeaderMap, String) {
    let req = Request::post(path)
        .header("content-type", "application/json")
        .body(Body::from(body.to_string()))
        .unwrap();
    let resp = r.clone().oneshot(req).await.unwrap();
    let (status, headers) = (resp.status(), resp.headers().clone());
    let bytes = resp.into_body().collect().await.unwrap().to_bytes();
    (status, headers, String::from_utf8(bytes.to_vec()).unwrap())
}

/// Waits up to 2 s for a scheduler count (published at the end of each step) to read `value`.
async fn settles(count: &AtomicUsize, value: usize, what: &str) {
    let t0 = Instant::now();
    while count.load(Ordering::SeqCst) != value {
        assert!(t0.elapsed() < Duration::from_secs(2), "{what}");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

fn model_name() -> String {
    model_dir()
        .file_name()
        .unwrap()
        .to_string_lossy()
        .into_owned()
}

#[tokio::test(flavor = "multi_thread")]
async fn chat_stream_is_framed_as_vllm_frames_it_and_counts_tokens_with_the_tokenizer() {
    let (r, _, model) = app(limits());
    let messages = json!([{"role": "user", "content": "How full is the queue?"}]);
    let (s, h, body) = post(
        &r,
        "/v1/chat/completions",
        json!({"model": model_name(), "messages": messages, "max_tokens": 12, "stream": true, "stream_options": {"include_usage": true}, "seed": 3}),
    )
    .await;
    assert_eq!(s, StatusCode::OK, "{body}");
    assert_eq!(h["content-type"], "text/event-stream");
    // A stream's headers leave before prefill: its timing is in the final chunk instead.
    assert!(!h.contains_key("x-prefill-time-ms"));
    let events: Vec<&str> = body.split("\n\n").filter(|e| !e.is_empty()).collect();
    assert!(events.iter().all(|e| e.starts_with("data: ")), "{body}");
    assert_eq!(*events.last().unwrap(), "data: [DONE]");
    let chunks: Vec<Value> = events[..events.len() - 1]
        .iter()
        .map(|e| serde_json::from_str(&e[6..]).unwrap())
        .collect();
    assert_eq!(chunks[0]["choices"][0]["delta"]["role"], "assistant");
    assert!(
        chunks
            .iter()
            .all(|c| c["object"] == "chat.completion.chunk")
    );
    let finish = chunks
        .iter()
        .find(|c| c["choices"][0]["finish_reason"].is_string())
        .unwrap();
    assert_eq!(finish["choices"][0]["finish_reason"], "length");
    assert!(finish["tokenflow"]["prefill_time_ms"].as_f64().unwrap() > 0.0);
    assert!(finish["tokenflow"]["queue_time_ms"].as_f64().unwrap() >= 0.0);
    let usage = &chunks.last().unwrap()["usage"];
    // Usage equals the tokenizer's own counts: the chat template plus BOS, and every sampled token.
    let msgs = vec![Message {
        role: "user".into(),
        content: "How full is the queue?".into(),
    }];
    let prompt_ids = model.encode(&chat_prompt(&msgs)).unwrap();
    assert_eq!(
        usage["prompt_tokens"].as_u64(),
        Some(prompt_ids.len() as u64)
    );
    assert_eq!(usage["completion_tokens"], 12);
    assert_eq!(
        usage["total_tokens"].as_u64(),
        Some(prompt_ids.len() as u64 + 12)
    );
    let text: String = chunks
        .iter()
        .filter_map(|c| c["choices"][0]["delta"]["content"].as_str())
        .collect();
    assert!(!text.is_empty());
}

#[tokio::test(flavor = "multi_thread")]
async fn seeded_generation_is_deterministic_and_completions_agree_with_chat_shape() {
    let (r, _, _) = app(limits());
    let req = json!({"model": model_name(), "prompt": "The bottleneck", "max_tokens": 10, "seed": 42, "temperature": 0.8});
    let (s1, _, a) = post(&r, "/v1/completions", req.clone()).await;
    let (s2, _, b) = post(&r, "/v1/completions", req).await;
    assert_eq!((s1, s2), (StatusCode::OK, StatusCode::OK));
    let (a, b): (Value, Value) = (
        serde_json::from_str(&a).unwrap(),
        serde_json::from_str(&b).unwrap(),
    );
    assert_eq!(a["choices"][0]["text"], b["choices"][0]["text"]);
    assert_eq!(a["object"], "text_completion");
    assert_eq!(a["usage"]["completion_tokens"], 10);
    // Stop sequences end the text before the stop.
    let text = a["choices"][0]["text"].as_str().unwrap().to_string();
    if let Some(stop) = text.split_whitespace().nth(1).filter(|w| !w.is_empty()) {
        let (_, _, c) = post(&r, "/v1/completions", json!({"model": model_name(), "prompt": "The bottleneck", "max_tokens": 10, "seed": 42, "temperature": 0.8, "stop": stop})).await;
        let c: Value = serde_json::from_str(&c).unwrap();
        assert_eq!(c["choices"][0]["finish_reason"], "stop", "{c}");
        assert!(!c["choices"][0]["text"].as_str().unwrap().contains(stop));
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn bad_requests_name_the_field_unknown_models_are_404() {
    let (r, _, _) = app(limits());
    let m = model_name();
    for (path, body, param) in [
        (
            "/v1/chat/completions",
            json!({"model": m, "messages": []}),
            "messages",
        ),
        (
            "/v1/chat/completions",
            json!({"model": m, "messages": [{"role": "user", "content": "x"}], "temperature": "hot"}),
            "temperature",
        ),
        (
            "/v1/chat/completions",
            json!({"model": m, "messages": [{"role": "user", "content": "x"}], "temperature": 3.5}),
            "temperature",
        ),
        (
            "/v1/chat/completions",
            json!({"model": m, "messages": [{"role": "wizard", "content": "x"}]}),
            "messages[0].role",
        ),
        (
            "/v1/completions",
            json!({"model": m, "prompt": "x", "max_tokens": 0}),
            "max_tokens",
        ),
        (
            "/v1/completions",
            json!({"model": m, "prompt": "x", "max_tokens": 100000}),
            "max_tokens",
        ),
        (
            "/v1/completions",
            json!({"model": m, "prompt": "x", "n": 2}),
            "n",
        ),
        (
            "/v1/completions",
            json!({"model": m, "prompt": ["a", "b"]}),
            "prompt",
        ),
    ] {
        let (s, _, b) = post(&r, path, body.clone()).await;
        assert_eq!(s, StatusCode::BAD_REQUEST, "{body}: {b}");
        let v: Value = serde_json::from_str(&b).unwrap();
        assert_eq!(v["error"]["param"], param, "{body}: {b}");
        assert_eq!(v["error"]["type"], "BadRequestError");
    }
    let (s, _, b) = post(
        &r,
        "/v1/chat/completions",
        json!({"model": "gpt-9", "messages": [{"role": "user", "content": "x"}]}),
    )
    .await;
    assert_eq!(s, StatusCode::NOT_FOUND, "{b}");
    assert!(b.contains("The model `gpt-9` does not exist."));
}

#[tokio::test(flavor = "multi_thread")]
async fn a_full_waiting_queue_answers_429_with_retry_after() {
    let (r, _, _) = app(Limits {
        max_running: 1,
        max_waiting: 0,
        token_budget: 512,
    });
    let (s, h, b) = post(
        &r,
        "/v1/completions",
        json!({"model": model_name(), "prompt": "x", "max_tokens": 2}),
    )
    .await;
    assert_eq!(s, StatusCode::TOO_MANY_REQUESTS, "{b}");
    assert_eq!(h["retry-after"], "1");
    let v: Value = serde_json::from_str(&b).unwrap();
    assert_eq!(v["error"]["type"], "RateLimitError");
}

/// A stream answers at once, as vLLM's does, even while its request waits for a running slot: a
/// response held until prefill also held the kernel's acknowledgement of the request (a delayed ACK
/// rides on the response), adding the server's queueing and prefill to every RTT sample of the
/// client's connection. The role chunk still comes with the first token, after the wait.
#[tokio::test(flavor = "multi_thread")]
async fn a_stream_answers_before_its_turn_and_its_role_chunk_comes_with_the_first_token() {
    let (r, engine, _) = app(Limits {
        max_running: 1,
        max_waiting: 4,
        token_budget: 512,
    });
    let stream = |max_tokens: u32| {
        Request::post("/v1/chat/completions")
            .header("content-type", "application/json")
            .body(Body::from(
                json!({"model": model_name(), "messages": [{"role": "user", "content": "hi"}],
                       "max_tokens": max_tokens, "stream": true, "ignore_eos": true,
                       "stream_options": {"include_usage": true}})
                .to_string(),
            ))
            .unwrap()
    };
    // The one running slot, taken by a long generation.
    let long = r.clone().oneshot(stream(3000)).await.unwrap();
    let mut long = long.into_body();
    let _ = long.frame().await.unwrap().unwrap();
    settles(&engine.running, 1, "the first request never ran").await;
    // The second waits for that slot, but its response (status, headers) is there at once.
    let resp = tokio::time::timeout(Duration::from_secs(2), r.clone().oneshot(stream(3)))
        .await
        .expect("a waiting stream's response came only with its turn")
        .unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    assert_eq!(resp.headers()["content-type"], "text/event-stream");
    // … while it still waits: the long generation holds the slot for seconds.
    settles(&engine.waiting, 1, "the second request never waited").await;
    assert_eq!(engine.running.load(Ordering::SeqCst), 1);
    // Freed, its turn comes: the role chunk, then the tokens.
    drop(long);
    let body = tokio::time::timeout(Duration::from_secs(20), resp.into_body().collect())
        .await
        .expect("the waiting stream never finished")
        .unwrap()
        .to_bytes();
    let body = String::from_utf8(body.to_vec()).unwrap();
    let chunks: Vec<Value> = body
        .split("\n\n")
        .filter_map(|e| e.strip_prefix("data: "))
        .filter(|d| *d != "[DONE]")
        .map(|d| serde_json::from_str(d).unwrap())
        .collect();
    assert_eq!(
        chunks[0]["choices"][0]["delta"]["role"], "assistant",
        "{body}"
    );
    assert_eq!(
        chunks.last().unwrap()["usage"]["completion_tokens"],
        3,
        "{body}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_client_that_disconnects_stops_its_generation() {
    let (r, engine, _) = app(limits());
    let req = Request::post("/v1/completions")
        .header("content-type", "application/json")
        .body(Body::from(
            json!({"model": model_name(), "prompt": "x", "max_tokens": 3000, "stream": true})
                .to_string(),
        ))
        .unwrap();
    let resp = r.clone().oneshot(req).await.unwrap();
    let mut body = resp.into_body();
    let _first = body.frame().await.unwrap().unwrap();
    // The scheduler publishes its running count at the end of the step that admitted the request,
    // which may come a moment after the first token was sent.
    settles(&engine.running, 1, "the request never showed as running").await;
    drop(body);
    // 3000 tokens would take seconds; the scheduler drops the sequence at its next step.
    settles(
        &engine.running,
        0,
        "generation went on after the client left",
    )
    .await;
}

#[tokio::test(flavor = "multi_thread")]
async fn models_and_health() {
    let (r, _, _) = app(limits());
    let resp = r
        .clone()
        .oneshot(Request::get("/v1/models").body(Body::empty()).unwrap())
        .await
        .unwrap();
    let v: Value =
        serde_json::from_slice(&resp.into_body().collect().await.unwrap().to_bytes()).unwrap();
    assert_eq!(v["data"][0]["id"].as_str(), Some(model_name().as_str()));
    let resp = r
        .clone()
        .oneshot(Request::get("/health").body(Body::empty()).unwrap())
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
}

#[tokio::test(flavor = "multi_thread")]
async fn long_contexts_are_refused_unless_truncated_to_their_last_tokens() {
    let (r, _, model) = app(limits());
    let m = model_name();
    // 200 KB: far beyond the tiny model's context.
    let long: String = "the queue at the bottleneck grows. ".repeat(6_000);
    let (s, _, b) = post(
        &r,
        "/v1/completions",
        json!({"model": m, "prompt": long, "max_tokens": 2}),
    )
    .await;
    assert_eq!(s, StatusCode::BAD_REQUEST, "{b}");
    let (s, _, b) = post(
        &r,
        "/v1/completions",
        json!({"model": m, "prompt": long, "max_tokens": 2, "truncate_prompt_tokens": 64}),
    )
    .await;
    assert_eq!(s, StatusCode::OK, "{b}");
    let v: Value = serde_json::from_str(&b).unwrap();
    let bos = usize::from(model.bos.is_some());
    assert_eq!(v["usage"]["prompt_tokens"], 64 + bos, "{v}");
    let (s, _, b) = post(
        &r,
        "/v1/completions",
        json!({"model": m, "prompt": "x", "truncate_prompt_tokens": 0}),
    )
    .await;
    assert_eq!(s, StatusCode::BAD_REQUEST, "{b}");
    assert!(b.contains("truncate_prompt_tokens"), "{b}");
}

#[tokio::test(flavor = "multi_thread")]
async fn ignore_eos_generates_max_tokens_where_the_model_would_stop() {
    let (r, _, _) = app(limits());
    let m = model_name();
    let complete = |seed: u64, ignore_eos: bool| {
        let r = r.clone();
        let m = m.clone();
        async move {
            let (s, _, b) = post(
                &r,
                "/v1/completions",
                json!({"model": m, "prompt": "the queue", "max_tokens": 48, "temperature": 1.5,
                       "seed": seed, "ignore_eos": ignore_eos}),
            )
            .await;
            assert_eq!(s, StatusCode::OK, "{b}");
            let v: Value = serde_json::from_str(&b).unwrap();
            (
                v["choices"][0]["finish_reason"]
                    .as_str()
                    .unwrap()
                    .to_string(),
                v["usage"]["completion_tokens"].as_u64().unwrap(),
            )
        }
    };
    // A seed whose sampling reaches the end-of-sequence token early (random weights, small vocab).
    let mut early = None;
    for seed in 0..400 {
        let (reason, n) = complete(seed, false).await;
        if reason == "stop" {
            assert!(n < 48);
            early = Some(seed);
            break;
        }
    }
    let seed = early.expect("no seed in 0..400 reached end-of-sequence");
    assert_eq!(complete(seed, true).await, ("length".to_string(), 48));
}

/// The served binary settles candle's CPU thread count once: unset (or `0`), candle 0.11 rereads
/// `/proc/cpuinfo` on every matrix product — 3.4 MB of reads for one 32-token answer of the tiny
/// model, a fifth of the scheduler thread in the compute-bound demo's profile. Counted with the
/// process's `rchar` (bytes passed to `read`), which also sees the HTTP exchange (a few hundred
/// bytes).
#[test]
fn the_server_does_not_reread_the_cpu_list_for_every_matrix_product() {
    use std::io::{Read, Write};
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_tokenflow-backend"))
        .arg("serve")
        .arg("--model")
        .arg(model_dir())
        .args(["--listen", &format!("127.0.0.1:{port}")])
        // The value candle ignores, as if unset.
        .env("RAYON_NUM_THREADS", "0")
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let pid = child.id();
    let rchar = || -> Option<u64> {
        let io = std::fs::read_to_string(format!("/proc/{pid}/io")).ok()?;
        io.lines()
            .find_map(|l| l.strip_prefix("rchar: "))?
            .trim()
            .parse()
            .ok()
    };
    let exchange = |req: &str| -> Option<String> {
        let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).ok()?;
        s.write_all(req.as_bytes()).ok()?;
        let mut out = String::new();
        s.read_to_string(&mut out).ok()?;
        Some(out)
    };
    // Everything that can fail runs before the child is killed, so a failure never leaves the
    // server running.
    let outcome = (|| -> Result<(String, u64), String> {
        let deadline = Instant::now() + Duration::from_secs(30);
        while exchange("GET /health HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n")
            .is_none_or(|r| !r.starts_with("HTTP/1.1 200"))
        {
            if Instant::now() > deadline {
                return Err("the backend never became ready".into());
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        let before = rchar().ok_or("no rchar in /proc/PID/io")?;
        let body =
            json!({"model": model_name(), "prompt": "hello", "max_tokens": 32, "ignore_eos": true})
                .to_string();
        let answer = exchange(&format!(
            "POST /v1/completions HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
            body.len()
        ))
        .ok_or("no answer to the completion")?;
        let after = rchar().ok_or("no rchar in /proc/PID/io")?;
        Ok((answer, after - before))
    })();
    let _ = child.kill();
    let _ = child.wait();
    let (answer, read) = outcome.unwrap();
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    assert!(answer.contains("\"completion_tokens\":32"), "{answer}");
    assert!(
        read < 64 * 1024,
        "{read} bytes read while generating 32 tokens: something rereads a file per step"
    );
}
