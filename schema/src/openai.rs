//! The streamed chunks of OpenAI-compatible servers (vLLM, tokenflow-backend): what one SSE
//! `data:` payload of `/v1/chat/completions` or `/v1/completions` carries, as a client reads it.
//! Pure and total — any input yields a [`Chunk`], never a panic (fuzzed: `fuzz/`).

use serde_json::Value;

/// What one parsed SSE `data:` line carries.
#[derive(Debug, PartialEq)]
pub enum Chunk {
    Content(String),
    Usage { prompt: u64, completion: u64 },
    Finish(String),
    Error(String),
    Done,
    Other,
}

/// Parses one `data:` payload of an OpenAI/vLLM stream (chat or completions).
pub fn parse_chunk(data: &str) -> Chunk {
    if data.trim() == "[DONE]" {
        return Chunk::Done;
    }
    let Ok(v) = serde_json::from_str::<Value>(data) else {
        return Chunk::Error(format!(
            "not JSON: {}",
            data.chars().take(80).collect::<String>()
        ));
    };
    // Older vLLM releases send the error object bare: {"object": "error", "message": …}.
    if v["object"] == "error" {
        return Chunk::Error(v["message"].as_str().unwrap_or("error").to_string());
    }
    if let Some(e) = v.get("error") {
        return Chunk::Error(
            e.get("message")
                .and_then(Value::as_str)
                .unwrap_or("error")
                .to_string(),
        );
    }
    if let Some(u) = v.get("usage").filter(|u| !u.is_null())
        && v["choices"].as_array().is_none_or(|c| c.is_empty())
    {
        return Chunk::Usage {
            prompt: u["prompt_tokens"].as_u64().unwrap_or(0),
            completion: u["completion_tokens"].as_u64().unwrap_or(0),
        };
    }
    let c = &v["choices"][0];
    let text = c["delta"]["content"]
        .as_str()
        .or_else(|| c["text"].as_str())
        .unwrap_or("");
    if !text.is_empty() {
        return Chunk::Content(text.to_string());
    }
    if let Some(f) = c["finish_reason"].as_str() {
        return Chunk::Finish(f.to_string());
    }
    Chunk::Other
}
