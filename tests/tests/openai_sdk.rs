//! A standard OpenAI client library against the backend: OpenAI's own Python SDK (pinned, installed
//! by `cargo xtask setup` into target/tools/venv) streams a chat completion, asks for a completion,
//! lists the models and meets the errors, over a real socket. What it parsed is checked here
//! against the backend's answers to the same seeded requests.

use std::{path::PathBuf, process::Command};

use anyhow::{Context, Result};
use serde_json::{Value, json};
use tokenflow_tests::{backend, hint_server::http, redis_server::free_port};

/// The SDK's side: prints one JSON object with what it received.
const SCRIPT: &str = r#"
import json, sys
import openai
from openai import OpenAI

base, model = sys.argv[1], sys.argv[2]
client = OpenAI(base_url=base, api_key="unused", max_retries=0)
out = {"sdk": openai.__version__}

stream = client.chat.completions.create(
    model=model,
    messages=[{"role": "user", "content": "hello"}],
    max_tokens=12,
    seed=5,
    stream=True,
    stream_options={"include_usage": True},
)
text, chunks, usage, finish = "", 0, None, None
for chunk in stream:
    chunks += 1
    if chunk.usage is not None:
        usage = chunk.usage.model_dump()
    for choice in chunk.choices:
        text += choice.delta.content or ""
        finish = choice.finish_reason or finish
out["stream"] = {"text": text, "chunks": chunks, "usage": usage, "finish": finish}

c = client.completions.create(model=model, prompt="once upon", max_tokens=6, seed=9)
out["completion"] = {"text": c.choices[0].text, "usage": c.usage.model_dump()}
out["models"] = [m.id for m in client.models.list()]

try:
    client.chat.completions.create(model="no-such-model", messages=[{"role": "user", "content": "x"}])
except openai.NotFoundError as e:
    out["unknown_model"] = e.status_code
try:
    client.chat.completions.create(model=model, messages=[{"role": "user", "content": "x"}], max_tokens=0)
except openai.BadRequestError as e:
    out["bad_request"] = {"status": e.status_code, "param": (e.body or {}).get("param")}
print(json.dumps(out))
"#;

fn sdk_python() -> Option<PathBuf> {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..");
    let py = root.join("target/tools/venv/bin/python");
    let ok = Command::new(&py)
        .args(["-c", "import openai"])
        .output()
        .is_ok_and(|o| o.status.success());
    if ok {
        return Some(py);
    }
    let msg = format!(
        "openai_sdk: OpenAI's Python SDK missing from {}: run `cargo xtask setup`",
        py.display()
    );
    if std::env::var("CI").is_ok_and(|v| v == "true") {
        panic!("{msg} — refusing to skip under CI=true");
    }
    eprintln!("SKIP {msg}");
    None
}

#[test]
fn openais_python_sdk_streams_from_the_backend() -> Result<()> {
    let Some(python) = sdk_python() else {
        return Ok(());
    };
    let dir = std::env::temp_dir().join(format!("tf-openai-sdk-{}", std::process::id()));
    let model_dir = backend::tiny_model(&dir)?;
    let addr: std::net::SocketAddr = format!("127.0.0.1:{}", free_port()?).parse()?;
    let _backend = backend::serve(&model_dir, addr, &[])?;
    let model = backend::ready_model(addr)?;

    let out = Command::new(&python)
        .args(["-c", SCRIPT, &format!("http://{addr}/v1"), &model])
        .output()
        .context("running the OpenAI SDK")?;
    anyhow::ensure!(
        out.status.success(),
        "the SDK script failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let sdk: Value = serde_json::from_slice(&out.stdout)?;
    eprintln!("openai {}: {sdk}", sdk["sdk"]);

    // The same seeded requests, unstreamed, straight from the backend.
    let post = |path: &str, body: Value| -> Result<Value> {
        let (status, text) = http(addr, "POST", path, None, Some(&body.to_string()))?;
        anyhow::ensure!(status == 200, "{path}: {status} {text}");
        Ok(serde_json::from_str(&text)?)
    };
    let chat = post(
        "/v1/chat/completions",
        json!({"model": model, "messages": [{"role": "user", "content": "hello"}], "max_tokens": 12, "seed": 5}),
    )?;
    let s = &sdk["stream"];
    assert_eq!(s["text"], chat["choices"][0]["message"]["content"]);
    assert_eq!(
        s["usage"]["completion_tokens"],
        chat["usage"]["completion_tokens"]
    );
    assert_eq!(s["usage"]["prompt_tokens"], chat["usage"]["prompt_tokens"]);
    assert_eq!(s["finish"], chat["choices"][0]["finish_reason"]);
    assert!(
        s["chunks"].as_u64().unwrap_or(0) >= 3,
        "a role chunk, content chunks and a usage chunk: {s}"
    );

    let completion = post(
        "/v1/completions",
        json!({"model": model, "prompt": "once upon", "max_tokens": 6, "seed": 9}),
    )?;
    assert_eq!(sdk["completion"]["text"], completion["choices"][0]["text"]);
    for k in ["prompt_tokens", "completion_tokens", "total_tokens"] {
        assert_eq!(sdk["completion"]["usage"][k], completion["usage"][k], "{k}");
    }

    assert_eq!(sdk["models"], json!([model]));
    assert_eq!(sdk["unknown_model"], 404);
    assert_eq!(sdk["bad_request"]["status"], 400);
    assert_eq!(sdk["bad_request"]["param"], "max_tokens");
    let _ = std::fs::remove_dir_all(&dir);
    Ok(())
}
