//! Routing by node hints: two backends on two nodes, one node congested. The pacer follows one
//! hint per node and sends the congested node only what its hint allows. The nodes' telemetry is
//! SYNTHETIC (the hint server's node simulator windows, written to Redis as the agent writes them:
//! one node at a 12 ms p95, the other at 180 ms); the hint server, the backends and the pacer are
//! the real binaries. Needs no privileges: everything listens on loopback.

use std::{
    net::SocketAddr,
    process::{Command, Stdio},
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use anyhow::{Context, Result};
use serde_json::Value;
use tokenflow_hint_server::simulate::node_window;
use tokenflow_schema::keys;
use tokenflow_tests::{
    ChildGuard,
    agent::sibling_binary,
    backend,
    hint_server::HintServer,
    redis_server::{RedisServer, free_port},
};

const TOKEN: &str = "routing-test-token";

/// Writes one window per node per second until `stop`.
fn feed(mut c: redis::Connection, nodes: &[(&str, u64)], stop: Arc<AtomicBool>) -> Result<()> {
    let mut seq = 0;
    while !stop.load(Ordering::Relaxed) {
        let end = SystemTime::now().duration_since(UNIX_EPOCH)?.as_millis() as u64;
        for (node, p95_us) in nodes {
            let w = node_window(node, seq, end, 1000, *p95_us);
            let _: () = redis::cmd("SADD")
                .arg(keys::NODES)
                .arg(node)
                .query(&mut c)?;
            let _: String = redis::cmd("XADD")
                .arg(keys::telemetry_stream(node))
                .arg(format!("{end}-*"))
                .arg(keys::WINDOW_FIELD)
                .arg(serde_json::to_string(&w)?)
                .query(&mut c)?;
        }
        seq += 1;
        std::thread::sleep(Duration::from_secs(1));
    }
    Ok(())
}

#[test]
fn a_congested_node_gets_only_what_its_hint_allows() -> Result<()> {
    let dir = std::env::temp_dir().join(format!("tf-routing-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let redis = RedisServer::start()?;
    let hs = HintServer::start(&redis.url(), TOKEN, &["--interval", "1s"])?;
    let stop = Arc::new(AtomicBool::new(false));
    let feeder = {
        let (c, stop) = (redis.client()?, stop.clone());
        std::thread::spawn(move || feed(c, &[("calm", 12_000), ("busy", 180_000)], stop))
    };

    let model = backend::tiny_model(&dir)?;
    let calm: SocketAddr = format!("127.0.0.1:{}", free_port()?).parse()?;
    let busy: SocketAddr = format!("127.0.0.1:{}", free_port()?).parse()?;
    let _calm_backend = backend::serve(&model, calm, &["--max-running", "4"])?;
    let _busy_backend = backend::serve(&model, busy, &["--max-running", "4"])?;
    let name = &backend::ready_model(calm)?;
    backend::ready_model(busy)?;

    let out = dir.join("pacer");
    let mut pacer = ChildGuard(
        Command::new(sibling_binary("tokenflow-pacer")?)
            .args(["run", "--target", &format!("http://{calm}#calm")])
            .args(["--target", &format!("http://{busy}#busy"), "--model", name])
            .args(["--pacing", &format!("hints:http://{}", hs.addr)])
            .args(["--hint-token", TOKEN, "--client-id", "router"])
            .args(["--users", "8", "--duration", "14s", "--max-tokens", "16"])
            .args(["--ignore-eos", "--timeout", "10s", "--json", "--out"])
            .arg(&out)
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()?,
    );
    let st = pacer.0.wait()?;
    stop.store(true, Ordering::Relaxed);
    feeder
        .join()
        .map_err(|_| anyhow::anyhow!("the feeder panicked"))??;
    anyhow::ensure!(st.success(), "the pacer failed: {st}");

    // One client per node, registered by the pacer.
    for (client, node) in [("router.calm", "calm"), ("router.busy", "busy")] {
        let (code, body) =
            hs.request("GET", &format!("/v1/clients/{client}"), Some(TOKEN), None)?;
        assert_eq!(code, 200, "{client}: {body}");
        assert!(body.contains(&format!("\"node_id\":\"{node}\"")), "{body}");
    }
    let (_, hint) = hs.request("GET", "/v1/hints/router.busy", Some(TOKEN), None)?;
    let busy_rate = serde_json::from_str::<Value>(&hint)?["rate_limit_rps"]
        .as_f64()
        .context("no rate in the busy node's hint")?;

    let text = std::fs::read_to_string(out.join("requests.jsonl"))?;
    let recs: Vec<Value> = text
        .lines()
        .map(serde_json::from_str)
        .collect::<Result<_, _>>()?;
    // After the first hints have settled (startup doubles, a congested node is cut by half each
    // period): the last 8 s.
    let settled: Vec<&Value> = recs
        .iter()
        .filter(|r| r["submitted_ms"].as_f64().unwrap_or(0.0) > 6000.0 && r["status"] == 200)
        .collect();
    let on = |addr: SocketAddr| {
        settled
            .iter()
            .filter(|r| r["target"].as_str() == Some(&format!("http://{addr}")))
            .count()
    };
    let (n_calm, n_busy) = (on(calm), on(busy));
    println!(
        "routing: {n_calm} requests to the calm node, {n_busy} to the busy one (its hint: {busy_rate:.1} req/s)"
    );
    assert!(n_calm >= 20, "too few requests to judge: {n_calm}");
    // Least-loaded routing alone splits two idle backends about evenly; the busy node's hint
    // allows a few requests per second at most.
    assert!(
        n_busy * 5 <= n_calm,
        "the congested node got {n_busy} of {} requests",
        n_calm + n_busy
    );
    assert!(
        (n_busy as f64) <= busy_rate.max(1.0) * 8.0 * 2.0,
        "{n_busy} requests in 8 s to a node that allows {busy_rate:.1} req/s"
    );
    let _ = std::fs::remove_dir_all(&dir);
    Ok(())
}
