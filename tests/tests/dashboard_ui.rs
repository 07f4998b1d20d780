//! The web dashboard in a real browser: headless Chromium (Debian's `chromium`, driven through
//! `chromedriver` by fantoccini) loads `/ui` from a hint server fed by a live agent, and checks
//! that the live panels show values that change, that the A/B view renders a recorded demo report
//! (`tests/fixtures/ab-reports/`), and that a history query shows the number of windows Redis holds
//! for that range. Screenshots go to `target/test-artifacts/` (and, with `TOKENFLOW_UI_SHOTS=DIR`,
//! to DIR too — the README's pictures).

use std::{
    net::SocketAddr,
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use anyhow::{Context, Result, bail};
use fantoccini::{Client, ClientBuilder, Locator};
use serde_json::json;
use tokenflow_tests::{
    ChildGuard,
    agent::Agent,
    hint_server::HintServer,
    privileged,
    redis_server::{RedisServer, free_port},
};

const TOKEN: &str = "ui-token";

fn artifacts() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/test-artifacts")
}

async fn shot(c: &Client, name: &str) -> Result<()> {
    let png = c.screenshot().await?;
    std::fs::create_dir_all(artifacts())?;
    std::fs::write(artifacts().join(name), &png)?;
    if let Ok(dir) = std::env::var("TOKENFLOW_UI_SHOTS") {
        std::fs::create_dir_all(&dir)?;
        std::fs::write(Path::new(&dir).join(name), &png)?;
    }
    Ok(())
}

/// Polls `script` (JavaScript returning a value) until `ok` accepts it.
async fn wait_for(
    c: &Client,
    what: &str,
    script: &str,
    within: Duration,
    ok: impl Fn(&serde_json::Value) -> bool,
) -> Result<serde_json::Value> {
    let t0 = Instant::now();
    let mut last = serde_json::Value::Null;
    while t0.elapsed() < within {
        last = c.execute(script, vec![]).await?;
        if ok(&last) {
            return Ok(last);
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    bail!("{what}: not within {within:?} (last: {last})")
}

fn text_of(id: &str) -> String {
    format!("return document.getElementById('{id}').textContent;")
}

fn unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// A `datetime-local` value (seconds precision) for `ms`, in the browser's zone — set by the page's
/// own JavaScript so that the zone is the browser's.
fn set_time_js(id: &str, ms: u64) -> String {
    format!(
        "const d = new Date({ms}); const l = new Date(d.getTime() - d.getTimezoneOffset() * 60000);
         document.getElementById('{id}').value = l.toISOString().slice(0, 19); return true;"
    )
}

#[test]
fn the_dashboard_shows_live_ab_and_history_views_in_chromium() -> Result<()> {
    let Some(_p) = privileged("the_dashboard_shows_live_ab_and_history_views_in_chromium") else {
        return Ok(());
    };
    let rt = tokio::runtime::Runtime::new()?;
    rt.block_on(run())
}

async fn run() -> Result<()> {
    let redis = RedisServer::start_ephemeral()?;
    let reports = Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures/ab-reports");
    let hints = HintServer::start(
        &redis.url(),
        TOKEN,
        &[
            "--interval",
            "500ms",
            "--results",
            &reports.to_string_lossy(),
        ],
    )?;
    let started = unix_ms();
    // The agent measures every connection of this host: its own to Redis, the hint server's, the
    // browser's to the hint server.
    let _agent = Agent::start(&[
        "--interval",
        "500ms",
        "--node-id",
        "ui",
        "--redis",
        &redis.url(),
        "--metrics-addr",
        "off",
    ])?;
    let (code, body) = hints.request(
        "PUT",
        "/v1/clients/ui-client",
        Some(TOKEN),
        Some(&json!({"node_id": "ui", "class": "interactive"}).to_string()),
    )?;
    anyhow::ensure!(
        code == 200 || code == 201,
        "registering a client: {code} {body}"
    );

    let port = free_port()?;
    let _driver = ChildGuard(
        Command::new("chromedriver")
            .arg(format!("--port={port}"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .context(
                "starting chromedriver (apt-get install chromium-driver; `cargo xtask setup` does)",
            )?,
    );
    let mut caps = serde_json::Map::new();
    caps.insert(
        "goog:chromeOptions".into(),
        json!({"args": ["--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                        "--window-size=1500,1300"]}),
    );
    let driver = format!("http://127.0.0.1:{port}");
    let t0 = Instant::now();
    let c = loop {
        let connector = hyper_util::client::legacy::connect::HttpConnector::new();
        match ClientBuilder::new(connector)
            .capabilities(caps.clone())
            .connect(&driver)
            .await
        {
            Ok(c) => break c,
            Err(e) if t0.elapsed() > Duration::from_secs(20) => {
                bail!("chromedriver at {driver} did not start a session: {e}")
            }
            Err(_) => tokio::time::sleep(Duration::from_millis(200)).await,
        }
    };
    let result = drive(&c, hints.addr, &redis, started).await;
    let _ = c.close().await;
    result
}

async fn drive(c: &Client, hint: SocketAddr, redis: &RedisServer, started: u64) -> Result<()> {
    c.goto(&format!("http://{hint}/ui")).await?;
    let missing = c
        .execute("return window.echartsMissing || null;", vec![])
        .await?;
    anyhow::ensure!(
        missing.is_null(),
        "the page has no charting library: {missing}"
    );

    // Live: the window number and the RTT chart advance; the hint of the registered client shows.
    let seq = |v: &serde_json::Value| v.as_str().and_then(|s| s.parse::<u64>().ok());
    let first = wait_for(
        c,
        "a first live window",
        &text_of("live-seq"),
        Duration::from_secs(20),
        |v| seq(v).is_some(),
    )
    .await?;
    let first = seq(&first).unwrap_or(0);
    let later = wait_for(
        c,
        "the live window number to advance",
        &text_of("live-seq"),
        Duration::from_secs(10),
        |v| seq(v).is_some_and(|s| s >= first + 3),
    )
    .await?;
    let rate = wait_for(
        c,
        "the client's hint",
        &text_of("live-rate"),
        Duration::from_secs(10),
        |v| v.as_str().is_some_and(|s| s.parse::<f64>().is_ok()),
    )
    .await?;
    let points = c
        .execute(
            "return Number(document.getElementById('chart-rtt').dataset.points || 0);",
            vec![],
        )
        .await?;
    anyhow::ensure!(
        points.as_u64().unwrap_or(0) >= 3,
        "the RTT chart holds {points} windows"
    );
    for id in [
        "chart-rtt",
        "chart-heat",
        "chart-retrans",
        "chart-backlog",
        "chart-hint-rate",
    ] {
        c.find(Locator::Css(&format!("#{id} canvas")))
            .await
            .with_context(|| format!("{id} was not drawn"))?;
    }
    let gpu = c.find(Locator::Id("live-gpu")).await?.text().await?;
    println!(
        "live: windows {first} → {}, hint {rate}, GPU {gpu:?}",
        seq(&later).unwrap_or(0)
    );
    shot(c, "dashboard-live.png").await?;

    // A/B: the recorded report opens with its five arms; the CDF and the p99 chart are drawn.
    c.find(Locator::Css("nav button[data-view=ab]"))
        .await?
        .click()
        .await?;
    let arms = wait_for(
        c,
        "the A/B view to render the recorded report",
        "return Number(document.getElementById('ab-status').dataset.arms || 0);",
        Duration::from_secs(15),
        |v| v.as_u64().unwrap_or(0) > 0,
    )
    .await?;
    anyhow::ensure!(arms.as_u64() == Some(5), "expected 5 arms, saw {arms}");
    for id in ["chart-ab-cdf", "chart-ab-e2e", "chart-ab-p99"] {
        c.find(Locator::Css(&format!("#{id} canvas")))
            .await
            .with_context(|| format!("{id} was not drawn"))?;
    }
    let rows = c.find_all(Locator::Css("#ab-targets tr")).await?.len();
    anyhow::ensure!(rows > 1, "no targets listed");
    shot(c, "dashboard-ab.png").await?;

    // History: from the test's start to now (whole seconds, as the pickers hold them); the count
    // shown equals what Redis holds for that range.
    c.find(Locator::Css("nav button[data-view=history]"))
        .await?
        .click()
        .await?;
    let from = started / 1000 * 1000;
    // A second back, so that every window ending in the range is in Redis before the page asks.
    let to = (unix_ms() - 1000) / 1000 * 1000;
    c.execute(&set_time_js("hist-from", from), vec![]).await?;
    c.execute(&set_time_js("hist-to", to), vec![]).await?;
    c.find(Locator::Id("hist-load")).await?.click().await?;
    let shown = wait_for(
        c,
        "the history count",
        &text_of("hist-count"),
        Duration::from_secs(10),
        |v| v.as_str().is_some_and(|s| s.parse::<u64>().is_ok()),
    )
    .await?;
    let mut con = redis.client()?;
    let held: Vec<redis::Value> = redis::cmd("XRANGE")
        .arg(tokenflow_schema::keys::telemetry_stream("ui"))
        .arg(from)
        .arg(format!("{to}-18446744073709551615"))
        .query(&mut con)?;
    let shown: usize = shown.as_str().unwrap_or_default().parse()?;
    anyhow::ensure!(shown > 0, "no windows in the history range");
    anyhow::ensure!(
        shown == held.len(),
        "the history view shows {shown} windows, Redis holds {}",
        held.len()
    );
    c.find(Locator::Css("#chart-history canvas"))
        .await
        .context("history chart not drawn")?;
    shot(c, "dashboard-history.png").await?;
    println!("history: {shown} windows, as in Redis");
    Ok(())
}
