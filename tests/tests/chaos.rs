//! Chaos: one of two backends is killed under load. The pacer routes around it — requests that
//! had not yet received a token move to the other backend — and the test reports how long the
//! disruption lasted and how many requests failed. Needs no privileges: both backends listen on
//! loopback.

use std::{
    net::SocketAddr,
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::Result;
use serde_json::Value;
use tokenflow_tests::{ChildGuard, agent::sibling_binary, backend, redis_server::free_port};

#[test]
fn killing_one_of_two_backends_under_load_fails_only_requests_already_streaming() -> Result<()> {
    let dir = std::env::temp_dir().join(format!("tf-chaos-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let model = backend::tiny_model(&dir)?;
    let start_backend = |addr: SocketAddr| backend::serve(&model, addr, &["--max-running", "4"]);
    let a: SocketAddr = format!("127.0.0.1:{}", free_port()?).parse()?;
    let b: SocketAddr = format!("127.0.0.1:{}", free_port()?).parse()?;
    let mut backend_a = start_backend(a)?;
    let _backend_b = start_backend(b)?;
    let name = &backend::ready_model(a)?;
    backend::ready_model(b)?;

    let out = dir.join("pacer");
    let pacer_started = Instant::now();
    let mut pacer = ChildGuard(
        Command::new(sibling_binary("tokenflow-pacer")?)
            .args(["run", "--target", &format!("http://{a}")])
            .args(["--target", &format!("http://{b}"), "--model", name])
            .args(["--users", "8", "--duration", "8s", "--max-tokens", "16"])
            .args([
                "--ignore-eos",
                "--retries",
                "2",
                "--timeout",
                "10s",
                "--json",
            ])
            .arg("--out")
            .arg(&out)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()?,
    );
    std::thread::sleep(Duration::from_secs(3));
    backend_a.0.kill()?;
    let killed_ms = pacer_started.elapsed().as_secs_f64() * 1000.0;
    backend_a.0.wait()?;
    let st = pacer.0.wait()?;
    anyhow::ensure!(st.success(), "the pacer failed: {st}");

    let text = std::fs::read_to_string(out.join("requests.jsonl"))?;
    let recs: Vec<Value> = text
        .lines()
        .map(serde_json::from_str)
        .collect::<Result<_, _>>()?;
    let ok = |r: &Value| r["status"] == 200 && r["error"].is_null();
    let end =
        |r: &Value| r["submitted_ms"].as_f64().unwrap_or(0.0) + r["e2e_ms"].as_f64().unwrap_or(0.0);
    let on = |r: &Value, addr: SocketAddr| r["target"].as_str() == Some(&format!("http://{addr}"));
    let before = recs
        .iter()
        .filter(|r| end(r) < killed_ms)
        .collect::<Vec<_>>();
    let after = recs
        .iter()
        .filter(|r| end(r) >= killed_ms)
        .collect::<Vec<_>>();
    let failed: Vec<&&Value> = after.iter().filter(|r| !ok(r)).collect();
    let moved = after
        .iter()
        .filter(|r| ok(r) && r["retries"].as_u64().unwrap_or(0) > 0)
        .count();
    // Recovery: from the kill until the last request that failed because of it ended (0 when
    // none did).
    let recovery_ms = failed
        .iter()
        .map(|r| end(r) - killed_ms)
        .fold(0.0f64, f64::max);
    let figures = serde_json::json!({
        "requests": recs.len(),
        "before_kill_ok": before.iter().filter(|r| ok(r)).count(),
        "after_kill": after.len(),
        "after_kill_failed": failed.len(),
        "after_kill_moved_to_the_other_backend": moved,
        "recovery_ms": recovery_ms,
    });
    println!("chaos: {figures}");
    let artifacts =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/test-artifacts");
    std::fs::create_dir_all(&artifacts)?;
    std::fs::write(
        artifacts.join("chaos.json"),
        serde_json::to_vec_pretty(&figures)?,
    )?;

    assert!(
        before.iter().any(|r| ok(r) && on(r, a)) && before.iter().any(|r| ok(r) && on(r, b)),
        "load was not spread over both backends before the kill"
    );
    // Only requests already streaming from the killed backend can fail: at most its running
    // slots' worth (4), and each of them did receive tokens before the kill.
    assert!(
        failed.len() <= 4,
        "{} requests failed: {failed:?}",
        failed.len()
    );
    for r in &failed {
        assert!(
            on(r, a) && r["ttft_ms"].is_number(),
            "a request failed that had no token yet (it should have moved): {r}"
        );
    }
    // Everything submitted a second after the kill went to the live backend and succeeded.
    let late: Vec<&&Value> = after
        .iter()
        .filter(|r| r["submitted_ms"].as_f64().unwrap_or(0.0) > killed_ms + 1000.0)
        .collect();
    assert!(
        late.len() >= 8,
        "only {} requests after the kill",
        late.len()
    );
    assert!(
        late.iter().all(|r| ok(r) && on(r, b)),
        "requests after the kill did not all succeed on the live backend"
    );
    assert!(recovery_ms < 2000.0, "recovery took {recovery_ms:.0} ms");
    let _ = std::fs::remove_dir_all(&dir);
    Ok(())
}
