//! One streaming chat request against an OpenAI-compatible server (vLLM or tokenflow-backend),
//! timed as the user feels it: from the moment the user submitted, pacer wait included.

use std::time::{Duration, Instant};

use eventsource_stream::Eventsource;
use futures_util::StreamExt;
use http_body_util::BodyExt;
use serde::Serialize;
use serde_json::json;

#[derive(Clone, Debug, Serialize, PartialEq)]
pub struct Record {
    pub user: usize,
    pub class: String,
    pub target: String,
    /// Milliseconds since the run started, when the user submitted.
    pub submitted_ms: f64,
    /// Time spent waiting in the pacer.
    pub wait_ms: f64,
    /// Time to first token from submission (what the user feels).
    pub ttft_ms: Option<f64>,
    /// Time to first token from when the request was sent.
    pub ttft_sent_ms: Option<f64>,
    pub itl_ms: Vec<f64>,
    pub e2e_ms: f64,
    pub tokens_in: u64,
    pub tokens_out: u64,
    pub status: u16,
    pub error: Option<String>,
    pub retries: u32,
}

pub use tokenflow_schema::openai::{Chunk, parse_chunk};

pub struct Call<'a> {
    pub http: &'a crate::socket::HttpClient,
    pub target: &'a str,
    pub model: &'a str,
    pub prompt: &'a str,
    pub max_tokens: u32,
    /// vLLM's `truncate_prompt_tokens`: the server keeps only the prompt's last k tokens.
    pub truncate_prompt_tokens: Option<u32>,
    /// vLLM's `ignore_eos`: always generate `max_tokens` (output lengths the same in every arm).
    pub ignore_eos: bool,
    pub timeout: Duration,
    /// Counts the request among the uploads in progress until the response's head is back.
    pub uploads: Option<&'a crate::socket::Uploads>,
}

/// The outcome of one attempt.
pub struct Attempt {
    pub status: u16,
    pub retry_after: Option<Duration>,
    pub first_token: Option<Instant>,
    pub token_times: Vec<Instant>,
    pub tokens_in: u64,
    pub tokens_out: u64,
    pub error: Option<String>,
    /// The connection broke while the body streamed (the server died or reset it), as opposed
    /// to a malformed event or a timeout.
    pub broken: bool,
}

pub async fn attempt(c: &Call<'_>) -> Attempt {
    let mut a = Attempt {
        status: 0,
        retry_after: None,
        first_token: None,
        token_times: Vec::new(),
        tokens_in: 0,
        tokens_out: 0,
        error: None,
        broken: false,
    };
    let mut body = json!({
        "model": c.model,
        "messages": [{"role": "user", "content": c.prompt}],
        "max_tokens": c.max_tokens,
        "stream": true,
        "stream_options": {"include_usage": true},
    });
    if let Some(k) = c.truncate_prompt_tokens {
        body["truncate_prompt_tokens"] = k.into();
    }
    if c.ignore_eos {
        body["ignore_eos"] = true.into();
    }
    // One deadline for the whole attempt: connecting, the response head and the stream.
    let deadline = tokio::time::Instant::now() + c.timeout;
    let timed_out = || format!("timed out after {:.1} s", c.timeout.as_secs_f64());
    let req = match http::Request::post(format!("{}/v1/chat/completions", c.target))
        .header(http::header::CONTENT_TYPE, "application/json")
        .body(http_body_util::Full::new(bytes::Bytes::from(
            body.to_string(),
        ))) {
        Ok(r) => r,
        Err(e) => {
            a.error = Some(format!("bad request: {e}"));
            return a;
        }
    };
    let upload = c.uploads.map(crate::socket::Uploads::start);
    let r = tokio::time::timeout_at(deadline, c.http.request(req)).await;
    drop(upload);
    let r = match r {
        Ok(Ok(r)) => r,
        Ok(Err(e)) => {
            a.error = Some(format!("{e}: {}", source_chain(&e)));
            return a;
        }
        Err(_) => {
            a.error = Some(timed_out());
            return a;
        }
    };
    a.status = r.status().as_u16();
    if !r.status().is_success() {
        a.retry_after = r
            .headers()
            .get("retry-after")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<f64>().ok())
            .map(Duration::from_secs_f64);
        let text = match tokio::time::timeout_at(deadline, r.into_body().collect()).await {
            Ok(Ok(b)) => String::from_utf8_lossy(&b.to_bytes()).into_owned(),
            _ => String::new(),
        };
        a.error = Some(text.chars().take(300).collect());
        return a;
    }
    let mut events = r.into_body().into_data_stream().eventsource();
    loop {
        let ev = match tokio::time::timeout_at(deadline, events.next()).await {
            Ok(Some(Ok(ev))) => ev,
            Ok(Some(Err(e))) => {
                a.broken = matches!(e, eventsource_stream::EventStreamError::Transport(_));
                a.error = Some(format!("stream: {e}"));
                break;
            }
            Ok(None) => break,
            Err(_) => {
                a.error = Some(timed_out());
                break;
            }
        };
        match parse_chunk(&ev.data) {
            Chunk::Content(_) => {
                let now = Instant::now();
                a.first_token.get_or_insert(now);
                a.token_times.push(now);
            }
            Chunk::Usage { prompt, completion } => {
                a.tokens_in = prompt;
                a.tokens_out = completion;
            }
            Chunk::Error(e) => a.error = Some(e),
            Chunk::Done => break,
            Chunk::Finish(_) | Chunk::Other => {}
        }
    }
    if a.tokens_out == 0 {
        a.tokens_out = a.token_times.len() as u64;
    }
    a
}

/// The causes under an error, joined: hyper's own message ("client error (Connect)") names
/// only the stage.
fn source_chain(e: &dyn std::error::Error) -> String {
    let mut parts = Vec::new();
    let mut cur = e.source();
    while let Some(s) = cur {
        parts.push(s.to_string());
        cur = s.source();
    }
    parts.join(": ")
}

/// Inter-token gaps, milliseconds.
pub fn itl(times: &[Instant]) -> Vec<f64> {
    times
        .windows(2)
        .map(|w| (w[1] - w[0]).as_secs_f64() * 1000.0)
        .collect()
}

pub fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

pub fn jitter(d: Duration) -> Duration {
    d.mul_f64(0.8 + 0.4 * fastrand::f64())
}
