//! Every metric a Grafana board in `dashboards/` queries is exported by some component: the agent,
//! the hint server, the backend and the pacer run for real (the pacer sends through the hint
//! server's limit to the backend while the agent measures the connections), and their
//! `/metrics` endpoints are scraped. The DCGM GPU gauges need a GPU, which this machine does not
//! have: for those names only, the agent's exporter renders a window from the fake GPU provider
//! (named as such; tests only) — the same code path the live agent takes on a GPU node.

use std::{
    collections::BTreeSet,
    net::SocketAddr,
    path::Path,
    process::{Child, Command, Stdio},
    time::Duration,
};

use anyhow::{Context, Result};
use tokenflow_tests::{
    ChildGuard,
    agent::{Agent, sibling_binary},
    hint_server::{HintServer, http, wait_http},
    privileged,
    redis_server::{RedisServer, free_port},
    scrape_metrics,
};

const TOKEN: &str = "dash-token";

/// Metric names in a Prometheus text exposition, with histogram/summary suffixes stripped.
fn exposed(text: &str) -> BTreeSet<String> {
    text.lines()
        .filter_map(|l| l.strip_prefix("# TYPE "))
        .filter_map(|l| l.split_whitespace().next())
        .map(String::from)
        .collect()
}

/// Metric names a PromQL expression selects: identifiers not followed by `(` (functions) and not
/// inside `{…}` (labels) or after `by`/`without` (grouping labels).
fn selected(expr: &str) -> BTreeSet<String> {
    const WORDS: [&str; 6] = [
        "by",
        "without",
        "on",
        "ignoring",
        "group_left",
        "group_right",
    ];
    // Aggregation operators may take their grouping before the parenthesis: `sum by (le) (…)`.
    const AGGREGATIONS: [&str; 12] = [
        "sum",
        "avg",
        "min",
        "max",
        "count",
        "group",
        "stddev",
        "stdvar",
        "topk",
        "bottomk",
        "quantile",
        "count_values",
    ];
    let mut out = BTreeSet::new();
    let b = expr.as_bytes();
    let (mut i, mut depth_brace, mut grouping) = (0, 0, false);
    while i < b.len() {
        let c = b[i] as char;
        match c {
            '{' => depth_brace += 1,
            '}' => depth_brace -= 1,
            '"' => {
                i += 1;
                while i < b.len() && b[i] != b'"' {
                    i += 1;
                }
            }
            '[' => {
                while i < b.len() && b[i] != b']' {
                    i += 1;
                }
            }
            ')' => grouping = false,
            _ if c.is_ascii_alphabetic() || c == '_' => {
                let start = i;
                while i < b.len() && (b[i].is_ascii_alphanumeric() || b[i] == b'_' || b[i] == b':')
                {
                    i += 1;
                }
                let word = &expr[start..i];
                let next = expr[i..].trim_start().chars().next();
                if WORDS.contains(&word) {
                    grouping = true;
                } else if depth_brace == 0
                    && !grouping
                    && next != Some('(')
                    && !AGGREGATIONS.contains(&word)
                {
                    out.insert(
                        word.trim_end_matches("_bucket")
                            .trim_end_matches("_count")
                            .trim_end_matches("_sum")
                            .to_string(),
                    );
                }
                continue;
            }
            _ => {}
        }
        i += 1;
    }
    out
}

#[test]
fn promql_selection_finds_metric_names_only() {
    let e = r#"histogram_quantile(0.99, sum by (le, route) (rate(tokenflow_hint_http_request_duration_seconds_bucket{route="/x"}[1m])))"#;
    assert_eq!(
        selected(e),
        BTreeSet::from(["tokenflow_hint_http_request_duration_seconds".to_string()])
    );
    assert_eq!(
        selected("sum(rate(vllm:prompt_tokens_total[1m])) + DCGM_FI_DEV_GPU_UTIL"),
        BTreeSet::from([
            "vllm:prompt_tokens_total".to_string(),
            "DCGM_FI_DEV_GPU_UTIL".to_string()
        ])
    );
}

/// Every metric name the boards query, with the board it is on.
fn board_metrics() -> Result<Vec<(String, String)>> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../dashboards");
    let mut out = Vec::new();
    for e in std::fs::read_dir(&dir)? {
        let path = e?.path();
        if path.extension().is_none_or(|x| x != "json") {
            continue;
        }
        let board: serde_json::Value = serde_json::from_slice(&std::fs::read(&path)?)?;
        let name = path
            .file_name()
            .unwrap_or_default()
            .to_string_lossy()
            .into_owned();
        for p in board["panels"].as_array().into_iter().flatten() {
            for t in p["targets"].as_array().into_iter().flatten() {
                for m in selected(t["expr"].as_str().unwrap_or_default()) {
                    out.push((m, name.clone()));
                }
            }
        }
    }
    anyhow::ensure!(
        !out.is_empty(),
        "no board queries found in {}",
        dir.display()
    );
    Ok(out)
}

/// The agent's exporter on a window from the fake GPU provider (tests only): the DCGM names.
fn fake_gpu_names() -> Result<BTreeSet<String>> {
    use tokenflow_agent::sink::prometheus::local_recorder;
    let w: tokenflow_schema::TelemetryWindow = serde_json::from_value(serde_json::json!({
        "schema_version": 1, "node_id": "fake", "seq": 0, "start_unix_ms": 0, "end_unix_ms": 1000,
        "flows": [], "remotes": [], "node": {
            "rtt": {"samples":0,"p50_us":0,"p95_us":0,"p99_us":0,"max_us":0,"mean_us":0},
            "active_flows": 0, "closed_flows": 0, "bytes_acked": 0, "retransmits": 0,
            "retransmit_rate_per_s": 0.0, "state_changes": 0},
        "capture": {"probe_events":0,"retransmit_events":0,"state_events":0,"flows_created":0,
            "flow_insert_failed":0,"closed_dropped":0,"filtered_events":0,"retransmits_untracked":0,"flows_tracked":0},
        "sinks": {"redis_buffered":0,"redis_dropped_total":0,"redis_written_total":0,"redis_connected":false},
        "gpu": {"available": true, "provider": "fake", "devices": [{"index": 0, "name": "fake-gpu",
            "uuid": "GPU-fake", "utilization_percent": 50, "memory_used_bytes": 1048576,
            "memory_total_bytes": 2097152, "power_watts": 100.0, "sm_clock_mhz": 1500,
            "temperature_celsius": 50, "pcie_tx_bytes_per_s": 1, "pcie_rx_bytes_per_s": 1,
            "processes": []}]},
        "request_latency": [], "uprobes": [], "backlog": {"listeners": [], "ports": []}
    }))?;
    let (recorder, exporter) = local_recorder()?;
    metrics::with_local_recorder(&recorder, || exporter.record(&w));
    Ok(exposed(&exporter.render())
        .into_iter()
        .filter(|n| n.starts_with("DCGM_"))
        .collect())
}

#[test]
fn every_metric_the_grafana_boards_query_is_exported() -> Result<()> {
    let Some(_p) = privileged("every_metric_the_grafana_boards_query_is_exported") else {
        return Ok(());
    };
    let redis = RedisServer::start_ephemeral()?;
    // The committed trace (windows recorded on the test bed) as a second node's history: enough
    // windows for the first refit, so that the training metrics and the forecast exist.
    let trace = Path::new(env!("CARGO_MANIFEST_DIR")).join("../hint-server/fixtures/trace.jsonl");
    let mut con = redis.client()?;
    for line in std::fs::read_to_string(&trace)?.lines() {
        let row: serde_json::Value = serde_json::from_str(line)?;
        let w = &row["window"];
        let id = format!("{}-0", w["end_unix_ms"]);
        let _: String = redis::cmd("XADD")
            .arg(tokenflow_schema::keys::telemetry_stream("trace"))
            .arg(&id)
            .arg(tokenflow_schema::keys::WINDOW_FIELD)
            .arg(w.to_string())
            .query(&mut con)?;
    }
    let _: i64 = redis::cmd("SADD")
        .arg(tokenflow_schema::keys::NODES)
        .arg("trace")
        .query(&mut con)?;
    // Refit often, so that the training metrics exist within the test.
    let hints = HintServer::start(
        &redis.url(),
        TOKEN,
        &["--refit-every", "2s", "--interval", "500ms"],
    )?;
    let agent_metrics: SocketAddr = format!("127.0.0.1:{}", free_port()?).parse()?;
    let _agent = Agent::start(&[
        "--interval",
        "500ms",
        "--node-id",
        "dash",
        "--redis",
        &redis.url(),
        "--metrics-addr",
        &agent_metrics.to_string(),
    ])?;

    let dir = std::env::temp_dir().join(format!("tf-dash-{}", std::process::id()));
    let model = tokenflow_tests::backend::tiny_model(&dir)?;
    let backend: SocketAddr = format!("127.0.0.1:{}", free_port()?).parse()?;
    let _backend = tokenflow_tests::backend::serve(
        &model,
        backend,
        &["--max-waiting", "4", "--max-running", "2"],
    )?;
    wait_http(backend, "/health", Duration::from_secs(30))?;
    let (_, models) = http(backend, "GET", "/v1/models", None, None)?;
    let models: serde_json::Value = serde_json::from_str(&models)?;
    let name = models["data"][0]["id"]
        .as_str()
        .context("no model")?
        .to_string();

    // One paced client and one unpaced one that overloads the small queue (429s, cancels).
    let pacer_metrics: SocketAddr = format!("127.0.0.1:{}", free_port()?).parse()?;
    let pacer_bin = sibling_binary("tokenflow-pacer")?;
    let pacer = |args: &[&str]| -> Result<Child> {
        Ok(Command::new(&pacer_bin)
            .args([
                "run",
                "--target",
                &format!("http://{backend}"),
                "--model",
                &name,
            ])
            .args(["--max-tokens", "8", "--ignore-eos", "--json", "--out"])
            .arg(dir.join(format!("pacer-{}", args.len())))
            .args(args)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()?)
    };
    let hints_url = format!("hints:http://{}", hints.addr);
    // Longer than the scraping below can take: it is stopped when the guard drops.
    let _paced = ChildGuard(pacer(&[
        "--users",
        "4",
        "--duration",
        "40s",
        "--pacing",
        &hints_url,
        "--client-id",
        "dash-paced",
        "--class",
        "interactive",
        "--node-id",
        "dash",
        "--hint-token",
        TOKEN,
        "--metrics-addr",
        &pacer_metrics.to_string(),
    ])?);
    let _burst = ChildGuard(pacer(&[
        "--users",
        "24",
        "--duration",
        "4s",
        "--timeout",
        "1s",
        "--retries",
        "0",
    ])?);
    let gpu = fake_gpu_names()?;
    println!("DCGM names checked through the agent's exporter with the fake GPU provider: {gpu:?}");
    let mut have: BTreeSet<String> = gpu.into_iter().collect();
    let wanted = board_metrics()?;
    // A metric appears once its first event happened (the pacer's first TTFT, the hint server's
    // first refit): scrape until every board's metric has, or 30 s. One scrape after a fixed 5 s
    // failed under CI's load, the paced users' first token not yet in.
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    let components = [
        ("agent", agent_metrics),
        ("hint server", hints.metrics),
        ("backend", backend),
        ("pacer", pacer_metrics),
    ];
    let mut last = vec![String::new(); components.len()];
    loop {
        std::thread::sleep(Duration::from_millis(500));
        for ((who, addr), last) in components.iter().zip(&mut last) {
            *last = scrape_metrics(*addr).with_context(|| format!("scraping the {who}"))?;
            have.extend(exposed(last));
        }
        if wanted.iter().all(|(m, _)| have.contains(m)) || std::time::Instant::now() > deadline {
            break;
        }
    }
    for ((who, _), text) in components.iter().zip(&last) {
        anyhow::ensure!(
            !exposed(text).is_empty(),
            "the {who} exported nothing: {text}"
        );
    }
    let missing: Vec<String> = wanted
        .into_iter()
        .filter(|(m, _)| !have.contains(m))
        .map(|(m, board)| format!("{m} ({board})"))
        .collect();
    let _ = std::fs::remove_dir_all(&dir);
    anyhow::ensure!(
        missing.is_empty(),
        "queried by a board but exported by no component: {missing:?}\nexported: {have:?}"
    );
    Ok(())
}
